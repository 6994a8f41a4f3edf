//! The simulated filesystem's vocabulary of mutations: one logged operation on the
//! inode table. The image replays them ([`super::image::Image::apply`]) and the log
//! keeps them pending until a sync makes them durable.

use std::path::PathBuf;

use crate::fs::Kind;

/// An inode number of the simulated filesystem.
pub(super) type Ino = u64;

#[derive(Debug, Clone)]
pub(super) enum Fresh {
    File(Vec<u8>),
    Dir,
    Symlink(PathBuf),
}

#[derive(Debug, Clone)]
pub(super) enum Op {
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
    pub(super) fn touches_dir(&self, d: Ino) -> bool {
        match self {
            Op::Create { dir, .. } | Op::Link { dir, .. } | Op::Unlink { dir, .. } => *dir == d,
            Op::Rename {
                from_dir, to_dir, ..
            } => *from_dir == d || *to_dir == d,
            _ => false,
        }
    }

    pub(super) fn is_content_of(&self, i: Ino) -> bool {
        matches!(self, Op::Write { ino, .. } | Op::SetLen { ino, .. } if *ino == i)
    }

    pub(super) fn is_chmod_of(&self, i: Ino) -> bool {
        matches!(self, Op::Chmod { ino, .. } if *ino == i)
    }
}
