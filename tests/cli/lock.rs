//! The directory lock: a second mutating command exits 3 at once naming
//! the holder, or waits with `--wait`; read-only commands never block.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use fs2::FileExt;

use crate::support::*;

/// Hold `<dir>/.stack/lock` with flock(2) from this process (a separate open file
/// description, so it conflicts with the binary's fs2 lock exactly like another
/// process would) and write "pid\ncommand" into it as a holder does.
fn hold(dir: &Path) -> File {
    let path = dir.join(".stack/lock");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .unwrap();
    f.try_lock_exclusive().expect("the lock is free");
    std::fs::write(
        &path,
        format!(
            "{}\nstack pull --manifest held-by-test\n",
            std::process::id()
        ),
    )
    .unwrap();
    f
}

fn wait_for(mut child: Child, limit: Duration) -> Run {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stdout = String::new();
            let mut stderr = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut stdout)
                .unwrap();
            if let Some(mut e) = child.stderr.take() {
                e.read_to_string(&mut stderr).unwrap();
            }
            return Run {
                code: status.code().unwrap_or(-1),
                stdout,
                stderr,
            };
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the command did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_second_mutating_command_fails_at_once_naming_the_holder() {
    let (o, l) = pulled("auto");
    let dir = l.dir();
    let lock = hold(&dir);
    let before = snapshot(&dir);
    let pid = std::process::id().to_string();

    let started = Instant::now();
    let r = pull(&o.manifest(), &dir, &["--json"]);
    let msg = r.json_error(3);
    assert!(started.elapsed() < Duration::from_secs(5), "not at once");
    assert!(msg.contains("locked by"), "{msg}");
    assert!(msg.contains(&format!("pid {pid}")), "{msg}");
    assert!(msg.contains("held-by-test"), "{msg}");

    for args in [
        vec!["gc"],
        vec!["journal", "replay"],
        vec!["journal", "compact"],
    ] {
        let mut c = bin();
        c.args(&args).arg("--dir").arg(&dir);
        let r = output(c);
        assert_eq!(r.code, 3, "{args:?}: {r:?}");
        assert!(
            r.stderr.contains("locked by") && r.stderr.contains(&pid),
            "{r:?}"
        );
    }

    // Read-only commands succeed while the lock is held.
    let m = o.manifest();
    let m = m.to_str().unwrap();
    let d = dir.to_str().unwrap();
    for args in [
        vec!["status", "--manifest", m, "--dir", d, "--json"],
        vec!["pull", "--dry-run", "--manifest", m, "--dir", d, "--json"],
        vec!["verify", "--dir", d, "--json"],
        vec!["verify", "--contents", "--dir", d],
        vec!["journal", "show", "--dir", d, "--json"],
        vec!["journal", "show", "--dir", d],
        vec!["journal", "verify", "--dir", d],
    ] {
        let r = stack(&args);
        assert_eq!(r.code, 0, "{args:?}: {r:?}");
    }
    assert_same(&before, &snapshot(&dir), "while locked");
    drop(lock);
    pull(&o.manifest(), &dir, &["--json"]).ok();
}

#[test]
fn wait_proceeds_when_the_holder_lets_go() {
    let (o, l) = pulled("auto");
    let dir = l.dir();
    let mut ts = base_tables();
    ts.push(t("tbl_new", "new", Some("p3"), b"new table\n"));
    let m2 = o.write(&ts, &base_domains(), "v2.json");
    let lock = hold(&dir);

    let mut c = bin();
    c.arg("pull")
        .arg("--manifest")
        .arg(&m2)
        .arg("--dir")
        .arg(&dir)
        .arg("--wait")
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("waiting"), "{line:?}");
    assert!(line.contains(&std::process::id().to_string()), "{line:?}");
    // Still waiting a moment later.
    std::thread::sleep(Duration::from_millis(200));
    assert!(child.try_wait().unwrap().is_none(), "did not wait");
    drop(lock);
    let r = wait_for(child, Duration::from_secs(30));
    r.ok();
    assert_eq!(counts(&r.json(), "data_packages"), [1, 0, 0, 4, 0]);
    assert_verify_clean(&dir);
    // The lock file now names the process that held it last.
    let text = std::fs::read_to_string(dir.join(".stack/lock")).unwrap();
    assert!(text.contains("--wait"), "{text:?}");
}

/// The same with a real second process holding the lock: util-linux `flock(1)`
/// (flock(2), the lock type fs2 uses). Needs `flock` (`.ci/run` installs it): fails,
/// saying so, where it is missing, rather than passing without testing.
#[test]
fn a_lock_held_by_another_process() {
    let (o, l) = pulled("auto");
    let dir = l.dir();
    let lockfile = dir.join(".stack/lock");
    let holder = std::process::Command::new("flock")
        .arg(&lockfile)
        .arg("-c")
        .arg("echo ready; read x")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn();
    let mut holder = holder.unwrap_or_else(|e| {
        panic!("this test needs flock(1) from util-linux (`.ci/run` installs it): {e}")
    });
    let mut out = BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    std::fs::write(&lockfile, format!("{}\nflock holder\n", holder.id())).unwrap();

    let r = pull(&o.manifest(), &dir, &[]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr.contains(&format!("locked by pid {}", holder.id())),
        "{r:?}"
    );

    let mut stdin = holder.stdin.take().unwrap();
    stdin.write_all(b"done\n").unwrap();
    drop(stdin);
    holder.wait().unwrap();
    pull(&o.manifest(), &dir, &["--json"]).ok();
}
