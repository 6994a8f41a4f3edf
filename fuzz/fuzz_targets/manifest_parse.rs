//! Arbitrary bytes as manifest JSON: parsing and validation never panic, and what
//! validation accepts is made of safe path components only. See
//! `tests/fuzz_support/mod.rs`.
#![no_main]

#[path = "../../tests/fuzz_support/mod.rs"]
mod fuzz_support;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fuzz_support::check_manifest_json(data);
});
