//! Regression tests for what the fuzz campaigns (issue 6) found. Each one is the
//! minimized input, replayed through the same property as the campaign.

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
