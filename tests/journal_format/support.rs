//! What the journal-format tests share: an allocation probe, journals written to
//! temporary directories, sample histories and states, and the proptest strategies
//! that generate any record.

pub use proptest::collection::{btree_map, vec};
pub use proptest::option;
pub use proptest::prelude::*;
pub use proptest::strategy::Union;
pub use stack::fs::{Fs, RealFs};
pub use stack::journal::event::{Md5Sum, SafeName, SlotRef};
pub use stack::journal::frame::{self, HEADER_LEN, MAGIC};
pub use stack::journal::{check_end, scan_file, End, Event, Journal, LinkMode, Record, Slot};
pub use stack::layout::Layout;
pub use stack::replay::state::{
    DomainEntry, JournalPos, StatFp, Strategy as RefStrategy, SyncState,
};
pub use stack::Error;
pub use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
pub use std::cell::Cell;
pub use std::collections::BTreeMap;
pub use std::sync::Arc;
// ---------------------------------------------------------------------------
// Allocation probe: the largest single allocation made on the current thread.
// ---------------------------------------------------------------------------

pub struct PeakAlloc;

thread_local! {
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

pub fn note_alloc(size: usize) {
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
pub static GLOBAL: PeakAlloc = PeakAlloc;

/// Run `f` and return its result with the largest single allocation it made.
pub fn peak_alloc_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    PEAK.with(|p| p.set(0));
    let out = f();
    (out, PEAK.with(|p| p.get()))
}

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

pub fn real_fs() -> Arc<dyn Fs> {
    Arc::new(RealFs)
}

pub fn temp_layout() -> (tempfile::TempDir, Layout) {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = Layout::new(dir.path());
    (dir, layout)
}

/// Append each batch and sync it as one frame; returns every record written.
pub fn write_batches(layout: &Layout, batches: &[Vec<(u64, Event)>]) -> Vec<Record> {
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

pub fn read_journal(layout: &Layout) -> Vec<u8> {
    std::fs::read(layout.journal()).expect("read journal")
}

pub fn write_journal(layout: &Layout, bytes: &[u8]) {
    std::fs::create_dir_all(layout.private()).expect("mkdir");
    std::fs::write(layout.journal(), bytes).expect("write journal");
}

pub fn records_of(scan: &frame::Scan) -> Vec<Record> {
    scan.records.iter().map(|(_, r)| r.clone()).collect()
}

/// A frame of a valid journal: where it starts and ends, and how many records
/// precede it.
#[derive(Debug, Clone, Copy)]
pub struct FrameSpan {
    pub start: usize,
    pub end: usize,
    pub records_before: usize,
}

/// The frames of a journal known to be valid, from its length fields.
pub fn frame_spans(bytes: &[u8], batches: &[Vec<(u64, Event)>]) -> Vec<FrameSpan> {
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
pub fn raw_frame(payload: &[u8]) -> Vec<u8> {
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
pub fn header_with_version(version: u32) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&version.to_le_bytes());
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

pub fn fp(n: u64) -> StatFp {
    StatFp {
        size: n,
        mtime_ns: -(n as i64) * 1_000_003,
        ino: n * 7,
    }
}

/// An entry at `place` naming `data/_direct/<name>.parquet` and
/// `data/_shared/tbl_<name>.parquet`: paths that are not the layout's for the
/// places the sample puts it, so that odd entries travel through checkpoints.
pub fn table(
    name: &str,
    with_optionals: bool,
    place: (SlotRef<'_>, &str),
) -> stack::replay::state::TableEntry {
    let mut e = stack::replay::state::TableEntry::new(
        name.try_into().unwrap(),
        Md5Sum::parse(&format!("{:032x}", name.len())).unwrap(),
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
pub fn sample_state() -> SyncState {
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
        "tbl_a".try_into().unwrap(),
        table("alpha", true, (SlotRef::Direct, "tbl_a")),
    );
    state.direct_tables.insert(
        "tbl_b".try_into().unwrap(),
        table("beta", false, (SlotRef::Direct, "tbl_b")),
    );
    let mut pkg = BTreeMap::new();
    pkg.insert(
        "tbl_c".try_into().unwrap(),
        table(
            "gamma",
            false,
            (SlotRef::Package(&"sales".try_into().unwrap()), "tbl_c"),
        ),
    );
    state.data_packages.insert("sales".try_into().unwrap(), pkg);
    assert!(state.entries().all(|(_, _, e)| !e.has_own_paths()));
    state.memory_domains.insert(
        "ops".try_into().unwrap(),
        DomainEntry {
            md5: "d41d8cd98f00b204e9800998ecf8427e".try_into().unwrap(),
            path: "memory/ops/bundle.md".into(),
            fp: None,
        },
    );
    state
}

/// Five batches covering every event variant.
pub fn sample_batches() -> Vec<Vec<(u64, Event)>> {
    let md5 = Md5Sum::parse("0123456789abcdef0123456789abcdef").unwrap();
    vec![
        vec![
            (
                1,
                Event::Begin {
                    manifest_md5: md5,
                    link: LinkMode::Auto,
                },
            ),
            (
                1,
                Event::Stage {
                    md5,
                    url: "https://example.com/t.parquet".into(),
                },
            ),
        ],
        vec![
            (
                1,
                Event::PutShared {
                    table_id: "tbl_a".try_into().unwrap(),
                    md5,
                },
            ),
            (
                1,
                Event::MakeRef {
                    slot: Slot::Package("sales".try_into().unwrap()),
                    table_id: "tbl_a".try_into().unwrap(),
                    name: "orders".try_into().unwrap(),
                    md5,
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
                    table_id: "tbl_a".try_into().unwrap(),
                    name: "orders".try_into().unwrap(),
                },
            ),
            (
                3,
                Event::RemoveShared {
                    table_id: "tbl_a".try_into().unwrap(),
                },
            ),
            (
                3,
                Event::PutBundle {
                    slug: "ops".try_into().unwrap(),
                    md5,
                },
            ),
            (
                3,
                Event::RemoveBundle {
                    slug: "ops".try_into().unwrap(),
                },
            ),
            (
                3,
                Event::RemoveDir {
                    slot: Slot::Package("sales".try_into().unwrap()),
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
pub fn sample_journal() -> (
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

pub fn arb_text() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

/// Any safe name (an id, a name, a slug): anything else does not decode.
pub fn arb_name() -> impl Strategy<Value = SafeName> {
    "[A-Za-z0-9][A-Za-z0-9._-]{0,12}".prop_map(|s| SafeName::parse(s).expect("a safe name"))
}

/// Any md5 the engine records: anything else does not decode.
pub fn arb_md5() -> impl Strategy<Value = Md5Sum> {
    "[0-9a-f]{32}".prop_map(|s| Md5Sum::parse(&s).expect("an md5"))
}

pub fn arb_fp() -> impl Strategy<Value = StatFp> {
    (any::<u64>(), any::<i64>(), any::<u64>()).prop_map(|(size, mtime_ns, ino)| StatFp {
        size,
        mtime_ns,
        ino,
    })
}

pub fn arb_ref_strategy() -> impl Strategy<Value = RefStrategy> {
    prop_oneof![
        Just(RefStrategy::Symlink),
        Just(RefStrategy::Hardlink),
        Just(RefStrategy::Copy),
        Just(RefStrategy::Reflink),
    ]
}

pub fn arb_link_mode() -> impl Strategy<Value = LinkMode> {
    prop_oneof![
        Just(LinkMode::Auto),
        Just(LinkMode::Symlink),
        Just(LinkMode::Hardlink),
        Just(LinkMode::Copy),
        Just(LinkMode::Reflink),
    ]
}

pub fn arb_slot() -> impl Strategy<Value = Slot> {
    prop_oneof![Just(Slot::Direct), arb_name().prop_map(Slot::Package)]
}

/// A table entry before it has a place: its paths are the layout's for the place
/// it is put in (`None`), or any text.
pub type RawEntry = (stack::replay::state::TableEntry, Option<(String, String)>);

pub fn arb_table_entry() -> impl Strategy<Value = RawEntry> {
    (
        (arb_name(), arb_md5(), option::of(any::<u64>())),
        (option::of((arb_text(), arb_text())), arb_ref_strategy()),
        (option::of(arb_fp()), option::of(arb_fp())),
    )
        .prop_map(
            |((name, md5, size), (paths, strategy), (ref_fp, shared_fp))| {
                let mut e = stack::replay::state::TableEntry::new(name, md5, size, strategy);
                e.ref_fp = ref_fp;
                e.shared_fp = shared_fp;
                (e, paths)
            },
        )
}

/// The entries of one slot, each given its paths there.
pub fn place(
    slot: SlotRef<'_>,
    raw: BTreeMap<SafeName, RawEntry>,
) -> BTreeMap<SafeName, stack::replay::state::TableEntry> {
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

pub fn arb_domain() -> impl Strategy<Value = DomainEntry> {
    (arb_md5(), arb_text(), option::of(arb_fp())).prop_map(|(md5, path, fp)| DomainEntry {
        md5,
        path,
        fp,
    })
}

pub fn arb_state() -> impl Strategy<Value = SyncState> {
    (
        (any::<u32>(), any::<u64>(), any::<u64>()),
        btree_map(arb_name(), arb_table_entry(), 0..3),
        btree_map(
            arb_name(),
            btree_map(arb_name(), arb_table_entry(), 0..3),
            0..3,
        ),
        btree_map(arb_name(), arb_domain(), 0..3),
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
pub fn arb_event() -> impl Strategy<Value = Event> {
    Union::new(vec![
        (arb_md5(), arb_link_mode())
            .prop_map(|(manifest_md5, link)| Event::Begin { manifest_md5, link })
            .boxed(),
        (arb_md5(), arb_text())
            .prop_map(|(md5, url)| Event::Stage { md5, url })
            .boxed(),
        (arb_text(), any::<u64>(), any::<u64>())
            .prop_map(|(key, skipped_direct, skipped_packages)| Event::Request {
                key,
                skipped_direct,
                skipped_packages,
            })
            .boxed(),
        (arb_name(), arb_md5())
            .prop_map(|(table_id, md5)| Event::PutShared { table_id, md5 })
            .boxed(),
        (
            arb_slot(),
            (arb_name(), arb_name(), arb_md5()),
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
        (arb_slot(), arb_name(), arb_name())
            .prop_map(|(slot, table_id, name)| Event::RemoveRef {
                slot,
                table_id,
                name,
            })
            .boxed(),
        arb_name()
            .prop_map(|table_id| Event::RemoveShared { table_id })
            .boxed(),
        (arb_name(), arb_md5())
            .prop_map(|(slug, md5)| Event::PutBundle { slug, md5 })
            .boxed(),
        arb_name()
            .prop_map(|slug| Event::RemoveBundle { slug })
            .boxed(),
        arb_slot()
            .prop_map(|slot| Event::RemoveDir { slot })
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
pub fn arb_batches() -> impl Strategy<Value = Vec<Vec<(u64, Event)>>> {
    vec(vec((0u64..50, arb_event()), 1..5), 1..5)
}

/// Records with contiguous seqs from an arbitrary start, split into batches.
pub fn arb_record_batches() -> impl Strategy<Value = Vec<Vec<Record>>> {
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

/// Compare ends ignoring the human-readable reason.
pub fn same_end(got: &End, want: &End) -> bool {
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
