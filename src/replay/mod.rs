//! Replay: the journal projected into the state, and the state file.
//!
//! Owns: `sync_state.json` read and replaced (`state`), and folding the journal
//! into it (`project`). Invariant kept: the state file is derived from the journal
//! alone. Recovery, which rolls a transaction back or forward with the applier, is
//! `reconcile::recover`.

pub mod project;
pub mod state;
