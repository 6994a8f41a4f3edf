//! `sync_state.json`: the projection of the journal (contract §3).
//!
//! Owns: the serde model of the state file, its atomic replacement, and reading it
//! back. Invariant kept: the file is only ever replaced whole (temp file, fsync,
//! rename, fsync folder), and it is never the source of truth: `replay::project`
//! can always rebuild it from the journal.

use std::collections::BTreeMap;
use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fs::Fs;
use crate::layout::Layout;

/// The state-file format version.
pub const STATE_VERSION: u32 = 1;

/// How a reference was actually made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Symlink,
    Hardlink,
    Copy,
    Reflink,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Symlink => "symlink",
            Strategy::Hardlink => "hardlink",
            Strategy::Copy => "copy",
            Strategy::Reflink => "reflink",
        }
    }
}

/// A stat fingerprint: if any of these changed since the engine wrote the file,
/// its content is re-hashed on the next pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatFp {
    pub size: u64,
    pub mtime_ns: i64,
    pub ino: u64,
}

impl StatFp {
    /// The fingerprint of what `lstat` said of a path.
    pub fn of(m: &crate::fs::Meta) -> StatFp {
        StatFp {
            size: m.len,
            mtime_ns: m.mtime_ns as i64,
            ino: m.ino,
        }
    }
}

/// Where the last applied transaction stands in the journal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalPos {
    pub txn: u64,
    pub seq: u64,
    /// Where the journal ended when this file was written (the fast path's
    /// bookkeeping; absent: unknown). Not part of the projection: the journal's
    /// records alone cannot know their own file's length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<JournalEnd>,
    /// What the pull that wrote this file was asked for (the no-op fast path's
    /// bookkeeping; absent: unknown). Not part of the projection either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pulled: Option<Pulled>,
}

/// The request a committed pull realised: if the next pull names the same manifest
/// bytes, origin and link mode, and the disk is undamaged, its plan is empty and the
/// manifest need not even be parsed (`reconcile::pull`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pulled {
    /// md5 of the manifest's bytes, its origin and the link mode (`Wanted::key`).
    pub key: String,
    /// How many direct and package tables that manifest skipped (not local), for
    /// the report of a pull that does not parse it again.
    #[serde(default)]
    pub skipped_direct: u64,
    #[serde(default)]
    pub skipped_packages: u64,
}

/// The journal's end as a state file saw it. If the journal is still the same file
/// (`ino`) and has exactly `len` bytes, nothing was appended since: recovery may
/// trust the state file without replaying the journal, and a writer continues after
/// `seq` / `txn`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEnd {
    /// The journal's length in bytes.
    pub len: u64,
    /// Its length right after its last compaction (the automatic bound's baseline).
    pub base: u64,
    /// The seq of its last record (which may be an `Aborted`, after `journal.seq`).
    pub seq: u64,
    /// The highest transaction id in it.
    pub txn: u64,
    /// The journal file's inode. A compaction replaces the file (rename over it),
    /// and the new one may have exactly the old one's length (compacting a
    /// compacted journal does, as a rule): the length alone would let a state file
    /// written for the old file be trusted for the new one, and a writer continue
    /// its `seq` from the old end, which breaks the sequence (corruption). 0 in a
    /// file from an engine that did not record it: never trusted, the next
    /// recovery replays once and records it.
    #[serde(default)]
    pub ino: u64,
}

/// One table reference (direct or in a package).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableEntry {
    pub name: String,
    pub md5: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    pub ref_path: String,
    pub shared_path: String,
    pub strategy: Strategy,
    /// Fingerprint of the reference as the engine left it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ref_fp: Option<StatFp>,
    /// Fingerprint of the shared file as the engine left it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_fp: Option<StatFp>,
}

/// One memory domain in the stack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainEntry {
    pub md5: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp: Option<StatFp>,
}

/// The whole state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    pub version: u32,
    #[serde(default)]
    pub journal: JournalPos,
    #[serde(default)]
    pub direct_tables: BTreeMap<String, TableEntry>,
    #[serde(default)]
    pub data_packages: BTreeMap<String, BTreeMap<String, TableEntry>>,
    #[serde(default)]
    pub memory_domains: BTreeMap<String, DomainEntry>,
}

impl Default for SyncState {
    fn default() -> Self {
        SyncState {
            version: STATE_VERSION,
            journal: JournalPos::default(),
            direct_tables: BTreeMap::new(),
            data_packages: BTreeMap::new(),
            memory_domains: BTreeMap::new(),
        }
    }
}

impl SyncState {
    /// Every table entry with its slot, direct tables first, in a stable order.
    pub fn entries(
        &self,
    ) -> impl Iterator<Item = (crate::journal::event::Slot, &str, &TableEntry)> {
        use crate::journal::event::Slot;
        let direct = self
            .direct_tables
            .iter()
            .map(|(id, e)| (Slot::Direct, id.as_str(), e));
        let pkgs = self.data_packages.iter().flat_map(|(slug, tables)| {
            tables
                .iter()
                .map(move |(id, e)| (Slot::Package(slug.clone()), id.as_str(), e))
        });
        direct.chain(pkgs)
    }

    /// The same state with every fingerprint and the journal's end bookkeeping
    /// (`journal.at`) dropped: what the journal's records alone determine.
    pub fn without_fingerprints(&self) -> SyncState {
        let mut s = self.clone();
        for e in s.direct_tables.values_mut() {
            e.ref_fp = None;
            e.shared_fp = None;
        }
        for t in s.data_packages.values_mut() {
            for e in t.values_mut() {
                e.ref_fp = None;
                e.shared_fp = None;
            }
        }
        for d in s.memory_domains.values_mut() {
            d.fp = None;
        }
        s.journal.at = None;
        s.journal.pulled = None;
        s
    }

    /// Check that every id, name and slug is one safe path component and every
    /// path is the one the layout builds from them: a state file edited by hand (or
    /// written by something else) must never point the engine outside the directory.
    pub fn check_paths(&self) -> std::result::Result<(), String> {
        use crate::layout;
        use crate::reconcile::manifest::is_safe_component;
        // Read by every command: compared piece by piece, without building paths.
        fn is(path: &str, parts: &[&str]) -> bool {
            let mut rest = path;
            for p in parts {
                match rest.strip_prefix(p) {
                    Some(r) => rest = r,
                    None => return false,
                }
            }
            rest.is_empty()
        }
        let check = |ref_ok: bool, id: &str, e: &TableEntry| {
            if !is_safe_component(id) || !is_safe_component(&e.name) {
                return Err(format!(
                    "table {id:?} named {:?} is not a safe path component",
                    e.name
                ));
            }
            if !ref_ok || !is(&e.shared_path, &["data/_shared/", id, ".parquet"]) {
                return Err(format!(
                    "table {id}: paths {} / {} are not the engine's",
                    e.ref_path, e.shared_path
                ));
            }
            Ok(())
        };
        for (id, e) in &self.direct_tables {
            let ref_ok = is(&e.ref_path, &["data/_direct/", &e.name, ".parquet"]);
            check(ref_ok, id, e)?;
        }
        for (slug, tables) in &self.data_packages {
            if !is_safe_component(slug) {
                return Err(format!(
                    "package slug {slug:?} is not a safe path component"
                ));
            }
            for (id, e) in tables {
                let ref_ok = is(&e.ref_path, &["data/", slug, "/", &e.name, ".parquet"]);
                check(ref_ok, id, e)?;
            }
        }
        for (slug, d) in &self.memory_domains {
            if !is_safe_component(slug) || d.path != layout::bundle_rel(slug) {
                return Err(format!(
                    "memory domain {slug:?}: path {} is not the engine's",
                    d.path
                ));
            }
        }
        Ok(())
    }
}

/// Read `sync_state.json`. `Ok(None)` if it does not exist; `Err(State)` if it
/// exists but is not a state this build understands (the caller rebuilds it).
pub fn read_state(fs: &dyn Fs, layout: &Layout) -> Result<Option<SyncState>> {
    let path = layout.state_file();
    let unreadable = |e: serde_json::Error| Error::State {
        path: path.clone(),
        message: format!("unreadable state file: {e}"),
    };
    let file = match fs.open_read(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).at("read", &path),
    };
    let len = fs.metadata(&path).map(|m| m.len).unwrap_or(u64::MAX);
    let state = if len <= WHOLE_STATE_MAX {
        // Read whole, then parsed from the slice, its maps on several threads
        // (`parse_state`): a no-op pull of a usual stack is mostly this and stats.
        let mut bytes = Vec::with_capacity(len as usize + 1);
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, WHOLE_STATE_MAX + 1),
            &mut bytes,
        )
        .at("read", &path)?;
        if bytes.len() as u64 > WHOLE_STATE_MAX {
            // Not a regular file of the size it said (a device, a file growing):
            // unreadable, and rebuilt from the journal, rather than read forever.
            return Err(Error::State {
                path,
                message: "unreadable state file: it is larger than its size".to_string(),
            });
        }
        parse_state(&bytes).map_err(unreadable)?
    } else {
        // A very large stack: streamed, so that its text and its structs are not
        // held at once; then its maps are rebuilt full (parsing inserts in key
        // order, which leaves tree nodes half empty).
        let reader = std::io::BufReader::with_capacity(256 * 1024, file);
        let mut state: SyncState = serde_json::from_reader(reader).map_err(|e| {
            if e.is_io() {
                // A disk that fails a read is an I/O error, never an unreadable state.
                Error::Io {
                    op: "read",
                    path: path.clone(),
                    source: e.into(),
                }
            } else {
                unreadable(e)
            }
        })?;
        crate::replay::project::compact_maps(&mut state);
        state
    };
    if state.version != STATE_VERSION {
        return Err(Error::State {
            path,
            message: format!("state version {} is not {}", state.version, STATE_VERSION),
        });
    }
    Ok(Some(state))
}

/// State files up to this size are read whole and parsed in parallel; larger ones
/// are streamed (memory before speed: about 25,000 references).
const WHOLE_STATE_MAX: u64 = 8 << 20;

/// The state file's text, split at its table maps (each kept as raw JSON text).
#[derive(Deserialize)]
struct Sections<'a> {
    version: u32,
    #[serde(default)]
    journal: JournalPos,
    #[serde(default, borrow)]
    direct_tables: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    data_packages: BTreeMap<String, &'a serde_json::value::RawValue>,
    #[serde(default)]
    memory_domains: BTreeMap<String, DomainEntry>,
}

/// Parse a state file: the outline first, then its table maps (the direct tables
/// and each package: nearly all of the bytes) on several threads, each map built
/// whole from its sorted entries (no half-empty tree nodes). Every command that
/// trusts the state file pays this parse, a no-op pull included.
pub fn parse_state(bytes: &[u8]) -> serde_json::Result<SyncState> {
    let outline: Sections<'_> = serde_json::from_slice(bytes)?;
    let mut maps: Vec<&serde_json::value::RawValue> = Vec::new();
    maps.extend(outline.direct_tables);
    maps.extend(outline.data_packages.values().copied());
    let parse = |raw: &&serde_json::value::RawValue| {
        serde_json::from_str::<BTreeMap<String, TableEntry>>(raw.get())
            .map(|m| m.into_iter().collect::<BTreeMap<_, _>>())
            .map_err(|e| crate::Error::State {
                path: std::path::PathBuf::new(),
                message: e.to_string(),
            })
    };
    let threads = if bytes.len() < (256 << 10) {
        1
    } else {
        crate::par::threads()
    };
    let Ok(parsed) = crate::par::map_balanced(&maps, threads, parse) else {
        // A bad map: parse the whole text again for an error that names the
        // line and column in the file, not in the map.
        return serde_json::from_slice(bytes);
    };
    let mut parsed = parsed.into_iter();
    let direct_tables = match outline.direct_tables {
        Some(_) => parsed.next().unwrap_or_default(),
        None => BTreeMap::new(),
    };
    let data_packages = outline
        .data_packages
        .into_keys()
        .zip(parsed)
        .collect::<BTreeMap<_, _>>();
    Ok(SyncState {
        version: outline.version,
        journal: outline.journal,
        direct_tables,
        data_packages,
        memory_domains: outline.memory_domains,
    })
}

/// Replace `sync_state.json` atomically: temp file in `.stack/tmp`, fsync, rename,
/// fsync the local directory. Compact JSON with a final newline (it is read by
/// every command; `jq .` shows it pretty).
pub fn write_state(fs: &dyn Fs, layout: &Layout, state: &SyncState) -> Result<()> {
    let tmp_dir = layout.tmp();
    fs.create_dir_all(&tmp_dir).at("mkdir", &tmp_dir)?;
    let tmp = tmp_dir.join("sync_state.json.tmp");
    let f = fs.create(&tmp).at("create", &tmp)?;
    // Streamed: a large stack's state is not held twice (structs and bytes).
    let mut w = std::io::BufWriter::with_capacity(256 * 1024, f);
    serde_json::to_writer(&mut w, state)
        .map_err(std::io::Error::from)
        .and_then(|()| w.write_all(b"\n"))
        .at("write", &tmp)?;
    let mut f = w
        .into_inner()
        .map_err(|e| e.into_error())
        .at("write", &tmp)?;
    f.sync().at("fsync", &tmp)?;
    drop(f);
    let dst = layout.state_file();
    fs.rename(&tmp, &dst).at("rename", &dst)?;
    fs.sync_dir(&layout.root).at("fsync", &layout.root)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, ref_path: &str, shared_path: &str) -> TableEntry {
        TableEntry {
            name: name.to_string(),
            md5: "0123456789abcdef0123456789abcdef".to_string(),
            size: None,
            ref_path: ref_path.to_string(),
            shared_path: shared_path.to_string(),
            strategy: Strategy::Symlink,
            ref_fp: None,
            shared_fp: None,
        }
    }

    fn with(direct: Option<TableEntry>, pkg: Option<(&str, TableEntry)>) -> SyncState {
        let mut s = SyncState::default();
        if let Some(e) = direct {
            s.direct_tables.insert("tbl_a".to_string(), e);
        }
        if let Some((slug, e)) = pkg {
            s.data_packages
                .entry(slug.to_string())
                .or_default()
                .insert("tbl_a".to_string(), e);
        }
        s
    }

    #[test]
    fn parse_state_equals_a_plain_parse_and_reports_errors_in_file_positions() {
        let mut s = SyncState::default();
        for i in 0..3000 {
            let id = format!("tbl_{i:05}");
            let e = entry(
                &format!("n{i}"),
                &format!("data/p{}/n{i}.parquet", i % 3),
                &format!("data/_shared/{id}.parquet"),
            );
            s.data_packages
                .entry(format!("p{}", i % 3))
                .or_default()
                .insert(id.clone(), e.clone());
            if i % 7 == 0 {
                s.direct_tables.insert(id, e);
            }
        }
        s.memory_domains.insert(
            "m".to_string(),
            DomainEntry {
                md5: "0123456789abcdef0123456789abcdef".to_string(),
                path: "memory/m/bundle.md".to_string(),
                fp: None,
            },
        );
        let bytes = serde_json::to_vec(&s).unwrap();
        assert!(bytes.len() > 256 << 10, "the threaded path is taken");
        assert_eq!(parse_state(&bytes).unwrap(), s);
        let small = serde_json::to_vec(&SyncState::default()).unwrap();
        assert_eq!(parse_state(&small).unwrap(), SyncState::default());
        // A damaged entry deep in a package: the error is the plain parse's.
        let text = String::from_utf8(bytes).unwrap().replacen(
            "\"strategy\":\"symlink\"",
            "\"strategy\":7",
            2000,
        );
        let plain = serde_json::from_slice::<SyncState>(text.as_bytes()).unwrap_err();
        let got = parse_state(text.as_bytes()).unwrap_err();
        assert_eq!(got.to_string(), plain.to_string());
    }

    #[test]
    fn check_paths_accepts_the_engines_paths_only() {
        let shared = "data/_shared/tbl_a.parquet";
        let good_direct = entry("a", "data/_direct/a.parquet", shared);
        let good_pkg = entry("a", "data/p1/a.parquet", shared);
        assert_eq!(with(Some(good_direct.clone()), None).check_paths(), Ok(()));
        assert_eq!(
            with(None, Some(("p1", good_pkg.clone()))).check_paths(),
            Ok(())
        );
        let bad = [
            with(Some(entry("a", "data/_direct/a.parquetx", shared)), None),
            with(Some(entry("a", "data/_direct/a.parque", shared)), None),
            with(Some(entry("a", "data/_direct/../a.parquet", shared)), None),
            with(
                Some(entry(
                    "a",
                    "data/_direct/a.parquet",
                    "data/_shared/tbl_b.parquet",
                )),
                None,
            ),
            with(
                Some(entry(
                    "a",
                    "data/_direct/a.parquet",
                    "data/_shared/tbl_a.parquet/",
                )),
                None,
            ),
            with(Some(entry("..", "data/_direct/...parquet", shared)), None),
            with(None, Some(("p2", good_pkg.clone()))),
            with(None, Some(("..", entry("a", "data/../a.parquet", shared)))),
            with(None, Some(("p1", entry("a", "data/p1a.parquet", shared)))),
        ];
        for (i, s) in bad.iter().enumerate() {
            assert!(s.check_paths().is_err(), "case {i} accepted: {s:?}");
        }
    }
}
