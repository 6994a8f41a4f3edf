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
//! - An applier skips a travelling step only if it moved that folder itself, so it
//!   knows the folder's files are the staged ones. After a crash that came once the
//!   folder was moved, the step runs as any other and finds its file in place (a
//!   put re-hashes it; a symlink is remade through `.stack/tmp`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};
use crate::fs::Fs;
use crate::journal::event::Event;
use crate::layout::{self, Layout};
use crate::reconcile::plan::Plan;
use crate::replay::state::Strategy;

/// The prefix of a placed folder's name in `.stack/staging/`.
pub const PREFIX: &str = "place-";

/// One folder built out of sight: `.stack/staging/<staged>/` becomes `rel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folder {
    pub rel: String,
    pub staged: String,
}

/// What a pull builds out of sight besides its staged files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    pub folders: Vec<Folder>,
    /// Per stage item of the plan (same order): where it is written instead of
    /// `<md5>`, relative to `.stack/staging/`.
    pub dests: Vec<Option<String>>,
    /// Symlinks to make before the commit point: (path relative to
    /// `.stack/staging/`, target).
    pub links: Vec<(String, PathBuf)>,
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
}

/// How many steps of a transaction consume each staged md5 (a put of a shared
/// file or of a bundle). A staged file with one consumer can be moved instead of
/// linked or copied.
pub fn consumers<'e>(events: impl IntoIterator<Item = &'e Event>) -> HashMap<&'e str, u32> {
    let mut uses: HashMap<&str, u32> = HashMap::new();
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
    match ev {
        Event::PutShared { .. } if sole => Some(layout::SHARED_DIR.to_string()),
        Event::MakeRef {
            slot,
            strategy: Strategy::Symlink,
            ..
        } => Some(layout::slot_dir_rel(slot)),
        _ => None,
    }
}

/// Which of the plan's folders to build out of sight: those in `absent` (folders
/// that did not exist when the plan was checked) that some step's file travels in.
pub fn plan(p: &Plan, absent: &BTreeSet<&str>) -> Placement {
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
    let mut index: HashMap<String, usize> = HashMap::new();
    for ev in &p.ops {
        let sole = matches!(ev, Event::PutShared { md5, .. } if uses.get(md5.as_str()) == Some(&1));
        let Some(rel) = travels_in(ev, sole) else {
            continue;
        };
        if !absent.contains(rel.as_str()) {
            continue;
        }
        let next = out.folders.len();
        let k = *index.entry(rel.clone()).or_insert(next);
        if k == next {
            out.folders.push(Folder {
                rel,
                staged: format!("{PREFIX}{k}"),
            });
        }
        let staged = &out.folders[k].staged;
        match ev {
            Event::PutShared { table_id, md5 } => match stage_of.get(md5.as_str()) {
                Some(&i) => out.dests[i] = Some(format!("{staged}/{table_id}.parquet")),
                // Every put stages its md5; if one did not, its file would not be in
                // the folder that its step skips: place nothing.
                None => return Placement::default(),
            },
            Event::MakeRef { table_id, name, .. } => out.links.push((
                format!("{staged}/{name}.parquet"),
                layout::symlink_target(table_id),
            )),
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
    threads: usize,
) -> Result<()> {
    // A folder's links at a time (`Fs::symlinks_in`), in units small enough to
    // spread over the threads.
    let staging = layout.staging();
    let mut units: Vec<(&str, Vec<(&Path, &str)>)> = Vec::new();
    for (rel, target) in &placement.links {
        let (dir, name) = rel.rsplit_once('/').unwrap_or(("", rel));
        match units.last_mut() {
            Some((d, v)) if *d == dir && v.len() < 512 => v.push((target, name)),
            _ => units.push((dir, vec![(target.as_path(), name)])),
        }
    }
    crate::par::map_balanced(&units, threads, |(dir, links)| {
        let dir = staging.join(dir);
        for (r, (_, name)) in fs.symlinks_in(&dir, links).into_iter().zip(links) {
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

    fn put(id: &str, md5: &str) -> Event {
        Event::PutShared {
            table_id: id.into(),
            md5: md5.into(),
        }
    }

    fn link(slug: &str, id: &str, strategy: Strategy) -> Event {
        Event::MakeRef {
            slot: Slot::Package(slug.into()),
            table_id: id.into(),
            name: format!("n_{id}"),
            md5: "m".into(),
            size: None,
            strategy,
        }
    }

    fn stage(md5: &str) -> StageItem {
        StageItem {
            md5: md5.into(),
            url: String::new(),
            item: Item::Table { id: md5.into() },
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
        let absent: BTreeSet<&str> = ["data", "data/_shared", "data/p", "data/q"].into();
        let pl = plan(&p, &absent);
        let rels: Vec<&str> = pl.folders.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(rels, ["data/_shared", "data/p"]);
        assert_eq!(
            pl.dests,
            [Some("place-0/t1.parquet".to_string()), None],
            "only the sole consumer's file travels"
        );
        assert_eq!(
            pl.links,
            [(
                "place-1/n_t1.parquet".to_string(),
                PathBuf::from("../_shared/t1.parquet")
            )]
        );
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
    }
}
