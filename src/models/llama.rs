//! Decoder reward models of the Llama family as Hugging Face defines them:
//! `LlamaForSequenceClassification`, `MistralForSequenceClassification` and
//! `Qwen2ForSequenceClassification` with one label. Pre-norm decoder layers (RMSNorm,
//! rotary position embeddings, grouped-query causal attention, SwiGLU MLP), a final RMSNorm,
//! and `score` [1, C] (no bias) read at the last real token. Forward and backward are written
//! once over the `Backend` ops, as bert.rs.
//!
//! Notation: B sequences of T tokens (N = B*T rows), C hidden, NH query heads and NKV
//! key/value heads of HD channels (QD = NH*HD, KD = NKV*HD), I the MLP width, V the
//! vocabulary.

use std::ops::Range;
use std::path::Path;
use std::sync::Once;

use serde_json::{Value, json};

use super::{BatchTokens, Dropout, ParamLayout, TensorSpec, attention_dropout};
use crate::backend::cpu::{Llama3RopeScaling, rope_inv_freq};
use crate::backend::{
    Arena, AttentionDropout, Backend, Batch, Buf, Carver, CausalDims, SharedPrefix, span,
};
use crate::error::{Error, Result};
use crate::hf_config::{ConfigKeys, read_json_object};
use crate::models::BertConfig;
use crate::rng::derive_seed;
use crate::safetensors::write_atomic;

/// The three families: one structure, their config.json keys and biases differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
}

impl Family {
    /// config.json's `model_type` of each family.
    pub fn from_model_type(model_type: &str) -> Option<Family> {
        match model_type {
            "llama" => Some(Family::Llama),
            "mistral" => Some(Family::Mistral),
            "qwen2" => Some(Family::Qwen2),
            _ => None,
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
        }
    }

    /// The transformers class a saved folder names in `architectures`.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForSequenceClassification",
            Family::Mistral => "MistralForSequenceClassification",
            Family::Qwen2 => "Qwen2ForSequenceClassification",
        }
    }
}

/// The architecture, as transformers' LlamaConfig, MistralConfig and Qwen2Config name it.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// `rope_type: llama3`; None for the default rotary embedding.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Biases on q_proj, k_proj, v_proj (Llama's `attention_bias`; always on in Qwen2).
    pub qkv_bias: bool,
    /// A bias on o_proj (Llama's `attention_bias`; never in Qwen2).
    pub o_bias: bool,
    /// Biases on gate_proj, up_proj, down_proj (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    pub max_position_embeddings: usize,
    /// The reward is read at the rightmost token that is not this id (transformers' rule);
    /// None: at the last real token of the mask (transformers reads the last position of a
    /// batch of one and refuses larger batches).
    pub pad_token_id: Option<u32>,
    pub eos_token_id: Vec<u32>,
    pub initializer_range: f64,
    pub attention_dropout: f64,
    /// The attention window of Mistral's and Qwen2's sliding-window layers, when any layer
    /// has one: rcx attends to every earlier token, so sequences longer than it are refused.
    pub sliding_window: Option<usize>,
}

impl LlamaConfig {
    /// The from-scratch decoders rcx knows by name, with their shipped tokenizer (in data/,
    /// made by scripts/gen_llama_tokenizer.py): Llama 3's structure (RMSNorm, rotary
    /// positions, SwiGLU, grouped-query attention, no biases) at two small sizes.
    pub fn named(name: &str) -> Option<(LlamaConfig, &'static str)> {
        let (layers, hidden, heads, kv_heads, intermediate) = match name {
            "llama-tiny" => (2, 128, 4, 2, 352),
            "llama-small" => (8, 512, 8, 4, 1408),
            _ => return None,
        };
        let config = LlamaConfig {
            family: Family::Llama,
            vocab_size: 8000,
            hidden_size: hidden,
            intermediate_size: intermediate,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: hidden / heads,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            max_position_embeddings: 512,
            // The shipped tokenizer's <|pad|>; <|end_of_text|> ends every sequence.
            pad_token_id: Some(2),
            eos_token_id: vec![1],
            initializer_range: 0.02,
            attention_dropout: 0.0,
            sliding_window: None,
        };
        Some((config, "llama-tiny.tokenizer.json"))
    }

    pub const NAMES: &'static [&'static str] = &["llama-tiny", "llama-small"];

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The id batches are padded with: pad_token_id, else the first eos_token_id, else 0
    /// (without a pad id the reward is read by the mask, so the id does not matter).
    pub fn padding_id(&self) -> u32 {
        self.pad_token_id
            .or(self.eos_token_id.first().copied())
            .unwrap_or(0)
    }

    /// Reads a Llama, Mistral or Qwen2 `config.json`. Keys that change the math and that
    /// rcx does not implement are refused, naming the file and the key.
    pub fn from_hf_json(path: &Path) -> Result<LlamaConfig> {
        let obj = read_json_object(path)?;
        let keys = ConfigKeys { path, obj: &obj };
        let model_type = keys.string("model_type", None)?;
        let Some(family) = Family::from_model_type(&model_type) else {
            return Err(keys.error(
                "model_type",
                &format!("expected \"llama\", \"mistral\" or \"qwen2\", found \"{model_type}\""),
            ));
        };
        let hidden_act = keys.string("hidden_act", Some("silu"))?;
        if hidden_act != "silu" {
            return Err(keys.error(
                "hidden_act",
                &format!("expected \"silu\" (SwiGLU), found \"{hidden_act}\""),
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
        let num_key_value_heads = keys
            .optional_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        let head_dim = match keys.optional_usize("head_dim")? {
            Some(d) => d,
            None => hidden_size / num_attention_heads,
        };
        let (rope_theta, rope_scaling) = keys.rope()?;
        let attention_bias = keys.bool_or("attention_bias", false)?;
        let (qkv_bias, o_bias, mlp_bias) = match family {
            Family::Llama => (
                attention_bias,
                attention_bias,
                keys.bool_or("mlp_bias", false)?,
            ),
            Family::Mistral => (false, false, false),
            Family::Qwen2 => (true, false, false),
        };
        let num_hidden_layers = keys.positive("num_hidden_layers")?;
        let config = LlamaConfig {
            family,
            vocab_size: keys.positive("vocab_size")?,
            hidden_size,
            intermediate_size: keys.positive("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: keys.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            qkv_bias,
            o_bias,
            mlp_bias,
            max_position_embeddings: keys.positive("max_position_embeddings")?,
            pad_token_id: keys.optional_id("pad_token_id")?,
            eos_token_id: keys.ids("eos_token_id")?,
            initializer_range: keys.f64_or("initializer_range", 0.02)?,
            attention_dropout: keys.f64_or("attention_dropout", 0.0)?,
            sliding_window: keys.sliding_window(family, num_hidden_layers)?,
        };
        config.validate(&path.display().to_string())?;
        Ok(config)
    }

    /// Writes the config.json that transformers loads as this family's
    /// `*ForSequenceClassification` with one label.
    pub fn write_hf_json(&self, path: &Path) -> Result<()> {
        let mut rope = json!({"rope_theta": self.rope_theta, "rope_type": "default"});
        if let Some(s) = self.rope_scaling {
            rope = json!({
                "rope_theta": self.rope_theta,
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings as u64,
            });
        }
        let eos = match self.eos_token_id.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let mut obj = json!({
            "architectures": [self.family.architecture()],
            "model_type": self.family.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": eos,
            "initializer_range": self.initializer_range,
            "attention_dropout": self.attention_dropout,
            "tie_word_embeddings": false,
            "torch_dtype": "float32",
            "id2label": {"0": "LABEL_0"},
            "label2id": {"LABEL_0": 0},
            "problem_type": "regression",
        });
        match self.family {
            Family::Llama => {
                obj["attention_bias"] = json!(self.qkv_bias);
                obj["mlp_bias"] = json!(self.mlp_bias);
            }
            Family::Mistral => obj["sliding_window"] = json!(self.sliding_window),
            Family::Qwen2 => {
                obj["use_sliding_window"] = json!(self.sliding_window.is_some());
                obj["sliding_window"] = json!(self.sliding_window);
                obj["max_window_layers"] = json!(0);
            }
        }
        let mut text = serde_json::to_string_pretty(&obj)
            .map_err(|e| Error::internal(format!("writing {}: {e}", path.display())))?;
        text.push('\n');
        write_atomic(path, text.as_bytes())
    }

    /// Rejects shapes the ops cannot run and sizes rcx cannot hold, before anything is
    /// allocated from them; errors name `origin` and the key.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let err = |key: &str, msg: String| Error::user(format!("{origin}: key '{key}': {msg}"));
        for (key, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(err(key, "must be positive".into()));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(err(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(err(
                "head_dim",
                format!(
                    "{} is odd; rotary embeddings turn channel pairs",
                    self.head_dim
                ),
            ));
        }
        for (key, x) in [
            ("rms_norm_eps", self.rms_norm_eps),
            ("rope_theta", self.rope_theta),
        ] {
            if !(x > 0.0 && x.is_finite()) {
                return Err(err(key, format!("expected a positive number, found {x}")));
            }
        }
        if !(self.initializer_range >= 0.0 && self.initializer_range.is_finite()) {
            return Err(err(
                "initializer_range",
                format!("expected a number >= 0, found {}", self.initializer_range),
            ));
        }
        if !(0.0..1.0).contains(&self.attention_dropout) {
            return Err(err(
                "attention_dropout",
                format!(
                    "expected a probability in [0, 1), found {}",
                    self.attention_dropout
                ),
            ));
        }
        for (key, id) in [("pad_token_id", self.pad_token_id)].into_iter().chain(
            self.eos_token_id
                .iter()
                .map(|&id| ("eos_token_id", Some(id))),
        ) {
            if let Some(id) = id.filter(|&id| id as usize >= self.vocab_size) {
                return Err(err(
                    key,
                    format!("{id} is not below vocab_size {}", self.vocab_size),
                ));
            }
        }
        self.check_sizes(origin)
    }

    /// Every tensor, each size key alone and the whole, within BertConfig::MAX_PARAMETERS
    /// in overflow-checked arithmetic (the same bounds as BERT's).
    fn check_sizes(&self, origin: &str) -> Result<()> {
        let max = BertConfig::MAX_PARAMETERS;
        let (c, i) = (self.hidden_size, self.intermediate_size);
        let too_large = |key: &str, what: &str, needed: Option<usize>| {
            let needed = needed.map_or_else(
                || format!("more than {} values", usize::MAX),
                |n| format!("{n} values"),
            );
            Error::user(format!(
                "{origin}: key '{key}': too large: {what} would need {needed}; rcx holds at \
                 most {max} parameters"
            ))
        };
        let q = self.num_attention_heads.checked_mul(self.head_dim);
        let kv = self.num_key_value_heads.checked_mul(self.head_dim);
        let q_matrix = q.and_then(|q| q.checked_mul(c));
        let kv_matrix = kv.and_then(|kv| kv.checked_mul(c));
        for (key, what, needed) in [
            (
                "vocab_size",
                "the token embeddings",
                self.vocab_size.checked_mul(c),
            ),
            ("num_attention_heads", "a query projection", q_matrix),
            ("num_key_value_heads", "a key projection", kv_matrix),
            ("intermediate_size", "an MLP projection", i.checked_mul(c)),
        ] {
            if needed.is_none_or(|n| n > max) {
                return Err(too_large(key, what, needed));
            }
        }
        if self.num_hidden_layers > BertConfig::MAX_LAYERS {
            return Err(Error::user(format!(
                "{origin}: key 'num_hidden_layers': {} is above the {} layers rcx builds",
                self.num_hidden_layers,
                BertConfig::MAX_LAYERS
            )));
        }
        // Per layer: q and o [QD, C], k and v [KD, C], three MLP matrices, biases, norms.
        let per_layer = (|| {
            let attention = q_matrix?
                .checked_mul(2)?
                .checked_add(kv_matrix?.checked_mul(2)?)?;
            let mlp = i.checked_mul(c)?.checked_mul(3)?;
            let small = q?
                .checked_add(kv?.checked_mul(2)?)?
                .checked_add(i.checked_mul(2)?)?;
            attention
                .checked_add(mlp)?
                .checked_add(small)?
                .checked_add(c.checked_mul(3)?)
        })();
        let total = per_layer
            .and_then(|n| n.checked_mul(self.num_hidden_layers))
            .and_then(|n| n.checked_add(self.vocab_size * c)?.checked_add(2 * c));
        if total.is_none_or(|n| n > max) {
            return Err(too_large(
                "num_hidden_layers",
                &format!("{} decoder layers", self.num_hidden_layers),
                total,
            ));
        }
        Ok(())
    }

    /// transformers' `*ForSequenceClassification` reads the reward at the last token that
    /// is not pad_token_id; when pad equals an EOS id the trailing EOS counts as padding
    /// and the reward is read one token earlier. Says so once per process.
    pub fn warn_if_pad_is_eos(&self, origin: &str) {
        static ONCE: Once = Once::new();
        if let Some(pad) = self.pad_token_id.filter(|p| self.eos_token_id.contains(p)) {
            ONCE.call_once(|| {
                eprintln!(
                    "rcx: warning: {origin}: pad_token_id {pad} is also the EOS token: the \
                     reward is read at the last token that is not {pad}, before a trailing EOS \
                     (transformers' rule, kept for equal logits)"
                );
            });
        }
    }

    /// The reward's row of each sequence of `batch` (transformers' rule; see pad_token_id).
    pub fn reward_rows(&self, batch: &Batch) -> Vec<u32> {
        let t = batch.t;
        (0..batch.b)
            .map(|s| {
                let ids = &batch.input_ids[s * t..(s + 1) * t];
                let mask = &batch.mask[s * t..(s + 1) * t];
                let real = |j: usize| match self.pad_token_id {
                    Some(pad) => ids[j] != pad,
                    None => mask[j] != 0,
                };
                // argmax of j · real(j): the last real position, 0 when there is none.
                (0..t).rev().find(|&j| real(j)).unwrap_or(0) as u32
            })
            .collect()
    }
}

/// The decoder-only look-ups of a config.json.
trait DecoderKeys {
    fn rope(&self) -> Result<(f64, Option<Llama3RopeScaling>)>;
    fn sliding_window(&self, family: Family, layers: usize) -> Result<Option<usize>>;
}

impl DecoderKeys for ConfigKeys<'_> {
    /// rope_theta and the llama3 scaling, from transformers 5's `rope_parameters` or the
    /// older `rope_theta` + `rope_scaling` keys. Any rope type but `default` and `llama3`
    /// is refused.
    fn rope(&self) -> Result<(f64, Option<Llama3RopeScaling>)> {
        let (key, params) = match (self.get("rope_parameters"), self.get("rope_scaling")) {
            (Some(p), _) => ("rope_parameters", Some(p)),
            (None, Some(p)) => ("rope_scaling", Some(p)),
            (None, None) => ("rope_scaling", None),
        };
        let Some(params) = params else {
            return Ok((self.f64_or("rope_theta", 10000.0)?, None));
        };
        let Value::Object(p) = params else {
            return Err(self.error(key, &format!("expected an object, found {params}")));
        };
        let field = |name: &str| p.get(name).filter(|v| !v.is_null());
        let theta = match field("rope_theta") {
            Some(v) => self.number_of(&format!("{key}.rope_theta"), v)?,
            None => self.f64_or("rope_theta", 10000.0)?,
        };
        let rope_type = field("rope_type").or_else(|| field("type"));
        let rope_type = match rope_type {
            None => "default".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => {
                return Err(self.error(
                    &format!("{key}.rope_type"),
                    &format!("expected a string, found {v}"),
                ));
            }
        };
        match rope_type.as_str() {
            "default" => Ok((theta, None)),
            "llama3" => {
                let number = |name: &str| -> Result<f64> {
                    let full = format!("{key}.{name}");
                    let v = field(name).ok_or_else(|| self.error(&full, "missing (llama3)"))?;
                    let x = self.number_of(&full, v)?;
                    if !(x > 0.0 && x.is_finite()) {
                        return Err(
                            self.error(&full, &format!("expected a positive number, found {x}"))
                        );
                    }
                    Ok(x)
                };
                let scaling = Llama3RopeScaling {
                    factor: number("factor")?,
                    low_freq_factor: number("low_freq_factor")?,
                    high_freq_factor: number("high_freq_factor")?,
                    original_max_position_embeddings: number("original_max_position_embeddings")?,
                };
                if scaling.high_freq_factor <= scaling.low_freq_factor {
                    return Err(self.error(
                        &format!("{key}.high_freq_factor"),
                        &format!(
                            "{} must be above low_freq_factor {}",
                            scaling.high_freq_factor, scaling.low_freq_factor
                        ),
                    ));
                }
                Ok((theta, Some(scaling)))
            }
            other => Err(self.error(
                &format!("{key}.rope_type"),
                &format!("\"{other}\" is not supported; rcx implements \"default\" and \"llama3\""),
            )),
        }
    }

    /// The window of the family's sliding-window layers, when any layer has one.
    fn sliding_window(&self, family: Family, layers: usize) -> Result<Option<usize>> {
        let window = self.optional_usize("sliding_window")?;
        match family {
            Family::Llama => Ok(None),
            Family::Mistral => Ok(window),
            Family::Qwen2 => {
                let sliding_layer = match self.get("layer_types") {
                    Some(Value::Array(types)) => types
                        .iter()
                        .any(|t| t.as_str() == Some("sliding_attention")),
                    _ => {
                        let max_window_layers =
                            self.optional_usize("max_window_layers")?.unwrap_or(28);
                        self.bool_or("use_sliding_window", false)? && max_window_layers < layers
                    }
                };
                Ok(window.filter(|_| sliding_layer))
            }
        }
    }
}

impl ParamLayout {
    /// Every tensor of `*ForSequenceClassification` with transformers' names, in a fixed
    /// order; AdamW decays the matrices only.
    pub fn llama(cfg: &LlamaConfig) -> ParamLayout {
        let (c, i, qd, kd) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.q_dim(),
            cfg.kv_dim(),
        );
        let mut tensors = Vec::new();
        let mut total = 0;
        let mut add = |name: String, shape: Vec<usize>| {
            let spec = TensorSpec {
                name,
                decay: shape.len() == 2,
                shape,
                offset: total,
            };
            total += spec.len();
            tensors.push(spec);
        };
        add("model.embed_tokens.weight".into(), vec![cfg.vocab_size, c]);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            add(format!("{p}.input_layernorm.weight"), vec![c]);
            for (name, out_dim, in_dim, bias) in [
                ("self_attn.q_proj", qd, c, cfg.qkv_bias),
                ("self_attn.k_proj", kd, c, cfg.qkv_bias),
                ("self_attn.v_proj", kd, c, cfg.qkv_bias),
                ("self_attn.o_proj", c, qd, cfg.o_bias),
                ("mlp.gate_proj", i, c, cfg.mlp_bias),
                ("mlp.up_proj", i, c, cfg.mlp_bias),
                ("mlp.down_proj", c, i, cfg.mlp_bias),
            ] {
                add(format!("{p}.{name}.weight"), vec![out_dim, in_dim]);
                if bias {
                    add(format!("{p}.{name}.bias"), vec![out_dim]);
                }
            }
            add(format!("{p}.post_attention_layernorm.weight"), vec![c]);
        }
        add("model.norm.weight".into(), vec![c]);
        add("score.weight".into(), vec![1, c]);
        ParamLayout { tensors, total }
    }
}

/// A linear layer's weight and optional bias.
#[derive(Clone, Copy)]
struct Linear {
    w: Buf,
    b: Option<Buf>,
}

/// One decoder layer's parameters (or, in the gradient arena, their gradients).
#[derive(Clone, Copy)]
struct LayerParams {
    ln1_w: Buf,   // [C]
    q: Linear,    // [QD, C], [QD]
    k: Linear,    // [KD, C], [KD]
    v: Linear,    // [KD, C], [KD]
    o: Linear,    // [C, QD], [C]
    gate: Linear, // [I, C], [I]
    up: Linear,   // [I, C], [I]
    down: Linear, // [C, I], [C]
    ln2_w: Buf,   // [C]
}

impl LayerParams {
    /// The layer's range of its arena.
    fn span(&self) -> Result<Range<usize>> {
        let linears = [
            self.q, self.k, self.v, self.o, self.gate, self.up, self.down,
        ];
        let bufs = linears.into_iter().flat_map(|l| [Some(l.w), l.b]).flatten();
        span(bufs.chain([self.ln1_w, self.ln2_w]))
    }
}

/// All parameters in the order of `ParamLayout::llama`.
struct Params {
    wte: Buf, // [V, C]
    layers: Vec<LayerParams>,
    norm_w: Buf,  // [C]
    score_w: Buf, // [1, C]
}

impl Params {
    fn new(cfg: &LlamaConfig, arena: Arena) -> Params {
        let (c, i, qd, kd) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.q_dim(),
            cfg.kv_dim(),
        );
        let mut k = Carver::new(arena);
        let wte = k.take(cfg.vocab_size * c);
        let linear = |k: &mut Carver, out_dim: usize, in_dim: usize, bias: bool| Linear {
            w: k.take(out_dim * in_dim),
            b: bias.then(|| k.take(out_dim)),
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| LayerParams {
                ln1_w: k.take(c),
                q: linear(&mut k, qd, c, cfg.qkv_bias),
                k: linear(&mut k, kd, c, cfg.qkv_bias),
                v: linear(&mut k, kd, c, cfg.qkv_bias),
                o: linear(&mut k, c, qd, cfg.o_bias),
                gate: linear(&mut k, i, c, cfg.mlp_bias),
                up: linear(&mut k, i, c, cfg.mlp_bias),
                down: linear(&mut k, c, i, cfg.mlp_bias),
                ln2_w: k.take(c),
            })
            .collect();
        Params {
            wte,
            layers,
            norm_w: k.take(c),
            score_w: k.take(c),
        }
    }
}

/// One layer's activations, saved for the backward.
struct LayerActs {
    ln1: Buf,           // [N, C] input_layernorm(x)
    ln1_rstd: Buf,      // Stats [N]
    q_pre: Buf,         // [N, QD] before RoPE
    k_pre: Buf,         // [N, KD] before RoPE
    q: Buf,             // [N, QD]
    k: Buf,             // [N, KD]
    v: Buf,             // [N, KD]
    saved: Buf,         // Stats: what the backend's causal attention keeps (of the sequences)
    saved_prompts: Buf, // Stats: the same of the shared prompts (empty without them)
    ctx: Buf,           // [N, QD]
    res1: Buf,          // [N, C] x + attention branch
    ln2: Buf,           // [N, C] post_attention_layernorm(res1)
    ln2_rstd: Buf,      // Stats [N]
    gate: Buf,          // [N, I]
    up: Buf,            // [N, I]
    act: Buf,           // [N, I] silu(gate) · up
    out: Buf,           // [N, C] res1 + MLP branch: the layer's output
}

struct Acts {
    emb: Buf, // [N, C] the input of layer 0
    cos: Buf, // Stats [N, HD/2]
    sin: Buf, // Stats [N, HD/2]
    layers: Vec<LayerActs>,
    branch: Buf,    // [N, C] a layer's attention output, then its MLP output
    normed: Buf,    // [N, C] model.norm of the last layer's output
    norm_rstd: Buf, // Stats [N]
    last: Buf,      // [B, C] the reward token of each sequence
    pooled: Buf,    // Stats [B, C] the same in fp32: the head runs in fp32
    logits: Buf,    // Stats [B]
}

/// The backward's buffers, reused by every layer.
struct Scratch {
    d_x: Buf,               // [N, C] gradient of the residual stream
    d_res1: Buf,            // [N, C]
    d_branch: Buf,          // [N, C]
    d_ln: Buf,              // [N, C] gradient of a norm's output
    d_act: Buf,             // [N, I]
    d_gate: Buf,            // [N, I]
    d_up: Buf,              // [N, I]
    d_ctx: Buf,             // [N, QD]
    d_q: Buf,               // [N, QD]
    d_k: Buf,               // [N, KD]
    d_v: Buf,               // [N, KD]
    d_q_pre: Buf,           // [N, QD]
    d_k_pre: Buf,           // [N, KD]
    d_last: Buf,            // [B, C]
    attention_scratch: Buf, // Stats
    d_pooled: Buf,          // Stats [B, C]
    dlogits: Buf,           // Stats [B]
}

/// The rows of a batch's activations: every sequence whole, or (the shared prefix) the
/// common prefix of each group of sequences once, then the rest of every sequence.
#[derive(Clone, Copy, Debug)]
enum Rows {
    /// B sequences of T tokens.
    Whole { b: usize, t: usize },
    /// P prefixes of TP tokens (rows 0..P·TP), then the rests of the B sequences, TS tokens
    /// each.
    Shared {
        p: usize,
        tp: usize,
        b: usize,
        ts: usize,
    },
}

impl Rows {
    /// N: all rows.
    fn n(self) -> usize {
        match self {
            Rows::Whole { b, t } => b * t,
            Rows::Shared { p, tp, b, ts } => p * tp + b * ts,
        }
    }

    /// The sequences (one logit each).
    fn sequences(self) -> usize {
        match self {
            Rows::Whole { b, .. } | Rows::Shared { b, .. } => b,
        }
    }

    /// The rows before the sequences' own: the shared prefixes' (0 without).
    fn prefix_rows(self) -> usize {
        match self {
            Rows::Whole { .. } => 0,
            Rows::Shared { p, tp, .. } => p * tp,
        }
    }

    /// Tokens per sequence in the sequences' rows (T, or TS).
    fn seq_len(self) -> usize {
        match self {
            Rows::Whole { t, .. } => t,
            Rows::Shared { ts, .. } => ts,
        }
    }
}

/// A batch split for the shared prefix. With causal attention a token's hidden states
/// depend on the tokens before it only, so the tokens a group of sequences (the completions
/// of one prompt, `Batch::groups`) has in common at their start are computed once: each
/// group's longest common prefix, cut before the first reward token so that every sequence
/// keeps its reward token in its rest. The rest of a sequence continues its prefix at the
/// prefix's length (positions) and attends to the prefix's real keys (exactly what the
/// same tokens see in the whole sequence). Prompts truncated differently across their
/// completions share what they still have in common.
pub struct SharedSplit {
    /// [P, TP]: each group's prefix.
    pub prompts: Batch,
    /// [B, TS]: the rest of every sequence, grouped as the batch.
    pub completions: Batch,
    /// [P] real tokens of each prefix.
    lens: Vec<usize>,
    /// [B] the reward token of each sequence, in its rest.
    rows: Vec<u32>,
}

impl SharedSplit {
    /// None when the batch's sequences are not grouped, or when sharing would not save
    /// rows (prefixes too short for their padding).
    pub fn new(cfg: &LlamaConfig, batch: &Batch) -> Option<SharedSplit> {
        if batch.groups.is_empty() || batch.groups.iter().sum::<usize>() != batch.b {
            return None;
        }
        let t = batch.t;
        let full_rows = cfg.reward_rows(batch);
        let ids = |s: usize| &batch.input_ids[s * t..(s + 1) * t];
        let mut lens = Vec::with_capacity(batch.groups.len());
        let mut start = 0;
        for &count in &batch.groups {
            let first = ids(start);
            // Up to the earliest reward token of the group: every token before it is real.
            let mut len = (start..start + count)
                .map(|s| full_rows[s] as usize)
                .min()
                .unwrap_or(0);
            for s in start + 1..start + count {
                len = first[..len]
                    .iter()
                    .zip(ids(s))
                    .take_while(|(a, b)| a == b)
                    .count();
            }
            lens.push(len);
            start += count;
        }
        let pad = cfg.padding_id();
        let real = |s: usize| {
            batch.mask[s * t..(s + 1) * t]
                .iter()
                .filter(|&&m| m != 0)
                .count()
        };
        let of_sequence = batch.of_sequence();
        let rests: Vec<(&[u32], usize)> = (0..batch.b)
            .map(|s| {
                let len = lens[of_sequence[s] as usize];
                (&ids(s)[len..real(s)], len)
            })
            .collect();
        let (p, tp) = (lens.len(), lens.iter().copied().max().unwrap_or(0));
        let ts = rests.iter().map(|(r, _)| r.len()).max().unwrap_or(0);
        if tp == 0 || p * tp + batch.b * ts >= batch.b * t {
            return None;
        }
        let zeros = vec![0u8; t];
        let mut start = 0;
        let prefixes: Vec<(&[u32], &[u8])> = batch
            .groups
            .iter()
            .zip(&lens)
            .map(|(&count, &len)| {
                let prefix = (&ids(start)[..len], &zeros[..len]);
                start += count;
                prefix
            })
            .collect();
        let rows = (0..batch.b)
            .map(|s| full_rows[s] - rests[s].1 as u32)
            .collect();
        Some(SharedSplit {
            prompts: Batch::from_sequences(prefixes, pad),
            completions: Batch::from_sequences(
                rests.iter().map(|(r, _)| (*r, &zeros[..r.len()])),
                pad,
            )
            .grouped(batch.groups.clone()),
            lens,
            rows,
        })
    }
}

/// Where every activation of a batch lives (N rows: `Rows`), the arena sizes that needs,
/// and the batch's host-side indices (positions, reward rows).
pub struct ActLayout {
    acts: Acts,
    scratch: Scratch,
    rows: Rows,
    /// [N] each row's position (what its rotary angles turn by): 0..T per sequence, or
    /// 0..TP per prefix and the prefix's length onwards in the rest of a sequence.
    positions: Vec<u32>,
    /// [B] the row of each sequence's reward token among its own rows.
    reward_rows: Vec<u32>,
    pub forward_lens: (usize, usize),
    pub lens: (usize, usize),
}

fn causal_dims(cfg: &LlamaConfig, b: usize, t: usize, tp: usize) -> CausalDims {
    CausalDims {
        b,
        t,
        nh: cfg.num_attention_heads,
        nkv: cfg.num_key_value_heads,
        hs: cfg.head_dim,
        tp,
    }
}

impl ActLayout {
    /// The layout of `batch`, split as `split` says (the shared prefix) when given.
    pub fn new<B: Backend>(
        cfg: &LlamaConfig,
        be: &B,
        batch: &Batch,
        split: Option<&SharedSplit>,
    ) -> ActLayout {
        let (rows, positions, reward_rows) = match split {
            None => {
                let t = batch.t;
                let positions = (0..batch.b * t).map(|row| (row % t) as u32).collect();
                let rows = Rows::Whole { b: batch.b, t };
                (rows, positions, cfg.reward_rows(batch))
            }
            Some(split) => {
                let (p, tp) = (split.prompts.b, split.prompts.t);
                let ts = split.completions.t;
                let mut positions: Vec<u32> = (0..p * tp).map(|row| (row % tp) as u32).collect();
                for g in split.completions.of_sequence() {
                    let len = split.lens[g as usize] as u32;
                    positions.extend((0..ts as u32).map(|j| len + j));
                }
                let rows = Rows::Shared {
                    p,
                    tp,
                    b: split.completions.b,
                    ts,
                };
                (rows, positions, split.rows.clone())
            }
        };
        let (n, b) = (rows.n(), rows.sequences());
        let (c, i, qd, kd) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.q_dim(),
            cfg.kv_dim(),
        );
        let half = cfg.head_dim / 2;
        let (dims, prompt_dims) = attention_dims(cfg, rows);
        let mut k = Carver::new(Arena::Acts);
        let mut f = Carver::new(Arena::Stats);
        let emb = k.take(n * c);
        let cos = f.take(n * half);
        let sin = f.take(n * half);
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| LayerActs {
                ln1: k.take(n * c),
                ln1_rstd: f.take(n),
                q_pre: k.take(n * qd),
                k_pre: k.take(n * kd),
                q: k.take(n * qd),
                k: k.take(n * kd),
                v: k.take(n * kd),
                saved: f.take(be.causal_attention_saved_len(dims)),
                saved_prompts: f.take(prompt_dims.map_or(0, |d| be.causal_attention_saved_len(d))),
                ctx: k.take(n * qd),
                res1: k.take(n * c),
                ln2: k.take(n * c),
                ln2_rstd: f.take(n),
                gate: k.take(n * i),
                up: k.take(n * i),
                act: k.take(n * i),
                out: k.take(n * c),
            })
            .collect();
        let acts = Acts {
            emb,
            cos,
            sin,
            layers,
            branch: k.take(n * c),
            normed: k.take(n * c),
            norm_rstd: f.take(n),
            last: k.take(b * c),
            pooled: f.take(b * c),
            logits: f.take(b),
        };
        let forward_lens = (k.used(), f.used());
        let attention_scratch = be
            .causal_attention_scratch_len(dims)
            .max(prompt_dims.map_or(0, |d| be.causal_attention_scratch_len(d)));
        let scratch = Scratch {
            d_x: k.take(n * c),
            d_res1: k.take(n * c),
            d_branch: k.take(n * c),
            d_ln: k.take(n * c),
            d_act: k.take(n * i),
            d_gate: k.take(n * i),
            d_up: k.take(n * i),
            d_ctx: k.take(n * qd),
            d_q: k.take(n * qd),
            d_k: k.take(n * kd),
            d_v: k.take(n * kd),
            d_q_pre: k.take(n * qd),
            d_k_pre: k.take(n * kd),
            d_last: k.take(b * c),
            attention_scratch: f.take(attention_scratch),
            d_pooled: f.take(b * c),
            dlogits: f.take(b),
        };
        ActLayout {
            acts,
            scratch,
            rows,
            positions,
            reward_rows,
            forward_lens,
            lens: (k.used(), f.used()),
        }
    }

    pub fn logits(&self) -> Buf {
        self.acts.logits
    }

    /// N: the token rows of the layout.
    pub fn rows(&self) -> usize {
        self.rows.n()
    }

    pub fn dlogits(&self) -> Buf {
        self.scratch.dlogits
    }

    /// The final norm's output [N, C] (Acts): transformers' last hidden state [B, T, C] for
    /// whole sequences; with the shared prefix, in the layout's rows (prefixes, then rests).
    pub fn last_hidden(&self) -> Buf {
        self.acts.normed
    }

    /// The reward token's hidden state [B, C] (Stats).
    pub fn pooled(&self) -> Buf {
        self.acts.pooled
    }
}

/// The causal attention's dimensions over the sequences' rows, and over the shared
/// prompts' rows when there are any.
fn attention_dims(cfg: &LlamaConfig, rows: Rows) -> (CausalDims, Option<CausalDims>) {
    match rows {
        Rows::Whole { b, t } => (causal_dims(cfg, b, t, 0), None),
        Rows::Shared { p, tp, b, ts } => (
            causal_dims(cfg, b, ts, tp),
            Some(causal_dims(cfg, p, tp, 0)),
        ),
    }
}

/// [N, D] rows split into the shared prompts' rows (the first `prefix_rows`) and the
/// sequences' rows.
fn split_rows(buf: Buf, prefix_rows: usize, d: usize) -> (Buf, Buf) {
    let at = prefix_rows * d;
    (buf.part(0, at), buf.part(at, buf.len - at))
}

/// The sequences' attention dropout beside the prompts' (`d`): a seed of its own, so the
/// two calls never draw the same masks.
fn rest_dropout(d: Option<AttentionDropout>) -> Option<AttentionDropout> {
    d.map(|d| AttentionDropout {
        seed: derive_seed(d.seed, &[1]),
        ..d
    })
}

/// The tokens of the shared prompts and of the sequences that continue them.
fn shared_tokens<T>(tokens: &BatchTokens<T>) -> Result<(&T, &T)> {
    match tokens {
        BatchTokens::Shared {
            prompts,
            completions,
        } => Ok((prompts, completions)),
        BatchTokens::Whole(_) => Err(Error::internal(
            "a shared-prefix layout with the tokens of whole sequences",
        )),
    }
}

/// The token table's rows of every row of `l` into emb [N, C].
fn embedding_forward<B: Backend>(
    be: &mut B,
    emb: Buf,
    tokens: &BatchTokens<B::Tokens>,
    wte: Buf,
    l: &ActLayout,
    c: usize,
) -> Result<()> {
    match tokens {
        BatchTokens::Whole(tokens) => be.token_embedding_forward(emb, tokens, wte, c),
        BatchTokens::Shared {
            prompts,
            completions,
        } => {
            let (prompt_rows, rest) = split_rows(emb, l.rows.prefix_rows(), c);
            be.token_embedding_forward(prompt_rows, prompts, wte, c)?;
            be.token_embedding_forward(rest, completions, wte, c)
        }
    }
}

fn embedding_backward<B: Backend>(
    be: &mut B,
    dwte: Buf,
    demb: Buf,
    tokens: &BatchTokens<B::Tokens>,
    l: &ActLayout,
    c: usize,
) -> Result<()> {
    match tokens {
        BatchTokens::Whole(tokens) => be.token_embedding_backward(dwte, demb, tokens, c),
        BatchTokens::Shared {
            prompts,
            completions,
        } => {
            let (prompt_rows, rest) = split_rows(demb, l.rows.prefix_rows(), c);
            be.token_embedding_backward(dwte, prompt_rows, prompts, c)?;
            be.token_embedding_backward(dwte, rest, completions, c)
        }
    }
}

/// A layer's causal attention, ctx from q, k, v over `l`'s rows: one call, or with the
/// shared prefix the prompts' call, then the sequences' call attending to the prompts' keys
/// and values.
fn attention_forward<B: Backend>(
    cfg: &LlamaConfig,
    be: &mut B,
    tokens: &BatchTokens<B::Tokens>,
    l: &ActLayout,
    la: &LayerActs,
    dropout: Option<AttentionDropout>,
) -> Result<()> {
    let (dims, prompt_dims) = attention_dims(cfg, l.rows);
    let Some(prompt_dims) = prompt_dims else {
        let BatchTokens::Whole(tokens) = tokens else {
            return Err(Error::internal(
                "a layout of whole sequences with shared-prefix tokens",
            ));
        };
        return be.causal_attention_forward(
            la.ctx, la.saved, la.q, la.k, la.v, tokens, None, dims, dropout,
        );
    };
    let (prompts, completions) = shared_tokens(tokens)?;
    let pr = l.rows.prefix_rows();
    let (qd, kd) = (cfg.q_dim(), cfg.kv_dim());
    let (ctx_p, ctx_s) = split_rows(la.ctx, pr, qd);
    let (q_p, q_s) = split_rows(la.q, pr, qd);
    let (k_p, k_s) = split_rows(la.k, pr, kd);
    let (v_p, v_s) = split_rows(la.v, pr, kd);
    be.causal_attention_forward(
        ctx_p,
        la.saved_prompts,
        q_p,
        k_p,
        v_p,
        prompts,
        None,
        prompt_dims,
        dropout,
    )?;
    let prefix = SharedPrefix {
        k: k_p,
        v: v_p,
        prompts,
    };
    be.causal_attention_forward(
        ctx_s,
        la.saved,
        q_s,
        k_s,
        v_s,
        completions,
        Some(prefix),
        dims,
        rest_dropout(dropout),
    )
}

/// The backward of `attention_forward`: s.d_q, s.d_k, s.d_v += from s.d_ctx. With the
/// shared prefix the sequences' backward adds their gradients of the prompts' keys and
/// values into the prompts' rows, then the prompts' own backward adds to them.
fn attention_backward<B: Backend>(
    cfg: &LlamaConfig,
    be: &mut B,
    tokens: &BatchTokens<B::Tokens>,
    l: &ActLayout,
    la: &LayerActs,
    dropout: Option<AttentionDropout>,
) -> Result<()> {
    let s = &l.scratch;
    let (dims, prompt_dims) = attention_dims(cfg, l.rows);
    let scratch = |be: &B, d: CausalDims| {
        s.attention_scratch
            .part(0, be.causal_attention_scratch_len(d))
    };
    let Some(prompt_dims) = prompt_dims else {
        let BatchTokens::Whole(tokens) = tokens else {
            return Err(Error::internal(
                "a layout of whole sequences with shared-prefix tokens",
            ));
        };
        return be.causal_attention_backward(
            s.d_q,
            s.d_k,
            s.d_v,
            None,
            scratch(be, dims),
            s.d_ctx,
            la.ctx,
            la.q,
            la.k,
            la.v,
            la.saved,
            tokens,
            None,
            dims,
            dropout,
        );
    };
    let (prompts, completions) = shared_tokens(tokens)?;
    let pr = l.rows.prefix_rows();
    let (qd, kd) = (cfg.q_dim(), cfg.kv_dim());
    let [(ctx_p, ctx_s), (q_p, q_s), (dctx_p, dctx_s), (dq_p, dq_s)] =
        [la.ctx, la.q, s.d_ctx, s.d_q].map(|buf| split_rows(buf, pr, qd));
    let [(k_p, k_s), (v_p, v_s), (dk_p, dk_s), (dv_p, dv_s)] =
        [la.k, la.v, s.d_k, s.d_v].map(|buf| split_rows(buf, pr, kd));
    let prefix = SharedPrefix {
        k: k_p,
        v: v_p,
        prompts,
    };
    be.causal_attention_backward(
        dq_s,
        dk_s,
        dv_s,
        Some((dk_p, dv_p)),
        scratch(be, dims),
        dctx_s,
        ctx_s,
        q_s,
        k_s,
        v_s,
        la.saved,
        completions,
        Some(prefix),
        dims,
        rest_dropout(dropout),
    )?;
    be.causal_attention_backward(
        dq_p,
        dk_p,
        dv_p,
        None,
        scratch(be, prompt_dims),
        dctx_p,
        ctx_p,
        q_p,
        k_p,
        v_p,
        la.saved_prompts,
        prompts,
        None,
        prompt_dims,
        dropout,
    )
}

/// out [N, OC] = x [N, IC] · linearᵀ.
fn linear_forward<B: Backend>(
    be: &mut B,
    out: Buf,
    x: Buf,
    p: Linear,
    n: usize,
    ic: usize,
    oc: usize,
) -> Result<()> {
    be.matmul_forward(out, x, p.w, p.b, n, ic, oc)
}

/// dx += dout · w; the weight's (and bias's) gradients += as matmul_backward.
#[allow(clippy::too_many_arguments)]
fn linear_backward<B: Backend>(
    be: &mut B,
    dx: Buf,
    g: Linear,
    dout: Buf,
    x: Buf,
    p: Linear,
    n: usize,
    ic: usize,
    oc: usize,
) -> Result<()> {
    be.matmul_backward(dx, g.w, g.b, dout, x, p.w, n, ic, oc)
}

/// The forward pass on `be`: every activation of `l`, the logits last. With `dropout`
/// (training), the attention probabilities are dropped at `attention_dropout`'s rate; the
/// family has no other dropout.
pub fn forward<B: Backend>(
    cfg: &LlamaConfig,
    be: &mut B,
    tokens: &BatchTokens<B::Tokens>,
    l: &ActLayout,
    dropout: Option<Dropout>,
) -> Result<()> {
    let (b, t) = (l.rows.sequences(), l.rows.seq_len());
    let (n, c, i, qd, kd) = (
        l.rows.n(),
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.q_dim(),
        cfg.kv_dim(),
    );
    let (nh, nkv, hd, eps) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.rms_norm_eps,
    );
    let p = Params::new(cfg, Arena::Params);
    let a = &l.acts;

    embedding_forward(be, a.emb, tokens, p.wte, l, c)?;
    let inv_freq = rope_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling);
    be.rope_cos_sin(a.cos, a.sin, &l.positions, &inv_freq)?;

    let mut x = a.emb;
    for (layer, (la, lp)) in a.layers.iter().zip(&p.layers).enumerate() {
        be.rmsnorm_forward(la.ln1, la.ln1_rstd, x, lp.ln1_w, n, c, eps)?;
        linear_forward(be, la.q_pre, la.ln1, lp.q, n, c, qd)?;
        linear_forward(be, la.k_pre, la.ln1, lp.k, n, c, kd)?;
        linear_forward(be, la.v, la.ln1, lp.v, n, c, kd)?;
        be.rope_forward(la.q, la.q_pre, a.cos, a.sin, n, nh, hd)?;
        be.rope_forward(la.k, la.k_pre, a.cos, a.sin, n, nkv, hd)?;
        attention_forward(cfg, be, tokens, l, la, attention_dropout(dropout, layer))?;
        linear_forward(be, a.branch, la.ctx, lp.o, n, qd, c)?;
        be.residual_forward(la.res1, x, a.branch)?;
        be.rmsnorm_forward(la.ln2, la.ln2_rstd, la.res1, lp.ln2_w, n, c, eps)?;
        linear_forward(be, la.gate, la.ln2, lp.gate, n, c, i)?;
        linear_forward(be, la.up, la.ln2, lp.up, n, c, i)?;
        be.swiglu_forward(la.act, la.gate, la.up)?;
        linear_forward(be, a.branch, la.act, lp.down, n, i, c)?;
        be.residual_forward(la.out, la.res1, a.branch)?;
        x = la.out;
    }

    be.rmsnorm_forward(a.normed, a.norm_rstd, x, p.norm_w, n, c, eps)?;
    let (_, normed) = split_rows(a.normed, l.rows.prefix_rows(), c);
    be.last_token_pool_forward(a.last, normed, &l.reward_rows, t, c)?;
    be.copy(a.pooled, a.last)?;
    be.matmul_forward(a.logits, a.pooled, p.score_w, None, b, c, 1)
}

/// The backward pass of the last `forward` with layout `l` (same tokens, same dropout):
/// adds d loss / d parameter into the gradient arena, from the logits' gradient in
/// `l.dlogits()`.
pub fn backward<B: Backend>(
    cfg: &LlamaConfig,
    be: &mut B,
    tokens: &BatchTokens<B::Tokens>,
    l: &ActLayout,
    dropout: Option<Dropout>,
) -> Result<()> {
    let (b, t) = (l.rows.sequences(), l.rows.seq_len());
    let (n, c, i, qd, kd) = (
        l.rows.n(),
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.q_dim(),
        cfg.kv_dim(),
    );
    let (nh, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let p = Params::new(cfg, Arena::Params);
    let g = Params::new(cfg, Arena::Grads);
    let (a, s) = (&l.acts, &l.scratch);

    // Head, pooling and the final norm.
    be.zero(s.d_pooled)?;
    be.matmul_backward(
        s.d_pooled, g.score_w, None, s.dlogits, a.pooled, p.score_w, b, c, 1,
    )?;
    be.copy(s.d_last, s.d_pooled)?;
    be.zero(s.d_ln)?;
    let (_, d_normed) = split_rows(s.d_ln, l.rows.prefix_rows(), c);
    be.last_token_pool_backward(d_normed, s.d_last, &l.reward_rows, t, c)?;
    let top = a.layers.last().map_or(a.emb, |la| la.out);
    be.zero(s.d_x)?;
    be.rmsnorm_backward(s.d_x, g.norm_w, s.d_ln, top, p.norm_w, a.norm_rstd, n, c)?;

    // Layers, last to first; d_x holds the gradient of the layer's output, then of its
    // input.
    for layer in (0..cfg.num_hidden_layers).rev() {
        let (la, lp, lg) = (&a.layers[layer], &p.layers[layer], &g.layers[layer]);
        let x = match layer {
            0 => a.emb,
            _ => a.layers[layer - 1].out,
        };
        // out = res1 + MLP branch.
        be.zero(s.d_res1)?;
        be.zero(s.d_branch)?;
        be.residual_backward(s.d_res1, s.d_branch, s.d_x)?;
        be.zero(s.d_act)?;
        linear_backward(be, s.d_act, lg.down, s.d_branch, la.act, lp.down, n, i, c)?;
        be.zero(s.d_gate)?;
        be.zero(s.d_up)?;
        be.swiglu_backward(s.d_gate, s.d_up, s.d_act, la.gate, la.up)?;
        be.zero(s.d_ln)?;
        linear_backward(be, s.d_ln, lg.gate, s.d_gate, la.ln2, lp.gate, n, c, i)?;
        linear_backward(be, s.d_ln, lg.up, s.d_up, la.ln2, lp.up, n, c, i)?;
        be.rmsnorm_backward(
            s.d_res1,
            lg.ln2_w,
            s.d_ln,
            la.res1,
            lp.ln2_w,
            la.ln2_rstd,
            n,
            c,
        )?;

        // res1 = x + attention branch.
        be.zero(s.d_x)?;
        be.zero(s.d_branch)?;
        be.residual_backward(s.d_x, s.d_branch, s.d_res1)?;
        be.zero(s.d_ctx)?;
        linear_backward(be, s.d_ctx, lg.o, s.d_branch, la.ctx, lp.o, n, qd, c)?;
        for d in [s.d_q, s.d_k, s.d_v] {
            be.zero(d)?;
        }
        attention_backward(cfg, be, tokens, l, la, attention_dropout(dropout, layer))?;
        be.zero(s.d_q_pre)?;
        be.zero(s.d_k_pre)?;
        be.rope_backward(s.d_q_pre, s.d_q, a.cos, a.sin, n, nh, hd)?;
        be.rope_backward(s.d_k_pre, s.d_k, a.cos, a.sin, n, nkv, hd)?;
        be.zero(s.d_ln)?;
        linear_backward(be, s.d_ln, lg.q, s.d_q_pre, la.ln1, lp.q, n, c, qd)?;
        linear_backward(be, s.d_ln, lg.k, s.d_k_pre, la.ln1, lp.k, n, c, kd)?;
        linear_backward(be, s.d_ln, lg.v, s.d_v, la.ln1, lp.v, n, c, kd)?;
        be.rmsnorm_backward(s.d_x, lg.ln1_w, s.d_ln, x, lp.ln1_w, la.ln1_rstd, n, c)?;
        be.grads_final(lg.span()?)?;
    }

    embedding_backward(be, g.wte, s.d_x, tokens, l, c)?;
    // The padding row gets no gradient (nn.Embedding's padding_idx = pad_token_id).
    if let Some(pad) = cfg.pad_token_id.map(|p| p as usize) {
        be.zero(g.wte.part(pad * c, c))?;
    }
    Ok(())
}
