#![no_main]
//! See histolens::fuzzing::slide.

libfuzzer_sys::fuzz_target!(|data: &[u8]| histolens::fuzzing::slide(data));
