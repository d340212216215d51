//! Winograd F(2x2, 3x3) for dense 3x3 stride-1 convolutions on blocked activations: each 2x2
//! output tile is computed from its 4x4 input tile with 16 multiplications per (input, output)
//! channel pair instead of 36. Per image: the input tiles are transformed (V = Bᵀ d B, additions
//! only) into 16 planes, the 16 planes are multiplied by the transformed weights (U = G g Gᵀ, made
//! once when packing) as 16 1x1 convolutions on the dense kernel, and the products are transformed
//! back (Y = Aᵀ M A) with bias, residual and activation. The error against the direct
//! convolution is a few float roundings (checked by the crate's tests at 1e-4 relative).

use rayon::prelude::*;

use crate::conv::{activate, pointwise_planes};
use crate::simd::Simd;
#[cfg(target_arch = "x86_64")]
use crate::simd::{Avx2, Avx512};
use crate::{Act, Isa, Pad};

/// The transformed weights, packed as 16 1x1 convolutions ([plane][out block][in block][ic][L]).
/// One (out block, in block) pair at a time: its kernels gathered tap by tap into a small buffer,
/// transformed as whole vectors of L x L values, and written to each plane in order; out blocks
/// across the pool (the training convolutions transform their weights at every call).
pub(crate) fn transform_weights(weight: &[f32], cout: usize, cin: usize, l: usize) -> Vec<f32> {
    let (cbo, icb) = (cout.div_ceil(l), cin.div_ceil(l));
    let span = icb * l * l;
    let plane = cbo * span;
    let mut out = vec![0f32; 16 * plane];
    // Each out block's span in each of the 16 planes.
    let mut per_block: Vec<Vec<&mut [f32]>> = (0..cbo).map(|_| Vec::with_capacity(16)).collect();
    for p in out.chunks_mut(plane) {
        for (ob, chunk) in p.chunks_mut(span).enumerate() {
            per_block[ob].push(chunk);
        }
    }
    let block = |ob: usize, planes: &mut [&mut [f32]]| {
        let ll = l * l;
        // g[tap][ic · L + oc], zero outside the weights.
        let mut g = vec![0f32; 9 * ll];
        let mut t = vec![0f32; 12 * ll];
        for ib in 0..icb {
            g.fill(0.0);
            for i in ib * l..((ib + 1) * l).min(cin) {
                for o in ob * l..((ob + 1) * l).min(cout) {
                    let kernel = &weight[(o * cin + i) * 9..][..9];
                    for (tap, &v) in kernel.iter().enumerate() {
                        g[tap * ll + (i % l) * l + o % l] = v;
                    }
                }
            }
            // G g: 4 rows of 3 columns, t[row · 3 + column]; then (G g) Gᵀ, row by row.
            for c in 0..3 {
                let (g0, g1, g2) = (
                    &g[c * ll..][..ll],
                    &g[(3 + c) * ll..][..ll],
                    &g[(6 + c) * ll..][..ll],
                );
                let mut rows = t.chunks_exact_mut(ll).skip(c).step_by(3);
                let mut next = || rows.next().expect("4 rows of t");
                rows_of_g(g0, g1, g2, [next(), next(), next(), next()]);
            }
            for r in 0..4 {
                let row = |c: usize| &t[(r * 3 + c) * ll..][..ll];
                let [p0, p1, p2, p3] = &mut planes[r * 4..r * 4 + 4] else {
                    unreachable!("16 planes")
                };
                let at = ib * ll;
                rows_of_g(
                    row(0),
                    row(1),
                    row(2),
                    [
                        &mut p0[at..][..ll],
                        &mut p1[at..][..ll],
                        &mut p2[at..][..ll],
                        &mut p3[at..][..ll],
                    ],
                );
            }
        }
    };
    if crate::threads() > 1 && cbo > 1 {
        per_block
            .par_iter_mut()
            .enumerate()
            .for_each(|(ob, planes)| block(ob, planes));
    } else {
        for (ob, planes) in per_block.iter_mut().enumerate() {
            block(ob, planes);
        }
    }
    out
}

/// The four rows of G applied to three: (a, (a + b + c) / 2, (a − b + c) / 2, c), value by value.
#[inline(always)]
fn rows_of_g(a: &[f32], b: &[f32], c: &[f32], [r0, r1, r2, r3]: [&mut [f32]; 4]) {
    let n = a.len();
    let (b, c, r0, r1, r2, r3) = (
        &b[..n],
        &c[..n],
        &mut r0[..n],
        &mut r1[..n],
        &mut r2[..n],
        &mut r3[..n],
    );
    for j in 0..n {
        r0[j] = a[j];
        r1[j] = (a[j] + b[j] + c[j]) * 0.5;
        r2[j] = (a[j] - b[j] + c[j]) * 0.5;
        r3[j] = c[j];
    }
}

/// The sizes of one call.
#[derive(Clone, Copy)]
struct Geom {
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    pad: Pad,
    icb: usize,
    cbo: usize,
    /// Tiles down and across.
    th: usize,
    tw: usize,
}

impl Geom {
    fn tiles(&self) -> usize {
        self.th * self.tw
    }
}

/// A pointer that crosses to the pool's threads (each writes its own blocks).
#[derive(Clone, Copy)]
struct Ptr<T>(T);
unsafe impl<T> Send for Ptr<T> {}
unsafe impl<T> Sync for Ptr<T> {}

impl<T: Copy> Ptr<T> {
    /// The pointer (a method, so that closures capture the wrapper and not its field).
    fn get(&self) -> T {
        self.0
    }
}

thread_local! {
    /// Per-thread transformed input and products of a chunk of tiles, reused across calls.
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Bytes of transformed input and products a chunk of tiles keeps (in the L2 cache).
const CHUNK_BYTES: usize = 512 << 10;

/// One image: `x` blocked (icb, h, w, L) → `out` blocked (cbo, ho, wo, L). The tiles go in chunks
/// whose transformed input and products stay in cache; with more chunks than threads each thread
/// takes whole chunks, otherwise each step of a chunk is split across the threads.
///
/// # Safety
/// `isa` must be supported; the slices must have the sizes of one image of the convolution.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn run_image(
    isa: Isa,
    u: &[f32],
    bias: &[f32],
    x: &[f32],
    (cin, cout, h, w): (usize, usize, usize, usize),
    pad: Pad,
    (act, residual): (Act, Option<&[f32]>),
    out: *mut f32,
) {
    let l = isa.lanes();
    let (ho, wo) = (h + pad.top + pad.bottom - 2, w + pad.left + pad.right - 2);
    let g = Geom {
        h,
        w,
        ho,
        wo,
        pad,
        icb: cin.div_ceil(l),
        cbo: cout.div_ceil(l),
        th: ho.div_ceil(2),
        tw: wo.div_ceil(2),
    };
    let per_tile = 16 * (g.icb + g.cbo) * l * 4;
    // Where the transformed weights outweigh the tiles' data, one chunk reads them once.
    let chunk = if u.len() * 4 > per_tile * g.tiles() {
        g.tiles()
    } else {
        (CHUNK_BYTES / per_tile).clamp(8, g.tiles().max(8))
    };
    let chunks: Vec<std::ops::Range<usize>> = (0..g.tiles())
        .step_by(chunk)
        .map(|t| t..(t + chunk).min(g.tiles()))
        .collect();
    let zeros = vec![0f32; g.cbo * l];
    let p = Ptrs {
        x: Ptr(x.as_ptr()),
        u: Ptr(u.as_ptr()),
        bias: Ptr(bias.as_ptr()),
        zeros: Ptr(zeros.as_ptr()),
        residual: Ptr(residual.map_or(std::ptr::null(), <[f32]>::as_ptr)),
        out: Ptr(out),
    };
    let threads = crate::threads();
    if threads > 1 && chunks.len() >= threads {
        chunks.par_iter().for_each(|c| {
            crate::on_this_thread(|| unsafe { run_chunk(isa, &g, &p, act, c.clone()) })
        });
    } else {
        for c in chunks {
            unsafe { run_chunk(isa, &g, &p, act, c) };
        }
    }
}

/// The buffers of one call.
struct Ptrs {
    x: Ptr<*const f32>,
    u: Ptr<*const f32>,
    bias: Ptr<*const f32>,
    zeros: Ptr<*const f32>,
    residual: Ptr<*const f32>,
    out: Ptr<*mut f32>,
}

/// Tiles `tiles`: transform in, 16 products, transform out.
unsafe fn run_chunk(isa: Isa, g: &Geom, p: &Ptrs, act: Act, tiles: std::ops::Range<usize>) {
    let l = isa.lanes();
    let n = tiles.len();
    let (v_len, m_len) = (16 * g.icb * n * l, 16 * g.cbo * n * l);
    let mut buf = SCRATCH.with(|c| c.take());
    if buf.len() < v_len + m_len {
        buf.resize(v_len + m_len, 0.0);
    }
    let (v, m) = buf.split_at_mut(v_len);
    let (vp, mp) = (Ptr(v.as_mut_ptr()), Ptr(m.as_mut_ptr()));
    let t = Chunk {
        tiles: tiles.clone(),
    };
    each_block(g.icb, |b| unsafe {
        input_tiles(isa, g, &t, p.x.get(), vp.get(), b)
    });
    unsafe {
        pointwise_planes(
            isa,
            16,
            (vp.get(), p.u.get(), p.zeros.get(), mp.get()),
            (g.icb * l, g.cbo * l, n),
        )
    };
    each_block(g.cbo, |b| unsafe {
        output_tiles(
            isa,
            g,
            &t,
            (mp.get(), p.bias.get(), p.residual.get(), p.out.get()),
            act,
            b,
        )
    });
    SCRATCH.with(|c| c.replace(buf));
}

/// The tiles of a chunk (row-major tile indices).
struct Chunk {
    tiles: std::ops::Range<usize>,
}

/// `f(b)` for every block, across the pool where the kernels may use it.
fn each_block(blocks: usize, f: impl Fn(usize) + Send + Sync) {
    if crate::threads() > 1 && blocks > 1 {
        (0..blocks).into_par_iter().for_each(f);
    } else {
        (0..blocks).for_each(f);
    }
}

unsafe fn input_tiles(isa: Isa, g: &Geom, t: &Chunk, x: *const f32, v: *mut f32, b: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { input_avx512(g, t, x, v, b) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { input_avx2(g, t, x, v, b) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!(),
    }
}

unsafe fn output_tiles(
    isa: Isa,
    g: &Geom,
    t: &Chunk,
    ptrs: (*const f32, *const f32, *const f32, *mut f32),
    act: Act,
    b: usize,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { output_avx512(g, t, ptrs, act, b) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { output_avx2(g, t, ptrs, act, b) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn input_avx512(g: &Geom, t: &Chunk, x: *const f32, v: *mut f32, b: usize) {
    unsafe { input_block::<Avx512>(g, t, x, v, b) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn input_avx2(g: &Geom, t: &Chunk, x: *const f32, v: *mut f32, b: usize) {
    unsafe { input_block::<Avx2>(g, t, x, v, b) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn output_avx512(
    g: &Geom,
    t: &Chunk,
    ptrs: (*const f32, *const f32, *const f32, *mut f32),
    act: Act,
    b: usize,
) {
    unsafe { output_block::<Avx512>(g, t, ptrs, act, b) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn output_avx2(
    g: &Geom,
    t: &Chunk,
    ptrs: (*const f32, *const f32, *const f32, *mut f32),
    act: Act,
    b: usize,
) {
    unsafe { output_block::<Avx2>(g, t, ptrs, act, b) }
}

// The transforms are functions, not closures: a closure would not inherit the caller's target
// features, and the vector operations in it would not be inlined.

/// Bᵀ r for Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1].
#[inline(always)]
unsafe fn b_t<S: Simd>(r: [S::V; 4]) -> [S::V; 4] {
    unsafe {
        [
            S::sub(r[0], r[2]),
            S::add(r[1], r[2]),
            S::sub(r[2], r[1]),
            S::sub(r[1], r[3]),
        ]
    }
}

/// Aᵀ r for Aᵀ = [1 1 1 0; 0 1 −1 −1].
#[inline(always)]
unsafe fn a_t<S: Simd>(r: [S::V; 4]) -> [S::V; 2] {
    unsafe {
        [
            S::add(S::add(r[0], r[1]), r[2]),
            S::sub(S::sub(r[1], r[2]), r[3]),
        ]
    }
}

/// V = Bᵀ d B for every tile of input block `b`; Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1].
// The loops index the columns of 4x4 arrays of vectors (a transpose), which iterators do not express.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn input_block<S: Simd>(g: &Geom, t: &Chunk, x: *const f32, v: *mut f32, b: usize) {
    let l = S::LANES;
    let n = t.tiles.len();
    let plane = g.icb * n * l;
    unsafe {
        let x = x.add(b * g.h * g.w * l);
        let zero = S::splat(0.0);
        for (i, tile) in t.tiles.clone().enumerate() {
            let (ty, tx) = (tile / g.tw, tile % g.tw);
            {
                let mut d = [[zero; 4]; 4];
                for (r, row) in d.iter_mut().enumerate() {
                    let iy = (2 * ty + r).wrapping_sub(g.pad.top);
                    if iy >= g.h {
                        continue;
                    }
                    for (c, e) in row.iter_mut().enumerate() {
                        let ix = (2 * tx + c).wrapping_sub(g.pad.left);
                        if ix < g.w {
                            *e = S::load(x.add((iy * g.w + ix) * l));
                        }
                    }
                }
                // Rows, then columns.
                let mut t = [[zero; 4]; 4];
                for (c, tc) in t.iter_mut().enumerate() {
                    *tc = b_t::<S>([d[0][c], d[1][c], d[2][c], d[3][c]]);
                }
                let at = v.add((b * n + i) * l);
                for r in 0..4 {
                    let row = b_t::<S>([t[0][r], t[1][r], t[2][r], t[3][r]]);
                    for (c, val) in row.into_iter().enumerate() {
                        S::store(at.add((r * 4 + c) * plane), val);
                    }
                }
            }
        }
    }
}

/// Y = Aᵀ M A (+ bias, residual, activation) for every tile of output block `b`;
/// Aᵀ = [1 1 1 0; 0 1 −1 −1].
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn output_block<S: Simd>(
    g: &Geom,
    t: &Chunk,
    (m, bias, residual, out): (*const f32, *const f32, *const f32, *mut f32),
    act: Act,
    b: usize,
) {
    let l = S::LANES;
    let n = t.tiles.len();
    let plane = g.cbo * n * l;
    unsafe {
        let bv = S::load(bias.add(b * l));
        let zero = S::splat(0.0);
        for (i, tile) in t.tiles.clone().enumerate() {
            let (ty, tx) = (tile / g.tw, tile % g.tw);
            {
                let src = m.add((b * n + i) * l);
                let mut mv = [zero; 16];
                for (k, v) in mv.iter_mut().enumerate() {
                    *v = S::load(src.add(k * plane));
                }
                // Columns of each row, then rows.
                let mut t = [[zero; 2]; 4];
                for (r, tr) in t.iter_mut().enumerate() {
                    *tr = a_t::<S>([mv[r * 4], mv[r * 4 + 1], mv[r * 4 + 2], mv[r * 4 + 3]]);
                }
                for dx in 0..2 {
                    let y = a_t::<S>([t[0][dx], t[1][dx], t[2][dx], t[3][dx]]);
                    for (dy, val) in y.into_iter().enumerate() {
                        let (oy, ox) = (2 * ty + dy, 2 * tx + dx);
                        if oy >= g.ho || ox >= g.wo {
                            continue;
                        }
                        let at = (b * g.ho * g.wo + oy * g.wo + ox) * l;
                        let mut val = S::add(val, bv);
                        if !residual.is_null() {
                            val = S::add(val, S::load(residual.add(at)));
                        }
                        S::store(out.add(at), activate::<S>(act, val));
                    }
                }
            }
        }
    }
}
