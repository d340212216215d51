//! The model zoo: shapes, taps, training steps that lower a loss, checkpoints, real ImageNet weights.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use histolens::nn::checkpoint::{
    self, CheckpointError, CheckpointMeta, LoadOptions, Normalization, Provenance,
};
use histolens::nn::{Arch, Backbone, build};

fn model(arch: Arch) -> (VarMap, Box<dyn Backbone>) {
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    let m = build(arch, vb).unwrap();
    (vars, m)
}

fn noise(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let mut s = seed;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn forward_shapes_and_taps() {
    // arch, input (h, w), expected high-tap spatial size, low-tap channels
    type Case = (Arch, (usize, usize), (usize, usize), usize);
    let cases: &[Case] = &[
        (Arch::RESNET18, (224, 224), (7, 7), 64),
        (Arch::RESNET50, (224, 224), (7, 7), 64),
        (Arch::EFFICIENTNET_LITE0, (224, 224), (7, 7), 32),
        (Arch::INCEPTION_V3, (299, 299), (8, 8), 32),
        (Arch::RESNET18, (160, 256), (5, 8), 64),
        (Arch::EFFICIENTNET_LITE0, (150, 200), (5, 7), 32),
        (Arch::INCEPTION_V3, (75, 120), (1, 2), 32),
    ];
    for &(arch, (h, w), (fh, fw), low_c) in cases {
        let (_, m) = model(arch);
        let f = m.forward(&noise((1, 3, h, w), 1), false).unwrap();
        assert_eq!(
            f.high.dims(),
            &[1, arch.feature_dim(), fh, fw],
            "{arch:?} at {h}x{w}"
        );
        assert_eq!(f.pooled.dims(), &[1, arch.feature_dim()]);
        assert_eq!(
            f.low().unwrap().dims()[1],
            low_c,
            "{arch:?} first-convolution channels"
        );
        assert!(
            f.low().unwrap().dims()[2] >= h / 2 - 2,
            "the low tap is at about half the input resolution"
        );
    }
    let (_, inc) = model(Arch::INCEPTION_V3);
    assert!(
        inc.forward(&noise((1, 3, 74, 80), 1), false).is_err(),
        "below 75 px is refused"
    );
}

/// Split forward (low tap wrapped in a Var) equals the plain forward, and the gradient reaches the tap
/// through the stem's pooling.
#[test]
fn gradient_reaches_the_first_convolution() {
    for arch in [Arch::RESNET18, Arch::INCEPTION_V3] {
        let (_, m) = model(arch);
        let x = noise((1, 3, 96, 96), 2);
        let low = Var::from_tensor(&m.forward_low(&x, false).unwrap()).unwrap();
        let high = m.forward_high(low.as_tensor(), false).unwrap();
        let plain = m.forward(&x, false).unwrap().high;
        let d = (&high - &plain)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5);
        let g = high.sum_all().unwrap().backward().unwrap();
        let gl = g.get(&low).expect("gradient at the low tap");
        let norm = gl
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{arch:?}: {norm}");
    }
}

/// A few AdamW steps of backbone + linear head on a fixed two-class problem lower the loss, with
/// BatchNorm in training mode (batch statistics, running statistics updated).
#[test]
fn training_steps_lower_the_loss() {
    for (arch, side) in [
        (Arch::RESNET18, 48),
        (Arch::RESNET50, 48),
        (Arch::EFFICIENTNET_LITE0, 48),
        (Arch::INCEPTION_V3, 80),
    ] {
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let m = build(arch, vb.pp("backbone")).unwrap();
        let head = candle_nn::linear(arch.feature_dim(), 2, vb.pp("head")).unwrap();
        // Seeded, so that a lucky or unlucky draw cannot decide the test.
        histolens::nn::vars::reseed(&vars, 11).unwrap();
        // Class 1 images are brighter; both classes carry the same noise.
        let n = noise((4, 3, side, side), 3);
        let shift =
            Tensor::from_vec(vec![-0.5f32, -0.5, 0.5, 0.5], (4, 1, 1, 1), &Device::Cpu).unwrap();
        let x = n.broadcast_add(&shift).unwrap();
        let y = Tensor::from_vec(vec![0u32, 0, 1, 1], 4, &Device::Cpu).unwrap();
        let running_before = running_mean_sum(&vars);
        let mut opt = candle_nn::AdamW::new(
            vars.all_vars(),
            candle_nn::ParamsAdamW {
                lr: 1e-3,
                ..Default::default()
            },
        )
        .unwrap();
        let mut losses = Vec::new();
        for _ in 0..5 {
            let f = m.forward(&x, true).unwrap();
            let logits = f.pooled.apply(&head).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
            opt.backward_step(&loss).unwrap();
        }
        assert!(losses.iter().all(|l| l.is_finite()), "{arch:?}: {losses:?}");
        assert!(
            losses[4] < losses[0],
            "{arch:?}: loss did not fall: {losses:?}"
        );
        assert!(
            (running_mean_sum(&vars) - running_before).abs() > 1e-6,
            "{arch:?}: running statistics were updated"
        );
    }
}

fn running_mean_sum(vars: &VarMap) -> f32 {
    let data = vars.data().lock().unwrap();
    data.iter()
        .filter(|(k, _)| k.ends_with("running_mean"))
        .map(|(_, v)| v.as_tensor().sum_all().unwrap().to_scalar::<f32>().unwrap())
        .sum()
}

fn meta(arch: Arch) -> CheckpointMeta {
    CheckpointMeta {
        format_version: checkpoint::FORMAT_VERSION,
        arch,
        task: "features".into(),
        input_size: [224, 224],
        normalization: Normalization::IMAGENET,
        classes: vec!["a".into(), "b".into()],
        magnification_range: None,
        constants: Default::default(),
        provenance: Provenance {
            data: "unit test".into(),
            epochs: 1,
            ..Default::default()
        },
    }
}

#[test]
fn checkpoint_round_trip_and_bad_files() {
    let (vars, m) = model(Arch::RESNET18);
    let x = noise((1, 3, 64, 64), 4);
    let before = m.forward(&x, false).unwrap().pooled;
    let bytes = checkpoint::to_bytes(&vars, &meta(Arch::RESNET18), false).unwrap();
    assert_eq!(checkpoint::read_meta(&bytes).unwrap(), meta(Arch::RESNET18));

    let (vars2, m2) = model(Arch::RESNET18);
    checkpoint::load_into(&bytes, &vars2, &LoadOptions::default()).unwrap();
    let after = m2.forward(&x, false).unwrap().pooled;
    let d = (&before - &after)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0, "identical outputs after a round trip");

    // f16 halves the size and stays close.
    let half = checkpoint::to_bytes(&vars, &meta(Arch::RESNET18), true).unwrap();
    assert!(half.len() < bytes.len() * 6 / 10);
    let (vars3, m3) = model(Arch::RESNET18);
    checkpoint::load_into(&half, &vars3, &LoadOptions::default()).unwrap();
    let rel = ((&before - m3.forward(&x, false).unwrap().pooled)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap())
        / before
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
    assert!(rel < 1e-2, "{rel}");

    // Wrong architecture: the first mismatching tensor is named.
    let (vars50, _) = model(Arch::RESNET50);
    match checkpoint::load_into(&bytes, &vars50, &LoadOptions::default()) {
        Err(
            CheckpointError::Shape { name, .. }
            | CheckpointError::Missing(name)
            | CheckpointError::Unexpected(name),
        ) => {
            assert!(name.starts_with("layer"), "{name}")
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    // Missing tensor.
    let data = vars.data().lock().unwrap();
    let mut some: Vec<(String, Tensor)> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    drop(data);
    some.sort_by(|a, b| a.0.cmp(&b.0));
    let dropped = some.remove(0).0;
    let partial = safetensors::serialize(some.iter().map(|(n, t)| (n.as_str(), t)), None).unwrap();
    assert!(
        matches!(checkpoint::load_into(&partial, &vars2, &LoadOptions::default()), Err(CheckpointError::Missing(n)) if n == dropped)
    );
    assert!(matches!(
        checkpoint::read_meta(&partial),
        Err(CheckpointError::MissingMetadata)
    ));
    // NaN.
    let mut poisoned = some.clone();
    poisoned.push((
        dropped.clone(),
        Tensor::full(f32::NAN, vars_dims(&vars, &dropped), &Device::Cpu).unwrap(),
    ));
    let nan = safetensors::serialize(poisoned.iter().map(|(n, t)| (n.as_str(), t)), None).unwrap();
    assert!(
        matches!(checkpoint::load_into(&nan, &vars2, &LoadOptions::default()), Err(CheckpointError::NonFinite(n)) if n == dropped)
    );
    // Truncated, not safetensors at all, a pickle.
    for bad in [
        &bytes[..bytes.len() / 2],
        b"not a checkpoint".as_slice(),
        b"\x80\x02}q\x00(X\x06\x00\x00\x00conv1.q".as_slice(),
        &[][..],
    ] {
        assert!(matches!(
            checkpoint::load_into(bad, &vars2, &LoadOptions::default()),
            Err(CheckpointError::NotSafetensors(_))
        ));
    }
    // A failed load leaves the model unchanged.
    let still = m2.forward(&x, false).unwrap().pooled;
    assert_eq!(
        (&still - &after)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}

fn vars_dims(vars: &VarMap, name: &str) -> Vec<usize> {
    vars.data().lock().unwrap()[name].dims().to_vec()
}

/// skimage's chelsea.png (a cat) and coffee.png (espresso), extracted from the scikit-image wheel by
/// packaging/fetch-test-images.sh.
fn skimage_image(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/test-images")
        .join(name);
    p.is_file().then_some(p)
}

#[test]
fn efficientnet_lite0_imagenet_weights_classify_photographs() {
    let Some(data) =
        common::shared_data("efficientnet_lite0_imagenet_weights_classify_photographs")
    else {
        return;
    };
    let (Some(cat), Some(coffee)) = (skimage_image("chelsea.png"), skimage_image("coffee.png"))
    else {
        eprintln!(
            "SKIP: target/test-images lacks chelsea.png/coffee.png (run packaging/fetch-test-images.sh)"
        );
        return;
    };
    let bytes =
        std::fs::read(data.join("weights/efficientnet-lite0-imagenet.safetensors")).unwrap();
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    let m = build(Arch::EFFICIENTNET_LITE0, vb.clone()).unwrap();
    let fc = candle_nn::linear(1280, 1000, vb.pp("_fc")).unwrap();
    checkpoint::load_into(&bytes, &vars, &LoadOptions::default()).unwrap();
    for (path, ok) in [(cat, 281..=285u32), (coffee, 967..=967)] {
        let img = image::open(&path).unwrap().to_rgb8();
        let img = image::imageops::resize(&img, 224, 224, image::imageops::FilterType::Triangle);
        let v: Vec<f32> = img
            .as_raw()
            .iter()
            .map(|&p| (f32::from(p) - 127.0) / 128.0)
            .collect();
        let x = Tensor::from_vec(v, (224, 224, 3), &Device::Cpu)
            .unwrap()
            .permute((2, 0, 1))
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = m.forward(&x, false).unwrap().pooled.apply(&fc).unwrap();
        let top = logits.argmax(1).unwrap().to_vec1::<u32>().unwrap()[0];
        assert!(
            ok.contains(&top),
            "{}: top-1 class {top}, expected {ok:?}",
            path.display()
        );
    }
}

/// Moves BatchNorm statistics and affine parameters away from their identity defaults.
fn perturb_batchnorm(vars: &VarMap, seed: u64) {
    for (i, (name, var)) in vars.data().lock().unwrap().iter().enumerate() {
        let lo_hi = if name.ends_with("running_var")
            || name.contains("bn") && name.ends_with("weight")
        {
            (0.5, 1.5)
        } else if name.ends_with("running_mean") || name.contains("bn") && name.ends_with("bias") {
            (-0.2, 0.2)
        } else {
            continue;
        };
        let n = var.elem_count();
        let u = noise((1, 1, 1, n), seed + i as u64); // uniform in [-0.5, 0.5)
        let t = u
            .affine(lo_hi.1 - lo_hi.0, lo_hi.0 + 0.5 * (lo_hi.1 - lo_hi.0))
            .unwrap()
            .reshape(var.dims())
            .unwrap();
        var.set(&t).unwrap();
    }
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = a
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-6);
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / scale
}

/// A model loaded as constants for inference (fused convolutions on the fast CPU path) computes what
/// the differentiable model (candle's operations) computes, at batch 1 (one image split across threads)
/// and batch 3 (images across threads), on odd sizes.
#[test]
fn inference_path_matches_the_differentiable_path() {
    // (architecture, size, largest relative difference): rounding differs between the paths (folded
    // BatchNorm, other summation orders) and grows with the depth of EfficientNet's deep features.
    let cases = [
        (Arch::RESNET18, 67, 90, 1e-4),
        (Arch::RESNET50, 64, 64, 1e-4),
        (Arch::EFFICIENTNET_LITE0, 75, 61, 1e-4),
        // Large enough for the first blocks to stream over strips of rows (measured 0.8-1.5e-4).
        (Arch::EFFICIENTNET_LITE0, 224, 200, 5e-4),
        (Arch::INCEPTION_V3, 80, 91, 1e-4),
    ];
    for (arch, h, w, tolerance) in cases {
        let (vars, m) = model(arch);
        perturb_batchnorm(&vars, 11);
        let bytes = checkpoint::to_bytes(&vars, &meta(arch), false).unwrap();
        let consts = checkpoint::Constants::from_bytes(&bytes, &LoadOptions::default()).unwrap();
        let fast = build(arch, consts.var_builder(&Device::Cpu)).unwrap();
        consts.check_all_used().unwrap();
        for n in [1, 3] {
            let x = noise((n, 3, h, w), 5);
            let a = m.forward(&x, false).unwrap();
            let b = fast.forward(&x, false).unwrap();
            assert!(!b.pooled.track_op(), "constant weights track no gradient");
            for (what, ta, tb) in [
                ("low", &a.low().unwrap(), &b.low().unwrap()),
                ("high", &a.high, &b.high),
            ] {
                let d = max_rel_diff(ta, tb);
                assert!(
                    d < tolerance,
                    "{arch:?} batch {n} {what} tap: relative difference {d}"
                );
            }
            // The split passes (Grad-CAM, frozen training) leave NCHW tensors equal to the whole.
            let low = b.low().unwrap();
            let body = fast.forward_body(&low, false).unwrap();
            let split = fast.forward_last_block(&body, false).unwrap();
            let high = fast.forward_high(&low, false).unwrap();
            for (what, t) in [("body + last block", &split), ("high", &high)] {
                let d = max_rel_diff(&a.high, t);
                assert!(
                    d < tolerance,
                    "{arch:?} batch {n} {what}: relative difference {d}"
                );
            }
        }
    }
}

#[test]
fn constants_refuse_bad_checkpoints() {
    let (vars, _) = model(Arch::RESNET18);
    let bytes = checkpoint::to_bytes(&vars, &meta(Arch::RESNET18), false).unwrap();
    // A tensor the model does not use.
    let extra = Var::from_tensor(&Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()).unwrap();
    vars.data()
        .lock()
        .unwrap()
        .insert("head.extra".into(), extra);
    let with_extra = checkpoint::to_bytes(&vars, &meta(Arch::RESNET18), false).unwrap();
    let c = checkpoint::Constants::from_bytes(&with_extra, &LoadOptions::default()).unwrap();
    build(Arch::RESNET18, c.var_builder(&Device::Cpu)).unwrap();
    assert!(matches!(c.check_all_used(), Err(CheckpointError::Unexpected(n)) if n == "head.extra"));
    // The wrong architecture: the first mismatch is named.
    let c = checkpoint::Constants::from_bytes(&bytes, &LoadOptions::default()).unwrap();
    let err = build(Arch::RESNET50, c.var_builder(&Device::Cpu))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("layer1.0.conv1.weight"), "{err}");
    // NaN values and truncated files.
    let (nan_vars, _) = model(Arch::RESNET18);
    nan_vars.data().lock().unwrap()["conv1.weight"]
        .set(&Tensor::full(f32::NAN, (64, 3, 7, 7), &Device::Cpu).unwrap())
        .unwrap();
    let nan = checkpoint::to_bytes(&nan_vars, &meta(Arch::RESNET18), false).unwrap();
    assert!(matches!(
        checkpoint::Constants::from_bytes(&nan, &LoadOptions::default()),
        Err(CheckpointError::NonFinite(n)) if n == "conv1.weight"
    ));
    assert!(matches!(
        checkpoint::Constants::from_bytes(&bytes[..bytes.len() / 2], &LoadOptions::default()),
        Err(CheckpointError::NotSafetensors(_))
    ));
}
