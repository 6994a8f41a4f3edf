//! A structured history of pulls (manifests from a small pool, link strategies,
//! crash points and crash modes) against the in-memory filesystem: after each pull,
//! and after each crash + reboot + recovery, invariants 1–6 hold and the state file
//! is the projection of the journal. See `tests/fuzz_support/mod.rs`.
#![no_main]

#[path = "../../tests/fuzz_support/mod.rs"]
mod fuzz_support;

use arbitrary::Arbitrary;
use fuzz_support::{CrashSpec, PackageSpec, StepSpec, TableSpec};

#[derive(Debug, Arbitrary)]
struct Table {
    table: u8,
    alt_name: bool,
    remote: bool,
}

#[derive(Debug, Arbitrary)]
struct Package {
    slug: u8,
    tables: Vec<Table>,
}

#[derive(Debug, Arbitrary)]
struct Crash {
    /// Mutating operations before the crash (a pull does roughly 30–200).
    after: u8,
    mode: u8,
    mask: u64,
    /// A second crash while recovery runs: (operations allowed, mode).
    in_recovery: Option<(u8, u8)>,
}

#[derive(Debug, Arbitrary)]
struct Step {
    versions: [u8; 6],
    direct: Vec<Table>,
    packages: Vec<Package>,
    domains: Vec<(u8, u8)>,
    link: u8,
    reflink: bool,
    crash: Option<Crash>,
}

fn table(t: &Table) -> TableSpec {
    TableSpec {
        table: t.table % 6,
        // Renames and skipped tables now and then, not half the time.
        alt_name: t.alt_name && t.table >= 200,
        remote: t.remote && t.table >= 230,
    }
}

fn step(s: &Step) -> StepSpec {
    StepSpec {
        versions: s.versions.map(|v| v % 3),
        direct: s
            .direct
            .iter()
            .take(fuzz_support::MAX_DIRECT)
            .map(table)
            .collect(),
        packages: s
            .packages
            .iter()
            .take(fuzz_support::MAX_PACKAGES)
            .map(|p| PackageSpec {
                slug: p.slug % 3,
                tables: p
                    .tables
                    .iter()
                    .take(fuzz_support::MAX_PACKAGE_TABLES)
                    .map(table)
                    .collect(),
            })
            .collect(),
        domains: s
            .domains
            .iter()
            .take(3)
            .map(|&(d, v)| (d % 3, v % 3))
            .collect(),
        link: s.link % 5,
        reflink: s.reflink,
        crash: s.crash.as_ref().map(|c| CrashSpec {
            after: c.after as u16,
            mode: c.mode % 5,
            mask: c.mask,
            in_recovery: c.in_recovery.map(|(a, m)| (a as u16, m % 5)),
        }),
    }
}

libfuzzer_sys::fuzz_target!(|steps: Vec<Step>| {
    let steps: Vec<StepSpec> = steps
        .iter()
        .take(fuzz_support::MAX_STEPS)
        .map(step)
        .collect();
    fuzz_support::run_scenario(&steps);
});
