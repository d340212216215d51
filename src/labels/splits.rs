//! Dealing whole groups to train, validation and test.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::{Label, LabelEntry};
use crate::data::magnification::split_for_rank;
use crate::data::manifest::Split;

/// Each entry's split: groups holding a labelled entry are dealt whole (entries of other groups get
/// None). Groups are ordered by their most frequent label (strata in a shuffled order, groups shuffled
/// within them) and dealt so that every prefix of that order keeps close to the fractions: each
/// label's groups spread over the splits, and the split sizes are those of [`split_for_rank`] (with
/// three groups or more, a split with a positive fraction gets at least one).
pub(super) fn deal(entries: &[LabelEntry], fractions: [f64; 3], seed: u64) -> Vec<Option<Split>> {
    let mut label_counts: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for e in entries {
        if let Some(label) = &e.label {
            *label_counts
                .entry(e.split_unit())
                .or_default()
                .entry(stratum(label))
                .or_default() += 1;
        }
    }
    let mut strata: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (unit, counts) in label_counts {
        // The most frequent label; ties go to the first in name order.
        let mut best: Option<(&String, usize)> = None;
        for (key, &n) in &counts {
            if best.is_none_or(|(_, m)| n > m) {
                best = Some((key, n));
            }
        }
        if let Some((key, _)) = best {
            strata.entry(key.clone()).or_default().push(unit);
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut strata: Vec<Vec<String>> = strata.into_values().collect();
    for units in &mut strata {
        units.shuffle(&mut rng);
    }
    strata.shuffle(&mut rng);
    let order: Vec<String> = strata.concat();

    let n = order.len();
    let mut quota = [0usize; 3];
    for rank in 0..n {
        quota[split_index(split_for_rank(rank, n, fractions))] += 1;
    }
    let mut dealt = [0usize; 3];
    let mut split_of: BTreeMap<String, Split> = BTreeMap::new();
    for (position, unit) in order.into_iter().enumerate() {
        // The split furthest behind its share of the groups dealt so far.
        let behind =
            |k: usize| quota[k] as f64 * (position + 1) as f64 / n as f64 - dealt[k] as f64;
        let mut pick: Option<usize> = None;
        for k in (0..3).filter(|&k| dealt[k] < quota[k]) {
            if pick.is_none_or(|p| behind(k) > behind(p)) {
                pick = Some(k);
            }
        }
        // The quotas add up to n, so one is always left.
        let k = pick.unwrap_or(0);
        dealt[k] += 1;
        split_of.insert(unit, Split::ALL[k]);
    }
    entries
        .iter()
        .map(|e| split_of.get(&e.split_unit()).copied())
        .collect()
}

fn split_index(s: Split) -> usize {
    match s {
        Split::Train => 0,
        Split::Val => 1,
        Split::Test => 2,
    }
}

fn stratum(label: &Label) -> String {
    match label {
        Label::Class(c) => format!("class {c}"),
        Label::Magnification { magnification, .. } => format!("magnification {magnification}"),
    }
}
