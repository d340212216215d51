//! Magnification metrics: ACC_N (share with |pred − true| ≤ N), mean absolute error, per-magnification
//! accuracy, a confusion table of rounded magnifications, and the 4-level accuracy (nearest of
//! 4x/10x/20x/40x) of the paper's Table 3.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The four levels of the paper's Table 3.
pub const FOUR_LEVELS: [f64; 4] = [4.0, 10.0, 20.0, 40.0];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PerMagnification {
    pub n: usize,
    pub acc1: f64,
    pub mae: f64,
    pub mean_prediction: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MagnificationMetrics {
    pub n: usize,
    pub mae: f64,
    /// Mean absolute error of log2(magnification): 1.0 is a factor of two.
    pub mae_log2: f64,
    pub acc0_5: f64,
    pub acc1: f64,
    pub acc5: f64,
    /// Keyed by the true magnification ("20x").
    pub per_magnification: BTreeMap<String, PerMagnification>,
    /// true (rounded) → predicted (rounded) → count.
    pub confusion: BTreeMap<String, BTreeMap<String, usize>>,
    /// Accuracy of the nearest of 4x/10x/20x/40x, over the images whose true magnification is one of
    /// them (None when there are none).
    pub four_level: Option<FourLevel>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FourLevel {
    pub n: usize,
    pub accuracy: f64,
    /// Per level ("4x" …): (n, accuracy).
    pub per_level: BTreeMap<String, (usize, f64)>,
}

fn label(m: f64) -> String {
    if (m - m.round()).abs() < 1e-6 {
        format!("{:>4}x", m.round() as i64)
    } else {
        format!("{m:>4.1}x")
    }
}

fn nearest_level(m: f64) -> f64 {
    FOUR_LEVELS
        .into_iter()
        .min_by(|a, b| (m.ln() - a.ln()).abs().total_cmp(&(m.ln() - b.ln()).abs()))
        .unwrap_or(m)
}

impl MagnificationMetrics {
    /// Metrics of (true, predicted) magnification pairs; non-finite predictions count as misses.
    pub fn compute(pairs: &[(f64, f64)]) -> MagnificationMetrics {
        let n = pairs.len();
        if n == 0 {
            return MagnificationMetrics::default();
        }
        let err = |t: f64, p: f64| {
            if p.is_finite() {
                (p - t).abs()
            } else {
                f64::INFINITY
            }
        };
        let share =
            |tol: f64| pairs.iter().filter(|(t, p)| err(*t, *p) <= tol).count() as f64 / n as f64;
        let finite_err = |t: f64, p: f64| err(t, p).min(1e6);
        let mae = pairs.iter().map(|&(t, p)| finite_err(t, p)).sum::<f64>() / n as f64;
        let mae_log2 = pairs
            .iter()
            .map(|&(t, p)| {
                if p.is_finite() && p > 0.0 {
                    (p.log2() - t.log2()).abs()
                } else {
                    10.0
                }
            })
            .sum::<f64>()
            / n as f64;
        let mut groups: BTreeMap<i64, Vec<(f64, f64)>> = BTreeMap::new();
        for &(t, p) in pairs {
            groups
                .entry((t * 1000.0).round() as i64)
                .or_default()
                .push((t, p));
        }
        let per_magnification = groups
            .values()
            .map(|g| {
                let k = g.len() as f64;
                (
                    label(g[0].0),
                    PerMagnification {
                        n: g.len(),
                        acc1: g.iter().filter(|(t, p)| err(*t, *p) <= 1.0).count() as f64 / k,
                        mae: g.iter().map(|&(t, p)| finite_err(t, p)).sum::<f64>() / k,
                        mean_prediction: g.iter().map(|&(_, p)| p).sum::<f64>() / k,
                    },
                )
            })
            .collect();
        let mut confusion: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for &(t, p) in pairs {
            let pl = if p.is_finite() {
                label(p.round())
            } else {
                "invalid".into()
            };
            *confusion
                .entry(label(t.round()))
                .or_default()
                .entry(pl)
                .or_default() += 1;
        }
        let four: Vec<(f64, f64)> = pairs
            .iter()
            .copied()
            .filter(|(t, _)| FOUR_LEVELS.iter().any(|l| (l - t).abs() < 1e-6))
            .collect();
        let four_level = (!four.is_empty()).then(|| {
            let hit = |t: f64, p: f64| p.is_finite() && p > 0.0 && nearest_level(p) == t;
            let per_level = FOUR_LEVELS
                .iter()
                .filter_map(|&l| {
                    let g: Vec<_> = four.iter().filter(|(t, _)| *t == l).collect();
                    (!g.is_empty()).then(|| {
                        let acc =
                            g.iter().filter(|(t, p)| hit(*t, *p)).count() as f64 / g.len() as f64;
                        (label(l).trim().to_string(), (g.len(), acc))
                    })
                })
                .collect();
            FourLevel {
                n: four.len(),
                accuracy: four.iter().filter(|(t, p)| hit(*t, *p)).count() as f64
                    / four.len() as f64,
                per_level,
            }
        });
        MagnificationMetrics {
            n,
            mae,
            mae_log2,
            acc0_5: share(0.5),
            acc1: share(1.0),
            acc5: share(5.0),
            per_magnification,
            confusion,
            four_level,
        }
    }

    /// A printed table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "images {}   MAE {:.2}x   MAE(log2) {:.3}   ACC0.5 {:.1}%   ACC1 {:.1}%   ACC5 {:.1}%\n",
            self.n,
            self.mae,
            self.mae_log2,
            100.0 * self.acc0_5,
            100.0 * self.acc1,
            100.0 * self.acc5
        );
        if let Some(f) = &self.four_level {
            s += &format!(
                "4-level accuracy (4x/10x/20x/40x): {:.1}% over {}",
                100.0 * f.accuracy,
                f.n
            );
            for (l, (n, a)) in &f.per_level {
                s += &format!("   {l}: {:.1}% ({n})", 100.0 * a);
            }
            s.push('\n');
        }
        s += "  true      n   ACC1     MAE   mean prediction\n";
        for (l, p) in &self.per_magnification {
            s += &format!(
                "  {l}  {:>5}  {:>5.1}%  {:>6.2}  {:>8.2}x\n",
                p.n,
                100.0 * p.acc1,
                p.mae,
                p.mean_prediction
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_by_hand() {
        let pairs = [
            (20.0, 20.3),
            (20.0, 21.0),
            (10.0, 16.0),
            (40.0, 41.0),
            (4.0, f64::NAN),
        ];
        let m = MagnificationMetrics::compute(&pairs);
        assert_eq!(m.n, 5);
        assert!((m.acc0_5 - 0.2).abs() < 1e-12);
        assert!((m.acc1 - 0.6).abs() < 1e-12);
        assert!((m.acc5 - 0.6).abs() < 1e-12);
        let p20 = &m.per_magnification[&label(20.0)];
        assert_eq!(p20.n, 2);
        assert!((p20.mae - 0.65).abs() < 1e-12);
        let f = m.four_level.as_ref().unwrap();
        // 20.3→20 ✓, 21→20 ✓, 16→20 ✗ (true 10), 41→40 ✓, NaN ✗.
        assert_eq!(f.n, 5);
        assert!((f.accuracy - 0.6).abs() < 1e-12);
        assert_eq!(m.confusion[&label(10.0)][&label(16.0)], 1);
        assert!(m.table().contains("ACC1 60.0%"));
    }
}
