//! The Debian package, installed into a bare root with `dpkg -x` (no container) and run from there:
//! `packaging/test-deb.sh` checks that it starts, finds its own models and sample, reads the sample,
//! and carries its desktop entry, icon and MIME types. Building the package takes a release build, so
//! this runs when `packaging/build-deb.sh` has made one and skips with a message otherwise.

use std::path::Path;
use std::process::Command;

#[test]
fn the_deb_runs_from_a_bare_root() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debian");
    let deb = std::fs::read_dir(&dir).ok().and_then(|rd| {
        rd.filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "deb"))
            .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    });
    let Some(deb) = deb else {
        eprintln!("skipped: no .deb in target/debian (build one with packaging/build-deb.sh)");
        return;
    };
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/test-deb.sh"))
        .arg(&deb)
        .output()
        .expect("bash runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("OK: the package runs from a bare root"),
        "{text}"
    );
}
