//! The side panel: slide facts, pyramid levels, calibration by hand, associated images, all properties.

use egui::RichText;

use super::viewer::{SlideView, fit_size};
use crate::slide::{Calibration, CalibrationStore, Camera, CameraStore};

/// What the panel asks the app to do.
pub enum SidePanelAction {
    None,
    SaveCalibration(Calibration),
    SaveCamera(String, Camera),
}

pub fn show(
    ui: &mut egui::Ui,
    view: &mut SlideView,
    store_ok: bool,
    cameras: Option<&CameraStore>,
    filter: &mut String,
) -> SidePanelAction {
    let mut action = SidePanelAction::None;
    // The app puts the panel in a scroll area, with the model sections above.
    {
        let info = view.slide.info().clone();
        ui.heading("Slide");
        egui::Grid::new("facts")
            .num_columns(2)
            .striped(true)
            .show(ui, |ui| {
                ui.label("Format");
                ui.label(info.format_label());
                ui.end_row();
                let (w, h) = info.dimensions();
                ui.label("Dimensions");
                ui.label(format!("{w} × {h} px"));
                ui.end_row();
                ui.label("Pixel size");
                match view.mpp() {
                    Some(m) => ui.label(format!("{:.4} µm/px ({})", m.mean(), m.source.label())),
                    None => ui.label(RichText::new("unknown").italics()),
                };
                ui.end_row();
                ui.label("Magnification");
                match view.mpp() {
                    Some(m) => ui.label(format!("{:.1}x equivalent", m.magnification())),
                    None => ui.label(RichText::new("unknown").italics()),
                };
                ui.end_row();
                ui.label("Objective power");
                match info.objective_power {
                    Some(p) => ui.label(format!("{p}x (scanner metadata)")),
                    None => ui.label(RichText::new("not in metadata").italics()),
                };
                ui.end_row();
            });

        ui.add_space(6.0);
        egui::CollapsingHeader::new("Pyramid levels")
            .default_open(true)
            .show(ui, |ui| {
                egui::Grid::new("levels")
                    .num_columns(3)
                    .striped(true)
                    .show(ui, |ui| {
                        ui.strong("Level");
                        ui.strong("Size");
                        ui.strong("Downsample");
                        ui.end_row();
                        for (i, l) in info.levels.iter().enumerate() {
                            ui.label(i.to_string());
                            ui.label(format!("{} × {}", l.width, l.height));
                            ui.label(format!("{:.4}", l.downsample));
                            ui.end_row();
                        }
                    });
            });

        egui::CollapsingHeader::new("Calibration").default_open(info.mpp.is_none()).show(ui, |ui| {
            ui.label("Set the pixel size or the objective power by hand; it is remembered for this file.");
            let edit = &mut view.calibration_edit;
            let mut has_mpp = edit.mpp.is_some();
            ui.horizontal(|ui| {
                let label = ui.checkbox(&mut has_mpp, "µm/px").id;
                let mut v = edit.mpp.unwrap_or(0.5);
                ui.add_enabled(has_mpp, egui::DragValue::new(&mut v).speed(0.001).range(0.02..=100.0).max_decimals(4))
                    .labelled_by(label);
                edit.mpp = has_mpp.then_some(v);
            });
            let mut has_power = edit.objective_power.is_some();
            ui.horizontal(|ui| {
                let label = ui.checkbox(&mut has_power, "objective").id;
                let mut v = edit.objective_power.unwrap_or(20.0);
                ui.add_enabled(has_power, egui::DragValue::new(&mut v).speed(0.1).range(0.5..=200.0).suffix("x"))
                    .labelled_by(label);
                edit.objective_power = has_power.then_some(v);
            });
            ui.horizontal(|ui| {
                if ui.button("Apply calibration").clicked() {
                    action = SidePanelAction::SaveCalibration(view.calibration_edit);
                }
                if ui.button("Clear calibration").clicked() {
                    view.calibration_edit = Calibration::default();
                    action = SidePanelAction::SaveCalibration(Calibration::default());
                }
            });
            // From a scale bar in the image: draw a line along it, type its length.
            ui.horizontal(|ui| {
                let label = if view.measuring { "Stop measuring" } else { "Measure a scale bar" };
                if ui
                    .button(label)
                    .on_hover_text("Then drag along the scale bar in the image")
                    .clicked()
                {
                    view.measuring = !view.measuring;
                }
                if let Some(px) = view.scale_line_px() {
                    ui.label(format!("{px:.1} px"));
                }
            });
            if let Some(px) = view.scale_line_px() {
                ui.horizontal(|ui| {
                    let label = ui.label("Bar length").id;
                    ui.add(
                        egui::DragValue::new(&mut view.scale_bar_um)
                            .speed(1.0)
                            .range(0.01..=100_000.0)
                            .suffix(" µm"),
                    )
                    .labelled_by(label);
                    if ui.button("Set µm/px from the bar").clicked() {
                        let mpp = view.scale_bar_um / px;
                        view.measuring = false;
                        view.scale_line = None;
                        action = SidePanelAction::SaveCalibration(Calibration {
                            mpp: Some(mpp),
                            objective_power: None,
                        });
                    }
                });
            }
            if let Some(a) = camera_editor(ui, view, cameras) {
                action = a;
            }
            if !store_ok {
                ui.colored_label(ui.visuals().warn_fg_color, "The calibration store could not be read: changes last for this session only.");
            }
        });

        if !view.associated.is_empty() {
            egui::CollapsingHeader::new("Associated images")
                .default_open(true)
                .show(ui, |ui| {
                    for (name, tex, size) in &view.associated {
                        ui.label(format!("{name} ({} × {})", size[0], size[1]));
                        ui.image((tex.id(), fit_size(*size, 260.0)));
                    }
                });
        }

        egui::CollapsingHeader::new(format!("Properties ({})", info.properties.len())).show(
            ui,
            |ui| {
                ui.horizontal(|ui| {
                    ui.label("Filter");
                    ui.text_edit_singleline(filter);
                });
                let needle = filter.to_lowercase();
                egui::Grid::new("props")
                    .num_columns(2)
                    .striped(true)
                    .show(ui, |ui| {
                        for (k, v) in &info.properties {
                            if !needle.is_empty()
                                && !k.to_lowercase().contains(&needle)
                                && !v.to_lowercase().contains(&needle)
                            {
                                continue;
                            }
                            ui.label(RichText::new(k).monospace());
                            let short: String = v.chars().take(80).collect();
                            ui.label(short).on_hover_text(v);
                            ui.end_row();
                        }
                    });
            },
        );
    }
    action
}

/// Microscope cameras: apply a saved one at an objective (the camera whose frames have this size
/// first, the objective nearest the estimate suggested), or save this file's scale as a camera.
fn camera_editor(
    ui: &mut egui::Ui,
    view: &mut SlideView,
    cameras: Option<&CameraStore>,
) -> Option<SidePanelAction> {
    let mut action = None;
    let (w, h) = view.slide.info().dimensions();
    let frame = u32::try_from(w).ok().zip(u32::try_from(h).ok());
    ui.separator();
    let saved: Vec<(String, Camera)> = cameras
        .map(|s| s.cameras().map(|(n, c)| (n.to_string(), *c)).collect())
        .unwrap_or_default();
    if !saved.iter().any(|(n, _)| *n == view.camera_name)
        && let Some((name, camera)) = saved
            .iter()
            .find(|(_, c)| frame.is_some() && c.frame == frame)
            .or(saved.first())
    {
        view.camera_name = name.clone();
        if let Some((est, _)) = view.estimated_mpp {
            view.camera_objective = camera.nearest_objective(est);
        }
    }
    if let Some((_, camera)) = saved.iter().find(|(n, _)| *n == view.camera_name) {
        ui.horizontal(|ui| {
            egui::ComboBox::from_label("camera")
                .selected_text(view.camera_name.clone())
                .show_ui(ui, |ui| {
                    for (name, _) in &saved {
                        ui.selectable_value(&mut view.camera_name, name.clone(), name);
                    }
                });
        });
        ui.horizontal(|ui| {
            let label = ui.label("at objective").id;
            ui.add(
                egui::DragValue::new(&mut view.camera_objective)
                    .speed(0.1)
                    .range(0.5..=200.0)
                    .suffix("x"),
            )
            .labelled_by(label);
            let mpp = camera.mpp_at(view.camera_objective);
            ui.label(format!("= {mpp:.4} µm/px"));
        });
        if let Some((est, _)) = view.estimated_mpp {
            let nearest = camera.nearest_objective(est);
            ui.weak(format!(
                "The estimate ({est:.3} µm/px) is nearest {nearest}x on this camera."
            ));
        }
        if ui.button("Apply camera").clicked() {
            action = Some(SidePanelAction::SaveCalibration(Calibration {
                mpp: Some(camera.mpp_at(view.camera_objective)),
                objective_power: Some(view.camera_objective),
            }));
        }
    }
    // A stated scale (metadata, scale bar, typed µm/px) can become a camera for later snapshots.
    if let Some(m) = view.mpp() {
        ui.horizontal(|ui| {
            ui.add(
                egui::TextEdit::singleline(&mut view.new_camera_name)
                    .hint_text("camera name")
                    .desired_width(110.0),
            );
            let label = ui.label("at").id;
            ui.add(
                egui::DragValue::new(&mut view.camera_objective)
                    .speed(0.1)
                    .range(0.5..=200.0)
                    .suffix("x"),
            )
            .labelled_by(label);
        });
        let name = view.new_camera_name.trim().to_string();
        let button = ui
            .add_enabled(!name.is_empty(), egui::Button::new("Save as camera"))
            .on_hover_text(
                "This file's µm/px at that objective gives the camera's µm/px at every objective",
            );
        if button.clicked()
            && let Some(camera) = Camera::from_snapshot(m.mean(), view.camera_objective, frame)
        {
            view.camera_name = name.clone();
            view.new_camera_name.clear();
            action = Some(SidePanelAction::SaveCamera(name, camera));
        }
    } else if saved.is_empty() {
        ui.weak("Once this file's scale is set, it can be saved as a camera for later snapshots.");
    }
    action
}

/// Saves a calibration, returning a message for the user on failure.
pub fn save_calibration(
    store: Option<&mut CalibrationStore>,
    view: &mut SlideView,
    c: Calibration,
) -> Option<String> {
    view.calibration = c;
    view.calibration_edit = c;
    let store = store?;
    store.set(view.slide.path(), c).err().map(|e| e.to_string())
}
