//! Staging: download and verify everything a plan needs, out of sight.
//!
//! Owns: `.stack/staging/`. Each download streams into `<md5>.part` (hashing while
//! writing), is checked against the manifest's md5, and is renamed to `<md5>`
//! (a table's made read-only, as its shared file will be). An origin that cannot
//! resume (a local folder) writes `<md5>` directly. A table whose file travels in
//! a folder built out of sight (`reconcile::place`) is written to its final name
//! in that folder instead of `<md5>`.
//! Invariant kept: nothing visible changes while staging; a partial download from
//! a resuming origin keeps its `.part` name so a later pull can resume it; by the
//! commit point every staged file holds the content its name promises (or, with
//! [`BundleCheck::TrustServer`], the bytes the server sent for that version) —
//! before it, a crash drops every `<md5>` file whatever it holds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Error, IoContext, Result};
use crate::fs::{not_found_ok, Fs};
use crate::layout::Layout;
use crate::reconcile::origin::{Item, Origin, Request};
use crate::reconcile::plan::StageItem;

/// How bundle md5s are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BundleCheck {
    /// A bundle's bytes must have the manifest's md5 (the default).
    #[default]
    Verify,
    /// The manifest's md5 is only a version tag (the reference engine's behaviour).
    TrustServer,
}

/// Download every item into staging with up to `jobs` parallel workers: to
/// `<md5>`, or to `dest(i)` (inside a placed folder: `reconcile::place`) where
/// that gives a path. Returns the bytes fetched. On
/// error, every complete staged file this call made is removed again (unless the
/// error is a simulated crash).
#[allow(clippy::too_many_arguments)]
pub fn stage_all(
    fs: &dyn Fs,
    layout: &Layout,
    origin: &dyn Origin,
    items: &[StageItem],
    dest: &(dyn Fn(usize) -> Option<PathBuf> + Sync),
    jobs: usize,
    bundles: BundleCheck,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64> {
    if items.is_empty() {
        return Ok(0);
    }
    let staging = layout.staging();
    fs.create_dir_all(&staging).at("mkdir", &staging)?;
    let dest_of = |i: usize| dest(i).unwrap_or_else(|| layout.staged(&items[i].md5));
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let bytes = AtomicU64::new(0);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        failed.store(true, Ordering::Relaxed);
        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
        // A crash wins over any other error: it must reach the caller.
        if slot.is_none() || e.is_crash() {
            *slot = Some(e);
        }
    };
    let worker = || {
        // Small items a local origin hands over whole wait here until a batch is
        // full, then are hashed together; any other item is staged at once.
        let mut small: Vec<(&StageItem, PathBuf, Vec<u8>)> = Vec::with_capacity(BATCH);
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else { break };
            let staged = match origin.read_small(&request(item)) {
                Some(Ok(bytes)) => {
                    small.push((item, dest_of(i), bytes));
                    if small.len() < BATCH {
                        continue;
                    }
                    stage_small(fs, &mut small, bundles, progress)
                }
                Some(Err(e)) => Err(e),
                None => stage_one(fs, layout, origin, item, &dest_of(i), bundles)
                    .inspect(|n| progress(*n)),
            };
            match staged {
                Ok(n) => {
                    bytes.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => fail(e),
            }
        }
        if !small.is_empty() && !failed.load(Ordering::Relaxed) {
            match stage_small(fs, &mut small, bundles, progress) {
                Ok(n) => {
                    bytes.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => fail(e),
            }
        }
    };
    let jobs = jobs.clamp(1, items.len());
    std::thread::scope(|s| {
        for _ in 1..jobs {
            s.spawn(worker);
        }
        worker();
    });
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        None => Ok(bytes.into_inner()),
        Some(e) if e.is_crash() => Err(e),
        Some(e) => {
            for i in 0..items.len() {
                let p = dest_of(i);
                not_found_ok(fs.remove_file(&p)).at("remove", &p)?;
            }
            Err(e)
        }
    }
}

/// Items a worker takes at once: one per lane of [`crate::md5x`].
const BATCH: usize = 8;

/// Write a batch of small items handed over whole (`Origin::read_small`) to their
/// staged names and hash them together in lock step (one md5 pass for up to
/// eight files instead of one each). The bytes are checked before they are
/// written, and written a folder at a time (`Fs::write_files_in`), a table's
/// file read-only from its creation. Empties `small`; returns the bytes fetched.
fn stage_small(
    fs: &dyn Fs,
    small: &mut Vec<(&StageItem, PathBuf, Vec<u8>)>,
    bundles: BundleCheck,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64> {
    let slices: Vec<&[u8]> = small.iter().map(|(_, _, b)| b.as_slice()).collect();
    let digests = crate::md5x::digest_slices(&slices);
    for ((item, _, _), digest) in small.iter().zip(digests) {
        if let Some(e) = mismatch(item, crate::reconcile::origin::hex(&digest), bundles) {
            return Err(e);
        }
    }
    // Such an origin cannot resume: the bytes go straight to the staged names. No
    // staged file or placed folder survives a crash before the commit point (a
    // rollback removes them all), so no read-only leftover is in the way.
    let mut total = 0;
    let mut rest = &small[..];
    while let Some((first, dest, _)) = rest.first() {
        let dir = dest.parent().unwrap_or(Path::new(""));
        let table = |i: &StageItem| matches!(i.item, Item::Table { .. });
        let n = rest
            .iter()
            .take_while(|(i, d, _)| d.parent() == Some(dir) && table(i) == table(first))
            .count();
        let (group, tail) = rest.split_at(n);
        let files: Vec<(&str, &[u8])> = group
            .iter()
            .map(|(_, d, b)| {
                let name = d.file_name().and_then(|n| n.to_str()).unwrap_or("");
                (name, b.as_slice())
            })
            .collect();
        for ((_, d, b), r) in group
            .iter()
            .zip(fs.write_files_in(dir, &files, table(first)))
        {
            r.at("write", d)?;
            total += b.len() as u64;
            progress(b.len() as u64);
        }
        rest = tail;
    }
    small.clear();
    Ok(total)
}

fn request(item: &StageItem) -> Request<'_> {
    Request {
        item: &item.item,
        url: &item.url,
        md5: &item.md5,
        size: item.size,
    }
}

/// The error for bytes whose md5 is not the manifest's (`None`: they are right,
/// or a bundle's md5 is only a version tag).
fn mismatch(item: &StageItem, got: String, bundles: BundleCheck) -> Option<Error> {
    let trust = matches!(item.item, Item::Bundle { .. }) && bundles == BundleCheck::TrustServer;
    (item.md5 != got && !trust).then(|| Error::Checksum {
        what: format!("{} from {}", item.item.describe(), item.url),
        expected: item.md5.to_string(),
        actual: got,
    })
}

/// Check a download's md5 against the manifest's; wrong bytes are removed (they
/// are useless for resuming).
fn checked(
    fs: &dyn Fs,
    item: &StageItem,
    dest: &Path,
    got: String,
    bundles: BundleCheck,
) -> Result<()> {
    match mismatch(item, got, bundles) {
        Some(e) => {
            not_found_ok(fs.remove_file(dest)).at("remove", dest)?;
            Err(e)
        }
        None => Ok(()),
    }
}

fn stage_one(
    fs: &dyn Fs,
    layout: &Layout,
    origin: &dyn Origin,
    item: &StageItem,
    staged: &Path,
    bundles: BundleCheck,
) -> Result<u64> {
    let part = layout.partial(&item.md5);
    let dest = if origin.resumes() {
        part.as_path()
    } else {
        staged
    };
    let req = request(item);
    let got = match origin.fetch(fs, &req, dest) {
        // A power loss can keep the chmod of a staged file and lose the rename
        // before it: its `.part` is then read-only. Make it writable and retry.
        Err(e) if !e.is_crash() && fs.symlink_metadata(dest).is_ok_and(|m| m.readonly) => {
            fs.set_readonly(dest, false).at("chmod", dest)?;
            origin.fetch(fs, &req, dest)?
        }
        r => r?,
    };
    checked(fs, item, dest, got.md5, bundles)?;
    if dest != staged {
        fs.rename(&part, staged).at("rename", staged)?;
    }
    if matches!(item.item, Item::Table { .. }) {
        // Shared files are read-only (contract §2). The mode belongs to the inode:
        // set here, in parallel, it is made durable with the staged bytes by the
        // `syncfs` before the commit point, and apply only moves the file.
        fs.set_readonly(staged, true).at("chmod", staged)?;
    }
    Ok(got.bytes_fetched)
}
