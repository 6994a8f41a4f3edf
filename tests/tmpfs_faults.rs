//! A full disk, for real (issue 15): the `stack` binary on a size-limited tmpfs,
//! swept over fill levels under every link mode.
//!
//! The scenario: packages `p1` {a, b} and `p2` {a}, tables of 100 kB, then
//! the same stack with tables of 200 kB, on a 1 MiB tmpfs. At each fill level the
//! second pull either succeeds (the new stack) or fails with exit 1 naming how much
//! it needed and how much was free; either way the directory is entirely the old
//! or the new stack right when the command returns (`verify --contents` clean, and
//! every table the same version), nothing but partial downloads is left in
//! `.stack/`, and once space is freed the pull goes through.
//!
//! Mounting needs root: without it the test prints why and passes.

#![allow(clippy::disallowed_methods)] // fixtures fill and inspect a real filesystem

#[path = "cli/support.rs"]
mod support;

use std::path::{Path, PathBuf};

use stack::fs::{Fs, RealFs};
use support::*;

struct Tmpfs {
    _parent: tempfile::TempDir,
    mount: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let parent = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mount = parent.path().join("mnt");
        std::fs::create_dir(&mount).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mount)
            .output()
            .map_err(|e| format!("cannot run mount(8): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed (needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            _parent: parent,
            mount,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.mount)
            .status();
    }
}

/// The fill levels' step.
const STEP: u64 = 40 * 1024;

fn tables(kb: usize, version: u8) -> Vec<T> {
    let body = |tag: u8| vec![b'a' + tag + version; kb * 1000];
    vec![
        t("tbl_a", "a", Some("p1"), &body(0)),
        t("tbl_b", "b", Some("p1"), &body(1)),
        t("tbl_a", "a", Some("p2"), &body(0)),
    ]
}

fn free(dir: &Path) -> u64 {
    RealFs.free_space(dir).unwrap().unwrap()
}

/// Which version every table file of the stack holds: `Some(v)` if all agree.
fn version_of(dir: &Path) -> Option<u8> {
    let mut seen = None;
    for rel in [
        "data/p1/a.parquet",
        "data/p1/b.parquet",
        "data/p2/a.parquet",
    ] {
        let bytes = std::fs::read(dir.join(rel)).ok()?;
        let tag = *bytes.first()?;
        let v = tag
            - if rel.ends_with("b.parquet") {
                b'b'
            } else {
                b'a'
            };
        if *seen.get_or_insert(v) != v {
            return None;
        }
    }
    seen
}

/// What a failed pull may leave in `.stack/`.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let private = dir.join(".stack");
    for name in ["tmp", "trash", "reserve"] {
        let p = private.join(name);
        if p.exists() && std::fs::read_dir(&p).map_or(true, |mut d| d.next().is_some()) {
            out.push(name.to_string());
        }
    }
    if let Ok(rd) = std::fs::read_dir(private.join("staging")) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if !n.ends_with(".part") {
                out.push(format!("staging/{n}"));
            }
        }
    }
    out
}

/// Pull `manifest` (version 1) into `dir` (version 0): `true` if it succeeded.
/// Either way the stack is entirely one version and verifies, and a refusal names
/// what was needed and free and gives the space back.
fn all_or_nothing(dir: &Path, manifest: &Path, link: &str, what: &str) -> bool {
    let before = version_of(dir);
    let r = pull(manifest, dir, &["--link", link]);
    let ok = match r.code {
        0 => {
            assert_eq!(version_of(dir), Some(1), "{what}: {r:?}");
            true
        }
        1 => {
            assert!(
                r.stderr.contains("needs") && r.stderr.contains("free"),
                "{what}: the message names what was needed and free: {r:?}"
            );
            assert_eq!(version_of(dir), before, "{what}: {r:?}");
            let left = leftovers(dir);
            assert!(left.is_empty(), "{what}: space not given back: {left:?}");
            false
        }
        _ => panic!("{what}: {r:?}"),
    };
    assert_verify_clean(dir);
    ok
}

#[test]
fn a_full_tmpfs_is_all_or_nothing_at_every_fill_level_and_link_mode() {
    let probe = match Tmpfs::mount("1m") {
        Ok(t) => t,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    drop(probe);
    let old = Origin::new(&tables(100, 0), &[]);
    let new = Origin::new(&tables(200, 1), &[]);
    let sized = new.manifest();
    let mut m = new.manifest_value(&tables(200, 1), &[]);
    for p in m["data_packages"].as_array_mut().unwrap() {
        for t in p["tables"].as_array_mut().unwrap() {
            t.as_object_mut().unwrap().remove("size");
        }
    }
    let sizeless = new.write_manifest(&m, "unsized.json");
    let (mut runs, mut failed, mut succeeded) = (0, 0, 0);
    for link in ["auto", "symlink", "hardlink", "copy", "reflink"] {
        let mut fill = 0u64;
        loop {
            let fs = Tmpfs::mount("1m").unwrap();
            let dir = fs.mount.join("stack");
            pull(&old.manifest(), &dir, &["--link", link]).ok();
            assert_eq!(version_of(&dir), Some(0), "{link}: setup");
            let room = free(&fs.mount);
            if fill > room {
                break;
            }
            std::fs::write(fs.mount.join("filler"), vec![0u8; fill as usize]).unwrap();
            // Sizes in the manifest (the refusal comes before anything is
            // written) at one level, none (the disk fills mid-pull) at the next.
            let (manifest, sizes) = if (fill / STEP).is_multiple_of(2) {
                (&sized, "sizes")
            } else {
                (&sizeless, "no sizes")
            };
            let what = format!("{link}, {sizes}, {fill} bytes filled of {room} free");
            runs += 1;
            if all_or_nothing(&dir, manifest, link, &what) {
                succeeded += 1;
            } else {
                failed += 1;
            }
            // Space freed: the pull goes through, or (copy modes, whose new stack
            // and old one do not fit side by side) is refused as cleanly.
            std::fs::remove_file(fs.mount.join("filler")).unwrap();
            all_or_nothing(&dir, manifest, link, &format!("{what}, then freed"));
            fill += STEP;
        }
    }
    eprintln!(
        "tmpfs sweep: {runs} pulls on a full disk ({succeeded} succeeded, {failed} refused for lack of space), all entirely old or new"
    );
    assert!(failed > 0 && succeeded > 0, "the sweep must cross the edge");
}
