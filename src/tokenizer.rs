//! Tokenizers: text -> ids as each model family's reference tokenizer gives them.
//!
//! - `wordpiece`: BERT uncased WordPiece (a vocab.txt), as `BertTokenizerFast`;
//! - `unigram`: SentencePiece Unigram (DeBERTa-v3's spm.model or its tokenizer.json);
//! - `json`: Hugging Face tokenizer.json with a BPE model (Llama, Mistral, Qwen2, GPT-2).
//!
//! `Tokenizer` is the one a reward model reads its sequences with: a prompt and a completion
//! become one sequence by the model family's template (`[CLS] prompt [SEP] completion [SEP]`
//! for the encoders; for the decoders `encode(prompt)` with the file's post-processor, the
//! completion and EOS: see `decoder`).

mod bpe;
mod composition_table;
/// A decoder's (prompt, completion) sequence over a tokenizer.json BPE.
pub mod decoder;
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
use decoder::DecoderTokenizer;
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

/// A reward model's tokenizer: the ids of prompts and completions, and of the pair they
/// make.
#[derive(Debug)]
pub enum Tokenizer {
    WordPiece(WordPiece),
    /// With its padding token's id.
    Unigram(unigram::Unigram, u32),
    /// A decoder's tokenizer.json BPE, with the model's EOS and padding ids (boxed: the
    /// file's parts are several times the other variants' size).
    Decoder(Box<DecoderTokenizer>),
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

    /// A decoder's tokenizer.json (BPE): sequences end with `eos_id`, batches are padded
    /// with `pad_id` (both from the model's config.json, and both must be in the vocabulary).
    pub fn from_decoder_file(path: &Path, eos_id: u32, pad_id: u32) -> Result<Tokenizer> {
        let tokenizer = DecoderTokenizer::from_file(path, eos_id, pad_id)?;
        Ok(Tokenizer::Decoder(Box::new(tokenizer)))
    }

    /// Ids the model's embeddings must hold.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::WordPiece(t) => t.vocab_size(),
            Tokenizer::Unigram(t, _) => t.vocab_size(),
            Tokenizer::Decoder(t) => t.vocab_size(),
        }
    }

    pub fn pad_id(&self) -> u32 {
        match self {
            Tokenizer::WordPiece(t) => t.pad_id(),
            Tokenizer::Unigram(_, pad_id) => *pad_id,
            Tokenizer::Decoder(t) => t.pad_id(),
        }
    }

    /// Changes whenever any text's ids would: token caches are keyed by it.
    pub fn fingerprint(&self) -> u64 {
        match self {
            Tokenizer::WordPiece(t) => t.fingerprint(),
            Tokenizer::Unigram(t, _) => t.fingerprint(),
            Tokenizer::Decoder(t) => t.fingerprint(),
        }
    }

    /// The shortest `max_length` a (prompt, completion) sequence fits in: its special
    /// tokens. Shorter lengths are a user error, refused before encoding.
    pub fn least_pair_length(&self) -> usize {
        match self {
            Tokenizer::WordPiece(_) | Tokenizer::Unigram(..) => 3,
            Tokenizer::Decoder(t) => t.special_tokens_count(),
        }
    }

    /// Ids of `text` without special tokens. A decoder's tokenizer.json can fail on a text
    /// (an unknown token outside its vocabulary, a regex giving up): the error names the
    /// file.
    pub fn try_tokenize(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Decoder(t) => t.tokenize(text),
            _ => Ok(self.tokenize(text)),
        }
    }

    /// Ids of `text` without special tokens. Where `try_tokenize` fails (decoders only) this
    /// warns on stderr and gives no ids: callers that can report errors use `try_tokenize`.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        match self {
            Tokenizer::WordPiece(t) => t.tokenize(text),
            Tokenizer::Unigram(t, _) => t.tokenize(text),
            Tokenizer::Decoder(t) => t.tokenize(text).unwrap_or_else(|e| {
                eprintln!("rcx: warning: a text left without ids: {e}");
                Vec::new()
            }),
        }
    }

    /// One text with the template's special tokens, cut to at most `max_length` ids. A
    /// decoder reads it as a completion without prompt: the post-processor's tokens, the
    /// text cut from its end, EOS.
    pub fn encode(&self, text: &str, max_length: usize) -> Encoding {
        match self {
            Tokenizer::WordPiece(t) => t.encode(text, max_length),
            Tokenizer::Unigram(t, _) => t.encode(text, max_length),
            Tokenizer::Decoder(t) => t.encode_tokenized_pair(&[], &self.tokenize(text), max_length),
        }
    }

    /// `encode`, or the error of a text a decoder's tokenizer.json cannot read
    /// (`try_tokenize`).
    pub fn try_encode(&self, text: &str, max_length: usize) -> Result<Encoding> {
        match self {
            Tokenizer::Decoder(t) => {
                Ok(t.encode_tokenized_pair(&[], &t.tokenize(text)?, max_length))
            }
            _ => Ok(self.encode(text, max_length)),
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
            Tokenizer::Decoder(t) => t.encode_tokenized_pair(a, b, max_length),
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
    /// --tokenizer: the file's own truncation, none when it has none; with --pair on a BPE
    /// --tokenizer: none, as the file's truncation and padding play no part in training).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// The text to encode.
    pub text: String,
    /// A second text, encoded as a pair with the first. --vocab, or a Unigram --tokenizer:
    /// `[CLS] TEXT [SEP] COMPLETION [SEP]`. A BPE --tokenizer (a decoder's): TEXT is the
    /// prompt, and the ids are those `rcx train`/`rcx score` feed the model: the file's
    /// `encode(TEXT)` (its post-processor's BOS included) + `encode(COMPLETION)` without
    /// special tokens + EOS; past --max-length the prompt loses its start and the completion
    /// its end (longest first), BOS and EOS kept.
    #[arg(long, value_name = "COMPLETION")]
    pub pair: Option<String>,
    /// With --pair on a BPE --tokenizer: the EOS id ending the sequence. Default: the first
    /// `eos_token_id` of the config.json beside FILE (what `rcx train` uses), else the
    /// file's special token <|end_of_text|>, </s> or <|endoftext|> (the first it has).
    #[arg(long, value_name = "ID")]
    pub eos: Option<u32>,
}

/// Special tokens that end a text in the families' tokenizer.json files, in the order
/// tried: Llama 3's, then Llama 2's and Mistral's, then GPT-2's and Qwen2's.
const EOS_TOKENS: [&str; 3] = ["<|end_of_text|>", "</s>", "<|endoftext|>"];

/// The EOS of `rcx tokenize --pair` on a BPE file without --eos: see `TokenizeArgs::eos`.
fn default_eos(path: &Path, tokenizer: &json::TokenizerJson) -> Result<u32> {
    let config_path = path.parent().unwrap_or(Path::new(".")).join("config.json");
    if config_path.is_file() {
        let obj = crate::hf_config::read_json_object(&config_path)?;
        let keys = crate::hf_config::ConfigKeys {
            path: &config_path,
            obj: &obj,
        };
        if let Some(&eos) = keys.ids("eos_token_id")?.first() {
            return Ok(eos);
        }
    }
    EOS_TOKENS
        .iter()
        .find_map(|token| tokenizer.special_token_id(token))
        .ok_or_else(|| {
            Error::user(format!(
                "--pair: {} has no config.json beside it with an eos_token_id, nor a special \
                 token {}; expected --eos ID",
                path.display(),
                EOS_TOKENS.join(", ")
            ))
        })
}

/// `rcx tokenize --tokenizer FILE --pair COMPLETION TEXT` on a BPE file (`tokenizer`,
/// parsed from `bytes`): the decoder's sequence of (TEXT, COMPLETION), printed as
/// `{"input_ids": [...]}`.
fn cmd_tokenize_decoder_pair(
    path: &Path,
    tokenizer: json::TokenizerJson,
    bytes: &[u8],
    args: &TokenizeArgs,
    completion: &str,
) -> Result<()> {
    let eos_id = match args.eos {
        Some(id) => id,
        None => default_eos(path, &tokenizer)?,
    };
    // Printed ids are not padded: the padding id only has to be a valid one.
    let tokenizer = DecoderTokenizer::from_json(tokenizer, bytes, path, eos_id, eos_id)?;
    let least = tokenizer.special_tokens_count();
    let max_length = args.max_length.unwrap_or(usize::MAX);
    if max_length < least {
        return Err(Error::user(format!(
            "--max-length {max_length}: expected at least {least}, the special tokens of \
             {}'s sequence (the post-processor's and EOS)",
            path.display()
        )));
    }
    let prompt = tokenizer.tokenize(&args.text)?;
    let completion = tokenizer.tokenize(completion)?;
    let encoding = tokenizer.encode_tokenized_pair(&prompt, &completion, max_length);
    println!("{{\"input_ids\": [{}]}}", json_list(&encoding.input_ids));
    Ok(())
}

/// `rcx tokenize --tokenizer FILE` on a BPE file: prints `{"input_ids": [...]}` on one line.
fn cmd_tokenize_json(
    path: &Path,
    tokenizer: &json::TokenizerJson,
    text: &str,
    max_length: Option<usize>,
) -> Result<()> {
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
fn cmd_tokenize_unigram(tokenizer: &unigram::Unigram, args: &TokenizeArgs) -> Result<()> {
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

/// --eos given where no decoder's sequence is made.
fn eos_misplaced() -> Error {
    Error::user(
        "--eos: expected only with --pair on a BPE --tokenizer (it ends a decoder's sequence)",
    )
}

/// `rcx tokenize --tokenizer FILE`: the file is read once, whatever its kind, so that it
/// may be a pipe (`<(...)`), and parsed once.
fn cmd_tokenize_file(path: &Path, args: &TokenizeArgs) -> Result<()> {
    let bytes = unigram::read_bounded(path)?;
    if unigram::is_unigram_bytes(&bytes) {
        if args.eos.is_some() {
            return Err(eos_misplaced());
        }
        return cmd_tokenize_unigram(&unigram::from_bytes(&bytes, path)?, args);
    }
    let tokenizer = json::TokenizerJson::from_slice(&bytes, path)?;
    match &args.pair {
        Some(completion) => cmd_tokenize_decoder_pair(path, tokenizer, &bytes, args, completion),
        None if args.eos.is_some() => Err(eos_misplaced()),
        None => cmd_tokenize_json(path, &tokenizer, &args.text, args.max_length),
    }
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
        (_, Some(path)) => return cmd_tokenize_file(path, &args),
        (Some(vocab), None) => vocab,
        (None, None) => return Err(Error::user("expected --vocab FILE or --tokenizer FILE")),
    };
    if args.eos.is_some() {
        return Err(eos_misplaced());
    }
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
