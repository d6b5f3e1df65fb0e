//! Multi-head softmax attention with a key padding mask, heads interleaved along channels
//! as in Hugging Face BERT: head h of a [b, t, nh*hs] tensor is channels h*hs..(h+1)*hs.
//! Parallel over (sequence, head); each head's products are matrixmultiply gemms whose
//! strides pick the head's channels out of the interleaved rows.

use rayon::prelude::*;

use std::any::TypeId;

use super::SendPtr;
use super::dropout::dropout_forward_at;
use super::matmul_avx512;
use super::vecmath::{as_f32_mut, exp_nonpositive_f32};
use crate::float::Float;

/// Dropout on the attention probabilities (Hugging Face's `attention_probs_dropout_prob`):
/// the weights that multiply v are probs ∘ keep / (1 - p), keep[i] = dropout_keep(seed, i,
/// p) with i the element's index in probs [b, nh, t, t]. Only the softmax is stored; the
/// dropped weights are redrawn from the seed wherever they are needed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionDropout {
    pub p: f64,
    pub seed: u64,
}

/// The dropout to apply: None when off (absent or p = 0, which leaves results exactly
/// those without dropout). p must be in [0, 1).
pub(crate) fn active_dropout(
    op: &str,
    dropout: Option<AttentionDropout>,
) -> Option<AttentionDropout> {
    let dropout = dropout.filter(|d| d.p != 0.0)?;
    assert!(
        (0.0..1.0).contains(&dropout.p),
        "{op}: dropout p = {} is not in [0, 1)",
        dropout.p
    );
    Some(dropout)
}

/// out[b, t, nh*hs] = dropout(softmax(q kᵀ / √hs, keys at padding excluded)) · v, per
/// sequence and head; probs[b, nh, t, t] keeps the softmax (before dropout) for the
/// backward. mask[b, t]: 1 = real token, 0 = padding. Padded keys get exactly zero weight
/// (HF adds finfo.min to their scores); rows of padded queries are computed like any other.
/// A sequence with no real token at all attends uniformly to every key, as HF's finfo.min
/// does. `dropout`: see AttentionDropout; None in evaluation.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<F: Float>(
    out: &mut [F],
    probs: &mut [F],
    q: &[F],
    k: &[F],
    v: &[F],
    mask: &[u8],
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
    dropout: Option<AttentionDropout>,
) {
    check_shapes(
        "attention_forward",
        out.len(),
        probs.len(),
        q,
        k,
        v,
        mask,
        b,
        t,
        nh,
        hs,
    );
    if probs.is_empty() {
        return;
    }
    let dropout = active_dropout("attention_forward", dropout);
    let channels = nh * hs;
    let scale = F::from_f64(1.0 / (hs as f64).sqrt());
    let out_ptr = SendPtr(out.as_mut_ptr());
    probs.par_chunks_mut(t * t).enumerate().for_each_init(
        // dropped [t, t]: the head's weights after dropout (empty without dropout), and the
        // products' packing scratch; one per rayon job rather than per head.
        || {
            let dropped = vec![F::ZERO; if dropout.is_some() { t * t } else { 0 }];
            (dropped, Vec::new())
        },
        |(dropped, packed), (seq_head, probs)| {
            let (seq, head) = (seq_head / nh, seq_head % nh);
            // First element of this head in the [b, t, nh*hs] tensors; rows are `channels` apart.
            let base = seq * t * channels + head * hs;
            let mask = &mask[seq * t..(seq + 1) * t];
            // SAFETY: check_shapes makes every [t, hs] block at `base` with row stride
            // `channels` lie inside q, k, v and out; probs is this task's own [t, t] slice;
            // tasks write disjoint heads of out, and out aliases no input.
            unsafe {
                // probs = scale · q kᵀ (kᵀ: k read with swapped strides)
                head_gemm(
                    (t, hs, t),
                    scale,
                    (q.as_ptr().add(base), channels),
                    (k.as_ptr().add(base), 1, channels),
                    (probs.as_mut_ptr(), t),
                    packed,
                );
            }
            let any_real = mask.iter().any(|&m| m != 0);
            for row in probs.chunks_exact_mut(t) {
                masked_softmax_row(row, mask, any_real);
            }
            let weights: &[F] = match dropout {
                Some(d) => {
                    let first = (seq_head * t * t) as u64;
                    dropout_forward_at(dropped, probs, first, d.p, d.seed);
                    dropped
                }
                None => probs,
            };
            unsafe {
                // out = weights · v
                head_gemm(
                    (t, t, hs),
                    F::ONE,
                    (weights.as_ptr(), t),
                    (v.as_ptr().add(base), channels, 1),
                    (out_ptr.get().add(base), channels),
                    packed,
                );
            }
        },
    );
}

/// c[m, n] = alpha · a[m, k] · b[k, n] for one head, on this thread (a's and c's columns
/// unit-strided, b's element (i, j) at i·b_rs + j·b_cs): rcx's AVX-512 kernel for f32 where
/// the CPU has it (`matmul_avx512::gemm_single`, `packed` its scratch), matrixmultiply
/// otherwise.
///
/// # Safety
/// As `Float::gemm` with those strides: every addressed element inside its allocation, c
/// overlapping neither a nor b.
unsafe fn head_gemm<F: Float>(
    (m, k, n): (usize, usize, usize),
    alpha: F,
    (a, a_rs): (*const F, usize),
    (b, b_rs, b_cs): (*const F, usize, usize),
    (c, c_rs): (*mut F, usize),
    packed: &mut Vec<f32>,
) {
    if TypeId::of::<F>() == TypeId::of::<f32>() && matmul_avx512::available() {
        // SAFETY: F is f32, so the casts change nothing; the caller's contract.
        unsafe {
            matmul_avx512::gemm_single(
                (m, k, n),
                alpha.to_f64() as f32,
                (a.cast(), a_rs),
                (b.cast(), b_rs, b_cs),
                (c.cast(), c_rs),
                packed,
            )
        }
    } else {
        // SAFETY: the caller's contract.
        unsafe {
            F::gemm(
                m,
                k,
                n,
                alpha,
                a,
                a_rs as isize,
                1,
                b,
                b_rs as isize,
                b_cs as isize,
                F::ZERO,
                c,
                c_rs as isize,
                1,
            )
        }
    }
}

/// Lanes of the softmax's max and sum: independent accumulators the compiler keeps in
/// vector registers, instead of one serial chain of compares and f64 adds per row.
const SOFTMAX_LANES: usize = 8;

/// Softmax of one row of scores in place, over the keys that are real (all keys when none
/// is); excluded keys get exactly 0 (e^-inf). Subtracts the row maximum so exp cannot
/// overflow. In f32 the exps are `vecmath`'s (vectorised). The sum is taken in f64 over
/// SOFTMAX_LANES strided partial sums: an order that differs from a left-to-right sum by
/// f64 roundings (~1e-16 relative), far below the f32 result's.
pub(crate) fn masked_softmax_row<F: Float>(row: &mut [F], mask: &[u8], any_real: bool) {
    let excluded = F::from_f64(f64::NEG_INFINITY);
    // Excluded keys first become -inf, which no max picks and whose exp is 0. A row with
    // no real key is taken whole. NaN scores are never the max; they stay NaN through exp
    // and the sum, so the row comes out NaN as a NaN input should.
    if any_real {
        for (s, &m) in row.iter_mut().zip(mask) {
            if m == 0 {
                *s = excluded;
            }
        }
    }
    let mut maxes = [excluded; SOFTMAX_LANES];
    let mut chunks = row.chunks_exact(SOFTMAX_LANES);
    for chunk in &mut chunks {
        for (m, &s) in maxes.iter_mut().zip(chunk) {
            if s > *m {
                *m = s;
            }
        }
    }
    for (m, &s) in maxes.iter_mut().zip(chunks.remainder()) {
        if s > *m {
            *m = s;
        }
    }
    let max = maxes
        .iter()
        .fold(excluded, |acc, &m| if m > acc { m } else { acc });
    // Every key -inf or NaN: the row is NaN (-inf - -inf), as it was with a serial max.
    let max = if max == excluded {
        F::from_f64(f64::NAN)
    } else {
        max
    };
    for s in row.iter_mut() {
        *s -= max;
    }
    match as_f32_mut(row) {
        Some(row32) => exp_nonpositive_f32(row32),
        None => row.iter_mut().for_each(|s| *s = s.exp()),
    }
    let mut sums = [0f64; SOFTMAX_LANES];
    let mut chunks = row.chunks_exact(SOFTMAX_LANES);
    for chunk in &mut chunks {
        for (acc, s) in sums.iter_mut().zip(chunk) {
            *acc += s.to_f64();
        }
    }
    for (acc, s) in sums.iter_mut().zip(chunks.remainder()) {
        *acc += s.to_f64();
    }
    let sum: f64 = sums.iter().sum();
    let inv_sum = F::from_f64(1.0 / sum);
    for s in row.iter_mut() {
        *s *= inv_sum;
    }
}

/// Through a row-wise softmax, in place: each row of dscores (the probabilities'
/// gradient dp) becomes ds = scale · p (dp - Σ_j p dp), rows `width` long. The dot product
/// sums in f64, in order.
pub(crate) fn softmax_backward_rows<F: Float>(
    dscores: &mut [F],
    probs: &[F],
    width: usize,
    scale: F,
) {
    for (p_row, d_row) in probs
        .chunks_exact(width)
        .zip(dscores.chunks_exact_mut(width))
    {
        let dot: f64 = p_row
            .iter()
            .zip(d_row.iter())
            .map(|(p, d)| p.to_f64() * d.to_f64())
            .sum();
        let dot = F::from_f64(dot);
        for (d, &p) in d_row.iter_mut().zip(p_row) {
            *d = scale * p * (*d - dot);
        }
    }
}

/// dq, dk, dv [b, t, nh*hs] += the gradients of attention_forward given dout [b, t, nh*hs],
/// the saved probs p [b, nh, t, t] and the forward's dropout. With w = p ∘ keep / (1 - p)
/// the weights that multiplied v (w = p without dropout):
///   dv += wᵀ dout; dw = dout vᵀ; dp = dw ∘ keep / (1 - p); ds = p ∘ (dp - rowsum(p ∘ dp));
///   dq += ds k / √hs; dk += dsᵀ q / √hs.
/// Padded keys have p = 0, hence ds = 0: no gradient reaches them through the scores.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<F: Float>(
    dq: &mut [F],
    dk: &mut [F],
    dv: &mut [F],
    dout: &[F],
    q: &[F],
    k: &[F],
    v: &[F],
    probs: &[F],
    mask: &[u8],
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
    dropout: Option<AttentionDropout>,
) {
    check_shapes(
        "attention_backward",
        dout.len(),
        probs.len(),
        q,
        k,
        v,
        mask,
        b,
        t,
        nh,
        hs,
    );
    let activations = b * t * nh * hs;
    assert_eq!(
        dq.len(),
        activations,
        "attention_backward: dq is not [b, t, nh*hs]"
    );
    assert_eq!(
        dk.len(),
        activations,
        "attention_backward: dk is not [b, t, nh*hs]"
    );
    assert_eq!(
        dv.len(),
        activations,
        "attention_backward: dv is not [b, t, nh*hs]"
    );
    if probs.is_empty() {
        return;
    }
    let dropout = active_dropout("attention_backward", dropout);
    let channels = nh * hs;
    let scale = F::from_f64(1.0 / (hs as f64).sqrt());
    let (dq_ptr, dk_ptr, dv_ptr) = (
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv.as_mut_ptr()),
    );
    (0..b * nh).into_par_iter().for_each_init(
        // dscores [t, t] and dropped [t, t] (empty without dropout): scratch, one per
        // rayon job rather than per head.
        || {
            let dropped_len = if dropout.is_some() { t * t } else { 0 };
            (vec![F::ZERO; t * t], vec![F::ZERO; dropped_len])
        },
        |(dscores, dropped), seq_head| {
            let (seq, head) = (seq_head / nh, seq_head % nh);
            let base = seq * t * channels + head * hs;
            let probs = &probs[seq_head * t * t..(seq_head + 1) * t * t];
            let first = (seq_head * t * t) as u64;
            // The forward's weights: the same mask, redrawn from the seed.
            let weights: &[F] = match dropout {
                Some(d) => {
                    dropout_forward_at(dropped, probs, first, d.p, d.seed);
                    dropped
                }
                None => probs,
            };
            let ch = channels as isize;
            let ti = t as isize;
            // SAFETY: as in the forward: every [t, hs] block at `base` with row stride
            // `channels` lies inside its tensor (check_shapes and the asserts above);
            // tasks write disjoint heads of dq, dk, dv, which alias no input or each other.
            unsafe {
                // dv += weightsᵀ · dout (weightsᵀ: weights read with swapped strides)
                F::gemm(
                    t,
                    t,
                    hs,
                    F::ONE,
                    weights.as_ptr(),
                    1,
                    ti,
                    dout.as_ptr().add(base),
                    ch,
                    1,
                    F::ONE,
                    dv_ptr.get().add(base),
                    ch,
                    1,
                );
                // dweights = dout · vᵀ
                F::gemm(
                    t,
                    hs,
                    t,
                    F::ONE,
                    dout.as_ptr().add(base),
                    ch,
                    1,
                    v.as_ptr().add(base),
                    1,
                    ch,
                    F::ZERO,
                    dscores.as_mut_ptr(),
                    ti,
                    1,
                );
            }
            // Through the dropout: dprobs = dweights ∘ keep / (1 - p), into `dropped`
            // (its weights are used), then swapped into dscores.
            if let Some(d) = dropout {
                dropout_forward_at(dropped, dscores, first, d.p, d.seed);
                std::mem::swap(dscores, dropped);
            }
            softmax_backward_rows(dscores, probs, t, F::ONE);
            unsafe {
                // dq += scale · dscores · k
                F::gemm(
                    t,
                    t,
                    hs,
                    scale,
                    dscores.as_ptr(),
                    ti,
                    1,
                    k.as_ptr().add(base),
                    ch,
                    1,
                    F::ONE,
                    dq_ptr.get().add(base),
                    ch,
                    1,
                );
                // dk += scale · dscoresᵀ · q
                F::gemm(
                    t,
                    t,
                    hs,
                    scale,
                    dscores.as_ptr(),
                    1,
                    ti,
                    q.as_ptr().add(base),
                    ch,
                    1,
                    F::ONE,
                    dk_ptr.get().add(base),
                    ch,
                    1,
                );
            }
        },
    );
}

/// Shapes shared by the forward and the backward; panics name the op and the mismatch.
#[allow(clippy::too_many_arguments)]
fn check_shapes<F>(
    op: &str,
    activations_len: usize,
    probs_len: usize,
    q: &[F],
    k: &[F],
    v: &[F],
    mask: &[u8],
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) {
    let activations = b * t * nh * hs;
    assert_eq!(
        activations_len, activations,
        "{op}: out/dout is not [b, t, nh*hs]"
    );
    assert_eq!(q.len(), activations, "{op}: q is not [b, t, nh*hs]");
    assert_eq!(k.len(), activations, "{op}: k is not [b, t, nh*hs]");
    assert_eq!(v.len(), activations, "{op}: v is not [b, t, nh*hs]");
    assert_eq!(
        probs_len,
        b * nh * t * t,
        "{op}: probs is not [b, nh, t, t]"
    );
    assert_eq!(mask.len(), b * t, "{op}: mask is not [b, t]");
    assert!(hs > 0, "{op}: head size must be positive");
}
