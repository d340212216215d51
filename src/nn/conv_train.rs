//! Dense convolution for training, forward and backward.
//!
//! candle's CPU convolution backward runs a transposed convolution as a direct loop of dot products
//! (the slowest part of a training step). Here:
//! - the forward pass runs on inference's blocked kernels (`histolens_kernels`: a direct convolution
//!   without patches, Winograd for 3x3 stride 1) through a blocked copy of the input, with the
//!   weights packed anew at each call (they change at every step);
//! - the input gradient of a stride-1 convolution is itself a stride-1 convolution (of the output
//!   gradient, by the weights transposed and turned by 180°, with the complementary padding) and
//!   runs on the same kernels;
//! - the weight gradient of a 3x3 stride-1 convolution is Winograd's (`winograd_grad.rs`);
//! - everything else (the other weight gradients, the strided input gradients, a CPU without AVX2)
//!   is im2col + GEMM: each image's convolution is a matrix product of the weights (Cout x Cin·kh·kw)
//!   with the image's patches, on the `gemm` crate, and the patches' own gradient is a scatter back
//!   into the input (col2im). The patches are never kept: one image's at a time is built in a
//!   per-thread buffer (what autograd keeps is the input, a ninth of a 3x3 convolution's patches).
//!   A 1x1 convolution with stride 1 and no padding needs no patches at all.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::blocked::{kernel_err, kernel_output};
use super::cpu_conv::{self, Dims, Geometry, f32_slice, with_scratch};
use histolens_kernels::{Act, ConvSpec, Input, Isa, PackedConv, Pad};

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

/// One plane's input (h, w) and output (oh, ow) sizes.
#[derive(Clone, Copy)]
pub(crate) struct Planes {
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
}

/// `conv(x, w)` for x (N, Cin, H, W) and w (Cout, Cin, kh, kw), f32 on the CPU, no groups, dilation 1;
/// differentiable in both.
pub fn conv2d_train(x: &Tensor, w: &Tensor, stride: usize, pad: Pad) -> Result<Tensor> {
    let (_, cin, _, _) = x.dims4()?;
    let (_, cin_w, kh, kw) = w.dims4()?;
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
    x.contiguous()?.apply_op2(&w.contiguous()?, Forward(g))
}

/// (x, w) → y.
struct Forward(Geo);
/// (grad_y, w) → grad_x, for an input of (H, W).
struct GradInput(Geo, usize, usize);
/// (x, grad_y) → grad_w.
struct GradWeight(Geo);

/// The sizes of one call: batch, input channels and plane, output channels and plane.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    oh: usize,
    ow: usize,
}

impl Sizes {
    fn new(g: Geo, input: (usize, usize, usize, usize), cout: usize) -> Result<Self> {
        let (n, cin, h, w) = input;
        let (oh, ow) = g.output(h, w)?;
        Ok(Sizes {
            n,
            cin,
            h,
            w,
            cout,
            oh,
            ow,
        })
    }

    /// Rows of the patch matrix (Cin·kh·kw), its columns (output pixels), an input image's floats.
    fn k(&self, g: Geo) -> usize {
        self.cin * g.kh * g.kw
    }

    fn p(&self) -> usize {
        self.oh * self.ow
    }

    fn image(&self) -> usize {
        self.cin * self.h * self.w
    }
}

/// Whether a convolution is a plain matrix product (1x1, stride 1, no padding): no patches.
fn pointwise(g: Geo) -> bool {
    g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == Pad::symmetric(0, 0)
}

/// A matrix view for [`gemm`]: data, rows, columns, row stride, column stride.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A row-major rows x cols matrix.
    fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major cols x rows matrix.
    fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            row_stride: 1,
            col_stride: rows,
        }
    }
}

/// dst (a.rows x b.cols, row-major) = a · b, or += when `accumulate`.
fn gemm(dst: &mut [f32], a: Mat, b: Mat, accumulate: bool, par: gemm::Parallelism) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k && dst.len() >= m * n && a.data.len() >= m * k && b.data.len() >= k * n,
        "gemm: shapes do not fit their buffers"
    );
    // SAFETY: the strides of a row-major matrix or of its transpose reach only indices below
    // rows x cols, which the assertion bounds by each slice's length; dst is exclusively borrowed.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Runs `f(image, state)` for each image: across the pool, one image per thread (each GEMM on one
/// thread), when there are at least as many images as threads; else one image after another, each
/// GEMM across the pool. Returns the states (one per piece of work) and the GEMM parallelism to use.
fn per_image<S: Send>(
    n: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(usize, &mut S, gemm::Parallelism) + Sync + Send,
) -> Vec<S> {
    let threads = rayon::current_num_threads().max(1);
    if n >= threads && threads > 1 {
        (0..n)
            .into_par_iter()
            .fold(&init, |mut s, i| {
                f(i, &mut s, gemm::Parallelism::None);
                s
            })
            .collect()
    } else {
        let mut s = init();
        let par = pool_parallelism();
        for i in 0..n {
            f(i, &mut s, par);
        }
        vec![s]
    }
}

/// Writes one image's (Cin·kh·kw) x (oh·ow) patch matrix into `cols` (the inference path's).
fn im2col(x: &[f32], g: Geo, z: Sizes, cols: &mut [f32]) {
    let dims = Dims {
        cin: z.cin,
        h: z.h,
        w: z.w,
        cout: z.cout,
        kh: g.kh,
        kw: g.kw,
        ho: z.oh,
        wo: z.ow,
    };
    let geo = Geometry {
        stride: g.stride,
        pad: g.pad,
        groups: 1,
    };
    cpu_conv::im2col(x, z.cin, dims, geo, cols);
}

/// Adds one image's patch-matrix gradient back into its input gradient `x`: row r of it is
/// `cols[r · row_stride..][..p]` (row_stride p for one image alone, wider when images sit side by side).
fn col2im(cols: &[f32], row_stride: usize, g: Geo, z: Sizes, x: &mut [f32]) {
    super::simd::vectorized(|| col2im_rows(cols, row_stride, g, z, x));
}

#[inline(always)]
fn col2im_rows(cols: &[f32], row_stride: usize, g: Geo, z: Sizes, x: &mut [f32]) {
    let p = z.p();
    for (c, xout) in x.chunks_exact_mut(z.h * z.w).enumerate().take(z.cin) {
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = &cols[((c * g.kh + ky) * g.kw + kx) * row_stride..][..p];
                let span = g.columns(kx, z.w, z.ow);
                for oy in 0..z.oh {
                    let Some(iy) = g.row(oy, ky, z.h) else {
                        continue;
                    };
                    let grow = &row[oy * z.ow..(oy + 1) * z.ow];
                    let xrow = &mut xout[iy * z.w..(iy + 1) * z.w];
                    if g.stride == 1 {
                        // Unit stride: one slice added to another, vectorised.
                        let first = span.start + kx - g.pad.left;
                        let dst = &mut xrow[first..first + span.len()];
                        for (d, &v) in dst.iter_mut().zip(&grow[span.clone()]) {
                            *d += v;
                        }
                    } else {
                        for ox in span.clone() {
                            xrow[ox * g.stride + kx - g.pad.left] += grow[ox];
                        }
                    }
                }
            }
        }
    }
}

/// Images per GEMM. Each GEMM packs its whole left matrix (the weights, or their transpose) once, so
/// for small planes (ResNet's 14x14 and 7x7 stages) several images' patch matrices are set side by
/// side and multiplied at once (ResNet-18's training step 2-7% faster); larger planes keep one GEMM
/// per image (one per thread), and memory stays per image.
fn images_per_gemm(z: Sizes, k: usize) -> usize {
    const MAX_COLUMNS: usize = 800;
    const MAX_FLOATS: usize = 1 << 23;
    if z.p() > MAX_COLUMNS / 2 {
        return 1;
    }
    (MAX_COLUMNS / z.p())
        .min(MAX_FLOATS / (k * z.p()).max(1))
        .clamp(1, z.n)
}

/// Images 0..n in consecutive groups of `group` (the last one shorter).
fn image_groups(n: usize, group: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..n)
        .step_by(group.max(1))
        .map(move |i| i..(i + group).min(n))
}

/// The images `imgs` side by side: `dst` (rows x imgs.len()·p) from `src` ((n, rows, p) row-major).
fn gather(src: &[f32], rows: usize, p: usize, imgs: std::ops::Range<usize>, dst: &mut Vec<f32>) {
    let width = imgs.len() * p;
    dst.resize(rows * width, 0.0);
    for (j, i) in imgs.enumerate() {
        for r in 0..rows {
            dst[r * width + j * p..][..p].copy_from_slice(&src[(i * rows + r) * p..][..p]);
        }
    }
}

/// The inverse of [`gather`]: `src` (rows x imgs.len()·p) back into `dst` ((n, rows, p)).
fn scatter(src: &[f32], rows: usize, p: usize, imgs: std::ops::Range<usize>, dst: &mut [f32]) {
    let width = imgs.len() * p;
    for (j, i) in imgs.enumerate() {
        for r in 0..rows {
            dst[(i * rows + r) * p..][..p].copy_from_slice(&src[r * width + j * p..][..p]);
        }
    }
}

/// The patch matrices of images `imgs` side by side (K x imgs.len()·p) in `dst`; `tmp` is scratch.
fn patches(
    x: &[f32],
    g: Geo,
    z: Sizes,
    imgs: std::ops::Range<usize>,
    dst: &mut Vec<f32>,
    tmp: &mut Vec<f32>,
) {
    let (k, p) = (z.k(g), z.p());
    if pointwise(g) {
        return gather(x, k, p, imgs, dst);
    }
    let width = imgs.len() * p;
    dst.resize(k * width, 0.0);
    tmp.resize(k * p, 0.0);
    for (j, i) in imgs.enumerate() {
        im2col(&x[i * z.image()..(i + 1) * z.image()], g, z, tmp);
        for r in 0..k {
            dst[r * width + j * p..][..p].copy_from_slice(&tmp[r * p..][..p]);
        }
    }
}

/// The instruction set of the blocked kernels, where a convolution of this geometry runs on them:
/// not a 1x1 one (a plain matrix product, faster on the GEMM without the layout changes), and not
/// without AVX2 or AVX-512 or with `HISTOLENS_BLOCKED=off`.
fn blocked_isa(g: Geo) -> Option<Isa> {
    (g.kh * g.kw > 1).then(Isa::detect).flatten()
}

/// `conv(x, wt)` as (n, cout, oh, ow) on the blocked kernels, or None where [`blocked_isa`] says
/// they do not apply.
fn blocked_conv(x: &[f32], wt: &[f32], z: Sizes, g: Geo) -> Result<Option<Vec<f32>>> {
    let Some(isa) = blocked_isa(g) else {
        return Ok(None);
    };
    let spec = ConvSpec {
        cin: z.cin,
        cout: z.cout,
        kh: g.kh,
        kw: g.kw,
        stride: g.stride,
        depthwise: false,
    };
    let l = isa.lanes();
    // Fewer channels than a vector (an image's three): read as they are, not padded out to a vector.
    let input = if z.cin < l {
        Input::Nchw
    } else {
        Input::Blocked
    };
    let packed = PackedConv::new(isa, spec, input, wt, &vec![0.0; z.cout]).map_err(kernel_err)?;
    let len = z.n * z.cout.div_ceil(l) * l * z.p();
    // The blocked copy of the input lives only as long as the convolution.
    let yb = {
        let blocked_x;
        let x = match input {
            Input::Blocked => {
                blocked_x = kernel_output(packed.input_len(z.n, z.h, z.w), |out| {
                    histolens_kernels::to_blocked(isa, x, (z.n, z.cin, z.h, z.w), out)
                })?;
                &blocked_x
            }
            Input::Nchw => x,
        };
        kernel_output(len, |out| {
            packed.run(x, (z.n, z.h, z.w), g.pad, Act::Identity, None, out)
        })?
    };
    let y = kernel_output(z.n * z.cout * z.p(), |out| {
        histolens_kernels::to_nchw(isa, &yb, (z.n, z.cout, z.oh, z.ow), out)
    })?;
    Ok(Some(y))
}

/// The input gradient of a stride-1 convolution as a convolution: of `gy` by the weights transposed
/// (Cin, Cout, kh, kw) and turned by 180°, padded by kernel − 1 − the forward padding on each side.
/// None for strides above 1, a padding wider than the kernel, or where the blocked kernels do not apply.
fn blocked_grad_input(gy: &[f32], wt: &[f32], z: Sizes, g: Geo) -> Result<Option<Vec<f32>>> {
    if g.stride != 1 || blocked_isa(g).is_none() {
        return Ok(None);
    }
    let complement = |k: usize, p: usize| (k - 1).checked_sub(p);
    let (Some(top), Some(bottom), Some(left), Some(right)) = (
        complement(g.kh, g.pad.top),
        complement(g.kh, g.pad.bottom),
        complement(g.kw, g.pad.left),
        complement(g.kw, g.pad.right),
    ) else {
        return Ok(None);
    };
    let taps = g.kh * g.kw;
    let mut turned = vec![0f32; wt.len()];
    for (o, filters) in wt.chunks_exact(z.cin * taps).enumerate() {
        for (c, kernel) in filters.chunks_exact(taps).enumerate() {
            let dst = &mut turned[(c * z.cout + o) * taps..][..taps];
            for (d, &v) in dst.iter_mut().zip(kernel.iter().rev()) {
                *d = v;
            }
        }
    }
    let transposed = Sizes {
        n: z.n,
        cin: z.cout,
        h: z.oh,
        w: z.ow,
        cout: z.cin,
        oh: z.h,
        ow: z.w,
    };
    let geo = Geo {
        pad: Pad {
            top,
            bottom,
            left,
            right,
        },
        ..g
    };
    blocked_conv(gy, &turned, transposed, geo)
}

/// GEMM parallelism for one GEMM at a time over the whole pool.
fn pool_parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    }
}

/// A buffer of `len` floats shared out to one thread at a time (disjoint per-image output slices).
struct Out(*mut f32, usize);
// SAFETY: each image's slice of the buffer is written by one thread only (see `image_mut`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The `i`-th `size`-float slice. Safety: no two live slices may share an index.
    #[allow(clippy::mut_from_ref)]
    unsafe fn image_mut(&self, i: usize, size: usize) -> &mut [f32] {
        debug_assert!((i + 1) * size <= self.1);
        // SAFETY: in bounds (checked above in debug builds, by construction in callers); disjoint by
        // the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(i * size), size) }
    }
}

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "histolens-conv"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = f32_slice(xs, xl, "convolution input")?;
        let wt = f32_slice(ws, wl, "convolution weights")?;
        let z = Sizes::new(g, xl.shape().dims4()?, wl.shape().dims4()?.0)?;
        let (k, p) = (z.k(g), z.p());
        if let Some(y) = blocked_conv(x, wt, z, g)? {
            return Ok((CpuStorage::F32(y), Shape::from((z.n, z.cout, z.oh, z.ow))));
        }
        let mut y = vec![0f32; z.n * z.cout * p];
        let group = images_per_gemm(z, k);
        if group > 1 {
            let (mut b, mut tmp, mut wide) = (Vec::new(), Vec::new(), Vec::new());
            for imgs in image_groups(z.n, group) {
                let width = imgs.len() * p;
                patches(x, g, z, imgs.clone(), &mut b, &mut tmp);
                wide.resize(z.cout * width, 0.0);
                let (a, bm) = (Mat::rows(wt, z.cout, k), Mat::rows(&b, k, width));
                gemm(&mut wide, a, bm, false, pool_parallelism());
                scatter(&wide, z.cout, p, imgs, &mut y);
            }
            return Ok((CpuStorage::F32(y), Shape::from((z.n, z.cout, z.oh, z.ow))));
        }
        let out = Out(y.as_mut_ptr(), y.len());
        per_image(
            z.n,
            || (),
            |i, _, par| {
                let xi = &x[i * z.image()..(i + 1) * z.image()];
                // SAFETY: image i's output slice is written by this call only.
                let yi = unsafe { out.image_mut(i, z.cout * p) };
                let a = Mat::rows(wt, z.cout, k);
                if pointwise(g) {
                    gemm(yi, a, Mat::rows(xi, k, p), false, par);
                } else {
                    with_scratch(k * p, |cols| {
                        im2col(xi, g, z, cols);
                        gemm(yi, a, Mat::rows(cols, k, p), false, par);
                    });
                }
            },
        );
        Ok((CpuStorage::F32(y), Shape::from((z.n, z.cout, z.oh, z.ow))))
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
        // No gradient for an input that has none to receive it (a network's image).
        let gx = if x.track_op() {
            Some(gy.apply_op2_no_bwd(w, &GradInput(self.0, h, wd))?)
        } else {
            None
        };
        let gw = x.apply_op2_no_bwd(&gy, &GradWeight(self.0))?;
        Ok((gx, Some(gw)))
    }
}

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "histolens-conv-grad-input"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let GradInput(g, h, w) = *self;
        let gy = f32_slice(gs, gl, "convolution output gradient")?;
        let wt = f32_slice(ws, wl, "convolution weights")?;
        let (n, cout, _, _) = gl.shape().dims4()?;
        let z = Sizes::new(g, (n, wl.shape().dims4()?.1, h, w), cout)?;
        let (k, p) = (z.k(g), z.p());
        if let Some(gx) = blocked_grad_input(gy, wt, z, g)? {
            return Ok((CpuStorage::F32(gx), Shape::from((n, z.cin, h, w))));
        }
        let mut gx = vec![0f32; n * z.image()];
        let group = images_per_gemm(z, k);
        if group > 1 {
            let (mut gyw, mut cols) = (Vec::new(), Vec::new());
            for imgs in image_groups(n, group) {
                let width = imgs.len() * p;
                gather(gy, cout, p, imgs.clone(), &mut gyw);
                cols.resize(k * width, 0.0);
                let (wt_t, gym) = (Mat::transposed(wt, k, cout), Mat::rows(&gyw, cout, width));
                gemm(&mut cols, wt_t, gym, false, pool_parallelism());
                if pointwise(g) {
                    scatter(&cols, z.cin, p, imgs, &mut gx);
                    continue;
                }
                // Each image's input gradient is its own slice: one thread each.
                gx[imgs.start * z.image()..imgs.end * z.image()]
                    .par_chunks_mut(z.image())
                    .enumerate()
                    .for_each(|(j, gxi)| col2im(&cols[j * p..], width, g, z, gxi));
            }
            return Ok((CpuStorage::F32(gx), Shape::from((n, z.cin, h, w))));
        }
        let out = Out(gx.as_mut_ptr(), gx.len());
        per_image(
            n,
            || (),
            |i, _, par| {
                let gyi = &gy[i * cout * p..(i + 1) * cout * p];
                // SAFETY: image i's gradient slice is written by this call only.
                let gxi = unsafe { out.image_mut(i, z.image()) };
                let (wt_t, gyi) = (Mat::transposed(wt, k, cout), Mat::rows(gyi, cout, p));
                if pointwise(g) {
                    gemm(gxi, wt_t, gyi, false, par);
                } else {
                    with_scratch(k * p, |cols| {
                        gemm(cols, wt_t, gyi, false, par);
                        col2im(cols, p, g, z, gxi);
                    });
                }
            },
        );
        Ok((CpuStorage::F32(gx), Shape::from((n, z.cin, h, w))))
    }
}

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "histolens-conv-grad-weight"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = f32_slice(xs, xl, "convolution input")?;
        let gy = f32_slice(gs, gl, "convolution output gradient")?;
        let z = Sizes::new(g, xl.shape().dims4()?, gl.shape().dims4()?.1)?;
        let (k, p) = (z.k(g), z.p());
        if g.kh == 3 && g.kw == 3 && g.stride == 1 {
            let planes = Planes {
                h: z.h,
                w: z.w,
                oh: z.oh,
                ow: z.ow,
            };
            let gw =
                super::winograd_grad::grad_weight_3x3(x, gy, (z.n, z.cin, z.cout), planes, g.pad);
            return Ok((CpuStorage::F32(gw), Shape::from((z.cout, z.cin, 3, 3))));
        }
        let group = images_per_gemm(z, k);
        if group > 1 {
            let mut gw = vec![0f32; z.cout * k];
            let (mut b, mut tmp, mut gyw) = (Vec::new(), Vec::new(), Vec::new());
            for imgs in image_groups(z.n, group) {
                let width = imgs.len() * p;
                patches(x, g, z, imgs.clone(), &mut b, &mut tmp);
                gather(gy, z.cout, p, imgs, &mut gyw);
                let (gym, b_t) = (
                    Mat::rows(&gyw, z.cout, width),
                    Mat::transposed(&b, width, k),
                );
                gemm(&mut gw, gym, b_t, true, pool_parallelism());
            }
            return Ok((
                CpuStorage::F32(gw),
                Shape::from((z.cout, z.cin, g.kh, g.kw)),
            ));
        }
        // Each piece of work sums its images' products into its own (Cout x K) accumulator.
        let parts = per_image(
            z.n,
            || vec![0f32; z.cout * k],
            |i, acc: &mut Vec<f32>, par| {
                let xi = &x[i * z.image()..(i + 1) * z.image()];
                let gyi = Mat::rows(&gy[i * z.cout * p..(i + 1) * z.cout * p], z.cout, p);
                if pointwise(g) {
                    gemm(acc, gyi, Mat::transposed(xi, p, k), true, par);
                } else {
                    with_scratch(k * p, |cols| {
                        im2col(xi, g, z, cols);
                        gemm(acc, gyi, Mat::transposed(cols, p, k), true, par);
                    });
                }
            },
        );
        let mut gw = vec![0f32; z.cout * k];
        for acc in parts {
            for (a, b) in gw.iter_mut().zip(&acc) {
                *a += b;
            }
        }
        Ok((
            CpuStorage::F32(gw),
            Shape::from((z.cout, z.cin, g.kh, g.kw)),
        ))
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

    #[test]
    fn small_planes_share_a_gemm() {
        let g = Geo {
            kh: 3,
            kw: 3,
            stride: 1,
            pad: Pad::symmetric(1, 1),
        };
        let sizes = |n, side| Sizes::new(g, (n, 64, side, side), 64).unwrap();
        let group = |n, side| images_per_gemm(sizes(n, side), 64 * 9);
        assert_eq!(group(8, 7), 8);
        assert_eq!(group(3, 17), 2);
        assert_eq!(group(8, 21), 1);
        assert_eq!(group(1, 7), 1);
    }

    /// Forward and both gradients against candle's convolution (where its backward works: no
    /// remainder left by the stride), for 1x1, 3x3 and 7x7 kernels, strides 1 and 2, padding, and
    /// planes small enough to share a GEMM between images or large enough to have one each.
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
            // Planes of 289 pixels: two images per GEMM, the third alone (a partial group).
            (3, 1, 1, 17, 17),
            (1, 1, 0, 17, 17),
            // Planes of 441 pixels: one GEMM per image.
            (3, 1, 1, 21, 21),
            (1, 1, 0, 21, 21),
        ];
        // Three input channels: read as NCHW; 20 into 18: blocked, over a partial block of channels
        // each way (16 lanes on AVX-512, 8 on AVX2), Winograd for 3x3 stride 1.
        let channels = [(3, 5), (20, 18)];
        for ((k, stride, p, h, w), (cin, cout)) in
            cases.into_iter().flat_map(|c| channels.map(|ch| (c, ch)))
        {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1., (3, cin, h, w), &dev).unwrap()).unwrap();
            let wt = Var::from_tensor(&Tensor::randn(0f32, 1., (cout, cin, k, k), &dev).unwrap())
                .unwrap();
            let pad = Pad::symmetric(p, p);
            let ours = conv2d_train(x.as_tensor(), wt.as_tensor(), stride, pad).unwrap();
            let theirs = x
                .as_tensor()
                .conv2d(wt.as_tensor(), p, stride, 1, 1)
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "k {k} s {stride} p {p}");
            // Winograd's transforms round differently from a direct sum; every other path within 1e-5.
            let winograd = k == 3 && stride == 1 && cin == 20;
            let tolerance = if winograd { 1e-4 } else { 1e-5 };
            assert!(
                max_rel(&ours, &theirs) < tolerance,
                "forward k {k} s {stride} p {p} {cin}->{cout}"
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
                    "{what} gradient k {k} s {stride} p {p} {cin}->{cout}"
                );
            }
        }
    }

    /// An input that tracks no gradient (a network's image) gets none; the weights' is unchanged.
    #[test]
    fn no_input_gradient_for_a_constant_input() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 9, 9), &dev).unwrap();
        let wt = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 3, 3, 3), &dev).unwrap()).unwrap();
        let y = conv2d_train(&x, wt.as_tensor(), 2, Pad::symmetric(1, 1)).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        let theirs = x.conv2d(wt.as_tensor(), 1, 2, 1, 1).unwrap();
        let expected = theirs.sum_all().unwrap().backward().unwrap();
        let (a, b) = (
            grads.get(wt.as_tensor()).unwrap(),
            expected.get(wt.as_tensor()).unwrap(),
        );
        assert!(max_rel(a, b) < 1e-4);
    }

    /// Both gradients against finite differences, with asymmetric padding and a stride that leaves
    /// a remainder.
    #[test]
    fn gradients_match_finite_differences() {
        // Stride 2 on im2col + GEMM; stride 1 on Winograd (weight gradient) and the blocked kernels
        // (input gradient, with the complementary padding as asymmetric as this one).
        for stride in [2, 1] {
            finite_differences(stride);
        }
    }

    fn finite_differences(stride: usize) {
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
            let y: Vec<f32> = conv2d_train(&x, &w, stride, pad)
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
        let y = conv2d_train(xv.as_tensor(), wv.as_tensor(), stride, pad).unwrap();
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
                "weight {i}, stride {stride}"
            );
        }
        for (i, &a) in flat(&xv).iter().enumerate() {
            let (mut up, mut down) = (x0.clone(), x0.clone());
            up[i] += eps;
            down[i] -= eps;
            let fd = (loss(&up, &w0) - loss(&down, &w0)) / (2.0 * f64::from(eps));
            assert!(
                (fd - f64::from(a)).abs() / fd.abs().max(1.0) < 1e-3,
                "input {i}, stride {stride}"
            );
        }
    }
}
