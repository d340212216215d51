//! An inverted-residual block's expansion and depthwise convolution in one pass (EfficientNet's
//! MBConv): `act_dw(depthwise(act_expand(expand(x))))` without writing the expanded activation,
//! which is the largest tensor of the block (96 channels at 112x112 = 4.8 MB in EfficientNet-Lite0's
//! second stage). Per group of expanded blocks (as many as a dense register tile holds) and band of
//! output rows, the 1x1 expansion of the band's input rows goes straight into zero-padded windows
//! that stay in the L2 cache, and the depthwise convolution reads them.

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use crate::conv::{DwRow, Job, dw_row, pointwise_rows};
use crate::simd::Simd;
#[cfg(target_arch = "x86_64")]
use crate::simd::{Avx2, Avx512};
use crate::{Act, Isa, PackedConv, Pad};

/// Bytes of windows a unit fills (one window where a plane is larger than this).
const WINDOW_BYTES: usize = 512 << 10;

thread_local! {
    static WINDOWS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// One call's buffers and sizes.
struct Fused {
    x: *const f32,
    e_wts: *const f32,
    e_bias: *const f32,
    d_wts: *const f32,
    d_bias: *const f32,
    out: *mut f32,
    /// Input (h, w), depthwise output (ho, wo), window columns.
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    win_cols: usize,
    pad: Pad,
    icb: usize,
    /// Input channels (the last block's padding is skipped).
    cin: usize,
    mid_blocks: usize,
    kh: usize,
    kw: usize,
    s: usize,
    acts: (Act, Act),
}

// SAFETY: read-only inputs; units write disjoint output blocks; the caller waits for them all.
unsafe impl Send for Fused {}
unsafe impl Sync for Fused {}

/// One unit: an image's expanded blocks `blocks`, depthwise output rows `rows`.
struct Part {
    image: usize,
    blocks: Range<usize>,
    rows: Range<usize>,
}

/// Checked by `crate::expand_depthwise`: sizes, layouts and the instruction set.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    e: &PackedConv,
    d: &PackedConv,
    x: &[f32],
    (n, h, w): (usize, usize, usize),
    (ho, wo): (usize, usize),
    pad: Pad,
    acts: (Act, Act),
    out: &mut [MaybeUninit<f32>],
) {
    let isa = e.isa;
    let l = isa.lanes();
    let (kh, kw, s) = (d.spec.kh, d.spec.kw, d.spec.stride);
    let win_cols = ((wo - 1) * s + kw).max(pad.left + w);
    let mid_blocks = e.spec.cout.div_ceil(l);
    let f = Fused {
        x: x.as_ptr(),
        e_wts: e.weights.as_ptr(),
        e_bias: e.bias.as_ptr(),
        d_wts: d.weights.as_ptr(),
        d_bias: d.bias.as_ptr(),
        out: out.as_mut_ptr().cast::<f32>(),
        h,
        w,
        ho,
        wo,
        win_cols,
        pad,
        icb: e.spec.cin.div_ceil(l),
        cin: e.spec.cin,
        mid_blocks,
        kh,
        kw,
        s,
        acts,
    };
    // Groups of expanded blocks as wide as the dense tile; bands of output rows whose windows
    // (the band's padded input rows, per block of the group) fit in WINDOW_BYTES. A band expands
    // the kh − s input rows it shares with the next one again: bands are as tall as the bytes allow.
    let groups: Vec<(usize, usize)> = crate::conv::tiles(0..mid_blocks, isa.out_blocks()).collect();
    let widest = groups.iter().map(|g| g.1).max().unwrap_or(1);
    let row_bytes = widest * win_cols * l * 4;
    let band = ((WINDOW_BYTES / row_bytes).saturating_sub(kh) / s + 1).clamp(1, ho);
    let mut bands = ho.div_ceil(band);
    let threads = crate::threads();
    if threads > 1 {
        // At least 4 units a thread.
        bands = bands.max((4 * threads).div_ceil(n * groups.len())).min(ho);
    }
    let rows: Vec<(usize, usize)> = crate::conv::tiles(0..ho, ho.div_ceil(bands)).collect();
    let mut units = Vec::new();
    for i in 0..n {
        for &(b, len) in &groups {
            for &(r, rlen) in &rows {
                units.push(Part {
                    image: i,
                    blocks: b..b + len,
                    rows: r..r + rlen,
                });
            }
        }
    }
    // SAFETY: the ISA is supported (checked by the caller); units are disjoint and in bounds.
    let work = |u: &Part| unsafe { unit_isa(isa, &f, u) };
    if threads > 1 && units.len() > 1 {
        units.par_iter().for_each(work);
    } else {
        units.iter().for_each(work);
    }
}

unsafe fn unit_isa(isa: Isa, f: &Fused, u: &Part) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { unit_avx512(f, u) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { unit_avx2(f, u) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn unit_avx512(f: &Fused, u: &Part) {
    unsafe { unit::<Avx512>(f, u) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn unit_avx2(f: &Fused, u: &Part) {
    unsafe { unit::<Avx2>(f, u) }
}

/// A job for the shared kernels: the expansion's geometry over one row of input.
fn job(f: &Fused, l: usize) -> Job {
    Job::pointwise(l, f.cin, f.w, f.h * f.w * l, 0)
}

#[inline(always)]
unsafe fn unit<S: Simd>(f: &Fused, part: &Part) {
    let l = S::LANES;
    let (image, g, b0) = (part.image, part.blocks.len(), part.blocks.start);
    let row = f.win_cols * l;
    // Window rows: padded rows oy0·s .. (oy1 − 1)·s + kh of the unit's output rows.
    let first = part.rows.start * f.s;
    let win_rows = (part.rows.end - 1) * f.s + f.kh - first;
    let win = win_rows * row;
    // Taken out of the thread-local and put back (a closure would not inline the vector code).
    let mut buf = WINDOWS.with(|c| c.take());
    if buf.len() < g * win {
        buf.resize(g * win, 0.0);
    }
    let (pt, pl) = (f.pad.top, f.pad.left);
    let input_row = |r: usize| (first + r).checked_sub(pt).filter(|&iy| iy < f.h);
    for wnd in buf[..g * win].chunks_exact_mut(win) {
        for (r, line) in wnd.chunks_exact_mut(row).enumerate() {
            if input_row(r).is_none() {
                line.fill(0.0);
            } else {
                line[..pl * l].fill(0.0);
                line[(pl + f.w) * l..].fill(0.0);
            }
        }
    }
    unsafe {
        // The expansion of the window's rows inside the image as one flat run of pixels (tiles
        // span input rows), stored row by row between the window's padding columns.
        // Window rows r0..r1 hold input rows iy0.. (padded row first + r is input row first + r − pt).
        let r0 = pt.saturating_sub(first).min(win_rows);
        let r1 = (pt + f.h).saturating_sub(first).clamp(r0, win_rows);
        if r1 > r0 {
            let iy0 = first + r0 - pt;
            let mut e = job(f, l);
            e.x = f.x.add((image * f.icb * f.h + iy0) * f.w * l);
            e.wts = f.e_wts.add(b0 * e.w_block);
            e.bias = f.e_bias.add(b0 * l);
            e.act = f.acts.0;
            e.out = buf.as_mut_ptr().add(r0 * row + pl * l);
            e.out_block = win;
            pointwise_rows(S::ISA, &e, 0..g, (r1 - r0, f.w, row));
        }
        // The depthwise convolution over the windows.
        let mut d = job(f, l);
        (d.kh, d.kw, d.s, d.act) = (f.kh, f.kw, f.s, f.acts.1);
        let out = f.out.add(image * f.mid_blocks * f.ho * f.wo * l);
        for k in 0..g {
            let b = b0 + k;
            for oy in part.rows.clone() {
                let t = DwRow {
                    src: buf.as_ptr().add(k * win + (oy * f.s - first) * row),
                    row_len: row,
                    wts: f.d_wts.add(b * f.kh * f.kw * l),
                    bias: f.d_bias.add(b * l),
                    out: out.add((b * f.ho + oy) * f.wo * l),
                };
                dw_row::<S>(&d, &t, 0..f.wo);
            }
        }
    }
    WINDOWS.with(|c| c.replace(buf));
}
