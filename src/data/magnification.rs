//! The magnification dataset builder (as Hagni40 is built from 40x slides): tissue fields are read at
//! the source's native resolution and resampled to target pixel sizes, either listed magnifications
//! or a continuous range drawn per octave and balanced per source group, never upsampled more than
//! the configured limit (no fake high magnification); optionally through the snapshot degradations
//! of [`super::degrade`]. Patches with more than 40% background are rejected. Sources of unknown
//! scale give pairs of one field at two known relative scales (for the scale-equivariance loss).
//! Splits never share tissue: each source goes whole to one split, except sources large enough to be
//! cut into disjoint blocks, whose blocks are distributed. Patches are written atomically.

use std::path::{Path, PathBuf};

use image::RgbaImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::degrade::{clean, degrade};
use super::manifest::{MagnificationRecord, Manifest, ManifestError, Split};
use super::tissue::background_fraction;
use crate::slide::{Slide, SlideError};

/// An input: a slide or image and its level-0 µm/px.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    /// µm per pixel along y (and along x once `squash_x` is undone). For an unlabelled source
    /// (`absolute` false) this is 1: its patches carry scales relative to the file.
    pub mpp: f64,
    /// Stored width / true width of the pixels (BACH's copies: 0.75); 1 for square pixels.
    pub squash_x: f64,
    /// The lab, scanner or dataset the file comes from: leave-one-source-out leaves out a group.
    pub group: String,
    /// Whether `mpp` is a documented pixel size (false: an image of unknown scale, cut into pairs
    /// of one field at two known relative scales).
    pub absolute: bool,
}

impl Source {
    /// A file with square pixels of a documented size, its own group.
    pub fn new(path: PathBuf, mpp: f64) -> Self {
        let group = file_stem(&path);
        Source {
            path,
            mpp,
            squash_x: 1.0,
            group,
            absolute: true,
        }
    }
}

/// How target pixel sizes are drawn for each source.
#[derive(Debug, Clone, serde::Serialize)]
pub enum Scales {
    /// These magnifications (10 / µm/px), those above the native one skipped.
    Magnifications(Vec<f64>),
    /// A continuous range: log-uniform pixel sizes from the source's own (divided by
    /// `max_upsample`) to as coarse as a patch still fits (at most `coarsest_mpp`), `per_octave`
    /// patches per source group and octave.
    Continuous {
        per_octave: usize,
        max_upsample: f64,
        coarsest_mpp: f64,
    },
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildConfig {
    pub scales: Scales,
    /// Patches per source block (or whole source) and magnification (`Scales::Magnifications`).
    pub per_magnification: usize,
    /// Degrade patches as snapshots from other labs are ([`super::degrade`]); else the area filter.
    pub degrade: bool,
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
    /// The most pixels a field may be read with. A field is read from the coarsest level still fine
    /// enough for its scale; where that takes more (a slide without pyramid levels, a coarse scale),
    /// the field is skipped: read whole, each would cost seconds, a dataset hours.
    pub max_field_pixels: u64,
    pub seed: u64,
}

impl Default for BuildConfig {
    fn default() -> Self {
        BuildConfig {
            scales: Scales::Magnifications((1..=40).map(f64::from).collect()),
            per_magnification: 6,
            degrade: false,
            min_patch: 224,
            max_patch: 496,
            max_background: 0.4,
            fractions: [0.7, 0.15, 0.15],
            block_px: 0,
            only: None,
            append: false,
            max_field_pixels: 4096 * 4096,
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
        "no patch could be cut from {files}: too small or too empty (background) for the \
         requested patch size and scales"
    )]
    NothingCut { files: String },
}

/// What the builder did, per source.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceReport {
    pub path: PathBuf,
    pub native_magnification: f64,
    pub blocks: usize,
    pub patches: usize,
    pub rejected_background: usize,
    /// Fields skipped because reading them takes more than [`BuildConfig::max_field_pixels`].
    pub too_large_to_read: usize,
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
/// `progress` is called after each block of each source with the share of the work done (0 to 1):
/// a single huge slide reports its progress too.
pub fn build(
    sources: &[Source],
    out: &Path,
    cfg: &BuildConfig,
    mut progress: impl FnMut(f64),
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
        let stem = file_stem(&src.path);
        let mut report = SourceReport {
            path: src.path.clone(),
            native_magnification: 10.0 / src.mpp,
            blocks: blocks.len(),
            patches: 0,
            rejected_background: 0,
            too_large_to_read: 0,
        };
        let group_files = sources.iter().filter(|s| s.group == src.group).count();
        let mut n = 0usize;
        for (block_no, block) in blocks.iter().enumerate() {
            progress((i as f64 + block_no as f64 / blocks.len() as f64) / sources.len() as f64);
            let source_name = if blocks.len() > 1 {
                format!("{}#block{}", src.path.display(), block.index)
            } else {
                src.path.display().to_string()
            };
            let share = 1.0 / (group_files * blocks.len()) as f64;
            for target in plan_targets(src, block, cfg, share, &mut rng) {
                // A source of unknown scale gives pairs of one field at two scales (for the
                // equivariance loss). (Pairs from sources of known scale measured worse in
                // leave-one-source-out: 42.9% within ±25% against 49.1%.)
                let cut = if src.absolute {
                    cut_patch(
                        &slide,
                        &coarse,
                        src,
                        block,
                        target,
                        cfg,
                        &mut rng,
                        &mut report,
                    )?
                    .map(|(field, side, region)| vec![(field, side, region, target)])
                } else {
                    cut_pair(
                        &slide,
                        &coarse,
                        src,
                        block,
                        target,
                        cfg,
                        &mut rng,
                        &mut report,
                    )?
                };
                let Some(patches) = cut else { continue };
                let field = if patches.len() > 1 {
                    format!("{source_name}@{n}")
                } else {
                    String::new()
                };
                for (img, side, region, mpp) in patches {
                    let patch = if cfg.degrade {
                        degrade(&img, side, &mut rng)
                    } else {
                        clean(&img, side)
                    };
                    let rel = format!(
                        "patches/{}/{stem}-b{}-{n}-{mpp:.3}um.png",
                        block.split.name(),
                        block.index
                    );
                    let path = out.join(&rel);
                    crate::util::fs::write_png_atomic(&path, &patch)
                        .map_err(|source| BuildError::Write { path, source })?;
                    records.push(MagnificationRecord {
                        path: rel,
                        magnification: 10.0 / mpp,
                        mpp,
                        source: source_name.clone(),
                        region,
                        split: block.split,
                        group: src.group.clone(),
                        absolute: src.absolute,
                        field: field.clone(),
                    });
                    report.patches += 1;
                    n += 1;
                }
            }
        }
        reports.push(report);
        progress((i + 1) as f64 / sources.len() as f64);
    }
    if records.is_empty() {
        let mut names: Vec<String> = sources
            .iter()
            .take(5)
            .map(|s| s.path.display().to_string())
            .collect();
        if sources.len() > 5 {
            names.push(format!("{} more", sources.len() - 5));
        }
        return Err(BuildError::NothingCut {
            files: names.join(", "),
        });
    }
    let manifest_path = out.join("manifest.csv");
    if cfg.append && manifest_path.exists() {
        let old_manifest = Manifest::load(&manifest_path)?;
        // Patches an earlier run lost (a kill before their rename, a deleted file) leave the
        // manifest, with a warning, rather than break the training that reads it.
        let (mut old, lost): (Vec<_>, Vec<_>) =
            old_manifest.records.iter().cloned().partition(|r| {
                std::fs::metadata(old_manifest.resolve(r)).is_ok_and(|m| m.len() > 0)
            });
        if !lost.is_empty() {
            log::warn!(
                "{}: {} patch(es) listed but missing or empty were dropped (first: {})",
                manifest_path.display(),
                lost.len(),
                old_manifest.resolve(&lost[0]).display()
            );
        }
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

/// The most blocks a source is cut into (unless `block_px` asks for more).
const MAX_BLOCKS: u64 = 64;

/// A grid of disjoint blocks over the level 0, dealt to the splits in a shuffled order.
fn blocks_for((w, h): (u64, u64), cfg: &BuildConfig, rng: &mut impl Rng) -> Vec<Block> {
    let side = if cfg.block_px > 0 {
        cfg.block_px
    } else {
        // At most MAX_BLOCKS blocks: a huge slide gets larger blocks, not more of them.
        let fit = ((w as f64 * h as f64 / MAX_BLOCKS as f64).sqrt().ceil()) as u64;
        (w.min(h) / 2).clamp(1024, 16384).max(fit)
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

/// The target µm/px of the patches to cut from `block` of `src`: each listed magnification up to
/// the native one (`per_magnification` times, no more than non-overlapping patches would fit), or
/// continuous pixel sizes drawn per octave, this block's `share` of its group's `per_octave`.
fn plan_targets(
    src: &Source,
    block: &Block,
    cfg: &BuildConfig,
    share: f64,
    rng: &mut impl Rng,
) -> Vec<f64> {
    let native = src.mpp;
    // A patch of min_patch px must fit in the block (its pixels squashed along x when stored so).
    let side_px = (block.w as f64 / src.squash_x).min(block.h as f64);
    let fits = |mpp: f64| side_px * native / mpp >= f64::from(cfg.min_patch);
    match &cfg.scales {
        Scales::Magnifications(mags) => {
            let mut out = Vec::new();
            for &mag in mags.iter().filter(|&&m| m <= 10.0 / native * 1.001) {
                let scale = native * mag / 10.0;
                // No more patches than non-overlapping ones would fit: more would be near-duplicates.
                let fit = |side: f64| (side * scale / f64::from(cfg.min_patch)).floor() as usize;
                let capacity = (fit(block.w as f64 / src.squash_x) * fit(block.h as f64)).max(1);
                out.extend(std::iter::repeat_n(
                    10.0 / mag,
                    cfg.per_magnification.min(capacity),
                ));
            }
            out
        }
        Scales::Continuous {
            per_octave,
            max_upsample,
            coarsest_mpp,
        } => {
            // Unlabelled sources are cut in pairs: the coarser one of each pair needs room too.
            let room = side_px * native / f64::from(cfg.min_patch);
            let finest = native / max_upsample.max(1.0);
            let coarsest = if src.absolute {
                room.min(*coarsest_mpp)
            } else {
                room / PAIR_MIN
            };
            if coarsest.is_nan() || coarsest < finest || !fits(finest) {
                return Vec::new();
            }
            let (lo, hi) = (finest.log2(), coarsest.log2());
            let mut out = Vec::new();
            let mut a = lo;
            loop {
                let b = (a + 1.0).min(hi);
                // A partial last octave gets its part of the count; fractions are drawn.
                let want = *per_octave as f64 * share * (b - a).max(0.05);
                let count = want.floor() as usize + usize::from(rng.random_bool(want.fract()));
                for _ in 0..count {
                    out.push(rng.random_range(a..=b).exp2());
                }
                if b >= hi {
                    break;
                }
                a = b;
            }
            out
        }
    }
}

/// A field cut for a patch: its pixels, the patch side, the level-0 rectangle and the target µm/px.
type Cut = (RgbaImage, u32, String, f64);

/// The narrowest and widest ratios between the two scales of an unlabelled pair.
const PAIR_MIN: f64 = 1.5;
const PAIR_MAX: f64 = 3.0;

/// A square field of `side` µm-true pixels on tissue inside `block` (its x extent squashed as
/// stored), found on the thumbnail: the top-left corner.
fn place_field(
    coarse: &Coarse,
    src: &Source,
    block: &Block,
    side: u64,
    cfg: &BuildConfig,
    rng: &mut impl Rng,
) -> Option<(u64, u64, u64)> {
    let wide = ((side as f64 * src.squash_x).round() as u64).max(1);
    if wide > block.w || side > block.h {
        return None;
    }
    for _ in 0..50 {
        let x = block.x + rng.random_range(0..=block.w - wide);
        let y = block.y + rng.random_range(0..=block.h - side);
        if coarse.background(x, y, wide, side) <= cfg.max_background {
            return Some((x, y, wide));
        }
    }
    None
}

/// Reads a level-0 rectangle at the coarsest level still at least as fine as `scale` asks; None
/// (counted in `report`) where that takes more than `max_pixels`.
fn read_field(
    slide: &Slide,
    (x, y, w, h): (u64, u64, u64, u64),
    scale: f64,
    max_pixels: u64,
    report: &mut SourceReport,
) -> Result<Option<RgbaImage>, BuildError> {
    let info = slide.info();
    let level = info
        .levels
        .iter()
        .rposition(|l| l.downsample <= 1.0 / scale + 1e-9)
        .unwrap_or(0);
    let ds = info.levels[level].downsample;
    let (rw, rh) = (
        ((w as f64 / ds).round() as u32).max(1),
        ((h as f64 / ds).round() as u32).max(1),
    );
    if u64::from(rw) * u64::from(rh) > max_pixels {
        report.too_large_to_read += 1;
        return Ok(None);
    }
    Ok(Some(slide.read_region(level, x as i64, y as i64, rw, rh)?))
}

/// One field inside `block` for a patch at `target` µm/px: the field's pixels, the patch side and
/// the level-0 rectangle; None when the block is too small or ten tries found only background.
#[allow(clippy::too_many_arguments)]
fn cut_patch(
    slide: &Slide,
    coarse: &Coarse,
    src: &Source,
    block: &Block,
    target: f64,
    cfg: &BuildConfig,
    rng: &mut impl Rng,
    report: &mut SourceReport,
) -> Result<Option<(RgbaImage, u32, String)>, BuildError> {
    let scale = src.mpp / target;
    let room = (block.w as f64 / src.squash_x).min(block.h as f64);
    let fits = (room * scale).floor() as u32;
    if fits < cfg.min_patch {
        return Ok(None);
    }
    for _ in 0..10 {
        let patch = rng.random_range(cfg.min_patch..=cfg.max_patch.min(fits).max(cfg.min_patch));
        let side = ((f64::from(patch) / scale).round() as u64).clamp(1, room as u64);
        let Some((x, y, wide)) = place_field(coarse, src, block, side, cfg, rng) else {
            return Ok(None);
        };
        let Some(field) = read_field(
            slide,
            (x, y, wide, side),
            scale,
            cfg.max_field_pixels,
            report,
        )?
        else {
            return Ok(None);
        };
        if background_fraction(&field) > cfg.max_background {
            report.rejected_background += 1;
            continue;
        }
        return Ok(Some((field, patch, format!("{x},{y},{wide},{side}"))));
    }
    Ok(None)
}

/// Patches of one field of an unlabelled source at two scales: `target` (relative µm/px) and a
/// coarser one up to [`PAIR_MAX`] times it, centred on the same point; the finer field is the
/// centre of the coarser one.
#[allow(clippy::too_many_arguments)]
fn cut_pair(
    slide: &Slide,
    coarse: &Coarse,
    src: &Source,
    block: &Block,
    target: f64,
    cfg: &BuildConfig,
    rng: &mut impl Rng,
    report: &mut SourceReport,
) -> Result<Option<Vec<Cut>>, BuildError> {
    let patch = cfg.min_patch;
    let room = (block.w as f64 / src.squash_x).min(block.h as f64);
    // The widest ratio whose coarser field still fits.
    let widest = (room * src.mpp / (f64::from(patch) * target)).min(PAIR_MAX);
    if widest < PAIR_MIN {
        return Ok(None);
    }
    let k = rng.random_range(PAIR_MIN..=widest);
    let (fine, wide) = (src.mpp / target, src.mpp / (target * k));
    let big = ((f64::from(patch) / wide).round() as u64).min(room as u64);
    for _ in 0..10 {
        let Some((x, y, big_w)) = place_field(coarse, src, block, big, cfg, rng) else {
            return Ok(None);
        };
        let Some(outer) = read_field(
            slide,
            (x, y, big_w, big),
            fine,
            cfg.max_field_pixels,
            report,
        )?
        else {
            return Ok(None);
        };
        if background_fraction(&outer) > cfg.max_background {
            report.rejected_background += 1;
            continue;
        }
        // The inner field in the outer one's pixels (it was read at a level of its own).
        let (ow, oh) = outer.dimensions();
        let f = 1.0 / k;
        let (iw, ih) = (
            ((f64::from(ow) * f).round() as u32).max(1),
            ((f64::from(oh) * f).round() as u32).max(1),
        );
        let inner =
            image::imageops::crop_imm(&outer, (ow - iw) / 2, (oh - ih) / 2, iw, ih).to_image();
        let small = (big as f64 / k).round() as u64;
        let (ix, iy) = (
            x + (big_w - (small as f64 * src.squash_x) as u64) / 2,
            y + (big - small) / 2,
        );
        return Ok(Some(vec![
            (inner, patch, format!("{ix},{iy},{small},{small}"), target),
            (outer, patch, format!("{x},{y},{big_w},{big}"), target * k),
        ]));
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
