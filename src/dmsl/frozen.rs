//! What the frozen part of each DMSL branch computes, once per pair, kept in histolens's cache
//! folder: with frozen backbones and unaugmented pairs it is the same every epoch and in every
//! cross-validation fold, so that after the first run an epoch costs only what trains.
//!
//! The file is keyed on the frozen weights, the branches, the normalisation and every pair image's
//! path, size and modification time, so a changed image or model never reads stale values.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::nn::backbone::Backbone;
use crate::nn::dmsl::channel_max;
use crate::util::fs::{Fnv, file_version, write_atomic};

/// What the frozen part of one branch gives for a batch of images.
pub enum FrozenOutput {
    /// With the last block trained: that block's input, (N, C, H, W).
    Body(Tensor),
    /// With the whole backbone frozen: the pooled features (N, D) and the channel-wise maximum of the
    /// last feature map (N, 1, H, W), which is all SIM reads of it.
    Pooled { pooled: Tensor, sim_map: Tensor },
}

impl FrozenOutput {
    /// The frozen part of `backbone` on `x`: up to the last block (`body`) or all of it.
    pub fn compute(backbone: &dyn Backbone, x: &Tensor, body: bool) -> candle_core::Result<Self> {
        if body {
            let low = backbone.forward_low(x, false)?;
            return Ok(FrozenOutput::Body(backbone.forward_body(&low, false)?));
        }
        let f = backbone.forward(x, false)?;
        Ok(FrozenOutput::Pooled {
            pooled: f.pooled,
            sim_map: channel_max(&f.high)?,
        })
    }

    /// Its tensors (one or two).
    pub fn tensors(&self) -> Vec<&Tensor> {
        match self {
            FrozenOutput::Body(t) => vec![t],
            FrozenOutput::Pooled { pooled, sim_map } => vec![pooled, sim_map],
        }
    }

    fn from_tensors(mut t: Vec<Tensor>, body: bool) -> Option<Self> {
        match (body, t.len()) {
            (true, 1) => t.pop().map(FrozenOutput::Body),
            (false, 2) => {
                let sim_map = t.pop()?;
                let pooled = t.pop()?;
                Some(FrozenOutput::Pooled { pooled, sim_map })
            }
            _ => None,
        }
    }

    fn rows(&self) -> usize {
        self.tensors()[0].dims().first().copied().unwrap_or(0)
    }

    /// The rows `idx`.
    pub fn select(&self, idx: &Tensor) -> candle_core::Result<Self> {
        let pick = |t: &Tensor| t.index_select(idx, 0);
        Ok(match self {
            FrozenOutput::Body(t) => FrozenOutput::Body(pick(t)?),
            FrozenOutput::Pooled { pooled, sim_map } => FrozenOutput::Pooled {
                pooled: pick(pooled)?,
                sim_map: pick(sim_map)?,
            },
        })
    }
}

/// Per branch, the frozen output of every record of a pairs manifest (row `i` is record `i`).
pub struct FrozenTable {
    pub branches: Vec<FrozenOutput>,
}

impl FrozenTable {
    /// The rows of `records`, per branch.
    pub fn select(
        &self,
        records: &[usize],
        device: &Device,
    ) -> candle_core::Result<Vec<FrozenOutput>> {
        let idx: Vec<u32> = records.iter().map(|&r| r as u32).collect();
        let idx = Tensor::from_vec(idx, records.len(), device)?;
        self.branches.iter().map(|b| b.select(&idx)).collect()
    }

    /// The table cached in `file`, if it is whole.
    pub fn load(
        file: &Path,
        branches: usize,
        records: usize,
        body: bool,
        device: &Device,
    ) -> Option<Self> {
        let bytes = std::fs::read(file).ok()?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).ok()?;
        let mut out = Vec::with_capacity(branches);
        for b in 0..branches {
            let parts = (0..if body { 1 } else { 2 })
                .map(|k| {
                    tensors
                        .get(&format!("branch{b}.{k}"))
                        .and_then(|t| t.to_device(device).ok())
                })
                .collect::<Option<Vec<_>>>()?;
            let f = FrozenOutput::from_tensors(parts, body)?;
            if f.tensors()
                .iter()
                .any(|t| t.dims().first() != Some(&records))
            {
                return None;
            }
            out.push(f);
        }
        Some(FrozenTable { branches: out })
    }

    /// Writes the table atomically; a cache that cannot be written only costs the next run the
    /// computation.
    pub fn store(&self, file: &Path) {
        let mut named = Vec::new();
        for (b, f) in self.branches.iter().enumerate() {
            for (k, t) in f.tensors().into_iter().enumerate() {
                match t
                    .to_device(&Device::Cpu)
                    .and_then(|t| t.to_dtype(DType::F32))
                {
                    Ok(t) => named.push((format!("branch{b}.{k}"), t)),
                    Err(_) => return,
                }
            }
        }
        let bytes = safetensors::serialize(named.iter().map(|(n, t)| (n.as_str(), t)), None);
        if let Ok(bytes) = bytes
            && let Err(e) = write_atomic(file, &bytes)
        {
            log::warn!("cannot cache frozen features in {}: {e}", file.display());
        }
    }

    /// Concatenates per-batch outputs (a list per branch) into one table.
    pub fn concat(batches: Vec<Vec<FrozenOutput>>, branches: usize) -> candle_core::Result<Self> {
        let mut per_branch: Vec<Vec<FrozenOutput>> = (0..branches).map(|_| Vec::new()).collect();
        for batch in batches {
            for (b, f) in batch.into_iter().enumerate() {
                per_branch[b].push(f);
            }
        }
        let branches = per_branch
            .into_iter()
            .map(|parts| {
                let body = matches!(parts.first(), Some(FrozenOutput::Body(_)));
                let columns = if body { 1 } else { 2 };
                let joined = (0..columns)
                    .map(|k| {
                        let list: Vec<&Tensor> = parts.iter().map(|p| p.tensors()[k]).collect();
                        Tensor::cat(&list, 0)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                FrozenOutput::from_tensors(joined, body)
                    .ok_or_else(|| candle_core::Error::Msg("no frozen output".into()))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(FrozenTable { branches })
    }

    pub fn rows(&self) -> usize {
        self.branches.first().map_or(0, FrozenOutput::rows)
    }
}

/// The cache key of a table: the frozen weights' fingerprint, what the branches read, and every
/// image's path, size and modification time.
pub fn key(weights: u64, body: bool, description: &str, images: &[std::path::PathBuf]) -> u64 {
    let mut h = Fnv::default();
    h.write(b"dmsl-frozen-1");
    h.write(&weights.to_le_bytes());
    h.write(&[u8::from(body)]);
    h.write(description.as_bytes());
    for path in images {
        h.write(path.to_string_lossy().as_bytes());
        if let Some((len, modified)) = file_version(path) {
            h.write(&len.to_le_bytes());
            h.write(&modified.to_le_bytes());
        }
    }
    h.finish()
}
