//! A full disk at every point of a write: datasets built onto a small tmpfs that fills up must fail
//! with a clear error, leave no temp files, and leave no truncated patch under a final name (every
//! PNG left behind decodes whole). Needs the right to mount a tmpfs (root in a container, as in CI);
//! skips with a message otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of `kib` KiB mounted on a fresh folder, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(kib: u64) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(dir.path())
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then_some(SmallDisk { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).output();
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Runs `histolens ARGS` and checks what a full disk must leave: exit 1 naming the cause, no temp
/// file, every PNG whole.
fn fills_cleanly(disk: &SmallDisk, args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_histolens"))
        .env("HISTOLENS_DATA_DIR", disk.path().join("data"))
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {text}");
    assert!(
        text.to_lowercase().contains("no space left"),
        "{args:?}: the error names the full disk\n{text}"
    );
    let left = files(disk.path());
    for f in &left {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            !name.contains(".histolens-") && !name.ends_with(".tmp"),
            "{args:?}: temp file left behind: {}",
            f.display()
        );
        if name.ends_with(".png") {
            image::open(f)
                .unwrap_or_else(|e| panic!("{args:?}: truncated patch {} ({e})", f.display()));
        }
    }
}

#[test]
fn datasets_on_a_full_disk_fail_cleanly_and_leave_only_whole_patches() {
    let Some(disk) = SmallDisk::mount(384) else {
        eprintln!("skipped: cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN)");
        return;
    };
    let slide = common::sample_slide();
    let slide = slide.to_str().unwrap();
    let out = disk.path().join("mag");
    fills_cleanly(
        &disk,
        &[
            "dataset",
            "magnification",
            slide,
            "--mpp",
            "0.499",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    std::fs::remove_dir_all(&out).ok();
    let regions =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/models/dmsl-demo-regions.geojson");
    let out = disk.path().join("dmsl");
    fills_cleanly(
        &disk,
        &[
            "dataset",
            "dmsl",
            "--slide",
            &format!("{slide}={}", regions.display()),
            "--field-um",
            "64",
            "--out",
            out.to_str().unwrap(),
        ],
    );
}
