//! The `stack` command line: parse arguments, call the library, print the report.
//! Nothing here decides anything the library does not.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

use stack::error::{Error, Result};
use stack::fs::{Fs, RealFs};
use stack::journal::{self, End, LinkMode};
use stack::layout::Layout;
use stack::reconcile::{self, origin::Origin, pull::PullConfig};
use stack::replay;

#[derive(Parser)]
#[command(
    name = "stack",
    version,
    about = "Keep a local data stack identical to a server manifest, crash-safely"
)]
struct Cli {
    /// Print nothing but errors (and the report asked for with --json).
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Print more: recovery notes, per-pull details.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

/// How much goes to stderr.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Quiet,
    Normal,
    Verbose,
}

#[derive(Clone, Copy, ValueEnum)]
enum Link {
    Auto,
    Symlink,
    Hardlink,
    Copy,
    Reflink,
}

#[derive(clap::Args)]
struct DirArg {
    /// The local directory (default: $STACK_DIR, else the current directory).
    #[arg(long, env = "STACK_DIR", default_value = ".")]
    dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Make the directory equal to the manifest.
    Pull {
        #[arg(long)]
        manifest: String,
        #[command(flatten)]
        dir: DirArg,
        #[arg(long, value_enum, default_value = "auto")]
        link: Link,
        /// Most downloads in flight at once (a hard cap; the pull adapts below it).
        /// Default: 128 from a server, 4 from a local folder.
        #[arg(long)]
        jobs: Option<usize>,
        /// Say what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print one JSON report on stdout.
        #[arg(long)]
        json: bool,
        /// Wait for the directory lock instead of failing.
        #[arg(long)]
        wait: bool,
    },
    /// What a pull would do; changes nothing.
    Status {
        #[arg(long)]
        manifest: String,
        #[command(flatten)]
        dir: DirArg,
        #[arg(long)]
        json: bool,
    },
    /// Check invariants 1-5.
    Verify {
        #[command(flatten)]
        dir: DirArg,
        /// Re-hash every reference.
        #[arg(long)]
        contents: bool,
        #[arg(long)]
        json: bool,
    },
    /// The operation journal.
    Journal {
        #[command(subcommand)]
        command: JournalCommand,
    },
    /// Remove staging leftovers; move what no state entry holds out of data/ and
    /// memory/ into .stack/quarantine/ (recoverable).
    Gc {
        #[command(flatten)]
        dir: DirArg,
        #[arg(long)]
        wait: bool,
        /// Delete what gc moves (and everything quarantined before) instead of
        /// keeping it in .stack/quarantine/.
        #[arg(short, long)]
        force: bool,
    },
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum JournalCommand {
    /// Finish or roll back an interrupted pull; rebuild sync_state.json.
    Replay {
        #[command(flatten)]
        dir: DirArg,
        #[arg(long)]
        wait: bool,
    },
    /// List the records.
    Show {
        #[command(flatten)]
        dir: DirArg,
        #[arg(long)]
        json: bool,
    },
    /// Checksum every record; report the first bad offset.
    Verify {
        #[command(flatten)]
        dir: DirArg,
    },
    /// Checkpoint, then drop what the checkpoint covers.
    Compact {
        #[command(flatten)]
        dir: DirArg,
        #[arg(long)]
        wait: bool,
    },
}

fn link_mode(l: Link) -> LinkMode {
    match l {
        Link::Auto => LinkMode::Auto,
        Link::Symlink => LinkMode::Symlink,
        Link::Hardlink => LinkMode::Hardlink,
        Link::Copy => LinkMode::Copy,
        Link::Reflink => LinkMode::Reflink,
    }
}

fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

/// Say on stderr that a command waits for the directory's lock, and for whom.
fn say_waiting(fs: &dyn Fs, layout: &Layout) {
    eprintln!(
        "stack: waiting for the lock on {} held by {}",
        layout.root.display(),
        journal::lock::holder(fs, layout)
    );
}

/// The warnings of a report, on stderr: the library prints none itself.
fn print_warnings(warnings: &[String]) {
    for w in warnings {
        eprintln!("stack: warning: {w}");
    }
}

fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string(v).expect("a JSON value serializes: its keys are strings")
    );
}

fn human_counts(name: &str, c: &stack::Counts) {
    println!(
        "{name:15} {} added, {} updated, {} removed, {} unchanged, {} skipped",
        c.added, c.updated, c.removed, c.unchanged, c.skipped
    );
}

/// Parallel copies from a local folder when `--jobs` is not given: the disk, not
/// latency, bounds them.
const LOCAL_JOBS: usize = 4;

struct PullArgs<'a> {
    manifest: &'a str,
    dir: &'a Path,
    link: LinkMode,
    jobs: usize,
    dry_run: bool,
    json: bool,
    wait: bool,
    level: Level,
}

/// Progress of downloads: on a TTY a bar with files done/total, bytes done/total
/// and an ETA; otherwise a line at most every two seconds.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    /// Bytes are counted as they arrive (the HTTP origin's hook), not per file.
    live_bytes: bool,
    state: std::sync::Mutex<Counted>,
}

#[derive(Default)]
struct Counted {
    staging: bool,
    files: u64,
    files_total: u64,
    bytes: u64,
    bytes_total: u64,
    last_line: Option<std::time::Instant>,
}

impl Progress {
    fn new(a: &PullArgs<'_>, live_bytes: bool) -> Self {
        let show = a.level >= Level::Normal && !a.json && !a.dry_run;
        let tty = std::io::stderr().is_terminal();
        let bar = (show && tty).then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_message("reading the manifest");
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        });
        Progress {
            bar,
            plain: show && !tty,
            live_bytes,
            state: std::sync::Mutex::new(Counted::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counted> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn event(&self, e: reconcile::pull::Progress) {
        match e {
            reconcile::pull::Progress::Staging {
                files,
                bytes,
                without_size: _,
            } => self.staging(files, bytes),
            reconcile::pull::Progress::Fetched { bytes } => self.file_done(bytes),
            reconcile::pull::Progress::WaitingForLock => {}
        }
    }

    /// Staging starts. The bar runs on bytes when the manifest gave sizes (a file
    /// without one, a bundle, adds its bytes as they come), else on files.
    fn staging(&self, files: u64, bytes: u64) {
        let mut st = self.lock();
        st.staging = true;
        st.files_total = files;
        st.bytes_total = bytes;
        if let Some(bar) = &self.bar {
            let template = if bytes > 0 {
                bar.set_length(bytes);
                "{msg} [{elapsed}] {wide_bar} {bytes}/{total_bytes} at {bytes_per_sec}, ETA {eta}"
            } else {
                bar.set_length(files);
                "{msg} [{elapsed}] {wide_bar} {bytes_per_sec}, ETA {eta}"
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_position(0);
            bar.reset_eta();
            bar.set_message(format!("files 0/{files}"));
        } else if self.plain && files > 0 {
            eprintln!("stack: fetching {files} files, {}", human_bytes(bytes));
        }
    }

    /// Bytes arrived (the HTTP origin calls this per chunk; the manifest's own
    /// bytes, before staging starts, are not the downloads').
    fn bytes(&self, n: u64) {
        let mut st = self.lock();
        if !st.staging {
            return;
        }
        st.bytes += n;
        if let Some(bar) = &self.bar {
            if st.bytes_total > 0 {
                if st.bytes > st.bytes_total {
                    st.bytes_total = st.bytes;
                    bar.set_length(st.bytes_total);
                }
                bar.set_position(st.bytes);
            }
        }
    }

    fn file_done(&self, bytes: u64) {
        if !self.live_bytes {
            self.bytes(bytes);
        }
        let mut st = self.lock();
        st.files += 1;
        if let Some(bar) = &self.bar {
            if st.bytes_total == 0 {
                bar.set_position(st.files);
            }
            bar.set_message(format!("files {}/{}", st.files, st.files_total));
        } else if self.plain
            && st
                .last_line
                .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(2))
        {
            eprintln!(
                "stack: files {}/{}, {} of {}",
                st.files,
                st.files_total,
                human_bytes(st.bytes),
                human_bytes(st.bytes_total)
            );
            st.last_line = Some(std::time::Instant::now());
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `812 bytes`, `16.0 KiB`, `23.9 MiB`, `1.2 GiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `0.4 s`, `19.2 s`, `3 min 05 s`.
fn human_duration(ms: u64) -> String {
    if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{} min {:02} s", ms / 60_000, (ms / 1000) % 60)
    }
}

fn pull_like(a: PullArgs<'_>) -> Result<i32> {
    let PullArgs {
        manifest,
        dir,
        link,
        jobs,
        dry_run,
        json,
        wait,
        level,
    } = a;
    let jobs = jobs.max(1);
    let remote = reconcile::source::is_url(manifest);
    let bar = Arc::new(Progress::new(&a, remote));
    let (manifest, origin) = if remote {
        let hook = bar.clone();
        let http = reconcile::http::HttpOptions {
            jobs,
            progress: Some(Arc::new(move |n| hook.bytes(n))),
            ..reconcile::http::HttpOptions::from_env()?
        };
        reconcile::source::open_manifest_with(manifest, http)?
    } else {
        reconcile::source::open_manifest(manifest)?
    };
    let fs: Arc<dyn Fs> = Arc::new(RealFs);
    let hash = reconcile::pull::default_hash(fs.as_ref());
    let waiting_on = Layout::new(dir);
    let progress = |e: reconcile::pull::Progress| {
        if e == reconcile::pull::Progress::WaitingForLock {
            say_waiting(fs.as_ref(), &waiting_on);
        }
        bar.event(e)
    };
    let cfg = PullConfig {
        fs: fs.clone(),
        layout: Layout::new(dir),
        origin: origin.as_ref() as &dyn Origin,
        link,
        jobs,
        dry_run,
        wait,
        command: command_line(),
        hash: &hash,
        bundles: stack::BundleCheck::Verify,
        progress: &progress,
    };
    let rep = reconcile::pull::pull(manifest.into_wanted(), &cfg);
    bar.finish();
    let rep = rep?;
    print_warnings(&rep.warnings);
    if level >= Level::Normal {
        for note in &rep.recovered {
            eprintln!("stack: {note}");
        }
    }
    if json {
        print_json(
            &serde_json::to_value(&rep)
                .expect("a report serializes: its maps have string keys, its numbers are integers"),
        );
    } else if level >= Level::Normal || dry_run {
        // A pull's summary is news, and -q drops it; what a dry run would change is
        // the answer asked for.
        let verb = if dry_run { "would change" } else { "pulled" };
        println!("{verb} {} (transaction {})", dir.display(), rep.txn);
        human_counts("direct tables", &rep.direct_tables);
        human_counts("data packages", &rep.data_packages);
        human_counts("memory domains", &rep.memory_domains);
        if !dry_run {
            println!(
                "{} in {}",
                human_bytes(rep.bytes_fetched),
                human_duration(rep.elapsed_ms)
            );
        }
    }
    Ok(0)
}

fn verify_cmd(dir: &Path, contents: bool, json: bool) -> Result<i32> {
    let stack::Verified { violations, notes } = stack::verify_dir(dir, contents)?;
    for note in &notes {
        eprintln!("stack: {note}");
    }
    if json {
        print_json(&json!({"ok": violations.is_empty(), "violations": violations}));
    } else if violations.is_empty() {
        println!("ok: invariants 1-5 hold in {}", dir.display());
    }
    for v in &violations {
        eprintln!("stack: {v}");
    }
    Ok(if violations.is_empty() { 0 } else { 4 })
}

fn journal_show(dir: &Path, json: bool) -> Result<i32> {
    let layout = Layout::new(dir);
    let Some(scan) = journal::scan_file(&RealFs, &layout)? else {
        return Err(Error::Usage(format!("{} has no journal", dir.display())));
    };
    if json {
        // One JSON object on stdout: a corrupt journal is an error report only.
        replay::project::check_journal(&layout, &scan)?;
        let records: Vec<_> = scan
            .records
            .iter()
            .map(|(off, r)| json!({"offset": off, "seq": r.seq, "txn": r.txn, "kind": r.event.kind(), "summary": r.event.summary()}))
            .collect();
        print_json(&json!({"ok": true, "records": records, "end": format!("{:?}", scan.end)}));
    } else {
        for (off, r) in &scan.records {
            println!(
                "{off:>10} {:>8} {:>6} {:14} {}",
                r.seq,
                r.txn,
                r.event.kind(),
                r.event.summary()
            );
        }
    }
    replay::project::check_journal(&layout, &scan)?;
    Ok(0)
}

fn journal_verify(dir: &Path) -> Result<i32> {
    let layout = Layout::new(dir);
    // Checked as read, a frame at a time: a large journal is never held whole.
    let Some(checked) = reconcile::recover::check_journal_file(&RealFs, &layout)? else {
        return Err(Error::Usage(format!("{} has no journal", dir.display())));
    };
    match &checked.end {
        End::TornTail { offset, reason } => println!(
            "ok: {} records in {} valid bytes; torn tail at byte offset {offset} ({reason}), cut by the next mutating command",
            checked.records, checked.valid_len
        ),
        _ => println!("ok: {} records in {} bytes", checked.records, checked.valid_len),
    }
    Ok(0)
}

fn run(cli: Cli) -> Result<i32> {
    let level = if cli.quiet {
        Level::Quiet
    } else if cli.verbose {
        Level::Verbose
    } else {
        Level::Normal
    };
    match cli.command {
        Command::Pull {
            manifest,
            dir,
            link,
            jobs,
            dry_run,
            json,
            wait,
        } => pull_like(PullArgs {
            jobs: jobs.unwrap_or(if reconcile::source::is_url(&manifest) {
                reconcile::http::DEFAULT_JOBS
            } else {
                LOCAL_JOBS
            }),
            manifest: &manifest,
            dir: &dir.dir,
            link: link_mode(link),
            dry_run,
            json,
            wait,
            level,
        }),
        Command::Status {
            manifest,
            dir,
            json,
        } => pull_like(PullArgs {
            manifest: &manifest,
            dir: &dir.dir,
            link: LinkMode::Auto,
            jobs: 1,
            dry_run: true,
            json,
            wait: false,
            level,
        }),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "stack", &mut std::io::stdout());
            Ok(0)
        }
        Command::Verify {
            dir,
            contents,
            json,
        } => verify_cmd(&dir.dir, contents, json),
        Command::Journal { command } => match command {
            JournalCommand::Replay { dir, wait } => {
                let layout = Layout::new(&dir.dir);
                let fs: Arc<dyn Fs> = Arc::new(RealFs);
                let _lock = journal::lock::acquire_with(
                    fs.as_ref(),
                    &layout,
                    &command_line(),
                    wait,
                    &|| say_waiting(fs.as_ref(), &layout),
                )?;
                let rec = reconcile::recover::replay(fs, &layout)?;
                print_warnings(&rec.warnings);
                for note in &rec.notes {
                    println!("{note}");
                }
                if rec.notes.is_empty() && level >= Level::Verbose {
                    println!("nothing to recover");
                }
                println!(
                    "ok: {} is at transaction {}",
                    dir.dir.display(),
                    rec.state.journal.txn
                );
                Ok(0)
            }
            JournalCommand::Show { dir, json } => journal_show(&dir.dir, json),
            JournalCommand::Verify { dir } => journal_verify(&dir.dir),
            JournalCommand::Compact { dir, wait } => {
                let (before, after) = reconcile::recover::compact_dir(
                    Arc::new(RealFs),
                    &Layout::new(&dir.dir),
                    &command_line(),
                    wait,
                )?;
                println!("ok: journal compacted from {before} to {after} bytes");
                Ok(0)
            }
        },
        Command::Gc { dir, wait, force } => {
            let sweep = if force {
                reconcile::gc::Sweep::Delete
            } else {
                reconcile::gc::Sweep::Quarantine
            };
            let layout = Layout::new(&dir.dir);
            let r = reconcile::gc::gc(Arc::new(RealFs), &layout, &command_line(), wait, sweep)?;
            print_warnings(&r.warnings);
            let shown = |p: &Path| {
                p.strip_prefix(&layout.root)
                    .unwrap_or(p)
                    .display()
                    .to_string()
            };
            for rel in &r.moved {
                match &r.kept_in {
                    Some(q) => println!("moved {rel} to {}", shown(&q.join(rel))),
                    None => println!("deleted {rel}"),
                }
            }
            for p in &r.deleted {
                println!("deleted {p}");
            }
            match &r.kept_in {
                Some(q) => println!(
                    "ok: {} moved to {} (nothing was deleted: move them back, or delete them with `stack gc --force`)",
                    r.moved.len(),
                    shown(q)
                ),
                None => println!("ok: {} moved, {} deleted", r.moved.len(), r.deleted.len()),
            }
            Ok(0)
        }
    }
}

/// Ctrl-C: every instant is crash-safe, so stopping at once is safe; say what happens
/// next and exit 130 as shells expect. Only async-signal-safe calls (write, _exit).
extern "C" fn on_interrupt(_: libc::c_int) {
    const MSG: &[u8] = b"\nstack: interrupted; the next stack command recovers the directory \
(to the previous stack, or to the new one if it was already committed)\n";
    // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is a static buffer.
    unsafe {
        libc::write(2, MSG.as_ptr().cast(), MSG.len());
        libc::_exit(130);
    }
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`stack journal show | head`), as Unix tools do,
    // instead of panicking in `println!`.
    // SAFETY: setting signal dispositions before any thread starts; the handler
    // only makes async-signal-safe calls.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        );
    }
    // glibc raises its trim threshold to the size of the largest block freed so
    // far, so after a large stack's manifest is dropped the heap is never handed
    // back; a fixed threshold keeps peak RSS near the live heap (measured at 100k
    // tables: 218 -> 205 MiB).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
    }
    // An empty STACK_DIR means unset (contract §5: then the current directory).
    if std::env::var_os("STACK_DIR").is_some_and(|v| v.is_empty()) {
        std::env::remove_var("STACK_DIR");
    }
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            if json && code == 2 {
                print_json(
                    &json!({"ok": false, "error": {"exit_code": 2, "kind": "usage", "message": e.to_string()}}),
                );
            }
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            let code = e.exit_code();
            if json {
                print_json(
                    &json!({"ok": false, "error": {"exit_code": code, "kind": e.kind(), "message": e.to_string()}}),
                );
            }
            eprintln!("stack: error: {e}");
            ExitCode::from(code as u8)
        }
    }
}
