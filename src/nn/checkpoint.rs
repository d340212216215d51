//! Checkpoints: safetensors files whose header metadata describes the model (architecture, task, input
//! size, normalisation, classes or magnification range, provenance). Loading checks every tensor's name,
//! shape and dtype against the model and refuses truncated files, non-safetensors files and NaN/Inf.
//! Pickles are never read. The caller reads the file; this module only sees bytes.

use std::collections::{BTreeMap, HashMap};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::backbone::Arch;
pub use super::backbone::Normalization;

/// Key of the JSON metadata in the safetensors header.
pub const META_KEY: &str = "histolens";
pub const FORMAT_VERSION: u32 = 1;

/// Where a model came from and how well it did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The training data (manifest path, data set name).
    pub data: String,
    pub epochs: usize,
    pub metrics: BTreeMap<String, f64>,
    /// histolens version that wrote the file.
    pub software: String,
    pub notes: String,
}

/// What a checkpoint says about its model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format_version: u32,
    pub arch: Arch,
    /// "magnification", "dmsl", "imagenet", "features", …
    pub task: String,
    /// Input height and width in pixels.
    pub input_size: [usize; 2],
    pub normalization: Normalization,
    /// Class names, for classifiers.
    #[serde(default)]
    pub classes: Vec<String>,
    /// Magnifications the model was trained on (min, max), for the magnification regressor.
    #[serde(default)]
    pub magnification_range: Option<[f64; 2]>,
    /// Task-specific constants (e.g. Hagnifinder's mean scale factor m).
    #[serde(default)]
    pub constants: BTreeMap<String, f64>,
    #[serde(default)]
    pub provenance: Provenance,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "not a safetensors file (it may be truncated, or a PyTorch pickle, which histolens never loads): {0}"
    )]
    NotSafetensors(String),
    #[error("the checkpoint has no histolens metadata")]
    MissingMetadata,
    #[error("the checkpoint's metadata is invalid: {0}")]
    BadMetadata(String),
    #[error("tensor {0:?} is missing from the checkpoint")]
    Missing(String),
    #[error("tensor {0:?} in the checkpoint is not part of this model")]
    Unexpected(String),
    #[error(
        "tensor {name:?} has shape {found:?} in the checkpoint but the model needs {expected:?}"
    )]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "tensor {name:?} has dtype {found} in the checkpoint; a floating-point dtype is needed"
    )]
    Dtype { name: String, found: String },
    #[error("tensor {0:?} holds NaN or infinite values")]
    NonFinite(String),
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("cannot read the checkpoint {}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The input normalisation of the weights a run starts from: the architecture's ImageNet one, a
/// checkpoint's own (the one it was trained with), ImageNet's for random weights.
pub fn start_normalization(
    start: &crate::util::run::Start,
    arch: Arch,
) -> Result<Normalization, CheckpointError> {
    use crate::util::run::Start;
    Ok(match start {
        Start::Imagenet(_) => arch.imagenet_normalization(),
        Start::Checkpoint(p) => {
            let bytes = std::fs::read(p).map_err(|source| CheckpointError::Io {
                path: p.clone(),
                source,
            })?;
            read_meta(&bytes)?.normalization
        }
        Start::Random => Normalization::IMAGENET,
    })
}

/// What `load_into` tolerates in a file that was not written for exactly this model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// File tensors under these prefixes are skipped (e.g. an ImageNet classifier `fc.`).
    pub ignore_prefixes: Vec<String>,
    /// Model tensors under these prefixes may be absent from the file (they keep their values).
    pub optional_prefixes: Vec<String>,
    /// Where the file's tensors go in the model: file tensor `n` is model tensor `model_prefix + n`;
    /// model tensors outside the prefix are left alone (e.g. `backbone.` for ImageNet weights loaded
    /// under a task head).
    pub model_prefix: String,
}

fn is_float(dtype: safetensors::Dtype) -> bool {
    matches!(
        dtype,
        safetensors::Dtype::F16
            | safetensors::Dtype::BF16
            | safetensors::Dtype::F32
            | safetensors::Dtype::F64
    )
}

/// Serialises every variable of `vars` (sorted by name) with `meta` in the header, in f16 when `half`.
pub fn to_bytes(
    vars: &VarMap,
    meta: &CheckpointMeta,
    half: bool,
) -> Result<Vec<u8>, CheckpointError> {
    let data = vars
        .data()
        .lock()
        .map_err(|_| CheckpointError::BadMetadata("variable map poisoned".into()))?;
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(data.len());
    for (name, var) in data.iter() {
        let t = var.as_tensor().to_device(&Device::Cpu)?;
        let t = if half { t.to_dtype(DType::F16)? } else { t };
        tensors.push((name.clone(), t));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let json =
        serde_json::to_string(meta).map_err(|e| CheckpointError::BadMetadata(e.to_string()))?;
    let info = HashMap::from([(META_KEY.to_string(), json)]);
    safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(info))
        .map_err(|e| CheckpointError::NotSafetensors(e.to_string()))
}

/// The histolens metadata of a checkpoint.
pub fn read_meta(bytes: &[u8]) -> Result<CheckpointMeta, CheckpointError> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| CheckpointError::NotSafetensors(e.to_string()))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or(CheckpointError::MissingMetadata)?;
    let meta: CheckpointMeta =
        serde_json::from_str(json).map_err(|e| CheckpointError::BadMetadata(e.to_string()))?;
    if meta.format_version > FORMAT_VERSION {
        return Err(CheckpointError::BadMetadata(format!(
            "format version {} is newer than this histolens understands ({FORMAT_VERSION})",
            meta.format_version
        )));
    }
    Ok(meta)
}

/// Loads the tensors of a safetensors file into the model's variables, checking names, shapes, dtypes and
/// values first: on any error the model is left unchanged. BatchNorm's `num_batches_tracked` (an integer
/// counter in torchvision files) is ignored.
pub fn load_into(bytes: &[u8], vars: &VarMap, opts: &LoadOptions) -> Result<(), CheckpointError> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| CheckpointError::NotSafetensors(e.to_string()))?;
    let data = vars
        .data()
        .lock()
        .map_err(|_| CheckpointError::BadMetadata("variable map poisoned".into()))?;
    let ignored = |n: &str| {
        n.ends_with("num_batches_tracked")
            || opts
                .ignore_prefixes
                .iter()
                .any(|p| n.starts_with(p.as_str()))
    };
    let mut file_names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    file_names.sort();
    let prefix = opts.model_prefix.as_str();
    for n in &file_names {
        if !ignored(n) && !data.contains_key(&format!("{prefix}{n}")) {
            return Err(CheckpointError::Unexpected(n.clone()));
        }
    }
    let mut names: Vec<&String> = data.keys().filter(|n| n.starts_with(prefix)).collect();
    names.sort();
    let mut staged = Vec::with_capacity(names.len());
    for model_name in names {
        let var = &data[model_name];
        let name = &model_name[prefix.len()..];
        let view = match st.tensor(name) {
            Ok(v) => v,
            Err(_)
                if opts
                    .optional_prefixes
                    .iter()
                    .any(|p| name.starts_with(p.as_str())) =>
            {
                continue;
            }
            Err(_) => return Err(CheckpointError::Missing(name.to_string())),
        };
        if view.shape() != var.dims() {
            return Err(CheckpointError::Shape {
                name: name.to_string(),
                expected: var.dims().to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let t = checked_f32(name, &view)?;
        staged.push((var, t));
    }
    for (var, t) in staged {
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// A file tensor as f32 after checking its dtype and values.
fn checked_f32(
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
) -> Result<Tensor, CheckpointError> {
    if !is_float(view.dtype()) {
        return Err(CheckpointError::Dtype {
            name: name.to_string(),
            found: format!("{:?}", view.dtype()),
        });
    }
    let t = view.load(&Device::Cpu)?.to_dtype(DType::F32)?;
    let finite = t
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_finite());
    if !finite {
        return Err(CheckpointError::NonFinite(name.to_string()));
    }
    Ok(t)
}

/// A checkpoint's tensors as constants, for inference: a model built on [`Constants::var_builder`]
/// holds no variables, so it tracks no gradients and runs the fast CPU path. Every tensor's dtype and
/// values are checked on reading; names and shapes are checked as the model asks for them, and
/// [`Constants::check_all_used`] then reports a file tensor the model did not use.
#[derive(Clone)]
pub struct Constants {
    tensors: std::sync::Arc<HashMap<String, Tensor>>,
    used: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl Constants {
    pub fn from_bytes(bytes: &[u8], opts: &LoadOptions) -> Result<Self, CheckpointError> {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| CheckpointError::NotSafetensors(e.to_string()))?;
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort();
        let mut tensors = HashMap::with_capacity(names.len());
        for name in names {
            if name.ends_with("num_batches_tracked")
                || opts
                    .ignore_prefixes
                    .iter()
                    .any(|p| name.starts_with(p.as_str()))
            {
                continue;
            }
            let view = st
                .tensor(&name)
                .map_err(|e| CheckpointError::NotSafetensors(e.to_string()))?;
            let t = checked_f32(&name, &view)?;
            tensors.insert(name, t);
        }
        Ok(Constants {
            tensors: std::sync::Arc::new(tensors),
            used: Default::default(),
        })
    }

    /// A VarBuilder (f32, `device`) that serves these tensors and records which were used.
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    /// Errors on the first (by name) file tensor that no model built so far asked for.
    pub fn check_all_used(&self) -> Result<(), CheckpointError> {
        let used = self
            .used
            .lock()
            .map_err(|_| CheckpointError::BadMetadata("checkpoint state poisoned".into()))?;
        let mut unused: Vec<&String> = self.tensors.keys().filter(|n| !used.contains(*n)).collect();
        unused.sort();
        match unused.first() {
            Some(n) => Err(CheckpointError::Unexpected((*n).clone())),
            None => Ok(()),
        }
    }

    fn fetch(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::Msg(CheckpointError::Missing(name.into()).to_string())
        })?;
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_string());
        }
        t.to_device(dev)?.to_dtype(dtype)
    }
}

impl candle_nn::var_builder::SimpleBackend for Constants {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.fetch(name, dtype, dev)?;
        if t.shape() != &s {
            let e = CheckpointError::Shape {
                name: name.to_string(),
                expected: s.dims().to_vec(),
                found: t.dims().to_vec(),
            };
            return Err(candle_core::Error::Msg(e.to_string()));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
