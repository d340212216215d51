//! A second physical ruler, where tissue has one: red blood cells are discs of nearly one size in
//! every patient and organ (about 7.5 µm in smears, about 7 µm in fixed sections), the most constant
//! object in a section. Strongly red pixels → connected components → the round, solid ones that
//! stand alone and out (not a fragment of red stroma: little red around them, and much redder than
//! it) → if enough of them share one size, µm/px = [`RED_CELL_UM`] ÷ their median diameter.
//!
//! Most fields hold no red cells, or only clumps of them inside vessels, so the ruler is silent far
//! more often than it reads; none of the sources with a documented scale here shows enough of them
//! to measure how it does, so it is shown beside the estimate and checked against it, never fused.

use image::RgbImage;
use serde::Serialize;

use super::ruler::blobs;

/// A red blood cell's diameter in a fixed section, µm.
pub const RED_CELL_UM: f64 = 7.0;
/// Smaller discs are specks of red stroma, not cells (read on crops resampled toward 0.5 µm/px,
/// where a red cell is about 14 px across).
const MIN_DIAMETER_PX: f64 = 7.0;
/// Fewer cells of one size than this give no reading.
pub const MIN_CELLS: usize = 5;
/// A pixel is red when (R − G) / R reaches this and R is well above B (stroma and cytoplasm are
/// pink: closer to blue; nuclei are blue).
const MIN_REDNESS: f32 = 0.5;
const MIN_RED_OVER_BLUE: f32 = 1.6;
/// A cell's mean redness exceeds its surroundings' by this much (red collagen and keratin are red
/// among pink; a red cell is red among glass, plasma or pale stroma).
const MIN_CONTRAST: f32 = 0.25;

#[derive(Debug, Clone, Serialize)]
pub struct RedCellReading {
    /// µm/px from the red cells.
    pub mpp: f64,
    pub cells: usize,
    /// Median diameter of the cells of one size, in the image's own pixels (as the nuclei ruler's).
    pub diameter_px: f64,
    /// µm/px of the image measured over the image's own (1: read as it is).
    pub zoom: f64,
}

impl RedCellReading {
    /// A reading of the image resampled to `k` times its µm/px, as a reading of the image itself.
    pub fn of_zoomed(self, k: f64) -> Self {
        Self {
            mpp: self.mpp / k,
            diameter_px: self.diameter_px * k,
            zoom: self.zoom * k,
            ..self
        }
    }
}

/// (R − G) / R.
fn redness(p: &image::Rgb<u8>) -> f32 {
    let [r, g, _] = p.0.map(f32::from);
    (r - g) / r.max(1.0)
}

/// A strongly red pixel, given its [`redness`].
fn is_red(p: &image::Rgb<u8>, redness: f32) -> bool {
    let [r, _, b] = p.0.map(f32::from);
    r > 100.0 && redness >= MIN_REDNESS && r >= MIN_RED_OVER_BLUE * b
}

/// Diameters in pixels of the lone red discs of an image (candidate red cells).
pub fn lone_red_discs(img: &RgbImage) -> Vec<f64> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let red_of: Vec<f32> = img.pixels().map(redness).collect();
    let mask: Vec<bool> = img
        .pixels()
        .zip(&red_of)
        .map(|(p, &q)| is_red(p, q))
        .collect();
    let (label, found) = blobs(&mask, w, h);
    let mut out = Vec::new();
    for (i, b) in found.iter().enumerate() {
        let d = b.diameter();
        if b.touches_edge || d < MIN_DIAMETER_PX || b.elongation() > 1.6 || b.fill() < 0.6 {
            continue;
        }
        // Alone and standing out: in its box grown by half its size on each side, at most a
        // quarter of the pixels outside the disc are red (a clump or red stroma around it fails),
        // and they are much less red than the disc.
        let grow = |(a, z): (usize, usize), n: usize| {
            let half = (z - a).div_ceil(2); // half the side, rounded down
            (a.saturating_sub(half), (z + half).min(n - 1))
        };
        let ((x0, x1), (y0, y1)) = (grow(b.x, w), grow(b.y, h));
        let (mut around, mut red, mut redness_in, mut redness_out) = (0usize, 0usize, 0.0, 0.0);
        for y in y0..=y1 {
            for x in x0..=x1 {
                let j = y * w + x;
                if label[j] == i as u32 + 1 {
                    redness_in += red_of[j];
                } else {
                    around += 1;
                    red += usize::from(mask[j]);
                    redness_out += red_of[j];
                }
            }
        }
        let contrast = redness_in / b.area as f32 - redness_out / around.max(1) as f32;
        if red * 4 <= around && contrast >= MIN_CONTRAST {
            out.push(d);
        }
    }
    out
}

/// Reads the pixel size from the red cells of several crops of one image, pooled; None unless at
/// least [`MIN_CELLS`] discs share one size (within 0.75-1.33x of their median) and they are at
/// least half of the discs found.
pub fn measure_crops(crops: &[RgbImage]) -> Option<RedCellReading> {
    let mut d: Vec<f64> = crops.iter().flat_map(lone_red_discs).collect();
    d.sort_by(f64::total_cmp);
    let median = *d.get(d.len() / 2)?;
    let same: Vec<f64> = d
        .iter()
        .copied()
        .filter(|&x| (0.75 * median..=1.33 * median).contains(&x))
        .collect();
    if same.len() < MIN_CELLS || 2 * same.len() < d.len() {
        return None;
    }
    let diameter = same[same.len() / 2];
    Some(RedCellReading {
        mpp: RED_CELL_UM / diameter,
        cells: same.len(),
        diameter_px: diameter,
        zoom: 1.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STROMA: [u8; 3] = [225, 150, 185];
    const RED: [u8; 3] = [215, 70, 95];

    /// Pink stroma with lone red discs of a known diameter on a grid.
    fn lone_cells(diameter: f64, spacing: u32) -> RgbImage {
        let side = spacing * 4;
        RgbImage::from_fn(side, side, |x, y| {
            let c = |v: u32| f64::from(v % spacing) - f64::from(spacing) / 2.0;
            let d = (c(x).powi(2) + c(y).powi(2)).sqrt();
            image::Rgb(if d <= diameter / 2.0 { RED } else { STROMA })
        })
    }

    #[test]
    fn reads_the_size_of_lone_red_cells() {
        for diameter in [10.0, 14.0, 24.0] {
            let r =
                measure_crops(&[lone_cells(diameter, (diameter * 3.0) as u32)]).expect("a reading");
            assert_eq!(r.cells, 16);
            assert!(
                (r.diameter_px / diameter - 1.0).abs() < 0.08,
                "{diameter}: {r:?}"
            );
            // Read on the image at half its µm/px: the cells are half as wide in its own pixels,
            // and the µm/px still matches that width.
            let own = r.clone().of_zoomed(0.5);
            assert!((own.diameter_px - r.diameter_px / 2.0).abs() < 1e-12);
            assert!((own.mpp - RED_CELL_UM / own.diameter_px).abs() < 1e-9);
        }
    }

    #[test]
    fn is_silent_on_red_stroma_clumps_specks_and_too_few_cells() {
        // Red stroma: one large red region with pink holes.
        let stroma = RgbImage::from_fn(200, 200, |x, y| {
            image::Rgb(if (x / 9 + y / 13) % 4 == 0 {
                STROMA
            } else {
                RED
            })
        });
        assert!(measure_crops(&[stroma]).is_none());
        // Cells packed edge to edge (a vessel full of them): no lone disc.
        assert!(measure_crops(&[lone_cells(14.0, 15)]).is_none());
        // Specks smaller than a cell at the scale read.
        assert!(measure_crops(&[lone_cells(5.0, 15)]).is_none());
        // Four cells are not enough.
        let four = image::imageops::crop_imm(&lone_cells(14.0, 42), 0, 0, 84, 84).to_image();
        assert!(measure_crops(&[four]).is_none());
    }
}
