//! Servers for the network tests, on 127.0.0.1: a keep-alive HTTP/1.1 origin
//! (optionally TLS with a certificate from a test CA, optionally limiting how many
//! requests or connections it takes at once), and a CONNECT proxy that records
//! everything it sees outside the tunnels.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// A test certificate authority and one server certificate it signed.
pub struct TestCa {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    server_cert: rustls::pki_types::CertificateDer<'static>,
    server_key: Vec<u8>,
}

impl TestCa {
    /// A CA, and a certificate it signed for `names` (host names or IP addresses).
    pub fn new(names: &[&str]) -> TestCa {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "stack test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let leaf_params = rcgen::CertificateParams::new(names).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        TestCa {
            ca_pem: ca_cert.pem(),
            server_cert: leaf.der().clone(),
            server_key: leaf_key.serialize_der(),
        }
    }

    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(self.server_key.clone().into());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.server_cert.clone()], key)
            .unwrap();
        Arc::new(cfg)
    }
}

/// What an origin answers for a path.
#[derive(Clone)]
pub enum Answer {
    Body(Vec<u8>),
    /// A redirect: status and `Location`.
    Redirect(u16, String),
}

/// How the origin behaves.
#[derive(Default, Clone)]
pub struct Limits {
    /// More requests than this in flight at once get the given status.
    pub max_in_flight: Option<(usize, u16)>,
    /// More connections than this open at once are closed as soon as accepted.
    pub max_connections: Option<usize>,
    /// Each response waits this long before it is sent.
    pub delay: Duration,
}

/// One request as the origin saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub status: u16,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Shared {
    routes: Mutex<HashMap<String, Answer>>,
    log: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
    open_connections: AtomicUsize,
    connections: AtomicUsize,
    turned_away: AtomicUsize,
    handshake_failures: AtomicUsize,
}

/// A keep-alive HTTP/1.1 origin on 127.0.0.1 (TLS if made with [`Origin::tls`]).
pub struct Origin {
    addr: SocketAddr,
    scheme: &'static str,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
}

impl Origin {
    pub fn http(limits: Limits) -> Origin {
        Origin::start(None, limits)
    }

    pub fn tls(ca: &TestCa, limits: Limits) -> Origin {
        Origin::start(Some(ca.server_config()), limits)
    }

    fn start(tls: Option<Arc<rustls::ServerConfig>>, limits: Limits) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let (sh, sp) = (shared.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                sh.connections.fetch_add(1, Ordering::SeqCst);
                let open = sh.open_connections.fetch_add(1, Ordering::SeqCst) + 1;
                if limits.max_connections.is_some_and(|m| open > m) {
                    sh.turned_away.fetch_add(1, Ordering::SeqCst);
                    sh.open_connections.fetch_sub(1, Ordering::SeqCst);
                    let _ = conn.shutdown(Shutdown::Both);
                    continue;
                }
                let (sh, limits, tls) = (sh.clone(), limits.clone(), tls.clone());
                thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(20)));
                    match tls {
                        None => serve(conn, &sh, &limits),
                        Some(cfg) => {
                            let tls = rustls::ServerConnection::new(cfg).unwrap();
                            let mut stream = rustls::StreamOwned::new(tls, conn);
                            // Finish the handshake first, to count the failures.
                            while stream.conn.is_handshaking() {
                                if stream.conn.complete_io(&mut stream.sock).is_err() {
                                    sh.handshake_failures.fetch_add(1, Ordering::SeqCst);
                                    break;
                                }
                            }
                            if !stream.conn.is_handshaking() {
                                serve(stream, &sh, &limits);
                            }
                        }
                    }
                    sh.open_connections.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Origin {
            addr,
            scheme,
            shared,
            stop,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `scheme://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// `scheme://HOST:PORT{path}`: the same server under another name.
    pub fn url_as(&self, host: &str, path: &str) -> String {
        format!("{}://{host}:{}{path}", self.scheme, self.addr.port())
    }

    pub fn route(&self, path: &str, answer: Answer) {
        self.shared
            .routes
            .lock()
            .unwrap()
            .insert(path.to_string(), answer);
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.shared.log.lock().unwrap().clone()
    }

    /// The most requests that were in flight at once.
    pub fn peak_in_flight(&self) -> usize {
        self.shared.peak_in_flight.load(Ordering::SeqCst)
    }

    /// Connections accepted (including those turned away).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Requests answered with the overload status, plus connections turned away.
    pub fn turned_away(&self) -> usize {
        self.shared.turned_away.load(Ordering::SeqCst)
    }

    pub fn handshake_failures(&self) -> usize {
        self.shared.handshake_failures.load(Ordering::SeqCst)
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Read one request head; `None` at the end of the connection.
fn read_head(r: &mut impl BufRead) -> Option<(String, Vec<(String, String)>)> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let target = line.split_whitespace().nth(1)?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Some((target, headers))
}

fn serve<S: Read + Write>(stream: S, sh: &Shared, limits: &Limits) {
    let mut r = BufReader::new(stream);
    while let Some((path, headers)) = read_head(&mut r) {
        let now = sh.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        sh.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        let answer = sh.routes.lock().unwrap().get(&path).cloned();
        let (status, extra, body) = match (limits.max_in_flight, answer) {
            (Some((max, status)), _) if now > max => {
                sh.turned_away.fetch_add(1, Ordering::SeqCst);
                (status, String::new(), b"busy\n".to_vec())
            }
            (_, None) => (404, String::new(), b"not here\n".to_vec()),
            (_, Some(Answer::Body(b))) => (200, String::new(), b),
            (_, Some(Answer::Redirect(s, to))) => (s, format!("Location: {to}\r\n"), Vec::new()),
        };
        sh.log.lock().unwrap().push(Seen {
            path,
            headers,
            status,
        });
        if status == 200 {
            thread::sleep(limits.delay);
        }
        let head = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n{extra}\r\n",
            body.len()
        );
        let w = r.get_mut();
        let ok = w.write_all(head.as_bytes()).is_ok() && w.write_all(&body).is_ok();
        let _ = w.flush();
        sh.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !ok {
            return;
        }
    }
}

/// A CONNECT proxy on 127.0.0.1 that sends every tunnel to `target` (whatever host
/// the client names: the proxy is the only route to it) and records every byte
/// the client sent outside a tunnel.
pub struct Proxy {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
    tunnels: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tunnels = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (sn, tn, sp) = (seen.clone(), tunnels.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (sn, tn) = (sn.clone(), tn.clone());
                thread::spawn(move || tunnel(conn, target, &sn, &tn));
            }
        });
        Proxy {
            addr,
            seen,
            tunnels,
            stop,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything clients sent to the proxy itself (request lines and headers).
    pub fn seen(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    pub fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn tunnel(conn: TcpStream, target: SocketAddr, seen: &Mutex<Vec<u8>>, tunnels: &AtomicUsize) {
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        head.extend_from_slice(line.as_bytes());
        if line.trim_end().is_empty() {
            break;
        }
    }
    seen.lock().unwrap().extend_from_slice(&head);
    let mut client = conn;
    if !head.starts_with(b"CONNECT ") {
        let _ = client.write_all(b"HTTP/1.1 405 Only CONNECT\r\nContent-Length: 0\r\n\r\n");
        return;
    }
    let Ok(upstream) = TcpStream::connect(target) else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    tunnels.fetch_add(1, Ordering::SeqCst);
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .is_err()
    {
        return;
    }
    // Bytes the client sent after its CONNECT head are already in `r`'s buffer.
    let buffered = r.buffer().to_vec();
    let mut up_w = upstream.try_clone().unwrap();
    let _ = up_w.write_all(&buffered);
    let mut up_r = upstream;
    let mut client_r = r.into_inner();
    let t = thread::spawn(move || {
        let _ = std::io::copy(&mut client_r, &mut up_w);
        let _ = up_w.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut up_r, &mut client);
    let _ = client.shutdown(Shutdown::Write);
    let _ = t.join();
}
