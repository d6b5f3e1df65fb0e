//! Rotary position embeddings as Hugging Face's Llama, Mistral and Qwen2 apply them: the
//! `rotate_half` layout (channel i of a head pairs with channel i + hs/2, both turned by
//! the angle position · inv_freq[i]), frequencies from `rope_theta` and the head size, and
//! optionally Llama 3's `rope_scaling` of type `llama3`.
//!
//! transformers computes the frequencies, the angles and their cosines and sines in f32
//! whatever the model's dtype; `rope_inv_freq` and `rope_cos_sin` follow its f32 steps one
//! by one, so that long positions (where an f32 angle is off by up to half an ulp of itself)
//! turn by the very angle transformers uses. One difference is left: PyTorch's f32 `pow`
//! is not correctly rounded, and 1% of its frequencies differ from ours by 1 or 2 ulps
//! (tests/fixtures/decoder_ops/rope.json holds transformers' numbers).
//!
//! The cosines and sines of a batch are computed once (`rope_cos_sin`, per token from its
//! position, so that a shared prompt and its completions can each pass their own) and used
//! by every layer for queries and keys alike.

use rayon::prelude::*;

use super::ELEMENTWISE_CHUNK;
use crate::float::Float;

/// Llama 3's `rope_scaling` (`rope_type: llama3`): frequencies whose wavelength exceeds
/// original_max_position_embeddings / low_freq_factor are divided by `factor`, those below
/// original_max_position_embeddings / high_freq_factor are kept, and those between are
/// interpolated. Valid when factor > 0 and high_freq_factor > low_freq_factor > 0 (the
/// config reader checks this before building one).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// inv_freq[head_dim / 2] as transformers computes it (`_compute_default_rope_parameters`,
/// then `_compute_llama3_parameters` under `scaling`), step by step in f32:
/// inv_freq[i] = 1 / theta^(f32(2i) / f32(head_dim)). head_dim must be even and positive,
/// theta positive.
pub fn rope_inv_freq(head_dim: usize, theta: f64, scaling: Option<Llama3RopeScaling>) -> Vec<f32> {
    assert!(
        head_dim > 0 && head_dim.is_multiple_of(2),
        "rope_inv_freq: head_dim {head_dim} is not even and positive"
    );
    assert!(theta > 0.0, "rope_inv_freq: theta {theta} is not positive");
    // torch: base ** (arange(0, dim, 2).float() / dim), the base rounded to f32; pow taken
    // in f64 and rounded once (correctly rounded; PyTorch's f32 pow is within 2 ulps of it).
    let base = theta as f32 as f64;
    let unscaled = (0..head_dim / 2).map(|i| {
        let exponent = (2 * i) as f32 / head_dim as f32;
        1.0f32 / base.powf(exponent as f64) as f32
    });
    let Some(scaling) = scaling else {
        return unscaled.collect();
    };
    let Llama3RopeScaling {
        factor,
        low_freq_factor: low,
        high_freq_factor: high,
        original_max_position_embeddings: old_context,
    } = scaling;
    assert!(
        factor > 0.0 && low > 0.0 && high > low,
        "rope_inv_freq: llama3 scaling {scaling:?} needs factor > 0 and high_freq_factor > \
         low_freq_factor > 0"
    );
    // Python scalars meet f32 tensors: the scalar is rounded to f32, `scalar / tensor` is
    // reciprocal(tensor) · scalar, and the rest are f32 operations in the order written.
    let low_freq_wavelen = (old_context / low) as f32;
    let high_freq_wavelen = (old_context / high) as f32;
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    let factor = factor as f32;
    unscaled
        .map(|inv| {
            let wavelen = (1.0 / inv) * two_pi;
            if wavelen > low_freq_wavelen {
                inv / factor
            } else if wavelen < high_freq_wavelen {
                inv
            } else {
                let smooth =
                    ((1.0 / wavelen) * old_context as f32 - low as f32) / (high - low) as f32;
                (1.0 - smooth) * inv / factor + smooth * inv
            }
        })
        .collect()
}

/// cos[n, hs/2] and sin[n, hs/2] of the angles f32(f32(positions[i]) · inv_freq[j]), each
/// rounded to f32 and then to F, as transformers' rotary embedding computes them.
pub fn rope_cos_sin<F: Float>(cos: &mut [F], sin: &mut [F], positions: &[u32], inv_freq: &[f32]) {
    let half = inv_freq.len();
    let n = positions.len();
    assert_eq!(cos.len(), n * half, "rope_cos_sin: cos is not [n, hs/2]");
    assert_eq!(sin.len(), n * half, "rope_cos_sin: sin is not [n, hs/2]");
    if half == 0 {
        return;
    }
    let rows_per_task = (ELEMENTWISE_CHUNK / half).max(1);
    cos.par_chunks_mut(rows_per_task * half)
        .zip(sin.par_chunks_mut(rows_per_task * half))
        .zip(positions.par_chunks(rows_per_task))
        .for_each(|((cos, sin), positions)| {
            for ((cos, sin), &position) in cos
                .chunks_exact_mut(half)
                .zip(sin.chunks_exact_mut(half))
                .zip(positions)
            {
                for ((c, s), &inv) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
                    let angle = (position as f32 * inv) as f64;
                    *c = F::from_f64(angle.cos() as f32 as f64);
                    *s = F::from_f64(angle.sin() as f32 as f64);
                }
            }
        });
}

/// Shapes shared by the forward and the backward.
fn check_shapes(op: &str, a: usize, b: usize, cos: usize, sin: usize, shape: [usize; 3]) {
    let [n, heads, hs] = shape;
    assert!(hs % 2 == 0, "{op}: head size {hs} is not even");
    assert_eq!(a, n * heads * hs, "{op}: out/dout is not [n, heads*hs]");
    assert_eq!(b, n * heads * hs, "{op}: inp/dinp is not [n, heads*hs]");
    assert_eq!(cos, n * hs / 2, "{op}: cos is not [n, hs/2]");
    assert_eq!(sin, n * hs / 2, "{op}: sin is not [n, hs/2]");
}

/// Runs `rotate(out_row, inp_row, cos_row, sin_row)` for every token, in parallel over
/// blocks of tokens fixed by the shapes.
fn for_each_token<F: Float>(
    out: &mut [F],
    inp: &[F],
    cos: &[F],
    sin: &[F],
    row: usize,
    half: usize,
    rotate: impl Fn(&mut [F], &[F], &[F], &[F]) + Sync,
) {
    if out.is_empty() {
        return;
    }
    let rows_per_task = (ELEMENTWISE_CHUNK / row).max(1);
    out.par_chunks_mut(rows_per_task * row)
        .zip(inp.par_chunks(rows_per_task * row))
        .zip(cos.par_chunks(rows_per_task * half))
        .zip(sin.par_chunks(rows_per_task * half))
        .for_each(|(((out, inp), cos), sin)| {
            for (((out, inp), cos), sin) in out
                .chunks_exact_mut(row)
                .zip(inp.chunks_exact(row))
                .zip(cos.chunks_exact(half))
                .zip(sin.chunks_exact(half))
            {
                rotate(out, inp, cos, sin);
            }
        });
}

/// out[n, heads*hs] = inp · cos + rotate_half(inp) · sin per head, rotate_half(x) =
/// (-x[hs/2..], x[..hs/2]): with x1 = x[i], x2 = x[i + hs/2],
///   out[i] = x1 cos_i - x2 sin_i, out[i + hs/2] = x2 cos_i + x1 sin_i.
/// Every head of a token turns by the same angles. cos, sin [n, hs/2]: `rope_cos_sin`.
#[allow(clippy::too_many_arguments)]
pub fn rope_forward<F: Float>(
    out: &mut [F],
    inp: &[F],
    cos: &[F],
    sin: &[F],
    n: usize,
    heads: usize,
    hs: usize,
) {
    let shape = [n, heads, hs];
    check_shapes(
        "rope_forward",
        out.len(),
        inp.len(),
        cos.len(),
        sin.len(),
        shape,
    );
    let half = hs / 2;
    for_each_token(
        out,
        inp,
        cos,
        sin,
        heads * hs,
        half,
        |out, inp, cos, sin| {
            for (out, inp) in out.chunks_exact_mut(hs).zip(inp.chunks_exact(hs)) {
                let (x1, x2) = inp.split_at(half);
                let (o1, o2) = out.split_at_mut(half);
                for i in 0..half {
                    // The products rounded apart, then summed, as PyTorch's q*cos + rot(q)*sin.
                    o1[i] = x1[i] * cos[i] + (-x2[i]) * sin[i];
                    o2[i] = x2[i] * cos[i] + x1[i] * sin[i];
                }
            }
        },
    );
}

/// dinp[n, heads*hs] += the inverse rotation of dout (the rotation's transpose):
///   dinp[i] += d1 cos_i + d2 sin_i, dinp[i + hs/2] += d2 cos_i - d1 sin_i.
#[allow(clippy::too_many_arguments)]
pub fn rope_backward<F: Float>(
    dinp: &mut [F],
    dout: &[F],
    cos: &[F],
    sin: &[F],
    n: usize,
    heads: usize,
    hs: usize,
) {
    let shape = [n, heads, hs];
    check_shapes(
        "rope_backward",
        dout.len(),
        dinp.len(),
        cos.len(),
        sin.len(),
        shape,
    );
    let half = hs / 2;
    for_each_token(
        dinp,
        dout,
        cos,
        sin,
        heads * hs,
        half,
        |dinp, dout, cos, sin| {
            for (dinp, dout) in dinp.chunks_exact_mut(hs).zip(dout.chunks_exact(hs)) {
                let (d1, d2) = dout.split_at(half);
                let (g1, g2) = dinp.split_at_mut(half);
                for i in 0..half {
                    g1[i] += d1[i] * cos[i] + d2[i] * sin[i];
                    g2[i] += d2[i] * cos[i] - d1[i] * sin[i];
                }
            }
        },
    );
}
