//! BatchNorm in training mode as one operation with an analytic backward.
//!
//! candle-nn's training BatchNorm transposes and copies its input, then runs a dozen broadcast
//! operations, each allocating a full-size tensor, and autograd replays as many backward. Here the
//! batch statistics take one pass over the input, the normalisation one more, and the backward two:
//! per channel, Σdy and Σdy·x̂, then dx = γ/σ · (dy − Σdy/M − x̂·Σdy·x̂/M), dγ = Σdy·x̂, dβ = Σdy.
//! The activation that follows (ReLU, ReLU6) is applied in the same pass, and its gradient (dy kept
//! where the output is strictly inside the activation's range) is read in the same backward passes:
//! no separate tensor, pass or autograd node for it.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, Var, bail};
use rayon::prelude::*;

use super::cpu_conv::{Activation, f32_slice};
use super::simd::{lane_sum, par_filled, vectorized};

/// Per-channel mean and biased variance of an NCHW tensor, (2, C): row 0 the means, row 1 the variances.
struct ChannelStats;

/// Sums over each channel's planes: `f(plane values)` (a plane's sum, in f32 lanes) accumulated
/// over the planes in f64, for every channel.
fn per_channel(
    x: &[f32],
    (n, c, hw): (usize, usize, usize),
    f: impl Fn(usize, &[f32]) -> f32 + Sync,
) -> Vec<f64> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            (0..n)
                .map(|i| {
                    let plane = &x[(i * c + ch) * hw..(i * c + ch + 1) * hw];
                    let mut sum = 0f32;
                    vectorized(|| sum = f(ch, plane));
                    f64::from(sum)
                })
                .sum()
        })
        .collect()
}

fn nchw(l: &Layout) -> Result<(usize, usize, usize)> {
    let (n, c, h, w) = l.shape().dims4()?;
    Ok((n, c, h * w))
}

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "histolens-batch-norm-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "batch-norm input")?;
        let dims @ (n, c, hw) = nchw(l)?;
        let m = (n * hw) as f64;
        let sums = per_channel(x, dims, |_, p| lane_sum(p, p, |v, _| v));
        let means: Vec<f64> = sums.iter().map(|s| s / m).collect();
        // Two passes (deviations from the mean), not E[x²] − E[x]²: no cancellation.
        let vars = per_channel(x, dims, |ch, p| {
            let mean = means[ch] as f32;
            lane_sum(p, p, |v, _| (v - mean) * (v - mean))
        });
        let out: Vec<f32> = means
            .iter()
            .map(|&v| v as f32)
            .chain(vars.iter().map(|v| (v / m) as f32))
            .collect();
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// y = act(γ (x − mean) / sqrt(var + eps) + β) with the batch's statistics (given, one value per
/// channel).
#[derive(Clone)]
struct Normalize {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    act: Activation,
}

impl CustomOp3 for Normalize {
    fn name(&self) -> &'static str {
        "histolens-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "batch-norm input")?;
        let gamma = f32_slice(gs, gl, "batch-norm weight")?;
        let beta = f32_slice(bs, bl, "batch-norm bias")?;
        let (_, c, hw) = nchw(xl)?;
        if gamma.len() != c || beta.len() != c || self.mean.len() != c {
            bail!("batch norm: {c} channels, {} weights", gamma.len())
        }
        // SAFETY: each output plane is zipped with the input plane of the same length.
        let y = unsafe {
            par_filled(x.len(), hw, |plane, out| {
                let ch = plane % c;
                let scale = gamma[ch] * self.inv_std[ch];
                let shift = beta[ch] - self.mean[ch] * scale;
                let (lo, hi) = self.act.bounds();
                vectorized(|| {
                    for (o, &v) in out.iter_mut().zip(&x[plane * hw..]) {
                        o.write((v * scale + shift).max(lo).min(hi));
                    }
                });
            })
        };
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Two passes over the activations, read in place: the sums, then the input gradient.
        let (gy, y) = (grad_y.contiguous()?, y.contiguous()?);
        let sums = x.apply_op3_no_bwd(&gy, &y, &GradSums(self.clone()))?;
        let (dbeta, dgamma) = (sums.get(0)?, sums.get(1)?);
        let dx = x.apply_op3_no_bwd(
            &gy,
            &y,
            &GradInput {
                norm: self.clone(),
                gamma: gamma.to_vec1()?,
                sum: dbeta.to_vec1()?,
                sum_xhat: dgamma.to_vec1()?,
            },
        )?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// (x, dy, y) → (2, C): Σdy and Σdy·x̂ per channel (dβ and dγ), dy through the activation.
struct GradSums(Normalize);

/// (x, dy, y) → dx = γ/σ · (dy − Σdy/M − x̂·Σdy·x̂/M), dy through the activation.
struct GradInput {
    norm: Normalize,
    gamma: Vec<f32>,
    sum: Vec<f32>,
    sum_xhat: Vec<f32>,
}

/// x, dy and y of the same length, as slices.
fn gradient_operands<'a>(
    (xs, xl): (&'a CpuStorage, &Layout),
    (gs, gl): (&'a CpuStorage, &Layout),
    (ys, yl): (&'a CpuStorage, &Layout),
) -> Result<(&'a [f32], &'a [f32], &'a [f32])> {
    let x = f32_slice(xs, xl, "batch-norm input")?;
    let gy = f32_slice(gs, gl, "batch-norm output gradient")?;
    let y = f32_slice(ys, yl, "batch-norm output")?;
    if gy.len() != x.len() || y.len() != x.len() {
        bail!(
            "batch norm: {} gradients and {} outputs for {} values",
            gy.len(),
            y.len(),
            x.len()
        )
    }
    Ok((x, gy, y))
}

impl CustomOp3 for GradSums {
    fn name(&self) -> &'static str {
        "histolens-batch-norm-grad-sums"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gy, y) = gradient_operands((xs, xl), (gs, gl), (ys, yl))?;
        let (n, c, hw) = nchw(xl)?;
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map_init(Vec::new, |passed, ch| {
                let (mut s, mut sx) = (0f64, 0f64);
                let (mean, inv_std) = (self.0.mean[ch], self.0.inv_std[ch]);
                let bounds = self.0.act.bounds();
                for i in 0..n {
                    let at = (i * c + ch) * hw;
                    let (d, v) = (&gy[at..at + hw], &x[at..at + hw]);
                    let (mut ps, mut psx) = (0f32, 0f32);
                    vectorized(|| {
                        // The plane's gradient through the activation, in a buffer that stays in
                        // cache for the two sums.
                        passed.clear();
                        passed.extend(
                            d.iter()
                                .zip(&y[at..at + hw])
                                .map(|(&d, &y)| Activation::pass_gradient(d, y, bounds)),
                        );
                        ps = lane_sum(passed, passed, |d, _| d);
                        psx = lane_sum(passed, v, |d, v| d * (v - mean));
                    });
                    s += f64::from(ps);
                    sx += f64::from(psx * inv_std);
                }
                (s, sx)
            })
            .collect();
        let out: Vec<f32> = sums
            .iter()
            .map(|s| s.0 as f32)
            .chain(sums.iter().map(|s| s.1 as f32))
            .collect();
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

impl CustomOp3 for GradInput {
    fn name(&self) -> &'static str {
        "histolens-batch-norm-grad-input"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gy, y) = gradient_operands((xs, xl), (gs, gl), (ys, yl))?;
        let (n, c, hw) = nchw(xl)?;
        let m = (n * hw) as f32;
        // SAFETY: each output plane is zipped with input planes of the same length.
        let dx = unsafe {
            par_filled(x.len(), hw, |plane, out| {
                let ch = plane % c;
                let (s, sx) = (self.sum[ch] / m, self.sum_xhat[ch] / m);
                let k = self.gamma[ch] * self.norm.inv_std[ch];
                let (mean, inv_std) = (self.norm.mean[ch], self.norm.inv_std[ch]);
                let at = plane * hw;
                let (gy, x, y) = (&gy[at..at + hw], &x[at..at + hw], &y[at..at + hw]);
                let bounds = self.norm.act.bounds();
                vectorized(|| {
                    for (((o, &d), &v), &y) in out.iter_mut().zip(gy).zip(x).zip(y) {
                        let d = Activation::pass_gradient(d, y, bounds);
                        o.write(k * (d - s - (v - mean) * inv_std * sx));
                    }
                });
            })
        };
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// Training-mode BatchNorm of an NCHW f32 tensor on the CPU followed by `act`: normalised with the
/// batch's statistics, differentiable in `x`, `gamma` and `beta`; the running statistics move by
/// `momentum` (the variance unbiased, as PyTorch and candle do).
pub fn batch_norm_train(
    x: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    running: (&Var, &Var),
    (momentum, eps): (f64, f64),
    act: Activation,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let stats = x.detach().apply_op1_no_bwd(&ChannelStats)?;
    let mean: Vec<f32> = stats.get(0)?.to_vec1()?;
    let var: Vec<f32> = stats.get(1)?.to_vec1()?;
    let inv_std = var.iter().map(|&v| 1.0 / (v + eps as f32).sqrt()).collect();
    let (n, _, h, w) = x.dims4()?;
    let m = (n * h * w) as f64;
    let unbiased = (stats.get(1)? * (m / (m - 1.0).max(1.0)))?;
    let (rm, rv) = running;
    rm.set(&((rm.as_tensor() * (1.0 - momentum))? + (stats.get(0)? * momentum)?)?)?;
    rv.set(&((rv.as_tensor() * (1.0 - momentum))? + (unbiased * momentum)?)?)?;
    x.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        Normalize { mean, inv_std, act },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::{BatchNormConfig, ModuleT, VarBuilder, VarMap};

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let s = b.abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1e-6)
    }

    /// Output, running statistics and the three gradients against candle-nn's BatchNorm followed by
    /// candle's relu and clamp.
    #[test]
    fn matches_candle_batch_norm_in_training() {
        for act in [Activation::Identity, Activation::Relu, Activation::Relu6] {
            matches_candle(act);
        }
    }

    fn matches_candle(act: Activation) {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, candle_core::DType::F32, &dev);
        let cfg = BatchNormConfig {
            eps: 1e-3,
            remove_mean: true,
            affine: true,
            momentum: 0.1,
        };
        let bn = candle_nn::batch_norm(5, cfg, vb.pp("bn")).unwrap();
        // Non-trivial affine parameters and running statistics; γ up to 4 so that ReLU6 clips.
        for var in vars.data().lock().unwrap().values() {
            var.set(&Tensor::rand(0.5f32, 4.0, 5, &dev).unwrap())
                .unwrap();
        }
        let get = |n: &str| vars.data().lock().unwrap()[n].clone();
        let (gamma, beta) = (get("bn.weight"), get("bn.bias"));
        let (rm, rv) = (get("bn.running_mean"), get("bn.running_var"));
        let (rm0, rv0) = (
            rm.as_tensor().copy().unwrap(),
            rv.as_tensor().copy().unwrap(),
        );
        let x = Var::from_tensor(
            &(Tensor::randn(0f32, 2., (3, 5, 9, 7), &dev).unwrap() + 1.5).unwrap(),
        )
        .unwrap();
        let weigh = Tensor::randn(0f32, 1., (3, 5, 9, 7), &dev).unwrap();

        let ours = batch_norm_train(
            x.as_tensor(),
            (gamma.as_tensor(), beta.as_tensor()),
            (&rm, &rv),
            (0.1, 1e-3),
            act,
        )
        .unwrap();
        let g1 = (&ours * &weigh)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (rm1, rv1) = (
            rm.as_tensor().copy().unwrap(),
            rv.as_tensor().copy().unwrap(),
        );
        // candle's, from the same running statistics.
        rm.set(&rm0).unwrap();
        rv.set(&rv0).unwrap();
        let normed = bn.forward_t(x.as_tensor(), true).unwrap();
        let theirs = match act {
            Activation::Identity => normed,
            Activation::Relu => normed.relu().unwrap(),
            Activation::Relu6 => normed.clamp(0f32, 6f32).unwrap(),
        };
        let clipped = |v: f32| v <= 0.0 || v >= 6.0;
        let n_clipped = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let n_clipped = n_clipped.into_iter().filter(|&v| clipped(v)).count();
        assert!(
            act == Activation::Identity || n_clipped > 0,
            "{act:?}: nothing clipped, the test would not see the activation"
        );
        let g2 = (&theirs * &weigh)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_rel(&ours, &theirs) < 1e-5, "{act:?}: output");
        assert!(max_rel(&rm1, rm.as_tensor()) < 1e-6, "running mean");
        assert!(max_rel(&rv1, rv.as_tensor()) < 1e-5, "running variance");
        for (what, v) in [("x", &x), ("gamma", &gamma), ("beta", &beta)] {
            let (a, b) = (
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(
                max_rel(a, b) < 1e-4,
                "{act:?}: gradient of {what}: {}",
                max_rel(a, b)
            );
        }
    }
}
