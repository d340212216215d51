//! Estimates for whole images and slides: several crops on tissue are scored by the network and the
//! nuclei ruler, then read again (up to [`REFINEMENTS`] times) on the image resampled to where the
//! estimate so far puts it at [`REFINE_TARGET_MPP`]. The last reading is summarised by the median and
//! interquartile range (the uncertainty) of the crops; where the ruler reads inside its range the two
//! are fused (which measured better in leave-one-source-out evaluation) and a disagreement beyond
//! 1.5x is flagged. Where lone red blood cells are found their size is a third reading, shown and
//! checked against the estimate but not fused (too rare here to measure). A file's metadata, when
//! it states a pixel size, is compared with the estimate the same way for slides and snapshots.

use image::imageops::FilterType;
use image::{RgbImage, RgbaImage};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Serialize;

use super::model::{MagnificationModel, ModelError};
use super::red_cells::{self, RedCellReading};
use super::ruler::{RulerReading, fuse, measure_crops};
use crate::data::augment::{pad_to, to_rgb};
use crate::data::tissue::{background_fraction, background_fraction_rgb};
use crate::slide::{Slide, SlideError};

/// Crops with more background than this are skipped.
const MAX_BACKGROUND: f64 = 0.4;
/// A file's stated µm/px is flagged when the estimate differs from it by more than this.
pub const MISMATCH: f64 = 0.25;
/// The network and the nuclei ruler disagree beyond this factor.
pub const DISAGREEMENT: f64 = 1.5;

#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    /// 10 / `mpp`.
    pub magnification: f64,
    /// The estimate: the network's, fused with the nuclei ruler's where that reads inside its range.
    pub mpp: f64,
    /// The network's own estimate: the median over the crops.
    pub network_mpp: f64,
    /// What the nuclei of the same crops say.
    pub ruler: Option<RulerReading>,
    /// What lone red blood cells in the same crops say, where there are enough of them.
    pub red_cells: Option<RedCellReading>,
    /// The network and a reliable ruler reading differ by more than [`DISAGREEMENT`].
    pub disagreement: bool,
    /// Interquartile range of the crops' predictions, in magnification units.
    pub spread: f64,
    pub crops: usize,
    /// The crops' magnifications, as the image itself (read at [`Estimate::zoom`]).
    pub predictions: Vec<f64>,
    /// The first pass's, on the image as it is (the same as `predictions` when `zoom` is 1).
    pub first_pass: Vec<f64>,
    /// The estimate lies outside the magnifications the model was trained on.
    pub out_of_range: bool,
    /// µm/px of the image the final reading read over the image's own ([`next_zoom`]); 1
    /// when it read the image as it is.
    pub zoom: f64,
    pub warnings: Vec<String>,
}

impl Estimate {
    /// The readings behind the estimate, as `predict` and the window show them: "network 0.512,
    /// nuclei 0.498, 6 red cells 0.530 µm/px" (nuclei "≥ x" when only a lower bound, "(out of
    /// range)" outside the range where the ruler is fused).
    pub fn readings(&self) -> String {
        let nuclei = match &self.ruler {
            Some(r) if r.lower_bound => format!("≥ {:.2}", r.mpp),
            Some(r) if r.reliable() => format!("{:.3}", r.mpp),
            Some(r) => format!("{:.3} (out of range)", r.mpp),
            None => "-".into(),
        };
        let red = self.red_cells.as_ref().map_or(String::new(), |r| {
            format!(", {} red cells {:.3}", r.cells, r.mpp)
        });
        format!(
            "network {:.3}, nuclei {nuclei}{red} µm/px",
            self.network_mpp
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EstimateError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Slide(#[from] SlideError),
}

/// The `q` quantile of sorted values (linear interpolation), NaN for none.
pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Two readings of µm/px differ by more than [`DISAGREEMENT`] either way.
fn disagree(a: f64, b: f64) -> bool {
    (a / b).log2().abs() > DISAGREEMENT.log2()
}

/// The finite values, sorted.
fn sorted_finite(values: &[f64]) -> Vec<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    sorted
}

/// The estimate from the last reading of an image.
fn summarise(model: &MagnificationModel, reading: Reading, mut warnings: Vec<String>) -> Estimate {
    let Reading {
        zoom,
        predictions,
        ruler,
        red_cells,
        first_pass,
    } = reading;
    let sorted = sorted_finite(&predictions);
    let network = quantile(&sorted, 0.5);
    let spread = quantile(&sorted, 0.75) - quantile(&sorted, 0.25);
    let invalid = !(network.is_finite() && network > 0.0);
    if invalid {
        warnings.push("the model's output is not a valid magnification".into());
    }
    let network_mpp = 10.0 / network;
    let reliable = ruler.as_ref().filter(|r| r.reliable()).map(|r| r.mpp);
    let disagreement = !invalid && reliable.is_some_and(|r| disagree(network_mpp, r));
    if let (true, Some(r)) = (disagreement, reliable) {
        warnings.push(format!(
            "the network ({network_mpp:.3} µm/px) and the size of the nuclei ({r:.3} µm/px) \
             disagree by more than {DISAGREEMENT}x: check the scale by hand"
        ));
    }
    let mpp = if invalid {
        network_mpp
    } else {
        fuse(network_mpp, reliable)
    };
    if let Some(r) = red_cells.as_ref().filter(|r| disagree(mpp, r.mpp)) {
        warnings.push(format!(
            "the estimate ({mpp:.3} µm/px) and the size of {} red blood cells ({:.3} µm/px) \
             disagree by more than {DISAGREEMENT}x: check the scale by hand",
            r.cells, r.mpp
        ));
    }
    let magnification = 10.0 / mpp;
    let out_of_range = invalid
        || model
            .range()
            .is_some_and(|(a, b)| magnification < a * 0.9 || magnification > b * 1.1);
    if out_of_range
        && !invalid
        && let Some((a, b)) = model.range()
    {
        warnings.push(format!(
            "{magnification:.1}x is outside the range the model was trained on ({a:.0}x-{b:.0}x)"
        ));
    }
    Estimate {
        magnification,
        mpp,
        network_mpp,
        ruler,
        red_cells,
        disagreement,
        spread,
        crops: predictions.len(),
        first_pass,
        predictions,
        out_of_range,
        zoom,
        warnings,
    }
}

/// The crops an image is scored on: a centred grid of `size` squares (the image padded with white when
/// smaller), those with the least background first, at most `max_crops` of those on tissue (3 when none
/// is), with the warnings that go with them.
#[derive(Debug, Clone)]
pub struct CropPlan {
    /// The (padded) image's size.
    pub size: [u32; 2],
    /// Top-left corners of the crops.
    pub corners: Vec<[u32; 2]>,
    pub crops: Vec<RgbImage>,
    pub warnings: Vec<String>,
}

pub fn plan_crops(img: &RgbaImage, size: u32, max_crops: usize) -> CropPlan {
    plan_rgb_crops(&to_rgb(img), size, max_crops, size)
}

/// [`plan_crops`] of an RGB image, with crops every `step` pixels (overlapping when `step` < `size`).
fn plan_rgb_crops(rgb: &RgbImage, size: u32, max_crops: usize, step: u32) -> CropPlan {
    let step = step.clamp(1, size);
    let mut warnings = Vec::new();
    let padded;
    let rgb = if rgb.width() < size || rgb.height() < size {
        warnings.push(format!(
            "the image ({}x{} px) is smaller than the model's {size} px input: padded with white, \
             the estimate is less reliable",
            rgb.width(),
            rgb.height()
        ));
        padded = pad_to(rgb, size);
        &padded
    } else {
        rgb
    };
    let (w, h) = rgb.dimensions();
    let (nx, ny) = ((w - size) / step + 1, (h - size) / step + 1);
    // Centre the grid of crops on the image.
    let (ox, oy) = (
        (w - (nx - 1) * step - size) / 2,
        (h - (ny - 1) * step - size) / 2,
    );
    let mut cells: Vec<(f64, u32, u32)> = (0..ny)
        .flat_map(|j| (0..nx).map(move |i| (ox + i * step, oy + j * step)))
        .map(|(x, y)| {
            let crop = image::imageops::crop_imm(rgb, x, y, size, size).to_image();
            (background_fraction_rgb(&crop), x, y)
        })
        .collect();
    cells.sort_by(|a, b| a.0.total_cmp(&b.0));
    let on_tissue = cells.iter().filter(|c| c.0 <= MAX_BACKGROUND).count();
    let take = if on_tissue == 0 {
        warnings.push("little tissue in the image: the estimate is unreliable".into());
        cells.len().min(3)
    } else {
        on_tissue.min(max_crops.max(1))
    };
    let corners: Vec<[u32; 2]> = cells[..take].iter().map(|&(_, x, y)| [x, y]).collect();
    let crops = corners
        .iter()
        .map(|&[x, y]| image::imageops::crop_imm(rgb, x, y, size, size).to_image())
        .collect();
    CropPlan {
        size: [w, h],
        corners,
        crops,
        warnings,
    }
}

/// Scores up to `max_crops` non-overlapping crops with the most tissue.
pub fn estimate_image(
    model: &MagnificationModel,
    img: &RgbaImage,
    max_crops: usize,
) -> Result<Estimate, EstimateError> {
    let size = model.input_size();
    let rgb = to_rgb(img);
    let plan = plan_rgb_crops(&rgb, size, max_crops, size);
    let min_side = rgb.width().min(rgb.height());
    let reading = refine(model, &plan.crops, min_side, |k| {
        // Half-overlapping crops: a shrunken image has few whole ones.
        Ok(plan_rgb_crops(&zoom_image(&rgb, k), size, max_crops, size / 2).crops)
    })?;
    Ok(summarise(model, reading, plan.warnings))
}

/// The network's and the ruler's reading of an image at one zoom.
struct Reading {
    /// µm/px of the image read over the image's own.
    zoom: f64,
    /// Magnifications of the image itself.
    predictions: Vec<f64>,
    ruler: Option<RulerReading>,
    red_cells: Option<RedCellReading>,
    first_pass: Vec<f64>,
}

/// Reads `crops` (the image as it is), then up to [`REFINEMENTS`] times the crops `zoomed(k)` of the
/// image at k times its µm/px, each k bringing the estimate so far to [`REFINE_TARGET_MPP`].
fn refine(
    model: &MagnificationModel,
    crops: &[RgbImage],
    min_side: u32,
    mut zoomed: impl FnMut(f64) -> Result<Vec<RgbImage>, EstimateError>,
) -> Result<Reading, EstimateError> {
    let first = model.predict(crops)?;
    let mut reading = Reading {
        zoom: 1.0,
        predictions: first.clone(),
        ruler: measure_crops(crops),
        red_cells: red_cells::measure_crops(crops),
        first_pass: first,
    };
    for _ in 0..REFINEMENTS {
        let Some(k) = next_zoom(
            &reading.predictions,
            reading.ruler.as_ref(),
            reading.zoom,
            min_side,
            model.input_size(),
        ) else {
            break;
        };
        let crops = zoomed(k)?;
        reading.ruler = measure_crops(&crops).map(|r| r.of_zoomed(k));
        // Enlarged, red specks of stroma grow to a red cell's size: red cells are read on the
        // image as it is or shrunk, never enlarged.
        if k >= 1.0 {
            reading.red_cells = red_cells::measure_crops(&crops)
                .map(|r| r.of_zoomed(k))
                .or(reading.red_cells.take());
        }
        reading.predictions = at_own_scale(model.predict(&crops)?, k);
        reading.zoom = k;
    }
    Ok(reading)
}

/// The network and the nuclei ruler read best near the pixel size most slides are scanned at: the
/// image is read again resampled to where the estimate so far puts it at this µm/px
/// (leave-one-source-out, pooled fused within ±25%: 58.3% read once, 70.5% with one more reading of
/// both, 72.7% with two; median |log2 error| 0.284, 0.215, 0.199).
pub const REFINE_TARGET_MPP: f64 = 0.5;
/// Readings after the first.
const REFINEMENTS: usize = 2;
/// A reading enlarges an image at most this much (coarse fields; beyond, nothing is gained).
const MAX_UPSAMPLE: f64 = 6.0;
/// An upsampled image keeps at most this many pixels a side (its central region).
const MAX_ZOOMED_SIDE: u32 = 2048;

/// The zoom k (µm/px of the resampled image over the image's own) of the next reading: the one
/// that brings the estimate so far (the network's median fused with a reliable ruler reading) to
/// [`REFINE_TARGET_MPP`]. None when the readings are invalid or k is within 5% of `current`.
/// Downsampling stops where the image would get smaller than `input`.
fn next_zoom(
    predictions: &[f64],
    ruler: Option<&RulerReading>,
    current: f64,
    min_side: u32,
    input: u32,
) -> Option<f64> {
    let network = quantile(&sorted_finite(predictions), 0.5);
    if !(network.is_finite() && network > 0.0) {
        return None;
    }
    let network_mpp = 10.0 / network;
    let mpp = fuse(network_mpp, ruler.filter(|r| r.reliable()).map(|r| r.mpp));
    let max_down = (f64::from(min_side) / f64::from(input)).max(1.0);
    let k = (REFINE_TARGET_MPP / mpp).clamp(1.0 / MAX_UPSAMPLE, max_down);
    ((k / current).log2().abs() >= 0.07).then_some(k)
}

/// The image at k times its µm/px: shrunk whole, or its central region enlarged to at most
/// [`MAX_ZOOMED_SIDE`] pixels a side.
fn zoom_image(rgb: &RgbImage, k: f64) -> RgbImage {
    let (w, h) = rgb.dimensions();
    let scaled = |v: u32| ((f64::from(v) / k).round() as u32).max(1);
    if k >= 1.0 {
        resample(rgb, scaled(w), scaled(h))
    } else {
        let side = |v: u32| ((f64::from(MAX_ZOOMED_SIDE) * k).floor() as u32).clamp(1, v);
        let (cw, ch) = (side(w), side(h));
        let centre = image::imageops::crop_imm(rgb, (w - cw) / 2, (h - ch) / 2, cw, ch).to_image();
        resample(&centre, scaled(cw), scaled(ch))
    }
}

/// `img` at `w` x `h`: area-averaged when shrinking (antialiased, as the training fields were
/// made), Catmull-Rom when enlarging.
fn resample(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    if w <= img.width() && h <= img.height() {
        crate::slide::resize_area_rgb(img, w, h)
    } else {
        image::imageops::resize(img, w, h, FilterType::CatmullRom)
    }
}

/// Magnifications read on an image zoomed by `k`, as magnifications of the image itself.
fn at_own_scale(predictions: Vec<f64>, k: f64) -> Vec<f64> {
    predictions.into_iter().map(|m| m * k).collect()
}

/// Snapshots larger than this are scored on their central region of this side.
pub const MAX_SNAPSHOT_SIDE: u32 = 4096;

/// A loose snapshot (opened as a [`Slide`]): its central region of at most
/// [`MAX_SNAPSHOT_SIDE`] pixels is scored, so that a huge image costs no more than a large one.
pub fn estimate_snapshot(
    model: &MagnificationModel,
    snapshot: &Slide,
    max_crops: usize,
) -> Result<Estimate, EstimateError> {
    let (w, h) = snapshot.info().dimensions();
    let (rw, rh) = (
        w.min(u64::from(MAX_SNAPSHOT_SIDE)) as u32,
        h.min(u64::from(MAX_SNAPSHOT_SIDE)) as u32,
    );
    let (x0, y0) = ((w - u64::from(rw)) / 2, (h - u64::from(rh)) / 2);
    let img = snapshot.read_region(0, x0 as i64, y0 as i64, rw, rh)?;
    estimate_image(model, &img, max_crops)
}

/// An estimate against the pixel size the file states (a slide's scanner metadata, a snapshot's
/// resolution tags, pHYs or OME-XML): one comparison for every kind of file.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub estimate: Estimate,
    /// µm/px the file states, if any.
    pub metadata_mpp: Option<f64>,
    /// Where `metadata_mpp` comes from.
    pub metadata_source: Option<crate::slide::MppSource>,
    /// (estimate − metadata) / metadata, on µm/px; None when there is nothing to compare with.
    pub relative_difference: Option<f64>,
    /// The difference exceeds [`MISMATCH`] (false when nothing was compared).
    pub mismatch: bool,
}

impl Check {
    /// Whether a comparison was made and found the two within [`MISMATCH`].
    pub fn agrees(&self) -> bool {
        self.relative_difference.is_some() && !self.mismatch
    }

    /// "0.312 µm/px (PNG pHYs chunk): the estimate is 70% larger, MISMATCH", "… agrees (+4%)", or
    /// None without metadata.
    pub fn describe(&self) -> Option<String> {
        let (m, d) = (self.metadata_mpp?, self.relative_difference?);
        let source = self
            .metadata_source
            .map_or(String::new(), |s| format!(" ({})", s.label()));
        Some(if self.mismatch {
            format!(
                "{m:.3} µm/px{source}: the estimate differs by {:+.0}%, MISMATCH",
                100.0 * d
            )
        } else {
            format!("{m:.3} µm/px{source}: agrees ({:+.0}%)", 100.0 * d)
        })
    }
}

/// The check of any opened file: [`check_slide`] for a slide, [`check_snapshot`] for a snapshot.
pub fn check_file(
    model: &MagnificationModel,
    file: &Slide,
    max_crops: usize,
) -> Result<Check, EstimateError> {
    if file.info().is_whole_slide() {
        check_slide(model, file, max_crops, 0)
    } else {
        check_snapshot(model, file, max_crops)
    }
}

/// Estimates a snapshot ([`estimate_snapshot`]) and compares it with the pixel size it states.
pub fn check_snapshot(
    model: &MagnificationModel,
    snapshot: &Slide,
    max_crops: usize,
) -> Result<Check, EstimateError> {
    let e = estimate_snapshot(model, snapshot, max_crops)?;
    Ok(compare(e, snapshot.info().mpp))
}

/// Reads up to `max_crops` level-0 crops on tissue (found on a thumbnail), estimates the
/// magnification and compares it with the metadata.
pub fn check_slide(
    model: &MagnificationModel,
    slide: &Slide,
    max_crops: usize,
    seed: u64,
) -> Result<Check, EstimateError> {
    let size = model.input_size();
    let info = slide.info();
    let (w, h) = info.dimensions();
    let mut warnings = Vec::new();
    let mut crops = Vec::new();
    if w < u64::from(size) || h < u64::from(size) {
        let img = slide.read_region(0, 0, 0, w as u32, h as u32)?;
        let e = estimate_image(model, &img, max_crops)?;
        return Ok(compare(e, info.mpp));
    }
    let thumb = slide.thumbnail(1024)?;
    let sx = w as f64 / f64::from(thumb.width());
    let sy = h as f64 / f64::from(thumb.height());
    // Candidate crops on a grid of the level 0, kept where the thumbnail shows tissue.
    let mut candidates = Vec::new();
    let mut y = 0u64;
    while y + u64::from(size) <= h {
        let mut x = 0u64;
        while x + u64::from(size) <= w {
            let (tx, ty) = ((x as f64 / sx) as u32, (y as f64 / sy) as u32);
            let tw = ((f64::from(size) / sx).ceil() as u32).max(1);
            let th = ((f64::from(size) / sy).ceil() as u32).max(1);
            let cell = image::imageops::crop_imm(&thumb, tx, ty, tw, th).to_image();
            if background_fraction(&cell) <= MAX_BACKGROUND {
                candidates.push((x, y));
            }
            x += u64::from(size);
        }
        y += u64::from(size);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    candidates.shuffle(&mut rng);
    let mut corners = Vec::new();
    for &(x, y) in &candidates {
        if crops.len() >= max_crops {
            break;
        }
        let region = slide.read_region(0, x as i64, y as i64, size, size)?;
        if background_fraction(&region) <= MAX_BACKGROUND {
            crops.push(to_rgb(&region));
            corners.push((x, y));
        }
    }
    if crops.is_empty() {
        warnings.push("no tissue found at level 0: estimated on the slide's centre".into());
        let (cx, cy) = ((w - u64::from(size)) / 2, (h - u64::from(size)) / 2);
        crops.push(to_rgb(
            &slide.read_region(0, cx as i64, cy as i64, size, size)?,
        ));
        corners.push((cx, cy));
    }
    let min_side = w.min(h).min(u64::from(u32::MAX)) as u32;
    let reading = refine(model, &crops, min_side, |k| {
        // The same places, each read over k times the field and resampled to the input.
        let side = (f64::from(size) * k).round().max(1.0) as u32;
        let c = |v: u64| v as i64 + i64::from(size / 2) - i64::from(side / 2);
        corners
            .iter()
            .map(|&(x, y)| {
                let region = to_rgb(&slide.read_region(0, c(x), c(y), side, side)?);
                Ok(resample(&region, size, size))
            })
            .collect()
    })?;
    Ok(compare(summarise(model, reading, warnings), info.mpp))
}

/// The one comparison of an estimate with a stated pixel size (a hand calibration is not metadata).
fn compare(estimate: Estimate, stated: Option<crate::slide::Mpp>) -> Check {
    let stated = stated.filter(|m| m.source != crate::slide::MppSource::User);
    let metadata_mpp = stated.map(|m| m.mean());
    let relative_difference = metadata_mpp
        .filter(|_| estimate.mpp.is_finite())
        .map(|m| (estimate.mpp - m) / m);
    Check {
        mismatch: relative_difference.is_some_and(|d| d.abs() > MISMATCH),
        estimate,
        metadata_mpp,
        metadata_source: stated.map(|m| m.source),
        relative_difference,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_say_what_each_ruler_read() {
        let ruler = |mpp, lower_bound| RulerReading {
            mpp,
            nuclei: 40,
            diameter_px: 7.25 / mpp,
            lower_bound,
            zoom: 1.0,
        };
        let mut e = Estimate {
            magnification: 20.0,
            mpp: 0.5,
            network_mpp: 0.512,
            ruler: Some(ruler(0.498, false)),
            red_cells: Some(RedCellReading {
                mpp: 0.53,
                cells: 6,
                diameter_px: 13.2,
                zoom: 1.0,
            }),
            disagreement: false,
            spread: 1.0,
            crops: 16,
            predictions: Vec::new(),
            first_pass: Vec::new(),
            out_of_range: false,
            zoom: 1.0,
            warnings: Vec::new(),
        };
        assert_eq!(
            e.readings(),
            "network 0.512, nuclei 0.498, 6 red cells 0.530 µm/px"
        );
        e.red_cells = None;
        e.ruler = Some(ruler(1.9, true));
        assert_eq!(e.readings(), "network 0.512, nuclei ≥ 1.90 µm/px");
        e.ruler = Some(ruler(0.2, false));
        assert_eq!(
            e.readings(),
            "network 0.512, nuclei 0.200 (out of range) µm/px"
        );
        e.ruler = None;
        assert_eq!(e.readings(), "network 0.512, nuclei - µm/px");
    }

    #[test]
    fn quantiles() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile(&v, 0.5), 3.0);
        assert_eq!(quantile(&v, 0.25), 2.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn each_reading_brings_the_image_toward_the_target_scale() {
        // Read at 40x (0.25 µm/px) on a large image: read again at twice the µm/px.
        let k = next_zoom(&[40.0, 40.0, f64::NAN], None, 1.0, 2000, 224).unwrap();
        assert!((k - 2.0).abs() < 1e-9, "{k}");
        // A small image is not shrunk below the input size.
        let k = next_zoom(&[40.0], None, 1.0, 300, 224).unwrap();
        assert!((k - 300.0 / 224.0).abs() < 1e-9, "{k}");
        // 2.5x (4 µm/px) is enlarged, at most MAX_UPSAMPLE times.
        let k = next_zoom(&[2.5], None, 1.0, 2000, 224).unwrap();
        assert!((k - 1.0 / MAX_UPSAMPLE).abs() < 1e-9, "{k}");
        // A reliable ruler reading moves the estimate the zoom is chosen by (fused in log space).
        let ruler = RulerReading {
            mpp: 1.0,
            nuclei: 50,
            diameter_px: 7.25,
            lower_bound: false,
            zoom: 1.0,
        };
        let k = next_zoom(&[10.0], Some(&ruler), 1.0, 2000, 224).unwrap();
        assert!((k - 0.5).abs() < 1e-9, "{k}");
        let k = next_zoom(&[20.0], Some(&ruler), 1.0, 2000, 224).unwrap();
        assert!(
            (REFINE_TARGET_MPP / k - fuse(0.5, Some(1.0))).abs() < 1e-9,
            "{k}"
        );
        // Near the zoom already read, or with nothing valid, no further reading.
        assert!(next_zoom(&[20.5], None, 1.0, 2000, 224).is_none());
        assert!(next_zoom(&[40.0], None, 2.0 * 1.02, 2000, 224).is_none());
        assert_eq!(next_zoom(&[20.0], None, 2.0, 2000, 224), Some(1.0));
        assert!(next_zoom(&[f64::NAN, -1.0], None, 1.0, 2000, 224).is_none());
        // The zoomed image's size follows k, and a magnification read on it is the image's times k.
        let img = RgbImage::from_pixel(400, 300, image::Rgb([200, 100, 150]));
        assert_eq!(zoom_image(&img, 2.0).dimensions(), (200, 150));
        assert_eq!(zoom_image(&img, 0.5).dimensions(), (800, 600));
        // Enlarging keeps the central region of at most MAX_ZOOMED_SIDE pixels a side.
        assert_eq!(zoom_image(&img, 0.125).dimensions(), (2048, 2048));
        assert_eq!(at_own_scale(vec![20.0], 2.0), vec![40.0]);
    }

    #[test]
    fn crops_follow_the_least_background() {
        // A 2x1 grid of 4 px cells on a 10x5 image: the right cell holds tissue, the left glass.
        let mut img = RgbaImage::from_pixel(10, 5, image::Rgba([245, 245, 245, 255]));
        for x in 5..10 {
            for y in 0..5 {
                img.put_pixel(x, y, image::Rgba([150, 80, 160, 255]));
            }
        }
        let plan = plan_crops(&img, 4, 16);
        assert_eq!(plan.size, [10, 5]);
        assert_eq!(plan.corners, vec![[5, 0]]);
        assert_eq!(plan.crops.len(), 1);
        assert!(plan.warnings.is_empty());
    }
}
