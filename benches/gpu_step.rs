//! One whole training step of a BERT-base-sized reward model on the GPU (`cargo bench
//! --bench gpu_step`): 12 layers, hidden 768, 12 heads, sequence 512, dropout 0.1, AdamW
//! with clipping, the loss with U = x_inv, in bf16 (fp32 master weights, as PyTorch's
//! autocast baseline) and in f32. A prompt with 8 ranked completions is trained two ways
//! with the same loss value:
//! - all pairs: the 8 completions once, the fused loss over its 28 pairs (8 sequences);
//! - the paper's pair-duplicated way: each of the 28 pairs as its own 2-completion batch
//!   entry (56 sequences), 7x the encoder work.
//!
//! Time per step: host clock around `Model::train_step` and a synchronize (the step brings its
//! loss and norm back anyway), after warm-up steps; the median of several steps. bf16 runs
//! first (the number compared with PyTorch bf16), each dtype from the same initial weights;
//! each ends with a summary line and a JSON line for scripts/gpu-check.sh, so a timeout keeps
//! the finished ones. That is `cargo bench` (the executable with `--bench`); without a GPU
//! it says it skipped and exits 0. Without `--bench` (as `cargo test` runs it: Cargo.toml
//! has `test = true`) or with `--check` it runs the same code on bert-tiny at sequence 16,
//! one step each way, and without a GPU reruns itself so on the emulated device (tests/emu):
//! a smoke run of the bench's own code, timing nothing worth reading.
//! STATUS: compiled, never run on a GPU when written.

// Shared with the kernel lab, which uses all of it.
#[allow(dead_code)]
mod common;
#[path = "../tests/emu/build.rs"]
mod emu_build;
#[path = "../tests/emu/fake_device.rs"]
mod fake_device;

use std::process::ExitCode;
use std::time::Instant;

use std::sync::Arc;

use rcx::backend::cuda::{Cuda, CudaRuntime};
use rcx::backend::{DType, OptimStep};
use rcx::error::{Error, Result};
use rcx::loss::{LossSpec, PromptType};
use rcx::models::{Batch, BertConfig, Dropout, HostModel, MicroBatch, Model};

use common::Rng;

const K: usize = 8;

/// The model, sequence length and step counts of a run: the benchmark's or the smoke run's.
struct Setup {
    model: &'static str,
    t: usize,
    warmup: usize,
    steps: usize,
    dup_steps: usize,
}

fn main() -> ExitCode {
    let timing = std::env::args().any(|a| a == "--bench");
    if !timing && !fake_device::emulated() && rcx::backend::cuda::available().is_err() {
        // Panics (exit 101) when the smoke run fails there.
        fake_device::rerun_on_emulated_device("gpu_step", &["--check"]);
        return ExitCode::SUCCESS;
    }
    let setup = if timing {
        Setup {
            model: "bert-base",
            t: 512,
            warmup: steps_from_env("RCX_BENCH_WARMUP", 2),
            steps: steps_from_env("RCX_BENCH_STEPS", 10),
            dup_steps: steps_from_env("RCX_BENCH_DUP_STEPS", 4),
        }
    } else {
        Setup {
            model: "bert-tiny",
            t: 16,
            warmup: 0,
            steps: 1,
            dup_steps: 1,
        }
    };
    match run(&setup) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpu_step: {e}");
            ExitCode::FAILURE
        }
    }
}

fn steps_from_env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Full-length sequences of random ids (no padding, as the PyTorch script).
fn sequences(rng: &mut Rng, count: usize, t: usize, vocab: u32) -> Vec<Vec<u32>> {
    (0..count)
        .map(|_| rng.below(t, vocab - 1).iter().map(|id| id + 1).collect())
        .collect()
}

fn batch_of(seqs: &[&Vec<u32>]) -> Batch {
    let types = vec![0u8; seqs[0].len()];
    Batch::from_sequences(seqs.iter().map(|s| (&s[..], &types[..])), 0)
}

/// Median seconds per step over `steps` steps after `warmup`.
fn time_steps(
    trainer: &mut Model<Cuda>,
    micro: &MicroBatch<'_>,
    spec: &LossSpec,
    warmup: usize,
    steps: usize,
) -> Result<(f64, f64)> {
    let mut times = Vec::with_capacity(steps);
    let mut last_loss = f64::NAN;
    for s in 0..warmup + steps {
        let opt = OptimStep {
            step: s as u64 + 1,
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
        };
        let started = Instant::now();
        let stats = trainer.train_step(std::slice::from_ref(micro), spec, 0.01, &opt)?;
        trainer.backend.runtime().synchronize()?;
        if !(stats.loss.is_finite() && stats.grad_norm.is_finite()) {
            return Err(Error::internal(format!(
                "step {}: loss {} grad norm {}",
                s + 1,
                stats.loss,
                stats.grad_norm
            )));
        }
        let seconds = started.elapsed().as_secs_f64();
        if s >= warmup {
            times.push(seconds);
        }
        last_loss = stats.loss;
        println!(
            "  step {}: {:.1} ms  loss {:.5}  grad norm {:.4}",
            s + 1,
            seconds * 1e3,
            stats.loss,
            stats.grad_norm
        );
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], last_loss))
}

fn run(setup: &Setup) -> Result<()> {
    let Some(rt) = common::device("gpu_step")? else {
        return Ok(());
    };
    let cfg = BertConfig::named(setup.model).expect("a known name");
    let model = HostModel::<f32>::init(cfg.clone(), 1);
    println!(
        "{} reward model: {} parameters",
        setup.model,
        model.num_params()
    );
    for (dtype, name) in [(DType::Bf16, "bf16"), (DType::F32, "f32")] {
        // One trainer at a time: the pair-duplicated activations take tens of GiB.
        bench_dtype(&rt, &model, setup, dtype, name)?;
    }
    Ok(())
}

fn bench_dtype(
    rt: &Arc<CudaRuntime>,
    model: &HostModel<f32>,
    setup: &Setup,
    dtype: DType,
    name: &str,
) -> Result<()> {
    let (cfg, t, warmup) = (&model.config, setup.t, setup.warmup);
    let mut trainer = model.on_cuda(rt.clone(), dtype)?;
    trainer.start_training()?;
    let spec = LossSpec::parse("x_inv")?;
    let mut rng = Rng(2023);
    let completions = sequences(&mut rng, K, t, cfg.vocab_size as u32);

    // All pairs: one prompt, its K completions once.
    let all = batch_of(&completions.iter().collect::<Vec<_>>());
    let ks = [K];
    let types = [Some(PromptType::Open)];
    let micro = MicroBatch {
        batch: &all,
        ks: &ks,
        types: &types,
        dropout: Some(Dropout {
            hidden: 0.1,
            attention: 0.1,
            seed: 7,
        }),
    };
    println!(
        "{name} all pairs: {K} sequences of {t}, {} pairs",
        K * (K - 1) / 2
    );
    let (all_pairs_s, all_pairs_loss) =
        time_steps(&mut trainer, &micro, &spec, warmup, setup.steps)?;

    // Pair-duplicated: every ranked pair (i < j) as its own two-completion entry.
    let mut pair_seqs = Vec::new();
    for i in 0..K {
        for j in i + 1..K {
            pair_seqs.push(&completions[i]);
            pair_seqs.push(&completions[j]);
        }
    }
    let pairs = pair_seqs.len() / 2;
    let dup = batch_of(&pair_seqs);
    let dup_ks = vec![2; pairs];
    let dup_types = vec![Some(PromptType::Open); pairs];
    let micro = MicroBatch {
        batch: &dup,
        ks: &dup_ks,
        types: &dup_types,
        dropout: Some(Dropout {
            hidden: 0.1,
            attention: 0.1,
            seed: 7,
        }),
    };
    println!(
        "{name} pair-duplicated: {} sequences of {t}, {pairs} pairs",
        2 * pairs
    );
    let (dup_s, dup_loss) =
        time_steps(&mut trainer, &micro, &spec, warmup.min(1), setup.dup_steps)?;

    println!(
        "rcx {name} step: all pairs {:.1} ms, pair-duplicated {:.1} ms ({:.2}x)",
        all_pairs_s * 1e3,
        dup_s * 1e3,
        dup_s / all_pairs_s
    );
    println!(
        "{{\"bench\": \"rcx_gpu_step\", \"dtype\": \"{name}\", \"all_pairs_ms\": {:.3}, \
         \"pair_duplicated_ms\": {:.3}, \"ratio\": {:.3}, \"all_pairs_loss\": {:.6}, \
         \"pair_duplicated_loss\": {:.6}}}",
        all_pairs_s * 1e3,
        dup_s * 1e3,
        dup_s / all_pairs_s,
        all_pairs_loss,
        dup_loss
    );
    Ok(())
}
