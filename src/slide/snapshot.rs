//! Loose snapshots (PNG, JPEG, TIFF, BMP, WebP) decoded with `image`, held as an in-memory pyramid.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use image::{ImageDecoder as _, ImageError, ImageFormat, ImageReader, RgbaImage};

use super::pixels::halve;
use super::resolution::{Mpp, MppSource, mpp_from_resolution, ome_physical_size, resolution_mpp};
use super::{Level, SlideError};

/// Levels are added by halving until the coarsest fits in this many pixels per side.
const PYRAMID_TOP_SIDE: u32 = 1024;

/// The most memory one decoded snapshot may take: a third of the available RAM, at most 16 GiB, or
/// `HISTOLENS_MAX_DECODE_MB` when set (for small machines and the fuzzers).
fn decode_limit_bytes() -> u64 {
    if let Some(mb) = std::env::var("HISTOLENS_MAX_DECODE_MB")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return mb.saturating_mul(1 << 20);
    }
    let avail = crate::util::memory::available_ram_bytes().unwrap_or(8 << 30);
    (avail / 3).min(16 << 30)
}

/// A reader of `path` with its format sniffed from the contents (BigTIFF included).
fn with_format(path: &Path) -> Result<ImageReader<BufReader<File>>, SlideError> {
    let io = |source| SlideError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = ImageReader::open(path).map_err(io)?;
    match super::image_magic(path) {
        Some(f) => reader.set_format(f),
        None => reader = reader.with_guessed_format().map_err(io)?,
    }
    Ok(reader)
}

/// The most memory decoding and viewing a `width`x`height` image of `native_bytes` per pixel takes:
/// the native buffer and its RGBA8 copy side by side while converting (one buffer when it is
/// RGBA8 already), then the RGBA8 pyramid (4/3 of the base).
fn peak_decode_bytes(width: u32, height: u32, native_bytes: u64) -> u64 {
    let px = u64::from(width) * u64::from(height);
    let converting = if native_bytes == 4 {
        4
    } else {
        native_bytes + 4
    };
    px.saturating_mul(converting).max(px.saturating_mul(16) / 3)
}

pub(crate) struct SnapshotBackend {
    levels: Vec<RgbaImage>,
}

pub(crate) struct SnapshotMetadata {
    pub format: String,
    pub levels: Vec<Level>,
    pub mpp: Option<Mpp>,
    pub properties: std::collections::BTreeMap<String, String>,
}

fn map_image_error(path: &Path, e: ImageError) -> SlideError {
    let p = path.to_path_buf();
    match e {
        ImageError::Unsupported(u) => SlideError::Unsupported {
            path: p,
            reason: u.to_string(),
        },
        ImageError::Limits(l) => SlideError::TooLarge {
            path: p,
            reason: format!("{l}; limit {} MiB", decode_limit_bytes() >> 20),
        },
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            SlideError::Corrupt {
                path: p,
                reason: "the file ends early".into(),
            }
        }
        ImageError::IoError(io) => SlideError::Io {
            path: p,
            source: io,
        },
        other => SlideError::Corrupt {
            path: p,
            reason: other.to_string(),
        },
    }
}

impl SnapshotBackend {
    pub fn open(path: &Path) -> Result<(Self, SnapshotMetadata), SlideError> {
        let io = |source| SlideError::Io {
            path: path.to_path_buf(),
            source,
        };
        let reader = with_format(path)?;
        let format = reader.format().ok_or_else(|| SlideError::Unsupported {
            path: path.to_path_buf(),
            reason: "unknown image format".into(),
        })?;
        // Read the header first: a decompression bomb is refused before anything is allocated.
        let (width, height, native_bytes) = match reader.into_decoder() {
            Ok(d) => {
                let (w, h) = d.dimensions();
                (w, h, u64::from(d.color_type().bytes_per_pixel()))
            }
            Err(e) if format == ImageFormat::Tiff => {
                let (w, h) = tiff_dimensions(path).ok_or_else(|| map_image_error(path, e))?;
                (w, h, 8)
            }
            Err(e) => return Err(map_image_error(path, e)),
        };
        if width == 0 || height == 0 {
            return Err(SlideError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("image has no pixels ({width}x{height})"),
            });
        }
        let needed = peak_decode_bytes(width, height, native_bytes);
        let limit = decode_limit_bytes();
        if needed > limit {
            return Err(SlideError::TooLarge {
                path: path.to_path_buf(),
                reason: format!(
                    "{width}x{height} pixels need {} MiB to decode and view, more than the {} MiB \
                     budget (a third of the available memory); raise it with \
                     HISTOLENS_MAX_DECODE_MB, or convert the image to a tiled pyramid (e.g. `vips \
                     tiffsave IN OUT.tif --tile --pyramid`), which opens in any size",
                    needed >> 20,
                    limit >> 20
                ),
            });
        }
        if format == ImageFormat::Jpeg {
            let bytes = std::fs::read(path).map_err(io)?;
            if !jpeg_is_complete(&bytes) {
                return Err(SlideError::Corrupt {
                    path: path.to_path_buf(),
                    reason: "the JPEG ends early (no end-of-image marker after its last scan)"
                        .into(),
                });
            }
        }
        let mut reader = with_format(path)?;
        let mut limits = image::Limits::default();
        // The decoder's own buffers: the native image plus its scratch, never more than the budget.
        limits.max_alloc = Some(limit);
        reader.limits(limits);
        let decoded = match reader.decode() {
            Ok(d) => d,
            // `image` refuses some valid TIFFs (YCbCr, e.g. JPEG-compressed OME-TIFF exports) that
            // the `tiff` crate reads: decode those directly before giving up.
            Err(e) if format == ImageFormat::Tiff => image::DynamicImage::ImageRgba8(
                decode_tiff_directly(path, limit).ok_or_else(|| map_image_error(path, e))?,
            ),
            Err(e) => return Err(map_image_error(path, e)),
        };
        let mut properties = std::collections::BTreeMap::new();
        properties.insert("image.format".into(), format!("{format:?}"));
        properties.insert("image.color-type".into(), format!("{:?}", decoded.color()));
        properties.insert("image.width".into(), width.to_string());
        properties.insert("image.height".into(), height.to_string());
        // Converted in place when it is already RGBA8 (no second copy).
        let base = decoded.into_rgba8();

        let mut levels = vec![base];
        while let Some(last) = levels.last() {
            if last.width().max(last.height()) <= PYRAMID_TOP_SIDE {
                break;
            }
            let next = halve(last);
            levels.push(next);
        }
        let (w0, h0) = (f64::from(width), f64::from(height));
        let level_info = levels
            .iter()
            .map(|l| Level {
                width: u64::from(l.width()),
                height: u64::from(l.height()),
                downsample: 0.5 * (w0 / f64::from(l.width()) + h0 / f64::from(l.height())),
            })
            .collect();
        let (mpp, note) = read_embedded_mpp(path, format);
        if let Some(note) = note {
            properties.insert(RESOLUTION_NOTE.into(), note);
        }
        if let Some(m) = &mpp {
            properties.insert("image.mpp-x".into(), format!("{}", m.x));
            properties.insert("image.mpp-y".into(), format!("{}", m.y));
        }
        Ok((
            SnapshotBackend { levels },
            SnapshotMetadata {
                format: format!("{format:?}"),
                levels: level_info,
                mpp,
                properties,
            },
        ))
    }

    /// Reads `w`x`h` pixels of `level` whose top-left corner is (`x0`, `y0`) in level-0 coordinates;
    /// outside the image the region is transparent.
    pub fn read_region(
        &self,
        level: usize,
        x0: i64,
        y0: i64,
        w: u32,
        h: u32,
        downsample: f64,
    ) -> RgbaImage {
        let src = &self.levels[level];
        let lx = (x0 as f64 / downsample).round() as i64;
        let ly = (y0 as f64 / downsample).round() as i64;
        let mut out = RgbaImage::new(w, h);
        let sx0 = lx.max(0);
        let sy0 = ly.max(0);
        let sx1 = (lx + i64::from(w)).min(i64::from(src.width()));
        let sy1 = (ly + i64::from(h)).min(i64::from(src.height()));
        if sx1 <= sx0 || sy1 <= sy0 {
            return out;
        }
        let row_bytes = ((sx1 - sx0) * 4) as usize;
        let src_raw = src.as_raw();
        let src_stride = src.width() as usize * 4;
        let dst_stride = w as usize * 4;
        let dst = &mut *out;
        for sy in sy0..sy1 {
            let s = sy as usize * src_stride + sx0 as usize * 4;
            let d = (sy - ly) as usize * dst_stride + (sx0 - lx) as usize * 4;
            dst[d..d + row_bytes].copy_from_slice(&src_raw[s..s + row_bytes]);
        }
        out
    }
}

/// A JPEG is complete when an end-of-image marker follows its last start-of-scan marker (entropy-coded
/// data escapes 0xFF, so markers cannot appear inside it). JPEG decoders silently fill a truncated
/// image with grey; a pathologist must be told instead.
fn tiff_dimensions(path: &Path) -> Option<(u32, u32)> {
    let mut dec = tiff::decoder::Decoder::new(BufReader::new(File::open(path).ok()?)).ok()?;
    dec.dimensions().ok()
}

/// A TIFF's first image through the `tiff` crate, for 8-bit grey, RGB, RGBA and YCbCr (converted with
/// the JPEG/JFIF coefficients, as JPEG-compressed TIFFs store it); None for anything else.
fn decode_tiff_directly(path: &Path, limit: u64) -> Option<RgbaImage> {
    use tiff::ColorType;
    use tiff::decoder::{Decoder, DecodingResult, Limits};
    let mut limits = Limits::default();
    limits.decoding_buffer_size = usize::try_from(limit).unwrap_or(usize::MAX);
    limits.intermediate_buffer_size = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut dec = Decoder::new(BufReader::new(File::open(path).ok()?))
        .ok()?
        .with_limits(limits);
    let (w, h) = dec.dimensions().ok()?;
    let colour = dec.colortype().ok()?;
    let DecodingResult::U8(data) = dec.read_image().ok()? else {
        return None;
    };
    let n = (w as usize).checked_mul(h as usize)?;
    let px: Vec<[u8; 4]> = match colour {
        ColorType::Gray(8) => data.iter().take(n).map(|&v| [v, v, v, 255]).collect(),
        ColorType::RGB(8) => data
            .chunks_exact(3)
            .map(|c| [c[0], c[1], c[2], 255])
            .collect(),
        ColorType::RGBA(8) => data
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect(),
        ColorType::YCbCr(8) => data
            .chunks_exact(3)
            .map(|c| {
                let (y, cb, cr) = (
                    f32::from(c[0]),
                    f32::from(c[1]) - 128.0,
                    f32::from(c[2]) - 128.0,
                );
                let q = |v: f32| v.round().clamp(0.0, 255.0) as u8;
                [
                    q(y + 1.402 * cr),
                    q(y - 0.344_136 * cb - 0.714_136 * cr),
                    q(y + 1.772 * cb),
                    255,
                ]
            })
            .collect(),
        _ => return None,
    };
    if px.len() != n {
        return None;
    }
    RgbaImage::from_raw(w, h, px.into_iter().flatten().collect())
}

pub(crate) fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last = |marker: u8| {
        bytes
            .windows(2)
            .rposition(|w| w[0] == 0xFF && w[1] == marker)
    };
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) => eoi > sos,
        _ => false,
    }
}

/// A physical pixel size stored in the file: TIFF resolution tags or PNG's pHYs chunk.
/// The property that says why a file's resolution tags were not taken as its pixel size.
pub const RESOLUTION_NOTE: &str = "histolens.resolution-note";

/// The pixel size a snapshot's metadata states, or a note on why its resolution tags say nothing.
fn read_embedded_mpp(path: &Path, format: ImageFormat) -> (Option<Mpp>, Option<String>) {
    let found = match format {
        ImageFormat::Tiff => tiff_mpp(path),
        ImageFormat::Png => png_mpp(path),
        _ => None,
    };
    match found {
        Some(Ok(m)) => (Some(m), None),
        Some(Err(note)) => (None, Some(note)),
        None => (None, None),
    }
}

/// OME-XML in the ImageDescription first, else the resolution tags (ImageJ's calibration unit
/// understood); None when there are none.
fn tiff_mpp(path: &Path) -> Option<Result<Mpp, String>> {
    use tiff::tags::Tag;
    let mut dec = tiff::decoder::Decoder::new(BufReader::new(File::open(path).ok()?)).ok()?;
    let description = dec
        .find_tag(Tag::ImageDescription)
        .ok()
        .flatten()
        .and_then(|v| v.into_string().ok());
    if let Some(m) = description.as_deref().and_then(ome_physical_size) {
        return Some(Ok(m));
    }
    let xres = tiff_f64(dec.find_tag(Tag::XResolution).ok()??)?;
    let yres = dec
        .find_tag(Tag::YResolution)
        .ok()
        .flatten()
        .and_then(tiff_f64)
        .unwrap_or(xres);
    let unit = dec
        .find_tag(Tag::ResolutionUnit)
        .ok()
        .flatten()
        .and_then(|v| v.into_u16().ok())
        .unwrap_or(2); // TIFF's default unit is the inch
    Some(
        match (unit, description.as_deref().and_then(imagej_unit_um)) {
            // ImageJ stores pixels per calibration unit with ResolutionUnit "none" and names the unit in
            // its ImageDescription: a deliberate calibration, never a default.
            (1, Some(um_per_unit)) => Mpp::new(
                um_per_unit / xres,
                um_per_unit / yres,
                MppSource::TiffResolution,
            )
            .ok_or_else(|| "resolution tag: not a plausible pixel size (ignored)".to_string()),
            _ => match mpp_from_resolution(xres, yres, &unit.to_string()) {
                Some((x, y)) => resolution_mpp(x, y, MppSource::TiffResolution),
                None => Err(format!(
                    "resolution tag: {xres} px per unit with no unit (ignored)"
                )),
            },
        },
    )
}

/// A numeric TIFF tag value (resolutions are RATIONALs) as f64.
fn tiff_f64(v: tiff::decoder::ifd::Value) -> Option<f64> {
    use tiff::decoder::ifd::Value;
    match v {
        Value::Rational(n, d) if d != 0 => Some(f64::from(n) / f64::from(d)),
        Value::SRational(n, d) if d != 0 => Some(f64::from(n) / f64::from(d)),
        Value::Double(x) => Some(x),
        Value::Float(x) => Some(f64::from(x)),
        Value::Unsigned(x) => Some(f64::from(x)),
        Value::Short(x) => Some(f64::from(x)),
        Value::List(mut l) if !l.is_empty() => tiff_f64(l.swap_remove(0)),
        _ => None,
    }
}

/// Micrometres per unit named in an ImageJ ImageDescription (`unit=micron`, `unit=\u00B5m`, …).
pub(crate) fn imagej_unit_um(description: &str) -> Option<f64> {
    if !description.starts_with("ImageJ=") {
        return None;
    }
    let unit = description
        .lines()
        .find_map(|l| l.trim().strip_prefix("unit="))?
        .trim();
    match unit {
        "micron" | "microns" | "um" | "µm" | "μm" | "\\u00B5m" | "\\u00b5m" => Some(1.0),
        "nm" | "nanometer" => Some(1e-3),
        "mm" | "millimeter" => Some(1e3),
        "cm" | "centimeter" => Some(1e4),
        "inch" | "in" => Some(25_400.0),
        _ => None,
    }
}

fn png_mpp(path: &Path) -> Option<Result<Mpp, String>> {
    let dec = png::Decoder::new(BufReader::new(File::open(path).ok()?));
    let reader = dec.read_info().ok()?;
    let dims = reader.info().pixel_dims?;
    if dims.unit != png::Unit::Meter || dims.xppu == 0 || dims.yppu == 0 {
        return Some(Err(format!(
            "pHYs: {} x {} px per unit with no unit (ignored)",
            dims.xppu, dims.yppu
        )));
    }
    Some(resolution_mpp(
        1e6 / f64::from(dims.xppu),
        1e6 / f64::from(dims.yppu),
        MppSource::PngPhys,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_completeness() {
        assert!(jpeg_is_complete(&[
            0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 0xFF, 0x00, 0xFF, 0xD9
        ]));
        assert!(!jpeg_is_complete(&[
            0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 0xFF, 0x00
        ]));
        // A complete EXIF thumbnail before a truncated main image.
        assert!(!jpeg_is_complete(&[
            0xFF, 0xDA, 0xFF, 0xD9, 0xFF, 0xDA, 7, 7
        ]));
    }

    #[test]
    fn imagej_units() {
        assert_eq!(
            imagej_unit_um("ImageJ=1.51g\nunit=\\u00B5m\nxorigin=-1\n"),
            Some(1.0)
        );
        assert_eq!(imagej_unit_um("ImageJ=1.53\nunit=micron\n"), Some(1.0));
        assert_eq!(imagej_unit_um("ImageJ=1.53\nunit=mm\n"), Some(1000.0));
        assert_eq!(imagej_unit_um("ImageJ=1.53\nunit=pixel\n"), None);
        assert_eq!(imagej_unit_um("Aperio Image\nunit=micron"), None);
    }
}
