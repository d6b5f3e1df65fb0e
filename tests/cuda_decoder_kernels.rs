//! The decoder kernels (kernels/rmsnorm.cu, swiglu.cu, rope.cu, attention_causal.cu) against
//! their CPU twins (rcx::backend::cpu), on random non-zero inputs at odd shapes: rows and
//! lengths not multiples of a block, padded sequences (the last of a batch all padding, so
//! some query rows have no key at all), nh != nkv, head sizes 8, 16, 64 (and 128, the
//! largest, which needs the raised shared memory limit), t not a multiple of the 16-row and
//! 32-row tiles, a shared prefix with a prompt that no sequence continues, attention with
//! and without dropout. Every kernel runs in f32 and in bf16; the causal attention's version
//! 2 (tensor cores) in bf16, with its own tolerances (causal_attention_tensor_cores_match_cpu).
//! Outputs are poisoned with NaN before a launch, so an element a kernel forgets is caught;
//! gradients start from random values, so `+=` versus `=` is caught.
//!
//! Also the three decoder ops that reuse or extend the BERT kernels (kernels/embedding.cu's
//! token_embedding_forward with the word-table backward, the residual add, kernels/pool.cu's
//! last-token pool), which are copies and fp32 sums: exact up to T's rounding, F32_SUM
//! for the table gradient.
//!
//! References: the CPU ops in f64 on the same (bf16-rounded) inputs, except RoPE in f32,
//! which the kernels match bit for bit (they round as the CPU does). Tolerances:
//! |gpu - cpu| <= rtol · (|cpu| + mean |cpu|) with rtol = 1e-5 for fp32 (1e-4 for sums over
//! rows or keys: RMSNorm's backward, attention), 1e-2 for values stored in bf16 (2e-2 for
//! the attention gradients in bf16, whose inputs are recomputed probabilities times bf16
//! rows); RoPE's cosines and sines 1e-6 (fp32), its rotation in f32 exactly.
//!
//! Without a GPU these tests rerun on the emulated device (tests/emu/fake_device.rs), as
//! tests/cuda_kernels.rs does; without either they print why they were skipped.

mod common;
#[path = "emu/build.rs"]
mod emu_build;
#[path = "emu/fake_device.rs"]
mod fake_device;

use common::cuda_check::{
    Act, F32, F32_SUM, assert_close_f64, check, download_f32, poisoned, rounded, upload_as, wide,
};
use common::{InputRng as Rng, gpu_or_skip as gpu};
use cudarc::driver::CudaSlice;
use half::bf16;
use rcx::backend::cpu::{self, AttentionDropout, Prefix, PrefixGrads};
use rcx::backend::cuda::decoder_ops::{CausalKernels, CausalPrefix, CausalPrefixGrads, launch};
use rcx::backend::cuda::{CudaRuntime, TokenBatch};

const BF16_ATTENTION_GRADS: f64 = 2e-2;
/// Version 2 (tensor cores) against the exact attention, per head row and on average: see
/// causal_attention_tensor_cores_match_cpu.
const TC_ROW: f64 = 5e-2;
const TC_ROW_GRADS: f64 = 1e-1;
const TC_MEAN: f64 = 2e-2;

// ---- RMSNorm -----------------------------------------------------------------------------

fn rmsnorm_case<T: Act>(rt: &CudaRuntime, rng: &mut Rng, (n, c): (usize, usize)) {
    let eps = 1e-6;
    let inp = rounded::<T>(&rng.values(n * c, 2.0));
    let weight = rng.values(c, 1.0);
    let (mut out, mut rstd) = (vec![0.0f64; n * c], vec![0.0f64; n]);
    cpu::rmsnorm_forward(&mut out, &mut rstd, &wide(&inp), &wide(&weight), n, c, eps);
    let (inp_d, weight_d) = (upload_as::<T>(rt, &inp), rt.upload(&weight).unwrap());
    let (mut out_d, mut rstd_d) = (poisoned::<T>(rt, n * c), poisoned::<f32>(rt, n));
    rt.rmsnorm_forward(&mut out_d, &mut rstd_d, &inp_d, &weight_d, n, c, eps)
        .unwrap();
    check(rt, "rmsnorm_forward out", &out_d, &out, F32);
    check(rt, "rmsnorm_forward rstd", &rstd_d, &rstd, F32);

    // The backward from the saved (fp32) statistic, the same on both sides.
    let rstd32: Vec<f32> = rstd.iter().map(|&x| x as f32).collect();
    let dout = rounded::<T>(&rng.values(n * c, 1.0));
    let dinp = rounded::<T>(&rng.values(n * c, 1.0));
    let dweight = rng.values(c, 1.0);
    let (mut dinp_d, mut dweight_d) = (upload_as::<T>(rt, &dinp), rt.upload(&dweight).unwrap());
    rt.rmsnorm_backward(
        &mut dinp_d,
        &mut dweight_d,
        &upload_as::<T>(rt, &dout),
        &inp_d,
        &weight_d,
        &rt.upload(&rstd32).unwrap(),
        n,
        c,
    )
    .unwrap();
    let (mut dinp, mut dweight) = (wide(&dinp), wide(&dweight));
    cpu::rmsnorm_backward(
        &mut dinp,
        &mut dweight,
        &wide(&dout),
        &wide(&inp),
        &wide(&weight),
        &wide(&rstd32),
        n,
        c,
    );
    check(rt, "rmsnorm_backward dinp", &dinp_d, &dinp, F32_SUM);
    check(
        rt,
        "rmsnorm_backward dweight",
        &dweight_d,
        &dweight,
        F32_SUM,
    );
}

#[test]
fn rmsnorm_matches_cpu() {
    let Some(rt) = gpu("rmsnorm_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(21);
    // One row and column; rows not a multiple of the 8 rows of a block, c below, at and
    // above 32 (partial column tiles); more rows than the 32 slices of the column sums.
    for shape in [(1, 1), (7, 45), (130, 33), (9, 256)] {
        rmsnorm_case::<f32>(&rt, &mut rng, shape);
        rmsnorm_case::<bf16>(&rt, &mut rng, shape);
    }
}

// ---- SwiGLU ------------------------------------------------------------------------------

fn swiglu_case<T: Act>(rt: &CudaRuntime, rng: &mut Rng, len: usize) {
    let gate = rounded::<T>(&rng.values(len, 6.0));
    let up = rounded::<T>(&rng.values(len, 2.0));
    let mut out = vec![0.0f64; len];
    cpu::swiglu_forward(&mut out, &wide(&gate), &wide(&up));
    let (gate_d, up_d) = (upload_as::<T>(rt, &gate), upload_as::<T>(rt, &up));
    let mut out_d = poisoned::<T>(rt, len);
    rt.swiglu_forward(&mut out_d, &gate_d, &up_d).unwrap();
    check(rt, "swiglu_forward out", &out_d, &out, F32);

    let dout = rounded::<T>(&rng.values(len, 1.0));
    let (dgate, dup) = (
        rounded::<T>(&rng.values(len, 1.0)),
        rounded::<T>(&rng.values(len, 1.0)),
    );
    let (mut dgate_d, mut dup_d) = (upload_as::<T>(rt, &dgate), upload_as::<T>(rt, &dup));
    rt.swiglu_backward(
        &mut dgate_d,
        &mut dup_d,
        &upload_as::<T>(rt, &dout),
        &gate_d,
        &up_d,
    )
    .unwrap();
    let (mut dgate, mut dup) = (wide(&dgate), wide(&dup));
    cpu::swiglu_backward(&mut dgate, &mut dup, &wide(&dout), &wide(&gate), &wide(&up));
    check(rt, "swiglu_backward dgate", &dgate_d, &dgate, F32);
    check(rt, "swiglu_backward dup", &dup_d, &dup, F32);
}

#[test]
fn swiglu_matches_cpu() {
    let Some(rt) = gpu("swiglu_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(22);
    // One element, a partial block of 256 threads, several blocks.
    for len in [1, 255, 1000] {
        swiglu_case::<f32>(&rt, &mut rng, len);
        swiglu_case::<bf16>(&rt, &mut rng, len);
    }
}

// ---- RoPE --------------------------------------------------------------------------------

fn rope_case<T: Act>(rt: &CudaRuntime, rng: &mut Rng, (n, heads, hs): (usize, usize, usize)) {
    let half = hs / 2;
    let case = format!("({}) {n}x{heads}x{hs}", T::SUFFIX);
    let scaling = cpu::Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64.0,
    };
    let inv_freq = cpu::rope_inv_freq(hs, 500_000.0, Some(scaling));
    // Positions up to 70 000: angles where an f32 product is far from the exact one.
    let positions = rng.below(n, 70_000);
    let (mut cos, mut sin) = (vec![0.0f64; n * half], vec![0.0f64; n * half]);
    cpu::rope_cos_sin(&mut cos, &mut sin, &positions, &inv_freq);
    let (mut cos_d, mut sin_d) = (poisoned::<T>(rt, n * half), poisoned::<T>(rt, n * half));
    rt.rope_cos_sin(
        &mut cos_d,
        &mut sin_d,
        &rt.upload(&positions).unwrap(),
        &rt.upload(&inv_freq).unwrap(),
        n,
        half,
    )
    .unwrap();
    check(rt, &format!("rope_cos_sin cos {case}"), &cos_d, &cos, 1e-6);
    check(rt, &format!("rope_cos_sin sin {case}"), &sin_d, &sin, 1e-6);

    // The rotation from the very tables the device holds (T-rounded), on both sides.
    let (cos_t, sin_t) = (download_f32(rt, &cos_d), download_f32(rt, &sin_d));
    let len = n * heads * hs;
    let inp = rounded::<T>(&rng.values(len, 2.0));
    let inp_d = upload_as::<T>(rt, &inp);
    let mut out_d = poisoned::<T>(rt, len);
    rt.rope_forward(&mut out_d, &inp_d, &cos_d, &sin_d, n, heads, hs)
        .unwrap();
    let mut in_place_d = upload_as::<T>(rt, &inp);
    rt.rope_forward_in_place(&mut in_place_d, &cos_d, &sin_d, n, heads, hs)
        .unwrap();
    let dout = rounded::<T>(&rng.values(len, 1.0));
    let dinp = rounded::<T>(&rng.values(len, 1.0));
    let mut dinp_d = upload_as::<T>(rt, &dinp);
    rt.rope_backward(
        &mut dinp_d,
        &upload_as::<T>(rt, &dout),
        &cos_d,
        &sin_d,
        n,
        heads,
        hs,
    )
    .unwrap();
    let (out, dinp_cpu) = if T::SUFFIX == "f32" {
        // f32: the CPU twin in f32, bit for bit.
        let mut out = vec![0.0f32; len];
        cpu::rope_forward(&mut out, &inp, &cos_t, &sin_t, n, heads, hs);
        let mut g = dinp.clone();
        cpu::rope_backward(&mut g, &dout, &cos_t, &sin_t, n, heads, hs);
        assert_eq!(download_f32(rt, &out_d), out, "rope_forward {case}");
        assert_eq!(
            download_f32(rt, &in_place_d),
            out,
            "rope_forward_in_place {case}"
        );
        assert_eq!(download_f32(rt, &dinp_d), g, "rope_backward {case}");
        (wide(&out), wide(&g))
    } else {
        let mut out = vec![0.0f64; len];
        let (cos64, sin64) = (wide(&cos_t), wide(&sin_t));
        cpu::rope_forward(&mut out, &wide(&inp), &cos64, &sin64, n, heads, hs);
        let mut g = wide(&dinp);
        cpu::rope_backward(&mut g, &wide(&dout), &cos64, &sin64, n, heads, hs);
        (out, g)
    };
    check(rt, &format!("rope_forward {case}"), &out_d, &out, F32);
    check(
        rt,
        &format!("rope_forward_in_place {case}"),
        &in_place_d,
        &out,
        F32,
    );
    check(
        rt,
        &format!("rope_backward {case}"),
        &dinp_d,
        &dinp_cpu,
        F32,
    );
}

#[test]
fn rope_matches_cpu() {
    let Some(rt) = gpu("rope_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(23);
    // Head sizes 2 (one pair), 8, 64 and 128; token counts that leave partial blocks.
    for shape in [(1, 1, 2), (5, 3, 8), (17, 4, 64), (3, 2, 128)] {
        rope_case::<f32>(&rt, &mut rng, shape);
        rope_case::<bf16>(&rt, &mut rng, shape);
    }
    // An odd head size is refused before any launch.
    let buf = rt.zeros::<f32>(6).unwrap();
    let mut out = rt.zeros::<f32>(6).unwrap();
    assert!(
        rt.rope_forward(&mut out, &buf, &buf, &buf, 2, 1, 3)
            .is_err()
    );
}

// ---- Causal attention --------------------------------------------------------------------

/// One attention problem: shapes, inputs as T stores them (in f32), the optional prefix.
struct Problem {
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    mask: Vec<u8>,
    prefix: Option<PrefixInputs>,
}

struct PrefixInputs {
    prompts: usize,
    len: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    mask: Vec<u8>,
    of_sequence: Vec<u32>,
}

impl Problem {
    /// `prefix`: (prompts, len), the last prompt continued by no sequence.
    fn new<T: Act>(
        rng: &mut Rng,
        (b, t, nh, nkv, hs): (usize, usize, usize, usize, usize),
        prefix: Option<(usize, usize)>,
    ) -> Problem {
        let prefix = prefix.map(|(prompts, len)| {
            let kv = prompts * len * nkv * hs;
            PrefixInputs {
                prompts,
                len,
                k: rounded::<T>(&rng.values(kv, 1.0)),
                v: rounded::<T>(&rng.values(kv, 1.0)),
                mask: rng.padding_mask(prompts, len),
                of_sequence: rng.below(b, (prompts as u32 - 1).max(1)),
            }
        });
        Problem {
            b,
            t,
            nh,
            nkv,
            hs,
            q: rounded::<T>(&rng.values(b * t * nh * hs, 1.0)),
            k: rounded::<T>(&rng.values(b * t * nkv * hs, 1.0)),
            v: rounded::<T>(&rng.values(b * t * nkv * hs, 1.0)),
            mask: rng.padding_mask(b, t),
            prefix,
        }
    }

    fn tp(&self) -> usize {
        self.prefix.as_ref().map_or(0, |p| p.len)
    }

    /// The CPU twin in f64: (out, probs).
    fn cpu_forward(
        &self,
        wide_prefix: Option<&(Vec<f64>, Vec<f64>)>,
        dropout: Option<AttentionDropout>,
    ) -> (Vec<f64>, Vec<f64>) {
        let mut out = vec![0.0; self.q.len()];
        let mut probs = vec![0.0; self.b * self.nh * self.t * (self.tp() + self.t)];
        cpu::causal_attention_forward(
            &mut out,
            &mut probs,
            &wide(&self.q),
            &wide(&self.k),
            &wide(&self.v),
            &self.mask,
            self.cpu_prefix(wide_prefix),
            self.b,
            self.t,
            self.nh,
            self.nkv,
            self.hs,
            dropout,
        );
        (out, probs)
    }

    fn cpu_prefix<'a>(&'a self, wide: Option<&'a (Vec<f64>, Vec<f64>)>) -> Option<Prefix<'a, f64>> {
        let (p, (k, v)) = (self.prefix.as_ref()?, wide?);
        Some(Prefix {
            k,
            v,
            mask: &p.mask,
            of_sequence: &p.of_sequence,
            prompts: p.prompts,
            len: p.len,
        })
    }

    /// lse [b, nh, t] in f64 from the CPU's probabilities' support and the scores:
    /// log Σ exp(s_ij) over the keys with non-zero weight; +inf where there are none.
    fn cpu_lse(&self, probs: &[f64]) -> Vec<f64> {
        let (t, nh, nkv, hs, tp) = (self.t, self.nh, self.nkv, self.hs, self.tp());
        let keys = tp + t;
        let scale = 1.0 / (hs as f64).sqrt();
        let mut lse = vec![0.0; self.b * nh * t];
        for bi in 0..self.b {
            for h in 0..nh {
                let g = h / (nh / nkv);
                for i in 0..t {
                    let row = (bi * nh + h) * t + i;
                    let q = &self.q[(bi * t + i) * nh * hs + h * hs..][..hs];
                    let mut sum = 0.0;
                    for j in 0..keys {
                        if probs[row * keys + j] == 0.0 {
                            continue;
                        }
                        let key = if j < tp {
                            let p = self.prefix.as_ref().unwrap();
                            let prompt = p.of_sequence[bi] as usize;
                            &p.k[(prompt * tp + j) * nkv * hs + g * hs..][..hs]
                        } else {
                            &self.k[(bi * t + j - tp) * nkv * hs + g * hs..][..hs]
                        };
                        let dot: f64 = q.iter().zip(key).map(|(&a, &b)| a as f64 * b as f64).sum();
                        sum += (scale * dot).exp();
                    }
                    lse[row] = if sum > 0.0 { sum.ln() } else { f64::INFINITY };
                }
            }
        }
        lse
    }
}

/// Version 1's tolerances in type T against the exact attention (f64 on the same rounded
/// inputs): (out, gradients), each |gpu - cpu| <= rtol · (|cpu| + mean |cpu|).
fn cuda_core_tolerances<T: Act>() -> (f64, f64) {
    if T::SUFFIX == "f32" {
        (F32_SUM, F32_SUM)
    } else {
        (F32_SUM, BF16_ATTENTION_GRADS)
    }
}

/// Version 2's check (see causal_attention_tensor_cores_match_cpu): per head row (hs
/// elements: one token's head), |gpu - cpu| <= row_rtol · (|cpu| + the larger of max |cpu|
/// over the row and mean |cpu| over the tensor); over the tensor, mean |gpu - cpu| <=
/// TC_MEAN · mean |cpu|.
fn check_tensor_cores<T: Act>(
    rt: &CudaRuntime,
    what: &str,
    buf: &CudaSlice<T>,
    cpu: &[f64],
    hs: usize,
    row_rtol: f64,
) {
    let gpu = wide(&download_f32(rt, buf));
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths differ");
    let mean_abs = cpu.iter().map(|c| c.abs()).sum::<f64>() / cpu.len().max(1) as f64;
    for (row, (g_row, c_row)) in gpu.chunks(hs).zip(cpu.chunks(hs)).enumerate() {
        let row_max = c_row.iter().fold(0.0f64, |m, c| m.max(c.abs()));
        for (d, (&g, &c)) in g_row.iter().zip(c_row).enumerate() {
            let tol = row_rtol * (c.abs() + row_max.max(mean_abs));
            assert!(
                (g - c).abs() <= tol || g == c,
                "{what}[row {row}, dim {d}]: gpu {g} vs cpu {c} (tolerance {tol:e})"
            );
        }
    }
    let error = gpu.iter().zip(cpu).map(|(g, c)| (g - c).abs()).sum::<f64>();
    let size = cpu.iter().map(|c| c.abs()).sum::<f64>();
    assert!(
        error <= TC_MEAN * size,
        "{what}: mean error {:e} of mean |cpu| {:e}, above {TC_MEAN}",
        error / cpu.len() as f64,
        size / cpu.len() as f64
    );
}

/// One attention problem through `kernels` (in type T) against the CPU twin in f64.
fn attention_case<T: Act>(
    rt: &CudaRuntime,
    rng: &mut Rng,
    dims: (usize, usize, usize, usize, usize),
    prefix: Option<(usize, usize)>,
    kernels: CausalKernels,
    dropout: Option<AttentionDropout>,
) {
    let problem = Problem::new::<T>(rng, dims, prefix);
    let (b, t, nh, nkv, hs) = dims;
    let case = format!(
        "({} {kernels:?}) b{b} t{t} nh{nh} nkv{nkv} hs{hs} prefix {prefix:?} dropout {dropout:?}",
        T::SUFFIX
    );
    let (out_rtol, grad_rtol) = cuda_core_tolerances::<T>();
    let tensor_cores = kernels == CausalKernels::TensorCores;
    let wide_prefix = problem.prefix.as_ref().map(|p| (wide(&p.k), wide(&p.v)));
    let (out, probs) = problem.cpu_forward(wide_prefix.as_ref(), dropout);
    let lse = problem.cpu_lse(&probs);

    let (q_d, k_d, v_d) = (
        upload_as::<T>(rt, &problem.q),
        upload_as::<T>(rt, &problem.k),
        upload_as::<T>(rt, &problem.v),
    );
    let mask_d = rt.upload(&problem.mask).unwrap();
    let prefix_d = problem.prefix.as_ref().map(|p| {
        (
            upload_as::<T>(rt, &p.k),
            upload_as::<T>(rt, &p.v),
            rt.upload(&p.mask).unwrap(),
            rt.upload(&p.of_sequence).unwrap(),
        )
    });
    let device_prefix = || {
        let p = problem.prefix.as_ref()?;
        let (k, v, mask, of_sequence) = prefix_d.as_ref()?;
        Some(CausalPrefix {
            k: k.as_view(),
            v: v.as_view(),
            mask: mask.as_view(),
            of_sequence: of_sequence.as_view(),
            prompts: p.prompts,
            len: p.len,
        })
    };
    let (mut out_d, mut lse_d) = (poisoned::<T>(rt, out.len()), poisoned::<f32>(rt, lse.len()));
    rt.causal_attention_forward_with(
        &mut out_d,
        &mut lse_d,
        &q_d,
        &k_d,
        &v_d,
        &mask_d,
        device_prefix().as_ref(),
        dims,
        dropout,
        kernels,
    )
    .unwrap();
    let what = format!("causal_attention_forward out {case}");
    if tensor_cores {
        check_tensor_cores(rt, &what, &out_d, &out, hs, TC_ROW);
    } else {
        check(rt, &what, &out_d, &out, out_rtol);
    }
    let lse_gpu = wide(&download_f32(rt, &lse_d));
    let finite = |x: &[f64]| {
        x.iter()
            .map(|&v| if v.is_finite() { v } else { 0.0 })
            .collect::<Vec<_>>()
    };
    for (i, (g, c)) in lse_gpu.iter().zip(&lse).enumerate() {
        assert_eq!(
            g.is_finite(),
            c.is_finite(),
            "causal_attention_forward lse[{i}] {case}: gpu {g} vs cpu {c}"
        );
    }
    assert_close_f64(
        &format!("causal_attention_forward lse {case}"),
        &finite(&lse_gpu),
        &finite(&lse),
        F32_SUM,
    );

    // The backward from the device's own out and lse; gradients start from random values
    // (small ones on tensor cores, so that `+=` shows without hiding the attention's own
    // error in a larger tolerance).
    let dout = rounded::<T>(&rng.values(out.len(), 1.0));
    let start = if tensor_cores { 0.01 } else { 1.0 };
    let starts: Vec<Vec<f32>> = [problem.q.len(), problem.k.len(), problem.k.len()]
        .iter()
        .map(|&len| rounded::<T>(&rng.values(len, start)))
        .collect();
    let prefix_starts: Option<[Vec<f32>; 2]> = problem.prefix.as_ref().map(|p| {
        [
            rounded::<T>(&rng.values(p.k.len(), start)),
            rounded::<T>(&rng.values(p.k.len(), start)),
        ]
    });
    let (mut dq_d, mut dk_d, mut dv_d) = (
        upload_as::<T>(rt, &starts[0]),
        upload_as::<T>(rt, &starts[1]),
        upload_as::<T>(rt, &starts[2]),
    );
    let mut dprefix_d = prefix_starts
        .as_ref()
        .map(|[dk, dv]| (upload_as::<T>(rt, dk), upload_as::<T>(rt, dv)));
    let mut row_dot_d = poisoned::<f32>(rt, lse.len());
    rt.causal_attention_backward_with(
        &mut dq_d,
        &mut dk_d,
        &mut dv_d,
        dprefix_d.as_mut().map(|(dk, dv)| CausalPrefixGrads {
            dk: dk.as_view_mut(),
            dv: dv.as_view_mut(),
        }),
        &mut row_dot_d,
        &upload_as::<T>(rt, &dout),
        &out_d,
        &q_d,
        &k_d,
        &v_d,
        &lse_d,
        &mask_d,
        device_prefix().as_ref(),
        dims,
        dropout,
        kernels,
    )
    .unwrap();
    let (mut dq, mut dk, mut dv) = (wide(&starts[0]), wide(&starts[1]), wide(&starts[2]));
    let mut dprefix = prefix_starts.as_ref().map(|[dk, dv]| (wide(dk), wide(dv)));
    // The CPU backward from its own probabilities; the device's out (stored in T) fed its
    // row dots, so bf16's tolerance covers the difference.
    cpu::causal_attention_backward(
        &mut dq,
        &mut dk,
        &mut dv,
        dprefix.as_mut().map(|(dk, dv)| PrefixGrads { dk, dv }),
        &wide(&dout),
        &wide(&problem.q),
        &wide(&problem.k),
        &wide(&problem.v),
        &probs,
        &problem.mask,
        problem.cpu_prefix(wide_prefix.as_ref()),
        b,
        t,
        nh,
        nkv,
        hs,
        dropout,
    );
    let mut grads = vec![("dq", dq_d, dq), ("dk", dk_d, dk), ("dv", dv_d, dv)];
    if let (Some((dk_p, dv_p)), Some((dk_pd, dv_pd))) = (dprefix, dprefix_d) {
        grads.push(("prefix dk", dk_pd, dk_p));
        grads.push(("prefix dv", dv_pd, dv_p));
    }
    for (name, gpu, cpu) in &grads {
        let what = format!("causal_attention_backward {name} {case}");
        if tensor_cores {
            check_tensor_cores(rt, &what, gpu, cpu, hs, TC_ROW_GRADS);
        } else {
            check(rt, &what, gpu, cpu, grad_rtol);
        }
    }
}

/// Attention dims (b, t, nh, nkv, hs) and prefix (prompts, prefix len).
type AttentionCase = ((usize, usize, usize, usize, usize), Option<(usize, usize)>);

fn attention_cases(test: &str, seed: u64, cases: &[AttentionCase]) {
    let Some(rt) = gpu(test) else {
        return;
    };
    let mut rng = Rng::new(seed);
    let cuda_cores = CausalKernels::CudaCores;
    for &(dims, prefix) in cases {
        for dropout in [None, Some(AttentionDropout { p: 0.2, seed: 79 })] {
            attention_case::<f32>(&rt, &mut rng, dims, prefix, cuda_cores, dropout);
            attention_case::<bf16>(&rt, &mut rng, dims, prefix, cuda_cores, dropout);
        }
    }
}

/// One token; t below, between and above the 16-row and 32-row tiles; grouped heads (4
/// query heads per key/value head, and 2); head sizes 8 and 16.
#[test]
fn causal_attention_matches_cpu() {
    attention_cases(
        "causal_attention_matches_cpu",
        24,
        &[
            ((1, 1, 1, 1, 8), None),
            ((3, 19, 4, 1, 8), None),
            ((2, 37, 4, 2, 16), None),
        ],
    );
}

/// Prefixes shorter and longer than a tile, each with a prompt no sequence continues (its
/// gradients must stay as they were), sequences with no own real token.
#[test]
fn causal_attention_with_prefix_matches_cpu() {
    attention_cases(
        "causal_attention_with_prefix_matches_cpu",
        25,
        &[
            ((4, 9, 2, 1, 16), Some((3, 5))),
            ((3, 7, 2, 2, 8), Some((2, 35))),
        ],
    );
}

/// Head sizes 64 and 128 (the largest; the backward then raises the kernels' shared memory
/// limit past 48 KiB), with a prefix.
#[test]
fn causal_attention_large_heads_match_cpu() {
    attention_cases(
        "causal_attention_large_heads_match_cpu",
        26,
        &[
            ((2, 17, 2, 1, 64), Some((2, 6))),
            ((1, 18, 1, 1, 128), Some((2, 7))),
        ],
    );
}

/// Version 2 (tensor cores, bf16) against the exact attention (f64 on the same rounded
/// inputs), with and without dropout (p = 0.2; the CPU's mask bit for bit, so a dropped
/// weight is dropped on both sides): one token; grouped heads (4 query heads per key/value
/// head, and 2); padding (the last sequence all padding: rows with no key at all); t over
/// one 64-row tile; prefixes shorter and longer than a tile, each with a prompt that no
/// sequence continues; head sizes 16, 32, 64 and 128 (whose backward streams tiles of 32).
///
/// Tolerances: the kernels round the probabilities (and their gradients) to bf16 before they
/// multiply, as FlashAttention-2 in bf16 does, and (as version 1 in bf16) take the row dots
/// D_i = dout_i · out_i from the bf16 out. So they are compared with the exact attention
/// per head row, |gpu - cpu| <= rtol · (|cpu| + max(max |cpu| over the row, mean |cpu| over
/// the tensor)): the rounding errors scale with the terms a row sums, not with the element,
/// which may cancel to nearly 0. rtol = TC_ROW = 5e-2 for out (as BERT's version 3 against
/// the exact attention, docs/gpu.md), TC_ROW_GRADS = 1e-1 for the gradients: a row whose
/// exact gradient vanishes (a query with one allowed key: ds = 0) keeps scale · ΔD · k, and
/// with dropout's 1.25 the bf16 out rounds, |ΔD| up to about 0.03 at hs = 128 (an f64
/// simulation of 2000 such rows of random bf16 values: mean 0.007, 99th percentile 0.02).
/// And on average over each tensor, mean |gpu - cpu| <= TC_MEAN = 2e-2 · mean |cpu|, which
/// a wrong weight (a mask, a dropout index, a missing prefix term) breaks however few
/// elements it touches (measured: at most 0.3%, but 1.05% for the prefix dk of a prompt with
/// one real key, whose exact gradient is 0 and only the start values remain). Measured on the emulated device at these shapes: docs/gpu.md.
#[test]
fn causal_attention_tensor_cores_match_cpu() {
    let Some(rt) = gpu("causal_attention_tensor_cores_match_cpu") else {
        return;
    };
    let mut rng = Rng::new(27);
    let cases: [AttentionCase; 5] = [
        ((1, 1, 1, 1, 16), None),
        ((3, 19, 4, 1, 16), None),
        ((2, 70, 4, 2, 32), Some((3, 5))),
        ((3, 9, 2, 1, 64), Some((2, 67))),
        ((2, 37, 2, 2, 128), Some((2, 7))),
    ];
    for (dims, prefix) in cases {
        for dropout in [None, Some(AttentionDropout { p: 0.2, seed: 78 })] {
            // One token with dropout: the exact dq and dk vanish, only the rounding of the
            // bf16 out (in the row dots) is left, which no relative tolerance measures.
            if dims.1 == 1 && dropout.is_some() {
                continue;
            }
            let kernels = CausalKernels::TensorCores;
            attention_case::<bf16>(&rt, &mut rng, dims, prefix, kernels, dropout);
        }
    }
}

/// The model's choice: tensor cores for bf16 at head sizes that are multiples of 16 up to
/// 128, version 1 otherwise; what a version cannot run (and a dropout p outside [0, 1)) is
/// refused before any launch.
#[test]
fn causal_attention_kernels_by_shape() {
    assert_eq!(
        CausalKernels::for_shape::<bf16>(64),
        CausalKernels::TensorCores
    );
    assert_eq!(
        CausalKernels::for_shape::<bf16>(128),
        CausalKernels::TensorCores
    );
    for hs in [8, 24, 144] {
        assert_eq!(
            CausalKernels::for_shape::<bf16>(hs),
            CausalKernels::CudaCores
        );
    }
    assert_eq!(
        CausalKernels::for_shape::<f32>(64),
        CausalKernels::CudaCores
    );
    let Some(rt) = gpu("causal_attention_kernels_by_shape") else {
        return;
    };
    let mask = rt.upload(&[1u8]).unwrap();
    let forward = |hs: usize, kernels, dropout, f32_inputs: bool| {
        let mut lse = rt.zeros::<f32>(1).unwrap();
        let result = if f32_inputs {
            let buf = rt.zeros::<f32>(hs).unwrap();
            let mut out = rt.zeros::<f32>(hs).unwrap();
            rt.causal_attention_forward_with(
                &mut out,
                &mut lse,
                &buf,
                &buf,
                &buf,
                &mask,
                None,
                (1, 1, 1, 1, hs),
                dropout,
                kernels,
            )
        } else {
            let buf = rt.zeros::<bf16>(hs).unwrap();
            let mut out = rt.zeros::<bf16>(hs).unwrap();
            rt.causal_attention_forward_with(
                &mut out,
                &mut lse,
                &buf,
                &buf,
                &buf,
                &mask,
                None,
                (1, 1, 1, 1, hs),
                dropout,
                kernels,
            )
        };
        result.map_err(|e| e.to_string())
    };
    let dropout = Some(AttentionDropout { p: 0.1, seed: 1 });
    let tc = CausalKernels::TensorCores;
    let err = forward(16, tc, None, true).unwrap_err();
    assert!(err.contains("bf16"), "{err}");
    let err = forward(8, tc, None, false).unwrap_err();
    assert!(err.contains("multiples of 16"), "{err}");
    forward(16, tc, dropout, false).unwrap();
    forward(8, CausalKernels::CudaCores, dropout, true).unwrap();
    let bad = Some(AttentionDropout { p: 1.0, seed: 1 });
    let err = forward(8, CausalKernels::CudaCores, bad, true).unwrap_err();
    assert!(err.contains("not in [0, 1)"), "{err}");
}

#[test]
fn causal_attention_refuses_bad_shapes() {
    let Some(rt) = gpu("causal_attention_refuses_bad_shapes") else {
        return;
    };
    let buf = rt.zeros::<f32>(48).unwrap();
    let mask = rt.zeros::<u8>(2).unwrap();
    let mut out = rt.zeros::<f32>(48).unwrap();
    let mut lse = rt.zeros::<f32>(6).unwrap();
    // 3 query heads over 2 key/value heads.
    let err = rt
        .causal_attention_forward(
            &mut out,
            &mut lse,
            &buf,
            &buf,
            &buf,
            &mask,
            None,
            (1, 2, 3, 2, 8),
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not divide"), "{err}");
    // A buffer of the wrong length.
    let short = rt.zeros::<f32>(47).unwrap();
    let err = rt
        .causal_attention_forward(
            &mut out,
            &mut lse,
            &short,
            &buf,
            &buf,
            &mask,
            None,
            (1, 2, 3, 3, 8),
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("q has 47 elements"), "{err}");
}

/// The launch shapes are pure functions of the shapes (runs without a GPU).
#[test]
fn causal_launch_shapes() {
    let shape = launch::causal_forward("t", 33, 6, 64).unwrap();
    assert_eq!((shape.grid, shape.block), ((3, 6, 1), 128));
    assert_eq!(
        shape.shared_bytes as usize,
        4 * (16 * 64 + 32 * 65 + 32 * 64)
    );
    // hs = 128: the backward needs more than the default 48 KiB.
    let shape = launch::causal_backward("t", 512, 8, 128).unwrap();
    assert_eq!(
        shape.shared_bytes as usize,
        4 * (2 * 16 * 128 + 2 * 32 * 129)
    );
    assert!(shape.shared_opt_in().is_some());
    assert!(launch::causal_forward("t", 8, 1, 129).is_err());
    assert!(launch::causal_forward("t", 8, 70_000, 64).is_err());
    // Version 2: rows of hs + 8 bf16, per warp scratches [16, tile + 4] fp32 and weights
    // [16, tile + 8] bf16; backward tiles of 64 rows up to hs = 64, then 32.
    let shape = launch::causal_tc_forward("t", 65, 6, 64).unwrap();
    assert_eq!((shape.grid, shape.block), ((2, 6, 1), 128));
    assert_eq!(
        shape.shared_bytes as usize,
        (64 + 2 * 64) * 72 * 2 + 4 * 16 * 68 * 4 + 4 * 16 * 72 * 2
    );
    let shape = launch::causal_tc_backward_key("t", 64, 3, 64).unwrap();
    assert_eq!(
        shape.shared_bytes as usize,
        (2 * 64 + 2 * 64) * 72 * 2 + 4 * 2 * 16 * 68 * 4 + 4 * 2 * 16 * 72 * 2 + 2 * 64 * 4
    );
    let shape = launch::causal_tc_backward_query("t", 64, 3, 128).unwrap();
    assert_eq!(
        shape.shared_bytes as usize,
        (2 * 64 + 2 * 32) * 136 * 2 + 4 * 2 * 16 * 36 * 4 + 4 * 16 * 40 * 2
    );
    assert!(shape.shared_opt_in().is_some());
    assert!(launch::causal_tc_forward("t", 8, 1, 8).is_err());
    assert!(launch::causal_tc_forward("t", 8, 1, 144).is_err());
}

// ---- token embedding, residual add, last-token pool ------------------------------------

/// (b, t, vocab, c).
type Dims4 = (usize, usize, usize, usize);

fn token_embedding_case<T: Act>(rt: &CudaRuntime, rng: &mut Rng, (b, t, vocab, c): Dims4) {
    let ids = rng.below(b * t, vocab as u32);
    let wte = rng.values(vocab * c, 1.0);
    let tokens = TokenBatch::new(rt, &ids, &vec![0; b * t], b, t, (vocab, t, 1)).unwrap();
    let mut out = vec![0.0f64; b * t * c];
    cpu::token_embedding_forward(&mut out, &ids, &wide(&wte), c);
    let wte_d = rt.upload(&wte).unwrap();
    let mut out_d = poisoned::<T>(rt, b * t * c);
    rt.token_embedding_forward(&mut out_d, &tokens, &wte_d, c)
        .unwrap();
    // A copy rounded to T: exact up to that rounding.
    check(rt, "token_embedding_forward out", &out_d, &out, 0.0);

    let dout = rounded::<T>(&rng.values(b * t * c, 1.0));
    let dwte = rng.values(vocab * c, 1.0);
    let mut dwte_d = rt.upload(&dwte).unwrap();
    rt.token_embedding_backward(&mut dwte_d, &upload_as::<T>(rt, &dout), &tokens, c)
        .unwrap();
    let mut dwte = wide(&dwte);
    cpu::token_embedding_backward(&mut dwte, &wide(&dout), &ids, c);
    // fp32 sums over the positions of each id.
    check(rt, "token_embedding_backward dwte", &dwte_d, &dwte, F32_SUM);
}

#[test]
fn token_embedding_matches_cpu() {
    let Some(rt) = gpu("token_embedding_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(31);
    // (b, t, vocab, c): ids mostly distinct (one block per row), and a vocabulary of 3
    // over 300 positions (at least 32 positions per row: the tiled column reduction);
    // c not a multiple of 32.
    for dims in [(3, 7, 50, 45), (2, 150, 3, 40)] {
        token_embedding_case::<f32>(&rt, &mut rng, dims);
        token_embedding_case::<bf16>(&rt, &mut rng, dims);
    }
}

fn residual_case<T: Act>(rt: &CudaRuntime, rng: &mut Rng, len: usize) {
    let a = rounded::<T>(&rng.values(len, 2.0));
    let b = rounded::<T>(&rng.values(len, 2.0));
    let mut out = vec![0.0f64; len];
    cpu::residual_forward(&mut out, &wide(&a), &wide(&b));
    let mut out_d = poisoned::<T>(rt, len);
    rt.residual_forward(&mut out_d, &upload_as::<T>(rt, &a), &upload_as::<T>(rt, &b))
        .unwrap();
    check(rt, "residual_forward out", &out_d, &out, F32);

    let dout = rounded::<T>(&rng.values(len, 1.0));
    let (da, db) = (
        rounded::<T>(&rng.values(len, 1.0)),
        rounded::<T>(&rng.values(len, 1.0)),
    );
    let (mut da_d, mut db_d) = (upload_as::<T>(rt, &da), upload_as::<T>(rt, &db));
    rt.residual_backward(&mut da_d, &mut db_d, &upload_as::<T>(rt, &dout))
        .unwrap();
    let (mut da, mut db) = (wide(&da), wide(&db));
    cpu::residual_backward(&mut da, &mut db, &wide(&dout));
    check(rt, "residual_backward da", &da_d, &da, F32);
    check(rt, "residual_backward db", &db_d, &db, F32);
}

#[test]
fn residual_matches_cpu() {
    let Some(rt) = gpu("residual_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(32);
    for len in [1, 255, 1000] {
        residual_case::<f32>(&rt, &mut rng, len);
        residual_case::<bf16>(&rt, &mut rng, len);
    }
}

fn last_token_pool_case<T: Act>(rt: &CudaRuntime, rng: &mut Rng, (b, t, c): (usize, usize, usize)) {
    let rows = rng.below(b, t as u32);
    let inp = rounded::<T>(&rng.values(b * t * c, 2.0));
    let mut out = vec![0.0f64; b * c];
    cpu::last_token_pool_forward(&mut out, &wide(&inp), &rows, t, c);
    let mut out_d = poisoned::<T>(rt, b * c);
    rt.last_token_pool_forward(&mut out_d, &upload_as::<T>(rt, &inp), &rows, t, c)
        .unwrap();
    check(rt, "last_token_pool_forward out", &out_d, &out, 0.0);

    let dout = rounded::<T>(&rng.values(b * c, 1.0));
    let dinp = rounded::<T>(&rng.values(b * t * c, 1.0));
    let mut dinp_d = upload_as::<T>(rt, &dinp);
    rt.last_token_pool_backward(&mut dinp_d, &upload_as::<T>(rt, &dout), &rows, t, c)
        .unwrap();
    let mut dinp = wide(&dinp);
    cpu::last_token_pool_backward(&mut dinp, &wide(&dout), &rows, t, c);
    check(rt, "last_token_pool_backward dinp", &dinp_d, &dinp, F32);
}

#[test]
fn last_token_pool_matches_cpu() {
    let Some(rt) = gpu("last_token_pool_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(33);
    // (b, t, c): one sequence of one token; rows anywhere in t; b·c over one block.
    for dims in [(1, 1, 1), (5, 9, 33), (4, 3, 100)] {
        last_token_pool_case::<f32>(&rt, &mut rng, dims);
        last_token_pool_case::<bf16>(&rt, &mut rng, dims);
    }
    // A row outside its sequence is refused before any launch.
    let (inp, mut out) = (poisoned::<f32>(&rt, 2 * 3 * 4), poisoned::<f32>(&rt, 2 * 4));
    let err = rt
        .last_token_pool_forward(&mut out, &inp, &[1, 3], 3, 4)
        .unwrap_err();
    assert!(err.to_string().contains("outside its 3 tokens"), "{err}");
}

/// Every test above, rerun on the emulated device (tests/emu/fake_device.rs) when this
/// machine has no GPU: the kernels on the CPU emulator behind a fake driver.
#[test]
fn all_gpu_tests_on_the_emulated_device() {
    let itself = "all_gpu_tests_on_the_emulated_device";
    fake_device::rerun_on_emulated_device(itself, &["--skip", itself]);
}
