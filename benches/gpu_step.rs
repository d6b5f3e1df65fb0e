//! One whole training step of a BERT-base-sized reward model on the GPU (`cargo bench
//! --bench gpu_step`): 12 layers, hidden 768, 12 heads, sequence 512, dropout 0.1, AdamW
//! with clipping, the loss with U = x_inv, in bf16 (fp32 master weights, as PyTorch's
//! autocast baseline) and in f32. A prompt with 8 ranked completions is trained two ways
//! with the same loss value:
//! - all pairs: the 8 completions once, the fused loss over its 28 pairs (8 sequences);
//! - the paper's pair-duplicated way: each of the 28 pairs as its own 2-completion batch
//!   entry (56 sequences), 7x the encoder work.
//!
//! Then a Llama-shaped decoder reward model, Llama 3.2 1B's shape (16 layers, hidden 2048,
//! 32 query heads over 8 key/value heads of 64, SwiGLU 8192, RMSNorm, RoPE theta 500000,
//! vocabulary 128256: its real table, so AdamW updates its 1.24 B parameters, a fifth of
//! them the embedding), no dropout (as Llama), one prompt of 384 tokens with K = 8
//! completions of 128, all 28 pairs, timed two ways from the same initial weights:
//! - shared prefix (the default): the prompt once, the completions attending to its keys
//!   and values (384 + 8 x 128 = 1408 token rows);
//! - whole sequences: the 8 sequences of 512 (4096 rows), as transformers runs them.
//!
//! Time per step: host clock around `Model::train_step` and a synchronize (the step brings its
//! loss and norm back anyway), after warm-up steps; the median of several steps. bf16 runs
//! first (the number compared with PyTorch bf16), each dtype from the same initial weights;
//! each ends with a summary line and a JSON line for scripts/gpu-check.sh, so a timeout keeps
//! the finished ones. That is `cargo bench` (the executable with `--bench`); without a GPU
//! it says it skipped and exits 0. Without `--bench` (as `cargo test` runs it: Cargo.toml
//! has `test = true`) or with `--check` it runs the same code on bert-tiny at sequence 16
//! and a narrowed llama-tiny with a prompt of 8 and K = 3 completions of 4, one step each way (the
//! decoder's two ways must agree on the first loss in f32 and the shared way must run
//! fewer rows), and without a GPU reruns itself so on the emulated device (tests/emu):
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
use rcx::models::{Batch, BertConfig, Dropout, HostModel, LlamaConfig, MicroBatch, Model};

use common::Rng;

const K: usize = 8;

/// The model, sequence length and step counts of a run: the benchmark's or the smoke run's.
struct Setup {
    model: &'static str,
    t: usize,
    warmup: usize,
    steps: usize,
    dup_steps: usize,
    decoder: DecoderSetup,
}

/// The decoder's model and batch: one prompt with `k` completions.
struct DecoderSetup {
    config: LlamaConfig,
    name: &'static str,
    prompt: usize,
    completion: usize,
    k: usize,
}

/// The smoke run's decoder: llama-tiny narrowed (2 layers, 2 query heads of 32 over one
/// key/value head, vocabulary 512) so the emulated device runs it in seconds.
fn smoke_decoder() -> LlamaConfig {
    let mut cfg = LlamaConfig::named("llama-tiny").expect("a known name").0;
    cfg.vocab_size = 512;
    cfg.hidden_size = 64;
    cfg.intermediate_size = 128;
    cfg.num_attention_heads = 2;
    cfg.num_key_value_heads = 1;
    cfg.head_dim = 32;
    cfg
}

/// Llama 3.2 1B's shape with random weights (its llama3 rope scaling left out: at 512
/// positions it only changes the frequencies, not the work).
fn llama_1b_shape() -> LlamaConfig {
    let mut cfg = LlamaConfig::named("llama-tiny").expect("a known name").0;
    cfg.vocab_size = 128256;
    cfg.hidden_size = 2048;
    cfg.intermediate_size = 8192;
    cfg.num_hidden_layers = 16;
    cfg.num_attention_heads = 32;
    cfg.num_key_value_heads = 8;
    cfg.head_dim = 64;
    cfg.rope_theta = 500000.0;
    cfg.max_position_embeddings = 512;
    cfg
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
            decoder: DecoderSetup {
                config: llama_1b_shape(),
                name: "llama-1b-shape",
                prompt: 384,
                completion: 128,
                k: 8,
            },
        }
    } else {
        Setup {
            model: "bert-tiny",
            t: 16,
            warmup: 0,
            steps: 1,
            dup_steps: 1,
            decoder: DecoderSetup {
                config: smoke_decoder(),
                name: "smoke decoder",
                prompt: 8,
                completion: 4,
                k: 3,
            },
        }
    };
    match run(&setup, !timing) {
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

/// What `time_steps` measured: the median seconds per step, the first and last losses.
struct Timing {
    median_s: f64,
    first_loss: f64,
    last_loss: f64,
}

/// Median seconds per step over `steps` steps after `warmup`.
fn time_steps(
    trainer: &mut Model<Cuda>,
    micro: &MicroBatch<'_>,
    spec: &LossSpec,
    warmup: usize,
    steps: usize,
) -> Result<Timing> {
    let mut times = Vec::with_capacity(steps);
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
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
        if s == 0 {
            first_loss = stats.loss;
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
    Ok(Timing {
        median_s: times[times.len() / 2],
        first_loss,
        last_loss,
    })
}

fn run(setup: &Setup, check: bool) -> Result<()> {
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
    let dec = &setup.decoder;
    let decoder = HostModel::<f32>::init(dec.config.clone(), 1);
    println!(
        "{} reward model: {} parameters",
        dec.name,
        decoder.num_params()
    );
    // bf16 first (compared with PyTorch's autocast), each model in turn.
    for (dtype, name) in [(DType::Bf16, "bf16"), (DType::F32, "f32")] {
        // One trainer at a time: the pair-duplicated activations take tens of GiB.
        bench_dtype(&rt, &model, setup, dtype, name)?;
        bench_decoder(&rt, &decoder, setup, dtype, name, check)?;
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
    let all_pairs = time_steps(&mut trainer, &micro, &spec, warmup, setup.steps)?;
    let (all_pairs_s, all_pairs_loss) = (all_pairs.median_s, all_pairs.last_loss);

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
    let dup = time_steps(&mut trainer, &micro, &spec, warmup.min(1), setup.dup_steps)?;
    let (dup_s, dup_loss) = (dup.median_s, dup.last_loss);

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

/// The decoder's step with the shared prefix and on the whole sequences, each from the same
/// initial weights (a fresh upload), so their first losses are the same number.
fn bench_decoder(
    rt: &Arc<CudaRuntime>,
    model: &HostModel<f32>,
    setup: &Setup,
    dtype: DType,
    name: &str,
    check: bool,
) -> Result<()> {
    let dec = &setup.decoder;
    let spec = LossSpec::parse("x_inv")?;
    let mut rng = Rng(2024);
    // Ids from 3 up: none is the padding (2), BOS or EOS, as the PyTorch script's.
    let vocab = dec.config.vocab_size as u32;
    let mut tokens =
        |len: usize| -> Vec<u32> { rng.below(len, vocab - 3).iter().map(|id| id + 3).collect() };
    let prompt = tokens(dec.prompt);
    // [k][prompt + completion]
    let seqs: Vec<Vec<u32>> = (0..dec.k)
        .map(|_| [prompt.clone(), tokens(dec.completion)].concat())
        .collect();
    let types = vec![0u8; dec.prompt + dec.completion];
    let batch = Batch::from_sequences(
        seqs.iter().map(|s| (&s[..], &types[..])),
        dec.config.padding_id(),
    )
    .grouped(vec![dec.k]);
    let ks = [dec.k];
    let prompt_types = [Some(PromptType::Open)];
    let micro = MicroBatch {
        batch: &batch,
        ks: &ks,
        types: &prompt_types,
        dropout: None,
    };
    let mut measured = Vec::new();
    for (shared, way) in [(true, "shared prefix"), (false, "whole sequences")] {
        let mut trainer = model.on_cuda(rt.clone(), dtype)?;
        trainer.set_shared_prefix(shared);
        trainer.start_training()?;
        println!(
            "{name} decoder, {way}: {} prompt of {} with {} completions of {}, {} pairs",
            dec.name,
            dec.prompt,
            dec.k,
            dec.completion,
            dec.k * (dec.k - 1) / 2
        );
        let timing = time_steps(&mut trainer, &micro, &spec, setup.warmup, setup.steps)?;
        measured.push((timing, trainer.last_rows()?));
    }
    let [(shared, shared_rows), (whole, whole_rows)] = &measured[..] else {
        unreachable!("two ways measured")
    };
    println!(
        "rcx llama {name} step: shared prefix {:.1} ms, whole sequences {:.1} ms ({:.2}x), \
         rows {shared_rows} vs {whole_rows}",
        shared.median_s * 1e3,
        whole.median_s * 1e3,
        whole.median_s / shared.median_s
    );
    println!(
        "{{\"bench\": \"rcx_gpu_decoder_step\", \"model\": \"{}\", \"dtype\": \"{name}\", \
         \"shared_prefix_ms\": {:.3}, \"whole_sequences_ms\": {:.3}, \"ratio\": {:.3}, \
         \"shared_prefix_rows\": {shared_rows}, \"whole_sequences_rows\": {whole_rows}, \
         \"shared_prefix_first_loss\": {:.6}, \"whole_sequences_first_loss\": {:.6}}}",
        dec.name,
        shared.median_s * 1e3,
        whole.median_s * 1e3,
        whole.median_s / shared.median_s,
        shared.first_loss,
        whole.first_loss
    );
    if check {
        // The smoke run's own checks: the shared layout ran, and (f32) gave the same loss.
        if shared_rows >= whole_rows {
            return Err(Error::internal(format!(
                "decoder {name}: the shared prefix ran {shared_rows} rows, the whole sequences {whole_rows}"
            )));
        }
        let gap = (shared.first_loss - whole.first_loss).abs();
        if dtype == DType::F32 && gap > 1e-4 * whole.first_loss.abs().max(1.0) {
            return Err(Error::internal(format!(
                "decoder f32: first loss {} with the shared prefix, {} on the whole sequences",
                shared.first_loss, whole.first_loss
            )));
        }
    }
    Ok(())
}
