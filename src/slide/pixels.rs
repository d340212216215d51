//! Pixel conversions: OpenSlide's premultiplied BGRA, area (box) reduction for pyramids and thumbnails.

use image::RgbaImage;

/// Converts OpenSlide's premultiplied ARGB (little-endian bytes B, G, R, A) into straight RGBA in place.
/// Fully transparent pixels (outside the scanned area) become (0, 0, 0, 0).
pub fn premultiplied_bgra_to_rgba(buf: &mut [u8]) {
    for px in buf.chunks_exact_mut(4) {
        let (b, g, r, a) = (px[0], px[1], px[2], px[3]);
        match a {
            255 => {
                px[0] = r;
                px[2] = b;
            }
            0 => px.copy_from_slice(&[0, 0, 0, 0]),
            _ => {
                let un = |c: u8| -> u8 {
                    let a = u32::from(a);
                    ((u32::from(c) * 255 + a / 2) / a).min(255) as u8
                };
                px[0] = un(r);
                px[1] = un(g);
                px[2] = un(b);
            }
        }
    }
}

/// Halves an image with a 2x2 box (area) filter; an odd last row or column averages the pixels it has.
/// Alpha-weighted, so transparent pixels do not darken their neighbours.
pub fn halve(src: &RgbaImage) -> RgbaImage {
    let (w, h) = src.dimensions();
    let (ow, oh) = (w.div_ceil(2).max(1), h.div_ceil(2).max(1));
    let mut out = RgbaImage::new(ow, oh);
    let s = src.as_raw();
    let stride = w as usize * 4;
    for oy in 0..oh {
        let y0 = (oy * 2) as usize;
        let y1 = (y0 + 1).min(h as usize - 1);
        for ox in 0..ow {
            let x0 = (ox * 2) as usize;
            let x1 = (x0 + 1).min(w as usize - 1);
            let mut acc = [0u32; 4];
            let mut n = 0u32;
            let rows: &[usize] = if y1 == y0 { &[y0] } else { &[y0, y1] };
            let cols: &[usize] = if x1 == x0 { &[x0] } else { &[x0, x1] };
            for &y in rows {
                for &x in cols {
                    let i = y * stride + x * 4;
                    let a = u32::from(s[i + 3]);
                    acc[0] += u32::from(s[i]) * a;
                    acc[1] += u32::from(s[i + 1]) * a;
                    acc[2] += u32::from(s[i + 2]) * a;
                    acc[3] += a;
                    n += 1;
                }
            }
            let px = out.get_pixel_mut(ox, oy);
            if acc[3] == 0 {
                px.0 = [0, 0, 0, 0];
            } else {
                let a = acc[3];
                px.0 = [
                    ((acc[0] + a / 2) / a) as u8,
                    ((acc[1] + a / 2) / a) as u8,
                    ((acc[2] + a / 2) / a) as u8,
                    ((a + n / 2) / n) as u8,
                ];
            }
        }
    }
    out
}

/// Resizes to fit inside `max_side` keeping the aspect ratio, with an antialiased (area-like) filter.
pub fn fit_within(src: &RgbaImage, max_side: u32) -> RgbaImage {
    let (w, h) = src.dimensions();
    if w <= max_side && h <= max_side {
        return src.clone();
    }
    let s = f64::from(max_side) / f64::from(w.max(h));
    let nw = ((f64::from(w) * s).round() as u32).max(1);
    let nh = ((f64::from(h) * s).round() as u32).max(1);
    let mut cur = src.clone();
    // Box-halve while more than 2x too big (exact area averaging), then one antialiased resize.
    while cur.width() / 2 >= nw && cur.height() / 2 >= nh {
        cur = halve(&cur);
    }
    image::imageops::resize(&cur, nw, nh, image::imageops::FilterType::Triangle)
}

/// Composites straight RGBA over an opaque background colour (areas outside the scanned tissue).
pub fn flatten_onto(img: &mut RgbaImage, background: [u8; 3]) {
    for px in img.pixels_mut() {
        let a = u32::from(px.0[3]);
        if a == 255 {
            continue;
        }
        for (c, &bg) in px.0.iter_mut().zip(&background) {
            *c = ((u32::from(*c) * a + u32::from(bg) * (255 - a) + 127) / 255) as u8;
        }
        px.0[3] = 255;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpremultiplies_and_swaps_channels() {
        // Opaque: B=10 G=20 R=30 → RGBA 30,20,10.
        let mut px = [10u8, 20, 30, 255, 0, 0, 0, 0, 50, 25, 100, 128];
        premultiplied_bgra_to_rgba(&mut px);
        assert_eq!(&px[0..4], &[30, 20, 10, 255]);
        assert_eq!(&px[4..8], &[0, 0, 0, 0]);
        // Half-transparent premultiplied (R=100,G=25,B=50 at a=128) → straight ≈ 199, 50, 100.
        assert_eq!(&px[8..12], &[199, 50, 100, 128]);
    }

    #[test]
    fn halving_averages_areas_and_handles_odd_sizes() {
        let mut img = RgbaImage::new(3, 3);
        for (x, y, p) in img.enumerate_pixels_mut() {
            let v = if (x + y) % 2 == 0 { 0 } else { 200 };
            p.0 = [v, v, v, 255];
        }
        let h = halve(&img);
        assert_eq!(h.dimensions(), (2, 2));
        assert_eq!(h.get_pixel(0, 0).0, [100, 100, 100, 255]);
        // Last column: pixels (2,0)=0 and (2,1)=200.
        assert_eq!(h.get_pixel(1, 0).0, [100, 100, 100, 255]);
        // Corner pixel (2,2) alone.
        assert_eq!(h.get_pixel(1, 1).0, [0, 0, 0, 255]);
    }

    #[test]
    fn transparent_pixels_do_not_darken() {
        let mut img = RgbaImage::new(2, 1);
        img.put_pixel(0, 0, image::Rgba([200, 100, 50, 255]));
        img.put_pixel(1, 0, image::Rgba([0, 0, 0, 0]));
        let h = halve(&img);
        assert_eq!(h.get_pixel(0, 0).0, [200, 100, 50, 128]);
    }

    #[test]
    fn fit_within_keeps_aspect() {
        let img = RgbaImage::new(1000, 250);
        let t = fit_within(&img, 100);
        assert_eq!(t.dimensions(), (100, 25));
    }

    #[test]
    fn flatten_uses_background() {
        let mut img = RgbaImage::from_raw(1, 1, vec![0, 0, 0, 0]).unwrap();
        flatten_onto(&mut img, [255, 255, 255]);
        assert_eq!(img.get_pixel(0, 0).0, [255, 255, 255, 255]);
    }
}
