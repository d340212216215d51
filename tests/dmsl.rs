//! DMSL end to end on the bundled CC0 slide: the pair builder over labelled regions, a short real
//! training run with resume and evaluation, and slide heatmaps with the shipped demo model (sidecar,
//! cancel and resume, exports).

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;
use histolens::data::manifest::Manifest;
use histolens::data::pairs::{
    PairConfig, PairGeometry, PairRecord, SlideSource, build, load_dataset, read_field,
    read_regions,
};
use histolens::dmsl::DmslModel;
use histolens::dmsl::heatmap::{
    CellState, Heatmap, HeatmapOptions, compute, content_id, header_for, mark_background,
};
use histolens::dmsl::train::{
    DmslTrainConfig, DmslTrainEvent, Freeze, Mode, Start, evaluate, train,
};
use histolens::nn::Arch;
use histolens::slide::Slide;

fn regions_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/models/dmsl-demo-regions.geojson")
}

/// 20x + 5x over a 64 µm field: 128 px and 32 px (small, so that the tests train quickly).
const GEOMETRY: PairGeometry = PairGeometry {
    high_magnification: 20.0,
    low_magnification: 5.0,
    field_um: 64.0,
};

fn pairs() -> &'static (tempfile::TempDir, Manifest<PairRecord>) {
    static DS: OnceLock<(tempfile::TempDir, Manifest<PairRecord>)> = OnceLock::new();
    DS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let slides = [SlideSource {
            path: common::sample_slide(),
            mpp: 0.499,
            regions: read_regions(&regions_file()).unwrap(),
        }];
        let cfg = PairConfig {
            geometry: GEOMETRY,
            stride: 1.0,
            seed: 3,
            ..Default::default()
        };
        let (manifest, _) = build(&slides, &[], &[], dir.path(), &cfg, |_| {}).unwrap();
        (dir, manifest)
    })
}

fn rect(region: &str) -> [f64; 4] {
    let v: Vec<f64> = region.split(',').map(|s| s.parse().unwrap()).collect();
    [v[0], v[1], v[2], v[3]]
}

/// Both images of a pair cover the same field: the low image equals the slide read directly at the
/// low magnification over the recorded rectangle, and the recorded rectangle lies in its region.
#[test]
fn pairs_cover_the_same_field_at_two_magnifications() {
    let (dir, manifest) = pairs();
    let dataset = load_dataset(&dir.path().join("pairs.csv")).unwrap();
    assert_eq!(dataset.classes, ["background", "epithelium", "stroma"]);
    assert!(
        manifest.records.len() > 30,
        "{} pairs",
        manifest.records.len()
    );
    manifest.check_disjoint().unwrap();
    let regions = read_regions(&regions_file()).unwrap();
    let slide = Slide::open(common::sample_slide()).unwrap();
    for r in manifest.records.iter().step_by(7) {
        let [x, y, w, h] = rect(&r.region);
        // 64 µm at 0.499 µm/px.
        assert!((w - 128.3).abs() < 1.0 && w == h, "{}", r.region);
        let in_a_region = regions
            .iter()
            .any(|g| g.class == r.class && g.contains_square(x, y, w));
        assert!(
            in_a_region,
            "{} is not inside a {} region",
            r.region, r.class
        );
        let high = image::open(manifest.resolve_path(&r.high))
            .unwrap()
            .to_rgb8();
        let low = image::open(manifest.resolve_path(&r.low))
            .unwrap()
            .to_rgb8();
        assert_eq!(high.dimensions(), (128, 128));
        assert_eq!(low.dimensions(), (32, 32));
        let direct = read_field(&slide, x, y, w, 32).unwrap();
        let diff: f64 = low
            .pixels()
            .zip(direct.pixels())
            .map(|(a, b)| {
                (0..3)
                    .map(|c| f64::from(a.0[c].abs_diff(b.0[c])))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / (32.0 * 32.0 * 3.0);
        assert!(
            diff < 6.0,
            "low image differs from the slide by {diff:.1} levels"
        );
        // And the high image's mean colour matches the low one's (same content, other resolution).
        let mean = |img: &image::RgbImage| {
            img.pixels().map(|p| f64::from(p.0[0])).sum::<f64>()
                / f64::from(img.width() * img.height())
        };
        assert!((mean(&high) - mean(&low)).abs() < 3.0);
    }
    // Every class reaches the training split, and each region (group) sits in one split only.
    for c in &dataset.classes {
        assert!(
            manifest
                .records
                .iter()
                .any(|r| r.class == *c && r.split == histolens::data::Split::Train)
        );
    }
}

fn small_config(mode: Mode) -> DmslTrainConfig {
    let mut cfg = DmslTrainConfig::new(Arch::RESNET18);
    cfg.mode = mode;
    cfg.batch = 6;
    cfg.epochs = 2;
    cfg.steps_per_epoch = Some(2);
    cfg.seed = 1;
    cfg
}

/// A short real run trains, logs, checkpoints, resumes from its checkpoint, and evaluates.
#[test]
fn training_resumes_and_evaluates() {
    let (dir, _) = pairs();
    let manifest = dir.path().join("pairs.csv");
    let run = tempfile::tempdir().unwrap();
    let cfg = small_config(Mode::Sim);
    let stop = AtomicBool::new(false);
    let mut sims = Vec::new();
    let out = train(&manifest, &cfg, run.path(), &Device::Cpu, &stop, |e| {
        if let DmslTrainEvent::Epoch(l) = e {
            sims.push(l.train_sim);
        }
    })
    .unwrap();
    assert_eq!(out.epochs_done, 2);
    assert!(
        sims.iter().all(|s| *s > 0.0),
        "the SIM loss is part of training: {sims:?}"
    );
    let log = std::fs::read_to_string(run.path().join("log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2);
    // Another configuration in the same run folder is refused.
    let mut more = cfg.clone();
    more.epochs = 3;
    assert!(train(&manifest, &more, run.path(), &Device::Cpu, &stop, |_| {}).is_err());
    // An interruption during epoch 2 leaves the state of epoch 1: the run resumes from there.
    let state = run.path().join("state.json");
    let mut s: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    s["epoch"] = 1.into();
    std::fs::write(&state, serde_json::to_vec(&s).unwrap()).unwrap();
    let mut resumed = String::new();
    let out = train(&manifest, &cfg, run.path(), &Device::Cpu, &stop, |e| {
        if let DmslTrainEvent::Info(i) = e {
            resumed = i;
        }
    })
    .unwrap();
    assert_eq!(out.epochs_done, 2);
    assert!(resumed.contains("resuming after epoch 1"), "{resumed}");
    let model = out.best.unwrap_or(out.last);
    let report = evaluate(
        &model,
        &manifest,
        histolens::data::Split::Test,
        &Device::Cpu,
        8,
    )
    .unwrap();
    assert_eq!(report.metrics.confusion.len(), 3);
    assert!(report.metrics.n > 0);
    assert!((0.0..=1.0).contains(&report.metrics.accuracy));

    // Fine-tuning the last block only: from this checkpoint, one step changes the last block (the SIM
    // term always has a gradient there; a saturated classifier may have none) and nothing before it.
    let tuned = tempfile::tempdir().unwrap();
    let mut ft = small_config(Mode::Sim);
    ft.start = Start::Checkpoint(model.clone());
    ft.freeze = Freeze::AllButLastBlock;
    ft.epochs = 1;
    ft.steps_per_epoch = Some(1);
    train(&manifest, &ft, tuned.path(), &Device::Cpu, &stop, |_| {}).unwrap();
    let before = candle_core::safetensors::load(&model, &Device::Cpu).unwrap();
    let after = candle_core::safetensors::load(tuned.path().join("last.safetensors"), &Device::Cpu)
        .unwrap();
    let changed = |name: &str| {
        let d = (&before[name] - &after[name])
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        d.to_scalar::<f32>().unwrap() > 0.0
    };
    for b in ["branches.0", "branches.1"] {
        assert!(!changed(&format!("{b}.backbone.conv1.weight")));
        assert!(!changed(&format!("{b}.backbone.layer3.1.bn2.running_mean")));
        assert!(changed(&format!("{b}.backbone.layer4.1.conv2.weight")));
    }
}

/// The single-branch baselines and the MM mode train through the same code.
#[test]
fn single_branch_and_mm_modes_train() {
    let (dir, _) = pairs();
    let manifest = dir.path().join("pairs.csv");
    for mode in [Mode::Mm, Mode::Low] {
        let run = tempfile::tempdir().unwrap();
        let mut cfg = small_config(mode);
        cfg.epochs = 1;
        cfg.steps_per_epoch = Some(1);
        let mut sim = f64::NAN;
        train(
            &manifest,
            &cfg,
            run.path(),
            &Device::Cpu,
            &AtomicBool::new(false),
            |e| {
                if let DmslTrainEvent::Epoch(l) = e {
                    sim = l.train_sim;
                }
            },
        )
        .unwrap();
        assert_eq!(sim, 0.0, "{mode:?} has no SIM term");
        let model = DmslModel::load(&run.path().join("last.safetensors"), &Device::Cpu).unwrap();
        let n = if mode == Mode::Low { 1 } else { 2 };
        assert_eq!(model.layout.branch_magnifications.len(), n);
    }
}

/// The demo model on the test regions of the dataset its model card describes (assets/models/README.md).
#[test]
fn demo_model_reaches_its_reported_accuracy() {
    let Some((path, _)) = demo_model() else {
        panic!("the demo model assets/models/dmsl-demo.safetensors is missing");
    };
    let dir = tempfile::tempdir().unwrap();
    let slides = [SlideSource {
        path: common::sample_slide(),
        mpp: 0.499,
        regions: read_regions(&regions_file()).unwrap(),
    }];
    let cfg = PairConfig {
        geometry: GEOMETRY,
        stride: 0.25,
        max_per_group: Some(24),
        seed: 1,
        ..Default::default()
    };
    build(&slides, &[], &[], dir.path(), &cfg, |_| {}).unwrap();
    let report = evaluate(
        &path,
        &dir.path().join("pairs.csv"),
        histolens::data::Split::Test,
        &Device::Cpu,
        24,
    )
    .unwrap();
    eprintln!("{}", report.metrics.table(&report.classes));
    assert_eq!(report.metrics.n, 72);
    assert!(
        report.metrics.accuracy >= 0.9,
        "accuracy {}",
        report.metrics.accuracy
    );
    assert!(report.metrics.auc >= 0.95, "AUC {}", report.metrics.auc);
}

fn demo_model() -> Option<(PathBuf, Vec<u8>)> {
    let p = histolens::default_dmsl_model()?;
    let bytes = std::fs::read(&p).ok()?;
    Some((p, bytes))
}

/// The demo model over the sample slide: tissue cells get probabilities summing to 1, glass is
/// skipped, the sidecar reloads identically, and a cancelled run resumes without recomputing.
#[test]
fn heatmap_of_the_sample_slide_with_the_demo_model() {
    let Some((_, bytes)) = demo_model() else {
        panic!("the demo model assets/models/dmsl-demo.safetensors is missing");
    };
    let model = DmslModel::from_bytes(&bytes, &Device::Cpu).unwrap();
    let slide = Slide::open(common::sample_slide()).unwrap();
    let header = header_for(&slide, 0.499, &model, &content_id(&bytes));
    let mut heatmap = Heatmap::new(header.clone());
    let opts = HeatmapOptions::default();
    mark_background(&slide, &mut heatmap, opts.max_background).unwrap();
    let background = heatmap.count(CellState::Background);
    assert!(
        background > heatmap.header.grid.len() / 4,
        "glass around the tissue is skipped"
    );
    let pending = heatmap.count(CellState::Pending);
    assert!(pending > 10);

    // Cancel after the first batch.
    let dir = tempfile::tempdir().unwrap();
    let sidecar = dir.path().join("s.heatmap.safetensors");
    let stop = AtomicBool::new(false);
    let first = compute(
        &slide,
        &model,
        &mut heatmap,
        &opts,
        Some(&sidecar),
        &|| None,
        &stop,
        |_, _| stop.store(true, Ordering::Relaxed),
    )
    .unwrap();
    assert!(first.cancelled);
    let done_first = heatmap.count(CellState::Done);
    assert!(done_first > 0 && done_first <= opts.batch);
    let mut resumed = Heatmap::load_matching(&sidecar, &header).unwrap().unwrap();
    assert!(resumed == heatmap, "the sidecar reloads what was computed");
    let stop = AtomicBool::new(false);
    let second = compute(
        &slide,
        &model,
        &mut resumed,
        &opts,
        Some(&sidecar),
        &|| None,
        &stop,
        |_, _| {},
    )
    .unwrap();
    assert!(resumed.is_complete());
    assert_eq!(
        second.computed + second.skipped_background + first.computed + first.skipped_background,
        pending,
        "finished cells are not computed again"
    );
    let k = resumed.classes();
    for cell in 0..resumed.header.grid.len() {
        if let Some(p) = resumed.probs_at(cell) {
            assert_eq!(p.len(), k);
            let sum: f32 = p.iter().sum();
            assert!((sum - 1.0).abs() < 1e-4, "cell {cell} sums to {sum}");
        }
    }
    let reloaded = Heatmap::load_matching(&sidecar, &header).unwrap().unwrap();
    assert!(
        reloaded == resumed,
        "the finished sidecar reloads identically"
    );

    // The demo model sees epithelium where the labelled epidermis is (a region centre).
    let epi = model
        .classes()
        .iter()
        .position(|c| c == "epithelium")
        .unwrap();
    let cell = resumed.header.grid.cell_at(1150.0, 1930.0).unwrap();
    if let Some(p) = resumed.probs_at(cell) {
        assert!(
            p[epi] > 0.5,
            "P(epithelium) {} in the labelled epidermis",
            p[epi]
        );
    }

    // GeoJSON parses back with every tile inside the slide.
    let text = serde_json::to_string(&resumed.to_geojson()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let (w, h) = slide.info().dimensions();
    let g = resumed.header.grid;
    let features = v["features"].as_array().unwrap();
    assert_eq!(features.len(), resumed.count(CellState::Done));
    for f in features {
        for p in f["geometry"]["coordinates"][0].as_array().unwrap() {
            let (x, y) = (p[0].as_f64().unwrap(), p[1].as_f64().unwrap());
            assert!(x >= 0.0 && y >= 0.0 && x <= w as f64 + g.cell && y <= h as f64 + g.cell);
        }
        let name = f["properties"]["classification"]["name"].as_str().unwrap();
        assert!(model.classes().iter().any(|c| c == name));
    }
}

/// BACH end to end through the command line, on a subset: class folders of squashed images →
/// pairs → a short DMSL run on cached frozen ImageNet features → a mosaic slide of held-out images
/// → its heatmap scored against the mosaic's cells. BACH is CC BY-NC-ND: everything stays in a
/// temporary folder.
#[test]
fn bach_mosaic_comes_back_from_the_heatmap() {
    let Some(shared) = common::shared_data("bach_mosaic_comes_back_from_the_heatmap") else {
        return;
    };
    let (bach, weights) = (
        shared.join("bach"),
        shared.join("weights/efficientnet-lite0-imagenet.safetensors"),
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_histolens"))
            .args(args)
            .env("HISTOLENS_CACHE_DIR", d.join("cache"))
            .env("HISTOLENS_DATA_DIR", d.join("data"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    // Three training images of two classes; two more of each held out for the mosaic.
    let mut held_out = Vec::new();
    for (class, prefix) in [("normal", "n"), ("invasive", "iv")] {
        std::fs::create_dir_all(d.join("train").join(class)).unwrap();
        for i in 0..5 {
            let image = bach.join(class).join(format!("{prefix}{i:03}.jpeg"));
            if i < 3 {
                let link = d.join("train").join(class).join(format!("{i}.jpeg"));
                std::os::unix::fs::symlink(&image, link).unwrap();
            } else {
                held_out.push(image.display().to_string());
            }
        }
    }
    let s = |p: &std::path::Path| p.display().to_string();
    let printed = run(&[
        "dataset",
        "dmsl",
        "--folder",
        &format!("{}@0.42um", s(&d.join("train"))),
        "--pixel-aspect",
        "0.75",
        "--high",
        "20",
        "--low",
        "5",
        "--field-px",
        "128",
        "--splits",
        "1,0,0",
        "--max-per-region",
        "24",
        "--out",
        &s(&d.join("pairs")),
    ]);
    assert!(printed.contains("144 pairs"), "{printed}");
    assert!(printed.contains("dealt by image"), "{printed}");
    run(&[
        "train",
        "dmsl",
        "--data",
        &s(&d.join("pairs/pairs.csv")),
        "--run",
        &s(&d.join("run")),
        "--arch",
        "efficientnet-lite0",
        "--start",
        &format!("imagenet:{}", s(&weights)),
        "--freeze",
        "all-but-last-block",
        "--cache-frozen",
        "--epochs",
        "3",
        "--batch",
        "16",
    ]);
    let mosaic = d.join("mosaic.tiff");
    let mut args = vec!["dataset", "mosaic"];
    args.extend(held_out.iter().map(String::as_str));
    let m = s(&mosaic);
    args.extend([
        "--out",
        &m,
        "--mpp",
        "0.42",
        "--pixel-aspect",
        "0.75",
        "--cols",
        "2",
    ]);
    let printed = run(&args);
    assert!(printed.contains("4096x3072 px"), "{printed}");
    let regions = format!("{m}.regions.geojson");
    run(&[
        "heatmap",
        &m,
        "--model",
        &s(&d.join("run/last.safetensors")),
        "--out",
        &s(&d.join("heat")),
        "--check",
        &regions,
    ]);
    let check: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("heat/check.json")).unwrap()).unwrap();
    assert_eq!(check["total"], 4, "{check}");
    for v in check["votes"].as_array().unwrap() {
        assert!(v["fields"].as_u64().unwrap() > 20, "{v}");
    }
    assert!(check["right"].as_u64().unwrap() >= 3, "{check}");

    // Grad-CAM of a held-out field half tissue, half glass, for the class the model gives it: the
    // last convolution's map at 20x weighs the tissue more than the glass. (At 5x this small field
    // is 32 px, whose last feature map is a single cell: nothing to localise.)
    let tissue = image::open(&held_out[2]).unwrap().to_rgb8();
    let tissue =
        image::imageops::resize(&tissue, 2048, 1536, image::imageops::FilterType::Triangle);
    let mut field = image::RgbImage::from_pixel(800, 300, image::Rgb([243, 241, 245]));
    image::imageops::replace(
        &mut field,
        &image::imageops::crop_imm(&tissue, 800, 600, 400, 300).to_image(),
        0,
        0,
    );
    let half = d.join("half-glass.png");
    field.save(&half).unwrap();
    let printed = run(&[
        "gradcam",
        &s(&half),
        "--model",
        &s(&d.join("run/last.safetensors")),
        "--mpp",
        "0.42",
        "--layer",
        "high",
        "--out",
        &s(&d.join("cam")),
    ]);
    let side = 128;
    let v = common::npy_values(&std::fs::read(d.join("cam/20x-high.npy")).unwrap());
    assert_eq!(v.len(), side * side);
    let on_tissue: f32 = (0..side * side)
        .filter(|i| i % side < side / 2)
        .map(|i| v[i])
        .sum();
    let share = on_tissue / v.iter().sum::<f32>().max(1e-9);
    assert!(
        share > 0.6,
        "{:.0}% of the map on tissue: {printed}",
        100.0 * share
    );
    assert!(d.join("cam/5x-high.npy").is_file());
}
