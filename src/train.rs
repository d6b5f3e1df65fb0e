//! `rcx train`: the training loop. AdamW with decoupled weight decay, linear warmup then
//! linear, cosine or constant learning rate, clipping by global norm, gradient
//! accumulation, periodic evaluation into `metrics.jsonl` and atomic checkpoints.
//!
//! Every random stream (data order, dropout) is derived from (seed, step), so a run is a
//! pure function of its config, and resuming from a checkpoint continues bit for bit.
//!
//! A run holds its output folder's lock (`crate::lock`) throughout, stops with
//! `Error::Diverged` before anything non-finite is evaluated or saved, and stops cleanly
//! between steps on SIGINT/SIGTERM (`crate::signals`).
//!
//! On several processes (`--nproc N`, or the variables torchrun and Slurm set) each rank
//! trains its share of every global step's micro-batches and sums the gradients with the
//! others (`crate::distributed`); the run is the single process's, up to the order of the
//! floating-point sums. Rank 0 alone writes.

use crate::backend::cpu::Cpu;
use crate::backend::cuda::{Cuda, CudaRuntime};
use crate::backend::{Backend, Batch, DType, Device, OptimStep};
use crate::checkpoint::{self, TrainState};
use crate::checksum::fnv1a;
use crate::config::{Config, Scheduler};
use crate::distributed::data_parallel::DataParallel;
use crate::distributed::launch::{self, WorldEnv};
use crate::error::{Error, Result};
use crate::eval::{EvalReport, summarize};
use crate::lock::RunLock;
use crate::loss::{LossExtras, PairLabels, PromptType, ranking_loss_of_rewards_labelled};
use crate::models::{Dropout, HostModel, MicroBatch, Model, StepStats, Weights};
use crate::rng::{Rng, derive_seed};
use crate::scoring::{PromptScores, PromptSet, prompt_scores, score_set};
use crate::signals::Interrupts;
use crate::training_settings::{changes, describe, settings_sha256, training_settings};
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// The run's YAML config (see configs/).
    pub config: PathBuf,
    /// Continue from the newest checkpoint in the config's output_dir that verifies.
    #[arg(long)]
    pub resume: bool,
    /// With --resume: continue even though training settings (learning rate, batch, loss,
    /// data...) differ from the checkpoint's; the changes are recorded in metrics.jsonl.
    #[arg(long, requires = "resume")]
    pub resume_changed: bool,
    /// Stop after this optimizer step (at least 1, after a resumed checkpoint's), saving a
    /// checkpoint there (the schedule still follows max_steps): for tests of resuming and
    /// for quick looks.
    #[arg(long)]
    pub stop_at: Option<usize>,
    /// Start again in an output_dir that already holds a run, deleting its checkpoints.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Where to train, overriding the config's `device:` (auto: the GPU when a driver and a
    /// device exist, else the CPU).
    #[arg(long, value_enum)]
    pub device: Option<Device>,
    /// The training arithmetic, overriding the config's `dtype:` (bf16: GPU only).
    #[arg(long, value_enum)]
    pub dtype: Option<DType>,
    /// Train on N local GPUs, one process (rank) each: the launcher starts them and ends
    /// them all when one fails. The config's batch keys describe the global step.
    #[arg(long, value_name = "N")]
    pub nproc: Option<usize>,
    /// How the ranks meet: `tcp://HOST:PORT` (instead of MASTER_ADDR and MASTER_PORT) or
    /// `file:PATH` (a file every rank can read).
    #[arg(long, value_name = "URL")]
    pub init: Option<String>,
    /// Seconds a rank waits for the others (to meet, and in each exchange) before it stops
    /// with an error.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub dist_timeout: u64,
}

/// How a run starts and stops, and where it trains, besides its config.
#[derive(Clone, Copy, Debug)]
pub struct RunOptions {
    pub resume: bool,
    pub resume_changed: bool,
    pub overwrite: bool,
    pub stop_at: Option<usize>,
    pub quiet: bool,
    /// Overrides of the config's `device:` and `dtype:` (the command line's flags).
    pub device: Option<Device>,
    pub dtype: Option<DType>,
    /// How long a rank of a run on several processes waits for the others.
    pub dist_timeout: Duration,
}

/// How long ranks told to stop after another failed have before they are killed.
const RANK_STOP_GRACE: Duration = Duration::from_secs(10);

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;
/// Salts of the random streams derived from the seed.
const STREAM_DATA: u64 = 1;
const STREAM_DROPOUT: u64 = 2;

/// The learning rate at optimizer step `step` (0-based), as Hugging Face's schedulers.
pub fn learning_rate(cfg: &Config, step: usize) -> f64 {
    let total = cfg.max_steps as f64;
    let warmup = (cfg.warmup_ratio * total).ceil();
    let s = step as f64;
    let factor = if s < warmup {
        s / warmup.max(1.0)
    } else {
        let progress = ((s - warmup) / (total - warmup).max(1.0)).min(1.0);
        match cfg.scheduler {
            Scheduler::Linear => 1.0 - progress,
            Scheduler::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Scheduler::Constant => 1.0,
        }
    };
    cfg.learning_rate * factor
}

/// The training order: a fresh seeded permutation of the prompts every epoch.
struct DataOrder {
    seed: u64,
    epoch: usize,
    perm: Vec<usize>,
}

impl DataOrder {
    fn new(seed: u64, n: usize) -> DataOrder {
        let mut order = DataOrder {
            seed,
            epoch: usize::MAX,
            perm: (0..n).collect(),
        };
        order.set_epoch(0);
        order
    }

    fn set_epoch(&mut self, epoch: usize) {
        if epoch != self.epoch {
            self.perm.sort_unstable();
            Rng::new(derive_seed(self.seed, &[STREAM_DATA, epoch as u64])).shuffle(&mut self.perm);
            self.epoch = epoch;
        }
    }

    /// The prompt at a position of the endless stream of epochs.
    fn at(&mut self, position: usize) -> usize {
        let n = self.perm.len();
        self.set_epoch(position / n);
        self.perm[position % n]
    }
}

/// The mean pair loss over scored prompts (the first of `set`), as in training but without
/// dropout, with the set's ties and margins.
fn eval_loss(scores: &[PromptScores], set: &PromptSet, cfg: &Config) -> Result<f64> {
    let rewards: Vec<f64> = scores
        .iter()
        .flat_map(|s| s.rewards.iter().copied())
        .collect();
    let ks: Vec<usize> = scores.iter().map(|s| s.rewards.len()).collect();
    let types: Vec<Option<PromptType>> = scores.iter().map(|s| s.prompt_type).collect();
    let (pair_scores, margins) = set.pair_labels(&(0..scores.len()).collect::<Vec<_>>());
    let labels = PairLabels {
        scores: &pair_scores,
        margins: &margins,
    };
    ranking_loss_of_rewards_labelled(&rewards, &ks, &types, &cfg.loss, cfg.eps, &labels)
}

/// One line of metrics.jsonl.
#[derive(serde::Serialize)]
struct MetricsLine<'a> {
    step: usize,
    train_loss: f64,
    learning_rate: f64,
    eval_loss: f64,
    elapsed_s: f64,
    #[serde(flatten)]
    report: &'a EvalReport,
    /// On the first line after one or more `--resume-changed`: for each, the step resumed
    /// from and the training settings that changed there.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    resumed_with_changes: Vec<serde_json::Value>,
}

/// Whether the progress line is the last thing on stderr, with no line break after it.
static PROGRESS_LINE_OPEN: AtomicBool = AtomicBool::new(false);

/// Ends the progress line, if it is open, so that what follows starts a line.
fn end_progress_line() {
    if PROGRESS_LINE_OPEN.swap(false, Ordering::Relaxed) {
        eprintln!();
    }
}

fn progress(step: usize, max: usize, loss: f64, lr: f64, prompts_per_s: f64, eta_s: f64) {
    PROGRESS_LINE_OPEN.store(true, Ordering::Relaxed);
    let eta = eta_s.max(0.0) as u64;
    eprint!(
        "\rstep {step}/{max}  loss {loss:.4}  lr {lr:.2e}  {prompts_per_s:.1} prompts/s  ETA {}m{:02}s   ",
        eta / 60,
        eta % 60
    );
    let _ = std::io::stderr().flush();
}

/// Where a run trains and in which arithmetic: the config's `device:` and `dtype:`, or the
/// command line's `--device` and `--dtype` that override them.
struct Placement {
    use_cuda: bool,
    dtype: DType,
}

/// The placement the settings ask for and the machine allows; decided before anything is
/// read or written, so a refused run leaves no trace.
fn placement(cfg: &Config, opts: &RunOptions) -> Result<Placement> {
    let device = opts.device.unwrap_or(cfg.device);
    let dtype = opts.dtype.unwrap_or(cfg.dtype);
    // A setting as the user gave it, for the errors below: a flag, or the config's key.
    let device_setting = |d: Device| match opts.device {
        Some(_) => format!("--device {}", d.name()),
        None => format!("device: {}", d.name()),
    };
    let dtype_setting = |t: DType| match opts.dtype {
        Some(_) => format!("--dtype {}", t.name()),
        None => format!("dtype: {}", t.name()),
    };
    // Errors name the config file too when the setting came from it.
    let origin = |flag: bool| match flag {
        true => String::new(),
        false => format!("{}: ", cfg.path.display()),
    };
    let cuda = crate::backend::cuda::available();
    let use_cuda = match (device, &cuda) {
        (Device::Cpu, _) => false,
        (Device::Auto, available) => available.is_ok(),
        (Device::Cuda, Ok(())) => true,
        (Device::Cuda, Err(why)) => {
            return Err(Error::user(format!(
                "{}{}: {why}; use `{}` or `{}`",
                origin(opts.device.is_some()),
                device_setting(Device::Cuda),
                device_setting(Device::Cpu),
                device_setting(Device::Auto),
            )));
        }
    };
    if dtype == DType::Bf16 && !use_cuda {
        // The CPU backend computes in f32 (f64 for checks): no silent f32 run for bf16.
        let instead = match (device, &cuda) {
            (Device::Auto, Err(why)) => {
                format!("`{}` found no GPU ({why})", device_setting(Device::Auto))
            }
            _ => format!("`{}` trains in f32", device_setting(Device::Cpu)),
        };
        return Err(Error::user(format!(
            "{}{}: bf16 needs the CUDA device, but {instead}; use `{}` or `{}`",
            origin(opts.dtype.is_some() && opts.device.is_some()),
            dtype_setting(DType::Bf16),
            dtype_setting(DType::F32),
            device_setting(Device::Cuda),
        )));
    }
    Ok(Placement { use_cuda, dtype })
}

/// The model on the backend the placement chose; the host copy of its parameters is
/// moved (CPU) or dropped after the upload (GPU).
fn choose_engine(
    host: HostModel<f32>,
    placement: &Placement,
    shared_prefix: bool,
    device: usize,
) -> Result<Engine> {
    let mut engine = if placement.use_cuda {
        let rt = Arc::new(CudaRuntime::new(device)?);
        Engine::Cuda(Box::new(host.on_cuda(rt, placement.dtype)?))
    } else {
        Engine::Cpu(Box::new(host.on_cpu()))
    };
    match &mut engine {
        Engine::Cpu(model) => {
            model.set_shared_prefix(shared_prefix);
            model.start_training()?
        }
        Engine::Cuda(model) => {
            model.set_shared_prefix(shared_prefix);
            model.start_training()?
        }
    }
    Ok(engine)
}

/// One micro-batch of a step: the padded completions, K and type per prompt, dropout, and
/// the pairs' labels (`PromptSet::pair_labels`).
struct Micro {
    batch: Batch,
    ks: Vec<usize>,
    types: Vec<Option<PromptType>>,
    dropout: Option<Dropout>,
    scores: Vec<f64>,
    margins: Vec<f64>,
}

/// The model on the backend the config's `device` and `dtype` ask for (the CPU in f32, the
/// GPU in f32 or bf16); every method runs the same generic code.
enum Engine {
    Cpu(Box<Model<Cpu<f32>>>),
    Cuda(Box<Model<Cuda>>),
}

impl Engine {
    fn name(&self) -> String {
        match self {
            Engine::Cpu(model) => model.backend.describe(),
            Engine::Cuda(model) => model.backend.describe(),
        }
    }

    /// Whether weights and moments are in host memory, so checking them costs no copy.
    fn host_resident(&self) -> bool {
        match self {
            Engine::Cpu(_) => Cpu::<f32>::HOST_RESIDENT,
            Engine::Cuda(_) => Cuda::HOST_RESIDENT,
        }
    }

    fn upload_moments(&mut self, m: &[f32], v: &[f32]) -> Result<()> {
        match self {
            Engine::Cpu(model) => model.backend.upload_moments(m, v),
            Engine::Cuda(model) => model.backend.upload_moments(m, v),
        }
    }

    fn train_step(
        &mut self,
        micros: &[MicroBatch<'_>],
        extras: &[LossExtras<'_>],
        cfg: &Config,
        opt: &OptimStep,
        ranks: Option<&mut DataParallel>,
    ) -> Result<StepStats> {
        let (loss, eps) = (&cfg.loss, cfg.eps);
        match (self, ranks) {
            (Engine::Cpu(model), None) => model.train_step_with(micros, extras, loss, eps, opt),
            (Engine::Cuda(model), None) => model.train_step_with(micros, extras, loss, eps, opt),
            (Engine::Cuda(model), Some(ranks)) => {
                model.train_step_synced(micros, extras, loss, eps, opt, ranks)
            }
            (Engine::Cpu(_), Some(_)) => Err(Error::internal(
                "a run on several processes placed on the CPU",
            )),
        }
    }

    /// Evaluation-mode logits of a batch.
    fn forward_eval(&mut self, batch: &Batch) -> Result<Vec<f32>> {
        match self {
            Engine::Cpu(model) => model.forward(batch, None),
            Engine::Cuda(model) => model.forward(batch, None),
        }
    }

    /// f(weights, AdamW moments) on the host (copied there from a device).
    fn with_weights<R>(&self, f: impl FnOnce(&Weights<'_>, &[f32], &[f32]) -> R) -> Result<R> {
        match self {
            Engine::Cpu(model) => model.with_weights(f),
            Engine::Cuda(model) => model.with_weights(f),
        }
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            resume: false,
            resume_changed: false,
            overwrite: false,
            stop_at: None,
            quiet: false,
            device: None,
            dtype: None,
            dist_timeout: Duration::from_secs(300),
        }
    }
}

/// Runs `rcx train`: one process, one of several (launched by torchrun, Slurm or
/// `--nproc`), or the `--nproc` launcher itself.
pub fn cmd_train(args: TrainArgs) -> Result<()> {
    let dist_timeout = Duration::from_secs(args.dist_timeout);
    if let Some(nproc) = args.nproc {
        if nproc == 0 {
            return Err(Error::user(
                "--nproc 0: give the number of GPUs to train on (1 or more)",
            ));
        }
        // The ranks run this command line without --nproc; the config is read (and refused)
        // here first, so a bad config fails once rather than N times.
        Config::load(&args.config)?;
        let code = launch::run_local(nproc, &rank_args(), RANK_STOP_GRACE)?;
        return match code {
            0 => Ok(()),
            code => Err(Error::Exited(
                code,
                format!("training on {nproc} processes failed (exit code {code})"),
            )),
        };
    }
    let world = launch::world_from_env(args.init.as_deref())?;
    let cfg = Config::load(&args.config)?;
    let opts = RunOptions {
        resume: args.resume,
        resume_changed: args.resume_changed,
        overwrite: args.overwrite,
        stop_at: args.stop_at,
        quiet: args.quiet,
        device: args.device,
        dtype: args.dtype,
        dist_timeout,
    };
    let trained = train_rank(&cfg, opts, world.as_ref()).map(|_| ());
    if trained.is_err() {
        // The error goes on a line of its own, not after the progress line.
        end_progress_line();
    }
    trained
}

/// This process's arguments without `--nproc N` (or `--nproc=N`): a rank's command line.
fn rank_args() -> Vec<OsString> {
    let mut args = Vec::new();
    let mut skip_value = false;
    for arg in std::env::args_os().skip(1) {
        if skip_value {
            skip_value = false;
        } else if arg == "--nproc" {
            skip_value = true;
        } else if !arg.to_string_lossy().starts_with("--nproc=") {
            args.push(arg);
        }
    }
    args
}

/// The error of a run that stopped being finite at (or, when the weights are only looked
/// at now and then, by) `step`: what was not finite, the checkpoint kept, and the settings
/// that decide whether training stays finite.
fn diverged(cfg: &Config, step: usize, exact: bool, what: &str, kept: Option<&Path>) -> Error {
    let kept = match kept {
        Some(dir) => format!("the last good checkpoint is {}", dir.display()),
        None => "no checkpoint was saved".to_string(),
    };
    Error::Diverged(format!(
        "{}: training diverged {} step {step}: {what}; {kept}; a lower learning_rate, a \
         longer warmup_ratio, a lower max_grad_norm, a larger eps or another loss may keep \
         it finite",
        cfg.path.display(),
        if exact { "at" } else { "by" },
    ))
}

/// The error of a run stopped by a signal between steps, once its temporaries are gone.
fn interrupted(
    cfg: &Config,
    (signal, name): (i32, &str),
    done: usize,
    kept: Option<&Path>,
    writer: bool,
) -> Error {
    // Best effort: the signal is what the user needs to hear about. Only the writer: another
    // rank may get the signal while rank 0 is in the middle of a save.
    if writer {
        let _ = checkpoint::remove_partial_saves(&cfg.output_dir);
    }
    let kept = match kept {
        Some(dir) => format!(
            "continue from {} with --resume (steps after it are trained again)",
            dir.display()
        ),
        None => "no checkpoint was saved".to_string(),
    };
    Error::Interrupted(
        signal,
        format!("interrupted by {name} after step {done}: stopped cleanly; {kept}"),
    )
}

/// Refuses a run on several processes that cannot be one: on the CPU, or with a global step
/// that does not split into equal shares.
fn check_world(cfg: &Config, placement: &Placement, world: &WorldEnv) -> Result<()> {
    let n = world.rank.world_size;
    if !placement.use_cuda {
        return Err(Error::user(format!(
            "{}: training on {n} processes needs the CUDA device (NCCL), but this run is \
             placed on the CPU: use `device: cuda` (or auto on a machine with GPUs), or one \
             process",
            cfg.path.display()
        )));
    }
    if !cfg.gradient_accumulation_steps.is_multiple_of(n) {
        return Err(Error::user(format!(
            "{}: gradient_accumulation_steps {} does not split into {n} equal shares: with \
             {n} processes it must be a multiple of {n} (it counts the global step's \
             micro-batches, so the run does not depend on the number of processes)",
            cfg.path.display(),
            cfg.gradient_accumulation_steps
        )));
    }
    Ok(())
}

/// What every rank of a run must agree on before the first step: the training settings,
/// the step it starts from, and the weights and moments.
fn start_fingerprint(
    settings_sha256: &str,
    step: usize,
    params: &[f32],
    m: &[f32],
    v: &[f32],
) -> u64 {
    let parts = [
        fnv1a(settings_sha256.as_bytes()),
        step as u64,
        fnv1a(bytemuck::cast_slice(params)),
        fnv1a(bytemuck::cast_slice(m)),
        fnv1a(bytemuck::cast_slice(v)),
    ];
    fnv1a(bytemuck::cast_slice(&parts))
}

/// Trains the run `cfg` describes; returns the engine it trained on (e.g. "cpu (2
/// threads)", "cuda (NVIDIA H200, bf16)").
pub fn train(cfg: &Config, opts: RunOptions) -> Result<String> {
    train_rank(cfg, opts, None)
}

/// `train` as one rank of `world` (None: a process alone).
fn train_rank(cfg: &Config, opts: RunOptions, world: Option<&WorldEnv>) -> Result<String> {
    let RunOptions {
        resume,
        resume_changed,
        overwrite,
        stop_at,
        ..
    } = opts;
    let started = Instant::now();
    cfg.check_data()?;
    let placement = placement(cfg, &opts)?;
    // Only rank 0 writes (and talks): the others read the config, data and checkpoints.
    let writer = world.is_none_or(|w| w.rank.rank == 0);
    let quiet = opts.quiet || !writer;
    if let Some(world) = world {
        check_world(cfg, &placement, world)?;
    }
    if stop_at == Some(0) {
        return Err(Error::user(format!(
            "--stop-at 0: nothing to train; give a step from 1 to max_steps ({})",
            cfg.max_steps
        )));
    }
    let _lock = match writer {
        true => {
            checkpoint::ensure_writable_dir(&cfg.output_dir)?;
            Some(RunLock::acquire(&cfg.output_dir)?)
        }
        false => None,
    };
    let interrupts = Interrupts::install();
    let (mut host, tok, vocab) = checkpoint::model_for_training(cfg)?;
    let pad_id = tok.pad_id();
    let train_set = PromptSet::open(&cfg.train_files, &tok, cfg.max_length)?;
    let eval_set = PromptSet::open(&cfg.eval_files, &tok, cfg.max_length)?;
    if cfg.loss.is_prompt_aware()
        && let Some(i) = (0..train_set.len()).find(|&i| train_set.prompt_type(i).is_none())
    {
        return Err(Error::user(format!(
            "{}: loss `{}` chooses its utility by prompt type, but training prompt {i} has no \
                 `prompt_type`",
            cfg.path.display(),
            cfg.loss_name
        )));
    }
    if placement.use_cuda && (cfg.center_rewards_coefficient != 0.0 || train_set.labelled()) {
        return Err(Error::user(format!(
            "{}: ties (`scores`), `margin` and center_rewards_coefficient train on the CPU \
             only (the CUDA loss kernel does not have them yet): use `device: cpu` or \
             `--device cpu`",
            cfg.path.display()
        )));
    }
    let settings = training_settings(cfg, placement.dtype, train_set.source_sha256s())?;

    let total = host.num_params();
    // A resumed run's AdamW moments [params] each, until they go to the backend.
    let mut moments = None;
    let mut start_step = 0;
    // The newest checkpoint known whole and finite.
    let mut last_good: Option<PathBuf> = None;
    // `--resume-changed` records not yet in metrics.jsonl (kept in checkpoints till then).
    let mut resumed_with_changes = Vec::new();
    if resume {
        let (mut m, mut v) = (vec![0f32; total], vec![0f32; total]);
        let (dir, state) =
            checkpoint::load_newest_verified(&cfg.output_dir, &mut host, &mut m, &mut v)?;
        moments = Some((m, v));
        let state_path = dir.join("trainer_state.json");
        if state.seed != cfg.seed {
            return Err(Error::user(format!(
                "{}: the checkpoint was written with seed {} but the config says {}",
                state_path.display(),
                state.seed,
                cfg.seed
            )));
        }
        resumed_with_changes = state.resumed_with_changes.clone();
        if let Some(saved) = &state.training_settings {
            let changed = changes(saved, &settings);
            if !changed.is_empty() && !resume_changed {
                return Err(Error::user(format!(
                    "{}: --resume with changed training settings: {}; resume with the \
                     settings the checkpoint was written with, or pass --resume-changed to \
                     continue anyway (recorded in metrics.jsonl)",
                    state_path.display(),
                    describe(&changed)
                )));
            }
            if !changed.is_empty() {
                eprintln!(
                    "rcx: warning: --resume-changed: continuing from step {} with changed \
                     training settings: {}",
                    state.step,
                    describe(&changed)
                );
                resumed_with_changes.push(serde_json::json!({
                    "step": state.step,
                    "keys": changed,
                }));
            }
        }
        if state.step > cfg.max_steps {
            return Err(Error::user(format!(
                "{}: the checkpoint is at step {}, past max_steps {}",
                state_path.display(),
                state.step,
                cfg.max_steps
            )));
        }
        if let Some(stop) = stop_at
            && stop <= state.step
        {
            return Err(Error::user(format!(
                "--stop-at {stop}: the run resumes from step {} ({}); give a later step",
                state.step,
                dir.display()
            )));
        }
        start_step = state.step;
        // Evaluations after the checkpoint are about to be run again.
        if writer {
            checkpoint::truncate_metrics(&cfg.output_dir, start_step)?;
        }
        if !quiet {
            eprintln!("resuming from {} (step {})", dir.display(), state.step);
        }
        last_good = Some(dir);
    } else {
        // --overwrite deletes the folder's model files: never those the run starts from.
        let starts_from_output = Path::new(&cfg.model_name)
            .canonicalize()
            .is_ok_and(|model| cfg.output_dir.canonicalize().is_ok_and(|out| out == model));
        if overwrite && starts_from_output {
            return Err(Error::user(format!(
                "{}: output_dir {} is the model folder model_name starts from; --overwrite \
                 would delete it: choose another output_dir",
                cfg.path.display(),
                cfg.output_dir.display()
            )));
        }
        if writer {
            checkpoint::start_fresh(&cfg.output_dir, overwrite)?;
        }
    }
    if writer {
        checkpoint::remove_partial_saves(&cfg.output_dir)?;
    }
    let (hidden_p, attention_p) = (
        cfg.dropout.unwrap_or(host.config.hidden_dropout_prob),
        cfg.dropout
            .unwrap_or(host.config.attention_probs_dropout_prob),
    );
    let device = world.map_or(0, |w| w.rank.local_rank);
    let mut engine = choose_engine(host, &placement, cfg.shared_prefix, device)?;
    let mut ranks = match (world, &mut engine) {
        (Some(world), Engine::Cuda(model)) => {
            let ranks = DataParallel::join(world, model.backend.runtime(), opts.dist_timeout)?;
            if cfg.zero_stage == 1 {
                ranks.shard_optimizer(&mut model.backend)?;
            }
            // MiB of f32 gradients, as DDP's bucket_cap_mb.
            let bucket_len = (cfg.bucket_mb * 1024.0 * 1024.0 / 4.0).ceil() as usize;
            ranks.overlap_gradients(&mut model.backend, bucket_len)?;
            Some(ranks)
        }
        (Some(_), Engine::Cpu(_)) => {
            return Err(Error::internal(
                "a run on several processes placed on the CPU",
            ));
        }
        (None, _) => None,
    };
    if let Some((m, v)) = moments.take() {
        engine.upload_moments(&m, &v)?;
    }
    if let Some(ranks) = &mut ranks {
        let fingerprint = engine.with_weights(|weights, m, v| {
            start_fingerprint(
                &settings_sha256(&settings),
                start_step,
                weights.params,
                m,
                v,
            )
        })?;
        ranks.check_same_start(fingerprint)?;
    }
    if !quiet {
        eprintln!(
            "training {} ({} parameters) on {}",
            cfg.model_name,
            total,
            engine.name()
        );
    }

    let mut order = DataOrder::new(cfg.seed, train_set.len());
    let accum = cfg.gradient_accumulation_steps;
    let per_step = cfg.per_device_train_batch_size * accum;
    let end_step = stop_at.map_or(cfg.max_steps, |s| s.min(cfg.max_steps));
    let loop_started = Instant::now();
    let mut recent_loss = 0.0;
    // From the final evaluation, for the final save (`crate::reward_norm`).
    let mut final_reward_stats = None;

    for step in start_step..end_step {
        if let Some(signal) = interrupts.received() {
            return Err(interrupted(cfg, signal, step, last_good.as_deref(), writer));
        }
        let lr = learning_rate(cfg, step);
        // This rank's share of the step's micro-batches, each as a process alone takes it.
        let share = ranks.as_ref().map_or(0..accum, |r| r.share(accum));
        let micros: Vec<Micro> = share
            .map(|micro| {
                let first = step * per_step + micro * cfg.per_device_train_batch_size;
                let prompts: Vec<usize> = (first..first + cfg.per_device_train_batch_size)
                    .map(|p| order.at(p))
                    .collect();
                let (batch, ks, types) = train_set.batch(&prompts, pad_id);
                let (scores, margins) = train_set.pair_labels(&prompts);
                let dropout = (hidden_p > 0.0 || attention_p > 0.0).then(|| Dropout {
                    hidden: hidden_p,
                    attention: attention_p,
                    seed: derive_seed(cfg.seed, &[STREAM_DROPOUT, step as u64, micro as u64]),
                });
                Micro {
                    batch,
                    ks,
                    types,
                    dropout,
                    scores,
                    margins,
                }
            })
            .collect();
        let micro_batches: Vec<MicroBatch> = micros
            .iter()
            .map(|mb| MicroBatch {
                batch: &mb.batch,
                ks: &mb.ks,
                types: &mb.types,
                dropout: mb.dropout,
            })
            .collect();
        let extras: Vec<LossExtras> = micros
            .iter()
            .map(|mb| LossExtras {
                labels: PairLabels {
                    scores: &mb.scores,
                    margins: &mb.margins,
                },
                center_rewards_coefficient: cfg.center_rewards_coefficient,
            })
            .collect();
        let opt = OptimStep {
            step: step as u64 + 1,
            lr,
            beta1: BETA1,
            beta2: BETA2,
            eps: ADAM_EPS,
            weight_decay: cfg.weight_decay,
            max_grad_norm: cfg.max_grad_norm,
        };
        let StepStats {
            loss: step_loss,
            grad_norm: norm,
        } = engine.train_step(&micro_batches, &extras, cfg, &opt, ranks.as_mut())?;
        let done = step + 1;
        if !step_loss.is_finite() || !norm.is_finite() {
            let what = match step_loss.is_finite() {
                true => "the gradient norm is not finite",
                false => "the loss is not finite",
            };
            return Err(diverged(cfg, done, true, what, last_good.as_deref()));
        }
        // The update itself can overflow with a finite loss and gradient. On the CPU the
        // arenas are at hand, so every step is checked; the device's are checked when they
        // come to the host (before each evaluation and save).
        if engine.host_resident()
            && let Some(what) = engine.with_weights(checkpoint::first_non_finite)?
        {
            return Err(diverged(cfg, done, true, &what, last_good.as_deref()));
        }
        recent_loss = if step == start_step {
            step_loss
        } else {
            0.9 * recent_loss + 0.1 * step_loss
        };

        if !quiet && (done % cfg.logging_steps == 0 || done == end_step) {
            let elapsed = loop_started.elapsed().as_secs_f64();
            let rate = ((done - start_step) * per_step) as f64 / elapsed.max(1e-9);
            let eta = (end_step - done) as f64 * per_step as f64 / rate.max(1e-9);
            progress(done, cfg.max_steps, recent_loss, lr, rate, eta);
        }
        let evaluate = done % cfg.eval_steps == 0 || done == cfg.max_steps;
        // Also at --stop-at, so that --resume continues from there and loses nothing.
        let save = done % cfg.save_steps == 0 || done == cfg.max_steps || done == end_step;
        if !engine.host_resident()
            && (evaluate || save)
            && let Some(what) = engine.with_weights(checkpoint::first_non_finite)?
        {
            return Err(diverged(cfg, done, false, &what, last_good.as_deref()));
        }
        if evaluate {
            let logits = score_set(
                |batch| match interrupts.received() {
                    Some(signal) => {
                        Err(interrupted(cfg, signal, done, last_good.as_deref(), writer))
                    }
                    None => engine.forward_eval(batch),
                },
                &eval_set,
                cfg.eval_max_prompts,
                8,
                pad_id,
            )?;
            let scores = prompt_scores(&eval_set, &logits);
            if done == cfg.max_steps {
                final_reward_stats = crate::reward_norm::final_stats(&logits);
            }
            let loss = eval_loss(&scores, &eval_set, cfg)?;
            let report = summarize(&scores, Some((&cfg.loss, cfg.eps)))?;
            let line = MetricsLine {
                step: done,
                train_loss: step_loss,
                learning_rate: lr,
                eval_loss: loss,
                elapsed_s: started.elapsed().as_secs_f64(),
                report: &report,
                resumed_with_changes: std::mem::take(&mut resumed_with_changes),
            };
            if writer {
                checkpoint::append_metrics(&cfg.output_dir, &line)?;
            }
            if !quiet {
                end_progress_line();
                eprintln!("{}", eval_summary_line(done, loss, &report));
            }
        }
        if save {
            let state = TrainState {
                step: done,
                seed: cfg.seed,
                training_settings_sha256: Some(settings_sha256(&settings)),
                training_settings: Some(settings.clone()),
                resumed_with_changes: resumed_with_changes.clone(),
                files: Default::default(),
            };
            // Every rank: gathering ZeRO-1's moments takes them all; the writer writes.
            let saved = engine.with_weights(|weights, m, v| match writer {
                true => checkpoint::save_checkpoint(cfg, weights, &vocab, m, v, &state).map(Some),
                false => Ok(None),
            })??;
            last_good = saved.or(last_good);
        }
    }
    if end_step == cfg.max_steps {
        engine.with_weights(|weights, m, v| {
            match checkpoint::first_non_finite(weights, m, v) {
                Some(what) => Err(diverged(cfg, end_step, false, &what, last_good.as_deref())),
                None if writer => checkpoint::save_final(cfg, weights, &vocab),
                None => Ok(()),
            }
        })??;
        // The statistics join the final config.json, replaced whole (`reward_norm::write`).
        if writer && let Some(stats) = &final_reward_stats {
            crate::reward_norm::write(&cfg.output_dir, stats)?;
        }
    }
    if let Some(ranks) = ranks {
        // Every rank waits for rank 0's final save; a rank ending now is no lost peer.
        ranks.finish(opts.dist_timeout)?;
    }
    if !quiet {
        end_progress_line();
        eprintln!(
            "done: {} steps in {:.1}s; model in {}",
            end_step - start_step,
            started.elapsed().as_secs_f64(),
            cfg.output_dir.display()
        );
    }
    Ok(engine.name())
}

/// A one-line human summary of an evaluation.
pub fn eval_summary_line(step: usize, loss: f64, r: &EvalReport) -> String {
    let mut s = format!(
        "eval @ step {step}: loss {loss:.4}  pairwise acc {:.3}",
        r.pairwise_accuracy
    );
    if let Some(open) = r.for_type("open") {
        s += &format!("  open acc {:.3}", open.pairwise_accuracy);
    }
    if let Some(closed) = r.for_type("closed") {
        s += &format!(
            "  closed acc {:.3} (ties {:.3}, long-vs-short {:.3})",
            closed.pairwise_accuracy, closed.tie_rate, closed.cross_half_accuracy
        );
    }
    if let Some(gap) = r.collapse_gap {
        s += &format!("  collapse gap {gap:.3}");
    }
    s
}
