#![no_main]
//! See histolens::fuzzing::checkpoint.

libfuzzer_sys::fuzz_target!(|data: &[u8]| histolens::fuzzing::checkpoint(data));
