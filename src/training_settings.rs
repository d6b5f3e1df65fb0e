//! The settings that decide what a run trains, recorded in each checkpoint so that
//! `--resume` can refuse to continue a run under different ones (the continuation would no
//! longer be the run its checkpoints and metrics describe).
//!
//! They are the keys that change the sequence of weights: model_name, learning_rate,
//! scheduler, warmup_ratio, max_steps (the schedule decays to it), per_device_train_batch_size,
//! gradient_accumulation_steps, max_length, loss, eps, weight_decay, max_grad_norm,
//! dropout, dtype (bf16 rounds differently), center_rewards_coefficient (recorded only when
//! on), and the training data by content (the SHA-256
//! of each file, in order: a file edited in place counts; the same bytes moved elsewhere
//! do not). The seed is checked on its own. Not counted: what is measured or kept
//! (eval_datasets, eval_max_prompts, eval_steps, save_steps, logging_steps,
//! output_dir), and the device (f32 on the CPU and on a GPU is the same arithmetic up to
//! summation order).

use crate::backend::DType;
use crate::checksum::sha256_bytes;
use crate::config::Config;
use crate::error::Result;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Key -> value as the run used it.
pub type Settings = BTreeMap<String, Value>;

/// The training settings of `cfg` trained in `dtype` (the config's, or the command line's)
/// on training files of these SHA-256s (`PromptSet::source_sha256s`: taken from the token
/// caches, so a pipe is read once).
pub fn training_settings(cfg: &Config, dtype: DType, data_sha256: Vec<String>) -> Result<Settings> {
    let data = data_sha256.into_iter().map(Value::String).collect();
    let settings = [
        ("model_name", json!(cfg.model_name)),
        ("learning_rate", json!(cfg.learning_rate)),
        (
            "scheduler",
            json!(format!("{:?}", cfg.scheduler).to_lowercase()),
        ),
        ("warmup_ratio", json!(cfg.warmup_ratio)),
        ("max_steps", json!(cfg.max_steps)),
        (
            "per_device_train_batch_size",
            json!(cfg.per_device_train_batch_size),
        ),
        (
            "gradient_accumulation_steps",
            json!(cfg.gradient_accumulation_steps),
        ),
        ("max_length", json!(cfg.max_length)),
        ("loss", json!(cfg.loss_name)),
        ("eps", json!(cfg.eps)),
        ("weight_decay", json!(cfg.weight_decay)),
        ("max_grad_norm", json!(cfg.max_grad_norm)),
        ("dropout", json!(cfg.dropout)),
        ("dtype", json!(dtype.name())),
        ("datasets", Value::Array(data)),
    ];
    let mut settings: Settings = settings
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    // Recorded only when on, so that the checkpoints of runs without it resume unchanged.
    if cfg.center_rewards_coefficient != 0.0 {
        settings.insert(
            "center_rewards_coefficient".to_string(),
            json!(cfg.center_rewards_coefficient),
        );
    }
    Ok(settings)
}

/// One hash of all the settings (serde_json writes a BTreeMap's keys in order).
pub fn settings_sha256(settings: &Settings) -> String {
    sha256_bytes(
        serde_json::to_string(settings)
            .unwrap_or_default()
            .as_bytes(),
    )
}

/// A setting whose value differs between a checkpoint and the run resuming it.
#[derive(Debug, serde::Serialize)]
pub struct Change {
    pub was: Value,
    pub now: Value,
}

/// The settings that differ, by key (a key only one side has counts as changed).
pub fn changes(saved: &Settings, now: &Settings) -> BTreeMap<String, Change> {
    let keys: std::collections::BTreeSet<&String> = saved.keys().chain(now.keys()).collect();
    keys.into_iter()
        .filter(|k| saved.get(*k) != now.get(*k))
        .map(|k| {
            let side = |s: &Settings| s.get(k).cloned().unwrap_or(Value::Null);
            (
                k.clone(),
                Change {
                    was: side(saved),
                    now: side(now),
                },
            )
        })
        .collect()
}

/// `key was A, now B; ...` for a one-line message (digests cut to 12 characters).
pub fn describe(changes: &BTreeMap<String, Change>) -> String {
    fn short(v: &Value) -> String {
        match v {
            Value::String(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
                format!("sha256 {}", &s[..12])
            }
            Value::Array(items) => {
                let items: Vec<String> = items.iter().map(short).collect();
                format!("[{}]", items.join(", "))
            }
            other => other.to_string(),
        }
    }
    changes
        .iter()
        .map(|(k, c)| format!("{k} was {}, now {}", short(&c.was), short(&c.now)))
        .collect::<Vec<_>>()
        .join("; ")
}
