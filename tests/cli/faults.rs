//! Fetch faults (exit 1, previous stack intact, nothing half-made visible), and
//! `status` / `pull --dry-run` changing nothing.

use std::path::Path;

use serde_json::json;

use crate::support::*;

/// The base stack plus a changed tbl_b, a new tbl_d and a new domain.
fn v2_tables() -> Vec<T> {
    let mut ts = base_tables();
    ts[2] = t("tbl_b", "b", Some("p1"), b"table b, version 2\n");
    ts.push(t("tbl_d", "d", Some("p3"), b"table d\n"));
    ts.push(t("tbl_e", "e", None, b"table e\n"));
    ts
}

fn v2_domains() -> Vec<(&'static str, &'static [u8])> {
    vec![
        ("finance", b"# finance\nbundle v1\n" as &[u8]),
        ("ops", b"# ops\n"),
    ]
}

/// No name that looks like a partial, staged or temporary file anywhere outside
/// `.stack/`.
#[track_caller]
fn assert_no_leftovers(dir: &Path) {
    for p in visible(&snapshot(dir)).keys() {
        let s = p.to_string_lossy();
        assert!(
            !s.contains(".part")
                && !s.contains(".tmp")
                && !s.contains("staging")
                && !s.contains('~'),
            "leftover visible at {s}"
        );
    }
}

fn fault(break_it: impl Fn(&Origin), needle: &str, kind: &str) {
    let (o, l) = pulled("auto");
    let dir = l.dir();
    let before = snapshot(&dir);
    let m2 = o.write(&v2_tables(), &v2_domains(), "v2.json");
    break_it(&o);
    let r = pull(&m2, &dir, &["--json"]);
    let msg = r.json_error(1);
    assert!(msg.contains(needle), "{msg:?} should name {needle:?}");
    assert_eq!(r.json()["error"]["kind"], json!(kind));
    assert_same(&visible(&before), &visible(&snapshot(&dir)), "failed pull");
    assert_no_leftovers(&dir);
    assert_verify_clean(&dir);
    // Once the origin is repaired, the pull goes through.
    let o2 = Origin::new(&v2_tables(), &v2_domains());
    let r = pull(&o2.manifest(), &dir, &["--json"]);
    r.ok();
    assert_eq!(counts(&r.json(), "data_packages"), [1, 1, 0, 3, 0]);
    assert_no_leftovers(&dir);
    assert_verify_clean(&dir);
}

#[test]
fn missing_origin_file_fails_with_exit_1_and_keeps_the_stack() {
    fault(
        |o| {
            let t = t("tbl_d", "d", Some("p3"), b"table d\n");
            std::fs::remove_file(o.root().join(&table_url(&t)[1..])).unwrap();
        },
        "tbl_d",
        "fetch",
    );
}

#[test]
fn missing_bundle_fails_with_exit_1_and_keeps_the_stack() {
    fault(
        |o| {
            std::fs::remove_file(o.root().join(&bundle_url("ops", b"# ops\n")[1..])).unwrap();
        },
        "ops",
        "fetch",
    );
}

#[test]
fn wrong_bytes_fail_with_exit_1_and_leave_nothing_visible() {
    fault(
        |o| {
            // The changed table arrives with other bytes than its md5 promises.
            let t = t("tbl_b", "b", Some("p1"), b"table b, version 2\n");
            std::fs::write(o.root().join(&table_url(&t)[1..]), b"corrupted in transit").unwrap();
        },
        "tbl_b",
        "checksum",
    );
}

#[test]
fn wrong_bundle_bytes_fail_with_exit_1() {
    fault(
        |o| {
            std::fs::write(
                o.root().join(&bundle_url("ops", b"# ops\n")[1..]),
                b"# not ops",
            )
            .unwrap();
        },
        "ops",
        "checksum",
    );
}

#[test]
fn a_failed_first_pull_leaves_no_visible_stack() {
    let o = base_origin();
    let l = Local::new();
    std::fs::remove_file(o.root().join(&table_url(&base_tables()[4])[1..])).unwrap();
    pull(&o.manifest(), &l.dir(), &["--json"]).json_error(1);
    let s = visible(&snapshot(&l.dir()));
    for p in s.keys() {
        let p = p.to_string_lossy();
        assert!(
            p.is_empty() || p == "data" || p == "memory" || p == "sync_state.json",
            "a failed first pull made {p} visible"
        );
    }
    // The folders it was building out of sight (`place-<k>`) are gone too, and the
    // staged files with them (a local origin keeps no partial download).
    let staging: Vec<_> = std::fs::read_dir(l.dir().join(".stack/staging"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(staging.is_empty(), "a failed first pull left {staging:?}");
}

#[test]
fn status_and_dry_run_change_nothing_and_count_right() {
    let (o, l) = pulled("auto");
    let dir = l.dir();
    // v2: tbl_b updated (p1/b), tbl_c removed (p2/c), tbl_d added (p3/d), direct
    // tbl_e added, one remote table skipped, finance bundle changed, ops added.
    let mut ts = base_tables();
    ts[2] = t("tbl_b", "b", Some("p1"), b"table b, version 2\n");
    ts.remove(4);
    ts.push(t("tbl_d", "d", Some("p3"), b"table d\n"));
    ts.push(t("tbl_e", "e", None, b"table e\n"));
    let doms: Vec<(&str, &[u8])> = vec![("finance", b"# finance v2\n"), ("ops", b"# ops\n")];
    let mut m = o.manifest_value(&ts, &doms);
    o.write(&ts, &doms, "v2.json");
    m["direct_tables"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": "tbl_remote", "name": "remote", "md5": "0123456789abcdef0123456789abcdef", "query_mode": "remote"}));
    let m2 = o.write_manifest(&m, "v2.json");

    let before = snapshot(&dir);
    for args in [
        vec!["status", "--json"],
        vec!["pull", "--dry-run", "--json"],
    ] {
        let mut c = bin();
        c.args(&args)
            .arg("--manifest")
            .arg(&m2)
            .arg("--dir")
            .arg(&dir);
        let r = output(c);
        r.ok();
        let v = r.json();
        assert_eq!(v["ok"], json!(true));
        assert_eq!(v["dry_run"], json!(true), "{args:?}");
        assert_eq!(v["txn"], json!(1));
        assert_eq!(counts(&v, "direct_tables"), [1, 0, 0, 1, 1], "{args:?}");
        assert_eq!(counts(&v, "data_packages"), [1, 1, 1, 2, 0], "{args:?}");
        assert_eq!(counts(&v, "memory_domains"), [1, 1, 0, 0, 0], "{args:?}");
        assert_same(&before, &snapshot(&dir), &format!("{args:?}"));
    }
    // The real pull then reports the same counts.
    let r = pull(&m2, &dir, &["--json"]);
    r.ok();
    let v = r.json();
    assert_eq!(v["dry_run"], json!(false));
    assert_eq!(v["txn"], json!(2));
    assert_eq!(counts(&v, "direct_tables"), [1, 0, 0, 1, 1]);
    assert_eq!(counts(&v, "data_packages"), [1, 1, 1, 2, 0]);
    assert_eq!(counts(&v, "memory_domains"), [1, 1, 0, 0, 0]);
    assert!(v["bytes_fetched"].as_u64().unwrap() > 0);
    assert!(v["elapsed_ms"].is_u64());
    assert_verify_clean(&dir);
}

#[test]
fn status_on_a_fresh_directory_creates_nothing() {
    let o = base_origin();
    let l = Local::new();
    for args in [
        vec!["status", "--json"],
        vec!["pull", "--dry-run", "--json"],
    ] {
        let mut c = bin();
        c.args(&args)
            .arg("--manifest")
            .arg(o.manifest())
            .arg("--dir")
            .arg(l.dir());
        let r = output(c);
        r.ok();
        let v = r.json();
        assert_eq!(counts(&v, "direct_tables"), [1, 0, 0, 0, 0]);
        assert_eq!(counts(&v, "data_packages"), [4, 0, 0, 0, 0]);
        assert_eq!(counts(&v, "memory_domains"), [1, 0, 0, 0, 0]);
        assert!(!l.dir().exists(), "{args:?} created the directory");
    }
}
