//! Calibrations set by hand, remembered per file, and microscope cameras (one calibrated snapshot
//! gives the camera's µm/px at every objective), each in a small JSON file written atomically.

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

fn load_json<T: serde::de::DeserializeOwned + Default>(
    path: &Path,
) -> Result<T, CalibrationStoreError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|source| CalibrationStoreError::Parse {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(source) => Err(CalibrationStoreError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn save_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), CalibrationStoreError> {
    let json = serde_json::to_vec_pretty(value).map_err(|source| CalibrationStoreError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    crate::util::fs::write_atomic(path, &json).map_err(|source| CalibrationStoreError::Write {
        path: path.to_path_buf(),
        source,
    })
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
        Self::path_in(&crate::data_dir())
    }

    /// The store in data folder `dir`.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join("calibrations.json")
    }

    /// Loads the store; a missing file is an empty store.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, CalibrationStoreError> {
        let path = path.into();
        let entries = load_json(&path)?;
        Ok(CalibrationStore { path, entries })
    }

    /// The calibration saved for `file` in the default store (none when the store cannot be read).
    pub fn saved_for(file: &Path) -> Calibration {
        Self::load(Self::default_path())
            .map(|s| s.get(file))
            .unwrap_or_default()
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
        save_json(&self.path, &self.entries)
    }
}

/// Objectives of microscopes, for the nearest-objective suggestion.
pub const OBJECTIVES: [f64; 11] = [
    1.25, 2.0, 2.5, 4.0, 5.0, 10.0, 20.0, 40.0, 60.0, 63.0, 100.0,
];

/// A microscope camera (with its adapter): its µm/px is inversely proportional to the objective.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Camera {
    /// µm/px times the objective's magnification (µm/px at 1x).
    pub mpp_at_1x: f64,
    /// Width and height of its snapshots: later snapshots of this size are offered this camera.
    pub frame: Option<(u32, u32)>,
}

impl Camera {
    /// The camera that took a snapshot of `mpp` µm/px (from a scale bar or metadata) at `objective`.
    pub fn from_snapshot(mpp: f64, objective: f64, frame: Option<(u32, u32)>) -> Option<Self> {
        let ok = |v: f64| v.is_finite() && v > 0.0;
        (ok(mpp) && ok(objective)).then_some(Camera {
            mpp_at_1x: mpp * objective,
            frame,
        })
    }

    /// µm/px of this camera at `objective`.
    pub fn mpp_at(&self, objective: f64) -> f64 {
        self.mpp_at_1x / objective
    }

    /// The objective of [`OBJECTIVES`] whose µm/px on this camera is nearest `mpp` (in log space): a
    /// rough estimate snapped to what the microscope can be.
    pub fn nearest_objective(&self, mpp: f64) -> f64 {
        OBJECTIVES
            .into_iter()
            .min_by(|a, b| {
                let d = |o: f64| (self.mpp_at(o) / mpp).log2().abs();
                d(*a).total_cmp(&d(*b))
            })
            .unwrap_or(10.0)
    }
}

/// Named cameras, shared by every file.
#[derive(Debug, Default)]
pub struct CameraStore {
    path: PathBuf,
    cameras: BTreeMap<String, Camera>,
}

impl CameraStore {
    /// The store in the user's data folder (`$HISTOLENS_DATA_DIR` when set).
    pub fn default_path() -> PathBuf {
        Self::path_in(&crate::data_dir())
    }

    /// The store in data folder `dir`.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join("cameras.json")
    }

    /// Loads the store; a missing file is an empty store.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, CalibrationStoreError> {
        let path = path.into();
        let cameras = load_json(&path)?;
        Ok(CameraStore { path, cameras })
    }

    pub fn get(&self, name: &str) -> Option<Camera> {
        self.cameras.get(name).copied()
    }

    pub fn cameras(&self) -> impl Iterator<Item = (&str, &Camera)> {
        self.cameras.iter().map(|(n, c)| (n.as_str(), c))
    }

    /// The cameras whose snapshots have this frame size.
    pub fn matching(&self, frame: (u32, u32)) -> impl Iterator<Item = (&str, &Camera)> {
        self.cameras().filter(move |(_, c)| c.frame == Some(frame))
    }

    /// Adds or replaces a camera and saves the store.
    pub fn set(&mut self, name: &str, camera: Camera) -> Result<(), CalibrationStoreError> {
        self.cameras.insert(name.to_string(), camera);
        save_json(&self.path, &self.cameras)
    }

    /// Forgets a camera (whether it was known) and saves the store.
    pub fn remove(&mut self, name: &str) -> Result<bool, CalibrationStoreError> {
        let known = self.cameras.remove(name).is_some();
        save_json(&self.path, &self.cameras)?;
        Ok(known)
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
    fn a_camera_gives_every_objective_and_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cameras.json");
        // A scale bar said 0.65 µm/px on a 10x snapshot of 2048x1536.
        let cam = Camera::from_snapshot(0.65, 10.0, Some((2048, 1536))).unwrap();
        assert!((cam.mpp_at(40.0) - 0.1625).abs() < 1e-12);
        // An estimate of 0.3 µm/px on that camera is its 20x (0.325), not 40x (0.1625).
        assert_eq!(cam.nearest_objective(0.3), 20.0);
        assert!(Camera::from_snapshot(f64::NAN, 10.0, None).is_none());
        let mut s = CameraStore::load(&path).unwrap();
        s.set("ICC50 on the DM2000", cam).unwrap();
        let s = CameraStore::load(&path).unwrap();
        assert_eq!(s.get("ICC50 on the DM2000"), Some(cam));
        assert_eq!(s.matching((2048, 1536)).count(), 1);
        assert_eq!(s.matching((1024, 768)).count(), 0);
        let mut s = s;
        assert!(s.remove("ICC50 on the DM2000").unwrap());
        assert!(
            CameraStore::load(&path)
                .unwrap()
                .get("ICC50 on the DM2000")
                .is_none()
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
