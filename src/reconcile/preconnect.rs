//! Connections opened ahead of need: while the manifest is on its way, the TCP
//! connections its first downloads will need are opened, so that each of those
//! pays one round trip (the request), not two (the TCP handshake, then the
//! request). Browsers do the same ("preconnect").
//!
//! Owns: the warm sockets of one origin and the ureq connectors around the TCP
//! connector of its direct agent: [`Provide`] hands a warm socket to a request
//! that needs a new connection, [`Trigger`] starts the warm-up once a first
//! connection (TCP, and TLS where the scheme says so) has succeeded, and
//! [`Timed`] notes a connection that took as long as a lost SYN
//! ([`slow_connect_seen`]), the overload signal of a server whose accept queue is
//! full: it drops the SYN, and only the kernel's retransmission a second later
//! gets through.
//!
//! Invariants kept: at most `count` sockets are opened, once per origin, and
//! only after a connection to it succeeded (each to the first of its addresses
//! that accepts) — a server that cannot be reached, or whose certificate is
//! refused, sees no extra connection; no request is sent
//! on a warm socket here (a server sees a connection, nothing else, until a
//! download uses it); a socket is handed out only while fresh and still open
//! (a server that closed it, e.g. one that limits connections per client, gets
//! it closed, never used); opening one never delays a request (each opens on its
//! own thread, and a request takes one only if it is ready).

use std::cell::Cell;
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, Transport,
};

/// A warm socket older than this is closed rather than used: servers close idle
/// connections (nginx after 60 s by default), and the manifest has long arrived.
const FRESH_FOR: Duration = Duration::from_secs(5);

/// How much longer than the fastest connection to the same host a connection
/// that lost its SYN takes to open: the kernel retransmits a SYN one second
/// after it (RFC 6298's initial RTO), then every second more (Linux's
/// `tcp_syn_linear_timeouts`, 4 by default) or after two more (the RFC's
/// doubling). A server drops SYNs when its accept queue is full. Longer delays
/// (ureq giving up on one address of several for the next, after seconds) are
/// not taken for this signal.
const LOST_SYN_DELAYS: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(900)..=Duration::from_millis(4600);

/// Does a connection that took `extra` longer than the fastest one look like
/// one that lost its SYN?
fn lost_syn(extra: Duration) -> bool {
    LOST_SYN_DELAYS.contains(&extra)
}

thread_local! {
    /// This thread opened a connection that lost its SYN.
    /// Per thread, because a blocking request connects on its caller's thread and
    /// ureq gives a connector no handle on the request.
    static SLOW: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// When a connection opened on this thread since the last call, which lost
/// its SYN (see [`Timed`]), was made. Clears the note.
pub fn slow_connect_seen() -> Option<Instant> {
    SLOW.with(|s| s.take())
}

/// The warm sockets of one origin.
#[derive(Debug)]
pub struct Warm {
    state: Mutex<State>,
    /// Sockets to open.
    count: usize,
    connect_timeout: Duration,
}

#[derive(Debug, Default)]
struct State {
    started: bool,
    sockets: Vec<(SocketAddr, TcpStream, Instant)>,
}

impl Warm {
    /// Up to `count` sockets, each given `connect_timeout` to connect.
    pub fn new(count: usize, connect_timeout: Duration) -> Arc<Warm> {
        Arc::new(Warm {
            state: Mutex::new(State::default()),
            count,
            connect_timeout,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open the sockets, each on its own thread, unless that was done: each to
    /// the first of `addrs` (the origin's, in the order ureq tries them) that
    /// accepts, as ureq's own connection did (its transport does not say which).
    fn start(self: &Arc<Self>, addrs: &[SocketAddr], no_delay: bool) {
        let mut st = self.lock();
        if st.started {
            return;
        }
        st.started = true;
        drop(st);
        for _ in 0..self.count {
            let warm = Arc::clone(self);
            let addrs = addrs.to_vec();
            std::thread::spawn(move || {
                let Some((addr, s)) = addrs.into_iter().find_map(|a| {
                    let s = TcpStream::connect_timeout(&a, warm.connect_timeout).ok()?;
                    Some((a, s))
                }) else {
                    return;
                };
                if no_delay && s.set_nodelay(true).is_err() {
                    return;
                }
                warm.lock().sockets.push((addr, s, Instant::now()));
            });
        }
    }

    /// A fresh, open warm socket to one of `addrs`, if there is one.
    fn take(&self, addrs: &[SocketAddr]) -> Option<TcpStream> {
        let mut st = self.lock();
        while let Some(i) = st.sockets.iter().position(|(a, _, _)| addrs.contains(a)) {
            let (_, s, opened) = st.sockets.swap_remove(i);
            if opened.elapsed() < FRESH_FOR && still_open(&s) {
                return Some(s);
            }
        }
        None
    }
}

/// Has the server neither closed `s` nor sent anything on it (nothing was asked)?
fn still_open(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return false;
    }
    let idle = matches!(
        s.peek(&mut [0u8; 1]),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    );
    s.set_nonblocking(false).is_ok() && idle
}

/// Placed before ureq's TCP connector: a request that needs a new connection
/// gets a warm socket to its address when one is ready.
#[derive(Debug)]
pub struct Provide(pub Arc<Warm>);

impl<In: Transport> Connector<In> for Provide {
    type Out = Either<In, WarmTransport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        if let Some(c) = chained {
            return Ok(Some(Either::A(c)));
        }
        Ok(self.0.take(&details.addrs).map(|s| {
            let config = details.config;
            let buffers = LazyBuffers::new(config.input_buffer_size(), config.output_buffer_size());
            Either::B(WarmTransport { stream: s, buffers })
        }))
    }
}

/// Placed after ureq's TLS connector: once a connection is made (and its TLS
/// handshake done), the warm sockets to its address are opened.
#[derive(Debug)]
pub struct Trigger(pub Arc<Warm>);

impl<In: Transport> Connector<In> for Trigger {
    type Out = In;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        if chained.is_some() {
            self.0.start(&details.addrs, details.config.no_delay());
        }
        Ok(chained)
    }
}

/// Wraps ureq's TCP connector: a new connection that took one to four seconds
/// longer than the fastest one to its host (the link's round trip, however long
/// that is) lost its SYN, and is noted for [`slow_connect_seen`].
#[derive(Debug)]
pub struct Timed<C> {
    inner: C,
    /// The fastest connect so far to each host and port (as the URL gives it).
    fastest: Mutex<HashMap<(String, u16), Duration>>,
}

impl<C> Timed<C> {
    pub fn new(inner: C) -> Timed<C> {
        Timed {
            inner,
            fastest: Mutex::new(HashMap::new()),
        }
    }
}

impl<In: Transport, C: Connector<In>> Connector<In> for Timed<C> {
    type Out = C::Out;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        let opens = chained.is_none();
        let started = Instant::now();
        let made = self.inner.connect(details, chained);
        if opens && made.is_ok() {
            let took = started.elapsed();
            let host = details.uri.host().unwrap_or("").to_ascii_lowercase();
            let https = details.uri.scheme_str() == Some("https");
            let port = details
                .uri
                .port_u16()
                .unwrap_or(if https { 443 } else { 80 });
            let mut fastest = self.fastest.lock().unwrap_or_else(|p| p.into_inner());
            let best = fastest.entry((host, port)).or_insert(took);
            *best = (*best).min(took);
            if lost_syn(took - *best) {
                SLOW.with(|s| s.set(Some(Instant::now())));
            }
        }
        made
    }
}

/// A warm socket in use: plain TCP, as ureq's own TCP transport (whose
/// constructor ureq does not export), with the same timeouts.
#[derive(Debug)]
pub struct WarmTransport {
    stream: TcpStream,
    buffers: LazyBuffers,
}

/// The socket timeout for `t` (`None`: no limit), or the timeout error when its
/// time is already up.
fn socket_timeout(t: &NextTimeout) -> Result<Option<Duration>, ureq::Error> {
    if t.after.is_zero() {
        return Err(ureq::Error::Timeout(t.reason));
    }
    Ok(t.not_zero().map(|d| *d))
}

/// An I/O error as ureq reports it: a socket timeout is the timeout `t`.
fn io_error(e: std::io::Error, t: &NextTimeout) -> ureq::Error {
    match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => ureq::Error::Timeout(t.reason),
        _ => ureq::Error::Io(e),
    }
}

impl Transport for WarmTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let t = timeout.for_write();
        self.stream.set_write_timeout(socket_timeout(&t)?)?;
        let output = &self.buffers.output()[..amount];
        self.stream.write_all(output).map_err(|e| io_error(e, &t))
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let t = timeout.for_read();
        self.stream.set_read_timeout(socket_timeout(&t)?)?;
        let input = self.buffers.input_append_buf();
        let n = loop {
            match self.stream.read(input) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                r => break r.map_err(|e| io_error(e, &t))?,
            }
        };
        self.buffers.input_appended(n);
        Ok(n > 0)
    }

    fn is_open(&mut self) -> bool {
        still_open(&self.stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Warm sockets to a listener that keeps (`true`) or closes every connection;
    /// the origin's addresses list a port that refuses first (as `localhost`
    /// can resolve to `::1` for a server on IPv4 only).
    fn warm_to(keep: bool) -> (Arc<Warm>, SocketAddr, std::thread::JoinHandle<()>) {
        let refusing = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut kept = Vec::new();
            for _ in 0..3 {
                let (c, _) = listener.accept().unwrap();
                if keep {
                    kept.push(c);
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        });
        let warm = Warm::new(3, Duration::from_secs(5));
        warm.start(&[refusing, addr], true);
        warm.start(&[refusing, addr], true); // once per origin
        let deadline = Instant::now() + Duration::from_secs(5);
        while warm.lock().sockets.len() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(warm.lock().sockets.len(), 3);
        (warm, addr, server)
    }

    #[test]
    fn open_sockets_are_handed_out_once_each_and_only_for_their_address() {
        let (warm, addr, server) = warm_to(true);
        let other: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(warm.take(&[other]).is_none());
        for _ in 0..3 {
            assert!(warm.take(&[other, addr]).is_some());
        }
        assert!(warm.take(&[addr]).is_none());
        server.join().unwrap();
    }

    #[test]
    fn sockets_the_server_closed_are_never_handed_out() {
        let (warm, addr, server) = warm_to(false);
        std::thread::sleep(Duration::from_millis(100));
        assert!(warm.take(&[addr]).is_none());
        assert!(warm.lock().sockets.is_empty(), "closed sockets are dropped");
        server.join().unwrap();
    }
}
