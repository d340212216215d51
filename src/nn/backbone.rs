//! The backbone interface: a CNN feature extractor with two taps for Grad-CAM, the activation of its
//! first convolution (low dimension: cells, nuclei) and of its last convolution (high dimension: tissue).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::pool::global_avg_pool;

/// The architectures of the zoo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    Resnet18,
    Resnet50,
    InceptionV3,
    EfficientnetLite0,
}

impl Arch {
    pub const ALL: [Arch; 4] = [
        Arch::Resnet18,
        Arch::Resnet50,
        Arch::InceptionV3,
        Arch::EfficientnetLite0,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Arch::Resnet18 => "resnet18",
            Arch::Resnet50 => "resnet50",
            Arch::InceptionV3 => "inception-v3",
            Arch::EfficientnetLite0 => "efficientnet-lite0",
        }
    }

    pub fn parse(s: &str) -> Option<Arch> {
        Arch::ALL
            .into_iter()
            .find(|a| a.name() == s.to_ascii_lowercase())
    }

    /// Channels of the last feature map (and of the pooled vector).
    pub fn feature_dim(self) -> usize {
        match self {
            Arch::Resnet18 => 512,
            Arch::Resnet50 | Arch::InceptionV3 => 2048,
            Arch::EfficientnetLite0 => 1280,
        }
    }

    /// The smallest input side the architecture accepts.
    pub fn min_input(self) -> usize {
        match self {
            Arch::InceptionV3 => 75,
            _ => 32,
        }
    }

    /// The input side the architecture was designed for.
    pub fn default_input(self) -> usize {
        match self {
            Arch::InceptionV3 => 299,
            _ => 224,
        }
    }
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct Features {
    /// Activation of the first convolution (after its BatchNorm and activation).
    pub low: Tensor,
    /// Activation of the last convolution: the final feature map.
    pub high: Tensor,
    /// Global average of `high`: (N, feature_dim).
    pub pooled: Tensor,
}

/// A CNN feature extractor, split at its two taps so that Grad-CAM can take gradients there.
pub trait Backbone: Send + Sync {
    fn arch(&self) -> Arch;

    /// Input image (N, 3, H, W), already normalised → first-convolution activation.
    fn forward_low(&self, x: &Tensor, train: bool) -> Result<Tensor>;

    /// First-convolution activation → the input of the last block (what a model fine-tuned only at its
    /// top keeps frozen).
    fn forward_body(&self, low: &Tensor, train: bool) -> Result<Tensor>;

    /// Input of the last block → last-convolution activation.
    fn forward_last_block(&self, body: &Tensor, train: bool) -> Result<Tensor>;

    /// Name prefixes (relative to the backbone) of the last block's tensors.
    fn last_block_prefixes(&self) -> Vec<String>;

    /// First-convolution activation → last-convolution activation.
    fn forward_high(&self, low: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_last_block(&self.forward_body(low, train)?, train)
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
        let low = self.forward_low(x, train)?;
        let high = self.forward_high(&low, train)?;
        let pooled = global_avg_pool(&high)?;
        Ok(Features { low, high, pooled })
    }
}

/// Builds a backbone whose tensors live under `vb` with the names of its reference implementation.
pub fn build(arch: Arch, vb: VarBuilder) -> Result<Box<dyn Backbone>> {
    Ok(match arch {
        Arch::Resnet18 => Box::new(super::resnet::ResNet::new(super::resnet::Depth::D18, vb)?),
        Arch::Resnet50 => Box::new(super::resnet::ResNet::new(super::resnet::Depth::D50, vb)?),
        Arch::InceptionV3 => Box::new(super::inception::InceptionV3::new(vb)?),
        Arch::EfficientnetLite0 => Box::new(super::efficientnet::EfficientNetLite0::new(vb)?),
    })
}
