//! Loops the compiler vectorises for the CPU it runs on, not only for the SSE2 baseline.

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
