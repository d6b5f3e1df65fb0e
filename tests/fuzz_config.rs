//! Fuzzing of the YAML config reader: the shipped configs, mutated (flipped bytes,
//! truncation, huge numbers, tags, anchors and aliases up to a billion laughs, deep
//! nesting, duplicate keys, invalid UTF-8) and read by `Config::load`. Whatever the input,
//! the reader returns: a config, or a user error of one line that names the file. Seeded,
//! so every run checks the same inputs.

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed};
use rcx::config::Config;
use rcx::error::Error;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Inputs per run; each is read in well under a millisecond.
const CASES: u32 = 4000;

/// Far above any single read (the nesting that took the YAML parser 40 s is refused in
/// microseconds): a case this slow is a hang in the making.
const SLOWEST_READ: Duration = Duration::from_secs(5);

/// Values a mutation writes into a config: numbers at and past every bound, tags,
/// anchors and aliases, quoting and block forms, loss names at their limits.
const SNIPPETS: &[&str] = &[
    "18446744073709551616",
    "18446744073709551615",
    "9223372036854775807",
    "-9223372036854775808",
    "4294967297",
    "1e308",
    "1e-320",
    "-0.0",
    ".nan",
    ".inf",
    "-.inf",
    "0x7fffffffffffffff",
    "0o777",
    "1_000",
    "!custom 4",
    "!!float 1",
    "!!str 5",
    "!!binary aGVsbG8=",
    "!<tag:yaml.org,2002:int> 3",
    "&anchor [1, 2]",
    "*anchor",
    "*undefined",
    "&a x",
    "<<: *a",
    "~",
    "null",
    "''",
    "'unterminated",
    "\"escaped \\u0000 \\x41\"",
    "\"unterminated",
    "|\n  block\n  text",
    ">-\n  folded",
    "? complex\n: key",
    "{open: x_inv, closed: x, open: x}",
    "{open: power:1e3, closed: neg_power:1e-3}",
    "{open: [x], closed: {a: b}}",
    "[kjv-jargon, kjv-jargon]",
    "[]",
    "{}",
    "power:1e-300",
    "neg_power:1000",
    "power:0.001",
    "neg_power:-1",
    "power:nan",
    "adaptive2",
    "x_inv2",
    "---\n",
    "...\n",
    "%YAML 1.2\n---\n",
    "%TAG ! tag:example.com,2000:\n---\n",
    "\t",
    "\u{feff}",
    "\r\n",
    "#",
    ": :",
    "- - -",
    "[[[[",
    "}}}}",
];

/// The classic exponential alias expansion (10^9 strings).
fn billion_laughs() -> String {
    let mut text = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for level in 1..9 {
        let refs = vec![format!("*a{}", level - 1); 10].join(", ");
        text.push_str(&format!("a{level}: &a{level} [{refs}]\n"));
    }
    text
}

#[derive(Clone, Debug)]
enum Mutation {
    /// XOR the byte at this position (modulo the length) with a mask.
    FlipByte { at: usize, mask: u8 },
    /// Keep the bytes before this position.
    Truncate { at: usize },
    /// Insert a snippet at a position.
    Insert { at: usize, snippet: usize },
    /// Replace the value of the key on a line with a snippet.
    ReplaceValue { line: usize, snippet: usize },
    /// Repeat a line (duplicate keys).
    DuplicateLine { line: usize },
    /// Put bytes that are not UTF-8 at a position.
    InvalidUtf8 { at: usize },
    /// Replace the value on a line by brackets (or indented block levels) this deep.
    DeepNesting {
        line: usize,
        depth: usize,
        flow: bool,
    },
    /// Prepend the billion laughs, and point a key's value at its top.
    BillionLaughs { line: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<usize>();
    let snippet = 0..SNIPPETS.len();
    prop_oneof![
        (at, 1..=255u8).prop_map(|(at, mask)| Mutation::FlipByte { at, mask }),
        at.prop_map(|at| Mutation::Truncate { at }),
        (at, snippet.clone()).prop_map(|(at, snippet)| Mutation::Insert { at, snippet }),
        (at, snippet).prop_map(|(line, snippet)| Mutation::ReplaceValue { line, snippet }),
        at.prop_map(|line| Mutation::DuplicateLine { line }),
        at.prop_map(|at| Mutation::InvalidUtf8 { at }),
        (at, 1..100_000usize, any::<bool>())
            .prop_map(|(line, depth, flow)| Mutation::DeepNesting { line, depth, flow }),
        at.prop_map(|line| Mutation::BillionLaughs { line }),
    ]
}

/// The byte offsets at which lines start.
fn line_starts(bytes: &[u8]) -> Vec<usize> {
    std::iter::once(0)
        .chain(
            bytes
                .iter()
                .enumerate()
                .filter(|&(_, &b)| b == b'\n')
                .map(|(i, _)| i + 1),
        )
        .filter(|&i| i < bytes.len())
        .collect()
}

/// The value part of line `line` (after `key: `), as a byte range, if it has one.
fn value_range(bytes: &[u8], line: usize) -> Option<(usize, usize)> {
    let starts = line_starts(bytes);
    let start = *starts.get(line % starts.len().max(1))?;
    let end = bytes[start..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |i| start + i);
    let colon = bytes[start..end].windows(2).position(|w| w == b": ")?;
    Some((start + colon + 2, end))
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    let len = bytes.len().max(1);
    match *mutation {
        Mutation::FlipByte { at, mask } => {
            if !bytes.is_empty() {
                bytes[at % len] ^= mask;
            }
        }
        Mutation::Truncate { at } => bytes.truncate(at % len),
        Mutation::Insert { at, snippet } => {
            let at = at % (bytes.len() + 1);
            bytes.splice(at..at, SNIPPETS[snippet].bytes());
        }
        Mutation::ReplaceValue { line, snippet } => {
            if let Some((start, end)) = value_range(bytes, line) {
                bytes.splice(start..end, SNIPPETS[snippet].bytes());
            }
        }
        Mutation::DuplicateLine { line } => {
            let starts = line_starts(bytes);
            if let Some(&start) = starts.get(line % starts.len().max(1)) {
                let end = bytes[start..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(bytes.len(), |i| start + i + 1);
                let copy = bytes[start..end].to_vec();
                bytes.splice(end..end, copy);
            }
        }
        Mutation::InvalidUtf8 { at } => {
            let at = at % (bytes.len() + 1);
            bytes.splice(at..at, [0xff, 0xc3, 0x28]);
        }
        Mutation::DeepNesting { line, depth, flow } => {
            if let Some((start, end)) = value_range(bytes, line) {
                let nested = if flow {
                    format!("{}x{}", "[".repeat(depth), "]".repeat(depth))
                } else {
                    // Block levels cost two bytes each on every line: keep it under 200 KB.
                    let depth = depth.min(400);
                    (1..=depth)
                        .map(|i| format!("\n{}-", "  ".repeat(i)))
                        .collect::<String>()
                };
                bytes.splice(start..end, nested.bytes());
            }
        }
        Mutation::BillionLaughs { line } => {
            if let Some((start, end)) = value_range(bytes, line) {
                bytes.splice(start..end, b"*a8".iter().copied());
            }
            bytes.splice(0..0, billion_laughs().bytes());
        }
    }
}

/// The shipped configs as (file name, bytes), read once.
fn shipped_configs() -> &'static [(String, Vec<u8>)] {
    static CONFIGS: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    CONFIGS.get_or_init(read_shipped_configs)
}

fn read_shipped_configs() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut configs: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yml"))
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    configs.sort();
    assert!(configs.len() >= 8, "the shipped configs are missing");
    configs
}

/// The file a test (`name`) writes its inputs to.
fn scratch_file(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz_config");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}-{}.yml", std::process::id()))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: CASES,
        rng_seed: RngSeed::Fixed(0x5eed_c0f1),
        failure_persistence: None,
        // A failure is reported within a minute, even while its inputs are slow to read.
        max_shrink_time: 60_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn mutated_configs_load_or_fail_with_one_line_naming_the_file(
        which in any::<usize>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let configs = shipped_configs();
        let (name, original) = &configs[which % configs.len()];
        let mut bytes = original.clone();
        for mutation in &mutations {
            apply(&mut bytes, mutation);
        }
        let path = scratch_file("mutated");
        std::fs::write(&path, &bytes).unwrap();
        let started = Instant::now();
        let result = Config::load(&path);
        let took = started.elapsed();
        prop_assert!(took < SLOWEST_READ, "{name} {mutations:?}: read in {took:?}");
        if let Err(err) = result {
            let message = err.to_string();
            prop_assert!(matches!(err, Error::User(_)), "{name} {mutations:?}: {message}");
            prop_assert!(!message.contains('\n'), "{name} {mutations:?}: {message}");
            prop_assert!(
                message.starts_with(&path.display().to_string()),
                "{name} {mutations:?}: {message}"
            );
            prop_assert!(message.len() < 1000, "{name} {mutations:?}: {message}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1000,
        rng_seed: RngSeed::Fixed(0x5eed_b17e),
        failure_persistence: None,
        max_shrink_time: 60_000,
        ..ProptestConfig::default()
    })]

    /// Bytes with no config in them at all.
    #[test]
    fn arbitrary_bytes_load_or_fail_with_one_line_naming_the_file(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let path = scratch_file("bytes");
        std::fs::write(&path, &bytes).unwrap();
        if let Err(err) = Config::load(&path) {
            let message = err.to_string();
            prop_assert!(matches!(err, Error::User(_)), "{message}");
            prop_assert!(!message.contains('\n'), "{message}");
            prop_assert!(message.starts_with(&path.display().to_string()), "{message}");
        }
    }

    /// Loss names as a config may spell them: known names, exponents of any spelling,
    /// and noise.
    #[test]
    fn loss_names_parse_or_fail_with_one_line(
        name in prop_oneof![
            "(power|neg_power):[-+0-9.eE_a-z]{0,12}",
            "(power|neg_power):0\\.[0-9]{1,17}",
            "(x|x2|log|x_inv|x_inv2|logsigmoid|adaptive|adaptive2)[ :,=]?",
            "open=[a-z_:0-9.]{0,12},closed=[a-z_:0-9.]{0,12}",
            "\\PC{0,20}",
        ],
    ) {
        match rcx::loss::LossSpec::parse(&name) {
            Ok(spec) => {
                // What parses reads back, with exponents in their range.
                let utilities = match spec {
                    rcx::loss::LossSpec::Single(u) => vec![u],
                    rcx::loss::LossSpec::PromptAware { open, closed } => vec![open, closed],
                };
                for utility in utilities {
                    prop_assert_eq!(rcx::loss::Utility::parse(&utility.name()).ok(), Some(utility));
                }
            }
            Err(err) => {
                let message = err.to_string();
                prop_assert!(matches!(err, Error::User(_)), "{message}");
                prop_assert!(!message.contains('\n'), "{message}");
            }
        }
    }
}
