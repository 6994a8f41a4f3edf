//! `sync_state.json`, the file: the projection of the journal (contract §3), read
//! back and replaced.
//!
//! Owns: reading the state file and its atomic replacement; the value it holds is
//! the model's ([`crate::model::state`], whose names are re-exported here). Invariant
//! kept: the file is only ever replaced whole (temp file, fsync, rename, fsync
//! folder), and it is never the source of truth: `replay::project` can always
//! rebuild it from the journal.
//!
//! The file (format 2) names every path absolutely, under the `root` it was
//! projected for: the directory's canonical path when it was written
//! ([`projected_root`]). A file projected for another place (the directory moved)
//! is not this directory's projection: [`read_state`] refuses it as unreadable, so
//! recovery rewrites it. A format-1 file, whose paths are relative, is still read.

use std::io::Write;

use crate::error::{Error, IoContext, Result};
use crate::fs::Fs;
use crate::layout::Layout;
pub use crate::model::state::{
    parse_state, parse_state_file, DomainEntry, JournalEnd, JournalPos, Md5Sum, Pulled, SafeName,
    StatFp, StateFile, Strategy, SyncState, TableEntry, STATE_FILE_VERSION, STATE_VERSION,
};
use crate::model::state::{state_file_from_reader, FileOut};

/// Read `sync_state.json`, projected for this directory where it is now.
/// `Ok(None)` if it does not exist; `Err(State)` if it exists but is not a state
/// this build understands, or was projected for another place (the directory was
/// moved since): the caller rebuilds it.
pub fn read_state(fs: &dyn Fs, layout: &Layout) -> Result<Option<SyncState>> {
    let Some(file) = read_state_file(fs, layout)? else {
        return Ok(None);
    };
    if let Some(written) = &file.root {
        let here = projected_root(fs, layout);
        if *written != here {
            return Err(Error::State {
                path: layout.state_file(),
                message: format!("it was projected for {written}, and the directory is now {here}"),
            });
        }
    }
    Ok(Some(file.state))
}

/// Read `sync_state.json` wherever it was projected (see [`read_state`]).
pub fn read_state_file(fs: &dyn Fs, layout: &Layout) -> Result<Option<StateFile>> {
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
    let read = if len <= WHOLE_STATE_MAX {
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
        parse_state_file(&bytes).map_err(unreadable)?
    } else {
        // A very large stack: streamed, so that its text and its structs are not
        // held at once (each table map is built whole, `TablesSeed`).
        let reader = std::io::BufReader::with_capacity(256 * 1024, file);
        state_file_from_reader(reader).map_err(|e| {
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
        })?
    };
    let known = match read.version {
        1 => true,
        STATE_FILE_VERSION => read.root.is_some(),
        _ => false,
    };
    if !known {
        return Err(Error::State {
            path,
            message: format!(
                "state version {} is not one this build reads (1, or {STATE_FILE_VERSION} with a root)",
                read.version
            ),
        });
    }
    Ok(Some(read))
}

/// State files up to this size are read whole and parsed in parallel; larger ones
/// are streamed (memory before speed: about 25,000 references).
const WHOLE_STATE_MAX: u64 = 8 << 20;

/// The root this directory's state file is projected for, as the file names it:
/// the directory's canonical path (its absolute path if it cannot be resolved).
pub fn projected_root(fs: &dyn Fs, layout: &Layout) -> String {
    let root = fs
        .canonicalize(&layout.root)
        .or_else(|_| std::path::absolute(&layout.root))
        .unwrap_or_else(|_| layout.root.clone());
    root.to_string_lossy().into_owned()
}

/// Replace `sync_state.json` atomically: temp file in `.stack/tmp`, fsync, rename,
/// fsync the local directory. Compact JSON with a final newline (it is read by
/// every command; `jq .` shows it pretty). Its paths are absolute, projected for
/// where the directory is now ([`projected_root`]).
pub fn write_state(fs: &dyn Fs, layout: &Layout, state: &SyncState) -> Result<()> {
    let root = projected_root(fs, layout);
    let tmp_dir = layout.tmp();
    fs.create_dir_all(&tmp_dir).at("mkdir", &tmp_dir)?;
    let tmp = tmp_dir.join("sync_state.json.tmp");
    let f = fs.create(&tmp).at("create", &tmp)?;
    // Streamed: a large stack's state is not held twice (structs and bytes).
    let mut w = std::io::BufWriter::with_capacity(256 * 1024, f);
    let file = FileOut { root: &root, state };
    serde_json::to_writer(&mut w, &file)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::slot::SlotRef;

    /// A state with one direct table, one package table and one domain.
    fn sample() -> SyncState {
        let entry = |slot: SlotRef<'_>, r: &str| {
            TableEntry::new(
                "a".try_into().unwrap(),
                Md5Sum::parse("0123456789abcdef0123456789abcdef").unwrap(),
                None,
                Strategy::Symlink,
            )
            .with_paths((slot, "tbl_a"), r, "data/_shared/tbl_a.parquet")
        };
        let mut s = SyncState::default();
        let direct = entry(SlotRef::Direct, "data/_direct/a.parquet");
        s.direct_tables.insert("tbl_a".try_into().unwrap(), direct);
        let pkg = entry(
            SlotRef::Package(&"p1".try_into().unwrap()),
            "data/p1/a.parquet",
        );
        s.data_packages
            .entry("p1".try_into().unwrap())
            .or_default()
            .insert("tbl_a".try_into().unwrap(), pkg);
        s.journal.txn = 3;
        s.journal.seq = 9;
        s.memory_domains.insert(
            "m".try_into().unwrap(),
            DomainEntry {
                md5: "0123456789abcdef0123456789abcdef".try_into().unwrap(),
                path: "memory/m/bundle.md".to_string(),
                fp: None,
            },
        );
        s
    }

    /// Read as a large file is (streamed, one key at a time).
    fn streamed(bytes: &[u8]) -> StateFile {
        state_file_from_reader(bytes).unwrap()
    }

    /// Contract §3: the file names absolute paths under the directory's canonical
    /// path (reached here through a symlink), and reads back to the same state,
    /// whole or streamed.
    #[test]
    #[allow(clippy::disallowed_methods)] // the fixture makes, moves and writes files directly
    fn the_file_names_absolute_paths_under_its_root() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, tmp.path().join("link")).unwrap();
        let layout = Layout::new(tmp.path().join("link"));
        let fs = crate::fs::RealFs;
        write_state(&fs, &layout, &sample()).unwrap();
        let text = std::fs::read(layout.state_file()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        let root = std::fs::canonicalize(&real).unwrap();
        let root = root.to_str().unwrap();
        assert_eq!(v["version"], 2);
        assert_eq!(v["root"], root);
        let at = |rel: &str| format!("{root}/{rel}");
        let direct = &v["direct_tables"]["tbl_a"];
        assert_eq!(direct["ref_path"], at("data/_direct/a.parquet"));
        assert_eq!(direct["shared_path"], at("data/_shared/tbl_a.parquet"));
        let pkg = &v["data_packages"]["p1"]["tbl_a"];
        assert_eq!(pkg["ref_path"], at("data/p1/a.parquet"));
        assert_eq!(v["memory_domains"]["m"]["path"], at("memory/m/bundle.md"));
        assert_eq!(read_state(&fs, &layout).unwrap(), Some(sample()));
        let whole = parse_state_file(&text).unwrap();
        assert_eq!(whole.state, sample());
        assert_eq!(whole.root.as_deref(), Some(root));
        assert_eq!(streamed(&text), whole);
        // Keys in another order (the root last): the same state.
        let mut reordered = serde_json::Map::new();
        for k in [
            "memory_domains",
            "data_packages",
            "direct_tables",
            "journal",
        ] {
            reordered.insert(k.to_string(), v[k].clone());
        }
        reordered.insert("root".to_string(), v["root"].clone());
        reordered.insert("version".to_string(), v["version"].clone());
        let reordered = serde_json::to_vec(&reordered).unwrap();
        assert_eq!(streamed(&reordered), whole);
        assert_eq!(parse_state_file(&reordered).unwrap(), whole);
    }

    /// A file projected for another place (the directory was moved) is not this
    /// directory's projection: unreadable for `read_state`, which recovery then
    /// rewrites; `read_state_file` still reads it. A path outside the root is
    /// kept as it is (not the engine's: `check_paths` refuses it).
    #[test]
    #[allow(clippy::disallowed_methods)] // the fixture makes, moves and writes files directly
    fn a_moved_directory_is_not_its_old_projection() {
        let tmp = tempfile::tempdir().unwrap();
        let old = tmp.path().join("old");
        std::fs::create_dir(&old).unwrap();
        let fs = crate::fs::RealFs;
        write_state(&fs, &Layout::new(&old), &sample()).unwrap();
        let new = tmp.path().join("new");
        std::fs::rename(&old, &new).unwrap();
        let layout = Layout::new(&new);
        let err = read_state(&fs, &layout).unwrap_err();
        assert!(matches!(err, Error::State { .. }), "{err}");
        assert!(err.to_string().contains(old.to_str().unwrap()), "{err}");
        let file = read_state_file(&fs, &layout).unwrap().unwrap();
        assert_eq!(file.state, sample());
        let text = std::fs::read_to_string(layout.state_file()).unwrap();
        let elsewhere = text.replacen(
            &format!("{}/data/p1/a.parquet", old.display()),
            "/elsewhere/data/p1/a.parquet",
            1,
        );
        let s = parse_state(elsewhere.as_bytes()).unwrap();
        assert!(!s.data_packages["p1"]["tbl_a"].has_own_paths());
        assert!(s.check_paths().is_err());
    }

    /// A version-1 file (relative paths, no root) is still read, wherever the
    /// directory is; an unknown version, or a version 2 without a root, is not.
    #[test]
    #[allow(clippy::disallowed_methods)] // the fixture makes, moves and writes files directly
    fn version_one_files_are_still_read() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path());
        let fs = crate::fs::RealFs;
        let v1 = serde_json::to_vec(&sample()).unwrap();
        assert!(String::from_utf8_lossy(&v1).contains(r#""version":1,"#));
        std::fs::write(layout.state_file(), &v1).unwrap();
        assert_eq!(read_state(&fs, &layout).unwrap(), Some(sample()));
        for bad in [r#"{"version":2}"#, r#"{"version":3,"root":"/x"}"#] {
            std::fs::write(layout.state_file(), bad).unwrap();
            let err = read_state(&fs, &layout).unwrap_err();
            assert!(err.to_string().contains("state version"), "{err}");
        }
    }
}
