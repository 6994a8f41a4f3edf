//! `stack`: a crash-safe sync engine that keeps a local data stack identical to a
//! server manifest. See ARCHITECTURE.md for the map; contract §6 for this API.

#![forbid(unsafe_op_in_unsafe_fn)]
#![deny(unused_must_use)]

pub mod drain;
pub mod error;
pub mod fs;
pub mod journal;
pub mod layout;
pub mod md5x;
pub mod model;
pub mod par;
pub mod reconcile;
pub mod replay;

pub use error::{Error, Result};
pub mod verify;

use std::path::PathBuf;
use std::sync::Arc;

pub use journal::event::LinkMode;
pub use reconcile::manifest::Manifest;
pub use reconcile::origin::{BundleFn, FetchFn, Md5Fn};
pub use reconcile::plan::Counts;
pub use reconcile::pull::SyncReport;
pub use reconcile::stage::BundleCheck;
pub use replay::state::SyncState;
pub use verify::{audit_invariants, Violation};

/// Options of [`run_stack_sync`] (contract §6): the manifest, the local directory and
/// the injected fetchers, plus engine options with defaults.
pub struct PullStackOptions {
    pub manifest: Manifest,
    pub local_dir: PathBuf,
    /// `(url, dest)`: write the table at `url` to `dest`.
    pub fetcher: FetchFn,
    /// md5 (hex) of a file.
    pub md5_of: Md5Fn,
    /// slug → bundle body.
    pub bundle_fetcher: BundleFn,
    /// `--link` (default `auto`).
    pub link: LinkMode,
    /// Parallel downloads (default 4).
    pub jobs: usize,
    /// How bundle md5s are checked (default: verified).
    pub bundle_check: BundleCheck,
    /// Wait for the directory lock instead of failing (default false).
    pub wait: bool,
}

impl PullStackOptions {
    /// Options with every engine default.
    pub fn new(
        manifest: Manifest,
        local_dir: impl Into<PathBuf>,
        fetcher: FetchFn,
        md5_of: Md5Fn,
        bundle_fetcher: BundleFn,
    ) -> Self {
        PullStackOptions {
            manifest,
            local_dir: local_dir.into(),
            fetcher,
            md5_of,
            bundle_fetcher,
            link: LinkMode::Auto,
            jobs: 4,
            bundle_check: BundleCheck::Verify,
            wait: false,
        }
    }
}

/// Pull `opts.manifest` into `opts.local_dir` with the injected fetchers (contract §6).
pub fn run_stack_sync(opts: &PullStackOptions) -> Result<SyncReport> {
    let origin = reconcile::origin::ClosureOrigin {
        fetcher: &opts.fetcher,
        md5_of: &opts.md5_of,
        bundle_fetcher: &opts.bundle_fetcher,
    };
    let hash = |p: &std::path::Path| (opts.md5_of)(p);
    let cfg = reconcile::pull::PullConfig {
        fs: Arc::new(fs::RealFs),
        layout: layout::Layout::new(&opts.local_dir),
        origin: &origin,
        link: opts.link,
        jobs: opts.jobs,
        dry_run: false,
        wait: opts.wait,
        command: "run_stack_sync".to_string(),
        hash: &hash,
        bundles: opts.bundle_check,
        progress: &|_| {},
    };
    reconcile::pull::pull(reconcile::pull::Wanted::Parsed(&opts.manifest), &cfg)
}
