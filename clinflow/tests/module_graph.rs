//! No crate of the workspace has an import circle among its modules, so each
//! crate's layering holds (clinflow's is told in its `lib.rs`): nothing below
//! imports from above. Checked here, so that CI keeps it.
//!
//! The graph is read from the code with syn: each module (a file, or an inline
//! `mod x { }`) is a node; each path in module A that starts with `crate::`,
//! `self::` or `super::` (or with a child module's name, or with a name a
//! `use` of such a path brought in) is an edge to the module that path names
//! (its longest prefix that is a module). A `mod x;` declaration is not an
//! edge; `#[cfg(test)]` modules are skipped, as tests may import anything.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::{self, Visit};
use syn::{Attribute, Item, ItemMod, ItemUse, UseTree};

/// A module's path below its crate root: `[]` is the root, `["keys", "rotation"]` is `keys::rotation`.
type ModPath = Vec<String>;

/// One path in the code that makes module `from` depend on module `to`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    from: ModPath,
    to: ModPath,
    file: PathBuf,
    path: String,
}

/// Modules that import one another in a circle (a strongly connected component of
/// more than one module), with the edges among them.
#[derive(Debug)]
struct Cycle {
    /// The crate's root file, `lib.rs` or `main.rs`.
    root: String,
    modules: Vec<ModPath>,
    edges: Vec<Edge>,
}

fn name(module: &[String]) -> String {
    if module.is_empty() { "crate".to_string() } else { module.join("::") }
}

impl fmt::Display for Cycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let modules: Vec<String> = self.modules.iter().map(|m| name(m)).collect();
        writeln!(f, "cycle in {} among {}:", self.root, modules.join(", "))?;
        let same_edge = |a: &Edge, b: &Edge| (&a.from, &a.to, &a.file) == (&b.from, &b.to, &b.file);
        for edges in self.edges.chunk_by(same_edge) {
            let (from, to, file) = (name(&edges[0].from), name(&edges[0].to), edges[0].file.display());
            let paths: Vec<&str> = edges.iter().map(|e| e.path.as_str()).collect();
            writeln!(f, "  {from} -> {to}   {file}: {}", paths.join(", "))?;
        }
        Ok(())
    }
}

/// Every import circle of the crates rooted in `src_dir` (`lib.rs` and `main.rs`
/// are separate crates).
fn cycles(src_dir: &Path) -> Vec<Cycle> {
    let roots: Vec<PathBuf> = ["lib.rs", "main.rs"].iter().map(|root| src_dir.join(root)).collect();
    let roots: Vec<&PathBuf> = roots.iter().filter(|root| root.exists()).collect();
    assert!(!roots.is_empty(), "{} has neither lib.rs nor main.rs", src_dir.display());
    roots.into_iter().flat_map(|root| Crate::read(src_dir, root).cycles()).collect()
}

/// A path as written in module `from`, resolved once every module is known.
struct Reference {
    from: ModPath,
    file: PathBuf,
    segments: Vec<String>,
}

#[derive(Default)]
struct Crate {
    src_dir: PathBuf,
    /// The root file, `lib.rs` or `main.rs`.
    root: String,
    modules: BTreeSet<ModPath>,
    references: Vec<Reference>,
    /// The names a `use` brought into a module, and the paths they stand for.
    aliases: BTreeMap<(ModPath, String), Vec<String>>,
}

impl Crate {
    fn read(src_dir: &Path, root: &Path) -> Crate {
        let name = root.strip_prefix(src_dir).unwrap_or(root).display().to_string();
        let mut krate = Crate { src_dir: src_dir.to_path_buf(), root: name, ..Crate::default() };
        krate.read_file(root, Vec::new(), src_dir.to_path_buf());
        krate
    }

    /// Reads module `module` from `file`, whose child modules' files are in `child_dir`.
    fn read_file(&mut self, file: &Path, module: ModPath, child_dir: PathBuf) {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let file = file.strip_prefix(&self.src_dir).unwrap_or(file).to_path_buf();
        self.read_items(&ast.items, file, module, child_dir);
    }

    fn read_items(&mut self, items: &[Item], file: PathBuf, module: ModPath, child_dir: PathBuf) {
        self.modules.insert(module.clone());
        let mut reader = Reader { krate: self, file, module, child_dir };
        items.iter().for_each(|item| reader.visit_item(item));
    }

    /// The path `segments`, written in module `from`, from the crate root on.
    fn absolute(&self, from: &[String], segments: &[String], follow_aliases: bool) -> Option<Vec<String>> {
        let (first, rest) = segments.split_first()?;
        let mut base = from.to_vec();
        let mut rest = rest;
        match first.as_str() {
            "crate" => base.clear(),
            "self" => {}
            "super" => {
                base.pop()?;
                while rest.first().is_some_and(|s| s == "super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
            }
            child if self.modules.contains(&[from, &[child.to_string()]].concat()) => rest = segments,
            alias if follow_aliases => {
                let target = self.aliases.get(&(from.to_vec(), alias.to_string()))?;
                return self.absolute(from, &[target, rest].concat(), false);
            }
            _ => return None,
        }
        Some([base, rest.to_vec()].concat())
    }

    fn edges(&self) -> BTreeSet<Edge> {
        let mut edges = BTreeSet::new();
        for Reference { from, file, segments } in &self.references {
            let Some(path) = self.absolute(from, segments, true) else { continue };
            let to = (0..=path.len()).rev().map(|n| path[..n].to_vec()).find(|m| self.modules.contains(m));
            if let Some(to) = to.filter(|to| to != from) {
                edges.insert(Edge { from: from.clone(), to, file: file.clone(), path: segments.join("::") });
            }
        }
        edges
    }

    fn cycles(&self) -> Vec<Cycle> {
        let edges = self.edges();
        let reach = |start: &ModPath| {
            let (mut seen, mut todo) = (BTreeSet::new(), vec![start.clone()]);
            while let Some(module) = todo.pop() {
                let next = edges.iter().filter(|e| e.from == module).map(|e| e.to.clone());
                todo.extend(next.filter(|to| seen.insert(to.clone())));
            }
            seen
        };
        let reach: BTreeMap<&ModPath, BTreeSet<ModPath>> = self.modules.iter().map(|m| (m, reach(m))).collect();
        let mut placed = BTreeSet::new();
        let mut cycles = Vec::new();
        for module in &self.modules {
            let circle: Vec<ModPath> = (reach[module].iter())
                .filter(|other| reach[other].contains(module) && !placed.contains(*other))
                .cloned()
                .collect();
            if circle.len() > 1 {
                placed.extend(circle.iter().cloned());
                let edges = edges.iter().filter(|e| circle.contains(&e.from) && circle.contains(&e.to));
                cycles.push(Cycle { root: self.root.clone(), edges: edges.cloned().collect(), modules: circle });
            }
        }
        cycles
    }
}

/// Walks one module's items, recording its references and reading its child modules.
struct Reader<'a> {
    krate: &'a mut Crate,
    /// Below the `src` directory.
    file: PathBuf,
    module: ModPath,
    child_dir: PathBuf,
}

impl Reader<'_> {
    fn refer(&mut self, segments: Vec<String>) {
        let (from, file) = (self.module.clone(), self.file.clone());
        self.krate.references.push(Reference { from, file, segments });
    }

    /// Records each path of a `use` tree (`prefix` leads to it) and the name it brings in.
    fn use_tree(&mut self, prefix: &[String], tree: &UseTree) {
        let (path, alias) = match tree {
            UseTree::Path(p) => return self.use_tree(&[prefix, &[p.ident.to_string()]].concat(), &p.tree),
            UseTree::Group(g) => return g.items.iter().for_each(|tree| self.use_tree(prefix, tree)),
            UseTree::Glob(_) => (prefix.to_vec(), None),
            UseTree::Name(n) if n.ident == "self" => (prefix.to_vec(), prefix.last().cloned()),
            UseTree::Name(n) => ([prefix, &[n.ident.to_string()]].concat(), Some(n.ident.to_string())),
            UseTree::Rename(r) => ([prefix, &[r.ident.to_string()]].concat(), Some(r.rename.to_string())),
        };
        if let Some(alias) = alias {
            self.krate.aliases.insert((self.module.clone(), alias), path.clone());
        }
        self.refer(path);
    }
}

impl<'ast> Visit<'ast> for Reader<'_> {
    fn visit_item_mod(&mut self, item: &'ast ItemMod) {
        if item.attrs.iter().any(is_cfg_test) {
            return;
        }
        let name = item.ident.to_string();
        let module = [self.module.as_slice(), std::slice::from_ref(&name)].concat();
        let dir = self.child_dir.join(&name);
        if let Some((_, items)) = &item.content {
            return self.krate.read_items(items, self.file.clone(), module, dir);
        }
        let file = self.child_dir.join(format!("{name}.rs"));
        let file = if file.exists() { file } else { dir.join("mod.rs") };
        self.krate.read_file(&file, module, dir);
    }

    fn visit_item_use(&mut self, item: &'ast ItemUse) {
        self.use_tree(&[], &item.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        // One segment is an item in scope, `self` the receiver, or `pub(super)`.
        if path.segments.len() > 1 {
            self.refer(path.segments.iter().map(|s| s.ident.to_string()).collect());
        }
        visit::visit_path(self, path);
    }

    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {}

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        visit::visit_macro(self, mac);
        let mut found = Vec::new();
        macro_paths(mac.tokens.clone(), &mut found);
        found.into_iter().for_each(|segments| self.refer(segments));
    }
}

/// The `crate::…`, `self::…` and `super::…` paths in a macro's tokens, which syn
/// leaves unparsed.
fn macro_paths(tokens: TokenStream, found: &mut Vec<Vec<String>>) {
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    for (i, token) in tokens.iter().enumerate() {
        match token {
            TokenTree::Group(group) => macro_paths(group.stream(), found),
            TokenTree::Ident(ident) if ["crate", "self", "super"].iter().any(|s| ident == s) => {
                let mut segments = vec![ident.to_string()];
                let mut next = &tokens[i + 1..];
                while let [TokenTree::Punct(a), TokenTree::Punct(b), TokenTree::Ident(id), ..] = next
                    && a.as_char() == ':'
                    && b.as_char() == ':'
                {
                    segments.push(id.to_string());
                    next = &next[3..];
                }
                if segments.len() > 1 {
                    found.push(segments);
                }
            }
            _ => {}
        }
    }
}

fn is_cfg_test(attr: &Attribute) -> bool {
    matches!(&attr.meta, syn::Meta::List(list) if list.path.is_ident("cfg") && list.tokens.to_string() == "test")
}

fn assert_no_cycles(src_dir: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(src_dir);
    let cycles: Vec<String> = cycles(&dir).iter().map(ToString::to_string).collect();
    assert!(cycles.is_empty(), "import cycles in {src_dir}:\n{}", cycles.concat());
}

#[test]
fn clinflow_has_no_import_cycles() {
    assert_no_cycles("src");
}

#[test]
fn worker_has_no_import_cycles() {
    assert_no_cycles("../worker/src");
}

#[test]
fn audit_sink_has_no_import_cycles() {
    assert_no_cycles("../audit-sink/src");
}

#[test]
fn ingest_has_no_import_cycles() {
    assert_no_cycles("../ingest/src");
}

#[test]
fn api_has_no_import_cycles() {
    assert_no_cycles("../api/src");
}

#[test]
fn bench_has_no_import_cycles() {
    assert_no_cycles("../bench/src");
}

// The checker itself, on small module trees.

/// The cycles of a crate made of `files` (path below `src/`, text).
fn cycles_of(files: &[(&str, &str)]) -> std::io::Result<Vec<Cycle>> {
    let dir = tempfile::tempdir()?;
    for (path, text) in files {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap_or(dir.path()))?;
        std::fs::write(path, text)?;
    }
    Ok(cycles(dir.path()))
}

fn modules(cycle: &Cycle) -> Vec<String> {
    cycle.modules.iter().map(|m| name(m)).collect()
}

#[test]
fn a_circle_is_found_with_the_paths_that_make_it() {
    let found = cycles_of(&[
        ("lib.rs", "mod a; mod b;"),
        ("a.rs", "use crate::b::B; pub struct A;"),
        ("b.rs", "pub struct B; fn f() { let _ = crate::a::A; }"),
    ])
    .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(modules(&found[0]), ["a", "b"]);
    let paths: Vec<&str> = found[0].edges.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["crate::b::B", "crate::a::A"]);
}

#[test]
fn a_plain_tree_passes() {
    let found = cycles_of(&[
        ("lib.rs", "pub mod a; pub mod b; pub use b::B; #[cfg(test)] mod fixtures;"),
        ("a.rs", "pub struct A; #[cfg(test)] mod tests { pub const N: u8 = 1; use crate::fixtures::f; }"),
        ("fixtures.rs", "pub fn f() -> u8 { crate::a::tests::N }"),
        ("b.rs", "use crate::a::A; pub(crate) struct B(A); mod c;"),
        ("b/c.rs", "pub(super) fn f() -> crate::a::A { crate::a::A }"),
    ])
    .unwrap();
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn a_grouped_use_is_resolved() {
    let found = cycles_of(&[
        ("lib.rs", "mod a; mod b; mod c;"),
        ("a.rs", "use crate::{c, b::{self, B}};"),
        ("b.rs", "pub struct B; fn f() { crate::a::g() }"),
        ("c.rs", ""),
    ])
    .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(modules(&found[0]), ["a", "b"]);
    let paths: Vec<&str> = found[0].edges.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["crate::b", "crate::b::B", "crate::a::g"]);
}

#[test]
fn super_resolves_to_the_parent_and_a_re_export_of_the_child_closes_the_circle() {
    let found = cycles_of(&[
        ("lib.rs", "mod outer;"),
        ("outer/mod.rs", "mod inner; pub use inner::Thing; pub struct Config;"),
        ("outer/inner.rs", "use super::Config; pub struct Thing(Config);"),
    ])
    .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(modules(&found[0]), ["outer", "outer::inner"]);
}

#[test]
fn paths_in_macros_inline_modules_and_through_module_aliases_count() {
    let found = cycles_of(&[
        ("lib.rs", "mod a; mod outer { pub mod inner { pub fn f() { println!(\"{}\", crate::a::X) } } }"),
        ("a.rs", "use crate::outer; pub const X: u8 = 1; fn g() { outer::inner::f() }"),
    ])
    .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(modules(&found[0]), ["a", "outer::inner"]);
}
