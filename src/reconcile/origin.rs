//! Origins: where a manifest's tables and bundles come from.
//!
//! Owns: the [`Origin`] trait (the one seam between the engine and any server),
//! URL resolution against a manifest's origin (contract §1), the local-folder origin
//! and the adapter for the library API's injected closures.
//!
//! Invariants kept: an origin writes only to the partial path the engine gives it,
//! through the engine's [`Fs`]; a URL that would resolve outside the origin is
//! refused by [`Origin::resolve`] before anything is touched.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use md5::{Digest, Md5};

use crate::error::{Error, IoContext, Result};
use crate::fs::Fs;

/// What is being fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A table, by id.
    Table { id: String },
    /// A memory bundle, by domain slug.
    Bundle { slug: String },
}

impl Item {
    pub fn describe(&self) -> String {
        match self {
            Item::Table { id } => format!("table {id}"),
            Item::Bundle { slug } => format!("memory bundle {slug}"),
        }
    }
}

/// One download request.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub item: &'a Item,
    /// The URL exactly as the manifest gave it (after [`Origin::resolve`] accepted it).
    pub url: &'a str,
    /// The md5 the manifest promises (partial downloads are keyed by it).
    pub md5: &'a str,
    /// The size the manifest announces, if any.
    pub size: Option<u64>,
}

/// What a finished download produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// md5 (lowercase hex) of the whole file at `part`.
    pub md5: String,
    /// Bytes transferred over the wire (or read from the origin) by this call.
    pub bytes_fetched: u64,
}

/// A source of tables and bundles.
pub trait Origin: Send + Sync {
    /// Check that `url` is one this origin may fetch (contract §1); an `Err` is a
    /// bad-manifest message naming the URL.
    fn resolve(&self, url: &str) -> std::result::Result<(), String>;
    /// Download `req` into `part` through `fs` (resuming it if the origin can),
    /// returning the md5 of the complete file. Must not sync: the engine makes all
    /// staged files durable at once.
    fn fetch(&self, fs: &dyn Fs, req: &Request<'_>, part: &Path) -> Result<Fetched>;
    /// Can it resume a partial download? One that cannot is handed the staged
    /// file's own name (a crash before the commit point drops it either way), which
    /// saves a rename per file; one that can gets `<md5>.part`, kept across a
    /// rollback for the next pull to resume.
    fn resumes(&self) -> bool {
        false
    }
    /// The whole of a small item (at most [`SMALL`] bytes) as bytes, if this
    /// origin can hand it over at once (a local folder): staging
    /// then writes a batch of them and hashes the batch in lock step
    /// ([`crate::md5x`]). `None`: use [`Origin::fetch`].
    fn read_small(&self, _req: &Request<'_>) -> Option<Result<Vec<u8>>> {
        None
    }
}

/// The largest item [`Origin::read_small`] hands over whole.
pub const SMALL: u64 = 1 << 20;

/// Stream `r` into a new file `part`, hashing on the way (one pass over the bytes).
pub fn stream_to_part(fs: &dyn Fs, mut r: impl Read, part: &Path) -> Result<Fetched> {
    let mut w = fs.create(part).at("create", part)?;
    let mut hasher = Md5::new();
    with_buffer(|buf| {
        let mut total = 0u64;
        loop {
            let n = match r.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).at("read", part),
            };
            hasher.update(&buf[..n]);
            w.write_all(&buf[..n]).at("write", part)?;
            total += n as u64;
        }
        w.flush().at("write", part)?;
        Ok(Fetched {
            md5: hex(&hasher.finalize()),
            bytes_fetched: total,
        })
    })
}

/// Run `f` with this thread's 256 KiB copy buffer (one per thread, not one
/// zeroed allocation per file: thousands of small files each paid a memset).
fn with_buffer<T>(f: impl FnOnce(&mut [u8]) -> T) -> T {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.is_empty() {
                buf.resize(256 * 1024, 0);
            }
            f(&mut buf)
        }
        // Re-entered (a reader that itself hashes): a buffer of its own.
        Err(_) => f(&mut vec![0u8; 256 * 1024]),
    })
}

pub use crate::md5x::hex;

/// md5 of a file read through the seam.
pub fn md5_file(fs: &dyn Fs, path: &Path) -> std::io::Result<String> {
    let mut hasher = Md5::new();
    hash_reader(fs.open_read(path)?, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

/// Feed everything `r` yields into `hasher`; returns the byte count.
pub fn hash_reader(mut r: impl Read, hasher: &mut Md5) -> std::io::Result<u64> {
    with_buffer(|buf| {
        let mut total = 0u64;
        loop {
            let n = match r.read(buf) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            total += n as u64;
        }
    })
}

/// Check that an absolute-path URL (`/api/...`) has only normal components and
/// return it relative (`api/...`).
pub fn origin_relative(url: &str) -> std::result::Result<PathBuf, String> {
    let path = url.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') {
        return Err(format!("URL {url:?} is not an absolute path (/api/...)"));
    }
    let rel = Path::new(&path[1..]);
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => return Err(format!("URL {url:?} resolves outside the origin")),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(format!("URL {url:?} names no file"));
    }
    Ok(out)
}

/// A manifest given as a local file: its folder is the origin (contract §1).
#[derive(Debug, Clone)]
pub struct LocalOrigin {
    pub root: PathBuf,
}

impl LocalOrigin {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalOrigin { root: root.into() }
    }
}

impl Origin for LocalOrigin {
    fn resolve(&self, url: &str) -> std::result::Result<(), String> {
        origin_relative(url).map(|_| ())
    }

    fn read_small(&self, req: &Request<'_>) -> Option<Result<Vec<u8>>> {
        let fail = |src: &Path, e: std::io::Error| Error::Fetch {
            what: req.item.describe(),
            message: format!("{}: {e}", src.display()),
            source: Some(e.into()),
        };
        let rel = match origin_relative(req.url) {
            Ok(rel) => rel,
            Err(e) => return Some(Err(Error::BadManifest(e))),
        };
        let src = self.root.join(rel);
        // As in `fetch`: reading the origin is not a mutation of the local
        // directory, so it does not go through the seam. Small by the file's own
        // size (the manifest's may be wrong), and never read past the bound: a
        // file larger than that, or growing, is streamed by `fetch` instead.
        let file = match std::fs::File::open(&src) {
            Ok(f) => f,
            Err(e) => return Some(Err(fail(&src, e))),
        };
        let len = match file.metadata() {
            Ok(m) if m.len() <= SMALL => m.len(),
            Ok(_) => return None,
            Err(e) => return Some(Err(fail(&src, e))),
        };
        let mut bytes = Vec::with_capacity(len as usize + 1);
        match file.take(SMALL + 1).read_to_end(&mut bytes) {
            Ok(_) if bytes.len() as u64 > SMALL => None,
            Ok(_) => Some(Ok(bytes)),
            Err(e) => Some(Err(fail(&src, e))),
        }
    }

    fn fetch(&self, fs: &dyn Fs, req: &Request<'_>, part: &Path) -> Result<Fetched> {
        let rel = origin_relative(req.url).map_err(Error::BadManifest)?;
        let src = self.root.join(rel);
        // Reading the origin is not a mutation of the local directory, so it does
        // not go through the seam (the origin may live on another filesystem).
        let file = std::fs::File::open(&src).map_err(|e| Error::Fetch {
            what: req.item.describe(),
            message: format!("{}: {e}", src.display()),
            source: Some(e.into()),
        })?;
        stream_to_part(fs, file, part)
    }
}

/// `fetcher(url, dest)` of the library API (contract §6).
pub type FetchFn = Box<dyn Fn(&str, &Path) -> std::io::Result<()> + Send + Sync>;
/// `md5_of(path)` of the library API.
pub type Md5Fn = Box<dyn Fn(&Path) -> std::io::Result<String> + Send + Sync>;
/// `bundle_fetcher(slug)` of the library API.
pub type BundleFn = Box<dyn Fn(&str) -> std::io::Result<Vec<u8>> + Send + Sync>;

/// The library API's injected closures, seen as an [`Origin`]. The table fetcher
/// writes to the real path itself, so this origin is for the real filesystem.
pub struct ClosureOrigin<'a> {
    pub fetcher: &'a FetchFn,
    pub md5_of: &'a Md5Fn,
    pub bundle_fetcher: &'a BundleFn,
}

impl Origin for ClosureOrigin<'_> {
    fn resolve(&self, _url: &str) -> std::result::Result<(), String> {
        Ok(())
    }

    fn fetch(&self, fs: &dyn Fs, req: &Request<'_>, part: &Path) -> Result<Fetched> {
        let fetch_err = |e: std::io::Error| Error::fetch_from(req.item.describe(), e);
        match req.item {
            Item::Table { .. } => {
                (self.fetcher)(req.url, part).map_err(fetch_err)?;
                let md5 = (self.md5_of)(part).map_err(fetch_err)?;
                let bytes_fetched = fs.metadata(part).map(|m| m.len).unwrap_or(0);
                Ok(Fetched { md5, bytes_fetched })
            }
            Item::Bundle { slug } => {
                let body = (self.bundle_fetcher)(slug).map_err(fetch_err)?;
                stream_to_part(fs, body.as_slice(), part)
            }
        }
    }
}
