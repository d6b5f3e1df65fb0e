//! DeBERTa-v2/v3's disentangled self-attention, as transformers' `DisentangledSelfAttention`
//! computes it, split into two ops so that the GPU can run the same decomposition:
//!
//! 1. `position_products_forward`: per head, the products of a [b, t, nh*hs] tensor with the
//!    projected relative-position embeddings pos [2S, nh*hs]: c2p = q · pos_kᵀ and
//!    p2c = k · pos_qᵀ, each [b, nh, t, 2S] (S = the attention span, `position_buckets` or
//!    `max_relative_positions`).
//! 2. `disentangled_attention_forward`: softmax over keys j of
//!    scale · (q_i·k_j + c2p[i, r_ij] + p2c[j, r_ij]), with r_ij = `relative_positions`[i, j]
//!    the bucketed, clamped relative position of query i to key j, then times v. A term is
//!    left out when its products are absent (`pos_att_type` without it).
//!
//! transformers gathers p2c at clamp(-bucket(j - i) + S) of key j's row and transposes; the
//! buckets are odd (bucket(-d) = -bucket(d)), so that is r_ij, the same index as c2p's.
//! Heads are interleaved along channels as in Hugging Face (head h is channels
//! h*hs..(h+1)*hs); padded keys get zero weight, padded queries are computed like any other.

use rayon::prelude::*;

use super::SendPtr;
use super::attention::{
    AttentionDropout, active_dropout, masked_softmax_row, softmax_backward_rows,
};
use super::dropout::dropout_forward_at;
use crate::float::Float;

/// transformers' `make_log_bucket_position` of one relative position d = i - j: exact
/// within ±bucket_size/2, logarithmic beyond, up to ±bucket_size/2 + (mid - 1) at
/// `max_position`. Computed in f32 as torch computes it (the bucket edges depend on it).
pub fn log_bucket_position(d: i64, bucket_size: usize, max_position: usize) -> i64 {
    let mid = (bucket_size / 2) as i64;
    if d.abs() <= mid {
        return d;
    }
    let ratio = (d.abs() as f32 / mid as f32).ln();
    let span = ((max_position - 1) as f64 / mid as f64) as f32;
    let log_pos = (ratio / span.ln() * (mid - 1) as f32).ceil() as i64 + mid;
    log_pos * d.signum()
}

/// The attention span S: the relative embedding table has 2S rows.
pub fn attention_span(position_buckets: usize, max_relative_positions: usize) -> usize {
    if position_buckets > 0 {
        position_buckets
    } else {
        max_relative_positions
    }
}

/// r [t, t]: the row of the [2S, ·] position products that query i reads for key j,
/// clamp(bucket(i - j) + S, 0, 2S - 1), as transformers' `build_relative_position` and
/// the clamp in `disentangled_attention_bias` (no bucketing when position_buckets is 0).
pub fn relative_positions(
    t: usize,
    position_buckets: usize,
    max_relative_positions: usize,
) -> Vec<u32> {
    let span = attention_span(position_buckets, max_relative_positions) as i64;
    assert!(
        span > 0,
        "relative_positions: the attention span must be positive"
    );
    let mut r = Vec::with_capacity(t * t);
    for i in 0..t as i64 {
        for j in 0..t as i64 {
            let d = if position_buckets > 0 && max_relative_positions > 0 {
                log_bucket_position(i - j, position_buckets, max_relative_positions)
            } else {
                i - j
            };
            r.push((d + span).clamp(0, 2 * span - 1) as u32);
        }
    }
    r
}

/// transformers' scale of the scores, 1/√(hs · (1 + position_terms)), with the root taken
/// in f32 as its `scaled_size_sqrt` takes it (f64 results then match transformers' to 1e-12).
pub fn disentangled_scale(hs: usize, position_terms: usize) -> f64 {
    1.0 / ((hs * (1 + position_terms)) as f32).sqrt() as f64
}

/// out [b, nh, t, n] = per head, x [b, t, nh*hs] times posᵀ, pos [n, nh*hs]: row i of head
/// h is (x_i · pos_r) over r in 0..n, both read at the head's channels.
#[allow(clippy::too_many_arguments)]
pub fn position_products_forward<F: Float>(
    out: &mut [F],
    x: &[F],
    pos: &[F],
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
    n: usize,
) {
    let channels = nh * hs;
    assert_eq!(
        x.len(),
        b * t * channels,
        "position_products_forward: x is not [b, t, nh*hs]"
    );
    assert_eq!(
        pos.len(),
        n * channels,
        "position_products_forward: pos is not [n, nh*hs]"
    );
    assert_eq!(
        out.len(),
        b * nh * t * n,
        "position_products_forward: out is not [b, nh, t, n]"
    );
    if out.is_empty() {
        return;
    }
    out.par_chunks_mut(t * n)
        .enumerate()
        .for_each(|(seq_head, out)| {
            let (seq, head) = (seq_head / nh, seq_head % nh);
            // SAFETY: the asserts make every [t, hs] block of x at this (sequence, head) and
            // every [n, hs] block of pos at this head lie inside them; out is the task's own.
            unsafe {
                F::gemm(
                    t,
                    hs,
                    n,
                    F::ONE,
                    x.as_ptr().add(seq * t * channels + head * hs),
                    channels as isize,
                    1,
                    pos.as_ptr().add(head * hs),
                    1,
                    channels as isize,
                    F::ZERO,
                    out.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
        });
}

/// dx [b, t, nh*hs] += dout · pos and dpos [n, nh*hs] += Σ_b doutᵀ · x, per head. dpos is
/// reduced over the sequences in order inside one task per head: deterministic.
#[allow(clippy::too_many_arguments)]
pub fn position_products_backward<F: Float>(
    dx: &mut [F],
    dpos: &mut [F],
    dout: &[F],
    x: &[F],
    pos: &[F],
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
    n: usize,
) {
    let channels = nh * hs;
    let op = "position_products_backward";
    assert_eq!(x.len(), b * t * channels, "{op}: x is not [b, t, nh*hs]");
    assert_eq!(dx.len(), x.len(), "{op}: dx is not [b, t, nh*hs]");
    assert_eq!(pos.len(), n * channels, "{op}: pos is not [n, nh*hs]");
    assert_eq!(dpos.len(), pos.len(), "{op}: dpos is not [n, nh*hs]");
    assert_eq!(
        dout.len(),
        b * nh * t * n,
        "{op}: dout is not [b, nh, t, n]"
    );
    if dout.is_empty() {
        return;
    }
    let (dx_ptr, dpos_ptr) = (SendPtr(dx.as_mut_ptr()), SendPtr(dpos.as_mut_ptr()));
    let ch = channels as isize;
    (0..nh).into_par_iter().for_each(|head| {
        for seq in 0..b {
            let dout = &dout[(seq * nh + head) * t * n..(seq * nh + head + 1) * t * n];
            let base = seq * t * channels + head * hs;
            // SAFETY: this task writes only head `head`'s channels of dx and dpos, which
            // alias no input; the blocks lie inside the buffers (asserts above).
            unsafe {
                // dx_h += dout · pos_h
                F::gemm(
                    t,
                    n,
                    hs,
                    F::ONE,
                    dout.as_ptr(),
                    n as isize,
                    1,
                    pos.as_ptr().add(head * hs),
                    ch,
                    1,
                    F::ONE,
                    dx_ptr.get().add(base),
                    ch,
                    1,
                );
                // dpos_h += doutᵀ · x_h
                F::gemm(
                    n,
                    t,
                    hs,
                    F::ONE,
                    dout.as_ptr(),
                    1,
                    n as isize,
                    x.as_ptr().add(base),
                    ch,
                    1,
                    F::ONE,
                    dpos_ptr.get().add(head * hs),
                    ch,
                    1,
                );
            }
        }
    });
}

/// The position terms of the scores: c2p and p2c [b, nh, t, 2S] (either may be absent),
/// read through r [t, t] with entries below 2S.
#[derive(Clone, Copy, Debug)]
pub struct PositionTerms<'a, F> {
    pub c2p: Option<&'a [F]>,
    pub p2c: Option<&'a [F]>,
    pub relative: &'a [u32],
    /// 2S: the number of position rows.
    pub rows: usize,
}

/// The gradients of a `PositionTerms`' products, [b, nh, t, 2S] each where present.
#[derive(Debug)]
pub struct PositionGrads<'a, F> {
    pub dc2p: Option<&'a mut [F]>,
    pub dp2c: Option<&'a mut [F]>,
}

/// out [b, t, nh*hs] = dropout(softmax(scale · (q kᵀ + c2p[i, r_ij] + p2c[j, r_ij]), padded
/// keys excluded)) · v per sequence and head; probs [b, nh, t, t] keeps the softmax for the
/// backward. `scale` is `disentangled_scale` of the config's `pos_att_type`.
#[allow(clippy::too_many_arguments)]
pub fn disentangled_attention_forward<F: Float>(
    out: &mut [F],
    probs: &mut [F],
    q: &[F],
    k: &[F],
    v: &[F],
    terms: PositionTerms<'_, F>,
    mask: &[u8],
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
    scale: f64,
    dropout: Option<AttentionDropout>,
) {
    let op = "disentangled_attention_forward";
    check_shapes(
        op,
        out.len(),
        probs.len(),
        q,
        k,
        v,
        &terms,
        mask,
        b,
        t,
        nh,
        hs,
    );
    if probs.is_empty() {
        return;
    }
    let dropout = active_dropout(op, dropout);
    let channels = nh * hs;
    let scale = F::from_f64(scale);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let rows = terms.rows;
    probs.par_chunks_mut(t * t).enumerate().for_each_init(
        || vec![F::ZERO; if dropout.is_some() { t * t } else { 0 }],
        |dropped, (seq_head, probs)| {
            let (seq, head) = (seq_head / nh, seq_head % nh);
            let base = seq * t * channels + head * hs;
            let mask = &mask[seq * t..(seq + 1) * t];
            // SAFETY: check_shapes makes every [t, hs] block at `base` with row stride
            // `channels` lie inside q, k, v and out; probs is this task's own; tasks write
            // disjoint heads of out, which aliases no input.
            unsafe {
                // probs = q kᵀ (scaled below, with the position terms)
                F::gemm(
                    t,
                    hs,
                    t,
                    F::ONE,
                    q.as_ptr().add(base),
                    channels as isize,
                    1,
                    k.as_ptr().add(base),
                    1,
                    channels as isize,
                    F::ZERO,
                    probs.as_mut_ptr(),
                    t as isize,
                    1,
                );
            }
            let products = seq_head * t * rows..(seq_head + 1) * t * rows;
            let c2p = terms.c2p.map(|c2p| &c2p[products.clone()]);
            let p2c = terms.p2c.map(|p2c| &p2c[products]);
            for (i, row) in probs.chunks_exact_mut(t).enumerate() {
                let relative = &terms.relative[i * t..(i + 1) * t];
                for (j, s) in row.iter_mut().enumerate() {
                    let r = relative[j] as usize;
                    let mut score = *s;
                    if let Some(c2p) = c2p {
                        score += c2p[i * rows + r];
                    }
                    if let Some(p2c) = p2c {
                        score += p2c[j * rows + r];
                    }
                    *s = score * scale;
                }
            }
            let any_real = mask.iter().any(|&m| m != 0);
            for row in probs.chunks_exact_mut(t) {
                masked_softmax_row(row, mask, any_real);
            }
            let weights: &[F] = match dropout {
                Some(d) => {
                    dropout_forward_at(dropped, probs, (seq_head * t * t) as u64, d.p, d.seed);
                    dropped
                }
                None => probs,
            };
            unsafe {
                // out = weights · v
                F::gemm(
                    t,
                    t,
                    hs,
                    F::ONE,
                    weights.as_ptr(),
                    t as isize,
                    1,
                    v.as_ptr().add(base),
                    channels as isize,
                    1,
                    F::ZERO,
                    out_ptr.get().add(base),
                    channels as isize,
                    1,
                );
            }
        },
    );
}

/// dq, dk, dv [b, t, nh*hs] and the position products' gradients += the gradients of
/// disentangled_attention_forward given dout, the saved probs and the forward's dropout.
/// With ds the scores' gradient (as in `attention_backward`, times scale):
///   dq += ds k; dk += dsᵀ q; dc2p[i, r_ij] += ds_ij; dp2c[j, r_ij] += ds_ij.
/// Each (sequence, head) owns its slices of every gradient: parallel and deterministic.
#[allow(clippy::too_many_arguments)]
pub fn disentangled_attention_backward<F: Float>(
    dq: &mut [F],
    dk: &mut [F],
    dv: &mut [F],
    position_grads: PositionGrads<'_, F>,
    dout: &[F],
    q: &[F],
    k: &[F],
    v: &[F],
    terms: PositionTerms<'_, F>,
    probs: &[F],
    mask: &[u8],
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
    scale: f64,
    dropout: Option<AttentionDropout>,
) {
    let op = "disentangled_attention_backward";
    check_shapes(
        op,
        dout.len(),
        probs.len(),
        q,
        k,
        v,
        &terms,
        mask,
        b,
        t,
        nh,
        hs,
    );
    for (name, grad) in [("dq", &*dq), ("dk", &*dk), ("dv", &*dv)] {
        assert_eq!(grad.len(), q.len(), "{op}: {name} is not [b, t, nh*hs]");
    }
    let PositionGrads { dc2p, dp2c } = position_grads;
    assert_eq!(
        dc2p.as_ref().map(|d| d.len()),
        terms.c2p.map(|c| c.len()),
        "{op}: dc2p is not shaped as c2p"
    );
    assert_eq!(
        dp2c.as_ref().map(|d| d.len()),
        terms.p2c.map(|p| p.len()),
        "{op}: dp2c is not shaped as p2c"
    );
    if probs.is_empty() {
        return;
    }
    let dropout = active_dropout(op, dropout);
    let channels = nh * hs;
    let scale = F::from_f64(scale);
    let rows = terms.rows;
    let (dq_ptr, dk_ptr, dv_ptr) = (
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv.as_mut_ptr()),
    );
    let dc2p_ptr = dc2p.map(|d| SendPtr(d.as_mut_ptr()));
    let dp2c_ptr = dp2c.map(|d| SendPtr(d.as_mut_ptr()));
    (0..b * nh).into_par_iter().for_each_init(
        || {
            let dropped_len = if dropout.is_some() { t * t } else { 0 };
            (vec![F::ZERO; t * t], vec![F::ZERO; dropped_len])
        },
        |(dscores, dropped), seq_head| {
            let (seq, head) = (seq_head / nh, seq_head % nh);
            let base = seq * t * channels + head * hs;
            let probs = &probs[seq_head * t * t..(seq_head + 1) * t * t];
            let first = (seq_head * t * t) as u64;
            let weights: &[F] = match dropout {
                Some(d) => {
                    dropout_forward_at(dropped, probs, first, d.p, d.seed);
                    dropped
                }
                None => probs,
            };
            let (ch, ti) = (channels as isize, t as isize);
            // SAFETY: every [t, hs] block at `base` with row stride `channels` lies inside
            // its tensor (check_shapes, asserts); this task alone writes this (sequence,
            // head)'s parts of dq, dk, dv, dc2p and dp2c, which alias nothing else.
            unsafe {
                // dv += weightsᵀ · dout
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
            if let Some(d) = dropout {
                dropout_forward_at(dropped, dscores, first, d.p, d.seed);
                std::mem::swap(dscores, dropped);
            }
            // Through the softmax and the scale.
            softmax_backward_rows(dscores, probs, t, scale);
            // The position terms: scatter ds into the products it was gathered from.
            let products = seq_head * t * rows;
            for (i, d_row) in dscores.chunks_exact(t).enumerate() {
                let relative = &terms.relative[i * t..(i + 1) * t];
                for (j, &ds) in d_row.iter().enumerate() {
                    let r = relative[j] as usize;
                    unsafe {
                        if let Some(dc2p) = dc2p_ptr {
                            *dc2p.get().add(products + i * rows + r) += ds;
                        }
                        if let Some(dp2c) = dp2c_ptr {
                            *dp2c.get().add(products + j * rows + r) += ds;
                        }
                    }
                }
            }
            unsafe {
                // dq += ds · k
                F::gemm(
                    t,
                    t,
                    hs,
                    F::ONE,
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
                // dk += dsᵀ · q
                F::gemm(
                    t,
                    t,
                    hs,
                    F::ONE,
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
    terms: &PositionTerms<'_, F>,
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
    if terms.c2p.is_none() && terms.p2c.is_none() {
        return;
    }
    assert_eq!(terms.relative.len(), t * t, "{op}: relative is not [t, t]");
    assert!(
        terms.relative.iter().all(|&r| (r as usize) < terms.rows),
        "{op}: a relative position is past the {} position rows",
        terms.rows
    );
    for (name, products) in [("c2p", terms.c2p), ("p2c", terms.p2c)] {
        if let Some(products) = products {
            assert_eq!(
                products.len(),
                b * nh * t * terms.rows,
                "{op}: {name} is not [b, nh, t, 2S]"
            );
        }
    }
}
