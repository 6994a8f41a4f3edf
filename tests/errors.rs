//! What the library hands its caller when things go wrong or half wrong: an error
//! after the commit point keeps what failed (its kind and its source) inside
//! `Error::Unfinished`, and a warning arrives in the report, never on stderr.
//! On `SimFs`, with errors injected by a wrapper.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use md5::{Digest, Md5};
use serde_json::json;
use stack::fs::sim::SimFs;
use stack::fs::{DirEntry, FileWrite, Fs, LockGuard, Meta};
use stack::layout::Layout;
use stack::reconcile::origin::{md5_file, stream_to_part, Fetched, Origin, Request};
use stack::reconcile::pull::{pull, PullConfig, SyncReport, Wanted};
use stack::{BundleCheck, Error, LinkMode};

const ROOT: &str = "/stack";
const BODY: &[u8] = b"a table's bytes\n";

fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Serves [`BODY`] for every URL.
struct OneBody;

impl Origin for OneBody {
    fn resolve(&self, _url: &str) -> Result<(), String> {
        Ok(())
    }
    fn fetch(&self, fs: &dyn Fs, _req: &Request<'_>, part: &Path) -> stack::Result<Fetched> {
        stream_to_part(fs, BODY, part)
    }
}

/// A manifest of one direct table holding [`BODY`].
fn manifest() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "direct_tables": [{
            "id": "tbl_a",
            "name": "a",
            "md5": md5_hex(BODY),
            "parquet_url": "/a",
        }]
    }))
    .unwrap()
}

fn pull_on(fs: Arc<dyn Fs>, link: LinkMode) -> stack::Result<SyncReport> {
    let hasher = fs.clone();
    let hash = move |p: &Path| md5_file(hasher.as_ref(), p);
    let cfg = PullConfig {
        fs,
        layout: Layout::new(ROOT),
        origin: &OneBody,
        link,
        jobs: 1,
        dry_run: false,
        wait: false,
        command: "errors test".to_string(),
        hash: &hash,
        bundles: BundleCheck::Verify,
        progress: &|_| {},
    };
    let bytes = manifest();
    let wanted = Wanted::Raw {
        bytes: (&bytes[..]).into(),
        origin: "errors-test".into(),
    };
    pull(wanted, &cfg)
}

/// [`SimFs`] whose `sync_fs` of the directory itself fails with EIO while armed:
/// the first thing a pull does after applying its steps, past its commit point
/// (staging syncs `.stack/staging` before it, and is let through).
struct FailingSyncFs {
    sim: SimFs,
    fail_sync_fs: AtomicBool,
}

impl Fs for FailingSyncFs {
    fn symlink_metadata(&self, path: &Path) -> io::Result<Meta> {
        self.sim.symlink_metadata(path)
    }
    fn metadata(&self, path: &Path) -> io::Result<Meta> {
        self.sim.metadata(path)
    }
    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        self.sim.read_dir(path)
    }
    fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
        self.sim.read_link(path)
    }
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn Read + Send>> {
        self.sim.open_read(path)
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn FileWrite>> {
        self.sim.create(path)
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn FileWrite>> {
        self.sim.open_append(path)
    }
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        self.sim.truncate(path, len)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.sim.sync_dir(path)
    }
    fn sync_fs(&self, path: &Path) -> io::Result<()> {
        if self.fail_sync_fs.load(Ordering::SeqCst) && path == Path::new(ROOT) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.sim.sync_fs(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.sim.rename(from, to)
    }
    fn hard_link(&self, original: &Path, link: &Path) -> io::Result<()> {
        self.sim.hard_link(original, link)
    }
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        self.sim.symlink(target, link)
    }
    fn reflink(&self, src: &Path, dst: &Path) -> io::Result<()> {
        self.sim.reflink(src, dst)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.sim.remove_file(path)
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.sim.create_dir(path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.sim.remove_dir(path)
    }
    fn set_readonly(&self, path: &Path, readonly: bool) -> io::Result<()> {
        self.sim.set_readonly(path, readonly)
    }
    fn lock(&self, path: &Path, wait: bool) -> io::Result<Option<Box<dyn LockGuard>>> {
        self.sim.lock(path, wait)
    }
}

/// An I/O error after the commit point reaches the caller as `Unfinished`, whose
/// source is the `Io` error with its path, whose source is the `io::Error` with
/// its kind and OS code: nothing is flattened into text on the way.
#[test]
fn an_io_error_after_the_commit_point_keeps_its_kind_and_source() {
    let fs = Arc::new(FailingSyncFs {
        sim: SimFs::new(),
        fail_sync_fs: AtomicBool::new(true),
    });
    let err = pull_on(fs.clone(), LinkMode::Copy).expect_err("sync_fs fails");
    assert_eq!(err.exit_code(), 1, "{err}");
    assert_eq!(err.kind(), "unfinished", "{err}");
    let Error::Unfinished { txn, source } = &err else {
        panic!("not Unfinished: {err:?}");
    };
    assert_eq!(*txn, 1);
    let Error::Io { op, path, .. } = source.as_ref() else {
        panic!("the cause is not the I/O error: {source:?}");
    };
    assert_eq!((*op, path.as_path()), ("syncfs", Path::new(ROOT)));
    // Through the standard source chain, as a caller that knows only
    // `std::error::Error` walks it.
    let io = std::error::Error::source(&err)
        .and_then(std::error::Error::source)
        .and_then(|e| e.downcast_ref::<io::Error>())
        .expect("the chain ends in the io::Error");
    assert_eq!(io.raw_os_error(), Some(libc::EIO));
    assert_eq!(io.kind(), io::Error::from_raw_os_error(libc::EIO).kind());
    assert!(err.to_string().contains("stack journal replay"), "{err}");

    // The next pull finishes the transaction (the journal held all of it).
    fs.fail_sync_fs.store(false, Ordering::SeqCst);
    let rep = pull_on(fs, LinkMode::Copy).expect("the next pull recovers");
    assert!(
        rep.recovered
            .iter()
            .any(|n| n.contains("rolled transaction 1 forward")),
        "{rep:?}"
    );
}

/// The child half of [`a_warning_arrives_in_the_report_not_on_stderr`]: a reflink
/// pull on a filesystem without reflinks copies instead and says so in the report.
fn reflink_pull_in_child() {
    let rep = pull_on(Arc::new(SimFs::new()), LinkMode::Reflink).expect("the pull copies");
    assert!(
        rep.warnings
            .iter()
            .any(|w| w.contains("reflink refused") && w.contains("copying instead")),
        "{rep:?}"
    );
    let json = serde_json::to_value(&rep).unwrap();
    assert_eq!(json["warnings"], json!(rep.warnings));
    println!("child: {} warning(s) in the report", rep.warnings.len());
}

/// A warning is in the report (and its JSON), and the library writes nothing to
/// stderr: the pull runs in a child process (this test binary again) whose stderr
/// is read whole.
#[test]
fn a_warning_arrives_in_the_report_not_on_stderr() {
    const CHILD: &str = "STACK_ERRORS_TEST_CHILD";
    let name = "a_warning_arrives_in_the_report_not_on_stderr";
    if std::env::var_os(CHILD).is_some() {
        reflink_pull_in_child();
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("child: 1 warning(s) in the report"),
        "the child did not run the pull:\n{stdout}"
    );
    assert!(
        !stderr.contains("refused") && !stderr.contains("stack:"),
        "the library printed:\n{stderr}"
    );
}
