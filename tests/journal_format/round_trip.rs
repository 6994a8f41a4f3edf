//! Round trips: arbitrary histories through memory and disk, and compaction,
//! which keeps the last checkpoint and the tail.

use super::support::*;

// ---------------------------------------------------------------------------
// Round trips.
// ---------------------------------------------------------------------------

proptest! {
    /// Frames of arbitrary records, concatenated after a header, scan back to the
    /// same records and a clean end (pure, no disk).
    #[test]
    fn prop_frames_round_trip_in_memory(batches in arb_record_batches()) {
        let mut bytes = frame::header().to_vec();
        for batch in &batches {
            bytes.extend(frame::encode_frame(batch).expect("encode"));
        }
        let scan = frame::scan(&bytes);
        prop_assert_eq!(&scan.end, &End::Clean);
        prop_assert_eq!(scan.valid_len, bytes.len() as u64);
        let want: Vec<Record> = batches.into_iter().flatten().collect();
        prop_assert_eq!(records_of(&scan), want);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Journal::open + append + sync per batch, then scan_file: identical records,
    /// seqs from 1, clean end; reopening yields the same records and cuts nothing.
    #[test]
    fn prop_journal_round_trips_through_disk(batches in arb_batches()) {
        let (_dir, layout) = temp_layout();
        let written = write_batches(&layout, &batches);
        prop_assert!(written.iter().zip(1..).all(|(r, seq)| r.seq == seq));

        let scan = scan_file(&RealFs, &layout).expect("scan").expect("journal exists");
        prop_assert_eq!(&scan.end, &End::Clean);
        prop_assert_eq!(records_of(&scan), written.clone());

        let opened = Journal::open(real_fs(), &layout).expect("reopen");
        prop_assert!(opened.torn.is_none());
        prop_assert_eq!(opened.records, written.clone());
        prop_assert_eq!(opened.journal.last_seq(), written.len() as u64);
    }

    /// Compaction with an arbitrary state: the journal becomes one Checkpoint
    /// holding exactly that state with the next seq; later appends continue it,
    /// and "last checkpoint + tail" is the same as in the uncompacted history.
    #[test]
    fn prop_compaction_keeps_checkpoint_and_tail(
        history in arb_batches(),
        state in arb_state(),
        tail in vec((0u64..50, arb_event()), 1..4),
    ) {
        let (_dir, layout) = temp_layout();
        write_batches(&layout, &history);
        let mut journal = Journal::open(real_fs(), &layout).expect("open").journal;
        let seq_before = journal.last_seq();
        let txn_before = journal.last_txn();
        journal.compact(&state).expect("compact");

        let scan = scan_file(&RealFs, &layout).expect("scan").expect("exists");
        prop_assert_eq!(&scan.end, &End::Clean);
        let after = records_of(&scan);
        prop_assert_eq!(after.len(), 1);
        prop_assert_eq!(after[0].seq, seq_before + 1);
        prop_assert!(after[0].txn > txn_before);
        prop_assert_eq!(
            &after[0].event,
            &Event::Checkpoint { state: Box::new(state.clone()) }
        );

        for (txn, event) in &tail {
            journal.append(*txn, event.clone());
        }
        journal.sync().expect("sync tail");
        drop(journal);

        let compacted = Journal::open(real_fs(), &layout).expect("reopen").records;
        let mut uncompacted: Vec<Event> = history.iter().flatten().map(|(_, e)| e.clone()).collect();
        uncompacted.push(Event::Checkpoint { state: Box::new(state.clone()) });
        uncompacted.extend(tail.iter().map(|(_, e)| e.clone()));
        let compacted_events: Vec<Event> = compacted.iter().map(|r| r.event.clone()).collect();
        prop_assert_eq!(checkpoint_and_tail(&compacted_events), checkpoint_and_tail(&uncompacted));
        prop_assert!(compacted.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    }
}

/// What a replay folds: the last checkpoint's state and every event after it.
fn checkpoint_and_tail(events: &[Event]) -> (Option<SyncState>, Vec<Event>) {
    match events
        .iter()
        .rposition(|e| matches!(e, Event::Checkpoint { .. }))
    {
        Some(i) => {
            let Event::Checkpoint { state } = &events[i] else {
                unreachable!()
            };
            (Some((**state).clone()), events[i + 1..].to_vec())
        }
        None => (None, events.to_vec()),
    }
}

#[test]
fn compaction_keeps_the_request_the_state_realised() {
    use stack::replay::project::project;
    use stack::replay::state::Pulled;
    let (_dir, layout) = temp_layout();
    let mut journal = Journal::open(real_fs(), &layout).expect("open").journal;
    let pulled = Pulled {
        key: "0123456789abcdef0123456789abcdef".into(),
        skipped_direct: 2,
        skipped_packages: 3,
    };
    let mut state = sample_state();
    state.journal.pulled = Some(pulled.clone());
    journal.compact(&state).expect("compact");
    let (txn, seq) = (journal.last_txn(), journal.last_seq());
    drop(journal);
    let opened = Journal::open(real_fs(), &layout).expect("reopen");
    assert!(opened.torn.is_none(), "{:?}", opened.torn);
    let records = &opened.records;
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(matches!(records[0].event, Event::Checkpoint { .. }));
    assert!(matches!(records[1].event, Event::Request { .. }));
    assert_eq!((records[1].txn, records[1].seq), (txn, seq));
    assert_eq!((records[0].txn, records[0].seq + 1), (txn, seq));
    // The projection is the state again, key included, standing at the request;
    // nothing is left open.
    let p = project(records);
    assert!(p.pending.is_none(), "{:?}", p.pending);
    assert_eq!(p.state.journal.pulled, Some(pulled));
    assert_eq!((p.state.journal.txn, p.state.journal.seq), (txn, seq));
    // A request anywhere else is a pull's, not the checkpoint's: it waits for its
    // transaction's `Committed`.
    let stray = Record {
        seq: seq + 1,
        txn: txn + 1,
        event: records[1].event.clone(),
    };
    let mut more = records.clone();
    more.push(stray);
    let p = project(&more);
    assert_eq!(p.pending.map(|p| p.txn), Some(txn + 1));
}

#[test]
fn checkpoint_with_absent_optional_fields_survives_compaction_and_reopen() {
    let (_dir, layout) = temp_layout();
    let mut journal = Journal::open(real_fs(), &layout).expect("open").journal;
    journal.compact(&sample_state()).expect("compact");
    drop(journal);
    let opened = Journal::open(real_fs(), &layout).expect("reopen");
    assert!(
        opened.torn.is_none(),
        "checkpoint was cut: {:?}",
        opened.torn
    );
    assert_eq!(
        opened.records[0].event,
        Event::Checkpoint {
            state: Box::new(sample_state())
        }
    );
}

/// Regression: compacting left `write_state`'s scratch folder (`.stack/tmp`)
/// behind; the next command took it for a leftover and replayed the whole journal
/// (the slow path) although the state file named the journal's end.
#[test]
fn compaction_leaves_no_scratch_folder_and_the_next_command_takes_the_fast_path() {
    let (_dir, layout) = temp_layout();
    let fs = real_fs();
    let mut journal = Journal::open(fs.clone(), &layout).expect("open").journal;
    let state = stack::reconcile::recover::compact_state(
        fs.as_ref(),
        &layout,
        &mut journal,
        SyncState::default(),
    )
    .expect("compact");
    drop(journal);
    assert!(!layout.tmp().exists(), ".stack/tmp left behind");
    let rec = stack::reconcile::recover::recover(fs, &layout).expect("recover");
    assert!(rec.trusted, "the next command did not take the fast path");
    assert_eq!(rec.state, state);
}
