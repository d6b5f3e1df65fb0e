//! Reward normalisation, as OpenRLHF does it: the mean and standard deviation of a model's
//! raw rewards (the head's outputs, rcx's logits) over an evaluation set, kept in the model
//! folder, so that an RLHF loop can ask for (logit - mean) / std (`rcx score --normalize`,
//! `rcx serve --normalize`). These are OpenRLHF's numbers under OpenRLHF's keys: a folder's
//! statistics mean the same to both programs.
//!
//! The statistics live in the folder's `config.json` under OpenRLHF's own keys `"mean"` and
//! `"std"`. transformers keeps unknown config keys as attributes, so the folder stays
//! loadable there, and rcx's config reader ignores them. OpenRLHF's third key,
//! `"normalize_reward"`, is not written: OpenRLHF's loader (`get_llm_for_sequence_regression`)
//! overwrites it with its caller's `--normalize_reward` before the model reads it, so whether
//! rewards are normalised is the caller's choice there, as `--normalize` is here; a flag in
//! the folder would say something that neither program reads.
//! They are of the logits, not of rcx's rewards sigmoid(logit): OpenRLHF's reward is the
//! head's raw output, and a normalised reward is that output standardised (the sigmoid's
//! order, which is all a ranking says, is kept). `std` is the sample standard deviation
//! (n - 1 in the denominator), as `torch.std`, which OpenRLHF uses, computes it. rcx before
//! 2026-12-04 wrote the statistics of sigmoid(logit) under these keys: recompute them for
//! such a folder with `rcx eval --save-normalization`.
//! `rcx train` writes them at the final save from the final evaluation's rewards;
//! `rcx eval --save-normalization` writes them for any folder from a data file's rewards.

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// The config.json keys, OpenRLHF's names.
pub const MEAN_KEY: &str = "mean";
pub const STD_KEY: &str = "std";

/// The mean and sample standard deviation of a model's logits (raw rewards).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RewardStats {
    pub mean: f64,
    pub std: f64,
}

/// Why a set of rewards gives no statistics to normalise by.
#[derive(Debug, PartialEq)]
pub enum Degenerate {
    /// Fewer than two rewards: no sample standard deviation.
    TooFew(usize),
    /// The rewards do not spread (all equal, or not finite): dividing by std is undefined.
    NoSpread { count: usize, std: f64 },
}

impl std::fmt::Display for Degenerate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Degenerate::TooFew(n) => write!(f, "{n} reward(s), at least 2 are needed"),
            Degenerate::NoSpread { count, std } => {
                write!(
                    f,
                    "the {count} rewards have std {std}, a positive finite std is needed"
                )
            }
        }
    }
}

impl RewardStats {
    /// The statistics of `rewards` [N]; Err when they cannot normalise anything.
    pub fn of_rewards(rewards: &[f64]) -> std::result::Result<RewardStats, Degenerate> {
        let n = rewards.len();
        if n < 2 {
            return Err(Degenerate::TooFew(n));
        }
        let mean = rewards.iter().sum::<f64>() / n as f64;
        let sum_sq = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>();
        let std = (sum_sq / (n - 1) as f64).sqrt();
        if !(mean.is_finite() && std.is_finite() && std > 0.0) {
            return Err(Degenerate::NoSpread { count: n, std });
        }
        Ok(RewardStats { mean, std })
    }

    /// (logit - mean) / std.
    pub fn normalize(&self, logit: f64) -> f64 {
        (logit - self.mean) / self.std
    }
}

/// Every logit of scored prompts ([prompts][K]), for the statistics.
pub fn all_logits(logits: &[Vec<f32>]) -> Vec<f64> {
    logits.iter().flatten().map(|&l| l as f64).collect()
}

/// The statistics of the final evaluation's logits (every completion of every prompt it
/// scored); None, with a warning, when they cannot normalise anything.
pub fn final_stats(logits: &[Vec<f32>]) -> Option<RewardStats> {
    match RewardStats::of_rewards(&all_logits(logits)) {
        Ok(stats) => Some(stats),
        Err(why) => {
            eprintln!(
                "warning: no reward normalisation saved with the model ({why}); \
                 --normalize will refuse it"
            );
            None
        }
    }
}

fn read_config(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::user(format!(
            "{}: expected a JSON object",
            path.display()
        ))),
        Err(e) => Err(Error::user(format!(
            "{}:{}: not valid JSON: {e}",
            path.display(),
            e.line()
        ))),
    }
}

/// The statistics saved in the model folder `dir`; a user error naming the folder and the
/// missing or bad key otherwise, with the command that computes them.
pub fn read(dir: &Path) -> Result<RewardStats> {
    let path = dir.join("config.json");
    let config = read_config(&path)?;
    let number = |key: &str| -> Result<f64> {
        match config.get(key) {
            Some(value) => value.as_f64().ok_or_else(|| {
                Error::user(format!(
                    "{}: key '{key}' is {value}, expected a number (the reward {key} for \
                     --normalize)",
                    path.display()
                ))
            }),
            None => Err(Error::user(format!(
                "{}: no reward normalisation statistics (config.json has no '{key}'); \
                 --normalize needs them: train with this rcx, or run rcx eval --model {} \
                 --data FILE --save-normalization",
                dir.display(),
                dir.display()
            ))),
        }
    };
    let (mean, std) = (number(MEAN_KEY)?, number(STD_KEY)?);
    if !mean.is_finite() {
        return Err(Error::user(format!(
            "{}: key '{MEAN_KEY}' is {mean}, expected a finite number",
            path.display()
        )));
    }
    if !(std.is_finite() && std > 0.0) {
        return Err(Error::user(format!(
            "{}: key '{STD_KEY}' is {std}, expected a positive finite number",
            path.display()
        )));
    }
    Ok(RewardStats { mean, std })
}

/// Adds the statistics to `dir/config.json`, keeping every other key, and replaces the
/// file atomically (a reader sees the old file or the new one, never part of one).
pub fn write(dir: &Path, stats: &RewardStats) -> Result<()> {
    let path = dir.join("config.json");
    let mut config = read_config(&path)?;
    config.insert(MEAN_KEY.into(), stats.mean.into());
    config.insert(STD_KEY.into(), stats.std.into());
    let mut text = serde_json::to_string_pretty(&Value::Object(config))
        .map_err(|e| Error::internal(format!("writing {}: {e}", path.display())))?;
    text.push('\n');
    crate::safetensors::write_atomic(&path, text.as_bytes())
}
