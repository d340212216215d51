//! Whole-slide images through OpenSlide (Aperio, Hamamatsu, Leica, MIRAX, Philips, Ventana, generic tiled TIFF…).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbaImage;
use openslide_rs::errors::OpenSlideError;
use openslide_rs::{Address, OpenSlide, Region, Size};
use parking_lot::RwLock;

use super::pixels::premultiplied_bgra_to_rgba;
use super::{AssociatedImage, Level, SlideError};

/// An open OpenSlide handle. OpenSlide's errors are sticky (every later call on that handle fails),
/// so after a failed read the handle is replaced by a fresh one and the error is returned once.
pub(crate) struct WsiBackend {
    path: PathBuf,
    handle: RwLock<Arc<OpenSlide>>,
}

/// What the slide says about itself, read once at open.
pub(crate) struct WsiMetadata {
    pub vendor: String,
    pub levels: Vec<Level>,
    pub properties: BTreeMap<String, String>,
    pub associated: Vec<AssociatedImage>,
}

/// True when OpenSlide recognises the file (a cheap check that reads only headers).
pub(crate) fn detect_vendor(path: &Path) -> Option<String> {
    OpenSlide::detect_vendor(path).ok()
}

fn map_open_error(path: &Path, e: OpenSlideError) -> SlideError {
    match e {
        OpenSlideError::MissingFile(_) => SlideError::NotFound(path.to_path_buf()),
        OpenSlideError::UnsupportedFile(_) => SlideError::Unsupported {
            path: path.to_path_buf(),
            reason: "OpenSlide does not recognise it".into(),
        },
        other => SlideError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("OpenSlide: {other}"),
        },
    }
}

impl WsiBackend {
    pub fn open(path: &Path) -> Result<(Self, WsiMetadata), SlideError> {
        super::libtiff_log::route_to_log();
        let slide = OpenSlide::new(path).map_err(|e| map_open_error(path, e))?;
        let vendor = detect_vendor(path).unwrap_or_else(|| "unknown".into());
        let names = slide
            .property_names()
            .map_err(|e| map_open_error(path, e))?;
        let properties: BTreeMap<String, String> = names
            .into_iter()
            .filter_map(|n| slide.property_value(&n).ok().map(|v| (n, v)))
            .collect();
        let levels: Vec<Level> = slide
            .all_level_dimensions()
            .iter()
            .zip(slide.all_level_downsamples())
            .map(|(s, &d)| Level {
                width: u64::from(s.w),
                height: u64::from(s.h),
                downsample: d,
            })
            .collect();
        if levels.is_empty() || levels[0].width == 0 || levels[0].height == 0 {
            return Err(SlideError::Corrupt {
                path: path.to_path_buf(),
                reason: "the slide has no pixels".into(),
            });
        }
        let associated = slide
            .associated_image_names()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|name| {
                let s = slide.associated_image_dimensions(&name).ok()?;
                Some(AssociatedImage {
                    name,
                    width: s.w,
                    height: s.h,
                })
            })
            .collect();
        let backend = WsiBackend {
            path: path.to_path_buf(),
            handle: RwLock::new(Arc::new(slide)),
        };
        Ok((
            backend,
            WsiMetadata {
                vendor,
                levels,
                properties,
                associated,
            },
        ))
    }

    fn handle(&self) -> Arc<OpenSlide> {
        self.handle.read().clone()
    }

    /// Replaces a handle that returned an error (OpenSlide errors are sticky).
    fn recover(&self, failed: &Arc<OpenSlide>) {
        let mut h = self.handle.write();
        if Arc::ptr_eq(&h, failed)
            && let Ok(fresh) = OpenSlide::new(&self.path)
        {
            *h = Arc::new(fresh);
        }
    }

    fn read_error(&self, what: String, e: OpenSlideError) -> SlideError {
        SlideError::Read {
            path: self.path.clone(),
            what,
            reason: e.to_string(),
        }
    }

    /// Reads `w`x`h` pixels of `level` whose top-left corner is (`x0`, `y0`) in level-0 coordinates.
    pub fn read_region(
        &self,
        level: usize,
        x0: i64,
        y0: i64,
        w: u32,
        h: u32,
    ) -> Result<RgbaImage, SlideError> {
        let slide = self.handle();
        let to_u32 = |v: i64| u32::try_from(v.max(0)).unwrap_or(u32::MAX);
        let region = Region {
            size: Size { w, h },
            level: level as u32,
            address: Address {
                x: to_u32(x0),
                y: to_u32(y0),
            },
        };
        let mut buf = match slide.read_region(&region) {
            Ok(b) => b,
            Err(e) => {
                self.recover(&slide);
                return Err(self.read_error(
                    format!("region {w}x{h} at ({x0}, {y0}) of level {level}"),
                    e,
                ));
            }
        };
        premultiplied_bgra_to_rgba(&mut buf);
        let mut img = RgbaImage::from_raw(w, h, buf).ok_or_else(|| SlideError::Read {
            path: self.path.clone(),
            what: "region".into(),
            reason: "OpenSlide returned a buffer of the wrong size".into(),
        })?;
        // Negative origins (a region hanging off the top/left edge) are read from 0 and shifted.
        if x0 < 0 || y0 < 0 {
            img = shift_region(&img, x0, y0, level_downsample(&slide, level));
        }
        Ok(img)
    }

    pub fn associated_image(&self, name: &str) -> Result<RgbaImage, SlideError> {
        let slide = self.handle();
        let (size, mut buf) = match slide.read_associated_buffer(name) {
            Ok(v) => v,
            Err(OpenSlideError::UnknownAssociatedImage(n)) => {
                return Err(SlideError::NoSuchAssociatedImage(n));
            }
            Err(e) => {
                self.recover(&slide);
                return Err(self.read_error(format!("associated image {name:?}"), e));
            }
        };
        premultiplied_bgra_to_rgba(&mut buf);
        RgbaImage::from_raw(size.w, size.h, buf).ok_or_else(|| SlideError::Read {
            path: self.path.clone(),
            what: format!("associated image {name:?}"),
            reason: "wrong buffer size".into(),
        })
    }
}

fn level_downsample(slide: &OpenSlide, level: usize) -> f64 {
    slide
        .all_level_downsamples()
        .get(level)
        .copied()
        .unwrap_or(1.0)
}

/// Moves a region read from a clamped origin to where a negative origin would have put it,
/// leaving the part outside the slide transparent.
fn shift_region(img: &RgbaImage, x0: i64, y0: i64, downsample: f64) -> RgbaImage {
    let dx = ((-x0).max(0) as f64 / downsample).round() as i64;
    let dy = ((-y0).max(0) as f64 / downsample).round() as i64;
    let mut out = RgbaImage::new(img.width(), img.height());
    image::imageops::overlay(&mut out, img, dx, dy);
    out
}
