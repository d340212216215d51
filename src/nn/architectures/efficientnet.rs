//! EfficientNet-Lite0 with the tensor names of the ImageNet weights in ../shared/data/weights
//! (efficientnet-pytorch style: `_conv_stem`, `_bn0`, `_blocks.N._expand_conv|_depthwise_conv|_project_conv`,
//! `_bn0..2`, `_conv_head`, `_bn1`). TF "SAME" padding, BatchNorm eps 1e-3, ReLU6, no squeeze-excitation,
//! fixed 32-channel stem and 1280-channel head.

use std::sync::OnceLock;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::backbone::{Arch, ArchSpec, Backbone, Normalization};
use crate::nn::blocked::{global_avg_pool as blocked_avg_pool, is_blocked};
use crate::nn::cpu_conv::add_act;
use crate::nn::layers::{Activation, ConvBn, ConvSpec, Padding};
use crate::nn::pool::global_avg_pool;

/// (expansion, kernel, stride of the first block, output channels, repeats) per stage, as EfficientNet-B0.
const STAGES: [(usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
];
const BN_EPS: f64 = 1e-3;
/// efficientnet-pytorch's batch_norm_momentum 0.99 in TF convention = 0.01 in PyTorch's.
const BN_MOMENTUM: f64 = 0.01;

fn spec(cin: usize, cout: usize, kernel: usize, stride: usize, groups: usize) -> ConvSpec {
    ConvSpec {
        cin,
        cout,
        kernel: (kernel, kernel),
        stride,
        padding: Padding::TfSame,
        groups,
        bn_eps: BN_EPS,
        bn_momentum: BN_MOMENTUM,
    }
}

struct MbConv {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

impl MbConv {
    /// With gradients to the weights but the BatchNorm statistics frozen
    /// ([`ConvBn::forward_frozen_stats`]).
    fn forward_tuned(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.expand {
            Some(e) => e.forward_frozen_stats(x, Activation::Relu6)?,
            None => x.clone(),
        };
        let y = self.depthwise.forward_frozen_stats(&y, Activation::Relu6)?;
        let y = self
            .project
            .forward_frozen_stats(&y, Activation::Identity)?;
        if self.residual {
            return add_act(y, x, Activation::Identity);
        }
        Ok(y)
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train && is_blocked(x) {
            return self.depthwise.forward_blocked_inverted_residual(
                x,
                self.expand.as_ref(),
                &self.project,
                [Activation::Relu6, Activation::Relu6, Activation::Identity],
                self.residual,
            );
        }
        let y = match &self.expand {
            Some(e) => e.forward_act(x, train, Activation::Relu6)?,
            None => x.clone(),
        };
        let y = self.depthwise.forward_act(&y, train, Activation::Relu6)?;
        let y = self.project.forward_t(&y, train)?;
        if self.residual {
            return add_act(y, x, Activation::Identity);
        }
        Ok(y)
    }
}

pub struct EfficientNetLite0 {
    stem: ConvBn,
    blocks: Vec<MbConv>,
    /// (index of the stage's last block, its output channels) per stage.
    stage_ends: Vec<(usize, usize)>,
    head: ConvBn,
    constant: OnceLock<bool>,
}

impl EfficientNetLite0 {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let stem = ConvBn::new(spec(3, 32, 3, 2, 1), vb.pp("_conv_stem"), vb.pp("_bn0"))?;
        let mut blocks = Vec::new();
        let mut stage_ends = Vec::new();
        let mut cin = 32;
        for (expansion, kernel, first_stride, cout, repeats) in STAGES {
            stage_ends.push((blocks.len() + repeats - 1, cout));
            for r in 0..repeats {
                let b = vb.pp("_blocks").pp(blocks.len().to_string());
                let stride = if r == 0 { first_stride } else { 1 };
                let mid = cin * expansion;
                let expand = if expansion != 1 {
                    Some(ConvBn::new(
                        spec(cin, mid, 1, 1, 1),
                        b.pp("_expand_conv"),
                        b.pp("_bn0"),
                    )?)
                } else {
                    None
                };
                let depthwise = ConvBn::new(
                    spec(mid, mid, kernel, stride, mid),
                    b.pp("_depthwise_conv"),
                    b.pp("_bn1"),
                )?;
                let project = ConvBn::new(
                    spec(mid, cout, 1, 1, 1),
                    b.pp("_project_conv"),
                    b.pp("_bn2"),
                )?;
                blocks.push(MbConv {
                    expand,
                    depthwise,
                    project,
                    residual: stride == 1 && cin == cout,
                });
                cin = cout;
            }
        }
        let head = ConvBn::new(spec(cin, 1280, 1, 1, 1), vb.pp("_conv_head"), vb.pp("_bn1"))?;
        Ok(EfficientNetLite0 {
            stem,
            blocks,
            stage_ends,
            head,
            constant: OnceLock::new(),
        })
    }
}

static EFFICIENTNET_LITE0: ArchSpec = ArchSpec {
    name: "efficientnet-lite0",
    feature_dim: 1280,
    min_input: 32,
    default_input: 224,
    imagenet_normalization: Normalization::TFLITE,
    build: |vb| Ok(Box::new(EfficientNetLite0::new(vb)?)),
};

impl Arch {
    pub const EFFICIENTNET_LITE0: Arch = Arch::new(&EFFICIENTNET_LITE0);
}

/// This module's entry in the registry ([`crate::nn::architectures`]).
pub static ARCHITECTURES: &[Arch] = &[Arch::EFFICIENTNET_LITE0];

/// The global average of `t` (`channels` wide), blocked or NCHW.
fn pool_any(t: &Tensor, channels: usize, blocked: bool) -> Result<Tensor> {
    if blocked {
        blocked_avg_pool(t, channels)
    } else {
        global_avg_pool(t)
    }
}

impl EfficientNetLite0 {
    /// Evaluation mode: `x` → the output of the stem and the first `k` stages (in the layout
    /// `blocked` says), the pooled average of each, and the channels of the output.
    fn prefix_pooled(
        &self,
        x: &Tensor,
        k: usize,
        blocked: bool,
    ) -> Result<(Tensor, Vec<Tensor>, usize)> {
        let mut t = self.stem(x, false, blocked)?;
        let mut parts = vec![pool_any(&t, 32, blocked)?];
        let mut channels = 32;
        for (s, &(end, c)) in self.stage_ends[..k].iter().enumerate() {
            let first = if s == 0 {
                0
            } else {
                self.stage_ends[s - 1].0 + 1
            };
            for b in &self.blocks[first..=end] {
                t = b.forward_t(&t, false)?;
            }
            parts.push(pool_any(&t, c, blocked)?);
            channels = c;
        }
        Ok((t, parts, channels))
    }

    /// The first block after the first `k` stages.
    fn first_block_after(&self, k: usize) -> usize {
        self.stage_ends[..k.min(self.stage_ends.len())]
            .last()
            .map_or(0, |e| e.0 + 1)
    }
}

impl Backbone for EfficientNetLite0 {
    fn arch(&self) -> Arch {
        Arch::EFFICIENTNET_LITE0
    }

    fn stem(&self, x: &Tensor, train: bool, blocked: bool) -> Result<Tensor> {
        if blocked {
            return self.stem.forward_blocked(x, Activation::Relu6);
        }
        self.stem.forward_act(x, train, Activation::Relu6)
    }

    fn body(&self, low: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = low.clone();
        for b in &self.blocks {
            x = b.forward_t(&x, train)?;
        }
        Ok(x)
    }

    /// The 1x1 head convolution (320 → 1280 channels).
    fn last_block(&self, body: &Tensor, train: bool) -> Result<Tensor> {
        self.head.forward_act(body, train, Activation::Relu6)
    }

    fn blocked_channels(&self) -> Option<(usize, usize)> {
        Some((32, 320))
    }

    fn stage_pooled_dim(&self) -> usize {
        32 + self.stage_ends.iter().map(|s| s.1).sum::<usize>() + 1280
    }

    fn stage_pooled(&self, x: &Tensor) -> Result<Tensor> {
        let blocked = self.blocked_here(x, false);
        let run = || -> Result<Tensor> {
            let (t, mut parts, _) = self.prefix_pooled(x, self.stage_ends.len(), blocked)?;
            let high = self.head.forward_act(&t, false, Activation::Relu6)?;
            parts.push(pool_any(&high, 1280, blocked)?);
            Tensor::cat(&parts, 1)
        };
        if blocked {
            crate::nn::blocked::on_worker(run)
        } else {
            run()
        }
    }

    fn stage_count(&self) -> usize {
        self.stage_ends.len()
    }

    fn stage_prefix(&self, x: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
        if k > self.stage_ends.len() {
            candle_core::bail!(
                "EfficientNet-Lite0 has {} stages, not {k}",
                self.stage_ends.len()
            );
        }
        let blocked = self.blocked_here(x, false);
        let run = || -> Result<(Tensor, Tensor)> {
            let (t, parts, channels) = self.prefix_pooled(x, k, blocked)?;
            let t = if blocked {
                crate::nn::blocked::to_nchw(&t, channels)?
            } else {
                t
            };
            Ok((t, Tensor::cat(&parts, 1)?))
        };
        if blocked {
            crate::nn::blocked::on_worker(run)
        } else {
            run()
        }
    }

    fn stage_suffix(&self, t: &Tensor, k: usize, tune: bool) -> Result<Tensor> {
        let first = self.first_block_after(k);
        let mut t = t.clone();
        let mut parts = Vec::new();
        for (i, b) in self.blocks.iter().enumerate().skip(first) {
            t = if tune {
                b.forward_tuned(&t)?
            } else {
                b.forward_t(&t, false)?
            };
            if self.stage_ends.iter().any(|e| e.0 == i) {
                parts.push(global_avg_pool(&t)?);
            }
        }
        let high = if tune {
            self.head.forward_frozen_stats(&t, Activation::Relu6)?
        } else {
            self.head.forward_act(&t, false, Activation::Relu6)?
        };
        parts.push(global_avg_pool(&high)?);
        Tensor::cat(&parts, 1)
    }

    fn stage_suffix_prefixes(&self, k: usize) -> Vec<String> {
        let first = self.first_block_after(k);
        (first..self.blocks.len())
            .map(|i| format!("_blocks.{i}."))
            .chain(self.last_block_prefixes())
            .collect()
    }

    fn constant_weights(&self) -> bool {
        *self.constant.get_or_init(|| {
            self.stem.is_constant()
                && self.head.is_constant()
                && self.blocks.iter().all(|b| {
                    b.expand
                        .iter()
                        .chain([&b.depthwise, &b.project])
                        .all(ConvBn::is_constant)
                })
        })
    }

    fn last_block_prefixes(&self) -> Vec<String> {
        vec!["_conv_head.".into(), "_bn1.".into()]
    }
}
