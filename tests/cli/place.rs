//! Folders built out of sight and placed whole (`reconcile::place`): a first pull
//! places `data/_shared` and every reference folder; a folder the user deleted,
//! which the state still lists, is rebuilt step by step, so that the removals of
//! its old references cannot take the new files of names the new manifest reuses.

use crate::support::*;

#[test]
fn a_first_pull_places_its_folders_and_leaves_no_staging() {
    let (_o, l) = pulled("symlink");
    let dir = l.dir();
    let shown = stack(&["journal", "show", "--json", "--dir", dir.to_str().unwrap()]);
    shown.ok();
    assert!(shown.stdout.contains("\"place\""), "{}", shown.stdout);
    let left: Vec<_> = std::fs::read_dir(dir.join(".stack/staging"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "staging keeps {left:?}");
    assert_verify_clean(&dir);
}

/// A package folder deleted by the user, then a manifest that swaps two names in it.
#[test]
fn a_deleted_folder_whose_names_are_reused_is_rebuilt_whole() {
    let (o, l) = pulled("symlink");
    let dir = l.dir();
    std::fs::remove_dir_all(dir.join("data/p1")).unwrap();
    // The base stack with p1's two names swapped (alpha <-> b).
    let ts: Vec<T> = base_tables()
        .into_iter()
        .map(|mut t| {
            if t.package == Some("p1") {
                t.name = if t.name == "alpha" { "b" } else { "alpha" };
            }
            t
        })
        .collect();
    let v2 = o.write(&ts, &base_domains(), "v2.json");
    pull(&v2, &dir, &["--link", "symlink", "--json"]).ok();
    assert_verify_clean(&dir);
}

/// The same for the folder of direct tables.
#[test]
fn a_deleted_direct_folder_whose_name_is_reused_is_rebuilt_whole() {
    let o = Origin::new(
        &[t("t1", "x", None, b"one\n"), t("t2", "y", None, b"two\n")],
        &[],
    );
    let l = Local::new();
    let dir = l.dir();
    pull(&o.manifest(), &dir, &["--link", "symlink", "--json"]).ok();
    std::fs::remove_dir_all(dir.join("data/_direct")).unwrap();
    let v2 = o.write(&[t("t1", "y", None, b"one\n")], &[], "v2.json");
    pull(&v2, &dir, &["--link", "symlink", "--json"]).ok();
    assert_verify_clean(&dir);
}
