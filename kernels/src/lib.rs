//! Channel-blocked ("NCHWc") CPU kernels for histolens' inference, the layout onnxruntime's MLAS
//! uses: an activation (N, C, H, W) is stored as (N, ⌈C/L⌉, H, W, L) with L = the vector width
//! (16 floats on AVX-512, 8 on AVX2), channels padded with zeros. Every pixel's L channels are one
//! vector, so
//! - a dense convolution is a direct one, without im2col: each step loads a few output-channel
//!   vectors of weights and broadcasts a few input pixels (register tiles of up to 4 x 6 vectors);
//! - a depthwise convolution is one fused multiply-add per tap and pixel, a vector of channels each;
//! - padding costs nothing: taps that fall outside the image are skipped, row by row.
//!
//! Weights are packed once ([`PackedConv`]); the kernels are pure functions of slices, with no
//! tensor library: histolens' `nn::blocked` wraps them as candle operations.

mod conv;
mod fused;
mod layout;
mod mbconv;
mod simd;
mod winograd;

pub use layout::{global_avg_pool, max_pool, to_blocked, to_nchw};

use std::mem::MaybeUninit;
use std::sync::OnceLock;

thread_local! {
    static ONE_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the kernels called on this thread kept on it (no splitting across the rayon pool):
/// for callers that already give each thread its own images.
pub fn on_this_thread<R>(f: impl FnOnce() -> R) -> R {
    let before = ONE_THREAD.with(|c| c.replace(true));
    let r = f();
    ONE_THREAD.with(|c| c.set(before));
    r
}

/// The threads a kernel called here may split its work across.
pub fn threads() -> usize {
    if ONE_THREAD.with(|c| c.get()) {
        1
    } else {
        rayon::current_num_threads().max(1)
    }
}

/// `f(index, chunk)` for the `size`-float chunks of `out`, across the pool where [`threads`] allows.
pub(crate) fn for_each_chunk<T: Send>(
    out: &mut [T],
    size: usize,
    f: impl Fn(usize, &mut [T]) + Send + Sync,
) {
    use rayon::prelude::*;
    if threads() > 1 {
        out.par_chunks_mut(size.max(1))
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        out.chunks_mut(size.max(1))
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// The instruction set the kernels run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
}

impl Isa {
    /// The best instruction set of this CPU, or `None` where the blocked kernels do not run.
    /// `HISTOLENS_BLOCKED=off` turns them off, `=avx2` keeps AVX-512 machines on AVX2.
    pub fn detect() -> Option<Isa> {
        static ISA: OnceLock<Option<Isa>> = OnceLock::new();
        *ISA.get_or_init(|| {
            let choice = std::env::var("HISTOLENS_BLOCKED").unwrap_or_default();
            if choice == "off" || choice == "0" {
                return None;
            }
            let supported = Isa::supported();
            if choice == "avx2" && supported.contains(&Isa::Avx2) {
                return Some(Isa::Avx2);
            }
            supported.first().copied()
        })
    }

    /// The instruction sets this CPU can run, best first.
    pub fn supported() -> &'static [Isa] {
        static SUPPORTED: OnceLock<Vec<Isa>> = OnceLock::new();
        SUPPORTED.get_or_init(Isa::probe)
    }

    fn probe() -> Vec<Isa> {
        #[cfg(target_arch = "x86_64")]
        {
            let mut v = Vec::new();
            if std::arch::is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                v.push(Isa::Avx2);
            }
            v
        }
        #[cfg(not(target_arch = "x86_64"))]
        Vec::new()
    }

    /// Channels per block: floats per vector.
    pub fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
        }
    }

    /// Output-channel blocks per register tile (set with the vector operations, `Simd::OUT_BLOCKS`).
    fn out_blocks(self) -> usize {
        #[cfg(target_arch = "x86_64")]
        {
            use simd::Simd;
            match self {
                Isa::Avx512 => simd::Avx512::OUT_BLOCKS,
                Isa::Avx2 => simd::Avx2::OUT_BLOCKS,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        1
    }
}

/// Whether dense 3x3 stride-1 convolutions use Winograd F(2x2, 3x3) (`HISTOLENS_WINOGRAD=off`: no).
fn winograd_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("HISTOLENS_WINOGRAD").as_deref(),
            Ok("off" | "0")
        )
    })
}

/// What follows the bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Identity,
    Relu,
    Relu6,
}

/// Why a kernel refused its arguments.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    #[error("blocked convolution: {0}")]
    Shape(String),
    #[error("blocked convolution: {0} is not supported")]
    Unsupported(String),
}

/// Zero padding on each side of the spatial dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pad {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Pad {
    /// `h` above and below, `w` left and right.
    pub fn symmetric(h: usize, w: usize) -> Self {
        Pad {
            top: h,
            bottom: h,
            left: w,
            right: w,
        }
    }
}

/// A convolution's sizes (dilation 1; groups 1, or depthwise). Padding is an argument of each call:
/// TensorFlow's "SAME" depends on the input's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    /// One filter per channel (groups = cin = cout).
    pub depthwise: bool,
}

/// The layout of a convolution's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// Plain (N, C, H, W): a network's first convolution, on the image.
    Nchw,
    /// (N, ⌈C/L⌉, H, W, L).
    Blocked,
}

/// A convolution with its weights packed for the kernels: dense as
/// [out block][in block][ky][kx][in channel][L], depthwise as [block][ky][kx][L], zero-padded.
#[derive(Debug, Clone)]
pub struct PackedConv {
    isa: Isa,
    spec: ConvSpec,
    input: Input,
    /// Empty where the Winograd weights replace them.
    weights: Vec<f32>,
    bias: Vec<f32>,
    /// Winograd F(2x2, 3x3) weights, for dense 3x3 stride-1 convolutions of blocked inputs.
    winograd: Option<Vec<f32>>,
}

impl PackedConv {
    /// Packs `weight` (cout, cin, kh, kw) — (cout, 1, kh, kw) when depthwise — and `bias` (cout).
    pub fn new(
        isa: Isa,
        spec: ConvSpec,
        input: Input,
        weight: &[f32],
        bias: &[f32],
    ) -> Result<Self, KernelError> {
        let ConvSpec {
            cin,
            cout,
            kh,
            kw,
            stride,
            depthwise,
            ..
        } = spec;
        if cin == 0 || cout == 0 || kh == 0 || kw == 0 || stride == 0 {
            return Err(KernelError::Shape(format!("empty dimension in {spec:?}")));
        }
        let per_out = if depthwise { 1 } else { cin };
        if depthwise && (cin != cout || input == Input::Nchw) {
            return Err(KernelError::Unsupported(
                "a depthwise convolution that changes the channel count or reads NCHW".into(),
            ));
        }
        if weight.len() != cout * per_out * kh * kw || bias.len() != cout {
            return Err(KernelError::Shape(format!(
                "{} weights and {} biases for {spec:?}",
                weight.len(),
                bias.len()
            )));
        }
        let l = isa.lanes();
        let cbo = cout.div_ceil(l);
        let mut b = vec![0f32; cbo * l];
        b[..cout].copy_from_slice(bias);
        let winograd = (kh == 3
            && kw == 3
            && stride == 1
            && !depthwise
            && input == Input::Blocked
            && winograd_enabled())
        .then(|| winograd::transform_weights(weight, cout, cin, l));
        let src =
            |o: usize, i: usize, y: usize, x: usize| weight[((o * per_out + i) * kh + y) * kw + x];
        // `run` reads only the Winograd weights where there are some.
        let weights = if winograd.is_some() {
            Vec::new()
        } else if depthwise {
            let mut w = vec![0f32; cbo * kh * kw * l];
            for o in 0..cout {
                for y in 0..kh {
                    for x in 0..kw {
                        w[(((o / l) * kh + y) * kw + x) * l + o % l] = src(o, 0, y, x);
                    }
                }
            }
            w
        } else {
            let (icb, in_block) = match input {
                Input::Nchw => (1, cin),
                Input::Blocked => (cin.div_ceil(l), l),
            };
            let mut w = vec![0f32; cbo * icb * kh * kw * in_block * l];
            for o in 0..cout {
                for i in 0..cin {
                    let (ib, ic) = (i / in_block, i % in_block);
                    for y in 0..kh {
                        for x in 0..kw {
                            let at =
                                (((((o / l) * icb + ib) * kh + y) * kw + x) * in_block + ic) * l;
                            w[at + o % l] = src(o, i, y, x);
                        }
                    }
                }
            }
            w
        };
        Ok(PackedConv {
            isa,
            spec,
            input,
            weights,
            bias: b,
            winograd,
        })
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn spec(&self) -> ConvSpec {
        self.spec
    }

    pub fn input(&self) -> Input {
        self.input
    }

    /// Output height and width for an input of `h` x `w`.
    pub fn output_size(&self, h: usize, w: usize, pad: Pad) -> Result<(usize, usize), KernelError> {
        let s = self.spec;
        let (hp, wp) = (h + pad.top + pad.bottom, w + pad.left + pad.right);
        if hp < s.kh || wp < s.kw {
            return Err(KernelError::Shape(format!(
                "input {h}x{w} smaller than kernel {}x{}",
                s.kh, s.kw
            )));
        }
        Ok(((hp - s.kh) / s.stride + 1, (wp - s.kw) / s.stride + 1))
    }

    /// Floats of the input for `n` images of `h` x `w`.
    pub fn input_len(&self, n: usize, h: usize, w: usize) -> usize {
        let c = match self.input {
            Input::Nchw => self.spec.cin,
            Input::Blocked => self.spec.cin.div_ceil(self.isa.lanes()) * self.isa.lanes(),
        };
        n * c * h * w
    }

    /// `out` (n, ⌈cout/L⌉, ho, wo, L) = act(conv(x) + bias), for `x` of `n` images of `h` x `w`
    /// zero-padded by `pad`, plus `residual` (a blocked tensor of the output's shape) where given,
    /// in this convolution's input layout; every float of `out` is written. Runs on the rayon pool.
    pub fn run(
        &self,
        x: &[f32],
        (n, h, w): (usize, usize, usize),
        pad: Pad,
        act: Act,
        residual: Option<&[f32]>,
        out: &mut [MaybeUninit<f32>],
    ) -> Result<(), KernelError> {
        let (ho, wo) = self.output_size(h, w, pad)?;
        let l = self.isa.lanes();
        let need_out = n * self.spec.cout.div_ceil(l) * ho * wo * l;
        if x.len() != self.input_len(n, h, w) || out.len() != need_out {
            return Err(KernelError::Shape(format!(
                "{} input and {} output floats for {n} images of {h}x{w} ({:?})",
                x.len(),
                out.len(),
                self.spec
            )));
        }
        if let Some(r) = residual
            && (r.len() != need_out || self.spec.depthwise)
        {
            return Err(KernelError::Shape(format!(
                "a residual of {} floats for {need_out} outputs{}",
                r.len(),
                if self.spec.depthwise {
                    " of a depthwise convolution"
                } else {
                    ""
                }
            )));
        }
        if !Isa::supported().contains(&self.isa) {
            return Err(KernelError::Unsupported(format!(
                "{:?} on this CPU",
                self.isa
            )));
        }
        if let Some(u) = &self.winograd {
            let (image_in, image_out) = (x.len() / n.max(1), need_out / n.max(1));
            for i in 0..n {
                let res = residual.map(|r| &r[i * image_out..][..image_out]);
                // SAFETY: the ISA is supported; image i's input, residual and output are in bounds.
                unsafe {
                    winograd::run_image(
                        self.isa,
                        u,
                        &self.bias,
                        &x[i * image_in..][..image_in],
                        (self.spec.cin, self.spec.cout, h, w),
                        pad,
                        (act, res),
                        out[i * image_out..].as_mut_ptr().cast::<f32>(),
                    )
                };
            }
            return Ok(());
        }
        conv::run(self, x, n, (h, w), pad, (act, residual), out);
        Ok(())
    }
}

/// Widest plane the fused kernels take (they address rows by an exact division of pixel indices).
pub const MAX_FUSED_WIDTH: usize = 1 << 16;

/// `act_dw(depthwise(act_expand(expand(x))))` for an inverted-residual block: `expand` a 1x1
/// stride-1 convolution of a blocked input, `depthwise` its depthwise successor, `pad` the latter's
/// padding. Equal to the two calls in sequence, without writing the expanded activation.
#[allow(clippy::too_many_arguments)]
pub fn expand_depthwise(
    expand: &PackedConv,
    depthwise: &PackedConv,
    x: &[f32],
    (n, h, w): (usize, usize, usize),
    pad: Pad,
    (act_expand, act_dw): (Act, Act),
    out: &mut [MaybeUninit<f32>],
) -> Result<(), KernelError> {
    let (e, d) = (expand.spec, depthwise.spec);
    if e.kh != 1 || e.kw != 1 || e.stride != 1 || e.depthwise || expand.input != Input::Blocked {
        return Err(KernelError::Unsupported(format!("{e:?} as an expansion")));
    }
    if !d.depthwise || d.cin != e.cout || expand.isa != depthwise.isa {
        return Err(KernelError::Shape(format!(
            "{d:?} after the expansion {e:?}"
        )));
    }
    if w >= MAX_FUSED_WIDTH {
        return Err(KernelError::Unsupported(format!(
            "fused convolutions of planes {w} pixels wide"
        )));
    }
    let (ho, wo) = depthwise.output_size(h, w, pad)?;
    let l = expand.isa.lanes();
    let need_out = n * e.cout.div_ceil(l) * ho * wo * l;
    if x.len() != expand.input_len(n, h, w) || out.len() != need_out {
        return Err(KernelError::Shape(format!(
            "{} input and {} output floats for {n} images of {h}x{w} ({e:?}, {d:?})",
            x.len(),
            out.len()
        )));
    }
    if !Isa::supported().contains(&expand.isa) {
        return Err(KernelError::Unsupported(format!(
            "{:?} on this CPU",
            expand.isa
        )));
    }
    fused::run(
        expand,
        depthwise,
        x,
        (n, h, w),
        (ho, wo),
        pad,
        (act_expand, act_dw),
        out,
    );
    Ok(())
}

/// An inverted-residual block (MobileNet-v2 / EfficientNet's MBConv) from its blocked input `x`
/// to its blocked output: `act[2](project(act[1](depthwise(act[0](expand(x))))))`, plus `x` where
/// `residual`. `expand` (absent in a block of expansion 1) and `project` are 1x1 stride-1
/// convolutions, `depthwise` a depthwise convolution padded by `pad`. Equal to the convolutions in
/// sequence; streamed over strips of rows where the shapes allow (see `mbconv.rs`), so that the
/// expanded activation is never written whole.
#[allow(clippy::too_many_arguments)]
pub fn inverted_residual(
    expand: Option<&PackedConv>,
    depthwise: &PackedConv,
    project: &PackedConv,
    x: &[f32],
    (n, h, w): (usize, usize, usize),
    pad: Pad,
    acts: [Act; 3],
    residual: bool,
    out: &mut [MaybeUninit<f32>],
) -> Result<(), KernelError> {
    let (d, p) = (depthwise.spec, project.spec);
    let pointwise = |c: &PackedConv| {
        let s = c.spec;
        s.kh == 1 && s.kw == 1 && s.stride == 1 && !s.depthwise && c.input == Input::Blocked
    };
    let first = expand.unwrap_or(depthwise);
    if expand.is_some_and(|e| !pointwise(e) || e.spec.cout != d.cin)
        || !d.depthwise
        || depthwise.input != Input::Blocked
        || !pointwise(project)
        || p.cin != d.cin
        || [first.isa, project.isa] != [depthwise.isa; 2]
    {
        return Err(KernelError::Unsupported(format!(
            "an inverted-residual block of {:?}, {d:?}, {p:?}",
            expand.map(|e| e.spec)
        )));
    }
    if w >= MAX_FUSED_WIDTH {
        return Err(KernelError::Unsupported(format!(
            "fused convolutions of planes {w} pixels wide"
        )));
    }
    let (ho, wo) = depthwise.output_size(h, w, pad)?;
    let l = depthwise.isa.lanes();
    let cin = first.spec.cin;
    let need_out = n * p.cout.div_ceil(l) * ho * wo * l;
    if x.len() != first.input_len(n, h, w) || out.len() != need_out {
        return Err(KernelError::Shape(format!(
            "{} input and {} output floats for {n} images of {h}x{w} in an inverted-residual block \
             of {cin} -> {} -> {} channels",
            x.len(),
            out.len(),
            d.cin,
            p.cout
        )));
    }
    if residual && (cin != p.cout || (ho, wo) != (h, w)) {
        return Err(KernelError::Shape(format!(
            "a residual around a block from {cin} channels at {h}x{w} to {} at {ho}x{wo}",
            p.cout
        )));
    }
    if !Isa::supported().contains(&depthwise.isa) {
        return Err(KernelError::Unsupported(format!(
            "{:?} on this CPU",
            depthwise.isa
        )));
    }
    let block = mbconv::Block {
        expand,
        depthwise,
        project,
        pad,
        acts,
    };
    if mbconv::streams(&block, n, (h, w), (ho, wo)) {
        mbconv::run(&block, x, (n, h, w), (ho, wo), residual, out);
        return Ok(());
    }
    // Two passes: the depthwise output (of the fused expansion), then the projection.
    let mid_len = n * d.cin.div_ceil(l) * ho * wo * l;
    let mut mid: Vec<f32> = Vec::with_capacity(mid_len);
    match expand {
        Some(e) => fused::run(
            e,
            depthwise,
            x,
            (n, h, w),
            (ho, wo),
            pad,
            (acts[0], acts[1]),
            &mut mid.spare_capacity_mut()[..mid_len],
        ),
        None => depthwise.run(
            x,
            (n, h, w),
            pad,
            acts[1],
            None,
            &mut mid.spare_capacity_mut()[..mid_len],
        )?,
    }
    // SAFETY: both kernels write every float of their output.
    unsafe { mid.set_len(mid_len) };
    project.run(
        &mid,
        (n, ho, wo),
        Pad::default(),
        acts[2],
        residual.then_some(x),
        out,
    )
}

#[cfg(test)]
mod tests;
