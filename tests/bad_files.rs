//! A corpus of bad files made in the test: each is refused with an error of the right kind, never a panic.

mod common;

use std::path::Path;

use histolens::slide::Slide;

fn kind_of(path: &Path) -> &'static str {
    match Slide::open(path) {
        Ok(_) => "opened",
        Err(e) => {
            // Messages name the file so the user knows which one failed.
            let msg = e.to_string();
            assert!(
                msg.contains(&path.file_name().unwrap().to_string_lossy().to_string()),
                "{msg}"
            );
            e.kind()
        }
    }
}

/// A PNG whose IHDR claims `w`x`h` pixels, with valid CRCs, and no image data worth the name.
fn png_header_claiming(w: u32, h: u32) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]); // 8-bit RGBA
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

fn encoded(format: image::ImageFormat) -> Vec<u8> {
    let mut img = image::RgbImage::new(300, 200);
    for (x, y, p) in img.enumerate_pixels_mut() {
        p.0 = [
            (x * 7 % 256) as u8,
            (y * 3 % 256) as u8,
            ((x ^ y) % 256) as u8,
        ];
    }
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, format).unwrap();
    buf.into_inner()
}

/// Writes the corpus into `d`: each file's name and the error kinds it may give.
fn write_corpus(d: &Path) -> Vec<(&'static str, &'static [&'static str])> {
    let sample = std::fs::read(common::sample_slide()).unwrap();
    let png = encoded(image::ImageFormat::Png);
    let jpeg = encoded(image::ImageFormat::Jpeg);
    let mut random = Vec::with_capacity(100_000);
    let mut x = 0x1234_5678u32;
    for _ in 0..100_000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        random.push((x >> 24) as u8);
    }
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("empty.svs", vec![], &["empty"]),
        ("empty.png", vec![], &["empty"]),
        ("random.svs", random.clone(), &["unsupported"]),
        ("random.png", random.clone(), &["unsupported", "corrupt"]),
        (
            "truncated.svs",
            sample[..sample.len() / 2].to_vec(),
            &["corrupt"],
        ),
        ("header-only.svs", sample[..4096].to_vec(), &["corrupt"]),
        ("truncated.png", png[..png.len() / 2].to_vec(), &["corrupt"]),
        (
            "truncated.jpg",
            jpeg[..jpeg.len() / 3].to_vec(),
            &["corrupt"],
        ),
        (
            "bomb.png",
            png_header_claiming(100_000, 100_000),
            &["too-large"],
        ),
        ("zero-size.png", png_header_claiming(0, 10), &["corrupt"]),
        (
            "text.tiff",
            b"just some text, not an image".to_vec(),
            &["unsupported"],
        ),
    ];
    cases
        .into_iter()
        .map(|(name, bytes, expected)| {
            std::fs::write(d.join(name), bytes).unwrap();
            (name, expected)
        })
        .collect()
}

#[test]
fn bad_file_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, expected) in write_corpus(d) {
        let got = kind_of(&d.join(name));
        assert!(
            expected.contains(&got),
            "{name}: expected one of {expected:?}, got {got}"
        );
    }
    assert_eq!(kind_of(&d.join("missing.svs")), "not-found");
    std::fs::create_dir(d.join("folder.svs")).unwrap();
    assert_eq!(kind_of(&d.join("folder.svs")), "unsupported");
}

/// Every read command over the corpus, as a user runs the binary: no panic, no signal, exit 1 with
/// `error:` naming the file (or a report row naming it, for `predict`, which goes on).
#[test]
fn every_read_command_fails_cleanly_on_the_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    let corpus = write_corpus(d);
    for (name, _) in &corpus {
        let file = d.join(name);
        let commands: [&[&str]; 5] = [
            &["info"],
            &["info", "--json"],
            &["predict"],
            &["heatmap", "--mpp", "0.5", "--out"],
            &["bench", "tiles"],
        ];
        for args in commands {
            let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_histolens"));
            c.env("HISTOLENS_DATA_DIR", d.join("data")).args(args);
            if args.contains(&"--out") {
                c.arg(&out);
            }
            let o = c.arg(&file).output().unwrap();
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            let code = o.status.code();
            assert!(
                code == Some(0) || code == Some(1),
                "{args:?} {name}: exit {:?} (a panic is 101, a signal none)\n{text}",
                o.status
            );
            assert!(!text.contains("panicked"), "{args:?} {name}\n{text}");
            assert!(
                text.contains(name),
                "{args:?} {name}: the file is not named\n{text}"
            );
            if code == Some(1) {
                assert!(text.contains("error:"), "{args:?} {name}\n{text}");
            }
        }
    }
}

#[test]
fn wrong_channel_counts_and_bit_depths_open() {
    let dir = tempfile::tempdir().unwrap();
    let grey16 = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(40, 30, |x, _| {
        image::Luma([(x * 1600) as u16])
    });
    let p = dir.path().join("grey16.png");
    grey16.save(&p).unwrap();
    let s = Slide::open(&p).unwrap();
    let px = s.read_region(0, 39, 0, 1, 1).unwrap();
    assert_eq!(
        px.get_pixel(0, 0).0,
        [243, 243, 243, 255],
        "16-bit grey scaled to 8-bit RGB"
    );
    let la =
        image::ImageBuffer::<image::LumaA<u8>, _>::from_pixel(10, 10, image::LumaA([100, 128]));
    let p = dir.path().join("la.png");
    la.save(&p).unwrap();
    let s = Slide::open(&p).unwrap();
    assert_eq!(
        s.read_region(0, 0, 0, 1, 1).unwrap().get_pixel(0, 0).0,
        [100, 100, 100, 128]
    );
    let rgba16 = image::ImageBuffer::<image::Rgba<u16>, _>::from_pixel(
        8,
        8,
        image::Rgba([65535, 0, 32768, 65535]),
    );
    let p = dir.path().join("rgba16.tiff");
    rgba16.save(&p).unwrap();
    let s = Slide::open(&p).unwrap();
    assert_eq!(
        s.read_region(0, 0, 0, 1, 1).unwrap().get_pixel(0, 0).0,
        [255, 0, 128, 255]
    );
}

#[test]
fn huge_regions_are_refused_not_allocated() {
    let s = Slide::open(common::sample_slide()).unwrap();
    let e = s.read_region(0, 0, 0, 100_000, 100_000).unwrap_err();
    assert_eq!(e.kind(), "region-too-large");
    assert_eq!(
        s.read_region(3, 0, 0, 1, 1).unwrap_err().kind(),
        "no-such-level"
    );
}
