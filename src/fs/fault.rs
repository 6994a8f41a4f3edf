//! Faults that persist: a wrapper over any [`Fs`] whose disk fills up, fails or
//! turns read-only, and stays so until the test clears the fault.
//!
//! Owns: [`FaultFs`] and the model of each [`Fault`]. The crash tests model a
//! process that stops; the faults users meet most often do not stop the process,
//! they persist, and every later operation meets them too. The persistent-fault
//! tests (`tests/persistent_faults.rs`) run a pull through this wrapper with the
//! fault armed at every operation (and a sweep of byte budgets) and check that
//! the directory is entirely the old stack or entirely the new one when the
//! command returns (a full disk) or once the fault clears (every fault).
//!
//! Invariant kept: the wrapper never changes what the inner filesystem does when
//! no fault applies to an operation (nor, unless told it [`Lacks`] a
//! capability, as some FUSE and network filesystems do); reads are never faulted (a failing or
//! read-only disk still reads, which is what lets `status` and `verify` work).
//!
//! The space model of [`Fault::NoSpace`] is pessimistic on purpose: the bytes of
//! files this wrapper wrote count against the budget, and come back when the last
//! name of such a file goes; space freed by removing a file that existed before
//! the wrapper saw it does not come back (the wrapper cannot know whether another
//! name still holds it). A reflink is counted as free (it shares extents).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{DirEntry, FileWrite, Fs, LockGuard, Meta};

/// A fault that, once it starts, stays until [`FaultFs::clear`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The disk is full: a write that would take the bytes of the files this
    /// wrapper wrote past `bytes` writes what fits and then fails with `ENOSPC`,
    /// as does every later write until space is freed.
    NoSpace { bytes: u64 },
    /// From mutating operation number `op` on (0-based), every operation that
    /// allocates (a write, create, mkdir, symlink, link, rename, reflink, lock)
    /// fails with `ENOSPC`: a disk whose metadata is full (or a quota). Removals,
    /// mode changes and syncs still work.
    NoSpaceMeta { op: u64 },
    /// A failing disk: mutating operation number `op` and every later one fail
    /// with `EIO` (writes, syncs, renames and removals alike).
    Io { op: u64 },
    /// A disk remounted read-only: from mutating operation number `op` on,
    /// every mutation fails with `EROFS`.
    ReadOnly { op: u64 },
    /// A folder that refuses writes (its permissions): every mutation of a path
    /// under `under` fails with `EACCES`; everything else works.
    Denied { under: &'static str },
}

/// What the filesystem under the wrapper cannot do, as some network and FUSE
/// filesystems cannot: a capability, not a fault (it never clears).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lacks {
    /// `renameat2(RENAME_NOREPLACE)`: the seam's fallback runs instead, its
    /// link and unlink through the wrapper.
    pub rename_noreplace: bool,
    /// Hard links: `link` fails with `EPERM`.
    pub hard_links: bool,
}

#[derive(Debug, Default)]
struct State {
    fault: Option<Fault>,
    lacks: Lacks,
    /// Mutating operations seen (a file handle's writes and syncs included).
    ops: u64,
    /// Operations refused by the fault.
    refused: u64,
    /// Bytes held by files this wrapper wrote.
    used: u64,
    /// Every byte ever written through the wrapper (the sweep's scale).
    written: u64,
    /// Files this wrapper wrote, by inode: (length, names).
    mine: HashMap<u64, (u64, u32)>,
}

/// What kind of mutation an operation is, for deciding whether a fault hits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Needs new space (a name, an inode or data).
    Allocates,
    /// Frees, or changes no space (remove, chmod, sync, truncate).
    Other,
}

impl State {
    /// Count one mutation of `paths` and say whether the fault refuses it, with
    /// which error.
    fn admit(&mut self, op: Op, paths: &[&Path]) -> io::Result<()> {
        let n = self.ops;
        self.ops += 1;
        let refuse = match self.fault {
            None | Some(Fault::NoSpace { .. }) => None,
            Some(Fault::Denied { under }) => paths
                .iter()
                .any(|p| p.starts_with(under))
                .then_some(libc::EACCES),
            Some(Fault::NoSpaceMeta { op: from }) => {
                (n >= from && op == Op::Allocates).then_some(libc::ENOSPC)
            }
            Some(Fault::Io { op: from }) => (n >= from).then_some(libc::EIO),
            Some(Fault::ReadOnly { op: from }) => (n >= from).then_some(libc::EROFS),
        };
        match refuse {
            Some(code) => {
                self.refused += 1;
                Err(io::Error::from_raw_os_error(code))
            }
            None => Ok(()),
        }
    }

    /// How many of `want` bytes may be written now (`Err`: none, the disk is full).
    fn room(&mut self, want: usize) -> io::Result<usize> {
        let Some(Fault::NoSpace { bytes }) = self.fault else {
            return Ok(want);
        };
        let left = bytes.saturating_sub(self.used);
        if want > 0 && left == 0 {
            self.refused += 1;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(want.min(usize::try_from(left).unwrap_or(usize::MAX)))
    }

    /// One name of inode `ino` is gone: free its bytes with its last name.
    fn unlink(&mut self, ino: u64) {
        if let Some((len, names)) = self.mine.get_mut(&ino) {
            *names = names.saturating_sub(1);
            if *names == 0 {
                self.used = self.used.saturating_sub(*len);
                self.mine.remove(&ino);
            }
        }
    }
}

/// An [`Fs`] that passes every call to `inner` unless the armed [`Fault`] refuses
/// it. Cloning gives another handle on the same fault state.
#[derive(Clone)]
pub struct FaultFs<F> {
    inner: F,
    st: Arc<Mutex<State>>,
}

impl<F: Fs> FaultFs<F> {
    /// `inner` with no fault armed.
    pub fn new(inner: F) -> Self {
        FaultFs {
            inner,
            st: Arc::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arm `fault` (operation numbers count from the wrapper's creation).
    pub fn arm(&self, fault: Fault) {
        self.state().fault = Some(fault);
    }

    /// The filesystem cannot do what `lacks` says, from now on.
    pub fn lacking(self, lacks: Lacks) -> Self {
        self.state().lacks = lacks;
        self
    }

    /// The fault is over: the disk has space again, is repaired, or writable.
    pub fn clear(&self) {
        self.state().fault = None;
    }

    /// Mutating operations seen so far.
    pub fn ops(&self) -> u64 {
        self.state().ops
    }

    /// Operations the fault refused so far (0: it never struck).
    pub fn refused(&self) -> u64 {
        self.state().refused
    }

    /// Bytes now held by files the wrapper wrote.
    pub fn used(&self) -> u64 {
        self.state().used
    }

    /// Bytes written through the wrapper so far.
    pub fn written(&self) -> u64 {
        self.state().written
    }

    /// The wrapped filesystem.
    pub fn inner(&self) -> &F {
        &self.inner
    }

    fn admit(&self, op: Op, paths: &[&Path]) -> io::Result<()> {
        self.state().admit(op, paths)
    }

    fn ino_of(&self, path: &Path) -> Option<u64> {
        self.inner
            .symlink_metadata(path)
            .ok()
            .filter(|m| m.kind == super::Kind::File)
            .map(|m| m.ino)
    }
}

/// A file being written through a [`FaultFs`].
struct FaultFile {
    inner: Box<dyn FileWrite>,
    path: PathBuf,
    ino: Option<u64>,
    st: Arc<Mutex<State>>,
}

impl Write for FaultFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut st = self.st.lock().unwrap_or_else(|p| p.into_inner());
        st.admit(Op::Allocates, &[&self.path])?;
        let n = st.room(buf.len())?;
        let wrote = self.inner.write(&buf[..n])?;
        st.used += wrote as u64;
        st.written += wrote as u64;
        if let Some((len, _)) = self.ino.and_then(|i| st.mine.get_mut(&i)) {
            *len += wrote as u64;
        }
        Ok(wrote)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl FileWrite for FaultFile {
    fn sync(&mut self) -> io::Result<()> {
        self.st
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(Op::Other, &[&self.path])?;
        self.inner.sync()
    }
}

impl<F: Fs> Fs for FaultFs<F> {
    fn symlink_metadata(&self, path: &Path) -> io::Result<Meta> {
        self.inner.symlink_metadata(path)
    }
    fn metadata(&self, path: &Path) -> io::Result<Meta> {
        self.inner.metadata(path)
    }
    fn symlink_metadata_in(&self, dir: &Path, names: &[&str]) -> Vec<io::Result<Meta>> {
        self.inner.symlink_metadata_in(dir, names)
    }
    fn metadata_in(&self, dir: &Path, names: &[&str]) -> Vec<io::Result<Meta>> {
        self.inner.metadata_in(dir, names)
    }
    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        self.inner.read_dir(path)
    }
    fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
        self.inner.read_link(path)
    }
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        self.inner.canonicalize(path)
    }
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn Read + Send>> {
        self.inner.open_read(path)
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.inner.read(path)
    }
    fn free_space(&self, path: &Path) -> io::Result<Option<u64>> {
        let st = self.state();
        match st.fault {
            Some(Fault::NoSpace { bytes }) => Ok(Some(bytes.saturating_sub(st.used))),
            _ => {
                drop(st);
                self.inner.free_space(path)
            }
        }
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn FileWrite>> {
        self.admit(Op::Allocates, &[path])?;
        let old = self.ino_of(path);
        let inner = self.inner.create(path)?;
        let ino = self.ino_of(path);
        let mut st = self.state();
        if let Some((len, _)) = old.and_then(|i| st.mine.get(&i).copied()) {
            // Truncated: its bytes come back.
            st.used = st.used.saturating_sub(len);
            st.mine.remove(&old.unwrap_or_default());
        }
        if let Some(i) = ino {
            st.mine.entry(i).or_insert((0, 1));
        }
        Ok(Box::new(FaultFile {
            inner,
            path: path.to_path_buf(),
            ino,
            st: self.st.clone(),
        }))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn FileWrite>> {
        self.admit(Op::Allocates, &[path])?;
        let inner = self.inner.open_append(path)?;
        Ok(Box::new(FaultFile {
            inner,
            path: path.to_path_buf(),
            ino: self.ino_of(path),
            st: self.st.clone(),
        }))
    }
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        self.admit(Op::Other, &[path])?;
        let ino = self.ino_of(path);
        self.inner.truncate(path, len)?;
        let mut st = self.state();
        if let Some((had, _)) = ino.and_then(|i| st.mine.get_mut(&i)) {
            if len < *had {
                let freed = *had - len;
                *had = len;
                st.used = st.used.saturating_sub(freed);
            }
        }
        Ok(())
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.admit(Op::Other, &[path])?;
        self.inner.sync_dir(path)
    }
    fn sync_fs(&self, path: &Path) -> io::Result<()> {
        self.admit(Op::Other, &[])?;
        self.inner.sync_fs(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.admit(Op::Allocates, &[from, to])?;
        let replaced = self.ino_of(to).filter(|i| Some(*i) != self.ino_of(from));
        self.inner.rename(from, to)?;
        if let Some(i) = replaced {
            self.state().unlink(i);
        }
        Ok(())
    }
    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        if self.state().lacks.rename_noreplace {
            return super::link_then_unlink(self, from, to);
        }
        self.admit(Op::Allocates, &[from, to])?;
        self.inner.rename_noreplace(from, to)
    }
    fn hard_link(&self, original: &Path, link: &Path) -> io::Result<()> {
        self.admit(Op::Allocates, &[link])?;
        if self.state().lacks.hard_links {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.inner.hard_link(original, link)?;
        if let Some(i) = self.ino_of(original) {
            if let Some((_, names)) = self.state().mine.get_mut(&i) {
                *names += 1;
            }
        }
        Ok(())
    }
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        self.admit(Op::Allocates, &[link])?;
        self.inner.symlink(target, link)
    }
    fn reflink(&self, src: &Path, dst: &Path) -> io::Result<()> {
        self.admit(Op::Allocates, &[dst])?;
        self.inner.reflink(src, dst)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.admit(Op::Other, &[path])?;
        let ino = self.ino_of(path);
        self.inner.remove_file(path)?;
        if let Some(i) = ino {
            self.state().unlink(i);
        }
        Ok(())
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.admit(Op::Allocates, &[path])?;
        self.inner.create_dir(path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.admit(Op::Other, &[path])?;
        self.inner.remove_dir(path)
    }
    fn set_readonly(&self, path: &Path, readonly: bool) -> io::Result<()> {
        self.admit(Op::Other, &[path])?;
        self.inner.set_readonly(path, readonly)
    }
    fn lock(&self, path: &Path, wait: bool) -> io::Result<Option<Box<dyn LockGuard>>> {
        self.admit(Op::Allocates, &[path])?;
        self.inner.lock(path, wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::sim::SimFs;

    fn write(fs: &dyn Fs, p: &str, bytes: &[u8]) -> io::Result<()> {
        let mut f = fs.create(Path::new(p))?;
        f.write_all(bytes)?;
        f.flush()
    }

    /// A full disk writes what fits, then refuses; removing a file the wrapper
    /// wrote gives its bytes back, and a hard link keeps them taken.
    #[test]
    fn no_space_counts_bytes_and_gives_them_back() {
        let fs = FaultFs::new(SimFs::new());
        fs.arm(Fault::NoSpace { bytes: 10 });
        write(&fs, "/a", b"123456").unwrap();
        let e = write(&fs, "/b", b"123456").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(fs.inner().read(Path::new("/b")).unwrap(), b"1234");
        assert_eq!(fs.free_space(Path::new("/")).unwrap(), Some(0));
        fs.hard_link(Path::new("/a"), Path::new("/a2")).unwrap();
        fs.remove_file(Path::new("/a")).unwrap();
        assert_eq!(fs.used(), 10, "a second name keeps the bytes");
        fs.remove_file(Path::new("/a2")).unwrap();
        fs.remove_file(Path::new("/b")).unwrap();
        assert_eq!(fs.used(), 0);
        write(&fs, "/c", b"0123456789").unwrap();
    }

    /// Each fault refuses what it models from its operation on, and nothing once
    /// cleared; reads always work.
    #[test]
    fn faults_refuse_from_their_operation_on() {
        for (fault, code, removal_refused) in [
            (Fault::Io { op: 2 }, libc::EIO, true),
            (Fault::ReadOnly { op: 2 }, libc::EROFS, true),
            (Fault::NoSpaceMeta { op: 2 }, libc::ENOSPC, false),
        ] {
            let fs = FaultFs::new(SimFs::new());
            fs.arm(fault);
            write(&fs, "/a", b"x").unwrap(); // ops 0 (create) and 1 (write)
            assert_eq!(
                fs.create_dir(Path::new("/d")).unwrap_err().raw_os_error(),
                Some(code)
            );
            assert_eq!(fs.read(Path::new("/a")).unwrap(), b"x");
            let removed = fs.remove_file(Path::new("/a"));
            assert_eq!(removed.is_err(), removal_refused, "{fault:?}");
            fs.clear();
            fs.create_dir(Path::new("/d")).unwrap();
            assert!(fs.refused() >= 1);
        }
    }
}
