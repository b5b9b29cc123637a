//! The layout's rules, checked from the source text: no module of the `rsdn` crate imports a
//! module that imports it (directly or around a longer circle), and the model at the bottom
//! imports nothing of rsdn's. An import is any `crate::` or `super::` path outside test code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path of a source file: src/proxy/render/mod.rs -> ["proxy", "render"].
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts
        .last()
        .is_some_and(|l| l == "mod" || l == "lib" || l == "main")
    {
        parts.pop();
    }
    parts
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without its tests and comments.
fn code(text: &str) -> String {
    let end = text.find("#[cfg(test)]").unwrap_or(text.len());
    text[..end]
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules a file imports, resolved against the known modules.
fn imports(module: &[String], text: &str, known: &BTreeSet<Vec<String>>) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let words = |s: &str| -> Vec<String> {
        s.split("::")
            .map(|w| {
                w.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|w| !w.is_empty())
            .collect()
    };
    let code = code(text);
    let mut rest = code.as_str();
    while let Some(at) = rest.find(['c', 's']) {
        let tail = &rest[at..];
        let boundary = at == 0 || !rest[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_');
        let path = if boundary && tail.starts_with("crate::") {
            Some(words(&tail["crate::".len()..]))
        } else if boundary && tail.starts_with("super::") {
            // `super` is the parent of the file's module (a mod.rs file is its directory's).
            let mut base: Vec<String> = module.to_vec();
            base.pop();
            let mut t = tail;
            while let Some(more) = t.strip_prefix("super::") {
                t = more;
                if t.starts_with("super::") {
                    base.pop();
                }
            }
            let mut p = base;
            p.extend(words(t));
            Some(p)
        } else {
            None
        };
        if let Some(mut p) = path {
            while !p.is_empty() && !known.contains(&p) {
                p.pop();
            }
            if !p.is_empty() && p != module {
                out.insert(p);
            }
        }
        rest = &rest[at + 1..];
    }
    out
}

fn graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    all.retain(|f| {
        !f.ends_with("main.rs")
            && !f.ends_with("lib.rs")
            && !f.to_string_lossy().contains("tests.rs")
    });
    let known: BTreeSet<Vec<String>> = all.iter().map(|f| module_of(&src, f)).collect();
    all.iter()
        .map(|f| {
            let m = module_of(&src, f);
            let text = std::fs::read_to_string(f).unwrap();
            let deps = imports(&m, &text, &known)
                .into_iter()
                // A module's own submodules are its parts, not imports.
                .filter(|d| !d.starts_with(&m))
                .collect();
            (m, deps)
        })
        .collect()
}

#[test]
fn no_module_imports_a_module_that_imports_it() {
    let g = graph();
    assert!(
        g.len() > 10,
        "the source tree was not read: {} modules",
        g.len()
    );
    // Depth-first search for a back edge.
    fn visit(
        m: &Vec<String>,
        g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        stack: &mut Vec<Vec<String>>,
        done: &mut BTreeSet<Vec<String>>,
    ) -> Option<Vec<Vec<String>>> {
        if let Some(i) = stack.iter().position(|s| s == m) {
            return Some(stack[i..].to_vec());
        }
        if done.contains(m) {
            return None;
        }
        stack.push(m.clone());
        for d in g.get(m).into_iter().flatten() {
            // An import of a parent module (`super::X` of a mod.rs item) is an import of a
            // sibling's parent: the parent's own code, not its children.
            if m.starts_with(d) {
                continue;
            }
            if let Some(c) = visit(d, g, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(m.clone());
        None
    }
    let mut done = BTreeSet::new();
    for m in g.keys() {
        if let Some(circle) = visit(m, &g, &mut Vec::new(), &mut done) {
            let names: Vec<String> = circle.iter().map(|p| p.join("::")).collect();
            panic!("import circle: {}", names.join(" -> "));
        }
    }
}

#[test]
fn the_model_imports_nothing_of_rsdns_above_it() {
    let g = graph();
    for (m, deps) in &g {
        if m.first().is_some_and(|f| f == "model") {
            let above: Vec<String> = deps
                .iter()
                .filter(|d| d.first().is_none_or(|f| f != "model"))
                .map(|d| d.join("::"))
                .collect();
            assert!(above.is_empty(), "{} imports {above:?}", m.join("::"));
        }
    }
    // And config imports nothing of the proxy or the engine.
    let config = &g[&vec!["config".to_string()]];
    assert!(
        config
            .iter()
            .all(|d| d[0] != "proxy" && d[0] != "netfilter"),
        "config imports {config:?}"
    );
}
