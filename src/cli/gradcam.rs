//! `histolens gradcam IMAGE --model FILE [--class C] [--layer low|high|both] --out DIR`: Grad-CAM maps of
//! a DMSL model (every branch, as the paper's grid) or of the magnification model, written as PNG
//! overlays and as `.npy` arrays.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Args;
use histolens::data::augment::{center_crop, to_rgb};
use histolens::data::pairs::read_field_rect;
use histolens::dmsl::DmslModel;
use histolens::magnification::MagnificationModel;
use histolens::nn::checkpoint::read_meta;
use histolens::nn::device::{DeviceChoice, select};
use histolens::nn::gradcam::Tap;
use histolens::slide::Slide;
use histolens::util::colormap::Colormap;
use histolens::util::fs::{write_atomic, write_png_atomic};
use histolens::util::npy::f32_npy;
use image::RgbImage;

#[derive(Args)]
pub struct GradcamArgs {
    /// An image (or slide: its central region is used).
    pub image: PathBuf,
    /// A DMSL or magnification checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// The DMSL class (name or index; default: the most probable one).
    #[arg(long)]
    pub class: Option<String>,
    /// low (first convolution), high (last convolution) or both.
    #[arg(long, default_value = "both")]
    pub layer: String,
    #[arg(long)]
    pub out: PathBuf,
    /// µm/px of the image (DMSL: its central field is read at the model's magnification; default:
    /// the metadata, the hand calibration, or the magnification estimate).
    #[arg(long)]
    pub mpp: Option<f64>,
    /// Width over height of the image's pixels (0.75: squashed to 3/4 of its width).
    #[arg(long, default_value_t = 1.0)]
    pub pixel_aspect: f64,
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

pub fn run(args: GradcamArgs) -> anyhow::Result<()> {
    let taps: &[Tap] = match args.layer.as_str() {
        "low" => &[Tap::Low],
        "high" => &[Tap::High],
        "both" => &[Tap::Low, Tap::High],
        l => bail!("unknown --layer {l}: use low, high or both"),
    };
    let bytes =
        std::fs::read(&args.model).with_context(|| format!("reading {}", args.model.display()))?;
    let meta = read_meta(&bytes).with_context(|| format!("reading {}", args.model.display()))?;
    let device = select(args.device)?;
    let slide = Slide::open(&args.image)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let central = |side: u32| -> anyhow::Result<RgbImage> {
        let (w, h) = slide.info().dimensions();
        let (rw, rh) = (w.min(u64::from(side)) as u32, h.min(u64::from(side)) as u32);
        let region = slide.read_region(
            0,
            ((w - u64::from(rw)) / 2) as i64,
            ((h - u64::from(rh)) / 2) as i64,
            rw,
            rh,
        )?;
        Ok(center_crop(&to_rgb(&region), side))
    };
    match meta.task.as_str() {
        histolens::dmsl::model::TASK => {
            let model = DmslModel::from_bytes(&bytes, &device)?;
            // The central field of view, read at the model's high magnification.
            let g = model.geometry();
            let mpp = super::magnification::mpp_or_estimate(&slide, args.mpp)?;
            // Too coarse is refused and upsampled is said, as for heatmaps.
            match histolens::dmsl::heatmap::field_scale(mpp, g.high_magnification) {
                Ok(None) => {}
                Ok(Some(warning)) => eprintln!("warning: {}: {warning}", args.image.display()),
                Err(why) => bail!("{}: {why}", args.image.display()),
            }
            if !(args.pixel_aspect.is_finite() && args.pixel_aspect > 0.0) {
                bail!("--pixel-aspect must be a positive number");
            }
            let h = g.level0_side(mpp);
            let w = h * args.pixel_aspect;
            let (sw, sh) = slide.info().dimensions();
            if w > sw as f64 || h > sh as f64 {
                bail!(
                    "{} ({sw}x{sh} px at {mpp} µm/px) is smaller than the model's {} µm field",
                    args.image.display(),
                    g.field_um
                );
            }
            let corner = [(sw as f64 - w) / 2.0, (sh as f64 - h) / 2.0];
            let field = read_field_rect(&slide, corner, [w, h], g.high_px())?;
            let classes = model.classes();
            let class = match &args.class {
                Some(c) => classes
                    .iter()
                    .position(|x| x == c)
                    .or_else(|| c.parse().ok().filter(|&i: &usize| i < classes.len()))
                    .with_context(|| {
                        format!("unknown class {c}: the model has {}", classes.join(", "))
                    })?,
                None => {
                    let p = model.predict_fields(std::slice::from_ref(&field))?;
                    histolens::dmsl::metrics::argmax(&p[0])
                }
            };
            println!("class {} ({class})", classes[class]);
            for (k, &tap) in taps.iter().enumerate() {
                for (m, image, cam) in model.gradcam(&field, class, tap)? {
                    if k == 0 {
                        // The branch's input as it saw it, for comparing the maps with.
                        let path = args.out.join(format!("{m}x-field.png"));
                        write_png_atomic(&path, &image)
                            .with_context(|| format!("writing {}", path.display()))?;
                    }
                    let name = format!("{m}x-{}", tap_name(tap));
                    write_map(
                        &args.out,
                        &name,
                        &image,
                        &cam.maps[0],
                        cam.height,
                        cam.width,
                    )?;
                }
            }
        }
        histolens::magnification::model::TASK => {
            let model = MagnificationModel::from_bytes(&bytes, &device)?;
            let crop = central(model.input_size())?;
            for &tap in taps {
                let cam = model.gradcam(&crop, tap)?;
                write_map(
                    &args.out,
                    tap_name(tap),
                    &crop,
                    &cam.maps[0],
                    cam.height,
                    cam.width,
                )?;
            }
        }
        t => bail!(
            "{} is a {t:?} model: Grad-CAM needs a DMSL or magnification model",
            args.model.display()
        ),
    }
    println!("maps in {}", args.out.display());
    Ok(())
}

fn tap_name(tap: Tap) -> &'static str {
    match tap {
        Tap::Low => "low",
        Tap::High => "high",
    }
}

/// `NAME.png` (the map in magma over the image, half opaque) and `NAME.npy` (the map, H x W).
fn write_map(
    dir: &std::path::Path,
    name: &str,
    image: &RgbImage,
    map: &[f32],
    h: usize,
    w: usize,
) -> anyhow::Result<()> {
    let overlay = RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let c = Colormap::Magma.rgb8(map[y as usize * w + x as usize]);
        let p = image
            .get_pixel(x.min(image.width() - 1), y.min(image.height() - 1))
            .0;
        image::Rgb(std::array::from_fn(|i| {
            ((u16::from(c[i]) + u16::from(p[i])) / 2) as u8
        }))
    });
    let path = dir.join(format!("{name}.png"));
    write_png_atomic(&path, &overlay).with_context(|| format!("writing {}", path.display()))?;
    let path = dir.join(format!("{name}.npy"));
    write_atomic(&path, &f32_npy(&[h, w], map.iter().copied()))
        .with_context(|| format!("writing {}", path.display()))?;
    println!("{name}: {}", path.with_extension("png").display());
    Ok(())
}
