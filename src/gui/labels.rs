//! The labelling view: folders and files dropped on the window join the project's label set (a CSV
//! manifest saved atomically on every change); a virtualised grid of thumbnails shows them with their
//! labels; classes go on by keyboard (number keys, arrows, undo/redo) or to a whole selection or a
//! dropped folder; the set becomes a training dataset for either task.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use egui::{Color32, Key, Modifiers, RichText, Sense, Stroke, vec2};

use super::thumbnails::Thumbnails;
use crate::data::pairs::{PairConfig, PairGeometry};
use crate::labels::{FolderProposal, Label, LabelSet};

/// Side of a grid cell (thumbnail and caption) in points.
const CELL: f32 = 120.0;
const THUMB: f32 = 96.0;

pub struct LabelsState {
    /// The project's manifest; opened on first use.
    pub manifest: PathBuf,
    set: Option<LabelSet>,
    thumbs: Option<Thumbnails>,
    thumbs_dir: PathBuf,
    pub selected: BTreeSet<usize>,
    /// The image the keyboard moves from.
    pub cursor: usize,
    /// Folders of the last drop whose images came without a label.
    pub proposals: Vec<FolderProposal>,
    pub message: Option<String>,
    pub new_class: String,
    pub magnification: f64,
    /// Side of a DMSL field in µm (the pairs are this field at the magnification and at a quarter of it).
    pub field_um: f64,
    /// µm/px of the class-labelled images a DMSL dataset is cut from (their height's).
    pub images_mpp: f64,
    /// Width over height of those images' pixels (0.75: squashed to 3/4 of their width).
    pub pixel_aspect: f64,
    missing: MissingFiles,
    /// The grid's columns in the last frame (for Up/Down).
    columns: usize,
    /// Scroll the cursor into view next frame.
    reveal: bool,
}

/// What the view asks the app to do.
pub enum LabelsAction {
    None,
    /// A dataset was built: train on it.
    Train(super::training::Task, PathBuf),
}

impl LabelsState {
    pub fn new(data_dir: &Path) -> Self {
        LabelsState {
            manifest: data_dir.join("labels").join("labels.csv"),
            set: None,
            thumbs: None,
            thumbs_dir: data_dir.join("thumbnails"),
            selected: BTreeSet::new(),
            cursor: 0,
            proposals: Vec::new(),
            message: None,
            new_class: String::new(),
            magnification: 20.0,
            field_um: 64.0,
            images_mpp: 0.5,
            pixel_aspect: 1.0,
            missing: MissingFiles::default(),
            columns: 1,
            reveal: false,
        }
    }

    /// The label set, opened (or created) on first use.
    pub fn set(&mut self) -> Option<&mut LabelSet> {
        if self.set.is_none() {
            match LabelSet::open_or_create(&self.manifest) {
                Ok(s) => self.set = Some(s),
                Err(e) => self.message = Some(e.to_string()),
            }
        }
        self.set.as_mut()
    }

    pub fn label_set(&self) -> Option<&LabelSet> {
        self.set.as_ref()
    }

    pub fn is_busy(&self) -> bool {
        self.thumbs.as_ref().is_some_and(Thumbnails::is_busy)
    }

    /// Adds dropped folders and files.
    pub fn add(&mut self, paths: &[PathBuf]) {
        let Some(set) = self.set() else { return };
        match set.add_paths(paths) {
            Ok(r) => {
                self.message = Some(format!(
                    "{} added ({} labelled from class folders), {} already there",
                    r.added, r.labelled_from_folders, r.already_present
                ));
                self.proposals = r.proposed;
            }
            Err(e) => self.message = Some(e.to_string()),
        }
    }

    /// The indices a labelling key acts on: the selection, else the cursor's image.
    fn targets(&self) -> Vec<usize> {
        if self.selected.is_empty() {
            vec![self.cursor]
        } else {
            self.selected.iter().copied().collect()
        }
    }

    fn assign(&mut self, label: Option<Label>) {
        let targets = self.targets();
        let single = self.selected.len() <= 1;
        let Some(set) = self.set() else { return };
        let n = set.entries().len();
        let targets: Vec<usize> = targets.into_iter().filter(|&i| i < n).collect();
        if targets.is_empty() {
            return;
        }
        if let Err(e) = set.assign(&targets, label) {
            self.message = Some(e.to_string());
            return;
        }
        // Labelling one by one moves on to the next image.
        if single {
            self.cursor = (self.cursor + 1).min(n.saturating_sub(1));
            self.selected.clear();
            self.reveal = true;
        }
    }

    fn undo(&mut self, redo: bool) {
        let Some(set) = self.set() else { return };
        let r = if redo { set.redo() } else { set.undo() };
        match r {
            Ok(true) => {}
            Ok(false) => {
                self.message = Some(format!("nothing to {}", if redo { "redo" } else { "undo" }))
            }
            Err(e) => self.message = Some(e.to_string()),
        }
        let n = self.set.as_ref().map_or(0, |s| s.entries().len());
        self.selected.retain(|&i| i < n);
        self.cursor = self.cursor.min(n.saturating_sub(1));
    }

    /// Number keys label (1 is the first class, 0 clears), arrows move (Shift extends the
    /// selection), Ctrl+Z / Ctrl+Shift+Z (or Ctrl+Y) undo and redo, Ctrl+A selects all, Delete
    /// takes the selection out of the set.
    fn keyboard(&mut self, ctx: &egui::Context) {
        if ctx.egui_wants_keyboard_input() {
            return;
        }
        let n = self.set.as_ref().map_or(0, |s| s.entries().len());
        if n == 0 {
            return;
        }
        let classes: Vec<String> = self
            .set
            .as_ref()
            .map(|s| s.classes().to_vec())
            .unwrap_or_default();
        let digits = [
            Key::Num0,
            Key::Num1,
            Key::Num2,
            Key::Num3,
            Key::Num4,
            Key::Num5,
            Key::Num6,
            Key::Num7,
            Key::Num8,
            Key::Num9,
        ];
        let mut pressed_digit = None;
        let (undo, redo, redo_y, all, delete, moves) = ctx.input_mut(|i| {
            for (d, key) in digits.iter().enumerate() {
                if i.consume_key(Modifiers::NONE, *key) {
                    pressed_digit = Some(d);
                }
            }
            let redo = i.consume_key(Modifiers::COMMAND | Modifiers::SHIFT, Key::Z);
            let undo = i.consume_key(Modifiers::COMMAND, Key::Z);
            let redo_y = i.consume_key(Modifiers::COMMAND, Key::Y);
            let all = i.consume_key(Modifiers::COMMAND, Key::A);
            let delete = i.consume_key(Modifiers::NONE, Key::Delete);
            let mut moves = Vec::new();
            for (key, step) in [
                (Key::ArrowLeft, -1i64),
                (Key::ArrowRight, 1),
                (Key::ArrowUp, -(self.columns as i64)),
                (Key::ArrowDown, self.columns as i64),
            ] {
                for shift in [false, true] {
                    let m = if shift {
                        Modifiers::SHIFT
                    } else {
                        Modifiers::NONE
                    };
                    if i.consume_key(m, key) {
                        moves.push((step, shift));
                    }
                }
            }
            (undo, redo, redo_y, all, delete, moves)
        });
        for (step, shift) in moves {
            let next = (self.cursor as i64 + step).clamp(0, n as i64 - 1) as usize;
            if shift {
                self.selected.insert(self.cursor);
                self.selected.insert(next);
            } else {
                self.selected.clear();
            }
            self.cursor = next;
            self.reveal = true;
        }
        match pressed_digit {
            Some(0) => self.assign(None),
            Some(d) => match classes.get(d - 1) {
                Some(c) => self.assign(Some(Label::Class(c.clone()))),
                None => self.message = Some(format!("no class {d}: add classes first")),
            },
            None => {}
        }
        if undo {
            self.undo(false);
        }
        if redo || redo_y {
            self.undo(true);
        }
        if all {
            self.selected = (0..n).collect();
        }
        if delete {
            let targets = self.targets();
            if let Some(set) = self.set.as_mut()
                && let Err(e) = set.remove(&targets)
            {
                self.message = Some(e.to_string());
            }
            self.selected.clear();
            let n = self.set.as_ref().map_or(0, |s| s.entries().len());
            self.cursor = self.cursor.min(n.saturating_sub(1));
        }
    }

    /// Builds the dataset of `task` from the set, in a folder beside its manifest.
    fn build_dataset(&mut self, task: super::training::Task) -> Option<PathBuf> {
        let (magnification, field_um) = (self.magnification, self.field_um);
        let (images_magnification, pixel_aspect) = (10.0 / self.images_mpp, self.pixel_aspect);
        let root = self.manifest.with_file_name("datasets");
        let set = self.set()?;
        let result = match task {
            super::training::Task::Magnification => {
                let out = root.join("magnification.csv");
                set.to_magnification_manifest(&out).map(|_| out)
            }
            super::training::Task::Dmsl => {
                let out = root.join("dmsl");
                let cfg = PairConfig {
                    geometry: PairGeometry {
                        high_magnification: magnification,
                        low_magnification: magnification / 4.0,
                        field_um,
                    },
                    ..PairConfig::default()
                };
                set.to_dmsl_pairs(&out, &cfg, images_magnification, pixel_aspect, |_| {})
                    .map(|_| out.join("pairs.csv"))
            }
        };
        match result {
            Ok(p) => Some(p),
            Err(e) => {
                self.message = Some(e.to_string());
                None
            }
        }
    }
}

/// How many listed files are missing, counted off the UI thread (a stat per file: 10,000 of them
/// would cost a frame its budget) every few seconds.
#[derive(Default)]
struct MissingFiles {
    last: usize,
    job: Option<crossbeam_channel::Receiver<usize>>,
    counted: Option<std::time::Instant>,
}

impl MissingFiles {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(3);

    fn count(&mut self, set: &LabelSet) -> usize {
        if let Some(rx) = &self.job
            && let Ok(n) = rx.try_recv()
        {
            self.last = n;
            self.job = None;
        }
        let due = self.counted.is_none_or(|t| t.elapsed() > Self::EVERY);
        if self.job.is_none() && due {
            let paths: Vec<PathBuf> = set.entries().iter().map(|e| e.path.clone()).collect();
            let (tx, rx) = crossbeam_channel::bounded(1);
            let spawned = std::thread::Builder::new()
                .name("missing-files".into())
                .spawn(move || {
                    let _ = tx.send(paths.iter().filter(|p| !p.exists()).count());
                });
            if spawned.is_ok() {
                self.job = Some(rx);
            }
            self.counted = Some(std::time::Instant::now());
        }
        self.last
    }
}

fn label_text(label: Option<&Label>) -> String {
    match label {
        None => "—".into(),
        Some(Label::Class(c)) => c.clone(),
        Some(Label::Magnification { magnification, .. }) => format!("{magnification}x"),
    }
}

/// The colour of a class: its place in the class list, in a palette for colour-blind eyes (Okabe–Ito);
/// a class not in the list (e.g. a slide region's, before the label set knows it) by its name's length.
pub(crate) fn class_colour_of(classes: &[String], class: &str) -> Color32 {
    const PALETTE: [Color32; 8] = [
        Color32::from_rgb(230, 159, 0),
        Color32::from_rgb(86, 180, 233),
        Color32::from_rgb(0, 158, 115),
        Color32::from_rgb(240, 228, 66),
        Color32::from_rgb(0, 114, 178),
        Color32::from_rgb(213, 94, 0),
        Color32::from_rgb(204, 121, 167),
        Color32::from_rgb(200, 200, 200),
    ];
    let i = classes
        .iter()
        .position(|x| x == class)
        .unwrap_or(class.len());
    PALETTE[i % PALETTE.len()]
}

/// A colour per label, stable across frames.
fn class_colour(classes: &[String], label: Option<&Label>) -> Color32 {
    match label {
        Some(Label::Class(c)) => class_colour_of(classes, c),
        Some(Label::Magnification { .. }) => Color32::from_rgb(180, 180, 255),
        None => Color32::DARK_GRAY,
    }
}

/// The labelling view.
pub fn show(ui: &mut egui::Ui, state: &mut LabelsState) -> LabelsAction {
    let mut action = LabelsAction::None;
    let ctx = ui.ctx().clone();
    if state.thumbs.is_none() {
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get().saturating_sub(1))
            .clamp(1, 4);
        state.thumbs = Some(Thumbnails::new(
            state.thumbs_dir.clone(),
            workers,
            ctx.clone(),
        ));
    }
    if let Some(t) = state.thumbs.as_mut() {
        t.collect(&ctx);
    }
    state.keyboard(&ctx);
    if state.set().is_none() {
        if let Some(m) = &state.message {
            ui.colored_label(ui.visuals().error_fg_color, m);
        }
        return action;
    }

    egui::Panel::right("labels-side")
        .resizable(true)
        .default_size(300.0)
        .show(ui, |ui| {
            action = side(ui, state);
        });
    egui::CentralPanel::default().show(ui, |ui| grid(ui, state));
    action
}

fn side(ui: &mut egui::Ui, state: &mut LabelsState) -> LabelsAction {
    let mut action = LabelsAction::None;
    let Some(set) = state.set.as_ref() else {
        return action;
    };
    let counts = set.counts();
    let missing = state.missing.count(set);
    let (can_undo, can_redo) = (set.can_undo(), set.can_redo());
    let n = set.entries().len();
    ui.heading("Labels");
    ui.label(format!(
        "{n} images · {} unlabelled · {} selected",
        counts.unlabelled,
        state.selected.len()
    ));
    ui.small(format!(
        "saved to {}",
        state
            .manifest
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned())
    ))
    .on_hover_text(state.manifest.display().to_string());
    if missing > 0 {
        ui.colored_label(
            ui.visuals().warn_fg_color,
            format!("{missing} files are missing (moved or deleted): they stay listed"),
        );
    }
    ui.separator();
    ui.label(RichText::new("Classes (number keys; 0 clears)").strong());
    let mut assign = None;
    for (i, (class, count)) in counts.classes.iter().enumerate() {
        ui.horizontal(|ui| {
            let key = if i < 9 {
                format!("{}", i + 1)
            } else {
                " ".into()
            };
            ui.monospace(key);
            let colour = class_colour(set.classes(), Some(&Label::Class(class.clone())));
            let (swatch, _) = ui.allocate_exact_size(vec2(10.0, 10.0), Sense::hover());
            ui.painter().rect_filled(swatch, 2.0, colour);
            if ui
                .button(format!("{class} ({count})"))
                .on_hover_text("Label the selection with this class")
                .clicked()
            {
                assign = Some(Some(Label::Class(class.clone())));
            }
        });
    }
    ui.horizontal(|ui| {
        ui.add(
            egui::TextEdit::singleline(&mut state.new_class)
                .hint_text("new class")
                .desired_width(140.0),
        );
        if ui.button("Add class").clicked() {
            let name = state.new_class.trim().to_string();
            if !name.is_empty()
                && let Some(set) = state.set.as_mut()
                && let Err(e) = set.add_class(&name)
            {
                state.message = Some(e.to_string());
            }
            state.new_class.clear();
        }
    });
    ui.horizontal(|ui| {
        ui.add(
            egui::DragValue::new(&mut state.magnification)
                .range(0.5..=80.0)
                .speed(0.5)
                .suffix("x"),
        );
        if ui
            .button("Set magnification")
            .on_hover_text(
                "Label the selection with this magnification (for the magnification model)",
            )
            .clicked()
        {
            assign = Some(Some(Label::Magnification {
                magnification: state.magnification,
                mpp: None,
            }));
        }
    });
    if ui.button("Clear label").clicked() {
        assign = Some(None);
    }
    if let Some(label) = assign {
        state.assign(label);
    }
    if !state.proposals.is_empty() {
        ui.separator();
        ui.label(RichText::new("Dropped folders").strong());
        let mut apply = None;
        for (k, p) in state.proposals.iter().enumerate() {
            if ui
                .button(format!(
                    "Label \"{}\" ({} images) as {}",
                    p.name,
                    p.entries.len(),
                    p.name
                ))
                .clicked()
            {
                apply = Some(k);
            }
        }
        if let Some(k) = apply {
            let p = state.proposals.remove(k);
            if let Some(set) = state.set.as_mut()
                && let Err(e) = set.assign(&p.entries, Some(Label::Class(p.name.clone())))
            {
                state.message = Some(e.to_string());
            }
        }
    }
    ui.separator();
    ui.horizontal(|ui| {
        if ui
            .add_enabled(can_undo, egui::Button::new("Undo"))
            .clicked()
        {
            state.undo(false);
        }
        if ui
            .add_enabled(can_redo, egui::Button::new("Redo"))
            .clicked()
        {
            state.undo(true);
        }
    });
    ui.horizontal(|ui| {
        if ui
            .button("Assign splits")
            .on_hover_text(
                "70% train, 15% validation, 15% test, by group (a group never on two sides)",
            )
            .clicked()
            && let Some(set) = state.set.as_mut()
            && let Err(e) = set.assign_splits([0.7, 0.15, 0.15], 0)
        {
            state.message = Some(e.to_string());
        }
        if ui.button("Export…").clicked()
            && let Some(p) = rfd::FileDialog::new()
                .add_filter("CSV", &["csv"])
                .set_file_name("labels.csv")
                .save_file()
            && let Some(set) = state.set.as_ref()
            && let Err(e) = set.export(&p)
        {
            state.message = Some(e.to_string());
        }
        if ui.button("Import…").clicked()
            && let Some(p) = rfd::FileDialog::new()
                .add_filter("CSV", &["csv"])
                .pick_file()
            && let Some(set) = state.set.as_mut()
        {
            state.message = Some(match set.import(&p) {
                Ok(r) => format!(
                    "{} added, {} updated; {} missing files",
                    r.added,
                    r.updated,
                    r.missing.len()
                ),
                Err(e) => e.to_string(),
            });
        }
    });
    ui.separator();
    ui.label(RichText::new("Train on these labels").strong());
    ui.horizontal(|ui| {
        ui.label("DMSL field");
        ui.add(
            egui::DragValue::new(&mut state.field_um)
                .range(8.0..=2000.0)
                .suffix(" µm"),
        );
        ui.label(format!(
            "at {}x and {}x",
            state.magnification,
            state.magnification / 4.0
        ));
    });
    ui.horizontal(|ui| {
        ui.label("Images at");
        ui.add(
            egui::DragValue::new(&mut state.images_mpp)
                .range(0.05..=20.0)
                .speed(0.01)
                .suffix(" µm/px"),
        )
        .on_hover_text("The pixel size of the class-labelled images (of their height)");
        ui.label("pixel aspect");
        ui.add(
            egui::DragValue::new(&mut state.pixel_aspect)
                .range(0.1..=10.0)
                .speed(0.01),
        )
        .on_hover_text(
            "Width over height of a pixel's content: 0.75 for images squashed to 3/4 of their \
             width (BACH's copies)",
        );
    });
    ui.horizontal(|ui| {
        for (task, name) in [
            (super::training::Task::Dmsl, "Build DMSL dataset"),
            (
                super::training::Task::Magnification,
                "Build magnification dataset",
            ),
        ] {
            if ui.button(name).clicked()
                && let Some(path) = state.build_dataset(task)
            {
                action = LabelsAction::Train(task, path);
            }
        }
    });
    if let Some(m) = &state.message {
        ui.separator();
        ui.label(m);
    }
    action
}

fn grid(ui: &mut egui::Ui, state: &mut LabelsState) {
    let Some(set) = state.set.as_ref() else {
        return;
    };
    let n = set.entries().len();
    if n == 0 {
        ui.centered_and_justified(|ui| {
            ui.label(
                "Drop folders of images here (sub-folders named after classes are read as labelled)",
            );
        });
        return;
    }
    let columns = ((ui.available_width() / CELL).floor() as usize).max(1);
    state.columns = columns;
    let rows = n.div_ceil(columns);
    let mut scroll = egui::ScrollArea::vertical().auto_shrink([false, false]);
    if std::mem::take(&mut state.reveal) {
        let row = state.cursor / columns;
        let spacing = ui.spacing().item_spacing.y;
        let top = row as f32 * (CELL + spacing);
        let visible = ui.available_height();
        let offset = ui
            .ctx()
            .memory(|m| m.data.get_temp::<f32>(egui::Id::unique("labels-scroll")))
            .unwrap_or(0.0);
        if top < offset || top + CELL > offset + visible {
            scroll = scroll.vertical_scroll_offset((top - visible / 2.0).max(0.0));
        }
    }
    let mut clicked: Option<(usize, Modifiers)> = None;
    let mut shown = Vec::new();
    let output = scroll.show_rows(ui, CELL, rows, |ui, range| {
        for row in range {
            ui.horizontal(|ui| {
                for col in 0..columns {
                    let i = row * columns + col;
                    let Some(entry) = set.entries().get(i) else {
                        break;
                    };
                    shown.push(entry.path.clone());
                    let (rect, response) =
                        ui.allocate_exact_size(vec2(CELL - 4.0, CELL), Sense::click());
                    let painter = ui.painter_at(rect);
                    let selected = state.selected.contains(&i);
                    if selected {
                        painter.rect_filled(rect, 4.0, ui.visuals().selection.bg_fill);
                    }
                    if i == state.cursor {
                        painter.rect_stroke(
                            rect.shrink(1.0),
                            4.0,
                            Stroke::new(2.0, ui.visuals().selection.stroke.color),
                            egui::StrokeKind::Inside,
                        );
                    }
                    let thumb_rect = egui::Rect::from_center_size(
                        rect.center_top() + vec2(0.0, 4.0 + THUMB / 2.0),
                        vec2(THUMB, THUMB),
                    );
                    match state.thumbs.as_ref().and_then(|t| t.get(&entry.path)) {
                        Some(Ok(tex)) => {
                            let [w, h] = tex.size();
                            let s = THUMB / (w.max(h).max(1) as f32);
                            let r = egui::Rect::from_center_size(
                                thumb_rect.center(),
                                vec2(w as f32 * s, h as f32 * s),
                            );
                            painter.image(
                                tex.id(),
                                r,
                                egui::Rect::from_min_max(
                                    egui::pos2(0.0, 0.0),
                                    egui::pos2(1.0, 1.0),
                                ),
                                Color32::WHITE,
                            );
                        }
                        Some(Err(_)) => {
                            painter.rect_filled(thumb_rect, 2.0, Color32::from_rgb(90, 30, 30));
                            painter.text(
                                thumb_rect.center(),
                                egui::Align2::CENTER_CENTER,
                                "unreadable",
                                egui::FontId::proportional(11.0),
                                Color32::WHITE,
                            );
                        }
                        None => {
                            painter.rect_filled(thumb_rect, 2.0, Color32::from_gray(50));
                        }
                    }
                    let label = entry.label.as_ref();
                    let colour = class_colour(set.classes(), label);
                    painter.rect_filled(
                        egui::Rect::from_min_size(
                            thumb_rect.left_bottom() + vec2(0.0, 2.0),
                            vec2(THUMB, 3.0),
                        ),
                        0.0,
                        colour,
                    );
                    let name = entry
                        .path
                        .file_name()
                        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
                    // The label under the image; the file's name in the tooltip.
                    painter.text(
                        rect.center_bottom() - vec2(0.0, 2.0),
                        egui::Align2::CENTER_BOTTOM,
                        truncate(&label_text(label), 18),
                        egui::FontId::proportional(10.0),
                        ui.visuals().text_color(),
                    );
                    response.widget_info(|| {
                        egui::WidgetInfo::labeled(
                            egui::Role::Button,
                            true,
                            format!("{name}: {}", label_text(label)),
                        )
                    });
                    let response = response.on_hover_text(&name);
                    if response.clicked() {
                        clicked = Some((i, ui.input(|inp| inp.modifiers)));
                    }
                }
            });
        }
    });
    ui.ctx().memory_mut(|m| {
        m.data.insert_temp(
            egui::Id::unique("labels-scroll"),
            output.state.clamped_offset().y,
        )
    });
    if let Some(t) = state.thumbs.as_mut() {
        t.want(shown);
    }
    if let Some((i, mods)) = clicked {
        if mods.command {
            if !state.selected.remove(&i) {
                state.selected.insert(i);
            }
        } else if mods.shift {
            let (a, b) = (state.cursor.min(i), state.cursor.max(i));
            state.selected.extend(a..=b);
        } else {
            state.selected.clear();
        }
        state.cursor = i;
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let head: String = s.chars().take(max.saturating_sub(1)).collect();
        format!("{head}…")
    }
}
