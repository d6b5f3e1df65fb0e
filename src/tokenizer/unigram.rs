//! DeBERTa-v3's tokenizer: a SentencePiece Unigram model, read from either file a DeBERTa-v3
//! folder may hold, each exact against its own reference:
//!
//! - `spm.model` (`load` reads it by hand, `unigram/spm.rs`) encodes as `sentencepiece` does:
//!   SentencePiece's normalizer (the precompiled map, longest match; extra whitespace
//!   removed; the dummy prefix), one Viterbi lattice over the whole text with f32 scores,
//!   unknown runs merged, byte fallback where the model has it;
//! - `tokenizer.json` encodes as the `tokenizers` library does with what transformers'
//!   DeBERTa-v2 converter writes: the normalizers `Strip`, `Precompiled` (the same map, in
//!   base64, applied per grapheme as tokenizers does), `Replace`; the `Metaspace`
//!   pre-tokenizer (one lattice per word, f64 scores); the `TemplateProcessing` template.
//!
//! Both split out their special tokens ([PAD] [CLS] [SEP] [UNK] [MASK], and a
//! tokenizer.json's other added tokens) from the raw text first, and both give
//! `[CLS] A [SEP]` and `[CLS] A [SEP] B [SEP]` (types 0 then 1). The two references differ on
//! a few texts (4% of tests/fixtures/unigram/deberta's: a literal U+2581, runs of spaces
//! and marks, halfwidth voiced kana, controls, chars mapped inside a grapheme); everywhere
//! else the two files give the same ids.
//!
//! Not supported, refused by name: other normalizers (the NFC of transformers 5's own
//! DeBERTa-v2 tokenizer.json, Lowercase), pre-tokenizers other than Metaspace (DeBERTa's
//! split_by_punct), added tokens with lstrip/rstrip/single_word/normalized set.

mod grapheme_tables;
mod spm;

use crate::error::{Error, Result};
use crate::tokenizer::Encoding;
use serde_json::Value;
use spm::{CharsMap, PieceType};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// The largest tokenizer file read: DeBERTa-v3's spm.model is 2.4 MB and its tokenizer.json
/// 8 MB; the bound keeps a wrong path from filling memory.
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;
/// SentencePiece's penalty of the unknown piece below the lowest score.
const UNKNOWN_PENALTY: f64 = 10.0;
/// The mask token DeBERTa-v2/v3 tokenizers append after the pieces of an spm.model.
const MASK_TOKEN: &str = "[MASK]";
const SPACE_SYMBOL: char = '\u{2581}';

/// Which reference the tokenizer follows: the file it was read from decides.
#[derive(Debug)]
enum Pipeline {
    SentencePiece {
        charsmap: Option<CharsMap>,
        add_dummy_prefix: bool,
        remove_extra_whitespaces: bool,
        escape_whitespaces: bool,
        /// User-defined pieces, longest first: never normalized, always whole.
        user_defined: Vec<String>,
    },
    Tokenizers {
        normalizers: Vec<NormalizerStep>,
        prepend: Prepend,
        split_words: bool,
        replacement: char,
    },
}

#[derive(Debug)]
enum NormalizerStep {
    Strip {
        left: bool,
        right: bool,
    },
    Precompiled(CharsMap),
    /// `Replace` of a literal string.
    Replace {
        pattern: String,
        content: String,
    },
    /// `Replace` of the regex " {2,}": runs of two or more spaces.
    ReplaceSpaceRuns {
        content: String,
    },
}

/// Metaspace's `prepend_scheme`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Prepend {
    Always,
    First,
    Never,
}

/// One item of a template: a special token's ids or a sequence, with its type id.
#[derive(Debug, Clone)]
enum TemplateItem {
    Special(Vec<u32>, u32),
    Sequence(usize, u32),
}

#[derive(Debug)]
pub struct Unigram {
    /// id -> score; `None` for an id the lattice never uses (control, unknown, byte and
    /// unused pieces of an spm.model, added tokens beyond a tokenizer.json's model).
    scores: Vec<Option<f64>>,
    /// Every prefix (at char boundaries) of every piece the lattice uses -> the piece's id
    /// when the prefix is a whole piece: the lattice walks it as a trie.
    prefixes: HashMap<String, Option<u32>>,
    /// Every piece text -> id, for byte pieces and fused unknown runs.
    ids: HashMap<String, u32>,
    unk_id: u32,
    unk_score: f64,
    /// SentencePiece sums scores in f32, tokenizers in f64.
    f32_scores: bool,
    byte_fallback: bool,
    /// Tokens matched in the raw text before anything else, longest first.
    specials: Vec<(String, u32)>,
    single: Vec<TemplateItem>,
    pair: Vec<TemplateItem>,
    pipeline: Pipeline,
    vocab_size: usize,
    /// FNV-1a of the file's bytes: token caches are keyed by it.
    fingerprint: u64,
}

/// Reads `spm.model` or `tokenizer.json` (told apart by content: JSON starts with `{`).
pub fn load(path: &Path) -> Result<Unigram> {
    from_bytes(&read_bounded(path)?, path)
}

/// `load` of a file already read (`bytes`, as `read_bounded` gives them); `path` names it
/// in errors.
pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Unigram> {
    let mut model = if is_json(bytes) {
        from_json(bytes, path)?
    } else {
        from_spm(bytes, path)?
    };
    model.fingerprint = crate::checksum::fnv1a(bytes);
    Ok(model)
}

/// Whether a file's `bytes` are a Unigram model: an spm.model, or a tokenizer.json whose model is
/// `Unigram`. A file that is neither readable JSON nor a Unigram model answers false, so
/// that the BPE reader names what is wrong with it.
pub fn is_unigram_bytes(bytes: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct File {
        model: Option<Model>,
    }
    #[derive(serde::Deserialize)]
    struct Model {
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    if !is_json(bytes) {
        return true;
    }
    serde_json::from_slice::<File>(bytes)
        .ok()
        .and_then(|file| file.model?.kind)
        .is_some_and(|kind| kind == "Unigram")
}

fn is_json(bytes: &[u8]) -> bool {
    bytes.trim_ascii_start().first() == Some(&b'{')
}

/// The file's bytes, refused past `MAX_TOKENIZER_BYTES` before they are all read.
pub fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    let io = |e| Error::io(path, e);
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_TOKENIZER_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_TOKENIZER_BYTES {
        return Err(Error::user(format!(
            "{}: larger than {} MiB, expected a tokenizer.json or spm.model",
            path.display(),
            MAX_TOKENIZER_BYTES >> 20
        )));
    }
    Ok(bytes)
}

fn from_spm(bytes: &[u8], path: &Path) -> Result<Unigram> {
    let model = spm::read_model(bytes, path)?;
    let at = |what: String| Error::user(format!("{}: {what}", path.display()));
    let mut scores = Vec::with_capacity(model.pieces.len() + 1);
    let mut ids = HashMap::with_capacity(model.pieces.len());
    let mut lattice_pieces = Vec::new();
    let mut specials = Vec::new();
    let mut user_defined = Vec::new();
    let mut unk_id = None;
    let mut min_score = f32::MAX;
    // SentencePiece starts its maximum at FLT_MIN, the least positive float.
    let mut max_score = f32::MIN_POSITIVE;
    for piece in &model.pieces {
        if piece.kind == PieceType::Normal {
            min_score = min_score.min(piece.score);
            max_score = max_score.max(piece.score);
        }
    }
    let mut bytes_found = 0usize;
    for (id, piece) in model.pieces.iter().enumerate() {
        let id = id as u32;
        if ids.insert(piece.text.clone(), id).is_some() {
            return Err(at(format!("piece {:?} is defined twice", piece.text)));
        }
        let score = match piece.kind {
            PieceType::Normal => Some(f64::from(piece.score)),
            PieceType::UserDefined => {
                user_defined.push(piece.text.clone());
                Some(user_defined_score(piece.text.len(), max_score))
            }
            PieceType::Unknown => {
                if unk_id.replace(id).is_some() {
                    return Err(at("more than one unknown piece".into()));
                }
                specials.push((piece.text.clone(), id));
                None
            }
            PieceType::Control => {
                specials.push((piece.text.clone(), id));
                None
            }
            PieceType::Byte => {
                if !model.byte_fallback {
                    return Err(at(format!(
                        "byte piece {:?} in a model without byte_fallback",
                        piece.text
                    )));
                }
                bytes_found += 1;
                None
            }
            PieceType::Unused => None,
        };
        if score.is_some() {
            lattice_pieces.push((piece.text.as_str(), id));
        }
        scores.push(score);
    }
    let unk_id = unk_id.ok_or_else(|| at("no unknown piece; expected one such as [UNK]".into()))?;
    if model.byte_fallback && (0..=255u8).any(|b| !ids.contains_key(&byte_piece(b))) {
        return Err(at(format!(
            "byte_fallback is set but {bytes_found} of the 256 byte pieces <0x00>..<0xFF> exist"
        )));
    }
    let vocab_size = if ids.contains_key(MASK_TOKEN) {
        scores.len()
    } else {
        specials.push((MASK_TOKEN.to_string(), scores.len() as u32));
        scores.push(None);
        scores.len()
    };
    let special = |name: &str| {
        ids.get(name).copied().ok_or_else(|| {
            at(format!(
                "no piece {name}; expected DeBERTa-v3's [PAD] [CLS] [SEP] [UNK]"
            ))
        })
    };
    let (cls, sep) = (special("[CLS]")?, special("[SEP]")?);
    user_defined.sort_by_key(|p| std::cmp::Reverse(p.len()));
    let prefixes = prefix_map(&lattice_pieces);
    Ok(Unigram {
        scores,
        prefixes,
        ids,
        unk_id,
        unk_score: f64::from(min_score) - UNKNOWN_PENALTY,
        f32_scores: true,
        byte_fallback: model.byte_fallback,
        specials: longest_first(specials),
        single: deberta_template(cls, sep, false),
        pair: deberta_template(cls, sep, true),
        pipeline: Pipeline::SentencePiece {
            charsmap: model.charsmap,
            add_dummy_prefix: model.add_dummy_prefix,
            remove_extra_whitespaces: model.remove_extra_whitespaces,
            escape_whitespaces: model.escape_whitespaces,
            user_defined,
        },
        vocab_size,
        // Set by `load`, which has the bytes.
        fingerprint: 0,
    })
}

/// SentencePiece's score of a user-defined piece: enough to always win (length in bytes
/// times the best score, less 0.1), in f32.
fn user_defined_score(len: usize, max_score: f32) -> f64 {
    f64::from(len as f32 * max_score - 0.1)
}

fn deberta_template(cls: u32, sep: u32, pair: bool) -> Vec<TemplateItem> {
    let mut items = vec![
        TemplateItem::Special(vec![cls], 0),
        TemplateItem::Sequence(0, 0),
        TemplateItem::Special(vec![sep], 0),
    ];
    if pair {
        items.push(TemplateItem::Sequence(1, 1));
        items.push(TemplateItem::Special(vec![sep], 1));
    }
    items
}

fn longest_first(mut specials: Vec<(String, u32)>) -> Vec<(String, u32)> {
    specials.sort_by_key(|(text, _)| std::cmp::Reverse(text.len()));
    specials
}

fn byte_piece(byte: u8) -> String {
    format!("<0x{byte:02X}>")
}

/// Every prefix of every piece at a char boundary, mapped to the piece's id where the
/// prefix is a whole piece.
fn prefix_map(pieces: &[(&str, u32)]) -> HashMap<String, Option<u32>> {
    let mut prefixes = HashMap::with_capacity(pieces.len() * 4);
    for &(text, id) in pieces {
        for (end, _) in text.char_indices().skip(1) {
            prefixes.entry(text[..end].to_string()).or_insert(None);
        }
        prefixes.insert(text.to_string(), Some(id));
    }
    prefixes
}

/// A JSON key's value, or an error naming it.
fn key<'v>(value: &'v Value, name: &str, at: &dyn Fn(String) -> Error) -> Result<&'v Value> {
    value
        .get(name)
        .ok_or_else(|| at(format!("lacks the key \"{name}\"")))
}

fn from_json(bytes: &[u8], path: &Path) -> Result<Unigram> {
    let at = |what: String| Error::user(format!("{}: {what}", path.display()));
    let root: Value = serde_json::from_slice(bytes)
        .map_err(|e| at(format!("not valid JSON ({e}); expected a tokenizer.json")))?;
    let model = key(&root, "model", &at)?;
    if model.get("type").and_then(Value::as_str) != Some("Unigram") {
        return Err(at(format!(
            "model.type is {}; expected \"Unigram\" (a SentencePiece conversion)",
            model.get("type").unwrap_or(&Value::Null)
        )));
    }
    let vocab = key(model, "vocab", &at)?
        .as_array()
        .ok_or_else(|| at("model.vocab is not a list of [piece, score]".into()))?;
    if vocab.len() > spm::MAX_PIECES {
        return Err(at("model.vocab has more than 4,194,304 pieces".into()));
    }
    let mut scores = Vec::with_capacity(vocab.len());
    let mut ids = HashMap::with_capacity(vocab.len());
    let mut lattice_pieces = Vec::with_capacity(vocab.len());
    let mut min_score = f64::INFINITY;
    for (id, entry) in vocab.iter().enumerate() {
        let (text, score) = match entry.as_array().map(Vec::as_slice) {
            Some([Value::String(text), score]) if score.as_f64().is_some() => {
                (text.as_str(), score.as_f64().unwrap_or_default())
            }
            _ => {
                return Err(at(format!(
                    "model.vocab[{id}] is {entry}; expected [piece, score]"
                )));
            }
        };
        if text.is_empty() {
            return Err(at(format!("model.vocab[{id}] is an empty piece")));
        }
        // tokenizers keeps the last id of a repeated piece.
        ids.insert(text.to_string(), id as u32);
        lattice_pieces.push((text, id as u32));
        min_score = min_score.min(score);
        scores.push(Some(score));
    }
    let unk_id = key(model, "unk_id", &at)?
        .as_u64()
        .filter(|&id| (id as usize) < vocab.len())
        .ok_or_else(|| at("model.unk_id is not an id of model.vocab".into()))?
        as u32;
    let byte_fallback = model
        .get("byte_fallback")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut specials = Vec::new();
    let mut vocab_size = scores.len();
    if let Some(added) = root.get("added_tokens").and_then(Value::as_array) {
        for (i, token) in added.iter().enumerate() {
            let content = token.get("content").and_then(Value::as_str);
            let id = token.get("id").and_then(Value::as_u64).map(|id| id as u32);
            let (Some(content), Some(id)) = (content, id) else {
                return Err(at(format!(
                    "added_tokens[{i}] lacks a string \"content\" or a numeric \"id\""
                )));
            };
            for flag in ["lstrip", "rstrip", "single_word", "normalized"] {
                if token.get(flag).and_then(Value::as_bool) == Some(true) {
                    return Err(at(format!(
                        "added_tokens[{i}].{flag} is true; rcx supports added tokens matched \
                         verbatim in the raw text (all four flags false)"
                    )));
                }
            }
            if content.is_empty() {
                return Err(at(format!("added_tokens[{i}] has an empty content")));
            }
            vocab_size = vocab_size.max(id as usize + 1);
            specials.push((content.to_string(), id));
        }
    }
    // Ids follow the pieces: a larger one is a claim the file does not hold, refused
    // before the scores are sized by it.
    if vocab_size > scores.len() + specials.len() {
        return Err(at(format!(
            "an added token's id is {}; expected ids below the {} pieces and added tokens",
            vocab_size - 1,
            scores.len() + specials.len()
        )));
    }
    scores.resize(vocab_size, None);
    let normalizers = match root.get("normalizer") {
        None | Some(Value::Null) => Vec::new(),
        Some(normalizer) => json_normalizers(normalizer, "normalizer", &at)?,
    };
    let (prepend, split_words, replacement) = json_metaspace(&root, &at)?;
    let (single, pair) = json_template(&root, &at)?;
    let prefixes = prefix_map(&lattice_pieces);
    Ok(Unigram {
        scores,
        prefixes,
        ids,
        unk_id,
        unk_score: min_score - UNKNOWN_PENALTY,
        f32_scores: false,
        byte_fallback,
        specials: longest_first(specials),
        single,
        pair,
        pipeline: Pipeline::Tokenizers {
            normalizers,
            prepend,
            split_words,
            replacement,
        },
        vocab_size,
        // Set by `load`, which has the bytes.
        fingerprint: 0,
    })
}

fn json_normalizers(
    value: &Value,
    name: &str,
    at: &dyn Fn(String) -> Error,
) -> Result<Vec<NormalizerStep>> {
    let kind = value.get("type").and_then(Value::as_str).unwrap_or("");
    let flag = |key: &str| value.get(key).and_then(Value::as_bool).unwrap_or(true);
    Ok(match kind {
        "Sequence" => {
            let list = key(value, "normalizers", at)?
                .as_array()
                .ok_or_else(|| at(format!("{name}.normalizers is not a list")))?;
            let mut steps = Vec::new();
            for (i, item) in list.iter().enumerate() {
                steps.extend(json_normalizers(
                    item,
                    &format!("{name}.normalizers[{i}]"),
                    at,
                )?);
            }
            steps
        }
        "Strip" => vec![NormalizerStep::Strip {
            left: flag("strip_left"),
            right: flag("strip_right"),
        }],
        "Precompiled" => {
            let text = key(value, "precompiled_charsmap", at)?
                .as_str()
                .ok_or_else(|| at(format!("{name}.precompiled_charsmap is not a string")))?;
            let blob = base64_decode(text)
                .ok_or_else(|| at(format!("{name}.precompiled_charsmap is not base64")))?;
            if blob.is_empty() {
                return Ok(Vec::new());
            }
            let map = CharsMap::parse(&blob)
                .map_err(|e| at(format!("{name}.precompiled_charsmap: {e}")))?;
            vec![NormalizerStep::Precompiled(map)]
        }
        "Replace" => {
            let content = key(value, "content", at)?
                .as_str()
                .ok_or_else(|| at(format!("{name}.content is not a string")))?
                .to_string();
            let pattern = key(value, "pattern", at)?;
            if let Some(literal) = pattern.get("String").and_then(Value::as_str) {
                if literal.is_empty() {
                    return Err(at(format!("{name}.pattern.String is empty")));
                }
                vec![NormalizerStep::Replace {
                    pattern: literal.to_string(),
                    content,
                }]
            } else if pattern.get("Regex").and_then(Value::as_str) == Some(" {2,}") {
                vec![NormalizerStep::ReplaceSpaceRuns { content }]
            } else {
                return Err(at(format!(
                    "{name}.pattern is {pattern}; rcx supports a String pattern and the Regex \" {{2,}}\""
                )));
            }
        }
        _ => {
            return Err(at(format!(
                "{name}.type is {:?}; rcx supports Sequence, Strip, Precompiled and Replace",
                kind
            )));
        }
    })
}

/// The Metaspace pre-tokenizer (alone or the one step of a Sequence): its prepend scheme,
/// whether it splits words, its replacement char.
fn json_metaspace(root: &Value, at: &dyn Fn(String) -> Error) -> Result<(Prepend, bool, char)> {
    let mut pre = key(root, "pre_tokenizer", at)?;
    let mut name = "pre_tokenizer".to_string();
    if pre.get("type").and_then(Value::as_str) == Some("Sequence") {
        match pre
            .get("pretokenizers")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
        {
            Some([one]) => {
                pre = one;
                name = "pre_tokenizer.pretokenizers[0]".into();
            }
            _ => {
                return Err(at(
                    "pre_tokenizer is a Sequence of other than one Metaspace; rcx supports Metaspace alone".into(),
                ));
            }
        }
    }
    if pre.get("type").and_then(Value::as_str) != Some("Metaspace") {
        return Err(at(format!(
            "{name}.type is {}; expected \"Metaspace\"",
            pre.get("type").unwrap_or(&Value::Null)
        )));
    }
    let replacement = match pre.get("replacement").and_then(Value::as_str) {
        Some(r) if r.chars().count() == 1 => r.chars().next().unwrap_or(SPACE_SYMBOL),
        _ => return Err(at(format!("{name}.replacement is not one char"))),
    };
    let prepend = match pre.get("prepend_scheme").and_then(Value::as_str) {
        Some("always") => Prepend::Always,
        Some("first") => Prepend::First,
        Some("never") => Prepend::Never,
        Some(other) => {
            return Err(at(format!(
                "{name}.prepend_scheme is {other:?}; expected always, first or never"
            )));
        }
        // Before prepend_scheme, add_prefix_space said always or never.
        None => match pre.get("add_prefix_space").and_then(Value::as_bool) {
            Some(false) => Prepend::Never,
            _ => Prepend::Always,
        },
    };
    let split = pre.get("split").and_then(Value::as_bool).unwrap_or(true);
    Ok((prepend, split, replacement))
}

/// The TemplateProcessing post-processor's single and pair templates.
fn json_template(
    root: &Value,
    at: &dyn Fn(String) -> Error,
) -> Result<(Vec<TemplateItem>, Vec<TemplateItem>)> {
    let post = key(root, "post_processor", at)?;
    if post.get("type").and_then(Value::as_str) != Some("TemplateProcessing") {
        return Err(at(format!(
            "post_processor.type is {}; expected \"TemplateProcessing\" ([CLS] A [SEP] B [SEP])",
            post.get("type").unwrap_or(&Value::Null)
        )));
    }
    let special_tokens = key(post, "special_tokens", at)?;
    let parse = |which: &str| -> Result<Vec<TemplateItem>> {
        let items = key(post, which, at)?
            .as_array()
            .ok_or_else(|| at(format!("post_processor.{which} is not a list")))?;
        let mut parsed = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let bad = || {
                at(format!(
                    "post_processor.{which}[{i}] is {item}; expected a SpecialToken or a Sequence"
                ))
            };
            let type_id = |v: &Value| v.get("type_id").and_then(Value::as_u64).map(|t| t as u32);
            if let Some(special) = item.get("SpecialToken") {
                let name = special.get("id").and_then(Value::as_str).ok_or_else(bad)?;
                let ids = special_tokens
                    .get(name)
                    .and_then(|s| s.get("ids"))
                    .and_then(Value::as_array)
                    .ok_or_else(|| at(format!("post_processor.special_tokens lacks {name:?}")))?
                    .iter()
                    .map(|id| id.as_u64().map(|id| id as u32))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| {
                        at(format!(
                            "post_processor.special_tokens[{name:?}].ids are not ids"
                        ))
                    })?;
                parsed.push(TemplateItem::Special(
                    ids,
                    type_id(special).ok_or_else(bad)?,
                ));
            } else if let Some(sequence) = item.get("Sequence") {
                let index = match sequence.get("id").and_then(Value::as_str) {
                    Some("A") => 0,
                    Some("B") if which == "pair" => 1,
                    _ => return Err(bad()),
                };
                parsed.push(TemplateItem::Sequence(
                    index,
                    type_id(sequence).ok_or_else(bad)?,
                ));
            } else {
                return Err(bad());
            }
        }
        Ok(parsed)
    };
    Ok((parse("single")?, parse("pair")?))
}

/// Standard base64 (with or without padding); `None` on any other byte.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let body = text.trim_end_matches('=').as_bytes();
    if text.len() - body.len() > 2 || body.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() / 4 * 3 + 2);
    for chunk in body.chunks(4) {
        let mut bits = 0u32;
        for &c in chunk {
            bits = (bits << 6) | digit(c)?;
        }
        bits <<= 6 * (4 - chunk.len() as u32);
        let bytes = bits.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

impl Unigram {
    /// Ids the model's embeddings must hold: pieces and added tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }

    /// The padding token's id: [PAD] (DeBERTa-v3) or <pad>, when the model has one.
    pub fn pad_id(&self) -> Option<u32> {
        self.token_id("[PAD]").or_else(|| self.token_id("<pad>"))
    }

    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The id of a piece or special token, such as "[PAD]".
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.specials
            .iter()
            .find(|(text, _)| text == token)
            .map(|&(_, id)| id)
            .or_else(|| self.ids.get(token).copied())
    }

    /// Ids of `text` without the template's special tokens.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = text;
        let mut offset = 0;
        while !rest.is_empty() {
            let (segment, special, after) = self.split_at_special(rest);
            if !segment.is_empty() {
                self.encode_segment(segment, offset == 0, &mut ids);
            }
            if let Some(id) = special {
                ids.push(id);
            }
            offset += rest.len() - after.len();
            rest = after;
        }
        ids
    }

    /// `[CLS] text [SEP]` (the template), the text cut at its end so that the whole has at
    /// most `max_length` ids; a `max_length` below the template's special tokens cuts
    /// nothing.
    pub fn encode(&self, text: &str, max_length: usize) -> Encoding {
        let mut ids = self.tokenize(text);
        if let Some(budget) = max_length.checked_sub(self.added(&self.single)) {
            ids.truncate(budget);
        }
        self.apply(&self.single, [&ids, &[]])
    }

    /// `[CLS] a [SEP] b [SEP]` (the template), cut "longest first" to at most `max_length`
    /// ids as tokenizers cuts a pair.
    pub fn encode_pair(&self, a: &str, b: &str, max_length: usize) -> Encoding {
        self.encode_tokenized_pair(&self.tokenize(a), &self.tokenize(b), max_length)
    }

    /// `encode_pair` of two texts already tokenized.
    pub fn encode_tokenized_pair(&self, a: &[u32], b: &[u32], max_length: usize) -> Encoding {
        let (mut a, mut b) = (a, b);
        if let Some(budget) = max_length.checked_sub(self.added(&self.pair)) {
            // WordPiece's pairs are cut by the same rule (tokenizers' "longest first").
            let (keep_a, keep_b) = super::longest_first_lengths(a.len(), b.len(), budget);
            a = &a[..keep_a.min(a.len())];
            b = &b[..keep_b.min(b.len())];
        }
        self.apply(&self.pair, [a, b])
    }

    fn added(&self, template: &[TemplateItem]) -> usize {
        template
            .iter()
            .map(|item| match item {
                TemplateItem::Special(ids, _) => ids.len(),
                TemplateItem::Sequence(..) => 0,
            })
            .sum()
    }

    fn apply(&self, template: &[TemplateItem], sequences: [&[u32]; 2]) -> Encoding {
        let mut input_ids = Vec::new();
        let mut token_type_ids = Vec::new();
        for item in template {
            let (ids, type_id): (&[u32], u32) = match item {
                TemplateItem::Special(ids, type_id) => (ids, *type_id),
                TemplateItem::Sequence(index, type_id) => (sequences[*index], *type_id),
            };
            input_ids.extend_from_slice(ids);
            token_type_ids.extend(std::iter::repeat_n(type_id, ids.len()));
        }
        Encoding {
            input_ids,
            token_type_ids,
        }
    }

    /// Splits `text` at its leftmost special token (the longest one there): (text before
    /// it, its id, text after it).
    fn split_at_special<'t>(&self, text: &'t str) -> (&'t str, Option<u32>, &'t str) {
        for (start, _) in text.char_indices() {
            for (special, id) in &self.specials {
                if text[start..].starts_with(special.as_str()) {
                    return (&text[..start], Some(*id), &text[start + special.len()..]);
                }
            }
        }
        (text, None, "")
    }

    /// Appends the ids of a text between special tokens.
    fn encode_segment(&self, segment: &str, at_start: bool, ids: &mut Vec<u32>) {
        match &self.pipeline {
            Pipeline::SentencePiece {
                charsmap,
                add_dummy_prefix,
                remove_extra_whitespaces,
                escape_whitespaces,
                user_defined,
            } => {
                let normalizer = spm::Normalizer {
                    charsmap: charsmap.as_ref(),
                    add_dummy_prefix: *add_dummy_prefix,
                    remove_extra_whitespaces: *remove_extra_whitespaces,
                    escape_whitespaces: *escape_whitespaces,
                    user_defined,
                };
                self.lattice(&normalizer.normalize(segment), ids);
            }
            Pipeline::Tokenizers {
                normalizers,
                prepend,
                split_words,
                replacement,
            } => {
                let mut text = segment.to_string();
                for step in normalizers {
                    text = step.apply(&text);
                }
                if text.is_empty() {
                    return;
                }
                let mut text: String = text
                    .chars()
                    .map(|c| if c == ' ' { *replacement } else { c })
                    .collect();
                let prepend = match prepend {
                    Prepend::Always => true,
                    Prepend::First => at_start,
                    Prepend::Never => false,
                };
                if prepend && !text.starts_with(*replacement) {
                    text.insert(0, *replacement);
                }
                if !split_words {
                    self.lattice(&text, ids);
                    return;
                }
                let mut word_start = 0;
                for (i, c) in text.char_indices() {
                    if c == *replacement && i > word_start {
                        self.lattice(&text[word_start..i], ids);
                        word_start = i;
                    }
                }
                self.lattice(&text[word_start..], ids);
            }
        }
    }

    /// The best segmentation of `text` (Viterbi over every piece that starts at each char;
    /// on equal scores the first found stays: the earlier start, then the shorter piece),
    /// appended as ids with unknown runs merged or spelled in byte pieces.
    fn lattice(&self, text: &str, ids: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        // Per end byte: (best score of a path ending here, its last piece's start, id).
        let mut best: Vec<Option<(f64, usize, u32)>> = vec![None; text.len() + 1];
        best[0] = Some((0.0, 0, 0));
        let add = |a: f64, b: f64| {
            if self.f32_scores {
                f64::from(a as f32 + b as f32)
            } else {
                a + b
            }
        };
        // Strictly better replaces: on a tie the first offer stays.
        let offer = |best: &mut [Option<(f64, usize, u32)>], end: usize, score: f64, start, id| {
            if best[end].is_none_or(|(s, _, _)| score > s) {
                best[end] = Some((score, start, id));
            }
        };
        for (start, c) in text.char_indices() {
            let Some((here, _, _)) = best[start] else {
                continue;
            };
            let char_end = start + c.len_utf8();
            let mut has_single = false;
            for (end, _) in text[start..]
                .char_indices()
                .skip(1)
                .map(|(i, _)| (start + i, ()))
                .chain(std::iter::once((text.len(), ())))
            {
                match self.prefixes.get(&text[start..end]) {
                    None => break,
                    Some(None) => {}
                    Some(Some(id)) => {
                        let Some(Some(score)) = self.scores.get(*id as usize) else {
                            continue;
                        };
                        offer(&mut best, end, add(*score, here), start, *id);
                        has_single |= end == char_end;
                    }
                }
            }
            if !has_single {
                offer(
                    &mut best,
                    char_end,
                    add(self.unk_score, here),
                    start,
                    self.unk_id,
                );
            }
        }
        let mut pieces = Vec::new();
        let mut end = text.len();
        while end > 0 {
            let Some((_, start, id)) = best[end] else {
                break;
            };
            pieces.push((start, end, id));
            end = start;
        }
        pieces.reverse();
        self.emit(text, &pieces, ids);
    }

    /// Appends a segmentation's ids. A run of unknown pieces is one unknown id, or its
    /// bytes' pieces under byte fallback; tokenizers first looks the run up as a piece.
    fn emit(&self, text: &str, pieces: &[(usize, usize, u32)], ids: &mut Vec<u32>) {
        let mut i = 0;
        while i < pieces.len() {
            let (start, mut end, id) = pieces[i];
            i += 1;
            if id != self.unk_id {
                ids.push(id);
                continue;
            }
            while i < pieces.len() && pieces[i].2 == self.unk_id {
                end = pieces[i].1;
                i += 1;
            }
            let run = &text[start..end];
            if matches!(self.pipeline, Pipeline::Tokenizers { .. })
                && let Some(&id) = self.ids.get(run)
            {
                ids.push(id);
                continue;
            }
            if self.byte_fallback {
                let bytes: Option<Vec<u32>> = run
                    .bytes()
                    .map(|b| self.ids.get(&byte_piece(b)).copied())
                    .collect();
                if let Some(bytes) = bytes {
                    ids.extend(bytes);
                    continue;
                }
            }
            ids.push(self.unk_id);
        }
    }
}

impl NormalizerStep {
    fn apply(&self, text: &str) -> String {
        match self {
            NormalizerStep::Strip { left, right } => {
                let mut s = text;
                if *left {
                    s = s.trim_start();
                }
                if *right {
                    s = s.trim_end();
                }
                s.to_string()
            }
            NormalizerStep::Precompiled(map) => precompiled_by_grapheme(map, text),
            NormalizerStep::Replace { pattern, content } => text.replace(pattern.as_str(), content),
            NormalizerStep::ReplaceSpaceRuns { content } => {
                let mut out = String::with_capacity(text.len());
                let mut run = 0;
                for c in text.chars().chain(std::iter::once('\0')) {
                    if c == ' ' {
                        run += 1;
                        continue;
                    }
                    match run {
                        0 => {}
                        1 => out.push(' '),
                        _ => out.push_str(content),
                    }
                    run = 0;
                    out.push(c);
                }
                out.pop();
                out
            }
        }
    }
}

/// tokenizers' `Precompiled` normalizer: a grapheme under 6 bytes with a match at its start
/// becomes the replacement of its shortest match (the rest of the grapheme dropped, as
/// tokenizers does); otherwise each char is replaced by its own match or kept.
fn precompiled_by_grapheme(map: &CharsMap, text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let push = |out: &mut String, bytes: &[u8]| out.push_str(&String::from_utf8_lossy(bytes));
    for grapheme in graphemes(text) {
        if grapheme.len() < 6
            && let Some(replacement) = map.shortest(grapheme.as_bytes())
        {
            push(&mut out, replacement);
            continue;
        }
        for (i, c) in grapheme.char_indices() {
            let one = &grapheme[i..i + c.len_utf8()];
            match map.shortest(one.as_bytes()) {
                Some(replacement) => push(&mut out, replacement),
                None => out.push(c),
            }
        }
    }
    out
}

/// Extended grapheme clusters (UAX #29's rules GB3 to GB13) over the classes tokenizers
/// uses, probed from it by scripts/gen_grapheme_tables.py.
fn graphemes(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        let mut chars = rest.char_indices();
        let (_, first) = chars.next()?;
        let mut cluster = Cluster::new(first);
        let mut end = first.len_utf8();
        for (i, c) in chars {
            if !cluster.joins(c) {
                break;
            }
            end = i + c.len_utf8();
        }
        let (head, tail) = rest.split_at(end);
        rest = tail;
        Some(head)
    })
}

/// Hangul syllable types (GB6 to GB8).
#[derive(Clone, Copy, PartialEq)]
enum Hangul {
    L,
    V,
    T,
    Lv,
    Lvt,
    None,
}

fn hangul(c: char) -> Hangul {
    match c as u32 {
        0x1100..=0x115F | 0xA960..=0xA97C => Hangul::L,
        0x1160..=0x11A7 | 0xD7B0..=0xD7C6 => Hangul::V,
        0x11A8..=0x11FF | 0xD7CB..=0xD7FB => Hangul::T,
        code @ 0xAC00..=0xD7A3 if (code - 0xAC00).is_multiple_of(28) => Hangul::Lv,
        0xAC00..=0xD7A3 => Hangul::Lvt,
        _ => Hangul::None,
    }
}

/// The state of the grapheme being read: its last char, and what the emoji, regional
/// indicator and Indic conjunct rules need of the chars before it.
struct Cluster {
    prev: char,
    /// An Extended_Pictographic char then only Extend chars.
    pictographic: bool,
    /// The last char is a ZWJ after such a run: an emoji joins it (GB11).
    zwj_after_pictographic: bool,
    /// Regional indicators at the end of the cluster so far.
    regional: usize,
    /// A conjunct consonant, then Extend chars with at least one virama (linker).
    conjunct: (bool, bool),
}

const LINKERS: [char; 6] = [
    '\u{94D}', '\u{9CD}', '\u{ACD}', '\u{B4D}', '\u{C4D}', '\u{D4D}',
];

fn regional(c: char) -> bool {
    ('\u{1F1E6}'..='\u{1F1FF}').contains(&c)
}

impl Cluster {
    fn new(first: char) -> Self {
        let mut cluster = Cluster {
            prev: first,
            pictographic: false,
            zwj_after_pictographic: false,
            regional: 0,
            conjunct: (false, false),
        };
        cluster.note(first);
        cluster
    }

    fn note(&mut self, c: char) {
        let extend = in_table(grapheme_tables::EXTEND, c);
        let after_pictographic = self.pictographic;
        self.zwj_after_pictographic = after_pictographic && c == '\u{200D}';
        self.pictographic = in_table(grapheme_tables::EXT_PICT, c)
            || (after_pictographic && extend && c != '\u{200D}');
        self.regional = if regional(c) { self.regional + 1 } else { 0 };
        self.conjunct = if in_table(grapheme_tables::CONSONANT, c) {
            (true, false)
        } else if self.conjunct.0 && (extend || LINKERS.contains(&c)) {
            (true, self.conjunct.1 || LINKERS.contains(&c))
        } else {
            (false, false)
        };
        self.prev = c;
    }

    /// Whether `c` continues the cluster (and then notes it).
    fn joins(&mut self, c: char) -> bool {
        let prev = self.prev;
        let control = |c| in_table(grapheme_tables::CONTROL, c);
        let joins = if prev == '\r' && c == '\n' {
            true
        } else if control(prev) || control(c) {
            false
        } else {
            match (hangul(prev), hangul(c)) {
                (Hangul::L, Hangul::L | Hangul::V | Hangul::Lv | Hangul::Lvt) => true,
                (Hangul::Lv | Hangul::V, Hangul::V | Hangul::T) => true,
                (Hangul::Lvt | Hangul::T, Hangul::T) => true,
                _ => {
                    in_table(grapheme_tables::EXTEND, c)
                        || in_table(grapheme_tables::PREPEND, prev)
                        || (self.conjunct == (true, true)
                            && in_table(grapheme_tables::CONSONANT, c))
                        || (self.zwj_after_pictographic && in_table(grapheme_tables::EXT_PICT, c))
                        || (regional(prev) && regional(c) && self.regional % 2 == 1)
                }
            }
        };
        if joins {
            self.note(c);
        }
        joins
    }
}

/// Whether `c` lies in one of the sorted inclusive `ranges`.
fn in_table(ranges: &[(u32, u32)], c: char) -> bool {
    let code = c as u32;
    let i = ranges.partition_point(|&(_, last)| last < code);
    ranges.get(i).is_some_and(|&(first, _)| first <= code)
}
