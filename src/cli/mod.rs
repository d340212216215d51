//! Headless commands of the binary.

pub mod bench;
pub mod bench_model;
pub mod info;
pub mod magnification;
