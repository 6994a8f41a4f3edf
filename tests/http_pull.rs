//! End-to-end pulls from an HTTP origin started by the test on 127.0.0.1: the real
//! binary, a manifest served over HTTP, parallel jobs, the bearer token, refused
//! `file://` URLs, wrong bytes, and lock contention over a slow server.

#![allow(clippy::disallowed_methods)] // test fixtures write the real disk directly

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use md5::{Digest, Md5};
use serde_json::{json, Value};
use support::{Mode, Server};

const BIN: &str = env!("CARGO_BIN_EXE_stack");

fn md5_hex(b: &[u8]) -> String {
    Md5::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

fn body(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| ((i * 31 + j * 7) % 251) as u8).collect()
}

/// Serve `n` tables in two packages (sharing the even ones) and a bundle, each
/// table body in `mode`; return the manifest URL.
fn serve_stack(server: &Server, n: usize, len: usize, mode: Mode) -> String {
    let mut p0 = Vec::new();
    let mut p1 = Vec::new();
    for i in 0..n {
        let b = body(i, len);
        let path = format!("/api/data/tbl_{i}/download");
        server.route(&path, &b, mode.clone());
        let t = json!({"id": format!("tbl_{i}"), "name": format!("t{i}"), "md5": md5_hex(&b),
                       "parquet_url": path, "size": len});
        p0.push(t.clone());
        if i % 2 == 0 {
            p1.push(t);
        }
    }
    let bundle = b"# finance\nnotes\n";
    server.route("/api/memory/finance/bundle.md", bundle, Mode::Normal);
    let manifest = json!({
        "data_packages": [{"id": "a", "slug": "pa", "name": "A", "tables": p0},
                          {"id": "b", "slug": "pb", "name": "B", "tables": p1}],
        "memory_domains": [{"slug": "finance", "md5": md5_hex(bundle)}],
    });
    server.route(
        "/manifest.json",
        manifest.to_string().as_bytes(),
        Mode::Normal,
    );
    server.url("/manifest.json")
}

fn stack(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).stdin(Stdio::null()).env_remove("STACK_TOKEN");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("run stack")
}

fn verify_clean(dir: &Path) {
    let out = stack(
        &["verify", "--contents", "--dir", dir.to_str().unwrap()],
        &[],
    );
    assert!(
        out.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn full_pull_over_http_with_parallel_jobs() {
    let s = Server::start();
    let url = serve_stack(&s, 12, 50_000, Mode::Normal);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let out = stack(
        &[
            "pull",
            "--manifest",
            &url,
            "--dir",
            dir.to_str().unwrap(),
            "--jobs",
            "4",
            "--json",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["data_packages"]["added"], 18);
    assert_eq!(rep["memory_domains"]["added"], 1);
    assert_eq!(rep["bytes_fetched"], 12 * 50_000 + 16);
    verify_clean(&dir);
    // Each table was downloaded once, although two packages reference half of them.
    assert_eq!(s.requests_to("/api/data/tbl_0/download").len(), 1);
}

#[test]
fn token_is_sent_to_the_origin_and_never_shown_or_stored() {
    let s = Server::start();
    let url = serve_stack(&s, 3, 1000, Mode::Normal);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let token = "s3cr3t-TOKEN-value";
    let out = stack(
        &[
            "pull",
            "--manifest",
            &url,
            "--dir",
            dir.to_str().unwrap(),
            "-v",
        ],
        &[("STACK_TOKEN", token)],
    );
    assert!(out.status.success());
    for r in s.requests() {
        assert_eq!(
            r.header("authorization"),
            Some(&*format!("Bearer {token}")),
            "{}",
            r.path
        );
    }
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!printed.contains(token));
    for entry in walk(&dir) {
        if entry.is_file() {
            let bytes = std::fs::read(&entry).unwrap();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(token),
                "token in {}",
                entry.display()
            );
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn http_manifest_may_not_read_local_files() {
    let s = Server::start();
    let manifest = json!({"direct_tables": [{"id": "t", "name": "t", "md5": "0".repeat(32),
                                             "parquet_url": "file:///etc/passwd"}]});
    s.route("/m.json", manifest.to_string().as_bytes(), Mode::Normal);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let out = stack(
        &[
            "pull",
            "--manifest",
            &s.url("/m.json"),
            "--dir",
            dir.to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["error"]["kind"], "bad_manifest");
    assert!(rep["error"]["message"]
        .as_str()
        .unwrap()
        .contains("file:///etc/passwd"));
    assert!(!dir.exists(), "nothing may be touched");
}

#[test]
fn wrong_bytes_fail_the_pull_and_keep_the_previous_stack() {
    let s = Server::start();
    let url = serve_stack(&s, 4, 2000, Mode::Normal);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let d = dir.to_str().unwrap();
    assert!(stack(&["pull", "--manifest", &url, "--dir", d], &[])
        .status
        .success());
    let before = std::fs::read(dir.join("sync_state.json")).unwrap();
    // The server now announces a new version of tbl_1 but serves the old bytes.
    let mut manifest: Value = serde_json::from_slice(&fetch_manifest(&s)).unwrap();
    manifest["data_packages"][0]["tables"][1]["md5"] = json!(md5_hex(b"the new version"));
    s.route(
        "/manifest.json",
        manifest.to_string().as_bytes(),
        Mode::Normal,
    );
    let out = stack(&["pull", "--manifest", &url, "--dir", d, "--json"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["error"]["kind"], "checksum");
    assert_eq!(std::fs::read(dir.join("sync_state.json")).unwrap(), before);
    verify_clean(&dir);
}

fn fetch_manifest(s: &Server) -> Vec<u8> {
    stack::reconcile::http::fetch_manifest(&s.url("/manifest.json"), &Default::default()).unwrap()
}

#[test]
fn lock_contention_over_a_slow_server() {
    let s = Server::start();
    // ~2 s of transfer: 4 tables × 20 chunks × 25 ms, one job.
    let url = serve_stack(
        &s,
        4,
        20 * 512,
        Mode::Slow {
            chunk: 512,
            delay: Duration::from_millis(25),
        },
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let d = dir.to_str().unwrap().to_string();
    let mut first = Command::new(BIN)
        .args(["pull", "--manifest", &url, "--dir", &d, "--jobs", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the first pull holds the lock (its pid is in the lock file).
    let lock = dir.join(".stack").join("lock");
    let pid = first.id().to_string();
    for _ in 0..200 {
        if std::fs::read_to_string(&lock).is_ok_and(|t| t.starts_with(&pid)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let second = stack(&["pull", "--manifest", &url, "--dir", &d], &[]);
    assert_eq!(
        second.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let msg = String::from_utf8_lossy(&second.stderr);
    assert!(
        msg.contains("locked by") && msg.contains(&format!("pid {pid}")),
        "{msg}"
    );
    let third = stack(
        &["pull", "--manifest", &url, "--dir", &d, "--wait", "--json"],
        &[],
    );
    assert!(
        third.status.success(),
        "{}",
        String::from_utf8_lossy(&third.stderr)
    );
    assert!(String::from_utf8_lossy(&third.stderr).contains("waiting"));
    assert!(first.wait().unwrap().success());
    // The waiting pull ran after the first finished: nothing left to do.
    let rep: Value = serde_json::from_slice(&third.stdout).unwrap();
    assert_eq!(rep["data_packages"]["added"], 0);
    verify_clean(&dir);
}

#[test]
fn next_pull_resumes_a_partial_download_with_range() {
    let s = Server::start();
    let url = serve_stack(&s, 2, 40_000, Mode::Normal);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    // What a pull killed mid-download leaves: half of tbl_0 under its md5.
    let b = body(0, 40_000);
    let staging = dir.join(".stack").join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join(format!("{}.part", md5_hex(&b))), &b[..15_000]).unwrap();
    let out = stack(
        &[
            "pull",
            "--manifest",
            &url,
            "--dir",
            dir.to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reqs = s.requests_to("/api/data/tbl_0/download");
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].header("range"), Some("bytes=15000-"));
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["bytes_fetched"], 25_000 + 40_000 + 16);
    verify_clean(&dir);
}

/// Ctrl-C in the middle of a download stops at once with exit 130 and says what
/// happens next; the previous stack is intact, and the next pull resumes the partial
/// download with a Range request and finishes.
#[test]
fn ctrl_c_stops_cleanly_and_the_next_pull_resumes() {
    let s = Server::start();
    let url = serve_stack(
        &s,
        1,
        64 * 1024,
        Mode::Slow {
            chunk: 4096,
            delay: Duration::from_millis(40),
        },
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let d = dir.to_str().unwrap().to_string();
    let child = Command::new(BIN)
        .args(["pull", "--manifest", &url, "--dir", &d, "--jobs", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until part of the table has arrived, then interrupt.
    let staging = dir.join(".stack").join("staging");
    let part_len = || -> u64 {
        std::fs::read_dir(&staging)
            .map(|es| {
                es.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
                    .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0)
    };
    for _ in 0..500 {
        if part_len() >= 8192 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: sending SIGINT to our own child process.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted"));
    assert!(
        !dir.join("sync_state.json").exists(),
        "nothing was committed"
    );
    let had = part_len();
    assert!(had > 0, "the partial download is kept");
    s.route(
        "/api/data/tbl_0/download",
        &body(0, 64 * 1024),
        Mode::Normal,
    );
    let r = stack(&["pull", "--manifest", &url, "--dir", &d, "--json"], &[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let last = s.requests_to("/api/data/tbl_0/download").pop().unwrap();
    assert_eq!(last.header("range"), Some(&*format!("bytes={had}-")));
    verify_clean(&dir);
}
