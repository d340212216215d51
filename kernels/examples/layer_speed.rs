//! GFLOP/s of the blocked kernels on ResNet-50 and EfficientNet-Lite0 layer shapes (one image).
//! `cargo run --release -p histolens-kernels --example layer_speed`
use histolens_kernels::*;
use std::time::Instant;

fn main() {
    use Input::{Blocked as B, Nchw as N};
    // (name, cin, cout, kernel, stride, padding, side, input layout, depthwise)
    #[rustfmt::skip]
    let shapes = [
        ("stem 7x7/2 3->64 @224", 3, 64, 7, 2, 3, 224, N, false),
        ("1x1 64->256 @56", 64, 256, 1, 1, 0, 56, B, false),
        ("1x1 256->64 @56", 256, 64, 1, 1, 0, 56, B, false),
        ("3x3 64->64 @56", 64, 64, 3, 1, 1, 56, B, false),
        ("3x3 128->128 @28", 128, 128, 3, 1, 1, 28, B, false),
        ("3x3 256->256 @14", 256, 256, 3, 1, 1, 14, B, false),
        ("1x1 1024->256 @14", 1024, 256, 1, 1, 0, 14, B, false),
        ("3x3 512->512 @7", 512, 512, 3, 1, 1, 7, B, false),
        ("1x1 2048->512 @7", 2048, 512, 1, 1, 0, 7, B, false),
        ("eff stem 3x3/2 3->32 @224", 3, 32, 3, 2, 1, 224, N, false),
        ("1x1 32->16 @112", 32, 16, 1, 1, 0, 112, B, false),
        ("1x1 16->96 @112", 16, 96, 1, 1, 0, 112, B, false),
        ("1x1 96->24 @56", 96, 24, 1, 1, 0, 56, B, false),
        ("1x1 24->144 @56", 24, 144, 1, 1, 0, 56, B, false),
        ("1x1 144->24 @56", 144, 24, 1, 1, 0, 56, B, false),
        ("1x1 144->40 @28", 144, 40, 1, 1, 0, 28, B, false),
        ("1x1 40->240 @28", 40, 240, 1, 1, 0, 28, B, false),
        ("1x1 240->40 @28", 240, 40, 1, 1, 0, 28, B, false),
        ("1x1 240->80 @14", 240, 80, 1, 1, 0, 14, B, false),
        ("1x1 80->480 @14", 80, 480, 1, 1, 0, 14, B, false),
        ("1x1 480->80 @14", 480, 80, 1, 1, 0, 14, B, false),
        ("1x1 480->112 @14", 480, 112, 1, 1, 0, 14, B, false),
        ("1x1 112->672 @14", 112, 672, 1, 1, 0, 14, B, false),
        ("1x1 672->112 @14", 672, 112, 1, 1, 0, 14, B, false),
        ("1x1 672->192 @7", 672, 192, 1, 1, 0, 7, B, false),
        ("1x1 192->1152 @7", 192, 1152, 1, 1, 0, 7, B, false),
        ("1x1 1152->192 @7", 1152, 192, 1, 1, 0, 7, B, false),
        ("1x1 1152->320 @7", 1152, 320, 1, 1, 0, 7, B, false),
        ("1x1 320->1280 @7", 320, 1280, 1, 1, 0, 7, B, false),
        ("dw 3x3 32 @112", 32, 32, 3, 1, 1, 112, B, true),
        ("dw 3x3 96 /2 @112", 96, 96, 3, 2, 1, 112, B, true),
        ("dw 3x3 144 @56", 144, 144, 3, 1, 1, 56, B, true),
        ("dw 5x5 144 /2 @56", 144, 144, 5, 2, 2, 56, B, true),
        ("dw 5x5 240 @28", 240, 240, 5, 1, 2, 28, B, true),
        ("dw 3x3 240 /2 @28", 240, 240, 3, 2, 1, 28, B, true),
        ("dw 3x3 480 @14", 480, 480, 3, 1, 1, 14, B, true),
        ("dw 5x5 480 @14", 480, 480, 5, 1, 2, 14, B, true),
        ("dw 5x5 672 @14", 672, 672, 5, 1, 2, 14, B, true),
        ("dw 5x5 672 /2 @14", 672, 672, 5, 2, 2, 14, B, true),
        ("dw 5x5 1152 @7", 1152, 1152, 5, 1, 2, 7, B, true),
        ("dw 3x3 1152 @7", 1152, 1152, 3, 1, 1, 7, B, true),
    ];
    let isa = Isa::detect().expect("no blocked instruction set");
    for (name, cin, cout, k, s, p, hw, input, dw) in shapes {
        let spec = ConvSpec {
            cin,
            cout,
            kh: k,
            kw: k,
            stride: s,
            depthwise: dw,
        };
        let pad = Pad {
            top: p,
            bottom: p,
            left: p,
            right: p,
        };
        let per = if dw { 1 } else { cin };
        let pc = PackedConv::new(
            isa,
            spec,
            input,
            &vec![0.01; cout * per * k * k],
            &vec![0.0; cout],
        )
        .unwrap();
        let (ho, wo) = pc.output_size(hw, hw, pad).unwrap();
        let x = vec![0.5f32; pc.input_len(1, hw, hw)];
        let l = isa.lanes();
        let mut out = vec![std::mem::MaybeUninit::new(0f32); cout.div_ceil(l) * l * ho * wo];
        pc.run(&x, (1, hw, hw), pad, Act::Relu, None, &mut out)
            .unwrap();
        let iters = 50;
        let t = Instant::now();
        for _ in 0..iters {
            pc.run(&x, (1, hw, hw), pad, Act::Relu, None, &mut out)
                .unwrap();
        }
        let secs = t.elapsed().as_secs_f64() / iters as f64;
        let flops = 2.0 * (cout * per * k * k * ho * wo) as f64;
        println!(
            "{name:24} {:8.3} ms {:7.1} GFLOP/s",
            secs * 1e3,
            flops / secs / 1e9
        );
    }
}
