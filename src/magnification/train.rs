//! Hagnifinder training: round 1 with the Adaptive Scaling Module, then the constant m (the mean ASM
//! factor over the training batches, from one evaluation pass) and round 2 with it. Huber loss (δ = 1),
//! AdamW, learning rate halved when the monitored loss has not improved for `patience` epochs.
//!
//! A run lives in its own folder: `config.json`, `log.jsonl` (one line per epoch), `last.safetensors`
//! (every epoch, atomically) with `state.json` beside it (so an interrupted run resumes), and
//! `best.safetensors` (best validation loss of round 2, the model to use).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, ParamsAdamW, VarBuilder, VarMap};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::estimate::quantile;
use super::features::{CropSettings, FeatureError, FeatureTable, features_for};
use super::metrics::MagnificationMetrics;
use super::model::{CONST_M, CONST_MULTISCALE, CONST_TARGET_LOG2, TASK};
use crate::data::augment::{AugmentConfig, augment, center_crop};
use crate::data::manifest::{MagnificationRecord, Manifest, ManifestError, Split};
use crate::data::tensor::to_tensor;
use crate::nn::backbone::{Arch, Backbone, build};
use crate::nn::checkpoint::{
    CheckpointError, CheckpointMeta, FORMAT_VERSION, LoadOptions, Normalization, Provenance,
    load_into, read_meta, start_normalization, to_bytes,
};
use crate::nn::hagnifinder::{Hagnifinder, Scaling, Target, asm_factor};
use crate::nn::optim::AdamW;
use crate::nn::vars;
use crate::util::fs::write_atomic;
pub use crate::util::run::Start;
use crate::util::run::{Plateau, RunError, RunFiles, write_json};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub arch: Arch,
    pub start: Start,
    /// Train only the head on the backbone's (evaluation-mode) features.
    pub freeze_backbone: bool,
    pub input_size: usize,
    pub batch: usize,
    /// Epochs of round 1 (ASM) and round 2 (constant m).
    pub epochs_asm: usize,
    pub epochs_constant: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub patience: usize,
    pub min_lr: f64,
    pub target: Target,
    pub augment: AugmentConfig,
    /// Cap on training steps per epoch (None: the whole training split).
    pub steps_per_epoch: Option<usize>,
    /// Weight of the scale-equivariance loss over pairs of one field at two scales (log2 target
    /// and frozen backbone only).
    #[serde(default)]
    pub equivariance: f64,
    /// The head reads every stage's pooled output, not only the last convolution's (frozen backbone
    /// only).
    #[serde(default)]
    pub multiscale: bool,
    /// With a frozen backbone and a multi-scale head: fine-tune the backbone's last `tune_stages`
    /// stages and its last convolution all the same, on cached outputs of the stages before them.
    #[serde(default)]
    pub tune_stages: usize,
    /// The tuned stages' learning rate, as a fraction of `lr`.
    #[serde(default = "default_tune_lr_scale")]
    pub tune_lr_scale: f64,
    /// Crops per image whose cached features train a frozen backbone's head (as many as an estimate
    /// scores at most).
    #[serde(default = "default_crops")]
    pub crops: usize,
    pub seed: u64,
}

fn default_tune_lr_scale() -> f64 {
    0.1
}

fn default_crops() -> usize {
    4
}

impl TrainConfig {
    /// The paper's settings (Huber δ 1, AdamW with weight decay 0.01, halving after 5 epochs without
    /// improvement, batch 32, 224 px crops) with a learning rate suited to AdamW from scratch.
    pub fn new(arch: Arch) -> Self {
        TrainConfig {
            arch,
            start: Start::Random,
            freeze_backbone: false,
            input_size: 224,
            batch: 32,
            epochs_asm: 20,
            epochs_constant: 10,
            lr: 1e-3,
            weight_decay: 0.01,
            patience: 5,
            min_lr: 5e-6,
            target: Target::Linear,
            augment: AugmentConfig::default(),
            steps_per_epoch: None,
            equivariance: 1.0,
            multiscale: false,
            tune_stages: 0,
            tune_lr_scale: default_tune_lr_scale(),
            crops: default_crops(),
            seed: 0,
        }
    }

    pub fn total_epochs(&self) -> usize {
        self.epochs_asm + self.epochs_constant
    }
}

/// One epoch's line in `log.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub round: u8,
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    pub val_mae: Option<f64>,
    pub val_acc1: Option<f64>,
    pub lr: f64,
    pub m: Option<f64>,
    pub images_per_second: f64,
    pub seconds: f64,
}

/// What the training loop reports as it goes.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    Step {
        epoch: usize,
        step: usize,
        steps: usize,
        loss: f64,
        images_per_second: f64,
    },
    Epoch(EpochLog),
    Info(String),
}

/// Kept beside `last.safetensors` so that a run can resume.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    /// Epochs completed.
    epoch: usize,
    lr: f64,
    m: Option<f64>,
    #[serde(flatten)]
    plateau: Plateau,
    best_val: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("the training split of the manifest is empty")]
    NoTrainingData,
    #[error("cannot read the image {}: {message}", path.display())]
    Image { path: PathBuf, message: String },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the loss became {loss} at epoch {epoch}, step {step}: training stopped; the last good \
         checkpoint is kept"
    )]
    NonFinite {
        epoch: usize,
        step: usize,
        loss: f64,
    },
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Features(#[from] FeatureError),
    #[error("{0}")]
    Config(String),
    #[error("model error: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// How a run ended.
#[derive(Debug, Clone, Serialize)]
pub struct TrainOutcome {
    pub epochs_done: usize,
    pub stopped: bool,
    pub m: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub last: PathBuf,
    pub best: Option<PathBuf>,
}

/// Trains (or resumes) the run in `dir` on `manifest`. `stop` is checked after every step.
pub fn train(
    manifest_path: &Path,
    cfg: &TrainConfig,
    dir: &Path,
    device: &Device,
    stop: &AtomicBool,
    on_event: impl FnMut(TrainEvent),
) -> Result<TrainOutcome, TrainError> {
    train_selected(
        manifest_path,
        &|r| Some(r.split),
        cfg,
        dir,
        device,
        stop,
        on_event,
    )
}

/// [`train`] with the split of each record chosen by `split_of` (None leaves a record out), as
/// leave-one-source-out folds do.
pub fn train_selected(
    manifest_path: &Path,
    split_of: &dyn Fn(&MagnificationRecord) -> Option<Split>,
    cfg: &TrainConfig,
    dir: &Path,
    device: &Device,
    stop: &AtomicBool,
    mut on_event: impl FnMut(TrainEvent),
) -> Result<TrainOutcome, TrainError> {
    if cfg.batch == 0 || cfg.input_size < cfg.arch.min_input() {
        return Err(TrainError::Config(format!(
            "batch must be positive and the input at least {} px",
            cfg.arch.min_input()
        )));
    }
    let manifest: Manifest = Manifest::load(manifest_path)?;
    manifest.check_disjoint()?;
    let chosen = |split: Split| -> Vec<usize> {
        (0..manifest.records.len())
            .filter(|&i| split_of(&manifest.records[i]) == Some(split))
            .collect()
    };
    // Patches of images of unknown scale only ever enter the equivariance loss.
    let (train_set, relative): (Vec<usize>, Vec<usize>) = chosen(Split::Train)
        .into_iter()
        .partition(|&i| manifest.records[i].absolute);
    let val_set: Vec<usize> = chosen(Split::Val)
        .into_iter()
        .filter(|&i| manifest.records[i].absolute)
        .collect();
    if train_set.is_empty() {
        return Err(TrainError::NoTrainingData);
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TrainError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let files = RunFiles::new(dir);
    let (last_path, state_path, best_path) = (&files.last, &files.state, &files.best);

    // A run folder belongs to one configuration; resuming checks it is the same.
    let mut state = State {
        lr: cfg.lr,
        ..State::default()
    };
    let lock = files.lock()?;
    let norm = start_normalization(&cfg.start, cfg.arch)?;
    if let Some(saved) = files.open(&lock, cfg)? {
        state = saved;
        on_event(TrainEvent::Info(format!(
            "resuming after epoch {} (learning rate {:.2e})",
            state.epoch, state.lr
        )));
    }

    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, device);
    if cfg.multiscale && !cfg.freeze_backbone {
        return Err(TrainError::Config(
            "a multi-scale head trains on a frozen backbone (--freeze-backbone)".into(),
        ));
    }
    let model = Hagnifinder::new(cfg.arch, cfg.multiscale, vb)?;
    // A partly tuned backbone: the first `split` stages frozen (and cached), the rest trained.
    let split = match cfg.tune_stages {
        0 => None,
        n if cfg.freeze_backbone && cfg.multiscale && n <= model.backbone.stage_count() => {
            Some(model.backbone.stage_count() - n)
        }
        n => {
            return Err(TrainError::Config(format!(
                "tuning the last {n} stages needs a frozen backbone, a multi-scale head and a \
                 backbone of at least {n} stages ({} has {})",
                cfg.arch.name(),
                model.backbone.stage_count()
            )));
        }
    };
    if state.epoch > 0 {
        let bytes = std::fs::read(last_path).map_err(io(last_path))?;
        load_into(&bytes, &vars, &LoadOptions::default())?;
    } else {
        // A run from scratch is reproducible: the seed draws the initial weights too.
        crate::nn::vars::reseed(&vars, cfg.seed)?;
        match &cfg.start {
            Start::Random => {}
            Start::Imagenet(p) => {
                let bytes = std::fs::read(p).map_err(io(p))?;
                let opts = LoadOptions {
                    ignore_prefixes: vec!["_fc.".into(), "fc.".into()],
                    model_prefix: "backbone.".into(),
                    ..Default::default()
                };
                load_into(&bytes, &vars, &opts)?;
            }
            Start::Checkpoint(p) => {
                let bytes = std::fs::read(p).map_err(io(p))?;
                let meta = read_meta(&bytes)?;
                if meta.arch != cfg.arch {
                    return Err(TrainError::Config(format!(
                        "{} holds a {} model, not {}",
                        p.display(),
                        meta.arch.name(),
                        cfg.arch.name()
                    )));
                }
                load_into(&bytes, &vars, &LoadOptions::default())?;
                // Straight into round 2, the head keeps the scale factor it was trained with.
                if cfg.epochs_asm == 0 {
                    state.m = meta.constants.get(CONST_M).copied();
                }
            }
        }
    }

    // The output starts at the mean target, so that the first steps do not spend themselves on the
    // bias (a linear target of 1-40 is far from a fresh layer's output of about 0).
    if state.epoch == 0 && !matches!(cfg.start, Start::Checkpoint(_)) {
        let mean = train_set
            .iter()
            .map(|&i| cfg.target.encode(manifest.records[i].magnification))
            .sum::<f64>()
            / train_set.len() as f64;
        vars::set(
            &vars,
            "head.fc3.bias",
            &Tensor::full(mean as f32, 1, device)?,
        )?;
    }
    // A frozen backbone runs on detached copies of its weights (no gradient, the fast CPU path).
    let frozen: Option<Box<dyn Backbone>> = if cfg.freeze_backbone {
        Some(build(
            cfg.arch,
            vars::detached(&vars, "backbone.", device)?,
        )?)
    } else {
        None
    };
    let tuned: Vec<String> = split.map_or_else(Vec::new, |k| {
        model
            .backbone
            .stage_suffix_prefixes(k)
            .into_iter()
            .map(|p| format!("backbone.{p}"))
            .collect()
    });
    let is_tuned = |n: &str| tuned.iter().any(|p| n.starts_with(p));
    let adamw = |vars: Vec<candle_core::Var>, lr: f64| {
        AdamW::new(
            vars,
            ParamsAdamW {
                lr,
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
        )
    };
    let mut opt = adamw(
        vars::selected(&vars, |n| !cfg.freeze_backbone || n.starts_with("head."))?,
        state.lr,
    )?;
    // Tuned stages of a pretrained backbone learn at a fraction of the head's rate: Adam moves every
    // weight by about the learning rate, and pretrained filters are small.
    let mut tuned_opt = adamw(
        vars::selected(&vars, is_tuned)?,
        state.lr * cfg.tune_lr_scale,
    )?;

    // A frozen backbone's features are computed once (and cached across runs).
    let cache = match frozen.as_deref() {
        Some(b) => {
            on_event(TrainEvent::Info(
                "the frozen backbone's features: read from the cache, or computed once and cached"
                    .into(),
            ));
            let started = Instant::now();
            let table = features_for(
                &manifest,
                b,
                vars::fingerprint(&vars, "backbone.")?,
                CropSettings {
                    input: cfg.input_size as u32,
                    max_crops: cfg.crops.max(1),
                    norm,
                    multiscale: cfg.multiscale,
                    split,
                },
                &crate::cache_dir(),
                device,
                |done, total| {
                    // A line at every quarter: the panel shows it in its log.
                    if done * 4 / total.max(1) != (done - done.min(16)) * 4 / total.max(1) {
                        on_event(TrainEvent::Info(format!(
                            "features: {done}/{total} images ({:.1} images/s)",
                            done as f64 / started.elapsed().as_secs_f64().max(1e-9)
                        )));
                    }
                },
            )?;
            Some(table)
        }
        None => None,
    };
    let pairs = match (&cache, cfg.target, cfg.equivariance > 0.0) {
        (Some(_), Target::Log2, true) => {
            let mut members = relative.clone();
            members.extend(&train_set);
            field_pairs(&manifest, &members)
        }
        _ => {
            if !relative.is_empty() {
                on_event(TrainEvent::Info(format!(
                    "{} patches of unknown scale are left out: the equivariance loss needs a \
                     frozen backbone, the log2 target and --equivariance above 0",
                    relative.len()
                )));
            }
            Vec::new()
        }
    };
    let ctx = Ctx {
        manifest: &manifest,
        cfg,
        device,
        norm,
        model: &model,
        frozen: frozen.as_deref(),
        cache: cache.as_ref(),
        split,
    };
    let range = train_set.iter().fold(None, |acc: Option<(f64, f64)>, &i| {
        let m = manifest.records[i].magnification;
        Some(acc.map_or((m, m), |(a, b)| (a.min(m), b.max(m))))
    });
    let save =
        |path: &Path, m: Option<f64>, epoch: usize, metrics: &EpochLog| -> Result<(), TrainError> {
            let meta = checkpoint_meta(cfg, norm, manifest_path, range, m, epoch, metrics);
            let bytes = to_bytes(&vars, &meta, false)?;
            write_atomic(path, &bytes).map_err(io(path))
        };

    let total = cfg.total_epochs();
    let mut stopped = false;
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(cfg.seed ^ (state.epoch as u64).wrapping_mul(0x9e37));
    for epoch in state.epoch + 1..=total {
        let round: u8 = if epoch <= cfg.epochs_asm { 1 } else { 2 };
        if round == 2 && state.m.is_none() {
            let m = ctx.mean_factor(&train_set)?;
            on_event(TrainEvent::Info(format!(
                "round 2: constant scale factor m = {m:.6e}"
            )));
            state.m = Some(m);
            state.plateau = Plateau::default();
        }
        let scaling = state.m.map_or(Scaling::Adaptive, Scaling::Constant);
        let started = Instant::now();
        // What a step draws from: cached crops (rows) with a frozen backbone, else whole records.
        let mut order: Vec<usize> = match ctx.cache {
            Some(c) => train_set
                .iter()
                .flat_map(|&i| c.rows_of(i).iter().copied())
                .collect(),
            None => train_set.clone(),
        };
        order.shuffle(&mut rng);
        let mut pair_order: Vec<usize> = (0..pairs.len()).collect();
        pair_order.shuffle(&mut rng);
        let mut pair_cursor = 0usize;
        let mut batches: Vec<&[usize]> = order.chunks(cfg.batch).collect();
        if let Some(cap) = cfg.steps_per_epoch {
            batches.truncate(cap.max(1));
        }
        let steps = batches.len();
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        for (step, idx) in batches.into_iter().enumerate() {
            let (pooled, y) = ctx.batch(idx, &mut rng)?;
            let n = idx.len();
            let mut loss = match ctx.cache {
                Some(c) if !pairs.is_empty() => {
                    // The batch and as many pairs go through the head together (one ASM factor).
                    let take: Vec<&(usize, usize, f64)> = (0..n)
                        .map(|k| &pairs[pair_order[(pair_cursor + k) % pairs.len()]])
                        .collect();
                    pair_cursor += n;
                    let pick = |rows: &[usize], rng: &mut rand::rngs::StdRng| {
                        rows[rng.random_range(0..rows.len())]
                    };
                    let a: Vec<usize> = take
                        .iter()
                        .map(|p| pick(c.rows_of(p.0), &mut rng))
                        .collect();
                    let b: Vec<usize> = take
                        .iter()
                        .map(|p| pick(c.rows_of(p.1), &mut rng))
                        .collect();
                    let all = Tensor::cat(
                        &[
                            &pooled,
                            &ctx.rows_pooled(c, &a, true)?,
                            &ctx.rows_pooled(c, &b, true)?,
                        ],
                        0,
                    )?;
                    let (out, _) = model.head.forward(&all, scaling)?;
                    let absolute = candle_nn::loss::huber(&out.narrow(0, 0, n)?, &y, 1.0)?;
                    let want: Vec<f32> = take.iter().map(|p| p.2 as f32).collect();
                    let want = Tensor::from_vec(want, n, device)?;
                    let relative =
                        equivariance_loss(&out.narrow(0, n, n)?, &out.narrow(0, 2 * n, n)?, &want)?;
                    (absolute + relative.affine(cfg.equivariance, 0.0)?)?
                }
                _ => {
                    let (out, _) = model.head.forward(&pooled, scaling)?;
                    candle_nn::loss::huber(&out, &y, 1.0)?
                }
            };
            loss = loss.to_dtype(DType::F32)?;
            let l = f64::from(loss.to_scalar::<f32>()?);
            if !l.is_finite() {
                return Err(TrainError::NonFinite {
                    epoch,
                    step,
                    loss: l,
                });
            }
            let grads = loss.backward()?;
            opt.step(&grads)?;
            tuned_opt.step(&grads)?;
            loss_sum += l * n as f64;
            seen += n;
            on_event(TrainEvent::Step {
                epoch,
                step: step + 1,
                steps,
                loss: l,
                images_per_second: seen as f64 / started.elapsed().as_secs_f64().max(1e-9),
            });
            if stop.load(Ordering::Relaxed) {
                stopped = true;
                break;
            }
        }
        if stopped {
            on_event(TrainEvent::Info(format!(
                "stopped during epoch {epoch}; the checkpoint of epoch {} is kept",
                state.epoch
            )));
            break;
        }
        let train_loss = loss_sum / seen.max(1) as f64;
        let images_per_second = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let val = if val_set.is_empty() {
            None
        } else {
            Some(ctx.evaluate(&val_set, scaling)?)
        };
        let monitored = val.as_ref().map_or(train_loss, |v| v.0);
        // Diverged weights are never saved over the last good checkpoint.
        if !monitored.is_finite() || !vars::all_finite(&vars)? {
            return Err(TrainError::NonFinite {
                epoch,
                step: steps,
                loss: monitored,
            });
        }
        if let Some(lr) = state
            .plateau
            .update(monitored, state.lr, cfg.patience, cfg.min_lr)
        {
            state.lr = lr;
            opt.set_learning_rate(lr);
            tuned_opt.set_learning_rate(lr * cfg.tune_lr_scale);
            on_event(TrainEvent::Info(format!(
                "learning rate halved to {lr:.2e}"
            )));
        }
        let log = EpochLog {
            epoch,
            round,
            train_loss,
            val_loss: val.as_ref().map(|v| v.0),
            val_mae: val.as_ref().map(|v| v.1.mae),
            val_acc1: val.as_ref().map(|v| v.1.acc1),
            lr: state.lr,
            m: state.m,
            images_per_second,
            seconds: started.elapsed().as_secs_f64(),
        };
        // The state is written after the checkpoint: a crash between them resumes one epoch early.
        save(last_path, state.m, epoch, &log)?;
        if round == 2 && val.is_some() && state.best_val.is_none_or(|b| monitored < b) {
            state.best_val = Some(monitored);
            save(best_path, state.m, epoch, &log)?;
        }
        state.epoch = epoch;
        files.commit_epoch(&log, &state)?;
        on_event(TrainEvent::Epoch(log));
    }
    // A run without a second round still gets m, so that its checkpoint can be used.
    if !stopped && state.m.is_none() && state.epoch == total {
        let m = ctx.mean_factor(&train_set)?;
        state.m = Some(m);
        let log = EpochLog {
            epoch: state.epoch,
            round: 1,
            train_loss: f64::NAN,
            val_loss: None,
            val_mae: None,
            val_acc1: None,
            lr: state.lr,
            m: Some(m),
            images_per_second: 0.0,
            seconds: 0.0,
        };
        save(last_path, state.m, state.epoch, &log)?;
        write_json(state_path, &state).map_err(io(state_path))?;
    }
    Ok(TrainOutcome {
        epochs_done: state.epoch,
        stopped,
        m: state.m,
        best_val_loss: state.best_val,
        best: best_path.exists().then(|| best_path.clone()),
        last: last_path.clone(),
    })
}

/// The checkpoint metadata of a magnification model.
fn checkpoint_meta(
    cfg: &TrainConfig,
    norm: Normalization,
    manifest: &Path,
    range: Option<(f64, f64)>,
    m: Option<f64>,
    epoch: usize,
    log: &EpochLog,
) -> CheckpointMeta {
    let mut constants = std::collections::BTreeMap::new();
    if let Some(m) = m {
        constants.insert(CONST_M.to_string(), m);
    }
    constants.insert(
        CONST_TARGET_LOG2.to_string(),
        f64::from(u8::from(cfg.target == Target::Log2)),
    );
    if cfg.multiscale {
        constants.insert(CONST_MULTISCALE.to_string(), 1.0);
    }
    let mut metrics = std::collections::BTreeMap::new();
    for (k, v) in [
        ("train_loss", Some(log.train_loss)),
        ("val_loss", log.val_loss),
        ("val_mae", log.val_mae),
        ("val_acc1", log.val_acc1),
    ] {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            metrics.insert(k.to_string(), v);
        }
    }
    CheckpointMeta {
        format_version: FORMAT_VERSION,
        arch: cfg.arch,
        task: TASK.into(),
        input_size: [cfg.input_size, cfg.input_size],
        normalization: norm,
        classes: Vec::new(),
        magnification_range: range.map(|(a, b)| [a, b]),
        constants,
        provenance: Provenance {
            data: manifest.display().to_string(),
            epochs: epoch,
            metrics,
            software: format!("histolens {}", env!("CARGO_PKG_VERSION")),
            notes: format!(
                "start {:?}, frozen backbone {} (but its last {} stages), target {}",
                cfg.start,
                cfg.freeze_backbone,
                cfg.tune_stages,
                cfg.target.name()
            ),
        },
    }
}

/// The scale-equivariance loss: an image downsampled by k must move the log2 output by exactly
/// log2 k. `fine` and `coarse` are the outputs for the two patches of each pair, `log2_ratio` the
/// log2 of their magnification ratio (Huber, δ = 1).
pub fn equivariance_loss(
    fine: &Tensor,
    coarse: &Tensor,
    log2_ratio: &Tensor,
) -> candle_core::Result<Tensor> {
    candle_nn::loss::huber(&(fine - coarse)?, log2_ratio, 1.0)
}

/// Pairs of patches of one field at two scales, among `records` (manifest indexes): (finer, coarser,
/// log2 of their magnification ratio), for the scale-equivariance loss.
fn field_pairs(manifest: &Manifest, records: &[usize]) -> Vec<(usize, usize, f64)> {
    let mut fields: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
    for &i in records {
        let f = manifest.records[i].field.as_str();
        if !f.is_empty() {
            fields.entry(f).or_default().push(i);
        }
    }
    let mut out = Vec::new();
    for members in fields.values() {
        for (k, &a) in members.iter().enumerate() {
            for &b in &members[k + 1..] {
                let (ma, mb) = (
                    manifest.records[a].magnification,
                    manifest.records[b].magnification,
                );
                out.push((a, b, (ma / mb).log2()));
            }
        }
    }
    out
}

/// What the loops share.
struct Ctx<'a> {
    manifest: &'a Manifest,
    cfg: &'a TrainConfig,
    device: &'a Device,
    norm: Normalization,
    model: &'a Hagnifinder,
    frozen: Option<&'a dyn Backbone>,
    /// A frozen backbone's features of every record's crops.
    cache: Option<&'a FeatureTable>,
    /// Stages of the backbone frozen (and cached) before the tuned ones.
    split: Option<usize>,
}

impl Ctx<'_> {
    /// The head's input for cached `rows`: their pooled features, followed with a split backbone by
    /// those of the tuned stages run on the cached output of the frozen ones.
    fn rows_pooled(
        &self,
        c: &FeatureTable,
        rows: &[usize],
        train: bool,
    ) -> Result<Tensor, TrainError> {
        let frozen = c.select(rows)?;
        match (self.split, c.select_maps(rows)?) {
            (Some(k), Some(maps)) => {
                let tuned = self.model.backbone.stage_suffix(&maps, k, train)?;
                Ok(Tensor::cat(&[&frozen, &tuned], 1)?)
            }
            _ => Ok(frozen),
        }
    }

    /// Decodes the records' images in parallel: augmented crops when `seeds` are given (one per
    /// image), centre crops otherwise.
    fn load(&self, records: &[usize], seeds: Option<&[u64]>) -> Result<Vec<RgbImage>, TrainError> {
        let size = self.cfg.input_size as u32;
        records
            .par_iter()
            .enumerate()
            .map(|(i, &r)| {
                let path = self.manifest.resolve(&self.manifest.records[r]);
                let img = image::open(&path)
                    .map_err(|e| TrainError::Image {
                        path: path.clone(),
                        message: e.to_string(),
                    })?
                    .to_rgb8();
                Ok(match seeds {
                    Some(s) => {
                        let mut rng = rand::rngs::StdRng::seed_from_u64(s[i]);
                        augment(&img, size, &self.cfg.augment, &mut rng)
                    }
                    None => center_crop(&img, size),
                })
            })
            .collect()
    }

    fn targets(&self, records: impl Iterator<Item = usize>) -> Result<Tensor, TrainError> {
        let t: Vec<f32> = records
            .map(|r| {
                self.cfg
                    .target
                    .encode(self.manifest.records[r].magnification) as f32
            })
            .collect();
        let n = t.len();
        Ok(Tensor::from_vec(t, n, self.device)?)
    }

    /// A training batch: pooled features and targets of cached rows, or of augmented records through
    /// the (trained) backbone.
    fn batch(
        &self,
        units: &[usize],
        rng: &mut rand::rngs::StdRng,
    ) -> Result<(Tensor, Tensor), TrainError> {
        if let Some(c) = self.cache {
            let y = self.targets(units.iter().map(|&row| c.record[row]))?;
            return Ok((self.rows_pooled(c, units, true)?, y));
        }
        let seeds: Vec<u64> = units.iter().map(|_| rng.random()).collect();
        let images = self.load(units, Some(&seeds))?;
        let x = to_tensor(&images, self.norm, self.device)?;
        let y = self.targets(units.iter().copied())?;
        Ok((self.model.backbone.forward(&x, true)?.pooled, y))
    }

    /// Pooled evaluation-mode features of `records`: (features, owning record of each row).
    fn pooled_eval(&self, records: &[usize]) -> Result<(Tensor, Vec<usize>), TrainError> {
        if let Some(c) = self.cache {
            let rows: Vec<usize> = records
                .iter()
                .flat_map(|&r| c.rows_of(r).iter().copied())
                .collect();
            let owners = rows.iter().map(|&row| c.record[row]).collect();
            return Ok((self.rows_pooled(c, &rows, false)?.detach(), owners));
        }
        let images = self.load(records, None)?;
        let x = to_tensor(&images, self.norm, self.device)?;
        let pooled = match self.frozen {
            Some(b) => b.forward(&x, false)?.pooled,
            None => self.model.pooled(&x, false)?,
        };
        Ok((pooled.detach(), records.to_vec()))
    }

    /// m: the mean over training batches (evaluation mode) of the ASM factor z / X.
    fn mean_factor(&self, set: &[usize]) -> Result<f64, TrainError> {
        let mut factors = Vec::new();
        for chunk in set.chunks(self.cfg.batch) {
            let (pooled, _) = self.pooled_eval(chunk)?;
            let z = self.model.head.bottleneck(&pooled)?;
            factors.push(asm_factor(&z)?);
        }
        Ok(factors.iter().sum::<f64>() / factors.len().max(1) as f64)
    }

    /// Mean Huber loss (over crops) and metrics (each record's median crop) over `set`.
    fn evaluate(
        &self,
        set: &[usize],
        scaling: Scaling,
    ) -> Result<(f64, MagnificationMetrics), TrainError> {
        let mut outputs: std::collections::BTreeMap<usize, Vec<f64>> = Default::default();
        let (mut loss_sum, mut rows) = (0.0, 0usize);
        for chunk in set.chunks(self.cfg.batch) {
            let (pooled, owners) = self.pooled_eval(chunk)?;
            let (out, _) = self.model.head.forward(&pooled, scaling)?;
            let y = self.targets(owners.iter().copied())?;
            let out = out.detach();
            let l = candle_nn::loss::huber(&out, &y, 1.0)?.to_scalar::<f32>()?;
            loss_sum += f64::from(l) * owners.len() as f64;
            rows += owners.len();
            let out: Vec<f32> = out.to_vec1()?;
            for (r, o) in owners.into_iter().zip(out) {
                outputs.entry(r).or_default().push(f64::from(o));
            }
        }
        let pairs: Vec<(f64, f64)> = outputs
            .into_iter()
            .map(|(r, mut v)| {
                v.sort_by(f64::total_cmp);
                let median = quantile(&v, 0.5);
                (
                    self.manifest.records[r].magnification,
                    self.cfg.target.decode(median),
                )
            })
            .collect();
        Ok((
            loss_sum / rows.max(1) as f64,
            MagnificationMetrics::compute(&pairs),
        ))
    }
}

/// Evaluates a magnification model on one split of a manifest (each image's centre crop), calling
/// `progress(done, total)` as it goes.
pub fn evaluate(
    model: &super::MagnificationModel,
    manifest_path: &Path,
    split: Split,
    mut progress: impl FnMut(usize, usize),
) -> Result<MagnificationMetrics, TrainError> {
    let manifest: Manifest = Manifest::load(manifest_path)?;
    let records = manifest.split(split);
    if records.is_empty() {
        return Err(TrainError::Config(format!(
            "the {} split of {} is empty",
            split.name(),
            manifest_path.display()
        )));
    }
    let size = model.input_size();
    let mut pairs = Vec::with_capacity(records.len());
    for chunk in records.chunks(32) {
        let mut crops = Vec::with_capacity(chunk.len());
        for r in chunk {
            let path = manifest.resolve(r);
            let img = image::open(&path).map_err(|e| TrainError::Image {
                path: path.clone(),
                message: e.to_string(),
            })?;
            crops.push(center_crop(&img.to_rgb8(), size));
        }
        let predictions = model
            .predict(&crops)
            .map_err(|e| TrainError::Config(e.to_string()))?;
        for (r, p) in chunk.iter().zip(predictions) {
            pairs.push((r.magnification, p));
        }
        progress(pairs.len(), records.len());
    }
    Ok(MagnificationMetrics::compute(&pairs))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A perfectly equivariant model (its output is log2 of the magnification) has no equivariance
    /// loss; one that ignores the scale does.
    #[test]
    fn equivariance_loss_of_toy_models() {
        let dev = Device::Cpu;
        let fine_mag = [40.0f32, 20.0, 13.3, 7.0];
        let k = [2.0f32, 1.5, 3.0, 2.5];
        let coarse_mag: Vec<f32> = fine_mag.iter().zip(&k).map(|(m, k)| m / k).collect();
        let t = |v: Vec<f32>| Tensor::from_vec(v, 4, &dev).unwrap();
        let log2 = |v: &[f32]| v.iter().map(|m| m.log2()).collect::<Vec<_>>();
        let ratio = t(k.iter().map(|k| k.log2()).collect());
        let exact = equivariance_loss(&t(log2(&fine_mag)), &t(log2(&coarse_mag)), &ratio)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(exact.abs() < 1e-10, "{exact}");
        let blind = equivariance_loss(&t(vec![4.3; 4]), &t(vec![4.3; 4]), &ratio)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(blind > 0.3, "{blind}");
    }

    #[test]
    fn pairs_of_a_field() {
        let record = |field: &str, mag: f64| MagnificationRecord {
            path: format!("{field}-{mag}.png"),
            magnification: mag,
            mpp: 10.0 / mag,
            source: "s".into(),
            region: String::new(),
            split: Split::Train,
            group: "unlabelled".into(),
            absolute: false,
            field: field.into(),
        };
        let manifest = Manifest {
            root: ".".into(),
            records: vec![
                record("a", 8.0),
                record("a", 4.0),
                record("b", 1.0),
                record("", 2.0),
            ],
        };
        let pairs = field_pairs(&manifest, &[0, 1, 2, 3]);
        assert_eq!(pairs, vec![(0, 1, 1.0)]);
    }
}
