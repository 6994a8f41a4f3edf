//! Journal throughput on a real disk.
//!
//! ```text
//! cargo run --release --example journal_bench [DIR]
//! ```
//!
//! Measures, for small `MakeRef` records (built inside the timed loop, as a pull
//! builds them):
//! - appends with one `sync` (one frame, one fdatasync) per 1,000-record batch;
//! - appends with one `sync` per record, on fewer records, to show the fsync cost;
//! - the same 1,000-record frames written without syncing, one fdatasync at the end;
//! - replay: `scan_file` (read + checksum + decode) of the 1,000,000-record journal.
//!
//! The journals go in a fresh temporary folder under DIR, else `$STACK_BENCH_DIR`,
//! else `/tmp` (a real disk, unlike `/dev/shm`). `$STACK_BENCH_RECORDS` changes the
//! 1,000,000 record count, `$STACK_BENCH_SYNCED_RECORDS` the 2,000 of the per-record
//! run.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stack::fs::{Fs, RealFs};
use stack::journal::{frame, scan_file, End, Event, Journal, Slot};
use stack::layout::Layout;
use stack::replay::state::Strategy;

const BATCH: u64 = 1_000;

fn env_count(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}")),
        Err(_) => default,
    }
}

fn make_ref(i: u64) -> Event {
    Event::MakeRef {
        slot: Slot::Direct,
        table_id: format!("tbl_{i:08}").try_into().unwrap(),
        name: format!("table_{i}").try_into().unwrap(),
        md5: format!("{:032x}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .try_into()
            .unwrap(),
        size: Some(16 * 1024),
        strategy: Strategy::Hardlink,
    }
}

/// One line of results.
fn report(what: &str, records: u64, bytes: u64, took: Duration, fsyncs: u64) {
    let secs = took.as_secs_f64();
    print!(
        "{what:<44} {records:>9} records {:>8.1} MB {secs:>8.3} s {:>12.0} records/s {:>8.1} MB/s",
        bytes as f64 / 1e6,
        records as f64 / secs,
        bytes as f64 / 1e6 / secs,
    );
    if fsyncs > 0 {
        print!(
            "  ({fsyncs} fdatasyncs, {:.2} ms each incl. write)",
            secs * 1e3 / fsyncs as f64
        );
    }
    println!();
}

/// Append `n` records through `Journal`, syncing every `batch`; returns the
/// payload bytes written (file size minus header) and the time taken.
fn append_synced(layout: &Layout, n: u64, batch: u64) -> (u64, Duration) {
    let fs: Arc<dyn Fs> = Arc::new(RealFs);
    let mut journal = Journal::open(fs, layout).expect("open journal").journal;
    let start = Instant::now();
    for i in 0..n {
        journal.append(1, make_ref(i));
        if (i + 1) % batch == 0 {
            journal.sync().expect("sync");
        }
    }
    journal.sync().expect("sync");
    let took = start.elapsed();
    (journal.len() - frame::HEADER_LEN as u64, took)
}

/// Write `n` records as `batch`-record frames without syncing, then one fdatasync.
fn append_unsynced(layout: &Layout, n: u64, batch: u64) -> (u64, Duration) {
    let fs = RealFs;
    fs.create_dir_all(&layout.private()).expect("mkdir");
    let mut file = fs.create(&layout.journal()).expect("create journal");
    file.write_all(&frame::header()).expect("write header");
    let start = Instant::now();
    let mut bytes = 0;
    let mut records = Vec::with_capacity(batch as usize);
    for i in 0..n {
        records.push(stack::journal::Record {
            seq: i + 1,
            txn: 1,
            event: make_ref(i),
        });
        if records.len() as u64 == batch || i + 1 == n {
            let encoded = frame::encode_frame(&records).expect("encode");
            file.write_all(&encoded).expect("write");
            bytes += encoded.len() as u64;
            records.clear();
        }
    }
    file.sync().expect("fdatasync");
    (bytes, start.elapsed())
}

fn main() {
    let base = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("STACK_BENCH_DIR").ok())
        .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    let n = env_count("STACK_BENCH_RECORDS", 1_000_000);
    let n_synced = env_count("STACK_BENCH_SYNCED_RECORDS", 2_000);
    let dir = tempfile::Builder::new()
        .prefix("journal-bench-")
        .tempdir_in(&base)
        .expect("temporary folder");
    println!("journal bench in {}", dir.path().display());
    let layout = |name: &str| Layout::new(dir.path().join(name));

    let batched = layout("batched");
    let (bytes, took) = append_synced(&batched, n, BATCH);
    report(
        "append, sync per 1,000-record batch",
        n,
        bytes,
        took,
        n.div_ceil(BATCH),
    );

    let (bytes, took) = append_synced(&layout("per-record"), n_synced, 1);
    report("append, sync per record", n_synced, bytes, took, n_synced);

    let (bytes, took) = append_unsynced(&layout("unsynced"), n, BATCH);
    report(
        "append 1,000-record frames, one sync at end",
        n,
        bytes,
        took,
        0,
    );

    let start = Instant::now();
    let scan = scan_file(&RealFs, &batched)
        .expect("read journal")
        .expect("journal exists");
    let took = start.elapsed();
    assert_eq!(scan.end, End::Clean, "benchmark journal must scan clean");
    assert_eq!(scan.records.len() as u64, n);
    report(
        "replay (scan_file: read + verify + decode)",
        n,
        scan.valid_len,
        took,
        0,
    );

    let bytes = std::fs::read(batched.journal()).expect("read journal");
    let start = Instant::now();
    let scan = frame::scan(&bytes);
    let took = start.elapsed();
    assert_eq!(scan.records.len() as u64, n);
    report(
        "replay (frame::scan of bytes in memory)",
        n,
        bytes.len() as u64,
        took,
        0,
    );
}
