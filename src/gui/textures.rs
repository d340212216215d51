//! GPU textures of tiles, bounded in bytes, filled from the streamer's cache under a per-frame
//! upload budget so that uploads never stall a frame.

use std::time::{Duration, Instant};

use egui::{ColorImage, TextureHandle, TextureOptions};

use crate::tiles::{ByteLru, TileKey, TileStreamer};

/// Time one frame may spend converting and uploading tiles.
const UPLOAD_BUDGET: Duration = Duration::from_millis(6);

pub struct TileTextures {
    textures: ByteLru<TileKey, TextureHandle>,
    /// Tiles that were ready but did not fit in this frame's budget.
    backlog: usize,
}

impl TileTextures {
    pub fn new(budget_bytes: usize) -> Self {
        TileTextures {
            textures: ByteLru::new(budget_bytes),
            backlog: 0,
        }
    }

    pub fn get(&mut self, key: TileKey) -> Option<&TextureHandle> {
        self.textures.get(&key)
    }

    pub fn contains(&self, key: TileKey) -> bool {
        self.textures.contains(&key)
    }

    pub fn backlog(&self) -> usize {
        self.backlog
    }

    pub fn used_bytes(&self) -> usize {
        self.textures.used_bytes()
    }

    pub fn len(&self) -> usize {
        self.textures.len()
    }

    pub fn is_empty(&self) -> bool {
        self.textures.is_empty()
    }

    /// Uploads cached tiles among `keys` (in priority order) that have no texture yet, until the frame's
    /// time budget is spent (at least one per frame, so progress never stops).
    pub fn upload(&mut self, ctx: &egui::Context, streamer: &TileStreamer, keys: &[TileKey]) {
        let start = Instant::now();
        self.backlog = 0;
        let mut uploaded = 0usize;
        for &key in keys {
            if self.textures.contains(&key) {
                continue;
            }
            let Some(tile) = streamer.get(key) else {
                continue;
            };
            if uploaded > 0 && start.elapsed() > UPLOAD_BUDGET {
                self.backlog += 1;
                continue;
            }
            let (w, h) = tile.image.dimensions();
            let image =
                ColorImage::from_rgba_unmultiplied([w as usize, h as usize], tile.image.as_raw());
            let name = format!("tile-{}-{}-{}", key.level, key.col, key.row);
            let handle = ctx.load_texture(name, image, TextureOptions::LINEAR);
            self.textures
                .insert(key, handle, (w * h * 4) as usize, false);
            uploaded += 1;
        }
        if self.backlog > 0 {
            ctx.request_repaint();
        }
    }
}
