//! Applying a plan: the visible mutations of a pull, each idempotent.
//!
//! Owns: what each apply event does on disk, fingerprints of what was written, and
//! finishing a transaction (state file, `Committed`, cleanup). Used both by a pull
//! after its commit point and by recovery rolling a transaction forward.
//!
//! Invariants kept:
//! - Every step can be redone from the start of the transaction after a crash at any
//!   point: files are made under `.stack/tmp` and renamed into place; removals move
//!   into `.stack/trash/<txn>/` and treat "not found" as done; staged content stays
//!   in `.stack/staging/` until `Committed` is durable.
//! - Nothing temporary is ever created inside `data/` or `memory/`.
//! - `Committed` is appended only after `sync_fs` made every applied step durable, so a
//!   durable `Committed` implies a durable applied tree.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{IoContext, Result};
use crate::fs::{not_found_ok, Fs, Kind};
use crate::journal::event::{Event, Record};
use crate::journal::Journal;
use crate::layout::{self, Layout};
use crate::replay::project::{apply_event, apply_fingerprints};
use crate::replay::state::{write_state, StatFp, Strategy, SyncState};

/// Would a copy succeed where this link or clone failed (contract §2 fallbacks)?
pub fn is_link_unsupported(e: &io::Error) -> bool {
    if e.kind() == io::ErrorKind::Unsupported {
        return true;
    }
    matches!(
        e.raw_os_error(),
        Some(
            libc::EXDEV
                | libc::EPERM
                | libc::EOPNOTSUPP
                | libc::ENOSYS
                | libc::EINVAL
                | libc::EMLINK
        )
    )
}

/// Applies the events of one transaction.
pub struct Applier<'a> {
    pub fs: &'a dyn Fs,
    pub layout: &'a Layout,
    pub txn: u64,
    warned_fallback: AtomicBool,
}

impl<'a> Applier<'a> {
    pub fn new(fs: &'a dyn Fs, layout: &'a Layout, txn: u64) -> Self {
        Applier {
            fs,
            layout,
            txn,
            warned_fallback: AtomicBool::new(false),
        }
    }

    fn tmp_path(&self, seq: u64) -> Result<std::path::PathBuf> {
        let dir = self.layout.tmp();
        self.fs.create_dir_all(&dir).at("mkdir", &dir)?;
        let p = dir.join(format!("{}-{seq}", self.txn));
        not_found_ok(self.fs.remove_file(&p)).at("remove", &p)?;
        Ok(p)
    }

    fn to_trash(&self, seq: u64, path: &Path) -> Result<()> {
        if !self.fs.exists(path).at("stat", path)? {
            return Ok(());
        }
        let dir = self.layout.trash().join(self.txn.to_string());
        self.fs.create_dir_all(&dir).at("mkdir", &dir)?;
        let dst = dir.join(seq.to_string());
        match self.fs.rename(path, &dst) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r.at("rename", path),
        }
    }

    /// Make `dst` a copy of `src` by `strategy`, falling back to a copy where the
    /// filesystem refuses a link or clone.
    fn link_or_copy(
        &self,
        strategy: Strategy,
        src: &Path,
        dst: &Path,
        target: &Path,
    ) -> Result<()> {
        let r = match strategy {
            Strategy::Symlink => return self.fs.symlink(target, dst).at("symlink", dst),
            Strategy::Copy => {
                return self
                    .fs
                    .copy_file(src, dst, false)
                    .map(|_| ())
                    .at("copy", dst)
            }
            Strategy::Hardlink => self.fs.hard_link(src, dst),
            Strategy::Reflink => self.fs.reflink(src, dst),
        };
        match r {
            Err(e) if is_link_unsupported(&e) => {
                if !self.warned_fallback.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "stack: {} refused by the filesystem ({e}); copying instead",
                        strategy.as_str()
                    );
                }
                not_found_ok(self.fs.remove_file(dst)).at("remove", dst)?;
                self.fs
                    .copy_file(src, dst, false)
                    .map(|_| ())
                    .at("copy", dst)
            }
            r => r.at(strategy.as_str(), dst),
        }
    }

    fn ensure_dir(&self, dir: &Path) -> Result<()> {
        self.fs.create_dir_all(dir).map(|_| ()).at("mkdir", dir)
    }

    /// Apply one event (no-op for events that are not apply steps).
    pub fn apply(&self, seq: u64, ev: &Event) -> Result<()> {
        let l = self.layout;
        match ev {
            Event::PutShared { table_id, md5 } => {
                let dst = l.join(&layout::shared_rel(table_id));
                self.ensure_dir(&l.shared_dir())?;
                let tmp = self.tmp_path(seq)?;
                let staged = l.staged(md5);
                // A hard link from staging costs no copy; staging is on the same
                // filesystem. Where links are refused, copy.
                self.link_or_copy(Strategy::Hardlink, &staged, &tmp, &staged)?;
                self.fs.set_readonly(&tmp, true).at("chmod", &tmp)?;
                self.fs.rename(&tmp, &dst).at("rename", &dst)
            }
            Event::MakeRef {
                slot,
                table_id,
                name,
                strategy,
                ..
            } => {
                let dst = l.join(&layout::ref_rel(slot, name));
                self.ensure_dir(&l.join(&layout::slot_dir_rel(slot)))?;
                let tmp = self.tmp_path(seq)?;
                let shared = l.join(&layout::shared_rel(table_id));
                self.link_or_copy(*strategy, &shared, &tmp, &layout::symlink_target(table_id))?;
                if *strategy != Strategy::Symlink && *strategy != Strategy::Hardlink {
                    // A copy of a read-only file may keep its mode; references are the
                    // user's to read and write.
                    self.fs.set_readonly(&tmp, false).at("chmod", &tmp)?;
                }
                self.fs.rename(&tmp, &dst).at("rename", &dst)
            }
            Event::RemoveRef { slot, name, .. } => {
                self.to_trash(seq, &l.join(&layout::ref_rel(slot, name)))
            }
            Event::RemoveShared { table_id } => {
                self.to_trash(seq, &l.join(&layout::shared_rel(table_id)))
            }
            Event::PutBundle { slug, md5 } => {
                let dir = l.join(&layout::domain_dir_rel(slug));
                self.ensure_dir(&dir)?;
                let tmp = self.tmp_path(seq)?;
                let staged = l.staged(md5);
                self.fs.copy_file(&staged, &tmp, false).at("copy", &tmp)?;
                let dst = l.join(&layout::bundle_rel(slug));
                self.fs.rename(&tmp, &dst).at("rename", &dst)
            }
            Event::RemoveBundle { slug } => {
                self.to_trash(seq, &l.join(&layout::domain_dir_rel(slug)))
            }
            Event::RemoveDir { slug } => {
                let dir = l.data().join(slug);
                match self.fs.remove_dir(&dir) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    // Something the engine did not put there (a user's file) keeps the
                    // folder alive; `stack verify` names it and `stack gc` removes it.
                    Err(e) if self.fs.exists(&dir).unwrap_or(true) && is_not_empty(&e) => Ok(()),
                    Err(e) => Err(e).at("rmdir", &dir),
                }
            }
            Event::RemoveStray { rel } => {
                // Validated when planned; checked again so a hand-made journal can
                // never point outside the directory.
                let inside = (rel.starts_with("data/") || rel.starts_with("memory/"))
                    && layout::is_engine_path(rel);
                if !inside {
                    return Err(crate::Error::State {
                        path: l.journal(),
                        message: format!("refusing to remove {rel:?}: not under data/ or memory/"),
                    });
                }
                self.to_trash(seq, &l.join(rel))
            }
            Event::Begin { .. }
            | Event::Stage { .. }
            | Event::Prepared
            | Event::Committed { .. }
            | Event::Aborted { .. }
            | Event::Checkpoint { .. } => Ok(()),
        }
    }

    /// Apply every event of a transaction, in order.
    pub fn apply_all(&self, records: &[Record]) -> Result<()> {
        for r in records {
            self.apply(r.seq, &r.event)?;
        }
        Ok(())
    }
}

fn is_not_empty(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::DirectoryNotEmpty || e.raw_os_error() == Some(libc::ENOTEMPTY)
}

/// The stat fingerprint of `rel` (not following a final symlink).
pub fn fingerprint(fs: &dyn Fs, layout: &Layout, rel: &str) -> Result<Option<StatFp>> {
    let path = layout.join(rel);
    match fs.symlink_metadata(&path) {
        Ok(m) => Ok(Some(StatFp {
            size: m.len,
            mtime_ns: m.mtime_ns as i64,
            ino: m.ino,
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).at("stat", &path),
    }
}

/// The relative paths whose fingerprints `Committed` records: those a transaction
/// wrote, and the shared file of every reference it made (a `MakeRef` starts a new
/// state entry without fingerprints, even when its shared file is unchanged).
pub fn written_paths(records: &[Record]) -> Vec<String> {
    let mut out = Vec::new();
    for r in records {
        match &r.event {
            Event::PutShared { table_id, .. } => out.push(layout::shared_rel(table_id)),
            Event::MakeRef {
                slot,
                name,
                table_id,
                ..
            } => {
                out.push(layout::ref_rel(slot, name));
                out.push(layout::shared_rel(table_id));
            }
            Event::PutBundle { slug, .. } => out.push(layout::bundle_rel(slug)),
            _ => {}
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Finish a transaction whose apply steps ran: make them durable, write the state
/// file, append `Committed` and make it durable, then drop the leftovers.
/// Returns the new state.
pub fn finish(
    fs: &dyn Fs,
    layout: &Layout,
    journal: &mut Journal,
    base: &SyncState,
    txn: u64,
    records: &[Record],
    refresh: &[String],
) -> Result<SyncState> {
    // 1. Every rename, link and write of the apply steps durable, in one call.
    fs.sync_fs(&layout.root).at("syncfs", &layout.root)?;
    // 2. The new state: the projection of base + this transaction.
    let mut state = base.clone();
    for r in records {
        apply_event(&mut state, &r.event);
    }
    let mut fps = Vec::new();
    for rel in written_paths(records)
        .into_iter()
        .chain(refresh.iter().cloned())
    {
        if let Some(fp) = fingerprint(fs, layout, &rel)? {
            fps.push((rel, fp));
        }
    }
    apply_fingerprints(&mut state, &fps);
    let seq = journal.last_seq() + 1;
    state.journal = crate::replay::state::JournalPos { txn, seq };
    // 3. The state file (atomic replace), then `Committed`, durable.
    write_state(fs, layout, &state)?;
    let got = journal.append(txn, Event::Committed { fingerprints: fps });
    debug_assert_eq!(got, seq);
    journal.sync()?;
    // 4. Leftovers: the trash, the scratch folder and consumed staged files.
    clean_leftovers(fs, layout)?;
    Ok(state)
}

/// Remove the trash, the scratch folder and every complete staged file, keeping
/// partial downloads (`*.part`) for the next pull to resume. Checks before it
/// touches, so a clean directory sees no mutation at all.
pub fn clean_leftovers(fs: &dyn Fs, layout: &Layout) -> Result<()> {
    for dir in [layout.trash(), layout.tmp()] {
        if fs.exists(&dir).at("stat", &dir)? {
            fs.remove_tree(&dir).at("remove", &dir)?;
        }
    }
    let staging = layout.staging();
    let entries = match fs.read_dir(&staging) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).at("list", &staging),
    };
    for e in entries {
        if e.kind == Kind::File && !e.name.ends_with(".part") {
            let p = staging.join(&e.name);
            not_found_ok(fs.remove_file(&p)).at("remove", &p)?;
        }
    }
    Ok(())
}
