//! The backbone interface: a CNN feature extractor with two taps for Grad-CAM, the activation of its
//! first convolution (low dimension: cells, nuclei) and of its last convolution (high dimension: tissue).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use rayon::prelude::*;

use super::blocked;
use super::pool::global_avg_pool;

/// Per-channel input normalisation: (pixel / 255 - mean) / std.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalization {
    pub const IMAGENET: Normalization = Normalization {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
    /// The TF-Lite EfficientNet convention (pixel - 127) / 128.
    pub const TFLITE: Normalization = Normalization {
        mean: [127.0 / 255.0; 3],
        std: [128.0 / 255.0; 3],
    };
}

/// What the zoo knows of an architecture: each architecture's file declares its own (see
/// [`crate::nn::architectures`], the registry that lists them).
pub struct ArchSpec {
    /// The name used on the command line, in checkpoints and in the window.
    pub name: &'static str,
    /// Channels of the last feature map (and of the pooled vector).
    pub feature_dim: usize,
    /// The smallest input side the architecture accepts.
    pub min_input: usize,
    /// The input side the architecture was designed for.
    pub default_input: usize,
    /// The input normalisation its ImageNet weights expect.
    pub imagenet_normalization: Normalization,
    /// Builds the backbone with its tensors under `vb`, named as in its reference implementation.
    pub build: fn(VarBuilder) -> Result<Box<dyn Backbone>>,
}

/// An architecture of the zoo: a handle on its [`ArchSpec`], compared and serialised by name.
#[derive(Clone, Copy)]
pub struct Arch(&'static ArchSpec);

impl Arch {
    pub const fn new(spec: &'static ArchSpec) -> Self {
        Arch(spec)
    }

    pub fn name(self) -> &'static str {
        self.0.name
    }

    /// Channels of the last feature map (and of the pooled vector).
    pub fn feature_dim(self) -> usize {
        self.0.feature_dim
    }

    /// The smallest input side the architecture accepts.
    pub fn min_input(self) -> usize {
        self.0.min_input
    }

    /// The input side the architecture was designed for.
    pub fn default_input(self) -> usize {
        self.0.default_input
    }

    /// The input normalisation its ImageNet weights expect.
    pub fn imagenet_normalization(self) -> Normalization {
        self.0.imagenet_normalization
    }
}

impl PartialEq for Arch {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for Arch {}

impl std::hash::Hash for Arch {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.name.hash(state);
    }
}

impl std::fmt::Debug for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.name)
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.name)
    }
}

impl Serialize for Arch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.0.name)
    }
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct Features {
    /// Activation of the first convolution (after its BatchNorm and activation): NCHW, or blocked
    /// in parts of one image each.
    low: Vec<Tensor>,
    /// Channels of `low`, to leave the blocked layout on demand.
    low_channels: usize,
    /// Activation of the last convolution: the final feature map (N, C, H, W).
    pub high: Tensor,
    /// Global average of `high`: (N, feature_dim).
    pub pooled: Tensor,
}

impl Features {
    pub fn new(low: Tensor, high: Tensor, pooled: Tensor) -> Self {
        let low_channels = low.dims().get(1).copied().unwrap_or(0);
        Features {
            low: vec![low],
            low_channels,
            high,
            pooled,
        }
    }

    /// Activation of the first convolution, (N, C, H, W). Inference keeps it in the blocked layout
    /// and converts it only here, when asked for.
    pub fn low(&self) -> Result<Tensor> {
        let parts = self
            .low
            .iter()
            .map(|l| blocked::to_nchw(l, self.low_channels))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }
}

/// A CNN feature extractor, split at its two taps so that Grad-CAM can take gradients there.
///
/// A backbone implements its stages on NCHW tensors and, where it supports the blocked CPU path
/// (`blocked_channels`), on blocked ones too; the provided `forward*` methods choose the layout and
/// always return NCHW.
pub trait Backbone: Send + Sync {
    fn arch(&self) -> Arch;

    /// Input image (N, 3, H, W), already normalised → first-convolution activation; blocked when
    /// `blocked` is set (the caller has checked `blocked_here`).
    fn stem(&self, x: &Tensor, train: bool, blocked: bool) -> Result<Tensor>;

    /// First-convolution activation → the input of the last block (what a model fine-tuned only at its
    /// top keeps frozen). Keeps the layout of its input.
    fn body(&self, low: &Tensor, train: bool) -> Result<Tensor>;

    /// Input of the last block → last-convolution activation. Keeps the layout of its input.
    fn last_block(&self, body: &Tensor, train: bool) -> Result<Tensor>;

    /// Name prefixes (relative to the backbone) of the last block's tensors.
    fn last_block_prefixes(&self) -> Vec<String>;

    /// Channels of the stem's and of the body's output where the backbone runs blocked, `None` where
    /// it never does.
    fn blocked_channels(&self) -> Option<(usize, usize)> {
        None
    }

    /// Whether every weight is a constant (loaded for inference, not trained); only asked of
    /// backbones with `blocked_channels`.
    fn constant_weights(&self) -> bool {
        false
    }

    /// Whether this pass over `x` runs blocked: evaluation, constant weights, a non-empty input that
    /// tracks no gradient, a CPU with the blocked kernels, a backbone that supports it.
    fn blocked_here(&self, x: &Tensor, train: bool) -> bool {
        !train
            && self.blocked_channels().is_some()
            && x.elem_count() > 0
            && blocked::spatial(x).is_ok_and(|(_, w)| w < histolens_kernels::MAX_FUSED_WIDTH)
            && blocked::applies(x)
            && self.constant_weights()
    }

    /// Input image (N, 3, H, W), already normalised → first-convolution activation.
    fn forward_low(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.stem(x, train, false)
    }

    /// First-convolution activation → the input of the last block.
    fn forward_body(&self, low: &Tensor, train: bool) -> Result<Tensor> {
        match self.blocked_channels() {
            Some((_, body)) if self.blocked_here(low, train) => blocked::on_worker(|| {
                blocked::to_nchw(&self.body(&blocked::to_blocked(low)?, false)?, body)
            }),
            _ => self.body(low, train),
        }
    }

    /// Input of the last block → last-convolution activation.
    fn forward_last_block(&self, body: &Tensor, train: bool) -> Result<Tensor> {
        if self.blocked_here(body, train) {
            return blocked::on_worker(|| {
                let high = self.last_block(&blocked::to_blocked(body)?, false)?;
                blocked::to_nchw(&high, self.arch().feature_dim())
            });
        }
        self.last_block(body, train)
    }

    /// First-convolution activation → last-convolution activation.
    fn forward_high(&self, low: &Tensor, train: bool) -> Result<Tensor> {
        if self.blocked_here(low, train) {
            return blocked::on_worker(|| {
                let high =
                    self.last_block(&self.body(&blocked::to_blocked(low)?, false)?, false)?;
                blocked::to_nchw(&high, self.arch().feature_dim())
            });
        }
        self.last_block(&self.body(low, train)?, train)
    }

    /// Channels of [`Backbone::stage_pooled`]'s output.
    fn stage_pooled_dim(&self) -> usize {
        self.arch().feature_dim()
    }

    /// Pooled descriptors from fine to coarse, in evaluation mode: the global average of the
    /// output of each stage and of the last convolution, concatenated, (N, `stage_pooled_dim`).
    /// Scale shows in textures at every depth, not only in the last one. Backbones that list no
    /// stages give the last convolution's average alone.
    fn stage_pooled(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward(x, false)?.pooled)
    }

    /// Stages [`Backbone::stage_pooled`] lists after its stem, where a fine-tuning can split the
    /// backbone (0: it cannot).
    fn stage_count(&self) -> usize {
        0
    }

    /// Evaluation mode: `x` → the output of the stem and the first `k` stages (NCHW), and the pooled
    /// averages [`Backbone::stage_pooled`] takes of them, (N, ·).
    fn stage_prefix(&self, _x: &Tensor, _k: usize) -> Result<(Tensor, Tensor)> {
        candle_core::bail!("{} cannot be split into stages", self.arch().name())
    }

    /// The output of the first `k` stages → the pooled averages of the later stages and of the last
    /// convolution: `stage_pooled(x)` is `stage_prefix(x, k).1` followed by `stage_suffix(prefix, k)`.
    /// `tune`: gradients flow to the weights of those stages, whose BatchNorms keep their running
    /// statistics (a fine-tuning that keeps the normalisation the frozen stages were trained with).
    fn stage_suffix(&self, _t: &Tensor, _k: usize, _tune: bool) -> Result<Tensor> {
        candle_core::bail!("{} cannot be split into stages", self.arch().name())
    }

    /// Name prefixes (relative to the backbone) of the tensors of the stages after the first `k`
    /// and of the last convolution: what a fine-tuning split at `k` trains.
    fn stage_suffix_prefixes(&self, _k: usize) -> Vec<String> {
        Vec::new()
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Features> {
        let (_, _, h, w) = x.dims4()?;
        let min = self.arch().min_input();
        if h < min || w < min {
            candle_core::bail!(
                "{} needs inputs of at least {min}x{min} pixels, got {h}x{w}",
                self.arch().name()
            );
        }
        if let (Some((low_channels, _)), true) =
            (self.blocked_channels(), self.blocked_here(x, train))
        {
            // One image at a time: its activations stay in cache from one layer to the next,
            // where a batch's would not (measured x1.2 at batch 8 for ResNet-50). With at least
            // as many images as threads, each thread takes whole images (no sharing of a layer).
            return blocked::on_worker(|| {
                let n = x.dim(0)?;
                let one = |i: usize| -> Result<(Tensor, Tensor)> {
                    let l = self.stem(&x.narrow(0, i, 1)?, false, true)?;
                    let h = self.last_block(&self.body(&l, false)?, false)?;
                    Ok((l, h))
                };
                let threads = histolens_kernels::threads();
                let whole = if threads > 1 { n - n % threads } else { 0 };
                let mut parts: Vec<(Tensor, Tensor)> = (0..whole)
                    .into_par_iter()
                    .map(|i| histolens_kernels::on_this_thread(|| one(i)))
                    .collect::<Result<_>>()?;
                for i in whole..n {
                    parts.push(one(i)?);
                }
                let (low, highs): (Vec<Tensor>, Vec<Tensor>) = parts.into_iter().unzip();
                let high = Tensor::cat(&highs, 0)?;
                let dim = self.arch().feature_dim();
                Ok(Features {
                    low,
                    low_channels,
                    pooled: blocked::global_avg_pool(&high, dim)?,
                    high: blocked::to_nchw(&high, dim)?,
                })
            });
        }
        let low = self.forward_low(x, train)?;
        let high = self.forward_high(&low, train)?;
        let pooled = global_avg_pool(&high)?;
        Ok(Features::new(low, high, pooled))
    }
}

/// Builds a backbone whose tensors live under `vb` with the names of its reference implementation.
pub fn build(arch: Arch, vb: VarBuilder) -> Result<Box<dyn Backbone>> {
    (arch.0.build)(vb)
}
