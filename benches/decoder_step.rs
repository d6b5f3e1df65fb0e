//! One training step of a decoder reward model on the CPU, with and without the shared
//! prefix: one prompt of 384 tokens with K = 8 completions of 64 tokens, the x_inv ranking
//! loss over all 28 pairs (eps 0.1), backward, clipping to 1.0, AdamW. The model and the
//! token ids come from the folder scripts/bench_torch_decoder_cpu.py writes, so PyTorch
//! runs the same weights on the same batch (its first loss equals rcx's).
//!   shared: the prompt once, the 8 completions attending to its keys and values;
//!   full:   the 8 whole sequences of 448 tokens, as transformers runs them.
//!
//! Usage: cargo bench --bench decoder_step -- --folder DIR --config shared|full
//!        [--steps N] [--warmup N]
//! Prints one `RESULT key=value ...` line; scripts/bench-decoder-cpu.sh runs each
//! configuration in a fresh process (for its own peak memory) and compares.

use std::path::PathBuf;
use std::time::Instant;

use rcx::backend::OptimStep;
use rcx::backend::cpu::Cpu;
use rcx::checkpoint::load_model_dir;
use rcx::loss::{LossSpec, PromptType, Utility};
use rcx::models::{Batch, MicroBatch, Model};

const EPS: f64 = 0.1;
const LR: f64 = 2e-5;
const WEIGHT_DECAY: f64 = 0.01;
const MAX_GRAD_NORM: f64 = 1.0;

struct Options {
    folder: PathBuf,
    shared: bool,
    steps: usize,
    warmup: usize,
}

fn parse_args() -> Result<Options, String> {
    let (mut folder, mut shared) = (None, None);
    let (mut steps, mut warmup) = (3, 1);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        let count = |name: &str, v: String| {
            v.parse::<usize>()
                .map_err(|_| format!("{name}: expected a count, found `{v}`"))
        };
        match arg.as_str() {
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            "--folder" => folder = Some(PathBuf::from(value("--folder")?)),
            "--config" => {
                shared = Some(match value("--config")?.as_str() {
                    "shared" => true,
                    "full" => false,
                    other => return Err(format!("--config: `{other}`: shared or full")),
                })
            }
            "--steps" => steps = count("--steps", value("--steps")?)?.max(1),
            "--warmup" => warmup = count("--warmup", value("--warmup")?)?,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(Options {
        folder: folder.ok_or("--folder DIR is needed")?,
        shared: shared.ok_or("--config shared|full is needed")?,
        steps,
        warmup,
    })
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

/// The prompt + completion sequences of bench_batch.json, grouped as one prompt's.
fn read_batch(opts: &Options) -> Result<Batch, String> {
    let path = opts.folder.join("bench_batch.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let ids = |v: &serde_json::Value| -> Option<Vec<u32>> {
        v.as_array()?
            .iter()
            .map(|x| x.as_u64().map(|x| x as u32))
            .collect()
    };
    let prompt = ids(&json["prompt"]).ok_or("bench_batch.json: no prompt")?;
    let seqs: Vec<Vec<u32>> = json["completions"]
        .as_array()
        .ok_or("bench_batch.json: no completions")?
        .iter()
        .map(|c| ids(c).map(|c| [prompt.clone(), c].concat()))
        .collect::<Option<_>>()
        .ok_or("bench_batch.json: a completion is not a list of ids")?;
    let types: Vec<Vec<u8>> = seqs.iter().map(|s| vec![0; s.len()]).collect();
    let k = seqs.len();
    Ok(Batch::from_sequences(
        seqs.iter()
            .map(|s| &s[..])
            .zip(types.iter().map(|t| &t[..])),
        0,
    )
    .grouped(vec![k]))
}

fn train_step(model: &mut Model<Cpu<f32>>, batch: &Batch, step: u64) -> f64 {
    let ks = [batch.b];
    let types = [Some(PromptType::Open)];
    let micro = MicroBatch {
        batch,
        ks: &ks,
        types: &types,
        dropout: None,
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
    let spec = LossSpec::Single(Utility::XInv);
    model
        .train_step(&[micro], &spec, EPS, &opt)
        .expect("a training step")
        .loss
}

fn run(opts: &Options) -> Result<(), String> {
    let batch = read_batch(opts)?;
    let mut model = load_model_dir(&opts.folder, 0)
        .map_err(|e| e.to_string())?
        .on_cpu();
    model.set_shared_prefix(opts.shared);
    model.start_training().map_err(|e| e.to_string())?;
    let mut times_ms = Vec::with_capacity(opts.steps);
    let mut first_loss = f64::NAN;
    for step in 0..opts.warmup + opts.steps {
        let started = Instant::now();
        let loss = train_step(&mut model, &batch, step as u64);
        if step == 0 {
            first_loss = loss;
        }
        if step >= opts.warmup {
            times_ms.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    times_ms.sort_by(f64::total_cmp);
    let median = times_ms[times_ms.len() / 2];
    println!(
        "RESULT impl=rcx config={} seqs={} rows={} threads={} steps={} median_ms={median:.1} \
         min_ms={:.1} max_ms={:.1} peak_mib={:.1} activation_mib={:.1} first_loss={first_loss:.6}",
        if opts.shared { "shared" } else { "full" },
        batch.b,
        model.last_rows().map_err(|e| e.to_string())?,
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
    match parse_args().and_then(|opts| run(&opts)) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("decoder_step: {e}");
            std::process::exit(2);
        }
    }
}
