//! Dataset manifests: CSV files listing images with their labels and split, written atomically.
//! Paths are stored relative to the manifest's folder when they lie under it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::util::fs::write_atomic;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }

    pub fn parse(s: &str) -> Option<Split> {
        Split::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// One image of a magnification dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MagnificationRecord {
    /// Relative to the manifest's folder, or absolute.
    pub path: String,
    pub magnification: f64,
    pub mpp: f64,
    /// The slide or image the patch was cut from (splits never share one).
    pub source: String,
    /// Level-0 rectangle "x,y,w,h" of the source the patch covers.
    pub region: String,
    pub split: Split,
    /// The lab, scanner or dataset of the source (leave-one-source-out leaves a group out); empty in
    /// manifests written before groups existed.
    #[serde(default)]
    pub group: String,
    /// Whether `mpp` is a documented pixel size; false for patches of images of unknown scale, whose
    /// `mpp` is relative to the file (only ratios between patches of one `field` mean something).
    #[serde(default = "yes")]
    pub absolute: bool,
    /// Patches of one field at several scales share this (empty for lone patches).
    #[serde(default)]
    pub field: String,
}

fn yes() -> bool {
    true
}

impl MagnificationRecord {
    /// The group, or the source itself when the manifest names none.
    pub fn group(&self) -> &str {
        if self.group.is_empty() {
            &self.source
        } else {
            &self.group
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read the manifest {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("line {line} of the manifest {}: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: u64,
        message: String,
    },
    #[error("the manifest {} lists no images", .0.display())]
    Empty(PathBuf),
    #[error("cannot write the manifest {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("source {source_name} is in both the {a} and the {b} split")]
    Leak {
        source_name: String,
        a: &'static str,
        b: &'static str,
    },
}

/// A row of a manifest: an image (or pair) with its source and split.
pub trait Record: Serialize + serde::de::DeserializeOwned {
    /// The (first) image's path, relative to the manifest's folder or absolute.
    fn path(&self) -> &str;
    /// The slide, image or group the row was cut from: splits never share one.
    fn source(&self) -> &str;
    fn split(&self) -> Split;
    /// Checks the row's values once it is parsed.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

impl Record for MagnificationRecord {
    fn path(&self) -> &str {
        &self.path
    }
    fn source(&self) -> &str {
        &self.source
    }
    fn split(&self) -> Split {
        self.split
    }
    fn validate(&self) -> Result<(), String> {
        if self.magnification.is_finite() && self.magnification > 0.0 {
            Ok(())
        } else {
            Err(format!(
                "magnification {} is not a positive number",
                self.magnification
            ))
        }
    }
}

/// A dataset: its records and the folder relative paths start from.
#[derive(Debug, Clone)]
pub struct Manifest<R = MagnificationRecord> {
    pub root: PathBuf,
    pub records: Vec<R>,
}

impl<R: Record> Manifest<R> {
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read(path).map_err(|source| ManifestError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut reader = csv::Reader::from_reader(text.as_slice());
        let mut records = Vec::new();
        for r in reader.deserialize::<R>() {
            let r = r.map_err(|e| ManifestError::Parse {
                path: path.to_path_buf(),
                line: e.position().map_or(0, |p| p.line()),
                message: e.to_string(),
            })?;
            r.validate().map_err(|message| ManifestError::Parse {
                path: path.to_path_buf(),
                line: records.len() as u64 + 2,
                message,
            })?;
            records.push(r);
        }
        if records.is_empty() {
            return Err(ManifestError::Empty(path.to_path_buf()));
        }
        let root = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(Manifest { root, records })
    }

    /// Writes the CSV atomically.
    pub fn save(&self, path: &Path) -> Result<(), ManifestError> {
        let write_err = |e: std::io::Error| ManifestError::Write {
            path: path.to_path_buf(),
            source: e,
        };
        let mut w = csv::Writer::from_writer(Vec::new());
        for r in &self.records {
            w.serialize(r)
                .map_err(|e| write_err(std::io::Error::other(e)))?;
        }
        let bytes = w
            .into_inner()
            .map_err(|e| write_err(std::io::Error::other(e.to_string())))?;
        write_atomic(path, &bytes).map_err(write_err)
    }

    /// The absolute path of a record's image.
    pub fn resolve(&self, r: &R) -> PathBuf {
        self.resolve_path(r.path())
    }

    /// A path of the manifest made absolute.
    pub fn resolve_path(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.root.join(p)
        }
    }

    pub fn split(&self, split: Split) -> Vec<&R> {
        self.records.iter().filter(|r| r.split() == split).collect()
    }

    /// Errors when a source appears in two splits: the tissue would leak between them.
    pub fn check_disjoint(&self) -> Result<(), ManifestError> {
        // A slide split by blocks names each block as its own source ("slide.svs#block3").
        let mut seen: std::collections::HashMap<&str, Split> = Default::default();
        for r in &self.records {
            let key = r.source();
            match seen.get(key) {
                Some(&s) if s != r.split() => {
                    return Err(ManifestError::Leak {
                        source_name: key.to_string(),
                        a: s.name(),
                        b: r.split().name(),
                    });
                }
                _ => {
                    seen.insert(key, r.split());
                }
            }
        }
        Ok(())
    }
}

impl Manifest<MagnificationRecord> {
    /// The range of magnifications in a split (min, max).
    pub fn magnification_range(&self, split: Split) -> Option<(f64, f64)> {
        self.split(split).iter().fold(None, |acc, r| {
            let m = r.magnification;
            Some(acc.map_or((m, m), |(a, b): (f64, f64)| (a.min(m), b.max(m))))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(source: &str, split: Split) -> MagnificationRecord {
        MagnificationRecord {
            path: format!("{source}.png"),
            magnification: 10.0,
            mpp: 1.0,
            source: source.into(),
            region: "0,0,10,10".into(),
            split,
            group: String::new(),
            absolute: true,
            field: String::new(),
        }
    }

    #[test]
    fn round_trip_and_leak_detection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.csv");
        let m = Manifest {
            root: dir.path().into(),
            records: vec![record("a", Split::Train), record("b", Split::Test)],
        };
        m.save(&path).unwrap();
        let back = Manifest::load(&path).unwrap();
        assert_eq!(back.records, m.records);
        assert_eq!(back.resolve(&back.records[0]), dir.path().join("a.png"));
        back.check_disjoint().unwrap();
        let mut leaky = back.clone();
        leaky.records.push(record("a", Split::Val));
        assert!(matches!(
            leaky.check_disjoint(),
            Err(ManifestError::Leak { .. })
        ));
        std::fs::write(&path, "path,magnification\nx.png,abc\n").unwrap();
        assert!(matches!(
            Manifest::<MagnificationRecord>::load(&path),
            Err(ManifestError::Parse { .. })
        ));
    }
}
