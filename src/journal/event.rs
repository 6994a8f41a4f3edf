//! The events of the journal: the single list of everything the engine can do.
//!
//! Owns: [`Event`], [`Record`] and [`Slot`]. A new kind of mutation is a new variant
//! here first; the applier (`reconcile::apply`), the projection (`replay::project`) and
//! `journal show` all match on this enum exhaustively, so nothing can be done that
//! the journal cannot say.
//!
//! Compatibility: variants are encoded by index (bincode), so new variants are only
//! ever appended at the end, and a change to an existing variant's fields needs a new
//! journal format version (see `journal::FORMAT_VERSION`).

use serde::{Deserialize, Serialize};

use crate::replay::state::{StatFp, Strategy, SyncState};

/// Where a table reference lives: a direct table or a package's table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Slot {
    /// `data/_direct/<name>.parquet`.
    Direct,
    /// `data/<slug>/<name>.parquet`.
    Package(String),
}

/// The link strategy a pull was asked for (`--link`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LinkMode {
    Auto,
    Symlink,
    Hardlink,
    Copy,
    Reflink,
}

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
/// derived from ids, names and slugs that validation proved to be safe single
/// path components, so a journal cannot point outside the local directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A pull starts. `manifest_md5` identifies the manifest it pulls.
    Begin {
        manifest_md5: String,
        link: LinkMode,
    },
    /// Intent to download `url` into `.stack/staging/<md5>` (invisible until applied).
    Stage { md5: String, url: String },
    /// Apply: place staged `<md5>` as `data/_shared/<table_id>.parquet`, read-only.
    PutShared { table_id: String, md5: String },
    /// Apply: (re)make the reference of `table_id` in `slot` as `name`, and record
    /// its state entry.
    MakeRef {
        slot: Slot,
        table_id: String,
        name: String,
        md5: String,
        size: Option<u64>,
        strategy: Strategy,
    },
    /// Apply: move the reference of `table_id` in `slot` to the trash; drop its entry.
    RemoveRef {
        slot: Slot,
        table_id: String,
        name: String,
    },
    /// Apply: move `data/_shared/<table_id>.parquet` to the trash.
    RemoveShared { table_id: String },
    /// Apply: place staged `<md5>` as `memory/<slug>/bundle.md`; record the domain.
    PutBundle { slug: String, md5: String },
    /// Apply: move `memory/<slug>/` to the trash; drop the domain.
    RemoveBundle { slug: String },
    /// Apply: remove the folder `data/<slug>/` if it is empty.
    RemoveDir { slug: String },
    /// The commit point: every event of the plan is in the journal and durable.
    /// From here recovery rolls forward.
    Prepared,
    /// Every step is applied and durable and `sync_state.json` written. Carries the
    /// stat fingerprints of the files the transaction wrote (relative path → stat).
    Committed { fingerprints: Vec<(String, StatFp)> },
    /// The transaction was rolled back before its commit point; nothing visible changed.
    Aborted { reason: String },
    /// The whole projection at this point; compaction starts a journal with it.
    Checkpoint { state: Box<SyncState> },
    /// `stack gc`: move `rel` (a file or folder under `data/` or `memory/` that no
    /// state entry holds) to the trash.
    RemoveStray { rel: String },
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
                format!("data/_shared/{table_id}.parquet = {md5}")
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
            Event::RemoveShared { table_id } => format!("data/_shared/{table_id}.parquet"),
            Event::PutBundle { slug, md5 } => format!("memory/{slug}/bundle.md = {md5}"),
            Event::RemoveBundle { slug } => format!("memory/{slug}/"),
            Event::RemoveDir { slug } => format!("data/{slug}/"),
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
        }
    }
}
