//! A pull on a filesystem without `renameat2(RENAME_NOREPLACE)` (the seam's
//! link-then-unlink fallback), and on one without hard links either (some FUSE
//! filesystems: a check, then a rename).
//!
//! A user's file appears at a put's name during the downloads, so the apply
//! moves it to the quarantine by a no-replace rename. Without the flag, that
//! move is a link and an unlink: a crash between the two leaves both names on
//! one inode, and the roll-forward must finish the move, not refuse it. Without
//! hard links, a pull must still work.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::Value;
use stack::fs::fault::{FaultFs, Lacks};
use stack::fs::sim::{Crash, SimFs, SnapEntry};
use stack::fs::Fs;
use stack::reconcile::origin::{Fetched, Origin, Request};
use stack::reconcile::pull::SyncReport;
use stack::reconcile::recover::recover;
use stack::{BundleCheck, LinkMode};
use support::sim_stack::*;

const MINE: &[u8] = b"the user's own bytes, which stack never wrote\n";
const NAME: &str = "/stack/data/p1/c.parquet";

/// The test origin; the first download first writes the user's file at `NAME`
/// (after the preflight looked for files in the way).
struct UserWrites {
    fs: SimFs,
    ran: AtomicBool,
}

impl UserWrites {
    fn once(&self) {
        if !self.ran.swap(true, Ordering::SeqCst) {
            self.fs.write_file(NAME, MINE).unwrap();
        }
    }
}

impl Origin for UserWrites {
    fn resolve(&self, url: &str) -> Result<(), String> {
        TestOrigin.resolve(url)
    }
    fn fetch(&self, fs: &dyn Fs, req: &Request<'_>, part: &Path) -> stack::Result<Fetched> {
        self.once();
        TestOrigin.fetch(fs, req, part)
    }
    fn read_small(&self, req: &Request<'_>) -> Option<stack::Result<Vec<u8>>> {
        self.once();
        TestOrigin.read_small(req)
    }
}

fn run(fs: Arc<dyn Fs>, origin: &dyn Origin, m: &Value) -> stack::Result<SyncReport> {
    let hash = engine_md5(fs.clone());
    pull_sim(
        fs,
        origin,
        m,
        LinkMode::Hardlink,
        BundleCheck::Verify,
        &hash,
    )
}

fn t(tid: &str, name: &str, ver: u64) -> Value {
    table_md5(tid, name, &register(tid, ver, 50))
}

fn old() -> Value {
    manifest(
        vec![],
        vec![package("p1", vec![t("tbl_a", "a", 1), t("tbl_b", "b", 1)])],
        vec![],
    )
}

/// Adds `p1/c` (where the user's file appears), updates `a`, removes `b`.
fn new() -> Value {
    manifest(
        vec![],
        vec![package("p1", vec![t("tbl_a", "a", 2), t("tbl_c", "c", 1)])],
        vec![serde_json::json!({"slug": "ops", "md5": register("dom_ops", 1, 50)})],
    )
}

fn where_mine(fs: &SimFs) -> Vec<String> {
    fs.snapshot()
        .into_iter()
        .filter(|(_, e)| matches!(e, SnapEntry::File { bytes, .. } if bytes == MINE))
        .map(|(p, _)| p.display().to_string())
        .collect()
}

/// A view without the files' modes.
fn content(mut v: View) -> View {
    for e in v.tree.values_mut() {
        if let SnapEntry::File { readonly, .. } = e {
            *readonly = false;
        }
    }
    v
}

/// A view without the user's file at `NAME` (there when a pull rolled back).
fn stack_only(mut v: View) -> View {
    let rel = NAME.trim_start_matches("/stack/");
    if matches!(v.tree.get(rel), Some(SnapEntry::File { bytes, .. }) if bytes == MINE) {
        v.tree.remove(rel);
    }
    v
}

/// The old stack pulled on a plain simulated disk.
fn base() -> SimFs {
    let fs = SimFs::new();
    fs.create_dirs(ROOT).unwrap();
    run(Arc::new(fs.clone()), &TestOrigin, &old()).unwrap();
    fs.make_durable();
    fs
}

/// The new stack as a pull on a plain disk leaves it (the user's file in the
/// quarantine).
fn new_view() -> View {
    let fs = base();
    let origin = UserWrites {
        fs: fs.clone(),
        ran: AtomicBool::new(false),
    };
    run(Arc::new(fs.clone()), &origin, &new()).unwrap();
    view(&fs).unwrap()
}

/// Neither `RENAME_NOREPLACE` nor hard links (s3fs, rclone): the pull works
/// (by copies, and by a check then a rename), the user's file is kept.
#[test]
fn a_pull_works_without_hard_links_or_renameat2() {
    let fs = base();
    let lacking = FaultFs::new(fs.clone()).lacking(Lacks {
        rename_noreplace: true,
        hard_links: true,
    });
    let origin = UserWrites {
        fs: fs.clone(),
        ran: AtomicBool::new(false),
    };
    let report = run(Arc::new(lacking), &origin, &new()).expect("the pull works");
    assert!(
        report.warnings.iter().any(|w| w.contains("p1/c.parquet")),
        "{:?}",
        report.warnings
    );
    // (The references are copies, not hard links: only their mode differs.)
    assert_eq!(content(view(&fs).unwrap()), content(new_view()));
    assert_eq!(
        where_mine(&fs),
        ["/stack/.stack/quarantine/2/data/p1/c.parquet"]
    );
}

/// Without `RENAME_NOREPLACE`, a crash after every operation of the pull,
/// then recovery on the same disk: the stack is old or new, the user's bytes
/// survive, and a crash between the link and the unlink of a move to the
/// quarantine is rolled forward (the move finished, not refused).
#[test]
fn a_move_cut_between_link_and_unlink_is_finished() {
    let lacks = Lacks {
        rename_noreplace: true,
        hard_links: false,
    };
    let old_view = view(&base()).unwrap();
    let new_view = new_view();
    let counting = FaultFs::new(base()).lacking(lacks);
    let origin = UserWrites {
        fs: counting.inner().clone(),
        ran: AtomicBool::new(false),
    };
    run(Arc::new(counting.clone()), &origin, &new()).unwrap();
    let mut cut = 0;
    let mut bad = Vec::new();
    for n in 0..counting.inner().ops() {
        let fs = base();
        let origin = UserWrites {
            fs: fs.clone(),
            ran: AtomicBool::new(false),
        };
        fs.crash_after(n);
        let got = run(
            Arc::new(FaultFs::new(fs.clone()).lacking(lacks)),
            &origin,
            &new(),
        );
        if got.is_ok() {
            continue;
        }
        // The last operation done (the one after it crashed) was a link
        // into the quarantine.
        let log = fs.op_log();
        let between = log.iter().rev().nth(1).is_some_and(|op| {
            op.contains(" link /stack/.stack/quarantine/") && !op.contains("CRASH")
        });
        let fs = fs.reboot(Crash::Process);
        let rec = recover(Arc::new(FaultFs::new(fs.clone()).lacking(lacks)), &layout());
        let v = stack_only(view(&fs).unwrap());
        let outcome = if v == new_view {
            "new"
        } else if v == old_view {
            "old"
        } else {
            "mixed"
        };
        cut += usize::from(between);

        if rec.is_err()
            || outcome == "mixed"
            || (between && outcome != "new")
            || (origin.ran.load(Ordering::SeqCst) && where_mine(&fs).is_empty())
        {
            bad.push(format!(
                "crash after {n} ops (between link and unlink: {between}): {outcome}, \
                 recover {:?}, mine at {:?}",
                rec.as_ref().map(|r| &r.notes).map_err(|e| e.to_string()),
                where_mine(&fs)
            ));
        }
    }
    assert!(cut > 0, "no crash fell between a link and its unlink");
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
