//! One pull, end to end: validate, lock, recover, check, plan, stage, commit, apply.
//!
//! Owns: the order of a pull's phases and its report. Invariant kept: nothing is
//! touched before the manifest validated; nothing visible changes before the whole
//! plan is durable in the journal (the commit point); a failure before that point
//! leaves the previous stack exactly as it was.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, IoContext, Result, Warnings};
use crate::fs::{not_found_ok, Fs};
use crate::journal::event::{Event, LinkMode, Md5Sum, Record};
use crate::journal::lock;
use crate::journal::Journal;
use crate::layout::Layout;
use crate::reconcile::apply::{finish, Applier};
use crate::reconcile::heal::{find_damage, HashFn};
use crate::reconcile::manifest::{validate, Desired, Manifest};
use crate::reconcile::origin::Origin;
use crate::reconcile::place::{self, Placement};
use crate::reconcile::plan::{
    makes_refs, plan_from, resolve_strategy, Basis, Caps, Counts, Damage, Plan,
};
use crate::reconcile::recover::{
    compact_state, journal_is_clean, peek, recover, recover_trusted, replay, Peeked, Recovered,
};
use crate::reconcile::room;
use crate::reconcile::stage::{stage_all, BundleCheck};
use crate::replay::project::project;
use crate::replay::state::SyncState;

/// The report of `pull` and `status` (contract §5).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    pub ok: bool,
    pub dry_run: bool,
    /// The transaction that holds the stack now (the last committed one).
    pub txn: u64,
    pub direct_tables: Counts,
    pub data_packages: Counts,
    pub memory_domains: Counts,
    pub bytes_fetched: u64,
    pub elapsed_ms: u64,
    /// What recovery did before the pull (not part of the contract's shape).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recovered: Vec<String>,
    /// What the pull (or the recovery before it) could not do but survived, or
    /// what the user should know: a link mode the filesystem refused, leftovers
    /// not cleaned, a compaction that failed, files stack did not write in its
    /// folders. The library prints nothing; the command line prints these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// What a pull tells its progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Staging starts: this many files; `bytes` is the total of the sizes the
    /// manifest gave, `without_size` how many files it gave none for (bundles).
    Staging {
        files: u64,
        bytes: u64,
        without_size: u64,
    },
    /// One download finished, with the bytes it transferred.
    Fetched { bytes: u64 },
    /// The directory's lock is held by another process and the pull waits for it
    /// (`wait`); `journal::lock::holder` names the holder.
    WaitingForLock,
}

/// Everything a pull needs besides the manifest.
pub struct PullConfig<'a> {
    pub fs: Arc<dyn Fs>,
    pub layout: Layout,
    pub origin: &'a dyn Origin,
    pub link: LinkMode,
    pub jobs: usize,
    pub dry_run: bool,
    pub wait: bool,
    /// The command line, written into the lock file for a refused second command.
    pub command: String,
    pub hash: HashFn<'a>,
    pub bundles: BundleCheck,
    /// Told what will be downloaded, then the bytes of each finished download.
    pub progress: &'a (dyn Fn(Progress) + Sync),
}

/// The manifest a pull or status works from.
#[derive(Clone)]
pub enum Wanted<'a> {
    /// Already parsed (the library API): validated and planned every time.
    Parsed(&'a Manifest),
    /// A manifest's bytes as read or downloaded, and `origin`, a name for where its
    /// URLs resolve (the command line). When the same bytes, origin and link mode
    /// were what the pull that wrote the state file realised, and the disk is
    /// undamaged, the plan can only be empty: the manifest is not even parsed.
    /// Owned bytes are dropped as soon as they are parsed (a large manifest's text
    /// is not kept through the pull).
    Raw {
        bytes: std::borrow::Cow<'a, [u8]>,
        origin: std::borrow::Cow<'a, str>,
    },
}

impl<'a> Wanted<'a> {
    /// `(key, md5)` in one pass over the bytes: `md5` is the bytes' (what `md5sum`
    /// says of the manifest file; the `Begin` record keeps it), and `key`, the
    /// no-op key (`Pulled::key`), is the md5 of that md5, the origin and the link
    /// mode. `None` for a parsed manifest, whose bytes are unknown.
    pub fn key(&self, link: LinkMode) -> Option<(String, Md5Sum)> {
        use md5::Digest;
        let Wanted::Raw { bytes, origin } = self else {
            return None;
        };
        let md5 = Md5Sum::of_digest(&md5::Md5::digest(bytes).into());
        let mut h = md5::Md5::new();
        h.update(b"stack pull key 2\0");
        h.update(origin.as_bytes());
        h.update(format!("\0{link:?}\0").as_bytes());
        h.update(md5.as_bytes());
        Some((crate::reconcile::origin::hex(&h.finalize()), md5))
    }

    /// The manifest, parsed (contract §1 shape) if it came as bytes.
    pub fn parse(&self) -> Result<std::borrow::Cow<'a, Manifest>> {
        Ok(match self {
            Wanted::Parsed(m) => std::borrow::Cow::Borrowed(*m),
            Wanted::Raw { bytes, .. } => std::borrow::Cow::Owned(Manifest::from_json(bytes)?),
        })
    }

    /// Forget the bytes once parsed (their key and digest are taken).
    fn drop_bytes(&mut self) {
        if let Wanted::Raw { bytes, .. } = self {
            *bytes = std::borrow::Cow::Borrowed(&[]);
        }
    }
}

/// The report of a pull whose manifest is the one the state file realised
/// (`key` matches) on an undamaged disk, or `None` if it is not that pull. The
/// counts are what planning would say: every entry unchanged, and the skipped
/// tables the state file remembers.
fn unchanged(
    fs: &dyn Fs,
    cfg: &PullConfig<'_>,
    state: &SyncState,
    key: Option<&str>,
    dry_run: bool,
    started: Instant,
) -> Result<std::result::Result<SyncReport, Option<Damage>>> {
    let Some(pulled) = state
        .journal
        .pulled
        .as_ref()
        .filter(|p| Some(p.key.as_str()) == key)
    else {
        return Ok(Err(None));
    };
    let damage = find_damage(fs, &cfg.layout, state, cfg.hash)?;
    if damage != Damage::default() {
        return Ok(Err(Some(damage)));
    }
    let mut p = Plan::default();
    p.tally.direct_tables.unchanged = state.direct_tables.len() as u64;
    p.tally.direct_tables.skipped = pulled.skipped_direct;
    p.tally.data_packages.unchanged = state.data_packages.values().map(|t| t.len() as u64).sum();
    p.tally.data_packages.skipped = pulled.skipped_packages;
    p.tally.memory_domains.unchanged = state.memory_domains.len() as u64;
    Ok(Ok(report(&p, state.journal.txn, dry_run, 0, started)))
}

/// What the filesystem of `layout` can do: read from `.stack/caps` when it was
/// probed on this same filesystem before, else probed once (in `.stack/tmp`) and
/// remembered, so that a pull with nothing to do never probes (a probe writes).
pub fn probe_caps(fs: &dyn Fs, layout: &Layout, _link: LinkMode) -> Result<Caps> {
    let dev = fs.metadata(&layout.root).at("stat", &layout.root)?.dev;
    let cache = layout.private().join("caps");
    if let Ok(bytes) = fs.read(&cache) {
        let text = String::from_utf8_lossy(&bytes);
        let mut words = text.split_whitespace();
        if let (Some(d), Some(r), Some(h)) = (words.next(), words.next(), words.next()) {
            if d.parse() == Ok(dev) {
                return Ok(Caps {
                    reflink: r == "1",
                    hardlink: h == "1",
                });
            }
        }
    }
    let dir = layout.tmp();
    fs.create_dir_all(&dir).at("mkdir", &dir)?;
    let src = dir.join("probe");
    let dst = dir.join("probe-clone");
    let written = fs
        .create(&src)
        .and_then(|mut f| f.write_all(b"stack probe"));
    if let Err(e) = written {
        // A full disk, say: the probe's bytes go back with the refusal.
        if !crate::error::is_crash_io(&e) {
            let _ = not_found_ok(fs.remove_file(&src));
        }
        return Err(e).at("write", &src);
    }
    not_found_ok(fs.remove_file(&dst)).at("remove", &dst)?;
    let reflink = fs.reflink(&src, &dst).is_ok();
    not_found_ok(fs.remove_file(&dst)).at("remove", &dst)?;
    let hardlink = fs.hard_link(&src, &dst).is_ok();
    not_found_ok(fs.remove_file(&dst)).at("remove", &dst)?;
    not_found_ok(fs.remove_file(&src)).at("remove", &src)?;
    // A hint, not state: not synced; a lost, stale or unwritable file only means
    // a new probe next time.
    let line = format!("{dev} {} {}\n", u8::from(reflink), u8::from(hardlink));
    let written = fs
        .create(&cache)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        if crate::error::is_crash_io(&e) {
            return Err(e).at("write", &cache);
        }
        let _ = not_found_ok(fs.remove_file(&cache));
    }
    Ok(Caps { reflink, hardlink })
}

fn report(plan: &Plan, txn: u64, dry_run: bool, bytes: u64, started: Instant) -> SyncReport {
    SyncReport {
        ok: true,
        dry_run,
        txn,
        direct_tables: plan.tally.direct_tables,
        data_packages: plan.tally.data_packages,
        memory_domains: plan.tally.memory_domains,
        bytes_fetched: bytes,
        elapsed_ms: started.elapsed().as_millis() as u64,
        recovered: Vec::new(),
        warnings: Vec::new(),
    }
}

/// Plan against `state` (consuming the desired set), probing the filesystem only if
/// references will be made.
fn make_plan(
    fs: &dyn Fs,
    cfg: &PullConfig<'_>,
    state: &SyncState,
    desired: Desired,
    probe: bool,
    damage: Option<Damage>,
    warnings: &Warnings,
) -> Result<Plan> {
    let damage = match damage {
        Some(d) => d,
        None => find_damage(fs, &cfg.layout, state, cfg.hash)?,
    };
    let optimistic = resolve_strategy(
        cfg.link,
        Caps {
            reflink: true,
            hardlink: true,
        },
    );
    // Derived once: both the question and the plan stand on it.
    let basis = Basis::new(state, &desired, &damage);
    if !makes_refs(state, &desired, &basis, (cfg.link, optimistic), &damage) {
        return Ok(plan_from(
            state,
            desired,
            basis,
            (cfg.link, optimistic),
            &damage,
        ));
    }
    let caps = if probe {
        probe_caps(fs, &cfg.layout, cfg.link)?
    } else {
        // A dry run must not touch the disk: assume the portable outcome.
        Caps {
            reflink: false,
            hardlink: true,
        }
    };
    let strategy = resolve_strategy(cfg.link, caps);
    let p = plan_from(state, desired, basis, (cfg.link, strategy), &damage);
    // Contract §2: an explicit reflink/hardlink the filesystem refuses falls back to
    // copy and says so once, in the report's warnings, which the command line prints
    // on stderr (only when references are actually made).
    let refused = match cfg.link {
        LinkMode::Reflink => !caps.reflink,
        LinkMode::Hardlink => !caps.hardlink,
        _ => false,
    };
    if probe && refused && p.makes_refs() {
        warnings.push(format!(
            "{} refused by the filesystem of {}; copying instead",
            if cfg.link == LinkMode::Reflink {
                "reflink"
            } else {
                "hardlink"
            },
            cfg.layout.root.display()
        ));
    }
    Ok(p)
}

/// Refuse, before anything is journaled, a plan that could not be applied: a folder
/// where a file goes, or a file where a folder goes. After the commit point such a
/// step would fail on every recovery; before it, the pull fails cleanly (exit 1) with
/// the previous stack intact and the offending path named.
fn preflight(fs: &dyn Fs, layout: &Layout, p: &Plan, state: &SyncState) -> Result<Preflight> {
    use crate::fs::Kind;
    use crate::layout as paths;
    let kind_of = |rel: &str| -> Result<Option<Kind>> {
        let path = layout.join(rel);
        match fs.symlink_metadata(&path) {
            Ok(m) => Ok(Some(m.kind)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).at("stat", &path),
        }
    };
    let refuse = |rel: &str, what: &str| Error::InTheWay {
        path: layout.join(rel),
        what: what.to_string(),
    };
    // The folder each file step writes into, and the file: built into `buf`,
    // without allocating per step (a 100k-table pull has 250k steps).
    // (its top folder, the length of its folder's path in `buf`)
    let locate = |ev: &Event, buf: &mut String| -> Option<(&'static str, usize)> {
        buf.clear();
        match ev {
            Event::PutShared { table_id, .. } => {
                paths::push_shared_rel(buf, table_id);
                Some(("data", paths::SHARED_DIR.len()))
            }
            Event::MakeRef { slot, name, .. } => {
                let slot = crate::journal::event::SlotRef::of(slot);
                paths::push_slot_dir_rel(buf, slot);
                let folder = buf.len();
                buf.clear();
                paths::push_ref_rel(buf, slot, name);
                Some(("data", folder))
            }
            Event::PutBundle { slug, .. } => {
                let folder = paths::domain_dir_rel(slug).len();
                buf.push_str(&paths::bundle_rel(slug));
                Some(("memory", folder))
            }
            _ => None,
        }
    };
    let mut folders: BTreeSet<String> = BTreeSet::new();
    let mut buf = String::new();
    for ev in &p.ops {
        let Some((top, folder)) = locate(ev, &mut buf) else {
            continue;
        };
        for f in [top, &buf[..folder]] {
            if !folders.contains(f) {
                folders.insert(f.to_string());
            }
        }
    }
    let mut absent = BTreeSet::new();
    for rel in folders.iter().cloned() {
        match kind_of(&rel)? {
            Some(Kind::Dir) => {}
            Some(_) => return Err(refuse(&rel, "a file is where stack needs a folder")),
            None => {
                absent.insert(rel);
            }
        }
    }
    // A file in a folder that does not exist yet cannot be in the way (a cold
    // pull stats a handful of folders, not every file).
    let mut held = None;
    let mut foreign = Vec::new();
    for ev in &p.ops {
        let Some((_, folder)) = locate(ev, &mut buf) else {
            continue;
        };
        if absent.contains(&buf[..folder]) {
            continue;
        }
        match kind_of(&buf)? {
            Some(Kind::Dir) => return Err(refuse(&buf, "a folder is where stack puts a file")),
            Some(_) => {
                let held = held.get_or_insert_with(|| crate::reconcile::foreign::Held::of(state));
                if !held.contains(&buf) {
                    foreign.push(buf.clone());
                }
            }
            None => {}
        }
    }
    // A package folder the plan empties and removes is one of its folders too.
    // One that is a link (stack never makes one; the user's, to a folder
    // elsewhere) is moved whole first, so no removal reaches through it.
    for ev in &p.ops {
        if let Event::RemoveDir { slot } = ev {
            let rel = crate::layout::slot_dir_rel(slot);
            match kind_of(&rel)? {
                Some(Kind::Dir) => {
                    folders.insert(rel);
                }
                Some(_) => foreign.push(rel),
                None => {}
            }
        }
    }
    // Damaged files holding a user's bytes (heal found them): never trashed.
    foreign.extend(p.foreign.iter().cloned());
    // A domain leaves with its folder: what else the user keeps there is moved
    // out first.
    let dropped: BTreeSet<String> = p
        .ops
        .iter()
        .filter_map(|ev| match ev {
            Event::RemoveBundle { slug } => Some(paths::domain_dir_rel(slug)),
            _ => None,
        })
        .collect();
    if !dropped.is_empty() {
        let found = crate::reconcile::foreign::in_folders(fs, layout, &dropped, state)?;
        foreign.extend(found);
    }
    foreign.sort_unstable();
    foreign.dedup();
    Ok(Preflight {
        absent,
        foreign,
        folders,
    })
}

/// What [`preflight`] found.
struct Preflight {
    /// The folders the plan writes into that do not exist (relative).
    absent: BTreeSet<String>,
    /// Files no state entry holds at paths the plan writes or in a domain's
    /// folder it removes, and damaged files holding bytes stack did not write
    /// (`Plan::foreign`): a user's, moved aside to the quarantine first (sorted).
    foreign: Vec<String>,
    /// Every folder the plan writes into or removes (relative).
    folders: BTreeSet<String>,
}

/// What a pull would do, changing nothing (no lock, no recovery, no probe).
pub fn status(mut wanted: Wanted<'_>, cfg: &PullConfig<'_>) -> Result<SyncReport> {
    let started = Instant::now();
    let fs = cfg.fs.as_ref();
    // The state file when it names the journal's length, else the journal itself.
    let trusted = crate::reconcile::recover::trusted_state(fs, &cfg.layout)?;
    let mut damage = None;
    if let Some(state) = &trusted {
        match unchanged(
            fs,
            cfg,
            state,
            wanted.key(cfg.link).map(|(key, _)| key).as_deref(),
            true,
            started,
        )? {
            Ok(rep) => return Ok(rep),
            Err(d) => damage = d,
        }
    }
    let manifest = wanted.parse()?;
    // Parsed: a large manifest's text is not held while it is validated and
    // planned (as in a pull).
    wanted.drop_bytes();
    let desired = validate(&manifest, cfg.origin)?;
    let projection = match trusted {
        Some(state) => crate::replay::project::Projection {
            state,
            pending: None,
        },
        None => {
            let records = match crate::journal::scan_file(fs, &cfg.layout)? {
                Some(scan) => {
                    crate::replay::project::check_journal(&cfg.layout, &scan)?;
                    scan.records.into_iter().map(|(_, r)| r).collect()
                }
                None => Vec::new(),
            };
            project(&records)
        }
    };
    let warnings = Warnings::default();
    let p = make_plan(
        fs,
        cfg,
        &projection.state,
        desired,
        false,
        damage,
        &warnings,
    )?;
    let mut rep = report(&p, projection.state.journal.txn, true, 0, started);
    rep.warnings = warnings.take();
    if let Some(pending) = projection.pending {
        rep.recovered.push(format!(
            "transaction {} was interrupted; the next mutating command recovers it",
            pending.txn
        ));
    }
    Ok(rep)
}

/// Pull `manifest` into the directory: validate → lock → recover → check → plan →
/// stage → commit → apply → finish (ARCHITECTURE.md, "The flow of a pull").
///
/// A manifest given as bytes is parsed and validated before anything but the lock
/// file is touched, unless it is the very manifest the state file realised and the
/// disk is undamaged (then nothing is to be done, and nothing is done).
pub fn pull(mut wanted: Wanted<'_>, cfg: &PullConfig<'_>) -> Result<SyncReport> {
    if cfg.dry_run {
        return status(wanted, cfg);
    }
    let started = Instant::now();
    let (key, raw_md5, peeked) = key_and_peek(&wanted, cfg)?;
    // The parsed manifest outlives the desired set, which borrows from it; both
    // are dropped once the plan is made.
    let mut early = None;
    if !peeked
        .as_ref()
        .is_some_and(|p| is_same(&p.state, key.as_deref()))
    {
        early = Some(wanted.parse()?);
        // Parsed: a large manifest's text is not held while it is validated.
        wanted.drop_bytes();
    }
    let mut checked = match &early {
        Some(m) => Some(validated(m, cfg, raw_md5)?),
        None => None,
    };
    let _lock = lock::acquire_with(
        cfg.fs.as_ref(),
        &cfg.layout,
        &cfg.command,
        cfg.wait,
        &|| (cfg.progress)(Progress::WaitingForLock),
    )?;
    let (fast, damage) = match recover_fast_and_check(cfg, peeked, key.as_deref(), started)? {
        Checked::Unchanged(rep) => return Ok(rep),
        Checked::ToPlan { fast, damage } => (fast, damage),
    };
    let mut late = None;
    let Validated {
        desired,
        md5,
        manifest,
    } = match checked.take() {
        Some(v) => v,
        // The state file changed between the peek and the lock (rare): validate now.
        None => validated(late.insert(wanted.parse()?), cfg, raw_md5)?,
    };
    let mut rec = match fast {
        Some(rec) => *rec,
        None => recover(cfg.fs.clone(), &cfg.layout)?,
    };
    let warnings = Warnings::default();
    for w in std::mem::take(&mut rec.warnings) {
        warnings.push(w);
    }
    let mut p = plan_pull(cfg, &mut rec, desired, manifest, damage, &warnings)?;
    // Planned: the plan holds what it needs.
    drop((early, late));
    let Recovered {
        mut journal,
        state,
        notes,
        ..
    } = rec;
    if p.is_noop() {
        let mut rep = report(&p, state.journal.txn, false, 0, started);
        rep.recovered = notes;
        rep.warnings = warnings.take();
        return Ok(rep);
    }
    let (txn, bytes, staged) = stage(cfg, &mut journal, &mut p, &state, md5)?;
    let records = commit(cfg, &mut journal, txn, &staged, &mut p, key)?;
    let (new_state, here) = apply_and_finish(
        cfg,
        &mut journal,
        state,
        (txn, records),
        &p.refresh,
        &warnings,
    )?;
    for note in foreign_notes(cfg.fs.as_ref(), &cfg.layout, &staged.checked, &new_state)? {
        warnings.push(note);
    }
    let mut rep = report(&p, txn, false, bytes, started);
    rep.recovered = notes;
    if here {
        compact_if_due(cfg, &mut journal, new_state, &warnings)?;
    } else {
        rep.recovered.push(format!(
            "pull {txn} was finished by a second try after a failure past its commit point"
        ));
    }
    rep.warnings = warnings.take();
    Ok(rep)
}

/// The no-op key and the md5 of the manifest's bytes ([`Wanted::key`]), and the
/// state file read before the lock ([`peek`]), only to decide whether the manifest
/// must be parsed: an unchanged one need not be; any other is validated before
/// anything (even the lock file) is touched. The key's md5 runs meanwhile.
fn key_and_peek(
    wanted: &Wanted<'_>,
    cfg: &PullConfig<'_>,
) -> Result<(Option<String>, Option<Md5Sum>, Option<Peeked>)> {
    let (keyed, peeked) = std::thread::scope(|s| {
        let key = s.spawn(|| wanted.key(cfg.link));
        let peeked = match wanted {
            Wanted::Raw { .. } => peek(cfg.fs.as_ref(), &cfg.layout),
            Wanted::Parsed(_) => Ok(None),
        };
        let key = key
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (key, peeked)
    });
    let peeked = peeked?;
    let (key, raw_md5) = keyed.unzip();
    Ok((key, raw_md5, peeked))
}

/// Does `state` record the pull of this no-op key?
fn is_same(state: &SyncState, key: Option<&str>) -> bool {
    state
        .journal
        .pulled
        .as_ref()
        .is_some_and(|p| Some(p.key.as_str()) == key)
}

/// A validated manifest: the desired set, the md5 the `Begin` record keeps, and
/// the manifest (kept to plan again after a full recovery).
struct Validated<'m> {
    desired: Desired<'m>,
    md5: Md5Sum,
    manifest: &'m Manifest,
}

/// Validate `manifest` (contract §1). The md5 is the bytes' when known, else the
/// parsed manifest's.
fn validated<'m>(
    manifest: &'m Manifest,
    cfg: &PullConfig<'_>,
    raw_md5: Option<Md5Sum>,
) -> Result<Validated<'m>> {
    let desired = validate(manifest, cfg.origin)?;
    let md5 = raw_md5.unwrap_or_else(|| crate::reconcile::manifest::digest(manifest));
    Ok(Validated {
        desired,
        md5,
        manifest,
    })
}

/// After the lock and recovery's fast path: a pull with nothing to do, or one to
/// plan, with what recovery and the check found.
enum Checked {
    Unchanged(SyncReport),
    ToPlan {
        /// Recovery's fast path, if the state file was trusted (boxed: it holds
        /// the state and the journal, the report is small).
        fast: Option<Box<Recovered>>,
        /// The damage the check found, if it looked.
        damage: Option<Damage>,
    },
}

/// Recover's fast path, then check the disk when the manifest is the one the state
/// file realised. The fast path reads only; the slow one may roll a transaction
/// back or forward, so it waits until the manifest is known to be valid.
fn recover_fast_and_check(
    cfg: &PullConfig<'_>,
    peeked: Option<Peeked>,
    key: Option<&str>,
    started: Instant,
) -> Result<Checked> {
    let fast = recover_trusted(&cfg.fs, &cfg.layout, peeked)?;
    let mut damage = None;
    if let Some(rec) = &fast {
        match unchanged(cfg.fs.as_ref(), cfg, &rec.state, key, false, started)? {
            // Nothing to do. (The state is freed here, not on a detached thread:
            // a library call leaves no thread behind.)
            Ok(rep) => return Ok(Checked::Unchanged(rep)),
            Err(d) => damage = d,
        }
    }
    Ok(Checked::ToPlan {
        fast: fast.map(Box::new),
        damage,
    })
}

/// Plan against the recovered state. Before a plan that appends is made after the
/// fast path, the journal's end must be whole although the state file named it;
/// if it is not, recover from the journal itself (cuts a torn tail, rolls its
/// transaction forward) and plan again (from the manifest, still held).
fn plan_pull(
    cfg: &PullConfig<'_>,
    rec: &mut Recovered,
    desired: Desired<'_>,
    manifest: &Manifest,
    damage: Option<Damage>,
    warnings: &Warnings,
) -> Result<Plan> {
    let fs = cfg.fs.as_ref();
    let p = make_plan(fs, cfg, &rec.state, desired, true, damage, warnings)?;
    if p.is_noop() || !rec.trusted || journal_is_clean(fs, &cfg.layout)? {
        return Ok(p);
    }
    *rec = replay(cfg.fs.clone(), &cfg.layout)?;
    // Planned again: the first plan's warnings go with it, recovery's stay.
    warnings.take();
    for w in std::mem::take(&mut rec.warnings) {
        warnings.push(w);
    }
    let desired = validate(manifest, cfg.origin)?;
    make_plan(fs, cfg, &rec.state, desired, true, None, warnings)
}

/// What staging made ready for the commit point.
struct Staged {
    placement: Placement,
    /// What the preflight found: folders to place, files stack did not write.
    checked: Preflight,
    /// The room the pull needs, as sized once its downloads were in.
    needs: room::Needs,
}

/// Begin and stage, out of sight: a disk too small refuses the pull first; then
/// the `Begin` and `Stage` records, every download and every folder the stack
/// gains whole, built in `.stack/staging/`, and the reserve for what comes after
/// the commit point (`reconcile::room`), made durable by one `syncfs`. Any
/// failure aborts the transaction, nothing visible changed, the room taken given
/// back. Returns the transaction, the bytes fetched and what was staged.
fn stage(
    cfg: &PullConfig<'_>,
    journal: &mut Journal,
    p: &mut Plan,
    state: &SyncState,
    manifest_md5: Md5Sum,
) -> Result<(u64, u64, Staged)> {
    let (fs, layout) = (cfg.fs.as_ref(), &cfg.layout);
    // Folders the stack gains whole are built out of sight and placed whole.
    let checked = preflight(fs, layout, p, state)?;
    let placement = place::plan(p, &checked.absent);
    let mut needs = room_needed(fs, layout, p, None);
    room::check(fs, layout, needs)?;
    let txn = begin(journal, p, manifest_md5, cfg.link)?;
    (cfg.progress)(Progress::Staging {
        files: p.stage.len() as u64,
        bytes: p.stage.iter().filter_map(|s| s.size).sum(),
        without_size: p.stage.iter().filter(|s| s.size.is_none()).count() as u64,
    });
    let fetched = |bytes: u64| (cfg.progress)(Progress::Fetched { bytes });
    let staged = place::prepare(fs, layout, &placement).and_then(|()| {
        let bytes = stage_all(
            fs,
            layout,
            cfg.origin,
            &p.stage,
            &|i| placement.dest(layout, &p.ops, i),
            cfg.jobs,
            cfg.bundles,
            &fetched,
        )?;
        place::make_links(fs, layout, &placement, &p.ops, cfg.jobs)?;
        // Every download is in: hold the room for what comes after the commit
        // point, sized from the staged files themselves.
        needs = room_needed(fs, layout, p, Some(&placement));
        room::reserve(fs, layout, needs.after_commit, needs)?;
        Ok(bytes)
    });
    let bytes = match staged {
        Ok(b) => b,
        Err(e) if e.is_crash() => return Err(e),
        Err(e) => return Err(abort(cfg, journal, txn, e, needs)),
    };
    if !p.stage.is_empty() || !placement.folders.is_empty() {
        let staging = layout.staging();
        fs.sync_fs(&staging).at("syncfs", &staging)?;
    }
    drop(std::mem::take(&mut p.stage)); // staged: not held through apply
    Ok((
        txn,
        bytes,
        Staged {
            placement,
            checked,
            needs,
        },
    ))
}

/// A new transaction: its `Begin` and one `Stage` per download, one journal batch.
fn begin(journal: &mut Journal, p: &Plan, manifest_md5: Md5Sum, link: LinkMode) -> Result<u64> {
    let txn = journal.new_txn();
    journal.append(txn, Event::Begin { manifest_md5, link });
    for item in &p.stage {
        journal.append(
            txn,
            Event::Stage {
                md5: item.md5,
                url: item.url.clone(),
            },
        );
    }
    journal.sync()?;
    Ok(txn)
}

/// Staging failed with `e`, before the commit point: the room it took is given
/// back ([`give_back`]) and the transaction is `Aborted` — if the journal has
/// room for that; if not, the next command's recovery rolls it back all the same
/// (it has no `Prepared`). Returns the error the pull fails with.
fn abort(
    cfg: &PullConfig<'_>,
    journal: &mut Journal,
    txn: u64,
    e: Error,
    needs: room::Needs,
) -> Error {
    let e = match give_back(cfg.fs.as_ref(), &cfg.layout, e, needs) {
        Ok(e) => e,
        Err(crash) => return crash,
    };
    journal.append(
        txn,
        Event::Aborted {
            reason: e.to_string(),
        },
    );
    match journal.sync() {
        Err(a) if a.is_crash() => a,
        _ => e,
    }
}

/// The commit point: the whole plan, durable, in one batch. The placed folders
/// come first: every other step may need them in place; then the other steps, the
/// `Request` (the no-op key) and `Prepared`.
fn commit(
    cfg: &PullConfig<'_>,
    journal: &mut Journal,
    txn: u64,
    staged: &Staged,
    p: &mut Plan,
    key: Option<String>,
) -> Result<Vec<Record>> {
    let places = staged.placement.events();
    let mut last = Vec::with_capacity(2);
    if let Some(key) = key {
        last.push(Event::Request {
            key,
            skipped_direct: p.tally.direct_tables.skipped,
            skipped_packages: p.tally.data_packages.skipped,
        });
    }
    last.push(Event::Prepared);
    // A file stack did not write where the plan puts one is moved aside first.
    let aside: Vec<Event> = staged
        .checked
        .foreign
        .iter()
        .map(|rel| Event::RemoveStray { rel: rel.clone() })
        .collect();
    let parts = vec![places, aside, std::mem::take(&mut p.ops), last];
    match journal.append_batch(txn, parts) {
        Ok(records) => Ok(records),
        // Cut off again (not `broken`): the commit point was not reached, and
        // the next command's recovery rolls the transaction back.
        Err(e) if !journal.is_broken() => {
            Err(give_back(cfg.fs.as_ref(), &cfg.layout, e, staged.needs)?)
        }
        Err(e) => Err(e),
    }
}

/// Apply every committed step, then finish (state file, `Committed`, cleanup).
/// Returns the new state, and whether it was finished here (`false`: by the
/// recovery [`settle`] ran after a failure, through a journal writer of its own).
/// A failure that persists is rolled back in the same command where the disk
/// lets it; else the next command that can write finishes the transaction.
fn apply_and_finish(
    cfg: &PullConfig<'_>,
    journal: &mut Journal,
    state: SyncState,
    (txn, records): (u64, Vec<Record>),
    refresh: &[String],
    warnings: &Warnings,
) -> Result<(SyncState, bool)> {
    let (fs, layout) = (cfg.fs.as_ref(), &cfg.layout);
    let mut applier = Applier::new(fs, layout, txn)
        .threads(cfg.jobs)
        .staged_read_only()
        .old_state(&state);
    let applied = applier.apply_all(&records);
    for w in applier.take_warnings() {
        warnings.push(w);
    }
    drop(applier);
    let applied =
        applied.and_then(|()| finish(fs, layout, journal, state, txn, records, refresh, warnings));
    match applied {
        Ok(s) => Ok((s, true)),
        Err(e) if e.is_crash() => Err(e),
        Err(e) => Ok((settle(cfg.fs.clone(), layout, txn, e, warnings)?, false)),
    }
}

/// Compact the journal if it has grown enough. The pull has committed: a failed
/// compaction costs only space.
fn compact_if_due(
    cfg: &PullConfig<'_>,
    journal: &mut Journal,
    state: SyncState,
    warnings: &Warnings,
) -> Result<()> {
    if !journal.wants_compaction() {
        return Ok(());
    }
    if let Err(e) = compact_state(cfg.fs.as_ref(), &cfg.layout, journal, state) {
        if e.is_crash() {
            return Err(e);
        }
        warnings.push(format!("automatic journal compaction failed: {e}"));
    }
    Ok(())
}

/// The files stack did not write left in the folders the pull wrote into.
/// (Those it moved to the quarantine the applier reported as it moved them:
/// the report names only moves that happened.)
fn foreign_notes(
    fs: &dyn Fs,
    layout: &Layout,
    checked: &Preflight,
    state: &SyncState,
) -> Result<Vec<String>> {
    // A folder the pull created holds only what it put there.
    let existed: BTreeSet<String> = checked
        .folders
        .difference(&checked.absent)
        .cloned()
        .collect();
    let left = crate::reconcile::foreign::in_folders(fs, layout, &existed, state)?;
    Ok(left
        .iter()
        .map(|rel| crate::reconcile::foreign::warning(rel))
        .collect())
}

/// Rolling pull `txn` forward failed with `e`, a fault that may persist: run
/// recovery now, which rolls it forward if the fault has passed, else back to
/// the previous stack from what the transaction kept while the disk still lets
/// stack write. `Ok`: the pull is done after all. `Err`: `RolledBack` (nothing
/// changed), or `Unfinished`, neither way was possible (the next command that
/// can write finishes it); both keep `e` as their source and say what to do.
fn settle(
    fs: Arc<dyn Fs>,
    layout: &Layout,
    txn: u64,
    e: Error,
    warnings: &Warnings,
) -> Result<SyncState> {
    match replay(fs, layout) {
        Ok(rec) if rec.state.journal.txn == txn => {
            for w in rec.warnings {
                warnings.push(w);
            }
            Ok(rec.state)
        }
        Ok(_) => Err(Error::RolledBack {
            txn,
            source: Box::new(e),
        }),
        Err(again) if again.is_crash() => Err(again),
        Err(_) => Err(Error::Unfinished {
            txn,
            source: Box::new(e),
        }),
    }
}

/// What pulling `p` needs on the disk. Before staging (`placement` `None`) the
/// sizes are the manifest's; after it, a size the manifest left out is the
/// staged file's (or, for a table already in the stack, its shared file's).
fn room_needed(
    fs: &dyn Fs,
    layout: &Layout,
    p: &Plan,
    placement: Option<&place::Placement>,
) -> room::Needs {
    let (download, download_unknown) = room::download(&p.stage);
    let state_len = fs.metadata(&layout.state_file()).map_or(0, |m| m.len);
    let index: std::collections::HashMap<&str, usize> = p
        .stage
        .iter()
        .enumerate()
        .map(|(i, s)| (s.md5.as_str(), i))
        .collect();
    let size_of = |md5: &str, size: Option<u64>| -> u64 {
        if let Some(size) = size {
            return size;
        }
        let Some(&i) = index.get(md5) else {
            return 0;
        };
        if let Some(known) = p.stage[i].size {
            return known;
        }
        let Some(placement) = placement else {
            return 0;
        };
        let path = placement
            .dest(layout, &p.ops, i)
            .unwrap_or_else(|| layout.staged(md5));
        fs.metadata(&path).map_or(0, |m| m.len)
    };
    let shared_size = |ev: &Event| match ev {
        Event::MakeRef { table_id, md5, .. } if !index.contains_key(md5.as_str()) => fs
            .metadata(&layout.join(&crate::layout::shared_rel(table_id)))
            .ok()
            .map(|m| m.len),
        _ => None,
    };
    let after_commit = room::after_commit(
        &p.ops,
        state_len,
        &|md5, size| size_of(md5, size),
        &shared_size,
    );
    room::Needs {
        download,
        download_unknown: download_unknown && placement.is_none(),
        after_commit,
    }
}

/// A pull failed before its commit point: give back the room its staging took
/// (staged files, placed folders, the reserve; partial downloads stay to be
/// resumed) and say, for a full disk, how much was needed and how much is free.
fn give_back(fs: &dyn Fs, layout: &Layout, e: Error, needs: room::Needs) -> Result<Error> {
    if e.is_crash() {
        return Err(e);
    }
    // Placed folders are staging too: the sweep of leftovers takes them.
    if let Err(d) = crate::reconcile::apply::clean_leftovers(fs, layout) {
        if d.is_crash() {
            return Err(d);
        }
    }
    if matches!(e, Error::NoSpace { .. }) || !room::is_no_space_error(&e) {
        return Ok(e);
    }
    let free = fs.free_space(&layout.root).ok().flatten();
    Ok(room::no_space(layout, needs, free, Some(e)))
}

/// Hash a file through the seam (the default [`HashFn`]).
pub fn default_hash(fs: &dyn Fs) -> impl Fn(&Path) -> std::io::Result<String> + Sync + '_ {
    move |p| crate::reconcile::origin::md5_file(fs, p)
}
