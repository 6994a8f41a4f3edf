//! Where a manifest comes from: a local file (its folder is the origin) or a URL.
//!
//! Owns: turning `--manifest <PATH|URL>` into the manifest's bytes and its
//! [`Origin`]. Invariant kept: a manifest that cannot be read is a usage error
//! before anything is touched (one that cannot be parsed is the pull's to report,
//! also before anything but the lock file is touched).

use std::path::Path;

use crate::error::{IoContext, Result};
use crate::reconcile::http::{HttpOptions, HttpOrigin};
use crate::reconcile::origin::{LocalOrigin, Origin};

/// A manifest as read or downloaded, not yet parsed (`pull::Wanted::Raw`).
pub struct ManifestBytes {
    pub bytes: Vec<u8>,
    /// Where its URLs resolve: the manifest's URL, or its folder made absolute.
    pub origin: String,
}

impl ManifestBytes {
    /// The pull's input, owning the bytes: the pull drops them once parsed.
    pub fn into_wanted(self) -> crate::reconcile::pull::Wanted<'static> {
        crate::reconcile::pull::Wanted::Raw {
            bytes: self.bytes.into(),
            origin: self.origin.into(),
        }
    }
}

/// Read the manifest named on the command line and the origin its URLs resolve
/// against. Parsing is the pull's (it is skipped for an unchanged manifest).
pub fn open_manifest(arg: &str) -> Result<(ManifestBytes, Box<dyn Origin>)> {
    let http = if is_url(arg) {
        HttpOptions::from_env()?
    } else {
        HttpOptions::default()
    };
    open_manifest_with(arg, http)
}

/// Is the `--manifest` argument a URL (fetched over HTTP) rather than a path?
pub fn is_url(arg: &str) -> bool {
    arg.starts_with("http://") || arg.starts_with("https://")
}

/// [`open_manifest`], with the HTTP options given (used when `arg` is a URL).
pub fn open_manifest_with(
    arg: &str,
    http: HttpOptions,
) -> Result<(ManifestBytes, Box<dyn Origin>)> {
    if is_url(arg) {
        let origin = HttpOrigin::new(arg, http)?;
        let bytes = origin.fetch_manifest()?;
        let m = ManifestBytes {
            bytes,
            origin: arg.to_string(),
        };
        return Ok((m, Box::new(origin)));
    }
    let path = Path::new(arg.strip_prefix("file://").unwrap_or(arg));
    // A manifest file that cannot be read is an I/O failure (exit 1), not bad usage:
    // the path may be right and the disk or its permissions wrong.
    let bytes = std::fs::read(path).at("read manifest", path)?;
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let id = std::path::absolute(folder).unwrap_or_else(|_| folder.to_path_buf());
    let m = ManifestBytes {
        bytes,
        origin: format!("file:{}", id.display()),
    };
    Ok((m, Box::new(LocalOrigin::new(folder))))
}
