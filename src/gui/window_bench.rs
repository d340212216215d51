//! Window benchmarks: histolens's frame intervals under a scripted workload, and the baseline they are
//! held against, a bare eframe window with the same options (size, renderer, continuous repaint).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::frame_stats::FrameStats;

/// Frames of start-up (shader compilation, font atlas, first uploads) left out of the statistics.
const WARM_UP: Duration = Duration::from_secs(3);

/// A timed run of the window: it repaints continuously, measures for `seconds` after the warm-up,
/// writes its frame statistics and closes.
#[derive(Debug, Clone)]
pub struct WindowBench {
    pub seconds: f64,
    /// Pan the view on a circle at one-to-one zoom, a few screen pixels per frame, as a drag would.
    pub pan: bool,
    pub stats_path: PathBuf,
}

/// Where a timed run is.
#[derive(Debug, Default)]
pub(crate) struct BenchClock {
    started: Option<Instant>,
    measuring: bool,
    /// Angle of the pan on its circle, radians.
    pub angle: f64,
}

impl BenchClock {
    /// Called once per frame once the workload is in place; `reset` clears the statistics when the
    /// warm-up ends. Returns true when the run is over.
    pub fn tick(&mut self, bench: &WindowBench, stats: &mut FrameStats) -> bool {
        let now = Instant::now();
        let started = *self.started.get_or_insert(now);
        if !self.measuring && now.duration_since(started) >= WARM_UP {
            *stats = FrameStats::default();
            self.measuring = true;
        }
        now.duration_since(started) >= WARM_UP + Duration::from_secs_f64(bench.seconds)
    }
}

/// The baseline: an eframe window with histolens's options that repaints continuously and draws one
/// label, measured like histolens for `bench.seconds`.
pub fn run_bare(bench: WindowBench) -> eframe::Result<()> {
    let mut options = super::native_options();
    options.persist_window = false;
    eframe::run_native(
        "histolens-bare",
        options,
        Box::new(move |_| {
            Ok(Box::new(Bare {
                bench,
                stats: FrameStats::default(),
                clock: BenchClock::default(),
            }))
        }),
    )
}

struct Bare {
    bench: WindowBench,
    stats: FrameStats,
    clock: BenchClock,
}

impl eframe::App for Bare {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        self.stats.record(frame.info().cpu_usage, true);
        ui.ctx().request_repaint();
        egui::CentralPanel::default().show(ui, |ui| ui.label("bare eframe window"));
        if self.clock.tick(&self.bench, &mut self.stats) {
            write_stats(&self.bench.stats_path, &self.stats);
            ui.ctx().send_viewport_cmd(egui::ViewportCommand::Close);
        }
    }
}

/// Writes the statistics of a finished run (a failure is logged: the caller reports the missing file).
pub(crate) fn write_stats(path: &std::path::Path, stats: &FrameStats) {
    match serde_json::to_vec_pretty(&stats.summary()) {
        Ok(json) => {
            if let Err(e) = crate::util::fs::write_atomic(path, &json) {
                log::warn!("cannot write frame statistics to {}: {e}", path.display());
            }
        }
        Err(e) => log::warn!("cannot serialise frame statistics: {e}"),
    }
}
