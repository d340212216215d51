//! Model code only (no files, no GUI): backbones with feature taps for Grad-CAM, pooling with a
//! backward pass, checkpoints as bytes, device choice.

pub mod architectures;
pub mod backbone;
pub mod batch_norm;
pub mod blocked;
pub mod checkpoint;
pub mod conv_train;
pub mod cpu_conv;
pub mod depthwise;
pub mod device;
pub mod dmsl;
pub mod gradcam;
pub mod hagnifinder;
pub mod layers;
pub mod optim;
pub mod pool;
pub mod simd;
pub mod vars;
mod winograd_grad;

pub use backbone::{Arch, ArchSpec, Backbone, Features, Normalization, build};
