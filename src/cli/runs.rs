//! `histolens runs list|resume|eval`: the training runs that `histolens train` and the window's
//! training panel make, listed side by side, resumed from their folder alone, evaluated.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use histolens::data::Split;
use histolens::nn::device::{DeviceChoice, select};
use histolens::runs::{RunEvent, RunSummary, evaluate, list_runs, read_run, train};

use super::magnification::{bar, say};

#[derive(Subcommand)]
pub enum RunsCommand {
    /// Compare runs: each folder given that is a run, and the runs in its sub-folders (default: the
    /// window's runs folder).
    List { paths: Vec<PathBuf> },
    /// Resume (or finish) a run from its folder: its config.json and run.json say what to train.
    Resume(ResumeArgs),
    /// Evaluate a run's model on a split of its dataset; writes report.json into the run.
    Eval(EvalArgs),
}

#[derive(Args)]
pub struct ResumeArgs {
    pub run: PathBuf,
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

#[derive(Args)]
pub struct EvalArgs {
    pub run: PathBuf,
    /// train, val or test.
    #[arg(long, default_value = "test")]
    pub split: String,
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

/// Where the window keeps the runs it starts.
pub fn default_runs_dir() -> PathBuf {
    histolens::data_dir().join("runs")
}

fn row(r: &RunSummary) -> String {
    let arch = match &r.config {
        histolens::runs::RunConfig::Magnification(c) => c.arch.name(),
        histolens::runs::RunConfig::Dmsl(c) => c.arch.name(),
    };
    let last = r.curve.last();
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    format!(
        "{:<40} {:<13} {:<18} {:>3}/{:<3} {:>10} {:>10} {:>14} {:>8.1}",
        r.dir.display(),
        r.config.task(),
        arch,
        r.epochs_done(),
        r.config.total_epochs(),
        fmt(last.map(|p| p.train_loss)),
        fmt(r.best_val_loss()),
        format!(
            "{} {}",
            r.config.metric_name(),
            fmt(last.and_then(|p| p.metric))
        ),
        last.map_or(0.0, |p| p.samples_per_second),
    )
}

pub fn run(cmd: RunsCommand) -> anyhow::Result<()> {
    match cmd {
        RunsCommand::List { paths } => {
            let paths = if paths.is_empty() {
                vec![default_runs_dir()]
            } else {
                paths
            };
            println!(
                "{:<40} {:<13} {:<18} {:>7} {:>10} {:>10} {:>14} {:>8}",
                "run", "task", "backbone", "epochs", "train", "best val", "metric", "samples/s"
            );
            let mut n = 0;
            for p in &paths {
                for r in list_runs(p) {
                    println!("{}", row(&r));
                    n += 1;
                }
            }
            if n == 0 {
                println!("(no runs under {})", paths[0].display());
            }
            Ok(())
        }
        RunsCommand::Resume(a) => {
            let summary = read_run(&a.run)?;
            let info = summary.info.as_ref().with_context(|| {
                format!(
                    "{} has no run.json (made before runs recorded their dataset): resume it \
                     with histolens train and the same options",
                    a.run.display()
                )
            })?;
            let device = select(a.device)?;
            let stop = AtomicBool::new(false);
            let pb = bar(summary.config.total_epochs() as u64, "epochs");
            pb.set_position(summary.epochs_done() as u64);
            let outcome =
                train(&summary.config, &info.data, &a.run, &device, &stop, |e| {
                    match e {
                RunEvent::Step {
                    epoch,
                    step,
                    steps,
                    loss,
                    samples_per_second,
                } => pb.set_message(format!(
                    "epoch {epoch} step {step}/{steps} loss {loss:.4} ({samples_per_second:.1}/s)"
                )),
                RunEvent::Epoch(p) => {
                    pb.set_position(p.epoch as u64);
                    say(&pb, format!("epoch {}: train {:.4}", p.epoch, p.train_loss));
                }
                RunEvent::Info(s) => say(&pb, s),
            }
                })?;
            pb.finish_and_clear();
            println!(
                "{} epochs; model: {}",
                outcome.epochs_done,
                outcome.model.display()
            );
            Ok(())
        }
        RunsCommand::Eval(a) => {
            let split =
                Split::parse(&a.split).with_context(|| format!("unknown split {}", a.split))?;
            let summary = read_run(&a.run)?;
            let info = summary
                .info
                .as_ref()
                .with_context(|| format!("{} has no run.json", a.run.display()))?;
            let model = summary
                .model
                .as_ref()
                .with_context(|| format!("{} holds no checkpoint yet", a.run.display()))?;
            let device = select(a.device)?;
            let report = evaluate(&summary.config, model, &info.data, split, &a.run, &device)?;
            print!("{}", report.table());
            Ok(())
        }
    }
}
