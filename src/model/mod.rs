//! The model: the vocabulary every layer shares — slots and link modes (`slot`), the
//! state value with its entries, md5 sums and stat fingerprints (`state`). Pure
//! data and its serde, no I/O.
//!
//! Invariant kept: nothing here reads or writes the disk or imports from a layer
//! above (`tests/architecture.rs`); `layout` turns these names into paths, the
//! journal encodes them, `replay` reads and writes the state file.

pub mod slot;
pub mod state;
