//! The status bar: zoom, equivalent magnification, level in use, cursor position in µm, the heatmap
//! cell under the cursor, loading state.

use super::viewer::SlideView;

pub fn show(
    ui: &mut egui::Ui,
    view: Option<&SlideView>,
    frame_ms: Option<f32>,
    heatmap_hover: Option<&str>,
) {
    ui.horizontal(|ui| {
        let Some(view) = view else {
            ui.label("No slide open. Open one with File > Open… or drop it on the window.");
            return;
        };
        let info = view.slide.info();
        let name = info
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        ui.label(name)
            .on_hover_text(info.path.display().to_string());
        ui.separator();
        if let Some(vp) = view.viewport {
            ui.label(format!("Zoom {:.1}%", vp.scale * 100.0));
            ui.separator();
            match view.screen_magnification() {
                Some(m) => ui.label(format!("{m:.1}x")),
                None => ui.label("magnification unknown"),
            }
            .on_hover_text(
                "Equivalent objective magnification of the view (10 / µm per screen point)",
            );
            ui.separator();
        }
        if let Some(plan) = &view.plan {
            let l = info.levels[plan.level];
            ui.label(format!("Level {} ({:.2}x)", plan.level, l.downsample));
            ui.separator();
        }
        if let Some([x, y]) = view.cursor {
            let (w, h) = info.dimensions();
            if x >= 0.0 && y >= 0.0 && x < w as f64 && y < h as f64 {
                match view.mpp() {
                    Some(m) => ui.label(format!("{:.1} µm, {:.1} µm", x * m.x, y * m.y)),
                    None => ui.label(format!("{x:.0} px, {y:.0} px")),
                };
                ui.separator();
            }
        }
        if let Some(text) = heatmap_hover {
            ui.label(text)
                .on_hover_text("Probabilities of the heatmap cell under the cursor");
            ui.separator();
        }
        let stats = view.streamer.stats();
        let pending = stats.queued + stats.in_flight;
        if pending > 0 {
            ui.spinner();
            ui.label(format!("{pending} tiles loading"));
            ui.separator();
        }
        ui.label(format!(
            "cache {} / {} MB",
            (stats.cache_bytes + view.textures.used_bytes()) >> 20,
            (stats.cache_budget * 2) >> 20
        ));
        if let Some(ms) = frame_ms {
            ui.separator();
            ui.label(format!("{ms:.1} ms"));
        }
    });
}
