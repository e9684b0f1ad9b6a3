//! The module layering of docs/ARCHITECTURE.md, checked against the code.
//!
//! The architecture page's "Layers" table puts every top-level module of `src/` on a layer. A
//! module may use only modules on lower layers, and an adapter folder under `src/backends/` may
//! use only the adapter contract (`backends::adapter`) besides its own files. This test reads the
//! table and every `crate::` and `super::` path in `src/` outside unit-test modules, and names
//! each file, line and import that breaks a rule.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Module name → layer, from the table under "## Layers".
fn layers(page: &str) -> BTreeMap<String, u32> {
    let section = page
        .split("\n## ")
        .find(|s| s.starts_with("Layers"))
        .expect("docs/ARCHITECTURE.md has a \"## Layers\" section");
    let mut layers = BTreeMap::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | layer | modules | job |
        let (Some(layer), Some(modules)) = (cells.get(1), cells.get(2)) else {
            continue;
        };
        let Ok(layer) = layer.parse::<u32>() else {
            continue;
        };
        for module in modules.split(',') {
            let name = module.trim().trim_matches('`').trim_end_matches(".rs");
            if !name.is_empty() {
                layers.insert(name.to_owned(), layer);
            }
        }
    }
    layers
}

/// The module path of a file below `src/`: `backends/mqtt/mod.rs` → `[backends, mqtt]`.
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.last_mut() {
        *last = last.trim_end_matches(".rs").to_owned();
    }
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The first identifier of each path in `rest`, which follows `crate::` or `super::`:
/// `fanout::Hub` → `[fanout]`, `{auth, routing::Router}` → `[auth, routing]`.
fn heads(rest: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let Some(group) = rest.strip_prefix('{') else {
        return vec![ident(rest)];
    };
    let mut out = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                out.push(ident(&group[start..i]));
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(ident(&group[start..i]));
                start = i + 1;
            }
            _ => {}
        }
    }
    out.retain(|h| !h.is_empty() && h != "self");
    out
}

/// Every module path a line refers to, resolved from the file's own module path.
fn targets(line: &str, own: &[String]) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(pos) = rest.find("crate::") {
        let before = rest[..pos].chars().last();
        let after = &rest[pos + "crate::".len()..];
        if !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            for head in heads(after) {
                // The second level too (`backends::adapter`), where the path has one.
                let second = after
                    .strip_prefix(head.as_str())
                    .and_then(|r| r.strip_prefix("::"))
                    .map(heads)
                    .unwrap_or_default();
                if second.is_empty() {
                    found.push(vec![head.clone()]);
                }
                for next in second {
                    found.push(vec![head.clone(), next]);
                }
            }
        }
        rest = after;
    }
    let mut rest = line;
    while let Some(pos) = rest.find("super::") {
        let before = rest[..pos].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            rest = &rest[pos + "super::".len()..];
            continue;
        }
        let mut base: Vec<String> = own.to_vec();
        let mut after = &rest[pos..];
        while let Some(next) = after.strip_prefix("super::") {
            base.pop();
            after = next;
        }
        for head in heads(after) {
            let mut path = base.clone();
            path.push(head);
            found.push(path);
        }
        rest = after;
    }
    found
}

/// The rule violations in one file's text.
fn violations(relative: &Path, text: &str, layers: &BTreeMap<String, u32>) -> Vec<String> {
    let own = module_path(relative);
    let Some(top) = own.first() else {
        return Vec::new();
    };
    let top = if relative.starts_with("bin") {
        "bin".to_owned()
    } else {
        top.clone()
    };
    let mut problems = Vec::new();
    if top == "lib" {
        return problems;
    }
    let Some(&own_layer) = layers.get(&top) else {
        return vec![format!(
            "src/{}: module `{top}` is not in the Layers table of docs/ARCHITECTURE.md; add it to a layer",
            relative.display()
        )];
    };
    for (n, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("#[cfg(test)]") {
            break;
        }
        if code.starts_with("//") {
            continue;
        }
        for target in targets(code, &own) {
            let Some(target_top) = target.first() else {
                continue;
            };
            let at = format!("src/{}:{}", relative.display(), n + 1);
            if *target_top != top {
                match layers.get(target_top) {
                    Some(&layer) if layer < own_layer => {}
                    Some(&layer) => problems.push(format!(
                        "{at}: `{top}` (layer {own_layer}) imports `{target_top}` (layer {layer}), which is not below it: {}",
                        code.trim()
                    )),
                    // Not a module of ours (a macro argument, a keyword): nothing to check.
                    None => {}
                }
                continue;
            }
            // Inside the backends folder: an adapter uses only the contract and itself.
            if top == "backends"
                && relative.components().count() >= 3
                && let (Some(adapter), Some(used)) = (own.get(1), target.get(1))
                && used != adapter
                && used != "adapter"
            {
                problems.push(format!(
                    "{at}: the {adapter} adapter uses `backends::{used}`; adapters import only `backends::adapter`: {}",
                    code.trim()
                ));
            }
        }
    }
    problems
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("src/ is readable")
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_imports_only_lower_layers() {
    let page = std::fs::read_to_string(Path::new(ROOT).join("docs/ARCHITECTURE.md"))
        .expect("docs/ARCHITECTURE.md exists");
    let layers = layers(&page);
    assert!(
        layers.len() >= 10,
        "the Layers table lists the modules: {layers:?}"
    );
    let src = Path::new(ROOT).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut problems = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).expect("below src/");
        let text = std::fs::read_to_string(file).expect("a readable source file");
        problems.extend(violations(relative, &text, &layers));
    }
    assert!(
        problems.is_empty(),
        "{} import(s) break the layering of docs/ARCHITECTURE.md:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn the_check_finds_upward_and_cross_adapter_imports() {
    let layers = layers(
        "# A\n\n## Layers\n\n| layer | modules | job |\n|---|---|---|\n| 3 | `edge` | x |\n| 2 | `fanout`, `backends` | x |\n| 1 | `config` | x |\n",
    );
    let check = |file: &str, text: &str| violations(Path::new(file), text, &layers);
    assert_eq!(
        check("fanout/mod.rs", "use crate::config::X;"),
        Vec::<String>::new()
    );
    let up = check("fanout/upstream.rs", "use crate::{config, edge::json};");
    assert_eq!(up.len(), 1, "{up:?}");
    assert!(
        up[0].starts_with("src/fanout/upstream.rs:1: `fanout` (layer 2) imports `edge` (layer 3)"),
        "{up:?}"
    );
    assert_eq!(
        check("fanout/mod.rs", "use crate::backends::Backend;").len(),
        1,
        "same layer"
    );
    assert_eq!(
        check(
            "backends/mqtt/mod.rs",
            "use super::adapter::Backend;\nuse super::amqp::ROUTING_KEY;"
        )
        .len(),
        1,
        "one adapter uses another"
    );
    assert_eq!(
        check("backends/mqtt/client.rs", "use super::config::Qos;"),
        Vec::<String>::new()
    );
    assert_eq!(
        check(
            "backends/mqtt/driver.rs",
            "use crate::backends::BrokerMessage;"
        )
        .len(),
        1,
        "an adapter reaches the registry's re-exports"
    );
    assert_eq!(
        check(
            "fanout/mod.rs",
            "// see crate::edge\n#[cfg(test)]\nuse crate::edge::x;"
        ),
        Vec::<String>::new(),
        "comments and unit tests are exempt"
    );
    assert_eq!(check("newthing.rs", "").len(), 1, "unlisted module");
}
