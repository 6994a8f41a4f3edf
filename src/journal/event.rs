//! The events of the journal: the single list of everything the engine can do.
//!
//! Owns: [`Event`] and [`Record`] (their names, md5s, slots and link modes are the
//! model's), and the decoders of the fields that name paths. A new kind of
//! mutation is a new variant here first; the applier (`reconcile::apply`), the
//! projection (`replay::project`) and `journal show` all match on this enum
//! exhaustively, so nothing can be done that the journal cannot say.
//!
//! Invariant kept: no event stack acts on names a path outside the local directory.
//! Events hold ids, names, slugs and md5s ([`SafeName`], [`Md5Sum`]), never paths
//! (`layout` builds those), and the few path fields are decoded through checks of
//! their own (`checked`): a checksum-valid record naming anything else was not
//! written by stack and does not decode, so the journal's scan ends there as
//! corrupt (`journal::frame`), and its readers refuse it before folding anything.
//! A checkpoint's paths are held to the state file's rule by those readers
//! (`replay::project::check_records`).
//!
//! Compatibility: records are encoded with bincode, variants by their position.
//! Any change to that encoding (a new variant, a changed field) is a new journal
//! format version (`journal::frame::FORMAT_VERSION`, whose doc states the rule;
//! `tests/journal_golden.rs` pins every variant's bytes), so that an older build
//! refuses the journal as written by a newer stack instead of misreading it; new
//! variants go at the end, so that older journals still decode.

use serde::{Deserialize, Serialize};

pub use crate::model::name::{Md5Sum, SafeName};
pub use crate::model::slot::{LinkMode, Slot, SlotRef};
use crate::model::state::{StatFp, Strategy, SyncState};

/// One journal record: an event stamped with its sequence number and transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the whole history, strictly increasing by one from 1.
    pub seq: u64,
    /// The transaction (one pull, one recovery, one compaction) it belongs to.
    pub txn: u64,
    pub event: Event,
}

/// Everything the engine can do or declare. Paths are never stored: they are
/// derived from ids, names and slugs that are safe single path components
/// ([`SafeName`]), so a journal cannot point outside the local directory; a
/// record holding one that is not (hand-made, with a valid checksum) does not
/// decode. (A `Checkpoint`'s state names paths, as `sync_state.json` does, `gc`'s
/// `RemoveStray` a path under `data/` or `memory/`, and `Place` a folder: their
/// decoders hold them to the rules those must pass.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A pull starts. `manifest_md5` identifies the manifest it pulls.
    Begin {
        manifest_md5: Md5Sum,
        link: LinkMode,
    },
    /// Intent to download `url` into `.stack/staging/<md5>` (invisible until applied).
    Stage { md5: Md5Sum, url: String },
    /// Apply: place staged `<md5>` as `data/_shared/<table_id>.parquet`, read-only.
    PutShared { table_id: SafeName, md5: Md5Sum },
    /// Apply: (re)make the reference of `table_id` in `slot` as `name`, and record
    /// its state entry.
    MakeRef {
        slot: Slot,
        table_id: SafeName,
        name: SafeName,
        md5: Md5Sum,
        size: Option<u64>,
        strategy: Strategy,
    },
    /// Apply: move the reference of `table_id` in `slot` to the trash; drop its entry.
    RemoveRef {
        slot: Slot,
        table_id: SafeName,
        name: SafeName,
    },
    /// Apply: move `data/_shared/<table_id>.parquet` to the trash.
    RemoveShared { table_id: SafeName },
    /// Apply: place staged `<md5>` as `memory/<slug>/bundle.md`; record the domain.
    PutBundle { slug: SafeName, md5: Md5Sum },
    /// Apply: move `memory/<slug>/` to the trash; drop the domain.
    RemoveBundle { slug: SafeName },
    /// Apply: remove the folder of `slot` (`data/_direct/` or `data/<slug>/`) if it
    /// is empty. Encoded as the folder's name (`_direct` or the slug).
    RemoveDir {
        #[serde(rename = "slug", with = "checked::slot_folder")]
        slot: Slot,
    },
    /// The commit point: every event of the plan is in the journal and durable.
    /// From here recovery rolls forward.
    Prepared,
    /// Every step is applied and durable and `sync_state.json` written. Carries the
    /// stat fingerprints of the files the transaction wrote (relative path → stat).
    Committed { fingerprints: Vec<(String, StatFp)> },
    /// The transaction was rolled back before its commit point; nothing visible changed.
    Aborted { reason: String },
    /// The whole projection at this point; compaction starts a journal with it.
    /// Encoded in the journal through [`checkpoint_state`] (see there why). Its
    /// names and md5s are proved when it decodes; one whose paths fail
    /// `SyncState::check_paths` (the state file's rule) makes the journal corrupt
    /// for every reader that acts on it (`replay::project::check_records`).
    Checkpoint {
        #[serde(with = "checkpoint_state")]
        state: Box<SyncState>,
    },
    /// `stack gc`: move `rel` (a file or folder under `data/` or `memory/` that no
    /// state entry holds) to `.stack/quarantine/<txn>/<rel>`, where it stays until
    /// `gc --force` deletes it.
    RemoveStray {
        #[serde(deserialize_with = "checked::stray")]
        rel: String,
    },
    /// What a pull was asked for (the no-op fast path's key, see
    /// `replay::state::Pulled`): md5 of its manifest's bytes, origin and link mode,
    /// and how many direct and package tables it skipped. In the commit batch of a
    /// pull whose manifest bytes were known; the projection of its `Committed`
    /// carries it into the state. New in format version 2 (builds before it wrote it
    /// under version 1, see `frame::FORMAT_VERSION`).
    Request {
        key: String,
        skipped_direct: u64,
        skipped_packages: u64,
    },
    /// Apply: move the folder `.stack/staging/<staged>/`, built out of sight before
    /// the commit point, to `rel` (`data/_shared` or a slot's folder), which did not
    /// exist when the pull was planned; if `rel` exists by now, move its entries in
    /// one by one. The steps whose files travelled inside it (see
    /// `reconcile::place`) follow as usual. New in format version 2, as `Request`.
    Place {
        #[serde(deserialize_with = "checked::staged_folder")]
        staged: String,
        #[serde(deserialize_with = "checked::placed_folder")]
        rel: String,
    },
}

impl Event {
    /// A short stable name for `journal show`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Begin { .. } => "begin",
            Event::Stage { .. } => "stage",
            Event::PutShared { .. } => "put_shared",
            Event::MakeRef { .. } => "make_ref",
            Event::RemoveRef { .. } => "remove_ref",
            Event::RemoveShared { .. } => "remove_shared",
            Event::PutBundle { .. } => "put_bundle",
            Event::RemoveBundle { .. } => "remove_bundle",
            Event::RemoveDir { .. } => "remove_dir",
            Event::Prepared => "prepared",
            Event::Committed { .. } => "committed",
            Event::Aborted { .. } => "aborted",
            Event::Checkpoint { .. } => "checkpoint",
            Event::RemoveStray { .. } => "remove_stray",
            Event::Request { .. } => "request",
            Event::Place { .. } => "place",
        }
    }

    /// A one-line human summary for `journal show`.
    pub fn summary(&self) -> String {
        match self {
            Event::Begin { manifest_md5, link } => {
                format!("manifest {manifest_md5} link {link:?}")
            }
            Event::Stage { md5, url } => format!("{md5} <- {url}"),
            Event::PutShared { table_id, md5 } => {
                format!("{} = {md5}", crate::layout::shared_rel(table_id))
            }
            Event::MakeRef {
                slot,
                table_id,
                name,
                strategy,
                ..
            } => format!(
                "{} -> {table_id} ({})",
                crate::layout::ref_rel(slot, name),
                strategy.as_str()
            ),
            Event::RemoveRef { slot, name, .. } => crate::layout::ref_rel(slot, name),
            Event::RemoveShared { table_id } => crate::layout::shared_rel(table_id),
            Event::PutBundle { slug, md5 } => {
                format!("{} = {md5}", crate::layout::bundle_rel(slug))
            }
            Event::RemoveBundle { slug } => format!("{}/", crate::layout::domain_dir_rel(slug)),
            Event::RemoveDir { slot } => format!("{}/", crate::layout::slot_dir_rel(slot)),
            Event::Prepared => "commit point".to_string(),
            Event::Committed { fingerprints } => format!("{} fingerprints", fingerprints.len()),
            Event::Aborted { reason } => reason.clone(),
            Event::Checkpoint { state } => format!(
                "{} direct, {} packages, {} domains",
                state.direct_tables.len(),
                state.data_packages.len(),
                state.memory_domains.len()
            ),
            Event::RemoveStray { rel } => rel.clone(),
            Event::Request {
                key,
                skipped_direct,
                skipped_packages,
            } => format!(
                "key {key}, skipped {skipped_direct} direct / {skipped_packages} package tables"
            ),
            Event::Place { staged, rel } => format!("{rel}/ <- .stack/staging/{staged}/"),
        }
    }
}

/// The decoders of the event fields that name paths, which refuse (naming the
/// value) what stack never writes, so that a record holding one does not decode:
/// a placed folder `data/_shared`, `data/_direct` or `data/<slug>` and its staged
/// folder one `reconcile::place` makes; a stray of `gc` a relative path under
/// `data/` or `memory/` without `.` or `..`; a `RemoveDir`'s folder `_direct` or a
/// safe slug. (Ids, names, slugs and md5s are [`SafeName`]s and [`Md5Sum`]s.)
mod checked {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::layout;
    use crate::model::name::SafeName;
    use crate::model::slot::{Slot, SlotRef};

    fn refuse_unless<'de, D: Deserializer<'de>>(
        d: D,
        ok: impl FnOnce(&str) -> bool,
        why: impl FnOnce(&str) -> String,
    ) -> Result<String, D::Error> {
        let v = String::deserialize(d)?;
        if ok(&v) {
            Ok(v)
        } else {
            Err(D::Error::custom(why(&v)))
        }
    }

    pub fn staged_folder<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        refuse_unless(d, layout::is_place_folder, |v| {
            format!("staged folder {v:?} is not one stack makes")
        })
    }

    pub fn placed_folder<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        refuse_unless(d, layout::is_placeable_dir_rel, |v| {
            format!("folder {v:?} is not one stack places")
        })
    }

    pub fn stray<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        refuse_unless(d, layout::is_stray_rel, |v| {
            format!("stray {v:?} is not a path under data/ or memory/")
        })
    }

    /// A slot as its folder's name under `data/` (the bytes of the `String` the
    /// field was).
    pub mod slot_folder {
        use super::*;

        pub fn serialize<S: Serializer>(slot: &Slot, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(layout::slot_folder(SlotRef::of(slot)))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Slot, D::Error> {
            let folder = String::deserialize(d)?;
            if folder == layout::DIRECT_DIR {
                return Ok(Slot::Direct);
            }
            SafeName::parse(folder)
                .map(Slot::Package)
                .map_err(D::Error::custom)
        }
    }
}

/// A `Checkpoint` record of a borrowed state: serializes exactly as
/// `Record { seq, txn, event: Event::Checkpoint { state } }` does, without the copy
/// of the whole state that building that record would take (compaction encodes
/// the projection of a large stack through it).
pub struct CheckpointRecord<'a> {
    pub seq: u64,
    pub txn: u64,
    pub state: &'a SyncState,
}

impl Serialize for CheckpointRecord<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeStruct, SerializeStructVariant};
        /// `Event::Checkpoint { state }`, borrowed.
        struct CheckpointEvent<'a>(&'a SyncState);
        impl Serialize for CheckpointEvent<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut v =
                    s.serialize_struct_variant("Event", CHECKPOINT_INDEX, "Checkpoint", 1)?;
                v.serialize_field("state", &StateField(self.0))?;
                v.end()
            }
        }
        /// The `state` field, through [`checkpoint_state`] as the owned event's is.
        struct StateField<'a>(&'a SyncState);
        impl Serialize for StateField<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                checkpoint_state::serialize(self.0, s)
            }
        }
        let mut r = s.serialize_struct("Record", 3)?;
        r.serialize_field("seq", &self.seq)?;
        r.serialize_field("txn", &self.txn)?;
        r.serialize_field("event", &CheckpointEvent(self.state))?;
        r.end()
    }
}

/// The one frame of a compacted journal: a borrowed [`CheckpointRecord`], then,
/// if the state knows it, the `Request` its last pull realised, in the checkpoint's
/// transaction. Serializes as the `Vec<Record>` of those records does.
pub struct CheckpointFrame<'a> {
    pub checkpoint: CheckpointRecord<'a>,
    pub request: Option<Record>,
}

impl Serialize for CheckpointFrame<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(1 + usize::from(self.request.is_some())))?;
        seq.serialize_element(&self.checkpoint)?;
        if let Some(r) = &self.request {
            seq.serialize_element(r)?;
        }
        seq.end()
    }
}

/// The variant index of `Event::Checkpoint` (its position in the enum).
const CHECKPOINT_INDEX: u32 = 12;

/// The journal encoding of a checkpoint's [`SyncState`].
///
/// `SyncState` is shaped for `sync_state.json`: its optional fields (`size`,
/// `ref_fp`, `shared_fp`, a domain's `fp`) are left out when absent
/// (`skip_serializing_if`). bincode is not self-describing: it decodes a struct as
/// every one of its fields in order, so a state with any absent optional field
/// would be written without that field and could not be read back; the checkpoint
/// frame would fail to decode and, being the last frame after a compaction, be cut
/// as a torn tail, losing the whole state. In the journal (a non-human-readable format) a
/// checkpoint is therefore written with every field always present, in the same
/// order (table entries by the state file's own writer, which does so in a binary
/// format; the rest through mirrors), so a state whose optional fields are all
/// present has exactly the bytes it had before. Human-readable formats (JSON, for
/// `journal show --json`) still see `SyncState` itself.
pub mod checkpoint_state {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::model::name::{Md5Sum, SafeName};
    use crate::model::slot::SlotRef;
    use crate::model::state::{
        DomainEntry, JournalPos, PackagesOut, StatFp, Strategy, SyncState, TableEntry, TablesOut,
    };

    #[derive(Deserialize)]
    struct WireTable {
        name: SafeName,
        md5: Md5Sum,
        size: Option<u64>,
        ref_path: String,
        shared_path: String,
        strategy: Strategy,
        ref_fp: Option<StatFp>,
        shared_fp: Option<StatFp>,
    }

    #[derive(Deserialize)]
    struct WireDomain {
        md5: Md5Sum,
        path: String,
        fp: Option<StatFp>,
    }

    /// The journal position without its byte bookkeeping (`end`, `base`): those
    /// describe a particular journal file and mean nothing inside a checkpoint.
    #[derive(Serialize, Deserialize)]
    struct WireJournal {
        txn: u64,
        seq: u64,
    }

    #[derive(Deserialize)]
    struct WireState {
        version: u32,
        journal: WireJournal,
        direct_tables: BTreeMap<SafeName, WireTable>,
        data_packages: BTreeMap<SafeName, BTreeMap<SafeName, WireTable>>,
        memory_domains: BTreeMap<SafeName, WireDomain>,
    }

    // The writing side borrows from the state (a checkpoint of a large stack is not
    // copied to be encoded); it serializes field for field, in the same order, as
    // the owned mirrors above deserialize (a `&str` encodes as a `String`, a map
    // written by `collect_map` as a `BTreeMap`). Table entries are written by the
    // state file's own writer (`TablesOut`), which writes every field in a binary
    // format.

    #[derive(Serialize)]
    struct DomainOut<'a> {
        md5: &'a str,
        path: &'a str,
        fp: Option<StatFp>,
    }

    struct DomainsOut<'a>(&'a BTreeMap<SafeName, DomainEntry>);

    impl Serialize for DomainsOut<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(self.0.iter().map(|(slug, d)| {
                let wire = DomainOut {
                    md5: &d.md5,
                    path: &d.path,
                    fp: d.fp,
                };
                (slug, wire)
            }))
        }
    }

    #[derive(Serialize)]
    struct StateOut<'a> {
        version: u32,
        journal: WireJournal,
        direct_tables: TablesOut<'a>,
        data_packages: PackagesOut<'a>,
        memory_domains: DomainsOut<'a>,
    }

    fn tables_from_wire(
        slot: SlotRef<'_>,
        m: BTreeMap<SafeName, WireTable>,
    ) -> BTreeMap<SafeName, TableEntry> {
        m.into_iter()
            .map(|(id, t)| {
                let mut e = TableEntry::new(t.name, t.md5, t.size, t.strategy).with_paths(
                    (slot, &id),
                    &t.ref_path,
                    &t.shared_path,
                );
                e.ref_fp = t.ref_fp;
                e.shared_fp = t.shared_fp;
                (id, e)
            })
            .collect()
    }

    pub fn serialize<S: Serializer>(state: &SyncState, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return state.serialize(s);
        }
        StateOut {
            version: state.version,
            journal: WireJournal {
                txn: state.journal.txn,
                seq: state.journal.seq,
            },
            direct_tables: TablesOut(SlotRef::Direct, &state.direct_tables),
            data_packages: PackagesOut(&state.data_packages),
            memory_domains: DomainsOut(&state.memory_domains),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Box<SyncState>, D::Error> {
        if d.is_human_readable() {
            return SyncState::deserialize(d).map(Box::new);
        }
        WireState::deserialize(d).map(|w| Box::new(from_wire(w)))
    }

    fn from_wire(w: WireState) -> SyncState {
        SyncState {
            version: w.version,
            journal: JournalPos {
                txn: w.journal.txn,
                seq: w.journal.seq,
                at: None,
                pulled: None,
            },
            direct_tables: tables_from_wire(SlotRef::Direct, w.direct_tables),
            data_packages: w
                .data_packages
                .into_iter()
                .map(|(slug, tables)| {
                    let tables = tables_from_wire(SlotRef::Package(&slug), tables);
                    (slug, tables)
                })
                .collect(),
            memory_domains: w
                .memory_domains
                .into_iter()
                .map(|(slug, d)| {
                    let entry = DomainEntry {
                        md5: d.md5,
                        path: d.path,
                        fp: d.fp,
                    };
                    (slug, entry)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::frame;
    use crate::model::state::{DomainEntry, TableEntry};

    const FP: StatFp = StatFp {
        size: 3,
        mtime_ns: -4,
        ino: 5,
    };

    fn entry(with_optionals: bool, slot: SlotRef<'_>) -> TableEntry {
        let mut e = TableEntry::new(
            "orders".try_into().unwrap(),
            "0123456789abcdef0123456789abcdef".try_into().unwrap(),
            with_optionals.then_some(10),
            Strategy::Copy,
        )
        .with_paths(
            (slot, "tbl_a"),
            "data/_direct/orders.parquet",
            "data/_shared/tbl_a.parquet",
        );
        e.ref_fp = with_optionals.then_some(FP);
        e.shared_fp = with_optionals.then_some(FP);
        e
    }

    fn state(with_optionals: bool) -> SyncState {
        let mut s = SyncState::default();
        s.direct_tables.insert(
            "tbl_a".try_into().unwrap(),
            entry(with_optionals, SlotRef::Direct),
        );
        s.data_packages
            .entry("sales".try_into().unwrap())
            .or_default()
            .insert(
                "tbl_a".try_into().unwrap(),
                entry(
                    with_optionals,
                    SlotRef::Package(&"sales".try_into().unwrap()),
                ),
            );
        s.memory_domains.insert(
            "ops".try_into().unwrap(),
            DomainEntry {
                md5: "d41d8cd98f00b204e9800998ecf8427e".try_into().unwrap(),
                path: "memory/ops/bundle.md".into(),
                fp: with_optionals.then_some(FP),
            },
        );
        s
    }

    fn checkpoint(state: SyncState) -> Record {
        Record {
            seq: 1,
            txn: 1,
            event: Event::Checkpoint {
                state: Box::new(state),
            },
        }
    }

    /// `ev` as JSON with `field` (of its variant) set to `value`, decoded again.
    fn with_field(ev: &Event, field: &str, value: &str) -> Result<Event, String> {
        let mut v = serde_json::to_value(ev).unwrap();
        let fields = v.as_object_mut().unwrap().values_mut().next().unwrap();
        fields[field] = serde_json::json!(value);
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    /// What the engine writes decodes; a name, slug, md5, folder or stray that
    /// could lead anywhere else does not, and the refusal names the value. (The
    /// journal's bincode runs the same decoders: `tests/journal_format`.)
    #[test]
    fn decoding_accepts_what_stack_writes_only() {
        let md5 = "0123456789abcdef0123456789abcdef";
        let name = |s: &str| SafeName::parse(s).unwrap();
        let make_ref = Event::MakeRef {
            slot: Slot::Package(name("p1")),
            table_id: name("tbl_a"),
            name: name("a.b-c_d"),
            md5: Md5Sum::parse(md5).unwrap(),
            size: None,
            strategy: Strategy::Symlink,
        };
        let put_shared = Event::PutShared {
            table_id: name("tbl_a"),
            md5: Md5Sum::parse(md5).unwrap(),
        };
        let put_bundle = Event::PutBundle {
            slug: name("ops"),
            md5: Md5Sum::parse(md5).unwrap(),
        };
        let remove_dir = Event::RemoveDir {
            slot: Slot::Package(name("p1")),
        };
        let place = Event::Place {
            staged: "place-0".into(),
            rel: "data/_shared".into(),
        };
        let stray = Event::RemoveStray {
            rel: "data/p1/x y.txt".into(),
        };
        let good: [(&Event, &str, &str); 12] = [
            (&make_ref, "name", "a.b-c_d"),
            (&make_ref, "table_id", "tbl_a"),
            (&put_shared, "md5", md5),
            (&put_bundle, "slug", "ops"),
            (&remove_dir, "slug", "_direct"),
            (&remove_dir, "slug", "p1"),
            (&place, "staged", "place-12"),
            (&place, "rel", "data/p1"),
            (&place, "rel", "data/_direct"),
            (&stray, "rel", "memory/old"),
            (&stray, "rel", "data/p1/x y.txt"),
            (&stray, "rel", "data/_shared/x.parquet"),
        ];
        for (ev, field, value) in good {
            let back = with_field(ev, field, value).unwrap_or_else(|e| panic!("{ev:?}: {e}"));
            let back = serde_json::to_value(&back).unwrap();
            let fields = back.as_object().unwrap().values().next().unwrap();
            assert_eq!(fields[field], serde_json::json!(value), "{ev:?}");
        }
        let unsafe_component = |v: &str| format!("{v:?} is not a safe path component");
        let bad: [(&Event, &str, &str, String); 14] = [
            (&make_ref, "name", "../x", unsafe_component("../x")),
            (&make_ref, "table_id", "", unsafe_component("")),
            (&put_shared, "table_id", ".", unsafe_component(".")),
            (&put_bundle, "slug", "..", unsafe_component("..")),
            (
                &remove_dir,
                "slug",
                "_shared/..",
                unsafe_component("_shared/.."),
            ),
            (
                &put_shared,
                "md5",
                "0123456789abcdef0123456789abcde/",
                r#"md5 "0123456789abcdef0123456789abcde/" is not 32 lowercase hex digits"#.into(),
            ),
            (
                &put_bundle,
                "md5",
                "0123456789ABCDEF0123456789abcdef",
                r#"md5 "0123456789ABCDEF0123456789abcdef" is not 32 lowercase hex digits"#.into(),
            ),
            (
                &place,
                "rel",
                "memory/x",
                r#"folder "memory/x" is not one stack places"#.into(),
            ),
            (
                &place,
                "rel",
                "data/../x",
                r#"folder "data/../x" is not one stack places"#.into(),
            ),
            (
                &place,
                "rel",
                "data",
                r#"folder "data" is not one stack places"#.into(),
            ),
            (
                &place,
                "staged",
                "../x",
                r#"staged folder "../x" is not one stack makes"#.into(),
            ),
            (
                &place,
                "staged",
                "other",
                r#"staged folder "other" is not one stack makes"#.into(),
            ),
            (
                &stray,
                "rel",
                "memory/../../x",
                r#"stray "memory/../../x" is not a path under data/ or memory/"#.into(),
            ),
            (
                &stray,
                "rel",
                ".stack/journal",
                r#"stray ".stack/journal" is not a path under data/ or memory/"#.into(),
            ),
        ];
        for (ev, field, value, why) in bad {
            let e = with_field(ev, field, value).expect_err(value);
            assert!(e.contains(&why), "{field} {value:?}: {e}");
        }
    }

    /// A checkpoint whose state has absent optional fields decodes (under bincode,
    /// `skip_serializing_if` would drop them from the bytes, and the frame would
    /// scan as a torn tail).
    #[test]
    fn checkpoint_with_absent_optional_fields_round_trips() {
        let record = checkpoint(state(false));
        let mut bytes = frame::header().to_vec();
        bytes.extend(frame::encode_frame(std::slice::from_ref(&record)).unwrap());
        let scan = frame::scan(&bytes);
        assert_eq!(scan.end, frame::End::Clean);
        assert_eq!(scan.records, vec![(frame::HEADER_LEN as u64, record)]);
    }

    /// The borrowed checkpoint record encodes to the bytes of the owned one, with
    /// and without optional fields, in the journal and in JSON.
    #[test]
    fn borrowed_checkpoint_record_encodes_as_the_owned_one() {
        for with_optionals in [false, true] {
            let s = state(with_optionals);
            let owned = Record {
                seq: 7,
                txn: 3,
                event: Event::Checkpoint {
                    state: Box::new(s.clone()),
                },
            };
            let borrowed = CheckpointRecord {
                seq: 7,
                txn: 3,
                state: &s,
            };
            assert_eq!(
                frame::encode_frame(std::slice::from_ref(&owned)).unwrap(),
                {
                    let mut out = Vec::new();
                    frame::encode_frame_into(&mut out, std::slice::from_ref(&borrowed)).unwrap();
                    out
                }
            );
            assert_eq!(
                serde_json::to_value(&owned).unwrap(),
                serde_json::to_value(&borrowed).unwrap()
            );
        }
    }

    /// JSON (`journal show --json`) still renders the state as `sync_state.json` does.
    #[test]
    fn checkpoint_json_is_the_state_file_shape() {
        let s = state(false);
        let json = serde_json::to_value(checkpoint(s.clone()).event).unwrap();
        assert_eq!(
            json["Checkpoint"]["state"],
            serde_json::to_value(&s).unwrap()
        );
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, checkpoint(s).event);
    }

    /// A frozen, independent model of a state (each entry spelling out its
    /// `ref_path` and `shared_path`, every field a plain serde field): a checkpoint
    /// it writes (all optional fields present) must keep
    /// its bytes under today's encoder and decode to the same state, and
    /// `sync_state.json`'s text must be the derived model's, optional fields absent
    /// or not. The model is a copy, not today's serializer, so the test compares two
    /// independent writers.
    #[test]
    fn checkpoint_and_state_text_match_the_frozen_old_model() {
        use crate::model::state::{JournalEnd, JournalPos, Pulled};
        use std::collections::BTreeMap;
        #[derive(Serialize)]
        struct OldEntry {
            name: String,
            md5: String,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            size: Option<u64>,
            ref_path: String,
            shared_path: String,
            strategy: Strategy,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            ref_fp: Option<StatFp>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            shared_fp: Option<StatFp>,
        }
        #[derive(Serialize)]
        struct OldPos {
            txn: u64,
            seq: u64,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            at: Option<JournalEnd>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pulled: Option<Pulled>,
        }
        #[derive(Serialize)]
        struct OldState {
            version: u32,
            journal: OldPos,
            direct_tables: BTreeMap<String, OldEntry>,
            data_packages: BTreeMap<String, BTreeMap<String, OldEntry>>,
            memory_domains: BTreeMap<String, DomainEntry>,
        }
        #[derive(Serialize)]
        enum OldEvent<'a> {
            _V0,
            _V1,
            _V2,
            _V3,
            _V4,
            _V5,
            _V6,
            _V7,
            _V8,
            _V9,
            _V10,
            _V11,
            Checkpoint { state: &'a OldState },
        }
        // (slot dir, id, name, md5, ref_path, shared_path)
        let rows: [(&str, &str, &str, &str, &str, &str); 4] = [
            (
                "",
                "tbl_a",
                "orders",
                "0123456789abcdef0123456789abcdef",
                "data/_direct/orders.parquet",
                "data/_shared/tbl_a.parquet",
            ),
            (
                "sales",
                "tbl_a",
                "orders",
                "00112233445566778899aabbccddeeff",
                "data/_direct/orders.parquet",
                "data/_shared/tbl_a.parquet",
            ),
            (
                "sales",
                "tbl_b",
                "b",
                "ffeeddccbbaa99887766554433221100",
                "data/sales/b.parquet",
                "data/_shared/tbl_b.parquet",
            ),
            (
                "sales",
                "tbl_c",
                "c",
                "d41d8cd98f00b204e9800998ecf8427e",
                "data/sales/c.parquet",
                "data/_shared/other.parquet",
            ),
        ];
        for with_optionals in [true, false] {
            let old_entry = |r: &(&str, &str, &str, &str, &str, &str)| OldEntry {
                name: r.2.into(),
                md5: r.3.into(),
                size: with_optionals.then_some(10),
                ref_path: r.4.into(),
                shared_path: r.5.into(),
                strategy: Strategy::Copy,
                ref_fp: with_optionals.then_some(FP),
                shared_fp: with_optionals.then_some(FP),
            };
            let new_entry = |slot: SlotRef<'_>, r: &(&str, &str, &str, &str, &str, &str)| {
                let mut e = TableEntry::new(
                    r.2.try_into().unwrap(),
                    r.3.try_into().unwrap(),
                    with_optionals.then_some(10),
                    Strategy::Copy,
                )
                .with_paths((slot, r.1), r.4, r.5);
                e.ref_fp = with_optionals.then_some(FP);
                e.shared_fp = with_optionals.then_some(FP);
                e
            };
            let domain = DomainEntry {
                md5: "d41d8cd98f00b204e9800998ecf8427e".try_into().unwrap(),
                path: "memory/ops/bundle.md".into(),
                fp: with_optionals.then_some(FP),
            };
            let mut old = OldState {
                version: 1,
                journal: OldPos {
                    txn: 4,
                    seq: 9,
                    at: None,
                    pulled: None,
                },
                direct_tables: BTreeMap::new(),
                data_packages: BTreeMap::new(),
                memory_domains: BTreeMap::from([("ops".to_string(), domain.clone())]),
            };
            let mut new = SyncState {
                journal: JournalPos {
                    txn: 4,
                    seq: 9,
                    at: None,
                    pulled: None,
                },
                memory_domains: BTreeMap::from([("ops".try_into().unwrap(), domain)]),
                ..SyncState::default()
            };
            for r in &rows {
                if r.0.is_empty() {
                    old.direct_tables.insert(r.1.into(), old_entry(r));
                    new.direct_tables
                        .insert(r.1.try_into().unwrap(), new_entry(SlotRef::Direct, r));
                } else {
                    old.data_packages
                        .entry(r.0.into())
                        .or_default()
                        .insert(r.1.into(), old_entry(r));
                    new.data_packages
                        .entry(r.0.try_into().unwrap())
                        .or_default()
                        .insert(
                            r.1.try_into().unwrap(),
                            new_entry(SlotRef::Package(&r.0.try_into().unwrap()), r),
                        );
                }
            }
            // The state file's text.
            assert_eq!(
                serde_json::to_string(&new).unwrap(),
                serde_json::to_string(&old).unwrap()
            );
            let back =
                crate::model::state::parse_state(serde_json::to_string(&old).unwrap().as_bytes())
                    .unwrap();
            assert_eq!(back, new);
            if with_optionals {
                // The journal's bytes, both ways.
                let cfg = bincode::config::standard();
                let old_bytes =
                    bincode::serde::encode_to_vec(OldEvent::Checkpoint { state: &old }, cfg)
                        .unwrap();
                let ev = checkpoint(new.clone()).event;
                assert_eq!(bincode::serde::encode_to_vec(&ev, cfg).unwrap(), old_bytes);
                let (decoded, _): (Event, usize) =
                    bincode::serde::decode_from_slice(&old_bytes, cfg).unwrap();
                assert_eq!(decoded, ev);
            }
        }
    }
}
