//! `SimFs`: an in-memory [`Fs`] with a separate durable image, for crash testing.
//!
//! Owns: a simulated filesystem tree (folders, regular files, symlinks, hard links),
//! the record of which of its mutations are durable, crash injection (fail every
//! operation from the n-th mutation on) and power-loss simulation (rebuild the tree
//! a machine would see after rebooting). It is the model of redb's
//! `tests/crash_consistency.rs` and of the ALICE / CrashMonkey studies.
//!
//! # Two images
//!
//! Every mutation changes the *live* image at once (what a running process sees)
//! and is appended to a log of operations. An operation is *pending* until it is
//! made durable; the *durable* image is the last compacted base plus every durable
//! operation of the log, replayed in order (pending ones skipped).
//!
//! # Durability model (what this simulator enforces)
//!
//! - File contents (`FileWrite::write`, and the truncation to 0 done by `create` on
//!   an existing file) become durable when a [`FileWrite::sync`] (fdatasync) on that
//!   inode returns; it covers every content operation on the inode so far, through
//!   any handle or hard link.
//! - A name operation — `create` of a new file, `lock` creating its file, `rename`,
//!   `hard_link`, `symlink`, `reflink`, `remove_file`, `create_dir`, `remove_dir` —
//!   becomes durable when `sync_dir` of the folder it changes returns. A rename
//!   changes two folders and is one operation: `sync_dir` of *either* makes all of it
//!   durable (as on ext4, xfs and btrfs, where it is one journal transaction).
//! - A folder's own name is an entry of its parent: a file named durably inside a
//!   folder whose `create_dir` is not durable is lost with the folder.
//! - `truncate` is durable on return, and, like the `fsync` the real implementation
//!   does after it, it makes every earlier content and mode change of that inode
//!   durable too.
//! - `set_readonly` becomes durable with `sync_dir` of a folder that names the inode
//!   at the time of that `sync_dir`, or with `truncate` of the file.
//! - `sync_fs` makes everything durable.
//! - The clone made by `reflink` and the target of a `symlink` travel with their
//!   name: they are durable when the name is.
//! - File contents and names are independent: a file whose name is durable but whose
//!   contents were never synced is *empty* after a power loss; one whose contents were
//!   synced but whose name never was is gone. When only some writes survive (subset
//!   mode), a write that lands past the surviving end leaves a hole of zeros.
//!
//! # Crash injection
//!
//! Mutating operations are counted: each call of `create`, `open_append`,
//! `truncate`, `sync_dir`, `sync_fs`, `rename`, `hard_link`, `symlink`, `reflink`
//! (even when reflinks are disabled), `remove_file`, `create_dir`, `remove_dir`,
//! `set_readonly`, `lock`, `FileWrite::write` and `FileWrite::sync` counts one,
//! whether it succeeds or fails. Reads, `FileWrite::flush` and the provided helpers
//! themselves do not count (the helpers count the calls they make). The setup helpers
//! of [`SimFs`] (`write_file`, `create_dirs`, `make_durable`) never count.
//! [`SimFs::crash_after`]`(n)` lets `n` more mutating operations run; the next one
//! fails, without taking effect, with an `io::Error` whose payload is a
//! [`SimulatedCrash`], and from then on every call — reads, writes through open handles, reads of open readers —
//! fails the same way, so the engine cannot clean up after its crash.
//!
//! # Power loss
//!
//! [`SimFs::reboot`] builds the filesystem a restarted process sees, with a fresh
//! operation counter, no crash armed and no open handles:
//! - [`Crash::Process`]: the process died, the kernel did not: the live image
//!   survives, and what was pending stays pending (a later power loss can still
//!   lose it).
//! - [`Crash::PowerLossOptimistic`]: the power failed after the disk wrote
//!   everything: the live image survives and becomes durable. Its tree is the
//!   same as `Process`; only the pending log differs.
//! - [`Crash::PowerLossPessimistic`]: every pending operation is lost: the durable
//!   image.
//! - [`Crash::PowerLossSubset`]`(mask)`: pending operation `i` (0-based, in log
//!   order, see [`SimFs::pending`]) survives iff bit `i` of `mask` is set (operations
//!   past the 64th are dropped); [`Crash::PowerLossRandom`]`(seed)` picks each with
//!   probability 1/2 from the seed. Survivors are replayed in order onto the durable
//!   image, each operation as one atomic unit (a kept rename is entirely kept).
//!
//! Replay is by inode, not by path: a kept operation whose precondition does not hold
//! in the image being rebuilt (its folder was dropped, the name it removes now names
//! another inode, the name it creates is taken, a folder it replaces is not empty,
//! the folder or symlink it moves or links was never created) is skipped, as if it
//! had failed. A file inode needs no creation: a kept write, rename or link of a file
//! whose creation was dropped materializes the inode (empty where no write survives),
//! which is what lets a durable rename of a synced temp file survive even when the
//! temp file's own folder was never synced.
//!
//! `lock` always succeeds at once (creating its file if missing) and returns a
//! no-op guard. `reflink` fails with `Unsupported` unless [`SimFs::set_reflink`]
//! enabled it. Writes to a read-only file through `create`, `open_append` or
//! `truncate` fail with `PermissionDenied`, as for a non-root user, unless
//! [`SimFs::set_enforce_readonly`] turned that off. Paths must be absolute;
//! `..` is resolved physically (after symlinks), as the kernel does.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{DirEntry, FileWrite, Fs, Kind, LockGuard, Meta};
use crate::error::SimulatedCrash;

type Ino = u64;
const ROOT: Ino = 1;
const MAX_SYMLINK_HOPS: usize = 40;
/// `truncate` may not grow a file past this (contents are held in memory).
const MAX_FILE_LEN: u64 = 1 << 30;

/// What survives a crash; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// SIGKILL: the live image survives, pending operations stay pending.
    Process,
    /// Power loss after the disk wrote everything: the live image, now durable.
    PowerLossOptimistic,
    /// Power loss losing every pending operation: the durable image.
    PowerLossPessimistic,
    /// Power loss keeping pending operation `i` iff bit `i` is set.
    PowerLossSubset(u64),
    /// Power loss keeping each pending operation with probability 1/2 (seeded).
    PowerLossRandom(u64),
}

/// One path of a [`SimFs::snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapEntry {
    Dir,
    File { bytes: Vec<u8>, readonly: bool },
    Symlink { target: PathBuf },
}

/// The whole tree: absolute path → what is there (the root itself is left out).
pub type Snapshot = BTreeMap<PathBuf, SnapEntry>;

// ---------------------------------------------------------------------------
// The image: an inode table.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct FileNode {
    data: Vec<u8>,
    readonly: bool,
    mtime: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    File(FileNode),
    Dir(BTreeMap<String, Ino>),
    Symlink(PathBuf),
}

impl Node {
    fn kind(&self) -> Kind {
        match self {
            Node::File(_) => Kind::File,
            Node::Dir(_) => Kind::Dir,
            Node::Symlink(_) => Kind::Symlink,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Image {
    nodes: BTreeMap<Ino, Node>,
}

enum Comp {
    Up,
    Name(String),
}

fn err(kind: io::ErrorKind, what: &str, path: &Path) -> io::Error {
    io::Error::new(kind, format!("{what}: {}", path.display()))
}

fn crash_error() -> io::Error {
    SimulatedCrash::io_error()
}

/// Split a path into components; `absolute` is required for the engine's paths.
fn components(path: &Path, require_absolute: bool) -> io::Result<(bool, Vec<Comp>)> {
    let mut absolute = false;
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir => absolute = true,
            Component::CurDir => {}
            Component::ParentDir => out.push(Comp::Up),
            Component::Normal(n) => match n.to_str() {
                Some(s) => out.push(Comp::Name(s.to_string())),
                None => {
                    return Err(err(
                        io::ErrorKind::InvalidInput,
                        "sim: non-UTF-8 path",
                        path,
                    ))
                }
            },
            Component::Prefix(_) => {
                return Err(err(io::ErrorKind::InvalidInput, "sim: path prefix", path))
            }
        }
    }
    if require_absolute && !absolute {
        return Err(err(
            io::ErrorKind::InvalidInput,
            "sim: paths must be absolute",
            path,
        ));
    }
    if !absolute && out.is_empty() {
        return Err(err(io::ErrorKind::NotFound, "empty symlink target", path));
    }
    Ok((absolute, out))
}

impl Image {
    fn new() -> Self {
        let mut nodes = BTreeMap::new();
        nodes.insert(ROOT, Node::Dir(BTreeMap::new()));
        Image { nodes }
    }

    fn dir(&self, ino: Ino) -> Option<&BTreeMap<String, Ino>> {
        match self.nodes.get(&ino) {
            Some(Node::Dir(e)) => Some(e),
            _ => None,
        }
    }

    fn dir_mut(&mut self, ino: Ino) -> Option<&mut BTreeMap<String, Ino>> {
        match self.nodes.get_mut(&ino) {
            Some(Node::Dir(e)) => Some(e),
            _ => None,
        }
    }

    /// The file at `ino`, materialized empty if the inode does not exist yet.
    fn file_mut(&mut self, ino: Ino) -> Option<&mut FileNode> {
        match self
            .nodes
            .entry(ino)
            .or_insert_with(|| Node::File(FileNode::default()))
        {
            Node::File(f) => Some(f),
            _ => None,
        }
    }

    fn entry(&self, dir: Ino, name: &str) -> Option<Ino> {
        self.dir(dir).and_then(|e| e.get(name).copied())
    }

    /// Walk `comps` from the root, following symlinks (the last one if asked).
    fn resolve(&self, path: &Path, comps: Vec<Comp>, follow_last: bool) -> io::Result<Ino> {
        let mut queue: std::collections::VecDeque<Comp> = comps.into();
        let mut stack = vec![ROOT];
        let mut hops = 0;
        while let Some(c) = queue.pop_front() {
            let name = match c {
                Comp::Up => {
                    if stack.len() > 1 {
                        stack.pop();
                    }
                    continue;
                }
                Comp::Name(n) => n,
            };
            let dir = *stack.last().unwrap_or(&ROOT);
            let entries = self
                .dir(dir)
                .ok_or_else(|| err(io::ErrorKind::NotADirectory, "not a folder", path))?;
            let ino = *entries
                .get(&name)
                .ok_or_else(|| err(io::ErrorKind::NotFound, "no such file or folder", path))?;
            let last = queue.is_empty();
            match self.nodes.get(&ino) {
                Some(Node::Symlink(target)) if !last || follow_last => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(err(
                            io::ErrorKind::Other,
                            "too many levels of symbolic links",
                            path,
                        ));
                    }
                    let (absolute, tcomps) = components(target, false)?;
                    if absolute {
                        stack.truncate(1);
                    }
                    for c in tcomps.into_iter().rev() {
                        queue.push_front(c);
                    }
                }
                Some(Node::Dir(_)) => stack.push(ino),
                Some(_) if last => return Ok(ino),
                Some(_) => return Err(err(io::ErrorKind::NotADirectory, "not a folder", path)),
                None => return Err(err(io::ErrorKind::NotFound, "dangling inode", path)),
            }
        }
        Ok(*stack.last().unwrap_or(&ROOT))
    }

    fn lookup(&self, path: &Path, follow: bool) -> io::Result<Ino> {
        let (_, comps) = components(path, true)?;
        self.resolve(path, comps, follow)
    }

    /// The folder holding `path`'s last name, and that name.
    fn parent(&self, path: &Path) -> io::Result<(Ino, String)> {
        let (_, mut comps) = components(path, true)?;
        let name = match comps.pop() {
            Some(Comp::Name(n)) => n,
            _ => {
                return Err(err(
                    io::ErrorKind::InvalidInput,
                    "sim: path has no final name",
                    path,
                ))
            }
        };
        let dir = self.resolve(path, comps, true)?;
        if self.dir(dir).is_none() {
            return Err(err(io::ErrorKind::NotADirectory, "not a folder", path));
        }
        Ok((dir, name))
    }

    /// Is `target` the folder `top` or inside it?
    fn in_subtree(&self, top: Ino, target: Ino) -> bool {
        let mut todo = vec![top];
        let mut seen = BTreeSet::new();
        while let Some(d) = todo.pop() {
            if d == target {
                return true;
            }
            if !seen.insert(d) {
                continue;
            }
            if let Some(entries) = self.dir(d) {
                todo.extend(entries.values().copied());
            }
        }
        false
    }

    fn meta(&self, ino: Ino) -> Meta {
        match self.nodes.get(&ino) {
            Some(Node::File(f)) => Meta {
                kind: Kind::File,
                len: f.data.len() as u64,
                mtime_ns: i128::from(f.mtime),
                ino,
                dev: 1,
                readonly: f.readonly,
            },
            Some(Node::Symlink(t)) => Meta {
                kind: Kind::Symlink,
                len: t.as_os_str().len() as u64,
                mtime_ns: 0,
                ino,
                dev: 1,
                readonly: false,
            },
            Some(Node::Dir(_)) | None => Meta {
                kind: Kind::Dir,
                len: 0,
                mtime_ns: 0,
                ino,
                dev: 1,
                readonly: false,
            },
        }
    }

    fn snapshot(&self) -> Snapshot {
        let mut out = BTreeMap::new();
        let mut todo = vec![(PathBuf::from("/"), ROOT)];
        let mut seen = BTreeSet::new();
        while let Some((path, dir)) = todo.pop() {
            if !seen.insert(dir) {
                continue;
            }
            for (name, &ino) in self.dir(dir).into_iter().flatten() {
                let p = path.join(name);
                let entry = match self.nodes.get(&ino) {
                    Some(Node::Dir(_)) => {
                        todo.push((p.clone(), ino));
                        SnapEntry::Dir
                    }
                    Some(Node::File(f)) => SnapEntry::File {
                        bytes: f.data.clone(),
                        readonly: f.readonly,
                    },
                    Some(Node::Symlink(t)) => SnapEntry::Symlink { target: t.clone() },
                    None => continue,
                };
                out.insert(p, entry);
            }
        }
        out
    }

    /// Replay one operation; `false` (and no change) when its precondition fails.
    fn apply(&mut self, op: &Op) -> bool {
        match op {
            Op::Create {
                dir,
                name,
                ino,
                fresh,
                mtime,
            } => {
                if self.dir(*dir).is_none_or(|e| e.contains_key(name)) {
                    return false;
                }
                let node = match fresh {
                    Fresh::File(data) => Node::File(FileNode {
                        data: data.clone(),
                        readonly: false,
                        mtime: *mtime,
                    }),
                    Fresh::Dir => Node::Dir(BTreeMap::new()),
                    Fresh::Symlink(t) => Node::Symlink(t.clone()),
                };
                match (self.nodes.get(ino), &node) {
                    (None, _) => {
                        self.nodes.insert(*ino, node);
                    }
                    // A file inode materialized by an earlier kept operation.
                    (Some(Node::File(_)), Node::File(_)) => {}
                    _ => return false,
                }
                if let Some(e) = self.dir_mut(*dir) {
                    e.insert(name.clone(), *ino);
                }
                true
            }
            Op::Link { dir, name, ino } => {
                if self.dir(*dir).is_none_or(|e| e.contains_key(name)) {
                    return false;
                }
                match self.nodes.get(ino) {
                    Some(Node::Dir(_)) => return false,
                    Some(_) => {}
                    None => {
                        self.nodes.insert(*ino, Node::File(FileNode::default()));
                    }
                }
                if let Some(e) = self.dir_mut(*dir) {
                    e.insert(name.clone(), *ino);
                }
                true
            }
            Op::Unlink { dir, name, ino } => {
                if self.entry(*dir, name) != Some(*ino) {
                    return false;
                }
                let is_dir = match self.nodes.get(ino) {
                    Some(Node::Dir(e)) if !e.is_empty() => return false,
                    Some(Node::Dir(_)) => true,
                    _ => false,
                };
                if let Some(e) = self.dir_mut(*dir) {
                    e.remove(name);
                }
                if is_dir {
                    self.nodes.remove(ino);
                }
                true
            }
            Op::Rename {
                from_dir,
                from_name,
                to_dir,
                to_name,
                ino,
                kind,
            } => {
                let moving_dir = match self.nodes.get(ino) {
                    Some(n) => n.kind() == Kind::Dir,
                    None if *kind == Kind::File => false,
                    None => return false,
                };
                let Some(to_entries) = self.dir(*to_dir) else {
                    return false;
                };
                let old = to_entries.get(to_name).copied();
                if old == Some(*ino) {
                    return true;
                }
                if let Some(old) = old {
                    match (self.nodes.get(&old), moving_dir) {
                        (Some(Node::Dir(e)), true) if e.is_empty() => {}
                        (Some(Node::Dir(_)), _) => return false,
                        (Some(_), true) => return false,
                        _ => {}
                    }
                }
                if moving_dir && self.in_subtree(*ino, *to_dir) {
                    return false;
                }
                if !self.nodes.contains_key(ino) {
                    self.nodes.insert(*ino, Node::File(FileNode::default()));
                }
                if self.entry(*from_dir, from_name) == Some(*ino) {
                    if let Some(e) = self.dir_mut(*from_dir) {
                        e.remove(from_name);
                    }
                }
                if moving_dir {
                    // A folder has one name: drop any other (left by a dropped rename).
                    for node in self.nodes.values_mut() {
                        if let Node::Dir(e) = node {
                            e.retain(|_, v| *v != *ino);
                        }
                    }
                }
                if let Some(e) = self.dir_mut(*to_dir) {
                    e.insert(to_name.clone(), *ino);
                }
                if let Some(old) = old {
                    if matches!(self.nodes.get(&old), Some(Node::Dir(_))) {
                        self.nodes.remove(&old);
                    }
                }
                true
            }
            Op::Write {
                ino,
                offset,
                bytes,
                mtime,
            } => {
                let Some(f) = self.file_mut(*ino) else {
                    return false;
                };
                let start = usize::try_from(*offset).unwrap_or(usize::MAX);
                let end = start.saturating_add(bytes.len());
                if f.data.len() < end {
                    f.data.resize(end, 0);
                }
                f.data[start..end].copy_from_slice(bytes);
                f.mtime = *mtime;
                true
            }
            Op::SetLen { ino, len, mtime } => {
                let Some(f) = self.file_mut(*ino) else {
                    return false;
                };
                f.data
                    .resize(usize::try_from(*len).unwrap_or(usize::MAX), 0);
                f.mtime = *mtime;
                true
            }
            Op::Chmod { ino, readonly } => {
                let Some(f) = self.file_mut(*ino) else {
                    return false;
                };
                f.readonly = *readonly;
                true
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Operations and the log.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Fresh {
    File(Vec<u8>),
    Dir,
    Symlink(PathBuf),
}

#[derive(Debug, Clone)]
enum Op {
    Create {
        dir: Ino,
        name: String,
        ino: Ino,
        fresh: Fresh,
        mtime: u64,
    },
    Link {
        dir: Ino,
        name: String,
        ino: Ino,
    },
    Unlink {
        dir: Ino,
        name: String,
        ino: Ino,
    },
    Rename {
        from_dir: Ino,
        from_name: String,
        to_dir: Ino,
        to_name: String,
        ino: Ino,
        kind: Kind,
    },
    Write {
        ino: Ino,
        offset: u64,
        bytes: Vec<u8>,
        mtime: u64,
    },
    SetLen {
        ino: Ino,
        len: u64,
        mtime: u64,
    },
    Chmod {
        ino: Ino,
        readonly: bool,
    },
}

impl Op {
    fn touches_dir(&self, d: Ino) -> bool {
        match self {
            Op::Create { dir, .. } | Op::Link { dir, .. } | Op::Unlink { dir, .. } => *dir == d,
            Op::Rename {
                from_dir, to_dir, ..
            } => *from_dir == d || *to_dir == d,
            _ => false,
        }
    }

    fn is_content_of(&self, i: Ino) -> bool {
        matches!(self, Op::Write { ino, .. } | Op::SetLen { ino, .. } if *ino == i)
    }

    fn is_chmod_of(&self, i: Ino) -> bool {
        matches!(self, Op::Chmod { ino, .. } if *ino == i)
    }
}

#[derive(Debug, Clone)]
struct Pending {
    op: Op,
    durable: bool,
    desc: String,
}

#[derive(Debug, Clone, Copy)]
struct Options {
    reflink: bool,
    enforce_readonly: bool,
}

struct State {
    live: Image,
    /// Durable baseline: everything before `log` is applied here.
    base: Image,
    log: Vec<Pending>,
    next_ino: Ino,
    clock: u64,
    ops: u64,
    crash_at: Option<u64>,
    crashed: bool,
    opts: Options,
    history: Vec<String>,
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl State {
    fn new() -> Self {
        State {
            live: Image::new(),
            base: Image::new(),
            log: Vec::new(),
            next_ino: ROOT + 1,
            clock: 0,
            ops: 0,
            crash_at: None,
            crashed: false,
            opts: Options {
                reflink: false,
                enforce_readonly: true,
            },
            history: Vec::new(),
        }
    }

    /// Start a counted mutating operation (or crash).
    fn begin(&mut self, desc: &str) -> io::Result<()> {
        if self.crashed {
            return Err(crash_error());
        }
        if self.crash_at.is_some_and(|n| self.ops >= n) {
            self.crashed = true;
            self.history
                .push(format!("#{} {desc} -> CRASH", self.ops + 1));
            return Err(crash_error());
        }
        self.ops += 1;
        Ok(())
    }

    fn check(&self) -> io::Result<()> {
        if self.crashed {
            Err(crash_error())
        } else {
            Ok(())
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn alloc(&mut self) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    fn record(&mut self, op: Op, desc: &str) {
        self.live.apply(&op);
        self.log.push(Pending {
            op,
            durable: false,
            desc: format!("#{} {desc}", self.ops),
        });
    }

    fn mark(&mut self, pred: impl Fn(&Op) -> bool) {
        for p in &mut self.log {
            if !p.durable && pred(&p.op) {
                p.durable = true;
            }
        }
        let done = self.log.iter().take_while(|p| p.durable).count();
        for p in self.log.drain(..done) {
            self.base.apply(&p.op);
        }
    }

    /// The image after a power loss keeping pending op `i` iff `keep(i)`.
    fn image_keeping(&self, keep: impl Fn(usize) -> bool) -> Image {
        let mut img = self.base.clone();
        let mut index = 0usize..;
        for p in &self.log {
            // `||` short-circuits: only pending operations take an index.
            if p.durable || index.next().is_some_and(&keep) {
                img.apply(&p.op);
            }
        }
        img
    }

    fn pending_count(&self) -> usize {
        self.log.iter().filter(|p| !p.durable).count()
    }

    // ---- the mutations, uncounted -------------------------------------------

    /// Open `path` for writing (create it if missing); the inode written.
    fn open_write(&mut self, path: &Path, truncate: bool, desc: &str) -> io::Result<Ino> {
        let (dir, name) = self.live.parent(path)?;
        let Some(mut ino) = self.live.entry(dir, &name) else {
            let ino = self.alloc();
            let mtime = self.tick();
            self.record(
                Op::Create {
                    dir,
                    name,
                    ino,
                    fresh: Fresh::File(Vec::new()),
                    mtime,
                },
                desc,
            );
            return Ok(ino);
        };
        if matches!(self.live.nodes.get(&ino), Some(Node::Symlink(_))) {
            ino = self.live.lookup(path, true).map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    err(
                        io::ErrorKind::Unsupported,
                        "sim: create through a dangling symlink",
                        path,
                    )
                } else {
                    e
                }
            })?;
        }
        match self.live.nodes.get(&ino) {
            Some(Node::File(f)) => {
                if f.readonly && self.opts.enforce_readonly {
                    return Err(err(
                        io::ErrorKind::PermissionDenied,
                        "permission denied (read-only file)",
                        path,
                    ));
                }
            }
            Some(Node::Dir(_)) => {
                return Err(err(io::ErrorKind::IsADirectory, "is a folder", path))
            }
            _ => return Err(err(io::ErrorKind::NotFound, "no such file", path)),
        }
        if truncate {
            let mtime = self.tick();
            self.record(Op::SetLen { ino, len: 0, mtime }, desc);
        }
        Ok(ino)
    }

    fn write_at(&mut self, ino: Ino, append: bool, pos: u64, buf: &[u8], desc: &str) -> u64 {
        let offset = if append {
            match self.live.nodes.get(&ino) {
                Some(Node::File(f)) => f.data.len() as u64,
                _ => 0,
            }
        } else {
            pos
        };
        let mtime = self.tick();
        self.record(
            Op::Write {
                ino,
                offset,
                bytes: buf.to_vec(),
                mtime,
            },
            desc,
        );
        offset + buf.len() as u64
    }

    fn create_dir(&mut self, path: &Path, desc: &str) -> io::Result<()> {
        let (dir, name) = self.live.parent(path)?;
        if self.live.entry(dir, &name).is_some() {
            return Err(err(io::ErrorKind::AlreadyExists, "already exists", path));
        }
        let ino = self.alloc();
        let mtime = self.tick();
        self.record(
            Op::Create {
                dir,
                name,
                ino,
                fresh: Fresh::Dir,
                mtime,
            },
            desc,
        );
        Ok(())
    }

    fn new_name(&mut self, path: &Path) -> io::Result<(Ino, String)> {
        let (dir, name) = self.live.parent(path)?;
        if self.live.entry(dir, &name).is_some() {
            return Err(err(io::ErrorKind::AlreadyExists, "already exists", path));
        }
        Ok((dir, name))
    }

    fn existing(&self, path: &Path) -> io::Result<(Ino, String, Ino)> {
        let (dir, name) = self.live.parent(path)?;
        let ino = self
            .live
            .entry(dir, &name)
            .ok_or_else(|| err(io::ErrorKind::NotFound, "no such file or folder", path))?;
        Ok((dir, name, ino))
    }

    fn rename(&mut self, from: &Path, to: &Path, desc: &str) -> io::Result<()> {
        let (from_dir, from_name, ino) = self.existing(from)?;
        let (to_dir, to_name) = self.live.parent(to)?;
        let kind = self.live.meta(ino).kind;
        let old = self.live.entry(to_dir, &to_name);
        if old == Some(ino) {
            return Ok(()); // both names are one inode: POSIX says do nothing
        }
        if kind == Kind::Dir {
            if self.live.in_subtree(ino, to_dir) {
                return Err(err(
                    io::ErrorKind::InvalidInput,
                    "cannot move a folder inside itself",
                    to,
                ));
            }
            if let Some(old) = old {
                match self.live.nodes.get(&old) {
                    Some(Node::Dir(e)) if e.is_empty() => {}
                    Some(Node::Dir(_)) => {
                        return Err(err(
                            io::ErrorKind::DirectoryNotEmpty,
                            "folder not empty",
                            to,
                        ))
                    }
                    _ => return Err(err(io::ErrorKind::NotADirectory, "not a folder", to)),
                }
            }
        } else if old.is_some_and(|o| matches!(self.live.nodes.get(&o), Some(Node::Dir(_)))) {
            return Err(err(io::ErrorKind::IsADirectory, "is a folder", to));
        }
        self.record(
            Op::Rename {
                from_dir,
                from_name,
                to_dir,
                to_name,
                ino,
                kind,
            },
            desc,
        );
        Ok(())
    }

    fn write_file(&mut self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        if let Some(parent) = path.parent() {
            self.create_dirs(parent)?;
        }
        let desc = format!("setup write_file {}", path.display());
        let ino = self.open_write(path, true, &desc)?;
        self.write_at(ino, false, 0, bytes, &desc);
        Ok(())
    }

    fn create_dirs(&mut self, path: &Path) -> io::Result<()> {
        let (_, comps) = components(path, true)?;
        let mut cur = PathBuf::from("/");
        for c in comps {
            match c {
                Comp::Up => {
                    cur.pop();
                }
                Comp::Name(n) => cur.push(n),
            }
            match self.live.lookup(&cur, true) {
                Ok(ino) if self.live.dir(ino).is_some() => {}
                Ok(_) => return Err(err(io::ErrorKind::NotADirectory, "not a folder", &cur)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let desc = format!("setup mkdir {}", cur.display());
                    self.create_dir(&cur, &desc)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The public face.
// ---------------------------------------------------------------------------

/// An in-memory [`Fs`] with crash injection and power-loss simulation. Cloning it
/// gives another handle on the same filesystem.
#[derive(Clone)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
}

impl Default for SimFs {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for SimFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state();
        f.debug_struct("SimFs")
            .field("ops", &st.ops)
            .field("crashed", &st.crashed)
            .field("pending", &st.pending_count())
            .finish()
    }
}

impl SimFs {
    /// An empty filesystem holding only `/`. Reflinks are off, read-only is enforced.
    pub fn new() -> Self {
        SimFs {
            state: Arc::new(Mutex::new(State::new())),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("sim fs mutex poisoned")
    }

    /// Run a counted mutation, logging it.
    fn mutate<T>(
        &self,
        desc: String,
        f: impl FnOnce(&mut State, &str) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut st = self.state();
        st.begin(&desc)?;
        let r = f(&mut st, &desc);
        let line = match &r {
            Ok(_) => format!("#{} {desc}", st.ops),
            Err(e) => format!("#{} {desc} -> error: {e}", st.ops),
        };
        st.history.push(line);
        r
    }

    /// Let `reflink` succeed (copying the contents into a new inode) or fail with
    /// `Unsupported` (the default).
    pub fn set_reflink(&self, enabled: bool) {
        self.state().opts.reflink = enabled;
    }

    /// Refuse (the default) or allow writes to read-only files.
    pub fn set_enforce_readonly(&self, enforce: bool) {
        self.state().opts.enforce_readonly = enforce;
    }

    /// Let `n` more mutating operations run; the next one, and every call after
    /// it, fails with the crash marker.
    pub fn crash_after(&self, n: u64) {
        let mut st = self.state();
        st.crash_at = Some(st.ops + n);
    }

    /// Has the armed crash happened?
    pub fn is_crashed(&self) -> bool {
        self.state().crashed
    }

    /// How many mutating operations ran (since `new` or `reboot`).
    pub fn ops(&self) -> u64 {
        self.state().ops
    }

    /// How many operations are not durable yet (the bits of
    /// [`Crash::PowerLossSubset`]).
    pub fn pending_count(&self) -> usize {
        self.state().pending_count()
    }

    /// The pending operations, in the order the subset bits number them.
    pub fn pending(&self) -> Vec<String> {
        self.state()
            .log
            .iter()
            .filter(|p| !p.durable)
            .map(|p| p.desc.clone())
            .collect()
    }

    /// Every mutating call so far, numbered, with its error if it failed.
    pub fn op_log(&self) -> Vec<String> {
        self.state().history.clone()
    }

    /// The live tree.
    pub fn snapshot(&self) -> Snapshot {
        self.state().live.snapshot()
    }

    /// The tree a pessimistic power loss would leave now.
    pub fn durable_snapshot(&self) -> Snapshot {
        self.state().image_keeping(|_| false).snapshot()
    }

    /// The filesystem after `mode`, uncrashed, with a fresh counter; the operation
    /// log carries over, with a line marking the reboot.
    pub fn reboot(&self, mode: Crash) -> SimFs {
        let st = self.state();
        let (live, base, log) = match mode {
            Crash::Process => (st.live.clone(), st.base.clone(), st.log.clone()),
            other => {
                let img = match other {
                    Crash::PowerLossOptimistic => st.image_keeping(|_| true),
                    Crash::PowerLossSubset(mask) => {
                        st.image_keeping(|i| i < 64 && mask & (1u64 << i) != 0)
                    }
                    Crash::PowerLossRandom(seed) => {
                        st.image_keeping(|i| splitmix64(seed ^ splitmix64(i as u64)) & 1 == 1)
                    }
                    _ => st.image_keeping(|_| false),
                };
                (img.clone(), img, Vec::new())
            }
        };
        let mut history = st.history.clone();
        history.push(format!("--- reboot after {mode:?} ---"));
        SimFs {
            state: Arc::new(Mutex::new(State {
                live,
                base,
                log,
                next_ino: st.next_ino,
                clock: st.clock,
                ops: 0,
                crash_at: None,
                crashed: false,
                opts: st.opts,
                history,
            })),
        }
    }

    /// Setup: write `path` (creating its folders) and make the whole filesystem
    /// durable, like `sync_fs`. Not counted, ignores an armed crash.
    pub fn write_file(&self, path: impl AsRef<Path>, bytes: &[u8]) -> io::Result<()> {
        let mut st = self.state();
        let r = st.write_file(path.as_ref(), bytes);
        st.mark(|_| true);
        r
    }

    /// Setup: create `path` and its missing parents, durably. Not counted.
    pub fn create_dirs(&self, path: impl AsRef<Path>) -> io::Result<()> {
        let mut st = self.state();
        let r = st.create_dirs(path.as_ref());
        st.mark(|_| true);
        r
    }

    /// Setup: make everything done so far durable, like `sync_fs`. Not counted.
    pub fn make_durable(&self) {
        self.state().mark(|_| true);
    }
}

struct SimReader {
    data: io::Cursor<Vec<u8>>,
    state: Arc<Mutex<State>>,
}

impl Read for SimReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.state.lock().expect("sim fs mutex poisoned").check()?;
        self.data.read(buf)
    }
}

struct SimFile {
    state: Arc<Mutex<State>>,
    ino: Ino,
    append: bool,
    pos: u64,
    path: PathBuf,
}

impl Write for SimFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut st = self.state.lock().expect("sim fs mutex poisoned");
        let desc = format!("write {} ({} bytes)", self.path.display(), buf.len());
        st.begin(&desc)?;
        self.pos = st.write_at(self.ino, self.append, self.pos, buf, &desc);
        let line = format!("#{} {desc}", st.ops);
        st.history.push(line);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.state.lock().expect("sim fs mutex poisoned").check()
    }
}

impl FileWrite for SimFile {
    fn sync(&mut self) -> io::Result<()> {
        let mut st = self.state.lock().expect("sim fs mutex poisoned");
        let desc = format!("fdatasync {}", self.path.display());
        st.begin(&desc)?;
        let ino = self.ino;
        st.mark(|op| op.is_content_of(ino));
        let line = format!("#{} {desc}", st.ops);
        st.history.push(line);
        Ok(())
    }
}

struct SimLock;
impl LockGuard for SimLock {}

impl Fs for SimFs {
    fn symlink_metadata(&self, path: &Path) -> io::Result<Meta> {
        let st = self.state();
        st.check()?;
        let ino = st.live.lookup(path, false)?;
        Ok(st.live.meta(ino))
    }

    fn metadata(&self, path: &Path) -> io::Result<Meta> {
        let st = self.state();
        st.check()?;
        let ino = st.live.lookup(path, true)?;
        Ok(st.live.meta(ino))
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        let st = self.state();
        st.check()?;
        let ino = st.live.lookup(path, true)?;
        let entries = st
            .live
            .dir(ino)
            .ok_or_else(|| err(io::ErrorKind::NotADirectory, "not a folder", path))?;
        Ok(entries
            .iter()
            .map(|(name, i)| DirEntry {
                name: name.clone(),
                kind: st.live.nodes.get(i).map_or(Kind::Other, Node::kind),
            })
            .collect())
    }

    fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
        let st = self.state();
        st.check()?;
        let ino = st.live.lookup(path, false)?;
        match st.live.nodes.get(&ino) {
            Some(Node::Symlink(t)) => Ok(t.clone()),
            _ => Err(err(io::ErrorKind::InvalidInput, "not a symlink", path)),
        }
    }

    fn open_read(&self, path: &Path) -> io::Result<Box<dyn Read + Send>> {
        let st = self.state();
        st.check()?;
        let ino = st.live.lookup(path, true)?;
        match st.live.nodes.get(&ino) {
            Some(Node::File(f)) => Ok(Box::new(SimReader {
                data: io::Cursor::new(f.data.clone()),
                state: Arc::clone(&self.state),
            })),
            _ => Err(err(io::ErrorKind::IsADirectory, "is a folder", path)),
        }
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn FileWrite>> {
        let ino = self.mutate(format!("create {}", path.display()), |st, d| {
            st.open_write(path, true, d)
        })?;
        Ok(Box::new(SimFile {
            state: Arc::clone(&self.state),
            ino,
            append: false,
            pos: 0,
            path: path.to_path_buf(),
        }))
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn FileWrite>> {
        let ino = self.mutate(format!("open_append {}", path.display()), |st, d| {
            st.open_write(path, false, d)
        })?;
        Ok(Box::new(SimFile {
            state: Arc::clone(&self.state),
            ino,
            append: true,
            pos: 0,
            path: path.to_path_buf(),
        }))
    }

    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        self.mutate(format!("truncate {} to {len}", path.display()), |st, d| {
            let ino = st.live.lookup(path, true)?;
            match st.live.nodes.get(&ino) {
                Some(Node::File(f)) if f.readonly && st.opts.enforce_readonly => {
                    return Err(err(
                        io::ErrorKind::PermissionDenied,
                        "permission denied (read-only file)",
                        path,
                    ))
                }
                Some(Node::File(_)) => {}
                _ => return Err(err(io::ErrorKind::IsADirectory, "is a folder", path)),
            }
            if len > MAX_FILE_LEN {
                return Err(err(
                    io::ErrorKind::FileTooLarge,
                    "sim: files are held in memory, at most 1 GiB",
                    path,
                ));
            }
            let mtime = st.tick();
            st.record(Op::SetLen { ino, len, mtime }, d);
            st.mark(|op| op.is_content_of(ino) || op.is_chmod_of(ino));
            Ok(())
        })
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.mutate(format!("fsync folder {}", path.display()), |st, _| {
            let dir = st.live.lookup(path, true)?;
            let named: BTreeSet<Ino> = st
                .live
                .dir(dir)
                .ok_or_else(|| err(io::ErrorKind::NotADirectory, "not a folder", path))?
                .values()
                .copied()
                .collect();
            st.mark(|op| {
                op.touches_dir(dir) || matches!(op, Op::Chmod { ino, .. } if named.contains(ino))
            });
            Ok(())
        })
    }

    fn sync_fs(&self, path: &Path) -> io::Result<()> {
        self.mutate(format!("syncfs {}", path.display()), |st, _| {
            st.live.lookup(path, true)?;
            st.mark(|_| true);
            Ok(())
        })
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.mutate(
            format!("rename {} -> {}", from.display(), to.display()),
            |st, d| st.rename(from, to, d),
        )
    }

    fn hard_link(&self, original: &Path, link: &Path) -> io::Result<()> {
        self.mutate(
            format!("link {} -> {}", link.display(), original.display()),
            |st, d| {
                let (_, _, ino) = st.existing(original)?;
                if st.live.dir(ino).is_some() {
                    return Err(err(
                        io::ErrorKind::PermissionDenied,
                        "cannot hard-link a folder",
                        original,
                    ));
                }
                let (dir, name) = st.new_name(link)?;
                st.record(Op::Link { dir, name, ino }, d);
                Ok(())
            },
        )
    }

    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        self.mutate(
            format!("symlink {} -> {}", link.display(), target.display()),
            |st, d| {
                let (dir, name) = st.new_name(link)?;
                let ino = st.alloc();
                let mtime = st.tick();
                st.record(
                    Op::Create {
                        dir,
                        name,
                        ino,
                        fresh: Fresh::Symlink(target.to_path_buf()),
                        mtime,
                    },
                    d,
                );
                Ok(())
            },
        )
    }

    fn reflink(&self, src: &Path, dst: &Path) -> io::Result<()> {
        self.mutate(
            format!("reflink {} -> {}", src.display(), dst.display()),
            |st, d| {
                if !st.opts.reflink {
                    return Err(err(
                        io::ErrorKind::Unsupported,
                        "sim: reflink disabled (SimFs::set_reflink)",
                        dst,
                    ));
                }
                let ino = st.live.lookup(src, true)?;
                let data = match st.live.nodes.get(&ino) {
                    Some(Node::File(f)) => f.data.clone(),
                    _ => return Err(err(io::ErrorKind::IsADirectory, "is a folder", src)),
                };
                let (dir, name) = st.new_name(dst)?;
                let ino = st.alloc();
                let mtime = st.tick();
                st.record(
                    Op::Create {
                        dir,
                        name,
                        ino,
                        fresh: Fresh::File(data),
                        mtime,
                    },
                    d,
                );
                Ok(())
            },
        )
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.mutate(format!("unlink {}", path.display()), |st, d| {
            let (dir, name, ino) = st.existing(path)?;
            if st.live.dir(ino).is_some() {
                return Err(err(io::ErrorKind::IsADirectory, "is a folder", path));
            }
            st.record(Op::Unlink { dir, name, ino }, d);
            Ok(())
        })
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.mutate(format!("mkdir {}", path.display()), |st, d| {
            st.create_dir(path, d)
        })
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.mutate(format!("rmdir {}", path.display()), |st, d| {
            let (dir, name, ino) = st.existing(path)?;
            match st.live.dir(ino) {
                None => return Err(err(io::ErrorKind::NotADirectory, "not a folder", path)),
                Some(e) if !e.is_empty() => {
                    return Err(err(
                        io::ErrorKind::DirectoryNotEmpty,
                        "folder not empty",
                        path,
                    ))
                }
                Some(_) => {}
            }
            st.record(Op::Unlink { dir, name, ino }, d);
            Ok(())
        })
    }

    fn set_readonly(&self, path: &Path, readonly: bool) -> io::Result<()> {
        let mode = if readonly { "0444" } else { "0644" };
        self.mutate(format!("chmod {mode} {}", path.display()), |st, d| {
            let ino = st.live.lookup(path, true)?;
            if matches!(st.live.nodes.get(&ino), Some(Node::File(_))) {
                st.record(Op::Chmod { ino, readonly }, d);
            }
            Ok(())
        })
    }

    fn lock(&self, path: &Path, _wait: bool) -> io::Result<Option<Box<dyn LockGuard>>> {
        self.mutate(format!("lock {}", path.display()), |st, d| {
            let (dir, name) = st.live.parent(path)?;
            match st.live.entry(dir, &name) {
                None => {
                    st.open_write(path, false, d)?;
                }
                Some(ino) if st.live.dir(ino).is_some() => {
                    return Err(err(io::ErrorKind::IsADirectory, "is a folder", path))
                }
                Some(_) => {}
            }
            Ok(Some(Box::new(SimLock) as Box<dyn LockGuard>))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::is_crash_io;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    /// Create (or truncate) `path`, write `bytes`, fdatasync if asked.
    fn put(fs: &SimFs, path: &str, bytes: &[u8], sync: bool) -> io::Result<()> {
        let mut f = fs.create(&p(path))?;
        f.write_all(bytes)?;
        if sync {
            f.sync()?;
        }
        Ok(())
    }

    fn file(bytes: &[u8]) -> SnapEntry {
        SnapEntry::File {
            bytes: bytes.to_vec(),
            readonly: false,
        }
    }

    fn at(fs: &SimFs, path: &str) -> Option<SnapEntry> {
        fs.snapshot().get(&p(path)).cloned()
    }

    #[test]
    fn rename_is_atomic_after_pessimistic_loss() {
        let fs = SimFs::new();
        fs.write_file("/sim/a", b"old").unwrap();
        put(&fs, "/sim/tmp", b"new", true).unwrap();
        fs.rename(&p("/sim/tmp"), &p("/sim/a")).unwrap();
        assert_eq!(at(&fs, "/sim/a"), Some(file(b"new")));

        let lost = fs.reboot(Crash::PowerLossPessimistic);
        assert_eq!(at(&lost, "/sim/a"), Some(file(b"old")));
        assert_eq!(at(&lost, "/sim/tmp"), None);

        // Whatever subset survives, `a` is entirely old or entirely new.
        let k = fs.pending_count();
        assert_eq!(k, 2, "{:?}", fs.pending());
        for mask in 0..1u64 << k {
            let got = at(&fs.reboot(Crash::PowerLossSubset(mask)), "/sim/a");
            assert!(
                got == Some(file(b"old")) || got == Some(file(b"new")),
                "mask {mask}: {got:?}"
            );
        }

        fs.sync_dir(&p("/sim")).unwrap();
        assert_eq!(fs.pending_count(), 0);
        let lost = fs.reboot(Crash::PowerLossPessimistic);
        assert_eq!(at(&lost, "/sim/a"), Some(file(b"new")));
        assert_eq!(at(&lost, "/sim/tmp"), None);
    }

    #[test]
    fn synced_file_without_dir_sync_disappears() {
        let fs = SimFs::new();
        fs.create_dirs("/sim").unwrap();
        put(&fs, "/sim/x", b"data", true).unwrap();
        let lost = fs.reboot(Crash::PowerLossPessimistic);
        assert_eq!(at(&lost, "/sim/x"), None);
        assert_eq!(at(&lost, "/sim"), Some(SnapEntry::Dir));
        // A process crash keeps it.
        assert_eq!(
            at(&fs.reboot(Crash::Process), "/sim/x"),
            Some(file(b"data"))
        );
    }

    #[test]
    fn sync_dir_makes_the_name_durable_not_the_contents() {
        let fs = SimFs::new();
        fs.create_dirs("/sim").unwrap();
        put(&fs, "/sim/x", b"data", false).unwrap();
        fs.sync_dir(&p("/sim")).unwrap();
        let lost = fs.reboot(Crash::PowerLossPessimistic);
        assert_eq!(at(&lost, "/sim/x"), Some(file(b"")));

        // Contents synced too: all there.
        let mut f = fs.open_append(&p("/sim/x")).unwrap();
        f.sync().unwrap();
        let lost = fs.reboot(Crash::PowerLossPessimistic);
        assert_eq!(at(&lost, "/sim/x"), Some(file(b"data")));
    }

    #[test]
    fn a_folder_not_synced_into_its_parent_loses_its_contents() {
        let fs = SimFs::new();
        fs.create_dirs("/sim").unwrap();
        fs.create_dir(&p("/sim/d")).unwrap();
        put(&fs, "/sim/d/x", b"data", true).unwrap();
        fs.sync_dir(&p("/sim/d")).unwrap();
        let lost = fs.reboot(Crash::PowerLossPessimistic);
        assert_eq!(at(&lost, "/sim/d"), None);
        fs.sync_dir(&p("/sim")).unwrap();
        let lost = fs.reboot(Crash::PowerLossPessimistic);
        assert_eq!(at(&lost, "/sim/d/x"), Some(file(b"data")));
    }

    #[test]
    fn fdatasync_without_dir_sync_keeps_appends_to_a_durable_file() {
        let fs = SimFs::new();
        fs.write_file("/sim/log", b"head").unwrap();
        let mut f = fs.open_append(&p("/sim/log")).unwrap();
        f.write_all(b"+one").unwrap();
        f.sync().unwrap();
        f.write_all(b"+two").unwrap();
        assert_eq!(fs.read(&p("/sim/log")).unwrap(), b"head+one+two");
        let lost = fs.reboot(Crash::PowerLossPessimistic);
        assert_eq!(lost.read(&p("/sim/log")).unwrap(), b"head+one");
        let kept = fs.reboot(Crash::PowerLossOptimistic);
        assert_eq!(kept.read(&p("/sim/log")).unwrap(), b"head+one+two");
    }

    #[test]
    fn truncate_is_durable_on_return() {
        let fs = SimFs::new();
        fs.write_file("/sim/j", b"0123456789").unwrap();
        fs.truncate(&p("/sim/j"), 4).unwrap();
        assert_eq!(fs.pending_count(), 0);
        let lost = fs.reboot(Crash::PowerLossPessimistic);
        assert_eq!(lost.read(&p("/sim/j")).unwrap(), b"0123");
    }

    #[test]
    fn hard_links_share_contents() {
        let fs = SimFs::new();
        fs.write_file("/sim/a", b"one").unwrap();
        fs.hard_link(&p("/sim/a"), &p("/sim/b")).unwrap();
        let (ma, mb) = (
            fs.metadata(&p("/sim/a")).unwrap(),
            fs.metadata(&p("/sim/b")).unwrap(),
        );
        assert_eq!(ma.ino, mb.ino);
        let mut f = fs.open_append(&p("/sim/b")).unwrap();
        f.write_all(b"+two").unwrap();
        assert_eq!(fs.read(&p("/sim/a")).unwrap(), b"one+two");
        fs.remove_file(&p("/sim/a")).unwrap();
        assert_eq!(fs.read(&p("/sim/b")).unwrap(), b"one+two");
        // The open handle still writes into the inode.
        f.write_all(b"+3").unwrap();
        assert_eq!(fs.read(&p("/sim/b")).unwrap(), b"one+two+3");
        assert_eq!(
            fs.hard_link(&p("/sim/b"), &p("/sim/b")).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
    }

    #[test]
    fn symlinks_follow_relative_targets() {
        let fs = SimFs::new();
        fs.write_file("/sim/data/_shared/tbl_a.parquet", b"PAR1")
            .unwrap();
        fs.create_dirs("/sim/data/p1").unwrap();
        let link = p("/sim/data/p1/a.parquet");
        fs.symlink(&p("../_shared/tbl_a.parquet"), &link).unwrap();
        assert_eq!(fs.read(&link).unwrap(), b"PAR1");
        assert_eq!(fs.metadata(&link).unwrap().kind, Kind::File);
        assert_eq!(fs.symlink_metadata(&link).unwrap().kind, Kind::Symlink);
        assert_eq!(fs.read_link(&link).unwrap(), p("../_shared/tbl_a.parquet"));
        let listing = fs.read_dir(&p("/sim/data")).unwrap();
        let names: Vec<_> = listing.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["_shared", "p1"]);

        // `..` after a symlinked folder is physical, as in the kernel.
        fs.symlink(&p("data/_shared"), &p("/sim/sh")).unwrap();
        fs.write_file("/sim/data/marker", b"m").unwrap();
        assert_eq!(fs.read(&p("/sim/sh/../marker")).unwrap(), b"m");

        // A dangling symlink exists but cannot be followed.
        fs.remove_file(&p("/sim/data/_shared/tbl_a.parquet"))
            .unwrap();
        assert_eq!(
            fs.metadata(&link).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert!(fs.exists(&link).unwrap());

        // Loops are reported, not followed forever.
        fs.symlink(&p("loop"), &p("/sim/loop")).unwrap();
        assert!(fs.metadata(&p("/sim/loop")).is_err());
    }

    /// A small workload touching every kind of mutation; returns its first error.
    fn workload(fs: &SimFs) -> io::Result<()> {
        fs.create_dir_all(&p("/sim/d/e"))?;
        put(fs, "/sim/d/tmp", b"hello", true)?;
        fs.set_readonly(&p("/sim/d/tmp"), true)?;
        fs.rename(&p("/sim/d/tmp"), &p("/sim/d/e/final"))?;
        fs.hard_link(&p("/sim/d/e/final"), &p("/sim/d/hl"))?;
        fs.symlink(&p("e/final"), &p("/sim/d/sl"))?;
        fs.sync_dir(&p("/sim/d/e"))?;
        let mut f = fs.open_append(&p("/sim/log"))?;
        f.write_all(b"a")?;
        f.sync()?;
        f.write_all(b"b")?;
        drop(f);
        fs.create_dir(&p("/sim/gone"))?;
        fs.remove_dir(&p("/sim/gone"))?;
        fs.remove_file(&p("/sim/d/hl"))?;
        fs.rename(&p("/sim/d"), &p("/sim/moved"))?;
        fs.sync_dir(&p("/sim"))?;
        put(fs, "/sim/moved/late", b"late", false)?;
        Ok(())
    }

    #[test]
    fn crash_after_fails_every_later_call() {
        let fs = SimFs::new();
        fs.create_dirs("/sim").unwrap();
        workload(&fs).unwrap();
        let n = fs.ops();
        assert!(n > 15, "{n}");
        for k in 0..=n {
            let fs = SimFs::new();
            fs.create_dirs("/sim").unwrap();
            fs.crash_after(k);
            let r = workload(&fs);
            if k == n {
                assert!(r.is_ok() && !fs.is_crashed());
                continue;
            }
            let e = r.unwrap_err();
            assert!(is_crash_io(&e), "k={k}: {e}");
            assert!(fs.is_crashed());
            assert_eq!(fs.ops(), k);
            // Reads fail too, and nothing changes any more.
            let before = fs.snapshot();
            let e = fs.read_dir(&p("/")).unwrap_err();
            assert!(is_crash_io(&e));
            assert!(is_crash_io(&fs.create_dir(&p("/x")).unwrap_err()));
            assert_eq!(fs.snapshot(), before);
            assert_eq!(fs.ops(), k);
            // Every reboot is usable again.
            let up = fs.reboot(Crash::PowerLossPessimistic);
            assert!(up.read_dir(&p("/sim")).is_ok());
            assert_eq!(up.ops(), 0);
        }
    }

    #[test]
    fn open_handles_fail_after_the_crash() {
        let fs = SimFs::new();
        fs.write_file("/sim/f", b"abc").unwrap();
        let mut r = fs.open_read(&p("/sim/f")).unwrap();
        let mut w = fs.open_append(&p("/sim/f")).unwrap();
        fs.crash_after(0);
        assert!(is_crash_io(&w.write(b"x").unwrap_err()));
        assert!(is_crash_io(&w.sync().unwrap_err()));
        let mut buf = [0u8; 3];
        assert!(is_crash_io(&r.read(&mut buf).unwrap_err()));
    }

    #[test]
    fn optimistic_replay_equals_the_live_image() {
        let fs = SimFs::new();
        fs.create_dirs("/sim").unwrap();
        workload(&fs).unwrap();
        let live = fs.snapshot();
        assert_eq!(fs.reboot(Crash::PowerLossOptimistic).snapshot(), live);
        assert_eq!(fs.reboot(Crash::Process).snapshot(), live);
        let all = (1u64 << fs.pending_count()) - 1;
        assert_eq!(fs.reboot(Crash::PowerLossSubset(all)).snapshot(), live);
        assert_eq!(
            live.get(&p("/sim/moved/e/final")),
            Some(&SnapEntry::File {
                bytes: b"hello".to_vec(),
                readonly: true
            })
        );
        assert_eq!(
            live.get(&p("/sim/moved/sl")),
            Some(&SnapEntry::Symlink {
                target: p("e/final")
            })
        );
        assert_eq!(live.get(&p("/sim/log")), Some(&file(b"ab")));
    }

    #[test]
    fn subsets_enumerate_at_most_two_to_the_k_images() {
        let fs = SimFs::new();
        fs.create_dirs("/sim").unwrap();
        workload(&fs).unwrap();
        let k = fs.pending_count();
        assert!((1..=12).contains(&k), "{k}: {:?}", fs.pending());
        let mut images = BTreeSet::new();
        for mask in 0..1u64 << k {
            let up = fs.reboot(Crash::PowerLossSubset(mask));
            assert_eq!(up.pending_count(), 0);
            // Every rebuilt tree is consistent enough to walk and list.
            up.remove_tree(&p("/sim")).unwrap();
            images.insert(format!(
                "{:?}",
                fs.reboot(Crash::PowerLossSubset(mask)).snapshot()
            ));
        }
        assert!(images.len() <= 1 << k);
        assert!(images.len() > 1);
        assert!(images.contains(&format!("{:?}", fs.durable_snapshot())));
        assert!(images.contains(&format!("{:?}", fs.snapshot())));
        // Seeded random subsets are reproducible.
        assert_eq!(
            fs.reboot(Crash::PowerLossRandom(7)).snapshot(),
            fs.reboot(Crash::PowerLossRandom(7)).snapshot()
        );
    }

    #[test]
    fn durable_rename_of_a_temp_in_an_unsynced_folder_survives() {
        // The engine's atomic-replace idiom: temp in .stack/tmp (whose own mkdir
        // is never synced), fsync, rename into place, fsync the destination.
        let fs = SimFs::new();
        fs.write_file("/sim/state.json", b"v1").unwrap();
        fs.create_dir_all(&p("/sim/.stack/tmp")).unwrap();
        put(&fs, "/sim/.stack/tmp/state.tmp", b"v2", true).unwrap();
        fs.rename(&p("/sim/.stack/tmp/state.tmp"), &p("/sim/state.json"))
            .unwrap();
        fs.sync_dir(&p("/sim")).unwrap();
        let lost = fs.reboot(Crash::PowerLossPessimistic);
        assert_eq!(lost.read(&p("/sim/state.json")).unwrap(), b"v2");
    }

    #[test]
    fn process_crash_keeps_pending_work_pending() {
        let fs = SimFs::new();
        fs.create_dirs("/sim").unwrap();
        put(&fs, "/sim/x", b"x", false).unwrap();
        let after_kill = fs.reboot(Crash::Process);
        assert_eq!(after_kill.read(&p("/sim/x")).unwrap(), b"x");
        assert_eq!(after_kill.pending_count(), fs.pending_count());
        let lost = after_kill.reboot(Crash::PowerLossPessimistic);
        assert_eq!(at(&lost, "/sim/x"), None);
    }

    #[test]
    fn posix_errors_and_rules() {
        let fs = SimFs::new();
        fs.write_file("/sim/d/f", b"f").unwrap();
        fs.create_dirs("/sim/e").unwrap();
        let kind = |r: io::Result<()>| r.unwrap_err().kind();
        assert_eq!(
            kind(fs.remove_dir(&p("/sim/d"))),
            io::ErrorKind::DirectoryNotEmpty
        );
        assert_eq!(
            kind(fs.create_dir(&p("/sim/d"))),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(
            kind(fs.create_dir(&p("/sim/no/x"))),
            io::ErrorKind::NotFound
        );
        assert_eq!(
            kind(fs.remove_file(&p("/sim/d"))),
            io::ErrorKind::IsADirectory
        );
        assert_eq!(
            kind(fs.remove_dir(&p("/sim/d/f"))),
            io::ErrorKind::NotADirectory
        );
        assert_eq!(
            kind(fs.remove_file(&p("/sim/nope"))),
            io::ErrorKind::NotFound
        );
        assert_eq!(
            kind(fs.rename(&p("/sim/e"), &p("/sim/d"))),
            io::ErrorKind::DirectoryNotEmpty
        );
        assert_eq!(
            kind(fs.rename(&p("/sim/d"), &p("/sim/d/f/x"))),
            io::ErrorKind::NotADirectory
        );
        assert_eq!(
            kind(fs.rename(&p("/sim/d"), &p("/sim/d/sub"))),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            kind(fs.create_dir(&p("relative"))),
            io::ErrorKind::InvalidInput
        );
        // A folder moves over an empty folder, with its contents.
        fs.rename(&p("/sim/d"), &p("/sim/e")).unwrap();
        assert_eq!(fs.read(&p("/sim/e/f")).unwrap(), b"f");
        assert!(!fs.exists(&p("/sim/d")).unwrap());

        // Read-only files refuse writers unless enforcement is off.
        fs.set_readonly(&p("/sim/e/f"), true).unwrap();
        assert!(fs.metadata(&p("/sim/e/f")).unwrap().readonly);
        assert_eq!(
            fs.create(&p("/sim/e/f")).err().map(|e| e.kind()),
            Some(io::ErrorKind::PermissionDenied)
        );
        // ...but can be replaced by rename or removed.
        fs.write_file("/sim/g", b"g").unwrap();
        fs.rename(&p("/sim/g"), &p("/sim/e/f")).unwrap();
        assert!(!fs.metadata(&p("/sim/e/f")).unwrap().readonly);
        fs.set_readonly(&p("/sim/e/f"), true).unwrap();
        fs.set_enforce_readonly(false);
        put(&fs, "/sim/e/f", b"root", false).unwrap();
        assert_eq!(fs.read(&p("/sim/e/f")).unwrap(), b"root");

        // Reflink: unsupported by default, a copy into a new inode when enabled.
        assert_eq!(
            kind(fs.reflink(&p("/sim/e/f"), &p("/sim/r"))),
            io::ErrorKind::Unsupported
        );
        fs.set_reflink(true);
        fs.reflink(&p("/sim/e/f"), &p("/sim/r")).unwrap();
        assert_eq!(fs.read(&p("/sim/r")).unwrap(), b"root");
        assert_ne!(
            fs.metadata(&p("/sim/r")).unwrap().ino,
            fs.metadata(&p("/sim/e/f")).unwrap().ino
        );
        assert_eq!(
            kind(fs.reflink(&p("/sim/e/f"), &p("/sim/r"))),
            io::ErrorKind::AlreadyExists
        );

        // Locks always succeed and create their file.
        assert!(fs.lock(&p("/sim/lock"), false).unwrap().is_some());
        assert!(fs.lock(&p("/sim/lock"), false).unwrap().is_some());
        assert!(fs.exists(&p("/sim/lock")).unwrap());

        // mtime moves on every write.
        let m1 = fs.metadata(&p("/sim/r")).unwrap().mtime_ns;
        let mut f = fs.open_append(&p("/sim/r")).unwrap();
        f.write_all(b"!").unwrap();
        assert!(fs.metadata(&p("/sim/r")).unwrap().mtime_ns > m1);
        assert!(!fs.op_log().is_empty());
    }

    #[test]
    fn usable_from_several_threads() {
        let fs = SimFs::new();
        fs.create_dirs("/sim").unwrap();
        let shared: Arc<dyn Fs> = Arc::new(fs.clone());
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let fs = Arc::clone(&shared);
                std::thread::spawn(move || {
                    for j in 0..20 {
                        let path = PathBuf::from(format!("/sim/t{i}-{j}"));
                        let mut f = fs.create(&path).unwrap();
                        f.write_all(b"x").unwrap();
                        f.sync().unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(fs.read_dir(&p("/sim")).unwrap().len(), 80);
        assert_eq!(fs.ops(), 4 * 20 * 3);
    }
}
