//! Black-box tests of the `stack` binary (contract §1-§5): each runs the real
//! executable against local origin folders generated in tempdirs. The themes live
//! in `tests/cli/` so that they build into one test binary.

#![allow(clippy::disallowed_methods)] // fixtures edit, corrupt and delete files of a pulled stack directly

#[path = "cli/support.rs"]
mod support;

#[path = "support/forge.rs"]
mod forge;

#[path = "cli/manifest.rs"]
mod manifest;

#[path = "cli/faults.rs"]
mod faults;

#[path = "cli/verify.rs"]
mod verify;

#[path = "cli/links.rs"]
mod links;

#[path = "cli/lock.rs"]
mod lock;

#[path = "cli/journal.rs"]
mod journal;

#[path = "cli/shape.rs"]
mod shape;

#[path = "cli/obstacles.rs"]
mod obstacles;

#[path = "cli/noop.rs"]
mod noop;

#[path = "cli/place.rs"]
mod place;

#[path = "cli/users_bytes.rs"]
mod users_bytes;
