//! Real process kills: SIGKILL the `stack` binary mid-pull (staging or apply) and
//! mid-recovery, then `stack journal replay`, and check that `stack verify
//! --contents` passes and that the visible tree and the state are entirely the old
//! stack or entirely the new one (compared with clean pulls, contents included).
//!
//! A handful of kills by default; `STACK_SIGKILL_COUNT=100` for the long mode. The
//! kill instants are random (seeded by `STACK_SIGKILL_SEED`, else by the clock, and
//! printed), spread over the length of a clean pull. A kill that comes after the
//! pull finished tests nothing, so such a kill is tried again from the old stack
//! with an instant drawn from a range half as long (up to [`TRIES`] times), and
//! the test fails unless every kill landed mid-pull: it cannot pass by killing
//! finished processes. No duration is asserted.

// Fixtures write the real disk directly; the seam rule is for the engine.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use serde_json::{json, Value};
use stack::replay::state::JournalPos;
use stack::SyncState;

const BIN: &str = env!("CARGO_BIN_EXE_stack");

/// How many times a kill is tried (each time within half the range of the one
/// before) before the test gives up on landing it mid-pull.
const TRIES: u32 = 4;

fn hexmd5(bytes: &[u8]) -> String {
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Write table `i` version `v` into the origin; return its manifest entry.
fn put_table(origin: &Path, i: usize, v: u32) -> Value {
    let tid = format!("tbl_{i:03}");
    let mut bytes = Vec::with_capacity(12_000);
    let mut x = (i as u64) << 8 | u64::from(v);
    while bytes.len() < 8_000 + (i % 7) * 1000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    let rel = format!("api/data/{tid}/v{v}/download");
    let path = origin.join(&rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    json!({"id": tid, "name": format!("t{i:03}"), "md5": hexmd5(&bytes),
           "query_mode": "local", "parquet_url": format!("/{rel}"), "size": bytes.len()})
}

fn put_bundle(origin: &Path, slug: &str, v: u32) -> Value {
    let body = format!("# {slug}\nversion {v}\n").repeat(50);
    let rel = format!("api/memory/{slug}/v{v}/bundle.md");
    let path = origin.join(&rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, body.as_bytes()).unwrap();
    json!({"slug": slug, "md5": hexmd5(body.as_bytes()), "bundle_url": format!("/{rel}")})
}

/// The old and new manifests: old holds tables 0..200 (direct 0..20, packages of
/// 30), new drops 0..60, changes 100..150 and adds 200..300; a domain changes and
/// one leaves.
fn write_origin(origin: &Path) -> (PathBuf, PathBuf) {
    let make = |range: std::ops::Range<usize>, changed: std::ops::Range<usize>| {
        let mut direct = Vec::new();
        let mut packages: BTreeMap<usize, Vec<Value>> = BTreeMap::new();
        for i in range {
            let v = if changed.contains(&i) { 2 } else { 1 };
            let t = put_table(origin, i, v);
            if i % 10 == 0 {
                direct.push(t.clone());
            }
            packages.entry(i / 30).or_default().push(t);
        }
        let packages: Vec<Value> = packages
            .into_iter()
            .map(|(k, tables)| json!({"id": format!("id_p{k}"), "slug": format!("p{k}"), "name": format!("P{k}"), "tables": tables}))
            .collect();
        (direct, packages)
    };
    let (d1, p1) = make(0..200, 0..0);
    let m1 = json!({"direct_tables": d1, "data_packages": p1,
                    "memory_domains": [put_bundle(origin, "finance", 1), put_bundle(origin, "ops", 1)]});
    let (d2, p2) = make(60..300, 100..150);
    let m2 = json!({"direct_tables": d2, "data_packages": p2,
                    "memory_domains": [put_bundle(origin, "finance", 2)]});
    let old = origin.join("old.json");
    let new = origin.join("new.json");
    std::fs::write(&old, serde_json::to_vec(&m1).unwrap()).unwrap();
    std::fs::write(&new, serde_json::to_vec(&m2).unwrap()).unwrap();
    (old, new)
}

fn stack(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn run_ok(args: &[&str]) {
    let out = stack(args).output().unwrap();
    assert!(
        out.status.success(),
        "stack {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pull_args<'a>(manifest: &'a str, dir: &'a str, link: &'a str) -> Vec<&'a str> {
    vec![
        "pull",
        "--manifest",
        manifest,
        "--dir",
        dir,
        "--link",
        link,
        "--jobs",
        "2",
    ]
}

#[derive(Debug, PartialEq)]
enum Entry {
    Dir,
    File(Vec<u8>),
    Symlink(PathBuf),
}

/// The state (without fingerprints and journal position) and the tree under data/
/// and memory/, contents included.
#[derive(Debug, PartialEq)]
struct View {
    state: SyncState,
    tree: BTreeMap<String, Entry>,
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Entry>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd {
        let p = e.unwrap().path();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.file_type().is_symlink() {
            out.insert(rel, Entry::Symlink(std::fs::read_link(&p).unwrap()));
        } else if m.is_dir() {
            out.insert(rel, Entry::Dir);
            walk(root, &p, out);
        } else {
            out.insert(rel, Entry::File(std::fs::read(&p).unwrap()));
        }
    }
}

fn view(dir: &Path) -> View {
    let state: SyncState = match std::fs::read(dir.join("sync_state.json")) {
        Ok(b) => serde_json::from_slice(&b).expect("sync_state.json parses"),
        Err(_) => SyncState::default(),
    };
    let mut state = state.without_fingerprints();
    state.journal = JournalPos::default();
    let mut tree = BTreeMap::new();
    for top in ["data", "memory"] {
        let p = dir.join(top);
        if p.exists() {
            tree.insert(top.to_string(), Entry::Dir);
            walk(dir, &p, &mut tree);
        }
    }
    View { state, tree }
}

fn diff(got: &View, want: &View) -> String {
    let mut out = Vec::new();
    if got.state != want.state {
        out.push("state differs".to_string());
    }
    for k in got.tree.keys().chain(want.tree.keys()) {
        if got.tree.get(k) != want.tree.get(k) {
            out.push(k.clone());
        }
    }
    out.sort();
    out.dedup();
    out.truncate(12);
    out.join(", ")
}

/// Spawn `args`, SIGKILL it after `delay` (if it is still running). Returns whether
/// the kill landed before the process exited.
fn kill_after(args: &[&str], delay: Duration) -> bool {
    let mut child = stack(args).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(delay);
    let running = child.try_wait().unwrap().is_none();
    // Child::kill sends SIGKILL on unix.
    let _ = child.kill();
    child.wait().unwrap();
    running
}

#[test]
fn sigkill_pull_and_replay_recovers_old_or_new() {
    let kills: usize = std::env::var("STACK_SIGKILL_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let seed = std::env::var("STACK_SIGKILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("sigkill: {kills} kills, STACK_SIGKILL_SEED={seed}");
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().unwrap();
    let origin = tmp.path().join("origin");
    let (old_m, new_m) = write_origin(&origin);
    let (old_m, new_m) = (old_m.to_str().unwrap(), new_m.to_str().unwrap());

    let mut retried = 0;
    let mut lengths = BTreeMap::<&str, Duration>::new();
    let mut outcomes = BTreeMap::<&str, usize>::new();
    for k in 0..kills {
        let link = ["copy", "symlink", "hardlink"][k % 3];
        // Reference trees from clean pulls, and the length of a clean pull of new.
        let ref_old = tmp.path().join(format!("ref-old-{link}"));
        let ref_new = tmp.path().join(format!("ref-new-{link}"));
        let new_len = *lengths.entry(link).or_insert_with(|| {
            run_ok(&pull_args(old_m, ref_old.to_str().unwrap(), link));
            run_ok(&pull_args(old_m, ref_new.to_str().unwrap(), link));
            let t = Instant::now();
            run_ok(&pull_args(new_m, ref_new.to_str().unwrap(), link));
            t.elapsed()
        });
        let (want_old, want_new) = (view(&ref_old), view(&ref_new));

        let dir = tmp.path().join(format!("kill-{k}"));
        let d = dir.to_str().unwrap();
        // Kill the pull somewhere in (about) its length: staging or apply.
        let mut span = new_len.as_micros() as u64 + 1;
        let mut tries = 0;
        let delay = loop {
            std::fs::remove_dir_all(&dir).ok();
            run_ok(&pull_args(old_m, d, link));
            let delay = Duration::from_micros(rng.below(span));
            tries += 1;
            if kill_after(&pull_args(new_m, d, link), delay) {
                break delay;
            }
            assert!(
                tries < TRIES,
                "kill {k} ({link}, seed {seed}): {TRIES} kills, the last within {:?} of \
                 the start, all came after the pull had finished (a clean pull took \
                 {new_len:?}), so none tested a kill mid-pull",
                Duration::from_micros(span)
            );
            span = span / 2 + 1;
        };
        retried += usize::from(tries > 1);
        // Every other time, kill the recovery too (possibly more than once).
        if k % 2 == 1 {
            for _ in 0..2 {
                let delay = Duration::from_micros(rng.below(new_len.as_micros() as u64 / 2 + 1));
                kill_after(&["journal", "replay", "--dir", d], delay);
            }
        }
        run_ok(&["journal", "replay", "--dir", d]);
        let verify = stack(&["verify", "--contents", "--dir", d])
            .output()
            .unwrap();
        assert!(
            verify.status.success(),
            "kill {k} ({link}, after {delay:?}, seed {seed}): verify --contents failed: {}",
            String::from_utf8_lossy(&verify.stderr)
        );
        let got = view(&dir);
        let outcome = if got == want_old {
            "old"
        } else if got == want_new {
            "new"
        } else {
            panic!(
                "kill {k} ({link}, after {delay:?}, seed {seed}): neither old nor new\n  vs old: {}\n  vs new: {}",
                diff(&got, &want_old),
                diff(&got, &want_new)
            );
        };
        *outcomes.entry(outcome).or_default() += 1;
        std::fs::remove_dir_all(&dir).ok();
    }
    eprintln!(
        "sigkill: all {kills} kills landed mid-pull ({retried} after a retry); outcomes {outcomes:?}"
    );
}
