//! Files stack did not write, in the folders a pull works in.
//!
//! Owns: finding them, and the rule that a pull never deletes or overwrites one.
//! Invariant kept: a file no state entry holds at a path the plan writes is moved
//! to `.stack/quarantine/<txn>/<path>` by a journaled `RemoveStray` step before
//! the manifest's file takes its name (never renamed over, never unlinked); any
//! other such file is left where it is and named to the caller, who says so on
//! stderr (invariant 3 cannot hold while it is there).

use std::collections::{BTreeSet, HashSet};

use crate::error::{IoContext, Result};
use crate::fs::Fs;
use crate::layout::{self, Layout};
use crate::replay::state::SyncState;

/// Every relative path `state` holds (references, shared files, bundles).
pub fn tracked(state: &SyncState) -> HashSet<String> {
    let mut out = HashSet::new();
    for (slot, id, e) in state.entries() {
        out.insert(e.ref_path(slot).into_owned());
        out.insert(e.shared_path(id).into_owned());
    }
    for slug in state.memory_domains.keys() {
        out.insert(layout::bundle_rel(slug));
    }
    out
}

/// The files in `folders` (relative: a package's, `data/_direct`, a domain's)
/// that `state` does not hold, sorted. A folder that is not there is skipped; the
/// top folders `data` and `memory` hold folders, not files.
pub fn in_folders(
    fs: &dyn Fs,
    layout: &Layout,
    folders: &BTreeSet<String>,
    state: &SyncState,
) -> Result<Vec<String>> {
    let mut held: Option<HashSet<String>> = None;
    let mut out = Vec::new();
    // `data/_shared` is the engine's alone (what no entry holds there is an
    // orphan, for `verify` and `gc`), and as large as the stack: not listed.
    for rel in folders
        .iter()
        .filter(|f| f.contains('/') && f.as_str() != layout::SHARED_DIR)
    {
        let dir = layout.join(rel);
        let entries = match fs.read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).at("list", &dir),
        };
        for e in entries {
            let path = format!("{rel}/{}", e.name);
            let held = held.get_or_insert_with(|| tracked(state));
            if !held.contains(&path) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// What a caller tells the user about the files [`in_folders`] found.
pub fn warning(rel: &str) -> String {
    format!(
        "{rel} was not written by stack; left in place (invariant 3 cannot hold while it is there; `stack gc` moves such files to .stack/quarantine/)"
    )
}

/// What a caller tells the user about a file moved out of a name the pull wrote.
pub fn moved(rel: &str, to: &std::path::Path) -> String {
    format!(
        "{rel} was not written by stack; moved to {} before the manifest's file took its name",
        to.display()
    )
}
