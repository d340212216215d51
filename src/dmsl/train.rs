//! DMSL training and evaluation: Adam on α·CE + β·SIM over pairs (the paper: lr 1e-3, batch 32,
//! α = β = 0.5, fusion weights 0.5 each), with the paper's comparison modes (SIM, MM without the SIM
//! loss, and single-magnification baselines), pair augmentation (flips, quarter turns, colour jitter,
//! grey), k-fold cross-validation over source groups, and the run-folder habits of the magnification
//! model: a checkpoint per epoch, the best by validation loss, resume, a JSON-lines log, a report.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::frozen::{FrozenOutput, FrozenTable};
use super::metrics::ClassificationMetrics;
use super::model::{DmslLayout, DmslModel, ModelError, TASK};
use crate::data::augment::{AugmentConfig, augment_pair};
use crate::data::manifest::{Manifest, ManifestError, Split};
use crate::data::pairs::{PairDataset, PairError, PairRecord, load_dataset};
use crate::data::tensor::to_tensor;
use crate::nn::backbone::{Arch, Backbone, Features, build};
use crate::nn::checkpoint::{
    CheckpointError, CheckpointMeta, FORMAT_VERSION, LoadOptions, Normalization, Provenance,
    load_into, read_meta, start_normalization, to_bytes,
};
use crate::nn::dmsl::{Dmsl, DmslLoss, DmslOutput, loss};
use crate::nn::optim::AdamW;
use crate::nn::pool::global_avg_pool;
use crate::nn::vars;
use crate::util::fs::write_atomic;
pub use crate::util::run::Start;
use crate::util::run::{Plateau, RunError, RunFiles};

/// Which branches train, and with which loss: the paper's comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Both magnifications, α·CE + β·SIM.
    Sim,
    /// Both magnifications, CE only (the paper's "MM").
    Mm,
    /// The high magnification alone.
    High,
    /// The low magnification alone.
    Low,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s.to_ascii_lowercase().as_str() {
            "sim" => Some(Mode::Sim),
            "mm" => Some(Mode::Mm),
            "high" => Some(Mode::High),
            "low" => Some(Mode::Low),
            _ => None,
        }
    }
}

/// Which weights stay fixed during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Freeze {
    /// Every weight trains.
    None,
    /// Only the classifiers train, on the backbones' (evaluation-mode) features.
    Backbone,
    /// The backbones' last block (whose output is the feature map SIM compares) and the classifiers
    /// train; the rest runs frozen on the fast inference path (fine-tuning from ImageNet on a CPU).
    AllButLastBlock,
}

impl Freeze {
    pub fn parse(s: &str) -> Option<Freeze> {
        match s {
            "none" => Some(Freeze::None),
            "backbone" => Some(Freeze::Backbone),
            "all-but-last-block" => Some(Freeze::AllButLastBlock),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DmslTrainConfig {
    pub arch: Arch,
    pub mode: Mode,
    pub start: Start,
    pub freeze: Freeze,
    /// Fusion weights of the high and the low branch.
    pub weights: [f64; 2],
    pub alpha: f64,
    pub beta: f64,
    pub batch: usize,
    pub epochs: usize,
    pub lr: f64,
    /// 0 is Adam (the paper); AdamW's decoupled decay otherwise.
    pub weight_decay: f64,
    pub patience: usize,
    pub min_lr: f64,
    pub augment: AugmentConfig,
    pub grey_probability: f32,
    /// Cap on training steps per epoch (None: the whole training split).
    pub steps_per_epoch: Option<usize>,
    /// With frozen backbones: their output is computed once per pair (unaugmented) and cached, so
    /// that epochs and folds cost only what trains.
    #[serde(default)]
    pub cache_frozen: bool,
    /// Cross-validation: (fold, folds). The training and validation groups are pooled and fold
    /// `fold` of `folds` becomes the validation set; the test split is never touched.
    pub fold: Option<(usize, usize)>,
    pub seed: u64,
}

impl DmslTrainConfig {
    /// The paper's settings.
    pub fn new(arch: Arch) -> Self {
        DmslTrainConfig {
            arch,
            mode: Mode::Sim,
            start: Start::Random,
            freeze: Freeze::None,
            weights: [0.5, 0.5],
            alpha: 0.5,
            beta: 0.5,
            batch: 32,
            epochs: 30,
            lr: 1e-3,
            weight_decay: 0.0,
            patience: 5,
            min_lr: 1e-6,
            augment: AugmentConfig {
                flips: true,
                max_rotation_deg: 90.0,
                stain: 0.1,
                brightness: 0.08,
                blur_probability: 0.0,
                jpeg_probability: 0.0,
            },
            grey_probability: 0.1,
            steps_per_epoch: None,
            cache_frozen: false,
            fold: None,
            seed: 0,
        }
    }

    /// The branches this mode trains, as magnifications, and their fusion weights.
    pub fn layout(&self, d: &PairDataset) -> DmslLayout {
        let g = d.geometry;
        let (branch_magnifications, weights) = match self.mode {
            Mode::Sim | Mode::Mm => (
                vec![g.high_magnification, g.low_magnification],
                self.weights.to_vec(),
            ),
            Mode::High => (vec![g.high_magnification], vec![1.0]),
            Mode::Low => (vec![g.low_magnification], vec![1.0]),
        };
        DmslLayout {
            geometry: g,
            branch_magnifications,
            weights,
        }
    }

    fn effective_beta(&self) -> f64 {
        if self.mode == Mode::Sim {
            self.beta
        } else {
            0.0
        }
    }
}

/// One epoch's line in `log.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DmslEpochLog {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_ce: f64,
    pub train_sim: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub val_f1: Option<f64>,
    pub val_auc: Option<f64>,
    pub lr: f64,
    pub pairs_per_second: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone)]
pub enum DmslTrainEvent {
    Step {
        epoch: usize,
        step: usize,
        steps: usize,
        loss: f64,
        pairs_per_second: f64,
    },
    Epoch(DmslEpochLog),
    Info(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    epoch: usize,
    lr: f64,
    #[serde(flatten)]
    plateau: Plateau,
    best_val: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum DmslTrainError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Pairs(#[from] PairError),
    #[error("the training split of the manifest is empty")]
    NoTrainingData,
    #[error("cannot read the image {}: {message}", path.display())]
    Image { path: PathBuf, message: String },
    #[error("{}: class {class:?} is not among the dataset's classes", path.display())]
    UnknownClass { path: PathBuf, class: String },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Model(#[from] ModelError),
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
    #[error("{0}")]
    Config(String),
    #[error("model error: {0}")]
    Tensor(#[from] candle_core::Error),
}

#[derive(Debug, Clone, Serialize)]
pub struct DmslOutcome {
    pub epochs_done: usize,
    pub stopped: bool,
    pub best_val_loss: Option<f64>,
    pub last: PathBuf,
    pub best: Option<PathBuf>,
}

/// The pairs of a manifest with their class indices, split for training (folds applied).
struct Data {
    manifest: Manifest<PairRecord>,
    dataset: PairDataset,
    train: Vec<usize>,
    val: Vec<usize>,
    labels: Vec<usize>,
}

fn load_data(
    manifest_path: &Path,
    fold: Option<(usize, usize)>,
    seed: u64,
) -> Result<Data, DmslTrainError> {
    let manifest: Manifest<PairRecord> = Manifest::load(manifest_path)?;
    manifest.check_disjoint()?;
    let dataset = load_dataset(manifest_path)?;
    let labels = manifest
        .records
        .iter()
        .map(|r| {
            dataset
                .classes
                .iter()
                .position(|c| *c == r.class)
                .ok_or_else(|| DmslTrainError::UnknownClass {
                    path: manifest_path.to_path_buf(),
                    class: r.class.clone(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (mut train, mut val) = (Vec::new(), Vec::new());
    match fold {
        None => {
            for (i, r) in manifest.records.iter().enumerate() {
                match r.split {
                    Split::Train => train.push(i),
                    Split::Val => val.push(i),
                    Split::Test => {}
                }
            }
        }
        Some((k, folds)) => {
            if folds < 2 || k >= folds {
                return Err(DmslTrainError::Config(format!(
                    "fold {k} of {folds}: need 2 or more folds and a fold below their number"
                )));
            }
            for (i, f) in cross_validation_folds(&manifest, folds, seed)
                .into_iter()
                .enumerate()
            {
                match f {
                    Some(f) if f == k => val.push(i),
                    Some(_) => train.push(i),
                    None => {}
                }
            }
        }
    }
    if train.is_empty() {
        return Err(DmslTrainError::NoTrainingData);
    }
    Ok(Data {
        manifest,
        dataset,
        train,
        val,
        labels,
    })
}

/// The fold each record is validated in, for k-fold cross-validation over the training and
/// validation splits pooled (None for the test split, which is kept). Folds are dealt by source (a
/// labelled image or region: class folders name no patients) and stratified by class: each
/// class's sources are shuffled and dealt in turn, so every fold holds about 1/k of each class.
pub fn cross_validation_folds(
    manifest: &Manifest<PairRecord>,
    folds: usize,
    seed: u64,
) -> Vec<Option<usize>> {
    let mut by_class: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in manifest.records.iter().filter(|r| r.split != Split::Test) {
        let list = by_class.entry(r.class.as_str()).or_default();
        if !list.contains(&r.source.as_str()) {
            list.push(r.source.as_str());
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut fold_of: HashMap<&str, usize> = HashMap::new();
    let mut next = 0;
    for list in by_class.values_mut() {
        list.sort_unstable();
        list.shuffle(&mut rng);
        for source in list.iter() {
            fold_of.entry(source).or_insert_with(|| {
                next += 1;
                (next - 1) % folds.max(1)
            });
        }
    }
    manifest
        .records
        .iter()
        .map(|r| match r.split {
            Split::Test => None,
            _ => fold_of.get(r.source.as_str()).copied(),
        })
        .collect()
}

/// Reads the images a layout needs for the given records: one list per branch (high, then low).
fn load_inputs(
    data: &Data,
    layout: &DmslLayout,
    idx: &[usize],
    augment: Option<(&AugmentConfig, f32, &[u64])>,
) -> Result<Vec<Vec<RgbImage>>, DmslTrainError> {
    let g = layout.geometry;
    let pairs: Vec<Vec<RgbImage>> = idx
        .par_iter()
        .enumerate()
        .map(|(k, &i)| {
            let r = &data.manifest.records[i];
            let read = |rel: &str, size: u32| -> Result<RgbImage, DmslTrainError> {
                let path = data.manifest.resolve_path(rel);
                let img = image::open(&path)
                    .map_err(|e| DmslTrainError::Image {
                        path: path.clone(),
                        message: e.to_string(),
                    })?
                    .to_rgb8();
                if img.dimensions() != (size, size) {
                    return Err(DmslTrainError::Image {
                        path,
                        message: format!(
                            "is {}x{}, the dataset's geometry needs {size}x{size}",
                            img.width(),
                            img.height()
                        ),
                    });
                }
                Ok(img)
            };
            let images = layout
                .branch_magnifications
                .iter()
                .map(|&m| {
                    if m < g.high_magnification {
                        read(&r.low, g.low_px())
                    } else {
                        read(&r.high, g.high_px())
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(match augment {
                Some((cfg, grey, seeds)) => {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seeds[k]);
                    augment_pair(&images, cfg, grey, &mut rng)
                }
                None => images,
            })
        })
        .collect::<Result<_, DmslTrainError>>()?;
    // Transpose: per pair → per branch.
    let branches = layout.branch_magnifications.len();
    let mut out: Vec<Vec<RgbImage>> = (0..branches)
        .map(|_| Vec::with_capacity(idx.len()))
        .collect();
    for pair in pairs {
        for (b, img) in pair.into_iter().enumerate() {
            out[b].push(img);
        }
    }
    Ok(out)
}

/// Trains (or resumes) the run in `dir` on the pairs manifest. `stop` is checked after every step.
pub fn train(
    manifest_path: &Path,
    cfg: &DmslTrainConfig,
    dir: &Path,
    device: &Device,
    stop: &AtomicBool,
    mut on_event: impl FnMut(DmslTrainEvent),
) -> Result<DmslOutcome, DmslTrainError> {
    let positive = |v: f64| v.is_finite() && v > 0.0;
    let non_negative = |v: f64| v.is_finite() && v >= 0.0;
    if cfg.batch == 0 || !positive(cfg.lr) || !non_negative(cfg.alpha) || !non_negative(cfg.beta) {
        return Err(DmslTrainError::Config(
            "batch and learning rate must be positive, α and β not negative".into(),
        ));
    }
    let data = load_data(manifest_path, cfg.fold, cfg.seed)?;
    let layout = cfg.layout(&data.dataset);
    let min_input = cfg.arch.min_input() as u32;
    if layout.input_sizes().iter().any(|&s| s < min_input) {
        return Err(DmslTrainError::Config(format!(
            "{} needs inputs of at least {min_input} px; the dataset's pairs are {:?} px",
            cfg.arch.name(),
            layout.input_sizes()
        )));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DmslTrainError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let files = RunFiles::new(dir);

    let mut state = State {
        lr: cfg.lr,
        ..State::default()
    };
    let lock = files.lock()?;
    let norm = start_normalization(&cfg.start, cfg.arch)?;
    if let Some(saved) = files.open(&lock, cfg)? {
        state = saved;
        on_event(DmslTrainEvent::Info(format!(
            "resuming after epoch {} (learning rate {:.2e})",
            state.epoch, state.lr
        )));
    }

    let classes = data.dataset.classes.len();
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, device);
    let model = Dmsl::new(cfg.arch, classes, &layout.weights, vb)?;
    let branches = layout.branch_magnifications.len();
    if state.epoch > 0 {
        let bytes = std::fs::read(&files.last).map_err(io(&files.last))?;
        load_into(&bytes, &vars, &LoadOptions::default())?;
    } else {
        // A run from scratch is reproducible: the seed draws the initial weights too.
        vars::reseed(&vars, cfg.seed)?;
        load_start(&cfg.start, cfg.arch, branches, &vars)?;
    }
    // Frozen backbones run on detached copies of their weights (no gradient, the fast CPU path).
    let frozen: Vec<Box<dyn Backbone>> = if cfg.freeze != Freeze::None {
        (0..branches)
            .map(|b| {
                let vb = vars::detached(&vars, &format!("branches.{b}.backbone."), device)?;
                build(cfg.arch, vb)
            })
            .collect::<candle_core::Result<_>>()?
    } else {
        Vec::new()
    };
    let last_block: Vec<String> = model
        .branches
        .iter()
        .enumerate()
        .flat_map(|(b, branch)| {
            let prefix = format!("branches.{b}.backbone.");
            branch
                .backbone
                .last_block_prefixes()
                .into_iter()
                .map(move |p| format!("{prefix}{p}"))
        })
        .collect();
    let trainable = vars::selected(&vars, |n| match cfg.freeze {
        Freeze::None => true,
        Freeze::Backbone => n.contains(".fc."),
        Freeze::AllButLastBlock => {
            n.contains(".fc.") || last_block.iter().any(|p| n.starts_with(p.as_str()))
        }
    })?;
    let mut opt = AdamW::new(
        trainable,
        ParamsAdamW {
            lr: state.lr,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;
    let table = if cfg.cache_frozen {
        if cfg.freeze == Freeze::None {
            return Err(DmslTrainError::Config(
                "caching frozen outputs needs a frozen backbone (--freeze backbone or \
                 all-but-last-block)"
                    .into(),
            ));
        }
        let trained = |n: &str| last_block.iter().any(|p| n.starts_with(p.as_str()));
        let weights = vars::fingerprint_where(&vars, |n| {
            n.contains(".backbone.") && (cfg.freeze == Freeze::Backbone || !trained(n))
        })?;
        let cache = crate::cache_dir();
        let run = FrozenRun {
            weights,
            cache: &cache,
            device,
            stop,
        };
        match frozen_table(&data, &layout, cfg, &frozen, norm, run, &mut on_event)? {
            Some(t) => Some(t),
            None => return Ok(outcome(&files, &state, true)),
        }
    } else {
        None
    };
    let ctx = Ctx {
        data: &data,
        layout: &layout,
        cfg,
        device,
        norm,
        model: &model,
        frozen: &frozen,
        table: table.as_ref(),
    };
    let save = |path: &Path, epoch: usize, log: &DmslEpochLog| -> Result<(), DmslTrainError> {
        let meta = checkpoint_meta(cfg, norm, manifest_path, &data.dataset, &layout, epoch, log);
        let bytes = to_bytes(&vars, &meta, false)?;
        write_atomic(path, &bytes).map_err(io(path))
    };

    let mut stopped = false;
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(cfg.seed ^ (state.epoch as u64).wrapping_mul(0x9e37));
    for epoch in state.epoch + 1..=cfg.epochs {
        let started = Instant::now();
        let mut order = data.train.clone();
        order.shuffle(&mut rng);
        let mut batches: Vec<&[usize]> = order.chunks(cfg.batch).collect();
        if let Some(cap) = cfg.steps_per_epoch {
            batches.truncate(cap.max(1));
        }
        let steps = batches.len();
        let (mut sums, mut seen) = ([0.0f64; 3], 0usize);
        for (step, idx) in batches.into_iter().enumerate() {
            let (_, l) = if ctx.table.is_some() {
                ctx.batch_cached(idx, true)?
            } else {
                let seeds: Vec<u64> = idx.iter().map(|_| rng.random()).collect();
                let images = load_inputs(
                    &data,
                    &layout,
                    idx,
                    Some((&cfg.augment, cfg.grey_probability, &seeds)),
                )?;
                ctx.batch(&images, idx, true)?
            };
            let value = f64::from(l.total.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            if !value.is_finite() {
                return Err(DmslTrainError::NonFinite {
                    epoch,
                    step,
                    loss: value,
                });
            }
            opt.backward_step(&l.total)?;
            let n = idx.len() as f64;
            for (s, v) in sums.iter_mut().zip([value, l.ce, l.sim]) {
                *s += v * n;
            }
            seen += idx.len();
            on_event(DmslTrainEvent::Step {
                epoch,
                step: step + 1,
                steps,
                loss: value,
                pairs_per_second: seen as f64 / started.elapsed().as_secs_f64().max(1e-9),
            });
            if stop.load(Ordering::Relaxed) {
                stopped = true;
                break;
            }
        }
        if stopped {
            on_event(DmslTrainEvent::Info(format!(
                "stopped during epoch {epoch}; the checkpoint of epoch {} is kept",
                state.epoch
            )));
            break;
        }
        let seen_f = seen.max(1) as f64;
        let pairs_per_second = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let val = if data.val.is_empty() {
            None
        } else {
            let scored = ctx.evaluate(&data.val)?;
            write_predictions(
                &files.dir.join("val-predictions.csv"),
                &data,
                &data.val,
                &scored.probs,
            )?;
            Some((scored.loss, scored.metrics))
        };
        let train_loss = sums[0] / seen_f;
        let monitored = val.as_ref().map_or(train_loss, |v| v.0);
        if !monitored.is_finite() || !vars::all_finite(&vars)? {
            return Err(DmslTrainError::NonFinite {
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
            on_event(DmslTrainEvent::Info(format!(
                "learning rate halved to {lr:.2e}"
            )));
        }
        let log = DmslEpochLog {
            epoch,
            train_loss,
            train_ce: sums[1] / seen_f,
            train_sim: sums[2] / seen_f,
            val_loss: val.as_ref().map(|v| v.0),
            val_accuracy: val.as_ref().map(|v| v.1.accuracy),
            val_f1: val.as_ref().map(|v| v.1.f1),
            val_auc: val.as_ref().map(|v| v.1.auc).filter(|a| a.is_finite()),
            lr: state.lr,
            pairs_per_second,
            seconds: started.elapsed().as_secs_f64(),
        };
        save(&files.last, epoch, &log)?;
        if state.best_val.is_none_or(|b| monitored < b) {
            state.best_val = Some(monitored);
            save(&files.best, epoch, &log)?;
        }
        state.epoch = epoch;
        files.commit_epoch(&log, &state)?;
        on_event(DmslTrainEvent::Epoch(log));
    }
    Ok(outcome(&files, &state, stopped))
}

/// What a run ended with, from its folder and state.
fn outcome(files: &RunFiles, state: &State, stopped: bool) -> DmslOutcome {
    DmslOutcome {
        epochs_done: state.epoch,
        stopped,
        best_val_loss: state.best_val,
        best: files.best.exists().then(|| files.best.clone()),
        last: files.last.clone(),
    }
}

/// Where and how [`frozen_table`] works: the frozen weights' fingerprint, the cache folder, the
/// device, and the flag that stops it.
struct FrozenRun<'a> {
    weights: u64,
    cache: &'a Path,
    device: &'a Device,
    stop: &'a AtomicBool,
}

/// The frozen part's output of every record (cached in histolens's cache folder across runs and
/// folds), or None when `stop` was set while it was being computed.
fn frozen_table(
    data: &Data,
    layout: &DmslLayout,
    cfg: &DmslTrainConfig,
    frozen: &[Box<dyn Backbone>],
    norm: Normalization,
    run: FrozenRun,
    on_event: &mut impl FnMut(DmslTrainEvent),
) -> Result<Option<FrozenTable>, DmslTrainError> {
    let FrozenRun {
        weights,
        cache,
        device,
        stop,
    } = run;
    let body = cfg.freeze == Freeze::AllButLastBlock;
    let records = &data.manifest.records;
    let images: Vec<PathBuf> = records
        .iter()
        .flat_map(|r| [&r.high, &r.low])
        .map(|p| data.manifest.resolve_path(p))
        .collect();
    let description = format!(
        "{} {:?} {:?} {:?}",
        cfg.arch.name(),
        layout.branch_magnifications,
        norm.mean,
        norm.std
    );
    let key = super::frozen::key(weights, body, &description, &images);
    let file = cache
        .join("features")
        .join(format!("dmsl-{key:016x}.safetensors"));
    if let Some(t) = FrozenTable::load(&file, frozen.len(), records.len(), body, device) {
        on_event(DmslTrainEvent::Info(format!(
            "the frozen backbones' output of {} pairs read from {}",
            records.len(),
            file.display()
        )));
        return Ok(Some(t));
    }
    on_event(DmslTrainEvent::Info(format!(
        "computing the frozen backbones' output of {} pairs once (cached in {})",
        records.len(),
        file.display()
    )));
    let started = Instant::now();
    let all: Vec<usize> = (0..records.len()).collect();
    let chunks: Vec<&[usize]> = all.chunks(cfg.batch.max(1)).collect();
    let mut batches = Vec::with_capacity(chunks.len());
    for (k, chunk) in chunks.iter().enumerate() {
        let images = load_inputs(data, layout, chunk, None)?;
        let outputs = frozen
            .iter()
            .zip(&images)
            .map(|(b, imgs)| {
                let x = to_tensor(imgs, norm, device)?;
                FrozenOutput::compute(b.as_ref(), &x, body)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        if k == 0 {
            // The whole table stays in memory: refuse one that would not fit in half the RAM free.
            let per_pair: usize = outputs
                .iter()
                .flat_map(FrozenOutput::tensors)
                .map(|t| t.elem_count() * 4)
                .sum::<usize>()
                / chunk.len().max(1);
            let need = (per_pair * records.len()) as u64;
            if let Some(free) = crate::util::memory::available_ram_bytes()
                && need > free / 2
            {
                return Err(DmslTrainError::Config(format!(
                    "caching the frozen output of {} pairs needs {:.1} GB, more than half the {:.1} GB \
                     of free memory: train without --cache-frozen (or on fewer pairs)",
                    records.len(),
                    need as f64 / 1e9,
                    free as f64 / 1e9
                )));
            }
        }
        batches.push(outputs);
        let done = k + 1;
        if done * 10 / chunks.len() > k * 10 / chunks.len() {
            on_event(DmslTrainEvent::Info(format!(
                "frozen output: {} of {} pairs ({:.1} pairs/s)",
                (done * cfg.batch).min(records.len()),
                records.len(),
                (done * cfg.batch).min(records.len()) as f64
                    / started.elapsed().as_secs_f64().max(1e-9)
            )));
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
    }
    let table = FrozenTable::concat(batches, frozen.len())?;
    table.store(&file);
    Ok(Some(table))
}

/// Loads the starting weights into every branch.
fn load_start(
    start: &Start,
    arch: Arch,
    branches: usize,
    vars: &VarMap,
) -> Result<(), DmslTrainError> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|source| DmslTrainError::Io {
            path: p.clone(),
            source,
        })
    };
    match start {
        Start::Random => {}
        Start::Imagenet(p) => {
            let bytes = read(p)?;
            for b in 0..branches {
                let opts = LoadOptions {
                    ignore_prefixes: vec!["_fc.".into(), "fc.".into()],
                    model_prefix: format!("branches.{b}.backbone."),
                    ..Default::default()
                };
                load_into(&bytes, vars, &opts)?;
            }
        }
        Start::Checkpoint(p) => {
            let bytes = read(p)?;
            let meta = read_meta(&bytes)?;
            if meta.arch != arch || meta.task != TASK {
                return Err(DmslTrainError::Config(format!(
                    "{} holds a {} {} model, not a {} DMSL model",
                    p.display(),
                    meta.arch.name(),
                    meta.task,
                    arch.name()
                )));
            }
            load_into(&bytes, vars, &LoadOptions::default())?;
        }
    }
    Ok(())
}

fn checkpoint_meta(
    cfg: &DmslTrainConfig,
    norm: Normalization,
    manifest: &Path,
    dataset: &PairDataset,
    layout: &DmslLayout,
    epoch: usize,
    log: &DmslEpochLog,
) -> CheckpointMeta {
    let mut metrics = BTreeMap::new();
    for (k, v) in [
        ("train_loss", Some(log.train_loss)),
        ("val_loss", log.val_loss),
        ("val_accuracy", log.val_accuracy),
        ("val_f1", log.val_f1),
        ("val_auc", log.val_auc),
    ] {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            metrics.insert(k.to_string(), v);
        }
    }
    let side = layout.input_sizes()[0] as usize;
    CheckpointMeta {
        format_version: FORMAT_VERSION,
        arch: cfg.arch,
        task: TASK.into(),
        input_size: [side, side],
        normalization: norm,
        classes: dataset.classes.clone(),
        magnification_range: None,
        constants: layout.to_constants(),
        provenance: Provenance {
            data: manifest.display().to_string(),
            epochs: epoch,
            metrics,
            software: format!("histolens {}", env!("CARGO_PKG_VERSION")),
            notes: format!(
                "mode {:?}, start {:?}, frozen {:?}, α {} β {}",
                cfg.mode, cfg.start, cfg.freeze, cfg.alpha, cfg.beta
            ),
        },
    }
}

struct Ctx<'a> {
    data: &'a Data,
    layout: &'a DmslLayout,
    cfg: &'a DmslTrainConfig,
    device: &'a Device,
    norm: Normalization,
    model: &'a Dmsl,
    frozen: &'a [Box<dyn Backbone>],
    /// The frozen part's output of every record, when cached.
    table: Option<&'a FrozenTable>,
}

impl Ctx<'_> {
    /// The model's forward pass, or the trained part on the frozen backbones' output.
    fn forward(&self, inputs: &[Tensor], train: bool) -> candle_core::Result<DmslOutput> {
        if self.frozen.is_empty() {
            return self.model.forward(inputs, train);
        }
        let body = self.cfg.freeze == Freeze::AllButLastBlock;
        let frozen = self
            .frozen
            .iter()
            .zip(inputs)
            .map(|(b, x)| FrozenOutput::compute(b.as_ref(), x, body))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.trained_part(frozen, train)
    }

    /// The last blocks (when they train) and the classifiers, on the frozen part's output.
    fn trained_part(
        &self,
        frozen: Vec<FrozenOutput>,
        train: bool,
    ) -> candle_core::Result<DmslOutput> {
        let mut logits = Vec::with_capacity(frozen.len());
        let mut features = Vec::with_capacity(frozen.len());
        for (f, branch) in frozen.into_iter().zip(&self.model.branches) {
            // Training reads no first-convolution activation: the frozen output stands in for it.
            let f = match f {
                FrozenOutput::Body(body) => {
                    let high = branch.backbone.forward_last_block(&body, train)?;
                    let pooled = global_avg_pool(&high)?;
                    Features::new(body, high, pooled)
                }
                FrozenOutput::Pooled { pooled, sim_map } => {
                    Features::new(sim_map.clone(), sim_map, pooled)
                }
            };
            logits.push(branch.classifier.forward(&f.pooled)?);
            features.push(f);
        }
        Ok(DmslOutput { logits, features })
    }

    /// The forward pass and loss of a batch.
    fn batch(
        &self,
        images: &[Vec<RgbImage>],
        idx: &[usize],
        train: bool,
    ) -> Result<(DmslOutput, DmslLoss), DmslTrainError> {
        let inputs: Vec<Tensor> = images
            .iter()
            .map(|b| to_tensor(b, self.norm, self.device))
            .collect::<candle_core::Result<_>>()?;
        let out = self.forward(&inputs, train)?;
        self.with_loss(out, idx)
    }

    /// The forward pass and loss of a batch from the cached frozen outputs.
    fn batch_cached(
        &self,
        idx: &[usize],
        train: bool,
    ) -> Result<(DmslOutput, DmslLoss), DmslTrainError> {
        let table = self.table.ok_or_else(|| {
            DmslTrainError::Config("no cached frozen outputs to train from".into())
        })?;
        let out = self.trained_part(table.select(idx, self.device)?, train)?;
        self.with_loss(out, idx)
    }

    fn with_loss(
        &self,
        out: DmslOutput,
        idx: &[usize],
    ) -> Result<(DmslOutput, DmslLoss), DmslTrainError> {
        let y: Vec<u32> = idx.iter().map(|&i| self.data.labels[i] as u32).collect();
        let y = Tensor::from_vec(y, idx.len(), self.device)?;
        let l = loss(
            &out,
            &self.model.weights,
            &y,
            self.cfg.alpha,
            self.cfg.effective_beta(),
        )?;
        Ok((out, l))
    }

    /// Mean loss, metrics and each record's class probabilities over records (no augmentation,
    /// evaluation mode).
    fn evaluate(&self, set: &[usize]) -> Result<Scored, DmslTrainError> {
        let mut loss_sum = 0.0;
        let mut probs = Vec::with_capacity(set.len());
        for chunk in set.chunks(self.cfg.batch) {
            let (out, l) = if self.table.is_some() {
                self.batch_cached(chunk, false)?
            } else {
                let images = load_inputs(self.data, self.layout, chunk, None)?;
                self.batch(&images, chunk, false)?
            };
            let v = f64::from(l.total.detach().to_dtype(DType::F32)?.to_scalar::<f32>()?);
            loss_sum += v * chunk.len() as f64;
            let p: Vec<Vec<f32>> = out
                .fused_probs(&self.model.weights)?
                .detach()
                .to_dtype(DType::F32)?
                .to_vec2()?;
            probs.extend(p);
        }
        let labels: Vec<usize> = set.iter().map(|&i| self.data.labels[i]).collect();
        Ok(Scored {
            loss: loss_sum / set.len().max(1) as f64,
            metrics: ClassificationMetrics::compute(
                &probs,
                &labels,
                self.data.dataset.classes.len(),
            ),
            probs,
        })
    }
}

/// A set of records scored by [`Ctx::evaluate`].
struct Scored {
    loss: f64,
    metrics: ClassificationMetrics,
    probs: Vec<Vec<f32>>,
}

/// `val-predictions.csv` of a run: each validation pair's source image, class and probabilities, for
/// image-level and pooled cross-validation metrics (written atomically).
fn write_predictions(
    path: &Path,
    data: &Data,
    set: &[usize],
    probs: &[Vec<f32>],
) -> Result<(), DmslTrainError> {
    let io = |e: std::io::Error| DmslTrainError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let mut w = csv::Writer::from_writer(Vec::new());
    let header = ["pair", "source", "class"]
        .map(String::from)
        .into_iter()
        .chain(data.dataset.classes.iter().map(|c| format!("p_{c}")));
    w.write_record(header).map_err(|e| io(e.into()))?;
    for (&i, p) in set.iter().zip(probs) {
        let r = &data.manifest.records[i];
        let row = [r.high.clone(), r.source.clone(), r.class.clone()]
            .into_iter()
            .chain(p.iter().map(|v| format!("{v:.6}")));
        w.write_record(row).map_err(|e| io(e.into()))?;
    }
    let bytes = w.into_inner().map_err(|e| io(e.into_error()))?;
    write_atomic(path, &bytes).map_err(io)
}

/// What `evaluate` reports.
#[derive(Debug, Clone, Serialize)]
pub struct DmslReport {
    pub model: String,
    pub split: String,
    pub classes: Vec<String>,
    pub metrics: ClassificationMetrics,
    pub pairs_per_second: f64,
}

/// Evaluates a trained model on one split of a pairs manifest.
pub fn evaluate(
    model_path: &Path,
    manifest_path: &Path,
    split: Split,
    device: &Device,
    batch: usize,
) -> Result<DmslReport, DmslTrainError> {
    let model = DmslModel::load(model_path, device)?;
    let data = load_data(manifest_path, None, 0)?;
    if model.classes() != data.dataset.classes.as_slice() {
        return Err(DmslTrainError::Config(format!(
            "the model's classes {:?} differ from the dataset's {:?}",
            model.classes(),
            data.dataset.classes
        )));
    }
    if model.geometry() != data.dataset.geometry {
        return Err(DmslTrainError::Config(format!(
            "the model was trained on {:?} pairs, the dataset holds {:?}",
            model.geometry(),
            data.dataset.geometry
        )));
    }
    let set: Vec<usize> = (0..data.manifest.records.len())
        .filter(|&i| data.manifest.records[i].split == split)
        .collect();
    if set.is_empty() {
        return Err(DmslTrainError::Config(format!(
            "the {} split of {} is empty",
            split.name(),
            manifest_path.display()
        )));
    }
    let started = Instant::now();
    let mut probs = Vec::with_capacity(set.len());
    for chunk in set.chunks(batch.max(1)) {
        let images = load_inputs(&data, &model.layout, chunk, None)?;
        let inputs: Vec<Tensor> = images
            .iter()
            .map(|b| to_tensor(b, model.meta.normalization, device))
            .collect::<candle_core::Result<_>>()?;
        probs.extend(model.predict_inputs(&inputs)?);
    }
    let labels: Vec<usize> = set.iter().map(|&i| data.labels[i]).collect();
    Ok(DmslReport {
        model: model_path.display().to_string(),
        split: split.name().into(),
        classes: data.dataset.classes.clone(),
        metrics: ClassificationMetrics::compute(&probs, &labels, data.dataset.classes.len()),
        pairs_per_second: set.len() as f64 / started.elapsed().as_secs_f64().max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Folds are disjoint by image, cover every image outside the test split once, and hold about
    /// 1/k of each class.
    #[test]
    fn cross_validation_folds_are_disjoint_by_image_and_stratified() {
        let mut records = Vec::new();
        for (class, images) in [("normal", 10), ("benign", 10), ("invasive", 7)] {
            for i in 0..images {
                for field in 0..3 {
                    records.push(PairRecord {
                        high: format!("{class}-{i}-{field}-high.png"),
                        low: format!("{class}-{i}-{field}-low.png"),
                        class: class.into(),
                        source: format!("{class}/{i}.jpg"),
                        region: String::new(),
                        split: if class == "normal" && i == 0 {
                            Split::Test
                        } else {
                            Split::Train
                        },
                    });
                }
            }
        }
        let manifest = Manifest {
            root: PathBuf::new(),
            records,
        };
        let folds = cross_validation_folds(&manifest, 5, 3);
        let mut fold_of_source: HashMap<&str, Option<usize>> = HashMap::new();
        for (r, f) in manifest.records.iter().zip(&folds) {
            assert_eq!(f.is_none(), r.split == Split::Test);
            let seen = fold_of_source.entry(r.source.as_str()).or_insert(*f);
            assert_eq!(seen, f, "{} is in two folds", r.source);
        }
        for class in ["normal", "benign", "invasive"] {
            let mut per_fold = [0usize; 5];
            for (source, f) in &fold_of_source {
                if let (true, Some(f)) = (source.starts_with(class), f) {
                    per_fold[*f] += 1;
                }
            }
            let (lo, hi) = (per_fold.iter().min(), per_fold.iter().max());
            assert!(
                hi.zip(lo).is_some_and(|(h, l)| h - l <= 1),
                "{class}: {per_fold:?}"
            );
        }
        // Another seed deals another order; the same seed the same.
        assert_eq!(folds, cross_validation_folds(&manifest, 5, 3));
        assert_ne!(folds, cross_validation_folds(&manifest, 5, 4));
    }

    /// Training from cached frozen outputs computes the same loss and the same gradients as
    /// recomputing the frozen part, with the last block trained and with the whole backbone frozen;
    /// a second run reads the cache.
    #[test]
    fn cached_frozen_outputs_train_like_recomputed_ones() {
        use crate::data::pairs::{FolderSource, PairConfig, PairGeometry, build as build_pairs};
        let dir = tempfile::tempdir().unwrap();
        for (class, shade) in [("stroma", 60u8), ("tumour", 150)] {
            for i in 0..2u32 {
                let img = RgbImage::from_fn(256, 128, |x, y| {
                    let v = ((x * 7 + y * 13 + i * 31) % 97) as u8;
                    image::Rgb([shade + v / 2, 60 + v, 140 + v / 3])
                });
                let path = dir.path().join("in").join(class).join(format!("{i}.png"));
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                img.save(&path).unwrap();
            }
        }
        let pairs = PairConfig {
            geometry: PairGeometry {
                high_magnification: 20.0,
                low_magnification: 10.0,
                field_um: 32.0,
            },
            fractions: [1.0, 0.0, 0.0],
            ..Default::default()
        };
        let folder = FolderSource {
            path: dir.path().join("in"),
            magnification: 20.0,
            pixel_aspect: 1.0,
        };
        let out = dir.path().join("pairs");
        build_pairs(&[], &[folder], &[], &out, &pairs, |_| {}).unwrap();
        let data = load_data(&out.join("pairs.csv"), None, 0).unwrap();
        let idx: Vec<usize> = (0..data.manifest.records.len()).collect();
        assert_eq!(idx.len(), 32);
        let device = Device::Cpu;
        for freeze in [Freeze::AllButLastBlock, Freeze::Backbone] {
            let mut cfg = DmslTrainConfig::new(Arch::EFFICIENTNET_LITE0);
            cfg.freeze = freeze;
            cfg.cache_frozen = true;
            cfg.batch = 6;
            let layout = cfg.layout(&data.dataset);
            let vars = VarMap::new();
            let vb = VarBuilder::from_varmap(&vars, DType::F32, &device);
            let model = Dmsl::new(cfg.arch, 2, &layout.weights, vb).unwrap();
            vars::reseed(&vars, 5).unwrap();
            let frozen: Vec<Box<dyn Backbone>> = (0..2)
                .map(|b| {
                    let prefix = format!("branches.{b}.backbone.");
                    build(cfg.arch, vars::detached(&vars, &prefix, &device).unwrap()).unwrap()
                })
                .collect();
            let norm = cfg.arch.imagenet_normalization();
            let stop = AtomicBool::new(false);
            let run = || FrozenRun {
                weights: 1,
                cache: dir.path(),
                device: &device,
                stop: &stop,
            };
            let mut infos = Vec::new();
            let mut log = |e: DmslTrainEvent| {
                if let DmslTrainEvent::Info(s) = e {
                    infos.push(s)
                }
            };
            let fresh = frozen_table(&data, &layout, &cfg, &frozen, norm, run(), &mut log)
                .unwrap()
                .unwrap();
            let again = frozen_table(&data, &layout, &cfg, &frozen, norm, run(), &mut log)
                .unwrap()
                .unwrap();
            assert!(
                infos.last().is_some_and(|s| s.contains("read from")),
                "{infos:?}"
            );
            assert_eq!((fresh.rows(), again.rows()), (32, 32));
            let mut ctx = Ctx {
                data: &data,
                layout: &layout,
                cfg: &cfg,
                device: &device,
                norm,
                model: &model,
                frozen: &frozen,
                table: None,
            };
            let images = load_inputs(&data, &layout, &idx, None).unwrap();
            let (_, recomputed) = ctx.batch(&images, &idx, true).unwrap();
            ctx.table = Some(&again);
            let (_, cached) = ctx.batch_cached(&idx, true).unwrap();
            let scalar = |t: &Tensor| t.to_scalar::<f32>().unwrap();
            let (a, b) = (scalar(&recomputed.total), scalar(&cached.total));
            assert!(
                (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                "{freeze:?}: {a} vs {b}"
            );
            assert!(recomputed.sim > 0.0 && (recomputed.sim - cached.sim).abs() < 1e-4);
            let (ga, gb) = (
                recomputed.total.backward().unwrap(),
                cached.total.backward().unwrap(),
            );
            let trained = vars::selected(&vars, |n| {
                n.contains(".fc.")
                    || (freeze == Freeze::AllButLastBlock && n.contains("_conv_head"))
            })
            .unwrap();
            assert!(trained.len() >= 4, "{}", trained.len());
            for v in &trained {
                let (x, y) = (ga.get(v).unwrap(), gb.get(v).unwrap());
                let diff = (x - y).unwrap().abs().unwrap().max_all().unwrap();
                let size = x.abs().unwrap().max_all().unwrap();
                assert!(
                    scalar(&diff) <= 1e-3 * scalar(&size).max(1e-6),
                    "{freeze:?}: {} vs {}",
                    scalar(&diff),
                    scalar(&size)
                );
            }
        }
    }
}
