//! Hugging Face BERT `config.json`: reading a pretrained model's shape, and writing one that
//! `transformers` loads as `BertForSequenceClassification` (a reward model has one output).
//! Also the typed key look-ups (`ConfigKeys`) that the decoders' reader
//! (`models::llama::LlamaConfig::from_hf_json`) shares, and `read_model_type`, which tells
//! the loader which reader takes a folder.

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::error::{Error, Result};
use crate::safetensors::write_atomic;

/// The fields of a BERT `config.json` that fix the architecture and its regularisation.
#[derive(Debug, Clone, PartialEq)]
pub struct HfBertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    /// Always "gelu" (the exact erf form): the only activation rcx implements.
    pub hidden_act: String,
    pub hidden_dropout_prob: f32,
    pub attention_probs_dropout_prob: f32,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
    /// The padding token's id (its embedding row starts at zero and is never trained).
    pub pad_token_id: u32,
}

/// Reads a BERT `config.json`. The sizes that fix the weight shapes must be present; the
/// others fall back to the defaults `transformers.BertConfig` uses, so a config means here
/// what it means there. Unknown keys are ignored.
pub fn read_hf_config(path: &Path) -> Result<HfBertConfig> {
    let obj = read_json_object(path)?;
    let keys = ConfigKeys { path, obj: &obj };

    let model_type = keys.string("model_type", None)?;
    if model_type != "bert" {
        return Err(keys.error(
            "model_type",
            &format!("expected \"bert\", found \"{model_type}\""),
        ));
    }
    let hidden_act = keys.string("hidden_act", Some("gelu"))?;
    if hidden_act != "gelu" {
        return Err(keys.error(
            "hidden_act",
            &format!("expected \"gelu\", found \"{hidden_act}\""),
        ));
    }
    let position_embedding_type = keys.string("position_embedding_type", Some("absolute"))?;
    if position_embedding_type != "absolute" {
        return Err(keys.error(
            "position_embedding_type",
            &format!("expected \"absolute\", found \"{position_embedding_type}\""),
        ));
    }

    let config = HfBertConfig {
        vocab_size: keys.positive("vocab_size")?,
        hidden_size: keys.positive("hidden_size")?,
        num_hidden_layers: keys.positive("num_hidden_layers")?,
        num_attention_heads: keys.positive("num_attention_heads")?,
        intermediate_size: keys.positive("intermediate_size")?,
        hidden_act,
        hidden_dropout_prob: keys.probability("hidden_dropout_prob", 0.1)?,
        attention_probs_dropout_prob: keys.probability("attention_probs_dropout_prob", 0.1)?,
        max_position_embeddings: keys.positive("max_position_embeddings")?,
        type_vocab_size: keys.positive_or("type_vocab_size", 2)?,
        layer_norm_eps: keys.number("layer_norm_eps", 1e-12)?,
        pad_token_id: keys.id_or("pad_token_id", 0)?,
    };
    if !config
        .hidden_size
        .is_multiple_of(config.num_attention_heads)
    {
        return Err(keys.error(
            "num_attention_heads",
            &format!(
                "{} does not divide hidden_size {}",
                config.num_attention_heads, config.hidden_size
            ),
        ));
    }
    if config.layer_norm_eps <= 0.0 || !config.layer_norm_eps.is_finite() {
        return Err(keys.error(
            "layer_norm_eps",
            "expected a positive number within f32 range",
        ));
    }
    Ok(config)
}

/// The `model_type` of a config.json (None when absent), read alone: which architecture's
/// reader takes the file.
pub fn read_model_type(path: &Path) -> Result<Option<String>> {
    let obj = read_json_object(path)?;
    Ok(obj
        .get("model_type")
        .and_then(Value::as_str)
        .map(str::to_string))
}

/// A config.json's top-level object.
pub fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| {
        Error::user(format!(
            "{}:{}: not valid JSON: {e}",
            path.display(),
            e.line()
        ))
    })?;
    match value {
        Value::Object(obj) => Ok(obj),
        _ => Err(Error::user(format!(
            "{}: expected a JSON object",
            path.display()
        ))),
    }
}

/// Writes a `config.json` that `transformers` loads as `BertForSequenceClassification` with
/// `num_labels` outputs; with one label the problem type is regression (a scalar reward).
pub fn write_hf_config(path: &Path, config: &HfBertConfig, num_labels: usize) -> Result<()> {
    let id2label: Map<String, Value> = (0..num_labels)
        .map(|i| (i.to_string(), Value::String(format!("LABEL_{i}"))))
        .collect();
    let label2id: Map<String, Value> = (0..num_labels)
        .map(|i| (format!("LABEL_{i}"), json!(i)))
        .collect();
    let mut obj = json!({
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": config.hidden_act,
        "hidden_dropout_prob": shortest_decimal(config.hidden_dropout_prob),
        "attention_probs_dropout_prob": shortest_decimal(config.attention_probs_dropout_prob),
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": shortest_decimal(config.layer_norm_eps),
        "position_embedding_type": "absolute",
        "pad_token_id": config.pad_token_id,
        "torch_dtype": "float32",
        "id2label": id2label,
        "label2id": label2id,
    });
    if num_labels == 1 {
        obj["problem_type"] = json!("regression");
    }
    let mut text = serde_json::to_string_pretty(&obj)
        .map_err(|e| Error::internal(format!("writing {}: {e}", path.display())))?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// An f32 as the f64 with the same shortest decimal form, so 1e-12 is written as `1e-12`
/// rather than as the f32's exact value `9.999999960041972e-13`.
fn shortest_decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// Typed look-ups of config keys whose errors name the file and the key.
pub struct ConfigKeys<'a> {
    pub path: &'a Path,
    pub obj: &'a Map<String, Value>,
}

impl ConfigKeys<'_> {
    pub fn error(&self, key: &str, msg: &str) -> Error {
        Error::user(format!("{}: key '{key}': {msg}", self.path.display()))
    }

    /// A string value; `default` is used when the key is absent (None: the key is required).
    pub fn string(&self, key: &str, default: Option<&str>) -> Result<String> {
        match (self.obj.get(key), default) {
            (Some(Value::String(s)), _) => Ok(s.clone()),
            (Some(other), _) => Err(self.error(key, &format!("expected a string, found {other}"))),
            (None, Some(d)) => Ok(d.to_string()),
            (None, None) => Err(self.error(key, "missing (required)")),
        }
    }

    fn positive_value(&self, key: &str, value: &Value) -> Result<usize> {
        value
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| self.error(key, &format!("expected a positive integer, found {value}")))
    }

    pub fn positive(&self, key: &str) -> Result<usize> {
        let value = self
            .obj
            .get(key)
            .ok_or_else(|| self.error(key, "missing (required)"))?;
        self.positive_value(key, value)
    }

    fn positive_or(&self, key: &str, default: usize) -> Result<usize> {
        self.obj
            .get(key)
            .map_or(Ok(default), |value| self.positive_value(key, value))
    }

    /// A token id: an integer in u32's range.
    fn id_or(&self, key: &str, default: u32) -> Result<u32> {
        self.obj.get(key).map_or(Ok(default), |value| {
            value
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| self.error(key, &format!("expected a token id, found {value}")))
        })
    }

    fn number(&self, key: &str, default: f32) -> Result<f32> {
        match self.obj.get(key) {
            None => Ok(default),
            Some(value) => value
                .as_f64()
                .map(|x| x as f32)
                .ok_or_else(|| self.error(key, &format!("expected a number, found {value}"))),
        }
    }

    /// A present, non-null value (transformers writes unset optional keys as null).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    /// An integer >= 0, or None when absent or null.
    pub fn optional_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|value| {
                value
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| {
                        self.error(key, &format!("expected an integer >= 0, found {value}"))
                    })
            })
            .transpose()
    }

    fn id_of(&self, key: &str, value: &Value) -> Result<u32> {
        value
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.error(key, &format!("expected a token id, found {value}")))
    }

    /// A token id, or None when absent or null.
    pub fn optional_id(&self, key: &str) -> Result<Option<u32>> {
        self.get(key).map(|v| self.id_of(key, v)).transpose()
    }

    /// A token id or a list of them (eos_token_id); absent or null: none.
    pub fn ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(|v| self.id_of(key, v)).collect(),
            Some(v) => Ok(vec![self.id_of(key, v)?]),
        }
    }

    /// A number as f64 (`key` names it in errors, e.g. "rope_parameters.factor").
    pub fn number_of(&self, key: &str, value: &Value) -> Result<f64> {
        value
            .as_f64()
            .ok_or_else(|| self.error(key, &format!("expected a number, found {value}")))
    }

    /// A number as f64; `default` when absent or null.
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        self.get(key)
            .map_or(Ok(default), |v| self.number_of(key, v))
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.error(key, &format!("expected true or false, found {v}"))),
        }
    }

    fn probability(&self, key: &str, default: f32) -> Result<f32> {
        let p = self.number(key, default)?;
        if !(0.0..1.0).contains(&p) {
            return Err(self.error(key, &format!("expected a probability in [0, 1), found {p}")));
        }
        Ok(p)
    }
}
