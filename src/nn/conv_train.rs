//! Dense convolution for training as im2col + GEMM, forward and backward.
//!
//! candle's CPU convolution backward runs a transposed convolution as a direct loop of dot products
//! (the slowest part of a training step). Here the convolution is a batched matrix product of the
//! weights (Cout x Cin·kh·kw) with the input's patches: both gradients are then matrix products on
//! candle's GEMM, and the patches' own gradient is a scatter back into the input (col2im).
//! A 1x1 convolution with stride 1 and no padding needs no patches at all.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::cpu_conv::f32_slice;
use histolens_kernels::Pad;

/// Where a kernel window falls on an input plane: kernel size, stride and padding (dilation 1).
/// Shared by the training convolutions (dense here, depthwise in `depthwise.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geo {
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: Pad,
}

impl Geo {
    /// The output size for an input of `h` x `w`.
    pub fn output(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (ph, pw) = (
            h + self.pad.top + self.pad.bottom,
            w + self.pad.left + self.pad.right,
        );
        if ph < self.kh || pw < self.kw || self.stride == 0 {
            bail!(
                "convolution: a {}x{} kernel does not fit a padded {ph}x{pw} input",
                self.kh,
                self.kw
            )
        }
        Ok((
            (ph - self.kh) / self.stride + 1,
            (pw - self.kw) / self.stride + 1,
        ))
    }

    /// Output columns whose input column `ox * stride + kx - left` is inside `0..w`.
    pub fn columns(&self, kx: usize, w: usize, ow: usize) -> std::ops::Range<usize> {
        let first = self.pad.left.saturating_sub(kx).div_ceil(self.stride);
        let end = (w + self.pad.left)
            .saturating_sub(kx)
            .div_ceil(self.stride)
            .min(ow);
        first.min(end)..end
    }

    /// The input row of output row `oy` under kernel row `ky`, if inside `0..h`.
    pub fn row(&self, oy: usize, ky: usize, h: usize) -> Option<usize> {
        (oy * self.stride + ky)
            .checked_sub(self.pad.top)
            .filter(|&r| r < h)
    }
}

/// `conv(x, w)` for x (N, Cin, H, W) and w (Cout, Cin, kh, kw), f32 on the CPU, no groups, dilation 1;
/// differentiable in both.
pub fn conv2d_train(x: &Tensor, w: &Tensor, stride: usize, pad: Pad) -> Result<Tensor> {
    let (n, cin, h, wd) = x.dims4()?;
    let (cout, cin_w, kh, kw) = w.dims4()?;
    if cin_w != cin {
        bail!(
            "convolution: weights {:?} for an input of {:?}",
            w.dims(),
            x.dims()
        )
    }
    let g = Geo {
        kh,
        kw,
        stride,
        pad,
    };
    let (oh, ow) = g.output(h, wd)?;
    let k = cin * kh * kw;
    let patches = if kh == 1 && kw == 1 && stride == 1 && pad == Pad::symmetric(0, 0) {
        x.reshape((n, cin, h * wd))?
    } else {
        x.contiguous()?.apply_op1(Im2col(g))?
    };
    let wm = w.reshape((1, cout, k))?.broadcast_as((n, cout, k))?;
    wm.matmul(&patches)?.reshape((n, cout, oh, ow))
}

/// x (N, C, H, W) → patches (N, C·kh·kw, oh·ow).
struct Im2col(Geo);
/// patches' gradient → x's gradient, for an input of (H, W).
struct Col2im(Geo, usize, usize);

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "histolens-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = f32_slice(s, l, "convolution input")?;
        let (n, c, h, w) = l.shape().dims4()?;
        let (oh, ow) = g.output(h, w)?;
        let block = g.kh * g.kw * oh * ow;
        let mut cols = vec![0f32; n * c * block];
        cols.par_chunks_mut(block)
            .enumerate()
            .for_each(|(plane, out)| {
                let xin = &x[plane * h * w..(plane + 1) * h * w];
                for ky in 0..g.kh {
                    for kx in 0..g.kw {
                        let row =
                            &mut out[(ky * g.kw + kx) * oh * ow..(ky * g.kw + kx + 1) * oh * ow];
                        let span = g.columns(kx, w, ow);
                        for oy in 0..oh {
                            let Some(iy) = g.row(oy, ky, h) else { continue };
                            let irow = &xin[iy * w..(iy + 1) * w];
                            let orow = &mut row[oy * ow..(oy + 1) * ow];
                            for ox in span.clone() {
                                orow[ox] = irow[ox * g.stride + kx - g.pad.left];
                            }
                        }
                    }
                }
            });
        Ok((
            CpuStorage::F32(cols),
            Shape::from((n, c * g.kh * g.kw, oh * ow)),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        Ok(Some(
            grad.contiguous()?.apply_op1_no_bwd(&Col2im(self.0, h, w))?,
        ))
    }
}

impl CustomOp1 for Col2im {
    fn name(&self) -> &'static str {
        "histolens-col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Col2im(g, h, w) = *self;
        let cols = f32_slice(s, l, "patch gradient")?;
        let (n, k, _) = l.shape().dims3()?;
        let c = k / (g.kh * g.kw);
        let (oh, ow) = g.output(h, w)?;
        let block = g.kh * g.kw * oh * ow;
        let mut x = vec![0f32; n * c * h * w];
        x.par_chunks_mut(h * w)
            .enumerate()
            .for_each(|(plane, out)| {
                let cin = &cols[plane * block..(plane + 1) * block];
                for ky in 0..g.kh {
                    for kx in 0..g.kw {
                        let row = &cin[(ky * g.kw + kx) * oh * ow..(ky * g.kw + kx + 1) * oh * ow];
                        let span = g.columns(kx, w, ow);
                        for oy in 0..oh {
                            let Some(iy) = g.row(oy, ky, h) else { continue };
                            let grow = &row[oy * ow..(oy + 1) * ow];
                            let xrow = &mut out[iy * w..(iy + 1) * w];
                            for ox in span.clone() {
                                xrow[ox * g.stride + kx - g.pad.left] += grow[ox];
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(x), Shape::from((n, c, h, w))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let s = b.abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1e-6)
    }

    /// Forward and both gradients against candle's convolution (where its backward works: no
    /// remainder left by the stride), for 1x1, 3x3 and 7x7 kernels, strides 1 and 2, padding.
    #[test]
    fn matches_candles_convolution_and_its_gradients() {
        let dev = Device::Cpu;
        let cases = [
            (1, 1, 0, 7, 6),
            (1, 2, 0, 9, 9),
            (3, 1, 1, 8, 7),
            (3, 2, 1, 9, 11),
            (7, 2, 3, 15, 13),
            (3, 1, 0, 6, 6),
        ];
        for (k, stride, p, h, w) in cases {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, h, w), &dev).unwrap()).unwrap();
            let wt =
                Var::from_tensor(&Tensor::randn(0f32, 1., (5, 3, k, k), &dev).unwrap()).unwrap();
            let pad = Pad::symmetric(p, p);
            let ours = conv2d_train(x.as_tensor(), wt.as_tensor(), stride, pad).unwrap();
            let theirs = x
                .as_tensor()
                .conv2d(wt.as_tensor(), p, stride, 1, 1)
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "k {k} s {stride} p {p}");
            assert!(
                max_rel(&ours, &theirs) < 1e-5,
                "forward k {k} s {stride} p {p}"
            );
            if (h + 2 * p - k) % stride != 0 || (w + 2 * p - k) % stride != 0 {
                continue;
            }
            let weigh = Tensor::randn(0f32, 1., ours.dims(), &dev).unwrap();
            let g1 = (&ours * &weigh)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (&theirs * &weigh)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (what, v) in [("input", &x), ("weight", &wt)] {
                let (a, b) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert!(
                    max_rel(a, b) < 1e-4,
                    "{what} gradient k {k} s {stride} p {p}"
                );
            }
        }
    }

    /// Both gradients against finite differences, with asymmetric padding and a stride that leaves
    /// a remainder.
    #[test]
    fn gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let (xs, ws) = ((1, 2, 6, 5), (3, 2, 3, 3));
        let x0: Vec<f32> = Tensor::randn(0f32, 1., 60, &dev)
            .unwrap()
            .to_vec1()
            .unwrap();
        let w0: Vec<f32> = Tensor::randn(0f32, 1., 54, &dev)
            .unwrap()
            .to_vec1()
            .unwrap();
        let pad = Pad {
            top: 1,
            bottom: 0,
            left: 0,
            right: 1,
        };
        let weigh = |n: usize| -> Vec<f32> { (0..n).map(|i| 1.0 - i as f32 * 0.05).collect() };
        let loss = |x: &[f32], w: &[f32]| -> f64 {
            let x = Tensor::from_slice(x, xs, &dev).unwrap();
            let w = Tensor::from_slice(w, ws, &dev).unwrap();
            let y: Vec<f32> = conv2d_train(&x, &w, 2, pad)
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
        let y = conv2d_train(xv.as_tensor(), wv.as_tensor(), 2, pad).unwrap();
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
        let eps = 1e-2f32;
        for (i, &a) in flat(&wv).iter().enumerate() {
            let (mut up, mut down) = (w0.clone(), w0.clone());
            up[i] += eps;
            down[i] -= eps;
            let fd = (loss(&x0, &up) - loss(&x0, &down)) / (2.0 * f64::from(eps));
            assert!(
                (fd - f64::from(a)).abs() / fd.abs().max(1.0) < 1e-3,
                "weight {i}"
            );
        }
        for (i, &a) in flat(&xv).iter().enumerate() {
            let (mut up, mut down) = (x0.clone(), x0.clone());
            up[i] += eps;
            down[i] -= eps;
            let fd = (loss(&up, &w0) - loss(&down, &w0)) / (2.0 * f64::from(eps));
            assert!(
                (fd - f64::from(a)).abs() / fd.abs().max(1.0) < 1e-3,
                "input {i}"
            );
        }
    }
}
