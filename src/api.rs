//! The library API beyond contract §6's `run_stack_sync`: what the command line
//! does, callable in-process (the Python package, `python/`, is built on it).
//!
//! Owns: pulling from a manifest named by a path or URL, status, verify and
//! journal replay of a directory, and interruption. Invariant kept: an interrupt
//! stops a pull only before its commit point (at the next file it would fetch or
//! hash), which then fails as any fetch failure does, with nothing visible
//! changed; past its commit point a pull runs to its end (no network, and
//! idempotent), so an interrupted pull leaves the old stack or the new one, as a
//! SIGINT of the command line does once recovered.

use std::borrow::Cow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::fs::{Fs, RealFs};
use crate::journal::event::LinkMode;
use crate::layout::Layout;
use crate::reconcile::origin::{Fetched, Origin, Request};
use crate::reconcile::pull::{PullConfig, SyncReport, Wanted};
use crate::verify::{audit, Contents, Violation};

/// The message of the error an interrupted pull fails with.
pub const INTERRUPTED: &str = "interrupted";

/// A flag another thread raises to stop a pull before its commit point.
#[derive(Debug, Clone, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    pub fn new() -> Interrupt {
        Interrupt::default()
    }
    /// Ask the pull to stop.
    pub fn raise(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// `Err` (a fetch failure of `what`) once raised.
    pub fn check(&self, what: &str) -> Result<()> {
        if self.is_raised() {
            return Err(Error::Fetch {
                what: what.to_string(),
                message: INTERRUPTED.to_string(),
                source: None,
            });
        }
        Ok(())
    }
}

/// An origin that stops fetching once `interrupt` is raised.
pub struct Interruptible<'a> {
    pub inner: &'a dyn Origin,
    pub interrupt: &'a Interrupt,
}

impl Origin for Interruptible<'_> {
    fn resolve(&self, url: &str) -> std::result::Result<(), String> {
        self.inner.resolve(url)
    }
    fn fetch(&self, fs: &dyn Fs, req: &Request<'_>, part: &Path) -> Result<Fetched> {
        self.interrupt.check(&req.item.describe())?;
        self.inner.fetch(fs, req, part)
    }
    fn resumes(&self) -> bool {
        self.inner.resumes()
    }
    fn read_small(&self, req: &Request<'_>) -> Option<Result<Vec<u8>>> {
        if let Err(e) = self.interrupt.check(&req.item.describe()) {
            return Some(Err(e));
        }
        self.inner.read_small(req)
    }
}

/// A hash function that fails once `interrupt` is raised (a pull hashes the
/// files whose fingerprint changed before it stages anything).
pub fn interruptible_hash<'a>(
    hash: &'a (dyn Fn(&Path) -> std::io::Result<String> + Sync),
    interrupt: &'a Interrupt,
) -> impl Fn(&Path) -> std::io::Result<String> + Sync + 'a {
    move |p| {
        if interrupt.is_raised() {
            return Err(std::io::Error::other(INTERRUPTED));
        }
        hash(p)
    }
}

/// How [`pull_from`] runs (the command line's options of `stack pull`).
#[derive(Debug, Clone)]
pub struct PullFrom<'a> {
    /// `--manifest`: a path (its folder is the origin) or an http(s) URL.
    pub manifest: &'a str,
    pub local_dir: &'a Path,
    pub link: LinkMode,
    pub jobs: usize,
    /// Wait for the directory lock instead of failing.
    pub wait: bool,
    /// Say what would change; change nothing (`stack status`).
    pub dry_run: bool,
    /// How bundle md5s are checked (the command line verifies them).
    pub bundles: crate::reconcile::stage::BundleCheck,
    /// Stops the pull before its commit point once raised.
    pub interrupt: Option<&'a Interrupt>,
}

/// Pull the manifest at `p.manifest` into `p.local_dir`, exactly as
/// `stack pull --manifest` does (or `stack status` with `dry_run`).
pub fn pull_from(p: &PullFrom<'_>) -> Result<SyncReport> {
    let (manifest, origin) = crate::reconcile::source::open_manifest(p.manifest)?;
    let fs: Arc<dyn Fs> = Arc::new(RealFs);
    let never = Interrupt::new();
    let interrupt = p.interrupt.unwrap_or(&never);
    let plain = crate::reconcile::pull::default_hash(fs.as_ref());
    let hash = interruptible_hash(&plain, interrupt);
    let origin = Interruptible {
        inner: origin.as_ref(),
        interrupt,
    };
    let run = |wanted: Wanted<'_>, wait: bool| {
        let cfg = PullConfig {
            fs: fs.clone(),
            layout: Layout::new(p.local_dir),
            origin: &origin,
            link: p.link,
            jobs: p.jobs.max(1),
            dry_run: p.dry_run,
            wait,
            command: format!("stack pull --manifest {}", p.manifest),
            hash: &hash,
            bundles: p.bundles,
            progress: &|_| {},
        };
        crate::reconcile::pull::pull(wanted, &cfg)
    };
    match p.interrupt {
        Some(interrupt) if p.wait => polling_lock(interrupt, || {
            let wanted = Wanted::Raw {
                bytes: Cow::Borrowed(&manifest.bytes),
                origin: Cow::Borrowed(&manifest.origin),
            };
            run(wanted, false)
        }),
        // Owned: the pull drops the manifest's bytes once parsed.
        _ => run(manifest.into_wanted(), p.wait),
    }
}

/// Run `f` until the directory is not locked, polling, so that an interrupt is
/// seen while waiting for the lock (a blocking wait would not see it).
pub(crate) fn polling_lock<T>(
    interrupt: &Interrupt,
    mut f: impl FnMut() -> Result<T>,
) -> Result<T> {
    // Each try validates the manifest again: the pause grows (to half a second)
    // so that a long wait with a large manifest does not keep a core busy.
    let mut pause = std::time::Duration::from_millis(25);
    loop {
        match f() {
            Err(Error::Locked { .. }) => {
                interrupt.check("waiting for the directory lock")?;
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(500));
            }
            r => return r,
        }
    }
}

/// What [`verify_dir`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    /// Invariants 1-5 broken (empty when all hold).
    pub violations: Vec<Violation>,
    /// Why the journal's projection was audited instead of the state file, if it was.
    pub notes: Vec<String>,
}

/// `stack verify`: check invariants 1-5 of `dir` against its state file (or,
/// if that is unreadable or projected for another place, against the journal's
/// projection); `contents` re-hashes every reference. Reads only.
pub fn verify_dir(dir: &Path, contents: bool) -> Result<Verified> {
    if !dir.is_dir() {
        return Err(Error::Usage(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    let fs = RealFs;
    let layout = Layout::new(dir);
    let mut notes = Vec::new();
    let mut refused = None;
    let from_file = match crate::replay::state::read_state(&fs, &layout) {
        Ok(s) => s,
        Err(Error::State { message, .. }) => {
            notes.push(format!(
                "sync_state.json: {message}; checking the journal's projection instead"
            ));
            refused = refused_state(&fs, &layout);
            None
        }
        Err(e) => return Err(e),
    };
    let state = match from_file {
        Some(s) => {
            refused = refused.or(corrupt_journal(&fs, &layout)?);
            s
        }
        None => {
            let records = match crate::journal::scan_file(&fs, &layout)? {
                Some(scan) => {
                    // The valid prefix before a torn tail is audited; a corrupt
                    // journal (a record stack never writes included: its names or
                    // paths could send the audit outside `dir`) is exit 4.
                    crate::replay::project::check_journal(&layout, &scan)?;
                    scan.records.into_iter().map(|(_, r)| r).collect()
                }
                None => Vec::new(),
            };
            crate::replay::project::project(&records).state
        }
    };
    let mode = if contents {
        Contents::RehashMd5(crate::par::threads())
    } else {
        Contents::FingerprintMd5
    };
    let mut violations = audit(&fs, &layout, &state, mode)?;
    violations.extend(refused);
    Ok(Verified { violations, notes })
}

/// The journal as a violation, if it is corrupt, when the audit reads the state
/// file: the stack may look whole, but the journal is what the next command folds
/// and what recovery needs (invariant 6), and every mutating command refuses it
/// (exit 4) until it is repaired. A torn tail is not corruption: the next writer
/// cuts it.
fn corrupt_journal(fs: &dyn Fs, layout: &Layout) -> Result<Option<Violation>> {
    let Some(scan) = crate::journal::scan_file(fs, layout)? else {
        return Ok(None);
    };
    match crate::replay::project::check_journal(layout, &scan) {
        Ok(()) => Ok(None),
        Err(e @ Error::JournalCorrupt { .. }) => Ok(Some(Violation {
            invariant: 6,
            kind: "journal_corrupt",
            path: layout.rel(&layout.journal()),
            message: e.to_string(),
        })),
        Err(e) => Err(e),
    }
}

/// The state file as a violation, if it is JSON that holds what stack never
/// writes (an id, name or slug that is not one safe path component, an md5 that
/// is not one, a field of another type: a hand edit, which could point the
/// engine outside the directory): it is refused when it is read, naming the value
/// and its place, and `verify` reports it (exit 4) beside the audit of the
/// journal's projection. A file that is not JSON at all is only a note.
fn refused_state(fs: &dyn Fs, layout: &Layout) -> Option<Violation> {
    let bytes = fs.read(&layout.state_file()).ok()?;
    match crate::replay::state::parse_state(&bytes) {
        Err(e) if e.classify() == serde_json::error::Category::Data => Some(Violation {
            invariant: 3,
            kind: "unsafe_state",
            path: crate::layout::STATE_FILE.to_string(),
            message: format!("{e}: not a state stack writes; its entries are not checked"),
        }),
        _ => None,
    }
}

/// What [`journal_replay`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replayed {
    /// One line per thing recovery did (empty if nothing was needed).
    pub notes: Vec<String>,
    /// What recovery could not do but survived (a link fallback, leftovers not
    /// cleaned).
    pub warnings: Vec<String>,
    /// The transaction the directory is at.
    pub txn: u64,
}

/// `stack journal replay`: take the lock (`command` is written into it), finish
/// or roll back an interrupted pull, rebuild `sync_state.json`.
pub fn journal_replay(dir: &Path, wait: bool, command: &str) -> Result<Replayed> {
    let layout = Layout::new(dir);
    let fs: Arc<dyn Fs> = Arc::new(RealFs);
    let _lock = crate::journal::lock::acquire(fs.as_ref(), &layout, command, wait)?;
    let rec = crate::reconcile::recover::replay(fs, &layout)?;
    Ok(Replayed {
        notes: rec.notes,
        warnings: rec.warnings,
        txn: rec.state.journal.txn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An origin folder with one direct table and its manifest; returns the
    /// manifest's path.
    #[allow(clippy::disallowed_methods)] // the fixture writes the origin directly
    fn origin(dir: &Path) -> String {
        use md5::Digest;
        let body = b"table a\n";
        std::fs::create_dir_all(dir.join("api/data/tbl_a")).unwrap();
        std::fs::write(dir.join("api/data/tbl_a/download"), body).unwrap();
        let md5 = crate::reconcile::origin::hex(&md5::Md5::digest(body));
        let manifest = serde_json::json!({"direct_tables": [{"id": "tbl_a", "name": "a",
            "md5": md5, "parquet_url": "/api/data/tbl_a/download"}]});
        let path = dir.join("manifest.json");
        std::fs::write(&path, manifest.to_string()).unwrap();
        path.to_str().unwrap().to_string()
    }

    /// A raised interrupt stops a pull before its commit point: it fails as a
    /// fetch does, and nothing visible is made; the next pull runs.
    #[test]
    fn an_interrupted_pull_changes_nothing_visible() {
        let tmp = tempfile::tempdir().unwrap();
        let manifest = origin(&tmp.path().join("origin"));
        let dir = tmp.path().join("stack");
        let interrupt = Interrupt::new();
        interrupt.raise();
        let mut p = PullFrom {
            manifest: &manifest,
            local_dir: &dir,
            link: LinkMode::Symlink,
            jobs: 2,
            wait: true,
            dry_run: false,
            bundles: crate::reconcile::stage::BundleCheck::Verify,
            interrupt: Some(&interrupt),
        };
        let err = pull_from(&p).unwrap_err();
        assert!(
            matches!(&err, Error::Fetch { message, .. } if message == INTERRUPTED),
            "{err}"
        );
        for visible in ["data", "memory", "sync_state.json"] {
            assert!(!dir.join(visible).exists(), "{visible} was made");
        }
        p.interrupt = None;
        let rep = pull_from(&p).unwrap();
        assert_eq!(rep.direct_tables.added, 1);
        assert!(dir.join("data/_direct/a.parquet").exists());
    }
}
