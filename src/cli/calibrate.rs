//! `histolens calibrate FILE …` (a file's pixel size set by hand, as the window's Calibration
//! section does) and `histolens camera …` (microscope cameras that later snapshots reuse).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use histolens::slide::{Calibration, CalibrationStore, Camera, CameraStore, Slide};

use super::magnification::load_model;
use histolens::magnification::estimate::check_file;
use histolens::nn::device::DeviceChoice;

#[derive(Args)]
pub struct CalibrateArgs {
    /// The slide or snapshot (its calibration is remembered for this file and used by every
    /// command and by the window).
    pub file: PathBuf,
    /// Its µm/px at full resolution.
    #[arg(long, conflicts_with_all = ["camera", "bar_px"])]
    pub mpp: Option<f64>,
    /// Objective power it was taken at; with --camera, the camera's µm/px at this objective.
    #[arg(long)]
    pub objective: Option<f64>,
    /// A camera saved with `histolens camera add`; without --objective, the objective whose µm/px
    /// on this camera is nearest the estimated one.
    #[arg(long)]
    pub camera: Option<String>,
    /// Length in pixels of a scale bar drawn in the image (with --bar-um).
    #[arg(long, requires = "bar_um")]
    pub bar_px: Option<f64>,
    /// Length in µm that the scale bar states (with --bar-px).
    #[arg(long, requires = "bar_px")]
    pub bar_um: Option<f64>,
    /// Forget the file's calibration.
    #[arg(long, conflicts_with_all = ["mpp", "objective", "camera", "bar_px"])]
    pub clear: bool,
}

#[derive(Subcommand)]
pub enum CameraCommand {
    /// Save a camera from one snapshot of known scale (--from FILE, its metadata or calibration)
    /// or from a µm/px, taken at --objective.
    Add(CameraAddArgs),
    /// List the saved cameras and their µm/px at the usual objectives.
    List,
    /// Forget a camera.
    Remove { name: String },
}

#[derive(Args)]
pub struct CameraAddArgs {
    pub name: String,
    /// A snapshot taken with this camera whose µm/px is known (metadata or `calibrate`); its size
    /// becomes the camera's frame.
    #[arg(long, required_unless_present = "mpp", conflicts_with = "mpp")]
    pub from: Option<PathBuf>,
    /// µm/px of the camera at --objective.
    #[arg(long)]
    pub mpp: Option<f64>,
    /// Objective of that snapshot or µm/px.
    #[arg(long)]
    pub objective: f64,
    /// Snapshot size WIDTHxHEIGHT (with --mpp); snapshots of this size are offered the camera.
    #[arg(long, value_parser = parse_frame)]
    pub frame: Option<(u32, u32)>,
}

fn parse_frame(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("{s:?} is not WIDTHxHEIGHT"))?;
    let n = |v: &str| v.trim().parse::<u32>().map_err(|e| format!("{v:?}: {e}"));
    Ok((n(w)?, n(h)?))
}

fn positive(name: &str, v: Option<f64>) -> anyhow::Result<Option<f64>> {
    match v {
        Some(x) if !(x.is_finite() && x > 0.0) => bail!("{name} {x} is not a positive number"),
        v => Ok(v),
    }
}

pub fn calibrate(a: CalibrateArgs) -> anyhow::Result<()> {
    let (mpp, objective) = (
        positive("--mpp", a.mpp)?,
        positive("--objective", a.objective)?,
    );
    let (bar_px, bar_um) = (
        positive("--bar-px", a.bar_px)?,
        positive("--bar-um", a.bar_um)?,
    );
    let slide = Slide::open(&a.file)?;
    let mut store = CalibrationStore::load(CalibrationStore::default_path())?;
    let calibration = if a.clear {
        Calibration::default()
    } else if let (Some(px), Some(um)) = (bar_px, bar_um) {
        Calibration {
            mpp: Some(um / px),
            objective_power: objective,
        }
    } else if let Some(name) = &a.camera {
        let cameras = CameraStore::load(CameraStore::default_path())?;
        let camera = cameras
            .get(name)
            .with_context(|| format!("no camera named {name:?} (see `histolens camera list`)"))?;
        let objective = match objective {
            Some(o) => o,
            None => estimated_objective(&slide, &camera)?,
        };
        Calibration {
            mpp: Some(camera.mpp_at(objective)),
            objective_power: Some(objective),
        }
    } else if mpp.is_some() || objective.is_some() {
        Calibration {
            mpp,
            objective_power: objective,
        }
    } else {
        print_calibration(&a.file, store.get(&a.file), &slide);
        return Ok(());
    };
    store.set(&a.file, calibration)?;
    print_calibration(&a.file, calibration, &slide);
    Ok(())
}

/// The objective of `camera` nearest the bundled model's estimate for `slide`.
fn estimated_objective(slide: &Slide, camera: &Camera) -> anyhow::Result<f64> {
    let model = load_model(None, DeviceChoice::Auto)
        .context("give the objective with --objective (no model to estimate it)")?;
    let e = check_file(&model, slide, 16)?.estimate;
    let objective = camera.nearest_objective(e.mpp);
    eprintln!(
        "estimated {:.3} µm/px; the nearest objective on this camera is {objective}x ({:.3} µm/px); \
         give --objective to override",
        e.mpp,
        camera.mpp_at(objective)
    );
    Ok(objective)
}

fn print_calibration(file: &Path, c: Calibration, slide: &Slide) {
    let effective = slide.info().effective_mpp(&c);
    match (c.is_empty(), effective) {
        (true, Some(m)) => println!(
            "{}: no calibration; {:.4} µm/px from {}",
            file.display(),
            m.mean(),
            m.source.label()
        ),
        (true, None) => println!(
            "{}: no calibration and no µm/px in its metadata (commands estimate it)",
            file.display()
        ),
        (false, m) => println!(
            "{}: calibrated{}{} → {}",
            file.display(),
            c.mpp.map_or(String::new(), |v| format!(" {v:.4} µm/px")),
            c.objective_power
                .map_or(String::new(), |v| format!(" at {v}x")),
            m.map_or("no µm/px".to_string(), |m| format!(
                "{:.4} µm/px ({:.1}x scanner-equivalent)",
                m.mean(),
                m.magnification()
            )),
        ),
    }
}

pub fn camera(c: CameraCommand) -> anyhow::Result<()> {
    let mut store = CameraStore::load(CameraStore::default_path())?;
    match c {
        CameraCommand::Add(a) => {
            let objective =
                positive("--objective", Some(a.objective))?.context("--objective is required")?;
            let (mpp, frame) = match (&a.from, positive("--mpp", a.mpp)?) {
                (Some(file), _) => {
                    let slide = Slide::open(file)?;
                    let calibration = CalibrationStore::saved_for(file);
                    let info = slide.info();
                    let m = info.effective_mpp(&calibration).with_context(|| {
                        format!(
                            "{}: its µm/px is unknown; calibrate it first (`histolens calibrate \
                             FILE --bar-px … --bar-um …`) or give --mpp",
                            file.display()
                        )
                    })?;
                    let (w, h) = info.dimensions();
                    let frame = u32::try_from(w).ok().zip(u32::try_from(h).ok());
                    (m.mean(), a.frame.or(frame))
                }
                (None, Some(m)) => (m, a.frame),
                (None, None) => bail!("give --from FILE or --mpp"),
            };
            let camera = Camera::from_snapshot(mpp, objective, frame)
                .context("the µm/px and the objective must be positive")?;
            store.set(&a.name, camera)?;
            println!(
                "camera {:?}: {:.4} µm/px at {objective}x ({:.3} µm/px at 1x){}",
                a.name,
                mpp,
                camera.mpp_at_1x,
                frame.map_or(String::new(), |(w, h)| format!(", frames of {w}x{h}"))
            );
        }
        CameraCommand::List => {
            let mut any = false;
            for (name, c) in store.cameras() {
                any = true;
                let at: Vec<String> = [4.0, 10.0, 20.0, 40.0]
                    .iter()
                    .map(|o| format!("{o}x {:.3}", c.mpp_at(*o)))
                    .collect();
                println!(
                    "{name}: µm/px {}{}",
                    at.join(", "),
                    c.frame
                        .map_or(String::new(), |(w, h)| format!("; frames of {w}x{h}"))
                );
            }
            if !any {
                println!("no cameras saved (add one with `histolens camera add`)");
            }
        }
        CameraCommand::Remove { name } => {
            if !store.remove(&name)? {
                bail!("no camera named {name:?}");
            }
            println!("camera {name:?} forgotten");
        }
    }
    Ok(())
}
