//! Numerical gradient checks of the CPU reference, in f64: every op's backward, the ranking
//! loss under every utility, and the whole reward model, each against central finite
//! differences. `rcx gradcheck` prints them as a table; the test suite asserts them
//! (tests/ops_gradcheck.rs, tests/loss.rs, tests/model.rs).
//!
//! Every check returns its worst error next to its tolerance instead of stopping at the
//! first bad element, so one run shows how far every backward is from its numerical twin.

use std::fmt;

use crate::backend::Batch;
use crate::backend::cpu::Cpu;
use crate::backend::cpu::{
    AttentionDropout, Llama3RopeScaling, PositionGrads, PositionTerms, Prefix, PrefixGrads,
    attention_backward, attention_forward, causal_attention_backward, causal_attention_forward,
    cls_pool_backward, cls_pool_forward, disentangled_attention_backward,
    disentangled_attention_forward, disentangled_scale, dropout_backward, dropout_forward,
    embedding_backward, embedding_forward, gelu_backward, gelu_forward, last_token_pool_backward,
    last_token_pool_forward, layernorm_backward, layernorm_forward, matmul_backward,
    matmul_forward, position_products_backward, position_products_forward, relative_positions,
    residual_backward, residual_forward, rmsnorm_backward, rmsnorm_forward, rope_backward,
    rope_cos_sin, rope_forward, rope_inv_freq, swiglu_backward, swiglu_forward, tanh_backward,
    tanh_forward, token_embedding_backward, token_embedding_forward,
};
use crate::error::{Error, Result};
use crate::loss::{
    LossExtras, LossSpec, PairLabels, PromptType, Utility, pairwise_accuracy,
    ranking_loss_forward_backward, ranking_loss_forward_backward_with, sigmoid,
};
use crate::models::{
    BertConfig, DebertaConfig, Dropout, Family, HostModel, LlamaConfig, Model, ModelConfig,
};
use crate::rng::Rng;

/// Step of the central differences: (f(x + h) - f(x - h)) / 2h has error O(h² f''') from
/// the function and O(ε |f| / h) from rounding; at 1e-5 both stay near 1e-10 in f64 for the
/// ops here (1e-6 let rounding noise reach 1e-6 relative on the small entries).
pub const STEP: f64 = 1e-5;

/// The tolerance of every check: above the difference quotient's own error (the worst seen
/// over 40 seeds is 3.3e-7, the whole model with dropout), far below what a wrong term or
/// constant in a backward gives (1e-3 and up).
pub const TOLERANCE: f64 = 1e-6;

/// How one check measures its error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// |a - n| / max(|a| + |n|, 1e-3 · max_j |a_j|) over the elements of each input: an
    /// entry 10³ times smaller than the input's largest is judged against that floor, not on
    /// the difference quotient's rounding noise (~1e-10 absolute) alone.
    Elementwise,
    /// |a - n| / max(max_i |a_i|, |n|), worst over the elements: judged against the
    /// largest gradient, so an entry that is nearly zero is not judged on rounding alone.
    ScaledByLargest,
    /// ||a - n|| / max(||a||, ||n||) per parameter tensor, worst over the tensors.
    PerTensor,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::Elementwise => "elementwise",
            Metric::ScaledByLargest => "vs largest",
            Metric::PerTensor => "per tensor",
        }
    }
}

/// The outcome of one gradient check.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    /// Gradient entries compared.
    pub entries: usize,
    pub metric: Metric,
    pub worst: f64,
    /// Where the worst error is, e.g. "dweight[3]".
    pub worst_at: String,
    pub tolerance: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.worst < self.tolerance
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<28} {:>7} {:<11} {:>9.2e} {:<34} {:>7.0e}  {}",
            self.name,
            self.entries,
            self.metric.name(),
            self.worst,
            self.worst_at,
            self.tolerance,
            if self.passed() { "pass" } else { "FAIL" }
        )
    }
}

/// Records the worst error of a check as entries are compared.
struct Worst {
    entries: usize,
    worst: f64,
    worst_at: String,
}

impl Worst {
    fn new() -> Worst {
        Worst {
            entries: 0,
            worst: 0.0,
            worst_at: String::from("-"),
        }
    }

    fn see(&mut self, error: f64, at: impl FnOnce() -> String) {
        self.entries += 1;
        // A NaN is the worst error there is and stays the worst.
        if !self.worst.is_nan() && (error.is_nan() || error > self.worst) {
            self.worst = error;
            self.worst_at = at();
        }
    }

    fn check(self, name: &str, metric: Metric) -> Check {
        Check {
            name: name.to_string(),
            entries: self.entries,
            metric,
            worst: self.worst,
            worst_at: self.worst_at,
            tolerance: TOLERANCE,
        }
    }
}

/// `len` values uniform on ±[0.1, 1), so that every input matters and none sits at 0.
pub fn nonzero_values(rng: &mut Rng, len: usize) -> Vec<f64> {
    (0..len)
        .map(|_| {
            let x = 0.1 + 0.9 * rng.uniform();
            if rng.next_u64() & 1 == 0 { x } else { -x }
        })
        .collect()
}

/// The floor of the elementwise metric, relative to the input's largest gradient entry.
const ELEMENT_FLOOR: f64 = 1e-3;

/// Checks every input of an op. With a random dout, L(x) = Σ dout · forward(x);
/// `forward(inputs, out)` overwrites out; `backward(inputs, dout, grads)` must ADD into
/// grads (one buffer per input), which are pre-filled with random values so that a backward
/// that overwrites instead of adding fails.
pub fn check_op(
    name: &str,
    inputs: Vec<(&str, Vec<f64>)>,
    out_len: usize,
    forward: impl Fn(&[Vec<f64>], &mut [f64]),
    backward: impl Fn(&[Vec<f64>], &[f64], &mut [Vec<f64>]),
    rng: &mut Rng,
) -> Check {
    let dout = nonzero_values(rng, out_len);
    let mut values: Vec<Vec<f64>> = inputs.iter().map(|(_, v)| v.clone()).collect();
    let prefill: Vec<Vec<f64>> = values
        .iter()
        .map(|v| nonzero_values(rng, v.len()))
        .collect();
    let mut grads = prefill.clone();
    backward(&values, &dout, &mut grads);
    let mut out = vec![0.0; out_len];
    let mut loss = |values: &[Vec<f64>]| {
        forward(values, &mut out);
        out.iter().zip(&dout).map(|(o, d)| o * d).sum::<f64>()
    };
    let mut worst = Worst::new();
    for (i, (input, _)) in inputs.iter().enumerate() {
        let analytic: Vec<f64> = grads[i]
            .iter()
            .zip(&prefill[i])
            .map(|(g, p)| g - p)
            .collect();
        let floor = ELEMENT_FLOOR * analytic.iter().fold(0.0f64, |m, g| m.max(g.abs()));
        for j in 0..values[i].len() {
            let x = values[i][j];
            values[i][j] = x + STEP;
            let plus = loss(&values);
            values[i][j] = x - STEP;
            let minus = loss(&values);
            values[i][j] = x;
            let numeric = (plus - minus) / (2.0 * STEP);
            let a = analytic[j];
            let error = (a - numeric).abs() / (a.abs() + numeric.abs()).max(floor).max(1e-300);
            worst.see(error, || format!("d{input}[{j}]"));
        }
    }
    worst.check(name, Metric::Elementwise)
}

/// Every CPU op's backward (src/backend/cpu/), at small odd shapes.
pub fn op_checks(seed: u64) -> Vec<Check> {
    let mut rng = Rng::new(seed);
    let mut checks = Vec::new();
    let scaled = |v: Vec<f64>, s: f64| v.iter().map(|x| s * x).collect::<Vec<_>>();

    let (n, c, oc) = (5, 7, 3);
    for with_bias in [true, false] {
        let mut inputs = vec![
            ("inp", nonzero_values(&mut rng, n * c)),
            ("weight", nonzero_values(&mut rng, oc * c)),
        ];
        if with_bias {
            inputs.push(("bias", nonzero_values(&mut rng, oc)));
        }
        checks.push(check_op(
            if with_bias { "matmul+bias" } else { "matmul" },
            inputs,
            n * oc,
            |x, out| matmul_forward(out, &x[0], &x[1], x.get(2).map(|b| &b[..]), n, c, oc),
            |x, dout, g| {
                let (dinp, rest) = g.split_at_mut(1);
                let (dweight, dbias) = rest.split_at_mut(1);
                let dbias = dbias.first_mut().map(|b| &mut b[..]);
                matmul_backward(
                    &mut dinp[0],
                    &mut dweight[0],
                    dbias,
                    dout,
                    &x[0],
                    &x[1],
                    n,
                    c,
                    oc,
                );
            },
            &mut rng,
        ));
    }

    // Inputs off-centre and spread, so mean and variance both matter.
    let inp: Vec<f64> = nonzero_values(&mut rng, n * c)
        .iter()
        .map(|x| 3.0 * x + 0.5)
        .collect();
    let (weight, bias) = (nonzero_values(&mut rng, c), nonzero_values(&mut rng, c));
    let layernorm = |x: &[Vec<f64>], out: &mut [f64], mean: &mut [f64], rstd: &mut [f64]| {
        layernorm_forward(out, mean, rstd, &x[0], &x[1], &x[2], n, c, 1e-12);
    };
    checks.push(check_op(
        "layernorm",
        vec![("inp", inp), ("weight", weight), ("bias", bias)],
        n * c,
        |x, out| layernorm(x, out, &mut vec![0.0; n], &mut vec![0.0; n]),
        |x, dout, g| {
            let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
            layernorm(x, &mut out, &mut mean, &mut rstd);
            let [dinp, dweight, dbias] = g else {
                unreachable!("three inputs")
            };
            layernorm_backward(dinp, dweight, dbias, dout, &x[0], &x[1], &mean, &rstd, n, c);
        },
        &mut rng,
    ));

    let inp = scaled(nonzero_values(&mut rng, 35), 3.0);
    checks.push(check_op(
        "gelu",
        vec![("inp", inp)],
        35,
        |x, out| gelu_forward(out, &x[0]),
        |x, dout, g| gelu_backward(&mut g[0], &x[0], dout),
        &mut rng,
    ));

    let inp = scaled(nonzero_values(&mut rng, 35), 2.0);
    checks.push(check_op(
        "tanh",
        vec![("inp", inp)],
        35,
        |x, out| tanh_forward(out, &x[0]),
        |x, dout, g| {
            let mut out = vec![0.0; x[0].len()];
            tanh_forward(&mut out, &x[0]);
            tanh_backward(&mut g[0], &out, dout);
        },
        &mut rng,
    ));

    let (b, t, c, vocab, max_pos, n_types) = (2, 3, 5, 7, 4, 2);
    // Repeated ids and types, so the scatter-add must accumulate.
    let input_ids = [3u32, 0, 3, 6, 3, 1];
    let token_type_ids = [0u32, 1, 1, 0, 0, 1];
    let inputs = vec![
        ("wte", nonzero_values(&mut rng, vocab * c)),
        ("wpe", nonzero_values(&mut rng, max_pos * c)),
        ("wtt", nonzero_values(&mut rng, n_types * c)),
    ];
    checks.push(check_op(
        "embedding",
        inputs,
        b * t * c,
        |x, out| {
            embedding_forward(
                out,
                &input_ids,
                &token_type_ids,
                &x[0],
                &x[1],
                &x[2],
                b,
                t,
                c,
            )
        },
        |_, dout, g| {
            let [dwte, dwpe, dwtt] = g else {
                unreachable!("three inputs")
            };
            embedding_backward(dwte, dwpe, dwtt, dout, &input_ids, &token_type_ids, b, t, c);
        },
        &mut rng,
    ));

    // Without and with dropout on the probabilities (the mask is fixed by the seed, so the
    // function stays smooth and central differences apply). The second sequence ends in two
    // padding tokens.
    let (b, t, nh, hs) = (2, 5, 2, 3);
    let len = b * t * nh * hs;
    let mask = [1u8, 1, 1, 1, 1, 1, 1, 1, 0, 0];
    let dropped = Some(AttentionDropout { p: 0.3, seed: 11 });
    for (name, dropout) in [("attention", None), ("attention+dropout", dropped)] {
        let inputs = vec![
            ("q", scaled(nonzero_values(&mut rng, len), 2.0)),
            ("k", scaled(nonzero_values(&mut rng, len), 2.0)),
            ("v", nonzero_values(&mut rng, len)),
        ];
        let attention = |x: &[Vec<f64>], out: &mut [f64], probs: &mut [f64]| {
            attention_forward(
                out, probs, &x[0], &x[1], &x[2], &mask, b, t, nh, hs, dropout,
            );
        };
        checks.push(check_op(
            name,
            inputs,
            len,
            |x, out| attention(x, out, &mut vec![0.0; b * nh * t * t]),
            |x, dout, g| {
                let (mut out, mut probs) = (vec![0.0; len], vec![0.0; b * nh * t * t]);
                attention(x, &mut out, &mut probs);
                let [dq, dk, dv] = g else {
                    unreachable!("three inputs")
                };
                attention_backward(
                    dq, dk, dv, dout, &x[0], &x[1], &x[2], &probs, &mask, b, t, nh, hs, dropout,
                );
            },
            &mut rng,
        ));
    }

    let (p, dropout_seed) = (0.3, 42);
    checks.push(check_op(
        "dropout",
        vec![("inp", nonzero_values(&mut rng, 35))],
        35,
        |x, out| dropout_forward(out, &x[0], p, dropout_seed),
        |_, dout, g| dropout_backward(&mut g[0], dout, p, dropout_seed),
        &mut rng,
    ));

    let (b, t, c) = (2, 3, 5);
    checks.push(check_op(
        "cls_pool",
        vec![("inp", nonzero_values(&mut rng, b * t * c))],
        b * c,
        |x, out| cls_pool_forward(out, &x[0], b, t, c),
        |_, dout, g| cls_pool_backward(&mut g[0], dout, b, t, c),
        &mut rng,
    ));

    checks.push(check_op(
        "residual",
        vec![
            ("a", nonzero_values(&mut rng, 35)),
            ("b", nonzero_values(&mut rng, 35)),
        ],
        35,
        |x, out| residual_forward(out, &x[0], &x[1]),
        |_, dout, g| {
            let [da, db] = g else {
                unreachable!("two inputs")
            };
            residual_backward(da, db, dout);
        },
        &mut rng,
    ));

    decoder_op_checks(&mut rng, &mut checks);
    deberta_op_checks(&mut rng, &mut checks);
    checks
}

/// DeBERTa's ops: the per-head position products, and the disentangled attention with
/// both position terms, each alone, and with dropout; relative positions clamped at both
/// ends (t = 5 > S = 3), the second sequence ending in padding.
fn deberta_op_checks(rng: &mut Rng, checks: &mut Vec<Check>) {
    let (b, t, nh, hs, rows) = (2, 3, 2, 3, 5);
    checks.push(check_op(
        "position_products",
        vec![
            ("x", nonzero_values(rng, b * t * nh * hs)),
            ("pos", nonzero_values(rng, rows * nh * hs)),
        ],
        b * nh * t * rows,
        |x, out| position_products_forward(out, &x[0], &x[1], b, t, nh, hs, rows),
        |x, dout, g| {
            let [dx, dpos] = g else {
                unreachable!("two inputs")
            };
            position_products_backward(dx, dpos, dout, &x[0], &x[1], b, t, nh, hs, rows);
        },
        rng,
    ));

    let (b, t, nh, hs, rows) = (2, 5, 2, 3, 6);
    let mask = [1u8, 1, 1, 1, 1, 1, 1, 1, 0, 0];
    let relative = relative_positions(t, 0, 3);
    let (act, prod, probs) = (b * t * nh * hs, b * nh * t * rows, b * nh * t * t);
    let dropped = Some(AttentionDropout { p: 0.25, seed: 5 });
    for (name, c2p_on, p2c_on, dropout) in [
        ("disentangled_attn", true, true, None),
        ("disentangled_attn c2p", true, false, None),
        ("disentangled_attn p2c", false, true, None),
        ("disentangled_attn+dropout", true, true, dropped),
    ] {
        let scale = disentangled_scale(hs, c2p_on as usize + p2c_on as usize);
        let mut inputs = vec![
            ("q", nonzero_values(rng, act)),
            ("k", nonzero_values(rng, act)),
            ("v", nonzero_values(rng, act)),
        ];
        // The products that are on follow q, k, v, c2p first.
        if c2p_on {
            inputs.push(("c2p", nonzero_values(rng, prod)));
        }
        if p2c_on {
            inputs.push(("p2c", nonzero_values(rng, prod)));
        }
        let c2p_at = c2p_on.then_some(3);
        let p2c_at = p2c_on.then_some(3 + c2p_on as usize);
        let terms = |x: &[Vec<f64>]| -> (Option<Vec<f64>>, Option<Vec<f64>>) {
            (c2p_at.map(|i| x[i].clone()), p2c_at.map(|i| x[i].clone()))
        };
        let forward = |x: &[Vec<f64>], out: &mut [f64], saved: &mut [f64]| {
            let (c2p, p2c) = terms(x);
            let terms = PositionTerms {
                c2p: c2p.as_deref(),
                p2c: p2c.as_deref(),
                relative: &relative,
                rows,
            };
            disentangled_attention_forward(
                out, saved, &x[0], &x[1], &x[2], terms, &mask, b, t, nh, hs, scale, dropout,
            );
        };
        checks.push(check_op(
            name,
            inputs,
            act,
            |x, out| forward(x, out, &mut vec![0.0; probs]),
            |x, dout, g| {
                let (mut out, mut saved) = (vec![0.0; act], vec![0.0; probs]);
                forward(x, &mut out, &mut saved);
                let (c2p, p2c) = terms(x);
                let terms = PositionTerms {
                    c2p: c2p.as_deref(),
                    p2c: p2c.as_deref(),
                    relative: &relative,
                    rows,
                };
                let (qkv, products) = g.split_at_mut(3);
                let [dq, dk, dv] = qkv else {
                    unreachable!("q, k, v")
                };
                let mut products = products.iter_mut().map(|d| d.as_mut_slice());
                let grads = PositionGrads {
                    dc2p: if c2p_on { products.next() } else { None },
                    dp2c: if p2c_on { products.next() } else { None },
                };
                disentangled_attention_backward(
                    dq, dk, dv, grads, dout, &x[0], &x[1], &x[2], terms, &saved, &mask, b, t, nh,
                    hs, scale, dropout,
                );
            },
            rng,
        ));
    }
}

/// The decoder's ops (RMSNorm, RoPE, SwiGLU, causal attention), at small odd shapes.
fn decoder_op_checks(rng: &mut Rng, checks: &mut Vec<Check>) {
    let scaled = |v: Vec<f64>, s: f64| v.iter().map(|x| s * x).collect::<Vec<_>>();

    // Off-centre inputs, so that the mean square is not the variance.
    let (n, c) = (5, 7);
    let inp: Vec<f64> = nonzero_values(rng, n * c)
        .iter()
        .map(|x| 3.0 * x + 0.5)
        .collect();
    let weight = nonzero_values(rng, c);
    checks.push(check_op(
        "rmsnorm",
        vec![("inp", inp), ("weight", weight)],
        n * c,
        |x, out| rmsnorm_forward(out, &mut vec![0.0; n], &x[0], &x[1], n, c, 1e-6),
        |x, dout, g| {
            let (mut out, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
            rmsnorm_forward(&mut out, &mut rstd, &x[0], &x[1], n, c, 1e-6);
            let [dinp, dweight] = g else {
                unreachable!("two inputs")
            };
            rmsnorm_backward(dinp, dweight, dout, &x[0], &x[1], &rstd, n, c);
        },
        rng,
    ));

    // llama3 scaling whose four frequencies fall in all three of its bands (kept,
    // interpolated, divided), at positions out of order.
    let (heads, hs) = (2, 8);
    let positions = [0u32, 3, 7, 100, 2, 5];
    let n = positions.len();
    let scaling = Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64.0,
    };
    let inv_freq = rope_inv_freq(hs, 10000.0, Some(scaling));
    let (mut cos, mut sin) = (vec![0.0; n * hs / 2], vec![0.0; n * hs / 2]);
    rope_cos_sin(&mut cos, &mut sin, &positions, &inv_freq);
    checks.push(check_op(
        "rope",
        vec![("inp", nonzero_values(rng, n * heads * hs))],
        n * heads * hs,
        |x, out| rope_forward(out, &x[0], &cos, &sin, n, heads, hs),
        |_, dout, g| rope_backward(&mut g[0], dout, &cos, &sin, n, heads, hs),
        rng,
    ));

    // Token 4 three times and token 0 never: rows are summed, and a row no token names
    // gets nothing.
    let (vocab, c) = (6, 3);
    let ids = [4u32, 1, 4, 5, 2, 4, 3];
    checks.push(check_op(
        "token_embedding",
        vec![("wte", nonzero_values(rng, vocab * c))],
        ids.len() * c,
        |x, out| token_embedding_forward(out, &ids, &x[0], c),
        |_, dout, g| token_embedding_backward(&mut g[0], dout, &ids, c),
        rng,
    ));

    // The last real token of three sequences of 4: at the end, in the middle, first.
    let (t, rows) = (4, [3u32, 1, 0]);
    let b = rows.len();
    checks.push(check_op(
        "last_token_pool",
        vec![("inp", nonzero_values(rng, b * t * c))],
        b * c,
        |x, out| last_token_pool_forward(out, &x[0], &rows, t, c),
        |_, dout, g| last_token_pool_backward(&mut g[0], dout, &rows, t, c),
        rng,
    ));

    let gate = scaled(nonzero_values(rng, 35), 3.0);
    checks.push(check_op(
        "swiglu",
        vec![("gate", gate), ("up", nonzero_values(rng, 35))],
        35,
        |x, out| swiglu_forward(out, &x[0], &x[1]),
        |x, dout, g| {
            let [dgate, dup] = g else {
                unreachable!("two inputs")
            };
            swiglu_backward(dgate, dup, dout, &x[0], &x[1]);
        },
        rng,
    ));

    // Grouped queries (4 heads over 2 key/value heads). The second sequence starts with
    // a padding token (its first query has no key to attend to) and ends with one.
    let (b, t, nh, nkv, hs) = (2, 5, 4, 2, 3);
    let (q_len, kv_len) = (b * t * nh * hs, b * t * nkv * hs);
    let mask = [1u8, 1, 1, 1, 1, 0, 1, 1, 1, 0];
    let dropped = Some(AttentionDropout { p: 0.3, seed: 11 });
    for (name, dropout) in [("causal_attn", None), ("causal_attn+dropout", dropped)] {
        let inputs = vec![
            ("q", scaled(nonzero_values(rng, q_len), 2.0)),
            ("k", scaled(nonzero_values(rng, kv_len), 2.0)),
            ("v", nonzero_values(rng, kv_len)),
        ];
        let attention = |x: &[Vec<f64>], out: &mut [f64], probs: &mut [f64]| {
            causal_attention_forward(
                out, probs, &x[0], &x[1], &x[2], &mask, None, b, t, nh, nkv, hs, dropout,
            );
        };
        checks.push(check_op(
            name,
            inputs,
            q_len,
            |x, out| attention(x, out, &mut vec![0.0; b * nh * t * t]),
            |x, dout, g| {
                let (mut out, mut probs) = (vec![0.0; q_len], vec![0.0; b * nh * t * t]);
                attention(x, &mut out, &mut probs);
                let [dq, dk, dv] = g else {
                    unreachable!("three inputs")
                };
                causal_attention_backward(
                    dq, dk, dv, None, dout, &x[0], &x[1], &x[2], &probs, &mask, None, b, t, nh,
                    nkv, hs, dropout,
                );
            },
            rng,
        ));
    }

    // Three completions of two prompts (the second prompt continued twice, so its keys'
    // gradients are sums); the first prompt ends in padding, the completions too.
    let (prompts, tp, b, t) = (2, 3, 3, 4);
    let prefix_mask = [1u8, 1, 0, 1, 1, 1];
    let of_sequence = [1u32, 0, 1];
    let mask = [1u8, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1];
    let (q_len, kv_len, prefix_len) = (b * t * nh * hs, b * t * nkv * hs, prompts * tp * nkv * hs);
    let probs_len = b * nh * t * (tp + t);
    for (name, dropout) in [
        ("causal_attn+prefix", None),
        ("causal_attn+prefix+dropout", dropped),
    ] {
        let inputs = vec![
            ("q", scaled(nonzero_values(rng, q_len), 2.0)),
            ("k", scaled(nonzero_values(rng, kv_len), 2.0)),
            ("v", nonzero_values(rng, kv_len)),
            ("prefix_k", scaled(nonzero_values(rng, prefix_len), 2.0)),
            ("prefix_v", nonzero_values(rng, prefix_len)),
        ];
        // A fn, not a closure: the prefix borrows from the inputs it is given.
        fn prefix<'a>(
            x: &'a [Vec<f64>],
            mask: &'a [u8],
            of_sequence: &'a [u32],
            prompts: usize,
            len: usize,
        ) -> Prefix<'a, f64> {
            Prefix {
                k: &x[3],
                v: &x[4],
                mask,
                of_sequence,
                prompts,
                len,
            }
        }
        let attention = |x: &[Vec<f64>], out: &mut [f64], probs: &mut [f64]| {
            causal_attention_forward(
                out,
                probs,
                &x[0],
                &x[1],
                &x[2],
                &mask,
                Some(prefix(x, &prefix_mask, &of_sequence, prompts, tp)),
                b,
                t,
                nh,
                nkv,
                hs,
                dropout,
            );
        };
        checks.push(check_op(
            name,
            inputs,
            q_len,
            |x, out| attention(x, out, &mut vec![0.0; probs_len]),
            |x, dout, g| {
                let (mut out, mut probs) = (vec![0.0; q_len], vec![0.0; probs_len]);
                attention(x, &mut out, &mut probs);
                let [dq, dk, dv, dprefix_k, dprefix_v] = g else {
                    unreachable!("five inputs")
                };
                let dprefix = PrefixGrads {
                    dk: dprefix_k,
                    dv: dprefix_v,
                };
                causal_attention_backward(
                    dq,
                    dk,
                    dv,
                    Some(dprefix),
                    dout,
                    &x[0],
                    &x[1],
                    &x[2],
                    &probs,
                    &mask,
                    Some(prefix(x, &prefix_mask, &of_sequence, prompts, tp)),
                    b,
                    t,
                    nh,
                    nkv,
                    hs,
                    dropout,
                );
            },
            rng,
        ));
    }
}

/// The ε of the utilities' extended forms in the loss checks.
pub const LOSS_EPS: f64 = 0.1;

/// The extended utilities switch to their linear continuation at a reward difference of 0
/// (a kink: the slope jumps for x2, x_inv2, power and neg_power, the curvature for the
/// others). Central differences across it measure neither side, so every check keeps each
/// ranked pair's reward difference at least this far from 0: a step of STEP in a logit
/// moves a reward by at most STEP / 4, far less.
pub const KINK_MARGIN: f64 = 1e-3;

/// Logits for prompts of sizes `ks`, drawn on [-3, 3) so that no pair of a prompt lies
/// within KINK_MARGIN (in reward) of the kink: differences of step STEP stay on one branch.
pub fn spaced_logits(rng: &mut Rng, ks: &[usize]) -> Vec<f64> {
    let mut logits = Vec::new();
    for &k in ks {
        'draw: loop {
            let candidate: Vec<f64> = (0..k).map(|_| 6.0 * rng.uniform() - 3.0).collect();
            for i in 0..k {
                for j in i + 1..k {
                    if (sigmoid(candidate[i]) - sigmoid(candidate[j])).abs() < KINK_MARGIN {
                        continue 'draw;
                    }
                }
            }
            logits.extend(candidate);
            break;
        }
    }
    logits
}

/// The logits of the loss checks: `spaced_logits` with both rightly and wrongly ordered
/// pairs in the batch, so that both branches of every utility are checked (`ks` must hold
/// at least two pairs).
pub fn loss_check_logits(rng: &mut Rng, ks: &[usize]) -> Vec<f64> {
    loop {
        let logits = spaced_logits(rng, ks);
        let rewards: Vec<f64> = logits.iter().map(|&s| sigmoid(s)).collect();
        let (right, _, total) = pairwise_accuracy(&rewards, ks);
        if right > 0 && right < total {
            return logits;
        }
    }
}

/// The batch ranking loss's dlogits for one spec, on prompts of sizes `ks` and types
/// `types` (the metric is judged against the largest entry: see `Metric`).
pub fn check_loss(
    name: &str,
    spec: &LossSpec,
    ks: &[usize],
    types: &[Option<PromptType>],
    rng: &mut Rng,
) -> Result<Check> {
    let logits = loss_check_logits(rng, ks);
    judge_loss_gradient(
        name,
        &logits,
        |logits| {
            let mut scratch = vec![0.0; logits.len()];
            ranking_loss_forward_backward(logits, ks, types, spec, LOSS_EPS, &mut scratch)
        },
        |logits, dlogits| {
            ranking_loss_forward_backward(logits, ks, types, spec, LOSS_EPS, dlogits).map(|_| ())
        },
    )
}

/// Judges `gradient` (d loss / d logit, overwritten) against central differences of `loss`
/// at `logits`, scaled by the largest entry. `check_loss` gives it the ranking loss's own
/// backward; the tests give it deliberately wrong ones, to show that it fails them.
pub fn judge_loss_gradient(
    name: &str,
    logits: &[f64],
    loss: impl Fn(&[f64]) -> Result<f64>,
    gradient: impl Fn(&[f64], &mut [f64]) -> Result<()>,
) -> Result<Check> {
    let mut analytic = vec![f64::NAN; logits.len()];
    gradient(logits, &mut analytic)?;
    let largest = analytic.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    let mut worst = Worst::new();
    for i in 0..logits.len() {
        let mut shifted = logits.to_vec();
        shifted[i] = logits[i] + STEP;
        let plus = loss(&shifted)?;
        shifted[i] = logits[i] - STEP;
        let minus = loss(&shifted)?;
        let numeric = (plus - minus) / (2.0 * STEP);
        let error = (numeric - analytic[i]).abs() / largest.max(numeric.abs()).max(1e-300);
        worst.see(error, || format!("dlogit[{i}]"));
    }
    Ok(worst.check(name, Metric::ScaledByLargest))
}

/// The utilities of the paper and the families around them.
pub const UTILITIES: [&str; 10] = [
    "x",
    "x2",
    "log",
    "x_inv",
    "x_inv2",
    "logsigmoid",
    "power:0.5",
    "power:2",
    "neg_power:0.5",
    "neg_power:2",
];

/// The loss under every utility (with untyped prompts, which a single utility allows) and
/// under the prompt-aware specs, on prompts of K = 2, 3, 8, 3.
pub fn loss_checks(seed: u64) -> Result<Vec<Check>> {
    let mut rng = Rng::new(seed);
    let ks = [2, 3, 8, 3];
    let untyped = [None, Some(PromptType::Closed), None, Some(PromptType::Open)];
    let typed = [
        Some(PromptType::Open),
        Some(PromptType::Closed),
        Some(PromptType::Open),
        Some(PromptType::Closed),
    ];
    let mut checks = Vec::new();
    for name in UTILITIES {
        let spec = LossSpec::Single(Utility::parse(name)?);
        checks.push(check_loss(
            &format!("loss {name}"),
            &spec,
            &ks,
            &untyped,
            &mut rng,
        )?);
    }
    let custom = LossSpec::PromptAware {
        open: Utility::NegPower(0.5),
        closed: Utility::LogSigmoid,
    };
    for (name, spec) in [
        ("loss adaptive", LossSpec::parse("adaptive")?),
        ("loss adaptive2", LossSpec::parse("adaptive2")?),
        ("loss {neg_power:0.5, logsigmoid}", custom),
    ] {
        checks.push(check_loss(name, &spec, &ks, &typed, &mut rng)?);
    }
    checks.extend(loss_option_checks(&ks, &untyped, &mut rng)?);
    Ok(checks)
}

/// The ties, margins and centering of a batch of prompts of K = 2, 3, 8, 3: scores with
/// ties, out of order and reversed; margins up to 0.5; c = 0.05.
fn option_labels() -> ([f64; 16], [f64; 4], f64) {
    let scores = [
        1.0, 0.0, // one pair
        1.0, 3.0, 1.0, // the middle one best, the others tied
        5.0, 5.0, 4.0, 2.0, 2.0, 2.0, 7.0, 0.0, // ties and the best out of place
        0.0, 1.0, 2.0, // worst first
    ];
    (scores, [0.0, 0.25, 0.1, 0.5], 0.05)
}

/// The loss options (issue 14) against central differences: each alone under logsigmoid
/// (TRL's loss), and all three together under every utility.
fn loss_option_checks(
    ks: &[usize],
    types: &[Option<PromptType>],
    rng: &mut Rng,
) -> Result<Vec<Check>> {
    let (scores, margins, center) = option_labels();
    let ties = PairLabels {
        scores: &scores,
        margins: &[],
    };
    let with_margins = PairLabels {
        scores: &[],
        margins: &margins,
    };
    let all = PairLabels {
        scores: &scores,
        margins: &margins,
    };
    let alone = |labels, center_rewards_coefficient| LossExtras {
        labels,
        center_rewards_coefficient,
    };
    let logsigmoid = LossSpec::Single(Utility::LogSigmoid);
    let mut checks = Vec::new();
    for (name, extras) in [
        ("loss logsigmoid, ties", alone(ties, 0.0)),
        ("loss logsigmoid, margins", alone(with_margins, 0.0)),
        (
            "loss logsigmoid, centering",
            alone(PairLabels::default(), center),
        ),
    ] {
        checks.push(check_loss_with(name, &logsigmoid, ks, types, &extras, rng)?);
    }
    for name in UTILITIES {
        let spec = LossSpec::Single(Utility::parse(name)?);
        checks.push(check_loss_with(
            &format!("loss {name}, all options"),
            &spec,
            ks,
            types,
            &alone(all, center),
            rng,
        )?);
    }
    Ok(checks)
}

/// `check_loss` with loss options: the logits drawn again until every pair the labels form
/// is KINK_MARGIN away from its kink, which a margin m moves to r_better - r_worse = m.
pub fn check_loss_with(
    name: &str,
    spec: &LossSpec,
    ks: &[usize],
    types: &[Option<PromptType>],
    extras: &LossExtras,
    rng: &mut Rng,
) -> Result<Check> {
    let logits = loop {
        let logits = loss_check_logits(rng, ks);
        if labelled_pairs_clear_of_kink(&logits, ks, &extras.labels) {
            break logits;
        }
    };
    judge_loss_gradient(
        name,
        &logits,
        |logits| {
            let mut scratch = vec![0.0; logits.len()];
            ranking_loss_forward_backward_with(
                logits,
                ks,
                types,
                spec,
                LOSS_EPS,
                extras,
                &mut scratch,
            )
        },
        |logits, dlogits| {
            ranking_loss_forward_backward_with(logits, ks, types, spec, LOSS_EPS, extras, dlogits)
                .map(|_| ())
        },
    )
}

/// Whether every pair of completions, in either order, is KINK_MARGIN away from its
/// prompt's margin (every pair a score could form, whichever is better).
fn labelled_pairs_clear_of_kink(logits: &[f64], ks: &[usize], labels: &PairLabels) -> bool {
    let mut start = 0;
    for (p, &k) in ks.iter().enumerate() {
        let margin = labels.margins.get(p).copied().unwrap_or(0.0);
        for i in start..start + k {
            for j in start..start + k {
                let gap = sigmoid(logits[i]) - sigmoid(logits[j]);
                if i != j && (gap - margin).abs() < KINK_MARGIN {
                    return false;
                }
            }
        }
        start += k;
    }
    true
}

/// The model of the whole-model checks: 2 layers, hidden 8, 2 heads, with both dropouts'
/// rates set (used only when a check turns dropout on).
fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: 23,
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 12,
        max_position_embeddings: 16,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        pad_token_id: 0,
    }
}

/// The decoders of the whole-model checks: 2 layers, hidden 8, 4 query heads over 2
/// key/value heads of 6 channels (so the attention width, 24, is not the hidden size), MLP
/// 12. Llama with llama3 rope scaling (its bands all in use at this head size) and MLP
/// biases; Qwen2 with its q/k/v biases. Token 0 pads, as in `tiny_ranked_batch`.
fn tiny_decoder_config(family: Family) -> LlamaConfig {
    let rope_scaling = (family == Family::Llama).then_some(Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 16.0,
    });
    LlamaConfig {
        family,
        vocab_size: 23,
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 6,
        rms_norm_eps: 1e-6,
        rope_theta: 100.0,
        rope_scaling,
        qkv_bias: family == Family::Qwen2,
        o_bias: false,
        mlp_bias: family == Family::Llama,
        max_position_embeddings: 16,
        pad_token_id: Some(0),
        eos_token_id: vec![1],
        initializer_range: 0.02,
        attention_dropout: 0.1,
        sliding_window: None,
    }
}

/// A batch with its ranking: K per prompt and each prompt's type.
struct Ranked {
    batch: Batch,
    ks: Vec<usize>,
    types: Vec<Option<PromptType>>,
}

/// Two prompts (K = 3, open, and K = 2, closed), sequences of different lengths, padded;
/// token 0 only as padding (its row gets no gradient, as nn.Embedding(padding_idx=0)).
fn tiny_ranked_batch(rng: &mut Rng) -> Ranked {
    let lengths = [7, 5, 3, 6, 4];
    let seqs: Vec<(Vec<u32>, Vec<u8>)> = lengths
        .iter()
        .map(|&len| {
            let ids = (0..len).map(|_| 1 + rng.below(22) as u32).collect();
            let types = (0..len).map(|j| (j >= len / 2) as u8).collect();
            (ids, types)
        })
        .collect();
    Ranked {
        batch: Batch::from_sequences(seqs.iter().map(|(i, t)| (&i[..], &t[..])), 0),
        ks: vec![3, 2],
        types: vec![Some(PromptType::Open), Some(PromptType::Closed)],
    }
}

/// `tiny_ranked_batch`'s two prompts as a decoder sees them, grouped by prompt: the
/// completions of prompt 0 (K = 3) start with its 4 tokens; those of prompt 1 (K = 2) with
/// its 3 tokens, but the second kept only its first 2 (so the common prefixes are 4 and 2
/// tokens, and the sequences' rests differ in length).
fn tiny_shared_prompt_batch(rng: &mut Rng) -> Ranked {
    let mut token = || 1 + rng.below(22) as u32;
    let prompts: [Vec<u32>; 2] = [
        (0..4).map(|_| token()).collect(),
        (0..3).map(|_| token()).collect(),
    ];
    let seqs: Vec<Vec<u32>> = [(0, 4, 3), (0, 4, 1), (0, 4, 2), (1, 3, 3), (1, 2, 1)]
        .iter()
        .map(|&(p, kept, answer)| {
            let mut ids = prompts[p][..kept].to_vec();
            ids.extend((0..answer).map(|_| token()));
            ids
        })
        .collect();
    let types: Vec<Vec<u8>> = seqs.iter().map(|ids| vec![0; ids.len()]).collect();
    Ranked {
        batch: Batch::from_sequences(
            seqs.iter()
                .map(|i| &i[..])
                .zip(types.iter().map(|t| &t[..])),
            0,
        )
        .grouped(vec![3, 2]),
        ks: vec![3, 2],
        types: vec![Some(PromptType::Open), Some(PromptType::Closed)],
    }
}

/// BERT's init plus noise on every parameter but the word table's padding row (the first
/// hidden_size entries), so that no gradient vanishes by symmetry (LayerNorm weights of
/// exactly 1, biases of exactly 0).
fn tiny_random_model(rng: &mut Rng, config: &ModelConfig) -> Model<Cpu<f64>> {
    let config = config.clone();
    let skip = config.hidden_size;
    let mut model = HostModel::<f64>::init(config, 7);
    for p in model.params.iter_mut().skip(skip) {
        *p += 0.3 * rng.normal();
    }
    model.on_cpu()
}

/// The loss of the model on `data` under `spec`; dlogits receives d loss / d logit.
fn model_loss(
    model: &mut Model<Cpu<f64>>,
    data: &Ranked,
    spec: &LossSpec,
    dropout: Option<Dropout>,
    dlogits: &mut Vec<f64>,
) -> Result<f64> {
    let logits = model.forward(&data.batch, dropout)?;
    dlogits.resize(logits.len(), 0.0);
    ranking_loss_forward_backward(&logits, &data.ks, &data.types, spec, LOSS_EPS, dlogits)
}

/// ||a - b|| / max(||a||, ||b||): robust where single entries are ~0.
pub fn relative_l2_error(a: &[f64], b: &[f64]) -> f64 {
    let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    diff / norm(a).max(norm(b)).max(1e-300)
}

/// The whole model's backward (src/models/bert.rs) with the ranking loss on top, every parameter
/// against central differences, judged per tensor. A tensor whose gradient is zero on both
/// sides proves nothing and fails, except the two that are zero by construction: the
/// attention key biases (softmax ignores a shift shared by all of a query's scores; both
/// sides must then be ~0) and the word table, whose padding row gets nothing.
pub fn check_model(
    name: &str,
    spec: &LossSpec,
    dropout: Option<Dropout>,
    seed: u64,
) -> Result<Check> {
    judge_model_gradient(name, spec, dropout, seed, own_backward)
}

/// The model's own backward, returning the gradient arena.
fn own_backward(
    model: &mut Model<Cpu<f64>>,
    dropout: Option<Dropout>,
    dlogits: &[f64],
) -> Result<Vec<f64>> {
    model.backward(dropout, dlogits)?;
    Ok(model.backend.grads().to_vec())
}

/// `check_model` on a tiny decoder of `family` (see `tiny_decoder_config`).
pub fn check_decoder_model(
    name: &str,
    family: Family,
    spec: &LossSpec,
    dropout: Option<Dropout>,
    seed: u64,
) -> Result<Check> {
    let config = tiny_decoder_config(family).into();
    judge_gradient_of(
        name,
        &config,
        spec,
        dropout,
        seed,
        tiny_ranked_batch,
        own_backward,
    )
}

/// The whole decoder on a batch whose completions share their prompts' tokens (the shared
/// prefix): its gradient through the prompts' once-computed states, summed over their
/// completions.
pub fn check_shared_prefix_model(
    name: &str,
    family: Family,
    spec: &LossSpec,
    dropout: Option<Dropout>,
    seed: u64,
) -> Result<Check> {
    let config = tiny_decoder_config(family).into();
    // The check means something only where the model takes the shared layout.
    let (mut model, data) = model_check_inputs(&config, seed, dropout, tiny_shared_prompt_batch)?;
    model.forward(&data.batch, dropout)?;
    if model.last_rows()? >= data.batch.b * data.batch.t {
        return Err(Error::internal(format!(
            "{name}: the batch ran as whole sequences, not with the shared prefix"
        )));
    }
    judge_gradient_of(
        name,
        &config,
        spec,
        dropout,
        seed,
        tiny_shared_prompt_batch,
        own_backward,
    )
}

/// The smallest |r_i - r_j| over the ranked pairs of a batch, r = sigmoid(logit).
pub fn smallest_reward_gap(logits: &[f64], ks: &[usize]) -> f64 {
    let mut smallest = f64::INFINITY;
    let mut start = 0;
    for &k in ks {
        for i in start..start + k {
            for j in i + 1..start + k {
                smallest = smallest.min((sigmoid(logits[i]) - sigmoid(logits[j])).abs());
            }
        }
        start += k;
    }
    smallest
}

/// The first ranked pair whose reward difference has another sign in `moved` than in
/// `base`: (prompt, i, j), completions counted within the prompt.
pub fn pair_across_the_kink(
    base: &[f64],
    moved: &[f64],
    ks: &[usize],
) -> Option<(usize, usize, usize)> {
    let mut start = 0;
    for (p, &k) in ks.iter().enumerate() {
        for i in 0..k {
            for j in i + 1..k {
                let side = |l: &[f64]| sigmoid(l[start + i]) > sigmoid(l[start + j]);
                if side(base) != side(moved) {
                    return Some((p, i, j));
                }
            }
        }
        start += k;
    }
    None
}

/// The model and batch of the whole-model checks for `seed`, in the mode a check runs
/// (`dropout`): BERT's init plus noise, drawn again until every ranked pair's reward
/// difference is at least KINK_MARGIN from the kink.
fn model_check_inputs(
    config: &ModelConfig,
    seed: u64,
    dropout: Option<Dropout>,
    draw_batch: fn(&mut Rng) -> Ranked,
) -> Result<(Model<Cpu<f64>>, Ranked)> {
    let mut rng = Rng::new(seed);
    // Most draws pass: 100 failures in a row would mean a broken model.
    for _ in 0..100 {
        let mut model = tiny_random_model(&mut rng, config);
        let data = draw_batch(&mut rng);
        let logits = model.forward(&data.batch, dropout)?;
        if smallest_reward_gap(&logits, &data.ks) >= KINK_MARGIN {
            return Ok((model, data));
        }
    }
    Err(Error::internal(format!(
        "gradcheck: no model of seed {seed} keeps its rewards {KINK_MARGIN} apart"
    )))
}

/// `check_model` with the analytic gradient from `backward` (called on zeroed gradients,
/// after the forward, with the logits' gradient; returns the gradient arena): the model's own in
/// `check_model`, deliberately wrong ones in the tests, to show that the check fails them.
/// Every perturbed forward must leave each ranked pair on its side of the kink (an internal
/// error otherwise: the difference quotient would measure neither branch).
pub fn judge_model_gradient(
    name: &str,
    spec: &LossSpec,
    dropout: Option<Dropout>,
    seed: u64,
    backward: impl Fn(&mut Model<Cpu<f64>>, Option<Dropout>, &[f64]) -> Result<Vec<f64>>,
) -> Result<Check> {
    let config = tiny_config().into();
    judge_gradient_of(
        name,
        &config,
        spec,
        dropout,
        seed,
        tiny_ranked_batch,
        backward,
    )
}

/// `judge_model_gradient` on a tiny model of `config`.
fn judge_gradient_of(
    name: &str,
    config: &ModelConfig,
    spec: &LossSpec,
    dropout: Option<Dropout>,
    seed: u64,
    draw_batch: fn(&mut Rng) -> Ranked,
    backward: impl Fn(&mut Model<Cpu<f64>>, Option<Dropout>, &[f64]) -> Result<Vec<f64>>,
) -> Result<Check> {
    let (mut model, data) = model_check_inputs(config, seed, dropout, draw_batch)?;
    model.start_training()?;
    let mut dlogits = Vec::new();
    model_loss(&mut model, &data, spec, dropout, &mut dlogits)?;
    let base_logits = model.outputs()?.2;
    let grads = backward(&mut model, dropout, &dlogits)?;

    let mut scratch = Vec::new();
    let mut worst = Worst::new();
    for tensor in model.layout.tensors.clone() {
        let mut numeric = Vec::with_capacity(tensor.len());
        for idx in tensor.range() {
            let saved = model.backend.params()[idx];
            let mut loss_at = |value: f64| -> Result<f64> {
                model.backend.params_mut()[idx] = value;
                let loss = model_loss(&mut model, &data, spec, dropout, &mut scratch)?;
                if let Some((p, i, j)) =
                    pair_across_the_kink(&base_logits, &model.outputs()?.2, &data.ks)
                {
                    return Err(Error::internal(format!(
                        "{name}: a step of {STEP:e} in {}[{}] moves completions {i} and {j} of \
                         prompt {p} across the utilities' kink",
                        tensor.name,
                        idx - tensor.offset
                    )));
                }
                Ok(loss)
            };
            let up = loss_at(saved + STEP)?;
            let down = loss_at(saved - STEP)?;
            model.backend.params_mut()[idx] = saved;
            numeric.push((up - down) / (2.0 * STEP));
        }
        let analytic = &grads[tensor.range()];
        let max_abs = |g: &[f64]| g.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let error = if zero_by_construction(&tensor.name) {
            // Analytic zero up to rounding; numeric up to the quotient's noise (~1e-8):
            // scaled so that either above its bound counts as a failure.
            (max_abs(analytic) / 1e-12).max(max_abs(&numeric) / 1e-7) * TOLERANCE
        } else if max_abs(analytic) == 0.0
            && !tensor.name.ends_with("word_embeddings.weight")
            && !tensor.name.ends_with("embed_tokens.weight")
        {
            f64::INFINITY
        } else {
            relative_l2_error(analytic, &numeric)
        };
        worst.see(error, || tensor.name.clone());
    }
    let mut check = worst.check(name, Metric::PerTensor);
    check.entries = model.num_params();
    Ok(check)
}

/// Tensors whose gradient is zero by construction: a bias that shifts all of a query's
/// scores alike, which softmax ignores. BERT's key bias; DeBERTa's pos_key_proj bias (c2p
/// adds q_i · bias to every score of query i). DeBERTa's key_proj bias is not among them
/// while p2c is on: p2c reads the keys against the positions.
fn zero_by_construction(name: &str) -> bool {
    name.ends_with("attention.self.key.bias") || name.ends_with("attention.self.pos_key_proj.bias")
}

/// The training mode of the whole-model check: both dropouts, at different rates.
pub const MODEL_CHECK_DROPOUT: Dropout = Dropout {
    hidden: 0.2,
    attention: 0.3,
    seed: 99,
};

/// The whole model in eval mode under x_inv, and in training mode (hidden and attention
/// dropout at different rates) under the prompt-aware adaptive2.
pub fn model_checks(seed: u64) -> Result<Vec<Check>> {
    let dropout = MODEL_CHECK_DROPOUT;
    Ok(vec![
        check_model(
            "model, eval, x_inv",
            &LossSpec::Single(Utility::XInv),
            None,
            seed,
        )?,
        check_model(
            "model, dropout, adaptive2",
            &LossSpec::parse("adaptive2")?,
            Some(dropout),
            seed,
        )?,
    ])
}

/// The whole decoder: Llama (llama3 rope scaling, MLP biases) in training mode (attention
/// dropout) under adaptive2, Qwen2 (q/k/v biases) in eval mode under x_inv; both with
/// grouped-query attention on a padded batch, of whole sequences and with the shared
/// prefix.
pub fn decoder_model_checks(seed: u64) -> Result<Vec<Check>> {
    Ok(vec![
        check_decoder_model(
            "llama, dropout, adaptive2",
            Family::Llama,
            &LossSpec::parse("adaptive2")?,
            Some(MODEL_CHECK_DROPOUT),
            seed,
        )?,
        check_decoder_model(
            "qwen2, eval, x_inv",
            Family::Qwen2,
            &LossSpec::Single(Utility::XInv),
            None,
            seed,
        )?,
        check_shared_prefix_model(
            "llama, shared prefix, dropout, adaptive2",
            Family::Llama,
            &LossSpec::parse("adaptive2")?,
            Some(MODEL_CHECK_DROPOUT),
            seed,
        )?,
        check_shared_prefix_model(
            "qwen2, shared prefix, eval, x_inv",
            Family::Qwen2,
            &LossSpec::Single(Utility::XInv),
            None,
            seed,
        )?,
    ])
}

/// The DeBERTa models of the whole-model checks: 2 layers, hidden 8, 2 heads. "v3": log
/// buckets, shared position projections, layer-normed relative embeddings, no absolute
/// positions or types. "v2": separate position projections, absolute positions and types,
/// an embedding projection (6 -> 8), relative positions clamped at 3, no relative
/// LayerNorm, its own pooler and classifier dropout.
fn tiny_deberta_config(v3: bool) -> DebertaConfig {
    DebertaConfig {
        vocab_size: 23,
        hidden_size: 8,
        embedding_size: if v3 { 8 } else { 6 },
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 12,
        max_position_embeddings: 16,
        type_vocab_size: if v3 { 0 } else { 2 },
        position_biased_input: !v3,
        layer_norm_eps: 1e-7,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        pooler_dropout: if v3 { 0.0 } else { 0.15 },
        cls_dropout: if v3 { 0.1 } else { 0.25 },
        pad_token_id: 0,
        initializer_range: 0.02,
        relative_attention: true,
        max_relative_positions: if v3 { 16 } else { 3 },
        position_buckets: if v3 { 4 } else { 0 },
        c2p: true,
        p2c: true,
        share_att_key: v3,
        norm_rel_ebd: v3,
    }
}

/// The whole DeBERTa model: v3's structure in training mode under adaptive2, v2's branches
/// in eval mode under x_inv and in training mode (its pooler and classifier dropouts).
pub fn deberta_model_checks(seed: u64) -> Result<Vec<Check>> {
    let checks = [
        (
            "deberta v3, dropout, adaptive2",
            true,
            Some(MODEL_CHECK_DROPOUT),
            "adaptive2",
        ),
        ("deberta v2, eval, x_inv", false, None, "x_inv"),
        (
            "deberta v2, dropout, adaptive2",
            false,
            Some(MODEL_CHECK_DROPOUT),
            "adaptive2",
        ),
    ];
    checks
        .into_iter()
        .map(|(name, v3, dropout, loss)| {
            let config = tiny_deberta_config(v3).into();
            let spec = LossSpec::parse(loss)?;
            judge_gradient_of(
                name,
                &config,
                &spec,
                dropout,
                seed,
                tiny_ranked_batch,
                own_backward,
            )
        })
        .collect()
}

/// Which checks `rcx gradcheck` runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    Ops,
    Loss,
    Model,
}

#[derive(clap::Args, Debug)]
pub struct GradcheckArgs {
    /// The suites to run (repeatable); all three when absent.
    #[arg(long = "suite", value_enum)]
    pub suites: Vec<Suite>,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// One JSON object per check instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `rcx gradcheck`: runs the suites, prints one line per check, fails when one does.
pub fn cmd_gradcheck(args: GradcheckArgs) -> Result<()> {
    let suites = if args.suites.is_empty() {
        vec![Suite::Ops, Suite::Loss, Suite::Model]
    } else {
        args.suites
    };
    if !args.json {
        println!(
            "central differences in f64, step {STEP:e}; \"vs largest\" divides by the largest \
             gradient entry"
        );
        println!(
            "{:<28} {:>7} {:<11} {:>9} {:<34} {:>7}  result",
            "check", "entries", "metric", "worst", "where", "tol"
        );
    }
    let mut failed = 0;
    let mut total = 0;
    for suite in suites {
        let checks = match suite {
            Suite::Ops => op_checks(args.seed),
            Suite::Loss => loss_checks(args.seed)?,
            Suite::Model => {
                let mut checks = model_checks(args.seed)?;
                checks.extend(decoder_model_checks(args.seed)?);
                checks.extend(deberta_model_checks(args.seed)?);
                checks
            }
        };
        for check in checks {
            total += 1;
            failed += usize::from(!check.passed());
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "check": check.name,
                        "entries": check.entries,
                        "metric": check.metric.name(),
                        "worst": check.worst,
                        "where": check.worst_at,
                        "tolerance": check.tolerance,
                        "passed": check.passed(),
                    })
                );
            } else {
                println!("{check}");
            }
        }
    }
    if failed > 0 {
        return Err(Error::internal(format!(
            "gradcheck: {failed} of {total} checks failed"
        )));
    }
    Ok(())
}

/// The model the checks run on, and the model's own properties they rely on: dropout is a
/// function of its seed, each site its own, padding changes nothing, and the drawn inputs
/// keep every pair off the utilities' kink.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Batch;

    #[test]
    fn dropout_is_a_function_of_its_seed_and_off_in_eval() {
        let mut rng = Rng::new(5);
        let mut model = tiny_random_model(&mut rng, &tiny_config().into());
        let batch = tiny_ranked_batch(&mut rng).batch;
        let eval_a = model.forward(&batch, None).unwrap();
        let eval_b = model.forward(&batch, None).unwrap();
        assert_eq!(eval_a, eval_b);
        let d = |seed| {
            Some(Dropout {
                hidden: 0.3,
                attention: 0.3,
                seed,
            })
        };
        let train_a = model.forward(&batch, d(1)).unwrap();
        let train_b = model.forward(&batch, d(1)).unwrap();
        let train_c = model.forward(&batch, d(2)).unwrap();
        assert_eq!(train_a, train_b, "same seed, same mask");
        assert_ne!(train_a, train_c, "another seed, another mask");
        assert_ne!(train_a, eval_a, "dropout must change the training forward");
    }

    /// Attention-probability dropout acts on its own; adding it left the hidden sites' masks
    /// as they were: hidden dropout alone gives the logits the model gave before it existed.
    #[test]
    fn attention_dropout_is_its_own_site() {
        let mut rng = Rng::new(5);
        let mut model = tiny_random_model(&mut rng, &tiny_config().into());
        let batch = tiny_ranked_batch(&mut rng).batch;
        let eval = model.forward(&batch, None).unwrap();
        let mut logits = |hidden, attention| {
            let dropout = Dropout {
                hidden,
                attention,
                seed: 1,
            };
            model.forward(&batch, Some(dropout)).unwrap()
        };
        let hidden_only = logits(0.3, 0.0);
        assert_ne!(hidden_only, eval, "hidden dropout alone changed nothing");
        let both = logits(0.3, 0.3);
        assert_ne!(both, hidden_only, "attention dropout changed nothing");
        let attention_only = logits(0.0, 0.3);
        assert_ne!(
            attention_only, eval,
            "attention dropout alone changed nothing"
        );
        assert_eq!(
            logits(0.0, 0.0),
            eval,
            "p = 0 everywhere must be evaluation"
        );
    }

    #[test]
    fn padding_does_not_change_a_sequence_logit() {
        // The same sequence alone and in a batch with a longer one: its logit must not move.
        let mut rng = Rng::new(11);
        let mut model = tiny_random_model(&mut rng, &tiny_config().into());
        let short: (Vec<u32>, Vec<u8>) = (vec![3, 4, 5, 6], vec![0, 0, 1, 1]);
        let long: (Vec<u32>, Vec<u8>) = (vec![7, 8, 9, 10, 11, 12, 13, 14, 15], vec![0; 9]);
        let alone = Batch::from_sequences([(&short.0[..], &short.1[..])], 0);
        let a = model.forward(&alone, None).unwrap()[0];
        let both = Batch::from_sequences(
            [(&short.0[..], &short.1[..]), (&long.0[..], &long.1[..])],
            0,
        );
        let b = model.forward(&both, None).unwrap()[0];
        assert!((a - b).abs() < 1e-12, "alone {a} vs padded {b}");
    }

    /// The model checks draw their model and batch so that every ranked pair's reward
    /// difference is clear of the utilities' kink at 0 (where the extended forms switch to
    /// their linear continuation): by at least the loss checks' margin, far more than a step of
    /// the central differences moves it. In both modes the checks run (the dropout of
    /// `model_checks`).
    #[test]
    fn model_check_inputs_keep_reward_differences_off_the_kink() {
        let dropout = Some(MODEL_CHECK_DROPOUT);
        for seed in 0..200 {
            for mode in [None, dropout] {
                let (mut model, data) =
                    model_check_inputs(&tiny_config().into(), seed, mode, tiny_ranked_batch)
                        .unwrap();
                let logits = model.forward(&data.batch, mode).unwrap();
                let gap = smallest_reward_gap(&logits, &data.ks);
                assert!(
                    gap >= KINK_MARGIN,
                    "seed {seed}, dropout {mode:?}: a pair's rewards differ by {gap:e}"
                );
            }
        }
    }
}
