//! The view over a slide (centre and scale in level-0 pixels) and the tile plan it implies:
//! the level to draw, the visible tiles ordered from the view centre outward, and a prefetch ring.

use super::{TileGrid, TileKey};

/// An axis-aligned rectangle in level-0 pixel coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    pub x0: f64,
    pub y0: f64,
    pub x1: f64,
    pub y1: f64,
}

impl Rect {
    pub fn width(&self) -> f64 {
        self.x1 - self.x0
    }

    pub fn height(&self) -> f64 {
        self.y1 - self.y0
    }

    pub fn center(&self) -> [f64; 2] {
        [0.5 * (self.x0 + self.x1), 0.5 * (self.y0 + self.y1)]
    }

    pub fn expand(&self, dx: f64, dy: f64) -> Rect {
        Rect {
            x0: self.x0 - dx,
            y0: self.y0 - dy,
            x1: self.x1 + dx,
            y1: self.y1 + dy,
        }
    }

    pub fn intersects(&self, o: &Rect) -> bool {
        self.x0 < o.x1 && o.x0 < self.x1 && self.y0 < o.y1 && o.y0 < self.y1
    }
}

/// What the screen shows: `center` in level-0 pixels, `scale` in screen pixels per level-0 pixel,
/// `size` of the canvas in screen pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Viewport {
    pub center: [f64; 2],
    pub scale: f64,
    pub size: [f64; 2],
}

/// Zoom limits: 64 screen pixels per slide pixel in, the whole slide in a tenth of the canvas out.
pub const MAX_SCALE: f64 = 64.0;

impl Viewport {
    /// The whole slide centred in a canvas of `size`, with a small margin.
    pub fn fit(slide: (u64, u64), size: [f64; 2]) -> Viewport {
        let (w, h) = (slide.0.max(1) as f64, slide.1.max(1) as f64);
        let scale = (size[0] / w).min(size[1] / h) * 0.95;
        Viewport {
            center: [w / 2.0, h / 2.0],
            scale: scale.max(f64::MIN_POSITIVE),
            size,
        }
    }

    /// Smallest scale allowed: the slide fills a tenth of the canvas.
    pub fn min_scale(slide: (u64, u64), size: [f64; 2]) -> f64 {
        Viewport::fit(slide, size).scale * 0.1
    }

    pub fn screen_to_slide(&self, p: [f64; 2]) -> [f64; 2] {
        [
            self.center[0] + (p[0] - self.size[0] / 2.0) / self.scale,
            self.center[1] + (p[1] - self.size[1] / 2.0) / self.scale,
        ]
    }

    pub fn slide_to_screen(&self, p: [f64; 2]) -> [f64; 2] {
        [
            (p[0] - self.center[0]) * self.scale + self.size[0] / 2.0,
            (p[1] - self.center[1]) * self.scale + self.size[1] / 2.0,
        ]
    }

    /// The part of the slide plane on screen, in level-0 coordinates.
    pub fn visible_rect(&self) -> Rect {
        let a = self.screen_to_slide([0.0, 0.0]);
        let b = self.screen_to_slide(self.size);
        Rect {
            x0: a[0],
            y0: a[1],
            x1: b[0],
            y1: b[1],
        }
    }

    /// Level-0 pixels per screen pixel.
    pub fn downsample(&self) -> f64 {
        1.0 / self.scale
    }

    /// Moves the view so that the content follows a drag of `delta` screen pixels.
    pub fn pan_by(&mut self, delta: [f64; 2]) {
        self.center[0] -= delta[0] / self.scale;
        self.center[1] -= delta[1] / self.scale;
    }

    /// Multiplies the scale by `factor`, keeping the slide point under `anchor` (screen) in place.
    pub fn zoom_about(&mut self, anchor: [f64; 2], factor: f64, min_scale: f64) {
        let before = self.screen_to_slide(anchor);
        self.scale = (self.scale * factor).clamp(min_scale, MAX_SCALE);
        let after = self.screen_to_slide(anchor);
        self.center[0] += before[0] - after[0];
        self.center[1] += before[1] - after[1];
    }

    /// Keeps at least part of the slide on screen so a fling cannot lose it.
    pub fn clamp_to(&mut self, slide: (u64, u64)) {
        let (w, h) = (slide.0 as f64, slide.1 as f64);
        self.center[0] = self.center[0].clamp(0.0, w);
        self.center[1] = self.center[1].clamp(0.0, h);
    }
}

/// The tiles a view needs, in the order they should load.
#[derive(Debug, Clone, PartialEq)]
pub struct TilePlan {
    /// The level whose tiles are drawn.
    pub level: usize,
    /// Visible tiles of `level`, nearest the view centre first.
    pub visible: Vec<TileKey>,
    /// Everything to load, highest priority first: visible tiles, the next coarser level's visible tiles
    /// (fallback while zooming out), then a ring of `ring` tiles around the view.
    pub wanted: Vec<TileKey>,
}

/// More visible tiles than this (a slide without a coarse enough level, zoomed out) are not loaded:
/// the overview stands in, so that a pyramid-less gigapixel slide never floods the loaders.
pub const MAX_VISIBLE_TILES: f64 = 1024.0;

/// Plans tiles for `view` drawn at `pixels_per_point` physical pixels per screen unit. With the
/// `overview`'s size, no tile is planned where the overview has as many pixels as the screen shows
/// and the level's tiles would be finer (a slide without coarse levels, zoomed out, would otherwise
/// be drawn from hundreds of minified level-0 tiles).
pub fn plan_tiles(
    grid: &TileGrid,
    view: &Viewport,
    pixels_per_point: f64,
    ring: u32,
    overview: Option<[usize; 2]>,
) -> TilePlan {
    let wanted_downsample = view.downsample() / pixels_per_point.max(1e-6);
    let level = grid.level_for_downsample(wanted_downsample);
    let level_downsample = grid.levels()[level].downsample;
    let rect = view.visible_rect();
    let tile_level0 = f64::from(grid.tile_size()) * level_downsample;
    let across = (rect.x1 - rect.x0) / tile_level0 + 1.0;
    let down = (rect.y1 - rect.y0) / tile_level0 + 1.0;
    let overview_suffices = overview.is_some_and(|[ow, oh]| {
        let l0 = &grid.levels()[0];
        let overview_downsample =
            (l0.width as f64 / ow.max(1) as f64).max(l0.height as f64 / oh.max(1) as f64);
        wanted_downsample >= overview_downsample && overview_downsample > level_downsample
    });
    if overview_suffices || across * down > MAX_VISIBLE_TILES {
        return TilePlan {
            level,
            visible: Vec::new(),
            wanted: Vec::new(),
        };
    }
    let centre = rect.center();
    let by_distance = |keys: &mut Vec<TileKey>| {
        keys.sort_by(|a, b| {
            let da = dist2(grid.tile_rect_level0(*a).center(), centre);
            let db = dist2(grid.tile_rect_level0(*b).center(), centre);
            da.total_cmp(&db)
        });
    };
    let mut visible = grid.tiles_in_rect(level, &rect);
    by_distance(&mut visible);
    let mut wanted = visible.clone();
    if level + 1 < grid.level_count() {
        let mut coarser = grid.tiles_in_rect(level + 1, &rect);
        by_distance(&mut coarser);
        wanted.extend(coarser);
    }
    if ring > 0 {
        let t = f64::from(grid.tile_size()) * grid.levels()[level].downsample * f64::from(ring);
        let mut around: Vec<TileKey> = grid
            .tiles_in_rect(level, &rect.expand(t, t))
            .into_iter()
            .filter(|k| !grid.tile_rect_level0(*k).intersects(&rect))
            .collect();
        by_distance(&mut around);
        wanted.extend(around);
    }
    TilePlan {
        level,
        visible,
        wanted,
    }
}

fn dist2(a: [f64; 2], b: [f64; 2]) -> f64 {
    (a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slide::Level;

    fn grid() -> TileGrid {
        TileGrid::new(
            vec![
                Level {
                    width: 10_000,
                    height: 8_000,
                    downsample: 1.0,
                },
                Level {
                    width: 2_500,
                    height: 2_000,
                    downsample: 4.0,
                },
            ],
            256,
        )
    }

    #[test]
    fn transforms_round_trip() {
        let v = Viewport {
            center: [5000.0, 4000.0],
            scale: 0.5,
            size: [800.0, 600.0],
        };
        let p = [123.0, 456.0];
        let q = v.slide_to_screen(v.screen_to_slide(p));
        assert!((p[0] - q[0]).abs() < 1e-9 && (p[1] - q[1]).abs() < 1e-9);
        assert_eq!(v.screen_to_slide([400.0, 300.0]), [5000.0, 4000.0]);
        let r = v.visible_rect();
        assert_eq!((r.width(), r.height()), (1600.0, 1200.0));
    }

    #[test]
    fn zoom_keeps_anchor_fixed() {
        let mut v = Viewport::fit((10_000, 8_000), [800.0, 600.0]);
        let anchor = [100.0, 500.0];
        let before = v.screen_to_slide(anchor);
        v.zoom_about(anchor, 3.0, 1e-6);
        let after = v.screen_to_slide(anchor);
        assert!((before[0] - after[0]).abs() < 1e-6 && (before[1] - after[1]).abs() < 1e-6);
        v.zoom_about(anchor, 1e9, 1e-6);
        assert_eq!(v.scale, MAX_SCALE);
    }

    #[test]
    fn pan_moves_content_with_the_drag() {
        let mut v = Viewport {
            center: [100.0, 100.0],
            scale: 2.0,
            size: [200.0, 200.0],
        };
        let p = v.screen_to_slide([50.0, 50.0]);
        v.pan_by([10.0, -4.0]);
        let s = v.slide_to_screen(p);
        assert!((s[0] - 60.0).abs() < 1e-9 && (s[1] - 46.0).abs() < 1e-9);
    }

    #[test]
    fn plan_orders_centre_first_and_adds_ring() {
        let g = grid();
        let v = Viewport {
            center: [5000.0, 4000.0],
            scale: 1.0,
            size: [1024.0, 768.0],
        };
        let plan = plan_tiles(&g, &v, 1.0, 1, None);
        assert_eq!(plan.level, 0);
        // The tile containing the centre comes first.
        assert_eq!(
            plan.visible[0],
            TileKey {
                level: 0,
                col: 19,
                row: 15
            }
        );
        let d = |k: &TileKey| dist2(g.tile_rect_level0(*k).center(), [5000.0, 4000.0]);
        assert!(plan.visible.windows(2).all(|w| d(&w[0]) <= d(&w[1])));
        // Coarser fallbacks and the ring follow the visible tiles; nothing repeats.
        assert!(plan.wanted.len() > plan.visible.len());
        assert!(plan.wanted[plan.visible.len()].level == 1);
        let mut uniq = plan.wanted.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), plan.wanted.len());
    }

    #[test]
    fn zoomed_out_uses_coarse_level_and_hidpi_uses_finer() {
        let g = grid();
        let v = Viewport {
            center: [5000.0, 4000.0],
            scale: 0.2,
            size: [1000.0, 800.0],
        };
        assert_eq!(plan_tiles(&g, &v, 1.0, 0, None).level, 1);
        // At 2 physical pixels per point the screen resolves 2.5 level-0 px: level 1 (4x) is too blurry.
        assert_eq!(plan_tiles(&g, &v, 2.0, 0, None).level, 0);
    }

    #[test]
    fn zoomed_out_on_a_level_too_fine_plans_no_tile() {
        let g = TileGrid::new(
            vec![Level {
                width: 200_000,
                height: 200_000,
                downsample: 1.0,
            }],
            256,
        );
        let fit = Viewport {
            center: [100_000.0, 100_000.0],
            scale: 800.0 / 200_000.0,
            size: [1280.0, 800.0],
        };
        let plan = plan_tiles(&g, &fit, 1.0, 1, None);
        assert!(plan.visible.is_empty() && plan.wanted.is_empty());
        let close = Viewport { scale: 1.0, ..fit };
        assert!(!plan_tiles(&g, &close, 1.0, 1, None).visible.is_empty());
    }

    #[test]
    fn the_overview_stands_in_where_it_has_the_screen_s_pixels() {
        let g = TileGrid::new(
            vec![Level {
                width: 4096,
                height: 2048,
                downsample: 1.0,
            }],
            256,
        );
        let view = |scale: f64| Viewport {
            center: [2048.0, 1024.0],
            scale,
            size: [800.0, 600.0],
        };
        // A 1024 x 512 overview: 4 level-0 pixels each.
        let overview = Some([1024, 512]);
        assert!(
            plan_tiles(&g, &view(0.2), 1.0, 1, overview)
                .wanted
                .is_empty()
        );
        assert!(!plan_tiles(&g, &view(0.2), 1.0, 1, None).wanted.is_empty());
        // Zoomed in past the overview's resolution, tiles again.
        assert!(
            !plan_tiles(&g, &view(0.5), 1.0, 1, overview)
                .visible
                .is_empty()
        );
    }
}
