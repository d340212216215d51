//! A trained magnification model loaded for inference: weights as constants (the fast CPU path), the
//! constant scale factor m, and what its checkpoint says about inputs and the trained range.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::data::tensor::to_tensor;
use crate::nn::checkpoint::{CheckpointError, CheckpointMeta, Constants, LoadOptions, read_meta};
use crate::nn::gradcam::{CamMaps, Tap, grad_cam};
use crate::nn::hagnifinder::{Hagnifinder, Scaling, Target};
use crate::nn::pool::global_avg_pool;

/// The task name in checkpoints.
pub const TASK: &str = "magnification";
/// Metadata constants.
pub const CONST_M: &str = "asm_m";
pub const CONST_TARGET_LOG2: &str = "target_log2";
/// 1 when the head reads every stage's pooled output ([`Hagnifinder::multiscale`]).
pub const CONST_MULTISCALE: &str = "multiscale";

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read the model {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("the checkpoint is a {0:?} model, not a magnification model")]
    WrongTask(String),
    #[error("the checkpoint has no scale factor m (it was saved before the second training round)")]
    NoScaleFactor,
    #[error("model error: {0}")]
    Tensor(#[from] candle_core::Error),
}

pub struct MagnificationModel {
    pub meta: CheckpointMeta,
    model: Hagnifinder,
    m: f64,
    target: Target,
    device: Device,
}

impl MagnificationModel {
    pub fn load(path: &Path, device: &Device) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes, device)
    }

    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Self, ModelError> {
        let meta = read_meta(bytes)?;
        if meta.task != TASK {
            return Err(ModelError::WrongTask(meta.task));
        }
        let m = *meta
            .constants
            .get(CONST_M)
            .ok_or(ModelError::NoScaleFactor)?;
        if !(m.is_finite() && m > 0.0) {
            return Err(ModelError::NoScaleFactor);
        }
        let target = if meta
            .constants
            .get(CONST_TARGET_LOG2)
            .copied()
            .unwrap_or(0.0)
            > 0.5
        {
            Target::Log2
        } else {
            Target::Linear
        };
        let multiscale = meta
            .constants
            .get(CONST_MULTISCALE)
            .is_some_and(|&v| v > 0.5);
        let constants = Constants::from_bytes(bytes, &LoadOptions::default())?;
        let model = Hagnifinder::new(meta.arch, multiscale, constants.var_builder(device))
            .map_err(|e| ModelError::Checkpoint(CheckpointError::BadMetadata(e.to_string())))?;
        constants.check_all_used()?;
        Ok(MagnificationModel {
            meta,
            model,
            m,
            target,
            device: device.clone(),
        })
    }

    /// Side of the square crops the model takes.
    pub fn input_size(&self) -> u32 {
        self.meta.input_size[0] as u32
    }

    /// The magnifications the model was trained on.
    pub fn range(&self) -> Option<(f64, f64)> {
        self.meta.magnification_range.map(|[a, b]| (a, b))
    }

    /// Magnification of each crop (each `input_size` square).
    pub fn predict(&self, crops: &[RgbImage]) -> Result<Vec<f64>, ModelError> {
        if crops.is_empty() {
            return Ok(Vec::new());
        }
        let x = to_tensor(crops, self.meta.normalization, &self.device)?;
        let out = self.forward(&x)?;
        Ok(out
            .into_iter()
            .map(|v| self.target.decode(f64::from(v)))
            .collect())
    }

    /// Grad-CAM of the regression output at `tap` for one `input_size` crop.
    pub fn gradcam(&self, crop: &RgbImage, tap: Tap) -> Result<CamMaps, ModelError> {
        let x = to_tensor(
            std::slice::from_ref(crop),
            self.meta.normalization,
            &self.device,
        )?;
        // A multi-scale head also reads the earlier stages: their averages stay constant here, and
        // the gradient flows through the last convolution's.
        let earlier = if self.model.multiscale {
            let all = self.model.backbone.stage_pooled(&x)?;
            let width = all.dim(1)? - self.meta.arch.feature_dim();
            Some(all.narrow(1, 0, width)?.detach())
        } else {
            None
        };
        let output = |high: &Tensor| -> candle_core::Result<Tensor> {
            let pooled = global_avg_pool(high)?;
            let pooled = match &earlier {
                Some(e) => Tensor::cat(&[e, &pooled], 1)?,
                None => pooled,
            };
            let (out, _) = self
                .model
                .head
                .forward(&pooled, Scaling::Constant(self.m))?;
            Ok(out)
        };
        Ok(grad_cam(self.model.backbone.as_ref(), &x, tap, &output)?)
    }

    fn forward(&self, x: &Tensor) -> Result<Vec<f32>, ModelError> {
        let pooled = self.model.pooled(x, false)?;
        let (out, _) = self
            .model
            .head
            .forward(&pooled, Scaling::Constant(self.m))?;
        Ok(out.to_dtype(DType::F32)?.to_vec1()?)
    }
}
