//! `histolens bench …`: throughput and memory measurements (benchmarks, not tests).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::Subcommand;
use histolens::slide::Slide;
use histolens::tiles::{TileGrid, TileKey, TileStreamer, Viewport, plan_tiles};
use histolens::util::memory;
use serde::Serialize;

pub use super::bench_window::WindowScenario;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Tile throughput: every tile of every level, cold (fresh slide handle, empty cache) then warm.
    Tiles {
        file: PathBuf,
        #[arg(long, default_value_t = 256)]
        tile_size: u32,
        /// Loader thread counts to measure, e.g. 1,2.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        threads: Vec<usize>,
        /// At most this many tiles: whole coarse levels, then a central block of the next finer level.
        #[arg(long)]
        limit: Option<usize>,
        /// Write the measured tiles as JSON [[level, col, row], …] (for the baseline to serve the same).
        #[arg(long)]
        tiles_out: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Model speed: forward images/s in evaluation (per batch size) and the time of one training step.
    /// Threads follow RAYON_NUM_THREADS (candle's setting).
    Model {
        /// Architectures, e.g. resnet50,efficientnet-lite0.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "resnet50,efficientnet-lite0"
        )]
        arch: Vec<String>,
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        batch: Vec<usize>,
        #[arg(long, default_value_t = 224)]
        size: usize,
        /// Timed iterations per measurement (after one warm-up).
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Batch of the training step (0 skips it).
        #[arg(long, default_value_t = 8)]
        train_batch: usize,
        /// Write each model's weights and a test input here (for the onnxruntime baseline).
        #[arg(long)]
        save_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Time from a file to its magnification estimate (decode, crops on tissue, model) and estimates
    /// per second over many files. Threads follow RAYON_NUM_THREADS.
    Predict(super::bench_predict::PredictBenchArgs),
    /// DMSL heatmap throughput over a slide: end to end (read, resample, model) against the model
    /// alone on inputs prepared beforehand. Threads follow RAYON_NUM_THREADS.
    Heatmap(super::bench_heatmap::HeatmapBenchArgs),
    /// Frame intervals of the real window (needs a display) under a scripted workload, and of the
    /// baseline: a bare eframe window with the same options (`--scenario bare`). Each run repaints
    /// continuously and measures for SECONDS after a 3 s warm-up.
    Window {
        #[arg(long, value_enum, default_value_t = WindowScenario::Pan)]
        scenario: WindowScenario,
        /// Slide or image to view (default: the bundled sample slide).
        file: Option<PathBuf>,
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// The run the training scenario starts or resumes in the panel.
        #[arg(long, value_name = "DIR")]
        train_run: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Peak memory while panning across a slide at several zoom levels with a given cache budget.
    Pan {
        file: PathBuf,
        #[arg(long, default_value_t = 512)]
        cache_mb: u64,
        /// View size in screen pixels.
        #[arg(long, default_value_t = 1920)]
        width: u32,
        #[arg(long, default_value_t = 1080)]
        height: u32,
        /// Pan steps per zoom level.
        #[arg(long, default_value_t = 60)]
        steps: usize,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Tiles {
            file,
            tile_size,
            threads,
            limit,
            tiles_out,
            json,
        } => tiles(
            &file,
            tile_size,
            &threads,
            limit,
            tiles_out.as_deref(),
            json,
        ),
        BenchCommand::Pan {
            file,
            cache_mb,
            width,
            height,
            steps,
            json,
        } => pan(
            &file,
            cache_mb,
            [f64::from(width), f64::from(height)],
            steps,
            json,
        ),
        BenchCommand::Model {
            arch,
            batch,
            size,
            iters,
            train_batch,
            save_dir,
            json,
        } => super::bench_model::run(
            &arch,
            &batch,
            size,
            iters,
            train_batch,
            save_dir.as_deref(),
            json,
        ),
        BenchCommand::Window {
            scenario,
            file,
            seconds,
            train_run,
            json,
        } => super::bench_window::run(scenario, file, seconds, train_run, json),
        BenchCommand::Predict(args) => super::bench_predict::run(args),
        BenchCommand::Heatmap(args) => super::bench_heatmap::run(args),
    }
}

#[derive(Serialize)]
struct TilesResult {
    threads: usize,
    tiles: usize,
    megapixels: f64,
    cold_seconds: f64,
    warm_seconds: f64,
    cold_tiles_per_second: f64,
    warm_tiles_per_second: f64,
}

/// Tiles to measure: whole levels from the coarsest down while they fit in `limit`, then a central
/// block of the next finer level (what a viewer zooming into the middle would read).
fn select_tiles(grid: &TileGrid, limit: Option<usize>) -> Vec<TileKey> {
    let mut left = limit.unwrap_or(usize::MAX);
    let mut out = Vec::new();
    for level in (0..grid.level_count()).rev() {
        let n = grid.tile_count(level) as usize;
        if n <= left {
            out.extend(grid.level_tiles(level));
            left -= n;
            continue;
        }
        let (cols, rows) = grid.tiles_across(level);
        let side = (left as f64).sqrt().floor() as u32;
        let (w, h) = (side.min(cols), (left as u32 / side.max(1)).min(rows));
        let (c0, r0) = ((cols - w) / 2, (rows - h) / 2);
        for row in r0..r0 + h {
            for col in c0..c0 + w {
                out.push(TileKey {
                    level: level as u32,
                    col,
                    row,
                });
            }
        }
        break;
    }
    out
}

fn tiles(
    file: &Path,
    tile_size: u32,
    threads: &[usize],
    limit: Option<usize>,
    tiles_out: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let mut results = Vec::new();
    for &n in threads {
        // A fresh handle per run: OpenSlide's own decoded-tile cache starts empty too.
        let slide = Arc::new(Slide::open(file)?);
        let grid = TileGrid::new(slide.info().levels.clone(), tile_size);
        let keys = select_tiles(&grid, limit);
        if let Some(out) = tiles_out {
            let list: Vec<[u32; 3]> = keys.iter().map(|k| [k.level, k.col, k.row]).collect();
            std::fs::write(out, serde_json::to_vec(&list)?)?;
        }
        let bytes: usize = keys.iter().map(|k| grid.tile_bytes(*k)).sum();
        let streamer = TileStreamer::new(slide, tile_size, n, bytes + (64 << 20), || {});
        streamer.wait_idle(); // the pinned coarsest level is part of opening, not of the measurement
        let t0 = Instant::now();
        streamer.request(&keys);
        streamer.wait_idle();
        let cold = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut found = 0usize;
        for k in &keys {
            found += usize::from(streamer.get(*k).is_some());
        }
        let warm = t1.elapsed().as_secs_f64();
        anyhow::ensure!(
            found == keys.len(),
            "{} of {} tiles failed to load",
            keys.len() - found,
            keys.len()
        );
        results.push(TilesResult {
            threads: n,
            tiles: keys.len(),
            megapixels: bytes as f64 / 4e6,
            cold_seconds: cold,
            warm_seconds: warm,
            cold_tiles_per_second: keys.len() as f64 / cold,
            warm_tiles_per_second: keys.len() as f64 / warm.max(1e-9),
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        println!("tile throughput, {tile_size} px tiles, {}", file.display());
        for r in &results {
            println!(
                "threads {}: {} tiles ({:.1} Mpx); cold {:.3} s = {:.0} tiles/s; warm {:.4} s = {:.0} tiles/s",
                r.threads,
                r.tiles,
                r.megapixels,
                r.cold_seconds,
                r.cold_tiles_per_second,
                r.warm_seconds,
                r.warm_tiles_per_second
            );
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct PanResult {
    cache_budget_mb: u64,
    rss_before_mb: f64,
    peak_rss_mb: f64,
    peak_over_budget_mb: f64,
    views: usize,
    tiles_loaded: u64,
    seconds: f64,
}

fn pan(file: &Path, cache_mb: u64, size: [f64; 2], steps: usize, json: bool) -> anyhow::Result<()> {
    let rss_before = memory::current_rss_bytes().unwrap_or(0);
    let slide = Arc::new(Slide::open(file)?);
    let dims = slide.info().dimensions();
    let streamer = TileStreamer::new(
        slide,
        histolens::tiles::DEFAULT_TILE_SIZE,
        2,
        (cache_mb as usize) << 20,
        || {},
    );
    let t0 = Instant::now();
    let mut views = 0;
    let fit = Viewport::fit(dims, size);
    // Zoom levels from the whole slide down to full resolution, a serpentine pan at each.
    let mut scales = vec![fit.scale];
    while *scales.last().unwrap_or(&1.0) < 1.0 {
        let s = scales.last().copied().unwrap_or(1.0) * 4.0;
        scales.push(s.min(1.0));
    }
    for &scale in &scales {
        let mut vp = Viewport {
            center: [0.0, 0.0],
            scale,
            size,
        };
        let span = [dims.0 as f64, dims.1 as f64];
        let rows = (steps as f64).sqrt().ceil() as usize;
        for i in 0..steps {
            let row = i / rows;
            let col = if row.is_multiple_of(2) {
                i % rows
            } else {
                rows - 1 - i % rows
            };
            vp.center = [
                span[0] * (col as f64 + 0.5) / rows as f64,
                span[1] * (row as f64 + 0.5) / rows as f64,
            ];
            let plan = plan_tiles(streamer.grid(), &vp, 1.0, 1, None);
            streamer.request(&plan.wanted);
            streamer.wait_idle();
            for k in &plan.visible {
                let _ = streamer.get(*k);
            }
            views += 1;
        }
    }
    let peak = memory::peak_rss_bytes().unwrap_or(0);
    let mb = |b: u64| b as f64 / (1u64 << 20) as f64;
    let r = PanResult {
        cache_budget_mb: cache_mb,
        rss_before_mb: mb(rss_before),
        peak_rss_mb: mb(peak),
        peak_over_budget_mb: mb(peak) - cache_mb as f64,
        views,
        tiles_loaded: streamer.stats().loaded,
        seconds: t0.elapsed().as_secs_f64(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "pan over {}: {} views, {} tiles loaded in {:.1} s; cache budget {} MiB; peak RSS {:.0} MiB (budget + {:.0} MiB)",
            file.display(),
            r.views,
            r.tiles_loaded,
            r.seconds,
            r.cache_budget_mb,
            r.peak_rss_mb,
            r.peak_over_budget_mb
        );
    }
    Ok(())
}
