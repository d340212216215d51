//! `histolens bench predict`: time from a file to its magnification estimate (decode, crops on tissue,
//! model) through the library functions `histolens predict` uses, and estimates per second over many
//! files. With `--save-dir` it writes `predict.json` (every file's region, crop positions and
//! predictions) so that benches/onnxruntime_predict.py can run the same pipeline in Python and
//! onnxruntime and check that it agrees (benches/predict.sh).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use histolens::magnification::MagnificationModel;
use histolens::magnification::estimate::{
    CropPlan, Estimate, MAX_SNAPSHOT_SIDE, check_file, plan_crops,
};
use histolens::nn::device::DeviceChoice;
use histolens::slide::Slide;
use image::RgbaImage;
use serde::Serialize;

use super::magnification::{expand_inputs, load_model};

#[derive(Args)]
pub struct PredictBenchArgs {
    /// Images, slides or folders (searched recursively): the first file is timed end to end, all of
    /// them give the estimates per second.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Magnification model (default: the bundled one).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Crops scored per file (as `histolens predict --crops`).
    #[arg(long, default_value_t = 16)]
    pub crops: usize,
    /// Timed runs of the first file (median, after one warm-up).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Timed passes over all the files (median, after one warm-up pass).
    #[arg(long, default_value_t = 3)]
    pub passes: usize,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Write predict.json here: crop positions and predictions for the onnxruntime baseline.
    #[arg(long)]
    pub save_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct FirstFile {
    path: String,
    kind: &'static str,
    /// Timed runs (each after the warm-up).
    iters: usize,
    crops: usize,
    magnification: f64,
    /// Median seconds from the path to the estimate (`Slide::open` and `check_file`,
    /// as `histolens predict`).
    end_to_end_seconds: f64,
    /// The first pass of the same pipeline timed in parts (snapshots only): opening and decoding the
    /// file and reading its central region; scoring the grid for tissue and cutting the crops;
    /// normalising and the model. The end-to-end time also holds the further readings of the image
    /// resampled toward 0.5 µm/px.
    decode_seconds: Option<f64>,
    crops_seconds: Option<f64>,
    model_seconds: Option<f64>,
}

#[derive(Serialize)]
struct AllFiles {
    files: usize,
    failed: usize,
    crops: usize,
    passes: usize,
    /// Median seconds of one pass over every file.
    seconds: f64,
    predictions_per_second: f64,
    crops_per_second: f64,
}

#[derive(Serialize)]
struct PredictBench {
    threads: usize,
    model: String,
    model_load_seconds: f64,
    first: FirstFile,
    all: AllFiles,
}

/// What the baseline needs to run the same crops of one file.
#[derive(Serialize)]
struct SavedFile {
    path: String,
    kind: &'static str,
    /// The region scored (x, y, width, height): the centre of a snapshot, at most 4096 px a side.
    region: Option<[u32; 4]>,
    /// Size of that region after padding to the model's input size.
    padded: Option<[u32; 2]>,
    /// Top-left corners of the crops in the padded region, in the order scored.
    cells: Vec<[u32; 2]>,
    predictions: Vec<f64>,
    magnification: Option<f64>,
    error: Option<String>,
}

#[derive(Serialize)]
struct Saved {
    model: String,
    max_crops: usize,
    iters: usize,
    passes: usize,
    first: String,
    files: Vec<SavedFile>,
}

/// The estimate of one file, as `histolens predict` computes it.
fn estimate_file(
    model: &MagnificationModel,
    path: &Path,
    max_crops: usize,
) -> anyhow::Result<(Estimate, &'static str)> {
    let slide = Slide::open(path)?;
    let kind = if slide.info().is_whole_slide() {
        "slide"
    } else {
        "image"
    };
    Ok((check_file(model, &slide, max_crops)?.estimate, kind))
}

/// A snapshot opened and its central region read, as `estimate_snapshot` does; `None` for a slide.
fn decode(path: &Path) -> anyhow::Result<Option<(RgbaImage, [u32; 4])>> {
    let slide = Slide::open(path)?;
    if slide.info().is_whole_slide() {
        return Ok(None);
    }
    let (w, h) = slide.info().dimensions();
    let (rw, rh) = (
        w.min(u64::from(MAX_SNAPSHOT_SIDE)) as u32,
        h.min(u64::from(MAX_SNAPSHOT_SIDE)) as u32,
    );
    let (x0, y0) = ((w - u64::from(rw)) / 2, (h - u64::from(rh)) / 2);
    let img = slide.read_region(0, x0 as i64, y0 as i64, rw, rh)?;
    Ok(Some((img, [x0 as u32, y0 as u32, rw, rh])))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// One file timed in parts; returns (decode, crops, model) seconds and the predictions.
fn timed_parts(
    model: &MagnificationModel,
    path: &Path,
    max_crops: usize,
) -> anyhow::Result<Option<([f64; 3], Vec<f64>)>> {
    let t0 = Instant::now();
    let Some((img, _)) = decode(path)? else {
        return Ok(None);
    };
    let t1 = Instant::now();
    let crops = plan_crops(&img, model.input_size(), max_crops).crops;
    let t2 = Instant::now();
    let predictions = model.predict(&crops)?;
    let t3 = Instant::now();
    let s = |a: Instant, b: Instant| (b - a).as_secs_f64();
    Ok(Some(([s(t0, t1), s(t1, t2), s(t2, t3)], predictions)))
}

/// The baseline's inputs for one file, checked against the library's own estimate: the crops planned
/// here must give the predictions `estimate_snapshot` gave.
fn saved_file(model: &MagnificationModel, path: &Path, max_crops: usize) -> SavedFile {
    let mut out = SavedFile {
        path: path.display().to_string(),
        kind: "image",
        region: None,
        padded: None,
        cells: Vec::new(),
        predictions: Vec::new(),
        magnification: None,
        error: None,
    };
    let result = (|| -> anyhow::Result<()> {
        let (estimate, kind) = estimate_file(model, path, max_crops)?;
        out.kind = kind;
        out.magnification = Some(median(estimate.first_pass.clone()));
        // The baseline runs the first pass (the image as it is), not the refining one.
        out.predictions = estimate.first_pass.clone();
        if let Some((img, region)) = decode(path)? {
            let CropPlan {
                size: padded,
                corners: cells,
                crops,
                ..
            } = plan_crops(&img, model.input_size(), max_crops);
            let predictions = model.predict(&crops)?;
            let same = predictions.len() == estimate.first_pass.len()
                && predictions
                    .iter()
                    .zip(&estimate.first_pass)
                    .all(|(a, b)| (a - b).abs() <= 1e-6 * b.abs().max(1.0));
            anyhow::ensure!(
                same,
                "the crops written for the baseline do not give estimate_snapshot's predictions \
                 ({predictions:?} against {:?})",
                estimate.first_pass
            );
            out.region = Some(region);
            out.padded = Some(padded);
            out.cells = cells;
        }
        Ok(())
    })();
    if let Err(e) = result {
        out.error = Some(format!("{e:#}"));
    }
    out
}

pub fn run(args: PredictBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.iters > 0 && args.passes > 0,
        "--iters and --passes must be at least 1"
    );
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => histolens::default_magnification_model()
            .context("no bundled magnification model was found; pass one with --model")?,
    };
    let t0 = Instant::now();
    let model = load_model(Some(&model_path), args.device)?;
    let model_load_seconds = t0.elapsed().as_secs_f64();
    let first_path = expand_inputs(&args.paths[..1])?
        .into_iter()
        .next()
        .with_context(|| format!("no image or slide in {}", args.paths[0].display()))?;
    let files = expand_inputs(&args.paths)?;
    let threads = candle_core::utils::get_num_threads();

    // (a) The first file, end to end through the library, then in parts.
    let (warm, kind) = estimate_file(&model, &first_path, args.crops)
        .with_context(|| format!("estimating {}", first_path.display()))?;
    let mut end_to_end = Vec::with_capacity(args.iters);
    for _ in 0..args.iters {
        let t = Instant::now();
        estimate_file(&model, &first_path, args.crops)?;
        end_to_end.push(t.elapsed().as_secs_f64());
    }
    let mut parts: [Vec<f64>; 3] = Default::default();
    if timed_parts(&model, &first_path, args.crops)?.is_some() {
        for _ in 0..args.iters {
            if let Some((s, predictions)) = timed_parts(&model, &first_path, args.crops)? {
                anyhow::ensure!(
                    predictions.len() == warm.first_pass.len(),
                    "the timed parts scored {} crops, the estimate {}",
                    predictions.len(),
                    warm.first_pass.len()
                );
                for (v, x) in parts.iter_mut().zip(s) {
                    v.push(x);
                }
            }
        }
    }
    let part = |i: usize| (!parts[i].is_empty()).then(|| median(parts[i].clone()));
    let first = FirstFile {
        path: first_path.display().to_string(),
        kind,
        iters: args.iters,
        crops: warm.crops,
        magnification: warm.magnification,
        end_to_end_seconds: median(end_to_end),
        decode_seconds: part(0),
        crops_seconds: part(1),
        model_seconds: part(2),
    };

    // (b) Every file: a warm-up pass that also checks the crops and collects them for the baseline,
    // then the timed passes.
    let saved: Vec<SavedFile> = files
        .iter()
        .map(|f| saved_file(&model, f, args.crops))
        .collect();
    if let Some(bad) = saved.iter().find(|s| {
        s.error
            .as_deref()
            .is_some_and(|e| e.contains("no longer match"))
    }) {
        anyhow::bail!("{}: {}", bad.path, bad.error.as_deref().unwrap_or_default());
    }
    let mut pass_seconds = Vec::with_capacity(args.passes);
    let (mut failed, mut crops) = (0, 0);
    for _ in 0..args.passes {
        let t = Instant::now();
        let results: Vec<_> = files
            .iter()
            .map(|f| estimate_file(&model, f, args.crops).map(|(e, _)| e.crops))
            .collect();
        pass_seconds.push(t.elapsed().as_secs_f64());
        failed = results.iter().filter(|r| r.is_err()).count();
        crops = results.iter().filter_map(|r| r.as_ref().ok()).sum();
    }
    let seconds = median(pass_seconds);
    let all = AllFiles {
        files: files.len(),
        failed,
        crops,
        passes: args.passes,
        seconds,
        predictions_per_second: (files.len() - failed) as f64 / seconds,
        crops_per_second: crops as f64 / seconds,
    };

    if let Some(dir) = &args.save_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the folder {}", dir.display()))?;
        let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let out = Saved {
            model: abs(&model_path).display().to_string(),
            max_crops: args.crops,
            iters: args.iters,
            passes: args.passes,
            first: abs(&first_path).display().to_string(),
            files: saved
                .into_iter()
                .map(|mut s| {
                    s.path = abs(Path::new(&s.path)).display().to_string();
                    s
                })
                .collect(),
        };
        histolens::util::fs::write_atomic(
            &dir.join("predict.json"),
            &serde_json::to_vec_pretty(&out)?,
        )?;
    }

    let r = PredictBench {
        threads,
        model: model_path.display().to_string(),
        model_load_seconds,
        first,
        all,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let f = &r.first;
        println!(
            "bench predict, {} thread(s), model {} (loaded in {:.3} s)",
            r.threads, r.model, r.model_load_seconds
        );
        let split = match (f.decode_seconds, f.crops_seconds, f.model_seconds) {
            (Some(d), Some(c), Some(m)) => {
                format!(" (decode {d:.4} s, crops {c:.4} s, model {m:.4} s)")
            }
            _ => String::new(),
        };
        println!(
            "{} ({}, {} crops, {:.2}x): {:.4} s end to end{split}, median of {}",
            f.path, f.kind, f.crops, f.magnification, f.end_to_end_seconds, f.iters
        );
        let a = &r.all;
        println!(
            "{} file(s) ({} failed, {} crops): {:.3} s a pass, median of {} = {:.2} predictions/s, \
             {:.1} crops/s",
            a.files,
            a.failed,
            a.crops,
            a.seconds,
            a.passes,
            a.predictions_per_second,
            a.crops_per_second
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
