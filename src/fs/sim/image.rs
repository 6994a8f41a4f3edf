//! The simulated filesystem's image: an inode table (folders, files, symlinks,
//! hard links) with path resolution as the kernel does it, and the replay of one
//! logged operation onto it ([`Image::apply`]), which rebuilds the tree a reboot
//! sees.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Component, Path, PathBuf};

use super::op::*;
use crate::error::SimulatedCrash;
use crate::fs::{Kind, Meta};

pub(super) const ROOT: Ino = 1;
pub(super) const MAX_SYMLINK_HOPS: usize = 40;
/// `truncate` may not grow a file past this (contents are held in memory).
pub(super) const MAX_FILE_LEN: u64 = 1 << 30;

/// One path of a [`SimFs::snapshot`](super::SimFs::snapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapEntry {
    Dir,
    File { bytes: Vec<u8>, readonly: bool },
    Symlink { target: PathBuf },
}

/// The whole tree: absolute path → what is there (the root itself is left out).
pub type Snapshot = BTreeMap<PathBuf, SnapEntry>;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct FileNode {
    pub(super) data: Vec<u8>,
    pub(super) readonly: bool,
    pub(super) mtime: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Node {
    File(FileNode),
    Dir(BTreeMap<String, Ino>),
    Symlink(PathBuf),
}

impl Node {
    pub(super) fn kind(&self) -> Kind {
        match self {
            Node::File(_) => Kind::File,
            Node::Dir(_) => Kind::Dir,
            Node::Symlink(_) => Kind::Symlink,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Image {
    pub(super) nodes: BTreeMap<Ino, Node>,
}

pub(super) enum Comp {
    Up,
    Name(String),
}

pub(super) fn err(kind: io::ErrorKind, what: &str, path: &Path) -> io::Error {
    io::Error::new(kind, format!("{what}: {}", path.display()))
}

pub(super) fn crash_error() -> io::Error {
    SimulatedCrash::io_error()
}

/// Split a path into components; `absolute` is required for the engine's paths.
pub(super) fn components(path: &Path, require_absolute: bool) -> io::Result<(bool, Vec<Comp>)> {
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
    pub(super) fn new() -> Self {
        let mut nodes = BTreeMap::new();
        nodes.insert(ROOT, Node::Dir(BTreeMap::new()));
        Image { nodes }
    }

    pub(super) fn dir(&self, ino: Ino) -> Option<&BTreeMap<String, Ino>> {
        match self.nodes.get(&ino) {
            Some(Node::Dir(e)) => Some(e),
            _ => None,
        }
    }

    pub(super) fn dir_mut(&mut self, ino: Ino) -> Option<&mut BTreeMap<String, Ino>> {
        match self.nodes.get_mut(&ino) {
            Some(Node::Dir(e)) => Some(e),
            _ => None,
        }
    }

    /// The file at `ino`, materialized empty if the inode does not exist yet.
    pub(super) fn file_mut(&mut self, ino: Ino) -> Option<&mut FileNode> {
        match self
            .nodes
            .entry(ino)
            .or_insert_with(|| Node::File(FileNode::default()))
        {
            Node::File(f) => Some(f),
            _ => None,
        }
    }

    pub(super) fn entry(&self, dir: Ino, name: &str) -> Option<Ino> {
        self.dir(dir).and_then(|e| e.get(name).copied())
    }

    /// Walk `comps` from the root, following symlinks (the last one if asked).
    pub(super) fn resolve(
        &self,
        path: &Path,
        comps: Vec<Comp>,
        follow_last: bool,
    ) -> io::Result<Ino> {
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

    pub(super) fn lookup(&self, path: &Path, follow: bool) -> io::Result<Ino> {
        let (_, comps) = components(path, true)?;
        self.resolve(path, comps, follow)
    }

    /// The folder holding `path`'s last name, and that name.
    pub(super) fn parent(&self, path: &Path) -> io::Result<(Ino, String)> {
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
    pub(super) fn in_subtree(&self, top: Ino, target: Ino) -> bool {
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

    pub(super) fn meta(&self, ino: Ino) -> Meta {
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

    pub(super) fn snapshot(&self) -> Snapshot {
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
    pub(super) fn apply(&mut self, op: &Op) -> bool {
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
