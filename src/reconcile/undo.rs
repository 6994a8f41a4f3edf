//! Rolling a transaction back after its commit point: the inverse of `apply`.
//!
//! Owns: what undoing each apply step does on disk. Used when rolling forward
//! fails on a fault that persists (a folder refusing writes, a disk that fails
//! some operations) while the disk still lets stack write: the old stack is put
//! back from what the transaction kept, in the same command.
//!
//! Invariants kept:
//! - Every file the transaction removed or replaced is in `.stack/trash/<txn>/<seq>`
//!   (`Applier::to_trash`, `Applier::make_room`) until `Committed` or `Aborted`;
//!   undo renames it back to its name. A name the old state did not hold is moved
//!   to the trash only if it holds the step's own file (the put ran; known by
//!   the staged file it came from, not by an md5 of the bytes): a user's file
//!   there (the put never ran) is left in place, or moved to the quarantine
//!   when a kept old file takes its name back, never trashed; a file moved to
//!   `.stack/quarantine/` goes back where it was if its name is free. No rename
//!   of a rollback replaces a file.
//!   Undo therefore needs no new data blocks: renames and folder removals only.
//! - Steps are undone in reverse order, each idempotent: a kept file already
//!   renamed back is gone from the trash, a new file already moved away is gone.
//!   A marker (`Layout::rolling_back`), durable before the first of them, stops
//!   recovery from rolling such a transaction forward again (its staged files
//!   may be spent); `Aborted`, durable after the last, ends the transaction, and
//!   only then are the trash and the marker removed.
//! - Folders the transaction created are removed once empty; a user's file keeps
//!   one alive.

use std::collections::{BTreeSet, HashSet};
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result, Warnings};
use crate::fs::{Fs, Kind};
use crate::journal::event::{Event, Record};
use crate::layout::{self, Layout};
use crate::reconcile::apply::{copy_of_staged, entry_exists, holds, is_file, same_file};
use crate::replay::state::{Strategy, SyncState};

/// Put the old stack `old` back after transaction `txn` applied some of
/// `records` (in order).
///
/// What it could not put back where it was (a user's file left in place or in
/// the quarantine) goes into `warnings`.
pub fn undo(
    fs: &dyn Fs,
    layout: &Layout,
    old: &SyncState,
    txn: u64,
    records: &[Record],
    warnings: &Warnings,
) -> Result<()> {
    let u = Undoer {
        fs,
        layout,
        txn,
        held: tracked(old),
        warnings,
        left: Default::default(),
    };
    let uses = crate::reconcile::place::consumers(records.iter().map(|r| &r.event));
    let reserve = layout.reserve();
    if fs.exists(&reserve).at("stat", &reserve)? {
        crate::reconcile::room::release(fs, layout)?;
    }
    let mut folders = BTreeSet::new();
    let mut placed = BTreeSet::new();
    for r in records.iter().rev() {
        let rel = match &r.event {
            Event::PutShared { table_id, md5 } => {
                let rel = layout::shared_rel(table_id);
                let staged = layout.staged(md5);
                let own = |p: &Path| match copy_of_staged(fs, p, &staged)? {
                    Some(own) => Ok(own),
                    // Its only consumer moved the staged file (here, or
                    // into a placed folder that then moved): the put ran, if
                    // the staged file is not still waiting in a placed folder.
                    None if uses.get(md5.as_str()) == Some(&1) => {
                        Ok(is_file(fs, p)? && !waits_in_placed(fs, layout, records, &rel)?)
                    }
                    // Spent by a cleanup: the content says.
                    None => holds(fs, p, md5),
                };
                u.unput(r.seq, &rel, &own)?
            }
            Event::MakeRef {
                slot,
                name,
                table_id,
                md5,
                strategy,
                ..
            } => {
                let shared = layout.join(&layout::shared_rel(table_id));
                // A copy of the shared file, or (a rerun of the rollback, the
                // shared file's old version back) of the put's content.
                let own = |p: &Path| match strategy {
                    Strategy::Symlink => Ok(fs
                        .read_link(p)
                        .is_ok_and(|t| t == layout::symlink_target(table_id))),
                    _ => Ok(copy_of_staged(fs, p, &shared)? == Some(true) || holds(fs, p, md5)?),
                };
                u.unput(r.seq, &layout::ref_rel(slot, name), &own)?
            }
            Event::PutBundle { slug, md5 } => {
                // A bundle's put copies its staged file, which stays.
                let staged = layout.staged(md5);
                let own = |p: &Path| match copy_of_staged(fs, p, &staged)? {
                    Some(own) => Ok(own),
                    None => holds(fs, p, md5),
                };
                u.unput(r.seq, &layout::bundle_rel(slug), &own)?
            }
            Event::RemoveRef { slot, name, .. } => {
                u.unremove(r.seq, &layout::ref_rel(slot, name))?
            }
            Event::RemoveShared { table_id } => u.unremove(r.seq, &layout::shared_rel(table_id))?,
            Event::RemoveBundle { slug } => u.unremove(r.seq, &layout::domain_dir_rel(slug))?,
            Event::RemoveStray { rel } => u.unstray(r.seq, rel)?,
            Event::Place { rel, .. } => {
                u.unmerge(rel)?;
                placed.insert(rel.clone());
                rel.clone()
            }
            _ => continue,
        };
        let mut parent = Path::new(&rel).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            folders.insert(p.to_string_lossy().into_owned());
            parent = p.parent();
        }
        if placed.contains(&rel) {
            folders.insert(rel);
        }
    }
    // Deepest first: a folder's emptiness depends on its children's removal.
    let mut folders: Vec<String> = folders.into_iter().collect();
    folders.sort_by_key(|f| std::cmp::Reverse(f.matches('/').count()));
    for rel in folders {
        if u.made_by_txn(&rel, &placed, old) {
            u.remove_if_empty(&rel)?;
        }
    }
    let root = &layout.root;
    fs.sync_fs(root).at("syncfs", root)
}

/// Is the staged file of the shared file `rel` still inside a folder built
/// out of sight (`reconcile::place`), so that its put has not run?
fn waits_in_placed(fs: &dyn Fs, layout: &Layout, records: &[Record], rel: &str) -> Result<bool> {
    let Some(name) = Path::new(rel).file_name() else {
        return Ok(false);
    };
    for r in records {
        if let Event::Place { staged, rel: to } = &r.event {
            if to == layout::SHARED_DIR {
                let entry = layout.staging().join(staged).join(name);
                if entry_exists(fs, &entry)? {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

/// Every relative path `state` holds (references, shared files, bundles).
fn tracked(state: &SyncState) -> HashSet<String> {
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

struct Undoer<'a> {
    fs: &'a dyn Fs,
    layout: &'a Layout,
    txn: u64,
    /// Every path the old state holds.
    held: HashSet<String>,
    warnings: &'a Warnings,
    /// Names where a put's own file was left, the old state holding the name
    /// and no old file kept for the put: a removal earlier in the transaction
    /// kept it, and its undo moves the put's file away before the old one
    /// comes back.
    left: std::cell::RefCell<HashSet<String>>,
}

impl Undoer<'_> {
    fn kept(&self, seq: u64) -> PathBuf {
        self.layout.kept(self.txn, seq)
    }

    fn exists(&self, p: &Path) -> Result<bool> {
        self.fs.exists(p).at("stat", p)
    }

    /// Rename `from` to `to`, making `to`'s folder first; never over a file
    /// at `to` (one that appeared there fails the rollback, which the next
    /// command tries again).
    fn move_to(&self, from: &Path, to: &Path) -> Result<()> {
        if let Some(parent) = to.parent() {
            self.fs.create_dir_all(parent).at("mkdir", parent)?;
        }
        self.fs.rename_noreplace(from, to).at("rename", to)
    }

    /// A put's name: the step's own file (`own`: the put ran) moved to the
    /// trash, then the old file back if the put kept one. Its own file stays
    /// when the old state holds the name and nothing was kept for the put: a
    /// removal earlier in the transaction kept the old file, and its undo
    /// moves this one ([`Self::unremove`]). Whatever else holds the name is not
    /// stack's (the put never ran and a user made it, or made it after): it is
    /// never trashed, but left in place, or moved to the quarantine when the
    /// kept old file goes back to its name. Last, a file the put moved out of
    /// the name (`Applier::make_room`) comes back if the name is free.
    fn unput(&self, seq: u64, rel: &str, own: &dyn Fn(&Path) -> Result<bool>) -> Result<String> {
        let path = self.layout.join(rel);
        let kept = self.kept(seq);
        let back = self.exists(&kept)?;
        // (The kept file's own inode at the name: its move back was cut
        // between link and unlink, and `move_to` finishes it.)
        if entry_exists(self.fs, &path)? && !(back && same_file(self.fs, &path, &kept)) {
            // Moved away already (a rerun): what holds the name came after.
            let away = self.layout.unput(self.txn, seq);
            let own =
                (!entry_exists(self.fs, &away)? || same_file(self.fs, &path, &away)) && own(&path)?;
            if own && (back || !self.held.contains(rel)) {
                self.move_to(&path, &away)?;
            } else if own {
                self.left.borrow_mut().insert(rel.to_string());
            } else if back {
                self.aside(rel)?;
            } else if !self.held.contains(rel) {
                self.warnings.push(format!(
                    "{rel} was not written by stack; left in place by the rollback"
                ));
            }
        }
        if back {
            self.move_to(&kept, &path)?;
        }
        if self.left.borrow().contains(rel) {
            // The name is not free until the earlier step's undo moves the
            // put's file; that undo brings back what was quarantined.
            return Ok(rel.to_string());
        }
        self.unquarantine(rel)
    }

    /// Move `rel`, a file stack did not write, to `.stack/quarantine/<txn>/<rel>`
    /// before the old stack's file takes its name back; never over a file
    /// already there (the rollback fails instead, and the next command tries
    /// again).
    fn aside(&self, rel: &str) -> Result<()> {
        let from = self.layout.join(rel);
        let to = self.layout.quarantined(self.txn, rel);
        if let Some(parent) = to.parent() {
            self.fs.create_dir_all(parent).at("mkdir", parent)?;
        }
        self.fs.rename_noreplace(&from, &to).at("rename", &to)?;
        self.warnings.push(format!(
            "{rel} was not written by stack; moved to {} by the rollback",
            to.strip_prefix(&self.layout.root).unwrap_or(&to).display()
        ));
        // Durable before the kept file's rename takes the name.
        let root = &self.layout.root;
        self.fs.sync_fs(root).at("syncfs", root)
    }

    /// A removal: the removed file (or folder) back from the trash, if it went.
    /// What holds its name now is a later put's file (to the trash), or was
    /// made after the removal (to the quarantine, [`Self::aside`]).
    fn unremove(&self, seq: u64, rel: &str) -> Result<String> {
        let kept = self.kept(seq);
        if !self.exists(&kept)? {
            return Ok(rel.to_string());
        }
        let path = self.layout.join(rel);
        if entry_exists(self.fs, &path)? && !same_file(self.fs, &path, &kept) {
            if self.left.borrow().contains(rel) {
                self.move_to(&path, &self.layout.unput(self.txn, seq))?;
            } else {
                self.aside(rel)?;
            }
        }
        self.move_to(&kept, &path)?;
        Ok(rel.to_string())
    }

    /// A stray the pull moved to the quarantine (a user's bytes at a name it
    /// heals): a later put's own file left at that name (see `left`) is moved
    /// away first, then the stray comes back.
    fn unstray(&self, seq: u64, rel: &str) -> Result<String> {
        let path = self.layout.join(rel);
        // The stray back already (a rerun of a cut rollback): what holds the
        // name is the user's, never moved.
        let waiting = entry_exists(self.fs, &self.layout.quarantined(self.txn, rel))?;
        if self.left.borrow_mut().remove(rel) && waiting && entry_exists(self.fs, &path)? {
            self.move_to(&path, &self.layout.unput(self.txn, seq))?;
        }
        self.unquarantine(rel)
    }

    /// A file a pull moved out of a name it put: back, unless something holds
    /// the name (then it stays in `.stack/quarantine/`, as `gc` would keep it).
    fn unquarantine(&self, rel: &str) -> Result<String> {
        let from = self.layout.quarantined(self.txn, rel);
        let to = self.layout.join(rel);
        if entry_exists(self.fs, &from)? {
            if entry_exists(self.fs, &to)? {
                self.warnings.push(format!(
                    "{rel} was not written by stack; it stays in {} (something else holds its name)",
                    from.strip_prefix(&self.layout.root).unwrap_or(&from).display()
                ));
            } else {
                self.move_to(&from, &to)?;
            }
        }
        Ok(rel.to_string())
    }

    /// A placed folder merged into one the user made meanwhile: what the
    /// merge moved out of its entries' names (`Applier::merge`) goes back. The
    /// entries themselves were undone as the steps that travelled in it.
    fn unmerge(&self, rel: &str) -> Result<()> {
        let kept = self.layout.quarantined(self.txn, rel);
        let entries = match self.fs.read_dir(&kept) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).at("list", &kept),
        };
        for e in entries {
            self.unquarantine(&format!("{rel}/{}", e.name))?;
        }
        Ok(())
    }

    /// Did the transaction create the folder `rel` (so that the old stack did
    /// not have it)? A placed folder; a package's, a domain's or the direct
    /// tables' folder the old state has no entry in (apply removes such a folder
    /// with its last entry); `data` / `memory` when the old state holds nothing
    /// under it and a folder was placed in it.
    fn made_by_txn(&self, rel: &str, placed: &BTreeSet<String>, old: &SyncState) -> bool {
        if placed.contains(rel) {
            return true;
        }
        let inside = |prefix: &str| self.held.iter().any(|p| p.starts_with(prefix));
        if layout::is_top_dir(rel) {
            let prefix = format!("{rel}/");
            return !inside(&prefix) && placed.iter().any(|p| p.starts_with(&prefix));
        }
        // `data/_shared` outlives its last table (it is placed when new);
        // `data/_direct` goes with its last table (`RemoveDir`).
        if rel == layout::SHARED_DIR {
            return false;
        }
        let one_folder = |slug: &str| !slug.contains('/');
        match (layout::under_data(rel), layout::under_memory(rel)) {
            (Some(layout::DIRECT_DIR), _) => old.direct_tables.is_empty(),
            (Some(slug), _) => one_folder(slug) && !old.data_packages.contains_key(slug),
            (_, Some(slug)) => one_folder(slug) && !old.memory_domains.contains_key(slug),
            _ => false,
        }
    }

    fn remove_if_empty(&self, rel: &str) -> Result<()> {
        let path = self.layout.join(rel);
        match self.fs.symlink_metadata(&path) {
            Ok(m) if m.kind == Kind::Dir => {}
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).at("stat", &path),
        }
        if !self.fs.read_dir(&path).at("list", &path)?.is_empty() {
            return Ok(());
        }
        crate::fs::not_found_ok(self.fs.remove_dir(&path)).at("rmdir", &path)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::fs::sim::SimFs;
    use crate::journal::event::Slot;
    use crate::replay::state::TableEntry;

    const MD5: &str = "0123456789abcdef0123456789abcdef";

    fn write(fs: &SimFs, path: &Path, bytes: &[u8]) {
        fs.create_dir_all(path.parent().unwrap()).unwrap();
        fs.create(path).unwrap().write_all(bytes).unwrap();
    }

    fn record(seq: u64, event: Event) -> Record {
        Record { seq, txn: 1, event }
    }

    fn remove_b() -> Record {
        record(
            1,
            Event::RemoveRef {
                slot: Slot::Package("p1".try_into().unwrap()),
                table_id: "tbl_b".try_into().unwrap(),
                name: "b".try_into().unwrap(),
            },
        )
    }

    /// The old stack: `p1/b`, a copy of table `tbl_b`.
    fn old() -> SyncState {
        let mut s = SyncState::default();
        s.data_packages
            .entry("p1".try_into().unwrap())
            .or_default()
            .insert(
                "tbl_b".try_into().unwrap(),
                TableEntry::new(
                    "b".try_into().unwrap(),
                    MD5.try_into().unwrap(),
                    None,
                    Strategy::Copy,
                ),
            );
        s
    }

    /// A removal undone while a user's file holds the removed name: the
    /// user's file goes to the quarantine (said in the warnings), the old
    /// file back to its name.
    #[test]
    fn undoing_a_removal_moves_a_users_file_aside() {
        let fs = SimFs::new();
        let l = Layout::new("/d");
        let b = l.join("data/p1/b.parquet");
        write(&fs, &l.kept(1, 1), b"old b");
        write(&fs, &b, b"the user's");
        let warnings = Warnings::default();
        undo(&fs, &l, &old(), 1, &[remove_b()], &warnings).unwrap();
        assert_eq!(fs.read(&b).unwrap(), b"old b");
        let kept = l.quarantined(1, "data/p1/b.parquet");
        assert_eq!(fs.read(&kept).unwrap(), b"the user's");
        let warnings = warnings.take();
        assert!(
            warnings.iter().any(|w| w.contains("data/p1/b.parquet")),
            "{warnings:?}"
        );
    }

    /// A removal, then a put of another table at the same name: the put's
    /// file is stack's, so it goes to the trash (no warning, nothing
    /// quarantined) when the old file comes back.
    #[test]
    fn undoing_a_removal_then_a_put_at_its_name_trashes_the_puts_file() {
        let fs = SimFs::new();
        let l = Layout::new("/d");
        let b = l.join("data/p1/b.parquet");
        write(&fs, &l.kept(1, 1), b"old b");
        write(&fs, &l.join("data/_shared/tbl_x.parquet"), b"new x");
        write(&fs, &b, b"new x");
        let put = record(
            2,
            Event::MakeRef {
                slot: Slot::Package("p1".try_into().unwrap()),
                table_id: "tbl_x".try_into().unwrap(),
                name: "b".try_into().unwrap(),
                md5: MD5.try_into().unwrap(),
                size: None,
                strategy: Strategy::Copy,
            },
        );
        let warnings = Warnings::default();
        undo(&fs, &l, &old(), 1, &[remove_b(), put], &warnings).unwrap();
        assert_eq!(fs.read(&b).unwrap(), b"old b");
        assert!(!fs.exists(&l.quarantine()).unwrap());
        assert_eq!(warnings.take(), Vec::<String>::new());
    }
}
