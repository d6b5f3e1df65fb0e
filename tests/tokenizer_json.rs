//! The tokenizer.json reader against Hugging Face `tokenizers`: every id of
//! tests/fixtures/tokenizer_json/cases.json (made by scripts/gen_tokenizer_json_fixtures.py
//! from small tokenizers trained in the GPT-2, Llama 3, Qwen2, Llama 2 and Mistral
//! layouts), `rcx tokenize --tokenizer`, the errors for what the reader does not support,
//! and a seeded fuzz of the reader on mutated files (never a panic; one-line errors).

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed};
use rcx::error::Error;
use rcx::tokenizer::json::TokenizerJson;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer_json")
}

fn fixture(name: &str) -> PathBuf {
    fixture_dir().join(format!("{name}.json"))
}

struct Case {
    tokenizer: String,
    text: String,
    max_length: Option<usize>,
    ids: Vec<u32>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixture_dir().join("cases.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    cases
        .iter()
        .map(|case| Case {
            tokenizer: case["tokenizer"].as_str().unwrap().to_string(),
            text: case["text"].as_str().unwrap().to_string(),
            max_length: case["max_length"].as_u64().map(|n| n as usize),
            ids: case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|id| id.as_u64().unwrap() as u32)
                .collect(),
        })
        .collect()
}

#[test]
fn every_id_equals_the_reference_in_every_style() {
    let cases = cases();
    let mut tokenizers = BTreeMap::new();
    let mut per_style: BTreeMap<String, usize> = BTreeMap::new();
    let mut mismatches = Vec::new();
    for case in &cases {
        let tokenizer = tokenizers
            .entry(case.tokenizer.clone())
            .or_insert_with(|| TokenizerJson::from_file(&fixture(&case.tokenizer)).unwrap());
        *per_style.entry(case.tokenizer.clone()).or_default() += 1;
        match tokenizer.encode_as_reference(&case.text, case.max_length) {
            Ok(ids) if ids == case.ids => {}
            other => mismatches.push(format!(
                "{} {:?} max_length {:?}: expected {:?}, got {other:?}",
                case.tokenizer, case.text, case.max_length, case.ids
            )),
        }
    }
    // Every style the script writes is compared, on many texts.
    for style in [
        "gpt2",
        "llama3",
        "llama3_left",
        "qwen2",
        "llama2",
        "mistral",
    ] {
        assert!(
            per_style.get(style).copied().unwrap_or(0) >= 250,
            "{style}: {per_style:?}"
        );
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} cases differ:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches[..mismatches.len().min(20)].join("\n")
    );
}

#[test]
fn encode_without_special_tokens_drops_only_the_template_ids() {
    let llama3 = TokenizerJson::from_file(&fixture("llama3")).unwrap();
    let bos = llama3.token_id("<|begin_of_text|>").unwrap();
    let with = llama3.encode("Hello world", true).unwrap();
    let without = llama3.encode("Hello world", false).unwrap();
    assert_eq!(with[0], bos);
    assert_eq!(&with[1..], &without[..]);
    assert_eq!(llama3.special_tokens_count(), 1);
    // A special token written in the text is still one id without the template.
    let eot = llama3.token_id("<|eot_id|>").unwrap();
    assert_eq!(llama3.encode("<|eot_id|>", false).unwrap(), vec![eot]);
}

fn rcx(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rcx"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_command_prints_the_reference_ids() {
    let cases = cases();
    for (style, text) in [
        ("llama3", "Hello <|eot_id|> world 12345"),
        ("mistral", "Hi [INST] there"),
    ] {
        let case = cases
            .iter()
            .find(|c| {
                c.tokenizer == style
                    && c.max_length.is_none()
                    && !c.ids.is_empty()
                    && c.text.len() > 8
            })
            .unwrap();
        for (text, expected) in [(case.text.as_str(), Some(&case.ids)), (text, None)] {
            let path = fixture(style);
            let out = rcx(&["tokenize", "--tokenizer", path.to_str().unwrap(), text]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
            let ids: Vec<u32> = printed["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|id| id.as_u64().unwrap() as u32)
                .collect();
            let library = TokenizerJson::from_file(&path)
                .unwrap()
                .encode_as_reference(text, None)
                .unwrap();
            assert_eq!(ids, library);
            if let Some(expected) = expected {
                assert_eq!(&ids, expected);
            }
        }
    }
    // --max-length cuts the text, keeping the special tokens.
    let path = fixture("llama3");
    let out = rcx(&[
        "tokenize",
        "--tokenizer",
        path.to_str().unwrap(),
        "--max-length",
        "3",
        "one two three four",
    ]);
    assert!(out.status.success());
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["input_ids"].as_array().unwrap().len(), 3);
    // Below the special tokens' count it is refused, as with --vocab.
    let out = rcx(&[
        "tokenize",
        "--tokenizer",
        path.to_str().unwrap(),
        "--max-length",
        "0",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(2));
    // --pair on a BPE file (a decoder's sequence): tests/decoder_sequences.rs.
}

/// Writes `data` as a tokenizer.json in the test's scratch folder.
fn scratch(name: &str, data: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tokenizer_json");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}-{}.json", std::process::id()));
    std::fs::write(&path, data).unwrap();
    path
}

fn edited(name: &str, change: impl FnOnce(&mut Value)) -> PathBuf {
    let mut data: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("llama2")).unwrap()).unwrap();
    change(&mut data);
    scratch(name, serde_json::to_string(&data).unwrap().as_bytes())
}

fn user_error(path: &Path) -> String {
    match TokenizerJson::from_file(path) {
        Err(Error::User(message)) => {
            assert!(!message.contains('\n'), "{message}");
            assert!(
                message.starts_with(&path.display().to_string()),
                "{message}"
            );
            message
        }
        other => panic!("{}: expected a user error, got {other:?}", path.display()),
    }
}

/// A case of an unreadable file: its name, the edit that breaks it, what the error names.
type BrokenFile = (&'static str, fn(&mut Value), &'static [&'static str]);

#[test]
fn unsupported_components_are_one_line_errors_naming_them_and_the_file() {
    let cases: [BrokenFile; 6] = [
        (
            "unigram",
            |d| d["model"]["type"] = "Unigram".into(),
            &["model", "\"Unigram\""],
        ),
        (
            "nfkc",
            |d| d["normalizer"] = serde_json::json!({"type": "NFKC"}),
            &["normalizer", "\"NFKC\""],
        ),
        (
            "whitespace",
            |d| d["pre_tokenizer"] = serde_json::json!({"type": "Whitespace"}),
            &["pre_tokenizer", "\"Whitespace\""],
        ),
        (
            "roberta",
            |d| d["post_processor"] = serde_json::json!({"type": "RobertaProcessing"}),
            &["post_processor", "\"RobertaProcessing\""],
        ),
        (
            "dropout",
            |d| d["model"]["dropout"] = 0.1.into(),
            &["model.dropout", "dropout"],
        ),
        (
            "merge",
            |d| d["model"]["merges"][3] = serde_json::json!(["no such", "token"]),
            &["model.merges[3]", "\"no such\""],
        ),
    ];
    for (name, change, expected) in cases {
        let message = user_error(&edited(name, change));
        for part in expected {
            assert!(message.contains(part), "{name}: {message}");
        }
    }
    let message = user_error(&scratch("not-json", b"{\"model\": "));
    assert!(message.contains("not a valid JSON"), "{message}");
    let message = user_error(&scratch("no-model", b"{\"version\": \"1.0\"}"));
    assert!(message.contains("model: missing"), "{message}");
}

#[test]
fn a_file_past_the_size_bound_is_refused_before_it_is_parsed() {
    let path = scratch("huge", b"");
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    // Sparse: no disk is written, but the reader sees every byte.
    file.set_len(rcx::tokenizer::json::MAX_TOKENIZER_JSON_BYTES + 1)
        .unwrap();
    let message = user_error(&path);
    assert!(message.contains("larger than 128 MiB"), "{message}");
    std::fs::remove_file(&path).unwrap();
}

/// A data text the decoder's tokenizer cannot read (a char outside a vocabulary that lacks
/// its unk_token, without byte fallback) stops the token cache with one line naming the
/// data file, the record's line and the tokenizer file; with skip_bad the record is skipped
/// and counted. It was once tokenized to no ids with a warning, and trained on.
#[test]
fn a_data_text_the_decoder_tokenizer_cannot_read_names_the_data_line() {
    use rcx::data::cache::TokenizedSet;
    let path = edited("no-unk", |d| {
        d["model"]["byte_fallback"] = Value::Bool(false);
        d["model"]["unk_token"] = Value::from("<missing>");
    });
    let tok = rcx::tokenizer::Tokenizer::from_decoder_file(&path, 2, 2).unwrap();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("tokenizer_json-bad-text-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("data.jsonl");
    let good = r#"{"prompt": "the cat", "completions": ["a dog", "the end"]}"#;
    let bad = r#"{"prompt": "the cat", "completions": ["a dog", "the \u6f22 end"]}"#;
    std::fs::write(&source, format!("{good}\n{good}\n{bad}\n{good}\n")).unwrap();

    let message = match TokenizedSet::open_or_build(&source, &tok, 64, false) {
        Err(Error::User(message)) => message,
        other => panic!("expected a user error, got {other:?}"),
    };
    assert!(!message.contains('\n'), "{message}");
    assert!(
        message.starts_with(&format!(
            "{}:3: a completion cannot be tokenized: ",
            source.display()
        )),
        "{message}"
    );
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("<missing>"), "{message}");
    let left: Vec<_> =
        std::fs::read_dir(dir.join(".rcx-cache")).map_or(Vec::new(), |d| d.collect());
    assert!(left.is_empty(), "no cache or temporary file after an error");

    let set = TokenizedSet::open_or_build(&source, &tok, 64, true).unwrap();
    assert_eq!((set.len(), set.skipped()), (3, 1));
    let want = tok.encode_pair("the cat", "the end", 64).input_ids;
    assert_eq!(
        set.completion(2, 1).0,
        &want[..],
        "the record after the bad one"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_file(&path).unwrap();
}

/// Values a mutation writes into a tokenizer.json: bounds, wrong types, unknown names.
fn replacement(choice: u8) -> Value {
    match choice % 12 {
        0 => Value::Null,
        1 => serde_json::json!(-1),
        2 => serde_json::json!(4294967296u64),
        3 => serde_json::json!(1e300),
        4 => serde_json::json!(""),
        5 => serde_json::json!("(?<=a)(b|"),
        6 => serde_json::json!([]),
        7 => serde_json::json!({}),
        8 => {
            serde_json::json!({"type": "Sequence", "normalizers": [], "pretokenizers": [], "processors": []})
        }
        9 => serde_json::json!({"Regex": "\\s*"}),
        10 => serde_json::json!(true),
        _ => serde_json::json!({"Fixed": 3}),
    }
}

/// Replaces the `pick`-th node (in a depth-first walk that skips the vocabulary's
/// entries, so that structure is hit as often as content) by `value`.
fn replace_node(root: &mut Value, mut pick: usize, value: Value) {
    fn walk(node: &mut Value, pick: &mut usize, value: &mut Option<Value>) {
        if value.is_none() {
            return;
        }
        if *pick == 0 {
            *node = value.take().unwrap();
            return;
        }
        *pick -= 1;
        match node {
            Value::Object(map) => {
                for (key, child) in map.iter_mut() {
                    if key != "vocab" {
                        walk(child, pick, value);
                    }
                }
            }
            Value::Array(items) => {
                for child in items.iter_mut().take(6) {
                    walk(child, pick, value);
                }
            }
            _ => {}
        }
    }
    let mut value = Some(value);
    pick %= 400;
    walk(root, &mut pick, &mut value);
}

const STYLES: [&str; 6] = [
    "gpt2",
    "llama3",
    "llama3_left",
    "qwen2",
    "llama2",
    "mistral",
];
const TEXTS: [&str; 4] = [
    "Hello <s> world 123",
    "",
    "  émoji 😀\n\n",
    "<|eot_id|>[INST]x",
];

fn check_reader(path: &Path, label: &str) -> Result<(), TestCaseError> {
    match TokenizerJson::from_file(path) {
        Ok(tokenizer) => {
            for text in TEXTS {
                if let Err(err) = tokenizer.encode_as_reference(text, None) {
                    let message = err.to_string();
                    prop_assert!(matches!(err, Error::User(_)), "{label}: {message}");
                    prop_assert!(!message.contains('\n'), "{label}: {message}");
                }
            }
        }
        Err(err) => {
            let message = err.to_string();
            prop_assert!(matches!(err, Error::User(_)), "{label}: {message}");
            prop_assert!(!message.contains('\n'), "{label}: {message}");
            prop_assert!(
                message.starts_with(&path.display().to_string()),
                "{label}: {message}"
            );
            prop_assert!(message.len() < 2000, "{label}: {message}");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        rng_seed: RngSeed::Fixed(0x70c3_15e5),
        failure_persistence: None,
        max_shrink_time: 60_000,
        ..ProptestConfig::default()
    })]

    /// Nodes of the fixtures replaced by wrong or extreme values.
    #[test]
    fn mutated_structure_loads_or_fails_with_one_line_naming_the_file(
        style in 0usize..STYLES.len(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        let text = std::fs::read_to_string(fixture(STYLES[style])).unwrap();
        let mut data: Value = serde_json::from_str(&text).unwrap();
        for &(pick, choice) in &edits {
            replace_node(&mut data, pick, replacement(choice));
        }
        let path = scratch("structure", serde_json::to_string(&data).unwrap().as_bytes());
        check_reader(&path, &format!("{} {edits:?}", STYLES[style]))?;
    }

    /// Bytes of the fixtures flipped, cut or repeated.
    #[test]
    fn mutated_bytes_load_or_fail_with_one_line_naming_the_file(
        style in 0usize..STYLES.len(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let mut bytes = std::fs::read(fixture(STYLES[style])).unwrap();
        for &(at, byte, kind) in &edits {
            let at = at % (bytes.len() + 1);
            match kind {
                0 => if at < bytes.len() { bytes[at] = byte },
                1 => bytes.truncate(at),
                _ => bytes.insert(at, byte),
            }
        }
        let path = scratch("bytes", &bytes);
        check_reader(&path, &format!("{} {edits:?}", STYLES[style]))?;
    }
}
