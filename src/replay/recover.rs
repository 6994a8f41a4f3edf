//! Recovery: bring a directory back to its last committed stack, or to the new one.
//!
//! Owns: `stack journal replay` and the recovery every mutating command runs first.
//! Invariant kept (contract invariant 6): a transaction without its `Prepared` commit
//! point is rolled back (nothing visible had changed: its staged files are dropped,
//! partial downloads kept for resuming); one past its commit point is rolled forward
//! from staged content, with no network; then `sync_state.json` is made equal to the
//! projection of the journal, which is the truth.

use std::sync::Arc;

use crate::error::Result;
use crate::fs::Fs;
use crate::journal::event::Event;
use crate::journal::Journal;
use crate::layout::Layout;
use crate::reconcile::apply::{clean_leftovers, finish, Applier};
use crate::replay::project::project;
use crate::replay::state::{read_state, write_state, SyncState};

/// A directory after recovery: its journal open for writing and its state.
pub struct Recovered {
    pub journal: Journal,
    pub state: SyncState,
    /// What recovery did, one line each (empty if nothing was needed).
    pub notes: Vec<String>,
}

/// Recover `layout`'s directory. Hold the directory lock.
pub fn recover(fs: Arc<dyn Fs>, layout: &Layout) -> Result<Recovered> {
    let opened = Journal::open(fs.clone(), layout)?;
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
        let candidate = read_state(fs.as_ref(), layout).ok().flatten();
        if let Some(Err(why)) = candidate.as_ref().map(SyncState::check_paths) {
            notes.push(format!(
                "journal was missing and sync_state.json is not usable ({why}); starting empty"
            ));
        }
        if let Some(adopted) = candidate.filter(|s| s.check_paths().is_ok()) {
            journal.compact(&adopted)?;
            notes.push("journal was missing; started a new one from sync_state.json".to_string());
            return Ok(Recovered {
                journal,
                state: adopted,
                notes,
            });
        }
    }
    let projection = project(&opened.records);
    let mut state = projection.state;
    if let Some(p) = projection.pending {
        if p.prepared {
            let applier = Applier::new(fs.as_ref(), layout, p.txn);
            applier.apply_all(&p.records)?;
            state = finish(
                fs.as_ref(),
                layout,
                &mut journal,
                &state,
                p.txn,
                &p.records,
                &[],
            )?;
            notes.push(format!(
                "rolled transaction {} forward (it had passed its commit point)",
                p.txn
            ));
        } else {
            clean_leftovers(fs.as_ref(), layout)?;
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
    // The state file must equal the projection.
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
    Ok(Recovered {
        journal,
        state,
        notes,
    })
}
