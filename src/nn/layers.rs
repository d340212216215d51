//! Building blocks shared by the backbones: convolution + BatchNorm, TF "SAME" padding, activations.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{BatchNorm, BatchNormConfig, ModuleT, VarBuilder};

use super::blocked::{self, PackedConv};
pub use super::cpu_conv::Activation;
use super::cpu_conv::{self, Geometry, Pad};

/// How a convolution pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Zeros above/below (first) and left/right (second), as PyTorch's `padding=(ph, pw)`.
    Symmetric(usize, usize),
    /// TensorFlow's "SAME": output = ceil(input / stride), extra padding on the bottom/right.
    TfSame,
}

/// Settings of one ConvBn.
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    pub cin: usize,
    pub cout: usize,
    /// Kernel height and width.
    pub kernel: (usize, usize),
    pub stride: usize,
    pub padding: Padding,
    pub groups: usize,
    pub bn_eps: f64,
    /// PyTorch convention: running = (1 - momentum) · running + momentum · batch.
    pub bn_momentum: f64,
}

impl ConvSpec {
    /// A square `kernel` with the same `padding` on every side.
    pub fn new(cin: usize, cout: usize, kernel: usize, stride: usize, padding: usize) -> Self {
        ConvSpec {
            cin,
            cout,
            kernel: (kernel, kernel),
            stride,
            padding: Padding::Symmetric(padding, padding),
            groups: 1,
            bn_eps: 1e-5,
            bn_momentum: 0.1,
        }
    }

    /// A rectangular kernel (kh, kw) with padding (ph, pw), stride 1.
    pub fn rect(cin: usize, cout: usize, kernel: (usize, usize), padding: (usize, usize)) -> Self {
        ConvSpec {
            kernel,
            padding: Padding::Symmetric(padding.0, padding.1),
            ..ConvSpec::new(cin, cout, 1, 1, 0)
        }
    }

    pub fn eps(mut self, eps: f64) -> Self {
        self.bn_eps = eps;
        self
    }
}

/// A bias-free convolution followed by BatchNorm, with separate weight prefixes as in torchvision
/// (`conv1` + `bn1`, `Conv2d_1a_3x3.conv` + `.bn`) and efficientnet-pytorch (`_conv_stem` + `_bn0`).
#[derive(Debug, Clone)]
pub struct ConvBn {
    weight: Tensor,
    bn: BatchNorm,
    /// The BatchNorm's running statistics as variables (weights being trained), for the fused
    /// training path ([`super::batch_norm`]); None for constants.
    running: Option<(Var, Var)>,
    spec: ConvSpec,
    /// The folded evaluation weights, kept when they are constants (weights loaded for inference).
    folded: OnceLock<(Tensor, Tensor)>,
    /// The folded weights packed for the blocked kernels, for an NCHW input and for a blocked one.
    packed: Box<[OnceLock<Arc<PackedConv>>; 2]>,
}

impl ConvBn {
    pub fn new(spec: ConvSpec, conv_vb: VarBuilder, bn_vb: VarBuilder) -> Result<Self> {
        let (kh, kw) = spec.kernel;
        let weight = conv_vb.get_with_hints(
            (spec.cout, spec.cin / spec.groups, kh, kw),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bn_cfg = BatchNormConfig {
            eps: spec.bn_eps,
            remove_mean: true,
            affine: true,
            momentum: spec.bn_momentum,
        };
        let bn = candle_nn::batch_norm(spec.cout, bn_cfg, bn_vb.clone())?;
        // The same tensors candle's BatchNorm holds (a VarMap gives back its variables).
        let stat = |name| bn_vb.get_with_hints(spec.cout, name, candle_nn::Init::Const(0.));
        let (mean, var) = (stat("running_mean")?, stat("running_var")?);
        let running = (mean.is_variable() && var.is_variable())
            .then(|| {
                Ok::<_, candle_core::Error>((Var::from_tensor(&mean)?, Var::from_tensor(&var)?))
            })
            .transpose()?;
        Ok(ConvBn {
            weight,
            bn,
            running,
            spec,
            folded: OnceLock::new(),
            packed: Default::default(),
        })
    }

    /// Convolution and BatchNorm (batch statistics and running-statistics updates when `train`).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act(x, train, Activation::Identity)
    }

    /// `act(BatchNorm(conv(x)))`. In evaluation the BatchNorm is folded into the convolution and, with
    /// constant weights and an input that tracks no gradient, runs on the fast CPU path.
    /// A blocked `x` (evaluation only) gives a blocked result.
    pub fn forward_act(&self, x: &Tensor, train: bool, act: Activation) -> Result<Tensor> {
        if !train && blocked::is_blocked(x) {
            return self.forward_blocked(x, act);
        }
        let s = &self.spec;
        let pad = self.padding(x)?;
        let geo = Geometry {
            stride: s.stride,
            pad,
            groups: s.groups,
        };
        if train {
            let own = self.own_training_ops(x);
            let y = self.conv_differentiable(x, &self.weight, pad)?;
            return match (&self.running, self.bn.weight_and_bias()) {
                (Some((mean, var)), Some((gamma, beta))) if own => {
                    // Normalisation and activation in one operation.
                    super::batch_norm::batch_norm_train(
                        &y,
                        (gamma, beta),
                        (mean, var),
                        (self.spec.bn_momentum, self.spec.bn_eps),
                        act,
                    )
                }
                _ => act.apply_tensor(&self.bn.forward_t(&y, true)?),
            };
        }
        let (w, b) = self.folded()?;
        cpu_conv::conv2d(x, &w, &b, geo, act)
    }

    /// `act(BatchNorm(conv(x)))` with gradients to the weights but the BatchNorm's running
    /// statistics frozen (not batch statistics, not updated): the fine-tuning of a pretrained
    /// backbone's later layers that keeps the normalisation its frozen layers were trained with.
    pub fn forward_frozen_stats(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let (w, b) = self.fold()?;
        let y = self.conv_differentiable(x, &w, self.padding(x)?)?;
        act.apply_tensor(&y.broadcast_add(&b.reshape((1, self.spec.cout, 1, 1))?)?)
    }

    /// histolens's training operations apply: f32 on the CPU.
    fn own_training_ops(&self, x: &Tensor) -> bool {
        x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32
    }

    /// The convolution of `x` by `w` (this layer's geometry) with gradients to both.
    fn conv_differentiable(&self, x: &Tensor, w: &Tensor, pad: Pad) -> Result<Tensor> {
        let s = &self.spec;
        let own = self.own_training_ops(x);
        if own && self.depthwise() {
            // One operation per layer (candle: one per channel, forward and backward).
            super::depthwise::depthwise_conv2d(x, w, s.stride, pad)
        } else if own && s.groups == 1 {
            // Both gradients on the GEMM (candle: a direct transposed convolution).
            super::conv_train::conv2d_train(x, w, s.stride, pad)
        } else if pad == Pad::symmetric(pad.top, pad.top) {
            x.conv2d(w, pad.top, s.stride, 1, s.groups)
        } else {
            x.pad_with_zeros(2, pad.top, pad.bottom)?
                .pad_with_zeros(3, pad.left, pad.right)?
                .conv2d(w, 0, s.stride, 1, s.groups)
        }
    }

    /// Whether the weights are constants (loaded for inference, not trained).
    pub fn is_constant(&self) -> bool {
        !self.weight.track_op()
            && self
                .bn
                .weight_and_bias()
                .is_none_or(|(g, b)| !g.track_op() && !b.track_op())
    }

    /// `act(BatchNorm(conv(x)))` in evaluation, blocked: `x` is NCHW (a network's first convolution)
    /// or blocked, the result is blocked. Needs constant weights and the blocked kernels
    /// (`blocked::applies`); grouped convolutions other than depthwise take the NCHW path.
    pub fn forward_blocked(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let s = &self.spec;
        if !self.blocked_kind() {
            let y = self.forward_act(&blocked::to_nchw(x, s.cin)?, false, act)?;
            return blocked::to_blocked(&y);
        }
        blocked::conv(x, &self.packed(x)?, self.padding(x)?, act)
    }

    /// `act(BatchNorm(conv(x)) + residual)` in evaluation, all blocked: a residual block's end, the
    /// addition fused into the convolution.
    pub fn forward_blocked_add(
        &self,
        x: &Tensor,
        residual: &Tensor,
        act: Activation,
    ) -> Result<Tensor> {
        if !self.blocked_kind() || self.depthwise() || !blocked::is_blocked(x) {
            let y = self.forward_blocked(x, Activation::Identity)?;
            return cpu_conv::add_act(y, residual, act);
        }
        blocked::conv_add(x, residual, &self.packed(x)?, self.padding(x)?, act)
    }

    /// A whole inverted-residual block in evaluation, all blocked, with `self` its depthwise
    /// convolution: `acts[2](project(acts[1](self(acts[0](expand(x))))))`, plus `x` where
    /// `residual`, in one kernel call that never writes the expanded activation whole (see
    /// `histolens_kernels::inverted_residual`). Shapes the kernel does not take run layer by layer.
    pub fn forward_blocked_inverted_residual(
        &self,
        x: &Tensor,
        expand: Option<&ConvBn>,
        project: &ConvBn,
        acts: [Activation; 3],
        residual: bool,
    ) -> Result<Tensor> {
        let pointwise = |c: &ConvBn| {
            let s = &c.spec;
            s.kernel == (1, 1) && s.stride == 1 && s.groups == 1
        };
        let fits = self.depthwise()
            && expand.is_none_or(|e| pointwise(e) && e.spec.cout == self.spec.cin)
            && pointwise(project)
            && project.spec.cin == self.spec.cout
            && blocked::is_blocked(x);
        if !fits {
            let y = match expand {
                Some(e) => e.forward_blocked(x, acts[0])?,
                None => x.clone(),
            };
            let y = self.forward_blocked(&y, acts[1])?;
            return match residual {
                true => project.forward_blocked_add(&y, x, acts[2]),
                false => project.forward_blocked(&y, acts[2]),
            };
        }
        // Every convolution of the block reads an input of x's layout; the depthwise one x's size.
        let e = expand.map(|e| e.packed(x)).transpose()?;
        blocked::inverted_residual(
            x,
            e.as_ref().map(|e| (e, acts[0].into())),
            (&self.packed(x)?, self.padding(x)?, acts[1].into()),
            (&project.packed(x)?, acts[2].into()),
            residual,
        )
    }

    fn depthwise(&self) -> bool {
        let s = &self.spec;
        s.groups == s.cin && s.cin == s.cout && s.groups > 1
    }

    /// Whether the blocked kernels take this convolution (dense or depthwise; other groupings not).
    fn blocked_kind(&self) -> bool {
        self.spec.groups == 1 || self.depthwise()
    }

    /// The folded weights packed for an input in `x`'s layout, made once.
    fn packed(&self, x: &Tensor) -> Result<Arc<PackedConv>> {
        let Some(isa) = blocked::isa() else {
            candle_core::bail!("blocked convolution without the blocked kernels")
        };
        let s = &self.spec;
        let input = if blocked::is_blocked(x) {
            blocked::Input::Blocked
        } else {
            blocked::Input::Nchw
        };
        let slot = &self.packed[(input == blocked::Input::Blocked) as usize];
        if let Some(p) = slot.get() {
            return Ok(p.clone());
        }
        let (w, b) = self.folded()?;
        let spec = blocked::ConvSpec {
            cin: s.cin,
            cout: s.cout,
            kh: s.kernel.0,
            kw: s.kernel.1,
            stride: s.stride,
            depthwise: self.depthwise(),
        };
        let p = PackedConv::new(
            isa,
            spec,
            input,
            &w.flatten_all()?.to_vec1::<f32>()?,
            &b.to_vec1::<f32>()?,
        )
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(slot.get_or_init(|| Arc::new(p)).clone())
    }

    /// The zero padding of an input of `x`'s size (NCHW or blocked).
    fn padding(&self, x: &Tensor) -> Result<Pad> {
        let s = &self.spec;
        Ok(match s.padding {
            Padding::TfSame => {
                let (h, w) = blocked::spatial(x)?;
                let (top, bottom) = tf_same_split(h, s.kernel.0, s.stride);
                let (left, right) = tf_same_split(w, s.kernel.1, s.stride);
                Pad {
                    top,
                    bottom,
                    left,
                    right,
                }
            }
            Padding::Symmetric(ph, pw) => Pad::symmetric(ph, pw),
        })
    }

    /// The folded evaluation weights, cached when they are constants.
    fn folded(&self) -> Result<(Tensor, Tensor)> {
        if let Some(f) = self.folded.get() {
            return Ok(f.clone());
        }
        let f = self.fold()?;
        if !f.0.track_op() && !f.1.track_op() {
            let _ = self.folded.set(f.clone());
        }
        Ok(f)
    }

    /// Weight and bias of the convolution with the BatchNorm's running statistics folded in:
    /// w' = w · γ/√(σ²+ε), b' = β − μ · γ/√(σ²+ε).
    fn fold(&self) -> Result<(Tensor, Tensor)> {
        let cout = self.spec.cout;
        // The running statistics are buffers (candle keeps them in Vars to update them): no gradient.
        let mean = self.bn.running_mean().detach();
        let inv_std = (self.bn.running_var().detach() + self.bn.eps())?
            .sqrt()?
            .recip()?;
        let (scale, shift) = match self.bn.weight_and_bias() {
            Some((g, beta)) => {
                let scale = (g * &inv_std)?;
                let shift = (beta - (mean * &scale)?)?;
                (scale, shift)
            }
            None => (inv_std.clone(), (mean * &inv_std)?.neg()?),
        };
        let w = self
            .weight
            .broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?
            .contiguous()?;
        Ok((w, shift.contiguous()?))
    }
}

/// TensorFlow's "SAME" padding (before, after) of one dimension of `len` for `kernel` with `stride`.
fn tf_same_split(len: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let total = (len.div_ceil(stride).saturating_sub(1) * stride + kernel).saturating_sub(len);
    (total / 2, total - total / 2)
}

/// Pads (N, C, H, W) as TensorFlow's "SAME" does for a `kernel` with `stride`.
pub fn tf_same_pad(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (top, bottom) = tf_same_split(h, kernel, stride);
    let (left, right) = tf_same_split(w, kernel, stride);
    x.pad_with_zeros(2, top, bottom)?
        .pad_with_zeros(3, left, right)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn tf_same_padding_matches_tensorflow() {
        let x = Tensor::zeros((1, 1, 224, 224), candle_core::DType::F32, &Device::Cpu).unwrap();
        // 3x3 stride 2 on 224: output 112, total padding 1, all of it bottom/right.
        assert_eq!(tf_same_pad(&x, 3, 2).unwrap().dims(), &[1, 1, 225, 225]);
        // 5x5 stride 1: 2 each side.
        assert_eq!(tf_same_pad(&x, 5, 1).unwrap().dims(), &[1, 1, 228, 228]);
        let x = Tensor::zeros((1, 1, 7, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(tf_same_pad(&x, 3, 2).unwrap().dims(), &[1, 1, 9, 9]);
    }
}

#[cfg(test)]
mod fold_tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn folded_batchnorm_equals_conv_then_batchnorm() {
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let c = ConvBn::new(ConvSpec::rect(3, 4, (3, 1), (1, 0)), vb.pp("c"), vb.pp("b")).unwrap();
        for (name, var) in vars.data().lock().unwrap().iter() {
            if name.starts_with("b.") {
                var.set(&Tensor::rand(0.5f32, 1.5, 4, &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        let x = Tensor::rand(-1f32, 1., (2, 3, 6, 5), &Device::Cpu).unwrap();
        let reference =
            c.bn.forward_t(
                &x.pad_with_zeros(2, 1, 1)
                    .unwrap()
                    .conv2d(&c.weight, 0, 1, 1, 1)
                    .unwrap(),
                false,
            )
            .unwrap();
        let folded = c.forward_t(&x, false).unwrap();
        let d = (reference - folded)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
    }
}
