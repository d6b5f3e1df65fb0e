//! The part of an encoder layer that BERT and DeBERTa share, after the attention (Hugging
//! Face's `BertSelfOutput`, `BertIntermediate` and `BertOutput`, which DeBERTa-v2 copies):
//! the attention output's dense, dropout and residual LayerNorm; the feed-forward dense
//! with GELU; its output dense, dropout and residual LayerNorm. Written once, forward and
//! backward over `Buf` handles, so that both architectures run the same ops in one order.
//!
//! Notation as in bert.rs: N = B*T rows, C hidden, I the feed-forward width.

use super::{Dropout, site_attn, site_ffn, site_seed};
use crate::backend::{Backend, Buf, Carver};
use crate::error::Result;

/// The block's sizes, and its LayerNorms' eps.
#[derive(Clone, Copy)]
pub(super) struct FfnDims {
    pub n: usize,
    pub c: usize,
    pub i: usize,
    pub eps: f64,
}

/// One layer's parameters of the block, as buffers of the parameter arena (or, for the
/// backward's gradients, of the gradient arena).
#[derive(Clone, Copy)]
pub(super) struct FfnParams {
    pub o_w: Buf,    // [C, C] the attention output's dense
    pub o_b: Buf,    // [C]
    pub ln1_w: Buf,  // [C]
    pub ln1_b: Buf,  // [C]
    pub ffn1_w: Buf, // [I, C]
    pub ffn1_b: Buf, // [I]
    pub ffn2_w: Buf, // [C, I]
    pub ffn2_b: Buf, // [C]
    pub ln2_w: Buf,  // [C]
    pub ln2_b: Buf,  // [C]
}

impl FfnParams {
    pub fn bufs(&self) -> [Buf; 10] {
        [
            self.o_w,
            self.o_b,
            self.ln1_w,
            self.ln1_b,
            self.ffn1_w,
            self.ffn1_b,
            self.ffn2_w,
            self.ffn2_b,
            self.ln2_w,
            self.ln2_b,
        ]
    }
}

/// One layer's activations of the block, saved for the backward: Acts buffers unless
/// marked Stats. The attention writes `ctx`, the block's input.
pub(super) struct FfnActs {
    pub ctx: Buf,      // [N, C] attention output, heads concatenated
    pub res1: Buf,     // [N, C] layer input + attention branch
    pub ln1_mean: Buf, // Stats [N]
    pub ln1_rstd: Buf, // Stats [N]
    pub ln1: Buf,      // [N, C]
    pub ffn_pre: Buf,  // [N, I] the feed-forward product, as the backend keeps it
    pub ffn_gelu: Buf, // [N, I]
    pub res2: Buf,     // [N, C] ln1 + feed-forward branch
    pub ln2_mean: Buf, // Stats [N]
    pub ln2_rstd: Buf, // Stats [N]
    pub ln2: Buf,      // [N, C] the layer's output
}

impl FfnActs {
    /// Carves one layer's activations from the Acts (`k`) and Stats (`f`) arenas.
    pub fn carve(k: &mut Carver, f: &mut Carver, d: FfnDims) -> FfnActs {
        let (n, c, i) = (d.n, d.c, d.i);
        FfnActs {
            ctx: k.take(n * c),
            res1: k.take(n * c),
            ln1_mean: f.take(n),
            ln1_rstd: f.take(n),
            ln1: k.take(n * c),
            ffn_pre: k.take(n * i),
            ffn_gelu: k.take(n * i),
            res2: k.take(n * c),
            ln2_mean: f.take(n),
            ln2_rstd: f.take(n),
            ln2: k.take(n * c),
        }
    }
}

/// The two outputs no backward reads, shared by every layer: a branch (the attention's
/// projection, then the feed-forward output) before and after its dropout (the backward
/// redraws the mask from the seed).
#[derive(Clone, Copy)]
pub(super) struct FfnBranch {
    pub out: Buf,     // [N, C]
    pub dropped: Buf, // [N, C]
}

/// The backward's buffers of the block (Acts), reused by every layer.
pub(super) struct FfnScratch {
    pub d_res2: Buf,     // [N, C]
    pub d_ffn_out: Buf,  // [N, C]
    pub d_ffn_gelu: Buf, // [N, I]
    pub d_ffn_pre: Buf,  // [N, I]
    pub d_ln1: Buf,      // [N, C]
    pub d_attn: Buf,     // [N, C] gradient of the attention projection's output
    pub d_ctx: Buf,      // [N, C] gradient of the attention's output: the block's result
}

impl FfnScratch {
    pub fn carve(k: &mut Carver, d: FfnDims) -> FfnScratch {
        let (n, c, i) = (d.n, d.c, d.i);
        FfnScratch {
            d_res2: k.take(n * c),
            d_ffn_out: k.take(n * c),
            d_ffn_gelu: k.take(n * i),
            d_ffn_pre: k.take(n * i),
            d_ln1: k.take(n * c),
            d_attn: k.take(n * c),
            d_ctx: k.take(n * c),
        }
    }
}

/// The block of layer `layer` on `a.ctx`: `a.ln2` = LayerNorm(ln1 + dropout(FFN(ln1)))
/// with ln1 = LayerNorm(input + dropout(dense(ctx))); `input` [N, C] is the layer's input.
#[allow(clippy::too_many_arguments)]
pub(super) fn encoder_ffn_forward<B: Backend>(
    be: &mut B,
    p: &FfnParams,
    a: &FfnActs,
    branch: FfnBranch,
    input: Buf,
    d: FfnDims,
    dropout: Option<Dropout>,
    layer: usize,
) -> Result<()> {
    let (n, c, i, eps) = (d.n, d.c, d.i, d.eps);
    be.matmul_forward(branch.out, a.ctx, p.o_w, Some(p.o_b), n, c, c)?;
    let (pd, seed) = site_seed(dropout, site_attn(layer));
    be.dropout_forward(branch.dropped, branch.out, pd, seed)?;
    // res1 = input + attention branch; ln1 = LayerNorm(res1).
    be.residual_layernorm_forward(
        a.ln1,
        a.res1,
        a.ln1_mean,
        a.ln1_rstd,
        input,
        branch.dropped,
        p.ln1_w,
        p.ln1_b,
        n,
        c,
        eps,
    )?;
    be.matmul_gelu_forward(a.ffn_gelu, a.ffn_pre, a.ln1, p.ffn1_w, p.ffn1_b, n, c, i)?;
    be.matmul_forward(branch.out, a.ffn_gelu, p.ffn2_w, Some(p.ffn2_b), n, i, c)?;
    let (pd, seed) = site_seed(dropout, site_ffn(layer));
    be.dropout_forward(branch.dropped, branch.out, pd, seed)?;
    // res2 = ln1 + feed-forward branch; ln2 = LayerNorm(res2).
    be.residual_layernorm_forward(
        a.ln2,
        a.res2,
        a.ln2_mean,
        a.ln2_rstd,
        a.ln1,
        branch.dropped,
        p.ln2_w,
        p.ln2_b,
        n,
        c,
        eps,
    )
}

/// The backward of `encoder_ffn_forward` (same dropout, same layer), given `d_out` [N, C],
/// the gradient of the layer's output: adds into the gradients `g`, overwrites `d_in`
/// [N, C] with the gradient of the layer's input through the residual (the attention's
/// part is the caller's to add) and `s.d_ctx` with that of `a.ctx`.
#[allow(clippy::too_many_arguments)]
pub(super) fn encoder_ffn_backward<B: Backend>(
    be: &mut B,
    p: &FfnParams,
    g: &FfnParams,
    a: &FfnActs,
    s: &FfnScratch,
    d_out: Buf,
    d_in: Buf,
    d: FfnDims,
    dropout: Option<Dropout>,
    layer: usize,
) -> Result<()> {
    let (n, c, i) = (d.n, d.c, d.i);
    be.zero(s.d_res2)?;
    be.layernorm_backward(
        s.d_res2, g.ln2_w, g.ln2_b, d_out, a.res2, p.ln2_w, a.ln2_mean, a.ln2_rstd, n, c,
    )?;
    be.zero(s.d_ffn_out)?;
    let (pd, seed) = site_seed(dropout, site_ffn(layer));
    be.dropout_backward(s.d_ffn_out, s.d_res2, pd, seed)?;
    be.zero(s.d_ffn_gelu)?;
    be.matmul_backward(
        s.d_ffn_gelu,
        g.ffn2_w,
        Some(g.ffn2_b),
        s.d_ffn_out,
        a.ffn_gelu,
        p.ffn2_w,
        n,
        i,
        c,
    )?;
    // ln1 feeds both the residual and the feed-forward block.
    be.copy(s.d_ln1, s.d_res2)?;
    be.matmul_gelu_backward(
        s.d_ln1,
        g.ffn1_w,
        g.ffn1_b,
        s.d_ffn_pre,
        s.d_ffn_gelu,
        a.ffn_pre,
        a.ln1,
        p.ffn1_w,
        p.ffn1_b,
        n,
        c,
        i,
    )?;
    be.zero(d_in)?;
    be.layernorm_backward(
        d_in, g.ln1_w, g.ln1_b, s.d_ln1, a.res1, p.ln1_w, a.ln1_mean, a.ln1_rstd, n, c,
    )?;
    be.zero(s.d_attn)?;
    let (pd, seed) = site_seed(dropout, site_attn(layer));
    be.dropout_backward(s.d_attn, d_in, pd, seed)?;
    be.zero(s.d_ctx)?;
    be.matmul_backward(s.d_ctx, g.o_w, Some(g.o_b), s.d_attn, a.ctx, p.o_w, n, c, c)
}
