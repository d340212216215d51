//! Thumbnails for the labelling grid, made in the background: the grid says each frame which images
//! it shows, worker threads make the missing ones (from a disk cache when they were made before), and
//! the textures of the most recently shown stay in memory up to a bound. Images scrolled past before
//! their turn are never decoded.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};

use crate::slide::Slide;

/// Side of a thumbnail in pixels.
pub const SIDE: u32 = 96;
/// Textures kept in memory (96x96 RGBA: 36 KiB each).
const KEPT: usize = 1500;

type Made = (PathBuf, Result<egui::ColorImage, String>);

/// The queue the workers take from: the latest frame's wish list, nearest first, the number of
/// thumbnails being made, and whether to shut down.
#[derive(Default)]
struct Wanted {
    list: Mutex<(Vec<PathBuf>, usize, bool)>,
    ready: Condvar,
}

pub struct Thumbnails {
    wanted: Arc<Wanted>,
    done_rx: Receiver<Made>,
    textures: HashMap<PathBuf, Result<egui::TextureHandle, String>>,
    /// Use order, oldest first, for eviction.
    order: VecDeque<PathBuf>,
}

impl Thumbnails {
    /// Starts `workers` threads that cache thumbnails under `cache_dir`.
    pub fn new(cache_dir: PathBuf, workers: usize, repaint: egui::Context) -> Self {
        let wanted = Arc::new(Wanted::default());
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        for i in 0..workers.max(1) {
            let (wanted, done_tx, cache_dir, repaint) = (
                wanted.clone(),
                done_tx.clone(),
                cache_dir.clone(),
                repaint.clone(),
            );
            let _ = std::thread::Builder::new()
                .name(format!("thumbnails-{i}"))
                .spawn(move || worker(&wanted, &done_tx, &cache_dir, &repaint));
        }
        Thumbnails {
            wanted,
            done_rx,
            textures: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Says which images the grid shows now (nearest first); only these are made.
    pub fn want(&mut self, paths: impl IntoIterator<Item = PathBuf>) {
        let missing: Vec<PathBuf> = paths
            .into_iter()
            .filter(|p| !self.textures.contains_key(p))
            .collect();
        let mut w = self.wanted.list.lock();
        w.0 = missing;
        if !w.0.is_empty() {
            self.wanted.ready.notify_all();
        }
    }

    /// Uploads what the workers made since the last frame.
    pub fn collect(&mut self, ctx: &egui::Context) {
        for (path, made) in self.done_rx.try_iter() {
            let entry = made.map(|img| {
                ctx.load_texture(
                    format!("thumb-{}", path.display()),
                    img,
                    egui::TextureOptions::LINEAR,
                )
            });
            self.order.push_back(path.clone());
            self.textures.insert(path, entry);
        }
        while self.textures.len() > KEPT {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.textures.remove(&old);
        }
    }

    /// The thumbnail of `path`, if made (or why it cannot be).
    pub fn get(&self, path: &Path) -> Option<&Result<egui::TextureHandle, String>> {
        self.textures.get(path)
    }

    /// Whether workers still have thumbnails to make for the current wish list, or are making one,
    /// or one is made but not yet uploaded.
    pub fn is_busy(&self) -> bool {
        let w = self.wanted.list.lock();
        !w.0.is_empty() || w.1 > 0 || !self.done_rx.is_empty()
    }
}

impl Drop for Thumbnails {
    fn drop(&mut self) {
        let mut w = self.wanted.list.lock();
        w.2 = true;
        self.wanted.ready.notify_all();
    }
}

fn worker(wanted: &Wanted, done: &Sender<Made>, cache_dir: &Path, repaint: &egui::Context) {
    loop {
        let path = {
            let mut w = wanted.list.lock();
            loop {
                if w.2 {
                    return;
                }
                if !w.0.is_empty() {
                    w.1 += 1;
                    break w.0.remove(0);
                }
                wanted.ready.wait(&mut w);
            }
        };
        let made = thumbnail(&path, cache_dir);
        // Sent before the count drops, so that `is_busy` never sees neither.
        let sent = done.send((path, made));
        wanted.list.lock().1 -= 1;
        if sent.is_err() {
            return;
        }
        repaint.request_repaint();
    }
}

/// The cache file of `path`: keyed by its path, size and modification time, so that an edited
/// image gets a new thumbnail.
fn cache_file(path: &Path, cache_dir: &Path) -> Option<PathBuf> {
    let meta = std::fs::metadata(path).ok()?;
    let modified = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    let key = format!("{}\0{}\0{modified}", path.display(), meta.len());
    let id = crate::dmsl::heatmap::content_id(key.as_bytes());
    Some(cache_dir.join(format!("{id}.png")))
}

fn thumbnail(path: &Path, cache_dir: &Path) -> Result<egui::ColorImage, String> {
    let cached = cache_file(path, cache_dir);
    if let Some(img) = cached
        .as_ref()
        .and_then(|c| image::open(c).ok())
        .map(|i| i.to_rgba8())
    {
        return Ok(to_color_image(&img));
    }
    let slide = Slide::open(path).map_err(|e| e.to_string())?;
    let thumb = slide.thumbnail(SIDE).map_err(|e| e.to_string())?;
    if let Some(c) = cached {
        let mut png = Vec::new();
        let written = image::DynamicImage::ImageRgba8(thumb.clone())
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .is_ok();
        // A cache that cannot be written only costs time.
        if written {
            let _ = crate::util::fs::write_atomic(&c, &png);
        }
    }
    Ok(to_color_image(&thumb))
}

fn to_color_image(img: &image::RgbaImage) -> egui::ColorImage {
    egui::ColorImage::from_rgba_unmultiplied(
        [img.width() as usize, img.height() as usize],
        img.as_raw(),
    )
}
