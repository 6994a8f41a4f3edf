//! Heal: find what a user deleted or edited since the engine wrote it.
//!
//! Owns: the disk check a pull runs before planning. A file whose stat fingerprint
//! (size, mtime, inode) is unchanged is trusted without reading it; one whose
//! fingerprint changed is re-hashed, and only wrong content counts as damage.
//! Reads only: it never mutates anything.

use std::io;
use std::path::Path;

use crate::error::{IoContext, Result};
use crate::fs::{Fs, Kind, Meta};
use crate::journal::event::Slot;
use crate::layout::{self, Layout};
use crate::reconcile::plan::Damage;
use crate::replay::state::{StatFp, Strategy, SyncState, TableEntry};

/// How content is hashed (the library API lets a caller inject it).
pub type HashFn<'a> = &'a (dyn Fn(&Path) -> io::Result<String> + Sync);

fn fp_now(fs: &dyn Fs, path: &Path) -> Result<Option<StatFp>> {
    match fs.symlink_metadata(path) {
        Ok(m) => Ok(Some(StatFp::of(&m)).filter(|_| m.kind != Kind::Dir)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).at("stat", path),
    }
}

/// What is the state of one file the engine wrote?
enum Check {
    Ok,
    Refresh,
    Damaged,
}

fn check_file(
    fs: &dyn Fs,
    path: &Path,
    recorded: Option<StatFp>,
    md5: Option<&str>,
    hash: HashFn<'_>,
) -> Result<Check> {
    let Some(now) = fp_now(fs, path)? else {
        return Ok(Check::Damaged);
    };
    if recorded == Some(now) {
        return Ok(Check::Ok);
    }
    let Some(md5) = md5 else {
        return Ok(Check::Damaged);
    };
    hashed(path, md5, hash)
}

/// A file whose fingerprint changed: is its content still `md5`?
fn hashed(path: &Path, md5: &str, hash: HashFn<'_>) -> Result<Check> {
    match hash(path) {
        Ok(h) if h == md5 => Ok(Check::Refresh),
        Ok(_) => Ok(Check::Damaged),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Check::Damaged),
        Err(e) => Err(e).at("read", path),
    }
}

/// What a stat says of one file, before any hashing.
enum Probe {
    Done(Check),
    /// The fingerprint changed: the content decides (hashed afterwards, in parallel).
    Hash,
}

/// `lstat` every relative path, in order, and hand each result to `f` (with its
/// path). Consecutive paths of one folder go to the filesystem as one batch
/// (`Fs::symlink_metadata_in`), the batches over threads; the results come back
/// batch by batch, in order, so that a caller with 250k paths holds only what `f`
/// keeps, and need not join them into one more list.
pub(crate) fn stat_batches<S, R, F>(
    fs: &dyn Fs,
    layout: &Layout,
    rels: &[S],
    f: F,
) -> Result<Vec<Vec<R>>>
where
    S: AsRef<str> + Sync,
    R: Send,
    F: Fn(&str, io::Result<Meta>) -> Result<R> + Sync,
{
    const UNIT: usize = 512;
    // (the folder part, the name)
    fn split(r: &str) -> (&str, &str) {
        r.rsplit_once('/').unwrap_or(("", r))
    }
    let mut units: Vec<(usize, usize)> = Vec::new();
    let mut start = 0;
    for i in 1..=rels.len() {
        if i == rels.len()
            || i - start == UNIT
            || split(rels[i].as_ref()).0 != split(rels[start].as_ref()).0
        {
            units.push((start, i));
            start = i;
        }
    }
    crate::par::map_balanced(&units, crate::par::threads(), |&(a, b)| {
        let unit = &rels[a..b];
        let names: Vec<&str> = unit.iter().map(|r| split(r.as_ref()).1).collect();
        let dir = layout.join(split(unit[0].as_ref()).0);
        fs.symlink_metadata_in(&dir, &names)
            .into_iter()
            .zip(unit)
            .map(|(m, rel)| f(rel.as_ref(), m))
            .collect()
    })
}

/// [`check_file`]'s first half, from a stat already made.
fn probe_file(
    layout: &Layout,
    rel: &str,
    meta: io::Result<Meta>,
    recorded: Option<StatFp>,
) -> Result<Probe> {
    let now = match meta {
        Ok(m) if m.kind == Kind::Dir => None,
        Ok(m) => Some(StatFp::of(&m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).at("stat", &layout.join(rel)),
    };
    Ok(match now {
        None => Probe::Done(Check::Damaged),
        Some(now) if recorded == Some(now) => Probe::Done(Check::Ok),
        Some(_) => Probe::Hash,
    })
}

/// [`check_ref`] from a stat already made.
fn probe_ref(
    fs: &dyn Fs,
    layout: &Layout,
    id: &str,
    e: &TableEntry,
    meta: io::Result<Meta>,
) -> Result<Probe> {
    if e.strategy != Strategy::Symlink {
        return probe_file(layout, &e.ref_path, meta, e.ref_fp);
    }
    let path = || layout.join(&e.ref_path);
    match meta {
        Ok(m) if m.kind == Kind::Symlink => {
            // A symlink cannot be rewritten in place: an unchanged stat fingerprint
            // is the same link, trusted as a file's would be.
            let now = StatFp::of(&m);
            let wrong = e.ref_fp != Some(now)
                && fs.read_link(&path()).at("readlink", &path())? != layout::symlink_target(id);
            Ok(Probe::Done(if wrong { Check::Damaged } else { Check::Ok }))
        }
        Ok(_) => Ok(Probe::Done(Check::Damaged)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Probe::Done(Check::Damaged)),
        Err(err) => Err(err).at("stat", &path()),
    }
}

/// Settle the probes: the files whose fingerprint changed are hashed, in
/// parallel (`target(i)`: the path and md5 of probe `i`).
fn settle<'a>(
    probes: Vec<Probe>,
    hash: HashFn<'_>,
    target: impl Fn(usize) -> (std::path::PathBuf, &'a str) + Sync,
) -> Result<Vec<Check>> {
    let to_hash: Vec<usize> = (0..probes.len())
        .filter(|&i| matches!(probes[i], Probe::Hash))
        .collect();
    let hashed_checks = crate::par::map_balanced(&to_hash, crate::par::threads(), |&i| {
        let (path, md5) = target(i);
        hashed(&path, md5, hash)
    })?;
    let mut hashed_checks = hashed_checks.into_iter();
    Ok(probes
        .into_iter()
        .map(|p| match p {
            Probe::Done(c) => c,
            Probe::Hash => hashed_checks.next().unwrap_or(Check::Damaged),
        })
        .collect())
}

/// Check every file of `state` on disk.
pub fn find_damage(
    fs: &dyn Fs,
    layout: &Layout,
    state: &SyncState,
    hash: HashFn<'_>,
) -> Result<Damage> {
    let mut d = Damage::default();
    // One check per shared file, then one per reference; both fan out over threads
    // (a no-op pull is mostly these stats).
    let mut shared_seen = std::collections::HashSet::new();
    let shared: Vec<(&str, &TableEntry)> = state
        .direct_tables
        .iter()
        .chain(state.data_packages.values().flatten())
        .map(|(id, e)| (id.as_str(), e))
        .filter(|(id, _)| shared_seen.insert(*id))
        .collect();
    drop(shared_seen);
    let rels: Vec<&str> = shared.iter().map(|(_, e)| e.shared_path.as_str()).collect();
    let probes = stat_batches(fs, layout, &rels, |_, m| Ok(m))?
        .into_iter()
        .flatten()
        .zip(&shared)
        .map(|(meta, (_, e))| probe_file(layout, &e.shared_path, meta, e.shared_fp))
        .collect::<Result<Vec<_>>>()?;
    let checks = settle(probes, hash, |i| {
        (
            layout.join(&shared[i].1.shared_path),
            shared[i].1.md5.as_str(),
        )
    })?;
    for ((id, e), check) in shared.iter().zip(checks) {
        match check {
            Check::Ok => {}
            Check::Refresh => d.refresh.push(e.shared_path.clone()),
            Check::Damaged => {
                d.shared.insert(id.to_string());
            }
        }
    }
    // (package slug or None for a direct table, id, entry): no slot is built (and
    // no slug copied) for the references that turn out fine.
    let mut refs: Vec<(Option<&str>, &str, &TableEntry)> = Vec::new();
    refs.extend(
        state
            .direct_tables
            .iter()
            .map(|(id, e)| (None, id.as_str(), e)),
    );
    for (slug, tables) in &state.data_packages {
        refs.extend(
            tables
                .iter()
                .map(|(id, e)| (Some(slug.as_str()), id.as_str(), e)),
        );
    }
    let rels: Vec<&str> = refs.iter().map(|(_, _, e)| e.ref_path.as_str()).collect();
    let probes = stat_batches(fs, layout, &rels, |_, m| Ok(m))?
        .into_iter()
        .flatten()
        .zip(&refs)
        .map(|(meta, (_, id, e))| probe_ref(fs, layout, id, e, meta))
        .collect::<Result<Vec<_>>>()?;
    let checks = settle(probes, hash, |i| {
        (layout.join(&refs[i].2.ref_path), refs[i].2.md5.as_str())
    })?;
    for ((slug, id, e), check) in refs.into_iter().zip(checks) {
        match check {
            Check::Ok => {}
            Check::Refresh => d.refresh.push(e.ref_path.clone()),
            Check::Damaged => {
                let slot = slug.map_or(Slot::Direct, |s| Slot::Package(s.to_string()));
                d.refs.insert((slot, id.to_string()));
            }
        }
    }
    for (slug, dom) in &state.memory_domains {
        let path = layout.join(&dom.path);
        // Bundles are small and their manifest md5 may be a version tag: any change
        // means fetch again.
        if !matches!(check_file(fs, &path, dom.fp, None, hash)?, Check::Ok) {
            d.domains.insert(slug.clone());
        }
    }
    Ok(d)
}
