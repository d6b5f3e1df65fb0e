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
//! Then a DeBERTa-v3-base-shaped reward model (microsoft/deberta-v3-base's config.json: 12
//! layers, hidden 768, 12 heads, feed-forward 3072, vocabulary 128100, 256 log buckets over
//! 512 relative positions, c2p and p2c with shared keys, the relative embeddings
//! layer-normed, no absolute positions or token types), random weights, dropout 0.1, one
//! prompt with K = 8 completions of 512, all 28 pairs; at most RCX_BENCH_DEBERTA_STEPS timed
//! steps (5) or RCX_BENCH_DEBERTA_SECONDS of them (20), whichever ends first: its kernels
//! meet a GPU for the first time here. `--models` picks what runs (`bert,llama,deberta`,
//! all by default): scripts/gpu-check.sh runs DeBERTa as a part of its own.
//!
//! Time per step: host clock around `Model::train_step` and a synchronize (the step brings its
//! loss and norm back anyway), after warm-up steps; the median of several steps. bf16 runs
//! first (the number compared with PyTorch bf16), each dtype from the same initial weights;
//! each ends with a summary line and a JSON line for scripts/gpu-check.sh, so a timeout keeps
//! the finished ones. That is `cargo bench` (the executable with `--bench`); without a GPU
//! it says it skipped and exits 0. Without `--bench` (as `cargo test` runs it: Cargo.toml
//! has `test = true`) or with `--check` it runs the same code on bert-tiny at sequence 16,
//! a narrowed llama-tiny with a prompt of 8 and K = 3 completions of 4, one step each way (the
//! decoder's two ways must agree on the first loss in f32 and the shared way must run
//! fewer rows), and a narrowed deberta-v3-tiny on K = 4 sequences of 16 (its f32 step's loss
//! and gradient norm must equal the CPU backend's within the f32 step tolerance, 1e-4
//! relative), and without a GPU reruns itself so on the emulated device (tests/emu):
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
use std::time::{Duration, Instant};

use std::sync::Arc;

use rcx::backend::cuda::{Cuda, CudaRuntime};
use rcx::backend::{DType, OptimStep};
use rcx::error::{Error, Result};
use rcx::loss::{LossSpec, PromptType};
use rcx::models::{
    Batch, BertConfig, DebertaConfig, Dropout, HostModel, LlamaConfig, MicroBatch, Model,
};

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
    deberta: DebertaSetup,
}

/// The decoder's model and batch: one prompt with `k` completions.
struct DecoderSetup {
    config: LlamaConfig,
    name: &'static str,
    prompt: usize,
    completion: usize,
    k: usize,
}

/// The DeBERTa model and batch: one prompt with `k` completions of `t` tokens, at most
/// `steps` timed steps or as many as fit in `limit` (at least one).
struct DebertaSetup {
    config: DebertaConfig,
    name: &'static str,
    k: usize,
    t: usize,
    warmup: usize,
    steps: usize,
    limit: Duration,
}

/// Which models a run times (`--models bert,llama,deberta`; all by default).
struct Models {
    bert: bool,
    llama: bool,
    deberta: bool,
}

impl Models {
    /// The value after `--models`, or every model without one; an unknown name is an error.
    fn from_args(args: &[String]) -> std::result::Result<Models, String> {
        let Some(at) = args.iter().position(|a| a == "--models") else {
            return Ok(Models {
                bert: true,
                llama: true,
                deberta: true,
            });
        };
        let list = args
            .get(at + 1)
            .ok_or("--models: expected a list such as bert,llama")?;
        let mut models = Models {
            bert: false,
            llama: false,
            deberta: false,
        };
        for name in list.split(',') {
            match name {
                "bert" => models.bert = true,
                "llama" => models.llama = true,
                "deberta" => models.deberta = true,
                other => {
                    return Err(format!(
                        "--models: unknown model '{other}'; expected some of bert,llama,deberta"
                    ));
                }
            }
        }
        Ok(models)
    }
}

/// microsoft/deberta-v3-base's config.json with random weights: 184 M parameters, 98 M of
/// them the word table.
fn deberta_v3_base_shape() -> DebertaConfig {
    DebertaConfig {
        vocab_size: 128100,
        hidden_size: 768,
        embedding_size: 768,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        intermediate_size: 3072,
        max_position_embeddings: 512,
        type_vocab_size: 0,
        position_biased_input: false,
        layer_norm_eps: 1e-7,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        pooler_dropout: 0.0,
        cls_dropout: 0.1,
        pad_token_id: 0,
        initializer_range: 0.02,
        relative_attention: true,
        // -1 in the file: max_position_embeddings.
        max_relative_positions: 512,
        position_buckets: 256,
        c2p: true,
        p2c: true,
        share_att_key: true,
        norm_rel_ebd: true,
    }
}

/// The smoke run's DeBERTa: deberta-v3-tiny narrowed (2 layers of 2 heads of 32, vocabulary
/// 512) with 8 log buckets, so that sequences of 16 reach the log buckets.
fn smoke_deberta() -> DebertaConfig {
    let mut cfg = DebertaConfig::named("deberta-v3-tiny")
        .expect("a known name")
        .0;
    cfg.vocab_size = 512;
    cfg.hidden_size = 64;
    cfg.embedding_size = 64;
    cfg.intermediate_size = 128;
    cfg.position_buckets = 8;
    cfg
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
    let args: Vec<String> = std::env::args().collect();
    let timing = args.iter().any(|a| a == "--bench");
    let models = match Models::from_args(&args) {
        Ok(models) => models,
        Err(why) => {
            eprintln!("gpu_step: {why}");
            return ExitCode::from(2);
        }
    };
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
            deberta: DebertaSetup {
                config: deberta_v3_base_shape(),
                name: "deberta-v3-base-shape",
                k: 8,
                t: 512,
                warmup: steps_from_env("RCX_BENCH_DEBERTA_WARMUP", 1),
                steps: steps_from_env("RCX_BENCH_DEBERTA_STEPS", 5),
                limit: Duration::from_secs(steps_from_env("RCX_BENCH_DEBERTA_SECONDS", 20) as u64),
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
            deberta: DebertaSetup {
                config: smoke_deberta(),
                name: "smoke deberta",
                k: 4,
                t: 16,
                warmup: 0,
                steps: 1,
                limit: Duration::MAX,
            },
        }
    };
    match run(&setup, &models, !timing) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // "error:" is what scripts/gpu-check.sh's failure excerpts look for.
            eprintln!("gpu_step: error: {e}");
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

/// What `time_steps` measured: the median seconds per step over `timed` steps, the first
/// step's loss and gradient norm, the last loss.
struct Timing {
    median_s: f64,
    timed: usize,
    first_loss: f64,
    first_grad_norm: f64,
    last_loss: f64,
}

/// The AdamW step every run takes (the PyTorch script's settings).
fn optim_step(step: u64) -> OptimStep {
    OptimStep {
        step,
        lr: 1e-5,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
    }
}

/// Median seconds per step over `steps` steps after `warmup`, fewer (at least one) once the
/// timed steps have taken `limit`.
fn time_steps(
    trainer: &mut Model<Cuda>,
    micro: &MicroBatch<'_>,
    spec: &LossSpec,
    warmup: usize,
    steps: usize,
    limit: Duration,
) -> Result<Timing> {
    let mut times = Vec::with_capacity(steps);
    let (mut first_loss, mut first_grad_norm, mut last_loss) = (f64::NAN, f64::NAN, f64::NAN);
    // At least one timed step, whatever RCX_BENCH_*STEPS says.
    for s in 0..warmup + steps.max(1) {
        if times.iter().sum::<f64>() >= limit.as_secs_f64() {
            println!("  time limit of {} s reached", limit.as_secs());
            break;
        }
        let opt = optim_step(s as u64 + 1);
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
            first_grad_norm = stats.grad_norm;
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
        timed: times.len(),
        first_loss,
        first_grad_norm,
        last_loss,
    })
}

/// A model of `config` with random weights (seed 1), its size printed.
fn host_model(config: impl Into<rcx::models::ModelConfig>, name: &str) -> HostModel<f32> {
    let model = HostModel::<f32>::init(config, 1);
    println!("{name} reward model: {} parameters", model.num_params());
    model
}

fn run(setup: &Setup, models: &Models, check: bool) -> Result<()> {
    let Some(rt) = common::device("gpu_step")? else {
        return Ok(());
    };
    let bert = models.bert.then(|| {
        let cfg = BertConfig::named(setup.model).expect("a known name");
        host_model(cfg, setup.model)
    });
    let dec = &setup.decoder;
    let decoder = models
        .llama
        .then(|| host_model(dec.config.clone(), dec.name));
    let deb = &setup.deberta;
    deb.config.validate(deb.name)?;
    let deberta = models
        .deberta
        .then(|| host_model(deb.config.clone(), deb.name));
    // bf16 first (compared with PyTorch's autocast), each model in turn.
    for (dtype, name) in [(DType::Bf16, "bf16"), (DType::F32, "f32")] {
        // One trainer at a time: the pair-duplicated activations take tens of GiB.
        if let Some(model) = &bert {
            bench_dtype(&rt, model, setup, dtype, name)?;
        }
        if let Some(model) = &decoder {
            bench_decoder(&rt, model, setup, dtype, name, check)?;
        }
        if let Some(model) = &deberta {
            bench_deberta(&rt, model, deb, dtype, name, check)?;
        }
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
    let all_pairs = time_steps(
        &mut trainer,
        &micro,
        &spec,
        warmup,
        setup.steps,
        Duration::MAX,
    )?;
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
    let dup = time_steps(
        &mut trainer,
        &micro,
        &spec,
        warmup.min(1),
        setup.dup_steps,
        Duration::MAX,
    )?;
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
        let timing = time_steps(
            &mut trainer,
            &micro,
            &spec,
            setup.warmup,
            setup.steps,
            Duration::MAX,
        )?;
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

/// DeBERTa's step: one prompt, its K completions once (all pairs), dropout 0.1 as BERT's.
/// The smoke run (`check`) trains the same step on the CPU backend from the same weights: in
/// f32 the first loss and gradient norm must equal the CPU's within 1e-4 relative
/// (tests/cuda_model.rs's f32 step tolerance).
fn bench_deberta(
    rt: &Arc<CudaRuntime>,
    model: &HostModel<f32>,
    deb: &DebertaSetup,
    dtype: DType,
    name: &str,
    check: bool,
) -> Result<()> {
    let spec = LossSpec::parse("x_inv")?;
    let mut rng = Rng(2025);
    // [k][t], ids from 1 up: none is the padding (0).
    let completions = sequences(&mut rng, deb.k, deb.t, deb.config.vocab_size as u32);
    let batch = batch_of(&completions.iter().collect::<Vec<_>>());
    let ks = [deb.k];
    let types = [Some(PromptType::Open)];
    let micro = MicroBatch {
        batch: &batch,
        ks: &ks,
        types: &types,
        dropout: Some(Dropout {
            hidden: 0.1,
            attention: 0.1,
            seed: 7,
        }),
    };
    let mut trainer = model.on_cuda(rt.clone(), dtype)?;
    trainer.start_training()?;
    println!(
        "{name} deberta: {} with {} sequences of {}, {} pairs",
        deb.name,
        deb.k,
        deb.t,
        deb.k * (deb.k - 1) / 2
    );
    let timing = time_steps(
        &mut trainer,
        &micro,
        &spec,
        deb.warmup,
        deb.steps,
        deb.limit,
    )?;
    drop(trainer);
    println!(
        "rcx deberta {name} step: {:.1} ms (median of {}), {} sequences of {}, first loss {:.5}",
        timing.median_s * 1e3,
        timing.timed,
        deb.k,
        deb.t,
        timing.first_loss
    );
    println!(
        "{{\"bench\": \"rcx_gpu_deberta_step\", \"model\": \"{}\", \"dtype\": \"{name}\", \
         \"params\": {}, \"step_ms\": {:.3}, \"steps\": {}, \"sequences\": {}, \"t\": {}, \
         \"first_loss\": {:.6}, \"last_loss\": {:.6}}}",
        deb.name,
        model.num_params(),
        timing.median_s * 1e3,
        timing.timed,
        deb.k,
        deb.t,
        timing.first_loss,
        timing.last_loss
    );
    if check && dtype == DType::F32 {
        let host = HostModel {
            config: model.config.clone(),
            layout: model.layout.clone(),
            params: model.params.clone(),
        };
        let mut cpu = host.on_cpu();
        cpu.start_training()?;
        let stats = cpu.train_step(&[micro], &spec, 0.01, &optim_step(1))?;
        for (what, gpu, cpu) in [
            ("loss", timing.first_loss, stats.loss),
            ("gradient norm", timing.first_grad_norm, stats.grad_norm),
        ] {
            if !((gpu - cpu).abs() <= 1e-4 * cpu.abs() && gpu.is_finite()) {
                return Err(Error::internal(format!(
                    "deberta f32: first step's {what} {gpu} on the device, {cpu} on the CPU \
                     (relative tolerance 1e-4)"
                )));
            }
        }
        println!(
            "deberta f32: first loss {:.6} and gradient norm {:.6} equal the CPU's",
            stats.loss, stats.grad_norm
        );
    }
    Ok(())
}
