//! A tissue detector for H&E: a pixel is background when it is transparent (outside the scanned
//! area) or bright and unsaturated (glass). Pen marks and dark debris count as tissue here.

use image::RgbaImage;

/// Brightness (mean of R, G, B) above which an unsaturated pixel is glass.
const BRIGHT: u32 = 200;
/// Saturation ((max − min) / max) below which a bright pixel is glass.
const MAX_GLASS_SATURATION: f32 = 0.10;

/// Whether one straight-alpha RGBA pixel is background.
#[inline]
pub fn is_background(px: [u8; 4]) -> bool {
    if px[3] < 128 {
        return true;
    }
    let [r, g, b, _] = px.map(u32::from);
    let (max, min) = (r.max(g).max(b), r.min(g).min(b));
    let bright = (r + g + b) / 3 > BRIGHT;
    let saturation = if max == 0 {
        0.0
    } else {
        (max - min) as f32 / max as f32
    };
    bright && saturation < MAX_GLASS_SATURATION
}

/// Share of background pixels in `img` (1 for an empty image).
pub fn background_fraction(img: &RgbaImage) -> f64 {
    let n = u64::from(img.width()) * u64::from(img.height());
    if n == 0 {
        return 1.0;
    }
    let bg = img.pixels().filter(|p| is_background(p.0)).count() as u64;
    bg as f64 / n as f64
}

/// Share of background pixels in an opaque RGB image (1 for an empty image).
pub fn background_fraction_rgb(img: &image::RgbImage) -> f64 {
    let n = u64::from(img.width()) * u64::from(img.height());
    if n == 0 {
        return 1.0;
    }
    let bg = img
        .pixels()
        .filter(|p| is_background([p.0[0], p.0[1], p.0[2], 255]))
        .count() as u64;
    bg as f64 / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glass_is_background_and_stained_tissue_is_not() {
        assert!(is_background([245, 245, 245, 255]));
        assert!(is_background([0, 0, 0, 0]));
        assert!(!is_background([200, 120, 190, 255])); // eosin pink
        assert!(!is_background([80, 60, 140, 255])); // haematoxylin purple
        let mut img = RgbaImage::from_pixel(10, 10, image::Rgba([240, 240, 240, 255]));
        for x in 0..10 {
            for y in 0..3 {
                img.put_pixel(x, y, image::Rgba([150, 80, 160, 255]));
            }
        }
        assert!((background_fraction(&img) - 0.7).abs() < 1e-9);
    }
}
