//! Every committed fuzz input (the seed corpora in fuzz/corpus/ and every input a fuzzer ever found a
//! problem with, in fuzz/regressions/) goes through the same entry point as its `cargo fuzz` target
//! (histolens::fuzzing), on stable Rust: none may panic. Files named after a target's folder select
//! it: fuzz/regressions/slide/crash-… runs through `fuzzing::slide`.

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 5] = [
    ("snapshot", histolens::fuzzing::snapshot),
    ("slide", histolens::fuzzing::slide),
    ("label_manifest", histolens::fuzzing::label_manifest),
    ("checkpoint", histolens::fuzzing::checkpoint),
    ("run_config", histolens::fuzzing::run_config),
];

fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

// One test function in this binary, so that the environment is set before any other thread reads it.
#[test]
fn committed_fuzz_inputs_return_without_panicking() {
    // SAFETY: this test binary runs this one test; no other thread reads the environment yet.
    unsafe { std::env::set_var("HISTOLENS_MAX_DECODE_MB", "256") };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut seen = 0;
    for (name, target) in TARGETS {
        let seeds = inputs(&root.join("corpus").join(name));
        assert!(!seeds.is_empty(), "fuzz/corpus/{name} has no seeds");
        for file in seeds
            .iter()
            .chain(&inputs(&root.join("regressions").join(name)))
        {
            let bytes = std::fs::read(file).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&bytes));
            assert!(outcome.is_ok(), "{name} panicked on {}", file.display());
            seen += 1;
        }
    }
    eprintln!("{seen} fuzz inputs replayed");
    seeds_are_valid_inputs(&root.join("corpus"));
}

/// The seeds are well-formed inputs: each opens (so that the fuzzers start from files that reach deep
/// into the readers, not from ones refused at the first byte).
fn seeds_are_valid_inputs(root: &Path) {
    let dir = tempfile::tempdir().unwrap();
    for (target, exts) in [
        ("snapshot", &["png", "jpg", "tif", "bmp", "webp"][..]),
        ("slide", &["svs", "tiff", "ndpi"][..]),
    ] {
        for file in inputs(&root.join(target)) {
            let bytes = std::fs::read(&file).unwrap();
            let ext = exts[usize::from(bytes[0]) % exts.len()];
            let path = dir.path().join(format!("seed.{ext}"));
            std::fs::write(&path, &bytes[1..]).unwrap();
            let slide = histolens::slide::Slide::open(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if target == "slide" {
                assert!(
                    slide.info().is_whole_slide(),
                    "{} opens through OpenSlide",
                    file.display()
                );
            }
        }
    }
    for file in inputs(&root.join("checkpoint")) {
        let bytes = std::fs::read(&file).unwrap();
        histolens::nn::checkpoint::read_meta(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
}
