//! The CUDA kernels against their CPU twins (rcx::backend::cpu, rcx::loss), on random
//! non-zero inputs at odd shapes (padded sequences, prompts of 2..70 completions), every
//! activation kernel in f32 and in bf16. Outputs are poisoned with NaN before every launch,
//! so an element a kernel forgets is caught; gradients start from random values, so `+=`
//! versus `=` is caught too. The references are the CPU ops in f64 on the same (bf16-rounded)
//! inputs where the comparison has a tolerance, in f32 where it is bit for bit.
//!
//! Tolerances: |gpu - cpu| <= rtol · (|cpu| + mean |cpu|), rtol = 1e-5 for fp32 (1e-4 for
//! long fp32 reductions such as weight gradients), 1e-2 for values stored in bf16; f64
//! results (loss, norm) 1e-12.
//!
//! Without a GPU (or without kernels) every device test prints why it was skipped and
//! passes; set RCX_REQUIRE_GPU=1 on a GPU machine to make a skip a failure.

mod common;
#[path = "emu/build.rs"]
mod emu_build;
#[path = "emu/fake_device.rs"]
mod fake_device;

use common::cuda_check::{
    Act, BF16, F32, F32_SUM, assert_close, assert_close_f64, check, download_f32, poisoned,
    rounded, upload_as, wide,
};
use common::{InputRng as Rng, gpu_or_skip as gpu};
use cudarc::driver::CudaSlice;
use half::bf16;
use rcx::backend::cpu::{self, AttentionDropout};
use rcx::backend::cuda::{
    self, AdamWStep, CudaRuntime, FlashKernels, KERNEL_IMAGES, KERNELS_BUILT, RankingBatch,
    TokenBatch,
};
use rcx::loss::{LossSpec, PromptType, Utility, ranking_loss_forward_backward};

/// Attention version 3 (tensor cores) against the exact attention: see
/// flash_attention_tensor_cores_match_cpu.
const TC_EXACT: f64 = 5e-2;

/// Odd shapes (n, c) of the column reductions (launch::column_tiles: tiles of 32 columns,
/// 32 slices of rows): one row and one column, partial tiles and slices, several tiles,
/// many rows per slice.
const COLUMN_SHAPES: [(usize, usize); 4] = [(1, 1), (7, 45), (130, 33), (4099, 37)];

#[test]
fn kernels_embedded() {
    let require = std::env::var("RCX_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    if !require {
        eprintln!(
            "kernels_embedded: skipped (RCX_REQUIRE_CUDA is not 1); this build has kernels: {KERNELS_BUILT}"
        );
        return;
    }
    if !KERNELS_BUILT {
        panic!("RCX_REQUIRE_CUDA=1 but the kernels were not built");
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels");
    let mut sources: Vec<String> = std::fs::read_dir(dir)
        .expect("kernels/")
        .map(|e| e.expect("kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    sources.sort();
    let embedded: Vec<&str> = KERNEL_IMAGES.iter().map(|k| k.name).collect();
    assert_eq!(embedded, sources, "every kernels/*.cu must be embedded");
    for image in KERNEL_IMAGES {
        for (kind, ptx) in [
            ("compute_90", image.ptx_compute_90),
            ("compute_80", image.ptx_compute_80),
        ] {
            assert!(
                ptx.contains(&format!(".target sm_{}", &kind[8..])) && ptx.contains(".entry"),
                "{}: the {kind} PTX has no entry point for its target",
                image.name
            );
        }
        // An ELF file: the cubin.
        assert_eq!(
            &image.cubin_sm_90[..4],
            b"\x7fELF",
            "{}: the sm_90 cubin is not ELF",
            image.name
        );
    }
}

#[test]
fn unavailable_backend_is_an_error_not_a_panic() {
    if let Err(why) = cuda::available() {
        assert!(!why.is_empty());
        let err = match CudaRuntime::new(0) {
            Ok(_) => panic!("available() said no ({why}) but the runtime opened"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(&why),
            "the runtime error `{err}` should say why: `{why}`"
        );
        if !KERNELS_BUILT {
            assert!(why.contains("without CUDA kernels"), "{why}");
        }
    } else {
        eprintln!("unavailable_backend_is_an_error_not_a_panic: skipped, a GPU is present");
    }
}

// ---- Kernel cases ------------------------------------------------------------------------

/// Returns the backward kernels the two tables take (ops.rs chooses by the ids).
fn embedding_case<T: Act>(
    rt: &CudaRuntime,
    rng: &mut Rng,
    (b, t, c): (usize, usize, usize),
) -> [&'static str; 2] {
    let (vocab, max_pos, ntypes) = (23, t + 3, 2);
    // Few distinct ids, so rows repeat and the backward really sums.
    let ids = rng.below(b * t, vocab as u32);
    let types = rng.below(b * t, ntypes as u32);
    let (wte, wpe, wtt) = (
        rng.values(vocab * c, 1.0),
        rng.values(max_pos * c, 1.0),
        rng.values(ntypes * c, 1.0),
    );
    let tokens = TokenBatch::new(rt, &ids, &types, b, t, (vocab, max_pos, ntypes)).unwrap();
    let mut expected = vec![0.0f64; b * t * c];
    cpu::embedding_forward(
        &mut expected,
        &ids,
        &types,
        &wide(&wte),
        &wide(&wpe),
        &wide(&wtt),
        b,
        t,
        c,
    );
    let (wte_d, wpe_d, wtt_d) = (
        rt.upload(&wte).unwrap(),
        rt.upload(&wpe).unwrap(),
        rt.upload(&wtt).unwrap(),
    );
    let mut out = poisoned::<T>(rt, b * t * c);
    rt.embedding_forward(&mut out, &tokens, &wte_d, &wpe_d, &wtt_d, c)
        .unwrap();
    check(rt, "embedding_forward", &out, &expected, F32);

    let dout = rounded::<T>(&rng.values(b * t * c, 1.0));
    let (dwte, dwpe, dwtt) = (
        rng.values(vocab * c, 1.0),
        rng.values(max_pos * c, 1.0),
        rng.values(ntypes * c, 1.0),
    );
    let (mut dwte_d, mut dwpe_d, mut dwtt_d) = (
        rt.upload(&dwte).unwrap(),
        rt.upload(&dwpe).unwrap(),
        rt.upload(&dwtt).unwrap(),
    );
    rt.embedding_backward(
        &mut dwte_d,
        &mut dwpe_d,
        &mut dwtt_d,
        &upload_as::<T>(rt, &dout),
        &tokens,
        c,
    )
    .unwrap();
    let (mut dwte, mut dwpe, mut dwtt) = (wide(&dwte), wide(&dwpe), wide(&dwtt));
    cpu::embedding_backward(
        &mut dwte,
        &mut dwpe,
        &mut dwtt,
        &wide(&dout),
        &ids,
        &types,
        b,
        t,
        c,
    );
    check(rt, "embedding_backward dwte", &dwte_d, &dwte, F32_SUM);
    check(rt, "embedding_backward dwpe", &dwpe_d, &dwpe, F32_SUM);
    check(rt, "embedding_backward dwtt", &dwtt_d, &dwtt, F32_SUM);
    [&ids, &types].map(|ids| {
        let distinct = ids.iter().collect::<std::collections::BTreeSet<_>>().len();
        cuda::launch::embedding_table("test", b * t, c, distinct)
            .unwrap()
            .0
    })
}

#[test]
fn embedding_matches_cpu() {
    let Some(rt) = gpu("embedding_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(1);
    let mut used = Vec::new();
    // 23 word ids and 2 types: few positions per row take the per-row kernel, many (b*t
    // >= 32 rows' worth) the tiled one; c below, above and not a multiple of 32.
    for shape in [
        (2, 7, 48),
        (3, 13, 40),
        (1, 33, 96),
        (3, 70, 45),
        (8, 100, 33),
    ] {
        used.extend(embedding_case::<f32>(&rt, &mut rng, shape));
        used.extend(embedding_case::<bf16>(&rt, &mut rng, shape));
    }
    for kernel in ["embedding_backward_rows", "embedding_backward_rows_tiled"] {
        let tables = used.iter().filter(|&&k| k == kernel).count();
        assert!(tables >= 4, "{kernel} ran for {tables} tables: {used:?}");
    }
    // Ids outside the tables are refused before any launch.
    assert!(TokenBatch::new(&rt, &[5], &[0], 1, 1, (5, 4, 2)).is_err());
}

fn layernorm_case<T: Act>(rt: &CudaRuntime, rng: &mut Rng, (n, c): (usize, usize)) {
    let eps = 1e-12;
    let (a, b) = (
        rounded::<T>(&rng.values(n * c, 2.0)),
        rounded::<T>(&rng.values(n * c, 2.0)),
    );
    let (weight, bias) = (rng.values(c, 1.0), rng.values(c, 1.0));
    // The residual sum as T stores it: the kernels normalise the stored sum.
    let sum: Vec<f32> = rounded::<T>(&a.iter().zip(&b).map(|(x, y)| x + y).collect::<Vec<_>>());
    let (mut out, mut mean, mut rstd) = (vec![0.0f64; n * c], vec![0.0f64; n], vec![0.0f64; n]);
    cpu::layernorm_forward(
        &mut out,
        &mut mean,
        &mut rstd,
        &wide(&sum),
        &wide(&weight),
        &wide(&bias),
        n,
        c,
        eps,
    );
    let (w_d, b_d, sum_in) = (
        rt.upload(&weight).unwrap(),
        rt.upload(&bias).unwrap(),
        upload_as::<T>(rt, &sum),
    );
    let (mut out_d, mut mean_d, mut rstd_d) = (
        poisoned::<T>(rt, n * c),
        poisoned::<f32>(rt, n),
        poisoned::<f32>(rt, n),
    );
    rt.layernorm_forward(
        &mut out_d,
        &mut mean_d,
        &mut rstd_d,
        &sum_in,
        &w_d,
        &b_d,
        n,
        c,
        eps,
    )
    .unwrap();
    check(rt, "layernorm_forward out", &out_d, &out, F32);
    check(rt, "layernorm_forward mean", &mean_d, &mean, F32);
    check(rt, "layernorm_forward rstd", &rstd_d, &rstd, F32);

    let mut sum_d = poisoned::<T>(rt, n * c);
    let (mut out_d, mut mean_d, mut rstd_d) = (
        poisoned::<T>(rt, n * c),
        poisoned::<f32>(rt, n),
        poisoned::<f32>(rt, n),
    );
    rt.residual_layernorm_forward(
        &mut out_d,
        &mut sum_d,
        &mut mean_d,
        &mut rstd_d,
        &upload_as::<T>(rt, &a),
        &upload_as::<T>(rt, &b),
        &w_d,
        &b_d,
        n,
        c,
        eps,
    )
    .unwrap();
    check(
        rt,
        "residual_layernorm_forward sum",
        &sum_d,
        &wide(&sum),
        F32,
    );
    check(rt, "residual_layernorm_forward out", &out_d, &out, F32);
    check(rt, "residual_layernorm_forward rstd", &rstd_d, &rstd, F32);

    // The backward from the saved (fp32) statistics, the same on both sides.
    let mean32: Vec<f32> = mean.iter().map(|&x| x as f32).collect();
    let rstd32: Vec<f32> = rstd.iter().map(|&x| x as f32).collect();
    let dout = rounded::<T>(&rng.values(n * c, 1.0));
    let dinp = rounded::<T>(&rng.values(n * c, 1.0));
    let (dweight, dbias) = (rng.values(c, 1.0), rng.values(c, 1.0));
    let (mut dinp_d, mut dweight_d, mut dbias_d) = (
        upload_as::<T>(rt, &dinp),
        rt.upload(&dweight).unwrap(),
        rt.upload(&dbias).unwrap(),
    );
    rt.layernorm_backward(
        &mut dinp_d,
        &mut dweight_d,
        &mut dbias_d,
        &upload_as::<T>(rt, &dout),
        &sum_in,
        &w_d,
        &rt.upload(&mean32).unwrap(),
        &rt.upload(&rstd32).unwrap(),
        n,
        c,
    )
    .unwrap();
    let (mut dinp, mut dweight, mut dbias) = (wide(&dinp), wide(&dweight), wide(&dbias));
    cpu::layernorm_backward(
        &mut dinp,
        &mut dweight,
        &mut dbias,
        &wide(&dout),
        &wide(&sum),
        &wide(&weight),
        &wide(&mean32),
        &wide(&rstd32),
        n,
        c,
    );
    check(rt, "layernorm_backward dinp", &dinp_d, &dinp, F32_SUM);
    check(
        rt,
        "layernorm_backward dweight",
        &dweight_d,
        &dweight,
        F32_SUM,
    );
    check(rt, "layernorm_backward dbias", &dbias_d, &dbias, F32_SUM);
}

#[test]
fn layernorm_matches_cpu() {
    let Some(rt) = gpu("layernorm_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(2);
    // n not a multiple of the 8 rows of a block; c below, at and above 32, odd, and
    // BERT-base's 768; the column tiles (32 columns, 32 row slices) with a single row and
    // column, partial tiles and slices, and more rows than slices.
    for shape in COLUMN_SHAPES
        .into_iter()
        .chain([(1, 33), (14, 48), (65, 200), (9, 768)])
    {
        layernorm_case::<f32>(&rt, &mut rng, shape);
        layernorm_case::<bf16>(&rt, &mut rng, shape);
    }
}

fn activation_case<T: Act>(rt: &CudaRuntime, rng: &mut Rng, (n, c): (usize, usize)) {
    let len = n * c;
    let inp = rounded::<T>(&rng.values(len, 3.0));
    let bias = rng.values(c, 1.0);
    let (inp_d, bias_d) = (upload_as::<T>(rt, &inp), rt.upload(&bias).unwrap());
    // The kernel adds the bias in fp32; the reference takes that same sum.
    let pre: Vec<f64> = inp
        .iter()
        .enumerate()
        .map(|(i, &x)| (x + bias[i % c]) as f64)
        .collect();
    let mut expected = vec![0.0f64; len];
    cpu::gelu_forward(&mut expected, &pre);
    let mut out_d = poisoned::<T>(rt, len);
    rt.bias_gelu_forward(&mut out_d, &inp_d, &bias_d, n, c)
        .unwrap();
    check(rt, "bias_gelu_forward", &out_d, &expected, F32);

    let dout = rounded::<T>(&rng.values(len, 1.0));
    let dinp = rounded::<T>(&rng.values(len, 1.0));
    let dbias = rng.values(c, 1.0);
    let dout_d = upload_as::<T>(rt, &dout);
    let (mut dinp_d, mut dbias_d) = (upload_as::<T>(rt, &dinp), rt.upload(&dbias).unwrap());
    rt.bias_gelu_backward(&mut dinp_d, &mut dbias_d, &dout_d, &inp_d, &bias_d, n, c)
        .unwrap();
    let mut dpre = vec![0.0f64; len];
    cpu::gelu_backward(&mut dpre, &pre, &wide(&dout));
    let (mut dinp64, mut dbias64) = (wide(&dinp), wide(&dbias));
    for (i, g) in dpre.iter().enumerate() {
        dinp64[i] += g;
        dbias64[i % c] += g;
    }
    check(rt, "bias_gelu_backward dinp", &dinp_d, &dinp64, F32);
    check(rt, "bias_gelu_backward dbias", &dbias_d, &dbias64, F32_SUM);

    let mut expected = vec![0.0f64; len];
    cpu::tanh_forward(&mut expected, &wide(&inp));
    let mut out_d = poisoned::<T>(rt, len);
    rt.tanh_forward(&mut out_d, &inp_d).unwrap();
    check(rt, "tanh_forward", &out_d, &expected, F32);
    // The backward from the stored output, the same on both sides.
    let out = download_f32(rt, &out_d);
    let mut dinp_d = upload_as::<T>(rt, &dinp);
    rt.tanh_backward(&mut dinp_d, &out_d, &dout_d).unwrap();
    let mut dinp64 = wide(&dinp);
    cpu::tanh_backward(&mut dinp64, &wide(&out), &wide(&dout));
    check(rt, "tanh_backward", &dinp_d, &dinp64, F32);

    let other = rounded::<T>(&rng.values(len, 1.0));
    cpu::residual_forward(&mut expected, &wide(&inp), &wide(&other));
    let mut out_d = poisoned::<T>(rt, len);
    rt.residual_forward(&mut out_d, &inp_d, &upload_as::<T>(rt, &other))
        .unwrap();
    check(rt, "residual_forward", &out_d, &expected, F32);
}

#[test]
fn activations_match_cpu() {
    let Some(rt) = gpu("activations_match_cpu") else {
        return;
    };
    let mut rng = Rng::new(3);
    for shape in COLUMN_SHAPES
        .into_iter()
        .chain([(1, 7), (13, 96), (70, 300)])
    {
        activation_case::<f32>(&rt, &mut rng, shape);
        activation_case::<bf16>(&rt, &mut rng, shape);
    }
}

/// Bit for bit: the CPU's f32 dropout on the same values, stored as T.
fn dropout_case<T: Act>(rt: &CudaRuntime, rng: &mut Rng, (len, p, seed): (usize, f64, u64)) {
    let case = format!("({}) len {len} p {p} seed {seed}", T::SUFFIX);
    let inp = rounded::<T>(&rng.values(len, 1.0));
    let mut expected = vec![0.0f32; len];
    cpu::dropout_forward(&mut expected, &inp, p, seed);
    let mut out_d = poisoned::<T>(rt, len);
    rt.dropout_forward(&mut out_d, &upload_as::<T>(rt, &inp), p, seed)
        .unwrap();
    assert_eq!(
        download_f32(rt, &out_d),
        rounded::<T>(&expected),
        "dropout_forward {case}"
    );

    let dout = rounded::<T>(&rng.values(len, 1.0));
    let mut dinp = rounded::<T>(&rng.values(len, 1.0));
    let mut dinp_d = upload_as::<T>(rt, &dinp);
    rt.dropout_backward(&mut dinp_d, &upload_as::<T>(rt, &dout), p, seed)
        .unwrap();
    cpu::dropout_backward(&mut dinp, &dout, p, seed);
    assert_eq!(
        download_f32(rt, &dinp_d),
        rounded::<T>(&dinp),
        "dropout_backward {case}"
    );
}

#[test]
fn dropout_matches_cpu_bit_for_bit() {
    let Some(rt) = gpu("dropout_matches_cpu_bit_for_bit") else {
        return;
    };
    let mut rng = Rng::new(4);
    for case in [
        (1usize, 0.5, 0u64),
        (1000, 0.1, 42),
        (40_001, 0.3, u64::MAX),
        (777, 0.0, 7),
        (64, 1.0, 9),
    ] {
        let (len, p, seed) = case;
        let mut keep_d = rt.upload(&vec![2u8; len]).unwrap();
        rt.dropout_mask(&mut keep_d, p, seed).unwrap();
        let keep: Vec<u8> = (0..len as u64)
            .map(|i| cpu::dropout_keep(seed, i, p) as u8)
            .collect();
        assert_eq!(
            rt.download(&keep_d).unwrap(),
            keep,
            "dropout mask, len {len}, p {p}, seed {seed}"
        );
        dropout_case::<f32>(&rt, &mut rng, case);
        dropout_case::<bf16>(&rt, &mut rng, case);
    }
    assert!(
        rt.dropout_mask(&mut rt.zeros::<u8>(4).unwrap(), 1.5, 0)
            .is_err()
    );
}

/// Odd shapes (b, t, nh, hs) of version 1: padded sequences, the last sequence of a batch
/// all padding, a head size that is not a multiple of 32, a sequence longer than a block
/// of threads.
const ATTENTION_SHAPES: [(usize, usize, usize, usize); 4] = [
    (2, 7, 3, 16),
    (3, 13, 5, 8),
    (1, 33, 2, 48),
    (2, 131, 1, 12),
];

/// One attention problem (b, t, nh, hs) on the host, its inputs as T stores them: q, k, v,
/// dout [b, t, nh*hs], mask [b, t] (padded sequences, the last of a batch all padding), and
/// the start values of dq, dk, dv (random: `+=` versus `=` shows).
struct AttentionProblem {
    dims: (usize, usize, usize, usize),
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    mask: Vec<u8>,
    dout: Vec<f32>,
    grads: [Vec<f32>; 3],
}

impl AttentionProblem {
    fn new<T: Act>(rng: &mut Rng, (b, t, nh, hs): (usize, usize, usize, usize)) -> Self {
        let act = b * t * nh * hs;
        let mut values = |scale| rounded::<T>(&rng.values(act, scale));
        let (q, k, v, dout) = (values(2.0), values(2.0), values(1.0), values(1.0));
        let grads = [values(1.0), values(1.0), values(1.0)];
        AttentionProblem {
            dims: (b, t, nh, hs),
            q,
            k,
            v,
            mask: rng.padding_mask(b, t),
            dout,
            grads,
        }
    }

    /// The CPU's out [b, t, nh*hs] and probs [b, nh, t, t], in f64.
    fn cpu_forward(&self, dropout: Option<AttentionDropout>) -> (Vec<f64>, Vec<f64>) {
        let (b, t, nh, hs) = self.dims;
        let (mut out, mut probs) = (vec![0.0f64; b * t * nh * hs], vec![0.0f64; b * nh * t * t]);
        cpu::attention_forward(
            &mut out,
            &mut probs,
            &wide(&self.q),
            &wide(&self.k),
            &wide(&self.v),
            &self.mask,
            b,
            t,
            nh,
            hs,
            dropout,
        );
        (out, probs)
    }

    /// The CPU's dq, dk, dv from the start values and the given probabilities, in f64.
    fn cpu_backward(&self, probs: &[f64], dropout: Option<AttentionDropout>) -> [Vec<f64>; 3] {
        let (b, t, nh, hs) = self.dims;
        let [mut dq, mut dk, mut dv] = self.grads.each_ref().map(|g| wide(g));
        cpu::attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            &wide(&self.dout),
            &wide(&self.q),
            &wide(&self.k),
            &wide(&self.v),
            probs,
            &self.mask,
            b,
            t,
            nh,
            hs,
            dropout,
        );
        [dq, dk, dv]
    }

    /// lse [b, nh, t] = log Σ_j exp(s_ij) over the allowed keys, s = q_i · k_j / √hs, in f64.
    fn cpu_lse(&self) -> Vec<f64> {
        let (b, t, nh, hs) = self.dims;
        let (q, k) = (wide(&self.q), wide(&self.k));
        let scale = 1.0 / (hs as f64).sqrt();
        let mut lse = Vec::with_capacity(b * nh * t);
        for bi in 0..b {
            let mask = &self.mask[bi * t..(bi + 1) * t];
            let any_real = mask.contains(&1);
            for h in 0..nh {
                let head = |x: &[f64], row: usize| {
                    let at = (bi * t + row) * nh * hs + h * hs;
                    x[at..at + hs].to_vec()
                };
                for i in 0..t {
                    let q_i = head(&q, i);
                    let scores: Vec<f64> = (0..t)
                        .filter(|&j| !any_real || mask[j] != 0)
                        .map(|j| {
                            scale * q_i.iter().zip(head(&k, j)).map(|(a, b)| a * b).sum::<f64>()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    lse.push(max + scores.iter().map(|s| (s - max).exp()).sum::<f64>().ln());
                }
            }
        }
        lse
    }

    /// The start values of dq, dk, dv with `added` added, in f64.
    fn with_start(&self, added: &[Vec<f64>; 3]) -> [Vec<f64>; 3] {
        std::array::from_fn(|g| {
            let start = self.grads[g].iter();
            start.zip(&added[g]).map(|(&s, &a)| s as f64 + a).collect()
        })
    }

    /// Fresh device copies of the gradients' start values.
    fn upload_grads<T: Act>(&self, rt: &CudaRuntime) -> [CudaSlice<T>; 3] {
        self.grads.each_ref().map(|g| upload_as(rt, g))
    }
}

/// An attention problem's inputs on the device.
struct AttentionInputs<T> {
    q: CudaSlice<T>,
    k: CudaSlice<T>,
    v: CudaSlice<T>,
    mask: CudaSlice<u8>,
    dout: CudaSlice<T>,
}

impl<T: Act> AttentionInputs<T> {
    fn new(rt: &CudaRuntime, problem: &AttentionProblem) -> Self {
        AttentionInputs {
            q: upload_as(rt, &problem.q),
            k: upload_as(rt, &problem.k),
            v: upload_as(rt, &problem.v),
            mask: rt.upload(&problem.mask).unwrap(),
            dout: upload_as(rt, &problem.dout),
        }
    }

    /// Version 1's forward on these inputs: out and probs, each poisoned before the launch.
    fn v1_forward(
        &self,
        rt: &CudaRuntime,
        dims: (usize, usize, usize, usize),
        dropout: Option<AttentionDropout>,
    ) -> (CudaSlice<T>, CudaSlice<f32>) {
        let (b, t, nh, hs) = dims;
        let mut out = poisoned::<T>(rt, b * t * nh * hs);
        let mut probs = poisoned::<f32>(rt, b * nh * t * t);
        rt.attention_forward(
            &mut out, &mut probs, &self.q, &self.k, &self.v, &self.mask, dims, dropout,
        )
        .unwrap();
        (out, probs)
    }

    /// Version 1's backward from `probs`: the problem's start gradients with the
    /// attention's added.
    fn v1_backward(
        &self,
        rt: &CudaRuntime,
        problem: &AttentionProblem,
        probs: &CudaSlice<f32>,
        dropout: Option<AttentionDropout>,
    ) -> [CudaSlice<T>; 3] {
        let mut grads = problem.upload_grads::<T>(rt);
        let [dq, dk, dv] = &mut grads;
        let mut dscores = poisoned::<f32>(rt, probs.len());
        rt.attention_backward(
            dq,
            dk,
            dv,
            &mut dscores,
            &self.dout,
            &self.q,
            &self.k,
            &self.v,
            probs,
            problem.dims,
            dropout,
        )
        .unwrap();
        grads
    }

    /// Flash attention's forward on these inputs with `kernels`: out and lse, each poisoned
    /// before the launch.
    fn flash_forward(
        &self,
        rt: &CudaRuntime,
        dims: (usize, usize, usize, usize),
        dropout: Option<AttentionDropout>,
        kernels: FlashKernels,
    ) -> (CudaSlice<T>, CudaSlice<f32>) {
        let (b, t, nh, hs) = dims;
        let (mut out, mut lse) = (
            poisoned::<T>(rt, b * t * nh * hs),
            poisoned::<f32>(rt, b * nh * t),
        );
        rt.flash_attention_forward(
            &mut out, &mut lse, &self.q, &self.k, &self.v, &self.mask, dims, dropout, kernels,
        )
        .unwrap();
        (out, lse)
    }

    /// Its backward from that forward's out and lse: the problem's start gradients with the
    /// attention's added.
    #[allow(clippy::too_many_arguments)]
    fn flash_backward(
        &self,
        rt: &CudaRuntime,
        problem: &AttentionProblem,
        (out, lse): &(CudaSlice<T>, CudaSlice<f32>),
        dropout: Option<AttentionDropout>,
        kernels: FlashKernels,
    ) -> [CudaSlice<T>; 3] {
        let (b, t, nh, _) = problem.dims;
        let mut grads = problem.upload_grads::<T>(rt);
        let [dq, dk, dv] = &mut grads;
        let mut row_dot = poisoned::<f32>(rt, b * nh * t);
        rt.flash_attention_backward(
            dq,
            dk,
            dv,
            &mut row_dot,
            &self.dout,
            out,
            &self.q,
            &self.k,
            &self.v,
            lse,
            &self.mask,
            problem.dims,
            dropout,
            kernels,
        )
        .unwrap();
        grads
    }
}

fn check_grads<T: Act>(
    rt: &CudaRuntime,
    what: &str,
    gpu: &[CudaSlice<T>; 3],
    cpu: &[Vec<f64>; 3],
    rtol: f64,
) {
    for (name, (buf, cpu)) in ["dq", "dk", "dv"].iter().zip(gpu.iter().zip(cpu)) {
        check(rt, &format!("{what} {name}"), buf, cpu, rtol);
    }
}

/// Version 1 against the CPU; its backward from the CPU's (fp32) probabilities.
fn attention_case<T: Act>(
    rt: &CudaRuntime,
    rng: &mut Rng,
    dims: (usize, usize, usize, usize),
    dropout: Option<AttentionDropout>,
) {
    let what = format!("attention {dims:?} dropout {dropout:?}");
    let problem = AttentionProblem::new::<T>(rng, dims);
    let inputs = AttentionInputs::<T>::new(rt, &problem);
    let (out, probs) = problem.cpu_forward(dropout);
    let (out_d, probs_d) = inputs.v1_forward(rt, dims, dropout);
    check(rt, &format!("{what} forward out"), &out_d, &out, F32_SUM);
    check(rt, &format!("{what} forward probs"), &probs_d, &probs, F32);

    // The backward from the same (fp32) probabilities on both sides.
    let probs32: Vec<f32> = probs.iter().map(|&x| x as f32).collect();
    let grads = inputs.v1_backward(rt, &problem, &rt.upload(&probs32).unwrap(), dropout);
    let expected = problem.cpu_backward(&wide(&probs32), dropout);
    check_grads(rt, &format!("{what} backward"), &grads, &expected, F32_SUM);
}

#[test]
fn attention_matches_cpu() {
    let Some(rt) = gpu("attention_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(5);
    // Without and with dropout on the probabilities: the same mask as the CPU's, bit for
    // bit (a differing element would move the outputs far beyond the tolerances).
    for shape in ATTENTION_SHAPES {
        for dropout in [None, Some(AttentionDropout { p: 0.3, seed: 9 })] {
            attention_case::<f32>(&rt, &mut rng, shape, dropout);
            attention_case::<bf16>(&rt, &mut rng, shape, dropout);
        }
    }
}

/// Version 2 (flash) shapes (b, t, nh, hs): t of 1, 7, 17, 33, 40 and 130 (one key,
/// partial tiles of 16 own and 32 streamed rows, several tiles), head sizes 12 and 24 (under
/// one dim per lane), 32, 33, 64 and 128 (the largest, whose backward asks for more than
/// 48 KiB of shared memory). With b > 1 the last sequence is all padding (padding_mask).
const FLASH_SHAPES: [(usize, usize, usize, usize); 8] = [
    (1, 1, 2, 32),
    (2, 7, 3, 24),
    (3, 17, 2, 12),
    (3, 33, 2, 64),
    (2, 130, 2, 32),
    (2, 17, 1, 33),
    (2, 40, 1, 128),
    (2, 70, 1, 128),
];

/// The flash shapes a run checks: all of them, or with `RCX_FLASH_SHAPE=i` only shape i
/// (scripts/gpu-check.sh gives the compute-sanitizers one small shape, since they slow a
/// kernel down a hundredfold). A bad value is a failure, not a silent full run.
fn flash_shapes() -> Vec<(usize, usize, usize, usize)> {
    match std::env::var("RCX_FLASH_SHAPE") {
        Err(_) => FLASH_SHAPES.to_vec(),
        Ok(i) => {
            let shape = i.parse::<usize>().ok().and_then(|i| FLASH_SHAPES.get(i));
            vec![*shape.unwrap_or_else(|| {
                panic!("RCX_FLASH_SHAPE={i}: expected 0..{}", FLASH_SHAPES.len())
            })]
        }
    }
}

/// Flash attention in f64 given its forward's out and lse, as the backward kernels take
/// them (the row dots D = dout · out come from the given out, which in bf16 is rounded).
/// With `round`, version 3's arithmetic: rounding where its kernels round, so that what is
/// left between the two is fp32 arithmetic and the final bf16 store: the forward's online
/// softmax over key tiles of 64 (each tile's weights exp(s - running max) · dropout rounded
/// to bf16), the backward's weights p · f and score gradients p (f dp - D) rounded to bf16,
/// with D from the given out and p from the given lse (the device's). Inputs are bf16 values
/// held in f32. Without `round` and given the exact out and lse it is the exact attention
/// (checked against the CPU's).
struct FlashReference<'a> {
    round: bool,
    dims: (usize, usize, usize, usize),
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    mask: &'a [u8],
    dropout: Option<cpu::AttentionDropout>,
}

impl FlashReference<'_> {
    fn head_row<'x>(&self, x: &'x [f32], bi: usize, row: usize, h: usize) -> &'x [f32] {
        let (_, t, nh, hs) = self.dims;
        let at = (bi * t + row) * nh * hs + h * hs;
        &x[at..at + hs]
    }

    /// x as the kernels store it before a product: rounded to bf16.
    fn stored(&self, x: f64) -> f64 {
        if self.round {
            bf16::from_f32(x as f32).to_f32() as f64
        } else {
            x
        }
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    fn allowed(&self, bi: usize, j: usize) -> bool {
        let t = self.dims.1;
        let mask_b = &self.mask[bi * t..(bi + 1) * t];
        !mask_b.contains(&1) || mask_b[j] != 0
    }

    /// The dropout factor of probability (bi, h, i, j), as the kernels index it.
    fn factor(&self, bi: usize, h: usize, i: usize, j: usize) -> f64 {
        let (_, t, nh, _) = self.dims;
        match self.dropout {
            None => 1.0,
            Some(d) => {
                let index = (((bi * nh + h) * t + i) * t + j) as u64;
                if cpu::dropout_keep(d.seed, index, d.p) {
                    (1.0 / (1.0 - d.p)) as f32 as f64
                } else {
                    0.0
                }
            }
        }
    }

    fn score(&self, bi: usize, h: usize, i: usize, j: usize) -> f64 {
        let hs = self.dims.3;
        let scale = (1.0 / (hs as f64).sqrt()) as f32 as f64;
        scale
            * Self::dot(
                self.head_row(self.q, bi, i, h),
                self.head_row(self.k, bi, j, h),
            )
    }

    fn forward(&self) -> Vec<f64> {
        let (b, t, nh, hs) = self.dims;
        let mut out = vec![0.0f64; b * t * nh * hs];
        for bi in 0..b {
            for h in 0..nh {
                for i in 0..t {
                    let (mut max, mut sum, mut acc) = (f64::NEG_INFINITY, 0.0f64, vec![0.0f64; hs]);
                    for first in (0..t).step_by(64) {
                        let keys: Vec<usize> = (first..t.min(first + 64))
                            .filter(|&j| self.allowed(bi, j))
                            .collect();
                        let scores: Vec<f64> =
                            keys.iter().map(|&j| self.score(bi, h, i, j)).collect();
                        let new_max = scores.iter().cloned().fold(max, f64::max);
                        let rescale = if new_max == f64::NEG_INFINITY {
                            1.0
                        } else {
                            (max - new_max).exp()
                        };
                        sum *= rescale;
                        acc.iter_mut().for_each(|a| *a *= rescale);
                        for (&j, &s) in keys.iter().zip(&scores) {
                            let e = (s - new_max).exp();
                            sum += e;
                            let w = self.stored(e * self.factor(bi, h, i, j));
                            for (a, &x) in acc.iter_mut().zip(self.head_row(self.v, bi, j, h)) {
                                *a += w * x as f64;
                            }
                        }
                        max = new_max;
                    }
                    let at = (bi * t + i) * nh * hs + h * hs;
                    for (d, a) in acc.iter().enumerate() {
                        out[at + d] = a / sum;
                    }
                }
            }
        }
        out
    }

    /// The added gradients [dq, dk, dv] given dout, out [b, t, nh*hs] and lse [b, nh, t].
    fn backward(&self, dout: &[f32], out: &[f64], lse: &[f64]) -> [Vec<f64>; 3] {
        let (b, t, nh, hs) = self.dims;
        let scale = (1.0 / (hs as f64).sqrt()) as f32 as f64;
        let mut grads = [(); 3].map(|_| vec![0.0f64; b * t * nh * hs]);
        for bi in 0..b {
            for h in 0..nh {
                for i in 0..t {
                    let dout_i = self.head_row(dout, bi, i, h);
                    let at_i = (bi * t + i) * nh * hs + h * hs;
                    let row_dot: f64 = (0..hs).map(|d| dout_i[d] as f64 * out[at_i + d]).sum();
                    let lse_i = lse[(bi * nh + h) * t + i];
                    for j in (0..t).filter(|&j| self.allowed(bi, j)) {
                        let p = (self.score(bi, h, i, j) - lse_i).exp();
                        let f = self.factor(bi, h, i, j);
                        let dp = Self::dot(dout_i, self.head_row(self.v, bi, j, h));
                        let w = self.stored(p * f);
                        let ds = self.stored(p * (f * dp - row_dot));
                        let (at_i, at_j) = (
                            (bi * t + i) * nh * hs + h * hs,
                            (bi * t + j) * nh * hs + h * hs,
                        );
                        for d in 0..hs {
                            grads[0][at_i + d] += scale * ds * self.k[at_j + d] as f64;
                            grads[1][at_j + d] += scale * ds * self.q[at_i + d] as f64;
                            grads[2][at_j + d] += w * dout[at_i + d] as f64;
                        }
                    }
                }
            }
        }
        grads
    }
}

/// Version 2 against the CPU and against version 1 on the same inputs, each backward from
/// its own forward (version 2's from its out and lse, as the device model runs it).
fn flash_case<T: Act>(
    rt: &CudaRuntime,
    rng: &mut Rng,
    dims: (usize, usize, usize, usize),
    dropout: Option<AttentionDropout>,
) {
    let what = format!("flash attention {dims:?} dropout {dropout:?}");
    let problem = AttentionProblem::new::<T>(rng, dims);
    let inputs = AttentionInputs::<T>::new(rt, &problem);
    let (out, probs) = problem.cpu_forward(dropout);
    let forward = inputs.flash_forward(rt, dims, dropout, FlashKernels::CudaCores);
    let (out_d, lse_d) = &forward;
    check(rt, &format!("{what} forward out"), out_d, &out, F32);
    check(
        rt,
        &format!("{what} forward lse"),
        lse_d,
        &problem.cpu_lse(),
        F32,
    );
    let (v1_out_d, probs_d) = inputs.v1_forward(rt, dims, dropout);
    let v1_out = wide(&download_f32(rt, &v1_out_d));
    check(rt, &format!("{what} v2 vs v1 out"), out_d, &v1_out, F32);

    let grads = inputs.flash_backward(rt, &problem, &forward, dropout, FlashKernels::CudaCores);
    let expected = problem.cpu_backward(&probs, dropout);
    if T::SUFFIX == "f32" {
        check_grads(rt, &format!("{what} backward"), &grads, &expected, F32_SUM);
    } else {
        // In bf16 the row dots D = dout · out come from the stored (rounded) out, which
        // moves every score gradient of a row; summed over many queries that reaches a few
        // percent of dk where few keys are real (scripts/bf16_attention_rounding.py, "dk
        // v2"). The kernels' contract is the gradient given out: compare with exactly that.
        let reference = FlashReference {
            round: false,
            dims,
            q: &problem.q,
            k: &problem.k,
            v: &problem.v,
            mask: &problem.mask,
            dropout,
        };
        let added = reference.backward(
            &problem.dout,
            &wide(&download_f32(rt, out_d)),
            &wide(&download_f32(rt, lse_d)),
        );
        let given_out = problem.with_start(&added);
        check_grads(rt, &format!("{what} backward"), &grads, &given_out, F32_SUM);
    }

    // Version 1's backward takes its probabilities, not out: the same gradients in f32 only
    // (in bf16 the row dots above come from the rounded out).
    if T::SUFFIX == "f32" {
        let v1_grads = inputs.v1_backward(rt, &problem, &probs_d, dropout);
        let v1 = v1_grads.each_ref().map(|g| wide(&download_f32(rt, g)));
        check_grads(rt, &format!("{what} v2 vs v1"), &grads, &v1, F32_SUM);
    }
}

/// Version 2 (flash) against the CPU twin and against version 1, f32 and bf16, with and
/// without dropout (the CPU's mask bit for bit). Tolerances: forward out and lse 1e-5
/// (F32), the gradients 1e-4 (F32_SUM: sums over t queries or keys of recomputed
/// probabilities), bf16 1e-2.
#[test]
fn flash_attention_matches_cpu() {
    let Some(rt) = gpu("flash_attention_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(11);
    for shape in flash_shapes() {
        for dropout in [None, Some(AttentionDropout { p: 0.2, seed: 77 })] {
            flash_case::<f32>(&rt, &mut rng, shape, dropout);
            flash_case::<bf16>(&rt, &mut rng, shape, dropout);
        }
    }
    // Head sizes over 128 are refused before any launch.
    let (mut out_d, mut lse_d) = (rt.zeros::<f32>(129).unwrap(), rt.zeros::<f32>(1).unwrap());
    let one = rt.zeros::<f32>(129).unwrap();
    let mask_d = rt.upload(&[1u8]).unwrap();
    assert!(
        rt.flash_attention_forward(
            &mut out_d,
            &mut lse_d,
            &one,
            &one,
            &one,
            &mask_d,
            (1, 1, 1, 129),
            None,
            FlashKernels::CudaCores
        )
        .is_err()
    );
}

/// Version 3 (tensor cores, bf16) against FlashReference, which rounds the probabilities
/// and their gradients where the kernels do (BF16, 1e-2), after the reference without
/// rounding is checked against the CPU's attention (F32, F32_SUM). The forward's out is also
/// checked against the exact attention at TC_EXACT (5e-2 of |x| + mean |x|): bf16
/// probabilities cost up to about 1% there, and the gradients several percent where a
/// sequence has few real keys (scripts/bf16_attention_rounding.py; at t = 1 the exact
/// gradients vanish and only rounding is left, so they are not compared with the exact
/// ones). Gradients start at small values, so `+=` shows without hiding the attention's own.
fn tensor_core_case(
    rt: &CudaRuntime,
    rng: &mut Rng,
    dims: (usize, usize, usize, usize),
    dropout: Option<AttentionDropout>,
) {
    let (b, t, nh, hs) = dims;
    let act = b * t * nh * hs;
    let what = format!("tensor-core attention {dims:?} dropout {dropout:?}");
    let mut problem = AttentionProblem::new::<bf16>(rng, dims);
    problem.grads = [(); 3].map(|_| rounded::<bf16>(&rng.values(act, 0.01)));
    let (exact_out, probs) = problem.cpu_forward(dropout);
    let exact_lse = problem.cpu_lse();
    let mut reference = FlashReference {
        round: false,
        dims,
        q: &problem.q,
        k: &problem.k,
        v: &problem.v,
        mask: &problem.mask,
        dropout,
    };
    assert_close_f64(
        &format!("{what}: reference without rounding, out"),
        &reference.forward(),
        &exact_out,
        F32,
    );
    let unrounded = problem.with_start(&reference.backward(&problem.dout, &exact_out, &exact_lse));
    let exact_grads = problem.cpu_backward(&probs, dropout);
    for (g, name) in ["dq", "dk", "dv"].iter().enumerate() {
        assert_close_f64(
            &format!("{what}: reference without rounding, {name}"),
            &unrounded[g],
            &exact_grads[g],
            F32_SUM,
        );
    }
    reference.round = true;

    let inputs = AttentionInputs::<bf16>::new(rt, &problem);
    let forward = inputs.flash_forward(rt, dims, dropout, FlashKernels::TensorCores);
    let (out_d, lse_d) = &forward;
    check(
        rt,
        &format!("{what} forward out"),
        out_d,
        &reference.forward(),
        BF16,
    );
    check(
        rt,
        &format!("{what} forward out vs exact"),
        out_d,
        &exact_out,
        TC_EXACT,
    );
    check(rt, &format!("{what} forward lse"), lse_d, &exact_lse, F32);

    let grads = inputs.flash_backward(rt, &problem, &forward, dropout, FlashKernels::TensorCores);
    let added = reference.backward(
        &problem.dout,
        &wide(&download_f32(rt, out_d)),
        &wide(&download_f32(rt, lse_d)),
    );
    check_grads(
        rt,
        &format!("{what} backward"),
        &grads,
        &problem.with_start(&added),
        BF16,
    );
}

#[test]
fn flash_attention_tensor_cores_match_cpu() {
    let Some(rt) = gpu("flash_attention_tensor_cores_match_cpu") else {
        return;
    };
    let mut rng = Rng::new(13);
    for shape in flash_shapes() {
        for dropout in [None, Some(AttentionDropout { p: 0.2, seed: 78 })] {
            tensor_core_case(&rt, &mut rng, shape, dropout);
        }
    }
    // The tensor-core kernels take bf16 only: f32 is refused before any launch.
    let (mut out_d, mut lse_d) = (rt.zeros::<f32>(16).unwrap(), rt.zeros::<f32>(1).unwrap());
    let one = rt.zeros::<f32>(16).unwrap();
    let mask_d = rt.upload(&[1u8]).unwrap();
    let refused = rt.flash_attention_forward(
        &mut out_d,
        &mut lse_d,
        &one,
        &one,
        &one,
        &mask_d,
        (1, 1, 1, 16),
        None,
        FlashKernels::TensorCores,
    );
    assert!(
        refused.is_err(),
        "f32 through the tensor-core kernels must be refused"
    );
}

/// The block-tiled column reductions (bias_backward, bias_gelu_backward's dbias,
/// layernorm_backward's dweight and dbias, the tiled embedding backward) at shapes around
/// the 32-column tile and the 32 row slices, against the CPU, and run to run identical
/// (bit for bit). Tolerance F32_SUM (1e-4): sums over up to 4099 rows.
#[test]
fn column_reductions_match_cpu() {
    let Some(rt) = gpu("column_reductions_match_cpu") else {
        return;
    };
    let mut rng = Rng::new(12);
    for &(n, c) in &[(1usize, 1usize), (31, 33), (33, 65), (1000, 97), (4099, 45)] {
        let dout = rng.values(n * c, 1.0);
        let dbias0 = rng.values(c, 1.0);
        let dout_d = rt.upload(&dout).unwrap();

        // bias_backward: the CPU twin is matmul_backward's bias part.
        let mut runs = Vec::new();
        for _ in 0..2 {
            let mut dbias_d = rt.upload(&dbias0).unwrap();
            rt.bias_backward(&mut dbias_d, &dout_d, n, c).unwrap();
            runs.push(rt.download(&dbias_d).unwrap());
        }
        let (inner, mut dinp, mut dweight, mut dbias) =
            (3, vec![0.0f32; n * 3], vec![0.0f32; c * 3], dbias0.clone());
        cpu::matmul_backward(
            &mut dinp,
            &mut dweight,
            Some(&mut dbias[..]),
            &dout,
            &rng.values(n * inner, 1.0),
            &rng.values(c * inner, 1.0),
            n,
            inner,
            c,
        );
        assert_close(&format!("bias_backward {n}x{c}"), &runs[0], &dbias, F32_SUM);
        assert_eq!(runs[0], runs[1], "bias_backward {n}x{c}: runs differ");
        let mut dbias16_d = rt.upload(&dbias0).unwrap();
        rt.bias_backward(&mut dbias16_d, &upload_as::<bf16>(&rt, &dout), n, c)
            .unwrap();
        let mut dbias16 = dbias0.clone();
        for (i, x) in rounded::<bf16>(&dout).iter().enumerate() {
            dbias16[i % c] += x;
        }
        assert_close(
            &format!("bias_backward bf16 {n}x{c}"),
            &rt.download(&dbias16_d).unwrap(),
            &dbias16,
            F32_SUM,
        );

        // bias_gelu_backward's column sums.
        let (inp, bias) = (rng.values(n * c, 2.0), rng.values(c, 1.0));
        let dinp0 = rng.values(n * c, 1.0);
        let (inp_d, bias_d) = (rt.upload(&inp).unwrap(), rt.upload(&bias).unwrap());
        let mut runs = Vec::new();
        for _ in 0..2 {
            let (mut dinp_d, mut dbias_d) =
                (rt.upload(&dinp0).unwrap(), rt.upload(&dbias0).unwrap());
            rt.bias_gelu_backward(&mut dinp_d, &mut dbias_d, &dout_d, &inp_d, &bias_d, n, c)
                .unwrap();
            runs.push((
                rt.download(&dinp_d).unwrap(),
                rt.download(&dbias_d).unwrap(),
            ));
        }
        let pre: Vec<f32> = inp
            .iter()
            .enumerate()
            .map(|(i, &x)| x + bias[i % c])
            .collect();
        let mut g = vec![0.0f32; n * c];
        cpu::gelu_backward(&mut g, &pre, &dout);
        let (mut dinp, mut dbias) = (dinp0.clone(), dbias0.clone());
        for (i, x) in g.iter().enumerate() {
            dinp[i] += x;
            dbias[i % c] += x;
        }
        assert_close(
            &format!("bias_gelu_backward dinp {n}x{c}"),
            &runs[0].0,
            &dinp,
            F32,
        );
        assert_close(
            &format!("bias_gelu_backward dbias {n}x{c}"),
            &runs[0].1,
            &dbias,
            F32_SUM,
        );
        assert_eq!(runs[0], runs[1], "bias_gelu_backward {n}x{c}: runs differ");

        // layernorm_backward's parameter sums.
        let (weight, lbias) = (rng.values(c, 1.0), rng.values(c, 1.0));
        let (mut out, mut mean, mut rstd) = (vec![0.0f32; n * c], vec![0.0f32; n], vec![0.0f32; n]);
        cpu::layernorm_forward(
            &mut out, &mut mean, &mut rstd, &inp, &weight, &lbias, n, c, 1e-12,
        );
        let dw0 = rng.values(c, 1.0);
        let (w_d, mean_d, rstd_d) = (
            rt.upload(&weight).unwrap(),
            rt.upload(&mean).unwrap(),
            rt.upload(&rstd).unwrap(),
        );
        let mut runs = Vec::new();
        for _ in 0..2 {
            let (mut dinp_d, mut dw_d, mut db_d) = (
                rt.upload(&dinp0).unwrap(),
                rt.upload(&dw0).unwrap(),
                rt.upload(&dbias0).unwrap(),
            );
            rt.layernorm_backward(
                &mut dinp_d,
                &mut dw_d,
                &mut db_d,
                &dout_d,
                &inp_d,
                &w_d,
                &mean_d,
                &rstd_d,
                n,
                c,
            )
            .unwrap();
            runs.push((rt.download(&dw_d).unwrap(), rt.download(&db_d).unwrap()));
        }
        let (mut dinp, mut dw, mut db) = (dinp0.clone(), dw0.clone(), dbias0.clone());
        cpu::layernorm_backward(
            &mut dinp, &mut dw, &mut db, &dout, &inp, &weight, &mean, &rstd, n, c,
        );
        assert_close(
            &format!("layernorm_backward dweight {n}x{c}"),
            &runs[0].0,
            &dw,
            F32_SUM,
        );
        assert_close(
            &format!("layernorm_backward dbias {n}x{c}"),
            &runs[0].1,
            &db,
            F32_SUM,
        );
        assert_eq!(runs[0], runs[1], "layernorm_backward {n}x{c}: runs differ");
    }

    // Embedding tables whose rows are used by many positions (>= 32 per row on average)
    // take the tiled kernel: both tables here (3 word ids, 2 types over 4 x 50 positions).
    let (b, t, c, vocab, max_pos, ntypes) = (4, 50, 45, 3, 50, 2);
    let ids = rng.below(b * t, vocab as u32);
    let types = rng.below(b * t, ntypes as u32);
    let tokens = TokenBatch::new(&rt, &ids, &types, b, t, (vocab, max_pos, ntypes)).unwrap();
    let dout = rng.values(b * t * c, 1.0);
    let (dwte0, dwpe0, dwtt0) = (
        rng.values(vocab * c, 1.0),
        rng.values(max_pos * c, 1.0),
        rng.values(ntypes * c, 1.0),
    );
    let mut runs = Vec::new();
    for _ in 0..2 {
        let (mut dwte_d, mut dwpe_d, mut dwtt_d) = (
            rt.upload(&dwte0).unwrap(),
            rt.upload(&dwpe0).unwrap(),
            rt.upload(&dwtt0).unwrap(),
        );
        rt.embedding_backward(
            &mut dwte_d,
            &mut dwpe_d,
            &mut dwtt_d,
            &rt.upload(&dout).unwrap(),
            &tokens,
            c,
        )
        .unwrap();
        runs.push((rt.download(&dwte_d).unwrap(), rt.download(&dwtt_d).unwrap()));
    }
    let (mut dwte, mut dwpe, mut dwtt) = (dwte0, dwpe0, dwtt0);
    cpu::embedding_backward(
        &mut dwte, &mut dwpe, &mut dwtt, &dout, &ids, &types, b, t, c,
    );
    assert_close("embedding_backward tiled dwte", &runs[0].0, &dwte, F32_SUM);
    assert_close("embedding_backward tiled dwtt", &runs[0].1, &dwtt, F32_SUM);
    assert_eq!(runs[0], runs[1], "embedding_backward tiled: runs differ");
}

/// The launch shapes are pure functions of the shapes; spot-check the ones the kernels
/// rely on (runs without a GPU).
#[test]
fn launch_shapes_follow_the_kernels() {
    use cuda::launch;
    let shape = launch::column_tiles("t", 45).unwrap();
    assert_eq!((shape.grid, shape.block), ((2, 1, 1), 1024));
    let shape = launch::flash_forward("t", 2, 33, 3, 64).unwrap();
    assert_eq!((shape.grid, shape.block), ((3, 6, 1), 128));
    assert_eq!(
        shape.shared_bytes as usize,
        4 * (16 * 64 + 32 * 65 + 32 * 64)
    );
    // hs = 128: the backward's tiles need more than the default 48 KiB.
    let shape = launch::flash_backward("t", 1, 512, 12, 128).unwrap();
    assert_eq!(
        shape.shared_bytes as usize,
        4 * (2 * 16 * 128 + 2 * 32 * 129)
    );
    assert!(shape.shared_bytes > launch::DEFAULT_SHARED_BYTES);
    assert!(shape.shared_bytes <= launch::MAX_SHARED_BYTES);
    assert!(launch::flash_forward("t", 1, 8, 1, 129).is_err());
    assert!(launch::flash_forward("t", 70_000, 8, 1, 64).is_err());
    assert!(launch::attention_rows("t", 1, 20_000, 1).is_err());
}

/// A copy and an add: bit for bit, in both types.
fn pool_case<T: Act>(rt: &CudaRuntime, rng: &mut Rng, (b, t, c): (usize, usize, usize)) {
    let case = format!("({}) {b}x{t}x{c}", T::SUFFIX);
    let inp = rounded::<T>(&rng.values(b * t * c, 1.0));
    let mut out = vec![0.0f32; b * c];
    cpu::cls_pool_forward(&mut out, &inp, b, t, c);
    let mut out_d = poisoned::<T>(rt, b * c);
    rt.cls_pool_forward(&mut out_d, &upload_as::<T>(rt, &inp), b, t, c)
        .unwrap();
    assert_eq!(download_f32(rt, &out_d), out, "cls_pool_forward {case}");

    let dout = rounded::<T>(&rng.values(b * c, 1.0));
    let mut dinp = rounded::<T>(&rng.values(b * t * c, 1.0));
    let mut dinp_d = upload_as::<T>(rt, &dinp);
    rt.cls_pool_backward(&mut dinp_d, &upload_as::<T>(rt, &dout), b, t, c)
        .unwrap();
    cpu::cls_pool_backward(&mut dinp, &dout, b, t, c);
    assert_eq!(
        download_f32(rt, &dinp_d),
        rounded::<T>(&dinp),
        "cls_pool_backward {case}"
    );
}

#[test]
fn cls_pool_matches_cpu() {
    let Some(rt) = gpu("cls_pool_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(6);
    for shape in [(1, 1, 5), (3, 5, 19), (3, 7, 48), (5, 3, 257)] {
        pool_case::<f32>(&rt, &mut rng, shape);
        pool_case::<bf16>(&rt, &mut rng, shape);
    }
}

fn bias_broadcast_case<T: Act>(rt: &CudaRuntime, rng: &mut Rng, (n, oc): (usize, usize)) {
    let bias = rng.values(oc, 1.0);
    let mut out_d = poisoned::<T>(rt, n * oc);
    rt.bias_broadcast_forward(&mut out_d, &rt.upload(&bias).unwrap(), n, oc)
        .unwrap();
    let expected: Vec<f64> = (0..n * oc).map(|i| bias[i % oc] as f64).collect();
    check(rt, "bias_broadcast_forward", &out_d, &expected, F32);
}

/// matmul_forward's bias, on its own and in both activation types.
#[test]
fn bias_broadcast_matches_cpu() {
    let Some(rt) = gpu("bias_broadcast_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(13);
    for shape in COLUMN_SHAPES.into_iter().chain([(17, 96), (70, 301)]) {
        bias_broadcast_case::<f32>(&rt, &mut rng, shape);
        bias_broadcast_case::<bf16>(&rt, &mut rng, shape);
    }
}

#[test]
fn matmul_matches_cpu() {
    let Some(rt) = gpu("matmul_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(7);
    for &(n, c, oc) in &[(1usize, 5usize, 3usize), (17, 48, 33), (130, 96, 200)] {
        let (inp, weight, bias) = (
            rng.values(n * c, 1.0),
            rng.values(oc * c, 1.0),
            rng.values(oc, 1.0),
        );
        let (inp_d, w_d, b_d) = (
            rt.upload(&inp).unwrap(),
            rt.upload(&weight).unwrap(),
            rt.upload(&bias).unwrap(),
        );
        for with_bias in [true, false] {
            let mut out = vec![0.0f32; n * oc];
            cpu::matmul_forward(
                &mut out,
                &inp,
                &weight,
                with_bias.then_some(&bias[..]),
                n,
                c,
                oc,
            );
            let mut out_d = poisoned::<f32>(&rt, n * oc);
            rt.matmul_forward(
                &mut out_d,
                &inp_d,
                &w_d,
                with_bias.then_some(&b_d),
                n,
                c,
                oc,
            )
            .unwrap();
            assert_close(
                "matmul_forward",
                &rt.download(&out_d).unwrap(),
                &out,
                F32_SUM,
            );
        }
        let dout = rng.values(n * oc, 1.0);
        let (mut dinp, mut dweight, mut dbias) = (
            rng.values(n * c, 1.0),
            rng.values(oc * c, 1.0),
            rng.values(oc, 1.0),
        );
        let (mut dinp_d, mut dweight_d, mut dbias_d) = (
            rt.upload(&dinp).unwrap(),
            rt.upload(&dweight).unwrap(),
            rt.upload(&dbias).unwrap(),
        );
        rt.matmul_backward(
            &mut dinp_d,
            &mut dweight_d,
            Some(&mut dbias_d),
            &rt.upload(&dout).unwrap(),
            &inp_d,
            &w_d,
            n,
            c,
            oc,
        )
        .unwrap();
        cpu::matmul_backward(
            &mut dinp,
            &mut dweight,
            Some(&mut dbias[..]),
            &dout,
            &inp,
            &weight,
            n,
            c,
            oc,
        );
        assert_close(
            "matmul_backward dinp",
            &rt.download(&dinp_d).unwrap(),
            &dinp,
            F32_SUM,
        );
        assert_close(
            "matmul_backward dweight",
            &rt.download(&dweight_d).unwrap(),
            &dweight,
            F32_SUM,
        );
        assert_close(
            "matmul_backward dbias",
            &rt.download(&dbias_d).unwrap(),
            &dbias,
            F32_SUM,
        );
    }
}

#[test]
fn ranking_loss_matches_cpu() {
    let Some(rt) = gpu("ranking_loss_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(8);
    // Prompts of 2..=70 completions: K above the block's 64 threads loops.
    let ks = [2usize, 3, 8, 11, 5, 70, 4];
    let types: Vec<Option<PromptType>> = (0..ks.len())
        .map(|p| {
            Some(if p % 2 == 0 {
                PromptType::Open
            } else {
                PromptType::Closed
            })
        })
        .collect();
    // Every utility the CPU's gradient check covers, then the prompt-aware ones.
    let mut specs: Vec<LossSpec> = (rcx::gradcheck::UTILITIES.iter())
        .chain(&["adaptive", "adaptive2"])
        .map(|name| LossSpec::parse(name).unwrap())
        .collect();
    specs.push(LossSpec::PromptAware {
        open: Utility::Power(3.0),
        closed: Utility::LogSigmoid,
    });
    let total: usize = ks.iter().sum();
    // Logits spread wide (rewards near 0 and 1 too) and with near-ties (x near 0).
    let mut logits = rng.values(total, 4.0);
    logits[1] = logits[0] + 1e-4;
    let logits_d = rt.upload(&logits).unwrap();
    let logits64: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
    for spec in &specs {
        for eps in [0.1, 0.01, 1e-3] {
            let batch = RankingBatch::new(&rt, &ks, &types, spec).unwrap();
            let mut dlogits_d = poisoned::<f32>(&rt, total);
            let loss = rt
                .ranking_loss_forward_backward(&mut dlogits_d, &logits_d, &batch, eps)
                .unwrap();
            let mut dlogits = vec![0.0f64; total];
            let expected =
                ranking_loss_forward_backward(&logits64, &ks, &types, spec, eps, &mut dlogits)
                    .unwrap();
            assert_close_f64(
                &format!("ranking loss {spec:?} eps {eps}"),
                &[loss],
                &[expected],
                1e-12,
            );
            let got: Vec<f64> = rt
                .download(&dlogits_d)
                .unwrap()
                .iter()
                .map(|&x| x as f64)
                .collect();
            assert_close_f64(
                &format!("ranking dlogits {spec:?} eps {eps}"),
                &got,
                &dlogits,
                F32,
            );
        }
    }
    // A prompt-aware loss needs every prompt's type, as on the CPU.
    let spec = LossSpec::parse("adaptive").unwrap();
    assert!(RankingBatch::new(&rt, &[2, 3], &[Some(PromptType::Open), None], &spec).is_err());
}

#[test]
fn global_norm_matches_cpu() {
    let Some(rt) = gpu("global_norm_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(9);
    let buffers: Vec<Vec<f32>> = [1usize, 1000, 300_001, 4097]
        .iter()
        .map(|&len| rng.values(len, 1.0))
        .collect();
    let device: Vec<_> = buffers.iter().map(|g| rt.upload(g).unwrap()).collect();
    let refs: Vec<_> = device.iter().map(|d| d.as_view()).collect();
    let expected: f64 = buffers.iter().map(|g| cpu::global_norm_squared(g)).sum();
    let got = rt.global_norm_squared(&refs).unwrap();
    assert_close_f64("global_norm_squared", &[got], &[expected], 1e-12);
    assert_eq!(
        rt.global_norm_squared(&refs).unwrap(),
        got,
        "the norm must be deterministic"
    );
}

#[test]
fn adamw_matches_cpu() {
    let Some(rt) = gpu("adamw_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(10);
    let len = 10_007;
    let (mut params, grads) = (rng.values(len, 1.0), rng.values(len, 0.1));
    let (mut m, mut v) = (
        rng.values(len, 0.01),
        rng.values(len, 0.001)
            .iter()
            .map(|x| x.abs())
            .collect::<Vec<_>>(),
    );
    let (mut p_d, g_d, mut m_d, mut v_d) = (
        rt.upload(&params).unwrap(),
        rt.upload(&grads).unwrap(),
        rt.upload(&m).unwrap(),
        rt.upload(&v).unwrap(),
    );
    let mut copy_d = poisoned::<bf16>(&rt, len);
    for step in 1..=3u64 {
        let hp = AdamWStep {
            step,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            grad_scale: 0.7,
        };
        rt.adamw_update_bf16_copy(&mut p_d, &mut copy_d, &g_d, &mut m_d, &mut v_d, &hp)
            .unwrap();
        cpu::adamw_update(
            &mut params,
            &grads,
            &mut m,
            &mut v,
            step,
            hp.lr,
            hp.beta1,
            hp.beta2,
            hp.eps,
            hp.weight_decay,
            hp.grad_scale,
        );
    }
    assert_close("adamw params", &rt.download(&p_d).unwrap(), &params, F32);
    assert_close("adamw m", &rt.download(&m_d).unwrap(), &m, F32);
    assert_close("adamw v", &rt.download(&v_d).unwrap(), &v, F32);
    assert_eq!(
        download_f32(&rt, &copy_d),
        rounded::<bf16>(&rt.download(&p_d).unwrap()),
        "bf16 copy"
    );

    let hp = AdamWStep {
        step: 4,
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        grad_scale: 1.0,
    };
    rt.adamw_update(&mut p_d, &g_d, &mut m_d, &mut v_d, &hp)
        .unwrap();
    cpu::adamw_update(
        &mut params,
        &grads,
        &mut m,
        &mut v,
        4,
        hp.lr,
        hp.beta1,
        hp.beta2,
        hp.eps,
        0.0,
        1.0,
    );
    assert_close(
        "adamw_update params",
        &rt.download(&p_d).unwrap(),
        &params,
        F32,
    );
    assert!(
        rt.adamw_update(
            &mut p_d,
            &g_d,
            &mut m_d,
            &mut v_d,
            &AdamWStep { step: 0, ..hp }
        )
        .is_err()
    );
}

/// Every test above, rerun on the emulated device (tests/emu/fake_device.rs) when this
/// machine has no GPU: the kernels on the CPU emulator behind a fake driver and cuBLAS.
#[test]
fn all_gpu_tests_on_the_emulated_device() {
    let itself = "all_gpu_tests_on_the_emulated_device";
    fake_device::rerun_on_emulated_device(itself, &["--skip", itself]);
}
