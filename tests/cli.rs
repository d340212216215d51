//! The headless commands, run as a user would run the binary.

mod common;

use std::process::Command;

fn histolens() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_histolens"));
    c.env(
        "HISTOLENS_DATA_DIR",
        std::env::temp_dir().join("histolens-cli-test"),
    );
    c
}

#[test]
fn info_json_on_the_sample() {
    let out = histolens()
        .args(["info", "--json"])
        .arg(common::sample_slide())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["info"]["levels"][0]["width"], 2220);
    assert_eq!(v["info"]["levels"][0]["height"], 2967);
    assert_eq!(v["info"]["mpp"]["x"], 0.499);
    assert_eq!(v["info"]["mpp"]["source"], "open-slide");
    assert_eq!(v["info"]["objective_power"], 20.0);
    assert_eq!(v["info"]["source"]["vendor"], "aperio");
    let names: Vec<&str> = v["info"]["associated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"label") && names.contains(&"macro") && names.contains(&"thumbnail"));
    assert!((v["magnification"].as_f64().unwrap() - 20.04).abs() < 0.01);
}

#[test]
fn info_table_and_errors() {
    let out = histolens()
        .arg("info")
        .arg(common::sample_slide())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2220 x 2967"), "{text}");
    assert!(text.contains("0.4990"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("garbage.svs");
    std::fs::write(&bad, vec![7u8; 5000]).unwrap();
    let out = histolens().arg("info").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("garbage.svs"),
        "{err}"
    );

    let out = histolens()
        .args(["info", "/nonexistent/slide.svs"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

#[test]
fn bench_tiles_runs_on_the_sample() {
    let out = histolens()
        .args(["bench", "tiles", "--threads", "2", "--json"])
        .arg(common::sample_slide())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // 2220x2967 at 256 px: 9 x 12 tiles, one level.
    assert_eq!(v[0]["tiles"], 108);
    assert!(v[0]["cold_tiles_per_second"].as_f64().unwrap() > 0.0);
}
