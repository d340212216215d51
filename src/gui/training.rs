//! The training panel: choose a task, a dataset, a backbone, a start and the hyperparameters, then
//! start, pause, stop and resume a run while its curves, progress and log update live; when it ends,
//! the evaluation report and "Use this model". Runs are the CLI's (`histolens::runs`): the same
//! trainers, the same folders, so that either can list and resume what the other made.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use egui_plot::{Legend, Line, Plot};

use crate::data::manifest::Split;
use crate::dmsl::train::{DmslTrainConfig, Freeze, Mode};
use crate::magnification::train::TrainConfig;
use crate::nn::backbone::Arch;
use crate::nn::device::DeviceChoice;
use crate::runs::{CurvePoint, Report, RunConfig, RunEvent, RunOutcome, RunSummary};
use crate::util::run::Start;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Magnification,
    Dmsl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    Random,
    Imagenet,
    Checkpoint,
}

/// The options the panel edits (the paper's defaults; a run's own when one is opened).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingForm {
    pub task: Task,
    pub data: String,
    pub run_dir: String,
    pub arch: Arch,
    pub start: StartKind,
    pub start_file: String,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    /// Magnification: the crop side.
    pub input_size: usize,
    /// DMSL: sim, mm, high or low.
    pub mode: Mode,
    /// DMSL: which weights stay fixed.
    pub freeze: Freeze,
    /// DMSL with a frozen backbone: its output computed once per pair and cached.
    pub cache_frozen: bool,
    pub alpha: f64,
    pub beta: f64,
    /// Steps per epoch (0: the whole training split).
    pub steps_per_epoch: usize,
    pub device: DeviceChoice,
}

impl Default for TrainingForm {
    fn default() -> Self {
        TrainingForm {
            task: Task::Dmsl,
            data: String::new(),
            run_dir: String::new(),
            arch: Arch::EFFICIENTNET_LITE0,
            start: StartKind::Random,
            start_file: String::new(),
            epochs: 30,
            batch: 32,
            lr: 1e-3,
            input_size: 224,
            mode: Mode::Sim,
            freeze: Freeze::None,
            cache_frozen: false,
            alpha: 0.5,
            beta: 0.5,
            steps_per_epoch: 0,
            device: DeviceChoice::Auto,
        }
    }
}

impl TrainingForm {
    /// The run's configuration, or what is missing.
    pub fn config(&self) -> Result<RunConfig, String> {
        let start = match self.start {
            StartKind::Random => Start::Random,
            StartKind::Imagenet | StartKind::Checkpoint if self.start_file.trim().is_empty() => {
                return Err("choose the weights file to start from".into());
            }
            StartKind::Imagenet => Start::Imagenet(PathBuf::from(self.start_file.trim())),
            StartKind::Checkpoint => Start::Checkpoint(PathBuf::from(self.start_file.trim())),
        };
        let steps = (self.steps_per_epoch > 0).then_some(self.steps_per_epoch);
        Ok(match self.task {
            Task::Magnification => {
                let mut c = TrainConfig::new(self.arch);
                c.start = start;
                // Round 1 (ASM) takes two thirds of the epochs, round 2 (constant m) the rest.
                c.epochs_asm = (self.epochs * 2).div_ceil(3).max(1);
                c.epochs_constant = self.epochs.saturating_sub(c.epochs_asm);
                c.batch = self.batch;
                c.lr = self.lr;
                c.input_size = self.input_size;
                c.steps_per_epoch = steps;
                RunConfig::Magnification(c)
            }
            Task::Dmsl => {
                let mut c = DmslTrainConfig::new(self.arch);
                c.start = start;
                c.epochs = self.epochs;
                c.batch = self.batch;
                c.lr = self.lr;
                c.mode = self.mode;
                c.freeze = self.freeze;
                c.cache_frozen = self.cache_frozen && self.freeze != Freeze::None;
                c.alpha = self.alpha;
                c.beta = self.beta;
                c.steps_per_epoch = steps;
                RunConfig::Dmsl(c)
            }
        })
    }

    /// The form of an existing run's configuration.
    fn from_run(summary: &RunSummary) -> Self {
        let mut f = TrainingForm {
            run_dir: summary.dir.display().to_string(),
            data: summary
                .info
                .as_ref()
                .map(|i| i.data.display().to_string())
                .unwrap_or_default(),
            ..TrainingForm::default()
        };
        let start = match &summary.config {
            RunConfig::Magnification(c) => {
                f.task = Task::Magnification;
                f.arch = c.arch;
                f.epochs = c.total_epochs();
                f.batch = c.batch;
                f.lr = c.lr;
                f.input_size = c.input_size;
                f.steps_per_epoch = c.steps_per_epoch.unwrap_or(0);
                &c.start
            }
            RunConfig::Dmsl(c) => {
                f.task = Task::Dmsl;
                f.arch = c.arch;
                f.epochs = c.epochs;
                f.batch = c.batch;
                f.lr = c.lr;
                f.mode = c.mode;
                f.freeze = c.freeze;
                f.cache_frozen = c.cache_frozen;
                f.alpha = c.alpha;
                f.beta = c.beta;
                f.steps_per_epoch = c.steps_per_epoch.unwrap_or(0);
                &c.start
            }
        };
        (f.start, f.start_file) = match start {
            Start::Random => (StartKind::Random, String::new()),
            Start::Imagenet(p) => (StartKind::Imagenet, p.display().to_string()),
            Start::Checkpoint(p) => (StartKind::Checkpoint, p.display().to_string()),
        };
        f
    }
}

/// Where the current epoch stands.
#[derive(Debug, Clone, Copy)]
pub struct StepProgress {
    pub epoch: usize,
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
    pub samples_per_second: f64,
}

/// How the model of a finished run fared in its evaluation.
enum Evaluation {
    Report(Report),
    /// The model loads, but no evaluation could be made (e.g. no test or validation split).
    NotEvaluated(String),
    /// The model cannot be loaded for inference (e.g. a magnification model stopped before its
    /// second round, which has no scale factor m yet): not offered to the viewer.
    Unusable(String),
}

enum JobMessage {
    Event(RunEvent),
    /// The run ended: its outcome and the evaluation of its model (or why not).
    Done(Result<(RunOutcome, Evaluation), String>),
}

struct Job {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    rx: Receiver<JobMessage>,
    started: Instant,
    /// Epochs already done when this job started (a resumed run).
    first_epoch: usize,
    config: RunConfig,
}

/// What the panel asks the app to do.
pub enum TrainingAction {
    None,
    /// Make the viewer use this model for the task.
    UseModel(Task, PathBuf),
}

pub struct TrainingState {
    pub form: TrainingForm,
    job: Option<Job>,
    pub curve: Vec<CurvePoint>,
    pub progress: Option<StepProgress>,
    pub log: Vec<String>,
    pub report: Option<Report>,
    /// The model the last run produced.
    pub model: Option<PathBuf>,
    pub message: Option<String>,
    /// Where new runs go, and the runs found there.
    pub runs_root: PathBuf,
    runs: Vec<RunSummary>,
    runs_listed: Option<Instant>,
    /// The run opened last and the form it gave: starting with the form unchanged resumes it with
    /// its exact configuration (options the form does not show included).
    opened: Option<(TrainingForm, RunConfig)>,
}

const LOG_LINES: usize = 200;

impl TrainingState {
    pub fn new(runs_root: PathBuf) -> Self {
        TrainingState {
            form: TrainingForm::default(),
            job: None,
            curve: Vec::new(),
            progress: None,
            log: Vec::new(),
            report: None,
            model: None,
            message: None,
            runs_root,
            runs: Vec::new(),
            runs_listed: None,
            opened: None,
        }
    }

    pub fn is_running(&self) -> bool {
        self.job.is_some()
    }

    pub fn is_paused(&self) -> bool {
        self.job
            .as_ref()
            .is_some_and(|j| j.pause.load(Ordering::Relaxed))
    }

    /// Starts (or resumes, when the folder holds a run of the same options) the run the form describes.
    pub fn start(&mut self, ctx: &egui::Context) {
        self.message = None;
        if self.job.is_some() {
            return;
        }
        let unchanged = |(form, config): &(TrainingForm, RunConfig)| {
            let same = TrainingForm {
                device: form.device,
                ..self.form.clone()
            };
            (same == *form).then(|| config.clone())
        };
        let config = match self
            .opened
            .as_ref()
            .and_then(unchanged)
            .map_or_else(|| self.form.config(), Ok)
        {
            Ok(c) => c,
            Err(e) => {
                self.message = Some(e);
                return;
            }
        };
        let data = PathBuf::from(self.form.data.trim());
        if !data.is_file() {
            self.message = Some(format!(
                "no dataset manifest at \"{}\": build one (Labels, or histolens dataset) or choose one",
                data.display()
            ));
            return;
        }
        if self.form.run_dir.trim().is_empty() {
            let stamp = unix_seconds();
            let name = format!("{}-{}-{stamp}", config.task(), self.form.arch.name());
            self.form.run_dir = self.runs_root.join(name).display().to_string();
        }
        let dir = PathBuf::from(self.form.run_dir.trim());
        // A resumed run shows its earlier epochs.
        let earlier = crate::runs::read_run(&dir)
            .map(|s| s.curve)
            .unwrap_or_default();
        let first_epoch = earlier.last().map_or(0, |p| p.epoch);
        self.curve = earlier;
        self.progress = None;
        self.report = None;
        self.model = None;
        self.log.clear();
        let (tx, rx) = crossbeam_channel::unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let (device_choice, repaint) = (self.form.device, ctx.clone());
        let (job_stop, job_pause, job_config) = (stop.clone(), pause.clone(), config.clone());
        let spawned = std::thread::Builder::new()
            .name("training".into())
            .spawn(move || {
                let result = super::run_training_work(|| {
                    run_job(
                        &job_config,
                        &data,
                        &dir,
                        device_choice,
                        &job_stop,
                        &job_pause,
                        &tx,
                        &repaint,
                    )
                });
                let _ = tx.send(JobMessage::Done(result));
                repaint.request_repaint();
            });
        match spawned {
            Ok(_) => {
                self.job = Some(Job {
                    stop,
                    pause,
                    rx,
                    started: Instant::now(),
                    first_epoch,
                    config,
                })
            }
            Err(e) => self.message = Some(format!("cannot start a worker: {e}")),
        }
    }

    /// Stops after the current step; the last epoch's checkpoint stays and the run can be resumed.
    pub fn stop(&mut self) {
        if let Some(j) = &self.job {
            j.stop.store(true, Ordering::Relaxed);
            j.pause.store(false, Ordering::Relaxed);
        }
    }

    pub fn set_paused(&mut self, paused: bool) {
        if let Some(j) = &self.job {
            j.pause.store(paused, Ordering::Relaxed);
        }
    }

    /// Takes the worker's news.
    pub fn poll(&mut self) {
        let Some(job) = &self.job else { return };
        let metric_name = job.config.metric_name();
        let messages: Vec<JobMessage> = job.rx.try_iter().collect();
        let mut done = None;
        for m in messages {
            match m {
                JobMessage::Event(RunEvent::Step {
                    epoch,
                    step,
                    steps,
                    loss,
                    samples_per_second,
                }) => {
                    self.progress = Some(StepProgress {
                        epoch,
                        step,
                        steps,
                        loss,
                        samples_per_second,
                    })
                }
                JobMessage::Event(RunEvent::Epoch(p)) => {
                    self.curve.retain(|q| q.epoch < p.epoch);
                    self.curve.push(p);
                    self.push_log(format!(
                        "epoch {}: train loss {:.4}, val loss {}, {} {}",
                        p.epoch,
                        p.train_loss,
                        p.val_loss.map_or("-".into(), |v| format!("{v:.4}")),
                        metric_name,
                        p.metric.map_or("-".into(), |v| format!("{v:.3}"))
                    ));
                }
                JobMessage::Event(RunEvent::Info(s)) => self.push_log(s),
                JobMessage::Done(r) => done = Some(r),
            }
        }
        if let Some(result) = done {
            self.job = None;
            match result {
                Ok((outcome, report)) => {
                    self.model = None;
                    self.push_log(format!(
                        "{} after {} epochs; model {}",
                        if outcome.stopped {
                            "stopped"
                        } else {
                            "finished"
                        },
                        outcome.epochs_done,
                        outcome.model.display()
                    ));
                    match report {
                        Evaluation::Report(r) => {
                            self.report = Some(r);
                            self.model = Some(outcome.model);
                        }
                        Evaluation::NotEvaluated(e) => {
                            self.push_log(format!("no evaluation: {e}"));
                            self.model = Some(outcome.model);
                        }
                        Evaluation::Unusable(e) => {
                            self.push_log(format!("{e}: resume the run to make a usable model"))
                        }
                    }
                }
                Err(e) => self.message = Some(e),
            }
            self.runs_listed = None;
        }
    }

    fn push_log(&mut self, line: String) {
        self.log.push(line);
        if self.log.len() > LOG_LINES {
            self.log.drain(..self.log.len() - LOG_LINES);
        }
    }

    /// The estimated time left: steps still to run at the pace since the job started.
    fn eta(&self) -> Option<Duration> {
        let job = self.job.as_ref()?;
        let p = self.progress?;
        let total = job.config.total_epochs();
        let per_epoch = p.steps.max(1);
        let done_now = p.epoch.saturating_sub(job.first_epoch + 1) * per_epoch + p.step;
        let left = total.saturating_sub(p.epoch) * per_epoch + per_epoch.saturating_sub(p.step);
        let elapsed = job.started.elapsed().as_secs_f64();
        (done_now > 0).then(|| Duration::from_secs_f64(elapsed / done_now as f64 * left as f64))
    }

    /// Opens a run folder (the panel's or the CLI's): its options, curves and report.
    pub fn open_run(&mut self, dir: &Path) {
        match crate::runs::read_run(dir) {
            Ok(s) => {
                self.form = TrainingForm::from_run(&s);
                self.opened = Some((self.form.clone(), s.config.clone()));
                self.curve = s.curve.clone();
                self.report = s.report.clone();
                self.model = s.model.clone();
                self.progress = None;
                self.message = None;
                self.log = vec![format!(
                    "opened {} ({} of {} epochs)",
                    s.dir.display(),
                    s.epochs_done(),
                    s.config.total_epochs()
                )];
            }
            Err(e) => self.message = Some(e.to_string()),
        }
    }

    fn refresh_runs(&mut self) {
        let stale = self
            .runs_listed
            .is_none_or(|t| t.elapsed() > Duration::from_secs(5));
        if stale {
            self.runs = crate::runs::list_runs(&self.runs_root);
            self.runs_listed = Some(Instant::now());
        }
    }
}

/// Seconds since the Unix epoch: a sortable run-folder stamp.
fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[allow(clippy::too_many_arguments)]
fn run_job(
    config: &RunConfig,
    data: &Path,
    dir: &Path,
    device: DeviceChoice,
    stop: &AtomicBool,
    pause: &AtomicBool,
    tx: &Sender<JobMessage>,
    repaint: &egui::Context,
) -> Result<(RunOutcome, Evaluation), String> {
    let device = crate::nn::device::select(device).map_err(|e| e.to_string())?;
    let outcome = crate::runs::train(config, data, dir, &device, stop, |e| {
        let _ = tx.send(JobMessage::Event(e));
        repaint.request_repaint();
        // Paused: the worker waits between steps (the run keeps its place) until resumed or stopped.
        while pause.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .map_err(|e| e.to_string())?;
    // The report: the test split, or the validation split when there is no test split.
    let evaluate = |split| crate::runs::evaluate(config, &outcome.model, data, split, dir, &device);
    let evaluation = match evaluate(Split::Test).or_else(|_| evaluate(Split::Val)) {
        Ok(r) => Evaluation::Report(r),
        Err(e @ crate::runs::RunsError::Model { .. }) => Evaluation::Unusable(e.to_string()),
        Err(e) => Evaluation::NotEvaluated(e.to_string()),
    };
    Ok((outcome, evaluation))
}

/// The training view.
pub fn show(ui: &mut egui::Ui, state: &mut TrainingState) -> TrainingAction {
    let mut action = TrainingAction::None;
    let running = state.is_running();
    ui.heading("Training");
    egui::Grid::new("training-form")
        .num_columns(2)
        .spacing([12.0, 6.0])
        .show(ui, |ui| {
            let f = &mut state.form;
            ui.label("Task");
            ui.add_enabled_ui(!running, |ui| {
                ui.horizontal(|ui| {
                    ui.radio_value(&mut f.task, Task::Dmsl, "DMSL (two magnifications)");
                    ui.radio_value(&mut f.task, Task::Magnification, "Magnification");
                });
            });
            ui.end_row();
            ui.label("Dataset");
            ui.horizontal(|ui| {
                ui.add_enabled(
                    !running,
                    egui::TextEdit::singleline(&mut f.data)
                        .hint_text("pairs.csv or manifest.csv")
                        .desired_width(360.0),
                );
                if ui
                    .add_enabled(!running, egui::Button::new("Choose…"))
                    .clicked()
                    && let Some(p) = rfd::FileDialog::new()
                        .add_filter("manifest", &["csv"])
                        .pick_file()
                {
                    f.data = p.display().to_string();
                }
            });
            ui.end_row();
            ui.label("Run folder");
            ui.add_enabled(
                !running,
                egui::TextEdit::singleline(&mut f.run_dir)
                    .hint_text("a new folder under the runs folder")
                    .desired_width(360.0),
            );
            ui.end_row();
            ui.label("Backbone");
            ui.add_enabled_ui(!running, |ui| {
                egui::ComboBox::from_id_salt("training-arch")
                    .selected_text(f.arch.name())
                    .show_ui(ui, |ui| {
                        for a in Arch::all() {
                            ui.selectable_value(&mut f.arch, a, a.name());
                        }
                    });
            });
            ui.end_row();
            ui.label("Start");
            ui.add_enabled_ui(!running, |ui| {
                ui.horizontal(|ui| {
                    ui.radio_value(&mut f.start, StartKind::Random, "Random");
                    ui.radio_value(&mut f.start, StartKind::Imagenet, "ImageNet");
                    ui.radio_value(&mut f.start, StartKind::Checkpoint, "Checkpoint");
                    if f.start != StartKind::Random {
                        ui.add(
                            egui::TextEdit::singleline(&mut f.start_file)
                                .hint_text("weights .safetensors")
                                .desired_width(200.0),
                        );
                    }
                });
            });
            ui.end_row();
            ui.label("Hyperparameters");
            ui.add_enabled_ui(!running, |ui| {
                ui.horizontal_wrapped(|ui| {
                    ui.add(
                        egui::DragValue::new(&mut f.epochs)
                            .range(1..=1000)
                            .prefix("epochs "),
                    );
                    ui.add(
                        egui::DragValue::new(&mut f.batch)
                            .range(1..=512)
                            .prefix("batch "),
                    );
                    ui.add(
                        egui::DragValue::new(&mut f.lr)
                            .range(1e-6..=1.0)
                            .speed(1e-4)
                            .prefix("lr "),
                    );
                    ui.add(
                        egui::DragValue::new(&mut f.steps_per_epoch)
                            .range(0..=100_000)
                            .prefix("steps/epoch "),
                    )
                    .on_hover_text("0: the whole training split each epoch");
                    match f.task {
                        Task::Magnification => {
                            ui.add(
                                egui::DragValue::new(&mut f.input_size)
                                    .range(75..=1024)
                                    .prefix("crop "),
                            );
                        }
                        Task::Dmsl => {
                            egui::ComboBox::from_id_salt("training-mode")
                                .selected_text(mode_name(f.mode))
                                .show_ui(ui, |ui| {
                                    for m in [Mode::Sim, Mode::Mm, Mode::High, Mode::Low] {
                                        ui.selectable_value(&mut f.mode, m, mode_name(m));
                                    }
                                });
                            ui.add(
                                egui::DragValue::new(&mut f.alpha)
                                    .range(0.0..=10.0)
                                    .speed(0.05)
                                    .prefix("α "),
                            );
                            ui.add(
                                egui::DragValue::new(&mut f.beta)
                                    .range(0.0..=10.0)
                                    .speed(0.05)
                                    .prefix("β "),
                            );
                            egui::ComboBox::from_id_salt("training-freeze")
                                .selected_text(freeze_name(f.freeze))
                                .show_ui(ui, |ui| {
                                    for z in
                                        [Freeze::None, Freeze::AllButLastBlock, Freeze::Backbone]
                                    {
                                        ui.selectable_value(&mut f.freeze, z, freeze_name(z));
                                    }
                                });
                            if f.freeze != Freeze::None {
                                ui.checkbox(&mut f.cache_frozen, "Cache frozen features")
                                    .on_hover_text(
                                        "Run the frozen part once per pair (no augmentation): \
                                         every epoch after costs only what trains",
                                    );
                            }
                        }
                    }
                });
            });
            ui.end_row();
            ui.label("Device");
            ui.add_enabled_ui(!running, |ui| {
                ui.horizontal(|ui| {
                    for (d, name) in [
                        (DeviceChoice::Auto, "auto"),
                        (DeviceChoice::Cpu, "CPU"),
                        (DeviceChoice::Cuda, "CUDA"),
                        (DeviceChoice::Metal, "Metal"),
                    ] {
                        ui.radio_value(&mut f.device, d, name);
                    }
                });
            });
            ui.end_row();
        });

    ui.horizontal(|ui| {
        if !running {
            let resumable = Path::new(state.form.run_dir.trim())
                .join("state.json")
                .is_file();
            let label = if resumable {
                "Resume training"
            } else {
                "Start training"
            };
            if ui.button(label).clicked() {
                state.start(ui.ctx());
            }
            if ui
                .button("New run")
                .on_hover_text("A fresh run folder")
                .clicked()
            {
                state.form.run_dir.clear();
            }
        } else {
            let paused = state.is_paused();
            if ui
                .button(if paused { "Continue" } else { "Pause" })
                .clicked()
            {
                state.set_paused(!paused);
            }
            if ui
                .button("Stop")
                .on_hover_text("Stops after this step; the run can be resumed")
                .clicked()
            {
                state.stop();
            }
        }
        if let Some(model) = state.model.clone().filter(|_| !running)
            && ui
                .button("Use this model")
                .on_hover_text(model.display().to_string())
                .clicked()
        {
            action = TrainingAction::UseModel(state.form.task, model);
        }
    });
    if let Some(m) = &state.message {
        ui.colored_label(ui.visuals().error_fg_color, m);
    }
    if let (Some(p), Some(job)) = (state.progress, state.job.as_ref()) {
        let total = job.config.total_epochs().max(1);
        let fraction = ((p.epoch.saturating_sub(1)) as f32 + p.step as f32 / p.steps.max(1) as f32)
            / total as f32;
        let eta = state
            .eta()
            .map_or(String::new(), |d| format!(" · ETA {}", format_duration(d)));
        ui.add(
            egui::ProgressBar::new(fraction.clamp(0.0, 1.0)).text(format!(
                "epoch {}/{total} · step {}/{} · loss {:.4} · {:.1} samples/s{eta}{}",
                p.epoch,
                p.step,
                p.steps,
                p.loss,
                p.samples_per_second,
                if state.is_paused() { " · paused" } else { "" }
            )),
        );
    }
    curves(ui, &state.curve, state.form.task);
    if let Some(r) = &state.report {
        ui.label(egui::RichText::new("Evaluation").strong());
        ui.label(egui::RichText::new(r.table()).monospace().small());
    }
    egui::CollapsingHeader::new("Log")
        .default_open(true)
        .show(ui, |ui| {
            egui::ScrollArea::vertical()
                .max_height(120.0)
                .stick_to_bottom(true)
                .show(ui, |ui| {
                    for l in &state.log {
                        ui.label(egui::RichText::new(l).small());
                    }
                });
        });
    egui::CollapsingHeader::new(format!("Runs in {}", state.runs_root.display()))
        .default_open(false)
        .show(ui, |ui| {
            // Listed only while shown (each run's log is read), and again every few seconds.
            state.refresh_runs();
            let mut open = None;
            for r in &state.runs {
                ui.horizontal(|ui| {
                    if ui
                        .add_enabled(!running, egui::Button::new("Open"))
                        .clicked()
                    {
                        open = Some(r.dir.clone());
                    }
                    ui.label(format!(
                        "{} · {} · {}/{} epochs · best val {}",
                        r.dir
                            .file_name()
                            .map_or(String::new(), |n| n.to_string_lossy().into()),
                        r.config.task(),
                        r.epochs_done(),
                        r.config.total_epochs(),
                        r.best_val_loss().map_or("-".into(), |v| format!("{v:.4}"))
                    ));
                });
            }
            if ui
                .add_enabled(!running, egui::Button::new("Open a run folder…"))
                .clicked()
                && let Some(d) = rfd::FileDialog::new().pick_folder()
            {
                open = Some(d);
            }
            if let Some(d) = open {
                state.open_run(&d);
            }
        });
    action
}

fn freeze_name(f: Freeze) -> &'static str {
    match f {
        Freeze::None => "train everything",
        Freeze::AllButLastBlock => "train the last block",
        Freeze::Backbone => "train the classifiers",
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Sim => "SIM (CE + SIM)",
        Mode::Mm => "MM (CE only)",
        Mode::High => "high magnification only",
        Mode::Low => "low magnification only",
    }
}

fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// Training and validation loss per epoch, and the task's validation metric.
fn curves(ui: &mut egui::Ui, curve: &[CurvePoint], task: Task) {
    if curve.is_empty() {
        return;
    }
    let line = |name: &str, f: &dyn Fn(&CurvePoint) -> Option<f64>| {
        let pts: Vec<[f64; 2]> = curve
            .iter()
            .filter_map(|p| f(p).filter(|v| v.is_finite()).map(|v| [p.epoch as f64, v]))
            .collect();
        Line::new(name.to_string(), pts)
    };
    let metric = match task {
        Task::Magnification => "val MAE (x)",
        Task::Dmsl => "val accuracy",
    };
    ui.columns(2, |cols| {
        Plot::new("training-loss")
            .height(180.0)
            .legend(Legend::default())
            .x_axis_label("epoch")
            .show(&mut cols[0], |p| {
                p.line(line("train loss", &|c| Some(c.train_loss)));
                p.line(line("val loss", &|c| c.val_loss));
            });
        Plot::new("training-metric")
            .height(180.0)
            .legend(Legend::default())
            .x_axis_label("epoch")
            .show(&mut cols[1], |p| {
                p.line(line(metric, &|c| c.metric));
            });
    });
}

impl Drop for TrainingState {
    /// Closing the window stops the run after its step (its last checkpoint stays).
    fn drop(&mut self) {
        self.stop();
    }
}
