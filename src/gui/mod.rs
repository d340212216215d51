//! The eframe application: menu, viewer canvas, side panel, status bar. Uses the library's slide and
//! tile APIs; nothing in the library depends on this module.

mod app;
mod frame_stats;
pub mod gradcam;
pub mod heatmap;
pub mod labels;
pub mod magnification;
pub mod overlay;
pub mod regions;
mod side_panel;
mod status_bar;
mod thumbnails;
mod tile_atlas;
pub mod training;
mod viewer;
pub mod window_bench;

pub use app::{HistolensApp, LaunchOptions, Mode};
pub use frame_stats::{FrameStats, FrameSummary};
pub use viewer::{SlideView, scale_bar_length};

/// Model work the user waits for (magnification estimates, Grad-CAM maps) now running or queued.
static INTERACTIVE_MODEL_WORK: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Runs model work the user waits for (estimates, Grad-CAM) on a thread pool one core smaller than the
/// machine, at a lower priority, so that the window, which renders on the CPU too without a GPU, keeps
/// a core while models run. A heatmap computing in the background steps aside meanwhile (see
/// [`run_background_model_work`]).
pub(crate) fn run_model_work<R>(work: impl FnOnce() -> R + Send) -> R
where
    R: Send,
{
    use std::sync::atomic::Ordering;
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    INTERACTIVE_MODEL_WORK.fetch_add(1, Ordering::SeqCst);
    struct Done;
    impl Drop for Done {
        fn drop(&mut self) {
            INTERACTIVE_MODEL_WORK.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _done = Done;
    run_low_priority(&POOL, model_threads(), "model", work)
}

/// Runs long background model work (a slide's heatmap) on a pool of its own, the size of
/// [`run_model_work`]'s. The work calls [`yield_to_interactive_work`] between its batches.
pub(crate) fn run_background_model_work<R>(work: impl FnOnce() -> R + Send) -> R
where
    R: Send,
{
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    run_low_priority(&POOL, model_threads(), "background", work)
}

/// Waits while interactive model work runs or waits (or until `stop`), so that a Grad-CAM map or an
/// estimate asked for during a long heatmap is not queued behind it nor shares the CPU with it.
pub(crate) fn yield_to_interactive_work(stop: &std::sync::atomic::AtomicBool) {
    use std::sync::atomic::Ordering;
    while INTERACTIVE_MODEL_WORK.load(Ordering::SeqCst) > 0 && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn model_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    cores.saturating_sub(1).max(1)
}

/// Runs training on every core at a lower priority: as fast as `histolens train` when the window is
/// idle, while the window's own thread, at normal priority, is served first when it needs the CPU.
pub(crate) fn run_training_work<R>(work: impl FnOnce() -> R + Send) -> R
where
    R: Send,
{
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    run_low_priority(&POOL, cores, "train", work)
}

fn run_low_priority<R: Send>(
    pool: &std::sync::OnceLock<Option<rayon::ThreadPool>>,
    threads: usize,
    name: &'static str,
    work: impl FnOnce() -> R + Send,
) -> R {
    let pool = pool.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(move |i| format!("{name}-{i}"))
            .start_handler(|_| lower_thread_priority())
            .build()
            .ok()
    });
    match pool {
        Some(p) => p.install(work),
        None => work(),
    }
}

/// Lowers the calling thread's scheduling priority (Linux: per thread), so that rendering, which runs
/// on the CPU without a GPU, is served first: SCHED_IDLE (it runs only on cores nothing else wants,
/// and a waking render thread preempts it at once: a nice value alone still cost frames their
/// time slice), else nice 10.
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: both calls with pid/who 0 change only the calling thread's scheduling.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
            libc::setpriority(libc::PRIO_PROCESS, 0, 10);
        }
    }
}

/// The main window's options (also the bare baseline's in [`window_bench`]).
fn native_options() -> eframe::NativeOptions {
    eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("histolens")
            .with_inner_size([1280.0, 800.0])
            .with_min_inner_size([480.0, 320.0])
            .with_drag_and_drop(true),
        persist_window: true,
        ..Default::default()
    }
}

/// Opens the main window and runs until it is closed.
pub fn run(options: LaunchOptions) -> eframe::Result<()> {
    crate::util::memory::tune_allocator_for_long_sessions();
    eframe::run_native(
        "histolens",
        native_options(),
        Box::new(move |cc| Ok(Box::new(HistolensApp::new(cc, options)))),
    )
}
