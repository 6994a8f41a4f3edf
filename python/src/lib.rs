//! `stack_sync._native`: the engine in-process for Python (contract §7), over the
//! library crate's API; `python/python/stack_sync/` re-exports it.
//!
//! Owns: the Python face of the engine (options, reports, exceptions), and how a
//! pull runs beside the interpreter. Invariants kept: the engine runs with the
//! interpreter released (other Python threads run), on a thread of its own while
//! the calling thread waits for it and looks at signals; the Python callables run
//! on the staging workers, each call holding the GIL; the first exception a
//! callable raises stops the pull before its commit point (every later fetch or
//! hash fails at once) and becomes the `__cause__` of the error raised; a signal
//! (Ctrl-C) stops the pull the same way and its exception (`KeyboardInterrupt`)
//! is raised once the engine has stopped, the directory then being the old stack
//! or, when the signal came after the commit point, the new one.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyMapping, PyString};

use stack::{Interrupt, LinkMode};

create_exception!(
    stack_sync,
    StackError,
    PyException,
    "A stack operation failed. `exit_code` is the command line's exit code for it \
     (contract §5), `kind` a stable name of the failure."
);
create_exception!(
    stack_sync,
    StackFailedError,
    StackError,
    "Exit code 1: the operation failed and the previous stack is intact."
);
create_exception!(
    stack_sync,
    BadManifestError,
    StackError,
    "Exit code 2: bad usage or a bad manifest; nothing was touched."
);
create_exception!(
    stack_sync,
    LockedError,
    StackError,
    "Exit code 3: another process holds the directory's lock."
);
create_exception!(
    stack_sync,
    CorruptJournalError,
    StackError,
    "Exit code 4: the journal is corrupt (or of an unknown format); nothing was changed."
);

/// The Python exception of an engine error, with `exit_code` and `kind` set.
fn to_py_err(py: Python<'_>, e: &stack::Error) -> PyErr {
    let msg = e.to_string();
    // By exit code, which the engine gives every variant (its match there is
    // exhaustive; `Error` is non-exhaustive here): State, InTheWay, Unfinished,
    // Internal, Fetch, Checksum and Io are exit 1, StackFailedError.
    let err = match e.exit_code() {
        2 => BadManifestError::new_err(msg),
        3 => LockedError::new_err(msg),
        4 => CorruptJournalError::new_err(msg),
        _ => StackFailedError::new_err(msg),
    };
    let value = err.value(py);
    // Setting attributes of a fresh exception instance cannot fail.
    let _ = value.setattr("exit_code", e.exit_code());
    let _ = value.setattr("kind", e.kind());
    err
}

fn link_mode(s: &str) -> PyResult<LinkMode> {
    Ok(match s {
        "auto" => LinkMode::Auto,
        "symlink" => LinkMode::Symlink,
        "hardlink" => LinkMode::Hardlink,
        "copy" => LinkMode::Copy,
        "reflink" => LinkMode::Reflink,
        other => {
            return Err(PyValueError::new_err(format!(
                "link must be one of auto, symlink, hardlink, copy, reflink, not {other:?}"
            )))
        }
    })
}

/// `obj` as a path (a `str` or an `os.PathLike`).
fn path_of(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<PathBuf> {
    obj.extract::<PathBuf>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{what} must be a str or an os.PathLike, not {}",
            type_name(obj)
        ))
    })
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".to_string())
}

/// Is `obj` a manifest named by its path or URL (rather than a mapping)?
fn is_source(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    Ok(obj.is_instance_of::<PyString>() || obj.hasattr("__fspath__")?)
}

fn check_manifest(obj: &Bound<'_, PyAny>) -> PyResult<()> {
    let mapping = obj.py().import("collections.abc")?.getattr("Mapping")?;
    if is_source(obj)? || obj.is_instance(&mapping)? {
        return Ok(());
    }
    Err(PyTypeError::new_err(format!(
        "manifest must be a dict (contract §1) or a path or URL string, not {}",
        type_name(obj)
    )))
}

fn check_callable(obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<()> {
    match obj {
        Some(f) if !f.is_callable() => Err(PyTypeError::new_err(format!(
            "{what} must be callable or None, not {}",
            type_name(f)
        ))),
        _ => Ok(()),
    }
}

/// Options of [`run_stack_sync`]. Every attribute can be set after construction.
///
/// `manifest` is a dict shaped as contract §1 (then `fetcher(url, dest)`,
/// `md5_of(path) -> str` and `bundle_fetcher(slug) -> bytes` fetch and hash; each
/// is optional: without `md5_of` the engine hashes the bytes itself, and a pull
/// that needs a missing fetcher fails before anything visible changes), or a
/// path or URL string (its folder or server is the origin, as for
/// `stack pull --manifest`; then the callables must be None). `link` as
/// `--link`; `jobs` parallel downloads; `wait` for the directory's lock;
/// `bundle_check` "auto" (a bundle's md5 is a version tag for a dict manifest, as
/// the engine this package replaces took it, and is verified for a manifest
/// named by a path or URL), "verify" or "trust".
#[pyclass(module = "stack_sync")]
struct PullStackOptions {
    manifest: Py<PyAny>,
    local_dir: PathBuf,
    fetcher: Option<Py<PyAny>>,
    md5_of: Option<Py<PyAny>>,
    bundle_fetcher: Option<Py<PyAny>>,
    link: String,
    jobs: usize,
    wait: bool,
    bundle_check: String,
}

#[pymethods]
impl PullStackOptions {
    #[new]
    #[pyo3(signature = (manifest, local_dir, fetcher=None, md5_of=None, bundle_fetcher=None, link="auto", jobs=4, wait=false, bundle_check="auto"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        manifest: &Bound<'_, PyAny>,
        local_dir: &Bound<'_, PyAny>,
        fetcher: Option<&Bound<'_, PyAny>>,
        md5_of: Option<&Bound<'_, PyAny>>,
        bundle_fetcher: Option<&Bound<'_, PyAny>>,
        link: &str,
        jobs: usize,
        wait: bool,
        bundle_check: &str,
    ) -> PyResult<Self> {
        check_manifest(manifest)?;
        check_callable(fetcher, "fetcher")?;
        check_callable(md5_of, "md5_of")?;
        check_callable(bundle_fetcher, "bundle_fetcher")?;
        link_mode(link)?;
        bundle_mode(bundle_check, true)?;
        Ok(PullStackOptions {
            manifest: manifest.clone().unbind(),
            local_dir: path_of(local_dir, "local_dir")?,
            fetcher: fetcher.map(|f| f.clone().unbind()),
            md5_of: md5_of.map(|f| f.clone().unbind()),
            bundle_fetcher: bundle_fetcher.map(|f| f.clone().unbind()),
            link: link.to_string(),
            jobs: jobs_at_least_one(jobs)?,
            wait,
            bundle_check: bundle_check.to_string(),
        })
    }

    #[getter]
    fn manifest(&self, py: Python<'_>) -> Py<PyAny> {
        self.manifest.clone_ref(py)
    }
    #[setter]
    fn set_manifest(&mut self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        check_manifest(value)?;
        self.manifest = value.clone().unbind();
        Ok(())
    }

    /// The local directory, as a `pathlib.Path`.
    #[getter]
    fn local_dir<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        pathlib_path(py, &self.local_dir)
    }
    #[setter]
    fn set_local_dir(&mut self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.local_dir = path_of(value, "local_dir")?;
        Ok(())
    }

    #[getter]
    fn fetcher(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.fetcher.as_ref().map(|f| f.clone_ref(py))
    }
    #[setter]
    fn set_fetcher(&mut self, value: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        check_callable(value, "fetcher")?;
        self.fetcher = value.map(|f| f.clone().unbind());
        Ok(())
    }

    #[getter]
    fn md5_of(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.md5_of.as_ref().map(|f| f.clone_ref(py))
    }
    #[setter]
    fn set_md5_of(&mut self, value: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        check_callable(value, "md5_of")?;
        self.md5_of = value.map(|f| f.clone().unbind());
        Ok(())
    }

    #[getter]
    fn bundle_fetcher(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.bundle_fetcher.as_ref().map(|f| f.clone_ref(py))
    }
    #[setter]
    fn set_bundle_fetcher(&mut self, value: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        check_callable(value, "bundle_fetcher")?;
        self.bundle_fetcher = value.map(|f| f.clone().unbind());
        Ok(())
    }

    #[getter]
    fn link(&self) -> &str {
        &self.link
    }
    #[setter]
    fn set_link(&mut self, value: &str) -> PyResult<()> {
        link_mode(value)?;
        self.link = value.to_string();
        Ok(())
    }

    #[getter]
    fn jobs(&self) -> usize {
        self.jobs
    }
    #[setter]
    fn set_jobs(&mut self, value: usize) -> PyResult<()> {
        self.jobs = jobs_at_least_one(value)?;
        Ok(())
    }

    #[getter]
    fn wait(&self) -> bool {
        self.wait
    }
    #[setter]
    fn set_wait(&mut self, value: bool) {
        self.wait = value;
    }

    #[getter]
    fn bundle_check(&self) -> &str {
        &self.bundle_check
    }
    #[setter]
    fn set_bundle_check(&mut self, value: &str) -> PyResult<()> {
        bundle_mode(value, true)?;
        self.bundle_check = value.to_string();
        Ok(())
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let manifest = self
            .manifest
            .bind(py)
            .repr()
            .map(|r| r.to_string())
            .unwrap_or_default();
        let manifest = if manifest.chars().count() > 60 {
            format!("{}...", manifest.chars().take(57).collect::<String>())
        } else {
            manifest
        };
        format!(
            "PullStackOptions(manifest={manifest}, local_dir={:?}, link={:?}, jobs={}, wait={})",
            self.local_dir.display().to_string(),
            self.link,
            self.jobs,
            if self.wait { "True" } else { "False" }
        )
    }
}

/// `bundle_check`: "verify" (a bundle's bytes must have the manifest's md5),
/// "trust" (the md5 is only a version tag, as the engine the package replaces
/// took it) or "auto" (trust for a dict manifest, verify for one named by a path
/// or URL, as the command line does).
fn bundle_mode(s: &str, dict: bool) -> PyResult<stack::BundleCheck> {
    Ok(match s {
        "verify" => stack::BundleCheck::Verify,
        "trust" => stack::BundleCheck::TrustServer,
        "auto" if dict => stack::BundleCheck::TrustServer,
        "auto" => stack::BundleCheck::Verify,
        other => {
            return Err(PyValueError::new_err(format!(
                "bundle_check must be one of auto, verify, trust, not {other:?}"
            )))
        }
    })
}

fn jobs_at_least_one(jobs: usize) -> PyResult<usize> {
    if jobs == 0 {
        return Err(PyValueError::new_err("jobs must be at least 1"));
    }
    Ok(jobs)
}

fn pathlib_path<'py>(py: Python<'py>, p: &Path) -> PyResult<Bound<'py, PyAny>> {
    py.import("pathlib")?.getattr("Path")?.call1((p,))
}

/// The counts of one section of a report (contract §5).
#[pyclass(module = "stack_sync", frozen, get_all, eq)]
#[derive(Clone, Copy, PartialEq, Eq)]
struct Counts {
    added: u64,
    updated: u64,
    removed: u64,
    unchanged: u64,
    skipped: u64,
}

#[pymethods]
impl Counts {
    fn __repr__(&self) -> String {
        format!(
            "Counts(added={}, updated={}, removed={}, unchanged={}, skipped={})",
            self.added, self.updated, self.removed, self.unchanged, self.skipped
        )
    }
}

impl From<stack::Counts> for Counts {
    fn from(c: stack::Counts) -> Counts {
        Counts {
            added: c.added,
            updated: c.updated,
            removed: c.removed,
            unchanged: c.unchanged,
            skipped: c.skipped,
        }
    }
}

/// The report of a pull or status (contract §5); `data_packages` counts
/// (package, table) references.
#[pyclass(module = "stack_sync", frozen, get_all)]
struct SyncReport {
    ok: bool,
    dry_run: bool,
    txn: u64,
    direct_tables: Counts,
    data_packages: Counts,
    memory_domains: Counts,
    bytes_fetched: u64,
    elapsed_ms: u64,
    /// What recovery did before the pull, one line each.
    recovered: Vec<String>,
    /// What the pull could not do but survived (a link fallback, leftovers not
    /// cleaned), one line each.
    warnings: Vec<String>,
}

#[pymethods]
impl SyncReport {
    fn __repr__(&self) -> String {
        format!(
            "SyncReport(ok={}, dry_run={}, txn={}, direct_tables={}, data_packages={}, memory_domains={}, bytes_fetched={}, elapsed_ms={})",
            py_bool(self.ok),
            py_bool(self.dry_run),
            self.txn,
            self.direct_tables.__repr__(),
            self.data_packages.__repr__(),
            self.memory_domains.__repr__(),
            self.bytes_fetched,
            self.elapsed_ms
        )
    }
}

fn py_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

impl From<stack::SyncReport> for SyncReport {
    fn from(r: stack::SyncReport) -> SyncReport {
        SyncReport {
            ok: r.ok,
            dry_run: r.dry_run,
            txn: r.txn,
            direct_tables: r.direct_tables.into(),
            data_packages: r.data_packages.into(),
            memory_domains: r.memory_domains.into(),
            bytes_fetched: r.bytes_fetched,
            elapsed_ms: r.elapsed_ms,
            recovered: r.recovered,
            warnings: r.warnings,
        }
    }
}

/// One broken invariant (contract §5's verify report).
#[pyclass(module = "stack_sync", frozen, get_all)]
struct Violation {
    invariant: u8,
    kind: String,
    path: String,
    message: String,
}

#[pymethods]
impl Violation {
    fn __str__(&self) -> String {
        format!(
            "invariant {} ({}): {}: {}",
            self.invariant, self.kind, self.path, self.message
        )
    }
    fn __repr__(&self) -> String {
        format!(
            "Violation(invariant={}, kind={:?}, path={:?}, message={:?})",
            self.invariant, self.kind, self.path, self.message
        )
    }
}

impl From<stack::Violation> for Violation {
    fn from(v: stack::Violation) -> Violation {
        Violation {
            invariant: v.invariant,
            kind: v.kind.to_string(),
            path: v.path,
            message: v.message,
        }
    }
}

/// What [`verify`] found.
#[pyclass(module = "stack_sync", frozen, get_all)]
struct VerifyReport {
    ok: bool,
    violations: Vec<Py<Violation>>,
    /// Why the journal's projection was checked instead of the state file.
    notes: Vec<String>,
}

/// What [`journal_replay`] did.
#[pyclass(module = "stack_sync", frozen, get_all)]
struct ReplayReport {
    txn: u64,
    notes: Vec<String>,
    /// What recovery could not do but survived, one line each.
    warnings: Vec<String>,
}

// ---------------------------------------------------------------------------
// Running the engine beside the interpreter.
// ---------------------------------------------------------------------------

/// What stops a pull: the interrupt the engine checks, and the first exception
/// a callable raised.
#[derive(Clone, Default)]
struct Stop {
    interrupt: Interrupt,
    raised: Arc<Mutex<Option<PyErr>>>,
}

impl Stop {
    /// Keep the first exception a callable raised and stop the pull; the engine
    /// is told an I/O error naming it.
    fn raised(&self, py: Python<'_>, what: &str, e: PyErr) -> std::io::Error {
        let text = format!(
            "{what} raised {}",
            e.value(py)
                .repr()
                .map_or_else(|_| "an exception".to_string(), |r| r.to_string())
        );
        let mut slot = self.raised.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        self.interrupt.raise();
        std::io::Error::other(text)
    }

    fn take_raised(&self) -> Option<PyErr> {
        self.raised.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Run `engine` on a thread of its own with the interpreter released, this
/// thread waiting and handling signals meanwhile (a signal handler's exception,
/// `KeyboardInterrupt` for Ctrl-C, raises the interrupt and is returned once
/// the engine has stopped).
fn run_beside<T: Send>(
    py: Python<'_>,
    interrupt: &Interrupt,
    engine: impl FnOnce() -> T + Send,
) -> PyResult<T> {
    let (result, signal) = py.detach(|| {
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel();
            s.spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(engine));
                let _ = tx.send(r);
            });
            let mut signal: Option<PyErr> = None;
            loop {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(r) => return (r, signal),
                    Err(mpsc::RecvTimeoutError::Timeout) if signal.is_none() => {
                        if let Err(e) = Python::attach(|py| py.check_signals()) {
                            interrupt.raise();
                            signal = Some(e);
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        // Only if the engine thread ended without sending.
                        let lost: Box<dyn std::any::Any + Send> =
                            Box::new("the engine thread ended without an answer");
                        return (Err(lost), signal);
                    }
                }
            }
        })
    });
    if let Some(e) = signal {
        return Err(e);
    }
    match result {
        Ok(r) => Ok(r),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_string());
            Err(pyo3::panic::PanicException::new_err(what))
        }
    }
}

/// The engine's answer as Python's: an error of the engine becomes its
/// exception, chained to the exception a callable raised, if one did.
fn answer<T>(py: Python<'_>, r: stack::Result<T>, stop: &Stop) -> PyResult<T> {
    let raised = stop.take_raised();
    match r {
        Ok(v) => Ok(v),
        Err(e) => {
            let err = to_py_err(py, &e);
            err.set_cause(py, raised);
            Err(err)
        }
    }
}

/// The callables of a dict manifest, as the engine's closures. Each call holds
/// the GIL; the engine calls them from its staging workers (up to `jobs` at a
/// time, interleaving as the GIL allows) and, for `md5_of`, from the threads
/// that check the files whose fingerprint changed.
fn closures(
    py: Python<'_>,
    opts: &PullStackOptions,
    stop: &Stop,
) -> (stack::FetchFn, stack::Md5Fn, stack::BundleFn) {
    let fetcher = opts.fetcher.as_ref().map(|f| f.clone_ref(py));
    let st = stop.clone();
    let fetch: stack::FetchFn = Box::new(move |url: &str, dest: &Path| {
        let Some(f) = &fetcher else {
            return Err(std::io::Error::other(format!(
                "PullStackOptions.fetcher is None; {url} must be fetched"
            )));
        };
        Python::attach(|py| {
            pathlib_path(py, dest)
                .and_then(|dest| f.call1(py, (url, dest)))
                .map(drop)
                .map_err(|e| st.raised(py, "fetcher", e))
        })
    });
    let md5_of = opts.md5_of.as_ref().map(|f| f.clone_ref(py));
    let st = stop.clone();
    let md5: stack::Md5Fn = Box::new(move |path: &Path| {
        let Some(f) = &md5_of else {
            return stack::reconcile::origin::md5_file(&stack::fs::RealFs, path);
        };
        Python::attach(|py| {
            pathlib_path(py, path)
                .and_then(|p| f.call1(py, (p,)))
                .and_then(|h| {
                    h.extract::<String>(py).map_err(|_| {
                        PyTypeError::new_err(format!(
                            "md5_of must return a str, not {}",
                            type_name(h.bind(py))
                        ))
                    })
                })
                .map_err(|e| st.raised(py, "md5_of", e))
        })
    });
    let bundle_fetcher = opts.bundle_fetcher.as_ref().map(|f| f.clone_ref(py));
    let st = stop.clone();
    let bundle: stack::BundleFn = Box::new(move |slug: &str| {
        let Some(f) = &bundle_fetcher else {
            return Err(std::io::Error::other(format!(
                "PullStackOptions.bundle_fetcher is None; memory bundle {slug} must be fetched"
            )));
        };
        Python::attach(|py| {
            f.call1(py, (slug,))
                .and_then(|body| bytes_of(body.bind(py)))
                .map_err(|e| st.raised(py, "bundle_fetcher", e))
        })
    });
    (fetch, md5, bundle)
}

fn bytes_of(body: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(b) = body.cast::<PyBytes>() {
        return Ok(b.as_bytes().to_vec());
    }
    if let Ok(b) = body.cast::<PyByteArray>() {
        return Ok(b.to_vec());
    }
    Err(PyTypeError::new_err(format!(
        "bundle_fetcher must return bytes, not {}",
        type_name(body)
    )))
}

/// The manifest of `opts`: its path or URL, or the dict parsed.
enum Wanted {
    Source(String),
    Parsed(stack::Manifest),
}

fn wanted(py: Python<'_>, opts: &PullStackOptions) -> PyResult<Wanted> {
    let m = opts.manifest.bind(py);
    if is_source(m)? {
        let callables = [
            ("fetcher", &opts.fetcher),
            ("md5_of", &opts.md5_of),
            ("bundle_fetcher", &opts.bundle_fetcher),
        ];
        if let Some((name, _)) = callables.iter().find(|(_, f)| f.is_some()) {
            return Err(with_code(
                BadManifestError::new_err(format!(
                    "{name} is only used with a manifest given as a dict; a manifest named by a path or URL is fetched from its origin"
                )),
                py,
                "usage",
            ));
        }
        let path = path_of(m, "manifest")?;
        let source = path.to_str().ok_or_else(|| {
            PyValueError::new_err(format!("manifest path {} is not UTF-8", path.display()))
        })?;
        return Ok(Wanted::Source(source.to_string()));
    }
    let json = py
        .import("json")?
        .call_method1("dumps", (m,))
        .map_err(|cause| {
            let err = with_code(
                BadManifestError::new_err(format!(
                    "manifest is not JSON-serializable: {}",
                    cause.value(py)
                )),
                py,
                "bad_manifest",
            );
            err.set_cause(py, Some(cause));
            err
        })?;
    let text: String = json.extract()?;
    stack::Manifest::from_json(text.as_bytes())
        .map(Wanted::Parsed)
        .map_err(|e| to_py_err(py, &e))
}

fn with_code(err: PyErr, py: Python<'_>, kind: &str) -> PyErr {
    let value = err.value(py);
    let _ = value.setattr("exit_code", 2);
    let _ = value.setattr("kind", kind);
    err
}

fn pull(py: Python<'_>, opts: &PullStackOptions, dry_run: bool) -> PyResult<SyncReport> {
    let link = link_mode(&opts.link)?;
    let stop = Stop::default();
    let report = match wanted(py, opts)? {
        Wanted::Source(source) => {
            let interrupt = stop.interrupt.clone();
            let dir = opts.local_dir.clone();
            let (jobs, wait) = (opts.jobs, opts.wait);
            let bundles = bundle_mode(&opts.bundle_check, false)?;
            run_beside(py, &stop.interrupt, move || {
                stack::pull_from(&stack::PullFrom {
                    manifest: &source,
                    local_dir: &dir,
                    link,
                    jobs,
                    wait,
                    dry_run,
                    bundles,
                    interrupt: Some(&interrupt),
                })
            })?
        }
        Wanted::Parsed(manifest) => {
            let (fetcher, md5_of, bundle_fetcher) = closures(py, opts, &stop);
            let mut o = stack::PullStackOptions::new(
                manifest,
                &opts.local_dir,
                fetcher,
                md5_of,
                bundle_fetcher,
            );
            o.link = link;
            o.jobs = opts.jobs;
            o.wait = opts.wait;
            o.bundle_check = bundle_mode(&opts.bundle_check, true)?;
            o.interrupt = Some(stop.interrupt.clone());
            run_beside(py, &stop.interrupt, move || {
                if dry_run {
                    stack::stack_status(&o)
                } else {
                    stack::run_stack_sync(&o)
                }
            })?
        }
    };
    answer(py, report, &stop).map(SyncReport::from)
}

/// Pull `opts.manifest` into `opts.local_dir` (contract §5 `stack pull`, §7).
///
/// The engine runs with the GIL released, so other Python threads run meanwhile.
/// The callables are called from the engine's staging workers, not one at a
/// time: up to `opts.jobs` threads call `fetcher`, `md5_of` and `bundle_fetcher`
/// (and `md5_of` also from the threads that re-check files whose stat changed),
/// each call holding the GIL, so calls interleave wherever a callable releases
/// it (I/O, `time.sleep`). The first exception a callable raises stops the pull
/// before its commit point (nothing visible changes) and is the `__cause__` of
/// the `StackError` raised. Ctrl-C stops the pull crash-safely (before its commit
/// point, at the next file; past it, the pull finishes) and raises
/// `KeyboardInterrupt`.
#[pyfunction]
fn run_stack_sync(py: Python<'_>, opts: PyRef<'_, PullStackOptions>) -> PyResult<SyncReport> {
    pull(py, &opts, false)
}

/// What `run_stack_sync(opts)` would do, changing nothing (`stack status`).
#[pyfunction]
fn status(py: Python<'_>, opts: PyRef<'_, PullStackOptions>) -> PyResult<SyncReport> {
    pull(py, &opts, true)
}

/// The violations of invariants 1-4 in `local_data` (the directory's `data/`)
/// against `state` (a parsed `sync_state.json`), as strings; `[]` when all hold.
#[pyfunction]
fn audit_invariants(
    py: Python<'_>,
    local_data: &Bound<'_, PyAny>,
    state: &Bound<'_, PyAny>,
) -> PyResult<Vec<String>> {
    let local_data = path_of(local_data, "local_data")?;
    let as_dict = PyDict::new(py);
    as_dict.set_item("version", 1)?;
    // Any mapping; without a version (`{}`, as a caller reads a missing state
    // file), a version-1 state: an empty stack.
    as_dict.update(state.cast::<PyMapping>().map_err(|_| {
        PyTypeError::new_err(format!(
            "state must be a mapping (a parsed sync_state.json), not {}",
            type_name(state)
        ))
    })?)?;
    let text: String = py
        .import("json")?
        .call_method1("dumps", (&as_dict,))?
        .extract()?;
    let file = stack::replay::state::parse_state_file(text.as_bytes())
        .map_err(|e| PyValueError::new_err(format!("state is not a sync_state.json: {e}")))?;
    Ok(py.detach(|| {
        let mut out: Vec<String> = Vec::new();
        if let Some(root) = &file.root {
            let dir = local_data.parent().unwrap_or(Path::new("."));
            let here = std::fs::canonicalize(dir)
                .unwrap_or_else(|_| dir.to_path_buf())
                .to_string_lossy()
                .into_owned();
            if *root != here {
                out.push(format!(
                    "invariant 2 (moved): {}: the state is projected for {root}",
                    dir.display()
                ));
            }
        }
        out.extend(
            stack::audit_invariants(&local_data, &file.state)
                .iter()
                .map(ToString::to_string),
        );
        out
    }))
}

/// Check invariants 1-5 of the directory (`stack verify`); `contents` re-hashes
/// every reference. Reads only.
#[pyfunction]
#[pyo3(signature = (local_dir, contents=false))]
fn verify(py: Python<'_>, local_dir: &Bound<'_, PyAny>, contents: bool) -> PyResult<VerifyReport> {
    let dir = path_of(local_dir, "local_dir")?;
    let found = py
        .detach(|| stack::verify_dir(&dir, contents))
        .map_err(|e| to_py_err(py, &e))?;
    let violations = found
        .violations
        .into_iter()
        .map(|v| Py::new(py, Violation::from(v)))
        .collect::<PyResult<Vec<_>>>()?;
    Ok(VerifyReport {
        ok: violations.is_empty(),
        violations,
        notes: found.notes,
    })
}

/// Finish or roll back an interrupted pull and rebuild `sync_state.json`
/// (`stack journal replay`).
#[pyfunction]
#[pyo3(signature = (local_dir, wait=false))]
fn journal_replay(
    py: Python<'_>,
    local_dir: &Bound<'_, PyAny>,
    wait: bool,
) -> PyResult<ReplayReport> {
    let dir = path_of(local_dir, "local_dir")?;
    let done = py
        .detach(|| stack::journal_replay(&dir, wait, "stack_sync.journal_replay"))
        .map_err(|e| to_py_err(py, &e))?;
    Ok(ReplayReport {
        txn: done.txn,
        notes: done.notes,
        warnings: done.warnings,
    })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PullStackOptions>()?;
    m.add_class::<Counts>()?;
    m.add_class::<SyncReport>()?;
    m.add_class::<Violation>()?;
    m.add_class::<VerifyReport>()?;
    m.add_class::<ReplayReport>()?;
    m.add_function(wrap_pyfunction!(run_stack_sync, m)?)?;
    m.add_function(wrap_pyfunction!(status, m)?)?;
    m.add_function(wrap_pyfunction!(audit_invariants, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(journal_replay, m)?)?;
    for (name, class, code) in [
        ("StackError", py.get_type::<StackError>(), None),
        (
            "StackFailedError",
            py.get_type::<StackFailedError>(),
            Some(1),
        ),
        (
            "BadManifestError",
            py.get_type::<BadManifestError>(),
            Some(2),
        ),
        ("LockedError", py.get_type::<LockedError>(), Some(3)),
        (
            "CorruptJournalError",
            py.get_type::<CorruptJournalError>(),
            Some(4),
        ),
    ] {
        if let Some(code) = code {
            class.setattr("exit_code", code)?;
        }
        m.add(name, class)?;
    }
    Ok(())
}
