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

/// A classic little-endian TIFF's IFDs: (offset of the IFD, its entries as (tag, type, count, value or
/// offset, offset of the entry)).
type Entry = (u16, u16, u32, u32, usize);
fn ifds(tiff: &[u8]) -> Vec<(usize, Vec<Entry>)> {
    let u16_at = |o: usize| u16::from_le_bytes([tiff[o], tiff[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(tiff[o..o + 4].try_into().unwrap());
    assert_eq!(&tiff[..4], b"II*\0", "a classic little-endian TIFF");
    let mut out = Vec::new();
    let mut at = u32_at(4) as usize;
    while at != 0 && out.len() < 16 {
        let n = usize::from(u16_at(at));
        let entries = (0..n)
            .map(|i| {
                let e = at + 2 + 12 * i;
                (u16_at(e), u16_at(e + 2), u32_at(e + 4), u32_at(e + 8), e)
            })
            .collect();
        out.push((at, entries));
        at = u32_at(at + 2 + 12 * n) as usize;
    }
    out
}

/// The sample slide with every value of `tag` (an array of LONGs) in its first IFD made by `f`.
fn with_first_ifd_array(sample: &[u8], tag: u16, f: impl Fn(usize, u32) -> u32) -> Vec<u8> {
    let mut out = sample.to_vec();
    let (_, entries) = &ifds(sample)[0];
    let &(_, kind, count, at, _) = entries.iter().find(|e| e.0 == tag).unwrap();
    assert_eq!(kind, 4, "LONG values");
    for i in 0..count as usize {
        let o = at as usize + 4 * i;
        let v = u32::from_le_bytes(out[o..o + 4].try_into().unwrap());
        out[o..o + 4].copy_from_slice(&f(i, v).to_le_bytes());
    }
    out
}

/// Damaged copies of the sample slide: tiles past the end of the file, absurd byte counts, an IFD
/// chain that loops, and garbage in the JPEG data of the level-0 tiles.
fn damaged_slides(sample: &[u8]) -> Vec<(&'static str, Vec<u8>, &'static [&'static str])> {
    let len = sample.len() as u32;
    let mut looping = sample.to_vec();
    let chain = ifds(sample);
    let (last, entries) = chain.last().unwrap();
    let next = last + 2 + 12 * entries.len();
    looping[next..next + 4].copy_from_slice(&(chain[0].0 as u32).to_le_bytes());
    let mut garbage = sample.to_vec();
    let (_, first) = &chain[0];
    let offsets = first.iter().find(|e| e.0 == 324).unwrap();
    let counts = first.iter().find(|e| e.0 == 325).unwrap();
    let mut x = 0x9e37_79b9u32;
    for i in 0..offsets.2 as usize {
        let read = |o: usize| u32::from_le_bytes(sample[o..o + 4].try_into().unwrap()) as usize;
        let (at, n) = (
            read(offsets.3 as usize + 4 * i),
            read(counts.3 as usize + 4 * i),
        );
        // Keep the JPEG headers (the first 600 bytes), scramble the entropy-coded data.
        for b in garbage.iter_mut().take(at + n).skip(at + 600.min(n)) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = (x >> 24) as u8;
        }
    }
    let opened_or_corrupt: &[&str] = &["opened", "corrupt"];
    vec![
        (
            "tiles-past-the-end.svs",
            with_first_ifd_array(sample, 324, |i, _| len + 1000 + i as u32),
            opened_or_corrupt,
        ),
        (
            "absurd-byte-counts.svs",
            with_first_ifd_array(sample, 325, |_, _| 0xFFFF_FF00),
            opened_or_corrupt,
        ),
        ("ifd-loop.svs", looping, opened_or_corrupt),
        ("corrupt-entropy.svs", garbage, opened_or_corrupt),
        (
            "truncated-1pct.svs",
            sample[..sample.len() / 100].to_vec(),
            &["corrupt", "unsupported"],
        ),
        (
            "truncated-99pct.svs",
            sample[..sample.len() * 99 / 100].to_vec(),
            opened_or_corrupt,
        ),
    ]
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
    let mut corrupt_jpeg = jpeg.clone();
    let scan = corrupt_jpeg.len() / 2;
    for (i, b) in corrupt_jpeg[scan..scan + 200].iter_mut().enumerate() {
        *b = (i * 37 % 251) as u8;
    }
    let mut cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
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
        // Damaged entropy-coded data still decodes (to garbage) or is refused as corrupt.
        ("corrupt-entropy.jpg", corrupt_jpeg, &["opened", "corrupt"]),
        // Fake vendor files: a name OpenSlide knows, content it does not.
        (
            "fake-vendor.mrxs",
            b"[GENERAL]\nSLIDE_VERSION=01.02\n".to_vec(),
            &["unsupported", "corrupt"],
        ),
        ("fake-vendor.ndpi", png.clone(), &["opened"]),
        (
            "fake-vendor.vms",
            b"[Virtual Microscope Specimen]\nImageFile=missing.jpg\n".to_vec(),
            &["unsupported", "corrupt"],
        ),
        // An odd but valid name: spaces, accents, quotes.
        (
            "coupe n\u{b0}3 \"\u{e9}t\u{e9}\" 'x'.png",
            png.clone(),
            &["opened"],
        ),
    ];
    cases.extend(damaged_slides(&sample));
    cases
        .into_iter()
        .map(|(name, bytes, expected)| {
            std::fs::write(d.join(name), bytes).unwrap();
            (name, expected)
        })
        .chain(links(d))
        .collect()
}

/// A symlink loop and a dangling symlink.
fn links(d: &Path) -> Vec<(&'static str, &'static [&'static str])> {
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink("loop-b.svs", d.join("loop-a.svs")).unwrap();
        std::os::unix::fs::symlink("loop-a.svs", d.join("loop-b.svs")).unwrap();
        std::os::unix::fs::symlink("nowhere.svs", d.join("dangling.svs")).unwrap();
        vec![
            ("loop-a.svs", &["unsupported", "not-found", "io"]),
            ("dangling.svs", &["not-found"]),
        ]
    }
    #[cfg(not(unix))]
    {
        let _ = d;
        Vec::new()
    }
}

/// The peak RSS of the largest child process waited for so far, KiB.
fn children_peak_rss_kib() -> u64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    usage.ru_maxrss.max(0) as u64
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
            let started = std::time::Instant::now();
            let o = c.arg(&file).output().unwrap();
            let took = started.elapsed();
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            // Bounded: the largest child so far (RUSAGE_CHILDREN's maximum) and this one's time.
            let peak_mib = children_peak_rss_kib() / 1024;
            assert!(peak_mib < 3072, "{args:?} {name}: peak RSS {peak_mib} MiB");
            assert!(
                took.as_secs() < 120,
                "{args:?} {name}: {took:?} (debug build)"
            );
            // libtiff's own messages do not reach the terminal ahead of ours.
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(
                !stderr.lines().any(|l| l.starts_with("TIFF")),
                "{args:?} {name}: library noise on stderr\n{stderr}"
            );
            let code = o.status.code();
            assert!(
                code == Some(0) || code == Some(1),
                "{args:?} {name}: exit {:?} (a panic is 101, a signal none)\n{text}",
                o.status
            );
            assert!(!text.contains("panicked"), "{args:?} {name}\n{text}");
            let in_json = serde_json::to_string(name).unwrap();
            assert!(
                text.contains(name) || text.contains(in_json.trim_matches('"')),
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
