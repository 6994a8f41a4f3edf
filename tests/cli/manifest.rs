//! Every bad-manifest rule of contract §1: exit 2, a message naming the offending
//! entry, and the local directory byte-for-byte unchanged (run on an existing,
//! pulled stack).

use serde_json::{json, Value};

use crate::support::*;

/// Pull the base stack, then for each (manifest, expected substring) check that a
/// pull and a status refuse it with exit 2 and touch nothing.
fn refuse_all(cases: Vec<(String, Value, String)>) {
    let (o, l) = pulled("auto");
    let dir = l.dir();
    let before = snapshot(&dir);
    for (label, m, needle) in cases {
        let path = o.write_manifest(&m, "bad.json");
        for cmd in ["pull", "status"] {
            let mut c = bin();
            c.arg(cmd)
                .arg("--manifest")
                .arg(&path)
                .arg("--dir")
                .arg(&dir)
                .arg("--json");
            let r = output(c);
            let msg = r.json_error(2);
            assert!(
                msg.contains(&needle),
                "{label} ({cmd}): message {msg:?} should name {needle:?}"
            );
            assert_eq!(r.json()["error"]["kind"], json!("bad_manifest"), "{label}");
            assert_same(&before, &snapshot(&dir), &label);
        }
    }
}

fn base() -> Value {
    let o = base_origin();
    o.manifest_value(&base_tables(), &base_domains())
}

const UNSAFE: &[&str] = &[
    "../x", "a/b", ".", "..", "", "-x", "_x", "a\\b", "x y", "/abs",
];

fn long_name() -> String {
    "a".repeat(129)
}

#[test]
fn unsafe_components_are_refused_and_named() {
    let mut values: Vec<String> = UNSAFE.iter().map(|s| s.to_string()).collect();
    values.push(long_name());
    let mut cases = Vec::new();
    for v in &values {
        let quoted = format!("{v:?}");
        let mut m = base();
        m["direct_tables"][0]["id"] = json!(v);
        let at = |path: &str| format!("{path}: {quoted}");
        cases.push((
            format!("direct table id {v:?}"),
            m,
            at("direct_tables[0].id"),
        ));
        let mut m = base();
        m["data_packages"][0]["tables"][1]["name"] = json!(v);
        cases.push((
            format!("package table name {v:?}"),
            m,
            at("data_packages[0].tables[1].name"),
        ));
        let mut m = base();
        m["data_packages"][1]["slug"] = json!(v);
        cases.push((
            format!("package slug {v:?}"),
            m,
            at("data_packages[1].slug"),
        ));
        let mut m = base();
        m["memory_domains"][0]["slug"] = json!(v);
        cases.push((
            format!("domain slug {v:?}"),
            m,
            at("memory_domains[0].slug"),
        ));
    }
    refuse_all(cases);
}

#[test]
fn longest_safe_component_is_accepted() {
    let (o, l) = pulled("symlink");
    let mut m = base();
    let name = "b".repeat(128);
    m["data_packages"][0]["tables"][1]["name"] = json!(name);
    let path = o.write_manifest(&m, "long.json");
    pull(&path, &l.dir(), &["--json"]).ok();
    assert!(l.dir().join(format!("data/p1/{name}.parquet")).exists());
    assert_verify_clean(&l.dir());
}

#[test]
fn conflicting_entries_are_refused() {
    let mut cases = Vec::new();

    // One id, two md5s: direct vs package.
    let mut m = base();
    m["data_packages"][1]["tables"][0]["md5"] = json!("0123456789abcdef0123456789abcdef");
    cases.push(("two md5s for tbl_a".into(), m, "tbl_a".into()));

    // Two packages, one slug.
    let mut m = base();
    m["data_packages"][1]["slug"] = json!("p1");
    m["data_packages"][1]["tables"] = json!([]);
    cases.push(("duplicate slug".into(), m, "\"p1\"".into()));

    // Two refs on one path: two tables with one name in a package.
    let mut m = base();
    m["data_packages"][0]["tables"][1]["name"] = json!("alpha");
    cases.push(("same name twice".into(), m, "data/p1/alpha.parquet".into()));

    // The same table listed twice in a package.
    let mut m = base();
    let dup = m["data_packages"][1]["tables"][1].clone();
    m["data_packages"][1]["tables"]
        .as_array_mut()
        .unwrap()
        .push(dup);
    cases.push(("same table twice".into(), m, "tbl_c".into()));

    // The same direct table twice.
    let mut m = base();
    let dup = m["direct_tables"][0].clone();
    m["direct_tables"].as_array_mut().unwrap().push(dup);
    cases.push(("same direct table twice".into(), m, "tbl_a".into()));

    // Two memory domains, one slug.
    let mut m = base();
    let dup = m["memory_domains"][0].clone();
    m["memory_domains"].as_array_mut().unwrap().push(dup);
    cases.push(("duplicate domain".into(), m, "finance".into()));

    refuse_all(cases);
}

/// A conflict's message names where the id was listed first, whether that listing
/// was a local table or one that is not materialized (`query_mode` other than
/// `local`), and compares md5s whatever their case.
#[test]
fn an_md5_conflict_names_the_first_listing() {
    let other = "0123456789abcdef0123456789abcdef";
    let mut cases = Vec::new();

    let mut m = base();
    let md5 = m["direct_tables"][0]["md5"].as_str().unwrap().to_string();
    m["data_packages"][1]["tables"][0]["md5"] = json!(other);
    let msg = format!("table tbl_a has md5 {md5} in direct_tables but {other} in data package p2");
    cases.push(("first listed locally".into(), m, msg));

    let mut m = base();
    m["direct_tables"] = json!([]);
    m["data_packages"][0]["tables"][0]["query_mode"] = json!("remote");
    m["data_packages"][0]["tables"][0]["md5"] = json!(md5.to_ascii_uppercase());
    m["data_packages"][1]["tables"][0]["md5"] = json!(other);
    let msg =
        format!("table tbl_a has md5 {md5} in data package p1 but {other} in data package p2");
    cases.push(("first listed as not local".into(), m, msg));

    refuse_all(cases);

    // The same md5 in another case is the same md5.
    let (o, l) = pulled("symlink");
    let mut m = base();
    let md5 = m["direct_tables"][0]["md5"]
        .as_str()
        .unwrap()
        .to_ascii_uppercase();
    m["data_packages"][0]["tables"][0]["md5"] = json!(md5);
    let path = o.write_manifest(&m, "upper.json");
    pull(&path, &l.dir(), &["--json"]).ok();
    assert_verify_clean(&l.dir());
}

#[test]
fn bad_md5s_and_urls_are_refused() {
    let mut cases = Vec::new();
    for bad in [
        "xyz",
        "0123456789abcdef0123456789abcde",
        "0123456789abcdef0123456789abcdef0",
        "g123456789abcdef0123456789abcdef",
        "",
    ] {
        let mut m = base();
        m["data_packages"][1]["tables"][1]["md5"] = json!(bad);
        cases.push((format!("table md5 {bad:?}"), m, "tbl_c".into()));
    }
    let mut m = base();
    m["memory_domains"][0]["md5"] = json!("nothex");
    cases.push(("domain md5".into(), m, "finance".into()));

    for url in [
        "/api/../../etc/passwd",
        "/api/data/../../../x",
        "//etc/passwd",
        "api/data/tbl_c/download",
        "../api/data/tbl_c/download",
        "",
    ] {
        let mut m = base();
        m["data_packages"][1]["tables"][1]["parquet_url"] = json!(url);
        cases.push((format!("table url {url:?}"), m, "tbl_c".into()));
    }
    let mut m = base();
    m["memory_domains"][0]["bundle_url"] = json!("/api/memory/../../../etc/passwd");
    cases.push(("bundle url".into(), m, "finance".into()));

    // A local table without parquet_url (query_mode given or absent).
    let mut m = base();
    m["data_packages"][1]["tables"][1]
        .as_object_mut()
        .unwrap()
        .remove("parquet_url");
    cases.push(("no parquet_url".into(), m, "tbl_c".into()));
    let mut m = base();
    let t = m["data_packages"][1]["tables"][1].as_object_mut().unwrap();
    t.remove("parquet_url");
    t.remove("query_mode");
    cases.push(("no parquet_url, no query_mode".into(), m, "tbl_c".into()));

    refuse_all(cases);
}

#[test]
fn unparsable_and_missing_manifests_are_refused() {
    let (o, l) = pulled("auto");
    let dir = l.dir();
    let before = snapshot(&dir);
    let bad = o.root().join("broken.json");
    for (body, label) in [
        (&b"{\"direct_tables\": ["[..], "truncated"),
        (b"not json", "garbage"),
        (b"[]", "an array"),
        (b"{\"direct_tables\": {}}", "wrong type"),
        (b"null", "null"),
        (
            b"{\"direct_tables\": [[\"tbl_a\", \"a\", \"0123456789abcdef0123456789abcdef\"]]}",
            "a table as an array",
        ),
        (b"{\"data_packages\": [[\"p1\"]]}", "a package as an array"),
        (
            b"{\"memory_domains\": [[\"finance\"]]}",
            "a domain as an array",
        ),
        (b"{\"direct_tables\": [{\"id\": \"x\"}]}", "missing fields"),
    ] {
        std::fs::write(&bad, body).unwrap();
        let r = pull(&bad, &dir, &["--json"]);
        assert_eq!(r.code, 2, "{label}: {r:?}");
        let msg = r.json_error(2);
        assert!(msg.contains("manifest"), "{label}: {msg}");
        assert_same(&before, &snapshot(&dir), label);
    }
    let missing = o.root().join("does-not-exist.json");
    // A manifest file that cannot be read is an I/O failure (exit 1), not bad usage.
    let r = pull(&missing, &dir, &["--json"]);
    let msg = r.json_error(1);
    assert!(msg.contains("does-not-exist.json"), "{msg}");
    assert_same(&before, &snapshot(&dir), "missing manifest");

    // On a directory that does not exist yet, nothing is created.
    let fresh = l.tmp.path().join("fresh");
    pull(&missing, &fresh, &["--json"]).json_error(1);
    pull(&bad, &fresh, &["--json"]).json_error(2);
    assert!(!fresh.exists());
}

#[test]
fn unknown_fields_and_missing_lists_are_fine() {
    let (o, l) = pulled("auto");
    let mut m = base();
    m["extra"] = json!({"future": true});
    m["data_packages"][0]["tables"][0]["future"] = json!(1);
    m["memory_domains"][0]["future"] = json!("x");
    let path = o.write_manifest(&m, "extra.json");
    let r = pull(&path, &l.dir(), &["--json"]);
    r.ok();
    assert_eq!(counts(&r.json(), "data_packages"), [0, 0, 0, 4, 0]);

    // Missing lists mean empty: everything is removed.
    let path = o.write_manifest(&json!({}), "empty.json");
    let r = pull(&path, &l.dir(), &["--json"]);
    r.ok();
    let v = r.json();
    assert_eq!(counts(&v, "direct_tables"), [0, 0, 1, 0, 0]);
    assert_eq!(counts(&v, "data_packages"), [0, 0, 4, 0, 0]);
    assert_eq!(counts(&v, "memory_domains"), [0, 0, 1, 0, 0]);
    assert_verify_clean(&l.dir());
    assert!(!l.dir().join("memory/finance").exists());
}

/// One table id listed with two URLs (mirrors of the same md5) is a valid manifest.
#[test]
fn one_table_with_two_urls_is_accepted() {
    let o = base_origin();
    let l = Local::new();
    let mut m = o.manifest_value(&base_tables(), &base_domains());
    let url = m["data_packages"][0]["tables"][0]["parquet_url"]
        .as_str()
        .unwrap()
        .to_string();
    m["data_packages"][0]["tables"][0]["parquet_url"] = json!(format!("{url}?package=p1"));
    let path = o.write_manifest(&m, "mirrors.json");
    pull(&path, &l.dir(), &[]).ok();
    assert_verify_clean(&l.dir());
}
