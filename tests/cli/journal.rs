//! Journal commands on a pulled directory: show, verify, corruption (exit 4, never
//! rewritten), torn tails (cut into journal.broken), compaction, replay.

use std::path::Path;

use serde_json::{json, Value};

use crate::forge::forge_journal;
use crate::support::*;

fn show(dir: &Path) -> Vec<Value> {
    let r = stack(&["journal", "show", "--json", "--dir", dir.to_str().unwrap()]);
    r.ok();
    let v = r.json();
    assert_eq!(v["ok"], json!(true));
    v["records"].as_array().unwrap().clone()
}

fn journal_verify(dir: &Path) -> Run {
    stack(&["journal", "verify", "--dir", dir.to_str().unwrap()])
}

/// The distinct frame offsets, in order.
fn frames(records: &[Value]) -> Vec<u64> {
    let mut out: Vec<u64> = records
        .iter()
        .map(|r| r["offset"].as_u64().unwrap())
        .collect();
    out.dedup();
    out
}

/// A stack with three pulls behind it (v1, v2, v1).
fn history() -> (Origin, Local, std::path::PathBuf) {
    let (o, l) = pulled("auto");
    let mut ts = base_tables();
    ts[2] = t("tbl_b", "b", Some("p1"), b"table b, version 2\n");
    ts.remove(4);
    let m2 = o.write(&ts, &[], "v2.json");
    pull(&m2, &l.dir(), &["--json"]).ok();
    pull(&o.manifest(), &l.dir(), &["--json"]).ok();
    (o, l, m2)
}

#[test]
fn show_lists_every_record() {
    let (_o, l) = pulled("auto");
    let records = show(&l.dir());
    assert!(records.len() >= 3);
    let mut last_seq = 0;
    for r in &records {
        for k in ["offset", "seq", "txn"] {
            assert!(r[k].is_u64(), "{k} in {r}");
        }
        assert!(r["kind"].as_str().is_some_and(|k| !k.is_empty()), "{r}");
        assert!(r["summary"].is_string(), "{r}");
        let seq = r["seq"].as_u64().unwrap();
        assert!(seq > last_seq, "seq rises: {records:?}");
        last_seq = seq;
        assert_eq!(r["txn"], json!(1));
    }
    let kinds: Vec<&str> = records
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"begin"));
    assert_eq!(kinds.last(), Some(&"committed"));
    assert!(kinds.contains(&"prepared"));
    assert_eq!(state(&l.dir())["journal"]["seq"], json!(last_seq));
    // The human listing has one line per record.
    let r = stack(&["journal", "show", "--dir", l.dir().to_str().unwrap()]);
    r.ok();
    assert_eq!(r.stdout.lines().count(), records.len());
    journal_verify(&l.dir()).ok();
}

#[test]
fn a_flipped_byte_in_the_middle_is_corruption_and_nothing_rewrites_it() {
    let (o, l) = pulled("auto");
    let dir = l.dir();
    let offs = frames(&show(&dir));
    assert!(offs.len() >= 3, "{offs:?}");
    let mid = offs[offs.len() / 2];
    let jpath = dir.join(".stack/journal");
    let mut bytes = std::fs::read(&jpath).unwrap();
    bytes[mid as usize + 12] ^= 0x40;
    std::fs::write(&jpath, &bytes).unwrap();

    let r = journal_verify(&dir);
    assert_eq!(r.code, 4, "{r:?}");
    assert!(r.stderr.contains(&format!("byte offset {mid}")), "{r:?}");
    assert!(r.stderr.contains("record"), "{r:?}");

    let before = snapshot(&dir);
    let no_lock = |s: &Snapshot| -> Snapshot {
        s.iter()
            .filter(|(p, _)| p.as_path() != Path::new(".stack/lock"))
            .map(|(p, n)| (p.clone(), n.clone()))
            .collect()
    };
    // A pull with something to do reads the whole journal before it appends, and
    // refuses. (A pull with nothing to do trusts the state file, which names the
    // journal's length, and writes nothing: it neither sees nor worsens the damage.)
    let v2 = {
        let mut ts = base_tables();
        ts[2] = t("tbl_b", "b", Some("p1"), b"table b, version 2\n");
        o.write(&ts, &base_domains(), "v2.json")
    };
    let r = pull(&v2, &dir, &["--json"]);
    let msg = r.json_error(4);
    assert!(msg.contains(&format!("byte offset {mid}")), "{msg}");
    pull(&o.manifest(), &dir, &["--json"]).ok();
    for args in [
        vec!["gc"],
        vec!["journal", "replay"],
        vec!["journal", "compact"],
    ] {
        let mut c = bin();
        c.args(&args).arg("--dir").arg(&dir);
        assert_eq!(output(c).code, 4, "{args:?}");
    }
    let r = stack(&["journal", "show", "--json", "--dir", dir.to_str().unwrap()]);
    r.json_error(4);
    // `verify` audits the stack, and names the corrupt journal beside it (exit 4),
    // though the state file it audits is intact.
    let r = stack(&["verify", "--json", "--dir", dir.to_str().unwrap()]);
    assert_eq!(r.code, 4, "{r:?}");
    let found = &r.json()["violations"];
    assert!(
        found
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["kind"] == "journal_corrupt"
                && v["message"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("byte offset {mid}"))),
        "{found}"
    );
    assert_eq!(std::fs::read(&jpath).unwrap(), bytes, "journal rewritten");
    assert_same(
        &no_lock(&before),
        &no_lock(&snapshot(&dir)),
        "corrupt journal",
    );
}

#[test]
fn a_torn_tail_is_reported_then_cut_by_the_next_pull() {
    let (o, l, _) = history();
    torn_tail(&o, &l, 3);
}

#[test]
fn a_torn_tail_after_one_pull() {
    let (o, l) = pulled("copy");
    torn_tail(&o, &l, 1);
}

fn torn_tail(o: &Origin, l: &Local, txn: u64) {
    let dir = l.dir();
    let jpath = dir.join(".stack/journal");
    let bytes = std::fs::read(&jpath).unwrap();
    let cut = bytes.len() - 3;
    std::fs::write(&jpath, &bytes[..cut]).unwrap();

    let r = journal_verify(&dir);
    r.ok();
    assert!(r.stdout.contains("torn tail"), "{r:?}");
    let r = pull(&o.manifest(), &dir, &["--json"]);
    r.ok();
    let broken = dir.join(".stack/journal.broken");
    assert!(broken.exists(), "the cut bytes are kept");
    let kept = std::fs::read(&broken).unwrap();
    assert!(
        !kept.is_empty() && bytes[..cut].ends_with(&kept),
        "journal.broken holds the cut bytes"
    );
    // The cut transaction was past its commit point: rolled forward, committed.
    let records = show(&dir);
    let last = records.last().unwrap();
    assert_eq!(last["kind"], json!("committed"));
    assert_eq!(last["txn"], json!(txn));
    assert_eq!(state(&dir)["journal"]["txn"], json!(txn));
    let r = journal_verify(&dir);
    r.ok();
    assert!(!r.stdout.contains("torn tail"), "{r:?}");
    assert_verify_clean(&dir);
}

#[test]
fn compact_shrinks_the_journal_and_pulls_go_on() {
    let (o, l, m2) = history();
    let dir = l.dir();
    let jpath = dir.join(".stack/journal");
    let size = std::fs::metadata(&jpath).unwrap().len();
    let state_before = state(&dir);
    let r = stack(&["journal", "compact", "--dir", dir.to_str().unwrap()]);
    r.ok();
    let after = std::fs::metadata(&jpath).unwrap().len();
    assert!(after < size, "{size} -> {after}");
    // One checkpoint, and the request the last pull realised (the no-op key), in
    // the checkpoint's transaction.
    let records = show(&dir);
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0]["kind"], json!("checkpoint"));
    assert_eq!(records[1]["kind"], json!("request"));
    assert_eq!(records[1]["txn"], records[0]["txn"]);
    journal_verify(&dir).ok();
    assert_verify_clean(&dir);
    let mut s = state(&dir);
    let mut b = state_before.clone();
    s["journal"] = json!(null);
    b["journal"] = json!(null);
    assert_eq!(s, b, "compaction changed the stack");

    // Replay of checkpoint + tail, and later pulls, still work.
    let r = pull(&m2, &dir, &["--json"]);
    r.ok();
    assert_eq!(counts(&r.json(), "data_packages"), [0, 1, 1, 2, 0]);
    assert_verify_clean(&dir);
    let st = std::fs::read(dir.join("sync_state.json")).unwrap();
    std::fs::remove_file(dir.join("sync_state.json")).unwrap();
    stack(&["journal", "replay", "--dir", dir.to_str().unwrap()]).ok();
    assert_eq!(std::fs::read(dir.join("sync_state.json")).unwrap(), st);
    pull(&o.manifest(), &dir, &["--json"]).ok();
    assert_verify_clean(&dir);
}

#[test]
fn replay_rebuilds_a_deleted_state_file_identically() {
    for link in ["copy", "auto"] {
        let (o, l) = pulled(link);
        let dir = l.dir();
        let mut ts = base_tables();
        ts[0].bytes = b"table a, version 2\n".to_vec();
        ts[1].bytes = ts[0].bytes.clone();
        ts[3].bytes = ts[0].bytes.clone();
        let m2 = o.write(
            &ts,
            &[("finance", b"# v2\n"), ("ops", b"# ops\n")],
            "v2.json",
        );
        pull(&m2, &dir, &["--link", link, "--json"]).ok();
        let st = std::fs::read(dir.join("sync_state.json")).unwrap();
        let tree = snapshot(&dir);
        std::fs::remove_file(dir.join("sync_state.json")).unwrap();
        // verify works without the state file (projected from the journal).
        assert_verify_clean(&dir);
        let r = stack(&["journal", "replay", "--dir", dir.to_str().unwrap()]);
        r.ok();
        let rebuilt = std::fs::read(dir.join("sync_state.json")).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&rebuilt).unwrap(),
            serde_json::from_slice::<Value>(&st).unwrap(),
            "{link}"
        );
        assert_eq!(rebuilt, st, "{link}: not byte-identical");
        assert_same(&visible(&tree), &visible(&snapshot(&dir)), "replay");
        // A garbled state file is rebuilt too.
        std::fs::write(dir.join("sync_state.json"), b"{garbage").unwrap();
        stack(&["journal", "replay", "--dir", dir.to_str().unwrap()]).ok();
        assert_eq!(std::fs::read(dir.join("sync_state.json")).unwrap(), st);
        // And a pull on a dir without a state file is a no-op.
        std::fs::remove_file(dir.join("sync_state.json")).unwrap();
        let r = pull(&m2, &dir, &["--link", link, "--json"]);
        r.ok();
        assert_eq!(counts(&r.json(), "data_packages"), [0, 0, 0, 4, 0]);
        assert_eq!(std::fs::read(dir.join("sync_state.json")).unwrap(), st);
    }
}

#[test]
fn journal_commands_on_a_dir_without_a_journal() {
    let l = Local::new();
    std::fs::create_dir_all(l.dir()).unwrap();
    let d = l.dir();
    let d = d.to_str().unwrap();
    let r = stack(&["journal", "verify", "--dir", d]);
    assert_eq!(r.code, 2, "{r:?}");
    let r = stack(&["journal", "show", "--json", "--dir", d]);
    r.json_error(2);
    let r = stack(&["verify", "--json", "--dir", d]);
    r.ok();
}

/// A journal whose checkpoint holds a state stack never writes (a shared path
/// outside the directory, a `../` name: hand-made, with valid checksums) is
/// corruption: every command that would fold it exits 4 naming the record or its
/// frame and what is wrong, and nothing in the directory changes. (A `../` name
/// does not even decode: the typed state cannot hold one, so it is forged into
/// the compacted journal's bytes.)
#[test]
fn a_checkpoint_pointing_outside_the_directory_is_corruption_and_nothing_changes() {
    use stack::fs::RealFs;
    use stack::journal::event::SlotRef;
    use stack::journal::Journal;
    use stack::layout::Layout;
    use stack::replay::state::read_state;
    use std::sync::Arc;

    for case in ["absolute shared path", "../ name"] {
        let (o, l) = pulled("copy");
        let dir = l.dir();
        // Outside the directory, with tbl_a's content: a pull that looked would
        // find it intact.
        let victim = l.tmp.path().join("victim.parquet");
        std::fs::write(&victim, b"table a, version 1\n").unwrap();
        // The pulled state, one entry made to point at it, compacted into the
        // journal by hand (the library writes whatever state it is given).
        let layout = Layout::new(&dir);
        let mut st = read_state(&RealFs, &layout).unwrap().unwrap();
        let e = st.direct_tables.remove("tbl_a").unwrap();
        let placeholder = "QQQQQQQQQQQQQQQ";
        let (e, why) = if case == "absolute shared path" {
            let e = e.with_paths(
                (SlotRef::Direct, "tbl_a"),
                "data/_direct/a.parquet",
                victim.to_str().unwrap(),
            );
            (e, format!("{} are not the engine's", victim.display()))
        } else {
            let mut e = e;
            e.name = placeholder.try_into().unwrap();
            let why = r#""../../../victim" is not a safe path component"#.to_string();
            (e, why)
        };
        st.direct_tables.insert("tbl_a".try_into().unwrap(), e);
        let mut journal = Journal::open(Arc::new(RealFs), &layout).unwrap().journal;
        journal.compact(&st).unwrap();
        let seq = journal.last_seq() - 1; // the checkpoint, then the request
        drop(journal);
        let decodes = case == "absolute shared path";
        if !decodes {
            forge_journal(&layout.journal(), placeholder, "../../../victim");
        }

        let names_it = |msg: &str| {
            assert!(
                msg.contains("is corrupt at byte offset 16 (record 0)"),
                "{case}: {msg}"
            );
            if decodes {
                assert!(
                    msg.contains(&format!("checkpoint seq {seq}")),
                    "{case}: {msg}"
                );
            }
            assert!(msg.contains(&why), "{case}: {msg}");
        };

        every_command_refuses_the_journal(&o, &dir, case, &names_it);
        assert_eq!(std::fs::read(&victim).unwrap(), b"table a, version 1\n");

        // `verify` without a state file audits the journal's projection: not this one.
        std::fs::remove_file(dir.join("sync_state.json")).unwrap();
        names_it(&verify(&dir, true).json_error(4));
    }
}

/// A hand-made, checksum-valid, committed `MakeRef` naming `../../../victim` (an
/// event holds names, never paths; this one is no name stack writes) is
/// corruption: it does not decode, and every command that would fold the journal
/// exits 4 naming its frame and the name, and nothing in the directory changes.
/// Folded instead, it would have heal stat and hash the victim, and the next pull
/// plan its removal outside the directory. (The typed event cannot hold the name:
/// it is forged into the journal's bytes.)
#[test]
fn an_event_naming_a_path_outside_the_directory_is_corruption_and_nothing_changes() {
    use stack::fs::RealFs;
    use stack::journal::{scan_file, Event, Journal, Slot};
    use stack::layout::Layout;
    use stack::replay::state::Strategy;
    use std::sync::Arc;

    let (o, l) = pulled("copy");
    let dir = l.dir();
    // Outside the directory, with tbl_a's content.
    let content = b"table a, version 1\n";
    let victim = l.tmp.path().join("victim.parquet");
    std::fs::write(&victim, content).unwrap();
    let layout = Layout::new(&dir);
    let mut journal = Journal::open(Arc::new(RealFs), &layout).unwrap().journal;
    let txn = journal.new_txn();
    let placeholder = "QQQQQQQQQQQQQQQ";
    journal.append(
        txn,
        Event::MakeRef {
            slot: Slot::Direct,
            table_id: "tbl_a".try_into().unwrap(),
            name: placeholder.try_into().unwrap(),
            md5: md5_hex(content).try_into().unwrap(),
            size: Some(content.len() as u64),
            strategy: Strategy::Copy,
        },
    );
    journal.append(txn, Event::Prepared);
    journal.append(
        txn,
        Event::Committed {
            fingerprints: Vec::new(),
        },
    );
    journal.sync().unwrap();
    drop(journal);
    // The frame the batch went into: the journal's end before it.
    let before = scan_file(&RealFs, &layout).unwrap().unwrap();
    let (offset, record) = (
        before
            .records
            .iter()
            .rev()
            .find(|(_, r)| r.txn == txn)
            .unwrap()
            .0,
        before.records.iter().filter(|(_, r)| r.txn != txn).count(),
    );
    forge_journal(&layout.journal(), placeholder, "../../../victim");

    let names_it = |msg: &str| {
        for part in [
            format!("is corrupt at byte offset {offset} (record {record})"),
            r#""../../../victim" is not a safe path component"#.to_string(),
        ] {
            assert!(msg.contains(&part), "{part:?} not in {msg}");
        }
    };

    every_command_refuses_the_journal(&o, &dir, "make_ref", &names_it);
    assert_eq!(std::fs::read(&victim).unwrap(), content);

    // `verify` without a state file audits the journal's projection: not this one.
    std::fs::remove_file(dir.join("sync_state.json")).unwrap();
    names_it(&verify(&dir, true).json_error(4));
}

/// Every command that would fold or append to `dir`'s journal exits 4 with a
/// message `names_it` accepts (the JSON error kind `journal_corrupt`): `journal
/// replay`, `pull` of the same and of another manifest, `status`, `journal show`,
/// `journal verify`, `journal compact` and `gc`; and nothing in the directory
/// changes (the journal byte for byte; the lock file's holder line aside).
fn every_command_refuses_the_journal(o: &Origin, dir: &Path, case: &str, names_it: &dyn Fn(&str)) {
    let d = dir.to_str().unwrap();
    let jpath = dir.join(".stack/journal");
    let bytes = std::fs::read(&jpath).unwrap();
    let no_lock = |s: &Snapshot| -> Snapshot {
        s.iter()
            .filter(|(p, _)| p.as_path() != Path::new(".stack/lock"))
            .map(|(p, n)| (p.clone(), n.clone()))
            .collect()
    };
    let before = snapshot(dir);
    let r = stack(&["journal", "replay", "--dir", d]);
    assert_eq!(r.code, 4, "{case}: {r:?}");
    names_it(&r.stderr);
    let r = pull(&o.manifest(), dir, &["--json"]);
    names_it(&r.json_error(4));
    assert_eq!(
        r.json()["error"]["kind"],
        json!("journal_corrupt"),
        "{case}"
    );
    let m2 = o.write(&base_tables()[1..], &base_domains(), "v2.json");
    names_it(&pull(&m2, dir, &["--json"]).json_error(4));
    let m = o.manifest();
    let m = m.to_str().unwrap();
    names_it(&stack(&["status", "--manifest", m, "--dir", d, "--json"]).json_error(4));
    names_it(&stack(&["journal", "show", "--json", "--dir", d]).json_error(4));
    for args in [
        vec!["journal", "verify"],
        vec!["journal", "compact"],
        vec!["gc"],
    ] {
        let mut c = bin();
        c.args(&args).arg("--dir").arg(dir);
        let r = output(c);
        assert_eq!(r.code, 4, "{case}: {args:?}: {r:?}");
        names_it(&r.stderr);
    }
    assert_eq!(
        std::fs::read(&jpath).unwrap(),
        bytes,
        "{case}: journal rewritten"
    );
    assert_same(&no_lock(&before), &no_lock(&snapshot(dir)), case);
}

/// The fast path trusts a state file naming the journal's length. If the journal's
/// end is torn at that same length (a power loss during the last fdatasync), the
/// next pull with work to do recovers from the journal itself instead of trusting
/// it: the torn `Committed` is cut, its transaction rolled forward, and the pull
/// goes on.
#[test]
fn a_torn_end_under_a_trusted_state_is_recovered_not_appended_to() {
    let (o, l) = pulled("symlink");
    let dir = l.dir();
    let jpath = dir.join(".stack/journal");
    let mut bytes = std::fs::read(&jpath).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 6..] {
        *b = 0;
    }
    std::fs::write(&jpath, &bytes).unwrap();
    let v2 = {
        let mut ts = base_tables();
        ts[2] = t("tbl_b", "b", Some("p1"), b"table b, version 2\n");
        o.write(&ts, &base_domains(), "v2.json")
    };
    let r = pull(&v2, &dir, &["--json"]);
    r.ok();
    assert!(dir.join(".stack/journal.broken").exists());
    assert_verify_clean(&dir);
    let d = dir.to_str().unwrap();
    stack(&["journal", "verify", "--dir", d]).ok();
}
