//! `stack verify`: check invariants 1–5 of contract §4 against the disk.
//!
//! Owns: [`Violation`] and the audit (it hashes with the multi-buffer `crate::md5x`).
//! Reads only, every access through [`Fs`].
//!
//! The state's table entries are numbered (in [`SyncState::entries`] order) and
//! indexed by their structure, not by path strings: an entry with the engine's own
//! paths names `data/_shared/<id>.parquet` and `data/<slot>/<name>.parquet`, so
//! the shared files are the distinct ids, sorted by file name, and each slot's
//! references are its entries, sorted by file name too. Entries whose paths are
//! not the engine's (`bad_path`) are reported, and are otherwise left out — except
//! that one whose reference path is another entry's reference is checked for
//! content too, probed by itself.
//!
//! Nothing outside the directory is read, whatever the state says. Its slots, ids,
//! names and slugs are `SafeName`s (a state file naming anything else is refused
//! when it is parsed), but a `sync_state.json` edited by hand reaches the audit
//! with its paths unchecked: an entry whose paths (when not the engine's) are
//! absolute or hold `..`, and a memory domain whose path is absolute or holds
//! `..`, are reported (`unsafe_path`, naming the entry and what is wrong, where
//! `bad_path` or `missing_domain` would be) and never probed or hashed.
//!
//! Probes: each shared file once, each reference once, a folder at a time
//! (`Fs::symlink_metadata_in` / `Fs::metadata_in` from one folder descriptor,
//! batches spread over threads): `lstat` and, for a symlink, `stat` when
//! invariant 5 compares stat fingerprints; otherwise `stat`, and (for a reference)
//! `lstat` only when that finds nothing. A probe keeps what the checks read — found
//! or not, the file `stat` found when it is to be hashed, whether the fingerprints
//! changed — and keeps an error only when it is not "not found". Invariant 2 reads
//! the probes; meanwhile one more thread lists the folders for invariants 1, 3 and
//! 4 and walks each (sorted) listing along the sorted names the state expects
//! there. Invariant 5 (content) is checked by stat fingerprint by default (a
//! changed file is re-hashed) and by re-hashing every reference with `--contents`;
//! either way each distinct file (device, inode, size, mtime, from its probe) is
//! hashed once, its references sharing the result, on several threads that take
//! files as they go.
//!
//! Violations and errors are the same, in the same order, as checking entry by
//! entry: invariant 2 in entry order, then 1, 3 and 4 in listing order, then 5 by
//! path. The first error other than "not found" stops the audit (a probe's, in
//! entry order, before a listing's), except that a simulated crash
//! (`error::is_crash_io`) reaches the caller whatever failed before it.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use crate::error::{IoContext, Result};
use crate::fs::{Fs, Kind, Meta, NameBatch, RealFs};
use crate::journal::event::SlotRef;
use crate::layout::{self, Layout};
use crate::replay::state::{DomainEntry, SafeName, StatFp, SyncState, TableEntry};

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub invariant: u8,
    pub kind: &'static str,
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invariant {} ({}): {}: {}",
            self.invariant, self.kind, self.path, self.message
        )
    }
}

/// How invariant 5 is checked.
pub enum Contents<'a> {
    /// Not at all (invariants 1–4 only).
    Skip,
    /// Re-hash only files whose stat fingerprint changed.
    Fingerprint(&'a (dyn Fn(&Path) -> io::Result<String> + Sync)),
    /// Re-hash every reference, with this many threads.
    Rehash(&'a (dyn Fn(&Path) -> io::Result<String> + Sync), usize),
    /// As `Fingerprint`, hashing with the built-in md5 (see `RehashMd5`).
    FingerprintMd5,
    /// As `Rehash`, with the built-in md5: several files at once per thread (one
    /// per vector lane), read through the audit's `Fs`.
    RehashMd5(usize),
}

/// How the audit hashes a file.
#[derive(Clone, Copy)]
enum HashWith<'a> {
    Fn(&'a (dyn Fn(&Path) -> io::Result<String> + Sync)),
    Md5,
}

fn v(invariant: u8, kind: &'static str, path: &str, message: impl Into<String>) -> Violation {
    Violation {
        invariant,
        kind,
        path: path.to_string(),
        message: message.into(),
    }
}

fn list(fs: &dyn Fs, dir: &Path) -> Result<Vec<crate::fs::DirEntry>> {
    match fs.read_dir(dir) {
        Ok(e) => Ok(e),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).at("list", dir),
    }
}

/// Invariants 1–4 (the reference suite's `audit_invariants`): `local_data` is the
/// `data/` folder; the state's paths are relative to its parent.
pub fn audit_invariants(local_data: &Path, state: &SyncState) -> Vec<Violation> {
    let root = local_data.parent().unwrap_or(Path::new("."));
    match audit(&RealFs, &Layout::new(root), state, Contents::Skip) {
        Ok(v) => v,
        Err(e) => vec![v(0, "io", &local_data.display().to_string(), e.to_string())],
    }
}

// ---------------------------------------------------------------------------
// The entries, numbered.
// ---------------------------------------------------------------------------

/// `(stem + ".parquet").cmp(name)`, without building the file name.
fn cmp_stem(stem: &str, name: &str) -> Ordering {
    let (s, n) = (stem.as_bytes(), name.as_bytes());
    let k = s.len().min(n.len());
    match s[..k].cmp(&n[..k]) {
        Ordering::Equal if s.len() > n.len() => Ordering::Greater,
        Ordering::Equal => layout::TABLE_EXT.as_bytes().cmp(&n[k..]),
        other => other,
    }
}

/// `(a + ".parquet").cmp(b + ".parquet")`: the order of the file names, which a
/// folder listing has (not the order of the stems when one is a prefix of the
/// other: `x-y.parquet` < `x.parquet`).
fn cmp_stems(a: &str, b: &str) -> Ordering {
    let (x, y) = (a.as_bytes(), b.as_bytes());
    let k = x.len().min(y.len());
    match x[..k].cmp(&y[..k]) {
        Ordering::Equal => {
            let ext = layout::TABLE_EXT.as_bytes();
            x[k..].iter().chain(ext).cmp(y[k..].iter().chain(ext))
        }
        other => other,
    }
}

/// Is the next of `names` (a sorted list; `at` moves on over it as a sorted
/// listing is walked) the file `name`? `stem`: the stem of a list item.
fn walk_to<'s, T>(names: &[T], at: &mut usize, name: &str, stem: impl Fn(&T) -> &'s str) -> bool {
    let before = |x: &T| cmp_stem(stem(x), name) == Ordering::Less;
    if *at > 0 && !before(&names[*at - 1]) {
        // The listing went back (it should not): search from the start.
        *at = 0;
    }
    let rest = &names[*at..];
    // Usually the very next one; otherwise a binary search of the rest.
    *at += match rest.first() {
        Some(x) if !before(x) => 0,
        _ => rest.partition_point(before),
    };
    names
        .get(*at)
        .is_some_and(|x| cmp_stem(stem(x), name).is_eq())
}

/// Marks an entry whose paths are not the engine's own, or not safe to look at
/// ([`unsafe_entry`]), in `Tables::shared_of`.
const BAD: u32 = u32::MAX;

/// Why the audit must not look at the files of the entry of `id` in `slot`, if it
/// must not: a path of its own (not the engine's, which are built from safe
/// names) that is absolute or holds `..` (`layout::is_engine_path`).
fn unsafe_entry(slot: SlotRef<'_>, id: &str, e: &TableEntry) -> Option<String> {
    if e.has_own_paths() {
        return None;
    }
    let outside = |what: &str, p: &str| {
        (!layout::is_engine_path(p))
            .then(|| format!("{what} {p:?} could lead outside the directory"))
    };
    let problem = outside("ref_path", &e.ref_path(slot))
        .or_else(|| outside("shared_path", &e.shared_path(id)))?;
    let entry = match slot {
        SlotRef::Direct => format!("direct table {id:?}"),
        SlotRef::Package(slug) => format!("table {id:?} of package {slug:?}"),
    };
    Some(format!(
        "state entry of {entry}: {problem}; its files are not checked"
    ))
}

/// Why the audit must not look at the bundle of the memory domain `slug`, if it
/// must not (see [`unsafe_entry`]).
fn unsafe_domain(slug: &str, d: &DomainEntry) -> Option<String> {
    if layout::is_engine_path(&d.path) {
        return None;
    }
    let problem = format!("path {:?} could lead outside the directory", d.path);
    Some(format!(
        "state entry of memory domain {slug:?}: {problem}; its bundle is not checked"
    ))
}

/// One slot (the direct tables, or a package): its entries are numbered
/// `start..start + tables.len()`.
struct SlotView<'a> {
    slot: SlotRef<'a>,
    /// Its folder under `data/`: `_direct` or the slug.
    sub: &'a str,
    tables: &'a BTreeMap<SafeName, TableEntry>,
    start: u32,
    /// Its entries with the engine's own paths, sorted by file name
    /// (`<name>.parquet`): its folder's listing is walked along it.
    by_name: Vec<u32>,
    /// Whether its files are probed by name from its folder (the folder is one
    /// path component; otherwise each file by its whole path).
    batched: bool,
}

/// The state's table entries as the audit indexes them: by number, not by path.
/// "The engine's own paths" below: `data/_shared/<id>.parquet` and
/// `data/<slot>/<name>.parquet` with a safe slot, id and name; every other entry
/// is [`BAD`].
struct Tables<'a> {
    /// The direct tables, then the packages by slug.
    slots: Vec<SlotView<'a>>,
    /// Entry by number.
    ents: Vec<&'a TableEntry>,
    /// Per entry: its shared file (an index into `shared`), or [`BAD`].
    shared_of: Vec<u32>,
    /// The distinct ids of the entries with the engine's own paths, sorted by file
    /// name (`<id>.parquet`).
    shared: Vec<&'a str>,
}

impl<'a> Tables<'a> {
    fn new(state: &'a SyncState) -> Result<Tables<'a>> {
        let n = state.direct_tables.len()
            + state.data_packages.values().map(|p| p.len()).sum::<usize>();
        if u32::try_from(n).map_or(true, |n| n == BAD) {
            return Err(crate::error::Error::Internal(format!(
                "{n} table entries are more than the audit counts"
            )));
        }
        let mut ents: Vec<&TableEntry> = Vec::with_capacity(n);
        let mut shared_of: Vec<u32> = Vec::with_capacity(n);
        // (id, entry) of every entry with the engine's own paths.
        let mut by_id: Vec<(&str, u32)> = Vec::with_capacity(n);
        let mut slots = Vec::with_capacity(1 + state.data_packages.len());
        let direct = std::iter::once((SlotRef::Direct, layout::DIRECT_DIR, &state.direct_tables));
        let packages = state
            .data_packages
            .iter()
            .map(|(slug, t)| (SlotRef::Package(slug), slug.as_str(), t));
        for (slot, sub, tables) in direct.chain(packages) {
            let start = ents.len() as u32;
            let mut by_name = Vec::new();
            for (id, e) in tables {
                let o = ents.len() as u32;
                ents.push(e);
                if e.has_own_paths() {
                    by_id.push((id, o));
                    by_name.push(o);
                    shared_of.push(0);
                } else {
                    shared_of.push(BAD);
                }
            }
            // Usually in order already (names follow ids): a stable sort merges runs.
            by_name.sort_by(|&a, &b| cmp_stems(&ents[a as usize].name, &ents[b as usize].name));
            slots.push(SlotView {
                slot,
                sub,
                tables,
                start,
                by_name,
                batched: !sub.is_empty() && !sub.contains('/'),
            });
        }
        // Each slot's ids are in order: a stable sort merges the runs.
        by_id.sort_by(|a, b| cmp_stems(a.0, b.0));
        let mut shared: Vec<&str> = Vec::new();
        for (id, o) in by_id {
            if shared.last() != Some(&id) {
                shared.push(id);
            }
            shared_of[o as usize] = shared.len() as u32 - 1;
        }
        Ok(Tables {
            slots,
            ents,
            shared_of,
            shared,
        })
    }

    /// The slot of entry `o`.
    fn slot_of(&self, o: u32) -> &SlotView<'a> {
        let i = self.slots.partition_point(|s| s.start <= o);
        &self.slots[i.saturating_sub(1)]
    }

    /// The slots whose folder is `data/<sub>` (the direct tables' and a package's,
    /// if a package is named after their folder).
    fn slots_in(&self, sub: &str) -> impl Iterator<Item = &SlotView<'a>> {
        let direct = self.slots.first().filter(|_| sub == layout::DIRECT_DIR);
        let packages = self.slots.get(1..).unwrap_or_default();
        let k = packages.partition_point(|s| s.sub < sub);
        direct
            .into_iter()
            .chain(packages.get(k).filter(|s| s.sub == sub))
    }

    /// The reference path of entry `o`, as the state names it.
    fn ref_rel(&self, o: u32) -> String {
        self.ents[o as usize]
            .ref_path(self.slot_of(o).slot)
            .into_owned()
    }

    /// Is `rel` the reference path of an entry with the engine's own paths?
    fn is_own_ref(&self, rel: &str) -> bool {
        let Some(rest) = layout::under_data(rel) else {
            return false;
        };
        // `<sub>/<name>.parquet`, where either may hold a `/`: try every split.
        rest.match_indices('/').any(|(k, _)| {
            let (sub, file) = (&rest[..k], &rest[k + 1..]);
            self.slots_in(sub).any(|s| {
                let name = |o: &u32| cmp_stem(&self.ents[*o as usize].name, file);
                s.by_name.binary_search_by(name).is_ok()
            })
        })
    }
}

/// `<stem>.parquet` of each stem: the names of one batch.
fn file_names<'s>(stems: impl Iterator<Item = &'s str>) -> NameBatch {
    let mut names = NameBatch::default();
    for stem in stems {
        names.push(|buf| {
            buf.push_str(stem);
            buf.push_str(layout::TABLE_EXT);
        });
    }
    names
}

// ---------------------------------------------------------------------------
// Probes.
// ---------------------------------------------------------------------------

/// A file as `stat` knows it: device, inode, size, mtime (its high and low
/// halves).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct FileKey {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, u64),
}

impl FileKey {
    fn of(m: &Meta) -> FileKey {
        FileKey {
            dev: m.dev,
            ino: m.ino,
            len: m.len,
            mtime: ((m.mtime_ns >> 64) as i64, m.mtime_ns as u64),
        }
    }
}

/// What a probe says of a path, for one question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    Yes,
    No,
    /// An error other than "not found": the probe kept it.
    Failed,
}

fn found_of<T>(r: &io::Result<T>) -> Found {
    match r {
        Ok(_) => Found::Yes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Found::No,
        Err(_) => Found::Failed,
    }
}

/// The calls made for one path, as few as the checks need; read through [`Mode`]
/// and dropped.
struct Raw {
    /// `stat` (following symlinks); with `lstat_first`, `lstat` — and then `stat`
    /// only said the same thing unless `second` holds it.
    first: io::Result<Meta>,
    /// With `lstat_first`: `stat` of a symlink. Otherwise: `lstat`, made only when
    /// `stat` found nothing and the caller asks whether the path itself exists
    /// (to tell a missing path from a dangling symlink).
    second: Option<io::Result<Meta>>,
}

impl Raw {
    /// What stands for a result a batch did not return (an `Fs` that breaks the
    /// seam's contract): an error.
    fn missing() -> Raw {
        Raw {
            first: Err(crate::fs::no_result()),
            second: None,
        }
    }

    /// The one error of a probe the audit may report: not "not found" (there is at
    /// most one: a second call follows a first that succeeded or found nothing),
    /// or a simulated crash.
    fn into_error(self) -> Option<io::Error> {
        let keep =
            |e: &io::Error| e.kind() != io::ErrorKind::NotFound || crate::error::is_crash_io(e);
        [Some(self.first), self.second]
            .into_iter()
            .flatten()
            .filter_map(|r| r.err())
            .find(keep)
    }
}

/// How the audit probes a path.
#[derive(Clone, Copy)]
struct Mode {
    /// The checks need the path's own fingerprint (`lstat`): `lstat` it and `stat`
    /// only a symlink. Otherwise `stat` it, and `lstat` only when `stat` finds
    /// nothing (if asked). Either way one call for a regular file.
    lstat_first: bool,
}

impl Mode {
    fn wants_second(self, first: &io::Result<Meta>, presence: bool) -> bool {
        match first {
            Ok(m) => self.lstat_first && m.kind == Kind::Symlink,
            Err(e) => !self.lstat_first && presence && e.kind() == io::ErrorKind::NotFound,
        }
    }

    /// Probe one path by itself (`presence`: the path's own existence is asked).
    fn probe(self, fs: &dyn Fs, path: &Path, presence: bool) -> Raw {
        let lstat = || fs.symlink_metadata(path);
        let stat = || fs.metadata(path);
        let first = if self.lstat_first { lstat() } else { stat() };
        let second = self.wants_second(&first, presence).then(|| {
            if self.lstat_first {
                stat()
            } else {
                lstat()
            }
        });
        Raw { first, second }
    }

    /// Probe `names` (single components) of the folder `dir`: one batch, and one
    /// more for the names that need a second call.
    fn probe_in(self, fs: &dyn Fs, dir: &Path, names: &[&str], presence: bool) -> Vec<Raw> {
        let first = if self.lstat_first {
            fs.symlink_metadata_in(dir, names)
        } else {
            fs.metadata_in(dir, names)
        };
        let first = crate::fs::one_per_name(first, names.len());
        let again: Vec<usize> = (0..first.len())
            .filter(|&i| self.wants_second(&first[i], presence))
            .collect();
        let mut raws: Vec<Raw> = first
            .into_iter()
            .map(|first| Raw {
                first,
                second: None,
            })
            .collect();
        if !again.is_empty() {
            let names: Vec<&str> = again.iter().map(|&i| names[i]).collect();
            let second = if self.lstat_first {
                fs.metadata_in(dir, &names)
            } else {
                fs.symlink_metadata_in(dir, &names)
            };
            // A result the batch did not return is an error, as in the first batch.
            let second = crate::fs::one_per_name(second, again.len());
            for (i, r) in again.into_iter().zip(second) {
                raws[i].second = Some(r);
            }
        }
        raws
    }

    /// What `stat` (following symlinks) says. (A path whose `lstat` fails fails
    /// `stat` the same way: both resolve the same folders first.)
    fn followed(self, raw: &Raw) -> &io::Result<Meta> {
        match (&raw.second, self.lstat_first) {
            (Some(stat), true) => stat,
            _ => &raw.first,
        }
    }

    /// Whether the path itself exists (a dangling symlink does), if asked.
    fn presence(self, raw: &Raw) -> Found {
        match (&raw.second, self.lstat_first) {
            (_, true) => found_of(&raw.first),
            (Some(lstat), false) => found_of(lstat),
            // `stat` found something (so the path exists), or failed otherwise
            // than "not found", which the path itself fails too or passes on to
            // its target: either way the check stops at this error.
            (None, false) => match &raw.first {
                Ok(_) => Found::Yes,
                Err(_) => Found::Failed,
            },
        }
    }

    /// The fingerprint the engine records (`lstat` of the path), if asked for.
    fn fp(self, raw: &Raw) -> Option<StatFp> {
        if self.lstat_first {
            raw.first.as_ref().ok().map(StatFp::of)
        } else {
            None
        }
    }

    fn key(self, raw: &Raw) -> Option<FileKey> {
        self.followed(raw).as_ref().ok().map(FileKey::of)
    }
}

/// An I/O error as the audit reports it. `io::Error` cannot be cloned; the audit
/// stops at the first one, so it rebuilds it once, keeping its kind, OS code and
/// message, and a simulated crash's payload (known by its type).
fn stat_error(e: &io::Error, path: &Path) -> crate::error::Error {
    let e = match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None if crate::error::is_crash_io(e) => crate::error::SimulatedCrash::io_error(),
        None => io::Error::new(e.kind(), e.to_string()),
    };
    crate::error::Error::Io {
        op: "stat",
        path: path.to_path_buf(),
        source: e,
    }
}

/// How many files of one folder go to the filesystem as one batch.
const UNIT: usize = 512;

/// The shared files' probes, by index into `Tables::shared`.
struct SharedProbes {
    /// What `stat` says.
    found: Vec<Found>,
    /// The fingerprint (`lstat`), when invariant 5 compares fingerprints.
    fp: Vec<Option<StatFp>>,
    /// The errors kept, by shared file, in order.
    errors: Vec<(u32, io::Error)>,
}

fn probe_shared(fs: &dyn Fs, layout: &Layout, t: &Tables<'_>, mode: Mode) -> Result<SharedProbes> {
    let units: Vec<usize> = (0..t.shared.len()).step_by(UNIT).collect();
    let dir = layout.shared_dir();
    let parts = crate::par::map_balanced(&units, crate::par::threads(), |&a| {
        let ids = &t.shared[a..(a + UNIT).min(t.shared.len())];
        // An id holding a `/` is probed by its whole path.
        let batched = |id: &str| !id.contains('/');
        let files = file_names(ids.iter().copied().filter(|id| batched(id)));
        let names = files.names();
        let mut batch = if names.is_empty() {
            Vec::new()
        } else {
            mode.probe_in(fs, &dir, &names, false)
        }
        .into_iter();
        let mut found = Vec::with_capacity(ids.len());
        let mut fps = Vec::new();
        let mut errors = Vec::new();
        for (i, id) in (a as u32..).zip(ids) {
            let raw = if batched(id) {
                batch.next().unwrap_or_else(Raw::missing)
            } else {
                mode.probe(fs, &layout.join(&layout::shared_rel(id)), false)
            };
            found.push(found_of(mode.followed(&raw)));
            if mode.lstat_first {
                fps.push(mode.fp(&raw));
            }
            errors.extend(raw.into_error().map(|e| (i, e)));
        }
        Ok((found, fps, errors))
    })?;
    let mut p = SharedProbes {
        found: Vec::with_capacity(t.shared.len()),
        fp: Vec::new(),
        errors: Vec::new(),
    };
    for (found, fp, errors) in parts {
        p.found.extend(found);
        p.fp.extend(fp);
        p.errors.extend(errors);
    }
    Ok(p)
}

/// Which references invariant 5 hashes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hashes {
    None,
    /// Those whose fingerprints (of the reference and its shared file) changed.
    Changed,
    All,
}

/// The references' probes, by entry.
struct RefProbes {
    /// (whether the path itself exists, what `stat` says); for an entry whose paths
    /// are not the engine's, nothing.
    found: Vec<(Found, Found)>,
    /// The errors kept, by entry, in order.
    errors: Vec<(u32, io::Error)>,
    /// The references invariant 5 hashes, with the file `stat` found, unsorted.
    keyed: Vec<(FileKey, u32)>,
    /// The references invariant 5 hashes whose `stat` failed.
    solo: Vec<u32>,
}

fn probe_refs(
    fs: &dyn Fs,
    layout: &Layout,
    t: &Tables<'_>,
    shared: &SharedProbes,
    mode: Mode,
    hashes: Hashes,
) -> Result<RefProbes> {
    // (slot, first entry, end): at most UNIT entries with the engine's paths each.
    let mut units: Vec<(usize, u32, u32)> = Vec::new();
    let mut own_total = 0;
    for (k, s) in t.slots.iter().enumerate() {
        let end = s.start + s.tables.len() as u32;
        let (mut a, mut own) = (s.start, 0);
        for o in s.start..end {
            if t.shared_of[o as usize] != BAD {
                if own == UNIT {
                    units.push((k, a, o));
                    (a, own) = (o, 0);
                }
                own += 1;
                own_total += 1;
            }
        }
        if own > 0 {
            units.push((k, a, end));
        }
    }
    let keyed = Mutex::new(Vec::with_capacity(if hashes == Hashes::All {
        own_total
    } else {
        0
    }));
    let parts = crate::par::map_balanced(&units, crate::par::threads(), |&(k, a, b)| {
        let s = &t.slots[k];
        let own: Vec<u32> = (a..b).filter(|&o| t.shared_of[o as usize] != BAD).collect();
        let name = |o: u32| t.ents[o as usize].name.as_str();
        // A name holding a `/` (or any name of an odd slot) is probed by its whole path.
        let batched = |o: u32| s.batched && !name(o).contains('/');
        let files = file_names(own.iter().filter(|&&o| batched(o)).map(|&o| name(o)));
        let names = files.names();
        let mut batch = if names.is_empty() {
            Vec::new()
        } else {
            mode.probe_in(fs, &layout.data().join(s.sub), &names, true)
        }
        .into_iter();
        let mut found = Vec::with_capacity(own.len());
        let mut errors = Vec::new();
        let mut mine = Vec::new();
        let mut solo = Vec::new();
        for &o in &own {
            let e = t.ents[o as usize];
            let raw = if batched(o) {
                batch.next().unwrap_or_else(Raw::missing)
            } else {
                mode.probe(fs, &layout.join(&e.ref_path(s.slot)), true)
            };
            found.push((o, mode.presence(&raw), found_of(mode.followed(&raw))));
            let hash = match hashes {
                Hashes::None => false,
                Hashes::All => true,
                Hashes::Changed => {
                    let sh = t.shared_of[o as usize] as usize;
                    !(e.ref_fp.is_some()
                        && e.ref_fp == mode.fp(&raw)
                        && e.shared_fp.is_some()
                        && e.shared_fp == shared.fp.get(sh).copied().flatten())
                }
            };
            if hash {
                match mode.key(&raw) {
                    Some(key) => mine.push((key, o)),
                    None => solo.push(o),
                }
            }
            errors.extend(raw.into_error().map(|e| (o, e)));
        }
        if !mine.is_empty() {
            keyed.lock().unwrap_or_else(|p| p.into_inner()).extend(mine);
        }
        Ok((found, errors, solo))
    })?;
    let mut p = RefProbes {
        found: vec![(Found::Yes, Found::Yes); t.ents.len()],
        errors: Vec::new(),
        keyed: keyed.into_inner().unwrap_or_else(|p| p.into_inner()),
        solo: Vec::new(),
    };
    for (found, errors, solo) in parts {
        for (o, presence, followed) in found {
            p.found[o as usize] = (presence, followed);
        }
        p.errors.extend(errors);
        p.solo.extend(solo);
    }
    Ok(p)
}

// ---------------------------------------------------------------------------
// Listings.
// ---------------------------------------------------------------------------

/// Invariants 1, 3 and 4 (everything read from folder listings), in the order
/// `stack verify` reports them. Each listing (sorted) is walked along the sorted
/// names the state expects there.
fn audit_listings(
    fs: &dyn Fs,
    layout: &Layout,
    state: &SyncState,
    t: &Tables<'_>,
) -> Result<Vec<Violation>> {
    let mut out = Vec::new();
    // Invariant 1: no orphan in data/_shared.
    let mut at = 0;
    for entry in list(fs, &layout.shared_dir())? {
        if !walk_to(&t.shared, &mut at, &entry.name, |id: &&str| *id) {
            let rel = format!("{}/{}", layout::SHARED_DIR, entry.name);
            out.push(v(
                1,
                "orphan",
                &rel,
                "no state entry references this shared file",
            ));
        }
    }
    // Invariant 3: every file in data/<sub>/ has an entry (the reverse is 2).
    let name_of = |o: &u32| t.ents[*o as usize].name.as_str();
    for sub in list(fs, &layout.data())? {
        if sub.name == layout::SHARED_FOLDER {
            continue;
        }
        if sub.kind != Kind::Dir {
            let rel = layout::data_rel(&sub.name);
            out.push(v(
                3,
                "untracked",
                &rel,
                "file directly under data/ is not the engine's",
            ));
            continue;
        }
        // (sorted names, position) of each slot whose folder this is.
        let mut mine: Vec<(&[u32], usize)> =
            t.slots_in(&sub.name).map(|s| (&s.by_name[..], 0)).collect();
        for f in list(fs, &layout.data().join(&sub.name))? {
            // (Every walk moves on, whether or not an earlier one knew the file.)
            let mut known = false;
            for (names, at) in &mut mine {
                known |= walk_to(names, at, &f.name, name_of);
            }
            if !known {
                let rel = layout::data_rel(&format!("{}/{}", sub.name, f.name));
                out.push(v(3, "untracked", &rel, "no state entry holds this file"));
            }
        }
    }
    // Invariant 4: memory/<slug>/ exists iff the domain is in the stack, and
    // holds its bundle alone (stack creates nothing else under memory/).
    for e in list(fs, &layout.memory())? {
        let rel = layout::domain_dir_rel(&e.name);
        if e.kind != Kind::Dir {
            let why = "file directly under memory/ is not the engine's";
            out.push(v(4, "untracked", &rel, why));
            continue;
        }
        match state.memory_domains.get(e.name.as_str()) {
            None => out.push(v(
                4,
                "unexpected_domain",
                &rel,
                "memory domain is not in the stack",
            )),
            // (An unsafe entry's bundle is reported below, its folder not listed.)
            Some(d) if unsafe_domain(&e.name, d).is_none() => {
                for f in list(fs, &layout.join(&rel))? {
                    let file = format!("{rel}/{}", f.name);
                    if file != d.path {
                        out.push(v(4, "untracked", &file, "no state entry holds this file"));
                    }
                }
            }
            Some(_) => {}
        }
    }
    for (slug, d) in &state.memory_domains {
        if let Some(why) = unsafe_domain(slug, d) {
            out.push(v(4, "unsafe_path", &d.path, why));
            continue;
        }
        if !fs
            .exists(&layout.join(&d.path))
            .at("stat", &layout.join(&d.path))?
        {
            out.push(v(
                4,
                "missing_domain",
                &d.path,
                format!("bundle of domain {slug} is missing"),
            ));
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// The audit.
// ---------------------------------------------------------------------------

/// How many files invariant 5 hashes per round (the paths and digests of one
/// round are held at once).
const HASH_ROUND: usize = 8192;

/// Check invariants 1–5 of `state` against the directory of `layout`.
pub fn audit(
    fs: &dyn Fs,
    layout: &Layout,
    state: &SyncState,
    contents: Contents<'_>,
) -> Result<Vec<Violation>> {
    let (hash, threads, always) = match contents {
        Contents::Skip => (None, 1, false),
        Contents::Fingerprint(h) => (Some(HashWith::Fn(h)), crate::par::threads(), false),
        Contents::Rehash(h, n) => (Some(HashWith::Fn(h)), n.max(1), true),
        Contents::FingerprintMd5 => (Some(HashWith::Md5), crate::par::threads(), false),
        Contents::RehashMd5(n) => (Some(HashWith::Md5), n.max(1), true),
    };
    // Only the fingerprint check reads `lstat` results of the paths themselves.
    let mode = Mode {
        lstat_first: hash.is_some() && !always,
    };
    let hashes = match (&hash, always) {
        (None, _) => Hashes::None,
        (Some(_), false) => Hashes::Changed,
        (Some(_), true) => Hashes::All,
    };
    let t = Tables::new(state)?;

    // The folder listings (invariants 1, 3, 4) on one thread, the probes (the
    // shared files', then the references') on the others, at the same time.
    let (listed, probes) = std::thread::scope(|s| {
        let listing = s.spawn(|| audit_listings(fs, layout, state, &t));
        let probes = probe_shared(fs, layout, &t, mode).and_then(|shared| {
            let refs = probe_refs(fs, layout, &t, &shared, mode, hashes)?;
            Ok((shared, refs))
        });
        let listed = listing
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (listed, probes)
    });
    let (shared, mut refs) = probes?;
    let shared_path = |s: u32| layout.join(&layout::shared_rel(t.shared[s as usize]));
    // A simulated crash must reach the caller whatever failed before it: the first
    // in entry order (an entry's shared file before its reference).
    let first_entry_of = |s: u32| {
        t.shared_of
            .iter()
            .position(|&x| x == s)
            .expect("a shared file is probed because an entry names it")
    };
    fn crashes(errors: &[(u32, io::Error)]) -> impl Iterator<Item = (u32, &io::Error)> {
        errors
            .iter()
            .filter(|(_, e)| crate::error::is_crash_io(e))
            .map(|(i, e)| (*i, e))
    }
    let crash = crashes(&shared.errors)
        .map(|(s, e)| ((first_entry_of(s), 0), shared_path(s), e))
        .chain(crashes(&refs.errors).map(|(o, e)| ((o as usize, 1), layout.join(&t.ref_rel(o)), e)))
        .min_by_key(|(at, _, _)| *at);
    if let Some((_, path, e)) = crash {
        return Err(stat_error(e, &path));
    }
    if let Err(e) = &listed {
        if e.is_crash() {
            return listed;
        }
    }
    // The error a failed probe kept.
    let error = |errors: &[(u32, io::Error)], i: u32, path: PathBuf| {
        let k = errors
            .binary_search_by_key(&i, |(x, _)| *x)
            .expect("a failed probe keeps its error");
        stat_error(&errors[k].1, &path)
    };

    let mut out = Vec::new();
    // Invariant 2: every entry's paths exist (and are the engine's own paths).
    for s in &t.slots {
        for (o, (id, e)) in (s.start..).zip(s.tables) {
            let sh = t.shared_of[o as usize];
            if sh == BAD {
                if let Some(why) = unsafe_entry(s.slot, id, e) {
                    out.push(v(2, "unsafe_path", &e.ref_path(s.slot), why));
                    continue;
                }
                let mut want_ref = String::new();
                layout::push_ref_rel(&mut want_ref, s.slot, &e.name);
                let want_shared = layout::shared_rel(id);
                out.push(v(
                    2,
                    "bad_path",
                    &e.ref_path(s.slot),
                    format!("state entry of {id} does not name {want_ref} / {want_shared}"),
                ));
                continue;
            }
            match shared.found[sh as usize] {
                Found::Yes => {}
                Found::No => out.push(v(
                    2,
                    "missing_shared",
                    &e.shared_path(id),
                    format!("shared file of {id} is missing"),
                )),
                Found::Failed => return Err(error(&shared.errors, sh, shared_path(sh))),
            }
            let (presence, followed) = refs.found[o as usize];
            match presence {
                Found::Yes => {}
                Found::No => {
                    out.push(v(
                        2,
                        "missing_ref",
                        &e.ref_path(s.slot),
                        format!("reference to {id} is missing"),
                    ));
                    continue;
                }
                Found::Failed => {
                    return Err(error(&refs.errors, o, layout.join(&e.ref_path(s.slot))))
                }
            }
            match followed {
                Found::Yes => {}
                Found::No => out.push(v(
                    2,
                    "broken_ref",
                    &e.ref_path(s.slot),
                    format!("reference to {id} does not resolve"),
                )),
                Found::Failed => {
                    return Err(error(&refs.errors, o, layout.join(&e.ref_path(s.slot))))
                }
            }
        }
    }
    out.extend(listed?);

    // Invariant 5: content.
    let Some(hash) = hash else {
        return Ok(out);
    };
    // An entry whose paths are not the engine's is checked too when its reference
    // path is another entry's (probed by itself: rare).
    for s in &t.slots {
        for (o, (id, e)) in (s.start..).zip(s.tables) {
            if t.shared_of[o as usize] != BAD || unsafe_entry(s.slot, id, e).is_some() {
                continue;
            }
            let rel = e.ref_path(s.slot);
            if !t.is_own_ref(&rel) {
                continue;
            }
            let raw = mode.probe(fs, &layout.join(&rel), false);
            // With `always`, the fingerprints are not needed.
            let unchanged = || {
                e.ref_fp.is_some()
                    && e.ref_fp == mode.fp(&raw)
                    && e.shared_fp.is_some()
                    && e.shared_fp
                        == fs
                            .symlink_metadata(&layout.join(&e.shared_path(id)))
                            .ok()
                            .map(|m| StatFp::of(&m))
            };
            if !always && unchanged() {
                continue;
            }
            match mode.key(&raw) {
                Some(key) => refs.keyed.push((key, o)),
                None => refs.solo.push(o),
            }
        }
    }
    // References are often one file (symlinks and hard links to the shared copy):
    // hash each file once, then check every reference that resolves to it, the file
    // known by its probe's `stat`. A group: the references of one file, the first
    // in entry order hashed for all; a reference whose `stat` failed is a group
    // alone.
    refs.keyed.sort_unstable();
    let mut members: Vec<u32> = Vec::with_capacity(refs.keyed.len() + refs.solo.len());
    let mut starts: Vec<u32> = Vec::new();
    for (i, &(key, o)) in refs.keyed.iter().enumerate() {
        if i == 0 || refs.keyed[i - 1].0 != key {
            starts.push(members.len() as u32);
        }
        members.push(o);
    }
    drop(std::mem::take(&mut refs.keyed));
    for o in std::mem::take(&mut refs.solo) {
        starts.push(members.len() as u32);
        members.push(o);
    }
    let group = |g: usize| {
        let a = starts[g] as usize;
        let b = starts.get(g + 1).map_or(members.len(), |&x| x as usize);
        &members[a..b]
    };
    let mut found: Vec<(u32, Violation)> = Vec::new();
    for round in (0..starts.len()).step_by(HASH_ROUND) {
        let groups = round..(round + HASH_ROUND).min(starts.len());
        let files: Vec<PathBuf> = groups
            .clone()
            .map(|g| layout.join(&t.ref_rel(group(g)[0])))
            .collect();
        let hashed: Vec<io::Result<String>> = match hash {
            HashWith::Fn(hash) => crate::par::map_balanced(&files, threads, |f| Ok(hash(f)))?,
            HashWith::Md5 => crate::md5x::md5_files(fs, &files, threads),
        };
        for (g, got) in groups.zip(&hashed) {
            for &o in group(g) {
                let md5 = &t.ents[o as usize].md5;
                let bad = match got {
                    Ok(h) if md5.is(h) => None,
                    Ok(h) => Some(("content", format!("md5 is {h}, state says {md5}"))),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => None, // reported as invariant 2
                    Err(e) => Some(("unreadable", e.to_string())),
                };
                if let Some((kind, message)) = bad {
                    found.push((o, v(5, kind, &t.ref_rel(o), message)));
                }
            }
        }
    }
    // By path, and in entry order for one path.
    found.sort_by(|a, b| a.1.path.cmp(&b.1.path).then(a.0.cmp(&b.0)));
    out.extend(found.into_iter().map(|(_, v)| v));
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests;
