//! Records stack never writes (checkpoints and events naming paths outside the
//! directory): refused as corruption everywhere, and nothing is touched. A name,
//! slug or md5 that is not one stack writes does not even decode (the typed
//! events cannot hold one: such records are forged, `forge_journal`); a
//! checkpoint whose paths are not the layout's decodes and is refused by what
//! reads it.

use super::forge::forge_journal;
use super::support::*;

// Checkpoints holding a state stack never writes.
// ---------------------------------------------------------------------------

/// A state whose one direct table `tbl_a` is named `name` and names `shared` as
/// its shared file (its reference path is the layout's for `name`).
fn state_naming(name: &str, shared: &str) -> SyncState {
    let mut state = SyncState::default();
    let entry = stack::replay::state::TableEntry::new(
        name.try_into().unwrap(),
        "0123456789abcdef0123456789abcdef".try_into().unwrap(),
        Some(3),
        RefStrategy::Copy,
    )
    .with_paths(
        (SlotRef::Direct, "tbl_a"),
        &format!("data/_direct/{name}.parquet"),
        shared,
    );
    state
        .direct_tables
        .insert("tbl_a".try_into().unwrap(), entry);
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
                table_id: "tbl_a".try_into().unwrap(),
                name: "a".try_into().unwrap(),
                md5: md5.try_into().unwrap(),
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

/// A checkpoint is a whole state, paths included. One whose paths fail the state
/// file's own rule (`SyncState::check_paths`: absolute or `..` paths, paths that
/// are not the layout's) was not written by stack: replay, recovery and the check
/// before an append refuse the journal as corruption (exit 4), naming the record
/// and what is wrong, and change nothing in the directory (the torn tail after it
/// is not cut, no `journal.broken`, the state file is not rewritten). The byte
/// format still reads the record (`journal show` lists it). One naming an unsafe
/// name or slug does not decode at all: the same refusal, at its frame, naming
/// the value.
#[test]
fn checkpoint_with_unsafe_paths_is_corruption_and_nothing_is_touched() {
    use stack::reconcile::recover::replay;
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim.parquet");
    let victim = victim.to_str().unwrap();
    let mut domain = SyncState::default();
    domain.memory_domains.insert(
        "ops".try_into().unwrap(),
        DomainEntry {
            md5: "d41d8cd98f00b204e9800998ecf8427e".try_into().unwrap(),
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
            (at, Some(4)),
            &["checkpoint seq 4 (transaction 2)".to_string(), why],
        );
    }

    // Names that are not safe: the checkpoint is written with a safe name of the
    // same length, which is then replaced by the unsafe one.
    for (what, placeholder, value) in [
        ("../ name", "QQQQQQQQQQQQ", "../../victim"),
        ("absolute name", "QQQQQQQ", "/victim"),
        (".. package slug", "QQ", ".."),
    ] {
        let state = if what.contains("slug") {
            let mut s = SyncState::default();
            s.data_packages.insert(
                placeholder.try_into().unwrap(),
                state_naming("a", "data/_shared/tbl_a.parquet").direct_tables,
            );
            s
        } else {
            state_naming(placeholder, "data/_shared/tbl_a.parquet")
        };
        let (_dir, layout, at) = dir_with_checkpoint(&state);
        forge_journal(&layout.journal(), placeholder, value);
        refused_everywhere(
            &layout,
            what,
            (at, None),
            &[format!("{value:?} is not a safe path component")],
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

/// Events name their files by ids, names and slugs (never paths) that are safe
/// path components. A checksum-valid record holding one that is not (hand-made: a
/// `MakeRef` named `../../../victim`, a `..` slug, an md5 that is a path, a placed
/// folder or a stray outside `data/`) was not written by stack and does not
/// decode: replay, recovery and the check before an append refuse the journal as
/// corruption (exit 4), naming its frame and the value, whether its transaction
/// committed, reached its commit point or neither, and change nothing (the torn
/// tail after it is not cut, the state file not rewritten). Folded instead, a
/// committed one would send heal to stat and hash the victim, and the next pull
/// would plan a removal outside the directory.
#[test]
fn event_naming_a_path_outside_is_corruption_and_nothing_is_touched() {
    use stack::reconcile::recover::replay;
    let md5 = || Md5Sum::parse("0123456789abcdef0123456789abcdef").unwrap();
    let name = |s: &str| SafeName::parse(s).unwrap();
    let make_ref = |slot: Slot, table_id: &str, ref_name: &str| Event::MakeRef {
        slot,
        table_id: name(table_id),
        name: name(ref_name),
        md5: md5(),
        size: Some(3),
        strategy: RefStrategy::Copy,
    };
    let unsafe_component = |v: &str| format!("{v:?} is not a safe path component");
    // (the event with a placeholder, the placeholder, the value it is replaced
    // with, what the refusal says)
    let cases: Vec<(Event, &str, &str, String)> = vec![
        (
            make_ref(Slot::Direct, "tbl_a", "QQQQQQQQQQQQQQQ"),
            "QQQQQQQQQQQQQQQ",
            "../../../victim",
            unsafe_component("../../../victim"),
        ),
        (
            make_ref(Slot::Direct, "tbl_a", "QQQQQQQ"),
            "QQQQQQQ",
            "/victim",
            unsafe_component("/victim"),
        ),
        (
            make_ref(Slot::Package(name("QQ")), "tbl_a", "a"),
            "QQ",
            "..",
            unsafe_component(".."),
        ),
        (
            make_ref(Slot::Direct, "QQQQQQQQQQQQ", "a"),
            "QQQQQQQQQQQQ",
            "../../victim",
            unsafe_component("../../victim"),
        ),
        (
            Event::RemoveRef {
                slot: Slot::Package(name("QQQQQ")),
                table_id: name("tbl_a"),
                name: name("a"),
            },
            "QQQQQ",
            "../..",
            unsafe_component("../.."),
        ),
        (
            Event::PutShared {
                table_id: name("QQQQQQQQQ"),
                md5: md5(),
            },
            "QQQQQQQQQ",
            "../victim",
            unsafe_component("../victim"),
        ),
        (
            Event::PutShared {
                table_id: name("tbl_a"),
                md5: Md5Sum::parse("ffffffffffffffffffffffffffffffff").unwrap(),
            },
            "ffffffffffffffffffffffffffffffff",
            "../../../../victim",
            r#"md5 "../../../../victim" is not 32 lowercase hex digits"#.to_string(),
        ),
        (
            Event::RemoveShared {
                table_id: name("QQ"),
            },
            "QQ",
            "..",
            unsafe_component(".."),
        ),
        (
            Event::PutBundle {
                slug: name("QQQQQ"),
                md5: md5(),
            },
            "QQQQQ",
            "../..",
            unsafe_component("../.."),
        ),
        (
            Event::RemoveBundle { slug: name("Q") },
            "Q",
            "/",
            unsafe_component("/"),
        ),
        (
            Event::RemoveDir {
                slot: Slot::Package(name("QQQQQ")),
            },
            "QQQQQ",
            "../..",
            unsafe_component("../.."),
        ),
        (
            Event::Place {
                staged: "place-0".into(),
                rel: "data/QQQQQ".into(),
            },
            "data/QQQQQ",
            "data/../..",
            r#"folder "data/../.." is not one stack places"#.to_string(),
        ),
        (
            Event::Place {
                staged: "place-Q".into(),
                rel: "data/_shared".into(),
            },
            "place-Q",
            "../../x",
            r#"staged folder "../../x" is not one stack makes"#.to_string(),
        ),
        (
            Event::RemoveStray {
                rel: "data/QQQQQQQQQQQQQQQQQQQQ".into(),
            },
            "data/QQQQQQQQQQQQQQQQQQQQ",
            "data/../../victim.parquet",
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
    for (event, placeholder, value, why) in cases {
        for tail in tails {
            let what = format!("{} {value:?} then {} more", event.kind(), tail.len());
            let mut events = vec![event.clone()];
            events.extend(tail.iter().cloned());
            let (tmp, layout, at) = dir_with_batch(events);
            forge_journal(&layout.journal(), placeholder, value);
            let victim = tmp.path().join("victim.parquet");
            std::fs::write(&victim, b"abc").unwrap();
            refused_everywhere(&layout, &what, (at, None), std::slice::from_ref(&why));
            assert_eq!(std::fs::read(&victim).unwrap(), b"abc", "{what}");
        }
    }

    // The same journal with events stack writes replays, cutting the torn tail:
    // the refusals above are the events'.
    let (_tmp, layout, _) = dir_with_batch(vec![
        make_ref(Slot::Package(name("p1")), "tbl_b", "b"),
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

/// `layout`'s journal, whose record 3 at byte `at` is refused: when its frame
/// decodes (`records`: how many records the bytes then hold), its bytes still scan
/// (a torn tail after them), else (`None`) the scan ends there as corrupt; either
/// way `check_journal`, `replay`, `recover` and `journal_is_clean` each refuse it
/// as `JournalCorrupt` at that record, with a message holding every one of
/// `needles`; the directory is left byte for byte as it was.
fn refused_everywhere(
    layout: &Layout,
    what: &str,
    (at, records): (u64, Option<usize>),
    needles: &[String],
) {
    use stack::reconcile::recover::{journal_is_clean, recover, replay};
    use stack::replay::project::check_journal;
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
    let scan = scan_file(&RealFs, layout).unwrap().unwrap();
    match records {
        // The byte format keeps the records; what they mean is refused.
        Some(records) => {
            assert!(matches!(scan.end, End::TornTail { .. }), "{what}");
            assert_eq!(scan.records.len(), records, "{what}");
        }
        // The record does not decode: its checksum-valid frame is corruption.
        None => {
            assert!(
                matches!(scan.end, End::Corrupt { offset, record: 3, .. } if offset == at),
                "{what}: {:?}",
                scan.end
            );
            assert_eq!(scan.records.len(), 3, "{what}");
        }
    }
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
