//! The projection: folding the journal into a [`SyncState`].
//!
//! Owns: the meaning of each event for the state file, and which records may be
//! folded at all ([`check_records`]). Architecture invariant: the state is a
//! function of the journal's records alone; a transaction changes it only if its
//! `Committed` record is in the journal (recovery appends that record for a
//! transaction past its `Prepared` commit point once it has rolled it forward).
//!
//! Every record folded here names its files by ids, names and slugs that are
//! single safe path components (`model::name::SafeName`, proved when the record
//! was decoded: a record naming anything else does not decode, and the journal's
//! scan ends there as corrupt). A `Checkpoint` record *is* a state, paths
//! included, so it must also pass the rule a `sync_state.json` must pass before
//! recovery trusts or adopts it ([`SyncState::check_paths`]: every path the
//! layout's for its entry). The engine writes no other checkpoint; one that fails
//! the check (naming an absolute path) was not written by stack, and folding it
//! would send heal, verify, recovery and the next pull's plan to paths outside the
//! directory. Such a journal is corrupt (exit 4), like a frame whose checksum is
//! valid but whose payload does not decode, and it is refused before anything is
//! folded, cut, rewritten or acted on. The journal's byte format (`journal::frame`)
//! reads such a checkpoint, so `journal show` lists the records before it reports
//! the refusal; every reader that acts on the records or vouches for them asks
//! [`check_journal`] (recovery, opening the journal for writing, asks
//! [`check_records`] through `Journal::open_checked`, before a torn tail is cut).

use std::collections::{BTreeMap, HashSet};

use crate::error::{Error, Result};
use crate::journal::event::{Event, Record, SafeName, Slot, SlotRef};
use crate::journal::Scan;
use crate::layout::{self, Layout};
use crate::replay::state::{DomainEntry, JournalPos, Pulled, StatFp, SyncState, TableEntry};

/// Refuse a journal holding a record the projection must not fold: a `Checkpoint`
/// whose state fails [`SyncState::check_paths`] (see the module docs; every other
/// record stack never writes does not even decode). The error is [`Error::JournalCorrupt`]
/// naming the first such record (its frame's byte offset, its number, its seq and
/// transaction) and the value that is wrong. Reads nothing but `scan`, and
/// allocates only the error: it runs over the whole journal before every fold.
pub fn check_records(layout: &Layout, scan: &Scan) -> Result<()> {
    for (i, (offset, r)) in scan.records.iter().enumerate() {
        check_record(layout, *offset, i as u64, r)?;
    }
    Ok(())
}

/// [`check_records`] for one record: the `index`-th of the journal, in the frame at
/// byte `offset`.
fn check_record(layout: &Layout, offset: u64, index: u64, r: &Record) -> Result<()> {
    let Event::Checkpoint { state } = &r.event else {
        return Ok(());
    };
    state.check_paths().map_err(|why| Error::JournalCorrupt {
        path: layout.journal(),
        offset,
        record: index,
        reason: format!(
            "{} seq {} (transaction {}) has a valid checksum but holds a state stack \
             never writes: {why}",
            r.event.kind(),
            r.seq,
            r.txn
        ),
    })
}

/// [`check_records`] as the records are read (`journal::frame::scan_with`), for a
/// reader that only checks them and need not hold them all: each record is checked
/// and dropped, and the first refusal kept, counted once its frame proves valid.
pub struct RecordCheck<'a> {
    layout: &'a Layout,
    /// Records of the valid frames so far, and of the frame being read.
    kept: u64,
    reading: u64,
    /// The first refusal among the valid frames' records, and in the frame being read.
    refused: Option<Error>,
    pending: Option<Error>,
}

impl<'a> RecordCheck<'a> {
    pub fn new(layout: &'a Layout) -> Self {
        RecordCheck {
            layout,
            kept: 0,
            reading: 0,
            refused: None,
            pending: None,
        }
    }

    /// How many records the valid frames hold.
    pub fn records(&self) -> u64 {
        self.kept
    }

    /// What [`check_records`] says of the records of the valid frames.
    pub fn result(self) -> Result<()> {
        match self.refused {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl crate::journal::frame::Sink for RecordCheck<'_> {
    fn record(&mut self, offset: u64, record: Record) {
        if self.refused.is_none() && self.pending.is_none() {
            let index = self.kept + self.reading;
            self.pending = check_record(self.layout, offset, index, &record).err();
        }
        self.reading += 1;
    }

    fn frame(&mut self, valid: bool) {
        if valid {
            self.kept += self.reading;
            if self.refused.is_none() {
                self.refused = self.pending.take();
            }
        }
        self.reading = 0;
        self.pending = None;
    }
}

/// The whole check of a scanned journal before its records are acted on or
/// vouched for: its end (`journal::check_end`: corruption, unknown version; a torn
/// tail is fine) and its records ([`check_records`]).
pub fn check_journal(layout: &Layout, scan: &Scan) -> Result<()> {
    crate::journal::check_end(layout, scan)?;
    check_records(layout, scan)
}

/// The last transaction, if it neither committed nor aborted.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub txn: u64,
    /// Did it reach its commit point?
    pub prepared: bool,
    /// Its records, in order.
    pub records: Vec<Record>,
}

/// The state the journal describes, and the transaction left open, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    pub state: SyncState,
    pub pending: Option<Pending>,
}

/// Fold records into the committed state. A checkpoint's state is taken as it is:
/// callers fold only records that [`check_records`] accepted.
pub fn project(records: &[Record]) -> Projection {
    let mut state = SyncState::default();
    let mut open: BTreeMap<u64, Vec<&Record>> = BTreeMap::new();
    // The transaction of the record just folded if it was a checkpoint.
    let mut checkpoint = None;
    for r in records {
        let after_checkpoint = std::mem::take(&mut checkpoint);
        match &r.event {
            Event::Checkpoint { state: s } => {
                state = (**s).clone();
                // The state stands at the checkpoint record itself; byte positions
                // of the journal it was taken from mean nothing here.
                state.journal = JournalPos {
                    txn: r.txn,
                    seq: r.seq,
                    at: None,
                    pulled: None,
                };
                open.clear();
                checkpoint = Some(r.txn);
            }
            // The request the checkpointed state realised, right after it in its
            // transaction (a compaction changes no table: the no-op key holds).
            Event::Request { .. } if after_checkpoint == Some(r.txn) => {
                state.journal.pulled = requested(std::iter::once(&r.event));
                state.journal.seq = r.seq;
            }
            Event::Committed { fingerprints } => {
                let txn_records = open.remove(&r.txn).unwrap_or_default();
                let pulled = requested(txn_records.iter().map(|r| &r.event));
                let mut fold = TxnFold::default();
                for tr in txn_records {
                    fold.event(&mut state, &tr.event);
                }
                fold.finish(&mut state);
                apply_fingerprints(&mut state, fingerprints);
                state.journal = JournalPos {
                    txn: r.txn,
                    seq: r.seq,
                    at: None,
                    pulled,
                };
            }
            Event::Aborted { .. } => {
                open.remove(&r.txn);
            }
            _ => open.entry(r.txn).or_default().push(r),
        }
    }
    // Only the newest open transaction can be pending: a writer recovers an open
    // one before starting another. Older open ones (impossible unless a journal was
    // assembled by hand) are ignored, as never committed.
    let pending = open.into_iter().next_back().map(|(txn, recs)| Pending {
        txn,
        prepared: recs.iter().any(|r| r.event == Event::Prepared),
        records: recs.into_iter().cloned().collect(),
    });
    compact_maps(&mut state);
    Projection { state, pending }
}

/// [`apply_event`] for an event the caller no longer needs: the entry takes the
/// event's own strings instead of copies (a transaction's records are folded into
/// the new state without holding every id, name and md5 twice).
pub fn apply_event_owned(state: &mut SyncState, ev: Event) {
    match ev {
        Event::MakeRef {
            slot,
            table_id,
            name,
            md5,
            size,
            strategy,
        } => {
            let entry = TableEntry::new(name, md5, size, strategy);
            match slot {
                Slot::Direct => {
                    state.direct_tables.insert(table_id, entry);
                }
                Slot::Package(slug) => {
                    state
                        .data_packages
                        .entry(slug)
                        .or_default()
                        .insert(table_id, entry);
                }
            }
        }
        Event::PutBundle { slug, md5 } => {
            let entry = DomainEntry {
                md5,
                path: layout::bundle_rel(&slug),
                fp: None,
            };
            state.memory_domains.insert(slug, entry);
        }
        other => apply_event(state, &other),
    }
}

/// The request a transaction records (its `Request` event), which the state of its
/// `Committed` carries as `journal.pulled`.
pub fn requested<'a>(events: impl IntoIterator<Item = &'a Event>) -> Option<Pulled> {
    events.into_iter().find_map(|e| match e {
        Event::Request {
            key,
            skipped_direct,
            skipped_packages,
        } => Some(Pulled {
            key: key.clone(),
            skipped_direct: *skipped_direct,
            skipped_packages: *skipped_packages,
        }),
        _ => None,
    })
}

/// The state effect of one applied event.
pub fn apply_event(state: &mut SyncState, ev: &Event) {
    match ev {
        // The entry is made of the event's strings: one place builds it.
        Event::MakeRef { .. } | Event::PutBundle { .. } => apply_event_owned(state, ev.clone()),
        Event::RemoveRef {
            slot,
            table_id,
            name,
        } => {
            // Drop the entry only if it still is the reference of that name (the
            // planner removes before it makes, so this is a guard, not a rule).
            let matches = |e: &TableEntry| e.name == *name;
            match slot {
                Slot::Direct => {
                    if state.direct_tables.get(table_id).is_some_and(matches) {
                        state.direct_tables.remove(table_id);
                    }
                }
                Slot::Package(slug) => {
                    if let Some(tables) = state.data_packages.get_mut(slug) {
                        if tables.get(table_id).is_some_and(matches) {
                            tables.remove(table_id);
                        }
                        if tables.is_empty() {
                            state.data_packages.remove(slug);
                        }
                    }
                }
            }
        }
        Event::RemoveBundle { slug } => {
            state.memory_domains.remove(slug);
        }
        Event::PutShared { .. } => {
            let mut fold = TxnFold::default();
            fold.event(state, ev);
            fold.finish(state);
        }
        Event::Begin { .. }
        | Event::Stage { .. }
        | Event::RemoveShared { .. }
        | Event::RemoveDir { .. }
        | Event::Prepared
        | Event::Committed { .. }
        | Event::Aborted { .. }
        | Event::Checkpoint { .. }
        | Event::RemoveStray { .. }
        | Event::Request { .. }
        | Event::Place { .. } => {}
    }
}

/// One transaction's events folded into a state: [`apply_event`] for each, except
/// that the shared files' fingerprints its puts make stale (a put's file is new:
/// every entry's old fingerprint of it is stale) are forgotten in one pass over the
/// entries at the end ([`TxnFold::finish`]), not in one pass per put (a 1 % update
/// of 100k tables made 1,000 passes over 150k entries: 5.8 s). The outcome is the
/// same: between a put and the end of its transaction no event sets a shared
/// fingerprint (only `Committed`'s fingerprints do, after `finish`), and an entry
/// made after the put has none.
#[derive(Default)]
pub struct TxnFold {
    /// The ids of the tables whose shared file was put.
    stale: HashSet<SafeName>,
}

impl TxnFold {
    /// Fold `ev`.
    pub fn event(&mut self, state: &mut SyncState, ev: &Event) {
        match ev {
            Event::PutShared { table_id, .. } => {
                self.stale.insert(table_id.clone());
            }
            _ => apply_event(state, ev),
        }
    }

    /// [`TxnFold::event`] for an event the caller no longer needs
    /// ([`apply_event_owned`]).
    pub fn event_owned(&mut self, state: &mut SyncState, ev: Event) {
        match ev {
            Event::PutShared { table_id, .. } => {
                self.stale.insert(table_id);
            }
            other => apply_event_owned(state, other),
        }
    }

    /// Forget the stale fingerprints. Call once the transaction's events are folded.
    pub fn finish(self, state: &mut SyncState) {
        if self.stale.is_empty() {
            return;
        }
        for_each_entry(state, |_, id, e| {
            if e.shared_fp.is_some() && e.shared_id(id).is_some_and(|t| self.stale.contains(t)) {
                e.shared_fp = None;
            }
        });
    }
}

/// `f(slot, id, entry)` for every table entry.
fn for_each_entry(state: &mut SyncState, mut f: impl FnMut(SlotRef<'_>, &str, &mut TableEntry)) {
    for (id, e) in state.direct_tables.iter_mut() {
        f(SlotRef::Direct, id, e);
    }
    for (slug, tables) in state.data_packages.iter_mut() {
        for (id, e) in tables.iter_mut() {
            f(SlotRef::Package(slug), id, e);
        }
    }
}

/// Record fingerprints (relative path → stat) on the entries that hold those paths.
pub fn apply_fingerprints(state: &mut SyncState, fps: &[(String, StatFp)]) {
    if fps.is_empty() {
        return;
    }
    // A sorted list searched by halves: a third of the memory of a map. A path
    // listed twice keeps its last fingerprint, as inserting into a map did.
    let mut by_path: Vec<(&str, StatFp)> = fps.iter().map(|(p, fp)| (p.as_str(), *fp)).collect();
    by_path.sort_by(|a, b| a.0.cmp(b.0));
    let get = |path: &str| -> Option<StatFp> {
        let end = by_path.partition_point(|(p, _)| *p <= path);
        by_path[..end]
            .last()
            .filter(|(p, _)| *p == path)
            .map(|(_, fp)| *fp)
    };
    // Each entry's paths are built in one buffer (an entry does not hold them).
    let mut path = String::new();
    for_each_entry(state, |slot, id, e| {
        path.clear();
        e.push_ref_path(slot, &mut path);
        if let Some(fp) = get(&path) {
            e.ref_fp = Some(fp);
        }
        path.clear();
        e.push_shared_path(id, &mut path);
        if let Some(fp) = get(&path) {
            e.shared_fp = Some(fp);
        }
    });
    for d in state.memory_domains.values_mut() {
        if let Some(fp) = get(&d.path) {
            d.fp = Some(fp);
        }
    }
}

/// Rebuild the state's maps from their sorted contents. Maps filled by inserts in
/// key order (a transaction's references, a parsed state file) have nodes about
/// half full; a bulk build fills them, which saves about a third of a large
/// state's memory. The state is unchanged.
pub fn compact_maps(state: &mut SyncState) {
    state.direct_tables = std::mem::take(&mut state.direct_tables)
        .into_iter()
        .collect();
    for tables in state.data_packages.values_mut() {
        *tables = std::mem::take(tables).into_iter().collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::event::Slot;
    use crate::replay::state::{Md5Sum, Strategy, TableEntry};

    const FP: StatFp = StatFp {
        size: 1,
        mtime_ns: 2,
        ino: 3,
    };

    fn entry(slot: SlotRef<'_>, id: &str, shared_path: Option<&str>) -> TableEntry {
        let e = TableEntry::new(
            format!("n_{id}").try_into().unwrap(),
            Md5Sum::parse("0123456789abcdef0123456789abcdef").unwrap(),
            None,
            Strategy::Symlink,
        );
        let mut e = match shared_path {
            Some(shared) => {
                let mut r = String::new();
                e.push_ref_path(slot, &mut r);
                e.with_paths((slot, id), &r, shared)
            }
            None => e,
        };
        e.ref_fp = Some(FP);
        e.shared_fp = Some(FP);
        e
    }

    /// Which entries still hold a shared fingerprint: (slot, id).
    fn with_shared_fp(state: &SyncState) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (slot, id, e) in state.entries() {
            if e.shared_fp.is_some() {
                out.push((format!("{slot:?}"), id.to_string()));
            }
        }
        out
    }

    /// A transaction's puts forget exactly the shared fingerprints of the entries
    /// naming the put files (by id, or by an odd path), whatever the order of its
    /// events, as one pass per put did; references keep theirs.
    #[test]
    fn a_transaction_forgets_the_stale_shared_fingerprints_only() {
        let mut state = SyncState::default();
        state
            .direct_tables
            .insert("t1".try_into().unwrap(), entry(SlotRef::Direct, "t1", None));
        let p1 = state
            .data_packages
            .entry("p1".try_into().unwrap())
            .or_default();
        p1.insert(
            "t1".try_into().unwrap(),
            entry(SlotRef::Package(&"p1".try_into().unwrap()), "t1", None),
        );
        p1.insert(
            "t2".try_into().unwrap(),
            entry(SlotRef::Package(&"p1".try_into().unwrap()), "t2", None),
        );
        // An odd entry whose shared path names t1's file, and one naming no table's.
        p1.insert(
            "t9".try_into().unwrap(),
            entry(
                SlotRef::Package(&"p1".try_into().unwrap()),
                "t9",
                Some("data/_shared/t1.parquet"),
            ),
        );
        p1.insert(
            "t8".try_into().unwrap(),
            entry(
                SlotRef::Package(&"p1".try_into().unwrap()),
                "t8",
                Some("data/_other/t8.parquet"),
            ),
        );
        assert!(!state.data_packages["p1"]["t9"].has_own_paths());

        let put = |id: &str| Event::PutShared {
            table_id: id.try_into().unwrap(),
            md5: "0123456789abcdef0123456789abcdef".try_into().unwrap(),
        };
        let make = |slot: &str, id: &str| Event::MakeRef {
            slot: Slot::Package(slot.try_into().unwrap()),
            table_id: id.try_into().unwrap(),
            name: format!("n_{id}").try_into().unwrap(),
            md5: "0123456789abcdef0123456789abcdef".try_into().unwrap(),
            size: None,
            strategy: Strategy::Symlink,
        };
        let events = [put("t1"), make("p2", "t1"), put("t7"), make("p2", "t3")];

        let mut folded = state.clone();
        let mut fold = TxnFold::default();
        for ev in &events {
            fold.event(&mut folded, ev);
        }
        fold.finish(&mut folded);
        // One event at a time (`apply_event`), owned, and through `project`.
        let mut one_by_one = state.clone();
        for ev in &events {
            apply_event(&mut one_by_one, ev);
        }
        let mut owned = state.clone();
        let mut fold = TxnFold::default();
        for ev in events.clone() {
            fold.event_owned(&mut owned, ev);
        }
        fold.finish(&mut owned);

        assert_eq!(
            with_shared_fp(&folded),
            [
                ("Package(\"p1\")".to_string(), "t2".to_string()),
                ("Package(\"p1\")".to_string(), "t8".to_string()),
            ]
        );
        assert_eq!(folded, one_by_one);
        assert_eq!(folded, owned);
        // References keep their fingerprints; those made here have none yet.
        for (slot, id, e) in folded.entries() {
            let made = slot == SlotRef::Package(&"p2".try_into().unwrap());
            assert_eq!(e.ref_fp, (!made).then_some(FP), "{slot:?} {id}");
        }
    }
}
