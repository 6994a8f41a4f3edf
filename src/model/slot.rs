//! Where a table reference lives ([`Slot`], [`SlotRef`]) and the link strategy a pull
//! is asked for ([`LinkMode`]): names the manifest, the journal's events, the state
//! and the layout share. Pure data.
//!
//! Compatibility: `Slot` and `LinkMode` are part of the journal's encoding (bincode,
//! variants by index); a change to them is a change of journal format.

use serde::{Deserialize, Serialize};

use crate::model::name::SafeName;

/// Where a table reference lives: a direct table or a package's table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Slot {
    /// `data/_direct/<name>.parquet`.
    Direct,
    /// `data/<slug>/<name>.parquet`.
    Package(SafeName),
}

/// Where a reference lives: [`Slot`], borrowing the package's slug (from a
/// manifest or a state). Ordered as `Slot` is (direct first, then packages by slug).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SlotRef<'m> {
    Direct,
    Package(&'m SafeName),
}

impl<'m> SlotRef<'m> {
    /// The journal's (owned) slot.
    pub fn to_slot(self) -> Slot {
        match self {
            SlotRef::Direct => Slot::Direct,
            SlotRef::Package(slug) => Slot::Package(slug.clone()),
        }
    }

    /// `slot`, borrowed.
    pub fn of(slot: &'m Slot) -> SlotRef<'m> {
        match slot {
            Slot::Direct => SlotRef::Direct,
            Slot::Package(slug) => SlotRef::Package(slug),
        }
    }
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
