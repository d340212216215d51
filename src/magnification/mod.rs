//! The magnification task (Hagnifinder): a trained model for inference, estimates for snapshots and
//! slides, training with the two ASM rounds, and the metrics.

pub mod estimate;
pub mod metrics;
pub mod model;
pub mod train;

pub use estimate::{Estimate, SlideCheck};
pub use metrics::MagnificationMetrics;
pub use model::{MagnificationModel, ModelError};
