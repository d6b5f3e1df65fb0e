//! The library's modules form no cycle: every `crate::<module>` reference in the code under
//! src/ (comments and string literals aside) is an edge between top-level modules, and the
//! graph must read as layers, each module using only those below it (docs/architecture.md).
//! The cycle finder is checked on hand-made graphs, so that the test can fail.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

/// Module -> the modules it references.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// `text` with every comment, string literal and char literal blanked out, so that only code
/// is searched; line breaks are kept.
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { ' ' });
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            // Block comments nest in Rust.
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
            }
        } else if c == 'r' && matches!(next, Some('"') | Some('#')) && starts_token(&chars, i) {
            // A raw string r"..." or r#"..."#: ends at a quote followed by as many hashes.
            let mut hashes = 0;
            let mut j = i + 1;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            i = j + 1;
            while i < chars.len() {
                if chars[i] == '"' && (1..=hashes).all(|h| chars.get(i + h) == Some(&'#')) {
                    i += 1 + hashes;
                    break;
                }
                blank(&mut out, chars[i]);
                i += 1;
            }
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                if let Some(&ch) = chars.get(i) {
                    blank(&mut out, ch);
                }
                i += 1;
            }
            i += 1;
        } else if c == '\'' && (next == Some('\\') || chars.get(i + 2) == Some(&'\'')) {
            // A char literal ('x', '\n', '\'', '\u{..}'); a lifetime ('a) has no closing
            // quote. Past the opening quote and an escape's backslash and first char.
            i += if next == Some('\\') { 3 } else { 2 };
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Whether `chars[i]` starts a token, or follows the `b` of a byte-string prefix.
fn starts_token(chars: &[char], i: usize) -> bool {
    let before = |back: usize| i.checked_sub(back).map(|j| chars[j]);
    match before(1) {
        Some('b') => !before(2).is_some_and(is_ident),
        Some(c) => !is_ident(c),
        None => true,
    }
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The identifier at the start of `chars`, after any whitespace.
fn leading_ident(chars: &[char]) -> String {
    chars
        .iter()
        .skip_while(|c| c.is_whitespace())
        .take_while(|&&c| is_ident(c))
        .collect()
}

/// The top-level modules that `code` names as `crate::<module>`, including each first
/// segment of a `crate::{a, b::c}` group.
fn referenced_modules(code: &str) -> BTreeSet<String> {
    let chars: Vec<char> = code.chars().collect();
    let pattern: Vec<char> = "crate::".chars().collect();
    let mut found = BTreeSet::new();
    let mut i = 0;
    while i + pattern.len() <= chars.len() {
        let preceded_by_ident = i > 0 && is_ident(chars[i - 1]);
        if chars[i..i + pattern.len()] != pattern[..] || preceded_by_ident {
            i += 1;
            continue;
        }
        i += pattern.len();
        while chars.get(i).is_some_and(|c| c.is_whitespace()) {
            i += 1;
        }
        if chars.get(i) == Some(&'{') {
            let mut depth = 0;
            let mut segment_start = true;
            while i < chars.len() {
                match chars[i] {
                    '{' => {
                        depth += 1;
                        segment_start = depth == 1;
                    }
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => segment_start = true,
                    c if segment_start && is_ident(c) => {
                        found.insert(leading_ident(&chars[i..]));
                        segment_start = false;
                    }
                    _ => {}
                }
                i += 1;
            }
        } else {
            let name = leading_ident(&chars[i..]);
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found.remove("self");
    found
}

/// The top-level module a file under src/ belongs to: `train.rs` and `data/cache.rs` ->
/// `train`, `data`. None for the crate roots (lib.rs declares the modules, main.rs is the
/// binary).
fn module_of(relative: &Path) -> Option<String> {
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_string())
}

fn rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// The graph of src/'s top-level modules, and for each edge the files that make it.
fn source_graph() -> (Graph, BTreeMap<(String, String), BTreeSet<String>>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph = Graph::new();
    let mut edge_files: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let Some(from) = module_of(relative) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let targets = graph.entry(from.clone()).or_default();
        for to in referenced_modules(&code_only(&text)) {
            if to != from {
                targets.insert(to.clone());
                edge_files
                    .entry((from.clone(), to))
                    .or_default()
                    .insert(format!("src/{}", relative.display()));
            }
        }
    }
    (graph, edge_files)
}

/// A set of modules each of which reaches every other (a strongly connected group), with
/// one shortest cycle through its first module, written with that module repeated at the
/// end.
#[derive(Debug, PartialEq)]
struct Cycle {
    modules: BTreeSet<String>,
    path: Vec<String>,
}

/// Every group of modules that reach one another.
fn cycles(graph: &Graph) -> Vec<Cycle> {
    let reachable_from = |start: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![start.to_string()];
        while let Some(node) = stack.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|n| (n, reachable_from(n))).collect();
    let mut done = BTreeSet::new();
    let mut found = Vec::new();
    for start in graph.keys() {
        if done.contains(start) || !reach[start].contains(start) {
            continue;
        }
        let modules: BTreeSet<String> = reach[start]
            .iter()
            .filter(|n| reach.get(n).is_some_and(|r| r.contains(start)))
            .cloned()
            .collect();
        done.extend(modules.iter().cloned());
        // Breadth first from `start` inside the group, back to `start`: a shortest cycle.
        let mut parent: BTreeMap<&String, &String> = BTreeMap::new();
        let mut queue = VecDeque::from([start]);
        let mut path = Vec::new();
        'search: while let Some(node) = queue.pop_front() {
            for next in &graph[node] {
                if next == start {
                    path.push(start.clone());
                    let mut at = node;
                    while at != start {
                        path.push(at.clone());
                        at = parent[at];
                    }
                    path.push(start.clone());
                    path.reverse();
                    break 'search;
                }
                if modules.contains(next) && !parent.contains_key(next) {
                    parent.insert(next, node);
                    queue.push_back(next);
                }
            }
        }
        found.push(Cycle { modules, path });
    }
    found
}

#[test]
fn src_modules_form_no_cycle() {
    let (graph, edge_files) = source_graph();
    // The scanner reads the code: the CLI dispatches to the trainer.
    assert!(
        graph.get("cli").is_some_and(|t| t.contains("train")),
        "the scan of src/ finds no edge cli -> train: {graph:?}"
    );
    let found = cycles(&graph);
    // Each group with one of its cycles, then every edge inside it and the files making it.
    let described: Vec<String> = found
        .iter()
        .map(|cycle| {
            let edges: Vec<String> = edge_files
                .iter()
                .filter(|((from, to), _)| {
                    cycle.modules.contains(from) && cycle.modules.contains(to)
                })
                .map(|((from, to), files)| {
                    let files: Vec<&str> = files.iter().map(String::as_str).collect();
                    format!("  {from} -> {to} ({})", files.join(", "))
                })
                .collect();
            format!(
                "{}, through:\n{}",
                cycle.path.join(" -> "),
                edges.join("\n")
            )
        })
        .collect();
    assert!(
        found.is_empty(),
        "module cycles under src/:\n{}",
        described.join("\n")
    );
}

fn graph(edges: &[(&str, &str)]) -> Graph {
    let mut graph = Graph::new();
    for &(from, to) in edges {
        graph
            .entry(from.to_string())
            .or_default()
            .insert(to.to_string());
        graph.entry(to.to_string()).or_default();
    }
    graph
}

fn names(cycle: &[&str]) -> Vec<String> {
    cycle.iter().map(|s| s.to_string()).collect()
}

fn cycle(modules: &[&str], path: &[&str]) -> Cycle {
    Cycle {
        modules: names(modules).into_iter().collect(),
        path: names(path),
    }
}

#[test]
fn cycle_finder_names_a_hand_made_cycle() {
    let g = graph(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("x", "a")]);
    assert_eq!(
        cycles(&g),
        vec![cycle(&["a", "b", "c"], &["a", "b", "c", "a"])]
    );
}

#[test]
fn cycle_finder_gives_one_shortest_cycle_per_group() {
    let g = graph(&[
        ("a", "b"),
        ("b", "c"),
        ("c", "a"),
        ("b", "a"),
        ("p", "q"),
        ("q", "p"),
        ("q", "a"),
    ]);
    assert_eq!(
        cycles(&g),
        vec![
            cycle(&["a", "b", "c"], &["a", "b", "a"]),
            cycle(&["p", "q"], &["p", "q", "p"])
        ]
    );
}

#[test]
fn cycle_finder_passes_layers() {
    let g = graph(&[
        ("cli", "train"),
        ("train", "eval"),
        ("cli", "eval"),
        ("eval", "data"),
    ]);
    assert!(cycles(&g).is_empty());
}

#[test]
fn references_are_read_from_code_only() {
    let text = r##"
        use crate::eval::{EvalReport, summarize};
        use crate::{data::TokenizedSet, error::{Error, Result}, self};
        // crate::commented
        /* crate::blocked /* nested */ crate::still_blocked */
        /// see [`crate::documented`]
        let s = "crate::quoted \" crate::escaped";
        let r = r#"crate::raw "crate::raw_inner""#;
        let b = br"crate::bytes\";
        let c = '"'; let q = '\''; let t: &'static str = "x";
        fn f<'a>(x: &'a str) -> usize { crate::loss::sigmoid(1.0); mycrate::not_this(); 0 }
    "##;
    let found: Vec<String> = referenced_modules(&code_only(text)).into_iter().collect();
    assert_eq!(found, names(&["data", "error", "eval", "loss"]));
}

#[test]
fn files_belong_to_their_top_level_module() {
    assert_eq!(module_of(Path::new("train.rs")).as_deref(), Some("train"));
    assert_eq!(
        module_of(Path::new("backend/cuda/model.rs")).as_deref(),
        Some("backend")
    );
    assert_eq!(module_of(Path::new("lib.rs")), None);
    assert_eq!(module_of(Path::new("main.rs")), None);
}
