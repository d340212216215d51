//! Headless commands of the binary.

pub mod bench;
pub mod info;
