//! A pool of loader threads that read tiles in priority order into a byte-bounded cache.
//!
//! The viewer calls [`TileStreamer::request`] each frame with the tiles it wants, most urgent first;
//! queued tiles that are no longer wanted are cancelled. Decoded tiles land in the cache and a
//! callback (the GUI's repaint request) is called.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use image::RgbaImage;
use parking_lot::{Condvar, Mutex};

use super::{ByteLru, TileGrid, TileKey};
use crate::slide::Slide;

/// A decoded tile: straight-alpha RGBA.
#[derive(Debug)]
pub struct Tile {
    pub key: TileKey,
    pub image: RgbaImage,
}

/// Counters for the status bar and the benchmark.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamerStats {
    pub loaded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub queued: usize,
    pub in_flight: usize,
    pub cache_bytes: usize,
    pub cache_budget: usize,
    pub cache_tiles: usize,
}

#[derive(Default)]
struct Queue {
    order: VecDeque<TileKey>,
    queued: HashSet<TileKey>,
    in_flight: HashSet<TileKey>,
    failed: HashMap<TileKey, String>,
    /// Loaders take no new tile while paused (e.g. while the window is hidden).
    paused: bool,
    shutdown: bool,
}

struct Shared {
    slide: Arc<Slide>,
    grid: TileGrid,
    queue: Mutex<Queue>,
    wake: Condvar,
    cache: Mutex<ByteLru<TileKey, Arc<Tile>>>,
    pinned: HashSet<TileKey>,
    on_tile: Box<dyn Fn() + Send + Sync>,
    loaded: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    last_error: Mutex<Option<String>>,
}

pub struct TileStreamer {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl TileStreamer {
    /// Starts `threads` loaders over `slide`, caching up to `cache_budget` bytes of decoded tiles.
    /// The coarsest level is loaded first and pinned (always resident) when it takes at most a quarter
    /// of the budget. `on_tile` is called from a loader thread after each tile arrives.
    pub fn new(
        slide: Arc<Slide>,
        tile_size: u32,
        threads: usize,
        cache_budget: usize,
        on_tile: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        let grid = TileGrid::new(slide.info().levels.clone(), tile_size);
        let top = grid.coarsest_level();
        let top_bytes: usize = grid.level_tiles(top).map(|k| grid.tile_bytes(k)).sum();
        let pinned: HashSet<TileKey> = if top_bytes <= cache_budget / 4 {
            grid.level_tiles(top).collect()
        } else {
            HashSet::new()
        };
        let mut queue = Queue::default();
        for k in grid.level_tiles(top).filter(|k| pinned.contains(k)) {
            queue.order.push_back(k);
            queue.queued.insert(k);
        }
        let shared = Arc::new(Shared {
            slide,
            grid,
            queue: Mutex::new(queue),
            wake: Condvar::new(),
            cache: Mutex::new(ByteLru::new(cache_budget)),
            pinned,
            on_tile: Box::new(on_tile),
            loaded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            last_error: Mutex::new(None),
        });
        let workers = (0..threads.max(1))
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("tile-loader-{i}"))
                    .spawn(move || worker(&s))
                    .expect("spawning a tile loader thread")
            })
            .collect();
        TileStreamer { shared, workers }
    }

    pub fn grid(&self) -> &TileGrid {
        &self.shared.grid
    }

    pub fn slide(&self) -> &Arc<Slide> {
        &self.shared.slide
    }

    /// Replaces the queue with `wanted` (most urgent first), skipping tiles already cached, loading or
    /// failed. Queued tiles not in `wanted` are cancelled. Missing pinned tiles are kept at the end.
    pub fn request(&self, wanted: &[TileKey]) {
        let cache = self.shared.cache.lock();
        let mut q = self.shared.queue.lock();
        let mut order = VecDeque::with_capacity(wanted.len());
        let mut queued = HashSet::with_capacity(wanted.len());
        let pinned_missing = self.shared.pinned.iter().filter(|k| !cache.contains(k));
        for &k in wanted.iter().chain(pinned_missing) {
            if cache.contains(&k)
                || q.in_flight.contains(&k)
                || q.failed.contains_key(&k)
                || !queued.insert(k)
            {
                continue;
            }
            order.push_back(k);
        }
        drop(cache);
        let cancelled = q.queued.difference(&queued).count() as u64;
        self.shared
            .cancelled
            .fetch_add(cancelled, Ordering::Relaxed);
        q.order = order;
        q.queued = queued;
        let any = !q.order.is_empty();
        drop(q);
        if any {
            self.shared.wake.notify_all();
        }
    }

    /// Stops (or restarts) the loaders taking queued tiles; tiles being read finish.
    pub fn set_paused(&self, paused: bool) {
        self.shared.queue.lock().paused = paused;
        if !paused {
            self.shared.wake.notify_all();
        }
    }

    /// A cached tile, marked as recently used.
    pub fn get(&self, key: TileKey) -> Option<Arc<Tile>> {
        self.shared.cache.lock().get(&key).cloned()
    }

    pub fn is_cached(&self, key: TileKey) -> bool {
        self.shared.cache.lock().contains(&key)
    }

    /// Tiles queued or being read.
    pub fn pending(&self) -> usize {
        let q = self.shared.queue.lock();
        q.order.len() + q.in_flight.len()
    }

    /// Blocks until nothing is queued or loading (for the CLI and tests).
    pub fn wait_idle(&self) {
        while self.pending() > 0 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// The tile's error, if reading it failed.
    pub fn tile_error(&self, key: TileKey) -> Option<String> {
        self.shared.queue.lock().failed.get(&key).cloned()
    }

    /// The most recent read error, once.
    pub fn take_error(&self) -> Option<String> {
        self.shared.last_error.lock().take()
    }

    pub fn set_cache_budget(&self, bytes: usize) {
        self.shared.cache.lock().set_budget(bytes);
    }

    pub fn stats(&self) -> StreamerStats {
        let (queued, in_flight) = {
            let q = self.shared.queue.lock();
            (q.order.len(), q.in_flight.len())
        };
        let c = self.shared.cache.lock();
        StreamerStats {
            loaded: self.shared.loaded.load(Ordering::Relaxed),
            failed: self.shared.failed.load(Ordering::Relaxed),
            cancelled: self.shared.cancelled.load(Ordering::Relaxed),
            queued,
            in_flight,
            cache_bytes: c.used_bytes(),
            cache_budget: c.budget(),
            cache_tiles: c.len(),
        }
    }
}

impl Drop for TileStreamer {
    fn drop(&mut self) {
        self.shared.queue.lock().shutdown = true;
        self.shared.wake.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(s: &Shared) {
    loop {
        let key = {
            let mut q = s.queue.lock();
            loop {
                if q.shutdown {
                    return;
                }
                if !q.paused
                    && let Some(k) = q.order.pop_front()
                {
                    q.queued.remove(&k);
                    q.in_flight.insert(k);
                    break k;
                }
                s.wake.wait(&mut q);
            }
        };
        let (x0, y0) = s.grid.tile_origin_level0(key);
        let (_, _, w, h) = s.grid.tile_pixels(key);
        let result = s.slide.read_region(key.level as usize, x0, y0, w, h);
        match result {
            Ok(image) => {
                let bytes = image.as_raw().len();
                let pinned = s.pinned.contains(&key);
                s.cache
                    .lock()
                    .insert(key, Arc::new(Tile { key, image }), bytes, pinned);
                s.loaded.fetch_add(1, Ordering::Relaxed);
                s.queue.lock().in_flight.remove(&key);
            }
            Err(e) => {
                let msg = e.to_string();
                log::warn!("tile {key:?}: {msg}");
                s.failed.fetch_add(1, Ordering::Relaxed);
                *s.last_error.lock() = Some(msg.clone());
                let mut q = s.queue.lock();
                q.in_flight.remove(&key);
                q.failed.insert(key, msg);
            }
        }
        (s.on_tile)();
    }
}
