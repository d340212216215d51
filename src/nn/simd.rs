//! Loops the compiler vectorises for the CPU it runs on, not only for the SSE2 baseline.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Runs `f` compiled for AVX2 where the CPU has it, so that its loops (over plain slices, with no
/// per-element branch on an enum) are vectorised 8 floats at a time instead of SSE2's 4.
#[inline(always)]
pub fn vectorized(f: impl FnOnce()) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(f: impl FnOnce()) {
            f()
        }
        // SAFETY: the CPU has AVX2.
        return unsafe { avx2(f) };
    }
    f()
}

/// Σ f(a[i], b[i]) in eight independent lanes, so that the reduction vectorises (a single running
/// sum would have to be added in order).
#[inline(always)]
pub fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let b = &b[..a.len()];
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            lanes[l] += f(x[l], y[l]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// A vector of `len` values written in parallel, `chunk` at a time, by `fill(chunk index, chunk)`,
/// without zeroing the memory first (calloc's memset of a reused block costs as much as a pass of
/// an elementwise kernel).
///
/// # Safety
/// `fill` must write every element of each chunk it is given.
pub unsafe fn par_filled(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let mut out: Vec<MaybeUninit<f32>> = Vec::with_capacity(len);
    // SAFETY: MaybeUninit values need no initialisation.
    unsafe { out.set_len(len) };
    out.par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, c)| fill(i, c));
    let mut out = std::mem::ManuallyDrop::new(out);
    // SAFETY: every element was written (the caller's contract), and MaybeUninit<f32> has the
    // layout of f32; the allocation moves to the new vector whole.
    unsafe { Vec::from_raw_parts(out.as_mut_ptr().cast::<f32>(), len, out.capacity()) }
}
