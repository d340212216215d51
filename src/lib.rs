//! histolens: a whole-slide image viewer with deep-learning models for computational pathology.
//!
//! Layers, each using only those above it in this list:
//! - [`util`]: atomic writes, memory facts.
//! - [`slide`]: pixels in (OpenSlide pyramids and loose snapshots), µm/px and magnification.
//! - [`tiles`]: tile grid, byte-bounded cache, view planning, loader pool.
//! - [`nn`]: candle model code (backbones, pooling with gradients, checkpoints); no I/O.
//! - [`gui`]: the eframe application (knows the layers above; nothing above knows it).

pub mod gui;
pub mod nn;
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

/// The bundled CC0 sample slide (OpenSlide test data), looked for beside the sources, beside the
/// executable, and where the Debian package installs it.
pub fn bundled_sample() -> Option<PathBuf> {
    const NAME: &str = "CMU-1-Small-Region.svs";
    let mut candidates = vec![
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("assets/samples")
            .join(NAME),
    ];
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join("assets/samples").join(NAME));
        candidates.push(dir.join("../share/histolens/samples").join(NAME));
    }
    candidates.push(PathBuf::from("/usr/share/histolens/samples").join(NAME));
    candidates.into_iter().find(|p| p.is_file())
}
