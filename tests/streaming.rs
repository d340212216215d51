//! The tile loader pool on a real snapshot pyramid: pinned coarsest level, priority order, cancellation,
//! byte budget.

use std::sync::Arc;

use histolens::slide::Slide;
use histolens::tiles::{TileGrid, TileKey, TileStreamer, Viewport, plan_tiles};

fn big_snapshot(dir: &std::path::Path) -> Arc<Slide> {
    let p = dir.join("big.png");
    let img = image::RgbaImage::from_fn(4096, 3072, |x, y| {
        image::Rgba([(x / 16) as u8, (y / 12) as u8, 128, 255])
    });
    img.save(&p).unwrap();
    Arc::new(Slide::open(&p).unwrap())
}

#[test]
fn coarsest_level_is_resident_and_budget_holds() {
    let dir = tempfile::tempdir().unwrap();
    let slide = big_snapshot(dir.path());
    assert_eq!(slide.info().levels.len(), 3, "4096 -> 2048 -> 1024");
    let budget = 60 * 256 * 256 * 4; // 60 tiles: the 12 coarsest fit in the quarter that may be pinned
    let s = TileStreamer::new(slide.clone(), 256, 2, budget, || {});
    s.wait_idle();
    let grid = TileGrid::new(slide.info().levels.clone(), 256);
    let top: Vec<TileKey> = grid.level_tiles(2).collect();
    assert_eq!(top.len(), 4 * 3);
    assert!(
        top.iter().all(|k| s.is_cached(*k)),
        "coarsest level loaded at start"
    );
    // Load all 192 level-0 tiles: the budget evicts level-0 tiles, never the pinned ones.
    let level0: Vec<TileKey> = grid.level_tiles(0).collect();
    s.request(&level0);
    s.wait_idle();
    let st = s.stats();
    assert!(st.cache_bytes <= budget, "{} > {budget}", st.cache_bytes);
    assert!(
        top.iter().all(|k| s.is_cached(*k)),
        "pinned tiles survive eviction"
    );
    assert_eq!(st.loaded as usize, top.len() + level0.len());
    // Pixels are right: tile (3, 2) of level 0 starts at (768, 512).
    let t = s
        .get(TileKey {
            level: 0,
            col: 3,
            row: 2,
        })
        .or_else(|| {
            s.request(&[TileKey {
                level: 0,
                col: 3,
                row: 2,
            }]);
            s.wait_idle();
            s.get(TileKey {
                level: 0,
                col: 3,
                row: 2,
            })
        });
    let t = t.unwrap();
    assert_eq!(
        t.image.get_pixel(0, 0).0,
        [(768 / 16) as u8, (512 / 12) as u8, 128, 255]
    );
}

#[test]
fn stale_requests_are_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let slide = big_snapshot(dir.path());
    let s = TileStreamer::new(slide.clone(), 64, 1, 1 << 30, || {});
    s.wait_idle();
    let grid = TileGrid::new(slide.info().levels.clone(), 64);
    let level0: Vec<TileKey> = grid.level_tiles(0).collect();
    assert!(level0.len() > 3000);
    let before = s.stats();
    // Paused, so that the loaders cannot take tiles between the two requests however threads run.
    s.set_paused(true);
    s.request(&level0);
    assert_eq!(s.stats().queued, level0.len());
    let last = *level0.last().unwrap();
    s.request(&[last]); // the view moved: everything else is cancelled
    s.set_paused(false);
    s.wait_idle();
    let st = s.stats();
    assert!(s.is_cached(last));
    assert_eq!(st.loaded - before.loaded, 1, "only the new tile loads");
    assert_eq!((st.cancelled - before.cancelled) as usize, level0.len() - 1);
}

#[test]
fn plan_and_streamer_cover_the_view() {
    let dir = tempfile::tempdir().unwrap();
    let slide = big_snapshot(dir.path());
    let s = TileStreamer::new(slide.clone(), 256, 2, 1 << 30, || {});
    let vp = Viewport {
        center: [2000.0, 1500.0],
        scale: 0.5,
        size: [800.0, 600.0],
    };
    let plan = plan_tiles(s.grid(), &vp, 1.0, 1, None);
    assert_eq!(plan.level, 1);
    s.request(&plan.wanted);
    s.wait_idle();
    assert!(plan.wanted.iter().all(|k| s.is_cached(*k)));
    // The visible tiles cover the visible rectangle (clipped to the slide).
    let r = vp.visible_rect();
    let covered: f64 = plan
        .visible
        .iter()
        .map(|k| {
            let t = s.grid().tile_rect_level0(*k);
            (t.x1.min(r.x1) - t.x0.max(r.x0)).max(0.0) * (t.y1.min(r.y1) - t.y0.max(r.y0)).max(0.0)
        })
        .sum();
    assert!((covered - r.width() * r.height()).abs() < 1.0);
}

#[test]
fn corrupt_tiles_fail_alone_and_the_handle_recovers() {
    // The sample with a stretch of its level-0 JPEG tile data overwritten: the headers are intact, so it
    // opens; OpenSlide's error on a bad tile is sticky, so the loader must reopen to read the others.
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(
        env!("CARGO_MANIFEST_DIR").to_string() + "/assets/samples/CMU-1-Small-Region.svs",
    )
    .unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 20_000] {
        *b = 0xFF;
    }
    let p = dir.path().join("damaged.svs");
    std::fs::write(&p, &bytes).unwrap();
    let slide = Arc::new(Slide::open(&p).expect("headers are intact"));
    let s = TileStreamer::new(slide.clone(), 256, 2, 1 << 30, || {});
    let grid = TileGrid::new(slide.info().levels.clone(), 256);
    let all: Vec<TileKey> = grid.level_tiles(0).collect();
    s.request(&all);
    s.wait_idle();
    let failed: Vec<TileKey> = all
        .iter()
        .copied()
        .filter(|k| s.tile_error(*k).is_some())
        .collect();
    let loaded = all.iter().filter(|k| s.is_cached(**k)).count();
    assert!(!failed.is_empty(), "some tiles cover the damaged bytes");
    assert_eq!(
        loaded + failed.len(),
        all.len(),
        "every tile either loads or reports an error"
    );
    assert!(
        loaded > all.len() / 2,
        "tiles after a failure still load ({loaded} of {})",
        all.len()
    );
    assert!(s.take_error().is_some_and(|e| e.contains("damaged.svs")));
    // Failed tiles are not retried on every frame.
    let before = s.stats().failed;
    s.request(&failed);
    s.wait_idle();
    assert_eq!(s.stats().failed, before);
}
