//! Files stack did not write, in the folders a pull works in.
//!
//! Owns: finding them, and the rule that a pull never deletes or overwrites one.
//! Invariant kept: a file no state entry holds at a path the plan writes, or in
//! the folder of a memory domain the plan removes, and a tracked file whose
//! bytes are not stack's (`Damage::foreign`), is moved to
//! `.stack/quarantine/<txn>/<path>` by a journaled `RemoveStray` step before
//! the plan's step on it (never renamed over, never unlinked), and so
//! is one in a folder the user made where a pull places one (`Applier::merge`,
//! recorded by the journaled `Place`) and one that appears at a put's name after
//! the preflight looked (`Applier::make_room`); any
//! other such file is left where it is and named to the caller, who says so on
//! stderr (invariant 3 cannot hold while it is there).

use std::collections::{BTreeSet, HashSet};

use crate::error::{IoContext, Result};
use crate::fs::{Fs, Kind};
use crate::layout::{self, Layout};
use crate::model::slot::SlotRef;
use crate::replay::state::SyncState;

/// The paths a state holds, looked up without building them: references by
/// (package slug or `None` for the direct tables, name), shared files by table
/// id, bundles by the state's domains. An entry a hand-edited state file gave
/// paths of its own is held by those paths, as written.
pub struct Held<'s> {
    state: &'s SyncState,
    refs: HashSet<(Option<&'s str>, &'s str)>,
    ids: HashSet<&'s str>,
    odd: HashSet<String>,
}

impl<'s> Held<'s> {
    pub fn of(state: &'s SyncState) -> Held<'s> {
        let mut held = Held {
            state,
            refs: HashSet::new(),
            ids: HashSet::new(),
            odd: HashSet::new(),
        };
        for (slot, id, e) in state.entries() {
            if e.has_own_paths() {
                let slug = match slot {
                    SlotRef::Direct => None,
                    SlotRef::Package(slug) => Some(slug.as_str()),
                };
                held.refs.insert((slug, e.name.as_str()));
                held.ids.insert(id);
            } else {
                held.odd.insert(e.ref_path(slot).into_owned());
                held.odd.insert(e.shared_path(id).into_owned());
            }
        }
        held
    }

    /// Does the state hold the file at `rel`?
    pub fn contains(&self, rel: &str) -> bool {
        if self.odd.contains(rel) {
            return true;
        }
        if let Some(slug) = layout::bundle_slug_of(rel) {
            return self.state.memory_domains.contains_key(slug);
        }
        let Some((folder, file)) = layout::under_data(rel).and_then(|r| r.split_once('/')) else {
            return false;
        };
        let Some(stem) = file.strip_suffix(layout::TABLE_EXT) else {
            return false;
        };
        match folder {
            layout::SHARED_FOLDER => self.ids.contains(stem),
            layout::DIRECT_DIR => self.refs.contains(&(None, stem)),
            slug => self.refs.contains(&(Some(slug), stem)),
        }
    }
}

/// The files in `folders` (relative: a package's, `data/_direct`, a domain's)
/// that `state` does not hold, sorted. A folder that is not there is skipped; one
/// that is not a folder (a link to one elsewhere) is named itself; the top
/// folders `data` and `memory` hold folders, not files.
pub fn in_folders(
    fs: &dyn Fs,
    layout: &Layout,
    folders: &BTreeSet<String>,
    state: &SyncState,
) -> Result<Vec<String>> {
    let mut held: Option<Held<'_>> = None;
    let mut out = Vec::new();
    let mut rel = String::new();
    // `data/_shared` is the engine's alone (what no entry holds there is an
    // orphan, for `verify` and `gc`), and as large as the stack: not listed.
    for folder in folders
        .iter()
        .filter(|f| f.contains('/') && f.as_str() != layout::SHARED_DIR)
    {
        let dir = layout.join(folder);
        match fs.symlink_metadata(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).at("stat", &dir),
            // A link where stack keeps a folder (stack never makes one) is the
            // user's, whole: what it points to, maybe outside the directory, is
            // never listed.
            Ok(m) if m.kind != Kind::Dir => {
                out.push(folder.clone());
                continue;
            }
            Ok(_) => {}
        }
        let entries = match fs.read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).at("list", &dir),
        };
        let held = held.get_or_insert_with(|| Held::of(state));
        for e in entries {
            rel.clear();
            rel.push_str(folder);
            rel.push('/');
            rel.push_str(&e.name);
            if !held.contains(&rel) {
                out.push(rel.clone());
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

/// What a caller tells the user about bytes stack did not write that a pull
/// moved out of its way (a name it writes or removes, a domain's folder it
/// removes).
pub fn moved(rel: &str, to: &std::path::Path) -> String {
    format!(
        "{rel} holds bytes stack did not write; moved to {} out of the pull's way",
        to.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held answers as the set of the state's paths would, for each kind of path
    /// and for a hand-edited entry's own paths.
    #[test]
    fn held_knows_every_path_the_state_holds() {
        let state: SyncState = serde_json::from_str(
            r#"{"version": 1,
              "direct_tables": {"t1": {"name": "fx", "md5": "0123456789abcdef0123456789abcdef",
                 "strategy": "copy", "ref_path": "data/_direct/fx.parquet",
                 "shared_path": "data/_shared/t1.parquet"}},
              "data_packages": {"sales": {"t2": {"name": "q1", "md5": "0123456789abcdef0123456789abcdef",
                 "strategy": "symlink", "ref_path": "data/sales/q1.parquet",
                 "shared_path": "data/_shared/t2.parquet"},
                 "t3": {"name": "odd", "md5": "0123456789abcdef0123456789abcdef",
                 "strategy": "copy", "ref_path": "data/sales/elsewhere.parquet",
                 "shared_path": "data/_shared/t3.parquet"}}},
              "memory_domains": {"ops": {"md5": "0123456789abcdef0123456789abcdef",
                 "path": "memory/ops/bundle.md"}}}"#,
        )
        .unwrap();
        let held = Held::of(&state);
        for rel in [
            "data/_direct/fx.parquet",
            "data/_shared/t1.parquet",
            "data/sales/q1.parquet",
            "data/_shared/t2.parquet",
            "data/sales/elsewhere.parquet",
            "data/_shared/t3.parquet",
            "memory/ops/bundle.md",
        ] {
            assert!(held.contains(rel), "{rel}");
        }
        for rel in [
            "data/sales/odd.parquet",
            "data/sales/q1.txt",
            "data/_direct/q1.parquet",
            "data/other/q1.parquet",
            "data/_shared/t9.parquet",
            "memory/ops/notes.md",
            "memory/dev/bundle.md",
            "data/sales",
        ] {
            assert!(!held.contains(rel), "{rel}");
        }
    }
}
