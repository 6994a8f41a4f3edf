//! The no-op fast path: a pull of the very manifest the state file realised (same
//! bytes, origin and link mode) on an undamaged disk neither parses the manifest nor
//! changes anything, and reports what a full plan would.

use serde_json::json;

use crate::support::*;

/// A manifest with a skipped (remote) direct table, pulled once.
fn with_a_skipped_table() -> (Origin, Local, std::path::PathBuf) {
    let o = base_origin();
    let mut m = o.manifest_value(&base_tables(), &base_domains());
    m["direct_tables"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": "tbl_remote", "name": "remote", "md5": "0123456789abcdef0123456789abcdef", "query_mode": "remote"}));
    let path = o.write_manifest(&m, "skips.json");
    let l = Local::new();
    pull(&path, &l.dir(), &["--json"]).ok();
    (o, l, path)
}

#[test]
fn an_unchanged_manifest_reports_what_a_full_plan_says_and_touches_nothing() {
    let (o, l, path) = with_a_skipped_table();
    let dir = l.dir();
    assert!(
        state(&dir)["journal"]["pulled"]["key"].is_string(),
        "the pull records its key: {}",
        state(&dir)["journal"]
    );
    // The same content under other bytes (pretty-printed): the full plan.
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let pretty = o.write_manifest(&m, "skips-pretty.json");
    std::fs::write(&pretty, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let full = pull(&pretty, &dir, &["--json"]);
    full.ok();
    let before = snapshot(&dir);
    let fast = pull(&path, &dir, &["--json"]);
    fast.ok();
    let status = {
        let mut c = bin();
        c.args(["status", "--json", "--manifest"])
            .arg(&path)
            .arg("--dir")
            .arg(&dir);
        output(c)
    };
    status.ok();
    for (what, run) in [("pull", &fast), ("status", &status)] {
        let (a, b) = (full.json(), run.json());
        for section in ["direct_tables", "data_packages", "memory_domains"] {
            assert_eq!(counts(&a, section), counts(&b, section), "{what} {section}");
        }
        assert_eq!(a["txn"], b["txn"], "{what}");
    }
    assert_eq!(
        counts(&fast.json(), "direct_tables")[4],
        1,
        "the remote table is skipped"
    );
    // Nothing but the lock file changed.
    let mut after = snapshot(&dir);
    let mut before = before;
    for s in [&mut before, &mut after] {
        s.remove(std::path::Path::new(".stack/lock"));
    }
    assert_same(&before, &after, "no-op pull");
}

#[test]
fn an_unchanged_manifest_still_repairs_damage() {
    let (_o, l, path) = with_a_skipped_table();
    let dir = l.dir();
    let (_, _, e) = entries(&dir).into_iter().next().unwrap();
    std::fs::remove_file(dir.join(e["ref_path"].as_str().unwrap())).unwrap();
    force_write(&dir.join("data/_shared/tbl_b.parquet"), b"edited by hand\n");
    let r = pull(&path, &dir, &["--json"]);
    r.ok();
    assert_eq!(r.json()["txn"], json!(2), "the repair is a transaction");
    assert_verify_clean(&dir);
    let again = pull(&path, &dir, &["--json"]);
    assert_eq!(again.json()["txn"], json!(2), "then a no-op again");
}

#[test]
fn the_key_is_rebuilt_by_replay_and_kept_by_compaction() {
    let (_o, l, path) = with_a_skipped_table();
    let dir = l.dir();
    let d = dir.to_str().unwrap();
    let key = state(&dir)["journal"]["pulled"].clone();
    assert!(key["key"].is_string());
    // The journal's `request` record carries it: a rebuilt state file has it.
    std::fs::remove_file(dir.join("sync_state.json")).unwrap();
    stack(&["journal", "replay", "--dir", d]).ok();
    assert_eq!(state(&dir)["journal"]["pulled"], key);
    // A checkpoint carries it too (a compaction changes no table): the state file
    // keeps it, a replay of the compacted journal rebuilds it, and the next pull is
    // still a no-op that touches nothing and counts right.
    stack(&["journal", "compact", "--dir", d]).ok();
    assert_eq!(state(&dir)["journal"]["pulled"], key);
    std::fs::remove_file(dir.join("sync_state.json")).unwrap();
    stack(&["journal", "replay", "--dir", d]).ok();
    assert_eq!(state(&dir)["journal"]["pulled"], key);
    let txn = state(&dir)["journal"]["txn"].clone();
    let mut before = snapshot(&dir);
    let r = pull(&path, &dir, &["--json"]);
    r.ok();
    let v = r.json();
    assert_eq!(v["txn"], txn, "no new transaction");
    assert_eq!(counts(&v, "direct_tables")[4], 1);
    assert_eq!(counts(&v, "data_packages")[3], 4);
    let mut after = snapshot(&dir);
    for s in [&mut before, &mut after] {
        s.remove(std::path::Path::new(".stack/lock"));
    }
    assert_same(&before, &after, "no-op pull after a compaction");
    assert_verify_clean(&dir);
}

#[test]
fn a_state_file_that_never_ends_is_rebuilt_not_read_forever() {
    let (_o, l, path) = with_a_skipped_table();
    let dir = l.dir();
    let before = state(&dir);
    std::fs::remove_file(dir.join("sync_state.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.join("sync_state.json")).unwrap();
    let r = pull(&path, &dir, &["--json"]);
    r.ok();
    assert_eq!(r.json()["txn"], json!(1));
    assert!(
        !std::fs::symlink_metadata(dir.join("sync_state.json"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "the state file is a file again"
    );
    // The same stack, rebuilt from the journal.
    let (mut after, mut before) = (state(&dir), before);
    after["journal"] = json!(null);
    before["journal"] = json!(null);
    assert_eq!(after, before);
    assert_verify_clean(&dir);
}

#[test]
fn tables_over_the_small_limit_stream_whatever_size_the_manifest_claims() {
    // Two tables of 2 MiB (over the 1 MiB a local origin hands over whole), one
    // declared with its true size and one under-declared as 10 bytes, beside the
    // small base tables: the large ones stream, the small ones are batched.
    let big_a: Vec<u8> = (0..2u32 << 20).map(|i| (i % 251) as u8).collect();
    let big_b: Vec<u8> = (0..2u32 << 20).map(|i| (i % 241) as u8).collect();
    let mut ts = base_tables();
    ts.push(t("tbl_big_a", "big_a", Some("p1"), &big_a));
    ts.push(t("tbl_big_b", "big_b", None, &big_b));
    let o = Origin::new(&ts, &base_domains());
    let mut m = o.manifest_value(&ts, &base_domains());
    for e in m["direct_tables"].as_array_mut().unwrap() {
        if e["id"] == json!("tbl_big_b") {
            e["size"] = json!(10);
        }
    }
    let path = o.write_manifest(&m, "big.json");
    let l = Local::new();
    let dir = l.dir();
    let r = pull(&path, &dir, &["--json"]);
    r.ok();
    assert_eq!(counts(&r.json(), "direct_tables")[0], 2);
    assert_eq!(
        std::fs::read(dir.join("data/p1/big_a.parquet")).unwrap(),
        big_a
    );
    assert_eq!(
        std::fs::read(dir.join("data/_direct/big_b.parquet")).unwrap(),
        big_b
    );
    assert_verify_clean(&dir);
    let v = verify(&dir, true);
    v.ok();
}
