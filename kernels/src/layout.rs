//! Layout changes between NCHW and the blocked layout, and the pools that ResNet needs on blocked
//! activations.

use std::mem::MaybeUninit;

use crate::{Isa, KernelError, for_each_chunk};

fn check(what: &str, got: usize, want: usize) -> Result<(), KernelError> {
    if got == want {
        Ok(())
    } else {
        Err(KernelError::Shape(format!(
            "{what}: {got} floats, expected {want}"
        )))
    }
}

/// (n, c, h, w) → (n, ⌈c/L⌉, h, w, L), padding channels with zeros. Writes every float of `out`.
pub fn to_blocked(
    isa: Isa,
    x: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    out: &mut [MaybeUninit<f32>],
) -> Result<(), KernelError> {
    let l = isa.lanes();
    let cb = c.div_ceil(l);
    check("NCHW input", x.len(), n * c * h * w)?;
    check("blocked output", out.len(), n * cb * h * w * l)?;
    for_each_chunk(out, h * w * l, |i, dst| {
        let (image, b) = (i / cb, i % cb);
        let lanes = l.min(c - b * l);
        if lanes < l {
            dst.fill(MaybeUninit::new(0.0));
        }
        for lane in 0..lanes {
            let src = &x[(image * c + b * l + lane) * h * w..][..h * w];
            for (p, &v) in src.iter().enumerate() {
                dst[p * l + lane].write(v);
            }
        }
    });
    Ok(())
}

/// (n, ⌈c/L⌉, h, w, L) → (n, c, h, w), dropping the padding channels. Writes every float of `out`.
pub fn to_nchw(
    isa: Isa,
    x: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    out: &mut [MaybeUninit<f32>],
) -> Result<(), KernelError> {
    let l = isa.lanes();
    let cb = c.div_ceil(l);
    check("blocked input", x.len(), n * cb * h * w * l)?;
    check("NCHW output", out.len(), n * c * h * w)?;
    for_each_chunk(out, h * w, |i, dst| {
        let (image, ch) = (i / c, i % c);
        let src = &x[(image * cb + ch / l) * h * w * l..][..h * w * l];
        for (p, d) in dst.iter_mut().enumerate() {
            d.write(src[p * l + ch % l]);
        }
    });
    Ok(())
}

/// Mean over the pixels of blocked (n, ⌈c/L⌉, h, w, L) → (n, c).
pub fn global_avg_pool(
    isa: Isa,
    x: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    out: &mut [f32],
) -> Result<(), KernelError> {
    let l = isa.lanes();
    let cb = c.div_ceil(l);
    check("blocked input", x.len(), n * cb * h * w * l)?;
    check("pooled output", out.len(), n * c)?;
    let scale = 1.0 / (h * w).max(1) as f32;
    for (image, dst) in out.chunks_mut(c).enumerate() {
        for b in 0..cb {
            let mut sum = vec![0f32; l];
            for px in x[(image * cb + b) * h * w * l..][..h * w * l].chunks_exact(l) {
                for (s, v) in sum.iter_mut().zip(px) {
                    *s += v;
                }
            }
            let lanes = l.min(c - b * l);
            for (d, s) in dst[b * l..b * l + lanes].iter_mut().zip(&sum) {
                *d = s * scale;
            }
        }
    }
    Ok(())
}

/// Max pooling of blocked (n, ⌈c/L⌉, h, w, L) over `k` x `k` windows with `stride` and symmetric
/// `pad` (padded cells never win; PyTorch's floor mode). Returns (ho, wo); `out` must hold
/// n · ⌈c/L⌉ · ho · wo · L floats.
#[allow(clippy::too_many_arguments)]
pub fn max_pool(
    isa: Isa,
    x: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    k: usize,
    stride: usize,
    pad: usize,
    out: &mut [f32],
) -> Result<(usize, usize), KernelError> {
    let l = isa.lanes();
    let cb = c.div_ceil(l);
    if k == 0 || stride == 0 || h + 2 * pad < k || w + 2 * pad < k || pad >= k {
        return Err(KernelError::Shape(format!(
            "max pool {k}x{k}/{stride} pad {pad} on {h}x{w}"
        )));
    }
    let (ho, wo) = (
        (h + 2 * pad - k) / stride + 1,
        (w + 2 * pad - k) / stride + 1,
    );
    check("blocked input", x.len(), n * cb * h * w * l)?;
    check("pooled output", out.len(), n * cb * ho * wo * l)?;
    for_each_chunk(out, wo * l, |i, dst| {
        let (plane, oy) = (i / ho, i % ho);
        let src = &x[plane * h * w * l..][..h * w * l];
        let ys = (oy * stride).saturating_sub(pad)..(oy * stride + k - pad).min(h);
        for (ox, d) in dst.chunks_exact_mut(l).enumerate() {
            let xs = (ox * stride).saturating_sub(pad)..(ox * stride + k - pad).min(w);
            d.fill(f32::NEG_INFINITY);
            for y in ys.clone() {
                for xx in xs.clone() {
                    for (m, &v) in d.iter_mut().zip(&src[(y * w + xx) * l..][..l]) {
                        *m = m.max(v);
                    }
                }
            }
        }
    });
    Ok((ho, wo))
}
