//! A slide made of labelled images: a grid of fields of known class, each a labelled region, to
//! check that a heatmap gives every cell its class back. Squashed pixels are restored first, so the
//! mosaic has square pixels at the images' µm/px.

use std::path::{Path, PathBuf};

use image::RgbImage;
use image::imageops::FilterType;

use super::augment::to_rgb;
use super::pairs::Region;
use crate::slide::{Slide, SlideError};

/// The most pixels a mosaic may hold (about 1 GiB of RGB).
pub const MAX_MOSAIC_PIXELS: u64 = 360 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MosaicError {
    #[error(transparent)]
    Slide(#[from] SlideError),
    #[error("a mosaic needs at least one image and one column")]
    Empty,
    #[error("a pixel aspect must be a positive number, not {0}")]
    Aspect(f64),
    #[error("the mosaic would be {width}x{height} px, more than {MAX_MOSAIC_PIXELS} pixels")]
    TooLarge { width: u64, height: u64 },
}

/// One image of a mosaic and its class.
#[derive(Debug, Clone)]
pub struct MosaicCell {
    pub path: PathBuf,
    pub class: String,
}

impl MosaicCell {
    /// An image labelled with the name of its folder (a class folder).
    pub fn from_class_folder(path: &Path) -> Self {
        let class = path
            .parent()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        MosaicCell {
            path: path.to_path_buf(),
            class,
        }
    }
}

/// The mosaic of `cells`, `cols` to a row, each image (widened by 1 / `pixel_aspect` where its
/// pixels are squashed) centred in a cell the size of the largest on white, and each image's
/// rectangle as a region of its class.
pub fn build_mosaic(
    cells: &[MosaicCell],
    cols: usize,
    pixel_aspect: f64,
) -> Result<(RgbImage, Vec<Region>), MosaicError> {
    if cells.is_empty() || cols == 0 {
        return Err(MosaicError::Empty);
    }
    if !(pixel_aspect.is_finite() && pixel_aspect > 0.0) {
        return Err(MosaicError::Aspect(pixel_aspect));
    }
    let mut images = Vec::with_capacity(cells.len());
    for c in cells {
        let slide = Slide::open(&c.path)?;
        let (w, h) = slide.info().dimensions();
        if w * h > MAX_MOSAIC_PIXELS {
            return Err(MosaicError::TooLarge {
                width: w,
                height: h,
            });
        }
        let img = to_rgb(&slide.read_region(0, 0, 0, w as u32, h as u32)?);
        let width = ((w as f64 / pixel_aspect).round() as u32).max(1);
        images.push(if width == img.width() {
            img
        } else {
            image::imageops::resize(&img, width, img.height(), FilterType::CatmullRom)
        });
    }
    let cw = images.iter().map(RgbImage::width).max().unwrap_or(1);
    let ch = images.iter().map(RgbImage::height).max().unwrap_or(1);
    let rows = cells.len().div_ceil(cols);
    let (width, height) = (u64::from(cw) * cols as u64, u64::from(ch) * rows as u64);
    if width * height > MAX_MOSAIC_PIXELS {
        return Err(MosaicError::TooLarge { width, height });
    }
    let mut mosaic = RgbImage::from_pixel(width as u32, height as u32, image::Rgb([255; 3]));
    let mut regions = Vec::with_capacity(cells.len());
    for (i, (img, cell)) in images.iter().zip(cells).enumerate() {
        let x = (i % cols) as u32 * cw + (cw - img.width()) / 2;
        let y = (i / cols) as u32 * ch + (ch - img.height()) / 2;
        image::imageops::replace(&mut mosaic, img, i64::from(x), i64::from(y));
        let (x0, y0) = (f64::from(x), f64::from(y));
        let (x1, y1) = (x0 + f64::from(img.width()), y0 + f64::from(img.height()));
        regions.push(Region {
            class: cell.class.clone(),
            polygon: vec![[x0, y0], [x1, y0], [x1, y1], [x0, y1]],
        });
    }
    Ok((mosaic, regions))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two squashed images come back at their true width, side by side, each in its region.
    #[test]
    fn cells_are_unsquashed_and_labelled() {
        let dir = tempfile::tempdir().unwrap();
        let mut cells = Vec::new();
        for (class, colour) in [("normal", [200u8, 120, 180]), ("invasive", [90, 40, 140])] {
            let path = dir.path().join(class).join("a.png");
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            RgbImage::from_pixel(60, 80, image::Rgb(colour))
                .save(&path)
                .unwrap();
            cells.push(MosaicCell::from_class_folder(&path));
        }
        let (mosaic, regions) = build_mosaic(&cells, 2, 0.75).unwrap();
        assert_eq!(mosaic.dimensions(), (160, 80));
        assert_eq!(regions[1].class, "invasive");
        assert_eq!(regions[1].polygon[0], [80.0, 0.0]);
        assert_eq!(regions[1].polygon[2], [160.0, 80.0]);
        assert_eq!(mosaic.get_pixel(40, 40).0, [200, 120, 180]);
        assert_eq!(mosaic.get_pixel(120, 40).0, [90, 40, 140]);
        assert!(regions[0].contains(79.0, 40.0) && !regions[0].contains(81.0, 40.0));
        assert!(matches!(
            build_mosaic(&cells, 0, 1.0),
            Err(MosaicError::Empty)
        ));
        assert!(build_mosaic(&cells, 2, -1.0).is_err());
    }
}
