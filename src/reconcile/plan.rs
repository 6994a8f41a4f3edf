//! The planner: (current projection, desired stack, link strategy, damage found) →
//! the ordered operations of one pull, plus its report counts.
//!
//! Architecture invariant: this module does no I/O. Everything it needs to know
//! about the disk comes in as [`Damage`] (found by `reconcile::heal`) and a resolved
//! [`Strategy`]; everything it decides goes out as journal [`Event`]s.
//!
//! Order of operations (and why): reference removals first, so that a new reference
//! may take a path an old one held; then shared files, then references (which need
//! their shared file), then shared removals, bundles, and empty package folders last.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::Serialize;

use crate::journal::event::{Event, LinkMode, Slot};
use crate::reconcile::manifest::{Desired, SlotRef, WantDomain, WantRef, WantTable};
use crate::reconcile::origin::Item;
use crate::replay::state::{Md5Sum, SafeName, Strategy, SyncState};

/// The wanted references, by slot and table id.
type Refs<'m> = BTreeMap<(SlotRef<'m>, &'m SafeName), WantRef<'m>>;

/// Report counts of one section (contract §5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub added: u64,
    pub updated: u64,
    pub removed: u64,
    pub unchanged: u64,
    pub skipped: u64,
}

/// Counts of the three sections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub direct_tables: Counts,
    pub data_packages: Counts,
    pub memory_domains: Counts,
}

impl Tally {
    fn of(&mut self, slot: SlotRef<'_>) -> &mut Counts {
        match slot {
            SlotRef::Direct => &mut self.direct_tables,
            SlotRef::Package(_) => &mut self.data_packages,
        }
    }
}

/// What the disk check found wrong with the current stack.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Damage {
    /// Table ids whose shared file is missing or has the wrong content.
    pub shared: BTreeSet<SafeName>,
    /// References that are missing or wrong.
    pub refs: BTreeSet<(Slot, SafeName)>,
    /// Domains whose bundle is missing or changed.
    pub domains: BTreeSet<SafeName>,
    /// Relative paths whose stat changed but whose content is right: only their
    /// fingerprints need recording.
    pub refresh: Vec<String>,
    /// Relative paths of damaged files (above) that hold bytes stack did not
    /// write (a user's file or edit), sorted: moved to the quarantine before the
    /// pull re-makes or removes them, never trashed.
    pub foreign: Vec<String>,
}

/// One download to stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageItem {
    pub md5: Md5Sum,
    pub url: String,
    pub item: Item,
    pub size: Option<u64>,
}

/// The plan of one pull.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Downloads, one per distinct md5.
    pub stage: Vec<StageItem>,
    /// The apply operations, in order.
    pub ops: Vec<Event>,
    pub tally: Tally,
    /// Fingerprints to refresh (see [`Damage::refresh`]).
    pub refresh: Vec<String>,
    /// Damaged files holding a user's bytes (see [`Damage::foreign`]).
    pub foreign: Vec<String>,
}

impl Plan {
    /// Does applying this plan change anything?
    pub fn is_noop(&self) -> bool {
        self.ops.is_empty() && self.refresh.is_empty()
    }

    /// Does it make any reference (so the link strategy matters)?
    pub fn makes_refs(&self) -> bool {
        self.ops.iter().any(|e| matches!(e, Event::MakeRef { .. }))
    }
}

/// What the filesystem can do, probed once per pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub reflink: bool,
    pub hardlink: bool,
}

/// The strategy a `--link` mode gives on a filesystem with `caps` (contract §2).
pub fn resolve_strategy(mode: LinkMode, caps: Caps) -> Strategy {
    match mode {
        LinkMode::Auto if caps.reflink => Strategy::Reflink,
        LinkMode::Auto | LinkMode::Symlink => Strategy::Symlink,
        LinkMode::Hardlink if caps.hardlink => Strategy::Hardlink,
        LinkMode::Reflink if caps.reflink => Strategy::Reflink,
        LinkMode::Hardlink | LinkMode::Reflink | LinkMode::Copy => Strategy::Copy,
    }
}

/// The current md5 of each table id (one per id: the state came from valid
/// manifests).
fn current_md5s(state: &SyncState) -> BTreeMap<&SafeName, &Md5Sum> {
    let mut current = BTreeMap::new();
    for (_, id, e) in state.entries() {
        current.insert(id, &e.md5);
    }
    current
}

/// The ids whose shared file must be (re)placed: new or changed content, or damaged.
fn shared_to_put<'m>(
    current_md5: &BTreeMap<&SafeName, &Md5Sum>,
    tables: &BTreeMap<&'m SafeName, WantTable<'m>>,
    damage: &Damage,
) -> BTreeSet<&'m SafeName> {
    tables
        .iter()
        .filter(|&(&id, want)| {
            current_md5.get(id).is_none_or(|m| **m != want.md5) || damage.shared.contains(id)
        })
        .map(|(&id, _)| id)
        .collect()
}

/// Whether a wanted reference is (re)made and with which strategy: `Some` to make
/// it. Tallies it as added, updated or unchanged in `counts` (a silent re-make of a
/// reference whose shared file is re-placed is not counted).
fn decide_ref(
    state: &SyncState,
    (slot, id): (SlotRef<'_>, &SafeName),
    want: &WantRef<'_>,
    (mode, strategy): (LinkMode, Strategy),
    damage: &Damage,
    put_shared: &BTreeSet<&SafeName>,
    counts: &mut Counts,
) -> Option<Strategy> {
    let Some(e) = state_entry(state, slot, id) else {
        counts.added += 1;
        return Some(strategy);
    };
    let changed = e.md5 != want.md5 || e.name != *want.name;
    let content_moved = put_shared.contains(id) && e.strategy != Strategy::Symlink;
    let restrategy = mode != LinkMode::Auto && e.strategy != strategy;
    // A damaged reference (rare): looked up with an owned key only if there is any.
    let ref_damaged =
        !damage.refs.is_empty() && damage.refs.contains(&(slot.to_slot(), id.clone()));
    let damaged = ref_damaged || damage.shared.contains(id);
    let mut use_strategy = strategy;
    if mode == LinkMode::Auto {
        // `auto` keeps whatever strategy an existing reference was given, except a
        // reflink where the filesystem no longer clones (the directory moved): that
        // one takes auto's choice here, so the state records what is really made.
        let lost_reflink = e.strategy == Strategy::Reflink && strategy != Strategy::Reflink;
        use_strategy = if lost_reflink { strategy } else { e.strategy };
    }
    if changed || damaged || restrategy {
        counts.updated += 1;
        Some(use_strategy)
    } else if content_moved {
        // The shared file is re-placed (heal) and this reference holds its own copy
        // of the bytes: re-make it silently.
        Some(use_strategy)
    } else {
        counts.unchanged += 1;
        None
    }
}

/// What planning derives from the state and the desired set before it decides a
/// single reference, whatever the link strategy: each table id's current md5, and
/// the ids whose shared file is (re)placed. Made once per pull, for
/// [`makes_refs`] and then [`plan_from`].
pub struct Basis<'s, 'm> {
    current_md5: BTreeMap<&'s SafeName, &'s Md5Sum>,
    put_shared: BTreeSet<&'m SafeName>,
}

impl<'s, 'm> Basis<'s, 'm> {
    pub fn new(state: &'s SyncState, desired: &Desired<'m>, damage: &Damage) -> Basis<'s, 'm> {
        let current_md5 = current_md5s(state);
        let put_shared = shared_to_put(&current_md5, &desired.tables, damage);
        Basis {
            current_md5,
            put_shared,
        }
    }
}

/// Would [`plan`] make any reference (so that the link strategy matters)? The same
/// decisions as `plan`'s, without building its events: a pull asks this with the
/// optimistic strategy before it probes the filesystem. Pure.
pub fn makes_refs(
    state: &SyncState,
    desired: &Desired<'_>,
    basis: &Basis<'_, '_>,
    (mode, strategy): (LinkMode, Strategy),
    damage: &Damage,
) -> bool {
    let mut counts = Counts::default();
    desired.refs.iter().any(|(&key, want)| {
        let how = (mode, strategy);
        decide_ref(
            state,
            key,
            want,
            how,
            damage,
            &basis.put_shared,
            &mut counts,
        )
        .is_some()
    })
}

/// Plan one pull. Pure.
///
/// The desired set is consumed: its references are freed while their events are
/// built, so a large stack's plan does not hold both at once.
pub fn plan(
    state: &SyncState,
    desired: Desired<'_>,
    mode: LinkMode,
    strategy: Strategy,
    damage: &Damage,
) -> Plan {
    let basis = Basis::new(state, &desired, damage);
    plan_from(state, desired, basis, (mode, strategy), damage)
}

/// [`plan`], from a [`Basis`] already made (and consumed here).
pub fn plan_from<'s, 'm>(
    state: &'s SyncState,
    desired: Desired<'m>,
    basis: Basis<'s, 'm>,
    (mode, strategy): (LinkMode, Strategy),
    damage: &Damage,
) -> Plan {
    let Basis {
        current_md5,
        put_shared,
    } = basis;
    let Desired {
        refs,
        tables,
        domains,
        skipped,
    } = desired;
    let mut p = Plan {
        refresh: damage.refresh.clone(),
        foreign: damage.foreign.clone(),
        ..Plan::default()
    };
    p.tally.direct_tables.skipped = skipped.direct;
    p.tally.data_packages.skipped = skipped.packages;

    // Reference removals (first: a new reference may take the path an old one held).
    let removals = ref_removals(state, &refs, &mut p.tally);
    let (makes, made) = decide_refs(
        state,
        &refs,
        (mode, strategy),
        damage,
        &put_shared,
        &mut p.tally,
    );

    // The tables whose shared file is placed, with their content: `put_shared`'s
    // ids are some of `tables`' keys, both sorted, so one walk pairs them.
    let put: Vec<(&SafeName, &WantTable<'_>)> = {
        let mut wanted = tables.iter();
        put_shared
            .iter()
            .filter_map(|&id| wanted.find(|&(&t, _)| t == id).map(|(&t, w)| (t, w)))
            .collect()
    };
    drop(put_shared);

    // Staging: one download per distinct md5 (a set by hash: the md5s come in no
    // useful order, and a large ordered set of them is a cache miss per level).
    let mut staged: HashSet<Md5Sum> = HashSet::with_capacity(put.len() + domains.len());
    p.stage.reserve_exact(put.len() + domains.len());
    stage_tables(&put, &mut staged, &mut p.stage);

    // Shared files leaving the stack.
    let removed_shared: Vec<&SafeName> = current_md5
        .keys()
        .copied()
        .filter(|id| !tables.contains_key(id))
        .collect();
    let folders_gone = folders_gone(state, &refs);

    p.ops.reserve_exact(
        removals.len()
            + put.len()
            + made
            + removed_shared.len()
            + domains.len()
            + state.memory_domains.len()
            + folders_gone.len(),
    );
    p.ops.extend(removals);
    for (id, want) in put {
        p.ops.push(Event::PutShared {
            table_id: id.clone(),
            md5: want.md5,
        });
    }
    // Consumed: each node of the set is freed once its references are events.
    for (((slot, id), want), decided) in refs.into_iter().zip(makes) {
        if let Some(strategy) = decided {
            p.ops.push(Event::MakeRef {
                slot: slot.to_slot(),
                table_id: id.clone(),
                name: want.name.clone(),
                md5: want.md5,
                size: want.size,
                strategy,
            });
        }
    }
    for id in removed_shared {
        p.ops.push(Event::RemoveShared {
            table_id: id.clone(),
        });
    }

    plan_domains(state, &domains, damage, &mut p, &mut staged);

    for slot in folders_gone {
        p.ops.push(Event::RemoveDir {
            slot: slot.to_slot(),
        });
    }
    p
}

/// The references to (re)make: one decision per wanted reference, in the order of
/// `refs` (a byte or two each, not a borrowed copy of the set), turned into events
/// only once the plan's size is known (a large plan is built in one allocation).
/// Returns the decisions and how many make a reference.
fn decide_refs(
    state: &SyncState,
    refs: &Refs<'_>,
    how: (LinkMode, Strategy),
    damage: &Damage,
    put_shared: &BTreeSet<&SafeName>,
    tally: &mut Tally,
) -> (Vec<Option<Strategy>>, usize) {
    let mut makes: Vec<Option<Strategy>> = Vec::with_capacity(refs.len());
    let mut made = 0;
    for (&(slot, id), want) in refs {
        let counts = match slot {
            SlotRef::Direct => &mut tally.direct_tables,
            SlotRef::Package(_) => &mut tally.data_packages,
        };
        let decided = decide_ref(state, (slot, id), want, how, damage, put_shared, counts);
        made += usize::from(decided.is_some());
        makes.push(decided);
    }
    (makes, made)
}

/// One staged download per table of `put` whose md5 is not staged yet.
fn stage_tables(
    put: &[(&SafeName, &WantTable<'_>)],
    staged: &mut HashSet<Md5Sum>,
    stage: &mut Vec<StageItem>,
) {
    for &(id, want) in put {
        if staged.insert(want.md5) {
            stage.push(StageItem {
                md5: want.md5,
                url: want.url.to_string(),
                item: Item::Table { id: id.to_string() },
                size: want.size,
            });
        }
    }
}

/// The references of `state` that `refs` does not keep at the same name, as
/// `RemoveRef` events (counted as removed when the table leaves the slot).
fn ref_removals(state: &SyncState, refs: &Refs<'_>, tally: &mut Tally) -> Vec<Event> {
    let mut removals = Vec::new();
    for (slot, id, e) in state.entries() {
        match refs.get(&(slot, id)) {
            None => {
                tally.of(slot).removed += 1;
                removals.push(Event::RemoveRef {
                    slot: slot.to_slot(),
                    table_id: id.clone(),
                    name: e.name.clone(),
                });
            }
            Some(want) if *want.name != e.name => {
                // Same table, new file name: move the reference.
                removals.push(Event::RemoveRef {
                    slot: slot.to_slot(),
                    table_id: id.clone(),
                    name: e.name.clone(),
                });
            }
            Some(_) => {}
        }
    }
    removals
}

/// The slots (packages, and the direct tables) whose folders end up with no
/// reference.
fn folders_gone<'a>(state: &'a SyncState, refs: &Refs<'a>) -> Vec<SlotRef<'a>> {
    let mut folders_left: BTreeSet<SlotRef<'a>> = BTreeSet::new();
    // The references are sorted by slot: one insert per run of a slot.
    let mut last_slot = None;
    for (slot, _) in refs.keys() {
        if last_slot != Some(slot) {
            last_slot = Some(slot);
            folders_left.insert(*slot);
        }
    }
    let mut folders_before: BTreeSet<SlotRef<'a>> = BTreeSet::new();
    if !state.direct_tables.is_empty() {
        folders_before.insert(SlotRef::Direct);
    }
    for (slug, tables) in &state.data_packages {
        if !tables.is_empty() {
            folders_before.insert(SlotRef::Package(slug));
        }
    }
    folders_before.difference(&folders_left).copied().collect()
}

/// Memory domains: a bundle put (and staged, once per md5) for each domain that is
/// new, changed or damaged, removed for each one leaving the stack.
fn plan_domains(
    state: &SyncState,
    domains: &BTreeMap<SafeName, WantDomain>,
    damage: &Damage,
    p: &mut Plan,
    staged: &mut HashSet<Md5Sum>,
) {
    for (slug, want) in domains {
        let put = match state.memory_domains.get(slug) {
            None => {
                p.tally.memory_domains.added += 1;
                true
            }
            Some(e) if e.md5 != want.md5 || damage.domains.contains(slug) => {
                p.tally.memory_domains.updated += 1;
                true
            }
            Some(_) => {
                p.tally.memory_domains.unchanged += 1;
                false
            }
        };
        if put {
            if staged.insert(want.md5) {
                p.stage.push(StageItem {
                    md5: want.md5,
                    url: want.url.clone(),
                    item: Item::Bundle {
                        slug: slug.to_string(),
                    },
                    size: None,
                });
            }
            p.ops.push(Event::PutBundle {
                slug: slug.clone(),
                md5: want.md5,
            });
        }
    }
    for slug in state.memory_domains.keys() {
        if !domains.contains_key(slug) {
            p.tally.memory_domains.removed += 1;
            p.ops.push(Event::RemoveBundle { slug: slug.clone() });
        }
    }
}

fn state_entry<'a>(
    state: &'a SyncState,
    slot: SlotRef<'_>,
    id: &str,
) -> Option<&'a crate::replay::state::TableEntry> {
    match slot {
        SlotRef::Direct => state.direct_tables.get(id),
        SlotRef::Package(slug) => state.data_packages.get(slug).and_then(|t| t.get(id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::manifest::{validate, Manifest};
    use crate::reconcile::origin::LocalOrigin;
    use crate::replay::project::apply_event;

    fn md5(c: char) -> String {
        c.to_string().repeat(32)
    }

    fn desired(json: serde_json::Value) -> Desired<'static> {
        // Leaked: the desired set borrows from its manifest (test only).
        let m: &'static Manifest = Box::leak(Box::new(serde_json::from_value(json).unwrap()));
        validate(m, &LocalOrigin::new("/nowhere")).unwrap()
    }

    fn table(id: &str, name: &str, m: char) -> serde_json::Value {
        serde_json::json!({"id": id, "name": name, "md5": md5(m), "parquet_url": format!("/api/data/{id}/download")})
    }

    /// Plan from `state`, then return the plan and the state it leads to.
    fn check(state: &SyncState, d: &Desired, mode: LinkMode) -> (Plan, SyncState) {
        let p = plan(
            state,
            d.clone(),
            mode,
            resolve_strategy(
                mode,
                Caps {
                    reflink: false,
                    hardlink: true,
                },
            ),
            &Damage::default(),
        );
        let mut next = state.clone();
        for e in &p.ops {
            apply_event(&mut next, e);
        }
        (p, next)
    }

    fn kinds(p: &Plan) -> Vec<&'static str> {
        p.ops.iter().map(Event::kind).collect()
    }

    #[test]
    fn shared_table_is_staged_once_and_referenced_twice() {
        let d = desired(serde_json::json!({"data_packages": [
            {"slug": "p1", "tables": [table("tbl_a", "a", 'a')]},
            {"slug": "p2", "tables": [table("tbl_a", "a", 'a')]}]}));
        let (p, next) = check(&SyncState::default(), &d, LinkMode::Auto);
        assert_eq!(p.stage.len(), 1);
        assert_eq!(kinds(&p), ["put_shared", "make_ref", "make_ref"]);
        assert_eq!(p.tally.data_packages.added, 2);
        // Re-planning from the result is a no-op.
        let (again, _) = check(&next, &d, LinkMode::Auto);
        assert!(again.is_noop());
        assert_eq!(again.tally.data_packages.unchanged, 2);
    }

    #[test]
    fn dropping_one_package_keeps_the_shared_file() {
        let both = desired(serde_json::json!({"data_packages": [
            {"slug": "p1", "tables": [table("tbl_a", "a", 'a')]},
            {"slug": "p2", "tables": [table("tbl_a", "a", 'a')]}]}));
        let (_, s1) = check(&SyncState::default(), &both, LinkMode::Auto);
        let one = desired(
            serde_json::json!({"data_packages": [{"slug": "p1", "tables": [table("tbl_a", "a", 'a')]}]}),
        );
        let (p, s2) = check(&s1, &one, LinkMode::Auto);
        assert_eq!(kinds(&p), ["remove_ref", "remove_dir"]);
        assert!(p.stage.is_empty());
        let (p, _) = check(&s2, &desired(serde_json::json!({})), LinkMode::Auto);
        assert_eq!(kinds(&p), ["remove_ref", "remove_shared", "remove_dir"]);
    }

    #[test]
    fn md5_change_replaces_shared_before_references() {
        let v1 = desired(serde_json::json!({"direct_tables": [table("tbl_a", "a", 'a')]}));
        let (_, s1) = check(&SyncState::default(), &v1, LinkMode::Copy);
        let v2 = desired(serde_json::json!({"direct_tables": [table("tbl_a", "a", 'b')]}));
        let (p, s2) = check(&s1, &v2, LinkMode::Copy);
        assert_eq!(kinds(&p), ["put_shared", "make_ref"]);
        assert_eq!(p.tally.direct_tables.updated, 1);
        assert_eq!(s2.direct_tables["tbl_a"].md5.to_string(), md5('b'));
    }

    #[test]
    fn a_freed_path_is_removed_before_it_is_reused() {
        let v1 = desired(
            serde_json::json!({"data_packages": [{"slug": "p", "tables": [table("tbl_a", "x", 'a')]}]}),
        );
        let (_, s1) = check(&SyncState::default(), &v1, LinkMode::Symlink);
        let v2 = desired(
            serde_json::json!({"data_packages": [{"slug": "p", "tables": [table("tbl_b", "x", 'b')]}]}),
        );
        let (p, s2) = check(&s1, &v2, LinkMode::Symlink);
        let k = kinds(&p);
        let remove = k.iter().position(|k| *k == "remove_ref").unwrap();
        let make = k.iter().position(|k| *k == "make_ref").unwrap();
        assert!(remove < make, "{k:?}");
        assert_eq!(s2.data_packages["p"].len(), 1);
        assert!(s2.data_packages["p"].contains_key("tbl_b"));
    }

    #[test]
    fn damage_remakes_without_fetching_unless_the_shared_file_is_bad() {
        let v1 = desired(serde_json::json!({"direct_tables": [table("tbl_a", "a", 'a')]}));
        let (_, s1) = check(&SyncState::default(), &v1, LinkMode::Copy);
        let mut damage = Damage::default();
        damage
            .refs
            .insert((Slot::Direct, "tbl_a".try_into().unwrap()));
        let p = plan(&s1, v1.clone(), LinkMode::Copy, Strategy::Copy, &damage);
        assert_eq!(kinds(&p), ["make_ref"]);
        assert!(p.stage.is_empty());
        let mut damage = Damage::default();
        damage.shared.insert("tbl_a".try_into().unwrap());
        let p = plan(&s1, v1.clone(), LinkMode::Copy, Strategy::Copy, &damage);
        assert_eq!(kinds(&p), ["put_shared", "make_ref"]);
        assert_eq!(p.stage.len(), 1);
    }

    #[test]
    fn auto_keeps_existing_strategies_and_explicit_modes_change_them() {
        let v1 = desired(serde_json::json!({"direct_tables": [table("tbl_a", "a", 'a')]}));
        let (_, s1) = check(&SyncState::default(), &v1, LinkMode::Copy);
        assert!(check(&s1, &v1, LinkMode::Auto).0.is_noop());
        let (p, s2) = check(&s1, &v1, LinkMode::Symlink);
        assert_eq!(kinds(&p), ["make_ref"]);
        assert_eq!(s2.direct_tables["tbl_a"].strategy, Strategy::Symlink);
    }

    #[test]
    fn remote_tables_are_counted_as_skipped() {
        let d = desired(serde_json::json!({"direct_tables": [
            {"id": "tbl_r", "name": "r", "md5": md5('c'), "query_mode": "remote"}]}));
        let (p, _) = check(&SyncState::default(), &d, LinkMode::Auto);
        assert!(p.is_noop());
        assert_eq!(p.tally.direct_tables.skipped, 1);
    }
}
