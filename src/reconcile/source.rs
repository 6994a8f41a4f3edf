//! Where a manifest comes from: a local file (its folder is the origin) or a URL.
//!
//! Owns: turning `--manifest <PATH|URL>` into a parsed [`Manifest`] and its
//! [`Origin`]. Invariant kept: a manifest that cannot be read or parsed is a
//! usage/bad-manifest error before anything is touched.

use std::path::Path;

use crate::error::{Error, Result};
use crate::reconcile::http::{HttpOptions, HttpOrigin};
use crate::reconcile::manifest::Manifest;
use crate::reconcile::origin::{LocalOrigin, Origin};

/// Read the manifest named on the command line and the origin its URLs resolve against.
pub fn open_manifest(arg: &str) -> Result<(Manifest, Box<dyn Origin>)> {
    if arg.starts_with("http://") || arg.starts_with("https://") {
        let origin = HttpOrigin::new(arg, HttpOptions::from_env())?;
        let manifest = Manifest::from_json(&origin.fetch_manifest()?)?;
        return Ok((manifest, Box::new(origin)));
    }
    let path = Path::new(arg.strip_prefix("file://").unwrap_or(arg));
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Usage(format!("cannot read manifest {}: {e}", path.display())))?;
    let manifest = Manifest::from_json(&bytes)?;
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok((manifest, Box::new(LocalOrigin::new(folder))))
}
