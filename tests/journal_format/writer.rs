//! The writer when writes fail: a failed write, sync or compaction never leaves a
//! batch that corrupts the journal or is lost; creating the journal makes its names
//! durable; automatic compaction stays bounded.

use super::support::*;

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
        slot: Slot::Package("pkg".try_into().unwrap()),
        table_id: format!("tbl_{i:08}").try_into().unwrap(),
        name: format!("name_{i:08}").try_into().unwrap(),
        md5: "0123456789abcdef0123456789abcdef".try_into().unwrap(),
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
