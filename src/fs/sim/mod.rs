//! `SimFs`: an in-memory [`Fs`] with a separate durable image, for crash testing.
//!
//! Owns: a simulated filesystem tree (folders, regular files, symlinks, hard links),
//! the record of which of its mutations are durable, crash injection (fail every
//! operation from the n-th mutation on) and power-loss simulation (rebuild the tree
//! a machine would see after rebooting). It is the model of redb's
//! `tests/crash_consistency.rs` and of the ALICE / CrashMonkey studies.
//!
//! Split by concern: `image` is the inode table and path resolution, `log` the
//! operations, what of them is durable and the crash counter; this module is the
//! public face ([`SimFs`] and its [`Fs`] implementation) and its model, documented
//! below.
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
//! [`SimulatedCrash`](crate::error::SimulatedCrash), and from then on every call — reads, writes through open handles, reads of open readers —
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

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{DirEntry, FileWrite, Fs, Kind, LockGuard, Meta};

mod image;
mod log;
mod op;
#[cfg(test)]
mod tests;

use image::*;
use log::*;
use op::*;

pub use image::{SnapEntry, Snapshot};
pub use log::Crash;

// ---------------------------------------------------------------------------
// The public face.
// ---------------------------------------------------------------------------

/// An in-memory [`Fs`] with crash injection and power-loss simulation. Cloning it
/// gives another handle on the same filesystem.
#[derive(Clone)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
    /// Run before each counted mutation ([`SimFs::before_each_op`]).
    hook: Arc<Mutex<Option<OpHook>>>,
}

/// A test's code run before a mutation, given the operation's description.
type OpHook = Box<dyn FnMut(&str) + Send>;

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
            hook: Arc::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("sim fs mutex poisoned")
    }

    /// Run `hook` before every counted mutation from now on, with the
    /// operation's description (as in [`SimFs::op_log`]): a test makes
    /// something happen between two of the engine's operations, as a user or
    /// another process could (the setup methods, such as
    /// [`SimFs::write_file`], on a clone of this handle). Mutations the hook
    /// makes through [`Fs`] do not run it again.
    pub fn before_each_op(&self, hook: impl FnMut(&str) + Send + 'static) {
        *self.hook.lock().expect("sim fs hook poisoned") = Some(Box::new(hook));
    }

    /// Run a counted mutation, logging it.
    /// A file opened for writing by operation `op`: truncated (`create`) or
    /// appended to (`open_append`).
    fn writer(&self, op: &str, path: &Path, append: bool) -> io::Result<Box<dyn FileWrite>> {
        let ino = self.mutate(format!("{op} {}", path.display()), |st, d| {
            st.open_write(path, !append, d)
        })?;
        Ok(Box::new(SimFile {
            state: Arc::clone(&self.state),
            ino,
            append,
            pos: 0,
            path: path.to_path_buf(),
        }))
    }

    fn mutate<T>(
        &self,
        desc: String,
        f: impl FnOnce(&mut State, &str) -> io::Result<T>,
    ) -> io::Result<T> {
        // Taken out while it runs: the hook may mutate this filesystem.
        let hook = self.hook.lock().expect("sim fs hook poisoned").take();
        if let Some(mut hook) = hook {
            hook(&desc);
            self.hook
                .lock()
                .expect("sim fs hook poisoned")
                .get_or_insert(hook);
        }
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
            hook: Arc::default(),
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
        self.writer("create", path, false)
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn FileWrite>> {
        self.writer("open_append", path, true)
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

    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.mutate(
            format!("rename_noreplace {} -> {}", from.display(), to.display()),
            |st, d| {
                st.existing(from)?;
                st.new_name(to)?;
                st.rename(from, to, d)
            },
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
