//! One training step of the MiniLM-L6 reward model on the CPU: forward, ranking loss
//! (x_inv, eps 0.1), backward, global gradient norm with clipping, AdamW over every
//! parameter; dropout 0.1 on (hidden and attention probabilities, as HF in training).
//! Two configurations of the same 8 completions (one prompt, all 28 ranked pairs):
//!   all-pairs: each completion through the encoder once (8 sequences of 128 tokens);
//!   paper:     both sides of every pair through the encoder (56 sequences), as the
//!              authors' code did, the same loss on the 28 pair rewards.
//!
//! Usage: cargo bench --bench train_step -- [--config all-pairs|paper] [--steps N]
//!        [--warmup N] [--model DIR]
//! Without --config each configuration runs in a fresh process of this binary, so that
//! the peak resident memory (VmHWM) of one does not mask the other's. Each process prints
//! one `RESULT key=value ...` line; scripts/bench-cpu.sh reads those.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use rcx::backend::OptimStep;
use rcx::backend::cpu::Cpu;
use rcx::checkpoint::load_model_dir;
use rcx::loss::{LossSpec, PromptType, Utility};
use rcx::models::{Batch, Dropout, MicroBatch, Model};
use rcx::rng::{Rng, derive_seed};

const COMPLETIONS: usize = 8;
const SEQ_LEN: usize = 128;
const DROPOUT: f64 = 0.1;
const EPS: f64 = 0.1;
const LR: f64 = 2e-5;
const WEIGHT_DECAY: f64 = 0.01;
const MAX_GRAD_NORM: f64 = 1.0;

struct Options {
    config: Option<String>,
    steps: usize,
    warmup: usize,
    model: PathBuf,
}

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        config: None,
        steps: 10,
        warmup: 2,
        model: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".models/all-MiniLM-L6-v2"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        let count = |name: &str, v: String| {
            v.parse::<usize>()
                .map_err(|_| format!("{name}: expected a count, got `{v}`"))
        };
        match arg.as_str() {
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            "--config" => opts.config = Some(value("--config")?),
            "--steps" => opts.steps = count("--steps", value("--steps")?)?.max(1),
            "--warmup" => opts.warmup = count("--warmup", value("--warmup")?)?,
            "--model" => opts.model = PathBuf::from(value("--model")?),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(opts)
}

/// Peak resident set size of this process in MiB (VmHWM of /proc/self/status).
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// CPU time (user + system, all threads) of this process so far, in ms: on a shared machine
/// it shows the work done, which wall time mixes with waiting for a core.
fn cpu_time_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        // The kernel's USER_HZ is 100 on Linux.
        (Some(user), Some(system)) => (user + system) * 10.0,
        _ => f64::NAN,
    }
}

/// The encoder batch, prompt sizes and types of one configuration. Completions are random
/// token ids (no padding); `paper` lays out pair p as sequences 2p (better) and 2p+1.
fn make_batch(config: &str, vocab: usize) -> Result<(Batch, Vec<usize>), String> {
    let mut rng = Rng::new(7);
    let completions: Vec<Vec<u32>> = (0..COMPLETIONS)
        .map(|_| {
            (0..SEQ_LEN)
                .map(|_| (1000 + rng.below(vocab - 1000)) as u32)
                .collect()
        })
        .collect();
    let types = vec![0u8; SEQ_LEN];
    let (order, ks): (Vec<usize>, Vec<usize>) = match config {
        "all-pairs" => ((0..COMPLETIONS).collect(), vec![COMPLETIONS]),
        "paper" => {
            let mut order = Vec::new();
            for i in 0..COMPLETIONS {
                for j in i + 1..COMPLETIONS {
                    order.extend([i, j]);
                }
            }
            let pairs = order.len() / 2;
            (order, vec![2; pairs])
        }
        other => return Err(format!("unknown config `{other}`: all-pairs or paper")),
    };
    let batch = Batch::from_sequences(
        order
            .iter()
            .map(|&i| (completions[i].as_slice(), types.as_slice())),
        0,
    );
    Ok((batch, ks))
}

/// One full training step (`Model::train_step`, the trainer's own); returns the loss.
fn train_step(model: &mut Model<Cpu<f32>>, batch: &Batch, ks: &[usize], step: u64) -> f32 {
    let spec = LossSpec::Single(Utility::XInv);
    let types = vec![Some(PromptType::Open); ks.len()];
    let micro = MicroBatch {
        batch,
        ks,
        types: &types,
        dropout: Some(Dropout {
            hidden: DROPOUT,
            attention: DROPOUT,
            seed: derive_seed(1, &[step]),
        }),
    };
    let opt = OptimStep {
        step: step + 1,
        lr: LR,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: WEIGHT_DECAY,
        max_grad_norm: MAX_GRAD_NORM,
    };
    let stats = model
        .train_step(&[micro], &spec, EPS, &opt)
        .expect("a training step");
    stats.loss as f32
}

fn median_of_sorted(xs: &[f64]) -> f64 {
    let mid = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[mid]
    } else {
        0.5 * (xs[mid - 1] + xs[mid])
    }
}

fn run_config(opts: &Options, config: &str) -> Result<(), String> {
    let model = load_model_dir(&opts.model, 0).map_err(|e| e.to_string())?;
    let (batch, ks) = make_batch(config, model.config.vocab_size)?;
    let mut model = model.on_cpu();
    model.start_training().map_err(|e| e.to_string())?;
    let mut times_ms = Vec::with_capacity(opts.steps);
    let mut cpu_ms = Vec::with_capacity(opts.steps);
    let mut loss = 0.0;
    for step in 0..opts.warmup + opts.steps {
        let (started, cpu_started) = (Instant::now(), cpu_time_ms());
        loss = train_step(&mut model, &batch, &ks, step as u64);
        if step >= opts.warmup {
            times_ms.push(started.elapsed().as_secs_f64() * 1e3);
            cpu_ms.push(cpu_time_ms() - cpu_started);
        }
    }
    times_ms.sort_by(f64::total_cmp);
    let median = median_of_sorted(&times_ms);
    cpu_ms.sort_by(f64::total_cmp);
    let cpu_median = median_of_sorted(&cpu_ms);
    println!(
        "RESULT impl=rcx config={config} seqs={} tokens={SEQ_LEN} threads={} steps={} \
         median_ms={median:.1} min_ms={:.1} max_ms={:.1} cpu_ms={cpu_median:.0} peak_mib={:.1} \
         activation_mib={:.1} loss={loss:?}",
        batch.b,
        rayon::current_num_threads(),
        times_ms.len(),
        times_ms[0],
        times_ms[times_ms.len() - 1],
        peak_rss_mib(),
        model.backend.activation_bytes() as f64 / (1024.0 * 1024.0),
    );
    Ok(())
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("train_step: {e}");
            std::process::exit(2);
        }
    };
    if !opts.model.join("model.safetensors").is_file() {
        eprintln!(
            "train_step: no MiniLM-L6 in {} (run scripts/fetch-minilm.sh, or pass --model DIR)",
            opts.model.display()
        );
        std::process::exit(2);
    }
    let result = match &opts.config {
        Some(config) => run_config(&opts, config),
        None => {
            // One fresh process per configuration, for separate peak memory.
            let exe = std::env::current_exe().expect("the bench binary's path");
            let mut failed = None;
            for config in ["all-pairs", "paper"] {
                let status = Command::new(&exe)
                    .args(["--config", config])
                    .args(["--steps", &opts.steps.to_string()])
                    .args(["--warmup", &opts.warmup.to_string()])
                    .arg("--model")
                    .arg(&opts.model)
                    .status();
                if !matches!(status, Ok(s) if s.success()) {
                    failed = Some(format!("the `{config}` run failed: {status:?}"));
                }
            }
            failed.map_or(Ok(()), Err)
        }
    };
    if let Err(e) = result {
        eprintln!("train_step: {e}");
        std::process::exit(1);
    }
}
