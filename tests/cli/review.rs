//! Regressions for the findings of the first independent review: each test names
//! the failure it keeps from coming back.

use std::path::Path;

use serde_json::json;

use crate::support::*;

/// A folder where a reference goes used to fail the pull after its commit point,
/// and every later command with it. Now the pull refuses before the commit point,
/// names the path, changes nothing, and succeeds once the folder is moved away.
#[test]
fn a_folder_at_a_reference_path_is_refused_before_the_commit_point() {
    let (o, l) = pulled("symlink");
    let dir = l.dir();
    let v2 = {
        let mut ts = base_tables();
        ts[2] = t("tbl_b", "b", Some("p1"), b"table b, version 2\n");
        o.write(&ts, &base_domains(), "v2.json")
    };
    std::fs::remove_file(dir.join("data/p1/b.parquet")).unwrap();
    std::fs::create_dir(dir.join("data/p1/b.parquet")).unwrap();
    let before = snapshot(&dir);
    let err = pull(&v2, &dir, &["--json"]).json_error(1);
    assert!(err.contains("data/p1/b.parquet"), "{err}");
    assert_same(&visible(&before), &visible(&snapshot(&dir)), "refused pull");
    // Nothing is left half-done for recovery to trip on.
    stack(&["journal", "replay", "--dir", dir.to_str().unwrap()]).ok();
    std::fs::remove_dir(dir.join("data/p1/b.parquet")).unwrap();
    pull(&v2, &dir, &[]).ok();
    assert_verify_clean(&dir);
}

/// A state file adopted when the journal is missing used to steer removals
/// outside the directory. Now a state naming unsafe paths is not adopted.
#[test]
fn an_adopted_state_cannot_point_outside_the_directory() {
    let (o, l) = pulled("symlink");
    let dir = l.dir();
    let victim = l.tmp.path().join("victim.parquet");
    std::fs::write(&victim, b"not yours").unwrap();
    std::fs::remove_dir_all(dir.join(".stack")).unwrap();
    let mut st = state(&dir);
    st["direct_tables"]["tbl_a"]["name"] = json!("../../victim");
    st["direct_tables"]["tbl_a"]["ref_path"] = json!("data/_direct/../../victim.parquet");
    std::fs::write(
        dir.join("sync_state.json"),
        serde_json::to_vec(&st).unwrap(),
    )
    .unwrap();
    pull(&o.write(&[], &[], "empty.json"), &dir, &[]).ok();
    assert_eq!(std::fs::read(&victim).unwrap(), b"not yours");
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

/// With an explicit `--link reflink` on a filesystem that cannot clone, the second
/// pull used to probe (mkdir, create, unlink in .stack/tmp) and warn every time.
#[test]
fn a_repeated_pull_with_a_refused_link_mode_writes_nothing() {
    let (o, l) = pulled("reflink");
    let dir = l.dir();
    let before = snapshot(&dir);
    let run = pull(&o.manifest(), &dir, &["--link", "reflink"]);
    run.ok();
    assert!(!run.stderr.contains("copying instead"), "{}", run.stderr);
    let after = snapshot(&dir);
    let lock = Path::new(".stack/lock");
    let strip = |s: &Snapshot| {
        s.iter()
            .filter(|(p, _)| p.as_path() != lock)
            .map(|(p, n)| (p.clone(), n.clone()))
            .collect::<Snapshot>()
    };
    assert_same(&strip(&before), &strip(&after), "repeated pull");
}

/// An empty STACK_DIR means unset: the current directory.
#[test]
fn an_empty_stack_dir_means_the_current_directory() {
    let (_o, l) = pulled("symlink");
    let mut c = bin();
    c.args(["verify"]).env("STACK_DIR", "").current_dir(l.dir());
    output(c).ok();
}

/// The fast path trusts a state file naming the journal's length. If the journal's
/// end is torn at that same length (a power loss during the last fdatasync), the
/// next pull with work to do recovers from the journal itself instead of trusting
/// it: the torn `Committed` is cut, its transaction rolled forward, and the pull
/// goes on.
#[test]
fn a_torn_end_under_a_trusted_state_is_recovered_not_appended_to() {
    let (o, l) = pulled("symlink");
    let dir = l.dir();
    let jpath = dir.join(".stack/journal");
    let mut bytes = std::fs::read(&jpath).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 6..] {
        *b = 0;
    }
    std::fs::write(&jpath, &bytes).unwrap();
    let v2 = {
        let mut ts = base_tables();
        ts[2] = t("tbl_b", "b", Some("p1"), b"table b, version 2\n");
        o.write(&ts, &base_domains(), "v2.json")
    };
    let r = pull(&v2, &dir, &["--json"]);
    r.ok();
    assert!(dir.join(".stack/journal.broken").exists());
    assert_verify_clean(&dir);
    let d = dir.to_str().unwrap();
    stack(&["journal", "verify", "--dir", d]).ok();
}

/// A file where stack needs a folder (a package's folder) is refused before the
/// commit point too, naming it, and nothing changes.
#[test]
fn a_file_where_a_package_folder_goes_is_refused_before_the_commit_point() {
    let (o, l) = pulled("symlink");
    let dir = l.dir();
    std::fs::write(dir.join("data/p3"), b"mine").unwrap();
    let mut ts = base_tables();
    ts.push(t("tbl_d", "d", Some("p3"), b"table d\n"));
    let v2 = o.write(&ts, &base_domains(), "v2.json");
    let before = snapshot(&dir);
    let err = pull(&v2, &dir, &["--json"]).json_error(1);
    assert!(err.contains("data/p3"), "{err}");
    assert_same(&visible(&before), &visible(&snapshot(&dir)), "refused pull");
    std::fs::remove_file(dir.join("data/p3")).unwrap();
    pull(&v2, &dir, &[]).ok();
    assert_verify_clean(&dir);
}

/// A folder where stack puts a file (a new reference, a new shared file) is
/// refused before the commit point too, naming it, and nothing changes.
#[test]
fn a_folder_where_a_file_goes_is_refused_before_the_commit_point() {
    for in_the_way in ["data/p1/d.parquet", "data/_shared/tbl_d.parquet"] {
        let (o, l) = pulled("symlink");
        let dir = l.dir();
        std::fs::create_dir(dir.join(in_the_way)).unwrap();
        let mut ts = base_tables();
        ts.push(t("tbl_d", "d", Some("p1"), b"table d\n"));
        let v2 = o.write(&ts, &base_domains(), "v2.json");
        let before = snapshot(&dir);
        let err = pull(&v2, &dir, &["--json"]).json_error(1);
        assert!(err.contains(in_the_way), "{in_the_way}: {err}");
        assert_same(&visible(&before), &visible(&snapshot(&dir)), "refused pull");
        std::fs::remove_dir(dir.join(in_the_way)).unwrap();
        pull(&v2, &dir, &[]).ok();
        assert_verify_clean(&dir);
    }
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
