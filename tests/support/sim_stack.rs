//! A stack on the simulated file system, shared by the crash and the fault proofs:
//! deterministic table contents served by md5 from a test origin, manifest builders,
//! and what a user sees of the directory (the state and the tree under `data/` and
//! `memory/`), so that "entirely old or entirely new" is one comparison.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use md5::{Digest, Md5};
use serde_json::{json, Value};
use stack::fs::sim::{SimFs, SnapEntry};
use stack::fs::Fs;
use stack::layout::Layout;
use stack::reconcile::heal::HashFn;
use stack::reconcile::origin::md5_file;
use stack::reconcile::origin::{stream_to_part, Fetched, Origin, Request};
use stack::reconcile::pull::{pull, PullConfig, SyncReport, Wanted};
use stack::replay::state::{read_state, JournalPos};
use stack::{BundleCheck, LinkMode, Manifest, SyncState};

/// Where the simulated stack lives.
pub const ROOT: &str = "/stack";

pub fn layout() -> Layout {
    Layout::new(ROOT)
}

pub fn hexmd5(bytes: &[u8]) -> String {
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn registry() -> &'static Mutex<BTreeMap<String, Vec<u8>>> {
    static R: OnceLock<Mutex<BTreeMap<String, Vec<u8>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// The md5 of version `ver` of `key`, registered with the test origin: the bytes
/// `"<key>:v<ver>\n"` and at least `pad` more, so contents differ per version and
/// copies can be made to take visible space.
pub fn register(key: &str, ver: u64, pad: usize) -> String {
    let mut bytes = format!("{key}:v{ver}\n").into_bytes();
    bytes.extend(std::iter::repeat_n(b'x', pad + (ver as usize * 37) % 200));
    let md5 = hexmd5(&bytes);
    registry().lock().unwrap().insert(md5.clone(), bytes);
    md5
}

/// Serves every registered (key, version) by md5, through `stream_to_part`, so the
/// engine's md5 check of each download is real.
pub struct TestOrigin;

impl Origin for TestOrigin {
    fn resolve(&self, _url: &str) -> Result<(), String> {
        Ok(())
    }
    fn fetch(&self, fs: &dyn Fs, req: &Request<'_>, part: &Path) -> stack::Result<Fetched> {
        stream_to_part(fs, content_of(req)?.as_slice(), part)
    }
    /// About half the items (by md5) are handed over whole, so that staging's
    /// batched path (written, then hashed in lock step) and its streamed path are
    /// both exercised at every instant.
    fn read_small(&self, req: &Request<'_>) -> Option<stack::Result<Vec<u8>>> {
        (req.md5 < "8").then(|| content_of(req))
    }
}

/// The registered bytes a request names.
fn content_of(req: &Request<'_>) -> stack::Result<Vec<u8>> {
    let bytes = registry().lock().unwrap().get(req.md5).cloned();
    bytes.ok_or_else(|| {
        stack::Error::fetch(
            req.item.describe(),
            format!("test origin has no content with md5 {}", req.md5),
        )
    })
}

pub fn table_md5(tid: &str, name: &str, md5: &str) -> Value {
    json!({"id": tid, "name": name, "md5": md5, "query_mode": "local",
           "parquet_url": format!("/api/data/{tid}/download")})
}

pub fn package(slug: &str, tables: Vec<Value>) -> Value {
    json!({"id": format!("id_{slug}"), "slug": slug, "name": slug, "tables": tables})
}

pub fn manifest(direct: Vec<Value>, packages: Vec<Value>, domains: Vec<Value>) -> Value {
    json!({"direct_tables": direct, "data_packages": packages, "memory_domains": domains})
}

/// What a user sees: the state (without fingerprints and journal position) and the
/// tree under `data/` and `memory/`, contents included.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub state: SyncState,
    pub tree: BTreeMap<String, SnapEntry>,
}

pub fn view(fs: &SimFs) -> Result<View, String> {
    let state = match read_state(fs, &layout()) {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => return Err(format!("sync_state.json unreadable: {e}")),
    };
    let mut state = state.without_fingerprints();
    state.journal = JournalPos::default();
    let tree = fs
        .snapshot()
        .into_iter()
        .filter_map(|(p, e)| {
            let rel = p.strip_prefix(ROOT).ok()?.to_string_lossy().into_owned();
            let visible = rel == "data"
                || rel.starts_with("data/")
                || rel == "memory"
                || rel.starts_with("memory/");
            visible.then_some((rel, e))
        })
        .collect();
    Ok(View { state, tree })
}

/// What differs between two views, path by path.
pub fn describe_diff(got: &View, want: &View) -> String {
    let mut out = Vec::new();
    if got.state != want.state {
        out.push("state differs".to_string());
    }
    let keys: BTreeSet<&String> = got.tree.keys().chain(want.tree.keys()).collect();
    for k in keys {
        match (got.tree.get(k), want.tree.get(k)) {
            (Some(a), Some(b)) if a == b => {}
            (Some(_), Some(_)) => out.push(format!("{k}: differs")),
            (Some(_), None) => out.push(format!("{k}: extra")),
            (None, Some(_)) => out.push(format!("{k}: missing")),
            (None, None) => {}
        }
    }
    out.join("; ")
}

/// The engine's own md5 of a file on `fs` (what a pull hashes with when the
/// caller injects no `md5_of`).
pub fn engine_md5(fs: Arc<dyn Fs>) -> impl Fn(&Path) -> std::io::Result<String> + Sync {
    move |p: &Path| md5_file(fs.as_ref(), p)
}

/// Pull manifest `m` into the simulated stack through `fs`, from `origin`, one
/// job at a time, hashing with `hash`.
pub fn pull_sim(
    fs: Arc<dyn Fs>,
    origin: &dyn Origin,
    m: &Value,
    link: LinkMode,
    bundles: BundleCheck,
    hash: HashFn<'_>,
) -> stack::Result<SyncReport> {
    let parsed: Manifest = serde_json::from_value(m.clone()).unwrap();
    let bytes = serde_json::to_vec(&parsed).unwrap();
    let cfg = PullConfig {
        fs,
        layout: layout(),
        origin,
        link,
        jobs: 1,
        dry_run: false,
        wait: false,
        command: "test".to_string(),
        hash,
        bundles,
        progress: &|_| {},
    };
    pull(
        Wanted::Raw {
            bytes: bytes.as_slice().into(),
            origin: "test".into(),
        },
        &cfg,
    )
}
