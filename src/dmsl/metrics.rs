//! Classification metrics as the DMSL paper reports them: accuracy, precision, recall, F1 and AUC.
//! With two classes, precision, recall and F1 are those of the second class (the positive one, e.g.
//! "tumour" after "other") and AUC is the ROC AUC of its probability; with more classes, all four are
//! macro averages (unweighted means over one-vs-rest classes).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub auc: f64,
    pub support: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassificationMetrics {
    pub n: usize,
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub auc: f64,
    pub per_class: Vec<ClassMetrics>,
    /// confusion[true][predicted].
    pub confusion: Vec<Vec<usize>>,
}

/// Index of the largest probability (the first on ties).
pub fn argmax(p: &[f32]) -> usize {
    p.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv { (i, v) } else { (bi, bv) }
        })
        .0
}

/// ROC AUC of `scores` for the positives (Mann-Whitney U with tied ranks averaged); NaN when either
/// class is absent.
pub fn roc_auc(scores: &[f32], positive: &[bool]) -> f64 {
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return f64::NAN;
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            if positive[k] {
                rank_sum += avg_rank;
            }
        }
        i = j + 1;
    }
    (rank_sum - (n_pos * (n_pos + 1)) as f64 / 2.0) / (n_pos * n_neg) as f64
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

impl ClassificationMetrics {
    /// `probs[i]` is the probability vector of sample i, `labels[i]` its true class.
    pub fn compute(probs: &[Vec<f32>], labels: &[usize], classes: usize) -> Self {
        let mut confusion = vec![vec![0usize; classes]; classes];
        for (p, &y) in probs.iter().zip(labels) {
            if y < classes {
                confusion[y][argmax(p).min(classes - 1)] += 1;
            }
        }
        let n = labels.len();
        let correct: usize = (0..classes).map(|c| confusion[c][c]).sum();
        let per_class: Vec<ClassMetrics> = (0..classes)
            .map(|c| {
                let tp = confusion[c][c];
                let support: usize = confusion[c].iter().sum();
                let predicted: usize = (0..classes).map(|t| confusion[t][c]).sum();
                let precision = ratio(tp, predicted);
                let recall = ratio(tp, support);
                let f1 = if precision + recall > 0.0 {
                    2.0 * precision * recall / (precision + recall)
                } else {
                    0.0
                };
                let scores: Vec<f32> = probs
                    .iter()
                    .map(|p| p.get(c).copied().unwrap_or(0.0))
                    .collect();
                let positive: Vec<bool> = labels.iter().map(|&y| y == c).collect();
                ClassMetrics {
                    precision,
                    recall,
                    f1,
                    auc: roc_auc(&scores, &positive),
                    support,
                }
            })
            .collect();
        let (precision, recall, f1, auc) = if classes == 2 {
            let p = &per_class[1];
            (p.precision, p.recall, p.f1, p.auc)
        } else {
            let mean = |f: fn(&ClassMetrics) -> f64| {
                let v: Vec<f64> = per_class.iter().map(f).filter(|v| v.is_finite()).collect();
                if v.is_empty() {
                    f64::NAN
                } else {
                    v.iter().sum::<f64>() / v.len() as f64
                }
            };
            (
                mean(|m| m.precision),
                mean(|m| m.recall),
                mean(|m| m.f1),
                mean(|m| m.auc),
            )
        };
        ClassificationMetrics {
            n,
            accuracy: ratio(correct, n),
            precision,
            recall,
            f1,
            auc,
            per_class,
            confusion,
        }
    }

    /// A printed table: the summary line, per-class figures and the confusion matrix.
    pub fn table(&self, classes: &[String]) -> String {
        let mut s = format!(
            "n {}  accuracy {:.3}  precision {:.3}  recall {:.3}  F1 {:.3}  AUC {:.3}\n",
            self.n, self.accuracy, self.precision, self.recall, self.f1, self.auc
        );
        let width = classes.iter().map(|c| c.len()).max().unwrap_or(5).max(5);
        s += &format!(
            "{:width$}  precision  recall     F1    AUC  support\n",
            "class"
        );
        for (c, m) in classes.iter().zip(&self.per_class) {
            s += &format!(
                "{c:width$}  {:9.3}  {:6.3}  {:5.3}  {:5.3}  {:7}\n",
                m.precision, m.recall, m.f1, m.auc, m.support
            );
        }
        s += &format!("confusion (rows: true, columns: predicted)\n{:width$}", "");
        for c in classes {
            s += &format!(" {c:>width$}");
        }
        s.push('\n');
        for (c, row) in classes.iter().zip(&self.confusion) {
            s += &format!("{c:width$}");
            for v in row {
                s += &format!(" {v:>width$}");
            }
            s.push('\n');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_metrics_by_hand() {
        // Labels 0,0,1,1,1; predicted 0,1,1,1,0.
        let probs = vec![
            vec![0.9, 0.1],
            vec![0.4, 0.6],
            vec![0.2, 0.8],
            vec![0.3, 0.7],
            vec![0.55, 0.45],
        ];
        let labels = [0, 0, 1, 1, 1];
        let m = ClassificationMetrics::compute(&probs, &labels, 2);
        assert_eq!(m.confusion, vec![vec![1, 1], vec![1, 2]]);
        assert!((m.accuracy - 0.6).abs() < 1e-12);
        assert!((m.precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.recall - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.f1 - 2.0 / 3.0).abs() < 1e-12);
        // Positive scores 0.8, 0.7, 0.45 vs negatives 0.1, 0.6: pairs won 2 + 2 + 1 = 5 of 6.
        assert!((m.auc - 5.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn auc_handles_ties_and_missing_classes() {
        assert!((roc_auc(&[0.5, 0.5], &[true, false]) - 0.5).abs() < 1e-12);
        assert!(roc_auc(&[0.1, 0.2], &[true, true]).is_nan());
    }

    #[test]
    fn macro_averages_for_three_classes() {
        let probs = vec![
            vec![0.8, 0.1, 0.1],
            vec![0.1, 0.8, 0.1],
            vec![0.1, 0.1, 0.8],
            vec![0.1, 0.8, 0.1],
        ];
        let labels = [0, 1, 2, 2];
        let m = ClassificationMetrics::compute(&probs, &labels, 3);
        assert!((m.accuracy - 0.75).abs() < 1e-12);
        // Per class recall 1, 1, 0.5 → macro 0.8333; precision 1, 0.5, 1 → 0.8333.
        assert!((m.recall - 2.5 / 3.0).abs() < 1e-12);
        assert!((m.precision - 2.5 / 3.0).abs() < 1e-12);
        assert!(
            m.table(&["a".into(), "b".into(), "c".into()])
                .contains("confusion")
        );
    }
}
