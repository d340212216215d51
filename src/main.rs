//! histolens: with no subcommand, opens the viewer window; subcommands run headless.

mod cli;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "histolens",
    version,
    about = "Whole-slide image viewer for computational pathology"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Slide or image to open in the window (default: the bundled sample slide).
    file: Option<PathBuf>,
    /// Tile cache budget in MiB (default: an eighth of RAM, 256 MiB to 4 GiB).
    #[arg(long)]
    cache_mb: Option<u64>,
    /// Write frame-time percentiles (JSON) to this file when the window closes.
    #[arg(long)]
    frame_stats: Option<PathBuf>,
    /// Repaint continuously so that frame statistics measure whole frames (benchmarks).
    #[arg(long)]
    continuous_repaint: bool,
    /// Magnification model (default: the bundled one).
    #[arg(long)]
    model: Option<PathBuf>,
    /// DMSL model for slide heatmaps in the window (default: the bundled demo).
    #[arg(long, value_name = "FILE")]
    dmsl_model: Option<PathBuf>,
    /// Compute the DMSL heatmap of the slide as soon as it opens.
    #[arg(long)]
    heatmap: bool,
    /// Grad-CAM follows the view: the DMSL maps of the field under the view centre, recomputed as
    /// the view moves, the 20x last-convolution map laid over the slide.
    #[arg(long)]
    gradcam: bool,
    /// Add these folders or images to the label set and show the labelling view.
    #[arg(long = "label", value_name = "PATH")]
    label: Vec<PathBuf>,
    /// Open this run folder (made by the panel or by histolens train) in the training panel and
    /// start or resume it.
    #[arg(long, value_name = "DIR")]
    train_run: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Print levels, dimensions, µm/px, objective power, vendor and associated images.
    Info {
        file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Build a training dataset.
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// Train a model (runs resume when their folder already holds one).
    #[command(subcommand)]
    Train(TrainCommand),
    /// Evaluate a model on a split of a dataset.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Estimate the magnification and µm/px of images and slides (files or folders, recursively).
    Predict(cli::magnification::PredictArgs),
    /// Classify a slide's tissue with a DMSL model; write the heatmap as PNG, .npy and GeoJSON.
    Heatmap(cli::dmsl::HeatmapArgs),
    /// Grad-CAM maps at the first and the last convolution of each branch (DMSL) or of the
    /// magnification model, as PNG overlays and .npy arrays.
    Gradcam(cli::gradcam::GradcamArgs),
    /// Set a file's pixel size by hand (µm/px, objective, a scale bar, or a saved camera), print
    /// it, or clear it; every command and the window use it over the metadata.
    Calibrate(cli::calibrate::CalibrateArgs),
    /// Microscope cameras: one snapshot of known scale gives the camera's µm/px at every objective.
    #[command(subcommand)]
    Camera(cli::calibrate::CameraCommand),
    /// Where histolens keeps its state and finds its bundled sample and models.
    Paths,
    /// Combine the outputs of `--shard K/N` runs (JSON or CSV rows) into one, as one run writes it.
    Merge(cli::shard::MergeArgs),
    /// Training runs (of `histolens train` and of the window's panel): list and compare, resume, evaluate.
    #[command(subcommand)]
    Runs(cli::runs::RunsCommand),
    /// Measure performance.
    #[command(subcommand)]
    Bench(cli::bench::BenchCommand),
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// Patches at magnifications 1x up to each source's native one, with a manifest and a split
    /// that never shares tissue.
    Magnification(cli::magnification::DatasetArgs),
    /// Pairs of one field of view at two magnifications (DMSL), from slides with labelled regions or
    /// folders of labelled images; split by region or image.
    Dmsl(cli::dmsl::DatasetArgs),
    /// A pyramidal TIFF slide made of labelled images (a grid, squashed pixels restored) with their
    /// classes as regions beside it: `heatmap --check` scores a model's heatmap against them.
    Mosaic(cli::dmsl::MosaicArgs),
}

#[derive(Subcommand)]
enum TrainCommand {
    /// Hagnifinder: magnification regression.
    Magnification(cli::magnification::TrainArgs),
    /// DMSL: two-magnification classification with the SIM loss (or its comparison modes).
    Dmsl(cli::dmsl::TrainArgs),
}

#[derive(Subcommand)]
enum EvalCommand {
    /// ACC0.5/1/5, MAE, per-magnification accuracy, confusion, 4-level accuracy.
    Magnification(Box<cli::magnification::EvalArgs>),
    /// Accuracy, precision, recall, F1, AUC and the confusion matrix of a DMSL model.
    Dmsl(cli::dmsl::EvalArgs),
}

fn main() -> std::process::ExitCode {
    histolens::util::memory::tune_allocator();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    // A headless command piped into `head` ends quietly, as Unix tools do, instead of panicking on
    // the closed pipe.
    #[cfg(unix)]
    if cli.command.is_some() {
        // SAFETY: restoring the default disposition of a signal before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Some(Command::Info { file, json }) => cli::info::run(&file, json),
        Some(Command::Dataset(DatasetCommand::Magnification(a))) => cli::magnification::dataset(a),
        Some(Command::Train(TrainCommand::Magnification(a))) => cli::magnification::train_cmd(a),
        Some(Command::Eval(EvalCommand::Magnification(a))) => cli::magnification::eval(*a),
        Some(Command::Dataset(DatasetCommand::Dmsl(a))) => cli::dmsl::dataset(a),
        Some(Command::Dataset(DatasetCommand::Mosaic(a))) => cli::dmsl::mosaic(a),
        Some(Command::Train(TrainCommand::Dmsl(a))) => cli::dmsl::train_cmd(a),
        Some(Command::Eval(EvalCommand::Dmsl(a))) => cli::dmsl::eval(a),
        Some(Command::Heatmap(a)) => cli::dmsl::heatmap(a),
        Some(Command::Gradcam(a)) => cli::gradcam::run(a),
        Some(Command::Predict(a)) => cli::magnification::predict(a),
        Some(Command::Runs(r)) => cli::runs::run(r),
        Some(Command::Merge(m)) => cli::shard::merge(m),
        Some(Command::Calibrate(a)) => cli::calibrate::calibrate(a),
        Some(Command::Camera(c)) => cli::calibrate::camera(c),
        Some(Command::Paths) => {
            let show = |p: Option<PathBuf>| {
                p.map_or("(not found)".to_string(), |p| p.display().to_string())
            };
            println!("data folder: {}", histolens::data_dir().display());
            println!(
                "cache folder: {} (heatmaps, frozen-backbone features)",
                histolens::cache_dir().display()
            );
            println!("sample slide: {}", show(histolens::bundled_sample()));
            println!(
                "magnification model: {}",
                show(histolens::default_magnification_model())
            );
            println!("DMSL demo model: {}", show(histolens::default_dmsl_model()));
            Ok(())
        }
        Some(Command::Bench(b)) => cli::bench::run(b),
        None => run_window(histolens::gui::LaunchOptions {
            path: cli.file,
            cache_mb: cli.cache_mb,
            data_dir: None,
            frame_stats_path: cli.frame_stats,
            continuous_repaint: cli.continuous_repaint,
            magnification_model: cli.model,
            dmsl_model: cli.dmsl_model,
            compute_heatmap: cli.heatmap,
            gradcam_follow: cli.gradcam,
            label_paths: cli.label,
            train_run: cli.train_run,
            bench: None,
        }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_window(mut options: histolens::gui::LaunchOptions) -> anyhow::Result<()> {
    if options.path.is_none() {
        options.path = histolens::bundled_sample();
        if options.path.is_none() {
            log::warn!("the bundled sample slide was not found; starting with no slide");
        }
    }
    histolens::gui::run(options)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context(
            "the window could not be started (is a display and a Vulkan or GL driver available?)",
        )
}
