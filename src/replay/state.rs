//! `sync_state.json`, the file: the projection of the journal (contract §3), read
//! back and replaced.
//!
//! Owns: reading the state file and its atomic replacement; the value it holds is
//! the model's ([`crate::model::state`], whose names are re-exported here). Invariant
//! kept: the file is only ever replaced whole (temp file, fsync, rename, fsync
//! folder), and it is never the source of truth: `replay::project` can always
//! rebuild it from the journal.

use std::io::Write;

use crate::error::{Error, IoContext, Result};
use crate::fs::Fs;
use crate::layout::Layout;
pub use crate::model::state::{
    parse_state, DomainEntry, JournalEnd, JournalPos, Md5Sum, Pulled, StatFp, Strategy, SyncState,
    TableEntry, STATE_VERSION,
};

/// Read `sync_state.json`. `Ok(None)` if it does not exist; `Err(State)` if it
/// exists but is not a state this build understands (the caller rebuilds it).
pub fn read_state(fs: &dyn Fs, layout: &Layout) -> Result<Option<SyncState>> {
    let path = layout.state_file();
    let unreadable = |e: serde_json::Error| Error::State {
        path: path.clone(),
        message: format!("unreadable state file: {e}"),
    };
    let file = match fs.open_read(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).at("read", &path),
    };
    let len = fs.metadata(&path).map(|m| m.len).unwrap_or(u64::MAX);
    let state = if len <= WHOLE_STATE_MAX {
        // Read whole, then parsed from the slice, its maps on several threads
        // (`parse_state`): a no-op pull of a usual stack is mostly this and stats.
        let mut bytes = Vec::with_capacity(len as usize + 1);
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, WHOLE_STATE_MAX + 1),
            &mut bytes,
        )
        .at("read", &path)?;
        if bytes.len() as u64 > WHOLE_STATE_MAX {
            // Not a regular file of the size it said (a device, a file growing):
            // unreadable, and rebuilt from the journal, rather than read forever.
            return Err(Error::State {
                path,
                message: "unreadable state file: it is larger than its size".to_string(),
            });
        }
        parse_state(&bytes).map_err(unreadable)?
    } else {
        // A very large stack: streamed, so that its text and its structs are not
        // held at once (each table map is built whole, `TablesSeed`).
        let reader = std::io::BufReader::with_capacity(256 * 1024, file);
        let state: SyncState = serde_json::from_reader(reader).map_err(|e| {
            if e.is_io() {
                // A disk that fails a read is an I/O error, never an unreadable state.
                Error::Io {
                    op: "read",
                    path: path.clone(),
                    source: e.into(),
                }
            } else {
                unreadable(e)
            }
        })?;
        state
    };
    if state.version != STATE_VERSION {
        return Err(Error::State {
            path,
            message: format!("state version {} is not {}", state.version, STATE_VERSION),
        });
    }
    Ok(Some(state))
}

/// State files up to this size are read whole and parsed in parallel; larger ones
/// are streamed (memory before speed: about 25,000 references).
const WHOLE_STATE_MAX: u64 = 8 << 20;

/// Replace `sync_state.json` atomically: temp file in `.stack/tmp`, fsync, rename,
/// fsync the local directory. Compact JSON with a final newline (it is read by
/// every command; `jq .` shows it pretty).
pub fn write_state(fs: &dyn Fs, layout: &Layout, state: &SyncState) -> Result<()> {
    let tmp_dir = layout.tmp();
    fs.create_dir_all(&tmp_dir).at("mkdir", &tmp_dir)?;
    let tmp = tmp_dir.join("sync_state.json.tmp");
    let f = fs.create(&tmp).at("create", &tmp)?;
    // Streamed: a large stack's state is not held twice (structs and bytes).
    let mut w = std::io::BufWriter::with_capacity(256 * 1024, f);
    serde_json::to_writer(&mut w, state)
        .map_err(std::io::Error::from)
        .and_then(|()| w.write_all(b"\n"))
        .at("write", &tmp)?;
    let mut f = w
        .into_inner()
        .map_err(|e| e.into_error())
        .at("write", &tmp)?;
    f.sync().at("fsync", &tmp)?;
    drop(f);
    let dst = layout.state_file();
    fs.rename(&tmp, &dst).at("rename", &dst)?;
    fs.sync_dir(&layout.root).at("fsync", &layout.root)?;
    Ok(())
}
