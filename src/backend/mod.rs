//! Compute backends, and `Backend`: the ops a model is written in. A model (src/models/)
//! names its tensors by `Buf` handles into the backend's arenas and calls these ops; each
//! backend owns the memory and runs them: `cpu::Cpu` on the host (the numerical reference,
//! generic over `Float`: f32 to train, f64 for the gradient checks), `cuda::Cuda` on the GPU
//! (f32, or bf16 activations with fp32 master weights). Nothing here knows what a layer is.
//!
//! Conventions for every op: shapes are row-major and written beside every argument (N rows
//! of C channels, B sequences of T tokens, NH heads of HS channels); forward outputs are
//! overwritten; every backward ADDS (+=) into its gradient outputs (the model zeroes them);
//! a buffer an op writes never overlaps another buffer of the same call (checked).

mod arena;
pub mod cpu;
pub mod cuda;
pub mod placement;

pub use placement::{DType, Device};

use std::ops::Range;

pub use crate::data::Batch;
pub use crate::float::Float;
pub use arena::{Arena, Buf, Carver, span};
pub use cpu::AttentionDropout;

use crate::error::Result;
use crate::loss::{LossExtras, LossSpec, PromptType};

/// B sequences of T tokens, NH heads of HS channels: the attention's dimensions.
#[derive(Clone, Copy, Debug)]
pub struct AttentionDims {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub hs: usize,
}

/// The position terms of a disentangled attention: the content-by-position products
/// [B, NH, T, rows] of the terms the model has (`pos_att_type`), or their gradients.
#[derive(Clone, Copy, Debug)]
pub struct PositionBufs {
    pub c2p: Option<Buf>,
    pub p2c: Option<Buf>,
    pub rows: usize,
}

/// B sequences of T tokens, NH query heads over NKV key/value heads (NH a multiple of NKV:
/// grouped-query attention), HS channels per head: the causal attention's dimensions. TP:
/// the tokens per prompt of a shared prefix the sequences continue (0 without one).
#[derive(Clone, Copy, Debug)]
pub struct CausalDims {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hs: usize,
    pub tp: usize,
}

/// The shared prefix of a causal attention: the keys and values of the P prompts that the
/// B sequences continue, each prompt run once for all its completions. Sequence s continues
/// prompt `of_sequence[s]` (`Batch::of_sequence` of the sequences' batch).
#[derive(Clone, Copy, Debug)]
pub struct SharedPrefix<'a, T> {
    /// [P, TP, NKV·HS] each: the prompts' keys (rotated) and values.
    pub k: Buf,
    pub v: Buf,
    /// The prompts' tokens: their padding mask [P, TP].
    pub prompts: &'a T,
}

/// The optimizer settings of one step (torch.optim.AdamW's, and clip_grad_norm_'s bound).
#[derive(Clone, Copy, Debug)]
pub struct OptimStep {
    /// Counts from 1.
    pub step: u64,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Applied only to the ranges the model marks for decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (torch.nn.utils.clip_grad_norm_).
    pub max_grad_norm: f64,
}

impl OptimStep {
    /// torch's clip_grad_norm_ factor for a gradient of norm `grad_norm`.
    pub fn clip_factor(&self, grad_norm: f64) -> f64 {
        (self.max_grad_norm / (grad_norm + 1e-6)).min(1.0)
    }
}

/// The ops a model is written in, over the arenas the backend owns.
pub trait Backend {
    /// A batch's token ids, types and padding mask, as the ops read them.
    type Tokens;
    /// The element of the parameter, gradient and moment arenas as the host sees them.
    type Scalar: Float;
    /// Whether the parameters and moments live in host memory, so that checking them
    /// costs no copy.
    const HOST_RESIDENT: bool;

    /// "cpu (2 threads)", "cuda (NVIDIA H200, bf16)".
    fn describe(&self) -> String;

    // ---- memory ----

    /// Grows the activation arenas to at least `acts` and `stats` elements.
    fn reserve(&mut self, acts: usize, stats: usize) -> Result<()>;
    /// A batch's tokens for the ops; the ids must already be checked against `tables`
    /// (vocabulary, positions, token types).
    fn tokens(&mut self, batch: &Batch, tables: (usize, usize, usize)) -> Result<Self::Tokens>;
    /// buf = 0.
    fn zero(&mut self, buf: Buf) -> Result<()>;
    /// dst = src, converting between the activation type and fp32 when the arenas differ.
    fn copy(&mut self, dst: Buf, src: Buf) -> Result<()>;
    /// A Stats buffer (logits, pooled outputs) on the host.
    fn read_stats(&self, buf: Buf) -> Result<Vec<Self::Scalar>>;
    /// An Acts buffer on the host, widened to the host type (hidden states, for parity).
    fn read_acts(&self, buf: Buf) -> Result<Vec<Self::Scalar>>;
    /// A Stats buffer written from the host (the logits' gradient in checks).
    fn write_stats(&mut self, buf: Buf, values: &[Self::Scalar]) -> Result<()>;

    // ---- ops ----

    /// out [B, T, C] = wte[ids] + wpe[position] + wtt[types].
    #[allow(clippy::too_many_arguments)]
    fn embedding_forward(
        &mut self,
        out: Buf,
        tokens: &Self::Tokens,
        wte: Buf,
        wpe: Buf,
        wtt: Buf,
        c: usize,
    ) -> Result<()>;
    /// The tables' gradients from dout [B, T, C].
    #[allow(clippy::too_many_arguments)]
    fn embedding_backward(
        &mut self,
        dwte: Buf,
        dwpe: Buf,
        dwtt: Buf,
        dout: Buf,
        tokens: &Self::Tokens,
        c: usize,
    ) -> Result<()>;

    /// out [N, C] = LayerNorm(x) with weight, bias [C]; saves mean, rstd [N].
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &mut self,
        out: Buf,
        mean: Buf,
        rstd: Buf,
        x: Buf,
        weight: Buf,
        bias: Buf,
        n: usize,
        c: usize,
        eps: f64,
    ) -> Result<()>;
    /// sum [N, C] = a + b, then out = LayerNorm(sum) as `layernorm_forward`.
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_forward(
        &mut self,
        out: Buf,
        sum: Buf,
        mean: Buf,
        rstd: Buf,
        a: Buf,
        b: Buf,
        weight: Buf,
        bias: Buf,
        n: usize,
        c: usize,
        eps: f64,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &mut self,
        dx: Buf,
        dweight: Buf,
        dbias: Buf,
        dout: Buf,
        x: Buf,
        weight: Buf,
        mean: Buf,
        rstd: Buf,
        n: usize,
        c: usize,
    ) -> Result<()>;

    /// out [N, OC] = x [N, C] · weightᵀ [OC, C] + bias [OC].
    #[allow(clippy::too_many_arguments)]
    fn matmul_forward(
        &mut self,
        out: Buf,
        x: Buf,
        weight: Buf,
        bias: Option<Buf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward(
        &mut self,
        dx: Buf,
        dweight: Buf,
        dbias: Option<Buf>,
        dout: Buf,
        x: Buf,
        weight: Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()>;
    /// out [N, OC] = GELU(x · weightᵀ + bias); `pre` [N, OC] keeps what the backward needs
    /// (the product, with or without the bias as the backend fuses it).
    #[allow(clippy::too_many_arguments)]
    fn matmul_gelu_forward(
        &mut self,
        out: Buf,
        pre: Buf,
        x: Buf,
        weight: Buf,
        bias: Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()>;
    /// `dpre` [N, OC] is scratch (zeroed here).
    #[allow(clippy::too_many_arguments)]
    fn matmul_gelu_backward(
        &mut self,
        dx: Buf,
        dweight: Buf,
        dbias: Buf,
        dpre: Buf,
        dout: Buf,
        pre: Buf,
        x: Buf,
        weight: Buf,
        bias: Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()>;

    /// out = tanh(x).
    fn tanh_forward(&mut self, out: Buf, x: Buf) -> Result<()>;
    /// dx += (1 - out²) dout.
    fn tanh_backward(&mut self, dx: Buf, out: Buf, dout: Buf) -> Result<()>;

    /// out = x with each element zeroed with probability p and the rest scaled by
    /// 1 / (1 - p), the mask drawn from `seed` (p = 0 copies).
    fn dropout_forward(&mut self, out: Buf, x: Buf, p: f64, seed: u64) -> Result<()>;
    fn dropout_backward(&mut self, dx: Buf, dout: Buf, p: f64, seed: u64) -> Result<()>;

    /// Elements (Stats) the attention saves for its backward, and of its backward's scratch.
    fn attention_saved_len(&self, dims: AttentionDims) -> usize;
    fn attention_scratch_len(&self, dims: AttentionDims) -> usize;
    /// ctx [B, T, NH·HS] = softmax(q kᵀ / sqrt(HS), padding keys masked) v, per head, with
    /// dropout on the probabilities; q, k, v [B, T, NH·HS].
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &mut self,
        ctx: Buf,
        saved: Buf,
        q: Buf,
        k: Buf,
        v: Buf,
        tokens: &Self::Tokens,
        dims: AttentionDims,
        dropout: Option<AttentionDropout>,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &mut self,
        dq: Buf,
        dk: Buf,
        dv: Buf,
        scratch: Buf,
        dctx: Buf,
        ctx: Buf,
        q: Buf,
        k: Buf,
        v: Buf,
        saved: Buf,
        tokens: &Self::Tokens,
        dims: AttentionDims,
        dropout: Option<AttentionDropout>,
    ) -> Result<()>;

    /// out [B, C] = x[:, 0, :] of x [B, T, C]: the first token of each sequence.
    fn cls_pool_forward(&mut self, out: Buf, x: Buf, b: usize, t: usize, c: usize) -> Result<()>;
    fn cls_pool_backward(&mut self, dx: Buf, dout: Buf, b: usize, t: usize, c: usize)
    -> Result<()>;

    // ---- decoder ops (Llama, Mistral, Qwen2) ----

    /// out [B, T, C] = wte[ids]: the token table alone (positions enter through RoPE).
    fn token_embedding_forward(
        &mut self,
        out: Buf,
        tokens: &Self::Tokens,
        wte: Buf,
        c: usize,
    ) -> Result<()>;
    /// dwte [V, C] += the scatter of dout [B, T, C] to the tokens' rows.
    fn token_embedding_backward(
        &mut self,
        dwte: Buf,
        dout: Buf,
        tokens: &Self::Tokens,
        c: usize,
    ) -> Result<()>;

    /// out [N, C] = weight [C] · x / sqrt(mean(x²) + eps) per row; saves rstd [N] (Stats).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_forward(
        &mut self,
        out: Buf,
        rstd: Buf,
        x: Buf,
        weight: Buf,
        n: usize,
        c: usize,
        eps: f64,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &mut self,
        dx: Buf,
        dweight: Buf,
        dout: Buf,
        x: Buf,
        weight: Buf,
        rstd: Buf,
        n: usize,
        c: usize,
    ) -> Result<()>;

    /// cos, sin [N, HS/2] (Stats) of the angles positions[i] · inv_freq[j] (`rope_inv_freq`,
    /// HS/2 frequencies), as transformers' rotary embedding computes them. Positions come
    /// from the model: 0..T per sequence, or offset by a shared prompt's length.
    fn rope_cos_sin(
        &mut self,
        cos: Buf,
        sin: Buf,
        positions: &[u32],
        inv_freq: &[f32],
    ) -> Result<()>;
    /// out [N, heads·HS] = x turned per head by the angles of cos, sin [N, HS/2]
    /// (`rotate_half` layout).
    #[allow(clippy::too_many_arguments)]
    fn rope_forward(
        &mut self,
        out: Buf,
        x: Buf,
        cos: Buf,
        sin: Buf,
        n: usize,
        heads: usize,
        hs: usize,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn rope_backward(
        &mut self,
        dx: Buf,
        dout: Buf,
        cos: Buf,
        sin: Buf,
        n: usize,
        heads: usize,
        hs: usize,
    ) -> Result<()>;

    /// out = silu(gate) · up, elementwise.
    fn swiglu_forward(&mut self, out: Buf, gate: Buf, up: Buf) -> Result<()>;
    fn swiglu_backward(
        &mut self,
        dgate: Buf,
        dup: Buf,
        dout: Buf,
        gate: Buf,
        up: Buf,
    ) -> Result<()>;

    /// out = a + b.
    fn residual_forward(&mut self, out: Buf, a: Buf, b: Buf) -> Result<()>;
    /// da += dout; db += dout.
    fn residual_backward(&mut self, da: Buf, db: Buf, dout: Buf) -> Result<()>;

    /// Elements (Stats) the causal attention saves for its backward, and of its backward's
    /// scratch.
    fn causal_attention_saved_len(&self, dims: CausalDims) -> usize;
    fn causal_attention_scratch_len(&self, dims: CausalDims) -> usize;
    /// ctx [B, T, NH·HS] = softmax(q kᵀ / sqrt(HS)) v per query head, query i attending to
    /// the real keys j <= i of its own sequence, k and v those of the head's group;
    /// q [B, T, NH·HS], k, v [B, T, NKV·HS] (rotated already). Dropout on the probabilities.
    /// With a `prefix` (dims.tp > 0), every query also attends to all the real keys of the
    /// prompt its sequence continues, before its own: as the same tokens would in the whole
    /// sequence prompt + completion.
    #[allow(clippy::too_many_arguments)]
    fn causal_attention_forward(
        &mut self,
        ctx: Buf,
        saved: Buf,
        q: Buf,
        k: Buf,
        v: Buf,
        tokens: &Self::Tokens,
        prefix: Option<SharedPrefix<'_, Self::Tokens>>,
        dims: CausalDims,
        dropout: Option<AttentionDropout>,
    ) -> Result<()>;
    /// dq, dk, dv += the backward; with a prefix, its keys' and values' gradients
    /// `dprefix` ([P, TP, NKV·HS] each) += the sum over every sequence that continues it.
    #[allow(clippy::too_many_arguments)]
    fn causal_attention_backward(
        &mut self,
        dq: Buf,
        dk: Buf,
        dv: Buf,
        dprefix: Option<(Buf, Buf)>,
        scratch: Buf,
        dctx: Buf,
        ctx: Buf,
        q: Buf,
        k: Buf,
        v: Buf,
        saved: Buf,
        tokens: &Self::Tokens,
        prefix: Option<SharedPrefix<'_, Self::Tokens>>,
        dims: CausalDims,
        dropout: Option<AttentionDropout>,
    ) -> Result<()>;

    /// out [B, C] = x[b, rows[b], :] of x [B, T, C]: one token per sequence (a decoder's
    /// last real token). rows [B], each below T.
    fn last_token_pool_forward(
        &mut self,
        out: Buf,
        x: Buf,
        rows: &[u32],
        t: usize,
        c: usize,
    ) -> Result<()>;
    /// dx[b, rows[b], :] += dout [B, C].
    fn last_token_pool_backward(
        &mut self,
        dx: Buf,
        dout: Buf,
        rows: &[u32],
        t: usize,
        c: usize,
    ) -> Result<()>;

    // ---- DeBERTa-v2/v3's disentangled attention ----

    /// out [B, NH, T, R] = per head, x [B, T, NH·HS] times posᵀ, pos [R, NH·HS]: the
    /// content-by-position products (c2p = q · pos_kᵀ, p2c = k · pos_qᵀ).
    fn position_products_forward(
        &mut self,
        out: Buf,
        x: Buf,
        pos: Buf,
        dims: AttentionDims,
        rows: usize,
    ) -> Result<()>;
    /// dx += dout · pos, dpos += Σ_b doutᵀ · x, per head.
    #[allow(clippy::too_many_arguments)]
    fn position_products_backward(
        &mut self,
        dx: Buf,
        dpos: Buf,
        dout: Buf,
        x: Buf,
        pos: Buf,
        dims: AttentionDims,
        rows: usize,
    ) -> Result<()>;
    /// Elements (Stats) the disentangled attention saves for its backward.
    fn disentangled_attention_saved_len(&self, dims: AttentionDims) -> usize;
    /// ctx [B, T, NH·HS] = softmax(scale · (q kᵀ + c2p[i, r_ij] + p2c[j, r_ij]), padding keys
    /// masked) v per head, with dropout on the probabilities; r = `relative` [T, T]
    /// (`cpu::relative_positions`), c2p and p2c [B, NH, T, R] where the model has them.
    #[allow(clippy::too_many_arguments)]
    fn disentangled_attention_forward(
        &mut self,
        ctx: Buf,
        saved: Buf,
        q: Buf,
        k: Buf,
        v: Buf,
        terms: PositionBufs,
        relative: &[u32],
        tokens: &Self::Tokens,
        dims: AttentionDims,
        scale: f64,
        dropout: Option<AttentionDropout>,
    ) -> Result<()>;
    /// dq, dk, dv and the products' gradients `dterms` (shaped as `terms`) += the backward.
    #[allow(clippy::too_many_arguments)]
    fn disentangled_attention_backward(
        &mut self,
        dq: Buf,
        dk: Buf,
        dv: Buf,
        dterms: PositionBufs,
        dctx: Buf,
        q: Buf,
        k: Buf,
        v: Buf,
        terms: PositionBufs,
        saved: Buf,
        relative: &[u32],
        tokens: &Self::Tokens,
        dims: AttentionDims,
        scale: f64,
        dropout: Option<AttentionDropout>,
    ) -> Result<()>;

    /// The all-pairs ranking loss of the logits [sum_p K_p] (prompts contiguous, best
    /// first) and its gradient written into dlogits, divided by `divisor` (the micro-batches
    /// of a step); returns the mean pair loss (with the terms of `extras`, which a backend
    /// may refuse as a user error).
    #[allow(clippy::too_many_arguments)]
    fn ranking_loss(
        &mut self,
        dlogits: Buf,
        logits: Buf,
        ks: &[usize],
        types: &[Option<PromptType>],
        spec: &LossSpec,
        eps: f64,
        extras: &LossExtras,
        divisor: usize,
    ) -> Result<f64>;

    // ---- the optimizer, over the whole parameter arena ----

    /// Allocates the gradient and AdamW moment arenas (zero): scoring needs none of them.
    fn start_training(&mut self) -> Result<()>;
    /// Grads = 0.
    fn zero_grads(&mut self) -> Result<()>;
    /// The backward has finished the gradients of `range` of the gradient arena: nothing
    /// after it in this step adds to them. A data-parallel backend may start summing them
    /// with the other ranks' while the backward goes on (`backend::cuda::buckets`).
    fn grads_final(&mut self, _range: Range<usize>) -> Result<()> {
        Ok(())
    }
    /// The global gradient norm (before clipping).
    fn grad_norm(&mut self) -> Result<f64>;
    /// AdamW on every parameter with the gradients scaled by `grad_scale` (the clip factor):
    /// one range per tensor of the layout, weight decay only on those marked true.
    fn adamw_update(
        &mut self,
        tensors: &[(Range<usize>, bool)],
        opt: &OptimStep,
        grad_scale: f64,
    ) -> Result<()>;

    // ---- the parameter-shaped arenas on the host (checkpoints) ----

    fn upload_params(&mut self, params: &[f32]) -> Result<()>;
    fn upload_moments(&mut self, m: &[f32], v: &[f32]) -> Result<()>;
    /// f(params, first moments, second moments), in the parameter layout.
    fn with_state<R>(
        &self,
        f: impl FnOnce(&[Self::Scalar], &[Self::Scalar], &[Self::Scalar]) -> R,
    ) -> Result<R>;
    fn download_grads(&self) -> Result<Vec<Self::Scalar>>;
}
