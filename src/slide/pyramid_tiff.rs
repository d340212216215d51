//! Writes an RGB image as a tiled, pyramidal TIFF that OpenSlide opens as a generic TIFF: deflate
//! tiles, each level half the size of the one before down to one tile, and the pixel size as
//! `XResolution`/`YResolution` per centimetre. How histolens makes test slides and mosaics of
//! labelled images (e.g. to check a heatmap against known classes).

use std::io::Write as _;
use std::path::Path;

use image::RgbImage;

use super::resize_area_rgb;
use crate::util::fs::write_atomic;

#[derive(Debug, thiserror::Error)]
pub enum TiffWriteError {
    #[error("cannot write {}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("a {width}x{height} image does not fit a classic TIFF (4 GiB)")]
    TooLarge { width: u32, height: u32 },
    #[error("invalid pixel size {0} µm/px")]
    Mpp(f64),
}

/// Classic TIFF field types.
const SHORT: u16 = 3;
const LONG: u16 = 4;
const RATIONAL: u16 = 5;

/// Writes `image` (level 0 at `mpp` µm/px) as a pyramidal TIFF of `tile` x `tile` tiles, atomically.
pub fn write_pyramidal_tiff(
    path: &Path,
    image: &RgbImage,
    mpp: f64,
    tile: u32,
) -> Result<(), TiffWriteError> {
    if !(mpp.is_finite() && mpp > 0.0) {
        return Err(TiffWriteError::Mpp(mpp));
    }
    let tile = tile.max(16) / 16 * 16;
    let mut out: Vec<u8> = b"II*\0\0\0\0\0".to_vec();
    // Where the previous directory's "next" pointer is (first: the header's).
    let mut next_pointer = 4usize;
    // Level k is written, then halved into level k + 1 (only two levels in memory at once).
    let mut level = std::borrow::Cow::Borrowed(image);
    for k in 0.. {
        let (offsets, counts) = write_tiles(&mut out, &level, tile);
        let downsample = f64::from(image.width()) / f64::from(level.width());
        // Pixels per centimetre, as a rational with 1000 as denominator.
        let per_cm = (10_000.0 / (mpp * downsample) * 1000.0).round() as u32;
        let bits = put(&mut out, &[8u16, 8, 8].map(u16::to_le_bytes).concat());
        let resolution = put(&mut out, &[per_cm, 1000].map(u32::to_le_bytes).concat());
        let as_bytes = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let offsets_at = put(&mut out, &as_bytes(&offsets));
        let counts_at = put(&mut out, &as_bytes(&counts));
        let n = offsets.len() as u32;
        let inline_or = |values: &[u32], at: u32| if n == 1 { values[0] } else { at };
        let entries: [(u16, u16, u32, u32); 15] = [
            (254, LONG, 1, u32::from(k > 0)),
            (256, LONG, 1, level.width()),
            (257, LONG, 1, level.height()),
            (258, SHORT, 3, bits),
            (259, SHORT, 1, 8),
            (262, SHORT, 1, 2),
            (277, SHORT, 1, 3),
            (282, RATIONAL, 1, resolution),
            (283, RATIONAL, 1, resolution),
            (284, SHORT, 1, 1),
            (296, SHORT, 1, 3),
            (322, LONG, 1, tile),
            (323, LONG, 1, tile),
            (324, LONG, n, inline_or(&offsets, offsets_at)),
            (325, LONG, n, inline_or(&counts, counts_at)),
        ];
        if out.len() % 2 == 1 {
            out.push(0);
        }
        let ifd = out.len();
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        for (tag, kind, count, value) in entries {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&kind.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
            // A SHORT that fits is left-justified in the value field.
            if kind == SHORT && count == 1 {
                out.extend_from_slice(&(value as u16).to_le_bytes());
                out.extend_from_slice(&[0, 0]);
            } else {
                out.extend_from_slice(&value.to_le_bytes());
            }
        }
        out.extend_from_slice(&[0; 4]);
        if out.len() > u32::MAX as usize {
            return Err(TiffWriteError::TooLarge {
                width: image.width(),
                height: image.height(),
            });
        }
        out[next_pointer..next_pointer + 4].copy_from_slice(&(ifd as u32).to_le_bytes());
        next_pointer = out.len() - 4;
        if level.width() <= tile && level.height() <= tile {
            break;
        }
        let (w, h) = ((level.width() / 2).max(1), (level.height() / 2).max(1));
        level = std::borrow::Cow::Owned(resize_area_rgb(&level, w, h));
    }
    write_atomic(path, &out).map_err(|source| TiffWriteError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Appends every tile of `img` (row by row, edge tiles padded with white), deflated; returns
/// their offsets and byte counts.
fn write_tiles(out: &mut Vec<u8>, img: &RgbImage, tile: u32) -> (Vec<u32>, Vec<u32>) {
    let (cols, rows) = (img.width().div_ceil(tile), img.height().div_ceil(tile));
    let (mut offsets, mut counts) = (Vec::new(), Vec::new());
    let mut raw = Vec::with_capacity((tile * tile * 3) as usize);
    for r in 0..rows {
        for c in 0..cols {
            raw.clear();
            for y in r * tile..(r + 1) * tile {
                for x in c * tile..(c + 1) * tile {
                    let p = if x < img.width() && y < img.height() {
                        img.get_pixel(x, y).0
                    } else {
                        [255; 3]
                    };
                    raw.extend_from_slice(&p);
                }
            }
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            // Writing into a Vec cannot fail.
            let packed = z
                .write_all(&raw)
                .and_then(|()| z.finish())
                .unwrap_or_default();
            offsets.push(out.len() as u32);
            counts.push(packed.len() as u32);
            out.extend_from_slice(&packed);
        }
    }
    (offsets, counts)
}

/// Appends a value too long for a directory entry (word-aligned, before the directory) and
/// returns its offset.
fn put(out: &mut Vec<u8>, bytes: &[u8]) -> u32 {
    if out.len() % 2 == 1 {
        out.push(0);
    }
    let at = out.len() as u32;
    out.extend_from_slice(bytes);
    at
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slide::Slide;

    /// OpenSlide opens the file as a pyramid with the pixel size written, and its pixels are the
    /// image's.
    #[test]
    fn openslide_reads_the_pyramid_back() {
        let dir = tempfile::tempdir().unwrap();
        let img = RgbImage::from_fn(700, 450, |x, y| {
            image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x + y) % 7 * 30) as u8])
        });
        let path = dir.path().join("mosaic.tiff");
        write_pyramidal_tiff(&path, &img, 0.42, 256).unwrap();
        let slide = Slide::open(&path).unwrap();
        let info = slide.info();
        assert_eq!(info.dimensions(), (700, 450));
        assert_eq!(info.levels.len(), 3, "{:?}", info.levels);
        assert!((info.levels[1].downsample - 2.0).abs() < 0.01);
        let mpp = info.mpp.unwrap();
        assert!((mpp.x - 0.42).abs() < 1e-4, "{mpp:?}");
        let region = slide.read_region(0, 300, 200, 300, 250).unwrap();
        for (x, y, p) in region.enumerate_pixels() {
            let want = img.get_pixel(x + 300, y + 200).0;
            assert_eq!(&p.0[..3], &want, "at {x},{y}");
        }
        assert!(write_pyramidal_tiff(&path, &img, f64::NAN, 256).is_err());
    }
}
