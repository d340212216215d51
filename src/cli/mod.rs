//! Headless commands of the binary.

pub mod bench;
pub mod bench_heatmap;
pub mod bench_model;
pub mod bench_predict;
pub mod bench_window;
pub mod calibrate;
pub mod dmsl;
pub mod gradcam;
pub mod info;
pub mod magnification;
pub mod runs;
pub mod shard;
