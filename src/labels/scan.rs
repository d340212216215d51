//! Dropped files and folders: which images and slides they hold, and what their folders say.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::LabelError;

/// Raster images, labelled whole.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "tif", "tiff", "bmp", "webp"];
/// Whole-slide formats (labelled whole here, or by regions elsewhere).
pub const SLIDE_EXTENSIONS: &[&str] = &["svs", "ndpi", "scn", "mrxs", "vms", "bif", "svslide"];

fn extension(path: &Path) -> Option<String> {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
}

/// Whether a folder walk picks the file up (an image or a slide, by extension).
pub fn is_labelable_path(path: &Path) -> bool {
    extension(path).is_some_and(|e| {
        IMAGE_EXTENSIONS.contains(&e.as_str()) || SLIDE_EXTENSIONS.contains(&e.as_str())
    })
}

pub fn is_slide_path(path: &Path) -> bool {
    extension(path).is_some_and(|e| SLIDE_EXTENSIONS.contains(&e.as_str()))
}

/// A file to add: its absolute path, the class its folders give it, its default group, and the
/// proposal (index into [`Scan::proposals`]) it belongs to when it lies loose in a dropped folder.
pub(super) struct Found {
    pub path: PathBuf,
    pub class: Option<String>,
    pub group: String,
    pub proposal: Option<usize>,
}

#[derive(Default)]
pub(super) struct Scan {
    pub found: Vec<Found>,
    /// Dropped folders with loose images, and the name proposed as their label.
    pub proposals: Vec<(PathBuf, String)>,
}

/// The files of `dropped` in order; `known` are the project's classes.
pub(super) fn scan(dropped: &[PathBuf], known: &[String]) -> Result<Scan, LabelError> {
    let mut known = known.to_vec();
    let mut scan = Scan::default();
    for path in dropped {
        let path = std::path::absolute(path).map_err(|source| LabelError::Read {
            path: path.clone(),
            source,
        })?;
        if path.is_dir() {
            scan_folder(&path, &mut known, &mut scan)?;
        } else if path.exists() {
            scan.found.push(Found {
                group: group_name(&path, path.parent().and_then(Path::parent)),
                path,
                class: None,
                proposal: None,
            });
        } else {
            return Err(LabelError::NotFound(path));
        }
    }
    Ok(scan)
}

fn scan_folder(root: &Path, known: &mut Vec<String>, scan: &mut Scan) -> Result<(), LabelError> {
    let mut files = Vec::new();
    walk(root, &mut HashSet::new(), &mut files)?;
    let has_loose = files.iter().any(|f| f.parent() == Some(root));
    let proposal = has_loose.then(|| {
        let name = root.file_name().map_or_else(
            || root.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        scan.proposals.push((root.to_path_buf(), name));
        scan.proposals.len() - 1
    });
    let base = root.parent().unwrap_or(root);
    for file in files {
        let folders: Vec<String> = file
            .parent()
            .and_then(|p| p.strip_prefix(root).ok())
            .map(|rel| {
                rel.components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        // The deepest folder named like a known class, else the sub-folder of a folder of folders.
        let class = folders
            .iter()
            .rev()
            .find_map(|f| known_class(known, f))
            .or_else(|| {
                if has_loose {
                    None
                } else {
                    folders.first().cloned()
                }
            });
        if let Some(c) = &class
            && known_class(known, c).is_none()
        {
            known.push(c.clone());
        }
        // Images straight inside their class folder are each their own split unit (a class
        // folder is not a case: dealing it whole would put each class on one side only); images in
        // a case folder (inside or around the class folder) share the case's.
        let in_class_folder =
            matches!((&class, folders.last()), (Some(c), Some(f)) if c.eq_ignore_ascii_case(f));
        scan.found.push(Found {
            group: if in_class_folder {
                String::new()
            } else {
                group_name(&file, Some(base))
            },
            proposal: if folders.is_empty() { proposal } else { None },
            path: file,
            class,
        });
    }
    Ok(())
}

/// The class of `known` that `name` names, ignoring case.
fn known_class(known: &[String], name: &str) -> Option<String> {
    let name = name.to_lowercase();
    known.iter().find(|k| k.to_lowercase() == name).cloned()
}

/// The file's folder relative to `base` ("tiles/tumour"), or its full path when not under it.
fn group_name(file: &Path, base: Option<&Path>) -> String {
    let Some(parent) = file.parent() else {
        return String::new();
    };
    match base.and_then(|b| parent.strip_prefix(b).ok()) {
        Some(rel) if !rel.as_os_str().is_empty() => rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/"),
        _ => parent.display().to_string(),
    }
}

/// Images and slides under `dir`, depth first in name order; hidden entries are skipped and
/// linked folders are entered once.
fn walk(
    dir: &Path,
    visited: &mut HashSet<PathBuf>,
    files: &mut Vec<PathBuf>,
) -> Result<(), LabelError> {
    let read = |source| LabelError::Read {
        path: dir.to_path_buf(),
        source,
    };
    if !visited.insert(dir.canonicalize().map_err(read)?) {
        return Ok(());
    }
    let mut children = std::fs::read_dir(dir)
        .map_err(read)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    children.retain(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
    });
    children.sort();
    for child in children {
        if child.is_dir() {
            walk(&child, visited, files)?;
        } else if child.is_file() && is_labelable_path(&child) {
            files.push(child);
        }
    }
    Ok(())
}
