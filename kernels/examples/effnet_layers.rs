//! Per-layer time of EfficientNet-Lite0 (224x224, one image) on the blocked kernels, as the model
//! runs them (stem, each block in one `inverted_residual` call, head): each layer alone and
//! repeated (its weights and input hot in the cache), and inside the whole chain, each layer
//! reading the previous one's output, as in a forward pass.
//! `RAYON_NUM_THREADS=1 cargo run --release -p histolens-kernels --example effnet_layers`
use histolens_kernels::*;
use std::mem::MaybeUninit;
use std::time::Instant;

/// TensorFlow "SAME" padding of a k-tap, stride-s convolution over a side of h.
fn same(h: usize, k: usize, s: usize) -> Pad {
    let total = ((h.div_ceil(s) - 1) * s + k).saturating_sub(h);
    let (a, b) = (total / 2, total - total / 2);
    Pad {
        top: a,
        bottom: b,
        left: a,
        right: b,
    }
}

fn packed(
    isa: Isa,
    cin: usize,
    cout: usize,
    k: usize,
    s: usize,
    dw: bool,
    input: Input,
) -> PackedConv {
    let spec = ConvSpec {
        cin,
        cout,
        kh: k,
        kw: k,
        stride: s,
        depthwise: dw,
    };
    let per = if dw { 1 } else { cin };
    let wts: Vec<f32> = (0..cout * per * k * k)
        .map(|i| ((i % 7) as f32 - 3.0) * 0.01)
        .collect();
    PackedConv::new(isa, spec, input, &wts, &vec![0.01; cout]).expect("valid layer")
}

enum Kind {
    Conv(PackedConv, Pad, Act),
    ExpandDw(PackedConv, PackedConv, Pad),
    /// The projection, with the residual or not.
    Project(PackedConv, bool),
    /// A whole block in one call: expansion, depthwise, projection, residual.
    Block(Option<PackedConv>, PackedConv, PackedConv, Pad, bool),
}

struct Layer {
    name: String,
    flops: f64,
    kind: Kind,
    /// Input (h, w) and output floats.
    side: usize,
    out_len: usize,
}

fn run(layer: &Layer, x: &[f32], residual: &[f32], out: &mut [MaybeUninit<f32>]) {
    let hw = (1, layer.side, layer.side);
    match &layer.kind {
        Kind::Conv(p, pad, act) => p.run(x, hw, *pad, *act, None, out),
        Kind::ExpandDw(e, d, pad) => {
            expand_depthwise(e, d, x, hw, *pad, (Act::Relu6, Act::Relu6), out)
        }
        Kind::Project(p, res) => p.run(
            x,
            hw,
            Pad::default(),
            Act::Identity,
            res.then_some(residual),
            out,
        ),
        Kind::Block(e, d, p, pad, res) => {
            let acts = [Act::Relu6, Act::Relu6, Act::Identity];
            inverted_residual(e.as_ref(), d, p, x, hw, *pad, acts, *res, out)
        }
    }
    .expect("layer runs");
}

fn floats(v: &[MaybeUninit<f32>]) -> &[f32] {
    // SAFETY: every buffer is initialised at allocation.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len()) }
}

fn main() {
    let isa = Isa::detect().expect("no blocked instruction set");
    let l = isa.lanes();
    let blocked = |c: usize, side: usize| c.div_ceil(l) * l * side * side;
    // Each block in one call (`inverted_residual`), as the model runs it; BLOCKS=0: its fused
    // expansion + depthwise and its projection, timed apart.
    let whole_blocks = std::env::var("BLOCKS").map_or(true, |v| v != "0");
    let iters: usize = std::env::var("ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let stages = [
        (1, 3, 1, 16, 1),
        (6, 3, 2, 24, 2),
        (6, 5, 2, 40, 2),
        (6, 3, 2, 80, 3),
        (6, 5, 1, 112, 3),
        (6, 5, 2, 192, 4),
        (6, 3, 1, 320, 1),
    ];
    let mut layers = vec![Layer {
        name: "stem 3x3/2 3->32".into(),
        flops: 2.0 * (32 * 27 * 112 * 112) as f64,
        kind: Kind::Conv(
            packed(isa, 3, 32, 3, 2, false, Input::Nchw),
            same(224, 3, 2),
            Act::Relu6,
        ),
        side: 224,
        out_len: blocked(32, 112),
    }];
    let (mut cin, mut side) = (32usize, 112usize);
    for (e, k, s0, cout, reps) in stages {
        for r in 0..reps {
            let s = if r == 0 { s0 } else { 1 };
            let (mid, so) = (cin * e, side.div_ceil(s));
            let dw = packed(isa, mid, mid, k, s, true, Input::Blocked);
            let dw_flops = 2.0 * (mid * k * k * so * so) as f64;
            let res = s == 1 && cin == cout;
            let expand = (e != 1).then(|| packed(isa, cin, mid, 1, 1, false, Input::Blocked));
            let project = packed(isa, mid, cout, 1, 1, false, Input::Blocked);
            let proj_flops = 2.0 * (mid * cout * so * so) as f64;
            let exp_flops = if e == 1 {
                0.0
            } else {
                2.0 * (cin * mid * side * side) as f64
            };
            let plus = if res { " +res" } else { "" };
            if whole_blocks {
                layers.push(Layer {
                    name: format!("block {cin}->{mid}->{cout} {k}x{k}/{s} @{side}{plus}"),
                    flops: exp_flops + dw_flops + proj_flops,
                    kind: Kind::Block(expand, dw, project, same(side, k, s), res),
                    side,
                    out_len: blocked(cout, so),
                });
                (cin, side) = (cout, so);
                continue;
            }
            layers.push(match expand {
                None => Layer {
                    name: format!("dw {k}x{k}/{s} {mid} @{side}"),
                    flops: dw_flops,
                    kind: Kind::Conv(dw, same(side, k, s), Act::Relu6),
                    side,
                    out_len: blocked(mid, so),
                },
                Some(ex) => Layer {
                    name: format!("exp+dw {cin}->{mid} {k}x{k}/{s} @{side}"),
                    flops: dw_flops + exp_flops,
                    kind: Kind::ExpandDw(ex, dw, same(side, k, s)),
                    side,
                    out_len: blocked(mid, so),
                },
            });
            layers.push(Layer {
                name: format!("proj {mid}->{cout} @{so}{plus}"),
                flops: proj_flops,
                kind: Kind::Project(project, res),
                side: so,
                out_len: blocked(cout, so),
            });
            (cin, side) = (cout, so);
        }
    }
    layers.push(Layer {
        name: "head 320->1280 @7".into(),
        flops: 2.0 * (320 * 1280 * 49) as f64,
        kind: Kind::Conv(
            packed(isa, 320, 1280, 1, 1, false, Input::Blocked),
            Pad::default(),
            Act::Relu6,
        ),
        side: 7,
        out_len: blocked(1280, 7),
    });
    let image: Vec<f32> = (0..3 * 224 * 224)
        .map(|i| (i % 255) as f32 / 255.0)
        .collect();
    let mut outs: Vec<Vec<MaybeUninit<f32>>> = layers
        .iter()
        .map(|l| vec![MaybeUninit::new(0.0); l.out_len])
        .collect();
    let empty: Vec<f32> = Vec::new();
    // Layer i reads layer i − 1's output; a separate projection with the residual also layer
    // i − 2's (the block's input).
    let step = |outs: &mut Vec<Vec<MaybeUninit<f32>>>, i: usize| {
        let (done, rest) = outs.split_at_mut(i);
        let x = if i == 0 {
            &image[..]
        } else {
            floats(&done[i - 1])
        };
        let residual = if i >= 2 {
            floats(&done[i - 2])
        } else {
            &empty[..]
        };
        run(&layers[i], x, residual, &mut rest[0]);
    };
    let mut seq = f64::MAX;
    let mut times = vec![f64::MAX; layers.len()];
    let mut in_seq = vec![f64::MAX; layers.len()];
    for _ in 0..5 {
        let t = Instant::now();
        let mut each = vec![0.0; layers.len()];
        for _ in 0..iters / 5 {
            for (i, e) in each.iter_mut().enumerate() {
                let t = Instant::now();
                step(&mut outs, i);
                *e += t.elapsed().as_secs_f64();
            }
        }
        seq = seq.min(t.elapsed().as_secs_f64() / (iters / 5) as f64);
        for (best, e) in in_seq.iter_mut().zip(each) {
            *best = best.min(e / (iters / 5) as f64);
        }
        for (i, best) in times.iter_mut().enumerate() {
            let t = Instant::now();
            for _ in 0..iters / 5 {
                step(&mut outs, i);
            }
            *best = best.min(t.elapsed().as_secs_f64() / (iters / 5) as f64);
        }
    }
    let total: f64 = times.iter().sum();
    let flops: f64 = layers.iter().map(|l| l.flops).sum();
    println!(
        "{:32} {:>9} {:>6} {:>7} {:>10}",
        "layer", "alone", "share", "GFLOP/s", "in sequence"
    );
    for ((layer, t), ts) in layers.iter().zip(&times).zip(&in_seq) {
        println!(
            "{:32} {:7.1} µs {:5.1}% {:7.1} {:7.1} µs",
            layer.name,
            t * 1e6,
            100.0 * t / total,
            layer.flops / t / 1e9,
            ts * 1e6
        );
    }
    println!(
        "layers alone: {:.3} ms ({:.0} img/s), {:.0} MFLOP, {:.1} GFLOP/s",
        total * 1e3,
        1.0 / total,
        flops / 1e6,
        flops / total / 1e9
    );
    println!("in sequence:  {:.3} ms ({:.0} img/s)", seq * 1e3, 1.0 / seq);
}
