//! Tile grid geometry over a slide's pyramid levels.

use crate::slide::Level;

/// A tile: `col`, `row` in the grid of `level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TileKey {
    pub level: u32,
    pub col: u32,
    pub row: u32,
}

/// Levels cut into square tiles of `tile_size` pixels (edge tiles are smaller).
#[derive(Debug, Clone)]
pub struct TileGrid {
    tile_size: u32,
    levels: Vec<Level>,
}

/// Levels whose downsample is within this factor of the wanted one count as matching
/// (OpenSlide reports downsamples such as 2.0005 or 3.9998).
const DOWNSAMPLE_TOLERANCE: f64 = 1.01;

impl TileGrid {
    pub fn new(levels: Vec<Level>, tile_size: u32) -> Self {
        assert!(!levels.is_empty(), "a tile grid needs at least one level");
        TileGrid {
            tile_size: tile_size.max(1),
            levels,
        }
    }

    pub fn tile_size(&self) -> u32 {
        self.tile_size
    }

    pub fn levels(&self) -> &[Level] {
        &self.levels
    }

    pub fn level_count(&self) -> usize {
        self.levels.len()
    }

    pub fn coarsest_level(&self) -> usize {
        self.levels.len() - 1
    }

    /// Columns and rows of tiles at `level`.
    pub fn tiles_across(&self, level: usize) -> (u32, u32) {
        let l = &self.levels[level];
        let ts = u64::from(self.tile_size);
        (
            l.width.div_ceil(ts).max(1) as u32,
            l.height.div_ceil(ts).max(1) as u32,
        )
    }

    pub fn tile_count(&self, level: usize) -> u64 {
        let (c, r) = self.tiles_across(level);
        u64::from(c) * u64::from(r)
    }

    /// All tiles of a level, row by row.
    pub fn level_tiles(&self, level: usize) -> impl Iterator<Item = TileKey> + '_ {
        let (cols, rows) = self.tiles_across(level);
        (0..rows).flat_map(move |row| {
            (0..cols).map(move |col| TileKey {
                level: level as u32,
                col,
                row,
            })
        })
    }

    /// The tile's pixel rectangle in its own level: (x, y, width, height), clipped to the level.
    pub fn tile_pixels(&self, key: TileKey) -> (u64, u64, u32, u32) {
        let l = &self.levels[key.level as usize];
        let ts = u64::from(self.tile_size);
        let x = u64::from(key.col) * ts;
        let y = u64::from(key.row) * ts;
        let w = ts.min(l.width.saturating_sub(x)) as u32;
        let h = ts.min(l.height.saturating_sub(y)) as u32;
        (x, y, w, h)
    }

    /// The tile's top-left corner in level-0 coordinates, as OpenSlide's `read_region` wants it.
    pub fn tile_origin_level0(&self, key: TileKey) -> (i64, i64) {
        let (x, y, _, _) = self.tile_pixels(key);
        let d = self.levels[key.level as usize].downsample;
        ((x as f64 * d).round() as i64, (y as f64 * d).round() as i64)
    }

    /// The area the tile covers in level-0 coordinates.
    pub fn tile_rect_level0(&self, key: TileKey) -> super::Rect {
        let (x, y, w, h) = self.tile_pixels(key);
        let d = self.levels[key.level as usize].downsample;
        super::Rect {
            x0: x as f64 * d,
            y0: y as f64 * d,
            x1: (x + u64::from(w)) as f64 * d,
            y1: (y + u64::from(h)) as f64 * d,
        }
    }

    /// Bytes of RGBA the tile takes once decoded.
    pub fn tile_bytes(&self, key: TileKey) -> usize {
        let (_, _, w, h) = self.tile_pixels(key);
        w as usize * h as usize * 4
    }

    /// The coarsest level that is still at least as sharp as `downsample` (level-0 pixels per screen
    /// pixel); level 0 when zoomed in past full resolution.
    pub fn level_for_downsample(&self, downsample: f64) -> usize {
        let limit = downsample * DOWNSAMPLE_TOLERANCE;
        self.levels
            .iter()
            .enumerate()
            .rev()
            .find(|(_, l)| l.downsample <= limit)
            .map_or(0, |(i, _)| i)
    }

    /// Tiles of `level` that intersect `rect` (level-0 coordinates).
    pub fn tiles_in_rect(&self, level: usize, rect: &super::Rect) -> Vec<TileKey> {
        let l = &self.levels[level];
        let ts = f64::from(self.tile_size) * l.downsample;
        let (cols, rows) = self.tiles_across(level);
        let c0 = (rect.x0 / ts).floor().max(0.0) as i64;
        let r0 = (rect.y0 / ts).floor().max(0.0) as i64;
        let c1 = ((rect.x1 / ts).ceil() as i64).min(i64::from(cols));
        let r1 = ((rect.y1 / ts).ceil() as i64).min(i64::from(rows));
        let mut out = Vec::new();
        for row in r0..r1 {
            for col in c0..c1 {
                out.push(TileKey {
                    level: level as u32,
                    col: col as u32,
                    row: row as u32,
                });
            }
        }
        out
    }

    /// The tile of the coarser `level` that contains the centre of `key`.
    pub fn ancestor(&self, key: TileKey, level: usize) -> Option<TileKey> {
        if level >= self.levels.len() {
            return None;
        }
        let r = self.tile_rect_level0(key);
        let (cx, cy) = (0.5 * (r.x0 + r.x1), 0.5 * (r.y0 + r.y1));
        let ts = f64::from(self.tile_size) * self.levels[level].downsample;
        let (cols, rows) = self.tiles_across(level);
        Some(TileKey {
            level: level as u32,
            col: ((cx / ts) as u32).min(cols - 1),
            row: ((cy / ts) as u32).min(rows - 1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lv(width: u64, height: u64, downsample: f64) -> Level {
        Level {
            width,
            height,
            downsample,
        }
    }

    fn pyramid() -> TileGrid {
        // A typical Aperio pyramid with inexact downsamples.
        TileGrid::new(
            vec![
                lv(46000, 32914, 1.0),
                lv(11500, 8228, 4.000_243),
                lv(2875, 2057, 16.004_06),
            ],
            256,
        )
    }

    #[test]
    fn level_choice() {
        let g = pyramid();
        assert_eq!(
            g.level_for_downsample(0.25),
            0,
            "zoomed past full resolution"
        );
        assert_eq!(g.level_for_downsample(1.0), 0);
        assert_eq!(
            g.level_for_downsample(3.9),
            0,
            "level 1 would be blurrier than the screen"
        );
        assert_eq!(g.level_for_downsample(4.0), 1, "4.000243 counts as 4");
        assert_eq!(g.level_for_downsample(15.0), 1);
        assert_eq!(g.level_for_downsample(15.99), 2, "within 1% of 16.004");
        assert_eq!(g.level_for_downsample(16.0), 2);
        assert_eq!(g.level_for_downsample(1000.0), 2);
        let g2 = TileGrid::new(vec![lv(1000, 1000, 1.0), lv(500, 500, 2.0005)], 256);
        assert_eq!(g2.level_for_downsample(2.0), 1);
    }

    #[test]
    fn tile_geometry_and_edges() {
        let g = pyramid();
        assert_eq!(g.tiles_across(0), (180, 129));
        let last = TileKey {
            level: 0,
            col: 179,
            row: 128,
        };
        assert_eq!(
            g.tile_pixels(last),
            (179 * 256, 128 * 256, 46000 - 179 * 256, 32914 - 128 * 256)
        );
        let k = TileKey {
            level: 1,
            col: 2,
            row: 3,
        };
        assert_eq!(
            g.tile_origin_level0(k),
            (
                (512.0 * 4.000_243f64).round() as i64,
                (768.0 * 4.000_243f64).round() as i64
            )
        );
        assert_eq!(g.tile_bytes(k), 256 * 256 * 4);
    }

    #[test]
    fn slide_smaller_than_a_tile() {
        let g = TileGrid::new(vec![lv(100, 60, 1.0)], 256);
        assert_eq!(g.tiles_across(0), (1, 1));
        assert_eq!(
            g.tile_pixels(TileKey {
                level: 0,
                col: 0,
                row: 0
            }),
            (0, 0, 100, 60)
        );
        let r = crate::tiles::Rect {
            x0: -500.0,
            y0: -500.0,
            x1: 500.0,
            y1: 500.0,
        };
        assert_eq!(g.tiles_in_rect(0, &r).len(), 1);
    }

    #[test]
    fn visible_tiles_and_ancestors() {
        let g = pyramid();
        let r = crate::tiles::Rect {
            x0: 300.0,
            y0: 10.0,
            x1: 700.0,
            y1: 260.0,
        };
        let t = g.tiles_in_rect(0, &r);
        assert_eq!(t.len(), 2 * 2, "cols 1..=2, rows 0..=1");
        assert_eq!(
            t[0],
            TileKey {
                level: 0,
                col: 1,
                row: 0
            }
        );
        let a = g
            .ancestor(
                TileKey {
                    level: 0,
                    col: 100,
                    row: 50,
                },
                2,
            )
            .unwrap();
        assert_eq!(
            a,
            TileKey {
                level: 2,
                col: 6,
                row: 3
            }
        );
        assert!(g.ancestor(a, 3).is_none());
    }
}
