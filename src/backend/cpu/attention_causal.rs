//! Causal softmax attention with grouped-query heads, a key padding mask and an optional
//! shared prefix, as Llama, Mistral and Qwen2 attend. Heads are interleaved along channels
//! as in Hugging Face: query head h of a [b, t, nh*hs] tensor is channels h*hs..(h+1)*hs;
//! keys and values have nkv heads ([b, t, nkv*hs]) and query head h reads key/value head
//! h / (nh / nkv), as transformers' `repeat_kv`.
//!
//! The shared prefix (`Prefix`) lets the K completions of a prompt attend to one copy of the
//! prompt's keys and values: a completion's queries see every real prompt key, then their
//! own keys causally, exactly as the same tokens would in the full sequence prompt +
//! completion (the caller gives the completion's tokens positions after the prompt's). The
//! backward sums the prompt keys' and values' gradients over all completions of the prompt.
//!
//! Parallel over (sequence, head) in the forward; over (group, key/value head) in the
//! backward, a group being the sequences that share a prompt (each sequence alone without a
//! prefix), so that every gradient a task writes is its own and its sums run in a fixed
//! order: bit-identical results whatever the thread count.

use rayon::prelude::*;

use super::SendPtr;
use super::attention::{AttentionDropout, active_dropout, softmax_backward_rows};
use super::dropout::dropout_forward_at;
use super::vecmath::{as_f32_mut, exp_nonpositive_f32};
use crate::float::Float;

/// The keys and values of the prompts that the sequences of a batch continue: sequence s
/// attends to every real key of prompt `of_sequence[s]` before its own.
#[derive(Clone, Copy, Debug)]
pub struct Prefix<'a, F> {
    /// [prompts, len, nkv*hs]: the prompts' keys (rotated) and values.
    pub k: &'a [F],
    pub v: &'a [F],
    /// [prompts, len]: 1 = real prompt token, 0 = padding.
    pub mask: &'a [u8],
    /// [b]: the prompt of each sequence.
    pub of_sequence: &'a [u32],
    pub prompts: usize,
    /// Tokens per prompt, padding included.
    pub len: usize,
}

/// The gradients of a `Prefix`'s keys and values, [prompts, len, nkv*hs] each: the backward
/// adds to them the sum over every sequence that continues the prompt.
#[derive(Debug)]
pub struct PrefixGrads<'a, F> {
    pub dk: &'a mut [F],
    pub dv: &'a mut [F],
}

/// The shapes of one call, checked once.
#[derive(Clone, Copy)]
struct Shape {
    t: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
    /// Prefix tokens per prompt (0 without a prefix).
    tp: usize,
}

impl Shape {
    /// Keys a query row scores: the prefix's, then the sequence's own.
    fn keys(self) -> usize {
        self.tp + self.t
    }
    /// Query heads per key/value head.
    fn group(self) -> usize {
        self.nh / self.nkv
    }
    /// Offset of (sequence or prompt `seq`, first token, head `head`) in a tensor of
    /// `heads` heads with `len` tokens per sequence.
    fn base(self, seq: usize, len: usize, heads: usize, head: usize) -> usize {
        seq * len * heads * self.hs + head * self.hs
    }
}

/// Checks every buffer against the shapes; panics name the op and the mismatch.
#[allow(clippy::too_many_arguments)]
fn check_shapes<F>(
    op: &str,
    out_len: usize,
    probs_len: usize,
    q: &[F],
    k: &[F],
    v: &[F],
    mask: &[u8],
    prefix: Option<&Prefix<'_, F>>,
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
) -> Shape {
    assert!(hs > 0, "{op}: head size must be positive");
    assert!(
        nkv > 0 && nh.is_multiple_of(nkv),
        "{op}: {nkv} key/value heads do not divide {nh} query heads"
    );
    assert_eq!(
        out_len,
        b * t * nh * hs,
        "{op}: out/dout is not [b, t, nh*hs]"
    );
    assert_eq!(q.len(), b * t * nh * hs, "{op}: q is not [b, t, nh*hs]");
    assert_eq!(k.len(), b * t * nkv * hs, "{op}: k is not [b, t, nkv*hs]");
    assert_eq!(v.len(), b * t * nkv * hs, "{op}: v is not [b, t, nkv*hs]");
    assert_eq!(mask.len(), b * t, "{op}: mask is not [b, t]");
    let tp = prefix.map_or(0, |p| p.len);
    if let Some(p) = prefix {
        let kv = p.prompts * p.len * nkv * hs;
        assert_eq!(
            p.k.len(),
            kv,
            "{op}: prefix k is not [prompts, len, nkv*hs]"
        );
        assert_eq!(
            p.v.len(),
            kv,
            "{op}: prefix v is not [prompts, len, nkv*hs]"
        );
        assert_eq!(
            p.mask.len(),
            p.prompts * p.len,
            "{op}: prefix mask is not [prompts, len]"
        );
        assert_eq!(
            p.of_sequence.len(),
            b,
            "{op}: prefix of_sequence is not [b]"
        );
        assert!(
            p.of_sequence.iter().all(|&i| (i as usize) < p.prompts),
            "{op}: a sequence continues a prompt past the {} given",
            p.prompts
        );
    }
    assert_eq!(
        probs_len,
        b * nh * t * (tp + t),
        "{op}: probs is not [b, nh, t, prefix len + t]"
    );
    Shape { t, nh, nkv, hs, tp }
}

/// out[b, t, nh*hs] = dropout(softmax(q kᵀ / √hs over the allowed keys)) · v per sequence
/// and head, with v and k the key/value head of the query head's group. probs[b, nh, t,
/// tp + t] keeps the softmax (before dropout) for the backward: columns 0..tp are the prefix
/// keys (tp = prefix.len, 0 without a prefix), then the sequence's own t keys.
///
/// Query i of a sequence may attend to its own keys j <= i with mask[j] = 1 and to the
/// prefix keys with prefix.mask = 1; every other key gets exactly zero weight. A query with
/// no key allowed (a padding position before the first real token) gets zero weight
/// everywhere and a zero output: such positions never reach a real token, which attends to
/// real keys only.
///
/// `dropout` drops the weights as BERT's attention does (see AttentionDropout): element i
/// of probs is kept by dropout_keep(seed, i, p); None in evaluation.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_forward<F: Float>(
    out: &mut [F],
    probs: &mut [F],
    q: &[F],
    k: &[F],
    v: &[F],
    mask: &[u8],
    prefix: Option<Prefix<'_, F>>,
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
    dropout: Option<AttentionDropout>,
) {
    let op = "causal_attention_forward";
    let shape = check_shapes(
        op,
        out.len(),
        probs.len(),
        q,
        k,
        v,
        mask,
        prefix.as_ref(),
        b,
        t,
        nh,
        nkv,
        hs,
    );
    if probs.is_empty() {
        return;
    }
    // An empty prefix is none.
    let prefix = prefix.filter(|p| p.len > 0);
    let dropout = active_dropout(op, dropout);
    let Shape { tp, .. } = shape;
    let keys = shape.keys();
    let (qc, kc) = ((nh * hs) as isize, (nkv * hs) as isize);
    let scale = F::from_f64(1.0 / (hs as f64).sqrt());
    let out_ptr = SendPtr(out.as_mut_ptr());
    probs.par_chunks_mut(t * keys).enumerate().for_each_init(
        // dropped [t, keys]: the weights after dropout; scratch, one per rayon job, empty
        // without dropout.
        || vec![F::ZERO; if dropout.is_some() { t * keys } else { 0 }],
        |dropped, (seq_head, probs)| {
            let (seq, head) = (seq_head / nh, seq_head % nh);
            let kv_head = head / shape.group();
            let q_base = shape.base(seq, t, nh, head);
            let kv_base = shape.base(seq, t, nkv, kv_head);
            let prompt = prefix.map(|p| p.of_sequence[seq] as usize);
            // SAFETY: check_shapes makes every [t, hs] block at these bases with these row
            // strides lie inside q, k, v and out (and every [tp, hs] block of the prefix);
            // probs is this task's own [t, keys] slice; tasks write disjoint heads of out,
            // which aliases no input.
            unsafe {
                // probs[:, tp..] = scale · q k_ownᵀ
                F::gemm(
                    t,
                    hs,
                    t,
                    scale,
                    q.as_ptr().add(q_base),
                    qc,
                    1,
                    k.as_ptr().add(kv_base),
                    1,
                    kc,
                    F::ZERO,
                    probs.as_mut_ptr().add(tp),
                    keys as isize,
                    1,
                );
                if let (Some(p), Some(prompt)) = (prefix, prompt) {
                    // probs[:, ..tp] = scale · q k_prefixᵀ
                    F::gemm(
                        t,
                        hs,
                        tp,
                        scale,
                        q.as_ptr().add(q_base),
                        qc,
                        1,
                        p.k.as_ptr().add(shape.base(prompt, tp, nkv, kv_head)),
                        1,
                        kc,
                        F::ZERO,
                        probs.as_mut_ptr(),
                        keys as isize,
                        1,
                    );
                }
            }
            let own_mask = &mask[seq * t..(seq + 1) * t];
            let prefix_mask = match (prefix, prompt) {
                (Some(p), Some(prompt)) => &p.mask[prompt * tp..(prompt + 1) * tp],
                _ => &[][..],
            };
            for (i, row) in probs.chunks_exact_mut(keys).enumerate() {
                let (prefix_row, own_row) = row.split_at_mut(tp);
                causal_softmax_row(prefix_row, own_row, prefix_mask, &own_mask[..=i]);
            }
            let weights: &[F] = match dropout {
                Some(d) => {
                    let first = (seq_head * t * keys) as u64;
                    dropout_forward_at(dropped, probs, first, d.p, d.seed);
                    dropped
                }
                None => probs,
            };
            unsafe {
                // out = weights[:, tp..] · v_own (+ weights[:, ..tp] · v_prefix)
                F::gemm(
                    t,
                    t,
                    hs,
                    F::ONE,
                    weights.as_ptr().add(tp),
                    keys as isize,
                    1,
                    v.as_ptr().add(kv_base),
                    kc,
                    1,
                    F::ZERO,
                    out_ptr.get().add(q_base),
                    qc,
                    1,
                );
                if let (Some(p), Some(prompt)) = (prefix, prompt) {
                    F::gemm(
                        t,
                        tp,
                        hs,
                        F::ONE,
                        weights.as_ptr(),
                        keys as isize,
                        1,
                        p.v.as_ptr().add(shape.base(prompt, tp, nkv, kv_head)),
                        kc,
                        1,
                        F::ONE,
                        out_ptr.get().add(q_base),
                        qc,
                        1,
                    );
                }
            }
        },
    );
}

/// Softmax in place of one query's scores: the prefix keys (allowed where prefix_mask is
/// 1), then its own keys, of which only the first own_mask.len() (the causal window) may be
/// allowed, where own_mask is 1. Excluded keys get exactly 0; with none allowed the whole
/// row is 0. Subtracts the maximum so exp cannot overflow; in f32 the exps are `vecmath`'s.
fn causal_softmax_row<F: Float>(
    prefix_row: &mut [F],
    own_row: &mut [F],
    prefix_mask: &[u8],
    own_mask: &[u8],
) {
    let excluded = F::from_f64(f64::NEG_INFINITY);
    let mut max: Option<F> = None;
    for (s, &m) in prefix_row
        .iter()
        .zip(prefix_mask)
        .chain(own_row.iter().zip(own_mask))
    {
        if m != 0 && max.is_none_or(|max| *s > max) {
            max = Some(*s);
        }
    }
    let Some(max) = max else {
        prefix_row.fill(F::ZERO);
        own_row.fill(F::ZERO);
        return;
    };
    for (s, &m) in prefix_row.iter_mut().zip(prefix_mask) {
        *s = if m != 0 { *s - max } else { excluded };
    }
    let (window, future) = own_row.split_at_mut(own_mask.len());
    for (s, &m) in window.iter_mut().zip(own_mask) {
        *s = if m != 0 { *s - max } else { excluded };
    }
    future.fill(F::ZERO);
    for part in [&mut *prefix_row, &mut *window] {
        match as_f32_mut(part) {
            Some(part32) => exp_nonpositive_f32(part32),
            None => part.iter_mut().for_each(|s| *s = s.exp()),
        }
    }
    let sum: f64 = prefix_row
        .iter()
        .chain(window.iter())
        .map(|s| s.to_f64())
        .sum();
    let inv_sum = F::from_f64(1.0 / sum);
    for s in prefix_row.iter_mut().chain(window.iter_mut()) {
        *s *= inv_sum;
    }
}

/// dq [b, t, nh*hs], dk, dv [b, t, nkv*hs] (and the prefix's dk, dv [prompts, len, nkv*hs])
/// += the gradients of causal_attention_forward given dout [b, t, nh*hs], the saved probs
/// p [b, nh, t, tp + t] and the forward's dropout. With w = p ∘ keep / (1 - p) the weights
/// that multiplied the values (w = p without dropout), per query head:
///   dv += wᵀ dout; dw = dout vᵀ; dp = dw ∘ keep / (1 - p); ds = p ∘ (dp - rowsum(p ∘ dp));
///   dq += ds k / √hs; dk += dsᵀ q / √hs,
/// k and v being the prefix's and the sequence's own keys and values side by side. A key
/// or value head sums over the query heads of its group in order; a prefix's over the
/// sequences that continue it, in order. Excluded keys have p = 0, hence no gradient.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_backward<F: Float>(
    dq: &mut [F],
    dk: &mut [F],
    dv: &mut [F],
    dprefix: Option<PrefixGrads<'_, F>>,
    dout: &[F],
    q: &[F],
    k: &[F],
    v: &[F],
    probs: &[F],
    mask: &[u8],
    prefix: Option<Prefix<'_, F>>,
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
    dropout: Option<AttentionDropout>,
) {
    let op = "causal_attention_backward";
    let shape = check_shapes(
        op,
        dout.len(),
        probs.len(),
        q,
        k,
        v,
        mask,
        prefix.as_ref(),
        b,
        t,
        nh,
        nkv,
        hs,
    );
    assert_eq!(dq.len(), q.len(), "{op}: dq is not [b, t, nh*hs]");
    assert_eq!(dk.len(), k.len(), "{op}: dk is not [b, t, nkv*hs]");
    assert_eq!(dv.len(), v.len(), "{op}: dv is not [b, t, nkv*hs]");
    let (dprefix_k, dprefix_v) = match (&prefix, dprefix) {
        (Some(p), Some(d)) => {
            assert_eq!(
                d.dk.len(),
                p.k.len(),
                "{op}: prefix dk is not [prompts, len, nkv*hs]"
            );
            assert_eq!(
                d.dv.len(),
                p.v.len(),
                "{op}: prefix dv is not [prompts, len, nkv*hs]"
            );
            (SendPtr(d.dk.as_mut_ptr()), SendPtr(d.dv.as_mut_ptr()))
        }
        (None, None) => (SendPtr(std::ptr::null_mut()), SendPtr(std::ptr::null_mut())),
        _ => panic!("{op}: a prefix needs its gradients and gradients need a prefix"),
    };
    if probs.is_empty() {
        return;
    }
    // An empty prefix is none.
    let prefix = prefix.filter(|p| p.len > 0);
    let dropout = active_dropout(op, dropout);
    // The sequences of each group, in order: those continuing one prompt, or each alone.
    let groups: Vec<(Option<usize>, Vec<usize>)> = match prefix {
        Some(p) => (0..p.prompts)
            .map(|prompt| {
                let seqs = (0..b).filter(|&s| p.of_sequence[s] as usize == prompt);
                (Some(prompt), seqs.collect())
            })
            .collect(),
        None => (0..b).map(|s| (None, vec![s])).collect(),
    };
    let Shape { tp, .. } = shape;
    let keys = shape.keys();
    let (qc, kc) = ((nh * hs) as isize, (nkv * hs) as isize);
    let ks = keys as isize;
    let scale = F::from_f64(1.0 / (hs as f64).sqrt());
    let (dq_ptr, dk_ptr, dv_ptr) = (
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv.as_mut_ptr()),
    );
    (0..groups.len() * nkv).into_par_iter().for_each_init(
        // dscores [t, keys] and dropped [t, keys] (empty without dropout): scratch, one
        // per rayon job.
        || {
            let dropped_len = if dropout.is_some() { t * keys } else { 0 };
            (vec![F::ZERO; t * keys], vec![F::ZERO; dropped_len])
        },
        |(dscores, dropped), task| {
            let (prompt, seqs) = &groups[task / nkv];
            let kv_head = task % nkv;
            for &seq in seqs {
                let kv_base = shape.base(seq, t, nkv, kv_head);
                for head in kv_head * shape.group()..(kv_head + 1) * shape.group() {
                    let seq_head = seq * nh + head;
                    let q_base = shape.base(seq, t, nh, head);
                    let probs = &probs[seq_head * t * keys..(seq_head + 1) * t * keys];
                    let first = (seq_head * t * keys) as u64;
                    let weights: &[F] = match dropout {
                        Some(d) => {
                            dropout_forward_at(dropped, probs, first, d.p, d.seed);
                            dropped
                        }
                        None => probs,
                    };
                    // SAFETY: check_shapes and the asserts above bound every block read or
                    // written here; this task alone writes dq's heads of this group and
                    // dk/dv's key/value head of its sequences and of its prompt, and no
                    // gradient aliases an input or another gradient.
                    unsafe {
                        // dv_own += weights[:, tp..]ᵀ · dout
                        F::gemm(
                            t,
                            t,
                            hs,
                            F::ONE,
                            weights.as_ptr().add(tp),
                            1,
                            ks,
                            dout.as_ptr().add(q_base),
                            qc,
                            1,
                            F::ONE,
                            dv_ptr.get().add(kv_base),
                            kc,
                            1,
                        );
                        // dweights[:, tp..] = dout · v_ownᵀ
                        F::gemm(
                            t,
                            hs,
                            t,
                            F::ONE,
                            dout.as_ptr().add(q_base),
                            qc,
                            1,
                            v.as_ptr().add(kv_base),
                            1,
                            kc,
                            F::ZERO,
                            dscores.as_mut_ptr().add(tp),
                            ks,
                            1,
                        );
                    }
                    if let (Some(p), Some(prompt)) = (prefix, *prompt) {
                        let prefix_base = shape.base(prompt, tp, nkv, kv_head);
                        unsafe {
                            // dv_prefix += weights[:, ..tp]ᵀ · dout
                            F::gemm(
                                tp,
                                t,
                                hs,
                                F::ONE,
                                weights.as_ptr(),
                                1,
                                ks,
                                dout.as_ptr().add(q_base),
                                qc,
                                1,
                                F::ONE,
                                dprefix_v.get().add(prefix_base),
                                kc,
                                1,
                            );
                            // dweights[:, ..tp] = dout · v_prefixᵀ
                            F::gemm(
                                t,
                                hs,
                                tp,
                                F::ONE,
                                dout.as_ptr().add(q_base),
                                qc,
                                1,
                                p.v.as_ptr().add(prefix_base),
                                1,
                                kc,
                                F::ZERO,
                                dscores.as_mut_ptr(),
                                ks,
                                1,
                            );
                        }
                    }
                    // Through the dropout: dprobs = dweights ∘ keep / (1 - p).
                    if let Some(d) = dropout {
                        dropout_forward_at(dropped, dscores, first, d.p, d.seed);
                        std::mem::swap(dscores, dropped);
                    }
                    softmax_backward_rows(dscores, probs, keys, F::ONE);
                    unsafe {
                        // dq += scale · ds[:, tp..] · k_own
                        F::gemm(
                            t,
                            t,
                            hs,
                            scale,
                            dscores.as_ptr().add(tp),
                            ks,
                            1,
                            k.as_ptr().add(kv_base),
                            kc,
                            1,
                            F::ONE,
                            dq_ptr.get().add(q_base),
                            qc,
                            1,
                        );
                        // dk_own += scale · ds[:, tp..]ᵀ · q
                        F::gemm(
                            t,
                            t,
                            hs,
                            scale,
                            dscores.as_ptr().add(tp),
                            1,
                            ks,
                            q.as_ptr().add(q_base),
                            qc,
                            1,
                            F::ONE,
                            dk_ptr.get().add(kv_base),
                            kc,
                            1,
                        );
                    }
                    if let (Some(p), Some(prompt)) = (prefix, *prompt) {
                        let prefix_base = shape.base(prompt, tp, nkv, kv_head);
                        unsafe {
                            // dq += scale · ds[:, ..tp] · k_prefix
                            F::gemm(
                                t,
                                tp,
                                hs,
                                scale,
                                dscores.as_ptr(),
                                ks,
                                1,
                                p.k.as_ptr().add(prefix_base),
                                kc,
                                1,
                                F::ONE,
                                dq_ptr.get().add(q_base),
                                qc,
                                1,
                            );
                            // dk_prefix += scale · ds[:, ..tp]ᵀ · q
                            F::gemm(
                                tp,
                                t,
                                hs,
                                scale,
                                dscores.as_ptr(),
                                1,
                                ks,
                                q.as_ptr().add(q_base),
                                qc,
                                1,
                                F::ONE,
                                dprefix_k.get().add(prefix_base),
                                kc,
                                1,
                            );
                        }
                    }
                }
            }
        },
    );
}
