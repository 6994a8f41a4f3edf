//! The directory lock: one mutating command per directory at a time.
//!
//! Owns: `<dir>/.stack/lock`. The lock is a kernel lock (fs2/flock) that dies with
//! its holder, so a killed run never leaves a stale lock behind; the holder writes
//! its pid and command line into the file so a refused command can name it.
//! It prints nothing: a caller that waits is told so through `on_wait`.

use std::io::Write;

use crate::error::{Error, IoContext, Result};
use crate::fs::{Fs, LockGuard};
use crate::layout::Layout;

/// A held directory lock.
pub struct DirLock {
    _guard: Box<dyn LockGuard>,
}

/// Who holds the lock, as its file says (`pid N (command)`).
pub fn holder(fs: &dyn Fs, layout: &Layout) -> String {
    let text = fs
        .read(&layout.lock_file())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let mut lines = text.lines();
    match (lines.next(), lines.next()) {
        (Some(pid), Some(cmd)) if !pid.is_empty() => format!("pid {pid} ({cmd})"),
        (Some(pid), None) if !pid.is_empty() => format!("pid {pid}"),
        _ => "another process".to_string(),
    }
}

/// Take the lock of `layout`'s directory for `command`. Without `wait`, a held lock
/// is `Error::Locked` naming the holder; with it, wait for it silently.
pub fn acquire(fs: &dyn Fs, layout: &Layout, command: &str, wait: bool) -> Result<DirLock> {
    acquire_with(fs, layout, command, wait, &|| {})
}

/// [`acquire`], calling `on_wait` once before it blocks on a held lock (a command
/// line says whom it waits for: [`holder`]).
pub fn acquire_with(
    fs: &dyn Fs,
    layout: &Layout,
    command: &str,
    wait: bool,
    on_wait: &dyn Fn(),
) -> Result<DirLock> {
    let private = layout.private();
    fs.create_dir_all(&private).at("mkdir", &private)?;
    let path = layout.lock_file();
    let guard = match fs.lock(&path, false).at("lock", &path)? {
        Some(g) => g,
        None if wait => {
            on_wait();
            fs.lock(&path, true)
                .at("lock", &path)?
                .ok_or_else(|| Error::Locked {
                    dir: layout.root.clone(),
                    holder: holder(fs, layout),
                })?
        }
        None => {
            return Err(Error::Locked {
                dir: layout.root.clone(),
                holder: holder(fs, layout),
            })
        }
    };
    // Record who we are. Not synced: it only matters while we live.
    let mut f = fs.create(&path).at("write", &path)?;
    writeln!(f, "{}\n{}", std::process::id(), command).at("write", &path)?;
    Ok(DirLock { _guard: guard })
}
