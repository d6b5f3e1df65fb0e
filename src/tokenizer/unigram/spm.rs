//! SentencePiece's model file (`spm.model`, a `ModelProto` protobuf) read by hand, and the
//! pieces of SentencePiece's own pipeline it configures: the precompiled character map (a
//! darts-clone double-array trie over UTF-8 bytes, shared with tokenizer.json's
//! `Precompiled` normalizer) and the normalizer (map, dummy prefix, whitespace rules).

use crate::error::{Error, Result};
use std::path::Path;

/// A piece's kind in the model file (`ModelProto.SentencePiece.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

#[derive(Debug)]
pub struct SpmPiece {
    pub text: String,
    pub score: f32,
    pub kind: PieceType,
}

/// What rcx needs of a `ModelProto`.
#[derive(Debug)]
pub struct ModelProto {
    pub pieces: Vec<SpmPiece>,
    pub byte_fallback: bool,
    pub charsmap: Option<CharsMap>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

/// The most pieces a model may have: DeBERTa-v3's 128,000 with room; bounds the vectors
/// sized from the file.
pub const MAX_PIECES: usize = 1 << 22;

/// One field of a protobuf message: its number and its value.
enum Value<'a> {
    Varint(u64),
    Fixed32(u32),
    Fixed64,
    Bytes(&'a [u8]),
}

/// The fields of one protobuf message, in order; every length checked against the bytes
/// left before it is used.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Fields { rest: bytes }
    }

    fn varint(&mut self) -> std::result::Result<u64, &'static str> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self
                .rest
                .split_first()
                .ok_or("a varint runs past the end")?;
            self.rest = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a varint longer than 10 bytes")
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], &'static str> {
        if n > self.rest.len() {
            return Err("a field runs past the end of its message");
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn next_field(&mut self) -> Option<std::result::Result<(u64, Value<'a>), &'static str>> {
        if self.rest.is_empty() {
            return None;
        }
        Some(self.read_field())
    }

    fn read_field(&mut self) -> std::result::Result<(u64, Value<'a>), &'static str> {
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| "a length too large")?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                let b = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            _ => return Err("an unsupported protobuf wire type"),
        };
        Ok((key >> 3, value))
    }
}

/// Reads `spm.model`: its pieces, the trainer settings the encoder uses and the normalizer.
pub fn read_model(bytes: &[u8], path: &Path) -> Result<ModelProto> {
    let bad = |what: &str| {
        Error::user(format!(
            "{}: not a SentencePiece model ({what}); expected the spm.model protobuf",
            path.display()
        ))
    };
    let mut model = ModelProto {
        pieces: Vec::new(),
        byte_fallback: false,
        charsmap: None,
        add_dummy_prefix: true,
        remove_extra_whitespaces: true,
        escape_whitespaces: true,
    };
    let mut model_type = 1;
    let mut fields = Fields::new(bytes);
    while let Some(field) = fields.next_field() {
        match field.map_err(bad)? {
            (1, Value::Bytes(piece)) => {
                if model.pieces.len() == MAX_PIECES {
                    return Err(bad("more than 4,194,304 pieces"));
                }
                model.pieces.push(read_piece(piece).map_err(bad)?);
            }
            (2, Value::Bytes(trainer)) => {
                let mut fields = Fields::new(trainer);
                while let Some(field) = fields.next_field() {
                    match field.map_err(bad)? {
                        (3, Value::Varint(v)) => model_type = v,
                        (24, Value::Varint(v)) if v != 0 => {
                            return Err(Error::user(format!(
                                "{}: trainer_spec.treat_whitespace_as_suffix is set; rcx \
                                 supports SentencePiece models with the whitespace as a prefix",
                                path.display()
                            )));
                        }
                        (35, Value::Varint(v)) => model.byte_fallback = v != 0,
                        _ => {}
                    }
                }
            }
            (3, Value::Bytes(normalizer)) => {
                let mut fields = Fields::new(normalizer);
                while let Some(field) = fields.next_field() {
                    match field.map_err(bad)? {
                        (2, Value::Bytes(map)) if !map.is_empty() => {
                            model.charsmap = Some(CharsMap::parse(map).map_err(|e| {
                                Error::user(format!(
                                    "{}: normalizer_spec.precompiled_charsmap: {e}",
                                    path.display()
                                ))
                            })?);
                        }
                        (3, Value::Varint(v)) => model.add_dummy_prefix = v != 0,
                        (4, Value::Varint(v)) => model.remove_extra_whitespaces = v != 0,
                        (5, Value::Varint(v)) => model.escape_whitespaces = v != 0,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if model_type != 1 {
        return Err(Error::user(format!(
            "{}: trainer_spec.model_type is {model_type}; expected 1 (unigram)",
            path.display()
        )));
    }
    if model.pieces.is_empty() {
        return Err(bad("no pieces"));
    }
    Ok(model)
}

fn read_piece(bytes: &[u8]) -> std::result::Result<SpmPiece, &'static str> {
    let mut piece = SpmPiece {
        text: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    let mut fields = Fields::new(bytes);
    while let Some(field) = fields.next_field() {
        match field? {
            (1, Value::Bytes(text)) => {
                piece.text = std::str::from_utf8(text)
                    .map_err(|_| "a piece that is not UTF-8")?
                    .to_string();
            }
            (2, Value::Fixed32(bits)) => piece.score = f32::from_bits(bits),
            (3, Value::Varint(kind)) => {
                piece.kind = match kind {
                    1 => PieceType::Normal,
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    5 => PieceType::Unused,
                    6 => PieceType::Byte,
                    _ => return Err("a piece of unknown type"),
                };
            }
            _ => {}
        }
    }
    if piece.text.is_empty() {
        return Err("an empty piece");
    }
    if !piece.score.is_finite() {
        return Err("a piece whose score is not finite");
    }
    Ok(piece)
}

/// The precompiled character map: a double-array trie (darts-clone's 32-bit units) from
/// UTF-8 sequences to offsets of NUL-terminated replacements.
#[derive(Debug)]
pub struct CharsMap {
    units: Vec<u32>,
    replacements: Vec<u8>,
}

/// SentencePiece keeps at most this many prefix matches per lookup (its stack array).
const MAX_TRIE_RESULTS: usize = 32;

impl CharsMap {
    /// The blob: the trie's size in bytes (u32, little-endian), the trie, the replacements.
    pub fn parse(blob: &[u8]) -> std::result::Result<CharsMap, &'static str> {
        let (size, rest) = blob
            .split_first_chunk::<4>()
            .ok_or("shorter than its 4-byte header")?;
        let trie_bytes = u32::from_le_bytes(*size) as usize;
        if trie_bytes > rest.len() || !trie_bytes.is_multiple_of(4) || trie_bytes == 0 {
            return Err("its trie size does not fit the map");
        }
        let (trie, replacements) = rest.split_at(trie_bytes);
        let units = trie
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(CharsMap {
            units,
            replacements: replacements.to_vec(),
        })
    }

    /// Calls `found(length, replacement)` for each prefix of `key` the map holds, shortest
    /// first (darts-clone's commonPrefixSearch); a unit outside the trie ends the search.
    fn prefixes(&self, key: &[u8], mut found: impl FnMut(usize, &[u8])) {
        let unit = |pos: usize| self.units.get(pos).copied();
        let offset = |u: u32| ((u >> 10) << ((u & (1 << 9)) >> 6)) as usize;
        let Some(root) = unit(0) else { return };
        let mut pos = offset(root);
        for (i, &byte) in key.iter().enumerate() {
            pos ^= usize::from(byte);
            let Some(u) = unit(pos) else { return };
            if u & ((1 << 31) | 0xff) != u32::from(byte) {
                return;
            }
            pos ^= offset(u);
            if (u >> 8) & 1 == 1 {
                let Some(leaf) = unit(pos) else { return };
                let start = (leaf & ((1 << 31) - 1)) as usize;
                let tail = self.replacements.get(start..).unwrap_or(&[]);
                let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
                found(i + 1, &tail[..end]);
            }
        }
    }

    /// SentencePiece's rule: the longest of the first 32 prefix matches. A match that
    /// ends inside a char (only a corrupt map holds one) is passed over.
    pub fn longest(&self, key: &str) -> Option<(usize, &[u8])> {
        let mut best: Option<(usize, (usize, usize))> = None;
        let mut count = 0;
        let base = self.replacements.as_ptr() as usize;
        self.prefixes(key.as_bytes(), |len, replacement| {
            count += 1;
            if count <= MAX_TRIE_RESULTS && key.is_char_boundary(len) {
                let start = replacement.as_ptr() as usize - base;
                best = Some((len, (start, start + replacement.len())));
            }
        });
        best.map(|(len, (start, end))| (len, &self.replacements[start..end]))
    }

    /// tokenizers' rule (`Precompiled::transform`): the replacement of the shortest match.
    pub fn shortest(&self, key: &[u8]) -> Option<&[u8]> {
        let mut first: Option<(usize, usize)> = None;
        let base = self.replacements.as_ptr() as usize;
        self.prefixes(key, |_, replacement| {
            if first.is_none() {
                let start = replacement.as_ptr() as usize - base;
                first = Some((start, start + replacement.len()));
            }
        });
        first.map(|(start, end)| &self.replacements[start..end])
    }
}

/// SentencePiece's normalizer settings (`NormalizerSpec`) with the model's user-defined
/// pieces, which pass through unnormalized.
pub struct Normalizer<'m> {
    pub charsmap: Option<&'m CharsMap>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
    /// Longest first.
    pub user_defined: &'m [String],
}

const SPACE_SYMBOL: &str = "\u{2581}";

impl Normalizer<'_> {
    /// One normalization step at the start of `input`: (replacement, bytes consumed).
    fn prefix<'a>(&'a self, input: &'a str) -> (&'a [u8], usize) {
        if let Some(piece) = self
            .user_defined
            .iter()
            .find(|p| input.starts_with(p.as_str()))
        {
            return (piece.as_bytes(), piece.len());
        }
        if let Some((len, replacement)) = self.charsmap.and_then(|m| m.longest(input)) {
            return (replacement, len);
        }
        let len = input.chars().next().map_or(0, char::len_utf8);
        (&input.as_bytes()[..len], len)
    }

    /// SentencePiece's `Normalizer::Normalize`, without the offsets.
    pub fn normalize(&self, mut input: &str) -> String {
        let mut out: Vec<u8> = Vec::with_capacity(input.len() + 3);
        if self.remove_extra_whitespaces {
            while !input.is_empty() {
                let (replacement, len) = self.prefix(input);
                if replacement != b" " {
                    break;
                }
                input = &input[len..];
            }
        }
        if input.is_empty() {
            return String::new();
        }
        let space: &[u8] = if self.escape_whitespaces {
            SPACE_SYMBOL.as_bytes()
        } else {
            b" "
        };
        if self.add_dummy_prefix {
            out.extend_from_slice(space);
        }
        let mut prev_space = self.remove_extra_whitespaces;
        while !input.is_empty() {
            let (mut replacement, len) = self.prefix(input);
            while prev_space && replacement.first() == Some(&b' ') {
                replacement = &replacement[1..];
            }
            if !replacement.is_empty() {
                for &b in replacement {
                    if b == b' ' {
                        out.extend_from_slice(space);
                    } else {
                        out.push(b);
                    }
                }
                prev_space = replacement.last() == Some(&b' ');
            }
            input = &input[len..];
            if !self.remove_extra_whitespaces {
                prev_space = false;
            }
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        }
        // Replacements are whole UTF-8 sequences from a map that was checked to be UTF-8
        // when it was used; a corrupt map's bytes become U+FFFD rather than a panic.
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map whose one key is the byte 0xC3 alone (the first byte of "é"), written as
    /// darts-clone units: root offset 0; unit 0xC3 has label 0xC3, a leaf, offset 1; the
    /// leaf at 0xC3 ^ 1 holds replacement offset 0.
    fn map_with_a_key_inside_a_char() -> CharsMap {
        let mut units = vec![0u32; 0xC4];
        units[0xC3] = 0xC3 | (1 << 8) | (1 << 10);
        units[0xC2] = 1 << 31;
        let mut blob = ((units.len() * 4) as u32).to_le_bytes().to_vec();
        units
            .iter()
            .for_each(|u| blob.extend_from_slice(&u.to_le_bytes()));
        blob.extend_from_slice(b"x\0");
        CharsMap::parse(&blob).unwrap()
    }

    #[test]
    fn a_corrupt_map_key_inside_a_char_is_passed_over() {
        let map = map_with_a_key_inside_a_char();
        assert_eq!(map.shortest("é".as_bytes()), Some(&b"x"[..]));
        assert_eq!(map.longest("é"), None);
        let normalizer = Normalizer {
            charsmap: Some(&map),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
            user_defined: &[],
        };
        assert_eq!(normalizer.normalize("é é"), "\u{2581}é\u{2581}é");
    }
}
