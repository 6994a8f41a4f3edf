//! Link strategies (contract §2): what each records, relative symlinks, read-only
//! shared files, the reflink/hardlink fallback, and md5 changes reaching every
//! reference.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use serde_json::json;

use crate::support::*;

/// Can this filesystem clone files? (Probed the way a user would: `cp --reflink=always`.)
fn fs_can_reflink(dir: &Path) -> bool {
    let a = dir.join("reflink-probe");
    let b = dir.join("reflink-probe-clone");
    std::fs::write(&a, b"x").unwrap();
    let ok = std::process::Command::new("cp")
        .arg("--reflink=always")
        .arg(&a)
        .arg(&b)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    ok
}

fn check_layout(dir: &Path, expect: &str) {
    for p in std::fs::read_dir(dir.join("data/_shared")).unwrap() {
        let p = p.unwrap().path();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o444, "{} is not read-only", p.display());
    }
    let es = entries(dir);
    assert_eq!(es.len(), 5);
    for (_, id, e) in es {
        assert_eq!(e["strategy"], json!(expect), "{id}: {e}");
        let r = dir.join(e["ref_path"].as_str().unwrap());
        let s = dir.join(e["shared_path"].as_str().unwrap());
        let lmd = std::fs::symlink_metadata(&r).unwrap();
        match expect {
            "symlink" => {
                assert!(lmd.file_type().is_symlink());
                assert_eq!(
                    std::fs::read_link(&r).unwrap(),
                    Path::new(&format!("../_shared/{id}.parquet"))
                );
            }
            "hardlink" => {
                assert!(lmd.is_file());
                assert_eq!(lmd.ino(), std::fs::metadata(&s).unwrap().ino());
            }
            _ => {
                assert!(lmd.is_file());
                assert_ne!(lmd.ino(), std::fs::metadata(&s).unwrap().ino());
            }
        }
    }
}

#[test]
fn each_strategy_records_what_it_did() {
    let probe = tempfile::tempdir().unwrap();
    let reflink = fs_can_reflink(probe.path());
    for (link, expect) in [
        ("symlink", "symlink"),
        ("hardlink", "hardlink"),
        ("copy", "copy"),
        ("reflink", if reflink { "reflink" } else { "copy" }),
        ("auto", if reflink { "reflink" } else { "symlink" }),
    ] {
        let o = base_origin();
        let l = Local::new();
        let r = pull(&o.manifest(), &l.dir(), &["--link", link, "--json"]);
        r.ok();
        check_layout(&l.dir(), expect);
        if link == "reflink" && !reflink {
            let notes: Vec<&str> = r.stderr.lines().filter(|l| l.contains("reflink")).collect();
            assert_eq!(notes.len(), 1, "one fallback message on stderr: {r:?}");
            assert!(notes[0].contains("copy"), "{notes:?}");
        } else {
            assert!(!r.stderr.contains("fall"), "{link}: {r:?}");
        }
        assert_verify_clean(&l.dir());
    }
}

#[test]
fn an_md5_change_reaches_every_reference_under_every_strategy() {
    for link in ["symlink", "hardlink", "copy", "reflink", "auto"] {
        let (o, l) = pulled(link);
        let dir = l.dir();
        let mut ts = base_tables();
        for t in ts.iter_mut().filter(|t| t.id == "tbl_a") {
            t.bytes = b"table a, version 2 (longer)\n".to_vec();
        }
        let m2 = o.write(&ts, &base_domains(), "v2.json");
        let r = pull(&m2, &dir, &["--link", link, "--json"]);
        r.ok();
        let v = r.json();
        assert_eq!(counts(&v, "direct_tables"), [0, 1, 0, 0, 0], "{link}");
        assert_eq!(counts(&v, "data_packages"), [0, 2, 0, 2, 0], "{link}");
        for p in [
            "data/_direct/a.parquet",
            "data/p1/alpha.parquet",
            "data/p2/a.parquet",
        ] {
            assert_eq!(
                std::fs::read(dir.join(p)).unwrap(),
                b"table a, version 2 (longer)\n",
                "{link}: {p}"
            );
        }
        assert_verify_clean(&dir);
        // And back.
        pull(&o.manifest(), &dir, &["--link", link, "--json"]).ok();
        for p in [
            "data/_direct/a.parquet",
            "data/p1/alpha.parquet",
            "data/p2/a.parquet",
        ] {
            assert_eq!(std::fs::read(dir.join(p)).unwrap(), b"table a, version 1\n");
        }
        assert_verify_clean(&dir);
    }
}

#[test]
fn changing_strategy_remakes_references() {
    let (o, l) = pulled("symlink");
    let dir = l.dir();
    for link in ["copy", "hardlink", "symlink"] {
        pull(&o.manifest(), &dir, &["--link", link, "--json"]).ok();
        check_layout(&dir, link);
        assert_verify_clean(&dir);
    }
}

#[test]
fn the_directory_can_be_moved() {
    let (o, l) = pulled("symlink");
    let moved = l.tmp.path().join("moved");
    std::fs::rename(l.dir(), &moved).unwrap();
    assert_verify_clean(&moved);
    let r = pull(&o.manifest(), &moved, &["--link", "symlink", "--json"]);
    r.ok();
    assert_eq!(counts(&r.json(), "data_packages"), [0, 0, 0, 4, 0]);
}

/// With an explicit `--link reflink` on a filesystem that cannot clone, a repeated
/// pull neither probes again (mkdir, create, unlink in .stack/tmp) nor warns again:
/// it writes nothing.
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
