//! The state value (contract §3): what `sync_state.json` says, and its serde.
//!
//! Owns: [`SyncState`] and its entries, their JSON text (written and parsed here;
//! the file itself is read and replaced by `replay::state`) and the rule a state's
//! paths must pass to be trusted ([`SyncState::check_paths`]; its ids, names, slugs
//! and md5s are proved when they are parsed, `model::name`). Pure data, no I/O.
//! Invariant kept: the text of a state is exactly what it was before it was parsed
//! (`state_file_text_round_trips_exactly`), and an entry holds no paths of its own
//! unless a state names paths other than the layout's.
//!
//! In memory a state names no directory (its paths are the layout's, relative).
//! The file (format 2, [`FileOut`]) names every path absolutely, under the `root`
//! it was projected for; a format-1 file, whose paths are relative, is still
//! parsed ([`parse_state_file`], [`state_file_from_reader`]), its paths made
//! relative. Which root is this directory's is for `replay::state` to say.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::layout;
pub use crate::model::name::{Md5Sum, SafeName};
use crate::model::slot::SlotRef;

/// The version of the in-memory model, which journal checkpoints carry.
pub const STATE_VERSION: u32 = 1;

/// The state file's format: 2 names its paths absolutely, under `root`; 1 (still
/// read) named them relative to the directory.
pub const STATE_FILE_VERSION: u32 = 2;

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

/// One table reference (direct or in a package), held without its paths: they
/// are the ones the layout builds from its slot, its id and its name
/// (`data/<slot>/<name>.parquet`, `data/_shared/<id>.parquet`), which the map that
/// holds the entry knows. In the file they are written out in full (contract §3).
/// A state file edited by hand may name other paths: those are kept (`verify`
/// reports them; recovery does not trust such a file, and refuses a journal whose
/// checkpoint holds them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableEntry {
    pub name: SafeName,
    pub md5: Md5Sum,
    pub size: Option<u64>,
    pub strategy: Strategy,
    /// Fingerprint of the reference as the engine left it.
    pub ref_fp: Option<StatFp>,
    /// Fingerprint of the shared file as the engine left it.
    pub shared_fp: Option<StatFp>,
    /// The paths, only when they are not the layout's for this entry's place.
    odd: Option<Box<OddPaths>>,
}

/// A hand-edited entry's paths (see [`TableEntry`]).
#[derive(Debug, Clone, PartialEq, Eq)]
struct OddPaths {
    ref_path: String,
    shared_path: String,
}

impl TableEntry {
    /// An entry with the layout's paths and no fingerprints.
    pub fn new(name: SafeName, md5: Md5Sum, size: Option<u64>, strategy: Strategy) -> TableEntry {
        TableEntry {
            name,
            md5,
            size,
            strategy,
            ref_fp: None,
            shared_fp: None,
            odd: None,
        }
    }

    /// The entry at `id` in `slot` with these paths: kept only if they are not the
    /// layout's (which is what an entry holds by default).
    pub fn with_paths(
        mut self,
        (slot, id): (SlotRef<'_>, &str),
        ref_path: &str,
        shared_path: &str,
    ) -> TableEntry {
        let own = layout::is_ref_rel(ref_path, slot, &self.name)
            && layout::is_shared_rel(shared_path, id);
        self.odd = (!own).then(|| {
            Box::new(OddPaths {
                ref_path: ref_path.to_string(),
                shared_path: shared_path.to_string(),
            })
        });
        self
    }

    /// Whether the entry's paths are the layout's for its place (always, unless
    /// a state file edited by hand said otherwise).
    pub fn has_own_paths(&self) -> bool {
        self.odd.is_none()
    }

    /// The reference's path, relative, for the entry in `slot`.
    pub fn ref_path(&self, slot: SlotRef<'_>) -> Cow<'_, str> {
        match &self.odd {
            Some(o) => Cow::Borrowed(&o.ref_path),
            None => {
                let mut s = String::new();
                layout::push_ref_rel(&mut s, slot, &self.name);
                Cow::Owned(s)
            }
        }
    }

    /// The shared file's path, relative, for the entry of `id`.
    pub fn shared_path(&self, id: &str) -> Cow<'_, str> {
        match &self.odd {
            Some(o) => Cow::Borrowed(&o.shared_path),
            None => Cow::Owned(layout::shared_rel(id)),
        }
    }

    /// [`TableEntry::ref_path`], appended to `out`.
    pub fn push_ref_path(&self, slot: SlotRef<'_>, out: &mut String) {
        match &self.odd {
            Some(o) => out.push_str(&o.ref_path),
            None => layout::push_ref_rel(out, slot, &self.name),
        }
    }

    /// [`TableEntry::shared_path`], appended to `out`.
    pub fn push_shared_path(&self, id: &str, out: &mut String) {
        match &self.odd {
            Some(o) => out.push_str(&o.shared_path),
            None => layout::push_shared_rel(out, id),
        }
    }

    /// The id of the table whose shared file the entry of `id` names (`None`: its
    /// shared path is no table's).
    pub fn shared_id<'a>(&'a self, id: &'a str) -> Option<&'a str> {
        match &self.odd {
            Some(o) => layout::shared_id_of(&o.shared_path),
            None => Some(id),
        }
    }
}

/// An entry as the state file writes it: with its paths, which its place gives,
/// under `root` (`""`: relative; a hand-edited entry's own paths are written as
/// they were read).
struct EntryOut<'a> {
    root: &'a str,
    slot: SlotRef<'a>,
    id: &'a str,
    e: &'a TableEntry,
}

impl EntryOut<'_> {
    /// `rel` under the root, if the entry's paths are the layout's.
    fn rooted<'p>(&self, rel: Cow<'p, str>) -> Cow<'p, str> {
        if self.root.is_empty() || !self.e.has_own_paths() {
            return rel;
        }
        Cow::Owned([self.root, &rel].concat())
    }
}

impl Serialize for EntryOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let e = self.e;
        // The file leaves absent optional fields out. A binary format (a journal
        // checkpoint, `journal::event::checkpoint_state`) decodes a struct as all
        // of its fields in order, so there every field is written.
        let all = !s.is_human_readable();
        let mut st = s.serialize_struct("TableEntry", 8)?;
        st.serialize_field("name", &e.name)?;
        st.serialize_field("md5", &e.md5)?;
        // Optional fields as `Some` (the same JSON as the bare value; in a binary
        // format, the bytes the derived model wrote).
        if all || e.size.is_some() {
            st.serialize_field("size", &e.size)?;
        }
        st.serialize_field("ref_path", &self.rooted(e.ref_path(self.slot)))?;
        st.serialize_field("shared_path", &self.rooted(e.shared_path(self.id)))?;
        st.serialize_field("strategy", &e.strategy)?;
        if all || e.ref_fp.is_some() {
            st.serialize_field("ref_fp", &e.ref_fp)?;
        }
        if all || e.shared_fp.is_some() {
            st.serialize_field("shared_fp", &e.shared_fp)?;
        }
        st.end()
    }
}

/// An entry as the state file has it (paths borrowed from the text when they can be).
/// Named as the file's entries always were, for error messages.
#[derive(Deserialize)]
#[serde(rename = "TableEntry", expecting = "struct TableEntry")]
struct EntryIn<'a> {
    name: SafeName,
    md5: Md5Sum,
    #[serde(default)]
    size: Option<u64>,
    #[serde(borrow)]
    ref_path: Cow<'a, str>,
    #[serde(borrow)]
    shared_path: Cow<'a, str>,
    strategy: Strategy,
    #[serde(default)]
    ref_fp: Option<StatFp>,
    #[serde(default)]
    shared_fp: Option<StatFp>,
}

impl EntryIn<'_> {
    /// The entry at `id` in `slot` of a file whose paths are under `root` (`""`:
    /// relative): paths outside it are kept as they are (not the layout's).
    fn at(self, slot: SlotRef<'_>, id: &str, root: &str) -> TableEntry {
        let (ref_path, shared_path) = match (
            self.ref_path.strip_prefix(root),
            self.shared_path.strip_prefix(root),
        ) {
            (Some(r), Some(s)) => (r, s),
            _ => (&*self.ref_path, &*self.shared_path),
        };
        let mut e = TableEntry::new(self.name, self.md5, self.size, self.strategy).with_paths(
            (slot, id),
            ref_path,
            shared_path,
        );
        e.ref_fp = self.ref_fp;
        e.shared_fp = self.shared_fp;
        e
    }
}

/// One slot's table map, written with its entries' paths (relative).
pub(crate) struct TablesOut<'a>(pub SlotRef<'a>, pub &'a BTreeMap<SafeName, TableEntry>);

impl Serialize for TablesOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        TablesAt("", self.0, self.1).serialize(s)
    }
}

/// One slot's table map, written with its entries' paths under a root.
struct TablesAt<'a>(&'a str, SlotRef<'a>, &'a BTreeMap<SafeName, TableEntry>);

impl Serialize for TablesAt<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let TablesAt(root, slot, map) = *self;
        s.collect_map(map.iter().map(|(id, e)| {
            let out = EntryOut { root, slot, id, e };
            (id, out)
        }))
    }
}

/// Reads one slot's table map, each entry told its place and the root its file's
/// paths are under (`""`: relative); the map is built whole from its sorted
/// entries (no half-empty tree nodes).
pub(crate) struct TablesSeed<'s>(pub SlotRef<'s>, pub &'s str);

impl<'de> serde::de::DeserializeSeed<'de> for TablesSeed<'_> {
    type Value = BTreeMap<SafeName, TableEntry>;
    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for TablesSeed<'_> {
    type Value = BTreeMap<SafeName, TableEntry>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a map of table ids to entries")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some(id) = map.next_key::<SafeName>()? {
            let e: EntryIn<'de> = map.next_value()?;
            let e = e.at(self.0, &id, self.1);
            out.push((id, e));
        }
        // Sorted and built whole; a repeated id keeps its last entry, as inserting did.
        Ok(out.into_iter().collect())
    }
}

fn ser_direct<S: serde::Serializer>(
    m: &BTreeMap<SafeName, TableEntry>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    TablesOut(SlotRef::Direct, m).serialize(s)
}

/// The packages' table maps, each written with its entries' paths (relative).
pub(crate) struct PackagesOut<'a>(pub &'a Packages);

impl Serialize for PackagesOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        PackagesAt("", self.0).serialize(s)
    }
}

/// The packages' table maps, written with their paths under a root.
struct PackagesAt<'a>(&'a str, &'a Packages);

impl Serialize for PackagesAt<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let root = self.0;
        s.collect_map(
            self.1
                .iter()
                .map(|(slug, t)| (slug, TablesAt(root, SlotRef::Package(slug), t))),
        )
    }
}

fn ser_packages<S: serde::Serializer>(m: &Packages, s: S) -> std::result::Result<S::Ok, S::Error> {
    PackagesOut(m).serialize(s)
}

type Packages = BTreeMap<SafeName, BTreeMap<SafeName, TableEntry>>;

/// Reads the packages' table maps of a file whose paths are under a root.
struct PackagesSeed<'s>(&'s str);

impl<'de> serde::de::DeserializeSeed<'de> for PackagesSeed<'_> {
    type Value = Packages;
    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Packages, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for PackagesSeed<'_> {
    type Value = Packages;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a map of package slugs to table maps")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Packages, A::Error> {
        let mut out = BTreeMap::new();
        while let Some(slug) = map.next_key::<SafeName>()? {
            let tables = map.next_value_seed(TablesSeed(SlotRef::Package(&slug), self.0))?;
            out.insert(slug, tables);
        }
        Ok(out)
    }
}

/// One memory domain in the stack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainEntry {
    pub md5: Md5Sum,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp: Option<StatFp>,
}

/// The whole state. Serialized as a version-1 file (relative paths; the file
/// itself is written by `replay::state::write_state`, format 2); deserialized from a file of
/// either format, its paths made relative ([`parse_state_file`] also gives the
/// root and version the file named).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyncState {
    /// The model's version ([`STATE_VERSION`]), whatever the file's format.
    pub version: u32,
    pub journal: JournalPos,
    #[serde(serialize_with = "ser_direct")]
    pub direct_tables: BTreeMap<SafeName, TableEntry>,
    #[serde(serialize_with = "ser_packages")]
    pub data_packages: BTreeMap<SafeName, BTreeMap<SafeName, TableEntry>>,
    pub memory_domains: BTreeMap<SafeName, DomainEntry>,
}

impl<'de> Deserialize<'de> for SyncState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_map(FileVisitor).map(|f| f.state)
    }
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
    pub fn entries(&self) -> impl Iterator<Item = (SlotRef<'_>, &SafeName, &TableEntry)> {
        let direct = self
            .direct_tables
            .iter()
            .map(|(id, e)| (SlotRef::Direct, id, e));
        let pkgs = self.data_packages.iter().flat_map(|(slug, tables)| {
            tables
                .iter()
                .map(move |(id, e)| (SlotRef::Package(slug), id, e))
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

    /// Check that every path is the one the layout builds from the entry's place
    /// (its ids, names and slugs are [`SafeName`]s, proved safe when the state was
    /// read): a state file edited by hand (or written by something else) must never
    /// point the engine outside the directory. Recovery asks it of the state file
    /// it trusts or adopts, and the journal's decoder of every checkpoint
    /// (`journal::event::checkpoint_state`). (`verify` audits a state file as it
    /// finds it, without this check: it reports an entry whose paths could lead
    /// outside the directory and keeps away from its files on its own.)
    pub fn check_paths(&self) -> std::result::Result<(), String> {
        // Read by every command: an entry holds its paths only if they are not
        // the layout's, so no path is built or compared here.
        for (slot, id, e) in self.entries() {
            if !e.has_own_paths() {
                return Err(format!(
                    "table {id}: paths {} / {} are not the engine's",
                    e.ref_path(slot),
                    e.shared_path(id)
                ));
            }
        }
        for (slug, d) in &self.memory_domains {
            if d.path != layout::bundle_rel(slug) {
                return Err(format!(
                    "memory domain {slug:?}: path {} is not the engine's",
                    d.path
                ));
            }
        }
        Ok(())
    }
}

/// A state file as read: the state (its paths relative), the format version and
/// the root it was projected for (format 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateFile {
    pub state: SyncState,
    pub version: u32,
    pub root: Option<String>,
}

/// What a file's paths under `root` start with (`""`: relative, no root).
fn root_prefix(root: Option<&str>) -> Cow<'_, str> {
    match root {
        None => Cow::Borrowed(""),
        Some(r) if r.ends_with('/') => Cow::Borrowed(r),
        Some(r) => Cow::Owned(format!("{r}/")),
    }
}

/// The state file's text, split at its table maps (each kept as raw JSON text).
#[derive(Deserialize)]
struct Sections<'a> {
    version: u32,
    #[serde(default, borrow)]
    root: Option<Cow<'a, str>>,
    #[serde(default)]
    journal: JournalPos,
    #[serde(default, borrow)]
    direct_tables: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    data_packages: BTreeMap<SafeName, &'a serde_json::value::RawValue>,
    #[serde(default)]
    memory_domains: BTreeMap<SafeName, DomainEntry>,
}

/// Parse a state file (either format), its paths made relative; the root and
/// version it names are dropped (see [`parse_state_file`]).
pub fn parse_state(bytes: &[u8]) -> serde_json::Result<SyncState> {
    parse_state_file(bytes).map(|f| f.state)
}

/// Parse a state file: the outline first, then its table maps (the direct tables
/// and each package: nearly all of the bytes) on several threads, each map built
/// whole from its sorted entries (no half-empty tree nodes). Every command that
/// trusts the state file pays this parse, a no-op pull included.
pub fn parse_state_file(bytes: &[u8]) -> serde_json::Result<StateFile> {
    let outline: Sections<'_> = serde_json::from_slice(bytes)?;
    let root = outline.root.as_deref();
    let prefix = root_prefix(root);
    let mut maps: Vec<(SlotRef<'_>, &serde_json::value::RawValue)> = Vec::new();
    maps.extend(outline.direct_tables.map(|raw| (SlotRef::Direct, raw)));
    maps.extend(
        outline
            .data_packages
            .iter()
            .map(|(slug, raw)| (SlotRef::Package(slug), *raw)),
    );
    let parse = |(slot, raw): &(SlotRef<'_>, &serde_json::value::RawValue)| {
        let mut de = serde_json::Deserializer::from_str(raw.get());
        serde::de::DeserializeSeed::deserialize(TablesSeed(*slot, &prefix), &mut de)
            .and_then(|m| de.end().map(|()| m))
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
        let mut de = serde_json::Deserializer::from_slice(bytes);
        return serde::de::Deserializer::deserialize_map(&mut de, FileVisitor)
            .and_then(|f| de.end().map(|()| f));
    };
    let mut parsed = parsed.into_iter();
    let direct_tables = match outline.direct_tables {
        Some(_) => parsed
            .next()
            .expect("the direct tables were the first of the maps parsed"),
        None => BTreeMap::new(),
    };
    let data_packages = maps
        .iter()
        .filter_map(|(slot, _)| match slot {
            SlotRef::Package(slug) => Some((*slug).clone()),
            SlotRef::Direct => None,
        })
        .zip(parsed)
        .collect::<BTreeMap<_, _>>();
    let mut memory_domains = outline.memory_domains;
    relative_domains(&mut memory_domains, &prefix);
    Ok(StateFile {
        state: SyncState {
            version: STATE_VERSION,
            journal: outline.journal,
            direct_tables,
            data_packages,
            memory_domains,
        },
        version: outline.version,
        root: root.map(str::to_string),
    })
}

/// The domains' paths under `prefix`, made relative (others kept as they are).
fn relative_domains(domains: &mut BTreeMap<SafeName, DomainEntry>, prefix: &str) {
    if prefix.is_empty() {
        return;
    }
    for d in domains.values_mut() {
        if let Some(rel) = d.path.strip_prefix(prefix) {
            d.path = rel.to_string();
        }
    }
}

/// The entries read before the file named its root (a file whose keys were
/// reordered by hand), their paths under `prefix` made relative.
fn relative_entries(map: &mut BTreeMap<SafeName, TableEntry>, slot: SlotRef<'_>, prefix: &str) {
    for (id, e) in map.iter_mut() {
        let Some(o) = &e.odd else { continue };
        if let (Some(r), Some(s)) = (
            o.ref_path.strip_prefix(prefix),
            o.shared_path.strip_prefix(prefix),
        ) {
            let (r, s) = (r.to_string(), s.to_string());
            *e = e.clone().with_paths((slot, id), &r, &s);
        }
    }
}

/// Parse a state file from a reader, either format, one key at a time (a large
/// file: its text and its structs are not held at once), its paths made relative.
pub fn state_file_from_reader<R: std::io::Read>(reader: R) -> serde_json::Result<StateFile> {
    let mut de = serde_json::Deserializer::from_reader(reader);
    serde::de::Deserializer::deserialize_map(&mut de, FileVisitor)
        .and_then(|f| de.end().map(|()| f))
}

/// Reads a whole state file, either format, one key at a time (the streamed
/// read of a large file): the table maps are read with the root the file named
/// before them.
struct FileVisitor;

impl<'de> serde::de::Visitor<'de> for FileVisitor {
    type Value = StateFile;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("struct SyncState")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<StateFile, A::Error> {
        let mut version = None;
        let mut root: Option<String> = None;
        let mut state = SyncState::default();
        // Read under this prefix (the root named so far).
        let mut read_under = String::new();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match &*key {
                "version" => version = Some(map.next_value::<u32>()?),
                "root" => root = Some(map.next_value()?),
                "journal" => state.journal = map.next_value()?,
                "direct_tables" => {
                    read_under = root_prefix(root.as_deref()).into_owned();
                    state.direct_tables =
                        map.next_value_seed(TablesSeed(SlotRef::Direct, &read_under))?;
                }
                "data_packages" => {
                    read_under = root_prefix(root.as_deref()).into_owned();
                    state.data_packages = map.next_value_seed(PackagesSeed(&read_under))?;
                }
                "memory_domains" => state.memory_domains = map.next_value()?,
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        let version = version.ok_or_else(|| serde::de::Error::missing_field("version"))?;
        let prefix = root_prefix(root.as_deref());
        if *prefix != read_under {
            relative_entries(&mut state.direct_tables, SlotRef::Direct, &prefix);
            for (slug, tables) in state.data_packages.iter_mut() {
                relative_entries(tables, SlotRef::Package(slug), &prefix);
            }
        }
        relative_domains(&mut state.memory_domains, &prefix);
        Ok(StateFile {
            state,
            version,
            root,
        })
    }
}

/// The state file as written: format 2, every path under the root it is
/// projected for.
pub struct FileOut<'a> {
    /// The directory's path the file is projected for (absolute).
    pub root: &'a str,
    /// The state, its paths relative.
    pub state: &'a SyncState,
}

impl Serialize for FileOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let prefix = root_prefix(Some(self.root));
        let domains = self.state.memory_domains.iter().map(|(slug, d)| {
            let mut d = d.clone();
            if d.path == layout::bundle_rel(slug) {
                d.path = [&*prefix, &d.path].concat();
            }
            (slug, d)
        });
        let mut st = s.serialize_struct("SyncState", 6)?;
        st.serialize_field("version", &STATE_FILE_VERSION)?;
        st.serialize_field("root", self.root)?;
        st.serialize_field("journal", &self.state.journal)?;
        let direct = TablesAt(&prefix, SlotRef::Direct, &self.state.direct_tables);
        st.serialize_field("direct_tables", &direct)?;
        st.serialize_field(
            "data_packages",
            &PackagesAt(&prefix, &self.state.data_packages),
        )?;
        st.serialize_field("memory_domains", &domains.collect::<BTreeMap<_, _>>())?;
        st.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry of table `id` named `name` at `slot`, with these paths.
    fn entry_at(
        (slot, id): (SlotRef<'_>, &str),
        name: &str,
        ref_path: &str,
        shared_path: &str,
    ) -> TableEntry {
        TableEntry::new(
            name.try_into().unwrap(),
            Md5Sum::parse("0123456789abcdef0123456789abcdef").unwrap(),
            None,
            Strategy::Symlink,
        )
        .with_paths((slot, id), ref_path, shared_path)
    }

    /// (name, ref_path, shared_path) of an entry of `tbl_a`.
    type Raw<'a> = (&'a str, &'a str, &'a str);

    /// A state with `tbl_a` as a direct table and/or in one package, each with the
    /// paths given (as a state file would name them).
    fn with(direct: Option<Raw<'_>>, pkg: Option<(&str, Raw<'_>)>) -> SyncState {
        let mut s = SyncState::default();
        if let Some((name, r, sh)) = direct {
            let e = entry_at((SlotRef::Direct, "tbl_a"), name, r, sh);
            s.direct_tables.insert("tbl_a".try_into().unwrap(), e);
        }
        if let Some((slug, (name, r, sh))) = pkg {
            let slug = SafeName::parse(slug).unwrap();
            let e = entry_at((SlotRef::Package(&slug), "tbl_a"), name, r, sh);
            s.data_packages
                .entry(slug)
                .or_default()
                .insert("tbl_a".try_into().unwrap(), e);
        }
        s
    }

    #[test]
    fn parse_state_equals_a_plain_parse_and_reports_errors_in_file_positions() {
        let mut s = SyncState::default();
        for i in 0..3000 {
            let id = format!("tbl_{i:05}");
            let slug = SafeName::parse(format!("p{}", i % 3)).unwrap();
            let name = format!("n{i}");
            let ref_path = format!("data/p{}/n{i}.parquet", i % 3);
            let shared_path = format!("data/_shared/{id}.parquet");
            let e = entry_at(
                (SlotRef::Package(&slug), &id),
                &name,
                &ref_path,
                &shared_path,
            );
            assert!(e.has_own_paths());
            s.data_packages
                .entry(slug)
                .or_default()
                .insert(id.clone().try_into().unwrap(), e);
            if i % 7 == 0 {
                // The package's paths, named by a direct table: kept as they are.
                let e = entry_at((SlotRef::Direct, &id), &name, &ref_path, &shared_path);
                assert!(!e.has_own_paths());
                s.direct_tables.insert(id.try_into().unwrap(), e);
            }
        }
        s.memory_domains.insert(
            "m".try_into().unwrap(),
            DomainEntry {
                md5: "0123456789abcdef0123456789abcdef".try_into().unwrap(),
                path: "memory/m/bundle.md".to_string(),
                fp: None,
            },
        );
        let bytes = serde_json::to_vec(&s).unwrap();
        assert!(bytes.len() > 256 << 10, "the threaded path is taken");
        assert_eq!(parse_state(&bytes).unwrap(), s);
        assert_eq!(serde_json::from_slice::<SyncState>(&bytes).unwrap(), s);
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

    /// The state file's text is what it was when entries held their paths and md5
    /// as text: every field, in the same order, and odd paths kept.
    #[test]
    fn state_file_text_round_trips_exactly() {
        let text = concat!(
            r#"{"version":1,"journal":{"txn":2,"seq":5},"#,
            r#""direct_tables":{"tbl_a":{"name":"a","md5":"0123456789abcdef0123456789abcdef","size":3,"#,
            r#""ref_path":"data/_direct/a.parquet","shared_path":"data/_shared/tbl_a.parquet","strategy":"copy","#,
            r#""ref_fp":{"size":3,"mtime_ns":-1,"ino":9},"shared_fp":{"size":3,"mtime_ns":7,"ino":8}}},"#,
            r#""data_packages":{"p1":{"tbl_a":{"name":"a","md5":"0123456789abcdef0123456789abcdef","#,
            r#""ref_path":"data/p2/a.parquet","shared_path":"data/_shared/tbl_a.parquet","strategy":"symlink"},"#,
            r#""tbl_b":{"name":"b","md5":"fedcba9876543210fedcba9876543210","ref_path":"data/p1/b.parquet","#,
            r#""shared_path":"data/_shared/tbl_c.parquet","strategy":"hardlink"}}},"#,
            r#""memory_domains":{}}"#
        );
        let s = parse_state(text.as_bytes()).unwrap();
        assert!(s.direct_tables["tbl_a"].has_own_paths());
        assert!(!s.data_packages["p1"]["tbl_a"].has_own_paths());
        assert!(!s.data_packages["p1"]["tbl_b"].has_own_paths());
        assert_eq!(
            s.direct_tables["tbl_a"].md5,
            "0123456789abcdef0123456789abcdef"
        );
        assert_eq!(serde_json::to_string(&s).unwrap(), text);
        let streamed: SyncState = serde_json::from_reader(text.as_bytes()).unwrap();
        assert_eq!(streamed, s);
    }

    /// A state file naming an id, name or slug that is not one safe path component,
    /// or an md5 that is not 32 lowercase hex digits (hand-edited), is refused when
    /// it is parsed, by both readers, with an error naming the value.
    #[test]
    fn unsafe_names_and_odd_md5s_are_refused_when_parsed() {
        let entry = |name: &str, md5: &str| {
            format!(
                r#"{{"name":{name:?},"md5":{md5:?},"ref_path":"x","shared_path":"y","strategy":"copy"}}"#
            )
        };
        let md5 = "0123456789abcdef0123456789abcdef";
        let cases = [
            (
                format!(r#"{{"version":1,"direct_tables":{{"tbl_a":{}}}}}"#, entry("../../v", md5)),
                r#""../../v" is not a safe path component"#,
            ),
            (
                format!(r#"{{"version":1,"direct_tables":{{"..":{}}}}}"#, entry("a", md5)),
                r#"".." is not a safe path component"#,
            ),
            (
                format!(r#"{{"version":1,"data_packages":{{"a/b":{{"t":{}}}}}}}"#, entry("a", md5)),
                r#""a/b" is not a safe path component"#,
            ),
            (
                format!(r#"{{"version":1,"direct_tables":{{"t":{}}}}}"#, entry("a", "not an md5")),
                r#"md5 "not an md5" is not 32 lowercase hex digits"#,
            ),
            (
                format!(
                    r#"{{"version":1,"direct_tables":{{"t":{}}}}}"#,
                    entry("a", "0123456789ABCDEF0123456789abcdef")
                ),
                r#"md5 "0123456789ABCDEF0123456789abcdef" is not 32 lowercase hex digits"#,
            ),
            (
                r#"{"version":1,"memory_domains":{"/":{"md5":"0123456789abcdef0123456789abcdef","path":"memory/x/bundle.md"}}}"#.to_string(),
                r#""/" is not a safe path component"#,
            ),
        ];
        for (text, why) in cases {
            let e = parse_state(text.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(why), "{text}: {e}");
            let e = state_file_from_reader(text.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn the_state_files_rule_accepts_the_engines_paths_only() {
        let shared = "data/_shared/tbl_a.parquet";
        let good_direct = ("a", "data/_direct/a.parquet", shared);
        let good_pkg = ("a", "data/p1/a.parquet", shared);
        assert_eq!(with(Some(good_direct), None).check_paths(), Ok(()));
        assert_eq!(with(None, Some(("p1", good_pkg))).check_paths(), Ok(()));
        let bad = [
            with(Some(("a", "data/_direct/a.parquetx", shared)), None),
            with(Some(("a", "data/_direct/a.parque", shared)), None),
            with(Some(("a", "data/_direct/../a.parquet", shared)), None),
            with(
                Some(("a", "data/_direct/a.parquet", "data/_shared/tbl_b.parquet")),
                None,
            ),
            with(
                Some(("a", "data/_direct/a.parquet", "data/_shared/tbl_a.parquet/")),
                None,
            ),
            with(None, Some(("p2", good_pkg))),
            with(None, Some(("p1", ("a", "data/../a.parquet", shared)))),
            with(None, Some(("p1", ("a", "data/p1a.parquet", shared)))),
        ];
        for (i, s) in bad.iter().enumerate() {
            assert!(s.check_paths().is_err(), "case {i} accepted: {s:?}");
        }
    }

    /// An unreadable entry's message names the type the file's entries have, not
    /// the internal reader's (which a user never sees).
    #[test]
    fn unreadable_entry_message_names_the_entry_type() {
        let text = r#"{"version":1,"direct_tables":{"tbl_a":5}}"#;
        let e = parse_state(text.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("TableEntry"), "{e}");
    }
}
