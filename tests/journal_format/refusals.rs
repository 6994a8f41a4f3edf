//! Refusals: an unknown format version, corruption (never cut as a torn tail),
//! sequence gaps, undecodable frames and I/O errors.

use super::support::*;

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
        stack::reconcile::recover::journal_is_clean(&RealFs, &layout),
        Err(Error::Io { op: "read", .. })
    ));
    assert!(matches!(
        stack::reconcile::recover::check_journal_file(&RealFs, &layout),
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
