//! The manifest (contract §1): its serde model and its validation.
//!
//! Owns: [`Manifest`] as the server sends it, and [`Desired`], the validated stack
//! that planning works from. Invariant kept: every rule of contract §1 is checked
//! here, before anything is touched; every id, name and slug is a `SafeName`,
//! refused (naming the value) when the manifest is parsed, and every md5 an
//! `Md5Sum` once validated.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::name::{Md5Sum, SafeName};
use crate::reconcile::origin::Origin;

/// A streaming check, without building a JSON tree, that the manifest and every
/// table, package and domain in it is a JSON object: serde's derived structs also
/// accept arrays (fields by position), so `[]` would read as an empty stack and a
/// pull would delete everything. Lists that are not arrays are left to serde's own
/// error in the typed parse that follows.
mod shape {
    use std::fmt;

    use serde::de::{
        DeserializeSeed, Deserializer, Error, IgnoredAny, MapAccess, SeqAccess, Visitor,
    };

    #[derive(Clone, Copy)]
    enum Shape {
        Manifest,
        Package,
        Leaf(&'static str),
    }

    impl Shape {
        fn what(self) -> &'static str {
            match self {
                Shape::Manifest => "the manifest",
                Shape::Package => "a data package",
                Shape::Leaf(what) => what,
            }
        }

        /// The shape of the items of the list under `key`, if it is one we check.
        fn child(self, key: &str) -> Option<Shape> {
            match (self, key) {
                (Shape::Manifest, "direct_tables") => Some(Shape::Leaf("a direct table")),
                (Shape::Manifest, "data_packages") => Some(Shape::Package),
                (Shape::Manifest, "memory_domains") => Some(Shape::Leaf("a memory domain")),
                (Shape::Package, "tables") => Some(Shape::Leaf("a package table")),
                _ => None,
            }
        }
    }

    /// Check `bytes`; `Err` names what is not an object, with its position.
    pub fn check(bytes: &[u8]) -> Result<(), String> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        Object(Shape::Manifest)
            .deserialize(&mut de)
            .and_then(|()| de.end())
            .map_err(|e| e.to_string())
    }

    struct Object(Shape);

    impl<'de> DeserializeSeed<'de> for Object {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Object {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{} as a JSON object", self.0.what())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(child) = map.next_key_seed(Key(self.0))? {
                match child {
                    Some(items) => map.next_value_seed(List(items))?,
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(())
        }
    }

    /// A key, mapped (without allocating) to the shape of the list under it.
    struct Key(Shape);

    impl<'de> DeserializeSeed<'de> for Key {
        type Value = Option<Shape>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<Shape>, D::Error> {
            d.deserialize_str(self)
        }
    }

    impl<'de> Visitor<'de> for Key {
        type Value = Option<Shape>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a key")
        }
        fn visit_str<E: Error>(self, key: &str) -> Result<Option<Shape>, E> {
            Ok(self.0.child(key))
        }
    }

    /// A list whose items must be objects of a shape; anything else is let through.
    struct List(Shape);

    impl<'de> DeserializeSeed<'de> for List {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for List {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Object(self.0))?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(())
        }
        fn visit_bool<E: Error>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E: Error>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E: Error>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E: Error>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E: Error>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E: Error>(self) -> Result<(), E> {
            Ok(())
        }
    }
}

/// A table as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub id: SafeName,
    pub name: SafeName,
    pub md5: String,
    /// `"local"` (the usual value) is shared, not allocated per table.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "query_mode"
    )]
    pub query_mode: Option<Cow<'static, str>>,
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
    pub slug: SafeName,
    #[serde(default)]
    pub name: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub tables: Vec<Table>,
}

/// A memory domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Domain {
    pub slug: SafeName,
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
    let mut list = Option::<Vec<T>>::deserialize(d)?.unwrap_or_default();
    // Grown by doubling while parsed: give back the unused tail of a long list.
    list.shrink_to_fit();
    Ok(list)
}

fn query_mode<'de, D>(d: D) -> std::result::Result<Option<Cow<'static, str>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Ok(Option::<String>::deserialize(d)?.map(|m| match m.as_str() {
        "local" => Cow::Borrowed("local"),
        _ => Cow::Owned(m),
    }))
}

impl Manifest {
    /// Parse manifest JSON; a parse error is a bad manifest (exit 2).
    pub fn from_json(bytes: &[u8]) -> Result<Manifest> {
        // Contract §1 manifests, tables, packages and domains are objects.
        shape::check(bytes).map_err(Error::BadManifest)?;
        serde_json::from_slice(bytes).map_err(|_| Error::BadManifest(where_invalid(bytes)))
    }
}

/// Why `bytes` is not a manifest, naming the entry: parsed again with the
/// path tracked (`data_packages[0].tables[1].name: "../x" is not a safe path
/// component …`), which only a refused manifest pays for.
fn where_invalid(bytes: &[u8]) -> String {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, Manifest>(de) {
        Err(e) if e.path().iter().next().is_some() => format!("{}: {}", e.path(), e.inner()),
        Err(e) => e.into_inner().to_string(),
        Ok(_) => "not a valid manifest".to_string(),
    }
}

pub use crate::journal::event::SlotRef;

/// One reference the manifest wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantRef<'m> {
    pub name: &'m SafeName,
    pub md5: Md5Sum,
    pub size: Option<u64>,
}

/// One table's content the manifest wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantTable<'m> {
    pub md5: Md5Sum,
    pub url: &'m str,
    pub size: Option<u64>,
}

/// One memory domain the manifest wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantDomain {
    pub md5: Md5Sum,
    pub url: String,
}

/// How many manifest entries were skipped (not `query_mode: local`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skipped {
    pub direct: u64,
    pub packages: u64,
}

/// A validated manifest: the stack to materialize. It borrows its ids, names,
/// slugs and URLs from the manifest instead of copying them: a large stack's
/// strings are held once while it is planned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired<'m> {
    /// (slot, table id) → the reference.
    pub refs: BTreeMap<(SlotRef<'m>, &'m SafeName), WantRef<'m>>,
    /// table id → its content.
    pub tables: BTreeMap<&'m SafeName, WantTable<'m>>,
    /// domain slug → the bundle.
    pub domains: BTreeMap<SafeName, WantDomain>,
    pub skipped: Skipped,
}

/// md5 of the manifest's canonical JSON: the identity a journal's `Begin` records.
/// Computed only when a pull has something to do.
pub fn digest(manifest: &Manifest) -> Md5Sum {
    use md5::Digest;
    Md5Sum::of_digest(
        &md5::Md5::digest(serde_json::to_vec(manifest).expect(
            "a parsed manifest serializes: its maps have string keys, its numbers are finite",
        ))
        .into(),
    )
}

/// The md5 a manifest spells `md5` (32 hex digits, either case: it is lowered).
fn check_md5(what: impl FnOnce() -> String, md5: &str) -> Result<Md5Sum> {
    let lowered;
    let text = if md5.bytes().any(|c| c.is_ascii_uppercase()) {
        lowered = md5.to_ascii_lowercase();
        &lowered
    } else {
        md5
    };
    Md5Sum::parse(text)
        .map_err(|_| Error::BadManifest(format!("{}: md5 {md5:?} is not 32 hex digits", what())))
}

fn is_local(t: &Table) -> bool {
    t.query_mode.as_deref().is_none_or(|m| m == "local")
}

/// Check every rule of contract §1 and build the desired stack. Nothing is touched.
pub fn validate<'m>(manifest: &'m Manifest, origin: &dyn Origin) -> Result<Desired<'m>> {
    let mut d = Desired::default();
    let mut seen = Seen::default();
    for t in &manifest.direct_tables {
        add_table(manifest, &mut d, &mut seen, origin, Where::Direct, t)?;
    }
    add_packages(manifest, &mut d, &mut seen, origin)?;
    add_domains(manifest, &mut d, origin)?;
    // Built by inserts in key order, the maps' nodes are about half full; rebuilt
    // from their sorted contents (a bulk build), they are full: a large stack's
    // desired set takes about two thirds of the memory while it is planned.
    d.refs = std::mem::take(&mut d.refs).into_iter().collect();
    d.tables = std::mem::take(&mut d.tables).into_iter().collect();
    Ok(d)
}

/// Where a table is listed (borrowed: validation allocates only what it keeps).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Where<'a> {
    Direct,
    Package(&'a SafeName),
}
impl std::fmt::Display for Where<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Where::Direct => f.write_str("direct_tables"),
            Where::Package(slug) => write!(f, "data package {slug}"),
        }
    }
}

/// Borrowed bookkeeping of the checks that span tables, kept small: a large
/// manifest's hash maps are out of the caches on every probe (at 100k tables,
/// two maps of every listing took a quarter of validation).
#[derive(Default)]
struct Seen<'a> {
    /// id -> md5 as listed, for ids listed only by tables that are not local
    /// (a local table's id, and its md5, are in the desired set's `tables`).
    /// Every listing of an id before the first conflict has the same md5, so
    /// comparing with any of them is comparing with the first.
    other_md5: HashMap<&'a str, &'a str>,
    /// file name -> table id, of the references of the slot being read (two
    /// slots never share a folder: slugs are unique): emptied at each slot.
    names: HashMap<&'a str, &'a str>,
}

/// Where `id` is listed first (for the message of a conflict).
fn first_listed<'a>(manifest: &'a Manifest, id: &str) -> Where<'a> {
    let in_package = |p: &&'a Package| p.tables.iter().any(|t| t.id == id);
    if manifest.direct_tables.iter().any(|t| t.id == id) {
        Where::Direct
    } else {
        manifest
            .data_packages
            .iter()
            .find(in_package)
            .map_or(Where::Direct, |p| Where::Package(&p.slug))
    }
}

/// One listing of table `t` at `at`: id, name and md5 well formed, the same md5
/// wherever the id is listed, a URL the origin resolves for a local table, and no
/// two references on one path.
fn add_table<'a>(
    manifest: &'a Manifest,
    d: &mut Desired<'a>,
    seen: &mut Seen<'a>,
    origin: &dyn Origin,
    at: Where<'a>,
    t: &'a Table,
) -> Result<()> {
    let Seen { other_md5, names } = seen;
    let md5 = check_md5(|| format!("{at}: table {}", t.id), &t.md5)?;
    let listed_local = d.tables.get(&t.id).map(|w| w.md5.as_str());
    if let Some(prev) = listed_local.or_else(|| other_md5.get(t.id.as_str()).copied()) {
        if !prev.eq_ignore_ascii_case(&md5) {
            return Err(Error::BadManifest(format!(
                "table {} has md5 {} in {} but {md5} in {at}",
                t.id,
                prev.to_ascii_lowercase(),
                first_listed(manifest, &t.id)
            )));
        }
    }
    let listed_local = listed_local.is_some();
    if !is_local(t) {
        if !listed_local {
            other_md5.entry(&t.id).or_insert(&t.md5);
        }
        match at {
            Where::Direct => d.skipped.direct += 1,
            Where::Package(_) => d.skipped.packages += 1,
        }
        return Ok(());
    }
    let Some(url) = t.parquet_url.as_deref() else {
        return Err(Error::BadManifest(format!(
            "{at}: table {} has no parquet_url",
            t.id
        )));
    };
    origin
        .resolve(url)
        .map_err(|m| Error::BadManifest(format!("{at}: table {}: {m}", t.id)))?;
    let slot = match at {
        Where::Direct => SlotRef::Direct,
        Where::Package(slug) => SlotRef::Package(slug),
    };
    if let Some(prev) = names.insert(&t.name, &t.id) {
        return Err(Error::BadManifest(format!(
            "{at}: table {} and {at}: table {prev} would both land on {}",
            t.id,
            crate::layout::ref_rel(&slot.to_slot(), &t.name)
        )));
    }
    // One id is one content (its md5); two URLs for it are two mirrors of the
    // same bytes, and the first one is used.
    if !listed_local {
        d.tables.insert(
            &t.id,
            WantTable {
                md5,
                url,
                size: t.size,
            },
        );
    }
    if d.refs
        .insert(
            (slot, &t.id),
            WantRef {
                name: &t.name,
                md5,
                size: t.size,
            },
        )
        .is_some()
    {
        return Err(Error::BadManifest(format!(
            "{at}: table {} is listed twice",
            t.id
        )));
    }
    Ok(())
}

/// Every data package's tables; slugs safe and unique.
fn add_packages<'a>(
    manifest: &'a Manifest,
    d: &mut Desired<'a>,
    seen: &mut Seen<'a>,
    origin: &dyn Origin,
) -> Result<()> {
    let mut slugs = BTreeSet::new();
    for p in &manifest.data_packages {
        // A safe component starts with [A-Za-z0-9], so no slug can be `_direct`/`_shared`.
        if !slugs.insert(p.slug.as_str()) {
            return Err(Error::BadManifest(format!(
                "two data packages have the slug {:?}",
                p.slug
            )));
        }
        seen.names.clear();
        for t in &p.tables {
            add_table(manifest, d, seen, origin, Where::Package(&p.slug), t)?;
        }
    }
    Ok(())
}

/// Every memory domain: slug safe and unique, md5 well formed, URL resolvable.
fn add_domains(manifest: &Manifest, d: &mut Desired<'_>, origin: &dyn Origin) -> Result<()> {
    for dom in &manifest.memory_domains {
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
    Ok(())
}
