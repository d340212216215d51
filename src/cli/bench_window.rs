//! `histolens bench window`: frame intervals of the real window under a scripted workload, and of a bare
//! eframe window with the same options (the baseline). `benches/window-frames.sh` runs every scenario
//! under Xvfb and prints the ratios.

use std::path::PathBuf;

use anyhow::Context as _;
use histolens::gui::window_bench::{WindowBench, run_bare};
use histolens::gui::{FrameSummary, LaunchOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WindowScenario {
    /// A bare eframe window with histolens's options, one label: the baseline.
    Bare,
    /// The slide shown, nothing moving.
    Idle,
    /// The view panned on a circle at one-to-one zoom, 8 pixels per frame.
    Pan,
    /// Panning while the slide's DMSL heatmap computes.
    Heatmap,
    /// The training panel while a run trains (needs --train-run).
    Training,
}

pub fn run(
    scenario: WindowScenario,
    file: Option<PathBuf>,
    seconds: f64,
    train_run: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        seconds.is_finite() && seconds > 0.0,
        "--seconds must be positive"
    );
    let scratch = tempfile::tempdir().context("cannot make a scratch folder")?;
    let bench = WindowBench {
        seconds,
        pan: matches!(scenario, WindowScenario::Pan | WindowScenario::Heatmap),
        stats_path: scratch.path().join("frames.json"),
    };
    let started = match scenario {
        WindowScenario::Bare => run_bare(bench.clone()),
        _ => {
            let path = file.or_else(histolens::bundled_sample);
            anyhow::ensure!(
                path.is_some() || scenario == WindowScenario::Training,
                "no slide to view: give a FILE (the bundled sample was not found)"
            );
            let train_run = match scenario {
                WindowScenario::Training => Some(
                    train_run
                        .context("the training scenario needs --train-run DIR (a run folder)")?,
                ),
                _ => None,
            };
            histolens::gui::run(LaunchOptions {
                path,
                // The user's settings and label sets stay untouched.
                data_dir: Some(scratch.path().join("data")),
                compute_heatmap: scenario == WindowScenario::Heatmap,
                train_run,
                bench: Some(bench.clone()),
                ..Default::default()
            })
        }
    };
    started.map_err(|e| anyhow::anyhow!("{e}")).context(
        "the window could not be started (is a display and a Vulkan or GL driver available?)",
    )?;
    let bytes = std::fs::read(&bench.stats_path)
        .context("the window closed before its measurement ended")?;
    let summary: FrameSummary =
        serde_json::from_slice(&bytes).context("unreadable frame statistics")?;
    if json {
        println!("{}", String::from_utf8_lossy(&bytes));
    } else {
        let name = format!("{scenario:?}").to_lowercase();
        println!(
            "{name}: {} frames; frame interval p50 {:.1} ms, p99 {:.1} ms; UI CPU p50 {:.1} ms, p99 {:.1} ms",
            summary.frames,
            summary.interval_p50_ms,
            summary.interval_p99_ms,
            summary.cpu_p50_ms,
            summary.cpu_p99_ms
        );
    }
    Ok(())
}
