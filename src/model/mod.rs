//! The model: the vocabulary every layer shares — the validated names and md5s
//! paths are built from (`name`), slots and link modes (`slot`), the state value
//! with its entries and stat fingerprints (`state`). Pure data and its serde, no I/O.
//!
//! Invariant kept: nothing here reads or writes the disk or imports from a layer
//! above (`tests/architecture.rs`); `layout` turns these names into paths, the
//! journal encodes them, `replay` reads and writes the state file.

pub mod name;
pub mod slot;
pub mod state;
