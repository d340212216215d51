//! OpenSlide and snapshot sources on the real files in ../shared/data (skipped when absent) and on the
//! bundled sample.

mod common;

use histolens::slide::{MppSource, Slide, SourceKind, resize_area};

#[test]
fn bundled_sample_metadata() {
    let s = Slide::open(common::sample_slide()).expect("the bundled sample opens");
    let info = s.info();
    assert_eq!(
        info.source,
        SourceKind::WholeSlide {
            vendor: "aperio".into()
        }
    );
    assert_eq!(info.dimensions(), (2220, 2967));
    assert_eq!(info.levels.len(), 1);
    let mpp = info.mpp.expect("CMU-1 has openslide.mpp-x");
    assert_eq!(mpp.source, MppSource::OpenSlide);
    assert!((mpp.x - 0.499).abs() < 1e-9);
    assert_eq!(info.objective_power, Some(20.0));
    let names: Vec<&str> = info.associated.iter().map(|a| a.name.as_str()).collect();
    for n in ["label", "macro", "thumbnail"] {
        assert!(
            names.contains(&n),
            "associated image {n} missing from {names:?}"
        );
        let img = s.associated_image(n).unwrap();
        assert!(img.width() > 10 && img.height() > 10);
    }
    assert!(s.associated_image("nonexistent").is_err());
}

#[test]
fn openslide_pixels_are_unpremultiplied_rgb_tissue() {
    let s = Slide::open(common::sample_slide()).unwrap();
    let r = s.read_region(0, 1000, 1000, 64, 64).unwrap();
    assert!(
        r.pixels().all(|p| p.0[3] == 255),
        "inside the scan every pixel is opaque"
    );
    // H&E is pink/purple: red dominates blue's complement, and the image is not grey.
    let (mut rs, mut gs) = (0u64, 0u64);
    for p in r.pixels() {
        rs += u64::from(p.0[0]);
        gs += u64::from(p.0[1]);
    }
    assert!(
        rs > gs,
        "eosin-stained tissue has more red than green (channels in RGB order)"
    );
    // Beyond the slide: transparent.
    let out = s.read_region(0, 2210, 2960, 20, 20).unwrap();
    assert_eq!(out.get_pixel(0, 0).0[3], 255);
    assert_eq!(out.get_pixel(19, 19).0[3], 0);
}

#[test]
fn every_shared_slide() {
    let Some(data) = common::shared_data("every_shared_slide") else {
        return;
    };
    let dir = data.join("slides");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let s = Slide::open(&p).unwrap_or_else(|e| panic!("{} does not open: {e}", p.display()));
        let info = s.info();
        assert!(
            matches!(info.source, SourceKind::WholeSlide { .. }),
            "{}",
            p.display()
        );
        assert!(!info.levels.is_empty());
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        match name.as_str() {
            "CMU-1-Small-Region.svs" => {
                assert_eq!(info.levels.len(), 1);
                assert!((info.mpp.unwrap().x - 0.499).abs() < 1e-9);
            }
            "CMU-1-Small-Region-pyramid.svs" => {
                assert_eq!(info.levels.len(), 5);
                assert_eq!(info.mpp.unwrap().source, MppSource::OpenSlide);
                assert!((info.mpp.unwrap().x - 0.499).abs() < 1e-9);
            }
            "CMU-1-Small-Region-pyramid-generic.tiff" => {
                assert_eq!(info.levels.len(), 5);
                let m = info.mpp.expect("µm/px from tiff.XResolution");
                assert_eq!(m.source, MppSource::TiffResolution);
                assert!((m.x - 0.499).abs() < 1e-3, "{}", m.x);
            }
            "tcga-cr-7395-01a-01-ts1.svs" => {
                assert_eq!(info.levels.len(), 2);
                assert_eq!(info.dimensions(), (4443, 3567));
                assert!(
                    info.mpp.is_none(),
                    "the TCGA slide has no µm/px in its metadata"
                );
                assert!(info.levels[1].downsample > 2.0 && info.levels[1].downsample < 2.001);
            }
            other => panic!("unexpected slide {other}: update this test"),
        }
        if name == "CMU-1-Small-Region.svs" || name.starts_with("tcga") {
            assert!(!info.associated.is_empty(), "{name} has associated images");
            for a in &info.associated {
                let img = s.associated_image(&a.name).unwrap();
                assert_eq!((img.width(), img.height()), (a.width, a.height));
            }
        }
        // A region read at level 0 and downsampled matches the same region read at a coarser level.
        // Levels up to 4x are compared tightly; coarser levels of vips-made pyramids are exact
        // power-of-two shrinks while OpenSlide reports downsamples from the level sizes (8.0167 for
        // 8), so their pixels drift by a fraction of a pixel from OpenSlide's coordinate mapping.
        for level in 1..info.levels.len() {
            let d = info.levels[level].downsample;
            if d > 4.1 {
                continue;
            }
            let (lw, lh) = (96u32, 96u32);
            let (x0, y0) = ((40.0 * d).round() as i64, (40.0 * d).round() as i64);
            let coarse = s.read_region(level, x0, y0, lw, lh).unwrap();
            let fine_w = (f64::from(lw) * d).round() as u32;
            let fine_h = (f64::from(lh) * d).round() as u32;
            let fine = s.read_region(0, x0, y0, fine_w, fine_h).unwrap();
            let down = resize_area(&fine, lw, lh);
            let diff = common::mean_abs_diff(&coarse, &down);
            assert!(
                diff < 2.0,
                "{name}: level {level} differs from downsampled level 0 by {diff:.2}"
            );
        }
        n += 1;
    }
    assert!(
        n >= 4,
        "expected the four slides of ../shared/data/slides, found {n}"
    );
}

#[test]
fn shared_snapshots_and_embedded_pixel_sizes() {
    let Some(data) = common::shared_data("shared_snapshots_and_embedded_pixel_sizes") else {
        return;
    };
    let km = data.join("known-mpp");
    for (file, mpp) in [
        (
            "cryonuseg/TCGA-DE-A4MA-01A-01-TSA.F006C5F1-9982-464E-BE5C-90ED09805AC8.tif",
            0.2480,
        ),
        (
            "cryonuseg/TCGA-S4-A8RO-01A-01-TS1.0FD87A60-9FC1-48B4-8972-5905265EC62E.tif",
            0.2525,
        ),
    ] {
        let s = Slide::open(km.join(file)).unwrap();
        let m = s.info().mpp.expect("ImageJ calibration is read");
        assert_eq!(m.source, MppSource::TiffResolution);
        assert!((m.x - mpp).abs() < 1e-3, "{file}: {} vs {mpp}", m.x);
    }
    // Kather tiles carry a 72 dpi default: not a microscope calibration.
    let k = Slide::open(km.join("kather-nct-crc-he-100k/TUM-AACHEHDV.tif")).unwrap();
    assert!(matches!(k.info().source, SourceKind::Snapshot { .. }));
    assert_eq!(k.info().dimensions(), (224, 224));
    assert!(k.info().mpp.is_none());
    for f in [
        "images/tiatoolbox-target-he.png",
        "images/stardist-he.jpg",
        "images/skimage-ihc.png",
    ] {
        let s = Slide::open(data.join(f)).unwrap();
        let (w, h) = s.info().dimensions();
        let px = s.read_region(0, 0, 0, w as u32, h as u32).unwrap();
        assert!(
            px.pixels().any(|p| p.0[0] != p.0[2]),
            "{f} decodes to colour pixels"
        );
    }
    let j = Slide::open(km.join("consep-jpeg-patches/test_1_000.jpg")).unwrap();
    assert_eq!(j.info().dimensions(), (256, 256));
}

#[test]
fn thumbnail_of_pyramid_matches_aspect() {
    let s = Slide::open(common::sample_slide()).unwrap();
    let t = s.thumbnail(256).unwrap();
    assert_eq!(t.height(), 256);
    assert_eq!(t.width(), (2220.0f64 * 256.0 / 2967.0).round() as u32);
    assert!(t.pixels().filter(|p| p.0[3] == 255).count() > (t.width() * t.height() / 2) as usize);
}

/// A JPEG-compressed YCbCr TIFF with OME-XML (the InstanSeg TMA core, as QuPath exports): the `image`
/// crate refuses its colour type, the `tiff` crate's decoder reads it, and its pixel size comes from
/// the OME-XML, not from the resolution tags.
#[test]
fn ycbcr_ome_tiff_opens_with_its_ome_pixel_size() {
    let Some(data) = common::shared_data("ycbcr_ome_tiff_opens_with_its_ome_pixel_size") else {
        return;
    };
    let path = data.join("known-mpp/instanseg-he-example/HE_example.tif");
    let s = Slide::open(&path).expect("the YCbCr TIFF opens");
    assert_eq!(s.info().dimensions(), (1380, 1484));
    let mpp = s.info().mpp.expect("OME-XML PhysicalSizeX");
    assert_eq!(mpp.source, MppSource::OmeXml);
    assert!((mpp.x - 0.50008).abs() < 1e-4, "{mpp:?}");
    // Converted to RGB: H&E tissue is pink-purple (red and blue above green), not YCbCr's greens.
    let r = s.read_region(0, 600, 600, 200, 200).unwrap();
    let mean = |c: usize| r.pixels().map(|p| f64::from(p.0[c])).sum::<f64>() / 40_000.0;
    assert!(
        mean(0) > mean(1) && mean(2) > mean(1),
        "{} {} {}",
        mean(0),
        mean(1),
        mean(2)
    );
}

/// A 200000² single-level tiled TIFF: its thumbnail is sampled sparsely, in bounded time, and
/// shows the tissue's colour.
#[test]
fn a_gigapixel_slide_without_a_pyramid_gets_a_thumbnail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-pyramid.tif");
    common::huge_tiled_tiff(&path, 200_000);
    let slide = histolens::slide::Slide::open(&path).unwrap();
    assert_eq!(slide.info().levels.len(), 1);
    assert_eq!(slide.info().dimensions(), (200_000, 200_000));
    let thumb = slide.thumbnail(512).unwrap();
    assert_eq!(thumb.dimensions(), (512, 512));
    assert_eq!(thumb.get_pixel(300, 200).0, [230, 160, 200, 255]);
}

/// Strip-organised TIFFs as research datasets ship their patches (uncompressed RGB in one strip,
/// XResolution 1/1 with no unit), classic and BigTIFF, open as snapshots without a pixel size.
#[test]
fn strip_tiffs_classic_and_big_open() {
    let dir = tempfile::tempdir().unwrap();
    for big in [false, true] {
        let path = dir.path().join(format!("patch-{big}.tif"));
        let img = common::featureless_tissue(300);
        let mut bytes = Vec::new();
        if big {
            let mut enc =
                tiff::encoder::TiffEncoder::new_big(std::io::Cursor::new(&mut bytes)).unwrap();
            enc.write_image::<tiff::encoder::colortype::RGB8>(300, 300, img.as_raw())
                .unwrap();
        } else {
            let mut enc =
                tiff::encoder::TiffEncoder::new(std::io::Cursor::new(&mut bytes)).unwrap();
            enc.write_image::<tiff::encoder::colortype::RGB8>(300, 300, img.as_raw())
                .unwrap();
        }
        std::fs::write(&path, &bytes).unwrap();
        let slide =
            histolens::slide::Slide::open(&path).unwrap_or_else(|e| panic!("big={big}: {e}"));
        assert_eq!(slide.info().dimensions(), (300, 300));
        assert!(
            slide.info().mpp.is_none(),
            "1/1 without a unit is no pixel size"
        );
        let px = slide.read_region(0, 10, 10, 1, 1).unwrap();
        let want = img.get_pixel(10, 10).0;
        assert_eq!(&px.get_pixel(0, 0).0[..3], &want[..]);
    }
}
