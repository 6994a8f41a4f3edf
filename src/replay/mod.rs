//! Replay: the projection of the journal and crash recovery.
//!
//! Owns: `sync_state.json` (`state`), folding the journal into it (`project`) and
//! recovery (`recover`). Invariant kept: the state file is derived from the journal
//! alone; recovery rolls a transaction back before its commit point and forward
//! after it.

pub mod project;
pub mod recover;
pub mod state;
