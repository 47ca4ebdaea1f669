//! The crate's layout holds: no two modules of `src/` import each other, directly or through
//! others, and neither do its folders (see the Layout in `src/lib.rs`). Read from the source:
//! every `crate::a::b` path names the module file it reaches.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module paths (`node::listener`, `net`, ...) of every `.rs` file under `src/` but `main.rs`.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
            if parts.last().is_some_and(|l| l == "mod") {
                parts.pop();
            }
            let name = parts.join("::");
            if name != "main" && name != "lib" {
                out.insert(name, p);
            }
        }
    }
    out
}

/// The modules `text` reaches through `crate::` paths (the longest known module prefix).
fn imports(text: &str, known: &BTreeMap<String, PathBuf>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        // Inside `tftpcast_proto::...`, `crate::` is part of another path: skip.
        if text[..i].ends_with("_proto::") {
            continue;
        }
        let rest = &text[i + "crate::".len()..];
        let path: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
        let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        for n in (1..=segs.len()).rev() {
            let m = segs[..n].join("::");
            if known.contains_key(&m) {
                out.insert(m);
                break;
            }
        }
        // `crate::{a, b}` lists.
        if let Some(list) = rest.strip_prefix('{') {
            for item in list.split('}').next().unwrap_or("").split(',') {
                let m = item.trim().split("::").next().unwrap_or("");
                if known.contains_key(m) {
                    out.insert(m.to_string());
                }
            }
        }
    }
    out
}

/// A cycle in `graph`, if any (depth-first search).
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(n: &str, g: &BTreeMap<String, BTreeSet<String>>, state: &mut BTreeMap<String, u8>, path: &mut Vec<String>) -> Option<Vec<String>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let start = path.iter().position(|p| p == n).unwrap();
                let mut c = path[start..].to_vec();
                c.push(n.to_string());
                return Some(c);
            }
            _ => {}
        }
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

#[test]
fn no_import_cycles_between_modules_or_folders() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    assert!(mods.len() > 20, "found only {mods:?}");
    let mut files: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut folders: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let top = |m: &str| m.split("::").next().unwrap().to_string();
    for (name, path) in &mods {
        let text = std::fs::read_to_string(path).unwrap();
        // A module's own tests may reach anywhere; the layout is about the code.
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        let mut deps = imports(code, &mods);
        deps.remove(name);
        // A folder's mod.rs declaring its children is not an import of them.
        deps.retain(|d| !d.starts_with(&format!("{name}::")) || code.contains(&format!("crate::{d}")));
        for d in &deps {
            if top(d) != top(name) {
                folders.entry(top(name)).or_default().insert(top(d));
            }
        }
        files.insert(name.clone(), deps);
    }
    assert_eq!(cycle(&files), None, "modules that import each other (through the ones between)");
    assert_eq!(cycle(&folders), None, "folders that import each other");
    // The direction the layout promises, spot-checked.
    let uses = |a: &str, b: &str| folders.get(a).is_some_and(|s| s.contains(b));
    assert!(uses("node", "cluster") && !uses("cluster", "node"), "{folders:?}");
    assert!(!uses("fs", "config") && !uses("net", "fs"), "{folders:?}");
}
