//! The eframe application: menu, viewer canvas, side panel, status bar. Uses the library's slide and
//! tile APIs; nothing in the library depends on this module.

mod app;
mod frame_stats;
pub mod heatmap;
pub mod magnification;
pub mod overlay;
mod side_panel;
mod status_bar;
mod textures;
mod viewer;

pub use app::{HistolensApp, LaunchOptions};
pub use frame_stats::{FrameStats, FrameSummary};
pub use viewer::{SlideView, scale_bar_length};

/// Opens the main window and runs until it is closed.
pub fn run(options: LaunchOptions) -> eframe::Result<()> {
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("histolens")
            .with_inner_size([1280.0, 800.0])
            .with_min_inner_size([480.0, 320.0])
            .with_drag_and_drop(true),
        persist_window: true,
        ..Default::default()
    };
    eframe::run_native(
        "histolens",
        native,
        Box::new(move |cc| Ok(Box::new(HistolensApp::new(cc, options)))),
    )
}
