//! Dense and depthwise convolution over blocked activations: work split into units (image, group of
//! output blocks, rows or columns) run on the rayon pool; each output row split into the columns
//! whose taps all fall inside the image (register tiles of several pixels) and the few at the edges
//! (one pixel at a time, with the taps outside skipped).

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use crate::simd::Simd;
#[cfg(target_arch = "x86_64")]
use crate::simd::{Avx2, Avx512};
use crate::{Act, Input, Isa, PackedConv};

/// Output pixels per dense register tile of `blocks` output blocks: about 24 accumulators where the
/// instruction set has 32 registers, 12 where it has 16.
const fn tile_pixels(isa_blocks: usize, blocks: usize) -> usize {
    match (isa_blocks, blocks) {
        (4, 1 | 2) => 12,
        (4, 3) => 8,
        (_, 1) => 12,
        _ => 6,
    }
}

/// Column ranges of a flat plane are cut in multiples of this (every tile width divides it).
const FLAT_STEP: usize = 24;
/// Output pixels per depthwise register tile.
const DW_TILE_PIXELS: usize = 8;
/// Bytes of weights a unit keeps hot while it sweeps its pixels: input blocks are taken in chunks
/// of about this many bytes of weights (and the output accumulated across chunks), so that they stay
/// in the L2 cache.
const WEIGHT_CHUNK_BYTES: usize = 128 << 10;

/// One convolution call's geometry, pointers at image 0. For a 1x1 stride-1 unpadded convolution
/// the plane is seen as one row of h·w pixels (`flat`), so tiles never stop at a row's end.
#[derive(Clone, Copy)]
pub(crate) struct Job {
    pub(crate) x: *const f32,
    pub(crate) wts: *const f32,
    pub(crate) bias: *const f32,
    pub(crate) out: *mut f32,
    /// Added before the activation where not null (same layout as `out`).
    pub(crate) residual: *const f32,
    pub(crate) act: Act,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) ho: usize,
    pub(crate) wo: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) s: usize,
    pub(crate) pt: usize,
    pub(crate) pl: usize,
    /// Input strides (floats): between blocks, between channels of a block, between pixels.
    pub(crate) sb: usize,
    pub(crate) sc: usize,
    pub(crate) sp: usize,
    /// Input blocks, channels per input block, real channels of the last one.
    pub(crate) icb: usize,
    pub(crate) in_block: usize,
    pub(crate) in_last: usize,
    /// Floats per image of input and of output, between output blocks (dense).
    pub(crate) x_image: usize,
    pub(crate) out_image: usize,
    pub(crate) out_block: usize,
    /// Floats between consecutive output blocks in the packed weights (dense).
    pub(crate) w_block: usize,
    /// Output columns whose taps all lie inside the image: xa..xb.
    pub(crate) xa: usize,
    pub(crate) xb: usize,
    /// Where not 0, a flat output row is stored as rows of `out_wrap` pixels `out_pitch` floats
    /// apart (the fused expansion writes a plane into a window with padding columns); set by
    /// [`Job::wrap_output`], with `out_wrap_magic` = ⌈2³²/out_wrap⌉ (q / out_wrap = q · magic >> 32).
    pub(crate) out_wrap: usize,
    pub(crate) out_pitch: usize,
    pub(crate) out_wrap_magic: u64,
}

impl Job {
    /// A 1x1 stride-1 convolution over one flat run of `pixels` pixels of blocked input with `cin`
    /// channels, input blocks `sb` floats apart, output blocks `out_block` floats apart: identity
    /// activation, no residual, pointers null (the caller sets them).
    pub(crate) fn pointwise(
        l: usize,
        cin: usize,
        pixels: usize,
        sb: usize,
        out_block: usize,
    ) -> Job {
        let icb = cin.div_ceil(l);
        Job {
            x: std::ptr::null(),
            wts: std::ptr::null(),
            bias: std::ptr::null(),
            out: std::ptr::null_mut(),
            residual: std::ptr::null(),
            act: Act::Identity,
            h: 1,
            w: pixels,
            ho: 1,
            wo: pixels,
            kh: 1,
            kw: 1,
            s: 1,
            pt: 0,
            pl: 0,
            sb,
            sc: 1,
            sp: l,
            icb,
            in_block: l,
            in_last: cin - (icb - 1) * l,
            x_image: 0,
            out_image: 0,
            out_block,
            w_block: icb * l * l,
            xa: 0,
            xb: pixels,
            out_wrap: 0,
            out_pitch: 0,
            out_wrap_magic: 0,
        }
    }

    /// Stores the flat output as rows of `w` pixels, `pitch` floats apart (≥ w·L). The magic
    /// number divides exactly while q·w < 2³² for every flat index q (see [`pointwise_rows`]).
    fn wrap_output(&mut self, w: usize, pitch: usize) {
        assert!(
            w > 0 && (self.wo as u64) * (w as u64) < 1 << 32,
            "wrapped output of {} pixels in rows of {w}",
            self.wo
        );
        self.out_wrap = w;
        self.out_pitch = pitch;
        self.out_wrap_magic = (1u64 << 32).div_ceil(w as u64);
    }
}

// SAFETY: the pointers are read (x, wts, bias) or written in disjoint blocks (out) by the units of
// one call, which the caller waits for.
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

/// A piece of work: images `images`, output blocks `blocks`, rows `rows`, columns `cols`.
#[derive(Clone)]
pub(crate) struct Unit {
    pub(crate) images: Range<usize>,
    pub(crate) blocks: Range<usize>,
    pub(crate) rows: Range<usize>,
    pub(crate) cols: Range<usize>,
}

pub(crate) fn run(
    p: &PackedConv,
    x: &[f32],
    n: usize,
    (h, w): (usize, usize),
    pad: crate::Pad,
    (act, residual): (Act, Option<&[f32]>),
    out: &mut [MaybeUninit<f32>],
) {
    let spec = p.spec;
    let l = p.isa.lanes();
    let (ho, wo) = p
        .output_size(h, w, pad)
        .expect("checked by PackedConv::run before");
    let flat = spec.kh == 1
        && spec.kw == 1
        && spec.stride == 1
        && pad == crate::Pad::default()
        && !spec.depthwise;
    let (h, w, ho, wo) = if flat {
        (1, h * w, 1, h * w)
    } else {
        (h, w, ho, wo)
    };
    let (icb, in_block, sb, sc, sp) = match p.input {
        Input::Nchw => (1, spec.cin, 0, h * w, 1),
        Input::Blocked => (spec.cin.div_ceil(l), l, h * w * l, 1, l),
    };
    let cbo = spec.cout.div_ceil(l);
    let (s, pl) = (spec.stride, pad.left);
    let xa = pl.div_ceil(s).min(wo);
    let xb = if w + pl >= spec.kw {
        ((w + pl - spec.kw) / s + 1).clamp(xa, wo)
    } else {
        xa
    };
    let job = Job {
        x: x.as_ptr(),
        wts: p.weights.as_ptr(),
        bias: p.bias.as_ptr(),
        out: out.as_mut_ptr().cast::<f32>(),
        residual: residual.map_or(std::ptr::null(), <[f32]>::as_ptr),
        act,
        h,
        w,
        ho,
        wo,
        kh: spec.kh,
        kw: spec.kw,
        s,
        pt: pad.top,
        pl,
        sb,
        sc,
        sp,
        icb,
        in_block,
        in_last: spec.cin - (icb - 1) * in_block,
        x_image: icb * in_block * h * w,
        out_image: cbo * ho * wo * l,
        out_block: ho * wo * l,
        w_block: icb * spec.kh * spec.kw * in_block * l,
        xa,
        xb,
        out_wrap: 0,
        out_pitch: 0,
        out_wrap_magic: 0,
    };
    let group = if spec.depthwise {
        1
    } else {
        p.isa.out_blocks()
    };
    let units = split(n, cbo, group, ho, wo, flat);
    let kernel = match (spec.depthwise, flat && p.input == Input::Blocked) {
        (true, _) => Kernel::Depthwise,
        (false, true) => Kernel::Pointwise,
        (false, false) => Kernel::Dense,
    };
    let isa = p.isa;
    let work = move |u: &Unit| {
        // SAFETY: `isa` is supported (checked by PackedConv::run); the units are disjoint and in
        // bounds; the kernel is the job's.
        unsafe { run_unit(isa, kernel, &job, u) }
    };
    if units.len() > 1 && crate::threads() > 1 {
        units.par_iter().for_each(work);
    } else {
        units.iter().for_each(work);
    }
}

/// `planes` independent 1x1 convolutions over `pixels` pixels of one image, without bias or
/// activation, in one parallel sweep: plane k reads `x` + k·`x_plane`, its packed weights at `wts`
/// + k·`w_plane` and writes `out` + k·`out_plane` (Winograd's products).
///
/// # Safety
/// `isa` must be supported; the pointers must hold `planes` blocked planes of `cin` / `cout`
/// channels and `pixels` pixels, and `zero_bias` ⌈cout/L⌉·L zeros.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pointwise_planes(
    isa: Isa,
    planes: usize,
    (x, wts, zero_bias, out): (*const f32, *const f32, *const f32, *mut f32),
    (cin, cout, pixels): (usize, usize, usize),
) {
    let l = isa.lanes();
    let (icb, cbo) = (cin.div_ceil(l), cout.div_ceil(l));
    let job = |k: usize| Job {
        x: x.wrapping_add(k * icb * pixels * l),
        wts: wts.wrapping_add(k * cbo * icb * l * l),
        bias: zero_bias,
        out: out.wrapping_add(k * cbo * pixels * l),
        ..Job::pointwise(l, cin, pixels, pixels * l, pixels * l)
    };
    let jobs: Vec<Job> = (0..planes).map(job).collect();
    let units: Vec<(usize, Unit)> = (0..planes)
        .flat_map(|k| {
            split(1, cbo, isa.out_blocks(), 1, pixels, true)
                .into_iter()
                .map(move |u| (k, u))
        })
        .collect();
    // SAFETY: as for `run`; the planes' outputs are disjoint.
    let work = |(k, u): &(usize, Unit)| unsafe { run_unit(isa, Kernel::Pointwise, &jobs[*k], u) };
    if crate::threads() > 1 {
        units.par_iter().for_each(work);
    } else {
        units.iter().for_each(work);
    }
}

/// Units for the pool: at least 8 per thread where the work allows (measured faster than 4), each (image, block group)
/// split into row ranges (column ranges, in whole tiles, for a flat plane). Image-major: one
/// image's activations stay in cache while every block group reads them (measured faster at batch 8
/// than sweeping all images per chunk of weights).
fn split(n: usize, cbo: usize, group: usize, ho: usize, wo: usize, flat: bool) -> Vec<Unit> {
    let groups = cbo.div_ceil(group);
    let threads = crate::threads();
    let want = if threads > 1 { 8 * threads } else { 1 };
    let pieces = want.div_ceil(n * groups).max(1);
    // Groups of sizes differing by at most one (9 blocks: 3 + 3 + 3, not 4 + 4 + 1): a lone block
    // would run the least efficient tile.
    let sizes: Vec<(usize, usize)> = tiles(0..cbo, group).collect();
    let mut units = Vec::new();
    for (image, &(b0, len)) in iproduct(0..n, 0..groups).map(|(i, g)| (i, &sizes[g])) {
        let (images, blocks) = (image..image + 1, b0..b0 + len);
        if flat {
            let step = wo.div_ceil(pieces).next_multiple_of(FLAT_STEP).max(1);
            for c in (0..wo).step_by(step) {
                units.push(Unit {
                    images: images.clone(),
                    blocks: blocks.clone(),
                    rows: 0..ho,
                    cols: c..(c + step).min(wo),
                });
            }
        } else {
            let step = ho.div_ceil(pieces).max(1);
            for r in (0..ho).step_by(step) {
                units.push(Unit {
                    images: images.clone(),
                    blocks: blocks.clone(),
                    rows: r..(r + step).min(ho),
                    cols: 0..wo,
                });
            }
        }
    }
    units
}

/// Pointwise job `j` (input at its first row, output at its first row) over `rows` rows of `w`
/// pixels, output rows `pitch` floats apart, for output blocks `blocks`: flat runs whose tiles span
/// rows, as long as [`Job::wrap_output`] divides exactly (all the rows but for planes over 2¹⁴
/// pixels wide; planes of 2¹⁶ pixels are refused by the public entry points).
///
/// # Safety
/// As [`run_unit`].
pub(crate) unsafe fn pointwise_rows(
    isa: Isa,
    j: &Job,
    blocks: Range<usize>,
    (rows, w, pitch): (usize, usize, usize),
) {
    let l = isa.lanes();
    let per_run = (((1u64 << 32) - 1) / (w as u64 * w as u64)).clamp(1, rows as u64) as usize;
    let mut r = 0;
    while r < rows {
        let n = per_run.min(rows - r);
        let pixels = n * w;
        let mut run = Job {
            x: j.x.wrapping_add(r * w * l),
            out: j.out.wrapping_add(r * pitch),
            w: pixels,
            wo: pixels,
            xb: pixels,
            ..*j
        };
        run.wrap_output(w, pitch);
        let u = Unit {
            images: 0..1,
            blocks: blocks.clone(),
            rows: 0..1,
            cols: 0..pixels,
        };
        unsafe { run_unit(isa, Kernel::PointwiseWrapped, &run, &u) };
        r += n;
    }
}

/// Which kernel a unit runs: each is one instantiation per instruction set, called, not inlined
/// (more copies of the tiles would multiply the crate's build time).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kernel {
    /// Any dense convolution.
    Dense,
    /// A 1x1 stride-1 unpadded convolution of blocked input over one flat run of pixels (`h` = 1,
    /// `sc` = 1, no taps outside the image).
    Pointwise,
    /// The same, its output stored through `Job::out_wrap`.
    PointwiseWrapped,
    Depthwise,
}

/// # Safety
/// `isa` must be supported by the CPU; the unit must lie inside the job's buffers, and the job be
/// of the kernel's kind.
pub(crate) unsafe fn run_unit(isa: Isa, kernel: Kernel, j: &Job, u: &Unit) {
    match (isa, kernel) {
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, Kernel::Dense) => unsafe { dense_avx512(j, u) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, Kernel::Pointwise) => unsafe { pointwise_avx512(j, u) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, Kernel::PointwiseWrapped) => unsafe { pointwise_wrapped_avx512(j, u) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, Kernel::Depthwise) => unsafe { depthwise_avx512(j, u) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, Kernel::Dense) => unsafe { dense_avx2(j, u) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, Kernel::Pointwise) => unsafe { pointwise_avx2(j, u) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, Kernel::PointwiseWrapped) => unsafe { pointwise_wrapped_avx2(j, u) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, Kernel::Depthwise) => unsafe { depthwise_avx2(j, u) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("no blocked instruction set on this architecture"),
    }
}

/// The kernels' entry points: one per kernel and instruction set, with its target features.
macro_rules! entry_points {
    ($($name:ident: $feature:literal => $kernel:expr;)*) => {$(
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        #[inline(never)]
        unsafe fn $name(j: &Job, u: &Unit) {
            unsafe { $kernel(j, u) }
        }
    )*};
}

entry_points! {
    dense_avx512: "avx512f" => dense_unit::<Avx512, false, false>;
    pointwise_avx512: "avx512f" => dense_unit::<Avx512, false, true>;
    pointwise_wrapped_avx512: "avx512f" => dense_unit::<Avx512, true, true>;
    depthwise_avx512: "avx512f" => depthwise_unit::<Avx512>;
    dense_avx2: "avx2,fma" => dense_unit::<Avx2, false, false>;
    pointwise_avx2: "avx2,fma" => dense_unit::<Avx2, false, true>;
    pointwise_wrapped_avx2: "avx2,fma" => dense_unit::<Avx2, true, true>;
    depthwise_avx2: "avx2,fma" => depthwise_unit::<Avx2>;
}

/// Taps ky of output row `oy` whose input row lies inside the image.
#[inline(always)]
fn rows_inside(j: &Job, oy: usize) -> Range<usize> {
    let top = oy * j.s;
    let lo = j.pt.saturating_sub(top).min(j.kh);
    let hi = (j.h + j.pt).saturating_sub(top).min(j.kh);
    lo..hi.max(lo)
}

/// Taps kx of output column `ox` whose input column lies inside the image.
#[inline(always)]
fn cols_inside(j: &Job, ox: usize) -> Range<usize> {
    let left = ox * j.s;
    let lo = j.pl.saturating_sub(left).min(j.kw);
    let hi = (j.w + j.pl).saturating_sub(left).min(j.kw);
    lo..hi.max(lo)
}

/// `cols` split into the left edge, the interior (every tap inside) and the right edge.
#[inline(always)]
fn column_parts(j: &Job, cols: &Range<usize>) -> (Range<usize>, Range<usize>, Range<usize>) {
    let a = j.xa.clamp(cols.start, cols.end);
    let b = j.xb.clamp(a, cols.end);
    (cols.start..a, a..b, b..cols.end)
}

#[inline(always)]
pub(crate) unsafe fn activate<S: Simd>(act: Act, v: S::V) -> S::V {
    unsafe {
        match act {
            Act::Identity => v,
            Act::Relu => S::max(v, S::splat(0.0)),
            Act::Relu6 => S::min(S::max(v, S::splat(0.0)), S::splat(6.0)),
        }
    }
}

/// PW: the job is pointwise (see [`Kernel::Pointwise`]): the taps' loops and edge tests compile
/// away. WRAP: the output is stored through `Job::out_wrap` (computed offsets cost registers that
/// the plain tiles keep for immediates).
#[inline(always)]
unsafe fn dense_unit<S: Simd, const WRAP: bool, const PW: bool>(j: &Job, u: &Unit) {
    let l = S::LANES;
    let per_block = u.blocks.len() * j.kh * j.kw * j.in_block * l * 4;
    let chunk = (WEIGHT_CHUNK_BYTES / per_block.max(1)).clamp(1, j.icb);
    let max_px = tile_pixels(S::OUT_BLOCKS, u.blocks.len());
    let mut c0 = 0;
    while c0 < j.icb {
        let blocks_in = c0..(c0 + chunk).min(j.icb);
        let t = Taps {
            first: c0 == 0,
            last: blocks_in.end == j.icb,
            blocks_in,
            ky: 0..0,
            kx: 0..j.kw,
        };
        for (image, oy) in iproduct(u.images.clone(), u.rows.clone()) {
            let t = Taps {
                ky: if PW { 0..1 } else { rows_inside(j, oy) },
                ..t.clone()
            };
            if PW || j.sc == 1 {
                // Blocked input: taps outside the image read a vector of zeros, so edge pixels
                // join the tiles.
                for (ox, px) in tiles(u.cols.clone(), max_px) {
                    unsafe { dense_tile_dispatch::<S, WRAP, PW>(j, image, u, px, oy, ox, &t) };
                }
                continue;
            }
            prefetch_rows_below(j, image, oy);
            let (left, mid, right) = column_parts(j, &u.cols);
            for ox in left.chain(right) {
                let edge = Taps {
                    kx: cols_inside(j, ox),
                    ..t.clone()
                };
                unsafe { dense_tile_dispatch::<S, WRAP, PW>(j, image, u, 1, oy, ox, &edge) };
            }
            for (ox, px) in tiles(mid, max_px) {
                unsafe { dense_tile_dispatch::<S, WRAP, PW>(j, image, u, px, oy, ox, &t) };
            }
        }
        c0 += chunk;
    }
}

/// Asks for a cache line to be brought into the L2 cache (a hint: any address is allowed).
#[inline(always)]
fn prefetch_l2(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Floats per cache line.
const LINE_FLOATS: usize = 16;

/// NCHW input (the stem): its channel planes are read a few rows at a time from several places at
/// once, which the hardware prefetchers do not follow; the rows of output row `oy` + 2 are asked for.
#[inline(always)]
fn prefetch_rows_below(j: &Job, image: usize, oy: usize) {
    const AHEAD: usize = 2;
    let x = j.x.wrapping_add(image * j.x_image);
    let top = (oy + AHEAD) * j.s;
    for ky in 0..j.kh {
        let Some(iy) = (top + ky).checked_sub(j.pt).filter(|&iy| iy < j.h) else {
            continue;
        };
        for ib in 0..j.icb {
            for c in 0..j.in_block {
                let row = x.wrapping_add(ib * j.sb + c * j.sc + iy * j.w * j.sp);
                for k in (0..j.w * j.sp).step_by(LINE_FLOATS) {
                    prefetch_l2(row.wrapping_add(k));
                }
            }
        }
    }
}

/// Every (a, b) for a in `outer`, b in `inner`.
fn iproduct(outer: Range<usize>, inner: Range<usize>) -> impl Iterator<Item = (usize, usize)> {
    outer.flat_map(move |a| inner.clone().map(move |b| (a, b)))
}

/// `cols` cut into the fewest tiles of at most `max` pixels, of sizes differing by at most one
/// (56 = 6 x 6 + 4 x 5, not 9 x 6 + 2): (first column, pixels).
pub(crate) fn tiles(cols: Range<usize>, max: usize) -> impl Iterator<Item = (usize, usize)> {
    let len = cols.len();
    let count = len.div_ceil(max).max(1);
    let (base, extra) = (len / count, len % count);
    (0..count)
        .scan(cols.start, move |at, i| {
            let px = base + usize::from(i < extra);
            let tile = (*at, px);
            *at += px;
            Some(tile)
        })
        .filter(|&(_, px)| px > 0)
}

/// What a tap outside the image reads: one vector of zeros (input channels of a block are
/// consecutive in the blocked layout).
static ZEROS: [f32; 16] = [0.0; 16];

/// Pointer to input column `ox · s + kx − pl` of row `x_row`, or to [`ZEROS`] outside the image.
#[inline(always)]
fn column(j: &Job, x_row: *const f32, ox: usize, kx: usize) -> *const f32 {
    let ix = ox * j.s + kx;
    if ix >= j.pl && ix - j.pl < j.w {
        x_row.wrapping_add((ix - j.pl) * j.sp)
    } else {
        ZEROS.as_ptr()
    }
}

/// The taps and input blocks a tile sums over, and whether it starts from the bias (first) and
/// applies the activation (last) or continues a sum left in the output by earlier input blocks.
#[derive(Clone)]
struct Taps {
    blocks_in: Range<usize>,
    ky: Range<usize>,
    kx: Range<usize>,
    first: bool,
    last: bool,
}

macro_rules! dense_tiles {
    ($S:ty, $ob:expr, $px:expr, $args:tt; $(($o:literal, $p:literal)),*) => {
        match ($ob, $px) {
            $(($o, $p) => unsafe { dense_tile::<$S, $o, $p, WRAP, PW> $args },)*
            _ => unreachable!("tile of {} blocks x {} pixels", $ob, $px),
        }
    };
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dense_tile_dispatch<S: Simd, const WRAP: bool, const PW: bool>(
    j: &Job,
    image: usize,
    u: &Unit,
    px: usize,
    oy: usize,
    ox: usize,
    t: &Taps,
) {
    let (ob0, ob) = (u.blocks.start, u.blocks.len());
    dense_tiles!(S, ob, px, (j, image, ob0, oy, ox, t);
        (1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7), (1, 8), (1, 9), (1, 10), (1, 11), (1, 12),
        (2, 1), (2, 2), (2, 3), (2, 4), (2, 5), (2, 6), (2, 7), (2, 8), (2, 9), (2, 10), (2, 11), (2, 12),
        (3, 1), (3, 2), (3, 3), (3, 4), (3, 5), (3, 6), (3, 7), (3, 8),
        (4, 1), (4, 2), (4, 3), (4, 4), (4, 5), (4, 6))
}

/// OB output blocks x PX output pixels (PX consecutive columns of row `oy` from `ox0`), summed over
/// `t` in registers.
#[inline(always)]
unsafe fn dense_tile<
    S: Simd,
    const OB: usize,
    const PX: usize,
    const WRAP: bool,
    const PW: bool,
>(
    j: &Job,
    image: usize,
    ob0: usize,
    oy: usize,
    ox0: usize,
    t: &Taps,
) {
    let l = S::LANES;
    let q0 = oy * j.wo + ox0;
    let out = unsafe { j.out.add(image * j.out_image + ob0 * j.out_block) };
    // Offset of pixel p in an output block: (q0 + p)·L, plus where wrapped the padding of the
    // rows ended before it. A function of p alone (an array of offsets, or a running row and
    // column, made the compiler keep the accumulators in memory).
    let jump = j.out_pitch.wrapping_sub(j.out_wrap * l);
    let at = |p: usize| {
        let q = q0 + p;
        if WRAP {
            q * l + ((q as u64 * j.out_wrap_magic) >> 32) as usize * jump
        } else {
            q * l
        }
    };
    let out_block = j.out_block;
    let x = unsafe { j.x.add(image * j.x_image) };
    let wts = unsafe { j.wts.add(ob0 * j.w_block) };
    unsafe {
        let mut acc = [[S::splat(0.0); PX]; OB];
        for (o, row) in acc.iter_mut().enumerate() {
            for (p, a) in row.iter_mut().enumerate() {
                *a = if t.first {
                    S::load(j.bias.add((ob0 + o) * l))
                } else {
                    S::load(out.add(o * out_block + at(p)))
                };
            }
        }
        for ib in t.blocks_in.clone() {
            // The last input block's padding channels have zero weights: skip them.
            let channels = if ib + 1 == j.icb {
                j.in_last
            } else {
                j.in_block
            };
            let (taps_y, taps_x) = if PW {
                (0..1, 0..1)
            } else {
                (t.ky.clone(), t.kx.clone())
            };
            for ky in taps_y {
                let iy = if PW { 0 } else { oy * j.s + ky - j.pt };
                let x_row = x.add(ib * j.sb + iy * j.w * j.sp);
                for kx in taps_x.clone() {
                    let xp: [*const f32; PX] = std::array::from_fn(|p| {
                        if PW {
                            x_row.wrapping_add((ox0 + p) * l)
                        } else {
                            column(j, x_row, ox0 + p, kx)
                        }
                    });
                    let wp = if PW {
                        wts.add(ib * j.in_block * l)
                    } else {
                        wts.add(((ib * j.kh + ky) * j.kw + kx) * j.in_block * l)
                    };
                    for ic in 0..channels {
                        let mut wv = [S::splat(0.0); OB];
                        for (o, v) in wv.iter_mut().enumerate() {
                            *v = S::load(wp.add(o * j.w_block + ic * l));
                        }
                        for p in 0..PX {
                            let xv = S::splat(*xp[p].add(ic * j.sc));
                            for o in 0..OB {
                                acc[o][p] = S::fma(wv[o], xv, acc[o][p]);
                            }
                        }
                    }
                }
            }
        }
        if t.last && !j.residual.is_null() {
            let res = j.residual.offset(out.offset_from(j.out));
            for (o, row) in acc.iter_mut().enumerate() {
                for (p, a) in row.iter_mut().enumerate() {
                    *a = S::add(*a, S::load(res.add(o * out_block + at(p))));
                }
            }
        }
        for (o, row) in acc.iter().enumerate() {
            for (p, &a) in row.iter().enumerate() {
                let v = if t.last { activate::<S>(j.act, a) } else { a };
                S::store(out.add(o * out_block + at(p)), v);
            }
        }
    }
}

thread_local! {
    /// Per-thread zero-padded input window of a depthwise unit, reused across calls.
    static PADDED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Depthwise, per (image, block). Where the kernel is large for its stride (copying costs little
/// against the taps: 3x3 and 5x5 of stride 1, 5x5 of stride 2), the input rows the unit's output
/// rows read are first copied into a zero-padded window, so that every tile reads whole rows with
/// no edge test. Otherwise (3x3 of stride 2), tiles read the input in place and the pixels whose
/// taps cross the edge are summed one at a time. Square 3x3 and 5x5 kernels of stride 1 or 2
/// (EfficientNet's) have tiles specialised at compile time.
#[inline(always)]
unsafe fn depthwise_unit<S: Simd>(j: &Job, u: &Unit) {
    let l = S::LANES;
    let padded_copy = 4 * j.s * j.s <= j.kh * j.kw;
    let wpad = (j.wo - 1) * j.s + j.kw;
    let (y0, y1) = (u.rows.start * j.s, (u.rows.end - 1) * j.s + j.kh);
    let row_len = wpad * l;
    // Padding columns on the left (all of the window where the padding is wider), then pixels.
    let left = j.pl.min(wpad);
    let copy = (wpad - left).min(j.w);
    // Taken out of the thread-local and put back, not borrowed in a closure: a closure would not
    // inherit the caller's target features, and its vector code would not be inlined.
    let mut buf = PADDED.with(|cell| cell.take());
    if padded_copy && buf.len() < (y1 - y0) * row_len {
        buf.resize((y1 - y0) * row_len, 0.0);
    }
    for (image, b) in iproduct(u.images.clone(), u.blocks.clone()) {
        // SAFETY: block b of the image and its weights, bias and output are in the buffers.
        let (plane, wts, bias, out) = unsafe {
            (
                j.x.add(image * j.x_image + b * j.sb),
                j.wts.add(b * j.kh * j.kw * l),
                j.bias.add(b * l),
                j.out.add(image * j.out_image + b * j.ho * j.wo * l),
            )
        };
        if !padded_copy {
            for oy in u.rows.clone() {
                let ky = rows_inside(j, oy);
                let out = unsafe { out.add(oy * j.wo * l) };
                let (edges, mid) = if ky.len() == j.kh {
                    let (a, m, z) = column_parts(j, &(0..j.wo));
                    (a.chain(z), m)
                } else {
                    ((0..j.wo).chain(0..0), 0..0)
                };
                for ox in edges {
                    unsafe { dw_edge_pixel::<S>(j, plane, wts, bias, out, oy, ox) };
                }
                if !mid.is_empty() {
                    // Column c of the row is read at c − pl; the tiles start at ox ≥ xa, in bounds.
                    let src = plane
                        .wrapping_add((oy * j.s - j.pt) * j.w * l)
                        .wrapping_sub(j.pl * l);
                    let t = DwRow {
                        src,
                        row_len: j.w * l,
                        wts,
                        bias,
                        out,
                    };
                    unsafe { dw_row::<S>(j, &t, mid) };
                }
            }
            continue;
        }
        for (py, dst) in (y0..y1).zip(buf.chunks_exact_mut(row_len)) {
            let iy = py.wrapping_sub(j.pt);
            if py < j.pt || iy >= j.h {
                dst.fill(0.0);
                continue;
            }
            dst[..left * l].fill(0.0);
            // SAFETY: `copy` ≤ w pixels of row iy.
            let src = unsafe { std::slice::from_raw_parts(plane.add(iy * j.w * l), copy * l) };
            dst[left * l..(left + copy) * l].copy_from_slice(src);
            dst[(left + copy) * l..].fill(0.0);
        }
        for oy in u.rows.clone() {
            let t = DwRow {
                src: buf[(oy * j.s - y0) * row_len..].as_ptr(),
                row_len,
                wts,
                bias,
                out: unsafe { out.add(oy * j.wo * l) },
            };
            unsafe { dw_row::<S>(j, &t, 0..j.wo) };
        }
    }
    PADDED.with(|cell| cell.replace(buf));
}

/// The tiles of columns `cols` of one output row.
#[inline(always)]
pub(crate) unsafe fn dw_row<S: Simd>(j: &Job, t: &DwRow, cols: Range<usize>) {
    for (ox, px) in tiles(cols, DW_TILE_PIXELS) {
        macro_rules! tile {
            ($k:literal, $s:literal) => {
                match px {
                    8 => unsafe { dw_tile::<S, 8, $k, $s>(j, t, ox) },
                    7 => unsafe { dw_tile::<S, 7, $k, $s>(j, t, ox) },
                    6 => unsafe { dw_tile::<S, 6, $k, $s>(j, t, ox) },
                    5 => unsafe { dw_tile::<S, 5, $k, $s>(j, t, ox) },
                    4 => unsafe { dw_tile::<S, 4, $k, $s>(j, t, ox) },
                    3 => unsafe { dw_tile::<S, 3, $k, $s>(j, t, ox) },
                    2 => unsafe { dw_tile::<S, 2, $k, $s>(j, t, ox) },
                    _ => unsafe { dw_tile::<S, 1, $k, $s>(j, t, ox) },
                }
            };
        }
        match (j.kh, j.kw, j.s) {
            (3, 3, 1) => tile!(3, 1),
            (3, 3, 2) => tile!(3, 2),
            (5, 5, 1) => tile!(5, 1),
            (5, 5, 2) => tile!(5, 2),
            _ => tile!(0, 0),
        }
    }
}

/// One output pixel (oy, ox) of a block, over the taps inside the image; `out` is its row.
#[inline(always)]
unsafe fn dw_edge_pixel<S: Simd>(
    j: &Job,
    plane: *const f32,
    wts: *const f32,
    bias: *const f32,
    out: *mut f32,
    oy: usize,
    ox: usize,
) {
    let l = S::LANES;
    unsafe {
        let mut acc = S::load(bias);
        for y in rows_inside(j, oy) {
            let row = plane.add((oy * j.s + y - j.pt) * j.w * l);
            for k in cols_inside(j, ox) {
                let x = S::load(row.add((ox * j.s + k - j.pl) * l));
                acc = S::fma(S::load(wts.add((y * j.kw + k) * l)), x, acc);
            }
        }
        S::store(out.add(ox * l), activate::<S>(j.act, acc));
    }
}

/// One output row of one block: its padded input window (at the row's first tap row), weights,
/// bias and output.
pub(crate) struct DwRow {
    pub(crate) src: *const f32,
    pub(crate) row_len: usize,
    pub(crate) wts: *const f32,
    pub(crate) bias: *const f32,
    pub(crate) out: *mut f32,
}

/// PX output pixels from column `ox0`. K x K kernel of stride ST when K > 0 (loops unroll and
/// an input vector shared by several taps is loaded once), the job's kernel and stride when K = 0.
#[inline(always)]
unsafe fn dw_tile<S: Simd, const PX: usize, const K: usize, const ST: usize>(
    j: &Job,
    t: &DwRow,
    ox0: usize,
) {
    let l = S::LANES;
    let (kh, kw, s) = if K > 0 { (K, K, ST) } else { (j.kh, j.kw, j.s) };
    unsafe {
        let mut acc = [S::load(t.bias); PX];
        for y in 0..kh {
            let xp = t.src.add(y * t.row_len + ox0 * s * l);
            for k in 0..kw {
                let wv = S::load(t.wts.add((y * kw + k) * l));
                for (p, a) in acc.iter_mut().enumerate() {
                    *a = S::fma(wv, S::load(xp.add((p * s + k) * l)), *a);
                }
            }
        }
        for (p, &a) in acc.iter().enumerate() {
            S::store(t.out.add((ox0 + p) * l), activate::<S>(j.act, a));
        }
    }
}
