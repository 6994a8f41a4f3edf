//! Applying a plan: the visible mutations of a pull, each idempotent.
//!
//! Owns: what each apply event does on disk, fingerprints of what was written, and
//! finishing a transaction (state file, `Committed`, cleanup). Used both by a pull
//! after its commit point and by recovery rolling a transaction forward.
//!
//! Invariants kept:
//! - Every step can be redone from the start of the transaction after a crash at any
//!   point: a link or symlink whose name is free is created in place (it appears
//!   atomically, content and all); anything else (a replacement, a redo finding the
//!   name taken, a copy) is made under `.stack/tmp` and renamed into place; removals move
//!   into `.stack/trash/<txn>/` and treat "not found" as done, and so does the old file a
//!   put replaces (kept for a rollback, `reconcile::undo`); staged content stays
//!   in `.stack/staging/` until `Committed` is durable. A redo recognises a step's
//!   own file by the staged file it came from (inode or bytes), never by an md5 of
//!   the bytes, which need not be the manifest's.
//! - A user's bytes are never trashed or renamed over: what holds a put's name
//!   goes to the trash only if the old stack holds that path (the committed
//!   state the transaction started from, `Applier::old_state`); anything else
//!   goes to `.stack/quarantine/<txn>/<path>`, durably before the put's rename,
//!   and is reported; so does what holds a removal's name when its redo finds the
//!   old file kept already. Nothing is renamed over a kept file. A put takes a
//!   name it made free by a rename that never replaces (`Fs::rename_noreplace`),
//!   so a file that appears in between is moved aside too. A pull's
//!   `RemoveStray` that cannot move its file fails the step (the pull rolls
//!   back); gc's is best effort. A folder built out of sight
//!   (`reconcile::place`) arrives whole by one rename, or entry by entry if its name
//!   was taken meanwhile, whatever holds an entry's name there moved to
//!   `.stack/quarantine/<txn>/` first, durably; a redo finds it gone and the steps
//!   that travelled in it then run as any other. A memory domain's folder goes
//!   to the trash holding its bundle alone: anything else in it is moved to the
//!   quarantine first (by the pull's `RemoveStray` steps, and, for what appeared
//!   since, by `RemoveBundle` itself).
//! - Nothing temporary is ever created inside `data/` or `memory/`.
//! - No step runs on a name or path that could leave the directory: an event's
//!   names and md5s are `SafeName`s and `Md5Sum`s and its paths were checked when
//!   it was decoded (`journal::event`), whatever wrote the journal.
//! - `Committed` is appended only after `sync_fs` made every applied step durable, so a
//!   durable `Committed` implies a durable applied tree.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{IoContext, Result, Warnings};
use crate::fs::{not_found_ok, Fs, Kind};
use crate::journal::event::{Event, Record};
use crate::journal::Journal;
use crate::layout::{self, Layout};
use crate::reconcile::foreign::Held;
use crate::reconcile::{heal, place};
use crate::replay::project::{apply_fingerprints, compact_maps, TxnFold};
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
    /// What the steps could not do but survived (a link fallback, a stray gc
    /// could not remove), for the caller's report.
    warnings: Warnings,
    /// Seqs of `PutShared` steps that are the only consumer of their staged file.
    sole_consumers: std::collections::HashSet<u64>,
    /// Folders this applier moved into place itself (`Place`): the steps whose
    /// files travelled inside them are done.
    placed: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Folders this applier made or found (one `mkdir -p` each, not one per file);
    /// forgotten when a step removes a folder.
    made_dirs: std::sync::Mutex<std::collections::HashSet<std::path::PathBuf>>,
    /// Threads for runs of independent steps (see [`Applier::apply_all`]).
    threads: usize,
    /// The paths the old stack holds (the committed state the transaction
    /// started from): what a put finds at one of them is stack's, kept in the
    /// trash for a rollback; anything else in a put's way is a user's, and goes
    /// to the quarantine. `None`: nothing is held (everything is quarantined).
    old: Option<Held<'a>>,
    /// Names a removal of this transaction vacated: what holds one later was
    /// made after the old stack's file went, and is not stack's.
    vacated: std::collections::HashSet<String>,
    /// Names a put of this transaction takes: what holds one when a removal's
    /// redo finds its old file kept already is judged by that put
    /// ([`Self::make_room`]), which knows its own file.
    put_names: std::collections::HashSet<String>,
    /// Is a failure to quarantine a stray fatal? A pull's strays stand where its
    /// puts go (it must fail rather than overwrite); gc's are best effort.
    strict_strays: bool,
    /// A stray was quarantined and no `syncfs` has made it durable yet: one
    /// runs before the next step, so no put's rename onto that name can survive
    /// a power loss that loses the move out of it.
    unsynced_strays: AtomicBool,
    /// Did this process's own staging make every staged table file read-only?
    /// Otherwise (recovery: the staging may be an older engine's, which left the
    /// mode to apply) a put makes the staged file read-only before moving it.
    staged_read_only: bool,
}

impl<'a> Applier<'a> {
    pub fn new(fs: &'a dyn Fs, layout: &'a Layout, txn: u64) -> Self {
        Applier {
            fs,
            layout,
            txn,
            warned_fallback: AtomicBool::new(false),
            warnings: Warnings::default(),
            sole_consumers: std::collections::HashSet::new(),
            placed: Default::default(),
            made_dirs: Default::default(),
            threads: 1,
            old: None,
            vacated: std::collections::HashSet::new(),
            put_names: std::collections::HashSet::new(),
            strict_strays: false,
            unsynced_strays: AtomicBool::new(false),
            staged_read_only: false,
        }
    }

    /// The committed state the transaction started from (see `old`): a pull's
    /// and a recovery's applier know it.
    pub fn old_state(mut self, state: &'a SyncState) -> Self {
        self.old = Some(Held::of(state));
        self
    }

    /// The warnings of the steps applied so far (taken: a second call has only the
    /// newer ones).
    pub fn take_warnings(&self) -> Vec<String> {
        self.warnings.take()
    }

    /// The staged files come from this process's `stage_all`, which made every
    /// table file read-only before the commit point: puts skip the chmod.
    pub fn staged_read_only(mut self) -> Self {
        self.staged_read_only = true;
        self
    }

    /// Apply runs of independent steps on up to `n` threads (1: strictly in order,
    /// as recovery and the deterministic crash tests do).
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n.clamp(1, crate::par::threads());
        self
    }

    fn tmp_path(&self, seq: u64) -> Result<std::path::PathBuf> {
        let dir = self.layout.tmp();
        self.ensure_dir(&dir)?;
        let p = dir.join(format!("{}-{seq}", self.txn));
        not_found_ok(self.fs.remove_file(&p)).at("remove", &p)?;
        Ok(p)
    }

    /// Move the old stack's `path` to `.stack/trash/<txn>/<seq>`, where a
    /// rollback finds it (`reconcile::undo`). Kept there already: the removal
    /// ran (this is a redo), and what holds the name now was made after it:
    /// a later put's of this transaction, or a user's file — left for that
    /// put to judge, else moved to the quarantine (durably, and said in the
    /// warnings), never over the kept file; the same inode as the kept file
    /// is a no-replace rename cut between its link and its unlink, finished.
    fn to_trash(&self, seq: u64, path: &Path) -> Result<()> {
        if !entry_exists(self.fs, path)? {
            return Ok(());
        }
        let dst = self.layout.kept(self.txn, seq);
        if entry_exists(self.fs, &dst)? {
            if same_file(self.fs, path, &dst) {
                return not_found_ok(self.fs.remove_file(path)).at("remove", path);
            }
            let rel = self.rel_of(path);
            if self.put_names.contains(&rel) {
                return Ok(());
            }
            return self.quarantine_in_the_way(&rel);
        }
        self.ensure_dir(&self.layout.trash_of(self.txn))?;
        match self.fs.rename_noreplace(path, &dst) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r.at("rename", path),
        }
    }

    /// Before a put takes the name `dst`: move what is there out of the way.
    /// The old stack's file goes to `.stack/trash/<txn>/<seq>` ([`Self::to_trash`]);
    /// anything else — a file the user made at a name the old stack did not
    /// hold, or one made after the old file was kept or removed — goes to the
    /// quarantine, durably, and the warnings say so. Nothing to move when the
    /// name is free, or when `dst` already holds this step's own file
    /// (`is_new`: a redo after the put; a power loss may have kept the put and
    /// lost the move), or a folder (the put's rename fails then, as it must).
    fn make_room(&self, seq: u64, dst: &Path, is_new: &dyn Fn() -> Result<bool>) -> Result<Room> {
        match self.fs.symlink_metadata(dst) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Room::Free),
            Err(e) => return Err(e).at("stat", dst),
            Ok(m) if m.kind == Kind::Dir => return Ok(Room::Taken),
            Ok(_) => {}
        }
        if is_new()? {
            return Ok(Room::Taken);
        }
        let kept = self.layout.kept(self.txn, seq);
        let rel = self.rel_of(dst);
        if !self.fs.exists(&kept).at("stat", &kept)? && self.held(&rel) {
            self.to_trash(seq, dst)?;
        } else {
            self.quarantine_in_the_way(&rel)?;
        }
        Ok(Room::Free)
    }

    /// Rename `from` onto `dst`, a put's name, once [`Self::make_room`] made room.
    /// A free name is taken by a rename that never replaces
    /// (`Fs::rename_noreplace`): a file that appears there in between makes it
    /// fail, and room is made again. The rename's own error is returned inside.
    fn rename_into(
        &self,
        seq: u64,
        from: &Path,
        dst: &Path,
        is_new: &dyn Fn() -> Result<bool>,
    ) -> Result<io::Result<()>> {
        for _ in 0..ATTEMPTS {
            let r = match self.make_room(seq, dst, is_new)? {
                Room::Taken => self.fs.rename(from, dst),
                Room::Free => self.fs.rename_noreplace(from, dst),
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                r => return Ok(r),
            }
        }
        Ok(Err(keeps_appearing(dst)))
    }

    /// Does the old stack hold `rel` (and no removal of this transaction
    /// vacated it)?
    fn held(&self, rel: &str) -> bool {
        self.old.as_ref().is_some_and(|h| h.contains(rel)) && !self.vacated.contains(rel)
    }

    fn rel_of(&self, path: &Path) -> String {
        path.strip_prefix(&self.layout.root)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned()
    }

    /// Move what holds `rel`, which is not stack's, to the quarantine before a
    /// put or a placed entry takes the name; durable before that rename (one
    /// `syncfs`, only when something moved), and said in the warnings.
    fn quarantine_in_the_way(&self, rel: &str) -> Result<()> {
        if self.to_quarantine(rel)? {
            self.warn_moved(rel);
            let root = &self.layout.root;
            self.fs.sync_fs(root).at("syncfs", root)?;
        }
        Ok(())
    }

    fn warn_moved(&self, rel: &str) {
        let kept = self.layout.quarantined(self.txn, rel);
        self.warnings.push(crate::reconcile::foreign::moved(
            rel,
            kept.strip_prefix(&self.layout.root).unwrap_or(&kept),
        ));
    }

    /// Move `rel`, which no state entry holds (a user's file, perhaps), to
    /// `.stack/quarantine/<txn>/<rel>`: out of the stack's folders, never
    /// destroyed (`gc --force` deletes it, explicitly). Gone already: moved before
    /// a crash, or by the user.
    /// A second file of that name quarantined by the same transaction (a
    /// user's, made after a crash moved the first) is refused, not renamed over
    /// the first.
    /// `Ok(true)`: moved; `Ok(false)`: nothing was there.
    fn to_quarantine(&self, rel: &str) -> Result<bool> {
        let src = self.layout.join(rel);
        if !entry_exists(self.fs, &src)? {
            return Ok(false);
        }
        let dst = self.layout.quarantined(self.txn, rel);
        // (The same inode there: a move cut between its link and its unlink,
        // which the rename below finishes.)
        if entry_exists(self.fs, &dst)? && !same_file(self.fs, &src, &dst) {
            let taken = io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} holds an earlier file of that name", dst.display()),
            );
            return Err(taken).at("rename", &src);
        }
        if let Some(parent) = dst.parent() {
            self.ensure_dir(parent)?;
        }
        match self.fs.rename_noreplace(&src, &dst) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            r => r.at("rename", &src).map(|()| true),
        }
    }

    /// Before a domain's folder `rel` goes to the trash whole: anything in it
    /// but its bundle is a user's (the pull's `RemoveStray` steps moved what
    /// was there when it planned; this is what appeared since) and goes to the
    /// quarantine, durably, said in the warnings. The folder gone already: the
    /// removal ran. An entry still there after that (a name that is not UTF-8
    /// cannot be named to move it) fails the step: the folder is never trashed
    /// with a user's file in it.
    fn quarantine_users_files_in(&self, rel: &str) -> Result<()> {
        let dir = self.layout.join(rel);
        match self.fs.symlink_metadata(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).at("stat", &dir),
            // Not a folder stack made (a link to one elsewhere): moved whole,
            // never followed.
            Ok(m) if m.kind != Kind::Dir => return self.quarantine_in_the_way(rel),
            Ok(_) => {}
        }
        let users = || -> Result<Option<Vec<String>>> {
            match self.fs.read_dir(&dir) {
                Ok(entries) => Ok(Some(
                    entries
                        .into_iter()
                        .map(|e| format!("{rel}/{}", e.name))
                        .filter(|entry| layout::bundle_slug_of(entry).is_none())
                        .collect(),
                )),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).at("list", &dir),
            }
        };
        let Some(found) = users()? else {
            return Ok(());
        };
        for entry in &found {
            self.quarantine_in_the_way(entry)?;
        }
        match users()?.unwrap_or_default().first() {
            None => Ok(()),
            Some(left) => {
                let stuck = io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{left} is not stack's and could not be moved out of the folder \
                         (a name that is not UTF-8?); move it out and pull again"
                    ),
                );
                Err(stuck).at("rename", &dir)
            }
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
                    self.warnings.push(format!(
                        "{} refused by the filesystem ({e}); copying instead",
                        strategy.as_str()
                    ));
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

    /// Redoing a put whose staged file is gone: was it applied and cleaned up
    /// already? That is the case when a transaction's `Committed` record was lost
    /// after its cleanup (a torn tail cut by recovery); `dst` then already holds
    /// `md5`, and the step is done. Otherwise the put must run (and fails if the
    /// staged file is missing).
    fn done_before(&self, staged: &Path, dst: &Path, md5: &str) -> Result<bool> {
        if self.fs.exists(staged).at("stat", staged)? {
            return Ok(false);
        }
        match crate::reconcile::origin::md5_file(self.fs, dst) {
            Ok(h) => Ok(h == md5),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).at("read", dst),
        }
    }

    fn ensure_dir(&self, dir: &Path) -> Result<()> {
        let mut made = self.made_dirs.lock().unwrap_or_else(|p| p.into_inner());
        if made.contains(dir) {
            return Ok(());
        }
        self.fs.create_dir_all(dir).map(|_| ()).at("mkdir", dir)?;
        made.insert(dir.to_path_buf());
        Ok(())
    }

    /// `Place`: move `.stack/staging/<staged>/` to `rel`. Gone already: moved
    /// before a crash (the travelling steps then run and find their files). `rel`
    /// there by now: the staged entries move in one by one ([`Self::merge`]).
    fn place(&self, staged: &str, rel: &str) -> Result<()> {
        let src = self.layout.staging().join(staged);
        let dst = self.layout.join(rel);
        if !self.fs.exists(&src).at("stat", &src)? {
            return Ok(());
        }
        if let Some(parent) = dst.parent() {
            self.ensure_dir(parent)?;
        }
        match self.fs.rename(&src, &dst) {
            Ok(()) => {}
            Err(e) if is_not_empty(&e) || e.kind() == io::ErrorKind::AlreadyExists => {
                self.merge(&src, rel)?;
            }
            Err(e) => return Err(e).at("rename", &dst),
        }
        self.made_dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(dst);
        self.placed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rel.to_string());
        Ok(())
    }

    /// Move the entries of the staged folder `src` into `rel`, which appeared
    /// after the plan was made (the user made it): whatever holds a staged
    /// entry's name there is not stack's, and goes to the quarantine first
    /// ([`Self::to_quarantine`], said in the warnings), durably before any
    /// staged entry takes a name (a power loss cannot keep a rename onto the
    /// name and lose the move out of it). Redone from the journaled `Place`
    /// alone: an entry still staged has not moved, so what holds its name now
    /// is still in the way; one moved already is no longer listed.
    fn merge(&self, src: &Path, rel: &str) -> Result<()> {
        let dst = self.layout.join(rel);
        let entries = self.fs.read_dir(src).at("list", src)?;
        let mut moved = false;
        for entry in &entries {
            let to = dst.join(&entry.name);
            if !entry_exists(self.fs, &to)? {
                continue;
            }
            let in_the_way = format!("{rel}/{}", entry.name);
            if self.to_quarantine(&in_the_way)? {
                self.warn_moved(&in_the_way);
                moved = true;
            }
        }
        if moved {
            let root = &self.layout.root;
            self.fs.sync_fs(root).at("syncfs", root)?;
        }
        // Never renamed over: a file that appears at an entry's name after the
        // look above makes the rename fail, and goes to the quarantine first.
        for entry in &entries {
            let from = src.join(&entry.name);
            let to = dst.join(&entry.name);
            let rel = format!("{rel}/{}", entry.name);
            let mut tries = 0;
            loop {
                match self.fs.rename_noreplace(&from, &to) {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < ATTEMPTS => {
                        self.quarantine_in_the_way(&rel)?;
                        tries += 1;
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        return Err(keeps_appearing(&to)).at("rename", &to)
                    }
                    r => break r.at("rename", &to)?,
                }
            }
        }
        self.fs.remove_dir(src).at("rmdir", src)
    }

    fn forget_dirs(&self) {
        self.made_dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Apply one event (no-op for events that are not apply steps).
    pub fn apply(&self, seq: u64, ev: &Event) -> Result<()> {
        let l = self.layout;
        {
            // (The folder's name is built only when something was placed.)
            let placed = self.placed.lock().unwrap_or_else(|p| p.into_inner());
            if !placed.is_empty()
                && place::travels_in(ev, self.sole_consumers.contains(&seq))
                    .is_some_and(|folder| placed.contains(&folder))
            {
                return Ok(());
            }
        }
        match ev {
            Event::Place { staged, rel } => self.place(staged, rel),
            Event::PutShared { table_id, md5 } => {
                let dst = l.join(&layout::shared_rel(table_id));
                let staged = l.staged(md5);
                // Staging made the staged file read-only (durably, before the
                // commit point), and the mode belongs to the inode: a rename or a
                // hard link keeps it. Recovery cannot know whose staging it was.
                if !self.staged_read_only {
                    not_found_ok(self.fs.set_readonly(&staged, true)).at("chmod", &staged)?;
                }
                if self.sole_consumers.contains(&seq) {
                    // Nothing else in this transaction needs the staged file: move it
                    // into place (atomically replacing an old version). A redo finds
                    // it gone, so the put ran (here, or in a placed folder that then
                    // moved) and what holds the name is its file — or a user's edit
                    // of it, which heal judges, as any edit of a stack file: no md5
                    // is checked (it need not be the bytes'). Its mode is set again
                    // (a power loss can keep a rename and lose a chmod made before
                    // it by an older engine).
                    self.ensure_dir(&l.shared_dir())?;
                    // The staged file still there: this put has not run, and what
                    // `dst` holds is not its file — unless it is the same inode
                    // (a no-replace rename done as link and unlink, cut between).
                    let ran = || {
                        Ok(!self.fs.exists(&staged).at("stat", &staged)?
                            || same_file(self.fs, &dst, &staged))
                    };
                    return match self.rename_into(seq, &staged, &dst, &ran)? {
                        Err(e)
                            if e.kind() == io::ErrorKind::NotFound
                                && !self.fs.exists(&staged).at("stat", &staged)?
                                && is_file(self.fs, &dst)? =>
                        {
                            self.fs.set_readonly(&dst, true).at("chmod", &dst)
                        }
                        r => r.at("rename", &dst),
                    };
                }
                if self.done_before(&staged, &dst, md5)? {
                    // The content is in place; its mode may not be.
                    return self.fs.set_readonly(&dst, true).at("chmod", &dst);
                }
                if self.fs.hard_link(&staged, &dst).is_ok() {
                    return Ok(());
                }
                self.ensure_dir(&l.shared_dir())?;
                let tmp = self.tmp_path(seq)?;
                // A hard link from staging costs no copy; staging is on the same
                // filesystem. Where links are refused, copy.
                self.link_or_copy(Strategy::Hardlink, &staged, &tmp, &staged)?;
                self.fs.set_readonly(&tmp, true).at("chmod", &tmp)?;
                // (The staged file is there: `done_before` said so.)
                let own = || Ok(copy_of_staged(self.fs, &dst, &staged)? == Some(true));
                self.rename_into(seq, &tmp, &dst, &own)?.at("rename", &dst)
            }
            Event::MakeRef {
                slot,
                table_id,
                name,
                strategy,
                ..
            } => {
                let dst = l.join(&layout::ref_rel(slot, name));
                let shared = l.join(&layout::shared_rel(table_id));
                let direct = match strategy {
                    Strategy::Symlink => self
                        .fs
                        .symlink(&layout::symlink_target(table_id), &dst)
                        .is_ok(),
                    Strategy::Hardlink => self.fs.hard_link(&shared, &dst).is_ok(),
                    // A copy or clone is written in place over time: it takes a
                    // temporary name.
                    Strategy::Copy | Strategy::Reflink => false,
                };
                if direct {
                    return Ok(());
                }
                self.ensure_dir(&l.join(&layout::slot_dir_rel(slot)))?;
                let tmp = self.tmp_path(seq)?;
                self.link_or_copy(*strategy, &shared, &tmp, &layout::symlink_target(table_id))?;
                if *strategy != Strategy::Symlink && *strategy != Strategy::Hardlink {
                    // A copy of a read-only file may keep its mode; references are the
                    // user's to read and write.
                    self.fs.set_readonly(&tmp, false).at("chmod", &tmp)?;
                }
                let own = || match strategy {
                    Strategy::Symlink => Ok(self
                        .fs
                        .read_link(&dst)
                        .is_ok_and(|t| t == layout::symlink_target(table_id))),
                    Strategy::Hardlink => Ok(same_file(self.fs, &dst, &shared)),
                    // A copy of its own, not a hard link to the shared file
                    // (a reference whose link mode changed).
                    Strategy::Copy | Strategy::Reflink => Ok(!same_file(self.fs, &dst, &shared)
                        && copy_of_staged(self.fs, &dst, &shared)? == Some(true)),
                };
                self.rename_into(seq, &tmp, &dst, &own)?.at("rename", &dst)
            }
            Event::RemoveRef { slot, name, .. } => {
                self.to_trash(seq, &l.join(&layout::ref_rel(slot, name)))
            }
            Event::RemoveShared { table_id } => {
                self.to_trash(seq, &l.join(&layout::shared_rel(table_id)))
            }
            Event::PutBundle { slug, md5 } => {
                let dir = l.join(&layout::domain_dir_rel(slug));
                let staged = l.staged(md5);
                let dst = l.join(&layout::bundle_rel(slug));
                if self.done_before(&staged, &dst, md5)? {
                    return Ok(());
                }
                self.ensure_dir(&dir)?;
                let tmp = self.tmp_path(seq)?;
                self.fs.copy_file(&staged, &tmp, false).at("copy", &tmp)?;
                let own = || Ok(copy_of_staged(self.fs, &dst, &staged)? == Some(true));
                self.rename_into(seq, &tmp, &dst, &own)?.at("rename", &dst)
            }
            Event::RemoveBundle { slug } => {
                self.forget_dirs();
                self.quarantine_users_files_in(&layout::domain_dir_rel(slug))?;
                self.to_trash(seq, &l.join(&layout::domain_dir_rel(slug)))
            }
            Event::RemoveDir { slot } => {
                self.forget_dirs();
                let dir = l.join(&layout::slot_dir_rel(slot));
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
                // (Under data/ or memory/: its decoder checked, as every event's names.)
                // A pull's stray stands where its put goes: not moved, the pull
                // fails (and rolls back) rather than overwrite it. gc is best
                // effort: a stray the user's permissions keep in place is
                // reported and skipped, never a step recovery must repeat.
                match self.to_quarantine(rel) {
                    Ok(true) => {
                        self.unsynced_strays.store(true, Ordering::Relaxed);
                        if self.strict_strays {
                            self.warn_moved(rel);
                        }
                        Ok(())
                    }
                    Ok(false) => Ok(()),
                    Err(e) if !e.is_crash() && !self.strict_strays => {
                        self.warnings.push(format!("gc could not move {rel}: {e}"));
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Event::Begin { .. }
            | Event::Stage { .. }
            | Event::Prepared
            | Event::Committed { .. }
            | Event::Aborted { .. }
            | Event::Checkpoint { .. }
            | Event::Request { .. } => Ok(()),
        }
    }

    /// Apply every event of a transaction, in order.
    pub fn apply_all(&mut self, records: &[Record]) -> Result<()> {
        // The room the transaction held for what it writes from here on
        // (`reconcile::room`): its writes go into the blocks it frees.
        let reserve = self.layout.reserve();
        if self.fs.exists(&reserve).at("stat", &reserve)? {
            crate::reconcile::room::release(self.fs, self.layout)?;
        }
        // Staged files that exactly one step of the transaction consumes can be
        // moved into place instead of linked and removed later.
        let uses = place::consumers(records.iter().map(|r| &r.event));
        // A transaction of strays alone is gc's; any other step makes it a pull's.
        self.strict_strays = records.iter().any(|r| {
            matches!(
                r.event,
                Event::Place { .. }
                    | Event::PutShared { .. }
                    | Event::MakeRef { .. }
                    | Event::PutBundle { .. }
                    | Event::RemoveRef { .. }
                    | Event::RemoveShared { .. }
                    | Event::RemoveBundle { .. }
            )
        });
        self.vacated = records
            .iter()
            .filter_map(|r| match &r.event {
                Event::RemoveRef { slot, name, .. } => Some(layout::ref_rel(slot, name)),
                Event::RemoveShared { table_id } => Some(layout::shared_rel(table_id)),
                _ => None,
            })
            .collect();
        self.put_names = records
            .iter()
            .filter_map(|r| match &r.event {
                Event::MakeRef { slot, name, .. } => Some(layout::ref_rel(slot, name)),
                Event::PutShared { table_id, .. } => Some(layout::shared_rel(table_id)),
                Event::PutBundle { slug, .. } => Some(layout::bundle_rel(slug)),
                _ => None,
            })
            .collect();
        self.sole_consumers = records
            .iter()
            .filter(|r| matches!(&r.event, Event::PutShared { md5, .. } if uses[md5.as_str()] == 1))
            .map(|r| r.seq)
            .collect();
        // A run of consecutive `PutShared` (or `MakeRef`) steps touches pairwise
        // distinct paths (one shared file per table id, one reference per slot and
        // name: validation made them unique), and each step's redo looks only at
        // its own paths. So the steps of a run may land in any order, and a crash
        // may keep any subset of them: recovery redoes the run whole either way.
        // A step of another kind is a barrier (removals before puts, puts before
        // the references that link to them).
        let mut rest = records;
        while let Some(first) = rest.first() {
            let kind = parallel_kind(&first.event);
            let len = match kind {
                Some(k) => rest
                    .iter()
                    .take_while(|r| parallel_kind(&r.event) == Some(k))
                    .count(),
                None => 1,
            };
            let (run, tail) = rest.split_at(len);
            if !matches!(first.event, Event::RemoveStray { .. })
                && self.unsynced_strays.swap(false, Ordering::Relaxed)
            {
                let root = &self.layout.root;
                self.fs.sync_fs(root).at("syncfs", root)?;
            }
            if self.threads > 1 {
                crate::par::map(run, self.threads, |r| self.apply(r.seq, &r.event))?;
            } else {
                for r in run {
                    self.apply(r.seq, &r.event)?;
                }
            }
            rest = tail;
        }
        Ok(())
    }
}

/// What [`Applier::make_room`] left at a put's name.
enum Room {
    /// Nothing: the put takes the name by a rename that never replaces.
    Free,
    /// The step's own file (a redo), or a folder the put's rename refuses.
    Taken,
}

/// How many times a put or a placed entry makes room again for a name that a
/// file keeps taking before its rename, before it gives up.
const ATTEMPTS: usize = 3;

fn keeps_appearing(dst: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "a file kept appearing at {} while stack moved it aside",
            dst.display()
        ),
    )
}

/// Does `path` hold content `md5` as a file of its own (not a symlink to
/// one: a reference whose link mode changed is not the step's file)?
pub(super) fn holds(fs: &dyn Fs, path: &Path, md5: &str) -> Result<bool> {
    match fs.symlink_metadata(path) {
        Ok(m) if m.kind == Kind::File => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).at("stat", path),
    }
    match crate::reconcile::origin::md5_file(fs, path) {
        Ok(h) => Ok(h == md5),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).at("read", path),
    }
}

/// Is `path` a file of its own (not a symlink, not a folder)?
pub(super) fn is_file(fs: &dyn Fs, path: &Path) -> Result<bool> {
    match fs.symlink_metadata(path) {
        Ok(m) => Ok(m.kind == Kind::File),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).at("stat", path),
    }
}

/// Is `path` a file of its own holding what the staged file `staged` holds:
/// that file moved or linked into place (one inode), or a copy of its bytes?
/// Decided without a hash: a manifest's md5 need not be the md5 of the bytes
/// (a hash the library's caller injected, a bundle under `TrustServer`).
/// `None`: `staged` is gone, so only the caller can tell.
pub(super) fn copy_of_staged(fs: &dyn Fs, path: &Path, staged: &Path) -> Result<Option<bool>> {
    let file = match fs.symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Some(false)),
        Err(e) => return Err(e).at("stat", path),
    };
    let from = match fs.symlink_metadata(staged) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).at("stat", staged),
    };
    if file.kind != Kind::File || from.kind != Kind::File {
        return Ok(Some(false));
    }
    if file.ino == from.ino && file.dev == from.dev {
        return Ok(Some(true));
    }
    same_bytes(fs, path, staged).map(Some)
}

/// Do the files `a` and `b` hold the same bytes (read side by side)?
pub(super) fn same_bytes(fs: &dyn Fs, a: &Path, b: &Path) -> Result<bool> {
    let open = |p: &Path| fs.open_read(p).at("read", p);
    let (mut x, mut y) = (open(a)?, open(b)?);
    let (mut bx, mut by) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = read_full(&mut x, &mut bx).at("read", a)?;
        let m = read_full(&mut y, &mut by).at("read", b)?;
        if bx[..n] != by[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Fill `buf` as far as `r` goes; the count read (short only at the end).
fn read_full(r: &mut dyn io::Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Are `a` and `b` names of one inode?
pub(super) fn same_file(fs: &dyn Fs, a: &Path, b: &Path) -> bool {
    match (fs.symlink_metadata(a), fs.symlink_metadata(b)) {
        (Ok(x), Ok(y)) => x.ino == y.ino && x.dev == y.dev,
        _ => false,
    }
}

/// Is there an entry named `path` (a dangling symlink included)?
pub(super) fn entry_exists(fs: &dyn Fs, path: &Path) -> Result<bool> {
    match fs.symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).at("stat", path),
    }
}

/// The kinds of step whose consecutive runs may be applied in parallel.
fn parallel_kind(ev: &Event) -> Option<&'static str> {
    match ev {
        Event::PutShared { .. } | Event::MakeRef { .. } => Some(ev.kind()),
        _ => None,
    }
}

fn is_not_empty(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::DirectoryNotEmpty || e.raw_os_error() == Some(libc::ENOTEMPTY)
}

/// The stat fingerprint of each of `rels` (`None`: not there), batch by batch
/// ([`heal::stat_batches`]: a first pull of 100k tables has 250k paths).
fn fingerprints(fs: &dyn Fs, layout: &Layout, rels: &[String]) -> Result<Vec<Vec<Option<StatFp>>>> {
    heal::stat_batches(fs, layout, rels, |rel, m| match m {
        Ok(m) => Ok(Some(StatFp::of(&m))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).at("stat", &layout.join(rel)),
    })
}

/// The relative paths a transaction wrote, whose fingerprints `Committed` records.
/// A `MakeRef` also names its shared file: the entry it (re)makes starts without a
/// shared fingerprint, and heal would otherwise re-hash that file and spend a
/// transaction refreshing it on the next, otherwise no-op, pull.
pub fn written_paths(records: &[Record]) -> Vec<String> {
    let mut out = Vec::new();
    let mut push = |p: String| out.push(p);
    for r in records {
        match &r.event {
            Event::PutShared { table_id, .. } => push(layout::shared_rel(table_id)),
            Event::MakeRef {
                slot,
                name,
                table_id,
                ..
            } => {
                push(layout::ref_rel(slot, name));
                push(layout::shared_rel(table_id));
            }
            Event::PutBundle { slug, .. } => push(layout::bundle_rel(slug)),
            _ => {}
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Finish a transaction whose apply steps ran: make them durable, write the state
/// file, append `Committed` and make it durable, then drop the leftovers (a
/// failure to, into `warnings`). Returns the new state.
#[allow(clippy::too_many_arguments)]
pub fn finish(
    fs: &dyn Fs,
    layout: &Layout,
    journal: &mut Journal,
    base: SyncState,
    txn: u64,
    records: Vec<Record>,
    refresh: &[String],
    warnings: &Warnings,
) -> Result<SyncState> {
    // 1. Every rename, link and write of the apply steps durable, in one call.
    fs.sync_fs(&layout.root).at("syncfs", &layout.root)?;
    // 2. The new state: the projection of base + this transaction (both consumed:
    // a large stack is not held twice).
    let mut paths = written_paths(&records);
    paths.extend(refresh.iter().cloned());
    let pulled = crate::replay::project::requested(records.iter().map(|r| &r.event));
    // The projection (CPU) runs while the fingerprints (stats of every written
    // path) fan out on other threads: they are independent.
    let project = move || {
        let mut state = base;
        // Consumed while their buffer shrinks: the records' memory goes back while
        // the state they become grows.
        let mut fold = TxnFold::default();
        for r in crate::drain::drain_freeing(records) {
            fold.event_owned(&mut state, r.event);
        }
        fold.finish(&mut state);
        compact_maps(&mut state);
        state
    };
    // The projection stays on this thread, which allocated the records: the new
    // state grows into the memory they free, in the same malloc arena (a state
    // built on another thread's arena grew beside it: 100k tables, +15 MiB peak).
    let (state, stats) = std::thread::scope(|s| {
        let stats = s.spawn(|| fingerprints(fs, layout, &paths));
        let state = project();
        let stats = stats
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (state, stats)
    });
    let (mut state, stats) = (state, stats?);
    // Paths and stats are consumed as the list of fingerprints fills (its exact
    // size allocated once): the three are not all whole at once.
    let mut fps: Vec<(String, StatFp)> =
        Vec::with_capacity(stats.iter().flatten().filter(|fp| fp.is_some()).count());
    let mut paths = crate::drain::drain_freeing(paths);
    for unit in stats {
        for fp in unit {
            let Some(rel) = paths.next() else { break };
            if let Some(fp) = fp {
                fps.push((rel, fp));
            }
        }
    }
    apply_fingerprints(&mut state, &fps);
    // 3. The state file (atomic replace), then `Committed`, durable. The record is
    // encoded first so the state can name the journal's end after it.
    let seq = journal.append(txn, Event::Committed { fingerprints: fps });
    let len = journal.seal()?;
    state.journal = crate::replay::state::JournalPos {
        txn,
        seq,
        at: Some(crate::replay::state::JournalEnd {
            len,
            base: journal.baseline(),
            seq,
            txn: journal.last_txn(),
            ino: journal.ino(),
        }),
        pulled,
    };
    write_state(fs, layout, &state)?;
    journal.sync()?;
    // 4. Leftovers: the trash, the scratch folder and consumed staged files. The
    // transaction is committed: a failure here costs only space (the next command
    // or `stack gc` retries), so it is a warning.
    if let Err(e) = clean_leftovers(fs, layout) {
        if e.is_crash() {
            return Err(e);
        }
        warnings.push(format!("could not clean .stack leftovers: {e}"));
    }
    Ok(state)
}

/// Are there leftovers of a transaction or a compaction (trash, scratch files, an
/// unfinished new journal, complete staged files or placed folders)? Reads only.
pub fn has_leftovers(fs: &dyn Fs, layout: &Layout) -> Result<bool> {
    for dir in [
        layout.trash(),
        layout.tmp(),
        layout.journal_compact(),
        layout.reserve(),
    ] {
        if fs.exists(&dir).at("stat", &dir)? {
            return Ok(true);
        }
    }
    let staging = layout.staging();
    match fs.read_dir(&staging) {
        Ok(entries) => Ok(entries.iter().any(is_leftover)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).at("list", &staging),
    }
}

/// A complete staged file, or a folder built out of sight (`reconcile::place`);
/// not a partial download (`*.part`), which the next pull resumes.
fn is_leftover(e: &crate::fs::DirEntry) -> bool {
    e.kind == Kind::Dir || (e.kind == Kind::File && !e.name.ends_with(".part"))
}

/// Remove the trash, the scratch folder, a compaction's unfinished new journal,
/// a transaction's reserve, every complete staged file and every folder built out of sight, keeping partial
/// downloads (`*.part`) for the next pull to resume. Checks before it touches, so a clean directory sees no mutation
/// at all.
pub fn clean_leftovers(fs: &dyn Fs, layout: &Layout) -> Result<()> {
    for dir in [layout.trash(), layout.tmp()] {
        if fs.exists(&dir).at("stat", &dir)? {
            fs.remove_tree(&dir).at("remove", &dir)?;
        }
    }
    // A compaction cut short before its rename: never the journal (the rename is
    // what would have made it one), possibly as large as it.
    let compact = layout.journal_compact();
    if fs.exists(&compact).at("stat", &compact)? {
        fs.remove_file(&compact).at("remove", &compact)?;
    }
    // A reserve whose transaction is over (rolled back, or applied).
    let reserve = layout.reserve();
    if fs.exists(&reserve).at("stat", &reserve)? {
        fs.remove_file(&reserve).at("remove", &reserve)?;
    }
    let staging = layout.staging();
    let entries = match fs.read_dir(&staging) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).at("list", &staging),
    };
    for e in entries.iter().filter(|e| is_leftover(e)) {
        let p = staging.join(&e.name);
        if e.kind == Kind::Dir {
            not_found_ok(fs.remove_tree(&p)).at("remove", &p)?;
        } else {
            not_found_ok(fs.remove_file(&p)).at("remove", &p)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::Path;

    use super::*;
    use crate::fs::sim::SimFs;

    fn write(fs: &SimFs, path: &Path, bytes: &[u8]) {
        fs.create_dir_all(path.parent().unwrap()).unwrap();
        let mut f = fs.create(path).unwrap();
        f.write_all(bytes).unwrap();
    }

    fn record(seq: u64, event: Event) -> Record {
        Record { seq, txn: 1, event }
    }

    /// A folder that appeared after planning gets the staged entries moved in one by
    /// one (the user's file stays); the travelling steps are then done without
    /// their own staged files; a redo after the folder is gone finds nothing to move.
    #[test]
    fn place_merges_into_a_folder_that_appeared_and_skips_travelling_steps() {
        let fs = SimFs::new();
        let l = Layout::new("/d");
        let staged = l.staging().join("place-0");
        write(&fs, &staged.join("t1.parquet"), b"one");
        write(&fs, &l.join("data/_shared/mine.txt"), b"the user's");
        let records = [
            record(
                1,
                Event::Place {
                    staged: "place-0".into(),
                    rel: layout::SHARED_DIR.into(),
                },
            ),
            record(
                2,
                Event::PutShared {
                    table_id: "t1".try_into().unwrap(),
                    md5: "0123456789abcdef0123456789abcdef".try_into().unwrap(),
                },
            ),
        ];
        Applier::new(&fs, &l, 1).apply_all(&records).unwrap();
        assert_eq!(fs.read(&l.join("data/_shared/t1.parquet")).unwrap(), b"one");
        assert_eq!(
            fs.read(&l.join("data/_shared/mine.txt")).unwrap(),
            b"the user's"
        );
        assert!(!fs.exists(&staged).unwrap(), "the staged folder is gone");
        // Redone (a crash before `Committed`): the staged folder is gone, so the put
        // runs as any other, finds its staged file gone, so moved: done, whatever
        // the md5 (a tag here, not the md5 of the bytes).
        Applier::new(&fs, &l, 1).apply_all(&records).unwrap();
        assert_eq!(fs.read(&l.join("data/_shared/t1.parquet")).unwrap(), b"one");
    }

    /// A folder that appeared after planning holding a file of a staged entry's
    /// name: that file goes to the quarantine before the staged entry takes the
    /// name, and the warnings say so. A crash at any operation of the merge,
    /// then a redo, ends the same way; a rollback (`undo`) puts the user's file
    /// back.
    #[test]
    fn place_quarantines_what_holds_a_staged_name_at_every_crash_point() {
        let l = Layout::new("/d");
        let mine = l.join("data/pkg/n.parquet");
        let kept = l.quarantined(1, "data/pkg/n.parquet");
        let setup = || {
            let fs = SimFs::new();
            let staged = l.staging().join("place-0");
            write(&fs, &staged.join("n.parquet"), b"staged n");
            write(&fs, &staged.join("m.parquet"), b"staged m");
            write(&fs, &mine, b"the user's");
            fs.make_durable();
            fs
        };
        let records = [record(
            1,
            Event::Place {
                staged: "place-0".into(),
                rel: "data/pkg".into(),
            },
        )];
        let applied = |fs: &SimFs, warnings: &[String]| {
            assert_eq!(fs.read(&mine).unwrap(), b"staged n");
            assert_eq!(fs.read(&l.join("data/pkg/m.parquet")).unwrap(), b"staged m");
            assert_eq!(fs.read(&kept).unwrap(), b"the user's");
            assert!(!fs.exists(&l.staging().join("place-0")).unwrap());
            assert!(
                warnings.iter().any(|w| w.contains("data/pkg/n.parquet")
                    && w.contains(".stack/quarantine/1/data/pkg/n.parquet")),
                "{warnings:?}"
            );
        };
        let fs = setup();
        let before = fs.ops();
        let mut applier = Applier::new(&fs, &l, 1);
        applier.apply_all(&records).unwrap();
        applied(&fs, &applier.take_warnings());
        let ops = fs.ops() - before;
        use crate::fs::sim::Crash;
        let modes = (0..8).map(Crash::PowerLossRandom).chain([Crash::Process]);
        for (n, mode) in (0..ops).flat_map(|n| modes.clone().map(move |m| (n, m))) {
            let crashed = setup();
            crashed.crash_after(n);
            assert!(Applier::new(&crashed, &l, 1).apply_all(&records).is_err());
            let fs = crashed.reboot(mode);
            // The user's bytes are at their name or in the quarantine, at every
            // crash point.
            let at = |p: &Path| fs.read(p).is_ok_and(|b| b == b"the user's");
            assert!(at(&mine) || at(&kept), "crash after {n} ops, {mode:?}");
            let mut redo = Applier::new(&fs, &l, 1);
            redo.apply_all(&records).unwrap();
            let warnings = redo.take_warnings();
            if at(&kept) && !warnings.is_empty() {
                applied(&fs, &warnings);
            } else {
                // Moved before the crash: the redo finds the name free.
                assert_eq!(fs.read(&kept).unwrap(), b"the user's", "crash after {n}");
                assert_eq!(fs.read(&mine).unwrap(), b"staged n");
            }
        }
        // Rolled back: the reference that travelled in the folder (a symlink,
        // as a travelling reference is) goes, since the old state held none,
        // and the user's file is back at its name.
        let fs = setup();
        let staged_n = l.staging().join("place-0/n.parquet");
        fs.remove_file(&staged_n).unwrap();
        fs.symlink(&layout::symlink_target("t1"), &staged_n)
            .unwrap();
        let mut records = records.to_vec();
        records.push(record(
            2,
            Event::MakeRef {
                slot: crate::journal::event::Slot::Package("pkg".try_into().unwrap()),
                table_id: "t1".try_into().unwrap(),
                name: "n".try_into().unwrap(),
                md5: "0123456789abcdef0123456789abcdef".try_into().unwrap(),
                size: None,
                strategy: Strategy::Symlink,
            },
        ));
        Applier::new(&fs, &l, 1).apply_all(&records).unwrap();
        assert_eq!(fs.read(&kept).unwrap(), b"the user's");
        crate::reconcile::undo::undo(
            &fs,
            &l,
            &SyncState::default(),
            1,
            &records,
            &Warnings::default(),
        )
        .unwrap();
        assert_eq!(fs.read(&mine).unwrap(), b"the user's");
        assert!(!fs.exists(&kept).unwrap());
    }

    /// A domain leaving the stack whose folder holds the user's files: the one
    /// the pull saw when it planned goes by its `RemoveStray`, one that appeared
    /// since by `RemoveBundle` itself, both to the quarantine (the second said
    /// in the warnings); the folder goes to the trash holding the bundle alone.
    /// A rollback puts the bundle and the first file back; the second stays in
    /// the quarantine, where the warning said it went.
    #[test]
    fn a_domain_leaving_keeps_the_users_files_and_rolls_back() {
        let fs = SimFs::new();
        let l = Layout::new("/d");
        write(&fs, &l.join("memory/ops/bundle.md"), b"stack's bundle");
        write(&fs, &l.join("memory/ops/notes.md"), b"the user's notes");
        write(&fs, &l.join("memory/ops/late.md"), b"made after planning");
        let old: SyncState = serde_json::from_str(
            r#"{"version": 1, "direct_tables": {}, "data_packages": {},
              "memory_domains": {"ops": {"md5": "0123456789abcdef0123456789abcdef",
                 "path": "memory/ops/bundle.md"}}}"#,
        )
        .unwrap();
        let records = [
            record(
                1,
                Event::RemoveStray {
                    rel: "memory/ops/notes.md".into(),
                },
            ),
            record(
                2,
                Event::RemoveBundle {
                    slug: "ops".try_into().unwrap(),
                },
            ),
        ];
        let mut applier = Applier::new(&fs, &l, 1).old_state(&old);
        applier.apply_all(&records).unwrap();
        let warnings = applier.take_warnings();
        assert!(!fs.exists(&l.join("memory/ops")).unwrap());
        let kept = |rel: &str| fs.read(&l.quarantined(1, rel));
        assert_eq!(kept("memory/ops/notes.md").unwrap(), b"the user's notes");
        assert_eq!(kept("memory/ops/late.md").unwrap(), b"made after planning");
        for rel in ["memory/ops/notes.md", "memory/ops/late.md"] {
            assert!(
                warnings
                    .iter()
                    .any(|w| w.contains(rel) && w.contains(".stack/quarantine/1/")),
                "{rel}: {warnings:?}"
            );
        }
        assert_eq!(
            fs.read(&l.trash().join("1/2/bundle.md")).unwrap(),
            b"stack's bundle"
        );
        let trashed = fs.read_dir(&l.trash().join("1/2")).unwrap();
        assert_eq!(trashed.len(), 1, "{trashed:?}");
        crate::reconcile::undo::undo(&fs, &l, &old, 1, &records, &Warnings::default()).unwrap();
        assert_eq!(
            fs.read(&l.join("memory/ops/bundle.md")).unwrap(),
            b"stack's bundle"
        );
        assert_eq!(
            fs.read(&l.join("memory/ops/notes.md")).unwrap(),
            b"the user's notes"
        );
        assert_eq!(kept("memory/ops/late.md").unwrap(), b"made after planning");
    }

    #[test]
    fn place_moves_the_folder_whole_when_its_name_is_free() {
        let fs = SimFs::new();
        let l = Layout::new("/d");
        let staged = l.staging().join("place-3");
        write(&fs, &staged.join("n.parquet"), b"x");
        let ev = Event::Place {
            staged: "place-3".into(),
            rel: "data/pkg".into(),
        };
        let before = fs.ops();
        Applier::new(&fs, &l, 1)
            .apply_all(&[record(1, ev)])
            .unwrap();
        assert_eq!(fs.read(&l.join("data/pkg/n.parquet")).unwrap(), b"x");
        // `data/` made, then one rename.
        assert_eq!(fs.ops() - before, 2, "{:?}", fs.op_log());
    }
}
