//! Exhaustive crash-consistency tests (contract §4, invariant 6), on `SimFs`.
//!
//! For each transition old manifest → new manifest (the reference suite's scenarios
//! under several link strategies, and random manifest sequences from the reference
//! generator), this
//! 1. sets up the old stack on a fresh `SimFs` (clean pulls, then `make_durable`);
//! 2. counts the mutating operations `N` of a clean pull of the new manifest;
//! 3. for every `i` in `0..N`: crashes the pull at operation `i`, then for each crash
//!    mode (process kill, pessimistic power loss, a bounded number of random subsets
//!    of the pending operations) reboots, runs `recover` and checks that invariants
//!    1–5 hold (`audit` with contents re-hashed) and that the state file and the
//!    visible tree (`data/`, `memory/`, `sync_state.json`, contents included) are
//!    exactly the old stack's or exactly the new stack's. After a process kill it
//!    also checks that what recovery did is durable (a pessimistic power loss right
//!    after recovery, then a second recovery, still gives old or new);
//! 4. crashes recovery itself at every operation index (on the process-kill and the
//!    pessimistic images of a stride of the crash points), then recovers again and
//!    checks the same.
//!
//! Compaction (`stack journal compact`, and the automatic one at the end of a pull)
//! is crashed the same way at every one of its operations; see "Compaction" below.
//!
//! The number of crash states checked is printed (`--nocapture`). `STACK_CRASH_LONG=1`
//! (or a number, the multiplier) explores more power-loss subsets, crashes recovery
//! at every crash point and runs more random sequences.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use stack::fs::sim::{Crash, SimFs};
use stack::fs::Fs;
use stack::journal::{check_end, scan_file, End};
use stack::reconcile::origin::md5_file;
use stack::reconcile::pull::{pull, PullConfig, Wanted};
use stack::reconcile::recover::{compact_dir, recover, replay};
use stack::replay::state::{read_state, JournalPos, Pulled};
use stack::verify::{audit, Contents};
use stack::{BundleCheck, LinkMode, Manifest, SyncState};
use support::pyrandom::PyRandom;
use support::reference_gen::build_random_manifest;
use support::sim_stack::*;

/// The md5 of version `ver` of `key`; registers its bytes with the test origin.
fn gen_md5(key: &str, ver: u64) -> String {
    register(key, ver, 0)
}

fn table(tid: &str, name: &str, ver: u64) -> Value {
    table_md5(tid, name, &gen_md5(tid, ver))
}

fn domain(slug: &str, ver: u64) -> Value {
    json!({"slug": slug, "md5": gen_md5(&format!("dom_{slug}"), ver)})
}

fn empty() -> Value {
    manifest(vec![], vec![], vec![])
}

// ---------------------------------------------------------------------------
// Running the engine on a SimFs
// ---------------------------------------------------------------------------

fn pull_on(fs: &SimFs, m: &Manifest, link: LinkMode) -> stack::Result<()> {
    let sim = fs.clone();
    let hash = move |p: &Path| md5_file(&sim, p);
    let cfg = PullConfig {
        fs: Arc::new(fs.clone()),
        layout: layout(),
        origin: &TestOrigin,
        link,
        // One worker: the operation order must be the same in every run.
        jobs: 1,
        dry_run: false,
        wait: false,
        command: "crash test".to_string(),
        hash: &hash,
        bundles: BundleCheck::Verify,
        progress: &|_| {},
    };
    // As bytes, like the command line: the no-op key and its `Request` record are
    // crash-tested too.
    let bytes = serde_json::to_vec(m).expect("manifest serializes");
    let wanted = Wanted::Raw {
        bytes: (&bytes[..]).into(),
        origin: "crash-test".into(),
    };
    pull(wanted, &cfg).map(|_| ())
}

fn recover_on(fs: &SimFs) -> stack::Result<()> {
    recover(Arc::new(fs.clone()), &layout()).map(|_| ())
}

/// A copy of `fs` as it is now (the process-kill image shares nothing with it).
fn clone_fs(fs: &SimFs) -> SimFs {
    fs.reboot(Crash::Process)
}

/// A checked crash state: invariants 1–5 hold and the view is the old or the new one.
/// Invariants 1–5 of `state` on `fs`, contents re-hashed: `Err` names every
/// violation, or the audit's own failure.
fn audit_clean(fs: &SimFs, state: &SyncState) -> Result<(), String> {
    let hash = |p: &Path| md5_file(fs, p);
    match audit(fs, &layout(), state, Contents::Rehash(&hash, 1)) {
        Ok(v) if v.is_empty() => Ok(()),
        Ok(v) => {
            let list: Vec<String> = v.iter().map(|v| v.to_string()).collect();
            Err(format!("invariants violated: {}", list.join("; ")))
        }
        Err(e) => Err(format!("audit failed: {e}")),
    }
}

fn check(fs: &SimFs, t: &Prepared, what: &dyn Fn() -> String) {
    let fail = |msg: String| -> ! {
        let log = fs.op_log();
        let tail = &log[log.len().saturating_sub(60)..];
        panic!(
            "crash consistency violated\n  transition: {}\n  at: {}\n  problem: {msg}\n  op log (last {} lines):\n    {}",
            t.name,
            what(),
            tail.len(),
            tail.join("\n    ")
        );
    };
    let state = match read_state(fs, &layout()) {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => fail(format!("state file unreadable after recovery: {e}")),
    };
    audit_clean(fs, &state).unwrap_or_else(|e| fail(e));
    let got = view(fs).unwrap_or_else(|e| fail(e));
    if got != t.old && got != t.new {
        fail(format!(
            "neither old nor new stack.\n    vs old: {}\n    vs new: {}",
            describe_diff(&got, &t.old),
            describe_diff(&got, &t.new)
        ));
    }
}

// ---------------------------------------------------------------------------
// The exploration
// ---------------------------------------------------------------------------

struct Transition {
    name: String,
    /// Manifests pulled cleanly to build the old stack (in order).
    history: Vec<Value>,
    new: Value,
    link: LinkMode,
    reflink: bool,
}

struct Prepared {
    name: String,
    setup: SimFs,
    new_manifest: Manifest,
    link: LinkMode,
    old: View,
    new: View,
}

fn to_manifest(v: &Value) -> Manifest {
    serde_json::from_value(v.clone()).expect("test manifests are well-formed")
}

fn prepare(t: &Transition) -> Prepared {
    let fs = SimFs::new();
    fs.create_dirs(ROOT).unwrap();
    fs.set_reflink(t.reflink);
    for (k, m) in t.history.iter().enumerate() {
        pull_on(&fs, &to_manifest(m), t.link)
            .unwrap_or_else(|e| panic!("{}: setup pull {k} failed: {e}", t.name));
    }
    fs.make_durable();
    let old = view(&fs).unwrap();
    let new_manifest = to_manifest(&t.new);
    let after = clone_fs(&fs);
    pull_on(&after, &new_manifest, t.link)
        .unwrap_or_else(|e| panic!("{}: clean pull of new failed: {e}", t.name));
    let new = view(&after).unwrap();
    Prepared {
        name: t.name.clone(),
        setup: fs,
        new_manifest,
        link: t.link,
        old,
        new,
    }
}

/// How much to explore.
#[derive(Clone, Copy)]
struct Budget {
    /// Random power-loss subsets per crash point (besides all-kept / none-kept).
    subsets: u64,
    /// Crash recovery at every `recovery_stride`-th crash point of the pull.
    recovery_stride: usize,
}

fn long_factor() -> u64 {
    match std::env::var("STACK_CRASH_LONG") {
        Ok(v) => v.parse::<u64>().unwrap_or(1).max(1) * 4,
        Err(_) => 0,
    }
}

fn budget() -> Budget {
    match long_factor() {
        0 => Budget {
            subsets: 1,
            recovery_stride: 4,
        },
        f => Budget {
            subsets: 2 * f,
            recovery_stride: 1,
        },
    }
}

static STATES: AtomicU64 = AtomicU64::new(0);

/// The power-loss outcomes explored for a crashed image with `pending` operations.
fn modes(pending: usize, salt: u64, b: Budget) -> Vec<Crash> {
    let mut out = vec![Crash::Process, Crash::PowerLossPessimistic];
    if pending == 0 {
        return out;
    }
    // Only the first half of the pending operations reached the disk (in order),
    // then everything but the last one.
    let n = pending.min(64) as u32;
    let prefix = |k: u32| if k >= 64 { u64::MAX } else { (1u64 << k) - 1 };
    out.push(Crash::PowerLossSubset(prefix(n / 2)));
    if n > 1 {
        out.push(Crash::PowerLossSubset(prefix(n) & !(1u64 << (n - 1))));
    }
    for s in 0..b.subsets {
        out.push(Crash::PowerLossRandom(salt.wrapping_mul(1_000_003) ^ s));
    }
    out
}

/// Recover a crashed image and check it; after a process kill, also check that
/// recovery left its result durable.
fn recover_and_check(crashed: &SimFs, mode: Crash, t: &Prepared, what: &dyn Fn() -> String) -> u64 {
    let fs = crashed.reboot(mode);
    if let Err(e) = recover_on(&fs) {
        let log = fs.op_log();
        let tail = &log[log.len().saturating_sub(60)..];
        panic!(
            "recovery failed\n  transition: {}\n  at: {} / {mode:?}\n  error: {e}\n  op log:\n    {}",
            t.name,
            what(),
            tail.join("\n    ")
        );
    }
    check(&fs, t, &|| format!("{} / {mode:?}", what()));
    STATES.fetch_add(1, Ordering::Relaxed);
    if mode == Crash::Process {
        // What recovery did must survive a power loss right after it.
        let lost = fs.reboot(Crash::PowerLossPessimistic);
        recover_on(&lost).unwrap_or_else(|e| panic!("{}: second recovery failed: {e}", t.name));
        check(&lost, t, &|| {
            format!("{} / Process, recovered, then power loss", what())
        });
        STATES.fetch_add(1, Ordering::Relaxed);
        return 2;
    }
    1
}

fn explore(t: &Transition, b: Budget) -> u64 {
    let p = prepare(t);
    let mut states = 0;
    let counting = clone_fs(&p.setup);
    pull_on(&counting, &p.new_manifest, p.link).unwrap();
    let n = counting.ops();
    assert!(n > 0, "{}: the pull of new does nothing", t.name);
    for i in 0..n {
        let fs = clone_fs(&p.setup);
        fs.crash_after(i);
        match pull_on(&fs, &p.new_manifest, p.link) {
            Err(e) if e.is_crash() => {}
            Err(e) => panic!(
                "{}: crash at op {i}: pull failed without crashing: {e}",
                t.name
            ),
            Ok(()) => panic!("{}: crash at op {i} of {n}: pull succeeded", t.name),
        }
        for mode in modes(fs.pending_count(), i, b) {
            states += recover_and_check(&fs, mode, &p, &|| format!("pull crashed at op {i}/{n}"));
        }
        if !(i as usize).is_multiple_of(b.recovery_stride) {
            continue;
        }
        // Crash recovery itself, at every one of its operations.
        states += crash_recovery(&fs, &t.name, &|rec, mode, what| {
            recover_and_check(rec, mode, &p, &|| {
                format!("pull crashed at op {i}/{n}, {}", what())
            })
        });
    }
    states
}

/// A check of one recovered image after a crash (`what` says where it crashed).
type Check<'a> = dyn Fn(&SimFs, Crash, &dyn Fn() -> String) -> u64 + 'a;

/// Reboot `fs` (a crashed image) by a process kill and by a pessimistic power loss,
/// crash recovery at every one of its operations, and `check` each result after a
/// process kill and a pessimistic power loss. Returns the states `check` counted.
fn crash_recovery(fs: &SimFs, name: &str, check: &Check<'_>) -> u64 {
    let mut states = 0;
    for first in [Crash::Process, Crash::PowerLossPessimistic] {
        let image = fs.reboot(first);
        let count = clone_fs(&image);
        recover_on(&count).unwrap();
        let m = count.ops();
        for j in 0..m {
            let rec = clone_fs(&image);
            rec.crash_after(j);
            match recover_on(&rec) {
                Err(e) if e.is_crash() => {}
                Err(e) => panic!("{name}: recovery crash at op {j}: failed otherwise: {e}"),
                Ok(()) => panic!("{name}: recovery crash at op {j} of {m}: succeeded"),
            }
            for mode in [Crash::Process, Crash::PowerLossPessimistic] {
                states += check(&rec, mode, &|| {
                    format!("{first:?}; recovery crashed at op {j}/{m}")
                });
            }
        }
    }
    states
}

/// Print (and return) the states one test checked; `STATES` counts every test of
/// this binary, so each test counts its own in `mine`.
fn report(name: &str, mine: u64) -> u64 {
    eprintln!(
        "{name}: {mine} crash states checked (all tests of this binary so far: {})",
        STATES.load(Ordering::Relaxed)
    );
    mine
}

// ---------------------------------------------------------------------------
// The reference scenarios, under symlink / hardlink / copy (and auto, reflink).
// ---------------------------------------------------------------------------

fn scenarios() -> Vec<(&'static str, Vec<Value>, Value)> {
    let pkg_a = |slug: &str| package(slug, vec![table("tbl_a", "a", 1)]);
    vec![
        (
            "add to an empty stack",
            vec![],
            manifest(
                vec![table("tbl_a", "a", 1)],
                vec![package("p1", vec![table("tbl_b", "b", 1)])],
                vec![domain("finance", 1)],
            ),
        ),
        (
            "add beside an existing table",
            vec![manifest(vec![table("tbl_a", "a", 1)], vec![], vec![])],
            manifest(
                vec![table("tbl_a", "a", 1), table("tbl_b", "b", 1)],
                vec![],
                vec![],
            ),
        ),
        (
            "overlap removal keeps the shared file",
            vec![manifest(vec![], vec![pkg_a("p1"), pkg_a("p2")], vec![])],
            manifest(vec![], vec![pkg_a("p1")], vec![]),
        ),
        (
            "last reference removed drops the shared file",
            vec![
                manifest(vec![], vec![pkg_a("p1"), pkg_a("p2")], vec![]),
                manifest(vec![], vec![pkg_a("p1")], vec![]),
            ],
            empty(),
        ),
        (
            "memory domain added",
            vec![],
            manifest(vec![], vec![], vec![domain("finance", 1)]),
        ),
        (
            "memory domain removed",
            vec![manifest(vec![], vec![], vec![domain("finance", 1)])],
            empty(),
        ),
        (
            "memory domain changed",
            vec![manifest(
                vec![],
                vec![],
                vec![domain("finance", 1), domain("ops", 1)],
            )],
            manifest(vec![], vec![], vec![domain("finance", 2)]),
        ),
        (
            "md5 change re-makes every reference",
            vec![manifest(
                vec![table("tbl_a", "a", 1)],
                vec![package("p1", vec![table("tbl_a", "a", 1)])],
                vec![],
            )],
            manifest(
                vec![table("tbl_a", "a", 2)],
                vec![package("p1", vec![table("tbl_a", "a", 2)])],
                vec![],
            ),
        ),
        (
            "package drop",
            vec![manifest(
                vec![],
                vec![
                    package("p1", vec![table("tbl_a", "a", 1)]),
                    package("p2", vec![table("tbl_b", "b", 1), table("tbl_c", "c", 1)]),
                ],
                vec![domain("ops", 1)],
            )],
            manifest(
                vec![],
                vec![package("p1", vec![table("tbl_a", "a", 1)])],
                vec![domain("ops", 1)],
            ),
        ),
        (
            "rename of a table within a package",
            vec![manifest(
                vec![],
                vec![package(
                    "p1",
                    vec![table("tbl_a", "a", 1), table("tbl_b", "b", 1)],
                )],
                vec![],
            )],
            manifest(
                vec![],
                vec![package(
                    "p1",
                    vec![table("tbl_a", "a_renamed", 1), table("tbl_b", "b", 1)],
                )],
                vec![],
            ),
        ),
    ]
}

fn run_scenarios(link: LinkMode, reflink: bool) -> u64 {
    let b = budget();
    let mut states = 0;
    for (name, history, new) in scenarios() {
        states += explore(
            &Transition {
                name: format!("{name} ({link:?}, reflink {reflink})"),
                history,
                new,
                link,
                reflink,
            },
            b,
        );
    }
    report(&format!("scenarios under {link:?}"), states)
}

/// One test per link strategy, the same body: the reference scenarios crashed at
/// every operation under that strategy (`reflink` on a filesystem that clones),
/// at least 4,000 crash states each; with the random sequences below, at least
/// 20,000 in all.
macro_rules! reference_scenarios_under_each_link_mode {
    ($($test:ident: $link:ident, reflink $reflink:literal;)*) => {$(
        #[test]
        fn $test() {
            let states = run_scenarios(LinkMode::$link, $reflink);
            assert!(states >= 4_000, "only {states} crash states");
        }
    )*};
}

reference_scenarios_under_each_link_mode! {
    crash_at_every_op_reference_scenarios_symlink: Symlink, reflink false;
    crash_at_every_op_reference_scenarios_hardlink: Hardlink, reflink false;
    crash_at_every_op_reference_scenarios_copy: Copy, reflink false;
    crash_at_every_op_reference_scenarios_reflink: Reflink, reflink true;
}

// ---------------------------------------------------------------------------
// Random manifest sequences (the reference generator and seeds).
// ---------------------------------------------------------------------------

fn run_random(seeds: &[u64], steps: usize) -> u64 {
    let b = budget();
    let mut states = 0;
    let links = [
        LinkMode::Auto,
        LinkMode::Symlink,
        LinkMode::Hardlink,
        LinkMode::Copy,
    ];
    for (k, &seed) in seeds.iter().enumerate() {
        let link = links[k % links.len()];
        let mut rng = PyRandom::new(seed);
        let pool: Vec<String> = "abcdef".chars().map(|c| format!("tbl_{c}")).collect();
        let mut clock = BTreeMap::new();
        let mut history: Vec<Value> = Vec::new();
        for step in 0..steps {
            let new = build_random_manifest(&mut rng, &pool, &mut clock, &gen_md5);
            let t = Transition {
                name: format!("random seed {seed} step {step} ({link:?})"),
                history: history.clone(),
                new: new.clone(),
                link,
                reflink: false,
            };
            let p = prepare(&t);
            if p.old != p.new {
                states += explore(&t, b);
            }
            history.push(new);
        }
    }
    report("random sequences", states)
}

fn random_family(default_seed: u64, long_seeds: &[u64]) {
    let mut seeds = vec![default_seed];
    let f = long_factor();
    if f > 0 {
        seeds.extend_from_slice(long_seeds);
        seeds.extend((0..f).map(|s| default_seed * 100 + s));
    }
    let states = run_random(&seeds, 6);
    assert!(states >= 4_000, "only {states} crash states");
}

#[test]
fn crash_at_every_op_random_sequences_seed_42() {
    random_family(42, &[2024, 7]);
}

#[test]
fn crash_at_every_op_random_sequences_seed_1337() {
    random_family(1337, &[99]);
}

// ---------------------------------------------------------------------------
// Targeted regressions for durability gaps the exhaustive runs cannot reach.
// ---------------------------------------------------------------------------

/// `lock::acquire` creates `.stack` without syncing the local directory, so when
/// `Journal::open` then creates the journal it must make `.stack`'s own name
/// durable: a batch whose `sync` returned must survive a power loss.
#[test]
fn journal_created_after_lock_made_private_dir_survives_power_loss() {
    use stack::journal::{Event, Journal};
    let fs = SimFs::new();
    fs.create_dirs(ROOT).unwrap();
    let sim: Arc<dyn Fs> = Arc::new(fs.clone());
    // What `lock::acquire` does first: create `.stack` (not synced).
    sim.create_dir_all(&layout().private()).unwrap();
    let mut journal = Journal::open(sim.clone(), &layout()).unwrap().journal;
    let txn = journal.new_txn();
    journal.append(
        txn,
        Event::Aborted {
            reason: "test".to_string(),
        },
    );
    journal.sync().unwrap();
    let lost = fs.reboot(Crash::PowerLossPessimistic);
    let records = Journal::open(Arc::new(lost.clone()), &layout())
        .unwrap()
        .records;
    assert_eq!(
        records.len(),
        1,
        "a synced journal batch was lost with the unsynced .stack folder; op log:\n{}",
        fs.op_log().join("\n")
    );
}

// ---------------------------------------------------------------------------
// Compaction: `stack journal compact`, and the automatic one at the end of a pull.
// ---------------------------------------------------------------------------
//
// A compaction changes no table: after a crash anywhere in it and the recovery that
// follows, the state (fingerprints included) and the tree are exactly what they were
// before it, the journal verifies, and the no-op key is the one from before or none
// (never another). Then a pull of the same manifest changes nothing (journal bytes
// included), and a pull of another manifest gives what it gives on an uncompacted
// directory, with a journal that verifies and replays to the state file.

/// `stack journal compact`'s code path: lock, replay, compact.
fn compact_on(fs: &SimFs) -> stack::Result<()> {
    compact_dir(Arc::new(fs.clone()), &layout(), "crash test compact", false).map(drop)
}

/// `stack journal verify`, and stricter: after recovery no torn tail is left.
/// Returns the journal's bytes.
fn journal_verifies(fs: &SimFs) -> Result<Vec<u8>, String> {
    let bytes = match fs.read(&layout().journal()) {
        Ok(bytes) => bytes,
        Err(e) => return Err(format!("journal unreadable: {e}")),
    };
    let scan = stack::journal::frame::scan(&bytes);
    check_end(&layout(), &scan).map_err(|e| format!("journal does not verify: {e}"))?;
    if scan.end != End::Clean {
        return Err(format!("journal not clean after recovery: {:?}", scan.end));
    }
    Ok(bytes)
}

/// The state without its journal position (what a compaction may change).
fn tables_of(s: &SyncState) -> SyncState {
    let mut s = s.clone();
    s.journal = JournalPos::default();
    s
}

/// One directory before a crashed compaction, and what must hold after it.
struct CompactPrepared {
    name: String,
    setup: SimFs,
    link: LinkMode,
    /// The manifests whose stacks recovery may show (one for `journal compact`; the
    /// old and the new one for a pull that compacts), with what each must give: the
    /// view, the state (fingerprints included), the no-op key.
    allowed: Vec<Expected>,
    /// Compare the fingerprints too: a crashed compaction leaves the tables alone,
    /// but a crashed pull rolled forward re-makes files (new stat fingerprints).
    fingerprints: bool,
    /// Pulled after recovery; the view it must give.
    second: Manifest,
    after_second: View,
}

struct Expected {
    manifest: Manifest,
    view: View,
    state: SyncState,
    key: Option<Pulled>,
}

fn expected(fs: &SimFs, manifest: Manifest) -> Expected {
    let state = read_state(fs, &layout()).unwrap().expect("a state file");
    assert!(
        state.journal.pulled.is_some(),
        "the stack has no no-op key to keep"
    );
    Expected {
        manifest,
        view: view(fs).unwrap(),
        key: state.journal.pulled.clone(),
        state: tables_of(&state),
    }
}

/// Crash states (of every compaction test so far) recovered without a no-op key.
static KEY_ABSENT: AtomicU64 = AtomicU64::new(0);

fn report_key_absent() {
    eprintln!(
        "  (compaction tests so far: no-op key absent after recovery in {} states)",
        KEY_ABSENT.load(Ordering::Relaxed)
    );
}

/// Check a recovered image (see the section comment); `what` names the crash.
fn check_compacted(fs: &SimFs, p: &CompactPrepared, what: &dyn Fn() -> String) {
    let fail = |msg: String| -> ! {
        let log = fs.op_log();
        let tail = &log[log.len().saturating_sub(60)..];
        panic!(
            "compaction crash consistency violated\n  case: {}\n  at: {}\n  problem: {msg}\n  op log (last {} lines):\n    {}",
            p.name,
            what(),
            tail.len(),
            tail.join("\n    ")
        );
    };
    let journal = journal_verifies(fs).unwrap_or_else(|e| fail(e));
    if fs.exists(&layout().journal_compact()).unwrap_or(true) {
        fail("recovery left .stack/journal.compact behind".to_string());
    }
    let state = match read_state(fs, &layout()) {
        Ok(Some(s)) => s,
        Ok(None) => fail("no state file after recovery".to_string()),
        Err(e) => fail(format!("state file unreadable after recovery: {e}")),
    };
    let got = view(fs).unwrap_or_else(|e| fail(e));
    let Some(want) = p.allowed.iter().find(|w| w.view == got) else {
        let diffs: Vec<String> = p
            .allowed
            .iter()
            .map(|w| describe_diff(&got, &w.view))
            .collect();
        fail(format!("not the stack of before: {}", diffs.join(" | ")))
    };
    if p.fingerprints && tables_of(&state) != want.state {
        fail("state (fingerprints included) differs from before".to_string());
    }
    if tables_of(&state).without_fingerprints() != want.state.without_fingerprints() {
        fail("state differs from before".to_string());
    }
    match &state.journal.pulled {
        None => {
            KEY_ABSENT.fetch_add(1, Ordering::Relaxed);
        }
        Some(k) if Some(k) == want.key.as_ref() => {}
        Some(k) => fail(format!(
            "no-op key {k:?}, before it was {:?}",
            want.key.as_ref()
        )),
    }
    audit_clean(fs, &state).unwrap_or_else(|e| fail(e));

    // The same manifest again: nothing changes, not even the journal.
    if let Err(e) = pull_on(fs, &want.manifest, p.link) {
        fail(format!("pull of the same manifest failed: {e}"));
    }
    if view(fs).unwrap_or_else(|e| fail(e)) != want.view {
        fail("a pull of the same manifest changed the stack".to_string());
    }
    if fs.read(&layout().journal()).ok() != Some(journal) {
        fail("a pull of the same manifest wrote to the journal".to_string());
    }

    // Another manifest: pulls, verifies, and the journal replays to the state file.
    if let Err(e) = pull_on(fs, &p.second, p.link) {
        fail(format!("pull of a second manifest failed: {e}"));
    }
    let got = view(fs).unwrap_or_else(|e| fail(e));
    if got != p.after_second {
        fail(format!(
            "second pull: {}",
            describe_diff(&got, &p.after_second)
        ));
    }
    journal_verifies(fs).unwrap_or_else(|e| fail(format!("after a second pull: {e}")));
    let state = read_state(fs, &layout()).ok().flatten().unwrap_or_default();
    match replay(Arc::new(clone_fs(fs)), &layout()) {
        Ok(rec) if tables_of(&rec.state) == tables_of(&state) => {}
        Ok(_) => fail("after a second pull the journal replays to another state".to_string()),
        Err(e) => fail(format!(
            "after a second pull the journal does not replay: {e}"
        )),
    }
    audit_clean(fs, &state).unwrap_or_else(|e| fail(format!("second pull: {e}")));
}

/// Every power-loss outcome SimFs offers for the pending operations of `fs`: process
/// kill, optimistic, pessimistic, and every subset of the pending operations that
/// are not the lock file's when there are at most `all_up_to` of them (the lock
/// file's, which nothing reads back, are kept in every other subset); else both
/// prefixes of `modes` and `random` seeded subsets.
fn every_mode(fs: &SimFs, salt: u64, all_up_to: usize, random: u64) -> Vec<Crash> {
    let mut out = vec![
        Crash::Process,
        Crash::PowerLossOptimistic,
        Crash::PowerLossPessimistic,
    ];
    let pending = fs.pending();
    if pending.is_empty() {
        return out;
    }
    let lock = layout().lock_file().display().to_string();
    let lock_mask: u64 = pending
        .iter()
        .enumerate()
        .filter(|(i, d)| *i < 64 && (d.ends_with(&lock) || d.contains(&format!("{lock} "))))
        .fold(0, |m, (i, _)| m | (1u64 << i));
    let others: Vec<usize> = (0..pending.len().min(64))
        .filter(|i| lock_mask & (1u64 << i) == 0)
        .collect();
    if others.len() <= all_up_to {
        for k in 0..(1u64 << others.len()) {
            let mut mask = if k % 2 == 1 { lock_mask } else { 0 };
            for (bit, i) in others.iter().enumerate() {
                if k & (1u64 << bit) != 0 {
                    mask |= 1u64 << i;
                }
            }
            out.push(Crash::PowerLossSubset(mask));
        }
        return out;
    }
    let b = Budget {
        subsets: random,
        recovery_stride: 1,
    };
    out.extend(modes(pending.len(), salt, b).into_iter().skip(2));
    out
}

fn recover_and_check_compacted(
    crashed: &SimFs,
    mode: Crash,
    p: &CompactPrepared,
    what: &dyn Fn() -> String,
) -> u64 {
    let fs = crashed.reboot(mode);
    if let Err(e) = recover_on(&fs) {
        let log = fs.op_log();
        let tail = &log[log.len().saturating_sub(60)..];
        panic!(
            "recovery failed\n  case: {}\n  at: {} / {mode:?}\n  error: {e}\n  op log:\n    {}",
            p.name,
            what(),
            tail.join("\n    ")
        );
    }
    check_compacted(&fs, p, &|| format!("{} / {mode:?}", what()));
    1
}

/// How much of the power-loss outcomes a compaction's crash points explore.
#[derive(Clone, Copy)]
struct Sweep {
    /// Every subset of the pending operations (but the lock file's) up to this many.
    all_up_to: usize,
    /// Else this many random subsets (and the two prefixes).
    random: u64,
    /// Crash recovery at every operation for every `recovery_stride`-th crash point.
    recovery_stride: u64,
}

impl Sweep {
    /// `default` unless `STACK_CRASH_LONG` is set: then every subset up to 12
    /// pending operations, 16·N random ones beyond, recovery crashed everywhere.
    fn or_long(default: Sweep) -> Sweep {
        match long_factor() {
            0 => default,
            f => Sweep {
                all_up_to: 12,
                random: 16 * f,
                recovery_stride: 1,
            },
        }
    }
}

/// Crash `run` (a compaction, or a pull that compacts) at each of `crash_points`,
/// under every power-loss mode (`sweep`); recover, check. Recovery itself is
/// crashed at every operation too, on the process-kill and pessimistic images.
fn explore_compaction(
    p: &CompactPrepared,
    run: &dyn Fn(&SimFs) -> stack::Result<()>,
    crash_points: std::ops::Range<u64>,
    sweep: Sweep,
) -> u64 {
    let Sweep {
        all_up_to,
        random,
        recovery_stride: stride,
    } = sweep;
    let counting = clone_fs(&p.setup);
    run(&counting).unwrap_or_else(|e| panic!("{}: clean run failed: {e}", p.name));
    let n = counting.ops();
    let from = crash_points.start;
    assert!(
        from < crash_points.end && crash_points.end <= n,
        "{}: crash points {crash_points:?} of {n}",
        p.name
    );
    let mut states = 0;
    for i in crash_points {
        let fs = clone_fs(&p.setup);
        fs.crash_after(i);
        match run(&fs) {
            Err(e) if e.is_crash() => {}
            Err(e) => panic!("{}: crash at op {i}: failed without crashing: {e}", p.name),
            Ok(()) => panic!("{}: crash at op {i} of {n}: succeeded", p.name),
        }
        let what = || format!("crashed at op {i}/{n}");
        for mode in every_mode(&fs, i, all_up_to, random) {
            states += recover_and_check_compacted(&fs, mode, p, &what);
        }
        if !(i - from).is_multiple_of(stride) {
            continue;
        }
        states += crash_recovery(&fs, &p.name, &|rec, mode, what| {
            recover_and_check_compacted(rec, mode, p, &|| {
                format!("crashed at op {i}/{n}, {}", what())
            })
        });
    }
    STATES.fetch_add(states, Ordering::Relaxed);
    states
}

struct CompactCase {
    name: &'static str,
    /// Pulled cleanly, in order; the last one is the stack compacted (and its key).
    history: Vec<Value>,
    /// Then a pull that fails before its commit point (its content is missing from
    /// the origin): the journal ends in an `Aborted` past the last commit.
    failed: Option<Value>,
    /// Clean compactions before the crashed one (a compacted journal compacted again).
    compacted: usize,
    second: Value,
}

fn compact_cases() -> Vec<CompactCase> {
    let m1 = manifest(
        vec![table("tbl_a", "a", 1)],
        vec![package("p1", vec![table("tbl_b", "b", 1)])],
        vec![domain("finance", 1)],
    );
    let m2 = manifest(
        vec![table("tbl_a", "a", 2), table("tbl_c", "c", 1)],
        vec![
            package("p1", vec![table("tbl_b", "b", 1)]),
            package("p2", vec![table("tbl_b", "b", 1)]),
        ],
        vec![domain("finance", 2), domain("ops", 1)],
    );
    let second = manifest(
        vec![table("tbl_c", "c", 2)],
        vec![package("p2", vec![table("tbl_b", "b_renamed", 1)])],
        vec![domain("ops", 2)],
    );
    let missing = manifest(
        vec![table_md5("tbl_z", "z", &hexmd5(b"not served"))],
        vec![],
        vec![],
    );
    vec![
        CompactCase {
            name: "history of two pulls",
            history: vec![m1.clone(), m2.clone()],
            failed: None,
            compacted: 0,
            second: second.clone(),
        },
        CompactCase {
            name: "history ending in a rolled-back pull",
            history: vec![m1.clone(), m2.clone()],
            failed: Some(missing),
            compacted: 0,
            second: second.clone(),
        },
        CompactCase {
            name: "a compacted journal compacted again",
            history: vec![m1, m2],
            failed: None,
            compacted: 1,
            second,
        },
    ]
}

fn prepare_compact(c: &CompactCase, link: LinkMode) -> CompactPrepared {
    let name = format!("{} ({link:?})", c.name);
    let fs = SimFs::new();
    fs.create_dirs(ROOT).unwrap();
    for (k, m) in c.history.iter().enumerate() {
        pull_on(&fs, &to_manifest(m), link)
            .unwrap_or_else(|e| panic!("{name}: setup pull {k} failed: {e}"));
    }
    if let Some(m) = &c.failed {
        let e = pull_on(&fs, &to_manifest(m), link).expect_err("the failing pull fails");
        assert!(!e.is_crash(), "{name}: {e}");
    }
    for _ in 0..c.compacted {
        compact_on(&fs).unwrap_or_else(|e| panic!("{name}: setup compaction failed: {e}"));
    }
    fs.make_durable();
    let same = to_manifest(c.history.last().expect("a history"));
    let second = to_manifest(&c.second);
    let after = clone_fs(&fs);
    pull_on(&after, &second, link).unwrap_or_else(|e| panic!("{name}: second pull failed: {e}"));
    CompactPrepared {
        name,
        link,
        allowed: vec![expected(&fs, same)],
        fingerprints: true,
        after_second: view(&after).unwrap(),
        second,
        setup: fs,
    }
}

#[test]
fn crash_at_every_op_of_journal_compact() {
    // Each case under one link mode (a compaction touches no table: the mode only
    // changes what the fingerprints hold); every case under each of them in the
    // long mode.
    let links = [LinkMode::Symlink, LinkMode::Copy, LinkMode::Hardlink];
    let mut states = 0;
    for (k, c) in compact_cases().into_iter().enumerate() {
        let all = if long_factor() > 0 {
            &links[..]
        } else {
            &links[k % 3..=k % 3]
        };
        for &link in all {
            let p = prepare_compact(&c, link);
            // The compaction does compact: one frame (checkpoint and request) left.
            let done = clone_fs(&p.setup);
            compact_on(&done).unwrap();
            let n = done.ops();
            let scan = scan_file(&done, &layout()).unwrap().unwrap();
            assert_eq!(scan.records.len(), 2, "{}", p.name);
            check_compacted(&done, &p, &|| "no crash".to_string());
            // A compaction leaves at most four operations pending besides the lock
            // file's: every subset of them, and recovery crashed everywhere.
            let sweep = Sweep::or_long(Sweep {
                all_up_to: 8,
                random: 4,
                recovery_stride: 1,
            });
            states += explore_compaction(&p, &compact_on, 0..n, sweep);
        }
    }
    report("journal compact", states);
    report_key_absent();
    assert!(states >= 1_000, "only {states} crash states");
}

/// The automatic compaction at the end of a pull, reached cheaply: the journal is
/// padded past [`AUTO_COMPACT_BYTES`] with one rolled-back transaction whose
/// `Aborted` reason is that long (a legal journal: the projection ignores it), so
/// the next pull that commits compacts. Its crash points run from the compaction's
/// first operation (the pull before it is what the tests above crash; under
/// `STACK_CRASH_LONG` it is crashed here too, recovering to the old stack or the
/// new one).
#[test]
fn crash_at_every_op_of_automatic_compaction() {
    use stack::journal::{Event, Journal, AUTO_COMPACT_BYTES};
    let link = LinkMode::Symlink;
    let m1 = manifest(
        vec![table("tbl_a", "a", 1)],
        vec![package("p1", vec![table("tbl_b", "b", 1)])],
        vec![domain("finance", 1)],
    );
    let m2 = manifest(
        vec![table("tbl_a", "a", 2)],
        vec![package(
            "p1",
            vec![table("tbl_b", "b", 1), table("tbl_c", "c", 1)],
        )],
        vec![domain("finance", 1), domain("ops", 1)],
    );
    let m3 = manifest(vec![table("tbl_c", "c", 2)], vec![], vec![domain("ops", 2)]);
    let (m1, m2, m3) = (to_manifest(&m1), to_manifest(&m2), to_manifest(&m3));

    let fs = SimFs::new();
    fs.create_dirs(ROOT).unwrap();
    pull_on(&fs, &m1, link).unwrap();
    {
        let sim: Arc<dyn Fs> = Arc::new(fs.clone());
        let mut journal = Journal::open(sim, &layout()).unwrap().journal;
        let txn = journal.new_txn();
        let reason = "x".repeat(AUTO_COMPACT_BYTES as usize);
        journal.append(txn, Event::Aborted { reason });
        journal.sync().unwrap();
        assert!(journal.wants_compaction());
    }
    fs.make_durable();
    let old = expected(&fs, m1.clone());

    let pull_m2 = |fs: &SimFs| pull_on(fs, &m2, link);
    let done = clone_fs(&fs);
    pull_m2(&done).unwrap();
    let n = done.ops();
    let scan = scan_file(&done, &layout()).unwrap().unwrap();
    assert_eq!(scan.records.len(), 2, "the pull did not compact");
    // The log numbers the operations since the last reboot from 1: crashing after
    // `start` operations crashes the compaction's first (creating its temp file).
    let log = done.op_log();
    let since_reboot = log
        .iter()
        .rposition(|l| l.starts_with("--- reboot"))
        .unwrap();
    let start = log[since_reboot..]
        .iter()
        .find(|l| l.ends_with("create /stack/.stack/journal.compact"))
        .and_then(|l| l[1..].split(' ').next()?.parse::<u64>().ok())
        .expect("the compaction's first operation")
        - 1;
    let new = expected(&done, m2.clone());
    let after_second = {
        let a = clone_fs(&done);
        pull_on(&a, &m3, link).unwrap();
        let b = clone_fs(&fs);
        pull_on(&b, &m3, link).unwrap();
        assert_eq!(view(&a).unwrap(), view(&b).unwrap());
        view(&a).unwrap()
    };
    let mut p = CompactPrepared {
        name: "automatic compaction at the end of a pull".to_string(),
        setup: fs,
        link,
        allowed: vec![new],
        fingerprints: true,
        second: m3,
        after_second,
    };
    check_compacted(&done, &p, &|| "no crash".to_string());
    // Every crash state here reads a journal of 8 MiB several times: fewer subsets
    // than above (the compaction is the same code, exhaustively crashed there).
    let sweep = Sweep::or_long(Sweep {
        all_up_to: 2,
        random: 1,
        recovery_stride: 4,
    });
    let mut states = explore_compaction(&p, &pull_m2, start..n, sweep);
    if long_factor() > 0 {
        p.allowed.push(old);
        p.fingerprints = false;
        states += explore_compaction(&p, &pull_m2, 0..start, sweep);
    }
    report("automatic compaction", states);
    report_key_absent();
    assert!(states >= 100, "only {states} crash states");
}

/// A pull that gains a package folder whole commits, then dies before the
/// folder's `Place`; the user makes that folder meanwhile, with a file of the
/// name of one of its references. Recovery rolls the pull forward: the user's
/// bytes go to `.stack/quarantine/<txn>/`, said in a warning, never renamed over;
/// the invariants hold.
#[test]
fn roll_forward_quarantines_a_users_file_in_a_folder_made_after_the_commit() {
    let m = to_manifest(&manifest(
        vec![],
        vec![package("sales", vec![table("t1", "q1", 1)])],
        vec![],
    ));
    let l = layout();
    let folder = l.join("data/sales");
    // The first crash point past the commit point at which the folder is still
    // not placed: recovery of a copy rolls the package in.
    let crashed = (0..400)
        .find_map(|n| {
            let fs = SimFs::new();
            fs.crash_after(n);
            let _ = pull_on(&fs, &m, LinkMode::Symlink);
            let c = fs.reboot(Crash::Process);
            if c.exists(&folder).unwrap() {
                return None;
            }
            let rec = recover(Arc::new(clone_fs(&c)), &l).ok()?;
            rec.state.data_packages.contains_key("sales").then_some(c)
        })
        .expect("a crash point between the commit point and the folder's Place");
    let mine = b"the user's own bytes".to_vec();
    crashed.create_dirs(&folder).unwrap();
    crashed
        .write_file(folder.join("q1.parquet"), &mine)
        .unwrap();
    let rec = recover(Arc::new(crashed.clone()), &l).expect("recovery rolls forward");
    assert!(
        rec.state.data_packages.contains_key("sales"),
        "{:?}",
        rec.notes
    );
    let kept = crashed
        .read_dir(&l.quarantine())
        .ok()
        .into_iter()
        .flatten()
        .map(|txn| l.quarantine().join(txn.name).join("data/sales/q1.parquet"))
        .find(|p| crashed.exists(p).unwrap());
    let kept = kept.unwrap_or_else(|| {
        panic!(
            "the user's file is not in .stack/quarantine; data/sales/q1.parquet holds {:?}",
            crashed.read(&folder.join("q1.parquet"))
        )
    });
    assert_eq!(crashed.read(&kept).unwrap(), mine);
    assert!(
        rec.warnings
            .iter()
            .any(|w| w.contains("data/sales/q1.parquet") && w.contains("quarantine")),
        "{:?}",
        rec.warnings
    );
    audit_clean(&crashed, &rec.state).unwrap();
}
