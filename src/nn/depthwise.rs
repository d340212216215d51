//! Depthwise convolution for training: forward and backward as direct loops over each channel's plane.
//!
//! candle runs a grouped convolution as one convolution per group, and its backward likewise: for a
//! depthwise layer of 1152 channels, thousands of tiny operations per layer and per step. Here one
//! custom operation computes the whole layer, and its backward two more: the gradient of the input (the
//! output gradient scattered back through the kernel) and of the weights (each channel's correlation
//! of the input with the output gradient), planes in parallel.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::conv_train::{Geo, Planes};
use super::cpu_conv::f32_slice;
use super::simd::{lane_sum, vectorized};
use histolens_kernels::Pad;

/// `y = depthwise_conv(x, w)`: x (N, C, H, W), w (C, 1, kh, kw), f32 on the CPU; differentiable in both.
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: Pad) -> Result<Tensor> {
    let (c, one, kh, kw) = w.dims4()?;
    if one != 1 || x.dim(1)? != c {
        bail!(
            "depthwise convolution: weights {:?} for an input of {:?}",
            w.dims(),
            x.dims()
        )
    }
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        Forward(Geo {
            stride,
            pad,
            kh,
            kw,
        }),
    )
}

struct Forward(Geo);
/// (grad_y, w) → grad_x, for an input of (h, w).
struct GradInput(Geo, usize, usize);
/// (x, grad_y) → grad_w.
struct GradWeight(Geo);

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "histolens-depthwise-conv"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = f32_slice(xs, xl, "depthwise input")?;
        let wt = f32_slice(ws, wl, "depthwise weights")?;
        let (n, c, h, w) = xl.shape().dims4()?;
        let (oh, ow) = g.output(h, w)?;
        let p = Planes { h, w, oh, ow };
        let taps = g.kh * g.kw;
        let mut y = vec![0f32; n * c * oh * ow];
        y.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .enumerate()
            .for_each_init(Scratch::default, |scratch, (plane, (out, xin))| {
                let k = &wt[(plane % c) * taps..(plane % c + 1) * taps];
                vectorized(|| scratch.forward(g, p, xin, k, out));
            });
        Ok((CpuStorage::F32(y), Shape::from((n, c, oh, ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, h, wd) = x.dims4()?;
        let gy = grad_y.contiguous()?;
        let gx = gy.apply_op2_no_bwd(w, &GradInput(self.0, h, wd))?;
        let gw = x.apply_op2_no_bwd(&gy, &GradWeight(self.0))?;
        Ok((Some(gx), Some(gw)))
    }
}

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "histolens-depthwise-conv-grad-input"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let GradInput(g, h, w) = *self;
        let gy = f32_slice(gs, gl, "depthwise output gradient")?;
        let wt = f32_slice(ws, wl, "depthwise weights")?;
        let (n, c, oh, ow) = gl.shape().dims4()?;
        let p = Planes { h, w, oh, ow };
        let taps = g.kh * g.kw;
        let mut gx = vec![0f32; n * c * h * w];
        gx.par_chunks_mut(h * w)
            .zip(gy.par_chunks(oh * ow))
            .enumerate()
            .for_each_init(Scratch::default, |scratch, (plane, (out, gin))| {
                let k = &wt[(plane % c) * taps..(plane % c + 1) * taps];
                vectorized(|| scratch.grad_input(g, p, gin, k, out));
            });
        Ok((CpuStorage::F32(gx), Shape::from((n, c, h, w))))
    }
}

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "histolens-depthwise-conv-grad-weight"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = f32_slice(xs, xl, "depthwise input")?;
        let gy = f32_slice(gs, gl, "depthwise output gradient")?;
        let (n, c, h, w) = xl.shape().dims4()?;
        let (_, _, oh, ow) = gl.shape().dims4()?;
        let p = Planes { h, w, oh, ow };
        let mut gw = vec![0f32; c * g.kh * g.kw];
        gw.par_chunks_mut(g.kh * g.kw).enumerate().for_each_init(
            Scratch::default,
            |scratch, (ch, k)| {
                for img in 0..n {
                    let plane = img * c + ch;
                    let xin = &x[plane * h * w..(plane + 1) * h * w];
                    let gin = &gy[plane * oh * ow..(plane + 1) * oh * ow];
                    vectorized(|| scratch.grad_weight(g, p, xin, gin, k));
                }
            },
        );
        Ok((CpuStorage::F32(gw), Shape::from((c, 1, g.kh, g.kw))))
    }
}

/// Zero-padded planes: with the stride-1 output computed at the padded width `wp` (its last `kw - 1`
/// columns discarded), every kernel tap is one shift of the flattened plane. The forward and the
/// input gradient run [`LANES`] outputs at a time with every tap accumulated in registers (one store
/// per output, the input rows read from L1); the weight gradient is one dot product per tap. A
/// stride s > 1 reads the stride-1 plan: the forward keeps every s-th row and column, and the output
/// gradient is spread to every s-th row and column of a zero plane (unit-stride vector loops doing
/// s² the multiplications beat strided scalar ones).
#[derive(Default)]
struct Scratch {
    /// The input (or its gradient), padded: `hp` rows of `wp`, and slack for the last block.
    padded: Vec<f32>,
    /// The output gradient at stride-1 places of the padded width (`hp - kh + 1` rows of `wp`),
    /// after a margin of zeros (the input gradient reads it at negative tap offsets) and with slack
    /// for the last block.
    wide: Vec<f32>,
    /// One stride-1 output row, of which a strided forward keeps every s-th value.
    line: Vec<f32>,
    /// Where each tap reads, relative to a block's first output.
    offsets: Vec<usize>,
}

/// Outputs computed together, in registers (two AVX vectors).
const LANES: usize = 16;

impl Scratch {
    /// (wp, the padded plane's length with its slack, the stride-1 output's length).
    #[inline(always)]
    fn sizes(g: Geo, p: Planes) -> (usize, usize, usize) {
        let wp = p.w + g.pad.left + g.pad.right;
        let hp = p.h + g.pad.top + g.pad.bottom;
        (
            wp,
            hp * wp + g.kw + g.stride + LANES,
            (hp + 1).saturating_sub(g.kh) * wp,
        )
    }

    /// Σ over the taps t of k[t] · src[at + offset(t) + l], for l < out.len() ≤ [`LANES`].
    #[inline(always)]
    fn block(src: &[f32], at: usize, offsets: &[usize], k: &[f32], out: &mut [f32]) {
        let mut acc = [0f32; LANES];
        for (&off, &kv) in offsets.iter().zip(k) {
            let s = &src[at + off..at + off + LANES];
            for l in 0..LANES {
                acc[l] += kv * s[l];
            }
        }
        out.copy_from_slice(&acc[..out.len()]);
    }

    /// Offset of tap (ky, kx) in the padded plane.
    #[inline(always)]
    fn tap(g: Geo, wp: usize, t: usize) -> usize {
        (t / g.kw) * wp + t % g.kw
    }

    #[inline(always)]
    fn pad_input(&mut self, g: Geo, p: Planes, xin: &[f32]) -> usize {
        let (wp, len, _) = Self::sizes(g, p);
        zeroed(&mut self.padded, len);
        for (y, row) in xin.chunks_exact(p.w).enumerate() {
            let at = (y + g.pad.top) * wp + g.pad.left;
            self.padded[at..at + p.w].copy_from_slice(row);
        }
        wp
    }

    /// The output gradient at the padded width after `margin` zeros; returns `wp`.
    #[inline(always)]
    fn widen_output(&mut self, g: Geo, p: Planes, gin: &[f32], margin: usize) -> usize {
        let (wp, len, _) = Self::sizes(g, p);
        // The input gradient's blocks read up to the padded plane's length past the margin.
        zeroed(&mut self.wide, margin + len);
        let s = g.stride;
        for (y, row) in gin.chunks_exact(p.ow).enumerate() {
            let at = margin + s * y * wp;
            if s == 1 {
                self.wide[at..at + p.ow].copy_from_slice(row);
            } else {
                for (d, &v) in self.wide[at..].iter_mut().step_by(s).zip(row) {
                    *d = v;
                }
            }
        }
        wp
    }

    #[inline(always)]
    fn forward(&mut self, g: Geo, p: Planes, xin: &[f32], k: &[f32], out: &mut [f32]) {
        let wp = self.pad_input(g, p, xin);
        self.offsets.clear();
        self.offsets
            .extend((0..k.len()).map(|t| Self::tap(g, wp, t)));
        let s = g.stride;
        for (oy, row) in out.chunks_exact_mut(p.ow).enumerate() {
            let at = s * oy * wp;
            if s == 1 {
                for (c, o) in row.chunks_mut(LANES).enumerate() {
                    Self::block(&self.padded, at + c * LANES, &self.offsets, k, o);
                }
            } else {
                zeroed(&mut self.line, s * p.ow);
                for (c, o) in self.line.chunks_mut(LANES).enumerate() {
                    Self::block(&self.padded, at + c * LANES, &self.offsets, k, o);
                }
                for (o, &v) in row.iter_mut().zip(self.line.iter().step_by(s)) {
                    *o = v;
                }
            }
        }
    }

    /// dx at padded position j is Σ_t k[t] · dy_wide[j − offset(t)]: the forward's blocks over
    /// the output gradient shifted the other way (a margin of zeros in front of it).
    #[inline(always)]
    fn grad_input(&mut self, g: Geo, p: Planes, gin: &[f32], k: &[f32], out: &mut [f32]) {
        let (wp, _, _) = Self::sizes(g, p);
        let margin = Self::tap(g, wp, k.len() - 1);
        self.widen_output(g, p, gin, margin);
        self.offsets.clear();
        self.offsets
            .extend((0..k.len()).map(|t| margin - Self::tap(g, wp, t)));
        for (y, row) in out.chunks_exact_mut(p.w).enumerate() {
            let at = (y + g.pad.top) * wp + g.pad.left;
            for (c, o) in row.chunks_mut(LANES).enumerate() {
                Self::block(&self.wide, at + c * LANES, &self.offsets, k, o);
            }
        }
    }

    #[inline(always)]
    fn grad_weight(&mut self, g: Geo, p: Planes, xin: &[f32], gin: &[f32], k: &mut [f32]) {
        let wp = self.pad_input(g, p, xin);
        self.widen_output(g, p, gin, 0);
        let (_, _, n) = Self::sizes(g, p);
        for (t, kv) in k.iter_mut().enumerate() {
            let off = Self::tap(g, wp, t);
            *kv += lane_sum(&self.wide[..n], &self.padded[off..off + n], |x, y| x * y);
        }
    }
}

/// `buf` as `len` zeros, keeping its allocation.
#[inline(always)]
fn zeroed(buf: &mut Vec<f32>, len: usize) {
    buf.clear();
    buf.resize(len, 0.0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// candle's own grouped convolution, the reference (symmetric padding only).
    fn reference(x: &Tensor, w: &Tensor, stride: usize, pad: Pad) -> Result<Tensor> {
        let c = w.dim(0)?;
        x.pad_with_zeros(2, pad.top, pad.bottom)?
            .pad_with_zeros(3, pad.left, pad.right)?
            .conv2d(w, 0, stride, 1, c)
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let s = b.abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1e-6)
    }

    /// Forward and both gradients against candle's grouped convolution, for strides 1 and 2,
    /// symmetric and asymmetric ("same" TF) padding, 3x3 and 5x5 kernels, odd and even sizes.
    #[test]
    fn matches_candles_grouped_convolution_and_its_gradients() {
        let dev = Device::Cpu;
        let cases = [
            (3, 1, Pad::symmetric(1, 1), 9, 9),
            (3, 2, Pad::symmetric(1, 1), 10, 7),
            (5, 2, Pad::symmetric(2, 2), 11, 12),
            (
                3,
                2,
                Pad {
                    top: 0,
                    bottom: 1,
                    left: 0,
                    right: 1,
                },
                8,
                8,
            ),
            (5, 1, Pad::symmetric(0, 0), 7, 9),
            // Rows longer than a vector, with remainders.
            (3, 1, Pad::symmetric(1, 1), 5, 37),
            (5, 2, Pad::symmetric(2, 2), 6, 41),
        ];
        for (k, stride, pad, h, w) in cases {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1., (2, 6, h, w), &dev).unwrap()).unwrap();
            let wt =
                Var::from_tensor(&Tensor::randn(0f32, 1., (6, 1, k, k), &dev).unwrap()).unwrap();
            let ours = depthwise_conv2d(x.as_tensor(), wt.as_tensor(), stride, pad).unwrap();
            let theirs = reference(x.as_tensor(), wt.as_tensor(), stride, pad).unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "k {k} s {stride} {pad:?}");
            assert!(
                max_rel(&ours, &theirs) < 1e-5,
                "forward, k {k} s {stride} {pad:?}"
            );
            // A loss that weighs every output differently. candle's own backward of a strided
            // convolution fails when the stride leaves a remainder (its transposed convolution has no
            // output padding): those cases are checked against finite differences below.
            let weigh = Tensor::randn(0f32, 1., ours.dims(), &dev).unwrap();
            let g1 = (&ours * &weigh)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let exact = (h + pad.top + pad.bottom - k) % stride == 0
                && (w + pad.left + pad.right - k) % stride == 0;
            if !exact {
                continue;
            }
            let g2 = (&theirs * &weigh)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &wt] {
                let (a, b) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert!(max_rel(a, b) < 1e-4, "gradient, k {k} s {stride} {pad:?}");
            }
        }
    }

    /// Both gradients against finite differences, with a stride that leaves a remainder and
    /// asymmetric padding.
    #[test]
    fn gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let x0: Vec<f32> = Tensor::randn(0f32, 1., 72, &dev)
            .unwrap()
            .to_vec1()
            .unwrap();
        let w0: Vec<f32> = Tensor::randn(0f32, 1., 18, &dev)
            .unwrap()
            .to_vec1()
            .unwrap();
        let pad = Pad {
            top: 1,
            bottom: 0,
            left: 1,
            right: 1,
        };
        let (xs, ws) = ((1, 2, 6, 6), (2, 1, 3, 3));
        let weigh = |n: usize| -> Vec<f32> { (0..n).map(|i| 1.0 + i as f32 * 0.1).collect() };
        let loss = |x: &[f32], w: &[f32]| -> f64 {
            let x = Tensor::from_slice(x, xs, &dev).unwrap();
            let w = Tensor::from_slice(w, ws, &dev).unwrap();
            let y: Vec<f32> = depthwise_conv2d(&x, &w, 2, pad)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let k = weigh(y.len());
            y.iter()
                .zip(&k)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum()
        };
        let xv = Var::from_tensor(&Tensor::from_slice(&x0, xs, &dev).unwrap()).unwrap();
        let wv = Var::from_tensor(&Tensor::from_slice(&w0, ws, &dev).unwrap()).unwrap();
        let y = depthwise_conv2d(xv.as_tensor(), wv.as_tensor(), 2, pad).unwrap();
        assert_eq!(y.dims(), &[1, 2, 3, 3]);
        let k = Tensor::from_vec(weigh(y.elem_count()), y.dims(), &dev).unwrap();
        let grads = (&y * &k).unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |v: &Var| -> Vec<f32> {
            grads
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (gx, gw) = (flat(&xv), flat(&wv));
        let eps = 1e-2f32;
        let check = |analytic: &[f32], perturbed: &dyn Fn(usize, f32) -> f64, what: &str| {
            for (i, &a) in analytic.iter().enumerate() {
                let fd = (perturbed(i, eps) - perturbed(i, -eps)) / (2.0 * f64::from(eps));
                let rel = (fd - f64::from(a)).abs() / fd.abs().max(1.0);
                assert!(
                    rel < 1e-3,
                    "{what} {i}: finite differences {fd}, backward {a}"
                );
            }
        };
        check(
            &gw,
            &|i, d| {
                let mut w = w0.clone();
                w[i] += d;
                loss(&x0, &w)
            },
            "weight",
        );
        check(
            &gx,
            &|i, d| {
                let mut x = x0.clone();
                x[i] += d;
                loss(&x, &w0)
            },
            "input",
        );
    }
}
