//! The magnification estimate in the window: a worker thread loads the model once and scores the open
//! snapshot (automatically) or slide (automatically when its metadata has no µm/px, else on request);
//! the result is shown as a badge over the view and in the side panel, where it can become the file's
//! calibration.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crossbeam_channel::Receiver;
use egui::RichText;

use crate::magnification::estimate::check_file;
use crate::magnification::{Check, MagnificationModel};
use crate::slide::{Calibration, Slide};

const CROPS: usize = 16;

/// An estimate and its comparison with the pixel size the file states (slides and snapshots alike).
pub type Outcome = Check;

/// An estimate and the trained range of the model that made it.
type JobResult = Result<(Outcome, Option<(f64, f64)>), String>;

type Cached = Arc<Mutex<Option<(PathBuf, Arc<MagnificationModel>)>>>;

pub struct MagnificationState {
    /// The model file in use (the bundled one unless the user picked another).
    pub model_path: Option<PathBuf>,
    cached: Cached,
    job: Option<(PathBuf, Receiver<JobResult>)>,
    /// The last result and the file it is for.
    pub result: Option<(PathBuf, Result<Outcome, String>)>,
    /// The magnifications the model that made the last result was trained on.
    trained_range: Option<(f64, f64)>,
}

impl Default for MagnificationState {
    fn default() -> Self {
        MagnificationState {
            model_path: crate::default_magnification_model(),
            cached: Default::default(),
            job: None,
            result: None,
            trained_range: None,
        }
    }
}

fn load_cached(cached: &Cached, path: &Path) -> Result<Arc<MagnificationModel>, String> {
    let mut guard = cached
        .lock()
        .map_err(|_| "model cache poisoned".to_string())?;
    if let Some((p, m)) = guard.as_ref()
        && p == path
    {
        return Ok(m.clone());
    }
    let device = crate::nn::device::select(crate::nn::device::DeviceChoice::Auto)
        .map_err(|e| e.to_string())?;
    let model = Arc::new(MagnificationModel::load(path, &device).map_err(|e| {
        format!(
            "cannot load the magnification model {}: {e}",
            path.display()
        )
    })?);
    *guard = Some((path.to_path_buf(), model.clone()));
    Ok(model)
}

fn run(model: &MagnificationModel, slide: &Slide) -> Result<Outcome, String> {
    check_file(model, slide, CROPS).map_err(|e| e.to_string())
}

impl MagnificationState {
    pub fn is_busy(&self) -> bool {
        self.job.is_some()
    }

    /// The result for `path`, if it is the last one computed.
    pub fn result_for(&self, path: &Path) -> Option<&Result<Outcome, String>> {
        self.result
            .as_ref()
            .filter(|(p, _)| p == path)
            .map(|(_, r)| r)
    }

    /// Starts scoring `slide` in a worker thread (replacing any running job's result).
    pub fn start(&mut self, ctx: &egui::Context, slide: Arc<Slide>) {
        let path = slide.path().to_path_buf();
        let Some(model_path) = self.model_path.clone() else {
            self.result = Some((
                path,
                Err("no magnification model: none is bundled; choose one in the side panel".into()),
            ));
            return;
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        let cached = self.cached.clone();
        let repaint = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("magnification".into())
            .spawn(move || {
                let result = super::run_model_work(|| {
                    load_cached(&cached, &model_path)
                        .and_then(|m| run(&m, &slide).map(|o| (o, m.range())))
                });
                let _ = tx.send(result);
                repaint.request_repaint();
            });
        match spawned {
            Ok(_) => self.job = Some((path, rx)),
            Err(e) => self.result = Some((path, Err(format!("cannot start a worker: {e}")))),
        }
    }

    /// Collects a finished job.
    pub fn poll(&mut self) {
        let Some((path, rx)) = &self.job else { return };
        match rx.try_recv() {
            Ok(r) => {
                let r = r.map(|(outcome, range)| {
                    self.trained_range = range;
                    outcome
                });
                self.result = Some((path.clone(), r));
                self.job = None;
            }
            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                self.result = Some((
                    path.clone(),
                    Err("the estimate stopped unexpectedly".into()),
                ));
                self.job = None;
            }
            Err(crossbeam_channel::TryRecvError::Empty) => {}
        }
    }

    /// The estimated µm/px of `path` and its relative uncertainty (half the crops' interquartile
    /// range, at least 10%), for a scale bar that has nothing better.
    pub fn estimated_mpp(&self, path: &Path) -> Option<(f64, f64)> {
        let e = &self.result_for(path)?.as_ref().ok()?.estimate;
        (e.mpp.is_finite() && e.mpp > 0.0)
            .then(|| (e.mpp, (e.spread / 2.0 / e.magnification).max(0.1)))
    }

    /// The short text of the badge over the view.
    pub fn badge_text(&self, path: &Path) -> Option<String> {
        if self.job.as_ref().is_some_and(|(p, _)| p == path) {
            return Some("Estimating magnification…".into());
        }
        match self.result_for(path)? {
            Ok(o) => {
                let e = &o.estimate;
                // Metadata first: a stated pixel size leads, the estimate checks it.
                let mut s = match (o.metadata_mpp, o.relative_difference) {
                    (Some(m), Some(d)) => format!(
                        "{m:.3} µm/px ({}) · estimate {:.1}x {} ({:+.0}%)",
                        o.metadata_source.map_or("metadata", |s| s.label()),
                        e.magnification,
                        if o.mismatch { "MISMATCH" } else { "agrees" },
                        100.0 * d
                    ),
                    _ => format!(
                        "Estimated {:.1}x · {:.3} µm/px · ±{:.1}x",
                        e.magnification,
                        e.mpp,
                        e.spread / 2.0
                    ),
                };
                if e.out_of_range {
                    s += " · outside the trained range";
                }
                if let Some((a, b)) = self.trained_range {
                    s += &format!(" (model trained on {a:.0}x–{b:.0}x)");
                }
                if e.disagreement {
                    s += " · nuclei disagree";
                }
                Some(s)
            }
            Err(e) => Some(format!("Magnification: {e}")),
        }
    }
}

/// What the side panel section asks for.
pub enum MagnificationAction {
    None,
    Estimate,
    UseAsCalibration(Calibration),
}

/// The side panel section for the open file.
pub fn section(
    ui: &mut egui::Ui,
    state: &mut MagnificationState,
    slide: &Slide,
) -> MagnificationAction {
    let mut action = MagnificationAction::None;
    egui::CollapsingHeader::new("Magnification estimate")
        .default_open(true)
        .show(ui, |ui| {
            let model_name = state
                .model_path
                .as_ref()
                .and_then(|p| p.file_name())
                .map_or("none".to_string(), |n| n.to_string_lossy().into_owned());
            ui.horizontal(|ui| {
                ui.label(format!("Model: {model_name}"));
                if ui.button("Choose…").clicked()
                    && let Some(p) = rfd::FileDialog::new()
                        .add_filter("histolens model", &["safetensors"])
                        .pick_file()
                {
                    state.model_path = Some(p);
                }
            });
            let label = if slide.info().is_whole_slide() {
                "Check magnification"
            } else {
                "Estimate magnification"
            };
            if ui
                .add_enabled(!state.is_busy(), egui::Button::new(label))
                .clicked()
            {
                action = MagnificationAction::Estimate;
            }
            if state.is_busy() {
                ui.horizontal(|ui| {
                    ui.spinner();
                    ui.label("Scoring crops on tissue…");
                });
            }
            let Some(result) = state.result_for(slide.path()) else {
                return;
            };
            match result {
                Err(e) => {
                    ui.colored_label(ui.visuals().warn_fg_color, e);
                }
                Ok(o) => {
                    let e = &o.estimate;
                    egui::Grid::new("mag-estimate")
                        .num_columns(2)
                        .show(ui, |ui| {
                            ui.label("Estimate");
                            ui.strong(format!("{:.1}x ({:.3} µm/px)", e.magnification, e.mpp));
                            ui.end_row();
                            // The network and the nuclei ruler (the crops' spread on hover).
                            ui.label("Readings");
                            ui.label(e.readings()).on_hover_text(format!(
                                "spread (IQR) {:.1}x over {} crops",
                                e.spread, e.crops
                            ));
                            ui.end_row();
                            if let (Some(m), Some(d)) = (o.metadata_mpp, o.relative_difference) {
                                ui.label("Metadata");
                                ui.label(format!(
                                    "{m:.3} µm/px: {} ({:+.0}%)",
                                    if o.mismatch { "MISMATCH" } else { "agrees" },
                                    100.0 * d
                                ))
                                .on_hover_text(o.describe().unwrap_or_default());
                                ui.end_row();
                            }
                        });
                    for w in &e.warnings {
                        ui.colored_label(ui.visuals().warn_fg_color, w);
                    }
                    let valid = e.mpp.is_finite() && e.mpp > 0.0;
                    if ui
                        .add_enabled(
                            valid,
                            egui::Button::new("Use the estimate as this file's µm/px"),
                        )
                        .on_hover_text("Saved as the file's calibration; the scale bar follows it")
                        .clicked()
                    {
                        action = MagnificationAction::UseAsCalibration(Calibration {
                            mpp: Some(e.mpp),
                            objective_power: None,
                        });
                    }
                }
            }
        });
    action
}

/// The badge in the top-left corner of the view.
pub fn badge(ctx: &egui::Context, text: &str) {
    egui::Area::new(egui::Id::unique("histolens-magnification-badge"))
        .anchor(egui::Align2::LEFT_TOP, [12.0, 72.0])
        .interactable(false)
        .show(ctx, |ui| {
            egui::Frame::popup(ui.style()).show(ui, |ui| {
                ui.add(
                    egui::Label::new(RichText::new(text).strong())
                        .wrap_mode(egui::TextWrapMode::Extend),
                );
            });
        });
}
