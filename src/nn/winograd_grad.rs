//! The weight gradient of a 3x3 stride-1 convolution by Winograd F(2x2, 3x3), 16 products where
//! im2col + GEMM has 36.
//!
//! The forward pass computes each 2x2 output tile as Y = Aᵀ [U ⊙ V] A, with U = G g Gᵀ the kernel's
//! transform and V = Bᵀ d B its 4x4 input tile's. Its gradient with respect to U is, summed over the
//! tiles, dU = Σ (A dY Aᵀ) ⊙ V, and dg = Gᵀ dU G. Per (output, input) channel pair and for each of
//! the 16 positions k of the 4x4 transform, dU_k = M_k · V_kᵀ: one matrix product of the output
//! gradients' transforms (Cout x tiles) by the inputs' (tiles x Cin), over every tile of the batch.
//! Tiles that reach past the output (an odd size) have zero gradient there; input taps outside the
//! image are the padding's zeros, as in the forward pass.

use rayon::prelude::*;

use super::conv_train::Planes;
use histolens_kernels::Pad;

/// Tiles of one image: rows and columns of 2x2 output tiles.
#[derive(Clone, Copy)]
struct Tiles {
    rows: usize,
    cols: usize,
}

impl Tiles {
    fn of(p: Planes) -> Self {
        Tiles {
            rows: p.oh.div_ceil(2),
            cols: p.ow.div_ceil(2),
        }
    }

    fn per_image(&self) -> usize {
        self.rows * self.cols
    }
}

/// dW (cout, cin, 3, 3) of a 3x3 stride-1 convolution of `x` (n, cin, h, w) padded by `pad`, from
/// the output gradient `gy` (n, cout, oh, ow).
pub(crate) fn grad_weight_3x3(
    x: &[f32],
    gy: &[f32],
    (n, cin, cout): (usize, usize, usize),
    p: Planes,
    pad: Pad,
) -> Vec<f32> {
    let tiles = Tiles::of(p);
    let per_image = tiles.per_image();
    let t = n * per_image;
    // V: [k][tile][c] (each V_kᵀ a row-major tiles x Cin matrix), from channels-last images, each
    // image's tiles on one thread.
    let mut v = vec![0f32; 16 * t * cin];
    {
        let mut per_image_rows: Vec<Vec<&mut [f32]>> =
            (0..n).map(|_| Vec::with_capacity(16)).collect();
        for vk in v.chunks_mut(t * cin) {
            for (i, rows) in vk.chunks_mut(per_image * cin).enumerate() {
                per_image_rows[i].push(rows);
            }
        }
        per_image_rows
            .par_iter_mut()
            .enumerate()
            .for_each(|(i, rows)| {
                let image = &x[i * cin * p.h * p.w..][..cin * p.h * p.w];
                input_tiles(image, cin, p, pad, tiles, rows);
            });
    }
    // M: [o][k][tile] (M_k a row-major Cout x tiles matrix of row stride 16·tiles).
    let mut m = vec![0f32; cout * 16 * t];
    m.par_chunks_mut(16 * t).enumerate().for_each(|(o, mo)| {
        for i in 0..n {
            let plane = &gy[(i * cout + o) * p.oh * p.ow..][..p.oh * p.ow];
            gradient_tiles(plane, p, tiles, i * per_image, t, mo);
        }
    });
    // dU_k (cout x cin) = M_k · V_kᵀ, the 16 products across the pool.
    let mut du = vec![0f32; 16 * cout * cin];
    du.par_chunks_mut(cout * cin)
        .enumerate()
        .for_each(|(k, duk)| {
            // SAFETY: M_k's rows are at o·16t + k·t, each t long, and V_kᵀ is the t x cin block at
            // k·t·cin: in bounds of `m` and `v`; duk is cout x cin row-major and exclusively borrowed.
            unsafe {
                gemm::gemm(
                    cout,
                    cin,
                    t,
                    duk.as_mut_ptr(),
                    1,
                    cin as isize,
                    false,
                    m.as_ptr().add(k * t),
                    1,
                    (16 * t) as isize,
                    v.as_ptr().add(k * t * cin),
                    1,
                    cin as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        });
    drop((m, v));
    // dg = Gᵀ dU G for each channel pair.
    let mut gw = vec![0f32; cout * cin * 9];
    gw.par_chunks_mut(cin * 9).enumerate().for_each(|(o, go)| {
        for (c, g) in go.chunks_exact_mut(9).enumerate() {
            let mut d = [0f32; 16];
            for (k, dk) in d.iter_mut().enumerate() {
                *dk = du[(k * cout + o) * cin + c];
            }
            g.copy_from_slice(&kernel_gradient(&d));
        }
    });
    gw
}

/// Bᵀ d B for every tile of one image (cin, h, w), into `rows[k]` (tiles x cin, channels last):
/// the image is made channels-last first, so that each tile's transform runs over whole vectors of
/// channels.
fn input_tiles(
    image: &[f32],
    cin: usize,
    p: Planes,
    pad: Pad,
    tiles: Tiles,
    rows: &mut [&mut [f32]],
) {
    let mut hwc = vec![0f32; p.h * p.w * cin];
    for (c, plane) in image.chunks_exact(p.h * p.w).enumerate() {
        for (px, &value) in plane.iter().enumerate() {
            hwc[px * cin + c] = value;
        }
    }
    let zeros = vec![0f32; cin];
    let pixel = |y: isize, x: isize| -> &[f32] {
        if y < 0 || x < 0 || y >= p.h as isize || x >= p.w as isize {
            &zeros
        } else {
            &hwc[(y as usize * p.w + x as usize) * cin..][..cin]
        }
    };
    // Bᵀ d B, rows then columns: (d0 - d2, d1 + d2, d2 - d1, d1 - d3).
    let mut e = vec![0f32; 16 * cin];
    for ty in 0..tiles.rows {
        for tx in 0..tiles.cols {
            let y0 = (2 * ty) as isize - pad.top as isize;
            let x0 = (2 * tx) as isize - pad.left as isize;
            for col in 0..4 {
                let d: [&[f32]; 4] =
                    std::array::from_fn(|r| pixel(y0 + r as isize, x0 + col as isize));
                let mut out = e.chunks_exact_mut(cin).skip(col).step_by(4);
                let mut next = || out.next().expect("4 rows of e");
                combine(d, [next(), next(), next(), next()]);
            }
            let tile = ty * tiles.cols + tx;
            for r in 0..4 {
                let d: [&[f32]; 4] = std::array::from_fn(|col| &e[(r * 4 + col) * cin..][..cin]);
                let [v0, v1, v2, v3] = &mut rows[r * 4..r * 4 + 4] else {
                    unreachable!("16 rows")
                };
                let at = tile * cin;
                combine(
                    d,
                    [
                        &mut v0[at..][..cin],
                        &mut v1[at..][..cin],
                        &mut v2[at..][..cin],
                        &mut v3[at..][..cin],
                    ],
                );
            }
        }
    }
}

/// Bᵀ applied to four vectors: (d0 - d2, d1 + d2, d2 - d1, d1 - d3), value by value.
#[inline(always)]
fn combine([d0, d1, d2, d3]: [&[f32]; 4], [r0, r1, r2, r3]: [&mut [f32]; 4]) {
    let n = d0.len();
    let (d1, d2, d3) = (&d1[..n], &d2[..n], &d3[..n]);
    let (r0, r1, r2, r3) = (&mut r0[..n], &mut r1[..n], &mut r2[..n], &mut r3[..n]);
    for j in 0..n {
        r0[j] = d0[j] - d2[j];
        r1[j] = d1[j] + d2[j];
        r2[j] = d2[j] - d1[j];
        r3[j] = d1[j] - d3[j];
    }
}

/// A dY Aᵀ for every 2x2 tile of one output-gradient plane, into rows k·t + first.. of `mo`.
fn gradient_tiles(plane: &[f32], p: Planes, tiles: Tiles, first: usize, t: usize, mo: &mut [f32]) {
    let at = |y: usize, x: usize| -> f32 {
        if y < p.oh && x < p.ow {
            plane[y * p.ow + x]
        } else {
            0.0
        }
    };
    for ty in 0..tiles.rows {
        for tx in 0..tiles.cols {
            let (y, x) = (2 * ty, 2 * tx);
            let (a, b, c, d) = (at(y, x), at(y, x + 1), at(y + 1, x), at(y + 1, x + 1));
            // A dY: rows (a, b), (a + c, b + d), (a - c, b - d), (-c, -d); then · Aᵀ per row:
            // (p, q) → (p, p + q, p - q, -q).
            let rows = [(a, b), (a + c, b + d), (a - c, b - d), (-c, -d)];
            let tile = first + ty * tiles.cols + tx;
            for (r, (p0, q0)) in rows.into_iter().enumerate() {
                let out = [p0, p0 + q0, p0 - q0, -q0];
                for (k, value) in out.into_iter().enumerate() {
                    mo[(r * 4 + k) * t + tile] = value;
                }
            }
        }
    }
}

/// Gᵀ dU G: a 3x3 kernel's gradient from its transform's (4x4, row by row).
fn kernel_gradient(du: &[f32; 16]) -> [f32; 9] {
    // Gᵀ rows: (1, ½, ½, 0), (0, ½, -½, 0), (0, ½, ½, 1).
    let gt = |v: [f32; 4]| {
        [
            v[0] + 0.5 * (v[1] + v[2]),
            0.5 * (v[1] - v[2]),
            0.5 * (v[1] + v[2]) + v[3],
        ]
    };
    // Gᵀ dU: for each column of dU.
    let mut left = [[0f32; 4]; 3];
    for c in 0..4 {
        let col = gt([du[c], du[4 + c], du[8 + c], du[12 + c]]);
        for r in 0..3 {
            left[r][c] = col[r];
        }
    }
    // (Gᵀ dU) G: Gᵀ applied to each row.
    let mut g = [0f32; 9];
    for r in 0..3 {
        let row = gt(left[r]);
        g[r * 3..r * 3 + 3].copy_from_slice(&row);
    }
    g
}
