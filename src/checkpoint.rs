//! Model folders and checkpoints. A model folder is what `transformers` reads:
//! `config.json` + `model.safetensors` in BertForSequenceClassification's layout, plus the
//! `vocab.txt` it was trained with. A checkpoint (`checkpoint-<step>/`) adds the optimizer
//! moments (`optimizer.safetensors`) and `trainer_state.json`; it is written into a
//! temporary folder and renamed, so a kill during a save leaves the previous one whole.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::hf_config::{HfBertConfig, read_hf_config, write_hf_config};
use crate::model::{BertConfig, BertModel, ParamLayout};
use crate::safetensors::{SafeTensors, write_atomic, write_f32};
use crate::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What a checkpoint needs besides weights and moments to resume exactly. Every random
/// stream of a run derives from (seed, step), so these two are the whole generator state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub step: usize,
    pub seed: u64,
}

/// rcx's own notes beside a model (`rcx.json`): how it was trained, so that scoring and
/// evaluation use the same sequence length and know each prompt type's utility.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelMeta {
    pub max_length: usize,
    /// The loss name as `LossSpec::parse` reads it.
    pub loss: String,
    pub eps: f64,
    /// The rcx, commit, config and data that made the folder; absent in folders written
    /// before rcx recorded it.
    #[serde(default)]
    pub provenance: Option<crate::provenance::Provenance>,
}

fn to_hf(cfg: &BertConfig) -> HfBertConfig {
    HfBertConfig {
        vocab_size: cfg.vocab_size,
        hidden_size: cfg.hidden_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        intermediate_size: cfg.intermediate_size,
        hidden_act: "gelu".into(),
        hidden_dropout_prob: cfg.hidden_dropout_prob as f32,
        attention_probs_dropout_prob: cfg.attention_probs_dropout_prob as f32,
        max_position_embeddings: cfg.max_position_embeddings,
        type_vocab_size: cfg.type_vocab_size,
        layer_norm_eps: cfg.layer_norm_eps as f32,
    }
}

/// The f64 of an f32's shortest decimal (what Python reads from the same config.json).
fn widen(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

fn from_hf(hf: &HfBertConfig) -> BertConfig {
    BertConfig {
        vocab_size: hf.vocab_size,
        hidden_size: hf.hidden_size,
        num_hidden_layers: hf.num_hidden_layers,
        num_attention_heads: hf.num_attention_heads,
        intermediate_size: hf.intermediate_size,
        max_position_embeddings: hf.max_position_embeddings,
        type_vocab_size: hf.type_vocab_size,
        // Read as f32 by the config reader: widened through their shortest decimals, so
        // that 1e-12 and 0.1 come back as the f64 values written (`as f64` would give
        // 9.99e-13, and a resumed run would find its checkpoint's architecture changed).
        layer_norm_eps: widen(hf.layer_norm_eps),
        hidden_dropout_prob: widen(hf.hidden_dropout_prob),
        attention_probs_dropout_prob: widen(hf.attention_probs_dropout_prob),
        pad_token_id: 0,
    }
}

/// Loads a Hugging Face BERT folder (BertModel or BertForSequenceClassification names).
/// The pooler and the one-output head are initialised as BERT does when absent.
pub fn load_model_dir(dir: &Path, seed: u64) -> Result<BertModel<f32>> {
    if !dir.is_dir() {
        return Err(Error::user(format!(
            "{}: no such model folder",
            dir.display()
        )));
    }
    let config = from_hf(&read_hf_config(&dir.join("config.json"))?);
    config.validate(&dir.join("config.json").display().to_string())?;
    let weights = SafeTensors::open(&dir.join("model.safetensors"))?;
    let mut model = BertModel::<f32>::zeros(config);
    let has_prefix = weights
        .get("bert.embeddings.word_embeddings.weight")
        .is_some();
    let mut filled = 0;
    for (index, spec) in model.layout.tensors.clone().into_iter().enumerate() {
        let stored = if has_prefix {
            spec.name.clone()
        } else {
            spec.name
                .strip_prefix("bert.")
                .unwrap_or(&spec.name)
                .to_string()
        };
        let optional = spec.name.starts_with("bert.pooler") || spec.name.starts_with("classifier");
        if weights.get(&stored).is_none() {
            if optional {
                model.init_tensor(index, seed);
                continue;
            }
            return Err(Error::user(format!(
                "{}: tensor `{stored}` is missing",
                dir.join("model.safetensors").display()
            )));
        }
        let values = weights.read_f32(&stored, &spec.shape)?;
        model.params[spec.range()].copy_from_slice(&values);
        filled += 1;
    }
    if filled == 0 {
        return Err(Error::user(format!(
            "{}: no BERT tensors found",
            dir.display()
        )));
    }
    Ok(model)
}

/// The model a run starts from and the tokenizer of its vocabulary.
/// Returns the model, its tokenizer and the vocabulary file.
pub fn model_for_training(cfg: &Config) -> Result<(BertModel<f32>, Tokenizer, PathBuf)> {
    let (model, vocab) = match BertConfig::named(&cfg.model_name) {
        Some(arch) => (
            BertModel::init(arch, cfg.seed),
            crate::train::vocab_path(None),
        ),
        None => {
            let dir = Path::new(&cfg.model_name);
            if !dir.is_dir() {
                return Err(Error::user(format!(
                    "{}: model_name `{}` is neither a known architecture ({}) nor a model folder \
                     (for the pretrained MiniLM run scripts/fetch-minilm.sh)",
                    cfg.path.display(),
                    cfg.model_name,
                    BertConfig::NAMES.join(", ")
                )));
            }
            (
                load_model_dir(dir, cfg.seed)?,
                crate::train::vocab_path(Some(dir)),
            )
        }
    };
    let tok = Tokenizer::from_vocab_file(&vocab)?;
    if tok.vocab_size() > model.config.vocab_size {
        return Err(Error::user(format!(
            "{}: {} entries, more than the model's vocab_size {}",
            vocab.display(),
            tok.vocab_size(),
            model.config.vocab_size
        )));
    }
    Ok((model, tok, vocab))
}

/// A model folder written by rcx (or any HF BERT folder) with its tokenizer and its
/// `rcx.json` notes, when it has them.
pub fn load_for_scoring(dir: &Path) -> Result<(BertModel<f32>, Tokenizer, Option<ModelMeta>)> {
    let model = load_model_dir(dir, 0)?;
    let tok = Tokenizer::from_vocab_file(&crate::train::vocab_path(Some(dir)))?;
    let meta_path = dir.join("rcx.json");
    let meta = match fs::read_to_string(&meta_path) {
        Ok(text) => Some(
            serde_json::from_str::<ModelMeta>(&text)
                .map_err(|e| Error::user(format!("{}:{}: {e}", meta_path.display(), e.line())))?,
        ),
        Err(_) => None,
    };
    Ok((model, tok, meta))
}

/// Creates the output folder and checks that it can be written.
pub fn ensure_writable_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)
        .map_err(|e| Error::user(format!("output_dir {}: {e}", dir.display())))?;
    let probe = dir.join(".rcx-write-probe");
    fs::write(&probe, b"")
        .and_then(|_| fs::remove_file(&probe))
        .map_err(|e| Error::user(format!("output_dir {}: cannot write: {e}", dir.display())))
}

fn checkpoints(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(|n| n.strip_prefix("checkpoint-")) else {
            continue;
        };
        if let Ok(step) = step.parse::<usize>()
            && entry.path().join("trainer_state.json").is_file()
        {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The newest complete checkpoint of a run folder.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(checkpoints(dir)?.pop().map(|(_, p)| p))
}

/// Removes what a save killed half-way left behind (`.checkpoint-<step>.tmp/`): never a
/// checkpoint, only in the way.
pub fn remove_partial_saves(dir: &Path) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".checkpoint-") && name.ends_with(".tmp") {
            fs::remove_dir_all(entry.path()).map_err(|e| Error::io(&entry.path(), e))?;
        }
    }
    Ok(())
}

/// A fresh run must not silently destroy an earlier one's checkpoints.
pub fn start_fresh(dir: &Path, overwrite: bool) -> Result<()> {
    let existing = checkpoints(dir)?;
    if let Some((step, _)) = existing.last()
        && !overwrite
    {
        return Err(Error::user(format!(
            "output_dir {} already holds a run (checkpoint-{step}): pass --resume to continue \
                 it or --overwrite to start again",
            dir.display()
        )));
    }
    for (_, path) in existing {
        fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
    }
    let metrics = dir.join("metrics.jsonl");
    if metrics.exists() {
        fs::remove_file(&metrics).map_err(|e| Error::io(&metrics, e))?;
    }
    Ok(())
}

/// Appends one JSON line to `metrics.jsonl`.
pub fn append_metrics<T: Serialize>(dir: &Path, line: &T) -> Result<()> {
    let path = dir.join("metrics.jsonl");
    let text = serde_json::to_string(line).map_err(|e| Error::internal(e.to_string()))?;
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    writeln!(file, "{text}").map_err(|e| Error::io(&path, e))
}

/// On resume from checkpoint `step`, drops the metrics lines of later steps: the resumed
/// run evaluates them again, and they would otherwise appear twice. A line that does not
/// parse (torn by a kill while it was written) goes too.
pub fn truncate_metrics(dir: &Path, step: usize) -> Result<()> {
    let path = dir.join("metrics.jsonl");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
                .is_some_and(|s| s <= step as u64)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    if kept.len() != text.len() {
        write_atomic(&path, kept.as_bytes())?;
    }
    Ok(())
}

fn tensor_list<'a>(
    layout: &'a ParamLayout,
    arena: &'a [f32],
    suffix: &str,
) -> Vec<(String, &'a [usize], &'a [f32])> {
    layout
        .tensors
        .iter()
        .map(|t| {
            (
                format!("{}{suffix}", t.name),
                &t.shape[..],
                &arena[t.range()],
            )
        })
        .collect()
}

fn write_tensors(path: &Path, list: &[(String, &[usize], &[f32])]) -> Result<()> {
    let refs: Vec<(&str, &[usize], &[f32])> =
        list.iter().map(|(n, s, d)| (n.as_str(), *s, *d)).collect();
    write_f32(path, &refs, &[("format", "pt")])
}

/// Writes a model folder's files into `dir` (each file atomically).
fn write_model_files(
    dir: &Path,
    cfg: &Config,
    model: &BertModel<f32>,
    tok_vocab: &Path,
) -> Result<()> {
    write_tensors(
        &dir.join("model.safetensors"),
        &tensor_list(&model.layout, &model.params, ""),
    )?;
    write_hf_config(&dir.join("config.json"), &to_hf(&model.config), 1)?;
    let vocab = dir.join("vocab.txt");
    if tok_vocab != vocab {
        fs::copy(tok_vocab, &vocab).map_err(|e| Error::io(&vocab, e))?;
    }
    let meta = ModelMeta {
        max_length: cfg.max_length,
        loss: cfg.loss_name.clone(),
        eps: cfg.eps,
        provenance: Some(crate::provenance::Provenance::recorded(cfg)?),
    };
    let meta_path = dir.join("rcx.json");
    fs::write(
        &meta_path,
        serde_json::to_string_pretty(&meta).unwrap_or_default(),
    )
    .map_err(|e| Error::io(&meta_path, e))
}

/// Saves `checkpoint-<step>` atomically and keeps the two newest.
pub fn save_checkpoint(
    cfg: &Config,
    model: &BertModel<f32>,
    vocab: &Path,
    m: &[f32],
    v: &[f32],
    state: &TrainState,
) -> Result<()> {
    let out = &cfg.output_dir;
    let tmp = out.join(format!(".checkpoint-{}.tmp", state.step));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    write_model_files(&tmp, cfg, model, vocab)?;
    let mut moments = tensor_list(&model.layout, m, ".exp_avg");
    moments.extend(tensor_list(&model.layout, v, ".exp_avg_sq"));
    write_tensors(&tmp.join("optimizer.safetensors"), &moments)?;
    let state_path = tmp.join("trainer_state.json");
    fs::write(
        &state_path,
        serde_json::to_string_pretty(state).unwrap_or_default(),
    )
    .map_err(|e| Error::io(&state_path, e))?;
    let dest = out.join(format!("checkpoint-{}", state.step));
    if dest.exists() {
        fs::remove_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
    }
    fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
    let all = checkpoints(out)?;
    for (_, old) in all.iter().rev().skip(2) {
        fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
    }
    Ok(())
}

/// Loads weights and moments of a checkpoint into the run's arenas.
pub fn load_train_state(
    dir: &Path,
    model: &mut BertModel<f32>,
    m: &mut [f32],
    v: &mut [f32],
) -> Result<TrainState> {
    let saved = load_model_dir(dir, 0)?;
    if saved.config != model.config {
        return Err(Error::user(format!(
            "{}: the checkpoint's architecture differs from the config's model",
            dir.display()
        )));
    }
    model.params.copy_from_slice(&saved.params);
    let moments = SafeTensors::open(&dir.join("optimizer.safetensors"))?;
    for spec in &model.layout.tensors {
        m[spec.range()]
            .copy_from_slice(&moments.read_f32(&format!("{}.exp_avg", spec.name), &spec.shape)?);
        v[spec.range()]
            .copy_from_slice(&moments.read_f32(&format!("{}.exp_avg_sq", spec.name), &spec.shape)?);
    }
    let state_path = dir.join("trainer_state.json");
    let text = fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::user(format!("{}:{}: {e}", state_path.display(), e.line())))
}

/// The trained model at the top of the output folder, for `rcx score` and `rcx eval`.
pub fn save_final(cfg: &Config, model: &BertModel<f32>, vocab: &Path) -> Result<()> {
    write_model_files(&cfg.output_dir, cfg, model, vocab)
}
