//! A user's bytes against a pull's apply and rollback (contract §5: a pull never
//! deletes or overwrites a file stack did not write).
//!
//! The preflight looks for files in the way before the downloads; these tests
//! make the user's file appear later — during the downloads (through the
//! origin), after a crash, or where the quarantine refuses it — and check that
//! its bytes survive: at their name, or in `.stack/quarantine/`, said in the
//! report.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::Value;
use stack::fs::fault::{Fault, FaultFs};
use stack::fs::sim::{Crash, SimFs, SnapEntry};
use stack::fs::Fs;
use stack::reconcile::origin::{md5_file, Fetched, Origin, Request};
use stack::reconcile::pull::SyncReport;
use stack::reconcile::recover::recover;
use stack::{BundleCheck, LinkMode};
use support::sim_stack::*;

const MINE: &[u8] = b"the user's own bytes, which stack never wrote\n";

fn table(tid: &str, name: &str, ver: u64) -> Value {
    table_md5(tid, name, &register(tid, ver, 50))
}

fn domain(slug: &str, ver: u64) -> Value {
    serde_json::json!({"slug": slug, "md5": register(&format!("dom_{slug}"), ver, 50)})
}

/// The test origin, which first runs `hook` once (on the first download).
struct Hooked<F: Fn() + Send + Sync> {
    hook: F,
    ran: AtomicBool,
}

impl<F: Fn() + Send + Sync> Hooked<F> {
    fn once(&self) {
        if !self.ran.swap(true, Ordering::SeqCst) {
            (self.hook)();
        }
    }
}

impl<F: Fn() + Send + Sync> Origin for Hooked<F> {
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

fn pull_with(
    fs: Arc<dyn Fs>,
    origin: &dyn Origin,
    m: &Value,
    link: LinkMode,
) -> stack::Result<SyncReport> {
    let hash = engine_md5(fs.clone());
    pull_sim(fs, origin, m, link, BundleCheck::Verify, &hash)
}

fn plain_pull(fs: &SimFs, m: &Value, link: LinkMode) -> SyncReport {
    pull_with(Arc::new(fs.clone()), &TestOrigin, m, link).unwrap()
}

/// Where the user's bytes are now (every path that holds exactly them).
fn where_mine(fs: &SimFs) -> Vec<String> {
    fs.snapshot()
        .into_iter()
        .filter(|(_, e)| matches!(e, SnapEntry::File { bytes, .. } if bytes == MINE))
        .map(|(p, _)| p.display().to_string())
        .collect()
}

fn old_stack() -> Value {
    manifest(
        vec![table("tbl_d", "d", 1)],
        vec![package("p1", vec![table("tbl_a", "a", 1)])],
        vec![domain("ops", 1)],
    )
}

/// The old stack plus a new table in `p1`, in `_direct` and a changed domain:
/// new names in folders that exist (nothing is placed whole).
fn new_stack() -> Value {
    manifest(
        vec![table("tbl_d", "d", 1), table("tbl_e", "e", 1)],
        vec![package(
            "p1",
            vec![table("tbl_a", "a", 1), table("tbl_c", "c", 1)],
        )],
        vec![domain("ops", 2)],
    )
}

/// The names the new stack writes that the old one does not hold, in folders
/// that exist: where a user's file may appear after the preflight looked.
const NEW_NAMES: [&str; 4] = [
    "data/p1/c.parquet",
    "data/_direct/e.parquet",
    "data/_shared/tbl_c.parquet",
    "data/_shared/tbl_e.parquet",
];

fn fresh(link: LinkMode) -> SimFs {
    let fs = SimFs::new();
    fs.create_dirs(ROOT).unwrap();
    plain_pull(&fs, &old_stack(), link);
    fs
}

/// (a) A file the user makes at a name the pull puts, after the preflight
/// looked (during the downloads): the manifest's file takes the name, and the
/// user's file is in the quarantine, said in the report — never in the trash
/// that `finish` empties.
#[test]
fn a_file_made_during_the_downloads_at_a_put_name_is_quarantined() {
    for link in [LinkMode::Symlink, LinkMode::Copy, LinkMode::Hardlink] {
        for rel in NEW_NAMES {
            let fs = fresh(link);
            let at = Path::new(ROOT).join(rel);
            let writer = fs.clone();
            let origin = Hooked {
                hook: move || writer.write_file(&at, MINE).unwrap(),
                ran: AtomicBool::new(false),
            };
            let rep = pull_with(Arc::new(fs.clone()), &origin, &new_stack(), link)
                .unwrap_or_else(|e| panic!("{link:?} {rel}: the pull failed: {e}"));
            let kept = format!("{ROOT}/.stack/quarantine/{}/{rel}", rep.txn);
            assert_eq!(
                where_mine(&fs),
                vec![kept.clone()],
                "{link:?} {rel}: the user's bytes are not (only) in the quarantine"
            );
            assert!(
                rep.warnings
                    .iter()
                    .any(|w| w.contains(rel) && w.contains(&kept[ROOT.len() + 1..])),
                "{link:?} {rel}: the report does not say where they went: {:?}",
                rep.warnings
            );
            // The stack is the new one.
            let hash = |p: &Path| md5_file(&fs, p);
            let state = stack::replay::state::read_state(&fs, &layout())
                .unwrap()
                .unwrap();
            let v = stack::verify::audit(
                &fs,
                &layout(),
                &state,
                stack::verify::Contents::Rehash(&hash, 1),
            )
            .unwrap();
            assert!(v.is_empty(), "{link:?} {rel}: {v:?}");
        }
    }
}

/// (a) The same for a bundle the user writes into a domain folder that the
/// pull creates (`memory/<slug>/bundle.md` of a new domain), while it downloads.
#[test]
fn a_bundle_made_during_the_downloads_is_quarantined() {
    let fs = fresh(LinkMode::Symlink);
    let mut new = old_stack();
    new["memory_domains"]
        .as_array_mut()
        .unwrap()
        .push(domain("finance", 1));
    let rel = "memory/finance/bundle.md";
    let at = Path::new(ROOT).join(rel);
    let writer = fs.clone();
    let origin = Hooked {
        hook: move || writer.write_file(&at, MINE).unwrap(),
        ran: AtomicBool::new(false),
    };
    let rep = pull_with(Arc::new(fs.clone()), &origin, &new, LinkMode::Symlink).unwrap();
    let kept = format!("{ROOT}/.stack/quarantine/{}/{rel}", rep.txn);
    assert_eq!(where_mine(&fs), vec![kept], "{:?}", rep.warnings);
}

/// (b) A file stack did not write where the pull puts one, which the
/// quarantine refuses to take (its folder denies writes): the pull fails
/// (rolled back), it never proceeds to overwrite; the user's file stays at its
/// name and the stack is the old one.
#[test]
fn a_stray_the_quarantine_refuses_fails_the_pull_and_stays() {
    for link in [LinkMode::Symlink, LinkMode::Copy] {
        for rel in ["data/p1/c.parquet", "data/_direct/e.parquet"] {
            let fs = fresh(link);
            let at = Path::new(ROOT).join(rel);
            fs.write_file(&at, MINE).unwrap();
            let before = view(&fs).unwrap();
            let ffs = FaultFs::new(fs.clone());
            ffs.arm(Fault::Denied {
                under: "/stack/.stack/quarantine",
            });
            let got = pull_with(Arc::new(ffs.clone()), &TestOrigin, &new_stack(), link);
            assert_eq!(
                where_mine(&fs),
                vec![at.display().to_string()],
                "{link:?} {rel}: {got:?}"
            );
            let err = got.expect_err("the pull must fail, not overwrite");
            assert!(
                err.to_string().contains("rolled back"),
                "{link:?} {rel}: {err}"
            );
            assert_eq!(
                view(&fs).unwrap(),
                before,
                "{link:?} {rel}: not the old stack"
            );
            // Once the quarantine takes it, the next pull moves it there.
            ffs.clear();
            let rep = pull_with(Arc::new(ffs), &TestOrigin, &new_stack(), link).unwrap();
            let kept = format!("{ROOT}/.stack/quarantine/{}/{rel}", rep.txn);
            assert_eq!(where_mine(&fs), vec![kept], "{link:?} {rel}");
        }
    }
}

/// (b) The report says a file was moved to the quarantine only if it was: a
/// file in the way that the user removes during the downloads was not moved.
#[test]
fn the_report_names_only_quarantine_moves_that_happened() {
    let fs = fresh(LinkMode::Symlink);
    let rel = "data/p1/c.parquet";
    let at = Path::new(ROOT).join(rel);
    fs.write_file(&at, MINE).unwrap();
    let remover = fs.clone();
    let origin = Hooked {
        hook: move || remover.remove_file(&at).unwrap(),
        ran: AtomicBool::new(false),
    };
    let rep = pull_with(
        Arc::new(fs.clone()),
        &origin,
        &new_stack(),
        LinkMode::Symlink,
    )
    .unwrap();
    assert!(where_mine(&fs).is_empty());
    assert!(
        !rep.warnings.iter().any(|w| w.contains("moved to")),
        "the report claims a move that did not happen: {:?}",
        rep.warnings
    );
}

/// The operation index of the first mutation whose log line contains `what`.
fn op_index(log: &[String], what: &str) -> u64 {
    log.iter()
        .filter(|l| l.starts_with('#'))
        .find(|l| l.contains(what))
        .and_then(|l| l[1..].split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no operation {what:?} in\n{}", log.join("\n")))
}

/// (c) A pull fails past its commit point (`data/_shared` refuses writes)
/// before its new reference `p1/c` is made, and its rollback is cut by a crash
/// once its marker is durable. The user then makes a file at `p1/c`'s name.
/// The recovery that finishes the rollback must not take that file for the
/// reference the pull made: its bytes survive.
#[test]
fn a_rollback_leaves_a_users_file_at_the_name_of_a_put_that_never_ran() {
    for link in [LinkMode::Symlink, LinkMode::Copy] {
        let fs = fresh(link);
        fs.make_durable();
        let run = |crash: Option<u64>| {
            let sim = fs.reboot(Crash::Process);
            if let Some(n) = crash {
                sim.crash_after(n);
            }
            let ffs = FaultFs::new(sim.clone());
            ffs.arm(Fault::Denied {
                under: "/stack/data/_shared",
            });
            let got = pull_with(Arc::new(ffs), &TestOrigin, &new_stack(), link);
            (sim, got)
        };
        let (counting, got) = run(None);
        let err = got.expect_err("the pull rolls back");
        assert!(err.to_string().contains("rolled back"), "{err}");
        // Crash right after the syncfs that made the marker durable.
        let log = counting.op_log();
        let marker = op_index(&log, "rolling-back");
        let (sim, got) = run(Some(marker + 2));
        assert!(got.is_err_and(|e| e.is_crash()));
        let sim = sim.reboot(Crash::PowerLossPessimistic);
        assert!(sim.snapshot().keys().any(|p| p.ends_with("rolling-back")));
        let rel = "data/p1/c.parquet";
        sim.write_file(Path::new(ROOT).join(rel), MINE).unwrap();
        let rec = recover(Arc::new(sim.clone()), &layout()).unwrap();
        let found = where_mine(&sim);
        assert_eq!(
            found.len(),
            1,
            "{link:?}: the user's bytes are gone after the rollback ({:?})",
            rec.notes
        );
    }
}

/// Make the user's file appear at `at` right before the first rename (plain or
/// no-replace) from `from_part` onto `at`: in the window between the engine's
/// look at the name and its rename.
fn appear_before_rename(fs: &SimFs, from_part: &'static str, at: &'static str) {
    let user = fs.clone();
    let mut done = false;
    fs.before_each_op(move |desc| {
        let renames = desc.starts_with("rename ") || desc.starts_with("rename_noreplace ");
        if !done && renames && desc.contains(from_part) && desc.ends_with(&format!("-> {at}")) {
            done = true;
            user.write_file(at, MINE).unwrap();
        }
    });
}

/// (d) A file that appears at a put's name after the put made room there and
/// before its rename (a copy is made in `.stack/tmp` and renamed in): the
/// rename never replaces it; it goes to the quarantine and the put is retried.
#[test]
fn a_file_made_just_before_a_puts_rename_is_quarantined() {
    let fs = fresh(LinkMode::Copy);
    appear_before_rename(&fs, "/.stack/tmp/", "/stack/data/p1/c.parquet");
    let rep = plain_pull(&fs, &new_stack(), LinkMode::Copy);
    let kept = format!("{ROOT}/.stack/quarantine/{}/data/p1/c.parquet", rep.txn);
    assert_eq!(where_mine(&fs), vec![kept], "{:?}", rep.warnings);
    assert!(
        rep.warnings.iter().any(|w| w.contains("moved to")),
        "{:?}",
        rep.warnings
    );
}

/// (d) A package folder the pull places whole, made by the user during the
/// downloads (so the staged entries are moved in one by one), and a file that
/// appears at an entry's name after the merge looked and before the entry's
/// rename: never renamed over; it goes to the quarantine first.
#[test]
fn a_file_made_in_the_merge_window_is_quarantined() {
    let fs = fresh(LinkMode::Symlink);
    let mut new = old_stack();
    new["data_packages"]
        .as_array_mut()
        .unwrap()
        .push(package("p9", vec![table("tbl_x", "x", 1)]));
    let writer = fs.clone();
    let origin = Hooked {
        hook: move || {
            writer
                .write_file("/stack/data/p9/notes.txt", b"notes")
                .unwrap()
        },
        ran: AtomicBool::new(false),
    };
    appear_before_rename(&fs, "/.stack/staging/place-", "/stack/data/p9/x.parquet");
    let rep = pull_with(Arc::new(fs.clone()), &origin, &new, LinkMode::Symlink).unwrap();
    let kept = format!("{ROOT}/.stack/quarantine/{}/data/p9/x.parquet", rep.txn);
    assert_eq!(where_mine(&fs), vec![kept], "{:?}", rep.warnings);
    assert_eq!(
        fs.read(Path::new("/stack/data/p9/notes.txt")).unwrap(),
        b"notes"
    );
    assert_eq!(
        fs.read_link(Path::new("/stack/data/p9/x.parquet")).unwrap(),
        Path::new("../_shared/tbl_x.parquet")
    );
}

/// Is the user's file exactly once, at `rel` or in a transaction's quarantine
/// (never only in the trash, which the next cleanup empties)?
fn mine_kept(fs: &SimFs, rel: &str) -> Result<(), String> {
    let found = where_mine(fs);
    let quarantine = format!("{ROOT}/.stack/quarantine/");
    let ok = |p: &String| {
        *p == format!("{ROOT}/{rel}")
            || (p.starts_with(&quarantine) && p.ends_with(&format!("/{rel}")))
    };
    match found.as_slice() {
        [one] if ok(one) => Ok(()),
        _ => Err(format!("the user's bytes are at {found:?}")),
    }
}

/// What the user sees of the stack, `rel` (the user's file's name) left out.
fn without(fs: &SimFs, rel: &str) -> View {
    let mut v = view(fs).unwrap();
    v.tree.remove(rel);
    v
}

/// After a faulted pull: the user's bytes are kept (`kept`) right away, and
/// again after the recovery that follows, and the stack (`rel` left out) is
/// then entirely the old or the new one. `what` names the case in a failure.
fn kept_then_old_or_new(
    sim: &SimFs,
    ffs: FaultFs<SimFs>,
    rel: &str,
    kept: &dyn Fn(&SimFs, &str) -> Result<(), String>,
    [old, new]: [&View; 2],
    what: &dyn Fn(&str, String) -> String,
) {
    if let Err(m) = kept(sim, rel) {
        panic!("{}", what("right after the pull", m));
    }
    ffs.clear();
    recover(Arc::new(ffs), &layout())
        .unwrap_or_else(|e| panic!("{}", what("recovery", e.to_string())));
    if let Err(m) = kept(sim, rel) {
        panic!("{}", what("after recovery", m));
    }
    let v = without(sim, rel);
    assert!(
        v == *old || v == *new,
        "{}",
        what(
            "after recovery",
            format!(
                "neither old nor new: {} / {}",
                describe_diff(&v, old),
                describe_diff(&v, new)
            )
        )
    );
}

/// Folders a fault sweep makes refuse writes, one at a time.
const DENIED: [&str; 6] = [
    "/stack/.stack/quarantine",
    "/stack/data/p1",
    "/stack/data/_shared",
    "/stack/data/_direct",
    "/stack/memory",
    "/stack/.stack/trash",
];

/// EIO, a read-only disk and full metadata from each of a pull's `ops`
/// operations, then each of `denied` refusing writes.
fn every_persistent_fault(ops: u64, denied: &[&'static str]) -> impl Iterator<Item = Fault> {
    let denied = denied.to_vec();
    (0..ops)
        .flat_map(|op| {
            [
                Fault::Io { op },
                Fault::ReadOnly { op },
                Fault::NoSpaceMeta { op },
            ]
        })
        .chain(denied.into_iter().map(|under| Fault::Denied { under }))
}

/// (a), (b), (c) under every persistent fault: a file stack did not write
/// where the pull puts one — there before the pull (a journaled `RemoveStray`)
/// or made during its downloads — with EIO, EROFS and ENOSPC on metadata armed
/// at every operation of the pull, and each folder (the quarantine's included)
/// refusing writes in turn. Right after the pull and after the next recovery
/// once the fault cleared, the user's bytes are at their name or in the
/// quarantine, and the rest of the directory is the old stack or the new one.
#[test]
fn a_users_file_in_the_way_survives_every_persistent_fault() {
    let rel = "data/p1/c.parquet";
    let mut states = 0;
    for (link, during) in [
        (LinkMode::Symlink, false),
        (LinkMode::Copy, false),
        (LinkMode::Symlink, true),
        (LinkMode::Copy, true),
    ] {
        let base = fresh(link);
        let at = Path::new(ROOT).join(rel);
        if !during {
            base.write_file(&at, MINE).unwrap();
        }
        let origin = |fs: &SimFs| {
            let writer = fs.clone();
            let at = at.clone();
            Hooked {
                hook: move || {
                    if during {
                        writer.write_file(&at, MINE).unwrap();
                    }
                },
                ran: AtomicBool::new(false),
            }
        };
        let strip = |fs: &SimFs| without(fs, rel);
        let old = strip(&base);
        let clean = base.reboot(Crash::Process);
        let counting = FaultFs::new(clean.clone());
        pull_with(
            Arc::new(counting.clone()),
            &origin(&clean),
            &new_stack(),
            link,
        )
        .unwrap();
        let new = strip(&clean);
        let n = counting.ops();
        let faults = every_persistent_fault(n, &DENIED[..5]);
        for fault in faults {
            let sim = base.reboot(Crash::Process);
            let ffs = FaultFs::new(sim.clone());
            ffs.arm(fault);
            let hooked = origin(&sim);
            let got = pull_with(Arc::new(ffs.clone()), &hooked, &new_stack(), link);
            // A pull that failed before its downloads: the user made nothing.
            let made = !during || hooked.ran.load(Ordering::SeqCst);
            let mine_kept = |fs: &SimFs, rel: &str| match made {
                true => mine_kept(fs, rel),
                false => where_mine(fs)
                    .is_empty()
                    .then_some(())
                    .ok_or_else(|| "bytes the user never wrote".to_string()),
            };
            let what = |when: &str, m: String| {
                format!("{link:?} made during the pull: {during}, {fault:?} {when}: {m} ({got:?})")
            };
            kept_then_old_or_new(&sim, ffs, rel, &mine_kept, [&old, &new], &what);
            states += 1;
        }
    }
    eprintln!("{states} fault states with a user's file in the way");
    assert!(states > 300, "only {states}");
}

/// gc's report names as moved only the strays it moved: one the quarantine
/// refuses stays where it is, is said in the warnings, and is not in `moved`.
#[test]
fn gcs_report_names_only_the_moves_that_happened() {
    let fs = fresh(LinkMode::Symlink);
    let mine = Path::new(ROOT).join("data/p1/mine.parquet");
    fs.write_file(&mine, MINE).unwrap();
    let ffs = FaultFs::new(fs.clone());
    ffs.arm(Fault::Denied {
        under: "/stack/.stack/quarantine",
    });
    let rep = stack::reconcile::gc::gc(
        Arc::new(ffs),
        &layout(),
        "gc test",
        false,
        stack::reconcile::gc::Sweep::Quarantine,
    )
    .unwrap();
    assert_eq!(where_mine(&fs), vec![mine.display().to_string()]);
    assert!(
        rep.moved.is_empty(),
        "the report claims moves that did not happen: {:?}",
        rep.moved
    );
    assert!(
        rep.warnings
            .iter()
            .any(|w| w.contains("data/p1/mine.parquet")),
        "{:?}",
        rep.warnings
    );
}

/// A user's bytes a pull must move aside — `notes.md` in the folder of a
/// memory domain the new manifest drops, or the user's own file replacing the
/// reference `p1/a` (heal re-makes it) — under every persistent fault (EIO,
/// EROFS, ENOSPC on metadata at every operation; each folder refusing writes
/// in turn). Right after the pull, and after the next recovery once the fault
/// cleared, the user's bytes are at their name or in the quarantine (never
/// only in the trash), and the rest of the directory is the old stack or the
/// new one. A fault-free pull moves them to the quarantine and says so.
#[test]
fn a_users_bytes_a_pull_moves_aside_survive_every_persistent_fault() {
    let without_ops = || {
        let mut m = new_stack();
        m["memory_domains"] = serde_json::json!([]);
        m
    };
    let cases: [(&str, Value); 2] = [
        ("memory/ops/notes.md", without_ops()),
        ("data/p1/a.parquet", new_stack()),
    ];
    let mut states = 0;
    for (rel, new_manifest) in cases {
        for link in [LinkMode::Symlink, LinkMode::Copy, LinkMode::Hardlink] {
            let base = fresh(link);
            let at = Path::new(ROOT).join(rel);
            // The user's file replaces whatever is at the name (not in place:
            // a hard link's inode is the shared file's too).
            let _ = base.remove_file(&at);
            base.write_file(&at, MINE).unwrap();
            base.make_durable();
            let strip = |fs: &SimFs| without(fs, rel);
            let old = strip(&base);
            let clean = base.reboot(Crash::Process);
            let counting = FaultFs::new(clean.clone());
            let rep =
                pull_with(Arc::new(counting.clone()), &TestOrigin, &new_manifest, link).unwrap();
            let kept = format!("{ROOT}/.stack/quarantine/{}/{rel}", rep.txn);
            assert_eq!(where_mine(&clean), vec![kept.clone()], "{rel} {link:?}");
            assert!(
                rep.warnings
                    .iter()
                    .any(|w| w.contains(rel) && w.contains(&kept[ROOT.len() + 1..])),
                "{rel} {link:?}: {:?}",
                rep.warnings
            );
            let new = strip(&clean);
            let n = counting.ops();
            let faults = every_persistent_fault(n, &DENIED);
            for fault in faults {
                let sim = base.reboot(Crash::Process);
                let ffs = FaultFs::new(sim.clone());
                ffs.arm(fault);
                let got = pull_with(Arc::new(ffs.clone()), &TestOrigin, &new_manifest, link);
                let what = |when: &str, m: String| {
                    format!("{rel} {link:?} {fault:?} {when}: {m} ({got:?})")
                };
                kept_then_old_or_new(&sim, ffs, rel, &mine_kept, [&old, &new], &what);
                states += 1;
            }
        }
    }
    eprintln!("{states} fault states with a user's bytes moved aside");
    assert!(states > 300, "only {states}");
}

/// Heal finds the user's bytes at `p1/a` while the same pull updates `tbl_a`
/// (`RemoveStray`, `PutShared`, `MakeRef` at that name), and a persistent
/// fault rolls the pull back: the old stack comes back whole — `p1/a` never
/// holds the new table's bytes under the old state — and the user's bytes are
/// back at their name or in the quarantine.
#[test]
fn a_rollback_after_heal_moved_the_users_edit_restores_the_old_stack_whole() {
    let rel = "data/p1/a.parquet";
    let mut new_manifest = new_stack();
    new_manifest["data_packages"][0]["tables"][0] = table("tbl_a", "a", 2);
    let mut bad = Vec::new();
    let mut states = 0;
    for link in [LinkMode::Symlink, LinkMode::Copy, LinkMode::Hardlink] {
        let base = fresh(link);
        let at = Path::new(ROOT).join(rel);
        let _ = base.remove_file(&at);
        base.write_file(&at, MINE).unwrap();
        base.make_durable();
        let old_state = view(&base).unwrap().state;
        let clean = base.reboot(Crash::Process);
        let counting = FaultFs::new(clean.clone());
        pull_with(Arc::new(counting.clone()), &TestOrigin, &new_manifest, link).unwrap();
        let new_a = clean.read(&at).unwrap();
        for op in 0..counting.ops() {
            for fault in [Fault::Io { op }, Fault::NoSpaceMeta { op }] {
                let sim = base.reboot(Crash::Process);
                let ffs = FaultFs::new(sim.clone());
                ffs.arm(fault);
                let _ = pull_with(Arc::new(ffs.clone()), &TestOrigin, &new_manifest, link);
                ffs.clear();
                recover(Arc::new(ffs), &layout()).unwrap();
                states += 1;
                let v = view(&sim).unwrap();
                if v.state == old_state && sim.read(&at).ok().as_deref() == Some(&new_a[..]) {
                    bad.push(format!(
                        "{link:?} {fault:?}: the new p1/a under the old state"
                    ));
                }
                if where_mine(&sim).len() != 1 {
                    bad.push(format!(
                        "{link:?} {fault:?}: the user's bytes at {:?}",
                        where_mine(&sim)
                    ));
                }
            }
        }
    }
    assert!(states > 300, "only {states}");
    assert!(
        bad.is_empty(),
        "{} of {states} states: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}

/// A pull that replaces p1/b's table by another table at the same name
/// (`RemoveRef` then `MakeRef` at one name): after any persistent fault and the
/// recovery that follows (which redoes every step), nothing of stack's own is
/// in the quarantine, and no warning calls it the user's.
#[test]
fn a_same_name_swap_redone_never_quarantines_stacks_own_file() {
    let old_m = manifest(
        vec![],
        vec![package("p1", vec![table("tbl_b", "b", 1)])],
        vec![],
    );
    let new_m = manifest(
        vec![],
        vec![package("p1", vec![table("tbl_x", "b", 1)])],
        vec![],
    );
    let mut bad = Vec::new();
    let mut states = 0;
    for link in [LinkMode::Copy, LinkMode::Symlink, LinkMode::Hardlink] {
        let base = SimFs::new();
        base.create_dirs(ROOT).unwrap();
        plain_pull(&base, &old_m, link);
        base.make_durable();
        let clean = base.reboot(Crash::Process);
        let counting = FaultFs::new(clean.clone());
        pull_with(Arc::new(counting.clone()), &TestOrigin, &new_m, link).unwrap();
        for op in 0..counting.ops() {
            for fault in [Fault::Io { op }, Fault::NoSpaceMeta { op }] {
                let sim = base.reboot(Crash::Process);
                let ffs = FaultFs::new(sim.clone());
                ffs.arm(fault);
                let _ = pull_with(Arc::new(ffs.clone()), &TestOrigin, &new_m, link);
                ffs.clear();
                let rec = recover(Arc::new(ffs), &layout());
                states += 1;
                if let Ok(r) = &rec {
                    if r.warnings.iter().any(|w| w.contains("did not write")) {
                        bad.push(format!("{link:?} {fault:?}: {:?}", r.warnings));
                    }
                }
                let q: Vec<String> = sim
                    .snapshot()
                    .into_keys()
                    .map(|p| p.display().to_string())
                    .filter(|p| p.contains("/.stack/quarantine/") && p.ends_with(".parquet"))
                    .collect();
                if !q.is_empty() {
                    bad.push(format!(
                        "{link:?} {fault:?}: {q:?} {:?}",
                        rec.map(|_| ()).map_err(|e| e.to_string())
                    ));
                }
            }
        }
    }
    assert!(states > 100, "only {states}");
    assert!(
        bad.is_empty(),
        "{} of {states} states with stack's file in the quarantine: {:?}",
        bad.len(),
        &bad[..bad.len().min(4)]
    );
}

/// Heal moves the user's edit of a shared file aside (RemoveStray)
/// while the same pull updates that table (sole-consumer PutShared); a
/// persistent fault rolls back; a crash cuts the rollback; the rollback's
/// rerun must finish and keep the user's bytes.
#[test]
fn a_rerun_rollback_after_unstray_finishes_and_keeps_the_users_edit() {
    let rel = "data/_shared/tbl_a.parquet";
    let mut new_manifest = new_stack();
    new_manifest["data_packages"][0]["tables"][0] = table("tbl_a", "a", 2);
    let mut bad = Vec::new();
    let mut states = 0;
    for link in [LinkMode::Copy, LinkMode::Symlink] {
        let base = fresh(link);
        let at = Path::new(ROOT).join(rel);
        let _ = base.remove_file(&at);
        base.write_file(&at, MINE).unwrap();
        base.make_durable();
        // How many ops the failed pull + its rollback take.
        let probe = base.reboot(Crash::Process);
        let ffs = FaultFs::new(probe.clone());
        ffs.arm(Fault::Denied {
            under: "/stack/data/p1",
        });
        let got = pull_with(Arc::new(ffs.clone()), &TestOrigin, &new_manifest, link);
        assert!(got.is_err(), "{got:?}");
        let n = probe.ops();
        for cut in 0..n {
            let sim = base.reboot(Crash::Process);
            sim.crash_after(cut);
            let ffs = FaultFs::new(sim.clone());
            ffs.arm(Fault::Denied {
                under: "/stack/data/p1",
            });
            let _ = pull_with(Arc::new(ffs.clone()), &TestOrigin, &new_manifest, link);
            let after = sim.reboot(Crash::Process);
            let r1 = recover(Arc::new(after.clone()), &layout());
            let r2 = recover(Arc::new(after.clone()), &layout());
            states += 1;
            if r1.is_err() || r2.is_err() {
                bad.push(format!(
                    "{link:?} cut {cut}: recover {:?} / {:?}",
                    r1.as_ref().map(|_| ()).map_err(|e| e.to_string()),
                    r2.as_ref().map(|_| ()).map_err(|e| e.to_string())
                ));
            }
            if where_mine(&after).is_empty() {
                bad.push(format!("{link:?} cut {cut}: the user's bytes are gone"));
            }
        }
    }
    assert!(states > 10, "only {states}");
    assert!(
        bad.is_empty(),
        "{} of {states} states: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}
