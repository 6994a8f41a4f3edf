//! The HTTP(S) origin: a manifest fetched from a server, and the tables and bundles
//! it lists fetched from that server (or from absolute `http(s)://` URLs it names).
//!
//! Owns: URL resolution for an HTTP manifest (contract §1: `/api/...` against the
//! manifest's scheme://host:port, absolute `http(s)://` URLs as given, nothing else),
//! downloading the manifest ([`HttpOrigin::fetch_manifest`], [`fetch_manifest`]),
//! streaming downloads with resume (`Range: bytes=L-`), the retry policy
//! (exponential backoff with jitter, `Retry-After` honored and capped), redirects,
//! and how many requests are in flight ([`super::congestion::Window`]: it starts small,
//! grows while the server keeps up, halves when it signals overload, and never
//! exceeds [`HttpOptions::jobs`]). Connections are kept alive and reused (one pool
//! per proxy route, sized to the cap), so a file costs one round trip, not three;
//! the connections of the first window are opened while the manifest is on its way
//! ([`super::preconnect`], direct connections only).
//! Proxies and trusted CAs come from the environment ([`netenv`]); the trust store
//! is read when the first `https://` target needs it, so a plain `http://` pull
//! reads none.
//!
//! Invariants kept:
//! - Nothing is written anywhere but the `part` path the engine hands to
//!   [`Origin::fetch`], and only through the engine's [`Fs`]; nothing is synced.
//! - Memory is bounded whatever the file size: bodies stream through one fixed
//!   buffer, md5 is computed on the way — a large body is read straight into the
//!   windows of a lane (at most about 2.5 MiB of them), where up to eight bodies
//!   are hashed in lock step ([`crate::md5x::LockStep`]) — and the manifest alone
//!   is read into memory, capped at [`MAX_MANIFEST_BYTES`].
//! - The token (`STACK_TOKEN`) never leaves memory except as the
//!   `Authorization: Bearer` header of a request to the manifest's own origin
//!   (same scheme, host and port), also after a redirect that stays within it. It
//!   is not sent to other origins (nor after a redirect to one), never to a proxy
//!   outside a TLS tunnel (a plain `http://` origin reached through a proxy gets no
//!   token), redacted from `Debug`, and scrubbed from every error message.
//! - A certificate the trust store rejects is not retried: the same handshake would
//!   fail the same way.
//!
//! Error mapping (what the engine turns into exit codes):
//! - A URL this origin refuses: the `Err(String)` of [`Origin::resolve`] (bad
//!   manifest, exit 2).
//! - The manifest URL answers a 4xx other than 408/429 (404, 401, 403, ...):
//!   [`Error::Usage`], exit 2: the URL or the token the user gave is wrong and
//!   nothing was touched. Anything else that fails fetching the manifest (5xx or
//!   network failures after all retries) is [`Error::Fetch`], exit 1.
//! - A table or bundle download that fails for good: [`Error::Fetch`] naming the
//!   item, the URL and the HTTP status or network error.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use md5::{Digest, Md5};
use ureq::http::{HeaderMap, Response, Uri};
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::{Connector, RustlsConnector, TcpConnector};

use super::congestion::{Window, INITIAL_WINDOW};
use super::netenv::{self, Proxies};
use super::origin::{hex, origin_relative, Fetched, Origin, Request};
use super::preconnect::{slow_connect_seen, Provide, Timed, Trigger, Warm};

/// A lost SYN noted longer ago than this (its request downloaded a large body
/// since) no longer says anything about the server's queue.
const LATE_SIGNAL: Duration = Duration::from_secs(2);
use crate::error::{Error, IoContext, Result};
use crate::fs::{FileWrite, Fs};
use crate::md5x::{Lane, LockStep};

/// The environment variable holding the bearer token.
pub const TOKEN_ENV: &str = "STACK_TOKEN";

/// The largest manifest this client reads into memory.
pub const MAX_MANIFEST_BYTES: u64 = 256 * 1024 * 1024;

/// Size of the one buffer a download streams through.
const BUF_SIZE: usize = 64 * 1024;

/// A body at least this large is hashed in a lane of the origin's [`LockStep`];
/// a smaller one on its own (its hashing is short, a lane's copy and lock are not
/// free).
const LANE_MIN_BYTES: u64 = 1024 * 1024;

/// Requests in flight at most when the user does not say (`--jobs`). HTTP/1.1
/// has one request per connection at a time, so on a link with a round trip each
/// small file costs one: 5,000 files at 100 ms take 5,000 x 0.1 s / N. The window
/// only grows this far while the server keeps up (measured in BENCHMARKS.md: 64
/// took 9.1 s there, 128 5.6 s, `curl --parallel-max 50` 11.6 s).
pub const DEFAULT_JOBS: usize = 128;

/// Redirects followed for one request.
const MAX_REDIRECTS: usize = 10;

/// Retries a request may take, on top of [`HttpOptions::retries`], when it was
/// refused while other requests of ours were in flight: the server is asking for
/// fewer at once, the window shrinks, and the request waits its turn.
const CONTENDED_RETRIES: u32 = 16;

/// Called with the number of bytes of each chunk as it arrives.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// How the HTTP origin talks to servers.
#[derive(Clone)]
pub struct HttpOptions {
    /// Bearer token sent to the manifest's origin only (from `STACK_TOKEN`).
    pub token: Option<String>,
    /// Time allowed to establish a TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Longest silence allowed on a connection while reading (each read restarts it).
    pub read_timeout: Duration,
    /// Extra attempts after the first one for a transient failure.
    pub retries: u32,
    /// First backoff delay; doubled on each retry, with jitter.
    pub backoff_base: Duration,
    /// Upper bound of one backoff delay.
    pub backoff_max: Duration,
    /// Upper bound of a server's `Retry-After`.
    pub retry_after_cap: Duration,
    /// Hard cap on requests in flight (the pull's `--jobs`); also the size of the
    /// connection pool, so that every worker keeps its connection.
    pub jobs: usize,
    /// The proxies requests go through (see [`Proxies::from_env`]).
    pub proxies: Proxies,
    /// Optional progress hook.
    pub progress: Option<Progress>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            token: None,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            retries: 4,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            retry_after_cap: Duration::from_secs(30),
            jobs: DEFAULT_JOBS,
            proxies: Proxies::none(),
            progress: None,
        }
    }
}

impl HttpOptions {
    /// Defaults, with the token taken from `STACK_TOKEN` (an empty value means none)
    /// and the proxies from the proxy variables. A proxy variable stack cannot use
    /// is a usage error.
    pub fn from_env() -> Result<Self> {
        Ok(HttpOptions {
            token: std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()),
            proxies: Proxies::from_env()?,
            ..HttpOptions::default()
        })
    }
}

impl fmt::Debug for HttpOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpOptions")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("retries", &self.retries)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .field("retry_after_cap", &self.retry_after_cap)
            .field("jobs", &self.jobs)
            .field("proxies", &self.proxies)
            .field("progress", &self.progress.as_ref().map(|_| "<fn>"))
            .finish()
    }
}

/// scheme://host:port of the manifest: the origin `/api/...` URLs resolve against and
/// the only one that receives the token.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Base {
    scheme: String,
    /// Lowercase host (brackets kept for IPv6).
    host: String,
    port: u16,
    /// The authority as the manifest URL spelled it (used to build URLs).
    authority: String,
}

impl Base {
    fn parse(url: &str) -> std::result::Result<Base, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("URL {url:?} is not a valid URL: {e}"))?;
        let scheme = uri
            .scheme_str()
            .map(str::to_ascii_lowercase)
            .ok_or_else(|| format!("URL {url:?} has no scheme"))?;
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => {
                return Err(format!(
                    "URL {url:?} has scheme {scheme:?}; only http and https are allowed"
                ))
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("URL {url:?} has no host"))?;
        if authority.host().is_empty() {
            return Err(format!("URL {url:?} has no host"));
        }
        Ok(Base {
            host: authority.host().to_ascii_lowercase(),
            port: authority.port_u16().unwrap_or(default_port),
            authority: authority.as_str().to_string(),
            scheme,
        })
    }

    fn same_origin(&self, other: &Base) -> bool {
        self.scheme == other.scheme && self.host == other.host && self.port == other.port
    }
}

/// A URL of the manifest resolved to what is requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The absolute URL requested.
    pub url: String,
    /// Whether the request goes to the manifest's origin (and so carries the token).
    pub same_origin: bool,
}

/// The origin of a manifest fetched over HTTP(S).
pub struct HttpOrigin {
    manifest_url: String,
    base: Base,
    opts: HttpOptions,
    /// Requests to `http://` targets: these agents trust no CA at all.
    plain: Agents,
    /// Requests to `https://` targets, made on the first one: reading the trust
    /// store (a hundred files and more, 20 ms here) is for pulls that use TLS.
    /// A trust store that cannot be read is kept as its message.
    tls: OnceLock<std::result::Result<Agents, String>>,
    /// The direct connections' warm sockets, shared by both sets of agents.
    warm: Arc<Warm>,
    window: Window,
    /// Where large bodies are hashed, in lock step.
    lanes: LockStep,
}

/// The agents for one scheme: direct, and through the proxy for it (each its
/// own connection pool).
struct Agents {
    direct: ureq::Agent,
    via_proxy: Option<ureq::Agent>,
}

impl Agents {
    /// Agents that trust `roots`, the one through `proxy` (the scheme's) too;
    /// direct connections take `warm`'s sockets.
    fn new(
        opts: &HttpOptions,
        roots: ureq::tls::RootCerts,
        warm: &Arc<Warm>,
        proxy: Option<&ureq::Proxy>,
    ) -> Agents {
        let config = |proxy: Option<&ureq::Proxy>| -> ureq::config::Config {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_connect(Some(opts.connect_timeout))
                .timeout_per_read(Some(opts.read_timeout))
                .timeout_recv_response(Some(opts.read_timeout))
                // Redirects are followed here (`HttpOrigin::get`), where the token
                // rule is decided by origin, scheme and port.
                .max_redirects(0)
                .redirect_auth_headers(ureq::config::RedirectAuthHeaders::Never)
                .user_agent(concat!("stack/", env!("CARGO_PKG_VERSION")))
                // Byte ranges, Content-Length and md5 are about the stored bytes: ask
                // for them as they are, even if a feature elsewhere in the build
                // enables ureq's decompression.
                .accept_encoding("identity")
                // One idle connection kept per worker: a file costs a request, not
                // a new TCP (and TLS) handshake.
                .max_idle_connections(opts.jobs.max(1))
                .max_idle_connections_per_host(opts.jobs.max(1))
                .proxy(proxy.cloned())
                .tls_config(
                    ureq::tls::TlsConfig::builder()
                        .root_certs(roots.clone())
                        .build(),
                )
                .build()
        };
        // Direct connections: ureq's TCP and TLS connectors, with warm sockets
        // handed out before the first and the warm-up started after the last.
        let connector = Provide(Arc::clone(warm))
            .chain(Timed::new(TcpConnector::default()))
            .chain(RustlsConnector::default())
            .chain(Trigger(Arc::clone(warm)));
        let direct = ureq::Agent::with_parts(config(None), connector, DefaultResolver::default());
        Agents {
            direct,
            via_proxy: proxy.map(|p| ureq::Agent::from(config(Some(p)))),
        }
    }
}

impl fmt::Debug for HttpOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpOrigin")
            .field("manifest_url", &self.manifest_url)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// Why one attempt failed.
enum Failure {
    /// Worth retrying (network trouble, 5xx, 408, 429, body cut short).
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Will fail the same way again; `status` is the HTTP status if there was one.
    Permanent {
        message: String,
        status: Option<u16>,
    },
    /// The local filesystem failed: propagated untouched (it may be a simulated crash).
    Local(Error),
    /// A redirect to `https://` with no usable trust store: the user's set-up.
    /// The manifest's is a usage error (nothing was touched yet); a table's
    /// fails that table.
    Untrusted(String),
}

impl Failure {
    fn transient(message: impl Into<String>) -> Failure {
        Failure::Transient {
            message: message.into(),
            retry_after: None,
        }
    }
}

/// A download's progress so far: `written` bytes are in `part` and `hasher` has
/// seen exactly them; `inherited` says some of them predate this fetch. A chunk
/// is hashed as it is read, before it is written: when the write fails, the
/// hasher is one chunk ahead, which is why a local failure ends the fetch and is
/// never retried with the same `Partial` ([`HttpOrigin::with_retries`]).
struct Partial<'o> {
    written: u64,
    hasher: BodyHash<'o>,
    inherited: bool,
}

/// The md5 of a download as its bytes arrive: on its own, or in a lane of the
/// origin's [`LockStep`] when the body is large (hashing is most of a large
/// download's CPU; concurrent bodies hashed in lock step cost a fraction).
enum BodyHash<'o> {
    One(Md5),
    Lane(Lane<'o>),
}

/// How a body's bytes are read: where each chunk lands, and what sees it.
trait Chunks {
    /// Read the next chunk from `reader` (empty at the end).
    fn next<'b>(&'b mut self, reader: &mut dyn Read, buf: &'b mut [u8]) -> io::Result<&'b [u8]>;
}

/// Chunks read into the caller's buffer and seen by nobody (the manifest).
struct Plain;

impl Chunks for Plain {
    fn next<'b>(&'b mut self, reader: &mut dyn Read, buf: &'b mut [u8]) -> io::Result<&'b [u8]> {
        let n = reader.read(buf)?;
        Ok(&buf[..n])
    }
}

impl Chunks for BodyHash<'_> {
    /// A lane's chunks are read into the lane's own window, where they are
    /// hashed later: no copy. Others are read into `buf` and hashed now.
    fn next<'b>(&'b mut self, reader: &mut dyn Read, buf: &'b mut [u8]) -> io::Result<&'b [u8]> {
        match self {
            BodyHash::One(h) => {
                let n = reader.read(buf)?;
                h.update(&buf[..n]);
                Ok(&buf[..n])
            }
            BodyHash::Lane(l) => l.read_from(reader),
        }
    }
}

impl<'o> Partial<'o> {
    fn empty() -> Partial<'o> {
        Partial {
            written: 0,
            hasher: BodyHash::One(Md5::new()),
            inherited: false,
        }
    }

    /// An empty download of a body of `len` bytes (if known): hashed in a lane
    /// of `lanes` when it is large and a lane is free.
    fn for_body(lanes: &'o LockStep, len: Option<u64>) -> Partial<'o> {
        match len
            .filter(|&n| n >= LANE_MIN_BYTES)
            .and_then(|_| lanes.lane())
        {
            Some(lane) => Partial {
                hasher: BodyHash::Lane(lane),
                ..Partial::empty()
            },
            None => Partial::empty(),
        }
    }

    /// Hash what an interrupted pull left in `part` (nothing if it does not exist).
    fn load(fs: &dyn Fs, part: &Path) -> Result<Partial<'o>> {
        match fs.metadata(part) {
            Ok(m) if m.len > 0 => {}
            Ok(_) => return Ok(Partial::empty()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Partial::empty()),
            Err(e) => return Err(e).at("stat", part),
        }
        let r = fs.open_read(part).at("open", part)?;
        let mut md5 = Md5::new();
        let written = crate::reconcile::origin::hash_reader(r, &mut md5).at("read", part)?;
        Ok(Partial {
            written,
            hasher: BodyHash::One(md5),
            inherited: written > 0,
        })
    }

    fn md5(&mut self) -> String {
        match &mut self.hasher {
            BodyHash::One(h) => hex(&h.clone().finalize()),
            BodyHash::Lane(l) => hex(&l.digest()),
        }
    }
}

impl HttpOrigin {
    /// An origin for the manifest at `manifest_url` (`http://` or `https://`).
    /// Anything else is a usage error.
    pub fn new(manifest_url: &str, opts: HttpOptions) -> Result<Self> {
        let base = Base::parse(manifest_url).map_err(|m| Error::Usage(format!("manifest {m}")))?;
        if let Some(token) = &opts.token {
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Error::Usage(format!(
                    "{TOKEN_ENV} must be non-empty printable ASCII without spaces"
                )));
            }
        }
        let warm = Warm::new(
            INITIAL_WINDOW.min(opts.jobs).saturating_sub(1),
            opts.connect_timeout,
        );
        // An `http://` target needs no CA, unless its proxy is reached over TLS.
        let http_proxy = opts.proxies.http.as_ref().map(|(_, p)| p);
        let plain_roots = match http_proxy.map(ureq::Proxy::protocol) {
            Some(ureq::ProxyProtocol::Https) => netenv::trust_roots()?,
            _ => ureq::tls::RootCerts::Specific(Arc::new(Vec::new())),
        };
        let origin = HttpOrigin {
            manifest_url: manifest_url.to_string(),
            plain: Agents::new(&opts, plain_roots, &warm, http_proxy),
            tls: OnceLock::new(),
            warm,
            window: Window::new(opts.jobs),
            lanes: LockStep::new(),
            base,
            opts,
        };
        if origin.base.scheme == "https" {
            // A trust store that cannot be read fails the pull before anything.
            origin.agents("https")?;
        }
        Ok(origin)
    }

    /// The agents for targets of `scheme`; those for `https` are made on the
    /// first call, with the trust store read then.
    fn agents(&self, scheme: &str) -> Result<&Agents> {
        if scheme != "https" {
            return Ok(&self.plain);
        }
        let tls = self.tls.get_or_init(|| {
            netenv::trust_roots()
                .map(|roots| {
                    let proxy = self.opts.proxies.https.as_ref().map(|(_, p)| p);
                    Agents::new(&self.opts, roots, &self.warm, proxy)
                })
                .map_err(|e| match e {
                    Error::Usage(m) => m,
                    other => other.to_string(),
                })
        });
        tls.as_ref().map_err(|m| Error::Usage(m.clone()))
    }

    /// The request window (how many requests may be in flight now).
    pub fn window(&self) -> usize {
        self.window.current()
    }

    /// The manifest URL this origin was made for.
    pub fn manifest_url(&self) -> &str {
        &self.manifest_url
    }

    /// The options in use.
    pub fn options(&self) -> &HttpOptions {
        &self.opts
    }

    /// Resolve a URL from the manifest (contract §1): `/api/...` against the
    /// manifest's scheme://host:port, absolute `http(s)://` URLs as they are. Other
    /// schemes (`file://` above all), relative paths and paths that climb out of the
    /// origin (`..`, also percent-encoded) are refused with a message naming the URL.
    pub fn resolve_url(&self, url: &str) -> std::result::Result<Resolved, String> {
        if url.starts_with("//") {
            return Err(format!(
                "URL {url:?} is scheme-relative; give /path or http(s)://host/path"
            ));
        }
        if url.starts_with('/') {
            origin_relative(url)?;
            check_path(url, url)?;
            return Ok(Resolved {
                url: format!("{}://{}{}", self.base.scheme, self.base.authority, url),
                same_origin: true,
            });
        }
        let lower = url.to_ascii_lowercase();
        if !(lower.starts_with("http://") || lower.starts_with("https://")) {
            return Err(match url.split_once(':') {
                Some((scheme, _)) if !scheme.is_empty() && !scheme.contains('/') => format!(
                    "URL {url:?} has scheme {scheme:?}; a manifest fetched over HTTP may only \
                     name /paths or http(s):// URLs"
                ),
                _ => format!("URL {url:?} is relative; give /path or http(s)://host/path"),
            });
        }
        let base = Base::parse(url)?;
        let path_start = url
            .find("://")
            .and_then(|i| url[i + 3..].find('/').map(|j| i + 3 + j));
        if let Some(start) = path_start {
            check_path(url, &url[start..])?;
        }
        Ok(Resolved {
            url: url.to_string(),
            same_origin: base.same_origin(&self.base),
        })
    }

    /// Download the manifest itself, with the retry policy of every download.
    /// A 4xx other than 408/429 is [`Error::Usage`] (exit 2); failures that outlast
    /// the retries are [`Error::Fetch`].
    pub fn fetch_manifest(&self) -> Result<Vec<u8>> {
        let target = Resolved {
            url: self.manifest_url.clone(),
            same_origin: true,
        };
        let result = self.with_retries(|| {
            let resp = self.get(&target, None)?;
            let status = resp.status().as_u16();
            if !(200..300).contains(&status) || status == 206 {
                return Err(status_failure(&resp));
            }
            let expected = resp.body().content_length();
            if expected.is_some_and(|n| n > MAX_MANIFEST_BYTES) {
                return Err(Failure::Permanent {
                    message: format!("manifest is larger than {MAX_MANIFEST_BYTES} bytes"),
                    status: None,
                });
            }
            let mut reader = resp.into_body().into_reader();
            let mut out = Vec::new();
            self.stream_body(&mut reader, expected, &mut Plain, |chunk| {
                if out.len() as u64 + chunk.len() as u64 > MAX_MANIFEST_BYTES {
                    return Err(Failure::Permanent {
                        message: format!("manifest is larger than {MAX_MANIFEST_BYTES} bytes"),
                        status: None,
                    });
                }
                out.extend_from_slice(chunk);
                Ok(())
            })?;
            Ok(out)
        });
        result.map_err(|f| match f {
            Failure::Local(e) => e,
            Failure::Permanent {
                message,
                status: Some(s),
            } if (400..500).contains(&s) => Error::Usage(self.redact(format!(
                "manifest URL {}: {message}{}",
                self.manifest_url,
                if matches!(s, 401 | 403) {
                    format!(" (check {TOKEN_ENV})")
                } else {
                    String::new()
                }
            ))),
            Failure::Untrusted(message) => {
                Error::Usage(self.redact(format!("manifest URL {}: {message}", self.manifest_url)))
            }
            Failure::Permanent { message, .. } | Failure::Transient { message, .. } => {
                Error::Fetch {
                    what: "manifest".to_string(),
                    message: self.redact(format!("GET {}: {message}", self.manifest_url)),
                    source: None,
                }
            }
        })
    }

    /// Send one GET, following redirects: the token goes with every hop that stays
    /// within the manifest's origin (scheme, host and port), never to another.
    fn get(
        &self,
        target: &Resolved,
        range_from: Option<u64>,
    ) -> std::result::Result<Response<ureq::Body>, Failure> {
        let mut url = target.url.clone();
        let mut same_origin = target.same_origin;
        for _ in 0..=MAX_REDIRECTS {
            let hop = Base::parse(&url).map_err(|m| Failure::Permanent {
                message: format!("redirected to {m}"),
                status: None,
            })?;
            let proxy = self.opts.proxies.for_target(&hop.scheme, &hop.host);
            // Every URL of the manifest was checked by `resolve`; a redirect to
            // https:// without a usable trust store fails this item.
            let agents = self
                .agents(&hop.scheme)
                .map_err(|e| Failure::Untrusted(format!("{url} is served over TLS, and {e}")))?;
            let agent = match proxy {
                None => &agents.direct,
                Some(_) => agents.via_proxy.as_ref().unwrap_or(&agents.direct),
            };
            let mut req = agent.get(url.as_str());
            // Through a proxy, only a TLS tunnel keeps the token from the proxy.
            let token_safe = proxy.is_none() || hop.scheme == "https";
            if same_origin && token_safe {
                if let Some(token) = &self.opts.token {
                    req = req.header("Authorization", format!("Bearer {token}"));
                }
            }
            if let Some(from) = range_from {
                req = req.header("Range", format!("bytes={from}-"));
            }
            let resp = req.call().map_err(|e| classify(e, &hop.host))?;
            let status = resp.status().as_u16();
            if !matches!(status, 301 | 302 | 303 | 307 | 308) {
                if same_origin && !token_safe && self.opts.token.is_some() {
                    if let (401 | 403, Some((var, _))) = (status, proxy) {
                        return Err(Failure::Permanent {
                            message: format!(
                                "{} ({TOKEN_ENV} is not sent to a plain http:// origin \
                                 through the proxy in {var}: use https://, or put the \
                                 host in NO_PROXY)",
                                status_message(&resp)
                            ),
                            status: Some(status),
                        });
                    }
                }
                return Ok(resp);
            }
            let Some(location) = resp.headers().get("location").and_then(|v| v.to_str().ok())
            else {
                return Ok(resp);
            };
            url = join_location(&url, &hop, location.trim());
            same_origin = Base::parse(&url).is_ok_and(|b| b.same_origin(&self.base));
        }
        Err(Failure::Permanent {
            message: format!("more than {MAX_REDIRECTS} redirects"),
            status: None,
        })
    }

    /// Run `attempt`, each time inside the request window, until it succeeds,
    /// fails for good, or the retries are spent. A transient failure shrinks the
    /// window; one that happened while other requests of ours were in flight is
    /// the server asking for fewer at once and draws on [`CONTENDED_RETRIES`]
    /// before the item's own retries.
    fn with_retries<T>(
        &self,
        mut attempt: impl FnMut() -> std::result::Result<T, Failure>,
    ) -> std::result::Result<T, Failure> {
        let mut failures = 0u32;
        let mut contended = 0u32;
        loop {
            let permit = self.window.acquire();
            slow_connect_seen(); // only this attempt's connections count
            let result = attempt();
            // A connection that lost its SYN is the server's accept queue
            // overflowing: fewer requests at once, whatever came of this one.
            // Told at the end of a long download, it is news of another time.
            let slow_connect = slow_connect_seen().is_some_and(|at| at.elapsed() < LATE_SIGNAL);
            if slow_connect {
                permit.lost_handshake();
            }
            match result {
                Ok(v) => {
                    if !slow_connect {
                        permit.succeeded();
                    }
                    return Ok(v);
                }
                Err(Failure::Transient {
                    message,
                    retry_after,
                }) => {
                    permit.overloaded();
                    let was_contended = permit.contended;
                    drop(permit);
                    if was_contended && contended < CONTENDED_RETRIES {
                        contended += 1;
                        std::thread::sleep(self.delay(failures.max(1), retry_after));
                        continue;
                    }
                    failures += 1;
                    if failures > self.opts.retries {
                        return Err(Failure::Transient {
                            message: format!(
                                "{message} (gave up after {} attempt{})",
                                failures + contended,
                                if failures + contended == 1 { "" } else { "s" }
                            ),
                            retry_after: None,
                        });
                    }
                    std::thread::sleep(self.delay(failures, retry_after));
                }
                Err(other) => return Err(other),
            }
        }
    }

    /// How long to wait before retry number `n` (1-based).
    fn delay(&self, n: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(ra) = retry_after {
            return ra.min(self.opts.retry_after_cap);
        }
        let exp = self
            .opts
            .backoff_base
            .saturating_mul(1u32 << (n.saturating_sub(1)).min(20))
            .min(self.opts.backoff_max);
        // "Equal jitter": half the delay fixed, half random, so that clients that
        // failed together do not retry together.
        let half = exp / 2;
        half + half.mul_f64(random_unit())
    }

    /// Read a body chunk by chunk (through `chunks`), handing each chunk to
    /// `sink`, and check it against the announced length. Returns the number
    /// of bytes read.
    fn stream_body(
        &self,
        reader: &mut impl Read,
        expected: Option<u64>,
        chunks: &mut impl Chunks,
        mut sink: impl FnMut(&[u8]) -> std::result::Result<(), Failure>,
    ) -> std::result::Result<u64, Failure> {
        let mut buf = vec![0u8; BUF_SIZE];
        let mut got = 0u64;
        loop {
            let chunk = match chunks.next(reader, &mut buf) {
                Ok([]) => break,
                Ok(chunk) => chunk,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Failure::transient(match expected {
                        Some(len) => format!("body cut short after {got} of {len} bytes: {e}"),
                        None => format!("body cut short after {got} bytes: {e}"),
                    }))
                }
            };
            let n = chunk.len() as u64;
            sink(chunk)?;
            got += n;
            if let Some(progress) = &self.opts.progress {
                progress(n);
            }
        }
        match expected {
            Some(len) if got < len => Err(Failure::transient(format!(
                "body shorter than its Content-Length: {got} of {len} bytes"
            ))),
            _ => Ok(got),
        }
    }

    /// One download attempt: request (with `Range` if bytes are already there),
    /// then stream into `part`. Returns the md5 of the whole file.
    fn attempt<'o>(
        &'o self,
        fs: &dyn Fs,
        target: &Resolved,
        part: &Path,
        st: &mut Partial<'o>,
        fetched: &mut u64,
    ) -> std::result::Result<String, Failure> {
        let range_from = (st.written > 0).then_some(st.written);
        let resp = self.get(target, range_from)?;
        let status = resp.status().as_u16();
        let mut w: Box<dyn FileWrite> = match (status, range_from) {
            (200, _) => {
                // A full body: start over (also when the server ignored our Range).
                *st = Partial::for_body(&self.lanes, resp.body().content_length());
                fs.create(part).at("create", part).map_err(Failure::Local)?
            }
            (206, Some(from)) => match content_range(resp.headers()) {
                Some(ContentRange::Bytes { start, .. }) if start == from => fs
                    .open_append(part)
                    .at("open", part)
                    .map_err(Failure::Local)?,
                other => {
                    // Not the range we asked for: start over from zero next time.
                    *st = Partial::empty();
                    return Err(Failure::transient(format!(
                        "asked for bytes {from}- but the server answered 206 with {}",
                        describe_range(other.as_ref())
                    )));
                }
            },
            (416, Some(from)) => {
                return match content_range(resp.headers()) {
                    Some(ContentRange::Unsatisfied { total }) if total == from => Ok(st.md5()),
                    _ => {
                        // The partial file is longer than the resource: start over.
                        *st = Partial::empty();
                        Err(Failure::transient(format!(
                            "range bytes={from}- not satisfiable; restarting from zero"
                        )))
                    }
                };
            }
            _ => return Err(status_failure(&resp)),
        };
        let expected = resp.body().content_length();
        let mut reader = resp.into_body().into_reader();
        let result = self.stream_body(&mut reader, expected, &mut st.hasher, |chunk| {
            w.write_all(chunk)
                .at("write", part)
                .map_err(Failure::Local)?;
            st.written += chunk.len() as u64;
            *fetched += chunk.len() as u64;
            Ok(())
        });
        // Flush what was written even when the body failed: a retry resumes from it.
        let flushed = w.flush().at("write", part).map_err(Failure::Local);
        result?;
        flushed?;
        Ok(st.md5())
    }

    /// Scrub the token from a message (defense in depth: no message is built from
    /// it, but a server or library could echo it back).
    fn redact(&self, message: String) -> String {
        match &self.opts.token {
            Some(t) if !t.is_empty() && message.contains(t.as_str()) => {
                message.replace(t.as_str(), "<redacted>")
            }
            _ => message,
        }
    }

    fn fetch_error(&self, req: &Request<'_>, url: &str, f: Failure) -> Error {
        match f {
            Failure::Local(e) => e,
            Failure::Permanent { message, .. }
            | Failure::Transient { message, .. }
            | Failure::Untrusted(message) => Error::Fetch {
                what: req.item.describe(),
                message: self.redact(format!("GET {url}: {message}")),
                source: None,
            },
        }
    }
}

/// Download the manifest at `url` (see [`HttpOrigin::fetch_manifest`]).
pub fn fetch_manifest(url: &str, opts: &HttpOptions) -> Result<Vec<u8>> {
    HttpOrigin::new(url, opts.clone())?.fetch_manifest()
}

impl Origin for HttpOrigin {
    fn resumes(&self) -> bool {
        true
    }

    fn resolve(&self, url: &str) -> std::result::Result<(), String> {
        let target = self.resolve_url(url)?;
        // A target behind TLS needs the trust store: one that cannot be read
        // fails the pull here, before anything is fetched or written.
        let tls = target
            .url
            .get(..6)
            .is_some_and(|s| s.eq_ignore_ascii_case("https:"));
        if tls {
            self.agents("https")
                .map_err(|e| format!("{} is served over TLS, and {e}", target.url))?;
        }
        Ok(())
    }

    fn fetch(&self, fs: &dyn Fs, req: &Request<'_>, part: &Path) -> Result<Fetched> {
        let target = self.resolve_url(req.url).map_err(Error::BadManifest)?;
        let mut st = Partial::load(fs, part)?;
        if let Some(size) = req.size {
            if st.written == size && st.md5() == req.md5 {
                // An earlier pull got every byte but did not commit.
                return Ok(Fetched {
                    md5: st.md5(),
                    bytes_fetched: 0,
                });
            }
            if st.written >= size {
                st = Partial::empty();
            }
        }
        let mut fetched = 0u64;
        let mut md5 = self
            .with_retries(|| self.attempt(fs, &target, part, &mut st, &mut fetched))
            .map_err(|f| self.fetch_error(req, &target.url, f))?;
        if st.inherited && md5 != req.md5 {
            // The bytes kept from an earlier pull may be what is wrong: one more
            // try from zero before reporting a checksum mismatch.
            st = Partial::empty();
            md5 = self
                .with_retries(|| self.attempt(fs, &target, part, &mut st, &mut fetched))
                .map_err(|f| self.fetch_error(req, &target.url, f))?;
        }
        Ok(Fetched {
            md5,
            bytes_fetched: fetched,
        })
    }
}

/// Refuse a path that climbs out of the origin, percent-encoded or not.
fn check_path(url: &str, path: &str) -> std::result::Result<(), String> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let decoded = percent_decode(path);
    let escapes = |p: &str| p.split(['/', '\\']).any(|seg| seg == "..");
    if escapes(path) || escapes(&decoded) {
        return Err(format!("URL {url:?} resolves outside the origin"));
    }
    Ok(())
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hexval = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hexval(bytes[i + 1]), hexval(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A parsed `Content-Range` header.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ContentRange {
    /// `bytes start-end/total` (`total` is `None` for `*`).
    Bytes {
        start: u64,
        end: u64,
        total: Option<u64>,
    },
    /// `bytes */total` (on a 416).
    Unsatisfied { total: u64 },
}

fn content_range(headers: &HeaderMap) -> Option<ContentRange> {
    let v = headers.get("content-range")?.to_str().ok()?.trim();
    let rest = v.strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    if range.trim() == "*" {
        return Some(ContentRange::Unsatisfied {
            total: total.trim().parse().ok()?,
        });
    }
    let (start, end) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some(ContentRange::Bytes {
        start: start.trim().parse().ok()?,
        end: end.trim().parse().ok()?,
        total,
    })
}

fn describe_range(r: Option<&ContentRange>) -> String {
    match r {
        Some(ContentRange::Bytes { start, end, total }) => match total {
            Some(t) => format!("Content-Range bytes {start}-{end}/{t}"),
            None => format!("Content-Range bytes {start}-{end}/*"),
        },
        Some(ContentRange::Unsatisfied { total }) => format!("Content-Range bytes */{total}"),
        None => "no usable Content-Range".to_string(),
    }
}

/// `HTTP 404 Not Found`.
fn status_message(resp: &Response<ureq::Body>) -> String {
    let status = resp.status();
    match status.canonical_reason() {
        Some(reason) => format!("HTTP {} {reason}", status.as_u16()),
        None => format!("HTTP {}", status.as_u16()),
    }
}

/// The failure a non-success status means.
fn status_failure(resp: &Response<ureq::Body>) -> Failure {
    let code = resp.status().as_u16();
    let message = status_message(resp);
    if code == 408 || code == 429 || (500..600).contains(&code) {
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        Failure::Transient {
            message,
            retry_after,
        }
    } else {
        Failure::Permanent {
            message,
            status: Some(code),
        }
    }
}

/// The `Location` of a redirect from `url` (whose parts are `hop`), made absolute.
fn join_location(url: &str, hop: &Base, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    if let Some(rest) = location.strip_prefix("//") {
        return format!("{}://{rest}", hop.scheme);
    }
    if location.starts_with('/') {
        return format!("{}://{}{location}", hop.scheme, hop.authority);
    }
    // Relative to the current path's folder.
    let path_start = url.find("://").map(|i| i + 3).unwrap_or(0);
    let no_query = url.split(['?', '#']).next().unwrap_or(url);
    match no_query[path_start..].rfind('/') {
        Some(j) => format!("{}{location}", &no_query[..path_start + j + 1]),
        None => format!("{no_query}/{location}"),
    }
}

/// The certificate problem inside a transport error, if that is what it is.
fn certificate_error(e: &ureq::Error) -> Option<&rustls::Error> {
    let r = match e {
        ureq::Error::Rustls(r) => r,
        ureq::Error::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>()?,
        _ => return None,
    };
    matches!(
        r,
        rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::UnsupportedNameType
    )
    .then_some(r)
}

/// Sort a transport error into worth-retrying or not. A certificate the trust
/// store rejects is permanent, and its message says how to trust the right CA.
fn classify(e: ureq::Error, host: &str) -> Failure {
    if let Some(cert) = certificate_error(&e) {
        return Failure::Permanent {
            message: format!(
                "the TLS certificate of {host} is not trusted ({cert}); if a private or \
                 corporate CA signed it, point stack at that CA with \
                 SSL_CERT_FILE=/path/to/ca.pem (or SSL_CERT_DIR=/path/to/certs)"
            ),
            status: None,
        };
    }
    match e {
        ureq::Error::Io(_)
        | ureq::Error::Timeout(_)
        | ureq::Error::HostNotFound
        | ureq::Error::ConnectionFailed
        | ureq::Error::Protocol(_) => Failure::transient(e.to_string()),
        other => Failure::Permanent {
            message: other.to_string(),
            status: None,
        },
    }
}

/// A uniformly distributed number in [0, 1), from std's randomly keyed hasher.
fn random_unit() -> f64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_range() {
        let mut h = HeaderMap::new();
        h.insert("content-range", "bytes 10-99/100".parse().unwrap());
        assert_eq!(
            content_range(&h),
            Some(ContentRange::Bytes {
                start: 10,
                end: 99,
                total: Some(100)
            })
        );
        h.insert("content-range", "bytes */100".parse().unwrap());
        assert_eq!(
            content_range(&h),
            Some(ContentRange::Unsatisfied { total: 100 })
        );
        h.insert("content-range", "items 1-2/3".parse().unwrap());
        assert_eq!(content_range(&h), None);
    }

    #[test]
    fn percent_encoded_dots_are_refused() {
        assert!(check_path("x", "/api/%2e%2e/%2E%2e/etc/passwd").is_err());
        assert!(check_path("x", "/api/..%2fetc").is_err());
        assert!(check_path("x", "/api/data/a%20b/download?x=..").is_ok());
        assert_eq!(percent_decode("a%2"), "a%2");
    }

    #[test]
    fn redirect_locations_are_made_absolute() {
        let url = "https://h:8443/api/data/t/download?x=1";
        let hop = Base::parse(url).unwrap();
        let join = |loc| join_location(url, &hop, loc);
        assert_eq!(join("http://other/b"), "http://other/b");
        assert_eq!(join("//cdn.example/b"), "https://cdn.example/b");
        assert_eq!(join("/blob/t"), "https://h:8443/blob/t");
        assert_eq!(join("v2"), "https://h:8443/api/data/t/v2");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let o = HttpOrigin::new(
            "http://h/m.json",
            HttpOptions {
                backoff_base: Duration::from_millis(100),
                backoff_max: Duration::from_millis(1000),
                ..HttpOptions::default()
            },
        )
        .unwrap();
        let d1 = o.delay(1, None);
        assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
        let d3 = o.delay(3, None);
        assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
        assert!(o.delay(30, None) <= Duration::from_millis(1000));
        assert_eq!(
            o.delay(1, Some(Duration::from_secs(3600))),
            Duration::from_secs(30)
        );
    }
}
