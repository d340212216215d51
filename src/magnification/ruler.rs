//! A physical cross-check that needs no training: nuclei are about 7–7.5 µm across in most tissues,
//! so their size in pixels gives a pixel size. Hematoxylin by colour deconvolution (Ruifrok and
//! Johnston's H&E vectors) → Otsu threshold inside tissue → connected components → round, solid
//! ones → the area-weighted median equivalent diameter → µm/px = 7.25 µm ÷ diameter.
//!
//! What it can and cannot do (measured on images from other labs): a wide prior inside about
//! 0.3–1.5 µm/px; it reads 40x images somewhat coarse (pale nuclei break up); above about 1.5 µm/px
//! nuclei are 2–4 px wide and it only says "at least this coarse". So it flags disagreement with the
//! network and is fused with it only inside its range, never used alone. The estimate gives it the
//! crops of the image resampled toward 0.5 µm/px, where it reads best ([`RulerReading::of_zoomed`]).

use image::RgbImage;
use serde::Serialize;

use crate::data::tissue::is_background;

/// A typical nucleus diameter, µm.
pub const NUCLEUS_UM: f64 = 7.25;
/// Below this many pixels across, nuclei are too small to measure.
const MIN_DIAMETER_PX: f64 = 4.0;
/// Fewer nuclei than this give no reading.
const MIN_NUCLEI: usize = 12;
/// The range where the ruler reads within a factor of about 1.25.
pub const RELIABLE_MPP: (f64, f64) = (0.3, 1.5);

#[derive(Debug, Clone, Serialize)]
pub struct RulerReading {
    /// µm/px from the nuclei; with `lower_bound`, only "at least this coarse".
    pub mpp: f64,
    pub nuclei: usize,
    /// Area-weighted median nucleus diameter in pixels.
    pub diameter_px: f64,
    /// The nuclei are too small to measure: the image is at least `mpp` µm/px.
    pub lower_bound: bool,
    /// µm/px of the image the nuclei were measured on over the image's own (1: read as it is).
    pub zoom: f64,
}

impl RulerReading {
    /// Whether the image it measured was inside the range where the reading is a usable estimate.
    pub fn reliable(&self) -> bool {
        !self.lower_bound && (RELIABLE_MPP.0..=RELIABLE_MPP.1).contains(&(self.mpp * self.zoom))
    }

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

/// Hematoxylin optical density of each pixel (NaN on background).
fn hematoxylin(img: &RgbImage) -> Vec<f32> {
    // Ruifrok & Johnston's stain vectors (H, E, residual), normalised; the inverse projects OD
    // onto stain amounts.
    let h = [0.650f32, 0.704, 0.286];
    let e = [0.072f32, 0.990, 0.105];
    let r = [
        h[1] * e[2] - h[2] * e[1],
        h[2] * e[0] - h[0] * e[2],
        h[0] * e[1] - h[1] * e[0],
    ];
    let inv = invert3([h, e, r]);
    let od = |v: u8| -((f32::from(v) + 1.0) / 256.0).ln();
    img.pixels()
        .map(|p| {
            if is_background([p.0[0], p.0[1], p.0[2], 255]) {
                return f32::NAN;
            }
            let o = [od(p.0[0]), od(p.0[1]), od(p.0[2])];
            o[0] * inv[0][0] + o[1] * inv[1][0] + o[2] * inv[2][0]
        })
        .collect()
}

/// The inverse of the matrix whose rows are `m` (stains as rows), so that OD · inv gives amounts.
fn invert3(m: [[f32; 3]; 3]) -> [[f32; 3]; 3] {
    let [a, b, c] = m;
    let det = a[0] * (b[1] * c[2] - b[2] * c[1]) - a[1] * (b[0] * c[2] - b[2] * c[0])
        + a[2] * (b[0] * c[1] - b[1] * c[0]);
    let d = if det.abs() < 1e-12 { 1e-12 } else { det };
    [
        [
            (b[1] * c[2] - b[2] * c[1]) / d,
            (a[2] * c[1] - a[1] * c[2]) / d,
            (a[1] * b[2] - a[2] * b[1]) / d,
        ],
        [
            (b[2] * c[0] - b[0] * c[2]) / d,
            (a[0] * c[2] - a[2] * c[0]) / d,
            (a[2] * b[0] - a[0] * b[2]) / d,
        ],
        [
            (b[0] * c[1] - b[1] * c[0]) / d,
            (a[1] * c[0] - a[0] * c[1]) / d,
            (a[0] * b[1] - a[1] * b[0]) / d,
        ],
    ]
}

/// Otsu's threshold over the finite values.
fn otsu(values: &[f32]) -> Option<f32> {
    let finite: Vec<f32> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.len() < 64 {
        return None;
    }
    let (lo, hi) = finite
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    if hi - lo < 1e-6 {
        return None;
    }
    const BINS: usize = 256;
    let mut hist = [0usize; BINS];
    for &v in &finite {
        hist[(((v - lo) / (hi - lo)) * (BINS - 1) as f32) as usize] += 1;
    }
    let total = finite.len() as f64;
    let sum: f64 = hist
        .iter()
        .enumerate()
        .map(|(i, &c)| i as f64 * c as f64)
        .sum();
    let (mut w0, mut sum0, mut best, mut best_t) = (0.0, 0.0, -1.0, 0);
    for (t, &c) in hist.iter().enumerate() {
        w0 += c as f64;
        sum0 += t as f64 * c as f64;
        let w1 = total - w0;
        if w0 == 0.0 || w1 == 0.0 {
            continue;
        }
        let (m0, m1) = (sum0 / w0, (sum - sum0) / w1);
        let between = w0 * w1 * (m0 - m1).powi(2);
        if between > best {
            best = between;
            best_t = t;
        }
    }
    Some(lo + (hi - lo) * (best_t as f32 + 0.5) / (BINS - 1) as f32)
}

/// Reads the pixel size of an H&E image from its nuclei; None when it finds too few.
pub fn measure(img: &RgbImage) -> Option<RulerReading> {
    measure_crops(std::slice::from_ref(img))
}

/// Reads the pixel size from the nuclei of several crops of one image, pooled.
pub fn measure_crops(crops: &[RgbImage]) -> Option<RulerReading> {
    let diameters: Vec<(f64, f64)> = crops.iter().flat_map(nuclei).collect();
    reading(diameters)
}

/// (equivalent diameter, area) in pixels of the round, solid nuclei of an image.
fn nuclei(img: &RgbImage) -> Vec<(f64, f64)> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let hem = hematoxylin(img);
    let Some(t) = otsu(&hem) else {
        return Vec::new();
    };
    let mask: Vec<bool> = hem.iter().map(|&v| v.is_finite() && v > t).collect();
    blobs(&mask, w, h)
        .1
        .into_iter()
        // Round and solid: a blob filling most of its box, not elongated; specks and clumps out.
        .filter(|b| !b.touches_edge && b.fill() >= 0.5 && b.elongation() <= 2.5 && b.area >= 6)
        .map(|b| (b.diameter(), b.area as f64))
        .collect()
}

/// A 4-connected component of a mask.
#[derive(Debug, Clone, Copy)]
pub(super) struct Blob {
    pub area: usize,
    /// Bounding box: first and last column and row.
    pub x: (usize, usize),
    pub y: (usize, usize),
    pub touches_edge: bool,
}

impl Blob {
    fn size(&self) -> (f64, f64) {
        (
            (self.x.1 - self.x.0 + 1) as f64,
            (self.y.1 - self.y.0 + 1) as f64,
        )
    }

    /// The share of its bounding box it fills.
    pub fn fill(&self) -> f64 {
        let (bw, bh) = self.size();
        self.area as f64 / (bw * bh)
    }

    /// The long side of its bounding box over the short.
    pub fn elongation(&self) -> f64 {
        let (bw, bh) = self.size();
        bw.max(bh) / bw.min(bh)
    }

    /// The diameter of a disc of its area.
    pub fn diameter(&self) -> f64 {
        2.0 * (self.area as f64 / std::f64::consts::PI).sqrt()
    }
}

/// The 4-connected components of `mask` (`w` x `h`, row-major): each pixel's component number
/// (0 off the mask, n for `blobs[n - 1]`) and the components.
pub(super) fn blobs(mask: &[bool], w: usize, h: usize) -> (Vec<u32>, Vec<Blob>) {
    let mut label = vec![0u32; w * h];
    let mut found = Vec::new();
    let mut stack = Vec::new();
    for start in 0..w * h {
        if !mask[start] || label[start] != 0 {
            continue;
        }
        let id = found.len() as u32 + 1;
        label[start] = id;
        stack.push(start);
        let mut b = Blob {
            area: 0,
            x: (usize::MAX, 0),
            y: (usize::MAX, 0),
            touches_edge: false,
        };
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            b.area += 1;
            b.x = (b.x.0.min(x), b.x.1.max(x));
            b.y = (b.y.0.min(y), b.y.1.max(y));
            b.touches_edge |= x == 0 || y == 0 || x + 1 == w || y + 1 == h;
            let mut visit = |j: usize| {
                if mask[j] && label[j] == 0 {
                    label[j] = id;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        found.push(b);
    }
    (label, found)
}

fn reading(mut diameters: Vec<(f64, f64)>) -> Option<RulerReading> {
    if diameters.len() < MIN_NUCLEI {
        return None;
    }
    // The area-weighted median: chromatin specks are many but small.
    diameters.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = diameters.iter().map(|d| d.1).sum();
    let mut acc = 0.0;
    let diameter = diameters
        .iter()
        .find(|d| {
            acc += d.1;
            acc >= total / 2.0
        })
        .map_or(diameters[diameters.len() / 2].0, |d| d.0);
    let lower_bound = diameter < MIN_DIAMETER_PX;
    Some(RulerReading {
        mpp: NUCLEUS_UM / diameter.max(MIN_DIAMETER_PX),
        nuclei: diameters.len(),
        diameter_px: diameter,
        lower_bound,
        zoom: 1.0,
    })
}

/// Prior spreads (log2) of the network's estimate and of the ruler's reading.
pub const NETWORK_SIGMA: f64 = 0.5;
pub const RULER_SIGMA: f64 = 0.4;

/// The network's µm/px and the ruler's (where reliable) combined in log space, each weighted by
/// the inverse of its prior variance.
pub fn fuse(network_mpp: f64, ruler_mpp: Option<f64>) -> f64 {
    match ruler_mpp {
        Some(r) => {
            let (wn, wr) = (NETWORK_SIGMA.powi(-2), RULER_SIGMA.powi(-2));
            ((network_mpp.log2() * wn + r.log2() * wr) / (wn + wr)).exp2()
        }
        None => network_mpp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pink tissue with purple discs of a known diameter: the ruler reads the diameter back.
    fn synthetic(diameter: f64, spacing: u32) -> RgbImage {
        let side = spacing * 8;
        RgbImage::from_fn(side, side, |x, y| {
            let (cx, cy) = (
                (x / spacing) * spacing + spacing / 2,
                (y / spacing) * spacing + spacing / 2,
            );
            let d = ((f64::from(x) - f64::from(cx)).powi(2)
                + (f64::from(y) - f64::from(cy)).powi(2))
            .sqrt();
            if d <= diameter / 2.0 {
                image::Rgb([70, 40, 130])
            } else {
                image::Rgb([230, 160, 200])
            }
        })
    }

    #[test]
    fn reads_the_diameter_of_synthetic_nuclei() {
        for (diameter, spacing) in [(14.5, 40), (29.0, 64), (7.25, 20)] {
            let r = measure(&synthetic(diameter, spacing)).expect("a reading");
            assert_eq!(r.nuclei, 64);
            let mpp = NUCLEUS_UM / diameter;
            assert!(
                (r.mpp / mpp - 1.0).abs() < 0.1,
                "diameter {diameter}: read {} px, {} µm/px",
                r.diameter_px,
                r.mpp
            );
        }
        // Nuclei 3 px across: only a lower bound.
        let r = measure(&synthetic(3.0, 12)).expect("a reading");
        assert!(r.lower_bound && !r.reliable());
        // Glass alone: nothing to read.
        assert!(measure(&RgbImage::from_pixel(200, 200, image::Rgb([245, 245, 245]))).is_none());
    }

    #[test]
    fn a_reading_of_an_enlarged_image_is_a_reading_of_the_image() {
        // 2 µm/px nuclei (3.6 px) enlarged 4x: read at 0.5 µm/px, reported at 2, and reliable
        // because the image it measured was inside the range.
        let r = measure(&synthetic(14.5, 40)).expect("a reading");
        assert!(r.reliable() && (r.mpp - 0.5).abs() < 0.05, "{r:?}");
        let own = r.clone().of_zoomed(0.25);
        assert!((own.mpp - 4.0 * r.mpp).abs() < 1e-12, "{own:?}");
        assert!((own.diameter_px - r.diameter_px / 4.0).abs() < 1e-12);
        assert!(own.reliable() && own.mpp > RELIABLE_MPP.1);
        // Read as it is at 2 µm/px, the same value would be outside the range.
        assert!(!RulerReading { zoom: 1.0, ..own }.reliable());
    }
}
