//! Small helpers shared by the library: atomic file writes, memory facts.

pub mod fs;
pub mod memory;
