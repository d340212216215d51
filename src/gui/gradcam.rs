//! Grad-CAM in the window: for the field under the view's centre, the maps of each DMSL branch at the
//! first convolution (cells) and the last (tissue), side by side as the paper shows them, or those of
//! the magnification model. Computed in a worker (on the model pool), cached per field and settings.
//! The map picked for it is also laid over the slide, where its field is, by the GPU overlay.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crossbeam_channel::Receiver;
use image::RgbImage;
use parking_lot::Mutex;

use super::heatmap::{ModelCache, load_model};
use super::overlay::{CellGrid, GridOverlay, Layer, OverlayData, OverlayStyle};
use crate::data::augment::to_rgb;
use crate::data::pairs::read_field;
use crate::magnification::MagnificationModel;
use crate::nn::checkpoint::read_meta;
use crate::nn::gradcam::{CamMaps, Tap};
use crate::slide::Slide;
use crate::util::colormap::Colormap;

/// Which model's maps are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CamTarget {
    Dmsl,
    Magnification,
}

/// What a result is for: a new field, model, class or target computes anew.
#[derive(Debug, Clone, PartialEq)]
pub struct CamKey {
    slide: PathBuf,
    model: PathBuf,
    target: CamTarget,
    class: usize,
    /// Level-0 centre of the field.
    centre: [i64; 2],
}

/// One map: its title, the input it is over, the map (input-sized, in [0, 1]) and where that input
/// lies on the slide.
#[derive(Debug, Clone)]
pub struct CamTile {
    pub title: String,
    pub image: RgbImage,
    pub map: Vec<f32>,
    /// Level-0 top-left corner and side of the square field the image shows.
    pub field: ([f64; 2], f64),
}

impl CamTile {
    fn new(title: String, image: RgbImage, cam: &CamMaps, field: ([f64; 2], f64)) -> Self {
        CamTile {
            title,
            image,
            map: cam.maps.first().cloned().unwrap_or_default(),
            field,
        }
    }

    /// The map's pixels as cells on the slide.
    pub fn grid(&self) -> CellGrid {
        let (w, h) = self.image.dimensions();
        let (origin, side) = self.field;
        CellGrid {
            origin,
            cell: side / f64::from(w.max(1)),
            cols: w,
            rows: h,
        }
    }

    /// The map in magma, half over the image.
    pub fn overlay(&self) -> egui::ColorImage {
        let (w, h) = self.image.dimensions();
        let mut pixels = Vec::with_capacity((w * h) as usize);
        for (i, p) in self.image.pixels().enumerate() {
            let c = Colormap::Magma.rgb8(self.map.get(i).copied().unwrap_or(0.0));
            let mix = |k: usize| ((u16::from(c[k]) + u16::from(p.0[k])) / 2) as u8;
            pixels.push(egui::Color32::from_rgb(mix(0), mix(1), mix(2)));
        }
        egui::ColorImage::new([w as usize, h as usize], pixels)
    }
}

type CamResult = Result<Vec<CamTile>, String>;

/// Results kept for fields visited before.
const CACHE: usize = 12;

pub struct GradcamState {
    pub target: CamTarget,
    pub class: usize,
    classes: Option<(PathBuf, Vec<String>)>,
    job: Option<(CamKey, Receiver<CamResult>, std::time::Instant)>,
    cache: Vec<(CamKey, CamResult)>,
    shown: Option<(CamKey, Vec<(String, egui::TextureHandle)>)>,
    /// The key of the result the panel shows.
    current: Option<CamKey>,
    pub message: Option<String>,
    /// The map (index into the tiles) laid over the slide, if any; kept for the next field.
    pub on_slide: Option<usize>,
    /// Recompute for the view centre whenever the view has moved and the worker is free.
    pub follow: bool,
    pub opacity: f32,
    /// Map values below it are not drawn over the slide.
    pub threshold: f32,
    overlay: Arc<Mutex<OverlayData>>,
    /// The result and map the overlay data holds.
    overlay_source: Option<(CamKey, usize)>,
}

impl Default for GradcamState {
    fn default() -> Self {
        GradcamState {
            target: CamTarget::Dmsl,
            class: 0,
            classes: None,
            job: None,
            cache: Vec::new(),
            shown: None,
            current: None,
            message: None,
            on_slide: None,
            follow: false,
            opacity: 0.5,
            threshold: 0.0,
            overlay: Arc::default(),
            overlay_source: None,
        }
    }
}

/// What the panel asks the app to do.
pub enum GradcamAction {
    None,
    Compute,
}

impl GradcamState {
    /// Following the view from the start (`--gradcam`): the first branch's last convolution over the
    /// slide.
    pub fn following(follow: bool) -> Self {
        GradcamState {
            follow,
            on_slide: follow.then_some(1),
            ..GradcamState::default()
        }
    }

    pub fn is_busy(&self) -> bool {
        self.job.is_some()
    }

    /// The maps of the last finished computation.
    pub fn tiles(&self) -> Option<&[CamTile]> {
        let key = self.current.as_ref()?;
        self.cache
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, r)| r.as_ref().ok())
            .map(Vec::as_slice)
    }

    /// The map laid over `slide`, if one is picked and belongs to that slide.
    pub fn overlay_for(&mut self, slide: &Path) -> Option<GridOverlay> {
        let index = self.on_slide?;
        let key = self.current.clone().filter(|k| k.slide == slide)?;
        let tile = self.tiles()?.get(index)?;
        let grid = tile.grid();
        let source = Some((key, index));
        if self.overlay_source != source {
            let values = tile.map.clone();
            if values.len() != grid.cols as usize * grid.rows as usize {
                return None;
            }
            self.overlay.lock().reset(grid.cols, grid.rows, values);
            self.overlay_source = source;
        }
        Some(GridOverlay {
            layer: Layer::Gradcam,
            data: self.overlay.clone(),
            grid,
            style: OverlayStyle {
                colormap: Colormap::Magma,
                opacity: self.opacity,
                threshold: self.threshold,
            },
        })
    }

    /// The legend's title for the map over the slide.
    pub fn overlay_title(&self) -> Option<String> {
        let tile = self.tiles()?.get(self.on_slide?)?;
        Some(format!("Grad-CAM · {}", tile.title))
    }

    /// Starts (or takes from the cache) the maps of the field centred on `centre` (level 0).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        &mut self,
        ctx: &egui::Context,
        slide: Arc<Slide>,
        centre: [f64; 2],
        mpp: Option<f64>,
        dmsl_model: Option<PathBuf>,
        dmsl_cache: ModelCache,
        magnification_model: Option<PathBuf>,
    ) {
        self.message = None;
        let model = match self.target {
            CamTarget::Dmsl => dmsl_model,
            CamTarget::Magnification => magnification_model,
        };
        let Some(model) = model.filter(|p| p.is_file()) else {
            self.message = Some("No model file for this Grad-CAM: choose one above.".into());
            return;
        };
        let key = CamKey {
            slide: slide.path().to_path_buf(),
            model: model.clone(),
            target: self.target,
            class: self.class,
            centre: [centre[0].round() as i64, centre[1].round() as i64],
        };
        if let Some((_, cached)) = self.cache.iter().find(|(k, _)| *k == key) {
            self.message = cached.as_ref().err().cloned();
            self.current = Some(key);
            return;
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let (target, class, repaint) = (self.target, self.class, ctx.clone());
        let spawned = std::thread::Builder::new()
            .name("gradcam".into())
            .spawn(move || {
                let result = super::run_model_work(|| {
                    compute(target, &model, &dmsl_cache, &slide, centre, mpp, class)
                });
                let _ = tx.send(result);
                repaint.request_repaint();
            });
        match spawned {
            Ok(_) => self.job = Some((key, rx, std::time::Instant::now())),
            Err(e) => self.message = Some(format!("cannot start a worker: {e}")),
        }
    }

    /// Collects a finished job.
    pub fn poll(&mut self) {
        let Some((_, rx, _)) = &self.job else { return };
        let Ok(result) = rx.try_recv() else { return };
        let Some((key, _, started)) = self.job.take() else {
            return;
        };
        log::info!(
            "Grad-CAM of the field at {:?} in {} ms",
            key.centre,
            started.elapsed().as_millis()
        );
        if let Err(e) = &result {
            self.message = Some(e.clone());
        }
        self.cache.retain(|(k, _)| *k != key);
        self.cache.push((key.clone(), result));
        if self.cache.len() > CACHE {
            self.cache.drain(..1);
        }
        self.current = Some(key);
    }

    /// The class names of a DMSL model file: those of the loaded model when a worker has loaded it,
    /// else read from the file once.
    fn class_names(&mut self, model: &Path, loaded: Option<Vec<String>>) -> &[String] {
        if let Some(names) = loaded {
            self.classes = Some((model.to_path_buf(), names));
        }
        let stale = self.classes.as_ref().is_none_or(|(p, _)| p != model);
        if stale {
            let names = std::fs::read(model)
                .ok()
                .and_then(|b| read_meta(&b).ok())
                .map(|m| m.classes)
                .unwrap_or_default();
            self.classes = Some((model.to_path_buf(), names));
        }
        self.classes.as_ref().map_or(&[], |(_, c)| c.as_slice())
    }

    /// Textures of the current result, made once per result.
    fn textures(&mut self, ctx: &egui::Context) -> Vec<(String, egui::TextureHandle)> {
        let Some(key) = self.current.clone() else {
            return Vec::new();
        };
        if self.shown.as_ref().is_none_or(|(k, _)| *k != key) {
            let textures = self
                .tiles()
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let tex = ctx.load_texture(
                        format!("gradcam-{i}"),
                        t.overlay(),
                        egui::TextureOptions::NEAREST,
                    );
                    (t.title.clone(), tex)
                })
                .collect();
            self.shown = Some((key, textures));
        }
        self.shown.as_ref().map_or(Vec::new(), |(_, t)| t.clone())
    }
}

/// The level-0 corner of a square of `side` centred on `centre`.
fn corner(centre: [f64; 2], side: f64) -> [f64; 2] {
    [
        (centre[0] - side / 2.0).max(0.0).round(),
        (centre[1] - side / 2.0).max(0.0).round(),
    ]
}

fn compute(
    target: CamTarget,
    model: &Path,
    dmsl_cache: &ModelCache,
    slide: &Slide,
    centre: [f64; 2],
    mpp: Option<f64>,
    class: usize,
) -> CamResult {
    // The GPU when built with one (and present), else the CPU.
    let device = crate::nn::device::select(crate::nn::device::DeviceChoice::Auto)
        .map_err(|e| e.to_string())?;
    let taps = [(Tap::Low, "first conv"), (Tap::High, "last conv")];
    let mut tiles = Vec::new();
    match target {
        CamTarget::Dmsl => {
            let (m, _) = load_model(dmsl_cache, model)?;
            let g = m.geometry();
            let mpp = mpp.ok_or("the slide's µm/px is unknown: calibrate it first")?;
            crate::dmsl::heatmap::field_scale(mpp, g.high_magnification)?;
            let side = g.level0_side(mpp);
            let [x, y] = corner(centre, side);
            let field = read_field(slide, x, y, side, g.high_px()).map_err(|e| e.to_string())?;
            let class = class.min(m.classes().len().saturating_sub(1));
            let mut per_tap = Vec::new();
            for (tap, name) in taps {
                per_tap.push((
                    name,
                    m.gradcam(&field, class, tap).map_err(|e| e.to_string())?,
                ));
            }
            // Rows: branches; columns: first and last convolution.
            for b in 0..m.layout.branch_magnifications.len() {
                for (name, branches) in &per_tap {
                    let (mag, image, cam) = &branches[b];
                    tiles.push(CamTile::new(
                        format!("{mag}x · {name}"),
                        image.clone(),
                        cam,
                        ([x, y], side),
                    ));
                }
            }
        }
        CamTarget::Magnification => {
            let m = MagnificationModel::load(model, &device).map_err(|e| e.to_string())?;
            let size = m.input_size();
            let [x, y] = corner(centre, f64::from(size));
            let region = slide
                .read_region(0, x as i64, y as i64, size, size)
                .map_err(|e| e.to_string())?;
            let crop = to_rgb(&region);
            for (tap, name) in taps {
                let cam = m.gradcam(&crop, tap).map_err(|e| e.to_string())?;
                tiles.push(CamTile::new(
                    format!("magnification · {name}"),
                    crop.clone(),
                    &cam,
                    ([x, y], f64::from(size)),
                ));
            }
        }
    }
    Ok(tiles)
}

/// The side panel's "Grad-CAM" section.
pub fn section(
    ui: &mut egui::Ui,
    state: &mut GradcamState,
    dmsl_model: Option<&Path>,
    dmsl_classes: Option<Vec<String>>,
) -> GradcamAction {
    let mut action = GradcamAction::None;
    egui::CollapsingHeader::new("Grad-CAM")
        .default_open(false)
        .show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.radio_value(&mut state.target, CamTarget::Dmsl, "DMSL");
                ui.radio_value(&mut state.target, CamTarget::Magnification, "Magnification");
            });
            if state.target == CamTarget::Dmsl
                && let Some(model) = dmsl_model
            {
                let names = state.class_names(model, dmsl_classes).to_vec();
                if !names.is_empty() {
                    state.class = state.class.min(names.len() - 1);
                    egui::ComboBox::from_label("Class")
                        .selected_text(names[state.class].clone())
                        .show_ui(ui, |ui| {
                            for (i, n) in names.iter().enumerate() {
                                ui.selectable_value(&mut state.class, i, n);
                            }
                        });
                }
            }
            ui.horizontal(|ui| {
                let button = ui.add_enabled(
                    !state.is_busy() && !state.follow,
                    egui::Button::new("Grad-CAM of the view centre"),
                );
                if button.clicked() {
                    action = GradcamAction::Compute;
                }
                if state.is_busy() {
                    ui.spinner();
                }
            });
            ui.checkbox(&mut state.follow, "Follow the view")
                .on_hover_text("Recompute for the view centre whenever the view moves");
            if let Some(m) = &state.message {
                ui.colored_label(ui.visuals().warn_fg_color, m);
            }
            let textures = state.textures(ui.ctx());
            // Two maps a row: the first and the last convolution of one branch. A click lays a map
            // over the slide (or takes it off).
            for (r, row) in textures.chunks(2).enumerate() {
                ui.horizontal(|ui| {
                    for (c, (title, tex)) in row.iter().enumerate() {
                        let index = 2 * r + c;
                        ui.vertical(|ui| {
                            ui.small(title);
                            let image = egui::Image::new((tex.id(), egui::vec2(128.0, 128.0)))
                                .sense(egui::Sense::click());
                            let response = ui.add(image);
                            if state.on_slide == Some(index) {
                                ui.painter().rect_stroke(
                                    response.rect.expand(1.0),
                                    0.0,
                                    egui::Stroke::new(2.0, ui.visuals().selection.stroke.color),
                                    egui::StrokeKind::Outside,
                                );
                            }
                            let response =
                                response.on_hover_text("Click to lay this map over the slide");
                            response.widget_info(|| {
                                egui::WidgetInfo::labeled(
                                    egui::Role::Button,
                                    true,
                                    format!("Show {title} over the slide"),
                                )
                            });
                            if response.clicked() {
                                state.on_slide = (state.on_slide != Some(index)).then_some(index);
                            }
                        });
                    }
                });
            }
            if !textures.is_empty() {
                super::heatmap::colour_bar(ui, Colormap::Magma, "Grad-CAM", 200.0);
                let shown = |i: Option<usize>| {
                    i.and_then(|i| textures.get(i))
                        .map_or("none".to_string(), |(t, _)| t.clone())
                };
                egui::ComboBox::from_label("Over the slide")
                    .selected_text(shown(state.on_slide))
                    .show_ui(ui, |ui| {
                        ui.selectable_value(&mut state.on_slide, None, "none");
                        for (i, (title, _)) in textures.iter().enumerate() {
                            ui.selectable_value(&mut state.on_slide, Some(i), title);
                        }
                    });
                if state.on_slide.is_some() {
                    ui.add(egui::Slider::new(&mut state.opacity, 0.0..=1.0).text("Map opacity"));
                    ui.add(egui::Slider::new(&mut state.threshold, 0.0..=1.0).text("Hide below"));
                }
            }
        });
    action
}
