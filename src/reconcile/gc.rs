//! `stack gc`: remove staging leftovers, and move anything no state entry holds out
//! of the stack's folders.
//!
//! Owns: turning verify's orphan/untracked/unexpected findings into a journaled
//! transaction of `RemoveStray` events, and `.stack/quarantine/`. Invariants kept:
//! like a pull, every move is in the journal before it runs; a file no state entry
//! holds may be a user's, so it is moved to `.stack/quarantine/<txn>/<its path>`,
//! never deleted, unless the caller asks for it explicitly (`Sweep::Delete`, the
//! command line's `--force`, as `git clean` needs `-f`).

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{IoContext, Result, Warnings};
use crate::fs::Fs;
use crate::journal::event::{Event, Record};
use crate::journal::lock;
use crate::layout::Layout;
use crate::reconcile::apply::{finish, Applier};
use crate::reconcile::recover::replay;
use crate::verify::{audit, Contents};

/// What gc does with what no state entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// Move it to `.stack/quarantine/<txn>/` (recoverable).
    Quarantine,
    /// Move it, then delete it and everything quarantined before.
    Delete,
}

/// What gc did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Relative paths moved out of `data/` and `memory/`.
    pub moved: Vec<String>,
    /// Where they are now (`.stack/quarantine/<txn>`), unless deleted.
    pub kept_in: Option<PathBuf>,
    /// Paths under `.stack/` deleted: partial downloads, and with
    /// [`Sweep::Delete`] every quarantined folder.
    pub deleted: Vec<String>,
    /// What it could not do but survived (a stray it could not move, leftovers
    /// not cleaned), and recovery's warnings.
    pub warnings: Vec<String>,
}

/// Run gc.
pub fn gc(
    fs: Arc<dyn Fs>,
    layout: &Layout,
    command: &str,
    wait: bool,
    sweep: Sweep,
) -> Result<GcReport> {
    let _lock = lock::acquire(fs.as_ref(), layout, command, wait)?;
    // Maintenance: recover from the journal itself, never the fast path.
    let rec = replay(fs.clone(), layout)?;
    let warnings = Warnings::default();
    for w in rec.warnings {
        warnings.push(w);
    }
    let mut journal = rec.journal;
    let state = rec.state;
    let strays: Vec<String> = audit(fs.as_ref(), layout, &state, Contents::Skip)?
        .into_iter()
        .filter(|v| matches!(v.kind, "orphan" | "untracked" | "unexpected_domain"))
        .map(|v| v.path)
        .collect();
    let mut report = GcReport {
        deleted: remove_partials(fs.as_ref(), layout)?,
        ..GcReport::default()
    };
    if !strays.is_empty() {
        let txn = journal.new_txn();
        let mut records = Vec::new();
        for rel in &strays {
            let event = Event::RemoveStray { rel: rel.clone() };
            let seq = journal.append(txn, event.clone());
            records.push(Record { seq, txn, event });
        }
        journal.append(txn, Event::Prepared);
        journal.sync()?;
        let mut applier = Applier::new(fs.as_ref(), layout, txn);
        applier.apply_all(&records)?;
        for w in applier.take_warnings() {
            warnings.push(w);
        }
        finish(
            fs.as_ref(),
            layout,
            &mut journal,
            state,
            txn,
            records,
            &[],
            &warnings,
        )?;
        // Best effort: a stray the quarantine refused is in the warnings, not
        // in what the report says was moved.
        report.moved = strays
            .into_iter()
            .filter(|rel| fs.symlink_metadata(&layout.quarantined(txn, rel)).is_ok())
            .collect();
        if !report.moved.is_empty() {
            report.kept_in = Some(layout.quarantine_of(txn));
        }
    }
    if sweep == Sweep::Delete {
        // The moves are committed: what is deleted now is out of the stack's
        // folders, and the deletion was asked for.
        let q = layout.quarantine();
        match fs.read_dir(&q) {
            Ok(entries) => {
                for e in entries {
                    let p = q.join(&e.name);
                    fs.remove_tree(&p).at("remove", &p)?;
                    report.deleted.push(layout.rel(&p));
                }
                crate::fs::not_found_ok(fs.remove_dir(&q)).at("rmdir", &q)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).at("list", &q),
        }
        report.kept_in = None;
    }
    report.warnings = warnings.take();
    Ok(report)
}

/// Partial downloads are kept across pulls so they can resume; gc is the explicit
/// request to drop them. Engine-private and invisible: not journaled.
fn remove_partials(fs: &dyn Fs, layout: &Layout) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let staging = layout.staging();
    match fs.read_dir(&staging) {
        Ok(entries) => {
            for e in entries.into_iter().filter(|e| e.name.ends_with(".part")) {
                let p = staging.join(&e.name);
                crate::fs::not_found_ok(fs.remove_file(&p)).at("remove", &p)?;
                removed.push(layout.rel(&p));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).at("list", &staging),
    }
    Ok(removed)
}
