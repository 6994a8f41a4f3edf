//! `verify` names each violation (invariant number, path; exit 4); `gc` removes
//! strays; `pull` heals deleted and edited files; a no-op pull writes nothing.

use std::path::Path;

use serde_json::{json, Value};

use crate::support::*;

fn violations(dir: &Path, contents: bool) -> Vec<(u64, String, String)> {
    let r = verify(dir, contents);
    let v = r.json();
    let list: Vec<(u64, String, String)> = v["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x: &Value| {
            assert!(x["message"].is_string());
            (
                x["invariant"].as_u64().unwrap(),
                x["kind"].as_str().unwrap().to_string(),
                x["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(v["ok"], json!(list.is_empty()));
    assert_eq!(r.code, if list.is_empty() { 0 } else { 4 }, "{r:?}");
    list
}

#[track_caller]
fn has(list: &[(u64, String, String)], inv: u64, path: &str) {
    assert!(
        list.iter().any(|(i, _, p)| *i == inv && p == path),
        "expected invariant {inv} at {path} in {list:?}"
    );
}

#[test]
fn verify_finds_strays_and_gc_removes_them() {
    let (_o, l) = pulled("auto");
    let dir = l.dir();
    assert!(violations(&dir, true).is_empty());
    let clean = snapshot(&dir);
    std::fs::write(dir.join("data/_shared/tbl_zzz.parquet"), b"orphan").unwrap();
    std::fs::write(dir.join("data/p1/stray.parquet"), b"stray").unwrap();
    std::fs::create_dir_all(dir.join("data/p9")).unwrap();
    std::fs::write(dir.join("data/p9/x.parquet"), b"stray in unknown package").unwrap();
    std::fs::create_dir_all(dir.join("memory/zzz")).unwrap();
    std::fs::write(dir.join("memory/zzz/bundle.md"), b"# not in the stack").unwrap();
    for contents in [false, true] {
        let list = violations(&dir, contents);
        has(&list, 1, "data/_shared/tbl_zzz.parquet");
        has(&list, 3, "data/p1/stray.parquet");
        has(&list, 3, "data/p9/x.parquet");
        has(&list, 4, "memory/zzz");
        assert_eq!(list.len(), 4, "{list:?}");
    }
    let mut c = bin();
    c.arg("gc").arg("--dir").arg(&dir);
    let r = output(c);
    r.ok();
    assert!(r.stdout.contains("4 moved to .stack/quarantine/2"), "{r:?}");
    assert!(violations(&dir, true).is_empty());
    // Nothing was destroyed: each stray is kept under its own path.
    let kept = dir.join(".stack/quarantine/2");
    assert_eq!(
        std::fs::read(kept.join("data/p1/stray.parquet")).unwrap(),
        b"stray"
    );
    assert_eq!(
        std::fs::read(kept.join("memory/zzz/bundle.md")).unwrap(),
        b"# not in the stack"
    );
    // gc is a transaction of its own: only the journal position in the state moves.
    let files = |s: &Snapshot| -> Snapshot {
        visible(s)
            .into_iter()
            .filter(|(p, _)| p != Path::new("data/p9") && p != Path::new("sync_state.json"))
            .collect()
    };
    assert_same(&files(&clean), &files(&snapshot(&dir)), "after gc");
    let (a, b) = (state(&dir), {
        let Node::File { bytes, .. } = &clean[Path::new("sync_state.json")] else {
            panic!()
        };
        serde_json::from_slice::<Value>(bytes).unwrap()
    });
    for k in ["direct_tables", "data_packages", "memory_domains"] {
        assert_eq!(a[k], b[k], "gc changed {k} of the state");
    }
    assert_eq!(a["journal"]["txn"], json!(2));
    // gc on a clean directory removes nothing.
    let mut c = bin();
    c.arg("gc").arg("--dir").arg(&dir);
    let r = output(c);
    r.ok();
    assert!(r.stdout.contains("ok: 0 moved"), "{r:?}");
    assert!(kept.join("data/p9/x.parquet").exists());
}

/// Issue 15: a user's files saved in the stack's folders survive `gc`: moved to
/// `.stack/quarantine/<txn>/`, named on stdout, deleted only by `gc --force`.
#[test]
fn gc_keeps_a_users_files_and_deletes_only_with_force() {
    let (_o, l) = pulled("copy");
    let dir = l.dir();
    std::fs::write(dir.join("data/p1/mine.parquet"), b"my own table").unwrap();
    std::fs::write(dir.join("data/p1/notes.txt"), b"my notes").unwrap();
    let r = stack(&["gc", "--dir", dir.to_str().unwrap()]);
    r.ok();
    assert!(
        r.stdout
            .contains("moved data/p1/mine.parquet to .stack/quarantine/2/data/p1/mine.parquet"),
        "{r:?}"
    );
    assert!(r.stdout.contains("stack gc --force"), "{r:?}");
    let kept = dir.join(".stack/quarantine/2/data/p1");
    assert_eq!(
        std::fs::read(kept.join("mine.parquet")).unwrap(),
        b"my own table"
    );
    assert_eq!(std::fs::read(kept.join("notes.txt")).unwrap(), b"my notes");
    assert_verify_clean(&dir);
    let r = stack(&["gc", "--dir", dir.to_str().unwrap(), "--force"]);
    r.ok();
    assert!(r.stdout.contains("deleted .stack/quarantine/2"), "{r:?}");
    assert!(!dir.join(".stack/quarantine").exists());
    assert_verify_clean(&dir);
}

#[test]
fn verify_finds_missing_and_edited_references() {
    let (o, l) = pulled("copy");
    let dir = l.dir();
    std::fs::remove_file(dir.join("data/p1/alpha.parquet")).unwrap();
    force_write(&dir.join("data/p2/c.parquet"), b"table C edited\n");
    std::fs::remove_file(dir.join("memory/finance/bundle.md")).unwrap();
    let list = violations(&dir, true);
    has(&list, 2, "data/p1/alpha.parquet");
    has(&list, 5, "data/p2/c.parquet");
    has(&list, 4, "memory/finance/bundle.md");
    assert_eq!(list.len(), 3, "{list:?}");
    // Without --contents the stat fingerprint still catches the edit.
    has(&violations(&dir, false), 5, "data/p2/c.parquet");

    // Same-size edit with the mtime put back: only --contents sees it.
    let p = dir.join("data/p2/c.parquet");
    pull(&o.manifest(), &dir, &["--link", "copy", "--json"]).ok();
    assert!(violations(&dir, true).is_empty());
    let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    use std::io::Write;
    (&f).write_all(b"TABLE C\n").unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    has(&violations(&dir, true), 5, "data/p2/c.parquet");
}

#[test]
fn verify_finds_a_broken_symlink_and_an_edited_shared_file() {
    let (_o, l) = pulled("symlink");
    let dir = l.dir();
    std::fs::remove_file(dir.join("data/_shared/tbl_c.parquet")).unwrap();
    force_write(&dir.join("data/_shared/tbl_b.parquet"), b"edited b\n");
    let list = violations(&dir, true);
    has(&list, 2, "data/_shared/tbl_c.parquet");
    has(&list, 5, "data/p1/b.parquet");
}

fn heal(link: &str) {
    let (o, l) = pulled(link);
    let dir = l.dir();
    let good = visible(&snapshot(&dir));
    std::fs::remove_file(dir.join("data/p1/alpha.parquet")).unwrap();
    std::fs::remove_file(dir.join("memory/finance/bundle.md")).unwrap();
    force_write(&dir.join("data/_shared/tbl_c.parquet"), b"user edit\n");
    if link == "copy" {
        force_write(&dir.join("data/p1/b.parquet"), b"user edit of a copy\n");
    }
    let r = pull(&o.manifest(), &dir, &["--link", link, "--json"]);
    r.ok();
    assert_verify_clean(&dir);
    // Every file has its bytes back (and shared files their 0444 mode).
    let healed = visible(&snapshot(&dir));
    for (p, n) in &good {
        if p.starts_with("data") || p.starts_with("memory") {
            assert_eq!(healed.get(p), Some(n), "{link}: {} not healed", p.display());
        }
    }
    for (_, _, e) in entries(&dir) {
        let r = std::fs::read(dir.join(e["ref_path"].as_str().unwrap())).unwrap();
        assert_eq!(md5_hex(&r), e["md5"].as_str().unwrap());
    }
}

#[test]
fn pull_heals_deleted_and_edited_files_symlink() {
    heal("symlink");
}

#[test]
fn pull_heals_deleted_and_edited_files_copy() {
    heal("copy");
}

#[test]
fn pull_heals_deleted_and_edited_files_hardlink() {
    heal("hardlink");
}

#[test]
fn a_noop_pull_writes_nothing() {
    for link in ["auto", "copy", "hardlink"] {
        let (o, l) = pulled(link);
        let dir = l.dir();
        let before = snapshot(&dir);
        let r = pull(&o.manifest(), &dir, &["--link", link, "--json"]);
        r.ok();
        let v = r.json();
        assert_eq!(v["txn"], json!(1));
        assert_eq!(v["bytes_fetched"], json!(0));
        assert_eq!(counts(&v, "direct_tables"), [0, 0, 0, 1, 0]);
        assert_eq!(counts(&v, "data_packages"), [0, 0, 0, 4, 0]);
        assert_eq!(counts(&v, "memory_domains"), [0, 0, 0, 1, 0]);
        // The lock file is rewritten with the new holder's pid by design (it names
        // the holder);
        // everything else, .stack/journal and sync_state.json included, is untouched.
        let strip = |s: &Snapshot| -> Snapshot {
            s.iter()
                .filter(|(p, _)| p.as_path() != Path::new(".stack/lock"))
                .map(|(p, n)| (p.clone(), n.clone()))
                .collect()
        };
        assert_same(&strip(&before), &strip(&snapshot(&dir)), link);
    }
}

#[test]
fn heal_covers_bundles_and_replaced_links_and_the_next_pull_is_a_noop() {
    let (o, l) = pulled("symlink");
    let dir = l.dir();
    let good = visible(&snapshot(&dir));
    std::fs::write(dir.join("memory/finance/bundle.md"), b"# my notes\n").unwrap();
    // A symlink replaced by a regular file with other bytes.
    let r = dir.join("data/p2/c.parquet");
    std::fs::remove_file(&r).unwrap();
    std::fs::write(&r, b"not c at all\n").unwrap();
    has(&violations(&dir, true), 5, "data/p2/c.parquet");
    let rep = pull(&o.manifest(), &dir, &["--link", "symlink", "--json"]);
    rep.ok();
    assert_verify_clean(&dir);
    let healed = visible(&snapshot(&dir));
    for (p, n) in &good {
        if p.starts_with("data") || p.starts_with("memory") {
            assert_eq!(healed.get(p), Some(n), "{} not healed", p.display());
        }
    }
    // The heal refreshed the fingerprints: the next pull finds nothing to do.
    let before = snapshot(&dir);
    let journal = std::fs::read(dir.join(".stack/journal")).unwrap();
    let r = pull(&o.manifest(), &dir, &["--link", "symlink", "--json"]);
    r.ok();
    assert_eq!(r.json()["bytes_fetched"], json!(0));
    assert!(
        std::fs::read(dir.join(".stack/journal")).unwrap() == journal,
        "the pull after the heal wrote to the journal: {}",
        stack(&["journal", "show", "--dir", dir.to_str().unwrap()]).stdout
    );
    let strip = |s: &Snapshot| -> Snapshot {
        s.iter()
            .filter(|(p, _)| p.as_path() != Path::new(".stack/lock"))
            .map(|(p, n)| (p.clone(), n.clone()))
            .collect()
    };
    assert_same(&strip(&before), &strip(&snapshot(&dir)), "pull after heal");
}

#[test]
fn removed_packages_and_renamed_tables_leave_no_folders_behind() {
    let (o, l) = pulled("auto");
    let dir = l.dir();
    // p2 dropped, p1's alpha renamed to first, md5s given in upper case.
    let ts = vec![
        t("tbl_a", "a", None, b"table a, version 1\n"),
        t("tbl_a", "first", Some("p1"), b"table a, version 1\n"),
        t(
            "tbl_b",
            "b",
            Some("p1"),
            b"table b, version 1 -- a bit longer\n",
        ),
    ];
    let mut m = o.manifest_value(&ts, &[]);
    for tb in m["data_packages"][0]["tables"].as_array_mut().unwrap() {
        let up = tb["md5"].as_str().unwrap().to_uppercase();
        tb["md5"] = json!(up);
    }
    let m2 = o.write_manifest(&m, "v2.json");
    let r = pull(&m2, &dir, &["--json"]);
    r.ok();
    let v = r.json();
    // References are keyed by (package, table id): the rename is an update.
    assert_eq!(counts(&v, "data_packages"), [0, 1, 2, 1, 0]);
    assert_eq!(counts(&v, "memory_domains"), [0, 0, 1, 0, 0]);
    assert_verify_clean(&dir);
    let paths: Vec<String> = visible(&snapshot(&dir))
        .keys()
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| p.starts_with("data") || p.starts_with("memory"))
        .collect();
    assert_eq!(
        paths,
        [
            "data",
            "data/_direct",
            "data/_direct/a.parquet",
            "data/_shared",
            "data/_shared/tbl_a.parquet",
            "data/_shared/tbl_b.parquet",
            "data/p1",
            "data/p1/b.parquet",
            "data/p1/first.parquet",
            "memory",
        ],
        "{paths:#?}"
    );
    for (_, _, e) in entries(&dir) {
        let md5 = e["md5"].as_str().unwrap();
        assert_eq!(md5, md5.to_lowercase());
    }
    // Upper-case md5s are the same md5s: the next pull is a no-op.
    let r = pull(&m2, &dir, &["--json"]);
    r.ok();
    assert_eq!(r.json()["txn"], json!(2));
}

#[test]
fn a_pull_that_adds_a_reference_to_a_known_table_is_followed_by_a_noop() {
    for link in ["symlink", "copy"] {
        let (o, l) = pulled(link);
        let dir = l.dir();
        let mut ts = base_tables();
        ts.push(t("tbl_c", "c", Some("p3"), b"table c\n"));
        let m2 = o.write(&ts, &base_domains(), "v2.json");
        let r = pull(&m2, &dir, &["--link", link, "--json"]);
        r.ok();
        assert_eq!(counts(&r.json(), "data_packages"), [1, 0, 0, 4, 0]);
        let journal = std::fs::read(dir.join(".stack/journal")).unwrap();
        let r = pull(&m2, &dir, &["--link", link, "--json"]);
        r.ok();
        assert_eq!(r.json()["txn"], json!(2), "{link}");
        assert!(
            std::fs::read(dir.join(".stack/journal")).unwrap() == journal,
            "{link}: the second pull wrote to the journal: {}",
            stack(&["journal", "show", "--dir", dir.to_str().unwrap()]).stdout
        );
    }
}

/// `verify` audits `sync_state.json` as it finds it, hand edits included. A
/// memory domain whose path leaves the directory is reported as `unsafe_path`
/// (exit 4), naming the entry and what is wrong, and its file is never looked
/// at. An entry whose name is not one safe path component (its reference path,
/// built from it, would leave the directory) is refused when the state file is
/// read: `verify` reports the file (`unsafe_state`, exit 4, naming the value)
/// and audits the journal's projection instead. Either way the victim is never
/// looked at (following it, the audit would stat and hash it, find it intact and
/// say nothing of the entry).
#[test]
fn verify_reports_an_entry_pointing_outside_the_directory_and_never_reads_there() {
    let (_o, l) = pulled("copy");
    let dir = l.dir();
    let content = b"table a, version 1\n";
    let victim = l.tmp.path().join("victim.parquet");
    std::fs::write(&victim, content).unwrap();
    let pulled_state = state(&dir);
    let got = |r: &Run| -> Vec<(u64, String, String, String)> {
        r.json()["violations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["invariant"].as_u64().unwrap(),
                    v["kind"].as_str().unwrap().to_string(),
                    v["path"].as_str().unwrap().to_string(),
                    v["message"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };

    // A memory domain pointing outside: reported, never read.
    let mut st = pulled_state.clone();
    st["memory_domains"]["finance"]["path"] = json!("../victim.parquet");
    std::fs::write(
        dir.join("sync_state.json"),
        serde_json::to_vec_pretty(&st).unwrap(),
    )
    .unwrap();
    let before = snapshot(&dir);
    let domain_why = r#"state entry of memory domain "finance": path "../victim.parquet" could lead outside the directory; its bundle is not checked"#;
    for contents in [false, true] {
        let r = verify(&dir, contents);
        assert_eq!(r.code, 4, "{r:?}");
        assert_eq!(
            got(&r),
            vec![(
                4,
                "unsafe_path".to_string(),
                "../victim.parquet".to_string(),
                domain_why.to_string()
            )],
            "contents {contents}"
        );
    }
    // Without --json: the same, one line each on stderr.
    let r = stack(&["verify", "--dir", dir.to_str().unwrap()]);
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr.contains(&format!(
            "stack: invariant 4 (unsafe_path): ../victim.parquet: {domain_why}"
        )),
        "{r:?}"
    );
    assert_same(&before, &snapshot(&dir), "verify");

    // An entry named `../../../victim`: the state file is refused, naming it.
    let mut st = pulled_state;
    let e = &mut st["direct_tables"]["tbl_a"];
    e["name"] = json!("../../../victim");
    e["ref_path"] = json!("data/_direct/../../../victim.parquet");
    std::fs::write(
        dir.join("sync_state.json"),
        serde_json::to_vec_pretty(&st).unwrap(),
    )
    .unwrap();
    let before = snapshot(&dir);
    let entry_why = r#""../../../victim" is not a safe path component"#;
    for contents in [false, true] {
        let r = verify(&dir, contents);
        assert_eq!(r.code, 4, "{r:?}");
        let rows = got(&r);
        assert_eq!(rows.len(), 1, "{rows:?}");
        let (inv, kind, path, message) = &rows[0];
        assert_eq!(
            (*inv, kind.as_str(), path.as_str()),
            (3, "unsafe_state", "sync_state.json")
        );
        assert!(message.contains(entry_why), "{message}");
        assert!(r.stderr.contains("journal's projection"), "{}", r.stderr);
    }
    let r = stack(&["verify", "--dir", dir.to_str().unwrap()]);
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr
            .contains("stack: invariant 3 (unsafe_state): sync_state.json: ")
            && r.stderr.contains(entry_why),
        "{r:?}"
    );
    assert_same(&before, &snapshot(&dir), "verify");
    assert_eq!(std::fs::read(&victim).unwrap(), content);
}

/// `gc` removes partial downloads that no pull will resume.
#[test]
fn gc_removes_partial_downloads() {
    let (_o, l) = pulled("symlink");
    let dir = l.dir();
    let part = dir.join(".stack/staging/0123456789abcdef0123456789abcdef.part");
    std::fs::write(&part, vec![7u8; 100_000]).unwrap();
    stack(&["gc", "--dir", dir.to_str().unwrap()]).ok();
    assert!(!part.exists());
}

/// `verify` with an unreadable `sync_state.json` checks the journal's projection
/// instead, and says so.
#[test]
fn verify_with_an_unreadable_state_file_checks_the_journal() {
    let (_o, l) = pulled("symlink");
    let dir = l.dir();
    std::fs::write(dir.join("sync_state.json"), b"{ not json").unwrap();
    let r = verify(&dir, true);
    r.ok();
    assert!(r.stderr.contains("journal"), "{}", r.stderr);
}
