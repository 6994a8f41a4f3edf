//! The operation journal: locked, checksummed, append-only.
//!
//! Owns: the on-disk format of `<dir>/.stack/journal`, appending and group commit,
//! the torn-tail rule, compaction, and the directory lock (`lock`).
//!
//! Invariant kept: every filesystem mutation of a pull is in the journal, durable,
//! before it runs (the apply plan is one batch, synced before the first visible
//! change), and a transaction exists only if its `Committed` (or, for recovery,
//! `Prepared`) record validates.
//!
//! # Format (version 1)
//!
//! ```text
//! header  = "STACKJNL" | version: u32 LE | crc32(magic ‖ version): u32 LE      (16 bytes)
//! frame   = len: u32 LE | crc32(len bytes ‖ payload): u32 LE | payload        (len ≤ 256 MiB)
//! payload = bincode 2 (standard config, decode limited to 256 MiB) of Vec<Record>
//! Record  = { seq: u64, txn: u64, event: Event }
//! ```
//!
//! A frame holds one *batch*: every record appended since the last [`Journal::sync`].
//! A batch is written with one `write` and made durable with one `fdatasync`, so a
//! crash leaves it whole or absent (the checksum covers the whole batch), and the
//! fsyncs of a pull do not grow with its number of tables. `seq` numbers rise by one
//! across the whole history; a frame that breaks the run is corruption.
//!
//! # The torn-tail rule
//!
//! Reading stops at the first frame that is incomplete, fails its checksum or does not
//! decode. If no valid frame begins anywhere after that point, the rest is a *torn
//! tail* (an append a crash cut short): a writer opening the journal copies the cut
//! bytes to `journal.broken` (as etcd does), truncates, and says so on stderr. If a
//! valid frame does follow, the journal is *corrupt*: nothing truncates or rewrites
//! it; `stack journal verify` exits 4 naming the byte offset and record number. An I/O
//! error while reading is reported as an I/O error, never taken for either.
//!
//! # Compaction
//!
//! `stack journal compact` (and a pull, automatically, once the journal is larger than
//! [`AUTO_COMPACT_BYTES`] and more than twice its size after the last compaction)
//! writes a new file holding one `Checkpoint` record carrying the whole projection,
//! syncs it, renames it over the journal and syncs the folder. Replaying checkpoint
//! plus tail gives the state that replaying the whole history gives.

pub mod event;
pub mod frame;
pub mod lock;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
use crate::fs::{FileWrite, Fs};
use crate::layout::Layout;
pub use event::{Event, LinkMode, Record, Slot};
pub use frame::{End, Scan, FORMAT_VERSION};

/// A pull compacts the journal once it is larger than this many bytes (and more than
/// twice as large as right after the last compaction).
pub const AUTO_COMPACT_BYTES: u64 = 8 * 1024 * 1024;

/// Read a journal file without changing it. `Ok(None)` if there is no journal.
pub fn scan_file(fs: &dyn Fs, layout: &Layout) -> Result<Option<Scan>> {
    let path = layout.journal();
    match fs.read(&path) {
        Ok(bytes) => Ok(Some(frame::scan(&bytes))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).at("read", &path),
    }
}

/// Turn the end of a scan into an error if it is not something a writer may fix.
pub fn check_end(layout: &Layout, scan: &Scan) -> Result<()> {
    match &scan.end {
        End::Clean | End::TornTail { .. } => Ok(()),
        End::Corrupt {
            offset,
            record,
            reason,
        } => Err(Error::JournalCorrupt {
            path: layout.journal(),
            offset: *offset,
            record: *record,
            reason: reason.clone(),
        }),
        End::UnknownVersion { found } => Err(Error::JournalVersion {
            path: layout.journal(),
            found: *found,
            supported: FORMAT_VERSION,
        }),
    }
}

/// The single writer of a journal. Hold the directory lock while it lives.
pub struct Journal {
    fs: Arc<dyn Fs>,
    layout: Layout,
    file: Box<dyn FileWrite>,
    len: u64,
    len_after_compaction: u64,
    next_seq: u64,
    last_txn: u64,
    pending: Vec<Record>,
}

/// What opening a journal for writing found.
pub struct Opened {
    pub journal: Journal,
    /// Every valid record, in order.
    pub records: Vec<Record>,
    /// A torn tail that was cut: (offset, bytes cut, reason).
    pub torn: Option<(u64, u64, String)>,
}

impl Journal {
    /// Open (creating if missing) the journal of `layout` for appending. A torn tail
    /// is copied to `journal.broken` and cut; corruption is an error.
    pub fn open(fs: Arc<dyn Fs>, layout: &Layout) -> Result<Opened> {
        let path = layout.journal();
        let private = layout.private();
        let scan = match scan_file(fs.as_ref(), layout)? {
            Some(scan) => scan,
            None => {
                let made = fs.create_dir_all(&private).at("mkdir", &private)?;
                let mut f = fs.create(&path).at("create", &path)?;
                f.write_all(&frame::header()).at("write", &path)?;
                f.sync().at("fsync", &path)?;
                drop(f);
                fs.sync_dir(&private).at("fsync", &private)?;
                if let Some(first) = made.first().and_then(|p| p.parent()) {
                    fs.sync_dir(first).at("fsync", first)?;
                }
                frame::scan(&frame::header())
            }
        };
        check_end(layout, &scan)?;
        let mut torn = None;
        if let End::TornTail { offset, reason } = &scan.end {
            let bytes = fs.read(&path).at("read", &path)?;
            let cut = &bytes[(*offset as usize).min(bytes.len())..];
            let broken = private.join("journal.broken");
            let mut f = fs.create(&broken).at("create", &broken)?;
            f.write_all(cut).at("write", &broken)?;
            f.sync().at("fsync", &broken)?;
            drop(f);
            if *offset < frame::HEADER_LEN as u64 {
                // Not even a header survived: start the file again.
                let mut f = fs.create(&path).at("create", &path)?;
                f.write_all(&frame::header()).at("write", &path)?;
                f.sync().at("fsync", &path)?;
            } else {
                fs.truncate(&path, *offset).at("truncate", &path)?;
            }
            fs.sync_dir(&private).at("fsync", &private)?;
            torn = Some((*offset, cut.len() as u64, reason.clone()));
        }
        let len = scan.valid_len.max(frame::HEADER_LEN as u64);
        let records: Vec<Record> = scan.records.into_iter().map(|(_, r)| r).collect();
        let next_seq = records.last().map_or(1, |r| r.seq + 1);
        let last_txn = records.iter().map(|r| r.txn).max().unwrap_or(0);
        let mut file = fs.open_append(&path).at("open", &path)?;
        // What we just read may be only in the page cache (a writer killed inside
        // its fdatasync): make it durable before anyone acts on it, or a power loss
        // could keep what recovery does (deleting staged files) but lose the
        // records it relied on.
        file.sync().at("fsync", &path)?;
        Ok(Opened {
            journal: Journal {
                fs,
                layout: layout.clone(),
                file,
                len,
                len_after_compaction: len,
                next_seq,
                last_txn,
                pending: Vec::new(),
            },
            records,
            torn,
        })
    }

    /// A fresh transaction id.
    pub fn new_txn(&mut self) -> u64 {
        self.last_txn += 1;
        self.last_txn
    }

    /// The highest transaction id seen.
    pub fn last_txn(&self) -> u64 {
        self.last_txn
    }

    /// The seq of the last appended record (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Current size of the file in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Is there nothing but the header?
    pub fn is_empty(&self) -> bool {
        self.len <= frame::HEADER_LEN as u64
    }

    /// Queue an event in the current batch; returns its seq. Nothing is written
    /// until [`Journal::sync`].
    pub fn append(&mut self, txn: u64, event: Event) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.last_txn = self.last_txn.max(txn);
        self.pending.push(Record { seq, txn, event });
        seq
    }

    /// Write the queued batch as one frame and make it durable with one fdatasync.
    pub fn sync(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self.layout.journal();
        let bytes = frame::encode_frame(&self.pending).map_err(|message| Error::State {
            path: path.clone(),
            message,
        })?;
        self.file.write_all(&bytes).at("append", &path)?;
        self.file.sync().at("fsync", &path)?;
        self.len += bytes.len() as u64;
        self.pending.clear();
        Ok(())
    }

    /// Should a pull compact now? (See [`AUTO_COMPACT_BYTES`].)
    pub fn wants_compaction(&self) -> bool {
        self.len > AUTO_COMPACT_BYTES && self.len > 2 * self.len_after_compaction
    }

    /// Replace the journal by one holding a single checkpoint of `state`, under a new
    /// transaction. Temp file, fsync, rename, fsync folder.
    pub fn compact(&mut self, state: &crate::replay::state::SyncState) -> Result<()> {
        self.sync()?;
        let txn = self.new_txn();
        let record = Record {
            seq: self.next_seq,
            txn,
            event: Event::Checkpoint {
                state: Box::new(state.clone()),
            },
        };
        let mut bytes = frame::header().to_vec();
        let frame =
            frame::encode_frame(std::slice::from_ref(&record)).map_err(|message| Error::State {
                path: self.layout.journal(),
                message,
            })?;
        bytes.extend_from_slice(&frame);
        let private = self.layout.private();
        let tmp: PathBuf = private.join("journal.compact");
        let path = self.layout.journal();
        let mut f = self.fs.create(&tmp).at("create", &tmp)?;
        f.write_all(&bytes).at("write", &tmp)?;
        f.sync().at("fsync", &tmp)?;
        drop(f);
        self.fs.rename(&tmp, &path).at("rename", &path)?;
        self.fs.sync_dir(&private).at("fsync", &private)?;
        self.file = self.fs.open_append(&path).at("open", &path)?;
        self.next_seq += 1;
        self.len = bytes.len() as u64;
        self.len_after_compaction = self.len;
        Ok(())
    }
}
