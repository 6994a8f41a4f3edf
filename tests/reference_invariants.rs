//! One-to-one port of `shared/reference/test_pull_sync_invariants.py`, the test
//! suite of the Python engine `stack` replaces: the same test names, seeds, table
//! pool, manifest generator (drawing from a port of CPython's `random.Random`, so the
//! same seeds give the same manifests), fake bytes and md5 scheme, and the same
//! `_assert_invariants` checks plus invariant 5 (content) — each run under every
//! link strategy.
//!
//! State paths are absolute (contract §3): the port opens them as the state names
//! them, from its own working directory, as the Python did.
//!
//! One deliberate difference, forced by the contract rather than chosen: the
//! reference engine treated a memory domain's md5 as a version tag (its fixtures'
//! bundle bytes never hash to it), so these tests pull with
//! `BundleCheck::TrustServer` (the Python package's default for a dict manifest);
//! the CLI verifies bundle md5s.

// Test fixtures write the real disk directly; the seam rule is for the engine.
#![allow(clippy::disallowed_methods)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use md5::{Digest, Md5};
use serde_json::{json, Value};
use stack::{
    audit_invariants, run_stack_sync, BundleCheck, LinkMode, Manifest, PullStackOptions, SyncState,
};
use support::pyrandom::PyRandom;
use support::reference_gen::{build_random_manifest, make_table_entry};

const STRATEGIES: [LinkMode; 5] = [
    LinkMode::Auto,
    LinkMode::Symlink,
    LinkMode::Hardlink,
    LinkMode::Copy,
    LinkMode::Reflink,
];

fn hexmd5(bytes: &[u8]) -> String {
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---------------------------------------------------------------------------
// Fake server-side state — deterministic parquet bytes per (id, md5)
// ---------------------------------------------------------------------------

/// `tid = url.rstrip("/").rsplit("/", 2)[-2]`
fn tid_of_url(url: &str) -> String {
    let parts: Vec<&str> = url.trim_end_matches('/').rsplitn(3, '/').collect();
    parts[1].to_string()
}

type Md5Index = Arc<Mutex<BTreeMap<String, String>>>;

fn make_fetcher(index: Md5Index) -> stack::FetchFn {
    Box::new(move |url: &str, dest: &Path| {
        let tid = tid_of_url(url);
        let md5 = index.lock().unwrap().get(&tid).cloned().unwrap_or_default();
        std::fs::create_dir_all(dest.parent().unwrap())?;
        std::fs::write(dest, format!("FAKE|{tid}|md5={md5}"))
    })
}

/// md5 that returns the manifest-declared md5 if the file's bytes encode it.
fn fake_md5(index: &BTreeMap<String, String>, path: &Path) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    let text = String::from_utf8_lossy(&bytes);
    for (tid, expected) in index {
        if text.contains(&format!("|{tid}|md5={expected}")) {
            return Ok(expected.clone());
        }
    }
    Ok(hexmd5(&bytes))
}

fn make_md5(index: Md5Index) -> stack::Md5Fn {
    Box::new(move |path: &Path| {
        let idx = index.lock().unwrap().clone();
        fake_md5(&idx, path)
    })
}

// ---------------------------------------------------------------------------
// Manifest builders
// ---------------------------------------------------------------------------

// `_make_table_entry` lives beside the generator, in `support::reference_gen`.

fn make_manifest(direct: Vec<Value>, packages: Vec<Value>, domains: Vec<Value>) -> Value {
    json!({"direct_tables": direct, "data_packages": packages, "memory_domains": domains})
}

fn to_manifest(v: &Value) -> Manifest {
    serde_json::from_value(v.clone()).expect("test manifests are well-formed")
}

// ---------------------------------------------------------------------------
// Invariant assertions
// ---------------------------------------------------------------------------

/// Every (ref_path, shared_path, strategy, md5) recorded in the state.
fn walk_refs(state: &Value) -> Vec<(String, Option<String>, Option<String>, String)> {
    let mut out = Vec::new();
    let mut emit = |e: &Value| {
        if let Some(r) = e.get("ref_path").and_then(Value::as_str) {
            out.push((
                r.to_string(),
                e.get("shared_path")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                e.get("strategy")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                e.get("md5")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            ));
        }
    };
    if let Some(d) = state.get("direct_tables").and_then(Value::as_object) {
        d.values().filter(|v| v.is_object()).for_each(&mut emit);
    }
    if let Some(pkgs) = state.get("data_packages").and_then(Value::as_object) {
        for pkg in pkgs.values().filter_map(Value::as_object) {
            pkg.values().filter(|v| v.is_object()).for_each(&mut emit);
        }
    }
    out
}

fn resolve(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Walk disk + sync_state.json and assert all four invariants hold (plus 5).
fn assert_invariants(
    local_dir: &Path,
    expected_domains_in_stack: &BTreeSet<String>,
    md5_of: &dyn Fn(&Path) -> String,
) {
    let state_path = local_dir.join("sync_state.json");
    let state_text = std::fs::read(&state_path).ok();
    let state: Value = match &state_text {
        Some(text) => serde_json::from_slice(text).unwrap(),
        None => json!({}),
    };
    let local_data = local_dir.join("data");
    let shared_dir = local_data.join("_shared");

    // Collect every ref → shared mapping from state.
    let mut refs_by_shared: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    for (r, shared, _strategy, md5) in walk_refs(&state) {
        // Opened as the state names them, from the test's own working directory
        // (contract §3: the paths are absolute).
        let ref_p = PathBuf::from(&r);
        assert!(ref_p.is_absolute(), "ref_path {r} is not absolute");
        let shared_p = shared.map(PathBuf::from);
        // Invariant 2: every state ref resolves to an existing _shared file.
        let shared_p = shared_p.filter(|p| p.exists()).unwrap_or_else(|| {
            panic!(
                "broken reference: state ref {} → shared missing on disk",
                ref_p.display()
            )
        });
        // The ref itself must also exist on disk (symlink/hardlink/copy).
        assert!(
            ref_p.exists() || ref_p.is_symlink(),
            "broken reference: ref {} not present on disk",
            ref_p.display()
        );
        // Invariant 5 (the port's addition): the reference reads back the entry's md5.
        assert_eq!(
            md5_of(&ref_p),
            md5,
            "content of {} is not its entry's md5",
            ref_p.display()
        );
        refs_by_shared
            .entry(resolve(&shared_p))
            .or_default()
            .push(ref_p);
    }

    // Invariant 1: every file in _shared/ has at least one reference.
    if shared_dir.exists() {
        for f in std::fs::read_dir(&shared_dir).unwrap() {
            let f = f.unwrap().path();
            if !f.is_file() {
                continue;
            }
            let refs = refs_by_shared
                .get(&resolve(&f))
                .cloned()
                .unwrap_or_default();
            assert!(
                !refs.is_empty(),
                "orphan _shared parquet: {} has zero references",
                f.display()
            );
        }
    }

    // Invariant 3: sync_state rows ↔ disk parquets are 1:1 inside data/.
    let mut disk_refs: Vec<PathBuf> = Vec::new();
    if local_data.exists() {
        for sub in std::fs::read_dir(&local_data).unwrap() {
            let sub = sub.unwrap().path();
            if sub.file_name().unwrap() == "_shared" || !sub.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&sub).unwrap() {
                let f = f.unwrap().path();
                if f.is_file() || f.is_symlink() {
                    disk_refs.push(f);
                }
            }
        }
    }
    for f in &disk_refs {
        let resolved = resolve(f);
        let accounted = walk_refs(&state).iter().any(|(r, _, _, _)| {
            let ref_p = PathBuf::from(r);
            ref_p == *f || resolve(&ref_p) == resolved
        });
        assert!(
            accounted,
            "untracked disk parquet under data/: {}",
            f.display()
        );
    }

    // Invariant 4: memory bundle ↔ stack.
    let memory_dir = local_dir.join("memory");
    let on_disk: BTreeSet<String> = if memory_dir.exists() {
        std::fs::read_dir(&memory_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir())
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    } else {
        BTreeSet::new()
    };
    assert_eq!(
        &on_disk, expected_domains_in_stack,
        "memory bundle/stack mismatch: disk={on_disk:?} stack={expected_domains_in_stack:?}"
    );

    // And the engine's own audit_invariants surface should be empty.
    let typed: SyncState = match &state_text {
        Some(text) => stack::replay::state::parse_state(text).unwrap(),
        None => SyncState::default(),
    };
    let violations = audit_invariants(&local_data, &typed);
    let serious: Vec<_> = violations
        .iter()
        .filter(|v| !v.kind.starts_with("dangling shared"))
        .collect();
    assert!(serious.is_empty(), "audit_invariants flagged: {serious:?}");
}

// ---------------------------------------------------------------------------
// Scenario generator
// ---------------------------------------------------------------------------

fn gen_md5(tid: &str, ver: u64) -> String {
    hexmd5(format!("{tid}:v{ver}").as_bytes())
}

fn options(
    manifest: &Value,
    local_dir: &Path,
    index: &Md5Index,
    bundle: stack::BundleFn,
    link: LinkMode,
) -> PullStackOptions {
    let mut opts = PullStackOptions::new(
        to_manifest(manifest),
        local_dir,
        make_fetcher(index.clone()),
        make_md5(index.clone()),
        bundle,
    );
    opts.link = link;
    opts.bundle_check = BundleCheck::TrustServer;
    opts
}

fn domains_of(manifest: &Value) -> BTreeSet<String> {
    manifest["memory_domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["slug"].as_str().unwrap().to_string())
        .collect()
}

// ---------------------------------------------------------------------------
// Property test
// ---------------------------------------------------------------------------

#[test]
fn test_pull_invariants_property() {
    for link in STRATEGIES {
        for seed in [42u64, 1337, 2024, 7, 99] {
            let tmp = tempfile::tempdir().unwrap();
            let mut rng = PyRandom::new(seed);
            let table_pool: Vec<String> = "abcdef".chars().map(|c| format!("tbl_{c}")).collect();
            let version_clock: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
            let index: Md5Index = Arc::default();
            let local_dir = tmp.path().join("local");
            std::fs::create_dir(&local_dir).unwrap();

            for _step in 0..6 {
                let manifest = build_random_manifest(
                    &mut rng,
                    &table_pool,
                    &mut version_clock.lock().unwrap(),
                    &gen_md5,
                );
                // Rebuild md5 index from the manifest so the fetcher knows what bytes
                // to emit for each (id, version).
                let mut idx = BTreeMap::new();
                for t in manifest["direct_tables"].as_array().unwrap() {
                    idx.insert(
                        t["id"].as_str().unwrap().to_string(),
                        t["md5"].as_str().unwrap().to_string(),
                    );
                }
                for pkg in manifest["data_packages"].as_array().unwrap() {
                    for t in pkg["tables"].as_array().unwrap() {
                        idx.insert(
                            t["id"].as_str().unwrap().to_string(),
                            t["md5"].as_str().unwrap().to_string(),
                        );
                    }
                }
                *index.lock().unwrap() = idx.clone();
                let clock = version_clock.clone();
                let bundle_fetcher: stack::BundleFn = Box::new(move |slug: &str| {
                    let ver = clock
                        .lock()
                        .unwrap()
                        .get(&format!("dom_{slug}"))
                        .copied()
                        .unwrap_or(1);
                    Ok(format!("BUNDLE|{slug}|v{ver}").into_bytes())
                });
                let opts = options(&manifest, &local_dir, &index, bundle_fetcher, link);
                run_stack_sync(&opts).unwrap_or_else(|e| panic!("seed {seed} {link:?}: {e}"));
                assert_invariants(&local_dir, &domains_of(&manifest), &|p| {
                    fake_md5(&idx, p).unwrap()
                });
            }
        }
    }
}

fn simple_fixture(md5_index: BTreeMap<String, String>) -> (Md5Index, stack::BundleFn) {
    let index: Md5Index = Arc::new(Mutex::new(md5_index));
    let bundle: stack::BundleFn = Box::new(|slug: &str| Ok(format!("BUNDLE|{slug}").into_bytes()));
    (index, bundle)
}

#[test]
fn test_pull_invariants_idempotent_repull() {
    for link in STRATEGIES {
        let tmp = tempfile::tempdir().unwrap();
        let local_dir = tmp.path().join("local");
        std::fs::create_dir(&local_dir).unwrap();
        let md5_index = BTreeMap::from([("tbl_a".to_string(), gen_md5("tbl_a", 1))]);
        let (index, bundle) = simple_fixture(md5_index.clone());
        let manifest = make_manifest(
            vec![make_table_entry("tbl_a", "a", &md5_index["tbl_a"])],
            vec![],
            vec![],
        );
        let opts = options(&manifest, &local_dir, &index, bundle, link);
        let md5_of = |p: &Path| fake_md5(&md5_index, p).unwrap();

        let rep1 = run_stack_sync(&opts).unwrap();
        assert_eq!(rep1.direct_tables.added, 1);
        assert_invariants(&local_dir, &BTreeSet::new(), &md5_of);

        let rep2 = run_stack_sync(&opts).unwrap();
        // Idempotent: no adds, no updates, no removes.
        assert_eq!(rep2.direct_tables.added, 0);
        assert_eq!(rep2.direct_tables.updated, 0);
        assert_eq!(rep2.direct_tables.removed, 0);
        assert_invariants(&local_dir, &BTreeSet::new(), &md5_of);
    }
}

#[test]
fn test_pull_invariants_remove_with_overlap_preserves_shared() {
    for link in STRATEGIES {
        let tmp = tempfile::tempdir().unwrap();
        let local_dir = tmp.path().join("local");
        std::fs::create_dir(&local_dir).unwrap();
        let md5_a = gen_md5("tbl_a", 1);
        let md5_index = BTreeMap::from([("tbl_a".to_string(), md5_a.clone())]);
        let md5_of = |p: &Path| fake_md5(&md5_index, p).unwrap();
        let pkg = |id: &str, slug: &str, name: &str| json!({"id": id, "slug": slug, "name": name, "tables": [make_table_entry("tbl_a", "a", &md5_a)]});

        // Step 1: both packages reference tbl_a.
        let m1 = make_manifest(
            vec![],
            vec![pkg("id_p1", "p1", "P1"), pkg("id_p2", "p2", "P2")],
            vec![],
        );
        let (index, bundle) = simple_fixture(md5_index.clone());
        let mut opts = options(&m1, &local_dir, &index, bundle, link);
        run_stack_sync(&opts).unwrap();
        assert_invariants(&local_dir, &BTreeSet::new(), &md5_of);
        // Verify the canonical _shared file exists.
        let shared = local_dir.join("data").join("_shared").join("tbl_a.parquet");
        assert!(shared.exists());

        // Step 2: drop p2 → tbl_a stays (still referenced by p1).
        let m2 = make_manifest(vec![], vec![pkg("id_p1", "p1", "P1")], vec![]);
        opts.manifest = to_manifest(&m2);
        run_stack_sync(&opts).unwrap();
        assert!(
            shared.exists(),
            "shared parquet must survive while p1 still references it"
        );
        assert_invariants(&local_dir, &BTreeSet::new(), &md5_of);

        // Step 3: drop p1 → tbl_a now has zero refs → _shared file removed.
        let m3 = make_manifest(vec![], vec![], vec![]);
        opts.manifest = to_manifest(&m3);
        run_stack_sync(&opts).unwrap();
        assert!(
            !shared.exists(),
            "shared parquet must be deleted when ref count hits 0"
        );
        assert_invariants(&local_dir, &BTreeSet::new(), &md5_of);
    }
}

#[test]
fn test_pull_invariants_memory_domain_lifecycle() {
    for link in STRATEGIES {
        let tmp = tempfile::tempdir().unwrap();
        let local_dir = tmp.path().join("local");
        std::fs::create_dir(&local_dir).unwrap();
        let fetcher: stack::FetchFn = Box::new(|_url: &str, dest: &Path| {
            std::fs::create_dir_all(dest.parent().unwrap())?;
            std::fs::write(dest, b"")
        });
        let md5_of: stack::Md5Fn = Box::new(|_p: &Path| Ok(String::new()));
        let bundle: stack::BundleFn =
            Box::new(|slug: &str| Ok(format!("BUNDLE|{slug}").into_bytes()));

        let md5_finance = gen_md5("dom_finance", 1);
        let m1 = make_manifest(
            vec![],
            vec![],
            vec![json!({"slug": "finance", "md5": md5_finance})],
        );
        let mut opts = PullStackOptions::new(to_manifest(&m1), &local_dir, fetcher, md5_of, bundle);
        opts.link = link;
        opts.bundle_check = BundleCheck::TrustServer;
        run_stack_sync(&opts).unwrap();
        let bundle_path = local_dir.join("memory").join("finance").join("bundle.md");
        assert!(bundle_path.exists());
        assert_invariants(
            &local_dir,
            &BTreeSet::from(["finance".to_string()]),
            &|_| String::new(),
        );

        // Domain leaves stack → bundle.md removed.
        let m2 = make_manifest(vec![], vec![], vec![]);
        opts.manifest = to_manifest(&m2);
        run_stack_sync(&opts).unwrap();
        assert!(!bundle_path.exists());
        assert_invariants(&local_dir, &BTreeSet::new(), &|_| String::new());
    }
}

/// The RNG port draws what CPython 3.11 draws (values printed by CPython).
#[test]
fn pyrandom_matches_cpython() {
    let mut r = PyRandom::new(42);
    assert_eq!(r.random(), 0.6394267984578837);
    assert_eq!(r.random(), 0.025010755222666936);
    assert_eq!(r.randint(0, 3), 2);
    assert_eq!(
        r.sample(&['a', 'b', 'c', 'd', 'e', 'f'], 3),
        vec!['b', 'f', 'e']
    );
    let mut r = PyRandom::new(1337);
    assert_eq!(r.randint(1, 3), 3);
    assert_eq!(r.sample(&['a', 'b', 'c', 'd', 'e', 'f'], 2), vec!['e', 'c']);
    assert_eq!(r.random(), 0.5709789811505924);
}
