//! Room on the disk: what a pull's writes need, checked before it starts and held
//! before its commit point.
//!
//! Owns: `.stack/reserve`, the estimate of the bytes a transaction writes after its
//! commit point, and the "not enough space" refusal.
//!
//! Invariant kept (issue 15, argued in `DURABILITY.md`, "Persistent faults"):
//! nothing after the commit point needs space the transaction does not already
//! hold. Downloads land in staging before the commit point. What the apply and
//! finish steps still write — copies of references (copy and reflink modes, and a
//! reflink's fallback), bundle copies, the new state file and the journal's last
//! records — is sized here from the plan, and a reserve file of that size is
//! written before the commit point (made durable by the same `syncfs` as the
//! staged files). The apply of the transaction (a pull's, or recovery's roll
//! forward) removes the reserve first, so its writes land in blocks the
//! transaction held a moment before; a rollback releases it the same way.
//!
//! A full disk therefore stops a pull before its commit point, where a failure
//! leaves the old stack: exactly what "all or nothing" needs.

use std::path::Path;

use crate::error::{Error, IoContext, Result};
use crate::fs::{not_found_ok, Fs};
use crate::journal::event::Event;
use crate::layout::{self, Layout};
use crate::reconcile::plan::StageItem;
use crate::replay::state::Strategy;

/// Room for the records, names and blocks a transaction adds besides its data
/// (folders, the scratch and trash entries, block rounding of small files).
const SLACK: u64 = 64 * 1024;

/// What a pull needs, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// Downloads whose size the manifest gave.
    pub download: u64,
    /// Some downloads' sizes are unknown (not counted in `download`).
    pub download_unknown: bool,
    /// Written after the commit point: held by the reserve.
    pub after_commit: u64,
}

impl Needs {
    pub fn total(&self) -> u64 {
        self.download.saturating_add(self.after_commit)
    }
}

/// What the plan `ops` writes after its commit point: copies of references (and
/// clones, whose fallback is a copy), copies of bundles, the state file (its
/// present `state_len` plus each new entry) and the `Committed` record.
/// `size_of(md5, size)` is a downloaded file's size where the plan did not give
/// it; `in_stack(ev)` the size of the shared file a reference copies when that
/// table is already in the stack.
pub fn after_commit(
    ops: &[Event],
    state_len: u64,
    size_of: &dyn Fn(&str, Option<u64>) -> u64,
    in_stack: &dyn Fn(&Event) -> Option<u64>,
) -> u64 {
    let mut bytes = state_len.saturating_add(SLACK);
    let mut rel = String::new();
    for ev in ops {
        rel.clear();
        let data = match ev {
            Event::MakeRef {
                slot,
                name,
                md5,
                size,
                strategy,
                ..
            } => {
                layout::push_ref_rel(&mut rel, crate::journal::event::SlotRef::of(slot), name);
                match strategy {
                    Strategy::Copy | Strategy::Reflink => size
                        .or_else(|| in_stack(ev))
                        .unwrap_or_else(|| size_of(md5, None)),
                    Strategy::Symlink | Strategy::Hardlink => 0,
                }
            }
            Event::PutBundle { slug, md5 } => {
                rel.push_str(&layout::bundle_rel(slug));
                size_of(md5, None)
            }
            Event::PutShared { table_id, .. } => {
                layout::push_shared_rel(&mut rel, table_id);
                0
            }
            _ => continue,
        };
        // Its state entry (three paths at most, an md5, a fingerprint) and its
        // fingerprint in `Committed`.
        let record = 4 * rel.len() as u64 + 512;
        bytes = bytes.saturating_add(data).saturating_add(record);
    }
    bytes
}

/// The downloads' part of [`Needs`].
pub fn download(stage: &[StageItem]) -> (u64, bool) {
    let known = stage.iter().filter_map(|s| s.size).sum();
    (known, stage.iter().any(|s| s.size.is_none()))
}

/// Refuse, before anything is written, a pull the disk cannot hold (where the
/// filesystem says how much is free).
pub fn check(fs: &dyn Fs, layout: &Layout, needs: Needs) -> Result<()> {
    let free = free_space(fs, layout)?;
    match free {
        Some(free) if needs.total() > free => Err(no_space(layout, needs, Some(free), None)),
        _ => Ok(()),
    }
}

/// Write `.stack/reserve`, `bytes` long (allocated, not sparse). A full disk is
/// [`no_space`], naming `needs`.
pub fn reserve(fs: &dyn Fs, layout: &Layout, bytes: u64, needs: Needs) -> Result<()> {
    let path = layout.reserve();
    let err = match fs.allocate(&path, bytes).at("reserve", &path) {
        Ok(()) => return Ok(()),
        Err(err) if err.is_crash() => return Err(err),
        Err(err) => err,
    };
    // What was allocated goes back before the refusal is reported.
    if let Err(e) = not_found_ok(fs.remove_file(&path)).at("remove", &path) {
        if e.is_crash() {
            return Err(e);
        }
    }
    if !is_no_space_error(&err) {
        return Err(err);
    }
    let free = free_space(fs, layout).ok().flatten();
    Err(no_space(layout, needs, free, Some(err)))
}

/// Give the reserve back (before a transaction's apply or rollback writes).
pub fn release(fs: &dyn Fs, layout: &Layout) -> Result<()> {
    let path = layout.reserve();
    not_found_ok(fs.remove_file(&path)).at("remove", &path)
}

/// Is this error the disk (or a quota) being full?
pub fn is_no_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// Does `err` come from a full disk?
pub fn is_no_space_error(err: &Error) -> bool {
    match err {
        Error::Io { source, .. } => is_no_space(source),
        Error::NoSpace { .. } => true,
        _ => false,
    }
}

fn free_space(fs: &dyn Fs, layout: &Layout) -> Result<Option<u64>> {
    let root: &Path = &layout.root;
    fs.free_space(root).at("statvfs", root)
}

/// The refusal: how much the pull needed and how much there was.
pub fn no_space(layout: &Layout, needs: Needs, free: Option<u64>, source: Option<Error>) -> Error {
    Error::NoSpace {
        dir: layout.root.clone(),
        needed: needs.total(),
        needed_more: needs.download_unknown,
        free,
        source: source.map(Box::new),
    }
}

pub use crate::error::human;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(12), "12 bytes");
        assert_eq!(human(200_000), "200 kB");
        assert_eq!(human(1_500_000), "1.5 MB");
    }
}
