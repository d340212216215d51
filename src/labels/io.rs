//! The project's files: the CSV of entries and the class sidecar.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Label, LabelEntry, LabelError};
use crate::data::manifest::Split;

const HEADER: [&str; 6] = ["path", "class", "magnification", "mpp", "group", "split"];

/// A CSV row as text: numbers are parsed afterwards, so that a bad value gets a precise message.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct Row {
    path: String,
    class: String,
    magnification: String,
    mpp: String,
    group: String,
    split: String,
}

/// The entries of a project CSV; relative paths start from its folder.
pub(super) fn read_entries(path: &Path) -> Result<Vec<LabelEntry>, LabelError> {
    let bytes = std::fs::read(path).map_err(|source| LabelError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let parse_error = |line: u64, message: String| LabelError::Parse {
        path: path.to_path_buf(),
        line,
        message,
    };
    let root = std::path::absolute(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(bytes.as_slice());
    let headers = reader
        .headers()
        .map_err(|e| parse_error(1, e.to_string()))?
        .clone();
    if !headers.iter().any(|h| h == "path") {
        return Err(parse_error(
            1,
            format!(
                "the header has no `path` column (expected {})",
                HEADER.join(",")
            ),
        ));
    }
    let mut entries = Vec::new();
    let mut first_line: HashMap<PathBuf, u64> = HashMap::new();
    for record in reader.records() {
        let record =
            record.map_err(|e| parse_error(e.position().map_or(0, |p| p.line()), e.to_string()))?;
        let line = record.position().map_or(0, |p| p.line());
        let row: Row = record
            .deserialize(Some(&headers))
            .map_err(|e| parse_error(line, e.to_string()))?;
        let entry = parse_row(row, &root).map_err(|m| parse_error(line, m))?;
        if let Some(first) = first_line.insert(entry.path.clone(), line) {
            return Err(parse_error(
                line,
                format!(
                    "{} is listed again (first on line {first})",
                    entry.path.display()
                ),
            ));
        }
        entries.push(entry);
    }
    Ok(entries)
}

fn parse_row(row: Row, root: &Path) -> Result<LabelEntry, String> {
    if row.path.is_empty() {
        return Err("the path is empty".into());
    }
    let number = |name: &str, text: &str| -> Result<Option<f64>, String> {
        if text.is_empty() {
            return Ok(None);
        }
        match text.parse::<f64>() {
            Ok(v) if v.is_finite() && v > 0.0 => Ok(Some(v)),
            _ => Err(format!("{name} `{text}` is not a positive number")),
        }
    };
    let magnification = number("magnification", &row.magnification)?;
    let mpp = number("mpp", &row.mpp)?;
    let label = match (row.class.is_empty(), magnification) {
        (true, None) if mpp.is_some() => return Err("an mpp without a magnification".into()),
        (true, None) => None,
        (true, Some(magnification)) => Some(Label::Magnification { magnification, mpp }),
        (false, None) if mpp.is_none() => Some(Label::Class(row.class)),
        (false, _) => return Err("both a class and a magnification (or mpp)".into()),
    };
    let split = if row.split.is_empty() {
        None
    } else {
        Some(
            Split::parse(&row.split.to_ascii_lowercase())
                .ok_or_else(|| format!("split `{}` is not train, val or test", row.split))?,
        )
    };
    let p = Path::new(&row.path);
    Ok(LabelEntry {
        path: if p.is_absolute() {
            p.to_path_buf()
        } else {
            root.join(p)
        },
        label,
        group: row.group,
        split,
    })
}

/// The CSV of `entries`, with paths relative to `relative_to` where they lie under it.
pub(super) fn entries_csv(
    entries: &[LabelEntry],
    relative_to: Option<&Path>,
) -> std::io::Result<Vec<u8>> {
    let failed = std::io::Error::other;
    let mut w = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(Vec::with_capacity(entries.len() * 96 + 64));
    w.write_record(HEADER).map_err(|e| failed(e.to_string()))?;
    for e in entries {
        let path = relative_to
            .and_then(|root| e.path.strip_prefix(root).ok())
            .unwrap_or(&e.path);
        let (class, magnification, mpp) = match &e.label {
            None => (String::new(), String::new(), String::new()),
            Some(Label::Class(c)) => (c.clone(), String::new(), String::new()),
            Some(Label::Magnification { magnification, mpp }) => (
                String::new(),
                magnification.to_string(),
                mpp.map(|m| m.to_string()).unwrap_or_default(),
            ),
        };
        w.serialize(Row {
            path: path.to_string_lossy().into_owned(),
            class,
            magnification,
            mpp,
            group: e.group.clone(),
            split: e.split.map(|s| s.name().to_string()).unwrap_or_default(),
        })
        .map_err(|e| failed(e.to_string()))?;
    }
    w.into_inner().map_err(|e| failed(e.to_string()))
}

/// `<stem>.classes.json` beside the manifest.
pub(super) fn classes_path(manifest: &Path) -> PathBuf {
    let stem = manifest
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "labels".into());
    manifest.with_file_name(format!("{stem}.classes.json"))
}

#[derive(Serialize, Deserialize)]
struct ClassesFile {
    classes: Vec<String>,
}

/// The class list of the sidecar beside `manifest`; None when there is none.
pub(super) fn read_classes(manifest: &Path) -> Result<Option<Vec<String>>, LabelError> {
    let path = classes_path(manifest);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LabelError::Read { path, source }),
    };
    let file: ClassesFile = serde_json::from_slice(&bytes).map_err(|e| LabelError::Parse {
        line: e.line() as u64,
        message: e.to_string(),
        path: path.clone(),
    })?;
    let mut classes: Vec<String> = Vec::with_capacity(file.classes.len());
    for c in file.classes {
        let c = c.trim().to_string();
        if !c.is_empty() && !classes.contains(&c) {
            classes.push(c);
        }
    }
    Ok(Some(classes))
}

pub(super) fn classes_json(classes: &[String]) -> std::io::Result<Vec<u8>> {
    let file = ClassesFile {
        classes: classes.to_vec(),
    };
    serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)
}
