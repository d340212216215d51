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
    #[error(
        "the run in {} is being written by another process ({holder}): wait for it to finish or \
         stop it, or use another run folder",
        dir.display()
    )]
    Locked { dir: PathBuf, holder: String },
}

/// The exclusive right to write a run folder, held while this value lives (an OS file lock, so
/// a killed process releases it).
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

impl RunFiles {
    /// Takes the run folder for this process (a second writer, a `train` command or the window's
    /// panel, is refused with the holder's name) and removes temporary files a crash left behind.
    pub fn lock(&self) -> Result<RunLock, RunError> {
        use std::fs::TryLockError;
        let path = self.dir.join(".lock");
        let io = |source| RunError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path)
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "unknown process".into());
                return Err(RunError::Locked {
                    dir: self.dir.clone(),
                    holder,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let command: Vec<String> = std::env::args().collect();
        let holder = format!("pid {}: {}", std::process::id(), command.join(" "));
        file.set_len(0).map_err(io)?;
        file.write_all(holder.as_bytes()).map_err(io)?;
        file.flush().map_err(io)?;
        self.remove_temporaries();
        Ok(RunLock { _file: file })
    }

    /// Removes the `.histolens-*.tmp` files of atomic writes that a kill interrupted.
    fn remove_temporaries(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".histolens-") && name.ends_with(".tmp") {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => log::info!("removed a stale temporary file {}", e.path().display()),
                    Err(err) => log::warn!("cannot remove {}: {err}", e.path().display()),
                }
            }
        }
    }

    /// Starts a run (writes `config.json`) or resumes one: a folder that holds a run must have been
    /// made with the same configuration, and its saved state is returned. The log is cut back to
    /// the saved state's epochs (an epoch logged but not saved, by a kill, is trained again), so
    /// that it holds every epoch once. Call with the folder [`locked`](Self::lock).
    pub fn open<C, S>(&self, _lock: &RunLock, cfg: &C) -> Result<Option<S>, RunError>
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
            // A log without a state is of a run killed before its first epoch was saved.
            if self.log.exists() {
                trim_log(&self.log, 0).map_err(io(&self.log))?;
            }
            return Ok(None);
        }
        let old: C = read_json(&self.config).map_err(io(&self.config))?;
        if old != *cfg {
            return Err(RunError::ConfigMismatch(self.dir.clone()));
        }
        let state: serde_json::Value = read_json(&self.state).map_err(io(&self.state))?;
        if let Some(epoch) = state.get("epoch").and_then(|e| e.as_u64())
            && self.log.exists()
        {
            trim_log(&self.log, epoch).map_err(io(&self.log))?;
        }
        serde_json::from_value(state)
            .map(Some)
            .map_err(|e| io(&self.state)(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
    }

    /// Records a finished epoch: its log line first, then the state that resuming reads (a kill
    /// between the two is undone by [`open`](Self::open)).
    pub fn commit_epoch(
        &self,
        log: &impl Serialize,
        state: &impl Serialize,
    ) -> Result<(), RunError> {
        append_line(&self.log, log).map_err(|source| RunError::Io {
            path: self.log.clone(),
            source,
        })?;
        write_json(&self.state, state).map_err(|source| RunError::Io {
            path: self.state.clone(),
            source,
        })
    }
}

/// Keeps the log lines of epochs 1..=`epochs`, the last line of each (and lines without an epoch),
/// dropping lines cut by a crash; rewritten atomically, only when something changes.
fn trim_log(path: &Path, epochs: u64) -> std::io::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let mut kept: Vec<(Option<u64>, &str)> = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let epoch = v.get("epoch").and_then(|e| e.as_u64());
        if epoch.is_some_and(|e| e > epochs) {
            continue;
        }
        if let Some(e) = epoch {
            kept.retain(|(k, _)| *k != Some(e));
        }
        kept.push((epoch, line));
    }
    let mut out = String::new();
    for (_, line) in &kept {
        out.push_str(line);
        out.push('\n');
    }
    if out != text {
        log::warn!(
            "{}: log lines of epochs not saved (or repeated) were dropped",
            path.display()
        );
        write_atomic(path, out.as_bytes())?;
    }
    Ok(())
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

    #[test]
    fn one_writer_per_run_and_stale_temporaries_removed() {
        let dir = tempfile::tempdir().unwrap();
        let files = RunFiles::new(dir.path());
        let stale = dir.path().join(".histolens-abc123.tmp");
        std::fs::write(&stale, b"half a checkpoint").unwrap();
        let lock = files.lock().unwrap();
        assert!(!stale.exists(), "the crash's temporary file is gone");
        match files.lock() {
            Err(RunError::Locked { holder, .. }) => {
                assert!(
                    holder.contains(&format!("pid {}", std::process::id())),
                    "{holder}"
                )
            }
            other => panic!("a second writer must be refused: {other:?}"),
        }
        drop(lock);
        files.lock().expect("free again once the first writer ends");
    }

    #[test]
    fn a_kill_between_log_and_state_leaves_every_epoch_once() {
        let dir = tempfile::tempdir().unwrap();
        let files = RunFiles::new(dir.path());
        let lock = files.lock().unwrap();
        let cfg = serde_json::json!({"lr": 0.1});
        assert!(
            files
                .open::<_, serde_json::Value>(&lock, &cfg)
                .unwrap()
                .is_none()
        );
        for epoch in 1..=2 {
            files
                .commit_epoch(
                    &serde_json::json!({"epoch": epoch}),
                    &serde_json::json!({"epoch": epoch}),
                )
                .unwrap();
        }
        // Epoch 3 logged, then killed before its state was written; and a torn line.
        append_line(&files.log, &serde_json::json!({"epoch": 3})).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&files.log)
            .unwrap();
        f.write_all(b"{\"epoch\": 4, \"train").unwrap();
        let state: serde_json::Value = files.open(&lock, &cfg).unwrap().unwrap();
        assert_eq!(state["epoch"], 2);
        // Epoch 3 is trained again and logged once.
        files
            .commit_epoch(
                &serde_json::json!({"epoch": 3}),
                &serde_json::json!({"epoch": 3}),
            )
            .unwrap();
        let epochs: Vec<u64> = read_lines::<serde_json::Value>(&files.log)
            .unwrap()
            .iter()
            .map(|v| v["epoch"].as_u64().unwrap())
            .collect();
        assert_eq!(epochs, [1, 2, 3]);
    }
}
