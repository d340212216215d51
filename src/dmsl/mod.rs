//! The DMSL task: two-magnification classification of fields of view. A trained model for inference,
//! training (frozen parts cached across epochs and folds) and evaluation with the paper's comparison
//! modes, classification metrics, and slide
//! heatmaps (tiling, caching in a sidecar, export).

pub mod frozen;
pub mod heatmap;
pub mod metrics;
pub mod model;
pub mod train;

pub use metrics::ClassificationMetrics;
pub use model::{DmslModel, ModelError};
