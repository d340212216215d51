//! The labelling project: images and slides, each with a class or a magnification (or no label yet),
//! a group (the unit splits are dealt by) and a split. The project is a CSV manifest
//! (`path,class,magnification,mpp,group,split`) that every edit saves atomically, with undo and redo.
//!
//! The class list (first-use order, including classes no image carries yet) is kept in a sidecar
//! `<stem>.classes.json` beside the CSV, also written atomically; on loading, classes found in the CSV
//! but not in the sidecar are appended, so a stale or missing sidecar loses nothing an image carries.
//!
//! Uses [`crate::data`], [`crate::slide`] and [`crate::util`]; knows nothing of the GUI.

mod datasets;
mod edit;
mod io;
mod scan;
mod splits;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};

use crate::data::manifest::{ManifestError, Split};
use crate::data::pairs::PairError;
use crate::util::fs::write_atomic_with;
use edit::{Change, Edit};

pub use scan::{IMAGE_EXTENSIONS, SLIDE_EXTENSIONS, is_labelable_path, is_slide_path};

/// Edits kept for undo; older ones are forgotten.
const UNDO_DEPTH: usize = 200;

/// What an image is labelled with.
#[derive(Debug, Clone, PartialEq)]
pub enum Label {
    Class(String),
    /// `mpp` None means 10 / magnification.
    Magnification {
        magnification: f64,
        mpp: Option<f64>,
    },
}

impl Label {
    /// The µm/px of a magnification label (given, else 10 / magnification).
    pub fn mpp(&self) -> Option<f64> {
        match self {
            Label::Class(_) => None,
            Label::Magnification { magnification, mpp } => {
                Some(mpp.unwrap_or(10.0 / magnification))
            }
        }
    }

    fn validate(&self) -> Result<(), LabelError> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        match self {
            Label::Class(name) if name.trim().is_empty() => {
                Err(LabelError::InvalidLabel("an empty class name".into()))
            }
            Label::Class(_) => Ok(()),
            Label::Magnification { magnification, mpp } => {
                if !positive(*magnification) {
                    Err(LabelError::InvalidLabel(format!(
                        "magnification {magnification} is not a positive number"
                    )))
                } else if mpp.is_some_and(|m| !positive(m)) {
                    Err(LabelError::InvalidLabel(format!(
                        "µm/px {mpp:?} is not a positive number"
                    )))
                } else {
                    Ok(())
                }
            }
        }
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Label::Class(name) => f.write_str(name),
            Label::Magnification {
                magnification,
                mpp: None,
            } => write!(f, "{magnification}x"),
            Label::Magnification {
                magnification,
                mpp: Some(mpp),
            } => write!(f, "{magnification}x ({mpp} µm/px)"),
        }
    }
}

/// One image or slide of the project.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelEntry {
    /// Absolute.
    pub path: PathBuf,
    pub label: Option<Label>,
    /// The split unit (e.g. a patient or slide): a group is never on two sides of a split.
    pub group: String,
    pub split: Option<Split>,
}

impl LabelEntry {
    /// The unit splits are dealt by: the group, or the file itself when it has none.
    pub fn split_unit(&self) -> String {
        if self.group.is_empty() {
            self.path.display().to_string()
        } else {
            self.group.clone()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("line {line} of {}: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: u64,
        message: String,
    },
    #[error("no such file or folder: {}", .0.display())]
    NotFound(PathBuf),
    #[error("invalid label: {0}")]
    InvalidLabel(String),
    #[error("there is no entry {index}: the project has {len}")]
    NoSuchEntry { index: usize, len: usize },
    #[error("split fractions {0:?} must be finite, not negative and not all zero")]
    InvalidFractions([f64; 3]),
    #[error("nothing to export: {0}")]
    NothingToExport(String),
    #[error(
        "whole slides cannot go into this dataset (build patches or label regions instead): {}",
        .0.display()
    )]
    SlideNotSupported(PathBuf),
    #[error("the file is missing: {}", .0.display())]
    Missing(PathBuf),
    #[error("cannot read the image {}: {message}", path.display())]
    Image { path: PathBuf, message: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Pairs(#[from] PairError),
}

/// A folder whose images were added without a label: its name is offered as their label.
#[derive(Debug, Clone, PartialEq)]
pub struct FolderProposal {
    pub folder: PathBuf,
    pub name: String,
    /// The entries added from directly inside it.
    pub entries: Vec<usize>,
}

/// What [`LabelSet::add_paths`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AddReport {
    pub added: usize,
    pub already_present: usize,
    /// Of the added ones, those labelled with the name of a class folder.
    pub labelled_from_folders: usize,
    pub proposed: Vec<FolderProposal>,
}

/// What [`LabelSet::import`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportReport {
    pub added: usize,
    pub updated: usize,
    pub unchanged: usize,
    /// Imported rows whose file does not exist (imported all the same).
    pub missing: Vec<PathBuf>,
}

/// Entries per label, for display.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelCounts {
    pub unlabelled: usize,
    /// Every class of the class list, in its order (zero for a class no image carries).
    pub classes: Vec<(String, usize)>,
    /// Per magnification, ascending.
    pub magnifications: Vec<(f64, usize)>,
}

/// A labelling project bound to its CSV manifest.
#[derive(Debug)]
pub struct LabelSet {
    manifest: PathBuf,
    entries: Vec<LabelEntry>,
    classes: Vec<String>,
    undo: VecDeque<Edit>,
    redo: Vec<Edit>,
    /// The class list as the sidecar holds it.
    saved_classes: Option<Vec<String>>,
    /// Run on each flushed temporary file before its rename (tests simulate a crash with it).
    before_rename: fn(&Path) -> std::io::Result<()>,
}

fn no_hook(_: &Path) -> std::io::Result<()> {
    Ok(())
}

impl LabelSet {
    /// Loads the project at `manifest`, or creates an empty one there (written at once).
    pub fn open_or_create(manifest: &Path) -> Result<LabelSet, LabelError> {
        let manifest = std::path::absolute(manifest).map_err(|source| LabelError::Read {
            path: manifest.to_path_buf(),
            source,
        })?;
        let exists = manifest.exists();
        let entries = if exists {
            io::read_entries(&manifest)?
        } else {
            Vec::new()
        };
        let saved_classes = io::read_classes(&manifest)?;
        let mut classes = saved_classes.clone().unwrap_or_default();
        for e in &entries {
            if let Some(Label::Class(c)) = &e.label
                && !classes.contains(c)
            {
                classes.push(c.clone());
            }
        }
        let mut set = LabelSet {
            manifest,
            entries,
            classes,
            undo: VecDeque::new(),
            redo: Vec::new(),
            saved_classes,
            before_rename: no_hook,
        };
        if !exists {
            set.persist()?;
        }
        Ok(set)
    }

    pub fn manifest_path(&self) -> &Path {
        &self.manifest
    }

    pub fn entries(&self) -> &[LabelEntry] {
        &self.entries
    }

    /// Class names in first-use order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Adds a class no image needs to carry yet; false when it exists already. Undoable.
    pub fn add_class(&mut self, name: &str) -> Result<bool, LabelError> {
        let name = name.trim();
        Label::Class(name.to_string()).validate()?;
        if self.classes.iter().any(|c| c == name) {
            return Ok(false);
        }
        let mut after = self.classes.clone();
        after.push(name.to_string());
        self.commit(Edit::new(Vec::new(), &self.classes, after))?;
        Ok(true)
    }

    /// Adds dropped files as they are and the images and slides of dropped folders (recursively, in
    /// name order), labelling those under a folder named like a known class with that class, and,
    /// when a dropped folder holds images only inside sub-folders, those with their sub-folder's name.
    /// Images directly inside a dropped folder stay unlabelled; the folder's name is proposed for them.
    /// One undoable edit.
    pub fn add_paths(&mut self, dropped: &[PathBuf]) -> Result<AddReport, LabelError> {
        let scan = scan::scan(dropped, &self.classes)?;
        let mut present: HashSet<PathBuf> = self.entries.iter().map(|e| e.path.clone()).collect();
        let mut classes = self.classes.clone();
        let mut inserted = Vec::new();
        let mut report = AddReport::default();
        let mut proposed: Vec<Vec<usize>> = vec![Vec::new(); scan.proposals.len()];
        for found in scan.found {
            if !present.insert(found.path.clone()) {
                report.already_present += 1;
                continue;
            }
            let index = self.entries.len() + inserted.len();
            if let Some(class) = &found.class {
                report.labelled_from_folders += 1;
                if !classes.contains(class) {
                    classes.push(class.clone());
                }
            }
            if let Some(p) = found.proposal {
                proposed[p].push(index);
            }
            inserted.push((
                index,
                LabelEntry {
                    path: found.path,
                    label: found.class.map(Label::Class),
                    group: found.group,
                    split: None,
                },
            ));
        }
        report.added = inserted.len();
        report.proposed = scan
            .proposals
            .into_iter()
            .zip(proposed)
            .filter(|(_, entries)| !entries.is_empty())
            .map(|((folder, name), entries)| FolderProposal {
                folder,
                name,
                entries,
            })
            .collect();
        let changes = if inserted.is_empty() {
            Vec::new()
        } else {
            vec![Change::Insert(inserted)]
        };
        self.commit(Edit::new(changes, &self.classes, classes))?;
        Ok(report)
    }

    /// Labels (or, with None, unlabels) entries; a new class joins the class list. Undoable.
    pub fn assign(&mut self, indices: &[usize], label: Option<Label>) -> Result<(), LabelError> {
        let label = match label {
            Some(Label::Class(name)) => Some(Label::Class(name.trim().to_string())),
            other => other,
        };
        if let Some(l) = &label {
            l.validate()?;
        }
        let mut classes = self.classes.clone();
        if let Some(Label::Class(name)) = &label
            && !classes.contains(name)
        {
            classes.push(name.clone());
        }
        let changes = self.updates(indices, |e| e.label = label.clone())?;
        self.commit(Edit::new(changes, &self.classes, classes))
    }

    /// Sets the group (split unit) of entries. Undoable.
    pub fn set_group(&mut self, indices: &[usize], group: &str) -> Result<(), LabelError> {
        let group = group.trim();
        let changes = self.updates(indices, |e| e.group = group.to_string())?;
        self.commit(Edit::new(changes, &self.classes, self.classes.clone()))
    }

    /// Sets (or clears) the split of entries by hand; [`Self::assign_splits`] deals whole groups.
    /// Undoable.
    pub fn set_split(&mut self, indices: &[usize], split: Option<Split>) -> Result<(), LabelError> {
        let changes = self.updates(indices, |e| e.split = split)?;
        self.commit(Edit::new(changes, &self.classes, self.classes.clone()))
    }

    /// Removes entries (never their files). Undoable.
    pub fn remove(&mut self, indices: &[usize]) -> Result<(), LabelError> {
        let indices = self.checked(indices)?;
        let removed: Vec<(usize, LabelEntry)> = indices
            .into_iter()
            .map(|i| (i, self.entries[i].clone()))
            .collect();
        let changes = if removed.is_empty() {
            Vec::new()
        } else {
            vec![Change::Remove(removed)]
        };
        self.commit(Edit::new(changes, &self.classes, self.classes.clone()))
    }

    /// Deals whole groups of labelled entries to train, validation and test by `fractions`
    /// (stratified by each group's most frequent label, deterministic for a seed; with at least
    /// three groups, each split whose fraction is positive gets one). Groups without a labelled
    /// entry are left unassigned. Undoable.
    pub fn assign_splits(&mut self, fractions: [f64; 3], seed: u64) -> Result<(), LabelError> {
        if fractions.iter().any(|f| !f.is_finite() || *f < 0.0)
            || fractions.iter().sum::<f64>() <= 0.0
        {
            return Err(LabelError::InvalidFractions(fractions));
        }
        let dealt = splits::deal(&self.entries, fractions, seed);
        let changes: Vec<(usize, LabelEntry, LabelEntry)> = self
            .entries
            .iter()
            .zip(dealt)
            .enumerate()
            .filter(|(_, (e, split))| e.split != *split)
            .map(|(i, (e, split))| {
                let after = LabelEntry { split, ..e.clone() };
                (i, e.clone(), after)
            })
            .collect();
        let changes = if changes.is_empty() {
            Vec::new()
        } else {
            vec![Change::Update(changes)]
        };
        self.commit(Edit::new(changes, &self.classes, self.classes.clone()))
    }

    /// Entries whose file no longer exists (kept, so that nothing is dropped silently).
    pub fn missing(&self) -> Vec<usize> {
        (0..self.entries.len())
            .filter(|&i| !self.entries[i].path.exists())
            .collect()
    }

    pub fn counts(&self) -> LabelCounts {
        let mut counts = LabelCounts {
            classes: self.classes.iter().map(|c| (c.clone(), 0)).collect(),
            ..Default::default()
        };
        let mut magnifications: Vec<f64> = Vec::new();
        for e in &self.entries {
            match &e.label {
                None => counts.unlabelled += 1,
                Some(Label::Class(c)) => match counts.classes.iter_mut().find(|(n, _)| n == c) {
                    Some((_, k)) => *k += 1,
                    None => counts.classes.push((c.clone(), 1)),
                },
                Some(Label::Magnification { magnification, .. }) => {
                    magnifications.push(*magnification)
                }
            }
        }
        magnifications.sort_by(f64::total_cmp);
        for m in magnifications {
            match counts.magnifications.last_mut() {
                Some((last, k)) if *last == m => *k += 1,
                _ => counts.magnifications.push((m, 1)),
            }
        }
        counts
    }

    /// Writes the CSV with absolute paths to `path` (atomically), for other tools or projects.
    pub fn export(&self, path: &Path) -> Result<(), LabelError> {
        io::entries_csv(&self.entries, None)
            .and_then(|bytes| write_atomic_with(path, &bytes, self.before_rename))
            .map_err(|source| LabelError::Write {
                path: path.to_path_buf(),
                source,
            })
    }

    /// Merges another project's CSV (and its class sidecar, if any): new paths are added, the labels,
    /// groups and splits of known ones are replaced. Rows whose file is missing are imported all the
    /// same and reported. One undoable edit.
    pub fn import(&mut self, path: &Path) -> Result<ImportReport, LabelError> {
        let rows = io::read_entries(path)?;
        let mut classes = self.classes.clone();
        for c in io::read_classes(path)?.unwrap_or_default() {
            if !classes.contains(&c) {
                classes.push(c);
            }
        }
        let position: HashMap<&Path, usize> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.as_path(), i))
            .collect();
        let mut report = ImportReport::default();
        let (mut updated, mut inserted) = (Vec::new(), Vec::new());
        for row in rows {
            if !row.path.exists() {
                report.missing.push(row.path.clone());
            }
            if let Some(Label::Class(c)) = &row.label
                && !classes.contains(c)
            {
                classes.push(c.clone());
            }
            match position.get(row.path.as_path()) {
                Some(&i) if self.entries[i] == row => report.unchanged += 1,
                Some(&i) => updated.push((i, self.entries[i].clone(), row)),
                None => inserted.push((self.entries.len() + inserted.len(), row)),
            }
        }
        report.updated = updated.len();
        report.added = inserted.len();
        let mut changes = Vec::new();
        if !updated.is_empty() {
            changes.push(Change::Update(updated));
        }
        if !inserted.is_empty() {
            changes.push(Change::Insert(inserted));
        }
        self.commit(Edit::new(changes, &self.classes, classes))?;
        Ok(report)
    }

    pub fn can_undo(&self) -> bool {
        !self.undo.is_empty()
    }

    pub fn can_redo(&self) -> bool {
        !self.redo.is_empty()
    }

    /// Reverts the last edit and saves; false when there is none.
    pub fn undo(&mut self) -> Result<bool, LabelError> {
        let Some(edit) = self.undo.pop_back() else {
            return Ok(false);
        };
        edit.revert(&mut self.entries, &mut self.classes);
        if let Err(e) = self.persist() {
            edit.apply(&mut self.entries, &mut self.classes);
            self.undo.push_back(edit);
            return Err(e);
        }
        self.redo.push(edit);
        Ok(true)
    }

    /// Applies the last undone edit again and saves; false when there is none.
    pub fn redo(&mut self) -> Result<bool, LabelError> {
        let Some(edit) = self.redo.pop() else {
            return Ok(false);
        };
        edit.apply(&mut self.entries, &mut self.classes);
        if let Err(e) = self.persist() {
            edit.revert(&mut self.entries, &mut self.classes);
            self.redo.push(edit);
            return Err(e);
        }
        self.undo.push_back(edit);
        Ok(true)
    }

    /// The indices sorted, without repeats; an error names the first that is out of range.
    fn checked(&self, indices: &[usize]) -> Result<Vec<usize>, LabelError> {
        let len = self.entries.len();
        if let Some(&index) = indices.iter().find(|&&i| i >= len) {
            return Err(LabelError::NoSuchEntry { index, len });
        }
        let mut v = indices.to_vec();
        v.sort_unstable();
        v.dedup();
        Ok(v)
    }

    /// Changes of the entries that `change` alters (none for those it leaves as they are).
    fn updates(
        &self,
        indices: &[usize],
        change: impl Fn(&mut LabelEntry),
    ) -> Result<Vec<Change>, LabelError> {
        let mut list = Vec::new();
        for i in self.checked(indices)? {
            let before = &self.entries[i];
            let mut after = before.clone();
            change(&mut after);
            if after != *before {
                list.push((i, before.clone(), after));
            }
        }
        Ok(if list.is_empty() {
            Vec::new()
        } else {
            vec![Change::Update(list)]
        })
    }

    /// Applies an edit and saves it; when the save fails, the edit is reverted and nothing changes.
    fn commit(&mut self, edit: Edit) -> Result<(), LabelError> {
        if edit.is_empty() {
            return Ok(());
        }
        edit.apply(&mut self.entries, &mut self.classes);
        if let Err(e) = self.persist() {
            edit.revert(&mut self.entries, &mut self.classes);
            return Err(e);
        }
        self.undo.push_back(edit);
        if self.undo.len() > UNDO_DEPTH {
            self.undo.pop_front();
        }
        self.redo.clear();
        Ok(())
    }

    /// Writes the class sidecar (when the list changed) and the CSV, each atomically.
    fn persist(&mut self) -> Result<(), LabelError> {
        if self.saved_classes.as_ref() != Some(&self.classes) {
            let path = io::classes_path(&self.manifest);
            io::classes_json(&self.classes)
                .and_then(|bytes| write_atomic_with(&path, &bytes, self.before_rename))
                .map_err(|source| LabelError::Write { path, source })?;
            self.saved_classes = Some(self.classes.clone());
        }
        let folder = self.manifest.parent().unwrap_or(Path::new("/"));
        io::entries_csv(&self.entries, Some(folder))
            .and_then(|bytes| write_atomic_with(&self.manifest, &bytes, self.before_rename))
            .map_err(|source| LabelError::Write {
                path: self.manifest.clone(),
                source,
            })
    }
}
