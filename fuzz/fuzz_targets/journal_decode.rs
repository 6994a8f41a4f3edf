//! Arbitrary bytes as a journal file (the first byte picks raw bytes or bytes with
//! every checksum fixed up): `frame::scan` never panics, returns only records whose
//! frames re-encode to the bytes they came from, with contiguous seqs, and
//! `Journal::open` agrees with it. See `tests/fuzz_support/mod.rs`.
#![no_main]

#[path = "../../tests/fuzz_support/mod.rs"]
mod fuzz_support;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fuzz_support::check_journal_input(data);
});
