//! `histolens dataset magnification`, `train magnification`, `eval magnification` and `predict`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{Context as _, bail};
use clap::Args;
use histolens::data::Split;
use histolens::data::augment::AugmentConfig;
use histolens::data::magnification::{BuildConfig, Scales, Source, build};
use histolens::magnification::MagnificationModel;
use histolens::magnification::estimate::check_file;
use histolens::magnification::train::{Start, TrainConfig, TrainEvent, train};
use histolens::nn::Arch;
use histolens::nn::device::{DeviceChoice, select};
use histolens::nn::hagnifinder::Target;
use histolens::slide::Slide;
use indicatif::{ProgressBar, ProgressStyle};

/// A line above the progress bar, or on standard error when there is no terminal to draw it on.
pub fn say(pb: &ProgressBar, line: String) {
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

pub fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let style = ProgressStyle::with_template(&format!(
        "{what} [{{bar:30}}] {{pos}}/{{len}} {{msg}} (ETA {{eta}})"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb
}

/// Files under `paths` (folders recursively, sorted), keeping only what histolens can open.
pub fn expand_inputs(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    const EXT: &[&str] = &[
        "svs", "ndpi", "mrxs", "scn", "tif", "tiff", "vms", "vmu", "bif", "svslide", "png", "jpg",
        "jpeg", "bmp", "webp",
    ];
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut stack = vec![p.clone()];
            while let Some(d) = stack.pop() {
                let mut entries: Vec<PathBuf> = std::fs::read_dir(&d)
                    .with_context(|| format!("reading the folder {}", d.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .collect();
                entries.sort();
                for e in entries {
                    if e.is_dir() {
                        stack.push(e);
                    } else if e
                        .extension()
                        .and_then(|x| x.to_str())
                        .is_some_and(|x| EXT.contains(&x.to_ascii_lowercase().as_str()))
                    {
                        out.push(e);
                    }
                }
            }
        } else if p.exists() {
            out.push(p.clone());
        } else {
            bail!("no such file or folder: {}", p.display());
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[derive(Args)]
pub struct DatasetArgs {
    /// Slides, images or folders of them, each with a known µm/px.
    #[arg(required = true)]
    pub sources: Vec<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    /// µm/px of every source (overrides the metadata).
    #[arg(long)]
    pub mpp: Option<f64>,
    /// A TSV whose first column is a file path (matched on its end) and which has a column
    /// `um_per_px_or_magnification` or `mpp` starting with the µm/px (as ../shared/data's SOURCES.tsv).
    #[arg(long)]
    pub mpp_table: Option<PathBuf>,
    /// Target magnifications (e.g. 1-40, or 2,5,10,20).
    #[arg(long, default_value = "1-40")]
    pub magnifications: String,
    /// Patches per source block and magnification.
    #[arg(long, default_value_t = 6)]
    pub per_magnification: usize,
    /// Continuous pixel sizes instead of --magnifications: this many patches per source group and
    /// octave, from the source's own µm/px (divided by --max-upsample) to as coarse as a patch fits.
    #[arg(long)]
    pub per_octave: Option<usize>,
    /// The most a patch is enlarged (1.25: no fake high magnification).
    #[arg(long, default_value_t = 1.25)]
    pub max_upsample: f64,
    /// The coarsest µm/px drawn (10 = 1x).
    #[arg(long, default_value_t = 10.0)]
    pub coarsest_mpp: f64,
    /// Degrade patches as snapshots from other labs are: resampling filters, screenshot rescaling,
    /// defocus, stain and white balance, gamma, vignetting, noise, JPEG, borders, scale bars.
    #[arg(long)]
    pub degrade: bool,
    /// The source group of every input (leave-one-source-out leaves a group out); default: the
    /// table's `dataset` column, else each input argument's name.
    #[arg(long)]
    pub group: Option<String>,
    /// Stored width / true width of the pixels (BACH's squashed copies: 0.75).
    #[arg(long, default_value_t = 1.0)]
    pub pixel_aspect: f64,
    /// The inputs' scale is unknown: cut pairs of one field at two relative scales (for the
    /// scale-equivariance loss) instead of patches with a µm/px.
    #[arg(long)]
    pub unlabelled: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Put every source, whole, in this split (train, val or test), e.g. an external test set.
    #[arg(long)]
    pub split: Option<String>,
    /// Add to the manifest already in --out (a source may not land in two splits).
    #[arg(long)]
    pub append: bool,
}

fn parse_magnifications(s: &str) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (u32, u32) = (a.trim().parse()?, b.trim().parse()?);
            out.extend((a..=b).map(f64::from));
        } else {
            out.push(part.parse()?);
        }
    }
    if out.iter().any(|m| !(m.is_finite() && *m > 0.0)) || out.is_empty() {
        bail!("magnifications must be positive numbers: {s}");
    }
    Ok(out)
}

/// Rows of an µm/px table: (file name, µm/px, dataset when the table has that column).
fn mpp_table(path: &Path) -> anyhow::Result<Vec<(String, f64, Option<String>)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split('\t').collect();
    let col = header
        .iter()
        .position(|h| *h == "um_per_px_or_magnification" || *h == "mpp")
        .with_context(|| format!("{}: no mpp column", path.display()))?;
    let dataset = header.iter().position(|h| *h == "dataset");
    Ok(lines
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('\t').collect();
            Some((
                cells.first()?.to_string(),
                parse_mpp_cell(cells.get(col)?)?,
                dataset.and_then(|d| cells.get(d)).map(|s| s.to_string()),
            ))
        })
        .collect())
}

/// "0.2480 um/px (40x)", "40x (0.25 um/px)", "~0.933 um/px" or "0.5" → the µm/px.
fn parse_mpp_cell(cell: &str) -> Option<f64> {
    let tokens: Vec<&str> = cell
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter(|t| !t.is_empty())
        .collect();
    let at = tokens
        .iter()
        .position(|t| t.starts_with("um/px") || t.starts_with("µm/px"));
    let number = match at {
        Some(i) if i > 0 => tokens[i - 1],
        Some(_) => return None,
        None => tokens.first()?,
    };
    // "~0.933" or "≈0.933": an approximate value is still the value.
    number
        .trim_start_matches(['~', '≈'])
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v > 0.0)
}

pub fn dataset(args: DatasetArgs) -> anyhow::Result<()> {
    let table = match &args.mpp_table {
        Some(p) => mpp_table(p)?,
        None => Vec::new(),
    };
    let mut sources = Vec::new();
    for arg in &args.sources {
        let arg_group = arg
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "source".into());
        for f in expand_inputs(std::slice::from_ref(arg))? {
            let row = table
                .iter()
                .find(|(name, _, _)| f.to_string_lossy().ends_with(name.as_str()));
            let mpp = if args.unlabelled {
                1.0
            } else {
                match args.mpp.or(row.map(|r| r.1)) {
                    Some(m) => m,
                    None => {
                        let slide = Slide::open(&f)?;
                        slide.info().mpp.map(|m| m.mean()).with_context(|| {
                            format!(
                                "{}: the µm/px is not in the metadata; give it with --mpp or \
                                 --mpp-table (or build pairs with --unlabelled)",
                                f.display()
                            )
                        })?
                    }
                }
            };
            let group = args
                .group
                .clone()
                .or_else(|| row.and_then(|r| r.2.clone()))
                .unwrap_or_else(|| arg_group.clone());
            sources.push(Source {
                path: f,
                mpp,
                squash_x: args.pixel_aspect,
                group,
                absolute: !args.unlabelled,
            });
        }
    }
    if !(args.pixel_aspect > 0.0 && args.pixel_aspect.is_finite()) {
        bail!("--pixel-aspect must be a positive number");
    }
    let cfg = BuildConfig {
        scales: match args.per_octave {
            Some(per_octave) => Scales::Continuous {
                per_octave,
                max_upsample: args.max_upsample,
                coarsest_mpp: args.coarsest_mpp,
            },
            None => Scales::Magnifications(parse_magnifications(&args.magnifications)?),
        },
        per_magnification: args.per_magnification,
        degrade: args.degrade,
        seed: args.seed,
        only: match &args.split {
            Some(s) => Some(Split::parse(s).with_context(|| format!("unknown split {s}"))?),
            None => None,
        },
        append: args.append,
        ..Default::default()
    };
    let pb = bar(1000, "cutting patches (per mille)");
    let (manifest, reports) = build(&sources, &args.out, &cfg, |done| {
        pb.set_position((done * 1000.0).round() as u64)
    })?;
    pb.finish_and_clear();
    for r in &reports {
        println!(
            "{}: native {:.1}x, {} block(s), {} patches, {} rejected as background",
            r.path.display(),
            r.native_magnification,
            r.blocks,
            r.patches,
            r.rejected_background
        );
        if r.too_large_to_read > 0 {
            println!(
                "  {} coarse field(s) skipped: without a pyramid level near their scale each would \
                 be read from more than {} Mpx (make a pyramid, e.g. `vips tiffsave --tile \
                 --pyramid`, to have them)",
                r.too_large_to_read,
                cfg.max_field_pixels / 1_000_000
            );
        }
    }
    for s in Split::ALL {
        let n = manifest.split(s).len();
        let range = manifest
            .magnification_range(s)
            .map_or("-".to_string(), |(a, b)| format!("{a}x-{b}x"));
        println!("{:>5}: {n} patches, {range}", s.name());
    }
    println!("manifest: {}", args.out.join("manifest.csv").display());
    Ok(())
}

#[derive(Args)]
pub struct TrainArgs {
    /// The dataset manifest (from `histolens dataset magnification`).
    #[arg(long)]
    pub data: PathBuf,
    /// The run folder (created; an existing run there is resumed).
    #[arg(long)]
    pub run: PathBuf,
    #[command(flatten)]
    pub options: TrainOptions,
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

/// How a magnification model trains (`train magnification`, and each fold of `eval --loso`).
#[derive(Args)]
pub struct TrainOptions {
    #[arg(long, default_value = "resnet50")]
    pub arch: String,
    /// random, imagenet:FILE or checkpoint:FILE.
    #[arg(long, default_value = "random")]
    pub start: String,
    /// Train the head only, on the backbone's features.
    #[arg(long)]
    pub freeze_backbone: bool,
    #[arg(long, default_value_t = 20)]
    pub epochs_asm: usize,
    #[arg(long, default_value_t = 10)]
    pub epochs_constant: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 224)]
    pub size: usize,
    /// linear (the paper) or log2.
    #[arg(long, default_value = "linear")]
    pub target: String,
    #[arg(long)]
    pub steps_per_epoch: Option<usize>,
    /// No colour, blur or JPEG augmentation (flips and rotations stay).
    #[arg(long)]
    pub light_augment: bool,
    /// Weight of the scale-equivariance loss over pairs built with `dataset magnification
    /// --unlabelled` (frozen backbone and log2 target).
    #[arg(long, default_value_t = 1.0)]
    pub equivariance: f64,
    /// Crops per image whose cached features train a frozen backbone's head.
    #[arg(long, default_value_t = 4)]
    pub crops: usize,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// The head reads every stage's pooled output, not only the last convolution's (with
    /// --freeze-backbone).
    #[arg(long)]
    pub multiscale: bool,
    /// With --freeze-backbone --multiscale: fine-tune the backbone's last N stages and its last
    /// convolution all the same, on cached outputs of the frozen stages before them.
    #[arg(long, default_value_t = 0)]
    pub tune_stages: usize,
    /// The tuned stages' learning rate as a fraction of --lr.
    #[arg(long, default_value_t = 0.1)]
    pub tune_lr_scale: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `random`, `imagenet:FILE` or `checkpoint:FILE`.
pub fn parse_start(s: &str) -> anyhow::Result<Start> {
    Ok(match s.split_once(':') {
        None if s == "random" => Start::Random,
        Some(("imagenet", p)) => Start::Imagenet(p.into()),
        Some(("checkpoint", p)) => Start::Checkpoint(p.into()),
        _ => bail!("--start must be random, imagenet:FILE or checkpoint:FILE"),
    })
}

/// The training configuration the options describe.
pub fn train_config(args: &TrainOptions) -> anyhow::Result<TrainConfig> {
    let arch =
        Arch::parse(&args.arch).with_context(|| format!("unknown architecture {}", args.arch))?;
    let mut cfg = TrainConfig::new(arch);
    cfg.start = parse_start(&args.start)?;
    cfg.freeze_backbone = args.freeze_backbone;
    cfg.epochs_asm = args.epochs_asm;
    cfg.epochs_constant = args.epochs_constant;
    cfg.batch = args.batch;
    cfg.lr = args.lr;
    cfg.input_size = args.size;
    cfg.steps_per_epoch = args.steps_per_epoch;
    cfg.equivariance = args.equivariance;
    cfg.crops = args.crops;
    cfg.multiscale = args.multiscale;
    cfg.tune_stages = args.tune_stages;
    cfg.tune_lr_scale = args.tune_lr_scale;
    cfg.weight_decay = args.weight_decay;
    cfg.seed = args.seed;
    cfg.target = match args.target.as_str() {
        "linear" => Target::Linear,
        "log2" => Target::Log2,
        t => bail!("unknown target {t}: use linear or log2"),
    };
    if args.light_augment {
        cfg.augment = AugmentConfig {
            flips: true,
            max_rotation_deg: 90.0,
            ..AugmentConfig::none()
        };
    }
    Ok(cfg)
}

pub fn train_cmd(args: TrainArgs) -> anyhow::Result<()> {
    let cfg = train_config(&args.options)?;
    let device = select(args.device)?;
    histolens::runs::write_info(
        &args.run,
        &histolens::runs::RunConfig::Magnification(cfg.clone()),
        &args.data,
    )?;
    let stop = AtomicBool::new(false);
    let pb = bar(cfg.total_epochs() as u64, "epochs");
    let outcome = train(&args.data, &cfg, &args.run, &device, &stop, |e| match e {
        TrainEvent::Step {
            epoch,
            step,
            steps,
            loss,
            images_per_second,
        } => pb.set_message(format!(
            "epoch {epoch} step {step}/{steps} loss {loss:.4} ({images_per_second:.1} img/s)"
        )),
        TrainEvent::Epoch(log) => {
            pb.set_position(log.epoch as u64);
            say(
                &pb,
                format!(
                    "epoch {:>3} (round {}): train {:.4}  val {}  MAE {}  ACC1 {}  lr {:.1e}  {:.1} img/s",
                    log.epoch,
                    log.round,
                    log.train_loss,
                    log.val_loss.map_or("-".into(), |v| format!("{v:.4}")),
                    log.val_mae.map_or("-".into(), |v| format!("{v:.2}x")),
                    log.val_acc1
                        .map_or("-".into(), |v| format!("{:.1}%", 100.0 * v)),
                    log.lr,
                    log.images_per_second
                ),
            );
        }
        TrainEvent::Info(s) => say(&pb, s),
    })?;
    pb.finish_and_clear();
    println!(
        "{} epochs; m = {}; model: {}",
        outcome.epochs_done,
        outcome.m.map_or("-".into(), |m| format!("{m:.6e}")),
        outcome.best.as_ref().unwrap_or(&outcome.last).display()
    );
    Ok(())
}

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long)]
    pub data: PathBuf,
    /// A magnification model (default: the bundled one).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// train, val or test.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Write the metrics as JSON here ("-" for standard output).
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Leave-one-source-out: for each source group, train without it (with the options below) and
    /// score it; groups whose patches are all in the test split are scored by the model trained on
    /// every other group. Needs --work; writes --json and --csv.
    #[arg(long, requires = "work", conflicts_with = "by_source")]
    pub loso: bool,
    /// Score --model (default: the bundled one) on every source group, in the --loso table: a
    /// baseline, or the shipped model on sources it never saw (listed with --held-out).
    #[arg(long)]
    pub by_source: bool,
    /// With --by-source: the groups the model never saw (comma-separated), marked in the table.
    #[arg(long, value_delimiter = ',')]
    pub held_out: Vec<String>,
    /// The folder of the folds' runs (a rerun resumes them).
    #[arg(long)]
    pub work: Option<PathBuf>,
    /// With --loso or --by-source: the table as CSV here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// With --loso or --by-source: crops scored per image.
    #[arg(long, default_value_t = 16)]
    pub estimate_crops: usize,
    /// With --loso: each fold starts from the last checkpoint of the same fold in this folder (the
    /// --work of an earlier run), e.g. to fine-tune the backbone of frozen-backbone folds.
    #[arg(long, requires = "loso")]
    pub start_folds: Option<PathBuf>,
    #[command(flatten)]
    pub train: TrainOptions,
}

/// The µm/px to work at for `slide`: `given` (a command's --mpp), else the hand calibration, else
/// the pixel size its metadata states, else the bundled model's estimate with a warning on
/// standard error (never silently: the output says the scale is estimated).
pub fn mpp_or_estimate(slide: &Slide, given: Option<f64>) -> anyhow::Result<f64> {
    use histolens::slide::CalibrationStore;
    match given {
        Some(m) if m.is_finite() && m > 0.0 => return Ok(m),
        Some(m) => bail!("--mpp {m} is not a positive number"),
        None => {}
    }
    let path = slide.path();
    let calibration = CalibrationStore::saved_for(path);
    if let Some(m) = slide.info().effective_mpp(&calibration) {
        return Ok(m.mean());
    }
    let model = load_model(None, DeviceChoice::Auto).with_context(|| {
        format!(
            "{}: its µm/px is unknown and cannot be estimated; give it with --mpp",
            path.display()
        )
    })?;
    let e = check_file(&model, slide, 16)?.estimate;
    if !(e.mpp.is_finite() && e.mpp > 0.0) {
        bail!(
            "{}: its µm/px is unknown and the estimate failed; give it with --mpp",
            path.display()
        );
    }
    eprintln!(
        "warning: {}: no µm/px in the metadata; using the ESTIMATED {:.3} µm/px ({:.1}x; \
         network {:.3}, nuclei {}); give --mpp or calibrate the file to override",
        path.display(),
        e.mpp,
        e.magnification,
        e.network_mpp,
        e.ruler
            .as_ref()
            .map_or("-".to_string(), |r| format!("{:.3}", r.mpp)),
    );
    Ok(e.mpp)
}

pub fn load_model(path: Option<&Path>, device: DeviceChoice) -> anyhow::Result<MagnificationModel> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => histolens::default_magnification_model()
            .context("no bundled magnification model was found; pass one with --model")?,
    };
    let device = select(device)?;
    MagnificationModel::load(&path, &device)
        .with_context(|| format!("loading the model {}", path.display()))
}

/// Writes `text` to `out` atomically, or to standard output for "-".
fn write_out(out: &Path, text: &str) -> anyhow::Result<()> {
    if out.as_os_str() == "-" {
        println!("{text}");
        return Ok(());
    }
    histolens::util::fs::write_atomic(out, text.as_bytes())
        .with_context(|| format!("writing {}", out.display()))
}

fn write_report(
    args: &EvalArgs,
    report: &histolens::magnification::loso::LosoReport,
) -> anyhow::Result<()> {
    print!("{}", report.table());
    if let Some(out) = &args.json {
        write_out(out, &serde_json::to_string_pretty(report)?)?;
    }
    if let Some(out) = &args.csv {
        write_out(out, &report.csv())?;
    }
    Ok(())
}

fn scored_line(s: &histolens::magnification::loso::SourceScore) -> String {
    format!(
        "  {}: n {}, within ±25% {:.1}%, median |log2 error| {:.3}",
        s.source,
        s.n,
        100.0 * s.within_25,
        s.median_abs_log2
    )
}

fn eval_by_source(args: &EvalArgs) -> anyhow::Result<()> {
    let model = load_model(args.model.as_deref(), args.device)?;
    let report = histolens::magnification::loso::score_by_source(
        &args.data,
        &model,
        args.estimate_crops,
        |g| args.held_out.iter().any(|h| h == g),
        |s| eprintln!("{}", scored_line(s)),
    )?;
    write_report(args, &report)
}

fn eval_loso(args: &EvalArgs, work: &Path) -> anyhow::Result<()> {
    use histolens::magnification::loso::{Folds, LosoEvent, loso};
    let cfg = train_config(&args.train)?;
    let device = select(args.device)?;
    let stop = AtomicBool::new(false);
    let pb = bar(0, "fold");
    let report = loso(
        &args.data,
        &cfg,
        Folds {
            work,
            start_from: args.start_folds.as_deref(),
            crops: args.estimate_crops,
        },
        &device,
        &stop,
        |e| match e {
            LosoEvent::Fold {
                fold,
                folds,
                held_out,
            } => {
                pb.set_length(folds as u64);
                pb.set_position(fold as u64 - 1);
                say(
                    &pb,
                    format!("fold {fold}/{folds}: without {}", held_out.join(", ")),
                );
            }
            LosoEvent::Train(TrainEvent::Epoch(log)) => pb.set_message(format!(
                "epoch {} train loss {:.4}",
                log.epoch, log.train_loss
            )),
            LosoEvent::Train(TrainEvent::Info(s)) => say(&pb, format!("  {s}")),
            LosoEvent::Train(TrainEvent::Step { .. }) => {}
            LosoEvent::Scored(s) => say(&pb, scored_line(&s)),
        },
    )?;
    pb.finish_and_clear();
    write_report(args, &report)
}

pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    if let (true, Some(work)) = (args.loso, &args.work) {
        return eval_loso(&args, work);
    }
    if args.by_source {
        return eval_by_source(&args);
    }
    let split =
        Split::parse(&args.split).with_context(|| format!("unknown split {}", args.split))?;
    let model = load_model(args.model.as_deref(), args.device)?;
    let pb = bar(0, "images");
    let metrics =
        histolens::magnification::train::evaluate(&model, &args.data, split, |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        })?;
    pb.finish_and_clear();
    print!("{}", metrics.table());
    if let Some(out) = args.json {
        write_out(&out, &serde_json::to_string_pretty(&metrics)?)?;
    }
    Ok(())
}

#[derive(Args)]
pub struct PredictArgs {
    /// Images, slides or folders (searched recursively).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    #[arg(long)]
    pub csv: bool,
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Crops scored per image or slide.
    #[arg(long, default_value_t = 16)]
    pub crops: usize,
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Only shard K of N of the inputs (0-based; see `histolens merge`).
    #[arg(long, value_name = "K/N")]
    pub shard: Option<super::shard::Shard>,
    /// Write the JSON or CSV rows to this file (atomically) instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One line of `predict`'s output.
#[derive(serde::Serialize)]
struct PredictRow {
    path: String,
    kind: &'static str,
    /// The estimate (the network fused with the nuclei ruler where that reads inside its range).
    magnification: Option<f64>,
    mpp: Option<f64>,
    /// The network's own estimate and the nuclei ruler's reading.
    network_mpp: Option<f64>,
    nuclei_mpp: Option<f64>,
    /// The nuclei ruler only says "at least this coarse".
    nuclei_lower_bound: Option<bool>,
    /// µm/px from lone red blood cells, and how many, where enough were found (not fused).
    red_cells_mpp: Option<f64>,
    red_cells: Option<usize>,
    spread: Option<f64>,
    crops: Option<usize>,
    metadata_mpp: Option<f64>,
    metadata_source: Option<&'static str>,
    /// (estimate − metadata) / metadata; None when the file states no pixel size.
    relative_difference: Option<f64>,
    mismatch: Option<bool>,
    #[serde(skip)]
    comparison: Option<String>,
    /// The readings as text (`Estimate::readings`), for the plain output.
    #[serde(skip)]
    readings: Option<String>,
    out_of_range: Option<bool>,
    warnings: String,
    error: Option<String>,
}

pub fn predict(args: PredictArgs) -> anyhow::Result<()> {
    let model = load_model(args.model.as_deref(), args.device)?;
    if args.out.is_some() && !args.json && !args.csv {
        bail!("--out writes rows: add --json or --csv");
    }
    let mut files = expand_inputs(&args.paths)?;
    if let Some(shard) = args.shard {
        files = shard.take(files);
    }
    let pb = bar(files.len() as u64, "files");
    let mut rows = Vec::with_capacity(files.len());
    for f in &files {
        rows.push(predict_one(&model, f, args.crops));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let structured = if args.json {
        let mut v = serde_json::to_vec_pretty(&rows)?;
        v.push(b'\n');
        Some(v)
    } else if args.csv {
        let mut w = csv::Writer::from_writer(Vec::new());
        for r in &rows {
            w.serialize(r)?;
        }
        Some(w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)
    } else {
        None
    };
    if let Some(bytes) = structured {
        match &args.out {
            Some(out) => histolens::util::fs::write_atomic(out, &bytes)
                .with_context(|| format!("writing {}", out.display()))?,
            None => std::io::Write::write_all(&mut std::io::stdout(), &bytes)?,
        }
    } else {
        for r in &rows {
            match (&r.error, r.magnification) {
                (Some(e), _) => println!("{}: error: {e}", r.path),
                (None, Some(m)) => println!(
                    "{}: {m:.1}x ({:.3} µm/px; {}), spread {:.1}x over {} crops{}{}",
                    r.path,
                    r.mpp.unwrap_or(f64::NAN),
                    r.readings.as_deref().unwrap_or("-"),
                    r.spread.unwrap_or(f64::NAN),
                    r.crops.unwrap_or(0),
                    r.comparison
                        .as_ref()
                        .map_or(String::new(), |c| format!("; metadata {c}")),
                    if r.warnings.is_empty() {
                        String::new()
                    } else {
                        format!(" [{}]", r.warnings)
                    }
                ),
                (None, None) => println!("{}: no estimate", r.path),
            }
        }
    }
    let failed = rows.iter().filter(|r| r.error.is_some()).count();
    if failed > 0 {
        eprintln!("{failed} of {} file(s) could not be read", rows.len());
    }
    Ok(())
}

fn predict_one(model: &MagnificationModel, path: &Path, crops: usize) -> PredictRow {
    let mut row = PredictRow {
        path: path.display().to_string(),
        kind: "image",
        magnification: None,
        mpp: None,
        network_mpp: None,
        nuclei_mpp: None,
        nuclei_lower_bound: None,
        red_cells_mpp: None,
        red_cells: None,
        spread: None,
        crops: None,
        metadata_mpp: None,
        metadata_source: None,
        relative_difference: None,
        mismatch: None,
        comparison: None,
        readings: None,
        out_of_range: None,
        warnings: String::new(),
        error: None,
    };
    let result: anyhow::Result<()> = (|| {
        let slide = Slide::open(path)?;
        // One comparison with the stated pixel size for slides and snapshots.
        if slide.info().is_whole_slide() {
            row.kind = "slide";
        }
        let c = check_file(model, &slide, crops)?;
        row.mismatch = c.relative_difference.map(|_| c.mismatch);
        row.relative_difference = c.relative_difference;
        row.metadata_mpp = c.metadata_mpp;
        row.metadata_source = c.metadata_source.map(|s| s.label());
        row.comparison = c.describe();
        let estimate = c.estimate;
        row.magnification = Some(estimate.magnification);
        row.mpp = Some(estimate.mpp);
        row.network_mpp = Some(estimate.network_mpp);
        row.nuclei_mpp = estimate.ruler.as_ref().map(|r| r.mpp);
        row.nuclei_lower_bound = estimate.ruler.as_ref().map(|r| r.lower_bound);
        row.red_cells_mpp = estimate.red_cells.as_ref().map(|r| r.mpp);
        row.red_cells = estimate.red_cells.as_ref().map(|r| r.cells);
        row.readings = Some(estimate.readings());
        row.spread = Some(estimate.spread);
        row.crops = Some(estimate.crops);
        row.out_of_range = Some(estimate.out_of_range);
        row.warnings = estimate.warnings.join("; ");
        Ok(())
    })();
    if let Err(e) = result {
        row.error = Some(format!("{e:#}"));
    }
    row
}
