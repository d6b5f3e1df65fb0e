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

use half::bf16;
use rcx::backend::cpu;
use rcx::backend::cuda::{
    self, AdamWStep, CudaRuntime, KERNEL_IMAGES, KERNELS_BUILT, RankingBatch, TokenBatch,
};
use rcx::loss::{LossSpec, PromptType, Utility, ranking_loss_forward_backward};

const F32: f64 = 1e-5;
const F32_SUM: f64 = 1e-4;
const BF16: f64 = 1e-2;

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

/// Deterministic splitmix64 stream of uniforms, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-scale, scale] with |x| >= scale/20: non-zero.
    fn values(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|_| {
                let u = (self.next_u64() >> 11) as f32 / (1u64 << 53) as f32; // [0, 1)
                let magnitude = scale * (0.05 + 0.95 * u);
                if self.next_u64() & 1 == 0 {
                    magnitude
                } else {
                    -magnitude
                }
            })
            .collect()
    }

    fn below(&mut self, len: usize, limit: u32) -> Vec<u32> {
        (0..len)
            .map(|_| (self.next_u64() % limit as u64) as u32)
            .collect()
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

fn padding_mask(rng: &mut Rng, b: usize, t: usize) -> Vec<u8> {
    let mut mask = vec![0u8; b * t];
    for seq in 0..b {
        // The last sequence of a multi-sequence batch is all padding: the uniform case.
        let real = if b > 1 && seq == b - 1 {
            0
        } else {
            1 + (rng.next_u64() as usize % t)
        };
        mask[seq * t..seq * t + real].fill(1);
    }
    mask
}

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
    let mut rng = Rng(1);
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
    let mut rng = Rng(2);
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
    let mut rng = Rng(3);
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
    let mut rng = Rng(4);
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
    let mut rng = Rng(5);
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
        let mask = padding_mask(&mut rng, b, t);
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

#[test]
fn cls_pool_matches_cpu() {
    let Some(rt) = gpu("cls_pool_matches_cpu") else {
        return;
    };
    let mut rng = Rng(6);
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
    let mut rng = Rng(7);
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
    let mut rng = Rng(8);
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
    let mut rng = Rng(9);
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
    let mut rng = Rng(10);
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
