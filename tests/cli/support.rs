//! Helpers for the black-box CLI tests: origins built in tempdirs, running the real
//! binary, whole-tree snapshots.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use md5::{Digest, Md5};
use serde_json::{json, Value};

pub fn md5_hex(b: &[u8]) -> String {
    Md5::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// One table of an origin: (id, name, package slug or None for direct, bytes).
#[derive(Clone, Debug)]
pub struct T {
    pub id: &'static str,
    pub name: &'static str,
    pub package: Option<&'static str>,
    pub bytes: Vec<u8>,
}

pub fn t(id: &'static str, name: &'static str, package: Option<&'static str>, bytes: &[u8]) -> T {
    T {
        id,
        name,
        package,
        bytes: bytes.to_vec(),
    }
}

/// A local origin folder: files under `api/` and a manifest beside them.
pub struct Origin {
    pub dir: tempfile::TempDir,
}

impl Origin {
    /// Build an origin holding `tables` and `domains` (slug, bundle bytes) and write
    /// `manifest.json` for them.
    pub fn new(tables: &[T], domains: &[(&str, &[u8])]) -> Origin {
        let o = Origin {
            dir: tempfile::tempdir().unwrap(),
        };
        o.write(tables, domains, "manifest.json");
        o
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Write the files of `tables`/`domains` (at md5-keyed URLs, so several versions
    /// can live side by side) and a manifest named `file`; returns its path.
    pub fn write(&self, tables: &[T], domains: &[(&str, &[u8])], file: &str) -> PathBuf {
        let m = self.manifest_value(tables, domains);
        for t in tables {
            let rel = table_url(t);
            let p = self.root().join(&rel[1..]);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, &t.bytes).unwrap();
        }
        for (slug, bytes) in domains {
            let rel = bundle_url(slug, bytes);
            let p = self.root().join(&rel[1..]);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, bytes).unwrap();
        }
        self.write_manifest(&m, file)
    }

    /// The manifest JSON for `tables`/`domains` (no files written).
    pub fn manifest_value(&self, tables: &[T], domains: &[(&str, &[u8])]) -> Value {
        let table = |t: &T| {
            json!({"id": t.id, "name": t.name, "md5": md5_hex(&t.bytes), "query_mode": "local",
                   "parquet_url": table_url(t), "size": t.bytes.len()})
        };
        let direct: Vec<Value> = tables
            .iter()
            .filter(|t| t.package.is_none())
            .map(table)
            .collect();
        let mut slugs: Vec<&str> = Vec::new();
        for t in tables {
            if let Some(p) = t.package {
                if !slugs.contains(&p) {
                    slugs.push(p);
                }
            }
        }
        let packages: Vec<Value> = slugs
            .iter()
            .map(|s| {
                let ts: Vec<Value> = tables
                    .iter()
                    .filter(|t| t.package == Some(s))
                    .map(table)
                    .collect();
                json!({"id": format!("id_{s}"), "slug": s, "name": s.to_uppercase(), "tables": ts})
            })
            .collect();
        let doms: Vec<Value> = domains
            .iter()
            .map(|(slug, b)| json!({"slug": slug, "md5": md5_hex(b), "bundle_url": bundle_url(slug, b)}))
            .collect();
        json!({"direct_tables": direct, "data_packages": packages, "memory_domains": doms})
    }

    pub fn write_manifest(&self, m: &Value, file: &str) -> PathBuf {
        let p = self.root().join(file);
        std::fs::write(&p, serde_json::to_vec_pretty(m).unwrap()).unwrap();
        p
    }

    pub fn manifest(&self) -> PathBuf {
        self.root().join("manifest.json")
    }
}

pub fn table_url(t: &T) -> String {
    format!("/api/data/{}/{}/download", t.id, md5_hex(&t.bytes))
}

pub fn bundle_url(slug: &str, b: &[u8]) -> String {
    format!("/api/memory/{slug}/{}/bundle.md", md5_hex(b))
}

/// The standard small stack: two packages sharing a table, a direct table that is
/// also in a package, a table used once, and one memory domain.
pub fn base_tables() -> Vec<T> {
    vec![
        t("tbl_a", "a", None, b"table a, version 1\n"),
        t("tbl_a", "alpha", Some("p1"), b"table a, version 1\n"),
        t(
            "tbl_b",
            "b",
            Some("p1"),
            b"table b, version 1 -- a bit longer\n",
        ),
        t("tbl_a", "a", Some("p2"), b"table a, version 1\n"),
        t("tbl_c", "c", Some("p2"), b"table c\n"),
    ]
}

pub fn base_domains() -> Vec<(&'static str, &'static [u8])> {
    vec![("finance", b"# finance\nbundle v1\n" as &[u8])]
}

pub fn base_origin() -> Origin {
    Origin::new(&base_tables(), &base_domains())
}

/// Result of one run of the binary.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        let lines: Vec<&str> = self
            .stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(lines.len(), 1, "expected one JSON line on stdout: {self:?}");
        serde_json::from_str(lines[0])
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "command failed: {self:?}");
        self
    }

    #[track_caller]
    pub fn code(&self, code: i32) -> &Self {
        assert_eq!(self.code, code, "unexpected exit code: {self:?}");
        self
    }

    /// Check the contract's JSON error shape and return the error's message.
    #[track_caller]
    pub fn json_error(&self, code: i32) -> String {
        self.code(code);
        let v = self.json();
        let obj = v.as_object().expect("an object");
        assert_eq!(obj.len(), 2, "error object has exactly ok + error: {v}");
        assert_eq!(v["ok"], json!(false), "{v}");
        let e = v["error"].as_object().expect("error is an object");
        assert_eq!(e["exit_code"], json!(code), "{v}");
        assert!(e["kind"].as_str().is_some_and(|k| !k.is_empty()), "{v}");
        let msg = e["message"]
            .as_str()
            .expect("message is a string")
            .to_string();
        assert!(!msg.is_empty());
        assert!(
            self.stderr.contains(&msg),
            "the message is on stderr too: {self:?}"
        );
        msg
    }
}

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stack"));
    c.env_remove("STACK_DIR");
    c
}

pub fn output(mut c: Command) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = c.output().expect("run stack");
    Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Run `stack <args...>`.
pub fn stack<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    let mut c = bin();
    c.args(args);
    output(c)
}

pub fn pull(manifest: &Path, dir: &Path, extra: &[&str]) -> Run {
    let mut c = bin();
    c.arg("pull")
        .arg("--manifest")
        .arg(manifest)
        .arg("--dir")
        .arg(dir)
        .args(extra);
    output(c)
}

pub fn verify(dir: &Path, contents: bool) -> Run {
    let mut c = bin();
    c.arg("verify").arg("--dir").arg(dir).arg("--json");
    if contents {
        c.arg("--contents");
    }
    output(c)
}

#[track_caller]
pub fn assert_verify_clean(dir: &Path) {
    let r = verify(dir, true);
    assert_eq!(r.code, 0, "verify --contents: {r:?}");
    assert_eq!(r.json()["violations"], json!([]));
}

/// A fresh local dir inside a tempdir (the dir itself does not exist yet).
pub struct Local {
    pub tmp: tempfile::TempDir,
}

impl Local {
    pub fn new() -> Local {
        Local {
            tmp: tempfile::tempdir().unwrap(),
        }
    }
    pub fn dir(&self) -> PathBuf {
        self.tmp.path().join("stack")
    }
}

/// Pull the base origin into a fresh dir with `link`.
pub fn pulled(link: &str) -> (Origin, Local) {
    let o = base_origin();
    let l = Local::new();
    pull(&o.manifest(), &l.dir(), &["--link", link, "--json"]).ok();
    (o, l)
}

/// One node of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, bytes: Vec<u8> },
    Symlink { target: PathBuf },
}

pub type Snapshot = BTreeMap<PathBuf, Node>;

/// Every path under `root` (relative), with file bytes, symlink targets and modes.
pub fn snapshot(root: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    if std::fs::symlink_metadata(root).is_ok() {
        walk(root, Path::new(""), &mut out);
    }
    out
}

fn walk(root: &Path, rel: &Path, out: &mut Snapshot) {
    let path = root.join(rel);
    let md = std::fs::symlink_metadata(&path).unwrap();
    let mode = md.permissions().mode() & 0o7777;
    let ft = md.file_type();
    if ft.is_symlink() {
        out.insert(
            rel.to_path_buf(),
            Node::Symlink {
                target: std::fs::read_link(&path).unwrap(),
            },
        );
    } else if ft.is_dir() {
        out.insert(rel.to_path_buf(), Node::Dir { mode });
        let mut names: Vec<_> = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            walk(root, &rel.join(n), out);
        }
    } else {
        out.insert(
            rel.to_path_buf(),
            Node::File {
                mode,
                bytes: std::fs::read(&path).unwrap(),
            },
        );
    }
}

/// The snapshot without anything under `.stack/`.
pub fn visible(s: &Snapshot) -> Snapshot {
    s.iter()
        .filter(|(p, _)| !p.starts_with(".stack"))
        .map(|(p, n)| (p.clone(), n.clone()))
        .collect()
}

/// Assert two snapshots are equal, printing only the differing paths.
#[track_caller]
pub fn assert_same(before: &Snapshot, after: &Snapshot, what: &str) {
    if before == after {
        return;
    }
    let mut diff = Vec::new();
    for (p, n) in before {
        match after.get(p) {
            None => diff.push(format!("removed {}", p.display())),
            Some(m) if m != n => diff.push(format!("changed {}", p.display())),
            _ => {}
        }
    }
    for p in after.keys() {
        if !before.contains_key(p) {
            diff.push(format!("added {}", p.display()));
        }
    }
    panic!("{what}: the tree changed: {diff:#?}");
}

pub fn state(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("sync_state.json")).unwrap()).unwrap()
}

/// Every state entry: (slot, id, entry) with slot "_direct" or the package slug.
pub fn entries(dir: &Path) -> Vec<(String, String, Value)> {
    let s = state(dir);
    let mut out = Vec::new();
    for (id, e) in s["direct_tables"].as_object().unwrap() {
        out.push(("_direct".to_string(), id.clone(), e.clone()));
    }
    for (slug, p) in s["data_packages"].as_object().unwrap() {
        for (id, e) in p.as_object().unwrap() {
            out.push((slug.clone(), id.clone(), e.clone()));
        }
    }
    out
}

/// Make a file writable (shared files are 0444) and overwrite it.
pub fn force_write(p: &Path, bytes: &[u8]) {
    let md = std::fs::metadata(p).unwrap();
    let mut perm = md.permissions();
    perm.set_mode(0o644);
    std::fs::set_permissions(p, perm).unwrap();
    std::fs::write(p, bytes).unwrap();
}

pub fn counts(v: &Value, section: &str) -> [u64; 5] {
    let c = &v[section];
    ["added", "updated", "removed", "unchanged", "skipped"].map(|k| {
        c[k].as_u64()
            .unwrap_or_else(|| panic!("{section}.{k} in {v}"))
    })
}
