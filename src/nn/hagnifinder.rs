//! Hagnifinder (Zhang et al. 2023): regression of an H&E image's magnification.
//!
//! backbone → global average pool → FC (width → 200) → FC (200 → 20) → Adaptive Scaling Module → Tanh
//! → FC (20 → 1). As in the authors' code there is no activation between the first two FC layers.
//!
//! The Adaptive Scaling Module (ASM) rescales its input by statistics of the whole batch tensor, treated
//! as constants: X = max|x|, v = unbiased variance of x/X, z = sqrt(2.2 / v), y = x · z / X. Because it
//! depends on the batch, it is only used in the first round of training; the second round (and
//! inference) multiplies by the constant m, the mean of z / X over the training batches, which the
//! checkpoint stores.

use candle_core::{Result, Tensor};
use candle_nn::{Linear, Module, VarBuilder, linear};

use super::backbone::{Arch, Backbone, build};

/// The ASM's target variance: z = sqrt(TARGET_VARIANCE / v).
pub const ASM_TARGET_VARIANCE: f64 = 2.2;

/// How the 20-wide layer is scaled before the Tanh.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scaling {
    /// Round 1: the batch's own factor z / X.
    Adaptive,
    /// Round 2 and inference: the constant mean factor m.
    Constant(f64),
}

/// The ASM factor z / X of one batch tensor (1 when the tensor is all zeros or constant).
pub fn asm_factor(x: &Tensor) -> Result<f64> {
    let v: Vec<f32> = x
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?;
    let big_x = v.iter().fold(0f64, |m, &a| m.max(f64::from(a).abs()));
    if big_x == 0.0 || v.len() < 2 {
        return Ok(1.0);
    }
    let n = v.len() as f64;
    let mean = v.iter().map(|&a| f64::from(a) / big_x).sum::<f64>() / n;
    let var = v
        .iter()
        .map(|&a| (f64::from(a) / big_x - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    if !(var > 0.0 && var.is_finite()) {
        return Ok(1.0 / big_x);
    }
    Ok((ASM_TARGET_VARIANCE / var).sqrt() / big_x)
}

/// y = x · factor, where factor is the batch's ASM factor or the constant m. Returns y and the factor
/// used. The factor is a constant for the gradient.
pub fn adaptive_scale(x: &Tensor, scaling: Scaling) -> Result<(Tensor, f64)> {
    let factor = match scaling {
        Scaling::Adaptive => asm_factor(x)?,
        Scaling::Constant(m) => m,
    };
    Ok((x.affine(factor, 0.0)?, factor))
}

/// The regression head on the pooled features.
pub struct MagnificationHead {
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
}

impl MagnificationHead {
    pub const HIDDEN: usize = 200;
    pub const BOTTLENECK: usize = 20;

    /// Tensors `fc1.*`, `fc2.*`, `fc3.*` under `vb`.
    pub fn new(width: usize, vb: VarBuilder) -> Result<Self> {
        Ok(MagnificationHead {
            fc1: linear(width, Self::HIDDEN, vb.pp("fc1"))?,
            fc2: linear(Self::HIDDEN, Self::BOTTLENECK, vb.pp("fc2"))?,
            fc3: linear(Self::BOTTLENECK, 1, vb.pp("fc3"))?,
        })
    }

    /// Pooled features (N, width) → the 20-wide layer before the ASM.
    pub fn bottleneck(&self, pooled: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(pooled)?)
    }

    /// Pooled features (N, width) → output (N,) and the scale factor used.
    pub fn forward(&self, pooled: &Tensor, scaling: Scaling) -> Result<(Tensor, f64)> {
        let (y, factor) = adaptive_scale(&self.bottleneck(pooled)?, scaling)?;
        let out = self.fc3.forward(&y.tanh()?)?.squeeze(1)?;
        Ok((out, factor))
    }
}

/// A backbone with the Hagnifinder head; the backbone's tensors live under `backbone.`, the head's under
/// `head.`.
pub struct Hagnifinder {
    pub backbone: Box<dyn Backbone>,
    pub head: MagnificationHead,
    /// The head reads every stage's pooled output ([`Backbone::stage_pooled`]), not only the last
    /// convolution's (evaluation only: the backbone is frozen).
    pub multiscale: bool,
}

impl Hagnifinder {
    pub fn new(arch: Arch, multiscale: bool, vb: VarBuilder) -> Result<Self> {
        let backbone = build(arch, vb.pp("backbone"))?;
        let width = if multiscale {
            backbone.stage_pooled_dim()
        } else {
            arch.feature_dim()
        };
        Ok(Hagnifinder {
            head: MagnificationHead::new(width, vb.pp("head"))?,
            backbone,
            multiscale,
        })
    }

    /// The head's input for normalised images: the pooled last convolution, or every stage's.
    pub fn pooled(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.multiscale {
            return self.backbone.stage_pooled(x);
        }
        Ok(self.backbone.forward(x, train)?.pooled)
    }
}

/// What the regression output means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// The magnification itself (the paper).
    #[default]
    Linear,
    /// log2 of the magnification: equal relative errors weigh the same at 2x and at 40x.
    Log2,
}

impl Target {
    pub fn encode(self, magnification: f64) -> f64 {
        match self {
            Target::Linear => magnification,
            Target::Log2 => magnification.max(1e-3).log2(),
        }
    }

    pub fn decode(self, output: f64) -> f64 {
        match self {
            Target::Linear => output,
            Target::Log2 => output.exp2(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Target::Linear => "linear",
            Target::Log2 => "log2",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// The paper's example: [-1, 1, -2, 2, 300] computed by hand.
    #[test]
    fn asm_matches_the_hand_computed_example() {
        let x = Tensor::new(&[-1f32, 1., -2., 2., 300.], &Device::Cpu).unwrap();
        let big_x = 300.0f64;
        let s: Vec<f64> = [-1.0, 1.0, -2.0, 2.0, 300.0]
            .iter()
            .map(|v| v / big_x)
            .collect();
        let mean = s.iter().sum::<f64>() / 5.0;
        let var = s.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 4.0;
        let expected_factor = (2.2 / var).sqrt() / big_x;
        let (y, factor) = adaptive_scale(&x, Scaling::Adaptive).unwrap();
        assert!((factor - expected_factor).abs() < 1e-12 * expected_factor.abs().max(1.0));
        let y: Vec<f32> = y.to_vec1().unwrap();
        for (a, b) in y.iter().zip([-1.0, 1.0, -2.0, 2.0, 300.0]) {
            assert!((f64::from(*a) - b * expected_factor).abs() < 1e-5);
        }
        // The output has the target variance (unbiased) after dividing out nothing: var(y) = 2.2.
        let ym = y.iter().map(|&v| f64::from(v)).sum::<f64>() / 5.0;
        let yv = y.iter().map(|&v| (f64::from(v) - ym).powi(2)).sum::<f64>() / 4.0;
        assert!((yv - 2.2).abs() < 1e-4, "variance {yv}");
    }

    #[test]
    fn asm_on_random_batches_and_degenerate_ones() {
        let x = Tensor::randn(0f32, 3.0, (32, 20), &Device::Cpu).unwrap();
        let (y, _) = adaptive_scale(&x, Scaling::Adaptive).unwrap();
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&a| f64::from(a)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|&a| (f64::from(a) - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0);
        assert!((var - 2.2).abs() < 1e-3, "variance {var}");
        let zeros = Tensor::zeros((4, 20), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(asm_factor(&zeros).unwrap(), 1.0);
        let constant = Tensor::full(2f32, (4, 20), &Device::Cpu).unwrap();
        assert_eq!(asm_factor(&constant).unwrap(), 0.5);
    }

    /// With the constant m, the output of an image does not depend on the rest of its batch.
    #[test]
    fn constant_scaling_is_independent_of_the_batch() {
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let head = MagnificationHead::new(16, vb).unwrap();
        let a = Tensor::randn(0f32, 1.0, (1, 16), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 5.0, (7, 16), &Device::Cpu).unwrap();
        let batch = Tensor::cat(&[&a, &b], 0).unwrap();
        let m = 0.37;
        let alone = head.forward(&a, Scaling::Constant(m)).unwrap().0;
        let within = head.forward(&batch, Scaling::Constant(m)).unwrap().0;
        let alone: Vec<f32> = alone.to_vec1().unwrap();
        let within: Vec<f32> = within.to_vec1().unwrap();
        assert!((alone[0] - within[0]).abs() < 1e-6);
        // The adaptive module, by contrast, depends on the batch.
        let alone = head.forward(&a, Scaling::Adaptive).unwrap().0;
        let within = head.forward(&batch, Scaling::Adaptive).unwrap().0;
        let d = (alone.to_vec1::<f32>().unwrap()[0] - within.to_vec1::<f32>().unwrap()[0]).abs();
        assert!(d > 1e-6);
    }

    #[test]
    fn targets_round_trip() {
        for t in [Target::Linear, Target::Log2] {
            for m in [1.0, 2.5, 20.0, 40.0] {
                assert!((t.decode(t.encode(m)) - m).abs() < 1e-9);
            }
        }
    }
}
