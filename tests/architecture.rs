//! The layers of `src/` hold (ARCHITECTURE.md, "Layers"): no file takes a name from a
//! layer above its own, and no files take names from each other round a circle.
//!
//! Plain Rust reading the sources: every path that names something of this crate
//! (`crate::…`, `super::…`, `self::…`, a child module's name, `stack::…` in
//! `main.rs`), in `use` items and in code, is resolved to the file that defines the
//! module it names. A failure names the file and the name it takes. Test modules
//! (`#[cfg(test)] mod …`) keep the layers too, but are left out of the circle check:
//! a test may use a sibling's helpers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Bottom-up: the top-level modules of each layer. `src/lib.rs` is the `lib` layer
/// and `src/main.rs` the `main` layer, above everything.
const LAYERS: &[(&str, &[&str])] = &[
    ("helpers", &["fs", "error", "md5x", "par", "drain"]),
    ("model", &["model", "layout"]),
    ("journal", &["journal"]),
    ("replay", &["replay"]),
    ("reconcile", &["reconcile", "verify"]),
    ("lib", &[]),
    ("main", &[]),
];

#[test]
fn no_file_imports_from_a_layer_above_or_round_a_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    read_sources(root, &root.join("src"), &mut files);
    assert!(
        files.len() > 20,
        "found only {} files under src/",
        files.len()
    );
    let problems = check(&files);
    assert!(
        problems.is_empty(),
        "the layers do not hold:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_check_names_an_upward_import_and_a_circle() {
    let files = vec![
        (
            "src/lib.rs".to_string(),
            "pub mod layout; pub mod journal; pub mod reconcile;".to_string(),
        ),
        (
            "src/layout.rs".to_string(),
            "/// not `crate::journal::Slot`, a comment\nuse crate::reconcile::place::PREFIX;"
                .to_string(),
        ),
        (
            "src/journal/mod.rs".to_string(),
            "pub mod a; pub mod b;".to_string(),
        ),
        (
            "src/journal/a.rs".to_string(),
            "use super::b::B; pub struct A;".to_string(),
        ),
        (
            "src/journal/b.rs".to_string(),
            "pub struct B; fn f() { let s = \"crate::reconcile::X\"; crate::journal::a::A; }"
                .to_string(),
        ),
        (
            "src/reconcile/mod.rs".to_string(),
            "pub mod place;".to_string(),
        ),
        (
            "src/reconcile/place.rs".to_string(),
            "pub const PREFIX: &str = \"p\"; #[cfg(test)] mod tests { use super::*; }".to_string(),
        ),
    ];
    let problems = check(&files);
    assert_eq!(
        problems,
        vec![
            "src/layout.rs (layer model) takes crate::reconcile::place::PREFIX \
             from src/reconcile/place.rs (layer reconcile)"
                .to_string(),
            "circle: src/journal/a.rs takes super::b::B from src/journal/b.rs, \
             which takes crate::journal::a::A from src/journal/a.rs"
                .to_string(),
        ]
    );
}

/// Every `.rs` file under `dir`, as (path relative to `root` with `/`, text).
fn read_sources(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            read_sources(root, &path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            out.push((rel, text));
        }
    }
}

/// One name a file takes: the path as written and the module path it resolves to.
struct Taken {
    written: String,
    target: Vec<String>,
    in_test: bool,
}

/// A source file: its module path (`[]` for `lib.rs`), and what it takes.
struct File {
    rel: String,
    module: Vec<String>,
    is_main: bool,
    taken: Vec<Taken>,
    /// `mod x;` items declared under `#[cfg(test)]`: the files of test modules.
    test_children: Vec<String>,
}

/// The problems with `files` (path under the crate, text), one line each: upward
/// imports first, in file order, then circles.
fn check(files: &[(String, String)]) -> Vec<String> {
    let parsed: Vec<File> = files
        .iter()
        .map(|(rel, text)| parse_file(rel, text))
        .collect();
    // Module path → index of the file that defines it (main.rs defines no module).
    let by_module: BTreeMap<Vec<String>, usize> = parsed
        .iter()
        .enumerate()
        .filter(|(_, f)| !f.is_main)
        .map(|(i, f)| (f.module.clone(), i))
        .collect();
    let test_files: BTreeSet<Vec<String>> = parsed
        .iter()
        .flat_map(|f| f.test_children.iter().map(|c| child(&f.module, c)))
        .collect();
    let mut problems = Vec::new();
    // edges[a][b]: the first name file a takes from file b (non-test code).
    let mut edges: BTreeMap<usize, BTreeMap<usize, String>> = BTreeMap::new();
    for (i, f) in parsed.iter().enumerate() {
        let Some(own) = layer_of(f) else {
            problems.push(format!("{}: module in no layer (add it to LAYERS)", f.rel));
            continue;
        };
        let is_test_file = test_files.contains(&f.module);
        let mut reported = BTreeSet::new();
        for t in &f.taken {
            let Some(j) = file_of(&by_module, &t.target) else {
                continue;
            };
            if j == i {
                continue;
            }
            let Some(theirs) = layer_of(&parsed[j]) else {
                continue;
            };
            if theirs > own && reported.insert(t.written.clone()) {
                problems.push(format!(
                    "{} (layer {}) takes {} from {} (layer {})",
                    f.rel, LAYERS[own].0, t.written, parsed[j].rel, LAYERS[theirs].0
                ));
            }
            if !t.in_test && !is_test_file {
                edges
                    .entry(i)
                    .or_default()
                    .entry(j)
                    .or_insert_with(|| t.written.clone());
            }
        }
    }
    problems.extend(circles(&parsed, &edges));
    problems
}

/// The layer of a file: its top-level module's, `lib` for `lib.rs`, `main` for
/// `main.rs`; `None` for a top-level module no layer lists.
fn layer_of(f: &File) -> Option<usize> {
    let find = |name: &str| LAYERS.iter().position(|(n, _)| *n == name);
    if f.is_main {
        return find("main");
    }
    match f.module.first() {
        None => find("lib"),
        Some(top) => LAYERS
            .iter()
            .position(|(_, mods)| mods.contains(&top.as_str())),
    }
}

/// The file defining the longest prefix of `target` that a file defines; a name in
/// the crate root is followed through the root's re-export (`crate::Error` is
/// `error::Error`), since the root only gathers names for users.
fn file_of(by_module: &BTreeMap<Vec<String>, usize>, target: &[String]) -> Option<usize> {
    let found = (0..=target.len())
        .rev()
        .find_map(|n| by_module.get(&target[..n]).map(|&i| (n, i)))?;
    match found {
        (0, _)
            if target
                .first()
                .is_some_and(|t| t == "Error" || t == "Result") =>
        {
            by_module.get(&["error".to_string()][..]).copied()
        }
        (_, i) => Some(i),
    }
}

/// One circle per group of files that reach each other, by its first file: "a takes
/// X from b, which takes Y from a". Breaking it shows the next, if any.
fn circles(parsed: &[File], edges: &BTreeMap<usize, BTreeMap<usize, String>>) -> Vec<String> {
    let mut in_reported: BTreeSet<usize> = BTreeSet::new();
    let mut out = Vec::new();
    for (&a, outs) in edges {
        if in_reported.contains(&a) {
            continue;
        }
        for &b in outs.keys() {
            let Some(back) = path_between(edges, b, a) else {
                continue;
            };
            let mut ring = vec![a];
            ring.extend(back);
            // The whole group: every file a reaches that reaches a.
            in_reported.extend((0..parsed.len()).filter(|&n| {
                path_between(edges, a, n).is_some() && path_between(edges, n, a).is_some()
            }));
            let mut line = format!("circle: {}", parsed[ring[0]].rel);
            for (k, w) in ring.windows(2).enumerate() {
                let name = &edges[&w[0]][&w[1]];
                let sep = if k == 0 { " takes" } else { ", which takes" };
                line.push_str(&format!("{sep} {name} from {}", parsed[w[1]].rel));
            }
            out.push(line);
            break;
        }
    }
    out
}

/// The shortest chain of files from `from` to `to` (both included), breadth first.
fn path_between(
    edges: &BTreeMap<usize, BTreeMap<usize, String>>,
    from: usize,
    to: usize,
) -> Option<Vec<usize>> {
    let mut prev: BTreeMap<usize, usize> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([from]);
    let mut seen = BTreeSet::from([from]);
    while let Some(n) = queue.pop_front() {
        if n == to {
            let mut chain = vec![to];
            let mut at = to;
            while at != from {
                at = prev[&at];
                chain.push(at);
            }
            chain.reverse();
            return Some(chain);
        }
        for &m in edges
            .get(&n)
            .map(|o| o.keys().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            if seen.insert(m) {
                prev.insert(m, n);
                queue.push_back(m);
            }
        }
    }
    None
}

fn child(module: &[String], name: &str) -> Vec<String> {
    let mut m = module.to_vec();
    m.push(name.to_string());
    m
}

/// The module path of `src/<rel>`: `src/a/b.rs` and `src/a/b/mod.rs` are `a::b`.
fn module_of(rel: &str) -> Vec<String> {
    let inner = rel
        .strip_prefix("src/")
        .unwrap_or(rel)
        .trim_end_matches(".rs");
    let mut parts: Vec<String> = inner.split('/').map(str::to_string).collect();
    if parts
        .last()
        .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
    {
        parts.pop();
    }
    parts
}

/// Where a parse is: the inline modules open around it.
#[derive(Default)]
struct Scope {
    /// Inline module names, with the brace depth each was opened at and whether it
    /// is test code.
    inline: Vec<(String, usize, bool)>,
    depth: usize,
}

impl Scope {
    /// `mod name {`: a module opens.
    fn enter(&mut self, name: String, test: bool) {
        self.inline.push((name, self.depth, test));
        self.depth += 1;
    }

    /// `{`.
    fn open(&mut self) {
        self.depth += 1;
    }

    /// `}`: closes the inline module opened at this depth, if one was.
    fn close(&mut self) {
        self.depth = self.depth.saturating_sub(1);
        if self.inline.last().is_some_and(|(_, d, _)| *d == self.depth) {
            self.inline.pop();
        }
    }

    fn in_test(&self) -> bool {
        self.inline.iter().any(|(_, _, t)| *t)
    }

    /// The module path here, in the file of module `file`.
    fn module(&self, file: &[String]) -> Vec<String> {
        let mut m = file.to_vec();
        m.extend(self.inline.iter().map(|(n, _, _)| n.clone()));
        m
    }
}

/// Is `toks[i..]` `#[cfg(test)]`?
fn is_cfg_test(toks: &[String], i: usize) -> bool {
    ["#", "[", "cfg", "(", "test", ")", "]"]
        .iter()
        .enumerate()
        .all(|(k, want)| toks.get(i + k).is_some_and(|t| t == want))
}

/// The modules each scope of the file declares (`mod x;` or `mod x { … }`), so that
/// a child's name resolves wherever it is used in the file.
fn declared_modules(module: &[String], toks: &[String]) -> BTreeMap<Vec<String>, BTreeSet<String>> {
    let mut children: BTreeMap<Vec<String>, BTreeSet<String>> = BTreeMap::new();
    let mut scope = Scope::default();
    let mut i = 0;
    while i < toks.len() {
        match toks[i].as_str() {
            "{" => scope.open(),
            "}" => scope.close(),
            "mod" if is_ident(toks.get(i + 1)) => {
                let name = toks[i + 1].clone();
                children
                    .entry(scope.module(module))
                    .or_default()
                    .insert(name.clone());
                if toks.get(i + 2).is_some_and(|t| t == "{") {
                    scope.enter(name, false);
                    i += 3;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    children
}

/// The path starting at `toks[i]` (`a::b::c`), and the index after it.
fn path_at(toks: &[String], i: usize) -> (Vec<String>, usize) {
    let mut p = vec![toks[i].clone()];
    let mut j = i + 1;
    while toks.get(j).is_some_and(|t| t == "::") && is_ident(toks.get(j + 1)) {
        p.push(toks[j + 1].clone());
        j += 2;
    }
    (p, j)
}

fn parse_file(rel: &str, text: &str) -> File {
    let module = module_of(rel);
    let is_main = rel == "src/main.rs";
    let toks = tokens(text);
    let children = declared_modules(&module, &toks);
    let mut test_children = Vec::new();
    let mut scope = Scope::default();
    let mut cfg_test = false;
    let mut taken = Vec::new();
    let mut take = |scope: &Scope, p: Vec<String>| {
        if let Some(target) = resolve(&scope.module(&module), &p, is_main, &children) {
            let written = p.join("::");
            let in_test = scope.in_test();
            taken.push(Taken {
                written,
                target,
                in_test,
            });
        }
    };
    let mut i = 0;
    while i < toks.len() {
        match toks[i].as_str() {
            "#" if is_cfg_test(&toks, i) => {
                cfg_test = true;
                i += 7;
                continue;
            }
            "{" => scope.open(),
            "}" => scope.close(),
            "mod" if is_ident(toks.get(i + 1)) => {
                let name = toks[i + 1].clone();
                let in_test = cfg_test || scope.in_test();
                cfg_test = false;
                if toks.get(i + 2).is_some_and(|t| t == "{") {
                    scope.enter(name, in_test);
                    i += 3;
                    continue;
                }
                if in_test && scope.inline.is_empty() {
                    test_children.push(name);
                }
                i += 2;
                continue;
            }
            "fn" | "struct" | "enum" | "impl" | "const" | "static" | "type" | "trait" => {
                cfg_test = false
            }
            "use" => {
                cfg_test = false;
                let mut paths = Vec::new();
                i = use_tree(&toks, i + 1, Vec::new(), &mut paths);
                for p in paths {
                    take(&scope, p);
                }
                continue;
            }
            _ if is_ident(Some(&toks[i]))
                && toks.get(i + 1).is_some_and(|t| t == "::")
                && (i == 0 || toks[i - 1] != "::") =>
            {
                let (p, next) = path_at(&toks, i);
                take(&scope, p);
                i = next;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    File {
        rel: rel.to_string(),
        module,
        is_main,
        taken,
        test_children,
    }
}

/// Parse the use tree starting at `i` under `prefix`, pushing each full path (a glob
/// ends at its module); returns the index after the tree (after `;` at the top).
fn use_tree(
    toks: &[String],
    mut i: usize,
    prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    let mut path = prefix;
    loop {
        match toks.get(i).map(String::as_str) {
            Some("{") => {
                i += 1;
                loop {
                    match toks.get(i).map(String::as_str) {
                        Some("}") => {
                            i += 1;
                            break;
                        }
                        Some(",") => i += 1,
                        None => return i,
                        _ => i = use_tree(toks, i, path.clone(), out),
                    }
                }
                break;
            }
            Some("*") => {
                out.push(path.clone());
                i += 1;
                break;
            }
            Some("self") if !path.is_empty() => {
                out.push(path.clone());
                i += 1;
                break;
            }
            Some("::") => i += 1,
            Some(t) if is_ident(Some(&t.to_string())) && t != "as" => {
                path.push(t.to_string());
                i += 1;
                if toks.get(i).is_some_and(|t| t != "::") {
                    out.push(path.clone());
                    break;
                }
            }
            _ => break,
        }
    }
    if toks.get(i).is_some_and(|t| t == "as") {
        i += 2;
    }
    if toks.get(i).is_some_and(|t| t == ";") {
        i += 1;
    }
    i
}

/// The module path `p` (as written in module `cur`) names, if it is in this crate.
fn resolve(
    cur: &[String],
    p: &[String],
    is_main: bool,
    children: &BTreeMap<Vec<String>, BTreeSet<String>>,
) -> Option<Vec<String>> {
    let mut base: Vec<String>;
    let mut rest = p;
    match p.first()?.as_str() {
        "crate" if !is_main => {
            base = Vec::new();
            rest = &p[1..];
        }
        "stack" if is_main => {
            base = Vec::new();
            rest = &p[1..];
        }
        "self" => {
            base = cur.to_vec();
            rest = &p[1..];
        }
        "super" => {
            base = cur.to_vec();
            while rest.first().is_some_and(|s| s == "super") {
                base.pop();
                rest = &rest[1..];
            }
        }
        first if !is_main && children.get(cur).is_some_and(|c| c.contains(first)) => {
            base = cur.to_vec();
        }
        _ => return None,
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

fn is_ident(t: Option<&String>) -> bool {
    t.is_some_and(|t| {
        t.chars()
            .next()
            .is_some_and(|c| c.is_alphabetic() || c == '_')
            && t.chars().all(|c| c.is_alphanumeric() || c == '_')
    })
}

/// The tokens of Rust source that matter for paths: identifiers, `::` and single
/// punctuation; comments, strings, chars and numbers are dropped.
fn tokens(text: &str) -> Vec<String> {
    let c: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let ident_char = |ch: char| ch.is_alphanumeric() || ch == '_';
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied();
        if ch == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if ch == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if ch == '\'' {
            if next == Some('\\') {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if c.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                // A lifetime: its name is skipped as an identifier.
                i += 1;
                while i < c.len() && ident_char(c[i]) {
                    i += 1;
                }
            }
        } else if ident_char(ch) {
            let start = i;
            while i < c.len() && ident_char(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            // A raw string (`r"…"`, `r#"…"#`, `br#"…"#`): skipped whole.
            if (word == "r" || word == "br") && matches!(c.get(i), Some('"') | Some('#')) {
                let mut hashes = 0;
                while c.get(i) == Some(&'#') {
                    hashes += 1;
                    i += 1;
                }
                if c.get(i) == Some(&'"') {
                    i += 1;
                    loop {
                        if i >= c.len() {
                            break;
                        }
                        if c[i] == '"' && (0..hashes).all(|k| c.get(i + 1 + k) == Some(&'#')) {
                            i += 1 + hashes;
                            break;
                        }
                        i += 1;
                    }
                    continue;
                }
            }
            if word == "b" && c.get(i) == Some(&'\'') {
                continue;
            }
            if !word.chars().next().unwrap().is_ascii_digit() {
                out.push(word);
            }
        } else if ch == ':' && next == Some(':') {
            out.push("::".to_string());
            i += 2;
        } else {
            if !ch.is_whitespace() {
                out.push(ch.to_string());
            }
            i += 1;
        }
    }
    out
}
