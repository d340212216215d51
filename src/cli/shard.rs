//! Batch work split over machines: `--shard K/N` keeps every N-th input starting at K (0-based, so
//! that Slurm's `SLURM_ARRAY_TASK_ID` and Kubernetes' `JOB_COMPLETION_INDEX` can be passed as they
//! are), and `histolens merge` combines the shards' outputs into what one run would have written.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;

/// Shard K of N.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (k, n) = s
            .split_once('/')
            .ok_or_else(|| format!("{s}: a shard is K/N, e.g. 0/8"))?;
        let parse = |v: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| format!("{s}: K and N are whole numbers"))
        };
        let (index, count) = (parse(k)?, parse(n)?);
        if count == 0 || index >= count {
            return Err(format!("{s}: K counts from 0 and must be below N"));
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// This shard's part of `items` (in their order): every N-th from K, so shards are balanced and
    /// the same inputs always give the same partition.
    pub fn take<T>(&self, items: Vec<T>) -> Vec<T> {
        items
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % self.count == self.index)
            .map(|(_, t)| t)
            .collect()
    }
}

#[derive(Args)]
pub struct MergeArgs {
    /// The shards' outputs: JSON arrays (`--json --out`) or CSV files (`--csv --out`) of one command.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// The merged file (JSON or CSV like the inputs), written atomically.
    #[arg(long)]
    pub out: PathBuf,
}

/// Whether `p` names a CSV file (else JSON), by its extension.
pub(super) fn is_csv(p: &Path) -> bool {
    p.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv"))
}

/// Rows of every input, ordered by their `path` field (as one run lists its inputs), then written.
pub fn merge(args: MergeArgs) -> anyhow::Result<()> {
    let csv = is_csv(&args.inputs[0]);
    if args.inputs.iter().any(|p| is_csv(p) != csv) {
        bail!("the shards to merge are all JSON or all CSV");
    }
    let key = |row: &serde_json::Value| {
        row.get("path")
            .and_then(|p| p.as_str())
            .map(str::to_string)
            .unwrap_or_default()
    };
    let bytes = if csv {
        let mut header: Option<csv::StringRecord> = None;
        let mut rows: Vec<csv::StringRecord> = Vec::new();
        for p in &args.inputs {
            let mut r =
                csv::Reader::from_path(p).with_context(|| format!("reading {}", p.display()))?;
            let h = r.headers()?.clone();
            match &header {
                Some(first) if *first != h => bail!(
                    "{} has other columns than {}",
                    p.display(),
                    args.inputs[0].display()
                ),
                Some(_) => {}
                None => header = Some(h),
            }
            for rec in r.records() {
                rows.push(rec.with_context(|| format!("reading {}", p.display()))?);
            }
        }
        let header = header.unwrap_or_default();
        let path_col = header
            .iter()
            .position(|c| c == "path")
            .context("the CSV files have no path column")?;
        rows.sort_by(|a, b| a.get(path_col).cmp(&b.get(path_col)));
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(&header)?;
        for r in &rows {
            w.write_record(r)?;
        }
        w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?
    } else {
        let mut rows: Vec<serde_json::Value> = Vec::new();
        for p in &args.inputs {
            let text = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            let part: Vec<serde_json::Value> = serde_json::from_slice(&text)
                .with_context(|| format!("{} is not a JSON array of rows", p.display()))?;
            rows.extend(part);
        }
        rows.sort_by_key(key);
        let mut out = serde_json::to_vec_pretty(&rows)?;
        out.push(b'\n');
        out
    };
    let n = if csv {
        bytes
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            .saturating_sub(1)
    } else {
        0
    };
    histolens::util::fs::write_atomic(&args.out, &bytes)
        .with_context(|| format!("writing {}", args.out.display()))?;
    if csv {
        eprintln!(
            "{n} rows from {} shards in {}",
            args.inputs.len(),
            args.out.display()
        );
    } else {
        eprintln!(
            "{} shards merged into {}",
            args.inputs.len(),
            args.out.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_inputs() {
        let items: Vec<usize> = (0..10).collect();
        let mut all: Vec<usize> = (0..3)
            .flat_map(|k| Shard { index: k, count: 3 }.take(items.clone()))
            .collect();
        all.sort();
        assert_eq!(all, items);
        assert_eq!(Shard { index: 1, count: 3 }.take(items), [1, 4, 7]);
        assert_eq!("2/4".parse::<Shard>(), Ok(Shard { index: 2, count: 4 }));
        assert!("4/4".parse::<Shard>().is_err() && "1/0".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
    }
}
