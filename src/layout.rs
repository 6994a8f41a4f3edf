//! The local directory's layout (contract §2): the one place that turns ids, names
//! and slugs into paths.
//!
//! Invariant kept: every path built here is `<dir>` joined with components that
//! are single safe path components (a `model::name::SafeName` or an `Md5Sum`,
//! validated where they were read), so no path can leave the local directory.

use std::path::{Path, PathBuf};

use crate::model::name::is_safe_component;
use crate::model::slot::{Slot, SlotRef};

/// The state file, relative to the local directory.
pub const STATE_FILE: &str = "sync_state.json";
/// The engine-private folder.
pub const PRIVATE_DIR: &str = ".stack";
/// The shared-table folder, relative.
pub const SHARED_DIR: &str = "data/_shared";
/// Its name under `data/` (no slot's folder: a slug cannot start with `_`).
pub const SHARED_FOLDER: &str = "_shared";

/// The prefix of a placed folder's name in `.stack/staging/` (`reconcile::place`).
pub const PLACE_PREFIX: &str = "place-";

/// The folder under `data/` of the direct tables' references.
pub const DIRECT_DIR: &str = "_direct";
/// What a table's file name adds to its stem: its id in `_shared`, its name in a
/// slot's folder.
pub const TABLE_EXT: &str = ".parquet";

/// `<stem>.parquet`: a table's file name in its folder (its id in `_shared`, its
/// name in a slot's folder).
pub fn table_file(stem: &str) -> String {
    format!("{stem}{TABLE_EXT}")
}

/// `data/_shared/<table_id>.parquet`
pub fn shared_rel(table_id: &str) -> String {
    let mut out = String::new();
    push_shared_rel(&mut out, table_id);
    out
}

/// [`shared_rel`], appended to `out`.
pub fn push_shared_rel(out: &mut String, table_id: &str) {
    out.push_str(SHARED_DIR);
    out.push('/');
    out.push_str(table_id);
    out.push_str(TABLE_EXT);
}

/// The folder of a slot, relative: `data/_direct` or `data/<slug>`.
pub fn slot_dir_rel(slot: &Slot) -> String {
    let mut out = String::new();
    push_slot_dir_rel(&mut out, SlotRef::of(slot));
    out
}

/// The name under `data/` of a slot's folder: `_direct` or the slug.
pub fn slot_folder(slot: SlotRef<'_>) -> &str {
    match slot {
        SlotRef::Direct => DIRECT_DIR,
        SlotRef::Package(slug) => slug,
    }
}

/// [`slot_dir_rel`], appended to `out`.
pub fn push_slot_dir_rel(out: &mut String, slot: SlotRef<'_>) {
    out.push_str("data/");
    out.push_str(slot_folder(slot));
}

/// `data/_direct/<name>.parquet` or `data/<slug>/<name>.parquet`
pub fn ref_rel(slot: &Slot, name: &str) -> String {
    let mut out = String::new();
    push_ref_rel(&mut out, SlotRef::of(slot), name);
    out
}

/// [`ref_rel`], appended to `out`.
pub fn push_ref_rel(out: &mut String, slot: SlotRef<'_>, name: &str) {
    push_slot_dir_rel(out, slot);
    out.push('/');
    out.push_str(name);
    out.push_str(TABLE_EXT);
}

/// Whether `path` is [`ref_rel`] of `slot` and `name` (compared piece by piece,
/// without building it).
pub fn is_ref_rel(path: &str, slot: SlotRef<'_>, name: &str) -> bool {
    is_joined(path, &["data/", slot_folder(slot), "/", name, TABLE_EXT])
}

/// Whether `path` is [`shared_rel`] of `table_id`.
pub fn is_shared_rel(path: &str, table_id: &str) -> bool {
    is_joined(path, &[SHARED_DIR, "/", table_id, TABLE_EXT])
}

/// Whether `name` is a folder `reconcile::place` builds in `.stack/staging/`
/// (`place-<k>`).
pub fn is_place_folder(name: &str) -> bool {
    name.starts_with(PLACE_PREFIX) && is_safe_component(name)
}

/// Whether `rel` is a folder a pull may build out of sight and place whole: the
/// shared files' folder, or a slot's folder ([`slot_dir_rel`] of a safe slug).
pub fn is_placeable_dir_rel(rel: &str) -> bool {
    rel == SHARED_DIR
        || rel
            .strip_prefix("data/")
            .is_some_and(|f| f == DIRECT_DIR || is_safe_component(f))
}

/// The `table_id` whose [`shared_rel`] `path` is, if any: the one id for which
/// [`is_shared_rel`] holds.
pub fn shared_id_of(path: &str) -> Option<&str> {
    path.strip_prefix(SHARED_DIR)?
        .strip_prefix('/')?
        .strip_suffix(TABLE_EXT)
}

/// `path` is `parts` joined.
fn is_joined(path: &str, parts: &[&str]) -> bool {
    let mut rest = path;
    for p in parts {
        match rest.strip_prefix(p) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}

/// `memory/<slug>/bundle.md`
pub fn bundle_rel(slug: &str) -> String {
    format!("memory/{slug}/bundle.md")
}

/// The slug whose [`bundle_rel`] `rel` is, if it is one's.
pub fn bundle_slug_of(rel: &str) -> Option<&str> {
    rel.strip_prefix("memory/")?.strip_suffix("/bundle.md")
}

/// `data/<rest>`: a path under the data folder (`rest` as listed there).
pub fn data_rel(rest: &str) -> String {
    format!("data/{rest}")
}

/// What follows `data/` in `rel`, if `rel` is under the data folder.
pub fn under_data(rel: &str) -> Option<&str> {
    rel.strip_prefix("data/")
}

/// What follows `memory/` in `rel`, if `rel` is under the memory folder.
pub fn under_memory(rel: &str) -> Option<&str> {
    rel.strip_prefix("memory/")
}

/// Whether `rel` is one of the two top folders a stack's files live in
/// (`data`, `memory`).
pub fn is_top_dir(rel: &str) -> bool {
    rel == "data" || rel == "memory"
}

/// `memory/<slug>`
pub fn domain_dir_rel(slug: &str) -> String {
    format!("memory/{slug}")
}

/// The symlink target of a reference: relative, so the directory can move.
pub fn symlink_target(table_id: &str) -> PathBuf {
    PathBuf::from(format!("../{SHARED_FOLDER}/{table_id}{TABLE_EXT}"))
}

/// Absolute (or cwd-relative) paths of one local directory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }
    pub fn join(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
    /// `path` (under the directory) relative to it, as reports name it.
    pub fn rel(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned()
    }
    pub fn state_file(&self) -> PathBuf {
        self.root.join(STATE_FILE)
    }
    pub fn private(&self) -> PathBuf {
        self.root.join(PRIVATE_DIR)
    }
    pub fn journal(&self) -> PathBuf {
        self.private().join("journal")
    }
    pub fn lock_file(&self) -> PathBuf {
        self.private().join("lock")
    }
    pub fn staging(&self) -> PathBuf {
        self.private().join("staging")
    }
    /// A complete, verified staged file.
    pub fn staged(&self, md5: &str) -> PathBuf {
        self.staging().join(md5)
    }
    /// A download in progress (kept across rollbacks so the next pull resumes it).
    pub fn partial(&self, md5: &str) -> PathBuf {
        self.staging().join(format!("{md5}.part"))
    }
    /// The new journal a compaction writes before renaming it over the journal.
    pub fn journal_compact(&self) -> PathBuf {
        self.private().join("journal.compact")
    }
    /// Scratch folder for files made before being renamed into place.
    pub fn tmp(&self) -> PathBuf {
        self.private().join("tmp")
    }
    /// What transactions removed or replaced, until they end (`<txn>/`).
    pub fn trash(&self) -> PathBuf {
        self.private().join("trash")
    }
    /// Transaction `txn`'s part of the trash.
    pub fn trash_of(&self, txn: u64) -> PathBuf {
        self.trash().join(txn.to_string())
    }
    /// The old file step `seq` of transaction `txn` removed or replaced, kept
    /// for a rollback (`reconcile::undo`).
    pub fn kept(&self, txn: u64, seq: u64) -> PathBuf {
        self.trash_of(txn).join(seq.to_string())
    }
    /// Step `seq`'s new file, moved out of its name by a rollback.
    pub fn unput(&self, txn: u64, seq: u64) -> PathBuf {
        self.trash_of(txn).join(format!("undo-{seq}"))
    }
    /// The room a transaction holds for what it writes after its commit point
    /// (`reconcile::room`).
    pub fn reserve(&self) -> PathBuf {
        self.private().join("reserve")
    }
    /// Present (and durable) while transaction `txn` is being rolled back past its
    /// commit point (`reconcile::undo`): recovery then only rolls it back.
    pub fn rolling_back(&self, txn: u64) -> PathBuf {
        self.trash_of(txn).join("rolling-back")
    }
    /// Where stack keeps what it moved out of its folders and did not write
    /// (`<txn>/<its relative path>`): a stray `gc` or a pull removed, a file in
    /// a put's way, one a rollback moved aside. Recoverable until `gc --force`
    /// deletes it.
    pub fn quarantine(&self) -> PathBuf {
        self.private().join("quarantine")
    }
    /// Transaction `txn`'s part of the quarantine.
    pub fn quarantine_of(&self, txn: u64) -> PathBuf {
        self.quarantine().join(txn.to_string())
    }
    /// Where transaction `txn` keeps `rel` in the quarantine.
    pub fn quarantined(&self, txn: u64, rel: &str) -> PathBuf {
        self.quarantine_of(txn).join(rel)
    }
    pub fn data(&self) -> PathBuf {
        self.root.join("data")
    }
    pub fn memory(&self) -> PathBuf {
        self.root.join("memory")
    }
    pub fn shared_dir(&self) -> PathBuf {
        self.root.join(SHARED_DIR)
    }
}

/// Is `rel` a path `stack gc` may remove: relative, under `data/` or `memory/`,
/// without `.` or `..`?
pub fn is_stray_rel(rel: &str) -> bool {
    (rel.starts_with("data/") || rel.starts_with("memory/")) && is_engine_path(rel)
}

/// Is `rel` (a relative path from the state file) one the engine could have made?
/// Used when reading a state file a user may have edited.
pub fn is_engine_path(rel: &str) -> bool {
    let p = Path::new(rel);
    !p.is_absolute()
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}
