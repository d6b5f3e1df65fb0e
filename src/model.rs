//! The reward model: Hugging Face's BertForSequenceClassification with one label, forward
//! and backward written out layer by layer over the CPU ops. Parameters, their gradients and
//! the activations each live in one arena (a single `Vec<F>`); the layouts below carve them
//! into named slices, with shapes written beside every buffer.
//!
//! Notation: B sequences of T tokens (N = B*T rows), C hidden, NH heads of HS = C/NH
//! channels, I the feed-forward width, V the vocabulary, P the positions.

use crate::backend::Float;
use crate::backend::cpu::*;
use crate::error::{Error, Result};
use crate::rng::{Rng, derive_seed};

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

/// One named tensor of the parameter arena.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    /// Hugging Face's name, so that checkpoints load in `transformers` as they are.
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    /// Whether AdamW decays it: not biases nor LayerNorm weights (as the HF Trainer).
    pub decay: bool,
}

impl TensorSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// The parameter arena's layout: every tensor of BertForSequenceClassification in a fixed
/// order. Gradients and the optimizer's moments use the same layout.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub tensors: Vec<TensorSpec>,
    pub total: usize,
}

impl ParamLayout {
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

    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// A slice that can be cut in two: `&[T]` to read an arena, `&mut [T]` to write it.
pub trait Split: Sized + Default {
    fn split(self, at: usize) -> (Self, Self);
}

impl<T> Split for &[T] {
    fn split(self, at: usize) -> (Self, Self) {
        self.split_at(at)
    }
}

impl<T> Split for &mut [T] {
    fn split(self, at: usize) -> (Self, Self) {
        self.split_at_mut(at)
    }
}

/// Cuts consecutive named slices off the front of an arena.
struct Carver<S> {
    rest: S,
}

impl<S: Split> Carver<S> {
    fn take(&mut self, len: usize) -> S {
        let (head, tail) = std::mem::take(&mut self.rest).split(len);
        self.rest = tail;
        head
    }
}

/// The parameters of one encoder layer, as slices of the arena (mutable for gradients).
pub struct LayerParams<S> {
    pub q_w: S,    // [C, C]
    pub q_b: S,    // [C]
    pub k_w: S,    // [C, C]
    pub k_b: S,    // [C]
    pub v_w: S,    // [C, C]
    pub v_b: S,    // [C]
    pub o_w: S,    // [C, C]
    pub o_b: S,    // [C]
    pub ln1_w: S,  // [C]
    pub ln1_b: S,  // [C]
    pub ffn1_w: S, // [I, C]
    pub ffn1_b: S, // [I]
    pub ffn2_w: S, // [C, I]
    pub ffn2_b: S, // [C]
    pub ln2_w: S,  // [C]
    pub ln2_b: S,  // [C]
}

/// All parameters in the arena order of `ParamLayout::new`.
pub struct Params<S> {
    pub wte: S,      // [V, C]
    pub wpe: S,      // [P, C]
    pub wtt: S,      // [types, C]
    pub emb_ln_w: S, // [C]
    pub emb_ln_b: S, // [C]
    pub layers: Vec<LayerParams<S>>,
    pub pool_w: S, // [C, C]
    pub pool_b: S, // [C]
    pub head_w: S, // [1, C]
    pub head_b: S, // [1]
}

/// Carves a parameter-shaped arena (parameters, gradients, moments) into named slices.
pub fn carve_params<S: Split>(cfg: &BertConfig, arena: S) -> Params<S> {
    let (v, c, i) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
    let mut k = Carver { rest: arena };
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

/// The activations of one encoder layer saved for backward. The outputs of the attention
/// projection and of the feed-forward block, and their dropouts, are not among them: the
/// backward needs neither (dropout redraws its mask from the seed), so every layer writes
/// them into the shared `Acts::branch` and `Acts::branch_drop`.
struct LayerActs<S> {
    q: S,        // [N, C]
    k: S,        // [N, C]
    v: S,        // [N, C]
    probs: S,    // [B, NH, T, T]
    ctx: S,      // [N, C] attention output, heads concatenated
    res1: S,     // [N, C] layer input + attention branch
    ln1_mean: S, // [N]
    ln1_rstd: S, // [N]
    ln1: S,      // [N, C]
    ffn_pre: S,  // [N, I]
    ffn_gelu: S, // [N, I]
    res2: S,     // [N, C] ln1 + feed-forward branch
    ln2_mean: S, // [N]
    ln2_rstd: S, // [N]
    ln2: S,      // [N, C] the layer's output
}

struct Acts<S> {
    emb: S,      // [N, C] word + position + type
    emb_mean: S, // [N]
    emb_rstd: S, // [N]
    emb_ln: S,   // [N, C]
    emb_drop: S, // [N, C] input of layer 0
    layers: Vec<LayerActs<S>>,
    branch: S,      // [N, C] a layer's attention projection, then its feed-forward output
    branch_drop: S, // [N, C] the same after dropout
    cls: S,         // [B, C]
    pool_pre: S,    // [B, C]
    pooled: S,      // [B, C]
    pooled_drop: S, // [B, C]
    logits: S,      // [B]
}

fn acts_len(cfg: &BertConfig, b: usize, t: usize) -> usize {
    let (n, c, i, nh) = (
        b * t,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
    );
    let per_layer = 8 * n * c + 4 * n + 2 * n * i + b * nh * t * t;
    5 * n * c + 2 * n + cfg.num_hidden_layers * per_layer + 4 * b * c + b
}

fn carve_acts<S: Split>(cfg: &BertConfig, arena: S, b: usize, t: usize) -> Acts<S> {
    let (n, c, i, nh) = (
        b * t,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
    );
    let mut k = Carver { rest: arena };
    Acts {
        emb: k.take(n * c),
        emb_mean: k.take(n),
        emb_rstd: k.take(n),
        emb_ln: k.take(n * c),
        emb_drop: k.take(n * c),
        layers: (0..cfg.num_hidden_layers)
            .map(|_| LayerActs {
                q: k.take(n * c),
                k: k.take(n * c),
                v: k.take(n * c),
                probs: k.take(b * nh * t * t),
                ctx: k.take(n * c),
                res1: k.take(n * c),
                ln1_mean: k.take(n),
                ln1_rstd: k.take(n),
                ln1: k.take(n * c),
                ffn_pre: k.take(n * i),
                ffn_gelu: k.take(n * i),
                res2: k.take(n * c),
                ln2_mean: k.take(n),
                ln2_rstd: k.take(n),
                ln2: k.take(n * c),
            })
            .collect(),
        branch: k.take(n * c),
        branch_drop: k.take(n * c),
        cls: k.take(b * c),
        pool_pre: k.take(b * c),
        pooled: k.take(b * c),
        pooled_drop: k.take(b * c),
        logits: k.take(b),
    }
}

/// A padded batch of token sequences: B sequences of T tokens.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub input_ids: Vec<u32>,      // [B, T]
    pub token_type_ids: Vec<u32>, // [B, T]
    pub mask: Vec<u8>,            // [B, T] 1 = real token, 0 = padding
    pub b: usize,
    pub t: usize,
}

impl Batch {
    /// Pads sequences (ids, types) to the longest with `pad_id`.
    pub fn from_sequences<'s>(
        seqs: impl IntoIterator<Item = (&'s [u32], &'s [u8])>,
        pad_id: u32,
    ) -> Batch {
        let seqs: Vec<_> = seqs.into_iter().collect();
        let b = seqs.len();
        let t = seqs.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        let mut batch = Batch {
            input_ids: vec![pad_id; b * t],
            token_type_ids: vec![0; b * t],
            mask: vec![0; b * t],
            b,
            t,
        };
        for (row, (ids, types)) in seqs.iter().enumerate() {
            let at = row * t;
            batch.input_ids[at..at + ids.len()].copy_from_slice(ids);
            for (j, &ty) in types.iter().enumerate() {
                batch.token_type_ids[at + j] = ty as u32;
            }
            batch.mask[at..at + ids.len()].fill(1);
        }
        batch
    }
}

/// Dropout in training: the probabilities (`hidden` on the embeddings, the attention and
/// feed-forward outputs and the pooler; `attention` on the attention probabilities, as
/// Hugging Face's two config keys) and the seed of this forward pass. Each dropout site
/// draws its mask from a seed derived from this one and the site's index.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub hidden: f64,
    pub attention: f64,
    pub seed: u64,
}

/// Indices of the dropout sites, so forward and backward (and the CUDA model,
/// src/backend/cuda/model.rs) derive the same seeds. (p, seed) of a hidden-dropout site.
pub(crate) fn site_seed(dropout: Option<Dropout>, site: u64) -> (f64, u64) {
    match dropout {
        Some(d) => (d.hidden, derive_seed(d.seed, &[site])),
        None => (0.0, 0),
    }
}
pub(crate) const SITE_EMB: u64 = 0;
pub(crate) const SITE_POOL: u64 = 1;
pub(crate) fn site_attn(layer: usize) -> u64 {
    2 + 2 * layer as u64
}
pub(crate) fn site_ffn(layer: usize) -> u64 {
    3 + 2 * layer as u64
}
/// The attention probabilities of a layer: sites from 2^32 up, above every hidden site
/// (2 + 2·layers), so that adding them left the other masks as they were.
fn site_attn_probs(layer: usize) -> u64 {
    (1 << 32) + layer as u64
}

/// The attention-probability dropout of a layer; None when off.
pub(crate) fn attention_dropout(
    dropout: Option<Dropout>,
    layer: usize,
) -> Option<AttentionDropout> {
    dropout
        .filter(|d| d.attention > 0.0)
        .map(|d| AttentionDropout {
            p: d.attention,
            seed: derive_seed(d.seed, &[site_attn_probs(layer)]),
        })
}

/// Scratch buffers of the backward pass, reused by every layer.
#[derive(Default)]
struct GradScratch<F> {
    d_out: Vec<F>,      // [N, C] gradient of the current layer's output
    d_in: Vec<F>,       // [N, C] gradient of its input, being accumulated
    d_res2: Vec<F>,     // [N, C]
    d_ffn_out: Vec<F>,  // [N, C]
    d_ffn_gelu: Vec<F>, // [N, I]
    d_ffn_pre: Vec<F>,  // [N, I]
    d_ln1: Vec<F>,      // [N, C]
    d_attn: Vec<F>,     // [N, C] gradient of the attention projection output
    d_ctx: Vec<F>,      // [N, C]
    d_q: Vec<F>,        // [N, C]
    d_k: Vec<F>,        // [N, C]
    d_v: Vec<F>,        // [N, C]
    d_pool: Vec<F>,     // [B, C]
    d_pool_pre: Vec<F>, // [B, C]
}

fn zeroed<F: Float>(buf: &mut Vec<F>, len: usize) -> &mut [F] {
    buf.clear();
    buf.resize(len, F::ZERO);
    buf
}

/// The activation arena and backward scratch, sized for the largest batch seen.
#[derive(Default)]
pub struct Workspace<F> {
    acts: Vec<F>,
    scratch: GradScratch<F>,
    b: usize,
    t: usize,
}

impl<F: Float> Workspace<F> {
    pub fn new() -> Self {
        Workspace {
            acts: Vec::new(),
            scratch: GradScratch::default(),
            b: 0,
            t: 0,
        }
    }

    /// Bytes held by the activation arena.
    pub fn activation_bytes(&self) -> usize {
        self.acts.len() * std::mem::size_of::<F>()
    }
}

/// The reward model: the configuration and the parameter arena.
pub struct BertModel<F> {
    pub config: BertConfig,
    pub layout: ParamLayout,
    pub params: Vec<F>, // [layout.total]
}

impl<F: Float> BertModel<F> {
    /// A model initialised as BERT does: normal(0, 0.02) weights and embeddings (the padding
    /// row of the word table zero), zero biases, unit LayerNorm weights.
    pub fn init(config: BertConfig, seed: u64) -> BertModel<F> {
        let mut model = BertModel::zeros(config);
        for index in 0..model.layout.tensors.len() {
            model.init_tensor(index, seed);
        }
        model
    }

    /// All parameters zero: the arena a checkpoint is read into.
    pub fn zeros(config: BertConfig) -> BertModel<F> {
        let layout = ParamLayout::new(&config);
        let params = vec![F::ZERO; layout.total];
        BertModel {
            config,
            layout,
            params,
        }
    }

    /// BERT's initialisation of tensor `index` of the layout, from a stream of its own so
    /// that a tensor missing from a pretrained checkpoint (the pooler, the head) is drawn
    /// alone.
    pub fn init_tensor(&mut self, index: usize, seed: u64) {
        let spec = &self.layout.tensors[index];
        let values = &mut self.params[spec.range()];
        let mut rng = Rng::new(derive_seed(seed, &[0x1417, index as u64]));
        if spec.name.contains("LayerNorm.weight") {
            values.fill(F::ONE);
        } else if spec.shape.len() == 2 {
            for x in values.iter_mut() {
                *x = F::from_f64(0.02 * rng.normal());
            }
        } else {
            values.fill(F::ZERO);
        }
        let c = self.config.hidden_size;
        let pad = self.config.pad_token_id as usize;
        if spec.name.ends_with("word_embeddings.weight") && pad < self.config.vocab_size {
            values[pad * c..(pad + 1) * c].fill(F::ZERO);
        }
    }

    pub fn num_params(&self) -> usize {
        self.layout.total
    }

    fn check_batch(&self, batch: &Batch) -> Result<()> {
        let cfg = &self.config;
        if batch.t > cfg.max_position_embeddings {
            return Err(Error::user(format!(
                "a sequence of {} tokens is longer than the model's {} positions: lower `max_length`",
                batch.t, cfg.max_position_embeddings
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
        Ok(())
    }

    /// The forward pass: returns the logits [B]. With `dropout`, training mode.
    pub fn forward<'w>(
        &self,
        ws: &'w mut Workspace<F>,
        batch: &Batch,
        dropout: Option<Dropout>,
    ) -> Result<&'w [F]> {
        self.check_batch(batch)?;
        let cfg = &self.config;
        let (b, t) = (batch.b, batch.t);
        let (n, c, i, nh, hs) = (
            b * t,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
            cfg.head_size(),
        );
        let eps = cfg.layer_norm_eps;
        let len = acts_len(cfg, b, t);
        if ws.acts.len() < len {
            ws.acts.resize(len, F::ZERO);
        }
        ws.b = b;
        ws.t = t;
        let p = carve_params(cfg, &self.params[..]);
        let a = carve_acts(cfg, &mut ws.acts[..len], b, t);

        embedding_forward(
            a.emb,
            &batch.input_ids,
            &batch.token_type_ids,
            p.wte,
            p.wpe,
            p.wtt,
            b,
            t,
            c,
        );
        layernorm_forward(
            a.emb_ln, a.emb_mean, a.emb_rstd, a.emb, p.emb_ln_w, p.emb_ln_b, n, c, eps,
        );
        let (pd, seed) = site_seed(dropout, SITE_EMB);
        dropout_forward(a.emb_drop, a.emb_ln, pd, seed);

        let mut input: &[F] = a.emb_drop;
        for (l, (la, lp)) in a.layers.into_iter().zip(&p.layers).enumerate() {
            matmul_forward(la.q, input, lp.q_w, Some(lp.q_b), n, c, c);
            matmul_forward(la.k, input, lp.k_w, Some(lp.k_b), n, c, c);
            matmul_forward(la.v, input, lp.v_w, Some(lp.v_b), n, c, c);
            attention_forward(
                la.ctx,
                la.probs,
                la.q,
                la.k,
                la.v,
                &batch.mask,
                b,
                t,
                nh,
                hs,
                attention_dropout(dropout, l),
            );
            matmul_forward(&mut *a.branch, la.ctx, lp.o_w, Some(lp.o_b), n, c, c);
            let (pd, seed) = site_seed(dropout, site_attn(l));
            dropout_forward(&mut *a.branch_drop, a.branch, pd, seed);
            residual_forward(la.res1, input, a.branch_drop);
            layernorm_forward(
                la.ln1,
                la.ln1_mean,
                la.ln1_rstd,
                la.res1,
                lp.ln1_w,
                lp.ln1_b,
                n,
                c,
                eps,
            );
            matmul_forward(la.ffn_pre, la.ln1, lp.ffn1_w, Some(lp.ffn1_b), n, c, i);
            gelu_forward(la.ffn_gelu, la.ffn_pre);
            matmul_forward(
                &mut *a.branch,
                la.ffn_gelu,
                lp.ffn2_w,
                Some(lp.ffn2_b),
                n,
                i,
                c,
            );
            let (pd, seed) = site_seed(dropout, site_ffn(l));
            dropout_forward(&mut *a.branch_drop, a.branch, pd, seed);
            residual_forward(la.res2, la.ln1, a.branch_drop);
            layernorm_forward(
                la.ln2,
                la.ln2_mean,
                la.ln2_rstd,
                la.res2,
                lp.ln2_w,
                lp.ln2_b,
                n,
                c,
                eps,
            );
            input = la.ln2;
        }

        cls_pool_forward(a.cls, input, b, t, c);
        matmul_forward(a.pool_pre, a.cls, p.pool_w, Some(p.pool_b), b, c, c);
        tanh_forward(a.pooled, a.pool_pre);
        let (pd, seed) = site_seed(dropout, SITE_POOL);
        dropout_forward(a.pooled_drop, a.pooled, pd, seed);
        matmul_forward(a.logits, a.pooled_drop, p.head_w, Some(p.head_b), b, c, 1);
        Ok(a.logits)
    }

    /// What the last `forward` on this workspace computed: the encoder's last hidden state
    /// [B, T, C], the pooler output [B, C] (before the head's dropout) and the logits [B].
    pub fn outputs<'w>(&self, ws: &'w Workspace<F>) -> (&'w [F], &'w [F], &'w [F]) {
        let len = acts_len(&self.config, ws.b, ws.t);
        let a = carve_acts(&self.config, &ws.acts[..len], ws.b, ws.t);
        let last = a.layers.last().map_or(a.emb_drop, |l| l.ln2);
        (last, a.pooled, a.logits)
    }

    /// The backward pass of the last `forward` on this workspace (same batch, same dropout):
    /// adds d loss / d parameter into `grads` [layout.total], given `dlogits` [B].
    pub fn backward(
        &self,
        ws: &mut Workspace<F>,
        batch: &Batch,
        dropout: Option<Dropout>,
        dlogits: &[F],
        grads: &mut [F],
    ) {
        let cfg = &self.config;
        let (b, t) = (batch.b, batch.t);
        assert!(
            ws.b == b && ws.t == t,
            "backward must follow a forward on the same batch"
        );
        let (n, c, i, nh, hs) = (
            b * t,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
            cfg.head_size(),
        );
        let len = acts_len(cfg, b, t);
        let p = carve_params(cfg, &self.params[..]);
        let mut g = carve_params(cfg, &mut grads[..]);
        let a = carve_acts(cfg, &ws.acts[..len], b, t);
        let s = &mut ws.scratch;

        // Head and pooler.
        let d_pool = zeroed(&mut s.d_pool, b * c);
        matmul_backward(
            d_pool,
            g.head_w,
            Some(g.head_b),
            dlogits,
            a.pooled_drop,
            p.head_w,
            b,
            c,
            1,
        );
        let d_pool_pre = zeroed(&mut s.d_pool_pre, b * c);
        {
            let (pd, seed) = site_seed(dropout, SITE_POOL);
            let d_pooled = zeroed(&mut s.d_q, b * c); // scratch reuse: [B, C]
            dropout_backward(d_pooled, d_pool, pd, seed);
            tanh_backward(d_pool_pre, a.pooled, d_pooled);
        }
        let d_cls = zeroed(&mut s.d_k, b * c);
        matmul_backward(
            d_cls,
            g.pool_w,
            Some(g.pool_b),
            d_pool_pre,
            a.cls,
            p.pool_w,
            b,
            c,
            c,
        );
        let mut d_out = std::mem::take(&mut s.d_out);
        cls_pool_backward(zeroed(&mut d_out, n * c), d_cls, b, t, c);

        // Encoder layers, last to first. `d_out` holds the gradient of the layer's output;
        // `d_in` accumulates that of its input, which becomes `d_out` of the layer below.
        let mut d_in = std::mem::take(&mut s.d_in);
        for l in (0..cfg.num_hidden_layers).rev() {
            let (la, lp, lg) = (&a.layers[l], &p.layers[l], &mut g.layers[l]);
            let input: &[F] = if l == 0 {
                a.emb_drop
            } else {
                a.layers[l - 1].ln2
            };

            let d_res2 = zeroed(&mut s.d_res2, n * c);
            layernorm_backward(
                d_res2,
                lg.ln2_w,
                lg.ln2_b,
                &d_out,
                la.res2,
                lp.ln2_w,
                la.ln2_mean,
                la.ln2_rstd,
                n,
                c,
            );
            let d_ffn_out = zeroed(&mut s.d_ffn_out, n * c);
            let (pd, seed) = site_seed(dropout, site_ffn(l));
            dropout_backward(d_ffn_out, d_res2, pd, seed);
            let d_ffn_gelu = zeroed(&mut s.d_ffn_gelu, n * i);
            matmul_backward(
                d_ffn_gelu,
                lg.ffn2_w,
                Some(lg.ffn2_b),
                d_ffn_out,
                la.ffn_gelu,
                lp.ffn2_w,
                n,
                i,
                c,
            );
            let d_ffn_pre = zeroed(&mut s.d_ffn_pre, n * i);
            gelu_backward(d_ffn_pre, la.ffn_pre, d_ffn_gelu);
            // ln1 feeds both the residual and the feed-forward block.
            let d_ln1 = zeroed(&mut s.d_ln1, n * c);
            d_ln1.copy_from_slice(d_res2);
            matmul_backward(
                d_ln1,
                lg.ffn1_w,
                Some(lg.ffn1_b),
                d_ffn_pre,
                la.ln1,
                lp.ffn1_w,
                n,
                c,
                i,
            );

            let d_res1 = zeroed(&mut d_in, n * c);
            layernorm_backward(
                d_res1,
                lg.ln1_w,
                lg.ln1_b,
                d_ln1,
                la.res1,
                lp.ln1_w,
                la.ln1_mean,
                la.ln1_rstd,
                n,
                c,
            );
            let d_attn = zeroed(&mut s.d_attn, n * c);
            let (pd, seed) = site_seed(dropout, site_attn(l));
            dropout_backward(d_attn, d_res1, pd, seed);
            let d_ctx = zeroed(&mut s.d_ctx, n * c);
            matmul_backward(d_ctx, lg.o_w, Some(lg.o_b), d_attn, la.ctx, lp.o_w, n, c, c);
            let d_q = zeroed(&mut s.d_q, n * c);
            let d_k = zeroed(&mut s.d_k, n * c);
            let d_v = zeroed(&mut s.d_v, n * c);
            attention_backward(
                d_q,
                d_k,
                d_v,
                d_ctx,
                la.q,
                la.k,
                la.v,
                la.probs,
                &batch.mask,
                b,
                t,
                nh,
                hs,
                attention_dropout(dropout, l),
            );
            // The layer input feeds the residual (already in d_in) and q, k, v.
            matmul_backward(
                &mut d_in,
                lg.q_w,
                Some(lg.q_b),
                &s.d_q,
                input,
                lp.q_w,
                n,
                c,
                c,
            );
            matmul_backward(
                &mut d_in,
                lg.k_w,
                Some(lg.k_b),
                &s.d_k,
                input,
                lp.k_w,
                n,
                c,
                c,
            );
            matmul_backward(
                &mut d_in,
                lg.v_w,
                Some(lg.v_b),
                &s.d_v,
                input,
                lp.v_w,
                n,
                c,
                c,
            );
            std::mem::swap(&mut d_out, &mut d_in);
        }

        // Embeddings.
        let d_emb_ln = zeroed(&mut d_in, n * c);
        let (pd, seed) = site_seed(dropout, SITE_EMB);
        dropout_backward(d_emb_ln, &d_out, pd, seed);
        let d_emb = zeroed(&mut s.d_res2, n * c);
        layernorm_backward(
            d_emb, g.emb_ln_w, g.emb_ln_b, &d_in, a.emb, p.emb_ln_w, a.emb_mean, a.emb_rstd, n, c,
        );
        embedding_backward(
            g.wte,
            g.wpe,
            g.wtt,
            d_emb,
            &batch.input_ids,
            &batch.token_type_ids,
            b,
            t,
            c,
        );
        let pad = cfg.pad_token_id as usize;
        if pad < cfg.vocab_size {
            g.wte[pad * c..(pad + 1) * c].fill(F::ZERO);
        }
        s.d_out = d_out;
        s.d_in = d_in;
    }
}
