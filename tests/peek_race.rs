//! The state file replaced between a pull's peek and its lock.
//!
//! A pull reads `sync_state.json` before taking the directory lock, only to decide
//! whether the manifest must be parsed (the no-op key, `DURABILITY.md`). If the file
//! is replaced before the lock is held (another command committed meanwhile), the
//! pull must not trust what it peeked: it re-reads the state under the lock and, if
//! that no longer vouches for the manifest, parses and validates it then — and a
//! manifest that fails validation then still changes nothing. A filesystem wrapper
//! replaces the state file from inside `Fs::lock`, exactly between the two reads.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use md5::Digest;
use serde_json::{json, Value};
use stack::fs::sim::SimFs;
use stack::fs::{DirEntry, FileWrite, Fs, LockGuard, Meta};
use stack::layout::Layout;
use stack::reconcile::origin::{md5_file, stream_to_part, Fetched, Origin, Request};
use stack::reconcile::pull::{pull, PullConfig, SyncReport, Wanted};
use stack::{BundleCheck, LinkMode};

const ROOT: &str = "/stack";
const BYTES: &[u8] = b"one table\n";

/// `SimFs`, except that taking the directory lock first rewrites the state file
/// (a new file renamed over it) with `edit` applied, when `armed`; and it counts
/// the state file's reads.
struct Racing {
    inner: SimFs,
    armed: std::sync::atomic::AtomicBool,
    edit: fn(&mut Value),
    state_reads: std::sync::atomic::AtomicUsize,
}

impl Racing {
    fn replace_state(&self) -> io::Result<()> {
        let layout = Layout::new(ROOT);
        let path = layout.state_file();
        let mut v: Value =
            serde_json::from_slice(&self.inner.read(&path)?).map_err(io::Error::other)?;
        (self.edit)(&mut v);
        let tmp = layout.private().join("state.race");
        let mut f = self.inner.create(&tmp)?;
        f.write_all(&serde_json::to_vec(&v).map_err(io::Error::other)?)?;
        drop(f);
        self.inner.rename(&tmp, &path)
    }
}

impl Fs for Racing {
    fn symlink_metadata(&self, path: &Path) -> io::Result<Meta> {
        self.inner.symlink_metadata(path)
    }
    fn metadata(&self, path: &Path) -> io::Result<Meta> {
        self.inner.metadata(path)
    }
    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        self.inner.read_dir(path)
    }
    fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
        self.inner.read_link(path)
    }
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn Read + Send>> {
        if path == Layout::new(ROOT).state_file() {
            self.state_reads
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.inner.open_read(path)
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn FileWrite>> {
        self.inner.create(path)
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn FileWrite>> {
        self.inner.open_append(path)
    }
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        self.inner.truncate(path, len)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.inner.sync_dir(path)
    }
    fn sync_fs(&self, path: &Path) -> io::Result<()> {
        self.inner.sync_fs(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn hard_link(&self, original: &Path, link: &Path) -> io::Result<()> {
        self.inner.hard_link(original, link)
    }
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        self.inner.symlink(target, link)
    }
    fn reflink(&self, src: &Path, dst: &Path) -> io::Result<()> {
        self.inner.reflink(src, dst)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_file(path)
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.inner.create_dir(path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_dir(path)
    }
    fn set_readonly(&self, path: &Path, readonly: bool) -> io::Result<()> {
        self.inner.set_readonly(path, readonly)
    }
    fn lock(&self, path: &Path, wait: bool) -> io::Result<Option<Box<dyn LockGuard>>> {
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.replace_state()?;
        }
        self.inner.lock(path, wait)
    }
}

struct O;
impl Origin for O {
    fn resolve(&self, _: &str) -> Result<(), String> {
        Ok(())
    }
    fn fetch(&self, fs: &dyn Fs, _: &Request<'_>, part: &Path) -> stack::Result<Fetched> {
        stream_to_part(fs, BYTES, part)
    }
}

fn manifest(id: &str) -> Vec<u8> {
    let md5 = format!("{:x}", md5::Md5::digest(BYTES));
    serde_json::to_vec(
        &json!({"direct_tables": [{"id": id, "name": "n1", "md5": md5,
        "query_mode": "local", "parquet_url": "/api/data/t1/download"}],
        "data_packages": [], "memory_domains": []}),
    )
    .unwrap()
}

fn pull_on(fs: &Arc<Racing>, bytes: &[u8]) -> stack::Result<SyncReport> {
    let sim = fs.inner.clone();
    let hash = move |p: &Path| md5_file(&sim, p);
    let cfg = PullConfig {
        fs: fs.clone(),
        layout: Layout::new(ROOT),
        origin: &O,
        link: LinkMode::Symlink,
        jobs: 1,
        dry_run: false,
        wait: false,
        command: "t".into(),
        hash: &hash,
        bundles: BundleCheck::Verify,
        progress: &|_| {},
    };
    pull(
        Wanted::Raw {
            bytes: bytes.into(),
            origin: "t".into(),
        },
        &cfg,
    )
}

/// Everything under the directory but the lock file and the state file (which the
/// race itself rewrites), with contents.
fn tree(fs: &SimFs) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::from(ROOT)];
    while let Some(dir) = todo.pop() {
        for e in fs.read_dir(&dir).unwrap() {
            let p = dir.join(&e.name);
            if e.kind == stack::fs::Kind::Dir {
                todo.push(p.clone());
            }
            let bytes = fs.read(&p).unwrap_or_default();
            let name = p.to_string_lossy().into_owned();
            if !name.ends_with("/lock") && !name.ends_with("sync_state.json") {
                out.push((name, bytes));
            }
        }
    }
    out.sort();
    out
}

fn racing(edit: fn(&mut Value)) -> Arc<Racing> {
    Arc::new(Racing {
        inner: SimFs::new(),
        armed: false.into(),
        edit,
        state_reads: 0.into(),
    })
}

/// The state file, replaced by one without the no-op key, no longer vouches for
/// the manifest: the pull parses, validates and plans it under the lock, finds
/// nothing to do and commits nothing.
#[test]
fn a_state_replaced_after_the_peek_is_read_again_under_the_lock() {
    let fs = racing(|v| {
        v["journal"].as_object_mut().unwrap().remove("pulled");
    });
    let m = manifest("t1");
    let first = pull_on(&fs, &m).unwrap();
    let before = tree(&fs.inner);
    fs.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let reads = fs.state_reads.load(std::sync::atomic::Ordering::SeqCst);
    let again = pull_on(&fs, &m).unwrap();
    assert!(
        !fs.armed.load(std::sync::atomic::Ordering::SeqCst),
        "the race ran"
    );
    // The peek and the read under the lock. (The report alone cannot tell: the
    // peeked state would have said "unchanged" too.)
    assert_eq!(
        fs.state_reads.load(std::sync::atomic::Ordering::SeqCst) - reads,
        2,
        "the state file is read again under the lock"
    );
    assert_eq!(again.txn, first.txn, "nothing committed");
    assert_eq!(again.direct_tables.unchanged, 1, "{again:?}");
    assert_eq!(
        tree(&fs.inner),
        before,
        "nothing but the state file changed"
    );
}

/// A manifest that does not validate, whose key the peeked state file vouched for
/// (forged), and a state replaced before the lock: it is validated under the lock
/// and refused (exit 2) before anything but the lock file is touched.
#[test]
fn a_manifest_validated_late_is_still_refused_before_anything_changes() {
    let fs = racing(|v| {
        v["journal"].as_object_mut().unwrap().remove("pulled");
    });
    pull_on(&fs, &manifest("t1")).unwrap();
    let bad = manifest("../t1");
    let (key, _) = Wanted::Raw {
        bytes: (&bad[..]).into(),
        origin: "t".into(),
    }
    .key(LinkMode::Symlink)
    .unwrap();
    // Forge the key into the state file, as if `bad` had been pulled.
    let layout = Layout::new(ROOT);
    let mut v: Value =
        serde_json::from_slice(&fs.inner.read(&layout.state_file()).unwrap()).unwrap();
    v["journal"]["pulled"]["key"] = json!(key);
    let mut f = fs.inner.create(&layout.state_file()).unwrap();
    f.write_all(&serde_json::to_vec(&v).unwrap()).unwrap();
    drop(f);
    let before = tree(&fs.inner);
    fs.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let err = pull_on(&fs, &bad).unwrap_err();
    assert!(
        !fs.armed.load(std::sync::atomic::Ordering::SeqCst),
        "the race ran"
    );
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(
        err.to_string().contains("../t1"),
        "names the offending id: {err}"
    );
    assert_eq!(
        tree(&fs.inner),
        before,
        "nothing but the state file changed"
    );
}
