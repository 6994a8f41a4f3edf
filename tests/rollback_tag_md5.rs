//! A rollback when the manifest's md5 is not the md5 of the bytes (the library
//! API with an injected `md5_of`, as the reference suite uses; or a bundle
//! under `BundleCheck::TrustServer`): undo and a put's redo recognise the
//! step's own file by the staged file it came from, not by a hash, and the
//! rollback leaves the old stack exactly.

mod support;

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use stack::fs::fault::{Fault, FaultFs};
use stack::fs::sim::SimFs;
use stack::fs::Fs;
use stack::reconcile::origin::{md5_file, stream_to_part, Fetched, Origin, Request};
use stack::reconcile::pull::SyncReport;
use stack::{BundleCheck, LinkMode};
use support::sim_stack::*;

/// Serves `"bytes of <md5>"` and reports the md5 the manifest asked for, as an
/// injected `md5_of` that maps content to the manifest's md5 does.
struct Tagged;

impl Origin for Tagged {
    fn resolve(&self, _url: &str) -> Result<(), String> {
        Ok(())
    }
    fn fetch(&self, fs: &dyn Fs, req: &Request<'_>, part: &Path) -> stack::Result<Fetched> {
        let body = if req.md5 == hexmd5(b"honest c") {
            "honest c".to_string()
        } else {
            format!("bytes of {}", req.md5)
        };
        let got = stream_to_part(fs, body.as_bytes(), part)?;
        Ok(Fetched {
            md5: req.md5.to_string(),
            bytes_fetched: got.bytes_fetched,
        })
    }
}

fn run(fs: Arc<dyn Fs>, m: &Value, link: LinkMode) -> stack::Result<SyncReport> {
    let reader = fs.clone();
    // The injected hash: "bytes of X" has md5 X.
    let hash = move |p: &Path| {
        let b = reader.read(p)?;
        match std::str::from_utf8(&b)
            .ok()
            .and_then(|s| s.strip_prefix("bytes of "))
        {
            Some(tag) => Ok(tag.to_string()),
            None => md5_file(reader.as_ref(), p),
        }
    };
    pull_sim(fs, &Tagged, m, link, BundleCheck::TrustServer, &hash)
}

const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const C: &str = "cccccccccccccccccccccccccccccccc";
const F: &str = "ffffffffffffffffffffffffffffffff";

fn old() -> Value {
    manifest(
        vec![],
        vec![package("p1", vec![table_md5("tbl_a", "a", A)])],
        vec![],
    )
}

fn check(new: Value, denied: &'static str, link: LinkMode) {
    let fs = SimFs::new();
    fs.create_dirs(ROOT).unwrap();
    run(Arc::new(fs.clone()), &old(), link).unwrap();
    let before = view(&fs).unwrap();
    let ffs = FaultFs::new(fs.clone());
    ffs.arm(Fault::Denied { under: denied });
    let got = run(Arc::new(ffs), &new, link);
    eprintln!("pull: {:?}", got.as_ref().map(|r| &r.warnings));
    let after = view(&fs).unwrap();
    assert!(
        after == before,
        "{link:?}: after the rollback, not the old stack: {}",
        describe_diff(&after, &before)
    );
}

#[test]
fn rollback_removes_a_new_shared_file_whose_md5_is_a_tag() {
    let new = manifest(
        vec![],
        vec![package(
            "p1",
            vec![table_md5("tbl_a", "a", A), table_md5("tbl_c", "c", C)],
        )],
        vec![],
    );
    check(new, "/stack/data/p1", LinkMode::Symlink);
}

#[test]
fn rollback_removes_a_new_bundle_under_trust_server() {
    let honest = hexmd5(b"honest c");
    let new = manifest(
        vec![],
        vec![package(
            "p1",
            vec![table_md5("tbl_a", "a", A), table_md5("tbl_c", "c", &honest)],
        )],
        vec![serde_json::json!({"slug": "finance", "md5": F})],
    );
    check(new, "/stack/data/p1", LinkMode::Symlink);
}

/// Every I/O fault point of a pull that adds a domain and updates one, with
/// bundles under `TrustServer` (the md5 is a version tag): after the pull and
/// the next recovery, the stack is entirely old or entirely new.
#[test]
fn trust_server_bundles_old_or_new_under_every_io_fault() {
    let d = |slug: &str, md5: &str| serde_json::json!({"slug": slug, "md5": md5});
    let honest = hexmd5(b"honest c");
    let old = manifest(
        vec![],
        vec![package("p1", vec![table_md5("tbl_c", "c", &honest)])],
        vec![d("ops", A)],
    );
    let new = manifest(
        vec![],
        vec![package("p1", vec![table_md5("tbl_c", "c", &honest)])],
        vec![d("ops", C), d("finance", F)],
    );
    let base = SimFs::new();
    base.create_dirs(ROOT).unwrap();
    run(Arc::new(base.clone()), &old, LinkMode::Symlink).unwrap();
    let before = view(&base).unwrap();
    let clean = base.reboot(stack::fs::sim::Crash::Process);
    let counting = FaultFs::new(clean.clone());
    run(Arc::new(counting.clone()), &new, LinkMode::Symlink).unwrap();
    let after_new = view(&clean).unwrap();
    let mut bad = Vec::new();
    for op in 0..counting.ops() {
        let sim = base.reboot(stack::fs::sim::Crash::Process);
        let ffs = FaultFs::new(sim.clone());
        ffs.arm(Fault::Io { op });
        let got = run(Arc::new(ffs.clone()), &new, LinkMode::Symlink);
        ffs.clear();
        let rec = stack::reconcile::recover::recover(Arc::new(ffs), &layout());
        let v = view(&sim).unwrap();
        eprintln!(
            "op {op}: {} {:?}",
            if v == before {
                "old"
            } else if v == after_new {
                "new"
            } else {
                "MIXED"
            },
            got.as_ref().err().map(|e| e.to_string())
        );
        if v != before && v != after_new {
            bad.push(format!(
                "op {op}: {:?} / recover {:?}: old: {} new: {}",
                got.as_ref().err(),
                rec.as_ref().map(|r| &r.notes),
                describe_diff(&v, &before),
                describe_diff(&v, &after_new)
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} mixed stacks:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

/// A new domain's bundle put, then the update of another domain's bundle
/// refused (its folder denies writes): the pull rolls back.
#[test]
fn rollback_removes_a_new_bundle_under_trust_server_denied() {
    let d = |slug: &str, md5: &str| serde_json::json!({"slug": slug, "md5": md5});
    let honest = hexmd5(b"honest c");
    let old = manifest(
        vec![],
        vec![package("p1", vec![table_md5("tbl_c", "c", &honest)])],
        vec![d("ops", A)],
    );
    let new = manifest(
        vec![],
        vec![package("p1", vec![table_md5("tbl_c", "c", &honest)])],
        vec![d("ops", C), d("finance", F)],
    );
    let fs = SimFs::new();
    fs.create_dirs(ROOT).unwrap();
    run(Arc::new(fs.clone()), &old, LinkMode::Symlink).unwrap();
    let before = view(&fs).unwrap();
    let ffs = FaultFs::new(fs.clone());
    ffs.arm(Fault::Denied {
        under: "/stack/memory/ops",
    });
    let got = run(Arc::new(ffs), &new, LinkMode::Symlink);
    eprintln!(
        "pull: {:?}",
        got.as_ref().map(|r| &r.warnings).map_err(|e| e.to_string())
    );
    let after = view(&fs).unwrap();
    for (p, _) in fs.snapshot() {
        eprintln!("  {}", p.display());
    }
    assert!(
        after == before,
        "not the old stack: {}",
        describe_diff(&after, &before)
    );
}

/// A crash (the process stops) after every operation of a pull whose table
/// md5s are tags, then recovery on a sound disk: a transaction past its
/// commit point is rolled forward, never back because a redo took its own
/// file for another's; the stack ends old or new.
#[test]
fn tag_md5_pull_rolls_forward_after_a_crash_anywhere() {
    let new = manifest(
        vec![],
        vec![
            package(
                "p1",
                vec![table_md5("tbl_a", "a", A), table_md5("tbl_c", "c", C)],
            ),
            package("p2", vec![table_md5("tbl_f", "f", F)]),
        ],
        vec![],
    );
    let base = SimFs::new();
    base.create_dirs(ROOT).unwrap();
    run(Arc::new(base.clone()), &old(), LinkMode::Symlink).unwrap();
    base.make_durable();
    let before = view(&base).unwrap();
    let clean = base.reboot(stack::fs::sim::Crash::Process);
    let start = clean.ops();
    run(Arc::new(clean.clone()), &new, LinkMode::Symlink).unwrap();
    let after_new = view(&clean).unwrap();
    let ops = clean.ops() - start;
    let mut bad = Vec::new();
    for n in 0..ops {
        let sim = base.reboot(stack::fs::sim::Crash::Process);
        sim.crash_after(n);
        if run(Arc::new(sim.clone()), &new, LinkMode::Symlink).is_ok() {
            continue;
        }
        let sim = sim.reboot(stack::fs::sim::Crash::Process);
        let rec = stack::reconcile::recover::recover(Arc::new(sim.clone()), &layout());
        let v = view(&sim).unwrap();
        let failed_forward = rec
            .as_ref()
            .map(|r| {
                r.notes
                    .iter()
                    .any(|n| n.contains("rolling it forward failed"))
            })
            .unwrap_or(true);
        if failed_forward || (v != before && v != after_new) {
            bad.push(format!(
                "crash after {n}: {:?}: old: {} new: {}",
                rec.as_ref().map(|r| &r.notes).map_err(|e| e.to_string()),
                describe_diff(&v, &before),
                describe_diff(&v, &after_new)
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
