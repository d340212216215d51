//! The registry of backbones: every file in `src/nn/architectures/` is one architecture module that
//! declares `pub static ARCHITECTURES: &[Arch]` (its [`ArchSpec`]s) and implements [`Backbone`].
//! `build.rs` lists the files, so adding a backbone is adding a file: no existing file changes.
//!
//! [`ArchSpec`]: super::backbone::ArchSpec
//! [`Backbone`]: super::backbone::Backbone

use serde::{Deserialize, Deserializer};

use super::backbone::Arch;

// `pub mod NAME;` for each file, and `REGISTERED`, every module's `ARCHITECTURES` in file order.
include!(concat!(env!("OUT_DIR"), "/architectures.rs"));

impl Arch {
    /// Every architecture of the zoo.
    pub fn all() -> impl Iterator<Item = Arch> {
        REGISTERED.iter().flat_map(|m| m.iter().copied())
    }

    /// The architecture of this name (case-insensitive).
    pub fn parse(s: &str) -> Option<Arch> {
        let s = s.to_ascii_lowercase();
        Arch::all().find(|a| a.name() == s)
    }

    /// The names of the zoo, comma-separated (for messages).
    pub fn names() -> String {
        Arch::all().map(Arch::name).collect::<Vec<_>>().join(", ")
    }
}

impl<'de> Deserialize<'de> for Arch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Arch::parse(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown architecture {name:?} (known: {})",
                Arch::names()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_name_is_unique_and_parses_back() {
        let names: Vec<&str> = Arch::all().map(Arch::name).collect();
        assert!(names.len() >= 4, "{names:?}");
        let unique: std::collections::BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        for a in Arch::all() {
            assert_eq!(Arch::parse(&a.name().to_uppercase()), Some(a));
            let json = serde_json::to_string(&a).unwrap();
            assert_eq!(serde_json::from_str::<Arch>(&json).unwrap(), a);
        }
        assert!(serde_json::from_str::<Arch>("\"vgg-16\"").is_err());
    }
}
