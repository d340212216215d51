//! The window, driven headless with egui_kittest on wgpu (lavapipe on CI): open the bundled sample,
//! zoom with scripted input, check the status bar and overview, compare a snapshot image.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use histolens::gui::{HistolensApp, LaunchOptions};

fn harness(path: Option<PathBuf>, data_dir: &Path) -> Harness<'static, HistolensApp> {
    harness_with_model(path, data_dir, None)
}

fn harness_with_model(
    path: Option<PathBuf>,
    data_dir: &Path,
    model: Option<PathBuf>,
) -> Harness<'static, HistolensApp> {
    let data_dir = data_dir.to_path_buf();
    Harness::builder()
        .with_size([1100.0, 700.0])
        .with_max_steps(10_000)
        .wgpu()
        .build_eframe(move |cc| {
            HistolensApp::new(
                cc,
                LaunchOptions {
                    path,
                    cache_mb: Some(256),
                    data_dir: Some(data_dir),
                    frame_stats_path: None,
                    continuous_repaint: false,
                    magnification_model: model.clone(),
                },
            )
        })
}

/// Steps frames until the slide is open and every wanted tile is loaded and uploaded.
fn settle(h: &mut Harness<'_, HistolensApp>) {
    for _ in 0..6000 {
        h.step();
        if !h.state().is_busy() {
            h.run_steps(3);
            if !h.state().is_busy() {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("the viewer did not settle");
}

#[derive(Debug)]
struct Dropped(PathBuf);

impl egui::DroppedFile for Dropped {
    fn path(&self) -> &Path {
        &self.0
    }
    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

#[test]
fn opens_sample_zooms_and_shows_magnification() {
    let data = tempfile::tempdir().unwrap();
    let mut h = harness(Some(common::sample_slide()), data.path());
    settle(&mut h);
    let view = h.state().view().expect("the sample opened");
    assert!(!view.textures.is_empty(), "tiles were uploaded");
    let fit_scale = view.viewport.unwrap().scale;
    let fit_mag = view.screen_magnification().expect("CMU-1 has a pixel size");
    // At fit, the 2967 px tall slide shows at a few percent of 20x.
    assert!(fit_mag > 0.5 && fit_mag < 10.0, "{fit_mag}");
    h.get_by_label_contains(&format!("{fit_mag:.1}x"));
    h.get_by_label_contains("Level 0");

    // Keyboard zoom: '+' three times about the centre.
    for _ in 0..3 {
        h.key_press(egui::Key::Plus);
        h.step();
    }
    settle(&mut h);
    let scale = h.state().view().unwrap().viewport.unwrap().scale;
    assert!(
        (scale / fit_scale - 1.25f64.powi(3)).abs() < 1e-6,
        "{}",
        scale / fit_scale
    );
    // Toolbar button by label.
    h.get_by_label("Zoom in").click();
    h.step();
    settle(&mut h);
    let view = h.state().view().unwrap();
    let scale2 = view.viewport.unwrap().scale;
    assert!((scale2 / scale - 2.0).abs() < 1e-6);
    let mag = view.screen_magnification().unwrap();
    assert!((mag / fit_mag - 2.0 * 1.25f64.powi(3)).abs() < 1e-6);
    h.get_by_label_contains(&format!("{mag:.1}x"));

    // Arrow keys pan.
    let c0 = h.state().view().unwrap().viewport.unwrap().center;
    h.key_press(egui::Key::ArrowRight);
    h.step();
    let c1 = h.state().view().unwrap().viewport.unwrap().center;
    assert!(c1[0] > c0[0] && (c1[1] - c0[1]).abs() < 1e-9);
}

#[test]
fn overview_click_moves_the_view_and_snapshot() {
    let data = tempfile::tempdir().unwrap();
    let mut h = harness(Some(common::sample_slide()), data.path());
    settle(&mut h);
    h.get_by_label("Zoom in").click();
    h.step();
    h.get_by_label("Zoom in").click();
    settle(&mut h);
    let before = h.state().view().unwrap().viewport.unwrap().center;
    // A point a tenth of the way into the overview from its top-left corner (the slide's origin).
    let area = h
        .state()
        .view()
        .unwrap()
        .overview_rect
        .expect("the overview is drawn");
    let target = area.min + area.size() * 0.1;
    h.hover_at(target);
    h.step();
    h.drag_at(target);
    h.step();
    h.drop_at(target);
    settle(&mut h);
    let after = h.state().view().unwrap().viewport.unwrap().center;
    assert!(after != before, "clicking the overview moves the view");
    assert!(
        after[0] < 2220.0 * 0.3 && after[1] < 2967.0 * 0.3,
        "{after:?}: near the top-left"
    );

    h.state_mut().view_mut().unwrap().fit();
    h.step();
    settle(&mut h);
    // The status bar shows timings and cache sizes that vary between runs: leave it out of the image.
    let status = h
        .query_all_by_label_contains("%")
        .map(|n| n.rect())
        .max_by(|a, b| a.min.y.total_cmp(&b.min.y))
        .expect("the status bar shows the zoom in %");
    h.mask(egui::Rect::from_min_max(
        egui::pos2(0.0, status.min.y - 4.0),
        egui::pos2(1100.0, 700.0),
    ));
    h.snapshot("viewer_sample_fit");
}

#[test]
fn bad_drop_shows_error_and_keeps_the_slide() {
    let data = tempfile::tempdir().unwrap();
    let bad = data.path().join("broken.svs");
    std::fs::write(&bad, b"II*\0 this is not really a slide").unwrap();
    let mut h = harness(Some(common::sample_slide()), data.path());
    settle(&mut h);
    h.input_mut().dropped_files.push(Arc::new(Dropped(bad)));
    h.step();
    settle(&mut h);
    assert_eq!(h.state().errors().len(), 1, "{:?}", h.state().errors());
    h.get_by_label_contains("broken.svs");
    h.get_by_label_contains("still open");
    assert!(h.state().view().is_some(), "the sample stays open");
    h.get_by_label("OK").click();
    h.step();
    h.step();
    assert!(h.state().errors().is_empty());
}

#[test]
fn calibration_by_hand_is_remembered() {
    let data = tempfile::tempdir().unwrap();
    let img = data.path().join("snap.png");
    image::RgbaImage::from_pixel(300, 200, image::Rgba([200, 120, 180, 255]))
        .save(&img)
        .unwrap();
    let mut h = harness(Some(img.clone()), data.path());
    settle(&mut h);
    assert!(h.state().view().unwrap().mpp().is_none());
    h.get_by_label_contains("magnification unknown");
    h.get_by_role_and_label(egui::accesskit::Role::CheckBox, "µm/px")
        .click();
    h.run_steps(2);
    assert_eq!(
        h.state().view().unwrap().calibration_edit.mpp,
        Some(0.5),
        "the checkbox enables µm/px"
    );
    h.get_by_label("Apply calibration").click();
    h.run_steps(2);
    let m = h
        .state()
        .view()
        .unwrap()
        .mpp()
        .expect("calibration applied");
    assert!((m.x - 0.5).abs() < 1e-9);
    drop(h);
    // A new window on the same file starts with the remembered calibration.
    let mut h = harness(Some(img), data.path());
    settle(&mut h);
    assert!((h.state().view().unwrap().mpp().unwrap().x - 0.5).abs() < 1e-9);
}

/// A magnification model that always answers 20x (the GUI test checks the plumbing, not the accuracy):
/// ResNet-18 on 64 px crops, with the constant m and a trained range in its metadata.
fn random_magnification_model(dir: &Path) -> PathBuf {
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};
    use histolens::nn::checkpoint::{CheckpointMeta, FORMAT_VERSION, Normalization, to_bytes};
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    histolens::nn::hagnifinder::Hagnifinder::new(histolens::nn::Arch::Resnet18, vb).unwrap();
    // The output layer answers 20x whatever it sees.
    for (name, var) in vars.data().lock().unwrap().iter() {
        if name == "head.fc3.weight" {
            var.set(&var.as_tensor().zeros_like().unwrap()).unwrap();
        } else if name == "head.fc3.bias" {
            var.set(&candle_core::Tensor::new(&[20f32], &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let meta = CheckpointMeta {
        format_version: FORMAT_VERSION,
        arch: histolens::nn::Arch::Resnet18,
        task: "magnification".into(),
        input_size: [64, 64],
        normalization: Normalization::IMAGENET,
        classes: Vec::new(),
        magnification_range: Some([5.0, 40.0]),
        constants: [("asm_m".to_string(), 0.5)].into_iter().collect(),
        provenance: Default::default(),
    };
    let path = dir.join("random-magnification.safetensors");
    std::fs::write(&path, to_bytes(&vars, &meta, true).unwrap()).unwrap();
    path
}

#[test]
fn a_snapshot_gets_a_magnification_badge() {
    let data = tempfile::tempdir().unwrap();
    let model = random_magnification_model(data.path());
    // A 300x300 snapshot cut from the sample slide.
    let slide = histolens::slide::Slide::open(common::sample_slide()).unwrap();
    let snapshot = data.path().join("snapshot.png");
    slide
        .read_region(0, 900, 1400, 300, 300)
        .unwrap()
        .save(&snapshot)
        .unwrap();
    let mut h = harness_with_model(Some(snapshot.clone()), data.path(), Some(model));
    settle(&mut h);
    let result = h
        .state()
        .magnification()
        .result_for(&snapshot)
        .expect("an estimate ran");
    let estimate = result
        .as_ref()
        .expect("the estimate succeeded")
        .estimate()
        .clone();
    assert!((estimate.magnification - 20.0).abs() < 1e-3 && estimate.crops >= 1);
    assert!((estimate.mpp * estimate.magnification - 10.0).abs() < 1e-9);
    h.get_by_label_contains("Estimated"); // the badge over the view
    let shown = format!("{:.3} µm/px", estimate.mpp);
    assert_eq!(
        h.query_all_by_label_contains(&shown).count(),
        2,
        "badge and side panel show {shown}"
    );
    h.get_by_label("Estimate magnification");
    h.get_by_label("Use the estimate as this file's µm/px")
        .click();
    h.step();
    settle(&mut h);
    let calibrated = h.state().view().unwrap().mpp().unwrap().mean();
    assert!((calibrated - estimate.mpp).abs() < 1e-9, "{calibrated}");
}
