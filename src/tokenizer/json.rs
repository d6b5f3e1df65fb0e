//! A reader of Hugging Face's tokenizer.json for BPE models, giving the ids of
//! `Tokenizer.from_file(FILE).encode(TEXT).ids` (the `tokenizers` library):
//!
//!   1. added tokens that match the raw text (`normalized: false`) are split out first;
//!   2. each other piece is normalized, then added tokens that match the normalized text
//!      (`normalized: true`, their content normalized too) are split out;
//!   3. each remaining piece is pre-tokenized into words, and each word becomes BPE ids;
//!   4. the whole is truncated (the file's `truncation`, or `--max-length`) leaving room
//!      for the post-processor's special tokens, post-processed, then padded.
//!
//! Byte-level BPE (GPT-2, Llama 3, Qwen2: a `Split` regex and `ByteLevel`) and
//! SentencePiece-style BPE (Llama 2, Mistral: `Prepend`/`Replace` or `Metaspace`, byte
//! fallback) are covered; any other component is a one-line error naming it and the file.
//! The decoder is not read: encoding never uses it.

use super::bpe::Bpe;
use super::json_node::Node;
use super::normalize::{Normalized, Normalizer};
use super::pretokenize::PreTokenizer;
use crate::error::{Error, Result};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

/// The largest tokenizer.json read, in bytes: Llama 3's takes 9 MB, the largest released
/// ones (256k-entry vocabularies) about 35 MB.
pub const MAX_TOKENIZER_JSON_BYTES: u64 = 128 << 20;
/// The most added tokens read (Llama 3 has 256).
pub const MAX_ADDED_TOKENS: usize = 1 << 20;
/// The longest sequence the file's padding may ask for.
pub const MAX_PADDED_LENGTH: usize = 1 << 20;

/// A tokenizer.json, ready to encode.
#[derive(Debug)]
pub struct TokenizerJson {
    path: PathBuf,
    model: Bpe,
    normalizer: Option<Normalizer>,
    pre_tokenizer: Option<PreTokenizer>,
    post_processor: Option<PostProcessor>,
    added: AddedVocabulary,
    truncation: Option<Truncation>,
    padding: Option<Padding>,
}

impl TokenizerJson {
    pub fn from_file(path: &Path) -> Result<TokenizerJson> {
        let io = |e| Error::io(path, e);
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .map_err(io)?
            .take(MAX_TOKENIZER_JSON_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        TokenizerJson::from_slice(&bytes, path)
    }

    /// A tokenizer.json's content; `path` names it in errors.
    pub fn from_slice(bytes: &[u8], path: &Path) -> Result<TokenizerJson> {
        if bytes.len() as u64 > MAX_TOKENIZER_JSON_BYTES {
            return Err(Error::user(format!(
                "{}: larger than {} MiB, expected a Hugging Face tokenizer.json",
                path.display(),
                MAX_TOKENIZER_JSON_BYTES >> 20
            )));
        }
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            Error::user(format!(
                "{}: not a valid JSON file ({e}); expected a Hugging Face tokenizer.json",
                path.display()
            ))
        })?;
        TokenizerJson::from_value(&value, path)
    }

    fn from_value(value: &Value, path: &Path) -> Result<TokenizerJson> {
        let root = Node::root(value, path);
        root.object()?;
        let version = root.get("version")?;
        if let Some(v) = version.opt_str()?
            && v != "1.0"
        {
            return Err(version.error(format!("version {v:?}; expected \"1.0\"")));
        }
        let model_node = root.get("model")?;
        if model_node.is_null() {
            return Err(model_node.error("missing; expected the tokenizer's model"));
        }
        let model = Bpe::parse(&model_node)?;
        let optional = |key: &str| -> Result<Option<Node>> {
            let node = root.get(key)?;
            Ok((!node.is_null()).then_some(node))
        };
        let normalizer = optional("normalizer")?
            .map(|n| Normalizer::parse(&n))
            .transpose()?;
        let pre_tokenizer = optional("pre_tokenizer")?
            .map(|n| PreTokenizer::parse(&n))
            .transpose()?;
        let post_processor = optional("post_processor")?
            .map(|n| PostProcessor::parse(&n))
            .transpose()?;
        let truncation = optional("truncation")?
            .map(|n| Truncation::parse(&n))
            .transpose()?;
        let padding = optional("padding")?
            .map(|n| Padding::parse(&n))
            .transpose()?;
        let added = match optional("added_tokens")? {
            Some(node) => AddedVocabulary::parse(&node, &model, normalizer.as_ref())?,
            None => AddedVocabulary::default(),
        };
        Ok(TokenizerJson {
            path: path.to_path_buf(),
            model,
            normalizer,
            pre_tokenizer,
            post_processor,
            added,
            truncation,
            padding,
        })
    }

    /// The id of a token: an added token's, else the model's.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.added
            .ids
            .get(token)
            .copied()
            .or_else(|| self.model.token_id(token))
    }

    /// The ids of `text`, with the post-processor's special tokens when
    /// `add_special_tokens`; no truncation or padding.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let ids = self.tokenize(text)?;
        self.post_process(ids, add_special_tokens)
    }

    /// The ids `Tokenizer.from_file(FILE).encode(text).ids` gives: the file's truncation
    /// (or, with `max_length`, `enable_truncation(max_length)` instead) and padding.
    pub fn encode_as_reference(&self, text: &str, max_length: Option<usize>) -> Result<Vec<u32>> {
        let mut ids = self.tokenize(text)?;
        let truncation = match max_length {
            Some(max_length) => Some(Truncation {
                max_length,
                ..Truncation::default()
            }),
            None => self.truncation,
        };
        if let Some(truncation) = truncation {
            let added = self.special_tokens_count();
            // The reference subtracts in wrapping arithmetic: a budget below its special
            // tokens becomes no bound at all.
            let budget = match added {
                0 => Some(truncation.max_length),
                _ => truncation.max_length.checked_sub(added),
            };
            if let Some(budget) = budget {
                truncation.apply(&mut ids, budget, &self.path)?;
            }
        }
        let mut ids = self.post_process(ids, true)?;
        if let Some(padding) = &self.padding {
            padding.apply(&mut ids);
        }
        Ok(ids)
    }

    /// The ids the model's embeddings must hold: the model's entries (ids 0..n, as the
    /// reference counts them) and every added token's id.
    pub fn vocab_size(&self) -> usize {
        let added_end = self
            .added
            .tokens
            .keys()
            .next_back()
            .map_or(0, |&id| id as usize + 1);
        self.model.len().max(added_end)
    }

    /// The id of an added token marked special (`<|end_of_text|>`, `</s>`), None for any
    /// other token.
    pub fn special_token_id(&self, content: &str) -> Option<u32> {
        let id = *self.added.ids.get(content)?;
        self.added.tokens.get(&id)?.special.then_some(id)
    }

    /// The ids the post-processor puts before and after a single text: `encode(text, true)`
    /// is `before + encode(text, false) + after`. An error names the file when the
    /// post-processor is not of that shape (a template without `$A` or with it twice, or a
    /// Sequence of more than one template).
    pub fn single_affixes(&self) -> Result<(Vec<u32>, Vec<u32>)> {
        match &self.post_processor {
            None => Ok((Vec::new(), Vec::new())),
            Some(processor) => processor.single_affixes().map_err(|message| {
                Error::user(format!(
                    "{}: post_processor: {message}",
                    self.path.display()
                ))
            }),
        }
    }

    /// How many ids the post-processor adds to a single text.
    pub fn special_tokens_count(&self) -> usize {
        self.post_processor
            .as_ref()
            .map_or(0, PostProcessor::added_single)
    }

    /// Added tokens, normalization, pre-tokenization and the model: the ids of `text`
    /// before post-processing (`encode(text, false)`).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let in_file = |e: Error| match e {
            Error::User(message) => Error::user(format!("{}: {message}", self.path.display())),
            other => other,
        };
        let mut ids = Vec::new();
        for (raw_id, (start, end)) in self.added.find(text, &self.added.raw) {
            if let Some(id) = raw_id {
                ids.push(id);
                continue;
            }
            let mut piece = Normalized::new(&text[start..end], start);
            if piece.is_empty() {
                continue;
            }
            if let Some(normalizer) = &self.normalizer {
                normalizer.apply(&mut piece).map_err(in_file)?;
            }
            for (normalized_id, (start, end)) in
                self.added.find(&piece.text, &self.added.normalized)
            {
                if let Some(id) = normalized_id {
                    ids.push(id);
                    continue;
                }
                let part = piece.slice(start, end);
                if part.is_empty() {
                    continue;
                }
                let words = match &self.pre_tokenizer {
                    Some(pre_tokenizer) => pre_tokenizer.apply(vec![part]).map_err(in_file)?,
                    None => vec![part],
                };
                for word in words {
                    self.model
                        .tokenize_into(&word.text, &mut ids)
                        .map_err(in_file)?;
                }
            }
        }
        Ok(ids)
    }

    fn post_process(&self, ids: Vec<u32>, add_special_tokens: bool) -> Result<Vec<u32>> {
        match &self.post_processor {
            None => Ok(ids),
            Some(processor) => {
                let chunks =
                    processor
                        .process(vec![ids], add_special_tokens)
                        .map_err(|message| {
                            Error::user(format!(
                                "{}: post_processor: {message}",
                                self.path.display()
                            ))
                        })?;
                Ok(chunks.concat())
            }
        }
    }
}

/// One added token's options.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AddedToken {
    content: String,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
    special: bool,
}

/// The added tokens and the two sets of patterns they are found by.
#[derive(Debug, Default)]
struct AddedVocabulary {
    /// Content -> id.
    ids: HashMap<String, u32>,
    /// Id -> the token's options (the last token given that id).
    tokens: BTreeMap<u32, AddedToken>,
    /// Matched against the raw text.
    raw: Matcher,
    /// Matched against normalized text, by their normalized content.
    normalized: Matcher,
}

/// Patterns found leftmost first, the longest at a position (the reference's
/// leftmost-longest Aho-Corasick), without overlaps.
#[derive(Debug, Default)]
struct Matcher {
    patterns: HashMap<String, u32>,
    /// Distinct pattern lengths in bytes, longest first.
    lengths: Vec<usize>,
    /// Whether some pattern begins with this byte.
    first_bytes: Vec<bool>,
}

impl Matcher {
    fn new(patterns: HashMap<String, u32>) -> Matcher {
        let mut lengths: Vec<usize> = patterns.keys().map(String::len).collect();
        lengths.sort_unstable_by(|a, b| b.cmp(a));
        lengths.dedup();
        let mut first_bytes = vec![false; 256];
        for pattern in patterns.keys() {
            if let Some(&b) = pattern.as_bytes().first() {
                first_bytes[b as usize] = true;
            }
        }
        Matcher {
            patterns,
            lengths,
            first_bytes,
        }
    }

    /// The next match at or after `from`: (start, end, id).
    fn next_match(&self, text: &str, from: usize) -> Option<(usize, usize, u32)> {
        if self.patterns.is_empty() {
            return None;
        }
        let bytes = text.as_bytes();
        for start in from..bytes.len() {
            if !self.first_bytes[bytes[start] as usize] || !text.is_char_boundary(start) {
                continue;
            }
            for &len in &self.lengths {
                let end = start + len;
                if end > text.len() || !text.is_char_boundary(end) {
                    continue;
                }
                if let Some(&id) = self.patterns.get(&text[start..end]) {
                    return Some((start, end, id));
                }
            }
        }
        None
    }
}

static WORD_AT_END: LazyLock<fancy_regex::Regex> =
    LazyLock::new(|| fancy_regex::Regex::new(r"\w$").expect("a valid regex"));
static WORD_AT_START: LazyLock<fancy_regex::Regex> =
    LazyLock::new(|| fancy_regex::Regex::new(r"^\w").expect("a valid regex"));

impl AddedVocabulary {
    fn parse(node: &Node, model: &Bpe, normalizer: Option<&Normalizer>) -> Result<AddedVocabulary> {
        let items = node.items()?;
        if items.len() > MAX_ADDED_TOKENS {
            return Err(node.error(format!(
                "{} added tokens; expected at most {MAX_ADDED_TOKENS}",
                items.len()
            )));
        }
        let mut added = AddedVocabulary::default();
        // A new token's id follows the model's ids (the reference counts the model's
        // entries, not its largest id).
        let mut next_id = u32::try_from(model.len()).unwrap_or(u32::MAX);
        for item in &items {
            item.get("id")?.u32()?;
            let token = AddedToken {
                content: item.get("content")?.str()?.to_string(),
                single_word: item.get("single_word")?.bool_or(false)?,
                lstrip: item.get("lstrip")?.bool_or(false)?,
                rstrip: item.get("rstrip")?.bool_or(false)?,
                normalized: item.get("normalized")?.bool_or(true)?,
                special: item.get("special")?.bool_or(false)?,
            };
            if token.content.is_empty() {
                continue;
            }
            // The same token again changes nothing.
            if let Some(id) = added.ids.get(&token.content)
                && added.tokens.get(id) == Some(&token)
            {
                continue;
            }
            let known = added
                .ids
                .get(&token.content)
                .copied()
                .or_else(|| model.token_id(&token.content));
            let id = match known {
                Some(id) => id,
                None => {
                    let id = next_id;
                    next_id = next_id
                        .checked_add(1)
                        .ok_or_else(|| item.error("too many added tokens: ids past 2^32"))?;
                    id
                }
            };
            added.ids.insert(token.content.clone(), id);
            added.tokens.insert(id, token);
        }
        let mut raw = HashMap::new();
        let mut normalized = HashMap::new();
        for (&id, token) in &added.tokens {
            if token.normalized {
                let mut pattern = Normalized::new(&token.content, 0);
                if let Some(normalizer) = normalizer {
                    normalizer.apply(&mut pattern)?;
                }
                if pattern.text.is_empty() || normalized.insert(pattern.text.clone(), id).is_some()
                {
                    return Err(node.error(format!(
                        "the added token {:?} normalizes to {:?}, empty or the same as \
                         another's; expected distinct non-empty tokens",
                        token.content, pattern.text
                    )));
                }
            } else {
                raw.insert(token.content.clone(), id);
            }
        }
        added.raw = Matcher::new(raw);
        added.normalized = Matcher::new(normalized);
        Ok(added)
    }

    /// `text` cut at the added tokens `matcher` finds: (the token's id, or None for text
    /// between them, byte range), the reference's `find_matches` with its `single_word`,
    /// `lstrip` and `rstrip` rules.
    fn find(&self, text: &str, matcher: &Matcher) -> Vec<(Option<u32>, (usize, usize))> {
        let mut splits = Vec::new();
        let mut start_offset = 0;
        let mut search_from = 0;
        while let Some((match_start, match_end, id)) = matcher.next_match(text, search_from) {
            search_from = match_end;
            let (mut start, mut stop) = (match_start, match_end);
            let Some(token) = self.tokens.get(&id) else {
                continue;
            };
            if token.single_word {
                let space_before =
                    start == 0 || !WORD_AT_END.is_match(&text[..start]).unwrap_or(false);
                let space_after =
                    stop == text.len() || !WORD_AT_START.is_match(&text[stop..]).unwrap_or(false);
                if !space_before || !space_after {
                    continue;
                }
            }
            if token.lstrip {
                let trimmed = text[..start].trim_end_matches(char::is_whitespace).len();
                start = trimmed.max(start_offset);
            }
            if token.rstrip {
                stop +=
                    text[stop..].len() - text[stop..].trim_start_matches(char::is_whitespace).len();
            }
            if start_offset < start {
                splits.push((None, (start_offset, start)));
            }
            splits.push((Some(id), (start, stop)));
            start_offset = stop;
        }
        if start_offset != text.len() {
            splits.push((None, (start_offset, text.len())));
        }
        splits
    }
}

/// A post-processor: what it does to the list of id chunks (one per text at first).
#[derive(Debug)]
enum PostProcessor {
    /// Offsets only: ids unchanged.
    ByteLevel,
    Template {
        single: Vec<TemplatePiece>,
        pair: Vec<TemplatePiece>,
        special_tokens: HashMap<String, Vec<u32>>,
    },
    Sequence(Vec<PostProcessor>),
}

#[derive(Debug)]
enum TemplatePiece {
    /// The first (false) or second (true) text.
    Sequence(bool),
    SpecialToken(String),
}

const SUPPORTED_POST_PROCESSORS: &str = "TemplateProcessing, ByteLevel, Sequence";

impl PostProcessor {
    fn parse(node: &Node) -> Result<PostProcessor> {
        let name = node.type_name()?;
        Ok(match name {
            "ByteLevel" => PostProcessor::ByteLevel,
            "Sequence" => PostProcessor::Sequence(
                node.get("processors")?
                    .items()?
                    .iter()
                    .map(PostProcessor::parse)
                    .collect::<Result<_>>()?,
            ),
            "TemplateProcessing" => {
                let tokens_node = node.get("special_tokens")?;
                let mut special_tokens = HashMap::new();
                for (name, token) in tokens_node.object()? {
                    let token = tokens_node.at(0, token);
                    let ids = token.get("ids")?;
                    let ids = ids
                        .items()?
                        .iter()
                        .map(Node::u32)
                        .collect::<Result<Vec<_>>>()?;
                    special_tokens.insert(name.clone(), ids);
                }
                let template = |key: &str| -> Result<Vec<TemplatePiece>> {
                    let list = node.get(key)?;
                    let mut pieces = Vec::new();
                    for item in list.items()? {
                        pieces.push(parse_template_piece(&item, &special_tokens)?);
                    }
                    Ok(pieces)
                };
                let single = template("single")?;
                if single
                    .iter()
                    .any(|p| matches!(p, TemplatePiece::Sequence(true)))
                {
                    return Err(node.get("single")?.error("uses $B; expected only $A"));
                }
                PostProcessor::Template {
                    single,
                    pair: template("pair")?,
                    special_tokens,
                }
            }
            other => {
                return Err(node.unsupported("post_processor", other, SUPPORTED_POST_PROCESSORS));
            }
        })
    }

    fn added_single(&self) -> usize {
        match self {
            PostProcessor::ByteLevel => 0,
            PostProcessor::Sequence(steps) => steps.iter().map(PostProcessor::added_single).sum(),
            PostProcessor::Template {
                single,
                special_tokens,
                ..
            } => single
                .iter()
                .map(|piece| match piece {
                    TemplatePiece::Sequence(_) => 0,
                    TemplatePiece::SpecialToken(name) => {
                        special_tokens.get(name).map_or(0, Vec::len)
                    }
                })
                .sum(),
        }
    }

    /// See `TokenizerJson::single_affixes`.
    fn single_affixes(&self) -> std::result::Result<(Vec<u32>, Vec<u32>), String> {
        match self {
            PostProcessor::ByteLevel => Ok((Vec::new(), Vec::new())),
            PostProcessor::Sequence(steps) => {
                // A second template would see the first one's pieces as several texts.
                let mut templates = steps
                    .iter()
                    .filter(|step| !matches!(step, PostProcessor::ByteLevel));
                match (templates.next(), templates.next()) {
                    (None, _) => Ok((Vec::new(), Vec::new())),
                    (Some(only), None) => only.single_affixes(),
                    (Some(_), Some(_)) => Err("a Sequence of more than one template; expected \
                                               at most one TemplateProcessing"
                        .to_string()),
                }
            }
            PostProcessor::Template {
                single,
                special_tokens,
                ..
            } => {
                let texts = single
                    .iter()
                    .filter(|piece| matches!(piece, TemplatePiece::Sequence(_)))
                    .count();
                if texts != 1 {
                    return Err(format!(
                        "the single template holds $A {texts} times; expected once"
                    ));
                }
                let (mut before, mut after) = (Vec::new(), Vec::new());
                let mut seen_text = false;
                for piece in single {
                    match piece {
                        TemplatePiece::Sequence(_) => seen_text = true,
                        TemplatePiece::SpecialToken(name) => {
                            let ids = special_tokens.get(name).map_or(&[][..], Vec::as_slice);
                            match seen_text {
                                false => before.extend_from_slice(ids),
                                true => after.extend_from_slice(ids),
                            }
                        }
                    }
                }
                Ok((before, after))
            }
        }
    }

    fn process(
        &self,
        chunks: Vec<Vec<u32>>,
        add_special_tokens: bool,
    ) -> std::result::Result<Vec<Vec<u32>>, String> {
        match self {
            PostProcessor::ByteLevel => Ok(chunks),
            PostProcessor::Sequence(steps) => {
                let mut chunks = chunks;
                for step in steps {
                    chunks = step.process(chunks, add_special_tokens)?;
                }
                Ok(chunks)
            }
            PostProcessor::Template {
                single,
                pair,
                special_tokens,
            } => {
                // A template after another sees one chunk per piece of the first.
                let template = match chunks.len() {
                    1 => single,
                    2 => pair,
                    n => return Err(format!("a TemplateProcessing given {n} sequences")),
                };
                let mut out = Vec::with_capacity(template.len());
                for piece in template {
                    match piece {
                        TemplatePiece::Sequence(second) => {
                            let chunk = chunks
                                .get(usize::from(*second))
                                .ok_or("the template's $B has no second sequence")?;
                            out.push(chunk.clone());
                        }
                        TemplatePiece::SpecialToken(name) => {
                            if add_special_tokens {
                                // Checked when the file was read.
                                out.push(special_tokens.get(name).cloned().unwrap_or_default());
                            }
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

fn parse_template_piece(
    node: &Node,
    special_tokens: &HashMap<String, Vec<u32>>,
) -> Result<TemplatePiece> {
    let object = node.object()?;
    if object.len() == 1 {
        if object.contains_key("Sequence") {
            let id = node.get("Sequence")?.get("id")?;
            return match id.str()? {
                "A" => Ok(TemplatePiece::Sequence(false)),
                "B" => Ok(TemplatePiece::Sequence(true)),
                _ => Err(id.error("expected \"A\" or \"B\"")),
            };
        }
        if object.contains_key("SpecialToken") {
            let id = node.get("SpecialToken")?.get("id")?;
            let name = id.str()?;
            if !special_tokens.contains_key(name) {
                return Err(id.error(format!(
                    "the special token {name:?} is not in the processor's special_tokens"
                )));
            }
            return Ok(TemplatePiece::SpecialToken(name.to_string()));
        }
    }
    Err(node.error("expected {\"Sequence\": {...}} or {\"SpecialToken\": {...}}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strategy {
    LongestFirst,
    OnlyFirst,
    OnlySecond,
}

/// The file's `truncation` (or `--max-length`): its stride only shapes the overflowing
/// pieces, which `ids` does not show.
#[derive(Debug, Clone, Copy)]
struct Truncation {
    max_length: usize,
    strategy: Strategy,
    keep_end: bool,
}

impl Default for Truncation {
    fn default() -> Truncation {
        Truncation {
            max_length: 512,
            strategy: Strategy::LongestFirst,
            keep_end: false,
        }
    }
}

impl Truncation {
    fn parse(node: &Node) -> Result<Truncation> {
        let strategy = node.get("strategy")?;
        let direction = node.get("direction")?;
        Ok(Truncation {
            max_length: node.get("max_length")?.usize()?,
            strategy: match strategy.str()? {
                "LongestFirst" => Strategy::LongestFirst,
                "OnlyFirst" => Strategy::OnlyFirst,
                "OnlySecond" => Strategy::OnlySecond,
                _ => return Err(strategy.error("expected LongestFirst, OnlyFirst or OnlySecond")),
            },
            keep_end: match direction.opt_str()? {
                None | Some("Right") => false,
                Some("Left") => true,
                Some(_) => return Err(direction.error("expected \"Right\" or \"Left\"")),
            },
        })
    }

    /// Cuts a single text's ids to `budget`.
    fn apply(&self, ids: &mut Vec<u32>, budget: usize, path: &Path) -> Result<()> {
        if budget > 0 && ids.len() <= budget {
            return Ok(());
        }
        if budget > 0 && self.strategy == Strategy::OnlySecond {
            return Err(Error::user(format!(
                "{}: truncation: strategy OnlySecond needs a second text",
                path.display()
            )));
        }
        if self.keep_end {
            ids.drain(..ids.len().saturating_sub(budget));
        } else {
            ids.truncate(budget);
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Padding {
    /// None: to the longest of the batch (here the text itself).
    fixed: Option<usize>,
    multiple_of: Option<usize>,
    pad_id: u32,
    left: bool,
}

impl Padding {
    fn parse(node: &Node) -> Result<Padding> {
        let strategy = node.get("strategy")?;
        let fixed = match strategy.value {
            Value::String(s) if s == "BatchLongest" => None,
            Value::Object(_) => Some(strategy.get("Fixed")?.usize()?),
            _ => return Err(strategy.error("expected \"BatchLongest\" or {\"Fixed\": N}")),
        };
        let direction = node.get("direction")?;
        let multiple = node.get("pad_to_multiple_of")?;
        let multiple_of = if multiple.is_null() {
            None
        } else {
            Some(multiple.usize()?)
        };
        if fixed
            .max(multiple_of)
            .is_some_and(|n| n > MAX_PADDED_LENGTH)
        {
            return Err(node.error(format!(
                "pads to more than {MAX_PADDED_LENGTH} ids; expected a smaller length"
            )));
        }
        Ok(Padding {
            fixed,
            multiple_of,
            pad_id: node.get("pad_id")?.u32()?,
            left: match direction.str()? {
                "Right" => false,
                "Left" => true,
                _ => return Err(direction.error("expected \"Right\" or \"Left\"")),
            },
        })
    }

    fn apply(&self, ids: &mut Vec<u32>) {
        let mut length = self.fixed.unwrap_or(ids.len());
        if let Some(multiple) = self.multiple_of
            && multiple > 0
            && !length.is_multiple_of(multiple)
        {
            length += multiple - length % multiple;
        }
        if ids.len() >= length {
            return;
        }
        let pad = std::iter::repeat_n(self.pad_id, length - ids.len());
        if self.left {
            ids.splice(0..0, pad);
        } else {
            ids.extend(pad);
        }
    }
}
