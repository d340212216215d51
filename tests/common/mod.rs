//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// `../shared/data` beside the project, or `None` (with a SKIP message) where it is absent.
pub fn shared_data(test: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("SKIP {test}: ../shared/data is absent (a fresh clone has no shared data)");
        None
    }
}

pub fn sample_slide() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/samples/CMU-1-Small-Region.svs")
}

/// Mean absolute difference per channel of two same-sized RGBA images, over opaque pixels.
pub fn mean_abs_diff(a: &image::RgbaImage, b: &image::RgbaImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let mut sum = 0u64;
    let mut n = 0u64;
    for (p, q) in a.pixels().zip(b.pixels()) {
        if p.0[3] == 0 || q.0[3] == 0 {
            continue;
        }
        for c in 0..3 {
            sum += u64::from(p.0[c].abs_diff(q.0[c]));
            n += 1;
        }
    }
    sum as f64 / n.max(1) as f64
}

/// A magnification model that always answers `magnification` (for tests of the plumbing, not the
/// accuracy): ResNet-18 on 64 px crops, with the constant m and a trained range in its metadata.
pub fn constant_magnification_model(dir: &std::path::Path, magnification: f32) -> PathBuf {
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};
    use histolens::nn::checkpoint::{CheckpointMeta, FORMAT_VERSION, Normalization, to_bytes};
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    histolens::nn::hagnifinder::Hagnifinder::new(histolens::nn::Arch::RESNET18, false, vb).unwrap();
    // The output layer answers the same whatever it sees.
    for (name, var) in vars.data().lock().unwrap().iter() {
        if name == "head.fc3.weight" {
            var.set(&var.as_tensor().zeros_like().unwrap()).unwrap();
        } else if name == "head.fc3.bias" {
            var.set(&candle_core::Tensor::new(&[magnification], &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let meta = CheckpointMeta {
        format_version: FORMAT_VERSION,
        arch: histolens::nn::Arch::RESNET18,
        task: "magnification".into(),
        input_size: [64, 64],
        normalization: Normalization::IMAGENET,
        classes: Vec::new(),
        magnification_range: Some([5.0, 40.0]),
        constants: [("asm_m".to_string(), 0.5)].into_iter().collect(),
        provenance: Default::default(),
    };
    let path = dir.join(format!("constant-{magnification}x.safetensors"));
    std::fs::write(&path, to_bytes(&vars, &meta, true).unwrap()).unwrap();
    path
}

/// A uniform pink "tissue" snapshot (no nuclei for the ruler to read) of `side` px.
pub fn featureless_tissue(side: u32) -> image::RgbImage {
    image::RgbImage::from_pixel(side, side, image::Rgb([225, 150, 190]))
}

/// Writes `img` as a PNG whose pHYs chunk states `mpp` µm/px (pixels per metre).
pub fn png_with_phys(img: &image::RgbImage, path: &std::path::Path, mpp: f64) {
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut enc = png::Encoder::new(file, img.width(), img.height());
    enc.set_color(png::ColorType::Rgb);
    let ppm = (1e6 / mpp).round() as u32;
    enc.set_pixel_dims(Some(png::PixelDimensions {
        xppu: ppm,
        yppu: ppm,
        unit: png::Unit::Meter,
    }));
    enc.write_header()
        .unwrap()
        .write_image_data(img.as_raw())
        .unwrap();
}

/// Writes `img` as an uncompressed RGB TIFF with the given resolution tags and (ASCII) description.
pub fn tiff_with_tags(
    img: &image::RgbImage,
    path: &std::path::Path,
    resolution: Option<(tiff::tags::ResolutionUnit, u32, u32)>,
    description: Option<&str>,
) {
    use tiff::encoder::{Rational, TiffEncoder, colortype::RGB8};
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut enc = TiffEncoder::new(file).unwrap();
    let mut image = enc.new_image::<RGB8>(img.width(), img.height()).unwrap();
    if let Some((unit, n, d)) = resolution {
        image.resolution(unit, Rational { n, d });
    }
    if let Some(text) = description {
        image
            .encoder()
            .write_tag(tiff::tags::Tag::ImageDescription, text)
            .unwrap();
    }
    image.write_data(img.as_raw()).unwrap();
}
