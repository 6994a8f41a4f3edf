//! Placing whole folders: the apply of a folder the stack gains whole.
//!
//! Owns: `.stack/staging/place-<k>/`, and the rule of which steps' files travel
//! inside such a folder ([`travels_in`]).
//!
//! A folder that did not exist when a pull was planned (`data/_shared` and the
//! reference folders of a first pull, the folder of a new package) is built out of
//! sight before the commit point: staging writes each table whose staged file has
//! a single consumer straight to its final name inside it, and its symlink
//! references are made inside it. After the commit point one `Place` step moves
//! the folder into place: one rename instead of one rename or symlink per file, in
//! a folder whose name lock every thread would otherwise queue on.
//!
//! Invariants kept:
//! - Before the commit point a placed folder is staging like any other: invisible,
//!   made durable by the same `syncfs`, removed whole by a rollback.
//! - Whether a step's file travels is a function of the transaction's own events
//!   ([`travels_in`] over [`consumers`]), so the planner, the pull's apply and a
//!   recovery's apply agree on it.
//! - A folder that a removal of the plan names is never placed (the user deleted
//!   it; the state still lists references in it): removals run after the `Place`
//!   steps, and would take the new file of a name the plan reuses.
//! - An applier skips a travelling step only if it moved that folder itself, so it
//!   knows the folder's files are the staged ones. After a crash that came once the
//!   folder was moved, the step runs as any other and finds its file in place (a
//!   put re-hashes it; a symlink is remade through `.stack/tmp`).
//! - A folder the user made between the plan and the `Place` is merged into, and
//!   never loses a file: what holds a staged entry's name goes to the quarantine
//!   first (`reconcile::apply`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};
use crate::fs::Fs;
use crate::journal::event::{Event, SlotRef};
use crate::layout::{self, Layout};
use crate::reconcile::plan::Plan;
use crate::replay::state::Strategy;

/// One folder built out of sight: `.stack/staging/<staged>/` becomes `rel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folder {
    pub rel: String,
    pub staged: String,
}

/// What a pull builds out of sight besides its staged files. Compact: indices
/// into the plan's steps, not paths (a first pull of 100k tables has as many).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    pub folders: Vec<Folder>,
    /// Per stage item of the plan (same order): `(folder, step)` if its file
    /// travels, written as that step's file in that folder instead of `<md5>`.
    pub dests: Vec<Option<(u32, u32)>>,
    /// `(folder, step)` of each symlink reference to make before the commit point.
    pub links: Vec<(u32, u32)>,
}

impl Placement {
    /// The `Place` steps, to come first in the commit batch.
    pub fn events(&self) -> Vec<Event> {
        self.folders
            .iter()
            .map(|f| Event::Place {
                staged: f.staged.clone(),
                rel: f.rel.clone(),
            })
            .collect()
    }

    /// Where stage item `i` is written, if its file travels: its final name in
    /// its placed folder under `.stack/staging/`. `ops` are the plan's steps.
    pub fn dest(&self, layout: &Layout, ops: &[Event], i: usize) -> Option<PathBuf> {
        let (k, step) = self.dests.get(i).copied().flatten()?;
        let dir = layout.staging().join(&self.folders[k as usize].staged);
        match &ops[step as usize] {
            Event::PutShared { table_id, .. } => Some(dir.join(layout::table_file(table_id))),
            _ => None,
        }
    }
}

/// How many steps of a transaction consume each staged md5 (a put of a shared
/// file or of a bundle). A staged file with one consumer can be moved instead of
/// linked or copied.
pub fn consumers<'e>(events: impl IntoIterator<Item = &'e Event>) -> HashMap<&'e str, u32> {
    let events = events.into_iter();
    // Sized once (a put per step at most): a large plan's map is not rehashed as
    // it grows.
    let mut uses: HashMap<&str, u32> = HashMap::with_capacity(events.size_hint().0);
    for e in events {
        if let Event::PutShared { md5, .. } | Event::PutBundle { md5, .. } = e {
            *uses.entry(md5.as_str()).or_default() += 1;
        }
    }
    uses
}

/// The folder (relative) a step's file travels in if that folder is placed: a
/// put of a shared file whose staged file it alone consumes (`sole`), or a
/// symlink reference. `None` for any other step.
pub fn travels_in(ev: &Event, sole: bool) -> Option<String> {
    let mut out = String::new();
    push_travels_in(ev, sole, &mut out).then_some(out)
}

/// [`travels_in`], appended to `out`: `false` (and `out` unchanged) for a step
/// whose file travels in no placed folder.
pub fn push_travels_in(ev: &Event, sole: bool, out: &mut String) -> bool {
    match ev {
        Event::PutShared { .. } if sole => out.push_str(layout::SHARED_DIR),
        Event::MakeRef {
            slot,
            strategy: Strategy::Symlink,
            ..
        } => layout::push_slot_dir_rel(out, SlotRef::of(slot)),
        _ => return false,
    }
    true
}

/// Which of the plan's folders to build out of sight: those in `absent` (folders
/// that did not exist when the plan was checked) that some step's file travels in
/// and no removal names.
pub fn plan(p: &Plan, absent: &BTreeSet<String>) -> Placement {
    let uses = consumers(&p.ops);
    let stage_of: HashMap<&str, usize> = p
        .stage
        .iter()
        .enumerate()
        .map(|(i, s)| (s.md5.as_str(), i))
        .collect();
    let mut out = Placement {
        dests: vec![None; p.stage.len()],
        ..Placement::default()
    };
    let (Ok(_), Ok(_)) = (u32::try_from(p.ops.len()), u32::try_from(p.stage.len())) else {
        return out;
    };
    // A folder a removal names is not placed even if absent (the user deleted
    // it; the state still lists references in it): the removals run after the
    // `Place` steps, and would take the new file of a name the plan reuses.
    let removed_in: BTreeSet<String> = p
        .ops
        .iter()
        .filter_map(|e| match e {
            Event::RemoveRef { slot, .. } => Some(layout::slot_dir_rel(slot)),
            _ => None,
        })
        .collect();
    let mut index: HashMap<String, u32> = HashMap::new();
    // Steps come in runs of one folder (the shared files, then each slot's
    // references): the folder's decision is looked up once per run, and its name
    // built in one buffer, not once per step.
    let mut rel = String::new();
    let mut last: Option<(String, Option<u32>)> = None;
    for (step, ev) in p.ops.iter().enumerate() {
        let sole = matches!(ev, Event::PutShared { md5, .. } if uses.get(md5.as_str()) == Some(&1));
        rel.clear();
        if !push_travels_in(ev, sole, &mut rel) {
            continue;
        }
        let k = match &last {
            Some((prev, k)) if *prev == rel => *k,
            _ => {
                let k = if !absent.contains(rel.as_str()) || removed_in.contains(&rel) {
                    None
                } else {
                    let next = out.folders.len() as u32;
                    let k = *index.entry(rel.clone()).or_insert(next);
                    if k == next {
                        out.folders.push(Folder {
                            rel: rel.clone(),
                            staged: format!("{}{k}", layout::PLACE_PREFIX),
                        });
                    }
                    Some(k)
                };
                last = Some((rel.clone(), k));
                k
            }
        };
        let Some(k) = k else {
            continue;
        };
        let at = (k, step as u32);
        match ev {
            Event::PutShared { md5, .. } => match stage_of.get(md5.as_str()) {
                Some(&i) => out.dests[i] = Some(at),
                // Every put stages its md5; if one did not, its file would not be in
                // the folder that its step skips: place nothing.
                None => return Placement::default(),
            },
            Event::MakeRef { .. } => out.links.push(at),
            _ => {}
        }
    }
    out
}

/// Make the placed folders, empty, under `.stack/staging/` (before staging).
pub fn prepare(fs: &dyn Fs, layout: &Layout, placement: &Placement) -> Result<()> {
    for f in &placement.folders {
        let dir = layout.staging().join(&f.staged);
        // A leftover of an interrupted pull would have been removed by recovery;
        // whatever is there is not this pull's.
        if fs.exists(&dir).at("stat", &dir)? {
            fs.remove_tree(&dir).at("remove", &dir)?;
        }
        fs.create_dir_all(&dir).at("mkdir", &dir)?;
    }
    Ok(())
}

/// Make the symlink references inside the placed folders (after staging, before
/// the `syncfs` that precedes the commit point), on up to `threads` threads.
pub fn make_links(
    fs: &dyn Fs,
    layout: &Layout,
    placement: &Placement,
    ops: &[Event],
    threads: usize,
) -> Result<()> {
    // A folder's links at a time (`Fs::symlinks_in`), in units small enough to
    // spread over the threads. The kernel makes one folder's entries one at a time
    // (its lock), and threads on one folder spin on that lock: the units are dealt
    // from the folders in turn, so that threads taking them in order mostly work
    // in different folders.
    let mut per_folder: Vec<std::slice::Chunks<'_, (u32, u32)>> = placement
        .links
        .chunk_by(|a, b| a.0 == b.0)
        .map(|run| run.chunks(512))
        .collect();
    let mut units: Vec<&[(u32, u32)]> = Vec::new();
    loop {
        let before = units.len();
        units.extend(per_folder.iter_mut().filter_map(Iterator::next));
        if units.len() == before {
            break;
        }
    }
    crate::par::map_balanced(&units, threads, |unit| {
        let Some(&(k, _)) = unit.first() else {
            return Ok(());
        };
        let dir = layout.staging().join(&placement.folders[k as usize].staged);
        let links: Vec<(PathBuf, String)> = unit
            .iter()
            .filter_map(|&(_, step)| match &ops[step as usize] {
                Event::MakeRef { table_id, name, .. } => {
                    Some((layout::symlink_target(table_id), layout::table_file(name)))
                }
                _ => None,
            })
            .collect();
        let refs: Vec<(&Path, &str)> = links
            .iter()
            .map(|(t, n)| (t.as_path(), n.as_str()))
            .collect();
        for (r, (_, name)) in fs.symlinks_in(&dir, &refs).into_iter().zip(&links) {
            r.at("symlink", &dir.join(name))?;
        }
        Ok(())
    })?;
    Ok(())
}

/// Remove the placed folders again (a pull that fails before its commit point).
pub fn discard(fs: &dyn Fs, layout: &Layout, placement: &Placement) -> Result<()> {
    for f in &placement.folders {
        let dir = layout.staging().join(&f.staged);
        crate::fs::not_found_ok(fs.remove_tree(&dir)).at("remove", &dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::event::Slot;
    use crate::reconcile::origin::Item;
    use crate::reconcile::plan::StageItem;

    /// The md5 spelt with one hex digit.
    fn md5(digit: &str) -> crate::model::name::Md5Sum {
        digit.repeat(32).try_into().unwrap()
    }

    fn put(id: &str, digit: &str) -> Event {
        Event::PutShared {
            table_id: id.try_into().unwrap(),
            md5: md5(digit),
        }
    }

    fn link(slug: &str, id: &str, strategy: Strategy) -> Event {
        Event::MakeRef {
            slot: Slot::Package(slug.try_into().unwrap()),
            table_id: id.try_into().unwrap(),
            name: format!("n_{id}").try_into().unwrap(),
            md5: md5("c"),
            size: None,
            strategy,
        }
    }

    fn stage(digit: &str) -> StageItem {
        StageItem {
            md5: md5(digit),
            url: String::new(),
            item: Item::Table { id: digit.into() },
            size: None,
        }
    }

    #[test]
    fn only_absent_folders_with_travelling_files_are_placed() {
        let p = Plan {
            stage: vec![stage("a"), stage("b")],
            ops: vec![
                put("t1", "a"),
                put("t2", "b"),
                put("t3", "b"), // "b" has two consumers: staged as <md5>, linked
                link("p", "t1", Strategy::Symlink),
                link("q", "t2", Strategy::Hardlink), // not a symlink: applied in place
                link("r", "t3", Strategy::Symlink),  // its folder exists
            ],
            ..Plan::default()
        };
        let absent: BTreeSet<String> = ["data", "data/_shared", "data/p", "data/q"]
            .map(String::from)
            .into();
        let pl = plan(&p, &absent);
        let rels: Vec<&str> = pl.folders.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(rels, ["data/_shared", "data/p"]);
        assert_eq!(
            pl.dests,
            [Some((0, 0)), None],
            "only the sole consumer's file travels"
        );
        assert_eq!(pl.links, [(1, 3)]);
        let l = Layout::new("/d");
        assert_eq!(
            pl.dest(&l, &p.ops, 0),
            Some(PathBuf::from("/d/.stack/staging/place-0/t1.parquet"))
        );
        assert_eq!(pl.dest(&l, &p.ops, 1), None);
        let events = pl.events();
        assert_eq!(
            events[0],
            Event::Place {
                staged: "place-0".into(),
                rel: "data/_shared".into()
            }
        );
        // Nothing absent: nothing placed.
        assert_eq!(plan(&p, &BTreeSet::new()).folders, []);
        // A folder a removal names (deleted by the user, still in the state) is
        // not placed: the removal would run after the `Place` step.
        let mut q = p.clone();
        q.ops.insert(
            0,
            Event::RemoveRef {
                slot: Slot::Package("p".try_into().unwrap()),
                table_id: "t0".try_into().unwrap(),
                name: "n_t1".try_into().unwrap(),
            },
        );
        let rels: Vec<String> = plan(&q, &absent)
            .folders
            .into_iter()
            .map(|f| f.rel)
            .collect();
        assert_eq!(rels, ["data/_shared"]);
    }
}
