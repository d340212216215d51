//! Pooling with a backward pass. candle 0.11 cannot backpropagate through max or average pooling whose
//! kernel differs from its stride (ResNet's 3x3/2 stem pool, Inception's pools), which training and
//! first-convolution Grad-CAM need. When gradients are tracked, f32 on the CPU is pooled by one
//! operation with an analytic backward (the window maxima found again, the gradient scattered to
//! them); other devices and dtypes compose pooling from differentiable primitives (strided views and
//! `maximum`/`add`: nine padded copies forward and nine accumulations backward, which cost ResNet-18
//! almost half of its training step). Without gradients (inference), candle's native kernels are used.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv_train::Planes;
use super::cpu_conv::{f32_slice, with_scratch};

/// Output side of a pooling window sweep (PyTorch's floor mode).
pub fn pooled_len(len: usize, kernel: usize, stride: usize, padding: usize) -> usize {
    (len + 2 * padding).saturating_sub(kernel) / stride + 1
}

/// Max pooling over `kernel`x`kernel` windows with `stride` and symmetric `padding` (padded cells never win).
/// A blocked `x` (inference) is pooled by the blocked kernels.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    if super::blocked::is_blocked(x) {
        return super::blocked::max_pool(x, kernel, stride, padding);
    }
    if x.track_op() && is_cpu_f32(x) {
        return x
            .contiguous()?
            .apply_op1(Pool::new(PoolKind::Max, kernel, stride, padding));
    }
    composed_max_pool2d(x, kernel, stride, padding)
}

/// [`max_pool2d`] of strided views, on any device and dtype.
fn composed_max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let xp = pad_constant(x, padding, f32::NEG_INFINITY)?;
    if !x.track_op() {
        return xp.max_pool2d_with_stride(kernel, stride);
    }
    let mut acc: Option<Tensor> = None;
    for w in windows(&xp, kernel, stride)? {
        acc = Some(match acc {
            None => w,
            Some(a) => a.maximum(&w)?,
        });
    }
    acc.ok_or_else(|| candle_core::Error::Msg("empty pooling window".into()))
}

/// Average pooling counting padded cells as zeros (PyTorch's default `count_include_pad=True`).
pub fn avg_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    if x.track_op() && is_cpu_f32(x) {
        return x
            .contiguous()?
            .apply_op1(Pool::new(PoolKind::Avg, kernel, stride, padding));
    }
    composed_avg_pool2d(x, kernel, stride, padding)
}

/// [`avg_pool2d`] of strided views, on any device and dtype.
fn composed_avg_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let xp = pad_constant(x, padding, 0.0)?;
    if !x.track_op() {
        return xp.avg_pool2d_with_stride(kernel, stride);
    }
    let mut acc: Option<Tensor> = None;
    for w in windows(&xp, kernel, stride)? {
        acc = Some(match acc {
            None => w,
            Some(a) => (a + w)?,
        });
    }
    let sum = acc.ok_or_else(|| candle_core::Error::Msg("empty pooling window".into()))?;
    sum / (kernel * kernel) as f64
}

/// Mean over the spatial dimensions: (N, C, H, W) → (N, C).
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean(D::Minus1)?.mean(D::Minus1)
}

/// Adaptive average pooling to `out`x`out` (PyTorch's bin edges), differentiable.
pub fn adaptive_avg_pool2d(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let mut rows = Vec::with_capacity(out_h);
    for i in 0..out_h {
        let (y0, y1) = (i * h / out_h, ((i + 1) * h).div_ceil(out_h));
        let mut cols = Vec::with_capacity(out_w);
        for j in 0..out_w {
            let (x0, x1) = (j * w / out_w, ((j + 1) * w).div_ceil(out_w));
            let cell = x.narrow(2, y0, y1 - y0)?.narrow(3, x0, x1 - x0)?;
            cols.push(cell.mean_keepdim(2)?.mean_keepdim(3)?);
        }
        rows.push(Tensor::cat(&cols, 3)?);
    }
    Tensor::cat(&rows, 2)
}

/// Pads the two spatial dimensions of (N, C, H, W) by `p` cells of `value` on every side.
fn pad_constant(x: &Tensor, p: usize, value: f32) -> Result<Tensor> {
    if p == 0 {
        return Ok(x.clone());
    }
    let (n, c, h, w) = x.dims4()?;
    let fill = |shape: (usize, usize, usize, usize)| -> Result<Tensor> {
        Tensor::full(value, shape, x.device())?.to_dtype(x.dtype())
    };
    let rows = fill((n, c, p, w))?;
    let x = Tensor::cat(&[&rows, x, &rows], 2)?;
    let cols = fill((n, c, h + 2 * p, p))?;
    Tensor::cat(&[&cols, &x, &cols], 3)
}

/// The `kernel`² strided views whose element-wise combination is the pooled output.
fn windows(xp: &Tensor, kernel: usize, stride: usize) -> Result<Vec<Tensor>> {
    let (n, c, h, w) = xp.dims4()?;
    if h < kernel || w < kernel {
        candle_core::bail!("pooling window {kernel} is larger than the padded input {h}x{w}");
    }
    let (oh, ow) = ((h - kernel) / stride + 1, (w - kernel) / stride + 1);
    let mut out = Vec::with_capacity(kernel * kernel);
    for dy in 0..kernel {
        for dx in 0..kernel {
            let t =
                xp.narrow(2, dy, (oh - 1) * stride + 1)?
                    .narrow(3, dx, (ow - 1) * stride + 1)?;
            let t = if stride == 1 {
                t
            } else {
                // Pad to a multiple of the stride, fold it into its own axis and keep index 0.
                t.pad_with_zeros(2, 0, stride - 1)?
                    .pad_with_zeros(3, 0, stride - 1)?
                    .reshape((n, c, oh, stride, ow, stride))?
                    .narrow(3, 0, 1)?
                    .narrow(5, 0, 1)?
                    .reshape((n, c, oh, ow))?
            };
            out.push(t);
        }
    }
    Ok(out)
}

fn is_cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PoolKind {
    Max,
    /// Padded cells count as zeros.
    Avg,
}

/// Pooling of a contiguous NCHW f32 tensor on the CPU, differentiable in its input.
#[derive(Debug, Clone, Copy)]
struct Pool {
    kind: PoolKind,
    kernel: usize,
    stride: usize,
    padding: usize,
}

/// (x, grad_y) → grad_x of [`Pool`].
struct PoolGrad(Pool);

impl Pool {
    fn new(kind: PoolKind, kernel: usize, stride: usize, padding: usize) -> Self {
        Pool {
            kind,
            kernel,
            stride,
            padding,
        }
    }

    fn planes(&self, l: &Layout) -> Result<(usize, Planes)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let (hp, wp) = (h + 2 * self.padding, w + 2 * self.padding);
        if hp < self.kernel || wp < self.kernel || self.stride == 0 {
            candle_core::bail!(
                "pooling window {} (stride {}) does not fit the padded input {hp}x{wp}",
                self.kernel,
                self.stride
            );
        }
        let (oh, ow) = (
            pooled_len(h, self.kernel, self.stride, self.padding),
            pooled_len(w, self.kernel, self.stride, self.padding),
        );
        Ok((n * c, Planes { h, w, oh, ow }))
    }

    /// The input rows (or columns) of output row `o`'s window, clipped to the input.
    fn span(&self, o: usize, len: usize) -> std::ops::Range<usize> {
        let start = (o * self.stride) as isize - self.padding as isize;
        let end = (start + self.kernel as isize).min(len as isize);
        start.max(0) as usize..end.max(0) as usize
    }

    /// The output columns whose windows take input column `x0 + t` for every x0 of a row (window
    /// tap t): ox with 0 <= ox·stride + t − padding < w, and ox < ow.
    fn tap_outputs(&self, t: usize, w: usize, ow: usize) -> std::ops::Range<usize> {
        let (s, p) = (self.stride, self.padding);
        let first = p.saturating_sub(t).div_ceil(s);
        let end = (w + p).saturating_sub(t).div_ceil(s).min(ow);
        first..end.max(first)
    }

    /// `sums[ox]` += the sum of `row` over output column ox's window, tap by tap (a shifted,
    /// contiguous add at stride 1).
    fn row_windows(&self, row: &[f32], sums: &mut [f32]) {
        for t in 0..self.kernel {
            let outs = self.tap_outputs(t, row.len(), sums.len());
            for ox in outs {
                sums[ox] += row[ox * self.stride + t - self.padding];
            }
        }
    }

    /// The adjoint of [`Pool::row_windows`]: `row[x]` += `sums[ox]` for every window ox taking x.
    fn spread_row_windows(&self, sums: &[f32], row: &mut [f32]) {
        for t in 0..self.kernel {
            let outs = self.tap_outputs(t, row.len(), sums.len());
            for ox in outs {
                row[ox * self.stride + t - self.padding] += sums[ox];
            }
        }
    }

    /// Every output row's and every output column's window span, computed once for all planes.
    fn spans(&self, p: Planes) -> Spans {
        Spans {
            rows: (0..p.oh).map(|o| self.span(o, p.h)).collect(),
            cols: (0..p.ow).map(|o| self.span(o, p.w)).collect(),
        }
    }
}

/// The input rows of each output row's window and the input columns of each output column's.
struct Spans {
    rows: Vec<std::ops::Range<usize>>,
    cols: Vec<std::ops::Range<usize>>,
}

impl Spans {
    /// The windows of a plane as (output index, input rows, input columns), in output order.
    fn windows(
        &self,
    ) -> impl Iterator<Item = (usize, &std::ops::Range<usize>, &std::ops::Range<usize>)> {
        let ow = self.cols.len();
        self.rows.iter().enumerate().flat_map(move |(oy, ry)| {
            self.cols
                .iter()
                .enumerate()
                .map(move |(ox, rx)| (oy * ow + ox, ry, rx))
        })
    }
}

/// Where a window takes its maximum in `plane` (row length `w`; the first in scan order), or None
/// for a window of padding only.
#[inline(always)]
fn argmax(
    plane: &[f32],
    w: usize,
    rows: &std::ops::Range<usize>,
    cols: &std::ops::Range<usize>,
) -> Option<usize> {
    if rows.is_empty() || cols.is_empty() {
        return None;
    }
    let (mut best, mut at) = (
        plane[rows.start * w + cols.start],
        rows.start * w + cols.start,
    );
    for y in rows.clone() {
        let line = &plane[y * w..(y + 1) * w][cols.clone()];
        for (x, &v) in line.iter().enumerate() {
            if v > best {
                (best, at) = (v, y * w + cols.start + x);
            }
        }
    }
    Some(at)
}

impl CustomOp1 for Pool {
    fn name(&self) -> &'static str {
        "histolens-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "pooling input")?;
        let (planes, p) = self.planes(l)?;
        let area = (self.kernel * self.kernel) as f32;
        let spans = self.spans(p);
        let mut y = vec![0f32; planes * p.oh * p.ow];
        let chunks = y.par_chunks_mut(p.oh * p.ow).zip(x.par_chunks(p.h * p.w));
        match self.kind {
            PoolKind::Max => chunks.for_each(|(out, inp)| {
                for (o, ry, rx) in spans.windows() {
                    out[o] = argmax(inp, p.w, ry, rx).map_or(f32::NEG_INFINITY, |i| inp[i]);
                }
            }),
            // Separable: each input row's window sums, then each output row the sum of its
            // window's rows (whole rows at a time).
            PoolKind::Avg => chunks.for_each(|(out, inp)| {
                with_scratch(p.h * p.ow, |across| {
                    across.fill(0.0);
                    for (row, sums) in inp.chunks(p.w).zip(across.chunks_mut(p.ow)) {
                        self.row_windows(row, sums);
                    }
                    for (o, ry) in out.chunks_mut(p.ow).zip(&spans.rows) {
                        for y in ry.clone() {
                            for (v, a) in o.iter_mut().zip(&across[y * p.ow..(y + 1) * p.ow]) {
                                *v += a;
                            }
                        }
                        o.iter_mut().for_each(|v| *v /= area);
                    }
                })
            }),
        }
        let (n, c, _, _) = l.shape().dims4()?;
        Ok((CpuStorage::F32(y), Shape::from((n, c, p.oh, p.ow))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        let gy = grad_y.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&gy, &PoolGrad(*self))?))
    }
}

impl CustomOp2 for PoolGrad {
    fn name(&self) -> &'static str {
        "histolens-pool-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let pool = self.0;
        let x = f32_slice(xs, xl, "pooling input")?;
        let gy = f32_slice(gs, gl, "pooling output gradient")?;
        let (planes, p) = pool.planes(xl)?;
        if gy.len() != planes * p.oh * p.ow {
            candle_core::bail!(
                "pooling backward: gradient {:?} for {:?}",
                gl.dims(),
                xl.dims()
            );
        }
        let area = (pool.kernel * pool.kernel) as f32;
        let spans = pool.spans(p);
        let mut dx = vec![0f32; x.len()];
        let chunks = dx
            .par_chunks_mut(p.h * p.w)
            .zip(x.par_chunks(p.h * p.w))
            .zip(gy.par_chunks(p.oh * p.ow));
        match pool.kind {
            PoolKind::Max => chunks.for_each(|((out, inp), g)| {
                for (o, ry, rx) in spans.windows() {
                    if let Some(i) = argmax(inp, p.w, ry, rx) {
                        out[i] += g[o];
                    }
                }
            }),
            // The forward's adjoint, separable the same way: each output row's gradient spread
            // over its window's rows, then each row's over its windows' columns.
            PoolKind::Avg => chunks.for_each(|((out, _), g)| {
                with_scratch(p.h * p.ow, |down| {
                    down.fill(0.0);
                    for (go, ry) in g.chunks(p.ow).zip(&spans.rows) {
                        for y in ry.clone() {
                            for (d, v) in down[y * p.ow..(y + 1) * p.ow].iter_mut().zip(go) {
                                *d += v;
                            }
                        }
                    }
                    down.iter_mut().for_each(|d| *d /= area);
                    for (row, sums) in out.chunks_mut(p.w).zip(down.chunks(p.ow)) {
                        pool.spread_row_windows(sums, row);
                    }
                })
            }),
        }
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// True for floating dtypes (the only ones pooling and training accept).
pub fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn input(seed: u64, shape: (usize, usize, usize, usize)) -> Tensor {
        // Distinct values (no ties), deterministic.
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0 + i as f32 * 1e-4
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Checks d(sum(pool(x) * r))/dx against central finite differences in f64.
    fn check_grad(pool: &dyn Fn(&Tensor) -> Result<Tensor>, shape: (usize, usize, usize, usize)) {
        let x = input(7, shape).to_dtype(DType::F64).unwrap();
        let var = Var::from_tensor(&x).unwrap();
        let y = pool(var.as_tensor()).unwrap();
        let r = input(11, y.dims4().unwrap()).to_dtype(DType::F64).unwrap();
        let loss = (&y * &r).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads
            .get(&var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eps = 1e-6;
        let f = |v: &[f64]| -> f64 {
            let t = Tensor::from_slice(v, shape, &Device::Cpu).unwrap();
            (pool(&t).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        for i in 0..base.len() {
            let mut p = base.clone();
            p[i] += eps;
            let mut m = base.clone();
            m[i] -= eps;
            let fd = (f(&p) - f(&m)) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() < 1e-6,
                "element {i}: analytic {} vs finite difference {fd}",
                g[i]
            );
        }
    }

    #[test]
    fn max_pool_gradient_matches_finite_differences() {
        check_grad(&|t| max_pool2d(t, 3, 2, 1), (1, 2, 7, 6));
        check_grad(&|t| max_pool2d(t, 3, 2, 0), (2, 1, 9, 9));
        check_grad(&|t| max_pool2d(t, 3, 1, 1), (1, 1, 5, 5));
    }

    #[test]
    fn avg_pool_gradient_matches_finite_differences() {
        check_grad(&|t| avg_pool2d(t, 3, 1, 1), (1, 2, 6, 5));
        check_grad(&|t| avg_pool2d(t, 3, 2, 0), (1, 1, 8, 7));
        check_grad(&|t| adaptive_avg_pool2d(t, 3, 2), (1, 2, 7, 5));
    }

    /// (output, input gradient of sum(pool(x) · r)) of `pool` on a tracked `x`.
    fn output_and_grad(
        pool: &dyn Fn(&Tensor) -> Result<Tensor>,
        x: &Tensor,
        r: &Tensor,
    ) -> (Vec<f64>, Vec<f64>) {
        let var = Var::from_tensor(x).unwrap();
        let y = pool(var.as_tensor()).unwrap();
        let loss = (&y * r.to_dtype(x.dtype()).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap().get(&var).unwrap().clone();
        let flat = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        (flat(&y), flat(&g))
    }

    #[test]
    fn the_cpu_operation_matches_the_composed_reference() {
        // The composed path is checked against finite differences above (in f64); the f32 CPU
        // operation must give the same outputs and gradients, padding, strides and ragged edges included.
        for (shape, k, s, p) in [
            ((2, 3, 11, 10), 3, 2, 1),
            ((1, 2, 9, 9), 3, 2, 0),
            ((1, 2, 7, 8), 3, 1, 1),
            ((2, 1, 8, 8), 2, 2, 0),
            ((1, 1, 5, 6), 3, 3, 1),
        ] {
            let x = input(5, shape);
            let (_, _, oh, ow) = max_pool2d(&x, k, s, p).unwrap().dims4().unwrap();
            let r = input(9, (shape.0, shape.1, oh, ow));
            let x64 = x.to_dtype(DType::F64).unwrap();
            type PoolFn = fn(&Tensor, usize, usize, usize) -> Result<Tensor>;
            let pairs: [(&str, PoolFn, PoolFn); 2] = [
                ("max", max_pool2d, composed_max_pool2d),
                ("avg", avg_pool2d, composed_avg_pool2d),
            ];
            for (name, op, reference) in pairs {
                let (y, g) = output_and_grad(&|t| op(t, k, s, p), &x, &r);
                let (y_ref, g_ref) = output_and_grad(&|t| reference(t, k, s, p), &x64, &r);
                for (what, a, b) in [("output", &y, &y_ref), ("gradient", &g, &g_ref)] {
                    assert_eq!(a.len(), b.len(), "{name} {k}/{s}/{p} {what}");
                    let err = a
                        .iter()
                        .zip(b)
                        .map(|(u, v)| (u - v).abs())
                        .fold(0f64, f64::max);
                    let scale = b.iter().map(|v| v.abs()).fold(1e-3, f64::max);
                    assert!(
                        err / scale < 1e-5,
                        "{name} {k}/{s}/{p} {what}: relative error {}",
                        err / scale
                    );
                }
            }
        }
    }

    #[test]
    fn candle_native_pooling_cannot_do_this() {
        // The reason this module exists: candle's own backward refuses kernel != stride.
        let x = Var::from_tensor(&input(1, (1, 1, 8, 8))).unwrap();
        let y = x.as_tensor().max_pool2d_with_stride(3, 2).unwrap();
        assert!(y.sum_all().unwrap().backward().is_err());
    }

    #[test]
    fn tracked_and_untracked_paths_agree() {
        let x = input(3, (2, 3, 11, 10));
        let v = Var::from_tensor(&x).unwrap();
        for (k, s, p) in [(3, 2, 1), (3, 1, 1), (2, 2, 0), (3, 2, 0)] {
            let a = max_pool2d(&x, k, s, p).unwrap();
            let b = max_pool2d(v.as_tensor(), k, s, p).unwrap();
            assert_eq!(a.dims(), b.dims());
            assert_eq!(a.dims4().unwrap().2, pooled_len(11, k, s, p));
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-6, "max {k}/{s}/{p}: {d}");
            let a = avg_pool2d(&x, k, s, p).unwrap();
            let b = avg_pool2d(v.as_tensor(), k, s, p).unwrap();
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-5, "avg {k}/{s}/{p}: {d}");
        }
    }
}
