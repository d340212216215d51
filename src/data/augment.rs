//! Augmentation for magnification training: flips, rotation, random crop, and the variations between
//! labs and scanners that must not change the estimate: stain (optical-density jitter), brightness,
//! blur and JPEG re-compression. Geometry never rescales: the pixel size is the label.

use image::{RgbImage, RgbaImage};
use rand::{Rng, SeedableRng};

/// What the training crops go through.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AugmentConfig {
    pub flips: bool,
    /// Largest rotation in degrees (0 to 90); angles that would bring the crop's corners outside the
    /// patch are reduced to what fits.
    pub max_rotation_deg: f32,
    /// Strength of the stain jitter: per-channel optical-density scale 1 ± s and shift ± s/4.
    pub stain: f32,
    /// Brightness jitter ± (fraction of full scale).
    pub brightness: f32,
    pub blur_probability: f32,
    pub jpeg_probability: f32,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            flips: true,
            max_rotation_deg: 90.0,
            stain: 0.15,
            brightness: 0.08,
            blur_probability: 0.25,
            jpeg_probability: 0.3,
        }
    }
}

impl AugmentConfig {
    /// Geometry only (flips and rotation), no colour or quality changes.
    pub fn none() -> Self {
        AugmentConfig {
            flips: false,
            max_rotation_deg: 0.0,
            stain: 0.0,
            brightness: 0.0,
            blur_probability: 0.0,
            jpeg_probability: 0.0,
        }
    }
}

/// Composites RGBA over white (glass), dropping alpha.
pub fn to_rgb(img: &RgbaImage) -> RgbImage {
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let p = img.get_pixel(x, y).0;
        let a = u32::from(p[3]);
        let c = |v: u8| ((u32::from(v) * a + 255 * (255 - a) + 127) / 255) as u8;
        image::Rgb([c(p[0]), c(p[1]), c(p[2])])
    })
}

/// Pads an image smaller than `size` on either side with white up to `size` (never rescales).
pub fn pad_to(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if w >= size && h >= size {
        return img.clone();
    }
    let (ow, oh) = (w.max(size), h.max(size));
    let mut out = RgbImage::from_pixel(ow, oh, image::Rgb([255, 255, 255]));
    image::imageops::replace(
        &mut out,
        img,
        i64::from((ow - w) / 2),
        i64::from((oh - h) / 2),
    );
    out
}

/// The centred `size` x `size` crop (the image is padded first when smaller).
pub fn center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let img = pad_to(img, size);
    let (w, h) = img.dimensions();
    image::imageops::crop_imm(&img, (w - size) / 2, (h - size) / 2, size, size).to_image()
}

/// A random `size` x `size` training crop with flips, rotation and the colour/quality jitter.
pub fn augment(img: &RgbImage, size: u32, cfg: &AugmentConfig, rng: &mut impl Rng) -> RgbImage {
    let img = pad_to(img, size);
    let mut out = rotated_crop(&img, size, cfg, rng);
    if cfg.flips {
        if rng.random_bool(0.5) {
            image::imageops::flip_horizontal_in_place(&mut out);
        }
        if rng.random_bool(0.5) {
            image::imageops::flip_vertical_in_place(&mut out);
        }
    }
    if cfg.stain > 0.0 || cfg.brightness > 0.0 {
        jitter_colour(&mut out, cfg, rng);
    }
    if cfg.blur_probability > 0.0 && rng.random_bool(f64::from(cfg.blur_probability)) {
        let sigma = rng.random_range(0.3f32..1.2);
        out = image::imageops::blur(&out, sigma);
    }
    if cfg.jpeg_probability > 0.0 && rng.random_bool(f64::from(cfg.jpeg_probability)) {
        let quality = rng.random_range(40u8..95);
        if let Some(j) = jpeg_round_trip(&out, quality) {
            out = j;
        }
    }
    out
}

/// The augmentation of a multi-magnification pair (DMSL): every image of the pair gets the same flips,
/// quarter turns (so the fields stay aligned) and colour jitter, and with `grey_probability` all turn
/// grey. Sizes never change. Blur and JPEG settings are not used here.
pub fn augment_pair(
    images: &[RgbImage],
    cfg: &AugmentConfig,
    grey_probability: f32,
    rng: &mut impl Rng,
) -> Vec<RgbImage> {
    let flip_h = cfg.flips && rng.random_bool(0.5);
    let flip_v = cfg.flips && rng.random_bool(0.5);
    let quarters = if cfg.max_rotation_deg >= 90.0 {
        rng.random_range(0..4u32)
    } else {
        0
    };
    let grey = grey_probability > 0.0 && rng.random_bool(f64::from(grey_probability.min(1.0)));
    let jitter_seed: u64 = rng.random();
    images
        .iter()
        .map(|img| {
            let mut out = rotate_quarters(img, quarters);
            if flip_h {
                image::imageops::flip_horizontal_in_place(&mut out);
            }
            if flip_v {
                image::imageops::flip_vertical_in_place(&mut out);
            }
            if cfg.stain > 0.0 || cfg.brightness > 0.0 {
                let mut same = rand::rngs::StdRng::seed_from_u64(jitter_seed);
                jitter_colour(&mut out, cfg, &mut same);
            }
            if grey {
                for p in out.pixels_mut() {
                    let [r, g, b] = p.0.map(u32::from);
                    let y = ((299 * r + 587 * g + 114 * b + 500) / 1000) as u8;
                    p.0 = [y, y, y];
                }
            }
            out
        })
        .collect()
}

/// Samples a square of side `size` rotated by a random angle around a random centre, with bilinear
/// interpolation. Quarter turns are exact; the extra angle is limited so that the rotated square stays
/// inside the image.
fn rotated_crop(img: &RgbImage, size: u32, cfg: &AugmentConfig, rng: &mut impl Rng) -> RgbImage {
    let (w, h) = (img.width() as f32, img.height() as f32);
    let s = size as f32;
    let quarter = if cfg.max_rotation_deg >= 90.0 {
        rng.random_range(0..4u32)
    } else {
        0
    };
    let mut theta = if cfg.max_rotation_deg > 0.0 {
        rng.random_range(0.0..cfg.max_rotation_deg.min(90.0))
            .to_radians()
    } else {
        0.0
    };
    // Half-extent of the rotated square's bounding box must fit in the image.
    let room = w.min(h);
    let extent = |t: f32| s * (t.cos().abs() + t.sin().abs());
    if extent(theta) > room {
        theta = if room > s {
            // Largest angle whose bounding box fits: s (cos t + sin t) = room.
            let r = (room / (s * std::f32::consts::SQRT_2)).min(1.0);
            (r.acos() - std::f32::consts::FRAC_PI_4).abs().min(theta)
        } else {
            0.0
        };
        if extent(theta) > room {
            theta = 0.0;
        }
    }
    let half = extent(theta) / 2.0;
    let cx = if w - 2.0 * half > 0.0 {
        rng.random_range(half..=w - half)
    } else {
        w / 2.0
    };
    let cy = if h - 2.0 * half > 0.0 {
        rng.random_range(half..=h - half)
    } else {
        h / 2.0
    };
    if theta == 0.0 {
        let x0 = (cx - s / 2.0).round().clamp(0.0, w - s) as u32;
        let y0 = (cy - s / 2.0).round().clamp(0.0, h - s) as u32;
        let crop = image::imageops::crop_imm(img, x0, y0, size, size).to_image();
        return rotate_quarters(&crop, quarter);
    }
    let (sin, cos) = theta.sin_cos();
    let out = RgbImage::from_fn(size, size, |u, v| {
        let du = u as f32 + 0.5 - s / 2.0;
        let dv = v as f32 + 0.5 - s / 2.0;
        let x = cx + cos * du - sin * dv - 0.5;
        let y = cy + sin * du + cos * dv - 0.5;
        bilinear(img, x, y)
    });
    rotate_quarters(&out, quarter)
}

fn rotate_quarters(img: &RgbImage, quarters: u32) -> RgbImage {
    match quarters % 4 {
        1 => image::imageops::rotate90(img),
        2 => image::imageops::rotate180(img),
        3 => image::imageops::rotate270(img),
        _ => img.clone(),
    }
}

fn bilinear(img: &RgbImage, x: f32, y: f32) -> image::Rgb<u8> {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (x - x0, y - y0);
    let px = |xi: i64, yi: i64| {
        img.get_pixel(xi.clamp(0, w - 1) as u32, yi.clamp(0, h - 1) as u32)
            .0
    };
    let (x0, y0) = (x0 as i64, y0 as i64);
    let (a, b, c, d) = (
        px(x0, y0),
        px(x0 + 1, y0),
        px(x0, y0 + 1),
        px(x0 + 1, y0 + 1),
    );
    let mut out = [0u8; 3];
    for i in 0..3 {
        let top = f32::from(a[i]) * (1.0 - fx) + f32::from(b[i]) * fx;
        let bottom = f32::from(c[i]) * (1.0 - fx) + f32::from(d[i]) * fx;
        out[i] = (top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8;
    }
    image::Rgb(out)
}

/// Stain variation as a per-channel change of optical density (OD = −ln(I/255)): OD' = OD·a + b,
/// then a brightness shift.
pub(crate) fn jitter_colour(img: &mut RgbImage, cfg: &AugmentConfig, rng: &mut impl Rng) {
    let mut lut = [[0u8; 256]; 3];
    let bright = if cfg.brightness > 0.0 {
        rng.random_range(-cfg.brightness..cfg.brightness) * 255.0
    } else {
        0.0
    };
    for table in &mut lut {
        let (a, b) = if cfg.stain > 0.0 {
            (
                1.0 + rng.random_range(-cfg.stain..cfg.stain),
                rng.random_range(-cfg.stain..cfg.stain) / 4.0,
            )
        } else {
            (1.0, 0.0)
        };
        for (v, slot) in table.iter_mut().enumerate() {
            let od = -((v as f32 + 1.0) / 256.0).ln();
            let od = (od * a + b).max(0.0);
            let i = 256.0 * (-od).exp() - 1.0 + bright;
            *slot = i.round().clamp(0.0, 255.0) as u8;
        }
    }
    for p in img.pixels_mut() {
        for c in 0..3 {
            p.0[c] = lut[c][usize::from(p.0[c])];
        }
    }
}

pub(crate) fn jpeg_round_trip(img: &RgbImage, quality: u8) -> Option<RgbImage> {
    let mut bytes = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality);
    img.write_with_encoder(enc).ok()?;
    image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg)
        .ok()
        .map(|i| i.to_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn crops_have_the_size_and_keep_the_pixel_scale() {
        // A 1-pixel checkerboard: any rescaling would blur it to grey.
        let img = RgbImage::from_fn(300, 260, |x, y| {
            if (x + y) % 2 == 0 {
                image::Rgb([0, 0, 0])
            } else {
                image::Rgb([255, 255, 255])
            }
        });
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let cfg = AugmentConfig {
            max_rotation_deg: 0.0,
            ..AugmentConfig::none()
        };
        for _ in 0..10 {
            let c = augment(&img, 224, &AugmentConfig { flips: true, ..cfg }, &mut rng);
            assert_eq!(c.dimensions(), (224, 224));
            assert!(c.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
        }
        let rotated = augment(&img, 224, &AugmentConfig::default(), &mut rng);
        assert_eq!(rotated.dimensions(), (224, 224));
        let small = RgbImage::from_pixel(100, 150, image::Rgb([10, 20, 30]));
        let c = center_crop(&small, 224);
        assert_eq!(c.dimensions(), (224, 224));
        assert_eq!(c.get_pixel(112, 112).0, [10, 20, 30]);
        assert_eq!(c.get_pixel(2, 2).0, [255, 255, 255]);
    }

    #[test]
    fn pair_augmentation_keeps_the_fields_aligned() {
        // A high image and its half-size partner with one marked corner: after augmentation the mark
        // is in the same corner of both.
        let mut hi = RgbImage::from_pixel(8, 8, image::Rgb([200, 100, 150]));
        let mut lo = RgbImage::from_pixel(4, 4, image::Rgb([200, 100, 150]));
        hi.put_pixel(0, 0, image::Rgb([0, 0, 0]));
        lo.put_pixel(0, 0, image::Rgb([0, 0, 0]));
        let cfg = AugmentConfig::default();
        for seed in 0..16 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let out = augment_pair(&[hi.clone(), lo.clone()], &cfg, 0.5, &mut rng);
            let dark = |img: &RgbImage| {
                let (w, h) = img.dimensions();
                let corners = [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)];
                corners
                    .iter()
                    .position(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&v| v < 60))
            };
            assert_eq!(out[0].dimensions(), (8, 8));
            assert_eq!(out[1].dimensions(), (4, 4));
            assert_eq!(dark(&out[0]), dark(&out[1]));
            assert!(dark(&out[0]).is_some());
            // Same colour jitter on both.
            assert_eq!(out[0].get_pixel(4, 4), out[1].get_pixel(2, 2));
        }
    }
}
