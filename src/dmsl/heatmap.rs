//! Slide heatmaps of a DMSL model: the slide's level 0 is cut into a grid of square fields (the model's
//! field of view), background fields are skipped, and tissue fields are classified in batches nearest
//! the point of interest first (the view's centre in the window). Results live in a sidecar file
//! (safetensors: probabilities and cell states, with the slide, model and grid in the header) that is
//! saved as the work goes, so a cancelled run resumes where it stopped and a finished one is reused.
//! Exports: PNG with a legend, `.npy` (rows, cols, classes), GeoJSON tiles for QuPath.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use image::{RgbImage, RgbaImage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::model::{DmslModel, ModelError};
use crate::data::pairs::{Region, read_field};
use crate::data::tissue::{background_fraction, background_fraction_rgb};
use crate::slide::{Slide, SlideError};
use crate::util::colormap::Colormap;
use crate::util::fs::write_atomic;

/// A cell's state in the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CellState {
    Pending = 0,
    Background = 1,
    Done = 2,
}

impl CellState {
    fn from_u8(v: u8) -> Option<CellState> {
        match v {
            0 => Some(CellState::Pending),
            1 => Some(CellState::Background),
            2 => Some(CellState::Done),
            _ => None,
        }
    }
}

/// Square cells of `cell` level-0 pixels covering the slide (the last row and column may overhang).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeatmapGrid {
    pub cell: f64,
    pub cols: u32,
    pub rows: u32,
}

impl HeatmapGrid {
    pub fn new((w, h): (u64, u64), cell: f64) -> Self {
        let n = |len: u64| ((len as f64 / cell).ceil() as u32).max(1);
        HeatmapGrid {
            cell,
            cols: n(w),
            rows: n(h),
        }
    }

    pub fn len(&self) -> usize {
        self.cols as usize * self.rows as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Level-0 top-left corner of cell `i`.
    pub fn origin(&self, i: usize) -> (f64, f64) {
        let (c, r) = (i % self.cols as usize, i / self.cols as usize);
        (c as f64 * self.cell, r as f64 * self.cell)
    }

    /// The cell under a level-0 point.
    pub fn cell_at(&self, x: f64, y: f64) -> Option<usize> {
        if x < 0.0 || y < 0.0 {
            return None;
        }
        let (c, r) = ((x / self.cell) as u32, (y / self.cell) as u32);
        (c < self.cols && r < self.rows).then(|| (r * self.cols + c) as usize)
    }
}

/// What identifies a heatmap: a sidecar made for another slide, model or grid is not reused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeatmapHeader {
    pub slide: String,
    /// The slide file's size and modification time ([`slide_version`]): a file replaced under the
    /// same name (re-exported, re-scanned, truncated) gets a fresh heatmap.
    #[serde(default)]
    pub slide_version: String,
    /// FNV-1a of the model file's bytes.
    pub model_id: String,
    pub classes: Vec<String>,
    /// Level-0 µm/px the grid was laid with.
    pub mpp: f64,
    pub field_um: f64,
    pub grid: HeatmapGrid,
}

#[derive(Debug, Clone)]
pub struct Heatmap {
    pub header: HeatmapHeader,
    pub state: Vec<CellState>,
    /// `grid.len() * classes` probabilities, NaN where no result is known.
    pub probs: Vec<f32>,
}

/// A labelled region's vote in [`Heatmap::region_votes`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegionVote {
    /// The region's class.
    pub class: String,
    /// The class most of its fields are given (None: no classified field in it).
    pub majority: Option<String>,
    /// Classified fields of the region (see [`Heatmap::region_votes`]).
    pub fields: usize,
    /// Share of those fields that give the majority class.
    pub share: f64,
}

impl RegionVote {
    pub fn is_right(&self) -> bool {
        self.majority.as_deref() == Some(self.class.as_str())
    }
}

/// Equal when made for the same slide, model and grid and holding the same results (NaN equals NaN:
/// it means "unknown").
impl PartialEq for Heatmap {
    fn eq(&self, other: &Self) -> bool {
        self.header == other.header
            && self.state == other.state
            && self.probs.len() == other.probs.len()
            && self
                .probs
                .iter()
                .zip(&other.probs)
                .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HeatmapError {
    #[error(transparent)]
    Slide(#[from] SlideError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("model error: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error(
        "{}: its µm/px is unknown; calibrate it (or pass --mpp) before computing a heatmap",
        .0.display()
    )]
    NoMpp(PathBuf),
    #[error("{}: {message}", path.display())]
    Sidecar { path: PathBuf, message: String },
    #[error("cannot write {}: {message}", path.display())]
    Write { path: PathBuf, message: String },
}

/// A file's size and modification time ([`crate::util::fs::file_version`]), "" when they cannot be
/// read.
pub fn slide_version(path: &Path) -> String {
    crate::util::fs::file_version(path).map_or_else(String::new, |(len, modified)| {
        format!("{len} bytes, modified {modified}")
    })
}

/// FNV-1a 64 of bytes, as 16 hex digits: a stable identity for a model file.
pub fn content_id(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

const SIDECAR_KEY: &str = "histolens-heatmap";

impl Heatmap {
    pub fn new(header: HeatmapHeader) -> Self {
        let n = header.grid.len();
        let k = header.classes.len();
        Heatmap {
            header,
            state: vec![CellState::Pending; n],
            probs: vec![f32::NAN; n * k],
        }
    }

    pub fn classes(&self) -> usize {
        self.header.classes.len()
    }

    /// The probabilities of a finished cell.
    pub fn probs_at(&self, cell: usize) -> Option<&[f32]> {
        let k = self.classes();
        (self.state.get(cell) == Some(&CellState::Done))
            .then(|| &self.probs[cell * k..(cell + 1) * k])
    }

    pub fn count(&self, state: CellState) -> usize {
        self.state.iter().filter(|&&s| s == state).count()
    }

    pub fn is_complete(&self) -> bool {
        self.count(CellState::Pending) == 0
    }

    /// How the classified fields of each labelled region vote: the most frequent most-probable class
    /// against the region's own (e.g. the cells of a mosaic of known classes). A region's fields are
    /// those wholly inside it, as training fields are cut; a region too small for any, those whose
    /// centres lie in it.
    pub fn region_votes(&self, regions: &[Region]) -> Vec<RegionVote> {
        let g = self.header.grid;
        regions
            .iter()
            .map(|region| {
                let count = |inside: &dyn Fn(f64, f64) -> bool| {
                    let mut votes = vec![0usize; self.classes()];
                    let mut any = false;
                    for cell in 0..g.len() {
                        let (x, y) = g.origin(cell);
                        if inside(x, y) {
                            any = true;
                            if let Some(p) = self.probs_at(cell) {
                                votes[crate::dmsl::metrics::argmax(p)] += 1;
                            }
                        }
                    }
                    any.then_some(votes)
                };
                let votes = count(&|x, y| region.contains_square(x, y, g.cell))
                    .or_else(|| count(&|x, y| region.contains(x + g.cell / 2.0, y + g.cell / 2.0)))
                    .unwrap_or_else(|| vec![0; self.classes()]);
                let fields: usize = votes.iter().sum();
                let best = (0..votes.len()).max_by_key(|&c| (votes[c], std::cmp::Reverse(c)));
                let majority = best.filter(|_| fields > 0);
                RegionVote {
                    class: region.class.clone(),
                    majority: majority.map(|c| self.header.classes[c].clone()),
                    fields,
                    share: majority.map_or(0.0, |c| votes[c] as f64 / fields as f64),
                }
            })
            .collect()
    }

    /// The sidecar's bytes: safetensors with `probs` (rows, cols, classes) f32 and `state` (rows, cols)
    /// u8, and the header as JSON metadata.
    pub fn to_bytes(&self) -> Result<Vec<u8>, HeatmapError> {
        let g = self.header.grid;
        let (r, c, k) = (g.rows as usize, g.cols as usize, self.classes());
        let probs = Tensor::from_slice(&self.probs, (r, c, k), &Device::Cpu)?;
        let state: Vec<u8> = self.state.iter().map(|&s| s as u8).collect();
        let state = Tensor::from_vec(state, (r, c), &Device::Cpu)?;
        let json = serde_json::to_string(&self.header).map_err(|e| HeatmapError::Sidecar {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        let meta = HashMap::from([(SIDECAR_KEY.to_string(), json)]);
        safetensors::serialize([("probs", &probs), ("state", &state)], Some(meta)).map_err(|e| {
            HeatmapError::Sidecar {
                path: PathBuf::new(),
                message: e.to_string(),
            }
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
        let json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(SIDECAR_KEY))
            .ok_or("not a histolens heatmap")?;
        let header: HeatmapHeader = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let n = header.grid.len();
        let k = header.classes.len();
        let state = st.tensor("state").map_err(|e| e.to_string())?;
        let probs = st.tensor("probs").map_err(|e| e.to_string())?;
        let shape_ok = state.dtype() == safetensors::Dtype::U8
            && state.data().len() == n
            && probs.dtype() == safetensors::Dtype::F32
            && probs.data().len() == n * k * 4;
        if !shape_ok {
            return Err("the heatmap's tensors do not match its grid".into());
        }
        let state = state
            .data()
            .iter()
            .map(|&v| CellState::from_u8(v).ok_or("a cell state is invalid"))
            .collect::<Result<Vec<_>, _>>()?;
        let probs: Vec<f32> = probs
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(Heatmap {
            header,
            state,
            probs,
        })
    }

    pub fn save(&self, path: &Path) -> Result<(), HeatmapError> {
        let bytes = self.to_bytes()?;
        write_atomic(path, &bytes).map_err(|e| HeatmapError::Write {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// The sidecar at `path` when it exists and was made for `header`; None when absent or stale.
    pub fn load_matching(
        path: &Path,
        header: &HeatmapHeader,
    ) -> Result<Option<Self>, HeatmapError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(HeatmapError::Sidecar {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                });
            }
        };
        match Heatmap::from_bytes(&bytes) {
            Ok(h) if h.header == *header => Ok(Some(h)),
            Ok(_) => Ok(None),
            Err(message) => {
                log::warn!(
                    "ignoring the unreadable heatmap {}: {message}",
                    path.display()
                );
                Ok(None)
            }
        }
    }

    /// NumPy `.npy` of the probabilities, (rows, cols, classes) little-endian f32; NaN off tissue.
    pub fn to_npy(&self) -> Vec<u8> {
        let g = self.header.grid;
        let k = self.classes();
        let values = self.state.iter().enumerate().flat_map(|(cell, s)| {
            let done = *s == CellState::Done;
            (0..k).map(move |c| {
                if done {
                    self.probs[cell * k + c]
                } else {
                    f32::NAN
                }
            })
        });
        crate::util::npy::f32_npy(&[g.rows as usize, g.cols as usize, k], values)
    }

    /// GeoJSON tiles in level-0 pixels (QuPath's coordinates): one Polygon feature per classified cell,
    /// classified as its most probable class, with every probability as a measurement.
    pub fn to_geojson(&self) -> serde_json::Value {
        let g = self.header.grid;
        let features: Vec<serde_json::Value> = (0..g.len())
            .filter_map(|cell| {
                let p = self.probs_at(cell)?;
                let best = super::metrics::argmax(p);
                let (x, y) = g.origin(cell);
                let s = g.cell;
                let ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]];
                let measurements: serde_json::Map<String, serde_json::Value> = self
                    .header
                    .classes
                    .iter()
                    .zip(p)
                    .map(|(c, &v)| (format!("probability: {c}"), serde_json::json!(v)))
                    .collect();
                Some(serde_json::json!({
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [ring]},
                    "properties": {
                        "objectType": "tile",
                        "classification": {"name": self.header.classes[best]},
                        "class": self.header.classes[best],
                        "probability": p[best],
                        "measurements": measurements,
                    }
                }))
            })
            .collect();
        serde_json::json!({"type": "FeatureCollection", "features": features})
    }

    /// One class's probabilities as an image of `px` pixels per cell, over the slide's thumbnail when
    /// given, with a colour bar and the class name below.
    pub fn to_png(
        &self,
        class: usize,
        map: Colormap,
        px: u32,
        under: Option<&RgbaImage>,
    ) -> RgbaImage {
        let g = self.header.grid;
        let (w, h) = (g.cols * px, g.rows * px);
        let legend_h = 46;
        let mut img =
            RgbaImage::from_pixel(w.max(220), h + legend_h, image::Rgba([255, 255, 255, 255]));
        if let Some(t) = under {
            let t = image::imageops::resize(t, w, h, image::imageops::FilterType::Triangle);
            image::imageops::overlay(&mut img, &t, 0, 0);
        }
        let k = self.classes();
        for cell in 0..g.len() {
            if self.state[cell] != CellState::Done {
                continue;
            }
            let v = self.probs[cell * k + class.min(k - 1)];
            let [r, gg, b] = map.rgb8(v);
            let (cx, cy) = ((cell as u32 % g.cols) * px, (cell as u32 / g.cols) * px);
            for y in cy..cy + px {
                for x in cx..cx + px {
                    let p = img.get_pixel_mut(x, y);
                    // 70% opaque over the thumbnail.
                    let a = if under.is_some() { 0.7 } else { 1.0 };
                    for (c, v) in [r, gg, b].into_iter().enumerate() {
                        p.0[c] = (f32::from(v) * a + f32::from(p.0[c]) * (1.0 - a)).round() as u8;
                    }
                }
            }
        }
        let name = self.header.classes.get(class).map_or("", String::as_str);
        crate::util::legend::draw_colour_bar(&mut img, h + 4, map, &format!("P({name})"));
        img
    }
}

/// Where a slide's heatmap for a model is kept: in `cache_dir`/heatmaps (named after the slide and
/// its canonical path), or beside the slide when the user asks for sidecars (`beside_slide`) and its
/// folder can be written.
pub fn sidecar_path(slide: &Path, model_id: &str, cache_dir: &Path, beside_slide: bool) -> PathBuf {
    let name = slide
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "slide".into());
    let file = format!(
        "{name}.{}.heatmap.safetensors",
        &model_id[..model_id.len().min(12)]
    );
    match slide.parent().filter(|d| beside_slide && writable(d)) {
        Some(d) => d.join(file),
        None => {
            let abs = std::fs::canonicalize(slide).unwrap_or_else(|_| slide.to_path_buf());
            let tag = content_id(abs.to_string_lossy().as_bytes());
            cache_dir
                .join("heatmaps")
                .join(format!("{}-{file}", &tag[..8]))
        }
    }
}

fn writable(dir: &Path) -> bool {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    tempfile::NamedTempFile::new_in(dir).is_ok()
}

/// Settings of a heatmap computation.
#[derive(Debug, Clone)]
pub struct HeatmapOptions {
    pub batch: usize,
    /// A field with more background than this is skipped.
    pub max_background: f64,
    /// How often the sidecar is saved while computing.
    pub save_every: Duration,
}

impl Default for HeatmapOptions {
    fn default() -> Self {
        HeatmapOptions {
            batch: 8,
            max_background: 0.8,
            save_every: Duration::from_secs(5),
        }
    }
}

/// How much a slide's fields may be enlarged to feed a model that wants a finer magnification: up to
/// 2x the heatmap still follows the tissue, with a warning; beyond it the model sees mostly blur.
pub const MAX_UPSAMPLE: f64 = 2.0;

/// Slack on the magnification before a field counts as upsampled (scanners round their µm/px).
const SLACK: f64 = 1.02;

/// Whether fields of a slide at `mpp` µm/px can feed a model whose finer branch wants
/// `high_magnification`: `Ok(None)` at native resolution or finer, `Ok(Some(warning))` when they are
/// upsampled up to [`MAX_UPSAMPLE`], `Err(why)` beyond.
pub fn field_scale(mpp: f64, high_magnification: f64) -> Result<Option<String>, String> {
    let native = 10.0 / mpp;
    let factor = high_magnification / native;
    if factor <= SLACK {
        Ok(None)
    } else if factor <= MAX_UPSAMPLE * SLACK {
        Ok(Some(format!(
            "this slide is {native:.1}x ({mpp:.3} µm/px), the model wants {high_magnification}x \
             fields: they are upsampled {factor:.2}x, so fine detail is missing and the model's \
             output is less reliable"
        )))
    } else {
        Err(format!(
            "this slide is {native:.1}x ({mpp:.3} µm/px): too coarse for the model, which needs \
             {high_magnification}x fields (upsampling {factor:.1}x; at most {MAX_UPSAMPLE}x is allowed)"
        ))
    }
}

/// A heatmap's header for a slide and model.
pub fn header_for(slide: &Slide, mpp: f64, model: &DmslModel, model_id: &str) -> HeatmapHeader {
    let g = model.geometry();
    HeatmapHeader {
        slide: slide.path().display().to_string(),
        slide_version: slide_version(slide.path()),
        model_id: model_id.to_string(),
        classes: model.classes().to_vec(),
        mpp,
        field_um: g.field_um,
        grid: HeatmapGrid::new(slide.info().dimensions(), g.level0_side(mpp)),
    }
}

/// Marks the cells that the slide's thumbnail shows as background (cheap, before any model run).
pub fn mark_background(
    slide: &Slide,
    heatmap: &mut Heatmap,
    max_background: f64,
) -> Result<(), HeatmapError> {
    let g = heatmap.header.grid;
    let (w, h) = slide.info().dimensions();
    let thumb = slide.thumbnail(2048)?;
    let (sx, sy) = (
        f64::from(thumb.width()) / w as f64,
        f64::from(thumb.height()) / h as f64,
    );
    for cell in 0..g.len() {
        if heatmap.state[cell] != CellState::Pending {
            continue;
        }
        let (x, y) = g.origin(cell);
        let x0 = (x * sx) as u32;
        let y0 = (y * sy) as u32;
        if x0 >= thumb.width() || y0 >= thumb.height() {
            heatmap.state[cell] = CellState::Background;
            continue;
        }
        let cw = ((g.cell * sx).ceil() as u32).clamp(1, thumb.width() - x0);
        let ch = ((g.cell * sy).ceil() as u32).clamp(1, thumb.height() - y0);
        let crop = image::imageops::crop_imm(&thumb, x0, y0, cw, ch).to_image();
        // Cells overhanging the slide count their outside as background.
        let inside = f64::from(cw * ch) / ((g.cell * sx) * (g.cell * sy)).max(1.0);
        let tissue = (1.0 - background_fraction(&crop)) * inside.min(1.0);
        if 1.0 - tissue > max_background {
            heatmap.state[cell] = CellState::Background;
        }
    }
    Ok(())
}

/// The next `n` pending cells nearest to `focus` (a level-0 point).
pub fn next_cells(heatmap: &Heatmap, focus: (f64, f64), n: usize) -> Vec<usize> {
    let g = heatmap.header.grid;
    let mut pending: Vec<(f64, usize)> = (0..g.len())
        .filter(|&i| heatmap.state[i] == CellState::Pending)
        .map(|i| {
            let (x, y) = g.origin(i);
            let (cx, cy) = (x + g.cell / 2.0, y + g.cell / 2.0);
            ((cx - focus.0).powi(2) + (cy - focus.1).powi(2), i)
        })
        .collect();
    let n = n.min(pending.len());
    if n == 0 {
        return Vec::new();
    }
    pending.select_nth_unstable_by(n - 1, |a, b| a.0.total_cmp(&b.0));
    pending.truncate(n);
    pending.sort_by(|a, b| a.0.total_cmp(&b.0));
    pending.into_iter().map(|(_, i)| i).collect()
}

/// What a computation did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HeatmapRun {
    pub computed: usize,
    pub skipped_background: usize,
    pub cancelled: bool,
    pub seconds: f64,
    /// Seconds spent reading and resampling fields, and in the model.
    pub read_seconds: f64,
    pub model_seconds: f64,
}

/// Classifies the pending cells of `heatmap`, nearest to `focus()` first, until all are done or `stop`
/// is set; saves the sidecar every `save_every` and at the end. `on_batch` gets the cells just finished.
#[allow(clippy::too_many_arguments)]
pub fn compute(
    slide: &Slide,
    model: &DmslModel,
    heatmap: &mut Heatmap,
    opts: &HeatmapOptions,
    sidecar: Option<&Path>,
    focus: &dyn Fn() -> Option<(f64, f64)>,
    stop: &AtomicBool,
    mut on_batch: impl FnMut(&Heatmap, &[usize]),
) -> Result<HeatmapRun, HeatmapError> {
    let started = Instant::now();
    let mut run = HeatmapRun::default();
    let mut last_save = Instant::now();
    let g = heatmap.header.grid;
    let (w, h) = slide.info().dimensions();
    let centre = (w as f64 / 2.0, h as f64 / 2.0);
    let high_px = model.geometry().high_px();
    let k = heatmap.classes();
    loop {
        if stop.load(Ordering::Relaxed) {
            run.cancelled = true;
            break;
        }
        let cells = next_cells(heatmap, focus().unwrap_or(centre), opts.batch.max(1));
        if cells.is_empty() {
            break;
        }
        let t = Instant::now();
        let fields: Vec<RgbImage> = cells
            .par_iter()
            .map(|&c| {
                let (x, y) = g.origin(c);
                read_field(slide, x, y, g.cell, high_px)
            })
            .collect::<Result<_, _>>()?;
        run.read_seconds += t.elapsed().as_secs_f64();
        let (tissue, background): (Vec<usize>, Vec<usize>) = (0..cells.len())
            .partition(|&i| background_fraction_rgb(&fields[i]) <= opts.max_background);
        for i in background {
            heatmap.state[cells[i]] = CellState::Background;
            run.skipped_background += 1;
        }
        if !tissue.is_empty() {
            let batch: Vec<RgbImage> = tissue.iter().map(|&i| fields[i].clone()).collect();
            let t = Instant::now();
            let probs = model.predict_fields(&batch)?;
            run.model_seconds += t.elapsed().as_secs_f64();
            for (&i, p) in tissue.iter().zip(probs) {
                let cell = cells[i];
                heatmap.probs[cell * k..(cell + 1) * k].copy_from_slice(&p);
                heatmap.state[cell] = CellState::Done;
                run.computed += 1;
            }
        }
        on_batch(heatmap, &cells);
        if let Some(p) = sidecar
            && last_save.elapsed() >= opts.save_every
        {
            heatmap.save(p)?;
            last_save = Instant::now();
        }
    }
    if let Some(p) = sidecar {
        heatmap.save(p)?;
    }
    run.seconds = started.elapsed().as_secs_f64();
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_upsampled_at_most_twice() {
        assert_eq!(field_scale(0.5, 20.0), Ok(None));
        assert_eq!(field_scale(0.25, 20.0), Ok(None));
        let w = field_scale(0.9, 20.0)
            .unwrap()
            .expect("11.1x gives 20x fields upsampled");
        assert!(w.contains("11.1x") && w.contains("1.80x"), "{w}");
        let e = field_scale(2.0, 20.0).expect_err("5x cannot give 20x fields");
        assert!(e.contains("5.0x") && e.contains("20x"), "{e}");
    }

    #[test]
    fn a_replaced_slide_does_not_reuse_its_heatmap() {
        let dir = tempfile::tempdir().unwrap();
        let slide = dir.path().join("s.tif");
        std::fs::write(&slide, b"first scan").unwrap();
        let mut h = sample();
        h.header.slide_version = slide_version(&slide);
        let sidecar = dir.path().join("s.heatmap.safetensors");
        std::fs::write(&sidecar, h.to_bytes().unwrap()).unwrap();
        assert!(
            Heatmap::load_matching(&sidecar, &h.header)
                .unwrap()
                .is_some()
        );
        // The same name, other content (another size): the saved heatmap is not this slide's.
        std::fs::write(&slide, b"second, longer scan").unwrap();
        let mut now = h.header.clone();
        now.slide_version = slide_version(&slide);
        assert_ne!(now.slide_version, h.header.slide_version);
        assert!(Heatmap::load_matching(&sidecar, &now).unwrap().is_none());
    }

    fn sample() -> Heatmap {
        let mut h = Heatmap::new(HeatmapHeader {
            slide: "s.svs".into(),
            slide_version: "1 bytes, modified 2".into(),
            model_id: content_id(b"model"),
            classes: vec!["a".into(), "b".into()],
            mpp: 0.5,
            field_um: 100.0,
            grid: HeatmapGrid::new((450, 250), 200.0),
        });
        h.state[0] = CellState::Done;
        h.probs[0] = 0.25;
        h.probs[1] = 0.75;
        h.state[1] = CellState::Background;
        h
    }

    /// Fields vote by their centres; a region with no classified field has no majority.
    #[test]
    fn regions_take_the_majority_of_their_fields() {
        let mut h = sample();
        // Cells 0, 1, 2 and 5 classified: 0 says b, 1 and 2 say a, 5 says b.
        for (cell, pb) in [(0usize, 0.75f32), (1, 0.2), (2, 0.1), (5, 0.9)] {
            h.state[cell] = CellState::Done;
            h.probs[cell * 2] = 1.0 - pb;
            h.probs[cell * 2 + 1] = pb;
        }
        let rect = |class: &str, [x0, y0, x1, y1]: [f64; 4]| Region {
            class: class.into(),
            polygon: vec![[x0, y0], [x1, y0], [x1, y1], [x0, y1]],
        };
        let votes = h.region_votes(&[
            rect("b", [0.0, 0.0, 310.0, 450.0]),
            rect("a", [400.0, 0.0, 600.0, 450.0]),
            rect("a", [200.0, 0.0, 390.0, 150.0]),
            rect("a", [420.0, 420.0, 440.0, 440.0]),
        ]);
        // Wholly inside: cells 0 (b) and 3 (not classified); cell 1 (a) only has its centre in it.
        assert_eq!(votes[0].majority.as_deref(), Some("b"));
        assert_eq!((votes[0].fields, votes[0].share), (1, 1.0));
        assert!(votes[0].is_right());
        // Column 2: cells 2 (a) and 5 (b): a tie goes to the first class.
        assert_eq!(votes[1].fields, 2);
        assert_eq!(votes[1].majority.as_deref(), Some("a"));
        // Too small for a whole field: cell 1, whose centre it holds, votes.
        assert_eq!(
            (votes[2].fields, votes[2].majority.as_deref()),
            (1, Some("a"))
        );
        // Neither a whole field nor a field's centre in it: no vote.
        assert_eq!((votes[3].fields, votes[3].majority.as_deref()), (0, None));
        assert!(!votes[3].is_right());
    }

    #[test]
    fn grid_covers_the_slide() {
        let g = HeatmapGrid::new((450, 250), 200.0);
        assert_eq!((g.cols, g.rows, g.len()), (3, 2, 6));
        assert_eq!(g.origin(4), (200.0, 200.0));
        assert_eq!(g.cell_at(399.0, 201.0), Some(4));
        assert_eq!(g.cell_at(601.0, 0.0), None);
    }

    #[test]
    fn sidecar_round_trip_and_staleness() {
        let h = sample();
        let back = Heatmap::from_bytes(&h.to_bytes().unwrap()).unwrap();
        assert_eq!(back.header, h.header);
        assert_eq!(back.state, h.state);
        assert_eq!(back.probs_at(0), Some(&[0.25f32, 0.75][..]));
        assert_eq!(back.probs_at(1), None);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.safetensors");
        h.save(&p).unwrap();
        assert!(Heatmap::load_matching(&p, &h.header).unwrap().is_some());
        let mut other = h.header.clone();
        other.model_id = content_id(b"another model");
        assert!(Heatmap::load_matching(&p, &other).unwrap().is_none());
        std::fs::write(&p, b"garbage").unwrap();
        assert!(Heatmap::load_matching(&p, &h.header).unwrap().is_none());
    }

    #[test]
    fn npy_header_and_data() {
        let h = sample();
        let npy = h.to_npy();
        assert_eq!(&npy[..6], b"\x93NUMPY");
        let hl = u16::from_le_bytes([npy[8], npy[9]]) as usize;
        assert_eq!((10 + hl) % 64, 0);
        let header = std::str::from_utf8(&npy[10..10 + hl]).unwrap();
        assert!(header.contains("'shape': (2, 3, 2)"));
        let data = &npy[10 + hl..];
        assert_eq!(data.len(), 6 * 2 * 4);
        assert_eq!(f32::from_le_bytes(data[4..8].try_into().unwrap()), 0.75);
        assert!(f32::from_le_bytes(data[8..12].try_into().unwrap()).is_nan());
    }

    #[test]
    fn next_cells_start_nearest_the_focus() {
        let mut h = sample();
        h.state[0] = CellState::Pending;
        let order = next_cells(&h, (480.0, 310.0), 3);
        assert_eq!(order, vec![5, 4, 2]);
    }

    #[test]
    fn geojson_tiles_are_inside_the_grid() {
        let h = sample();
        let v = h.to_geojson();
        let f = v["features"].as_array().unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0]["properties"]["classification"]["name"], "b");
        assert_eq!(f[0]["geometry"]["coordinates"][0][2][0], 200.0);
    }
}
