//! `stack gc`: remove staging leftovers and anything no state entry holds.
//!
//! Owns: turning verify's orphan/untracked/unexpected findings into a journaled
//! transaction of `RemoveStray` events. Invariant kept: like a pull, every removal
//! is in the journal before it runs, and goes to the trash first.

use std::sync::Arc;

use crate::error::{IoContext, Result, Warnings};
use crate::fs::Fs;
use crate::journal::event::{Event, Record};
use crate::journal::lock;
use crate::layout::Layout;
use crate::reconcile::apply::{finish, Applier};
use crate::reconcile::recover::replay;
use crate::verify::{audit, Contents};

/// What a gc did.
#[derive(Debug, Default)]
pub struct GcReport {
    /// The relative paths removed: the partial downloads, or, when there were
    /// strays, the strays.
    pub removed: Vec<String>,
    /// What it could not do but survived (a stray it could not remove, leftovers
    /// not cleaned), and recovery's warnings.
    pub warnings: Vec<String>,
}

/// Run gc.
pub fn gc(fs: Arc<dyn Fs>, layout: &Layout, command: &str, wait: bool) -> Result<GcReport> {
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
    // Partial downloads are kept across pulls so they can resume; gc is the
    // explicit request to drop them. Engine-private and invisible: not journaled.
    let mut removed = Vec::new();
    let staging = layout.staging();
    match fs.read_dir(&staging) {
        Ok(entries) => {
            for e in entries.into_iter().filter(|e| e.name.ends_with(".part")) {
                let p = staging.join(&e.name);
                crate::fs::not_found_ok(fs.remove_file(&p)).at("remove", &p)?;
                removed.push(format!(".stack/staging/{}", e.name));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).at("list", &staging),
    }
    if strays.is_empty() {
        return Ok(GcReport {
            removed,
            warnings: warnings.take(),
        });
    }
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
    Ok(GcReport {
        removed: strays,
        warnings: warnings.take(),
    })
}
