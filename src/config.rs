//! The YAML training config of `rcx train`, and `rcx check-config`.
//!
//! Keys and defaults follow Hugging Face's `TrainingArguments` where it has the key (the
//! paper's runs were configured that way). The text is first bounded in size and nesting
//! and searched for tags (`prescan`); then every check of one key is made while the YAML is
//! read, so that each error carries the key path and line serde_yaml_ng knows; an error is
//! one line: `FILE:LINE: KEY: what was wrong, what is allowed`. The checks of several keys
//! together (`FILE: KEY: ...`) follow, and `Config::check_data` checks what the config
//! names (the data's records, a model folder's positions). docs/reliability.md ("Configs") lists
//! the bounds and why.
//!
//! Relative paths (`datasets`, `eval_datasets`, `output_dir`) are resolved against the
//! current directory of the process, not against the config file (as Hugging Face does
//! with `output_dir`).
//! `model_name` is not checked for existence here: a model folder may be fetched after the
//! config is written; the model loader checks it at train time.

use crate::backend::{DType, Device};
use crate::data::{LineOutcome, SHIPPED_SET, for_each_line, parse_ranking_line, resolve_dataset};
use crate::error::{Error, Result};
use crate::hf_config::read_json_object;
use crate::loss::{EPS_RANGE, LossSpec, Utility, short_number};

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

mod prescan;

// The bounds on every count. With them no product the trainer forms can overflow a 64-bit
// usize (see the assertion below), and no allocation they size is absurd.
/// `max_steps`, `eval_steps`, `save_steps`, `logging_steps`, `eval_max_prompts`.
pub const MAX_STEPS: usize = 1_000_000_000;
/// Prompts per micro-batch (`per_device_train_batch_size`).
pub const MAX_BATCH: usize = 4096;
/// Micro-batches per optimizer step (`gradient_accumulation_steps`).
pub const MAX_ACCUMULATION: usize = 4096;
/// Prompts per optimizer step (batch size x accumulation): the trainer holds every
/// micro-batch of a step in memory at once.
pub const MAX_PROMPTS_PER_STEP: usize = 65536;
/// Tokens per completion: `[CLS] prompt [SEP] completion [SEP]` needs the 3 special tokens
/// and at least one token of each text; no BERT has more than 8192 positions.
pub const MAX_LENGTH_RANGE: (usize, usize) = (5, 8192);

// The trainer's prompt position step * prompts_per_step + micro * batch + batch, its
// (step, micro) seeds and its rates stay far below 2^63.
const _: () = assert!(
    (MAX_STEPS as u128 + 1) * (MAX_PROMPTS_PER_STEP as u128 + MAX_BATCH as u128)
        < (i64::MAX as u128)
);

/// Learning-rate schedule after the linear warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Linear decay to 0 at `max_steps` (Hugging Face's default).
    Linear,
    /// Half a cosine from the peak to 0 at `max_steps`.
    Cosine,
    /// Constant after warmup.
    Constant,
}

/// A validated training config. Built only by `Config::load`.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from, to name it in later errors.
    pub path: PathBuf,
    /// `bert-tiny`, `bert-mini`, `bert-small` (from scratch) or a Hugging Face folder.
    pub model_name: String,
    pub learning_rate: f64,
    pub scheduler: Scheduler,
    /// Fraction of `max_steps` spent in linear warmup, in [0, 1].
    pub warmup_ratio: f64,
    pub gradient_accumulation_steps: usize,
    /// Prompts (each with all its completions) per micro-batch.
    pub per_device_train_batch_size: usize,
    /// Tokens per completion (prompt + answer), longer ones truncated.
    pub max_length: usize,
    /// Optimizer steps.
    pub max_steps: usize,
    pub eval_steps: usize,
    pub save_steps: usize,
    pub logging_steps: usize,
    /// Absolute: resolved against the current directory.
    pub output_dir: PathBuf,
    pub loss: LossSpec,
    /// For display: `adaptive`, `x_inv`, or `open=x_inv,closed=x`.
    pub loss_name: String,
    /// The shift of the extended utilities (> 0).
    pub eps: f64,
    /// The entries as written: shipped set names or paths.
    pub datasets: Vec<String>,
    /// The training files they name, absolute.
    pub train_files: Vec<PathBuf>,
    /// The evaluation entries as written (default: the shipped set, eval split).
    pub eval_datasets: Vec<String>,
    /// The evaluation files they name, absolute.
    pub eval_files: Vec<PathBuf>,
    pub weight_decay: f64,
    /// Global gradient-norm clipping threshold (> 0).
    pub max_grad_norm: f64,
    pub seed: u64,
    pub device: Device,
    pub dtype: DType,
    /// Overrides the model's hidden and attention dropout when set, in [0, 1).
    pub dropout: Option<f64>,
    /// Evaluate on at most this many prompts (all when unset).
    pub eval_max_prompts: Option<usize>,
    /// TRL's reward centering: c * mean(logit^2) over each micro-batch added to the loss
    /// (0, the default, is off), in `CENTER_RANGE`.
    pub center_rewards_coefficient: f64,
    /// A decoder runs the prompt of a micro-batch's K completions once and lets the K attend
    /// to its keys and values (`llama::SharedSplit`); the same loss and gradients as the K
    /// whole sequences, computed once instead of K times. On by default; encoders attend
    /// both ways (a prompt's states depend on its completion) and ignore it.
    pub shared_prefix: bool,
    /// On several GPUs: 0 replicates AdamW's state on every rank, 1 (ZeRO-1) shards its
    /// moments over the ranks (`backend::cuda::zero`). One process ignores it.
    pub zero_stage: usize,
    /// On several GPUs: the gradients of finished layers are gathered into buckets of at
    /// least this many MiB (f32) whose sums start while the backward goes on
    /// (`backend::cuda::buckets`; PyTorch DDP's bucket_cap_mb, whose default it shares).
    /// One process ignores it.
    pub bucket_mb: f64,
}

/// The `bucket_mb`s rcx takes: above a few GB a bucket is the whole model (no overlap).
pub const BUCKET_MB_RANGE: (f64, f64) = (1e-6, 1e5);

/// The `center_rewards_coefficient`s rcx trains with: TRL suggests 0.01; a thousand times
/// the mean squared logit leaves the ranking term no say.
pub const CENTER_RANGE: (f64, f64) = (0.0, 1e3);

/// The YAML as written; every field is checked by its deserializer so that errors carry
/// the key and line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(deserialize_with = "model_name")]
    model_name: String,
    #[serde(default = "default_learning_rate", deserialize_with = "positive_f64")]
    learning_rate: f64,
    #[serde(default = "default_scheduler")]
    scheduler: Scheduler,
    #[serde(default, deserialize_with = "unit_interval")]
    warmup_ratio: f64,
    #[serde(default = "one", deserialize_with = "accumulation")]
    gradient_accumulation_steps: usize,
    #[serde(default = "default_batch", deserialize_with = "batch")]
    per_device_train_batch_size: usize,
    #[serde(default = "default_max_length", deserialize_with = "max_length")]
    max_length: usize,
    #[serde(deserialize_with = "steps")]
    max_steps: usize,
    #[serde(default = "default_every", deserialize_with = "steps")]
    eval_steps: usize,
    #[serde(default = "default_every", deserialize_with = "steps")]
    save_steps: usize,
    #[serde(default = "default_logging_steps", deserialize_with = "steps")]
    logging_steps: usize,
    #[serde(deserialize_with = "output_dir")]
    output_dir: PathBuf,
    loss: NamedLoss,
    #[serde(default = "default_eps", deserialize_with = "eps")]
    eps: f64,
    datasets: TrainDatasets,
    #[serde(default)]
    eval_datasets: Option<EvalDatasets>,
    #[serde(default, deserialize_with = "non_negative_f64")]
    weight_decay: f64,
    #[serde(default = "default_max_grad_norm", deserialize_with = "positive_f64")]
    max_grad_norm: f64,
    #[serde(default = "default_seed")]
    seed: u64,
    #[serde(default = "default_device")]
    device: Device,
    #[serde(default = "default_dtype")]
    dtype: DType,
    #[serde(default, deserialize_with = "dropout")]
    dropout: Option<f64>,
    #[serde(default, deserialize_with = "optional_steps")]
    eval_max_prompts: Option<usize>,
    #[serde(default, deserialize_with = "center_coefficient")]
    center_rewards_coefficient: f64,
    #[serde(default = "yes")]
    shared_prefix: bool,
    #[serde(default, deserialize_with = "zero_stage")]
    zero_stage: usize,
    #[serde(default = "default_bucket_mb", deserialize_with = "bucket_mb")]
    bucket_mb: f64,
}

// Hugging Face Trainer's defaults, where it has the key.
fn default_learning_rate() -> f64 {
    5e-5
}
fn default_scheduler() -> Scheduler {
    Scheduler::Linear
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn default_batch() -> usize {
    8
}
fn default_max_length() -> usize {
    512
}
fn default_every() -> usize {
    500
}
fn default_logging_steps() -> usize {
    10
}
fn default_eps() -> f64 {
    0.1
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_seed() -> u64 {
    42
}
fn default_device() -> Device {
    Device::Auto
}
fn default_dtype() -> DType {
    DType::F32
}

// The range checks run inside the visitors: an error raised there gets the key path and
// line from serde_yaml_ng, one raised after deserializing the value would not.

/// A number (integers accepted) that must satisfy `ok`; `expected` says what is allowed.
struct NumberVisitor {
    expected: String,
    ok: fn(f64) -> bool,
}

impl Visitor<'_> for NumberVisitor {
    type Value = f64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.expected)
    }

    fn visit_f64<E: de::Error>(self, x: f64) -> std::result::Result<f64, E> {
        if (self.ok)(x) {
            Ok(x)
        } else {
            Err(E::custom(format!(
                "must be {}, got {}",
                self.expected,
                short_number(x)
            )))
        }
    }

    fn visit_i64<E: de::Error>(self, x: i64) -> std::result::Result<f64, E> {
        self.visit_f64(x as f64)
    }

    fn visit_u64<E: de::Error>(self, x: u64) -> std::result::Result<f64, E> {
        self.visit_f64(x as f64)
    }
}

fn positive_f64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    d.deserialize_f64(NumberVisitor {
        expected: "a positive number".into(),
        ok: |x| x.is_finite() && x > 0.0,
    })
}

fn eps<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    d.deserialize_f64(NumberVisitor {
        expected: format!(
            "a number in [{}, {}]",
            short_number(EPS_RANGE.0),
            short_number(EPS_RANGE.1)
        ),
        ok: |x| (EPS_RANGE.0..=EPS_RANGE.1).contains(&x),
    })
}

fn non_negative_f64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    d.deserialize_f64(NumberVisitor {
        expected: "a number >= 0".into(),
        ok: |x| x.is_finite() && x >= 0.0,
    })
}

fn default_bucket_mb() -> f64 {
    25.0
}

fn bucket_mb<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    d.deserialize_f64(NumberVisitor {
        expected: format!(
            "a bucket size in MiB in [{}, {}]",
            short_number(BUCKET_MB_RANGE.0),
            short_number(BUCKET_MB_RANGE.1)
        ),
        ok: |x| (BUCKET_MB_RANGE.0..=BUCKET_MB_RANGE.1).contains(&x),
    })
}

fn center_coefficient<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    d.deserialize_f64(NumberVisitor {
        expected: format!(
            "a number in [{}, {}] (0 is off)",
            short_number(CENTER_RANGE.0),
            short_number(CENTER_RANGE.1)
        ),
        ok: |x| (CENTER_RANGE.0..=CENTER_RANGE.1).contains(&x),
    })
}

fn unit_interval<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    d.deserialize_f64(NumberVisitor {
        expected: "a number in [0, 1]".into(),
        ok: |x| (0.0..=1.0).contains(&x),
    })
}

fn dropout<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<f64>, D::Error> {
    d.deserialize_f64(NumberVisitor {
        expected: "a number in [0, 1)".into(),
        ok: |x| (0.0..1.0).contains(&x),
    })
    .map(Some)
}

/// An integer in `min..=max` (counts of steps, prompts, tokens); `why` says what the
/// bounds are for.
struct CountVisitor {
    min: usize,
    max: usize,
    why: &'static str,
}

impl CountVisitor {
    fn refuse<E: de::Error>(&self, got: impl fmt::Display) -> E {
        let kind = if self.min == 1 {
            "a positive integer".to_string()
        } else {
            format!("an integer >= {}", self.min)
        };
        E::custom(format!(
            "must be {kind} in {}..={} ({}), got {got}",
            self.min, self.max, self.why
        ))
    }
}

impl Visitor<'_> for CountVisitor {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an integer in {}..={}", self.min, self.max)
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> std::result::Result<usize, E> {
        match usize::try_from(n) {
            Ok(n) if (self.min..=self.max).contains(&n) => Ok(n),
            _ => Err(self.refuse(n)),
        }
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> std::result::Result<usize, E> {
        match u64::try_from(n) {
            Ok(n) => self.visit_u64(n),
            Err(_) => Err(self.refuse(n)),
        }
    }
}

fn count<'de, D: Deserializer<'de>>(
    d: D,
    (min, max): (usize, usize),
    why: &'static str,
) -> std::result::Result<usize, D::Error> {
    // i64, so that a negative number reaches visit_i64 and gets the range message.
    d.deserialize_i64(CountVisitor { min, max, why })
}

fn steps<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    count(
        d,
        (1, MAX_STEPS),
        "a billion: rcx's bound on counts of steps and prompts",
    )
}

fn optional_steps<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<usize>, D::Error> {
    steps(d).map(Some)
}

fn batch<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    count(d, (1, MAX_BATCH), "prompts per micro-batch")
}

fn accumulation<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    count(d, (1, MAX_ACCUMULATION), "micro-batches per optimizer step")
}

fn zero_stage<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    count(
        d,
        (0, 1),
        "the ZeRO stages rcx has: 0 (none) or 1 (AdamW's moments sharded over the GPUs)",
    )
}

fn max_length<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    count(
        d,
        MAX_LENGTH_RANGE,
        "tokens per completion: [CLS] prompt [SEP] completion [SEP] needs the 3 special \
         tokens and a token of each text",
    )
}

/// A string that must not be blank; `expected` says what is allowed.
struct NonEmptyVisitor {
    expected: &'static str,
}

impl Visitor<'_> for NonEmptyVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.expected)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<String, E> {
        if s.trim().is_empty() {
            return Err(E::custom(format!("must not be empty: {}", self.expected)));
        }
        Ok(s.to_string())
    }
}

fn model_name<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    d.deserialize_str(NonEmptyVisitor {
        expected: "bert-tiny, bert-mini, bert-small, deberta-v3-tiny, llama-tiny, llama-small or \
                   a path to a Hugging Face model folder",
    })
}

fn output_dir<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<PathBuf, D::Error> {
    let dir = d.deserialize_str(NonEmptyVisitor {
        expected: "a path to the run's folder",
    })?;
    // Cannot fail on user input, only when the current directory is gone.
    absolute(Path::new(&dir)).map_err(de::Error::custom)
}

fn absolute(path: &Path) -> std::result::Result<PathBuf, String> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(path))
        .map_err(|e| format!("cannot resolve `{}`: {e}", path.display()))
}

/// A list of data set entries with the files they name. Each entry is a shipped set name or
/// a path to an existing file; a missing file fails with the entry's index.
struct Datasets<const EVAL: bool> {
    entries: Vec<String>,
    files: Vec<PathBuf>,
}

type TrainDatasets = Datasets<false>;
type EvalDatasets = Datasets<true>;

/// One entry, checked as its own element so that serde_yaml_ng reports its index and line.
struct DatasetEntry<const EVAL: bool> {
    entry: String,
    file: PathBuf,
}

struct DatasetEntryVisitor<const EVAL: bool>;

impl<const EVAL: bool> Visitor<'_> for DatasetEntryVisitor<EVAL> {
    type Value = DatasetEntry<EVAL>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "`{SHIPPED_SET}` or a path to a data file")
    }

    fn visit_str<E: de::Error>(self, entry: &str) -> std::result::Result<Self::Value, E> {
        if let Some(file) = resolve_dataset(entry.trim(), EVAL) {
            // The shipped set's files are checked when the data are loaded.
            return Ok(DatasetEntry {
                entry: entry.to_string(),
                file,
            });
        }
        let file = absolute(Path::new(entry)).map_err(E::custom)?;
        if !file.is_file() {
            return Err(E::custom(format!(
                "no such file `{}` (relative paths are taken from the current directory), \
                 and not a shipped set name (`{SHIPPED_SET}`)",
                file.display()
            )));
        }
        Ok(DatasetEntry {
            entry: entry.to_string(),
            file,
        })
    }
}

impl<'de, const EVAL: bool> Deserialize<'de> for DatasetEntry<EVAL> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_str(DatasetEntryVisitor::<EVAL>)
    }
}

struct DatasetsVisitor<const EVAL: bool>;

impl<'de, const EVAL: bool> Visitor<'de> for DatasetsVisitor<EVAL> {
    type Value = Datasets<EVAL>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a list of data sets, e.g. [{SHIPPED_SET}]")
    }

    fn visit_seq<A: SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let (mut entries, mut files) = (Vec::new(), Vec::new());
        while let Some(DatasetEntry::<EVAL> { entry, file }) = seq.next_element()? {
            entries.push(entry);
            files.push(file);
        }
        if entries.is_empty() {
            return Err(de::Error::custom(format!(
                "must list at least one data set (`{SHIPPED_SET}` or a path to a data file)"
            )));
        }
        Ok(Datasets { entries, files })
    }
}

impl<'de, const EVAL: bool> Deserialize<'de> for Datasets<EVAL> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_seq(DatasetsVisitor::<EVAL>)
    }
}

/// `loss:` as a name (`x_inv`, `adaptive`, ...) or a mapping `{open: UTIL, closed: UTIL}`,
/// with the name it is displayed under.
struct NamedLoss {
    spec: LossSpec,
    name: String,
}

impl<'de> Deserialize<'de> for NamedLoss {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(NamedLossVisitor)
    }
}

struct NamedLossVisitor;

impl<'de> Visitor<'de> for NamedLossVisitor {
    type Value = NamedLoss;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a loss name or a mapping {open: UTILITY, closed: UTILITY}")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> std::result::Result<NamedLoss, E> {
        let spec = LossSpec::parse(name).map_err(E::custom)?;
        Ok(NamedLoss {
            spec,
            name: name.trim().to_string(),
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<NamedLoss, A::Error> {
        let (mut open, mut closed) = (None, None);
        while let Some(key) = map.next_key::<PromptTypeKey>()? {
            let (slot, name) = match key {
                PromptTypeKey::Open => (&mut open, "open"),
                PromptTypeKey::Closed => (&mut closed, "closed"),
            };
            if slot.is_some() {
                return Err(de::Error::custom(format!("`{name}` given twice")));
            }
            *slot = Some(map.next_value::<UtilityName>()?.0);
        }
        match (open, closed) {
            (Some(open), Some(closed)) => Ok(NamedLoss {
                name: format!("open={},closed={}", open.name(), closed.name()),
                spec: LossSpec::PromptAware { open, closed },
            }),
            _ => Err(de::Error::custom(
                "the loss mapping needs both `open` and `closed` utilities",
            )),
        }
    }
}

/// A key of the `{open, closed}` mapping; read by serde's derive so that an unknown key
/// is reported at its own line.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum PromptTypeKey {
    Open,
    Closed,
}

/// One utility name of the `{open, closed}` mapping, parsed inside its own visitor so
/// that an error names `loss.open` or `loss.closed` and its line.
struct UtilityName(Utility);

struct UtilityNameVisitor;

impl Visitor<'_> for UtilityNameVisitor {
    type Value = UtilityName;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a utility name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> std::result::Result<UtilityName, E> {
        Utility::parse(name).map(UtilityName).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for UtilityName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_str(UtilityNameVisitor)
    }
}

impl RawConfig {
    /// The checks that involve more than one key (so serde_yaml_ng has no line for them).
    fn check_together(&self) -> std::result::Result<(), String> {
        let (batch, accumulation) = (
            self.per_device_train_batch_size,
            self.gradient_accumulation_steps,
        );
        if batch * accumulation > MAX_PROMPTS_PER_STEP {
            return Err(format!(
                "per_device_train_batch_size x gradient_accumulation_steps = {batch} x \
                 {accumulation} prompts per optimizer step, more than the {MAX_PROMPTS_PER_STEP} \
                 allowed (every micro-batch of a step is held in memory at once)"
            ));
        }
        let positions =
            crate::models::named(&self.model_name).map(|(m, _)| m.max_position_embeddings);
        if let Some(positions) = positions
            && self.max_length > positions
        {
            return Err(format!(
                "max_length: {} tokens, more than the {positions} positions of `{}`",
                self.max_length, self.model_name
            ));
        }
        let utilities = match self.loss.spec {
            LossSpec::Single(utility) => vec![("loss", utility)],
            LossSpec::PromptAware { open, closed } => {
                vec![("loss.open", open), ("loss.closed", closed)]
            }
        };
        for (key, utility) in utilities {
            utility
                .check_with_eps(self.eps)
                .map_err(|why| format!("{key}: {why}"))?;
        }
        Ok(())
    }
}

/// The keys without a default.
const REQUIRED_KEYS: &str = "model_name, loss, datasets, output_dir, max_steps";

impl Config {
    /// Reads and validates a config file. Errors are user errors of one line that name the
    /// file, the key and, when known, the line.
    pub fn load(path: &Path) -> Result<Config> {
        // At most one byte past the limit is read, whatever the file (an 8 GB one, a pipe).
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|file| {
                file.take(prescan::MAX_BYTES as u64 + 1)
                    .read_to_end(&mut bytes)
            })
            .map_err(|e| Error::io(path, e))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            Error::user(format!(
                "{}: not UTF-8 text (invalid byte at offset {})",
                path.display(),
                e.utf8_error().valid_up_to()
            ))
        })?;
        Config::parse(&text, path)
    }

    /// Parses config text; `path` names it in the errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let file = path.display();
        if text.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#') || l == "---"
        }) {
            return Err(Error::user(format!(
                "{file}: empty config; required keys: {REQUIRED_KEYS}"
            )));
        }
        prescan::check(text).map_err(|refusal| {
            Error::user(match refusal.line {
                Some(line) => format!("{file}:{line}: {}", refusal.message),
                None => format!("{file}: {}", refusal.message),
            })
        })?;
        let raw: RawConfig = serde_yaml_ng::from_str(text).map_err(|e| yaml_error(&file, &e))?;
        raw.check_together()
            .map_err(|e| Error::user(format!("{file}: {e}")))?;
        let eval = match raw.eval_datasets {
            Some(eval) => eval,
            None => {
                let file = resolve_dataset(SHIPPED_SET, true).ok_or_else(|| {
                    Error::internal(format!("the shipped set `{SHIPPED_SET}` does not resolve"))
                })?;
                Datasets {
                    entries: vec![SHIPPED_SET.to_string()],
                    files: vec![file],
                }
            }
        };
        Ok(Config {
            path: path.to_path_buf(),
            model_name: raw.model_name,
            learning_rate: raw.learning_rate,
            scheduler: raw.scheduler,
            warmup_ratio: raw.warmup_ratio,
            gradient_accumulation_steps: raw.gradient_accumulation_steps,
            per_device_train_batch_size: raw.per_device_train_batch_size,
            max_length: raw.max_length,
            max_steps: raw.max_steps,
            eval_steps: raw.eval_steps,
            save_steps: raw.save_steps,
            logging_steps: raw.logging_steps,
            output_dir: raw.output_dir,
            loss: raw.loss.spec,
            loss_name: raw.loss.name,
            eps: raw.eps,
            datasets: raw.datasets.entries,
            train_files: raw.datasets.files,
            eval_datasets: eval.entries,
            eval_files: eval.files,
            weight_decay: raw.weight_decay,
            max_grad_norm: raw.max_grad_norm,
            seed: raw.seed,
            device: raw.device,
            dtype: raw.dtype,
            dropout: raw.dropout,
            eval_max_prompts: raw.eval_max_prompts,
            center_rewards_coefficient: raw.center_rewards_coefficient,
            shared_prefix: raw.shared_prefix,
            zero_stage: raw.zero_stage,
            bucket_mb: raw.bucket_mb,
        })
    }

    /// Checks what the config names, as training will use it: a model folder that is
    /// already there has `max_length` positions; every record of the training and
    /// evaluation files parses; under a prompt-aware loss each has a `prompt_type`; an
    /// evaluation record has at most `theory::MAX_N` completions (each evaluation solves
    /// for the optimum of K). Both `rcx check-config` and `rcx train` (before it writes
    /// anything) call it, so that a run does not fail late on its config.
    pub fn check_data(&self) -> Result<()> {
        let folder_config = Path::new(&self.model_name).join("config.json");
        // Any architecture's config.json names its positions so; the loader checks the rest.
        let positions = match !self.is_builtin_model() && folder_config.is_file() {
            true => read_json_object(&folder_config)?
                .get("max_position_embeddings")
                .and_then(serde_json::Value::as_u64),
            false => None,
        };
        if let Some(positions) = positions
            && self.max_length as u64 > positions
        {
            return Err(Error::user(format!(
                "{}: max_length: {} tokens, more than the {positions} positions of the \
                 model ({})",
                self.path.display(),
                self.max_length,
                folder_config.display()
            )));
        }
        for file in self.train_files.iter().chain(&self.eval_files) {
            // A pipe or FIFO can be read only once, by the run itself, which checks its
            // records as it reads them.
            if !std::fs::metadata(file).is_ok_and(|m| m.is_file()) {
                continue;
            }
            for_each_line(file, false, |line, bytes| {
                let Some(record) = parse_ranking_line(file, line, bytes, false)? else {
                    return Ok(LineOutcome::Skipped);
                };
                if self.loss.is_prompt_aware() && record.prompt_type.is_none() {
                    return Err(Error::user(format!(
                        "{}: loss `{}` chooses its utility by prompt type, but {}:{line} has \
                         no `prompt_type` (open or closed)",
                        self.path.display(),
                        self.loss_name,
                        file.display()
                    )));
                }
                Ok(LineOutcome::Kept)
            })?;
        }
        Ok(())
    }

    /// Whether `model_name` names a model rcx builds from scratch (else it is a folder).
    pub fn is_builtin_model(&self) -> bool {
        crate::models::named(&self.model_name).is_some()
    }
}

/// Rewrites a serde_yaml_ng error (`KEY: message at line L column C`) as
/// `FILE:L: KEY: message`, on one line.
fn yaml_error(file: &impl fmt::Display, err: &serde_yaml_ng::Error) -> Error {
    let mut message = err.to_string();
    let prefix = match err.location() {
        Some(loc) => {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            if let Some(stripped) = message.strip_suffix(&suffix) {
                message = stripped.to_string();
            }
            format!("{file}:{}", loc.line())
        }
        None => file.to_string(),
    };
    // The top level is the private RawConfig; say what it is instead.
    let message = message.replace("struct RawConfig", "a mapping of config keys");
    let mut line = format!("{prefix}: {}", message.replace('\n', " "));
    if message.starts_with("missing field") {
        line.push_str(&format!(" (required keys: {REQUIRED_KEYS})"));
    }
    Error::user(line)
}

/// `rcx check-config FILE...`: everything `rcx train` checks of a config before it starts
/// (`Config::load`, `Config::check_data`).
#[derive(clap::Args, Debug)]
pub struct CheckConfigArgs {
    /// Config files to validate.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// Validates each file in turn, printing `FILE: ok`; stops at the first bad one with its
/// one-line error (exit code 2).
pub fn cmd_check_config(args: CheckConfigArgs) -> Result<()> {
    for file in &args.files {
        Config::load(file)?.check_data()?;
        println!("{}: ok", file.display());
    }
    Ok(())
}
