//! The journal's encoding, pinned byte for byte: every event's record, the header
//! and a frame. The rule (`frame::FORMAT_VERSION`): any change to these bytes is a
//! new format version, so that an older build meets a newer journal as "written by
//! a newer stack", never as corruption. A change to an encoding fails here until
//! the version moves and the goldens are recorded for it; a new event variant
//! fails to compile here ([`golden_name`]) until it has a golden.
//!
//! Also: journals of the older version 1 (today's bytes under the version 1
//! header, as existing users have them) are read unchanged, and a writer gives
//! them the current header before it appends, crash-safely.

#![allow(clippy::disallowed_methods)] // fixtures write journal files directly

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use stack::fs::fault::{Fault, FaultFs};
use stack::fs::sim::{Crash, SimFs};
use stack::fs::{Fs, RealFs};
use stack::journal::event::Md5Sum;
use stack::journal::frame::{self, FORMAT_VERSION, HEADER_LEN};
use stack::journal::{scan_file, End, Event, Journal, LinkMode, Record, Slot};
use stack::layout::Layout;
use stack::replay::state::{JournalEnd, StatFp, Strategy};
use stack::SyncState;

/// The version whose encoding the goldens below are.
const GOLDEN_VERSION: u32 = 2;

/// The header of a version 2 journal.
const GOLDEN_HEADER: &str = "535441434b4a4e4c020000003a51e4f8";

/// One record of each event variant, with every field set to a distinct value.
fn records() -> Vec<Record> {
    let state: SyncState = serde_json::from_str(
        r#"{
          "version": 1,
          "journal": {"seq": 5, "txn": 2},
          "direct_tables": {"t1": {"name": "fx", "md5": "0123456789abcdef0123456789abcdef",
            "size": 10, "strategy": "copy", "ref_path": "data/_direct/fx.parquet",
            "shared_path": "data/_direct/fx.parquet"}},
          "data_packages": {},
          "memory_domains": {"fin": {"md5": "fedcba9876543210fedcba9876543210",
            "path": "memory/fin/bundle.md"}}
        }"#,
    )
    .expect("the fixture is a state file");
    let md5 = Md5Sum::parse("0123456789abcdef0123456789abcdef").unwrap();
    let events = vec![
        Event::Begin {
            manifest_md5: md5,
            link: LinkMode::Hardlink,
        },
        Event::Stage {
            md5,
            url: "https://h/t1".to_string(),
        },
        Event::PutShared {
            table_id: "t1".try_into().unwrap(),
            md5,
        },
        Event::MakeRef {
            slot: Slot::Package("sales".try_into().unwrap()),
            table_id: "t1".try_into().unwrap(),
            name: "orders".try_into().unwrap(),
            md5,
            size: Some(300),
            strategy: Strategy::Symlink,
        },
        Event::RemoveRef {
            slot: Slot::Direct,
            table_id: "t2".try_into().unwrap(),
            name: "fx".try_into().unwrap(),
        },
        Event::RemoveShared {
            table_id: "t3".try_into().unwrap(),
        },
        Event::PutBundle {
            slug: "fin".try_into().unwrap(),
            md5,
        },
        Event::RemoveBundle {
            slug: "ops".try_into().unwrap(),
        },
        Event::RemoveDir {
            slot: Slot::Package("old".try_into().unwrap()),
        },
        Event::Prepared,
        Event::Committed {
            fingerprints: vec![(
                "data/sales/orders.parquet".to_string(),
                StatFp {
                    size: 300,
                    mtime_ns: -5,
                    ino: 77,
                },
            )],
        },
        Event::Aborted {
            reason: "fetch failed".to_string(),
        },
        Event::Checkpoint {
            state: Box::new(state),
        },
        Event::RemoveStray {
            rel: "data/x.tmp".to_string(),
        },
        Event::Request {
            key: md5.to_string(),
            skipped_direct: 1,
            skipped_packages: 2,
        },
        Event::Place {
            staged: "place-1".to_string(),
            rel: "data/sales".to_string(),
        },
    ];
    events
        .into_iter()
        .enumerate()
        .map(|(i, event)| Record {
            seq: 1000 + i as u64,
            txn: 300,
            event,
        })
        .collect()
}

/// The golden's name for an event. No wildcard: a new variant does not compile
/// until it is named here, and then fails [`every_event_encodes_to_its_golden`]
/// until its bytes are recorded (under a new version).
fn golden_name(event: &Event) -> &'static str {
    match event {
        Event::Begin { .. } => "begin",
        Event::Stage { .. } => "stage",
        Event::PutShared { .. } => "put_shared",
        Event::MakeRef { .. } => "make_ref",
        Event::RemoveRef { .. } => "remove_ref",
        Event::RemoveShared { .. } => "remove_shared",
        Event::PutBundle { .. } => "put_bundle",
        Event::RemoveBundle { .. } => "remove_bundle",
        Event::RemoveDir { .. } => "remove_dir",
        Event::Prepared => "prepared",
        Event::Committed { .. } => "committed",
        Event::Aborted { .. } => "aborted",
        Event::Checkpoint { .. } => "checkpoint",
        Event::RemoveStray { .. } => "remove_stray",
        Event::Request { .. } => "request",
        Event::Place { .. } => "place",
    }
}

/// Each record's payload (bincode of a one-record batch), in hex.
const GOLDEN: &[(&str, &str)] = &[
    (
        "begin",
        concat!(
            "01fbe803fb2c0100203031323334353637383961626364656630313233343536",
            "37383961626364656602",
        ),
    ),
    (
        "stage",
        concat!(
            "01fbe903fb2c0101203031323334353637383961626364656630313233343536",
            "3738396162636465660c68747470733a2f2f682f7431",
        ),
    ),
    (
        "put_shared",
        concat!(
            "01fbea03fb2c0102027431203031323334353637383961626364656630313233",
            "343536373839616263646566",
        ),
    ),
    (
        "make_ref",
        concat!(
            "01fbeb03fb2c0103010573616c6573027431066f726465727320303132333435",
            "363738396162636465663031323334353637383961626364656601fb2c0100",
        ),
    ),
    ("remove_ref", "01fbec03fb2c010400027432026678"),
    ("remove_shared", "01fbed03fb2c0105027433"),
    (
        "put_bundle",
        concat!(
            "01fbee03fb2c01060366696e2030313233343536373839616263646566303132",
            "33343536373839616263646566",
        ),
    ),
    ("remove_bundle", "01fbef03fb2c0107036f7073"),
    ("remove_dir", "01fbf003fb2c0108036f6c64"),
    ("prepared", "01fbf103fb2c0109"),
    (
        "committed",
        concat!(
            "01fbf203fb2c010a0119646174612f73616c65732f6f72646572732e70617271",
            "756574fb2c01094d",
        ),
    ),
    ("aborted", "01fbf303fb2c010b0c6665746368206661696c6564"),
    (
        "checkpoint",
        concat!(
            "01fbf403fb2c010c010205010274310266782030313233343536373839616263",
            "64656630313233343536373839616263646566010a17646174612f5f64697265",
            "63742f66782e7061727175657417646174612f5f6469726563742f66782e7061",
            "727175657402000000010366696e206665646362613938373635343332313066",
            "656463626139383736353433323130146d656d6f72792f66696e2f62756e646c",
            "652e6d6400",
        ),
    ),
    ("remove_stray", "01fbf503fb2c010d0a646174612f782e746d70"),
    (
        "request",
        concat!(
            "01fbf603fb2c010e203031323334353637383961626364656630313233343536",
            "3738396162636465660102",
        ),
    ),
    (
        "place",
        "01fbf703fb2c010f07706c6163652d310a646174612f73616c6573",
    ),
];

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("golden hex"))
        .collect()
}

fn golden(name: &str) -> Vec<u8> {
    let (_, h) = GOLDEN
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no golden for {name}"));
    unhex(h)
}

/// A journal file of format `version` holding `records`, one frame each.
fn journal_bytes(version: u32, records: &[Record]) -> Vec<u8> {
    let mut bytes = frame::header_of(version).to_vec();
    for r in records {
        bytes.extend(frame::encode_frame(std::slice::from_ref(r)).expect("encode"));
    }
    bytes
}

#[test]
fn the_goldens_are_the_current_versions_encoding() {
    assert_eq!(
        FORMAT_VERSION, GOLDEN_VERSION,
        "the journal format version moved: record the goldens of version {FORMAT_VERSION} \
         here, and keep reading (and test) the versions before it"
    );
}

/// Every event encodes to its golden bytes, and the goldens decode to the events.
#[test]
fn every_event_encodes_to_its_golden() {
    let mut changed = Vec::new();
    for r in records() {
        let name = golden_name(&r.event);
        let frame = frame::encode_frame(std::slice::from_ref(&r)).expect("encode");
        let payload = &frame[frame::FRAME_HEADER_LEN..];
        if hex(payload) != hex(&golden(name)) {
            changed.push(format!("(\"{name}\", \"{}\"),", hex(payload)));
        }
    }
    assert!(
        changed.is_empty(),
        "the journal encoding of these events changed; that needs a new \
         frame::FORMAT_VERSION (see its doc) before new goldens are recorded:\n{}",
        changed.join("\n")
    );
    // And back: a journal of the goldens reads as the records.
    let mut bytes = frame::header().to_vec();
    for r in records() {
        let payload = golden(golden_name(&r.event));
        let mut head = (payload.len() as u32).to_le_bytes().to_vec();
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.update(&payload);
        head.extend(crc.finalize().to_le_bytes());
        bytes.extend(head);
        bytes.extend(payload);
    }
    let scan = frame::scan(&bytes);
    assert_eq!(scan.end, End::Clean);
    let read: Vec<Record> = scan.records.into_iter().map(|(_, r)| r).collect();
    assert_eq!(read, records());
}

/// The header (magic, version, checksum) and the frame around a payload
/// (length, crc32 of length and payload) are pinned too.
#[test]
fn header_and_frame_are_pinned() {
    assert_eq!(hex(&frame::header()), GOLDEN_HEADER);
    let r = Record {
        seq: 1,
        txn: 1,
        event: Event::Prepared,
    };
    assert_eq!(
        hex(&frame::encode_frame(&[r]).expect("encode")),
        "040000002455d13801010109"
    );
}

fn temp_layout() -> (tempfile::TempDir, Layout) {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = Layout::new(dir.path());
    (dir, layout)
}

fn write_journal(layout: &Layout, bytes: &[u8]) {
    std::fs::create_dir_all(layout.private()).expect("mkdir");
    std::fs::write(layout.journal(), bytes).expect("write journal");
}

/// A journal of version 1 holding today's records (every variant, `Request` and
/// `Place` included, as builds that added them wrote under version 1) is read
/// unchanged; opening it changes nothing; the first append gives it the current
/// header, keeping every frame byte for byte, then appends after them.
#[test]
fn a_version_1_journal_is_read_and_upgraded_before_the_first_append() {
    let (_dir, layout) = temp_layout();
    let records = records();
    let v1 = journal_bytes(1, &records);
    write_journal(&layout, &v1);

    let scan = scan_file(&RealFs, &layout).unwrap().unwrap();
    assert_eq!(scan.end, End::Clean);
    assert_eq!(scan.records.len(), records.len());

    let fs: Arc<dyn Fs> = Arc::new(RealFs);
    let opened = Journal::open(fs, &layout).expect("a version 1 journal opens");
    assert_eq!(opened.records, records);
    assert!(opened.torn.is_none());
    assert_eq!(
        std::fs::read(layout.journal()).unwrap(),
        v1,
        "opening wrote"
    );

    let mut journal = opened.journal;
    let txn = journal.new_txn();
    journal.append(txn, Event::Prepared);
    journal.sync().expect("append");
    let after = std::fs::read(layout.journal()).unwrap();
    assert_eq!(&after[..HEADER_LEN], &frame::header()[..]);
    assert_eq!(frame::header_version(&after), Some(FORMAT_VERSION));
    assert_eq!(&after[HEADER_LEN..v1.len()], &v1[HEADER_LEN..]);
    assert_eq!(journal.len(), after.len() as u64);
    let scan = frame::scan(&after);
    assert_eq!(scan.end, End::Clean);
    assert_eq!(scan.records.len(), records.len() + 1);
    assert!(
        !layout.journal_compact().exists(),
        "the upgrade left its copy"
    );

    // Later appends go to the upgraded file, without copying it again.
    journal.append(txn, Event::Prepared);
    journal.sync().expect("second append");
    let scan = frame::scan(&std::fs::read(layout.journal()).unwrap());
    assert_eq!(scan.end, End::Clean);
    assert_eq!(scan.records.len(), records.len() + 2);
}

/// The same through the writer a trusted state file opens without reading the
/// journal (`Journal::open_trusted`): the header is read at the first append, and
/// the file upgraded then.
#[test]
fn a_version_1_journal_opened_trusted_is_upgraded_before_the_first_append() {
    let (_dir, layout) = temp_layout();
    let records = records();
    let v1 = journal_bytes(1, &records);
    write_journal(&layout, &v1);
    let last = records.last().unwrap();
    let end = JournalEnd {
        len: v1.len() as u64,
        base: HEADER_LEN as u64,
        seq: last.seq,
        txn: last.txn,
        ino: std::fs::metadata(layout.journal()).unwrap().ino(),
    };
    let fs: Arc<dyn Fs> = Arc::new(RealFs);
    let mut journal = Journal::open_trusted(fs, &layout, end).expect("open trusted");
    assert_eq!(
        std::fs::read(layout.journal()).unwrap(),
        v1,
        "opening wrote"
    );
    let txn = journal.new_txn();
    journal.append(txn, Event::Prepared);
    journal.sync().expect("append");
    let after = std::fs::read(layout.journal()).unwrap();
    assert_eq!(frame::header_version(&after), Some(FORMAT_VERSION));
    assert_eq!(&after[HEADER_LEN..v1.len()], &v1[HEADER_LEN..]);
    let scan = frame::scan(&after);
    assert_eq!(scan.end, End::Clean);
    assert_eq!(scan.records.len(), records.len() + 1);
    assert_eq!(journal.end().len, after.len() as u64);
    assert_eq!(
        journal.end().ino,
        std::fs::metadata(layout.journal()).unwrap().ino(),
        "the writer follows the upgraded file"
    );
}

/// A version this build does not know yet is refused as newer, untouched.
#[test]
fn a_newer_version_is_refused_as_written_by_a_newer_stack() {
    let (_dir, layout) = temp_layout();
    let newer = journal_bytes(FORMAT_VERSION + 1, &records()[..1]);
    write_journal(&layout, &newer);
    let fs: Arc<dyn Fs> = Arc::new(RealFs);
    match Journal::open(fs, &layout) {
        Err(e @ stack::Error::JournalVersion { .. }) => {
            assert_eq!(e.exit_code(), 4);
            assert!(e.to_string().contains("newer stack"), "{e}");
        }
        Err(e) => panic!("expected JournalVersion, got {e}"),
        Ok(_) => panic!("a journal of a newer version was opened"),
    }
    assert_eq!(std::fs::read(layout.journal()).unwrap(), newer);
}

/// A crash at every mutation of the upgrade and the append after it, then any
/// power loss: the journal is the old file or the upgraded one, its records all
/// there, never a mix, never corrupt.
#[test]
fn the_upgrade_is_crash_safe() {
    let root = Path::new("/d");
    let layout = Layout::new(root);
    let records = records();
    let v1 = journal_bytes(1, &records);
    for crash_at in 0.. {
        let sim = SimFs::new();
        sim.create_dirs(layout.private()).unwrap();
        sim.write_file(layout.journal(), &v1).unwrap();
        sim.make_durable();
        let fs: Arc<dyn Fs> = Arc::new(sim.clone());
        let mut journal = Journal::open(fs, &layout).expect("open").journal;
        sim.crash_after(crash_at);
        let txn = journal.new_txn();
        journal.append(txn, Event::Prepared);
        let finished = journal.sync().is_ok();
        drop(journal);
        for mode in [
            Crash::Process,
            Crash::PowerLossPessimistic,
            Crash::PowerLossOptimistic,
        ] {
            let after = sim.reboot(mode);
            let bytes = after.read(&layout.journal()).expect("the journal is there");
            let scan = frame::scan(&bytes);
            let read: Vec<Record> = scan.records.iter().map(|(_, r)| r.clone()).collect();
            assert_eq!(
                read[..records.len()],
                records[..],
                "crash at {crash_at}, {mode:?}"
            );
            assert!(
                matches!(scan.end, End::Clean | End::TornTail { .. }),
                "crash at {crash_at}, {mode:?}: {:?}",
                scan.end
            );
            let version = frame::header_version(&bytes);
            assert!(
                version == Some(1) && bytes.len() >= v1.len() && bytes[..v1.len()] == v1[..]
                    || version == Some(FORMAT_VERSION),
                "crash at {crash_at}, {mode:?}: header {version:?}"
            );
        }
        if finished {
            assert!(crash_at > 3, "the upgrade and append took no mutations");
            break;
        }
    }
}

/// A fault that persists (EIO, a read-only disk, full metadata from any
/// operation of the upgrade on, or a full disk from any byte of its copy): the
/// append fails, the journal is the old file byte for byte, and no partial copy
/// is left behind.
#[test]
fn an_upgrade_the_disk_refuses_leaves_the_old_journal_and_no_copy() {
    let layout = Layout::new("/d");
    let v1 = journal_bytes(1, &records());
    let fresh = || {
        let sim = SimFs::new();
        sim.create_dirs(layout.private()).unwrap();
        sim.write_file(layout.journal(), &v1).unwrap();
        sim.make_durable();
        sim
    };
    let upgrade_and_append = |fs: Arc<dyn Fs>| -> stack::Result<()> {
        let mut journal = Journal::open(fs, &layout)?.journal;
        let txn = journal.new_txn();
        journal.append(txn, Event::Prepared);
        journal.sync()
    };
    let counting = FaultFs::new(fresh());
    upgrade_and_append(Arc::new(counting.clone())).unwrap();
    let ops = counting.ops();
    let faults = (0..ops)
        .flat_map(|op| {
            [
                Fault::Io { op },
                Fault::ReadOnly { op },
                Fault::NoSpaceMeta { op },
            ]
        })
        .chain(
            (0..v1.len() as u64)
                .step_by(16)
                .map(|bytes| Fault::NoSpace { bytes }),
        );
    let mut refused = 0;
    for fault in faults {
        let sim = fresh();
        let ffs = FaultFs::new(sim.clone());
        ffs.arm(fault);
        if upgrade_and_append(Arc::new(ffs.clone())).is_ok() {
            continue;
        }
        refused += 1;
        let journal = sim.read(&layout.journal()).unwrap();
        let upgraded = frame::header_version(&journal) == Some(FORMAT_VERSION);
        assert!(
            journal == v1 || upgraded && journal[HEADER_LEN..].starts_with(&v1[HEADER_LEN..]),
            "{fault:?}: the journal is neither the old file nor its upgrade"
        );
        // A disk out of data blocks still lets the copy go; one refusing
        // metadata, failing or read-only may keep it until the next command
        // that can write.
        if matches!(fault, Fault::NoSpace { .. }) {
            assert!(
                !sim.exists(&layout.journal_compact()).unwrap(),
                "{fault:?}: a partial copy is left behind"
            );
        }
        ffs.clear();
        upgrade_and_append(Arc::new(ffs))
            .unwrap_or_else(|e| panic!("{fault:?}: the next append, the disk writable: {e}"));
        let journal = sim.read(&layout.journal()).unwrap();
        assert_eq!(
            frame::header_version(&journal),
            Some(FORMAT_VERSION),
            "{fault:?}"
        );
        assert!(
            journal[HEADER_LEN..].starts_with(&v1[HEADER_LEN..]),
            "{fault:?}: records lost"
        );
        assert!(
            !sim.exists(&layout.journal_compact()).unwrap(),
            "{fault:?}: the copy outlives the next append"
        );
    }
    assert!(refused > 10, "only {refused} faulted runs failed");
}
