//! `histolens dataset dmsl`, `train dmsl`, `eval dmsl` and `heatmap`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{Context as _, bail};
use clap::Args;
use histolens::data::Split;
use histolens::data::mosaic::{MosaicCell, build_mosaic};
use histolens::data::pairs::{
    FolderSource, PairConfig, PairGeometry, SlideSource, build, read_regions, regions_sidecar,
    write_regions,
};
use histolens::dmsl::DmslModel;
use histolens::dmsl::heatmap::{
    Heatmap, HeatmapOptions, compute, content_id, header_for, mark_background, sidecar_path,
};
use histolens::dmsl::train::{DmslTrainConfig, DmslTrainEvent, Freeze, Mode, evaluate, train};
use histolens::nn::Arch;
use histolens::nn::device::{DeviceChoice, select};
use histolens::slide::Slide;
use histolens::slide::pyramid_tiff::write_pyramidal_tiff;
use histolens::util::colormap::Colormap;
use histolens::util::fs::write_atomic;

use super::magnification::{bar, parse_start, say};

#[derive(Args)]
pub struct DatasetArgs {
    /// Slides with labelled regions, as SLIDE=REGIONS.geojson (polygons in level-0 pixels with a
    /// class: QuPath's GeoJSON export, or histolens's own).
    #[arg(long = "slide")]
    pub slides: Vec<String>,
    /// Folders with one sub-folder of images per class, as FOLDER, FOLDER@MAGNIFICATION (e.g.
    /// @20x) or FOLDER@µm/px (e.g. @0.42um); 20x when not given.
    #[arg(long = "folder")]
    pub folders: Vec<String>,
    /// Width over height of the folders' pixels: 0.75 for images squashed horizontally to 3/4 of
    /// their width (BACH's 1536x1536 copies of 2048x1536 fields), or a CSV table of `file,aspect`
    /// rows by file name (files it does not list have square pixels). Fields are cut wider by this
    /// factor, so that they come out square.
    #[arg(long, default_value = "1")]
    pub pixel_aspect: String,
    #[arg(long)]
    pub out: PathBuf,
    /// The high and the low magnification of a pair.
    #[arg(long, default_value_t = 20.0)]
    pub high: f64,
    #[arg(long, default_value_t = 5.0)]
    pub low: f64,
    /// Side of the field of view in µm (300 µm: 600 px at 20x, 150 px at 5x).
    #[arg(long, default_value_t = 300.0, conflicts_with = "field_px")]
    pub field_um: f64,
    /// Side of the field of view in pixels at the high magnification instead (224: 112 µm at 20x,
    /// so 224 px at 20x, 112 px at 10x and 56 px at 5x; the network's input size).
    #[arg(long)]
    pub field_px: Option<u32>,
    /// Shares of train, validation and test, dealt by image or region ("1,0,0": every image in
    /// training, for cross-validation with `train dmsl --folds`).
    #[arg(long, value_delimiter = ',', default_value = "0.7,0.15,0.15")]
    pub splits: Vec<f64>,
    /// Fields of labelled images with a larger share of background (glass) are not cut (labelled
    /// slide regions are cut whole).
    #[arg(long, default_value_t = 0.5)]
    pub max_background: f64,
    /// Grid step over regions as a share of the field (0.5: fields overlap by half).
    #[arg(long, default_value_t = 1.0)]
    pub stride: f64,
    /// At most this many pairs per region or image (a random subset).
    #[arg(long)]
    pub max_per_region: Option<usize>,
    /// µm/px of the slides (overrides their metadata).
    #[arg(long)]
    pub mpp: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn dataset(args: DatasetArgs) -> anyhow::Result<()> {
    let mut slides = Vec::new();
    for s in &args.slides {
        let (slide, regions) = s
            .split_once('=')
            .with_context(|| format!("--slide takes SLIDE=REGIONS.geojson, got {s}"))?;
        let path = PathBuf::from(slide);
        let mpp = super::magnification::mpp_or_estimate(&Slide::open(&path)?, args.mpp)?;
        slides.push(SlideSource {
            path,
            mpp,
            regions: read_regions(Path::new(regions))?,
        });
    }
    let mut folders = Vec::new();
    for f in &args.folders {
        let (path, magnification) = match f.rsplit_once('@') {
            Some((p, m)) => (
                p,
                parse_scale(m).with_context(|| format!("in --folder {f}"))?,
            ),
            None => (f.as_str(), 20.0),
        };
        folders.push(FolderSource {
            path: path.into(),
            magnification,
            pixel_aspect: 1.0,
        });
    }
    // One aspect for every folder, or each image its own from a table.
    let mut images = Vec::new();
    match PixelAspect::parse(&args.pixel_aspect)? {
        PixelAspect::All(v) => folders.iter_mut().for_each(|f| f.pixel_aspect = v),
        table => {
            for f in std::mem::take(&mut folders) {
                for mut image in f.images()? {
                    image.pixel_aspect = table.of(&image.path);
                    images.push(image);
                }
            }
        }
    }
    if slides.is_empty() && folders.is_empty() && images.is_empty() {
        bail!("give labelled slides (--slide SLIDE=REGIONS.geojson) or folders (--folder DIR)");
    }
    let fractions: [f64; 3] = match args.splits[..] {
        [a, b, c] if [a, b, c].iter().all(|v| v.is_finite() && *v >= 0.0) && a > 0.0 => [a, b, c],
        _ => bail!("--splits takes three shares, train first and above 0, e.g. 0.7,0.15,0.15"),
    };
    let field_um = match args.field_px {
        Some(px) => f64::from(px) * 10.0 / args.high,
        None => args.field_um,
    };
    let cfg = PairConfig {
        geometry: PairGeometry {
            high_magnification: args.high,
            low_magnification: args.low,
            field_um,
        },
        stride: args.stride,
        fractions,
        max_per_group: args.max_per_region,
        max_background: args.max_background,
        seed: args.seed,
    };
    let (manifest, dataset) = build(&slides, &folders, &images, &args.out, &cfg, |s| {
        eprintln!("reading {s}")
    })?;
    let g = dataset.geometry;
    println!(
        "{} pairs of {}x ({} px) + {}x ({} px) over {} µm; classes: {}",
        manifest.records.len(),
        g.high_magnification,
        g.high_px(),
        g.low_magnification,
        g.low_px(),
        g.field_um,
        dataset.classes.join(", ")
    );
    for s in Split::ALL {
        let recs = manifest.split(s);
        let per_class: Vec<String> = dataset
            .classes
            .iter()
            .map(|c| format!("{c} {}", recs.iter().filter(|r| r.class == *c).count()))
            .collect();
        println!(
            "{:>5}: {} pairs ({})",
            s.name(),
            recs.len(),
            per_class.join(", ")
        );
    }
    if !args.folders.is_empty() {
        println!(
            "splits and cross-validation folds are dealt by image: class folders name no patients, \
             so two images of one patient can fall on both sides"
        );
    }
    println!("manifest: {}", args.out.join("pairs.csv").display());
    Ok(())
}

/// `--pixel-aspect`: one aspect for every image, or a table of aspects by file name.
enum PixelAspect {
    All(f64),
    ByName(std::collections::HashMap<String, f64>),
}

impl PixelAspect {
    fn parse(s: &str) -> anyhow::Result<Self> {
        let valid = |v: f64| v.is_finite() && v > 0.0;
        if let Ok(v) = s.trim().parse::<f64>() {
            if !valid(v) {
                bail!("--pixel-aspect must be a positive number, not {s}");
            }
            return Ok(PixelAspect::All(v));
        }
        let text = std::fs::read_to_string(s).with_context(|| {
            format!("--pixel-aspect {s}: neither a number nor a readable table")
        })?;
        let mut table = std::collections::HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let Some((file, v)) = line.split_once(',') else {
                continue;
            };
            match v.trim().parse::<f64>() {
                Ok(v) if valid(v) => {
                    table.insert(file.trim().to_string(), v);
                }
                // A header line.
                _ if n == 0 => {}
                _ => bail!("{s}, line {}: the aspect must be a positive number", n + 1),
            }
        }
        Ok(PixelAspect::ByName(table))
    }

    /// The aspect of one image (by its file name in a table; square when not listed).
    fn of(&self, path: &Path) -> f64 {
        match self {
            PixelAspect::All(v) => *v,
            PixelAspect::ByName(t) => path
                .file_name()
                .and_then(|n| t.get(n.to_string_lossy().as_ref()))
                .copied()
                .unwrap_or(1.0),
        }
    }
}

/// A folder's scale: a magnification ("20", "20x") or a pixel size ("0.42um", "0.42µm").
fn parse_scale(s: &str) -> anyhow::Result<f64> {
    let number = |t: &str| {
        t.trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v > 0.0)
            .with_context(|| format!("bad scale {s}: give a magnification (20x) or µm/px (0.42um)"))
    };
    match s.strip_suffix("um").or_else(|| s.strip_suffix("µm")) {
        Some(mpp) => Ok(10.0 / number(mpp)?),
        None => number(s.trim_end_matches(['x', 'X'])),
    }
}

#[derive(Args)]
pub struct MosaicArgs {
    /// The images, each labelled by the name of its folder (a class folder), in reading order.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// The pyramidal TIFF to write; its regions go beside it (`OUT.regions.geojson`, where the
    /// window shows them too).
    #[arg(long)]
    pub out: PathBuf,
    /// µm/px of the images (their height's, with --pixel-aspect).
    #[arg(long)]
    pub mpp: f64,
    /// Width over height of the images' pixels (0.75: squashed to 3/4 of their width).
    #[arg(long, default_value_t = 1.0)]
    pub pixel_aspect: f64,
    /// Images per row.
    #[arg(long, default_value_t = 3)]
    pub cols: usize,
}

pub fn mosaic(args: MosaicArgs) -> anyhow::Result<()> {
    let cells: Vec<MosaicCell> = args
        .images
        .iter()
        .map(|p| MosaicCell::from_class_folder(p))
        .collect();
    let (image, regions) = build_mosaic(&cells, args.cols, args.pixel_aspect)?;
    write_pyramidal_tiff(&args.out, &image, args.mpp, 256)?;
    let sidecar = regions_sidecar(&args.out);
    write_regions(&sidecar, &regions)?;
    println!(
        "{}: {}x{} px at {} µm/px, {} cells ({}); regions: {}",
        args.out.display(),
        image.width(),
        image.height(),
        args.mpp,
        cells.len(),
        cells
            .iter()
            .map(|c| c.class.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        sidecar.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct TrainArgs {
    /// The pairs manifest (from `histolens dataset dmsl`), with its dataset.json beside it.
    #[arg(long)]
    pub data: PathBuf,
    /// The run folder (created; an existing run there is resumed). With --folds, one sub-folder per fold.
    #[arg(long)]
    pub run: PathBuf,
    /// inception-v3 (the paper), resnet18, resnet50 or efficientnet-lite0.
    #[arg(long, default_value = "inception-v3")]
    pub arch: String,
    /// sim (α·CE + β·SIM), mm (both magnifications, CE only), high or low (one magnification alone).
    #[arg(long, default_value = "sim")]
    pub mode: String,
    /// random, imagenet:FILE (EfficientNet-Lite0) or checkpoint:FILE.
    #[arg(long, default_value = "random")]
    pub start: String,
    /// none, backbone (classifiers only) or all-but-last-block (the last block, whose output SIM
    /// compares, and the classifiers: fine-tuning from ImageNet on a CPU).
    #[arg(long, default_value = "none")]
    pub freeze: String,
    /// With --freeze backbone or all-but-last-block: compute the frozen part once per pair (without
    /// augmentation) and keep it in histolens's cache folder, so that epochs and folds cost only
    /// what trains.
    #[arg(long)]
    pub cache_frozen: bool,
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    #[arg(long, default_value_t = 0.5)]
    pub beta: f64,
    /// Fusion weights of the high and the low branch (normalised to sum to 1).
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.5")]
    pub weights: Vec<f64>,
    /// k-fold cross-validation over source groups (train + validation pooled); the test split is kept.
    #[arg(long)]
    pub folds: Option<usize>,
    #[arg(long)]
    pub steps_per_epoch: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

pub fn train_cmd(args: TrainArgs) -> anyhow::Result<()> {
    let arch =
        Arch::parse(&args.arch).with_context(|| format!("unknown architecture {}", args.arch))?;
    let mode = Mode::parse(&args.mode)
        .with_context(|| format!("unknown mode {}: use sim, mm, high or low", args.mode))?;
    let [w_high, w_low] = args.weights[..] else {
        bail!("--weights takes two numbers (high, low)");
    };
    let mut cfg = DmslTrainConfig::new(arch);
    cfg.mode = mode;
    cfg.start = parse_start(&args.start)?;
    cfg.freeze = Freeze::parse(&args.freeze).with_context(|| {
        format!(
            "unknown --freeze {}: use none, backbone or all-but-last-block",
            args.freeze
        )
    })?;
    cfg.epochs = args.epochs;
    cfg.batch = args.batch;
    cfg.lr = args.lr;
    cfg.alpha = args.alpha;
    cfg.beta = args.beta;
    cfg.weights = [w_high, w_low];
    cfg.steps_per_epoch = args.steps_per_epoch;
    cfg.cache_frozen = args.cache_frozen;
    cfg.seed = args.seed;
    let device = select(args.device)?;
    let folds: Vec<Option<(usize, usize)>> = match args.folds {
        Some(k) if k >= 2 => (0..k).map(|i| Some((i, k))).collect(),
        Some(k) => bail!("--folds needs 2 or more, got {k}"),
        None => vec![None],
    };
    if let Some(k) = args.folds {
        println!(
            "{k}-fold cross-validation dealt by source image or region, stratified by class: a \
             patient's images are kept together only if they share a source"
        );
    }
    let mut summaries = Vec::new();
    for fold in folds {
        cfg.fold = fold;
        let dir = match fold {
            Some((i, _)) => args.run.join(format!("fold-{i}")),
            None => args.run.clone(),
        };
        histolens::runs::write_info(
            &dir,
            &histolens::runs::RunConfig::Dmsl(cfg.clone()),
            &args.data,
        )?;
        let stop = AtomicBool::new(false);
        let pb = bar(cfg.epochs as u64, "epochs");
        let outcome = train(&args.data, &cfg, &dir, &device, &stop, |e| match e {
            DmslTrainEvent::Step {
                epoch,
                step,
                steps,
                loss,
                pairs_per_second,
            } => pb.set_message(format!(
                "epoch {epoch} step {step}/{steps} loss {loss:.4} ({pairs_per_second:.1} pairs/s)"
            )),
            DmslTrainEvent::Epoch(log) => {
                pb.set_position(log.epoch as u64);
                let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.1}%", 100.0 * v));
                say(
                    &pb,
                    format!(
                        "epoch {:>3}: train {:.4} (CE {:.4}, SIM {:.4})  val {}  acc {}  F1 {}  AUC {}  lr {:.1e}  {:.1} pairs/s",
                        log.epoch,
                        log.train_loss,
                        log.train_ce,
                        log.train_sim,
                        log.val_loss.map_or("-".into(), |v| format!("{v:.4}")),
                        pct(log.val_accuracy),
                        pct(log.val_f1),
                        log.val_auc.map_or("-".into(), |v| format!("{v:.3}")),
                        log.lr,
                        log.pairs_per_second
                    ),
                );
            }
            DmslTrainEvent::Info(s) => say(&pb, s),
        })?;
        pb.finish_and_clear();
        let model = outcome.best.as_ref().unwrap_or(&outcome.last);
        println!(
            "{}{} epochs; best validation loss {}; model: {}",
            fold.map_or(String::new(), |(i, k)| format!("fold {}/{k}: ", i + 1)),
            outcome.epochs_done,
            outcome
                .best_val_loss
                .map_or("-".into(), |v| format!("{v:.4}")),
            model.display()
        );
        if let Some((i, k)) = fold {
            // The fold's validation metrics, from the best checkpoint's metadata.
            let bytes = std::fs::read(model)?;
            let meta = histolens::nn::checkpoint::read_meta(&bytes)?;
            summaries.push((i, k, meta.provenance.metrics));
        }
    }
    if !summaries.is_empty() {
        for key in ["val_accuracy", "val_f1", "val_auc"] {
            let v: Vec<f64> = summaries
                .iter()
                .filter_map(|s| s.2.get(key).copied())
                .collect();
            if v.is_empty() {
                continue;
            }
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
            println!("{key}: {mean:.3} ± {sd:.3} over {} folds", v.len());
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long)]
    pub data: PathBuf,
    /// A DMSL model (default: the bundled demo).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// train, val or test.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Write the report as JSON here ("-" for standard output).
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

fn model_path(path: Option<&Path>) -> anyhow::Result<PathBuf> {
    match path {
        Some(p) => Ok(p.to_path_buf()),
        None => histolens::default_dmsl_model()
            .context("no bundled DMSL model was found; pass one with --model"),
    }
}

pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let split =
        Split::parse(&args.split).with_context(|| format!("unknown split {}", args.split))?;
    let model = model_path(args.model.as_deref())?;
    let device = select(args.device)?;
    let report = evaluate(&model, &args.data, split, &device, args.batch)?;
    print!("{}", report.metrics.table(&report.classes));
    println!("{:.1} pairs/s", report.pairs_per_second);
    if let Some(out) = args.json {
        let json = serde_json::to_string_pretty(&report)?;
        if out.as_os_str() == "-" {
            println!("{json}");
        } else {
            write_atomic(&out, json.as_bytes())
                .with_context(|| format!("writing {}", out.display()))?;
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct HeatmapArgs {
    /// Slides, or folders searched recursively for slides and images.
    #[arg(required_unless_present = "list")]
    pub slides: Vec<PathBuf>,
    /// A text file listing slides, one path per line (for thousands of slides).
    #[arg(long)]
    pub list: Option<PathBuf>,
    /// A DMSL model (default: the bundled demo).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Folder for heatmap.png, heatmap.npy and heatmap.geojson; with several slides, one sub-folder per
    /// slide, named after its file.
    #[arg(long)]
    pub out: PathBuf,
    /// µm/px of the slides' level 0 (overrides their metadata; needed where they have none).
    #[arg(long)]
    pub mpp: Option<f64>,
    /// The class drawn in the PNG (name or index; default: the last class).
    #[arg(long)]
    pub class: Option<String>,
    /// viridis, magma or diverging.
    #[arg(long, default_value = "viridis")]
    pub colormap: String,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Fields with more background than this share are skipped.
    #[arg(long, default_value_t = 0.8)]
    pub max_background: f64,
    /// Recompute even when a finished heatmap of the slide is cached.
    #[arg(long)]
    pub fresh: bool,
    /// Keep the resumable heatmap beside the slide (`SLIDE.MODEL.heatmap.safetensors`) instead of
    /// histolens's cache folder.
    #[arg(long)]
    pub sidecar: bool,
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Only shard K of N of the slides (0-based; see `histolens merge`).
    #[arg(long, value_name = "K/N")]
    pub shard: Option<super::shard::Shard>,
    /// One row per slide (JSON or CSV, by the extension; written atomically): where its outputs are,
    /// how many fields were classified, and each class's mean probability and share of the tissue.
    /// The shards' summaries combine with `histolens merge`.
    #[arg(long)]
    pub summary: Option<PathBuf>,
    /// Score the heatmap against labelled regions (GeoJSON; a mosaic's `.regions.geojson`): the
    /// classified fields whose centres lie in a region vote, and the regions whose majority is
    /// their own class are counted. Printed, and written as `check.json` in --out. One slide only.
    #[arg(long)]
    pub check: Option<PathBuf>,
}

/// A slide's line of `--summary`.
struct HeatmapRow {
    path: String,
    outputs: Option<String>,
    mpp: Option<f64>,
    fields: Option<usize>,
    tissue_fields: Option<usize>,
    background_fields: Option<usize>,
    /// Per class: (name, mean probability over the tissue fields, share of the tissue fields where it
    /// is the most probable class).
    classes: Vec<(String, f64, f64)>,
    error: Option<String>,
}

impl HeatmapRow {
    fn failed(path: &Path, error: String) -> Self {
        HeatmapRow {
            path: path.display().to_string(),
            outputs: None,
            mpp: None,
            fields: None,
            tissue_fields: None,
            background_fields: None,
            classes: Vec::new(),
            error: Some(error),
        }
    }

    /// The columns in order; the class columns are `mean_CLASS` and `share_CLASS`.
    fn columns(&self, classes: &[String]) -> Vec<(String, serde_json::Value)> {
        use serde_json::Value;
        let num = |v: Option<f64>| v.map_or(Value::Null, Value::from);
        let count = |v: Option<usize>| v.map_or(Value::Null, Value::from);
        let text = |v: &Option<String>| v.clone().map_or(Value::Null, Value::from);
        let mut cols = vec![
            ("path".to_string(), Value::from(self.path.clone())),
            ("outputs".into(), text(&self.outputs)),
            ("mpp".into(), num(self.mpp)),
            ("fields".into(), count(self.fields)),
            ("tissue_fields".into(), count(self.tissue_fields)),
            ("background_fields".into(), count(self.background_fields)),
        ];
        for c in classes {
            let found = self.classes.iter().find(|(n, _, _)| n == c);
            cols.push((format!("mean_{c}"), num(found.map(|f| f.1))));
            cols.push((format!("share_{c}"), num(found.map(|f| f.2))));
        }
        cols.push(("error".into(), text(&self.error)));
        cols
    }
}

/// Each class's mean probability over the classified fields and the share of them it wins.
fn class_summary(heatmap: &Heatmap, classes: &[String]) -> Vec<(String, f64, f64)> {
    use histolens::dmsl::heatmap::CellState;
    let k = heatmap.classes();
    let mut sums = vec![0.0f64; k];
    let mut wins = vec![0usize; k];
    let mut n = 0usize;
    for (cell, state) in heatmap.state.iter().enumerate() {
        if *state != CellState::Done {
            continue;
        }
        let p = &heatmap.probs[cell * k..(cell + 1) * k];
        for (s, v) in sums.iter_mut().zip(p) {
            *s += f64::from(*v);
        }
        if let Some((best, _)) = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)) {
            wins[best] += 1;
        }
        n += 1;
    }
    let d = n.max(1) as f64;
    classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.clone(), sums[i] / d, wins[i] as f64 / d))
        .collect()
}

/// The slides named on the command line and in `--list`, folders expanded, in a fixed order.
fn heatmap_inputs(args: &HeatmapArgs) -> anyhow::Result<Vec<PathBuf>> {
    let mut named = args.slides.clone();
    if let Some(list) = &args.list {
        let text = std::fs::read_to_string(list)
            .with_context(|| format!("reading the list {}", list.display()))?;
        named.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(PathBuf::from),
        );
    }
    super::magnification::expand_inputs(&named)
}

/// Each slide's output folder: `--out` itself for one slide, else `--out/STEM`. Decided on all the
/// inputs before sharding, so that every shard names folders alike; two slides with one file stem
/// are refused rather than written over each other.
fn output_folders(out: &Path, slides: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    if slides.len() == 1 {
        return Ok(vec![out.to_path_buf()]);
    }
    let mut seen: std::collections::HashMap<String, &Path> = std::collections::HashMap::new();
    let mut folders = Vec::with_capacity(slides.len());
    for s in slides {
        let stem = s
            .file_stem()
            .map(|x| x.to_string_lossy().into_owned())
            .unwrap_or_else(|| "slide".into());
        if let Some(other) = seen.insert(stem.clone(), s) {
            bail!(
                "{} and {} would share the output folder {stem}: rename one, or run them separately",
                other.display(),
                s.display()
            );
        }
        folders.push(out.join(stem));
    }
    Ok(folders)
}

pub fn heatmap(args: HeatmapArgs) -> anyhow::Result<()> {
    let model_file = model_path(args.model.as_deref())?;
    let bytes =
        std::fs::read(&model_file).with_context(|| format!("reading {}", model_file.display()))?;
    let device = select(args.device)?;
    let model = DmslModel::from_bytes(&bytes, &device)
        .with_context(|| format!("loading the model {}", model_file.display()))?;
    let id = content_id(&bytes);
    let all = heatmap_inputs(&args)?;
    if all.is_empty() {
        bail!("no slides or images among the inputs");
    }
    let folders = output_folders(&args.out, &all)?;
    let mut work: Vec<(PathBuf, PathBuf)> = all.into_iter().zip(folders).collect();
    let single = work.len() == 1 && args.shard.is_none();
    if args.check.is_some() && !single {
        bail!("--check scores one slide against its regions: give one slide");
    }
    if let Some(shard) = args.shard {
        work = shard.take(work);
    }
    let mut rows = Vec::with_capacity(work.len());
    for (slide, out) in &work {
        match heatmap_one(&args, &model, &id, slide, out) {
            Ok(row) => rows.push(row),
            // One slide: its error is the command's. Several: it is reported in its row.
            Err(e) if single => return Err(e),
            Err(e) => {
                eprintln!("{}: {e:#}", slide.display());
                rows.push(HeatmapRow::failed(slide, format!("{e:#}")));
            }
        }
    }
    if let Some(path) = &args.summary {
        write_summary(path, &rows, model.classes())?;
    }
    let failed = rows.iter().filter(|r| r.error.is_some()).count();
    if rows.len() > 1 || failed > 0 {
        eprintln!(
            "{} slides: {} heatmaps, {failed} failed",
            rows.len(),
            rows.len() - failed
        );
    }
    Ok(())
}

/// The summary rows as JSON (an array of objects) or CSV, by the file's extension.
fn write_summary(path: &Path, rows: &[HeatmapRow], classes: &[String]) -> anyhow::Result<()> {
    let bytes = if super::shard::is_csv(path) {
        let mut w = csv::Writer::from_writer(Vec::new());
        let header = HeatmapRow::failed(Path::new(""), String::new()).columns(classes);
        w.write_record(header.iter().map(|(k, _)| k.as_str()))?;
        for r in rows {
            w.write_record(r.columns(classes).iter().map(|(_, v)| match v {
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            }))?;
        }
        w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?
    } else {
        let values: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| serde_json::Value::Object(r.columns(classes).into_iter().collect()))
            .collect();
        let mut v = serde_json::to_vec_pretty(&values)?;
        v.push(b'\n');
        v
    };
    write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

/// One slide's heatmap: computed (or resumed from its sidecar) and exported into `out`.
fn heatmap_one(
    args: &HeatmapArgs,
    model: &DmslModel,
    id: &str,
    slide_path: &Path,
    out: &Path,
) -> anyhow::Result<HeatmapRow> {
    let slide = Slide::open(slide_path)?;
    let mpp = super::magnification::mpp_or_estimate(&slide, args.mpp)?;
    match histolens::dmsl::heatmap::field_scale(mpp, model.geometry().high_magnification) {
        Ok(None) => {}
        Ok(Some(warning)) => eprintln!("warning: {}: {warning}", slide_path.display()),
        Err(why) => bail!("{}: {why}", slide_path.display()),
    }
    let header = header_for(&slide, mpp, model, id);
    let sidecar = sidecar_path(slide_path, id, &histolens::cache_dir(), args.sidecar);
    let mut heatmap = match Heatmap::load_matching(&sidecar, &header)? {
        Some(h) if !args.fresh => {
            eprintln!(
                "resuming from {} ({} of {} fields known)",
                sidecar.display(),
                h.count(histolens::dmsl::heatmap::CellState::Done),
                h.header.grid.len()
            );
            h
        }
        _ => Heatmap::new(header),
    };
    let opts = HeatmapOptions {
        batch: args.batch,
        max_background: args.max_background,
        ..Default::default()
    };
    mark_background(&slide, &mut heatmap, opts.max_background)?;
    let pending = heatmap.count(histolens::dmsl::heatmap::CellState::Pending);
    let pb = bar(pending as u64, "fields");
    let stop = AtomicBool::new(false);
    let run = compute(
        &slide,
        model,
        &mut heatmap,
        &opts,
        Some(&sidecar),
        &|| None,
        &stop,
        |_, cells| pb.inc(cells.len() as u64),
    )?;
    pb.finish_and_clear();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let classes = model.classes();
    let class = match &args.class {
        None => classes.len() - 1,
        Some(c) => classes
            .iter()
            .position(|x| x == c)
            .or_else(|| c.parse::<usize>().ok().filter(|&i| i < classes.len()))
            .with_context(|| format!("unknown class {c}: the model has {}", classes.join(", ")))?,
    };
    let map = Colormap::parse(&args.colormap)
        .with_context(|| format!("unknown colormap {}", args.colormap))?;
    let g = heatmap.header.grid;
    let px = (1024 / g.cols.max(g.rows)).clamp(1, 64);
    let thumb = slide.thumbnail(1024)?;
    let png = heatmap.to_png(class, map, px, Some(&thumb));
    let write = |name: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let p = out.join(name);
        write_atomic(&p, bytes).with_context(|| format!("writing {}", p.display()))
    };
    let mut png_bytes = Vec::new();
    png.write_to(
        &mut std::io::Cursor::new(&mut png_bytes),
        image::ImageFormat::Png,
    )?;
    write("heatmap.png", &png_bytes)?;
    write("heatmap.npy", &heatmap.to_npy())?;
    write(
        "heatmap.geojson",
        serde_json::to_string(&heatmap.to_geojson())?.as_bytes(),
    )?;
    if let Some(path) = &args.check {
        let votes = heatmap.region_votes(&read_regions(path)?);
        let right = votes.iter().filter(|v| v.is_right()).count();
        for (i, v) in votes.iter().enumerate() {
            println!(
                "region {:>3} {:<12} majority {:<12} ({:>3.0}% of {} fields) {}",
                i + 1,
                v.class,
                v.majority.as_deref().unwrap_or("-"),
                100.0 * v.share,
                v.fields,
                if v.is_right() { "right" } else { "WRONG" }
            );
        }
        let accuracy = right as f64 / votes.len().max(1) as f64;
        println!(
            "regions right: {right} of {} ({:.1}%)",
            votes.len(),
            100.0 * accuracy
        );
        let report = serde_json::json!({
            "regions": path.display().to_string(),
            "right": right,
            "total": votes.len(),
            "accuracy": accuracy,
            "votes": votes,
        });
        write(
            "check.json",
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )?;
    }
    let background = heatmap.count(histolens::dmsl::heatmap::CellState::Background);
    let done = heatmap.count(histolens::dmsl::heatmap::CellState::Done);
    println!(
        "{}: {} fields classified, {} skipped as background ({:.1} s: reading {:.1} s, model {:.1} s; {:.2} fields/s); grid {}x{} of {:.0} µm; sidecar {}; outputs in {}",
        slide_path.display(),
        run.computed,
        background,
        run.seconds,
        run.read_seconds,
        run.model_seconds,
        run.computed as f64 / run.seconds.max(1e-9),
        g.cols,
        g.rows,
        heatmap.header.field_um,
        sidecar.display(),
        out.display()
    );
    Ok(HeatmapRow {
        path: slide_path.display().to_string(),
        outputs: Some(out.display().to_string()),
        mpp: Some(mpp),
        fields: Some(g.len()),
        tissue_fields: Some(done),
        background_fields: Some(background),
        classes: class_summary(&heatmap, classes),
        error: None,
    })
}
