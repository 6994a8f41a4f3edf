//! The simulator against its documented model: crash injection, durability by
//! sync, and every power-loss mode.

use super::*;
use crate::error::is_crash_io;

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

/// Create (or truncate) `path`, write `bytes`, fdatasync if asked.
fn put(fs: &SimFs, path: &str, bytes: &[u8], sync: bool) -> io::Result<()> {
    let mut f = fs.create(&p(path))?;
    f.write_all(bytes)?;
    if sync {
        f.sync()?;
    }
    Ok(())
}

fn file(bytes: &[u8]) -> SnapEntry {
    SnapEntry::File {
        bytes: bytes.to_vec(),
        readonly: false,
    }
}

fn at(fs: &SimFs, path: &str) -> Option<SnapEntry> {
    fs.snapshot().get(&p(path)).cloned()
}

#[test]
fn rename_is_atomic_after_pessimistic_loss() {
    let fs = SimFs::new();
    fs.write_file("/sim/a", b"old").unwrap();
    put(&fs, "/sim/tmp", b"new", true).unwrap();
    fs.rename(&p("/sim/tmp"), &p("/sim/a")).unwrap();
    assert_eq!(at(&fs, "/sim/a"), Some(file(b"new")));

    let lost = fs.reboot(Crash::PowerLossPessimistic);
    assert_eq!(at(&lost, "/sim/a"), Some(file(b"old")));
    assert_eq!(at(&lost, "/sim/tmp"), None);

    // Whatever subset survives, `a` is entirely old or entirely new.
    let k = fs.pending_count();
    assert_eq!(k, 2, "{:?}", fs.pending());
    for mask in 0..1u64 << k {
        let got = at(&fs.reboot(Crash::PowerLossSubset(mask)), "/sim/a");
        assert!(
            got == Some(file(b"old")) || got == Some(file(b"new")),
            "mask {mask}: {got:?}"
        );
    }

    fs.sync_dir(&p("/sim")).unwrap();
    assert_eq!(fs.pending_count(), 0);
    let lost = fs.reboot(Crash::PowerLossPessimistic);
    assert_eq!(at(&lost, "/sim/a"), Some(file(b"new")));
    assert_eq!(at(&lost, "/sim/tmp"), None);
}

#[test]
fn synced_file_without_dir_sync_disappears() {
    let fs = SimFs::new();
    fs.create_dirs("/sim").unwrap();
    put(&fs, "/sim/x", b"data", true).unwrap();
    let lost = fs.reboot(Crash::PowerLossPessimistic);
    assert_eq!(at(&lost, "/sim/x"), None);
    assert_eq!(at(&lost, "/sim"), Some(SnapEntry::Dir));
    // A process crash keeps it.
    assert_eq!(
        at(&fs.reboot(Crash::Process), "/sim/x"),
        Some(file(b"data"))
    );
}

#[test]
fn sync_dir_makes_the_name_durable_not_the_contents() {
    let fs = SimFs::new();
    fs.create_dirs("/sim").unwrap();
    put(&fs, "/sim/x", b"data", false).unwrap();
    fs.sync_dir(&p("/sim")).unwrap();
    let lost = fs.reboot(Crash::PowerLossPessimistic);
    assert_eq!(at(&lost, "/sim/x"), Some(file(b"")));

    // Contents synced too: all there.
    let mut f = fs.open_append(&p("/sim/x")).unwrap();
    f.sync().unwrap();
    let lost = fs.reboot(Crash::PowerLossPessimistic);
    assert_eq!(at(&lost, "/sim/x"), Some(file(b"data")));
}

#[test]
fn a_folder_not_synced_into_its_parent_loses_its_contents() {
    let fs = SimFs::new();
    fs.create_dirs("/sim").unwrap();
    fs.create_dir(&p("/sim/d")).unwrap();
    put(&fs, "/sim/d/x", b"data", true).unwrap();
    fs.sync_dir(&p("/sim/d")).unwrap();
    let lost = fs.reboot(Crash::PowerLossPessimistic);
    assert_eq!(at(&lost, "/sim/d"), None);
    fs.sync_dir(&p("/sim")).unwrap();
    let lost = fs.reboot(Crash::PowerLossPessimistic);
    assert_eq!(at(&lost, "/sim/d/x"), Some(file(b"data")));
}

#[test]
fn fdatasync_without_dir_sync_keeps_appends_to_a_durable_file() {
    let fs = SimFs::new();
    fs.write_file("/sim/log", b"head").unwrap();
    let mut f = fs.open_append(&p("/sim/log")).unwrap();
    f.write_all(b"+one").unwrap();
    f.sync().unwrap();
    f.write_all(b"+two").unwrap();
    assert_eq!(fs.read(&p("/sim/log")).unwrap(), b"head+one+two");
    let lost = fs.reboot(Crash::PowerLossPessimistic);
    assert_eq!(lost.read(&p("/sim/log")).unwrap(), b"head+one");
    let kept = fs.reboot(Crash::PowerLossOptimistic);
    assert_eq!(kept.read(&p("/sim/log")).unwrap(), b"head+one+two");
}

#[test]
fn truncate_is_durable_on_return() {
    let fs = SimFs::new();
    fs.write_file("/sim/j", b"0123456789").unwrap();
    fs.truncate(&p("/sim/j"), 4).unwrap();
    assert_eq!(fs.pending_count(), 0);
    let lost = fs.reboot(Crash::PowerLossPessimistic);
    assert_eq!(lost.read(&p("/sim/j")).unwrap(), b"0123");
}

#[test]
fn hard_links_share_contents() {
    let fs = SimFs::new();
    fs.write_file("/sim/a", b"one").unwrap();
    fs.hard_link(&p("/sim/a"), &p("/sim/b")).unwrap();
    let (ma, mb) = (
        fs.metadata(&p("/sim/a")).unwrap(),
        fs.metadata(&p("/sim/b")).unwrap(),
    );
    assert_eq!(ma.ino, mb.ino);
    let mut f = fs.open_append(&p("/sim/b")).unwrap();
    f.write_all(b"+two").unwrap();
    assert_eq!(fs.read(&p("/sim/a")).unwrap(), b"one+two");
    fs.remove_file(&p("/sim/a")).unwrap();
    assert_eq!(fs.read(&p("/sim/b")).unwrap(), b"one+two");
    // The open handle still writes into the inode.
    f.write_all(b"+3").unwrap();
    assert_eq!(fs.read(&p("/sim/b")).unwrap(), b"one+two+3");
    assert_eq!(
        fs.hard_link(&p("/sim/b"), &p("/sim/b")).unwrap_err().kind(),
        io::ErrorKind::AlreadyExists
    );
}

#[test]
fn symlinks_follow_relative_targets() {
    let fs = SimFs::new();
    fs.write_file("/sim/data/_shared/tbl_a.parquet", b"PAR1")
        .unwrap();
    fs.create_dirs("/sim/data/p1").unwrap();
    let link = p("/sim/data/p1/a.parquet");
    fs.symlink(&p("../_shared/tbl_a.parquet"), &link).unwrap();
    assert_eq!(fs.read(&link).unwrap(), b"PAR1");
    assert_eq!(fs.metadata(&link).unwrap().kind, Kind::File);
    assert_eq!(fs.symlink_metadata(&link).unwrap().kind, Kind::Symlink);
    assert_eq!(fs.read_link(&link).unwrap(), p("../_shared/tbl_a.parquet"));
    let listing = fs.read_dir(&p("/sim/data")).unwrap();
    let names: Vec<_> = listing.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["_shared", "p1"]);

    // `..` after a symlinked folder is physical, as in the kernel.
    fs.symlink(&p("data/_shared"), &p("/sim/sh")).unwrap();
    fs.write_file("/sim/data/marker", b"m").unwrap();
    assert_eq!(fs.read(&p("/sim/sh/../marker")).unwrap(), b"m");

    // A dangling symlink exists but cannot be followed.
    fs.remove_file(&p("/sim/data/_shared/tbl_a.parquet"))
        .unwrap();
    assert_eq!(
        fs.metadata(&link).unwrap_err().kind(),
        io::ErrorKind::NotFound
    );
    assert!(fs.exists(&link).unwrap());

    // Loops are reported, not followed forever.
    fs.symlink(&p("loop"), &p("/sim/loop")).unwrap();
    assert!(fs.metadata(&p("/sim/loop")).is_err());
}

/// A small workload touching every kind of mutation; returns its first error.
fn workload(fs: &SimFs) -> io::Result<()> {
    fs.create_dir_all(&p("/sim/d/e"))?;
    put(fs, "/sim/d/tmp", b"hello", true)?;
    fs.set_readonly(&p("/sim/d/tmp"), true)?;
    fs.rename(&p("/sim/d/tmp"), &p("/sim/d/e/final"))?;
    fs.hard_link(&p("/sim/d/e/final"), &p("/sim/d/hl"))?;
    fs.symlink(&p("e/final"), &p("/sim/d/sl"))?;
    fs.sync_dir(&p("/sim/d/e"))?;
    let mut f = fs.open_append(&p("/sim/log"))?;
    f.write_all(b"a")?;
    f.sync()?;
    f.write_all(b"b")?;
    drop(f);
    fs.create_dir(&p("/sim/gone"))?;
    fs.remove_dir(&p("/sim/gone"))?;
    fs.remove_file(&p("/sim/d/hl"))?;
    fs.rename(&p("/sim/d"), &p("/sim/moved"))?;
    fs.sync_dir(&p("/sim"))?;
    put(fs, "/sim/moved/late", b"late", false)?;
    Ok(())
}

#[test]
fn crash_after_fails_every_later_call() {
    let fs = SimFs::new();
    fs.create_dirs("/sim").unwrap();
    workload(&fs).unwrap();
    let n = fs.ops();
    assert!(n > 15, "{n}");
    for k in 0..=n {
        let fs = SimFs::new();
        fs.create_dirs("/sim").unwrap();
        fs.crash_after(k);
        let r = workload(&fs);
        if k == n {
            assert!(r.is_ok() && !fs.is_crashed());
            continue;
        }
        let e = r.unwrap_err();
        assert!(is_crash_io(&e), "k={k}: {e}");
        assert!(fs.is_crashed());
        assert_eq!(fs.ops(), k);
        // Reads fail too, and nothing changes any more.
        let before = fs.snapshot();
        let e = fs.read_dir(&p("/")).unwrap_err();
        assert!(is_crash_io(&e));
        assert!(is_crash_io(&fs.create_dir(&p("/x")).unwrap_err()));
        assert_eq!(fs.snapshot(), before);
        assert_eq!(fs.ops(), k);
        // Every reboot is usable again.
        let up = fs.reboot(Crash::PowerLossPessimistic);
        assert!(up.read_dir(&p("/sim")).is_ok());
        assert_eq!(up.ops(), 0);
    }
}

#[test]
fn open_handles_fail_after_the_crash() {
    let fs = SimFs::new();
    fs.write_file("/sim/f", b"abc").unwrap();
    let mut r = fs.open_read(&p("/sim/f")).unwrap();
    let mut w = fs.open_append(&p("/sim/f")).unwrap();
    fs.crash_after(0);
    assert!(is_crash_io(&w.write(b"x").unwrap_err()));
    assert!(is_crash_io(&w.sync().unwrap_err()));
    let mut buf = [0u8; 3];
    assert!(is_crash_io(&r.read(&mut buf).unwrap_err()));
}

#[test]
fn optimistic_replay_equals_the_live_image() {
    let fs = SimFs::new();
    fs.create_dirs("/sim").unwrap();
    workload(&fs).unwrap();
    let live = fs.snapshot();
    assert_eq!(fs.reboot(Crash::PowerLossOptimistic).snapshot(), live);
    assert_eq!(fs.reboot(Crash::Process).snapshot(), live);
    let all = (1u64 << fs.pending_count()) - 1;
    assert_eq!(fs.reboot(Crash::PowerLossSubset(all)).snapshot(), live);
    assert_eq!(
        live.get(&p("/sim/moved/e/final")),
        Some(&SnapEntry::File {
            bytes: b"hello".to_vec(),
            readonly: true
        })
    );
    assert_eq!(
        live.get(&p("/sim/moved/sl")),
        Some(&SnapEntry::Symlink {
            target: p("e/final")
        })
    );
    assert_eq!(live.get(&p("/sim/log")), Some(&file(b"ab")));
}

#[test]
fn subsets_enumerate_at_most_two_to_the_k_images() {
    let fs = SimFs::new();
    fs.create_dirs("/sim").unwrap();
    workload(&fs).unwrap();
    let k = fs.pending_count();
    assert!((1..=12).contains(&k), "{k}: {:?}", fs.pending());
    let mut images = BTreeSet::new();
    for mask in 0..1u64 << k {
        let up = fs.reboot(Crash::PowerLossSubset(mask));
        assert_eq!(up.pending_count(), 0);
        // Every rebuilt tree is consistent enough to walk and list.
        up.remove_tree(&p("/sim")).unwrap();
        images.insert(format!(
            "{:?}",
            fs.reboot(Crash::PowerLossSubset(mask)).snapshot()
        ));
    }
    assert!(images.len() <= 1 << k);
    assert!(images.len() > 1);
    assert!(images.contains(&format!("{:?}", fs.durable_snapshot())));
    assert!(images.contains(&format!("{:?}", fs.snapshot())));
    // Seeded random subsets are reproducible.
    assert_eq!(
        fs.reboot(Crash::PowerLossRandom(7)).snapshot(),
        fs.reboot(Crash::PowerLossRandom(7)).snapshot()
    );
}

#[test]
fn durable_rename_of_a_temp_in_an_unsynced_folder_survives() {
    // The engine's atomic-replace idiom: temp in .stack/tmp (whose own mkdir
    // is never synced), fsync, rename into place, fsync the destination.
    let fs = SimFs::new();
    fs.write_file("/sim/state.json", b"v1").unwrap();
    fs.create_dir_all(&p("/sim/.stack/tmp")).unwrap();
    put(&fs, "/sim/.stack/tmp/state.tmp", b"v2", true).unwrap();
    fs.rename(&p("/sim/.stack/tmp/state.tmp"), &p("/sim/state.json"))
        .unwrap();
    fs.sync_dir(&p("/sim")).unwrap();
    let lost = fs.reboot(Crash::PowerLossPessimistic);
    assert_eq!(lost.read(&p("/sim/state.json")).unwrap(), b"v2");
}

#[test]
fn process_crash_keeps_pending_work_pending() {
    let fs = SimFs::new();
    fs.create_dirs("/sim").unwrap();
    put(&fs, "/sim/x", b"x", false).unwrap();
    let after_kill = fs.reboot(Crash::Process);
    assert_eq!(after_kill.read(&p("/sim/x")).unwrap(), b"x");
    assert_eq!(after_kill.pending_count(), fs.pending_count());
    let lost = after_kill.reboot(Crash::PowerLossPessimistic);
    assert_eq!(at(&lost, "/sim/x"), None);
}

#[test]
fn posix_errors_and_rules() {
    let fs = SimFs::new();
    fs.write_file("/sim/d/f", b"f").unwrap();
    fs.create_dirs("/sim/e").unwrap();
    let kind = |r: io::Result<()>| r.unwrap_err().kind();
    assert_eq!(
        kind(fs.remove_dir(&p("/sim/d"))),
        io::ErrorKind::DirectoryNotEmpty
    );
    assert_eq!(
        kind(fs.create_dir(&p("/sim/d"))),
        io::ErrorKind::AlreadyExists
    );
    assert_eq!(
        kind(fs.create_dir(&p("/sim/no/x"))),
        io::ErrorKind::NotFound
    );
    assert_eq!(
        kind(fs.remove_file(&p("/sim/d"))),
        io::ErrorKind::IsADirectory
    );
    assert_eq!(
        kind(fs.remove_dir(&p("/sim/d/f"))),
        io::ErrorKind::NotADirectory
    );
    assert_eq!(
        kind(fs.remove_file(&p("/sim/nope"))),
        io::ErrorKind::NotFound
    );
    assert_eq!(
        kind(fs.rename(&p("/sim/e"), &p("/sim/d"))),
        io::ErrorKind::DirectoryNotEmpty
    );
    assert_eq!(
        kind(fs.rename(&p("/sim/d"), &p("/sim/d/f/x"))),
        io::ErrorKind::NotADirectory
    );
    assert_eq!(
        kind(fs.rename(&p("/sim/d"), &p("/sim/d/sub"))),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(fs.create_dir(&p("relative"))),
        io::ErrorKind::InvalidInput
    );
    // A folder moves over an empty folder, with its contents.
    fs.rename(&p("/sim/d"), &p("/sim/e")).unwrap();
    assert_eq!(fs.read(&p("/sim/e/f")).unwrap(), b"f");
    assert!(!fs.exists(&p("/sim/d")).unwrap());

    // Read-only files refuse writers unless enforcement is off.
    fs.set_readonly(&p("/sim/e/f"), true).unwrap();
    assert!(fs.metadata(&p("/sim/e/f")).unwrap().readonly);
    assert_eq!(
        fs.create(&p("/sim/e/f")).err().map(|e| e.kind()),
        Some(io::ErrorKind::PermissionDenied)
    );
    // ...but can be replaced by rename or removed.
    fs.write_file("/sim/g", b"g").unwrap();
    fs.rename(&p("/sim/g"), &p("/sim/e/f")).unwrap();
    assert!(!fs.metadata(&p("/sim/e/f")).unwrap().readonly);
    fs.set_readonly(&p("/sim/e/f"), true).unwrap();
    fs.set_enforce_readonly(false);
    put(&fs, "/sim/e/f", b"root", false).unwrap();
    assert_eq!(fs.read(&p("/sim/e/f")).unwrap(), b"root");

    // Reflink: unsupported by default, a copy into a new inode when enabled.
    assert_eq!(
        kind(fs.reflink(&p("/sim/e/f"), &p("/sim/r"))),
        io::ErrorKind::Unsupported
    );
    fs.set_reflink(true);
    fs.reflink(&p("/sim/e/f"), &p("/sim/r")).unwrap();
    assert_eq!(fs.read(&p("/sim/r")).unwrap(), b"root");
    assert_ne!(
        fs.metadata(&p("/sim/r")).unwrap().ino,
        fs.metadata(&p("/sim/e/f")).unwrap().ino
    );
    assert_eq!(
        kind(fs.reflink(&p("/sim/e/f"), &p("/sim/r"))),
        io::ErrorKind::AlreadyExists
    );

    // Locks always succeed and create their file.
    assert!(fs.lock(&p("/sim/lock"), false).unwrap().is_some());
    assert!(fs.lock(&p("/sim/lock"), false).unwrap().is_some());
    assert!(fs.exists(&p("/sim/lock")).unwrap());

    // mtime moves on every write.
    let m1 = fs.metadata(&p("/sim/r")).unwrap().mtime_ns;
    let mut f = fs.open_append(&p("/sim/r")).unwrap();
    f.write_all(b"!").unwrap();
    assert!(fs.metadata(&p("/sim/r")).unwrap().mtime_ns > m1);
    assert!(!fs.op_log().is_empty());
}

#[test]
fn usable_from_several_threads() {
    let fs = SimFs::new();
    fs.create_dirs("/sim").unwrap();
    let shared: Arc<dyn Fs> = Arc::new(fs.clone());
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let fs = Arc::clone(&shared);
            std::thread::spawn(move || {
                for j in 0..20 {
                    let path = PathBuf::from(format!("/sim/t{i}-{j}"));
                    let mut f = fs.create(&path).unwrap();
                    f.write_all(b"x").unwrap();
                    f.sync().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(fs.read_dir(&p("/sim")).unwrap().len(), 80);
    assert_eq!(fs.ops(), 4 * 20 * 3);
}

/// `rename_noreplace` never replaces: a taken name fails with `AlreadyExists`
/// and changes nothing (a counted operation all the same); a free name is
/// taken as by `rename`, and as atomically after a power loss.
#[test]
fn rename_noreplace_refuses_a_taken_name_and_changes_nothing() {
    let fs = SimFs::new();
    fs.write_file("/sim/mine", b"the user's").unwrap();
    fs.write_file("/sim/tmp", b"new").unwrap();
    let before = fs.ops();
    let e = fs
        .rename_noreplace(&p("/sim/tmp"), &p("/sim/mine"))
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
    assert_eq!(fs.ops() - before, 1);
    assert_eq!(at(&fs, "/sim/mine"), Some(file(b"the user's")));
    assert_eq!(at(&fs, "/sim/tmp"), Some(file(b"new")));
    fs.rename_noreplace(&p("/sim/tmp"), &p("/sim/free"))
        .unwrap();
    assert_eq!(at(&fs, "/sim/free"), Some(file(b"new")));
    assert_eq!(at(&fs, "/sim/tmp"), None);
    let lost = fs.reboot(Crash::PowerLossPessimistic);
    assert_eq!(at(&lost, "/sim/tmp"), Some(file(b"new")));
    assert_eq!(at(&lost, "/sim/free"), None);
}

/// A hook set by `before_each_op` runs before each counted mutation with its
/// description, and may change the filesystem (a user acting in between).
#[test]
fn a_hook_runs_before_each_mutation_and_may_mutate() {
    let fs = SimFs::new();
    fs.create_dirs("/sim").unwrap();
    let user = fs.clone();
    fs.before_each_op(move |desc| {
        if desc.starts_with("rename_noreplace") {
            user.write_file("/sim/b", b"the user's").unwrap();
        }
    });
    put(&fs, "/sim/a", b"new", false).unwrap();
    let e = fs.rename_noreplace(&p("/sim/a"), &p("/sim/b")).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
    assert_eq!(at(&fs, "/sim/b"), Some(file(b"the user's")));
}
