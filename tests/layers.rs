//! No import cycle between modules, in either crate (`zhuli` and `zhuli-sim`).
//!
//! Every product module (test modules left out) is read with `syn`; each path it names that
//! resolves into its own crate (`crate::…`, `super::…`, `self::…`, a child module's name) is an
//! edge to the deepest module that path reaches. The graph of modules must have no cycle: a
//! module may use the modules below it, never one that uses it back, directly or around a circle.
//! A module may use what its own ancestors define (a child takes its family's shared types from
//! its parent): a circle made only of a parent and its descendants is allowed when it is gone
//! once the arrows back up to ancestors are set aside. A circle that reaches a module outside
//! that family counts whole, so a circle through a third module is found.
//!
//! The failure lists each circle and, for each arrow in it, the file and the paths behind it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use syn::visit::Visit;

/// A module: its path from the crate root (`[]` is the root) and the file holding it.
struct Module {
    path: Vec<String>,
    file: PathBuf,
    children: BTreeSet<String>,
}

/// Paths named in one module, as written, with the module they are written in.
struct Named {
    module: Vec<String>,
    paths: Vec<Vec<String>>,
}

/// `#[cfg(test)]` exactly (`cfg(not(test))` is product code).
fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg") && a.meta.require_list().map(|l| l.tokens.to_string() == "test").unwrap_or(false)
    })
}

/// Every `a::b::c` written in a token stream (a macro's body), groups searched too.
fn token_paths(tokens: proc_macro2::TokenStream, out: &mut Vec<Vec<String>>) {
    use proc_macro2::TokenTree;
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            TokenTree::Group(g) => {
                token_paths(g.stream(), out);
                i += 1;
            }
            TokenTree::Ident(first) => {
                let mut path = vec![first.to_string()];
                let mut j = i + 1;
                // `::` is two joint `:` punctuation tokens, then the next segment.
                while j + 2 < tokens.len() + 1 {
                    let colons = matches!((tokens.get(j), tokens.get(j + 1)), (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b))) if a.as_char() == ':' && b.as_char() == ':');
                    match (colons, tokens.get(j + 2)) {
                        (true, Some(TokenTree::Ident(next))) => {
                            path.push(next.to_string());
                            j += 3;
                        }
                        _ => break,
                    }
                }
                if path.len() > 1 || ["crate", "super", "self"].contains(&path[0].as_str()) {
                    out.push(path);
                }
                i = j.max(i + 1);
            }
            _ => i += 1,
        }
    }
}

/// Every `use` tree flattened into paths (a glob ends the path at its module).
fn use_paths(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            use_paths(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => {
            let mut p = prefix.clone();
            if n.ident != "self" {
                p.push(n.ident.to_string());
            }
            out.push(p);
        }
        syn::UseTree::Rename(r) => {
            let mut p = prefix.clone();
            if r.ident != "self" {
                p.push(r.ident.to_string());
            }
            out.push(p);
        }
        syn::UseTree::Glob(_) => out.push(prefix.clone()),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                use_paths(t, prefix, out);
            }
        }
    }
}

/// Collects the paths of one module's items, skipping test-only items and nested modules
/// (those are modules of their own).
#[derive(Default)]
struct Paths {
    out: Vec<Vec<String>>,
}

impl<'a> Visit<'a> for Paths {
    fn visit_item(&mut self, i: &'a syn::Item) {
        let attrs: &[syn::Attribute] = match i {
            syn::Item::Fn(x) => &x.attrs,
            syn::Item::Impl(x) => &x.attrs,
            syn::Item::Use(x) => &x.attrs,
            syn::Item::Struct(x) => &x.attrs,
            syn::Item::Enum(x) => &x.attrs,
            syn::Item::Const(x) => &x.attrs,
            syn::Item::Static(x) => &x.attrs,
            syn::Item::Trait(x) => &x.attrs,
            syn::Item::Type(x) => &x.attrs,
            syn::Item::Mod(_) => return,
            _ => &[],
        };
        if is_test_only(attrs) {
            return;
        }
        if let syn::Item::Use(u) = i {
            use_paths(&u.tree, &mut Vec::new(), &mut self.out);
            return;
        }
        syn::visit::visit_item(self, i);
    }

    fn visit_impl_item_fn(&mut self, f: &'a syn::ImplItemFn) {
        if !is_test_only(&f.attrs) {
            syn::visit::visit_impl_item_fn(self, f);
        }
    }

    // `pub(super)` names who may see an item, not what it uses.
    fn visit_visibility(&mut self, _: &'a syn::Visibility) {}

    fn visit_path(&mut self, p: &'a syn::Path) {
        if p.leading_colon.is_none() {
            self.out.push(p.segments.iter().map(|s| s.ident.to_string()).collect());
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'a syn::Macro) {
        // Paths inside macro calls (`format!`, `json!`, `log::info!(key = v; …)`, …) read from
        // their tokens, whatever the macro's grammar.
        token_paths(m.tokens.clone(), &mut self.out);
        syn::visit::visit_macro(self, m);
    }
}

/// Read the module at `file` (path `path`) and, recursively, its children.
fn read(
    file: &Path,
    path: Vec<String>,
    items: Option<&[syn::Item]>,
    modules: &mut Vec<Module>,
    named: &mut Vec<Named>,
) {
    let owned;
    let items = match items {
        Some(i) => i,
        None => {
            let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
            owned = syn::parse_file(&text).unwrap_or_else(|e| panic!("parse {}: {e}", file.display()));
            &owned.items[..]
        }
    };
    let mut paths = Paths::default();
    for i in items {
        paths.visit_item(i);
    }
    named.push(Named { module: path.clone(), paths: paths.out });
    let dir = match file.file_stem().and_then(|s| s.to_str()) {
        Some("mod" | "lib" | "main") => file.parent().expect("dir").to_path_buf(),
        Some(stem) => file.parent().expect("dir").join(stem),
        None => unreachable!("a source file has a name"),
    };
    let mut children = BTreeSet::new();
    for i in items {
        let syn::Item::Mod(m) = i else { continue };
        if is_test_only(&m.attrs) {
            continue;
        }
        let name = m.ident.to_string();
        children.insert(name.clone());
        let mut child = path.clone();
        child.push(name.clone());
        match &m.content {
            Some((_, inner)) => read(file, child, Some(inner), modules, named),
            None => {
                let flat = dir.join(format!("{name}.rs"));
                let nested = dir.join(&name).join("mod.rs");
                let f = if flat.is_file() { flat } else { nested };
                read(&f, child, None, modules, named);
            }
        }
    }
    modules.push(Module { path, file: file.to_path_buf(), children });
}

/// The module a path written in `at` reaches, if it is in this crate.
fn resolve(at: &[String], written: &[String], modules: &BTreeMap<Vec<String>, &Module>) -> Option<Vec<String>> {
    let (mut base, rest): (Vec<String>, &[String]) = match written.first().map(String::as_str) {
        Some("crate") => (vec![], &written[1..]),
        Some("self") => (at.to_vec(), &written[1..]),
        Some("super") => {
            let mut base = at.to_vec();
            let mut rest = written;
            while rest.first().map(String::as_str) == Some("super") {
                base.pop()?;
                rest = &rest[1..];
            }
            (base, rest)
        }
        Some(first) if modules.get(at).is_some_and(|m| m.children.contains(first)) => (at.to_vec(), written),
        _ => return None,
    };
    for seg in rest {
        let mut next = base.clone();
        next.push(seg.clone());
        if modules.contains_key(&next) {
            base = next;
        } else {
            break;
        }
    }
    Some(base)
}

fn name(path: &[String], krate: &str) -> String {
    if path.is_empty() { krate.to_owned() } else { format!("{krate}::{}", path.join("::")) }
}

/// The circles of a graph (Tarjan's strongly connected components of more than one module).
fn circles(edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<Vec<String>>> {
    struct T<'a> {
        edges: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<Vec<String>, usize>,
        low: BTreeMap<Vec<String>, usize>,
        stack: Vec<Vec<String>>,
        on: BTreeSet<Vec<String>>,
        out: Vec<Vec<Vec<String>>>,
    }
    fn visit(t: &mut T<'_>, v: &Vec<String>) {
        let i = t.index.len();
        t.index.insert(v.clone(), i);
        t.low.insert(v.clone(), i);
        t.stack.push(v.clone());
        t.on.insert(v.clone());
        let edges = t.edges;
        for w in edges.get(v).into_iter().flatten() {
            if !t.index.contains_key(w) {
                visit(t, w);
                let l = t.low[v].min(t.low[w]);
                t.low.insert(v.clone(), l);
            } else if t.on.contains(w) {
                let l = t.low[v].min(t.index[w]);
                t.low.insert(v.clone(), l);
            }
        }
        if t.low[v] == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(&w);
                let done = &w == v;
                scc.push(w);
                if done {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                t.out.push(scc);
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

/// The circles of one crate, as readable text (empty when there are none).
fn check(root: &Path, krate: &str) -> (usize, String) {
    let (mut modules, mut named) = (Vec::new(), Vec::new());
    read(root, vec![], None, &mut modules, &mut named);
    let by_path: BTreeMap<Vec<String>, &Module> = modules.iter().map(|m| (m.path.clone(), m)).collect();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    let mut why: BTreeMap<(Vec<String>, Vec<String>), BTreeSet<String>> = BTreeMap::new();
    for n in &named {
        for p in &n.paths {
            let Some(to) = resolve(&n.module, p, &by_path) else { continue };
            if to == n.module {
                continue;
            }
            edges.entry(n.module.clone()).or_default().insert(to.clone());
            why.entry((n.module.clone(), to)).or_default().insert(p.join("::"));
        }
    }
    // A circle inside one family (one of its modules is the ancestor of all the others) is
    // a parent and its children sharing the parent's types: allowed, as long as the circle is
    // gone once the arrows back up to ancestors are set aside (children may not use each other
    // in a circle). A circle that reaches outside the family counts whole.
    let mut found = Vec::new();
    for c in circles(&edges) {
        let head = c.iter().find(|m| c.iter().all(|o| o.starts_with(m)));
        if head.is_none() {
            found.push(c);
            continue;
        }
        let inner: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = c
            .iter()
            .map(|from| {
                let to = edges.get(from).into_iter().flatten().filter(|t| c.contains(t) && !from.starts_with(t));
                (from.clone(), to.cloned().collect())
            })
            .collect();
        found.extend(circles(&inner));
    }
    let mut text = String::new();
    for c in &found {
        text.push_str(&format!("a circle of {} modules:\n", c.len()));
        for from in c {
            for to in edges.get(from).into_iter().flatten().filter(|t| c.contains(t)) {
                let file = by_path[from].file.display();
                let paths: Vec<&String> = why[&(from.clone(), to.clone())].iter().take(4).collect();
                text.push_str(&format!("  {} -> {} ({file}: {paths:?})\n", name(from, krate), name(to, krate)));
            }
        }
    }
    (modules.len(), text)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn no_module_of_the_agent_imports_from_a_module_that_imports_it() {
    let (count, text) = check(&repo().join("agent/src/lib.rs"), "zhuli");
    assert!(count > 80, "the agent's modules were not all read: {count}");
    assert!(text.is_empty(), "import cycles between the agent's modules:\n{text}");
}

#[test]
fn no_module_of_the_simulators_imports_from_a_module_that_imports_it() {
    let (count, text) = check(&repo().join("sim/src/lib.rs"), "zhuli_sim");
    assert!(count >= 12, "the simulator's modules were not all read: {count}");
    assert!(text.is_empty(), "import cycles between the simulator's modules:\n{text}");
}

/// The check itself finds a circle: two modules written to use each other.
#[test]
fn a_circle_is_found_and_named() {
    let dir = std::env::temp_dir().join(format!("zhuli-layers-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("a")).expect("dir");
    std::fs::write(dir.join("lib.rs"), "mod a;\nmod b;\nmod c;\n").expect("write");
    std::fs::write(dir.join("a/mod.rs"), "mod inner;\npub fn f() { crate::b::g() }\n").expect("write");
    std::fs::write(dir.join("a/inner.rs"), "pub fn h() {}\n").expect("write");
    std::fs::write(dir.join("b.rs"), "use super::a::inner;\npub fn g() { inner::h() }\n").expect("write");
    std::fs::write(dir.join("c.rs"), "pub fn k() { crate::b::g(); crate::a::f() }\n").expect("write");
    let (count, text) = check(&dir.join("lib.rs"), "demo");
    assert_eq!(count, 5);
    assert!(text.is_empty(), "a → b → a::inner is a chain, not a circle:\n{text}");
    std::fs::write(dir.join("a/inner.rs"), "pub fn h() { let _ = format!(\"{}\", crate::c::k()); }\n").expect("write");
    let (_, text) = check(&dir.join("lib.rs"), "demo");
    assert!(text.contains("demo::a::inner -> demo::c"), "{text}");
    assert!(text.contains("demo::c -> demo::b") && text.contains("demo::b -> demo::a::inner"), "{text}");
    // A child re-exporting its parent's type does not hide a circle through a third module,
    // and a path inside a macro's tokens counts.
    std::fs::write(dir.join("a/inner.rs"), "pub use super::S;\n").expect("write");
    std::fs::write(
        dir.join("a/mod.rs"),
        "mod inner;\npub struct S;\npub fn f() { log::info!(x = 1; \"{}\", crate::c::k()) }\n",
    )
    .expect("write");
    std::fs::write(dir.join("c.rs"), "pub fn k(_: crate::a::inner::S) {}\n").expect("write");
    std::fs::write(dir.join("b.rs"), "pub fn g() {}\n").expect("write");
    let (_, text) = check(&dir.join("lib.rs"), "demo");
    assert!(text.contains("demo::a -> demo::c") && text.contains("demo::c -> demo::a::inner"), "{text}");
    // A parent and its children alone, the children using the parent's types: allowed.
    std::fs::write(dir.join("a/mod.rs"), "mod inner;\npub struct S;\npub fn f() { inner::h() }\n").expect("write");
    std::fs::write(dir.join("a/inner.rs"), "pub fn h() -> super::S { super::S }\n").expect("write");
    std::fs::write(dir.join("c.rs"), "pub fn k() {}\n").expect("write");
    let (_, text) = check(&dir.join("lib.rs"), "demo");
    assert!(text.is_empty(), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}
