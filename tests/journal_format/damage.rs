//! Truncation and damage at every byte, and hostile lengths: a scan keeps exactly
//! the whole batches, never reports a different history, and never allocates what a
//! length field claims.

use super::support::*;

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
        slot: Slot::Package("after".try_into().unwrap()),
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
