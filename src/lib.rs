//! histolens: a whole-slide image viewer with deep-learning models for computational pathology.
//!
//! Layers, each using only those above it in this list:
//! - [`util`]: atomic writes, memory facts.
//! - [`slide`]: pixels in (OpenSlide pyramids and loose snapshots), µm/px and magnification.
//! - [`tiles`]: tile grid, byte-bounded cache, view planning, loader pool.
//! - [`nn`]: candle model code (backbones, pooling with gradients, checkpoints, Hagnifinder); no I/O.
//! - [`data`]: tissue detection, dataset manifests and builders, augmentation, images to tensors.
//! - [`labels`]: the labelling project (classes or magnifications, groups, splits; undo; exports to
//!   the dataset manifests); uses `data`, `slide` and `util` only.
//! - [`magnification`]: the magnification task: training, evaluation metrics, estimates.
//! - [`dmsl`]: two-magnification classification: training, evaluation, slide heatmaps.
//! - [`runs`]: training run folders of either task, shared by the CLI and the window.
//! - `fuzzing`: byte-level entry points for the fuzz targets and their regression test.
//! - [`gui`]: the eframe application (knows the layers above; nothing above knows it).

pub mod data;
pub mod dmsl;
#[doc(hidden)]
pub mod fuzzing;
pub mod gui;
pub mod labels;
pub mod magnification;
pub mod nn;
pub mod runs;
pub mod slide;
pub mod tiles;
pub mod util;

use std::path::PathBuf;

/// The folder where histolens keeps per-user state (calibrations, caches): `$HISTOLENS_DATA_DIR`
/// when set, else the platform's data folder, else `./.histolens`.
pub fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HISTOLENS_DATA_DIR") {
        return PathBuf::from(d);
    }
    directories::ProjectDirs::from("org", "histolens", "histolens")
        .map(|p| p.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from(".histolens"))
}

/// The folder for caches histolens can rebuild (frozen-backbone features): `$HISTOLENS_CACHE_DIR`
/// when set, else the platform's cache folder, else `data_dir()/cache`. Never beside the user's files.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HISTOLENS_CACHE_DIR") {
        return PathBuf::from(d);
    }
    directories::ProjectDirs::from("org", "histolens", "histolens")
        .map(|p| p.cache_dir().to_path_buf())
        .unwrap_or_else(|| data_dir().join("cache"))
}

/// The bundled CC0 sample slide (OpenSlide test data).
pub fn bundled_sample() -> Option<PathBuf> {
    bundled_asset("samples", "CMU-1-Small-Region.svs")
}

/// The bundled default magnification model (Hagnifinder).
pub fn default_magnification_model() -> Option<PathBuf> {
    bundled_asset("models", "hagnifinder.safetensors")
}

/// The bundled demo DMSL model (a demonstration of the mechanism, not a diagnostic model).
pub fn default_dmsl_model() -> Option<PathBuf> {
    bundled_asset("models", "dmsl-demo.safetensors")
}

/// A bundled file, looked for beside the sources, beside the executable, and where the Debian package
/// installs it.
fn bundled_asset(folder: &str, name: &str) -> Option<PathBuf> {
    // The installed layout first (BIN/../share/histolens, as the .deb lays it out), so that an
    // installed binary uses its own files; then a copy beside the binary; then the source tree.
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join("../share/histolens").join(folder).join(name));
        candidates.push(dir.join("assets").join(folder).join(name));
    }
    candidates.push(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("assets")
            .join(folder)
            .join(name),
    );
    candidates.push(
        PathBuf::from("/usr/share/histolens")
            .join(folder)
            .join(name),
    );
    candidates.into_iter().find(|p| p.is_file())
}
