//! Tokenizers: text -> ids as each model family's reference tokenizer gives them.
//!
//! - `wordpiece`: BERT uncased WordPiece (a vocab.txt), as `BertTokenizerFast`;
//! - `unigram`: SentencePiece Unigram (DeBERTa-v3's spm.model or its tokenizer.json);
//! - `json`: Hugging Face tokenizer.json with a BPE model (Llama, Mistral, Qwen2, GPT-2).
//!
//! `Tokenizer` is the one a reward model reads its sequences with: a prompt and a completion
//! become one sequence by the model family's template (`[CLS] prompt [SEP] completion [SEP]`
//! for the encoders).

mod bpe;
mod composition_table;
pub mod json;
pub(crate) mod json_node;
pub(crate) mod normalize;
pub(crate) mod pattern;
pub(crate) mod pretokenize;
mod unicode_tables;
/// DeBERTa-v3's SentencePiece Unigram, from spm.model or tokenizer.json.
pub mod unigram;
pub mod wordpiece;

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

pub(crate) use wordpiece::longest_first_lengths;
pub use wordpiece::{MAX_VOCAB_BYTES, WordPiece};

/// The version of the text -> ids mapping: token caches record it, so bump it whenever any
/// text's ids change (a fix to normalization, pre-tokenization or WordPiece).
pub const TOKENIZER_VERSION: u32 = 1;

/// Ids of one sequence (or pair) with its special tokens, ready for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    pub input_ids: Vec<u32>,
    /// 0 for [CLS], the first text and its [SEP]; 1 for the second text and its [SEP].
    pub token_type_ids: Vec<u32>,
}

/// FNV-1a of `bytes`: a tokenizer's fingerprint from its file.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A reward model's tokenizer: the ids of prompts and completions, and of the pair they
/// make.
#[derive(Debug)]
pub enum Tokenizer {
    WordPiece(WordPiece),
    /// With its padding token's id.
    Unigram(unigram::Unigram, u32),
}

impl Tokenizer {
    /// A WordPiece vocabulary (vocab.txt): one token per line, the line index is the id.
    pub fn from_vocab_file(path: &Path) -> Result<Tokenizer> {
        WordPiece::from_vocab_file(path).map(Tokenizer::WordPiece)
    }

    /// A SentencePiece Unigram model (spm.model, or a tokenizer.json with a Unigram model).
    /// It must name a padding token ([PAD] or <pad>): batches are padded with it.
    pub fn from_unigram_file(path: &Path) -> Result<Tokenizer> {
        let model = unigram::load(path)?;
        let Some(pad_id) = model.pad_id() else {
            return Err(Error::user(format!(
                "{}: the tokenizer has no padding token ([PAD] or <pad>); a reward model pads \
                 its batches with it",
                path.display()
            )));
        };
        Ok(Tokenizer::Unigram(model, pad_id))
    }

    /// Ids the model's embeddings must hold.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::WordPiece(t) => t.vocab_size(),
            Tokenizer::Unigram(t, _) => t.vocab_size(),
        }
    }

    pub fn pad_id(&self) -> u32 {
        match self {
            Tokenizer::WordPiece(t) => t.pad_id(),
            Tokenizer::Unigram(_, pad_id) => *pad_id,
        }
    }

    /// Changes whenever any text's ids would: token caches are keyed by it.
    pub fn fingerprint(&self) -> u64 {
        match self {
            Tokenizer::WordPiece(t) => t.fingerprint(),
            Tokenizer::Unigram(t, _) => t.fingerprint(),
        }
    }

    /// Ids of `text` without special tokens.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        match self {
            Tokenizer::WordPiece(t) => t.tokenize(text),
            Tokenizer::Unigram(t, _) => t.tokenize(text),
        }
    }

    /// One text with the template's special tokens, cut to at most `max_length` ids.
    pub fn encode(&self, text: &str, max_length: usize) -> Encoding {
        match self {
            Tokenizer::WordPiece(t) => t.encode(text, max_length),
            Tokenizer::Unigram(t, _) => t.encode(text, max_length),
        }
    }

    /// A pair (prompt, completion) as one sequence, cut to at most `max_length` ids.
    pub fn encode_pair(&self, a: &str, b: &str, max_length: usize) -> Encoding {
        self.encode_tokenized_pair(&self.tokenize(a), &self.tokenize(b), max_length)
    }

    /// `encode_pair` of two texts already tokenized: a prompt shared by many completions is
    /// tokenized once.
    pub fn encode_tokenized_pair(&self, a: &[u32], b: &[u32], max_length: usize) -> Encoding {
        match self {
            Tokenizer::WordPiece(t) => t.encode_tokenized_pair(a, b, max_length),
            Tokenizer::Unigram(t, _) => t.encode_tokenized_pair(a, b, max_length),
        }
    }
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["vocab", "tokenizer"])))]
pub struct TokenizeArgs {
    /// WordPiece vocabulary: one token per line, the line index is the id.
    #[arg(long)]
    pub vocab: Option<PathBuf>,
    /// A Hugging Face tokenizer.json (BPE or Unigram) or a SentencePiece spm.model (Unigram):
    /// prints the ids of `Tokenizer.from_file(FILE).encode(TEXT).ids`.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// At most this many ids, special tokens included (default with --vocab: 512; with
    /// --tokenizer: the file's own truncation, none when it has none).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// The text to encode.
    pub text: String,
    /// A second text, encoded as a pair with the first (--vocab, or a Unigram --tokenizer:
    /// `[CLS] TEXT [SEP] PAIR [SEP]`).
    #[arg(long)]
    pub pair: Option<String>,
}

/// `rcx tokenize --tokenizer FILE`: prints `{"input_ids": [...]}` on one line.
fn cmd_tokenize_json(path: &Path, text: &str, max_length: Option<usize>) -> Result<()> {
    let tokenizer = json::TokenizerJson::from_file(path)?;
    let least = tokenizer.special_tokens_count();
    if let Some(max_length) = max_length.filter(|&n| n < least.max(1)) {
        return Err(Error::user(format!(
            "--max-length {max_length}: expected at least {}, the special tokens {} adds",
            least.max(1),
            path.display()
        )));
    }
    let ids = tokenizer.encode_as_reference(text, max_length)?;
    println!("{{\"input_ids\": [{}]}}", json_list(&ids));
    Ok(())
}

/// `rcx tokenize --tokenizer FILE` for a Unigram model (spm.model or tokenizer.json): ids
/// and token types of the text (or of the pair), cut to `--max-length` as the reference's
/// truncation cuts, none by default.
fn cmd_tokenize_unigram(path: &Path, args: &TokenizeArgs) -> Result<()> {
    let tokenizer = unigram::load(path)?;
    let max_length = args.max_length.unwrap_or(usize::MAX);
    let encoding = match &args.pair {
        Some(pair) => tokenizer.encode_pair(&args.text, pair, max_length),
        None => tokenizer.encode(&args.text, max_length),
    };
    println!(
        "{{\"input_ids\": [{}], \"token_type_ids\": [{}]}}",
        json_list(&encoding.input_ids),
        json_list(&encoding.token_type_ids)
    );
    Ok(())
}

/// Ids as Python's json.dumps writes a list, so that output compares byte for byte.
fn json_list(ids: &[u32]) -> String {
    ids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `rcx tokenize`: prints `{"input_ids": [...], "token_type_ids": [...]}` on one line.
pub fn cmd_tokenize(args: TokenizeArgs) -> Result<()> {
    let vocab = match (&args.vocab, &args.tokenizer) {
        (_, Some(path)) if unigram::is_unigram_file(path)? => {
            return cmd_tokenize_unigram(path, &args);
        }
        (_, Some(path)) => match &args.pair {
            Some(_) => {
                return Err(Error::user(format!(
                    "--pair: {} is a BPE tokenizer (a decoder's), whose pair convention rcx does \
                     not implement yet; give the text alone",
                    path.display()
                )));
            }
            None => return cmd_tokenize_json(path, &args.text, args.max_length),
        },
        (Some(vocab), None) => vocab,
        (None, None) => return Err(Error::user("expected --vocab FILE or --tokenizer FILE")),
    };
    let max_length = args.max_length.unwrap_or(512);
    // The library cuts nothing below these, as the reference does; a command asked for at
    // most N ids must not print more.
    let (least, holds) = match args.pair {
        Some(_) => (3, "[CLS] text [SEP] pair [SEP]"),
        None => (2, "[CLS] text [SEP]"),
    };
    if max_length < least {
        return Err(Error::user(format!(
            "--max-length {max_length}: expected at least {least}, the special tokens of {holds}"
        )));
    }
    let tokenizer = Tokenizer::from_vocab_file(vocab)?;
    let encoding = match &args.pair {
        Some(pair) => tokenizer.encode_pair(&args.text, pair, max_length),
        None => tokenizer.encode(&args.text, max_length),
    };
    println!(
        "{{\"input_ids\": [{}], \"token_type_ids\": [{}]}}",
        json_list(&encoding.input_ids),
        json_list(&encoding.token_type_ids)
    );
    Ok(())
}
