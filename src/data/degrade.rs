//! What a field goes through between the tissue and a file from another lab, for the magnification
//! builder: the resampling filter (area, bilinear, Lanczos, nearest), screenshot rescaling (two
//! resamplings in a row), slight defocus, stain and white-balance jitter, gamma, vignetting, sensor
//! noise, JPEG, and borders or scale bars drawn on the image.
//!
//! Every geometric step ends on the patch's exact side, so the label (the field's µm divided by the
//! side) stays true whatever the chain did.

use image::imageops::FilterType;
use image::{Rgb, RgbImage, RgbaImage};
use rand::Rng;

use super::augment::{AugmentConfig, jitter_colour, jpeg_round_trip, to_rgb};
use crate::slide::resize_area;

/// How to resample a field to the patch's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resampler {
    /// Box-halving then a triangle filter (an optical-like antialiased reduction).
    Area,
    /// `image`'s filters scale their support with the reduction: antialiased too, with their own
    /// sharpness and ringing.
    Filter(FilterType),
    /// Nearest neighbour: aliasing, as a naive screenshot or export makes.
    Nearest,
}

impl Resampler {
    fn draw(rng: &mut impl Rng) -> Self {
        match rng.random_range(0..100u32) {
            0..45 => Resampler::Area,
            45..65 => Resampler::Filter(FilterType::Lanczos3),
            65..85 => Resampler::Filter(FilterType::Triangle),
            85..92 => Resampler::Filter(FilterType::CatmullRom),
            _ => Resampler::Nearest,
        }
    }

    pub fn resize(self, img: &RgbaImage, w: u32, h: u32) -> RgbaImage {
        match self {
            Resampler::Area => resize_area(img, w, h),
            Resampler::Filter(f) => image::imageops::resize(img, w, h, f),
            Resampler::Nearest => image::imageops::resize(img, w, h, FilterType::Nearest),
        }
    }
}

/// A field (the level-0 pixels of a region, any aspect) resampled to `side` x `side` with the area
/// filter and no degradation: the clean patch.
pub fn clean(field: &RgbaImage, side: u32) -> RgbImage {
    to_rgb(&resize_area(field, side, side))
}

/// A field resampled to `side` x `side` through a random chain of the degradations above.
pub fn degrade(field: &RgbaImage, side: u32, rng: &mut impl Rng) -> RgbImage {
    let resampled = if rng.random_bool(0.2) {
        // A screenshot: the image was shown at another size, then captured and rescaled.
        let s = rng.random_range(0.75f64..1.35);
        let mid = ((f64::from(side) * s).round() as u32).max(8);
        let first = Resampler::draw(rng).resize(field, mid, mid);
        Resampler::draw(rng).resize(&first, side, side)
    } else {
        Resampler::draw(rng).resize(field, side, side)
    };
    let mut img = to_rgb(&resampled);
    if rng.random_bool(0.25) {
        img = image::imageops::blur(&img, rng.random_range(0.4f32..1.4));
    }
    let colour = AugmentConfig {
        stain: 0.25,
        brightness: 0.08,
        ..AugmentConfig::none()
    };
    jitter_colour(&mut img, &colour, rng);
    if rng.random_bool(0.5) {
        white_balance(&mut img, rng);
    }
    if rng.random_bool(0.3) {
        gamma(&mut img, rng.random_range(0.7f32..1.4));
    }
    if rng.random_bool(0.2) {
        vignette(&mut img, rng.random_range(0.1f32..0.35));
    }
    if rng.random_bool(0.3) {
        noise(&mut img, rng.random_range(1.0f32..6.0), rng);
    }
    if rng.random_bool(0.1) {
        border(&mut img, rng);
    }
    if rng.random_bool(0.1) {
        scale_bar(&mut img, rng);
    }
    if rng.random_bool(0.5)
        && let Some(j) = jpeg_round_trip(&img, rng.random_range(30u8..=95))
    {
        img = j;
    }
    img
}

/// Per-channel gains of a camera's white balance.
fn white_balance(img: &mut RgbImage, rng: &mut impl Rng) {
    let gains: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.9f32..1.1));
    for p in img.pixels_mut() {
        for (v, g) in p.0.iter_mut().zip(gains) {
            *v = (f32::from(*v) * g).round().clamp(0.0, 255.0) as u8;
        }
    }
}

fn gamma(img: &mut RgbImage, g: f32) {
    let lut: [u8; 256] =
        std::array::from_fn(|v| (255.0 * (v as f32 / 255.0).powf(g)).round() as u8);
    for p in img.pixels_mut() {
        p.0 = p.0.map(|v| lut[usize::from(v)]);
    }
}

/// Darker corners, as a microscope camera's: intensity · (1 − strength · r²), r = 1 at the corners.
fn vignette(img: &mut RgbImage, strength: f32) {
    let (w, h) = (img.width() as f32, img.height() as f32);
    let r2max = (w * w + h * h) / 4.0;
    for (x, y, p) in img.enumerate_pixels_mut() {
        let (dx, dy) = (x as f32 + 0.5 - w / 2.0, y as f32 + 0.5 - h / 2.0);
        let k = 1.0 - strength * (dx * dx + dy * dy) / r2max;
        p.0 =
            p.0.map(|v| (f32::from(v) * k).round().clamp(0.0, 255.0) as u8);
    }
}

/// Gaussian sensor noise of standard deviation `sigma` grey levels.
fn noise(img: &mut RgbImage, sigma: f32, rng: &mut impl Rng) {
    for p in img.pixels_mut() {
        for c in 0..3 {
            // Sum of four uniforms: close enough to a normal for noise.
            let n: f32 = (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum::<f32>() * 0.866;
            p.0[c] = (f32::from(p.0[c]) + sigma * n).round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// A black or white strip along one edge, as exports and screenshots leave.
fn border(img: &mut RgbImage, rng: &mut impl Rng) {
    let (w, h) = img.dimensions();
    let colour = if rng.random_bool(0.5) { 0 } else { 255 };
    let width = rng.random_range(4..=(w.min(h) / 8).max(5));
    let edge = rng.random_range(0..4u32);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let inside = match edge {
            0 => x < width,
            1 => x >= w - width,
            2 => y < width,
            _ => y >= h - width,
        };
        if inside {
            *p = Rgb([colour; 3]);
        }
    }
}

/// A filled scale bar near a corner, as published snapshots carry.
fn scale_bar(img: &mut RgbImage, rng: &mut impl Rng) {
    let (w, h) = img.dimensions();
    let colour = if rng.random_bool(0.5) { 0 } else { 255 };
    let len = (w as f32 * rng.random_range(0.2f32..0.4)) as u32;
    let thick = rng.random_range(3..=6u32);
    let margin = w / 16;
    let x0 = if rng.random_bool(0.5) {
        margin
    } else {
        w.saturating_sub(margin + len)
    };
    let y0 = h.saturating_sub(margin + thick);
    for y in y0..(y0 + thick).min(h) {
        for x in x0..(x0 + len).min(w) {
            img.put_pixel(x, y, Rgb([colour; 3]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Whatever the chain draws, the patch has the side asked for.
    #[test]
    fn every_chain_lands_on_the_side() {
        let field = RgbaImage::from_fn(517, 389, |x, y| {
            image::Rgba([(x % 251) as u8, (y % 241) as u8, 120, 255])
        });
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..40 {
            let side = rng.random_range(64..300u32);
            assert_eq!(degrade(&field, side, &mut rng).dimensions(), (side, side));
        }
        assert_eq!(clean(&field, 100).dimensions(), (100, 100));
    }
}
