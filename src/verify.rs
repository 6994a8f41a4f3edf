//! `stack verify`: check invariants 1–5 of contract §4 against the disk.
//!
//! Owns: [`Violation`] and the audit (it hashes with the multi-buffer `crate::md5x`).
//! Reads only, every access through [`Fs`]. Every distinct path the state's
//! well-formed entries name is probed once, in parallel: `lstat` and, for a
//! symlink, `stat` when invariant 5 compares stat fingerprints; otherwise `stat`,
//! and `lstat` only when that finds nothing. Invariant 2 and the fingerprints of
//! invariant 5 are read from those probes, while one more thread lists the folders
//! for invariants 1, 3 and 4. Invariant 5 (content) is checked by stat fingerprint
//! by default (a changed file is re-hashed) and by re-hashing every reference with
//! `--contents`; either way each distinct file (device, inode, size, mtime, from
//! its probe) is hashed once, its references sharing the result, on several
//! threads that take files as they go. Violations and errors are the same, in the
//! same order, as checking entry by entry.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{IoContext, Result};
use crate::fs::{Fs, Kind, Meta, RealFs};
use crate::layout::{self, Layout};
use crate::replay::state::{Md5Sum, StatFp, SyncState};

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

/// A fast hasher for the audit's own maps (paths and file keys; no untrusted
/// adversary chooses them): a multiply-rotate over 8-byte words and a final mix.
#[derive(Default, Clone, Copy)]
struct QuickHasher(u64);

impl Hasher for QuickHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(w));
        }
        let mut w = [0u8; 8];
        w[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.write_u64(u64::from_le_bytes(w) ^ bytes.len() as u64);
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn finish(&self) -> u64 {
        // murmur3's fmix64: every output bit depends on every input bit.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

type Quick = BuildHasherDefault<QuickHasher>;

/// A file as `stat` knows it: device, inode, size, mtime.
type FileKey = (u64, u64, u64, i128);

/// What the audit learnt of one path, from as few calls as its checks need.
struct Probe {
    /// `stat` (following symlinks); with `lstat_first`, `lstat` — and then `stat`
    /// only said the same thing unless `second` holds it.
    first: io::Result<Meta>,
    /// With `lstat_first`: `stat` of a symlink. Otherwise: `lstat`, made only when
    /// `stat` found nothing (to tell a missing path from a dangling symlink).
    second: Option<io::Result<Meta>>,
    lstat_first: bool,
}

/// How the path itself (not followed) is: `Ok(true)` exists, `Ok(false)` missing.
type Presence<'a> = std::result::Result<bool, &'a io::Error>;

impl Probe {
    /// `lstat_first`: the caller needs the path's own fingerprint (`lstat`), so
    /// `lstat` it and `stat` only a symlink; otherwise `stat` it and `lstat` only
    /// when `stat` finds nothing. Either way one call for a regular file.
    fn run(fs: &dyn Fs, path: &Path, lstat_first: bool) -> Probe {
        if lstat_first {
            let first = fs.symlink_metadata(path);
            let second = match &first {
                Ok(m) if m.kind == Kind::Symlink => Some(fs.metadata(path)),
                _ => None,
            };
            Probe {
                first,
                second,
                lstat_first,
            }
        } else {
            let first = fs.metadata(path);
            let second = match &first {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Some(fs.symlink_metadata(path)),
                _ => None,
            };
            Probe {
                first,
                second,
                lstat_first,
            }
        }
    }

    /// What `stat` (following symlinks) says. (A path whose `lstat` fails fails
    /// `stat` the same way: both resolve the same folders first.)
    fn followed(&self) -> &io::Result<Meta> {
        match (&self.second, self.lstat_first) {
            (Some(stat), true) => stat,
            _ => &self.first,
        }
    }

    /// Whether the path itself exists (a dangling symlink does).
    fn presence(&self) -> Presence<'_> {
        let own = match (&self.second, self.lstat_first) {
            (_, true) => &self.first,
            (Some(lstat), false) => lstat,
            // `stat` found something (so the path exists), or failed otherwise
            // than "not found", which the path itself fails too or passes on to
            // its target: either way the check stops at this error.
            (None, false) => return self.first.as_ref().map(|_| true),
        };
        match own {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The fingerprint the engine records (`lstat` of the path), if asked for.
    fn fp(&self) -> Option<StatFp> {
        let own = if self.lstat_first {
            self.first.as_ref().ok()
        } else {
            None
        };
        own.map(StatFp::of)
    }

    fn file_key(&self) -> Option<FileKey> {
        self.followed()
            .as_ref()
            .ok()
            .map(|m| (m.dev, m.ino, m.len, m.mtime_ns))
    }

    fn errors(&self) -> impl Iterator<Item = &io::Error> {
        [&self.first]
            .into_iter()
            .chain(self.second.as_ref())
            .filter_map(|r| r.as_ref().err())
    }
}

/// An I/O error as the audit reports it. `io::Error` cannot be cloned; the audit
/// stops at the first one, so it rebuilds it once, keeping its kind, OS code and
/// message.
fn stat_error(e: &io::Error, path: &Path) -> crate::error::Error {
    let e = match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    };
    crate::error::Error::Io {
        op: "stat",
        path: path.to_path_buf(),
        source: e,
    }
}

/// Invariants 1, 3 and 4 (everything read from folder listings), in the order
/// `stack verify` reports them.
fn audit_listings(
    fs: &dyn Fs,
    layout: &Layout,
    state: &SyncState,
    shared_paths: &HashSet<&str, Quick>,
    ref_paths: &HashSet<&str, Quick>,
) -> Result<Vec<Violation>> {
    let mut out = Vec::new();
    let mut rel = String::new();
    // Invariant 1: no orphan in data/_shared.
    for entry in list(fs, &layout.shared_dir())? {
        rel.clear();
        let _ = write!(rel, "{}/{}", layout::SHARED_DIR, entry.name);
        if !shared_paths.contains(rel.as_str()) {
            out.push(v(
                1,
                "orphan",
                &rel,
                "no state entry references this shared file",
            ));
        }
    }
    // Invariant 3: every file in data/<sub>/ has an entry (the reverse is 2).
    for sub in list(fs, &layout.data())? {
        if sub.name == "_shared" {
            continue;
        }
        if sub.kind != Kind::Dir {
            let rel = format!("data/{}", sub.name);
            out.push(v(
                3,
                "untracked",
                &rel,
                "file directly under data/ is not the engine's",
            ));
            continue;
        }
        for f in list(fs, &layout.data().join(&sub.name))? {
            rel.clear();
            let _ = write!(rel, "data/{}/{}", sub.name, f.name);
            if !ref_paths.contains(rel.as_str()) {
                out.push(v(3, "untracked", &rel, "no state entry holds this file"));
            }
        }
    }
    // Invariant 4: memory/<slug>/ exists iff the domain is in the stack.
    let on_disk: BTreeSet<String> = list(fs, &layout.memory())?
        .into_iter()
        .filter(|e| e.kind == Kind::Dir)
        .map(|e| e.name)
        .collect();
    for slug in &on_disk {
        if !state.memory_domains.contains_key(slug) {
            out.push(v(
                4,
                "unexpected_domain",
                &layout::domain_dir_rel(slug),
                "memory domain is not in the stack",
            ));
        }
    }
    for (slug, d) in &state.memory_domains {
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
    let lstat_first = hash.is_some() && !always;

    // Every distinct path a well-formed entry names (shared file or reference) is
    // probed once; the checks below only read the probes.
    let n_entries =
        state.direct_tables.len() + state.data_packages.values().map(|p| p.len()).sum::<usize>();
    let mut index: HashMap<&str, usize, Quick> =
        HashMap::with_capacity_and_hasher(2 * n_entries, Quick::default());
    let mut paths: Vec<&str> = Vec::with_capacity(2 * n_entries);
    fn slot_of<'a>(
        index: &mut HashMap<&'a str, usize, Quick>,
        paths: &mut Vec<&'a str>,
        rel: &'a str,
    ) -> usize {
        *index.entry(rel).or_insert_with(|| {
            paths.push(rel);
            paths.len() - 1
        })
    }
    // Per entry: (shared probe, reference probe), or None for an entry that does not
    // name the engine's own paths.
    let mut own: Vec<Option<(usize, usize)>> = Vec::with_capacity(n_entries);
    // Each entry's (reference, shared) paths, as the state file names them.
    let named: Vec<(Cow<'_, str>, Cow<'_, str>)> = state
        .entries()
        .map(|(slot, id, e)| (e.ref_path(slot), e.shared_path(id)))
        .collect();
    for ((_, _, e), (ref_path, shared_path)) in state.entries().zip(&named) {
        if e.has_own_paths() {
            let s = slot_of(&mut index, &mut paths, shared_path);
            let r = slot_of(&mut index, &mut paths, ref_path);
            own.push(Some((s, r)));
        } else {
            own.push(None);
        }
    }
    let shared_paths: HashSet<&str, Quick> = own.iter().flatten().map(|&(s, _)| paths[s]).collect();
    let ref_paths: HashSet<&str, Quick> = own.iter().flatten().map(|&(_, r)| paths[r]).collect();

    // The folder listings (invariants 1, 3, 4) on one thread, the probes on the
    // others, at the same time.
    let (listed, probes) = std::thread::scope(|s| {
        let listing = s.spawn(|| audit_listings(fs, layout, state, &shared_paths, &ref_paths));
        let probes = crate::par::map_balanced(&paths, crate::par::threads(), |rel| {
            Ok(Probe::run(fs, &layout.join(rel), lstat_first))
        });
        let listed = listing
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (listed, probes)
    });
    let probes = probes?;
    // A simulated crash must reach the caller whatever failed before it.
    for (p, rel) in probes.iter().zip(&paths) {
        if let Some(e) = p.errors().find(|e| crate::error::is_crash_io(e)) {
            return Err(stat_error(e, &layout.join(rel)));
        }
    }
    if let Err(e) = &listed {
        if e.is_crash() {
            return listed;
        }
    }

    let mut out = Vec::new();
    // Invariant 2: every entry's paths exist (and are the engine's own paths).
    for (((slot, id, e), own), (ref_path, shared_path)) in state.entries().zip(&own).zip(&named) {
        let Some((s, r)) = *own else {
            let mut want_ref = String::new();
            crate::replay::state::push_ref_path(&mut want_ref, slot, &e.name);
            let want_shared = layout::shared_rel(id);
            out.push(v(
                2,
                "bad_path",
                ref_path,
                format!("state entry of {id} does not name {want_ref} / {want_shared}"),
            ));
            continue;
        };
        match probes[s].followed() {
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => out.push(v(
                2,
                "missing_shared",
                shared_path,
                format!("shared file of {id} is missing"),
            )),
            Err(err) => return Err(stat_error(err, &layout.join(paths[s]))),
        }
        match probes[r].presence() {
            Ok(true) => {}
            Ok(false) => {
                out.push(v(
                    2,
                    "missing_ref",
                    ref_path,
                    format!("reference to {id} is missing"),
                ));
                continue;
            }
            Err(err) => return Err(stat_error(err, &layout.join(paths[r]))),
        }
        match probes[r].followed() {
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => out.push(v(
                2,
                "broken_ref",
                ref_path,
                format!("reference to {id} does not resolve"),
            )),
            Err(err) => return Err(stat_error(err, &layout.join(paths[r]))),
        }
    }
    out.extend(listed?);

    // Invariant 5: content.
    let Some(hash) = hash else {
        return Ok(out);
    };
    // References are often one file (symlinks and hard links to the shared copy):
    // hash each file once, then check every reference that resolves to it, the file
    // known by its probe's `stat`.
    let mut groups: Vec<(&str, Vec<(&str, &Md5Sum)>)> = Vec::new(); // (rel to hash, [(rel, md5)])
    let mut by_file: HashMap<FileKey, usize, Quick> = HashMap::default();
    for ((_, _, e), (ref_path, shared_path)) in state.entries().zip(&named) {
        let ref_path: &str = ref_path;
        if !ref_paths.contains(ref_path) {
            continue;
        }
        let r = index[ref_path];
        // With `always`, the fingerprints are not needed.
        let unchanged = || {
            e.ref_fp.is_some()
                && e.ref_fp == probes[r].fp()
                && e.shared_fp.is_some()
                && e.shared_fp
                    == match index.get(&**shared_path) {
                        Some(&s) => probes[s].fp(),
                        // Only an entry with a bad path that shares a good one's
                        // reference path has a shared path nobody probed.
                        None => Probe::run(fs, &layout.join(shared_path), true).fp(),
                    }
        };
        if !always && unchanged() {
            continue;
        }
        let key = probes[r].file_key();
        match key.and_then(|k| by_file.get(&k).copied()) {
            Some(i) => groups[i].1.push((ref_path, &e.md5)),
            None => {
                if let Some(k) = key {
                    by_file.insert(k, groups.len());
                }
                groups.push((ref_path, vec![(ref_path, &e.md5)]));
            }
        }
    }
    let hashed: Vec<io::Result<String>> = match hash {
        HashWith::Fn(hash) => {
            crate::par::map_balanced(&groups, threads, |(first, _)| Ok(hash(&layout.join(first))))?
        }
        HashWith::Md5 => {
            let files: Vec<PathBuf> = groups.iter().map(|(first, _)| layout.join(first)).collect();
            crate::md5x::md5_files(fs, &files, threads)
        }
    };
    let mut found = Vec::new();
    for ((_, refs), got) in groups.iter().zip(&hashed) {
        for &(rel, md5) in refs {
            match got {
                Ok(h) if md5.is(h) => {}
                Ok(h) => found.push(v(
                    5,
                    "content",
                    rel,
                    format!("md5 is {h}, state says {md5}"),
                )),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {} // reported as invariant 2
                Err(e) => found.push(v(5, "unreadable", rel, e.to_string())),
            }
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    out.extend(found);
    Ok(out)
}

#[cfg(test)]
mod tests;
