//! Recovery: bring a directory back to its last committed stack, or to the new one.
//!
//! Owns: `stack journal replay` and the recovery every mutating command runs first.
//! Invariant kept (contract invariant 6): a transaction without its `Prepared` commit
//! point is rolled back (nothing visible had changed: its staged files are dropped,
//! partial downloads kept for resuming); one past its commit point is rolled forward
//! from staged content, with no network; then `sync_state.json` is made equal to the
//! projection of the journal, which is the truth.
//!
//! Neither a state file nor a journal steers recovery to paths stack does not
//! write: the state file is trusted (fast path) or adopted (journal missing) only
//! if it passes `SyncState::check_paths` (its names and md5s were proved when it was
//! parsed); a journal holding a record that names a name, slug or path that could
//! leave the directory (it does not decode), or a checkpoint that fails
//! `SyncState::check_paths` (`replay::project::check_records`), is refused as
//! corrupt (exit 4) before anything is folded, cut or rewritten, and so is
//! appending to it after the fast path.

use std::sync::Arc;

use crate::error::{IoContext, Result, Warnings};
use crate::fs::Fs;
use crate::journal::event::Event;
use crate::journal::Journal;
use crate::layout::Layout;
use crate::reconcile::apply::{clean_leftovers, finish, has_leftovers, Applier};
use crate::replay::project::{check_records, project, RecordCheck};
use crate::replay::state::{read_state, read_state_file, write_state, SyncState};

/// A directory after recovery: its journal open for writing and its state.
pub struct Recovered {
    pub journal: Journal,
    pub state: SyncState,
    /// What recovery did, one line each (empty if nothing was needed).
    pub notes: Vec<String>,
    /// What it could not do but survived (a link fallback, leftovers not cleaned).
    pub warnings: Vec<String>,
    /// Taken on the fast path: the state file was trusted and the journal not read.
    /// Before appending, a caller checks the journal ([`journal_is_clean`]).
    pub trusted: bool,
}

/// Before the first append after the fast path: read and check the whole journal,
/// so that nothing is ever appended to a corrupt one (exit 4, file untouched).
/// `Ok(false)`: its end is torn, and a full [`replay`] must run first.
pub fn journal_is_clean(fs: &dyn Fs, layout: &Layout) -> Result<bool> {
    Ok(check_journal_file(fs, layout)?.is_some_and(|c| c.end == crate::journal::End::Clean))
}

/// What [`check_journal_file`] found in a journal that passed.
pub struct Checked {
    /// How many valid records it holds, and the length of its valid prefix.
    pub records: u64,
    pub valid_len: u64,
    /// How the valid prefix ends (`Clean`, or a torn tail a writer may cut).
    pub end: crate::journal::End,
}

/// Read the journal file and check it: `Ok(None)` if there is none, an error if
/// [`check_journal`](crate::replay::project::check_journal) of its whole scan would
/// refuse it (the same checks, in the same order, with the same errors).
///
/// Each record is checked as it is decoded and dropped ([`RecordCheck`]), and the
/// file is read a frame at a time (`journal::frame::scan_read`): neither a large
/// journal's records nor its bytes are ever all held (at 100k tables, 350,000
/// records in 34 MB; the check before an append runs while the state, the
/// manifest and the plan are alive).
pub fn check_journal_file(fs: &dyn Fs, layout: &Layout) -> Result<Option<Checked>> {
    let path = layout.journal();
    let file = match fs.open_read(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).at("read", &path),
    };
    // Only sizes the frames' buffers: 0 (unknown) costs a few reallocations.
    let size = fs.metadata(&path).map_or(0, |m| m.len);
    let mut check = RecordCheck::new(layout);
    let (valid_len, end) =
        crate::journal::frame::scan_read(file, size, &mut check).at("read", &path)?;
    crate::journal::check_end_of(layout, &end)?;
    let records = check.records();
    check.result()?;
    Ok(Some(Checked {
        records,
        valid_len,
        end,
    }))
}

/// The fast path: a state file naming the journal's file and its exact current
/// length (`end`: inode and length) was written for the journal's last record, and
/// nothing was appended since — so no transaction is open and the file is the
/// projection. Taking it costs one stat and one read instead of replaying the
/// journal. Only leftovers are cleaned.
///
/// `peeked`: the state file as read before the lock was taken ([`peek`]); used if
/// it is still the same file and the journal still ends where it says.
pub fn recover_trusted(
    fs: &Arc<dyn Fs>,
    layout: &Layout,
    peeked: Option<Peeked>,
) -> Result<Option<Recovered>> {
    let still = match peeked {
        Some(p) if state_stamp(fs.as_ref(), layout)? == Some(p.stamp) => {
            let id = journal_id(fs.as_ref(), layout)?;
            Some(p.state).filter(|s| names_journal(s, id))
        }
        _ => None,
    };
    let state = match still {
        Some(s) => s,
        None => match trusted_state(fs.as_ref(), layout)? {
            Some(s) => s,
            None => return Ok(None),
        },
    };
    // Leftovers mean the last command died after writing `Committed`, maybe before
    // it was durable: the slow path makes the journal durable before anything acts
    // on what it read (removing staged files a roll-forward could still need).
    if has_leftovers(fs.as_ref(), layout)? {
        return Ok(None);
    }
    let Some(end) = state.journal.at else {
        return Ok(None);
    };
    let journal = Journal::open_trusted(fs.clone(), layout, end)?;
    Ok(Some(Recovered {
        journal,
        state,
        notes: Vec::new(),
        warnings: Vec::new(),
        trusted: true,
    }))
}

/// A state file read without the directory lock (a pull deciding whether its
/// manifest must be parsed at all), and the stat of the file it was read from.
pub struct Peeked {
    pub state: SyncState,
    stamp: (u64, u64, u64, i128),
}

/// The trusted state file ([`trusted_state`]), read without the lock. Only a hint
/// until [`recover_trusted`], holding the lock, finds the same file.
pub fn peek(fs: &dyn Fs, layout: &Layout) -> Result<Option<Peeked>> {
    let Some(stamp) = state_stamp(fs, layout)? else {
        return Ok(None);
    };
    let state = trusted_state(fs, layout)?;
    // Stamped before and after the read: a file replaced meanwhile is not taken.
    if state_stamp(fs, layout)? != Some(stamp) {
        return Ok(None);
    }
    Ok(state.map(|state| Peeked { state, stamp }))
}

/// What identifies one version of the state file (it is only ever replaced by a
/// rename, so a new version is a new inode).
fn state_stamp(fs: &dyn Fs, layout: &Layout) -> Result<Option<(u64, u64, u64, i128)>> {
    let path = layout.state_file();
    match fs.metadata(&path) {
        Ok(m) => Ok(Some((m.dev, m.ino, m.len, m.mtime_ns))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).at("stat", &path),
    }
}

/// The journal file's (length, inode), if it exists.
fn journal_id(fs: &dyn Fs, layout: &Layout) -> Result<Option<(u64, u64)>> {
    let path = layout.journal();
    match fs.metadata(&path) {
        Ok(m) => Ok(Some((m.len, m.ino))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).at("stat", &path),
    }
}

/// Does `state` name the journal file `id` (length, inode) as it is now? Not only
/// its length: a compaction replaces the file, possibly by one of the same length.
fn names_journal(state: &SyncState, id: Option<(u64, u64)>) -> bool {
    state
        .journal
        .at
        .is_some_and(|at| Some((at.len, at.ino)) == id)
}

/// The state file, if it names the journal's file and exact current length (the
/// fast path's condition); reads only.
pub fn trusted_state(fs: &dyn Fs, layout: &Layout) -> Result<Option<SyncState>> {
    let Some(id) = journal_id(fs, layout)? else {
        return Ok(None);
    };
    Ok(match read_state(fs, layout) {
        Ok(Some(s)) if names_journal(&s, Some(id)) && s.check_paths().is_ok() => Some(s),
        _ => None,
    })
}

/// Compact the journal to one checkpoint of `state`, then record the new journal
/// length in the state file so the next command keeps the fast path. (A copy of
/// `state` is made: a caller that is done with its state hands it over through
/// [`compact_state`] instead.)
pub fn compact(
    fs: &dyn Fs,
    layout: &Layout,
    journal: &mut Journal,
    state: &SyncState,
) -> Result<SyncState> {
    compact_state(fs, layout, journal, state.clone())
}

/// [`compact`], consuming the state (no copy of a large stack).
pub fn compact_state(
    fs: &dyn Fs,
    layout: &Layout,
    journal: &mut Journal,
    mut state: SyncState,
) -> Result<SyncState> {
    journal.compact(&state)?;
    // The checkpoint is now the journal's last (and only) record: the state is at it.
    state.journal.txn = journal.last_txn();
    state.journal.seq = journal.last_seq();
    state.journal.at = Some(journal.end());
    // The compacted journal keeps the last pull's request (`state.journal.pulled`)
    // after its checkpoint, and so does the file that must equal its projection: a
    // no-op pull after a compaction stays a no-op.
    write_state(fs, layout, &state)?;
    // `write_state` left its scratch folder behind; a `.stack/tmp` counts as a
    // leftover and would send the next command down the slow path (reading the
    // whole journal) although nothing is left to recover.
    let tmp = layout.tmp();
    if fs.exists(&tmp).at("stat", &tmp)? {
        fs.remove_tree(&tmp).at("remove", &tmp)?;
    }
    Ok(state)
}

/// `stack journal compact`: take the directory lock, recover from the journal
/// itself ([`replay`]: never the fast path, so a corrupt journal is refused rather
/// than compacted), then [`compact`]. Returns the journal's length before and after.
pub fn compact_dir(
    fs: Arc<dyn Fs>,
    layout: &Layout,
    command: &str,
    wait: bool,
) -> Result<(u64, u64)> {
    let _lock = crate::journal::lock::acquire(fs.as_ref(), layout, command, wait)?;
    let mut rec = replay(fs.clone(), layout)?;
    let before = rec.journal.len();
    compact(fs.as_ref(), layout, &mut rec.journal, &rec.state)?;
    Ok((before, rec.journal.len()))
}

/// A transaction past its commit point: roll it forward from its staged files;
/// if that fails (a fault that persists) and the disk still lets stack write,
/// roll it back from what it kept (`reconcile::undo`), in this same command. A
/// transaction already being rolled back (its `rolling-back` marker is in its
/// trash) is only rolled back: its staged files may be spent. Returns the state
/// and what was done; the error of rolling forward if neither could.
fn roll_forward_or_back(
    fs: &dyn Fs,
    layout: &Layout,
    journal: &mut Journal,
    old: SyncState,
    p: crate::replay::project::Pending,
    warnings: &Warnings,
) -> Result<(SyncState, String)> {
    let txn = p.txn;
    let marker = layout.rolling_back(txn);
    let failed = if fs.exists(&marker).at("stat", &marker)? {
        None
    } else {
        // Kept for a rollback: the forward path consumes the state it folds.
        let base = old.clone();
        let mut applier = Applier::new(fs, layout, txn).old_state(&old);
        let applied = applier.apply_all(&p.records);
        // What the steps moved aside is said whichever way the transaction ends.
        for w in applier.take_warnings() {
            warnings.push(w);
        }
        let forward = applied.and_then(|()| {
            finish(
                fs,
                layout,
                journal,
                base,
                txn,
                p.records.clone(),
                &[],
                warnings,
            )
        });
        match forward {
            Ok(state) => {
                let note =
                    format!("rolled transaction {txn} forward (it had passed its commit point)");
                return Ok((state, note));
            }
            Err(e) if e.is_crash() || journal.is_broken() => return Err(e),
            Err(e) => Some(e),
        }
    };
    let reason = failed.as_ref().map_or_else(
        || "an earlier rollback was interrupted".to_string(),
        |e| e.to_string(),
    );
    let mut back = || -> Result<()> {
        if failed.is_some() {
            // A `Committed` a failed sync kept queued is never written now.
            journal.discard_pending();
            // The marker that forbids rolling forward again, and what the apply
            // did (the old files it kept in the trash included), durable before
            // the first step is undone. An empty file: no data blocks.
            let dir = marker.parent().unwrap_or(&layout.root);
            fs.create_dir_all(dir).at("mkdir", dir)?;
            drop(fs.create(&marker).at("create", &marker)?);
            if let Err(e) = fs.sync_fs(&layout.root).at("syncfs", &layout.root) {
                // Nothing undone yet: without the marker, the next command may
                // still roll forward, once the disk lets it.
                if !e.is_crash() {
                    let _ = fs.remove_file(&marker);
                }
                return Err(e);
            }
        }
        crate::reconcile::undo::undo(fs, layout, &old, txn, &p.records, warnings)?;
        journal.append(
            txn,
            Event::Aborted {
                reason: format!("rolled back after its commit point: {reason}"),
            },
        );
        journal.sync()
    };
    match (back(), failed) {
        (Ok(()), _) => Ok((
            old,
            format!(
                "rolled transaction {txn} back to the previous stack: rolling it forward failed ({reason})"
            ),
        )),
        (Err(e), _) if e.is_crash() => Err(e),
        // Neither way: the forward error says what to fix; the next command
        // that can write tries again.
        (Err(_), Some(forward)) => Err(forward),
        (Err(e), None) => Err(e),
    }
}

/// Recover `layout`'s directory. Hold the directory lock.
pub fn recover(fs: Arc<dyn Fs>, layout: &Layout) -> Result<Recovered> {
    if let Some(fast) = recover_trusted(&fs, layout, None)? {
        return Ok(fast);
    }
    replay(fs, layout)
}

/// Recovery from the journal alone (`stack journal replay`): never trusts the state
/// file, always folds the journal and rewrites `sync_state.json` if it differs. A
/// corrupt journal, one holding a record stack never writes included, is an error
/// before anything in the directory changes.
pub fn replay(fs: Arc<dyn Fs>, layout: &Layout) -> Result<Recovered> {
    // A record stack never writes is refused before anything is cut.
    let opened = Journal::open_checked(fs.clone(), layout, |scan| check_records(layout, scan))?;
    let mut journal = opened.journal;
    let mut notes = Vec::new();
    if let Some((offset, cut, reason)) = &opened.torn {
        notes.push(format!(
            "journal: cut a torn tail of {cut} bytes at offset {offset} ({reason}); copy kept in .stack/journal.broken"
        ));
    }
    if opened.created {
        // No journal but a readable state file (a journal deleted by hand, or a
        // directory from an older engine): adopt the state file as a checkpoint, so
        // the history starts from what the directory holds instead of from nothing.
        // An unusable state file is not adopted; a disk that fails to read it
        // fails the command (exit 1), rather than starting the history empty.
        // Wherever it was projected: a moved directory's state still holds.
        let candidate = match read_state_file(fs.as_ref(), layout) {
            Ok(s) => s.map(|f| f.state),
            Err(crate::Error::State { message, .. }) => {
                notes.push(format!(
                    "journal was missing and sync_state.json is not usable ({message}); starting empty"
                ));
                None
            }
            Err(e) => return Err(e),
        };
        if let Some(Err(why)) = candidate.as_ref().map(SyncState::check_paths) {
            notes.push(format!(
                "journal was missing and sync_state.json is not usable ({why}); starting empty"
            ));
        }
        if let Some(mut adopted) = candidate.filter(|s| s.check_paths().is_ok()) {
            // Its no-op key vouched for a state the journal backed; not any more.
            adopted.journal.pulled = None;
            let adopted = compact_state(fs.as_ref(), layout, &mut journal, adopted)?;
            notes.push("journal was missing; started a new one from sync_state.json".to_string());
            return Ok(Recovered {
                journal,
                state: adopted,
                notes,
                warnings: Vec::new(),
                trusted: false,
            });
        }
    }
    let projection = project(&opened.records);
    let mut state = projection.state;
    let warnings = Warnings::default();
    if let Some(p) = projection.pending {
        if p.prepared {
            let (s, note) =
                roll_forward_or_back(fs.as_ref(), layout, &mut journal, state, p, &warnings)?;
            state = s;
            notes.push(note);
        } else {
            journal.append(
                p.txn,
                Event::Aborted {
                    reason: "interrupted before its commit point; rolled back".to_string(),
                },
            );
            journal.sync()?;
            notes.push(format!(
                "rolled transaction {} back (it had not reached its commit point)",
                p.txn
            ));
        }
    }
    // The state file must equal the projection (plus where the journal ends now,
    // so that the next command can take the fast path).
    if state != SyncState::default() || state.journal.seq > 0 {
        state.journal.at = Some(journal.end());
    }
    let on_disk = match read_state(fs.as_ref(), layout) {
        Ok(s) => s,
        Err(crate::Error::State { message, .. }) => {
            notes.push(format!(
                "sync_state.json: {message}; rebuilt from the journal"
            ));
            None
        }
        Err(e) => return Err(e),
    };
    let empty = state == SyncState::default();
    if on_disk.as_ref() != Some(&state) && !(empty && on_disk.is_none()) {
        write_state(fs.as_ref(), layout, &state)?;
        if on_disk.is_some() {
            notes.push(
                "sync_state.json differed from the journal; rebuilt from the journal".to_string(),
            );
        }
    }
    clean_leftovers(fs.as_ref(), layout)?;
    let warnings = warnings.take();
    Ok(Recovered {
        journal,
        state,
        notes,
        warnings,
        trusted: false,
    })
}
