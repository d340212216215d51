//! ResNet-18 and ResNet-50 with torchvision's tensor names (`conv1`, `bn1`, `layerX.Y.convZ`,
//! `downsample.0/1`), so a torchvision `state_dict` saved as safetensors loads as it is.

use std::sync::OnceLock;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::backbone::{Arch, ArchSpec, Backbone, Normalization};
use crate::nn::blocked::is_blocked;
use crate::nn::cpu_conv::add_act;
use crate::nn::layers::{Activation, ConvBn, ConvSpec};
use crate::nn::pool::max_pool2d;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    D18,
    D50,
}

struct Block {
    /// Input channels.
    cin: usize,
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl Block {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let Some((last, inner)) = self.convs.split_last() else {
            return Ok(x.clone());
        };
        let mut y = x.clone();
        for c in inner {
            y = c.forward_act(&y, train, Activation::Relu)?;
        }
        let skip = match &self.downsample {
            Some(d) => d.forward_t(x, train)?,
            None => x.clone(),
        };
        if !train && is_blocked(&y) {
            return last.forward_blocked_add(&y, &skip, Activation::Relu);
        }
        add_act(last.forward_t(&y, train)?, &skip, Activation::Relu)
    }
}

pub struct ResNet {
    depth: Depth,
    stem: ConvBn,
    layers: Vec<Vec<Block>>,
    constant: OnceLock<bool>,
}

impl ResNet {
    pub fn new(depth: Depth, vb: VarBuilder) -> Result<Self> {
        let stem = ConvBn::new(ConvSpec::new(3, 64, 7, 2, 3), vb.pp("conv1"), vb.pp("bn1"))?;
        let (repeats, expansion) = match depth {
            Depth::D18 => ([2, 2, 2, 2], 1),
            Depth::D50 => ([3, 4, 6, 3], 4),
        };
        let mut cin = 64;
        let mut layers = Vec::new();
        for (li, (&n, width)) in repeats.iter().zip([64, 128, 256, 512]).enumerate() {
            let lvb = vb.pp(format!("layer{}", li + 1));
            let mut blocks = Vec::new();
            for bi in 0..n {
                let bvb = lvb.pp(bi.to_string());
                let stride = if bi == 0 && li > 0 { 2 } else { 1 };
                let cout = width * expansion;
                let convs = match depth {
                    Depth::D18 => vec![
                        ConvBn::new(
                            ConvSpec::new(cin, width, 3, stride, 1),
                            bvb.pp("conv1"),
                            bvb.pp("bn1"),
                        )?,
                        ConvBn::new(
                            ConvSpec::new(width, width, 3, 1, 1),
                            bvb.pp("conv2"),
                            bvb.pp("bn2"),
                        )?,
                    ],
                    // torchvision's v1.5 bottleneck: the stride sits on the 3x3 convolution.
                    Depth::D50 => vec![
                        ConvBn::new(
                            ConvSpec::new(cin, width, 1, 1, 0),
                            bvb.pp("conv1"),
                            bvb.pp("bn1"),
                        )?,
                        ConvBn::new(
                            ConvSpec::new(width, width, 3, stride, 1),
                            bvb.pp("conv2"),
                            bvb.pp("bn2"),
                        )?,
                        ConvBn::new(
                            ConvSpec::new(width, cout, 1, 1, 0),
                            bvb.pp("conv3"),
                            bvb.pp("bn3"),
                        )?,
                    ],
                };
                let downsample = if stride != 1 || cin != cout {
                    let d = bvb.pp("downsample");
                    Some(ConvBn::new(
                        ConvSpec::new(cin, cout, 1, stride, 0),
                        d.pp("0"),
                        d.pp("1"),
                    )?)
                } else {
                    None
                };
                blocks.push(Block {
                    cin,
                    convs,
                    downsample,
                });
                cin = cout;
            }
            layers.push(blocks);
        }
        Ok(ResNet {
            depth,
            stem,
            layers,
            constant: OnceLock::new(),
        })
    }
}

static RESNET18: ArchSpec = ArchSpec {
    name: "resnet18",
    feature_dim: 512,
    min_input: 32,
    default_input: 224,
    imagenet_normalization: Normalization::IMAGENET,
    build: |vb| Ok(Box::new(ResNet::new(Depth::D18, vb)?)),
};

static RESNET50: ArchSpec = ArchSpec {
    name: "resnet50",
    feature_dim: 2048,
    build: |vb| Ok(Box::new(ResNet::new(Depth::D50, vb)?)),
    ..RESNET18
};

impl Arch {
    pub const RESNET18: Arch = Arch::new(&RESNET18);
    pub const RESNET50: Arch = Arch::new(&RESNET50);
}

/// This module's entries in the registry ([`crate::nn::architectures`]).
pub static ARCHITECTURES: &[Arch] = &[Arch::RESNET18, Arch::RESNET50];

impl Backbone for ResNet {
    fn arch(&self) -> Arch {
        match self.depth {
            Depth::D18 => Arch::RESNET18,
            Depth::D50 => Arch::RESNET50,
        }
    }

    fn stem(&self, x: &Tensor, train: bool, blocked: bool) -> Result<Tensor> {
        if blocked {
            return self.stem.forward_blocked(x, Activation::Relu);
        }
        self.stem.forward_act(x, train, Activation::Relu)
    }

    fn body(&self, low: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = max_pool2d(low, 3, 2, 1)?;
        let blocks = self.layers.iter().flatten();
        let n = self.layers.iter().map(Vec::len).sum::<usize>();
        for b in blocks.take(n.saturating_sub(1)) {
            x = b.forward_t(&x, train)?;
        }
        Ok(x)
    }

    fn last_block(&self, body: &Tensor, train: bool) -> Result<Tensor> {
        match self.layers.last().and_then(|l| l.last()) {
            Some(b) => b.forward_t(body, train),
            None => Ok(body.clone()),
        }
    }

    fn blocked_channels(&self) -> Option<(usize, usize)> {
        let last = self.layers.iter().flatten().last()?;
        Some((64, last.cin))
    }

    fn constant_weights(&self) -> bool {
        *self.constant.get_or_init(|| {
            self.stem.is_constant()
                && self
                    .layers
                    .iter()
                    .flatten()
                    .all(|b| b.convs.iter().chain(&b.downsample).all(ConvBn::is_constant))
        })
    }

    fn last_block_prefixes(&self) -> Vec<String> {
        let n = self.layers.last().map_or(0, Vec::len);
        vec![format!(
            "layer{}.{}.",
            self.layers.len(),
            n.saturating_sub(1)
        )]
    }
}
