//! Legends drawn into exported images: a colour bar with its ends labelled 0 and 1 and a title,
//! in egui's default font (Ubuntu Light) rasterised with ab_glyph.

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use image::RgbaImage;

use super::colormap::Colormap;

/// Draws `text` with its top-left at (x, y), `size` px high, in `colour`, clipped to the image.
pub fn draw_text(img: &mut RgbaImage, x: i32, y: i32, size: f32, text: &str, colour: [u8; 3]) {
    let Ok(font) = FontRef::try_from_slice(epaint_default_fonts::UBUNTU_LIGHT) else {
        return;
    };
    let scaled = font.as_scaled(PxScale::from(size));
    let mut pen = x as f32;
    let baseline = y as f32 + scaled.ascent();
    let mut last = None;
    for ch in text.chars() {
        let id = scaled.glyph_id(ch);
        if let Some(prev) = last {
            pen += scaled.kern(prev, id);
        }
        let glyph = id.with_scale_and_position(PxScale::from(size), ab_glyph::point(pen, baseline));
        pen += scaled.h_advance(id);
        last = Some(id);
        let Some(outline) = font.outline_glyph(glyph) else {
            continue;
        };
        let b = outline.px_bounds();
        outline.draw(|gx, gy, cov| {
            let (px, py) = (b.min.x as i32 + gx as i32, b.min.y as i32 + gy as i32);
            if px < 0 || py < 0 || px >= img.width() as i32 || py >= img.height() as i32 {
                return;
            }
            let p = img.get_pixel_mut(px as u32, py as u32);
            for (dst, &c) in p.0.iter_mut().zip(&colour) {
                *dst = (f32::from(c) * cov + f32::from(*dst) * (1.0 - cov)).round() as u8;
            }
        });
    }
}

/// A horizontal colour bar 0 → 1 at row `y` (about 40 px tall in all), with `title` to its right.
pub fn draw_colour_bar(img: &mut RgbaImage, y: u32, map: Colormap, title: &str) {
    let (bar_x, bar_w, bar_h) = (10u32, 160u32.min(img.width().saturating_sub(20)), 14u32);
    if y + bar_h + 20 > img.height() || bar_w == 0 {
        return;
    }
    for dx in 0..bar_w {
        let [r, g, b] = map.rgb8(dx as f32 / (bar_w - 1).max(1) as f32);
        for dy in 0..bar_h {
            img.put_pixel(bar_x + dx, y + dy, image::Rgba([r, g, b, 255]));
        }
    }
    let black = [0, 0, 0];
    draw_text(img, bar_x as i32, (y + bar_h + 2) as i32, 14.0, "0", black);
    draw_text(
        img,
        (bar_x + bar_w - 8) as i32,
        (y + bar_h + 2) as i32,
        14.0,
        "1",
        black,
    );
    draw_text(
        img,
        (bar_x + bar_w + 8) as i32,
        y as i32,
        16.0,
        title,
        black,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_bar_leave_ink() {
        let mut img = RgbaImage::from_pixel(300, 50, image::Rgba([255, 255, 255, 255]));
        draw_colour_bar(&mut img, 2, Colormap::Viridis, "P(tumour)");
        let ink_right = (180..300)
            .flat_map(|x| (0..50).map(move |y| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0[0] < 128)
            .count();
        assert!(
            ink_right > 20,
            "the title was not drawn ({ink_right} dark pixels)"
        );
        assert_eq!(img.get_pixel(10, 5).0[..3], Colormap::Viridis.rgb8(0.0));
    }
}
