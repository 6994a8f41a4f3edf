//! Inputs the fuzz campaigns found failing, each minimized and replayed through the
//! same property as the campaign.

mod fuzz_support;

use fuzz_support::*;

fn table(table: u8) -> TableSpec {
    TableSpec {
        table,
        alt_name: false,
        remote: false,
    }
}

/// Found by `event_sequences_with_crashes` (proptest twin of `event_sequence`):
/// `tbl_d` moves from package `p1` to the direct tables, a symlink both times. The
/// pull succeeds, but pulling the same manifest again is not a no-op: it commits
/// an empty transaction that only refreshes the fingerprint of
/// `data/_shared/tbl_d.parquet`. The moved reference is a new state entry, which
/// starts without a shared fingerprint, and `Committed` recorded only the paths the
/// transaction wrote, so the next pull re-hashed the shared file and committed its
/// fingerprint (a no-op pull should touch nothing, journal included).
#[test]
fn table_moving_from_package_to_direct_then_repull_is_noop() {
    let versions = [0, 0, 0, 1, 0, 0];
    let first = StepSpec {
        versions,
        direct: vec![],
        packages: vec![PackageSpec {
            slug: 0,
            tables: vec![table(3)],
        }],
        domains: vec![],
        link: 0,
        reflink: false,
        crash: None,
    };
    let second = StepSpec {
        direct: vec![table(3)],
        packages: vec![],
        ..first.clone()
    };
    run_scenario(&[first, second]);
}

/// Found by the `event_sequence` campaign (artifact crash-841fb359…, 11 minutes in):
/// a pull dies (SIGKILL) inside the fdatasync of its `Committed` record, after the
/// record was written. Recovery reads the journal, sees `Committed` (in the page
/// cache, not yet durable), and so deletes the staged files as leftovers. A power
/// loss then keeps those unlinks but loses the unsynced `Committed`: the next
/// recovery finds a prepared transaction to roll forward whose staged files are gone,
/// and fails every time (the directory is stuck).
#[test]
fn recovery_trusts_a_committed_record_that_is_not_durable() {
    let step = StepSpec {
        versions: [1, 2, 2, 0, 0, 0],
        direct: vec![TableSpec {
            table: 5,
            alt_name: true,
            remote: false,
        }],
        packages: vec![
            PackageSpec {
                slug: 0,
                tables: vec![
                    table(3),
                    TableSpec {
                        table: 2,
                        alt_name: false,
                        remote: true,
                    },
                ],
            },
            PackageSpec {
                slug: 1,
                tables: vec![TableSpec {
                    table: 0,
                    alt_name: true,
                    remote: false,
                }],
            },
        ],
        domains: vec![(0, 2)],
        link: 4,
        reflink: false,
        crash: Some(CrashSpec {
            after: 82,
            mode: 0,
            mask: 5305939971369795559,
            in_recovery: Some((49, 3)),
        }),
    };
    run_scenario(&[step]);
}

/// Found by the `journal_decode` campaign (checksum-fixing mode, 1.36 M executions
/// in): bincode accepts a non-minimal varint (`252, 1, 0, 0, 0` for 1), so a frame
/// whose checksum matches can decode to records that re-encode to other bytes. The
/// reader is right to accept it (the checksum covers the bytes it read); the
/// property was too strict and now checks that each frame's own checksum matches and
/// that its records re-encode to an equivalent frame.
#[test]
fn journal_frame_with_a_non_minimal_varint() {
    use stack::journal::frame;
    // One record {seq 1, txn 1, Prepared}; the Vec length 1 written as u16 (251, 1, 0).
    let payload = [251u8, 1, 0, 1, 1, 9];
    let mut bytes = frame::header().to_vec();
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&[0; 4]);
    bytes.extend_from_slice(&payload);
    fix_checksums(&mut bytes);
    let scan = frame::scan(&bytes);
    assert_eq!(scan.end, frame::End::Clean);
    assert_eq!(scan.records.len(), 1);
    check_journal_bytes(&bytes);
}
