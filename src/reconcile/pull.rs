//! One pull, end to end: validate, lock, recover, check, plan, stage, commit, apply.
//!
//! Owns: the order of a pull's phases and its report. Invariant kept: nothing is
//! touched before the manifest validated; nothing visible changes before the whole
//! plan is durable in the journal (the commit point); a failure before that point
//! leaves the previous stack exactly as it was.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::fs::{not_found_ok, Fs};
use crate::journal::event::{Event, LinkMode, Record};
use crate::journal::lock;
use crate::layout::Layout;
use crate::reconcile::apply::{finish, Applier};
use crate::reconcile::heal::{find_damage, HashFn};
use crate::reconcile::manifest::{validate, Desired, Manifest};
use crate::reconcile::origin::Origin;
use crate::reconcile::plan::{plan, resolve_strategy, Caps, Counts, Plan};
use crate::reconcile::stage::{stage_all, BundleCheck};
use crate::replay::project::project;
use crate::replay::recover::recover;
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
    /// Called with the bytes of each finished download.
    pub progress: &'a (dyn Fn(u64) + Sync),
}

/// Probe what the filesystem of `layout` can do, once per pull, in `.stack/tmp`.
pub fn probe_caps(fs: &dyn Fs, layout: &Layout, link: LinkMode) -> Result<Caps> {
    let want_reflink = matches!(link, LinkMode::Auto | LinkMode::Reflink);
    let want_hardlink = link == LinkMode::Hardlink;
    if !want_reflink && !want_hardlink {
        return Ok(Caps {
            reflink: false,
            hardlink: false,
        });
    }
    let dir = layout.tmp();
    fs.create_dir_all(&dir).at("mkdir", &dir)?;
    let src = dir.join("probe");
    let dst = dir.join("probe-clone");
    let mut f = fs.create(&src).at("create", &src)?;
    f.write_all(b"stack probe").at("write", &src)?;
    drop(f);
    let mut caps = Caps {
        reflink: false,
        hardlink: false,
    };
    if want_reflink {
        not_found_ok(fs.remove_file(&dst)).at("remove", &dst)?;
        caps.reflink = fs.reflink(&src, &dst).is_ok();
    }
    if want_hardlink {
        not_found_ok(fs.remove_file(&dst)).at("remove", &dst)?;
        caps.hardlink = fs.hard_link(&src, &dst).is_ok();
    }
    not_found_ok(fs.remove_file(&dst)).at("remove", &dst)?;
    not_found_ok(fs.remove_file(&src)).at("remove", &src)?;
    Ok(caps)
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
    }
}

/// Plan against `state`, probing the filesystem only if references will be made.
fn make_plan(
    fs: &dyn Fs,
    cfg: &PullConfig<'_>,
    state: &SyncState,
    desired: &Desired,
    probe: bool,
) -> Result<Plan> {
    let damage = find_damage(fs, &cfg.layout, state, cfg.hash)?;
    let optimistic = Caps {
        reflink: true,
        hardlink: true,
    };
    let first = plan(
        state,
        desired,
        cfg.link,
        resolve_strategy(cfg.link, optimistic),
        &damage,
    );
    if !first.makes_refs() {
        return Ok(first);
    }
    let caps = if probe {
        let caps = probe_caps(fs, &cfg.layout, cfg.link)?;
        // Contract §2: an explicit reflink/hardlink the filesystem refuses falls
        // back to copy and says so once on stderr.
        let refused = match cfg.link {
            LinkMode::Reflink => !caps.reflink,
            LinkMode::Hardlink => !caps.hardlink,
            _ => false,
        };
        if refused {
            eprintln!(
                "stack: {} refused by the filesystem of {}; copying instead",
                if cfg.link == LinkMode::Reflink {
                    "reflink"
                } else {
                    "hardlink"
                },
                cfg.layout.root.display()
            );
        }
        caps
    } else {
        // A dry run must not touch the disk: assume the portable outcome.
        Caps {
            reflink: false,
            hardlink: true,
        }
    };
    let strategy = resolve_strategy(cfg.link, caps);
    Ok(plan(state, desired, cfg.link, strategy, &damage))
}

/// What a pull would do, changing nothing (no lock, no recovery, no probe).
pub fn status(manifest: &Manifest, cfg: &PullConfig<'_>) -> Result<SyncReport> {
    let started = Instant::now();
    let desired = validate(manifest, cfg.origin)?;
    let fs = cfg.fs.as_ref();
    let records = match crate::journal::scan_file(fs, &cfg.layout)? {
        Some(scan) => {
            crate::journal::check_end(&cfg.layout, &scan)?;
            scan.records.into_iter().map(|(_, r)| r).collect()
        }
        None => Vec::new(),
    };
    let projection = project(&records);
    let p = make_plan(fs, cfg, &projection.state, &desired, false)?;
    let mut rep = report(&p, projection.state.journal.txn, true, 0, started);
    if let Some(pending) = projection.pending {
        rep.recovered.push(format!(
            "transaction {} was interrupted; the next mutating command recovers it",
            pending.txn
        ));
    }
    Ok(rep)
}

/// Pull `manifest` into the directory.
pub fn pull(manifest: &Manifest, cfg: &PullConfig<'_>) -> Result<SyncReport> {
    if cfg.dry_run {
        return status(manifest, cfg);
    }
    let started = Instant::now();
    let desired = validate(manifest, cfg.origin)?;
    let fs = cfg.fs.as_ref();
    let layout = &cfg.layout;
    let _lock = lock::acquire(fs, layout, &cfg.command, cfg.wait)?;
    let rec = recover(cfg.fs.clone(), layout)?;
    let mut journal = rec.journal;
    let state = rec.state;
    let p = make_plan(fs, cfg, &state, &desired, true)?;
    if p.is_noop() {
        let mut rep = report(&p, state.journal.txn, false, 0, started);
        rep.recovered = rec.notes;
        return Ok(rep);
    }

    // Phase 1: stage, invisibly.
    let txn = journal.new_txn();
    journal.append(
        txn,
        Event::Begin {
            manifest_md5: desired.manifest_md5.clone(),
            link: cfg.link,
        },
    );
    for item in &p.stage {
        journal.append(
            txn,
            Event::Stage {
                md5: item.md5.clone(),
                url: item.url.clone(),
            },
        );
    }
    journal.sync()?;
    let bytes = match stage_all(
        fs,
        layout,
        cfg.origin,
        &p.stage,
        cfg.jobs,
        cfg.bundles,
        cfg.progress,
    ) {
        Ok(b) => b,
        Err(e) if e.is_crash() => return Err(e),
        Err(e) => {
            journal.append(
                txn,
                Event::Aborted {
                    reason: e.to_string(),
                },
            );
            journal.sync()?;
            return Err(e);
        }
    };
    if !p.stage.is_empty() {
        let staging = layout.staging();
        fs.sync_fs(&staging).at("syncfs", &staging)?;
    }

    // Phase 2: the commit point — the whole plan, durable, in one batch.
    let mut records: Vec<Record> = Vec::with_capacity(p.ops.len());
    for ev in &p.ops {
        let seq = journal.append(txn, ev.clone());
        records.push(Record {
            seq,
            txn,
            event: ev.clone(),
        });
    }
    journal.append(txn, Event::Prepared);
    journal.sync()?;

    // Phase 3: apply, then finish (state file, Committed, cleanup).
    let applied = Applier::new(fs, layout, txn)
        .apply_all(&records)
        .and_then(|()| finish(fs, layout, &mut journal, &state, txn, &records, &p.refresh));
    let new_state = match applied {
        Ok(s) => s,
        Err(e) if e.is_crash() => return Err(e),
        Err(e) => {
            return Err(Error::State {
                path: layout.root.clone(),
                message: format!(
                    "pull {txn} failed after its commit point ({e}); `stack journal replay` finishes it"
                ),
            })
        }
    };
    if journal.wants_compaction() {
        journal.compact(&new_state)?;
    }
    let mut rep = report(&p, txn, false, bytes, started);
    rep.recovered = rec.notes;
    Ok(rep)
}

/// Hash a file through the seam (the default [`HashFn`]).
pub fn default_hash(fs: &dyn Fs) -> impl Fn(&Path) -> std::io::Result<String> + Sync + '_ {
    move |p| crate::reconcile::origin::md5_file(fs, p)
}
