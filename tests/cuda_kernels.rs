//! The CUDA kernels against their CPU twins (rcx::backend::cpu, rcx::loss), on random
//! non-zero inputs at odd shapes (padded sequences, prompts of 2..11 completions).
//! Outputs are poisoned with NaN before every launch, so an element a kernel forgets is
//! caught; gradients start from random values, so `+=` versus `=` is caught too.
//!
//! Tolerances: |gpu - cpu| <= rtol · (|cpu| + mean |cpu|), rtol = 1e-5 for fp32 (1e-4 for
//! long fp32 reductions such as weight gradients), 1e-2 for bf16 activations; f64 results
//! (loss, norm) 1e-9.
//!
//! Without a GPU (or without kernels) every device test prints why it was skipped and
//! passes; set RCX_REQUIRE_GPU=1 on a GPU machine to make a skip a failure.

mod common;
#[path = "emu/build.rs"]
mod emu_build;
#[path = "emu/fake_device.rs"]
mod fake_device;

use common::InputRng as Rng;
use half::bf16;
use rcx::backend::cpu;
use rcx::backend::cuda::{
    self, AdamWStep, CudaRuntime, FlashKernels, KERNEL_IMAGES, KERNELS_BUILT, RankingBatch,
    TokenBatch,
};
use rcx::loss::{LossSpec, PromptType, Utility, ranking_loss_forward_backward};

const F32: f64 = 1e-5;
const F32_SUM: f64 = 1e-4;
const BF16: f64 = 1e-2;
/// Attention version 3 (tensor cores) against the exact attention: see
/// flash_attention_tensor_cores_match_cpu.
const TC_EXACT: f64 = 5e-2;

/// The device, or None after printing why the test is skipped.
fn gpu(test: &str) -> Option<CudaRuntime> {
    match cuda::available() {
        Ok(()) => Some(CudaRuntime::new(0).expect("CUDA is available but the runtime failed")),
        Err(why) => {
            assert!(
                std::env::var("RCX_REQUIRE_GPU").map_or(true, |v| v != "1"),
                "{test}: RCX_REQUIRE_GPU=1 but no GPU: {why}"
            );
            eprintln!("{test}: skipped, no GPU: {why}");
            None
        }
    }
}

fn nan(len: usize) -> Vec<f32> {
    vec![f32::NAN; len]
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn from_bf16(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Values as bf16 would store them, for the CPU side of a bf16 comparison.
fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    from_bf16(&to_bf16(v))
}

fn assert_close(what: &str, gpu: &[f32], cpu: &[f32], rtol: f64) {
    let gpu: Vec<f64> = gpu.iter().map(|&x| x as f64).collect();
    let cpu: Vec<f64> = cpu.iter().map(|&x| x as f64).collect();
    assert_close_f64(what, &gpu, &cpu, rtol);
}

fn assert_close_f64(what: &str, gpu: &[f64], cpu: &[f64], rtol: f64) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths differ");
    let mean_abs = cpu.iter().map(|x| x.abs()).sum::<f64>() / cpu.len().max(1) as f64;
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        let tol = rtol * (c.abs() + mean_abs);
        assert!(
            (g - c).abs() <= tol,
            "{what}[{i}]: gpu {g} vs cpu {c} (tolerance {tol:e}, {} elements)",
            cpu.len()
        );
    }
}

/// Odd shapes: (b, t, nh, hs); lengths of the real tokens of each sequence are drawn per
/// test, some sequences padded, one with no real token where the shape allows.
const SHAPES: [(usize, usize, usize, usize); 3] = [(2, 7, 3, 16), (3, 13, 5, 8), (1, 33, 2, 48)];

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

#[test]
fn embedding_matches_cpu() {
    let Some(rt) = gpu("embedding_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(1);
    for &(b, t, nh, hs) in &SHAPES {
        let (c, vocab, max_pos, ntypes) = (nh * hs, 23, t + 3, 2);
        // Few distinct ids, so rows repeat and the backward really sums.
        let ids = rng.below(b * t, vocab as u32);
        let types = rng.below(b * t, ntypes as u32);
        let (wte, wpe, wtt) = (
            rng.values(vocab * c, 1.0),
            rng.values(max_pos * c, 1.0),
            rng.values(ntypes * c, 1.0),
        );
        let tokens = TokenBatch::new(&rt, &ids, &types, b, t, (vocab, max_pos, ntypes)).unwrap();
        let mut expected = vec![0.0f32; b * t * c];
        cpu::embedding_forward(&mut expected, &ids, &types, &wte, &wpe, &wtt, b, t, c);
        let (wte_d, wpe_d, wtt_d) = (
            rt.upload(&wte).unwrap(),
            rt.upload(&wpe).unwrap(),
            rt.upload(&wtt).unwrap(),
        );
        let mut out = rt.upload(&nan(b * t * c)).unwrap();
        rt.embedding_forward(&mut out, &tokens, &wte_d, &wpe_d, &wtt_d, c)
            .unwrap();
        assert_close(
            "embedding_forward",
            &rt.download(&out).unwrap(),
            &expected,
            F32,
        );

        let mut out16 = rt.upload(&to_bf16(&nan(b * t * c))).unwrap();
        rt.embedding_forward(&mut out16, &tokens, &wte_d, &wpe_d, &wtt_d, c)
            .unwrap();
        assert_close(
            "embedding_forward bf16",
            &from_bf16(&rt.download(&out16).unwrap()),
            &expected,
            BF16,
        );

        let dout = rng.values(b * t * c, 1.0);
        let (mut dwte, mut dwpe, mut dwtt) = (
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
            &rt.upload(&dout).unwrap(),
            &tokens,
            c,
        )
        .unwrap();
        cpu::embedding_backward(
            &mut dwte, &mut dwpe, &mut dwtt, &dout, &ids, &types, b, t, c,
        );
        assert_close(
            "embedding_backward dwte",
            &rt.download(&dwte_d).unwrap(),
            &dwte,
            F32_SUM,
        );
        assert_close(
            "embedding_backward dwpe",
            &rt.download(&dwpe_d).unwrap(),
            &dwpe,
            F32_SUM,
        );
        assert_close(
            "embedding_backward dwtt",
            &rt.download(&dwtt_d).unwrap(),
            &dwtt,
            F32_SUM,
        );
    }
    // Ids outside the tables are refused before any launch.
    assert!(TokenBatch::new(&rt, &[5], &[0], 1, 1, (5, 4, 2)).is_err());
}

#[test]
fn layernorm_matches_cpu() {
    let Some(rt) = gpu("layernorm_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(2);
    for &(n, c) in &[(1usize, 33usize), (14, 48), (65, 200), (9, 768)] {
        let (a, b) = (rng.values(n * c, 2.0), rng.values(n * c, 2.0));
        let (weight, bias) = (rng.values(c, 1.0), rng.values(c, 1.0));
        let mut sum = vec![0.0f32; n * c];
        cpu::residual_forward(&mut sum, &a, &b);
        let (mut out, mut mean, mut rstd) = (vec![0.0f32; n * c], vec![0.0f32; n], vec![0.0f32; n]);
        cpu::layernorm_forward(
            &mut out, &mut mean, &mut rstd, &sum, &weight, &bias, n, c, 1e-12,
        );
        let (w_d, b_d) = (rt.upload(&weight).unwrap(), rt.upload(&bias).unwrap());

        let (mut out_d, mut mean_d, mut rstd_d) = (
            rt.upload(&nan(n * c)).unwrap(),
            rt.upload(&nan(n)).unwrap(),
            rt.upload(&nan(n)).unwrap(),
        );
        let sum_in = rt.upload(&sum).unwrap();
        rt.layernorm_forward(
            &mut out_d,
            &mut mean_d,
            &mut rstd_d,
            &sum_in,
            &w_d,
            &b_d,
            n,
            c,
            1e-12,
        )
        .unwrap();
        assert_close(
            "layernorm_forward out",
            &rt.download(&out_d).unwrap(),
            &out,
            F32,
        );
        assert_close(
            "layernorm_forward mean",
            &rt.download(&mean_d).unwrap(),
            &mean,
            F32,
        );
        assert_close(
            "layernorm_forward rstd",
            &rt.download(&rstd_d).unwrap(),
            &rstd,
            F32,
        );

        let mut sum_d = rt.upload(&nan(n * c)).unwrap();
        let (mut out_d, mut mean_d, mut rstd_d) = (
            rt.upload(&nan(n * c)).unwrap(),
            rt.upload(&nan(n)).unwrap(),
            rt.upload(&nan(n)).unwrap(),
        );
        rt.residual_layernorm_forward(
            &mut out_d,
            &mut sum_d,
            &mut mean_d,
            &mut rstd_d,
            &rt.upload(&a).unwrap(),
            &rt.upload(&b).unwrap(),
            &w_d,
            &b_d,
            n,
            c,
            1e-12,
        )
        .unwrap();
        assert_close(
            "residual_layernorm_forward sum",
            &rt.download(&sum_d).unwrap(),
            &sum,
            F32,
        );
        assert_close(
            "residual_layernorm_forward out",
            &rt.download(&out_d).unwrap(),
            &out,
            F32,
        );

        let dout = rng.values(n * c, 1.0);
        let (mut dinp, mut dweight, mut dbias) = (
            rng.values(n * c, 1.0),
            rng.values(c, 1.0),
            rng.values(c, 1.0),
        );
        let (mut dinp_d, mut dweight_d, mut dbias_d) = (
            rt.upload(&dinp).unwrap(),
            rt.upload(&dweight).unwrap(),
            rt.upload(&dbias).unwrap(),
        );
        rt.layernorm_backward(
            &mut dinp_d,
            &mut dweight_d,
            &mut dbias_d,
            &rt.upload(&dout).unwrap(),
            &sum_in,
            &w_d,
            &rt.upload(&mean).unwrap(),
            &rt.upload(&rstd).unwrap(),
            n,
            c,
        )
        .unwrap();
        cpu::layernorm_backward(
            &mut dinp,
            &mut dweight,
            &mut dbias,
            &dout,
            &sum,
            &weight,
            &mean,
            &rstd,
            n,
            c,
        );
        assert_close(
            "layernorm_backward dinp",
            &rt.download(&dinp_d).unwrap(),
            &dinp,
            F32_SUM,
        );
        assert_close(
            "layernorm_backward dweight",
            &rt.download(&dweight_d).unwrap(),
            &dweight,
            F32_SUM,
        );
        assert_close(
            "layernorm_backward dbias",
            &rt.download(&dbias_d).unwrap(),
            &dbias,
            F32_SUM,
        );

        // bf16 activations: the CPU sees the same rounded inputs.
        let sum16 = round_bf16(&sum);
        let (mut out, mut mean, mut rstd) = (vec![0.0f32; n * c], vec![0.0f32; n], vec![0.0f32; n]);
        cpu::layernorm_forward(
            &mut out, &mut mean, &mut rstd, &sum16, &weight, &bias, n, c, 1e-12,
        );
        let mut out_d = rt.upload(&to_bf16(&nan(n * c))).unwrap();
        let (mut mean_d, mut rstd_d) = (rt.upload(&nan(n)).unwrap(), rt.upload(&nan(n)).unwrap());
        rt.layernorm_forward(
            &mut out_d,
            &mut mean_d,
            &mut rstd_d,
            &rt.upload(&to_bf16(&sum16)).unwrap(),
            &w_d,
            &b_d,
            n,
            c,
            1e-12,
        )
        .unwrap();
        assert_close(
            "layernorm_forward bf16",
            &from_bf16(&rt.download(&out_d).unwrap()),
            &out,
            BF16,
        );
        assert_close(
            "layernorm_forward bf16 rstd",
            &rt.download(&rstd_d).unwrap(),
            &rstd,
            F32,
        );
    }
}

#[test]
fn activations_match_cpu() {
    let Some(rt) = gpu("activations_match_cpu") else {
        return;
    };
    let mut rng = Rng::new(3);
    for &(n, c) in &[(1usize, 7usize), (13, 96), (70, 300)] {
        let (inp, bias) = (rng.values(n * c, 3.0), rng.values(c, 1.0));
        let pre: Vec<f32> = inp
            .iter()
            .enumerate()
            .map(|(i, &x)| x + bias[i % c])
            .collect();
        let mut expected = vec![0.0f32; n * c];
        cpu::gelu_forward(&mut expected, &pre);
        let (inp_d, bias_d) = (rt.upload(&inp).unwrap(), rt.upload(&bias).unwrap());
        let mut out_d = rt.upload(&nan(n * c)).unwrap();
        rt.bias_gelu_forward(&mut out_d, &inp_d, &bias_d, n, c)
            .unwrap();
        assert_close(
            "bias_gelu_forward",
            &rt.download(&out_d).unwrap(),
            &expected,
            F32,
        );

        let dout = rng.values(n * c, 1.0);
        let (mut dinp, mut dbias) = (rng.values(n * c, 1.0), rng.values(c, 1.0));
        let (mut dinp_d, mut dbias_d) = (rt.upload(&dinp).unwrap(), rt.upload(&dbias).unwrap());
        rt.bias_gelu_backward(
            &mut dinp_d,
            &mut dbias_d,
            &rt.upload(&dout).unwrap(),
            &inp_d,
            &bias_d,
            n,
            c,
        )
        .unwrap();
        let mut dpre = vec![0.0f32; n * c];
        cpu::gelu_backward(&mut dpre, &pre, &dout);
        for (i, g) in dpre.iter().enumerate() {
            dinp[i] += g;
            dbias[i % c] += g;
        }
        assert_close(
            "bias_gelu_backward dinp",
            &rt.download(&dinp_d).unwrap(),
            &dinp,
            F32,
        );
        assert_close(
            "bias_gelu_backward dbias",
            &rt.download(&dbias_d).unwrap(),
            &dbias,
            F32_SUM,
        );

        let inp16 = round_bf16(&inp);
        let pre16: Vec<f32> = inp16
            .iter()
            .enumerate()
            .map(|(i, &x)| x + bias[i % c])
            .collect();
        cpu::gelu_forward(&mut expected, &pre16);
        let mut out16 = rt.upload(&to_bf16(&nan(n * c))).unwrap();
        rt.bias_gelu_forward(
            &mut out16,
            &rt.upload(&to_bf16(&inp16)).unwrap(),
            &bias_d,
            n,
            c,
        )
        .unwrap();
        assert_close(
            "bias_gelu_forward bf16",
            &from_bf16(&rt.download(&out16).unwrap()),
            &expected,
            BF16,
        );

        let mut expected = vec![0.0f32; n * c];
        cpu::tanh_forward(&mut expected, &inp);
        let mut out_d = rt.upload(&nan(n * c)).unwrap();
        rt.tanh_forward(&mut out_d, &inp_d).unwrap();
        assert_close(
            "tanh_forward",
            &rt.download(&out_d).unwrap(),
            &expected,
            F32,
        );
        let mut dinp = rng.values(n * c, 1.0);
        let mut dinp_d = rt.upload(&dinp).unwrap();
        rt.tanh_backward(
            &mut dinp_d,
            &rt.upload(&expected).unwrap(),
            &rt.upload(&dout).unwrap(),
        )
        .unwrap();
        cpu::tanh_backward(&mut dinp, &expected, &dout);
        assert_close("tanh_backward", &rt.download(&dinp_d).unwrap(), &dinp, F32);

        let other = rng.values(n * c, 1.0);
        cpu::residual_forward(&mut expected, &inp, &other);
        let mut out_d = rt.upload(&nan(n * c)).unwrap();
        rt.residual_forward(&mut out_d, &inp_d, &rt.upload(&other).unwrap())
            .unwrap();
        assert_close(
            "residual_forward",
            &rt.download(&out_d).unwrap(),
            &expected,
            F32,
        );
    }
}

#[test]
fn dropout_matches_cpu_bit_for_bit() {
    let Some(rt) = gpu("dropout_matches_cpu_bit_for_bit") else {
        return;
    };
    let mut rng = Rng::new(4);
    for &(len, p, seed) in &[
        (1usize, 0.5, 0u64),
        (1000, 0.1, 42),
        (40_001, 0.3, u64::MAX),
        (777, 0.0, 7),
        (64, 1.0, 9),
    ] {
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

        let inp = rng.values(len, 1.0);
        let mut expected = vec![0.0f32; len];
        cpu::dropout_forward(&mut expected, &inp, p, seed);
        let mut out_d = rt.upload(&nan(len)).unwrap();
        rt.dropout_forward(&mut out_d, &rt.upload(&inp).unwrap(), p, seed)
            .unwrap();
        assert_eq!(
            rt.download(&out_d).unwrap(),
            expected,
            "dropout_forward, p {p}"
        );

        let dout = rng.values(len, 1.0);
        let mut dinp = rng.values(len, 1.0);
        let mut dinp_d = rt.upload(&dinp).unwrap();
        rt.dropout_backward(&mut dinp_d, &rt.upload(&dout).unwrap(), p, seed)
            .unwrap();
        cpu::dropout_backward(&mut dinp, &dout, p, seed);
        assert_eq!(
            rt.download(&dinp_d).unwrap(),
            dinp,
            "dropout_backward, p {p}"
        );

        let mut out16 = rt.upload(&to_bf16(&nan(len))).unwrap();
        rt.dropout_forward(&mut out16, &rt.upload(&to_bf16(&inp)).unwrap(), p, seed)
            .unwrap();
        let mut expected16 = vec![0.0f32; len];
        cpu::dropout_forward(&mut expected16, &round_bf16(&inp), p, seed);
        assert_close(
            "dropout_forward bf16",
            &from_bf16(&rt.download(&out16).unwrap()),
            &expected16,
            BF16,
        );
    }
    assert!(
        rt.dropout_mask(&mut rt.zeros::<u8>(4).unwrap(), 1.5, 0)
            .is_err()
    );
}

#[test]
fn attention_matches_cpu() {
    let Some(rt) = gpu("attention_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(5);
    // Without and with dropout on the probabilities: the same mask as the CPU's, bit for
    // bit (a differing element would move the outputs far beyond the tolerances).
    let dropouts = [None, Some(cpu::AttentionDropout { p: 0.3, seed: 9 })];
    for (&(b, t, nh, hs), dropout) in SHAPES
        .iter()
        .flat_map(|s| dropouts.iter().map(move |d| (s, *d)))
    {
        let act = b * t * nh * hs;
        let (q, k, v) = (
            rng.values(act, 2.0),
            rng.values(act, 2.0),
            rng.values(act, 1.0),
        );
        let mask = rng.padding_mask(b, t);
        let (mut out, mut probs) = (vec![0.0f32; act], vec![0.0f32; b * nh * t * t]);
        cpu::attention_forward(
            &mut out, &mut probs, &q, &k, &v, &mask, b, t, nh, hs, dropout,
        );
        let (q_d, k_d, v_d, mask_d) = (
            rt.upload(&q).unwrap(),
            rt.upload(&k).unwrap(),
            rt.upload(&v).unwrap(),
            rt.upload(&mask).unwrap(),
        );
        let (mut out_d, mut probs_d) = (
            rt.upload(&nan(act)).unwrap(),
            rt.upload(&nan(probs.len())).unwrap(),
        );
        rt.attention_forward(
            &mut out_d,
            &mut probs_d,
            &q_d,
            &k_d,
            &v_d,
            &mask_d,
            (b, t, nh, hs),
            dropout,
        )
        .unwrap();
        assert_close(
            &format!("attention_forward out, {dropout:?}"),
            &rt.download(&out_d).unwrap(),
            &out,
            F32_SUM,
        );
        assert_close(
            &format!("attention_forward probs, {dropout:?}"),
            &rt.download(&probs_d).unwrap(),
            &probs,
            F32_SUM,
        );

        let dout = rng.values(act, 1.0);
        let (mut dq, mut dk, mut dv) = (
            rng.values(act, 1.0),
            rng.values(act, 1.0),
            rng.values(act, 1.0),
        );
        let (mut dq_d, mut dk_d, mut dv_d) = (
            rt.upload(&dq).unwrap(),
            rt.upload(&dk).unwrap(),
            rt.upload(&dv).unwrap(),
        );
        let mut scratch = rt.upload(&nan(probs.len())).unwrap();
        rt.attention_backward(
            &mut dq_d,
            &mut dk_d,
            &mut dv_d,
            &mut scratch,
            &rt.upload(&dout).unwrap(),
            &q_d,
            &k_d,
            &v_d,
            &rt.upload(&probs).unwrap(),
            (b, t, nh, hs),
            dropout,
        )
        .unwrap();
        cpu::attention_backward(
            &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &probs, &mask, b, t, nh, hs, dropout,
        );
        assert_close(
            &format!("attention_backward dq, {dropout:?}"),
            &rt.download(&dq_d).unwrap(),
            &dq,
            F32_SUM,
        );
        assert_close(
            &format!("attention_backward dk, {dropout:?}"),
            &rt.download(&dk_d).unwrap(),
            &dk,
            F32_SUM,
        );
        assert_close(
            &format!("attention_backward dv, {dropout:?}"),
            &rt.download(&dv_d).unwrap(),
            &dv,
            F32_SUM,
        );

        let (q16, k16, v16) = (round_bf16(&q), round_bf16(&k), round_bf16(&v));
        cpu::attention_forward(
            &mut out, &mut probs, &q16, &k16, &v16, &mask, b, t, nh, hs, dropout,
        );
        let mut out16 = rt.upload(&to_bf16(&nan(act))).unwrap();
        rt.attention_forward(
            &mut out16,
            &mut probs_d,
            &rt.upload(&to_bf16(&q16)).unwrap(),
            &rt.upload(&to_bf16(&k16)).unwrap(),
            &rt.upload(&to_bf16(&v16)).unwrap(),
            &mask_d,
            (b, t, nh, hs),
            dropout,
        )
        .unwrap();
        assert_close(
            &format!("attention_forward bf16, {dropout:?}"),
            &from_bf16(&rt.download(&out16).unwrap()),
            &out,
            BF16,
        );
    }
}

/// Version 2 (flash) shapes (b, t, nh, hs): odd t (1, 7, 33, 130), head sizes 32, 64, 24,
/// 33 and 128 (the largest, whose backward asks for more than 48 KiB of shared memory).
/// With b > 1 the last sequence is all padding (padding_mask).
const FLASH_SHAPES: [(usize, usize, usize, usize); 6] = [
    (1, 1, 2, 32),
    (2, 7, 3, 24),
    (3, 33, 2, 64),
    (2, 130, 2, 32),
    (2, 17, 1, 33),
    (2, 40, 1, 128),
];

/// lse [b, nh, t] = log Σ_j exp(s_ij) over the allowed keys, s = q_i · k_j / √hs, in f64.
#[allow(clippy::too_many_arguments)]
fn reference_lse(
    q: &[f32],
    k: &[f32],
    mask: &[u8],
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) -> Vec<f32> {
    let channels = nh * hs;
    let scale = 1.0 / (hs as f64).sqrt();
    let mut lse = Vec::with_capacity(b * nh * t);
    for bi in 0..b {
        let mask_b = &mask[bi * t..(bi + 1) * t];
        let any_real = mask_b.iter().any(|&m| m != 0);
        for h in 0..nh {
            for i in 0..t {
                let row = |x: &[f32], r: usize| {
                    let at = (bi * t + r) * channels + h * hs;
                    x[at..at + hs].to_vec()
                };
                let q_i = row(q, i);
                let scores: Vec<f64> = (0..t)
                    .filter(|&j| !any_real || mask_b[j] != 0)
                    .map(|j| {
                        let k_j = row(k, j);
                        scale
                            * q_i
                                .iter()
                                .zip(&k_j)
                                .map(|(&a, &c)| a as f64 * c as f64)
                                .sum::<f64>()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                lse.push((max + sum.ln()) as f32);
            }
        }
    }
    lse
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
    let dropouts = [None, Some(cpu::AttentionDropout { p: 0.2, seed: 77 })];
    for (&(b, t, nh, hs), dropout) in FLASH_SHAPES
        .iter()
        .flat_map(|s| dropouts.iter().map(move |d| (s, *d)))
    {
        let dims = (b, t, nh, hs);
        let case = format!("{dims:?}, {dropout:?}");
        let (act, rows) = (b * t * nh * hs, b * nh * t);
        let (q, k, v) = (
            rng.values(act, 2.0),
            rng.values(act, 2.0),
            rng.values(act, 1.0),
        );
        let mask = rng.padding_mask(b, t);
        let (mut out, mut probs) = (vec![0.0f32; act], vec![0.0f32; b * nh * t * t]);
        cpu::attention_forward(
            &mut out, &mut probs, &q, &k, &v, &mask, b, t, nh, hs, dropout,
        );
        let (q_d, k_d, v_d, mask_d) = (
            rt.upload(&q).unwrap(),
            rt.upload(&k).unwrap(),
            rt.upload(&v).unwrap(),
            rt.upload(&mask).unwrap(),
        );
        let (mut out_d, mut lse_d) = (
            rt.upload(&nan(act)).unwrap(),
            rt.upload(&nan(rows)).unwrap(),
        );
        rt.flash_attention_forward(
            &mut out_d,
            &mut lse_d,
            &q_d,
            &k_d,
            &v_d,
            &mask_d,
            dims,
            dropout,
            FlashKernels::CudaCores,
        )
        .unwrap();
        let out_v2 = rt.download(&out_d).unwrap();
        assert_close(
            &format!("flash_attention_forward out, {case}"),
            &out_v2,
            &out,
            F32,
        );
        assert_close(
            &format!("flash_attention_forward lse, {case}"),
            &rt.download(&lse_d).unwrap(),
            &reference_lse(&q, &k, &mask, b, t, nh, hs),
            F32,
        );
        // Version 1 on the same inputs: the two GPU versions agree.
        let (mut out_v1_d, mut probs_d) = (
            rt.upload(&nan(act)).unwrap(),
            rt.upload(&nan(probs.len())).unwrap(),
        );
        rt.attention_forward(
            &mut out_v1_d,
            &mut probs_d,
            &q_d,
            &k_d,
            &v_d,
            &mask_d,
            dims,
            dropout,
        )
        .unwrap();
        let out_v1 = rt.download(&out_v1_d).unwrap();
        assert_close(
            &format!("attention v1 vs v2 out, {case}"),
            &out_v2,
            &out_v1,
            F32,
        );

        let dout = rng.values(act, 1.0);
        let (dq0, dk0, dv0) = (
            rng.values(act, 1.0),
            rng.values(act, 1.0),
            rng.values(act, 1.0),
        );
        let dout_d = rt.upload(&dout).unwrap();
        let (mut dq_d, mut dk_d, mut dv_d) = (
            rt.upload(&dq0).unwrap(),
            rt.upload(&dk0).unwrap(),
            rt.upload(&dv0).unwrap(),
        );
        let mut row_dot = rt.upload(&nan(rows)).unwrap();
        rt.flash_attention_backward(
            &mut dq_d,
            &mut dk_d,
            &mut dv_d,
            &mut row_dot,
            &dout_d,
            &out_d,
            &q_d,
            &k_d,
            &v_d,
            &lse_d,
            &mask_d,
            dims,
            dropout,
            FlashKernels::CudaCores,
        )
        .unwrap();
        let (mut dq, mut dk, mut dv) = (dq0.clone(), dk0.clone(), dv0.clone());
        cpu::attention_backward(
            &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &probs, &mask, b, t, nh, hs, dropout,
        );
        let v2 = [
            rt.download(&dq_d).unwrap(),
            rt.download(&dk_d).unwrap(),
            rt.download(&dv_d).unwrap(),
        ];
        for (name, gpu, cpu) in [
            ("dq", &v2[0], &dq),
            ("dk", &v2[1], &dk),
            ("dv", &v2[2], &dv),
        ] {
            assert_close(
                &format!("flash_attention_backward {name}, {case}"),
                gpu,
                cpu,
                F32_SUM,
            );
        }
        // Version 1's backward from the same starting gradients.
        let (mut dq1_d, mut dk1_d, mut dv1_d) = (
            rt.upload(&dq0).unwrap(),
            rt.upload(&dk0).unwrap(),
            rt.upload(&dv0).unwrap(),
        );
        let mut dscores = rt.upload(&nan(probs.len())).unwrap();
        rt.attention_backward(
            &mut dq1_d,
            &mut dk1_d,
            &mut dv1_d,
            &mut dscores,
            &dout_d,
            &q_d,
            &k_d,
            &v_d,
            &probs_d,
            dims,
            dropout,
        )
        .unwrap();
        for (name, v1, v2) in [
            ("dq", &dq1_d, &v2[0]),
            ("dk", &dk1_d, &v2[1]),
            ("dv", &dv1_d, &v2[2]),
        ] {
            assert_close(
                &format!("attention v1 vs v2 {name}, {case}"),
                v2,
                &rt.download(v1).unwrap(),
                F32_SUM,
            );
        }

        // bf16 activations: the CPU sees the same rounded inputs.
        let (q16, k16, v16, dout16) = (
            round_bf16(&q),
            round_bf16(&k),
            round_bf16(&v),
            round_bf16(&dout),
        );
        cpu::attention_forward(
            &mut out, &mut probs, &q16, &k16, &v16, &mask, b, t, nh, hs, dropout,
        );
        let (q16_d, k16_d, v16_d) = (
            rt.upload(&to_bf16(&q16)).unwrap(),
            rt.upload(&to_bf16(&k16)).unwrap(),
            rt.upload(&to_bf16(&v16)).unwrap(),
        );
        let mut out16 = rt.upload(&to_bf16(&nan(act))).unwrap();
        let mut lse16 = rt.upload(&nan(rows)).unwrap();
        rt.flash_attention_forward(
            &mut out16,
            &mut lse16,
            &q16_d,
            &k16_d,
            &v16_d,
            &mask_d,
            dims,
            dropout,
            FlashKernels::CudaCores,
        )
        .unwrap();
        assert_close(
            &format!("flash_attention_forward bf16, {case}"),
            &from_bf16(&rt.download(&out16).unwrap()),
            &out,
            BF16,
        );
        let (dq16_0, dk16_0, dv16_0) = (round_bf16(&dq0), round_bf16(&dk0), round_bf16(&dv0));
        let (mut dq16_d, mut dk16_d, mut dv16_d) = (
            rt.upload(&to_bf16(&dq16_0)).unwrap(),
            rt.upload(&to_bf16(&dk16_0)).unwrap(),
            rt.upload(&to_bf16(&dv16_0)).unwrap(),
        );
        rt.flash_attention_backward(
            &mut dq16_d,
            &mut dk16_d,
            &mut dv16_d,
            &mut row_dot,
            &rt.upload(&to_bf16(&dout16)).unwrap(),
            &out16,
            &q16_d,
            &k16_d,
            &v16_d,
            &lse16,
            &mask_d,
            dims,
            dropout,
            FlashKernels::CudaCores,
        )
        .unwrap();
        let (mut dq, mut dk, mut dv) = (dq16_0, dk16_0, dv16_0);
        cpu::attention_backward(
            &mut dq, &mut dk, &mut dv, &dout16, &q16, &k16, &v16, &probs, &mask, b, t, nh, hs,
            dropout,
        );
        for (name, gpu, cpu) in [
            ("dq", &dq16_d, &dq),
            ("dk", &dk16_d, &dk),
            ("dv", &dv16_d, &dv),
        ] {
            assert_close(
                &format!("flash_attention_backward bf16 {name}, {case}"),
                &from_bf16(&rt.download(gpu).unwrap()),
                cpu,
                BF16,
            );
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

/// Version 3's arithmetic in f64, rounding where the kernels round (`round`), so that what
/// is left between the two is fp32 arithmetic and the final bf16 store: the forward's online
/// softmax over key tiles of 64 (each tile's weights exp(s - running max) · dropout rounded
/// to bf16), the backward's weights p · f and score gradients p (f dp - D) rounded to bf16,
/// with D from the given out and p from the given lse (the device's). Inputs are bf16 values
/// held in f32. Without `round` it is the exact attention (checked against the CPU's).
struct TensorCoreReference<'a> {
    round: bool,
    dims: (usize, usize, usize, usize),
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    mask: &'a [u8],
    dropout: Option<cpu::AttentionDropout>,
}

impl TensorCoreReference<'_> {
    fn head_row<'x>(&self, x: &'x [f32], bi: usize, row: usize, h: usize) -> &'x [f32] {
        let (_, t, nh, hs) = self.dims;
        let at = (bi * t + row) * nh * hs + h * hs;
        &x[at..at + hs]
    }

    /// x as the kernels store it before a product: rounded to bf16.
    fn stored(&self, x: f64) -> f64 {
        if self.round {
            round_bf16(&[x as f32])[0] as f64
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
    fn backward(&self, dout: &[f32], out: &[f32], lse: &[f32]) -> [Vec<f64>; 3] {
        let (b, t, nh, hs) = self.dims;
        let scale = (1.0 / (hs as f64).sqrt()) as f32 as f64;
        let mut grads = [(); 3].map(|_| vec![0.0f64; b * t * nh * hs]);
        for bi in 0..b {
            for h in 0..nh {
                for i in 0..t {
                    let dout_i = self.head_row(dout, bi, i, h);
                    let row_dot = Self::dot(dout_i, self.head_row(out, bi, i, h));
                    let lse_i = lse[(bi * nh + h) * t + i] as f64;
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

/// Version 3 (tensor cores, bf16) at every flash shape, with and without dropout, against
/// TensorCoreReference, which rounds the probabilities and their gradients where the
/// kernels do (BF16, 1e-2), after the reference without rounding is checked against the
/// CPU's attention (F32, F32_SUM). The forward's out is also checked against the exact
/// attention at TC_EXACT (5e-2 of |x| + mean |x|): bf16 probabilities cost up to about 1%
/// there, and the gradients up to 4.5% where a sequence has few real keys (measured on the
/// emulated device and in an f64 simulation; at t = 1 the exact gradients vanish and only
/// rounding is left, so they are not compared with the exact ones). Gradients start at
/// small random values, so `+=` shows without hiding the attention's own gradients.
#[test]
fn flash_attention_tensor_cores_match_cpu() {
    let Some(rt) = gpu("flash_attention_tensor_cores_match_cpu") else {
        return;
    };
    let mut rng = Rng::new(13);
    let dropouts = [None, Some(cpu::AttentionDropout { p: 0.2, seed: 78 })];
    for (&(b, t, nh, hs), dropout) in FLASH_SHAPES
        .iter()
        .flat_map(|s| dropouts.iter().map(move |d| (s, *d)))
    {
        let dims = (b, t, nh, hs);
        let case = format!("{dims:?}, {dropout:?}");
        let (act, rows) = (b * t * nh * hs, b * nh * t);
        let (q, k, v, dout) = (
            round_bf16(&rng.values(act, 2.0)),
            round_bf16(&rng.values(act, 2.0)),
            round_bf16(&rng.values(act, 1.0)),
            round_bf16(&rng.values(act, 1.0)),
        );
        let mask = rng.padding_mask(b, t);
        let (mut exact_out, mut probs) = (vec![0.0f32; act], vec![0.0f32; b * nh * t * t]);
        cpu::attention_forward(
            &mut exact_out,
            &mut probs,
            &q,
            &k,
            &v,
            &mask,
            b,
            t,
            nh,
            hs,
            dropout,
        );
        let exact_lse = reference_lse(&q, &k, &mask, b, t, nh, hs);
        let mut exact_grads = [(); 3].map(|_| vec![0.0f32; act]);
        let [exact_dq, exact_dk, exact_dv] = &mut exact_grads;
        cpu::attention_backward(
            exact_dq, exact_dk, exact_dv, &dout, &q, &k, &v, &probs, &mask, b, t, nh, hs, dropout,
        );
        let mut reference = TensorCoreReference {
            round: false,
            dims,
            q: &q,
            k: &k,
            v: &v,
            mask: &mask,
            dropout,
        };
        assert_close_f64(
            &format!("reference without rounding: out, {case}"),
            &reference.forward(),
            &wide(&exact_out),
            F32,
        );
        let unrounded = reference.backward(&dout, &exact_out, &exact_lse);
        for (g, name) in ["dq", "dk", "dv"].iter().enumerate() {
            assert_close_f64(
                &format!("reference without rounding: {name}, {case}"),
                &unrounded[g],
                &wide(&exact_grads[g]),
                F32_SUM,
            );
        }
        reference.round = true;

        let (q_d, k_d, v_d, mask_d) = (
            rt.upload(&to_bf16(&q)).unwrap(),
            rt.upload(&to_bf16(&k)).unwrap(),
            rt.upload(&to_bf16(&v)).unwrap(),
            rt.upload(&mask).unwrap(),
        );
        let mut out_d = rt.upload(&to_bf16(&nan(act))).unwrap();
        let mut lse_d = rt.upload(&nan(rows)).unwrap();
        rt.flash_attention_forward(
            &mut out_d,
            &mut lse_d,
            &q_d,
            &k_d,
            &v_d,
            &mask_d,
            dims,
            dropout,
            FlashKernels::TensorCores,
        )
        .unwrap();
        let out = from_bf16(&rt.download(&out_d).unwrap());
        let lse = rt.download(&lse_d).unwrap();
        assert_close_f64(
            &format!("tensor-core forward out, {case}"),
            &wide(&out),
            &reference.forward(),
            BF16,
        );
        assert_close(
            &format!("tensor-core forward out vs exact, {case}"),
            &out,
            &exact_out,
            TC_EXACT,
        );
        assert_close(
            &format!("tensor-core forward lse, {case}"),
            &lse,
            &exact_lse,
            F32,
        );

        let start = [(); 3].map(|_| round_bf16(&rng.values(act, 0.01)));
        let mut grads_d = start.each_ref().map(|g| rt.upload(&to_bf16(g)).unwrap());
        let [dq_d, dk_d, dv_d] = &mut grads_d;
        let mut row_dot = rt.upload(&nan(rows)).unwrap();
        rt.flash_attention_backward(
            dq_d,
            dk_d,
            dv_d,
            &mut row_dot,
            &rt.upload(&to_bf16(&dout)).unwrap(),
            &out_d,
            &q_d,
            &k_d,
            &v_d,
            &lse_d,
            &mask_d,
            dims,
            dropout,
            FlashKernels::TensorCores,
        )
        .unwrap();
        let added = reference.backward(&dout, &out, &lse);
        for (g, name) in ["dq", "dk", "dv"].iter().enumerate() {
            let gpu = from_bf16(&rt.download(&grads_d[g]).unwrap());
            let expected: Vec<f64> = start[g]
                .iter()
                .zip(&added[g])
                .map(|(&s, &a)| s as f64 + a)
                .collect();
            assert_close_f64(
                &format!("tensor-core backward {name}, {case}"),
                &wide(&gpu),
                &expected,
                BF16,
            );
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
        rt.bias_backward(&mut dbias16_d, &rt.upload(&to_bf16(&dout)).unwrap(), n, c)
            .unwrap();
        let mut dbias16 = dbias0.clone();
        for (i, x) in round_bf16(&dout).iter().enumerate() {
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

#[test]
fn cls_pool_matches_cpu() {
    let Some(rt) = gpu("cls_pool_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(6);
    let (b, t, c) = (3, 5, 19);
    let inp = rng.values(b * t * c, 1.0);
    let mut out = vec![0.0f32; b * c];
    cpu::cls_pool_forward(&mut out, &inp, b, t, c);
    let mut out_d = rt.upload(&nan(b * c)).unwrap();
    rt.cls_pool_forward(&mut out_d, &rt.upload(&inp).unwrap(), b, t, c)
        .unwrap();
    assert_eq!(rt.download(&out_d).unwrap(), out);
    let dout = rng.values(b * c, 1.0);
    let mut dinp = rng.values(b * t * c, 1.0);
    let mut dinp_d = rt.upload(&dinp).unwrap();
    rt.cls_pool_backward(&mut dinp_d, &rt.upload(&dout).unwrap(), b, t, c)
        .unwrap();
    cpu::cls_pool_backward(&mut dinp, &dout, b, t, c);
    assert_eq!(rt.download(&dinp_d).unwrap(), dinp);
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
            let mut out_d = rt.upload(&nan(n * oc)).unwrap();
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
    let ks = [2usize, 3, 8, 11, 5];
    let types = [
        Some(PromptType::Open),
        Some(PromptType::Closed),
        Some(PromptType::Open),
        Some(PromptType::Closed),
        Some(PromptType::Open),
    ];
    let mut specs: Vec<LossSpec> = [
        "x",
        "x2",
        "log",
        "x_inv",
        "x_inv2",
        "logsigmoid",
        "power:1.5",
        "neg_power:0.5",
        "adaptive",
        "adaptive2",
    ]
    .iter()
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
        for eps in [0.1, 0.01] {
            let batch = RankingBatch::new(&rt, &ks, &types, spec).unwrap();
            let mut dlogits_d = rt.upload(&nan(total)).unwrap();
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
                1e-9,
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
    let refs: Vec<_> = device.iter().collect();
    let expected: f64 = buffers.iter().map(|g| cpu::global_norm_squared(g)).sum();
    let got = rt.global_norm_squared(&refs).unwrap();
    assert_close_f64("global_norm_squared", &[got], &[expected], 1e-9);
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
    let mut copy_d = rt.upload(&to_bf16(&nan(len))).unwrap();
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
        from_bf16(&rt.download(&copy_d).unwrap()),
        round_bf16(&rt.download(&p_d).unwrap()),
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
    fake_device::rerun_on_emulated_device("all_gpu_tests_on_the_emulated_device");
}
