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
//! # Format (version 2)
//!
//! ```text
//! header  = "STACKJNL" | version: u32 LE | crc32(magic ‖ version): u32 LE      (16 bytes)
//! frame   = len: u32 LE | crc32(len bytes ‖ payload): u32 LE | payload        (len ≤ 256 MiB)
//! payload = bincode 2 (standard config) of Vec<Record>, decoded under a limit of
//!           about 8-32 × its length (see `frame::decode_payload`)
//! Record  = { seq: u64, txn: u64, event: Event }
//! ```
//!
//! Any change to these bytes is a new format version (`frame::FORMAT_VERSION`, whose
//! doc states the rule; `tests/journal_golden.rs` pins each event's encoding). A
//! reader refuses a journal of a newer version as written by a newer stack, and
//! reads every older version it knows; a writer upgrades an older journal's header
//! before it appends the first record ([`Journal::sync`]), so that an older build
//! never meets a record it does not know under a version it reads.
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
//! bytes to `journal.broken` (as etcd does), truncates, and says so in its notes (which the command line prints). If a
//! valid frame does follow, the journal is *corrupt*: nothing truncates or rewrites
//! it; `stack journal verify` exits 4 naming the byte offset and record number. A frame
//! whose checksum is valid but whose payload does not decode was written whole (by a
//! newer format, or a bug): it is corruption too, wherever it is, never cut. So is a
//! record stack would never write: one naming a name, slug, md5 or path that could
//! leave the directory does not decode (its fields' decoders refuse it, naming the
//! value, `event`); a `Checkpoint` whose state's paths fail `SyncState::check_paths`
//! decodes, and the readers that act on the journal refuse it
//! (`replay::project::check_records`; [`Journal::open_checked`] asks before it cuts
//! anything). An I/O error while reading is reported as an I/O
//! error, never taken for either.
//!
//! # Compaction
//!
//! `stack journal compact` (and a pull, automatically, once the journal is larger than
//! [`AUTO_COMPACT_BYTES`], more than twice its size after the last compaction,
//! which is the size of its leading checkpoint frame, read from the file itself,
//! and larger than the state file: see [`Journal::wants_compaction`])
//! writes a new file holding one frame: a `Checkpoint` record carrying the whole
//! projection and, when the projection knows the request its last pull realised,
//! that `Request` in the checkpoint's transaction (so the no-op key survives). It
//! syncs the file, renames it over the journal and syncs the folder. Replaying checkpoint
//! plus tail gives the state that replaying the whole history gives.

pub mod event;
pub mod frame;
pub mod lock;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
use crate::fs::{FileWrite, Fs};
use crate::layout::Layout;
pub use event::{Event, LinkMode, Record, Slot};
pub use frame::{End, Scan, FORMAT_VERSION};

/// A pull compacts the journal once it is larger than this many bytes (and than the
/// other bounds of [`Journal::wants_compaction`]).
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
    check_end_of(layout, &scan.end)
}

/// [`check_end`] of a scan's end alone (`frame::scan_with`).
pub fn check_end_of(layout: &Layout, end: &End) -> Result<()> {
    match end {
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

/// The folders to fsync, deepest first, so that `.stack` and every folder made on
/// the way to it survive a crash once a new journal exists in it: the parent of each
/// folder in `made`, and always the local directory and its parent, because `.stack`
/// (and the local directory) may already exist without being durable: the directory
/// lock creates them without syncing, before the journal is opened.
fn folders_holding_new_names<'a>(layout: &'a Layout, made: &'a [PathBuf]) -> Vec<&'a Path> {
    let mut dirs: Vec<&Path> = made.iter().filter_map(|p| p.parent()).collect();
    dirs.push(&layout.root);
    dirs.extend(layout.root.parent());
    dirs.retain(|d| !d.as_os_str().is_empty());
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    dirs.dedup();
    dirs
}

/// The size the journal had right after its last compaction: the header plus a
/// leading checkpoint frame, if it starts with one (else just the header). Taken
/// from the file itself, so that the automatic bound holds across processes.
fn compaction_baseline(scan: &Scan) -> u64 {
    let header = frame::HEADER_LEN as u64;
    match scan.records.first() {
        Some((first, r)) if matches!(r.event, Event::Checkpoint { .. }) => scan
            .records
            .iter()
            .map(|(off, _)| *off)
            .find(|off| off != first)
            .unwrap_or(scan.valid_len),
        _ => header,
    }
}

/// The single writer of a journal. Hold the directory lock while it lives.
pub struct Journal {
    fs: Arc<dyn Fs>,
    layout: Layout,
    file: Box<dyn FileWrite>,
    len: u64,
    /// The inode of the file `file` appends to (see `JournalEnd::ino`).
    ino: u64,
    len_after_compaction: u64,
    next_seq: u64,
    last_txn: u64,
    pending: Vec<Record>,
    /// The pending batch already encoded by [`Journal::seal`].
    sealed: Option<Vec<u8>>,
    /// Why this writer may append nothing more (the file's end is no longer known
    /// to be `len`, or the file is no longer the journal); `None` while usable.
    broken: Option<String>,
    /// The format version the file's header names (`None`: not read yet, for a
    /// writer opened without reading the journal); an older one is upgraded before
    /// the first append.
    version: Option<u32>,
}

/// What opening a journal for writing found.
pub struct Opened {
    pub journal: Journal,
    /// Every valid record, in order.
    pub records: Vec<Record>,
    /// A torn tail that was cut: (offset, bytes cut, reason).
    pub torn: Option<(u64, u64, String)>,
    /// The journal did not exist and was created by this call.
    pub created: bool,
}

impl Journal {
    /// Open (creating if missing) the journal of `layout` for appending. A torn tail
    /// is copied to `journal.broken` and cut; corruption is an error.
    pub fn open(fs: Arc<dyn Fs>, layout: &Layout) -> Result<Opened> {
        Journal::open_checked(fs, layout, |_| Ok(()))
    }

    /// [`Journal::open`], refusing the journal if `accept` refuses its records
    /// (recovery's check of what they mean, `replay::project::check_records`). It is
    /// asked after the scan and before anything is cut: a refused journal is left
    /// exactly as it was, torn tail included.
    pub fn open_checked(
        fs: Arc<dyn Fs>,
        layout: &Layout,
        accept: impl FnOnce(&Scan) -> Result<()>,
    ) -> Result<Opened> {
        let path = layout.journal();
        let private = layout.private();
        let mut created = false;
        let scan = match scan_file(fs.as_ref(), layout)? {
            Some(scan) => scan,
            None => {
                created = true;
                let made = fs.create_dir_all(&private).at("mkdir", &private)?;
                let mut f = fs.create(&path).at("create", &path)?;
                f.write_all(&frame::header()).at("write", &path)?;
                f.sync().at("fsync", &path)?;
                drop(f);
                fs.sync_dir(&private).at("fsync", &private)?;
                for dir in folders_holding_new_names(layout, &made) {
                    fs.sync_dir(dir).at("fsync", dir)?;
                }
                frame::scan(&frame::header())
            }
        };
        check_end(layout, &scan)?;
        accept(&scan)?;
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
        let baseline = compaction_baseline(&scan);
        let records: Vec<Record> = scan.records.into_iter().map(|(_, r)| r).collect();
        let next_seq = records.last().map_or(1, |r| r.seq + 1);
        let last_txn = records.iter().map(|r| r.txn).max().unwrap_or(0);
        let mut file = fs.open_append(&path).at("open", &path)?;
        // What we just read may be only in the page cache (a writer killed inside
        // its fdatasync): make it durable before anyone acts on it, or a power loss
        // could keep what recovery does (deleting staged files) but lose the
        // records it relied on.
        file.sync().at("fsync", &path)?;
        let ino = fs.metadata(&path).at("stat", &path)?.ino;
        let version = file_version(fs.as_ref(), &path)?;
        Ok(Opened {
            journal: Journal {
                fs,
                layout: layout.clone(),
                file,
                len,
                ino,
                len_after_compaction: baseline,
                next_seq,
                last_txn,
                pending: Vec::new(),
                sealed: None,
                broken: None,
                version: Some(version),
            },
            records,
            torn,
            created,
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
        self.sealed = None;
        self.pending.push(Record { seq, txn, event });
        seq
    }

    /// Write the queued batch as one frame and make it durable with one fdatasync.
    ///
    /// If the write or the fdatasync fails, the bytes of the frame that may have
    /// reached the file are cut off again (the batch stays queued, so a later `sync`
    /// retries it): a frame must never be appended after a partial one, which would
    /// make the journal corrupt, nor twice. If the cut fails too, this writer refuses
    /// every later `sync` and `compact`; reopening the journal cuts the torn tail.
    pub fn sync(&mut self) -> Result<()> {
        self.sync_taking().map(drop)
    }

    /// [`Journal::sync`], handing the written records back instead of dropping them.
    fn sync_taking(&mut self) -> Result<Vec<Record>> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        self.check_usable()?;
        self.upgrade_format()?;
        let path = self.layout.journal();
        let bytes = match self.sealed.take() {
            Some(bytes) => bytes,
            None => self.encode_pending()?,
        };
        let written = self
            .file
            .write_all(&bytes)
            .at("append", &path)
            .and_then(|()| self.file.sync().at("fsync", &path));
        if let Err(e) = written {
            // A simulated crash must propagate untouched: no cleanup after it.
            if !e.is_crash() {
                if let Err(cut) = self.fs.truncate(&path, self.len) {
                    self.broken = Some(format!("a failed append could not be cut off ({cut})"));
                }
            }
            return Err(e);
        }
        self.len += bytes.len() as u64;
        Ok(std::mem::take(&mut self.pending))
    }

    /// Append the events of `parts`, in order, as one batch of `txn`, make it
    /// durable (as [`Journal::sync`]), and hand the stamped records back (moved, not
    /// copied: a large plan is held once, not twice). Anything queued before is
    /// written first, in its own batch.
    pub fn append_batch(&mut self, txn: u64, parts: Vec<Vec<Event>>) -> Result<Vec<Record>> {
        self.sync()?;
        // The records' list is allocated once, at its exact size, and each part is
        // consumed while its buffer shrinks (`drain_freeing`): a large batch's two lists
        // are not both whole at once (their pages are touched as filled), and the
        // parts are not first joined into one more list.
        self.pending
            .reserve_exact(parts.iter().map(Vec::len).sum::<usize>());
        for event in parts.into_iter().flat_map(crate::drain::drain_freeing) {
            self.append(txn, event);
        }
        self.sync_taking()
    }

    fn encode_pending(&self) -> Result<Vec<u8>> {
        frame::encode_frame(&self.pending).map_err(|message| {
            Error::Internal(format!("{}: {message}", self.layout.journal().display()))
        })
    }

    /// Encode the queued batch now and return the length the journal will have once
    /// [`Journal::sync`] wrote it (nothing may be appended in between).
    pub fn seal(&mut self) -> Result<u64> {
        let bytes = self.encode_pending()?;
        let end = self.len + bytes.len() as u64;
        self.sealed = Some(bytes);
        Ok(end)
    }

    /// The length right after the last compaction (the automatic bound's baseline).
    pub fn baseline(&self) -> u64 {
        self.len_after_compaction
    }

    /// The inode of the journal file this writer appends to.
    pub fn ino(&self) -> u64 {
        self.ino
    }

    /// Where this journal ends now, for a state file to record.
    pub fn end(&self) -> crate::model::state::JournalEnd {
        crate::model::state::JournalEnd {
            len: self.len,
            base: self.len_after_compaction,
            seq: self.last_seq(),
            txn: self.last_txn,
            ino: self.ino,
        }
    }

    /// Open the journal for appending without reading it, trusting a state file
    /// that names its exact end (its file and length).
    pub fn open_trusted(
        fs: Arc<dyn Fs>,
        layout: &Layout,
        end: crate::model::state::JournalEnd,
    ) -> Result<Journal> {
        let path = layout.journal();
        let file = fs.open_append(&path).at("open", &path)?;
        Ok(Journal {
            fs,
            layout: layout.clone(),
            file,
            len: end.len,
            ino: end.ino,
            len_after_compaction: end.base.max(frame::HEADER_LEN as u64),
            next_seq: end.seq + 1,
            last_txn: end.txn,
            pending: Vec::new(),
            sealed: None,
            broken: None,
            // Read at the first append, if there is one: a command that appends
            // nothing reads no more than it did.
            version: None,
        })
    }

    /// Forget the queued batch that a failed [`Journal::sync`] kept for a retry:
    /// the caller decided to append something else instead (a rollback's `Aborted`).
    pub fn discard_pending(&mut self) {
        self.pending.clear();
        self.sealed = None;
    }

    /// Did a failed append leave bytes this writer could not cut off again (so
    /// that what the file holds is unknown until it is reopened)?
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// `Err` if an earlier failure left this writer unable to append safely.
    fn check_usable(&self) -> Result<()> {
        match &self.broken {
            None => Ok(()),
            Some(why) => Err(Error::Io {
                op: "append",
                path: self.layout.journal(),
                source: std::io::Error::other(format!(
                    "{why}; the journal must be reopened before appending"
                )),
            }),
        }
    }

    /// Should a pull compact now? Once the journal is larger than
    /// [`AUTO_COMPACT_BYTES`], more than twice its size after the last compaction,
    /// and larger than the state file. A checkpoint is about half the state file's
    /// size, so the last bound keeps the cost amortized: a compaction (which writes
    /// a checkpoint and the state file again) happens only after the journal has
    /// grown by about a checkpoint's size since it was last one, and never right
    /// after a first pull, whose journal is about a checkpoint's size already and
    /// would gain nothing. (The state file is stat-ed only past the first two bounds;
    /// a state file that cannot be stat-ed does not hold compaction back.)
    pub fn wants_compaction(&self) -> bool {
        if self.len <= AUTO_COMPACT_BYTES || self.len <= 2 * self.len_after_compaction {
            return false;
        }
        let state_file = self.layout.state_file();
        self.fs
            .metadata(&state_file)
            .map_or(true, |m| self.len > m.len)
    }

    /// Replace the journal by one holding a single checkpoint of `state`, under a new
    /// transaction, followed in the same frame by the request that state realised
    /// (`state.journal.pulled`), if known. Temp file, fsync, rename, fsync folder.
    pub fn compact(&mut self, state: &crate::model::state::SyncState) -> Result<()> {
        self.check_usable()?;
        self.sync()?;
        let txn = self.new_txn();
        // Encoded from the borrowed state, straight after the header: the state is
        // not copied.
        let frame_records = event::CheckpointFrame {
            checkpoint: event::CheckpointRecord {
                seq: self.next_seq,
                txn,
                state,
            },
            request: state.journal.pulled.as_ref().map(|p| Record {
                seq: self.next_seq + 1,
                txn,
                event: Event::Request {
                    key: p.key.clone(),
                    skipped_direct: p.skipped_direct,
                    skipped_packages: p.skipped_packages,
                },
            }),
        };
        let written = 1 + u64::from(frame_records.request.is_some());
        // Measured first, then streamed into the file: a large state's encoding
        // is never held in memory.
        let measured = frame::measure_frame(&frame_records).map_err(|message| {
            Error::Internal(format!("{}: {message}", self.layout.journal().display()))
        })?;
        self.replace_file(|w| frame::write_frame(&mut &mut *w, &frame_records, measured))?;
        // The journal is now the new file: follow it before anything else can
        // fail, and if something does, append nothing more through this writer
        // (neither into the replaced file, nor into a name not yet durable).
        self.next_seq += written;
        self.len = frame::HEADER_LEN as u64 + measured.frame_len();
        self.len_after_compaction = self.len;
        self.follow_replaced_file("a compaction did not complete")
    }

    /// Write a new journal file (the current header, then what `body` writes)
    /// under a temp name, sync it and rename it over the journal: a crash leaves
    /// the old file or the new one. On failure the journal is untouched, and the
    /// partial copy (as large as the journal, and a leftover that would send the
    /// next command down the slow path) goes; a simulated crash leaves it, as a
    /// real one would. The caller then follows the new file
    /// ([`Self::follow_replaced_file`]).
    fn replace_file(&self, body: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
        let tmp: PathBuf = self.layout.journal_compact();
        let path = self.layout.journal();
        let written_whole = || -> Result<()> {
            let f = self.fs.create(&tmp).at("create", &tmp)?;
            let mut w = std::io::BufWriter::with_capacity(256 * 1024, f);
            w.write_all(&frame::header())
                .and_then(|()| body(&mut w))
                .at("write", &tmp)?;
            let mut f = w
                .into_inner()
                .map_err(|e| e.into_error())
                .at("write", &tmp)?;
            f.sync().at("fsync", &tmp)
        };
        if let Err(e) = written_whole() {
            if !e.is_crash() {
                let _ = self.fs.remove_file(&tmp);
            }
            return Err(e);
        }
        self.fs.rename(&tmp, &path).at("rename", &path)
    }

    /// After a rename put a new file (with the current header) at the journal's
    /// path: append to it from now on, and make its name durable. If either fails,
    /// this writer appends nothing more (`why`).
    fn follow_replaced_file(&mut self, why: &str) -> Result<()> {
        let path = self.layout.journal();
        let private = self.layout.private();
        self.version = Some(FORMAT_VERSION);
        self.broken = Some(why.to_string());
        self.file = self.fs.open_append(&path).at("open", &path)?;
        self.ino = self.fs.metadata(&path).at("stat", &path)?.ino;
        self.fs.sync_dir(&private).at("fsync", &private)?;
        self.broken = None;
        Ok(())
    }

    /// Give a journal of an older format version the current header before this
    /// writer appends a record of the current format to it: an older build then
    /// refuses the file as written by a newer stack instead of calling a record it
    /// does not know corruption. The frames are copied unchanged (every readable
    /// version decodes with today's decoder, see `frame::FORMAT_VERSION`) into a
    /// temp file, synced, renamed over the journal, folder synced: a crash leaves
    /// the old file or the new one. Once per journal; nothing is done when the
    /// header is current.
    fn upgrade_format(&mut self) -> Result<()> {
        let version = match self.version {
            Some(v) => v,
            None => file_version(self.fs.as_ref(), &self.layout.journal())?,
        };
        self.version = Some(version);
        if version == FORMAT_VERSION {
            return Ok(());
        }
        let path = self.layout.journal();
        let bytes = self.fs.read(&path).at("read", &path)?;
        let frames = usize::try_from(self.len)
            .ok()
            .and_then(|len| bytes.get(frame::HEADER_LEN..len))
            .ok_or_else(|| Error::Io {
                op: "read",
                path: path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the journal is shorter than the {} bytes known", self.len),
                ),
            })?;
        self.replace_file(|w| w.write_all(frames))?;
        self.follow_replaced_file("a format upgrade did not complete")
    }
}

/// The format version the header of the journal at `path` names. A header that is
/// not a valid one is taken as current: nothing is upgraded, and the journal's
/// readers report what is wrong with it.
fn file_version(fs: &dyn Fs, path: &Path) -> Result<u32> {
    use std::io::Read;
    let mut head = Vec::with_capacity(frame::HEADER_LEN);
    fs.open_read(path)
        .and_then(|f| f.take(frame::HEADER_LEN as u64).read_to_end(&mut head))
        .at("read", path)?;
    Ok(frame::header_version(&head)
        .filter(|&v| frame::is_readable_version(v))
        .unwrap_or(FORMAT_VERSION))
}
