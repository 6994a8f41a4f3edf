//! The log of operations and what is durable: every mutation is applied to the
//! live image and appended to the log as pending; syncs mark operations durable,
//! and a reboot replays the durable (or surviving) ones onto the durable image.
//! Also the operation counter behind crash injection.

use std::io;
use std::path::{Path, PathBuf};

use super::image::*;
use super::op::*;
use crate::fs::Kind;

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

#[derive(Debug, Clone)]
pub(super) struct Pending {
    pub(super) op: Op,
    pub(super) durable: bool,
    pub(super) desc: String,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Options {
    pub(super) reflink: bool,
    pub(super) enforce_readonly: bool,
}

pub(super) struct State {
    pub(super) live: Image,
    /// Durable baseline: everything before `log` is applied here.
    pub(super) base: Image,
    pub(super) log: Vec<Pending>,
    pub(super) next_ino: Ino,
    pub(super) clock: u64,
    pub(super) ops: u64,
    pub(super) crash_at: Option<u64>,
    pub(super) crashed: bool,
    pub(super) opts: Options,
    pub(super) history: Vec<String>,
}

pub(super) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl State {
    pub(super) fn new() -> Self {
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
    pub(super) fn begin(&mut self, desc: &str) -> io::Result<()> {
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

    pub(super) fn check(&self) -> io::Result<()> {
        if self.crashed {
            Err(crash_error())
        } else {
            Ok(())
        }
    }

    pub(super) fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    pub(super) fn alloc(&mut self) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    pub(super) fn record(&mut self, op: Op, desc: &str) {
        self.live.apply(&op);
        self.log.push(Pending {
            op,
            durable: false,
            desc: format!("#{} {desc}", self.ops),
        });
    }

    pub(super) fn mark(&mut self, pred: impl Fn(&Op) -> bool) {
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
    pub(super) fn image_keeping(&self, keep: impl Fn(usize) -> bool) -> Image {
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

    pub(super) fn pending_count(&self) -> usize {
        self.log.iter().filter(|p| !p.durable).count()
    }

    // ---- the mutations, uncounted -------------------------------------------

    /// Open `path` for writing (create it if missing); the inode written.
    pub(super) fn open_write(
        &mut self,
        path: &Path,
        truncate: bool,
        desc: &str,
    ) -> io::Result<Ino> {
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

    pub(super) fn write_at(
        &mut self,
        ino: Ino,
        append: bool,
        pos: u64,
        buf: &[u8],
        desc: &str,
    ) -> u64 {
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

    pub(super) fn create_dir(&mut self, path: &Path, desc: &str) -> io::Result<()> {
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

    pub(super) fn new_name(&mut self, path: &Path) -> io::Result<(Ino, String)> {
        let (dir, name) = self.live.parent(path)?;
        if self.live.entry(dir, &name).is_some() {
            return Err(err(io::ErrorKind::AlreadyExists, "already exists", path));
        }
        Ok((dir, name))
    }

    pub(super) fn existing(&self, path: &Path) -> io::Result<(Ino, String, Ino)> {
        let (dir, name) = self.live.parent(path)?;
        let ino = self
            .live
            .entry(dir, &name)
            .ok_or_else(|| err(io::ErrorKind::NotFound, "no such file or folder", path))?;
        Ok((dir, name, ino))
    }

    pub(super) fn rename(&mut self, from: &Path, to: &Path, desc: &str) -> io::Result<()> {
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

    pub(super) fn write_file(&mut self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        if let Some(parent) = path.parent() {
            self.create_dirs(parent)?;
        }
        let desc = format!("setup write_file {}", path.display());
        let ino = self.open_write(path, true, &desc)?;
        self.write_at(ino, false, 0, bytes, &desc);
        Ok(())
    }

    pub(super) fn create_dirs(&mut self, path: &Path) -> io::Result<()> {
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
