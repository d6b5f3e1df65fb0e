//! DeBERTa-v3's Unigram tokenizer against its references, on two small SentencePiece models
//! trained by scripts/gen_unigram_fixtures.py (tests/fixtures/unigram/): `deberta` has
//! DeBERTa-v3's special pieces and precompiled character map, `bytes` byte fallback and no
//! map. spm.model is held to `sentencepiece`, tokenizer.json (transformers' DeBERTa-v2
//! conversion) to `tokenizers`, id for id; then both readers are fuzzed with mutated files.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestRunner};
use rcx::tokenizer::unigram::{Unigram, load};
use serde_json::Value;

fn fixture(model: &str, file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/unigram")
        .join(model)
        .join(file)
}

fn cases(model: &str) -> Value {
    let text = std::fs::read_to_string(fixture(model, "cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap() as u32)
        .collect()
}

fn loaded(model: &str, file: &str) -> Unigram {
    load(&fixture(model, file)).unwrap_or_else(|e| panic!("{model}/{file}: {e}"))
}

/// Every text's ids from one file against one reference's; the mismatches, listed.
fn mismatches(model: &str, file: &str, reference: &str) -> Vec<String> {
    let tokenizer = loaded(model, file);
    let cases = cases(model);
    let texts = cases["texts"].as_array().unwrap();
    assert!(texts.len() > 10, "{model}: too few texts");
    texts
        .iter()
        .filter_map(|case| {
            let text = case["text"].as_str().unwrap();
            let expected = ids(&case[reference]);
            let got = tokenizer.tokenize(text);
            (got != expected).then(|| format!("{text:?}: expected {expected:?}, got {got:?}"))
        })
        .collect()
}

fn assert_exact(model: &str, file: &str, reference: &str) {
    let wrong = mismatches(model, file, reference);
    assert!(
        wrong.is_empty(),
        "{model}/{file}: {} texts differ from {reference}:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

#[test]
fn spm_model_gives_sentencepiece_ids() {
    assert_exact("deberta", "spm.model", "spm");
}

#[test]
fn spm_model_with_byte_fallback_gives_sentencepiece_ids() {
    assert_exact("bytes", "spm.model", "spm");
}

/// Segmentations of exactly equal score: both references keep the first one found (the
/// earliest start of the last piece), sentencepiece in f32 and tokenizers in f64.
#[test]
fn ties_break_as_the_references_do() {
    assert_exact("ties", "spm.model", "spm");
    assert_exact("ties", "tokenizer.json", "json");
}

#[test]
fn tokenizer_json_gives_tokenizers_ids() {
    assert_exact("deberta", "tokenizer.json", "json");
}

#[test]
fn tokenizer_json_with_byte_fallback_gives_tokenizers_ids() {
    assert_exact("bytes", "tokenizer.json", "json");
}

/// The requirement: a folder holding both files gives the same ids from either,
/// on every text where the two references agree; the texts where they part are few.
#[test]
fn both_files_of_a_model_give_the_same_ids() {
    let from_spm = loaded("deberta", "spm.model");
    let from_json = loaded("deberta", "tokenizer.json");
    let cases = cases("deberta");
    let mut references_differ = 0;
    for case in cases["texts"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        if case["spm"] != case["json"] {
            references_differ += 1;
            continue;
        }
        assert_eq!(
            from_spm.tokenize(text),
            from_json.tokenize(text),
            "{text:?}"
        );
    }
    let texts = cases["texts"].as_array().unwrap().len();
    assert!(
        references_differ * 10 < texts,
        "{references_differ} of {texts} texts where sentencepiece and tokenizers differ"
    );
    assert_eq!(from_spm.vocab_size(), from_json.vocab_size());
    for token in ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"] {
        assert_eq!(
            from_spm.token_id(token),
            from_json.token_id(token),
            "{token}"
        );
    }
}

/// `[CLS] A [SEP] B [SEP]` with its types, and tokenizers' "longest_first" truncation, from
/// both files (spm.model where the references agree on both texts).
#[test]
fn pairs_follow_the_template_and_truncation() {
    let cases = cases("deberta");
    let agree: std::collections::HashSet<&str> = cases["texts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["spm"] == c["json"])
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    let from_json = loaded("deberta", "tokenizer.json");
    let from_spm = loaded("deberta", "spm.model");
    let pairs = cases["pairs"].as_array().unwrap();
    assert!(pairs.len() > 30);
    let mut truncated = 0;
    for pair in pairs {
        let (a, b) = (pair["a"].as_str().unwrap(), pair["b"].as_str().unwrap());
        let max_length = pair["max_length"]
            .as_u64()
            .map_or(usize::MAX, |m| m as usize);
        let expected = (ids(&pair["input_ids"]), ids(&pair["token_type_ids"]));
        let got = from_json.encode_pair(a, b, max_length);
        assert_eq!(
            (got.input_ids, got.token_type_ids),
            expected,
            "json {a:?} {b:?}"
        );
        if agree.contains(a) && agree.contains(b) {
            let got = from_spm.encode_pair(a, b, max_length);
            assert_eq!(
                (got.input_ids, got.token_type_ids),
                expected,
                "spm {a:?} {b:?}"
            );
        }
        truncated += usize::from(expected.0.len() == max_length);
    }
    assert!(truncated > 5, "too few pairs cut by max_length");
    let single = from_json.encode("Hello, world!", 4);
    let cls = from_json.token_id("[CLS]").unwrap();
    let sep = from_json.token_id("[SEP]").unwrap();
    assert_eq!(single.input_ids.len(), 4);
    assert_eq!((single.input_ids[0], single.input_ids[3]), (cls, sep));
    assert_eq!(single.token_type_ids, vec![0; 4]);
}

/// Chars that walk much of a character map: compatibility forms of many blocks.
const FUZZ_TEXT: &str = "ﬁne ｶﾞ [CLS] 😀 x Ⅻ ① ㍿ ｆｕｌｌ ½ ℌ é e\u{301} Å Ω ǅ ĳ ﬃ ﹰ ﾊﾟ \u{3000} \u{a0}ำ \
     Straße Ελληνικά Кириллица 中文 日本語 한국어 \u{1100}\u{1161} 🇫🇷 👨‍👩‍👧 \u{200b}\u{ad}";

/// A few bytes changed, cut or inserted anywhere in a valid file.
fn mutate(mut bytes: Vec<u8>, edits: &[(u8, prop::sample::Index, u8)]) -> Vec<u8> {
    for &(kind, at, value) in edits {
        if bytes.is_empty() {
            break;
        }
        let i = at.index(bytes.len());
        match kind % 4 {
            0 => bytes[i] = value,
            1 => bytes[i] ^= 1 << (value % 8),
            2 => bytes.truncate(i),
            _ => bytes.insert(i, value),
        }
    }
    bytes
}

/// Loads mutated copies of `file`: each is refused with one line or tokenizes without
/// panicking.
fn fuzz_reader(model: &str, file: &str, cases: u32) {
    let original = std::fs::read(fixture(model, file)).unwrap();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz_unigram_{model}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(file);
    let config = ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(13),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let edits = prop::collection::vec(
        (any::<u8>(), any::<prop::sample::Index>(), any::<u8>()),
        1..6,
    );
    let refused = std::cell::Cell::new(0u32);
    TestRunner::new(config)
        .run(&edits, |edits| {
            std::fs::write(&path, mutate(original.clone(), &edits)).unwrap();
            match load(&path) {
                Ok(tokenizer) => {
                    let encoding = tokenizer.encode_pair(FUZZ_TEXT, "  the\tend ", 16);
                    prop_assert!(encoding.input_ids.len() <= 16);
                }
                Err(e) => {
                    let message = e.to_string();
                    prop_assert!(!message.contains('\n'), "two lines: {message}");
                    prop_assert!(message.contains(&path.display().to_string()), "{message}");
                    refused.set(refused.get() + 1);
                }
            }
            Ok(())
        })
        .unwrap();
    assert!(refused.get() > 0, "{model}/{file}: no mutation was refused");
}

#[test]
fn fuzz_spm_model_reader() {
    fuzz_reader("bytes", "spm.model", 300);
}

#[test]
fn fuzz_tokenizer_json_reader() {
    fuzz_reader("bytes", "tokenizer.json", 200);
}

#[test]
fn fuzz_spm_model_with_charsmap() {
    fuzz_reader("deberta", "spm.model", 150);
}

#[test]
fn fuzz_tokenizer_json_with_charsmap() {
    fuzz_reader("deberta", "tokenizer.json", 60);
}

#[test]
fn bad_files_are_refused_by_name() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("unigram_bad_files");
    std::fs::create_dir_all(&dir).unwrap();
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("deberta", "tokenizer.json")).unwrap(),
    )
    .unwrap();
    let variants: Vec<(&str, Value, &str)> = vec![
        (
            "bpe",
            edit(&json, |j| j["model"]["type"] = "BPE".into()),
            "model.type",
        ),
        (
            "nfc",
            edit(&json, |j| {
                j["normalizer"]["normalizers"][0] = serde_json::json!({"type": "NFC"})
            }),
            "normalizer.normalizers[0].type",
        ),
        (
            "charsmap",
            edit(&json, |j| {
                j["normalizer"]["normalizers"][1]["precompiled_charsmap"] = "AA$=".into()
            }),
            "precompiled_charsmap is not base64",
        ),
        (
            "unk",
            edit(&json, |j| j["model"]["unk_id"] = 99999.into()),
            "model.unk_id",
        ),
        (
            "lstrip",
            edit(&json, |j| j["added_tokens"][0]["lstrip"] = true.into()),
            "added_tokens[0].lstrip",
        ),
    ];
    for (name, value, expected) in variants {
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, value.to_string()).unwrap();
        let message = load(&path).unwrap_err().to_string();
        assert!(
            message.contains(expected) && message.contains(&path.display().to_string()),
            "{message}"
        );
    }
    let path = dir.join("text.model");
    std::fs::write(&path, b"not a model at all").unwrap();
    let message = load(&path).unwrap_err().to_string();
    assert!(message.contains("not a SentencePiece model"), "{message}");
}

fn edit(json: &Value, change: impl FnOnce(&mut Value)) -> Value {
    let mut json = json.clone();
    change(&mut json);
    json
}

/// `rcx tokenize --tokenizer FILE`'s JSON line, parsed: (input_ids, token_type_ids).
fn tokenize_command(args: &[&str]) -> (Vec<u32>, Vec<u32>) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rcx"))
        .arg("tokenize")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    (ids(&line["input_ids"]), ids(&line["token_type_ids"]))
}

/// `rcx tokenize --tokenizer` takes either Unigram file and prints the references' ids:
/// texts alone (tokenizers' for tokenizer.json, sentencepiece's for spm.model) and pairs
/// with their truncation (`[CLS] A [SEP] B [SEP]`).
#[test]
fn the_command_prints_the_references_ids_for_texts_and_pairs() {
    let cases = cases("deberta");
    let json = fixture("deberta", "tokenizer.json");
    let spm = fixture("deberta", "spm.model");
    let (json, spm) = (json.to_str().unwrap(), spm.to_str().unwrap());
    // The fixture's text ids are without special tokens; the command, like
    // `encode(TEXT)`, adds the single template's `[CLS] A [SEP]`, whose ids the file names.
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("deberta", "tokenizer.json")).unwrap(),
    )
    .unwrap();
    let template = &file["post_processor"];
    let special = |name: &str| template["special_tokens"][name]["ids"][0].as_u64().unwrap() as u32;
    let with_template = |inner: Vec<u32>| {
        let mut ids = vec![special("[CLS]")];
        ids.extend(inner);
        ids.push(special("[SEP]"));
        ids
    };
    for case in cases["texts"]
        .as_array()
        .unwrap()
        .iter()
        .step_by(97)
        .take(12)
    {
        let text = case["text"].as_str().unwrap();
        // `--` so that a text starting with '-' stays a text.
        let (got, _) = tokenize_command(&["--tokenizer", json, "--", text]);
        assert_eq!(
            got,
            with_template(ids(&case["json"])),
            "tokenizer.json, {text:?}"
        );
        let (got, _) = tokenize_command(&["--tokenizer", spm, "--", text]);
        assert_eq!(got, with_template(ids(&case["spm"])), "spm.model, {text:?}");
    }
    for pair in cases["pairs"].as_array().unwrap().iter().take(12) {
        let (a, b) = (pair["a"].as_str().unwrap(), pair["b"].as_str().unwrap());
        let limit = pair["max_length"].as_u64().map(|m| m.to_string());
        let mut args = vec!["--tokenizer", json, "--pair", b];
        if let Some(limit) = &limit {
            args.extend(["--max-length", limit]);
        }
        args.extend(["--", a]);
        let got = tokenize_command(&args);
        let expected = (ids(&pair["input_ids"]), ids(&pair["token_type_ids"]));
        assert_eq!(got, expected, "pair {a:?} {b:?} at {limit:?}");
    }
}

/// The reward model's `Tokenizer` over a Unigram file: the reference's pair ids, padding
/// with [PAD], a cache key that follows the file; a model without a padding token refused.
#[test]
fn a_reward_models_tokenizer_reads_either_unigram_file() {
    use rcx::error::Error;
    use rcx::tokenizer::Tokenizer;
    let cases = cases("deberta");
    let json = Tokenizer::from_unigram_file(&fixture("deberta", "tokenizer.json")).unwrap();
    let spm = Tokenizer::from_unigram_file(&fixture("deberta", "spm.model")).unwrap();
    assert_eq!((json.pad_id(), spm.pad_id()), (0, 0));
    for pair in cases["pairs"].as_array().unwrap() {
        let (a, b) = (pair["a"].as_str().unwrap(), pair["b"].as_str().unwrap());
        let max_length = pair["max_length"]
            .as_u64()
            .map_or(usize::MAX, |m| m as usize);
        let encoding = json.encode_pair(a, b, max_length);
        assert_eq!(encoding.input_ids, ids(&pair["input_ids"]), "{a:?} {b:?}");
        assert_eq!(encoding.token_type_ids, ids(&pair["token_type_ids"]));
        // sentencepiece and tokenizers differ on some texts (see above); on plain ASCII
        // both files give the same ids.
        if a.is_ascii() && b.is_ascii() {
            assert_eq!(
                spm.encode_pair(a, b, max_length),
                encoding,
                "spm {a:?} {b:?}"
            );
        }
    }
    assert_ne!(json.fingerprint(), spm.fingerprint(), "keyed by the file");

    let mut file = read_json_value(&fixture("deberta", "tokenizer.json"));
    for name in ["[PAD]", "<pad>"] {
        rename_token(&mut file, name, "[NOTPAD]");
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("unigram_no_pad");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string(&file).unwrap()).unwrap();
    match Tokenizer::from_unigram_file(&path) {
        Err(Error::User(message)) => {
            assert!(
                message.contains("padding token") && message.contains("tokenizer.json"),
                "{message}"
            )
        }
        other => panic!("expected a user error, got {other:?}"),
    }
}

fn read_json_value(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Renames a token in a tokenizer.json's added tokens and Unigram vocabulary.
fn rename_token(file: &mut Value, from: &str, to: &str) {
    for token in file["added_tokens"].as_array_mut().unwrap() {
        if token["content"] == from {
            token["content"] = Value::from(to);
        }
    }
    for piece in file["model"]["vocab"].as_array_mut().unwrap() {
        if piece[0] == from {
            piece[0] = Value::from(to);
        }
    }
}
