//! The kernels against a plain NCHW convolution, on every instruction set this CPU has.

use std::mem::MaybeUninit;

/// `len` floats written by `write`, which starts from NaN so that an unwritten float shows.
fn written(len: usize, write: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut out = vec![MaybeUninit::new(f32::NAN); len];
    write(&mut out);
    // SAFETY: every element was initialised (to NaN) before `write`.
    out.into_iter()
        .map(|v| unsafe { v.assume_init() })
        .collect()
}

use super::*;

/// A deterministic pseudo-random sequence in [-1, 1).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn reference(
    spec: ConvSpec,
    pad: Pad,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    wt: &[f32],
    b: &[f32],
    act: Act,
) -> Vec<f32> {
    let (ho, wo) = (
        (h + pad.top + pad.bottom - spec.kh) / spec.stride + 1,
        (w + pad.left + pad.right - spec.kw) / spec.stride + 1,
    );
    let per_out = if spec.depthwise { 1 } else { spec.cin };
    let mut out = vec![0f32; n * spec.cout * ho * wo];
    for i in 0..n {
        for o in 0..spec.cout {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut acc = b[o] as f64;
                    for ci in 0..per_out {
                        let c = if spec.depthwise { o } else { ci };
                        for ky in 0..spec.kh {
                            for kx in 0..spec.kw {
                                let iy = (oy * spec.stride + ky) as isize - pad.top as isize;
                                let ix = (ox * spec.stride + kx) as isize - pad.left as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xv =
                                    x[((i * spec.cin + c) * h + iy as usize) * w + ix as usize];
                                let wv = wt[((o * per_out + ci) * spec.kh + ky) * spec.kw + kx];
                                acc += (xv * wv) as f64;
                            }
                        }
                    }
                    let v = acc as f32;
                    out[((i * spec.cout + o) * ho + oy) * wo + ox] = match act {
                        Act::Identity => v,
                        Act::Relu => v.max(0.0),
                        Act::Relu6 => v.clamp(0.0, 6.0),
                    };
                }
            }
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn check(
    cin: usize,
    cout: usize,
    k: (usize, usize),
    stride: usize,
    pad: (usize, usize, usize, usize),
    depthwise: bool,
    input: Input,
    act: Act,
) {
    check_at(
        (2, 13, 11),
        cin,
        cout,
        k,
        stride,
        pad,
        depthwise,
        input,
        act,
    )
}

#[allow(clippy::too_many_arguments)]
fn check_at(
    (n, h, w): (usize, usize, usize),
    cin: usize,
    cout: usize,
    k: (usize, usize),
    stride: usize,
    pad: (usize, usize, usize, usize),
    depthwise: bool,
    input: Input,
    act: Act,
) {
    let spec = ConvSpec {
        cin,
        cout,
        kh: k.0,
        kw: k.1,
        stride,
        depthwise,
    };
    let pad = Pad {
        top: pad.0,
        bottom: pad.1,
        left: pad.2,
        right: pad.3,
    };
    let per_out = if depthwise { 1 } else { cin };
    let x = values(n * cin * h * w, 1);
    let wt = values(cout * per_out * k.0 * k.1, 2);
    let b = values(cout, 3);
    let want = reference(spec, pad, &x, n, h, w, &wt, &b, act);
    for &isa in Isa::supported() {
        let l = isa.lanes();
        let p = PackedConv::new(isa, spec, input, &wt, &b).unwrap();
        let xin = match input {
            Input::Nchw => x.clone(),
            Input::Blocked => written(n * cin.div_ceil(l) * l * h * w, |xb| {
                to_blocked(isa, &x, (n, cin, h, w), xb).unwrap()
            }),
        };
        let (ho, wo) = p.output_size(h, w, pad).unwrap();
        let mut out = vec![MaybeUninit::new(f32::NAN); n * cout.div_ceil(l) * l * ho * wo];
        p.run(&xin, (n, h, w), pad, act, None, &mut out).unwrap();
        // SAFETY: run writes every float (and they started as NaN anyway).
        let out: Vec<f32> = out
            .into_iter()
            .map(|v| unsafe { v.assume_init() })
            .collect();
        let got = written(n * cout * ho * wo, |got| {
            to_nchw(isa, &out, (n, cout, ho, wo), got).unwrap()
        });
        // f32 sums of up to thousands of terms: the tolerance follows the value's size.
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-4,
            "{isa:?} {spec:?} {act:?}: max relative difference {worst}"
        );
        // Padding channels of the output stay zero, so the next layer may read them.
        for (i, v) in out.iter().enumerate() {
            if (i / (ho * wo * l) % cout.div_ceil(l)) * l + i % l >= cout {
                assert_eq!(*v, 0.0, "{isa:?} {spec:?}: padding lane {i} = {v}");
            }
        }
    }
}

#[test]
fn dense_convolutions_match_the_reference() {
    use Act::*;
    use Input::*;
    check(3, 64, (7, 7), 2, (3, 3, 3, 3), false, Nchw, Relu); // ResNet stem
    check(3, 32, (3, 3), 2, (0, 1, 0, 1), false, Nchw, Relu6); // EfficientNet stem, TF SAME
    check(20, 24, (3, 3), 1, (1, 1, 1, 1), false, Blocked, Relu);
    check(40, 70, (3, 3), 2, (1, 1, 1, 1), false, Blocked, Identity);
    check(24, 40, (1, 1), 1, (0, 0, 0, 0), false, Blocked, Identity); // flat
    check(96, 36, (1, 1), 2, (0, 0, 0, 0), false, Blocked, Relu); // ResNet downsample
    check(8, 16, (1, 7), 1, (0, 0, 3, 3), false, Blocked, Relu6);
    check(8, 16, (5, 5), 3, (0, 0, 0, 0), false, Blocked, Relu);
    check(16, 8, (3, 3), 1, (2, 2, 2, 2), false, Blocked, Relu); // padding wider than the kernel's reach
}

#[test]
fn many_input_blocks_are_summed_in_chunks() {
    // 3x3 over 320 channels: the weights of a tile's input blocks exceed one chunk.
    check(
        320,
        72,
        (3, 3),
        1,
        (1, 1, 1, 1),
        false,
        Input::Blocked,
        Act::Relu,
    );
}

#[test]
fn winograd_over_many_chunks_of_tiles() {
    // 3x3 stride 1 on 64 channels at 40x41: 420 tiles in several chunks, odd width.
    check_at(
        (1, 40, 41),
        64,
        48,
        (3, 3),
        1,
        (1, 1, 1, 1),
        false,
        Input::Blocked,
        Act::Relu,
    );
}

#[test]
fn depthwise_convolutions_match_the_reference() {
    use Act::*;
    check(24, 24, (3, 3), 1, (1, 1, 1, 1), true, Input::Blocked, Relu6);
    check(40, 40, (5, 5), 2, (1, 2, 1, 2), true, Input::Blocked, Relu6);
    check(
        16,
        16,
        (3, 3),
        2,
        (0, 1, 0, 1),
        true,
        Input::Blocked,
        Identity,
    );
    check(8, 8, (3, 3), 3, (1, 1, 2, 0), true, Input::Blocked, Relu);
}

#[test]
fn pools_and_layouts() {
    let (n, c, h, w) = (2, 20, 9, 8);
    let x = values(n * c * h * w, 4);
    for &isa in Isa::supported() {
        let l = isa.lanes();
        let xb = written(n * c.div_ceil(l) * l * h * w, |xb| {
            to_blocked(isa, &x, (n, c, h, w), xb).unwrap()
        });
        // The padding channels of the last block are zeros (written: they started as NaN).
        for (i, v) in xb.iter().enumerate() {
            let channel = i / (h * w * l) % c.div_ceil(l) * l + i % l;
            assert!(
                channel < c || *v == 0.0,
                "padding channel {channel} holds {v}"
            );
        }
        let back = written(x.len(), |back| {
            to_nchw(isa, &xb, (n, c, h, w), back).unwrap()
        });
        assert_eq!(back, x);
        let mut pooled = vec![0f32; n * c];
        global_avg_pool(isa, &xb, (n, c, h, w), &mut pooled).unwrap();
        for (i, &v) in pooled.iter().enumerate() {
            let mean = x[i * h * w..][..h * w].iter().sum::<f32>() / (h * w) as f32;
            assert!((v - mean).abs() < 1e-5);
        }
        let (ho, wo) = (5, 4);
        let mut mp = vec![0f32; n * c.div_ceil(l) * l * ho * wo];
        assert_eq!(
            max_pool(isa, &xb, (n, c, h, w), 3, 2, 1, &mut mp).unwrap(),
            (ho, wo)
        );
        let got = written(n * c * ho * wo, |got| {
            to_nchw(isa, &mp, (n, c, ho, wo), got).unwrap()
        });
        for (i, &v) in got.iter().enumerate() {
            let (plane, oy, ox) = (i / (ho * wo), i / wo % ho, i % wo);
            let mut m = f32::NEG_INFINITY;
            for y in (oy * 2).saturating_sub(1)..(oy * 2 + 2).min(h) {
                for xx in (ox * 2).saturating_sub(1)..(ox * 2 + 2).min(w) {
                    m = m.max(x[(plane * h + y) * w + xx]);
                }
            }
            assert_eq!(v, m);
        }
    }
}

#[test]
fn wrong_sizes_are_refused() {
    let Some(&isa) = Isa::supported().first() else {
        return;
    };
    let spec = ConvSpec {
        cin: 4,
        cout: 4,
        kh: 3,
        kw: 3,
        stride: 1,
        depthwise: false,
    };
    assert!(matches!(
        PackedConv::new(isa, spec, Input::Blocked, &[0.0; 10], &[0.0; 4]),
        Err(KernelError::Shape(_))
    ));
    let p = PackedConv::new(isa, spec, Input::Blocked, &[0.0; 144], &[0.0; 4]).unwrap();
    let l = isa.lanes();
    assert!(
        p.run(
            &vec![0.0; l * 25],
            (1, 5, 5),
            Pad::default(),
            Act::Relu,
            None,
            &mut vec![MaybeUninit::new(0.0); l * 8]
        )
        .is_err()
    );
    assert!(p.output_size(2, 5, Pad::default()).is_err());
}

#[test]
fn residual_is_added_before_the_activation() {
    let (n, h, w, cin, cout) = (2, 7, 9, 24, 40);
    let spec = ConvSpec {
        cin,
        cout,
        kh: 3,
        kw: 3,
        stride: 1,
        depthwise: false,
    };
    let pad = Pad {
        top: 1,
        bottom: 1,
        left: 1,
        right: 1,
    };
    for &isa in Isa::supported() {
        let l = isa.lanes();
        let p = PackedConv::new(
            isa,
            spec,
            Input::Blocked,
            &values(cout * cin * 9, 5),
            &values(cout, 6),
        )
        .unwrap();
        let x = values(n * cin.div_ceil(l) * l * h * w, 7);
        let len = n * cout.div_ceil(l) * l * h * w;
        let residual = values(len, 8);
        let run = |act, res| {
            let mut out = vec![MaybeUninit::new(f32::NAN); len];
            p.run(&x, (n, h, w), pad, act, res, &mut out).unwrap();
            out.into_iter()
                .map(|v| unsafe { v.assume_init() })
                .collect::<Vec<f32>>()
        };
        let plain = run(Act::Identity, None);
        let fused = run(Act::Relu, Some(&residual));
        for ((f, p), r) in fused.iter().zip(&plain).zip(&residual) {
            assert!(
                (f - (p + r).max(0.0)).abs() < 1e-5,
                "{isa:?}: {f} vs {}",
                (p + r).max(0.0)
            );
        }
        let mut short = vec![MaybeUninit::new(0.0); len];
        assert!(
            p.run(
                &x,
                (n, h, w),
                pad,
                Act::Relu,
                Some(&residual[1..]),
                &mut short
            )
            .is_err()
        );
    }
}

/// Padding from (top, bottom, left, right).
fn pad4((top, bottom, left, right): (usize, usize, usize, usize)) -> Pad {
    Pad {
        top,
        bottom,
        left,
        right,
    }
}

/// A square k x k convolution of blocked input with seeded weights (scaled by `scale`) and bias.
fn square_conv(
    isa: Isa,
    (cin, cout, k, stride, depthwise): (usize, usize, usize, usize, bool),
    seed: u64,
    scale: f32,
) -> PackedConv {
    let per = if depthwise { 1 } else { cin };
    let spec = ConvSpec {
        cin,
        cout,
        kh: k,
        kw: k,
        stride,
        depthwise,
    };
    let wts: Vec<f32> = values(cout * per * k * k, seed)
        .iter()
        .map(|v| v * scale)
        .collect();
    PackedConv::new(isa, spec, Input::Blocked, &wts, &values(cout, seed + 1)).unwrap()
}

/// The fused expansion + depthwise equals the two convolutions in sequence.
#[test]
fn fused_expansion_and_depthwise_equal_the_two_convolutions() {
    // (input channels, expanded channels, kernel, stride, padding top/bottom/left/right, h, w)
    let cases = [
        (24, 144, 3, 1, (1, 1, 1, 1), 13, 11),
        (16, 96, 3, 2, (0, 1, 0, 1), 14, 12),
        (40, 72, 5, 2, (1, 2, 1, 2), 9, 15),
        // Windows over the budget: bands of rows, each expanding the rows it shares again.
        (20, 40, 5, 1, (2, 2, 2, 2), 112, 100),
        (16, 96, 3, 2, (0, 1, 0, 1), 113, 90),
    ];
    for (cin, mid, k, stride, pad, h, w) in cases {
        let pad = pad4(pad);
        let n = 2;
        for &isa in Isa::supported() {
            let l = isa.lanes();
            let dense = |cin, cout, kk, stride, depthwise, seed| {
                square_conv(isa, (cin, cout, kk, stride, depthwise), seed, 1.0)
            };
            let e = dense(cin, mid, 1, 1, false, 10);
            let d = dense(mid, mid, k, stride, true, 20);
            let x = values(n * cin.div_ceil(l) * l * h * w, 30);
            let run = |p: &PackedConv, x: &[f32], h, w, pad, act| {
                let (ho, wo) = p.output_size(h, w, pad).unwrap();
                let mut out = vec![MaybeUninit::new(f32::NAN); n * mid.div_ceil(l) * l * ho * wo];
                p.run(x, (n, h, w), pad, act, None, &mut out).unwrap();
                out.into_iter()
                    .map(|v| unsafe { v.assume_init() })
                    .collect::<Vec<f32>>()
            };
            let expanded = run(&e, &x, h, w, Pad::default(), Act::Relu6);
            let want = run(&d, &expanded, h, w, pad, Act::Relu6);
            // Split across the pool, and on one thread (units of whole planes' bands).
            for one_thread in [false, true] {
                let mut got = vec![MaybeUninit::new(f32::NAN); want.len()];
                let mut fused = || {
                    expand_depthwise(
                        &e,
                        &d,
                        &x,
                        (n, h, w),
                        pad,
                        (Act::Relu6, Act::Relu6),
                        &mut got,
                    )
                };
                if one_thread {
                    on_this_thread(fused)
                } else {
                    fused()
                }
                .unwrap();
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let g = unsafe { g.assume_init() };
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{isa:?} k{k}/{stride} at {i} (one thread: {one_thread}): {g} vs {w}"
                    );
                }
            }
            let mut short = vec![MaybeUninit::new(0.0); want.len() - 1];
            assert!(
                expand_depthwise(
                    &e,
                    &d,
                    &x,
                    (n, h, w),
                    pad,
                    (Act::Relu6, Act::Relu6),
                    &mut short
                )
                .is_err()
            );
        }
    }
}

/// The streamed inverted-residual block equals its convolutions in sequence, whether it streams
/// (strips, bands across threads) or runs as two passes.
#[test]
fn inverted_residual_equals_its_convolutions() {
    // (input, expanded, output channels, kernel, stride, padding t/b/l/r, h, w, residual)
    let cases = [
        (16, 96, 24, 3, 2, (0, 1, 0, 1), 112, 64, false),
        (16, 96, 24, 3, 2, (0, 1, 0, 1), 57, 46, false),
        (24, 144, 24, 3, 1, (1, 1, 1, 1), 30, 21, true),
        (24, 144, 40, 5, 2, (1, 2, 1, 2), 29, 28, false),
        (40, 240, 40, 5, 1, (2, 2, 2, 2), 28, 28, true),
        (32, 32, 16, 3, 1, (1, 1, 1, 1), 40, 33, false), // no expansion
        (112, 672, 112, 5, 1, (2, 2, 2, 2), 14, 14, true), // two passes
        (40, 80, 40, 3, 1, (1, 1, 1, 1), 5, 3, true),
    ];
    let mut streamed = [false; 2];
    for (cin, mid, cout, k, stride, pad, h, w, residual) in cases {
        let pad = pad4(pad);
        for n in [1, 3] {
            for &isa in Isa::supported() {
                let l = isa.lanes();
                let conv = |cin, cout, kk, stride, depthwise, seed| {
                    square_conv(isa, (cin, cout, kk, stride, depthwise), seed, 0.3)
                };
                let e = (mid != cin).then(|| conv(cin, mid, 1, 1, false, 10));
                let d = conv(mid, mid, k, stride, true, 20);
                let p = conv(mid, cout, 1, 1, false, 30);
                let x = values(n * cin.div_ceil(l) * l * h * w, 40);
                let run = |c: &PackedConv, x: &[f32], h, w, pad, act, res: Option<&[f32]>| {
                    let (ho, wo) = c.output_size(h, w, pad).unwrap();
                    let len = n * c.spec().cout.div_ceil(l) * l * ho * wo;
                    let mut out = vec![MaybeUninit::new(f32::NAN); len];
                    c.run(x, (n, h, w), pad, act, res, &mut out).unwrap();
                    out.into_iter()
                        .map(|v| unsafe { v.assume_init() })
                        .collect::<Vec<f32>>()
                };
                let expanded = match &e {
                    Some(e) => run(e, &x, h, w, Pad::default(), Act::Relu6, None),
                    None => x.clone(),
                };
                let dw = run(&d, &expanded, h, w, pad, Act::Relu6, None);
                let (ho, wo) = d.output_size(h, w, pad).unwrap();
                let want = run(
                    &p,
                    &dw,
                    ho,
                    wo,
                    Pad::default(),
                    Act::Identity,
                    residual.then_some(&x[..]),
                );
                let block = crate::mbconv::Block {
                    expand: e.as_ref(),
                    depthwise: &d,
                    project: &p,
                    pad,
                    acts: [Act::Relu6, Act::Relu6, Act::Identity],
                };
                // Split across the pool and on one thread; as the block chooses, and streamed
                // whatever its size.
                for (one_thread, force) in
                    [(false, false), (true, false), (false, true), (true, true)]
                {
                    let mut got = vec![MaybeUninit::new(f32::NAN); want.len()];
                    let mut go = || {
                        if force {
                            crate::mbconv::run(&block, &x, (n, h, w), (ho, wo), residual, &mut got);
                            return Ok(());
                        }
                        streamed
                            [usize::from(crate::mbconv::streams(&block, n, (h, w), (ho, wo)))] =
                            true;
                        inverted_residual(
                            e.as_ref(),
                            &d,
                            &p,
                            &x,
                            (n, h, w),
                            pad,
                            [Act::Relu6, Act::Relu6, Act::Identity],
                            residual,
                            &mut got,
                        )
                    };
                    if one_thread { on_this_thread(go) } else { go() }.unwrap();
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        let g = unsafe { g.assume_init() };
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{isa:?} {cin}->{mid}->{cout} k{k}/{stride} n{n} at {i} (one thread: \
                             {one_thread}, forced: {force}): {g} vs {w}"
                        );
                    }
                }
                // A residual around a block that changes its shape, and short buffers, are refused.
                let mut short = vec![MaybeUninit::new(0.0); want.len() - 1];
                let acts = [Act::Relu6, Act::Relu6, Act::Identity];
                assert!(
                    inverted_residual(
                        e.as_ref(),
                        &d,
                        &p,
                        &x,
                        (n, h, w),
                        pad,
                        acts,
                        residual,
                        &mut short
                    )
                    .is_err()
                );
                if !residual {
                    let mut out = vec![MaybeUninit::new(0.0); want.len()];
                    assert_eq!(
                        inverted_residual(
                            e.as_ref(),
                            &d,
                            &p,
                            &x,
                            (n, h, w),
                            pad,
                            acts,
                            true,
                            &mut out
                        )
                        .is_err(),
                        cin != cout || stride != 1
                    );
                }
            }
        }
    }
    assert_eq!(
        streamed,
        [true, true],
        "both the streamed and the two-pass paths ran"
    );
}
