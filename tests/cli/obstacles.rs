//! What stands in a pull's way: a folder where stack puts a file, a file where it
//! needs a folder, a state file naming paths outside the directory. Each is refused
//! before the commit point, named, with nothing changed; a pull succeeds once the
//! obstacle is moved away.

use serde_json::json;

use crate::support::*;

/// A folder where a reference goes is refused before the commit point (after it,
/// the pull and every later command would fail on it), named, with nothing
/// changed; the pull succeeds once the folder is moved away.
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

/// A state file adopted when the journal is missing steers removals: one naming
/// paths outside the directory is not adopted.
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
