//! The magnification task (Hagnifinder): a trained model for inference, estimates for snapshots and
//! slides, training with the two ASM rounds, and the metrics.

pub mod estimate;
pub mod features;
pub mod loso;
pub mod metrics;
pub mod model;
pub mod red_cells;
pub mod ruler;
pub mod train;

pub use estimate::{Check, Estimate};
pub use metrics::MagnificationMetrics;
pub use model::{MagnificationModel, ModelError};
