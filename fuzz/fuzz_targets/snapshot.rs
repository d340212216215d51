#![no_main]
//! See histolens::fuzzing::snapshot.

libfuzzer_sys::fuzz_target!(|data: &[u8]| histolens::fuzzing::snapshot(data));
