//! The HTTP origin against a real (tiny) HTTP server on 127.0.0.1: streaming with
//! md5, resume with Range, restarts, retries, error mapping, token scoping and URL
//! resolution.

// Test fixtures write the real disk directly; the seam rule is for the engine.
#![allow(clippy::disallowed_methods)]

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use stack::error::Error;
use stack::fs::RealFs;
use stack::reconcile::http::{fetch_manifest, HttpOptions, HttpOrigin};
use stack::reconcile::origin::{hex, Fetched, Item, Origin, Request};
use support::{Mode, Server};

const TOKEN: &str = "s3cr3t-T0KEN-never-print-me";
const PATH: &str = "/api/data/tbl_a/download";

fn body(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn md5_of(b: &[u8]) -> String {
    hex(&Md5::digest(b))
}

fn opts() -> HttpOptions {
    HttpOptions {
        retries: 3,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(2),
        ..HttpOptions::default()
    }
}

fn origin(server: &Server, o: HttpOptions) -> HttpOrigin {
    HttpOrigin::new(&server.url("/api/stack/manifest.json"), o).expect("origin")
}

fn table() -> Item {
    Item::Table { id: "tbl_a".into() }
}

fn fetch(
    o: &HttpOrigin,
    url: &str,
    md5: &str,
    size: Option<u64>,
    part: &Path,
) -> stack::error::Result<Fetched> {
    let item = table();
    let req = Request {
        item: &item,
        url,
        md5,
        size,
    };
    o.fetch(&RealFs, &req, part)
}

struct Dir {
    _tmp: tempfile::TempDir,
    part: PathBuf,
}

fn dir() -> Dir {
    let tmp = tempfile::tempdir().expect("tempdir");
    let part = tmp.path().join("tbl_a.part");
    Dir { _tmp: tmp, part }
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn full_fetch_streams_and_hashes() {
    let s = Server::start();
    let data = body(300_000, 1);
    s.route(PATH, &data, Mode::Normal);
    let d = dir();
    let seen = Arc::new(AtomicU64::new(0));
    let seen2 = seen.clone();
    let o = origin(
        &s,
        HttpOptions {
            progress: Some(Arc::new(move |n| {
                seen2.fetch_add(n, Ordering::SeqCst);
            })),
            ..opts()
        },
    );
    let f = fetch(&o, PATH, &md5_of(&data), Some(data.len() as u64), &d.part).unwrap();
    assert_eq!(f.md5, md5_of(&data));
    assert_eq!(f.bytes_fetched, data.len() as u64);
    assert_eq!(std::fs::read(&d.part).unwrap(), data);
    assert_eq!(seen.load(Ordering::SeqCst), data.len() as u64);
    let reqs = s.requests_to(PATH);
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].header("range"), None);
    assert_eq!(reqs[0].header("accept-encoding"), Some("identity"));
    assert_eq!(reqs[0].header("authorization"), None);
    // Nothing but the part file was written.
    assert_eq!(names_in(d.part.parent().unwrap()), vec!["tbl_a.part"]);
}

#[test]
fn large_bodies_fetched_at_once_are_hashed_right() {
    // Bodies of 1 MiB and more are hashed in lock step, eight lanes at a time:
    // ten at once take every lane (the last two hash on their own), of unequal
    // lengths, sent in pieces so that they arrive interleaved; one is not what
    // the manifest says.
    let s = Server::start();
    let lens: Vec<usize> = (0..10).map(|i| (1 << 20) + i * 70_001).collect();
    let datas: Vec<Vec<u8>> = lens.iter().map(|&n| body(n, 40 + n as u64)).collect();
    for (i, data) in datas.iter().enumerate() {
        let mode = Mode::Slow {
            chunk: 200_000 + i * 10_000,
            delay: Duration::from_millis(2),
        };
        s.route(&format!("/big/{i}"), data, mode);
    }
    let o = origin(&s, opts());
    let tmp = tempfile::tempdir().unwrap();
    std::thread::scope(|sc| {
        for (i, data) in datas.iter().enumerate() {
            let (o, tmp) = (&o, tmp.path());
            sc.spawn(move || {
                let part = tmp.join(format!("{i}.part"));
                let url = format!("/big/{i}");
                let f = fetch(o, &url, &md5_of(data), Some(data.len() as u64), &part).unwrap();
                assert_eq!(f.md5, md5_of(data), "body {i}");
                assert_eq!(std::fs::read(&part).unwrap(), *data);
            });
        }
    });
    // The lanes are free again, and a second round hashes right too.
    let d = dir();
    let url = "/big/3";
    let f = fetch(&o, url, &md5_of(&datas[4]), None, &d.part).unwrap();
    assert_eq!(f.md5, md5_of(&datas[3]), "the md5 of what arrived");
}

#[test]
fn large_body_cut_short_resumes_in_its_lane() {
    let s = Server::start();
    let data = body(3 << 20, 11);
    s.route(PATH, &data, Mode::DropFirst { after: 1_300_007 });
    let d = dir();
    let f = fetch(&origin(&s, opts()), PATH, &md5_of(&data), None, &d.part).unwrap();
    assert_eq!(f.md5, md5_of(&data));
    assert_eq!(std::fs::read(&d.part).unwrap(), data);
    let reqs = s.requests_to(PATH);
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].header("range"), Some("bytes=1300007-"));
}

#[test]
fn large_body_resent_whole_is_hashed_from_zero() {
    let s = Server::start();
    let data = body(2 << 20, 12);
    s.route(PATH, &data, Mode::IgnoreRange);
    let d = dir();
    std::fs::write(&d.part, &data[..700_000]).unwrap();
    let f = fetch(&origin(&s, opts()), PATH, &md5_of(&data), None, &d.part).unwrap();
    assert_eq!(f.md5, md5_of(&data));
    assert_eq!(std::fs::read(&d.part).unwrap(), data);
}

#[test]
fn resume_from_partial_file_uses_range() {
    let s = Server::start();
    let data = body(200_000, 2);
    s.route(PATH, &data, Mode::Normal);
    let d = dir();
    std::fs::write(&d.part, &data[..70_000]).unwrap();
    let o = origin(&s, opts());
    let f = fetch(&o, PATH, &md5_of(&data), None, &d.part).unwrap();
    assert_eq!(f.md5, md5_of(&data));
    assert_eq!(f.bytes_fetched, 130_000);
    assert_eq!(std::fs::read(&d.part).unwrap(), data);
    let reqs = s.requests_to(PATH);
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].header("range"), Some("bytes=70000-"));
}

#[test]
fn server_ignoring_range_restarts_from_zero() {
    let s = Server::start();
    let data = body(100_000, 3);
    s.route(PATH, &data, Mode::IgnoreRange);
    let d = dir();
    std::fs::write(&d.part, &data[..40_000]).unwrap();
    let f = fetch(&origin(&s, opts()), PATH, &md5_of(&data), None, &d.part).unwrap();
    assert_eq!(f.md5, md5_of(&data));
    assert_eq!(f.bytes_fetched, data.len() as u64);
    assert_eq!(std::fs::read(&d.part).unwrap(), data);
    assert_eq!(s.requests_to(PATH)[0].header("range"), Some("bytes=40000-"));
}

#[test]
fn mismatched_content_range_restarts_from_zero() {
    let s = Server::start();
    let data = body(50_000, 4);
    s.route(PATH, &data, Mode::BadContentRange);
    let d = dir();
    std::fs::write(&d.part, &data[..10_000]).unwrap();
    let f = fetch(&origin(&s, opts()), PATH, &md5_of(&data), None, &d.part).unwrap();
    assert_eq!(f.md5, md5_of(&data));
    assert_eq!(std::fs::read(&d.part).unwrap(), data);
    let reqs = s.requests_to(PATH);
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].header("range"), None);
}

#[test]
fn corrupt_partial_is_refetched_from_zero() {
    let s = Server::start();
    let data = body(60_000, 5);
    s.route(PATH, &data, Mode::Normal);
    let d = dir();
    std::fs::write(&d.part, vec![0u8; 20_000]).unwrap();
    let f = fetch(&origin(&s, opts()), PATH, &md5_of(&data), None, &d.part).unwrap();
    assert_eq!(f.md5, md5_of(&data));
    assert_eq!(std::fs::read(&d.part).unwrap(), data);
    let reqs = s.requests_to(PATH);
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].header("range"), Some("bytes=20000-"));
    assert_eq!(reqs[1].header("range"), None);
}

#[test]
fn genuine_mismatch_after_restart_is_not_fetched_twice() {
    let s = Server::start();
    let served = body(30_000, 15);
    s.route(PATH, &served, Mode::IgnoreRange);
    let d = dir();
    std::fs::write(&d.part, &served[..1_000]).unwrap();
    // The manifest promises other bytes: the origin restarted from zero anyway, so
    // there is no inherited prefix to blame and no second download.
    let f = fetch(&origin(&s, opts()), PATH, &md5_of(b"other"), None, &d.part).unwrap();
    assert_eq!(f.md5, md5_of(&served));
    assert_eq!(s.requests_to(PATH).len(), 1);
}

#[test]
fn complete_partial_needs_no_body() {
    let s = Server::start();
    let data = body(30_000, 6);
    s.route(PATH, &data, Mode::Normal);
    let o = origin(&s, opts());
    // Size known: nothing is requested at all.
    let d = dir();
    std::fs::write(&d.part, &data).unwrap();
    let f = fetch(&o, PATH, &md5_of(&data), Some(30_000), &d.part).unwrap();
    assert_eq!(
        (f.md5.as_str(), f.bytes_fetched),
        (md5_of(&data).as_str(), 0)
    );
    assert!(s.requests_to(PATH).is_empty());
    // Size unknown: the server's 416 with `bytes */30000` says the file is whole.
    let f = fetch(&o, PATH, &md5_of(&data), None, &d.part).unwrap();
    assert_eq!(
        (f.md5.as_str(), f.bytes_fetched),
        (md5_of(&data).as_str(), 0)
    );
    assert_eq!(s.requests_to(PATH).len(), 1);
    assert_eq!(std::fs::read(&d.part).unwrap(), data);
}

#[test]
fn wrong_bytes_are_reported_as_what_arrived() {
    let s = Server::start();
    let data = body(10_000, 7);
    let wrong = body(10_000, 8);
    s.route(PATH, &wrong, Mode::Normal);
    let d = dir();
    let f = fetch(&origin(&s, opts()), PATH, &md5_of(&data), None, &d.part).unwrap();
    // The origin reports the md5 of what it wrote; the engine compares.
    assert_eq!(f.md5, md5_of(&wrong));
    assert_eq!(s.requests_to(PATH).len(), 1);
}

#[test]
fn connection_dropped_mid_body_is_retried_with_range() {
    let s = Server::start();
    let data = body(150_000, 9);
    s.route(PATH, &data, Mode::DropFirst { after: 50_000 });
    let d = dir();
    let f = fetch(&origin(&s, opts()), PATH, &md5_of(&data), None, &d.part).unwrap();
    assert_eq!(f.md5, md5_of(&data));
    assert_eq!(std::fs::read(&d.part).unwrap(), data);
    let reqs = s.requests_to(PATH);
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].header("range"), None);
    assert_eq!(reqs[1].header("range"), Some("bytes=50000-"));
    assert_eq!(f.bytes_fetched, data.len() as u64);
}

#[test]
fn read_timeout_is_retried_with_range() {
    let s = Server::start();
    let data = body(80_000, 10);
    s.route(
        PATH,
        &data,
        Mode::StallFirst {
            after: 20_000,
            stall: Duration::from_millis(1500),
        },
    );
    let d = dir();
    let o = origin(
        &s,
        HttpOptions {
            read_timeout: Duration::from_millis(300),
            ..opts()
        },
    );
    let t = Instant::now();
    let f = fetch(&o, PATH, &md5_of(&data), None, &d.part).unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(1400),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(f.md5, md5_of(&data));
    let reqs = s.requests_to(PATH);
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].header("range"), Some("bytes=20000-"));
}

#[test]
fn slow_server_within_timeout_succeeds() {
    let s = Server::start();
    let data = body(40_000, 11);
    s.route(
        PATH,
        &data,
        Mode::Slow {
            chunk: 8_000,
            delay: Duration::from_millis(30),
        },
    );
    let d = dir();
    let f = fetch(&origin(&s, opts()), PATH, &md5_of(&data), None, &d.part).unwrap();
    assert_eq!(f.md5, md5_of(&data));
    assert_eq!(s.requests_to(PATH).len(), 1);
}

#[test]
fn server_error_then_success() {
    let s = Server::start();
    let data = body(20_000, 12);
    s.route(
        PATH,
        &data,
        Mode::FailFirst {
            status: 500,
            times: 2,
            retry_after: None,
        },
    );
    let d = dir();
    let f = fetch(&origin(&s, opts()), PATH, &md5_of(&data), None, &d.part).unwrap();
    assert_eq!(f.md5, md5_of(&data));
    assert_eq!(s.requests_to(PATH).len(), 3);
}

#[test]
fn too_many_requests_honors_retry_after() {
    let s = Server::start();
    let data = body(5_000, 13);
    s.route(
        PATH,
        &data,
        Mode::FailFirst {
            status: 429,
            times: 1,
            retry_after: Some(1),
        },
    );
    let d = dir();
    let t = Instant::now();
    let f = fetch(&origin(&s, opts()), PATH, &md5_of(&data), None, &d.part).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(950),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(f.md5, md5_of(&data));
    assert_eq!(s.requests_to(PATH).len(), 2);
}

#[test]
fn persistent_server_error_gives_up_after_retries() {
    let s = Server::start();
    s.route(PATH, b"", Mode::Always(503));
    let d = dir();
    let err = fetch(&origin(&s, opts()), PATH, "x", None, &d.part).unwrap_err();
    assert!(matches!(err, Error::Fetch { .. }), "{err:?}");
    assert_eq!(err.exit_code(), 1);
    let msg = err.to_string();
    assert!(msg.contains("503") && msg.contains(PATH), "{msg}");
    assert_eq!(s.requests_to(PATH).len(), 4); // 1 + 3 retries
}

#[test]
fn not_found_fails_at_once() {
    let s = Server::start();
    for status in [404u16, 403, 401] {
        let path = format!("/api/data/s{status}/download");
        s.route(&path, b"", Mode::Always(status));
        let d = dir();
        std::fs::write(&d.part, b"kept").unwrap();
        let err = fetch(&origin(&s, opts()), &path, "x", None, &d.part).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Fetch { .. }), "{err:?}");
        assert!(
            msg.contains(&status.to_string()) && msg.contains(&path),
            "{msg}"
        );
        assert!(msg.contains("table tbl_a"), "{msg}");
        assert_eq!(s.requests_to(&path).len(), 1, "no retries for {status}");
        // A refused request leaves the partial file alone.
        assert_eq!(std::fs::read(&d.part).unwrap(), b"kept");
    }
}

#[test]
fn token_goes_to_the_manifest_origin_only() {
    let home = Server::start();
    let other = Server::start();
    let data = body(1_000, 14);
    home.route(PATH, &data, Mode::Normal);
    other.route("/blob", &data, Mode::Normal);
    let o = origin(
        &home,
        HttpOptions {
            token: Some(TOKEN.into()),
            ..opts()
        },
    );
    let want = format!("Bearer {TOKEN}");
    for url in [PATH.to_string(), home.url(PATH)] {
        let d = dir();
        fetch(&o, &url, &md5_of(&data), None, &d.part).unwrap();
    }
    for r in home.requests_to(PATH) {
        assert_eq!(r.header("authorization"), Some(want.as_str()));
    }
    // Same host, different port: a different origin, no token.
    let d = dir();
    fetch(&o, &other.url("/blob"), &md5_of(&data), None, &d.part).unwrap();
    let reqs = other.requests_to("/blob");
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].header("authorization"), None);
    // And the manifest request carries it.
    home.route("/api/stack/manifest.json", b"{}", Mode::Normal);
    assert_eq!(o.fetch_manifest().unwrap(), b"{}");
    let m = home.requests_to("/api/stack/manifest.json");
    assert_eq!(m[0].header("authorization"), Some(want.as_str()));
}

#[test]
fn token_never_appears_in_errors_or_debug() {
    let s = Server::start();
    s.route("/gone", b"", Mode::Always(404));
    s.route("/down", b"", Mode::Always(500));
    let o = origin(
        &s,
        HttpOptions {
            token: Some(TOKEN.into()),
            retries: 1,
            ..opts()
        },
    );
    assert!(!format!("{o:?}").contains(TOKEN));
    assert!(!format!("{:?}", o.options()).contains(TOKEN));
    // A port nobody listens on: a connection error.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut errors = Vec::new();
    for url in ["/gone", "/down", "/../../etc/passwd"] {
        let d = dir();
        errors.push(fetch(&o, url, "x", None, &d.part).unwrap_err());
    }
    let dead_url = format!("http://127.0.0.1:{dead}/api/m.json");
    let dead_origin = HttpOrigin::new(
        &dead_url,
        HttpOptions {
            token: Some(TOKEN.into()),
            retries: 1,
            ..opts()
        },
    )
    .unwrap();
    errors.push(dead_origin.fetch_manifest().unwrap_err());
    let d = dir();
    errors.push(fetch(&dead_origin, "/api/x", "x", None, &d.part).unwrap_err());
    errors.push(
        HttpOrigin::new(
            "ftp://h/m.json",
            HttpOptions {
                token: Some(TOKEN.into()),
                ..opts()
            },
        )
        .unwrap_err(),
    );
    assert_eq!(errors.len(), 6);
    for e in &errors {
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains(TOKEN), "{shown}");
    }
}

#[test]
fn resolve_refuses_foreign_schemes_relative_paths_and_escapes() {
    let s = Server::start();
    let o = origin(&s, opts());
    for bad in [
        "file:///etc/passwd",
        "ftp://example.com/x",
        "api/data/x",
        "//evil.example/x",
        "/api/../../etc/passwd",
        "/api/%2e%2e/%2e%2e/etc/passwd",
        "http://example.com/a/../../b",
        "",
    ] {
        let err = o.resolve(bad).expect_err(bad);
        assert!(err.contains(&format!("{bad:?}")), "{err}");
    }
    for good in [
        "/api/data/x/download",
        "/api/memory/finance/bundle.md?v=2",
        "http://other.example:8080/x",
        "https://cdn.example/x?sig=a..b",
    ] {
        assert_eq!(o.resolve(good), Ok(()), "{good}");
    }
    let r = o.resolve_url("/api/data/x").unwrap();
    assert_eq!(r.url, s.url("/api/data/x"));
    assert!(r.same_origin);
    assert!(
        !o.resolve_url("https://other.example/x")
            .unwrap()
            .same_origin
    );
    // And a refused URL is never fetched: it is a bad manifest.
    let d = dir();
    let err = fetch(&o, "file:///etc/passwd", "x", None, &d.part).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(!d.part.exists());
}

#[test]
fn manifest_fetch_errors_map_to_exit_codes() {
    let s = Server::start();
    let m = "/api/stack/manifest.json";
    s.route(
        m,
        br#"{"direct_tables": []}"#,
        Mode::FailFirst {
            status: 502,
            times: 1,
            retry_after: None,
        },
    );
    let got = fetch_manifest(&s.url(m), &opts()).unwrap();
    assert_eq!(got, br#"{"direct_tables": []}"#);
    assert_eq!(s.requests_to(m).len(), 2);

    s.route("/missing.json", b"", Mode::Always(404));
    let err = fetch_manifest(&s.url("/missing.json"), &opts()).unwrap_err();
    assert!(matches!(err, Error::Usage(_)), "{err:?}");
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("404") && err.to_string().contains("/missing.json"));
    assert_eq!(s.requests_to("/missing.json").len(), 1);

    s.route("/down.json", b"", Mode::Always(500));
    let err = fetch_manifest(&s.url("/down.json"), &opts()).unwrap_err();
    assert!(matches!(err, Error::Fetch { .. }), "{err:?}");
    assert_eq!(err.exit_code(), 1);

    let err = fetch_manifest("file:///tmp/m.json", &opts()).unwrap_err();
    assert_eq!(err.exit_code(), 2);
}

/// A listener on 127.0.0.1 whose accept queue holds one connection: past that,
/// the kernel drops SYNs, as on a server that cannot keep up.
fn tiny_backlog_listener() -> std::net::TcpListener {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor this function owns; it is handed
    // to the listener (which closes it) only once bound and listening.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let bound = libc::bind(fd, (&addr as *const libc::sockaddr_in).cast(), len);
        assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
        assert_eq!(
            libc::listen(fd, 0),
            0,
            "listen: {}",
            std::io::Error::last_os_error()
        );
        std::net::TcpListener::from_raw_fd(fd)
    }
}

/// A server whose accept queue overflows drops the SYN of a new connection,
/// which then opens only on the kernel's retransmission a second or more later:
/// the origin takes that as overload and lowers its window, though the request
/// itself succeeds.
#[test]
fn a_connection_that_lost_its_syn_lowers_the_window() {
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;
    let listener = tiny_backlog_listener();
    let addr = listener.local_addr().unwrap();
    let data = body(5000, 11);
    let accepted = Arc::new(AtomicUsize::new(0));
    // The server accepts one connection per token: without tokens, connections
    // wait in its accept queue, and once that is full new SYNs are dropped.
    let (grant, tokens) = mpsc::channel::<()>();
    {
        let (data, accepted) = (data.clone(), Arc::clone(&accepted));
        std::thread::spawn(move || {
            while tokens.recv().is_ok() {
                let Ok((mut conn, _)) = listener.accept() else {
                    return;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let data = data.clone();
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match conn.read(&mut byte) {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        data.len()
                    );
                    let _ = conn.write_all(head.as_bytes());
                    let _ = conn.write_all(&data);
                });
            }
        });
    }
    let o = HttpOrigin::new(
        &format!("http://{addr}/api/stack/manifest.json"),
        // No retry, and time for the SYN's retransmissions: the third fetch
        // must succeed on its one connection, not on a retry after a connect
        // timeout (which halves the window too).
        HttpOptions {
            jobs: 2,
            retries: 0,
            connect_timeout: Duration::from_secs(5),
            ..opts()
        },
    )
    .expect("origin");
    let d = dir();
    let md5 = md5_of(&data);
    // The first request's connection, and the warm socket opened after it.
    grant.send(()).unwrap();
    grant.send(()).unwrap();
    fetch(&o, PATH, &md5, None, &d.part).expect("first fetch");
    let deadline = Instant::now() + Duration::from_secs(5);
    while accepted.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the warm socket was opened"
    );
    // The warm socket is kept once its connect returns, just after the accept.
    std::thread::sleep(Duration::from_millis(100));
    std::fs::remove_file(&d.part).unwrap();
    fetch(&o, PATH, &md5, None, &d.part).expect("second fetch, on the warm socket");
    assert_eq!(
        o.window(),
        2,
        "two quick successes keep the window at its cap"
    );
    // Not accepted: this one fills the queue (Linux queues one past a backlog
    // of 0), so the next SYN is dropped until the queue moves, in 1.5 s.
    let _filler = std::net::TcpStream::connect(addr).unwrap();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        for _ in 0..2 {
            let _ = grant.send(());
        }
    });
    std::fs::remove_file(&d.part).unwrap();
    fetch(&o, PATH, &md5, None, &d.part).expect("third fetch, its SYN dropped at first");
    assert_eq!(o.window(), 1, "a lost SYN halves the window");
}
