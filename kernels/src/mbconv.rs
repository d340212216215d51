//! A whole inverted-residual block (EfficientNet's MBConv: 1x1 expansion, depthwise convolution,
//! 1x1 projection, residual) streamed over strips of output rows: per strip, the input rows its
//! depthwise taps newly reach are expanded into a strip of padded rows of every expanded block, the
//! depthwise convolution of the strip gives the strip's expanded activation, and the projection
//! writes its output rows. Nothing larger than a strip (a few hundred KB, in the L2 cache) is ever
//! written but the block's output; consecutive strips pass on the kh − s rows they share instead
//! of expanding them again.
//!
//! Where the strips would be too thin for the expansion and projection tiles (wide blocks on small
//! planes), or the bands that split an image across threads would expand too many rows twice, the
//! block runs as the fused expansion + depthwise pass and the projection (see [`streams`]).

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use crate::conv::{DwRow, Job, Kernel, Unit, dw_row, pointwise_rows, run_unit, tiles};
use crate::simd::Simd;
#[cfg(target_arch = "x86_64")]
use crate::simd::{Avx2, Avx512};
use crate::{Act, Isa, PackedConv, Pad};

/// Bytes of one strip of expanded rows (all expanded blocks).
const STRIP_BYTES: usize = 384 << 10;
/// Fewest output pixels per strip (unless the plane has fewer): smaller strips read the weights of
/// the expansion and projection too often for the pixels they compute.
const MIN_STRIP_PIXELS: usize = 64;
/// Smallest expanded activation (bytes of one image at the input's resolution) for which the block
/// streams: a smaller one stays in the L2 cache between the two passes, which then run faster
/// (wider tiles, weights read once).
const MIN_STREAMED_BYTES: usize = 1 << 20;
/// Largest share of the expansion that bands splitting an image across threads may compute twice.
const MAX_BAND_OVERLAP: f64 = 0.1;

thread_local! {
    static STRIP: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static MID: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// The block: its convolutions (checked by `crate::inverted_residual`), the depthwise padding and
/// the three activations (expansion, depthwise, projection).
pub(crate) struct Block<'a> {
    pub(crate) expand: Option<&'a PackedConv>,
    pub(crate) depthwise: &'a PackedConv,
    pub(crate) project: &'a PackedConv,
    pub(crate) pad: Pad,
    pub(crate) acts: [Act; 3],
}

/// Sizes of one call.
#[derive(Clone, Copy)]
struct Geometry {
    /// Input channels, expanded blocks, input (h, w), output (ho, wo).
    cin: usize,
    mid: usize,
    mid_blocks: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    kh: usize,
    kw: usize,
    s: usize,
    /// Padded columns of a strip row, output rows per strip, padded rows per strip.
    cols: usize,
    strip: usize,
    strip_rows: usize,
}

impl Geometry {
    fn new(b: &Block, (h, w): (usize, usize), (ho, wo): (usize, usize)) -> Geometry {
        let d = b.depthwise.spec;
        let l = b.depthwise.isa.lanes();
        let (kh, kw, s) = (d.kh, d.kw, d.stride);
        let cols = ((wo - 1) * s + kw).max(b.pad.left + w);
        let mid_blocks = d.cin.div_ceil(l);
        let row_bytes = mid_blocks * cols * l * 4;
        let strip = ((STRIP_BYTES / row_bytes).saturating_sub(kh) / s + 1).min(ho);
        Geometry {
            cin: b.expand.map_or(d.cin, |e| e.spec.cin),
            mid: d.cin,
            mid_blocks,
            h,
            w,
            ho,
            wo,
            kh,
            kw,
            s,
            cols,
            strip,
            strip_rows: (strip - 1) * s + kh,
        }
    }

    /// Bands per image so that `threads` threads share `n` images, or `None` where the block
    /// does not stream (see the module's documentation).
    fn bands(&self, n: usize, threads: usize) -> Option<usize> {
        if self.strip * self.wo < MIN_STRIP_PIXELS.min(self.ho * self.wo)
            || self.mid * self.h * self.w * 4 < MIN_STREAMED_BYTES
        {
            return None;
        }
        let bands = if n >= threads { 1 } else { threads.div_ceil(n) };
        let twice = ((bands - 1) * (self.kh - self.s.min(self.kh))) as f64;
        (twice <= MAX_BAND_OVERLAP * (self.ho * self.s) as f64).then_some(bands)
    }
}

/// Whether the block streams for `n` images on the current pool (else the caller runs it as two
/// passes).
pub(crate) fn streams(b: &Block, n: usize, hw: (usize, usize), out_hw: (usize, usize)) -> bool {
    Geometry::new(b, hw, out_hw)
        .bands(n, crate::threads())
        .is_some()
}

/// Pointers of one call.
struct Call<'a> {
    b: &'a Block<'a>,
    g: Geometry,
    x: *const f32,
    out: *mut f32,
    residual: bool,
}

// SAFETY: read-only inputs; units write disjoint output rows; the caller waits for them all.
unsafe impl Send for Call<'_> {}
unsafe impl Sync for Call<'_> {}

/// Runs the streamed block (where [`streams`] says so); sizes checked by the caller.
pub(crate) fn run(
    b: &Block,
    x: &[f32],
    (n, h, w): (usize, usize, usize),
    out_hw: (usize, usize),
    residual: bool,
    out: &mut [MaybeUninit<f32>],
) {
    let g = Geometry::new(b, (h, w), out_hw);
    let threads = crate::threads();
    let bands = g.bands(n, threads).unwrap_or(1);
    let call = Call {
        b,
        g,
        x: x.as_ptr(),
        out: out.as_mut_ptr().cast(),
        residual,
    };
    let units: Vec<(usize, Range<usize>)> = (0..n)
        .flat_map(|i| tiles(0..g.ho, g.ho.div_ceil(bands)).map(move |(r, len)| (i, r..r + len)))
        .collect();
    let isa = b.depthwise.isa;
    // SAFETY: the ISA is supported (checked by the caller); units write disjoint rows.
    let work =
        |(i, rows): &(usize, Range<usize>)| unsafe { unit_isa(isa, &call, *i, rows.clone()) };
    if threads > 1 && units.len() > 1 {
        units.par_iter().for_each(work);
    } else {
        units.iter().for_each(work);
    }
}

unsafe fn unit_isa(isa: Isa, c: &Call, image: usize, rows: Range<usize>) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { unit_avx512(c, image, rows) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { unit_avx2(c, image, rows) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn unit_avx512(c: &Call, image: usize, rows: Range<usize>) {
    unsafe { unit::<Avx512>(c, image, rows) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn unit_avx2(c: &Call, image: usize, rows: Range<usize>) {
    unsafe { unit::<Avx2>(c, image, rows) }
}

/// Output rows `rows` of image `image`, strip by strip.
#[inline(always)]
unsafe fn unit<S: Simd>(c: &Call, image: usize, rows: Range<usize>) {
    let l = S::LANES;
    let g = c.g;
    let row = g.cols * l;
    // Strip: per expanded block, `strip_rows` padded rows; mid: per expanded block, `strip`
    // depthwise output rows.
    let block = g.strip_rows * row;
    let mid_block = g.strip * g.wo * l;
    // Taken out of the thread-locals and put back (a closure would not inline the vector code).
    let mut strip = STRIP.with(Cell::take);
    let mut mid = MID.with(Cell::take);
    strip.resize(strip.len().max(g.mid_blocks * block), 0.0);
    mid.resize(mid.len().max(g.mid_blocks * mid_block), 0.0);
    let x = unsafe { c.x.add(image * g.cin.div_ceil(l) * g.h * g.w * l) };
    let out = unsafe {
        c.out
            .add(image * c.b.project.spec.cout.div_ceil(l) * g.ho * g.wo * l)
    };
    // Strip rows 0..ready hold padded rows first.. (passed on by the strip before).
    let mut ready = 0;
    let mut oy0 = rows.start;
    while oy0 < rows.end {
        let t = g.strip.min(rows.end - oy0);
        let first = oy0 * g.s;
        let need = (t - 1) * g.s + g.kh;
        unsafe { fill::<S>(c, x, (&mut strip, block, row), first, ready..need) };
        // The depthwise convolution of every expanded block.
        let mut d = Job::pointwise(l, l, 0, 0, 0);
        (d.kh, d.kw, d.s, d.act) = (g.kh, g.kw, g.s, c.b.acts[1]);
        let dw = c.b.depthwise;
        for k in 0..g.mid_blocks {
            for r in 0..t {
                let tr = DwRow {
                    src: unsafe { strip.as_ptr().add(k * block + r * g.s * row) },
                    row_len: row,
                    wts: unsafe { dw.weights.as_ptr().add(k * g.kh * g.kw * l) },
                    bias: unsafe { dw.bias.as_ptr().add(k * l) },
                    out: unsafe { mid.as_mut_ptr().add(k * mid_block + r * g.wo * l) },
                };
                unsafe { dw_row::<S>(&d, &tr, 0..g.wo) };
            }
        }
        // The projection of the strip's rows (plus the block's input).
        let p = c.b.project;
        let pixels = t * g.wo;
        let mut j = Job::pointwise(l, g.mid, pixels, mid_block, g.ho * g.wo * l);
        j.x = mid.as_ptr();
        j.wts = p.weights.as_ptr();
        j.bias = p.bias.as_ptr();
        j.out = unsafe { out.add(oy0 * g.wo * l) };
        if c.residual {
            j.residual = unsafe { x.add(oy0 * g.wo * l) };
        }
        j.act = c.b.acts[2];
        for (b0, len) in tiles(0..p.spec.cout.div_ceil(l), S::OUT_BLOCKS) {
            let u = Unit {
                images: 0..1,
                blocks: b0..b0 + len,
                rows: 0..1,
                cols: 0..pixels,
            };
            unsafe { run_unit(S::ISA, Kernel::Pointwise, &j, &u) };
        }
        // The rows the next strip shares with this one move to the top.
        oy0 += t;
        let keep = g.kh.saturating_sub(g.s);
        if oy0 < rows.end && keep > 0 {
            for k in 0..g.mid_blocks {
                let base = k * block;
                strip.copy_within(base + (need - keep) * row..base + need * row, base);
            }
        }
        ready = keep;
    }
    STRIP.with(|cell| cell.replace(strip));
    MID.with(|cell| cell.replace(mid));
}

/// Strip rows `rows` (padded rows `first` + r): zeros outside the image, else the input row's
/// expansion (or the input row itself where the block has no expansion) between zero padding
/// columns.
#[inline(always)]
unsafe fn fill<S: Simd>(
    c: &Call,
    x: *const f32,
    (strip, block, row): (&mut [f32], usize, usize),
    first: usize,
    rows: Range<usize>,
) {
    let l = S::LANES;
    let g = c.g;
    let (pt, pl) = (c.b.pad.top, c.b.pad.left);
    // Strip rows r0..r1 hold input rows iy0..
    let r0 = pt.saturating_sub(first).clamp(rows.start, rows.end);
    let r1 = (pt + g.h).saturating_sub(first).clamp(r0, rows.end);
    for k in 0..g.mid_blocks {
        let b = &mut strip[k * block..][..block];
        for r in rows.clone() {
            let line = &mut b[r * row..][..row];
            if (r0..r1).contains(&r) {
                line[..pl * l].fill(0.0);
                line[(pl + g.w) * l..].fill(0.0);
            } else {
                line.fill(0.0);
            }
        }
    }
    if r1 == r0 {
        return;
    }
    let iy0 = first + r0 - pt;
    let plane = g.h * g.w * l;
    let Some(e) = c.b.expand else {
        // No expansion: the input rows themselves.
        for k in 0..g.mid_blocks {
            for (i, r) in (r0..r1).enumerate() {
                let src = unsafe {
                    std::slice::from_raw_parts(x.add(k * plane + (iy0 + i) * g.w * l), g.w * l)
                };
                strip[k * block + r * row + pl * l..][..g.w * l].copy_from_slice(src);
            }
        }
        return;
    };
    let mut j = Job::pointwise(l, g.cin, 0, plane, block);
    j.x = unsafe { x.add(iy0 * g.w * l) };
    j.wts = e.weights.as_ptr();
    j.bias = e.bias.as_ptr();
    j.out = unsafe { strip.as_mut_ptr().add(r0 * row + pl * l) };
    j.act = c.b.acts[0];
    for (b0, len) in tiles(0..g.mid_blocks, S::OUT_BLOCKS) {
        unsafe { pointwise_rows(S::ISA, &j, b0..b0 + len, (r1 - r0, g.w, row)) };
    }
}
