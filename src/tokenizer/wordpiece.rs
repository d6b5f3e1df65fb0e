//! The BERT uncased WordPiece tokenizer, matching Hugging Face `BertTokenizerFast`
//! (do_lower_case, tokenize_chinese_chars, clean_text; accents stripped) id for id.
//!
//! Pipeline, in the reference's order:
//!   1. special tokens ([PAD] [UNK] [CLS] [SEP] [MASK]) written verbatim in the raw text are
//!      split out first and map straight to their ids;
//!   2. each remaining segment is normalized: clean-up (drop NUL, U+FFFD, controls; any
//!      whitespace -> ' '), spaces around CJK ideographs, NFD, drop nonspacing marks,
//!      lowercase (char by char);
//!   3. pre-tokenized: split on whitespace, each punctuation char is a word of its own;
//!   4. each word becomes WordPiece ids: greedy longest match, "##" on continuations,
//!      [UNK] for a word with an unmatchable rest or more than 100 chars.
//!
//! The character classes come from src/tokenizer/unicode_tables.rs, probed from the
//! reference by scripts/gen_unicode_tables.py, because the reference mixes Unicode versions.

use super::Encoding;
use super::unicode_tables::{
    CLEAN_REMOVE, CLEAN_SPACE, COMBINING_CLASS, DECOMPOSE, LOWERCASE, NONSPACING_MARK,
    PRETOK_PUNCT, PRETOK_SPACE,
};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// The largest vocabulary file read, in bytes: BERT's 30,522 entries take 232 KB, a large
/// multilingual vocabulary a few MB; the bound keeps a wrong path (a device, a pipe, a data
/// file) from filling memory.
pub const MAX_VOCAB_BYTES: u64 = 64 << 20;
/// A word longer than this many chars (after normalization) is one [UNK].
const MAX_WORD_CHARS: usize = 100;
/// Marks a vocabulary entry as the continuation of a word.
const CONTINUATION_PREFIX: &str = "##";
/// Tokens the reference matches verbatim in the raw text (before normalization).
const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

#[derive(Debug)]
pub struct WordPiece {
    /// Every entry, as written in the file -> its line index.
    vocab: HashMap<String, u32>,
    /// Entries "##piece", keyed by "piece", so continuations need no string building.
    continuations: HashMap<String, u32>,
    /// Longest key of either map, in bytes: no match can be longer.
    max_piece_bytes: usize,
    /// Special tokens present in the vocabulary, with their ids.
    specials: Vec<(&'static str, u32)>,
    pad_id: u32,
    unk_id: u32,
    cls_id: u32,
    sep_id: u32,
    fingerprint: u64,
}

impl WordPiece {
    /// Reads a vocabulary with one token per line; the line index is the id.
    pub fn from_vocab_file(path: &Path) -> Result<WordPiece> {
        let io = |e| Error::io(path, e);
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .map_err(io)?
            .take(MAX_VOCAB_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > MAX_VOCAB_BYTES {
            return Err(Error::user(format!(
                "{}: larger than {} MiB, expected a vocabulary of one token per line",
                path.display(),
                MAX_VOCAB_BYTES >> 20
            )));
        }
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            let line = bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            Error::user(format!(
                "{}:{line}: not valid UTF-8; expected a UTF-8 text vocabulary, one token per line",
                path.display()
            ))
        })?;
        WordPiece::from_vocab_text(text, path)
    }

    fn from_vocab_text(text: &str, path: &Path) -> Result<WordPiece> {
        let mut vocab: HashMap<String, u32> = HashMap::new();
        let mut continuations = HashMap::new();
        let mut max_piece_bytes = 0;
        // FNV-1a over each token and a '\n' after it: the vocabulary's content, whatever
        // the file's line endings.
        let mut fingerprint: u64 = 0xcbf2_9ce4_8422_2325;
        for (index, line) in text.lines().enumerate() {
            let line_no = index + 1;
            let token = line;
            if token.is_empty() || token.chars().any(char::is_whitespace) {
                return Err(Error::user(format!(
                    "{}:{line_no}: bad vocabulary entry {token:?}; expected one token per line, \
                     non-empty and without whitespace",
                    path.display()
                )));
            }
            let id = u32::try_from(index)
                .map_err(|_| Error::user(format!("{}: too many tokens", path.display())))?;
            if let Some(first) = vocab.insert(token.to_string(), id) {
                return Err(Error::user(format!(
                    "{}:{line_no}: duplicate vocabulary entry {token:?} (first on line {}); \
                     expected each token once",
                    path.display(),
                    first + 1
                )));
            }
            if let Some(piece) = token.strip_prefix(CONTINUATION_PREFIX) {
                continuations.insert(piece.to_string(), id);
            }
            max_piece_bytes = max_piece_bytes.max(token.len());
            for &b in token.as_bytes().iter().chain(b"\n") {
                fingerprint = (fingerprint ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        let required = |name: &str| {
            vocab.get(name).copied().ok_or_else(|| {
                Error::user(format!(
                    "{}: vocabulary lacks the special token {name}; expected [PAD] [UNK] [CLS] [SEP]",
                    path.display()
                ))
            })
        };
        let (pad_id, unk_id, cls_id, sep_id) = (
            required("[PAD]")?,
            required("[UNK]")?,
            required("[CLS]")?,
            required("[SEP]")?,
        );
        let specials = SPECIAL_TOKENS
            .iter()
            .filter_map(|&name| vocab.get(name).map(|&id| (name, id)))
            .collect();
        Ok(WordPiece {
            vocab,
            continuations,
            max_piece_bytes,
            specials,
            pad_id,
            unk_id,
            cls_id,
            sep_id,
            fingerprint,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn cls_id(&self) -> u32 {
        self.cls_id
    }

    pub fn sep_id(&self) -> u32 {
        self.sep_id
    }

    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }

    /// FNV-1a hash of the vocabulary's tokens in order: changes whenever any id would.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// WordPiece ids of `text`, without [CLS]/[SEP] around it.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut normalized = String::new();
        let mut marks = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let (segment, special, after) = self.split_at_special(rest);
            normalized.clear();
            normalize_into(segment, &mut normalized, &mut marks);
            self.pre_tokenize_into(&normalized, &mut ids);
            if let Some(id) = special {
                ids.push(id);
            }
            rest = after;
        }
        ids
    }

    /// `[CLS] text [SEP]`, the text cut at its end so that the whole has at most
    /// `max_length` ids. As in the reference, a `max_length` below 2 cuts nothing.
    pub fn encode(&self, text: &str, max_length: usize) -> Encoding {
        let mut ids = self.tokenize(text);
        if let Some(budget) = max_length.checked_sub(2) {
            ids.truncate(budget);
        }
        let mut input_ids = Vec::with_capacity(ids.len() + 2);
        input_ids.push(self.cls_id);
        input_ids.extend_from_slice(&ids);
        input_ids.push(self.sep_id);
        let token_type_ids = vec![0; input_ids.len()];
        Encoding {
            input_ids,
            token_type_ids,
        }
    }

    /// `[CLS] a [SEP] b [SEP]`, cut "longest first" to at most `max_length` ids (the
    /// reference's rule: see `longest_first_lengths`). A `max_length` below 3 cuts nothing.
    pub fn encode_pair(&self, a: &str, b: &str, max_length: usize) -> Encoding {
        self.encode_tokenized_pair(&self.tokenize(a), &self.tokenize(b), max_length)
    }

    /// `encode_pair` of two texts already tokenized: a prompt shared by many completions
    /// is tokenized once.
    pub fn encode_tokenized_pair(&self, a: &[u32], b: &[u32], max_length: usize) -> Encoding {
        let (mut ids_a, mut ids_b) = (a, b);
        if let Some(budget) = max_length.checked_sub(3) {
            let (len_a, len_b) = longest_first_lengths(a.len(), b.len(), budget);
            ids_a = &a[..len_a.min(a.len())];
            ids_b = &b[..len_b.min(b.len())];
        }
        let mut input_ids = Vec::with_capacity(ids_a.len() + ids_b.len() + 3);
        input_ids.push(self.cls_id);
        input_ids.extend_from_slice(ids_a);
        input_ids.push(self.sep_id);
        let first_len = input_ids.len();
        input_ids.extend_from_slice(ids_b);
        input_ids.push(self.sep_id);
        let mut token_type_ids = vec![0; input_ids.len()];
        token_type_ids[first_len..].fill(1);
        Encoding {
            input_ids,
            token_type_ids,
        }
    }

    /// Splits `text` at its first special token: (text before it, its id, text after it).
    fn split_at_special<'t>(&self, text: &'t str) -> (&'t str, Option<u32>, &'t str) {
        let mut from = 0;
        while let Some(offset) = text[from..].find('[') {
            let start = from + offset;
            for &(name, id) in &self.specials {
                if text[start..].starts_with(name) {
                    return (&text[..start], Some(id), &text[start + name.len()..]);
                }
            }
            from = start + 1;
        }
        (text, None, "")
    }

    /// Splits normalized text into words (whitespace drops, punctuation isolates) and
    /// appends each word's WordPiece ids.
    fn pre_tokenize_into(&self, normalized: &str, ids: &mut Vec<u32>) {
        let mut word_start: Option<usize> = None;
        for (i, c) in normalized.char_indices() {
            let is_space = is_pretok_space(c);
            let is_punct = !is_space && is_pretok_punct(c);
            if is_space || is_punct {
                if let Some(start) = word_start.take() {
                    self.word_piece_into(&normalized[start..i], ids);
                }
                if is_punct {
                    self.word_piece_into(&normalized[i..i + c.len_utf8()], ids);
                }
            } else if word_start.is_none() {
                word_start = Some(i);
            }
        }
        if let Some(start) = word_start {
            self.word_piece_into(&normalized[start..], ids);
        }
    }

    /// Greedy longest-match WordPiece of one word; the whole word is [UNK] if any rest of it
    /// matches no piece.
    fn word_piece_into(&self, word: &str, ids: &mut Vec<u32>) {
        // Bytes bound chars from above, so only long words need counting.
        if word.len() > MAX_WORD_CHARS && word.chars().count() > MAX_WORD_CHARS {
            ids.push(self.unk_id);
            return;
        }
        let first_id = ids.len();
        let mut start = 0;
        while start < word.len() {
            let pieces = if start == 0 {
                &self.vocab
            } else {
                &self.continuations
            };
            let mut end = floor_char_boundary(word, (start + self.max_piece_bytes).min(word.len()));
            let mut found = None;
            while end > start {
                if let Some(&id) = pieces.get(&word[start..end]) {
                    found = Some(id);
                    break;
                }
                end = floor_char_boundary(word, end - 1);
            }
            match found {
                Some(id) => ids.push(id),
                None => {
                    ids.truncate(first_id);
                    ids.push(self.unk_id);
                    return;
                }
            }
            start = end;
        }
    }
}

/// Lengths (a, b) the two texts keep so that a + b fits `budget`, as the reference's
/// "longest_first" does it: the shorter text stays whole if the longer one can shrink to
/// fit beside it; otherwise the budget is halved, the odd id going to the longer text (to
/// the second text on a tie).
pub(crate) fn longest_first_lengths(len_a: usize, len_b: usize, budget: usize) -> (usize, usize) {
    if len_a + len_b <= budget {
        return (len_a, len_b);
    }
    let short = len_a.min(len_b);
    let mut keep_short = short;
    let mut keep_long = if short > budget {
        short
    } else {
        short.max(budget - short)
    };
    if keep_short + keep_long > budget {
        keep_short = budget / 2;
        keep_long = keep_short + budget % 2;
    }
    // The longer text may be given more than it has: truncation never lengthens.
    if len_a > len_b {
        (keep_long, keep_short)
    } else {
        (keep_short, keep_long)
    }
}

/// The largest char boundary of `s` at or below `index`.
fn floor_char_boundary(s: &str, mut index: usize) -> usize {
    while !s.is_char_boundary(index) {
        index -= 1;
    }
    index
}

/// Appends the normalized form of `text` to `out`. `marks` is scratch space for runs of
/// combining chars (ccc > 0), which NFD sorts by class before the marks are dropped.
fn normalize_into(text: &str, out: &mut String, marks: &mut Vec<(char, u8)>) {
    for c in text.chars() {
        if c.is_ascii() {
            // ASCII: no decomposition, class 0, not a mark; controls go, \t \n \r are spaces.
            flush_marks(marks, out);
            match c {
                '\t' | '\n' | '\r' => out.push(' '),
                '\0'..='\x1f' | '\x7f' => {}
                _ => out.push(c.to_ascii_lowercase()),
            }
            continue;
        }
        let code = c as u32;
        if in_ranges(CLEAN_REMOVE, code) {
            continue;
        }
        if in_ranges(CLEAN_SPACE, code) {
            push_nfd_char(' ', out, marks);
        } else if is_chinese_char(code) {
            push_nfd_char(' ', out, marks);
            push_decomposed(c, out, marks);
            push_nfd_char(' ', out, marks);
        } else {
            push_decomposed(c, out, marks);
        }
    }
    flush_marks(marks, out);
}

/// Feeds the full canonical decomposition of `c` to the NFD reordering.
fn push_decomposed(c: char, out: &mut String, marks: &mut Vec<(char, u8)>) {
    const S_BASE: u32 = 0xAC00;
    const L_BASE: u32 = 0x1100;
    const V_BASE: u32 = 0x1161;
    const T_BASE: u32 = 0x11A7;
    const V_COUNT: u32 = 21;
    const T_COUNT: u32 = 28;
    const S_COUNT: u32 = 19 * V_COUNT * T_COUNT;
    let code = c as u32;
    if (S_BASE..S_BASE + S_COUNT).contains(&code) {
        // Hangul syllables decompose algorithmically into leading, vowel and trailing jamo.
        let s = code - S_BASE;
        let jamo = [
            L_BASE + s / (V_COUNT * T_COUNT),
            V_BASE + (s % (V_COUNT * T_COUNT)) / T_COUNT,
            T_BASE + s % T_COUNT,
        ];
        let count = if s.is_multiple_of(T_COUNT) { 2 } else { 3 };
        for &j in &jamo[..count] {
            push_nfd_char(char::from_u32(j).unwrap_or(c), out, marks);
        }
        return;
    }
    match DECOMPOSE.binary_search_by_key(&code, |&(k, _)| k) {
        Ok(i) => DECOMPOSE[i]
            .1
            .chars()
            .for_each(|d| push_nfd_char(d, out, marks)),
        Err(_) => push_nfd_char(c, out, marks),
    }
}

/// One char of NFD output: a starter (class 0) ends the pending run of combining chars.
fn push_nfd_char(c: char, out: &mut String, marks: &mut Vec<(char, u8)>) {
    let class = combining_class(c as u32);
    if class == 0 {
        flush_marks(marks, out);
        push_kept_lowercase(c, out);
    } else {
        marks.push((c, class));
    }
}

/// Emits a run of combining chars in canonical order (stable by class).
fn flush_marks(marks: &mut Vec<(char, u8)>, out: &mut String) {
    if marks.is_empty() {
        return;
    }
    marks.sort_by_key(|&(_, class)| class);
    for &(c, _) in marks.iter() {
        push_kept_lowercase(c, out);
    }
    marks.clear();
}

/// Accent stripping then lowercasing of one NFD char.
fn push_kept_lowercase(c: char, out: &mut String) {
    let code = c as u32;
    if in_ranges(NONSPACING_MARK, code) {
        return;
    }
    match LOWERCASE.binary_search_by_key(&code, |&(k, _)| k) {
        Ok(i) => out.push_str(LOWERCASE[i].1),
        Err(_) => out.push(c),
    }
}

fn combining_class(code: u32) -> u8 {
    if code < 0x300 {
        return 0;
    }
    let i = COMBINING_CLASS.partition_point(|&(_, last, _)| last < code);
    match COMBINING_CLASS.get(i) {
        Some(&(first, _, class)) if first <= code => class,
        _ => 0,
    }
}

fn is_pretok_space(c: char) -> bool {
    if c.is_ascii() {
        matches!(c, '\t'..='\r' | ' ')
    } else {
        in_ranges(PRETOK_SPACE, c as u32)
    }
}

fn is_pretok_punct(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_punctuation()
    } else {
        in_ranges(PRETOK_PUNCT, c as u32)
    }
}

/// The CJK ideograph blocks the reference pads with spaces (not Hangul, kana or CJK
/// punctuation).
fn is_chinese_char(code: u32) -> bool {
    matches!(
        code,
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B920..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

/// Whether `code` lies in one of the sorted inclusive `ranges`.
fn in_ranges(ranges: &[(u32, u32)], code: u32) -> bool {
    let i = ranges.partition_point(|&(_, last)| last < code);
    ranges.get(i).is_some_and(|&(first, _)| first <= code)
}
