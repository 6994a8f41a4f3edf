//! A user's file made at a name a pull's removal vacated: the removal's redo
//! (a roll-forward after a failure) moves it to the quarantine, never over the
//! old file kept in the trash, and a rollback puts the old file back with the
//! user's file kept aside; the user's bytes survive either way.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::Value;
use stack::fs::fault::{Fault, FaultFs};
use stack::fs::sim::{SimFs, SnapEntry};
use stack::fs::Fs;

use stack::reconcile::pull::SyncReport;
use stack::{BundleCheck, LinkMode};
use support::sim_stack::*;

const MINE: &[u8] = b"the user's own bytes, which stack never wrote\n";

fn run(fs: Arc<dyn Fs>, m: &Value) -> stack::Result<SyncReport> {
    let hash = engine_md5(fs.clone());
    pull_sim(
        fs,
        &TestOrigin,
        m,
        LinkMode::Copy,
        BundleCheck::Verify,
        &hash,
    )
}

fn t(tid: &str, name: &str) -> Value {
    table_md5(tid, name, &register(tid, 1, 50))
}
fn d(slug: &str, ver: u64) -> Value {
    serde_json::json!({"slug": slug, "md5": register(&format!("dom_{slug}"), ver, 50)})
}

/// The removal's move of `p1/b` to the trash (a rename that never replaces,
/// or a plain one).
fn removes_b(op: &str) -> bool {
    op.starts_with("rename") && op.contains(" /stack/data/p1/b.parquet -> ")
}

fn where_mine(fs: &SimFs) -> Vec<String> {
    fs.snapshot()
        .into_iter()
        .filter(|(_, e)| matches!(e, SnapEntry::File { bytes, .. } if bytes == MINE))
        .map(|(p, _)| p.display().to_string())
        .collect()
}

/// A pull removes `p1/b` (moved to the trash), the user then writes a file of
/// their own at `p1/b`, and a later step fails on a fault that persists: the
/// pull says "rolled back to the previous stack, which is intact". The
/// same-command roll-forward attempt redoes the `RemoveRef`, whose `to_trash`
/// renames the user's file over the kept old reference; the rollback then puts
/// the user's file back as if it were the old reference. Result: the old `b`
/// is gone, the state lists `b` with tbl_b's md5, and `b` holds the user's bytes.
#[test]
fn a_users_file_at_a_removed_name_survives_the_rollback() {
    let old = manifest(
        vec![],
        vec![package("p1", vec![t("tbl_a", "a"), t("tbl_b", "b")])],
        vec![d("ops", 1)],
    );
    let new = manifest(
        vec![],
        vec![package("p1", vec![t("tbl_a", "a")])],
        vec![d("ops", 2)],
    );
    let fs = SimFs::new();
    fs.create_dirs(ROOT).unwrap();
    run(Arc::new(fs.clone()), &old).unwrap();
    let before = view(&fs).unwrap();
    let user = fs.clone();
    let armed = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let (a2, d2) = (armed.clone(), done.clone());
    fs.before_each_op(move |desc| {
        if a2.load(Ordering::SeqCst) && !d2.swap(true, Ordering::SeqCst) {
            user.write_file("/stack/data/p1/b.parquet", MINE).unwrap();
        }
        if removes_b(desc) {
            a2.store(true, Ordering::SeqCst);
        }
    });
    let ffs = FaultFs::new(fs.clone());
    ffs.arm(Fault::Denied {
        under: "/stack/memory/ops",
    });
    let err = run(Arc::new(ffs), &new).expect_err("the pull rolls back");
    assert!(err.to_string().contains("rolled back"), "{err}");
    assert!(
        done.load(Ordering::SeqCst),
        "the user's file was never written"
    );
    for l in fs.op_log() {
        if l.contains("p1/b.parquet") {
            eprintln!("{l}");
        }
    }
    assert_eq!(where_mine(&fs).len(), 1, "the user's bytes are gone");
    let mut after = view(&fs).unwrap();
    let mut old_view = before.clone();
    // Whatever the user's file became, the rest must be the old stack, and
    // the old reference must be somewhere (at its name, or the user's file
    // in the quarantine and the old reference back).
    after.tree.remove("data/p1/b.parquet");
    old_view.tree.remove("data/p1/b.parquet");
    assert_eq!(after, old_view);
    assert_eq!(
        fs.read(Path::new("/stack/data/p1/b.parquet")).unwrap(),
        match &before.tree["data/p1/b.parquet"] {
            SnapEntry::File { bytes, .. } => bytes.clone(),
            e => panic!("{e:?}"),
        },
        "after the rollback, p1/b is not the old reference (the state says it is)"
    );
}

/// The same user's file, with an I/O error at each operation of the pull and
/// a recovery (which rolls the pull forward) once the disk is sound again.
#[test]
fn a_users_file_at_a_removed_name_survives_a_roll_forward() {
    let old = manifest(
        vec![],
        vec![package("p1", vec![t("tbl_a", "a"), t("tbl_b", "b")])],
        vec![d("ops", 1)],
    );
    let new = manifest(
        vec![],
        vec![package("p1", vec![t("tbl_a", "a")])],
        vec![d("ops", 2)],
    );
    let base = SimFs::new();
    base.create_dirs(ROOT).unwrap();
    run(Arc::new(base.clone()), &old).unwrap();
    let counting = FaultFs::new(base.reboot(stack::fs::sim::Crash::Process));
    run(Arc::new(counting.clone()), &new).unwrap();
    let mut lost = Vec::new();
    for op in 0..counting.ops() {
        let fs = base.reboot(stack::fs::sim::Crash::Process);
        let user = fs.clone();
        let armed = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let (a2, d2) = (armed.clone(), done.clone());
        fs.before_each_op(move |desc| {
            if a2.load(Ordering::SeqCst) && !d2.swap(true, Ordering::SeqCst) {
                user.write_file("/stack/data/p1/b.parquet", MINE).unwrap();
            }
            if removes_b(desc) {
                a2.store(true, Ordering::SeqCst);
            }
        });
        let ffs = FaultFs::new(fs.clone());
        ffs.arm(Fault::Io { op });
        let got = run(Arc::new(ffs.clone()), &new);
        if !done.load(Ordering::SeqCst) {
            continue;
        }
        ffs.clear();
        let rec = stack::reconcile::recover::recover(Arc::new(ffs), &layout());
        if where_mine(&fs).is_empty() {
            lost.push(format!(
                "op {op}: pull {:?}; recover {:?}",
                got.as_ref().err().map(|e| e.to_string()),
                rec.as_ref().map(|r| &r.notes).map_err(|e| e.to_string())
            ));
        }
    }
    assert!(
        lost.is_empty(),
        "the user's bytes were destroyed in {} runs:\n{}",
        lost.len(),
        lost.join("\n")
    );
}
