//! The BPE model of a tokenizer.json: a word's chars (or their bytes as `<0xNN>` tokens,
//! with byte fallback) merged pair by pair, the lowest-ranked pair first and the leftmost
//! among equals, as Hugging Face `tokenizers` does.

use super::json_node::Node;
use crate::error::{Error, Result};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// The most vocabulary entries and merges read: the largest released vocabularies hold
/// about 260,000 entries; the bound keeps a damaged file from asking for gigabytes.
pub(crate) const MAX_VOCAB_ENTRIES: usize = 1 << 21;
pub(crate) const MAX_MERGES: usize = 1 << 22;

#[derive(Debug)]
pub(crate) struct Bpe {
    vocab: HashMap<String, u32>,
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// The unknown token, and its id when the vocabulary has it (the reference fails only
    /// when a text needs it).
    unk: Option<(String, Option<u32>)>,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    fuse_unk: bool,
    /// The ids of `<0x00>`..`<0xFF>`, when byte fallback is on.
    byte_fallback: Option<[Option<u32>; 256]>,
    ignore_merges: bool,
}

impl Bpe {
    /// The model described by `node` (a tokenizer.json's `model`).
    pub(crate) fn parse(node: &Node) -> Result<Bpe> {
        let name = node.type_name()?;
        if name != "BPE" {
            return Err(node.unsupported(
                "model",
                name,
                "BPE here; WordPiece through --vocab vocab.txt",
            ));
        }
        let dropout = node.get("dropout")?;
        if !dropout.is_null() {
            let p = dropout
                .value
                .as_f64()
                .ok_or_else(|| dropout.error("expected null or a number from 0 to 1"))?;
            if !(0.0..=1.0).contains(&p) {
                return Err(dropout.error("expected null or a number from 0 to 1"));
            }
            if p > 0.0 {
                return Err(dropout.error(
                    "BPE dropout is not supported (it makes the ids random); expected null or 0",
                ));
            }
        }
        let vocab = parse_vocab(&node.get("vocab")?)?;
        let prefix = node.get("continuing_subword_prefix")?.opt_str()?;
        let merges = parse_merges(&node.get("merges")?, &vocab, prefix.map_or(0, str::len))?;
        let unk = node
            .get("unk_token")?
            .opt_str()?
            .map(|token| (token.to_string(), vocab.get(token).copied()));
        let byte_fallback = if node.get("byte_fallback")?.bool_or(false)? {
            let mut ids = [None; 256];
            for (b, id) in ids.iter_mut().enumerate() {
                *id = vocab.get(&format!("<0x{b:02X}>")).copied();
            }
            Some(ids)
        } else {
            None
        };
        Ok(Bpe {
            merges,
            unk,
            continuing_subword_prefix: prefix.map(str::to_string),
            end_of_word_suffix: node
                .get("end_of_word_suffix")?
                .opt_str()?
                .map(str::to_string),
            fuse_unk: node.get("fuse_unk")?.bool_or(false)?,
            byte_fallback,
            ignore_merges: node.get("ignore_merges")?.bool_or(false)?,
            vocab,
        })
    }

    /// The number of vocabulary entries (the reference's `get_vocab_size`).
    pub(crate) fn len(&self) -> usize {
        self.vocab.len()
    }

    pub(crate) fn token_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// Appends the ids of one word.
    pub(crate) fn tokenize_into(&self, word: &str, ids: &mut Vec<u32>) -> Result<()> {
        if word.is_empty() {
            return Ok(());
        }
        if self.ignore_merges
            && let Some(&id) = self.vocab.get(word)
        {
            ids.push(id);
            return Ok(());
        }
        let mut symbols = self.initial_symbols(word)?;
        self.merge_all(&mut symbols);
        ids.extend(symbols.iter().filter(|s| s.len > 0).map(|s| s.id));
        Ok(())
    }

    /// One symbol per char (its `<0xNN>` bytes with byte fallback, the unknown token
    /// otherwise, runs of it fused with `fuse_unk`; chars without either are dropped).
    fn initial_symbols(&self, word: &str) -> Result<Vec<Symbol>> {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(word.len());
        let mut pending_unk: Option<(u32, usize)> = None;
        let mut piece = String::new();
        let mut chars = word.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            let is_last = chars.peek().is_none();
            let byte_len = c.len_utf8();
            piece.clear();
            if i > 0
                && let Some(prefix) = &self.continuing_subword_prefix
            {
                piece.push_str(prefix);
            }
            piece.push(c);
            if is_last && let Some(suffix) = &self.end_of_word_suffix {
                piece.push_str(suffix);
            }
            if let Some(&id) = self.vocab.get(&piece) {
                if let Some((unk_id, unk_len)) = pending_unk.take() {
                    push_symbol(&mut symbols, unk_id, unk_len);
                }
                push_symbol(&mut symbols, id, byte_len);
                continue;
            }
            if let Some(byte_ids) = &self.byte_fallback {
                // The reference looks up the bytes of the piece, prefix and suffix included.
                let found: Option<Vec<u32>> = piece.bytes().map(|b| byte_ids[b as usize]).collect();
                if let Some(found) = found {
                    for id in found {
                        push_symbol(&mut symbols, id, 1);
                    }
                    continue;
                }
            }
            let Some((unk_token, unk_id)) = &self.unk else {
                continue;
            };
            let unk_id = unk_id.ok_or_else(|| {
                Error::user(format!(
                    "the tokenizer's unk_token {unk_token:?} is not in its vocabulary, and the \
                     text has a char ({c:?}) that needs it"
                ))
            })?;
            pending_unk = match pending_unk {
                Some((id, len)) if self.fuse_unk => Some((id, len + byte_len)),
                Some((id, len)) => {
                    push_symbol(&mut symbols, id, len);
                    Some((unk_id, byte_len))
                }
                None => Some((unk_id, byte_len)),
            };
        }
        if let Some((unk_id, unk_len)) = pending_unk {
            push_symbol(&mut symbols, unk_id, unk_len);
        }
        Ok(symbols)
    }

    /// Applies the merges: the pair of lowest rank first, the leftmost among equal ranks;
    /// a merged symbol keeps the left one's slot and the right one's length drops to 0.
    fn merge_all(&self, symbols: &mut [Symbol]) {
        let mut queue: BinaryHeap<Reverse<(u32, usize, u32)>> = BinaryHeap::new();
        for (pos, pair) in symbols.windows(2).enumerate() {
            if let Some(&(rank, new_id)) = self.merges.get(&(pair[0].id, pair[1].id)) {
                queue.push(Reverse((rank, pos, new_id)));
            }
        }
        while let Some(Reverse((_, pos, new_id))) = queue.pop() {
            let left = symbols[pos];
            if left.len == 0 {
                continue;
            }
            let Some(right_pos) = left.next else { continue };
            let right = symbols[right_pos];
            // A stale entry: the pair at `pos` changed since it was queued.
            match self.merges.get(&(left.id, right.id)) {
                Some(&(_, id)) if id == new_id => {}
                _ => continue,
            }
            symbols[pos].id = new_id;
            symbols[pos].len += right.len;
            symbols[pos].next = right.next;
            symbols[right_pos].len = 0;
            if let Some(after) = right.next {
                symbols[after].prev = Some(pos);
            }
            let merged = symbols[pos];
            if let Some(before) = merged.prev
                && let Some(&(rank, id)) = self.merges.get(&(symbols[before].id, merged.id))
            {
                queue.push(Reverse((rank, before, id)));
            }
            if let Some(after) = merged.next
                && let Some(&(rank, id)) = self.merges.get(&(merged.id, symbols[after].id))
            {
                queue.push(Reverse((rank, pos, id)));
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Symbol {
    id: u32,
    prev: Option<usize>,
    next: Option<usize>,
    /// Bytes of the word it covers; 0 once merged into its left neighbour.
    len: usize,
}

fn push_symbol(symbols: &mut Vec<Symbol>, id: u32, len: usize) {
    let index = symbols.len();
    if let Some(last) = symbols.last_mut() {
        last.next = Some(index);
    }
    symbols.push(Symbol {
        id,
        prev: index.checked_sub(1),
        next: None,
        len,
    });
}

fn parse_vocab(node: &Node) -> Result<HashMap<String, u32>> {
    let entries = node.object()?;
    if entries.len() > MAX_VOCAB_ENTRIES {
        return Err(node.error(format!(
            "{} entries; expected at most {MAX_VOCAB_ENTRIES}",
            entries.len()
        )));
    }
    let mut vocab = HashMap::with_capacity(entries.len());
    for (token, id) in entries {
        let id = id
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| {
                node.error(format!(
                    "entry {token:?}: expected an id from 0 to {}",
                    u32::MAX
                ))
            })?;
        vocab.insert(token.clone(), id);
    }
    Ok(vocab)
}

fn parse_merges(
    node: &Node,
    vocab: &HashMap<String, u32>,
    prefix_len: usize,
) -> Result<HashMap<(u32, u32), (u32, u32)>> {
    let items = node
        .value
        .as_array()
        .ok_or_else(|| node.error("expected an array of merges"))?;
    if items.len() > MAX_MERGES {
        return Err(node.error(format!(
            "{} merges; expected at most {MAX_MERGES}",
            items.len()
        )));
    }
    let mut merges = HashMap::with_capacity(items.len());
    let mut rank = 0u32;
    for (i, item) in items.iter().enumerate() {
        let at = node.at(i, item);
        let (left, right) = match item {
            serde_json::Value::String(line) => {
                // The legacy "a b" form; merges.txt's "#version" line is no merge.
                if line.starts_with("#version") {
                    continue;
                }
                let mut parts = line.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => (a, b),
                    _ => return Err(at.error("expected \"LEFT RIGHT\" (two tokens, one space)")),
                }
            }
            serde_json::Value::Array(pair) => match pair.as_slice() {
                [serde_json::Value::String(a), serde_json::Value::String(b)] => {
                    (a.as_str(), b.as_str())
                }
                _ => return Err(at.error("expected [LEFT, RIGHT], two strings")),
            },
            _ => return Err(at.error("expected \"LEFT RIGHT\" or [LEFT, RIGHT]")),
        };
        let id = |token: &str| {
            vocab.get(token).copied().ok_or_else(|| {
                at.error(format!("the merge's token {token:?} is not in model.vocab"))
            })
        };
        let right_rest = right.get(prefix_len..).ok_or_else(|| {
            at.error(format!(
                "the token {right:?} is shorter than model.continuing_subword_prefix"
            ))
        })?;
        let merged = format!("{left}{right_rest}");
        // A pair listed twice keeps its later rank, as in the reference.
        merges.insert((id(left)?, id(right)?), (rank, id(&merged)?));
        rank += 1;
    }
    Ok(merges)
}
