//! The headless commands, run as a user would run the binary.

mod common;

use std::path::Path;
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

/// Grad-CAM of the demo DMSL model: the paper's grid (each branch at each depth) as PNG overlays and
/// arrays of the branch's input size with values in [0, 1]; a bad layer name is refused.
#[test]
fn gradcam_writes_both_depths_for_both_branches() {
    let dir = tempfile::tempdir().unwrap();
    let model = histolens::default_dmsl_model().expect("assets/models/dmsl-demo.safetensors");
    let out = histolens()
        .arg("gradcam")
        .arg(common::sample_slide())
        .arg("--model")
        .arg(&model)
        .args(["--class", "epithelium", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (name, side) in [
        ("20x-low", 128),
        ("20x-high", 128),
        ("5x-low", 32),
        ("5x-high", 32),
    ] {
        assert!(
            dir.path().join(format!("{name}.png")).is_file(),
            "{name}.png"
        );
        let v = common::npy_values(&std::fs::read(dir.path().join(format!("{name}.npy"))).unwrap());
        assert_eq!(v.len(), side * side, "{name}");
        assert!(v.iter().all(|x| (0.0..=1.0).contains(x)), "{name}");
    }
    let bad = histolens()
        .arg("gradcam")
        .arg(common::sample_slide())
        .arg("--model")
        .arg(&model)
        .args(["--layer", "middle", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown --layer"));
}

/// `histolens merge SHARDS --out MERGED`, which must succeed.
fn merge(shards: &[std::path::PathBuf], merged: &Path) {
    let o = histolens()
        .arg("merge")
        .args(shards)
        .arg("--out")
        .arg(merged)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `predict --shard K/N` over three shards, merged, gives the rows of one unsharded run (JSON and
/// CSV), and each input lands in exactly one shard.
#[test]
fn sharded_predictions_merge_into_the_unsharded_run() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("inputs");
    std::fs::create_dir_all(&inputs).unwrap();
    for i in 0..5u32 {
        let img = image::RgbImage::from_fn(240, 240, |x, y| {
            let v = ((x * (i + 3) + y * 7) % 97) as u8;
            image::Rgb([150 + v, 80 + v / 2, 160])
        });
        img.save(inputs.join(format!("tile-{i}.png"))).unwrap();
    }
    for format in ["json", "csv"] {
        let run = |extra: &[&str], out: &Path| {
            let o = histolens()
                .args([
                    "predict",
                    "--crops",
                    "4",
                    "--device",
                    "cpu",
                    &format!("--{format}"),
                ])
                .arg(&inputs)
                .args(extra)
                .arg("--out")
                .arg(out)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        };
        let whole = dir.path().join(format!("whole.{format}"));
        run(&[], &whole);
        let mut shards = Vec::new();
        for k in 0..3 {
            let out = dir.path().join(format!("shard-{k}.{format}"));
            run(&["--shard", &format!("{k}/3")], &out);
            shards.push(out);
        }
        let merged = dir.path().join(format!("merged.{format}"));
        merge(&shards, &merged);
        // The same rows; the merge orders them by path.
        let rows = |p: &Path| -> Vec<String> {
            let text = std::fs::read_to_string(p).unwrap();
            let mut lines: Vec<String> = if format == "json" {
                let v: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
                v.iter().map(|r| r.to_string()).collect()
            } else {
                text.lines().skip(1).map(str::to_string).collect()
            };
            lines.sort();
            lines
        };
        assert_eq!(rows(&whole).len(), 5);
        assert_eq!(rows(&merged), rows(&whole), "{format}");
        let per_shard: usize = shards.iter().map(|s| rows(s).len()).sum();
        assert_eq!(per_shard, 5, "each input in exactly one shard");
    }
    // A bad shard is refused with a clear message.
    let o = histolens()
        .args(["predict", "--shard", "3/3"])
        .arg(&inputs)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("below N"));
}

/// `heatmap --shard K/N` over three slides (crops of the sample's tissue), with `--summary`: the
/// merged summaries equal one unsharded run's, and each slide's heatmap is the same bytes whichever
/// run computed it. Two slides with one file name are refused before any work.
#[test]
fn sharded_heatmaps_merge_into_the_unsharded_run() {
    let dir = tempfile::tempdir().unwrap();
    let slides = dir.path().join("slides");
    std::fs::create_dir_all(&slides).unwrap();
    let sample = histolens::slide::Slide::open(common::sample_slide()).unwrap();
    let mut list = String::new();
    for (i, (x, y)) in [(600, 900), (900, 1500), (700, 2200)]
        .into_iter()
        .enumerate()
    {
        let crop = sample.read_region(0, x, y, 448, 448).unwrap();
        let path = slides.join(format!("crop-{i}.png"));
        image::DynamicImage::ImageRgba8(crop)
            .to_rgb8()
            .save(&path)
            .unwrap();
        list.push_str(&format!("{}\n", path.display()));
    }
    let list_file = dir.path().join("slides.txt");
    std::fs::write(&list_file, &list).unwrap();
    let out = dir.path().join("out");
    let run = |extra: &[&str], summary: &Path| {
        let o = histolens()
            .env("HISTOLENS_DATA_DIR", dir.path().join("data"))
            .args(["heatmap", "--mpp", "0.5", "--device", "cpu", "--fresh"])
            .arg("--list")
            .arg(&list_file)
            .arg("--out")
            .arg(&out)
            .arg("--summary")
            .arg(summary)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let npys = || -> Vec<Vec<u8>> {
        (0..3)
            .map(|i| std::fs::read(out.join(format!("crop-{i}/heatmap.npy"))).unwrap())
            .collect()
    };
    let mut shards = Vec::new();
    for k in 0..2 {
        let s = dir.path().join(format!("shard-{k}.json"));
        run(&["--shard", &format!("{k}/2")], &s);
        shards.push(s);
    }
    let from_shards = npys();
    let whole = dir.path().join("whole.json");
    run(&[], &whole);
    assert_eq!(npys(), from_shards, "the same heatmaps from the shards");
    let merged = dir.path().join("merged.json");
    merge(&shards, &merged);
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let rows = read(&whole);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(read(&merged), read(&whole));
    let shard_rows: Vec<usize> = shards
        .iter()
        .map(|s| read(s).as_array().unwrap().len())
        .collect();
    assert_eq!(shard_rows, [2, 1], "every second slide from K");
    for r in rows {
        assert!(r["error"].is_null(), "{r}");
        let tissue = r["tissue_fields"].as_u64().unwrap();
        assert!(tissue > 0, "{r}");
        let (mut mean, mut share) = (0.0, 0.0);
        for (k, v) in r.as_object().unwrap() {
            if k.starts_with("mean_") {
                mean += v.as_f64().unwrap();
            } else if k.starts_with("share_") {
                share += v.as_f64().unwrap();
            }
        }
        assert!((mean - 1.0).abs() < 1e-4, "class means sum to 1: {r}");
        assert!((share - 1.0).abs() < 1e-9, "class shares sum to 1: {r}");
    }
    // Two inputs named alike would write one folder: refused, with both names.
    let twin = dir.path().join("twin");
    std::fs::create_dir_all(&twin).unwrap();
    std::fs::copy(slides.join("crop-0.png"), twin.join("crop-0.png")).unwrap();
    let o = histolens()
        .args(["heatmap", "--mpp", "0.5"])
        .arg(slides.join("crop-0.png"))
        .arg(twin.join("crop-0.png"))
        .arg("--out")
        .arg(dir.path().join("twins"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("share the output folder"));
}

/// Every statement about scale is true: a snapshot's stated pixel size is compared with the estimate
/// as a slide's is ("agrees" only after a comparison that agrees), default resolutions are no pixel
/// size, and OME-XML pixel sizes are read.
#[test]
fn snapshot_scale_statements() {
    use tiff::tags::ResolutionUnit;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The model answers 20x (0.5 µm/px); the snapshots have no nuclei, so that is the estimate.
    let model = common::constant_magnification_model(d, 20.0);
    let img = common::featureless_tissue(256);
    let far = d.join("far.png");
    common::png_with_phys(&img, &far, 0.3125);
    let near = d.join("near.png");
    common::png_with_phys(&img, &near, 0.48);
    let bare = d.join("bare.png");
    img.save(&bare).unwrap();
    let out = histolens()
        .args(["predict", "--model"])
        .arg(&model)
        .args([&far, &near, &bare])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |name: &str| text.lines().find(|l| l.contains(name)).unwrap().to_string();
    assert!(line("far.png").contains("20.0x"), "{text}");
    assert!(line("far.png").contains("MISMATCH") && !line("far.png").contains("agrees"));
    assert!(line("far.png").contains("+60%"), "{text}");
    assert!(line("near.png").contains("agrees (+4%)"), "{text}");
    assert!(!line("bare.png").contains("agrees") && !line("bare.png").contains("MISMATCH"));
    let out = histolens()
        .args(["predict", "--json", "--model"])
        .arg(&model)
        .args([&far, &bare])
        .output()
        .unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["path"].as_str().unwrap().ends_with(name))
            .unwrap()
    };
    assert_eq!(row("far.png")["mismatch"], true);
    assert!((row("far.png")["relative_difference"].as_f64().unwrap() - 0.6).abs() < 1e-3);
    assert_eq!(row("far.png")["metadata_source"], "PNG pHYs chunk");
    assert!(row("bare.png")["mismatch"].is_null() && row("bare.png")["metadata_mpp"].is_null());

    // What `info --json` reads from each kind of tag.
    let mpp = |path: &Path| -> (serde_json::Value, serde_json::Value) {
        let out = histolens()
            .args(["info", "--json"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (v["info"]["mpp"].clone(), v["info"]["properties"].clone())
    };
    let ome = |size: &str, unit: &str| {
        format!(
            r#"<?xml version="1.0"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="256" SizeY="256" SizeC="3" SizeZ="1" SizeT="1" PhysicalSizeX="{size}" PhysicalSizeY="{size}" {unit}/></Image></OME>"#
        )
    };
    // (file, resolution tags, ImageDescription, µm/px read, its source)
    type Case<'a> = (
        &'a str,
        Option<(ResolutionUnit, u32, u32)>,
        Option<String>,
        Option<f64>,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "inch.tif",
            Some((ResolutionUnit::Inch, 57_531, 1)),
            None,
            Some(0.4415),
            "tiff-resolution",
        ),
        (
            "cm.tif",
            Some((ResolutionUnit::Centimeter, 20_000, 1)),
            None,
            Some(0.5),
            "tiff-resolution",
        ),
        (
            "ome-um.tif",
            None,
            Some(ome(
                "0.2271",
                r#"PhysicalSizeXUnit="um" PhysicalSizeYUnit="um""#,
            )),
            Some(0.2271),
            "ome-xml",
        ),
        (
            "ome-nm.tif",
            None,
            Some(ome(
                "250",
                r#"PhysicalSizeXUnit="nm" PhysicalSizeYUnit="nm""#,
            )),
            Some(0.25),
            "ome-xml",
        ),
        (
            "ome-nounit.tif",
            Some((ResolutionUnit::Inch, 300, 1)),
            Some(ome("0.5", "")),
            Some(0.5),
            "ome-xml",
        ),
    ];
    for (name, res, desc, want, source) in cases {
        let p = d.join(name);
        common::tiff_with_tags(&img, &p, res, desc.as_deref());
        let (m, _) = mpp(&p);
        let x = m["x"].as_f64().unwrap_or(f64::NAN);
        assert!((x - want.unwrap()).abs() < 1e-4, "{name}: {m}");
        assert_eq!(m["source"], source, "{name}");
    }
    // Defaults say nothing about the tissue: no pixel size, and `info` says why.
    for dpi in [72, 96, 150, 300, 600] {
        let p = d.join(format!("{dpi}dpi.tif"));
        common::tiff_with_tags(&img, &p, Some((ResolutionUnit::Inch, dpi, 1)), None);
        let (m, props) = mpp(&p);
        assert!(m.is_null(), "{dpi} dpi read as {m}");
        let note = props["histolens.resolution-note"].as_str().unwrap();
        assert!(
            note.contains(&format!("{dpi} dpi (a default, ignored)")),
            "{note}"
        );
        let png = d.join(format!("{dpi}dpi.png"));
        common::png_with_phys(&img, &png, 25_400.0 / f64::from(dpi));
        assert!(mpp(&png).0.is_null(), "{dpi} dpi PNG");
    }
    let unitless = d.join("unitless.tif");
    common::tiff_with_tags(&img, &unitless, Some((ResolutionUnit::None, 1, 1)), None);
    assert!(mpp(&unitless).0.is_null());
    let text = histolens()
        .arg("info")
        .arg(d.join("300dpi.tif"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&text.stdout)
            .contains("resolution tag: 300 dpi (a default, ignored)")
    );
}

/// A slide with no pixel size in its metadata is no longer refused for want of `--mpp`: its scale
/// is estimated, and the command says so.
#[test]
fn heatmap_without_a_pixel_size_uses_the_estimate_and_says_so() {
    let Some(data) =
        common::shared_data("heatmap_without_a_pixel_size_uses_the_estimate_and_says_so")
    else {
        return;
    };
    let out_dir = tempfile::tempdir().unwrap();
    let out = histolens()
        .arg("heatmap")
        .arg(data.join("slides/tcga-cr-7395-01a-01-ts1.svs"))
        .arg("--out")
        .arg(out_dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("using the ESTIMATED"), "{stderr}");
    assert!(!stderr.contains("give it with --mpp"), "{stderr}");
    // The section is about 11x; the bundled demo model wants 20x fields: they are upsampled, with a
    // warning, and the heatmap is written.
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("upsampled"), "{stderr}");
    assert!(
        out_dir.path().read_dir().unwrap().next().is_some(),
        "no output"
    );
}

/// A scale bar calibrates a snapshot; that snapshot saves a camera; the camera calibrates the next
/// snapshot at another objective; `info` and the stores follow each step.
#[test]
fn calibrate_by_scale_bar_and_by_camera() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(env!("CARGO_BIN_EXE_histolens"))
            .env("HISTOLENS_DATA_DIR", &data)
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    let img = common::featureless_tissue(320);
    let (first, second) = (dir.path().join("10x.png"), dir.path().join("40x.png"));
    img.save(&first).unwrap();
    image::imageops::crop_imm(&img, 0, 0, 300, 200)
        .to_image()
        .save(&second)
        .unwrap();
    let effective = |file: &Path| -> Option<f64> {
        let (ok, text) = run(&[&os("info"), &os("--json"), file.as_os_str()]);
        assert!(ok, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["effective_mpp"]["x"].as_f64()
    };
    assert_eq!(effective(&first), None);
    // A 100 µm bar 153.8 px long.
    let (ok, text) = run(&[
        &os("calibrate"),
        first.as_os_str(),
        &os("--bar-px"),
        &os("153.8"),
        &os("--bar-um"),
        &os("100"),
    ]);
    assert!(ok && text.contains("0.6502 µm/px"), "{text}");
    assert!((effective(&first).unwrap() - 100.0 / 153.8).abs() < 1e-9);
    let (ok, text) = run(&[
        &os("camera"),
        &os("add"),
        &os("lab scope"),
        &os("--from"),
        first.as_os_str(),
        &os("--objective"),
        &os("10"),
    ]);
    assert!(ok && text.contains("frames of 320x320"), "{text}");
    let (ok, text) = run(&[
        &os("calibrate"),
        second.as_os_str(),
        &os("--camera"),
        &os("lab scope"),
        &os("--objective"),
        &os("40"),
    ]);
    assert!(ok, "{text}");
    assert!((effective(&second).unwrap() - 100.0 / 153.8 / 4.0).abs() < 1e-9);
    let (ok, text) = run(&[&os("camera"), &os("list")]);
    assert!(
        ok && text.contains("lab scope") && text.contains("40x 0.163"),
        "{text}"
    );
    // Mistakes are clear errors, and change nothing.
    let (ok, text) = run(&[
        &os("calibrate"),
        second.as_os_str(),
        &os("--camera"),
        &os("other"),
        &os("--objective"),
        &os("4"),
    ]);
    assert!(!ok && text.contains("no camera named \"other\""), "{text}");
    let (ok, text) = run(&[&os("calibrate"), second.as_os_str(), &os("--mpp=0")]);
    assert!(!ok && text.contains("not a positive number"), "{text}");
    assert!((effective(&second).unwrap() - 100.0 / 153.8 / 4.0).abs() < 1e-9);
    let (ok, _) = run(&[&os("calibrate"), second.as_os_str(), &os("--clear")]);
    assert!(ok);
    assert_eq!(effective(&second), None);
    let (ok, _) = run(&[&os("camera"), &os("remove"), &os("lab scope")]);
    assert!(ok);
    let (ok, text) = run(&[&os("camera"), &os("list")]);
    assert!(ok && text.contains("no cameras saved"), "{text}");
}

/// A file name that is not UTF-8 (Latin-1 bytes) gives JSON, not a panic.
#[cfg(unix)]
#[test]
fn info_json_on_a_latin1_file_name() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir
        .path()
        .join(std::ffi::OsStr::from_bytes(b"coupe-\xe9\xff.png"));
    common::featureless_tissue(64).save(&path).unwrap();
    let out = histolens()
        .args(["info", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["info"]["path"]
            .as_str()
            .unwrap()
            .contains("coupe-\u{fffd}")
    );
}

/// `dataset dmsl --pixel-aspect TABLE`: the images the table lists are read with their aspect
/// (fields 0.75 as wide as tall in stored pixels), the others with square pixels; a bad number in
/// the table is refused.
#[test]
fn dmsl_pairs_take_each_image_aspect_from_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let class = dir.path().join("in/tumour");
    std::fs::create_dir_all(&class).unwrap();
    for name in ["squashed.png", "square.png"] {
        image::RgbImage::from_fn(200, 200, |x, y| {
            image::Rgb([150, (x % 200) as u8, (y % 200) as u8])
        })
        .save(class.join(name))
        .unwrap();
    }
    let table = dir.path().join("aspects.csv");
    std::fs::write(&table, "file,aspect\nsquashed.png,0.75\n").unwrap();
    let out = dir.path().join("pairs");
    let folder = format!("{}@20x", dir.path().join("in").display());
    let run = |aspect: &Path| {
        histolens()
            .args([
                "dataset",
                "dmsl",
                "--folder",
                &folder,
                "--field-px",
                "64",
                "--low",
                "10",
            ])
            .arg("--pixel-aspect")
            .arg(aspect)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let done = run(&table);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let csv = std::fs::read_to_string(out.join("pairs.csv")).unwrap();
    let sizes = |name: &str| -> Vec<String> {
        csv.lines()
            .filter(|l| l.contains(name))
            .map(|l| {
                let region = l.split('"').nth(1).unwrap();
                region.split(',').skip(2).collect::<Vec<_>>().join("x")
            })
            .collect()
    };
    // 64 px fields: 48 x 64 stored pixels where squashed (4 x 3 of them), 64 x 64 elsewhere (3 x 3).
    assert_eq!(sizes("squashed.png"), vec!["48x64"; 12], "{csv}");
    assert_eq!(sizes("square.png"), vec!["64x64"; 9], "{csv}");
    std::fs::write(&table, "file,aspect\nsquashed.png,-2\n").unwrap();
    let refused = run(&table);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("positive number"));
}
