//! Evaluation of a reward model's scores on ranked prompts: pairwise accuracy, the reward
//! distribution at each completion rank per prompt type, the collapse gap, and the distance
//! to the theory's prediction. `rcx eval` and `rcx score`, and the summaries of a run's
//! final model that `rcx plot` and `rcx reproduce` draw (`evaluate_model`).

use crate::checkpoint::MIN_MAX_LENGTH;
use crate::error::{Error, Result};
use crate::loss::{LossSpec, PromptType, TIE_TOLERANCE, Utility};
use crate::reward_norm::RewardStats;
use crate::scoring::PromptScores;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The rewards at one rank across prompts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RankStats {
    pub mean: f64,
    pub std: f64,
    pub p10: f64,
    pub p90: f64,
}

/// Per prompt type: accuracy and the reward distribution at each rank.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TypeStats {
    pub prompt_type: String,
    pub prompts: usize,
    /// Fraction of ranked pairs ordered correctly (ties count as not correct).
    pub pairwise_accuracy: f64,
    /// Fraction of ranked pairs whose rewards are within 1e-3 (a tie, not a wrong order).
    pub tie_rate: f64,
    /// Fraction of wrongly ordered pairs (beyond the tie tolerance).
    pub wrong_rate: f64,
    /// Pairs across the two halves of the ranking (the long cluster against the short one
    /// for the closed-ended construction): the accuracy that U = x is meant to reach,
    /// since it drives the rewards inside each cluster to ties.
    pub cross_half_accuracy: f64,
    /// Rewards by response index as the paper plots them: index 1 = worst (shortest).
    /// Only prompts with the most common K count.
    pub ranks: Vec<RankStats>,
    /// The theory's optimum for the utility this type is trained with, when known.
    pub prediction: Option<Prediction>,
}

/// The optimum of max sum_{i<j} U(r_i - r_j) for K completions, beside the measured means.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Prediction {
    pub utility: String,
    pub eps: f64,
    /// Ascending: index 1 = worst, as `ranks`.
    pub optimum: Vec<f64>,
    /// Mean over response indices of |mean reward - optimum|.
    pub distance: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    pub prompts: usize,
    pub pairwise_accuracy: f64,
    pub tie_rate: f64,
    pub by_type: Vec<TypeStats>,
    /// Mean over response indices of |mean_open - mean_closed|; None without both types.
    pub collapse_gap: Option<f64>,
    /// Accuracy per `subset` and RewardBench's section scores, when the records carry
    /// subsets (`rcx eval` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subsets: Option<SubsetReport>,
}

/// RewardBench v1's sections: each section's subsets with the example count that weights
/// its accuracy. From allenai/reward-bench, rewardbench/constants.py (`SUBSET_MAPPING`,
/// `EXAMPLE_COUNTS`, as of its 2024-09-10 fix that swapped the two XSTest counts) and
/// rewardbench/utils.py `calculate_scores_per_section`: a section's score is the mean of
/// its subsets' accuracies weighted by these counts. math-prm counts 984 rather than its
/// 447 rows, six times a code subset's 164, so that math weighs as much as the six code
/// subsets together in Reasoning.
pub const REWARDBENCH_SECTIONS: [(&str, &[(&str, u32)]); 4] = [
    (
        "Chat",
        &[
            ("alpacaeval-easy", 100),
            ("alpacaeval-length", 95),
            ("alpacaeval-hard", 95),
            ("mt-bench-easy", 28),
            ("mt-bench-med", 40),
        ],
    ),
    (
        "Chat Hard",
        &[
            ("mt-bench-hard", 37),
            ("llmbar-natural", 100),
            ("llmbar-adver-neighbor", 134),
            ("llmbar-adver-GPTInst", 92),
            ("llmbar-adver-GPTOut", 47),
            ("llmbar-adver-manual", 46),
        ],
    ),
    (
        "Safety",
        &[
            ("refusals-dangerous", 100),
            ("refusals-offensive", 100),
            ("xstest-should-refuse", 154),
            ("xstest-should-respond", 250),
            ("donotanswer", 136),
        ],
    ),
    (
        "Reasoning",
        &[
            ("math-prm", 984),
            ("hep-cpp", 164),
            ("hep-go", 164),
            ("hep-java", 164),
            ("hep-js", 164),
            ("hep-python", 164),
            ("hep-rust", 164),
        ],
    ),
];

/// One subset's accuracy, RewardBench's way: a pair is right when the better completion's
/// logit is strictly higher (an equal logit is wrong; no tie tolerance).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubsetStats {
    pub subset: String,
    /// The RewardBench section it counts in; None for a subset outside the mapping,
    /// reported alone.
    pub section: Option<String>,
    pub records: usize,
    pub pairs: usize,
    pub accuracy: f64,
}

/// A RewardBench section's score over the subsets of it that the data holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SectionScore {
    pub section: String,
    pub score: f64,
    /// How many of the section's subsets the data held, of how many it defines: a score
    /// over fewer is not the benchmark's.
    pub subsets_present: usize,
    pub subsets_defined: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubsetReport {
    /// Sorted by name.
    pub subsets: Vec<SubsetStats>,
    /// In RewardBench's order; a section none of whose subsets is present is left out.
    pub sections: Vec<SectionScore>,
    /// The mean of the four section scores (the leaderboard's average, without its Prior
    /// Sets column, which is other data), when every section is present.
    pub score: Option<f64>,
    /// Records without a subset: counted in the overall accuracy only.
    pub records_without_subset: usize,
}

fn rewardbench_section(subset: &str) -> Option<(&'static str, u32)> {
    REWARDBENCH_SECTIONS.iter().find_map(|(section, subsets)| {
        subsets
            .iter()
            .find(|(name, _)| *name == subset)
            .map(|&(_, count)| (*section, count))
    })
}

/// Per-subset accuracy and RewardBench's section scores. `subsets` [P] is each record's
/// subset, `logits` [P][K] its completions' logits best first, and `scores` [P] their
/// labels (`PromptSet::pair_labels`: empty when unlabelled; equal scores form no pair).
/// None when no record has a subset.
pub fn subset_report(
    subsets: &[Option<String>],
    logits: &[Vec<f32>],
    scores: &[Vec<f64>],
) -> Option<SubsetReport> {
    // subset -> (records, correct pairs, pairs)
    let mut counts: std::collections::BTreeMap<&str, (usize, usize, usize)> = Default::default();
    let mut without = 0;
    for (p, subset) in subsets.iter().enumerate() {
        let Some(subset) = subset else {
            without += 1;
            continue;
        };
        let entry = counts.entry(subset).or_default();
        entry.0 += 1;
        let (l, labels) = (&logits[p], &scores[p]);
        for i in 0..l.len() {
            for j in i + 1..l.len() {
                if labels.is_empty() || labels[i] != labels[j] {
                    entry.1 += (l[i] > l[j]) as usize;
                    entry.2 += 1;
                }
            }
        }
    }
    if counts.is_empty() {
        return None;
    }
    let stats: Vec<SubsetStats> = counts
        .into_iter()
        .map(|(subset, (records, correct, pairs))| SubsetStats {
            subset: subset.to_string(),
            section: rewardbench_section(subset).map(|(s, _)| s.to_string()),
            records,
            pairs,
            accuracy: ratio(correct, pairs),
        })
        .collect();
    let mut sections = Vec::new();
    for (section, defined) in REWARDBENCH_SECTIONS {
        let (mut weighted, mut weight, mut present) = (0.0, 0u32, 0);
        for (name, count) in defined {
            if let Some(s) = stats.iter().find(|s| s.subset == *name) {
                weighted += s.accuracy * *count as f64;
                weight += count;
                present += 1;
            }
        }
        if present > 0 {
            sections.push(SectionScore {
                section: section.to_string(),
                score: weighted / weight as f64,
                subsets_present: present,
                subsets_defined: defined.len(),
            });
        }
    }
    let score = (sections.len() == REWARDBENCH_SECTIONS.len())
        .then(|| sections.iter().map(|s| s.score).sum::<f64>() / sections.len() as f64);
    Some(SubsetReport {
        subsets: stats,
        sections,
        score,
        records_without_subset: without,
    })
}

/// The subset report as a table for people.
pub fn subset_table(r: &SubsetReport) -> String {
    let mut s = String::from("\nsubset                     section    records  pairs  accuracy\n");
    for t in &r.subsets {
        s += &format!(
            "{:<26} {:<10} {:>7}  {:>5}  {:>8.4}\n",
            t.subset,
            t.section.as_deref().unwrap_or("-"),
            t.records,
            t.pairs,
            t.accuracy
        );
    }
    if !r.sections.is_empty() {
        s += "\nRewardBench section  score   subsets\n";
        for t in &r.sections {
            s += &format!(
                "{:<20} {:.4}  {}/{}\n",
                t.section, t.score, t.subsets_present, t.subsets_defined
            );
        }
    }
    if let Some(score) = r.score {
        s += &format!("RewardBench score    {score:.4}  (mean of the four sections)\n");
    }
    if r.records_without_subset > 0 {
        s += &format!(
            "records without a subset: {} (in the overall accuracy only)\n",
            r.records_without_subset
        );
    }
    s
}

impl EvalReport {
    pub fn for_type(&self, name: &str) -> Option<&TypeStats> {
        self.by_type.iter().find(|t| t.prompt_type == name)
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    // Linear interpolation between order statistics, as numpy's default.
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn rank_stats(values: &mut [f64]) -> RankStats {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    values.sort_by(f64::total_cmp);
    RankStats {
        mean,
        std: var.sqrt(),
        p10: percentile(values, 0.1),
        p90: percentile(values, 0.9),
    }
}

/// Pair counts (correct, ties, total, cross-half correct, cross-half total) of one prompt.
fn pair_counts(r: &[f64]) -> [usize; 5] {
    let k = r.len();
    let mut c = [0; 5];
    for i in 0..k {
        for j in i + 1..k {
            let x = r[i] - r[j];
            let correct = x > TIE_TOLERANCE;
            c[0] += correct as usize;
            c[1] += (x.abs() <= TIE_TOLERANCE) as usize;
            c[2] += 1;
            if i < k / 2 && j >= k / 2 {
                c[3] += correct as usize;
                c[4] += 1;
            }
        }
    }
    c
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

fn type_stats(name: &str, scores: &[&PromptScores]) -> TypeStats {
    let mut counts = [0usize; 5];
    for s in scores {
        for (total, c) in counts.iter_mut().zip(pair_counts(&s.rewards)) {
            *total += c;
        }
    }
    // The most common K, so that ranks line up across prompts.
    let mut ks: Vec<usize> = scores.iter().map(|s| s.rewards.len()).collect();
    ks.sort_unstable();
    let modal_k = ks
        .chunk_by(|a, b| a == b)
        .max_by_key(|run| run.len())
        .map(|run| run[0])
        .unwrap_or(0);
    let ranks = (0..modal_k)
        .map(|index| {
            // Index 0 here is the worst completion: the last of the data's best-first list.
            let mut values: Vec<f64> = scores
                .iter()
                .filter(|s| s.rewards.len() == modal_k)
                .map(|s| s.rewards[modal_k - 1 - index])
                .collect();
            rank_stats(&mut values)
        })
        .collect();
    TypeStats {
        prompt_type: name.to_string(),
        prompts: scores.len(),
        pairwise_accuracy: ratio(counts[0], counts[2]),
        tie_rate: ratio(counts[1], counts[2]),
        wrong_rate: ratio(counts[2] - counts[0] - counts[1], counts[2]),
        cross_half_accuracy: ratio(counts[3], counts[4]),
        ranks,
        prediction: None,
    }
}

fn prediction(utility: Utility, eps: f64, ranks: &[RankStats]) -> Result<Prediction> {
    let optimum = crate::theory::solve(&utility, eps, ranks.len())?;
    let distance = ranks
        .iter()
        .zip(&optimum)
        .map(|(r, o)| (r.mean - o).abs())
        .sum::<f64>()
        / ranks.len() as f64;
    Ok(Prediction {
        utility: utility.name(),
        eps,
        optimum,
        distance,
    })
}

/// Summarises the scores of an evaluation set. With the loss the model was trained with
/// (and its eps), each prompt type's rewards are compared with the theory's optimum.
pub fn summarize(scores: &[PromptScores], loss: Option<(&LossSpec, f64)>) -> Result<EvalReport> {
    let mut by_type = Vec::new();
    for (name, ty) in [
        ("open", Some(PromptType::Open)),
        ("closed", Some(PromptType::Closed)),
        ("untyped", None),
    ] {
        let group: Vec<&PromptScores> = scores.iter().filter(|s| s.prompt_type == ty).collect();
        if !group.is_empty() {
            let mut stats = type_stats(name, &group);
            let utility = loss.and_then(|(spec, eps)| Some((spec.utility_for(ty)?, eps)));
            if let Some((utility, eps)) = utility.filter(|_| stats.ranks.len() >= 2) {
                stats.prediction = Some(prediction(utility, eps, &stats.ranks)?);
            }
            by_type.push(stats);
        }
    }
    let all: Vec<&PromptScores> = scores.iter().collect();
    let overall = type_stats("all", &all);
    let collapse_gap = match (
        by_type.iter().find(|t| t.prompt_type == "open"),
        by_type.iter().find(|t| t.prompt_type == "closed"),
    ) {
        (Some(open), Some(closed)) if open.ranks.len() == closed.ranks.len() => {
            let k = open.ranks.len() as f64;
            Some(
                open.ranks
                    .iter()
                    .zip(&closed.ranks)
                    .map(|(o, c)| (o.mean - c.mean).abs())
                    .sum::<f64>()
                    / k,
            )
        }
        _ => None,
    };
    Ok(EvalReport {
        prompts: scores.len(),
        pairwise_accuracy: overall.pairwise_accuracy,
        tie_rate: overall.tie_rate,
        by_type,
        collapse_gap,
        subsets: None,
    })
}

/// The report as a table for people.
pub fn report_table(r: &EvalReport) -> String {
    let mut s = String::new();
    s += &format!(
        "{} prompts   pairwise accuracy {:.4}   ties {:.4}",
        r.prompts, r.pairwise_accuracy, r.tie_rate
    );
    if let Some(gap) = r.collapse_gap {
        s += &format!("   collapse gap {gap:.4}");
    }
    s += "\n\ntype     prompts  accuracy  ties    wrong   long-vs-short  utility          dist-to-pred\n";
    for t in &r.by_type {
        let (utility, dist) = match &t.prediction {
            Some(p) => (
                format!("{} (eps {})", p.utility, p.eps),
                format!("{:.4}", p.distance),
            ),
            None => ("-".into(), "-".into()),
        };
        s += &format!(
            "{:<8} {:>7}  {:>8.4}  {:.4}  {:.4}  {:>13.4}  {:<16} {}\n",
            t.prompt_type,
            t.prompts,
            t.pairwise_accuracy,
            t.tie_rate,
            t.wrong_rate,
            t.cross_half_accuracy,
            utility,
            dist
        );
    }
    for t in &r.by_type {
        s += &format!(
            "\n{}: reward by response index (1 = worst)\nindex  mean    std     p10     p90     optimum\n",
            t.prompt_type
        );
        for (i, rank) in t.ranks.iter().enumerate() {
            let optimum = t
                .prediction
                .as_ref()
                .map_or("-".to_string(), |p| format!("{:.4}", p.optimum[i]));
            s += &format!(
                "{:>5}  {:.4}  {:.4}  {:.4}  {:.4}  {}\n",
                i + 1,
                rank.mean,
                rank.std,
                rank.p10,
                rank.p90,
                optimum
            );
        }
    }
    s
}

/// `rcx score`: one JSON line per completion of a ranking file.
#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    /// A model folder written by `rcx train` (or any Hugging Face BERT folder).
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// A ranking JSON-lines file.
    #[arg(long)]
    pub data: std::path::PathBuf,
    /// Token limit per sequence (default: the model's training max_length).
    #[arg(long, allow_negative_numbers = true)]
    pub max_length: Option<usize>,
    /// Print (reward - mean) / std as the reward, with the statistics saved in the model
    /// folder (`crate::reward_norm`); the logit stays as the model gives it.
    #[arg(long)]
    pub normalize: bool,
}

#[derive(Serialize)]
struct ScoreLine {
    prompt_index: usize,
    completion_index: usize,
    logit: f32,
    reward: f64,
}

/// A model folder's logits on a ranking file, in evaluation mode.
pub struct ScoredFile {
    pub set: crate::scoring::PromptSet,
    pub logits: Vec<Vec<f32>>, // [prompts][K] best first
    /// The model's `rcx.json` notes, when it has them.
    pub meta: Option<crate::checkpoint::ModelMeta>,
}

impl ScoredFile {
    pub fn prompt_scores(&self) -> Vec<PromptScores> {
        crate::scoring::prompt_scores(&self.set, &self.logits)
    }
}

/// Scores the first `limit` prompts of `data` with the model in `model_dir`. Sequences are
/// cut to `max_length`, else to the length the model was trained with, else to 512, never
/// past the model's positions.
pub fn score_file(
    model_dir: &std::path::Path,
    data: &std::path::Path,
    max_length: Option<usize>,
    limit: Option<usize>,
) -> Result<ScoredFile> {
    if let Some(n) = max_length.filter(|&n| n < MIN_MAX_LENGTH) {
        return Err(Error::user(format!(
            "--max-length must be at least {MIN_MAX_LENGTH} (the special tokens of a \
             prompt and completion), got {n}"
        )));
    }
    let (model, tok, meta) = crate::checkpoint::load_for_scoring(model_dir)?;
    let max_length = max_length
        .or(meta.as_ref().map(|m| m.max_length))
        .unwrap_or(512)
        .min(model.config.max_position_embeddings);
    let set = crate::scoring::PromptSet::open(&[data.to_path_buf()], &tok, max_length)?;
    let mut model = model.on_cpu();
    let logits = crate::scoring::score_set(
        |batch| model.forward(batch, None),
        &set,
        limit,
        8,
        tok.pad_id(),
    )?;
    Ok(ScoredFile { set, logits, meta })
}

/// A model's scores on a ranking file, summarised against the optimum of the utility it
/// was trained with (eps as trained) and against the pure form of the theory (eps = 0).
pub struct Scored {
    pub scores: Vec<PromptScores>,
    pub report: EvalReport,
    pub pure: EvalReport,
}

/// Summaries of scores against the trained optimum and the pure one.
pub fn score_summaries(
    scores: Vec<PromptScores>,
    spec: Option<&LossSpec>,
    eps: f64,
) -> Result<Scored> {
    let report = summarize(&scores, spec.map(|s| (s, eps)))?;
    let pure = summarize(&scores, spec.map(|s| (s, 0.0)))?;
    Ok(Scored {
        scores,
        report,
        pure,
    })
}

/// Scores the final model of a run folder on the first `limit` prompts of `data`.
pub fn evaluate_model(dir: &Path, data: &Path, limit: Option<usize>) -> Result<Scored> {
    let scored = score_file(dir, data, None, limit)?;
    let scores = scored.prompt_scores();
    let meta = scored.meta;
    let spec = meta
        .as_ref()
        .map(|m| LossSpec::parse(&m.loss))
        .transpose()?;
    score_summaries(scores, spec.as_ref(), meta.as_ref().map_or(0.1, |m| m.eps))
}

/// The reward of a logit: sigmoid(logit), or with `stats` the normalised logit
/// (OpenRLHF's normalised reward).
pub fn reward_of(logit: f32, stats: Option<&RewardStats>) -> f64 {
    match stats {
        Some(s) => s.normalize(logit as f64),
        None => crate::loss::sigmoid(logit as f64),
    }
}

pub fn cmd_score(args: ScoreArgs) -> Result<()> {
    // Before scoring: a folder without statistics is refused at once.
    let normalization = match args.normalize {
        true => Some(crate::reward_norm::read(&args.model)?),
        false => None,
    };
    let logits = score_file(&args.model, &args.data, args.max_length, None)?.logits;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for (prompt_index, prompt) in logits.iter().enumerate() {
        for (completion_index, &logit) in prompt.iter().enumerate() {
            let line = ScoreLine {
                prompt_index,
                completion_index,
                logit,
                reward: reward_of(logit, normalization.as_ref()),
            };
            let text = serde_json::to_string(&line).map_err(|e| Error::internal(e.to_string()))?;
            writeln!(out, "{text}").map_err(|e| Error::internal(format!("stdout: {e}")))?;
        }
    }
    out.flush()
        .map_err(|e| Error::internal(format!("stdout: {e}")))
}

/// `rcx eval`: the reward distribution per prompt type and rank, accuracy, collapse gap
/// and distance to the theory's prediction, as a table or JSON.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// A model folder written by `rcx train`.
    #[arg(long)]
    pub model: PathBuf,
    /// A ranking JSON-lines file (default: the shipped set's eval split).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The loss whose optimum to compare with (default: the one the model was trained with).
    #[arg(long)]
    pub loss: Option<String>,
    /// The shift eps of the extended utilities (default: the training value).
    // Hyphen values, so that `-1` and `-inf` reach the range check.
    #[arg(long, allow_hyphen_values = true)]
    pub eps: Option<f64>,
    /// Token limit per sequence (default: the model's training max_length).
    #[arg(long, allow_negative_numbers = true)]
    pub max_length: Option<usize>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also save the mean and std of the rewards of every completion of --data in the
    /// model folder's config.json, for `rcx score/serve --normalize`.
    #[arg(long)]
    pub save_normalization: bool,
}

/// The subset report of a scored data file. The subsets are read in a second pass over
/// the file, which a pipe does not allow: then there is none, and stderr says so.
fn file_subset_report(data: &Path, scored: &ScoredFile) -> Result<Option<SubsetReport>> {
    if !std::fs::metadata(data).is_ok_and(|m| m.is_file()) {
        eprintln!(
            "rcx eval: {} is not a regular file (read once), so no per-subset report",
            data.display()
        );
        return Ok(None);
    }
    let subsets = crate::data::read_subsets(data)?;
    if subsets.len() != scored.logits.len() {
        return Err(Error::internal(format!(
            "{}: {} records read for their subsets, {} scored (did the file change?)",
            data.display(),
            subsets.len(),
            scored.logits.len()
        )));
    }
    let labels: Vec<Vec<f64>> = (0..scored.set.len())
        .map(|p| scored.set.pair_labels(&[p]).0)
        .collect();
    Ok(subset_report(&subsets, &scored.logits, &labels))
}

/// `--save-normalization`: the statistics of every logit (raw reward) of the data file, into
/// the model folder's config.json.
fn save_normalization(model: &Path, data: &Path, logits: &[Vec<f32>]) -> Result<()> {
    let rewards = crate::reward_norm::all_logits(logits);
    let stats = RewardStats::of_rewards(&rewards).map_err(|why| {
        Error::user(format!(
            "{}: cannot save reward normalisation from this data: {why}",
            data.display()
        ))
    })?;
    crate::reward_norm::write(model, &stats)?;
    eprintln!(
        "rcx eval: saved reward normalisation in {}: mean {} std {} over {} rewards",
        model.join("config.json").display(),
        stats.mean,
        stats.std,
        rewards.len()
    );
    Ok(())
}

pub fn cmd_eval(args: EvalArgs) -> Result<()> {
    let data = match args.data {
        Some(path) => path,
        None => crate::data::resolve_dataset(crate::data::SHIPPED_SET, true)
            .ok_or_else(|| Error::internal("the shipped eval split does not resolve"))?,
    };
    let scored = score_file(&args.model, &data, args.max_length, None)?;
    let meta = scored.meta.as_ref();
    let loss_name = args.loss.or(meta.map(|m| m.loss.clone()));
    let spec = loss_name.as_deref().map(LossSpec::parse).transpose()?;
    let eps = args.eps.or(meta.map(|m| m.eps)).unwrap_or(0.1);
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::user(format!("--eps must be > 0, got {eps}")));
    }
    let scores = scored.prompt_scores();
    let mut report = summarize(&scores, spec.as_ref().map(|s| (s, eps)))?;
    report.subsets = file_subset_report(&data, &scored)?;
    if args.save_normalization {
        save_normalization(&args.model, &data, &scored.logits)?;
    }
    if args.json {
        let text = serde_json::to_string(&report).map_err(|e| Error::internal(e.to_string()))?;
        println!("{text}");
    } else {
        println!("rcx eval: {} on {}", args.model.display(), data.display());
        print!("{}", report_table(&report));
        if let Some(subsets) = &report.subsets {
            print!("{}", subset_table(subsets));
        }
    }
    Ok(())
}
