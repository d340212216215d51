//! Training runs as the CLI and the window share them: which task a run folder holds, its curves,
//! one entry point that trains either task, and the evaluation report written when a run ends.
//!
//! A run folder (see [`crate::util::run::RunFiles`]) holds `config.json` (the task's options),
//! `run.json` (the task and the dataset, so that a run can be resumed from its folder alone),
//! `log.jsonl`, the checkpoints and `report.json`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::data::manifest::Split;
use crate::dmsl::train::{
    DmslEpochLog, DmslReport, DmslTrainConfig, DmslTrainError, DmslTrainEvent,
};
use crate::magnification::train::{EpochLog, TrainConfig, TrainError, TrainEvent};
use crate::magnification::{MagnificationMetrics, MagnificationModel};
use crate::util::run::{RunFiles, read_json, read_lines, write_json};

/// The options of a run of either task.
#[derive(Debug, Clone, PartialEq)]
pub enum RunConfig {
    Magnification(TrainConfig),
    Dmsl(DmslTrainConfig),
}

impl RunConfig {
    pub fn task(&self) -> &'static str {
        match self {
            RunConfig::Magnification(_) => "magnification",
            RunConfig::Dmsl(_) => "dmsl",
        }
    }

    pub fn total_epochs(&self) -> usize {
        match self {
            RunConfig::Magnification(c) => c.total_epochs(),
            RunConfig::Dmsl(c) => c.epochs,
        }
    }

    /// What the curve's metric is, for axis labels and tables.
    pub fn metric_name(&self) -> &'static str {
        match self {
            RunConfig::Magnification(_) => "val MAE (x)",
            RunConfig::Dmsl(_) => "val accuracy",
        }
    }

    /// The run's `config.json`, whichever task wrote it.
    fn read(dir: &Path) -> Result<RunConfig, RunsError> {
        let path = RunFiles::new(dir).config;
        let bytes = std::fs::read(&path).map_err(|source| RunsError::Io {
            path: path.clone(),
            source,
        })?;
        if let Ok(c) = serde_json::from_slice::<DmslTrainConfig>(&bytes) {
            return Ok(RunConfig::Dmsl(c));
        }
        serde_json::from_slice::<TrainConfig>(&bytes)
            .map(RunConfig::Magnification)
            .map_err(|_| RunsError::NotARun(dir.to_path_buf()))
    }
}

/// `run.json`: what a run trains on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub task: String,
    /// The dataset manifest.
    pub data: PathBuf,
}

/// One epoch on the curves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurvePoint {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    /// The task's validation metric ([`RunConfig::metric_name`]).
    pub metric: Option<f64>,
    pub samples_per_second: f64,
}

impl From<&EpochLog> for CurvePoint {
    fn from(l: &EpochLog) -> Self {
        CurvePoint {
            epoch: l.epoch,
            train_loss: l.train_loss,
            val_loss: l.val_loss,
            metric: l.val_mae,
            samples_per_second: l.images_per_second,
        }
    }
}

impl From<&DmslEpochLog> for CurvePoint {
    fn from(l: &DmslEpochLog) -> Self {
        CurvePoint {
            epoch: l.epoch,
            train_loss: l.train_loss,
            val_loss: l.val_loss,
            metric: l.val_accuracy,
            samples_per_second: l.pairs_per_second,
        }
    }
}

/// What a run folder holds.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub dir: PathBuf,
    pub config: RunConfig,
    pub info: Option<RunInfo>,
    pub curve: Vec<CurvePoint>,
    /// The model to use: the best checkpoint, else the last one, if any.
    pub model: Option<PathBuf>,
    pub report: Option<Report>,
}

impl RunSummary {
    pub fn epochs_done(&self) -> usize {
        self.curve.last().map_or(0, |p| p.epoch)
    }

    pub fn best_val_loss(&self) -> Option<f64> {
        self.curve
            .iter()
            .filter_map(|p| p.val_loss)
            .min_by(f64::total_cmp)
    }
}

/// The evaluation of a finished (or stopped) run on its test split.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "lowercase")]
pub enum Report {
    Magnification {
        split: Split,
        metrics: MagnificationMetrics,
    },
    Dmsl {
        split: Split,
        classes: Vec<String>,
        metrics: crate::dmsl::ClassificationMetrics,
    },
}

impl Report {
    /// The printed table (the task's metrics, the confusion matrix).
    pub fn table(&self) -> String {
        match self {
            Report::Magnification { split, metrics } => {
                format!("{} split\n{}", split.name(), metrics.table())
            }
            Report::Dmsl {
                split,
                classes,
                metrics,
            } => format!("{} split\n{}", split.name(), metrics.table(classes)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunsError {
    #[error("{} holds no training run (no config.json of either task)", .0.display())]
    NotARun(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Magnification(#[from] TrainError),
    #[error(transparent)]
    Dmsl(#[from] DmslTrainError),
    #[error("cannot load the model {}: {message}", path.display())]
    Model { path: PathBuf, message: String },
}

/// Reads a run folder.
pub fn read_run(dir: &Path) -> Result<RunSummary, RunsError> {
    let config = RunConfig::read(dir)?;
    let files = RunFiles::new(dir);
    let curve = match &config {
        RunConfig::Magnification(_) => read_lines::<EpochLog>(&files.log)
            .unwrap_or_default()
            .iter()
            .map(CurvePoint::from)
            .collect(),
        RunConfig::Dmsl(_) => read_lines::<DmslEpochLog>(&files.log)
            .unwrap_or_default()
            .iter()
            .map(CurvePoint::from)
            .collect(),
    };
    let model = [&files.best, &files.last]
        .into_iter()
        .find(|p| p.is_file())
        .cloned();
    Ok(RunSummary {
        dir: dir.to_path_buf(),
        info: read_json(&dir.join("run.json")).ok(),
        report: read_json(&files.report).ok(),
        config,
        curve,
        model,
    })
}

/// The runs in the sub-folders of `root` (and `root` itself if it is one), by folder name.
pub fn list_runs(root: &Path) -> Vec<RunSummary> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    dirs.push(root.to_path_buf());
    dirs.sort();
    dirs.iter().filter_map(|d| read_run(d).ok()).collect()
}

/// Progress of a run of either task.
#[derive(Debug, Clone)]
pub enum RunEvent {
    Step {
        epoch: usize,
        step: usize,
        steps: usize,
        loss: f64,
        samples_per_second: f64,
    },
    Epoch(CurvePoint),
    Info(String),
}

#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub epochs_done: usize,
    pub stopped: bool,
    /// The best checkpoint, else the last one.
    pub model: PathBuf,
}

/// Writes `run.json`: the task and the dataset (absolute), so that the run resumes from its folder.
pub fn write_info(dir: &Path, config: &RunConfig, data: &Path) -> Result<(), RunsError> {
    let info = RunInfo {
        task: config.task().into(),
        data: std::path::absolute(data).unwrap_or_else(|_| data.to_path_buf()),
    };
    let path = dir.join("run.json");
    write_json(&path, &info).map_err(|source| RunsError::Io { path, source })
}

/// Trains (or resumes) the run in `dir`: the very trainers `histolens train` runs. `stop` is checked
/// after every step.
pub fn train(
    config: &RunConfig,
    data: &Path,
    dir: &Path,
    device: &Device,
    stop: &AtomicBool,
    mut on_event: impl FnMut(RunEvent),
) -> Result<RunOutcome, RunsError> {
    write_info(dir, config, data)?;
    match config {
        RunConfig::Magnification(cfg) => {
            let o = crate::magnification::train::train(data, cfg, dir, device, stop, |e| {
                on_event(match e {
                    TrainEvent::Step {
                        epoch,
                        step,
                        steps,
                        loss,
                        images_per_second,
                    } => RunEvent::Step {
                        epoch,
                        step,
                        steps,
                        loss,
                        samples_per_second: images_per_second,
                    },
                    TrainEvent::Epoch(l) => RunEvent::Epoch(CurvePoint::from(&l)),
                    TrainEvent::Info(s) => RunEvent::Info(s),
                })
            })?;
            Ok(RunOutcome {
                epochs_done: o.epochs_done,
                stopped: o.stopped,
                model: o.best.unwrap_or(o.last),
            })
        }
        RunConfig::Dmsl(cfg) => {
            let o = crate::dmsl::train::train(data, cfg, dir, device, stop, |e| {
                on_event(match e {
                    DmslTrainEvent::Step {
                        epoch,
                        step,
                        steps,
                        loss,
                        pairs_per_second,
                    } => RunEvent::Step {
                        epoch,
                        step,
                        steps,
                        loss,
                        samples_per_second: pairs_per_second,
                    },
                    DmslTrainEvent::Epoch(l) => RunEvent::Epoch(CurvePoint::from(&l)),
                    DmslTrainEvent::Info(s) => RunEvent::Info(s),
                })
            })?;
            Ok(RunOutcome {
                epochs_done: o.epochs_done,
                stopped: o.stopped,
                model: o.best.unwrap_or(o.last),
            })
        }
    }
}

/// Evaluates `model` on `split` of the run's dataset and writes `report.json` into the run.
pub fn evaluate(
    config: &RunConfig,
    model: &Path,
    data: &Path,
    split: Split,
    dir: &Path,
    device: &Device,
) -> Result<Report, RunsError> {
    let report = match config {
        RunConfig::Magnification(_) => {
            let m = MagnificationModel::load(model, device).map_err(|e| RunsError::Model {
                path: model.to_path_buf(),
                message: e.to_string(),
            })?;
            let metrics = crate::magnification::train::evaluate(&m, data, split, |_, _| {})?;
            Report::Magnification { split, metrics }
        }
        RunConfig::Dmsl(cfg) => {
            let DmslReport {
                classes, metrics, ..
            } = crate::dmsl::train::evaluate(model, data, split, device, cfg.batch.max(1))?;
            Report::Dmsl {
                split,
                classes,
                metrics,
            }
        }
    };
    let path = RunFiles::new(dir).report;
    write_json(&path, &report).map_err(|source| RunsError::Io { path, source })?;
    Ok(report)
}
