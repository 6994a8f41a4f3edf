//! The journal's on-disk format under stress: round trips of arbitrary histories,
//! truncation at every byte, single-byte damage at every byte, hostile lengths,
//! version and corruption refusals, compaction, and I/O errors.
//!
//! Every exhaustive test states the exact outcome expected at each byte position,
//! derived from where the frames of the file start and end.

#![allow(clippy::disallowed_methods)] // fixtures corrupt and truncate journal files directly

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::strategy::Union;

use stack::fs::{Fs, RealFs};
use stack::journal::event::SlotRef;
use stack::journal::frame::{self, HEADER_LEN, MAGIC};
use stack::journal::{check_end, scan_file, End, Event, Journal, LinkMode, Record, Slot};
use stack::layout::Layout;
use stack::replay::state::{DomainEntry, JournalPos, StatFp, Strategy as RefStrategy, SyncState};
use stack::Error;

// ---------------------------------------------------------------------------
// Allocation probe: the largest single allocation made on the current thread.
// ---------------------------------------------------------------------------

struct PeakAlloc;

thread_local! {
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = PEAK.try_with(|p| p.set(p.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        note_alloc(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: AllocLayout) -> *mut u8 {
        note_alloc(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        note_alloc(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: PeakAlloc = PeakAlloc;

/// Run `f` and return its result with the largest single allocation it made.
fn peak_alloc_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    PEAK.with(|p| p.set(0));
    let out = f();
    (out, PEAK.with(|p| p.get()))
}

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

fn real_fs() -> Arc<dyn Fs> {
    Arc::new(RealFs)
}

fn temp_layout() -> (tempfile::TempDir, Layout) {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = Layout::new(dir.path());
    (dir, layout)
}

/// Append each batch and sync it as one frame; returns every record written.
fn write_batches(layout: &Layout, batches: &[Vec<(u64, Event)>]) -> Vec<Record> {
    let mut journal = Journal::open(real_fs(), layout).expect("open").journal;
    let mut written = Vec::new();
    for batch in batches {
        for (txn, event) in batch {
            let seq = journal.append(*txn, event.clone());
            written.push(Record {
                seq,
                txn: *txn,
                event: event.clone(),
            });
        }
        journal.sync().expect("sync");
    }
    written
}

fn read_journal(layout: &Layout) -> Vec<u8> {
    std::fs::read(layout.journal()).expect("read journal")
}

fn write_journal(layout: &Layout, bytes: &[u8]) {
    std::fs::create_dir_all(layout.private()).expect("mkdir");
    std::fs::write(layout.journal(), bytes).expect("write journal");
}

fn records_of(scan: &frame::Scan) -> Vec<Record> {
    scan.records.iter().map(|(_, r)| r.clone()).collect()
}

/// A frame of a valid journal: where it starts and ends, and how many records
/// precede it.
#[derive(Debug, Clone, Copy)]
struct FrameSpan {
    start: usize,
    end: usize,
    records_before: usize,
}

/// The frames of a journal known to be valid, from its length fields.
fn frame_spans(bytes: &[u8], batches: &[Vec<(u64, Event)>]) -> Vec<FrameSpan> {
    let mut spans = Vec::new();
    let mut at = HEADER_LEN;
    let mut records_before = 0;
    for batch in batches {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let end = at + frame::FRAME_HEADER_LEN + len;
        spans.push(FrameSpan {
            start: at,
            end,
            records_before,
        });
        records_before += batch.len();
        at = end;
    }
    assert_eq!(at, bytes.len(), "frame lengths must tile the file");
    spans
}

/// A frame with a correct length and checksum around an arbitrary payload.
fn raw_frame(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_le_bytes();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len);
    hasher.update(payload);
    let mut out = len.to_vec();
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// A header naming `version`, with a correct checksum.
fn header_with_version(version: u32) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&version.to_le_bytes());
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

fn fp(n: u64) -> StatFp {
    StatFp {
        size: n,
        mtime_ns: -(n as i64) * 1_000_003,
        ino: n * 7,
    }
}

/// An entry at `place` naming `data/_direct/<name>.parquet` and
/// `data/_shared/tbl_<name>.parquet`: paths that are not the layout's for the
/// places the sample puts it, so that odd entries travel through checkpoints.
fn table(
    name: &str,
    with_optionals: bool,
    place: (SlotRef<'_>, &str),
) -> stack::replay::state::TableEntry {
    let mut e = stack::replay::state::TableEntry::new(
        name.to_string(),
        format!("{:032x}", name.len()).into(),
        with_optionals.then_some(4096),
        RefStrategy::Hardlink,
    )
    .with_paths(
        place,
        &format!("data/_direct/{name}.parquet"),
        &format!("data/_shared/tbl_{name}.parquet"),
    );
    e.ref_fp = with_optionals.then(|| fp(1));
    e.shared_fp = with_optionals.then(|| fp(2));
    e
}

/// A small state with both present and absent optional fields.
fn sample_state() -> SyncState {
    let mut state = SyncState {
        journal: JournalPos {
            txn: 3,
            seq: 9,
            at: None,
            pulled: None,
        },
        ..SyncState::default()
    };
    state.direct_tables.insert(
        "tbl_a".into(),
        table("alpha", true, (SlotRef::Direct, "tbl_a")),
    );
    state.direct_tables.insert(
        "tbl_b".into(),
        table("beta", false, (SlotRef::Direct, "tbl_b")),
    );
    let mut pkg = BTreeMap::new();
    pkg.insert(
        "tbl_c".into(),
        table("gamma", false, (SlotRef::Package("sales"), "tbl_c")),
    );
    state.data_packages.insert("sales".into(), pkg);
    assert!(state.entries().all(|(_, _, e)| !e.has_own_paths()));
    state.memory_domains.insert(
        "ops".into(),
        DomainEntry {
            md5: "d41d8cd98f00b204e9800998ecf8427e".into(),
            path: "memory/ops/bundle.md".into(),
            fp: None,
        },
    );
    state
}

/// Five batches covering every event variant.
fn sample_batches() -> Vec<Vec<(u64, Event)>> {
    let md5 = "0123456789abcdef0123456789abcdef".to_string();
    vec![
        vec![
            (
                1,
                Event::Begin {
                    manifest_md5: md5.clone(),
                    link: LinkMode::Auto,
                },
            ),
            (
                1,
                Event::Stage {
                    md5: md5.clone(),
                    url: "https://example.com/t.parquet".into(),
                },
            ),
        ],
        vec![
            (
                1,
                Event::PutShared {
                    table_id: "tbl_a".into(),
                    md5: md5.clone(),
                },
            ),
            (
                1,
                Event::MakeRef {
                    slot: Slot::Package("sales".into()),
                    table_id: "tbl_a".into(),
                    name: "orders".into(),
                    md5: md5.clone(),
                    size: Some(123),
                    strategy: RefStrategy::Symlink,
                },
            ),
            (1, Event::Prepared),
        ],
        vec![(
            1,
            Event::Committed {
                fingerprints: vec![("data/_shared/tbl_a.parquet".into(), fp(5))],
            },
        )],
        vec![(
            2,
            Event::Checkpoint {
                state: Box::new(sample_state()),
            },
        )],
        vec![
            (
                3,
                Event::RemoveRef {
                    slot: Slot::Direct,
                    table_id: "tbl_a".into(),
                    name: "orders".into(),
                },
            ),
            (
                3,
                Event::RemoveShared {
                    table_id: "tbl_a".into(),
                },
            ),
            (
                3,
                Event::PutBundle {
                    slug: "ops".into(),
                    md5,
                },
            ),
            (3, Event::RemoveBundle { slug: "ops".into() }),
            (
                3,
                Event::RemoveDir {
                    slug: "sales".into(),
                },
            ),
            (
                3,
                Event::Aborted {
                    reason: "user interrupt".into(),
                },
            ),
        ],
    ]
}

/// A valid journal on disk made of the sample batches: (dir, layout, bytes,
/// records, frame spans).
fn sample_journal() -> (
    tempfile::TempDir,
    Layout,
    Vec<u8>,
    Vec<Record>,
    Vec<FrameSpan>,
) {
    let (dir, layout) = temp_layout();
    let batches = sample_batches();
    let records = write_batches(&layout, &batches);
    let bytes = read_journal(&layout);
    let spans = frame_spans(&bytes, &batches);
    (dir, layout, bytes, records, spans)
}

// ---------------------------------------------------------------------------
// Strategies.
// ---------------------------------------------------------------------------

fn arb_text() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

fn arb_fp() -> impl Strategy<Value = StatFp> {
    (any::<u64>(), any::<i64>(), any::<u64>()).prop_map(|(size, mtime_ns, ino)| StatFp {
        size,
        mtime_ns,
        ino,
    })
}

fn arb_ref_strategy() -> impl Strategy<Value = RefStrategy> {
    prop_oneof![
        Just(RefStrategy::Symlink),
        Just(RefStrategy::Hardlink),
        Just(RefStrategy::Copy),
        Just(RefStrategy::Reflink),
    ]
}

fn arb_link_mode() -> impl Strategy<Value = LinkMode> {
    prop_oneof![
        Just(LinkMode::Auto),
        Just(LinkMode::Symlink),
        Just(LinkMode::Hardlink),
        Just(LinkMode::Copy),
        Just(LinkMode::Reflink),
    ]
}

fn arb_slot() -> impl Strategy<Value = Slot> {
    prop_oneof![Just(Slot::Direct), arb_text().prop_map(Slot::Package)]
}

/// A table entry before it has a place: its paths are the layout's for the place
/// it is put in (`None`), or any text.
type RawEntry = (stack::replay::state::TableEntry, Option<(String, String)>);

fn arb_table_entry() -> impl Strategy<Value = RawEntry> {
    (
        (arb_text(), arb_text(), option::of(any::<u64>())),
        (option::of((arb_text(), arb_text())), arb_ref_strategy()),
        (option::of(arb_fp()), option::of(arb_fp())),
    )
        .prop_map(
            |((name, md5, size), (paths, strategy), (ref_fp, shared_fp))| {
                let mut e = stack::replay::state::TableEntry::new(name, md5.into(), size, strategy);
                e.ref_fp = ref_fp;
                e.shared_fp = shared_fp;
                (e, paths)
            },
        )
}

/// The entries of one slot, each given its paths there.
fn place(
    slot: SlotRef<'_>,
    raw: BTreeMap<String, RawEntry>,
) -> BTreeMap<String, stack::replay::state::TableEntry> {
    raw.into_iter()
        .map(|(id, (e, paths))| {
            let e = match paths {
                Some((ref_path, shared_path)) => e.with_paths((slot, &id), &ref_path, &shared_path),
                None => e,
            };
            (id, e)
        })
        .collect()
}

fn arb_domain() -> impl Strategy<Value = DomainEntry> {
    (arb_text(), arb_text(), option::of(arb_fp())).prop_map(|(md5, path, fp)| DomainEntry {
        md5,
        path,
        fp,
    })
}

fn arb_state() -> impl Strategy<Value = SyncState> {
    (
        (any::<u32>(), any::<u64>(), any::<u64>()),
        btree_map(arb_text(), arb_table_entry(), 0..3),
        btree_map(
            arb_text(),
            btree_map(arb_text(), arb_table_entry(), 0..3),
            0..3,
        ),
        btree_map(arb_text(), arb_domain(), 0..3),
    )
        .prop_map(
            |((version, txn, seq), direct_tables, data_packages, memory_domains)| SyncState {
                version,
                journal: JournalPos {
                    txn,
                    seq,
                    at: None,
                    pulled: None,
                },
                direct_tables: place(SlotRef::Direct, direct_tables),
                data_packages: data_packages
                    .into_iter()
                    .map(|(slug, raw)| {
                        let tables = place(SlotRef::Package(&slug), raw);
                        (slug, tables)
                    })
                    .collect(),
                memory_domains,
            },
        )
}

/// Any event, every variant reachable.
fn arb_event() -> impl Strategy<Value = Event> {
    Union::new(vec![
        (arb_text(), arb_link_mode())
            .prop_map(|(manifest_md5, link)| Event::Begin { manifest_md5, link })
            .boxed(),
        (arb_text(), arb_text())
            .prop_map(|(md5, url)| Event::Stage { md5, url })
            .boxed(),
        (arb_text(), any::<u64>(), any::<u64>())
            .prop_map(|(key, skipped_direct, skipped_packages)| Event::Request {
                key,
                skipped_direct,
                skipped_packages,
            })
            .boxed(),
        (arb_text(), arb_text())
            .prop_map(|(table_id, md5)| Event::PutShared { table_id, md5 })
            .boxed(),
        (
            arb_slot(),
            (arb_text(), arb_text(), arb_text()),
            option::of(any::<u64>()),
            arb_ref_strategy(),
        )
            .prop_map(
                |(slot, (table_id, name, md5), size, strategy)| Event::MakeRef {
                    slot,
                    table_id,
                    name,
                    md5,
                    size,
                    strategy,
                },
            )
            .boxed(),
        (arb_slot(), arb_text(), arb_text())
            .prop_map(|(slot, table_id, name)| Event::RemoveRef {
                slot,
                table_id,
                name,
            })
            .boxed(),
        arb_text()
            .prop_map(|table_id| Event::RemoveShared { table_id })
            .boxed(),
        (arb_text(), arb_text())
            .prop_map(|(slug, md5)| Event::PutBundle { slug, md5 })
            .boxed(),
        arb_text()
            .prop_map(|slug| Event::RemoveBundle { slug })
            .boxed(),
        arb_text()
            .prop_map(|slug| Event::RemoveDir { slug })
            .boxed(),
        Just(Event::Prepared).boxed(),
        vec((arb_text(), arb_fp()), 0..4)
            .prop_map(|fingerprints| Event::Committed { fingerprints })
            .boxed(),
        arb_text()
            .prop_map(|reason| Event::Aborted { reason })
            .boxed(),
        arb_state()
            .prop_map(|state| Event::Checkpoint {
                state: Box::new(state),
            })
            .boxed(),
    ])
}

/// Batches of (txn, event), each batch non-empty.
fn arb_batches() -> impl Strategy<Value = Vec<Vec<(u64, Event)>>> {
    vec(vec((0u64..50, arb_event()), 1..5), 1..5)
}

/// Records with contiguous seqs from an arbitrary start, split into batches.
fn arb_record_batches() -> impl Strategy<Value = Vec<Vec<Record>>> {
    (1u64..u64::MAX / 2, arb_batches()).prop_map(|(first_seq, batches)| {
        let mut seq = first_seq;
        batches
            .into_iter()
            .map(|batch| {
                batch
                    .into_iter()
                    .map(|(txn, event)| {
                        seq += 1;
                        Record {
                            seq: seq - 1,
                            txn,
                            event,
                        }
                    })
                    .collect()
            })
            .collect()
    })
}

// ---------------------------------------------------------------------------
// Round trips.
// ---------------------------------------------------------------------------

proptest! {
    /// Frames of arbitrary records, concatenated after a header, scan back to the
    /// same records and a clean end (pure, no disk).
    #[test]
    fn prop_frames_round_trip_in_memory(batches in arb_record_batches()) {
        let mut bytes = frame::header().to_vec();
        for batch in &batches {
            bytes.extend(frame::encode_frame(batch).expect("encode"));
        }
        let scan = frame::scan(&bytes);
        prop_assert_eq!(&scan.end, &End::Clean);
        prop_assert_eq!(scan.valid_len, bytes.len() as u64);
        let want: Vec<Record> = batches.into_iter().flatten().collect();
        prop_assert_eq!(records_of(&scan), want);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Journal::open + append + sync per batch, then scan_file: identical records,
    /// seqs from 1, clean end; reopening yields the same records and cuts nothing.
    #[test]
    fn prop_journal_round_trips_through_disk(batches in arb_batches()) {
        let (_dir, layout) = temp_layout();
        let written = write_batches(&layout, &batches);
        prop_assert!(written.iter().zip(1..).all(|(r, seq)| r.seq == seq));

        let scan = scan_file(&RealFs, &layout).expect("scan").expect("journal exists");
        prop_assert_eq!(&scan.end, &End::Clean);
        prop_assert_eq!(records_of(&scan), written.clone());

        let opened = Journal::open(real_fs(), &layout).expect("reopen");
        prop_assert!(opened.torn.is_none());
        prop_assert_eq!(opened.records, written.clone());
        prop_assert_eq!(opened.journal.last_seq(), written.len() as u64);
    }

    /// Compaction with an arbitrary state: the journal becomes one Checkpoint
    /// holding exactly that state with the next seq; later appends continue it,
    /// and "last checkpoint + tail" is the same as in the uncompacted history.
    #[test]
    fn prop_compaction_keeps_checkpoint_and_tail(
        history in arb_batches(),
        state in arb_state(),
        tail in vec((0u64..50, arb_event()), 1..4),
    ) {
        let (_dir, layout) = temp_layout();
        write_batches(&layout, &history);
        let mut journal = Journal::open(real_fs(), &layout).expect("open").journal;
        let seq_before = journal.last_seq();
        let txn_before = journal.last_txn();
        journal.compact(&state).expect("compact");

        let scan = scan_file(&RealFs, &layout).expect("scan").expect("exists");
        prop_assert_eq!(&scan.end, &End::Clean);
        let after = records_of(&scan);
        prop_assert_eq!(after.len(), 1);
        prop_assert_eq!(after[0].seq, seq_before + 1);
        prop_assert!(after[0].txn > txn_before);
        prop_assert_eq!(
            &after[0].event,
            &Event::Checkpoint { state: Box::new(state.clone()) }
        );

        for (txn, event) in &tail {
            journal.append(*txn, event.clone());
        }
        journal.sync().expect("sync tail");
        drop(journal);

        let compacted = Journal::open(real_fs(), &layout).expect("reopen").records;
        let mut uncompacted: Vec<Event> = history.iter().flatten().map(|(_, e)| e.clone()).collect();
        uncompacted.push(Event::Checkpoint { state: Box::new(state.clone()) });
        uncompacted.extend(tail.iter().map(|(_, e)| e.clone()));
        let compacted_events: Vec<Event> = compacted.iter().map(|r| r.event.clone()).collect();
        prop_assert_eq!(checkpoint_and_tail(&compacted_events), checkpoint_and_tail(&uncompacted));
        prop_assert!(compacted.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    }
}

/// What a replay folds: the last checkpoint's state and every event after it.
fn checkpoint_and_tail(events: &[Event]) -> (Option<SyncState>, Vec<Event>) {
    match events
        .iter()
        .rposition(|e| matches!(e, Event::Checkpoint { .. }))
    {
        Some(i) => {
            let Event::Checkpoint { state } = &events[i] else {
                unreachable!()
            };
            (Some((**state).clone()), events[i + 1..].to_vec())
        }
        None => (None, events.to_vec()),
    }
}

#[test]
fn compaction_keeps_the_request_the_state_realised() {
    use stack::replay::project::project;
    use stack::replay::state::Pulled;
    let (_dir, layout) = temp_layout();
    let mut journal = Journal::open(real_fs(), &layout).expect("open").journal;
    let pulled = Pulled {
        key: "0123456789abcdef0123456789abcdef".into(),
        skipped_direct: 2,
        skipped_packages: 3,
    };
    let mut state = sample_state();
    state.journal.pulled = Some(pulled.clone());
    journal.compact(&state).expect("compact");
    let (txn, seq) = (journal.last_txn(), journal.last_seq());
    drop(journal);
    let opened = Journal::open(real_fs(), &layout).expect("reopen");
    assert!(opened.torn.is_none(), "{:?}", opened.torn);
    let records = &opened.records;
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(matches!(records[0].event, Event::Checkpoint { .. }));
    assert!(matches!(records[1].event, Event::Request { .. }));
    assert_eq!((records[1].txn, records[1].seq), (txn, seq));
    assert_eq!((records[0].txn, records[0].seq + 1), (txn, seq));
    // The projection is the state again, key included, standing at the request;
    // nothing is left open.
    let p = project(records);
    assert!(p.pending.is_none(), "{:?}", p.pending);
    assert_eq!(p.state.journal.pulled, Some(pulled));
    assert_eq!((p.state.journal.txn, p.state.journal.seq), (txn, seq));
    // A request anywhere else is a pull's, not the checkpoint's: it waits for its
    // transaction's `Committed`.
    let stray = Record {
        seq: seq + 1,
        txn: txn + 1,
        event: records[1].event.clone(),
    };
    let mut more = records.clone();
    more.push(stray);
    let p = project(&more);
    assert_eq!(p.pending.map(|p| p.txn), Some(txn + 1));
}

#[test]
fn checkpoint_with_absent_optional_fields_survives_compaction_and_reopen() {
    let (_dir, layout) = temp_layout();
    let mut journal = Journal::open(real_fs(), &layout).expect("open").journal;
    journal.compact(&sample_state()).expect("compact");
    drop(journal);
    let opened = Journal::open(real_fs(), &layout).expect("reopen");
    assert!(
        opened.torn.is_none(),
        "checkpoint was cut: {:?}",
        opened.torn
    );
    assert_eq!(
        opened.records[0].event,
        Event::Checkpoint {
            state: Box::new(sample_state())
        }
    );
}

/// Regression: compacting left `write_state`'s scratch folder (`.stack/tmp`)
/// behind; the next command took it for a leftover and replayed the whole journal
/// (the slow path) although the state file named the journal's end.
#[test]
fn compaction_leaves_no_scratch_folder_and_the_next_command_takes_the_fast_path() {
    let (_dir, layout) = temp_layout();
    let fs = real_fs();
    let mut journal = Journal::open(fs.clone(), &layout).expect("open").journal;
    let state = stack::replay::recover::compact_state(
        fs.as_ref(),
        &layout,
        &mut journal,
        SyncState::default(),
    )
    .expect("compact");
    drop(journal);
    assert!(!layout.tmp().exists(), ".stack/tmp left behind");
    let rec = stack::replay::recover::recover(fs, &layout).expect("recover");
    assert!(rec.trusted, "the next command did not take the fast path");
    assert_eq!(rec.state, state);
}

// ---------------------------------------------------------------------------
// Truncation at every byte.
// ---------------------------------------------------------------------------

/// The records and end a scan of the first `cut` bytes must give.
fn expected_after_cut(cut: usize, records: &[Record], spans: &[FrameSpan]) -> (Vec<Record>, End) {
    if cut < HEADER_LEN {
        return (
            Vec::new(),
            End::TornTail {
                offset: 0,
                reason: String::new(),
            },
        );
    }
    let whole = spans.iter().take_while(|s| s.end <= cut).count();
    let kept = spans.get(whole).map_or(records.len(), |s| s.records_before);
    let kept_records = records[..kept].to_vec();
    let boundary = if whole == 0 {
        HEADER_LEN
    } else {
        spans[whole - 1].end
    };
    if boundary == cut {
        (kept_records, End::Clean)
    } else {
        (
            kept_records,
            End::TornTail {
                offset: boundary as u64,
                reason: String::new(),
            },
        )
    }
}

/// Compare ends ignoring the human-readable reason.
fn same_end(got: &End, want: &End) -> bool {
    match (got, want) {
        (End::TornTail { offset: a, .. }, End::TornTail { offset: b, .. }) => a == b,
        (
            End::Corrupt {
                offset: a,
                record: ra,
                ..
            },
            End::Corrupt {
                offset: b,
                record: rb,
                ..
            },
        ) => a == b && ra == rb,
        _ => got == want,
    }
}

#[test]
fn truncation_at_every_offset_keeps_exactly_the_whole_batches() {
    let (_dir, _layout, bytes, records, spans) = sample_journal();
    for cut in 0..=bytes.len() {
        let scan = frame::scan(&bytes[..cut]);
        let (want_records, want_end) = expected_after_cut(cut, &records, &spans);
        assert!(
            same_end(&scan.end, &want_end),
            "cut at {cut}: end {:?}, expected {want_end:?}",
            scan.end
        );
        assert_eq!(records_of(&scan), want_records, "cut at {cut}");
        let want_valid = match want_end {
            End::TornTail { offset, .. } => offset,
            _ => cut as u64,
        };
        assert_eq!(scan.valid_len, want_valid, "cut at {cut}");
    }
}

#[test]
fn open_cuts_a_torn_tail_at_every_offset_saves_it_and_appends_after() {
    let (_dir, _layout, bytes, records, spans) = sample_journal();
    let extra = Event::RemoveDir {
        slug: "after".into(),
    };
    for cut in 0..=bytes.len() {
        let (_d, layout) = temp_layout();
        write_journal(&layout, &bytes[..cut]);
        let (want_records, want_end) = expected_after_cut(cut, &records, &spans);

        let mut opened = Journal::open(real_fs(), &layout).expect("open truncated");
        assert_eq!(opened.records, want_records, "cut at {cut}");
        let broken = layout.private().join("journal.broken");
        match want_end {
            End::TornTail { offset, .. } => {
                let (at, n, _) = opened.torn.clone().expect("torn tail reported");
                assert_eq!((at, n), (offset, cut as u64 - offset), "cut at {cut}");
                let saved = std::fs::read(&broken).expect("journal.broken");
                assert_eq!(saved, &bytes[offset as usize..cut], "cut at {cut}");
            }
            _ => {
                assert!(opened.torn.is_none(), "cut at {cut}");
                assert!(!broken.exists(), "cut at {cut}");
            }
        }

        let seq = opened.journal.append(9, extra.clone());
        assert_eq!(seq, want_records.len() as u64 + 1, "cut at {cut}");
        opened.journal.sync().expect("append after cut");
        drop(opened);

        let scan = scan_file(&RealFs, &layout).unwrap().unwrap();
        assert_eq!(scan.end, End::Clean, "cut at {cut}");
        let mut want = want_records;
        want.push(Record {
            seq,
            txn: 9,
            event: extra.clone(),
        });
        assert_eq!(records_of(&scan), want, "cut at {cut}");
    }
}

// ---------------------------------------------------------------------------
// Single-byte damage at every byte.
// ---------------------------------------------------------------------------

/// The end a scan must report after damaging byte `pos`: the header (magic,
/// version or its checksum: a flipped version byte fails the header checksum)
/// is corruption at 0; a frame followed by another is corruption at its start;
/// the last frame is a torn tail.
fn expected_after_flip(pos: usize, spans: &[FrameSpan]) -> (usize, End) {
    if pos < HEADER_LEN {
        return (
            0,
            End::Corrupt {
                offset: 0,
                record: 0,
                reason: String::new(),
            },
        );
    }
    let (i, span) = spans
        .iter()
        .enumerate()
        .find(|(_, s)| (s.start..s.end).contains(&pos))
        .expect("position inside a frame");
    let end = if i + 1 == spans.len() {
        End::TornTail {
            offset: span.start as u64,
            reason: String::new(),
        }
    } else {
        End::Corrupt {
            offset: span.start as u64,
            record: span.records_before as u64,
            reason: String::new(),
        }
    };
    (span.records_before, end)
}

#[test]
fn single_byte_damage_anywhere_is_never_a_different_history() {
    let (_dir, _layout, bytes, records, spans) = sample_journal();
    for pos in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xFF, 0x5A] {
            let mut damaged = bytes.clone();
            damaged[pos] ^= mask;
            let scan = frame::scan(&damaged);
            let (kept, want_end) = expected_after_flip(pos, &spans);
            assert!(
                same_end(&scan.end, &want_end),
                "byte {pos} ^ {mask:#04x}: end {:?}, expected {want_end:?}",
                scan.end
            );
            assert_eq!(
                records_of(&scan),
                records[..kept].to_vec(),
                "byte {pos} ^ {mask:#04x}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Hostile lengths.
// ---------------------------------------------------------------------------

/// Generous bound for a scan's largest allocation on hostile input.
const SMALL_ALLOC: usize = 2 * 1024 * 1024;

#[test]
fn frame_claiming_four_gigabytes_is_refused_without_allocating() {
    let mut bytes = frame::header().to_vec();
    bytes.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    bytes.extend_from_slice(&[0xAB; 4]);
    bytes.extend_from_slice(&[0u8; 64]);

    let (scan, peak) = peak_alloc_of(|| frame::scan(&bytes));
    assert!(same_end(
        &scan.end,
        &End::TornTail {
            offset: HEADER_LEN as u64,
            reason: String::new()
        }
    ));
    assert!(peak < SMALL_ALLOC, "largest allocation {peak} bytes");

    // The same bad frame followed by a valid one is corruption, not a tail.
    let valid = frame::encode_frame(&[Record {
        seq: 1,
        txn: 1,
        event: Event::Prepared,
    }])
    .unwrap();
    bytes.extend_from_slice(&valid);
    let (scan, peak) = peak_alloc_of(|| frame::scan(&bytes));
    assert!(
        matches!(
            scan.end,
            End::Corrupt {
                offset: 16,
                record: 0,
                ..
            }
        ),
        "{:?}",
        scan.end
    );
    assert!(peak < SMALL_ALLOC, "largest allocation {peak} bytes");
}

/// bincode varint of a u64 that needs the 8-byte form.
fn varint_u64(n: u64) -> Vec<u8> {
    let mut v = vec![253u8];
    v.extend_from_slice(&n.to_le_bytes());
    v
}

/// A payload (Vec<Record>) of one `Stage` record whose `md5` string claims `len` bytes.
fn payload_with_string_claiming(len: u64) -> Vec<u8> {
    let mut p = vec![1u8, 1, 1, 1]; // one record, seq 1, txn 1, variant 1 (Stage)
    p.extend(varint_u64(len));
    p.extend_from_slice(b"abc");
    p
}

#[test]
fn checksummed_payload_claiming_huge_vec_is_refused_without_allocating() {
    let hostile = [
        ("Vec<Record> of 2^40 records", varint_u64(1 << 40)),
        ("Vec<Record> of 2^64-1 records", varint_u64(u64::MAX)),
        (
            "string of 2^40 bytes",
            payload_with_string_claiming(1 << 40),
        ),
        (
            "string of 128 MiB in a 16-byte payload",
            payload_with_string_claiming(frame::MAX_PAYLOAD as u64 / 2),
        ),
        (
            "string just under the frame size limit",
            payload_with_string_claiming(frame::MAX_PAYLOAD as u64 - 16),
        ),
        (
            "string of 1 MiB in a 16-byte payload",
            payload_with_string_claiming(1 << 20),
        ),
    ];
    for (what, payload) in hostile {
        let mut bytes = frame::header().to_vec();
        bytes.extend(raw_frame(&payload));
        let (scan, peak) = peak_alloc_of(|| frame::scan(&bytes));
        // A frame whose checksum matches was written whole: undecodable, it is
        // corruption (or a newer format), never a torn tail to cut.
        assert!(
            same_end(
                &scan.end,
                &End::Corrupt {
                    offset: HEADER_LEN as u64,
                    record: 0,
                    reason: String::new()
                }
            ),
            "{what}: {:?}",
            scan.end
        );
        assert!(scan.records.is_empty(), "{what}");
        assert!(
            peak < SMALL_ALLOC,
            "{what}: largest allocation {peak} bytes"
        );
    }
}

// ---------------------------------------------------------------------------
// Refusals: unknown version, corruption, I/O errors.
// ---------------------------------------------------------------------------

#[test]
fn unknown_format_version_is_refused_and_file_left_untouched() {
    let (_dir, layout) = temp_layout();
    let mut bytes = header_with_version(frame::FORMAT_VERSION + 1);
    bytes.extend(
        frame::encode_frame(&[Record {
            seq: 1,
            txn: 1,
            event: Event::Prepared,
        }])
        .unwrap(),
    );
    bytes.extend_from_slice(b"trailing bytes of a future format");
    write_journal(&layout, &bytes);

    let scan = scan_file(&RealFs, &layout).unwrap().unwrap();
    let newer = frame::FORMAT_VERSION + 1;
    assert_eq!(scan.end, End::UnknownVersion { found: newer });
    assert!(matches!(
        check_end(&layout, &scan),
        Err(Error::JournalVersion {
            found,
            supported: frame::FORMAT_VERSION,
            ..
        }) if found == newer
    ));
    match Journal::open(real_fs(), &layout) {
        Err(e @ Error::JournalVersion { .. }) => assert_eq!(e.exit_code(), 4),
        Err(e) => panic!("expected JournalVersion, got {e}"),
        Ok(_) => panic!("a journal of an unknown version was opened"),
    }
    assert_eq!(read_journal(&layout), bytes);
    assert!(!layout.private().join("journal.broken").exists());
}

#[test]
fn corruption_before_a_valid_frame_is_reported_and_never_truncated() {
    let (_dir, layout, bytes, _records, spans) = sample_journal();
    for (i, span) in spans.iter().enumerate().take(spans.len() - 1) {
        let mut damaged = bytes.clone();
        damaged[(span.start + span.end) / 2] ^= 0x10;
        write_journal(&layout, &damaged);

        match Journal::open(real_fs(), &layout) {
            Err(ref e @ Error::JournalCorrupt { offset, record, .. }) => {
                assert_eq!(
                    (offset, record),
                    (span.start as u64, span.records_before as u64),
                    "frame {i}"
                );
                assert_eq!(e.exit_code(), 4);
            }
            Err(e) => panic!("frame {i}: expected JournalCorrupt, got {e}"),
            Ok(_) => panic!("frame {i}: a corrupt journal was opened"),
        }
        assert_eq!(read_journal(&layout), damaged, "frame {i}: file changed");
        assert!(!layout.private().join("journal.broken").exists());
    }
}

#[test]
fn sequence_gap_between_valid_frames_is_corruption() {
    let record = |seq| Record {
        seq,
        txn: 1,
        event: Event::Prepared,
    };
    let mut bytes = frame::header().to_vec();
    bytes.extend(frame::encode_frame(&[record(1), record(2)]).unwrap());
    let second = bytes.len() as u64;
    bytes.extend(frame::encode_frame(&[record(4)]).unwrap());
    let scan = frame::scan(&bytes);
    assert!(matches!(scan.end, End::Corrupt { offset, record: 2, .. } if offset == second));
    assert_eq!(scan.records.len(), 2);
    assert_eq!(scan.valid_len, second);
}

#[test]
fn read_error_is_an_io_error_not_corruption() {
    let (_dir, layout) = temp_layout();
    std::fs::create_dir_all(layout.journal()).unwrap();

    assert!(matches!(
        scan_file(&RealFs, &layout),
        Err(Error::Io { op: "read", .. })
    ));
    // The streaming check (before an append, and `journal verify`) too.
    assert!(matches!(
        stack::replay::recover::journal_is_clean(&RealFs, &layout),
        Err(Error::Io { op: "read", .. })
    ));
    assert!(matches!(
        stack::replay::recover::check_journal_file(&RealFs, &layout),
        Err(Error::Io { op: "read", .. })
    ));
    match Journal::open(real_fs(), &layout) {
        Err(e @ Error::Io { .. }) => assert_eq!(e.exit_code(), 1),
        Err(e) => panic!("expected an I/O error, got {e}"),
        Ok(_) => panic!("opened a directory as a journal"),
    }
    assert!(layout.journal().is_dir(), "the journal path was changed");
    assert!(!layout.private().join("journal.broken").exists());
}

#[test]
fn missing_journal_scans_as_none_and_open_creates_an_empty_one() {
    let (_dir, layout) = temp_layout();
    assert!(scan_file(&RealFs, &layout).unwrap().is_none());
    let opened = Journal::open(real_fs(), &layout).unwrap();
    assert!(opened.records.is_empty() && opened.torn.is_none());
    assert!(opened.journal.is_empty());
    assert_eq!(read_journal(&layout), frame::header().to_vec());
}

// ---------------------------------------------------------------------------
// Failed writes: a failed sync or compaction must not leave the writer in a state
// where its next batch corrupts the journal or is lost.
// ---------------------------------------------------------------------------

mod faulty {
    use std::io::{self, Read, Write};
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use stack::fs::{DirEntry, FileWrite, Fs, LockGuard, Meta, RealFs};

    /// Faults to inject, switchable while a journal is open.
    #[derive(Default)]
    pub struct Faults {
        /// Bytes appended or created files may still write before failing with
        /// ENOSPC.
        pub write_budget: AtomicU64,
        pub fail_fsync: AtomicBool,
        pub fail_sync_dir: AtomicBool,
        pub fail_truncate: AtomicBool,
        /// Every folder fsynced, in order.
        pub synced_dirs: Mutex<Vec<PathBuf>>,
    }

    impl Faults {
        pub fn none() -> Arc<Faults> {
            let f = Faults::default();
            f.write_budget.store(u64::MAX, Ordering::SeqCst);
            Arc::new(f)
        }
    }

    /// [`RealFs`] with the [`Faults`] applied to appended files and folder syncs.
    pub struct FaultyFs(pub Arc<Faults>);

    struct FaultyFile {
        inner: Box<dyn FileWrite>,
        faults: Arc<Faults>,
    }

    impl Write for FaultyFile {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let budget = self.faults.write_budget.load(Ordering::SeqCst);
            if budget == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let n = buf.len().min(usize::try_from(budget).unwrap_or(usize::MAX));
            let written = self.inner.write(&buf[..n])?;
            if budget != u64::MAX {
                self.faults
                    .write_budget
                    .store(budget - written as u64, Ordering::SeqCst);
            }
            Ok(written)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    impl FileWrite for FaultyFile {
        fn sync(&mut self) -> io::Result<()> {
            if self.faults.fail_fsync.load(Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.inner.sync()
        }
    }

    impl Fs for FaultyFs {
        fn symlink_metadata(&self, path: &Path) -> io::Result<Meta> {
            RealFs.symlink_metadata(path)
        }
        fn metadata(&self, path: &Path) -> io::Result<Meta> {
            RealFs.metadata(path)
        }
        fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
            RealFs.read_dir(path)
        }
        fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
            RealFs.read_link(path)
        }
        fn open_read(&self, path: &Path) -> io::Result<Box<dyn Read + Send>> {
            RealFs.open_read(path)
        }
        fn create(&self, path: &Path) -> io::Result<Box<dyn FileWrite>> {
            Ok(Box::new(FaultyFile {
                inner: RealFs.create(path)?,
                faults: self.0.clone(),
            }))
        }
        fn open_append(&self, path: &Path) -> io::Result<Box<dyn FileWrite>> {
            Ok(Box::new(FaultyFile {
                inner: RealFs.open_append(path)?,
                faults: self.0.clone(),
            }))
        }
        fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
            if self.0.fail_truncate.load(Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            RealFs.truncate(path, len)
        }
        fn sync_dir(&self, path: &Path) -> io::Result<()> {
            if self.0.fail_sync_dir.load(Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.0.synced_dirs.lock().unwrap().push(path.to_path_buf());
            RealFs.sync_dir(path)
        }
        fn sync_fs(&self, path: &Path) -> io::Result<()> {
            RealFs.sync_fs(path)
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            RealFs.rename(from, to)
        }
        fn hard_link(&self, original: &Path, link: &Path) -> io::Result<()> {
            RealFs.hard_link(original, link)
        }
        fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
            RealFs.symlink(target, link)
        }
        fn reflink(&self, src: &Path, dst: &Path) -> io::Result<()> {
            RealFs.reflink(src, dst)
        }
        fn remove_file(&self, path: &Path) -> io::Result<()> {
            RealFs.remove_file(path)
        }
        fn create_dir(&self, path: &Path) -> io::Result<()> {
            RealFs.create_dir(path)
        }
        fn remove_dir(&self, path: &Path) -> io::Result<()> {
            RealFs.remove_dir(path)
        }
        fn set_readonly(&self, path: &Path, readonly: bool) -> io::Result<()> {
            RealFs.set_readonly(path, readonly)
        }
        fn lock(&self, path: &Path, wait: bool) -> io::Result<Option<Box<dyn LockGuard>>> {
            RealFs.lock(path, wait)
        }
    }
}

use std::sync::atomic::Ordering;

fn prepared() -> Event {
    Event::Prepared
}

fn aborted() -> Event {
    Event::Aborted {
        reason: "disk full".into(),
    }
}

/// Open a journal through a [`faulty::FaultyFs`] holding one synced record.
fn faulty_journal() -> (tempfile::TempDir, Layout, Arc<faulty::Faults>, Journal) {
    let (dir, layout) = temp_layout();
    let faults = faulty::Faults::none();
    let fs: Arc<dyn Fs> = Arc::new(faulty::FaultyFs(faults.clone()));
    let mut journal = Journal::open(fs, &layout).expect("open").journal;
    journal.append(1, prepared());
    journal.sync().expect("first batch");
    (dir, layout, faults, journal)
}

/// The journal on disk must scan clean and hold exactly `events`, seqs from 1.
fn assert_journal_holds(layout: &Layout, events: &[Event]) {
    let scan = scan_file(&RealFs, layout).unwrap().unwrap();
    assert_eq!(scan.end, End::Clean, "journal is damaged");
    let got: Vec<(u64, Event)> = records_of(&scan)
        .into_iter()
        .map(|r| (r.seq, r.event))
        .collect();
    let want: Vec<(u64, Event)> = (1..).zip(events.iter().cloned()).collect();
    assert_eq!(got, want);
}

#[test]
fn write_failing_midway_is_undone_so_the_retried_batch_is_valid() {
    let (_dir, layout, faults, mut journal) = faulty_journal();
    journal.append(2, aborted());
    faults.write_budget.store(5, Ordering::SeqCst);
    assert!(matches!(journal.sync(), Err(Error::Io { .. })));

    faults.write_budget.store(u64::MAX, Ordering::SeqCst);
    journal.sync().expect("retry after the disk has room again");
    assert_journal_holds(&layout, &[prepared(), aborted()]);
}

#[test]
fn fsync_failure_is_undone_so_the_retried_batch_is_not_written_twice() {
    let (_dir, layout, faults, mut journal) = faulty_journal();
    journal.append(2, aborted());
    faults.fail_fsync.store(true, Ordering::SeqCst);
    assert!(matches!(journal.sync(), Err(Error::Io { .. })));

    faults.fail_fsync.store(false, Ordering::SeqCst);
    journal.sync().expect("retry");
    assert_journal_holds(&layout, &[prepared(), aborted()]);
}

#[test]
fn failed_append_that_cannot_be_cut_off_refuses_later_batches() {
    let (_dir, layout, faults, mut journal) = faulty_journal();
    journal.append(2, aborted());
    faults.write_budget.store(5, Ordering::SeqCst);
    faults.fail_truncate.store(true, Ordering::SeqCst);
    assert!(journal.sync().is_err());

    // Even with the disk healthy again, nothing is written after the partial frame.
    faults.write_budget.store(u64::MAX, Ordering::SeqCst);
    faults.fail_truncate.store(false, Ordering::SeqCst);
    assert!(matches!(journal.sync(), Err(Error::Io { .. })));
    assert!(journal.compact(&SyncState::default()).is_err());
    drop(journal);

    let scan = scan_file(&RealFs, &layout).unwrap().unwrap();
    assert!(matches!(scan.end, End::TornTail { .. }), "{:?}", scan.end);
    let opened = Journal::open(real_fs(), &layout).expect("reopen cuts the tail");
    assert_eq!(opened.torn.map(|(_, n, _)| n), Some(5));
    assert_journal_holds(&layout, &[prepared()]);
}

#[test]
fn compaction_failing_after_its_rename_appends_nothing_until_reopened() {
    let (_dir, layout, faults, mut journal) = faulty_journal();
    let state = sample_state();
    faults.fail_sync_dir.store(true, Ordering::SeqCst);
    assert!(journal.compact(&state).is_err());
    faults.fail_sync_dir.store(false, Ordering::SeqCst);

    // The replaced file is gone and the new name may not be durable: a batch must
    // fail rather than be acknowledged into either.
    journal.append(3, aborted());
    assert!(matches!(journal.sync(), Err(Error::Io { .. })));
    drop(journal);

    let mut opened = Journal::open(real_fs(), &layout).expect("reopen");
    let checkpoint = Event::Checkpoint {
        state: Box::new(state),
    };
    assert_eq!(opened.records.len(), 1);
    assert_eq!(opened.records[0].event, checkpoint);
    let seq = opened.journal.append(3, aborted());
    assert_eq!(seq, opened.records[0].seq + 1);
    opened.journal.sync().expect("append after reopening");
    let events: Vec<Event> = records_of(&scan_file(&RealFs, &layout).unwrap().unwrap())
        .into_iter()
        .map(|r| r.event)
        .collect();
    assert_eq!(events, [checkpoint, aborted()]);
}

/// A compaction whose new file cannot be written whole (a full disk) leaves the
/// journal as it was, still appendable, and no partial `journal.compact`.
#[test]
fn compaction_failing_before_its_rename_leaves_the_journal_and_no_partial_copy() {
    let (_dir, layout, faults, mut journal) = faulty_journal();
    let before = std::fs::read(layout.journal()).unwrap();
    faults.write_budget.store(100, Ordering::SeqCst);
    let err = journal.compact(&sample_state()).unwrap_err();
    faults.write_budget.store(u64::MAX, Ordering::SeqCst);
    assert!(err.to_string().contains("journal.compact"), "{err}");
    assert!(
        !layout.journal_compact().exists(),
        "partial copy left behind"
    );
    assert_eq!(std::fs::read(layout.journal()).unwrap(), before);
    journal.append(3, aborted());
    journal.sync().expect("the journal is still appendable");
    drop(journal);
    let events: Vec<Event> = records_of(&scan_file(&RealFs, &layout).unwrap().unwrap())
        .into_iter()
        .map(|r| r.event)
        .collect();
    assert_eq!(events.last(), Some(&aborted()));
}

#[test]
fn creating_the_journal_makes_the_names_leading_to_it_durable() {
    for take_lock_first in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("stack"));
        let faults = faulty::Faults::none();
        let fs: Arc<dyn Fs> = Arc::new(faulty::FaultyFs(faults.clone()));
        // The lock creates `.stack` (without syncing) before the journal is opened.
        let _lock = take_lock_first
            .then(|| stack::journal::lock::acquire(fs.as_ref(), &layout, "test", false).unwrap());
        Journal::open(fs, &layout).unwrap();

        let synced = faults.synced_dirs.lock().unwrap().clone();
        for folder in [
            layout.private(),
            layout.root.clone(),
            dir.path().to_path_buf(),
        ] {
            assert!(
                synced.contains(&folder),
                "lock first: {take_lock_first}: {} not fsynced (fsynced: {synced:?})",
                folder.display()
            );
        }
    }
}

/// The automatic compaction bound is read from the file, so it holds across the
/// one-pull-per-process life of a cron job: a journal past the bound asks for
/// compaction when reopened, and a freshly compacted one does not.
#[test]
fn auto_compaction_bound_holds_across_reopens() {
    let (_tmp, layout) = temp_layout();
    let event = |i: u64| Event::MakeRef {
        slot: Slot::Package("pkg".to_string()),
        table_id: format!("tbl_{i:08}"),
        name: format!("name_{i:08}"),
        md5: "0123456789abcdef0123456789abcdef".to_string(),
        size: Some(i),
        strategy: RefStrategy::Symlink,
    };
    let mut i = 0u64;
    // One process per batch, as cron runs `stack pull`.
    while std::fs::metadata(layout.journal()).map_or(0, |m| m.len())
        <= stack::journal::AUTO_COMPACT_BYTES
    {
        let mut j = Journal::open(real_fs(), &layout).unwrap().journal;
        assert!(
            !j.wants_compaction(),
            "asked for compaction below the bound"
        );
        let txn = j.new_txn();
        for _ in 0..20_000 {
            j.append(txn, event(i));
            i += 1;
        }
        j.sync().unwrap();
    }
    let mut j = Journal::open(real_fs(), &layout).unwrap().journal;
    assert!(
        j.wants_compaction(),
        "a journal past the bound must ask for compaction when reopened"
    );
    // ... unless the state file is larger than it: a checkpoint (about half the
    // state file) would not be smaller than the journal.
    let journal_len = std::fs::metadata(layout.journal()).unwrap().len();
    let state_file = std::fs::File::create(layout.state_file()).unwrap();
    state_file.set_len(journal_len + 1).unwrap();
    assert!(
        !j.wants_compaction(),
        "a journal smaller than the state file asked for compaction"
    );
    state_file.set_len(journal_len - 1).unwrap();
    assert!(j.wants_compaction());
    std::fs::remove_file(layout.state_file()).unwrap();
    j.compact(&sample_state()).unwrap();
    let j = Journal::open(real_fs(), &layout).unwrap().journal;
    assert!(!j.wants_compaction());
}

/// A last frame whose checksum is valid but whose payload this build cannot decode
/// (a newer format's event, say) is refused as corruption, never cut as a torn
/// tail: cutting it would silently drop a committed transaction.
#[test]
fn checksummed_undecodable_last_frame_is_corruption_not_a_torn_tail() {
    let (_tmp, layout) = temp_layout();
    let records = write_batches(&layout, &sample_batches());
    let mut bytes = read_journal(&layout);
    let at = bytes.len() as u64;
    // A well-formed Vec<Record> of one record whose event variant index is unknown.
    let mut payload = vec![1u8]; // one record
    payload.push(records.len() as u8 + 1); // seq (varint, small)
    payload.push(99); // txn
    payload.push(200); // event variant 200: unknown
    bytes.extend(raw_frame(&payload));
    corrupt_at_and_never_cut(&layout, &bytes, at, records.len());
}

/// `bytes`, written as `layout`'s journal, scan as corrupt at byte `at`, record
/// `record`; opening it for writing refuses, and nothing cuts or rewrites it.
fn corrupt_at_and_never_cut(layout: &Layout, bytes: &[u8], at: u64, record: usize) {
    write_journal(layout, bytes);
    let scan = frame::scan(bytes);
    assert!(
        same_end(
            &scan.end,
            &End::Corrupt {
                offset: at,
                record: record as u64,
                reason: String::new()
            }
        ),
        "{:?}",
        scan.end
    );
    assert!(matches!(
        Journal::open(real_fs(), layout),
        Err(Error::JournalCorrupt { .. })
    ));
    assert_eq!(
        read_journal(layout),
        bytes,
        "a corrupt journal is never cut or rewritten"
    );
    assert!(!layout.journal().with_file_name("journal.broken").exists());
}

/// Damage followed by a frame whose checksum is valid but whose payload this build
/// cannot decode is corruption too, never a torn tail to cut: that frame was
/// written whole, after the damaged one.
#[test]
fn damage_before_a_checksummed_undecodable_frame_is_corruption() {
    let (_tmp, layout) = temp_layout();
    let records = write_batches(&layout, &sample_batches());
    let mut bytes = read_journal(&layout);
    let at = bytes.len() as u64;
    // A frame that fails its checksum (a flipped payload byte)...
    let mut damaged = raw_frame(&[1u8, records.len() as u8 + 1, 99, 0]);
    let last = damaged.len() - 1;
    damaged[last] ^= 0xff;
    bytes.extend(damaged);
    // ... then a whole frame of one record with an unknown event variant.
    bytes.extend(raw_frame(&[1u8, records.len() as u8 + 2, 99, 200]));
    corrupt_at_and_never_cut(&layout, &bytes, at, records.len());
}

// ---------------------------------------------------------------------------
// Checkpoints holding a state stack never writes.
// ---------------------------------------------------------------------------

/// A state whose one direct table `tbl_a` is named `name` and names `shared` as
/// its shared file (its reference path is the layout's for `name`).
fn state_naming(name: &str, shared: &str) -> SyncState {
    let mut state = SyncState::default();
    let entry = stack::replay::state::TableEntry::new(
        name.to_string(),
        "0123456789abcdef0123456789abcdef".into(),
        Some(3),
        RefStrategy::Copy,
    )
    .with_paths(
        (SlotRef::Direct, "tbl_a"),
        &format!("data/_direct/{name}.parquet"),
        shared,
    );
    state.direct_tables.insert("tbl_a".into(), entry);
    state
}

/// Every file and folder under `root`, `.stack/` included, with file contents.
fn whole_tree(root: &std::path::Path) -> BTreeMap<std::path::PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if path.is_dir() {
                out.insert(rel, None);
                todo.push(path);
            } else {
                out.insert(rel, Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

/// A directory whose journal holds a committed pull, then `events` as one batch in
/// transaction 2 (seq 4 onwards, its frame at the returned byte offset), then a
/// torn tail; with a state file and a reference on disk. The directory is the
/// folder `stack` of the returned temporary folder, so that `../../../victim`
/// from `data/_direct/` is `victim` beside it. Returns (temporary folder, layout,
/// offset of the batch).
fn dir_with_batch(events: Vec<Event>) -> (tempfile::TempDir, Layout, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = Layout::new(dir.path().join("stack"));
    let md5 = "0123456789abcdef0123456789abcdef".to_string();
    let pull = vec![
        (
            1,
            Event::MakeRef {
                slot: Slot::Direct,
                table_id: "tbl_a".into(),
                name: "a".into(),
                md5,
                size: Some(3),
                strategy: RefStrategy::Copy,
            },
        ),
        (1, Event::Prepared),
        (
            1,
            Event::Committed {
                fingerprints: Vec::new(),
            },
        ),
    ];
    write_batches(&layout, &[pull]);
    let at = read_journal(&layout).len() as u64;
    write_batches(&layout, &[events.into_iter().map(|e| (2, e)).collect()]);
    // The first bytes of one more frame: an append a crash cut short.
    let mut bytes = read_journal(&layout);
    let last = frame::scan(&bytes).records.last().expect("records").1.seq;
    let next = frame::encode_frame(&[Record {
        seq: last + 1,
        txn: 3,
        event: Event::Prepared,
    }])
    .unwrap();
    bytes.extend_from_slice(&next[..next.len() - 1]);
    write_journal(&layout, &bytes);
    std::fs::write(layout.state_file(), b"{\"version\":1}\n").unwrap();
    std::fs::create_dir_all(layout.root.join("data/_direct")).unwrap();
    std::fs::write(layout.root.join("data/_direct/a.parquet"), b"abc").unwrap();
    (dir, layout, at)
}

/// [`dir_with_batch`] of one checkpoint of `state` (seq 4, transaction 2).
fn dir_with_checkpoint(state: &SyncState) -> (tempfile::TempDir, Layout, u64) {
    dir_with_batch(vec![Event::Checkpoint {
        state: Box::new(state.clone()),
    }])
}

/// A checkpoint is a whole state, paths included. One that fails the state file's
/// own rule (`SyncState::check_paths`: absolute or `..` paths, unsafe names, paths
/// that are not the layout's) was not written by stack: replay, recovery and the
/// check before an append refuse the journal as corruption (exit 4), naming the
/// record and what is wrong, and change nothing in the directory (the torn tail
/// after it is not cut, no `journal.broken`, the state file is not rewritten).
/// The byte format still reads the record (`journal show` lists it).
#[test]
fn checkpoint_with_unsafe_paths_is_corruption_and_nothing_is_touched() {
    use stack::replay::recover::replay;
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim.parquet");
    let victim = victim.to_str().unwrap();
    let mut slug = SyncState::default();
    slug.data_packages.insert(
        "..".into(),
        state_naming("a", "data/_shared/tbl_a.parquet")
            .direct_tables
            .into_iter()
            .collect(),
    );
    let mut domain = SyncState::default();
    domain.memory_domains.insert(
        "ops".into(),
        DomainEntry {
            md5: "d41d8cd98f00b204e9800998ecf8427e".into(),
            path: "memory/../../ops.md".into(),
            fp: None,
        },
    );
    let cases: Vec<(&str, SyncState, String)> = vec![
        (
            "absolute shared path",
            state_naming("a", victim),
            format!("{victim} are not the engine's"),
        ),
        (
            "../ shared path",
            state_naming("a", "data/_shared/../../victim.parquet"),
            "data/_shared/../../victim.parquet are not the engine's".to_string(),
        ),
        (
            "../ name",
            state_naming("../../victim", "data/_shared/tbl_a.parquet"),
            r#"named "../../victim" is not a safe path component"#.to_string(),
        ),
        (
            "absolute name",
            state_naming("/victim", "data/_shared/tbl_a.parquet"),
            r#"named "/victim" is not a safe path component"#.to_string(),
        ),
        (
            ".. package slug",
            slug,
            r#"package slug ".." is not a safe path component"#.to_string(),
        ),
        (
            "memory domain outside memory/",
            domain,
            "memory/../../ops.md is not the engine's".to_string(),
        ),
        (
            // Safe but not the layout's (the format tests' sample): no more
            // acceptable in a checkpoint than in a trusted state file.
            "paths not the layout's",
            sample_state(),
            "data/_shared/tbl_alpha.parquet are not the engine's".to_string(),
        ),
    ];
    for (what, state, why) in cases {
        let (_dir, layout, at) = dir_with_checkpoint(&state);
        refused_everywhere(
            &layout,
            what,
            (at, 4),
            &["checkpoint seq 4 (transaction 2)".to_string(), why],
        );
    }

    // The same journal with a checkpoint of a state stack writes replays, cutting
    // the torn tail: the refusals above are the checkpoint's.
    let (_dir, layout, _) = dir_with_checkpoint(&state_naming("a", "data/_shared/tbl_a.parquet"));
    let rec = replay(real_fs(), &layout).expect("replay");
    assert!(
        rec.notes.iter().any(|n| n.contains("torn tail")),
        "{:?}",
        rec.notes
    );
    assert_eq!(rec.state.direct_tables.len(), 1);
}

// ---------------------------------------------------------------------------
// Events naming what stack never writes.
// ---------------------------------------------------------------------------

/// Events name their files by ids, names and slugs (never paths) that validation
/// proved safe. A checksum-valid record holding one that is not (hand-made: a
/// `MakeRef` named `../../../victim`, a `..` slug, an md5 that is a path, a placed
/// folder or a stray outside `data/`) was not written by stack: replay, recovery
/// and the check before an append refuse the journal as corruption (exit 4),
/// naming the record, its seq and transaction and the value, whether its
/// transaction committed, reached its commit point or neither, and change nothing
/// (the torn tail after it is not cut, the state file not rewritten). Before, a
/// committed one was folded (heal then stat-ed and hashed the victim, and the next
/// pull planned a removal apply refused, after its commit point: every later
/// command failed), and a prepared one failed apply's check (exit 1) after the torn
/// tail was cut.
#[test]
fn event_naming_a_path_outside_is_corruption_and_nothing_is_touched() {
    use stack::replay::recover::replay;
    let md5 = || "0123456789abcdef0123456789abcdef".to_string();
    let make_ref = |slot: Slot, table_id: &str, name: &str| Event::MakeRef {
        slot,
        table_id: table_id.into(),
        name: name.into(),
        md5: md5(),
        size: Some(3),
        strategy: RefStrategy::Copy,
    };
    let unsafe_component =
        |what: &str, v: &str| format!("{what} {v:?} is not a safe path component");
    let cases: Vec<(Event, String)> = vec![
        (
            make_ref(Slot::Direct, "tbl_a", "../../../victim"),
            unsafe_component("name", "../../../victim"),
        ),
        (
            make_ref(Slot::Direct, "tbl_a", "/victim"),
            unsafe_component("name", "/victim"),
        ),
        (
            make_ref(Slot::Package("..".into()), "tbl_a", "a"),
            unsafe_component("slug", ".."),
        ),
        (
            make_ref(Slot::Direct, "../../victim", "a"),
            unsafe_component("table id", "../../victim"),
        ),
        (
            Event::RemoveRef {
                slot: Slot::Package("../..".into()),
                table_id: "tbl_a".into(),
                name: "a".into(),
            },
            unsafe_component("slug", "../.."),
        ),
        (
            Event::PutShared {
                table_id: "../victim".into(),
                md5: md5(),
            },
            unsafe_component("table id", "../victim"),
        ),
        (
            Event::PutShared {
                table_id: "tbl_a".into(),
                md5: "../../../../victim".into(),
            },
            r#"md5 "../../../../victim" is not 32 hex digits"#.to_string(),
        ),
        (
            Event::RemoveShared {
                table_id: "..".into(),
            },
            unsafe_component("table id", ".."),
        ),
        (
            Event::PutBundle {
                slug: "../..".into(),
                md5: md5(),
            },
            unsafe_component("slug", "../.."),
        ),
        (
            Event::RemoveBundle { slug: "/".into() },
            unsafe_component("slug", "/"),
        ),
        (
            Event::RemoveDir {
                slug: "../..".into(),
            },
            unsafe_component("slug", "../.."),
        ),
        (
            Event::Place {
                staged: "place-0".into(),
                rel: "data/../..".into(),
            },
            r#"folder "data/../.." is not one stack places"#.to_string(),
        ),
        (
            Event::Place {
                staged: "../../x".into(),
                rel: "data/_shared".into(),
            },
            r#"staged folder "../../x" is not one stack makes"#.to_string(),
        ),
        (
            Event::RemoveStray {
                rel: "data/../../victim.parquet".into(),
            },
            r#"stray "data/../../victim.parquet" is not a path under data/ or memory/"#.to_string(),
        ),
    ];
    // Committed, past its commit point only, or neither.
    let tails: [&[Event]; 3] = [
        &[
            Event::Prepared,
            Event::Committed {
                fingerprints: Vec::new(),
            },
        ],
        &[Event::Prepared],
        &[],
    ];
    for (event, why) in cases {
        for tail in tails {
            let what = format!("{} then {} more", event.kind(), tail.len());
            let mut events = vec![event.clone()];
            events.extend(tail.iter().cloned());
            let (tmp, layout, at) = dir_with_batch(events);
            let victim = tmp.path().join("victim.parquet");
            std::fs::write(&victim, b"abc").unwrap();
            refused_everywhere(
                &layout,
                &what,
                (at, 4 + tail.len()),
                &[
                    format!(
                        "{} seq 4 (transaction 2) has a valid checksum",
                        event.kind()
                    ),
                    why.clone(),
                ],
            );
            assert_eq!(std::fs::read(&victim).unwrap(), b"abc", "{what}");
        }
    }

    // The same journal with events stack writes replays, cutting the torn tail:
    // the refusals above are the events'.
    let (_tmp, layout, _) = dir_with_batch(vec![
        make_ref(Slot::Package("p1".into()), "tbl_b", "b"),
        Event::RemoveStray {
            rel: "data/p9/x.parquet".into(),
        },
        Event::Prepared,
        Event::Committed {
            fingerprints: Vec::new(),
        },
    ]);
    let rec = replay(real_fs(), &layout).expect("replay");
    assert!(
        rec.notes.iter().any(|n| n.contains("torn tail")),
        "{:?}",
        rec.notes
    );
    assert_eq!(rec.state.data_packages["p1"].len(), 1);
}

/// `layout`'s journal, whose record 3 at byte `at` is refused: its bytes still scan
/// (`records` records, a torn tail after them), and `check_journal`, `replay`,
/// `recover` and `journal_is_clean` each refuse it as `JournalCorrupt` at that
/// record, with a message holding every one of `needles`; the directory is left
/// byte for byte as it was.
fn refused_everywhere(
    layout: &Layout,
    what: &str,
    (at, records): (u64, usize),
    needles: &[String],
) {
    use stack::replay::project::check_journal;
    use stack::replay::recover::{journal_is_clean, recover, replay};
    let before = whole_tree(&layout.root);
    let refused = |e: Error| {
        assert_eq!(e.exit_code(), 4, "{what}: {e}");
        match &e {
            Error::JournalCorrupt { offset, record, .. } => {
                assert_eq!((*offset, *record), (at, 3), "{what}: {e}")
            }
            other => panic!("{what}: expected JournalCorrupt, got {other}"),
        }
        let msg = e.to_string();
        assert!(msg.contains(&format!("byte offset {at}")), "{what}: {msg}");
        for needle in needles {
            assert!(
                msg.contains(needle.as_str()),
                "{what}: {needle:?} not in {msg}"
            );
        }
    };
    // The byte format keeps the records; what they mean is refused.
    let scan = scan_file(&RealFs, layout).unwrap().unwrap();
    assert!(matches!(scan.end, End::TornTail { .. }), "{what}");
    assert_eq!(scan.records.len(), records, "{what}");
    refused(check_journal(layout, &scan).unwrap_err());
    refused(replay(real_fs(), layout).err().expect("replay refuses"));
    refused(recover(real_fs(), layout).err().expect("recover refuses"));
    refused(journal_is_clean(&RealFs, layout).unwrap_err());
    assert_eq!(
        whole_tree(&layout.root),
        before,
        "{what}: the directory changed"
    );
}
