//! The engine's error type and its mapping onto the contract's exit codes.
//!
//! Owns: [`Error`], [`Error::kind`]'s stable names for JSON reports, and the rule that
//! every I/O error carries the path it happened on.
//!
//! Exit codes (contract §5): 0 done; 1 the operation failed and the previous stack is
//! intact; 2 bad usage or bad manifest (nothing touched); 3 directory locked;
//! 4 `verify` found violations or the journal is corrupt.

use std::io;
use std::path::{Path, PathBuf};

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
    #[error("{dir} is locked by {holder}")]
    Locked { dir: PathBuf, holder: String },
    /// Fetching a table or bundle failed; the previous stack is intact.
    #[error("fetching {what}: {message}")]
    Fetch { what: String, message: String },
    /// Downloaded bytes do not have the md5 the manifest promised.
    #[error("{what}: expected md5 {expected}, got {actual}")]
    Checksum {
        what: String,
        expected: String,
        actual: String,
    },
    /// The journal is damaged in a way that is not a torn tail.
    #[error("journal {path} is corrupt at byte offset {offset} (record {record}): {reason}")]
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
    /// `sync_state.json` or another engine file is unreadable and cannot be rebuilt.
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
            Error::Io { .. } => "io",
        }
    }

    /// Is this the simulated crash of a test filesystem? Such an error must
    /// propagate untouched: no cleanup may run after it.
    pub fn is_crash(&self) -> bool {
        matches!(self, Error::Io { source, .. } if is_crash_io(source))
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
