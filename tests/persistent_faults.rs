//! Persistent faults (issue 15): a full disk, a failing disk, a read-only disk.
//!
//! The crash tests (`crash_consistency.rs`) model a process that stops. These model
//! faults that persist: a pull runs on a [`FaultFs`] over `SimFs` whose fault
//! strikes at one operation (every operation index of the pull is tried) or at one
//! byte (a sweep of byte budgets) and stays. After each run:
//! 1. whatever the pull returned, no simulated crash, no panic;
//! 2. a pull that succeeded left exactly the new stack;
//! 3. a full disk (`NoSpace`) is all-or-nothing *when the command returns*: the
//!    directory is entirely the old stack or entirely the new one, invariants 1–5
//!    hold, and the space the attempt took is given back (nothing left in
//!    `.stack/` but partial downloads);
//! 4. a folder that refuses writes (`Denied`, EACCES) makes rolling forward fail
//!    past the commit point while the rest of the disk writes: the pull rolls
//!    back in the same command, and the directory is the old stack when it
//!    returns;
//! 5. while the fault persists, `status` still answers;
//! 6. once the fault clears, the next command (recovery, as every mutating command
//!    runs it first) leaves entirely the old or the new stack with invariants 1–5
//!    holding, and a pull of the new manifest then gives the new stack.
//!
//! Every transition runs under every link mode. The number of fault states checked
//! is printed (`--nocapture`); `STACK_FAULTS_LONG=N` sweeps every byte budget and
//! adds random manifest sequences.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use stack::fs::fault::{Fault, FaultFs};
use stack::fs::sim::{Crash, SimFs, SnapEntry};
use stack::fs::Fs;
use stack::reconcile::origin::md5_file;
use stack::reconcile::pull::{pull, status, PullConfig, Wanted};
use stack::reconcile::recover::recover;
use stack::replay::state::read_state;
use stack::verify::{audit, Contents};
use stack::{BundleCheck, LinkMode, Manifest};
use support::pyrandom::PyRandom;
use support::reference_gen::build_random_manifest;
use support::sim_stack::*;

/// Version `ver` of `key`: some hundred bytes, so copies take visible space.
fn gen_md5(key: &str, ver: u64) -> String {
    register(key, ver, 100)
}

fn table(tid: &str, name: &str, ver: u64) -> Value {
    table_md5(tid, name, &gen_md5(tid, ver))
}

fn domain(slug: &str, ver: u64) -> Value {
    json!({"slug": slug, "md5": gen_md5(&format!("dom_{slug}"), ver)})
}

fn config<'a>(
    fs: Arc<dyn Fs>,
    link: LinkMode,
    hash: &'a (dyn Fn(&Path) -> std::io::Result<String> + Sync),
) -> PullConfig<'a> {
    PullConfig {
        fs,
        layout: layout(),
        origin: &TestOrigin,
        link,
        jobs: 1,
        dry_run: false,
        wait: false,
        command: "fault test".to_string(),
        hash,
        bundles: BundleCheck::Verify,
        progress: &|_| {},
    }
}

fn wanted(bytes: &[u8]) -> Wanted<'_> {
    Wanted::Raw {
        bytes: bytes.into(),
        origin: "fault-test".into(),
    }
}

fn pull_on(fs: Arc<dyn Fs>, m: &[u8], link: LinkMode) -> stack::Result<()> {
    let reader = fs.clone();
    let hash = move |p: &Path| md5_file(reader.as_ref(), p);
    pull(wanted(m), &config(fs, link, &hash)).map(drop)
}

fn status_on(fs: Arc<dyn Fs>, m: &[u8], link: LinkMode) -> stack::Result<()> {
    let reader = fs.clone();
    let hash = move |p: &Path| md5_file(reader.as_ref(), p);
    status(wanted(m), &config(fs, link, &hash)).map(drop)
}

/// Invariants 1–5 hold and the directory is the old or the new stack.
fn old_or_new(fs: &SimFs, p: &Prepared) -> Result<(), String> {
    let state = read_state(fs, &layout())
        .map_err(|e| format!("state file unreadable: {e}"))?
        .unwrap_or_default();
    let hash = |path: &Path| md5_file(fs, path);
    match audit(fs, &layout(), &state, Contents::Rehash(&hash, 1)) {
        Ok(v) if v.is_empty() => {}
        Ok(v) => {
            let list: Vec<String> = v.iter().map(|v| v.to_string()).collect();
            return Err(format!("invariants violated: {}", list.join("; ")));
        }
        Err(e) => return Err(format!("audit failed: {e}")),
    }
    let got = view(fs)?;
    if got != p.old && got != p.new {
        return Err(format!(
            "neither old nor new stack.\n    vs old: {}\n    vs new: {}",
            describe_diff(&got, &p.old),
            describe_diff(&got, &p.new)
        ));
    }
    Ok(())
}

/// What a failed attempt may leave in `.stack/`: its journal, lock, state and
/// capability hint, and partial downloads the next pull resumes. Anything else
/// (staged files, placed folders, scratch, trash, a reserve) is space not given back.
fn leftovers(fs: &SimFs) -> Vec<String> {
    let private = Path::new(ROOT).join(".stack");
    fs.snapshot()
        .into_iter()
        .filter_map(|(p, e)| {
            let rel = p
                .strip_prefix(&private)
                .ok()?
                .to_string_lossy()
                .into_owned();
            let kept = matches!(
                rel.as_str(),
                "" | "journal" | "lock" | "caps" | "staging" | "journal.broken"
            ) || (rel.starts_with("staging/") && rel.ends_with(".part"));
            (!kept && !matches!(e, SnapEntry::Dir if rel == "tmp")).then_some(rel)
        })
        .collect()
}

struct Transition {
    name: String,
    history: Vec<Value>,
    new: Value,
    link: LinkMode,
    reflink: bool,
    /// The link mode the history was pulled with, when not `link`.
    history_link: Option<LinkMode>,
}

struct Prepared {
    name: String,
    setup: SimFs,
    new_bytes: Vec<u8>,
    link: LinkMode,
    old: View,
    new: View,
}

fn bytes_of(v: &Value) -> Vec<u8> {
    let m: Manifest = serde_json::from_value(v.clone()).expect("test manifests are well-formed");
    serde_json::to_vec(&m).unwrap()
}

fn prepare(t: &Transition) -> Prepared {
    let fs = SimFs::new();
    fs.create_dirs(ROOT).unwrap();
    fs.set_reflink(t.reflink);
    for (k, m) in t.history.iter().enumerate() {
        pull_on(
            Arc::new(fs.clone()),
            &bytes_of(m),
            t.history_link.unwrap_or(t.link),
        )
        .unwrap_or_else(|e| panic!("{}: setup pull {k} failed: {e}", t.name));
    }
    fs.make_durable();
    let old = view(&fs).unwrap();
    let new_bytes = bytes_of(&t.new);
    let after = fs.reboot(Crash::Process);
    pull_on(Arc::new(after.clone()), &new_bytes, t.link)
        .unwrap_or_else(|e| panic!("{}: clean pull of new failed: {e}", t.name));
    let new = view(&after).unwrap();
    Prepared {
        name: t.name.clone(),
        setup: fs,
        new_bytes,
        link: t.link,
        old,
        new,
    }
}

fn long_factor() -> u64 {
    match std::env::var("STACK_FAULTS_LONG") {
        Ok(v) => v.parse::<u64>().unwrap_or(1).max(1),
        Err(_) => 0,
    }
}

static STATES: AtomicU64 = AtomicU64::new(0);
/// Pulls rolled back past their commit point in the same command.
static ROLLED_BACK: AtomicU64 = AtomicU64::new(0);

/// Run the pull of `p` under `fault` and check it as the module says. `full`:
/// also pull the new manifest again once the fault cleared.
fn check_fault(p: &Prepared, fault: Fault, full: bool) {
    let sim = p.setup.reboot(Crash::Process);
    let ffs = FaultFs::new(sim.clone());
    ffs.arm(fault);
    let dynfs: Arc<dyn Fs> = Arc::new(ffs.clone());
    let fail = |what: &str, msg: String| -> ! {
        let log = sim.op_log();
        let tail = &log[log.len().saturating_sub(40)..];
        panic!(
            "persistent fault not survived\n  transition: {}\n  fault: {fault:?}\n  {what}: {msg}\n  op log (last {} lines):\n    {}",
            p.name,
            tail.len(),
            tail.join("\n    ")
        )
    };
    let result = pull_on(dynfs.clone(), &p.new_bytes, p.link);
    match &result {
        Err(e) if e.is_crash() => fail("pull", format!("a simulated crash: {e}")),
        Ok(()) => {
            if view(&sim) != Ok(p.new.clone()) {
                fail("pull succeeded", "but the stack is not the new one".into());
            }
        }
        Err(_) => {}
    }
    // A folder refusing writes: rolling forward fails, rolling back does not
    // need it, and happens in the same command.
    if let (Fault::Denied { .. }, Err(e)) = (fault, &result) {
        old_or_new(&sim, p)
            .unwrap_or_else(|m| fail(&format!("right after the failed pull ({e})"), m));
        if e.to_string().contains("rolled back to the previous stack") {
            ROLLED_BACK.fetch_add(1, Ordering::Relaxed);
        }
    }
    if let Fault::NoSpace { .. } = fault {
        if let Err(e) = &result {
            old_or_new(&sim, p)
                .unwrap_or_else(|m| fail(&format!("right after the failed pull ({e})"), m));
            let left = leftovers(&sim);
            if !left.is_empty() {
                fail(
                    &format!("space not given back after the failed pull ({e})"),
                    left.join(", "),
                );
            }
        }
    }
    // The disk still reads: status answers while the fault persists.
    if let Err(e) = status_on(dynfs.clone(), &p.new_bytes, p.link) {
        fail("status while the fault persists", e.to_string());
    }
    ffs.clear();
    if let Err(e) = recover(dynfs.clone(), &layout()) {
        fail("the next command's recovery", e.to_string());
    }
    old_or_new(&sim, p).unwrap_or_else(|m| fail("after the fault cleared", m));
    if full {
        if let Err(e) = pull_on(dynfs, &p.new_bytes, p.link) {
            fail("a pull after the fault cleared", e.to_string());
        }
        if view(&sim) != Ok(p.new.clone()) {
            fail("a pull after the fault cleared", "not the new stack".into());
        }
    }
    STATES.fetch_add(1, Ordering::Relaxed);
}

/// Every operation index under each op-indexed fault, and a sweep of byte budgets.
fn explore(t: &Transition) -> u64 {
    explore_prepared(&prepare(t))
}

fn explore_prepared(p: &Prepared) -> u64 {
    let counting = FaultFs::new(p.setup.reboot(Crash::Process));
    pull_on(Arc::new(counting.clone()), &p.new_bytes, p.link).unwrap();
    let (n, written) = (counting.ops(), counting.written());
    let mut states = 0;
    for op in 0..n {
        for fault in [
            Fault::Io { op },
            Fault::ReadOnly { op },
            Fault::NoSpaceMeta { op },
        ] {
            check_fault(p, fault, op % 7 == 0);
            states += 1;
        }
    }
    for under in DENIED {
        check_fault(p, Fault::Denied { under }, true);
        states += 1;
    }
    let step = match long_factor() {
        0 => (written / 600).max(1),
        f => (written / (4000 * f)).max(1),
    };
    let mut bytes = 0;
    while bytes <= written {
        check_fault(p, Fault::NoSpace { bytes }, bytes % (7 * step) == 0);
        states += 1;
        bytes += step;
    }
    states
}

/// A pull that rolls back past its commit point (`under` refuses writes),
/// crashed at every operation of the pull and its rollback; then recovered by a
/// process kill and a pessimistic power loss, with the fault still there and
/// with it cleared: the old or the new stack each time. Returns the states
/// checked (0 if the fault makes no rollback of this transition).
fn crash_rollback(p: &Prepared, under: &'static str) -> u64 {
    let fault = Fault::Denied { under };
    let counting = p.setup.reboot(Crash::Process);
    let ffs = FaultFs::new(counting.clone());
    ffs.arm(fault);
    match pull_on(Arc::new(ffs), &p.new_bytes, p.link) {
        Err(e) if e.to_string().contains("rolled back to the previous stack") => {}
        _ => return 0,
    }
    let n = counting.ops();
    let mut states = 0;
    for i in 0..n {
        let sim = p.setup.reboot(Crash::Process);
        sim.crash_after(i);
        let ffs = FaultFs::new(sim.clone());
        ffs.arm(fault);
        match pull_on(Arc::new(ffs), &p.new_bytes, p.link) {
            Err(e) if e.is_crash() => {}
            other => panic!("{}: crash at op {i}/{n} did not crash: {other:?}", p.name),
        }
        for mode in [Crash::Process, Crash::PowerLossPessimistic] {
            for cleared in [false, true] {
                let image = sim.reboot(mode);
                let after = FaultFs::new(image.clone());
                if !cleared {
                    after.arm(fault);
                }
                let what = || {
                    format!(
                        "{} under {under}: crashed at op {i}/{n}, {mode:?}, fault cleared: {cleared}",
                        p.name
                    )
                };
                if let Err(e) = recover(Arc::new(after), &layout()) {
                    panic!("{}: recovery failed: {e}", what());
                }
                if let Err(m) = old_or_new(&image, p) {
                    let log = image.op_log();
                    let tail = &log[log.len().saturating_sub(40)..];
                    panic!("{}: {m}\n    {}", what(), tail.join("\n    "));
                }
                states += 1;
                STATES.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    states
}

#[test]
fn crash_at_every_op_of_a_rollback_past_the_commit_point() {
    let mut states = 0;
    for &(link, reflink) in &LINKS {
        for (name, history, new) in scenarios() {
            let p = prepare(&Transition {
                name: format!("{name} ({link:?}, reflink {reflink})"),
                history,
                new,
                link,
                reflink,
                history_link: None,
            });
            for under in DENIED {
                states += crash_rollback(&p, under);
            }
        }
    }
    for t in link_changes() {
        let p = prepare(&t);
        for under in DENIED {
            states += crash_rollback(&p, under);
        }
    }
    report("rollbacks crashed at every operation", states);
    assert!(states >= 2_000, "only {states} crash states of rollbacks");
}

/// Folders that refuse writes, one at a time.
const DENIED: [&str; 6] = [
    "/stack/data/_shared",
    "/stack/data/p1",
    "/stack/data/p2",
    "/stack/data/p3",
    "/stack/data/_direct",
    "/stack/memory",
];

fn scenarios() -> Vec<(&'static str, Vec<Value>, Value)> {
    let two = |v: u64| {
        manifest(
            vec![],
            vec![
                package("p1", vec![table("tbl_a", "a", v), table("tbl_b", "b", v)]),
                package("p2", vec![table("tbl_a", "a", v)]),
            ],
            vec![],
        )
    };
    vec![
        // The scenario: p1 {a, b} and p2 {a}, every table changed.
        ("shared tables changed", vec![two(1)], two(2)),
        ("first pull", vec![], two(1)),
        (
            "add beside, drop a package, change a domain",
            vec![manifest(
                vec![table("tbl_d", "d", 1)],
                vec![
                    package("p1", vec![table("tbl_a", "a", 1)]),
                    package("p3", vec![table("tbl_c", "c", 1)]),
                ],
                vec![domain("finance", 1), domain("ops", 1)],
            )],
            manifest(
                vec![table("tbl_d", "d", 1), table("tbl_e", "e", 1)],
                vec![package(
                    "p1",
                    vec![table("tbl_a", "a", 1), table("tbl_c", "c", 2)],
                )],
                vec![domain("finance", 2)],
            ),
        ),
        (
            "rename within a package and remove the last reference",
            vec![manifest(
                vec![table("tbl_a", "a", 1)],
                vec![package(
                    "p1",
                    vec![table("tbl_a", "a", 1), table("tbl_b", "b", 1)],
                )],
                vec![],
            )],
            manifest(
                vec![],
                vec![package("p1", vec![table("tbl_b", "b_renamed", 1)])],
                vec![],
            ),
        ),
    ]
}

/// Every link mode, reflink both refused (the fallback to copy) and supported.
const LINKS: [(LinkMode, bool); 6] = [
    (LinkMode::Auto, false),
    (LinkMode::Symlink, false),
    (LinkMode::Hardlink, false),
    (LinkMode::Copy, false),
    (LinkMode::Reflink, false),
    (LinkMode::Reflink, true),
];

fn run_scenarios(links: &[(LinkMode, bool)]) -> u64 {
    let mut states = 0;
    for &(link, reflink) in links {
        for (name, history, new) in scenarios() {
            states += explore(&Transition {
                name: format!("{name} ({link:?}, reflink {reflink})"),
                history,
                new,
                link,
                reflink,
                history_link: None,
            });
        }
    }
    states
}

fn report(name: &str, mine: u64) {
    eprintln!(
        "{name}: {mine} persistent-fault states checked (all tests of this binary so far: {}, \
         of which {} pulls rolled back past their commit point in the same command)",
        STATES.load(Ordering::Relaxed),
        ROLLED_BACK.load(Ordering::Relaxed)
    );
}

#[test]
fn persistent_faults_links_without_copies() {
    let states = run_scenarios(&LINKS[..3]);
    report("auto, symlink, hardlink", states);
    assert!(states >= 8_000, "only {states} fault states");
}

#[test]
fn persistent_faults_copies() {
    let states = run_scenarios(&LINKS[3..]);
    report("copy, reflink refused, reflink", states);
    assert!(states >= 8_000, "only {states} fault states");
}

/// The same stack pulled again under each change of link mode.
fn link_changes() -> Vec<Transition> {
    let stack = manifest(
        vec![table("tbl_d", "d", 1)],
        vec![
            package("p1", vec![table("tbl_a", "a", 1), table("tbl_b", "b", 1)]),
            package("p2", vec![table("tbl_a", "a", 1)]),
        ],
        vec![],
    );
    [
        (LinkMode::Symlink, LinkMode::Copy),
        (LinkMode::Copy, LinkMode::Symlink),
        (LinkMode::Symlink, LinkMode::Hardlink),
        (LinkMode::Hardlink, LinkMode::Copy),
    ]
    .into_iter()
    .map(|(from, to)| Transition {
        name: format!("link mode {from:?} -> {to:?}"),
        history: vec![stack.clone()],
        new: stack.clone(),
        link: to,
        reflink: false,
        history_link: Some(from),
    })
    .collect()
}

/// The same stack pulled again under another link mode: every reference is
/// re-made in place (a symlink becomes a copy, a copy a hard link...), so the
/// old references are replaced, not added beside.
#[test]
fn persistent_faults_link_mode_changes() {
    let mut states = 0;
    for t in link_changes() {
        let p = prepare(&t);
        assert_ne!(p.old, p.new, "{}: the references change", t.name);
        states += explore_prepared(&p);
    }
    report("link mode changes", states);
    assert!(states >= 1_000, "only {states} fault states");
}

#[test]
fn persistent_faults_random_sequences() {
    let f = long_factor();
    let seeds: Vec<u64> = if f == 0 {
        vec![42]
    } else {
        (0..4 * f).map(|s| 42 + s).collect()
    };
    let links = [LinkMode::Copy, LinkMode::Symlink, LinkMode::Hardlink];
    let mut states = 0;
    for (k, &seed) in seeds.iter().enumerate() {
        let link = links[k % links.len()];
        let mut rng = PyRandom::new(seed);
        let pool: Vec<String> = "abcdef".chars().map(|c| format!("tbl_{c}")).collect();
        let mut clock = BTreeMap::new();
        let mut history: Vec<Value> = Vec::new();
        for step in 0..4 {
            let new = build_random_manifest(&mut rng, &pool, &mut clock, &gen_md5);
            let t = Transition {
                name: format!("random seed {seed} step {step} ({link:?})"),
                history: history.clone(),
                new: new.clone(),
                link,
                reflink: false,
                history_link: None,
            };
            let p = prepare(&t);
            if p.old != p.new {
                states += explore_prepared(&p);
            }
            history.push(new);
        }
    }
    report("random sequences", states);
    assert!(states >= 1_000, "only {states} fault states");
}
