//! Errors of the slide layer. Each says what went wrong and names the file last.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SlideError {
    #[error("file not found: {}", .0.display())]
    NotFound(PathBuf),

    #[error("file is empty (0 bytes): {}", .0.display())]
    Empty(PathBuf),

    #[error("not a slide or image format histolens can read ({reason}): {}", path.display())]
    Unsupported { path: PathBuf, reason: String },

    #[error("file is corrupt or truncated ({reason}): {}", path.display())]
    Corrupt { path: PathBuf, reason: String },

    #[error("image is too large to open ({reason}): {}", path.display())]
    TooLarge { path: PathBuf, reason: String },

    #[error("could not read {what} ({reason}): {}", path.display())]
    Read {
        path: PathBuf,
        what: String,
        reason: String,
    },

    #[error("level {level} does not exist (the slide has {count})")]
    NoSuchLevel { level: usize, count: usize },

    #[error("no associated image named {0:?}")]
    NoSuchAssociatedImage(String),

    #[error("region {width}x{height} is too large to read at once (limit {limit} pixels)")]
    RegionTooLarge { width: u32, height: u32, limit: u64 },

    #[error("I/O error ({source}): {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl SlideError {
    /// A short category, stable across messages, for tests and the CLI's exit reports.
    pub fn kind(&self) -> &'static str {
        match self {
            SlideError::NotFound(_) => "not-found",
            SlideError::Empty(_) => "empty",
            SlideError::Unsupported { .. } => "unsupported",
            SlideError::Corrupt { .. } => "corrupt",
            SlideError::TooLarge { .. } => "too-large",
            SlideError::Read { .. } => "read",
            SlideError::NoSuchLevel { .. } => "no-such-level",
            SlideError::NoSuchAssociatedImage(_) => "no-such-associated-image",
            SlideError::RegionTooLarge { .. } => "region-too-large",
            SlideError::Io { .. } => "io",
        }
    }
}
