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
use crate::layout::{self, Layout};
use crate::reconcile::plan::Damage;
use crate::replay::state::{StatFp, Strategy, SyncState};

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

/// Check every file of `state` on disk.
pub fn find_damage(
    fs: &dyn Fs,
    layout: &Layout,
    state: &SyncState,
    hash: HashFn<'_>,
) -> Result<Damage> {
    let mut d = Damage::default();
    let mut shared_seen = std::collections::BTreeSet::new();
    for (_, id, e) in state.entries() {
        if !shared_seen.insert(id.to_string()) {
            continue;
        }
        let path = layout.join(&e.shared_path);
        match check_file(fs, &path, e.shared_fp, Some(&e.md5), hash)? {
            Check::Ok => {}
            Check::Refresh => d.refresh.push(e.shared_path.clone()),
            Check::Damaged => {
                d.shared.insert(id.to_string());
            }
        }
    }
    for (slot, id, e) in state.entries() {
        let path = layout.join(&e.ref_path);
        let bad = match e.strategy {
            Strategy::Symlink => match fs.symlink_metadata(&path) {
                Ok(m) if m.kind == Kind::Symlink => {
                    // A symlink cannot be rewritten in place: an unchanged stat
                    // fingerprint is the same link, trusted as a file's would be.
                    let now = StatFp {
                        size: m.len,
                        mtime_ns: m.mtime_ns as i64,
                        ino: m.ino,
                    };
                    e.ref_fp != Some(now)
                        && fs.read_link(&path).at("readlink", &path)? != layout::symlink_target(id)
                }
                Ok(_) => true,
                Err(err) if err.kind() == io::ErrorKind::NotFound => true,
                Err(err) => return Err(err).at("stat", &path),
            },
            _ => match check_file(fs, &path, e.ref_fp, Some(&e.md5), hash)? {
                Check::Ok => false,
                Check::Refresh => {
                    d.refresh.push(e.ref_path.clone());
                    false
                }
                Check::Damaged => true,
            },
        };
        if bad {
            d.refs.insert((slot, id.to_string()));
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
