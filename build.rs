//! Lists the backbone modules in `src/nn/architectures/` for the registry (`src/nn/architectures.rs`):
//! a new architecture is a new file there, and no existing file changes.

use std::fmt::Write;
use std::path::Path;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/nn/architectures");
    println!("cargo::rerun-if-changed={}", dir.display());
    let mut modules: Vec<String> = std::fs::read_dir(&dir)
        .expect("src/nn/architectures")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_string()))
        .collect();
    modules.sort();
    let mut out = String::new();
    for m in &modules {
        assert!(
            m.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{m}.rs: an architecture file's name must be a Rust module name"
        );
        let path = dir.join(format!("{m}.rs"));
        writeln!(
            out,
            "#[path = {:?}]\npub mod {m};",
            path.display().to_string()
        )
        .unwrap();
    }
    writeln!(
        out,
        "/// Every architecture module's `ARCHITECTURES`, in file-name order.\nstatic REGISTERED: &[&[Arch]] = &[{}];",
        modules
            .iter()
            .map(|m| format!("{m}::ARCHITECTURES"))
            .collect::<Vec<_>>()
            .join(", ")
    )
    .unwrap();
    let out_dir = std::env::var("OUT_DIR").expect("OUT_DIR");
    std::fs::write(Path::new(&out_dir).join("architectures.rs"), out)
        .expect("writing the registry");
}
