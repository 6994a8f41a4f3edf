//! `stack verify`: check invariants 1–5 of contract §4 against the disk.
//!
//! Owns: [`Violation`] and the audit. Reads only. Invariant 5 (content) is checked
//! by stat fingerprint by default (a changed file is re-hashed) and by re-hashing
//! every reference with `--contents`, in parallel.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::Path;

use serde::Serialize;

use crate::error::{IoContext, Result};
use crate::fs::{Fs, Kind, RealFs};
use crate::layout::{self, Layout};
use crate::replay::state::{StatFp, SyncState};

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

fn exists_following(fs: &dyn Fs, path: &Path) -> Result<bool> {
    match fs.metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).at("stat", path),
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

/// Check invariants 1–5 of `state` against the directory of `layout`.
pub fn audit(
    fs: &dyn Fs,
    layout: &Layout,
    state: &SyncState,
    contents: Contents<'_>,
) -> Result<Vec<Violation>> {
    let mut out = Vec::new();
    let mut shared_paths = BTreeSet::new();
    let mut ref_paths = BTreeSet::new();
    // Invariant 2: every entry's paths exist (and are the engine's own paths).
    for (slot, id, e) in state.entries() {
        let want_ref = layout::ref_rel(&slot, &e.name);
        let want_shared = layout::shared_rel(id);
        if e.ref_path != want_ref || e.shared_path != want_shared {
            out.push(v(
                2,
                "bad_path",
                &e.ref_path,
                format!("state entry of {id} does not name {want_ref} / {want_shared}"),
            ));
            continue;
        }
        shared_paths.insert(e.shared_path.clone());
        ref_paths.insert(e.ref_path.clone());
        if !exists_following(fs, &layout.join(&e.shared_path))? {
            out.push(v(
                2,
                "missing_shared",
                &e.shared_path,
                format!("shared file of {id} is missing"),
            ));
        }
        if !fs
            .exists(&layout.join(&e.ref_path))
            .at("stat", &layout.join(&e.ref_path))?
        {
            out.push(v(
                2,
                "missing_ref",
                &e.ref_path,
                format!("reference to {id} is missing"),
            ));
        } else if !exists_following(fs, &layout.join(&e.ref_path))? {
            out.push(v(
                2,
                "broken_ref",
                &e.ref_path,
                format!("reference to {id} does not resolve"),
            ));
        }
    }
    // Invariant 1: no orphan in data/_shared.
    for entry in list(fs, &layout.shared_dir())? {
        let rel = format!("{}/{}", layout::SHARED_DIR, entry.name);
        if !shared_paths.contains(&rel) {
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
            let rel = format!("data/{}/{}", sub.name, f.name);
            if !ref_paths.contains(&rel) {
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
    // Invariant 5: content.
    let (hash, threads, always) = match contents {
        Contents::Skip => return Ok(out),
        Contents::Fingerprint(h) => (h, 1, false),
        Contents::Rehash(h, n) => (h, n.max(1), true),
    };
    let fp_of = |rel: &str| -> Option<StatFp> {
        fs.symlink_metadata(&layout.join(rel)).ok().map(|m| StatFp {
            size: m.len,
            mtime_ns: m.mtime_ns as i64,
            ino: m.ino,
        })
    };
    let mut work: Vec<(String, String)> = Vec::new(); // (rel path, md5)
    for (_, _, e) in state.entries() {
        if !ref_paths.contains(&e.ref_path) {
            continue;
        }
        // With `always`, the fingerprints are not needed: do not stat for them.
        let unchanged = || {
            e.ref_fp.is_some()
                && e.ref_fp == fp_of(&e.ref_path)
                && e.shared_fp.is_some()
                && e.shared_fp == fp_of(&e.shared_path)
        };
        if always || !unchanged() {
            work.push((e.ref_path.clone(), e.md5.clone()));
        }
    }
    // References are often one file (symlinks and hard links to the shared copy):
    // hash each file once, then check every reference that resolves to it. A file
    // is known by what `stat` (following symlinks) says of it: device, inode, size,
    // mtime.
    let mut groups: Vec<(String, Vec<(String, String)>)> = Vec::new(); // (rel to hash, [(rel, md5)])
    let mut by_file: HashMap<(u64, u64, u64, i128), usize> = HashMap::new();
    for (rel, md5) in work {
        let key = fs
            .metadata(&layout.join(&rel))
            .ok()
            .map(|m| (m.dev, m.ino, m.len, m.mtime_ns));
        match key.and_then(|k| by_file.get(&k).copied()) {
            Some(i) => groups[i].1.push((rel, md5)),
            None => {
                if let Some(k) = key {
                    by_file.insert(k, groups.len());
                }
                groups.push((rel.clone(), vec![(rel, md5)]));
            }
        }
    }
    let checked = crate::par::map(&groups, threads, |(first, refs)| {
        let got = hash(&layout.join(first));
        let bad = refs.iter().filter_map(|(rel, md5)| match &got {
            Ok(h) if h == md5 => None,
            Ok(h) => Some(v(
                5,
                "content",
                rel,
                format!("md5 is {h}, state says {md5}"),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None, // reported as invariant 2
            Err(e) => Some(v(5, "unreadable", rel, e.to_string())),
        });
        Ok(bad.collect::<Vec<_>>())
    })?;
    let mut found: Vec<Violation> = checked.into_iter().flatten().collect();
    found.sort_by(|a, b| a.path.cmp(&b.path));
    out.extend(found);
    Ok(out)
}
