//! Numerical parity with an independent engine: the same backbone built as an ONNX graph from a histolens
//! checkpoint and run in onnxruntime (tests/parity/onnx_parity.py). Skipped with a message where Python's
//! onnx/onnxruntime are not installed (packaging/setup.sh installs them).

use std::process::Command;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use histolens::nn::checkpoint::{self, CheckpointMeta, Normalization};
use histolens::nn::{Arch, build};

fn python_has_onnxruntime() -> bool {
    Command::new("python3")
        .args(["-c", "import onnx, onnxruntime, numpy"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn uniform(shape: &[usize], lo: f32, hi: f32, seed: &mut u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            lo + (hi - lo) * ((*seed >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn parity(arch: Arch, input: (usize, usize, usize, usize)) {
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    let m = build(arch, vb).unwrap();
    // BatchNorm parameters and statistics away from their identity defaults, so eval-mode BN is exercised.
    let mut seed = 42u64;
    for (name, var) in vars.data().lock().unwrap().iter() {
        let dims = var.dims().to_vec();
        let t = if name.ends_with("running_var")
            || (name.contains("bn") && name.ends_with("weight"))
        {
            uniform(&dims, 0.5, 1.5, &mut seed)
        } else if name.ends_with("running_mean") || (name.contains("bn") && name.ends_with("bias"))
        {
            uniform(&dims, -0.1, 0.1, &mut seed)
        } else {
            continue;
        };
        var.set(&t).unwrap();
    }
    let x = uniform(&[input.0, input.1, input.2, input.3], -2.0, 2.0, &mut seed);
    let pooled = m.forward(&x, false).unwrap().pooled;
    let dir = tempfile::tempdir().unwrap();
    let meta = CheckpointMeta {
        format_version: checkpoint::FORMAT_VERSION,
        arch,
        task: "features".into(),
        input_size: [input.2, input.3],
        normalization: Normalization::IMAGENET,
        classes: vec![],
        magnification_range: None,
        constants: Default::default(),
        provenance: Default::default(),
    };
    let ckpt = dir.path().join("model.safetensors");
    std::fs::write(&ckpt, checkpoint::to_bytes(&vars, &meta, false).unwrap()).unwrap();
    let io = dir.path().join("io.safetensors");
    let tensors = [("input", x), ("pooled", pooled)];
    std::fs::write(
        &io,
        safetensors::serialize(tensors.iter().map(|(n, t)| (*n, t)), None).unwrap(),
    )
    .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/parity/onnx_parity.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(arch.name())
        .arg(&ckpt)
        .arg(&io)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "{arch:?}: outputs differ from onnxruntime beyond 1e-3 relative: {stdout}"
    );
}

#[test]
fn resnet50_and_efficientnet_match_onnxruntime() {
    if !python_has_onnxruntime() {
        eprintln!(
            "SKIP resnet50_and_efficientnet_match_onnxruntime: python3 lacks onnx/onnxruntime/numpy"
        );
        return;
    }
    parity(Arch::RESNET50, (2, 3, 128, 160));
    parity(Arch::EFFICIENTNET_LITE0, (1, 3, 224, 224));
    parity(Arch::EFFICIENTNET_LITE0, (1, 3, 150, 201));
}
