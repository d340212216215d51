//! `histolens bench heatmap`: DMSL heatmap throughput (pairs/s) over a slide, end to end (reading,
//! resampling, model, as the window and `histolens heatmap` run it) against the model alone on the same
//! fields' inputs prepared beforehand; the ratio is what the pipeline around the model costs.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use histolens::data::pairs::{pair_from_field, read_field};
use histolens::data::tensor::to_tensor;
use histolens::dmsl::DmslModel;
use histolens::dmsl::heatmap::{
    CellState, Heatmap, HeatmapOptions, compute, content_id, header_for, mark_background,
};
use histolens::slide::Slide;
use serde::Serialize;

#[derive(Args)]
pub struct HeatmapBenchArgs {
    pub slide: PathBuf,
    /// A DMSL model (default: the bundled demo).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// µm/px of level 0 (needed when the slide's metadata has none).
    #[arg(long)]
    pub mpp: Option<f64>,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct HeatmapBench {
    slide: String,
    grid: [u32; 2],
    tissue_fields: usize,
    threads: usize,
    end_to_end_seconds: f64,
    end_to_end_pairs_per_second: f64,
    read_seconds: f64,
    model_only_pairs_per_second: f64,
    /// End to end ÷ model alone (1.0: the pipeline costs nothing).
    pipeline_ratio: f64,
}

pub fn run(args: HeatmapBenchArgs) -> anyhow::Result<()> {
    let model_file = match &args.model {
        Some(p) => p.clone(),
        None => histolens::default_dmsl_model().context("no bundled DMSL model; pass --model")?,
    };
    let bytes =
        std::fs::read(&model_file).with_context(|| format!("reading {}", model_file.display()))?;
    let device = candle_core::Device::Cpu;
    let model = DmslModel::from_bytes(&bytes, &device)?;
    let slide = Slide::open(&args.slide)?;
    let mpp = args
        .mpp
        .or(slide.info().mpp.map(|m| m.mean()))
        .with_context(|| format!("{}: no µm/px; give --mpp", args.slide.display()))?;
    let header = header_for(&slide, mpp, &model, &content_id(&bytes));
    let opts = HeatmapOptions {
        batch: args.batch,
        ..Default::default()
    };
    // End to end, as the window runs it (no sidecar: nothing is reused).
    let mut heatmap = Heatmap::new(header.clone());
    let started = Instant::now();
    mark_background(&slide, &mut heatmap, opts.max_background)?;
    let stop = AtomicBool::new(false);
    let run = compute(
        &slide,
        &model,
        &mut heatmap,
        &opts,
        None,
        &|| None,
        &stop,
        |_, _| {},
    )?;
    let end_to_end = started.elapsed().as_secs_f64();
    let done: Vec<usize> = (0..heatmap.header.grid.len())
        .filter(|&c| heatmap.state[c] == CellState::Done)
        .collect();
    // The model alone over the same fields, read and turned into tensors first.
    let g = heatmap.header.grid;
    let geometry = model.geometry();
    let mut batches = Vec::new();
    for chunk in done.chunks(opts.batch.max(1)) {
        let highs = chunk
            .iter()
            .map(|&c| {
                let (x, y) = g.origin(c);
                read_field(&slide, x, y, g.cell, geometry.high_px())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let lows: Vec<_> = highs
            .iter()
            .map(|h| pair_from_field(h, &geometry))
            .collect();
        let mut inputs = Vec::new();
        for &m in &model.layout.branch_magnifications {
            let images = if m < geometry.high_magnification {
                &lows
            } else {
                &highs
            };
            inputs.push(to_tensor(images, model.meta.normalization, &device)?);
        }
        batches.push(inputs);
    }
    let t = Instant::now();
    for inputs in &batches {
        model.predict_inputs(inputs)?;
    }
    let model_only = t.elapsed().as_secs_f64();
    let n = done.len() as f64;
    let result = HeatmapBench {
        slide: args.slide.display().to_string(),
        grid: [g.cols, g.rows],
        tissue_fields: done.len(),
        threads: rayon::current_num_threads(),
        end_to_end_seconds: end_to_end,
        end_to_end_pairs_per_second: n / end_to_end.max(1e-9),
        read_seconds: run.read_seconds,
        model_only_pairs_per_second: n / model_only.max(1e-9),
        pipeline_ratio: (n / end_to_end.max(1e-9)) / (n / model_only.max(1e-9)),
    };
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "{}: grid {}x{}, {} tissue fields, {} thread(s): end to end {:.2} pairs/s ({:.1} s, reading {:.1} s); model alone {:.2} pairs/s; end to end / model alone = {:.2}",
            result.slide,
            g.cols,
            g.rows,
            result.tissue_fields,
            result.threads,
            result.end_to_end_pairs_per_second,
            end_to_end,
            run.read_seconds,
            result.model_only_pairs_per_second,
            result.pipeline_ratio
        );
    }
    Ok(())
}
