//! The application shell: opening files (dialog, drop, command line, recent list) in the background,
//! menus and toolbar, error reporting, persisted settings and frame statistics.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Receiver;
use serde::{Deserialize, Serialize};

use super::frame_stats::FrameStats;
use super::gradcam::{self, GradcamAction, GradcamState};
use super::heatmap::{self, HeatmapAction, HeatmapState};
use super::labels::{self, LabelsAction, LabelsState};
use super::magnification::{self, MagnificationAction, MagnificationState};
use super::regions::{self, RegionsAction, RegionsState};
use super::side_panel::{self, SidePanelAction};
use super::status_bar;
use super::training::{self, Task, TrainingAction, TrainingState};
use super::viewer::{OVERVIEW_SIDE, OpenedSlide, SlideView};
use super::window_bench::{self, BenchClock, WindowBench};
use crate::slide::{CalibrationStore, CameraStore, Slide, SlideError};
use crate::util::colormap::Colormap;

const SETTINGS_KEY: &str = "histolens.settings";
const MAX_RECENT: usize = 10;
/// Associated images are shown at most this large in the side panel.
const ASSOCIATED_SIDE: u32 = 512;

/// How the window is started.
#[derive(Debug, Clone, Default)]
pub struct LaunchOptions {
    /// A file to open at start.
    pub path: Option<PathBuf>,
    /// Tile cache budget in MiB (decoded tiles plus textures); the persisted setting or a share of RAM
    /// when `None`.
    pub cache_mb: Option<u64>,
    /// Folder for per-user state; the platform's data folder when `None`.
    pub data_dir: Option<PathBuf>,
    /// Write frame-time percentiles to this JSON file on exit (for the end-to-end script).
    pub frame_stats_path: Option<PathBuf>,
    /// Repaint continuously, so that frame intervals measure whole frames (benchmarks only).
    pub continuous_repaint: bool,
    /// The magnification model; the bundled one when `None`.
    pub magnification_model: Option<PathBuf>,
    /// The DMSL model for slide heatmaps; the bundled demo when `None`.
    pub dmsl_model: Option<PathBuf>,
    /// Start computing the heatmap of each slide as soon as it opens.
    pub compute_heatmap: bool,
    /// Grad-CAM follows the view (DMSL, the first branch's last convolution laid over the slide).
    pub gradcam_follow: bool,
    /// Folders or files to add to the label set; the labelling view opens.
    pub label_paths: Vec<PathBuf>,
    /// A run folder to open in the training panel and start (or resume).
    pub train_run: Option<PathBuf>,
    /// A timed benchmark run: continuous repaint, scripted panning, statistics written on close.
    pub bench: Option<WindowBench>,
}

/// Persisted across sessions through eframe's storage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
struct Settings {
    recent: Vec<PathBuf>,
    cache_mb: u64,
    loader_threads: usize,
    show_side_panel: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            recent: Vec::new(),
            cache_mb: crate::util::memory::default_cache_budget_bytes() >> 20,
            loader_threads: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .clamp(2, 8),
            show_side_panel: true,
        }
    }
}

struct OpenJob {
    path: PathBuf,
    rx: Receiver<Result<OpenedSlide, SlideError>>,
    started: Instant,
}

pub struct HistolensApp {
    settings: Settings,
    calibrations: Option<CalibrationStore>,
    /// Microscope cameras (None when the store could not be read).
    cameras: Option<CameraStore>,
    view: Option<SlideView>,
    opening: Option<OpenJob>,
    /// Errors waiting to be acknowledged by the user, oldest first.
    errors: Vec<String>,
    frame_stats: FrameStats,
    frame_stats_path: Option<PathBuf>,
    bench: Option<(WindowBench, BenchClock)>,
    last_memory_report: Option<std::time::Instant>,
    continuous_repaint: bool,
    property_filter: String,
    magnification: MagnificationState,
    heatmap: HeatmapState,
    compute_heatmap: bool,
    gradcam: GradcamState,
    training: TrainingState,
    labels: LabelsState,
    regions: RegionsState,
    mode: Mode,
}

/// What the central area shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Viewer,
    Labels,
    Training,
}

/// Opens the slide and prepares what the window shows first, off the UI thread.
fn open_in_background(path: &Path) -> Result<OpenedSlide, SlideError> {
    let slide = Arc::new(Slide::open(path)?);
    let overview = slide.thumbnail(OVERVIEW_SIDE)?;
    let associated = slide
        .info()
        .associated
        .iter()
        .filter_map(|a| {
            let img = slide.associated_image(&a.name).ok()?;
            Some((
                a.name.clone(),
                crate::slide::pixels::fit_within(&img, ASSOCIATED_SIDE),
            ))
        })
        .collect();
    Ok(OpenedSlide {
        slide,
        overview,
        associated,
    })
}

impl HistolensApp {
    pub fn new(cc: &eframe::CreationContext<'_>, options: LaunchOptions) -> Self {
        let mut settings: Settings = cc
            .storage
            .and_then(|s| eframe::get_value(s, SETTINGS_KEY))
            .unwrap_or_default();
        if let Some(mb) = options.cache_mb {
            settings.cache_mb = mb;
        }
        let mut errors = Vec::new();
        let data_dir = options.data_dir.clone().unwrap_or_else(crate::data_dir);
        let runs_root = data_dir.join("runs");
        let labels = LabelsState::new(&data_dir);
        // A store that cannot be read is reported; changes then last for this session only.
        let calibrations = CalibrationStore::load(CalibrationStore::path_in(&data_dir))
            .map_err(|e| errors.push(e.to_string()))
            .ok();
        let cameras = CameraStore::load(CameraStore::path_in(&data_dir))
            .map_err(|e| errors.push(e.to_string()))
            .ok();
        let mut app = HistolensApp {
            settings,
            calibrations,
            cameras,
            view: None,
            opening: None,
            errors,
            frame_stats: FrameStats::default(),
            frame_stats_path: options.frame_stats_path,
            bench: options.bench.clone().map(|b| (b, BenchClock::default())),
            last_memory_report: None,
            continuous_repaint: options.continuous_repaint || options.bench.is_some(),
            property_filter: String::new(),
            magnification: MagnificationState::default(),
            heatmap: HeatmapState::new(
                options.dmsl_model.or_else(crate::default_dmsl_model),
                // Heatmaps are caches: histolens's cache folder (beside a test's own data folder).
                options
                    .data_dir
                    .as_ref()
                    .map_or_else(crate::cache_dir, |d| d.join("cache")),
            ),
            compute_heatmap: options.compute_heatmap,
            gradcam: GradcamState::following(options.gradcam_follow),
            training: TrainingState::new(runs_root),
            labels,
            regions: RegionsState::default(),
            mode: Mode::Viewer,
        };
        // The tiles' and the heatmap overlay's pipelines, once, for the window's target format.
        if let Some(render_state) = cc.wgpu_render_state.as_ref() {
            super::tile_atlas::install(render_state);
            super::overlay::install(render_state);
        }
        if let Some(m) = options.magnification_model {
            app.magnification.model_path = Some(m);
        }
        if let Some(p) = options.path {
            app.open(&cc.egui_ctx, p);
        }
        if !options.label_paths.is_empty() {
            app.labels.add(&options.label_paths);
            app.mode = Mode::Labels;
        }
        if let Some(run) = options.train_run {
            app.training.open_run(&run);
            app.training.start(&cc.egui_ctx);
            app.mode = Mode::Training;
        }
        app
    }

    /// Starts opening `path` in a worker thread; the current slide stays until it succeeds.
    pub fn open(&mut self, ctx: &egui::Context, path: PathBuf) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let repaint = ctx.clone();
        let p = path.clone();
        let spawned = std::thread::Builder::new()
            .name("open-slide".into())
            .spawn(move || {
                let _ = tx.send(open_in_background(&p));
                repaint.request_repaint();
            });
        match spawned {
            Ok(_) => {
                self.opening = Some(OpenJob {
                    path,
                    rx,
                    started: Instant::now(),
                })
            }
            Err(e) => self.errors.push(format!(
                "cannot start a thread to open {}: {e}",
                path.display()
            )),
        }
    }

    /// The open slide's view, if any.
    pub fn view(&self) -> Option<&SlideView> {
        self.view.as_ref()
    }

    pub fn view_mut(&mut self) -> Option<&mut SlideView> {
        self.view.as_mut()
    }

    /// Messages the user has not dismissed yet.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// True while a file is opening, tiles are loading, an estimate or a heatmap runs (tests wait for
    /// this).
    pub fn is_busy(&self) -> bool {
        self.opening.is_some()
            || self.view.as_ref().is_some_and(SlideView::is_loading)
            || self.magnification.is_busy()
            || self.heatmap.is_busy()
            || self.gradcam.is_busy()
    }

    /// The Grad-CAM maps of the view's centre and their settings.
    pub fn gradcam(&self) -> &GradcamState {
        &self.gradcam
    }

    pub fn gradcam_mut(&mut self) -> &mut GradcamState {
        &mut self.gradcam
    }

    pub fn training(&self) -> &TrainingState {
        &self.training
    }

    pub fn training_mut(&mut self) -> &mut TrainingState {
        &mut self.training
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn labels(&self) -> &LabelsState {
        &self.labels
    }

    pub fn labels_mut(&mut self) -> &mut LabelsState {
        &mut self.labels
    }

    pub fn regions(&self) -> &RegionsState {
        &self.regions
    }

    pub fn regions_mut(&mut self) -> &mut RegionsState {
        &mut self.regions
    }

    /// The magnification model the viewer uses.
    pub fn magnification_model(&self) -> Option<&Path> {
        self.magnification.model_path.as_deref()
    }

    /// The DMSL model the viewer uses.
    pub fn dmsl_model(&self) -> Option<&Path> {
        self.heatmap.model_path.as_deref()
    }

    /// The DMSL heatmap of the open slide and how it is shown.
    pub fn heatmap(&self) -> &HeatmapState {
        &self.heatmap
    }

    pub fn heatmap_mut(&mut self) -> &mut HeatmapState {
        &mut self.heatmap
    }

    pub fn magnification(&self) -> &MagnificationState {
        &self.magnification
    }

    pub fn frame_stats(&self) -> &FrameStats {
        &self.frame_stats
    }

    fn poll_open_job(&mut self, ctx: &egui::Context) {
        let Some(job) = &self.opening else { return };
        let Ok(result) = job.rx.try_recv() else {
            return;
        };
        let path = job.path.clone();
        log::info!(
            "opened {} in {:.0} ms",
            path.display(),
            job.started.elapsed().as_secs_f64() * 1e3
        );
        self.opening = None;
        match result {
            Ok(opened) => {
                // Every file is estimated on opening when there is a model (a slide is checked
                // against its metadata); without one, only where the estimate was the way to a µm/px
                // do we say so.
                let info = opened.slide.info();
                if self.magnification.model_path.is_some()
                    || !info.is_whole_slide()
                    || info.mpp.is_none()
                {
                    self.magnification.start(ctx, opened.slide.clone());
                }
                let calibration = self
                    .calibrations
                    .as_ref()
                    .map(|s| s.get(&path))
                    .unwrap_or_default();
                let slide = opened.slide.clone();
                let view = SlideView::new(
                    ctx,
                    opened,
                    (self.settings.cache_mb as usize) << 20,
                    self.settings.loader_threads,
                    calibration,
                );
                // A heatmap saved beside the slide for this model comes back.
                // Metadata or calibration first; else the estimate, which the panels then say they use.
                let stated = view.mpp().map(|m| m.mean());
                let mpp = stated.or(view.estimated_mpp.map(|e| e.0));
                self.heatmap.scale_estimated = stated.is_none() && mpp.is_some();
                self.heatmap.slide_opened(ctx, slide.clone(), mpp);
                if self.compute_heatmap {
                    self.heatmap.start(ctx, slide, mpp);
                }
                self.view = Some(view);
                // Frame statistics describe viewing, not start-up (shader compilation, font atlas).
                self.frame_stats = FrameStats::default();
                self.settings.recent.retain(|p| p != &path);
                self.settings.recent.insert(0, path);
                self.settings.recent.truncate(MAX_RECENT);
            }
            Err(e) => self.errors.push(e.to_string()),
        }
    }

    fn open_dialog(&mut self, ctx: &egui::Context) {
        let start = self
            .view
            .as_ref()
            .and_then(|v| v.slide.path().parent().map(Path::to_path_buf));
        let mut dialog = rfd::FileDialog::new()
            .set_title("Open a slide or image")
            .add_filter(
                "Slides and images",
                &[
                    "svs", "tif", "tiff", "ndpi", "vms", "vmu", "scn", "mrxs", "bif", "svslide",
                    "png", "jpg", "jpeg", "bmp", "webp",
                ],
            )
            .add_filter("All files", &["*"]);
        if let Some(dir) = start {
            dialog = dialog.set_directory(dir);
        }
        if let Some(path) = dialog.pick_file() {
            self.open(ctx, path);
        }
    }

    fn handle_dropped_files(&mut self, ctx: &egui::Context) {
        let dropped: Vec<PathBuf> = ctx.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .collect()
        });
        if dropped.is_empty() {
            return;
        }
        // Folders (or anything dropped on the labelling view) are for labelling; a file opens.
        if self.mode == Mode::Labels || dropped.iter().any(|p| p.is_dir()) {
            self.labels.add(&dropped);
            self.mode = Mode::Labels;
        } else if let Some(first) = dropped.into_iter().next() {
            self.open(ctx, first);
        }
    }

    fn menu_bar(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        egui::MenuBar::new().ui(ui, |ui| {
            ui.menu_button("File", |ui| {
                if ui.button("Open…").clicked() {
                    ui.close();
                    self.open_dialog(&ctx);
                }
                ui.menu_button("Open recent", |ui| {
                    if self.settings.recent.is_empty() {
                        ui.label("(none)");
                    }
                    let mut chosen = None;
                    for p in &self.settings.recent {
                        if ui.button(p.display().to_string()).clicked() {
                            chosen = Some(p.clone());
                        }
                    }
                    if let Some(p) = chosen {
                        ui.close();
                        self.open(&ctx, p);
                    }
                });
                if ui
                    .add_enabled(self.view.is_some(), egui::Button::new("Close"))
                    .clicked()
                {
                    self.view = None;
                    self.heatmap.clear();
                    ui.close();
                }
                ui.separator();
                if ui.button("Quit (Ctrl+Q)").clicked() {
                    ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                }
            });
            ui.menu_button("View", |ui| {
                ui.checkbox(&mut self.settings.show_side_panel, "Side panel");
                ui.separator();
                ui.label("Tile cache (MiB)");
                ui.add(egui::DragValue::new(&mut self.settings.cache_mb).range(64..=65536));
                ui.label("Applies to the next slide opened.");
            });
        });
    }

    fn toolbar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            let has_view = self.view.is_some();
            if ui
                .button("Open…")
                .on_hover_text("Open a slide or image (Ctrl+O)")
                .clicked()
            {
                let ctx = ui.ctx().clone();
                self.open_dialog(&ctx);
            }
            ui.separator();
            let mut act =
                |ui: &mut egui::Ui, label: &str, hint: &str, f: &dyn Fn(&mut SlideView)| {
                    if ui
                        .add_enabled(has_view, egui::Button::new(label))
                        .on_hover_text(hint)
                        .clicked()
                        && let Some(v) = self.view.as_mut()
                    {
                        f(v);
                    }
                };
            act(ui, "Fit", "Show the whole slide (F)", &|v| v.fit());
            act(ui, "1:1", "One slide pixel per screen pixel", &|v| {
                v.one_to_one()
            });
            act(ui, "Zoom in", "Zoom in (+ or mouse wheel)", &|v| {
                v.zoom_by(2.0)
            });
            act(ui, "Zoom out", "Zoom out (- or mouse wheel)", &|v| {
                v.zoom_by(0.5)
            });
            ui.separator();
            ui.selectable_value(&mut self.mode, Mode::Viewer, "Viewer");
            ui.selectable_value(&mut self.mode, Mode::Labels, "Labels");
            let training = if self.training.is_running() {
                "Training (running)"
            } else {
                "Training"
            };
            ui.selectable_value(&mut self.mode, Mode::Training, training);
            if let Some(job) = &self.opening {
                ui.separator();
                ui.spinner();
                ui.label(format!("Opening {}…", job.path.display()));
                // The worker finishes on its own; its result is then dropped, and whatever was
                // open stays open.
                if ui
                    .button("Cancel")
                    .on_hover_text("Stop waiting for this file")
                    .clicked()
                {
                    self.opening = None;
                }
            }
        });
    }

    /// Makes the viewer use a model the training panel produced, and goes back to the viewer.
    fn use_model(&mut self, ctx: &egui::Context, task: Task, path: PathBuf) {
        match task {
            Task::Magnification => self.magnification.model_path = Some(path),
            Task::Dmsl => match &self.view {
                Some(v) => {
                    let mpp = v.mpp().map(|m| m.mean());
                    self.heatmap.set_model(ctx, path, v.slide.clone(), mpp);
                }
                None => self.heatmap.model_path = Some(path),
            },
        }
        self.mode = Mode::Viewer;
    }

    fn shortcuts(&mut self, ctx: &egui::Context) {
        if ctx.egui_wants_keyboard_input() {
            return;
        }
        let (open, fit, quit) = ctx.input_mut(|i| {
            (
                i.consume_key(egui::Modifiers::COMMAND, egui::Key::O),
                i.consume_key(egui::Modifiers::NONE, egui::Key::F),
                i.consume_key(egui::Modifiers::COMMAND, egui::Key::Q),
            )
        });
        if quit {
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
        }
        if open {
            self.open_dialog(ctx);
        }
        if fit && let Some(v) = self.view.as_mut() {
            v.fit();
        }
    }

    fn error_window(&mut self, ctx: &egui::Context) {
        let Some(message) = self.errors.first().cloned() else {
            return;
        };
        let mut dismissed = false;
        egui::Window::new("Something went wrong")
            .collapsible(false)
            .resizable(false)
            .anchor(egui::Align2::CENTER_CENTER, [0.0, 0.0])
            .show(ctx, |ui| {
                ui.label(&message);
                if self.view.is_some() {
                    ui.label("The slide that was open is still open.");
                }
                if ui.button("OK").clicked() {
                    dismissed = true;
                }
            });
        if dismissed {
            self.errors.remove(0);
        }
    }

    fn welcome(&mut self, ui: &mut egui::Ui) {
        ui.vertical_centered(|ui| {
            ui.add_space(ui.available_height() * 0.3);
            ui.heading("histolens");
            ui.label("Open a whole-slide image (SVS, NDPI, MRXS, SCN, TIFF…) or a snapshot (PNG, JPEG, TIFF…).");
            if ui.button("Open…").clicked() {
                let ctx = ui.ctx().clone();
                self.open_dialog(&ctx);
            }
            ui.label("…or drop a file on the window.");
        });
    }

    fn drop_hint(&self, ctx: &egui::Context) {
        let hovering = ctx.input(|i| !i.raw.hovered_files.is_empty());
        if !hovering {
            return;
        }
        let painter = ctx.layer_painter(egui::LayerId::new(
            egui::Order::Foreground,
            egui::Id::unique("histolens-drop-hint"),
        ));
        let rect = ctx.content_rect();
        painter.rect_filled(rect, 0.0, egui::Color32::from_black_alpha(160));
        painter.text(
            rect.center(),
            egui::Align2::CENTER_CENTER,
            "Drop to open",
            egui::FontId::proportional(28.0),
            egui::Color32::WHITE,
        );
    }

    /// A benchmark run's frame: pans the view, and once the time is up writes the statistics and
    /// closes. The clock starts when the slide (or, for training, the run) is showing.
    fn bench_step(&mut self, ctx: &egui::Context) {
        let Some((bench, clock)) = self.bench.as_mut() else {
            return;
        };
        let ready =
            self.mode != Mode::Viewer || self.view.as_ref().is_some_and(|v| v.viewport.is_some());
        if !ready {
            return;
        }
        if bench.pan
            && let Some(view) = self.view.as_mut()
            && let Some(vp) = view.viewport.as_mut()
        {
            let (w, h) = view.slide.info().dimensions();
            // One slide pixel per screen pixel, 8 of them per frame along the circle.
            vp.scale = 1.0 / f64::from(ctx.pixels_per_point());
            let radius = 0.3 * (w.min(h) as f64);
            clock.angle += 8.0 / radius.max(1.0);
            vp.center = [
                w as f64 / 2.0 + radius * clock.angle.cos(),
                h as f64 / 2.0 + radius * clock.angle.sin(),
            ];
        }
        if clock.tick(bench, &mut self.frame_stats) {
            window_bench::write_stats(&bench.stats_path, &self.frame_stats);
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
        }
    }

    fn write_frame_stats(&self) {
        if let Some(path) = &self.frame_stats_path {
            window_bench::write_stats(path, &self.frame_stats);
        }
    }

    /// Logs (at info) the process's RSS and how full the tile caches are, once a minute: a long
    /// session's memory can then be read against the cache budget (packaging/soak.sh does).
    fn report_memory(&mut self) {
        const EVERY: std::time::Duration = std::time::Duration::from_secs(60);
        let now = std::time::Instant::now();
        if self
            .last_memory_report
            .is_some_and(|t| now.duration_since(t) < EVERY)
        {
            return;
        }
        self.last_memory_report = Some(now);
        let mib = |b: u64| b >> 20;
        let rss = crate::util::memory::current_rss_bytes().map_or(0, mib);
        match &self.view {
            Some(v) => {
                let s = v.streamer.stats();
                log::info!(
                    "memory: RSS {rss} MiB; decoded tiles {} of {} MiB; textures {} of {} MiB",
                    mib(s.cache_bytes as u64),
                    mib(s.cache_budget as u64),
                    mib(v.textures.used_bytes() as u64),
                    mib(s.cache_budget as u64),
                );
            }
            None => log::info!("memory: RSS {rss} MiB"),
        }
    }
}

impl eframe::App for HistolensApp {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        let ctx = ui.ctx().clone();
        let moving = ctx.input(|i| {
            i.pointer.is_decidedly_dragging()
                || i.smooth_scroll_delta != egui::Vec2::ZERO
                || !i.keys_down.is_empty()
        });
        let busy = moving || self.is_busy() || self.continuous_repaint;
        self.frame_stats.record(frame.info().cpu_usage, busy);
        self.report_memory();
        if self.continuous_repaint {
            ctx.request_repaint();
        }
        self.poll_open_job(&ctx);
        self.bench_step(&ctx);
        self.magnification.poll();
        if let Some(v) = self.view.as_mut() {
            v.estimated_mpp = self.magnification.estimated_mpp(v.slide.path());
        }
        self.gradcam.poll();
        self.training.poll();
        self.heatmap.poll(
            self.view
                .as_ref()
                .and_then(|v| v.viewport)
                .map(|v| v.center),
        );
        self.handle_dropped_files(&ctx);
        self.shortcuts(&ctx);

        egui::Panel::top("menu").show(ui, |ui| {
            self.menu_bar(ui);
            self.toolbar(ui);
        });
        let frame_ms = self.frame_stats.last_cpu_ms();
        let hover = self.view.as_ref().and_then(|v| {
            let [x, y] = v.cursor?;
            self.heatmap.hover_text(v.slide.path(), x, y)
        });
        egui::Panel::bottom("status").show(ui, |ui| {
            status_bar::show(ui, self.view.as_ref(), frame_ms, hover.as_deref())
        });
        if self.mode == Mode::Labels {
            let action = egui::CentralPanel::default()
                .show(ui, |ui| labels::show(ui, &mut self.labels))
                .inner;
            if let LabelsAction::Train(task, data) = action {
                let f = &mut self.training.form;
                f.task = task;
                f.data = data.display().to_string();
                f.run_dir.clear();
                self.mode = Mode::Training;
            }
            self.error_window(&ctx);
            self.drop_hint(&ctx);
            return;
        }
        if self.mode == Mode::Training {
            let action = egui::CentralPanel::default()
                .show(ui, |ui| {
                    egui::ScrollArea::vertical()
                        .auto_shrink([false, false])
                        .show(ui, |ui| training::show(ui, &mut self.training))
                        .inner
                })
                .inner;
            if let TrainingAction::UseModel(task, path) = action {
                self.use_model(&ctx, task, path);
            }
            self.error_window(&ctx);
            self.drop_hint(&ctx);
            return;
        }
        if self.settings.show_side_panel
            && let Some(view) = self.view.as_mut()
        {
            let store_ok = self.calibrations.is_some();
            let mut action = SidePanelAction::None;
            let mut mag_action = MagnificationAction::None;
            let mut heat_action = HeatmapAction::None;
            let mut cam_action = GradcamAction::None;
            let mut region_action = RegionsAction::None;
            let classes: Vec<String> = self
                .labels
                .label_set()
                .map(|s| s.classes().to_vec())
                .unwrap_or_default();
            // Metadata or calibration first; else the estimate, which the panels then say they use.
            let stated = view.mpp().map(|m| m.mean());
            let mpp = stated.or(view.estimated_mpp.map(|e| e.0));
            self.heatmap.scale_estimated = stated.is_none() && mpp.is_some();
            egui::Panel::right("side")
                .resizable(true)
                .default_size(320.0)
                .show(ui, |ui| {
                    egui::ScrollArea::vertical()
                        .auto_shrink([false, false])
                        .show(ui, |ui| {
                            mag_action =
                                magnification::section(ui, &mut self.magnification, &view.slide);
                            heat_action = heatmap::section(ui, &mut self.heatmap, &view.slide, mpp);
                            cam_action = gradcam::section(
                                ui,
                                &mut self.gradcam,
                                self.heatmap.model_path.as_deref(),
                                self.heatmap.loaded_classes(),
                            );
                            region_action = regions::section(ui, &mut self.regions, &classes);
                            action = side_panel::show(
                                ui,
                                view,
                                store_ok,
                                self.cameras.as_ref(),
                                &mut self.property_filter,
                            )
                        });
                });
            match heat_action {
                HeatmapAction::Start => self.heatmap.start(&ctx, view.slide.clone(), mpp),
                HeatmapAction::Cancel => self.heatmap.cancel(),
                HeatmapAction::Model(p) => self.heatmap.set_model(&ctx, p, view.slide.clone(), mpp),
                HeatmapAction::None => {}
            }
            if let RegionsAction::AddSlideToLabels(slide) = region_action {
                self.labels.add(&[slide]);
            }
            // A click, or (following the view) a worker that is free while the view has moved.
            let follow = self.gradcam.follow && !self.gradcam.is_busy();
            let compute = matches!(cam_action, GradcamAction::Compute) || follow;
            if compute && let Some(vp) = view.viewport {
                self.gradcam.start(
                    &ctx,
                    view.slide.clone(),
                    vp.center,
                    mpp,
                    self.heatmap.model_path.clone(),
                    self.heatmap.model_cache(),
                    self.magnification.model_path.clone(),
                );
            }
            match mag_action {
                MagnificationAction::Estimate => self.magnification.start(&ctx, view.slide.clone()),
                MagnificationAction::UseAsCalibration(c) => {
                    action = SidePanelAction::SaveCalibration(c)
                }
                MagnificationAction::None => {}
            }
            match action {
                SidePanelAction::SaveCalibration(c) => {
                    if let Some(msg) =
                        side_panel::save_calibration(self.calibrations.as_mut(), view, c)
                    {
                        self.errors.push(msg);
                    }
                }
                SidePanelAction::SaveCamera(name, camera) => match self.cameras.as_mut() {
                    Some(store) => {
                        if let Err(e) = store.set(&name, camera) {
                            self.errors.push(e.to_string());
                        }
                    }
                    None => self.errors.push(
                        "the camera store could not be read: the camera was not saved".into(),
                    ),
                },
                SidePanelAction::None => {}
            }
        }
        egui::CentralPanel::no_frame().show(ui, |ui| match self.view.as_mut() {
            Some(view) => {
                let heat = self.heatmap.overlay_for(view.slide.path());
                let cam = self.gradcam.overlay_for(view.slide.path());
                let overlays: Vec<_> = heat.iter().chain(cam.iter()).cloned().collect();
                self.regions.slide_opened(view.slide.path());
                view.drawing = self.regions.is_drawing();
                let response = view.show(ui, &overlays);
                if let (Some(canvas), Some(vp)) = (view.canvas_rect, view.viewport) {
                    self.regions.handle_canvas(ui, &response, canvas, &vp);
                    let classes = self.labels.label_set().map_or(&[][..], |s| s.classes());
                    self.regions.paint(ui, canvas, &vp, classes);
                }
                if let Some(canvas) = view.canvas_rect {
                    let heat_legend = heat
                        .is_some()
                        .then(|| heatmap::canvas_legend(ui, canvas, &self.heatmap))
                        .flatten();
                    if cam.is_some()
                        && let Some(title) = self.gradcam.overlay_title()
                    {
                        let slot = usize::from(heat_legend.is_some());
                        super::overlay::legend(ui, canvas, &title, Colormap::Magma, slot);
                    }
                }
                // The probabilities of the cell under the pointer.
                if let Some([x, y]) = view.cursor
                    && let Some(text) = self.heatmap.hover_text(view.slide.path(), x, y)
                    && !response.dragged()
                {
                    response.on_hover_text_at_pointer(text);
                }
            }
            None => self.welcome(ui),
        });
        if let Some(e) = self.view.as_ref().and_then(|v| v.streamer.take_error()) {
            // A tile that cannot be decoded is drawn from coarser levels; say so once, not per tile.
            const PREFIX: &str = "Part of the slide could not be read";
            if !self.errors.iter().any(|m| m.starts_with(PREFIX)) {
                self.errors.push(format!("{PREFIX}: {e}"));
            }
        }
        if let Some(text) = self
            .view
            .as_ref()
            .and_then(|v| self.magnification.badge_text(v.slide.path()))
        {
            magnification::badge(&ctx, &text);
        }
        self.error_window(&ctx);
        self.drop_hint(&ctx);
        if self.opening.is_some() {
            ctx.request_repaint_after(std::time::Duration::from_millis(100));
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, SETTINGS_KEY, &self.settings);
        self.write_frame_stats();
    }

    fn on_exit(&mut self) {
        // A running heatmap stops after its batch (its sidecar keeps the work done).
        self.heatmap.cancel();
        self.write_frame_stats();
    }
}
