//! The slide canvas: tiles drawn at the level the zoom needs (coarser tiles stand in while sharp ones
//! load), pan and zoom by mouse and keyboard, overlays (heatmap, Grad-CAM; drawn on the GPU), the overview
//! (minimap) and the scale bar.

use std::sync::Arc;

use egui::{Color32, Key, Pos2, Rect as ERect, Sense, Stroke, TextureHandle, Vec2, pos2, vec2};
use image::RgbaImage;

use super::overlay::GridOverlay;
use super::tile_atlas::{QuadSource, TileAtlas, TileQuad};
use crate::slide::{Calibration, Mpp, Slide};
use crate::tiles::{self, TilePlan, TileStreamer, Viewport, plan_tiles};

/// The parts of `canvas` outside `inner`: up to four strips (above, below, left, right).
fn outside(canvas: ERect, inner: ERect) -> Vec<ERect> {
    let inner = canvas.intersect(inner);
    if !inner.is_positive() {
        return vec![canvas];
    }
    [
        ERect::from_min_max(canvas.min, pos2(canvas.max.x, inner.min.y)),
        ERect::from_min_max(pos2(canvas.min.x, inner.max.y), canvas.max),
        ERect::from_min_max(
            pos2(canvas.min.x, inner.min.y),
            pos2(inner.min.x, inner.max.y),
        ),
        ERect::from_min_max(
            pos2(inner.max.x, inner.min.y),
            pos2(canvas.max.x, inner.max.y),
        ),
    ]
    .into_iter()
    .filter(|r| r.is_positive())
    .collect()
}

/// Side of the overview image (also the last-resort stand-in under every tile).
pub const OVERVIEW_SIDE: u32 = 1024;
/// Tiles of prefetch ring around the view.
const PREFETCH_RING: u32 = 1;

/// Everything the window holds for one open slide.
pub struct SlideView {
    pub slide: Arc<Slide>,
    pub streamer: TileStreamer,
    pub textures: TileAtlas,
    pub viewport: Option<Viewport>,
    pub overview: TextureHandle,
    pub associated: Vec<(String, TextureHandle, [usize; 2])>,
    pub calibration: Calibration,
    /// The magnification estimate (µm/px and its relative uncertainty), used by the scale bar
    /// (marked "est.") only when neither the metadata nor a calibration gives a pixel size.
    pub estimated_mpp: Option<(f64, f64)>,
    /// Text fields of the calibration editor.
    pub calibration_edit: Calibration,
    pub plan: Option<TilePlan>,
    /// Slide coordinates (level 0) under the pointer.
    pub cursor: Option<[f64; 2]>,
    /// Where the overview was drawn in the last frame (screen points).
    pub overview_rect: Option<ERect>,
    /// The canvas in the last frame (screen points).
    pub canvas_rect: Option<ERect>,
    fit_requested: bool,
    one_to_one_requested: bool,
    zoom_requested: f64,
    /// Drags draw regions instead of panning (a drawing tool is active).
    pub drawing: bool,
    /// Drags draw a line along a scale bar (the calibration's measuring tool is active).
    pub measuring: bool,
    /// The line drawn along a scale bar: its ends in level-0 pixels.
    pub scale_line: Option<([f64; 2], [f64; 2])>,
    /// The length the user types for that bar, µm.
    pub scale_bar_um: f64,
    /// The camera chosen in the calibration editor (empty: none chosen yet).
    pub camera_name: String,
    /// The objective typed for a camera (to apply it, or to save this file's scale as one).
    pub camera_objective: f64,
    /// The name typed for a new camera.
    pub new_camera_name: String,
}

/// What the open job hands to the window.
pub struct OpenedSlide {
    pub slide: Arc<Slide>,
    pub overview: RgbaImage,
    pub associated: Vec<(String, RgbaImage)>,
}

fn texture(ctx: &egui::Context, name: &str, img: &RgbaImage) -> (TextureHandle, [usize; 2]) {
    let size = [img.width() as usize, img.height() as usize];
    let color = egui::ColorImage::from_rgba_unmultiplied(size, img.as_raw());
    (
        ctx.load_texture(name, color, egui::TextureOptions::LINEAR),
        size,
    )
}

impl SlideView {
    pub fn new(
        ctx: &egui::Context,
        opened: OpenedSlide,
        cache_budget: usize,
        loader_threads: usize,
        calibration: Calibration,
    ) -> Self {
        let repaint = ctx.clone();
        // Half of the budget holds decoded tiles, half their textures.
        let streamer = TileStreamer::new(
            opened.slide.clone(),
            tiles::DEFAULT_TILE_SIZE,
            loader_threads,
            cache_budget / 2,
            move || repaint.request_repaint(),
        );
        let (overview, _) = texture(ctx, "overview", &opened.overview);
        let associated = opened
            .associated
            .iter()
            .map(|(name, img)| {
                let (t, s) = texture(ctx, &format!("associated-{name}"), img);
                (name.clone(), t, s)
            })
            .collect();
        SlideView {
            slide: opened.slide,
            streamer,
            textures: TileAtlas::new(tiles::DEFAULT_TILE_SIZE, &opened.overview),
            viewport: None,
            overview,
            associated,
            calibration,
            estimated_mpp: None,
            calibration_edit: calibration,
            plan: None,
            cursor: None,
            overview_rect: None,
            canvas_rect: None,
            fit_requested: true,
            one_to_one_requested: false,
            zoom_requested: 1.0,
            drawing: false,
            measuring: false,
            scale_line: None,
            scale_bar_um: 100.0,
            camera_name: String::new(),
            camera_objective: calibration.objective_power.unwrap_or(10.0),
            new_camera_name: String::new(),
        }
    }

    pub fn mpp(&self) -> Option<Mpp> {
        self.slide.info().effective_mpp(&self.calibration)
    }

    pub fn fit(&mut self) {
        self.fit_requested = true;
    }

    pub fn one_to_one(&mut self) {
        self.one_to_one_requested = true;
    }

    /// Zooms about the view centre on the next frame.
    pub fn zoom_by(&mut self, factor: f64) {
        self.zoom_requested *= factor;
    }

    /// Equivalent objective magnification of what is on screen (one screen point per slide pixel at
    /// the scanned magnification), when the pixel size is known.
    pub fn screen_magnification(&self) -> Option<f64> {
        Some(self.mpp()?.magnification() * self.viewport?.scale)
    }

    /// True while tiles are queued, loading or waiting for upload.
    pub fn is_loading(&self) -> bool {
        self.streamer.pending() > 0 || self.textures.backlog() > 0
    }

    /// The canvas: input, tile drawing, the overlays given (bottom first), overview and scale bar.
    /// Returns the canvas's response (for tooltips).
    pub fn show(&mut self, ui: &mut egui::Ui, overlays: &[GridOverlay]) -> egui::Response {
        let rect = ui.available_rect_before_wrap();
        self.canvas_rect = Some(rect);
        let response = ui.allocate_rect(rect, Sense::click_and_drag());
        let dims = self.slide.info().dimensions();
        let size = [f64::from(rect.width()), f64::from(rect.height())];
        let mut vp = match self.viewport {
            Some(mut v) if !self.fit_requested => {
                v.size = size;
                v
            }
            _ => Viewport::fit(dims, size),
        };
        self.fit_requested = false;
        let ppp = f64::from(ui.ctx().pixels_per_point());
        let min_scale = Viewport::min_scale(dims, size);
        if self.one_to_one_requested {
            let c = [size[0] / 2.0, size[1] / 2.0];
            vp.zoom_about(c, 1.0 / (ppp * vp.scale), min_scale);
            self.one_to_one_requested = false;
        }
        if self.zoom_requested != 1.0 {
            vp.zoom_about(
                [size[0] / 2.0, size[1] / 2.0],
                self.zoom_requested,
                min_scale,
            );
            self.zoom_requested = 1.0;
        }
        self.handle_input(ui, &response, rect, &mut vp, min_scale);
        vp.clamp_to(dims);
        self.viewport = Some(vp);

        let plan = plan_tiles(
            self.streamer.grid(),
            &vp,
            ppp,
            PREFETCH_RING,
            Some(self.overview.size()),
        );
        self.streamer.request(&plan.wanted);
        self.textures.begin_frame();
        self.textures.upload(ui.ctx(), &self.streamer, &plan.wanted);

        let painter = ui.painter_at(rect);
        self.draw_tiles(&painter, rect, &vp, &plan, ppp as f32);
        for o in overlays {
            o.paint(&painter, rect, &vp, dims);
        }
        self.draw_scale_line(&painter, rect, &vp);
        self.draw_scale_bar(&painter, rect, &vp);
        self.plan = Some(plan);
        self.show_overview(ui, rect);
        if self.streamer.pending() > 0 {
            ui.ctx()
                .request_repaint_after(std::time::Duration::from_millis(50));
        }
        response
    }

    fn handle_input(
        &mut self,
        ui: &egui::Ui,
        response: &egui::Response,
        rect: ERect,
        vp: &mut Viewport,
        min_scale: f64,
    ) {
        let local = |p: Pos2| [f64::from(p.x - rect.min.x), f64::from(p.y - rect.min.y)];
        if self.measuring
            && let Some(p) = response.interact_pointer_pos()
        {
            let at = vp.screen_to_slide(local(p));
            if response.drag_started() {
                self.scale_line = Some((at, at));
            } else if response.dragged()
                && let Some((a, _)) = self.scale_line
            {
                self.scale_line = Some((a, at));
            }
        }
        if response.dragged() && !self.drawing && !self.measuring {
            let d = response.drag_delta();
            vp.pan_by([f64::from(d.x), f64::from(d.y)]);
        }
        self.cursor = response.hover_pos().map(|p| vp.screen_to_slide(local(p)));
        if let Some(p) = response.hover_pos() {
            let (scroll, zoom) = ui.input(|i| (i.smooth_scroll_delta, i.zoom_delta()));
            let factor = f64::from(zoom) * (f64::from(scroll.y) * 0.0025).exp();
            if (factor - 1.0).abs() > 1e-6 {
                vp.zoom_about(local(p), factor, min_scale);
            }
        }
        if response.double_clicked()
            && !self.drawing
            && let Some(p) = response.interact_pointer_pos()
        {
            vp.zoom_about(local(p), 2.0, min_scale);
        }
        if ui.ctx().egui_wants_keyboard_input() {
            return;
        }
        let centre = [vp.size[0] / 2.0, vp.size[1] / 2.0];
        let step = [vp.size[0] / 8.0, vp.size[1] / 8.0];
        ui.input(|i| {
            if i.key_pressed(Key::ArrowLeft) {
                vp.pan_by([step[0], 0.0]);
            }
            if i.key_pressed(Key::ArrowRight) {
                vp.pan_by([-step[0], 0.0]);
            }
            if i.key_pressed(Key::ArrowUp) {
                vp.pan_by([0.0, step[1]]);
            }
            if i.key_pressed(Key::ArrowDown) {
                vp.pan_by([0.0, -step[1]]);
            }
            if i.key_pressed(Key::Plus) || i.key_pressed(Key::Equals) {
                vp.zoom_about(centre, 1.25, min_scale);
            }
            if i.key_pressed(Key::Minus) {
                vp.zoom_about(centre, 0.8, min_scale);
            }
        });
    }

    fn draw_tiles(
        &mut self,
        painter: &egui::Painter,
        rect: ERect,
        vp: &Viewport,
        plan: &TilePlan,
        ppp: f32,
    ) {
        let snap = |v: f32| (v * ppp).round() / ppp;
        let to_screen = |r: tiles::Rect| {
            let a = vp.slide_to_screen([r.x0, r.y0]);
            let b = vp.slide_to_screen([r.x1, r.y1]);
            ERect::from_min_max(
                pos2(
                    snap(rect.min.x + a[0] as f32),
                    snap(rect.min.y + a[1] as f32),
                ),
                pos2(
                    snap(rect.min.x + b[0] as f32),
                    snap(rect.min.y + b[1] as f32),
                ),
            )
        };
        let (w, h) = self.slide.info().dimensions();
        let whole = tiles::Rect {
            x0: 0.0,
            y0: 0.0,
            x1: w as f64,
            y1: h as f64,
        };
        let slide_rect = to_screen(whole);
        // Every canvas pixel is painted once: software renderers (no GPU) pay for each overdrawn one.
        // The canvas colour only around the slide, and under each tile the best image on the GPU:
        // its texture, a coarser tile's, or the overview (never a blank once the slide is open).
        for strip in outside(rect, slide_rect) {
            painter.rect_filled(strip, 0.0, Color32::from_gray(40));
        }
        let full_uv = ERect::from_min_max(pos2(0.0, 0.0), pos2(1.0, 1.0));
        if plan.visible.is_empty() {
            let whole_overview = TileQuad {
                source: QuadSource::Overview,
                screen: slide_rect,
                uv: full_uv,
            };
            self.textures.paint(painter, rect, &[whole_overview], false);
            return;
        }
        let crop = |outer: tiles::Rect, inner: tiles::Rect| {
            let u = |x: f64| ((x - outer.x0) / outer.width()) as f32;
            let v = |y: f64| ((y - outer.y0) / outer.height()) as f32;
            ERect::from_min_max(
                pos2(u(inner.x0), v(inner.y0)),
                pos2(u(inner.x1.min(outer.x1)), v(inner.y1.min(outer.y1))),
            )
        };
        let grid = self.streamer.grid().clone();
        let top = grid.coarsest_level();
        let mut quads = Vec::with_capacity(plan.visible.len());
        for &key in &plan.visible {
            let tile_rect = grid.tile_rect_level0(key);
            let screen = to_screen(tile_rect);
            if self.textures.contains(key) {
                quads.push(TileQuad {
                    source: QuadSource::Tile(key),
                    screen,
                    uv: full_uv,
                });
                continue;
            }
            let coarser = (plan.level + 1..=top)
                .map_while(|level| grid.ancestor(key, level))
                .find(|&anc| self.textures.contains(anc));
            quads.push(match coarser {
                Some(anc) => TileQuad {
                    source: QuadSource::Tile(anc),
                    screen,
                    uv: crop(grid.tile_rect_level0(anc), tile_rect),
                },
                None => TileQuad {
                    source: QuadSource::Overview,
                    screen,
                    uv: crop(whole, tile_rect),
                },
            });
        }
        // One texel per physical pixel, on the pixel grid: the nearest texel is the exact one.
        let texel_px = grid
            .levels()
            .get(plan.level)
            .map_or(0.0, |l| l.downsample * vp.scale * f64::from(ppp));
        self.textures
            .paint(painter, rect, &quads, (texel_px - 1.0).abs() < 1e-3);
    }

    /// The length in level-0 pixels of the line drawn along a scale bar.
    pub fn scale_line_px(&self) -> Option<f64> {
        let (a, b) = self.scale_line?;
        let len = (b[0] - a[0]).hypot(b[1] - a[1]);
        (len >= 1.0).then_some(len)
    }

    fn draw_scale_line(&self, painter: &egui::Painter, rect: ERect, vp: &Viewport) {
        let (Some((a, b)), Some(len)) = (self.scale_line, self.scale_line_px()) else {
            return;
        };
        let screen = |p: [f64; 2]| {
            let s = vp.slide_to_screen(p);
            rect.min + vec2(s[0] as f32, s[1] as f32)
        };
        let (pa, pb) = (screen(a), screen(b));
        let colour = Color32::from_rgb(255, 200, 0);
        painter.line_segment([pa, pb], Stroke::new(2.0, colour));
        for p in [pa, pb] {
            painter.circle_filled(p, 3.0, colour);
        }
        painter.text(
            pb + vec2(6.0, -6.0),
            egui::Align2::LEFT_BOTTOM,
            format!("{len:.1} px"),
            egui::FontId::proportional(13.0),
            colour,
        );
    }

    fn draw_scale_bar(&self, painter: &egui::Painter, rect: ERect, vp: &Viewport) {
        let (per_point, unit, estimated) = match (self.mpp(), self.estimated_mpp) {
            (Some(m), _) => (m.mean() / vp.scale, "µm", None),
            (None, Some((m, rel))) => (m / vp.scale, "µm", Some(rel)),
            (None, None) => (1.0 / vp.scale, "px", None),
        };
        let (len, mut label) = scale_bar_length(per_point, 120.0, unit);
        if let Some(rel) = estimated {
            label += &format!(" (est. ±{:.0}%)", 100.0 * rel);
        }
        let bar = len as f32;
        let origin = rect.left_bottom() + vec2(16.0, -20.0);
        let bg = ERect::from_min_size(origin + vec2(-8.0, -22.0), vec2(bar + 16.0, 32.0));
        painter.rect_filled(bg, 4.0, Color32::from_black_alpha(150));
        painter.line_segment(
            [origin, origin + vec2(bar, 0.0)],
            Stroke::new(3.0, Color32::WHITE),
        );
        for x in [0.0, bar] {
            painter.line_segment(
                [origin + vec2(x, -5.0), origin + vec2(x, 3.0)],
                Stroke::new(2.0, Color32::WHITE),
            );
        }
        painter.text(
            origin + vec2(bar / 2.0, -6.0),
            egui::Align2::CENTER_BOTTOM,
            label,
            egui::FontId::proportional(13.0),
            Color32::WHITE,
        );
    }

    fn show_overview(&mut self, ui: &mut egui::Ui, canvas: ERect) {
        let Some(vp) = self.viewport else { return };
        let [tw, th] = self.overview.size();
        let max = 200.0;
        let s = max / (tw.max(th) as f32);
        let size = vec2(tw as f32 * s, th as f32 * s);
        let area = ERect::from_min_size(canvas.right_bottom() - size - vec2(12.0, 12.0), size);
        self.overview_rect = Some(area);
        let response = ui.interact(
            area,
            ui.scope_id().with("overview"),
            Sense::click_and_drag(),
        );
        let painter = ui.painter_at(canvas);
        painter.rect_filled(area.expand(3.0), 3.0, Color32::from_black_alpha(180));
        painter.image(
            self.overview.id(),
            area,
            ERect::from_min_max(pos2(0.0, 0.0), pos2(1.0, 1.0)),
            Color32::WHITE,
        );
        let (w, h) = self.slide.info().dimensions();
        let to_mini = |p: [f64; 2]| {
            pos2(
                area.min.x + (p[0] / w as f64) as f32 * area.width(),
                area.min.y + (p[1] / h as f64) as f32 * area.height(),
            )
        };
        let r = vp.visible_rect();
        let view_rect =
            ERect::from_min_max(to_mini([r.x0, r.y0]), to_mini([r.x1, r.y1])).intersect(area);
        painter.rect_stroke(
            view_rect,
            0.0,
            Stroke::new(2.0, Color32::from_rgb(255, 200, 0)),
            egui::StrokeKind::Middle,
        );
        if (response.clicked() || response.dragged())
            && let Some(p) = response.interact_pointer_pos()
        {
            let fx = f64::from((p.x - area.min.x) / area.width()).clamp(0.0, 1.0);
            let fy = f64::from((p.y - area.min.y) / area.height()).clamp(0.0, 1.0);
            if let Some(v) = self.viewport.as_mut() {
                v.center = [fx * w as f64, fy * h as f64];
            }
            ui.ctx().request_repaint();
        }
        response.on_hover_text("Overview: click or drag to move the view");
    }
}

/// A "nice" scale bar (1, 2 or 5 times a power of ten) about `target_points` long. Returns its length in
/// points and its label.
pub fn scale_bar_length(units_per_point: f64, target_points: f64, unit: &str) -> (f64, String) {
    let raw = units_per_point * target_points;
    let pow = 10f64.powf(raw.log10().floor());
    let nice = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * pow)
        .min_by(|a, b| (a - raw).abs().total_cmp(&(b - raw).abs()))
        .unwrap_or(pow);
    let label = if unit == "µm" && nice >= 1000.0 {
        format!("{} mm", nice / 1000.0)
    } else if nice >= 1.0 {
        format!("{} {unit}", nice as u64)
    } else {
        format!("{nice} {unit}")
    };
    (nice / units_per_point, label)
}

/// Size that keeps the aspect of an image of `size` within `max` points.
pub fn fit_size(size: [usize; 2], max: f32) -> Vec2 {
    let s = max / (size[0].max(size[1]).max(1) as f32);
    vec2(size[0] as f32 * s, size[1] as f32 * s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_bar_is_nice() {
        // 0.5 µm per point: 120 points ≈ 60 µm → 50 µm, 100 points.
        let (len, label) = scale_bar_length(0.5, 120.0, "µm");
        assert_eq!(label, "50 µm");
        assert!((len - 100.0).abs() < 1e-9);
        let (_, label) = scale_bar_length(20.0, 120.0, "µm");
        assert_eq!(label, "2 mm");
        let (_, label) = scale_bar_length(0.001, 120.0, "px");
        assert_eq!(label, "0.1 px");
    }

    #[test]
    fn the_canvas_outside_the_slide_is_painted_once() {
        let canvas = ERect::from_min_max(pos2(0.0, 0.0), pos2(100.0, 80.0));
        let area = |rs: &[ERect]| rs.iter().map(|r| r.area()).sum::<f32>();
        // Slide inside the canvas: four strips, the canvas minus the slide, none overlapping.
        let slide = ERect::from_min_max(pos2(10.0, 20.0), pos2(60.0, 50.0));
        let strips = outside(canvas, slide);
        assert_eq!(strips.len(), 4);
        assert_eq!(area(&strips), canvas.area() - slide.area());
        for (i, a) in strips.iter().enumerate() {
            assert!(!a.intersects(slide.shrink(0.5)));
            for b in &strips[i + 1..] {
                assert!(a.intersect(*b).area() <= 0.0 || !a.intersect(*b).is_positive());
            }
        }
        // Slide covering the canvas: nothing; slide off screen: the whole canvas.
        let big = ERect::from_min_max(pos2(-50.0, -50.0), pos2(500.0, 500.0));
        assert!(outside(canvas, big).is_empty());
        let away = ERect::from_min_max(pos2(200.0, 200.0), pos2(300.0, 300.0));
        assert_eq!(outside(canvas, away), vec![canvas]);
    }
}
