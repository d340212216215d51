#![no_main]
//! See histolens::fuzzing::label_manifest.

libfuzzer_sys::fuzz_target!(|data: &[u8]| histolens::fuzzing::label_manifest(data));
