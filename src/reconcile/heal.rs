//! Heal: find what a user deleted or edited since the engine wrote it.
//!
//! Owns: the disk check a pull runs before planning. A file whose stat fingerprint
//! (size, mtime, inode) is unchanged is trusted without reading it; one whose
//! fingerprint changed is re-hashed, and only wrong content counts as damage.
//! Invariant kept: a damaged file that holds bytes stack did not write (wrong
//! content, a link to elsewhere, a file where stack made a link) is named in
//! [`Damage::foreign`], so the pull moves those bytes to the quarantine before
//! it re-makes or removes that name; never to the trash, which is deleted.
//! Reads only: it never mutates anything.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use crate::error::{IoContext, Result};
use crate::fs::{Fs, Kind, Meta, NameBatch};
use crate::journal::event::{Slot, SlotRef};
use crate::layout::{self, Layout};
use crate::reconcile::plan::Damage;
use crate::replay::state::{Md5Sum, SafeName, StatFp, Strategy, SyncState, TableEntry};

/// How content is hashed (the library API lets a caller inject it).
pub type HashFn<'a> = &'a (dyn Fn(&Path) -> io::Result<String> + Sync);

fn fp_now(fs: &dyn Fs, path: &Path) -> Result<Option<StatFp>> {
    match fs.symlink_metadata(path) {
        Ok(m) => Ok(Some(StatFp::of(&m)).filter(|_| m.kind != Kind::Dir)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).at("stat", path),
    }
}

/// What is the state of one file the engine wrote?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Ok,
    Refresh,
    /// To re-make: nothing holds the name (or a folder does, which the pull
    /// refuses), or stack's own bytes do.
    Damaged,
    /// To re-make, and the name holds bytes stack did not write.
    Foreign,
}

/// A bundle: any change of its fingerprint means fetch again (its manifest md5
/// may be a version tag); the bytes there are stack's only if they still hash
/// to `md5`.
fn check_bundle(
    fs: &dyn Fs,
    path: &Path,
    recorded: Option<StatFp>,
    md5: &str,
    hash: HashFn<'_>,
) -> Result<Check> {
    let Some(now) = fp_now(fs, path)? else {
        return Ok(Check::Damaged);
    };
    if recorded == Some(now) {
        return Ok(Check::Ok);
    }
    Ok(match hashed(path, md5, hash)? {
        Check::Refresh => Check::Damaged,
        c => c,
    })
}

/// A file whose fingerprint changed: is its content still `md5`?
fn hashed(path: &Path, md5: &str, hash: HashFn<'_>) -> Result<Check> {
    match hash(path) {
        Ok(h) if h == md5 => Ok(Check::Refresh),
        Ok(_) => Ok(Check::Foreign),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Check::Damaged),
        Err(e) => Err(e).at("read", path),
    }
}

/// What a stat says of one file, before any hashing.
enum Probe {
    Done(Check),
    /// The fingerprint changed: the content decides (hashed afterwards, in parallel).
    Hash,
}

/// Where one file to `lstat` is: a folder (relative to the local directory) and
/// a name in it.
pub(crate) trait Located: Sync {
    /// The folder, relative.
    fn dir(&self) -> &str;
    /// Append the file's name (one component) to `out`.
    fn push_name(&self, out: &mut String);
    /// The whole relative path (for error messages).
    fn rel(&self) -> String {
        let mut out = self.dir().to_string();
        out.push('/');
        self.push_name(&mut out);
        out
    }
}

/// (the folder part, the name) of a relative path.
fn split(r: &str) -> (&str, &str) {
    r.rsplit_once('/').unwrap_or(("", r))
}

impl Located for String {
    fn dir(&self) -> &str {
        split(self).0
    }
    fn push_name(&self, out: &mut String) {
        out.push_str(split(self).1)
    }
    fn rel(&self) -> String {
        self.clone()
    }
}

/// A table file where the layout puts it (`<dir>/<stem>.parquet`), or, for an
/// entry of a hand-edited state, the path it names.
enum TableLoc<'a> {
    Own { dir: &'a str, stem: &'a str },
    Named(String),
}

impl Located for TableLoc<'_> {
    fn dir(&self) -> &str {
        match self {
            TableLoc::Own { dir, .. } => dir,
            TableLoc::Named(rel) => split(rel).0,
        }
    }
    fn push_name(&self, out: &mut String) {
        match self {
            TableLoc::Own { stem, .. } => {
                out.push_str(stem);
                out.push_str(layout::TABLE_EXT);
            }
            TableLoc::Named(rel) => out.push_str(split(rel).1),
        }
    }
    fn rel(&self) -> String {
        match self {
            TableLoc::Own { .. } => {
                let mut out = self.dir().to_string();
                out.push('/');
                self.push_name(&mut out);
                out
            }
            // As named: a path without a folder part is not given one.
            TableLoc::Named(rel) => rel.clone(),
        }
    }
}

/// `lstat` every item, in order, and hand each result to `f` (with its item).
/// Consecutive items of one folder go to the filesystem as one batch
/// (`Fs::symlink_metadata_in`), their names written into one buffer, the batches
/// over threads; the results come back batch by batch, in order, so that a caller
/// with 250k paths holds only what `f` keeps, and need not join them into one more
/// list.
pub(crate) fn stat_batches<T, R, F>(
    fs: &dyn Fs,
    layout: &Layout,
    items: &[T],
    f: F,
) -> Result<Vec<Vec<R>>>
where
    T: Located,
    R: Send,
    F: Fn(&T, io::Result<Meta>) -> Result<R> + Sync,
{
    const UNIT: usize = 512;
    let mut units: Vec<(usize, usize)> = Vec::new();
    let mut start = 0;
    for i in 1..=items.len() {
        if i == items.len() || i - start == UNIT || items[i].dir() != items[start].dir() {
            units.push((start, i));
            start = i;
        }
    }
    crate::par::map_balanced(&units, crate::par::threads(), |&(a, b)| {
        let unit = &items[a..b];
        let mut names = NameBatch::with_capacity(unit.len());
        for item in unit {
            names.push(|buf| item.push_name(buf));
        }
        let dir = layout.join(unit[0].dir());
        crate::fs::one_per_name(fs.symlink_metadata_in(&dir, &names.names()), unit.len())
            .into_iter()
            .zip(unit)
            .map(|(m, item)| f(item, m))
            .collect()
    })
}

/// What a stat already made says of a file the engine wrote (its content
/// decided later, when the fingerprint changed).
fn probe_file(
    layout: &Layout,
    at: &impl Located,
    meta: io::Result<Meta>,
    recorded: Option<StatFp>,
) -> Result<Probe> {
    let now = match meta {
        Ok(m) if m.kind == Kind::Dir => None,
        Ok(m) => Some(StatFp::of(&m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).at("stat", &layout.join(&at.rel())),
    };
    Ok(match now {
        None => Probe::Done(Check::Damaged),
        Some(now) if recorded == Some(now) => Probe::Done(Check::Ok),
        Some(_) => Probe::Hash,
    })
}

/// [`check_ref`] from a stat already made.
fn probe_ref(
    fs: &dyn Fs,
    layout: &Layout,
    r: &TableAt<'_>,
    meta: io::Result<Meta>,
) -> Result<Probe> {
    let (id, e) = (r.id, r.e);
    if e.strategy != Strategy::Symlink {
        return probe_file(layout, &r.loc, meta, e.ref_fp);
    }
    let path = || layout.join(&r.loc.rel());
    match meta {
        Ok(m) if m.kind == Kind::Symlink => {
            // A symlink cannot be rewritten in place: an unchanged stat fingerprint
            // is the same link, trusted as a file's would be.
            let now = StatFp::of(&m);
            let wrong = e.ref_fp != Some(now)
                && fs.read_link(&path()).at("readlink", &path())? != layout::symlink_target(id);
            Ok(Probe::Done(if wrong { Check::Foreign } else { Check::Ok }))
        }
        // A folder: the pull refuses to put a file there (`pull::preflight`).
        Ok(m) if m.kind == Kind::Dir => Ok(Probe::Done(Check::Damaged)),
        // A file where stack made a symlink: the user's.
        Ok(_) => Ok(Probe::Done(Check::Foreign)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Probe::Done(Check::Damaged)),
        Err(err) => Err(err).at("stat", &path()),
    }
}

/// Settle the probes: the files whose fingerprint changed are hashed, in
/// parallel (`target(i)`: the path and md5 of probe `i`).
fn settle<'a>(
    probes: Vec<Probe>,
    hash: HashFn<'_>,
    target: impl Fn(usize) -> (std::path::PathBuf, &'a Md5Sum) + Sync,
) -> Result<Vec<Check>> {
    let to_hash: Vec<usize> = (0..probes.len())
        .filter(|&i| matches!(probes[i], Probe::Hash))
        .collect();
    let hashed_checks = crate::par::map_balanced(&to_hash, crate::par::threads(), |&i| {
        let (path, md5) = target(i);
        hashed(&path, md5, hash)
    })?;
    let mut hashed_checks = hashed_checks.into_iter();
    Ok(probes
        .into_iter()
        .map(|p| match p {
            Probe::Done(c) => c,
            Probe::Hash => hashed_checks.next().unwrap_or(Check::Damaged),
        })
        .collect())
}

/// One file to check: a shared file (`slug` unused; the first entry of its id)
/// or a reference (`slug`: its package, or `None` for a direct table).
struct TableAt<'a> {
    slug: Option<&'a SafeName>,
    id: &'a SafeName,
    e: &'a TableEntry,
    loc: TableLoc<'a>,
}

impl Located for TableAt<'_> {
    fn dir(&self) -> &str {
        self.loc.dir()
    }
    fn push_name(&self, out: &mut String) {
        self.loc.push_name(out)
    }
    fn rel(&self) -> String {
        self.loc.rel()
    }
}

/// Check every file of `state` on disk.
pub fn find_damage(
    fs: &dyn Fs,
    layout: &Layout,
    state: &SyncState,
    hash: HashFn<'_>,
) -> Result<Damage> {
    let mut d = Damage::default();
    // One check per shared file, then one per reference; both fan out over threads
    // (a no-op pull is mostly these stats). Paths are not built: each folder is
    // named once and each file by its stem.
    let mut shared_seen = std::collections::HashSet::new();
    let shared: Vec<TableAt<'_>> = state
        .direct_tables
        .iter()
        .chain(state.data_packages.values().flatten())
        .filter(|(id, _)| shared_seen.insert(id.as_str()))
        .map(|(id, e)| TableAt {
            slug: None,
            id,
            e,
            loc: if e.has_own_paths() {
                TableLoc::Own {
                    dir: layout::SHARED_DIR,
                    stem: id,
                }
            } else {
                TableLoc::Named(e.shared_path(id).into_owned())
            },
        })
        .collect();
    drop(shared_seen);
    let probes = stat_batches(fs, layout, &shared, |at, meta| {
        probe_file(layout, at, meta, at.e.shared_fp)
    })?
    .into_iter()
    .flatten()
    .collect();
    let checks = settle(probes, hash, |i| {
        (layout.join(&shared[i].loc.rel()), &shared[i].e.md5)
    })?;
    for (at, check) in shared.iter().zip(checks) {
        match check {
            Check::Ok => {}
            Check::Refresh => d.refresh.push(at.loc.rel()),
            Check::Damaged | Check::Foreign => {
                d.shared.insert(at.id.clone());
                note_foreign(&mut d, check, &at.loc);
            }
        }
    }
    // Each slot with its folder, named once.
    let mut slots: Vec<(Option<&SafeName>, &BTreeMap<SafeName, TableEntry>, String)> = Vec::new();
    if !state.direct_tables.is_empty() {
        slots.push((None, &state.direct_tables, String::new()));
    }
    slots.extend(
        state
            .data_packages
            .iter()
            .map(|(slug, t)| (Some(slug), t, String::new())),
    );
    for (slug, _, dir) in &mut slots {
        layout::push_slot_dir_rel(dir, slug.map_or(SlotRef::Direct, SlotRef::Package));
    }
    let mut refs: Vec<TableAt<'_>> = Vec::new();
    for &(slug, tables, ref dir) in &slots {
        let slot = slug.map_or(SlotRef::Direct, SlotRef::Package);
        refs.extend(tables.iter().map(|(id, e)| TableAt {
            slug,
            id,
            e,
            loc: if e.has_own_paths() {
                TableLoc::Own { dir, stem: &e.name }
            } else {
                TableLoc::Named(e.ref_path(slot).into_owned())
            },
        }));
    }
    let probes = stat_batches(fs, layout, &refs, |r, meta| probe_ref(fs, layout, r, meta))?
        .into_iter()
        .flatten()
        .collect();
    let checks = settle(probes, hash, |i| {
        (layout.join(&refs[i].loc.rel()), &refs[i].e.md5)
    })?;
    for (r, check) in refs.iter().zip(checks) {
        match check {
            Check::Ok => {}
            Check::Refresh => d.refresh.push(r.loc.rel()),
            Check::Damaged | Check::Foreign => {
                let slot = r.slug.map_or(Slot::Direct, |s| Slot::Package(s.clone()));
                d.refs.insert((slot, r.id.clone()));
                note_foreign(&mut d, check, &r.loc);
            }
        }
    }
    for (slug, dom) in &state.memory_domains {
        let path = layout.join(&dom.path);
        // Bundles are small: checked one by one.
        let check = check_bundle(fs, &path, dom.fp, &dom.md5, hash)?;
        if check != Check::Ok {
            d.domains.insert(slug.clone());
        }
        if check == Check::Foreign && dom.path == layout::bundle_rel(slug) {
            d.foreign.push(dom.path.clone());
        }
    }
    d.foreign.sort_unstable();
    d.foreign.dedup();
    Ok(d)
}

/// A damaged file at the layout's own path holding bytes stack did not write
/// goes into [`Damage::foreign`] (the pull's steps act on the layout's paths;
/// an entry a hand-edited state gave paths of its own is re-made elsewhere).
fn note_foreign(d: &mut Damage, check: Check, loc: &TableLoc<'_>) {
    if check == Check::Foreign && matches!(loc, TableLoc::Own { .. }) {
        d.foreign.push(loc.rel());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::RealFs;
    use std::sync::Mutex;

    /// An entry whose (odd) shared path has no folder part is stat-ed, hashed and
    /// listed for refresh at the one path `<dir>/x.parquet`, never hashed at
    /// `/x.parquet`, outside the local directory.
    #[test]
    #[allow(clippy::disallowed_methods)] // the fixture is made with std::fs
    fn named_path_without_a_folder_is_hashed_where_it_was_stat_ed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::write(root.join("x.parquet"), b"abc").unwrap();
        let md5 = "900150983cd24fb0d6963f7d28e17f72"; // md5("abc")
        let text = format!(
            r#"{{"version":1,"journal":{{"txn":1,"seq":1}},"direct_tables":{{"tbl_a":{{"name":"a","md5":"{md5}","ref_path":"data/_direct/a.parquet","shared_path":"x.parquet","strategy":"copy"}}}},"data_packages":{{}},"memory_domains":{{}}}}"#
        );
        let state = crate::replay::state::parse_state(text.as_bytes()).unwrap();
        assert!(!state.direct_tables["tbl_a"].has_own_paths());
        let asked = Mutex::new(Vec::new());
        let hash = |p: &Path| -> io::Result<String> {
            asked.lock().unwrap().push(p.to_path_buf());
            Ok(md5.to_string())
        };
        let layout = Layout::new(root);
        let d = find_damage(&RealFs, &layout, &state, &hash).unwrap();
        assert_eq!(*asked.lock().unwrap(), vec![root.join("x.parquet")]);
        assert_eq!(d.refresh, vec!["x.parquet".to_string()]);
    }

    /// Damaged files holding bytes stack did not write are named in `foreign`:
    /// a file where stack made a symlink, a copy with other content, a bundle
    /// that no longer hashes to its md5. A missing file, or one whose content
    /// is still stack's, is not.
    #[test]
    #[allow(clippy::disallowed_methods)] // the fixture is made with std::fs
    fn damage_names_the_files_holding_a_users_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let put = |rel: &str, bytes: &[u8]| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        };
        let abc = "900150983cd24fb0d6963f7d28e17f72"; // md5("abc")
        for id in ["a", "b", "c", "d"] {
            put(&format!("data/_shared/tbl_{id}.parquet"), b"abc");
        }
        put("data/_direct/a.parquet", b"the user's a");
        put("data/_direct/c.parquet", b"abc");
        put("data/_direct/d.parquet", b"the user's d");
        put("memory/ops/bundle.md", b"abc");
        put("memory/fin/bundle.md", b"the user's edit");
        let entry = |id: &str, strategy: &str| {
            format!(
                r#""tbl_{id}":{{"name":"{id}","md5":"{abc}","ref_path":"data/_direct/{id}.parquet","shared_path":"data/_shared/tbl_{id}.parquet","strategy":"{strategy}"}}"#
            )
        };
        let text = format!(
            r#"{{"version":1,"journal":{{"txn":1,"seq":1}},"direct_tables":{{{},{},{},{}}},"data_packages":{{}},"memory_domains":{{"ops":{{"md5":"{abc}","path":"memory/ops/bundle.md"}},"fin":{{"md5":"{abc}","path":"memory/fin/bundle.md"}}}}}}"#,
            entry("a", "symlink"),
            entry("b", "copy"),
            entry("c", "copy"),
            entry("d", "copy"),
        );
        let state = crate::replay::state::parse_state(text.as_bytes()).unwrap();
        let hash = |p: &Path| crate::reconcile::origin::md5_file(&RealFs, p);
        let d = find_damage(&RealFs, &Layout::new(root), &state, &hash).unwrap();
        assert_eq!(
            d.foreign,
            vec![
                "data/_direct/a.parquet".to_string(),
                "data/_direct/d.parquet".to_string(),
                "memory/fin/bundle.md".to_string(),
            ]
        );
        let refs: Vec<&str> = d.refs.iter().map(|(_, id)| id.as_str()).collect();
        assert_eq!(refs, ["tbl_a", "tbl_b", "tbl_d"]);
        let domains: Vec<&str> = d.domains.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            domains,
            ["fin", "ops"],
            "a bundle without a fingerprint is fetched again"
        );
    }

    /// A batch that returns fewer results than names is an error for the missing
    /// ones (the shared `fs::one_per_name`), never a shift that pairs the results
    /// after it with other files: heal must not find an unreadable stack intact.
    #[test]
    #[allow(clippy::disallowed_methods)] // the fixture is made with std::fs
    fn a_short_stat_batch_is_an_error_not_a_shift() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("data/_shared")).unwrap();
        std::fs::write(root.join("data/_shared/tbl_a.parquet"), b"abc").unwrap();
        let md5 = "900150983cd24fb0d6963f7d28e17f72"; // md5("abc")
        let text = format!(
            r#"{{"version":1,"journal":{{"txn":1,"seq":1}},"direct_tables":{{"tbl_a":{{"name":"a","md5":"{md5}","ref_path":"data/_direct/a.parquet","shared_path":"data/_shared/tbl_a.parquet","strategy":"copy"}}}},"data_packages":{{}},"memory_domains":{{}}}}"#
        );
        let state = crate::replay::state::parse_state(text.as_bytes()).unwrap();
        let hash = |_: &Path| -> io::Result<String> { Ok(md5.to_string()) };
        let layout = Layout::new(root);
        let fs = crate::verify::tests::Failing {
            fail: vec![(root.join("data/_shared"), "short lstat", false)],
        };
        let err = find_damage(&fs, &layout, &state, &hash).unwrap_err();
        assert!(err.to_string().contains("returned no result"), "{err}");
    }
}
