//! DMSL slide heatmaps in the window: a worker thread loads the model once and classifies the open
//! slide's tissue fields nearest the view's centre first (the centre is shared with the worker, so
//! cells fill in where the user looks while they pan), streaming results back through a channel polled
//! each frame. The sidecar beside the slide makes a cancelled run resume and a finished one reappear
//! when the slide is opened again. The side panel section starts, cancels and styles it; the overlay
//! itself is drawn on the GPU by [`super::overlay`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender};
use egui::{RichText, Sense, vec2};
use image::RgbaImage;
use parking_lot::Mutex;

use super::overlay::{GridOverlay, Layer, NO_DATA, OverlayData, OverlayStyle};
use crate::dmsl::DmslModel;
use crate::dmsl::heatmap::{
    CellState, Heatmap, HeatmapGrid, HeatmapOptions, HeatmapRun, compute, content_id, field_scale,
    header_for, mark_background, sidecar_path,
};
use crate::slide::Slide;
use crate::util::colormap::Colormap;
use crate::util::fs::write_atomic;

/// The model in use, loaded once, with the identity of its file's bytes.
pub(crate) struct LoadedModel {
    path: PathBuf,
    id: String,
    model: Option<Arc<DmslModel>>,
}

/// Shared by the heatmap and Grad-CAM workers, so that a model file is read and built once.
pub(crate) type ModelCache = Arc<std::sync::Mutex<Option<LoadedModel>>>;

/// The identity of the model file (FNV of its bytes), computed once per file.
fn model_id(cache: &ModelCache, path: &Path) -> Result<String, String> {
    let mut guard = cache
        .lock()
        .map_err(|_| "model cache poisoned".to_string())?;
    if let Some(m) = guard.as_ref()
        && m.path == path
    {
        return Ok(m.id.clone());
    }
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read the DMSL model {}: {e}", path.display()))?;
    let id = content_id(&bytes);
    *guard = Some(LoadedModel {
        path: path.to_path_buf(),
        id: id.clone(),
        model: None,
    });
    Ok(id)
}

pub(crate) fn load_model(
    cache: &ModelCache,
    path: &Path,
) -> Result<(Arc<DmslModel>, String), String> {
    let mut guard = cache
        .lock()
        .map_err(|_| "model cache poisoned".to_string())?;
    if let Some(m) = guard.as_ref()
        && m.path == path
        && let Some(model) = &m.model
    {
        return Ok((model.clone(), m.id.clone()));
    }
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read the DMSL model {}: {e}", path.display()))?;
    let device = crate::nn::device::select(crate::nn::device::DeviceChoice::Auto)
        .map_err(|e| e.to_string())?;
    let model = Arc::new(
        DmslModel::from_bytes(&bytes, &device)
            .map_err(|e| format!("cannot load the DMSL model {}: {e}", path.display()))?,
    );
    let id = content_id(&bytes);
    *guard = Some(LoadedModel {
        path: path.to_path_buf(),
        id: id.clone(),
        model: Some(model.clone()),
    });
    Ok((model, id))
}

/// What the worker reports.
enum Msg {
    /// The heatmap as it stands before classification (from the sidecar, background marked).
    Loaded { heatmap: Heatmap, sidecar: PathBuf },
    /// Cells just finished: state and probabilities.
    Cells(Vec<(usize, CellState, Vec<f32>)>),
    /// Something the user should know about this run (e.g. upsampled fields).
    Note(String),
    /// The end: the run's summary (None for a sidecar look-up), or why it failed.
    Done(Result<Option<HeatmapRun>, String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobKind {
    /// Looks for a finished or partial heatmap of the slide (no model run).
    Probe,
    Compute,
}

struct Job {
    kind: JobKind,
    rx: Receiver<Msg>,
    stop: Arc<AtomicBool>,
}

/// The heatmap of the open slide, its worker and how it is shown.
pub struct HeatmapState {
    /// The DMSL model file (the bundled demo unless the user picked another).
    pub model_path: Option<PathBuf>,
    /// Where heatmaps are kept (histolens's cache folder), so that a slide reopened resumes its map.
    cache_dir: PathBuf,
    cache: ModelCache,
    /// The slide the heatmap is for.
    slide: Option<PathBuf>,
    heatmap: Option<Heatmap>,
    sidecar: Option<PathBuf>,
    job: Option<Job>,
    /// The view's centre (level 0), read by the worker to pick the next cells.
    pub focus: Arc<std::sync::Mutex<Option<(f64, f64)>>>,
    /// The class shown.
    pub class: usize,
    pub colormap: Colormap,
    pub opacity: f32,
    pub threshold: f32,
    pub visible: bool,
    /// The last problem, for the panel.
    pub message: Option<String>,
    /// The slide states no pixel size: the µm/px given to `start` is the magnification estimate.
    pub scale_estimated: bool,
    /// The last finished run.
    pub last_run: Option<HeatmapRun>,
    overlay: Arc<Mutex<OverlayData>>,
    /// The class and heatmap generation the overlay holds.
    overlay_class: Option<usize>,
    export: Option<Receiver<Result<PathBuf, String>>>,
    /// The last export's outcome.
    pub export_message: Option<Result<PathBuf, String>>,
    /// Counts of done and background cells (kept up to date as results stream in).
    done: usize,
    background: usize,
}

impl Default for HeatmapState {
    fn default() -> Self {
        HeatmapState::new(crate::default_dmsl_model(), crate::cache_dir())
    }
}

impl HeatmapState {
    /// The DMSL model cache (shared with the Grad-CAM worker).
    pub(crate) fn model_cache(&self) -> ModelCache {
        self.cache.clone()
    }

    /// The class names of the model in use, once a worker has loaded it.
    pub(crate) fn loaded_classes(&self) -> Option<Vec<String>> {
        let guard = self.cache.lock().ok()?;
        let m = guard.as_ref()?;
        (Some(m.path.as_path()) == self.model_path.as_deref())
            .then(|| m.model.as_ref().map(|d| d.classes().to_vec()))
            .flatten()
    }

    pub fn new(model_path: Option<PathBuf>, cache_dir: PathBuf) -> Self {
        HeatmapState {
            model_path,
            cache_dir,
            cache: Default::default(),
            slide: None,
            heatmap: None,
            sidecar: None,
            job: None,
            focus: Default::default(),
            class: usize::MAX,
            colormap: Colormap::Viridis,
            opacity: 0.6,
            threshold: 0.0,
            visible: true,
            message: None,
            scale_estimated: false,
            last_run: None,
            overlay: Default::default(),
            overlay_class: None,
            export: None,
            export_message: None,
            done: 0,
            background: 0,
        }
    }

    /// The heatmap of the open slide, as far as it is known.
    pub fn heatmap(&self) -> Option<&Heatmap> {
        self.heatmap.as_ref()
    }

    /// Where the heatmap is saved as it is computed.
    pub fn sidecar(&self) -> Option<&Path> {
        self.sidecar.as_deref()
    }

    /// True while a heatmap is being computed or looked for.
    pub fn is_busy(&self) -> bool {
        self.job.is_some() || self.export.is_some()
    }

    pub fn is_computing(&self) -> bool {
        self.job
            .as_ref()
            .is_some_and(|j| j.kind == JobKind::Compute)
    }

    fn is_cancelling(&self) -> bool {
        self.job
            .as_ref()
            .is_some_and(|j| j.stop.load(Ordering::Relaxed))
    }

    /// Classified cells and tissue cells (all cells not known to be background).
    pub fn progress(&self) -> (usize, usize) {
        match &self.heatmap {
            Some(h) => (self.done, h.header.grid.len() - self.background),
            None => (0, 0),
        }
    }

    /// The class shown, within the heatmap's classes.
    pub fn class_index(&self) -> usize {
        let k = self.heatmap.as_ref().map_or(1, Heatmap::classes).max(1);
        // The default is the last class, as on the command line.
        if self.class >= k { k - 1 } else { self.class }
    }

    fn recount(&mut self) {
        if let Some(h) = &self.heatmap {
            self.done = h.count(CellState::Done);
            self.background = h.count(CellState::Background);
        }
    }

    /// Shows `heatmap` for the slide at `slide` (a loaded sidecar, or a synthetic one in tests).
    pub fn set_heatmap(&mut self, slide: &Path, heatmap: Heatmap) {
        self.slide = Some(slide.to_path_buf());
        self.heatmap = Some(heatmap);
        self.overlay_class = None;
        self.recount();
        self.sync_overlay();
    }

    /// Forgets the heatmap and stops any work on it.
    pub fn clear(&mut self) {
        self.cancel();
        self.job = None;
        self.slide = None;
        self.heatmap = None;
        self.sidecar = None;
        self.message = None;
        self.last_run = None;
        self.export_message = None;
        self.overlay_class = None;
        self.done = 0;
        self.background = 0;
        self.overlay.lock().clear();
    }

    /// A slide was opened: drop the old heatmap and look for one saved beside this slide.
    pub fn slide_opened(&mut self, ctx: &egui::Context, slide: Arc<Slide>, mpp: Option<f64>) {
        self.clear();
        self.slide = Some(slide.path().to_path_buf());
        if let (Some(_), Some(mpp)) = (&self.model_path, mpp) {
            self.spawn(ctx, JobKind::Probe, slide, mpp);
        }
    }

    /// Another model: the heatmap shown was made by the old one.
    pub fn set_model(
        &mut self,
        ctx: &egui::Context,
        path: PathBuf,
        slide: Arc<Slide>,
        mpp: Option<f64>,
    ) {
        self.model_path = Some(path);
        self.slide_opened(ctx, slide, mpp);
    }

    /// Starts (or resumes) computing the heatmap of `slide` at `mpp` µm/px.
    pub fn start(&mut self, ctx: &egui::Context, slide: Arc<Slide>, mpp: Option<f64>) {
        let note = self.scale_estimated.then(|| {
            format!(
                "No µm/px in the metadata: computed at the ESTIMATED {:.3} µm/px; set it under \
                 Calibration to override.",
                mpp.unwrap_or(f64::NAN)
            )
        });
        self.message = None;
        if self.model_path.is_none() {
            self.message = Some(
                "No DMSL model: none is bundled; choose one with \"Choose…\" or --dmsl-model."
                    .into(),
            );
            return;
        }
        let Some(mpp) = mpp.filter(|m| m.is_finite() && *m > 0.0) else {
            self.message = Some(
                "This file's µm/px is unknown: set it under Calibration (or use the magnification \
                 estimate) before computing a heatmap."
                    .into(),
            );
            return;
        };
        self.cancel();
        self.last_run = None;
        self.slide = Some(slide.path().to_path_buf());
        self.spawn(ctx, JobKind::Compute, slide, mpp);
        if note.is_some() {
            self.message = note;
        }
    }

    /// Asks the worker to stop after its current batch (it saves the sidecar first).
    pub fn cancel(&mut self) {
        if let Some(job) = &self.job {
            job.stop.store(true, Ordering::Relaxed);
        }
    }

    fn spawn(&mut self, ctx: &egui::Context, kind: JobKind, slide: Arc<Slide>, mpp: f64) {
        let Some(model_path) = self.model_path.clone() else {
            return;
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            slide,
            model_path,
            mpp,
            cache_dir: self.cache_dir.clone(),
            cache: self.cache.clone(),
            focus: self.focus.clone(),
            stop: stop.clone(),
            tx,
            repaint: ctx.clone(),
        };
        let name = match kind {
            JobKind::Probe => "heatmap-probe",
            JobKind::Compute => "heatmap",
        };
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || match kind {
                JobKind::Probe => worker.probe(),
                JobKind::Compute => super::run_background_model_work(|| worker.compute()),
            });
        match spawned {
            Ok(_) => self.job = Some(Job { kind, rx, stop }),
            Err(e) => self.message = Some(format!("cannot start a worker: {e}")),
        }
    }

    /// Collects what the worker sent, keeps the focus on the view's centre, and finished exports.
    pub fn poll(&mut self, centre: Option<[f64; 2]>) {
        if let Ok(mut f) = self.focus.lock() {
            *f = centre.map(|c| (c[0], c[1]));
        }
        if let Some(rx) = &self.export
            && let Ok(r) = rx.try_recv()
        {
            self.export_message = Some(r);
            self.export = None;
        }
        let Some(job) = &self.job else { return };
        let kind = job.kind;
        let mut msgs = Vec::new();
        let mut ended = false;
        loop {
            match job.rx.try_recv() {
                Ok(m) => msgs.push(m),
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    ended = true;
                    break;
                }
            }
        }
        let mut finished = false;
        for m in msgs {
            match m {
                Msg::Loaded { heatmap, sidecar } => {
                    let slide = self
                        .slide
                        .clone()
                        .unwrap_or_else(|| PathBuf::from(&heatmap.header.slide));
                    self.sidecar = Some(sidecar);
                    self.set_heatmap(&slide, heatmap);
                }
                Msg::Cells(cells) => self.apply_cells(cells),
                Msg::Note(note) => {
                    self.message = Some(match self.message.take() {
                        Some(m) => format!("{m} {note}"),
                        None => note,
                    })
                }
                Msg::Done(r) => {
                    finished = true;
                    match r {
                        Ok(run) => self.last_run = run,
                        Err(e) => self.message = Some(e),
                    }
                }
            }
        }
        if ended && !finished && kind == JobKind::Compute {
            self.message = Some("the heatmap worker stopped unexpectedly".into());
        }
        if finished || ended {
            self.job = None;
        }
    }

    fn apply_cells(&mut self, cells: Vec<(usize, CellState, Vec<f32>)>) {
        let class = self.class_index();
        let Some(h) = self.heatmap.as_mut() else {
            return;
        };
        let k = h.classes();
        let mut changed = Vec::with_capacity(cells.len());
        for (cell, state, probs) in cells {
            if cell >= h.state.len() || probs.len() != k {
                continue;
            }
            let before = h.state[cell];
            h.state[cell] = state;
            h.probs[cell * k..(cell + 1) * k].copy_from_slice(&probs);
            for (s, d) in [(before, -1isize), (state, 1)] {
                match s {
                    CellState::Done => self.done = self.done.saturating_add_signed(d),
                    CellState::Background => {
                        self.background = self.background.saturating_add_signed(d)
                    }
                    CellState::Pending => {}
                }
            }
            let v = if state == CellState::Done {
                probs[class]
            } else {
                NO_DATA
            };
            changed.push((cell, v));
        }
        self.overlay.lock().update(changed);
    }

    /// Rebuilds the overlay's values when the class or the heatmap changed.
    fn sync_overlay(&mut self) {
        let class = self.class_index();
        if self.overlay_class == Some(class) {
            return;
        }
        let Some(h) = &self.heatmap else { return };
        let g = h.header.grid;
        let k = h.classes();
        let values = (0..g.len())
            .map(|cell| {
                if h.state[cell] == CellState::Done {
                    h.probs[cell * k + class]
                } else {
                    NO_DATA
                }
            })
            .collect();
        self.overlay.lock().reset(g.cols, g.rows, values);
        self.overlay_class = Some(class);
    }

    /// The overlay to draw over `slide`, if there is one and it is shown.
    pub fn overlay_for(&mut self, slide: &Path) -> Option<GridOverlay> {
        if !self.visible || self.slide.as_deref() != Some(slide) {
            return None;
        }
        self.sync_overlay();
        let grid = self.heatmap.as_ref()?.header.grid;
        Some(GridOverlay {
            layer: Layer::Heatmap,
            data: self.overlay.clone(),
            grid: grid.into(),
            style: OverlayStyle {
                colormap: self.colormap,
                opacity: self.opacity,
                threshold: self.threshold,
            },
        })
    }

    /// What the cell under a level-0 point holds, for the tooltip and the status bar.
    pub fn hover_text(&self, slide: &Path, x: f64, y: f64) -> Option<String> {
        if !self.visible || self.slide.as_deref() != Some(slide) {
            return None;
        }
        let h = self.heatmap.as_ref()?;
        let cell = h.header.grid.cell_at(x, y)?;
        Some(match h.state[cell] {
            CellState::Done => {
                let k = h.classes();
                let p = &h.probs[cell * k..(cell + 1) * k];
                h.header
                    .classes
                    .iter()
                    .zip(p)
                    .map(|(c, v)| format!("{c} {v:.2}"))
                    .collect::<Vec<_>>()
                    .join(" · ")
            }
            CellState::Background => "background (not classified)".into(),
            CellState::Pending => "not classified yet".into(),
        })
    }

    /// Writes the heatmap in the background (PNG with legend, .npy or GeoJSON).
    fn start_export(
        &mut self,
        ctx: &egui::Context,
        slide: Arc<Slide>,
        kind: ExportKind,
        path: PathBuf,
    ) {
        let Some(h) = self.heatmap.clone() else {
            return;
        };
        let (class, map) = (self.class_index(), self.colormap);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let repaint = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("heatmap-export".into())
            .spawn(move || {
                let r = match kind {
                    ExportKind::Png => {
                        let thumb = slide.thumbnail(1024).ok();
                        export_png(&h, class, map, thumb.as_ref(), &path)
                    }
                    ExportKind::Npy => export_npy(&h, &path),
                    ExportKind::GeoJson => export_geojson(&h, &path),
                };
                let _ = tx.send(r.map(|()| path));
                repaint.request_repaint();
            });
        match spawned {
            Ok(_) => self.export = Some(rx),
            Err(e) => self.export_message = Some(Err(format!("cannot start a worker: {e}"))),
        }
    }
}

/// The worker's inputs.
struct Worker {
    slide: Arc<Slide>,
    model_path: PathBuf,
    mpp: f64,
    cache_dir: PathBuf,
    cache: ModelCache,
    focus: Arc<std::sync::Mutex<Option<(f64, f64)>>>,
    stop: Arc<AtomicBool>,
    tx: Sender<Msg>,
    repaint: egui::Context,
}

impl Worker {
    fn send(&self, m: Msg) {
        let _ = self.tx.send(m);
        self.repaint.request_repaint();
    }

    /// Shows a heatmap saved beside the slide for this model and pixel size, without running the model.
    fn probe(self) {
        let r = (|| -> Result<Option<(Heatmap, PathBuf)>, String> {
            let id = model_id(&self.cache, &self.model_path)?;
            let path = sidecar_path(self.slide.path(), &id, &self.cache_dir, false);
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(_) => return Ok(None),
            };
            let Ok(h) = Heatmap::from_bytes(&bytes) else {
                return Ok(None);
            };
            // The header a fresh computation would have, as far as it can be told without the model.
            let grid =
                HeatmapGrid::new(self.slide.info().dimensions(), h.header.field_um / self.mpp);
            let matches = h.header.model_id == id
                && h.header.slide == self.slide.path().display().to_string()
                && h.header.mpp == self.mpp
                && h.header.grid == grid;
            Ok(matches.then_some((h, path)))
        })();
        match r {
            Ok(Some((heatmap, sidecar))) => self.send(Msg::Loaded { heatmap, sidecar }),
            Ok(None) => {}
            // A model that cannot be read is reported when the user asks for a heatmap.
            Err(e) => log::info!("no saved heatmap: {e}"),
        }
        self.send(Msg::Done(Ok(None)));
    }

    fn compute(self) {
        let r = self.run();
        self.send(Msg::Done(r.map(Some)));
    }

    fn run(&self) -> Result<HeatmapRun, String> {
        let (model, id) = load_model(&self.cache, &self.model_path)?;
        let upsampled = field_scale(self.mpp, model.geometry().high_magnification)
            .map_err(|why| sentence(&why))?;
        if let Some(warning) = upsampled {
            self.send(Msg::Note(sentence(&warning)));
        }
        let header = header_for(&self.slide, self.mpp, &model, &id);
        let sidecar = sidecar_path(self.slide.path(), &id, &self.cache_dir, false);
        let mut heatmap = match Heatmap::load_matching(&sidecar, &header) {
            Ok(Some(h)) => h,
            Ok(None) => Heatmap::new(header),
            Err(e) => {
                log::warn!("starting a fresh heatmap: {e}");
                Heatmap::new(header)
            }
        };
        let opts = HeatmapOptions::default();
        mark_background(&self.slide, &mut heatmap, opts.max_background)
            .map_err(|e| e.to_string())?;
        self.send(Msg::Loaded {
            heatmap: heatmap.clone(),
            sidecar: sidecar.clone(),
        });
        let k = heatmap.classes();
        // Asked for before each batch: the place to step aside for work the user waits for.
        let focus = || {
            super::yield_to_interactive_work(&self.stop);
            self.focus.lock().ok().and_then(|f| *f)
        };
        compute(
            &self.slide,
            &model,
            &mut heatmap,
            &opts,
            Some(&sidecar),
            &focus,
            &self.stop,
            |h, cells| {
                let changed = cells
                    .iter()
                    .map(|&c| (c, h.state[c], h.probs[c * k..(c + 1) * k].to_vec()))
                    .collect();
                self.send(Msg::Cells(changed));
            },
        )
        .map_err(|e| e.to_string())
    }
}

#[derive(Debug, Clone, Copy)]
enum ExportKind {
    Png,
    Npy,
    GeoJson,
}

/// One class's heatmap as a PNG over the slide's thumbnail, with a colour bar and the class name.
pub fn export_png(
    heatmap: &Heatmap,
    class: usize,
    map: Colormap,
    thumbnail: Option<&RgbaImage>,
    path: &Path,
) -> Result<(), String> {
    let g = heatmap.header.grid;
    let px = (1024 / g.cols.max(g.rows).max(1)).clamp(1, 64);
    let img = heatmap.to_png(class, map, px, thumbnail);
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| format!("cannot encode the PNG: {e}"))?;
    write(path, &bytes)
}

/// The probabilities as NumPy `.npy` (rows, cols, classes), NaN off tissue.
pub fn export_npy(heatmap: &Heatmap, path: &Path) -> Result<(), String> {
    write(path, &heatmap.to_npy())
}

/// One GeoJSON tile per classified cell, in level-0 pixels (QuPath).
pub fn export_geojson(heatmap: &Heatmap, path: &Path) -> Result<(), String> {
    let text = serde_json::to_string(&heatmap.to_geojson())
        .map_err(|e| format!("cannot serialise the GeoJSON: {e}"))?;
    write(path, text.as_bytes())
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    write_atomic(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// A colour bar 0 → 1 in `map`, `width` points wide, with its ends labelled and the title beside.
pub fn colour_bar(ui: &mut egui::Ui, map: Colormap, title: &str, width: f32) {
    ui.horizontal(|ui| {
        ui.vertical(|ui| {
            let (rect, _) = ui.allocate_exact_size(vec2(width, 12.0), Sense::hover());
            super::overlay::paint_colour_bar(&ui.painter_at(rect), rect, map);
            ui.horizontal(|ui| {
                ui.set_width(width);
                ui.small("0");
                ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                    ui.small("1");
                });
            });
        });
        ui.label(title);
    });
}

/// What the section asks the app to do.
pub enum HeatmapAction {
    None,
    Start,
    Cancel,
    /// A model file was picked.
    Model(PathBuf),
}

/// The side panel section "Heatmap (DMSL)" for the open slide.
pub fn section(
    ui: &mut egui::Ui,
    state: &mut HeatmapState,
    slide: &Arc<Slide>,
    mpp: Option<f64>,
) -> HeatmapAction {
    let mut action = HeatmapAction::None;
    let ctx = ui.ctx().clone();
    egui::CollapsingHeader::new("Heatmap (DMSL)")
        .default_open(true)
        .show(ui, |ui| {
            let mut model_name = state
                .model_path
                .as_ref()
                .and_then(|p| p.file_name())
                .map_or("none".to_string(), |n| n.to_string_lossy().into_owned());
            if state.model_path.as_ref().is_some_and(|p| !p.is_file()) {
                model_name += " (not found)";
            }
            ui.horizontal(|ui| {
                ui.label(format!("Model: {model_name}")).on_hover_text(
                    state
                        .model_path
                        .as_ref()
                        .map_or(String::new(), |p| p.display().to_string()),
                );
                if ui
                    .add_enabled(!state.is_computing(), egui::Button::new("Choose…"))
                    .on_hover_text("Pick a DMSL model (.safetensors)")
                    .clicked()
                    && let Some(p) = rfd::FileDialog::new()
                        .add_filter("histolens model", &["safetensors"])
                        .pick_file()
                {
                    action = HeatmapAction::Model(p);
                }
            });
            let (done, tissue) = state.progress();
            let complete = state
                .heatmap
                .as_ref()
                .is_some_and(|h| h.is_complete() && state.slide.as_deref() == Some(slide.path()));
            ui.horizontal(|ui| {
                if state.is_computing() {
                    let label = if state.is_cancelling() {
                        "Cancelling…"
                    } else {
                        "Cancel"
                    };
                    if ui
                        .add_enabled(!state.is_cancelling(), egui::Button::new(label))
                        .on_hover_text("Stop after the current batch; the work so far is kept")
                        .clicked()
                    {
                        action = HeatmapAction::Cancel;
                    }
                    ui.spinner();
                } else {
                    let label = if done > 0 && !complete {
                        "Resume heatmap"
                    } else {
                        "Compute heatmap"
                    };
                    let enabled = state.model_path.as_ref().is_some_and(|p| p.is_file())
                        && mpp.is_some()
                        && !complete;
                    if ui
                        .add_enabled(enabled, egui::Button::new(label))
                        .on_hover_text("Classify the tissue, nearest the view's centre first")
                        .on_disabled_hover_text(if complete {
                            "The heatmap is complete"
                        } else {
                            "Needs a model and the slide's µm/px"
                        })
                        .clicked()
                    {
                        action = HeatmapAction::Start;
                    }
                    if mpp.is_none() {
                        ui.colored_label(ui.visuals().warn_fg_color, "needs the µm/px")
                            .on_hover_text(
                                "The pixel size is unknown: set it under Calibration (or use the \
                                 magnification estimate) to compute a heatmap.",
                            );
                    }
                }
            });
            if let Some(m) = &state.message {
                ui.colored_label(ui.visuals().warn_fg_color, m);
            }
            if state.heatmap.is_none() {
                return;
            }
            let frac = if tissue > 0 {
                done as f32 / tissue as f32
            } else {
                1.0
            };
            ui.add(
                egui::ProgressBar::new(frac)
                    .text(format!("{done} / {tissue} tissue fields"))
                    .desired_height(16.0),
            );
            if let Some(r) = &state.last_run
                && r.computed > 0
            {
                ui.small(format!(
                    "{} fields in {:.1} s ({:.1} fields/s){}",
                    r.computed,
                    r.seconds,
                    r.computed as f64 / r.seconds.max(1e-9),
                    if r.cancelled { ", cancelled" } else { "" }
                ));
            }
            let classes = state
                .heatmap
                .as_ref()
                .map(|h| h.header.classes.clone())
                .unwrap_or_default();
            let mut class = state.class_index();
            egui::Grid::new("heatmap-style")
                .num_columns(2)
                .show(ui, |ui| {
                    let label = ui.label("Class").id;
                    egui::ComboBox::from_id_salt("heatmap-class")
                        .selected_text(classes.get(class).map_or("", String::as_str))
                        .show_ui(ui, |ui| {
                            for (i, c) in classes.iter().enumerate() {
                                ui.selectable_value(&mut class, i, c);
                            }
                        })
                        .response
                        .labelled_by(label);
                    ui.end_row();
                    let label = ui.label("Colormap").id;
                    egui::ComboBox::from_id_salt("heatmap-colormap")
                        .selected_text(state.colormap.name())
                        .show_ui(ui, |ui| {
                            for m in Colormap::ALL {
                                ui.selectable_value(&mut state.colormap, m, m.name());
                            }
                        })
                        .response
                        .labelled_by(label);
                    ui.end_row();
                    let label = ui.label("Opacity").id;
                    ui.add(egui::Slider::new(&mut state.opacity, 0.0..=1.0))
                        .labelled_by(label);
                    ui.end_row();
                    let label = ui.label("Threshold").id;
                    ui.add(egui::Slider::new(&mut state.threshold, 0.0..=1.0))
                        .labelled_by(label)
                        .on_hover_text("Cells whose probability is below it are not coloured");
                    ui.end_row();
                });
            state.class = class;
            ui.checkbox(&mut state.visible, "Show the heatmap");
            let name = classes.get(class).map_or("", String::as_str);
            colour_bar(ui, state.colormap, &format!("P({name})"), 160.0);
            ui.horizontal(|ui| {
                ui.label("Export");
                let stem = slide
                    .path()
                    .file_stem()
                    .map_or("slide".to_string(), |s| s.to_string_lossy().into_owned());
                let busy = state.export.is_some() || done == 0;
                for (label, kind, ext, file) in [
                    (
                        "PNG…",
                        ExportKind::Png,
                        "png",
                        format!("{stem}.heatmap-{name}.png"),
                    ),
                    (
                        "NumPy…",
                        ExportKind::Npy,
                        "npy",
                        format!("{stem}.heatmap.npy"),
                    ),
                    (
                        "GeoJSON…",
                        ExportKind::GeoJson,
                        "geojson",
                        format!("{stem}.heatmap.geojson"),
                    ),
                ] {
                    if ui.add_enabled(!busy, egui::Button::new(label)).clicked() {
                        let mut dialog = rfd::FileDialog::new()
                            .set_title("Export the heatmap")
                            .add_filter(ext, &[ext])
                            .set_file_name(file);
                        if let Some(dir) = slide.path().parent() {
                            dialog = dialog.set_directory(dir);
                        }
                        if let Some(p) = dialog.save_file() {
                            state.start_export(&ctx, slide.clone(), kind, p);
                        }
                    }
                }
            });
            match &state.export_message {
                Some(Ok(p)) => {
                    ui.small(format!("Saved {}", p.display()));
                }
                Some(Err(e)) => {
                    ui.colored_label(ui.visuals().warn_fg_color, e);
                }
                None => {}
            }
            if let Some(p) = &state.sidecar {
                ui.small(RichText::new(format!("Kept in {}", p.display())).weak())
                    .on_hover_text("Computed fields are saved here; the heatmap resumes from it");
            }
        });
    action
}

/// The heatmap's legend in the canvas's top-right corner: the class shown and the colour bar.
pub fn canvas_legend(
    ui: &egui::Ui,
    canvas: egui::Rect,
    state: &HeatmapState,
) -> Option<egui::Rect> {
    let h = state.heatmap.as_ref()?;
    if !state.visible {
        return None;
    }
    let name = h.header.classes.get(state.class_index())?;
    Some(super::overlay::legend(
        ui,
        canvas,
        &format!("P({name})"),
        state.colormap,
        0,
    ))
}

/// `s` as a sentence: capital first letter, final full stop.
fn sentence(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => format!("{}{}.", first.to_uppercase(), c.as_str()),
        None => String::new(),
    }
}
