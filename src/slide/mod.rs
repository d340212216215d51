//! Pixels in: whole-slide images through OpenSlide and loose snapshots through `image`, behind one
//! thread-safe API that reads an RGBA region at a pyramid level.

mod calibration;
mod error;
mod libtiff_log;
pub mod pixels;
pub mod pyramid_tiff;
pub mod resolution;
mod snapshot;
mod wsi;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::RgbaImage;
use serde::Serialize;

pub use calibration::{CalibrationStore, CalibrationStoreError, Camera, CameraStore};
pub use error::SlideError;
pub use resolution::{Calibration, Mpp, MppSource};
pub use snapshot::RESOLUTION_NOTE;

use snapshot::SnapshotBackend;
use wsi::WsiBackend;

/// Largest region one `read_region` call may ask for (256 Mi pixels = 1 GiB of RGBA).
pub const MAX_REGION_PIXELS: u64 = 256 << 20;

/// Extensions decoded as loose snapshots without asking OpenSlide.
const SNAPSHOT_EXTENSIONS: &[&str] = &[
    "png", "jpg", "jpeg", "bmp", "webp", "gif", "tga", "pnm", "ppm", "pgm",
];

/// One level of a pyramid; `downsample` is relative to level 0 (OpenSlide's definition).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Level {
    pub width: u64,
    pub height: u64,
    pub downsample: f64,
}

/// A label, macro or thumbnail image stored beside the pyramid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AssociatedImage {
    pub name: String,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum SourceKind {
    /// A pyramid read by OpenSlide; `vendor` is OpenSlide's name for the format (aperio, generic-tiff…).
    WholeSlide { vendor: String },
    /// A loose image decoded in memory; `format` is the image format.
    Snapshot { format: String },
}

fn lossy_path<S: serde::Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&path.to_string_lossy())
}

/// Everything known about a slide or snapshot once it is open.
#[derive(Debug, Clone, Serialize)]
pub struct SlideInfo {
    /// Serialised lossily: a file name that is not UTF-8 still gives JSON (with U+FFFD).
    #[serde(serialize_with = "lossy_path")]
    pub path: PathBuf,
    pub source: SourceKind,
    pub levels: Vec<Level>,
    /// Pixel size from the file's own metadata (never from the user or a model).
    pub mpp: Option<Mpp>,
    /// Nominal objective power the scanner claims.
    pub objective_power: Option<f64>,
    pub properties: BTreeMap<String, String>,
    pub associated: Vec<AssociatedImage>,
    /// Colour of the area outside the scanned region.
    pub background: [u8; 3],
}

impl SlideInfo {
    pub fn dimensions(&self) -> (u64, u64) {
        (self.levels[0].width, self.levels[0].height)
    }

    pub fn is_whole_slide(&self) -> bool {
        matches!(self.source, SourceKind::WholeSlide { .. })
    }

    /// The pixel size to use: a calibration set by hand, else the metadata's µm/px, else 10 / objective power.
    pub fn effective_mpp(&self, calibration: &Calibration) -> Option<Mpp> {
        calibration.as_mpp().or(self.mpp).or_else(|| {
            let p = self.objective_power?;
            let m = resolution::mpp_from_magnification(p);
            Mpp::new(m, m, MppSource::ObjectivePower)
        })
    }

    /// Short description of the format for status lines.
    pub fn format_label(&self) -> String {
        match &self.source {
            SourceKind::WholeSlide { vendor } => format!("whole slide ({vendor})"),
            SourceKind::Snapshot { format } => format!("snapshot ({format})"),
        }
    }
}

enum Backend {
    Wsi(WsiBackend),
    Snapshot(SnapshotBackend),
}

/// An open slide or snapshot. `Send + Sync`: loader threads share one instance.
pub struct Slide {
    info: SlideInfo,
    backend: Backend,
}

impl std::fmt::Debug for Slide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slide")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn extension(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default()
}

impl Slide {
    /// Opens a whole-slide image or a snapshot, choosing the reader from the extension and the content.
    pub fn open(path: impl AsRef<Path>) -> Result<Slide, SlideError> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SlideError::NotFound(path.to_path_buf()),
            _ => SlideError::Io {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
        if meta.is_dir() {
            return Err(SlideError::Unsupported {
                path: path.to_path_buf(),
                reason: "it is a folder".into(),
            });
        }
        if meta.len() == 0 {
            return Err(SlideError::Empty(path.to_path_buf()));
        }
        let ext = extension(path);
        if SNAPSHOT_EXTENSIONS.contains(&ext.as_str()) {
            return Self::open_snapshot(path);
        }
        if wsi::detect_vendor(path).is_some() {
            match Self::open_wsi(path) {
                Ok(s) => return Ok(s),
                // A plain (untiled) TIFF is a snapshot; anything else OpenSlide recognised but cannot read is corrupt.
                Err(e) if matches!(ext.as_str(), "tif" | "tiff") && image_magic(path).is_some() => {
                    return Self::open_snapshot(path).map_err(|_| e);
                }
                Err(e) => return Err(e),
            }
        }
        if image_magic(path).is_some() {
            return Self::open_snapshot(path);
        }
        Err(SlideError::Unsupported {
            path: path.to_path_buf(),
            reason: "neither OpenSlide nor the image decoders recognise its contents".into(),
        })
    }

    fn open_wsi(path: &Path) -> Result<Slide, SlideError> {
        let (backend, meta) = WsiBackend::open(path)?;
        let background = meta
            .properties
            .get("openslide.background-color")
            .and_then(|hex| parse_hex_rgb(hex))
            .unwrap_or([255, 255, 255]);
        let info = SlideInfo {
            path: path.to_path_buf(),
            source: SourceKind::WholeSlide {
                vendor: meta.vendor,
            },
            mpp: resolution::mpp_from_properties(&meta.properties),
            objective_power: resolution::objective_power_from_properties(&meta.properties),
            levels: meta.levels,
            properties: meta.properties,
            associated: meta.associated,
            background,
        };
        let slide = Slide {
            info,
            backend: Backend::Wsi(backend),
        };
        // A truncated or damaged file often opens (headers are intact) and fails on its pixels:
        // read a corner of the coarsest level now so that the failure is reported at open.
        let top = slide.info.levels.len() - 1;
        let l = slide.info.levels[top];
        slide
            .read_region(top, 0, 0, l.width.min(64) as u32, l.height.min(64) as u32)
            .map_err(|e| SlideError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("pixels cannot be decoded: {e}"),
            })?;
        Ok(slide)
    }

    fn open_snapshot(path: &Path) -> Result<Slide, SlideError> {
        let (backend, meta) = SnapshotBackend::open(path)?;
        Ok(Slide {
            info: SlideInfo {
                path: path.to_path_buf(),
                source: SourceKind::Snapshot {
                    format: meta.format,
                },
                levels: meta.levels,
                mpp: meta.mpp,
                objective_power: None,
                properties: meta.properties,
                associated: Vec::new(),
                background: [255, 255, 255],
            },
            backend: Backend::Snapshot(backend),
        })
    }

    pub fn info(&self) -> &SlideInfo {
        &self.info
    }

    pub fn path(&self) -> &Path {
        &self.info.path
    }

    /// Reads `w`x`h` straight-alpha RGBA pixels of `level`, whose top-left corner is (`x0`, `y0`) in
    /// level-0 coordinates (OpenSlide's convention). Pixels outside the slide are transparent.
    pub fn read_region(
        &self,
        level: usize,
        x0: i64,
        y0: i64,
        w: u32,
        h: u32,
    ) -> Result<RgbaImage, SlideError> {
        let count = self.info.levels.len();
        let lv = *self
            .info
            .levels
            .get(level)
            .ok_or(SlideError::NoSuchLevel { level, count })?;
        if u64::from(w) * u64::from(h) > MAX_REGION_PIXELS {
            return Err(SlideError::RegionTooLarge {
                width: w,
                height: h,
                limit: MAX_REGION_PIXELS,
            });
        }
        if w == 0 || h == 0 {
            return Ok(RgbaImage::new(w, h));
        }
        match &self.backend {
            Backend::Wsi(b) => b.read_region(level, x0, y0, w, h),
            Backend::Snapshot(b) => Ok(b.read_region(level, x0, y0, w, h, lv.downsample)),
        }
    }

    /// An associated image (label, macro, thumbnail) of a whole slide.
    pub fn associated_image(&self, name: &str) -> Result<RgbaImage, SlideError> {
        match &self.backend {
            Backend::Wsi(b) => b.associated_image(name),
            Backend::Snapshot(_) => Err(SlideError::NoSuchAssociatedImage(name.to_string())),
        }
    }

    /// The whole slide, antialiased to fit in `max_side` pixels. Reads the coarsest level in chunks,
    /// so memory stays bounded even for a single-level gigapixel file; when that level is larger
    /// than [`THUMBNAIL_FULL_READ_PIXELS`] (a huge slide without a pyramid), it is sampled sparsely
    /// instead, so that the time is bounded too.
    pub fn thumbnail(&self, max_side: u32) -> Result<RgbaImage, SlideError> {
        const CHUNK: u64 = 2048;
        let top = self.info.levels.len() - 1;
        let lv = self.info.levels[top];
        let scale = (f64::from(max_side) / lv.width.max(lv.height) as f64).min(1.0);
        let tw = ((lv.width as f64 * scale).round() as u32).max(1);
        let th = ((lv.height as f64 * scale).round() as u32).max(1);
        if lv.width.saturating_mul(lv.height) > THUMBNAIL_FULL_READ_PIXELS {
            return self.sparse_thumbnail(top, tw, th);
        }
        let mut thumb = RgbaImage::new(tw, th);
        for cy in (0..lv.height).step_by(CHUNK as usize) {
            for cx in (0..lv.width).step_by(CHUNK as usize) {
                let cw = CHUNK.min(lv.width - cx) as u32;
                let ch = CHUNK.min(lv.height - cy) as u32;
                let x0 = (cx as f64 * lv.downsample).round() as i64;
                let y0 = (cy as f64 * lv.downsample).round() as i64;
                let chunk = self.read_region(top, x0, y0, cw, ch)?;
                // Destination rectangle of this chunk in the thumbnail (edges rounded consistently).
                let dx0 = (cx as f64 * scale).round() as u32;
                let dy0 = (cy as f64 * scale).round() as u32;
                let dx1 = (((cx + u64::from(cw)) as f64 * scale).round() as u32).min(tw);
                let dy1 = (((cy + u64::from(ch)) as f64 * scale).round() as u32).min(th);
                if dx1 <= dx0 || dy1 <= dy0 {
                    continue;
                }
                let small = if scale >= 1.0 {
                    chunk
                } else {
                    resize_area(&chunk, dx1 - dx0, dy1 - dy0)
                };
                image::imageops::replace(&mut thumb, &small, i64::from(dx0), i64::from(dy0));
            }
        }
        Ok(thumb)
    }
}

/// Largest coarsest level a thumbnail reads whole (16384² pixels, a few seconds of decoding).
pub const THUMBNAIL_FULL_READ_PIXELS: u64 = 1 << 28;

/// Samples per side of a sparse thumbnail: one small read each, at most 128² reads.
const SPARSE_SAMPLES: u32 = 128;

impl Slide {
    /// A `tw`x`th` thumbnail of `level` from a grid of at most 128x128 small reads (each the mean of
    /// 8x8 pixels at a cell's centre), scaled up without smoothing: a coarse but bounded picture.
    fn sparse_thumbnail(&self, level: usize, tw: u32, th: u32) -> Result<RgbaImage, SlideError> {
        const PATCH: u32 = 8;
        let lv = self.info.levels[level];
        let gw = tw.clamp(1, SPARSE_SAMPLES);
        let gh = th.clamp(1, SPARSE_SAMPLES);
        log::info!(
            "{}: {}x{} pixels without a coarser level: thumbnail sampled at {gw}x{gh} points",
            self.info.path.display(),
            lv.width,
            lv.height
        );
        let mut grid = RgbaImage::new(gw, gh);
        for gy in 0..gh {
            for gx in 0..gw {
                let cx = ((f64::from(gx) + 0.5) / f64::from(gw) * lv.width as f64) as i64;
                let cy = ((f64::from(gy) + 0.5) / f64::from(gh) * lv.height as f64) as i64;
                let x0 = ((cx - i64::from(PATCH / 2)) as f64 * lv.downsample).round() as i64;
                let y0 = ((cy - i64::from(PATCH / 2)) as f64 * lv.downsample).round() as i64;
                let patch = self.read_region(level, x0, y0, PATCH, PATCH)?;
                let mut sum = [0u64; 4];
                for p in patch.pixels() {
                    for (s, v) in sum.iter_mut().zip(p.0) {
                        *s += u64::from(v);
                    }
                }
                let n = u64::from(PATCH * PATCH);
                grid.put_pixel(gx, gy, image::Rgba(sum.map(|s| (s / n) as u8)));
            }
        }
        Ok(if (gw, gh) == (tw, th) {
            grid
        } else {
            image::imageops::resize(&grid, tw, th, image::imageops::FilterType::Nearest)
        })
    }
}

/// Antialiased resize to an exact size: box-halving while at least 2x too large, then a triangle filter.
pub fn resize_area(src: &RgbaImage, w: u32, h: u32) -> RgbaImage {
    let mut cur = std::borrow::Cow::Borrowed(src);
    while cur.width() / 2 >= w && cur.height() / 2 >= h {
        cur = std::borrow::Cow::Owned(pixels::halve(&cur));
    }
    if cur.dimensions() == (w, h) {
        return cur.into_owned();
    }
    image::imageops::resize(cur.as_ref(), w, h, image::imageops::FilterType::Triangle)
}

/// [`resize_area`] of an opaque RGB image.
pub fn resize_area_rgb(src: &image::RgbImage, w: u32, h: u32) -> image::RgbImage {
    let rgba = image::DynamicImage::ImageRgb8(src.clone()).into_rgba8();
    image::DynamicImage::ImageRgba8(resize_area(&rgba, w, h)).into_rgb8()
}

fn parse_hex_rgb(hex: &str) -> Option<[u8; 3]> {
    let hex = hex.trim().trim_start_matches('#');
    if hex.len() != 6 {
        return None;
    }
    let c = |i: usize| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok();
    Some([c(0)?, c(2)?, c(4)?])
}

/// The image format announced by the file's first bytes, if any: `image`'s guess, and BigTIFF
/// (which it does not know).
pub(crate) fn image_magic(path: &Path) -> Option<image::ImageFormat> {
    use std::io::Read;
    let mut head = [0u8; 64];
    let mut f = std::fs::File::open(path).ok()?;
    let n = f.read(&mut head).ok()?;
    let head = &head[..n];
    if head.starts_with(b"II+\0") || head.starts_with(b"MM\0+") {
        return Some(image::ImageFormat::Tiff);
    }
    image::guess_format(head).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_colours() {
        assert_eq!(parse_hex_rgb("FFFFFF"), Some([255, 255, 255]));
        assert_eq!(parse_hex_rgb("#102030"), Some([16, 32, 48]));
        assert_eq!(parse_hex_rgb("12345"), None);
    }

    #[test]
    fn snapshot_pyramid_and_regions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.png");
        let mut img = RgbaImage::new(3000, 1500);
        for (x, y, px) in img.enumerate_pixels_mut() {
            px.0 = [(x % 256) as u8, (y % 256) as u8, 0, 255];
        }
        img.save(&p).unwrap();
        let s = Slide::open(&p).unwrap();
        let info = s.info();
        assert!(matches!(info.source, SourceKind::Snapshot { .. }));
        assert_eq!(info.levels.len(), 3, "3000 -> 1500 -> 750");
        assert_eq!(info.levels[2].width, 750);
        assert!((info.levels[1].downsample - 2.0).abs() < 1e-9);
        let r = s.read_region(0, 10, 20, 4, 4).unwrap();
        assert_eq!(r.get_pixel(0, 0).0, [10, 20, 0, 255]);
        // Off the edge: transparent.
        let r = s.read_region(0, 2998, 0, 4, 1).unwrap();
        assert_eq!(r.get_pixel(1, 0).0[3], 255);
        assert_eq!(r.get_pixel(2, 0).0[3], 0);
        let r = s.read_region(0, -2, 0, 4, 1).unwrap();
        assert_eq!(r.get_pixel(0, 0).0[3], 0);
        assert_eq!(r.get_pixel(2, 0).0, [0, 0, 0, 255]);
        let t = s.thumbnail(300).unwrap();
        assert_eq!(t.dimensions(), (300, 150));
        assert!(s.read_region(5, 0, 0, 1, 1).is_err());
    }
}
