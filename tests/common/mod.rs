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
