//! Issue 15: a user's bytes are never destroyed, and a read-only disk is a clean
//! refusal that `status` and `verify` still read.

use std::path::Path;

use crate::support::*;

/// A file the user saved where the new manifest puts a reference, and one beside
/// it: the pull keeps both (the first moved to `.stack/quarantine/`, named on
/// stderr), and says on stderr that files it did not write sit in its folders.
#[test]
fn a_pull_never_overwrites_or_deletes_a_file_stack_did_not_write() {
    for link in ["symlink", "hardlink", "copy"] {
        let (_o, l) = pulled(link);
        let dir = l.dir();
        std::fs::write(dir.join("data/p1/d.parquet"), b"the user's own d").unwrap();
        std::fs::write(dir.join("data/p2/notes.txt"), b"the user's notes").unwrap();
        let mut tables = base_tables();
        tables.push(t("tbl_d", "d", Some("p1"), b"table d from the server\n"));
        // p2 leaves the stack: its folder holds the user's notes.
        tables.retain(|t| t.package != Some("p2"));
        let o2 = Origin::new(&tables, &base_domains());
        let r = pull(&o2.manifest(), &dir, &["--link", link]);
        r.ok();
        assert_eq!(
            std::fs::read(dir.join("data/p1/d.parquet")).unwrap(),
            b"table d from the server\n",
            "{link}"
        );
        let kept: Vec<_> = walk(&dir.join(".stack/quarantine"))
            .into_iter()
            .filter(|p| p.ends_with("data/p1/d.parquet"))
            .collect();
        assert_eq!(kept.len(), 1, "{link}: the user's d.parquet is kept: {r:?}");
        assert_eq!(std::fs::read(&kept[0]).unwrap(), b"the user's own d");
        assert!(r.stderr.contains("data/p1/d.parquet"), "{link}: {r:?}");
        assert_eq!(
            std::fs::read(dir.join("data/p2/notes.txt")).unwrap(),
            b"the user's notes"
        );
        assert!(r.stderr.contains("data/p2/notes.txt"), "{link}: {r:?}");
    }
}

fn walk(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(root) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A read-only disk (a read-only bind mount; needs root, skipped otherwise): a
/// pull is refused with exit 1 and changes nothing; `status` and `verify` work.
#[test]
fn a_read_only_disk_is_a_clean_refusal_and_status_and_verify_work() {
    let (_o, l) = pulled("symlink");
    let dir = l.dir();
    let ro = l.tmp.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["--bind", "-o", "ro"])
        .arg(&dir)
        .arg(&ro)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot bind-mount read-only (needs root and mount(8))");
        return;
    }
    // Older util-linux ignore `ro` on the first bind: remount to be sure.
    let _ = std::process::Command::new("mount")
        .args(["-o", "remount,bind,ro"])
        .arg(&ro)
        .status();
    let _unmount = Unmount(ro.clone());
    if std::fs::write(ro.join("probe"), b"x").is_ok() {
        eprintln!("skipped: the bind mount is not read-only");
        return;
    }
    let before = snapshot(&dir);
    let mut tables = base_tables();
    tables.push(t("tbl_d", "d", Some("p3"), b"table d\n"));
    let o2 = Origin::new(&tables, &base_domains());
    let r = pull(&o2.manifest(), &ro, &["--json"]);
    let msg = r.json_error(1);
    assert!(msg.to_lowercase().contains("read-only"), "{msg}");
    assert_same(
        &before,
        &snapshot(&dir),
        "a refused pull on a read-only disk",
    );
    let s = stack(&[
        "status",
        "--manifest",
        o2.manifest().to_str().unwrap(),
        "--dir",
        ro.to_str().unwrap(),
        "--json",
    ]);
    s.ok();
    assert_verify_clean(&ro);
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// The user's bytes kept in `.stack/quarantine/<txn>/<rel>` by the pull `r`.
#[track_caller]
fn quarantined_bytes(dir: &Path, rel: &str) -> Vec<Vec<u8>> {
    walk(&dir.join(".stack/quarantine"))
        .into_iter()
        .filter(|p| p.ends_with(rel))
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

/// A memory domain leaves the stack while its folder holds a file the user
/// saved there: `verify` names that file before the pull; the pull removes the
/// bundle and moves the user's file to `.stack/quarantine/`, said on stderr,
/// never deleted; the directory then verifies clean.
#[test]
fn a_domain_leaving_the_stack_keeps_the_users_files_in_its_folder() {
    let (_o, l) = pulled("symlink");
    let dir = l.dir();
    std::fs::write(dir.join("memory/finance/notes.md"), b"my precious notes").unwrap();
    let r = verify(&dir, false);
    assert_eq!(r.code, 4, "verify names the user's file: {r:?}");
    assert!(r.stdout.contains("memory/finance/notes.md"), "{r:?}");
    let o2 = Origin::new(&base_tables(), &[]);
    let r = pull(&o2.manifest(), &dir, &[]);
    r.ok();
    assert_eq!(
        quarantined_bytes(&dir, "memory/finance/notes.md"),
        vec![b"my precious notes".to_vec()],
        "the user's notes are kept: {r:?}"
    );
    assert!(r.stderr.contains("memory/finance/notes.md"), "{r:?}");
    assert!(!dir.join("memory/finance/bundle.md").exists());
    assert_verify_clean(&dir);
}

/// A domain's folder the user replaced by a symlink to a folder elsewhere: when
/// the domain leaves, the pull moves the link (not stack's: stack never makes a
/// folder link) to the quarantine, and never lists, moves or deletes anything
/// in the folder it points to, outside the directory.
#[test]
fn a_leaving_domains_folder_that_is_a_link_is_moved_whole_never_followed() {
    let (_o, l) = pulled("symlink");
    let dir = l.dir();
    let outside = tempfile::tempdir().unwrap();
    let theirs = outside.path().join("notes");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("bundle.md"), b"their bundle").unwrap();
    std::fs::write(theirs.join("notes.md"), b"their notes").unwrap();
    let folder = dir.join("memory/finance");
    std::fs::remove_dir_all(&folder).unwrap();
    std::os::unix::fs::symlink(&theirs, &folder).unwrap();
    let o2 = Origin::new(&base_tables(), &[]);
    let r = pull(&o2.manifest(), &dir, &[]);
    r.ok();
    assert_eq!(
        std::fs::read(theirs.join("notes.md")).unwrap(),
        b"their notes",
        "{r:?}"
    );
    assert_eq!(
        std::fs::read(theirs.join("bundle.md")).unwrap(),
        b"their bundle",
        "{r:?}"
    );
    let kept = dir.join(".stack/quarantine/2/memory/finance");
    assert_eq!(std::fs::read_link(&kept).unwrap(), theirs, "{r:?}");
    assert!(r.stderr.contains("memory/finance"), "{r:?}");
    assert!(std::fs::symlink_metadata(&folder).is_err(), "{r:?}");
    assert_verify_clean(&dir);
}

/// A leaving package's folder the user replaced by a symlink to a folder
/// elsewhere: the pull moves the link whole to the quarantine and never
/// reaches through it (its files outside the directory stay as they are).
#[test]
fn a_leaving_packages_folder_that_is_a_link_is_moved_whole_never_followed() {
    let (_o, l) = pulled("copy");
    let dir = l.dir();
    let outside = tempfile::tempdir().unwrap();
    let theirs = outside.path().join("p2");
    std::fs::create_dir(&theirs).unwrap();
    for name in ["a.parquet", "c.parquet", "mine.txt"] {
        std::fs::write(theirs.join(name), name.as_bytes()).unwrap();
    }
    let folder = dir.join("data/p2");
    std::fs::remove_dir_all(&folder).unwrap();
    std::os::unix::fs::symlink(&theirs, &folder).unwrap();
    let without_p2: Vec<T> = base_tables()
        .into_iter()
        .filter(|t| t.package != Some("p2"))
        .collect();
    let o2 = Origin::new(&without_p2, &base_domains());
    let r = pull(&o2.manifest(), &dir, &[]);
    r.ok();
    for name in ["a.parquet", "c.parquet", "mine.txt"] {
        assert_eq!(
            std::fs::read(theirs.join(name)).unwrap(),
            name.as_bytes(),
            "{name}: {r:?}"
        );
    }
    let kept = dir.join(".stack/quarantine/2/data/p2");
    assert_eq!(std::fs::read_link(&kept).unwrap(), theirs, "{r:?}");
    assert!(r.stderr.contains("data/p2"), "{r:?}");
    assert_verify_clean(&dir);
}

/// `gc` moves a user's file out of a domain's folder (the domain stays).
#[test]
fn gc_moves_a_users_file_out_of_a_domains_folder() {
    let (_o, l) = pulled("copy");
    let dir = l.dir();
    std::fs::write(dir.join("memory/finance/notes.md"), b"my notes").unwrap();
    let r = stack(&["gc", "--dir", dir.to_str().unwrap()]);
    r.ok();
    assert_eq!(
        std::fs::read(dir.join(".stack/quarantine/2/memory/finance/notes.md")).unwrap(),
        b"my notes",
        "{r:?}"
    );
    assert!(dir.join("memory/finance/bundle.md").exists());
    assert_verify_clean(&dir);
}

/// A file stack tracks replaced or edited by the user (a reference, for each
/// link mode; a shared file; a bundle): the pull heals it — the manifest's
/// file is back — and the bytes the user put there go to
/// `.stack/quarantine/<txn>/<rel>`, named on stderr, never deleted.
#[test]
fn heal_keeps_the_users_bytes_it_replaces() {
    for link in ["symlink", "hardlink", "copy"] {
        let (o, l) = pulled(link);
        let dir = l.dir();
        let alpha = dir.join("data/p1/alpha.parquet");
        std::fs::remove_file(&alpha).unwrap();
        std::fs::write(&alpha, b"my own table").unwrap();
        let r = pull(&o.manifest(), &dir, &["--link", link]);
        r.ok();
        assert_eq!(std::fs::read(&alpha).unwrap(), b"table a, version 1\n");
        assert_eq!(
            quarantined_bytes(&dir, "data/p1/alpha.parquet"),
            vec![b"my own table".to_vec()],
            "{link}: {r:?}"
        );
        assert!(r.stderr.contains("data/p1/alpha.parquet"), "{link}: {r:?}");
        assert_verify_clean(&dir);
    }
    let (o, l) = pulled("symlink");
    let dir = l.dir();
    force_write(&dir.join("data/_shared/tbl_c.parquet"), b"my edit of c");
    std::fs::write(
        dir.join("memory/finance/bundle.md"),
        b"my edit of the bundle",
    )
    .unwrap();
    let r = pull(&o.manifest(), &dir, &[]);
    r.ok();
    assert_eq!(
        std::fs::read(dir.join("data/_shared/tbl_c.parquet")).unwrap(),
        b"table c\n"
    );
    assert_eq!(
        quarantined_bytes(&dir, "data/_shared/tbl_c.parquet"),
        vec![b"my edit of c".to_vec()],
        "{r:?}"
    );
    assert_eq!(
        quarantined_bytes(&dir, "memory/finance/bundle.md"),
        vec![b"my edit of the bundle".to_vec()],
        "{r:?}"
    );
    assert!(r.stderr.contains("data/_shared/tbl_c.parquet"), "{r:?}");
    assert!(r.stderr.contains("memory/finance/bundle.md"), "{r:?}");
    assert_verify_clean(&dir);
}

/// A reference the user replaced with a file of their own, whose table then
/// leaves the stack: the removal takes stack's file, not the user's — their
/// bytes go to the quarantine, named on stderr.
#[test]
fn a_removal_keeps_the_users_bytes_at_a_tracked_name() {
    let (_o, l) = pulled("copy");
    let dir = l.dir();
    let b = dir.join("data/p1/b.parquet");
    std::fs::write(&b, b"my own b").unwrap();
    let mut tables = base_tables();
    tables.retain(|t| t.id != "tbl_b");
    let o2 = Origin::new(&tables, &base_domains());
    let r = pull(&o2.manifest(), &dir, &[]);
    r.ok();
    assert!(!b.exists());
    assert_eq!(
        quarantined_bytes(&dir, "data/p1/b.parquet"),
        vec![b"my own b".to_vec()],
        "{r:?}"
    );
    assert!(r.stderr.contains("data/p1/b.parquet"), "{r:?}");
    assert_verify_clean(&dir);
}

/// A file whose name is not UTF-8 in the folder of a domain leaving the stack
/// cannot be named to move it: the pull fails (exit 1) and rolls back rather
/// than trash the folder with it; the file and the domain stay.
#[test]
fn a_domain_folder_holding_a_file_stack_cannot_name_is_not_removed() {
    use std::os::unix::ffi::OsStrExt;
    let (_o, l) = pulled("symlink");
    let dir = l.dir();
    let odd = dir
        .join("memory/finance")
        .join(std::ffi::OsStr::from_bytes(b"notes-\xff.md"));
    std::fs::write(&odd, b"my precious notes").unwrap();
    let o2 = Origin::new(&base_tables(), &[]);
    let r = pull(&o2.manifest(), &dir, &[]);
    r.code(1);
    assert_eq!(std::fs::read(&odd).unwrap(), b"my precious notes", "{r:?}");
    assert!(dir.join("memory/finance/bundle.md").exists(), "{r:?}");
}
