//! The layering written in `docs/architecture.md` is the code's: no crate of the workspace
//! has an import circle between its top-level modules, and in the postgres crate every
//! module imports only modules of the layers below its own, as the document lists them.
//! Imports are read as `crate::` paths in each module's files (its unit tests, which come
//! last in a file, excluded); comments are ignored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → the top-level modules it imports.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The names a `crate::` path or `crate::{...}` group starts with.
fn imported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        // `$crate::` (macros) is the crate's root too; `taskhistory_core::` etc. are not.
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item = String::new();
            let mut items = Vec::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                if c == ',' && depth == 1 {
                    items.push(std::mem::take(&mut item));
                } else {
                    item.push(c);
                }
            }
            items.push(item);
            for item in items {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    names.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                names.insert(name);
            }
        }
    }
    names
}

/// The import graph of the crate whose sources are in `src`.
fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs").to_owned();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let code = text.split("#[cfg(test)]\nmod ").next().unwrap_or("");
        let code: String = code
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let names = imported(&code);
        graph
            .entry(top.clone())
            .or_default()
            .extend(names.into_iter().filter(|n| *n != top));
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for imports in graph.values_mut() {
        imports.retain(|m| modules.contains(m));
    }
    graph
}

/// The modules `from` reaches by following imports.
fn reached(graph: &Graph, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<&str> = graph[from].iter().map(String::as_str).collect();
    while let Some(m) = todo.pop() {
        if seen.insert(m.to_owned()) {
            todo.extend(graph[m].iter().map(String::as_str));
        }
    }
    seen
}

fn circles(graph: &Graph) -> Vec<String> {
    graph
        .keys()
        .filter(|m| reached(graph, m).contains(*m))
        .cloned()
        .collect()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn no_crate_has_an_import_circle() {
    let crates = root().join("crates");
    let mut checked = 0;
    for entry in std::fs::read_dir(&crates).unwrap() {
        let src = entry.unwrap().path().join("src");
        if !src.is_dir() {
            continue;
        }
        let graph = graph(&src);
        if graph.len() < 2 {
            continue; // one file: nothing to circle
        }
        let circle = circles(&graph);
        assert!(
            circle.is_empty(),
            "{}: these modules import each other in a circle: {circle:?}\n{graph:#?}",
            src.display()
        );
        checked += 1;
    }
    // core, postgres and the CLI have modules of their own.
    assert!(checked >= 3, "only {checked} crates with modules found");
}

/// The postgres crate's layers as `docs/architecture.md` lists them, bottom first: the
/// lines of the block that follows the marker line.
fn documented_layers() -> Vec<Vec<String>> {
    let doc = std::fs::read_to_string(root().join("docs/architecture.md")).unwrap();
    let marker = "Layers of the postgres crate, bottom first:";
    let after = doc
        .split(marker)
        .nth(1)
        .unwrap_or_else(|| panic!("docs/architecture.md has no line {marker:?}"));
    let block = after
        .split("```")
        .nth(1)
        .unwrap_or_else(|| panic!("no ``` block after {marker:?}"));
    block
        .lines()
        .skip(1) // the fence's language tag
        .map(|l| {
            l.split(|c: char| c == ',' || c.is_whitespace())
                .filter(|w| !w.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn postgres_modules_import_only_the_layers_below_theirs() {
    let graph = graph(&root().join("crates/postgres/src"));
    let layers = documented_layers();
    let layer_of: BTreeMap<&str, usize> = layers
        .iter()
        .enumerate()
        .flat_map(|(n, layer)| layer.iter().map(move |m| (m.as_str(), n)))
        .collect();
    let listed: BTreeSet<&str> = layer_of.keys().copied().collect();
    let modules: BTreeSet<&str> = graph.keys().map(String::as_str).collect();
    assert_eq!(
        listed, modules,
        "docs/architecture.md's layer list and the crate's modules differ"
    );
    for (module, imports) in &graph {
        for import in imports {
            assert!(
                layer_of[import.as_str()] < layer_of[module.as_str()],
                "`{module}` imports `{import}`, which docs/architecture.md puts in its own \
                 layer or above"
            );
        }
    }
}

#[test]
fn the_reader_finds_a_circle() {
    // The checks above would pass on a reader that finds nothing: it must see this one.
    let mut graph = Graph::new();
    graph.insert(
        "a".into(),
        imported("use crate::{b::X, c};").into_iter().collect(),
    );
    graph.insert(
        "b".into(),
        imported("fn f() { crate::a::g() }").into_iter().collect(),
    );
    graph.insert("c".into(), BTreeSet::new());
    assert_eq!(graph["a"], BTreeSet::from(["b".to_owned(), "c".to_owned()]));
    assert_eq!(circles(&graph), ["a", "b"]);
}
