//! Grad-CAM (Selvaraju et al.) at a backbone's two taps: the first convolution (low dimension: cells,
//! nuclei) and the last convolution (high dimension: tissue architecture), as the DMSL paper shows them.
//! The forward pass is split at the tap: the activation there becomes a `Var`, the rest of the network
//! runs from it, and the gradient of the chosen output with respect to it weights its channels
//! (spatial mean of the gradient); the weighted sum, ReLU, is upsampled to the input and normalised.
//! The low tap needs a backward pass through the stem's pooling, which the zoo's pooling provides.

use candle_core::{D, Result, Tensor, Var};

use super::backbone::Backbone;

/// Where the map is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tap {
    /// The first convolution's activation.
    Low,
    /// The last convolution's activation.
    High,
}

/// Grad-CAM maps of a batch.
#[derive(Debug, Clone)]
pub struct CamMaps {
    /// One map per image, at the input's size, in [0, 1] (row-major, `height` x `width`).
    pub maps: Vec<Vec<f32>>,
    pub height: usize,
    pub width: usize,
    /// Channel weights (N, C): the spatially averaged gradient of the output at the tap.
    pub weights: Tensor,
    /// The tap's activation (N, C, h, w).
    pub activation: Tensor,
}

/// Grad-CAM of `output` (a function of the backbone's last feature map giving one value per image,
/// e.g. a class probability or the regression output) at `tap`, for normalised images `x`.
pub fn grad_cam(
    backbone: &dyn Backbone,
    x: &Tensor,
    tap: Tap,
    output: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<CamMaps> {
    let (_, _, height, width) = x.dims4()?;
    let low = backbone.forward_low(x, false)?.detach();
    let (var, out) = match tap {
        Tap::Low => {
            let var = Var::from_tensor(&low)?;
            let high = backbone.forward_high(var.as_tensor(), false)?;
            let out = output(&high)?;
            (var, out)
        }
        Tap::High => {
            let high = backbone.forward_high(&low, false)?.detach();
            let var = Var::from_tensor(&high)?;
            let out = output(var.as_tensor())?;
            (var, out)
        }
    };
    let grads = out.sum_all()?.backward()?;
    let activation = var.as_tensor().detach();
    let grad = grads.get(var.as_tensor()).cloned().ok_or_else(|| {
        candle_core::Error::Msg("the output does not depend on the tapped activation".into())
    })?;
    let weights = grad.mean(D::Minus1)?.mean(D::Minus1)?;
    let cam = activation
        .broadcast_mul(&weights.unsqueeze(2)?.unsqueeze(3)?)?
        .sum(1)?
        .relu()?;
    let (_, h, w) = cam.dims3()?;
    let cams: Vec<Vec<Vec<f32>>> = cam.to_dtype(candle_core::DType::F32)?.to_vec3()?;
    let maps = cams
        .iter()
        .map(|m| {
            let flat: Vec<f32> = m.iter().flatten().copied().collect();
            normalise(upsample_bilinear(&flat, h, w, height, width))
        })
        .collect();
    Ok(CamMaps {
        maps,
        height,
        width,
        weights,
        activation,
    })
}

/// Bilinear resampling with aligned pixel centres (PyTorch's `align_corners=False`).
pub fn upsample_bilinear(src: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    let mut out = vec![0f32; out_h * out_w];
    if h == 0 || w == 0 {
        return out;
    }
    let coord = |i: usize, n_out: usize, n_in: usize| {
        let c = ((i as f32 + 0.5) * n_in as f32 / n_out as f32 - 0.5).clamp(0.0, (n_in - 1) as f32);
        let i0 = c.floor() as usize;
        (i0, (i0 + 1).min(n_in - 1), c - i0 as f32)
    };
    for y in 0..out_h {
        let (y0, y1, fy) = coord(y, out_h, h);
        for x in 0..out_w {
            let (x0, x1, fx) = coord(x, out_w, w);
            let top = src[y0 * w + x0] * (1.0 - fx) + src[y0 * w + x1] * fx;
            let bottom = src[y1 * w + x0] * (1.0 - fx) + src[y1 * w + x1] * fx;
            out[y * out_w + x] = top * (1.0 - fy) + bottom * fy;
        }
    }
    out
}

/// Scales a map to [0, 1] by its maximum (an all-zero map stays zero; non-finite values become 0).
fn normalise(mut m: Vec<f32>) -> Vec<f32> {
    let max = m
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0f32, f32::max);
    for v in &mut m {
        *v = if v.is_finite() && max > 0.0 {
            (*v / max).clamp(0.0, 1.0)
        } else {
            0.0
        };
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::backbone::{Arch, build};
    use crate::nn::pool::global_avg_pool;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    fn setup() -> (VarMap, Box<dyn Backbone>, Tensor, Tensor) {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        // f64, so that finite differences are not drowned in rounding.
        let vb = VarBuilder::from_varmap(&vars, DType::F64, &dev);
        let backbone = build(Arch::RESNET18, vb).unwrap();
        let x = Tensor::randn(0f64, 1.0, (2, 3, 64, 64), &dev).unwrap();
        let r = Tensor::randn(0f64, 1.0, (512,), &dev).unwrap();
        (vars, backbone, x, r)
    }

    /// output = pooled features · r, per image.
    fn linear_output(r: &Tensor) -> impl Fn(&Tensor) -> Result<Tensor> + '_ {
        move |high: &Tensor| global_avg_pool(high)?.broadcast_mul(r)?.sum(1)
    }

    /// Each channel weight times the number of positions equals the output's change when that
    /// channel of the tap is shifted everywhere by ε (central finite differences), at both taps.
    #[test]
    fn channel_weights_match_finite_differences() {
        let (_vars, backbone, x, r) = setup();
        let out_fn = linear_output(&r);
        for tap in [Tap::High, Tap::Low] {
            let cam = grad_cam(backbone.as_ref(), &x, tap, &out_fn).unwrap();
            let (n, c, h, w) = cam.activation.dims4().unwrap();
            let weights: Vec<Vec<f64>> = cam.weights.to_vec2().unwrap();
            let eval = |a: &Tensor| -> Vec<f64> {
                let high = match tap {
                    Tap::High => a.clone(),
                    Tap::Low => backbone.forward_high(a, false).unwrap(),
                };
                out_fn(&high).unwrap().to_vec1().unwrap()
            };
            // The head after the high tap is linear, so any ε is exact there and a large one keeps
            // rounding out; below the low tap a small one keeps the shift from crossing ReLU kinks
            // (the inputs are not seeded: at 1e-6 about one run in ten crossed one; f64 rounding
            // stays far below the 1% tolerance at 1e-8).
            let eps = if tap == Tap::High { 1e-3 } else { 1e-8 };
            for ch in [0, c / 2, c - 1] {
                let mut mask = vec![0f64; c];
                mask[ch] = eps;
                let delta = Tensor::from_vec(mask, (1, c, 1, 1), &Device::Cpu).unwrap();
                let plus = eval(&cam.activation.broadcast_add(&delta).unwrap());
                let minus = eval(&cam.activation.broadcast_sub(&delta).unwrap());
                for i in 0..n {
                    let fd = (plus[i] - minus[i]) / (2.0 * eps);
                    let analytic = weights[i][ch] * (h * w) as f64;
                    // Exact through the linear head; 1% through the network's ReLUs.
                    let rel = if tap == Tap::High { 1e-6 } else { 1e-2 };
                    let tol = rel * fd.abs().max(analytic.abs()) + 1e-9;
                    assert!(
                        (fd - analytic).abs() <= tol,
                        "{tap:?} channel {ch} image {i}: analytic {analytic} vs finite difference {fd}"
                    );
                }
            }
        }
    }

    #[test]
    fn maps_have_the_input_size_and_lie_in_unit_range() {
        let (_vars, backbone, x, r) = setup();
        for tap in [Tap::Low, Tap::High] {
            let cam = grad_cam(backbone.as_ref(), &x, tap, &linear_output(&r)).unwrap();
            assert_eq!((cam.height, cam.width), (64, 64));
            assert_eq!(cam.maps.len(), 2);
            for m in &cam.maps {
                assert_eq!(m.len(), 64 * 64);
                assert!(m.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
            }
        }
    }

    #[test]
    fn bilinear_upsampling_keeps_constants_and_corners() {
        let up = upsample_bilinear(&[1.0, 1.0, 1.0, 1.0], 2, 2, 5, 7);
        assert!(up.iter().all(|v| (v - 1.0).abs() < 1e-6));
        let up = upsample_bilinear(&[0.0, 1.0], 1, 2, 1, 4);
        assert_eq!(up, vec![0.0, 0.25, 0.75, 1.0]);
    }
}
