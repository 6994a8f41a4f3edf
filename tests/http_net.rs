//! Pulls over a network as users have it (issue 16), each against servers the test
//! starts on 127.0.0.1: many requests in flight on kept-alive connections with no
//! flags; a server that limits requests or connections slows the pull down instead
//! of failing it, and `--jobs` caps it; TLS through the system store plus
//! SSL_CERT_FILE / SSL_CERT_DIR; proxies as the only route; redirects; what the
//! command prints.

#![allow(clippy::disallowed_methods)] // test fixtures write the real disk directly

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use md5::{Digest, Md5};
use serde_json::json;
use support::net::{Answer, Limits, Origin, Proxy, TestCa};

const BIN: &str = env!("CARGO_BIN_EXE_stack");

/// Every variable that changes where requests go or whom they trust.
const NET_VARS: &[&str] = &[
    "STACK_TOKEN",
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

fn md5_hex(b: &[u8]) -> String {
    Md5::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

fn body(i: usize, len: usize) -> Vec<u8> {
    // The pattern repeats every 251 files: the first bytes make each unique.
    let mut b: Vec<u8> = (0..len).map(|j| ((i * 31 + j * 7) % 251) as u8).collect();
    let id = (i as u64).to_le_bytes();
    let n = id.len().min(len);
    b[..n].copy_from_slice(&id[..n]);
    b
}

/// Serve `n` tables of `len` bytes and a bundle (no size) from `o`; the manifest
/// is at `/manifest.json`.
fn serve_stack(o: &Origin, n: usize, len: usize) {
    let mut tables = Vec::new();
    for i in 0..n {
        let b = body(i, len);
        let path = format!("/api/data/tbl_{i}/download");
        tables.push(json!({"id": format!("tbl_{i}"), "name": format!("t{i}"),
                           "md5": md5_hex(&b), "parquet_url": path, "size": len}));
        o.route(&path, Answer::Body(b));
    }
    let bundle = b"# finance\nnotes\n".to_vec();
    let manifest = json!({
        "data_packages": [{"id": "a", "slug": "pa", "name": "A", "tables": tables}],
        "memory_domains": [{"slug": "finance", "md5": md5_hex(&bundle),
                            "bundle_url": "/api/memory/finance/bundle.md"}],
    });
    o.route("/api/memory/finance/bundle.md", Answer::Body(bundle));
    o.route(
        "/manifest.json",
        Answer::Body(manifest.to_string().into_bytes()),
    );
}

fn stack(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).stdin(Stdio::null());
    for v in NET_VARS {
        c.env_remove(v);
    }
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("run stack")
}

fn pull(url: &str, dir: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut args = vec!["pull", "--manifest", url, "--dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    stack(&args, envs)
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn assert_pulled(o: &Output, dir: &Path) {
    assert!(o.status.success(), "{}", text(o));
    let v = stack(
        &["verify", "--contents", "--dir", dir.to_str().unwrap()],
        &[],
    );
    assert!(v.status.success(), "verify: {}", text(&v));
}

// ---- 1. many requests in flight, on kept-alive connections, with no flags ----

#[test]
fn default_pull_keeps_many_requests_in_flight_on_reused_connections() {
    // Each response takes 20 ms: a link with latency. With no flags the pull must
    // overlap many requests and reuse its connections for them.
    let o = Origin::http(Limits {
        delay: Duration::from_millis(20),
        ..Limits::default()
    });
    serve_stack(&o, 600, 1024);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let out = pull(&o.url("/manifest.json"), &dir, &[], &[]);
    assert_pulled(&out, &dir);
    assert!(
        o.peak_in_flight() >= 16,
        "only {} requests in flight at once with default settings",
        o.peak_in_flight()
    );
    // Every connection carried several requests (one per worker at most).
    let requests = o.requests().len();
    assert!(
        o.connections() <= 128 && requests >= 3 * o.connections(),
        "{} connections for {requests} requests: connections are not reused",
        o.connections(),
    );
}

#[test]
fn connections_for_the_first_downloads_open_while_the_manifest_is_on_its_way() {
    // Every answer takes 1.5 s. While the manifest's is pending, the pull opens the
    // connections its first downloads will use (a download on a new connection
    // pays its TCP handshake first), and no more connections than one window's.
    let o = Origin::http(Limits {
        delay: Duration::from_millis(1500),
        ..Limits::default()
    });
    serve_stack(&o, 7, 1024);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let mut child = Command::new(BIN)
        .args(["pull", "--manifest", &o.url("/manifest.json"), "--dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run stack");
    let started = std::time::Instant::now();
    while o.connections() == 0 && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(700));
    let early = o.connections();
    // No file was asked for yet: the manifest had not arrived.
    let files_asked = o.requests().iter().any(|r| r.path.starts_with("/api/"));
    assert!(child.wait().unwrap().success());
    assert!(!files_asked, "the manifest was answered too soon to tell");
    assert!(
        early >= 4,
        "{early} connection(s) open while the manifest was pending"
    );
    assert!(o.connections() <= 8, "{} connections", o.connections());
    assert_pulled(&pull(&o.url("/manifest.json"), &dir, &[], &[]), &dir);
}

// ---- 2. polite under limits ---------------------------------------------------

fn overloaded_pull(limits: Limits, extra: &[&str]) -> (Origin, Output, tempfile::TempDir) {
    let o = Origin::http(limits);
    serve_stack(&o, 80, 2048);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let out = pull(&o.url("/manifest.json"), &dir, extra, &[]);
    assert_pulled(&out, &dir);
    eprintln!(
        "{} turned away, peak {} in flight, {} connections",
        o.turned_away(),
        o.peak_in_flight(),
        o.connections()
    );
    (o, out, tmp)
}

#[test]
fn server_answering_503_past_two_requests_slows_the_pull_and_it_completes() {
    let (o, _, _t) = overloaded_pull(
        Limits {
            max_in_flight: Some((2, 503)),
            delay: Duration::from_millis(30),
            ..Limits::default()
        },
        &["--jobs", "16"],
    );
    // It lowered its concurrency rather than hammer: a refusal per four files at
    // most (the first burst, the halvings, then a rare probe of the limit).
    assert!(
        o.turned_away() <= 20,
        "{} requests refused for 81 files",
        o.turned_away()
    );
}

#[test]
fn server_answering_429_past_two_requests_with_default_settings() {
    let (o, _, _t) = overloaded_pull(
        Limits {
            max_in_flight: Some((2, 429)),
            delay: Duration::from_millis(30),
            ..Limits::default()
        },
        &[],
    );
    assert!(
        o.turned_away() <= 20,
        "{} requests refused for 81 files",
        o.turned_away()
    );
}

#[test]
fn server_refusing_connections_past_three_slows_the_pull_and_it_completes() {
    let (o, _, _t) = overloaded_pull(
        Limits {
            max_connections: Some(3),
            delay: Duration::from_millis(30),
            ..Limits::default()
        },
        &["--jobs", "16"],
    );
    assert!(
        o.turned_away() <= 20,
        "{} connections refused for 81 files",
        o.turned_away()
    );
}

#[test]
fn jobs_is_a_hard_cap() {
    let (o, _, _t) = overloaded_pull(
        Limits {
            delay: Duration::from_millis(20),
            ..Limits::default()
        },
        &["--jobs", "3"],
    );
    assert!(o.peak_in_flight() <= 3, "{} in flight", o.peak_in_flight());
}

// ---- 3. TLS as users have it ---------------------------------------------------

#[test]
fn private_ca_is_trusted_through_ssl_cert_file_and_ssl_cert_dir() {
    let ca = TestCa::new(&["127.0.0.1", "localhost"]);
    let o = Origin::tls(&ca, Limits::default());
    serve_stack(&o, 5, 4096);
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let ca_file = certs.join("test-ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();

    let dir = tmp.path().join("d1");
    let out = pull(
        &o.url("/manifest.json"),
        &dir,
        &[],
        &[("SSL_CERT_FILE", ca_file.to_str().unwrap())],
    );
    assert_pulled(&out, &dir);

    let dir = tmp.path().join("d2");
    let out = pull(
        &o.url("/manifest.json"),
        &dir,
        &[],
        &[("SSL_CERT_DIR", certs.to_str().unwrap())],
    );
    assert_pulled(&out, &dir);
}

/// The trust store is read for `https://` targets only: a plain `http://` pull
/// needs no CA, and a missing `SSL_CERT_FILE` stops a pull only once a table
/// lies behind TLS (as a usage error naming the variable, before any byte).
#[test]
fn trust_store_is_read_only_when_a_target_is_https() {
    let ca = TestCa::new(&["127.0.0.1", "localhost"]);
    let tmp = tempfile::tempdir().unwrap();
    let ca_file = tmp.path().join("test-ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let missing = tmp.path().join("no-such-ca.pem");
    let missing = missing.to_str().unwrap();

    let plain = Origin::http(Limits::default());
    serve_stack(&plain, 3, 100);
    let dir = tmp.path().join("plain");
    let out = pull(
        &plain.url("/manifest.json"),
        &dir,
        &[],
        &[("SSL_CERT_FILE", missing)],
    );
    assert_pulled(&out, &dir);

    // An http:// manifest whose last table is on a TLS server.
    let secure = Origin::tls(&ca, Limits::default());
    let mixed = Origin::http(Limits::default());
    let mut tables = Vec::new();
    for i in 0..4 {
        let b = body(i, 1000);
        let (o, path) = match i {
            3 => (&secure, "/t.parquet".to_string()),
            _ => (&mixed, format!("/api/data/t{i}/download")),
        };
        o.route(&path, Answer::Body(b.clone()));
        tables.push(
            json!({"id": format!("t{i}"), "name": format!("t{i}"), "md5": md5_hex(&b),
                           "parquet_url": o.url(&path), "size": 1000}),
        );
    }
    let manifest =
        json!({"data_packages": [{"id": "a", "slug": "pa", "name": "A", "tables": tables}]});
    mixed.route(
        "/manifest.json",
        Answer::Body(manifest.to_string().into_bytes()),
    );

    let dir = tmp.path().join("mixed");
    let out = pull(
        &mixed.url("/manifest.json"),
        &dir,
        &["--jobs", "1"],
        &[("SSL_CERT_FILE", missing)],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SSL_CERT_FILE"),
        "{}",
        text(&out)
    );
    assert!(!dir.exists(), "nothing is written: {}", text(&out));
    assert_eq!(mixed.requests().len(), 1, "only the manifest is fetched");
    assert_eq!(
        secure.connections(),
        0,
        "no connection without a trust store"
    );

    let out = pull(
        &mixed.url("/manifest.json"),
        &dir,
        &[],
        &[("SSL_CERT_FILE", ca_file.to_str().unwrap())],
    );
    assert_pulled(&out, &dir);
}

/// A redirect to https:// is only known once followed: with no usable trust
/// store, that table fails (exit 1), naming the redirect and the variable, and
/// no certificate is asked for.
#[test]
fn redirect_to_https_without_a_trust_store_fails_that_table_naming_why() {
    let ca = TestCa::new(&["127.0.0.1", "localhost"]);
    let secure = Origin::tls(&ca, Limits::default());
    let plain = Origin::http(Limits::default());
    serve_stack(&plain, 1, 100);
    let b = body(0, 100);
    secure.route("/blob", Answer::Body(b));
    plain.route(
        "/api/data/tbl_0/download",
        Answer::Redirect(302, secure.url("/blob")),
    );
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-ca.pem");
    let dir = tmp.path().join("d");
    let out = pull(
        &plain.url("/manifest.json"),
        &dir,
        &[],
        &[("SSL_CERT_FILE", missing.to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SSL_CERT_FILE") && err.contains("/blob"),
        "{}",
        text(&out)
    );
    assert_eq!(secure.connections(), 0);

    // The manifest itself redirected there: a usage error, nothing touched.
    serve_stack(&secure, 1, 100);
    let moved = Origin::http(Limits::default());
    moved.route(
        "/manifest.json",
        Answer::Redirect(301, secure.url("/manifest.json")),
    );
    let dir = tmp.path().join("d2");
    let out = pull(
        &moved.url("/manifest.json"),
        &dir,
        &[],
        &[("SSL_CERT_FILE", missing.to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SSL_CERT_FILE"),
        "{}",
        text(&out)
    );
    assert!(!dir.exists(), "nothing is written: {}", text(&out));
    assert_eq!(secure.connections(), 0);
}

#[test]
fn untrusted_certificate_fails_at_once_naming_the_host_and_the_fix() {
    let ca = TestCa::new(&["127.0.0.1", "localhost"]);
    let o = Origin::tls(&ca, Limits::default());
    serve_stack(&o, 2, 100);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let started = std::time::Instant::now();
    let out = pull(&o.url("/manifest.json"), &dir, &[], &[]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.0.0.1"), "{err}");
    assert!(err.contains("SSL_CERT_FILE"), "{err}");
    assert_eq!(
        o.connections(),
        1,
        "the certificate error was retried: {err}"
    );
    // Not a test of speed: a retried handshake waits seconds of backoff.
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(!dir.join("sync_state.json").exists());
}

// ---- 4. proxies -------------------------------------------------------------------

/// A name that resolves nowhere: only the proxy can reach the origin by it.
const HIDDEN: &str = "origin.stack.test";

#[test]
fn https_through_a_proxy_that_is_the_only_route_keeps_the_token_in_the_tunnel() {
    let ca = TestCa::new(&[HIDDEN]);
    let o = Origin::tls(&ca, Limits::default());
    serve_stack(&o, 6, 4096);
    let proxy = Proxy::start(format!("127.0.0.1:{}", o.port()).parse().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let ca_file = tmp.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let dir = tmp.path().join("d");
    let token = "tok-7f3a9-SECRET";
    let out = pull(
        &o.url_as(HIDDEN, "/manifest.json"),
        &dir,
        &[],
        &[
            ("HTTPS_PROXY", &proxy.url()),
            ("SSL_CERT_FILE", ca_file.to_str().unwrap()),
            ("STACK_TOKEN", token),
        ],
    );
    assert_pulled(&out, &dir);
    assert!(proxy.tunnels() >= 1);
    let seen = proxy.seen();
    assert!(
        seen.contains(&format!("CONNECT {HIDDEN}:{}", o.port())),
        "{seen}"
    );
    assert!(!seen.contains(token), "the proxy saw the token: {seen}");
    for r in o.requests() {
        assert_eq!(
            r.header("authorization"),
            Some(&*format!("Bearer {token}")),
            "{}",
            r.path
        );
    }
}

#[test]
fn http_target_uses_http_proxy_not_all_proxy_and_withholds_the_token() {
    let o = Origin::http(Limits::default());
    serve_stack(&o, 4, 1000);
    let proxy = Proxy::start(format!("127.0.0.1:{}", o.port()).parse().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let out = pull(
        &o.url_as(HIDDEN, "/manifest.json"),
        &dir,
        &[],
        &[
            ("http_proxy", &proxy.url()),
            // Lower precedence for an http:// target: must not be used.
            ("ALL_PROXY", "http://127.0.0.1:9"),
            ("STACK_TOKEN", "plain-text-token"),
        ],
    );
    assert_pulled(&out, &dir);
    assert!(proxy.tunnels() >= 1);
    // Through a proxy, a plain http:// request would show the token to it.
    for r in o.requests() {
        assert_eq!(r.header("authorization"), None, "{}", r.path);
    }
}

/// A TLS front (a certificate of `ca` for 127.0.0.1) that pumps bytes to
/// `upstream`: with a plain proxy behind it, an `https://` proxy.
fn tls_front(ca: &TestCa, upstream: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::io::{ErrorKind, Read, Write};
    let cfg = ca.server_config();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let mut up = std::net::TcpStream::connect(upstream).unwrap();
                c.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
                up.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
                let mut tls =
                    rustls::StreamOwned::new(rustls::ServerConnection::new(cfg).unwrap(), c);
                let mut buf = vec![0u8; 65536];
                let idle = |e: &std::io::Error| {
                    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
                };
                loop {
                    match tls.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            if up.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        Err(e) if idle(&e) => {}
                        Err(_) => return,
                    }
                    match up.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            if tls.write_all(&buf[..n]).is_err() || tls.flush().is_err() {
                                return;
                            }
                        }
                        Err(e) if idle(&e) => {}
                        Err(_) => return,
                    }
                }
            });
        }
    });
    addr
}

/// An `http://` pull whose `http_proxy` is reached over TLS trusts the CA
/// it was given for the proxy.
#[test]
fn http_target_through_a_tls_proxy_trusts_the_given_ca() {
    let ca = TestCa::new(&["127.0.0.1"]);
    let o = Origin::http(Limits::default());
    serve_stack(&o, 3, 1000);
    let proxy = Proxy::start(format!("127.0.0.1:{}", o.port()).parse().unwrap());
    let plain_proxy: std::net::SocketAddr = proxy.url()["http://".len()..].parse().unwrap();
    let front = tls_front(&ca, plain_proxy);
    let tmp = tempfile::tempdir().unwrap();
    let ca_file = tmp.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let dir = tmp.path().join("d");
    let out = pull(
        &o.url_as(HIDDEN, "/manifest.json"),
        &dir,
        &[],
        &[
            ("http_proxy", &format!("https://{front}")),
            ("SSL_CERT_FILE", ca_file.to_str().unwrap()),
        ],
    );
    assert_pulled(&out, &dir);
    assert!(proxy.tunnels() >= 1);
}

#[test]
fn no_proxy_hosts_go_direct() {
    let o = Origin::http(Limits::default());
    serve_stack(&o, 3, 1000);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let out = pull(
        &o.url("/manifest.json"),
        &dir,
        &[],
        &[
            ("HTTP_PROXY", "http://127.0.0.1:9"),
            ("NO_PROXY", "example.com,127.0.0.1"),
        ],
    );
    assert_pulled(&out, &dir);
}

#[test]
fn unusable_proxy_variable_is_a_usage_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = pull(
        "http://127.0.0.1:9/manifest.json",
        &tmp.path().join("d"),
        &[],
        &[("HTTPS_PROXY", "ftp://[::nope")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HTTPS_PROXY"),
        "{}",
        text(&out)
    );
}

// ---- 5. redirects -------------------------------------------------------------------

#[test]
fn redirect_within_the_origin_keeps_the_token_and_another_origin_never_gets_it() {
    let o = Origin::http(Limits::default());
    let other = Origin::http(Limits::default());
    let token = "redirect-token-42";
    let a = body(1, 5000);
    let b = body(2, 6000);
    // API path -> blob path on the same origin (absolute-path Location), and one
    // table whose blob lives on another origin (same host, other port).
    o.route(
        "/api/data/a/download",
        Answer::Redirect(302, "/blob/a".to_string()),
    );
    o.route("/blob/a", Answer::Body(a.clone()));
    o.route(
        "/api/data/b/download",
        Answer::Redirect(307, other.url("/blob/b")),
    );
    other.route("/blob/b", Answer::Body(b.clone()));
    let manifest = json!({"direct_tables": [
        {"id": "a", "name": "a", "md5": md5_hex(&a), "parquet_url": "/api/data/a/download", "size": a.len()},
        {"id": "b", "name": "b", "md5": md5_hex(&b), "parquet_url": "/api/data/b/download", "size": b.len()},
    ]});
    o.route(
        "/manifest.json",
        Answer::Body(manifest.to_string().into_bytes()),
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let out = pull(
        &o.url("/manifest.json"),
        &dir,
        &[],
        &[("STACK_TOKEN", token)],
    );
    assert_pulled(&out, &dir);
    let blob = o.requests().into_iter().find(|r| r.path == "/blob/a");
    assert_eq!(
        blob.expect("the redirect was followed")
            .header("authorization"),
        Some(&*format!("Bearer {token}"))
    );
    for r in other.requests() {
        assert_eq!(r.header("authorization"), None, "{}", r.path);
    }
}

// ---- 6. what the command prints ----------------------------------------------------

#[test]
fn summary_is_human_and_quiet_prints_nothing() {
    let o = Origin::http(Limits::default());
    serve_stack(&o, 20, 64 * 1024);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let out = pull(&o.url("/manifest.json"), &dir, &[], &[]);
    assert_pulled(&out, &dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // 20 x 64 KiB + the 16-byte bundle
    assert!(stdout.contains("1.3 MiB in "), "{stdout}");
    assert!(stdout.trim_end().ends_with(" s"), "{stdout}");

    let dir = tmp.path().join("q");
    let out = stack(
        &[
            "-q",
            "pull",
            "--manifest",
            &o.url("/manifest.json"),
            "--dir",
            dir.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "{}",
        text(&out)
    );
}

#[test]
fn progress_counts_files_and_bytes_against_totals_when_a_bundle_has_no_size() {
    let o = Origin::http(Limits::default());
    serve_stack(&o, 10, 10 * 1024);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    // stderr is not a terminal here: the progress is printed as lines.
    let out = pull(&o.url("/manifest.json"), &dir, &["--jobs", "1"], &[]);
    assert_pulled(&out, &dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fetching 11 files, 100.0 KiB"), "{err}");
    assert!(err.contains("stack: files 1/11, "), "{err}");
    assert!(err.contains(" of 100.0 KiB"), "{err}");
}
