//! BERT as a reward model: Hugging Face's BertForSequenceClassification with one label,
//! forward and backward written once, layer by layer, over the `Backend` ops, so the same
//! code runs on the CPU (f32, f64) and the GPU (f32, bf16). Parameters are named by `Buf`s
//! into the backend's parameter arena (laid out by `ParamLayout::new`), activations by
//! `Buf`s into its activation arenas (laid out by `ActLayout::new` for each batch shape).
//!
//! Notation: B sequences of T tokens (N = B*T rows), C hidden, NH heads of HS = C/NH
//! channels, I the feed-forward width, V the vocabulary, P the positions.

use std::ops::Range;

use super::encoder::{
    FfnActs, FfnBranch, FfnDims, FfnParams, FfnScratch, encoder_ffn_backward, encoder_ffn_forward,
};
use super::{Dropout, ParamLayout, SITE_EMB, SITE_POOL, TensorSpec, attention_dropout, site_seed};
use crate::backend::{Arena, AttentionDims, Backend, Buf, Carver, span};
use crate::error::{Error, Result};

/// The architecture, as Hugging Face's BertConfig names it.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    /// The padding token: its word-embedding row starts at zero and gets no gradient, as
    /// `nn.Embedding(padding_idx=...)` in Hugging Face's BERT.
    pub pad_token_id: u32,
}

impl BertConfig {
    /// The from-scratch architectures rcx knows by name (the sizes of Google's small BERTs).
    pub fn named(name: &str) -> Option<BertConfig> {
        let (layers, hidden, heads) = match name {
            "bert-tiny" => (2, 128, 2),
            "bert-mini" => (4, 256, 4),
            "bert-small" => (4, 512, 8),
            "bert-medium" => (8, 512, 8),
            "bert-base" => (12, 768, 12),
            _ => return None,
        };
        Some(BertConfig {
            vocab_size: 30522,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: 4 * hidden,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            pad_token_id: 0,
        })
    }

    pub const NAMES: &'static [&'static str] = &[
        "bert-tiny",
        "bert-mini",
        "bert-small",
        "bert-medium",
        "bert-base",
    ];

    pub fn head_size(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The most parameters a model may have: 16 GiB of f32 weights, 64 GiB with the
    /// gradients and moments of training. Far above any BERT, far below what a corrupt
    /// config.json asks for.
    pub const MAX_PARAMETERS: usize = 1 << 32;

    /// The most encoder layers (BERT-large has 24): bounds the layout's list of tensors.
    pub const MAX_LAYERS: usize = 1024;

    /// Rejects shapes the ops cannot run and sizes rcx cannot hold (a user may hand us any
    /// config.json), before anything is allocated from them.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(Error::user(format!("{origin}: `{key}` must be positive")));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::user(format!(
                "{origin}: `hidden_size` ({}) must be a multiple of `num_attention_heads` ({})",
                self.hidden_size, self.num_attention_heads
            )));
        }
        for (key, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::user(format!(
                    "{origin}: `{key}` must be in [0, 1), got {p}"
                )));
            }
        }
        if self.pad_token_id as usize >= self.vocab_size {
            return Err(Error::user(format!(
                "{origin}: `pad_token_id` ({}) must be below `vocab_size` ({})",
                self.pad_token_id, self.vocab_size
            )));
        }
        self.check_sizes(origin)
    }

    /// Checks, in overflow-checked arithmetic, that the parameters fit in
    /// [`Self::MAX_PARAMETERS`]. Each key is first checked alone, by the largest tensor it
    /// sizes, so that the error blames the key that is out of range.
    fn check_sizes(&self, origin: &str) -> Result<()> {
        let (h, i, layers) = (
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
        );
        let max = Self::MAX_PARAMETERS;
        let at_most = format!("rcx holds at most {max} parameters ({})", f32_bytes(max));
        let too_large = |key: &str, value: usize, what: &str, needed: Option<usize>, limit| {
            let needed = needed.map_or_else(
                || format!("more than {} values", usize::MAX),
                |n| format!("{n} values ({})", f32_bytes(n)),
            );
            Error::user(format!(
                "{origin}: `{key}` = {value} is too large: {what} would need {needed}; {limit}"
            ))
        };
        let matrix = |rows: usize, cols: usize| rows.checked_mul(cols);
        for (key, value, what, needed) in [
            ("hidden_size", h, "an attention projection", matrix(h, h)),
            (
                "vocab_size",
                self.vocab_size,
                "the word embeddings",
                matrix(self.vocab_size, h),
            ),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                "the position embeddings",
                matrix(self.max_position_embeddings, h),
            ),
            (
                "type_vocab_size",
                self.type_vocab_size,
                "the token type embeddings",
                matrix(self.type_vocab_size, h),
            ),
            (
                "intermediate_size",
                i,
                "a feed-forward weight",
                matrix(i, h),
            ),
        ] {
            if needed.is_none_or(|n| n > max) {
                let what = format!("{what} [{value}, {h}]");
                return Err(too_large(key, value, &what, needed, at_most.clone()));
            }
        }
        // Per layer: four [H, H] attention projections, the [I, H] and [H, I] feed-forward
        // weights, and the biases and LayerNorms beside them.
        let per_layer = matrix(h, h)
            .and_then(|hh| hh.checked_mul(4))
            .and_then(|attn| matrix(i, h)?.checked_mul(2)?.checked_add(attn))
            .and_then(|weights| weights.checked_add(h.checked_mul(9)?.checked_add(i)?));
        let encoder = per_layer.and_then(|n| n.checked_mul(layers));
        let what = format!("{layers} encoder layers");
        if layers > Self::MAX_LAYERS {
            let limit = format!("rcx builds at most {} layers", Self::MAX_LAYERS);
            return Err(too_large(
                "num_hidden_layers",
                layers,
                &what,
                encoder,
                limit,
            ));
        }
        if encoder.is_none_or(|n| n > max) {
            return Err(too_large(
                "num_hidden_layers",
                layers,
                &what,
                encoder,
                at_most,
            ));
        }
        // Each part fits, so the layout's arithmetic cannot overflow; the whole may still
        // be too large, and the key of its largest part is blamed.
        let total = ParamLayout::new(self).total;
        if total > max {
            let (key, value) = [
                ("vocab_size", self.vocab_size, self.vocab_size * h),
                (
                    "max_position_embeddings",
                    self.max_position_embeddings,
                    self.max_position_embeddings * h,
                ),
                (
                    "type_vocab_size",
                    self.type_vocab_size,
                    self.type_vocab_size * h,
                ),
                ("num_hidden_layers", layers, encoder.unwrap_or(0)),
            ]
            .into_iter()
            .max_by_key(|&(_, _, part)| part)
            .map_or(("num_hidden_layers", layers), |(key, value, _)| {
                (key, value)
            });
            return Err(too_large(
                key,
                value,
                "the whole model",
                Some(total),
                at_most,
            ));
        }
        Ok(())
    }
}

/// `n` f32 values as a human size: "1.2 GB".
fn f32_bytes(n: usize) -> String {
    let bytes = n as f64 * 4.0;
    let (value, unit) = [(1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")]
        .into_iter()
        .find(|&(scale, _)| bytes >= scale)
        .map_or((bytes, "bytes"), |(scale, unit)| (bytes / scale, unit));
    format!("{value:.1} {unit} as f32")
}

impl ParamLayout {
    /// Every tensor of BertForSequenceClassification, in a fixed order.
    pub fn new(cfg: &BertConfig) -> ParamLayout {
        let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mut tensors = Vec::new();
        let mut total = 0;
        let mut add = |name: String, shape: Vec<usize>| {
            let decay = shape.len() == 2 && !name.contains("LayerNorm");
            let spec = TensorSpec {
                name,
                shape,
                offset: total,
                decay,
            };
            total += spec.len();
            tensors.push(spec);
        };
        let e = "bert.embeddings";
        add(
            format!("{e}.word_embeddings.weight"),
            vec![cfg.vocab_size, c],
        );
        add(
            format!("{e}.position_embeddings.weight"),
            vec![cfg.max_position_embeddings, c],
        );
        add(
            format!("{e}.token_type_embeddings.weight"),
            vec![cfg.type_vocab_size, c],
        );
        add(format!("{e}.LayerNorm.weight"), vec![c]);
        add(format!("{e}.LayerNorm.bias"), vec![c]);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("bert.encoder.layer.{l}");
            for (name, out_dim, in_dim) in [
                ("attention.self.query", c, c),
                ("attention.self.key", c, c),
                ("attention.self.value", c, c),
                ("attention.output.dense", c, c),
            ] {
                add(format!("{p}.{name}.weight"), vec![out_dim, in_dim]);
                add(format!("{p}.{name}.bias"), vec![out_dim]);
            }
            add(format!("{p}.attention.output.LayerNorm.weight"), vec![c]);
            add(format!("{p}.attention.output.LayerNorm.bias"), vec![c]);
            add(format!("{p}.intermediate.dense.weight"), vec![i, c]);
            add(format!("{p}.intermediate.dense.bias"), vec![i]);
            add(format!("{p}.output.dense.weight"), vec![c, i]);
            add(format!("{p}.output.dense.bias"), vec![c]);
            add(format!("{p}.output.LayerNorm.weight"), vec![c]);
            add(format!("{p}.output.LayerNorm.bias"), vec![c]);
        }
        add("bert.pooler.dense.weight".into(), vec![c, c]);
        add("bert.pooler.dense.bias".into(), vec![c]);
        add("classifier.weight".into(), vec![1, c]);
        add("classifier.bias".into(), vec![1]);
        ParamLayout { tensors, total }
    }
}

/// The parameters of one encoder layer, as buffers of the parameter arena (or, moved with
/// `Buf::in_arena`, of the gradient arena).
#[derive(Clone, Copy)]
struct LayerParams {
    q_w: Buf,       // [C, C]
    q_b: Buf,       // [C]
    k_w: Buf,       // [C, C]
    k_b: Buf,       // [C]
    v_w: Buf,       // [C, C]
    v_b: Buf,       // [C]
    ffn: FfnParams, // the attention output's dense, LayerNorms, feed-forward
}

impl LayerParams {
    /// The layer's range of its arena.
    fn span(&self) -> Result<Range<usize>> {
        let own = [self.q_w, self.q_b, self.k_w, self.k_b, self.v_w, self.v_b];
        span(own.into_iter().chain(self.ffn.bufs()))
    }
}

/// All parameters in the order of `ParamLayout::new`.
struct Params {
    wte: Buf,      // [V, C]
    wpe: Buf,      // [P, C]
    wtt: Buf,      // [types, C]
    emb_ln_w: Buf, // [C]
    emb_ln_b: Buf, // [C]
    layers: Vec<LayerParams>,
    pool_w: Buf, // [C, C]
    pool_b: Buf, // [C]
    head_w: Buf, // [1, C]
    head_b: Buf, // [1]
}

impl Params {
    /// The parameter-shaped arena `arena` (parameters or gradients) as named buffers.
    fn new(cfg: &BertConfig, arena: Arena) -> Params {
        let (v, c, i) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
        let mut k = Carver::new(arena);
        let wte = k.take(v * c);
        let wpe = k.take(cfg.max_position_embeddings * c);
        let wtt = k.take(cfg.type_vocab_size * c);
        let emb_ln_w = k.take(c);
        let emb_ln_b = k.take(c);
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| LayerParams {
                q_w: k.take(c * c),
                q_b: k.take(c),
                k_w: k.take(c * c),
                k_b: k.take(c),
                v_w: k.take(c * c),
                v_b: k.take(c),
                // In the layout's order.
                ffn: FfnParams {
                    o_w: k.take(c * c),
                    o_b: k.take(c),
                    ln1_w: k.take(c),
                    ln1_b: k.take(c),
                    ffn1_w: k.take(i * c),
                    ffn1_b: k.take(i),
                    ffn2_w: k.take(c * i),
                    ffn2_b: k.take(c),
                    ln2_w: k.take(c),
                    ln2_b: k.take(c),
                },
            })
            .collect();
        Params {
            wte,
            wpe,
            wtt,
            emb_ln_w,
            emb_ln_b,
            layers,
            pool_w: k.take(c * c),
            pool_b: k.take(c),
            head_w: k.take(c),
            head_b: k.take(1),
        }
    }
}

/// The activations of one encoder layer saved for backward. The outputs of the attention
/// projection and of the feed-forward block, and their dropouts, are not among them: the
/// backward needs neither (dropout redraws its mask from the seed), so every layer writes
/// them into the shared `Acts::branch`.
struct LayerActs {
    q: Buf,       // [N, C]
    k: Buf,       // [N, C]
    v: Buf,       // [N, C]
    saved: Buf,   // Stats: what the backend's attention keeps for its backward
    ffn: FfnActs, // the attention's output and the block after it, to the layer's output
}

/// The forward's activations: Acts buffers unless marked Stats (fp32 whatever the type).
struct Acts {
    emb: Buf,      // [N, C] word + position + type
    emb_mean: Buf, // Stats [N]
    emb_rstd: Buf, // Stats [N]
    emb_ln: Buf,   // [N, C]
    emb_drop: Buf, // [N, C] input of layer 0
    layers: Vec<LayerActs>,
    branch: FfnBranch, // [N, C] x 2: a layer's attention projection, then its feed-forward output
    cls: Buf,          // [B, C] the first token of the last layer's output
    // The pooler and the head run in fp32: B rows only, and the loss reads fp32 logits.
    pool_in: Buf,     // Stats [B, C] cls
    pool_pre: Buf,    // Stats [B, C]
    pooled: Buf,      // Stats [B, C]
    pooled_drop: Buf, // Stats [B, C]
    logits: Buf,      // Stats [B]
}

/// The backward's buffers, reused by every layer.
struct Scratch {
    d_out: Buf,             // [N, C] gradient of the current layer's output
    d_in: Buf,              // [N, C] gradient of its input, being accumulated
    ffn: FfnScratch,        // the block after the attention, down to d_ctx [N, C]
    d_q: Buf,               // [N, C]
    d_k: Buf,               // [N, C]
    d_v: Buf,               // [N, C]
    d_cls: Buf,             // [B, C]
    attention_scratch: Buf, // Stats: the backend's attention backward scratch
    d_pool: Buf,            // Stats [B, C]
    d_pooled: Buf,          // Stats [B, C]
    d_pool_pre: Buf,        // Stats [B, C]
    d_pool_in: Buf,         // Stats [B, C]
    dlogits: Buf,           // Stats [B]
}

/// Where every activation of a batch of B x T lives, and the arena sizes that needs.
pub struct ActLayout {
    acts: Acts,
    scratch: Scratch,
    b: usize,
    t: usize,
    /// Elements of the Acts and Stats arenas: for the forward alone (evaluation), and
    /// with the backward's scratch after them (training).
    pub forward_lens: (usize, usize),
    pub lens: (usize, usize),
}

impl ActLayout {
    pub fn new<B: Backend>(cfg: &BertConfig, be: &B, b: usize, t: usize) -> ActLayout {
        let ffn_dims = ffn_dims(cfg, b * t);
        let (n, c) = (b * t, cfg.hidden_size);
        let dims = attention_dims(cfg, b, t);
        let mut k = Carver::new(Arena::Acts);
        let mut f = Carver::new(Arena::Stats);
        let emb = k.take(n * c);
        let emb_mean = f.take(n);
        let emb_rstd = f.take(n);
        let emb_ln = k.take(n * c);
        let emb_drop = k.take(n * c);
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| LayerActs {
                q: k.take(n * c),
                k: k.take(n * c),
                v: k.take(n * c),
                saved: f.take(be.attention_saved_len(dims)),
                ffn: FfnActs::carve(&mut k, &mut f, ffn_dims),
            })
            .collect();
        let acts = Acts {
            emb,
            emb_mean,
            emb_rstd,
            emb_ln,
            emb_drop,
            layers,
            branch: FfnBranch {
                out: k.take(n * c),
                dropped: k.take(n * c),
            },
            cls: k.take(b * c),
            pool_in: f.take(b * c),
            pool_pre: f.take(b * c),
            pooled: f.take(b * c),
            pooled_drop: f.take(b * c),
            logits: f.take(b),
        };
        let forward_lens = (k.used(), f.used());
        let scratch = Scratch {
            d_out: k.take(n * c),
            d_in: k.take(n * c),
            ffn: FfnScratch::carve(&mut k, ffn_dims),
            d_q: k.take(n * c),
            d_k: k.take(n * c),
            d_v: k.take(n * c),
            d_cls: k.take(b * c),
            attention_scratch: f.take(be.attention_scratch_len(dims)),
            d_pool: f.take(b * c),
            d_pooled: f.take(b * c),
            d_pool_pre: f.take(b * c),
            d_pool_in: f.take(b * c),
            dlogits: f.take(b),
        };
        ActLayout {
            acts,
            scratch,
            b,
            t,
            forward_lens,
            lens: (k.used(), f.used()),
        }
    }

    /// The logits [B] (Stats).
    /// N = B x T: the token rows of the layout.
    pub fn rows(&self) -> usize {
        self.b * self.t
    }

    pub fn logits(&self) -> Buf {
        self.acts.logits
    }

    /// The logits' gradient [B] (Stats), which `backward` starts from.
    pub fn dlogits(&self) -> Buf {
        self.scratch.dlogits
    }

    /// The encoder's last hidden state [B, T, C] (Acts).
    pub fn last_hidden(&self) -> Buf {
        self.acts
            .layers
            .last()
            .map_or(self.acts.emb_drop, |l| l.ffn.ln2)
    }

    /// The pooler output [B, C] before the head's dropout (Stats).
    pub fn pooled(&self) -> Buf {
        self.acts.pooled
    }
}

/// The sizes of the block after the attention, for `n` rows.
fn ffn_dims(cfg: &BertConfig, n: usize) -> FfnDims {
    FfnDims {
        n,
        c: cfg.hidden_size,
        i: cfg.intermediate_size,
        eps: cfg.layer_norm_eps,
    }
}

fn attention_dims(cfg: &BertConfig, b: usize, t: usize) -> AttentionDims {
    AttentionDims {
        b,
        t,
        nh: cfg.num_attention_heads,
        hs: cfg.head_size(),
    }
}

/// The forward pass on `be`: writes every activation of `l`, the logits last. With
/// `dropout`, training mode.
pub fn forward<B: Backend>(
    cfg: &BertConfig,
    be: &mut B,
    tokens: &B::Tokens,
    l: &ActLayout,
    dropout: Option<Dropout>,
) -> Result<()> {
    let (b, t) = (l.b, l.t);
    let (n, c) = (b * t, cfg.hidden_size);
    let eps = cfg.layer_norm_eps;
    let dims = attention_dims(cfg, b, t);
    let ffn = ffn_dims(cfg, n);
    let p = Params::new(cfg, Arena::Params);
    let a = &l.acts;

    be.embedding_forward(a.emb, tokens, p.wte, p.wpe, p.wtt, c)?;
    be.layernorm_forward(
        a.emb_ln, a.emb_mean, a.emb_rstd, a.emb, p.emb_ln_w, p.emb_ln_b, n, c, eps,
    )?;
    let (pd, seed) = site_seed(dropout, SITE_EMB);
    be.dropout_forward(a.emb_drop, a.emb_ln, pd, seed)?;

    let mut input = a.emb_drop;
    for (layer, (la, lp)) in a.layers.iter().zip(&p.layers).enumerate() {
        be.matmul_forward(la.q, input, lp.q_w, Some(lp.q_b), n, c, c)?;
        be.matmul_forward(la.k, input, lp.k_w, Some(lp.k_b), n, c, c)?;
        be.matmul_forward(la.v, input, lp.v_w, Some(lp.v_b), n, c, c)?;
        let attention_drop = attention_dropout(dropout, layer);
        be.attention_forward(
            la.ffn.ctx,
            la.saved,
            la.q,
            la.k,
            la.v,
            tokens,
            dims,
            attention_drop,
        )?;
        encoder_ffn_forward(be, &lp.ffn, &la.ffn, a.branch, input, ffn, dropout, layer)?;
        input = la.ffn.ln2;
    }

    be.cls_pool_forward(a.cls, input, b, t, c)?;
    be.copy(a.pool_in, a.cls)?;
    be.matmul_forward(a.pool_pre, a.pool_in, p.pool_w, Some(p.pool_b), b, c, c)?;
    be.tanh_forward(a.pooled, a.pool_pre)?;
    let (pd, seed) = site_seed(dropout, SITE_POOL);
    be.dropout_forward(a.pooled_drop, a.pooled, pd, seed)?;
    be.matmul_forward(a.logits, a.pooled_drop, p.head_w, Some(p.head_b), b, c, 1)
}

/// The backward pass of the last `forward` with layout `l` (same tokens, same dropout):
/// adds d loss / d parameter into the gradient arena, given the logits' gradient in
/// `l.dlogits()`.
pub fn backward<B: Backend>(
    cfg: &BertConfig,
    be: &mut B,
    tokens: &B::Tokens,
    l: &ActLayout,
    dropout: Option<Dropout>,
) -> Result<()> {
    let (b, t) = (l.b, l.t);
    let (n, c) = (b * t, cfg.hidden_size);
    let dims = attention_dims(cfg, b, t);
    let ffn = ffn_dims(cfg, n);
    let p = Params::new(cfg, Arena::Params);
    let g = Params::new(cfg, Arena::Grads);
    let (a, s) = (&l.acts, &l.scratch);

    // Head and pooler.
    be.zero(s.d_pool)?;
    be.matmul_backward(
        s.d_pool,
        g.head_w,
        Some(g.head_b),
        s.dlogits,
        a.pooled_drop,
        p.head_w,
        b,
        c,
        1,
    )?;
    be.zero(s.d_pool_pre)?;
    be.zero(s.d_pooled)?;
    let (pd, seed) = site_seed(dropout, SITE_POOL);
    be.dropout_backward(s.d_pooled, s.d_pool, pd, seed)?;
    be.tanh_backward(s.d_pool_pre, a.pooled, s.d_pooled)?;
    be.zero(s.d_pool_in)?;
    be.matmul_backward(
        s.d_pool_in,
        g.pool_w,
        Some(g.pool_b),
        s.d_pool_pre,
        a.pool_in,
        p.pool_w,
        b,
        c,
        c,
    )?;
    be.copy(s.d_cls, s.d_pool_in)?;
    let (mut d_out, mut d_in) = (s.d_out, s.d_in);
    be.zero(d_out)?;
    be.cls_pool_backward(d_out, s.d_cls, b, t, c)?;

    // Encoder layers, last to first. `d_out` holds the gradient of the layer's output;
    // `d_in` accumulates that of its input, which becomes `d_out` of the layer below.
    for layer in (0..cfg.num_hidden_layers).rev() {
        let (la, lp, lg) = (&a.layers[layer], &p.layers[layer], &g.layers[layer]);
        let input = match layer {
            0 => a.emb_drop,
            _ => a.layers[layer - 1].ffn.ln2,
        };
        encoder_ffn_backward(
            be, &lp.ffn, &lg.ffn, &la.ffn, &s.ffn, d_out, d_in, ffn, dropout, layer,
        )?;
        for d in [s.d_q, s.d_k, s.d_v] {
            be.zero(d)?;
        }
        be.attention_backward(
            s.d_q,
            s.d_k,
            s.d_v,
            s.attention_scratch,
            s.ffn.d_ctx,
            la.ffn.ctx,
            la.q,
            la.k,
            la.v,
            la.saved,
            tokens,
            dims,
            attention_dropout(dropout, layer),
        )?;
        // The layer input feeds the residual (already in d_in) and q, k, v.
        for (d, w_grad, b_grad, weight) in [
            (s.d_q, lg.q_w, lg.q_b, lp.q_w),
            (s.d_k, lg.k_w, lg.k_b, lp.k_w),
            (s.d_v, lg.v_w, lg.v_b, lp.v_w),
        ] {
            be.matmul_backward(d_in, w_grad, Some(b_grad), d, input, weight, n, c, c)?;
        }
        be.grads_final(lg.span()?)?;
        std::mem::swap(&mut d_out, &mut d_in);
    }

    // Embeddings: d_in is free again and takes the LayerNorm output's gradient.
    be.zero(d_in)?;
    let (pd, seed) = site_seed(dropout, SITE_EMB);
    be.dropout_backward(d_in, d_out, pd, seed)?;
    // The block's d_res2 [N, C] is free too and takes the embeddings' gradient.
    let d_emb = s.ffn.d_res2;
    be.zero(d_emb)?;
    be.layernorm_backward(
        d_emb, g.emb_ln_w, g.emb_ln_b, d_in, a.emb, p.emb_ln_w, a.emb_mean, a.emb_rstd, n, c,
    )?;
    be.embedding_backward(g.wte, g.wpe, g.wtt, d_emb, tokens, c)?;
    // The padding row gets no gradient (nn.Embedding's padding_idx).
    let pad = cfg.pad_token_id as usize;
    if pad < cfg.vocab_size {
        be.zero(g.wte.part(pad * c, c))?;
    }
    Ok(())
}
