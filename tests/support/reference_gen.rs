//! The reference suite's random manifest generator (`_build_random_manifest` of
//! `test_pull_sync_invariants.py`), shared by the ported suite and the crash tests:
//! the same draws from the same CPython RNG, with the md5 of a (table, version) left
//! to the caller (the port uses the reference's `md5("tid:vN")`; the crash tests
//! register real bytes behind each md5).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::pyrandom::PyRandom;

/// `_make_table_entry` of the reference suite.
pub fn make_table_entry(tid: &str, name: &str, md5: &str) -> Value {
    json!({
        "id": tid,
        "name": name,
        "md5": md5,
        "query_mode": "local",
        "parquet_url": format!("/api/data/{tid}/download"),
    })
}

/// Build a random manifest from a fixed pool of tables, in two passes as the
/// reference does: first membership and one version per table id, then entries.
pub fn build_random_manifest(
    rng: &mut PyRandom,
    table_pool: &[String],
    version_clock: &mut BTreeMap<String, u64>,
    gen_md5: &dyn Fn(&str, u64) -> String,
) -> Value {
    // ---- pass 1 — pick membership + finalize per-tid version ----
    let k = rng.randint(0, 3.min(table_pool.len() as u32)) as usize;
    let direct_tids = rng.sample(table_pool, k);
    let n_pkgs = rng.randint(0, 3);
    let mut pkg_specs: Vec<(String, Vec<String>)> = Vec::new();
    for i in 0..n_pkgs {
        let slug = format!("pkg{i}");
        let k = rng.randint(1, 3.min(table_pool.len() as u32)) as usize;
        pkg_specs.push((slug, rng.sample(table_pool, k)));
    }
    let mut referenced: BTreeSet<String> = direct_tids.iter().cloned().collect();
    for (_, ptables) in &pkg_specs {
        referenced.extend(ptables.iter().cloned());
    }
    let mut final_md5: BTreeMap<String, String> = BTreeMap::new();
    for tid in &referenced {
        let mut ver = version_clock.get(tid).copied().unwrap_or(1);
        if rng.random() < 0.3 {
            ver += 1;
        }
        version_clock.insert(tid.clone(), ver);
        final_md5.insert(tid.clone(), gen_md5(tid, ver));
    }

    // ---- pass 2 — emit manifest entries with shared md5 ----
    let entry = |tid: &String| make_table_entry(tid, &tid.replace("tbl_", ""), &final_md5[tid]);
    let direct: Vec<Value> = direct_tids.iter().map(entry).collect();
    let packages: Vec<Value> = pkg_specs
        .iter()
        .map(|(slug, ptables)| {
            let tables: Vec<Value> = ptables.iter().map(entry).collect();
            json!({"id": format!("id_{slug}"), "slug": slug, "name": slug, "tables": tables})
        })
        .collect();
    let mut domains = Vec::new();
    for slug in ["ops", "finance", "ml"] {
        if rng.random() < 0.5 {
            let key = format!("dom_{slug}");
            let mut ver = version_clock.get(&key).copied().unwrap_or(1);
            if rng.random() < 0.3 {
                ver += 1;
            }
            version_clock.insert(key.clone(), ver);
            domains.push(json!({"slug": slug, "md5": gen_md5(&key, ver)}));
        }
    }
    json!({"direct_tables": direct, "data_packages": packages, "memory_domains": domains})
}
