//! A frozen backbone's pooled features of every record of a manifest, computed once and kept in
//! histolens's cache folder: with a frozen backbone, epochs (and leave-one-source-out folds) cost only
//! the head. Each record is scored on the same crops an estimate uses ([`super::estimate::plan_crops`]).
//!
//! With a backbone fine-tuned only after its first `k` stages ([`CropSettings::split`]), the table
//! also keeps each crop's output of those frozen stages, so that every epoch starts from there.
//!
//! The cache file is keyed on the backbone's weights, the crop settings and every record's path, size
//! and modification time, so a changed image or model never reads stale features.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::estimate::plan_crops;
use crate::data::manifest::{MagnificationRecord, Manifest};
use crate::data::tensor::to_tensor;
use crate::nn::backbone::Backbone;
use crate::nn::checkpoint::Normalization;
use crate::util::fs::{Fnv, file_version, write_atomic};

#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error("cannot read the image {}: {message}", path.display())]
    Image { path: PathBuf, message: String },
    #[error("model error: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Features of every crop of every record: row `i` belongs to record `record[i]`.
pub struct FeatureTable {
    /// (rows, dim), on the device the head trains on: the pooled features, or with a split
    /// backbone those of the frozen stages.
    pub features: Tensor,
    /// With a split backbone: the output of the frozen stages, (rows, C, H, W).
    pub maps: Option<Tensor>,
    pub record: Vec<usize>,
    /// The rows of each record.
    by_record: HashMap<usize, Vec<usize>>,
}

impl FeatureTable {
    fn new(features: Tensor, maps: Option<Tensor>, record: Vec<usize>) -> Self {
        let mut by_record: HashMap<usize, Vec<usize>> = HashMap::new();
        for (row, &r) in record.iter().enumerate() {
            by_record.entry(r).or_default().push(row);
        }
        FeatureTable {
            features,
            maps,
            record,
            by_record,
        }
    }

    pub fn rows_of(&self, record: usize) -> &[usize] {
        self.by_record.get(&record).map_or(&[], Vec::as_slice)
    }

    /// The features of `rows`, (rows.len(), dim).
    pub fn select(&self, rows: &[usize]) -> candle_core::Result<Tensor> {
        self.features.index_select(&self.index(rows)?, 0)
    }

    /// The frozen stages' output of `rows`, (rows.len(), C, H, W), with a split backbone.
    pub fn select_maps(&self, rows: &[usize]) -> candle_core::Result<Option<Tensor>> {
        self.maps
            .as_ref()
            .map(|m| m.index_select(&self.index(rows)?, 0))
            .transpose()
    }

    fn index(&self, rows: &[usize]) -> candle_core::Result<Tensor> {
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let n = idx.len();
        Tensor::from_vec(idx, n, self.features.device())
    }
}

/// How records are cropped and scored.
#[derive(Debug, Clone, Copy)]
pub struct CropSettings {
    pub input: u32,
    pub max_crops: usize,
    pub norm: Normalization,
    /// Every stage's pooled output ([`Backbone::stage_pooled`]) instead of the last convolution's.
    pub multiscale: bool,
    /// Keep the output of the first `k` stages ([`Backbone::stage_prefix`]) and their pooled
    /// averages: the later stages are being trained.
    pub split: Option<usize>,
}

/// The features of every record of `manifest` under `backbone` (whose weights `weights` fingerprints),
/// from the cache in `cache_dir` when it holds them, else computed (calling `progress(done, total)`)
/// and stored there. A cache that cannot be written only costs the next run the computation.
pub fn features_for(
    manifest: &Manifest,
    backbone: &dyn Backbone,
    weights: u64,
    crops: CropSettings,
    cache_dir: &Path,
    device: &Device,
    mut progress: impl FnMut(usize, usize),
) -> Result<FeatureTable, FeatureError> {
    let file = cache_dir.join("features").join(format!(
        "{:016x}.safetensors",
        key(manifest, weights, crops)
    ));
    if let Some(table) = load(&file, manifest.records.len(), crops.split.is_some(), device) {
        return Ok(table);
    }
    let mut rows: Vec<Tensor> = Vec::new();
    let mut maps: Vec<Tensor> = Vec::new();
    let mut owners = Vec::new();
    let total = manifest.records.len();
    for (chunk_no, chunk) in manifest.records.chunks(16).enumerate() {
        let base = chunk_no * 16;
        let planned: Vec<Vec<image::RgbImage>> = chunk
            .par_iter()
            .map(|r| record_crops(manifest, r, crops))
            .collect::<Result<_, _>>()?;
        let mut images = Vec::new();
        for (i, p) in planned.into_iter().enumerate() {
            owners.extend(std::iter::repeat_n(base + i, p.len()));
            images.extend(p);
        }
        for batch in images.chunks(32) {
            let x = to_tensor(batch, crops.norm, &Device::Cpu)?;
            let pooled = match crops.split {
                Some(k) => {
                    let (map, pooled) = backbone.stage_prefix(&x, k)?;
                    maps.push(map.detach());
                    pooled
                }
                None if crops.multiscale => backbone.stage_pooled(&x)?,
                None => backbone.forward(&x, false)?.pooled,
            };
            rows.push(pooled.detach());
        }
        progress((base + chunk.len()).min(total), total);
    }
    let features = Tensor::cat(&rows, 0)?.to_dtype(DType::F32)?;
    let maps = if maps.is_empty() {
        None
    } else {
        Some(Tensor::cat(&maps, 0)?.to_dtype(DType::F32)?)
    };
    store(&file, &features, maps.as_ref(), &owners);
    Ok(FeatureTable::new(
        features.to_device(device)?,
        maps.map(|m| m.to_device(device)).transpose()?,
        owners,
    ))
}

/// The crops an estimate of the record's image would score.
fn record_crops(
    manifest: &Manifest,
    r: &MagnificationRecord,
    crops: CropSettings,
) -> Result<Vec<image::RgbImage>, FeatureError> {
    let path = manifest.resolve(r);
    let img = image::open(&path).map_err(|e| FeatureError::Image {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(plan_crops(&img.to_rgba8(), crops.input, crops.max_crops).crops)
}

fn key(manifest: &Manifest, weights: u64, crops: CropSettings) -> u64 {
    let mut h = Fnv::default();
    h.write(&weights.to_le_bytes());
    h.write(&crops.input.to_le_bytes());
    h.write(&(crops.max_crops as u64).to_le_bytes());
    h.write(&[u8::from(crops.multiscale)]);
    if let Some(k) = crops.split {
        h.write(b"split");
        h.write(&(k as u64).to_le_bytes());
    }
    for v in crops.norm.mean.iter().chain(&crops.norm.std) {
        h.write(&v.to_le_bytes());
    }
    for r in &manifest.records {
        let path = manifest.resolve(r);
        h.write(path.to_string_lossy().as_bytes());
        if let Some((len, modified)) = file_version(&path) {
            h.write(&len.to_le_bytes());
            h.write(&modified.to_le_bytes());
        }
    }
    h.finish()
}

/// The cached table in `file`, if it is whole (with the frozen stages' maps when `maps` asks).
fn load(file: &Path, records: usize, maps: bool, device: &Device) -> Option<FeatureTable> {
    let bytes = std::fs::read(file).ok()?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).ok()?;
    let features = tensors.get("features")?.to_dtype(DType::F32).ok()?;
    let owners: Vec<u32> = tensors.get("record")?.to_vec1().ok()?;
    let owners: Vec<usize> = owners.into_iter().map(|o| o as usize).collect();
    let maps = match (tensors.get("maps"), maps) {
        (Some(m), true) => Some(m.to_dtype(DType::F32).ok()?),
        (None, false) => None,
        _ => return None,
    };
    let fits = features.dims().len() == 2
        && features.dims()[0] == owners.len()
        && maps
            .as_ref()
            .is_none_or(|m| m.dims().len() == 4 && m.dims()[0] == owners.len())
        && owners.iter().all(|&o| o < records);
    if !fits {
        return None;
    }
    let maps = match maps {
        Some(m) => Some(m.to_device(device).ok()?),
        None => None,
    };
    Some(FeatureTable::new(
        features.to_device(device).ok()?,
        maps,
        owners,
    ))
}

fn store(file: &Path, features: &Tensor, maps: Option<&Tensor>, owners: &[usize]) {
    let owners: Vec<u32> = owners.iter().map(|&o| o as u32).collect();
    let n = owners.len();
    let Ok(owners) = Tensor::from_vec(owners, n, &Device::Cpu) else {
        return;
    };
    let mut tensors = vec![("features", features.clone()), ("record", owners)];
    if let Some(m) = maps {
        tensors.push(("maps", m.clone()));
    }
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (*n, t)), None);
    if let Ok(bytes) = bytes
        && let Err(e) = write_atomic(file, &bytes)
    {
        log::warn!("cannot cache features in {}: {e}", file.display());
    }
}
