//! The journal's on-disk format under stress: round trips of arbitrary histories,
//! truncation at every byte, single-byte damage at every byte, hostile lengths,
//! version and corruption refusals, compaction, and I/O errors.
//!
//! Every exhaustive test states the exact outcome expected at each byte position,
//! derived from where the frames of the file start and end. The themes live in
//! `tests/journal_format/`, built into this one test binary.

#![allow(clippy::disallowed_methods)] // fixtures corrupt and truncate journal files directly

#[path = "journal_format/support.rs"]
mod support;

#[path = "support/forge.rs"]
mod forge;

#[path = "journal_format/round_trip.rs"]
mod round_trip;

#[path = "journal_format/damage.rs"]
mod damage;

#[path = "journal_format/refusals.rs"]
mod refusals;

#[path = "journal_format/writer.rs"]
mod writer;

#[path = "journal_format/unsafe_records.rs"]
mod unsafe_records;
