//! `histolens bench model`: forward throughput and training-step time of the zoo's backbones on this
//! machine, with the weights optionally written for the onnxruntime baseline (benches/models.sh).

use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use histolens::nn::checkpoint::{self, CheckpointMeta, Normalization};
use histolens::nn::{Arch, build};
use serde::Serialize;

#[derive(Serialize)]
struct ModelResult {
    arch: String,
    threads: usize,
    size: usize,
    /// (batch, images per second) in evaluation mode.
    forward: Vec<(usize, f64)>,
    /// Seconds per training step (forward, loss, backward, AdamW) at `train_batch`.
    train_step_seconds: Option<f64>,
    /// Training images per second (`train_batch` / step time).
    train_images_per_second: Option<f64>,
    train_batch: usize,
    /// Peak RSS during this architecture's measurements, MiB (None where it cannot be isolated).
    peak_rss_mib: Option<u64>,
}

fn input(n: usize, size: usize) -> candle_core::Result<Tensor> {
    Tensor::rand(-2f32, 2f32, (n, 3, size, size), &Device::Cpu)
}

pub fn run(
    archs: &[String],
    batches: &[usize],
    size: usize,
    iters: usize,
    train_batch: usize,
    save_dir: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let mut results = Vec::new();
    for name in archs {
        let arch = Arch::parse(name).with_context(|| format!("unknown architecture {name:?}"))?;
        let isolated = histolens::util::memory::reset_peak_rss();
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let model = build(arch, vb.pp("backbone"))?;
        if let Some(dir) = save_dir {
            save_for_baseline(dir, arch, &vars, size)?;
        }
        // Inference runs on constant weights, as a model loaded from a checkpoint does; that copy
        // (and its packed kernels) is dropped before training, which does not use it.
        let model_eval = build(arch, constant_weights(&vars)?.pp("backbone"))?;
        let mut forward = Vec::new();
        for &b in batches {
            let x = input(b, size)?;
            model_eval.forward(&x, false)?; // warm-up
            let t0 = Instant::now();
            for _ in 0..iters {
                model_eval
                    .forward(&x, false)?
                    .pooled
                    .sum_all()?
                    .to_scalar::<f32>()?;
            }
            forward.push((b, (b * iters) as f64 / t0.elapsed().as_secs_f64()));
        }
        drop(model_eval);
        let train_step_seconds = if train_batch > 0 {
            let head = candle_nn::linear(arch.feature_dim(), 2, vb.pp("head"))?;
            let mut opt = histolens::nn::optim::AdamW::new(
                vars.all_vars(),
                candle_nn::ParamsAdamW::default(),
            )?;
            let x = input(train_batch, size)?;
            let y = Tensor::from_vec(
                (0..train_batch as u32).map(|i| i % 2).collect::<Vec<_>>(),
                train_batch,
                &Device::Cpu,
            )?;
            let mut step = || -> anyhow::Result<()> {
                let logits = model.forward(&x, true)?.pooled.apply(&head)?;
                opt.backward_step(&candle_nn::loss::cross_entropy(&logits, &y)?)?;
                Ok(())
            };
            step()?;
            let t0 = Instant::now();
            let n = iters.clamp(1, 3);
            for _ in 0..n {
                step()?;
            }
            Some(t0.elapsed().as_secs_f64() / n as f64)
        } else {
            None
        };
        results.push(ModelResult {
            arch: arch.name().into(),
            threads,
            size,
            forward,
            train_step_seconds,
            train_images_per_second: train_step_seconds.map(|s| train_batch as f64 / s),
            train_batch,
            peak_rss_mib: isolated
                .then(histolens::util::memory::peak_rss_bytes)
                .flatten()
                .map(|b| b >> 20),
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        for r in &results {
            let fw: Vec<String> = r
                .forward
                .iter()
                .map(|(b, ips)| format!("batch {b}: {ips:.1} img/s"))
                .collect();
            let train = r.train_step_seconds.map_or(String::new(), |s| {
                format!(
                    "; train step (batch {}): {s:.3} s, {:.2} img/s",
                    r.train_batch,
                    r.train_batch as f64 / s
                )
            });
            let rss = r
                .peak_rss_mib
                .map_or(String::new(), |m| format!("; peak RSS {m} MiB"));
            println!(
                "{} at {}px, {} threads: {}{train}{rss}",
                r.arch,
                r.size,
                r.threads,
                fw.join(", ")
            );
        }
    }
    Ok(())
}

/// The variables' current values as constants (no gradient tracking).
fn constant_weights(vars: &VarMap) -> anyhow::Result<VarBuilder<'static>> {
    let data = vars
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("variable map poisoned"))?;
    let tensors = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    Ok(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))
}

/// Writes the backbone's weights (under their reference names) for the baseline engine.
fn save_for_baseline(dir: &Path, arch: Arch, vars: &VarMap, size: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let meta = CheckpointMeta {
        format_version: checkpoint::FORMAT_VERSION,
        arch,
        task: "features".into(),
        input_size: [size, size],
        normalization: Normalization::IMAGENET,
        classes: vec![],
        magnification_range: None,
        constants: Default::default(),
        provenance: Default::default(),
    };
    // The baseline expects reference names: strip the "backbone." prefix used here.
    let stripped = VarMap::new();
    {
        let src = vars
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("variable map poisoned"))?;
        let mut dst = stripped
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("variable map poisoned"))?;
        for (k, v) in src.iter() {
            if let Some(rest) = k.strip_prefix("backbone.") {
                dst.insert(rest.to_string(), v.clone());
            }
        }
    }
    let bytes = checkpoint::to_bytes(&stripped, &meta, false)?;
    histolens::util::fs::write_atomic(&dir.join(format!("{}.safetensors", arch.name())), &bytes)?;
    Ok(())
}
