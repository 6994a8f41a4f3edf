//! The filesystem seam: the one door through which `stack` touches the disk.
//!
//! Owns: every filesystem operation the engine performs, reads and mutations alike
//! (create/write, fsync of a file or a folder, rename, link, symlink, unlink, mkdir,
//! rmdir, chmod, truncate, lock).
//!
//! Architecture invariant: nothing outside `src/fs` calls a `std::fs` mutator. The
//! engine is written against [`Fs`]; [`RealFs`] calls the operating system, and the
//! test implementation in `sim` keeps an in-memory tree with a separate durable
//! image, so crash injection, power-loss simulation and fuzzing all see every
//! mutation the engine makes, in order. `sim` is test machinery: it is built for
//! unit tests and with the cargo feature `sim` (the integration tests and fuzzers
//! turn it on), never into the release library.
//!
//! Durability contract (what callers may assume, and what the simulator enforces):
//! - File contents written through a [`FileWrite`] survive a crash only once
//!   [`FileWrite::sync`] returned.
//! - A name created, replaced or removed in a folder (create, rename, link, symlink,
//!   unlink, mkdir, rmdir) survives a crash only once [`Fs::sync_dir`] of that folder
//!   returned.
//! - `rename` within one filesystem is atomic: after a crash the destination name
//!   shows either the old or the new file, never neither, never a mix.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

#[cfg(any(test, feature = "sim"))]
pub mod fault;
#[cfg(any(test, feature = "sim"))]
pub mod sim;

/// What a directory entry or a path is (never following a final symlink).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

/// The subset of `lstat`/`stat` the engine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    pub len: u64,
    pub mtime_ns: i128,
    pub ino: u64,
    /// The device (filesystem) the file lives on.
    pub dev: u64,
    pub readonly: bool,
}

/// One entry of a folder listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub kind: Kind,
}

/// A batch's results, exactly one per name: a result that an `Fs` breaking the
/// seam's contract did not return is an error, never a shift of the ones after it.
pub fn one_per_name<T>(mut results: Vec<io::Result<T>>, names: usize) -> Vec<io::Result<T>> {
    results.truncate(names);
    results.resize_with(names, || Err(no_result()));
    results
}

/// What stands for a result a batch did not return.
pub fn no_result() -> io::Error {
    io::Error::other("the filesystem returned no result")
}

/// The names of one batch for the seam's `*_in` methods, written into one buffer
/// (no allocation per name).
#[derive(Default)]
pub struct NameBatch {
    buf: String,
    ends: Vec<usize>,
}

impl NameBatch {
    pub fn with_capacity(names: usize) -> NameBatch {
        NameBatch {
            buf: String::with_capacity(32 * names),
            ends: Vec::with_capacity(names),
        }
    }

    /// Add a name, written by `write`.
    pub fn push(&mut self, write: impl FnOnce(&mut String)) {
        write(&mut self.buf);
        self.ends.push(self.buf.len());
    }

    /// The names, in order.
    pub fn names(&self) -> Vec<&str> {
        let mut from = 0;
        self.ends
            .iter()
            .map(|&to| {
                let name = &self.buf[from..to];
                from = to;
                name
            })
            .collect()
    }
}

/// An open file being written. Dropping it closes it without syncing.
pub trait FileWrite: Write + Send {
    /// Make the bytes written so far durable (fdatasync).
    fn sync(&mut self) -> io::Result<()>;
}

/// [`Fs::write_files_in`] for one path, through the seam's single calls: create,
/// make read-only, write.
fn write_one<F: Fs + ?Sized>(fs: &F, path: &Path, bytes: &[u8], readonly: bool) -> io::Result<()> {
    let mut f = fs.create(path)?;
    if readonly {
        fs.set_readonly(path, true)?;
    }
    f.write_all(bytes)?;
    f.flush()
}

/// A held exclusive lock; released when dropped (or when the holder dies).
pub trait LockGuard: Send {}

/// The filesystem seam. Every method's paths are absolute or relative to the
/// process's working directory, exactly as `std::fs` takes them.
pub trait Fs: Send + Sync {
    // ---- reads ----------------------------------------------------------
    /// `lstat`: metadata of the path itself (a symlink is reported as a symlink).
    fn symlink_metadata(&self, path: &Path) -> io::Result<Meta>;
    /// `stat`: metadata following symlinks.
    fn metadata(&self, path: &Path) -> io::Result<Meta>;
    /// [`Fs::symlink_metadata`] of each of `names` (single components) in the
    /// folder `dir`, in order: a batch, for which an implementation may look the
    /// folder up once instead of once per name (a no-op pull is mostly stats).
    fn symlink_metadata_in(&self, dir: &Path, names: &[&str]) -> Vec<io::Result<Meta>> {
        names
            .iter()
            .map(|n| self.symlink_metadata(&dir.join(n)))
            .collect()
    }
    /// [`Fs::metadata`] (following symlinks) of each of `names` (single
    /// components) in the folder `dir`, in order: a batch, as
    /// [`Fs::symlink_metadata_in`].
    fn metadata_in(&self, dir: &Path, names: &[&str]) -> Vec<io::Result<Meta>> {
        names.iter().map(|n| self.metadata(&dir.join(n))).collect()
    }
    /// Entries of a folder, sorted by name, without `.` and `..`.
    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>>;
    /// The path with every symlink resolved (`realpath`). A filesystem without
    /// symlinked folders (the simulated one) answers the absolute path.
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        std::path::absolute(path)
    }
    /// The target of a symlink.
    fn read_link(&self, path: &Path) -> io::Result<PathBuf>;
    /// Open a file for reading (following symlinks).
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn Read + Send>>;
    /// The bytes an unprivileged writer may still allocate on the filesystem that
    /// holds `path` (`statvfs`: available blocks times their size); `None` where
    /// the filesystem cannot tell.
    fn free_space(&self, _path: &Path) -> io::Result<Option<u64>> {
        Ok(None)
    }

    // ---- mutations --------------------------------------------------------
    /// Create or truncate a file for writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn FileWrite>>;
    /// Write each `(name, bytes)` as a whole file named `name` (one component) in
    /// the folder `dir`: created or truncated, made read-only first if `readonly`
    /// (the open handle still writes), then written; no sync. One result per file,
    /// in order. A batch, for which an implementation may look the folder up once.
    fn write_files_in(
        &self,
        dir: &Path,
        files: &[(&str, &[u8])],
        readonly: bool,
    ) -> Vec<io::Result<()>> {
        files
            .iter()
            .map(|(name, bytes)| write_one(self, &dir.join(name), bytes, readonly))
            .collect()
    }
    /// [`Fs::symlink`] of each `(target, name)` as `name` (one component) in the
    /// folder `dir`, in order: a batch, as [`Fs::write_files_in`].
    fn symlinks_in(&self, dir: &Path, links: &[(&Path, &str)]) -> Vec<io::Result<()>> {
        links
            .iter()
            .map(|(target, name)| self.symlink(target, &dir.join(name)))
            .collect()
    }
    /// Open an existing file (or create it) for appending at its end.
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn FileWrite>>;
    /// Cut a file to `len` bytes and make that durable.
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()>;
    /// Create or truncate `path` and give it `len` bytes of allocated blocks (not
    /// a sparse file): room held for later writes, released by removing it. No
    /// sync.
    fn allocate(&self, path: &Path, len: u64) -> io::Result<()> {
        let mut f = self.create(path)?;
        let zeros = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        f.flush()
    }
    /// fsync a folder, making the names created or removed in it durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// `syncfs`: make every write, name and folder change on the filesystem that
    /// holds `path` durable, in one call (no ordering among them is promised).
    fn sync_fs(&self, path: &Path) -> io::Result<()>;
    /// Atomically rename `from` to `to`, replacing a file at `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Rename `from` to `to` only if `to` does not exist; else fail with
    /// `AlreadyExists` (EEXIST) and change nothing. The check and the rename are
    /// one step (`renameat2(RENAME_NOREPLACE)`), so a file that appears at `to`
    /// an instant before is never replaced. This default, for wrappers that do
    /// not pass the call on, gives the same promise: a file or symlink gets its
    /// new name by `link` (which never replaces) and loses its old one; a folder
    /// by `rename`, which replaces nothing but an empty folder. `to` already a
    /// name of `from`'s inode finishes such a move (the link was made). Where
    /// the filesystem has no hard links either, the promise is weaker: a check,
    /// then a rename, and a file that appears between the two is replaced.
    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        link_then_unlink(self, from, to)
    }
    /// Make `link` a new hard link to `original`.
    fn hard_link(&self, original: &Path, link: &Path) -> io::Result<()>;
    /// Make `link` a symlink whose content is `target`.
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()>;
    /// Clone `src` into a new file `dst` sharing extents (copy-on-write).
    /// Fails with `Unsupported` (or the OS's error) where the filesystem cannot.
    fn reflink(&self, src: &Path, dst: &Path) -> io::Result<()>;
    /// Remove a file or a symlink.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Create one folder (its parent must exist).
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Remove one empty folder.
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    /// Set or clear the write permission bits (0444 vs 0644).
    fn set_readonly(&self, path: &Path, readonly: bool) -> io::Result<()>;
    /// Take an exclusive lock on `path` (created if missing). `Ok(None)` means
    /// another holder has it (only when `wait` is false).
    fn lock(&self, path: &Path, wait: bool) -> io::Result<Option<Box<dyn LockGuard>>>;

    // ---- provided helpers, built only from the methods above -----------------
    /// Read a whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.open_read(path)?.read_to_end(&mut out)?;
        Ok(out)
    }

    /// Does anything (file, folder, even a dangling symlink) exist at `path`?
    fn exists(&self, path: &Path) -> io::Result<bool> {
        match self.symlink_metadata(path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Copy the bytes of `src` (followed) into a new file `dst`, synced if asked.
    fn copy_file(&self, src: &Path, dst: &Path, sync: bool) -> io::Result<u64> {
        let mut r = self.open_read(src)?;
        let mut w = self.create(dst)?;
        let n = io::copy(&mut r, &mut w)?;
        w.flush()?;
        if sync {
            w.sync()?;
        }
        Ok(n)
    }

    /// Create `path` and every missing parent; returns the folders it created
    /// (outermost first), so a caller can fsync their parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        let mut missing = Vec::new();
        let mut cur = Some(path);
        while let Some(p) = cur {
            if p.as_os_str().is_empty() || self.exists(p)? {
                break;
            }
            missing.push(p.to_path_buf());
            cur = p.parent();
        }
        missing.reverse();
        for p in &missing {
            match self.create_dir(p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Ok(missing)
    }

    /// Remove `path` and everything under it; a missing path is fine.
    fn remove_tree(&self, path: &Path) -> io::Result<()> {
        let meta = match self.symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if meta.kind != Kind::Dir {
            return not_found_ok(self.remove_file(path));
        }
        for entry in self.read_dir(path)? {
            self.remove_tree(&path.join(&entry.name))?;
        }
        not_found_ok(self.remove_dir(path))
    }
}

/// [`Fs::rename_noreplace`] where the kernel or the filesystem has no
/// `RENAME_NOREPLACE`: a file or symlink is linked at `to` (`link` fails with
/// EEXIST rather than replace) and unlinked from `from`; a folder is renamed
/// (a folder's rename replaces only an empty folder, and no file).
///
/// `to` already a name of `from`'s inode is that link made and the unlink cut
/// off (a crash between the two): only the unlink is left to do. A filesystem
/// that has no hard links either (some FUSE filesystems: s3fs, rclone) gets a
/// check, then a plain rename — racy: a file that appears at `to` between the
/// two is replaced (`DURABILITY.md`, "Renames that never replace").
fn link_then_unlink<F: Fs + ?Sized>(fs: &F, from: &Path, to: &Path) -> io::Result<()> {
    if fs.symlink_metadata(from)?.kind == Kind::Dir {
        return check_then_rename(fs, from, to);
    }
    match fs.hard_link(from, to) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && linked_already(fs, from, to) => {}
        Err(e) if has_no_links(&e) => return check_then_rename(fs, from, to),
        Err(e) => return Err(e),
    }
    fs.remove_file(from)
}

/// Rename `from` to `to` unless an entry that is not a folder holds `to` (a
/// folder's rename replaces only an empty folder, a file's never a folder).
/// Atomic for a folder; for a file the check and the rename are two steps.
fn check_then_rename<F: Fs + ?Sized>(fs: &F, from: &Path, to: &Path) -> io::Result<()> {
    match fs.symlink_metadata(to) {
        Ok(m) if m.kind != Kind::Dir => Err(io::Error::from(io::ErrorKind::AlreadyExists)),
        _ => fs.rename(from, to),
    }
}

/// Are `from` and `to` two names of one inode (a no-replace rename by link and
/// unlink, cut between the two)?
fn linked_already<F: Fs + ?Sized>(fs: &F, from: &Path, to: &Path) -> bool {
    from != to
        && match (fs.symlink_metadata(from), fs.symlink_metadata(to)) {
            (Ok(a), Ok(b)) => a.kind != Kind::Dir && a.ino == b.ino && a.dev == b.dev,
            _ => false,
        }
}

/// Does `e` say the filesystem makes no hard links at all?
fn has_no_links(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported
        || matches!(
            e.raw_os_error(),
            Some(libc::EPERM | libc::ENOSYS | libc::EOPNOTSUPP)
        )
}

/// Treat "not found" as success: removal is idempotent (recovery may redo it).
pub fn not_found_ok(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

// ---------------------------------------------------------------------------
// The real implementation.
// ---------------------------------------------------------------------------

/// [`Fs`] over the operating system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

struct RealFile(std::fs::File);

impl Write for RealFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl FileWrite for RealFile {
    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

struct RealLock(#[allow(dead_code)] std::fs::File);
impl LockGuard for RealLock {}
impl Drop for RealLock {
    fn drop(&mut self) {
        let _ = fs2::FileExt::unlock(&self.0);
    }
}

fn kind_of(ft: std::fs::FileType) -> Kind {
    if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else {
        Kind::Other
    }
}

/// [`meta_of`] for a raw `struct stat` (the same fields, the same meaning).
fn meta_of_stat(st: &libc::stat) -> Meta {
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFLNK => Kind::Symlink,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFREG => Kind::File,
        _ => Kind::Other,
    };
    Meta {
        kind,
        len: st.st_size as u64,
        mtime_ns: i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec),
        ino: st.st_ino,
        dev: st.st_dev,
        readonly: st.st_mode & 0o222 == 0,
    }
}

fn meta_of(m: &std::fs::Metadata) -> Meta {
    use std::os::unix::fs::MetadataExt;
    Meta {
        kind: kind_of(m.file_type()),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ino: m.ino(),
        dev: m.dev(),
        readonly: m.permissions().readonly(),
    }
}

impl RealFs {
    /// `lstat` (or, with `follow`, `stat`) of each of `names` in `dir`: one
    /// `open(O_PATH)` of the folder, then `fstatat` relative to it. A missing or
    /// odd folder, or a name that is not one component, goes by path, with exactly
    /// the usual errors.
    fn stat_in(&self, dir: &Path, names: &[&str], follow: bool) -> Vec<io::Result<Meta>> {
        let by_path = |n: &str| {
            let p = dir.join(n);
            if follow {
                self.metadata(&p)
            } else {
                self.symlink_metadata(&p)
            }
        };
        let Some(d) = sys::Dir::open(dir) else {
            return names.iter().map(|n| by_path(n)).collect();
        };
        names
            .iter()
            .map(|n| match sys::name(n) {
                Some(c) if follow => d.stat(&c).map(|st| meta_of_stat(&st)),
                Some(c) => d.lstat(&c).map(|st| meta_of_stat(&st)),
                None => by_path(n),
            })
            .collect()
    }
}

// The one place allowed to call std::fs mutators (clippy.toml enforces it elsewhere).
#[allow(clippy::disallowed_methods)]
impl Fs for RealFs {
    fn symlink_metadata(&self, path: &Path) -> io::Result<Meta> {
        Ok(meta_of(&std::fs::symlink_metadata(path)?))
    }
    fn metadata(&self, path: &Path) -> io::Result<Meta> {
        Ok(meta_of(&std::fs::metadata(path)?))
    }
    /// One `open(O_PATH)` of the folder, then `fstatat` relative to it: the kernel
    /// walks one component per name instead of the whole path.
    fn symlink_metadata_in(&self, dir: &Path, names: &[&str]) -> Vec<io::Result<Meta>> {
        self.stat_in(dir, names, false)
    }
    /// One `open(O_PATH)` of the folder, then `fstatat` (following symlinks)
    /// relative to it, as [`RealFs::symlink_metadata_in`].
    fn metadata_in(&self, dir: &Path, names: &[&str]) -> Vec<io::Result<Meta>> {
        self.stat_in(dir, names, true)
    }
    /// One `open(O_PATH)` of the folder, then `openat`, `fchmod` and `write` per
    /// file: no path walk beyond one component, and no chmod by path.
    fn write_files_in(
        &self,
        dir: &Path,
        files: &[(&str, &[u8])],
        readonly: bool,
    ) -> Vec<io::Result<()>> {
        let d = sys::Dir::open(dir);
        files
            .iter()
            .map(|(n, bytes)| match (&d, sys::name(n)) {
                (Some(d), Some(c)) => {
                    let mut f = d.create(&c)?;
                    if readonly {
                        use std::os::unix::fs::PermissionsExt;
                        f.set_permissions(std::fs::Permissions::from_mode(0o444))?;
                    }
                    f.write_all(bytes)
                }
                _ => write_one(self, &dir.join(n), bytes, readonly),
            })
            .collect()
    }
    /// One `open(O_PATH)` of the folder, then `symlinkat` per link.
    fn symlinks_in(&self, dir: &Path, links: &[(&Path, &str)]) -> Vec<io::Result<()>> {
        let d = sys::Dir::open(dir);
        links
            .iter()
            .map(|(target, n)| match (&d, sys::name(n), sys::path(target)) {
                (Some(d), Some(c), Some(t)) => d.symlink(&t, &c),
                _ => self.symlink(target, &dir.join(n)),
            })
            .collect()
    }
    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(path)? {
            let e = e?;
            out.push(DirEntry {
                name: e.file_name().to_string_lossy().into_owned(),
                kind: kind_of(e.file_type()?),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
    fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
        std::fs::read_link(path)
    }
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        std::fs::canonicalize(path)
    }
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(std::fs::File::open(path)?))
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }
    fn free_space(&self, path: &Path) -> io::Result<Option<u64>> {
        sys::free_space(path).map(Some)
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn FileWrite>> {
        Ok(Box::new(RealFile(std::fs::File::create(path)?)))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn FileWrite>> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Box::new(RealFile(f)))
    }
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(len)?;
        f.sync_all()
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::File::open(path)?.sync_all()
    }
    /// `posix_fallocate`: the blocks are allocated without writing them.
    fn allocate(&self, path: &Path, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::create(path)?;
        if len == 0 {
            return Ok(());
        }
        let len =
            libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `f` is an open descriptor for the duration of the call.
        match unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len) } {
            0 => Ok(()),
            libc::EOPNOTSUPP | libc::EINVAL => {
                drop(f);
                let mut f = RealFile(std::fs::File::create(path)?);
                let zeros = vec![0u8; 64 * 1024];
                let mut left = len as u64;
                while left > 0 {
                    let n = left.min(zeros.len() as u64) as usize;
                    f.write_all(&zeros[..n])?;
                    left -= n as u64;
                }
                Ok(())
            }
            code => Err(io::Error::from_raw_os_error(code)),
        }
    }
    fn sync_fs(&self, path: &Path) -> io::Result<()> {
        sys::syncfs(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        match sys::rename_noreplace(from, to) {
            // A kernel or filesystem without the flag (EINVAL: some network
            // and FUSE filesystems; ENOSYS: before Linux 3.15).
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                ) =>
            {
                link_then_unlink(self, from, to)
            }
            // Two names of one inode: a fallback's link, cut before its unlink.
            Err(e)
                if e.kind() == io::ErrorKind::AlreadyExists && linked_already(self, from, to) =>
            {
                self.remove_file(from)
            }
            r => r,
        }
    }
    fn hard_link(&self, original: &Path, link: &Path) -> io::Result<()> {
        std::fs::hard_link(original, link)
    }
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        std::os::unix::fs::symlink(target, link)
    }
    fn reflink(&self, src: &Path, dst: &Path) -> io::Result<()> {
        reflink_copy::reflink(src, dst)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }
    fn set_readonly(&self, path: &Path, readonly: bool) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let mode = if readonly { 0o444 } else { 0o644 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
    fn lock(&self, path: &Path, wait: bool) -> io::Result<Option<Box<dyn LockGuard>>> {
        use fs2::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if wait {
            f.lock_exclusive()?;
            return Ok(Some(Box::new(RealLock(f))));
        }
        match f.try_lock_exclusive() {
            Ok(()) => Ok(Some(Box::new(RealLock(f)))),
            Err(e) if e.raw_os_error() == fs2::lock_contended_error().raw_os_error() => Ok(None),
            Err(e) => Err(e),
        }
    }
}

mod sys {
    use std::ffi::CString;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    /// A folder held open (`O_PATH`) for calls relative to it.
    pub struct Dir(OwnedFd);

    /// `name` as a C string if it is one path component (no `/`, no NUL).
    pub fn name(name: &str) -> Option<CString> {
        if name.contains('/') || name.is_empty() {
            return None;
        }
        CString::new(name).ok()
    }

    /// Any path as a C string (no NUL).
    pub fn path(p: &Path) -> Option<CString> {
        CString::new(p.as_os_str().as_bytes()).ok()
    }

    fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    impl Dir {
        /// `None` if the folder cannot be opened (the caller falls back to paths,
        /// which report the usual errors).
        pub fn open(dir: &Path) -> Option<Dir> {
            let c = path(dir)?;
            // SAFETY: `c` is a NUL-terminated path.
            let fd = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            // SAFETY: a non-negative `fd` was just opened and is owned from here.
            (fd >= 0).then(|| Dir(unsafe { OwnedFd::from_raw_fd(fd) }))
        }

        /// `fstatat(AT_SYMLINK_NOFOLLOW)` of one name.
        pub fn lstat(&self, name: &CString) -> io::Result<libc::stat> {
            self.fstatat(name, libc::AT_SYMLINK_NOFOLLOW)
        }

        /// `fstatat` of one name, following a final symlink.
        pub fn stat(&self, name: &CString) -> io::Result<libc::stat> {
            self.fstatat(name, 0)
        }

        fn fstatat(&self, name: &CString, flags: libc::c_int) -> io::Result<libc::stat> {
            let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
            // SAFETY: the folder is open, `name` NUL-terminated, and `st` points to
            // writable memory for one `struct stat`.
            check(unsafe {
                libc::fstatat(self.0.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), flags)
            })?;
            // SAFETY: `fstatat` returned 0, so it filled `st`.
            Ok(unsafe { st.assume_init() })
        }

        /// Create or truncate one name for writing (mode 0666 less the umask, as
        /// `File::create`).
        pub fn create(&self, name: &CString) -> io::Result<std::fs::File> {
            // SAFETY: the folder is open and `name` NUL-terminated.
            let fd = check(unsafe {
                libc::openat(
                    self.0.as_raw_fd(),
                    name.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
                    0o666 as libc::c_uint,
                )
            })?;
            // SAFETY: `openat` returned a new descriptor, owned from here.
            Ok(unsafe { std::fs::File::from_raw_fd(fd) })
        }

        /// `symlinkat(target, dir, name)`.
        pub fn symlink(&self, target: &CString, name: &CString) -> io::Result<()> {
            // SAFETY: both are NUL-terminated and the folder is open.
            check(unsafe { libc::symlinkat(target.as_ptr(), self.0.as_raw_fd(), name.as_ptr()) })
                .map(drop)
        }
    }

    /// `renameat2(from, to, RENAME_NOREPLACE)` (Linux); elsewhere `ENOSYS`, and
    /// the caller links instead.
    pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
        let bad = || io::Error::from(io::ErrorKind::InvalidInput);
        let (f, t) = (path(from).ok_or_else(bad)?, path(to).ok_or_else(bad)?);
        #[cfg(target_os = "linux")]
        {
            // SAFETY: both paths are NUL-terminated; AT_FDCWD resolves them as
            // `rename` does.
            check(unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    f.as_ptr(),
                    libc::AT_FDCWD,
                    t.as_ptr(),
                    libc::RENAME_NOREPLACE,
                )
            })
            .map(drop)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (f, t);
            Err(io::Error::from_raw_os_error(libc::ENOSYS))
        }
    }

    /// `statvfs`: the bytes available to an unprivileged writer.
    pub fn free_space(p: &Path) -> io::Result<u64> {
        let c = path(p).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `c` is NUL-terminated and `st` points to writable memory for one
        // `struct statvfs`.
        check(unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) })?;
        // SAFETY: `statvfs` returned 0, so it filled `st`.
        let st = unsafe { st.assume_init() };
        #[allow(clippy::unnecessary_cast)] // not u64 on every target
        Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }

    /// syncfs(2) on Linux; elsewhere, a full `sync(2)`, which is at least as strong.
    pub fn syncfs(path: &Path) -> io::Result<()> {
        let f = std::fs::File::open(path)?;
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: `f` is an open descriptor for the duration of the call.
            let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            drop(f);
            // SAFETY: sync(2) takes no arguments and cannot fail.
            unsafe { libc::sync() };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batched writes and symlinks do what the seam's single calls do, in a
    /// folder (read-only from creation, yet written; a truncated old file) and in
    /// a folder that does not exist (the same errors).
    #[test]
    #[allow(clippy::disallowed_methods)] // the fixture is read with std::fs
    fn batched_writes_and_links_equal_single_calls() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("old"), b"a longer old content").unwrap();
        let fs = RealFs;
        let files: [(&str, &[u8]); 3] = [("a", b"alpha"), ("old", b"new"), ("", b"x")];
        let r = fs.write_files_in(dir, &files, true);
        assert!(r[0].is_ok() && r[1].is_ok(), "{r:?}");
        assert!(r[2].is_err(), "an empty name is no file");
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"alpha");
        assert_eq!(std::fs::read(dir.join("old")).unwrap(), b"new");
        for n in ["a", "old"] {
            let mode = std::fs::metadata(dir.join(n)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o444, "{n}");
        }
        let w = fs.write_files_in(dir, &[("b", b"beta")], false);
        assert!(w[0].is_ok());
        assert!(!std::fs::metadata(dir.join("b"))
            .unwrap()
            .permissions()
            .readonly());
        let links = [(Path::new("../x/a.parquet"), "l1"), (Path::new("a"), "l2")];
        let r = fs.symlinks_in(dir, &links);
        assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
        assert_eq!(
            std::fs::read_link(dir.join("l1")).unwrap(),
            Path::new("../x/a.parquet")
        );
        let again = fs.symlinks_in(dir, &links[1..]);
        assert_eq!(
            again[0].as_ref().unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        let missing = dir.join("no-such-folder");
        let single = fs.create(&missing.join("a")).map(drop).unwrap_err();
        let batch = fs.write_files_in(&missing, &files[..1], true);
        assert_eq!(batch[0].as_ref().unwrap_err().kind(), single.kind());
        let batch = fs.symlinks_in(&missing, &links[..1]);
        assert_eq!(batch[0].as_ref().unwrap_err().kind(), single.kind());
    }

    /// The batched stats say exactly what one `symlink_metadata` or `metadata` per
    /// path says: for a file, a symlink (followed or not), a dangling symlink, a
    /// symlink loop, a folder, a missing name, names that are not one component
    /// (per path), a folder that does not exist and one that is a file.
    #[test]
    #[allow(clippy::disallowed_methods)] // the fixture is made with std::fs
    fn batched_stats_equal_single_stats() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("a.parquet"), b"bytes").unwrap();
        std::os::unix::fs::symlink("a.parquet", dir.join("b.parquet")).unwrap();
        std::os::unix::fs::symlink("nowhere", dir.join("c.parquet")).unwrap();
        std::fs::create_dir(dir.join("d")).unwrap();
        let mut ro = std::fs::metadata(dir.join("a.parquet"))
            .unwrap()
            .permissions();
        ro.set_readonly(true);
        std::fs::set_permissions(dir.join("a.parquet"), ro).unwrap();
        std::os::unix::fs::symlink("e.parquet", dir.join("e.parquet")).unwrap();
        std::fs::create_dir(dir.join("f")).unwrap();
        std::fs::write(dir.join("f/g.parquet"), b"in a sub-folder").unwrap();
        let names = [
            "a.parquet",
            "b.parquet",
            "c.parquet",
            "d",
            "missing",
            "e.parquet",
            "f/g.parquet",
            "f/missing",
            "a.parquet/x",
        ];
        let fs = RealFs;
        for folder in [
            dir.to_path_buf(),
            dir.join("no-such-folder"),
            dir.join("a.parquet"),
        ] {
            let lstats = fs.symlink_metadata_in(&folder, &names);
            let stats = fs.metadata_in(&folder, &names);
            assert_eq!(lstats.len(), names.len());
            assert_eq!(stats.len(), names.len());
            for (i, name) in names.iter().enumerate() {
                let path = folder.join(name);
                let pairs = [
                    (&lstats[i], fs.symlink_metadata(&path)),
                    (&stats[i], fs.metadata(&path)),
                ];
                for (got, want) in pairs {
                    match (got, want) {
                        (Ok(g), Ok(w)) => assert_eq!(*g, w, "{name}"),
                        (Err(g), Err(w)) => {
                            assert_eq!(g.kind(), w.kind(), "{name}");
                            assert_eq!(g.raw_os_error(), w.raw_os_error(), "{name}");
                        }
                        (g, w) => panic!("{name}: batch {g:?}, single {w:?}"),
                    }
                }
            }
        }
        // `stat` follows the link, `lstat` does not.
        let (l, s) = (
            fs.symlink_metadata_in(dir, &["b.parquet"]),
            fs.metadata_in(dir, &["b.parquet"]),
        );
        assert_eq!(l[0].as_ref().unwrap().kind, Kind::Symlink);
        assert_eq!(s[0].as_ref().unwrap().kind, Kind::File);
    }

    /// `rename_noreplace` on the real filesystem, by `renameat2` and by the
    /// link fallback: a taken name fails with `AlreadyExists` and both files
    /// keep their bytes; a free one is taken; a folder moves to a free name.
    #[test]
    fn rename_noreplace_never_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let (a, b, c) = (d.join("a"), d.join("b"), d.join("c"));
        type Rename = fn(&RealFs, &Path, &Path) -> io::Result<()>;
        let ways: [(&str, Rename); 2] = [
            ("renameat2", |fs, f, t| fs.rename_noreplace(f, t)),
            ("link fallback", |fs, f, t| link_then_unlink(fs, f, t)),
        ];
        for (how, rename) in ways {
            write_one(&RealFs, &a, b"new", false).unwrap();
            write_one(&RealFs, &b, b"the user's", false).unwrap();
            let e = rename(&RealFs, &a, &b).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{how}: {e}");
            assert_eq!(std::fs::read(&a).unwrap(), b"new", "{how}");
            assert_eq!(std::fs::read(&b).unwrap(), b"the user's", "{how}");
            rename(&RealFs, &a, &c).unwrap();
            assert!(!a.exists(), "{how}");
            assert_eq!(std::fs::read(&c).unwrap(), b"new", "{how}");
            RealFs.remove_file(&c).unwrap();
            RealFs.create_dir(&d.join("dir")).unwrap();
            assert_eq!(
                rename(&RealFs, &d.join("dir"), &b).unwrap_err().kind(),
                io::ErrorKind::AlreadyExists,
                "{how}"
            );
            rename(&RealFs, &d.join("dir"), &d.join("moved")).unwrap();
            RealFs.remove_dir(&d.join("moved")).unwrap();
            RealFs.remove_file(&b).unwrap();
            // A move cut between its link and its unlink: finished.
            write_one(&RealFs, &a, b"new", false).unwrap();
            RealFs.hard_link(&a, &c).unwrap();
            rename(&RealFs, &a, &c).unwrap();
            assert!(!a.exists(), "{how}");
            assert_eq!(std::fs::read(&c).unwrap(), b"new", "{how}");
            RealFs.remove_file(&c).unwrap();
        }
    }
}
