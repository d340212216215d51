//! Images to model input: (N, 3, H, W) f32, normalised.

use candle_core::{Device, Result, Tensor};
use image::RgbImage;

use crate::nn::checkpoint::Normalization;

/// Stacks same-sized RGB images into a normalised (N, 3, H, W) tensor on `device`.
pub fn to_tensor(images: &[RgbImage], norm: Normalization, device: &Device) -> Result<Tensor> {
    let Some(first) = images.first() else {
        candle_core::bail!("no images to stack")
    };
    let (w, h) = first.dimensions();
    let plane = (w * h) as usize;
    let mut data = vec![0f32; images.len() * 3 * plane];
    for (img, dst) in images.iter().zip(data.chunks_mut(3 * plane)) {
        if img.dimensions() != (w, h) {
            candle_core::bail!(
                "images of different sizes in one batch: {:?} and {:?}",
                (w, h),
                img.dimensions()
            )
        }
        let (r, rest) = dst.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * norm.std[c]));
        let shift: [f32; 3] = std::array::from_fn(|c| norm.mean[c] / norm.std[c]);
        for (i, p) in img.pixels().enumerate() {
            r[i] = f32::from(p.0[0]) * scale[0] - shift[0];
            g[i] = f32::from(p.0[1]) * scale[1] - shift[1];
            b[i] = f32::from(p.0[2]) * scale[2] - shift[2];
        }
    }
    Tensor::from_vec(data, (images.len(), 3, h as usize, w as usize), device)
}
