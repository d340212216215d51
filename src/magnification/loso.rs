//! Leave-one-source-out evaluation: for each source group, a model trained without it scores it as
//! a lab it has never seen; groups held out of all training (every patch in the test split, e.g.
//! BACH) are scored by the model trained on every other group. Scores come from the estimate a user
//! gets ([`estimate_image`]: the median over crops on tissue), compared with the documented µm/px.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use candle_core::Device;
use serde::Serialize;

use super::estimate::{estimate_image, quantile};
use super::model::MagnificationModel;
use super::ruler::RELIABLE_MPP;
use super::train::{Start, TrainConfig, TrainError, TrainEvent, train_selected};
use crate::data::manifest::{MagnificationRecord, Manifest, Split};

/// The magnifications of the 4-level task (BreakHis's objectives).
pub const LEVELS: [f64; 4] = [4.0, 10.0, 20.0, 40.0];

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct SourceScore {
    pub source: String,
    /// Held out of every fold's training (scored by the model trained on all other groups).
    pub evaluation_only: bool,
    pub n: usize,
    /// Share of images within ±10% and ±25% of the true µm/px.
    pub within_10: f64,
    pub within_25: f64,
    /// Median of |log2(estimate / truth)|.
    pub median_abs_log2: f64,
    /// Images within ±25% of one of [`LEVELS`], and the share whose estimate is nearest that level.
    pub level_n: usize,
    pub level_accuracy: Option<f64>,
}

/// (true µm/px, estimated µm/px) of one image.
pub type Scored = (f64, f64);

impl SourceScore {
    pub fn compute(source: &str, evaluation_only: bool, scored: &[Scored]) -> Self {
        let n = scored.len();
        let share = |f: &dyn Fn(&Scored) -> bool| {
            scored.iter().filter(|s| f(s)).count() as f64 / n.max(1) as f64
        };
        let mut errors: Vec<f64> = scored.iter().map(|(t, e)| (e / t).log2().abs()).collect();
        errors.sort_by(f64::total_cmp);
        let median_abs_log2 = quantile(&errors, 0.5);
        let levelled: Vec<(usize, f64)> = scored
            .iter()
            .filter_map(|&(t, e)| level_of(10.0 / t, 1.25).map(|l| (l, e)))
            .collect();
        let level_accuracy = (!levelled.is_empty()).then(|| {
            levelled
                .iter()
                .filter(|&&(l, e)| level_of(10.0 / e, f64::INFINITY) == Some(l))
                .count() as f64
                / levelled.len() as f64
        });
        SourceScore {
            source: source.to_string(),
            evaluation_only,
            n,
            within_10: share(&|(t, e)| (e / t - 1.0).abs() <= 0.10),
            within_25: share(&|(t, e)| (e / t - 1.0).abs() <= 0.25),
            median_abs_log2,
            level_n: levelled.len(),
            level_accuracy,
        }
    }
}

/// The index of the level nearest `magnification` (in log space) when within a factor `tolerance`.
fn level_of(magnification: f64, tolerance: f64) -> Option<usize> {
    let (i, d) = LEVELS
        .iter()
        .map(|l| (magnification / l).log2().abs())
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(&b.1))?;
    (d <= tolerance.log2()).then_some(i)
}

/// One held-out image.
#[derive(Debug, Clone, Serialize)]
pub struct ImageScore {
    pub group: String,
    pub path: String,
    pub true_mpp: f64,
    /// The network's estimate.
    pub network_mpp: f64,
    /// The nuclei ruler's reading where it is inside its reliable range.
    pub ruler_mpp: Option<f64>,
    /// The red-cell ruler's reading, where it finds enough lone red blood cells (not fused).
    pub red_cells_mpp: Option<f64>,
    /// The network and the ruler combined ([`fuse`]).
    pub fused_mpp: f64,
}

/// The scores of one estimator over every held-out source, and pooled.
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub sources: Vec<SourceScore>,
    pub pooled: SourceScore,
}

impl Scores {
    fn of(
        images: &[ImageScore],
        groups: &[(String, bool)],
        pick: impl Fn(&ImageScore) -> Option<f64>,
    ) -> Self {
        let scored = |g: Option<&str>| -> Vec<Scored> {
            images
                .iter()
                .filter(|i| g.is_none_or(|g| i.group == g))
                .filter_map(|i| pick(i).map(|e| (i.true_mpp, e)))
                .collect()
        };
        Scores {
            sources: groups
                .iter()
                .map(|(g, eval_only)| SourceScore::compute(g, *eval_only, &scored(Some(g))))
                .collect(),
            pooled: SourceScore::compute("pooled", false, &scored(None)),
        }
    }

    /// The table as text.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<28} {:>5} {:>7} {:>7} {:>10} {:>12}\n",
            "held-out source", "n", "±10%", "±25%", "|log2 err|", "4-level"
        );
        for r in self.sources.iter().chain(std::iter::once(&self.pooled)) {
            let name = if r.evaluation_only {
                format!("{} (eval only)", r.source)
            } else {
                r.source.clone()
            };
            s += &format!(
                "{:<28} {:>5} {:>6.1}% {:>6.1}% {:>10.3} {:>12}\n",
                name,
                r.n,
                100.0 * r.within_10,
                100.0 * r.within_25,
                r.median_abs_log2,
                r.level_accuracy.map_or("-".to_string(), |a| format!(
                    "{:.1}% of {}",
                    100.0 * a,
                    r.level_n
                ))
            );
        }
        s
    }

    /// CSV rows (one per source, then `pooled`), each starting with `estimator`.
    fn csv_rows(&self, estimator: &str) -> String {
        let mut s = String::new();
        for r in self.sources.iter().chain(std::iter::once(&self.pooled)) {
            s += &format!(
                "{estimator},{},{},{},{:.4},{:.4},{:.4},{},{}\n",
                r.source.replace(',', ";"),
                r.evaluation_only,
                r.n,
                r.within_10,
                r.within_25,
                r.median_abs_log2,
                r.level_n,
                r.level_accuracy
                    .map_or(String::new(), |a| format!("{a:.4}"))
            );
        }
        s
    }
}

/// The leave-one-source-out scores of the network, of the nuclei ruler (where it reads inside its
/// range) and of the two fused, with every image.
#[derive(Debug, Clone, Serialize)]
pub struct LosoReport {
    pub network: Scores,
    pub ruler: Scores,
    pub red_cells: Scores,
    pub fused: Scores,
    pub images: Vec<ImageScore>,
}

impl LosoReport {
    fn of(images: Vec<ImageScore>, groups: &[(String, bool)]) -> Self {
        LosoReport {
            network: Scores::of(&images, groups, |i| Some(i.network_mpp)),
            ruler: Scores::of(&images, groups, |i| i.ruler_mpp),
            red_cells: Scores::of(&images, groups, |i| i.red_cells_mpp),
            fused: Scores::of(&images, groups, |i| Some(i.fused_mpp)),
            images,
        }
    }

    pub fn table(&self) -> String {
        format!(
            "network alone\n{}\nnuclei ruler alone (images it reads, resampled toward 0.5 µm/px, inside {:.1}-{:.1} µm/px)\n{}\nred-cell ruler alone (images with at least {} lone red blood cells of one size; not fused)\n{}\nnetwork and ruler fused (what `predict` reports)\n{}",
            self.network.table(),
            RELIABLE_MPP.0,
            RELIABLE_MPP.1,
            self.ruler.table(),
            super::red_cells::MIN_CELLS,
            self.red_cells.table(),
            self.fused.table()
        )
    }

    pub fn csv(&self) -> String {
        String::from(
            "estimator,source,evaluation_only,n,within_10,within_25,median_abs_log2,level_n,level_accuracy\n",
        ) + &self.network.csv_rows("network")
            + &self.ruler.csv_rows("ruler")
            + &self.red_cells.csv_rows("red_cells")
            + &self.fused.csv_rows("fused")
    }
}

/// What a run reports as it goes.
#[derive(Debug, Clone)]
pub enum LosoEvent {
    /// Fold `fold` of `folds` starts: trained without `held_out`.
    Fold {
        fold: usize,
        folds: usize,
        held_out: Vec<String>,
    },
    Train(TrainEvent),
    Scored(SourceScore),
}

/// Where the folds of a run live and how they are scored.
#[derive(Debug, Clone, Copy)]
pub struct Folds<'a> {
    /// One run folder per fold, resumed when present.
    pub work: &'a Path,
    /// Each fold starts from the last checkpoint of its namesake in this folder (an earlier run's
    /// `work`), not from the configuration's start.
    pub start_from: Option<&'a Path>,
    /// Crops per held-out image.
    pub crops: usize,
}

/// Runs the folds and scores each held-out group's images.
pub fn loso(
    manifest_path: &Path,
    cfg: &TrainConfig,
    folds_at: Folds,
    device: &Device,
    stop: &AtomicBool,
    mut on_event: impl FnMut(LosoEvent),
) -> Result<LosoReport, TrainError> {
    let manifest: Manifest = Manifest::load(manifest_path)?;
    let absolute = |r: &&MagnificationRecord| r.absolute;
    let groups: BTreeSet<&str> = manifest
        .records
        .iter()
        .filter(absolute)
        .map(|r| r.group())
        .collect();
    // A group with every patch in the test split is for evaluation only.
    let evaluation_only: BTreeSet<&str> = groups
        .iter()
        .copied()
        .filter(|g| {
            manifest
                .records
                .iter()
                .filter(|r| r.group() == *g)
                .all(|r| r.split == Split::Test)
        })
        .collect();
    let trainable: Vec<&str> = groups
        .iter()
        .copied()
        .filter(|g| !evaluation_only.contains(g))
        .collect();
    // One fold per trainable group, and one trained on all of them for the evaluation-only groups.
    let mut folds: Vec<Vec<&str>> = trainable.iter().map(|g| vec![*g]).collect();
    if !evaluation_only.is_empty() {
        folds.push(evaluation_only.iter().copied().collect());
    }
    let mut images: Vec<ImageScore> = Vec::new();
    let n_folds = folds.len();
    for (k, held_out) in folds.iter().enumerate() {
        on_event(LosoEvent::Fold {
            fold: k + 1,
            folds: n_folds,
            held_out: held_out.iter().map(|s| s.to_string()).collect(),
        });
        let split_of = |r: &MagnificationRecord| {
            let g = r.group();
            (!held_out.contains(&g) && !evaluation_only.contains(g)).then_some(Split::Train)
        };
        let name = format!("fold-{}", sanitize(&held_out.join("+")));
        let dir = folds_at.work.join(&name);
        let mut cfg = cfg.clone();
        if let Some(d) = folds_at.start_from {
            cfg.start = Start::Checkpoint(d.join(&name).join("last.safetensors"));
        }
        let outcome = train_selected(manifest_path, &split_of, &cfg, &dir, device, stop, |e| {
            on_event(LosoEvent::Train(e))
        })?;
        if outcome.stopped {
            return Err(TrainError::Config("stopped".into()));
        }
        let model = MagnificationModel::load(&outcome.last, device)
            .map_err(|e| TrainError::Config(e.to_string()))?;
        for g in held_out {
            let scored = score_group(&manifest, g, &model, folds_at.crops)?;
            let pairs: Vec<Scored> = scored.iter().map(|i| (i.true_mpp, i.fused_mpp)).collect();
            on_event(LosoEvent::Scored(SourceScore::compute(
                g,
                evaluation_only.contains(g),
                &pairs,
            )));
            images.extend(scored);
        }
    }
    let groups: Vec<(String, bool)> = folds
        .iter()
        .flatten()
        .map(|g| (g.to_string(), evaluation_only.contains(g)))
        .collect();
    Ok(LosoReport::of(images, &groups))
}

/// Scores one model on every source group of a manifest, in the table of [`loso`]: a baseline, or a
/// shipped model on the sources it never saw. `held_out` marks the groups reported as unseen.
pub fn score_by_source(
    manifest_path: &Path,
    model: &MagnificationModel,
    crops: usize,
    held_out: impl Fn(&str) -> bool,
    mut on_scored: impl FnMut(&SourceScore),
) -> Result<LosoReport, TrainError> {
    let manifest: Manifest = Manifest::load(manifest_path)?;
    let groups: BTreeSet<&str> = manifest
        .records
        .iter()
        .filter(|r| r.absolute)
        .map(|r| r.group())
        .collect();
    let mut images = Vec::new();
    for g in &groups {
        let scored = score_group(&manifest, g, model, crops)?;
        let pairs: Vec<Scored> = scored.iter().map(|i| (i.true_mpp, i.fused_mpp)).collect();
        on_scored(&SourceScore::compute(g, held_out(g), &pairs));
        images.extend(scored);
    }
    let groups: Vec<(String, bool)> = groups
        .iter()
        .map(|g| (g.to_string(), held_out(g)))
        .collect();
    Ok(LosoReport::of(images, &groups))
}

/// The estimates of every image of known scale in `group`.
fn score_group(
    manifest: &Manifest,
    group: &str,
    model: &MagnificationModel,
    crops: usize,
) -> Result<Vec<ImageScore>, TrainError> {
    let mut images = Vec::new();
    for r in manifest
        .records
        .iter()
        .filter(|r| r.absolute && r.group() == group)
    {
        let path = manifest.resolve(r);
        let img = image::open(&path).map_err(|e| TrainError::Image {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let e = estimate_image(model, &img.to_rgba8(), crops)
            .map_err(|e| TrainError::Config(e.to_string()))?;
        images.push(ImageScore {
            group: group.to_string(),
            path: r.path.clone(),
            true_mpp: r.mpp,
            network_mpp: e.network_mpp,
            ruler_mpp: e.ruler.filter(|r| r.reliable()).map(|r| r.mpp),
            red_cells_mpp: e.red_cells.map(|r| r.mpp),
            fused_mpp: e.mpp,
        });
    }
    Ok(images)
}

/// A group name as a folder name.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '+' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_of_a_hand_made_table() {
        // Truth 0.25 (40x) and 0.5 (20x); estimates 5% off, 20% off, and a factor 2 off.
        let s = SourceScore::compute("x", false, &[(0.25, 0.2625), (0.5, 0.6), (0.5, 1.0)]);
        assert_eq!(s.n, 3);
        assert!((s.within_10 - 1.0 / 3.0).abs() < 1e-12);
        assert!((s.within_25 - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.median_abs_log2 - 1.2f64.log2()).abs() < 1e-12);
        // 0.6 µm/px (16.7x) is still nearest 20x; 1.0 (10x) is not.
        assert_eq!(s.level_n, 3);
        assert!((s.level_accuracy.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        // 1 µm/px is 10x: a level; 0.7 µm/px (14x) is 30% from 10x and from 20x: none.
        assert_eq!(level_of(10.0, 1.25), Some(1));
        assert_eq!(level_of(14.3, 1.25), None);
    }
}
