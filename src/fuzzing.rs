//! Entry points shared by the `cargo fuzz` targets (fuzz/) and their regression test
//! (tests/fuzz_regressions.rs). Each takes arbitrary bytes, feeds them to a reader of untrusted input
//! the way the application does, and must return, with an error or a value, without panicking,
//! hanging or allocating without bound. Files are written to a temporary folder first because the
//! readers (OpenSlide above all) take paths.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;

use crate::dmsl::DmslModel;
use crate::labels::LabelSet;
use crate::magnification::MagnificationModel;
use crate::nn::checkpoint::read_meta;
use crate::runs::{list_runs, read_run};
use crate::slide::Slide;

/// Largest image side for which a thumbnail is made: a mutated header can claim a gigapixel level,
/// whose (bounded-memory, chunked) thumbnail would take minutes of blank reads.
const MAX_THUMBNAIL_SOURCE_SIDE: u64 = 8192;

/// A folder for this process's inputs (the fuzzer runs one input at a time per process).
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("histolens-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        dir
    })
}

fn write_input(name: &str, bytes: &[u8]) -> Option<PathBuf> {
    let path = scratch().join(name);
    std::fs::write(&path, bytes).ok()?;
    Some(path)
}

/// The first byte picks the extension (what the application dispatches on); the rest is the file.
fn split_selector<'a>(data: &'a [u8], choices: &[&'a str]) -> Option<(&'a str, &'a [u8])> {
    let (&first, rest) = data.split_first()?;
    Some((choices[usize::from(first) % choices.len()], rest))
}

/// Opens a file the way the viewer does, then reads what the viewer would read first.
fn open_and_read(path: &Path) {
    let Ok(slide) = Slide::open(path) else {
        return;
    };
    let info = slide.info();
    for (level, l) in info.levels.iter().enumerate() {
        let (w, h) = (l.width.min(256) as u32, l.height.min(256) as u32);
        let _ = slide.read_region(level, 0, 0, w, h);
        // A region straddling the far corner (partly outside the image).
        let x = (l.width as f64 * l.downsample) as i64 - 16;
        let y = (l.height as f64 * l.downsample) as i64 - 16;
        let _ = slide.read_region(level, x, y, 32, 32);
    }
    if let Some(top) = info.levels.last()
        && top.width.max(top.height) <= MAX_THUMBNAIL_SOURCE_SIDE
    {
        let _ = slide.thumbnail(128);
    }
    for a in &info.associated {
        if u64::from(a.width) * u64::from(a.height) <= 1 << 24 {
            let _ = slide.associated_image(&a.name);
        }
    }
    let _ = info.format_label();
}

/// Snapshot decoding: PNG, JPEG, TIFF, BMP and WebP through the `image` decoders.
pub fn snapshot(data: &[u8]) {
    let Some((ext, bytes)) = split_selector(data, &["png", "jpg", "tif", "bmp", "webp"]) else {
        return;
    };
    if let Some(path) = write_input(&format!("snapshot.{ext}"), bytes) {
        open_and_read(&path);
    }
}

/// Slide opening: OpenSlide (Aperio SVS, generic tiled TIFF, Hamamatsu NDPI) on mutated files.
pub fn slide(data: &[u8]) {
    let Some((ext, bytes)) = split_selector(data, &["svs", "tiff", "ndpi"]) else {
        return;
    };
    if let Some(path) = write_input(&format!("slide.{ext}"), bytes) {
        open_and_read(&path);
    }
}

/// The label manifest (CSV) with its class sidecar, then the operations that read every row.
pub fn label_manifest(data: &[u8]) {
    // Bytes after the first NUL, if any, are the class sidecar.
    let (csv, classes) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let dir = scratch().join("labels");
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let manifest = dir.join("labels.csv");
    if std::fs::write(&manifest, csv).is_err() {
        return;
    }
    if let Some(c) = classes
        && std::fs::write(dir.join("labels.classes.json"), c).is_err()
    {
        return;
    }
    let Ok(mut set) = LabelSet::open_or_create(&manifest) else {
        return;
    };
    let _ = set.counts();
    let _ = set.missing();
    let all: Vec<usize> = (0..set.entries().len()).collect();
    let _ = set.assign_splits([0.7, 0.15, 0.15], 1);
    let _ = set.undo();
    let _ = set.set_group(&all, "g");
    let _ = set.to_magnification_manifest(&dir.join("magnification.csv"));
    // The same bytes imported into a fresh set.
    if let Ok(mut other) = LabelSet::open_or_create(&dir.join("other.csv")) {
        let _ = other.import(&manifest);
    }
}

/// A checkpoint file as the viewer loads a model: the histolens header, then each model's loader.
pub fn checkpoint(data: &[u8]) {
    let _ = read_meta(data);
    let _ = MagnificationModel::from_bytes(data, &Device::Cpu);
    let _ = DmslModel::from_bytes(data, &Device::Cpu);
}

/// A run folder as the training panel and `histolens runs` read it: `config.json`, `run.json` and
/// `log.jsonl` (the input's parts, separated by NUL bytes).
pub fn run_config(data: &[u8]) {
    let mut parts = data.splitn(3, |&b| b == 0);
    let config = parts.next().unwrap_or_default();
    let info = parts.next();
    let log = parts.next();
    let root = scratch().join("runs");
    let dir = root.join("run");
    let _ = std::fs::remove_dir_all(&root);
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let files: [(&str, Option<&[u8]>); 3] = [
        ("config.json", Some(config)),
        ("run.json", info),
        ("log.jsonl", log),
    ];
    for (name, bytes) in files {
        if let Some(b) = bytes
            && std::fs::write(dir.join(name), b).is_err()
        {
            return;
        }
    }
    if let Ok(run) = read_run(&dir) {
        let _ = run.report.as_ref().map(|r| r.table());
        let _ = run.best_val_loss();
        let _ = run.epochs_done();
        let _ = run.config.total_epochs();
    }
    let _ = list_runs(&root);
}
