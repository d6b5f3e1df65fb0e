//! Scoring ranked prompts with a model: the prompts of a run's data sets as one indexed
//! list, their logits in evaluation mode, and the rewards that `eval` summarises. Below
//! both `train` (periodic evaluation) and `eval` (`rcx score`, `rcx eval`).

use crate::backend::Batch;
use crate::data::TokenizedSet;
use crate::error::{Error, Result};
use crate::loss::{PromptType, sigmoid};
use crate::tokenizer::Tokenizer;
use std::path::PathBuf;

/// The scores of one prompt's completions, best first as in the data.
#[derive(Clone, Debug)]
pub struct PromptScores {
    pub prompt_type: Option<PromptType>,
    pub rewards: Vec<f64>, // [K]
}

/// The prompts of every data set of a run, indexed as one list.
pub struct PromptSet {
    sets: Vec<TokenizedSet>,
    index: Vec<(u32, u32)>, // [prompts] (set, prompt within set)
}

impl PromptSet {
    pub fn open(paths: &[PathBuf], tok: &Tokenizer, max_length: usize) -> Result<PromptSet> {
        let mut sets = Vec::new();
        let mut index = Vec::new();
        for (s, path) in paths.iter().enumerate() {
            let set = TokenizedSet::open_or_build(path, tok, max_length, false)?;
            index.extend((0..set.len()).map(|p| (s as u32, p as u32)));
            sets.push(set);
        }
        if index.is_empty() {
            return Err(Error::user("the data sets hold no prompts"));
        }
        Ok(PromptSet { sets, index })
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// The SHA-256 (hex) of each data file, in the order given.
    pub fn source_sha256s(&self) -> Vec<String> {
        self.sets.iter().map(TokenizedSet::source_sha256).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Whether any prompt carries a tie or a margin (`TokenizedSet::labelled`).
    pub fn labelled(&self) -> bool {
        self.sets.iter().any(TokenizedSet::labelled)
    }

    /// The completions' scores [sum K] and the margins [P] of these prompts, laid out as
    /// `batch` lays them out, for `crate::loss::PairLabels`; both empty when no prompt of
    /// the set is labelled (the paper's loss).
    pub fn pair_labels(&self, prompts: &[usize]) -> (Vec<f64>, Vec<f64>) {
        if !self.labelled() {
            return (Vec::new(), Vec::new());
        }
        let (mut scores, mut margins) = (Vec::new(), Vec::with_capacity(prompts.len()));
        for &i in prompts {
            let (s, p) = self.index[i];
            let set = &self.sets[s as usize];
            scores.extend(set.scores(p as usize));
            margins.push(set.margin(p as usize));
        }
        (scores, margins)
    }

    pub fn prompt_type(&self, i: usize) -> Option<PromptType> {
        let (s, p) = self.index[i];
        self.sets[s as usize].prompt_type(p as usize)
    }

    pub fn num_completions(&self, i: usize) -> usize {
        let (s, p) = self.index[i];
        self.sets[s as usize].num_completions(p as usize)
    }

    /// The padded batch of every completion of these prompts, grouped by prompt, with K and
    /// the type of each.
    pub fn batch(
        &self,
        prompts: &[usize],
        pad_id: u32,
    ) -> (Batch, Vec<usize>, Vec<Option<PromptType>>) {
        let mut seqs = Vec::new();
        let mut ks = Vec::with_capacity(prompts.len());
        let mut types = Vec::with_capacity(prompts.len());
        for &i in prompts {
            let (s, p) = self.index[i];
            let set = &self.sets[s as usize];
            let k = set.num_completions(p as usize);
            seqs.extend((0..k).map(|j| set.completion(p as usize, j)));
            ks.push(k);
            types.push(set.prompt_type(p as usize));
        }
        let batch = Batch::from_sequences(seqs, pad_id).grouped(ks.clone());
        (batch, ks, types)
    }
}

/// The logits of every prompt of a set (the first `limit`), best first per prompt, in
/// evaluation mode (no dropout), `prompts_per_batch` prompts per forward pass.
pub fn score_set(
    mut forward: impl FnMut(&Batch) -> Result<Vec<f32>>,
    set: &PromptSet,
    limit: Option<usize>,
    prompts_per_batch: usize,
    pad_id: u32,
) -> Result<Vec<Vec<f32>>> {
    let n = limit.map_or(set.len(), |l| l.min(set.len()));
    let mut all = Vec::with_capacity(n);
    let ids: Vec<usize> = (0..n).collect();
    for chunk in ids.chunks(prompts_per_batch.max(1)) {
        let (batch, ks, _) = set.batch(chunk, pad_id);
        let logits = forward(&batch)?;
        let mut start = 0;
        for k in ks {
            all.push(logits[start..start + k].to_vec());
            start += k;
        }
    }
    Ok(all)
}

/// Rewards and types of scored prompts, for `eval::summarize`.
pub fn prompt_scores(set: &PromptSet, logits: &[Vec<f32>]) -> Vec<PromptScores> {
    logits
        .iter()
        .enumerate()
        .map(|(i, l)| PromptScores {
            prompt_type: set.prompt_type(i),
            rewards: l.iter().map(|&s| sigmoid(s as f64)).collect(),
        })
        .collect()
}
