//! A decoder reward model's sequences, over a tokenizer.json BPE.
//!
//! The sequence of (prompt, completion) is
//!
//!   `encode(prompt)` with the file's own post-processor (so BOS where it adds one)
//!   + `encode(completion)` without special tokens + EOS.
//!
//! Past `max_length` the prompt's text ids and the completion's share what the special
//! tokens leave by the longest-first rule of the encoders' pairs (`longest_first_lengths`);
//! the prompt is then cut from its start (its end leads into the completion) and the
//! completion from its end. The post-processor's tokens (BOS) and the EOS are always kept:
//! the model was trained with BOS first, and the reward is read at the EOS. The file's own
//! truncation and padding play no part: the training config's `max_length` cuts, and
//! batches are padded with the model's padding id.

use super::json::TokenizerJson;
use super::{Encoding, longest_first_lengths};
use crate::checksum::fnv1a;
use crate::error::{Error, Result};
use std::io::Read;
use std::path::Path;

/// A tokenizer.json BPE with the EOS and padding ids of the model it feeds.
#[derive(Debug)]
pub struct DecoderTokenizer {
    json: TokenizerJson,
    /// The post-processor's ids before and after a single text (Llama 3: `[BOS]`, `[]`).
    before: Vec<u32>,
    after: Vec<u32>,
    eos_id: u32,
    pad_id: u32,
    fingerprint: u64,
}

impl DecoderTokenizer {
    /// Reads `path` (a tokenizer.json with a BPE model); `eos_id` ends every sequence and
    /// `pad_id` pads batches (both from the model's config), and both must be ids of the
    /// vocabulary.
    pub fn from_file(path: &Path, eos_id: u32, pad_id: u32) -> Result<DecoderTokenizer> {
        let io = |e| Error::io(path, e);
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .map_err(io)?
            .take(super::json::MAX_TOKENIZER_JSON_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        let json = TokenizerJson::from_slice(&bytes, path)?;
        DecoderTokenizer::from_json(json, &bytes, path, eos_id, pad_id)
    }

    /// `from_file` of a file already read and parsed: `json` parsed from `bytes` (which key
    /// the fingerprint), `path` naming it in errors.
    pub fn from_json(
        json: TokenizerJson,
        bytes: &[u8],
        path: &Path,
        eos_id: u32,
        pad_id: u32,
    ) -> Result<DecoderTokenizer> {
        let vocab_size = json.vocab_size();
        for (name, id) in [("eos", eos_id), ("padding", pad_id)] {
            if id as usize >= vocab_size {
                return Err(Error::user(format!(
                    "{}: the {name} id {id} is not in the vocabulary; expected an id below {}",
                    path.display(),
                    vocab_size
                )));
            }
        }
        let (before, after) = json.single_affixes()?;
        // The EOS is part of every sequence: a new EOS id must not reuse a cache.
        let mut keyed = bytes.to_vec();
        keyed.extend_from_slice(&eos_id.to_le_bytes());
        Ok(DecoderTokenizer {
            json,
            before,
            after,
            eos_id,
            pad_id,
            fingerprint: fnv1a(&keyed),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.json.vocab_size()
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// FNV-1a of the file's bytes followed by the EOS id (little-endian u32).
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The ids every sequence holds whatever `max_length`: the post-processor's and the EOS.
    pub fn special_tokens_count(&self) -> usize {
        self.before.len() + self.after.len() + 1
    }

    /// Ids of `text` without special tokens; an error names the file when the text needs
    /// what the file lacks (an unknown token outside its vocabulary).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        self.json.tokenize(text)
    }

    /// The sequence of a prompt and a completion already tokenized (`tokenize`), cut to
    /// `max_length` as the module says. A `max_length` below `special_tokens_count` cuts
    /// both texts away and keeps the special tokens: callers refuse such lengths first.
    pub fn encode_tokenized_pair(
        &self,
        prompt: &[u32],
        completion: &[u32],
        max_length: usize,
    ) -> Encoding {
        let budget = max_length.saturating_sub(self.special_tokens_count());
        let (keep_prompt, keep_completion) =
            longest_first_lengths(prompt.len(), completion.len(), budget);
        let keep_prompt = keep_prompt.min(prompt.len());
        let keep_completion = keep_completion.min(completion.len());
        let mut input_ids =
            Vec::with_capacity(self.special_tokens_count() + keep_prompt + keep_completion);
        input_ids.extend_from_slice(&self.before);
        input_ids.extend_from_slice(&prompt[prompt.len() - keep_prompt..]);
        input_ids.extend_from_slice(&self.after);
        input_ids.extend_from_slice(&completion[..keep_completion]);
        input_ids.push(self.eos_id);
        Encoding {
            token_type_ids: vec![0; input_ids.len()],
            input_ids,
        }
    }
}
