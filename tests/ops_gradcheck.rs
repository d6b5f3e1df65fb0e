//! The CPU backend ops: every backward against central finite differences (in f64), forward
//! sanity checks, f32 against f64, dropout's mask, AdamW against PyTorch, and determinism
//! under different thread counts.
//!
//! The gradient checks themselves live in `rcx::gradcheck` (also run by `rcx gradcheck`):
//! with a random dout, L(x) = Σ dout · forward(x), central differences against what the
//! backward ADDS to a pre-filled gradient buffer.

use rcx::backend::cpu::*;
use rcx::float::Float;
use rcx::gradcheck::{check_op, nonzero_values, op_checks};

/// Reproducible test data: rcx's splitmix64 stream with the draws these tests use.
struct Rng(rcx::rng::Rng);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(rcx::rng::Rng::new(seed))
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// `len` values uniform on ±[0.1, 1): every input matters.
    fn vec(&mut self, len: usize) -> Vec<f64> {
        nonzero_values(&mut self.0, len)
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % n as u64) as u32
    }
}

/// The ops `rcx::gradcheck::op_checks` must cover: every backward of src/backend/cpu/.
const OPS: [&str; 25] = [
    "matmul+bias",
    "matmul",
    "layernorm",
    "gelu",
    "tanh",
    "embedding",
    "attention",
    "attention+dropout",
    "dropout",
    "cls_pool",
    "residual",
    "rmsnorm",
    "rope",
    "token_embedding",
    "last_token_pool",
    "swiglu",
    "causal_attn",
    "causal_attn+dropout",
    "causal_attn+prefix",
    "causal_attn+prefix+dropout",
    "position_products",
    "disentangled_attn",
    "disentangled_attn c2p",
    "disentangled_attn p2c",
    "disentangled_attn+dropout",
];

#[test]
fn every_op_backward_matches_central_differences() {
    for seed in [1, 2, 3] {
        let checks = op_checks(seed);
        let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, OPS);
        for check in &checks {
            assert!(check.entries > 0, "{check}");
            assert!(check.passed(), "seed {seed}: {check}");
        }
    }
}

/// The checker must be able to fail: a GELU backward that is off by 0.1% (about what a
/// wrong constant gives), one that overwrites instead of adding, and one that drops a
/// term, are each caught.
#[test]
fn gradcheck_catches_wrong_backwards() {
    let mut rng = rcx::rng::Rng::new(5);
    let inp: Vec<f64> = nonzero_values(&mut rng, 20)
        .iter()
        .map(|x| 2.0 * x)
        .collect();
    let right = check_op(
        "gelu",
        vec![("inp", inp.clone())],
        20,
        |x, out| gelu_forward(out, &x[0]),
        |x, dout, g| gelu_backward(&mut g[0], &x[0], dout),
        &mut rng,
    );
    assert!(right.passed(), "{right}");
    let off_by_a_little = check_op(
        "gelu scaled",
        vec![("inp", inp.clone())],
        20,
        |x, out| gelu_forward(out, &x[0]),
        |x, dout, g| {
            let scaled: Vec<f64> = dout.iter().map(|d| d * 1.001).collect();
            gelu_backward(&mut g[0], &x[0], &scaled)
        },
        &mut rng,
    );
    assert!(!off_by_a_little.passed(), "{off_by_a_little}");
    let overwriting = check_op(
        "gelu overwriting",
        vec![("inp", inp.clone())],
        20,
        |x, out| gelu_forward(out, &x[0]),
        |x, dout, g| {
            g[0].fill(0.0);
            gelu_backward(&mut g[0], &x[0], dout)
        },
        &mut rng,
    );
    assert!(!overwriting.passed(), "{overwriting}");
    // Residual: out = a + b; a backward that forgets db.
    let a = nonzero_values(&mut rng, 20);
    let forgetting = check_op(
        "residual without db",
        vec![("a", a.clone()), ("b", a)],
        20,
        |x, out| residual_forward(out, &x[0], &x[1]),
        |_, dout, g| {
            for (d, o) in g[0].iter_mut().zip(dout) {
                *d += o;
            }
        },
        &mut rng,
    );
    assert!(!forgetting.passed(), "{forgetting}");
    assert_eq!(forgetting.worst_at.chars().next(), Some('d'));
}

// ---------------------------------------------------------------- forward sanity

/// The textbook out[i, j] = Σ_k inp[i, k] weight[j, k] + bias[j], in f64.
fn naive_matmul(
    inp: &[f64],
    weight: &[f64],
    bias: &[f64],
    n: usize,
    c: usize,
    oc: usize,
) -> Vec<f64> {
    let mut out = vec![0.0; n * oc];
    for i in 0..n {
        for j in 0..oc {
            out[i * oc + j] = bias[j]
                + (0..c)
                    .map(|k| inp[i * c + k] * weight[j * c + k])
                    .sum::<f64>();
        }
    }
    out
}

fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// Rounds to f32 and back, so f32 and f64 runs see the same inputs.
fn f32_exact(x: Vec<f64>) -> Vec<f64> {
    x.iter().map(|&v| v as f32 as f64).collect()
}

#[test]
fn matmul_matches_naive_loops() {
    let mut rng = Rng::new(10);
    // Odd sizes; the larger one spans many tiles with ragged edges.
    for (n, c, oc) in [(5, 7, 3), (300, 37, 70), (1, 13, 200)] {
        let inp = f32_exact(rng.vec(n * c));
        let weight = f32_exact(rng.vec(oc * c));
        let bias = f32_exact(rng.vec(oc));
        let expected = naive_matmul(&inp, &weight, &bias, n, c, oc);
        let mut out = vec![f64::NAN; n * oc];
        matmul_forward(&mut out, &inp, &weight, Some(&bias), n, c, oc);
        for (o, e) in out.iter().zip(&expected) {
            assert!((o - e).abs() < 1e-12, "f64 matmul {n}x{c}x{oc}: {o} vs {e}");
        }
        let mut out32 = vec![f32::NAN; n * oc];
        matmul_forward(
            &mut out32,
            &to_f32(&inp),
            &to_f32(&weight),
            Some(&to_f32(&bias)),
            n,
            c,
            oc,
        );
        for (o, e) in out32.iter().zip(&expected) {
            assert!(
                (*o as f64 - e).abs() < 1e-5,
                "f32 matmul {n}x{c}x{oc}: {o} vs {e}"
            );
        }
        // Without bias the output is overwritten, not accumulated (NaN start).
        let no_bias = naive_matmul(&inp, &weight, &vec![0.0; oc], n, c, oc);
        let mut out = vec![f64::NAN; n * oc];
        matmul_forward(&mut out, &inp, &weight, None, n, c, oc);
        for (o, e) in out.iter().zip(&no_bias) {
            assert!(
                (o - e).abs() < 1e-12,
                "f64 matmul without bias {n}x{c}x{oc}: {o} vs {e}"
            );
        }
    }
}

#[test]
fn matmul_backward_matches_naive_loops_on_many_tiles() {
    let mut rng = Rng::new(11);
    let (n, c, oc) = (150, 45, 70);
    let (inp, weight, dout) = (rng.vec(n * c), rng.vec(oc * c), rng.vec(n * oc));
    let (mut dinp, mut dweight, mut dbias) = (vec![0.0; n * c], vec![0.0; oc * c], vec![0.0; oc]);
    matmul_backward(
        &mut dinp,
        &mut dweight,
        Some(&mut dbias),
        &dout,
        &inp,
        &weight,
        n,
        c,
        oc,
    );
    for i in 0..n {
        for k in 0..c {
            let e: f64 = (0..oc).map(|j| dout[i * oc + j] * weight[j * c + k]).sum();
            assert!((dinp[i * c + k] - e).abs() < 1e-12);
        }
    }
    for j in 0..oc {
        for k in 0..c {
            let e: f64 = (0..n).map(|i| dout[i * oc + j] * inp[i * c + k]).sum();
            assert!((dweight[j * c + k] - e).abs() < 1e-12);
        }
        let e: f64 = (0..n).map(|i| dout[i * oc + j]).sum();
        assert!((dbias[j] - e).abs() < 1e-12);
    }
}

#[test]
fn layernorm_output_has_mean_zero_variance_one() {
    let mut rng = Rng::new(12);
    let (n, c) = (4, 64);
    // A large offset: a one-pass variance would lose digits here.
    let inp: Vec<f64> = rng.vec(n * c).iter().map(|x| 1000.0 + 5.0 * x).collect();
    let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    layernorm_forward(
        &mut out,
        &mut mean,
        &mut rstd,
        &inp,
        &vec![1.0; c],
        &vec![0.0; c],
        n,
        c,
        1e-12,
    );
    for (i, row) in out.chunks(c).enumerate() {
        let m: f64 = row.iter().sum::<f64>() / c as f64;
        let var: f64 = row.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / c as f64;
        assert!(m.abs() < 1e-12, "row {i}: mean {m}");
        assert!((var - 1.0).abs() < 1e-10, "row {i}: variance {var}");
        let true_mean: f64 = inp[i * c..(i + 1) * c].iter().sum::<f64>() / c as f64;
        assert!((mean[i] - true_mean).abs() < 1e-12);
    }
    // weight and bias scale and shift the normalised rows.
    let (weight, bias) = (rng.vec(c), rng.vec(c));
    let mut affine = vec![0.0; n * c];
    layernorm_forward(
        &mut affine,
        &mut mean,
        &mut rstd,
        &inp,
        &weight,
        &bias,
        n,
        c,
        1e-12,
    );
    for (i, (a, o)) in affine.iter().zip(&out).enumerate() {
        assert!((a - (o * weight[i % c] + bias[i % c])).abs() < 1e-12);
    }
}

#[test]
fn attention_probs_are_a_masked_softmax() {
    let mut rng = Rng::new(13);
    let (b, t, nh, hs) = (3, 6, 2, 4);
    let len = b * t * nh * hs;
    // Sequence 1 has three padding tokens; sequence 2 is all padding (uniform, as HF).
    let mask = [1u8, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let (q, k, v) = (rng.vec(len), rng.vec(len), rng.vec(len));
    let (mut out, mut probs) = (vec![0.0; len], vec![0.0; b * nh * t * t]);
    attention_forward(&mut out, &mut probs, &q, &k, &v, &mask, b, t, nh, hs, None);
    let ch = nh * hs;
    for seq in 0..b {
        for head in 0..nh {
            for i in 0..t {
                let row = &probs[((seq * nh + head) * t + i) * t..][..t];
                assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
                // Reference: softmax over real keys of q·k/√hs (all keys when none is real).
                let any_real = mask[seq * t..(seq + 1) * t].contains(&1);
                let score = |j: usize| {
                    let dot: f64 = (0..hs)
                        .map(|d| {
                            q[(seq * t + i) * ch + head * hs + d]
                                * k[(seq * t + j) * ch + head * hs + d]
                        })
                        .sum();
                    dot / (hs as f64).sqrt()
                };
                let allowed = |j: usize| !any_real || mask[seq * t + j] == 1;
                let z: f64 = (0..t).filter(|&j| allowed(j)).map(|j| score(j).exp()).sum();
                for (j, &p) in row.iter().enumerate() {
                    let expected = if allowed(j) { score(j).exp() / z } else { 0.0 };
                    if !allowed(j) {
                        assert_eq!(p, 0.0, "padded key {j} got weight");
                    }
                    assert!((p - expected).abs() < 1e-12);
                }
                for d in 0..hs {
                    let e: f64 = (0..t)
                        .map(|j| row[j] * v[(seq * t + j) * ch + head * hs + d])
                        .sum();
                    assert!((out[(seq * t + i) * ch + head * hs + d] - e).abs() < 1e-12);
                }
            }
        }
    }
}

#[test]
fn attention_softmax_is_safe_for_large_scores() {
    let (b, t, nh, hs) = (1, 3, 1, 1);
    let q = [1000.0f32, 1000.0, 1000.0];
    let k = [1.0f32, 0.5, 0.0];
    let v = [1.0f32, 2.0, 3.0];
    let (mut out, mut probs) = (vec![0.0f32; 3], vec![0.0f32; 9]);
    attention_forward(
        &mut out,
        &mut probs,
        &q,
        &k,
        &v,
        &[1, 1, 1],
        b,
        t,
        nh,
        hs,
        None,
    );
    assert!(probs.iter().all(|p| p.is_finite()));
    assert!((probs[0] - 1.0).abs() < 1e-6 && (out[0] - 1.0).abs() < 1e-5);
}

/// The dropped attention against a naive reference: probs stay the softmax (the same as
/// without dropout), the output is Σ_j probs ∘ keep / (1 - p) · v with keep the
/// `dropout_keep` mask over the probs buffer's indices, dv likewise; p = 0 is no dropout
/// bit for bit.
#[test]
fn attention_dropout_uses_the_dropout_keep_mask() {
    let mut rng = Rng::new(21);
    let (b, t, nh, hs) = (2, 7, 3, 4);
    let len = b * t * nh * hs;
    let scores = b * nh * t * t;
    let mask = [1u8, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0];
    let (q, k, v, dout) = (rng.vec(len), rng.vec(len), rng.vec(len), rng.vec(len));
    let (p, seed) = (0.3, 5);
    let dropout = Some(AttentionDropout { p, seed });
    let run = |dropout: Option<AttentionDropout>| {
        let (mut out, mut probs) = (vec![0.0; len], vec![0.0; scores]);
        attention_forward(
            &mut out, &mut probs, &q, &k, &v, &mask, b, t, nh, hs, dropout,
        );
        let mut dv = vec![0.0; len];
        let (mut dq, mut dk) = (vec![0.0; len], vec![0.0; len]);
        attention_backward(
            &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &probs, &mask, b, t, nh, hs, dropout,
        );
        (out, probs, dq, dk, dv)
    };
    let plain = run(None);
    let (out, probs, _, _, dv) = run(dropout);
    assert!(
        plain
            .1
            .iter()
            .zip(&probs)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "probs must stay the softmax before dropout"
    );
    let zero_p = run(Some(AttentionDropout { p: 0.0, seed }));
    for (name, a, z) in [
        ("out", &plain.0, &zero_p.0),
        ("dq", &plain.2, &zero_p.2),
        ("dk", &plain.3, &zero_p.3),
        ("dv", &plain.4, &zero_p.4),
    ] {
        assert!(
            a.iter().zip(z).all(|(a, z)| a.to_bits() == z.to_bits()),
            "p = 0 changed {name}"
        );
    }

    let ch = nh * hs;
    let weight = |index: usize| {
        let kept = dropout_keep(seed, index as u64, p);
        if kept { probs[index] / (1.0 - p) } else { 0.0 }
    };
    let mut dropped_real = 0;
    for seq in 0..b {
        for head in 0..nh {
            for i in 0..t {
                let row = ((seq * nh + head) * t + i) * t;
                dropped_real += (0..t)
                    .filter(|&j| mask[seq * t + j] == 1 && !dropout_keep(seed, (row + j) as u64, p))
                    .count();
                for d in 0..hs {
                    let at = |pos: usize| (seq * t + pos) * ch + head * hs + d;
                    let expected: f64 = (0..t).map(|j| weight(row + j) * v[at(j)]).sum();
                    assert!((out[at(i)] - expected).abs() < 1e-12, "out[{}]", at(i));
                    // dv at key i: Σ over queries r of w[r, i] dout[r].
                    let expected_dv: f64 = (0..t)
                        .map(|r| weight(((seq * nh + head) * t + r) * t + i) * dout[at(r)])
                        .sum();
                    assert!((dv[at(i)] - expected_dv).abs() < 1e-12, "dv[{}]", at(i));
                }
            }
        }
    }
    assert!(
        dropped_real > 20,
        "only {dropped_real} real weights dropped: the test checks too little"
    );
}

#[test]
fn gelu_matches_known_values() {
    let inp = [1.0f64, 0.0, -1.0, 3.0];
    let mut out = [0.0f64; 4];
    gelu_forward(&mut out, &inp);
    assert!(
        (out[0] - 0.8413447460685429).abs() < 1e-15,
        "gelu(1) = {}",
        out[0]
    );
    assert_eq!(out[1], 0.0);
    assert!(
        (out[2] + 0.15865525393145707).abs() < 1e-15,
        "gelu(-1) = {}",
        out[2]
    );
    assert!(
        (out[3] - 2.99595030590511).abs() < 1e-14,
        "gelu(3) = {}",
        out[3]
    );
}

#[test]
fn embedding_sums_word_position_and_type() {
    let (b, t, c) = (2, 2, 2);
    let wte = [1.0f64, 2.0, 10.0, 20.0, 100.0, 200.0];
    let wpe = [0.5, 0.25, 0.125, 0.0625, 9.0, 9.0];
    let wtt = [1000.0, 2000.0, 3000.0, 4000.0];
    let mut out = vec![0.0; b * t * c];
    embedding_forward(
        &mut out,
        &[2, 0, 1, 1],
        &[0, 1, 1, 0],
        &wte,
        &wpe,
        &wtt,
        b,
        t,
        c,
    );
    let expected = [
        1100.5, 2200.25, 3001.125, 4002.0625, 3010.5, 4020.25, 1010.125, 2020.0625,
    ];
    assert_eq!(out, expected);
}

#[test]
fn cls_pool_takes_first_token() {
    let (b, t, c) = (2, 3, 2);
    let inp: Vec<f64> = (0..b * t * c).map(|i| i as f64).collect();
    let mut out = vec![0.0; b * c];
    cls_pool_forward(&mut out, &inp, b, t, c);
    assert_eq!(out, [0.0, 1.0, 6.0, 7.0]);
}

#[test]
fn global_norm_squared_sums_squares() {
    let mut rng = Rng::new(14);
    let grads = rng.vec(100_003);
    let expected: f64 = grads.iter().map(|g| g * g).sum();
    assert!((global_norm_squared(&grads) - expected).abs() < 1e-9 * expected);
    let grads32 = to_f32(&grads);
    let expected32: f64 = grads32.iter().map(|&g| g as f64 * g as f64).sum();
    assert!((global_norm_squared(&grads32) - expected32).abs() < 1e-9 * expected32);
    assert_eq!(global_norm_squared::<f32>(&[3.0, 4.0]), 25.0);
}

// ---------------------------------------------------------------- dropout

#[test]
fn dropout_keeps_about_one_minus_p() {
    let n = 100_000;
    for p in [0.1, 0.5] {
        let kept = (0..n).filter(|&i| dropout_keep(7, i, p)).count();
        let fraction = kept as f64 / n as f64;
        // 5 standard deviations of a binomial fraction: at most 0.008.
        assert!(
            (fraction - (1.0 - p)).abs() < 0.008,
            "p = {p}: kept {fraction}"
        );
    }
    assert!((0..1000).all(|i| dropout_keep(7, i, 0.0)));
    assert!((0..1000).all(|i| !dropout_keep(7, i, 1.0)));
}

#[test]
fn dropout_mask_depends_on_seed_and_index_only() {
    let (n, p) = (100_000, 0.1);
    let ones64 = vec![1.0f64; n];
    let ones32 = vec![1.0f32; n];
    let (mut out64, mut out32) = (vec![0.0f64; n], vec![0.0f32; n]);
    dropout_forward(&mut out64, &ones64, p, 123);
    dropout_forward(&mut out32, &ones32, p, 123);
    for i in 0..n {
        let keep = dropout_keep(123, i as u64, p);
        assert_eq!(out64[i] != 0.0, keep, "f64 element {i}");
        assert_eq!(out32[i] != 0.0, keep, "f32 element {i}");
        if keep {
            assert!((out64[i] - 1.0 / 0.9).abs() < 1e-15);
            assert!((out32[i] - 1.0 / 0.9f32).abs() < 1e-7);
        }
    }
    // Another seed draws another mask.
    let differing = (0..n as u64)
        .filter(|&i| dropout_keep(123, i, p) != dropout_keep(124, i, p))
        .count();
    assert!(
        differing > n / 10,
        "seeds 123 and 124 differ at only {differing} elements"
    );
    // p == 0 copies; its backward passes the gradient through.
    let x = [1.5f32, -2.0, 0.25];
    let mut y = [0.0f32; 3];
    dropout_forward(&mut y, &x, 0.0, 9);
    assert_eq!(y, x);
    let mut dx = [1.0f32; 3];
    dropout_backward(&mut dx, &x, 0.0, 9);
    assert_eq!(dx, [2.5, -1.0, 1.25]);
}

// ---------------------------------------------------------------- AdamW

#[test]
fn adamw_matches_pytorch() {
    // torch.optim.AdamW(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01), float64:
    // scripts/adamw_reference.py.
    let grads = [
        [0.1, -0.2, 0.3, -0.4],
        [-0.05, 0.5, 0.25, 1e-3],
        [0.2, 0.2, -0.7, 0.0],
    ];
    let expected_params = [
        [
            0.4899500009999999,
            -1.2398750005,
            1.9898000003333334,
            0.009999999750000004,
        ],
        [
            0.4872376359402391,
            -1.2441731655216735,
            1.9796892919463946,
            0.016680948423848242,
        ],
        [
            0.48060779667144415,
            -1.2494781779962172,
            1.9813406235973143,
            0.02184444597913367,
        ],
    ];
    let mut params = vec![0.5, -1.25, 2.0, 0.0];
    let (mut m, mut v) = (vec![0.0; 4], vec![0.0; 4]);
    for (step, (g, expected)) in grads.iter().zip(&expected_params).enumerate() {
        adamw_update(
            &mut params,
            g,
            &mut m,
            &mut v,
            step as u64 + 1,
            1e-2,
            0.9,
            0.999,
            1e-8,
            0.01,
            1.0,
        );
        for (p, e) in params.iter().zip(expected) {
            assert!((p - e).abs() < 1e-14, "step {}: {p} vs {e}", step + 1);
        }
    }
    assert!((m[3] + 0.03231).abs() < 1e-15);
    assert!((v[2] - 0.0006422575900000005).abs() < 1e-17);
}

#[test]
fn adamw_bias_correction_and_grad_scale() {
    // Step 1 from m = v = 0: m̂ = g, v̂ = g², so without weight decay every parameter moves
    // by lr · g / (|g| + eps) ≈ lr · sign(g), whatever |g|: the bias correction at work.
    let (lr, eps) = (1e-3, 1e-8);
    let grads = [1e-4, -3.0, 0.5];
    let mut params = vec![0.0f64; 3];
    let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
    adamw_update(
        &mut params,
        &grads,
        &mut m,
        &mut v,
        1,
        lr,
        0.9,
        0.999,
        eps,
        0.0,
        1.0,
    );
    for (p, g) in params.iter().zip(grads) {
        let expected = -lr * g / (g.abs() + eps);
        assert!((p - expected).abs() < 1e-15, "{p} vs {expected}");
    }
    // A hand computation at step 3 with state and clipping factor 0.5.
    let (b1, b2, wd, scale) = (0.9f64, 0.999f64, 0.1, 0.5);
    let (p0, g0, m0, v0) = (0.7f64, 0.4f64, 0.05f64, 0.002f64);
    let g = g0 * scale;
    let m1 = b1 * m0 + (1.0 - b1) * g;
    let v1 = b2 * v0 + (1.0 - b2) * g * g;
    let m_hat = m1 / (1.0 - b1.powi(3));
    let v_hat = v1 / (1.0 - b2.powi(3));
    let expected = p0 * (1.0 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps);
    let (mut p, mut m, mut v) = (vec![p0], vec![m0], vec![v0]);
    adamw_update(&mut p, &[g0], &mut m, &mut v, 3, lr, b1, b2, eps, wd, scale);
    assert!((p[0] - expected).abs() < 1e-12, "{} vs {expected}", p[0]);
    assert!((m[0] - m1).abs() < 1e-15 && (v[0] - v1).abs() < 1e-15);
    // f32 state follows the same step.
    let (mut p32, mut m32, mut v32) = (vec![p0 as f32], vec![m0 as f32], vec![v0 as f32]);
    adamw_update(
        &mut p32,
        &[g0 as f32],
        &mut m32,
        &mut v32,
        3,
        lr,
        b1,
        b2,
        eps,
        wd,
        scale,
    );
    assert!((p32[0] as f64 - expected).abs() < 1e-6);
}

// ---------------------------------------------------------------- f32 against f64

/// |x32 - x64| / max(|x64|, 1) < 1e-5 for every element: relative for values above 1,
/// absolute below.
fn assert_close_f32(op: &str, x32: &[f32], x64: &[f64]) {
    assert_eq!(x32.len(), x64.len());
    for (i, (&a, &b)) in x32.iter().zip(x64).enumerate() {
        let err = (a as f64 - b).abs() / b.abs().max(1.0);
        assert!(err < 1e-5, "{op}[{i}]: f32 {a} vs f64 {b}");
    }
}

#[test]
fn f32_forwards_match_f64() {
    let mut rng = Rng::new(15);
    let (n, c, oc) = (9, 96, 40);
    let inp = f32_exact(rng.vec(n * c).iter().map(|x| 2.0 * x).collect());
    let weight = f32_exact(rng.vec(oc * c).iter().map(|x| 0.2 * x).collect());
    let bias = f32_exact(rng.vec(oc));
    let (inp32, weight32, bias32) = (to_f32(&inp), to_f32(&weight), to_f32(&bias));

    let (mut o64, mut o32) = (vec![0.0; n * oc], vec![0.0f32; n * oc]);
    matmul_forward(&mut o64, &inp, &weight, Some(&bias), n, c, oc);
    matmul_forward(&mut o32, &inp32, &weight32, Some(&bias32), n, c, oc);
    assert_close_f32("matmul", &o32, &o64);

    let (ln_w, ln_b) = (f32_exact(rng.vec(c)), f32_exact(rng.vec(c)));
    let (mut o64, mut m64, mut r64) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    let (mut o32, mut m32, mut r32) = (vec![0.0f32; n * c], vec![0.0f32; n], vec![0.0f32; n]);
    layernorm_forward(
        &mut o64, &mut m64, &mut r64, &inp, &ln_w, &ln_b, n, c, 1e-12,
    );
    layernorm_forward(
        &mut o32,
        &mut m32,
        &mut r32,
        &inp32,
        &to_f32(&ln_w),
        &to_f32(&ln_b),
        n,
        c,
        1e-12,
    );
    assert_close_f32("layernorm", &o32, &o64);
    assert_close_f32("layernorm mean", &m32, &m64);
    assert_close_f32("layernorm rstd", &r32, &r64);

    type Op<F> = fn(&mut [F], &[F]);
    let elementwise: [(&str, Op<f64>, Op<f32>); 4] = [
        ("gelu", gelu_forward::<f64>, gelu_forward::<f32>),
        ("tanh", tanh_forward::<f64>, tanh_forward::<f32>),
        (
            "dropout",
            |o, x| dropout_forward(o, x, 0.2, 5),
            |o, x| dropout_forward(o, x, 0.2, 5),
        ),
        (
            "residual",
            |o, x| residual_forward(o, x, x),
            |o, x| residual_forward(o, x, x),
        ),
    ];
    for (op, f64_op, f32_op) in elementwise {
        let (mut o64, mut o32) = (vec![0.0; n * c], vec![0.0f32; n * c]);
        f64_op(&mut o64, &inp);
        f32_op(&mut o32, &inp32);
        assert_close_f32(op, &o32, &o64);
    }

    let (b, t) = (3, 3);
    let (mut o64, mut o32) = (vec![0.0; b * c], vec![0.0f32; b * c]);
    cls_pool_forward(&mut o64, &inp, b, t, c);
    cls_pool_forward(&mut o32, &inp32, b, t, c);
    assert_close_f32("cls_pool", &o32, &o64);

    let (vocab, max_pos) = (11, 4);
    let wte = f32_exact(rng.vec(vocab * c));
    let wpe = f32_exact(rng.vec(max_pos * c));
    let wtt = f32_exact(rng.vec(2 * c));
    let ids: Vec<u32> = (0..b * t).map(|_| rng.below(vocab as u32)).collect();
    let types: Vec<u32> = (0..b * t).map(|_| rng.below(2)).collect();
    let (mut o64, mut o32) = (vec![0.0; b * t * c], vec![0.0f32; b * t * c]);
    embedding_forward(&mut o64, &ids, &types, &wte, &wpe, &wtt, b, t, c);
    embedding_forward(
        &mut o32,
        &ids,
        &types,
        &to_f32(&wte),
        &to_f32(&wpe),
        &to_f32(&wtt),
        b,
        t,
        c,
    );
    assert_close_f32("embedding", &o32, &o64);

    // Attention over the same [9, 96] tensors read as [b=3, t=3, nh=3, hs=32].
    let (nh, hs) = (3, 32);
    let mask = [1u8, 1, 1, 1, 1, 0, 1, 0, 0];
    let (mut o64, mut p64) = (vec![0.0; n * c], vec![0.0; b * nh * t * t]);
    let (mut o32, mut p32) = (vec![0.0f32; n * c], vec![0.0f32; b * nh * t * t]);
    let k = f32_exact(rng.vec(n * c).iter().map(|x| 2.0 * x).collect());
    let k32 = to_f32(&k);
    for dropout in [None, Some(AttentionDropout { p: 0.25, seed: 3 })] {
        attention_forward(
            &mut o64, &mut p64, &inp, &k, &inp, &mask, b, t, nh, hs, dropout,
        );
        attention_forward(
            &mut o32, &mut p32, &inp32, &k32, &inp32, &mask, b, t, nh, hs, dropout,
        );
        assert_close_f32("attention", &o32, &o64);
        assert_close_f32("attention probs", &p32, &p64);
    }
}

// ---------------------------------------------------------------- determinism

/// Runs `f` on a fresh rayon pool of `threads` threads.
fn with_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a rayon thread pool")
        .install(f)
}

/// Bitwise equality of f32 buffers (NaN-safe, and -0.0 differs from 0.0).
fn assert_bitwise_equal(op: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(
            x.to_bits(),
            y.to_bits(),
            "{op}[{i}] differs between thread counts"
        );
    }
}

#[test]
fn embedding_backward_is_deterministic_across_thread_counts() {
    let mut rng = Rng::new(16);
    let (b, t, c, vocab, max_pos) = (4, 64, 160, 300, 64);
    // Few distinct ids, so rows collect many contributions.
    let ids: Vec<u32> = (0..b * t).map(|_| rng.below(20) * 15).collect();
    let types: Vec<u32> = (0..b * t).map(|_| rng.below(2)).collect();
    let dout = to_f32(&rng.vec(b * t * c));
    let run = || {
        let (mut dwte, mut dwpe, mut dwtt) = (
            vec![0.0f32; vocab * c],
            vec![0.0f32; max_pos * c],
            vec![0.0f32; 2 * c],
        );
        embedding_backward(
            &mut dwte, &mut dwpe, &mut dwtt, &dout, &ids, &types, b, t, c,
        );
        (dwte, dwpe, dwtt)
    };
    let one = with_threads(1, run);
    for threads in [2, 3] {
        let many = with_threads(threads, run);
        assert_bitwise_equal("dwte", &one.0, &many.0);
        assert_bitwise_equal("dwpe", &one.1, &many.1);
        assert_bitwise_equal("dwtt", &one.2, &many.2);
    }
    // And it is the scatter-add it claims to be.
    let mut expected = vec![0.0f64; vocab * c];
    for (row, &id) in ids.iter().enumerate() {
        for j in 0..c {
            expected[id as usize * c + j] += dout[row * c + j] as f64;
        }
    }
    for (a, e) in one.0.iter().zip(&expected) {
        assert!((*a as f64 - e).abs() < 1e-4);
    }
}

#[test]
fn backwards_are_deterministic_across_thread_counts() {
    let mut rng = Rng::new(17);
    let (n, c, oc) = (200, 96, 130);
    let (inp, weight, dout) = (
        to_f32(&rng.vec(n * c)),
        to_f32(&rng.vec(oc * c)),
        to_f32(&rng.vec(n * oc)),
    );
    let matmul = || {
        let (mut dinp, mut dweight, mut dbias) =
            (vec![0.0f32; n * c], vec![0.0f32; oc * c], vec![0.0f32; oc]);
        matmul_backward(
            &mut dinp,
            &mut dweight,
            Some(&mut dbias),
            &dout,
            &inp,
            &weight,
            n,
            c,
            oc,
        );
        [dinp, dweight, dbias]
    };
    let ln_dout = to_f32(&rng.vec(n * c));
    let ln_weight = to_f32(&rng.vec(c));
    let layernorm = || {
        let (mut out, mut mean, mut rstd) = (vec![0.0f32; n * c], vec![0.0f32; n], vec![0.0f32; n]);
        layernorm_forward(
            &mut out, &mut mean, &mut rstd, &inp, &ln_weight, &ln_weight, n, c, 1e-12,
        );
        let (mut dinp, mut dweight, mut dbias) =
            (vec![0.0f32; n * c], vec![0.0f32; c], vec![0.0f32; c]);
        layernorm_backward(
            &mut dinp,
            &mut dweight,
            &mut dbias,
            &ln_dout,
            &inp,
            &ln_weight,
            &mean,
            &rstd,
            n,
            c,
        );
        [dinp, dweight, dbias]
    };
    let (b, t, nh, hs) = (2, 100, 3, 32);
    let mask: Vec<u8> = (0..b * t).map(|i| u8::from(i % t < 80)).collect();
    let len = b * t * nh * hs;
    let (q, k, v) = (
        to_f32(&rng.vec(len)),
        to_f32(&rng.vec(len)),
        to_f32(&rng.vec(len)),
    );
    let attn_dout = to_f32(&rng.vec(len));
    // With dropout on the probabilities: the mask must not depend on the partition either.
    let dropout = Some(AttentionDropout { p: 0.1, seed: 17 });
    let attention = || {
        let (q, k, v) = (&q[..], &k[..], &v[..]);
        let (mut out, mut probs) = (vec![0.0f32; len], vec![0.0f32; b * nh * t * t]);
        attention_forward(&mut out, &mut probs, q, k, v, &mask, b, t, nh, hs, dropout);
        let (mut dq, mut dk, mut dv) = (vec![0.0f32; len], vec![0.0f32; len], vec![0.0f32; len]);
        attention_backward(
            &mut dq, &mut dk, &mut dv, &attn_dout, q, k, v, &probs, &mask, b, t, nh, hs, dropout,
        );
        [out, dq, dk, dv]
    };
    let one = with_threads(1, || (matmul(), layernorm(), attention()));
    let two = with_threads(2, || (matmul(), layernorm(), attention()));
    for (name, x, y) in [
        ("matmul", &one.0[..], &two.0[..]),
        ("layernorm", &one.1[..], &two.1[..]),
        ("attention", &one.2[..], &two.2[..]),
    ] {
        for (a, b) in x.iter().zip(y) {
            assert_bitwise_equal(name, a, b);
        }
    }
    let norm1 = with_threads(1, || global_norm_squared(&one.0[1]));
    let norm2 = with_threads(2, || global_norm_squared(&one.0[1]));
    assert_eq!(norm1.to_bits(), norm2.to_bits());
}

/// `rcx gradcheck` runs the same checks and prints one JSON object per check.
#[test]
fn gradcheck_command_reports_every_op() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rcx"))
        .args(["gradcheck", "--suite", "ops", "--json", "--seed", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = lines.iter().map(|l| l["check"].as_str().unwrap()).collect();
    assert_eq!(names, OPS);
    assert!(lines.iter().all(|l| l["passed"] == true));
}
