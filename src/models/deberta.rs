//! DeBERTa-v2/v3 as a reward model: transformers' `DebertaV2ForSequenceClassification` with
//! one label (model_type `deberta-v2`, the paper's backbone and OpenAssistant's reward
//! models), forward and backward over the `Backend` ops.
//!
//! Against BERT it differs in four places: the embeddings (no positions unless
//! `position_biased_input`, no token types when `type_vocab_size` is 0, a projection when
//! `embedding_size` differs from `hidden_size`); the disentangled attention (content-to-
//! position and position-to-content terms over log-bucketed relative positions, the
//! relative embeddings layer-normed once and projected by each layer's query/key
//! projections or by its own); the pooler (GELU, not tanh); the names.
//!
//! Notation: B sequences of T tokens (N = B*T rows), C hidden, E embedding size, NH heads of
//! HS = C/NH channels, I the feed-forward width, V the vocabulary, R = 2S relative-position
//! rows (S the attention span).
//!
//! transformers also multiplies the embeddings by the padding mask; padded rows are keys no
//! real token attends to and the reward reads the first token, so rcx leaves them as they
//! are: the logits and every gradient are the same.

use std::ops::Range;
use std::path::Path;

use serde_json::{Value, json};

use super::encoder::{
    FfnActs, FfnBranch, FfnDims, FfnParams, FfnScratch, encoder_ffn_backward, encoder_ffn_forward,
};
use super::{Dropout, ParamLayout, SITE_EMB, SITE_POOL, TensorSpec, attention_dropout, site_seed};
use crate::backend::cpu::{attention_span, disentangled_scale, relative_positions};
use crate::backend::{Arena, AttentionDims, Backend, Buf, Carver, PositionBufs, span};
use crate::error::{Error, Result};
use crate::hf_config::{ConfigKeys, read_json_object};

/// The architecture, as transformers' DebertaV2Config names it.
#[derive(Clone, Debug, PartialEq)]
pub struct DebertaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub embedding_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    /// 0: no token type embeddings (DeBERTa-v3).
    pub type_vocab_size: usize,
    pub position_biased_input: bool,
    pub layer_norm_eps: f64,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub pooler_dropout: f64,
    /// The classifier's dropout (`cls_dropout`, else hidden_dropout_prob).
    pub cls_dropout: f64,
    pub pad_token_id: u32,
    pub initializer_range: f64,
    pub relative_attention: bool,
    /// Resolved: -1 in the file means max_position_embeddings.
    pub max_relative_positions: usize,
    /// 0 when the file has none (or -1).
    pub position_buckets: usize,
    pub c2p: bool,
    pub p2c: bool,
    pub share_att_key: bool,
    /// `norm_rel_ebd` contains "layer_norm".
    pub norm_rel_ebd: bool,
}

impl DebertaConfig {
    /// The from-scratch architectures rcx knows by name, with their shipped tokenizer (in
    /// data/, made by scripts/gen_deberta_tokenizer.py): DeBERTa-v3's structure at
    /// bert-tiny's size. 64 log buckets instead of v3-base's 256 keep its relative table
    /// small; sequences longer than 32 tokens still reach the log buckets.
    pub fn named(name: &str) -> Option<(DebertaConfig, &'static str)> {
        let (layers, hidden, heads, tokenizer) = match name {
            "deberta-v3-tiny" => (2, 128, 2, "deberta-v3-tiny.spm.model"),
            _ => return None,
        };
        let config = DebertaConfig {
            vocab_size: 8000,
            hidden_size: hidden,
            embedding_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: 4 * hidden,
            max_position_embeddings: 512,
            type_vocab_size: 0,
            position_biased_input: false,
            layer_norm_eps: 1e-7,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            pooler_dropout: 0.0,
            cls_dropout: 0.1,
            pad_token_id: 0,
            initializer_range: 0.02,
            relative_attention: true,
            max_relative_positions: 512,
            position_buckets: 64,
            c2p: true,
            p2c: true,
            share_att_key: true,
            norm_rel_ebd: true,
        };
        Some((config, tokenizer))
    }

    pub const NAMES: &'static [&'static str] = &["deberta-v3-tiny"];

    pub fn head_size(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The relative embedding rows R = 2S (0 without relative attention).
    pub fn position_rows(&self) -> usize {
        match self.relative_attention {
            true => 2 * attention_span(self.position_buckets, self.max_relative_positions),
            false => 0,
        }
    }

    /// The position terms `pos_att_type` names: transformers counts them in the attention's
    /// scale whether or not relative attention is on.
    fn position_terms(&self) -> usize {
        self.c2p as usize + self.p2c as usize
    }

    /// Reads a DeBERTa-v2/v3 `config.json`. Keys that change the math and that rcx does not
    /// implement are refused, naming the file and the key.
    pub fn from_hf_json(path: &Path) -> Result<DebertaConfig> {
        let obj = read_json_object(path)?;
        let keys = ConfigKeys { path, obj: &obj };
        let model_type = keys.string("model_type", None)?;
        if model_type != "deberta-v2" {
            return Err(keys.error(
                "model_type",
                &format!("expected \"deberta-v2\", found \"{model_type}\""),
            ));
        }
        for (key, expected) in [("hidden_act", "gelu"), ("pooler_hidden_act", "gelu")] {
            let act = keys.string(key, Some("gelu"))?;
            if act != expected {
                return Err(keys.error(
                    key,
                    &format!("rcx implements \"{expected}\" (erf), found \"{act}\""),
                ));
            }
        }
        if keys.optional_usize("conv_kernel_size")?.unwrap_or(0) > 0 {
            return Err(keys.error(
                "conv_kernel_size",
                "the convolution layer (DeBERTa-v2-xlarge) is not supported",
            ));
        }
        let num_labels = match obj.get("id2label") {
            Some(Value::Object(labels)) => Some(labels.len()),
            _ => keys.optional_usize("num_labels")?,
        };
        if let Some(n) = num_labels.filter(|&n| n != 1) {
            return Err(keys.error(
                "num_labels",
                &format!("a reward model has one label, found {n} (id2label/num_labels)"),
            ));
        }
        let hidden_size = keys.positive("hidden_size")?;
        let num_attention_heads = keys.positive("num_attention_heads")?;
        if let Some(size) = keys.optional_usize("attention_head_size")?
            && num_attention_heads.checked_mul(size) != Some(hidden_size)
        {
            return Err(keys.error(
                "attention_head_size",
                &format!(
                    "{size} x {num_attention_heads} heads differs from hidden_size \
                     {hidden_size}; rcx needs heads that split the hidden size"
                ),
            ));
        }
        let max_position_embeddings = keys.positive("max_position_embeddings")?;
        let signed = |key: &str, default: i64| -> Result<i64> {
            match keys.get(key) {
                None => Ok(default),
                Some(v) => v
                    .as_i64()
                    .ok_or_else(|| keys.error(key, &format!("expected an integer, found {v}"))),
            }
        };
        let max_relative = signed("max_relative_positions", -1)?;
        let max_relative_positions = match max_relative {
            m if m < 1 => max_position_embeddings,
            m => m as usize,
        };
        let position_buckets = signed("position_buckets", -1)?.max(0) as usize;
        let pos_att_type: Vec<String> = match keys.get("pos_att_type") {
            None => Vec::new(),
            Some(Value::String(s)) => s.split('|').map(|t| t.trim().to_lowercase()).collect(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|t| match t {
                    Value::String(s) => Ok(s.to_lowercase()),
                    other => Err(keys.error(
                        "pos_att_type",
                        &format!("expected \"c2p\" or \"p2c\", found {other}"),
                    )),
                })
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(keys.error(
                    "pos_att_type",
                    &format!("expected a list of \"c2p\", \"p2c\", found {other}"),
                ));
            }
        };
        if let Some(other) = pos_att_type
            .iter()
            .find(|t| !["c2p", "p2c"].contains(&t.as_str()))
        {
            return Err(keys.error(
                "pos_att_type",
                &format!("\"{other}\" is not supported; rcx implements \"c2p\" and \"p2c\""),
            ));
        }
        let norm_rel_ebd = keys.string("norm_rel_ebd", Some("none"))?;
        let norm_rel_ebd: Vec<&str> = norm_rel_ebd.split('|').map(str::trim).collect();
        if let Some(other) = norm_rel_ebd
            .iter()
            .find(|n| !["none", "layer_norm"].contains(n))
        {
            return Err(keys.error(
                "norm_rel_ebd",
                &format!("\"{other}\" is not supported; rcx implements \"layer_norm\""),
            ));
        }
        let hidden_dropout_prob = keys.f64_or("hidden_dropout_prob", 0.1)?;
        let config = DebertaConfig {
            vocab_size: keys.positive("vocab_size")?,
            hidden_size,
            embedding_size: keys
                .optional_usize("embedding_size")?
                .unwrap_or(hidden_size),
            num_hidden_layers: keys.positive("num_hidden_layers")?,
            num_attention_heads,
            intermediate_size: keys.positive("intermediate_size")?,
            max_position_embeddings,
            type_vocab_size: keys.optional_usize("type_vocab_size")?.unwrap_or(0),
            position_biased_input: keys.bool_or("position_biased_input", true)?,
            layer_norm_eps: keys.f64_or("layer_norm_eps", 1e-7)?,
            hidden_dropout_prob,
            attention_probs_dropout_prob: keys.f64_or("attention_probs_dropout_prob", 0.1)?,
            pooler_dropout: keys.f64_or("pooler_dropout", 0.0)?,
            cls_dropout: keys.f64_or("cls_dropout", hidden_dropout_prob)?,
            pad_token_id: keys.optional_id("pad_token_id")?.unwrap_or(0),
            initializer_range: keys.f64_or("initializer_range", 0.02)?,
            relative_attention: keys.bool_or("relative_attention", false)?,
            max_relative_positions,
            position_buckets,
            c2p: pos_att_type.iter().any(|t| t == "c2p"),
            p2c: pos_att_type.iter().any(|t| t == "p2c"),
            share_att_key: keys.bool_or("share_att_key", false)?,
            norm_rel_ebd: norm_rel_ebd.contains(&"layer_norm"),
        };
        if let Some(size) = keys.optional_usize("pooler_hidden_size")?
            && size != hidden_size
        {
            return Err(keys.error(
                "pooler_hidden_size",
                &format!("must equal hidden_size ({hidden_size}), found {size}"),
            ));
        }
        config.validate(&path.display().to_string())?;
        Ok(config)
    }

    /// Writes the config.json that transformers loads as DebertaV2ForSequenceClassification
    /// with one label.
    pub fn write_hf_json(&self, path: &Path) -> Result<()> {
        let mut pos_att_type = Vec::new();
        if self.p2c {
            pos_att_type.push("p2c");
        }
        if self.c2p {
            pos_att_type.push("c2p");
        }
        let config = json!({
            "architectures": ["DebertaV2ForSequenceClassification"],
            "model_type": "deberta-v2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "embedding_size": self.embedding_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "gelu",
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "position_biased_input": self.position_biased_input,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_dropout_prob": self.hidden_dropout_prob,
            "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
            "pooler_dropout": self.pooler_dropout,
            "cls_dropout": self.cls_dropout,
            "pooler_hidden_size": self.hidden_size,
            "pooler_hidden_act": "gelu",
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
            "relative_attention": self.relative_attention,
            "max_relative_positions": self.max_relative_positions,
            "position_buckets": if self.position_buckets > 0 { self.position_buckets as i64 } else { -1 },
            "pos_att_type": pos_att_type,
            "share_att_key": self.share_att_key,
            "norm_rel_ebd": if self.norm_rel_ebd { "layer_norm" } else { "none" },
            "num_labels": 1,
            "id2label": {"0": "LABEL_0"},
            "label2id": {"LABEL_0": 0},
        });
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| Error::internal(format!("config.json: {e}")))?;
        crate::safetensors::write_atomic(path, format!("{text}\n").as_bytes())
    }

    /// Rejects shapes the ops cannot run and sizes rcx cannot hold, before anything is
    /// allocated from them.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let err =
            |key: &str, msg: String| Err(Error::user(format!("{origin}: key '{key}': {msg}")));
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return err(
                "hidden_size",
                format!(
                    "{} must be a multiple of num_attention_heads ({})",
                    self.hidden_size, self.num_attention_heads
                ),
            );
        }
        if self.embedding_size == 0 {
            return err("embedding_size", "must be positive".into());
        }
        for (key, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
            ("pooler_dropout", self.pooler_dropout),
            ("cls_dropout", self.cls_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return err(key, format!("must be in [0, 1), found {p}"));
            }
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return err(
                "layer_norm_eps",
                format!("must be positive, found {}", self.layer_norm_eps),
            );
        }
        if self.pad_token_id as usize >= self.vocab_size {
            return err(
                "pad_token_id",
                format!(
                    "{} must be below vocab_size ({})",
                    self.pad_token_id, self.vocab_size
                ),
            );
        }
        // The embedding combinations transformers allows and rcx's embedding ops run.
        if self.position_biased_input != (self.type_vocab_size > 0) {
            return err(
                "position_biased_input",
                format!(
                    "{} with type_vocab_size {} is not supported yet: rcx runs the embeddings \
                     with both position and type tables (DeBERTa-v2) or neither (DeBERTa-v3)",
                    self.position_biased_input, self.type_vocab_size
                ),
            );
        }
        // Sizes: every tensor's element count, overflow-checked, then the whole.
        let max = super::bert::BertConfig::MAX_PARAMETERS;
        if self.num_hidden_layers > super::bert::BertConfig::MAX_LAYERS {
            return err(
                "num_hidden_layers",
                format!(
                    "{} is above rcx's {}",
                    self.num_hidden_layers,
                    super::bert::BertConfig::MAX_LAYERS
                ),
            );
        }
        let (c, e, i) = (
            self.hidden_size,
            self.embedding_size,
            self.intermediate_size,
        );
        for (key, rows, cols) in [
            ("vocab_size", self.vocab_size, e),
            ("max_position_embeddings", self.max_position_embeddings, e),
            ("hidden_size", c, c.max(e)),
            ("intermediate_size", i, c),
            ("max_relative_positions", self.position_rows(), c),
        ] {
            if rows.checked_mul(cols).is_none_or(|n| n > max) {
                return err(
                    key,
                    format!("{rows} x {cols} values are above rcx's {max} parameters"),
                );
            }
        }
        let per_layer = (c * c)
            .checked_mul(6)
            .and_then(|a| a.checked_add(2 * c * i));
        if per_layer
            .and_then(|n| n.checked_mul(self.num_hidden_layers))
            .is_none_or(|n| n > max)
        {
            return err(
                "num_hidden_layers",
                format!(
                    "{} layers are above rcx's {max} parameters",
                    self.num_hidden_layers
                ),
            );
        }
        let total = ParamLayout::deberta(self).total;
        if total > max {
            return err(
                "num_hidden_layers",
                format!("the model's {total} parameters are above rcx's {max}"),
            );
        }
        Ok(())
    }
}

impl ParamLayout {
    /// Every tensor of DebertaV2ForSequenceClassification (one label), in a fixed order.
    pub fn deberta(cfg: &DebertaConfig) -> ParamLayout {
        let (c, e, i) = (cfg.hidden_size, cfg.embedding_size, cfg.intermediate_size);
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
        let emb = "deberta.embeddings";
        add(
            format!("{emb}.word_embeddings.weight"),
            vec![cfg.vocab_size, e],
        );
        if cfg.position_biased_input {
            add(
                format!("{emb}.position_embeddings.weight"),
                vec![cfg.max_position_embeddings, e],
            );
        }
        if cfg.type_vocab_size > 0 {
            add(
                format!("{emb}.token_type_embeddings.weight"),
                vec![cfg.type_vocab_size, e],
            );
        }
        if e != c {
            add(format!("{emb}.embed_proj.weight"), vec![c, e]);
        }
        add(format!("{emb}.LayerNorm.weight"), vec![c]);
        add(format!("{emb}.LayerNorm.bias"), vec![c]);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("deberta.encoder.layer.{l}");
            let mut linear = |name: &str, out_dim: usize, in_dim: usize| {
                add(format!("{p}.{name}.weight"), vec![out_dim, in_dim]);
                add(format!("{p}.{name}.bias"), vec![out_dim]);
            };
            linear("attention.self.query_proj", c, c);
            linear("attention.self.key_proj", c, c);
            linear("attention.self.value_proj", c, c);
            if cfg.relative_attention && !cfg.share_att_key {
                if cfg.c2p {
                    linear("attention.self.pos_key_proj", c, c);
                }
                if cfg.p2c {
                    linear("attention.self.pos_query_proj", c, c);
                }
            }
            linear("attention.output.dense", c, c);
            add(format!("{p}.attention.output.LayerNorm.weight"), vec![c]);
            add(format!("{p}.attention.output.LayerNorm.bias"), vec![c]);
            add(format!("{p}.intermediate.dense.weight"), vec![i, c]);
            add(format!("{p}.intermediate.dense.bias"), vec![i]);
            add(format!("{p}.output.dense.weight"), vec![c, i]);
            add(format!("{p}.output.dense.bias"), vec![c]);
            add(format!("{p}.output.LayerNorm.weight"), vec![c]);
            add(format!("{p}.output.LayerNorm.bias"), vec![c]);
        }
        if cfg.relative_attention {
            add(
                "deberta.encoder.rel_embeddings.weight".into(),
                vec![cfg.position_rows(), c],
            );
            if cfg.norm_rel_ebd {
                add("deberta.encoder.LayerNorm.weight".into(), vec![c]);
                add("deberta.encoder.LayerNorm.bias".into(), vec![c]);
            }
        }
        add("pooler.dense.weight".into(), vec![c, c]);
        add("pooler.dense.bias".into(), vec![c]);
        add("classifier.weight".into(), vec![1, c]);
        add("classifier.bias".into(), vec![1]);
        ParamLayout { tensors, total }
    }
}

/// A linear layer's weight [out, in] and bias [out].
#[derive(Clone, Copy)]
struct Linear {
    w: Buf,
    b: Buf,
}

#[derive(Clone, Copy)]
struct LayerParams {
    q: Linear,             // [C, C], [C]
    k: Linear,             // [C, C], [C]
    v: Linear,             // [C, C], [C]
    pos_k: Option<Linear>, // [C, C], [C]: c2p's projection when not shared with k
    pos_q: Option<Linear>, // [C, C], [C]: p2c's projection when not shared with q
    ffn: FfnParams,        // the attention output's dense, LayerNorms, feed-forward (BERT's)
}

impl LayerParams {
    /// The layer's range of its arena.
    fn span(&self) -> Result<Range<usize>> {
        let own = [
            Some(self.q),
            Some(self.k),
            Some(self.v),
            self.pos_k,
            self.pos_q,
        ];
        let linears = own.into_iter().flatten().flat_map(|l| [l.w, l.b]);
        span(linears.chain(self.ffn.bufs()))
    }
}

/// All parameters, named from the layout (so the two can never disagree on an offset).
struct Params {
    wte: Buf,              // [V, E]
    wpe: Option<Buf>,      // [P, E]
    wtt: Option<Buf>,      // [types, E]
    emb_proj: Option<Buf>, // [C, E]
    emb_ln_w: Buf,         // [C]
    emb_ln_b: Buf,         // [C]
    layers: Vec<LayerParams>,
    rel: Option<Buf>,           // [R, C]
    rel_ln: Option<(Buf, Buf)>, // [C], [C]
    pool: Linear,               // [C, C], [C]
    head: Linear,               // [1, C], [1]
}

impl Params {
    fn new(layout: &ParamLayout, arena: Arena) -> Result<Params> {
        let find = |name: &str| -> Option<Buf> {
            layout.get(name).map(|t| Buf {
                arena,
                offset: t.offset,
                len: t.len(),
            })
        };
        let need = |name: &str| -> Result<Buf> {
            find(name).ok_or_else(|| Error::internal(format!("deberta: the layout has no {name}")))
        };
        let linear = |name: &str| -> Result<Linear> {
            Ok(Linear {
                w: need(&format!("{name}.weight"))?,
                b: need(&format!("{name}.bias"))?,
            })
        };
        let optional_linear = |name: &str| -> Result<Option<Linear>> {
            match find(&format!("{name}.weight")) {
                Some(_) => linear(name).map(Some),
                None => Ok(None),
            }
        };
        let emb = "deberta.embeddings";
        let mut layers = Vec::new();
        let mut l = 0;
        while find(&format!(
            "deberta.encoder.layer.{l}.attention.self.query_proj.weight"
        ))
        .is_some()
        {
            let p = format!("deberta.encoder.layer.{l}");
            layers.push(LayerParams {
                q: linear(&format!("{p}.attention.self.query_proj"))?,
                k: linear(&format!("{p}.attention.self.key_proj"))?,
                v: linear(&format!("{p}.attention.self.value_proj"))?,
                pos_k: optional_linear(&format!("{p}.attention.self.pos_key_proj"))?,
                pos_q: optional_linear(&format!("{p}.attention.self.pos_query_proj"))?,
                ffn: FfnParams {
                    o_w: need(&format!("{p}.attention.output.dense.weight"))?,
                    o_b: need(&format!("{p}.attention.output.dense.bias"))?,
                    ln1_w: need(&format!("{p}.attention.output.LayerNorm.weight"))?,
                    ln1_b: need(&format!("{p}.attention.output.LayerNorm.bias"))?,
                    ffn1_w: need(&format!("{p}.intermediate.dense.weight"))?,
                    ffn1_b: need(&format!("{p}.intermediate.dense.bias"))?,
                    ffn2_w: need(&format!("{p}.output.dense.weight"))?,
                    ffn2_b: need(&format!("{p}.output.dense.bias"))?,
                    ln2_w: need(&format!("{p}.output.LayerNorm.weight"))?,
                    ln2_b: need(&format!("{p}.output.LayerNorm.bias"))?,
                },
            });
            l += 1;
        }
        let rel_ln = match find("deberta.encoder.LayerNorm.weight") {
            Some(w) => Some((w, need("deberta.encoder.LayerNorm.bias")?)),
            None => None,
        };
        Ok(Params {
            wte: need(&format!("{emb}.word_embeddings.weight"))?,
            wpe: find(&format!("{emb}.position_embeddings.weight")),
            wtt: find(&format!("{emb}.token_type_embeddings.weight")),
            emb_proj: find(&format!("{emb}.embed_proj.weight")),
            emb_ln_w: need(&format!("{emb}.LayerNorm.weight"))?,
            emb_ln_b: need(&format!("{emb}.LayerNorm.bias"))?,
            layers,
            rel: find("deberta.encoder.rel_embeddings.weight"),
            rel_ln,
            pool: linear("pooler.dense")?,
            head: linear("classifier")?,
        })
    }
}

/// One layer's activations, saved for the backward.
struct LayerActs {
    q: Buf,        // [N, C]
    k: Buf,        // [N, C]
    v: Buf,        // [N, C]
    rel_drop: Buf, // [R, C] the relative embeddings after this layer's dropout
    pos_k: Buf,    // [R, C] projected for c2p (empty without)
    pos_q: Buf,    // [R, C] projected for p2c (empty without)
    c2p: Buf,      // [B, NH, T, R] (empty without)
    p2c: Buf,      // [B, NH, T, R] (empty without)
    saved: Buf,    // Stats: what the backend's attention keeps
    ffn: FfnActs,  // the attention's output and the block after it, to the layer's output
}

struct Acts {
    emb: Buf,      // [N, E] word (+ position + type)
    emb_proj: Buf, // [N, C] projected (empty when E = C: `emb` is used)
    emb_mean: Buf, // Stats [N]
    emb_rstd: Buf, // Stats [N]
    emb_ln: Buf,   // [N, C]
    emb_drop: Buf, // [N, C] input of layer 0
    rel: Buf,      // [R, C] the relative embeddings, layer-normed (empty when not normed)
    rel_mean: Buf, // Stats [R]
    rel_rstd: Buf, // Stats [R]
    layers: Vec<LayerActs>,
    branch: FfnBranch, // [N, C] x 2, every layer's
    cls: Buf,          // [B, C]
    pool_in: Buf,      // Stats [B, C] cls
    pool_drop: Buf,    // Stats [B, C] after the pooler's dropout
    pool_pre: Buf,     // Stats [B, C] dense, as the backend keeps it
    pooled: Buf,       // Stats [B, C] GELU
    pooled_drop: Buf,  // Stats [B, C]
    logits: Buf,       // Stats [B]
}

struct Scratch {
    d_out: Buf,       // [N, C]
    d_in: Buf,        // [N, C]
    ffn: FfnScratch,  // the block after the attention, down to d_ctx [N, C]
    d_q: Buf,         // [N, C]
    d_k: Buf,         // [N, C]
    d_v: Buf,         // [N, C]
    d_c2p: Buf,       // [B, NH, T, R]
    d_p2c: Buf,       // [B, NH, T, R]
    d_pos_k: Buf,     // [R, C]
    d_pos_q: Buf,     // [R, C]
    d_rel_drop: Buf,  // [R, C]
    d_rel: Buf,       // [R, C] summed over the layers
    d_emb: Buf,       // [N, E]
    d_cls: Buf,       // [B, C]
    d_pool: Buf,      // Stats [B, C]
    d_pooled: Buf,    // Stats [B, C]
    d_pool_pre: Buf,  // Stats [B, C]
    d_pool_drop: Buf, // Stats [B, C]
    d_pool_in: Buf,   // Stats [B, C]
    dlogits: Buf,     // Stats [B]
}

/// Where every activation of a batch of B x T lives, and the arena sizes that needs.
pub struct ActLayout {
    acts: Acts,
    scratch: Scratch,
    b: usize,
    t: usize,
    /// r [T, T]: the relative position row each query reads for each key.
    relative: Vec<u32>,
    pub forward_lens: (usize, usize),
    pub lens: (usize, usize),
}

/// The sizes of the block after the attention, for `n` rows.
fn ffn_dims(cfg: &DebertaConfig, n: usize) -> FfnDims {
    FfnDims {
        n,
        c: cfg.hidden_size,
        i: cfg.intermediate_size,
        eps: cfg.layer_norm_eps,
    }
}

fn attention_dims(cfg: &DebertaConfig, b: usize, t: usize) -> AttentionDims {
    AttentionDims {
        b,
        t,
        nh: cfg.num_attention_heads,
        hs: cfg.head_size(),
    }
}

impl ActLayout {
    pub fn new<B: Backend>(cfg: &DebertaConfig, be: &B, b: usize, t: usize) -> ActLayout {
        let (n, c, e) = (b * t, cfg.hidden_size, cfg.embedding_size);
        let r = cfg.position_rows();
        let dims = attention_dims(cfg, b, t);
        let nh = cfg.num_attention_heads;
        let (c2p_len, p2c_len) = (
            if r > 0 && cfg.c2p { b * nh * t * r } else { 0 },
            if r > 0 && cfg.p2c { b * nh * t * r } else { 0 },
        );
        let mut k = Carver::new(Arena::Acts);
        let mut f = Carver::new(Arena::Stats);
        let emb = k.take(n * e);
        let emb_proj = k.take(if e != c { n * c } else { 0 });
        let emb_mean = f.take(n);
        let emb_rstd = f.take(n);
        let emb_ln = k.take(n * c);
        let emb_drop = k.take(n * c);
        let normed = cfg.norm_rel_ebd && r > 0;
        let rel = k.take(if normed { r * c } else { 0 });
        let rel_mean = f.take(if normed { r } else { 0 });
        let rel_rstd = f.take(if normed { r } else { 0 });
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| LayerActs {
                q: k.take(n * c),
                k: k.take(n * c),
                v: k.take(n * c),
                rel_drop: k.take(r * c),
                pos_k: k.take(if c2p_len > 0 { r * c } else { 0 }),
                pos_q: k.take(if p2c_len > 0 { r * c } else { 0 }),
                c2p: k.take(c2p_len),
                p2c: k.take(p2c_len),
                saved: f.take(be.disentangled_attention_saved_len(dims)),
                ffn: FfnActs::carve(&mut k, &mut f, ffn_dims(cfg, n)),
            })
            .collect();
        let acts = Acts {
            emb,
            emb_proj,
            emb_mean,
            emb_rstd,
            emb_ln,
            emb_drop,
            rel,
            rel_mean,
            rel_rstd,
            layers,
            branch: FfnBranch {
                out: k.take(n * c),
                dropped: k.take(n * c),
            },
            cls: k.take(b * c),
            pool_in: f.take(b * c),
            pool_drop: f.take(b * c),
            pool_pre: f.take(b * c),
            pooled: f.take(b * c),
            pooled_drop: f.take(b * c),
            logits: f.take(b),
        };
        let forward_lens = (k.used(), f.used());
        let scratch = Scratch {
            d_out: k.take(n * c),
            d_in: k.take(n * c),
            ffn: FfnScratch::carve(&mut k, ffn_dims(cfg, n)),
            d_q: k.take(n * c),
            d_k: k.take(n * c),
            d_v: k.take(n * c),
            d_c2p: k.take(c2p_len),
            d_p2c: k.take(p2c_len),
            d_pos_k: k.take(if c2p_len > 0 { r * c } else { 0 }),
            d_pos_q: k.take(if p2c_len > 0 { r * c } else { 0 }),
            d_rel_drop: k.take(r * c),
            d_rel: k.take(r * c),
            d_emb: k.take(n * e),
            d_cls: k.take(b * c),
            d_pool: f.take(b * c),
            d_pooled: f.take(b * c),
            d_pool_pre: f.take(b * c),
            d_pool_drop: f.take(b * c),
            d_pool_in: f.take(b * c),
            dlogits: f.take(b),
        };
        let relative = match r {
            0 => Vec::new(),
            _ => relative_positions(t, cfg.position_buckets, cfg.max_relative_positions),
        };
        ActLayout {
            acts,
            scratch,
            b,
            t,
            relative,
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

    /// The pooler output [B, C] before the classifier's dropout (Stats).
    pub fn pooled(&self) -> Buf {
        self.acts.pooled
    }
}

/// Dropout sites of DeBERTa's own (BERT's sites cover the rest): each layer's dropout of
/// the relative embeddings, and the pooler's input. Above every hidden and attention site.
fn site_rel(layer: usize) -> u64 {
    (2 << 32) + layer as u64
}
const SITE_POOL_IN: u64 = 3 << 32;

/// (p, seed) of a site whose p is the config's own rather than `hidden_dropout_prob`.
fn site_seed_with(dropout: Option<Dropout>, site: u64, p: f64) -> (f64, u64) {
    let (_, seed) = site_seed(dropout, site);
    (if dropout.is_some() { p } else { 0.0 }, seed)
}

/// The relative embeddings every layer reads (layer-normed when the config says so).
fn relative_embeddings(p: &Params, a: &Acts) -> Option<Buf> {
    p.rel
        .map(|rel| if p.rel_ln.is_some() { a.rel } else { rel })
}

/// The forward pass on `be`: writes every activation of `l`, the logits last. With
/// `dropout`, training mode.
pub fn forward<B: Backend>(
    cfg: &DebertaConfig,
    be: &mut B,
    tokens: &B::Tokens,
    l: &ActLayout,
    dropout: Option<Dropout>,
) -> Result<()> {
    let (b, t) = (l.b, l.t);
    let (n, c, e) = (b * t, cfg.hidden_size, cfg.embedding_size);
    let ffn = ffn_dims(cfg, n);
    let r = cfg.position_rows();
    let eps = cfg.layer_norm_eps;
    let dims = attention_dims(cfg, b, t);
    let scale = disentangled_scale(cfg.head_size(), cfg.position_terms());
    let layout = ParamLayout::deberta(cfg);
    let p = Params::new(&layout, Arena::Params)?;
    let a = &l.acts;

    match (p.wpe, p.wtt) {
        (Some(wpe), Some(wtt)) => be.embedding_forward(a.emb, tokens, p.wte, wpe, wtt, e)?,
        _ => be.token_embedding_forward(a.emb, tokens, p.wte, e)?,
    }
    let projected = match p.emb_proj {
        Some(w) => {
            be.matmul_forward(a.emb_proj, a.emb, w, None, n, e, c)?;
            a.emb_proj
        }
        None => a.emb,
    };
    be.layernorm_forward(
        a.emb_ln, a.emb_mean, a.emb_rstd, projected, p.emb_ln_w, p.emb_ln_b, n, c, eps,
    )?;
    let (pd, seed) = site_seed(dropout, SITE_EMB);
    be.dropout_forward(a.emb_drop, a.emb_ln, pd, seed)?;
    if let (Some(rel), Some((w, bias))) = (p.rel, p.rel_ln) {
        be.layernorm_forward(a.rel, a.rel_mean, a.rel_rstd, rel, w, bias, r, c, eps)?;
    }
    let rel = relative_embeddings(&p, a);

    let mut input = a.emb_drop;
    for (layer, (la, lp)) in a.layers.iter().zip(&p.layers).enumerate() {
        be.matmul_forward(la.q, input, lp.q.w, Some(lp.q.b), n, c, c)?;
        be.matmul_forward(la.k, input, lp.k.w, Some(lp.k.b), n, c, c)?;
        be.matmul_forward(la.v, input, lp.v.w, Some(lp.v.b), n, c, c)?;
        let mut terms = PositionBufs {
            c2p: None,
            p2c: None,
            rows: r,
        };
        if let Some(rel) = rel {
            let (pd, seed) = site_seed(dropout, site_rel(layer));
            be.dropout_forward(la.rel_drop, rel, pd, seed)?;
            if cfg.c2p {
                let proj = lp.pos_k.unwrap_or(lp.k);
                be.matmul_forward(la.pos_k, la.rel_drop, proj.w, Some(proj.b), r, c, c)?;
                be.position_products_forward(la.c2p, la.q, la.pos_k, dims, r)?;
                terms.c2p = Some(la.c2p);
            }
            if cfg.p2c {
                let proj = lp.pos_q.unwrap_or(lp.q);
                be.matmul_forward(la.pos_q, la.rel_drop, proj.w, Some(proj.b), r, c, c)?;
                be.position_products_forward(la.p2c, la.k, la.pos_q, dims, r)?;
                terms.p2c = Some(la.p2c);
            }
        }
        be.disentangled_attention_forward(
            la.ffn.ctx,
            la.saved,
            la.q,
            la.k,
            la.v,
            terms,
            &l.relative,
            tokens,
            dims,
            scale,
            attention_dropout(dropout, layer),
        )?;
        encoder_ffn_forward(be, &lp.ffn, &la.ffn, a.branch, input, ffn, dropout, layer)?;
        input = la.ffn.ln2;
    }

    // ContextPooler: the first token, dropout, dense, GELU; then dropout and the classifier.
    be.cls_pool_forward(a.cls, input, b, t, c)?;
    be.copy(a.pool_in, a.cls)?;
    let (pd, seed) = site_seed_with(dropout, SITE_POOL_IN, cfg.pooler_dropout);
    be.dropout_forward(a.pool_drop, a.pool_in, pd, seed)?;
    be.matmul_gelu_forward(
        a.pooled,
        a.pool_pre,
        a.pool_drop,
        p.pool.w,
        p.pool.b,
        b,
        c,
        c,
    )?;
    let (pd, seed) = site_seed_with(dropout, SITE_POOL, cfg.cls_dropout);
    be.dropout_forward(a.pooled_drop, a.pooled, pd, seed)?;
    be.matmul_forward(a.logits, a.pooled_drop, p.head.w, Some(p.head.b), b, c, 1)
}

/// The backward pass of the last `forward` with layout `l` (same tokens, same dropout):
/// adds d loss / d parameter into the gradient arena, given the logits' gradient in
/// `l.dlogits()`.
pub fn backward<B: Backend>(
    cfg: &DebertaConfig,
    be: &mut B,
    tokens: &B::Tokens,
    l: &ActLayout,
    dropout: Option<Dropout>,
) -> Result<()> {
    let (b, t) = (l.b, l.t);
    let (n, c, e) = (b * t, cfg.hidden_size, cfg.embedding_size);
    let ffn = ffn_dims(cfg, n);
    let r = cfg.position_rows();
    let dims = attention_dims(cfg, b, t);
    let scale = disentangled_scale(cfg.head_size(), cfg.position_terms());
    let layout = ParamLayout::deberta(cfg);
    let p = Params::new(&layout, Arena::Params)?;
    let g = Params::new(&layout, Arena::Grads)?;
    let (a, s) = (&l.acts, &l.scratch);

    // Classifier and pooler.
    be.zero(s.d_pool)?;
    be.matmul_backward(
        s.d_pool,
        g.head.w,
        Some(g.head.b),
        s.dlogits,
        a.pooled_drop,
        p.head.w,
        b,
        c,
        1,
    )?;
    be.zero(s.d_pooled)?;
    let (pd, seed) = site_seed_with(dropout, SITE_POOL, cfg.cls_dropout);
    be.dropout_backward(s.d_pooled, s.d_pool, pd, seed)?;
    be.zero(s.d_pool_drop)?;
    be.matmul_gelu_backward(
        s.d_pool_drop,
        g.pool.w,
        g.pool.b,
        s.d_pool_pre,
        s.d_pooled,
        a.pool_pre,
        a.pool_drop,
        p.pool.w,
        p.pool.b,
        b,
        c,
        c,
    )?;
    be.zero(s.d_pool_in)?;
    let (pd, seed) = site_seed_with(dropout, SITE_POOL_IN, cfg.pooler_dropout);
    be.dropout_backward(s.d_pool_in, s.d_pool_drop, pd, seed)?;
    be.copy(s.d_cls, s.d_pool_in)?;
    let (mut d_out, mut d_in) = (s.d_out, s.d_in);
    be.zero(d_out)?;
    be.cls_pool_backward(d_out, s.d_cls, b, t, c)?;
    // The relative embeddings' gradient, summed over the layers: into their LayerNorm's
    // output when normed, else straight into the table's gradient.
    let d_rel = match (p.rel_ln, g.rel) {
        (Some(_), _) => Some(s.d_rel),
        (None, grad_rel) => grad_rel,
    };
    if let (Some(_), Some(d)) = (p.rel_ln, d_rel) {
        be.zero(d)?;
    }

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
        let terms = PositionBufs {
            c2p: (r > 0 && cfg.c2p).then_some(la.c2p),
            p2c: (r > 0 && cfg.p2c).then_some(la.p2c),
            rows: r,
        };
        let dterms = PositionBufs {
            c2p: terms.c2p.map(|_| s.d_c2p),
            p2c: terms.p2c.map(|_| s.d_p2c),
            rows: r,
        };
        for d in [dterms.c2p, dterms.p2c].into_iter().flatten() {
            be.zero(d)?;
        }
        be.disentangled_attention_backward(
            s.d_q,
            s.d_k,
            s.d_v,
            dterms,
            s.ffn.d_ctx,
            la.q,
            la.k,
            la.v,
            terms,
            la.saved,
            &l.relative,
            tokens,
            dims,
            scale,
            attention_dropout(dropout, layer),
        )?;
        // The position products: their gradients into q, k, the projected relative
        // embeddings and, through the projection, the layer's weights and rel_drop.
        if r > 0 {
            be.zero(s.d_rel_drop)?;
            if cfg.c2p {
                be.zero(s.d_pos_k)?;
                be.position_products_backward(s.d_q, s.d_pos_k, s.d_c2p, la.q, la.pos_k, dims, r)?;
                let (proj, dproj) = match (lp.pos_k, lg.pos_k) {
                    (Some(proj), Some(dproj)) => (proj, dproj),
                    _ => (lp.k, lg.k),
                };
                be.matmul_backward(
                    s.d_rel_drop,
                    dproj.w,
                    Some(dproj.b),
                    s.d_pos_k,
                    la.rel_drop,
                    proj.w,
                    r,
                    c,
                    c,
                )?;
            }
            if cfg.p2c {
                be.zero(s.d_pos_q)?;
                be.position_products_backward(s.d_k, s.d_pos_q, s.d_p2c, la.k, la.pos_q, dims, r)?;
                let (proj, dproj) = match (lp.pos_q, lg.pos_q) {
                    (Some(proj), Some(dproj)) => (proj, dproj),
                    _ => (lp.q, lg.q),
                };
                be.matmul_backward(
                    s.d_rel_drop,
                    dproj.w,
                    Some(dproj.b),
                    s.d_pos_q,
                    la.rel_drop,
                    proj.w,
                    r,
                    c,
                    c,
                )?;
            }
            if let Some(d_rel) = d_rel {
                let (pd, seed) = site_seed(dropout, site_rel(layer));
                be.dropout_backward(d_rel, s.d_rel_drop, pd, seed)?;
            }
        }
        for (d, w_grad, b_grad, weight) in [
            (s.d_q, lg.q.w, lg.q.b, lp.q.w),
            (s.d_k, lg.k.w, lg.k.b, lp.k.w),
            (s.d_v, lg.v.w, lg.v.b, lp.v.w),
        ] {
            be.matmul_backward(d_in, w_grad, Some(b_grad), d, input, weight, n, c, c)?;
        }
        be.grads_final(lg.span()?)?;
        std::mem::swap(&mut d_out, &mut d_in);
    }

    // Normed relative embeddings: through their LayerNorm into the table.
    if let (Some(rel), Some(grad_rel), Some((w, _)), Some((dw, db))) =
        (p.rel, g.rel, p.rel_ln, g.rel_ln)
    {
        be.layernorm_backward(
            grad_rel, dw, db, s.d_rel, rel, w, a.rel_mean, a.rel_rstd, r, c,
        )?;
    }

    // Embeddings.
    be.zero(d_in)?;
    let (pd, seed) = site_seed(dropout, SITE_EMB);
    be.dropout_backward(d_in, d_out, pd, seed)?;
    let projected = if p.emb_proj.is_some() {
        a.emb_proj
    } else {
        a.emb
    };
    // The block's d_res2 [N, C] is free again: the projection's output gradient.
    let d_projected = if p.emb_proj.is_some() {
        s.ffn.d_res2
    } else {
        s.d_emb
    };
    be.zero(d_projected)?;
    be.layernorm_backward(
        d_projected,
        g.emb_ln_w,
        g.emb_ln_b,
        d_in,
        projected,
        p.emb_ln_w,
        a.emb_mean,
        a.emb_rstd,
        n,
        c,
    )?;
    if let (Some(w), Some(dw)) = (p.emb_proj, g.emb_proj) {
        be.zero(s.d_emb)?;
        be.matmul_backward(s.d_emb, dw, None, s.ffn.d_res2, a.emb, w, n, e, c)?;
    }
    match (g.wpe, g.wtt) {
        (Some(dwpe), Some(dwtt)) => be.embedding_backward(g.wte, dwpe, dwtt, s.d_emb, tokens, e)?,
        _ => be.token_embedding_backward(g.wte, s.d_emb, tokens, e)?,
    }
    // The padding row gets no gradient (nn.Embedding's padding_idx).
    let pad = cfg.pad_token_id as usize;
    be.zero(g.wte.part(pad * e, e))?;
    Ok(())
}
