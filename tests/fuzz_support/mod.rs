//! The properties of the fuzz campaigns, shared by the cargo-fuzz targets
//! (`fuzz/fuzz_targets/*.rs`, which include this file by path) and by the proptest
//! tests in `tests/fuzz_props.rs`, so both check exactly the same things.
//!
//! Every check panics on a violated property; a fuzzer or proptest reports the panic.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Component, Path};
use std::sync::Arc;

use md5::Digest;

use stack::fs::sim::{Crash, SimFs};
use stack::fs::Fs;
use stack::journal::event::{Event, LinkMode, Record, Slot};
use stack::journal::frame::{self, End};
use stack::journal::Journal;
use stack::layout::{self, Layout};
use stack::model::name::is_safe_component;
use stack::reconcile::manifest::{validate, Desired, Manifest, SlotRef};
use stack::reconcile::origin::{self, Fetched, LocalOrigin, Origin, Request};
use stack::reconcile::pull::{default_hash, pull, PullConfig, Wanted};
use stack::reconcile::recover::recover;
use stack::reconcile::stage::BundleCheck;
use stack::replay::project::{check_records, project};
use stack::replay::state::{read_state, SyncState};
use stack::verify::{audit, Contents};

/// The local directory of every simulated run.
pub const ROOT: &str = "/stack";

pub fn md5_hex(bytes: &[u8]) -> String {
    origin::hex(&md5::Md5::digest(bytes))
}

// ---------------------------------------------------------------------------
// journal_decode
// ---------------------------------------------------------------------------

/// Recompute every checksum in `bytes` in place (header, then each frame as its
/// length field claims it), so that a fuzzer's mutations reach the payload decoder
/// instead of dying at the first crc.
pub fn fix_checksums(bytes: &mut [u8]) {
    if bytes.len() < frame::HEADER_LEN {
        return;
    }
    let crc = crc32(&[&bytes[..12]]);
    bytes[12..16].copy_from_slice(&crc.to_le_bytes());
    let mut at = frame::HEADER_LEN;
    while bytes.len() - at >= frame::FRAME_HEADER_LEN {
        let len =
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let end = at + frame::FRAME_HEADER_LEN + len;
        if len == 0 || end > bytes.len() {
            return;
        }
        let crc = crc32(&[&bytes[at..at + 4], &bytes[at + 8..end]]);
        bytes[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}

fn crc32(parts: &[&[u8]]) -> u32 {
    // CRC-32 (IEEE), bitwise: the harness must not trust the code it checks.
    let mut crc = !0u32;
    for p in parts {
        for &b in *p {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
    }
    !crc
}

/// Input of `journal_decode`: the first byte chooses whether checksums are fixed up
/// before the rest is read as a journal file.
pub fn check_journal_input(data: &[u8]) {
    match data.split_first() {
        Some((mode, rest)) if mode & 1 == 1 => {
            let mut bytes = rest.to_vec();
            fix_checksums(&mut bytes);
            check_journal_bytes(&bytes);
        }
        Some((_, rest)) => check_journal_bytes(rest),
        None => check_journal_bytes(&[]),
    }
}

/// The streaming reader (`frame::scan_read`, which the check before an append and
/// `journal verify` use) reads a file a few bytes at a time: it must find what the
/// slice reader finds, record for record, and end where it ends.
fn check_streaming_agrees(bytes: &[u8], scan: &frame::Scan) {
    /// Hands out at most 7 bytes per read.
    struct Dribble<'a>(&'a [u8]);
    impl std::io::Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(7).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    #[derive(Default)]
    struct Kept {
        pending: Vec<(u64, stack::journal::Record)>,
        records: Vec<(u64, stack::journal::Record)>,
    }
    impl frame::Sink for Kept {
        fn record(&mut self, offset: u64, record: stack::journal::Record) {
            self.pending.push((offset, record));
        }
        fn frame(&mut self, valid: bool) {
            if valid {
                self.records.append(&mut self.pending);
            } else {
                self.pending.clear();
            }
        }
    }
    let mut kept = Kept::default();
    let (valid_len, end) = frame::scan_read(Dribble(bytes), bytes.len() as u64, &mut kept)
        .expect("reading from memory cannot fail");
    assert_eq!(valid_len, scan.valid_len, "streaming reader: valid_len");
    assert_eq!(end, scan.end, "streaming reader: end");
    assert_eq!(kept.records, scan.records, "streaming reader: records");
}

/// The reader's properties on one journal file's bytes.
pub fn check_journal_bytes(bytes: &[u8]) {
    let scan = frame::scan(bytes);
    check_streaming_agrees(bytes, &scan);
    let valid_len = scan.valid_len as usize;
    assert!(valid_len <= bytes.len(), "valid_len past the end");
    // Where the scan stopped is where the valid prefix ends.
    match &scan.end {
        End::Clean => assert_eq!(valid_len, bytes.len(), "clean but not all bytes valid"),
        End::TornTail { offset, .. } | End::Corrupt { offset, .. } => {
            assert_eq!(*offset, scan.valid_len, "end offset is not valid_len")
        }
        End::UnknownVersion { .. } => assert_eq!(valid_len, 0),
    }
    if let End::Corrupt { record, .. } = &scan.end {
        assert_eq!(
            *record as usize,
            scan.records.len(),
            "corrupt record number"
        );
    }
    if valid_len < frame::HEADER_LEN {
        assert!(scan.records.is_empty(), "records without a header");
    } else {
        assert_eq!(
            &bytes[..frame::HEADER_LEN],
            &frame::header()[..],
            "bad header kept"
        );
    }
    // Seqs rise by one.
    for w in scan.records.windows(2) {
        assert_eq!(w[0].1.seq.checked_add(1), Some(w[1].1.seq), "seq gap");
    }
    // Frames tile the valid prefix; each frame's own checksum (computed here, not by
    // the code under test) matches its bytes, and its records re-encode to a frame
    // that scans back to the same records. (Not necessarily to the same bytes:
    // bincode accepts non-minimal varints, which the writer never produces; see
    // tests/fuzz_regressions.rs.)
    let mut at = frame::HEADER_LEN;
    let mut i = 0;
    while i < scan.records.len() {
        let off = scan.records[i].0;
        assert_eq!(off as usize, at, "frames do not tile the valid prefix");
        let mut j = i;
        while j < scan.records.len() && scan.records[j].0 == off {
            j += 1;
        }
        assert!(
            at + frame::FRAME_HEADER_LEN <= valid_len,
            "frame header past valid_len"
        );
        let len =
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let end = at + frame::FRAME_HEADER_LEN + len;
        assert!(end <= valid_len, "frame runs past valid_len");
        let crc = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        assert_eq!(
            crc32(&[&bytes[at..at + 4], &bytes[at + 8..end]]),
            crc,
            "frame at {at} returned with a bad checksum"
        );
        let batch: Vec<Record> = scan.records[i..j].iter().map(|(_, r)| r.clone()).collect();
        let enc = frame::encode_frame(&batch).expect("re-encoding a decoded frame");
        if enc[..] != bytes[at..end] {
            let mut alone = frame::header().to_vec();
            alone.extend_from_slice(&enc);
            let again: Vec<Record> = frame::scan(&alone)
                .records
                .into_iter()
                .map(|(_, r)| r)
                .collect();
            assert_eq!(again, batch, "frame at {at} does not round-trip");
        }
        at = end;
        i = j;
    }
    if valid_len >= frame::HEADER_LEN {
        assert_eq!(at, valid_len, "valid prefix holds bytes outside frames");
        // The valid prefix alone scans clean, to the same records.
        let again = frame::scan(&bytes[..valid_len]);
        assert_eq!(again.end, End::Clean, "valid prefix does not scan clean");
        assert_eq!(
            again.records, scan.records,
            "valid prefix scans differently"
        );
        assert_eq!(again.valid_len, scan.valid_len);
    }
    check_writer_agrees(bytes, &scan);
}

/// The writer path (`Journal::open`) agrees with the reader: it refuses exactly the
/// ends a writer may not fix, and otherwise returns the same records and leaves a
/// file that is the valid prefix and that appends cleanly. Recovery's open
/// (`Journal::open_checked` asking `check_records`) also refuses a journal whose
/// checkpoint names paths stack never writes, as corrupt, with nothing cut (a
/// record naming an unsafe name or md5 does not even decode: the scan ends there).
fn check_writer_agrees(bytes: &[u8], scan: &frame::Scan) {
    let layout = Layout::new(ROOT);
    let refuse = matches!(scan.end, End::Corrupt { .. } | End::UnknownVersion { .. });
    if let (false, Err(why)) = (refuse, check_records(&layout, scan)) {
        let sim = SimFs::new();
        sim.write_file(layout.journal(), bytes).expect("setup");
        let opened = Journal::open_checked(Arc::new(sim.clone()), &layout, |s| {
            check_records(&layout, s)
        });
        match opened {
            Err(e) => {
                assert_eq!(e.exit_code(), 4, "{e}");
                assert_eq!(e.to_string(), why.to_string());
            }
            Ok(_) => panic!("open_checked accepted records check_records refuses: {why}"),
        }
        assert_eq!(
            sim.read(&layout.journal()).unwrap(),
            bytes,
            "refused but changed"
        );
    }
    let sim = SimFs::new();
    sim.write_file(layout.journal(), bytes).expect("setup");
    let fs: Arc<dyn Fs> = Arc::new(sim.clone());
    let opened = Journal::open(fs.clone(), &layout);
    let mut opened = match (opened, refuse) {
        (Err(_), true) => {
            // Nothing may be rewritten or cut.
            assert_eq!(
                sim.read(&layout.journal()).unwrap(),
                bytes,
                "refused but changed"
            );
            return;
        }
        (Err(e), false) => panic!("Journal::open refused a {:?} journal: {e}", scan.end),
        (Ok(_), true) => panic!("Journal::open accepted a {:?} journal", scan.end),
        (Ok(o), false) => o,
    };
    let want: Vec<Record> = scan.records.iter().map(|(_, r)| r.clone()).collect();
    assert_eq!(
        opened.records, want,
        "writer and reader disagree on records"
    );
    assert_eq!(
        opened.torn.is_some(),
        matches!(scan.end, End::TornTail { .. })
    );
    let on_disk = sim.read(&layout.journal()).unwrap();
    if scan.valid_len as usize >= frame::HEADER_LEN {
        assert_eq!(
            &on_disk[..],
            &bytes[..scan.valid_len as usize],
            "torn tail not cut"
        );
    } else {
        assert_eq!(&on_disk[..], &frame::header()[..], "header not rewritten");
    }
    // One more append scans clean and continues the sequence.
    let txn = opened.journal.new_txn();
    let seq = opened.journal.append(txn, Event::Prepared);
    opened.journal.sync().expect("append after open");
    assert_eq!(seq, want.last().map_or(1, |r| r.seq + 1));
    let after = frame::scan(&sim.read(&layout.journal()).unwrap());
    assert_eq!(
        after.end,
        End::Clean,
        "journal after an append is not clean"
    );
    assert_eq!(after.records.len(), want.len() + 1);
}

// ---------------------------------------------------------------------------
// manifest_parse
// ---------------------------------------------------------------------------

fn only_normal(rel: &str, components: usize) -> bool {
    let p = Path::new(rel);
    !p.is_absolute()
        && p.components().count() == components
        && p.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Parse and validate arbitrary bytes as a manifest; check what validation accepts.
pub fn check_manifest_json(bytes: &[u8]) {
    let Ok(manifest) = Manifest::from_json(bytes) else {
        return;
    };
    let origin = LocalOrigin::new("/nonexistent-origin");
    let result = validate(&manifest, &origin);
    // Validation is a function of the manifest: a round trip through JSON changes nothing.
    let again = Manifest::from_json(&serde_json::to_vec(&manifest).unwrap()).expect("round trip");
    assert_eq!(again, manifest, "manifest does not round-trip");
    let result2 = validate(&again, &origin);
    assert_eq!(result.is_ok(), result2.is_ok());
    let desired = match result {
        Ok(d) => d,
        Err(e) => {
            assert!(
                matches!(e, stack::Error::BadManifest(_)),
                "not a bad manifest: {e}"
            );
            return;
        }
    };
    assert_eq!(Some(&desired), result2.as_ref().ok());
    check_desired(&desired);
}

/// Everything in a validated stack is made of safe components.
pub fn check_desired(d: &Desired) {
    let mut ref_paths = BTreeMap::new();
    for ((slot, id), r) in &d.refs {
        assert!(is_safe_component(id), "unsafe table id {id:?}");
        assert!(is_safe_component(r.name), "unsafe name {:?}", r.name);
        if let SlotRef::Package(slug) = slot {
            assert!(is_safe_component(slug), "unsafe slug {slug:?}");
            assert!(!slug.starts_with('_'));
        }
        let rel = layout::ref_rel(&slot.to_slot(), r.name);
        assert!(only_normal(&rel, 3), "ref path {rel:?}");
        assert!(rel.ends_with(".parquet"));
        assert!(
            ref_paths.insert(rel.clone(), id.to_string()).is_none(),
            "two refs land on {rel}"
        );
        let t = d.tables.get(id).expect("a ref without its table");
        assert_eq!(t.md5, r.md5, "two md5s for {id}");
    }
    for (id, t) in &d.tables {
        assert!(is_safe_component(id), "unsafe table id {id:?}");
        assert!(only_normal(&layout::shared_rel(id), 3));
        assert!(
            t.md5.len() == 32
                && t.md5
                    .bytes()
                    .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        );
        let rel = origin::origin_relative(t.url).expect("accepted URL does not resolve");
        assert!(rel.components().all(|c| matches!(c, Component::Normal(_))));
    }
    for (slug, dom) in &d.domains {
        assert!(is_safe_component(slug), "unsafe domain slug {slug:?}");
        assert!(only_normal(&layout::bundle_rel(slug), 3));
        assert!(only_normal(&layout::domain_dir_rel(slug), 2));
        let rel = origin::origin_relative(&dom.url).expect("accepted URL does not resolve");
        assert!(rel.components().all(|c| matches!(c, Component::Normal(_))));
    }
}

// ---------------------------------------------------------------------------
// event_sequence
// ---------------------------------------------------------------------------

pub const TABLES: [&str; 6] = ["tbl_a", "tbl_b", "tbl_c", "tbl_d", "tbl_e", "tbl_f"];
pub const PACKAGES: [&str; 3] = ["p1", "p2", "p3"];
pub const DOMAINS: [&str; 3] = ["ops", "finance", "ml"];

/// One table in a manifest: index into [`TABLES`], and small variations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSpec {
    pub table: u8,
    /// Use the alternative name (a rename of the reference).
    pub alt_name: bool,
    /// `query_mode: remote` (skipped).
    pub remote: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageSpec {
    pub slug: u8,
    pub tables: Vec<TableSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashSpec {
    /// Mutating operations allowed before the crash.
    pub after: u16,
    /// 0 process, 1 power loss optimistic, 2 pessimistic, 3 subset, 4 random.
    pub mode: u8,
    pub mask: u64,
    /// A second crash during the recovery that follows: (operations allowed, mode).
    pub in_recovery: Option<(u16, u8)>,
}

fn crash_mode(mode: u8, mask: u64) -> Crash {
    match mode % 5 {
        0 => Crash::Process,
        1 => Crash::PowerLossOptimistic,
        2 => Crash::PowerLossPessimistic,
        3 => Crash::PowerLossSubset(mask),
        _ => Crash::PowerLossRandom(mask),
    }
}

impl CrashSpec {
    pub fn crash(&self) -> Crash {
        crash_mode(self.mode, self.mask)
    }
}

/// One pull: a manifest from the pool, a link strategy, maybe a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSpec {
    /// Content version of each table of [`TABLES`] in this manifest (md5 changes).
    pub versions: [u8; 6],
    pub direct: Vec<TableSpec>,
    pub packages: Vec<PackageSpec>,
    /// (index into [`DOMAINS`], content version).
    pub domains: Vec<(u8, u8)>,
    /// 0 symlink, 1 hardlink, 2 copy, 3 auto, 4 reflink.
    pub link: u8,
    /// Can the filesystem clone (reflink) during this pull and its recovery?
    pub reflink: bool,
    pub crash: Option<CrashSpec>,
}

pub const MAX_STEPS: usize = 5;
pub const MAX_DIRECT: usize = 3;
pub const MAX_PACKAGES: usize = 3;
pub const MAX_PACKAGE_TABLES: usize = 4;

fn table_bytes(id: &str, version: u8) -> Vec<u8> {
    format!("PAR1 {id} version {version}\n")
        .repeat(1 + version as usize % 3)
        .into_bytes()
}

fn bundle_bytes(slug: &str, version: u8) -> Vec<u8> {
    format!("# memory {slug}\nversion {version}\n").into_bytes()
}

/// Build the manifest JSON of a step (bounded: extra entries are dropped).
pub fn manifest_of(step: &StepSpec) -> Manifest {
    let table = |t: &TableSpec| {
        let i = t.table as usize % TABLES.len();
        let id = TABLES[i];
        let v = step.versions[i] % 4;
        let name = if t.alt_name {
            format!("{}_v2", &id[4..])
        } else {
            id[4..].to_string()
        };
        serde_json::json!({
            "id": id,
            "name": name,
            "md5": md5_hex(&table_bytes(id, v)),
            "query_mode": if t.remote { "remote" } else { "local" },
            "parquet_url": format!("/api/data/{id}/v{v}/download"),
        })
    };
    let direct: Vec<_> = step.direct.iter().take(MAX_DIRECT).map(table).collect();
    let packages: Vec<_> = step
        .packages
        .iter()
        .take(MAX_PACKAGES)
        .map(|p| {
            let slug = PACKAGES[p.slug as usize % PACKAGES.len()];
            serde_json::json!({
                "id": format!("id_{slug}"),
                "slug": slug,
                "name": slug.to_uppercase(),
                "tables": p.tables.iter().take(MAX_PACKAGE_TABLES).map(table).collect::<Vec<_>>(),
            })
        })
        .collect();
    let domains: Vec<_> = step
        .domains
        .iter()
        .take(DOMAINS.len())
        .map(|&(d, v)| {
            let slug = DOMAINS[d as usize % DOMAINS.len()];
            let v = v % 3;
            serde_json::json!({
                "slug": slug,
                "md5": md5_hex(&bundle_bytes(slug, v)),
                "bundle_url": format!("/api/memory/{slug}/v{v}/bundle.md"),
            })
        })
        .collect();
    let v = serde_json::json!({
        "direct_tables": direct,
        "data_packages": packages,
        "memory_domains": domains,
    });
    Manifest::from_json(&serde_json::to_vec(&v).unwrap()).expect("pool manifest parses")
}

/// An in-memory origin serving deterministic bytes per (id, version).
pub struct PoolOrigin;

impl PoolOrigin {
    /// The body a request names, or the fetch error of an unknown URL.
    fn served(req: &Request<'_>) -> stack::Result<Vec<u8>> {
        Self::body(req.url).ok_or_else(|| stack::Error::fetch(req.item.describe(), "unknown URL"))
    }

    fn body(url: &str) -> Option<Vec<u8>> {
        let parts: Vec<&str> = url.trim_start_matches('/').split('/').collect();
        let version = |s: &str| s.strip_prefix('v')?.parse::<u8>().ok();
        match parts.as_slice() {
            ["api", "data", id, v, "download"] => Some(table_bytes(id, version(v)?)),
            ["api", "memory", slug, v, "bundle.md"] => Some(bundle_bytes(slug, version(v)?)),
            _ => None,
        }
    }
}

impl Origin for PoolOrigin {
    fn resolve(&self, url: &str) -> Result<(), String> {
        Self::body(url)
            .map(|_| ())
            .ok_or_else(|| format!("unknown URL {url:?}"))
    }

    fn fetch(&self, fs: &dyn Fs, req: &Request<'_>, part: &Path) -> stack::Result<Fetched> {
        origin::stream_to_part(fs, Self::served(req)?.as_slice(), part)
    }

    /// About half the items (by md5) are handed over whole: staging's batched path
    /// and its streamed path are both fuzzed.
    fn read_small(&self, req: &Request<'_>) -> Option<stack::Result<Vec<u8>>> {
        (req.md5 < "8").then(|| Self::served(req))
    }
}

/// What a stack is, for "old or new" comparisons: refs (slot, id) → (name, md5),
/// domains slug → md5. Strategies and fingerprints are not part of it.
pub type View = (
    BTreeMap<(Slot, String), (String, String)>,
    BTreeMap<String, String>,
);

pub fn view_of_state(s: &SyncState) -> View {
    let refs = s
        .entries()
        .map(|(slot, id, e)| {
            let key = (slot.to_slot(), id.to_string());
            (key, (e.name.to_string(), e.md5.to_string()))
        })
        .collect();
    let doms = s
        .memory_domains
        .iter()
        .map(|(k, d)| (k.to_string(), d.md5.to_string()))
        .collect();
    (refs, doms)
}

pub fn view_of_desired(d: &Desired) -> View {
    let refs = d
        .refs
        .iter()
        .map(|((slot, id), r)| {
            let key = (slot.to_slot(), id.to_string());
            (key, (r.name.to_string(), r.md5.to_string()))
        })
        .collect();
    let doms = d
        .domains
        .iter()
        .map(|(k, w)| (k.to_string(), w.md5.to_string()))
        .collect();
    (refs, doms)
}

fn link_of(b: u8) -> LinkMode {
    match b % 5 {
        0 => LinkMode::Symlink,
        1 => LinkMode::Hardlink,
        2 => LinkMode::Copy,
        3 => LinkMode::Auto,
        _ => LinkMode::Reflink,
    }
}

fn do_pull(sim: &SimFs, manifest: &Manifest, link: LinkMode) -> stack::Result<()> {
    let fs: Arc<dyn Fs> = Arc::new(sim.clone());
    let hash = default_hash(fs.as_ref());
    let cfg = PullConfig {
        fs: fs.clone(),
        layout: Layout::new(ROOT),
        origin: &PoolOrigin,
        link,
        jobs: 1,
        dry_run: false,
        wait: false,
        command: "fuzz".to_string(),
        hash: &hash,
        bundles: BundleCheck::Verify,
        progress: &|_| {},
    };
    // As bytes, like the command line (the no-op key and `Request` are exercised).
    let bytes = serde_json::to_vec(manifest).expect("manifest serializes");
    let wanted = Wanted::Raw {
        bytes: (&bytes[..]).into(),
        origin: "fuzz".into(),
    };
    pull(wanted, &cfg).map(|_| ())
}

/// Invariants 1–5 on the disk, and the state file equal to the journal's projection.
/// Returns the state.
pub fn check_stack(sim: &SimFs, when: &str) -> SyncState {
    let layout = Layout::new(ROOT);
    let records: Vec<Record> = match stack::journal::scan_file(sim, &layout).expect("scan") {
        Some(scan) => {
            assert_eq!(scan.end, End::Clean, "{when}: journal not clean");
            scan.records.into_iter().map(|(_, r)| r).collect()
        }
        None => Vec::new(),
    };
    let projection = project(&records);
    assert!(
        projection.pending.is_none(),
        "{when}: a transaction is left open: {:?}",
        projection.pending
    );
    let on_disk = read_state(sim, &layout)
        .unwrap_or_else(|e| panic!("{when}: state file unreadable: {e}"))
        .unwrap_or_default();
    // The state file also records where the journal ends (`end`, `base`: the fast
    // path's bookkeeping, which records alone cannot know); all else must match.
    let mut bookkept = projection.state.clone();
    bookkept.journal.at = on_disk.journal.at;
    assert_eq!(
        on_disk, bookkept,
        "{when}: sync_state.json is not the projection of the journal"
    );
    if let Some(at) = on_disk.journal.at {
        let len = stack::fs::Fs::metadata(sim, &layout.journal())
            .map(|m| m.len)
            .unwrap_or(0);
        assert_eq!(
            at.len, len,
            "{when}: the state names a journal length it does not have"
        );
        let last = records.last().map_or((0, 0), |r| {
            (r.seq, records.iter().map(|r| r.txn).max().unwrap_or(0))
        });
        assert_eq!(
            (at.seq, at.txn),
            last,
            "{when}: the state names a journal end it does not have"
        );
    }
    let hash = default_hash(sim);
    let violations =
        audit(sim, &layout, &on_disk, Contents::Rehash(&hash, 1)).expect("audit reads");
    assert!(violations.is_empty(), "{when}: {violations:#?}");
    for (slug, d) in &on_disk.memory_domains {
        let got = origin::md5_file(sim, &layout.join(&d.path)).expect("bundle reads");
        assert_eq!(
            got,
            d.md5.as_str(),
            "{when}: bundle of {slug} has other content"
        );
    }
    // Nothing but the engine's own folders at the top.
    for e in sim.read_dir(Path::new(ROOT)).expect("list root") {
        assert!(
            matches!(
                e.name.as_str(),
                "data" | "memory" | ".stack" | "sync_state.json"
            ),
            "{when}: stray {}",
            e.name
        );
    }
    on_disk
}

fn recover_now(sim: &SimFs, when: &str) {
    let fs: Arc<dyn Fs> = Arc::new(sim.clone());
    if let Err(e) = recover(fs, &Layout::new(ROOT)) {
        panic!("{when}: recovery failed: {e}\n{}", sim.op_log().join("\n"));
    }
}

/// What a scenario exercised.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ran {
    pub pulls: usize,
    pub crashes: usize,
    /// Mutating operations of the last pull that ran to its end without a crash.
    pub last_ops: u64,
}

/// Run a sequence of pulls (with crashes) on a fresh [`SimFs`], checking after each.
pub fn run_scenario(steps: &[StepSpec]) -> Ran {
    let mut ran = Ran::default();
    let mut sim = SimFs::new();
    sim.create_dirs(ROOT).expect("setup");
    let mut old = view_of_state(&SyncState::default());
    for (i, step) in steps.iter().take(MAX_STEPS).enumerate() {
        let manifest = manifest_of(step);
        let link = link_of(step.link);
        let new = validate(&manifest, &PoolOrigin)
            .ok()
            .map(|d| view_of_desired(&d));
        sim.set_reflink(step.reflink);
        if let Some(c) = step.crash {
            sim.crash_after(c.after as u64);
        }
        let ops_before = sim.ops();
        let result = do_pull(&sim, &manifest, link);
        let crashed = sim.is_crashed();
        ran.pulls += 1;
        if crashed {
            ran.crashes += 1;
        } else {
            ran.last_ops = sim.ops() - ops_before;
        }
        let when = format!(
            "step {i} ({link:?}, crash {:?}, crashed {crashed})",
            step.crash
        );
        if !crashed {
            match (&result, &new) {
                (Ok(()), Some(_)) => {}
                (Err(stack::Error::BadManifest(_)), None) => {}
                _ => panic!("{when}: pull gave {result:?}, validation {new:?}"),
            }
        }
        match step.crash {
            None => {
                let state = check_stack(&sim, &when);
                let want = new.clone().unwrap_or(old.clone());
                assert_eq!(view_of_state(&state), want, "{when}: not the pulled stack");
                old = want;
                if new.is_some() {
                    // Pulling the same manifest again changes nothing, not even the journal.
                    let journal = Layout::new(ROOT).journal();
                    let before = sim.read(&journal).expect("journal");
                    do_pull(&sim, &manifest, link).expect("repull");
                    let after = sim.read(&journal).expect("journal");
                    if after != before {
                        let added: Vec<Record> = frame::scan(&after)
                            .records
                            .into_iter()
                            .map(|(_, r)| r)
                            .skip(frame::scan(&before).records.len())
                            .collect();
                        panic!("{when}: pulling the same manifest again wrote {added:#?}");
                    }
                    assert_eq!(
                        check_stack(&sim, &when),
                        state,
                        "{when}: repull changed the state"
                    );
                }
            }
            Some(c) => {
                // Crash (or, if the pull finished first, lose power right after it).
                sim = sim.reboot(c.crash());
                if let Some((after, mode)) = c.in_recovery {
                    // Power fails again while recovery runs.
                    sim.crash_after(after as u64);
                    let r = recover(Arc::new(sim.clone()), &Layout::new(ROOT));
                    let crashed_again = sim.is_crashed();
                    if !crashed_again {
                        if let Err(e) = r {
                            panic!("{when}: recovery failed: {e}");
                        }
                    }
                    ran.crashes += usize::from(crashed_again);
                    // Disarm (or lose power after a finished recovery).
                    sim = sim.reboot(crash_mode(mode, c.mask.rotate_left(17)));
                }
                recover_now(&sim, &when);
                let state = check_stack(&sim, &format!("{when}, recovered"));
                let got = view_of_state(&state);
                if crashed {
                    assert!(
                        got == old || Some(&got) == new.as_ref(),
                        "{when}: after recovery the stack is neither old nor new:\n{got:?}\nold {old:?}\nnew {new:?}"
                    );
                } else {
                    let want = new.clone().unwrap_or(old.clone());
                    assert_eq!(
                        got,
                        want,
                        "{when}: a finished pull did not survive {:?}",
                        c.crash()
                    );
                }
                // The user runs the pull again: it must reach the new stack.
                let again = do_pull(&sim, &manifest, link);
                assert_eq!(again.is_ok(), new.is_some(), "{when}: retry gave {again:?}");
                let state = check_stack(&sim, &format!("{when}, retried"));
                let want = new.clone().unwrap_or(old.clone());
                assert_eq!(
                    view_of_state(&state),
                    want,
                    "{when}: retry is not the new stack"
                );
                old = want;
            }
        }
    }
    ran
}

/// A journal file holding `batches`, one frame each.
pub fn write_journal(records: &[Vec<Record>]) -> Vec<u8> {
    let mut out = frame::header().to_vec();
    for batch in records {
        out.write_all(&frame::encode_frame(batch).unwrap()).unwrap();
    }
    out
}
