#![no_main]
//! See histolens::fuzzing::run_config.

libfuzzer_sys::fuzz_target!(|data: &[u8]| histolens::fuzzing::run_config(data));
