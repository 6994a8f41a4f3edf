//! Contract §5 shapes: one JSON error object for every failure with `--json`;
//! `--dir` from `$STACK_DIR`, else the current directory.

use serde_json::json;

use crate::support::*;

#[test]
fn every_failure_with_json_is_one_error_object() {
    let (o, l) = pulled("auto");
    let d = l.dir();
    let d = d.to_str().unwrap();
    let m = o.manifest();
    let m = m.to_str().unwrap();
    // Usage errors from the argument parser.
    for (args, kind) in [
        (
            vec![
                "pull",
                "--manifest",
                m,
                "--dir",
                d,
                "--link",
                "teleport",
                "--json",
            ],
            "usage",
        ),
        (vec!["pull", "--dir", d, "--json"], "usage"),
        (
            vec!["status", "--manifest", m, "--dir", d, "--json", "--bogus"],
            "usage",
        ),
        (
            vec![
                "pull",
                "--manifest",
                m,
                "--dir",
                d,
                "--jobs",
                "many",
                "--json",
            ],
            "usage",
        ),
    ] {
        let r = stack(&args);
        r.json_error(2);
        assert_eq!(r.json()["error"]["kind"], json!(kind), "{args:?}");
    }
    // A bad manifest, a missing one.
    let bad = o.write_manifest(&json!({"direct_tables": [{"id": "../x"}]}), "bad.json");
    pull(&bad, &l.dir(), &["--json"]).json_error(2);
    let r = stack(&[
        "status",
        "--manifest",
        "/nonexistent/m.json",
        "--dir",
        d,
        "--json",
    ]);
    // An unreadable manifest file is an I/O failure, not bad usage.
    r.json_error(1);
    assert_eq!(r.json()["error"]["kind"], json!("io"));
    // A fetch failure.
    let mut ts = base_tables();
    ts.push(t("tbl_gone", "gone", None, b"gone"));
    let m2 = o.write(&ts, &base_domains(), "v2.json");
    std::fs::remove_file(o.root().join(&table_url(&ts[5])[1..])).unwrap();
    let r = pull(&m2, &l.dir(), &["--json"]);
    r.json_error(1);
    // verify with violations is a report (ok: false, violations), not an error.
    std::fs::write(l.dir().join("data/p1/stray.parquet"), b"x").unwrap();
    let r = verify(&l.dir(), false);
    assert_eq!(r.code, 4);
    let v = r.json();
    assert_eq!(v["ok"], json!(false));
    assert_eq!(v["violations"].as_array().unwrap().len(), 1);
    // Human output never prints JSON.
    let r = pull(&m2, &l.dir(), &[]);
    assert_eq!(r.code, 1);
    assert!(r.stdout.trim().is_empty(), "{r:?}");
    assert!(r.stderr.contains("tbl_gone"), "{r:?}");
}

#[test]
fn dir_defaults_to_stack_dir_then_cwd() {
    let o = base_origin();
    let l = Local::new();
    let dir = l.dir();
    // $STACK_DIR (run from another cwd).
    let mut c = bin();
    c.env("STACK_DIR", &dir)
        .current_dir(o.root())
        .args(["pull", "--json", "--manifest"])
        .arg(o.manifest());
    output(c).ok();
    assert!(dir.join("sync_state.json").exists());
    assert!(!o.root().join("sync_state.json").exists());
    assert!(!o.root().join(".stack").exists());
    let mut c = bin();
    c.env("STACK_DIR", &dir)
        .current_dir(o.root())
        .args(["verify", "--contents", "--json"]);
    output(c).ok();

    // --dir wins over $STACK_DIR.
    let other = l.tmp.path().join("other");
    let mut c = bin();
    c.env("STACK_DIR", &dir)
        .args(["pull", "--json", "--manifest"])
        .arg(o.manifest())
        .arg("--dir")
        .arg(&other);
    output(c).ok();
    assert!(other.join("sync_state.json").exists());

    // Without either, the current directory (a relative manifest path works too).
    let cwd = l.tmp.path().join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::copy(o.manifest(), cwd.join("m.json")).unwrap();
    let api = o.root().join("api");
    std::os::unix::fs::symlink(&api, cwd.join("api")).unwrap();
    let mut c = bin();
    c.current_dir(&cwd)
        .args(["pull", "--json", "--manifest", "m.json"]);
    let r = output(c);
    r.ok();
    assert_eq!(counts(&r.json(), "data_packages"), [4, 0, 0, 0, 0]);
    assert!(cwd.join("sync_state.json").exists());
    for args in [
        vec!["verify", "--contents"],
        vec!["status", "--manifest", "m.json", "--json"],
        vec!["journal", "verify"],
        vec!["journal", "show"],
        vec!["gc"],
    ] {
        let mut c = bin();
        c.current_dir(&cwd).args(&args);
        let r = output(c);
        assert_eq!(r.code, 0, "{args:?}: {r:?}");
    }
}

/// An empty STACK_DIR means unset: the current directory.
#[test]
fn an_empty_stack_dir_means_the_current_directory() {
    let (_o, l) = pulled("symlink");
    let mut c = bin();
    c.args(["verify"]).env("STACK_DIR", "").current_dir(l.dir());
    output(c).ok();
}
