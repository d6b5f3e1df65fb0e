//! The kernel lab (`cargo bench --bench kernels`), in llm.c's spirit: every CUDA kernel is
//! first checked against its CPU twin on fresh random non-zero inputs (outputs poisoned
//! with NaN), then timed at BERT-base sizes (B=8, T=512, C=768, 12 heads, I=3072; the
//! optimizer over 110M parameters): CUDA events, warm-up, median of many runs, input sets
//! rotated so that the working set exceeds L2. Each line prints the achieved GB/s (bytes:
//! every input read once, every output written once) or TFLOP/s beside the device's
//! measured ceilings: a 1 GiB device-to-device copy and cuBLAS GEMMs of 8192³ (SGEMM for
//! the f32 kernels, bf16 in with fp32 accumulation for the bf16 ones).
//!
//! `cargo bench` (the executable with `--bench`) checks and times. Without `--bench` (as
//! `cargo test` runs it: Cargo.toml has `test = true`) or with `--check` it only checks, and
//! without a GPU it reruns itself that way on the emulated device (tests/emu), so CI runs
//! every check of the lab. A bench run without a GPU says it skipped and exits 0; a failed
//! check exits 1.
//! STATUS: compiled, never run on a GPU when written.

mod common;
#[path = "../tests/emu/build.rs"]
mod emu_build;
#[path = "../tests/emu/fake_device.rs"]
mod fake_device;

use std::process::ExitCode;

use cudarc::driver::CudaSlice;
use half::bf16;
use rcx::backend::cpu;
use rcx::backend::cuda::deberta_ops::{DevicePositionGrads, DevicePositionTerms};
use rcx::backend::cuda::decoder_ops::{CausalKernels, CausalPrefix, CausalPrefixGrads};
use rcx::backend::cuda::{
    self as cuda, Activation, AdamWStep, CudaRuntime, FlashKernels, RankingBatch, TokenBatch,
};
use rcx::error::{Error, Result};
use rcx::loss::{LossSpec, PromptType, ranking_loss_forward_backward};
use rcx::models::{BertConfig, ParamLayout};

use common::{Rng, median_ms};

/// BERT-base at sequence 512, 8 completions.
const B: usize = 8;
const T: usize = 512;
const C: usize = 768;
const NH: usize = 12;
const HS: usize = 64;
const I: usize = 3072;
const N: usize = B * T;
/// Validation shapes: odd, padded, small enough for the CPU twin.
const CB: usize = 3;
const CT: usize = 37;
const CN: usize = CB * CT;

const WARMUP: usize = 5;
const REPS: usize = 30;
/// Rotate input sets until they span this many bytes (H200's L2 is 50 MB).
const ROTATE_BYTES: usize = 256 << 20;

/// ‖gpu − cpu‖ / ‖cpu‖ above which a check fails (f32 arithmetic lands far under).
const F32_TOLERANCE: f64 = 1e-4;
/// The same for bf16 activations against the CPU on the same (rounded) inputs: each stored
/// bf16 value is off by up to 2^-9 relatively, and version 3 of attention also rounds its
/// probabilities and their gradients to bf16 before they multiply (with few real keys an
/// element's error reaches a few percent of the mean; a wrong tile or index is off by O(1)).
const BF16_TOLERANCE: f64 = 2e-2;

enum Rate {
    Bytes(f64),
    /// FLOPs of an f32 kernel, against SGEMM.
    Flops(f64),
    /// FLOPs of a bf16 kernel, against the bf16 GEMM.
    Bf16Flops(f64),
    Launch,
}

struct Lab {
    rt: std::sync::Arc<CudaRuntime>,
    rng: Rng,
    copy_gbs: f64,
    sgemm_tflops: f64,
    bf16_gemm_tflops: f64,
    failures: Vec<String>,
    rows: Vec<String>,
    /// The checks against the CPU only, no ceilings and no timing (fast enough for the
    /// emulated device).
    check_only: bool,
}

fn sets_for(bytes_per_set: usize) -> usize {
    ROTATE_BYTES.div_ceil(bytes_per_set.max(1)).clamp(1, 16)
}

fn rel_error(gpu: &[f32], cpu: &[f32]) -> f64 {
    if gpu.len() != cpu.len() {
        return f64::INFINITY;
    }
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&g, &c) in gpu.iter().zip(cpu) {
        diff += (g as f64 - c as f64).powi(2);
        norm += (c as f64).powi(2);
    }
    let err = (diff / norm.max(1e-300)).sqrt();
    if err.is_nan() { f64::INFINITY } else { err }
}

impl Lab {
    fn up(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        self.rt.upload(host)
    }

    fn down(&self, device: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.rt.download(device)
    }

    fn nan(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.rt.upload(&vec![f32::NAN; len])
    }

    /// `sets` device copies of fresh random values.
    fn random_sets(&mut self, len: usize, scale: f32, sets: usize) -> Result<Vec<CudaSlice<f32>>> {
        let host = self.rng.values(len, scale);
        (0..sets).map(|_| self.up(&host)).collect()
    }

    fn check(&mut self, name: &str, parts: &[(&str, Vec<f32>, Vec<f32>)]) -> f64 {
        self.check_within(name, parts, F32_TOLERANCE)
    }

    fn check_within(
        &mut self,
        name: &str,
        parts: &[(&str, Vec<f32>, Vec<f32>)],
        tolerance: f64,
    ) -> f64 {
        let mut worst = 0.0f64;
        for (part, gpu, cpu) in parts {
            let err = rel_error(gpu, cpu);
            if self.check_only {
                println!("{name} {part}: relative error {err:.1e}");
            }
            if err > tolerance {
                self.failures
                    .push(format!("{name} {part}: relative error {err:.2e}"));
            }
            worst = worst.max(err);
        }
        worst
    }

    fn row(&mut self, name: &str, shape: &str, err: f64, ms: f64, rate: Rate) {
        let achieved = match rate {
            Rate::Bytes(bytes) => {
                let gbs = bytes / (ms * 1e-3) / 1e9;
                format!(
                    "{gbs:8.1} GB/s  {:5.1}% of copy",
                    100.0 * gbs / self.copy_gbs
                )
            }
            Rate::Flops(flops) => {
                let tflops = flops / (ms * 1e-3) / 1e12;
                format!(
                    "{tflops:8.2} TFLOP/s {:5.1}% of SGEMM",
                    100.0 * tflops / self.sgemm_tflops
                )
            }
            Rate::Bf16Flops(flops) => {
                let tflops = flops / (ms * 1e-3) / 1e12;
                format!(
                    "{tflops:8.2} TFLOP/s {:5.1}% of bf16 GEMM",
                    100.0 * tflops / self.bf16_gemm_tflops
                )
            }
            Rate::Launch => "  (launch-bound: time only)".to_string(),
        };
        let line = format!(
            "{name:<28} {shape:<26} err {err:8.1e}  {:9.1} us  {achieved}",
            ms * 1e3
        );
        println!("{line}");
        self.rows.push(line);
    }
}

fn main() -> ExitCode {
    let timing = std::env::args().any(|a| a == "--bench");
    if !timing && !fake_device::emulated() && cuda::available().is_err() {
        // Panics (exit 101) when a check fails there.
        fake_device::rerun_on_emulated_device("kernel lab", &["--check"]);
        return ExitCode::SUCCESS;
    }
    match run(!timing) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("kernel lab: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(check_only: bool) -> Result<bool> {
    let Some(rt) = common::device("kernel lab")? else {
        return Ok(true);
    };
    let mut lab = Lab {
        rt,
        rng: Rng(0x5eed),
        copy_gbs: 0.0,
        sgemm_tflops: 0.0,
        bf16_gemm_tflops: 0.0,
        failures: Vec::new(),
        rows: Vec::new(),
        check_only,
    };
    if !lab.check_only {
        ceilings(&mut lab)?;
    }
    embedding(&mut lab)?;
    layernorm(&mut lab)?;
    gelu(&mut lab)?;
    dropout(&mut lab)?;
    bias_backward(&mut lab)?;
    attention(&mut lab)?;
    flash_attention::<f32>(&mut lab, FlashKernels::CudaCores)?;
    flash_attention::<bf16>(&mut lab, FlashKernels::CudaCores)?;
    flash_attention::<bf16>(&mut lab, FlashKernels::TensorCores)?;
    decoder_elementwise::<f32>(&mut lab)?;
    decoder_elementwise::<bf16>(&mut lab)?;
    causal_attention::<f32>(&mut lab, CausalKernels::CudaCores)?;
    causal_attention::<bf16>(&mut lab, CausalKernels::CudaCores)?;
    causal_attention::<bf16>(&mut lab, CausalKernels::TensorCores)?;
    disentangled_attention::<f32>(&mut lab)?;
    disentangled_attention::<bf16>(&mut lab)?;
    matmul(&mut lab)?;
    ranking_loss(&mut lab)?;
    optimizer(&mut lab)?;
    if !lab.check_only {
        println!();
        println!(
            "ceilings: copy {:.0} GB/s (read + write), SGEMM {:.1} TFLOP/s, bf16 GEMM {:.1} TFLOP/s",
            lab.copy_gbs, lab.sgemm_tflops, lab.bf16_gemm_tflops
        );
    }
    if lab.failures.is_empty() {
        println!("kernel lab: every kernel matches its CPU twin");
        Ok(true)
    } else {
        for f in &lab.failures {
            println!("FAILED {f}");
        }
        Ok(false)
    }
}

/// The two ceilings every rate is read against.
fn ceilings(lab: &mut Lab) -> Result<()> {
    let len = (1usize << 30) / 4;
    let src = lab.rt.zeros::<f32>(len)?;
    let mut dst = lab.rt.zeros::<f32>(len)?;
    let stream = lab.rt.stream().clone();
    let ms = median_ms(&lab.rt, 3, 10, |_| {
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| Error::internal(format!("CUDA: copy: {e}")))
    })?;
    lab.copy_gbs = 2.0 * (len * 4) as f64 / (ms * 1e-3) / 1e9;
    drop((src, dst));

    let s = 8192;
    let a = lab.random_sets(s * s, 1.0, 1)?.remove(0);
    let w = lab.random_sets(s * s, 1.0, 1)?.remove(0);
    let mut out = lab.rt.zeros::<f32>(s * s)?;
    let rt = lab.rt.clone();
    let ms = median_ms(&rt, 2, 10, |_| {
        rt.matmul_forward(&mut out, &a, &w, None::<&CudaSlice<f32>>, s, s, s)
    })?;
    lab.sgemm_tflops = 2.0 * (s as f64).powi(3) / (ms * 1e-3) / 1e12;
    drop((a, w, out));

    let a = lab.rt.upload(&vec![bf16::from_f32(0.5); s * s])?;
    let w = lab.rt.upload(&vec![bf16::from_f32(0.25); s * s])?;
    let mut out = lab.rt.zeros::<bf16>(s * s)?;
    let ms = median_ms(&rt, 2, 10, |_| {
        rt.matmul_forward(&mut out, &a, &w, None::<&CudaSlice<f32>>, s, s, s)
    })?;
    lab.bf16_gemm_tflops = 2.0 * (s as f64).powi(3) / (ms * 1e-3) / 1e12;
    println!(
        "copy 1 GiB: {:.0} GB/s; cuBLAS SGEMM 8192^3: {:.1} TFLOP/s; bf16 GEMM 8192^3: {:.1} TFLOP/s",
        lab.copy_gbs, lab.sgemm_tflops, lab.bf16_gemm_tflops
    );
    Ok(())
}

fn embedding(lab: &mut Lab) -> Result<()> {
    let (v, types) = (30522, 2);
    let tables = (v, T, types);
    // Check.
    let ids = lab.rng.below(CN, v as u32);
    let tys = lab.rng.below(CN, types as u32);
    let (wte, wpe, wtt) = (
        lab.rng.values(v * C, 0.1),
        lab.rng.values(T * C, 0.1),
        lab.rng.values(types * C, 0.1),
    );
    let mut cpu_out = vec![0.0; CN * C];
    cpu::embedding_forward(&mut cpu_out, &ids, &tys, &wte, &wpe, &wtt, CB, CT, C);
    let tokens = TokenBatch::new(&lab.rt, &ids, &tys, CB, CT, tables)?;
    let (wte_d, wpe_d, wtt_d) = (lab.up(&wte)?, lab.up(&wpe)?, lab.up(&wtt)?);
    let mut out = lab.nan(CN * C)?;
    lab.rt
        .embedding_forward(&mut out, &tokens, &wte_d, &wpe_d, &wtt_d, C)?;
    let err = lab.check("embedding_forward", &[("out", lab.down(&out)?, cpu_out)]);
    if lab.check_only {
        return Ok(());
    }
    // Time.
    let ids = lab.rng.below(N, v as u32);
    let tys = lab.rng.below(N, types as u32);
    let tokens = TokenBatch::new(&lab.rt, &ids, &tys, B, T, tables)?;
    let sets = sets_for(N * C * 4);
    let mut outs: Vec<_> = (0..sets)
        .map(|_| lab.rt.zeros::<f32>(N * C))
        .collect::<Result<_>>()?;
    let rt = lab.rt.clone();
    let ms = median_ms(&rt, WARMUP, REPS, |i| {
        rt.embedding_forward(&mut outs[i % sets], &tokens, &wte_d, &wpe_d, &wtt_d, C)
    })?;
    let bytes = (2 * N * C + T * C) * 4 + 2 * N * 4;
    lab.row(
        "embedding_forward",
        "8x512x768",
        err,
        ms,
        Rate::Bytes(bytes as f64),
    );
    Ok(())
}

fn layernorm(lab: &mut Lab) -> Result<()> {
    let eps = 1e-12;
    // Check the forward, the fused residual forward and the backward.
    let (a, b) = (lab.rng.values(CN * C, 1.0), lab.rng.values(CN * C, 1.0));
    let (w, bias) = (lab.rng.values(C, 1.0), lab.rng.values(C, 1.0));
    let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    let (mut out, mut mean, mut rstd) = (vec![0.0; CN * C], vec![0.0; CN], vec![0.0; CN]);
    cpu::layernorm_forward(&mut out, &mut mean, &mut rstd, &sum, &w, &bias, CN, C, eps);
    let (a_d, b_d, w_d, bias_d) = (lab.up(&a)?, lab.up(&b)?, lab.up(&w)?, lab.up(&bias)?);
    let (mut out_d, mut sum_d, mut mean_d, mut rstd_d) = (
        lab.nan(CN * C)?,
        lab.nan(CN * C)?,
        lab.nan(CN)?,
        lab.nan(CN)?,
    );
    lab.rt.residual_layernorm_forward(
        &mut out_d,
        &mut sum_d,
        &mut mean_d,
        &mut rstd_d,
        &a_d,
        &b_d,
        &w_d,
        &bias_d,
        CN,
        C,
        eps,
    )?;
    let fused_err = lab.check(
        "residual_layernorm_forward",
        &[
            ("out", lab.down(&out_d)?, out.clone()),
            ("sum", lab.down(&sum_d)?, sum.clone()),
            ("rstd", lab.down(&rstd_d)?, rstd.clone()),
        ],
    );
    let mut plain_d = lab.nan(CN * C)?;
    let sum_in = lab.up(&sum)?;
    lab.rt.layernorm_forward(
        &mut plain_d,
        &mut mean_d,
        &mut rstd_d,
        &sum_in,
        &w_d,
        &bias_d,
        CN,
        C,
        eps,
    )?;
    let fwd_err = lab.check("layernorm_forward", &[("out", lab.down(&plain_d)?, out)]);
    let dout = lab.rng.values(CN * C, 1.0);
    let (mut dinp, mut dw, mut db) = (
        lab.rng.values(CN * C, 1.0),
        lab.rng.values(C, 1.0),
        lab.rng.values(C, 1.0),
    );
    let (mut dinp_d, mut dw_d, mut db_d) = (lab.up(&dinp)?, lab.up(&dw)?, lab.up(&db)?);
    let (dout_d, mean_in, rstd_in) = (lab.up(&dout)?, lab.up(&mean)?, lab.up(&rstd)?);
    lab.rt.layernorm_backward(
        &mut dinp_d,
        &mut dw_d,
        &mut db_d,
        &dout_d,
        &sum_in,
        &w_d,
        &mean_in,
        &rstd_in,
        CN,
        C,
    )?;
    cpu::layernorm_backward(
        &mut dinp, &mut dw, &mut db, &dout, &sum, &w, &mean, &rstd, CN, C,
    );
    let bwd_err = lab.check(
        "layernorm_backward",
        &[
            ("dinp", lab.down(&dinp_d)?, dinp),
            ("dweight", lab.down(&dw_d)?, dw),
            ("dbias", lab.down(&db_d)?, db),
        ],
    );

    if lab.check_only {
        return Ok(());
    }
    // Time at N x C.
    let act = N * C;
    let sets = sets_for(act * 4 * 4);
    let inputs = lab.random_sets(act, 1.0, sets)?;
    let others = lab.random_sets(act, 1.0, sets)?;
    let mut outs: Vec<_> = (0..sets)
        .map(|_| lab.rt.zeros::<f32>(act))
        .collect::<Result<_>>()?;
    let mut sums: Vec<_> = (0..sets)
        .map(|_| lab.rt.zeros::<f32>(act))
        .collect::<Result<_>>()?;
    let mut means: Vec<_> = (0..sets)
        .map(|_| lab.rt.zeros::<f32>(N))
        .collect::<Result<_>>()?;
    let mut rstds: Vec<_> = (0..sets)
        .map(|_| lab.rt.zeros::<f32>(N))
        .collect::<Result<_>>()?;
    let rt = lab.rt.clone();
    let ms = median_ms(&rt, WARMUP, REPS, |i| {
        let s = i % sets;
        rt.layernorm_forward(
            &mut outs[s],
            &mut means[s],
            &mut rstds[s],
            &inputs[s],
            &w_d,
            &bias_d,
            N,
            C,
            eps,
        )
    })?;
    lab.row(
        "layernorm_forward",
        "4096x768",
        fwd_err,
        ms,
        Rate::Bytes((2 * act * 4) as f64),
    );
    let ms = median_ms(&rt, WARMUP, REPS, |i| {
        let s = i % sets;
        rt.residual_layernorm_forward(
            &mut outs[s],
            &mut sums[s],
            &mut means[s],
            &mut rstds[s],
            &inputs[s],
            &others[s],
            &w_d,
            &bias_d,
            N,
            C,
            eps,
        )
    })?;
    lab.row(
        "residual_layernorm_forward",
        "4096x768",
        fused_err,
        ms,
        Rate::Bytes((4 * act * 4) as f64),
    );
    // Backward: outs as dinp (+=), inputs as dout, others as the forward input.
    let ms = median_ms(&rt, WARMUP, REPS, |i| {
        let s = i % sets;
        rt.layernorm_backward(
            &mut outs[s],
            &mut dw_d,
            &mut db_d,
            &inputs[s],
            &others[s],
            &w_d,
            &means[s],
            &rstds[s],
            N,
            C,
        )
    })?;
    lab.row(
        "layernorm_backward",
        "4096x768",
        bwd_err,
        ms,
        Rate::Bytes((4 * act * 4) as f64),
    );
    Ok(())
}

fn gelu(lab: &mut Lab) -> Result<()> {
    let (inp, bias) = (lab.rng.values(CN * I, 2.0), lab.rng.values(I, 1.0));
    let pre: Vec<f32> = inp
        .iter()
        .enumerate()
        .map(|(k, x)| x + bias[k % I])
        .collect();
    let mut out = vec![0.0; CN * I];
    cpu::gelu_forward(&mut out, &pre);
    let (inp_d, bias_d) = (lab.up(&inp)?, lab.up(&bias)?);
    let mut out_d = lab.nan(CN * I)?;
    lab.rt
        .bias_gelu_forward(&mut out_d, &inp_d, &bias_d, CN, I)?;
    let fwd_err = lab.check("bias_gelu_forward", &[("out", lab.down(&out_d)?, out)]);
    let dout = lab.rng.values(CN * I, 1.0);
    let mut dinp = lab.rng.values(CN * I, 1.0);
    let mut dbias = lab.rng.values(I, 1.0);
    let (mut dinp_d, mut dbias_d, dout_d) = (lab.up(&dinp)?, lab.up(&dbias)?, lab.up(&dout)?);
    lab.rt
        .bias_gelu_backward(&mut dinp_d, &mut dbias_d, &dout_d, &inp_d, &bias_d, CN, I)?;
    // The CPU twin: g = dout · gelu'(inp + bias) added into dinp, its column sums into dbias.
    let mut g = vec![0.0; CN * I];
    cpu::gelu_backward(&mut g, &pre, &dout);
    for (dinp_row, g_row) in dinp.chunks_mut(I).zip(g.chunks(I)) {
        for ((d, db), x) in dinp_row.iter_mut().zip(dbias.iter_mut()).zip(g_row) {
            *d += x;
            *db += x;
        }
    }
    let bwd_err = lab.check(
        "bias_gelu_backward",
        &[
            ("dinp", lab.down(&dinp_d)?, dinp),
            ("dbias", lab.down(&dbias_d)?, dbias),
        ],
    );

    if lab.check_only {
        return Ok(());
    }
    let act = N * I;
    let sets = sets_for(act * 4 * 3);
    let inputs = lab.random_sets(act, 2.0, sets)?;
    let douts = lab.random_sets(act, 1.0, sets)?;
    let mut outs: Vec<_> = (0..sets)
        .map(|_| lab.rt.zeros::<f32>(act))
        .collect::<Result<_>>()?;
    let rt = lab.rt.clone();
    let ms = median_ms(&rt, WARMUP, REPS, |i| {
        rt.bias_gelu_forward(&mut outs[i % sets], &inputs[i % sets], &bias_d, N, I)
    })?;
    lab.row(
        "bias_gelu_forward",
        "4096x3072",
        fwd_err,
        ms,
        Rate::Bytes((2 * act * 4) as f64),
    );
    let ms = median_ms(&rt, WARMUP, REPS, |i| {
        let s = i % sets;
        rt.bias_gelu_backward(
            &mut outs[s],
            &mut dbias_d,
            &douts[s],
            &inputs[s],
            &bias_d,
            N,
            I,
        )
    })?;
    lab.row(
        "bias_gelu_backward",
        "4096x3072",
        bwd_err,
        ms,
        Rate::Bytes((4 * act * 4) as f64),
    );
    Ok(())
}

fn dropout(lab: &mut Lab) -> Result<()> {
    let (p, seed) = (0.1, 42);
    let inp = lab.rng.values(CN * C, 1.0);
    let mut out = vec![0.0; CN * C];
    cpu::dropout_forward(&mut out, &inp, p, seed);
    let inp_d = lab.up(&inp)?;
    let mut out_d = lab.nan(CN * C)?;
    lab.rt.dropout_forward(&mut out_d, &inp_d, p, seed)?;
    let err = lab.check("dropout_forward", &[("out", lab.down(&out_d)?, out)]);
    if lab.check_only {
        return Ok(());
    }
    let act = N * C;
    let sets = sets_for(act * 4 * 2);
    let inputs = lab.random_sets(act, 1.0, sets)?;
    let mut outs: Vec<_> = (0..sets)
        .map(|_| lab.rt.zeros::<f32>(act))
        .collect::<Result<_>>()?;
    let rt = lab.rt.clone();
    let ms = median_ms(&rt, WARMUP, REPS, |i| {
        rt.dropout_forward(&mut outs[i % sets], &inputs[i % sets], p, seed)
    })?;
    lab.row(
        "dropout_forward",
        "4096x768",
        err,
        ms,
        Rate::Bytes((2 * act * 4) as f64),
    );
    Ok(())
}

fn bias_backward(lab: &mut Lab) -> Result<()> {
    let dout = lab.rng.values(CN * C, 1.0);
    let mut dbias = lab.rng.values(C, 1.0);
    let mut dbias_d = lab.up(&dbias)?;
    lab.rt.bias_backward(&mut dbias_d, &lab.up(&dout)?, CN, C)?;
    for row in dout.chunks(C) {
        for (d, x) in dbias.iter_mut().zip(row) {
            *d += x;
        }
    }
    let err = lab.check("bias_backward", &[("dbias", lab.down(&dbias_d)?, dbias)]);
    if lab.check_only {
        return Ok(());
    }
    let sets = sets_for(N * C * 4);
    let douts = lab.random_sets(N * C, 1.0, sets)?;
    let rt = lab.rt.clone();
    let ms = median_ms(&rt, WARMUP, REPS, |i| {
        rt.bias_backward(&mut dbias_d, &douts[i % sets], N, C)
    })?;
    lab.row(
        "bias_backward",
        "4096x768",
        err,
        ms,
        Rate::Bytes((N * C * 4) as f64),
    );
    Ok(())
}

fn padding_mask(rng: &mut Rng, b: usize, t: usize) -> Vec<u8> {
    let mut mask = vec![0u8; b * t];
    for seq in 0..b {
        let real = 1 + (rng.next_u64() as usize % t);
        mask[seq * t..seq * t + real].fill(1);
    }
    mask
}

fn attention(lab: &mut Lab) -> Result<()> {
    let dims = (CB, CT, NH, HS);
    let act = CN * C;
    let (q, k, v) = (
        lab.rng.values(act, 1.0),
        lab.rng.values(act, 1.0),
        lab.rng.values(act, 1.0),
    );
    let mask = padding_mask(&mut lab.rng, CB, CT);
    let scores = CB * NH * CT * CT;
    let (mut out, mut probs) = (vec![0.0; act], vec![0.0; scores]);
    cpu::attention_forward(
        &mut out, &mut probs, &q, &k, &v, &mask, CB, CT, NH, HS, None,
    );
    let (q_d, k_d, v_d, mask_d) = (lab.up(&q)?, lab.up(&k)?, lab.up(&v)?, lab.rt.upload(&mask)?);
    let (mut out_d, mut probs_d) = (lab.nan(act)?, lab.nan(scores)?);
    lab.rt.attention_forward(
        &mut out_d,
        &mut probs_d,
        &q_d,
        &k_d,
        &v_d,
        &mask_d,
        dims,
        None,
    )?;
    let fwd_err = lab.check(
        "attention_forward",
        &[
            ("out", lab.down(&out_d)?, out),
            ("probs", lab.down(&probs_d)?, probs.clone()),
        ],
    );
    let dout = lab.rng.values(act, 1.0);
    let (mut dq, mut dk, mut dv) = (
        lab.rng.values(act, 1.0),
        lab.rng.values(act, 1.0),
        lab.rng.values(act, 1.0),
    );
    let (mut dq_d, mut dk_d, mut dv_d) = (lab.up(&dq)?, lab.up(&dk)?, lab.up(&dv)?);
    let mut dscores_d = lab.nan(scores)?;
    let probs_in = lab.up(&probs)?;
    lab.rt.attention_backward(
        &mut dq_d,
        &mut dk_d,
        &mut dv_d,
        &mut dscores_d,
        &lab.up(&dout)?,
        &q_d,
        &k_d,
        &v_d,
        &probs_in,
        dims,
        None,
    )?;
    cpu::attention_backward(
        &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &probs, &mask, CB, CT, NH, HS, None,
    );
    let bwd_err = lab.check(
        "attention_backward",
        &[
            ("dq", lab.down(&dq_d)?, dq),
            ("dk", lab.down(&dk_d)?, dk),
            ("dv", lab.down(&dv_d)?, dv),
        ],
    );

    if lab.check_only {
        return Ok(());
    }
    // Time at 8 x 512, 12 heads of 64; the big buffers (probs: 100 MB) need no rotation.
    let dims = (B, T, NH, HS);
    let act = N * C;
    let scores = B * NH * T * T;
    let (q_d, k_d, v_d) = (
        lab.random_sets(act, 1.0, 1)?.remove(0),
        lab.random_sets(act, 1.0, 1)?.remove(0),
        lab.random_sets(act, 1.0, 1)?.remove(0),
    );
    let mask_d = lab.rt.upload(&padding_mask(&mut lab.rng, B, T))?;
    let (mut out_d, mut probs_d) = (lab.rt.zeros::<f32>(act)?, lab.rt.zeros::<f32>(scores)?);
    let rt = lab.rt.clone();
    let ms = median_ms(&rt, 2, 10, |_| {
        rt.attention_forward(
            &mut out_d,
            &mut probs_d,
            &q_d,
            &k_d,
            &v_d,
            &mask_d,
            dims,
            None,
        )
    })?;
    let flops = 4.0 * (B * NH * T * T * HS) as f64;
    lab.row(
        "attention_forward v1",
        "8x512, 12x64",
        fwd_err,
        ms,
        Rate::Flops(flops),
    );
    let (mut dq_d, mut dk_d, mut dv_d) = (
        lab.rt.zeros::<f32>(act)?,
        lab.rt.zeros::<f32>(act)?,
        lab.rt.zeros::<f32>(act)?,
    );
    let mut dscores_d = lab.rt.zeros::<f32>(scores)?;
    let ms = median_ms(&rt, 2, 10, |_| {
        rt.attention_backward(
            &mut dq_d,
            &mut dk_d,
            &mut dv_d,
            &mut dscores_d,
            &out_d,
            &q_d,
            &k_d,
            &v_d,
            &probs_d,
            dims,
            None,
        )
    })?;
    lab.row(
        "attention_backward v1",
        "8x512, 12x64",
        bwd_err,
        ms,
        Rate::Flops(2.0 * flops),
    );
    Ok(())
}

/// An activation type the lab runs flash attention in: its values as the device stores
/// them, its check tolerance and its FLOP ceiling.
trait LabActivation: Activation + Copy + Default {
    const TOLERANCE: f64;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    fn flops(flops: f64) -> Rate;
}

impl LabActivation for f32 {
    const TOLERANCE: f64 = F32_TOLERANCE;
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn flops(flops: f64) -> Rate {
        Rate::Flops(flops)
    }
}

impl LabActivation for bf16 {
    const TOLERANCE: f64 = BF16_TOLERANCE;
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn flops(flops: f64) -> Rate {
        Rate::Bf16Flops(flops)
    }
}

/// Flash attention in T, version 2 (`FlashKernels::CudaCores`) or 3 (`TensorCores`, bf16):
/// validated against the CPU twin on the same T-rounded inputs, without and with dropout
/// on the probabilities (gradients start at small values, so `+=` shows without hiding
/// the attention's own), then timed at BERT-base sizes like version 1 (no probabilities
/// to write or read).
fn flash_attention<T: LabActivation>(lab: &mut Lab, kernels: FlashKernels) -> Result<()> {
    let version = match kernels {
        FlashKernels::CudaCores => "v2",
        FlashKernels::TensorCores => "v3",
    };
    let name = |direction: &str| format!("flash_attention_{direction} {} {version}", T::SUFFIX);
    let store = |x: &[f32]| x.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>();
    let load = |x: Vec<T>| x.into_iter().map(T::to_f32).collect::<Vec<f32>>();
    let dims = (CB, CT, NH, HS);
    let act = CN * C;
    let rows = CB * NH * CT;
    let (mut fwd_err, mut bwd_err) = (0.0f64, 0.0f64);
    for dropout in [None, Some(cpu::AttentionDropout { p: 0.1, seed: 3 })] {
        let mut input = |scale| load(store(&lab.rng.values(act, scale)));
        let (q, k, v, dout) = (input(1.0), input(1.0), input(1.0), input(1.0));
        let (mut dq, mut dk, mut dv) = (input(0.01), input(0.01), input(0.01));
        let mask = padding_mask(&mut lab.rng, CB, CT);
        let (mut out, mut probs) = (vec![0.0; act], vec![0.0; CB * NH * CT * CT]);
        cpu::attention_forward(
            &mut out, &mut probs, &q, &k, &v, &mask, CB, CT, NH, HS, dropout,
        );
        let rt = lab.rt.clone();
        let up = |x: &[f32]| rt.upload(&store(x));
        let (q_d, k_d, v_d, dout_d) = (up(&q)?, up(&k)?, up(&v)?, up(&dout)?);
        let mask_d = lab.rt.upload(&mask)?;
        let mut out_d = up(&vec![f32::NAN; act])?;
        let mut lse_d = lab.nan(rows)?;
        lab.rt.flash_attention_forward(
            &mut out_d, &mut lse_d, &q_d, &k_d, &v_d, &mask_d, dims, dropout, kernels,
        )?;
        let out_gpu = load(lab.rt.download(&out_d)?);
        let check = format!("{} {dropout:?}", name("forward"));
        fwd_err = fwd_err.max(lab.check_within(&check, &[("out", out_gpu, out)], T::TOLERANCE));

        let (mut dq_d, mut dk_d, mut dv_d) = (up(&dq)?, up(&dk)?, up(&dv)?);
        let mut row_dot_d = lab.nan(rows)?;
        lab.rt.flash_attention_backward(
            &mut dq_d,
            &mut dk_d,
            &mut dv_d,
            &mut row_dot_d,
            &dout_d,
            &out_d,
            &q_d,
            &k_d,
            &v_d,
            &lse_d,
            &mask_d,
            dims,
            dropout,
            kernels,
        )?;
        cpu::attention_backward(
            &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &probs, &mask, CB, CT, NH, HS, dropout,
        );
        let parts = [
            ("dq", load(lab.rt.download(&dq_d)?), dq),
            ("dk", load(lab.rt.download(&dk_d)?), dk),
            ("dv", load(lab.rt.download(&dv_d)?), dv),
        ];
        let check = format!("{} {dropout:?}", name("backward"));
        bwd_err = bwd_err.max(lab.check_within(&check, &parts, T::TOLERANCE));
    }

    if lab.check_only {
        return Ok(());
    }
    // Time at 8 x 512, 12 heads of 64.
    let dims = (B, T, NH, HS);
    let act = N * C;
    let rows = B * NH * T;
    let mut input = || lab.rt.upload(&store(&lab.rng.values(act, 1.0)));
    let (q_d, k_d, v_d, dout_d) = (input()?, input()?, input()?, input()?);
    let mask_d = lab.rt.upload(&padding_mask(&mut lab.rng, B, T))?;
    let (mut out_d, mut lse_d) = (lab.rt.zeros::<T>(act)?, lab.rt.zeros::<f32>(rows)?);
    let rt = lab.rt.clone();
    let ms = median_ms(&rt, 2, 10, |_| {
        rt.flash_attention_forward(
            &mut out_d, &mut lse_d, &q_d, &k_d, &v_d, &mask_d, dims, None, kernels,
        )
    })?;
    let flops = 4.0 * (B * NH * T * T * HS) as f64;
    lab.row(
        &name("forward"),
        "8x512, 12x64",
        fwd_err,
        ms,
        T::flops(flops),
    );
    let (mut dq_d, mut dk_d, mut dv_d) = (
        lab.rt.zeros::<T>(act)?,
        lab.rt.zeros::<T>(act)?,
        lab.rt.zeros::<T>(act)?,
    );
    let mut row_dot_d = lab.rt.zeros::<f32>(rows)?;
    let ms = median_ms(&rt, 2, 10, |_| {
        rt.flash_attention_backward(
            &mut dq_d,
            &mut dk_d,
            &mut dv_d,
            &mut row_dot_d,
            &dout_d,
            &out_d,
            &q_d,
            &k_d,
            &v_d,
            &lse_d,
            &mask_d,
            dims,
            None,
            kernels,
        )
    })?;
    // Useful FLOPs, as version 1's (dv, dp, dq, dk); the recomputed scores are not counted.
    lab.row(
        &name("backward"),
        "8x512, 12x64",
        bwd_err,
        ms,
        T::flops(2.0 * flops),
    );
    Ok(())
}

fn matmul(lab: &mut Lab) -> Result<()> {
    let (cc, coc) = (C, I);
    let (inp, w, bias) = (
        lab.rng.values(CN * cc, 1.0),
        lab.rng.values(coc * cc, 0.05),
        lab.rng.values(coc, 1.0),
    );
    let mut out = vec![0.0; CN * coc];
    cpu::matmul_forward(&mut out, &inp, &w, Some(&bias), CN, cc, coc);
    let (inp_d, w_d, bias_d) = (lab.up(&inp)?, lab.up(&w)?, lab.up(&bias)?);
    let mut out_d = lab.nan(CN * coc)?;
    lab.rt
        .matmul_forward(&mut out_d, &inp_d, &w_d, Some(&bias_d), CN, cc, coc)?;
    let fwd_err = lab.check("matmul_forward", &[("out", lab.down(&out_d)?, out)]);
    let dout = lab.rng.values(CN * coc, 1.0);
    let (mut dinp, mut dw, mut db) = (
        lab.rng.values(CN * cc, 1.0),
        lab.rng.values(coc * cc, 1.0),
        lab.rng.values(coc, 1.0),
    );
    let (mut dinp_d, mut dw_d, mut db_d) = (lab.up(&dinp)?, lab.up(&dw)?, lab.up(&db)?);
    lab.rt.matmul_backward(
        &mut dinp_d,
        &mut dw_d,
        Some(&mut db_d),
        &lab.up(&dout)?,
        &inp_d,
        &w_d,
        CN,
        cc,
        coc,
    )?;
    cpu::matmul_backward(
        &mut dinp,
        &mut dw,
        Some(&mut db),
        &dout,
        &inp,
        &w,
        CN,
        cc,
        coc,
    );
    let bwd_err = lab.check(
        "matmul_backward",
        &[
            ("dinp", lab.down(&dinp_d)?, dinp),
            ("dweight", lab.down(&dw_d)?, dw),
            ("dbias", lab.down(&db_d)?, db),
        ],
    );

    if lab.check_only {
        return Ok(());
    }
    // Time the feed-forward up-projection [4096, 768] x [3072, 768]ᵀ.
    let sets = sets_for((N * cc + N * coc) * 4);
    let inputs = lab.random_sets(N * cc, 1.0, sets)?;
    let w_d = lab.random_sets(coc * cc, 0.05, 1)?.remove(0);
    let mut outs: Vec<_> = (0..sets)
        .map(|_| lab.rt.zeros::<f32>(N * coc))
        .collect::<Result<_>>()?;
    let rt = lab.rt.clone();
    let ms = median_ms(&rt, WARMUP, REPS, |i| {
        rt.matmul_forward(
            &mut outs[i % sets],
            &inputs[i % sets],
            &w_d,
            Some(&bias_d),
            N,
            cc,
            coc,
        )
    })?;
    let flops = 2.0 * (N * cc * coc) as f64;
    lab.row(
        "matmul_forward (+bias)",
        "4096x768 -> 3072",
        fwd_err,
        ms,
        Rate::Flops(flops),
    );
    let mut dinps: Vec<_> = (0..sets)
        .map(|_| lab.rt.zeros::<f32>(N * cc))
        .collect::<Result<_>>()?;
    let ms = median_ms(&rt, WARMUP, REPS, |i| {
        let s = i % sets;
        rt.matmul_backward(
            &mut dinps[s],
            &mut dw_d,
            Some(&mut db_d),
            &outs[s],
            &inputs[s],
            &w_d,
            N,
            cc,
            coc,
        )
    })?;
    lab.row(
        "matmul_backward (+bias)",
        "4096x768 -> 3072",
        bwd_err,
        ms,
        Rate::Flops(2.0 * flops),
    );
    Ok(())
}

fn ranking_loss(lab: &mut Lab) -> Result<()> {
    let spec = LossSpec::parse("adaptive")?;
    let eps = 0.01;
    let ks = vec![8, 2, 5, 11, 3];
    let types: Vec<_> = (0..ks.len())
        .map(|p| {
            Some(if p % 2 == 0 {
                PromptType::Open
            } else {
                PromptType::Closed
            })
        })
        .collect();
    let total: usize = ks.iter().sum();
    let logits = lab.rng.values(total, 2.0);
    let mut dlogits = vec![0.0f32; total];
    let cpu_loss = ranking_loss_forward_backward(&logits, &ks, &types, &spec, eps, &mut dlogits)?;
    let batch = RankingBatch::new(&lab.rt, &ks, &types, &spec)?;
    let logits_d = lab.up(&logits)?;
    let mut dlogits_d = lab.nan(total)?;
    let gpu_loss = lab
        .rt
        .ranking_loss_forward_backward(&mut dlogits_d, &logits_d, &batch, eps)?;
    let err = lab.check(
        "ranking_loss",
        &[
            ("loss", vec![gpu_loss as f32], vec![cpu_loss]),
            ("dlogits", lab.down(&dlogits_d)?, dlogits),
        ],
    );
    if lab.check_only {
        return Ok(());
    }
    let rt = lab.rt.clone();
    let ms = median_ms(&rt, WARMUP, REPS, |_| {
        rt.ranking_loss_forward_backward(&mut dlogits_d, &logits_d, &batch, eps)
            .map(|_| ())
    })?;
    lab.row(
        "ranking_loss (+ loss to host)",
        "5 prompts, K 2..11",
        err,
        ms,
        Rate::Launch,
    );
    Ok(())
}

fn optimizer(lab: &mut Lab) -> Result<()> {
    // Check on 100k elements, time on bert-base's 110M.
    let len = 100_003;
    let (mut p, g) = (lab.rng.values(len, 1.0), lab.rng.values(len, 0.1));
    let mut m = lab.rng.values(len, 0.01);
    let mut v: Vec<f32> = lab.rng.values(len, 0.001).iter().map(|x| x.abs()).collect();
    let hp = AdamWStep {
        step: 3,
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        grad_scale: 0.5,
    };
    let (mut p_d, g_d, mut m_d, mut v_d) = (lab.up(&p)?, lab.up(&g)?, lab.up(&m)?, lab.up(&v)?);
    let norm_gpu = lab.rt.global_norm_squared(&[g_d.as_view()])?;
    let norm_cpu = cpu::global_norm_squared(&g);
    lab.rt
        .adamw_update(&mut p_d, &g_d, &mut m_d, &mut v_d, &hp)?;
    cpu::adamw_update(
        &mut p,
        &g,
        &mut m,
        &mut v,
        hp.step,
        hp.lr,
        hp.beta1,
        hp.beta2,
        hp.eps,
        hp.weight_decay,
        hp.grad_scale,
    );
    let norm_err = lab.check(
        "global_norm_squared",
        &[("norm", vec![norm_gpu as f32], vec![norm_cpu as f32])],
    );
    let adam_err = lab.check(
        "adamw_update",
        &[
            ("params", lab.down(&p_d)?, p),
            ("m", lab.down(&m_d)?, m),
            ("v", lab.down(&v_d)?, v),
        ],
    );
    if lab.check_only {
        return Ok(());
    }
    let params = ParamLayout::new(&BertConfig::named("bert-base").expect("a known name")).total;
    let big = |lab: &mut Lab, scale: f32| -> Result<CudaSlice<f32>> {
        let host = lab.rng.values(params, scale);
        lab.up(&host)
    };
    let (mut p_d, g_d, mut m_d) = (big(lab, 1.0)?, big(lab, 0.1)?, big(lab, 0.01)?);
    let mut v_d = lab.rt.zeros::<f32>(params)?;
    let rt = lab.rt.clone();
    let ms = median_ms(&rt, 2, 10, |_| {
        rt.global_norm_squared(&[g_d.as_view()]).map(|_| ())
    })?;
    lab.row(
        "global_norm_squared",
        "110M",
        norm_err,
        ms,
        Rate::Bytes((params * 4) as f64),
    );
    let ms = median_ms(&rt, 2, 10, |_| {
        rt.adamw_update(&mut p_d, &g_d, &mut m_d, &mut v_d, &hp)
    })?;
    lab.row(
        "adamw_update",
        "110M",
        adam_err,
        ms,
        Rate::Bytes((params * 7 * 4) as f64),
    );
    Ok(())
}

// ---- Decoder kernels (Llama-shaped: Llama 3.2 1B's hidden 2048, MLP 8192, 32 query heads
// and 8 key/value heads of 64; batches of 8 x 512 tokens, or a prompt of 384 shared by 8
// completions of 128) -------------------------------------------------------------------

const DC: usize = 2048;
const DI: usize = 8192;
const DNH: usize = 32;
const DNKV: usize = 8;
const DHS: usize = 64;
const DPROMPT: usize = 384;
const DCOMPLETION: usize = 128;

/// RMSNorm, SwiGLU and RoPE in T: checked against the CPU twins in f32 on the same
/// T-rounded inputs (gradients start at random values, so `+=` shows), then timed.
fn decoder_elementwise<T: LabActivation>(lab: &mut Lab) -> Result<()> {
    let store = |x: &[f32]| x.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>();
    let load = |x: Vec<T>| x.into_iter().map(T::to_f32).collect::<Vec<f32>>();
    let name = |op: &str| format!("{op} {}", T::SUFFIX);
    let rt = lab.rt.clone();
    let up = |x: &[f32]| rt.upload(&store(x));
    let (n, c, heads, hs) = (CN, 40, 3, 16);
    let mut input = |len, scale| load(store(&lab.rng.values(len, scale)));

    // RMSNorm.
    let (inp, dout, dinp) = (input(n * c, 2.0), input(n * c, 1.0), input(n * c, 1.0));
    let (weight, dweight) = (lab.rng.values(c, 1.0), lab.rng.values(c, 1.0));
    let (mut out, mut rstd) = (vec![0.0f32; n * c], vec![0.0f32; n]);
    cpu::rmsnorm_forward(&mut out, &mut rstd, &inp, &weight, n, c, 1e-6);
    let (inp_d, weight_d) = (up(&inp)?, lab.up(&weight)?);
    let (mut out_d, mut rstd_d) = (up(&vec![f32::NAN; n * c])?, lab.nan(n)?);
    lab.rt
        .rmsnorm_forward(&mut out_d, &mut rstd_d, &inp_d, &weight_d, n, c, 1e-6)?;
    let parts = [
        ("out", load(lab.rt.download(&out_d)?), out),
        ("rstd", lab.down(&rstd_d)?, rstd.clone()),
    ];
    let rmsnorm_fwd_err = lab.check_within(&name("rmsnorm_forward"), &parts, T::TOLERANCE);
    let (mut dinp_d, mut dweight_d) = (up(&dinp)?, lab.up(&dweight)?);
    let rstd_d = lab.up(&rstd)?;
    lab.rt.rmsnorm_backward(
        &mut dinp_d,
        &mut dweight_d,
        &up(&dout)?,
        &inp_d,
        &weight_d,
        &rstd_d,
        n,
        c,
    )?;
    let (mut dinp_cpu, mut dweight_cpu) = (dinp, dweight);
    cpu::rmsnorm_backward(
        &mut dinp_cpu,
        &mut dweight_cpu,
        &dout,
        &inp,
        &weight,
        &rstd,
        n,
        c,
    );
    let parts = [
        ("dinp", load(lab.rt.download(&dinp_d)?), dinp_cpu),
        ("dweight", lab.down(&dweight_d)?, dweight_cpu),
    ];
    let rmsnorm_bwd_err = lab.check_within(&name("rmsnorm_backward"), &parts, T::TOLERANCE);

    // SwiGLU.
    let mut input = |len, scale| load(store(&lab.rng.values(len, scale)));
    let len = n * c;
    let (gate, up_in, dout, dgate, dup) = (
        input(len, 6.0),
        input(len, 2.0),
        input(len, 1.0),
        input(len, 1.0),
        input(len, 1.0),
    );
    let mut out = vec![0.0f32; len];
    cpu::swiglu_forward(&mut out, &gate, &up_in);
    let (gate_d, up_d) = (up(&gate)?, up(&up_in)?);
    let mut out_d = up(&vec![f32::NAN; len])?;
    lab.rt.swiglu_forward(&mut out_d, &gate_d, &up_d)?;
    let parts = [("out", load(lab.rt.download(&out_d)?), out)];
    let swiglu_fwd_err = lab.check_within(&name("swiglu_forward"), &parts, T::TOLERANCE);
    let (mut dgate_d, mut dup_d) = (up(&dgate)?, up(&dup)?);
    lab.rt
        .swiglu_backward(&mut dgate_d, &mut dup_d, &up(&dout)?, &gate_d, &up_d)?;
    let (mut dgate_cpu, mut dup_cpu) = (dgate, dup);
    cpu::swiglu_backward(&mut dgate_cpu, &mut dup_cpu, &dout, &gate, &up_in);
    let parts = [
        ("dgate", load(lab.rt.download(&dgate_d)?), dgate_cpu),
        ("dup", load(lab.rt.download(&dup_d)?), dup_cpu),
    ];
    let swiglu_bwd_err = lab.check_within(&name("swiglu_backward"), &parts, T::TOLERANCE);

    // RoPE, from the device's cos/sin tables (checked first) on both sides.
    let inv_freq = cpu::rope_inv_freq(hs, 500_000.0, None);
    let positions = lab.rng.below(n, 4096);
    let (mut cos, mut sin) = (vec![0.0f32; n * hs / 2], vec![0.0f32; n * hs / 2]);
    cpu::rope_cos_sin(&mut cos, &mut sin, &positions, &inv_freq);
    let (mut cos_d, mut sin_d) = (
        up(&vec![f32::NAN; n * hs / 2])?,
        up(&vec![f32::NAN; n * hs / 2])?,
    );
    let (positions_d, inv_freq_d) = (lab.rt.upload(&positions)?, lab.up(&inv_freq)?);
    lab.rt
        .rope_cos_sin(&mut cos_d, &mut sin_d, &positions_d, &inv_freq_d, n, hs / 2)?;
    let (cos_gpu, sin_gpu) = (
        load(lab.rt.download(&cos_d)?),
        load(lab.rt.download(&sin_d)?),
    );
    let cos_sin_err = lab.check_within(
        &name("rope_cos_sin"),
        &[("cos", cos_gpu.clone(), cos), ("sin", sin_gpu.clone(), sin)],
        T::TOLERANCE,
    );
    let mut input = |len, scale| load(store(&lab.rng.values(len, scale)));
    let len = n * heads * hs;
    let (inp, dout, dinp) = (input(len, 2.0), input(len, 1.0), input(len, 1.0));
    let mut out = vec![0.0f32; len];
    cpu::rope_forward(&mut out, &inp, &cos_gpu, &sin_gpu, n, heads, hs);
    let mut out_d = up(&vec![f32::NAN; len])?;
    lab.rt
        .rope_forward(&mut out_d, &up(&inp)?, &cos_d, &sin_d, n, heads, hs)?;
    let parts = [("out", load(lab.rt.download(&out_d)?), out)];
    let rope_fwd_err = lab.check_within(&name("rope_forward"), &parts, T::TOLERANCE);
    let mut dinp_d = up(&dinp)?;
    lab.rt
        .rope_backward(&mut dinp_d, &up(&dout)?, &cos_d, &sin_d, n, heads, hs)?;
    let mut dinp_cpu = dinp;
    cpu::rope_backward(&mut dinp_cpu, &dout, &cos_gpu, &sin_gpu, n, heads, hs);
    let parts = [("dinp", load(lab.rt.download(&dinp_d)?), dinp_cpu)];
    let rope_bwd_err = lab.check_within(&name("rope_backward"), &parts, T::TOLERANCE);

    if lab.check_only {
        return Ok(());
    }
    // Time at 8 x 512 tokens.
    let size = std::mem::size_of::<T>();
    let zeros = |len: usize| rt.zeros::<T>(len);
    let act = N * DC;
    let sets = sets_for(act * size * 4);
    let inputs: Vec<_> = (0..sets)
        .map(|_| up(&vec![0.5; act]))
        .collect::<Result<_>>()?;
    let mut outs: Vec<_> = (0..sets).map(|_| zeros(act)).collect::<Result<_>>()?;
    let mut rstds: Vec<_> = (0..sets)
        .map(|_| rt.zeros::<f32>(N))
        .collect::<Result<_>>()?;
    let weight_d = lab.up(&vec![1.0; DC])?;
    let mut dweight_d = lab.rt.zeros::<f32>(DC)?;
    let shape = "4096x2048";
    let ms = median_ms(&rt, WARMUP, REPS, |i| {
        let s = i % sets;
        rt.rmsnorm_forward(
            &mut outs[s],
            &mut rstds[s],
            &inputs[s],
            &weight_d,
            N,
            DC,
            1e-6,
        )
    })?;
    let bytes = (2 * act * size) as f64;
    lab.row(
        &name("rmsnorm_forward"),
        shape,
        rmsnorm_fwd_err,
        ms,
        Rate::Bytes(bytes),
    );
    let ms = median_ms(&rt, WARMUP, REPS, |i| {
        let s = i % sets;
        let dout = &inputs[(s + 1) % sets];
        rt.rmsnorm_backward(
            &mut outs[s],
            &mut dweight_d,
            dout,
            &inputs[s],
            &weight_d,
            &rstds[s],
            N,
            DC,
        )
    })?;
    let bytes = (4 * act * size) as f64;
    lab.row(
        &name("rmsnorm_backward"),
        shape,
        rmsnorm_bwd_err,
        ms,
        Rate::Bytes(bytes),
    );
    drop((inputs, outs));

    let len = N * DI;
    let sets = sets_for(len * size * 7);
    let gates: Vec<_> = (0..sets)
        .map(|_| up(&vec![0.5; len]))
        .collect::<Result<_>>()?;
    let ups: Vec<_> = (0..sets)
        .map(|_| up(&vec![0.25; len]))
        .collect::<Result<_>>()?;
    let mut outs: Vec<_> = (0..sets).map(|_| zeros(len)).collect::<Result<_>>()?;
    let mut others: Vec<_> = (0..sets).map(|_| zeros(len)).collect::<Result<_>>()?;
    let shape = "4096x8192";
    let ms = median_ms(&rt, WARMUP, REPS, |i| {
        let s = i % sets;
        rt.swiglu_forward(&mut outs[s], &gates[s], &ups[s])
    })?;
    let bytes = (3 * len * size) as f64;
    lab.row(
        &name("swiglu_forward"),
        shape,
        swiglu_fwd_err,
        ms,
        Rate::Bytes(bytes),
    );
    let ms = median_ms(&rt, WARMUP, REPS, |i| {
        let s = i % sets;
        let dout = &gates[(s + 1) % sets];
        rt.swiglu_backward(&mut outs[s], &mut others[s], dout, &gates[s], &ups[s])
    })?;
    let bytes = (7 * len * size) as f64;
    lab.row(
        &name("swiglu_backward"),
        shape,
        swiglu_bwd_err,
        ms,
        Rate::Bytes(bytes),
    );
    drop((gates, ups, outs, others));

    let (half, len) = (DHS / 2, N * DNH * DHS);
    let positions_d = lab.rt.upload(&lab.rng.below(N, 8192))?;
    let inv_freq_d = lab.up(&cpu::rope_inv_freq(DHS, 500_000.0, None))?;
    let (mut cos_d, mut sin_d) = (zeros(N * half)?, zeros(N * half)?);
    let ms = median_ms(&rt, WARMUP, REPS, |_| {
        rt.rope_cos_sin(&mut cos_d, &mut sin_d, &positions_d, &inv_freq_d, N, half)
    })?;
    let bytes = (2 * N * half * size + N * 4) as f64;
    lab.row(
        &name("rope_cos_sin"),
        "4096x32",
        cos_sin_err,
        ms,
        Rate::Bytes(bytes),
    );
    let sets = sets_for(len * size * 3);
    let inputs: Vec<_> = (0..sets)
        .map(|_| up(&vec![0.5; len]))
        .collect::<Result<_>>()?;
    let mut outs: Vec<_> = (0..sets).map(|_| zeros(len)).collect::<Result<_>>()?;
    let shape = "4096x32x64";
    let ms = median_ms(&rt, WARMUP, REPS, |i| {
        let s = i % sets;
        rt.rope_forward(&mut outs[s], &inputs[s], &cos_d, &sin_d, N, DNH, DHS)
    })?;
    let bytes = (2 * len * size) as f64;
    lab.row(
        &name("rope_forward"),
        shape,
        rope_fwd_err,
        ms,
        Rate::Bytes(bytes),
    );
    let ms = median_ms(&rt, WARMUP, REPS, |i| {
        let s = i % sets;
        rt.rope_backward(&mut outs[s], &inputs[s], &cos_d, &sin_d, N, DNH, DHS)
    })?;
    let bytes = (3 * len * size) as f64;
    lab.row(
        &name("rope_backward"),
        shape,
        rope_bwd_err,
        ms,
        Rate::Bytes(bytes),
    );
    Ok(())
}

/// Causal grouped-query attention in T, version 1 (`CausalKernels::CudaCores`) or 2
/// (`TensorCores`, bf16): checked against the CPU twin on the same T-rounded inputs without
/// and with a shared prefix (a prompt no sequence continues included), then timed on 8
/// sequences of 512 and on a prompt of 384 shared by 8 completions of 128.
fn causal_attention<T: LabActivation>(lab: &mut Lab, kernels: CausalKernels) -> Result<()> {
    let store = |x: &[f32]| x.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>();
    let load = |x: Vec<T>| x.into_iter().map(T::to_f32).collect::<Vec<f32>>();
    let version = match kernels {
        CausalKernels::CudaCores => "v1",
        CausalKernels::TensorCores => "v2",
    };
    let name = |direction: &str, shared: bool| {
        let prefix = if shared { " prefix" } else { "" };
        format!(
            "causal_attention_{direction} {} {version}{prefix}",
            T::SUFFIX
        )
    };
    let rt = lab.rt.clone();
    let up = |x: &[f32]| rt.upload(&store(x));
    let (b, t, nh, nkv, hs) = (CB, CT, 4, 2, 16);
    let (prompts, tp) = (3, 20);
    let (q_len, kv_len, p_len) = (b * t * nh * hs, b * t * nkv * hs, prompts * tp * nkv * hs);
    let rows = b * nh * t;
    let mut errors = [[0.0f64; 2]; 2]; // [prefix?][forward, backward]
    for shared in [false, true] {
        let mut input = |len, scale| load(store(&lab.rng.values(len, scale)));
        let (q, k, v, dout) = (
            input(q_len, 1.0),
            input(kv_len, 1.0),
            input(kv_len, 1.0),
            input(q_len, 1.0),
        );
        let (mut dq, mut dk, mut dv) =
            (input(q_len, 0.01), input(kv_len, 0.01), input(kv_len, 0.01));
        let (pk, pv) = (input(p_len, 1.0), input(p_len, 1.0));
        let (mut dpk, mut dpv) = (input(p_len, 0.01), input(p_len, 0.01));
        let mask = padding_mask(&mut lab.rng, b, t);
        let pmask = padding_mask(&mut lab.rng, prompts, tp);
        // The last prompt is continued by no sequence.
        let of_sequence = lab.rng.below(b, prompts as u32 - 1);
        let keys = if shared { tp + t } else { t };
        let cpu_prefix = shared.then(|| cpu::Prefix {
            k: &pk,
            v: &pv,
            mask: &pmask,
            of_sequence: &of_sequence,
            prompts,
            len: tp,
        });
        let (mut out, mut probs) = (vec![0.0; q_len], vec![0.0; rows * keys]);
        cpu::causal_attention_forward(
            &mut out, &mut probs, &q, &k, &v, &mask, cpu_prefix, b, t, nh, nkv, hs, None,
        );
        let (q_d, k_d, v_d, dout_d) = (up(&q)?, up(&k)?, up(&v)?, up(&dout)?);
        let mask_d = lab.rt.upload(&mask)?;
        let (pk_d, pv_d) = (up(&pk)?, up(&pv)?);
        let (pmask_d, of_sequence_d) = (lab.rt.upload(&pmask)?, lab.rt.upload(&of_sequence)?);
        let prefix = shared.then(|| CausalPrefix {
            k: pk_d.as_view(),
            v: pv_d.as_view(),
            mask: pmask_d.as_view(),
            of_sequence: of_sequence_d.as_view(),
            prompts,
            len: tp,
        });
        let mut out_d = up(&vec![f32::NAN; q_len])?;
        let mut lse_d = lab.nan(rows)?;
        let dims = (b, t, nh, nkv, hs);
        lab.rt.causal_attention_forward_with(
            &mut out_d,
            &mut lse_d,
            &q_d,
            &k_d,
            &v_d,
            &mask_d,
            prefix.as_ref(),
            dims,
            None,
            kernels,
        )?;
        let parts = [("out", load(lab.rt.download(&out_d)?), out)];
        errors[shared as usize][0] =
            lab.check_within(&name("forward", shared), &parts, T::TOLERANCE);

        let (mut dq_d, mut dk_d, mut dv_d) = (up(&dq)?, up(&dk)?, up(&dv)?);
        let (mut dpk_d, mut dpv_d) = (up(&dpk)?, up(&dpv)?);
        let mut row_dot_d = lab.nan(rows)?;
        let dprefix = shared.then(|| CausalPrefixGrads {
            dk: dpk_d.as_view_mut(),
            dv: dpv_d.as_view_mut(),
        });
        lab.rt.causal_attention_backward_with(
            &mut dq_d,
            &mut dk_d,
            &mut dv_d,
            dprefix,
            &mut row_dot_d,
            &dout_d,
            &out_d,
            &q_d,
            &k_d,
            &v_d,
            &lse_d,
            &mask_d,
            prefix.as_ref(),
            dims,
            None,
            kernels,
        )?;
        let dprefix_cpu = shared.then_some(cpu::PrefixGrads {
            dk: &mut dpk,
            dv: &mut dpv,
        });
        cpu::causal_attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            dprefix_cpu,
            &dout,
            &q,
            &k,
            &v,
            &probs,
            &mask,
            cpu_prefix,
            b,
            t,
            nh,
            nkv,
            hs,
            None,
        );
        let mut parts = vec![
            ("dq", load(lab.rt.download(&dq_d)?), dq),
            ("dk", load(lab.rt.download(&dk_d)?), dk),
            ("dv", load(lab.rt.download(&dv_d)?), dv),
        ];
        if shared {
            parts.push(("prefix dk", load(lab.rt.download(&dpk_d)?), dpk));
            parts.push(("prefix dv", load(lab.rt.download(&dpv_d)?), dpv));
        }
        errors[shared as usize][1] =
            lab.check_within(&name("backward", shared), &parts, T::TOLERANCE);
    }

    if lab.check_only {
        return Ok(());
    }
    for shared in [false, true] {
        // 8 sequences of 512, or 8 completions of 128 after one shared prompt of 384.
        let (b, t, prompts, tp) = if shared {
            (8, DCOMPLETION, 1, DPROMPT)
        } else {
            (8, 512, 0, 0)
        };
        let (q_len, kv_len) = (b * t * DNH * DHS, b * t * DNKV * DHS);
        let p_len = prompts * tp * DNKV * DHS;
        let rows = b * DNH * t;
        let mut input = |len| rt.upload(&store(&lab.rng.values(len, 1.0)));
        let (q_d, k_d, v_d, dout_d) =
            (input(q_len)?, input(kv_len)?, input(kv_len)?, input(q_len)?);
        let (pk_d, pv_d) = (input(p_len.max(1))?, input(p_len.max(1))?);
        let mask_d = rt.upload(&vec![1u8; b * t])?;
        let pmask_d = rt.upload(&vec![1u8; (prompts * tp).max(1)])?;
        let of_sequence_d = rt.upload(&vec![0u32; b])?;
        let prefix = shared.then(|| CausalPrefix {
            k: pk_d.as_view(),
            v: pv_d.as_view(),
            mask: pmask_d.as_view(),
            of_sequence: of_sequence_d.as_view(),
            prompts,
            len: tp,
        });
        let dims = (b, t, DNH, DNKV, DHS);
        let (mut out_d, mut lse_d) = (rt.zeros::<T>(q_len)?, rt.zeros::<f32>(rows)?);
        let ms = median_ms(&rt, 2, 10, |_| {
            rt.causal_attention_forward_with(
                &mut out_d,
                &mut lse_d,
                &q_d,
                &k_d,
                &v_d,
                &mask_d,
                prefix.as_ref(),
                dims,
                None,
                kernels,
            )
        })?;
        // Useful FLOPs: q·k and p·v over the allowed (prefix and causal) pairs.
        let pairs = (b * DNH * t) as f64 * (tp as f64 + (t as f64 + 1.0) / 2.0);
        let flops = 4.0 * pairs * DHS as f64;
        let shape = if shared {
            "8x(384+128), 32/8x64"
        } else {
            "8x512, 32/8x64"
        };
        lab.row(
            &name("forward", shared),
            shape,
            errors[shared as usize][0],
            ms,
            T::flops(flops),
        );
        let (mut dq_d, mut dk_d, mut dv_d) = (
            rt.zeros::<T>(q_len)?,
            rt.zeros::<T>(kv_len)?,
            rt.zeros::<T>(kv_len)?,
        );
        let (mut dpk_d, mut dpv_d) = (rt.zeros::<T>(p_len.max(1))?, rt.zeros::<T>(p_len.max(1))?);
        let mut row_dot_d = rt.zeros::<f32>(rows)?;
        let ms = median_ms(&rt, 2, 10, |_| {
            let dprefix = shared.then(|| CausalPrefixGrads {
                dk: dpk_d.as_view_mut(),
                dv: dpv_d.as_view_mut(),
            });
            rt.causal_attention_backward_with(
                &mut dq_d,
                &mut dk_d,
                &mut dv_d,
                dprefix,
                &mut row_dot_d,
                &dout_d,
                &out_d,
                &q_d,
                &k_d,
                &v_d,
                &lse_d,
                &mask_d,
                prefix.as_ref(),
                dims,
                None,
                kernels,
            )
        })?;
        // Useful FLOPs, as the forward's doubled (dv, dp, dq, dk).
        lab.row(
            &name("backward", shared),
            shape,
            errors[shared as usize][1],
            ms,
            T::flops(2.0 * flops),
        );
    }
    Ok(())
}

/// DeBERTa-v3-base's relative span: 256 log buckets over 512 positions, 512 position rows.
const DEBERTA_SPAN: (usize, usize) = (256, 512);

/// DeBERTa's disentangled attention in T (kernels/disentangled_attention.cu): the position
/// products and the attention with both position terms, validated against the CPU twins on
/// the same T-rounded inputs (the attention without and with dropout, gradients starting at
/// small values), then timed at DeBERTa-v3-base's sizes (8 x 512, 12 heads of 64, 512
/// position rows).
fn disentangled_attention<T: LabActivation>(lab: &mut Lab) -> Result<()> {
    let store = |x: &[f32]| x.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>();
    let load = |x: Vec<T>| x.into_iter().map(T::to_f32).collect::<Vec<f32>>();
    let name = |op: &str| format!("{op} {}", T::SUFFIX);
    let rt = lab.rt.clone();
    let up = |x: &[f32]| rt.upload(&store(x));
    let (b, t, nh, hs) = (CB, CT, 4, 32);
    let rows = 2 * cpu::attention_span(DEBERTA_SPAN.0, DEBERTA_SPAN.1);
    let relative = cpu::relative_positions(t, DEBERTA_SPAN.0, DEBERTA_SPAN.1);
    let (act, products) = (b * t * nh * hs, b * nh * t * rows);
    let scale = cpu::disentangled_scale(hs, 2);
    let mut errors = [0.0f64; 4]; // products forward, backward; attention forward, backward

    // The position products.
    let mut input = |len, s| load(store(&lab.rng.values(len, s)));
    let (x, pos, dout) = (
        input(act, 1.0),
        input(rows * nh * hs, 1.0),
        input(products, 1.0),
    );
    let (mut dx, mut dpos) = (input(act, 0.01), input(rows * nh * hs, 0.01));
    let mut out = vec![0.0; products];
    cpu::position_products_forward(&mut out, &x, &pos, b, t, nh, hs, rows);
    let (x_d, pos_d) = (up(&x)?, up(&pos)?);
    let mut out_d = up(&vec![f32::NAN; products])?;
    rt.position_products_forward(&mut out_d, &x_d, &pos_d, (b, t, nh, hs), rows)?;
    let parts = [("out", load(rt.download(&out_d)?), out)];
    errors[0] = lab.check_within(&name("position_products_forward"), &parts, T::TOLERANCE);
    let (mut dx_d, mut dpos_d) = (up(&dx)?, up(&dpos)?);
    rt.position_products_backward(
        &mut dx_d,
        &mut dpos_d,
        &up(&dout)?,
        &x_d,
        &pos_d,
        (b, t, nh, hs),
        rows,
    )?;
    cpu::position_products_backward(&mut dx, &mut dpos, &dout, &x, &pos, b, t, nh, hs, rows);
    let parts = [
        ("dx", load(rt.download(&dx_d)?), dx),
        ("dpos", load(rt.download(&dpos_d)?), dpos),
    ];
    errors[1] = lab.check_within(&name("position_products_backward"), &parts, T::TOLERANCE);

    // The attention, both terms.
    for dropout in [None, Some(cpu::AttentionDropout { p: 0.1, seed: 5 })] {
        let mut input = |len, s| load(store(&lab.rng.values(len, s)));
        let (q, k, v, dout) = (
            input(act, 1.0),
            input(act, 1.0),
            input(act, 1.0),
            input(act, 1.0),
        );
        let (c2p, p2c) = (input(products, 1.0), input(products, 1.0));
        let (mut dq, mut dk, mut dv) = (input(act, 0.01), input(act, 0.01), input(act, 0.01));
        let (mut dc2p, mut dp2c) = (input(products, 0.01), input(products, 0.01));
        let mask = padding_mask(&mut lab.rng, b, t);
        let terms = cpu::PositionTerms {
            c2p: Some(&c2p),
            p2c: Some(&p2c),
            relative: &relative,
            rows,
        };
        let (mut out, mut probs) = (vec![0.0; act], vec![0.0; b * nh * t * t]);
        cpu::disentangled_attention_forward(
            &mut out, &mut probs, &q, &k, &v, terms, &mask, b, t, nh, hs, scale, dropout,
        );
        let (q_d, k_d, v_d, dout_d) = (up(&q)?, up(&k)?, up(&v)?, up(&dout)?);
        let (c2p_d, p2c_d) = (up(&c2p)?, up(&p2c)?);
        let mask_d = rt.upload(&mask)?;
        let device_terms = || DevicePositionTerms {
            c2p: Some(&c2p_d),
            p2c: Some(&p2c_d),
            relative: &relative,
            rows,
        };
        let mut out_d = up(&vec![f32::NAN; act])?;
        let (mut out32_d, mut lse_d) = (lab.nan(act)?, lab.nan(b * nh * t)?);
        rt.disentangled_attention_forward(
            &mut out_d,
            &mut out32_d,
            &mut lse_d,
            &q_d,
            &k_d,
            &v_d,
            device_terms(),
            &mask_d,
            (b, t, nh, hs),
            scale,
            dropout,
        )?;
        let check = format!("{} {dropout:?}", name("disentangled_attention_forward"));
        let parts = [("out", load(rt.download(&out_d)?), out)];
        errors[2] = errors[2].max(lab.check_within(&check, &parts, T::TOLERANCE));

        let (mut dq_d, mut dk_d, mut dv_d) = (up(&dq)?, up(&dk)?, up(&dv)?);
        let (mut dc2p_d, mut dp2c_d) = (up(&dc2p)?, up(&dp2c)?);
        let mut row_dot_d = lab.nan(b * nh * t)?;
        rt.disentangled_attention_backward(
            &mut dq_d,
            &mut dk_d,
            &mut dv_d,
            DevicePositionGrads {
                dc2p: Some(dc2p_d.as_view_mut()),
                dp2c: Some(dp2c_d.as_view_mut()),
            },
            &mut row_dot_d,
            &dout_d,
            &out32_d,
            &q_d,
            &k_d,
            &v_d,
            device_terms(),
            &lse_d,
            &mask_d,
            (b, t, nh, hs),
            scale,
            dropout,
        )?;
        cpu::disentangled_attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            cpu::PositionGrads {
                dc2p: Some(&mut dc2p),
                dp2c: Some(&mut dp2c),
            },
            &dout,
            &q,
            &k,
            &v,
            terms,
            &probs,
            &mask,
            b,
            t,
            nh,
            hs,
            scale,
            dropout,
        );
        let parts = [
            ("dq", load(rt.download(&dq_d)?), dq),
            ("dk", load(rt.download(&dk_d)?), dk),
            ("dv", load(rt.download(&dv_d)?), dv),
            ("dc2p", load(rt.download(&dc2p_d)?), dc2p),
            ("dp2c", load(rt.download(&dp2c_d)?), dp2c),
        ];
        let check = format!("{} {dropout:?}", name("disentangled_attention_backward"));
        errors[3] = errors[3].max(lab.check_within(&check, &parts, T::TOLERANCE));
    }

    if lab.check_only {
        return Ok(());
    }
    // Time at DeBERTa-v3-base's sizes: 8 x 512, 12 heads of 64, 512 position rows.
    let dims = (B, T, NH, HS);
    let relative = cpu::relative_positions(T, DEBERTA_SPAN.0, DEBERTA_SPAN.1);
    let (act, products) = (N * C, B * NH * T * rows);
    let mut input = |len| rt.upload(&store(&lab.rng.values(len, 1.0)));
    let (x_d, pos_d) = (input(act)?, input(rows * C)?);
    let (q_d, k_d, v_d, dout_d) = (input(act)?, input(act)?, input(act)?, input(act)?);
    let (c2p_d, p2c_d, dproducts_d) = (input(products)?, input(products)?, input(products)?);
    let mask_d = rt.upload(&padding_mask(&mut lab.rng, B, T))?;
    let shape = "8x512, 12x64, 512 rows";
    let mut out_d = rt.zeros::<T>(products)?;
    let ms = median_ms(&rt, 2, 10, |_| {
        rt.position_products_forward(&mut out_d, &x_d, &pos_d, dims, rows)
    })?;
    let flops = 2.0 * (B * NH * T * rows * HS) as f64;
    lab.row(
        &name("position_products_fwd"),
        shape,
        errors[0],
        ms,
        T::flops(flops),
    );
    let (mut dx_d, mut dpos_d) = (rt.zeros::<T>(act)?, rt.zeros::<T>(rows * C)?);
    let ms = median_ms(&rt, 2, 10, |_| {
        rt.position_products_backward(
            &mut dx_d,
            &mut dpos_d,
            &dproducts_d,
            &x_d,
            &pos_d,
            dims,
            rows,
        )
    })?;
    lab.row(
        &name("position_products_bwd"),
        shape,
        errors[1],
        ms,
        T::flops(2.0 * flops),
    );

    let terms = || DevicePositionTerms {
        c2p: Some(&c2p_d),
        p2c: Some(&p2c_d),
        relative: &relative,
        rows,
    };
    let (mut out_d, mut out32_d) = (rt.zeros::<T>(act)?, rt.zeros::<f32>(act)?);
    let mut lse_d = rt.zeros::<f32>(B * NH * T)?;
    let ms = median_ms(&rt, 2, 10, |_| {
        rt.disentangled_attention_forward(
            &mut out_d,
            &mut out32_d,
            &mut lse_d,
            &q_d,
            &k_d,
            &v_d,
            terms(),
            &mask_d,
            dims,
            0.125,
            None,
        )
    })?;
    // Useful FLOPs, as flash attention's (the gathers of the position terms not counted).
    let flops = 4.0 * (B * NH * T * T * HS) as f64;
    lab.row(
        &name("disentangled_attn_fwd"),
        shape,
        errors[2],
        ms,
        T::flops(flops),
    );
    let (mut dq_d, mut dk_d, mut dv_d) = (
        rt.zeros::<T>(act)?,
        rt.zeros::<T>(act)?,
        rt.zeros::<T>(act)?,
    );
    let (mut dc2p_d, mut dp2c_d) = (rt.zeros::<T>(products)?, rt.zeros::<T>(products)?);
    let mut row_dot_d = rt.zeros::<f32>(B * NH * T)?;
    let ms = median_ms(&rt, 2, 10, |_| {
        rt.disentangled_attention_backward(
            &mut dq_d,
            &mut dk_d,
            &mut dv_d,
            DevicePositionGrads {
                dc2p: Some(dc2p_d.as_view_mut()),
                dp2c: Some(dp2c_d.as_view_mut()),
            },
            &mut row_dot_d,
            &dout_d,
            &out32_d,
            &q_d,
            &k_d,
            &v_d,
            terms(),
            &lse_d,
            &mask_d,
            dims,
            0.125,
            None,
        )
    })?;
    lab.row(
        &name("disentangled_attn_bwd"),
        shape,
        errors[3],
        ms,
        T::flops(2.0 * flops),
    );
    Ok(())
}
