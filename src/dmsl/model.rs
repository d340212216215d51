//! A trained DMSL model loaded for inference: weights as constants (the fast CPU path), the pair
//! geometry, branch magnifications, fusion weights and class names its checkpoint records.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::data::pairs::{PairGeometry, pair_from_field};
use crate::data::tensor::to_tensor;
use crate::nn::checkpoint::{CheckpointError, CheckpointMeta, Constants, LoadOptions, read_meta};
use crate::nn::dmsl::Dmsl;
use crate::nn::gradcam::{CamMaps, Tap, grad_cam};
use crate::nn::pool::global_avg_pool;
use candle_nn::Module;

/// The task name in checkpoints.
pub const TASK: &str = "dmsl";

/// Metadata constants of a DMSL checkpoint.
pub mod keys {
    pub const FIELD_UM: &str = "field_um";
    pub const HIGH: &str = "high_magnification";
    pub const LOW: &str = "low_magnification";
    /// `branch_<i>_magnification` and `branch_<i>_weight`, for each branch i.
    pub fn branch_magnification(i: usize) -> String {
        format!("branch_{i}_magnification")
    }
    pub fn branch_weight(i: usize) -> String {
        format!("branch_{i}_weight")
    }
}

/// The pair geometry and branches, as stored in a checkpoint's constants.
#[derive(Debug, Clone, PartialEq)]
pub struct DmslLayout {
    pub geometry: PairGeometry,
    /// The magnification each branch sees (the high one, the low one, or one of them alone).
    pub branch_magnifications: Vec<f64>,
    pub weights: Vec<f64>,
}

impl DmslLayout {
    pub fn to_constants(&self) -> BTreeMap<String, f64> {
        let mut c = BTreeMap::from([
            (keys::FIELD_UM.to_string(), self.geometry.field_um),
            (keys::HIGH.to_string(), self.geometry.high_magnification),
            (keys::LOW.to_string(), self.geometry.low_magnification),
        ]);
        for (i, (&m, &w)) in self
            .branch_magnifications
            .iter()
            .zip(&self.weights)
            .enumerate()
        {
            c.insert(keys::branch_magnification(i), m);
            c.insert(keys::branch_weight(i), w);
        }
        c
    }

    pub fn from_constants(c: &BTreeMap<String, f64>) -> Result<Self, ModelError> {
        let get = |k: &str| {
            c.get(k)
                .copied()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| ModelError::Layout(format!("no valid {k:?}")))
        };
        let geometry = PairGeometry {
            high_magnification: get(keys::HIGH)?,
            low_magnification: get(keys::LOW)?,
            field_um: get(keys::FIELD_UM)?,
        };
        let mut branch_magnifications = Vec::new();
        let mut weights = Vec::new();
        while let Some(&m) = c.get(&keys::branch_magnification(branch_magnifications.len())) {
            let i = branch_magnifications.len();
            weights.push(
                c.get(&keys::branch_weight(i))
                    .copied()
                    .filter(|w| w.is_finite() && *w >= 0.0)
                    .ok_or_else(|| ModelError::Layout(format!("no weight for branch {i}")))?,
            );
            branch_magnifications.push(m);
        }
        if branch_magnifications.is_empty() || weights.iter().sum::<f64>() <= 0.0 {
            return Err(ModelError::Layout("no branch".into()));
        }
        Ok(DmslLayout {
            geometry,
            branch_magnifications,
            weights,
        })
    }

    /// Input side of each branch in pixels.
    pub fn input_sizes(&self) -> Vec<u32> {
        self.branch_magnifications
            .iter()
            .map(|&m| self.geometry.px_at(m))
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read the model {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("the checkpoint is a {0:?} model, not a DMSL classifier")]
    WrongTask(String),
    #[error("the checkpoint's DMSL layout is invalid: {0}")]
    Layout(String),
    #[error("model error: {0}")]
    Tensor(#[from] candle_core::Error),
}

pub struct DmslModel {
    pub meta: CheckpointMeta,
    pub layout: DmslLayout,
    model: Dmsl,
    device: Device,
}

impl DmslModel {
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
        let layout = DmslLayout::from_constants(&meta.constants)?;
        let constants = Constants::from_bytes(bytes, &LoadOptions::default())?;
        let model = Dmsl::new(
            meta.arch,
            meta.classes.len(),
            &layout.weights,
            constants.var_builder(device),
        )
        .map_err(|e| ModelError::Checkpoint(CheckpointError::BadMetadata(e.to_string())))?;
        constants.check_all_used()?;
        Ok(DmslModel {
            meta,
            layout,
            model,
            device: device.clone(),
        })
    }

    pub fn classes(&self) -> &[String] {
        &self.meta.classes
    }

    pub fn geometry(&self) -> PairGeometry {
        self.layout.geometry
    }

    /// Fused class probabilities of fields given at the high magnification (`geometry().high_px()`
    /// square): each branch gets the field at its own magnification.
    pub fn predict_fields(&self, fields: &[RgbImage]) -> Result<Vec<Vec<f32>>, ModelError> {
        if fields.is_empty() {
            return Ok(Vec::new());
        }
        let g = self.layout.geometry;
        let lows: Vec<RgbImage> = if self
            .layout
            .branch_magnifications
            .iter()
            .any(|&m| m < g.high_magnification)
        {
            fields.iter().map(|f| pair_from_field(f, &g)).collect()
        } else {
            Vec::new()
        };
        let mut inputs = Vec::with_capacity(self.layout.branch_magnifications.len());
        for &m in &self.layout.branch_magnifications {
            let images = if m < g.high_magnification {
                &lows
            } else {
                fields
            };
            inputs.push(to_tensor(images, self.meta.normalization, &self.device)?);
        }
        self.predict_inputs(&inputs)
    }

    /// Grad-CAM of `class`'s probability in every branch at `tap`, for one field given at the high
    /// magnification: per branch, its magnification, its input image and the map over it.
    pub fn gradcam(
        &self,
        field: &RgbImage,
        class: usize,
        tap: Tap,
    ) -> Result<Vec<(f64, RgbImage, CamMaps)>, ModelError> {
        if class >= self.classes().len() {
            return Err(ModelError::Layout(format!(
                "class {class} does not exist: the model has {}",
                self.classes().len()
            )));
        }
        let g = self.layout.geometry;
        let mut out = Vec::with_capacity(self.model.branches.len());
        for (branch, &m) in self
            .model
            .branches
            .iter()
            .zip(&self.layout.branch_magnifications)
        {
            let image = if m < g.high_magnification {
                pair_from_field(field, &g)
            } else {
                field.clone()
            };
            let x = to_tensor(
                std::slice::from_ref(&image),
                self.meta.normalization,
                &self.device,
            )?;
            let probability = |high: &Tensor| -> candle_core::Result<Tensor> {
                let logits = branch.classifier.forward(&global_avg_pool(high)?)?;
                candle_nn::ops::softmax(&logits, candle_core::D::Minus1)?
                    .narrow(1, class, 1)?
                    .squeeze(1)
            };
            out.push((
                m,
                image,
                grad_cam(branch.backbone.as_ref(), &x, tap, &probability)?,
            ));
        }
        Ok(out)
    }

    /// Fused class probabilities of normalised inputs, one tensor per branch.
    pub fn predict_inputs(&self, inputs: &[Tensor]) -> Result<Vec<Vec<f32>>, ModelError> {
        let out = self.model.forward(inputs, false)?;
        Ok(out
            .fused_probs(&self.model.weights)?
            .to_dtype(DType::F32)?
            .to_vec2()?)
    }
}
