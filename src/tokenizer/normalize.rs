//! The normalizers of a tokenizer.json (Hugging Face `tokenizers`), over a text that keeps,
//! for each byte, where it came from in the input: one pre-tokenizer (Metaspace with
//! `prepend_scheme: first`) asks whether a piece begins at the very start of the input.

use super::composition_table::COMPOSE;
use super::json_node::Node;
use super::pattern::{Pattern, find_matches};
use super::unicode_tables::{COMBINING_CLASS, DECOMPOSE};
use crate::error::Result;

/// A piece of text under normalization and pre-tokenization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Normalized {
    pub(crate) text: String,
    /// For each byte of `text`, the offset in the input of the char it came from.
    origins: Vec<usize>,
    /// Where this piece began in the input when it was cut out (the reference's
    /// `offsets_original().0`).
    pub(crate) shift: usize,
}

impl Normalized {
    /// `text`, found at byte `at` of the input.
    pub(crate) fn new(text: &str, at: usize) -> Normalized {
        let mut origins = Vec::with_capacity(text.len());
        for (i, c) in text.char_indices() {
            origins.extend(std::iter::repeat_n(at + i, c.len_utf8()));
        }
        Normalized {
            text: text.to_string(),
            origins,
            shift: at,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// The bytes `start..end` (char boundaries) as a piece of their own.
    pub(crate) fn slice(&self, start: usize, end: usize) -> Normalized {
        Normalized {
            text: self.text[start..end].to_string(),
            origins: self.origins[start..end].to_vec(),
            shift: self.origins.get(start).copied().unwrap_or(self.shift),
        }
    }

    /// Rebuilds the text char by char: `f` gets each char with its origin and pushes what
    /// replaces it.
    fn rebuild(&mut self, mut f: impl FnMut(char, usize, &mut Builder)) {
        let mut out = Builder::with_capacity(self.text.len());
        for (i, c) in self.text.char_indices() {
            f(c, self.origins[i], &mut out);
        }
        self.text = out.text;
        self.origins = out.origins;
    }

    /// Puts `prefix` before a non-empty text; its chars come from the first char.
    pub(crate) fn prepend(&mut self, prefix: &str) {
        if let Some(&origin) = self.origins.first() {
            let mut origins = vec![origin; prefix.len()];
            origins.extend_from_slice(&self.origins);
            self.origins = origins;
            self.text.insert_str(0, prefix);
        }
    }

    /// Replaces every match of `pattern` by `content`; the reference gives the new chars
    /// the origin of the last byte of the match.
    pub(crate) fn replace(&mut self, pattern: &Pattern, content: &str) -> Result<()> {
        let matches = find_matches(pattern, &self.text)?;
        if !matches.iter().any(|&(_, is_match)| is_match) {
            return Ok(());
        }
        let mut out = Builder::with_capacity(self.text.len());
        for ((start, end), is_match) in matches {
            if is_match {
                let origin = match end.checked_sub(1) {
                    Some(last) => self.origins[last],
                    None => self.shift,
                };
                out.push_str(content, origin);
            } else {
                out.text.push_str(&self.text[start..end]);
                out.origins.extend_from_slice(&self.origins[start..end]);
            }
        }
        self.text = out.text;
        self.origins = out.origins;
        Ok(())
    }

    pub(crate) fn lowercase(&mut self) {
        // Char by char, as the reference: no final-sigma rule.
        self.rebuild(|c, origin, out| {
            for lower in c.to_lowercase() {
                out.push(lower, origin);
            }
        });
    }

    /// Drops leading and/or trailing whitespace.
    pub(crate) fn strip(&mut self, left: bool, right: bool) {
        let mut start = 0;
        let mut end = self.text.len();
        if left {
            start = self.text.len() - self.text.trim_start().len();
        }
        if right {
            end = start + self.text[start..].trim_end().len();
        }
        if start > 0 || end < self.text.len() {
            self.text = self.text[start..end].to_string();
            self.origins = self.origins[start..end].to_vec();
        }
    }

    /// Canonical decomposition (NFD), with the reference's character tables.
    pub(crate) fn nfd(&mut self) {
        let mut run: Vec<(char, u8, usize)> = Vec::new();
        self.rebuild(|c, origin, out| {
            decompose(c, &mut |d| {
                let class = combining_class(d);
                if class == 0 {
                    flush_run(&mut run, out);
                    out.push(d, origin);
                } else {
                    run.push((d, class, origin));
                }
            });
        });
        // The last run of marks, after the text's last starter.
        if !run.is_empty() {
            let mut out = Builder {
                text: std::mem::take(&mut self.text),
                origins: std::mem::take(&mut self.origins),
            };
            flush_run(&mut run, &mut out);
            self.text = out.text;
            self.origins = out.origins;
        }
    }

    /// Canonical composition (NFC): NFD, then each char joined to the last starter before
    /// it when nothing between blocks them (a starter, or a mark of a class as high).
    pub(crate) fn nfc(&mut self) {
        self.nfd();
        let mut chars: Vec<(char, usize)> = Vec::with_capacity(self.text.len());
        // The last starter's index in `chars`, and the class of the last char kept after it
        // (None: nothing since).
        let mut starter: Option<(usize, Option<u8>)> = None;
        for (i, c) in self.text.char_indices() {
            let class = combining_class(c);
            if let Some((at, last_class)) = &mut starter {
                let blocked = last_class.is_some_and(|last| last == 0 || last >= class);
                if !blocked && let Some(composite) = compose(chars[*at].0, c) {
                    chars[*at].0 = composite;
                    continue;
                }
                if class != 0 {
                    *last_class = Some(class);
                }
            }
            if class == 0 {
                starter = Some((chars.len(), None));
            }
            chars.push((c, self.origins[i]));
        }
        let mut out = Builder::with_capacity(self.text.len());
        for (c, origin) in chars {
            out.push(c, origin);
        }
        self.text = out.text;
        self.origins = out.origins;
    }

    /// Each byte becomes the char that GPT-2's byte-level alphabet gives it.
    pub(crate) fn byte_level(&mut self) {
        let alphabet = byte_level_alphabet();
        let mut out = Builder::with_capacity(self.text.len() * 2);
        for (i, &b) in self.text.as_bytes().iter().enumerate() {
            out.push(alphabet[b as usize], self.origins[i]);
        }
        self.text = out.text;
        self.origins = out.origins;
    }
}

struct Builder {
    text: String,
    origins: Vec<usize>,
}

impl Builder {
    fn with_capacity(bytes: usize) -> Builder {
        Builder {
            text: String::with_capacity(bytes),
            origins: Vec::with_capacity(bytes),
        }
    }

    fn push(&mut self, c: char, origin: usize) {
        self.text.push(c);
        self.origins
            .extend(std::iter::repeat_n(origin, c.len_utf8()));
    }

    fn push_str(&mut self, s: &str, origin: usize) {
        self.text.push_str(s);
        self.origins.extend(std::iter::repeat_n(origin, s.len()));
    }
}

/// GPT-2's map of the 256 bytes to printable chars: printable Latin-1 bytes map to
/// themselves, the others to U+0100 and up, in byte order.
pub(crate) fn byte_level_alphabet() -> [char; 256] {
    let mut alphabet = ['\0'; 256];
    let mut next = 0x100u32;
    for (b, slot) in alphabet.iter_mut().enumerate() {
        let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).unwrap_or('\0');
    }
    alphabet
}

/// Feeds the full canonical decomposition of `c` to `emit`.
fn decompose(c: char, emit: &mut impl FnMut(char)) {
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
            emit(char::from_u32(j).unwrap_or(c));
        }
        return;
    }
    match DECOMPOSE.binary_search_by_key(&code, |&(k, _)| k) {
        Ok(i) => DECOMPOSE[i].1.chars().for_each(emit),
        Err(_) => emit(c),
    }
}

/// The primary composite of `first` and `second`, if any.
fn compose(first: char, second: char) -> Option<char> {
    const L_BASE: u32 = 0x1100;
    const V_BASE: u32 = 0x1161;
    const T_BASE: u32 = 0x11A7;
    const S_BASE: u32 = 0xAC00;
    const L_COUNT: u32 = 19;
    const V_COUNT: u32 = 21;
    const T_COUNT: u32 = 28;
    let (a, b) = (first as u32, second as u32);
    // Hangul: leading + vowel jamo, then syllable + trailing jamo.
    if (L_BASE..L_BASE + L_COUNT).contains(&a) && (V_BASE..V_BASE + V_COUNT).contains(&b) {
        return char::from_u32(S_BASE + ((a - L_BASE) * V_COUNT + (b - V_BASE)) * T_COUNT);
    }
    if (S_BASE..S_BASE + L_COUNT * V_COUNT * T_COUNT).contains(&a)
        && (a - S_BASE).is_multiple_of(T_COUNT)
        && (T_BASE + 1..T_BASE + T_COUNT).contains(&b)
    {
        return char::from_u32(a + (b - T_BASE));
    }
    COMPOSE
        .binary_search_by_key(&(a, b), |&(x, y, _)| (x, y))
        .ok()
        .and_then(|i| char::from_u32(COMPOSE[i].2))
}

/// Emits a run of combining chars in canonical order (stable by class).
fn flush_run(run: &mut Vec<(char, u8, usize)>, out: &mut Builder) {
    run.sort_by_key(|&(_, class, _)| class);
    for &(c, _, origin) in run.iter() {
        out.push(c, origin);
    }
    run.clear();
}

fn combining_class(c: char) -> u8 {
    let code = c as u32;
    if code < 0x300 {
        return 0;
    }
    let i = COMBINING_CLASS.partition_point(|&(_, last, _)| last < code);
    match COMBINING_CLASS.get(i) {
        Some(&(first, _, class)) if first <= code => class,
        _ => 0,
    }
}

/// A normalizer of a tokenizer.json.
#[derive(Debug)]
pub(crate) enum Normalizer {
    Sequence(Vec<Normalizer>),
    Prepend(String),
    Replace { pattern: Pattern, content: String },
    Lowercase,
    Strip { left: bool, right: bool },
    Nfd,
    Nfc,
    ByteLevel,
}

const SUPPORTED: &str = "Sequence, Prepend, Replace, Lowercase, Strip, NFC, NFD, ByteLevel";

impl Normalizer {
    /// The normalizer described by `node` (a tokenizer.json's `normalizer`).
    pub(crate) fn parse(node: &Node) -> Result<Normalizer> {
        let name = node.type_name()?;
        Ok(match name {
            "Sequence" => {
                let items = node.get("normalizers")?;
                Normalizer::Sequence(
                    items
                        .items()?
                        .iter()
                        .map(Normalizer::parse)
                        .collect::<Result<_>>()?,
                )
            }
            "Prepend" => Normalizer::Prepend(node.get("prepend")?.str()?.to_string()),
            "Replace" => Normalizer::Replace {
                pattern: Pattern::parse(&node.get("pattern")?)?,
                content: node.get("content")?.str()?.to_string(),
            },
            "Lowercase" => Normalizer::Lowercase,
            "Strip" => Normalizer::Strip {
                left: node.get("strip_left")?.bool()?,
                right: node.get("strip_right")?.bool()?,
            },
            "NFD" => Normalizer::Nfd,
            "NFC" => Normalizer::Nfc,
            "ByteLevel" => Normalizer::ByteLevel,
            other => return Err(node.unsupported("normalizer", other, SUPPORTED)),
        })
    }

    pub(crate) fn apply(&self, text: &mut Normalized) -> Result<()> {
        match self {
            Normalizer::Sequence(steps) => {
                for step in steps {
                    step.apply(text)?;
                }
            }
            Normalizer::Prepend(prefix) => text.prepend(prefix),
            Normalizer::Replace { pattern, content } => text.replace(pattern, content)?,
            Normalizer::Lowercase => text.lowercase(),
            Normalizer::Strip { left, right } => text.strip(*left, *right),
            Normalizer::Nfd => text.nfd(),
            Normalizer::Nfc => text.nfc(),
            Normalizer::ByteLevel => text.byte_level(),
        }
        Ok(())
    }
}
