use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};

use super::*;
use crate::data::manifest::{MagnificationRecord, Manifest};
use crate::data::pairs::{self, PairConfig, PairGeometry, PairRecord};

/// Writes a `side` x `side` PNG whose colour depends on `seed` (with a gradient, so it is not flat).
fn write_image(path: &Path, side: u32, seed: u8) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_fn(side, side, |x, y| {
        Rgb([
            seed.wrapping_mul(40),
            (x % 256) as u8,
            ((y + u32::from(seed)) % 256) as u8,
        ])
    })
    .save(path)
    .unwrap();
    path.to_path_buf()
}

fn class(name: &str) -> Option<Label> {
    Some(Label::Class(name.into()))
}

fn magnification(m: f64, mpp: Option<f64>) -> Option<Label> {
    Some(Label::Magnification {
        magnification: m,
        mpp,
    })
}

fn index_of(set: &LabelSet, path: &Path) -> usize {
    set.entries()
        .iter()
        .position(|e| e.path == path)
        .unwrap_or_else(|| panic!("{} is not in the set", path.display()))
}

fn temporaries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect()
}

#[test]
fn save_and_reload_keep_labels_groups_splits_and_paths() {
    let project = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let inside = write_image(&project.path().join("images/a.png"), 16, 1);
    let far = write_image(&outside.path().join("b.png"), 16, 2);
    let third = write_image(&project.path().join("images/c.png"), 16, 3);
    let manifest = project.path().join("labels.csv");
    let mut set = LabelSet::open_or_create(&manifest).unwrap();
    assert!(manifest.exists(), "a new project is written at once");
    set.add_paths(&[inside.clone(), far.clone(), third.clone()])
        .unwrap();
    let (a, b, c) = (
        index_of(&set, &inside),
        index_of(&set, &far),
        index_of(&set, &third),
    );
    set.assign(&[a], class("tumour")).unwrap();
    set.assign(&[b], magnification(40.0, Some(0.25))).unwrap();
    set.assign(&[c], magnification(20.0, None)).unwrap();
    set.set_group(&[a, c], "patient 1, slide \"x\"").unwrap();
    set.set_split(&[a], Some(Split::Val)).unwrap();
    set.set_split(&[b], Some(Split::Test)).unwrap();
    set.add_class("stroma").unwrap();

    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.starts_with("path,class,magnification,mpp,group,split\n"));
    assert!(text.contains("\nimages/a.png,tumour,,,"), "{text}");
    assert!(
        text.contains(&format!("\n{},,40,0.25,", far.display())),
        "{text}"
    );

    let back = LabelSet::open_or_create(&manifest).unwrap();
    assert_eq!(back.entries(), set.entries());
    assert_eq!(back.classes(), ["tumour", "stroma"]);
    assert_eq!(
        back.entries()[c].label.as_ref().and_then(Label::mpp),
        Some(0.5)
    );
    assert_eq!(back.entries()[a].group, "patient 1, slide \"x\"");
    assert_eq!(
        back.entries()[b].group,
        outside.path().file_name().unwrap().to_string_lossy()
    );
}

#[test]
fn classes_without_images_survive_a_reload_and_a_lost_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("p.csv");
    let img = write_image(&dir.path().join("x.png"), 8, 0);
    let mut set = LabelSet::open_or_create(&manifest).unwrap();
    assert!(set.add_class("necrosis").unwrap());
    assert!(!set.add_class("necrosis").unwrap());
    set.add_paths(&[img]).unwrap();
    set.assign(&[0], class("tumour")).unwrap();
    let back = LabelSet::open_or_create(&manifest).unwrap();
    assert_eq!(back.classes(), ["necrosis", "tumour"]);
    std::fs::remove_file(dir.path().join("p.classes.json")).unwrap();
    let back = LabelSet::open_or_create(&manifest).unwrap();
    assert_eq!(
        back.classes(),
        ["tumour"],
        "classes still come from the images"
    );
}

#[test]
fn a_crash_before_the_rename_keeps_the_previous_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("labels.csv");
    let img = write_image(&dir.path().join("a.png"), 8, 0);
    let mut set = LabelSet::open_or_create(&manifest).unwrap();
    set.add_paths(&[img]).unwrap();
    set.assign(&[0], class("tumour")).unwrap();
    let before = std::fs::read(&manifest).unwrap();
    let entries = set.entries().to_vec();

    set.before_rename = |_| Err(std::io::Error::other("simulated crash"));
    let err = set.assign(&[0], class("stroma")).unwrap_err();
    assert!(matches!(err, LabelError::Write { .. }), "{err}");
    assert_eq!(set.entries(), entries, "the failed edit is rolled back");
    assert_eq!(set.classes(), ["tumour"]);
    assert!(set.undo.len() == 2 && !set.can_redo());
    assert!(set.undo().is_err(), "undo cannot save either");
    assert_eq!(set.entries(), entries);
    assert_eq!(std::fs::read(&manifest).unwrap(), before);
    assert!(
        temporaries(dir.path()).is_empty(),
        "{:?}",
        temporaries(dir.path())
    );
    let back = LabelSet::open_or_create(&manifest).unwrap();
    assert_eq!(back.entries(), entries);

    set.before_rename = no_hook;
    set.assign(&[0], class("stroma")).unwrap();
    let back = LabelSet::open_or_create(&manifest).unwrap();
    assert_eq!(back.entries()[0].label, class("stroma"));
    assert_eq!(back.classes(), ["tumour", "stroma"]);
}

#[test]
fn export_and_import_round_trip_and_missing_files_are_reported() {
    let data = tempfile::tempdir().unwrap();
    let a = write_image(&data.path().join("a.png"), 8, 0);
    let b = write_image(&data.path().join("b.png"), 8, 1);
    let mut set = LabelSet::open_or_create(&data.path().join("labels.csv")).unwrap();
    set.add_paths(&[a.clone(), b.clone()]).unwrap();
    set.assign(&[0], class("tumour")).unwrap();
    set.assign(&[1], magnification(10.0, None)).unwrap();
    set.set_split(&[0, 1], Some(Split::Train)).unwrap();
    let exported = data.path().join("export/all.csv");
    set.export(&exported).unwrap();
    let text = std::fs::read_to_string(&exported).unwrap();
    assert!(
        text.contains(&a.display().to_string()),
        "absolute paths: {text}"
    );

    let other = tempfile::tempdir().unwrap();
    let mut copy = LabelSet::open_or_create(&other.path().join("labels.csv")).unwrap();
    let report = copy.import(&exported).unwrap();
    assert_eq!((report.added, report.updated, report.unchanged), (2, 0, 0));
    assert!(report.missing.is_empty());
    assert_eq!(copy.entries(), set.entries());
    assert_eq!(copy.classes(), ["tumour"]);

    // Importing again changes nothing; a changed label is updated; one undo reverts the import.
    assert_eq!(copy.import(&exported).unwrap().unchanged, 2);
    set.assign(&[0], class("stroma")).unwrap();
    set.export(&exported).unwrap();
    std::fs::remove_file(&b).unwrap();
    let report = copy.import(&exported).unwrap();
    assert_eq!((report.added, report.updated, report.unchanged), (0, 1, 1));
    assert_eq!(report.missing, vec![b.clone()]);
    assert_eq!(copy.entries()[0].label, class("stroma"));
    assert_eq!(copy.missing(), vec![1]);
    assert_eq!(set.missing(), vec![1]);
    assert!(copy.undo().unwrap());
    assert_eq!(copy.entries()[0].label, class("tumour"));
    let back = LabelSet::open_or_create(copy.manifest_path()).unwrap();
    assert_eq!(back.entries(), copy.entries(), "undo saves too");
}

#[test]
fn class_folders_are_labelled_and_loose_images_get_their_folder_proposed() {
    let dir = tempfile::tempdir().unwrap();
    let tiles = dir.path().join("tiles");
    write_image(&tiles.join("tumour/1.png"), 8, 0);
    write_image(&tiles.join("tumour/2.JPG"), 8, 1);
    write_image(&tiles.join("stroma/patient9/3.png"), 8, 2);
    std::fs::write(tiles.join("stroma/notes.txt"), "not an image").unwrap();
    write_image(&tiles.join("stroma/.hidden.png"), 8, 3);
    let mut set = LabelSet::open_or_create(&dir.path().join("labels.csv")).unwrap();
    let report = set.add_paths(std::slice::from_ref(&tiles)).unwrap();
    assert_eq!(report.added, 3);
    assert_eq!(report.labelled_from_folders, 3);
    assert!(report.proposed.is_empty());
    let summary: Vec<(String, Option<Label>, String)> = set
        .entries()
        .iter()
        .map(|e| {
            let rel = e
                .path
                .strip_prefix(&tiles)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (rel, e.label.clone(), e.group.clone())
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "stroma/patient9/3.png".into(),
                class("stroma"),
                "tiles/stroma/patient9".into()
            ),
            // Straight inside their class folder: each image is its own split unit.
            ("tumour/1.png".into(), class("tumour"), String::new()),
            ("tumour/2.JPG".into(), class("tumour"), String::new()),
        ]
    );
    assert_eq!(set.classes(), ["stroma", "tumour"]);

    // Loose images: unlabelled, the folder's name proposed; a sub-folder named like a known class
    // is labelled with it (whatever its case); nothing already present is added twice.
    let mixed = dir.path().join("batch 7");
    write_image(&mixed.join("x.png"), 8, 4);
    write_image(&mixed.join("y.tif"), 8, 5);
    write_image(&mixed.join("Tumour/z.png"), 8, 6);
    write_image(&mixed.join("other/w.png"), 8, 7);
    std::fs::write(
        mixed.join("slide.svs"),
        b"a slide is added by its extension",
    )
    .unwrap();
    let report = set
        .add_paths(&[mixed.clone(), tiles.join("tumour/1.png")])
        .unwrap();
    assert_eq!((report.added, report.already_present), (5, 1));
    assert_eq!(report.labelled_from_folders, 1);
    assert_eq!(report.proposed.len(), 1);
    let proposal = &report.proposed[0];
    assert_eq!(
        (proposal.folder.as_path(), proposal.name.as_str()),
        (mixed.as_path(), "batch 7")
    );
    let proposed: Vec<&Path> = proposal
        .entries
        .iter()
        .map(|&i| set.entries()[i].path.as_path())
        .collect();
    assert_eq!(
        proposed,
        [
            mixed.join("slide.svs"),
            mixed.join("x.png"),
            mixed.join("y.tif")
        ]
    );
    assert!(
        proposal
            .entries
            .iter()
            .all(|&i| set.entries()[i].label.is_none())
    );
    assert_eq!(
        set.entries()[index_of(&set, &mixed.join("Tumour/z.png"))].label,
        class("tumour")
    );
    assert_eq!(
        set.entries()[index_of(&set, &mixed.join("other/w.png"))].label,
        None
    );
    assert_eq!(
        set.entries()[index_of(&set, &mixed.join("x.png"))].group,
        "batch 7"
    );
    assert!(matches!(
        set.add_paths(&[dir.path().join("nowhere")]),
        Err(LabelError::NotFound(_))
    ));
}

#[test]
fn undo_and_redo_of_add_assign_and_remove() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("labels.csv");
    let files: Vec<PathBuf> = (0..4)
        .map(|i| write_image(&dir.path().join(format!("img/{i}.png")), 8, i))
        .collect();
    let mut set = LabelSet::open_or_create(&manifest).unwrap();
    assert!(!set.can_undo() && !set.undo().unwrap());
    set.add_paths(&[dir.path().join("img")]).unwrap();
    assert_eq!(set.entries().len(), 4);
    set.assign(&[1, 3], class("tumour")).unwrap();
    let labelled = set.entries().to_vec();
    set.remove(&[3, 0]).unwrap();
    assert_eq!(
        set.entries()
            .iter()
            .map(|e| e.path.clone())
            .collect::<Vec<_>>(),
        [files[1].clone(), files[2].clone()]
    );
    assert!(set.undo().unwrap());
    assert_eq!(
        set.entries(),
        labelled,
        "removed entries come back where they were"
    );
    assert!(set.undo().unwrap());
    assert!(set.entries().iter().all(|e| e.label.is_none()));
    assert!(
        set.classes().is_empty(),
        "the class came with the edit and goes with it"
    );
    assert!(set.redo().unwrap());
    assert_eq!(set.entries(), labelled);
    assert_eq!(set.classes(), ["tumour"]);
    assert!(set.undo().unwrap() && set.undo().unwrap());
    assert!(set.entries().is_empty() && !set.can_undo());
    assert_eq!(
        LabelSet::open_or_create(&manifest).unwrap().entries().len(),
        0
    );
    assert!(set.redo().unwrap());
    assert_eq!(set.entries().len(), 4);
    // A new edit clears what could be redone.
    set.set_group(&[0], "g").unwrap();
    assert!(!set.can_redo() && !set.redo().unwrap());
    assert!(matches!(
        set.assign(&[9], class("x")),
        Err(LabelError::NoSuchEntry { index: 9, len: 4 })
    ));
    assert!(matches!(
        set.assign(&[0], magnification(-1.0, None)),
        Err(LabelError::InvalidLabel(_))
    ));
    assert!(matches!(
        set.assign(&[0], class("  ")),
        Err(LabelError::InvalidLabel(_))
    ));
    let back = LabelSet::open_or_create(&manifest).unwrap();
    assert_eq!(back.entries(), set.entries());
}

/// A project of `groups` groups of 3 images (not written: splits only look at the entries).
fn grouped(groups: usize) -> (tempfile::TempDir, LabelSet) {
    let dir = tempfile::tempdir().unwrap();
    let mut set = LabelSet::open_or_create(&dir.path().join("labels.csv")).unwrap();
    set.entries = (0..groups * 3)
        .map(|i| LabelEntry {
            path: dir.path().join(format!("{i}.png")),
            label: if i % 7 == 6 {
                None
            } else if (i / 3) % 2 == 0 {
                class("a")
            } else {
                magnification(10.0 * (1 + i % 2) as f64, None)
            },
            group: format!("group {}", i / 3),
            split: None,
        })
        .collect();
    (dir, set)
}

#[test]
fn splits_keep_groups_whole_and_are_deterministic() {
    for groups in [1, 2, 3, 5, 12, 40] {
        for seed in 0..8 {
            let (_dir, mut set) = grouped(groups);
            set.assign_splits([0.6, 0.2, 0.2], seed).unwrap();
            let mut side: std::collections::HashMap<String, Option<Split>> = Default::default();
            for e in set.entries() {
                let s = *side.entry(e.group.clone()).or_insert(e.split);
                assert_eq!(s, e.split, "group {} on two sides (seed {seed})", e.group);
                assert!(e.split.is_some());
            }
            if groups >= 3 {
                for s in Split::ALL {
                    assert!(
                        side.values().any(|&v| v == Some(s)),
                        "no {s:?} among {groups} groups (seed {seed})"
                    );
                }
            }
            let (_again_dir, mut again) = grouped(groups);
            again.assign_splits([0.6, 0.2, 0.2], seed).unwrap();
            let splits = |s: &LabelSet| s.entries().iter().map(|e| e.split).collect::<Vec<_>>();
            assert_eq!(splits(&set), splits(&again), "seed {seed} deals the same");
        }
    }
    let (_dir, mut set) = grouped(40);
    set.assign_splits([0.6, 0.2, 0.2], 1).unwrap();
    let first: Vec<_> = set.entries().iter().map(|e| e.split).collect();
    set.assign_splits([0.6, 0.2, 0.2], 2).unwrap();
    let second: Vec<_> = set.entries().iter().map(|e| e.split).collect();
    assert_ne!(first, second, "another seed deals otherwise");
    assert!(set.undo().unwrap());
    assert_eq!(
        set.entries().iter().map(|e| e.split).collect::<Vec<_>>(),
        first
    );
    assert!(matches!(
        set.assign_splits([0.0, 0.0, 0.0], 0),
        Err(LabelError::InvalidFractions(_))
    ));
    assert!(set.assign_splits([1.0, f64::NAN, 0.0], 0).is_err());
}

#[test]
fn a_group_without_labels_is_left_unassigned() {
    let (_dir, mut set) = grouped(4);
    for e in &mut set.entries {
        if e.group == "group 2" {
            e.label = None;
        }
    }
    set.assign_splits([1.0, 0.0, 0.0], 0).unwrap();
    for e in set.entries() {
        let expected = (e.group != "group 2").then_some(Split::Train);
        assert_eq!(e.split, expected, "{}", e.group);
    }
}

#[test]
fn magnification_manifest_loads_back_and_trains() {
    use crate::magnification::train::{Start, TrainConfig, train};
    use crate::nn::hagnifinder::Target;
    let dir = tempfile::tempdir().unwrap();
    let mut set = LabelSet::open_or_create(&dir.path().join("labels.csv")).unwrap();
    let mut files = Vec::new();
    for (i, m) in [10.0, 20.0, 40.0, 20.0, 10.0, 40.0].into_iter().enumerate() {
        let f = write_image(&dir.path().join(format!("x{m}/{i}.png")), 48, i as u8);
        files.push((f, m));
    }
    let unlabelled = write_image(&dir.path().join("u.png"), 48, 9);
    set.add_paths(&[dir.path().to_path_buf()]).unwrap();
    assert!(matches!(
        set.to_magnification_manifest(&dir.path().join("m.csv")),
        Err(LabelError::NothingToExport(_))
    ));
    for (f, m) in &files {
        let i = index_of(&set, f);
        set.assign(&[i], magnification(*m, (*m == 40.0).then_some(0.26)))
            .unwrap();
    }
    set.assign(&[index_of(&set, &unlabelled)], class("ignored"))
        .unwrap();
    set.assign_splits([0.5, 0.5, 0.0], 3).unwrap();
    let out = dir.path().join("datasets/magnification.csv");
    let made = set.to_magnification_manifest(&out).unwrap();
    let loaded: Manifest<MagnificationRecord> = Manifest::load(&out).unwrap();
    assert_eq!(loaded.records, made.records);
    assert_eq!(loaded.records.len(), 6);
    loaded.check_disjoint().unwrap();
    for r in &loaded.records {
        assert!(loaded.resolve(r).is_file(), "{}", r.path);
        assert_eq!(r.region, "0,0,48,48");
        let expected_mpp = if r.magnification == 40.0 {
            0.26
        } else {
            10.0 / r.magnification
        };
        assert_eq!(r.mpp, expected_mpp);
    }
    assert!(!loaded.split(Split::Train).is_empty());

    let mut cfg = TrainConfig::new(crate::nn::Arch::RESNET18);
    cfg.input_size = 32;
    cfg.batch = 4;
    cfg.epochs_asm = 1;
    cfg.epochs_constant = 1;
    cfg.steps_per_epoch = Some(1);
    cfg.target = Target::Log2;
    cfg.augment = crate::data::augment::AugmentConfig::none();
    cfg.start = Start::Random;
    let run = tempfile::tempdir().unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let outcome = train(
        &out,
        &cfg,
        run.path(),
        &candle_core::Device::Cpu,
        &stop,
        |_| {},
    )
    .unwrap();
    assert_eq!(outcome.epochs_done, 2);
}

#[test]
fn dmsl_pairs_load_back() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    for i in 0..3u8 {
        write_image(&images.join(format!("tumour/t{i}.png")), 256, i);
        write_image(&images.join(format!("stroma/s{i}.png")), 256, 100 + i);
    }
    let mut set = LabelSet::open_or_create(&dir.path().join("labels.csv")).unwrap();
    set.add_paths(std::slice::from_ref(&images)).unwrap();
    let cfg = PairConfig {
        geometry: PairGeometry {
            high_magnification: 20.0,
            low_magnification: 10.0,
            field_um: 64.0,
        },
        seed: 5,
        ..Default::default()
    };
    let out = dir.path().join("pairs");
    // Each image its own group, so that every class has groups for all splits.
    for i in 0..set.entries().len() {
        set.set_group(&[i], &format!("g{i}")).unwrap();
    }
    let mut progressed = 0;
    let (made, dataset) = set
        .to_dmsl_pairs(&out, &cfg, 20.0, 1.0, |_| progressed += 1)
        .unwrap();
    assert_eq!(progressed, 6);
    // 256 px at 20x holds 2 x 2 fields of 128 px.
    assert_eq!(made.records.len(), 24);
    let loaded: Manifest<PairRecord> = Manifest::load(&out.join("pairs.csv")).unwrap();
    assert_eq!(loaded.records, made.records);
    loaded.check_disjoint().unwrap();
    let ds = pairs::load_dataset(&out.join("pairs.csv")).unwrap();
    assert_eq!(ds, dataset);
    assert_eq!(ds.classes, ["stroma", "tumour"]);
    let r = &loaded.records[0];
    assert_eq!(
        image::image_dimensions(loaded.resolve_path(&r.high)).unwrap(),
        (128, 128)
    );
    assert_eq!(
        image::image_dimensions(loaded.resolve_path(&r.low)).unwrap(),
        (64, 64)
    );
    // Pairs need upsampling below the high magnification, and two classes.
    assert!(matches!(
        set.to_dmsl_pairs(&out, &cfg, 10.0, 1.0, |_| {}),
        Err(LabelError::Pairs(_))
    ));
    let tumour: Vec<usize> = (0..set.entries().len())
        .filter(|&i| set.entries()[i].label == class("tumour"))
        .collect();
    set.assign(&tumour, None).unwrap();
    assert!(matches!(
        set.to_dmsl_pairs(&out, &cfg, 20.0, 1.0, |_| {}),
        Err(LabelError::NothingToExport(_))
    ));
}

#[test]
fn a_malformed_row_names_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("labels.csv");
    let cases = [
        (
            "a.png,tumour,,,g,train\nb.png,,abc,,g,\n",
            3,
            "magnification `abc`",
        ),
        (
            "a.png,tumour,20,,g,\n",
            2,
            "both a class and a magnification",
        ),
        ("a.png,,,0.5,g,\n", 2, "an mpp without"),
        ("a.png,,,,g,later\n", 2, "split `later`"),
        ("a.png,,,,g,\nb.png,,,\n", 3, "fields"),
        (
            "a.png,,,,,\nx/../a.png,,,,,\na.png,,,,,\n",
            4,
            "first on line 2",
        ),
        (",t,,,,\n", 2, "the path is empty"),
    ];
    for (rows, line, words) in cases {
        std::fs::write(
            &manifest,
            format!("path,class,magnification,mpp,group,split\n{rows}"),
        )
        .unwrap();
        match LabelSet::open_or_create(&manifest) {
            Err(e @ LabelError::Parse { line: l, .. }) => {
                let message = e.to_string();
                assert_eq!(l, line, "{message}");
                assert!(message.contains(words), "{message}");
                assert!(message.contains(&format!("line {line} ")), "{message}");
                assert!(message.contains("labels.csv"), "{message}");
            }
            other => panic!("{rows:?}: {other:?}"),
        }
    }
    std::fs::write(&manifest, "file,label\na.png,x\n").unwrap();
    assert!(matches!(
        LabelSet::open_or_create(&manifest),
        Err(LabelError::Parse { line: 1, .. })
    ));
    // Columns in another order, fewer of them, and a capitalised split are read.
    std::fs::write(&manifest, "split,path,class\nTrain,a.png,tumour\n").unwrap();
    let set = LabelSet::open_or_create(&manifest).unwrap();
    assert_eq!(set.entries()[0].split, Some(Split::Train));
    assert_eq!(set.entries()[0].path, dir.path().join("a.png"));
}

#[test]
fn ten_thousand_entries_save_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("labels.csv");
    let mut set = LabelSet::open_or_create(&manifest).unwrap();
    set.entries = (0..10_000)
        .map(|i| LabelEntry {
            path: dir
                .path()
                .join(format!("slides/patient{}/tile-{i:05}.png", i / 50)),
            label: if i % 2 == 0 {
                class("tumour")
            } else {
                magnification(20.0, None)
            },
            group: format!("patient{}", i / 50),
            split: None,
        })
        .collect();
    let start = std::time::Instant::now();
    set.assign_splits([0.7, 0.15, 0.15], 0).unwrap();
    eprintln!(
        "dealing and saving 10,000 entries: {:?} (debug build)",
        start.elapsed()
    );
    let back = LabelSet::open_or_create(&manifest).unwrap();
    assert_eq!(back.entries(), set.entries());
}
