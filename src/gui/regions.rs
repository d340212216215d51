//! Regions drawn on a slide, each with a class, for the DMSL pair builder: rectangles by dragging,
//! polygons by clicking their corners (double-click or Enter closes, Escape cancels). They are saved
//! atomically beside the slide as QuPath-style GeoJSON (`SLIDE.regions.geojson`) after every change,
//! which `histolens dataset dmsl --slide SLIDE=…` and the label set's DMSL dataset read.

use std::path::{Path, PathBuf};

use egui::{Color32, Key, Pos2, Rect as ERect, Stroke};

use crate::data::pairs::{Region, read_regions, regions_sidecar, write_regions};
use crate::tiles::Viewport;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// Dragging pans the view.
    Pan,
    Rectangle,
    Polygon,
}

pub struct RegionsState {
    slide: Option<PathBuf>,
    pub regions: Vec<Region>,
    /// The class new regions get.
    pub class: String,
    pub tool: Tool,
    /// Level-0 corners of the polygon being drawn, or the rectangle's first corner.
    draft: Vec<[f64; 2]>,
    /// The pointer while a rectangle is dragged.
    drag_end: Option<[f64; 2]>,
    pub message: Option<String>,
}

impl Default for RegionsState {
    fn default() -> Self {
        RegionsState {
            slide: None,
            regions: Vec::new(),
            class: String::new(),
            tool: Tool::Pan,
            draft: Vec::new(),
            drag_end: None,
            message: None,
        }
    }
}

/// What the section asks the app to do.
pub enum RegionsAction {
    None,
    /// Add the slide to the label set (its regions go into the DMSL dataset built from it).
    AddSlideToLabels(PathBuf),
}

impl RegionsState {
    /// The regions saved for `slide`, loaded when another slide opens.
    pub fn slide_opened(&mut self, slide: &Path) {
        if self.slide.as_deref() == Some(slide) {
            return;
        }
        self.slide = Some(slide.to_path_buf());
        self.draft.clear();
        self.drag_end = None;
        let file = regions_sidecar(slide);
        self.regions = if file.is_file() {
            match read_regions(&file) {
                Ok(r) => r,
                Err(e) => {
                    self.message = Some(e.to_string());
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
    }

    pub fn sidecar(&self) -> Option<PathBuf> {
        self.slide.as_deref().map(regions_sidecar)
    }

    fn save(&mut self) {
        if let Some(file) = self.sidecar() {
            self.message = write_regions(&file, &self.regions)
                .err()
                .map(|e| e.to_string());
        }
    }

    fn add(&mut self, polygon: Vec<[f64; 2]>) {
        let class = self.class.trim().to_string();
        if class.is_empty() {
            self.message = Some("name the region's class first".into());
            return;
        }
        self.regions.push(Region { class, polygon });
        self.save();
    }

    pub fn remove(&mut self, index: usize) {
        if index < self.regions.len() {
            self.regions.remove(index);
            self.save();
        }
    }

    /// Whether the canvas's drags draw instead of panning.
    pub fn is_drawing(&self) -> bool {
        self.tool != Tool::Pan
    }

    /// Turns the canvas's pointer events into regions (level-0 coordinates through `vp`).
    pub fn handle_canvas(
        &mut self,
        ui: &egui::Ui,
        response: &egui::Response,
        canvas: ERect,
        vp: &Viewport,
    ) {
        let to_slide = |p: Pos2| {
            vp.screen_to_slide([f64::from(p.x - canvas.min.x), f64::from(p.y - canvas.min.y)])
        };
        match self.tool {
            Tool::Pan => {}
            Tool::Rectangle => {
                // From where the button went down, not where the drag was recognised.
                if response.drag_started()
                    && let Some(p) = ui
                        .input(|i| i.pointer.press_origin())
                        .or(response.interact_pointer_pos())
                {
                    self.draft = vec![to_slide(p)];
                }
                if response.dragged()
                    && let Some(p) = response.interact_pointer_pos()
                {
                    self.drag_end = Some(to_slide(p));
                }
                if response.drag_stopped() {
                    let end = response
                        .interact_pointer_pos()
                        .map(to_slide)
                        .or(self.drag_end);
                    if let (Some(&[x0, y0]), Some([x1, y1])) = (self.draft.first(), end)
                        && (x1 - x0).abs() > 1.0
                        && (y1 - y0).abs() > 1.0
                    {
                        let (xa, xb) = (x0.min(x1), x0.max(x1));
                        let (ya, yb) = (y0.min(y1), y0.max(y1));
                        self.add(vec![[xa, ya], [xb, ya], [xb, yb], [xa, yb]]);
                    }
                    self.draft.clear();
                    self.drag_end = None;
                }
            }
            Tool::Polygon => {
                let (enter, escape) =
                    ui.input(|i| (i.key_pressed(Key::Enter), i.key_pressed(Key::Escape)));
                if response.double_clicked() || enter {
                    if self.draft.len() >= 3 {
                        let polygon = std::mem::take(&mut self.draft);
                        self.add(polygon);
                    }
                } else if response.clicked()
                    && let Some(p) = response.interact_pointer_pos()
                {
                    self.draft.push(to_slide(p));
                }
                if escape {
                    self.draft.clear();
                }
                self.drag_end = response.hover_pos().map(to_slide);
            }
        }
    }

    /// Outlines of the regions and of the one being drawn.
    pub fn paint(&self, ui: &egui::Ui, canvas: ERect, vp: &Viewport, classes: &[String]) {
        let painter = ui.painter_at(canvas);
        let to_screen = |p: [f64; 2]| {
            let s = vp.slide_to_screen(p);
            Pos2::new(canvas.min.x + s[0] as f32, canvas.min.y + s[1] as f32)
        };
        for r in &self.regions {
            let colour = super::labels::class_colour_of(classes, &r.class);
            let points: Vec<Pos2> = r.polygon.iter().map(|&p| to_screen(p)).collect();
            painter.add(egui::Shape::closed_line(
                points.clone(),
                Stroke::new(2.0, colour),
            ));
            if let Some(&first) = points.first() {
                painter.text(
                    first + egui::vec2(4.0, 2.0),
                    egui::Align2::LEFT_TOP,
                    &r.class,
                    egui::FontId::proportional(12.0),
                    colour,
                );
            }
        }
        let draft_stroke = Stroke::new(1.5, Color32::WHITE);
        match (self.tool, self.draft.first()) {
            (Tool::Rectangle, Some(&start)) => {
                if let Some(end) = self.drag_end {
                    painter.rect_stroke(
                        ERect::from_two_pos(to_screen(start), to_screen(end)),
                        0.0,
                        draft_stroke,
                        egui::StrokeKind::Middle,
                    );
                }
            }
            (Tool::Polygon, Some(_)) => {
                let mut points: Vec<Pos2> = self.draft.iter().map(|&p| to_screen(p)).collect();
                if let Some(p) = self.drag_end {
                    points.push(to_screen(p));
                }
                painter.add(egui::Shape::line(points, draft_stroke));
            }
            _ => {}
        }
    }
}

/// The side panel's "Regions" section.
pub fn section(ui: &mut egui::Ui, state: &mut RegionsState, classes: &[String]) -> RegionsAction {
    let mut action = RegionsAction::None;
    egui::CollapsingHeader::new("Regions")
        .default_open(false)
        .show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.radio_value(&mut state.tool, Tool::Pan, "Pan");
                ui.radio_value(&mut state.tool, Tool::Rectangle, "Rectangle");
                ui.radio_value(&mut state.tool, Tool::Polygon, "Polygon");
            });
            ui.horizontal(|ui| {
                ui.label("Class");
                ui.add(
                    egui::TextEdit::singleline(&mut state.class)
                        .hint_text("class of new regions")
                        .desired_width(120.0),
                );
                if !classes.is_empty() {
                    egui::ComboBox::from_id_salt("region-class")
                        .selected_text("…")
                        .width(30.0)
                        .show_ui(ui, |ui| {
                            for c in classes {
                                if ui.selectable_label(state.class == *c, c).clicked() {
                                    state.class = c.clone();
                                }
                            }
                        });
                }
            });
            if state.tool == Tool::Polygon {
                ui.small("Click the corners; double-click or Enter closes; Escape cancels.");
            }
            let mut remove = None;
            for (i, r) in state.regions.iter().enumerate() {
                ui.horizontal(|ui| {
                    ui.label(format!("{} · {} points", r.class, r.polygon.len()));
                    if ui.small_button("Delete").clicked() {
                        remove = Some(i);
                    }
                });
            }
            if let Some(i) = remove {
                state.remove(i);
            }
            if let Some(slide) = state.slide.clone()
                && !state.regions.is_empty()
                && ui
                    .button("Add this slide to the labels")
                    .on_hover_text(
                        "Its regions then go into the DMSL dataset built from the labels",
                    )
                    .clicked()
            {
                action = RegionsAction::AddSlideToLabels(slide);
            }
            if let Some(m) = &state.message {
                ui.colored_label(ui.visuals().warn_fg_color, m);
            }
        });
    action
}
