//! `stack`: a crash-safe sync engine that keeps a local data stack identical to a
//! server manifest. See ARCHITECTURE.md for the map; contract §6 for this API.

#![forbid(unsafe_op_in_unsafe_fn)]
#![deny(unused_must_use)]

pub mod error;
pub mod fs;
pub mod journal;
pub mod layout;
pub mod reconcile;
pub mod replay;

pub use error::{Error, Result};
