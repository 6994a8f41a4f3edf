//! Heal: find what a user deleted or edited since the engine wrote it.
//!
//! Owns: the disk check a pull runs before planning. A file whose stat fingerprint
//! (size, mtime, inode) is unchanged is trusted without reading it; one whose
//! fingerprint changed is re-hashed, and only wrong content counts as damage.
//! Reads only: it never mutates anything.

use std::io;
use std::path::Path;

use crate::error::{IoContext, Result};
use crate::fs::{Fs, Kind};
use crate::journal::event::Slot;
use crate::layout::{self, Layout};
use crate::reconcile::plan::Damage;
use crate::replay::state::{StatFp, Strategy, SyncState, TableEntry};

/// How content is hashed (the library API lets a caller inject it).
pub type HashFn<'a> = &'a (dyn Fn(&Path) -> io::Result<String> + Sync);

fn fp_now(fs: &dyn Fs, path: &Path) -> Result<Option<StatFp>> {
    match fs.symlink_metadata(path) {
        Ok(m) => Ok(Some(StatFp {
            size: m.len,
            mtime_ns: m.mtime_ns as i64,
            ino: m.ino,
        })
        .filter(|_| m.kind != Kind::Dir)),
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
    match hash(path) {
        Ok(h) if h == md5 => Ok(Check::Refresh),
        Ok(_) => Ok(Check::Damaged),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Check::Damaged),
        Err(e) => Err(e).at("read", path),
    }
}

/// Check one reference: a symlink by its target, anything else by content.
fn check_ref(
    fs: &dyn Fs,
    layout: &Layout,
    id: &str,
    e: &TableEntry,
    hash: HashFn<'_>,
) -> Result<Check> {
    let path = layout.join(&e.ref_path);
    if e.strategy != Strategy::Symlink {
        return check_file(fs, &path, e.ref_fp, Some(&e.md5), hash);
    }
    match fs.symlink_metadata(&path) {
        Ok(m) if m.kind == Kind::Symlink => {
            // A symlink cannot be rewritten in place: an unchanged stat fingerprint
            // is the same link, trusted as a file's would be.
            let now = StatFp {
                size: m.len,
                mtime_ns: m.mtime_ns as i64,
                ino: m.ino,
            };
            let wrong = e.ref_fp != Some(now)
                && fs.read_link(&path).at("readlink", &path)? != layout::symlink_target(id);
            Ok(if wrong { Check::Damaged } else { Check::Ok })
        }
        Ok(_) => Ok(Check::Damaged),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Check::Damaged),
        Err(err) => Err(err).at("stat", &path),
    }
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
    let checks = crate::par::map(&shared, crate::par::threads(), |(_, e)| {
        check_file(
            fs,
            &layout.join(&e.shared_path),
            e.shared_fp,
            Some(&e.md5),
            hash,
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
    let checks = crate::par::map(&refs, crate::par::threads(), |(_, id, e)| {
        check_ref(fs, layout, id, e, hash)
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
