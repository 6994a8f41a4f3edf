//! Staged files under crashes, beyond `crash_consistency.rs`:
//! - a transaction prepared with its staged files still writable (as an engine
//!   that makes them read-only in apply rather than in staging leaves them),
//!   crashed after its commit point and rolled forward: the shared file ends
//!   read-only;
//! - an origin that resumes (as HTTP does): staging goes through `<md5>.part`,
//!   crashed and power-lost at every operation.

#![allow(clippy::disallowed_methods)]
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use md5::{Digest, Md5};
use serde_json::json;
use stack::fs::sim::{Crash, SimFs, SnapEntry};
use stack::fs::Fs;
use stack::layout::Layout;
use stack::reconcile::origin::{md5_file, stream_to_part, Fetched, Origin, Request};
use stack::reconcile::pull::{pull, PullConfig, Wanted};
use stack::reconcile::recover::recover;
use stack::{BundleCheck, LinkMode};

const ROOT: &str = "/stack";

fn reg() -> &'static Mutex<BTreeMap<String, Vec<u8>>> {
    static R: OnceLock<Mutex<BTreeMap<String, Vec<u8>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}
fn content(s: &str) -> String {
    let md5 = stack::reconcile::origin::hex(&Md5::digest(s.as_bytes()));
    reg()
        .lock()
        .unwrap()
        .insert(md5.clone(), s.as_bytes().to_vec());
    md5
}
struct O;
impl Origin for O {
    fn resolve(&self, _: &str) -> Result<(), String> {
        Ok(())
    }
    fn fetch(&self, fs: &dyn Fs, req: &Request<'_>, part: &Path) -> stack::Result<Fetched> {
        let b = reg().lock().unwrap().get(req.md5).cloned().unwrap();
        stream_to_part(fs, b.as_slice(), part)
    }
}
fn do_pull(fs: &SimFs, m: &serde_json::Value) -> stack::Result<()> {
    pull_with(fs, &O, LinkMode::Symlink, m)
}

fn pull_with(
    fs: &SimFs,
    origin: &dyn Origin,
    link: LinkMode,
    m: &serde_json::Value,
) -> stack::Result<()> {
    let sim = fs.clone();
    let hash = move |p: &Path| md5_file(&sim, p);
    let cfg = PullConfig {
        fs: Arc::new(fs.clone()),
        layout: Layout::new(ROOT),
        origin,
        link,
        jobs: 1,
        dry_run: false,
        wait: false,
        command: "t".into(),
        hash: &hash,
        bundles: BundleCheck::Verify,
        progress: &|_| {},
    };
    let bytes = serde_json::to_vec(m).unwrap();
    pull(
        Wanted::Raw {
            bytes: (&bytes[..]).into(),
            origin: "t".into(),
        },
        &cfg,
    )
    .map(|_| ())
}

fn manifest(md5: &str) -> serde_json::Value {
    json!({"direct_tables": [{"id": "t1", "name": "n1", "md5": md5,
        "query_mode": "local", "parquet_url": "/api/data/t1/download"}],
        "data_packages": [], "memory_domains": []})
}

#[test]
fn old_engine_prepared_txn_rolled_forward_keeps_shared_read_only() {
    let a = content("version a");
    let b = content("version b");
    let fs = SimFs::new();
    do_pull(&fs, &manifest(&a)).unwrap();
    fs.make_durable();
    // Find the first apply op of the pull of v2 (the rename into data/_shared).
    let probe = fs.reboot(Crash::Process);
    do_pull(&probe, &manifest(&b)).unwrap();
    let log = probe.op_log();
    let start = log
        .iter()
        .rposition(|l| l.starts_with("--- reboot"))
        .unwrap()
        + 1;
    let log = &log[start..];
    let first_apply = log
        .iter()
        .position(|l| l.contains("data/_shared") && l.contains("rename"))
        .unwrap_or_else(|| panic!("no rename into _shared in {log:#?}"));
    let crashed = fs.reboot(Crash::Process);
    crashed.crash_after(first_apply as u64);
    assert!(do_pull(&crashed, &manifest(&b)).is_err());
    let after = crashed.reboot(Crash::Process);
    let staged = format!("{ROOT}/.stack/staging/{b}");
    assert!(
        after.exists(Path::new(&staged)).unwrap(),
        "crash point not after the commit point"
    );
    // Staged files as an engine that chmods in apply, not in staging, leaves them.
    after.set_readonly(Path::new(&staged), false).unwrap();
    recover(Arc::new(after.clone()), &Layout::new(ROOT)).unwrap();
    let snap = after.snapshot();
    let shared = snap
        .get(Path::new(&format!("{ROOT}/data/_shared/t1.parquet")))
        .unwrap();
    match shared {
        SnapEntry::File { bytes, readonly } => {
            assert_eq!(bytes, b"version b");
            assert!(*readonly, "shared file left writable after roll-forward");
        }
        other => panic!("{other:?}"),
    }
}

/// A resuming origin (as HTTP is): staging goes through `<md5>.part`.
struct R;
impl Origin for R {
    fn resolve(&self, _: &str) -> Result<(), String> {
        Ok(())
    }
    fn resumes(&self) -> bool {
        true
    }
    fn fetch(&self, fs: &dyn Fs, req: &Request<'_>, part: &Path) -> stack::Result<Fetched> {
        let b = reg().lock().unwrap().get(req.md5).cloned().unwrap();
        stream_to_part(fs, b.as_slice(), part)
    }
}
fn do_pull_r(fs: &SimFs, m: &serde_json::Value) -> stack::Result<()> {
    pull_with(fs, &R, LinkMode::Hardlink, m)
}
fn manifest2(m1: &str, m2: &str) -> serde_json::Value {
    json!({"direct_tables": [{"id": "t1", "name": "n1", "md5": m1,
        "query_mode": "local", "parquet_url": "/api/data/t1/download"},
        {"id": "t2", "name": "n2", "md5": m2,
        "query_mode": "local", "parquet_url": "/api/data/t2/download"}],
        "data_packages": [{"slug": "p", "id": "p", "name": "p", "tables": [{"id": "t1", "name": "n1", "md5": m1,
        "query_mode": "local", "parquet_url": "/api/data/t1/download"}]}], "memory_domains": []})
}

#[test]
fn resuming_origin_power_loss_at_every_op() {
    let a = content("r version a");
    let b = content("r version b");
    let c = content("r version c");
    let base = SimFs::new();
    do_pull_r(&base, &manifest2(&a, &a)).unwrap();
    base.make_durable();
    let probe = base.reboot(Crash::Process);
    let n0 = probe.ops();
    do_pull_r(&probe, &manifest2(&b, &c)).unwrap();
    let n = probe.ops() - n0;
    let mut checked = 0;
    for i in 0..n {
        let modes: Vec<Crash> = [
            Crash::Process,
            Crash::PowerLossPessimistic,
            Crash::PowerLossOptimistic,
        ]
        .into_iter()
        .chain((0..64u64).map(|s| Crash::PowerLossRandom(s * 7919 + i)))
        .collect();
        for mode in modes {
            let fs = base.reboot(Crash::Process);
            fs.crash_after(i);
            let _ = do_pull_r(&fs, &manifest2(&b, &c));
            let fs = fs.reboot(mode);
            recover(Arc::new(fs.clone()), &Layout::new(ROOT))
                .unwrap_or_else(|e| panic!("recover at {i} {mode:?}: {e}"));
            do_pull_r(&fs, &manifest2(&b, &c))
                .unwrap_or_else(|e| panic!("pull after {i} {mode:?}: {e}\n{:#?}", fs.op_log()));
            let snap = fs.snapshot();
            for (t, want) in [("t1", "r version b"), ("t2", "r version c")] {
                match snap.get(Path::new(&format!("{ROOT}/data/_shared/{t}.parquet"))) {
                    Some(SnapEntry::File { bytes, readonly }) => {
                        assert_eq!(bytes, want.as_bytes(), "{i} {mode:?}");
                        assert!(*readonly, "{t} writable after {i} {mode:?}");
                    }
                    other => panic!("{i} {mode:?}: {other:?}"),
                }
            }
            let v = stack::verify::audit(
                &fs,
                &Layout::new(ROOT),
                &stack::replay::state::read_state(&fs, &Layout::new(ROOT))
                    .unwrap()
                    .unwrap(),
                stack::verify::Contents::RehashMd5(1),
            )
            .unwrap();
            assert!(v.is_empty(), "{i} {mode:?}: {v:?}");
            checked += 1;
        }
    }
    eprintln!("checked {checked} states over {n} ops");
}
