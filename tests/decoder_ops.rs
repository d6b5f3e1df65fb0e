//! The decoder's CPU ops against direct formulas and against transformers itself
//! (tests/fixtures/decoder_ops/reference.json, made by scripts/gen_decoder_op_fixtures.py):
//! RoPE's frequencies, angles and rotation, RMSNorm, SwiGLU, causal attention with grouped
//! queries, padding and a shared prefix; the shared prefix against the full sequences it
//! stands for; f32 against f64; determinism under different thread counts. Their backwards
//! against central differences are in tests/ops_gradcheck.rs (rcx::gradcheck::op_checks).

use rcx::backend::cpu::*;
use rcx::gradcheck::nonzero_values;
use rcx::rng::Rng;
use serde_json::Value;

fn reference() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/decoder_ops/reference.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn llama3(value: &Value) -> Option<Llama3RopeScaling> {
    value.as_object().map(|s| Llama3RopeScaling {
        factor: s["factor"].as_f64().unwrap(),
        low_freq_factor: s["low_freq_factor"].as_f64().unwrap(),
        high_freq_factor: s["high_freq_factor"].as_f64().unwrap(),
        original_max_position_embeddings: s["original_max_position_embeddings"].as_f64().unwrap(),
    })
}

/// The distance in f32 ulps between two positive f32 values.
fn ulps(a: f32, b: f32) -> u32 {
    a.to_bits().abs_diff(b.to_bits())
}

// ---------------------------------------------------------------- RoPE

/// Every frequency within 2 f32 ulps of transformers' (PyTorch's f32 pow is not correctly
/// rounded), and nearly all of them equal bit for bit: the f32 steps of the llama3 scaling
/// are transformers' own.
#[test]
fn rope_frequencies_match_transformers() {
    let reference = reference();
    let (mut equal, mut total) = (0, 0);
    for case in reference["frequencies"].as_array().unwrap() {
        let head_dim = case["head_dim"].as_u64().unwrap() as usize;
        let theta = case["theta"].as_f64().unwrap();
        let ours = rope_inv_freq(head_dim, theta, llama3(&case["llama3"]));
        let theirs = to_f32(&floats(&case["inv_freq"]));
        assert_eq!(ours.len(), theirs.len());
        for (i, (&a, &b)) in ours.iter().zip(&theirs).enumerate() {
            assert!(
                ulps(a, b) <= 2,
                "head_dim {head_dim}, theta {theta}, inv_freq[{i}]: {a} vs transformers' {b}"
            );
            equal += usize::from(a == b);
            total += 1;
        }
    }
    assert!(equal * 100 >= total * 95, "only {equal} of {total} equal");
}

/// The llama3 bands by hand, on the small case of the gradcheck: theta 10000, head size 8
/// (wavelengths 2π·10^(0, 1, 2, 3)), original context 64, low/high factors 1 and 4: the
/// first frequency is kept, the second interpolated, the last two divided by the factor.
#[test]
fn rope_llama3_bands() {
    let scaling = Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64.0,
    };
    let plain = rope_inv_freq(8, 10000.0, None);
    let scaled = rope_inv_freq(8, 10000.0, Some(scaling));
    assert_eq!(plain[0], 1.0);
    assert_eq!(scaled[0], plain[0]);
    for i in [2, 3] {
        assert_eq!(scaled[i], plain[i] / 8.0);
    }
    let wavelen = 2.0 * std::f64::consts::PI / plain[1] as f64;
    let smooth = (64.0 / wavelen - 1.0) / (4.0 - 1.0);
    let expected = (1.0 - smooth) * plain[1] as f64 / 8.0 + smooth * plain[1] as f64;
    assert!(((scaled[1] as f64 - expected) / expected).abs() < 1e-6);
    assert!(scaled[1] < plain[1] && scaled[1] > plain[1] / 8.0);
}

/// cos and sin at positions up to 131071 and the rotated queries equal transformers'
/// (within an f32 ulp of the cosines, where PyTorch's f32 cos may round the other way):
/// rcx turns by the f32 angle transformers uses, which at these positions is up to 4e-3
/// from the exact one.
#[test]
fn rope_matches_transformers_at_long_positions() {
    let reference = reference();
    let rope = &reference["rope"];
    let head_dim = rope["head_dim"].as_u64().unwrap() as usize;
    let heads = rope["heads"].as_u64().unwrap() as usize;
    let positions: Vec<u32> = rope["positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u32)
        .collect();
    let n = positions.len();
    let inv_freq = rope_inv_freq(
        head_dim,
        rope["theta"].as_f64().unwrap(),
        llama3(&rope["llama3"]),
    );
    let (mut cos, mut sin) = (
        vec![0.0f32; n * head_dim / 2],
        vec![0.0f32; n * head_dim / 2],
    );
    rope_cos_sin(&mut cos, &mut sin, &positions, &inv_freq);
    let mut exact_angle_error = 0.0f64;
    for (name, ours, theirs) in [
        ("cos", &cos, floats(&rope["cos"])),
        ("sin", &sin, floats(&rope["sin"])),
    ] {
        for (i, (&a, &b)) in ours.iter().zip(&theirs).enumerate() {
            assert!((a as f64 - b).abs() <= 1.2e-7, "{name}[{i}]: {a} vs {b}");
        }
    }
    for (i, &c) in floats(&rope["cos"]).iter().enumerate() {
        let exact = positions[i / (head_dim / 2)] as f64 * inv_freq[i % (head_dim / 2)] as f64;
        exact_angle_error = exact_angle_error.max((exact.cos() - c).abs());
    }
    assert!(
        exact_angle_error > 1e-4,
        "the exact angle is as good as transformers' f32 one ({exact_angle_error}): the test \
         shows nothing"
    );
    let inp = to_f32(&floats(&rope["inp"]));
    let mut out = vec![0.0f32; inp.len()];
    rope_forward(&mut out, &inp, &cos, &sin, n, heads, head_dim);
    for (i, (&a, b)) in out.iter().zip(floats(&rope["out"])).enumerate() {
        assert!((a as f64 - b).abs() < 1e-6, "out[{i}]: {a} vs {b}");
    }
}

/// Each pair (x[i], x[i + hs/2]) of a head turns as the complex number x[i] + i·x[i + hs/2]
/// times e^(i·angle); the backward turns back (by the transposed rotation), so backward
/// after forward gives the input again.
#[test]
fn rope_is_a_complex_rotation_and_its_backward_the_inverse() {
    let mut rng = Rng::new(3);
    let (heads, hs) = (3, 10);
    let positions = [5u32, 0, 1, 900, 17, 17, 33];
    let n = positions.len();
    let half = hs / 2;
    let inv_freq = rope_inv_freq(hs, 10000.0, None);
    let (mut cos, mut sin) = (vec![0.0f64; n * half], vec![0.0f64; n * half]);
    rope_cos_sin(&mut cos, &mut sin, &positions, &inv_freq);
    let inp = nonzero_values(&mut rng, n * heads * hs);
    let mut out = vec![0.0; inp.len()];
    rope_forward(&mut out, &inp, &cos, &sin, n, heads, hs);
    for (token, &position) in positions.iter().enumerate() {
        for head in 0..heads {
            for (i, &inv) in inv_freq.iter().enumerate() {
                let angle = (position as f32 * inv) as f64;
                let at = |j: usize| token * heads * hs + head * hs + j;
                let (re, im) = (inp[at(i)], inp[at(i + half)]);
                let (rot_re, rot_im) = (
                    re * angle.cos() - im * angle.sin(),
                    re * angle.sin() + im * angle.cos(),
                );
                // cos and sin are transformers' f32 values: within 1e-7 of the exact ones.
                assert!(
                    (out[at(i)] - rot_re).abs() < 3e-7,
                    "token {token} head {head} {i}"
                );
                assert!((out[at(i + half)] - rot_im).abs() < 3e-7);
            }
        }
    }
    let mut back = vec![0.0; inp.len()];
    rope_backward(&mut back, &out, &cos, &sin, n, heads, hs);
    for (b, x) in back.iter().zip(&inp) {
        assert!((b - x).abs() < 3e-7, "{b} vs {x}");
    }
}

// ---------------------------------------------------------------- RMSNorm, SwiGLU

#[test]
fn rmsnorm_matches_transformers_and_its_formula() {
    let reference = reference();
    let r = &reference["rmsnorm"];
    let (n, c) = (
        r["n"].as_u64().unwrap() as usize,
        r["c"].as_u64().unwrap() as usize,
    );
    let eps = r["eps"].as_f64().unwrap();
    let (inp, weight) = (floats(&r["inp"]), floats(&r["weight"]));
    let (mut out, mut rstd) = (vec![0.0f32; n * c], vec![0.0f32; n]);
    rmsnorm_forward(
        &mut out,
        &mut rstd,
        &to_f32(&inp),
        &to_f32(&weight),
        n,
        c,
        eps,
    );
    for (i, (&a, b)) in out.iter().zip(floats(&r["out"])).enumerate() {
        assert!(
            (a as f64 - b).abs() <= 3e-7 * b.abs().max(1.0),
            "out[{i}]: {a} vs transformers' {b}"
        );
    }
    let (mut out64, mut rstd64) = (vec![0.0f64; n * c], vec![0.0f64; n]);
    rmsnorm_forward(&mut out64, &mut rstd64, &inp, &weight, n, c, eps);
    for row in 0..n {
        let x = &inp[row * c..(row + 1) * c];
        let rms = (x.iter().map(|v| v * v).sum::<f64>() / c as f64 + eps).sqrt();
        assert!((rstd64[row] - 1.0 / rms).abs() < 1e-15);
        for j in 0..c {
            assert!((out64[row * c + j] - weight[j] * x[j] / rms).abs() < 1e-13);
        }
    }
}

#[test]
fn swiglu_matches_transformers_and_its_formula() {
    let reference = reference();
    let s = &reference["swiglu"];
    let (gate, up) = (floats(&s["gate"]), floats(&s["up"]));
    let mut out = vec![0.0f32; gate.len()];
    swiglu_forward(&mut out, &to_f32(&gate), &to_f32(&up));
    for (i, (&a, b)) in out.iter().zip(floats(&s["out"])).enumerate() {
        assert!(
            (a as f64 - b).abs() <= 3e-7 * b.abs().max(1e-3),
            "out[{i}]: {a} vs transformers' {b}"
        );
    }
    let mut out64 = vec![0.0f64; gate.len()];
    swiglu_forward(&mut out64, &gate, &up);
    // Large arguments too: sigmoid's exponential must not overflow either way.
    let extremes = [-800.0, -30.0, 0.0, 30.0, 800.0];
    let mut out_extremes = [0.0f64; 5];
    swiglu_forward(&mut out_extremes, &extremes, &[1.0; 5]);
    for ((&o, &g), &u) in out64
        .iter()
        .chain(&out_extremes)
        .zip(gate.iter().chain(&extremes))
        .zip(up.iter().chain(&[1.0; 5]))
    {
        let expected = g / (1.0 + (-g).exp()) * u;
        assert!(
            (o - expected).abs() <= 1e-15 * expected.abs().max(1.0),
            "silu({g}) · {u}"
        );
    }
}

// ---------------------------------------------------------------- causal attention

/// A batch for causal attention; `prefix` holds prompt keys and values when present.
struct Attn {
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    mask: Vec<u8>,
    prefix: Option<PrefixData>,
}

struct PrefixData {
    prompts: usize,
    len: usize,
    k: Vec<f64>,
    v: Vec<f64>,
    mask: Vec<u8>,
    of_sequence: Vec<u32>,
}

impl Attn {
    fn prefix(&self) -> Option<Prefix<'_, f64>> {
        self.prefix.as_ref().map(|p| Prefix {
            k: &p.k,
            v: &p.v,
            mask: &p.mask,
            of_sequence: &p.of_sequence,
            prompts: p.prompts,
            len: p.len,
        })
    }

    fn probs_len(&self) -> usize {
        let tp = self.prefix.as_ref().map_or(0, |p| p.len);
        self.b * self.nh * self.t * (tp + self.t)
    }

    fn forward(&self) -> (Vec<f64>, Vec<f64>) {
        let (mut out, mut probs) = (vec![0.0; self.q.len()], vec![0.0; self.probs_len()]);
        causal_attention_forward(
            &mut out,
            &mut probs,
            &self.q,
            &self.k,
            &self.v,
            &self.mask,
            self.prefix(),
            self.b,
            self.t,
            self.nh,
            self.nkv,
            self.hs,
            None,
        );
        (out, probs)
    }

    /// [dq, dk, dv, dprefix_k, dprefix_v] from zero (the prefix's empty without a prefix).
    fn backward(&self, dout: &[f64], probs: &[f64]) -> [Vec<f64>; 5] {
        let (mut dq, mut dk, mut dv) = (
            vec![0.0; self.q.len()],
            vec![0.0; self.k.len()],
            vec![0.0; self.v.len()],
        );
        let prefix_len = self.prefix.as_ref().map_or(0, |p| p.k.len());
        let (mut dpk, mut dpv) = (vec![0.0; prefix_len], vec![0.0; prefix_len]);
        let dprefix = self.prefix.as_ref().map(|_| PrefixGrads {
            dk: &mut dpk,
            dv: &mut dpv,
        });
        causal_attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            dprefix,
            dout,
            &self.q,
            &self.k,
            &self.v,
            probs,
            &self.mask,
            self.prefix(),
            self.b,
            self.t,
            self.nh,
            self.nkv,
            self.hs,
            None,
        );
        [dq, dk, dv, dpk, dpv]
    }
}

/// Softmax attention of one query over (score, value row) pairs of the allowed keys; zero
/// when none is allowed.
fn naive_attend(scores_values: &[(f64, &[f64])], hs: usize) -> Vec<f64> {
    let mut out = vec![0.0; hs];
    if scores_values.is_empty() {
        return out;
    }
    let max = scores_values.iter().map(|s| s.0).fold(f64::MIN, f64::max);
    let z: f64 = scores_values.iter().map(|s| (s.0 - max).exp()).sum();
    for (s, v) in scores_values {
        for d in 0..hs {
            out[d] += (s - max).exp() / z * v[d];
        }
    }
    out
}

/// The textbook causal attention of a batch: query head h of sequence s at position i
/// attends, with key/value head h / (nh / nkv), to the real prefix keys of its prompt and
/// to its own real keys at positions <= i.
fn naive_causal_attention(a: &Attn) -> Vec<f64> {
    let (t, nh, nkv, hs) = (a.t, a.nh, a.nkv, a.hs);
    let mut out = vec![0.0; a.q.len()];
    for s in 0..a.b {
        for h in 0..nh {
            let kvh = h / (nh / nkv);
            for i in 0..t {
                let q = &a.q[(s * t + i) * nh * hs + h * hs..][..hs];
                let dot = |k: &[f64]| {
                    q.iter().zip(k).map(|(x, y)| x * y).sum::<f64>() / (hs as f64).sqrt()
                };
                let mut allowed: Vec<(f64, &[f64])> = Vec::new();
                if let Some(p) = &a.prefix {
                    let prompt = p.of_sequence[s] as usize;
                    for j in 0..p.len {
                        if p.mask[prompt * p.len + j] == 1 {
                            let at = (prompt * p.len + j) * nkv * hs + kvh * hs;
                            allowed.push((dot(&p.k[at..at + hs]), &p.v[at..at + hs]));
                        }
                    }
                }
                for j in 0..=i {
                    if a.mask[s * t + j] == 1 {
                        let at = (s * t + j) * nkv * hs + kvh * hs;
                        allowed.push((dot(&a.k[at..at + hs]), &a.v[at..at + hs]));
                    }
                }
                let o = naive_attend(&allowed, hs);
                out[(s * t + i) * nh * hs + h * hs..][..hs].copy_from_slice(&o);
            }
        }
    }
    out
}

fn random_attn(
    rng: &mut Rng,
    b: usize,
    t: usize,
    mask: Vec<u8>,
    prefix: Option<PrefixData>,
) -> Attn {
    let (nh, nkv, hs) = (6, 2, 4);
    Attn {
        b,
        t,
        nh,
        nkv,
        hs,
        q: nonzero_values(rng, b * t * nh * hs)
            .iter()
            .map(|x| 2.0 * x)
            .collect(),
        k: nonzero_values(rng, b * t * nkv * hs)
            .iter()
            .map(|x| 2.0 * x)
            .collect(),
        v: nonzero_values(rng, b * t * nkv * hs),
        mask,
        prefix,
    }
}

/// Grouped queries (6 heads over 2 key/value heads), left and right padding, and with a
/// prefix of two padded prompts: the output is the textbook formula's, padded and future
/// keys get exactly zero weight, and a query with no key allowed gets zero everywhere.
#[test]
fn causal_attention_matches_the_textbook_formula() {
    let mut rng = Rng::new(8);
    let (b, t) = (3, 6);
    // Sequence 1 is left-padded (its first two queries have no key), sequence 2 all padding.
    let mask = [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1], [0; 6]].concat();
    let plain = random_attn(&mut rng, b, t, mask.clone(), None);
    let (nkv, hs) = (plain.nkv, plain.hs);
    let (prompts, len) = (2, 4);
    let prefix = PrefixData {
        prompts,
        len,
        k: nonzero_values(&mut rng, prompts * len * nkv * hs)
            .iter()
            .map(|x| 2.0 * x)
            .collect(),
        v: nonzero_values(&mut rng, prompts * len * nkv * hs),
        mask: vec![1, 1, 1, 0, 1, 1, 1, 1],
        of_sequence: vec![1, 0, 1],
    };
    let prefixed = random_attn(&mut rng, b, t, mask, Some(prefix));
    for a in [plain, prefixed] {
        let (out, probs) = a.forward();
        let expected = naive_causal_attention(&a);
        for (i, (o, e)) in out.iter().zip(&expected).enumerate() {
            assert!((o - e).abs() < 1e-12, "out[{i}]: {o} vs {e}");
        }
        let tp = a.prefix.as_ref().map_or(0, |p| p.len);
        let keys = tp + t;
        for (row_index, row) in probs.chunks(keys).enumerate() {
            let (s, i) = (row_index / (a.nh * t), row_index % t);
            let allowed = |j: usize| match (j < tp, &a.prefix) {
                (true, Some(p)) => p.mask[p.of_sequence[s] as usize * tp + j] == 1,
                _ => j - tp <= i && a.mask[s * t + j - tp] == 1,
            };
            let any = (0..keys).any(allowed);
            let sum: f64 = row.iter().sum();
            assert!(
                (sum - if any { 1.0 } else { 0.0 }).abs() < 1e-12,
                "row {row_index}"
            );
            for (j, &p) in row.iter().enumerate() {
                if !allowed(j) {
                    assert_eq!(p, 0.0, "row {row_index}: excluded key {j} got weight");
                }
            }
        }
    }
}

/// The shared prefix is exact: two prompts (one padded) run once, their five completions
/// (of different lengths) attending to them, give the outputs and, with the prompt keys'
/// and values' gradients summed over completions, the gradients of the five full sequences
/// prompt + completion, to rounding (f64).
#[test]
fn shared_prefix_equals_the_full_sequences() {
    let mut rng = Rng::new(12);
    let (nh, nkv, hs) = (6, 2, 4);
    let prompt_lens = [3usize, 2];
    let tp = 3;
    let of_sequence = [0u32, 1, 1, 0, 1];
    let completion_lens = [2usize, 4, 1, 3, 4];
    let (prompts, b, t) = (prompt_lens.len(), of_sequence.len(), 4);
    let full_t = tp + t;
    let prompt_mask: Vec<u8> = (0..prompts * tp)
        .map(|i| u8::from(i % tp < prompt_lens[i / tp]))
        .collect();
    let completion_mask: Vec<u8> = (0..b * t)
        .map(|i| u8::from(i % t < completion_lens[i / t]))
        .collect();

    let prompt = random_attn(&mut Rng::new(1), prompts, tp, prompt_mask.clone(), None);
    let completions = random_attn(
        &mut rng,
        b,
        t,
        completion_mask,
        Some(PrefixData {
            prompts,
            len: tp,
            k: prompt.k.clone(),
            v: prompt.v.clone(),
            mask: prompt_mask,
            of_sequence: of_sequence.to_vec(),
        }),
    );
    // The full sequences: the prompt's real tokens, then the completion's, then padding.
    let (qw, kw) = (nh * hs, nkv * hs);
    // (sequence, position in it) of every real token of the full batch: Ok(prompt token),
    // Err(completion token).
    let real_tokens = |s: usize| {
        let p = of_sequence[s] as usize;
        (0..prompt_lens[p])
            .map(move |j| Ok((p, j)))
            .chain((0..completion_lens[s]).map(move |j| Err((s, j))))
    };
    let mut full = random_attn(&mut rng, b, full_t, vec![0; b * full_t], None);
    for s in 0..b {
        for (pos, token) in real_tokens(s).enumerate() {
            full.mask[s * full_t + pos] = 1;
            let (src, row) = match token {
                Ok((p, j)) => (&prompt, p * tp + j),
                Err((s, j)) => (&completions, s * t + j),
            };
            let at = s * full_t + pos;
            full.q[at * qw..(at + 1) * qw].copy_from_slice(&src.q[row * qw..(row + 1) * qw]);
            full.k[at * kw..(at + 1) * kw].copy_from_slice(&src.k[row * kw..(row + 1) * kw]);
            full.v[at * kw..(at + 1) * kw].copy_from_slice(&src.v[row * kw..(row + 1) * kw]);
        }
    }
    // Padding positions get no gradient: nothing real depends on them in a model.
    let mut full_dout = nonzero_values(&mut rng, b * full_t * qw);
    for (row, d) in full_dout.chunks_mut(qw).enumerate() {
        if full.mask[row] == 0 {
            d.fill(0.0);
        }
    }

    let (full_out, full_probs) = full.forward();
    let full_grads = full.backward(&full_dout, &full_probs);
    let (prompt_out, prompt_probs) = prompt.forward();
    let (completion_out, completion_probs) = completions.forward();
    // The prompt's output gradient is the sum over its completions' copies; the completions'
    // backward adds the prompt keys' and values' gradients first, then the prompt's own.
    let mut prompt_dout = vec![0.0; prompt.q.len()];
    let mut completion_dout = vec![0.0; completions.q.len()];
    for s in 0..b {
        for (pos, token) in real_tokens(s).enumerate() {
            let from = &full_dout[(s * full_t + pos) * qw..][..qw];
            let (to, row) = match token {
                Ok((p, j)) => (&mut prompt_dout, p * tp + j),
                Err((s, j)) => (&mut completion_dout, s * t + j),
            };
            for (d, f) in to[row * qw..(row + 1) * qw].iter_mut().zip(from) {
                *d += f;
            }
        }
    }
    let [dq_c, dk_c, dv_c, dk_prompt, dv_prompt] =
        completions.backward(&completion_dout, &completion_probs);
    let [dq_p, mut dk_p, mut dv_p, _, _] = prompt.backward(&prompt_dout, &prompt_probs);
    for (d, extra) in dk_p
        .iter_mut()
        .zip(&dk_prompt)
        .chain(dv_p.iter_mut().zip(&dv_prompt))
    {
        *d += extra;
    }

    let close = |what: &str, a: &[f64], b: &[f64]| {
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= 1e-12 * (1.0 + y.abs()),
                "{what}: {x} vs {y}"
            );
        }
    };
    // Outputs token by token; gradients of prompt tokens summed over the full sequences.
    let mut summed = [
        vec![0.0; prompt.q.len()],
        vec![0.0; prompt.k.len()],
        vec![0.0; prompt.v.len()],
    ];
    for s in 0..b {
        for (pos, token) in real_tokens(s).enumerate() {
            let at = s * full_t + pos;
            match token {
                Ok((p, j)) => {
                    let row = p * tp + j;
                    close(
                        "prompt out",
                        &prompt_out[row * qw..][..qw],
                        &full_out[at * qw..][..qw],
                    );
                    for (sum, (grad, w)) in summed.iter_mut().zip([
                        (&full_grads[0], qw),
                        (&full_grads[1], kw),
                        (&full_grads[2], kw),
                    ]) {
                        for (x, g) in sum[row * w..(row + 1) * w]
                            .iter_mut()
                            .zip(&grad[at * w..(at + 1) * w])
                        {
                            *x += g;
                        }
                    }
                }
                Err((s, j)) => {
                    let row = s * t + j;
                    close(
                        "completion out",
                        &completion_out[row * qw..][..qw],
                        &full_out[at * qw..][..qw],
                    );
                    close(
                        "completion dq",
                        &dq_c[row * qw..][..qw],
                        &full_grads[0][at * qw..][..qw],
                    );
                    close(
                        "completion dk",
                        &dk_c[row * kw..][..kw],
                        &full_grads[1][at * kw..][..kw],
                    );
                    close(
                        "completion dv",
                        &dv_c[row * kw..][..kw],
                        &full_grads[2][at * kw..][..kw],
                    );
                }
            }
        }
    }
    for (p, &prompt_len) in prompt_lens.iter().enumerate() {
        let rows = p * tp..p * tp + prompt_len;
        let (q_rows, kv_rows) = (
            rows.start * qw..rows.end * qw,
            rows.start * kw..rows.end * kw,
        );
        close("prompt dq", &dq_p[q_rows.clone()], &summed[0][q_rows]);
        close(
            "prompt dk",
            &dk_p[kv_rows.clone()],
            &summed[1][kv_rows.clone()],
        );
        close("prompt dv", &dv_p[kv_rows.clone()], &summed[2][kv_rows]);
    }
    assert!(
        summed[1].iter().any(|&g| g != 0.0),
        "the prompt keys got no gradient"
    );
}

// ---------------------------------------------------------------- f32, determinism

/// Runs `f` on a fresh rayon pool of `threads` threads.
fn with_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a rayon thread pool")
        .install(f)
}

/// The ops in f32 at shapes that span many rayon tasks (and the exp blocks), with a prefix
/// and dropout: the same bits on 1 and 3 threads, and within 1e-5 of the f64 results.
#[test]
fn decoder_ops_in_f32_are_deterministic_and_close_to_f64() {
    let mut rng = Rng::new(21);
    let (n, c) = (97, 300);
    let inp = nonzero_values(&mut rng, n * c);
    let weight = nonzero_values(&mut rng, c);
    let dout = nonzero_values(&mut rng, n * c);
    let (b, t, tp, prompts, nh, nkv, hs) = (4, 40, 24, 2, 4, 2, 16);
    let positions: Vec<u32> = (0..b * t).map(|i| (i % t + tp) as u32).collect();
    let of_sequence = [1u32, 0, 1, 1];
    let prefix_mask: Vec<u8> = (0..prompts * tp)
        .map(|i| u8::from(i % tp < 20 || i >= tp))
        .collect();
    let mask: Vec<u8> = (0..b * t).map(|i| u8::from(i % t < 30 + i / t)).collect();
    let q = nonzero_values(&mut rng, b * t * nh * hs);
    let kv = nonzero_values(&mut rng, b * t * nkv * hs);
    let pkv = nonzero_values(&mut rng, prompts * tp * nkv * hs);
    let attn_dout = nonzero_values(&mut rng, b * t * nh * hs);
    let dropout = Some(AttentionDropout { p: 0.2, seed: 4 });

    fn run<F: rcx::float::Float>(
        x: [&[F]; 8],
        positions: &[u32],
        shape: [usize; 2],
        of_sequence: &[u32],
        prefix_mask: &[u8],
        mask: &[u8],
        dropout: Option<AttentionDropout>,
    ) -> Vec<Vec<F>> {
        let [inp, weight, dout, q, kv, pkv, attn_dout, _] = x;
        let [n, c] = shape;
        let (b, t, tp, prompts, nh, nkv, hs) = (4, 40, 24, 2, 4, 2, 16);
        let (mut out, mut rstd) = (vec![F::ZERO; n * c], vec![F::ZERO; n]);
        rmsnorm_forward(&mut out, &mut rstd, inp, weight, n, c, 1e-5);
        let (mut dinp, mut dweight) = (vec![F::ZERO; n * c], vec![F::ZERO; c]);
        rmsnorm_backward(&mut dinp, &mut dweight, dout, inp, weight, &rstd, n, c);
        let mut act = vec![F::ZERO; n * c];
        swiglu_forward(&mut act, inp, dout);
        let (mut dgate, mut dup) = (vec![F::ZERO; n * c], vec![F::ZERO; n * c]);
        swiglu_backward(&mut dgate, &mut dup, dout, inp, dout);
        let inv_freq = rope_inv_freq(hs, 500000.0, None);
        let (mut cos, mut sin) = (vec![F::ZERO; b * t * hs / 2], vec![F::ZERO; b * t * hs / 2]);
        rope_cos_sin(&mut cos, &mut sin, positions, &inv_freq);
        let mut rq = vec![F::ZERO; q.len()];
        rope_forward(&mut rq, q, &cos, &sin, b * t, nh, hs);
        let mut drq = vec![F::ZERO; q.len()];
        rope_backward(&mut drq, attn_dout, &cos, &sin, b * t, nh, hs);
        let prefix = Prefix {
            k: pkv,
            v: pkv,
            mask: prefix_mask,
            of_sequence,
            prompts,
            len: tp,
        };
        let (mut o, mut probs) = (vec![F::ZERO; q.len()], vec![F::ZERO; b * nh * t * (tp + t)]);
        causal_attention_forward(
            &mut o,
            &mut probs,
            &rq,
            kv,
            kv,
            mask,
            Some(prefix),
            b,
            t,
            nh,
            nkv,
            hs,
            dropout,
        );
        let (mut dq, mut dk, mut dv) = (
            vec![F::ZERO; q.len()],
            vec![F::ZERO; kv.len()],
            vec![F::ZERO; kv.len()],
        );
        let (mut dpk, mut dpv) = (vec![F::ZERO; pkv.len()], vec![F::ZERO; pkv.len()]);
        causal_attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            Some(PrefixGrads {
                dk: &mut dpk,
                dv: &mut dpv,
            }),
            attn_dout,
            &rq,
            kv,
            kv,
            &probs,
            mask,
            Some(prefix),
            b,
            t,
            nh,
            nkv,
            hs,
            dropout,
        );
        vec![
            out, rstd, dinp, dweight, act, dgate, dup, rq, drq, o, probs, dq, dk, dv, dpk, dpv,
        ]
    }
    let names = [
        "rmsnorm out",
        "rstd",
        "rmsnorm dinp",
        "dweight",
        "swiglu out",
        "dgate",
        "dup",
        "rope out",
        "rope dinp",
        "attention out",
        "probs",
        "dq",
        "dk",
        "dv",
        "prefix dk",
        "prefix dv",
    ];
    let x64: [&[f64]; 8] = [&inp, &weight, &dout, &q, &kv, &pkv, &attn_dout, &[]];
    let r64 = run(
        x64,
        &positions,
        [n, c],
        &of_sequence,
        &prefix_mask,
        &mask,
        dropout,
    );
    let f32s: Vec<Vec<f32>> = [&inp, &weight, &dout, &q, &kv, &pkv, &attn_dout]
        .iter()
        .map(|x| to_f32(x))
        .collect();
    let x32 = || -> [&[f32]; 8] {
        [
            &f32s[0],
            &f32s[1],
            &f32s[2],
            &f32s[3],
            &f32s[4],
            &f32s[5],
            &f32s[6],
            &[],
        ]
    };
    let one = with_threads(1, || {
        run(
            x32(),
            &positions,
            [n, c],
            &of_sequence,
            &prefix_mask,
            &mask,
            dropout,
        )
    });
    let three = with_threads(3, || {
        run(
            x32(),
            &positions,
            [n, c],
            &of_sequence,
            &prefix_mask,
            &mask,
            dropout,
        )
    });
    for ((name, a), (b, c)) in names.iter().zip(&one).zip(three.iter().zip(&r64)) {
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} differs between thread counts"
        );
        let scale = c.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1.0);
        for (i, (&x, &y)) in a.iter().zip(c).enumerate() {
            assert!(
                (x as f64 - y).abs() < 1e-5 * scale,
                "{name}[{i}]: f32 {x} vs f64 {y}"
            );
        }
    }
}
