//! Training data: tissue detection, dataset manifests, the magnification dataset builder and
//! augmentation. Reads slides and images through [`crate::slide`]; knows nothing of models or the GUI.

pub mod augment;
pub mod degrade;
pub mod magnification;
pub mod manifest;
pub mod mosaic;
pub mod pairs;
pub mod tensor;
pub mod tissue;

pub use manifest::{MagnificationRecord, Manifest, ManifestError, Split};
