//! The fuzz campaigns' properties as proptest tests, so `cargo test` on
//! stable covers them without cargo-fuzz. The properties themselves live in
//! `tests/fuzz_support/mod.rs`, shared with `fuzz/fuzz_targets/`.

mod fuzz_support;

use fuzz_support::*;
use proptest::prelude::*;
use stack::journal::event::{Event, LinkMode, Md5Sum, Record, SafeName, Slot};
use stack::replay::state::{StatFp, Strategy as LinkStrategy};

// ---------------------------------------------------------------------------
// Journal bytes
// ---------------------------------------------------------------------------

/// A safe name (any other does not decode: the mutations reach those).
fn arb_name() -> impl Strategy<Value = SafeName> {
    prop_oneof!["[a-z][a-z0-9_]{0,7}", Just("tbl_a".to_string())]
        .prop_map(|s| SafeName::parse(s).expect("a safe name"))
}

fn arb_journal_md5() -> impl Strategy<Value = Md5Sum> {
    "[0-9a-f]{32}".prop_map(|s| Md5Sum::parse(&s).expect("an md5"))
}

fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z_]{1,8}", ".{0,12}",]
}

fn arb_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (arb_journal_md5(), 0u8..5).prop_map(|(m, l)| Event::Begin {
            manifest_md5: m,
            link: [
                LinkMode::Auto,
                LinkMode::Symlink,
                LinkMode::Hardlink,
                LinkMode::Copy,
                LinkMode::Reflink
            ][l as usize],
        }),
        (arb_journal_md5(), arb_text()).prop_map(|(md5, url)| Event::Stage { md5, url }),
        (arb_name(), arb_journal_md5())
            .prop_map(|(table_id, md5)| Event::PutShared { table_id, md5 }),
        (
            proptest::option::of(arb_name()),
            (arb_name(), arb_name(), arb_journal_md5()),
            any::<Option<u64>>()
        )
            .prop_map(|(slug, (table_id, name, md5), size)| Event::MakeRef {
                slot: slug.map_or(Slot::Direct, Slot::Package),
                table_id,
                name,
                md5,
                size,
                strategy: LinkStrategy::Copy,
            }),
        arb_name().prop_map(|slug| Event::RemoveBundle { slug }),
        Just(Event::Prepared),
        proptest::collection::vec((arb_text(), any::<(u64, i64, u64)>()), 0..3).prop_map(|f| {
            Event::Committed {
                fingerprints: f
                    .into_iter()
                    .map(|(p, (size, mtime_ns, ino))| {
                        (
                            p,
                            StatFp {
                                size,
                                mtime_ns,
                                ino,
                            },
                        )
                    })
                    .collect(),
            }
        }),
        arb_text().prop_map(|reason| Event::Aborted { reason }),
    ]
}

/// A valid journal: batches of records with contiguous seqs from `first`.
fn arb_journal() -> impl Strategy<Value = Vec<u8>> {
    (
        1u64..1000,
        proptest::collection::vec(proptest::collection::vec(arb_event(), 1..4), 0..5),
    )
        .prop_map(|(first, batches)| {
            let mut seq = first;
            let batches: Vec<Vec<Record>> = batches
                .into_iter()
                .map(|b| {
                    b.into_iter()
                        .map(|event| {
                            seq += 1;
                            Record {
                                seq: seq - 1,
                                txn: seq / 3,
                                event,
                            }
                        })
                        .collect()
                })
                .collect();
            write_journal(&batches)
        })
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    Duplicate(usize, usize),
}

fn mutate(mut bytes: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let n = bytes.len().max(1);
        match m {
            Mutation::Flip(i, x) => {
                if !bytes.is_empty() {
                    bytes[i % n] ^= x | 1;
                }
            }
            Mutation::Truncate(i) => bytes.truncate(i % (n + 1)),
            Mutation::Insert(i, b) => {
                let at = i % (bytes.len() + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            Mutation::Remove(i, len) => {
                let at = i % (bytes.len() + 1);
                let end = (at + len).min(bytes.len());
                bytes.drain(at..end);
            }
            Mutation::Duplicate(i, len) => {
                let at = i % (bytes.len() + 1);
                let end = (at + len).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                bytes.extend(copy);
            }
        }
    }
    bytes
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, x)| Mutation::Flip(i, x)),
        any::<usize>().prop_map(Mutation::Truncate),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), 1usize..40).prop_map(|(i, l)| Mutation::Remove(i, l)),
        (any::<usize>(), 1usize..200).prop_map(|(i, l)| Mutation::Duplicate(i, l)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn journal_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        check_journal_input(&bytes);
        let mut with_header = stack::journal::frame::header().to_vec();
        with_header.extend_from_slice(&bytes);
        check_journal_bytes(&with_header);
    }

    #[test]
    fn journal_valid_and_mutated(
        journal in arb_journal(),
        muts in proptest::collection::vec(arb_mutation(), 0..4),
        fix in any::<bool>(),
    ) {
        check_journal_bytes(&journal);
        let mut bytes = mutate(journal, &muts);
        if fix {
            fix_checksums(&mut bytes);
        }
        check_journal_bytes(&bytes);
    }
}

// ---------------------------------------------------------------------------
// Manifest JSON
// ---------------------------------------------------------------------------

fn arb_component() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z][a-z0-9_]{0,6}",
        1 => Just("..".to_string()),
        1 => Just(".".to_string()),
        1 => Just("".to_string()),
        1 => Just("_shared".to_string()),
        1 => Just("a/b".to_string()),
        1 => Just("../x".to_string()),
        1 => Just("/etc".to_string()),
        1 => Just("a\0b".to_string()),
        1 => Just("x".repeat(128)),
        1 => Just("x".repeat(129)),
        1 => Just("é".to_string()),
        1 => Just("a\\b".to_string()),
        1 => ".{0,10}",
    ]
}

fn arb_md5() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[0-9a-f]{32}",
        1 => "[0-9A-F]{32}",
        1 => ".{0,33}",
    ]
}

fn arb_url() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(prop_oneof![
        3 => "/api/data/[a-z_]{1,6}/download",
        1 => Just("/api/../../etc/passwd".to_string()),
        1 => Just("/".to_string()),
        1 => Just("api/x".to_string()),
        1 => Just("/api/./x?y=../..#..".to_string()),
        1 => Just("http://evil/x".to_string()),
        1 => ".{0,12}",
    ])
}

fn arb_table() -> impl Strategy<Value = serde_json::Value> {
    (
        arb_component(),
        arb_component(),
        arb_md5(),
        proptest::option::of(prop_oneof![Just("local"), Just("remote"), Just("")]),
        arb_url(),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(id, name, md5, mode, url, size)| {
            let mut v = serde_json::json!({"id": id, "name": name, "md5": md5});
            if let Some(m) = mode {
                v["query_mode"] = m.into();
            }
            if let Some(u) = url {
                v["parquet_url"] = u.into();
            }
            if let Some(s) = size {
                v["size"] = s.into();
            }
            v
        })
}

fn arb_manifest() -> impl Strategy<Value = serde_json::Value> {
    (
        proptest::collection::vec(arb_table(), 0..3),
        proptest::collection::vec(
            (arb_component(), arb_component(), proptest::collection::vec(arb_table(), 0..3)),
            0..3,
        ),
        proptest::collection::vec((arb_component(), arb_md5(), arb_url()), 0..3),
    )
        .prop_map(|(direct, packages, domains)| {
            serde_json::json!({
                "direct_tables": direct,
                "data_packages": packages.into_iter().map(|(slug, name, tables)| {
                    serde_json::json!({"id": format!("id_{slug}"), "slug": slug, "name": name, "tables": tables})
                }).collect::<Vec<_>>(),
                "memory_domains": domains.into_iter().map(|(slug, md5, url)| {
                    let mut d = serde_json::json!({"slug": slug, "md5": md5});
                    if let Some(u) = url { d["bundle_url"] = u.into(); }
                    d
                }).collect::<Vec<_>>(),
                "unknown_field": 1,
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn manifest_structured(m in arb_manifest()) {
        check_manifest_json(&serde_json::to_vec(&m).unwrap());
    }

    #[test]
    fn manifest_random_text(s in ".{0,200}", bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        check_manifest_json(s.as_bytes());
        check_manifest_json(&bytes);
    }
}

#[test]
fn manifest_demo_is_accepted_and_safe() {
    let bytes = std::fs::read("examples/demo/manifest.json").unwrap();
    check_manifest_json(&bytes);
    let m = stack::Manifest::from_json(&bytes).unwrap();
    let origin = stack::reconcile::origin::LocalOrigin::new("examples/demo");
    assert!(stack::reconcile::manifest::validate(&m, &origin).is_ok());
}

// ---------------------------------------------------------------------------
// Event sequences with crashes
// ---------------------------------------------------------------------------

fn arb_table_spec() -> impl Strategy<Value = TableSpec> {
    (
        0u8..6,
        proptest::bool::weighted(0.15),
        proptest::bool::weighted(0.1),
    )
        .prop_map(|(table, alt_name, remote)| TableSpec {
            table,
            alt_name,
            remote,
        })
}

fn arb_step() -> impl Strategy<Value = StepSpec> {
    (
        any::<[u8; 6]>(),
        proptest::collection::vec(arb_table_spec(), 0..=MAX_DIRECT),
        proptest::collection::vec(
            (
                0u8..3,
                proptest::collection::vec(arb_table_spec(), 0..=MAX_PACKAGE_TABLES),
            )
                .prop_map(|(slug, tables)| PackageSpec { slug, tables }),
            0..=MAX_PACKAGES,
        ),
        proptest::collection::vec((0u8..3, 0u8..3), 0..=3),
        (0u8..5, any::<bool>()),
        proptest::option::weighted(
            0.6,
            (
                0u16..120,
                0u8..5,
                any::<u64>(),
                proptest::option::weighted(0.3, (0u16..40, 0u8..5)),
            )
                .prop_map(|(after, mode, mask, in_recovery)| CrashSpec {
                    after,
                    mode,
                    mask,
                    in_recovery,
                }),
        ),
    )
        .prop_map(
            |(versions, direct, packages, domains, (link, reflink), crash)| StepSpec {
                versions: versions.map(|v| v % 3),
                direct,
                packages,
                domains,
                link,
                reflink,
                crash,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn event_sequences_with_crashes(steps in proptest::collection::vec(arb_step(), 1..=MAX_STEPS)) {
        run_scenario(&steps);
    }
}

fn demo_like_step(versions: [u8; 6], crash: Option<CrashSpec>, link: u8) -> StepSpec {
    let t = |table| TableSpec {
        table,
        alt_name: false,
        remote: false,
    };
    StepSpec {
        versions,
        direct: vec![t(0)],
        packages: vec![
            PackageSpec {
                slug: 0,
                tables: vec![t(1), t(2)],
            },
            PackageSpec {
                slug: 1,
                tables: vec![t(2), t(3)],
            },
        ],
        domains: vec![(1, versions[0])],
        link,
        reflink: link == 4,
        crash,
    }
}

/// A crash at every instant of a second pull (md5 changes, a shared table), in
/// every crash mode, for each link strategy: the stack is old or new after recovery.
#[test]
fn crash_at_every_instant_of_an_update() {
    for link in [0u8, 1, 2, 4] {
        let first = demo_like_step([0; 6], None, link);
        let ops = {
            let mut probe = demo_like_step([1, 0, 1, 0, 0, 0], None, link);
            probe.packages.pop();
            run_scenario(&[first.clone(), probe]).last_ops
        };
        assert!(ops > 10, "the update ran only {ops} operations");
        for after in 0..=ops {
            for mode in 0..5u8 {
                let mut second = demo_like_step([1, 0, 1, 0, 0, 0], None, link);
                second.packages.pop();
                second.crash = Some(CrashSpec {
                    after: after as u16,
                    mode,
                    mask: 0x5555_5555_5555_5555u64.rotate_left(after as u32),
                    in_recovery: None,
                });
                let ran = run_scenario(&[first.clone(), second]);
                assert_eq!(
                    ran.crashes,
                    usize::from(after < ops),
                    "crash {after} of {ops}"
                );
            }
        }
    }
}

/// A power loss during the recovery of a crashed update, at every instant of that
/// recovery: the recovery after it still lands on the old or the new stack.
#[test]
fn crash_during_recovery() {
    for link in 0..3u8 {
        let first = demo_like_step([0; 6], None, link);
        for after in (5..160u16).step_by(13) {
            for again in (0..30u16).step_by(2) {
                let mut second = demo_like_step([1, 0, 1, 0, 0, 0], None, link);
                second.packages.pop();
                second.crash = Some(CrashSpec {
                    after,
                    mode: 2 + (again % 3) as u8,
                    mask: 0x9e37_79b9_7f4a_7c15u64.rotate_left(again as u32),
                    in_recovery: Some((again, (after % 5) as u8)),
                });
                run_scenario(&[first.clone(), second]);
            }
        }
    }
}
