//! The engine's error type and its mapping onto the contract's exit codes.
//!
//! Owns: [`Error`], [`Error::kind`]'s stable names for JSON reports, the rule that
//! every I/O error carries the path it happened on and keeps its `io::Error` as its
//! source, and [`Warnings`], how the library hands what it could not do but
//! survived to its caller (it prints nothing itself).
//!
//! Exit codes (contract §5): 0 done; 1 the operation failed (an I/O failure, an
//! unreadable manifest file included, a fetch, a checksum, an unusable state file,
//! something in the way, too little room, a transaction rolled back or left
//! unfinished after its commit point); 2 bad usage or a bad manifest (nothing
//! touched); 3 directory locked; 4 `verify` found violations or the journal is
//! corrupt. Every message a user can meet says what to do next.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The source of a fetch failure: whatever the origin's transport reported.
pub type FetchSource = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Every way a `stack` operation can fail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The manifest breaks a rule of contract §1; nothing was touched.
    #[error("bad manifest: {0}")]
    BadManifest(String),
    /// The command line or its environment is wrong; nothing was touched.
    #[error("{0}")]
    Usage(String),
    /// Another process holds the directory's lock.
    #[error(
        "{dir} is locked by {holder}; wait for it to finish, or pass --wait to wait for the lock"
    )]
    Locked { dir: PathBuf, holder: String },
    /// Fetching a table or bundle failed; the previous stack is intact. `source` is
    /// the transport's error when there is one (an `io::Error` of a local origin,
    /// an HTTP client's error).
    #[error(
        "fetching {what}: {message}; nothing was changed: pull again (a partial download \
         resumes) once the origin serves it"
    )]
    Fetch {
        what: String,
        message: String,
        #[source]
        source: Option<FetchSource>,
    },
    /// Downloaded bytes do not have the md5 the manifest promised.
    #[error(
        "{what}: expected md5 {expected}, got {actual}; nothing was changed: the origin \
         serves other bytes than the manifest lists, pull again once they agree"
    )]
    Checksum {
        what: String,
        expected: String,
        actual: String,
    },
    /// The journal is damaged in a way that is not a torn tail.
    #[error(
        "journal {path} is corrupt at byte offset {offset} (record {record}): {reason}; \
         move it aside (keep the copy for a bug report): the next command starts a new \
         journal from sync_state.json, and `stack verify` checks the result"
    )]
    JournalCorrupt {
        path: PathBuf,
        offset: u64,
        record: u64,
        reason: String,
    },
    /// The journal was written by a newer format than this build reads.
    #[error(
        "journal {path} has format version {found}, newer than this build reads (up to \
         {supported}): it was written by a newer stack; use that version of stack or a later one"
    )]
    JournalVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// `sync_state.json` is unusable: not JSON, not a state, a version this build
    /// does not read. Recovery rebuilds it from the journal when there is one.
    #[error("{path}: {message}")]
    State { path: PathBuf, message: String },
    /// The disk has too little room for a pull; nothing visible was changed.
    /// `needed` counts every download of known size and what the transaction
    /// writes after its commit point (`needed_more`: some sizes were unknown);
    /// `free` is what the filesystem said was available, where it could tell.
    #[error("{}", no_space_message(dir, *needed, *needed_more, *free))]
    NoSpace {
        dir: PathBuf,
        needed: u64,
        needed_more: bool,
        free: Option<u64>,
        #[source]
        source: Option<Box<Error>>,
    },
    /// A file or folder that is not the engine's stands where a pull must write;
    /// nothing was changed.
    #[error("{path}: {what}; move it away and pull again (nothing was changed)")]
    InTheWay { path: PathBuf, what: String },
    /// Transaction `txn` failed after its commit point: the journal holds all of it,
    /// and the next command (or `stack journal replay`) finishes it. `source` is
    /// what failed.
    #[error("{}", unfinished_message(*txn, source))]
    Unfinished {
        txn: u64,
        #[source]
        source: Box<Error>,
    },
    /// Transaction `txn` failed after its commit point (`source`), and was rolled
    /// back in the same command from the old files it kept: the previous stack is
    /// intact.
    #[error("{}", rolled_back_message(*txn, source))]
    RolledBack {
        txn: u64,
        #[source]
        source: Box<Error>,
    },
    /// A rule the engine keeps for itself was broken (a bug, or a limit reached):
    /// nothing was changed that recovery cannot finish or roll back.
    #[error(
        "internal error: {0}; please report it (`stack verify` checks what the directory holds)"
    )]
    Internal(String),
    /// The filesystem refused an operation.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The process exit code this error maps to (contract §5).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::BadManifest(_) | Error::Usage(_) => 2,
            Error::Locked { .. } => 3,
            Error::JournalCorrupt { .. } | Error::JournalVersion { .. } => 4,
            Error::Fetch { .. }
            | Error::Checksum { .. }
            | Error::State { .. }
            | Error::NoSpace { .. }
            | Error::InTheWay { .. }
            | Error::Unfinished { .. }
            | Error::RolledBack { .. }
            | Error::Internal(_)
            | Error::Io { .. } => 1,
        }
    }

    /// A stable machine-readable name for the JSON report.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::BadManifest(_) => "bad_manifest",
            Error::Usage(_) => "usage",
            Error::Locked { .. } => "locked",
            Error::Fetch { .. } => "fetch",
            Error::Checksum { .. } => "checksum",
            Error::JournalCorrupt { .. } => "journal_corrupt",
            Error::JournalVersion { .. } => "journal_version",
            Error::State { .. } => "state",
            Error::NoSpace { .. } => "no_space",
            Error::InTheWay { .. } => "in_the_way",
            Error::Unfinished { .. } => "unfinished",
            Error::RolledBack { .. } => "rolled_back",
            Error::Internal(_) => "internal",
            Error::Io { .. } => "io",
        }
    }

    /// A fetch failure with only a message.
    pub fn fetch(what: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Fetch {
            what: what.into(),
            message: message.into(),
            source: None,
        }
    }

    /// A fetch failure caused by `source` (its text is the message).
    pub fn fetch_from(what: impl Into<String>, source: impl Into<FetchSource>) -> Error {
        let source = source.into();
        Error::Fetch {
            what: what.into(),
            message: source.to_string(),
            source: Some(source),
        }
    }

    /// Is this the simulated crash of a test filesystem? Such an error must
    /// propagate untouched: no cleanup may run after it.
    pub fn is_crash(&self) -> bool {
        match self {
            Error::Io { source, .. } => is_crash_io(source),
            Error::Unfinished { source, .. } => source.is_crash(),
            _ => false,
        }
    }
}

/// What an operation could not do but survived (a fallback taken, a leftover not
/// cleaned), collected for its report: the library prints nothing, its caller
/// (the command line, a binding) shows them. Shared by the threads of one
/// operation.
#[derive(Debug, Default)]
pub struct Warnings(Mutex<Vec<String>>);

impl Warnings {
    /// Record one warning.
    pub fn push(&self, warning: impl Into<String>) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(warning.into());
    }

    /// Every warning recorded so far, in order; the collection is left empty.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Bytes for people: `1.5 MB`, `200 kB`, `12 bytes` (decimal units, as `df -H`).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} bytes");
    }
    let mut v = bytes as f64 / 1000.0;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if v < 10.0 {
        format!("{v:.1} {}", UNITS[unit])
    } else {
        format!("{v:.0} {}", UNITS[unit])
    }
}

/// What the user can do about the fault at the bottom of `e`.
fn remedy(e: &Error) -> &'static str {
    let mut cur: &(dyn std::error::Error + 'static) = e;
    let mut code = None;
    loop {
        if let Some(io) = cur.downcast_ref::<io::Error>() {
            code = io.raw_os_error();
        }
        match cur.source() {
            Some(next) => cur = next,
            None => break,
        }
    }
    match code {
        Some(libc::EROFS) => "the disk is read-only: remount it read-write",
        Some(libc::ENOSPC | libc::EDQUOT) => "the disk (or a quota) is full: free some space",
        Some(libc::EIO) => {
            "the disk reports I/O errors: check it (dmesg), or copy the directory to a sound disk"
        }
        Some(libc::EACCES | libc::EPERM) => "a folder refuses writes: check its permissions",
        _ => "fix the cause above",
    }
}

fn unfinished_message(txn: u64, source: &Error) -> String {
    format!(
        "pull {txn} failed after its commit point ({source}); the new stack is only partly in \
         place, and the journal holds everything needed to finish it: {}, then run any stack \
         command (`stack journal replay` finishes it), which finishes it without downloading",
        remedy(source)
    )
}

fn rolled_back_message(txn: u64, source: &Error) -> String {
    format!(
        "pull {txn} failed after its commit point ({source}); rolled back to the previous \
         stack, which is intact: {}, then pull again",
        remedy(source)
    )
}

fn no_space_message(dir: &Path, needed: u64, more: bool, free: Option<u64>) -> String {
    let needed = format!("{}{}", human(needed), if more { " and more" } else { "" });
    let free = match free {
        Some(f) => format!("{} free", human(f)),
        None => "less free".to_string(),
    };
    format!(
        "not enough space in {}: the pull needs {needed}, the disk has {free}; \
         nothing was changed (free some space, or pull into a larger disk, and pull again)",
        dir.display()
    )
}

/// The payload of every `io::Error` a simulated filesystem (`fs::sim`, feature
/// `sim`) returns once it has crashed: the simulated machine is down, so the engine
/// must stop where it is and clean nothing up, as a killed process would. Recognised
/// by its type ([`is_crash_io`]), never by its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimulatedCrash;

impl SimulatedCrash {
    /// The `io::Error` a crashed simulated filesystem returns.
    pub fn io_error() -> io::Error {
        io::Error::other(SimulatedCrash)
    }
}

impl std::fmt::Display for SimulatedCrash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("simulated crash: the machine is down")
    }
}

impl std::error::Error for SimulatedCrash {}

/// Is this io::Error a simulated crash (its payload a [`SimulatedCrash`])?
pub fn is_crash_io(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<SimulatedCrash>())
}

/// Attach the operation and path to an io::Error.
pub trait IoContext<T> {
    fn at(self, op: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated crash is known by its payload's type, through `Error::Io` too;
    /// an error that merely reads like one is an ordinary I/O error.
    #[test]
    fn a_simulated_crash_is_recognised_by_type_not_by_text() {
        assert!(is_crash_io(&SimulatedCrash::io_error()));
        let lookalike = io::Error::other(SimulatedCrash.to_string());
        assert!(!is_crash_io(&lookalike));
        let wrapped: Result<()> = Err(SimulatedCrash::io_error()).at("write", Path::new("/x"));
        assert!(wrapped.unwrap_err().is_crash());
        let other: Result<()> = Err(lookalike).at("write", Path::new("/x"));
        assert!(!other.unwrap_err().is_crash());
    }
}
