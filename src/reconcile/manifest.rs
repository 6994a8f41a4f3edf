//! The manifest (contract §1): its serde model and its validation.
//!
//! Owns: [`Manifest`] as the server sends it, and [`Desired`], the validated stack
//! that planning works from. Invariant kept: every rule of contract §1 is checked
//! here, before anything is touched, and every id, name and slug that reaches the
//! rest of the engine is one safe path component.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::journal::event::Slot;
use crate::reconcile::origin::Origin;

/// Check that the manifest and every table, package and domain in it is a JSON
/// object (lists that are not arrays are left to serde's own error).
fn require_objects(v: &serde_json::Value) -> std::result::Result<(), String> {
    use serde_json::Value;
    let items = |v: &Value, key: &str| -> Vec<Value> {
        match v.get(key) {
            Some(Value::Array(a)) => a.clone(),
            _ => Vec::new(),
        }
    };
    let object = |v: &Value, what: &str| {
        if v.is_object() {
            Ok(())
        } else {
            let kind = match v {
                Value::Array(_) => "an array",
                Value::String(_) => "a string",
                Value::Number(_) => "a number",
                Value::Bool(_) => "a boolean",
                _ => "null",
            };
            Err(format!("{what} must be a JSON object, not {kind}"))
        }
    };
    object(v, "the manifest")?;
    for t in items(v, "direct_tables") {
        object(&t, "a direct table")?;
    }
    for p in items(v, "data_packages") {
        object(&p, "a data package")?;
        for t in items(&p, "tables") {
            object(&t, "a package table")?;
        }
    }
    for d in items(v, "memory_domains") {
        object(&d, "a memory domain")?;
    }
    Ok(())
}

/// A table as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub id: String,
    pub name: String,
    pub md5: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parquet_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// A data package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    #[serde(default)]
    pub id: String,
    pub slug: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub tables: Vec<Table>,
}

/// A memory domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Domain {
    pub slug: String,
    pub md5: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_url: Option<String>,
}

/// The manifest: what the server says the user's stack is. Missing lists are empty;
/// unknown fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub direct_tables: Vec<Table>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub data_packages: Vec<Package>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub memory_domains: Vec<Domain>,
}

fn null_as_empty<'de, D, T>(d: D) -> std::result::Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

impl Manifest {
    /// Parse manifest JSON; a parse error is a bad manifest (exit 2).
    pub fn from_json(bytes: &[u8]) -> Result<Manifest> {
        let bad = |e: String| Error::BadManifest(format!("not a valid manifest: {e}"));
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        // serde's derived structs also accept JSON arrays (fields by position), so
        // `[]` would read as an empty stack and a pull would delete everything.
        // Contract §1 manifests, tables, packages and domains are objects.
        require_objects(&value).map_err(bad)?;
        serde_json::from_value(value).map_err(|e| bad(e.to_string()))
    }
}

/// One reference the manifest wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantRef {
    pub name: String,
    pub md5: String,
    pub size: Option<u64>,
}

/// One table's content the manifest wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantTable {
    pub md5: String,
    pub url: String,
    pub size: Option<u64>,
}

/// One memory domain the manifest wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantDomain {
    pub md5: String,
    pub url: String,
}

/// How many manifest entries were skipped (not `query_mode: local`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skipped {
    pub direct: u64,
    pub packages: u64,
}

/// A validated manifest: the stack to materialize.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// (slot, table id) → the reference.
    pub refs: BTreeMap<(Slot, String), WantRef>,
    /// table id → its content.
    pub tables: BTreeMap<String, WantTable>,
    /// domain slug → the bundle.
    pub domains: BTreeMap<String, WantDomain>,
    pub skipped: Skipped,
}

/// md5 of the manifest's canonical JSON: the identity a journal's `Begin` records.
/// Computed only when a pull has something to do.
pub fn digest(manifest: &Manifest) -> String {
    use md5::Digest;
    crate::reconcile::origin::hex(&md5::Md5::digest(
        serde_json::to_vec(manifest).unwrap_or_default(),
    ))
}

/// Is `s` one safe path component: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`, not `.`/`..`?
pub fn is_safe_component(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

fn check_component(what: impl FnOnce() -> String, value: &str) -> Result<()> {
    if is_safe_component(value) {
        Ok(())
    } else {
        Err(Error::BadManifest(format!(
            "{} {value:?} is not a safe path component ([A-Za-z0-9][A-Za-z0-9._-]{{0,127}})",
            what()
        )))
    }
}

fn check_md5(what: impl FnOnce() -> String, md5: &str) -> Result<String> {
    if md5.len() == 32 && md5.bytes().all(|c| c.is_ascii_hexdigit()) {
        Ok(md5.to_ascii_lowercase())
    } else {
        Err(Error::BadManifest(format!(
            "{}: md5 {md5:?} is not 32 hex digits",
            what()
        )))
    }
}

fn is_local(t: &Table) -> bool {
    t.query_mode.as_deref().is_none_or(|m| m == "local")
}

/// Check every rule of contract §1 and build the desired stack. Nothing is touched.
pub fn validate(manifest: &Manifest, origin: &dyn Origin) -> Result<Desired> {
    let mut d = Desired::default();
    let mut md5_of_id: BTreeMap<String, (String, String)> = BTreeMap::new(); // id -> (md5, where)
    let mut paths: BTreeMap<String, String> = BTreeMap::new(); // ref path -> who

    let mut add_table = |d: &mut Desired, slot: Slot, t: &Table, where_: String| -> Result<()> {
        check_component(|| format!("{where_}: table id"), &t.id)?;
        check_component(|| format!("{where_}: table {} name", t.id), &t.name)?;
        let md5 = check_md5(|| format!("{where_}: table {}", t.id), &t.md5)?;
        if let Some((prev, prev_where)) = md5_of_id.get(&t.id) {
            if *prev != md5 {
                return Err(Error::BadManifest(format!(
                    "table {} has md5 {prev} in {prev_where} but {md5} in {where_}",
                    t.id
                )));
            }
        } else {
            md5_of_id.insert(t.id.clone(), (md5.clone(), where_.clone()));
        }
        if !is_local(t) {
            match slot {
                Slot::Direct => d.skipped.direct += 1,
                Slot::Package(_) => d.skipped.packages += 1,
            }
            return Ok(());
        }
        let url = t.parquet_url.clone().ok_or_else(|| {
            Error::BadManifest(format!("{where_}: table {} has no parquet_url", t.id))
        })?;
        origin
            .resolve(&url)
            .map_err(|m| Error::BadManifest(format!("{where_}: table {}: {m}", t.id)))?;
        let path = crate::layout::ref_rel(&slot, &t.name);
        let who = format!("{where_}: table {}", t.id);
        if let Some(prev) = paths.insert(path.clone(), who.clone()) {
            return Err(Error::BadManifest(format!(
                "{who} and {prev} would both land on {path}"
            )));
        }
        // One id is one content (its md5); two URLs for it are two mirrors of the
        // same bytes, and the first one is used.
        d.tables.entry(t.id.clone()).or_insert_with(|| WantTable {
            md5: md5.clone(),
            url,
            size: t.size,
        });
        if d.refs
            .insert(
                (slot, t.id.clone()),
                WantRef {
                    name: t.name.clone(),
                    md5,
                    size: t.size,
                },
            )
            .is_some()
        {
            return Err(Error::BadManifest(format!("{who} is listed twice")));
        }
        Ok(())
    };

    for t in &manifest.direct_tables {
        add_table(&mut d, Slot::Direct, t, "direct_tables".to_string())?;
    }
    let mut slugs = BTreeSet::new();
    for p in &manifest.data_packages {
        // A safe component starts with [A-Za-z0-9], so no slug can be `_direct`/`_shared`.
        check_component(|| "data package slug".to_string(), &p.slug)?;
        if !slugs.insert(p.slug.clone()) {
            return Err(Error::BadManifest(format!(
                "two data packages have the slug {:?}",
                p.slug
            )));
        }
        for t in &p.tables {
            add_table(
                &mut d,
                Slot::Package(p.slug.clone()),
                t,
                format!("data package {}", p.slug),
            )?;
        }
    }
    for dom in &manifest.memory_domains {
        check_component(|| "memory domain slug".to_string(), &dom.slug)?;
        let md5 = check_md5(|| format!("memory domain {}", dom.slug), &dom.md5)?;
        let url = dom
            .bundle_url
            .clone()
            .unwrap_or_else(|| format!("/api/memory/{}/bundle.md", dom.slug));
        origin
            .resolve(&url)
            .map_err(|m| Error::BadManifest(format!("memory domain {}: {m}", dom.slug)))?;
        if d.domains
            .insert(dom.slug.clone(), WantDomain { md5, url })
            .is_some()
        {
            return Err(Error::BadManifest(format!(
                "two memory domains have the slug {:?}",
                dom.slug
            )));
        }
    }
    Ok(d)
}
