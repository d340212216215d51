//! Calibrations set by hand, remembered per file in a small JSON file written atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::Calibration;

#[derive(Debug, thiserror::Error)]
pub enum CalibrationStoreError {
    #[error("cannot read the calibration store ({source}): {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the calibration store is not valid JSON ({source}): {}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot save the calibration store ({source}): {}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Per-file calibrations keyed by the file's canonical path.
#[derive(Debug, Default)]
pub struct CalibrationStore {
    path: PathBuf,
    entries: BTreeMap<String, Calibration>,
}

fn key(file: &Path) -> String {
    std::fs::canonicalize(file)
        .unwrap_or_else(|_| file.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

impl CalibrationStore {
    /// The store in the user's data folder (`$HISTOLENS_DATA_DIR` when set).
    pub fn default_path() -> PathBuf {
        crate::data_dir().join("calibrations.json")
    }

    /// Loads the store; a missing file is an empty store.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, CalibrationStoreError> {
        let path = path.into();
        let entries = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| CalibrationStoreError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(CalibrationStoreError::Read { path, source }),
        };
        Ok(CalibrationStore { path, entries })
    }

    pub fn get(&self, file: &Path) -> Calibration {
        self.entries.get(&key(file)).copied().unwrap_or_default()
    }

    /// Remembers (or, when empty, forgets) the calibration of `file` and saves the store.
    pub fn set(
        &mut self,
        file: &Path,
        calibration: Calibration,
    ) -> Result<(), CalibrationStoreError> {
        if calibration.is_empty() {
            self.entries.remove(&key(file));
        } else {
            self.entries.insert(key(file), calibration);
        }
        let json = serde_json::to_vec_pretty(&self.entries).map_err(|source| {
            CalibrationStoreError::Parse {
                path: self.path.clone(),
                source,
            }
        })?;
        crate::util::fs::write_atomic(&self.path, &json).map_err(|source| {
            CalibrationStoreError::Write {
                path: self.path.clone(),
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_per_file_across_loads() {
        let dir = tempfile::tempdir().unwrap();
        let store_path = dir.path().join("cal.json");
        let a = dir.path().join("a.png");
        std::fs::write(&a, b"x").unwrap();
        let mut s = CalibrationStore::load(&store_path).unwrap();
        assert!(s.get(&a).is_empty());
        let c = Calibration {
            mpp: Some(0.25),
            objective_power: None,
        };
        s.set(&a, c).unwrap();
        let s2 = CalibrationStore::load(&store_path).unwrap();
        assert_eq!(s2.get(&a), c);
        let mut s3 = s2;
        s3.set(&a, Calibration::default()).unwrap();
        assert!(
            CalibrationStore::load(&store_path)
                .unwrap()
                .get(&a)
                .is_empty()
        );
    }

    #[test]
    fn corrupt_store_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cal.json");
        std::fs::write(&p, b"{not json").unwrap();
        assert!(matches!(
            CalibrationStore::load(&p),
            Err(CalibrationStoreError::Parse { .. })
        ));
    }
}
