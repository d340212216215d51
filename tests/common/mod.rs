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

/// A single-level tiled TIFF of `side`x`side` pixels (256² uncompressed RGB tiles) whose tiles all
/// point at one pink tile: a gigapixel slide without a pyramid in a few MB.
pub fn huge_tiled_tiff(path: &std::path::Path, side: u32) {
    const T: u32 = 256;
    let tiles_per_side = side.div_ceil(T);
    let n_tiles = tiles_per_side * tiles_per_side;
    let tile_bytes = T * T * 3;
    let entries: u16 = 10;
    let ifd_len = 2 + 12 * u32::from(entries) + 4;
    let bps_off = 8 + ifd_len;
    let offsets_off = bps_off + 6 + 2;
    let counts_off = offsets_off + 4 * n_tiles;
    let data_off = counts_off + 4 * n_tiles;
    let mut out = b"II*\0".to_vec();
    out.extend_from_slice(&8u32.to_le_bytes());
    out.extend_from_slice(&entries.to_le_bytes());
    let mut tag = |t: u16, ty: u16, count: u32, value: u32| {
        out.extend_from_slice(&t.to_le_bytes());
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&value.to_le_bytes());
    };
    tag(256, 4, 1, side); // ImageWidth
    tag(257, 4, 1, side); // ImageLength
    tag(258, 3, 3, bps_off); // BitsPerSample 8,8,8
    tag(259, 3, 1, 1); // no compression
    tag(262, 3, 1, 2); // RGB
    tag(277, 3, 1, 3); // SamplesPerPixel
    tag(322, 3, 1, T); // TileWidth
    tag(323, 3, 1, T); // TileLength
    tag(324, 4, n_tiles, offsets_off); // TileOffsets
    tag(325, 4, n_tiles, counts_off); // TileByteCounts
    out.extend_from_slice(&0u32.to_le_bytes());
    for _ in 0..3 {
        out.extend_from_slice(&8u16.to_le_bytes());
    }
    out.extend_from_slice(&[0, 0]);
    for _ in 0..n_tiles {
        out.extend_from_slice(&data_off.to_le_bytes());
    }
    for _ in 0..n_tiles {
        out.extend_from_slice(&tile_bytes.to_le_bytes());
    }
    for _ in 0..T * T {
        out.extend_from_slice(&[230, 160, 200]);
    }
    std::fs::write(path, out).unwrap();
}

/// The f32 values of a version-1 `.npy` file.
pub fn npy_values(bytes: &[u8]) -> Vec<f32> {
    let hl = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    bytes[10 + hl..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}
