//! Grad-CAM on a problem with a known answer: a small network with the zoo's building blocks (a first
//! convolution, the zoo's 3x3/2 max pooling with its backward pass, two more convolutions) learns to
//! tell noise with a bright blob from noise alone; its Grad-CAM peak must fall on the blob at both
//! depths in nearly all test images.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, Optimizer, VarBuilder, VarMap, conv2d, linear};
use histolens::nn::backbone::{Arch, Backbone};
use histolens::nn::gradcam::{Tap, grad_cam};
use histolens::nn::pool::{global_avg_pool, max_pool2d};
use rand::{Rng, SeedableRng};

const SIDE: usize = 32;
const RADIUS: f32 = 3.0;

struct BlobNet {
    first: Conv2d,
    second: Conv2d,
    last: Conv2d,
}

impl BlobNet {
    fn new(vb: VarBuilder) -> Result<Self> {
        let same = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(BlobNet {
            first: conv2d(3, 8, 3, same, vb.pp("first"))?,
            second: conv2d(8, 16, 3, same, vb.pp("second"))?,
            last: conv2d(16, 16, 3, same, vb.pp("last"))?,
        })
    }
}

impl Backbone for BlobNet {
    fn arch(&self) -> Arch {
        Arch::RESNET18
    }
    fn stem(&self, x: &Tensor, _: bool, _: bool) -> Result<Tensor> {
        self.first.forward(x)?.relu()
    }
    fn body(&self, low: &Tensor, _: bool) -> Result<Tensor> {
        self.second.forward(&max_pool2d(low, 3, 2, 1)?)?.relu()
    }
    fn last_block(&self, body: &Tensor, _: bool) -> Result<Tensor> {
        self.last.forward(body)?.relu()
    }
    fn last_block_prefixes(&self) -> Vec<String> {
        vec!["last.".into()]
    }
}

/// Noise images, half with a bright disk at a random place; returns images, labels and centres.
fn batch(n: usize, rng: &mut impl Rng) -> (Tensor, Tensor, Vec<Option<(f32, f32)>>) {
    let mut data = Vec::with_capacity(n * 3 * SIDE * SIDE);
    let mut labels = Vec::with_capacity(n);
    let mut centres = Vec::with_capacity(n);
    for i in 0..n {
        let blob = i % 2 == 1;
        let c = (
            rng.random_range(6.0..26.0f32),
            rng.random_range(6.0..26.0f32),
        );
        for _ in 0..3 {
            for y in 0..SIDE {
                for x in 0..SIDE {
                    let noise: f32 = rng.random_range(-1.0..1.0);
                    let inside =
                        ((x as f32 - c.0).powi(2) + (y as f32 - c.1).powi(2)).sqrt() <= RADIUS;
                    data.push(noise + if blob && inside { 2.5 } else { 0.0 });
                }
            }
        }
        labels.push(f32::from(u8::from(blob)));
        centres.push(blob.then_some(c));
    }
    let dev = Device::Cpu;
    (
        Tensor::from_vec(data, (n, 3, SIDE, SIDE), &dev).unwrap(),
        Tensor::from_vec(labels, n, &dev).unwrap(),
        centres,
    )
}

/// Binary cross-entropy of logits z: mean(max(z, 0) − z·y + log(1 + e^−|z|)), finite for any z.
fn stable_bce(z: &Tensor, y: &Tensor) -> Result<Tensor> {
    let soft = (z.abs()?.neg()?.exp()? + 1.0)?.log()?;
    ((z.relu()? - (z * y)?)? + soft)?.mean_all()
}

#[test]
fn gradcam_peaks_on_the_blob_at_both_depths() {
    let dev = Device::Cpu;
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
    let net = BlobNet::new(vb.pp("net")).unwrap();
    let head: Linear = linear(16, 1, vb.pp("head")).unwrap();
    // candle initialises from an unseeded generator: redraw every weight from a seeded one, at the
    // same scale, so that the run (and whether it learns in 60 steps) is the same every time.
    let mut init = rand::rngs::StdRng::seed_from_u64(11);
    let mut named: Vec<_> = vars.data().lock().unwrap().clone().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, var) in named {
        let t = var.as_tensor();
        let scale = t
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        let values: Vec<f32> = (0..t.elem_count())
            .map(|_| init.random_range(-1.0f32..1.0) * scale * 3f32.sqrt())
            .collect();
        var.set(&Tensor::from_vec(values, t.shape(), &dev).unwrap())
            .unwrap();
    }
    let logit =
        |high: &Tensor| -> Result<Tensor> { head.forward(&global_avg_pool(high)?)?.squeeze(1) };
    let mut opt = candle_nn::AdamW::new(
        vars.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut last_loss = f32::NAN;
    for _ in 0..60 {
        let (x, y, _) = batch(16, &mut rng);
        let high = net
            .forward_high(&net.forward_low(&x, true).unwrap(), true)
            .unwrap();
        let loss = stable_bce(&logit(&high).unwrap(), &y).unwrap();
        last_loss = loss.to_scalar::<f32>().unwrap();
        opt.backward_step(&loss).unwrap();
    }
    assert!(
        last_loss < 0.3,
        "the blob detector did not learn (loss {last_loss})"
    );

    let (x, _, centres) = batch(40, &mut rng);
    for tap in [Tap::Low, Tap::High] {
        let cams = grad_cam(&net, &x, tap, &logit).unwrap();
        let (mut on_blob, mut positives) = (0, 0);
        for (map, centre) in cams.maps.iter().zip(&centres) {
            let Some((cx, cy)) = centre else { continue };
            positives += 1;
            let peak = map
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| ((i % SIDE) as f32, (i / SIDE) as f32))
                .unwrap();
            if ((peak.0 - cx).powi(2) + (peak.1 - cy).powi(2)).sqrt() <= RADIUS + 3.0 {
                on_blob += 1;
            }
        }
        eprintln!(
            "{tap:?}: peak on the blob in {on_blob} of {positives} images (loss {last_loss:.3})"
        );
        assert!(
            on_blob * 10 >= positives * 9,
            "{tap:?}: the peak is on the blob in {on_blob} of {positives} images"
        );
    }
}
