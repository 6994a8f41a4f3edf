//! Reconcile: from a manifest to an applied stack.
//!
//! Owns: the manifest model and its validation (`manifest`), origins (`origin`, `http`), the
//! pure planner (`plan`), staging downloads (`stage`), folders built out of sight
//! (`place`), the room a pull needs on the disk (`room`), applying a plan (`apply`)
//! and undoing it past its commit point (`undo`), pulling (`pull`) and recovery,
//! which rolls an interrupted pull back or forward with the applier (`recover`).
//!
//! Architecture invariant: `plan` does no I/O; every mutation in `stage` and `apply`
//! goes through `crate::fs::Fs` and, for `apply`, is in the journal first.

pub mod apply;
pub mod congestion;
pub mod foreign;
pub mod gc;
pub mod heal;
pub mod http;
pub mod manifest;
pub mod netenv;
pub mod origin;
pub mod place;
pub mod plan;
pub mod preconnect;
pub mod pull;
pub mod recover;
pub mod room;
pub mod source;
pub mod stage;
pub mod undo;
