//! Tile streaming: tile keys and grid geometry, a byte-bounded cache, view planning (which tiles, in
//! which order) and a pool of loader threads with cancellation.

mod cache;
mod grid;
mod loader;
mod view;

pub use cache::ByteLru;
pub use grid::{TileGrid, TileKey};
pub use loader::{StreamerStats, Tile, TileStreamer};
pub use view::{Rect, TilePlan, Viewport, plan_tiles};

/// Default tile side in pixels (DeepZoom-compatible tiles without overlap).
pub const DEFAULT_TILE_SIZE: u32 = 256;
