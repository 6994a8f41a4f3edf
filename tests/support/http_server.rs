//! A tiny HTTP/1.1 server on 127.0.0.1 for the HTTP origin's tests.
//!
//! One thread accepts; each connection serves one request and closes. Routes map a
//! path to a body and a [`Mode`] that decides how (badly) it is served. Every
//! request's path and headers are recorded.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// How a route is served.
#[derive(Debug, Clone)]
pub enum Mode {
    /// 200, or 206 + Content-Range for `Range: bytes=N-` (416 past the end).
    Normal,
    /// Always 200 with the whole body, whatever the Range header says.
    IgnoreRange,
    /// First request: announce the full length, send `after` bytes, close.
    /// Later requests: `Normal`.
    DropFirst { after: usize },
    /// The first `times` requests get `status` (with `Retry-After` if given),
    /// later ones `Normal`.
    FailFirst {
        status: u16,
        times: usize,
        retry_after: Option<u32>,
    },
    /// Every request gets `status`.
    Always(u16),
    /// First request: send `after` bytes, go silent for `stall`, send the rest.
    /// Later requests: `Normal`.
    StallFirst { after: usize, stall: Duration },
    /// Every body is sent in `chunk`-byte pieces with `delay` between them.
    Slow { chunk: usize, delay: Duration },
    /// A Range request gets 206 with the whole body and `Content-Range: bytes 0-...`.
    BadContentRange,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    /// Header names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Route {
    body: Vec<u8>,
    mode: Mode,
    hits: usize,
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Route>,
    log: Vec<Recorded>,
}

pub struct Server {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl Server {
    pub fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                thread::spawn(move || {
                    let _ = serve(conn, &st);
                });
            }
        });
        Server { addr, state, stop }
    }

    pub fn route(&self, path: &str, body: &[u8], mode: Mode) {
        self.state.lock().unwrap().routes.insert(
            path.to_string(),
            Route {
                body: body.to_vec(),
                mode,
                hits: 0,
            },
        );
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(conn: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        // Closed before a request line (a connection the client opened ahead of
        // need and did not use): not a request.
        return Ok(());
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let rec = Recorded { path, headers };
    let range_from = rec
        .header("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());

    let (body, mode, hit) = {
        let mut st = state.lock().unwrap();
        st.log.push(rec.clone());
        match st.routes.get_mut(&rec.path) {
            Some(route) => {
                route.hits += 1;
                (route.body.clone(), route.mode.clone(), route.hits)
            }
            None => (Vec::new(), Mode::Always(404), 1),
        }
    };
    let mut w = conn;
    let len = body.len();
    match mode {
        Mode::Always(status) => return respond(&mut w, status, &[], b"nope\n"),
        Mode::FailFirst {
            status,
            times,
            retry_after,
        } if hit <= times => {
            let extra = retry_after
                .map(|s| vec![("Retry-After".to_string(), s.to_string())])
                .unwrap_or_default();
            return respond(&mut w, status, &extra, b"try later\n");
        }
        Mode::IgnoreRange => return respond(&mut w, 200, &[], &body),
        Mode::DropFirst { after } if hit == 1 => {
            head(&mut w, 200, len, &[])?;
            w.write_all(&body[..after.min(len)])?;
            w.flush()?;
            let _ = w.shutdown(Shutdown::Both);
            return Ok(());
        }
        Mode::StallFirst { after, stall } if hit == 1 => {
            head(&mut w, 200, len, &[])?;
            w.write_all(&body[..after.min(len)])?;
            w.flush()?;
            thread::sleep(stall);
            let _ = w.write_all(&body[after.min(len)..]);
            return Ok(());
        }
        Mode::BadContentRange if range_from.is_some() => {
            let cr = format!("bytes 0-{}/{len}", len.saturating_sub(1));
            return respond(&mut w, 206, &[("Content-Range".to_string(), cr)], &body);
        }
        _ => {}
    }
    // Normal serving, with Range support.
    let (status, extra, slice) = match range_from {
        Some(from) if from >= len => {
            let cr = format!("bytes */{len}");
            return respond(&mut w, 416, &[("Content-Range".to_string(), cr)], b"");
        }
        Some(from) => (
            206,
            vec![(
                "Content-Range".to_string(),
                format!("bytes {from}-{}/{len}", len - 1),
            )],
            &body[from..],
        ),
        None => (200, Vec::new(), &body[..]),
    };
    if let Mode::Slow { chunk, delay } = mode {
        head(&mut w, status, slice.len(), &extra)?;
        for piece in slice.chunks(chunk.max(1)) {
            w.write_all(piece)?;
            w.flush()?;
            thread::sleep(delay);
        }
        return Ok(());
    }
    respond(&mut w, status, &extra, slice)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        404 => "Not Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Whatever",
    }
}

fn head(
    w: &mut TcpStream,
    status: u16,
    len: usize,
    extra: &[(String, String)],
) -> std::io::Result<()> {
    let mut h = format!(
        "HTTP/1.1 {status} {}\r\nContent-Length: {len}\r\nConnection: close\r\nAccept-Ranges: bytes\r\n",
        reason(status)
    );
    for (n, v) in extra {
        h.push_str(&format!("{n}: {v}\r\n"));
    }
    h.push_str("\r\n");
    w.write_all(h.as_bytes())
}

fn respond(
    w: &mut TcpStream,
    status: u16,
    extra: &[(String, String)],
    body: &[u8],
) -> std::io::Result<()> {
    head(w, status, body.len(), extra)?;
    w.write_all(body)?;
    w.flush()
}
