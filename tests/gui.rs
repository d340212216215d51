//! The window, driven headless with egui_kittest on wgpu (lavapipe on CI): open the bundled sample,
//! zoom with scripted input, check the status bar and overview, compare a snapshot image; the DMSL
//! heatmap overlay (drawn by a WGSL shader) checked pixel by pixel against its grid, and computed from
//! the side panel.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};
use histolens::dmsl::heatmap::{CellState, Heatmap, HeatmapGrid, HeatmapHeader, content_id};
use histolens::gui::heatmap;
use histolens::gui::{HistolensApp, LaunchOptions};
use histolens::util::colormap::Colormap;

fn harness(path: Option<PathBuf>, data_dir: &Path) -> Harness<'static, HistolensApp> {
    harness_with_model(path, data_dir, None)
}

/// The DMSL model the windows of most tests are given: a file that does not exist, so that what the
/// heatmap section shows does not depend on whether the demo model is bundled.
fn no_dmsl_model(data_dir: &Path) -> Option<PathBuf> {
    Some(data_dir.join("dmsl.safetensors"))
}

fn harness_with_model(
    path: Option<PathBuf>,
    data_dir: &Path,
    model: Option<PathBuf>,
) -> Harness<'static, HistolensApp> {
    harness_with_models(path, data_dir, model, no_dmsl_model(data_dir))
}

fn harness_with_models(
    path: Option<PathBuf>,
    data_dir: &Path,
    model: Option<PathBuf>,
    dmsl_model: Option<PathBuf>,
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
                    dmsl_model: dmsl_model.clone(),
                    compute_heatmap: false,
                    gradcam_follow: false,
                    label_paths: Vec::new(),
                    train_run: None,
                    bench: None,
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
    // Zoomed out on a slide without coarse levels, the overview has every pixel the screen shows.
    assert!(
        view.textures.is_empty(),
        "the overview stands in for the tiles"
    );
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
    assert!(!view.textures.is_empty(), "zoomed in, tiles were uploaded");
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

/// A gigapixel slide without a pyramid opens in bounded time (its overview sampled sparsely), and
/// an open can be cancelled from the toolbar, the slide that was open staying open.
#[test]
fn a_pyramidless_gigapixel_slide_opens_and_an_open_can_be_cancelled() {
    let data = tempfile::tempdir().unwrap();
    let huge = data.path().join("no-pyramid.tif");
    common::huge_tiled_tiff(&huge, 200_000);
    let mut h = harness(Some(common::sample_slide()), data.path());
    settle(&mut h);
    h.input_mut()
        .dropped_files
        .push(Arc::new(Dropped(huge.clone())));
    h.step();
    // The window answers while the file opens: the toolbar offers to cancel.
    h.get_by_label("Cancel").click_accesskit();
    h.run_steps(2);
    assert!(h.state().errors().is_empty(), "{:?}", h.state().errors());
    assert_eq!(
        h.state().view().unwrap().slide.path(),
        common::sample_slide(),
        "the sample stays open"
    );
    h.input_mut()
        .dropped_files
        .push(Arc::new(Dropped(huge.clone())));
    h.step();
    settle(&mut h);
    assert!(h.state().errors().is_empty(), "{:?}", h.state().errors());
    let view = h.state().view().unwrap();
    assert_eq!(view.slide.path(), huge);
    assert_eq!(view.slide.info().dimensions(), (200_000, 200_000));
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
    // The estimate's warnings can push the calibration below the panel's fold.
    h.get_by_role_and_label(egui::accesskit::Role::CheckBox, "µm/px")
        .scroll_to_me();
    h.run_steps(2);
    h.get_by_role_and_label(egui::accesskit::Role::CheckBox, "µm/px")
        .click_accesskit();
    h.run_steps(2);
    assert_eq!(
        h.state().view().unwrap().calibration_edit.mpp,
        Some(0.5),
        "the checkbox enables µm/px"
    );
    h.get_by_label("Apply calibration").scroll_to_me();
    h.run_steps(2);
    h.get_by_label("Apply calibration").click_accesskit();
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

fn random_magnification_model(dir: &Path) -> PathBuf {
    common::constant_magnification_model(dir, 20.0)
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
        .estimate
        .clone();
    // The network says 20x of whatever it reads: of the image itself, that is 20x times the zoom
    // of the last reading (chosen by the network fused with the nuclei ruler).
    assert!(
        (10.0 / estimate.network_mpp - 20.0 * estimate.zoom).abs() < 1e-3 && estimate.crops >= 1,
        "{estimate:?}"
    );
    assert!((estimate.mpp * estimate.magnification - 10.0).abs() < 1e-9);
    h.get_by_label_contains("Estimated"); // the badge over the view
    let shown = format!("{:.3} µm/px", estimate.mpp);
    assert!(
        h.query_all_by_label_contains(&shown).count() >= 2,
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

/// A snapshot that states its pixel size is compared with the estimate as a slide is: the badge
/// leads with the stated size and its source, the panel says MISMATCH or agrees with the difference.
#[test]
fn a_snapshot_with_a_pixel_size_is_checked_against_it() {
    let data = tempfile::tempdir().unwrap();
    let model = random_magnification_model(data.path());
    let img = common::featureless_tissue(200);
    for (name, stated, verdict) in [
        ("far.png", 0.3125, "MISMATCH"),
        ("near.png", 0.48, "agrees (+4%)"),
    ] {
        let snapshot = data.path().join(name);
        common::png_with_phys(&img, &snapshot, stated);
        let mut h = harness_with_model(Some(snapshot.clone()), data.path(), Some(model.clone()));
        settle(&mut h);
        let check = h
            .state()
            .magnification()
            .result_for(&snapshot)
            .expect("an estimate ran")
            .as_ref()
            .expect("the estimate succeeded")
            .clone();
        // pHYs stores whole pixels per metre.
        assert!((check.metadata_mpp.unwrap() - stated).abs() < 1e-6);
        h.get_by_label_contains(&format!(
            "{stated:.3} µm/px (PNG pHYs chunk) · estimate 20.0x"
        ));
        // The badge and the panel's Metadata row both give the verdict.
        assert_eq!(h.query_all_by_label_contains(verdict).count(), 2, "{name}");
        // The scale bar follows the stated size (no "est." mark).
        assert!((h.state().view().unwrap().mpp().unwrap().x - stated).abs() < 1e-6);
    }
}

/// Calibrating from a scale bar: a line drawn along the bar and its typed length set the file's
/// µm/px, which the scale bar then follows.
#[test]
fn a_scale_bar_sets_the_pixel_size() {
    let data = tempfile::tempdir().unwrap();
    let snapshot = data.path().join("published-figure.png");
    common::featureless_tissue(400).save(&snapshot).unwrap();
    let mut h = harness(Some(snapshot), data.path());
    settle(&mut h);
    assert!(h.state().view().unwrap().mpp().is_none());
    h.get_by_label("Measure a scale bar").scroll_to_me();
    h.run_steps(2);
    h.get_by_label("Measure a scale bar").click_accesskit();
    h.run_steps(2);
    assert!(
        h.state().view().unwrap().measuring,
        "drags now draw the line"
    );
    // The line a drag along a 200 px bar leaves, and the length printed beside the bar.
    let view = h.state_mut().view_mut().unwrap();
    view.scale_line = Some(([50.0, 350.0], [250.0, 350.0]));
    view.scale_bar_um = 50.0;
    h.run_steps(2);
    h.get_by_label("200.0 px");
    h.get_by_label("Set µm/px from the bar").scroll_to_me();
    h.run_steps(2);
    h.get_by_label("Set µm/px from the bar").click_accesskit();
    h.run_steps(3);
    let view = h.state().view().unwrap();
    assert!((view.mpp().unwrap().x - 0.25).abs() < 1e-12);
    assert!(!view.measuring && view.scale_line.is_none());
}

/// A snapshot of known scale saves its camera; the next snapshot of the same frame size is offered
/// that camera, and applying it at another objective sets its µm/px.
#[test]
fn a_camera_saved_from_one_snapshot_calibrates_the_next() {
    let data = tempfile::tempdir().unwrap();
    let img = common::featureless_tissue(240);
    let known = data.path().join("known-10x.png");
    common::png_with_phys(&img, &known, 0.65);
    let mut h = harness(Some(known), data.path());
    settle(&mut h);
    h.get_by_label("Calibration").scroll_to_me();
    h.run_steps(2);
    h.get_by_label("Calibration").click_accesskit();
    h.run_steps(2);
    let view = h.state_mut().view_mut().unwrap();
    view.new_camera_name = "lab scope".into();
    view.camera_objective = 10.0;
    h.run_steps(2);
    h.get_by_label("Save as camera").scroll_to_me();
    h.run_steps(2);
    h.get_by_label("Save as camera").click_accesskit();
    h.run_steps(2);
    let saved = histolens::slide::CameraStore::load(data.path().join("cameras.json")).unwrap();
    let camera = saved.get("lab scope").expect("the camera is saved");
    assert!((camera.mpp_at(40.0) - 0.65 / 4.0).abs() < 1e-6);
    assert_eq!(camera.frame, Some((240, 240)));
    drop(h);

    let next = data.path().join("next.png");
    img.save(&next).unwrap();
    let mut h = harness(Some(next), data.path());
    settle(&mut h);
    assert!(h.state().view().unwrap().mpp().is_none());
    // Offered by its frame size.
    assert_eq!(h.state().view().unwrap().camera_name, "lab scope");
    h.state_mut().view_mut().unwrap().camera_objective = 40.0;
    h.run_steps(2);
    h.get_by_label_contains("= 0.1625 µm/px");
    h.get_by_label("Apply camera").scroll_to_me();
    h.run_steps(2);
    h.get_by_label("Apply camera").click_accesskit();
    h.run_steps(2);
    let m = h
        .state()
        .view()
        .unwrap()
        .mpp()
        .expect("the camera calibrates the file");
    assert!((m.x - 0.1625).abs() < 1e-6, "{}", m.x);
}

/// A checkerboard heatmap over the sample slide in level-0 cells of 250 px: P(high) is 1 where
/// column + row is even, 0 elsewhere; cell (1, 1) is still pending and (2, 1) is background.
fn checkerboard(slide: &Path) -> Heatmap {
    let info = histolens::slide::Slide::open(slide).unwrap().info().clone();
    let grid = HeatmapGrid::new(info.dimensions(), 250.0);
    let mut h = Heatmap::new(HeatmapHeader {
        slide: slide.display().to_string(),
        slide_version: histolens::dmsl::heatmap::slide_version(slide),
        model_id: content_id(b"checkerboard"),
        classes: vec!["low".into(), "high".into()],
        mpp: 0.499,
        field_um: 250.0 * 0.499,
        grid,
    });
    for cell in 0..grid.len() {
        let (c, r) = (cell % grid.cols as usize, cell / grid.cols as usize);
        let p = if (c + r) % 2 == 0 { 1.0 } else { 0.0 };
        h.probs[cell * 2] = 1.0 - p;
        h.probs[cell * 2 + 1] = p;
        h.state[cell] = match (c, r) {
            (1, 1) => CellState::Pending,
            (2, 1) => CellState::Background,
            _ => CellState::Done,
        };
    }
    h
}

fn close(a: [u8; 3], b: [u8; 3], tol: i32) -> bool {
    a.iter()
        .zip(b)
        .all(|(&x, y)| (i32::from(x) - i32::from(y)).abs() <= tol)
}

/// Renders the window and checks, at points inside every visible cell, that the pixel has the
/// colormap's top colour on "high" cells, its bottom colour on "low" ones, and neither on cells with
/// no result. Points under the overview, the badge, the legend and the scale bar are skipped. Returns
/// how many points were checked.
fn check_overlay_alignment(h: &mut Harness<'_, HistolensApp>, heatmap: &Heatmap) -> usize {
    let img = h.render().expect("the window renders");
    let ppp = h.ctx.pixels_per_point();
    let view = h.state().view().unwrap();
    let vp = view.viewport.unwrap();
    let canvas = view.canvas_rect.expect("the canvas is drawn");
    let mut skip = vec![
        view.overview_rect.unwrap().expand(6.0),
        // The scale bar and the legend.
        egui::Rect::from_min_size(
            canvas.left_bottom() - egui::vec2(0.0, 60.0),
            egui::vec2(300.0, 60.0),
        ),
        egui::Rect::from_min_size(
            canvas.right_top() - egui::vec2(230.0, 0.0),
            egui::vec2(230.0, 70.0),
        ),
    ];
    // The magnification badge ("Estimated …", or the stated size and the "estimate").
    skip.extend(
        h.query_all_by_label_contains("Estimat")
            .chain(h.query_all_by_label_contains("estimate"))
            .map(|n| n.rect().expand(16.0)),
    );
    let top = Colormap::Viridis.rgb8(1.0);
    let bottom = Colormap::Viridis.rgb8(0.0);
    let g = heatmap.header.grid;
    let (slide_w, slide_h) = view.slide.info().dimensions();
    let mut checked = 0;
    for cell in 0..g.len() {
        let (x0, y0) = g.origin(cell);
        for fy in [0.1, 0.3, 0.5, 0.7, 0.9] {
            for fx in [0.1, 0.3, 0.5, 0.7, 0.9] {
                let (x, y) = (x0 + fx * g.cell, y0 + fy * g.cell);
                if x >= slide_w as f64 || y >= slide_h as f64 {
                    continue; // the overhang beyond the slide is not drawn
                }
                let s = vp.slide_to_screen([x, y]);
                let p = egui::pos2(canvas.min.x + s[0] as f32, canvas.min.y + s[1] as f32);
                if !canvas.shrink(2.0).contains(p) || skip.iter().any(|r| r.contains(p)) {
                    continue;
                }
                let px = img.get_pixel((p.x * ppp) as u32, (p.y * ppp) as u32).0;
                let rgb = [px[0], px[1], px[2]];
                match heatmap.probs_at(cell) {
                    Some(probs) => {
                        let want = if probs[1] > 0.5 { top } else { bottom };
                        assert!(
                            close(rgb, want, 4),
                            "cell {cell} at {p:?} ({fx}, {fy}): {rgb:?}, expected {want:?}"
                        );
                    }
                    None => assert!(
                        !close(rgb, top, 12) && !close(rgb, bottom, 12),
                        "cell {cell} has no result but is coloured at {p:?}: {rgb:?}"
                    ),
                }
                checked += 1;
            }
        }
    }
    checked
}

/// The overlay over the sample at fit and zoomed in on a cell corner: every visible cell's pixels
/// carry its own colour (the grid follows the viewport), unknown cells stay transparent.
#[test]
fn heatmap_overlay_is_aligned_with_the_slide() {
    let data = tempfile::tempdir().unwrap();
    let slide = common::sample_slide();
    let mut h = harness(Some(slide.clone()), data.path());
    settle(&mut h);
    let heatmap = checkerboard(&slide);
    {
        let state = h.state_mut().heatmap_mut();
        state.set_heatmap(&slide, heatmap.clone());
        state.opacity = 1.0;
        state.threshold = 0.0;
        state.colormap = Colormap::Viridis;
        state.visible = true;
    }
    h.step();
    settle(&mut h);
    // The legend names the class shown (the last one by default).
    h.get_by_label("P(high)");
    let checked = check_overlay_alignment(&mut h, &heatmap);
    assert!(checked > 1000, "{checked} points checked at fit");
    mask_status_bar(&mut h);
    h.snapshot("heatmap_overlay_fit");

    // 8x the fit scale, centred on the corner shared by cells (3, 5), (4, 5), (3, 6) and (4, 6).
    {
        let view = h.state_mut().view_mut().unwrap();
        let mut vp = view.viewport.unwrap();
        vp.scale *= 8.0;
        vp.center = [1000.0, 1500.0];
        view.viewport = Some(vp);
    }
    h.step();
    settle(&mut h);
    let checked = check_overlay_alignment(&mut h, &heatmap);
    assert!(checked >= 40, "{checked} points checked zoomed in");
    mask_status_bar(&mut h);
    h.snapshot("heatmap_overlay_zoomed");

    // A threshold of 0.5 hides the "low" cells (the slide shows through) and keeps the "high" ones.
    h.state_mut().heatmap_mut().threshold = 0.5;
    h.step();
    h.step();
    let img = h.render().unwrap();
    let ppp = h.ctx.pixels_per_point();
    let view = h.state().view().unwrap();
    let (vp, canvas) = (view.viewport.unwrap(), view.canvas_rect.unwrap());
    let pixel = |x: f64, y: f64| {
        let s = vp.slide_to_screen([x, y]);
        let p = img.get_pixel(
            ((canvas.min.x + s[0] as f32) * ppp) as u32,
            ((canvas.min.y + s[1] as f32) * ppp) as u32,
        );
        [p.0[0], p.0[1], p.0[2]]
    };
    let high = pixel(1100.0, 1600.0); // cell (4, 6)
    let low = pixel(900.0, 1600.0); // cell (3, 6)
    assert!(close(high, Colormap::Viridis.rgb8(1.0), 4), "{high:?}");
    assert!(
        !close(low, Colormap::Viridis.rgb8(0.0), 12)
            && !close(low, Colormap::Viridis.rgb8(1.0), 12),
        "{low:?}"
    );
}

/// Masks the status bar (timings and cache sizes vary between runs).
fn mask_status_bar(h: &mut Harness<'_, HistolensApp>) {
    let status = h
        .query_all_by_label_contains("%")
        .map(|n| n.rect())
        .max_by(|a, b| a.min.y.total_cmp(&b.min.y))
        .expect("the status bar shows the zoom in %");
    h.mask(egui::Rect::from_min_max(
        egui::pos2(0.0, status.min.y - 4.0),
        egui::pos2(1100.0, 700.0),
    ));
}

/// A DMSL model with random weights (the GUI test checks the plumbing, not the accuracy): ResNet-18
/// branches at 5x and 2.5x over a 256 µm field (128 and 64 px inputs), three classes.
fn random_dmsl_model(dir: &Path) -> PathBuf {
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};
    use histolens::data::pairs::PairGeometry;
    use histolens::dmsl::model::DmslLayout;
    use histolens::nn::checkpoint::{CheckpointMeta, FORMAT_VERSION, Normalization, to_bytes};
    let layout = DmslLayout {
        geometry: PairGeometry {
            high_magnification: 5.0,
            low_magnification: 2.5,
            field_um: 256.0,
        },
        branch_magnifications: vec![5.0, 2.5],
        weights: vec![0.5, 0.5],
    };
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    histolens::nn::dmsl::Dmsl::new(histolens::nn::Arch::RESNET18, 3, &layout.weights, vb).unwrap();
    let meta = CheckpointMeta {
        format_version: FORMAT_VERSION,
        arch: histolens::nn::Arch::RESNET18,
        task: "dmsl".into(),
        input_size: [128, 128],
        normalization: Normalization::IMAGENET,
        classes: vec!["background".into(), "epithelium".into(), "stroma".into()],
        magnification_range: None,
        constants: layout.to_constants(),
        provenance: Default::default(),
    };
    let path = dir.join("random-dmsl.safetensors");
    std::fs::write(&path, to_bytes(&vars, &meta, true).unwrap()).unwrap();
    path
}

/// The panel's compute button runs the model over the slide's tissue: the progress reaches the tissue
/// count, every classified cell's probabilities sum to 1, the sidecar is written and brings the
/// heatmap back when the slide is opened again, and the exports write their files.
#[test]
fn heatmap_is_computed_from_the_panel() {
    let data = tempfile::tempdir().unwrap();
    // A copy of the sample in the test's folder (the heatmap goes to its cache subfolder).
    let slide = data.path().join("sample.svs");
    std::fs::copy(common::sample_slide(), &slide).unwrap();
    let model = random_dmsl_model(data.path());
    // No magnification estimate on opening (a model file that does not exist): not what is tested.
    let no_magnification = Some(data.path().join("magnification.safetensors"));
    let mut h = harness_with_models(
        Some(slide.clone()),
        data.path(),
        no_magnification.clone(),
        Some(model.clone()),
    );
    settle(&mut h);
    assert!(
        h.state().heatmap().heatmap().is_none(),
        "no heatmap before computing"
    );
    h.get_by_label_contains("random-dmsl.safetensors");
    h.get_by_label("Compute heatmap").click();
    h.step();
    assert!(h.state().heatmap().is_computing(), "the worker started");
    let started = std::time::Instant::now();
    while h.state().heatmap().is_computing() {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the heatmap did not finish: {:?}",
            h.state().heatmap().progress()
        );
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    h.step();
    let state = h.state().heatmap();
    assert_eq!(state.message, None);
    let heatmap = state.heatmap().expect("a heatmap").clone();
    let (done, tissue) = state.progress();
    assert!(done > 0 && done == tissue, "{done} / {tissue}");
    assert!(heatmap.is_complete());
    assert_eq!(heatmap.count(CellState::Done), done);
    assert!(heatmap.count(CellState::Background) > 0, "glass is skipped");
    for cell in 0..heatmap.header.grid.len() {
        if let Some(p) = heatmap.probs_at(cell) {
            let sum: f32 = p.iter().sum();
            assert!((sum - 1.0).abs() < 1e-4, "cell {cell} sums to {sum}");
        }
    }
    let sidecar = state.sidecar().expect("a sidecar").to_path_buf();
    assert!(
        sidecar.starts_with(data.path()) && sidecar.is_file(),
        "{}",
        sidecar.display()
    );
    h.get_by_label_contains(&format!("{done} / {tissue} tissue fields"));

    // The exports, without their dialogs.
    let out = data.path().join("out");
    let thumb = histolens::slide::Slide::open(&slide)
        .unwrap()
        .thumbnail(256)
        .unwrap();
    heatmap::export_png(
        &heatmap,
        1,
        Colormap::Magma,
        Some(&thumb),
        &out.join("h.png"),
    )
    .unwrap();
    heatmap::export_npy(&heatmap, &out.join("h.npy")).unwrap();
    heatmap::export_geojson(&heatmap, &out.join("h.geojson")).unwrap();
    let png = image::open(out.join("h.png")).unwrap();
    assert!(png.width() >= 220 && png.height() > 46);
    assert_eq!(
        &std::fs::read(out.join("h.npy")).unwrap()[..6],
        b"\x93NUMPY"
    );
    let geo: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("h.geojson")).unwrap()).unwrap();
    assert_eq!(geo["features"].as_array().unwrap().len(), done);
    drop(h);

    // Opened again: the finished heatmap comes back from the sidecar without computing.
    let mut h = harness_with_models(
        Some(slide.clone()),
        data.path(),
        no_magnification,
        Some(model),
    );
    settle(&mut h);
    let state = h.state().heatmap();
    assert!(!state.is_computing());
    let back = state.heatmap().expect("the sidecar was found");
    assert_eq!(back.header, heatmap.header);
    assert_eq!(back.state, heatmap.state);
    let bits = |h: &Heatmap| h.probs.iter().map(|p| p.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(back), bits(&heatmap));
    assert_eq!(state.progress(), (done, tissue));
}

/// A file without a pixel size cannot be computed (the panel says why); one too coarse for the model
/// gets a message from the worker instead of a heatmap.
#[test]
fn heatmap_needs_a_fine_enough_pixel_size() {
    let data = tempfile::tempdir().unwrap();
    let img = data.path().join("snap.png");
    histolens::slide::Slide::open(common::sample_slide())
        .unwrap()
        .read_region(0, 900, 1400, 600, 600)
        .unwrap()
        .save(&img)
        .unwrap();
    let model = random_dmsl_model(data.path());
    let no_magnification = Some(data.path().join("magnification.safetensors"));
    let mut h = harness_with_models(
        Some(img.clone()),
        data.path(),
        no_magnification.clone(),
        Some(model.clone()),
    );
    settle(&mut h);
    h.get_by_label("needs the µm/px");
    assert!(
        h.get_by_label("Compute heatmap")
            .accesskit_node()
            .is_disabled(),
        "no µm/px, no heatmap"
    );
    drop(h);

    // 8 µm/px is 1.25x: the model wants 5x fields (4x upsampling; at most 2x is allowed).
    let mut store =
        histolens::slide::CalibrationStore::load(data.path().join("calibrations.json")).unwrap();
    store
        .set(
            &img,
            histolens::slide::Calibration {
                mpp: Some(8.0),
                objective_power: None,
            },
        )
        .unwrap();
    let mut h = harness_with_models(Some(img), data.path(), no_magnification, Some(model));
    settle(&mut h);
    h.get_by_label("Compute heatmap").click();
    h.step();
    settle(&mut h);
    let message = h.state().heatmap().message.clone().expect("a message");
    assert!(message.contains("too coarse"), "{message}");
    assert!(h.state().heatmap().heatmap().is_none());
    h.get_by_label_contains("too coarse");
}

/// The Grad-CAM panel on the bundled sample with the shipped demo model: the paper's grid of four maps
/// (two magnifications x first and last convolution), each the size of its branch's input, in [0, 1].
#[test]
fn gradcam_panel_shows_four_maps_for_the_view_centre() {
    let data = tempfile::tempdir().unwrap();
    let dmsl = histolens::default_dmsl_model().expect("assets/models/dmsl-demo.safetensors");
    // The bundled magnification model too: the snapshot must not show a temporary path.
    let mut h = harness_with_models(Some(common::sample_slide()), data.path(), None, Some(dmsl));
    settle(&mut h);
    h.get_by_label("Grad-CAM").click();
    h.run_steps(2);
    // Epithelium: what the view centre shows.
    h.state_mut().gradcam_mut().class = 1;
    h.get_by_label("Grad-CAM of the view centre").click();
    h.step();
    let started = std::time::Instant::now();
    while h.state().gradcam().is_busy() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "Grad-CAM did not finish"
        );
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    h.run_steps(3);
    let state = h.state().gradcam();
    assert_eq!(state.message, None);
    let tiles = state.tiles().expect("maps");
    let titles: Vec<&str> = tiles.iter().map(|t| t.title.as_str()).collect();
    assert_eq!(
        titles,
        [
            "20x · first conv",
            "20x · last conv",
            "5x · first conv",
            "5x · last conv"
        ]
    );
    for t in tiles {
        let (w, hgt) = t.image.dimensions();
        assert_eq!(t.map.len(), (w * hgt) as usize, "{}", t.title);
        assert!(t.map.iter().all(|v| (0.0..=1.0).contains(v)), "{}", t.title);
    }
    assert_eq!(tiles[0].image.width(), 128);
    assert_eq!(tiles[2].image.width(), 32);
    h.get_by_label("5x · last conv");
    h.snapshot("gradcam_panel");

    // Zoomed onto the field, then a click on the 20x last-convolution map lays it over the slide:
    // inside the field each map pixel shows its own colour, outside it the slide is untouched.
    let tile = h.state().gradcam().tiles().unwrap()[1].clone();
    let ([fx, fy], side) = tile.field;
    {
        let view = h.state_mut().view_mut().unwrap();
        let mut vp = view.viewport.unwrap();
        vp.center = [fx + side / 2.0, fy + side / 2.0];
        vp.scale = 320.0 / side;
        view.viewport = Some(vp);
    }
    h.run_steps(2);
    settle(&mut h);
    let before = h.render().unwrap();
    h.get_by_label("Show 20x · last conv over the slide")
        .click();
    h.run_steps(2);
    assert_eq!(h.state().gradcam().on_slide, Some(1));
    h.state_mut().gradcam_mut().opacity = 1.0;
    h.run_steps(2);
    let after = h.render().unwrap();
    let ppp = h.ctx.pixels_per_point();
    let view = h.state().view().unwrap();
    let (vp, canvas) = (view.viewport.unwrap(), view.canvas_rect.unwrap());
    let at = |img: &image::RgbaImage, x: f64, y: f64| {
        let s = vp.slide_to_screen([x, y]);
        let p = img.get_pixel(
            ((canvas.min.x + s[0] as f32) * ppp) as u32,
            ((canvas.min.y + s[1] as f32) * ppp) as u32,
        );
        [p.0[0], p.0[1], p.0[2]]
    };
    let grid = tile.grid();
    assert_eq!((grid.cols, grid.rows), (128, 128));
    let mut checked = 0;
    for row in (3..128).step_by(9) {
        for col in (3..128).step_by(9) {
            let x = grid.origin[0] + (col as f64 + 0.5) * grid.cell;
            let y = grid.origin[1] + (row as f64 + 0.5) * grid.cell;
            let want = Colormap::Magma.rgb8(tile.map[row * 128 + col]);
            let got = at(&after, x, y);
            assert!(
                close(got, want, 4),
                "map pixel ({col}, {row}): {got:?}, expected {want:?}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 196, "{checked}");
    // Just outside the field, left and below: the slide as it was.
    for (x, y) in [
        (fx - 4.0, fy + side / 2.0),
        (fx + side / 2.0, fy + side + 4.0),
    ] {
        assert_eq!(
            at(&after, x, y),
            at(&before, x, y),
            "outside the field at ({x}, {y})"
        );
    }
    // As one would look at it: half opaque, the weakest fifth hidden.
    {
        let cam = h.state_mut().gradcam_mut();
        cam.opacity = 0.5;
        cam.threshold = 0.2;
    }
    h.run_steps(2);
    mask_status_bar(&mut h);
    h.snapshot("gradcam_over_the_slide");
}

/// Steps frames until `done` holds, failing after `limit`.
fn step_until(
    h: &mut Harness<'_, HistolensApp>,
    limit: Duration,
    what: &str,
    done: impl Fn(&HistolensApp) -> bool,
) {
    let started = std::time::Instant::now();
    while !done(h.state()) {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// From dropped folders to a trained model, as a user goes: three folders of images are dropped,
/// all labelled 20x (Ctrl+A, "Set magnification"), dealt to splits by folder, and built into a
/// magnification dataset, which opens in the training panel. There a real (short) training runs: the
/// curve gets points, it pauses and continues, stops on request with its checkpoint on disk, the run
/// folder reads back as the CLI reads it, and "Use this model" makes the viewer use the trained model.
#[test]
fn training_panel_trains_stops_and_uses_the_model() {
    let data = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    let folders: Vec<PathBuf> = (1..=3)
        .map(|k| images.path().join(format!("case-{k}")))
        .collect();
    for (k, f) in folders.iter().enumerate() {
        write_images(f, &format!("c{k}"), 4, [120 + 40 * k as u8, 70, 150]);
    }
    let mut h = harness(None, data.path());
    h.run_steps(2);
    for f in &folders {
        h.input_mut()
            .dropped_files
            .push(Arc::new(Dropped(f.clone())));
    }
    h.step();
    step_until(&mut h, Duration::from_secs(60), "thumbnails", |a| {
        !a.labels().is_busy()
    });
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.run_steps(2);
    assert_eq!(h.state().labels().selected.len(), 12);
    h.get_by_label("Set magnification").click();
    h.run_steps(2);
    h.get_by_label("Assign splits").click();
    h.run_steps(2);
    h.get_by_label("Build magnification dataset").click();
    h.run_steps(2);
    assert_eq!(
        h.state().mode(),
        histolens::gui::Mode::Training,
        "{:?}",
        h.state().labels().message
    );
    let manifest = PathBuf::from(&h.state().training().form.data);
    let records: histolens::data::manifest::Manifest =
        histolens::data::manifest::Manifest::load(&manifest).unwrap();
    assert_eq!(records.records.len(), 12);
    assert!(records.records.iter().all(|r| r.magnification == 20.0));
    records.check_disjoint().unwrap();
    let run_dir = data.path().join("runs").join("panel-run");
    {
        let f = &mut h.state_mut().training_mut().form;
        assert_eq!(f.task, histolens::gui::training::Task::Magnification);
        f.run_dir = run_dir.display().to_string();
        f.arch = histolens::nn::Arch::RESNET18;
        f.input_size = 40;
        f.batch = 4;
        // Six epochs with the ASM, then three with the constant m: stopped in round 2, the model is
        // usable (a round-1 checkpoint has no m yet, and the panel does not offer it).
        f.epochs = 9;
        f.steps_per_epoch = 1;
    }
    h.run_steps(2);
    h.get_by_label("Start training").click();
    h.run_steps(2);
    assert!(
        h.state().training().is_running(),
        "{:?}",
        h.state().training().message
    );
    step_until(&mut h, Duration::from_secs(300), "two epochs", |a| {
        a.training().curve.len() >= 2
    });
    let points = h.state().training().curve.clone();
    assert!(
        points
            .iter()
            .all(|p| p.train_loss.is_finite() && p.val_loss.is_some())
    );
    // Pause holds the run between steps; Continue lets it go on.
    h.get_by_label("Pause").click();
    h.run_steps(2);
    assert!(h.state().training().is_paused());
    h.get_by_label("Continue").click();
    h.run_steps(2);
    assert!(!h.state().training().is_paused());
    step_until(&mut h, Duration::from_secs(300), "round 2", |a| {
        a.training().curve.len() >= 7
    });
    h.get_by_label("Stop").click();
    step_until(&mut h, Duration::from_secs(300), "the run to stop", |a| {
        !a.training().is_running()
    });
    let state = h.state().training();
    assert_eq!(state.message, None);
    assert!(
        state.log.iter().any(|l| l.starts_with("stopped after")),
        "{:?}",
        state.log
    );
    assert!(run_dir.join("last.safetensors").is_file());
    assert!(run_dir.join("run.json").is_file());
    let model = state.model.clone().expect("a model");
    assert!(model.is_file());
    // The evaluation report of the stopped run, on the test split the labels view dealt.
    let report = state
        .report
        .as_ref()
        .unwrap_or_else(|| panic!("an evaluation report: {:?}", state.log));
    assert!(
        report.table().starts_with("test split"),
        "{}",
        report.table()
    );
    assert!(run_dir.join("report.json").is_file());
    // The same run, read as the CLI reads it.
    let summary = histolens::runs::read_run(&run_dir).unwrap();
    assert_eq!(summary.config.task(), "magnification");
    assert!(summary.epochs_done() >= 7 && summary.epochs_done() < 9);
    h.get_by_label("Use this model").click();
    h.run_steps(2);
    assert_eq!(h.state().mode(), histolens::gui::Mode::Viewer);
    assert_eq!(h.state().magnification_model(), Some(model.as_path()));
}

/// Writes `n` small images named `{stem}-{i}.png` into `dir`, each a different colour.
fn write_images(dir: &Path, stem: &str, n: u32, tint: [u8; 3]) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let img = image::RgbImage::from_fn(64, 48, |x, y| {
            let v = ((x + y + i * 20) % 64) as u8;
            image::Rgb([
                tint[0].saturating_add(v),
                tint[1].saturating_add(v),
                tint[2],
            ])
        });
        img.save(dir.join(format!("{stem}-{i}.png"))).unwrap();
    }
}

/// Dropping folders: class sub-folders come labelled, a folder of loose images gets its name
/// proposed; number keys label image by image, Ctrl+Z undoes, and the manifest on disk says the same
/// as the window.
#[test]
fn dropped_folders_are_labelled_by_keyboard_with_undo() {
    use histolens::labels::{Label, LabelSet};
    let data = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    let tiles = images.path().join("tiles");
    write_images(&tiles.join("epithelium"), "epi", 2, [200, 80, 120]);
    write_images(&tiles.join("stroma"), "str", 2, [230, 150, 190]);
    let loose = images.path().join("case-7");
    write_images(&loose, "loose", 4, [120, 60, 160]);
    let mut h = harness(None, data.path());
    h.run_steps(2);
    for p in [&tiles, &loose] {
        h.input_mut()
            .dropped_files
            .push(Arc::new(Dropped(p.clone())));
    }
    h.step();
    assert_eq!(h.state().mode(), histolens::gui::Mode::Labels);
    step_until(&mut h, Duration::from_secs(60), "thumbnails", |a| {
        !a.labels().is_busy()
    });
    h.run_steps(3);
    let set = h.state().labels().label_set().expect("a label set");
    assert_eq!(set.entries().len(), 8);
    assert_eq!(set.classes(), ["epithelium", "stroma"]);
    assert_eq!(set.counts().unlabelled, 4);
    h.get_by_label("Label \"case-7\" (4 images) as case-7");

    // Click the first loose image, then 2 (stroma), 1 (epithelium): each key labels the image under
    // the cursor and moves on.
    h.get_by_label("loose-0.png: —").click();
    h.run_steps(2);
    h.key_press(egui::Key::Num2);
    h.run_steps(2);
    h.key_press(egui::Key::Num1);
    h.run_steps(2);
    let label_of = |h: &Harness<'_, HistolensApp>, name: &str| {
        let set = h.state().labels().label_set().unwrap();
        set.entries()
            .iter()
            .find(|e| e.path.ends_with(name))
            .and_then(|e| e.label.clone())
    };
    assert_eq!(
        label_of(&h, "loose-0.png"),
        Some(Label::Class("stroma".into()))
    );
    assert_eq!(
        label_of(&h, "loose-1.png"),
        Some(Label::Class("epithelium".into()))
    );
    // Undo takes the last label off; the arrow keys move without labelling.
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Z);
    h.run_steps(2);
    assert_eq!(label_of(&h, "loose-1.png"), None);
    // The cursor stayed on loose-2; the arrow moves it on without labelling.
    h.key_press(egui::Key::ArrowRight);
    h.run_steps(2);
    h.key_press(egui::Key::Num1);
    h.run_steps(2);
    assert_eq!(label_of(&h, "loose-2.png"), None);
    assert_eq!(
        label_of(&h, "loose-3.png"),
        Some(Label::Class("epithelium".into()))
    );

    // The manifest on disk, read afresh, holds exactly what the window shows.
    let manifest = h.state().labels().manifest.clone();
    let on_disk = LabelSet::open_or_create(&manifest).unwrap();
    let in_window = h.state().labels().label_set().unwrap();
    assert_eq!(on_disk.entries(), in_window.entries());
    h.get_by_label("loose-3.png: epithelium");
    // The bottom strip (the status bar's frame time varies between runs).
    h.mask(egui::Rect::from_min_max(
        egui::pos2(0.0, 670.0),
        egui::pos2(1100.0, 700.0),
    ));
    h.snapshot("labels_view");
}

/// Drags a rectangle on the canvas from `a` to `b` (screen points).
fn drag(h: &mut Harness<'_, HistolensApp>, a: egui::Pos2, b: egui::Pos2) {
    h.hover_at(a);
    h.step();
    h.drag_at(a);
    h.step();
    for t in [0.25, 0.5, 0.75, 1.0] {
        h.hover_at(a + (b - a) * t);
        h.step();
    }
    h.drop_at(b);
    h.run_steps(2);
}

/// Rectangles drawn on a slide with a class are saved beside it as GeoJSON (QuPath's form), where
/// the drag put them, and once the slide is in the label set they become DMSL pairs inside them.
#[test]
fn regions_drawn_on_a_slide_become_dmsl_pairs() {
    use histolens::data::pairs::{PairConfig, PairGeometry, read_regions, regions_sidecar};
    let data = tempfile::tempdir().unwrap();
    // A copy of the sample, so that the regions file goes beside it in a temporary folder.
    let slide = data.path().join("sample.svs");
    std::fs::copy(common::sample_slide(), &slide).unwrap();
    let mut h = harness(Some(slide.clone()), data.path());
    settle(&mut h);
    h.get_by_label("Regions").click();
    h.run_steps(2);
    h.get_by_label("Rectangle").click();
    h.run_steps(2);
    let canvas = h.state().view().unwrap().canvas_rect.unwrap();
    let at = |fx: f32, fy: f32| canvas.min + egui::vec2(canvas.width() * fx, canvas.height() * fy);
    let drags = [
        ("epithelium", at(0.30, 0.25), at(0.45, 0.45)),
        ("stroma", at(0.55, 0.50), at(0.40, 0.70)),
    ];
    for (class, a, b) in drags {
        h.state_mut().regions_mut().class = class.into();
        drag(&mut h, a, b);
    }
    let vp = h.state().view().unwrap().viewport.unwrap();
    let to_slide = |p: egui::Pos2| {
        vp.screen_to_slide([f64::from(p.x - canvas.min.x), f64::from(p.y - canvas.min.y)])
    };
    let regions = read_regions(&regions_sidecar(&slide)).expect("the regions file");
    assert_eq!(regions, h.state().regions().regions);
    assert_eq!(regions.len(), 2);
    for (r, (class, a, b)) in regions.iter().zip(drags) {
        assert_eq!(r.class, class);
        let ([ax, ay], [bx, by]) = (to_slide(a), to_slide(b));
        let (xs, ys): (Vec<f64>, Vec<f64>) = r.polygon.iter().map(|p| (p[0], p[1])).unzip();
        let span = |v: &[f64]| {
            (
                v.iter().copied().fold(f64::MAX, f64::min),
                v.iter().copied().fold(f64::MIN, f64::max),
            )
        };
        let close = |u: f64, v: f64| (u - v).abs() < 1.0 / vp.scale + 1e-6;
        let ((x0, x1), (y0, y1)) = (span(&xs), span(&ys));
        assert!(
            close(x0, ax.min(bx)) && close(x1, ax.max(bx)),
            "{class}: x {x0}..{x1} vs {ax}..{bx}"
        );
        assert!(
            close(y0, ay.min(by)) && close(y1, ay.max(by)),
            "{class}: y {y0}..{y1} vs {ay}..{by}"
        );
    }
    mask_status_bar(&mut h);
    h.snapshot("regions_on_the_slide");

    // Into the label set, then pairs: two classes, every field inside its class's rectangle.
    h.get_by_label("Add this slide to the labels").click();
    h.run_steps(2);
    let set = h.state().labels().label_set().expect("a label set");
    assert!(set.entries().iter().any(|e| e.path == slide));
    let cfg = PairConfig {
        geometry: PairGeometry {
            high_magnification: 20.0,
            low_magnification: 5.0,
            field_um: 64.0,
        },
        ..PairConfig::default()
    };
    let out = data.path().join("pairs");
    let (manifest, dataset) = set.to_dmsl_pairs(&out, &cfg, 20.0, 1.0, |_| {}).unwrap();
    assert_eq!(dataset.classes, ["epithelium", "stroma"]);
    assert!(
        manifest.records.len() >= 4,
        "{} pairs",
        manifest.records.len()
    );
    for rec in &manifest.records {
        let v: Vec<f64> = rec.region.split(',').map(|s| s.parse().unwrap()).collect();
        let r = regions.iter().find(|r| r.class == rec.class).unwrap();
        assert!(
            r.contains_square(v[0] + 0.5, v[1] + 0.5, v[2] - 1.0),
            "{rec:?}"
        );
    }
}

/// BACH in the window, on a subset: its four class folders dropped → four classes with their
/// counts → a DMSL dataset at BACH's scale (0.42 µm/px, squashed pixels restored) → a short run
/// from ImageNet with the last block trained (live curve, evaluation) → "Use this model" → its
/// heatmap over the sample slide. BACH is CC BY-NC-ND: everything stays in temporary folders.
#[test]
fn bach_class_folders_train_a_dmsl_model_in_the_window() {
    let Some(shared) = common::shared_data("bach_class_folders_train_a_dmsl_model_in_the_window")
    else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    let bach = images.path().join("bach");
    for (class, prefix) in [
        ("benign", "b"),
        ("insitu", "is"),
        ("invasive", "iv"),
        ("normal", "n"),
    ] {
        std::fs::create_dir_all(bach.join(class)).unwrap();
        for i in 0..3 {
            let name = format!("{prefix}{i:03}.jpeg");
            std::os::unix::fs::symlink(
                shared.join("bach").join(class).join(&name),
                bach.join(class).join(&name),
            )
            .unwrap();
        }
    }
    let slide = data.path().join("sample.svs");
    std::fs::copy(common::sample_slide(), &slide).unwrap();
    let mut h = harness(None, data.path());
    h.run_steps(2);
    h.input_mut()
        .dropped_files
        .push(Arc::new(Dropped(bach.clone())));
    h.step();
    step_until(&mut h, Duration::from_secs(120), "thumbnails", |a| {
        !a.labels().is_busy()
    });
    h.run_steps(2);
    let set = h.state().labels().label_set().expect("a label set");
    assert_eq!(set.classes(), ["benign", "insitu", "invasive", "normal"]);
    assert_eq!(set.entries().len(), 12);
    {
        let labels = h.state_mut().labels_mut();
        labels.field_um = 128.0;
        labels.images_mpp = 0.42;
        labels.pixel_aspect = 0.75;
    }
    h.run_steps(2);
    h.get_by_label("Build DMSL dataset").click();
    h.run_steps(2);
    assert_eq!(
        h.state().mode(),
        histolens::gui::Mode::Training,
        "{:?}",
        h.state().labels().message
    );
    let manifest = PathBuf::from(&h.state().training().form.data);
    let pairs: histolens::data::manifest::Manifest<histolens::data::pairs::PairRecord> =
        histolens::data::manifest::Manifest::load(&manifest).unwrap();
    // 128 µm fields of 2048x1536 px at 0.42 µm/px: 6 x 5 per image, less those of glass.
    let n = pairs.records.len();
    assert!((300..=12 * 30).contains(&n), "{n} pairs");
    let run_dir = data.path().join("runs").join("bach");
    {
        let f = &mut h.state_mut().training_mut().form;
        assert_eq!(f.task, histolens::gui::training::Task::Dmsl);
        f.run_dir = run_dir.display().to_string();
        f.arch = histolens::nn::Arch::EFFICIENTNET_LITE0;
        f.start = histolens::gui::training::StartKind::Imagenet;
        f.start_file = shared
            .join("weights/efficientnet-lite0-imagenet.safetensors")
            .display()
            .to_string();
        f.freeze = histolens::dmsl::train::Freeze::AllButLastBlock;
        f.epochs = 2;
        f.batch = 8;
        f.steps_per_epoch = 4;
    }
    h.run_steps(2);
    h.get_by_label("Start training").click();
    h.run_steps(2);
    assert!(
        h.state().training().is_running(),
        "{:?}",
        h.state().training().message
    );
    step_until(&mut h, Duration::from_secs(600), "the run to end", |a| {
        !a.training().is_running()
    });
    let state = h.state().training();
    assert_eq!(state.message, None, "{:?}", state.log);
    assert_eq!(state.curve.len(), 2);
    assert!(state.curve.iter().all(|p| p.train_loss.is_finite()));
    let model = state.model.clone().expect("a model");
    assert!(
        state.report.is_some(),
        "an evaluation report: {:?}",
        state.log
    );
    h.get_by_label("Use this model").click();
    h.run_steps(2);
    assert_eq!(h.state().dmsl_model(), Some(model.as_path()));

    // The run's model draws its heatmap over a slide.
    h.input_mut().dropped_files.push(Arc::new(Dropped(slide)));
    h.step();
    settle(&mut h);
    h.get_by_label("Compute heatmap").click();
    h.step();
    step_until(&mut h, Duration::from_secs(300), "the heatmap", |a| {
        !a.heatmap().is_computing()
    });
    let heatmap = h.state().heatmap().heatmap().expect("a heatmap");
    assert!(heatmap.is_complete());
    assert_eq!(
        heatmap.header.classes,
        ["benign", "insitu", "invasive", "normal"]
    );
    assert!(heatmap.count(CellState::Done) > 0);
}
