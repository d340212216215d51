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
