//! A training run's folder: `config.json` (the options, fixed for the run's life), `log.jsonl` (one line
//! per epoch), `last.safetensors` and `state.json` (every epoch, atomically: what resuming needs),
//! `best.safetensors` (best validation loss) and `report.json` (evaluation at the end).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::fs::write_atomic;

#[derive(Debug, Clone)]
pub struct RunFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub last: PathBuf,
    pub state: PathBuf,
    pub best: PathBuf,
    pub report: PathBuf,
}

impl RunFiles {
    pub fn new(dir: &Path) -> Self {
        RunFiles {
            dir: dir.to_path_buf(),
            config: dir.join("config.json"),
            log: dir.join("log.jsonl"),
            last: dir.join("last.safetensors"),
            state: dir.join("state.json"),
            best: dir.join("best.safetensors"),
            report: dir.join("report.json"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the run in {} was made with another configuration: start a new run folder, or resume with \
         the same options",
        .0.display()
    )]
    ConfigMismatch(PathBuf),
}

impl RunFiles {
    /// Starts a run (writes `config.json`) or resumes one: a folder that holds a run must have been
    /// made with the same configuration, and its saved state is returned.
    pub fn open<C, S>(&self, cfg: &C) -> Result<Option<S>, RunError>
    where
        C: Serialize + DeserializeOwned + PartialEq,
        S: DeserializeOwned,
    {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RunError::Io { path, source }
        };
        if !self.state.exists() {
            write_json(&self.config, cfg).map_err(io(&self.config))?;
            return Ok(None);
        }
        let old: C = read_json(&self.config).map_err(io(&self.config))?;
        if old != *cfg {
            return Err(RunError::ConfigMismatch(self.dir.clone()));
        }
        read_json(&self.state).map(Some).map_err(io(&self.state))
    }
}

pub fn read_json<T: DeserializeOwned>(path: &Path) -> std::io::Result<T> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Pretty JSON, written atomically.
pub fn write_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    write_atomic(path, &json)
}

/// Appends one JSON line and flushes it to disk.
pub fn append_line(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(&line)?;
    f.sync_data()
}

/// Reads every line of a JSON-lines log (lines that do not parse, e.g. one cut by a crash, are skipped).
pub fn read_lines<T: DeserializeOwned>(path: &Path) -> std::io::Result<Vec<T>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Where the weights start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Start {
    /// Kaiming initialisation (as Hagnifinder's code).
    Random,
    /// ImageNet weights of the backbone (an EfficientNet-Lite0 safetensors file with the
    /// efficientnet-pytorch names); the head starts random.
    Imagenet(PathBuf),
    /// A histolens checkpoint of the same task and architecture.
    Checkpoint(PathBuf),
}

/// Halves the learning rate when the monitored loss has not improved for `patience` epochs.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Plateau {
    pub best: Option<f64>,
    pub bad_epochs: usize,
}

impl Plateau {
    /// Records an epoch's loss; returns the new learning rate when it changes.
    pub fn update(&mut self, loss: f64, lr: f64, patience: usize, min_lr: f64) -> Option<f64> {
        if self.best.is_none_or(|b| loss < b - 1e-6) {
            self.best = Some(loss);
            self.bad_epochs = 0;
            return None;
        }
        self.bad_epochs += 1;
        if self.bad_epochs < patience {
            return None;
        }
        self.bad_epochs = 0;
        let new = (lr / 2.0).max(min_lr);
        (new < lr).then_some(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plateau_halves_after_patience_epochs_without_improvement() {
        let mut p = Plateau::default();
        assert_eq!(p.update(1.0, 0.1, 2, 0.01), None);
        assert_eq!(p.update(0.5, 0.1, 2, 0.01), None);
        assert_eq!(p.update(0.6, 0.1, 2, 0.01), None);
        assert_eq!(p.update(0.7, 0.1, 2, 0.01), Some(0.05));
        assert_eq!(p.update(0.7, 0.011, 1, 0.01), Some(0.01));
        assert_eq!(p.update(0.7, 0.01, 1, 0.01), None);
    }

    #[test]
    fn json_lines_skip_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log.jsonl");
        append_line(&p, &serde_json::json!({"a": 1})).unwrap();
        append_line(&p, &serde_json::json!({"a": 2})).unwrap();
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"a\": 3").unwrap();
        let v: Vec<serde_json::Value> = read_lines(&p).unwrap();
        assert_eq!(v.len(), 2);
    }
}
