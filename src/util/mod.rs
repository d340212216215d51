//! Small helpers shared by the library: atomic file writes, memory facts, training-run folders.

pub mod colormap;
pub mod fs;
pub mod legend;
pub mod memory;
pub mod npy;
pub mod run;
