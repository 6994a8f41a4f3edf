//! The audit's output pinned violation by violation, in order, and its errors: a
//! duplicate reference path in one slot, entries whose paths are not the engine's
//! (one of them naming another entry's reference), dangling and looping symlinks,
//! missing folders, a folder that is a file, a reference that is a folder, names one
//! of which is a prefix of another, more references than one stat batch, and a
//! simulated crash that must win over any other error.

// The fixtures are made and edited with std::fs.
#![allow(clippy::disallowed_methods)]

use std::io;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::*;
use crate::fs::DirEntry;

fn md5_hex(bytes: &[u8]) -> String {
    use md5::{Digest, Md5};
    crate::reconcile::origin::hex(&Md5::digest(bytes))
}

fn h(s: &str) -> String {
    md5_hex(s.as_bytes())
}

fn hash_file(p: &Path) -> io::Result<String> {
    std::fs::read(p).map(|b| md5_hex(&b))
}

fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

fn symlink(root: &Path, target: &str, rel: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, p).unwrap();
}

/// The stat fingerprint of `rel` as the engine records it (`lstat`).
fn fp(root: &Path, rel: &str) -> Value {
    let m = RealFs.symlink_metadata(&root.join(rel)).unwrap();
    serde_json::to_value(StatFp::of(&m)).unwrap()
}

/// A state entry; `fps`: record the fingerprints the disk has now.
#[allow(clippy::too_many_arguments)]
fn entry(
    root: &Path,
    name: &str,
    md5: &str,
    ref_path: &str,
    shared_path: &str,
    strategy: &str,
    fps: bool,
) -> Value {
    let mut e = json!({
        "name": name, "md5": md5, "ref_path": ref_path,
        "shared_path": shared_path, "strategy": strategy,
    });
    if fps {
        e["ref_fp"] = fp(root, ref_path);
        e["shared_fp"] = fp(root, shared_path);
    }
    e
}

fn state(direct: Value, packages: Value, domains: Value) -> SyncState {
    serde_json::from_value(json!({
        "version": 1,
        "direct_tables": direct,
        "data_packages": packages,
        "memory_domains": domains,
    }))
    .unwrap()
}

type Row = (u8, &'static str, String, String);

fn rows(v: Vec<Violation>) -> Vec<Row> {
    v.into_iter()
        .map(|v| (v.invariant, v.kind, v.path, v.message))
        .collect()
}

fn row(inv: u8, kind: &'static str, path: &str, message: impl Into<String>) -> Row {
    (inv, kind, path.to_string(), message.into())
}

/// The audit in every mode: (invariants 1–4, fingerprint mode, re-hash mode), each
/// the same through the built-in md5 and through a hash function, on one thread
/// and on several.
fn all_modes(fs: &dyn Fs, root: &Path, st: &SyncState) -> [Vec<Row>; 3] {
    let layout = Layout::new(root);
    let run = |c: Contents<'_>| audit(fs, &layout, st, c).map(rows);
    let skip = run(Contents::Skip).unwrap();
    let fp = run(Contents::FingerprintMd5).unwrap();
    assert_eq!(fp, run(Contents::Fingerprint(&hash_file)).unwrap());
    let re = run(Contents::RehashMd5(3)).unwrap();
    assert_eq!(re, run(Contents::RehashMd5(1)).unwrap());
    assert_eq!(re, run(Contents::Rehash(&hash_file, 1)).unwrap());
    assert_eq!(re, run(Contents::Rehash(&hash_file, 4)).unwrap());
    [skip, fp, re]
}

/// Every kind of violation, in one directory, in the order `verify` reports them.
#[test]
fn every_violation_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Direct tables.
    write(root, "data/_shared/d1.parquet", "D1");
    write(root, "data/_direct/d1.parquet", "D1");
    write(root, "data/_shared/d2.parquet", "D2");
    write(root, "data/_shared/d3.parquet", "D3");
    write(root, "data/_direct/dup.parquet", "D2");
    write(root, "data/_shared/d6.parquet", "D6");
    write(root, "data/_shared/x.parquet", "X");
    write(root, "data/_direct/x.parquet", "X");
    write(root, "data/_shared/x-y.parquet", "XY");
    write(root, "data/_direct/x-y.parquet", "XY edited");
    // Package p1: symlinks.
    symlink(root, "../_shared/a.parquet", "data/p1/a.parquet"); // shared missing
    write(root, "data/_shared/b.parquet", "B edited");
    symlink(root, "../_shared/b.parquet", "data/p1/b.parquet");
    write(root, "data/_shared/c.parquet", "C");
    symlink(root, "../_shared/nowhere.parquet", "data/p1/c.parquet"); // dangling
    write(root, "data/_shared/dir.parquet", "DIR");
    std::fs::create_dir_all(root.join("data/p1/dir.parquet")).unwrap();
    write(root, "data/_shared/q.parquet", "QQ");
    write(root, "data/p1/q.parquet", "QQ");
    // Package p2: its folder is missing.
    write(root, "data/_shared/e.parquet", "E");
    // Package p3: the table `a` again (its shared file missing), as a copy.
    write(root, "data/p3/a.parquet", "A");
    // Strays.
    write(root, "data/_shared/orphan.parquet", "O");
    write(root, "data/_shared/zzz.parquet", "Z");
    write(root, "data/_shared/x-z.parquet", "XZ");
    write(root, "data/p1/stray.parquet", "S");
    write(root, "data/loose", "L");
    write(root, "data/p9/x.parquet", "P9");
    write(root, "memory/m/bundle.md", "# m");
    write(root, "memory/m/notes.md", "the user's notes");
    std::fs::create_dir_all(root.join("memory/zzz")).unwrap();
    write(root, "memory/note.txt", "not a folder");

    let state0 = state(
        json!({
            "d1": entry(root, "d1", &h("D1"), "data/_direct/d1.parquet", "data/_shared/d1.parquet", "copy", true),
            "d2": entry(root, "dup", &h("D2"), "data/_direct/dup.parquet", "data/_shared/d2.parquet", "copy", false),
            "d3": entry(root, "dup", &h("D3"), "data/_direct/dup.parquet", "data/_shared/d3.parquet", "copy", false),
            "d4": entry(root, "d4", &h("D4"), "data/elsewhere/d4.parquet", "data/_shared/d4.parquet", "copy", false),
            // Not the engine's paths, but its reference is d1's: checked for
            // content (by fingerprint: of d1's reference and of its own stray).
            "d5": entry(root, "d5", &h("WRONG"), "data/_direct/d1.parquet", "data/_shared/zzz.parquet", "copy", true),
            "d6": entry(root, "d6", &h("D6"), "data/_direct/d6.parquet", "data/_shared/d6.parquet", "copy", false),
            "x": entry(root, "x", &h("X"), "data/_direct/x.parquet", "data/_shared/x.parquet", "copy", true),
            "x-y": entry(root, "x-y", &h("XY"), "data/_direct/x-y.parquet", "data/_shared/x-y.parquet", "copy", false),
        }),
        json!({
            "p1": {
                "a": {"name": "a", "md5": h("A"), "ref_path": "data/p1/a.parquet",
                      "shared_path": "data/_shared/a.parquet", "strategy": "symlink"},
                "b": entry(root, "b", &h("B"), "data/p1/b.parquet", "data/_shared/b.parquet", "symlink", false),
                "c": {"name": "c", "md5": h("C"), "ref_path": "data/p1/c.parquet",
                      "shared_path": "data/_shared/c.parquet", "strategy": "symlink"},
                "dir": entry(root, "dir", &h("DIR"), "data/p1/dir.parquet", "data/_shared/dir.parquet", "copy", false),
                "q": entry(root, "q", &h("QQ"), "data/p1/q.parquet", "data/_shared/q.parquet", "copy", true),
            },
            "p2": {
                "e": {"name": "e", "md5": h("E"), "ref_path": "data/p2/e.parquet",
                      "shared_path": "data/_shared/e.parquet", "strategy": "copy"},
            },
            "p3": {
                "a": {"name": "a", "md5": h("A"), "ref_path": "data/p3/a.parquet",
                      "shared_path": "data/_shared/a.parquet", "strategy": "copy"},
            },
        }),
        json!({
            "m": {"md5": h("# m"), "path": "memory/m/bundle.md"},
            "gone": {"md5": h("# gone"), "path": "memory/gone/bundle.md"},
        }),
    );
    // Edit q in place, same size, mtime put back: only a re-hash sees it.
    let q = root.join("data/p1/q.parquet");
    let mtime = std::fs::metadata(&q).unwrap().modified().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&q).unwrap();
    use std::io::Write as _;
    (&f).write_all(b"QX").unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);

    let [skip, fpm, re] = all_modes(&RealFs, root, &state0);
    let inv1to4 = vec![
        row(
            2,
            "bad_path",
            "data/elsewhere/d4.parquet",
            "state entry of d4 does not name data/_direct/d4.parquet / data/_shared/d4.parquet",
        ),
        row(
            2,
            "bad_path",
            "data/_direct/d1.parquet",
            "state entry of d5 does not name data/_direct/d5.parquet / data/_shared/d5.parquet",
        ),
        row(
            2,
            "missing_ref",
            "data/_direct/d6.parquet",
            "reference to d6 is missing",
        ),
        row(
            2,
            "missing_shared",
            "data/_shared/a.parquet",
            "shared file of a is missing",
        ),
        row(
            2,
            "broken_ref",
            "data/p1/a.parquet",
            "reference to a does not resolve",
        ),
        row(
            2,
            "broken_ref",
            "data/p1/c.parquet",
            "reference to c does not resolve",
        ),
        row(
            2,
            "missing_ref",
            "data/p2/e.parquet",
            "reference to e is missing",
        ),
        row(
            2,
            "missing_shared",
            "data/_shared/a.parquet",
            "shared file of a is missing",
        ),
        row(
            1,
            "orphan",
            "data/_shared/orphan.parquet",
            "no state entry references this shared file",
        ),
        row(
            1,
            "orphan",
            "data/_shared/x-z.parquet",
            "no state entry references this shared file",
        ),
        row(
            1,
            "orphan",
            "data/_shared/zzz.parquet",
            "no state entry references this shared file",
        ),
        row(
            3,
            "untracked",
            "data/loose",
            "file directly under data/ is not the engine's",
        ),
        row(
            3,
            "untracked",
            "data/p1/stray.parquet",
            "no state entry holds this file",
        ),
        row(
            3,
            "untracked",
            "data/p9/x.parquet",
            "no state entry holds this file",
        ),
        row(
            4,
            "untracked",
            "memory/m/notes.md",
            "no state entry holds this file",
        ),
        row(
            4,
            "untracked",
            "memory/note.txt",
            "file directly under memory/ is not the engine's",
        ),
        row(
            4,
            "unexpected_domain",
            "memory/zzz",
            "memory domain is not in the stack",
        ),
        row(
            4,
            "missing_domain",
            "memory/gone/bundle.md",
            "bundle of domain gone is missing",
        ),
    ];
    assert_eq!(skip, inv1to4);
    let is_dir = io::Error::from_raw_os_error(libc::EISDIR).to_string();
    let content = |path: &str, got: &str, want: &str| {
        row(
            5,
            "content",
            path,
            format!("md5 is {}, state says {}", h(got), h(want)),
        )
    };
    let mut with_fp = inv1to4.clone();
    with_fp.extend([
        content("data/_direct/dup.parquet", "D2", "D3"),
        content("data/_direct/x-y.parquet", "XY edited", "XY"),
        content("data/p1/b.parquet", "B edited", "B"),
        row(5, "unreadable", "data/p1/dir.parquet", is_dir.clone()),
    ]);
    assert_eq!(fpm, with_fp);
    let mut with_rehash = inv1to4;
    with_rehash.extend([
        content("data/_direct/d1.parquet", "D1", "WRONG"),
        content("data/_direct/dup.parquet", "D2", "D3"),
        content("data/_direct/x-y.parquet", "XY edited", "XY"),
        content("data/p1/b.parquet", "B edited", "B"),
        row(5, "unreadable", "data/p1/dir.parquet", is_dir),
        content("data/p1/q.parquet", "QX", "QQ"),
    ]);
    assert_eq!(re, with_rehash);
}

/// Nothing on disk at all: every entry is missing, no listing finds anything.
#[test]
fn missing_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let e = |slot: &str, id: &str| {
        json!({"name": id, "md5": h(id), "ref_path": format!("data/{slot}/{id}.parquet"),
               "shared_path": format!("data/_shared/{id}.parquet"), "strategy": "symlink"})
    };
    let st = state(
        json!({"t1": e("_direct", "t1")}),
        json!({"p": {"t1": e("p", "t1"), "t2": e("p", "t2")}}),
        json!({"m": {"md5": h("m"), "path": "memory/m/bundle.md"}}),
    );
    let missing = |id: &str, slot: &str| {
        [
            row(
                2,
                "missing_shared",
                &format!("data/_shared/{id}.parquet"),
                format!("shared file of {id} is missing"),
            ),
            row(
                2,
                "missing_ref",
                &format!("data/{slot}/{id}.parquet"),
                format!("reference to {id} is missing"),
            ),
        ]
    };
    let mut want: Vec<Row> = Vec::new();
    want.extend(missing("t1", "_direct"));
    want.extend(missing("t1", "p"));
    want.extend(missing("t2", "p"));
    want.push(row(
        4,
        "missing_domain",
        "memory/m/bundle.md",
        "bundle of domain m is missing",
    ));
    for got in all_modes(&RealFs, root, &st) {
        assert_eq!(got, want);
    }
    // With data/ but without data/_shared/ and the package's folder.
    write(root, "data/_direct/t1.parquet", "t1");
    want.remove(1);
    for got in all_modes(&RealFs, root, &st) {
        assert_eq!(got, want);
    }
}

/// More references than one stat batch, in several packages, with names whose
/// order is not their ids' order; some references and shared files missing, some
/// strays: every violation in order.
#[test]
fn many_references() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    const N: usize = 1300;
    let id = |i: usize| format!("t{i:05}");
    let name = |i: usize| format!("n{:05}", N - i);
    let mut pkgs = serde_json::Map::new();
    for p in ["pa", "pb"] {
        let mut tables = serde_json::Map::new();
        for i in 0..N {
            if p == "pb" && i % 3 != 0 {
                continue;
            }
            let (id, name) = (id(i), name(i));
            let shared = format!("data/_shared/{id}.parquet");
            let rel = format!("data/{p}/{name}.parquet");
            if i % 150 != 7 && p == "pa" {
                write(root, &shared, &id);
            }
            if i % 100 != 3 {
                symlink(root, &format!("../_shared/{id}.parquet"), &rel);
            }
            tables.insert(
                id.clone(),
                json!({"name": name, "md5": h(&id), "ref_path": rel,
                       "shared_path": shared, "strategy": "symlink"}),
            );
        }
        pkgs.insert(p.to_string(), Value::Object(tables));
    }
    for i in [5, 500, 1299] {
        write(root, &format!("data/pa/s{i}.parquet"), "stray");
        write(root, &format!("data/_shared/t{i:05}.parquet.x"), "stray");
    }
    let st = state(json!({}), Value::Object(pkgs), json!({}));
    let mut want = Vec::new();
    for p in ["pa", "pb"] {
        for i in 0..N {
            if p == "pb" && i % 3 != 0 {
                continue;
            }
            let (id, name) = (id(i), name(i));
            let rel = format!("data/{p}/{name}.parquet");
            if i % 150 == 7 {
                want.push(row(
                    2,
                    "missing_shared",
                    &format!("data/_shared/{id}.parquet"),
                    format!("shared file of {id} is missing"),
                ));
            }
            if i % 100 == 3 {
                want.push(row(
                    2,
                    "missing_ref",
                    &rel,
                    format!("reference to {id} is missing"),
                ));
            } else if i % 150 == 7 {
                want.push(row(
                    2,
                    "broken_ref",
                    &rel,
                    format!("reference to {id} does not resolve"),
                ));
            }
        }
    }
    for i in [5, 500, 1299] {
        want.push(row(
            1,
            "orphan",
            &format!("data/_shared/t{i:05}.parquet.x"),
            "no state entry references this shared file",
        ));
    }
    for i in [1299, 5, 500] {
        want.push(row(
            3,
            "untracked",
            &format!("data/pa/s{i}.parquet"),
            "no state entry holds this file",
        ));
    }
    for got in all_modes(&RealFs, root, &st) {
        assert_eq!(got, want);
    }
}

/// Errors other than "not found" stop the audit: the first in entry order (shared
/// file before reference) is returned, before the listings' errors.
#[test]
fn the_first_error_stops_the_audit() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let layout = Layout::new(root);
    let e = |slot: &str, id: &str| {
        json!({"name": id, "md5": h(id), "ref_path": format!("data/{slot}/{id}.parquet"),
               "shared_path": format!("data/_shared/{id}.parquet"), "strategy": "symlink"})
    };
    // p1/a: missing (a violation, not an error); p1/b: a symlink to itself;
    // p2/c: its shared file is a symlink loop.
    write(root, "data/_shared/b.parquet", "b");
    symlink(root, "b.parquet", "data/p1/b.parquet");
    symlink(root, "c.parquet", "data/_shared/c.parquet");
    symlink(root, "../_shared/c.parquet", "data/p2/c.parquet");
    let st = state(
        json!({}),
        json!({"p1": {"a": e("p1", "a"), "b": e("p1", "b")}, "p2": {"c": e("p2", "c")}}),
        json!({}),
    );
    let eloop = io::Error::from_raw_os_error(libc::ELOOP);
    let want = |rel: &str| format!("stat {}: {eloop}", root.join(rel).display());
    for c in [0, 1, 2] {
        let mode = match c {
            0 => Contents::Skip,
            1 => Contents::FingerprintMd5,
            _ => Contents::RehashMd5(2),
        };
        let err = audit(&RealFs, &layout, &st, mode).unwrap_err();
        assert_eq!(err.to_string(), want("data/p1/b.parquet"), "mode {c}");
    }
    // The shared file's error comes first when its entry does.
    let st = state(
        json!({}),
        json!({"p0": {"c": e("p0", "c")}, "p1": {"b": e("p1", "b")}}),
        json!({}),
    );
    symlink(root, "../_shared/c.parquet", "data/p0/c.parquet");
    for mode in [Contents::Skip, Contents::FingerprintMd5] {
        let err = audit(&RealFs, &layout, &st, mode).unwrap_err();
        assert_eq!(err.to_string(), want("data/_shared/c.parquet"));
    }
    // A package folder that is a file: not a directory.
    let st = state(json!({}), json!({"p4": {"d": e("p4", "d")}}), json!({}));
    write(root, "data/p4", "a file");
    let enotdir = io::Error::from_raw_os_error(libc::ENOTDIR);
    for mode in [
        Contents::Skip,
        Contents::FingerprintMd5,
        Contents::RehashMd5(1),
    ] {
        let err = audit(&RealFs, &layout, &st, mode).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "stat {}: {enotdir}",
                root.join("data/p4/d.parquet").display()
            )
        );
    }
}

/// A call to fail: (path, which call: "lstat", "stat" or "list", crash?).
pub(crate) type Fail = (PathBuf, &'static str, bool);

/// An [`Fs`] that fails chosen calls on chosen paths (also used by heal's tests).
pub(crate) struct Failing {
    pub(crate) fail: Vec<Fail>,
}

impl Failing {
    fn check(&self, path: &Path, call: &str) -> io::Result<()> {
        for (p, c, crash) in &self.fail {
            if p == path && *c == call {
                return Err(if *crash {
                    crate::error::SimulatedCrash::io_error()
                } else {
                    io::Error::from_raw_os_error(libc::EIO)
                });
            }
        }
        Ok(())
    }
}

/// The mutators of a test `Fs` given to the audit, which only reads.
macro_rules! audit_only_reads {
    () => {
        fn create(&self, _: &Path) -> io::Result<Box<dyn crate::fs::FileWrite>> {
            unreachable!("the audit only reads")
        }
        fn open_append(&self, _: &Path) -> io::Result<Box<dyn crate::fs::FileWrite>> {
            unreachable!("the audit only reads")
        }
        fn truncate(&self, _: &Path, _: u64) -> io::Result<()> {
            unreachable!("the audit only reads")
        }
        fn sync_dir(&self, _: &Path) -> io::Result<()> {
            unreachable!("the audit only reads")
        }
        fn sync_fs(&self, _: &Path) -> io::Result<()> {
            unreachable!("the audit only reads")
        }
        fn rename(&self, _: &Path, _: &Path) -> io::Result<()> {
            unreachable!("the audit only reads")
        }
        fn hard_link(&self, _: &Path, _: &Path) -> io::Result<()> {
            unreachable!("the audit only reads")
        }
        fn symlink(&self, _: &Path, _: &Path) -> io::Result<()> {
            unreachable!("the audit only reads")
        }
        fn reflink(&self, _: &Path, _: &Path) -> io::Result<()> {
            unreachable!("the audit only reads")
        }
        fn remove_file(&self, _: &Path) -> io::Result<()> {
            unreachable!("the audit only reads")
        }
        fn create_dir(&self, _: &Path) -> io::Result<()> {
            unreachable!("the audit only reads")
        }
        fn remove_dir(&self, _: &Path) -> io::Result<()> {
            unreachable!("the audit only reads")
        }
        fn set_readonly(&self, _: &Path, _: bool) -> io::Result<()> {
            unreachable!("the audit only reads")
        }
        fn lock(&self, _: &Path, _: bool) -> io::Result<Option<Box<dyn crate::fs::LockGuard>>> {
            unreachable!("the audit only reads")
        }
    };
}

impl Fs for Failing {
    fn symlink_metadata(&self, path: &Path) -> io::Result<Meta> {
        self.check(path, "lstat")?;
        RealFs.symlink_metadata(path)
    }
    fn metadata(&self, path: &Path) -> io::Result<Meta> {
        self.check(path, "stat")?;
        RealFs.metadata(path)
    }
    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        self.check(path, "list")?;
        RealFs.read_dir(path)
    }
    /// ("short stat" / "short lstat" on a folder: its batched `stat` / `lstat`
    /// returns no result at all, an `Fs` that breaks the seam's contract.)
    fn metadata_in(&self, dir: &Path, names: &[&str]) -> Vec<io::Result<Meta>> {
        if self.check(dir, "short stat").is_err() {
            return Vec::new();
        }
        names.iter().map(|n| self.metadata(&dir.join(n))).collect()
    }
    fn symlink_metadata_in(&self, dir: &Path, names: &[&str]) -> Vec<io::Result<Meta>> {
        if self.check(dir, "short lstat").is_err() {
            return Vec::new();
        }
        names
            .iter()
            .map(|n| self.symlink_metadata(&dir.join(n)))
            .collect()
    }
    fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
        RealFs.read_link(path)
    }
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn io::Read + Send>> {
        RealFs.open_read(path)
    }
    audit_only_reads!();
}

/// A simulated crash reaches the caller whatever failed before it (in entry
/// order, or in a listing); other errors: the probes' first, then the listings'.
#[test]
fn a_crash_wins_over_every_other_error() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let layout = Layout::new(root);
    let mut tables = serde_json::Map::new();
    for i in 0..40 {
        let id = format!("t{i:02}");
        let shared = format!("data/_shared/{id}.parquet");
        let rel = format!("data/p/{id}.parquet");
        write(root, &shared, &id);
        symlink(root, &format!("../_shared/{id}.parquet"), &rel);
        tables.insert(
            id.clone(),
            json!({"name": id, "md5": h(&id), "ref_path": rel,
                   "shared_path": shared, "strategy": "symlink"}),
        );
    }
    let st = state(json!({}), json!({"p": tables}), json!({}));
    let p = |rel: &str| root.join(rel);
    let modes = || {
        [
            Contents::Skip,
            Contents::FingerprintMd5,
            Contents::RehashMd5(2),
        ]
    };
    let eio = io::Error::from_raw_os_error(libc::EIO);
    let cases: Vec<(Vec<Fail>, Option<String>)> = vec![
        // An I/O error on a reference (both calls), then a crash on a later
        // shared file (both calls).
        (
            vec![
                (p("data/p/t03.parquet"), "lstat", false),
                (p("data/p/t03.parquet"), "stat", false),
                (p("data/_shared/t30.parquet"), "lstat", true),
                (p("data/_shared/t30.parquet"), "stat", true),
            ],
            None,
        ),
        // An I/O error in a probe, a crash listing data/.
        (
            vec![
                (p("data/p/t03.parquet"), "lstat", false),
                (p("data/p/t03.parquet"), "stat", false),
                (p("data"), "list", true),
            ],
            None,
        ),
        // An I/O error listing data/_shared/ and one stat-ing a shared file: the
        // shared file's.
        (
            vec![
                (p("data/_shared"), "list", false),
                (p("data/_shared/t10.parquet"), "lstat", false),
                (p("data/_shared/t10.parquet"), "stat", false),
            ],
            Some(format!(
                "stat {}: {eio}",
                p("data/_shared/t10.parquet").display()
            )),
        ),
        // Only a listing fails.
        (
            vec![(p("data/p"), "list", false)],
            Some(format!("list {}: {eio}", p("data/p").display())),
        ),
    ];
    for (i, (fail, want)) in cases.into_iter().enumerate() {
        let fs = Failing { fail };
        for mode in modes() {
            let err = audit(&fs, &layout, &st, mode).unwrap_err();
            match &want {
                None => assert!(err.is_crash(), "case {i}: {err}"),
                Some(w) => {
                    assert!(!err.is_crash(), "case {i}: {err}");
                    assert_eq!(&err.to_string(), w, "case {i}");
                }
            }
        }
    }
}

/// A batch that returns fewer results than names is an error for the missing
/// ones, in the second batch (`stat` of the symlinks an `lstat` found) as in the
/// first: a missing second result must not read as "resolves".
#[test]
fn a_short_batch_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let layout = Layout::new(root);
    write(root, "data/_shared/t.parquet", "t");
    symlink(root, "../_shared/t.parquet", "data/p/t.parquet");
    let st = state(
        json!({}),
        json!({"p": {"t": {"name": "t", "md5": h("t"), "ref_path": "data/p/t.parquet",
                           "shared_path": "data/_shared/t.parquet", "strategy": "symlink"}}}),
        json!({}),
    );
    assert_eq!(
        audit(&RealFs, &layout, &st, Contents::FingerprintMd5).unwrap(),
        vec![]
    );
    let fs = Failing {
        fail: vec![(root.join("data/p"), "short stat", false)],
    };
    let err = audit(&fs, &layout, &st, Contents::FingerprintMd5).unwrap_err();
    assert!(
        err.to_string()
            .contains("the filesystem returned no result"),
        "{err}"
    );
}

/// An [`Fs`] that reads through [`RealFs`] and notes every path the audit reaches
/// that is not inside `root` (lexically: `..` taken back).
struct Watching {
    root: PathBuf,
    outside: std::sync::Mutex<Vec<PathBuf>>,
}

impl Watching {
    fn new(root: &Path) -> Watching {
        Watching {
            root: root.to_path_buf(),
            outside: Default::default(),
        }
    }

    fn note(&self, path: &Path) {
        use std::path::Component;
        let mut p = PathBuf::new();
        for c in path.components() {
            match c {
                Component::ParentDir => {
                    p.pop();
                }
                Component::CurDir => {}
                c => p.push(c),
            }
        }
        if !p.starts_with(&self.root) {
            self.outside.lock().unwrap().push(path.to_path_buf());
        }
    }

    fn take(&self) -> Vec<PathBuf> {
        std::mem::take(&mut *self.outside.lock().unwrap())
    }
}

impl Fs for Watching {
    fn symlink_metadata(&self, path: &Path) -> io::Result<Meta> {
        self.note(path);
        RealFs.symlink_metadata(path)
    }
    fn metadata(&self, path: &Path) -> io::Result<Meta> {
        self.note(path);
        RealFs.metadata(path)
    }
    fn metadata_in(&self, dir: &Path, names: &[&str]) -> Vec<io::Result<Meta>> {
        names.iter().map(|n| self.metadata(&dir.join(n))).collect()
    }
    fn symlink_metadata_in(&self, dir: &Path, names: &[&str]) -> Vec<io::Result<Meta>> {
        names
            .iter()
            .map(|n| self.symlink_metadata(&dir.join(n)))
            .collect()
    }
    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        self.note(path);
        RealFs.read_dir(path)
    }
    fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
        self.note(path);
        RealFs.read_link(path)
    }
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn io::Read + Send>> {
        self.note(path);
        RealFs.open_read(path)
    }
    audit_only_reads!();
}

/// A state file edited by hand reaches the audit with its paths unchecked: an
/// entry whose own shared path is absolute (with a reference that is another
/// entry's, which the content check would otherwise probe with it) and a memory
/// domain whose path is outside are each reported as `unsafe_path` where
/// `bad_path` / `missing_domain` would be, in every mode, and nothing outside the
/// directory is stat-ed, listed, read or hashed (through either, the audit could
/// otherwise stat and hash a victim file). A slug, id or name that is not one
/// safe path component never reaches the audit: the state holding it is refused
/// when it is read, naming the value.
#[test]
fn unsafe_entries_are_reported_and_nothing_outside_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("d");
    let root = root.as_path();
    let victim = tmp.path().join("victim.parquet");
    std::fs::write(&victim, "V").unwrap();
    let victim = victim.to_str().unwrap();
    write(root, "data/_shared/ok.parquet", "OK");
    write(root, "data/_direct/ok.parquet", "OK");
    let unsafe_names = [
        (
            json!({"../../../victim": entry(root, "v", &h("V"), "data/_direct/v.parquet",
                                            "data/_shared/../../../victim.parquet", "copy", false)}),
            json!({}),
            json!({}),
            "../../../victim",
        ),
        (
            json!({"t1": entry(root, "../../../victim", &h("V"), "data/_direct/../../../victim.parquet",
                               "data/_shared/t1.parquet", "copy", false)}),
            json!({}),
            json!({}),
            "../../../victim",
        ),
        (
            json!({}),
            json!({"../..": {"t4": {"name": "victim", "md5": h("V"),
                                    "ref_path": "data/../../victim.parquet",
                                    "shared_path": "data/_shared/t4.parquet", "strategy": "copy"}}}),
            json!({}),
            "../..",
        ),
        (
            json!({}),
            json!({}),
            json!({"../x": {"md5": h("# x"), "path": "memory/../x/bundle.md"}}),
            "../x",
        ),
    ];
    for (direct, packages, domains, value) in unsafe_names {
        let text = json!({
            "version": 1,
            "direct_tables": direct,
            "data_packages": packages,
            "memory_domains": domains,
        })
        .to_string();
        let e = crate::model::state::parse_state(text.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{value:?} is not a safe path component")),
            "{text}: {e}"
        );
    }
    let st = state(
        json!({
            "ok": entry(root, "ok", &h("OK"), "data/_direct/ok.parquet",
                        "data/_shared/ok.parquet", "copy", true),
            // Not the engine's paths; its reference is ok's, its shared file the
            // victim (with fingerprints, which the content check compares).
            "t2": {"name": "t2", "md5": h("V"), "ref_path": "data/_direct/ok.parquet",
                   "shared_path": victim, "strategy": "copy",
                   "ref_fp": fp(root, "data/_direct/ok.parquet"),
                   "shared_fp": fp(tmp.path(), "victim.parquet")},
        }),
        json!({}),
        json!({
            "m": {"md5": h("V"), "path": "../victim.parquet"},
        }),
    );
    let fs = Watching::new(root);
    let hash = |p: &Path| {
        fs.note(p);
        hash_file(p)
    };
    let layout = Layout::new(root);
    let entry_row = |path: &str, entry: &str, problem: &str| {
        row(
            2,
            "unsafe_path",
            path,
            format!("state entry of {entry}: {problem}; its files are not checked"),
        )
    };
    let domain_row = |path: &str, slug: &str, problem: &str| {
        row(
            4,
            "unsafe_path",
            path,
            format!("state entry of memory domain {slug:?}: {problem}; its bundle is not checked"),
        )
    };
    let want = vec![
        entry_row(
            "data/_direct/ok.parquet",
            r#"direct table "t2""#,
            &format!("shared_path {victim:?} could lead outside the directory"),
        ),
        domain_row(
            "../victim.parquet",
            "m",
            r#"path "../victim.parquet" could lead outside the directory"#,
        ),
    ];
    for (i, c) in [
        Contents::Skip,
        Contents::FingerprintMd5,
        Contents::Fingerprint(&hash),
        Contents::RehashMd5(1),
        Contents::RehashMd5(3),
        Contents::Rehash(&hash, 2),
    ]
    .into_iter()
    .enumerate()
    {
        let got = rows(audit(&fs, &layout, &st, c).unwrap());
        assert_eq!(fs.take(), Vec::<PathBuf>::new(), "mode {i}: read outside");
        assert_eq!(got, want, "mode {i}");
    }
    // `audit_invariants` (the library API) is the same audit.
    let got = rows(audit_invariants(&root.join("data"), &st));
    assert_eq!(got, want);
}
