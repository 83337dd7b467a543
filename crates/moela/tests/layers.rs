//! The library's modules import downwards only: each top-level module of `crates/moela/src` may use the
//! modules listed before it in [`LAYERS`] and none after, so the graph has no cycles and a reader can take
//! the crate bottom-up (docs/architecture.md §7 walks it top-down). The other crates' modules must not form
//! cycles either, and every `.md` file a comment cites must exist in the repository.
//!
//! Imports are read from the source text (`crate::name` paths and `use crate::{...}` lists), leaving out
//! unit-test modules, which may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// moela's top-level modules, lowest first.
const LAYERS: &[&str] = &[
    "error", "config", "chat", "text", "sample", "memory",   // plain data and text
    "gpu",      // the device, weight formats, kernels and replay
    "load",     // checkpoint files
    "cache",    // the latent KV cache
    "info",     // sizes from a config
    "model",    // the transformer's blocks
    "engine",   // a loaded model
    "generate", // sessions and the generation loop
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `crate::` modules each top-level module of the crate at `src` imports: `{module: {imported}}`.
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let text = text.split("\n#[cfg(test)]\nmod tests").next().unwrap();
        let used = graph.entry(top.clone()).or_default();
        let mut rest = text;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(list) = rest.strip_prefix('{') {
                let end = list.find('}').unwrap_or(list.len());
                for item in list[..end].split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    used.insert(name);
                }
            } else {
                used.insert(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect());
            }
        }
        used.retain(|m| !m.is_empty() && *m != top && m.chars().next().is_some_and(|c| c.is_lowercase()));
    }
    graph
}

/// The modules on a cycle of `graph`, if any.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            return Some(path[at..].to_vec());
        }
        if !done.insert(m.to_string()) {
            return None;
        }
        path.push(m.to_string());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|m| visit(m, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_library_imports_downwards_only() {
    let graph = imports(&repo().join("crates/moela/src"));
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    for (module, used) in &graph {
        let Some(r) = rank(module) else {
            panic!("module `{module}` is not in LAYERS: place it in the order");
        };
        for u in used {
            let Some(ru) = rank(u) else {
                panic!("`{module}` imports `crate::{u}`, which is not a module in LAYERS");
            };
            assert!(ru < r, "`{module}` imports `{u}`, which sits above it in LAYERS");
        }
    }
}

#[test]
fn no_crate_has_a_module_cycle() {
    for krate in ["moela", "moela-cli", "moela-tools", "moela-train", "moela-wasm"] {
        let src = repo().join("crates").join(krate).join("src");
        if let Some(c) = cycle(&imports(&src)) {
            panic!("{krate}: modules import each other in a cycle: {}", c.join(" -> "));
        }
    }
}

#[test]
fn every_cited_document_exists() {
    let root = repo();
    let mut files = Vec::new();
    for dir in ["crates", "shaders"] {
        let mut found = Vec::new();
        rust_files(&root.join(dir), &mut found);
        files.extend(found);
    }
    for entry in std::fs::read_dir(root.join("shaders")).unwrap() {
        files.push(entry.unwrap().path());
    }
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for cited in text.split('`').skip(1).step_by(2) {
            let name = cited.trim_end_matches(".md");
            if cited.ends_with(".md")
                && !name.is_empty()
                && name.chars().all(|c| c.is_alphanumeric() || "/_-.".contains(c))
            {
                assert!(
                    root.join(cited).exists() || root.join("docs").join(cited).exists(),
                    "{} cites `{cited}`, which the repository does not have",
                    file.display()
                );
            }
        }
    }
}
