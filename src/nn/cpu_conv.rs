//! The fast CPU path of inference convolutions.
//!
//! candle's CPU convolution copies its im2col matrix into a fresh buffer on every call, writes the GEMM
//! result in a transposed layout that is copied once more, and leaves bias and activation to separate
//! passes, each allocating a new tensor; grouped convolutions run one small convolution per group. Here:
//! - im2col goes into a per-thread buffer that is reused (and is skipped for 1x1 stride-1 convolutions,
//!   whose input already is the GEMM operand), padding (also asymmetric) is applied while copying;
//! - one GEMM per image and group writes NCHW directly; bias and activation are fused into its epilogue;
//! - depthwise convolutions run a direct kernel over a zero-padded plane;
//! - each image's GEMM is split across threads in blocks aligned to the micro-kernel.
//!
//! The path runs only when no argument tracks gradients (inference with constant weights); otherwise
//! [`conv2d`] falls back to candle's differentiable operations, so training and Grad-CAM are unchanged.

use std::cell::RefCell;
use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, DType, InplaceOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// What follows the convolution's bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    Relu6,
}

impl Activation {
    #[inline(always)]
    fn apply(self, v: f32) -> f32 {
        match self {
            Activation::Identity => v,
            Activation::Relu => v.max(0.0),
            Activation::Relu6 => v.clamp(0.0, 6.0),
        }
    }

    /// `dy` where the activation's output `y` is strictly inside `bounds` (its [`Self::bounds`], read
    /// before the loop), else 0: a mask of the bits rather than a branch, so that loops vectorise.
    #[inline(always)]
    pub(crate) fn pass_gradient(dy: f32, y: f32, (lo, hi): (f32, f32)) -> f32 {
        let keep = u32::from(y > lo) & u32::from(y < hi);
        f32::from_bits(dy.to_bits() & keep.wrapping_neg())
    }

    /// The range the activation clamps to.
    #[inline(always)]
    pub(crate) fn bounds(self) -> (f32, f32) {
        match self {
            Activation::Identity => (f32::NEG_INFINITY, f32::INFINITY),
            Activation::Relu => (0.0, f32::INFINITY),
            Activation::Relu6 => (0.0, 6.0),
        }
    }

    /// The activation, differentiable: on f32 CPU tensors one operation forward and one backward
    /// (candle's clamp is two broadcast operations, and its backward more).
    pub fn apply_tensor(self, x: &Tensor) -> Result<Tensor> {
        if self == Activation::Identity {
            return Ok(x.clone());
        }
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            return x.contiguous()?.apply_op1(ActOp(self));
        }
        match self {
            Activation::Identity => Ok(x.clone()),
            Activation::Relu => x.relu(),
            Activation::Relu6 => x.clamp(0f32, 6f32),
        }
    }
}

/// Values per parallel piece of work of the elementwise operations (activation, its gradient, the
/// fused add).
const CHUNK: usize = 1 << 14;
/// An activation as one differentiable operation.
struct ActOp(Activation);
/// (grad_y, y) → grad_x of an activation.
struct ActGrad(Activation);

impl candle_core::CustomOp1 for ActOp {
    fn name(&self) -> &'static str {
        "histolens-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "activation input")?;
        let act = self.0;
        // SAFETY: each output chunk is zipped with the input chunk of the same length.
        let y = unsafe {
            crate::nn::simd::par_filled(x.len(), CHUNK, |i, o| {
                // The bounds outside the loop (not a match per element), so that it vectorises.
                let (lo, hi) = act.bounds();
                crate::nn::simd::vectorized(|| {
                    for (o, &v) in o.iter_mut().zip(&x[i * CHUNK..]) {
                        o.write(v.max(lo).min(hi));
                    }
                });
            })
        };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?.apply_op2_no_bwd(y, &ActGrad(self.0))?,
        ))
    }
}

impl candle_core::CustomOp2 for ActGrad {
    fn name(&self) -> &'static str {
        "histolens-activation-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(gs, gl, "activation gradient")?;
        let y = f32_slice(ys, yl, "activation output")?;
        if g.len() != y.len() {
            bail!("activation gradient of {} values for {}", g.len(), y.len())
        }
        let act = self.0;
        // SAFETY: each output chunk is zipped with input chunks of the same length (checked above).
        let out = unsafe {
            crate::nn::simd::par_filled(g.len(), CHUNK, |i, o| {
                let (g, y) = (&g[i * CHUNK..], &y[i * CHUNK..]);
                let bounds = act.bounds();
                crate::nn::simd::vectorized(|| {
                    for ((o, &g), &y) in o.iter_mut().zip(g).zip(y) {
                        o.write(Activation::pass_gradient(g, y, bounds));
                    }
                });
            })
        };
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// Zero padding on each side of the spatial dimensions (shared with the blocked kernels).
pub use histolens_kernels::Pad;

/// Stride, padding and groups of a convolution (dilation 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub stride: usize,
    pub pad: Pad,
    pub groups: usize,
}

/// `act(conv(x, w) + b)` for x (N, Cin, H, W), w (Cout, Cin/groups, kh, kw) and b (Cout).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    geo: Geometry,
    act: Activation,
) -> Result<Tensor> {
    if fast_path_applies(&[x, w, b]) {
        let (x, w, b) = (x.contiguous()?, w.contiguous()?, b.contiguous()?);
        return x.apply_op3_no_bwd(&w, &b, &FusedConv { geo, act });
    }
    let Pad {
        top,
        bottom,
        left,
        right,
    } = geo.pad;
    let (x, pad) = if top == bottom && left == right && top == left {
        (x.clone(), top)
    } else {
        let x = x
            .pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, left, right)?;
        (x, 0)
    };
    let y = x.conv2d(w, pad, geo.stride, 1, geo.groups)?;
    let cout = b.dims1()?;
    act.apply_tensor(&y.broadcast_add(&b.reshape((1, cout, 1, 1))?)?)
}

/// `act(a + b)` for tensors of one shape, in place in `a` on the fast path (`a` must not be shared).
pub fn add_act(a: Tensor, b: &Tensor, act: Activation) -> Result<Tensor> {
    if fast_path_applies(&[&a, b]) && a.is_contiguous() && a.shape() == b.shape() {
        let b = b.contiguous()?;
        a.inplace_op2(&b, &AddAct(act))?;
        return Ok(a);
    }
    act.apply_tensor(&(a + b)?)
}

fn fast_path_applies(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op())
}

pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("fast convolution: {what} must be f32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("fast convolution: {what} must be contiguous"),
    }
}

struct FusedConv {
    geo: Geometry,
    act: Activation,
}

/// The sizes of one convolution call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub ho: usize,
    pub wo: usize,
}

impl CustomOp3 for FusedConv {
    fn name(&self) -> &'static str {
        "histolens-fused-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cin, h, w) = xl.shape().dims4()?;
        let (cout, cin_g, kh, kw) = wl.shape().dims4()?;
        let g = self.geo.groups;
        let s = self.geo.stride;
        let p = self.geo.pad;
        if g == 0 || cin % g != 0 || cout % g != 0 || cin / g != cin_g || s == 0 {
            bail!(
                "fast convolution: input {cin} channels, weight {:?}, groups {g}",
                wl.dims()
            )
        }
        if bl.shape().dims1()? != cout {
            bail!(
                "fast convolution: bias of {} for {cout} outputs",
                bl.dims()[0]
            )
        }
        let (hp, wp) = (h + p.top + p.bottom, w + p.left + p.right);
        if hp < kh || wp < kw {
            bail!("fast convolution: input {h}x{w} smaller than kernel {kh}x{kw}")
        }
        let d = Dims {
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            ho: (hp - kh) / s + 1,
            wo: (wp - kw) / s + 1,
        };
        let x = f32_slice(xs, xl, "input")?;
        let wt = f32_slice(ws, wl, "weight")?;
        let b = f32_slice(bs, bl, "bias")?;
        let len = n * cout * d.ho * d.wo;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        {
            let dst = &mut out.spare_capacity_mut()[..len];
            if g == cin && g == cout {
                depthwise(x, wt, b, d, self.geo, self.act, dst);
            } else {
                gemm_conv(x, wt, b, d, self.geo, self.act, dst);
            }
        }
        // SAFETY: both kernels write every element of `dst` (the first `len` of the capacity).
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), (n, cout, d.ho, d.wo).into()))
    }
}

thread_local! {
    /// Per-thread im2col matrix and padded depthwise plane (of inference and of the training
    /// convolutions), reused across calls, layers and steps: a fresh buffer per call would be
    /// zeroed and page-faulted in every time.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `f` on `len` floats of this thread's scratch buffer (a fresh buffer if it is already in use).
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0f32; len]),
    })
}

/// The output buffer shared by the pieces of one image's GEMM, which write disjoint blocks of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the pieces write disjoint (row range x column range) blocks; the owner waits for them all.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

fn gemm_conv(
    x: &[f32],
    wt: &[f32],
    b: &[f32],
    d: Dims,
    geo: Geometry,
    act: Activation,
    out: &mut [MaybeUninit<f32>],
) {
    // Each image's GEMM is split across the threads rather than giving each thread its own image:
    // measured faster at batch 8 too (the threads share the packed weights in cache).
    let threads = rayon::current_num_threads().max(1);
    let image_out = d.cout * d.ho * d.wo;
    let image_in = d.cin * d.h * d.w;
    for (o, xi) in out.chunks_mut(image_out).zip(x.chunks(image_in)) {
        conv_image(xi, wt, b, d, geo, act, o, threads);
    }
}

/// One image: per group, im2col (unless 1x1 stride 1 unpadded), then GEMM with bias and activation,
/// split into `pieces` run in parallel.
#[allow(clippy::too_many_arguments)]
fn conv_image(
    x: &[f32],
    wt: &[f32],
    b: &[f32],
    d: Dims,
    geo: Geometry,
    act: Activation,
    out: &mut [MaybeUninit<f32>],
    pieces: usize,
) {
    let g = geo.groups;
    let (cin_g, cout_g) = (d.cin / g, d.cout / g);
    let k = cin_g * d.kh * d.kw;
    let plane = d.ho * d.wo;
    let direct = d.kh == 1 && d.kw == 1 && geo.stride == 1 && geo.pad == Pad::default();
    for gi in 0..g {
        let xg = &x[gi * cin_g * d.h * d.w..][..cin_g * d.h * d.w];
        let wg = &wt[gi * cout_g * k..][..cout_g * k];
        let bg = &b[gi * cout_g..][..cout_g];
        let og = OutPtr(
            out[gi * cout_g * plane..][..cout_g * plane]
                .as_mut_ptr()
                .cast::<f32>(),
        );
        let job = GemmJob {
            m: cout_g,
            n: plane,
            k,
            lhs: wg,
            bias: bg,
            act,
            dst: og,
        };
        if direct {
            job.run(xg, pieces);
        } else {
            with_scratch(k * plane, |col| {
                if pieces > 1 {
                    let per_channel = d.kh * d.kw * plane;
                    col.par_chunks_mut(per_channel)
                        .zip(xg.par_chunks(d.h * d.w))
                        .for_each(|(c, xc)| im2col(xc, 1, d, geo, c));
                } else {
                    im2col(xg, cin_g, d, geo, col);
                }
                job.run(col, pieces);
            });
        }
    }
}

/// dst (m x n) = act(lhs (m x k) · rhs (k x n) + bias), all row-major and contiguous.
struct GemmJob<'a> {
    m: usize,
    n: usize,
    k: usize,
    lhs: &'a [f32],
    bias: &'a [f32],
    act: Activation,
    dst: OutPtr,
}

impl GemmJob<'_> {
    /// Splits along the longer of m and n (the packed copy of the other operand is made once per
    /// piece, so that duplicate is the smaller one), in blocks aligned to the GEMM micro-kernel.
    fn run(&self, rhs: &[f32], pieces: usize) {
        debug_assert!(rhs.len() >= self.k * self.n && self.lhs.len() >= self.m * self.k);
        if pieces <= 1 {
            return self.block(rhs, 0..self.m, 0..self.n);
        }
        let split = |len: usize, align: usize| -> Vec<std::ops::Range<usize>> {
            let step = len.div_ceil(pieces).next_multiple_of(align);
            (0..len)
                .step_by(step.max(1))
                .map(|a| a..(a + step).min(len))
                .collect()
        };
        if self.n >= self.m {
            split(self.n, 48)
                .into_par_iter()
                .for_each(|cols| self.block(rhs, 0..self.m, cols));
        } else {
            split(self.m, 16)
                .into_par_iter()
                .for_each(|rows| self.block(rhs, rows, 0..self.n));
        }
    }

    fn block(&self, rhs: &[f32], rows: std::ops::Range<usize>, cols: std::ops::Range<usize>) {
        let (n, k) = (self.n, self.k);
        let (bm, bn) = (rows.len(), cols.len());
        // SAFETY: lhs rows, rhs columns and the dst block are in bounds of their buffers (m x k,
        // k x n, m x n row-major); read_dst = false, so dst is only written; blocks of concurrent
        // calls are disjoint.
        let dst = unsafe { self.dst.0.add(rows.start * n + cols.start) };
        unsafe {
            gemm::gemm(
                bm,
                bn,
                k,
                dst,
                1,
                n as isize,
                false,
                self.lhs.as_ptr().add(rows.start * k),
                1,
                k as isize,
                rhs.as_ptr().add(cols.start),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
        for (r, &bias) in rows.clone().zip(&self.bias[rows.start..]) {
            // SAFETY: GEMM has just written this row segment.
            let row =
                unsafe { std::slice::from_raw_parts_mut(self.dst.0.add(r * n + cols.start), bn) };
            for v in row {
                *v = self.act.apply(*v + bias);
            }
        }
    }
}

/// Writes the (cin · kh · kw) x (ho · wo) patch matrix of one image's channels `x` into `col`.
pub(crate) fn im2col(x: &[f32], channels: usize, d: Dims, geo: Geometry, col: &mut [f32]) {
    let (s, p) = (geo.stride, geo.pad);
    let plane = d.ho * d.wo;
    for c in 0..channels {
        let src = &x[c * d.h * d.w..][..d.h * d.w];
        for ki in 0..d.kh {
            for kj in 0..d.kw {
                let row = &mut col[((c * d.kh + ki) * d.kw + kj) * plane..][..plane];
                // Output columns whose input column ox·s + kj − left lies inside the image.
                let lo = p.left.saturating_sub(kj).div_ceil(s).min(d.wo);
                let hi = (d.w + p.left)
                    .saturating_sub(kj)
                    .div_ceil(s)
                    .clamp(lo, d.wo);
                for (oy, dst) in row.chunks_mut(d.wo).enumerate() {
                    let iy = (oy * s + ki) as isize - p.top as isize;
                    if iy < 0 || iy >= d.h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let line = &src[iy as usize * d.w..][..d.w];
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    if hi == lo {
                        continue;
                    }
                    let first = lo * s + kj - p.left;
                    if s == 1 {
                        dst[lo..hi].copy_from_slice(&line[first..first + hi - lo]);
                    } else {
                        for (v, ix) in dst[lo..hi].iter_mut().zip((first..).step_by(s)) {
                            *v = line[ix];
                        }
                    }
                }
            }
        }
    }
}

/// Zero columns after each row of the depthwise scratch plane, so that the last (partial) 8-lane
/// vector of an output row loads in bounds.
const ROW_MARGIN: usize = 8;

/// Depthwise convolution (one filter per channel), one output plane per task. The plane's zero-padded
/// input is split by column phase (column mod stride), so that every tap of a strided kernel reads a
/// contiguous run: padded column ox·s + kj is at index ox + kj / s of phase kj mod s.
fn depthwise(
    x: &[f32],
    wt: &[f32],
    b: &[f32],
    d: Dims,
    geo: Geometry,
    act: Activation,
    out: &mut [MaybeUninit<f32>],
) {
    let (s, p) = (geo.stride, geo.pad);
    let plane = d.ho * d.wo;
    let taps = d.kh * d.kw;
    let hp = d.h + p.top + p.bottom;
    let row_len = (d.w + p.left + p.right).div_ceil(s) + ROW_MARGIN;
    let mut geom = DepthwisePlane {
        hp,
        row_len,
        stride: s,
        d,
        act,
        taps: &[],
    };
    let tap_offsets: Vec<usize> = (0..taps).map(|t| geom.at(t / d.kw, t % d.kw)).collect();
    geom.taps = &tap_offsets;
    let work = |(i, o): (usize, &mut [MaybeUninit<f32>])| {
        let c = i % d.cout;
        let src = &x[i * d.h * d.w..][..d.h * d.w];
        let wp = d.w + p.left + p.right;
        // The plane, then one padded input row (rounded up to whole phases) for de-interleaving.
        let plane_len = s * hp * row_len;
        with_scratch(plane_len + wp.next_multiple_of(s), |scratch| {
            let (buf, line_buf) = scratch.split_at_mut(plane_len);
            buf.fill(0.0);
            line_buf.fill(0.0);
            for (y, line) in src.chunks(d.w).enumerate() {
                let row = y + p.top;
                if s == 1 {
                    buf[row * row_len + p.left..][..d.w].copy_from_slice(line);
                } else if s == 2 {
                    line_buf[p.left..p.left + d.w].copy_from_slice(line);
                    let (even, odd) = buf.split_at_mut(hp * row_len);
                    let (even, odd) = (&mut even[row * row_len..], &mut odd[row * row_len..]);
                    for ((pair, e), o) in line_buf.chunks_exact(2).zip(even).zip(odd) {
                        *e = pair[0];
                        *o = pair[1];
                    }
                } else {
                    line_buf[p.left..p.left + d.w].copy_from_slice(line);
                    for (j, phases) in line_buf.chunks_exact(s).enumerate() {
                        for (phase, &v) in phases.iter().enumerate() {
                            buf[(phase * hp + row) * row_len + j] = v;
                        }
                    }
                }
            }
            geom.run(buf, &wt[c * taps..][..taps], b[c], o);
        });
    };
    if plane * taps >= 4096 {
        out.par_chunks_mut(plane).enumerate().for_each(work);
    } else {
        out.chunks_mut(plane).enumerate().for_each(work);
    }
}

/// The layout of one depthwise task's scratch plane.
#[derive(Clone, Copy)]
struct DepthwisePlane<'a> {
    hp: usize,
    row_len: usize,
    stride: usize,
    d: Dims,
    act: Activation,
    /// Scratch index of each tap (ki, kj) for output (0, 0); output row oy adds oy · s · row_len.
    taps: &'a [usize],
}

impl DepthwisePlane<'_> {
    /// Index in the scratch plane of padded row `y`, padded column `x`.
    #[inline(always)]
    fn at(&self, y: usize, x: usize) -> usize {
        ((x % self.stride) * self.hp + y) * self.row_len + x / self.stride
    }

    fn run(&self, buf: &[f32], k: &[f32], bias: f32, out: &mut [MaybeUninit<f32>]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features; the loads stay in `buf` thanks to ROW_MARGIN.
            return unsafe { self.run_avx2(buf, k, bias, out) };
        }
        self.run_scalar(buf, k, bias, out)
    }

    fn run_scalar(&self, buf: &[f32], k: &[f32], bias: f32, out: &mut [MaybeUninit<f32>]) {
        let (d, s) = (self.d, self.stride);
        for (oy, row) in out.chunks_mut(d.wo).enumerate() {
            for (ox, o) in row.iter_mut().enumerate() {
                let mut acc = bias;
                for ki in 0..d.kh {
                    for kj in 0..d.kw {
                        acc += k[ki * d.kw + kj] * buf[self.at(oy * s + ki, ox * s + kj)];
                    }
                }
                o.write(self.act.apply(acc));
            }
        }
    }

    /// Blocks of up to four 8-lane vectors of one output row, each accumulated over all taps in
    /// registers (independent accumulators hide the FMA latency), then activated and stored once.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, buf: &[f32], k: &[f32], bias: f32, out: &mut [MaybeUninit<f32>]) {
        let d = self.d;
        for (oy, row) in out.chunks_mut(d.wo).enumerate() {
            let mut ox = 0;
            while ox < d.wo {
                // SAFETY: as for run_avx2.
                unsafe {
                    match (d.wo - ox).div_ceil(8) {
                        1 => self.block_avx2::<1>(buf, k, bias, oy, ox, row),
                        2 => self.block_avx2::<2>(buf, k, bias, oy, ox, row),
                        3 => self.block_avx2::<3>(buf, k, bias, oy, ox, row),
                        _ => self.block_avx2::<4>(buf, k, bias, oy, ox, row),
                    }
                }
                ox += 32;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_avx2<const NV: usize>(
        &self,
        buf: &[f32],
        k: &[f32],
        bias: f32,
        oy: usize,
        ox: usize,
        row: &mut [MaybeUninit<f32>],
    ) {
        use std::arch::x86_64::*;
        let d = self.d;
        let mut acc = [_mm256_set1_ps(bias); NV];
        let row0 = oy * self.stride * self.row_len + ox;
        for (&kw, &off) in k.iter().zip(self.taps) {
            let kv = _mm256_set1_ps(kw);
            let base = row0 + off;
            debug_assert!(base + NV * 8 <= buf.len());
            for (v, a) in acc.iter_mut().enumerate() {
                // SAFETY: base + 8·NV ≤ the plane's end (ROW_MARGIN columns after each row).
                let x = unsafe { _mm256_loadu_ps(buf.as_ptr().add(base + v * 8)) };
                *a = _mm256_fmadd_ps(kv, x, *a);
            }
        }
        let (lo, hi) = self.act.bounds();
        let mut lanes = [0f32; 8];
        for (v, a) in acc.iter().enumerate() {
            let a = if self.act == Activation::Identity {
                *a
            } else {
                _mm256_min_ps(_mm256_max_ps(*a, _mm256_set1_ps(lo)), _mm256_set1_ps(hi))
            };
            let start = ox + v * 8;
            let n = d.wo.saturating_sub(start).min(8);
            if n == 8 {
                // SAFETY: row[start..start + 8] is in bounds.
                unsafe { _mm256_storeu_ps(row.as_mut_ptr().add(start).cast(), a) };
                continue;
            }
            // SAFETY: `lanes` holds 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), a) };
            for (o, &l) in row[start..start + n].iter_mut().zip(&lanes) {
                o.write(l);
            }
        }
    }
}

/// In-place `a = act(a + b)`.
struct AddAct(Activation);

impl InplaceOp2 for AddAct {
    fn name(&self) -> &'static str {
        "histolens-add-act"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<()> {
        let b = f32_slice(bs, bl, "addend")?;
        let CpuStorage::F32(a) = dst else {
            bail!("fast add: destination must be f32")
        };
        let Some((start, end)) = dst_l.contiguous_offsets() else {
            bail!("fast add: destination must be contiguous")
        };
        let a = &mut a[start..end];
        if a.len() != b.len() {
            bail!("fast add: {} and {} elements", a.len(), b.len())
        }
        let act = self.0;
        let run = |(a, b): (&mut [f32], &[f32])| {
            for (x, &y) in a.iter_mut().zip(b) {
                *x = act.apply(*x + y);
            }
        };
        if a.len() > 2 * CHUNK && histolens_kernels::threads() > 1 {
            a.par_chunks_mut(CHUNK)
                .zip(b.par_chunks(CHUNK))
                .for_each(run);
        } else {
            run((a, b));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fast path against candle's convolution (explicit padding, bias, activation) on awkward sizes.
    fn check(n: usize, cin: usize, cout: usize, k: (usize, usize), geo: Geometry, act: Activation) {
        let dev = Device::Cpu;
        let x = Tensor::rand(-1f32, 1., (n, cin, 11, 9), &dev).unwrap();
        let w = Tensor::rand(-1f32, 1., (cout, cin / geo.groups, k.0, k.1), &dev).unwrap();
        let b = Tensor::rand(-1f32, 1., cout, &dev).unwrap();
        let fast = conv2d(&x, &w, &b, geo, act).unwrap();
        let p = geo.pad;
        let reference = x
            .pad_with_zeros(2, p.top, p.bottom)
            .unwrap()
            .pad_with_zeros(3, p.left, p.right)
            .unwrap()
            .conv2d(&w, 0, geo.stride, 1, geo.groups)
            .unwrap()
            .broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap())
            .unwrap();
        let reference = act.apply_tensor(&reference).unwrap();
        assert_eq!(fast.dims(), reference.dims(), "{geo:?} {k:?}");
        let diff = (fast - reference)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "{geo:?} {k:?} {act:?}: max difference {diff}");
    }

    fn geo(stride: usize, pad: (usize, usize, usize, usize), groups: usize) -> Geometry {
        Geometry {
            stride,
            pad: Pad {
                top: pad.0,
                bottom: pad.1,
                left: pad.2,
                right: pad.3,
            },
            groups,
        }
    }

    #[test]
    fn matches_candle_convolution() {
        use Activation::*;
        check(2, 5, 7, (1, 1), geo(1, (0, 0, 0, 0), 1), Identity);
        check(1, 5, 7, (1, 1), geo(2, (0, 0, 0, 0), 1), Relu);
        check(3, 4, 6, (3, 3), geo(1, (1, 1, 1, 1), 1), Relu);
        check(2, 3, 8, (7, 7), geo(2, (3, 3, 3, 3), 1), Relu);
        check(1, 4, 4, (1, 7), geo(1, (0, 0, 3, 3), 1), Relu6);
        check(1, 4, 4, (7, 1), geo(1, (3, 3, 0, 0), 1), Relu);
        check(2, 3, 5, (3, 3), geo(2, (0, 1, 0, 1), 1), Relu6); // TF "SAME"
        check(2, 6, 6, (3, 3), geo(1, (1, 1, 1, 1), 6), Relu6); // depthwise
        check(2, 6, 6, (5, 5), geo(2, (1, 2, 1, 2), 6), Identity); // depthwise, stride 2, SAME
        check(1, 6, 4, (3, 3), geo(1, (1, 1, 1, 1), 2), Relu); // grouped
        check(1, 4, 4, (3, 3), geo(3, (1, 1, 2, 0), 4), Relu); // depthwise, stride 3
        check(1, 2, 3, (5, 5), geo(3, (0, 0, 0, 0), 1), Identity); // stride larger than output
    }

    #[test]
    fn gradient_tracking_falls_back_to_candle() {
        let dev = Device::Cpu;
        let x =
            candle_core::Var::from_tensor(&Tensor::rand(-1f32, 1., (1, 2, 5, 5), &dev).unwrap())
                .unwrap();
        let w = Tensor::rand(-1f32, 1., (3, 2, 3, 3), &dev).unwrap();
        let b = Tensor::zeros(3, DType::F32, &dev).unwrap();
        let y = conv2d(
            x.as_tensor(),
            &w,
            &b,
            geo(1, (1, 1, 1, 1), 1),
            Activation::Relu,
        )
        .unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
    }

    #[test]
    fn add_act_in_place() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[-2f32, 1.], [3., -4.]], &dev).unwrap();
        let b = Tensor::new(&[[1f32, 1.], [4., 1.]], &dev).unwrap();
        let y = add_act(a, &b, Activation::Relu6).unwrap();
        assert_eq!(
            y.to_vec2::<f32>().unwrap(),
            vec![vec![0., 2.], vec![6., 0.]]
        );
    }

    /// The fused activations and their gradients against candle's relu and clamp (over more than
    /// two of the chunks they run in).
    #[test]
    fn fused_activations_match_candle() {
        let dev = Device::Cpu;
        for act in [Activation::Relu, Activation::Relu6] {
            let x = candle_core::Var::from_tensor(
                &(Tensor::randn(0f32, 4., (3, 110, 110), &dev).unwrap()),
            )
            .unwrap();
            let ours = act.apply_tensor(x.as_tensor()).unwrap();
            let theirs = match act {
                Activation::Relu => x.as_tensor().relu().unwrap(),
                _ => x.as_tensor().clamp(0f32, 6f32).unwrap(),
            };
            let d = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
            let weigh = Tensor::randn(0f32, 1., (3, 110, 110), &dev).unwrap();
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
            let (a, b) = (
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap(),
            );
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{act:?}");
        }
    }
}
