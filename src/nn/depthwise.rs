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
                vectorized(|| match g.stride {
                    1 => scratch.forward(g, p, xin, k, out),
                    _ => forward_plane(g, p, xin, k, out),
                });
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
                vectorized(|| match g.stride {
                    1 => scratch.grad_input(g, p, gin, k, out),
                    _ => grad_input_plane(g, p, gin, k, out),
                });
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
                    vectorized(|| match g.stride {
                        1 => scratch.grad_weight(g, p, xin, gin, k),
                        _ => grad_weight_plane(g, p, xin, gin, k),
                    });
                }
            },
        );
        Ok((CpuStorage::F32(gw), Shape::from((c, 1, g.kh, g.kw))))
    }
}

/// Stride 1 on zero-padded planes: with the output computed at the padded width `wp` (its last
/// `kw - 1` columns discarded), every kernel tap is one shift of the whole flattened plane, so each
/// tap is one long vector operation instead of one short one per row.
#[derive(Default)]
struct Scratch {
    /// The input (or its gradient), padded: `hp` rows of `wp`, and `kw - 1` floats of slack.
    padded: Vec<f32>,
    /// The output (or its gradient) at the padded width: `oh` rows of `wp`.
    wide: Vec<f32>,
}

impl Scratch {
    /// (wp, the padded plane's length with its slack, the wide output's length).
    #[inline(always)]
    fn sizes(g: Geo, p: Planes) -> (usize, usize, usize) {
        let wp = p.w + g.pad.left + g.pad.right;
        let hp = p.h + g.pad.top + g.pad.bottom;
        (wp, hp * wp + g.kw - 1, p.oh * wp)
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

    #[inline(always)]
    fn widen_output(&mut self, g: Geo, p: Planes, gin: &[f32]) {
        let (wp, _, wide) = Self::sizes(g, p);
        zeroed(&mut self.wide, wide);
        for (y, row) in gin.chunks_exact(p.ow).enumerate() {
            self.wide[y * wp..y * wp + p.ow].copy_from_slice(row);
        }
    }

    #[inline(always)]
    fn forward(&mut self, g: Geo, p: Planes, xin: &[f32], k: &[f32], out: &mut [f32]) {
        let wp = self.pad_input(g, p, xin);
        let n = p.oh * wp;
        zeroed(&mut self.wide, n);
        for (t, &kv) in k.iter().enumerate() {
            let off = Self::tap(g, wp, t);
            axpy_from(&mut self.wide, &self.padded[off..off + n], kv, 1);
        }
        for (row, wide) in out.chunks_exact_mut(p.ow).zip(self.wide.chunks_exact(wp)) {
            row.copy_from_slice(&wide[..p.ow]);
        }
    }

    #[inline(always)]
    fn grad_input(&mut self, g: Geo, p: Planes, gin: &[f32], k: &[f32], out: &mut [f32]) {
        self.widen_output(g, p, gin);
        let (wp, len, n) = Self::sizes(g, p);
        zeroed(&mut self.padded, len);
        for (t, &kv) in k.iter().enumerate() {
            let off = Self::tap(g, wp, t);
            axpy_into(&mut self.padded[off..off + n], &self.wide, kv, 1);
        }
        for (y, row) in out.chunks_exact_mut(p.w).enumerate() {
            let at = (y + g.pad.top) * wp + g.pad.left;
            row.copy_from_slice(&self.padded[at..at + p.w]);
        }
    }

    #[inline(always)]
    fn grad_weight(&mut self, g: Geo, p: Planes, xin: &[f32], gin: &[f32], k: &mut [f32]) {
        let wp = self.pad_input(g, p, xin);
        self.widen_output(g, p, gin);
        let n = p.oh * wp;
        for (t, kv) in k.iter_mut().enumerate() {
            let off = Self::tap(g, wp, t);
            *kv += dot(&self.wide, &self.padded[off..off + n], 1);
        }
    }
}

/// `buf` as `len` zeros, keeping its allocation.
#[inline(always)]
fn zeroed(buf: &mut Vec<f32>, len: usize) {
    buf.clear();
    buf.resize(len, 0.0);
}

/// dst[i] += a · src[i · stride].
#[inline(always)]
fn axpy_from(dst: &mut [f32], src: &[f32], a: f32, stride: usize) {
    if stride == 1 {
        let src = &src[..dst.len()];
        for (d, &s) in dst.iter_mut().zip(src) {
            *d += a * s;
        }
    } else {
        for (d, &s) in dst.iter_mut().zip(src.iter().step_by(stride)) {
            *d += a * s;
        }
    }
}

/// dst[i · stride] += a · src[i].
#[inline(always)]
fn axpy_into(dst: &mut [f32], src: &[f32], a: f32, stride: usize) {
    if stride == 1 {
        for (d, &s) in dst[..src.len()].iter_mut().zip(src) {
            *d += a * s;
        }
    } else {
        for (d, &s) in dst.iter_mut().step_by(stride).zip(src) {
            *d += a * s;
        }
    }
}

/// Σ a[i] · b[i · stride].
#[inline(always)]
fn dot(a: &[f32], b: &[f32], stride: usize) -> f32 {
    if stride != 1 {
        return a
            .iter()
            .zip(b.iter().step_by(stride))
            .map(|(x, y)| x * y)
            .sum();
    }
    lane_sum(a, b, |x, y| x * y)
}

/// The output columns of kernel column `kx` and the input column of the first of them.
#[inline(always)]
fn span(g: Geo, kx: usize, p: Planes) -> (std::ops::Range<usize>, usize) {
    let cols = g.columns(kx, p.w, p.ow);
    let first = (cols.start * g.stride + kx).saturating_sub(g.pad.left);
    (cols, first)
}

#[inline(always)]
fn forward_plane(g: Geo, p: Planes, xin: &[f32], k: &[f32], out: &mut [f32]) {
    for ky in 0..g.kh {
        for oy in 0..p.oh {
            let Some(iy) = g.row(oy, ky, p.h) else {
                continue;
            };
            let orow = &mut out[oy * p.ow..(oy + 1) * p.ow];
            let irow = &xin[iy * p.w..(iy + 1) * p.w];
            for kx in 0..g.kw {
                let (cols, first) = span(g, kx, p);
                axpy_from(&mut orow[cols], &irow[first..], k[ky * g.kw + kx], g.stride);
            }
        }
    }
}

#[inline(always)]
fn grad_input_plane(g: Geo, p: Planes, gin: &[f32], k: &[f32], out: &mut [f32]) {
    for ky in 0..g.kh {
        for oy in 0..p.oh {
            let Some(iy) = g.row(oy, ky, p.h) else {
                continue;
            };
            let grow = &gin[oy * p.ow..(oy + 1) * p.ow];
            let xrow = &mut out[iy * p.w..(iy + 1) * p.w];
            for kx in 0..g.kw {
                let (cols, first) = span(g, kx, p);
                axpy_into(&mut xrow[first..], &grow[cols], k[ky * g.kw + kx], g.stride);
            }
        }
    }
}

#[inline(always)]
fn grad_weight_plane(g: Geo, p: Planes, xin: &[f32], gin: &[f32], k: &mut [f32]) {
    for ky in 0..g.kh {
        for oy in 0..p.oh {
            let Some(iy) = g.row(oy, ky, p.h) else {
                continue;
            };
            let grow = &gin[oy * p.ow..(oy + 1) * p.ow];
            let irow = &xin[iy * p.w..(iy + 1) * p.w];
            for kx in 0..g.kw {
                let (cols, first) = span(g, kx, p);
                k[ky * g.kw + kx] += dot(&grow[cols], &irow[first..], g.stride);
            }
        }
    }
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
