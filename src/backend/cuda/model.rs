//! The BERT reward model of src/model.rs on the device, and `CudaTrainer`: one whole
//! training step (forward, fused ranking loss, backward, global norm, clipping, AdamW) on
//! the GPU, with only the loss and the gradient norm coming back to the host.
//!
//! Two activation types (`DType`): f32 throughout, or bf16 activations and GEMM inputs
//! with fp32 accumulation everywhere (cuBLAS compute 32F, fp32 arithmetic in the kernels),
//! fp32 master weights, gradients and AdamW moments, and a bf16 copy of the weights that
//! the encoder's GEMMs read, rounded from the master at upload and refreshed by the fused
//! AdamW. What stays fp32 whatever the type: LayerNorm parameters and statistics, biases,
//! the embedding tables, the attention's saved state, and the pooler head (B rows only;
//! the loss reads fp32 logits).
//!
//! Parameters, gradients and the two AdamW moments are one fp32 device allocation each, in
//! the layout of `ParamLayout` (carved by the CPU model's own `carve_params`), so a
//! checkpoint's arena goes up or comes down in one copy, whatever the type: a run moves
//! between CPU and GPU, f32 and bf16. Activations and the backward's scratch live in two
//! more allocations (one of the activation type, one fp32), grown to the largest batch seen.
//! Every tensor is a cudarc view of its arena; the kernel wrappers take views.
//!
//! Forward and backward mirror `BertModel::forward`/`backward` op for op: the same dropout
//! sites and seeds, the same order, the same saved activations, with two fusions that compute
//! the same function: the feed-forward bias is added inside the GELU kernel (so `ffn_pre`
//! holds the product without its bias), and each residual add runs inside the LayerNorm
//! kernel after it.
//!
//! Notation as in src/model.rs: B sequences of T tokens (N = B*T rows), C hidden, NH heads
//! of HS channels, I the feed-forward width.
//!
//! STATUS: compiled, never run on a GPU (no device was available when it was written);
//! tests/cuda_model.rs checks it against the CPU model on the first GPU run.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use half::bf16;

use super::cast::ModelFloat;
use super::loss::RankingBatch;
use super::ops::{FlashKernels, TokenBatch};
use super::optim::AdamWStep;
use super::runtime::{Activation, CudaRuntime, driver};
use crate::backend::cpu::AttentionDropout;
use crate::config::DType;
use crate::error::{Error, Result};
use crate::loss::{LossSpec, PromptType};
// The dropout sites are src/model.rs's own, so the device draws the very masks the CPU draws.
use crate::model::{
    Batch, BertConfig, BertModel, Dropout, LayerParams, ParamLayout, Params, SITE_EMB, SITE_POOL,
    Split, attention_dropout, carve_params, site_attn, site_ffn, site_seed,
};

/// A device view that can be cut in two, both halves keeping the lifetime of the whole (as
/// `<[T]>::split_at_mut` does for host slices), so an arena can be carved into named views.
trait Cut: Sized {
    fn len(&self) -> usize;
    fn cut(self, at: usize) -> (Self, Self);
}

impl<T> Cut for CudaView<'_, T> {
    fn len(&self) -> usize {
        CudaView::len(self)
    }

    fn cut(self, at: usize) -> (Self, Self) {
        self.split_at(at)
    }
}

impl<'a, T> Cut for CudaViewMut<'a, T> {
    fn len(&self) -> usize {
        CudaViewMut::len(self)
    }

    fn cut(mut self, at: usize) -> (Self, Self) {
        // cudarc's split_at_mut borrows the view; the halves are disjoint and cover exactly
        // the memory `self` borrowed for 'a, and `self` is consumed here, so each half may
        // hold that borrow for 'a itself.
        let (head, tail) = self.split_at_mut(at);
        // SAFETY: see above; the views hold only a pointer, a length and references into
        // the arena's CudaSlice, which stays borrowed for 'a.
        unsafe { (extend_view(head), extend_view(tail)) }
    }
}

/// # Safety
/// The caller guarantees that no other live view overlaps `view` for 'a.
unsafe fn extend_view<'a, T>(view: CudaViewMut<'_, T>) -> CudaViewMut<'a, T> {
    let view = std::mem::ManuallyDrop::new(view);
    let source: *const CudaViewMut<'_, T> = &*view;
    // SAFETY: the two types differ only in a lifetime, so they have the same layout.
    unsafe { std::ptr::read(source.cast::<CudaViewMut<'a, T>>()) }
}

/// A piece of an arena for `carve_params`, whose `Split` needs a placeholder (`Default`):
/// None only while the carver holds it, never in a carved result.
struct Piece<V>(Option<V>);

impl<V> Default for Piece<V> {
    fn default() -> Self {
        Piece(None)
    }
}

impl<V: Cut> Split for Piece<V> {
    fn split(self, at: usize) -> (Self, Self) {
        match self.0 {
            Some(view) => {
                let (head, tail) = view.cut(at);
                (Piece(Some(head)), Piece(Some(tail)))
            }
            None => (Piece(None), Piece(None)),
        }
    }
}

fn unpiece<V>(piece: Piece<V>) -> Result<V> {
    piece
        .0
        .ok_or_else(|| Error::internal("CUDA model: a parameter view was not carved"))
}

/// A parameter-shaped arena (parameters, gradients) as named views, by the CPU model's own
/// `carve_params`: the device layout is `ParamLayout`'s by construction.
fn device_params<V: Cut>(cfg: &BertConfig, arena: V) -> Result<Params<V>> {
    let p = carve_params(cfg, Piece(Some(arena)));
    let mut layers = Vec::with_capacity(p.layers.len());
    for l in p.layers {
        layers.push(LayerParams {
            q_w: unpiece(l.q_w)?,
            q_b: unpiece(l.q_b)?,
            k_w: unpiece(l.k_w)?,
            k_b: unpiece(l.k_b)?,
            v_w: unpiece(l.v_w)?,
            v_b: unpiece(l.v_b)?,
            o_w: unpiece(l.o_w)?,
            o_b: unpiece(l.o_b)?,
            ln1_w: unpiece(l.ln1_w)?,
            ln1_b: unpiece(l.ln1_b)?,
            ffn1_w: unpiece(l.ffn1_w)?,
            ffn1_b: unpiece(l.ffn1_b)?,
            ffn2_w: unpiece(l.ffn2_w)?,
            ffn2_b: unpiece(l.ffn2_b)?,
            ln2_w: unpiece(l.ln2_w)?,
            ln2_b: unpiece(l.ln2_b)?,
        });
    }
    Ok(Params {
        wte: unpiece(p.wte)?,
        wpe: unpiece(p.wpe)?,
        wtt: unpiece(p.wtt)?,
        emb_ln_w: unpiece(p.emb_ln_w)?,
        emb_ln_b: unpiece(p.emb_ln_b)?,
        layers,
        pool_w: unpiece(p.pool_w)?,
        pool_b: unpiece(p.pool_b)?,
        head_w: unpiece(p.head_w)?,
        head_b: unpiece(p.head_b)?,
    })
}

/// Cuts consecutive views off the front of an arena; running short is an error.
struct Carver<V> {
    rest: Option<V>,
}

impl<V: Cut> Carver<V> {
    fn take(&mut self, len: usize) -> Result<V> {
        let rest = self
            .rest
            .take()
            .ok_or_else(|| Error::internal("CUDA model: activation arena already spent"))?;
        if rest.len() < len {
            return Err(Error::internal(format!(
                "CUDA model: the activation arena is {} elements short",
                len - rest.len()
            )));
        }
        let (head, tail) = rest.cut(len);
        self.rest = Some(tail);
        Ok(head)
    }
}

// ---- ATTENTION: what the attention saves for its backward, and its backward's scratch ----
// The one place that knows the attention kernels' buffers (with `attention_forward_layer` and
// `attention_backward_layer` below). The model runs the flash-style kernels of
// kernels/attention.cu (version 3 on tensor cores in bf16, version 2 in f32): they never
// store the T x T probabilities; the forward saves each query row's logsumexp and the
// backward recomputes the probabilities from it.

/// fp32 elements the attention of one layer saves for its backward: the logsumexp
/// [B, NH, T].
fn attention_saved_len(b: usize, t: usize, nh: usize) -> usize {
    b * nh * t
}

/// fp32 elements of the attention backward's scratch (one layer at a time): the row dots
/// D = dctx · ctx [B, NH, T].
fn attention_scratch_len(b: usize, t: usize, nh: usize) -> usize {
    b * nh * t
}

// ---- the activation arenas ----
// Two arenas: one of the activation type T (f32 or bf16) for every [N, C] and [N, I]
// tensor, one of fp32 for what stays fp32 whatever T is: LayerNorm statistics, the
// attention's saved state and scratch, and the pooler head (tiny, and the loss reads fp32
// logits). `A` is a view of the first, `F` of the second.

/// The activations of one encoder layer saved for backward (as src/model.rs).
struct LayerActs<A, F> {
    q: A,               // [N, C]
    k: A,               // [N, C]
    v: A,               // [N, C]
    attention_saved: F, // attention_saved_len: the logsumexp [B, NH, T]
    ctx: A,             // [N, C] attention output, heads concatenated
    attn_proj: A,       // [N, C]
    attn_drop: A,       // [N, C]
    res1: A,            // [N, C] layer input + attention branch
    ln1_mean: F,        // [N]
    ln1_rstd: F,        // [N]
    ln1: A,             // [N, C]
    ffn_pre: A,         // [N, I] ln1 · W1ᵀ, WITHOUT the bias (the GELU kernel adds it)
    ffn_gelu: A,        // [N, I]
    ffn_out: A,         // [N, C]
    ffn_drop: A,        // [N, C]
    res2: A,            // [N, C] ln1 + feed-forward branch
    ln2_mean: F,        // [N]
    ln2_rstd: F,        // [N]
    ln2: A,             // [N, C] the layer's output
}

struct Acts<A, F> {
    emb: A,      // [N, C] word + position + type
    emb_mean: F, // [N]
    emb_rstd: F, // [N]
    emb_ln: A,   // [N, C]
    emb_drop: A, // [N, C] input of layer 0
    layers: Vec<LayerActs<A, F>>,
    cls: A,         // [B, C] the [CLS] rows of the last layer
    pool_in: F,     // [B, C] cls in fp32: the pooler head runs in fp32
    pool_pre: F,    // [B, C]
    pooled: F,      // [B, C]
    pooled_drop: F, // [B, C]
    logits: F,      // [B]
}

/// The backward's buffers (src/model.rs's GradScratch, plus the attention's scratch and
/// dlogits, which live on the device too).
struct Scratch<A, F> {
    d_out: A,             // [N, C] gradient of the current layer's output
    d_in: A,              // [N, C] gradient of its input, being accumulated
    d_res2: A,            // [N, C]
    d_ffn_out: A,         // [N, C]
    d_ffn_gelu: A,        // [N, I]
    d_ffn_pre: A,         // [N, I]
    d_ln1: A,             // [N, C]
    d_attn: A,            // [N, C]
    d_ctx: A,             // [N, C]
    d_q: A,               // [N, C]
    d_k: A,               // [N, C]
    d_v: A,               // [N, C]
    d_cls: A,             // [B, C] d_pool_in in T
    attention_scratch: F, // attention_scratch_len: the row dots [B, NH, T]
    d_pool: F,            // [B, C]
    d_pooled: F,          // [B, C]
    d_pool_pre: F,        // [B, C]
    d_pool_in: F,         // [B, C]
    dlogits: F,           // [B]
}

/// Elements of the two activation arenas (T, fp32) for B sequences of T tokens:
/// activations + scratch, exactly what `carve_arena` takes.
fn arena_lens(cfg: &BertConfig, b: usize, t: usize) -> (usize, usize) {
    let (n, c, i, nh) = (
        b * t,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
    );
    let layers = cfg.num_hidden_layers;
    let typed_acts = 3 * n * c + layers * (12 * n * c + 2 * n * i) + b * c;
    let typed_scratch = 10 * n * c + 2 * n * i + b * c;
    let f32_acts = 2 * n + layers * (4 * n + attention_saved_len(b, t, nh)) + 4 * b * c + b;
    let f32_scratch = attention_scratch_len(b, t, nh) + 4 * b * c + b;
    (typed_acts + typed_scratch, f32_acts + f32_scratch)
}

type Carved<A, F> = (Acts<A, F>, Scratch<A, F>);

fn carve_arena<A: Cut, F: Cut>(
    cfg: &BertConfig,
    typed: A,
    fp32: F,
    b: usize,
    t: usize,
) -> Result<Carved<A, F>> {
    let (n, c, i, nh) = (
        b * t,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
    );
    let mut k = Carver { rest: Some(typed) };
    let mut f = Carver { rest: Some(fp32) };
    let emb = k.take(n * c)?;
    let emb_mean = f.take(n)?;
    let emb_rstd = f.take(n)?;
    let emb_ln = k.take(n * c)?;
    let emb_drop = k.take(n * c)?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for _ in 0..cfg.num_hidden_layers {
        layers.push(LayerActs {
            q: k.take(n * c)?,
            k: k.take(n * c)?,
            v: k.take(n * c)?,
            attention_saved: f.take(attention_saved_len(b, t, nh))?,
            ctx: k.take(n * c)?,
            attn_proj: k.take(n * c)?,
            attn_drop: k.take(n * c)?,
            res1: k.take(n * c)?,
            ln1_mean: f.take(n)?,
            ln1_rstd: f.take(n)?,
            ln1: k.take(n * c)?,
            ffn_pre: k.take(n * i)?,
            ffn_gelu: k.take(n * i)?,
            ffn_out: k.take(n * c)?,
            ffn_drop: k.take(n * c)?,
            res2: k.take(n * c)?,
            ln2_mean: f.take(n)?,
            ln2_rstd: f.take(n)?,
            ln2: k.take(n * c)?,
        });
    }
    let acts = Acts {
        emb,
        emb_mean,
        emb_rstd,
        emb_ln,
        emb_drop,
        layers,
        cls: k.take(b * c)?,
        pool_in: f.take(b * c)?,
        pool_pre: f.take(b * c)?,
        pooled: f.take(b * c)?,
        pooled_drop: f.take(b * c)?,
        logits: f.take(b)?,
    };
    let scratch = Scratch {
        d_out: k.take(n * c)?,
        d_in: k.take(n * c)?,
        d_res2: k.take(n * c)?,
        d_ffn_out: k.take(n * c)?,
        d_ffn_gelu: k.take(n * i)?,
        d_ffn_pre: k.take(n * i)?,
        d_ln1: k.take(n * c)?,
        d_attn: k.take(n * c)?,
        d_ctx: k.take(n * c)?,
        d_q: k.take(n * c)?,
        d_k: k.take(n * c)?,
        d_v: k.take(n * c)?,
        d_cls: k.take(b * c)?,
        attention_scratch: f.take(attention_scratch_len(b, t, nh))?,
        d_pool: f.take(b * c)?,
        d_pooled: f.take(b * c)?,
        d_pool_pre: f.take(b * c)?,
        d_pool_in: f.take(b * c)?,
        dlogits: f.take(b)?,
    };
    Ok((acts, scratch))
}

/// A host batch on the device: token ids (with the embedding backward's row lists) and
/// the padding mask.
struct DeviceBatch {
    tokens: TokenBatch,
    mask: CudaSlice<u8>, // [B, T]
    b: usize,
    t: usize,
}

impl DeviceBatch {
    /// Rejects what BertModel::forward rejects, with the same messages.
    fn new(rt: &CudaRuntime, cfg: &BertConfig, batch: &Batch) -> Result<DeviceBatch> {
        let (b, t) = (batch.b, batch.t);
        if batch.input_ids.len() != b * t
            || batch.token_type_ids.len() != b * t
            || batch.mask.len() != b * t
        {
            return Err(Error::internal(format!(
                "CUDA model: a batch of {b} x {t} tokens holds {} ids, {} types, {} mask values",
                batch.input_ids.len(),
                batch.token_type_ids.len(),
                batch.mask.len()
            )));
        }
        if t > cfg.max_position_embeddings {
            return Err(Error::user(format!(
                "a sequence of {t} tokens is longer than the model's {} positions: lower `max_length`",
                cfg.max_position_embeddings
            )));
        }
        if let Some(&id) = batch
            .input_ids
            .iter()
            .find(|&&id| id as usize >= cfg.vocab_size)
        {
            return Err(Error::user(format!(
                "token id {id} is outside the model's vocabulary of {} (config.json's vocab_size): the ids come from a larger vocabulary than the model's",
                cfg.vocab_size
            )));
        }
        if let Some(&ty) = batch
            .token_type_ids
            .iter()
            .find(|&&ty| ty as usize >= cfg.type_vocab_size)
        {
            return Err(Error::user(format!(
                "token type {ty} is outside the model's {} token types",
                cfg.type_vocab_size
            )));
        }
        let tables = (
            cfg.vocab_size,
            cfg.max_position_embeddings,
            cfg.type_vocab_size,
        );
        Ok(DeviceBatch {
            tokens: TokenBatch::new(rt, &batch.input_ids, &batch.token_type_ids, b, t, tables)?,
            mask: rt.upload(&batch.mask)?,
            b,
            t,
        })
    }
}

/// The parameters as the forward and backward read them: the fp32 master arena (embedding
/// tables, biases, LayerNorm, the pooler head) and the weights the encoder's GEMMs read, in
/// T (for f32 the master arena itself, for bf16 its bf16 copy).
struct Weights<'a, T> {
    master: Params<CudaView<'a, f32>>,
    gemm: Params<CudaView<'a, T>>,
}

/// The activations and scratch of one batch: views of the two activation arenas.
type ActViews<'a, T> = Carved<CudaViewMut<'a, T>, CudaViewMut<'a, f32>>;

/// BertModel::forward on the device: writes every activation of `a`, the logits last.
fn forward<T: ModelFloat>(
    rt: &CudaRuntime,
    cfg: &BertConfig,
    w: &Weights<'_, T>,
    a: &mut Acts<CudaViewMut<'_, T>, CudaViewMut<'_, f32>>,
    batch: &DeviceBatch,
    dropout: Option<Dropout>,
) -> Result<()> {
    let (b, t) = (batch.b, batch.t);
    let (n, c, i) = (b * t, cfg.hidden_size, cfg.intermediate_size);
    let eps = cfg.layer_norm_eps;
    let p = &w.master;

    rt.embedding_forward(&mut a.emb, &batch.tokens, &p.wte, &p.wpe, &p.wtt, c)?;
    rt.layernorm_forward(
        &mut a.emb_ln,
        &mut a.emb_mean,
        &mut a.emb_rstd,
        &a.emb,
        &p.emb_ln_w,
        &p.emb_ln_b,
        n,
        c,
        eps,
    )?;
    let (pd, seed) = site_seed(dropout, SITE_EMB);
    rt.dropout_forward(&mut a.emb_drop, &a.emb_ln, pd, seed)?;

    for l in 0..cfg.num_hidden_layers {
        let (below, rest) = a.layers.split_at_mut(l);
        let la = &mut rest[0];
        let input: &CudaViewMut<'_, T> = match below.last() {
            Some(prev) => &prev.ln2,
            None => &a.emb_drop,
        };
        // GEMM weights in T, biases and LayerNorm parameters fp32.
        let (lw, lp) = (&w.gemm.layers[l], &p.layers[l]);
        rt.matmul_forward(&mut la.q, input, &lw.q_w, Some(&lp.q_b), n, c, c)?;
        rt.matmul_forward(&mut la.k, input, &lw.k_w, Some(&lp.k_b), n, c, c)?;
        rt.matmul_forward(&mut la.v, input, &lw.v_w, Some(&lp.v_b), n, c, c)?;
        attention_forward_layer(rt, cfg, la, batch, attention_dropout(dropout, l))?;
        rt.matmul_forward(&mut la.attn_proj, &la.ctx, &lw.o_w, Some(&lp.o_b), n, c, c)?;
        let (pd, seed) = site_seed(dropout, site_attn(l));
        rt.dropout_forward(&mut la.attn_drop, &la.attn_proj, pd, seed)?;
        // res1 = input + attn_drop; ln1 = LayerNorm(res1).
        rt.residual_layernorm_forward(
            &mut la.ln1,
            &mut la.res1,
            &mut la.ln1_mean,
            &mut la.ln1_rstd,
            input,
            &la.attn_drop,
            &lp.ln1_w,
            &lp.ln1_b,
            n,
            c,
            eps,
        )?;
        rt.matmul_forward(
            &mut la.ffn_pre,
            &la.ln1,
            &lw.ffn1_w,
            None::<&CudaView<'_, f32>>,
            n,
            c,
            i,
        )?;
        rt.bias_gelu_forward(&mut la.ffn_gelu, &la.ffn_pre, &lp.ffn1_b, n, i)?;
        rt.matmul_forward(
            &mut la.ffn_out,
            &la.ffn_gelu,
            &lw.ffn2_w,
            Some(&lp.ffn2_b),
            n,
            i,
            c,
        )?;
        let (pd, seed) = site_seed(dropout, site_ffn(l));
        rt.dropout_forward(&mut la.ffn_drop, &la.ffn_out, pd, seed)?;
        // res2 = ln1 + ffn_drop; ln2 = LayerNorm(res2).
        rt.residual_layernorm_forward(
            &mut la.ln2,
            &mut la.res2,
            &mut la.ln2_mean,
            &mut la.ln2_rstd,
            &la.ln1,
            &la.ffn_drop,
            &lp.ln2_w,
            &lp.ln2_b,
            n,
            c,
            eps,
        )?;
    }

    // The pooler head in fp32 on the master weights: B rows only, and the loss reads fp32.
    let last: &CudaViewMut<'_, T> = match a.layers.last() {
        Some(layer) => &layer.ln2,
        None => &a.emb_drop,
    };
    rt.cls_pool_forward(&mut a.cls, last, b, t, c)?;
    T::to_f32(rt, &mut a.pool_in, &a.cls.as_view())?;
    rt.matmul_forward(
        &mut a.pool_pre,
        &a.pool_in,
        &p.pool_w,
        Some(&p.pool_b),
        b,
        c,
        c,
    )?;
    rt.tanh_forward(&mut a.pooled, &a.pool_pre)?;
    let (pd, seed) = site_seed(dropout, SITE_POOL);
    rt.dropout_forward(&mut a.pooled_drop, &a.pooled, pd, seed)?;
    rt.matmul_forward(
        &mut a.logits,
        &a.pooled_drop,
        &p.head_w,
        Some(&p.head_b),
        b,
        c,
        1,
    )
}

// ---- ATTENTION: the one forward call and the one backward call of the attention ----

/// ctx = attention(q, k, v) of one layer, saving what its backward needs.
fn attention_forward_layer<T: ModelFloat>(
    rt: &CudaRuntime,
    cfg: &BertConfig,
    la: &mut LayerActs<CudaViewMut<'_, T>, CudaViewMut<'_, f32>>,
    batch: &DeviceBatch,
    dropout: Option<AttentionDropout>,
) -> Result<()> {
    let dims = (batch.b, batch.t, cfg.num_attention_heads, cfg.head_size());
    rt.flash_attention_forward(
        &mut la.ctx,
        &mut la.attention_saved,
        &la.q,
        &la.k,
        &la.v,
        &batch.mask,
        dims,
        dropout,
        FlashKernels::for_activation::<T>(),
    )
}

/// d_q, d_k, d_v += the attention's input gradients given d_ctx (each zeroed here first).
fn attention_backward_layer<T: ModelFloat>(
    rt: &CudaRuntime,
    cfg: &BertConfig,
    la: &LayerActs<CudaViewMut<'_, T>, CudaViewMut<'_, f32>>,
    s: &mut Scratch<CudaViewMut<'_, T>, CudaViewMut<'_, f32>>,
    batch: &DeviceBatch,
    dropout: Option<AttentionDropout>,
) -> Result<()> {
    let dims = (batch.b, batch.t, cfg.num_attention_heads, cfg.head_size());
    zero(rt, &mut s.d_q)?;
    zero(rt, &mut s.d_k)?;
    zero(rt, &mut s.d_v)?;
    // la.ctx is the forward's output, untouched since (the projection only reads it).
    rt.flash_attention_backward(
        &mut s.d_q,
        &mut s.d_k,
        &mut s.d_v,
        &mut s.attention_scratch,
        &s.d_ctx,
        &la.ctx,
        &la.q,
        &la.k,
        &la.v,
        &la.attention_saved,
        &batch.mask,
        dims,
        dropout,
        FlashKernels::for_activation::<T>(),
    )
}

// ---- end of ATTENTION ----

/// Zeroes a scratch view before a backward op adds into it (the CPU's `zeroed`).
fn zero<E: Activation>(rt: &CudaRuntime, view: &mut CudaViewMut<'_, E>) -> Result<()> {
    rt.stream()
        .memset_zeros(view)
        .map_err(driver("zero a scratch buffer"))
}

/// BertModel::backward on the device: adds d loss / d parameter into `g` (fp32, whatever
/// T is), given s.dlogits [B] and the activations of the forward on the same batch and
/// dropout.
#[allow(clippy::too_many_arguments)]
fn backward<T: ModelFloat>(
    rt: &CudaRuntime,
    cfg: &BertConfig,
    w: &Weights<'_, T>,
    g: &mut Params<CudaViewMut<'_, f32>>,
    a: &Acts<CudaViewMut<'_, T>, CudaViewMut<'_, f32>>,
    s: &mut Scratch<CudaViewMut<'_, T>, CudaViewMut<'_, f32>>,
    batch: &DeviceBatch,
    dropout: Option<Dropout>,
) -> Result<()> {
    let (b, t) = (batch.b, batch.t);
    let (n, c, i) = (b * t, cfg.hidden_size, cfg.intermediate_size);
    let p = &w.master;

    // Head and pooler, fp32.
    zero(rt, &mut s.d_pool)?;
    rt.matmul_backward(
        &mut s.d_pool,
        &mut g.head_w,
        Some(&mut g.head_b),
        &s.dlogits,
        &a.pooled_drop,
        &p.head_w,
        b,
        c,
        1,
    )?;
    zero(rt, &mut s.d_pool_pre)?;
    zero(rt, &mut s.d_pooled)?;
    let (pd, seed) = site_seed(dropout, SITE_POOL);
    rt.dropout_backward(&mut s.d_pooled, &s.d_pool, pd, seed)?;
    rt.tanh_backward(&mut s.d_pool_pre, &a.pooled, &s.d_pooled)?;
    zero(rt, &mut s.d_pool_in)?;
    rt.matmul_backward(
        &mut s.d_pool_in,
        &mut g.pool_w,
        Some(&mut g.pool_b),
        &s.d_pool_pre,
        &a.pool_in,
        &p.pool_w,
        b,
        c,
        c,
    )?;
    T::from_f32(rt, &mut s.d_cls, &s.d_pool_in.as_view())?;
    zero(rt, &mut s.d_out)?;
    rt.cls_pool_backward(&mut s.d_out, &s.d_cls, b, t, c)?;

    // Encoder layers, last to first: `d_out` holds the gradient of the layer's output,
    // `d_in` accumulates that of its input and becomes `d_out` of the layer below.
    for l in (0..cfg.num_hidden_layers).rev() {
        let (la, lw, lp, lg) = (
            &a.layers[l],
            &w.gemm.layers[l],
            &p.layers[l],
            &mut g.layers[l],
        );
        let input: &CudaViewMut<'_, T> = if l == 0 {
            &a.emb_drop
        } else {
            &a.layers[l - 1].ln2
        };

        zero(rt, &mut s.d_res2)?;
        rt.layernorm_backward(
            &mut s.d_res2,
            &mut lg.ln2_w,
            &mut lg.ln2_b,
            &s.d_out,
            &la.res2,
            &lp.ln2_w,
            &la.ln2_mean,
            &la.ln2_rstd,
            n,
            c,
        )?;
        zero(rt, &mut s.d_ffn_out)?;
        let (pd, seed) = site_seed(dropout, site_ffn(l));
        rt.dropout_backward(&mut s.d_ffn_out, &s.d_res2, pd, seed)?;
        zero(rt, &mut s.d_ffn_gelu)?;
        rt.matmul_backward(
            &mut s.d_ffn_gelu,
            &mut lg.ffn2_w,
            Some(&mut lg.ffn2_b),
            &s.d_ffn_out,
            &la.ffn_gelu,
            &lw.ffn2_w,
            n,
            i,
            c,
        )?;
        // The GELU kernel owns the first feed-forward bias, so its gradient comes here.
        zero(rt, &mut s.d_ffn_pre)?;
        rt.bias_gelu_backward(
            &mut s.d_ffn_pre,
            &mut lg.ffn1_b,
            &s.d_ffn_gelu,
            &la.ffn_pre,
            &lp.ffn1_b,
            n,
            i,
        )?;
        // ln1 feeds both the residual and the feed-forward block.
        rt.stream()
            .memcpy_dtod(&s.d_res2, &mut s.d_ln1)
            .map_err(driver("copy the residual gradient"))?;
        rt.matmul_backward(
            &mut s.d_ln1,
            &mut lg.ffn1_w,
            None::<&mut CudaViewMut<'_, f32>>,
            &s.d_ffn_pre,
            &la.ln1,
            &lw.ffn1_w,
            n,
            c,
            i,
        )?;

        zero(rt, &mut s.d_in)?;
        rt.layernorm_backward(
            &mut s.d_in,
            &mut lg.ln1_w,
            &mut lg.ln1_b,
            &s.d_ln1,
            &la.res1,
            &lp.ln1_w,
            &la.ln1_mean,
            &la.ln1_rstd,
            n,
            c,
        )?;
        zero(rt, &mut s.d_attn)?;
        let (pd, seed) = site_seed(dropout, site_attn(l));
        rt.dropout_backward(&mut s.d_attn, &s.d_in, pd, seed)?;
        zero(rt, &mut s.d_ctx)?;
        rt.matmul_backward(
            &mut s.d_ctx,
            &mut lg.o_w,
            Some(&mut lg.o_b),
            &s.d_attn,
            &la.ctx,
            &lw.o_w,
            n,
            c,
            c,
        )?;
        attention_backward_layer(rt, cfg, la, s, batch, attention_dropout(dropout, l))?;
        // The layer input feeds the residual (already in d_in) and q, k, v.
        for (d, w_grad, b_grad, weight) in [
            (&s.d_q, &mut lg.q_w, &mut lg.q_b, &lw.q_w),
            (&s.d_k, &mut lg.k_w, &mut lg.k_b, &lw.k_w),
            (&s.d_v, &mut lg.v_w, &mut lg.v_b, &lw.v_w),
        ] {
            rt.matmul_backward(&mut s.d_in, w_grad, Some(b_grad), d, input, weight, n, c, c)?;
        }
        std::mem::swap(&mut s.d_out, &mut s.d_in);
    }

    // Embeddings: d_in is free again and takes the LayerNorm output's gradient.
    zero(rt, &mut s.d_in)?;
    let (pd, seed) = site_seed(dropout, SITE_EMB);
    rt.dropout_backward(&mut s.d_in, &s.d_out, pd, seed)?;
    zero(rt, &mut s.d_res2)?;
    rt.layernorm_backward(
        &mut s.d_res2,
        &mut g.emb_ln_w,
        &mut g.emb_ln_b,
        &s.d_in,
        &a.emb,
        &p.emb_ln_w,
        &a.emb_mean,
        &a.emb_rstd,
        n,
        c,
    )?;
    rt.embedding_backward(
        &mut g.wte,
        &mut g.wpe,
        &mut g.wtt,
        &s.d_res2,
        &batch.tokens,
        c,
    )?;
    let pad = cfg.pad_token_id as usize;
    if pad < cfg.vocab_size {
        rt.stream()
            .memset_zeros(&mut g.wte.slice_mut(pad * c..(pad + 1) * c))
            .map_err(driver("zero the padding row's gradient"))?;
    }
    Ok(())
}

/// One micro-batch of a step: a padded batch of every completion of some prompts, their
/// counts K (contiguous, best first) and types, and the forward's dropout.
pub struct MicroBatch<'a> {
    pub batch: &'a Batch,
    pub ks: &'a [usize],
    pub types: &'a [Option<PromptType>],
    pub dropout: Option<Dropout>,
}

/// The optimizer settings of one step (src/train.rs's constants and config).
#[derive(Clone, Copy, Debug)]
pub struct OptimStep {
    /// Counts from 1.
    pub step: u64,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Applied only to the tensors `TensorSpec::decay` marks, as the CPU loop.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (torch.nn.utils.clip_grad_norm_).
    pub max_grad_norm: f64,
}

/// What a step brings back to the host.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The mean over micro-batches of each one's mean pair loss.
    pub loss: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
}

/// The reward model's training state on one GPU: the four fp32 parameter-shaped arenas
/// (master weights, gradients, the AdamW moments), the activation arenas, and for bf16 the
/// bf16 copy of the weights.
pub struct CudaTrainer {
    rt: Arc<CudaRuntime>,
    config: BertConfig,
    layout: ParamLayout,
    params: CudaSlice<f32>, // [layout.total] fp32 master weights
    grads: CudaSlice<f32>,  // [layout.total]
    m: CudaSlice<f32>,      // [layout.total] AdamW first moment
    v: CudaSlice<f32>,      // [layout.total] AdamW second moment
    precision: Precision,
    /// The fp32 activations whatever the type (see `carve_arena`), grown with the typed arena.
    acts_f32: CudaSlice<f32>,
    /// Consecutive tensors with the same weight-decay flag: one AdamW launch each.
    decay_runs: Vec<(Range<usize>, bool)>,
}

/// The activation type and the buffers of that type.
enum Precision {
    F32 {
        acts: CudaSlice<f32>, // activations + backward scratch in f32, grown to the largest batch
    },
    Bf16 {
        /// [layout.total] the master weights rounded to bf16, in `ParamLayout` (so one
        /// carve names its tensors and one AdamW launch per run refreshes it). The encoder's
        /// GEMMs read it; the rest (tables, biases, LayerNorm, the head) read the fp32
        /// master, so those parts of the copy are written and never read: a few percent
        /// of the model, kept for the single layout.
        weights: CudaSlice<bf16>,
        acts: CudaSlice<bf16>, // activations + backward scratch in bf16
    },
}

impl CudaTrainer {
    /// Uploads `model`'s parameter arena in one copy (and rounds it to the bf16 copy for
    /// `DType::Bf16`); gradients and moments start at zero.
    pub fn new(rt: Arc<CudaRuntime>, model: &BertModel<f32>, dtype: DType) -> Result<CudaTrainer> {
        let total = model.layout.total;
        let mut decay_runs: Vec<(Range<usize>, bool)> = Vec::new();
        for spec in &model.layout.tensors {
            match decay_runs.last_mut() {
                Some((range, decay)) if *decay == spec.decay && range.end == spec.offset => {
                    range.end = spec.range().end;
                }
                _ => decay_runs.push((spec.range(), spec.decay)),
            }
        }
        let params = rt.upload(&model.params)?;
        let precision = match dtype {
            DType::F32 => Precision::F32 { acts: rt.zeros(1)? },
            DType::Bf16 => {
                let mut weights = rt.zeros::<bf16>(total)?;
                rt.cast_f32_to_bf16(&mut weights, &params)?;
                Precision::Bf16 {
                    weights,
                    acts: rt.zeros(1)?,
                }
            }
        };
        Ok(CudaTrainer {
            params,
            grads: rt.zeros(total)?,
            m: rt.zeros(total)?,
            v: rt.zeros(total)?,
            precision,
            acts_f32: rt.zeros(1)?,
            config: model.config.clone(),
            layout: model.layout.clone(),
            decay_runs,
            rt,
        })
    }

    pub fn runtime(&self) -> &Arc<CudaRuntime> {
        &self.rt
    }

    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// The activation type this trainer computes in.
    pub fn dtype(&self) -> DType {
        match self.precision {
            Precision::F32 { .. } => DType::F32,
            Precision::Bf16 { .. } => DType::Bf16,
        }
    }

    /// Replaces the parameters (e.g. from a checkpoint) in one copy, and their bf16 copy.
    pub fn upload_params(&mut self, params: &[f32]) -> Result<()> {
        self.check_arena("parameters", params.len())?;
        self.rt
            .stream()
            .memcpy_htod(params, &mut self.params)
            .map_err(driver("upload the parameters"))?;
        if let Precision::Bf16 { weights, .. } = &mut self.precision {
            self.rt.cast_f32_to_bf16(weights, &self.params)?;
        }
        Ok(())
    }

    /// Replaces the AdamW moments (resuming from a checkpoint).
    pub fn upload_moments(&mut self, m: &[f32], v: &[f32]) -> Result<()> {
        self.check_arena("first moments", m.len())?;
        self.check_arena("second moments", v.len())?;
        let stream = self.rt.stream();
        stream
            .memcpy_htod(m, &mut self.m)
            .map_err(driver("upload the first moments"))?;
        stream
            .memcpy_htod(v, &mut self.v)
            .map_err(driver("upload the second moments"))
    }

    /// The fp32 master parameters in `ParamLayout` order (for a checkpoint).
    pub fn download_params(&self) -> Result<Vec<f32>> {
        self.rt.download(&self.params)
    }

    /// The parameters as the encoder's GEMMs read them, as f32: the master weights for
    /// f32, their bf16 copy widened for bf16.
    pub fn download_gemm_weights(&self) -> Result<Vec<f32>> {
        match &self.precision {
            Precision::F32 { .. } => self.download_params(),
            Precision::Bf16 { weights, .. } => Ok(self
                .rt
                .download(weights)?
                .into_iter()
                .map(f32::from)
                .collect()),
        }
    }

    /// The gradients of the last step (left in place after the update).
    pub fn download_grads(&self) -> Result<Vec<f32>> {
        self.rt.download(&self.grads)
    }

    /// The AdamW moments (m, v).
    pub fn download_moments(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((self.rt.download(&self.m)?, self.rt.download(&self.v)?))
    }

    fn check_arena(&self, what: &str, len: usize) -> Result<()> {
        if len == self.layout.total {
            Ok(())
        } else {
            Err(Error::internal(format!(
                "CUDA model: {len} {what} for a layout of {}",
                self.layout.total
            )))
        }
    }

    /// Grows the activation arenas to hold a batch of b x t.
    fn reserve(&mut self, b: usize, t: usize) -> Result<()> {
        let (typed, fp32) = arena_lens(&self.config, b, t);
        let bytes = match self.precision {
            Precision::F32 { .. } => 4 * typed + 4 * fp32,
            Precision::Bf16 { .. } => 2 * typed + 4 * fp32,
        };
        let need = |e: Error| {
            Error::internal(format!(
                "{e} (the activations of {b} sequences of {t} tokens need {:.2} GiB)",
                bytes as f64 / (1u64 << 30) as f64
            ))
        };
        let rt = &self.rt;
        match &mut self.precision {
            Precision::F32 { acts } => grow(rt, acts, typed).map_err(need)?,
            Precision::Bf16 { acts, .. } => grow(rt, acts, typed).map_err(need)?,
        }
        grow(rt, &mut self.acts_f32, fp32).map_err(need)
    }

    /// The forward pass alone; returns the logits [B]. With `dropout`, training mode.
    pub fn forward(&mut self, batch: &Batch, dropout: Option<Dropout>) -> Result<Vec<f32>> {
        let device_batch = DeviceBatch::new(&self.rt, &self.config, batch)?;
        self.reserve(batch.b, batch.t)?;
        let (rt, cfg) = (&self.rt, &self.config);
        let master = device_params(cfg, self.params.as_view())?;
        let fp32 = self.acts_f32.as_view_mut();
        match &mut self.precision {
            Precision::F32 { acts } => {
                let w = Weights {
                    gemm: device_params(cfg, self.params.as_view())?,
                    master,
                };
                let (mut a, _) = carve_arena(cfg, acts.as_view_mut(), fp32, batch.b, batch.t)?;
                forward(rt, cfg, &w, &mut a, &device_batch, dropout)?;
                download_logits(rt, &a.logits)
            }
            Precision::Bf16 { weights, acts } => {
                let w = Weights {
                    gemm: device_params(cfg, weights.as_view())?,
                    master,
                };
                let (mut a, _) = carve_arena(cfg, acts.as_view_mut(), fp32, batch.b, batch.t)?;
                forward(rt, cfg, &w, &mut a, &device_batch, dropout)?;
                download_logits(rt, &a.logits)
            }
        }
    }

    /// Zeroes the gradient arena (the start of a step).
    pub fn zero_grads(&mut self) -> Result<()> {
        self.rt
            .stream()
            .memset_zeros(&mut self.grads)
            .map_err(driver("zero the gradients"))
    }

    /// Forward, the fused ranking loss and backward of one micro-batch: adds its gradient,
    /// divided by `micro_batches` (gradient accumulation, as the CPU loop), into the
    /// gradient arena. Returns the micro-batch's mean pair loss.
    pub fn accumulate(
        &mut self,
        micro: &MicroBatch<'_>,
        loss: &LossSpec,
        eps: f64,
        micro_batches: usize,
    ) -> Result<f64> {
        let batch = micro.batch;
        let device_batch = DeviceBatch::new(&self.rt, &self.config, batch)?;
        let ranking = RankingBatch::new(&self.rt, micro.ks, micro.types, loss)?;
        self.reserve(batch.b, batch.t)?;
        let (rt, cfg) = (&self.rt, &self.config);
        let master = device_params(cfg, self.params.as_view())?;
        let mut g = device_params(cfg, self.grads.as_view_mut())?;
        let fp32 = self.acts_f32.as_view_mut();
        let job = Accumulate {
            batch: &device_batch,
            ranking: &ranking,
            dropout: micro.dropout,
            eps,
            micro_batches,
        };
        match &mut self.precision {
            Precision::F32 { acts } => {
                let w = Weights {
                    gemm: device_params(cfg, self.params.as_view())?,
                    master,
                };
                let views = carve_arena(cfg, acts.as_view_mut(), fp32, batch.b, batch.t)?;
                job.run(rt, cfg, &w, &mut g, views)
            }
            Precision::Bf16 { weights, acts } => {
                let w = Weights {
                    gemm: device_params(cfg, weights.as_view())?,
                    master,
                };
                let views = carve_arena(cfg, acts.as_view_mut(), fp32, batch.b, batch.t)?;
                job.run(rt, cfg, &w, &mut g, views)
            }
        }
    }

    /// The global gradient norm, then (when finite) clipping and AdamW on the fp32 master
    /// weights, which also refreshes their bf16 copy for bf16. Returns the norm before
    /// clipping; a non-finite norm leaves the parameters untouched.
    pub fn clip_and_update(&mut self, opt: &OptimStep) -> Result<f64> {
        let norm = self.rt.global_norm_squared(&[&self.grads])?.sqrt();
        if !norm.is_finite() {
            return Ok(norm);
        }
        // torch.nn.utils.clip_grad_norm_'s factor.
        let clip = (opt.max_grad_norm / (norm + 1e-6)).min(1.0);
        for (range, decay) in &self.decay_runs {
            let hp = AdamWStep {
                step: opt.step,
                lr: opt.lr,
                beta1: opt.beta1,
                beta2: opt.beta2,
                eps: opt.eps,
                weight_decay: if *decay { opt.weight_decay } else { 0.0 },
                grad_scale: clip,
            };
            let params = &mut self.params.slice_mut(range.clone());
            let grads = &self.grads.slice(range.clone());
            let m = &mut self.m.slice_mut(range.clone());
            let v = &mut self.v.slice_mut(range.clone());
            match &mut self.precision {
                Precision::F32 { .. } => self.rt.adamw_update(params, grads, m, v, &hp)?,
                Precision::Bf16 { weights, .. } => self.rt.adamw_update_bf16_copy(
                    params,
                    &mut weights.slice_mut(range.clone()),
                    grads,
                    m,
                    v,
                    &hp,
                )?,
            }
        }
        Ok(norm)
    }
}

/// Replaces `arena` with a zeroed one of `len` elements when it is smaller.
fn grow<E: Activation>(rt: &CudaRuntime, arena: &mut CudaSlice<E>, len: usize) -> Result<()> {
    if arena.len() < len {
        // Free the old arena first: the new one may need most of the device.
        *arena = rt.zeros(1)?;
        *arena = rt.zeros(len)?;
    }
    Ok(())
}

fn download_logits(rt: &CudaRuntime, logits: &CudaViewMut<'_, f32>) -> Result<Vec<f32>> {
    rt.stream()
        .clone_dtoh(logits)
        .map_err(driver("copy the logits to the host"))
}

/// One micro-batch's forward, loss and backward, whatever the activation type.
struct Accumulate<'a> {
    batch: &'a DeviceBatch,
    ranking: &'a RankingBatch,
    dropout: Option<Dropout>,
    eps: f64,
    micro_batches: usize,
}

impl Accumulate<'_> {
    fn run<T: ModelFloat>(
        &self,
        rt: &CudaRuntime,
        cfg: &BertConfig,
        w: &Weights<'_, T>,
        g: &mut Params<CudaViewMut<'_, f32>>,
        (mut a, mut s): ActViews<'_, T>,
    ) -> Result<f64> {
        forward(rt, cfg, w, &mut a, self.batch, self.dropout)?;
        let value =
            rt.ranking_loss_forward_backward(&mut s.dlogits, &a.logits, self.ranking, self.eps)?;
        if self.micro_batches > 1 {
            // As the CPU loop: the f32 dlogits divided by the count (B values: a round
            // trip through the host costs less than a kernel of its own).
            let mut dlogits = rt
                .stream()
                .clone_dtoh(&s.dlogits)
                .map_err(driver("copy dlogits to the host"))?;
            for d in dlogits.iter_mut() {
                *d /= self.micro_batches as f32;
            }
            rt.stream()
                .memcpy_htod(&dlogits, &mut s.dlogits)
                .map_err(driver("copy dlogits to the device"))?;
        }
        backward(rt, cfg, w, g, &a, &mut s, self.batch, self.dropout)?;
        Ok(value)
    }
}

/// One optimizer step on the device, src/train.rs's loop body: zero the gradients, for
/// every micro-batch forward + loss + backward (accumulating), then the global norm,
/// clipping and AdamW. Only the loss and the norm come back. A non-finite loss or norm
/// leaves the parameters as they were; the caller stops as the CPU loop does.
pub fn train_step_cuda(
    trainer: &mut CudaTrainer,
    micro_batches: &[MicroBatch<'_>],
    loss: &LossSpec,
    eps: f64,
    opt: &OptimStep,
) -> Result<StepStats> {
    if micro_batches.is_empty() {
        return Err(Error::internal("train_step_cuda: no micro-batch"));
    }
    trainer.zero_grads()?;
    let mut step_loss = 0.0;
    for micro in micro_batches {
        let value = trainer.accumulate(micro, loss, eps, micro_batches.len())?;
        step_loss += value / micro_batches.len() as f64;
    }
    if !step_loss.is_finite() {
        return Ok(StepStats {
            loss: step_loss,
            grad_norm: f64::NAN,
        });
    }
    let grad_norm = trainer.clip_and_update(opt)?;
    Ok(StepStats {
        loss: step_loss,
        grad_norm,
    })
}
