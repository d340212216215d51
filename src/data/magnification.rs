//! The magnification dataset builder (as Hagni40 is built from 40x slides): tissue regions are read at
//! the source's native resolution and resampled with an area filter to every requested magnification
//! up to the native one (never above: upsampling would fake detail), as patches of 224-496 px; patches
//! with more than 40% background are rejected. Splits never share tissue: each source goes whole to one
//! split, except sources large enough to be cut into disjoint blocks, whose blocks are distributed.

use std::path::{Path, PathBuf};

use image::RgbaImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::manifest::{MagnificationRecord, Manifest, ManifestError, Split};
use super::tissue::background_fraction;
use crate::slide::{Slide, SlideError, resize_area};

/// An input: a slide or image and its level-0 µm/px.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub mpp: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildConfig {
    /// Target magnifications; those above a source's native magnification are skipped for it.
    pub magnifications: Vec<f64>,
    /// Patches per source block (or whole source) and magnification.
    pub per_magnification: usize,
    pub min_patch: u32,
    pub max_patch: u32,
    pub max_background: f64,
    /// Shares of train, validation and test.
    pub fractions: [f64; 3],
    /// Side of the level-0 blocks a large source is cut into (0: choose from the source's size).
    pub block_px: u64,
    /// Put every source, whole, in this split (e.g. an external test set from other sources).
    pub only: Option<Split>,
    /// Add to the manifest already in the output folder instead of replacing it.
    pub append: bool,
    pub seed: u64,
}

impl Default for BuildConfig {
    fn default() -> Self {
        BuildConfig {
            magnifications: (1..=40).map(f64::from).collect(),
            per_magnification: 6,
            min_patch: 224,
            max_patch: 496,
            max_background: 0.4,
            fractions: [0.7, 0.15, 0.15],
            block_px: 0,
            only: None,
            append: false,
            seed: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Slide(#[from] SlideError),
    #[error("{}: µm/px {mpp} is not a positive number", path.display())]
    BadMpp { path: PathBuf, mpp: f64 },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: image::ImageError,
    },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(
        "no patch could be cut: every source is too small or too empty for the requested sizes"
    )]
    NothingCut,
}

/// What the builder did, per source.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceReport {
    pub path: PathBuf,
    pub native_magnification: f64,
    pub blocks: usize,
    pub patches: usize,
    pub rejected_background: usize,
}

/// A rectangle of a source's level 0 assigned to one split.
#[derive(Debug, Clone, Copy)]
struct Block {
    x: u64,
    y: u64,
    w: u64,
    h: u64,
    split: Split,
    index: usize,
}

/// Cuts patches from `sources` into `out/patches/<split>/` and writes `out/manifest.csv` (atomically).
/// `progress` is called after each source with (done, total).
pub fn build(
    sources: &[Source],
    out: &Path,
    cfg: &BuildConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<(Manifest, Vec<SourceReport>), BuildError> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut records = Vec::new();
    let mut reports = Vec::new();
    // Sources too small for blocks are dealt whole to the splits, in a shuffled order.
    let mut whole_order: Vec<usize> = (0..sources.len()).collect();
    whole_order.shuffle(&mut rng);
    let mut whole_splits = std::collections::HashMap::new();
    let small: Vec<usize> = whole_order
        .iter()
        .copied()
        .filter(|&i| {
            Slide::open(&sources[i].path)
                .map(|s| blocks_for(s.info().dimensions(), cfg, &mut rng.clone()).len() < 3)
                .unwrap_or(true)
        })
        .collect();
    for (rank, &i) in small.iter().enumerate() {
        whole_splits.insert(i, split_for_rank(rank, small.len(), cfg.fractions));
    }
    if let Some(split) = cfg.only {
        whole_splits = (0..sources.len()).map(|i| (i, split)).collect();
    }
    for (i, src) in sources.iter().enumerate() {
        if !(src.mpp.is_finite() && src.mpp > 0.0) {
            return Err(BuildError::BadMpp {
                path: src.path.clone(),
                mpp: src.mpp,
            });
        }
        let slide = Slide::open(&src.path)?;
        let dims = slide.info().dimensions();
        let thumb = slide.thumbnail(1024)?;
        let coarse = Coarse::new(&thumb, dims);
        let blocks = match whole_splits.get(&i) {
            Some(&split) => vec![Block {
                x: 0,
                y: 0,
                w: dims.0,
                h: dims.1,
                split,
                index: 0,
            }],
            None => {
                let tissue = |b: &Block| 1.0 - coarse.background(b.x, b.y, b.w, b.h);
                let mut blocks = blocks_for(dims, cfg, &mut rng);
                deal_by_tissue(&mut blocks, tissue, cfg.fractions);
                blocks
            }
        };
        let native = 10.0 / src.mpp;
        let stem = file_stem(&src.path);
        let mut report = SourceReport {
            path: src.path.clone(),
            native_magnification: native,
            blocks: blocks.len(),
            patches: 0,
            rejected_background: 0,
        };
        for block in &blocks {
            let source_name = if blocks.len() > 1 {
                format!("{}#block{}", src.path.display(), block.index)
            } else {
                src.path.display().to_string()
            };
            for &mag in cfg.magnifications.iter().filter(|&&m| m <= native * 1.001) {
                let scale = mag / native;
                // No more patches than non-overlapping ones would fit: more would be near-duplicates.
                let fit =
                    |side: u64| (side as f64 * scale / f64::from(cfg.min_patch)).floor() as usize;
                let capacity = (fit(block.w) * fit(block.h)).max(1);
                for k in 0..cfg.per_magnification.min(capacity) {
                    let Some((img, region)) =
                        cut_patch(&slide, &coarse, block, scale, cfg, &mut rng, &mut report)?
                    else {
                        continue;
                    };
                    let rel = format!(
                        "patches/{}/{stem}-b{}-{mag}x-{k}.png",
                        block.split.name(),
                        block.index
                    );
                    let path = out.join(&rel);
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir).map_err(|e| BuildError::Write {
                            path: dir.to_path_buf(),
                            source: image::ImageError::IoError(e),
                        })?;
                    }
                    img.save(&path)
                        .map_err(|source| BuildError::Write { path, source })?;
                    records.push(MagnificationRecord {
                        path: rel,
                        magnification: mag,
                        mpp: 10.0 / mag,
                        source: source_name.clone(),
                        region,
                        split: block.split,
                    });
                    report.patches += 1;
                }
            }
        }
        reports.push(report);
        progress(i + 1, sources.len());
    }
    if records.is_empty() {
        return Err(BuildError::NothingCut);
    }
    let manifest_path = out.join("manifest.csv");
    if cfg.append && manifest_path.exists() {
        let mut old = Manifest::load(&manifest_path)?.records;
        old.append(&mut records);
        records = old;
    }
    let manifest = Manifest {
        root: out.to_path_buf(),
        records,
    };
    manifest.check_disjoint()?;
    manifest.save(&manifest_path)?;
    Ok((manifest, reports))
}

fn file_stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| {
            s.to_string_lossy()
                .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
        })
        .unwrap_or_else(|| "source".into())
}

/// The split of the `rank`-th of `n` items dealt by `fractions`, with at least one item in
/// validation and in test when there are three or more.
pub(crate) fn split_for_rank(rank: usize, n: usize, fractions: [f64; 3]) -> Split {
    let total: f64 = fractions.iter().sum::<f64>().max(1e-9);
    let mut n_test = ((fractions[2] / total) * n as f64).round() as usize;
    let mut n_val = ((fractions[1] / total) * n as f64).round() as usize;
    if n >= 3 {
        n_test = n_test.max(usize::from(fractions[2] > 0.0));
        n_val = n_val.max(usize::from(fractions[1] > 0.0));
    }
    let n_train = n.saturating_sub(n_test + n_val);
    if rank < n_train {
        Split::Train
    } else if rank < n_train + n_val {
        Split::Val
    } else {
        Split::Test
    }
}

/// A grid of disjoint blocks over the level 0, dealt to the splits in a shuffled order.
fn blocks_for((w, h): (u64, u64), cfg: &BuildConfig, rng: &mut impl Rng) -> Vec<Block> {
    let side = if cfg.block_px > 0 {
        cfg.block_px
    } else {
        (w.min(h) / 2).clamp(1024, 16384)
    };
    let (nx, ny) = ((w / side).max(1), (h / side).max(1));
    let (bw, bh) = (w / nx, h / ny);
    let mut cells: Vec<(u64, u64)> = (0..ny).flat_map(|j| (0..nx).map(move |i| (i, j))).collect();
    cells.shuffle(rng);
    let n = cells.len();
    cells
        .into_iter()
        .enumerate()
        .map(|(rank, (i, j))| Block {
            x: i * bw,
            y: j * bh,
            w: bw,
            h: bh,
            split: split_for_rank(rank, n, cfg.fractions),
            index: (j * nx + i) as usize,
        })
        .collect()
}

/// Blocks with less than 25% tissue go to training; the others are dealt to the splits in their
/// (shuffled) order, so that validation and test are never given an empty block.
fn deal_by_tissue(blocks: &mut [Block], tissue: impl Fn(&Block) -> f64, fractions: [f64; 3]) {
    let with_tissue: Vec<usize> = (0..blocks.len())
        .filter(|&i| tissue(&blocks[i]) >= 0.25)
        .collect();
    for b in blocks.iter_mut() {
        b.split = Split::Train;
    }
    for (rank, &i) in with_tissue.iter().enumerate() {
        blocks[i].split = split_for_rank(rank, with_tissue.len(), fractions);
    }
}

/// One patch inside `block` at `scale` (target / native), or None when the block is too small or
/// ten tries found only background.
/// The source's thumbnail, to find tissue without reading level 0.
struct Coarse<'a> {
    thumb: &'a RgbaImage,
    sx: f64,
    sy: f64,
}

impl<'a> Coarse<'a> {
    fn new(thumb: &'a RgbaImage, (w, h): (u64, u64)) -> Self {
        Coarse {
            thumb,
            sx: f64::from(thumb.width()) / w.max(1) as f64,
            sy: f64::from(thumb.height()) / h.max(1) as f64,
        }
    }

    /// Background share of a level-0 rectangle, seen on the thumbnail.
    fn background(&self, x: u64, y: u64, w: u64, h: u64) -> f64 {
        let crop = image::imageops::crop_imm(
            self.thumb,
            (x as f64 * self.sx) as u32,
            (y as f64 * self.sy) as u32,
            ((w as f64 * self.sx).round() as u32).max(1),
            ((h as f64 * self.sy).round() as u32).max(1),
        )
        .to_image();
        background_fraction(&crop)
    }
}

#[allow(clippy::too_many_arguments)]
fn cut_patch(
    slide: &Slide,
    coarse: &Coarse,
    block: &Block,
    scale: f64,
    cfg: &BuildConfig,
    rng: &mut impl Rng,
    report: &mut SourceReport,
) -> Result<Option<(RgbaImage, String)>, BuildError> {
    // The largest patch whose source square fits in the block.
    let fits = ((block.w.min(block.h) as f64) * scale).floor() as u32;
    if fits < cfg.min_patch {
        return Ok(None);
    }
    let info = slide.info();
    for _ in 0..10 {
        let patch = rng.random_range(cfg.min_patch..=cfg.max_patch.min(fits).max(cfg.min_patch));
        let side = ((f64::from(patch) / scale).round() as u64).min(block.w.min(block.h));
        // Positions are drawn until the thumbnail shows tissue there (then checked at full detail).
        let mut pos = None;
        for _ in 0..50 {
            let x = block.x + rng.random_range(0..=block.w - side);
            let y = block.y + rng.random_range(0..=block.h - side);
            if coarse.background(x, y, side, side) <= cfg.max_background {
                pos = Some((x, y));
                break;
            }
        }
        let Some((x, y)) = pos else {
            return Ok(None);
        };
        // Read at the coarsest level still at least as fine as the target, then area-resample.
        let level = info
            .levels
            .iter()
            .rposition(|l| l.downsample <= 1.0 / scale + 1e-9)
            .unwrap_or(0);
        let ds = info.levels[level].downsample;
        let read = ((side as f64 / ds).round() as u32).max(1);
        let region = slide.read_region(level, x as i64, y as i64, read, read)?;
        let img = resize_area(&region, patch, patch);
        if background_fraction(&img) > cfg.max_background {
            report.rejected_background += 1;
            continue;
        }
        return Ok(Some((img, format!("{x},{y},{side},{side}"))));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_dealt_with_every_split_present() {
        let splits: Vec<Split> = (0..5)
            .map(|r| split_for_rank(r, 5, [0.7, 0.15, 0.15]))
            .collect();
        assert_eq!(
            splits,
            vec![
                Split::Train,
                Split::Train,
                Split::Train,
                Split::Val,
                Split::Test
            ]
        );
        assert_eq!(split_for_rank(0, 1, [0.7, 0.15, 0.15]), Split::Train);
    }

    #[test]
    fn blocks_tile_the_level_without_overlap() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let cfg = BuildConfig {
            block_px: 1000,
            ..Default::default()
        };
        let blocks = blocks_for((3500, 2100), &cfg, &mut rng);
        assert_eq!(blocks.len(), 6);
        for (i, a) in blocks.iter().enumerate() {
            assert!(a.x + a.w <= 3500 && a.y + a.h <= 2100);
            for b in &blocks[i + 1..] {
                let apart =
                    a.x + a.w <= b.x || b.x + b.w <= a.x || a.y + a.h <= b.y || b.y + b.h <= a.y;
                assert!(apart);
            }
        }
        for s in Split::ALL {
            assert!(blocks.iter().any(|b| b.split == s));
        }
    }
}
