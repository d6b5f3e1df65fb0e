//! Model folders and checkpoints. A model folder is what `transformers` reads:
//! `config.json` + `model.safetensors` (or the shards `model.safetensors.index.json` names)
//! in BertForSequenceClassification's layout (or a DeBERTa-v2/v3, Llama, Mistral or Qwen2
//! `*ForSequenceClassification`'s), plus the tokenizer file it was trained with. A
//! checkpoint (`checkpoint-<step>/`) adds the optimizer moments (`optimizer.safetensors`)
//! and `trainer_state.json`, written last, which holds
//! the SHA-256 of every other file and the run's training settings. A checkpoint is written
//! into a temporary folder and renamed, so a kill during a save leaves the previous one
//! whole; `--resume` takes the newest checkpoint that verifies (checksums, step, finite
//! values) and says which it skipped and why.

use crate::checksum::sha256_file;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::hf_config::{HfBertConfig, read_hf_config, read_model_type, write_hf_config};
use crate::models::{
    Arch, BertConfig, DebertaConfig, Family, HostModel, LlamaConfig, ModelConfig, ParamLayout,
    Weights,
};
use crate::safetensors::{SafeTensors, write_atomic, write_f32};
use crate::tokenizer::Tokenizer;
use crate::training_settings::Settings;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What a checkpoint needs besides weights and moments to resume exactly. Every random
/// stream of a run derives from (seed, step), so these two are the whole generator state.
/// Checkpoints of an rcx from before checksums and settings records have only those two;
/// they are resumed with a warning that they could not be verified.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub step: usize,
    pub seed: u64,
    /// The training settings the run was trained with (`crate::training_settings`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_settings: Option<Settings>,
    /// `training_settings::settings_sha256` of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_settings_sha256: Option<String>,
    /// `--resume-changed` records (the step and the changed settings) that no metrics line
    /// has carried yet: the next evaluation writes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resumed_with_changes: Vec<serde_json::Value>,
    /// File name -> SHA-256 of every other file of the checkpoint (filled in by the save).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
}

/// The files every checkpoint has besides trainer_state.json; the checksums must cover the
/// two that resuming reads.
const CHECKPOINT_FILES: [&str; 4] = [
    "model.safetensors",
    "optimizer.safetensors",
    "config.json",
    "rcx.json",
];

/// The tokenizer file a model folder carries beside its weights, one of these by
/// architecture: WordPiece's vocab.txt (BERT); DeBERTa's SentencePiece tokenizer.json or
/// spm.model. Checkpoints hold it too, covered by their checksums.
pub const TOKENIZER_FILES: [&str; 3] = ["vocab.txt", "tokenizer.json", "spm.model"];

/// The name a tokenizer file takes in a model folder: its own when it is one of
/// `TOKENIZER_FILES`, else by its kind (a shipped `data/deberta-v3-tiny.spm.model` becomes
/// `spm.model`).
fn folder_name_of_tokenizer(path: &Path) -> &'static str {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if let Some(known) = TOKENIZER_FILES.iter().find(|&&known| known == name) {
        return known;
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => "tokenizer.json",
        Some("model") => "spm.model",
        _ => "vocab.txt",
    }
}

/// The shortest a (prompt, completion) sequence can be cut to: its three special tokens,
/// `[CLS] prompt [SEP] completion [SEP]`.
pub const MIN_MAX_LENGTH: usize = 3;

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

/// A model's architecture as its Hugging Face config.json holds it.
pub fn to_hf(cfg: &BertConfig) -> HfBertConfig {
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
        pad_token_id: cfg.pad_token_id,
    }
}

/// Writes the config.json of a model's architecture (one label: a reward model).
fn write_model_config(path: &Path, config: &ModelConfig) -> Result<()> {
    match &config.arch {
        Arch::Bert(bert) => write_hf_config(path, &to_hf(bert), 1),
        Arch::Llama(llama) => llama.write_hf_json(path),
        Arch::Deberta(deberta) => deberta.write_hf_json(path),
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
        pad_token_id: hf.pad_token_id,
    }
}

/// What a model folder may lack: the pooler and the classifier, and only when a run
/// starts from a pretrained encoder.
#[derive(Clone, Copy, Debug)]
pub enum Head {
    /// A trained reward model (scoring, evaluation, resuming): every tensor is stored, or
    /// its logits would come from a random head.
    Stored,
    /// Training from a pretrained encoder: a pooler or classifier the folder lacks starts
    /// as BERT initialises it, from this seed.
    FreshIfAbsent(u64),
}

/// The tensors of BERT's head a pretrained encoder may lack, in groups (of layout names)
/// that are stored or absent together.
const HEAD_GROUPS: [&str; 2] = ["bert.pooler.", "classifier."];

/// Loads a Hugging Face BERT folder (BertModel or BertForSequenceClassification names),
/// starting the pooler and the one-output head as BERT does when absent: a pretrained
/// encoder, as training starts from it.
pub fn load_model_dir(dir: &Path, seed: u64) -> Result<HostModel<f32>> {
    Ok(load_model(dir, Head::FreshIfAbsent(seed))?.0)
}

/// Loads a model folder's `config.json` and `model.safetensors` (or its shards). Every size
/// is checked (config.json's bounds, then each tensor's shape and dtype against the
/// safetensors headers) before the model is allocated, and every weight must be finite.
/// Returns the model and the names of the tensors that `head` let start fresh.
pub fn load_model(dir: &Path, head: Head) -> Result<(HostModel<f32>, Vec<String>)> {
    if !dir.is_dir() {
        return Err(Error::user(format!(
            "{}: no such model folder",
            dir.display()
        )));
    }
    let config_path = dir.join("config.json");
    if is_decoder_folder(&config_path)? {
        return load_decoder(dir, &config_path, head);
    }
    if read_model_type(&config_path)?.as_deref() == Some("deberta-v2") {
        return load_deberta(dir, &config_path, head);
    }
    load_bert(dir, &config_path, head)
}

/// Whether config.json names one of the decoder families (`model_type` llama, mistral,
/// qwen2): those load through `load_decoder`, every other folder as BERT.
fn is_decoder_folder(config_path: &Path) -> Result<bool> {
    let model_type = read_model_type(config_path)?;
    Ok(model_type
        .as_deref()
        .and_then(Family::from_model_type)
        .is_some())
}

/// The weights of a Hugging Face folder: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` maps each tensor to.
struct FolderWeights {
    shards: Vec<SafeTensors>,
    /// Tensor name -> index into `shards`.
    shard_of: HashMap<String, usize>,
}

impl FolderWeights {
    /// Whether the weights are shards: no `model.safetensors`, and an index of shards.
    fn is_sharded(dir: &Path) -> bool {
        !dir.join("model.safetensors").is_file()
            && dir.join("model.safetensors.index.json").is_file()
    }

    /// The file that says where the weights are: the shards' index, else `model.safetensors`
    /// (whose absence is then the error).
    fn source(dir: &Path) -> PathBuf {
        match FolderWeights::is_sharded(dir) {
            true => dir.join("model.safetensors.index.json"),
            false => dir.join("model.safetensors"),
        }
    }

    fn open(dir: &Path) -> Result<FolderWeights> {
        if !FolderWeights::is_sharded(dir) {
            let shard = SafeTensors::open(&dir.join("model.safetensors"))?;
            let shard_of = shard.names().iter().map(|n| (n.to_string(), 0)).collect();
            return Ok(FolderWeights {
                shards: vec![shard],
                shard_of,
            });
        }
        let index_path = dir.join("model.safetensors.index.json");
        let map = read_weight_map(&index_path)?;
        let mut files: Vec<&String> = map.values().collect();
        files.sort();
        files.dedup();
        let mut shards = Vec::with_capacity(files.len());
        for file in &files {
            // A shard is named by the index: a bare file name in the same folder.
            if file.contains('/') || file.contains('\\') || file.as_str() == ".." {
                return Err(Error::user(format!(
                    "{}: key 'weight_map': shard `{file}` is not a file name in the folder",
                    index_path.display()
                )));
            }
            shards.push(SafeTensors::open(&dir.join(file))?);
        }
        let mut shard_of = HashMap::new();
        for (name, file) in &map {
            let at = files.iter().position(|f| *f == file).unwrap_or(0);
            if shards[at].get(name).is_none() {
                return Err(Error::user(format!(
                    "{}: tensor `{name}` is missing; {} maps it there",
                    shards[at].path().display(),
                    index_path.display()
                )));
            }
            shard_of.insert(name.clone(), at);
        }
        Ok(FolderWeights { shards, shard_of })
    }

    fn get(&self, name: &str) -> Option<&SafeTensors> {
        self.shard_of.get(name).map(|&at| &self.shards[at])
    }
}

/// `weight_map` of a sharded folder's index: tensor name -> shard file.
fn read_weight_map(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        Error::user(format!(
            "{}:{}: not valid JSON: {e}",
            path.display(),
            e.line()
        ))
    })?;
    let Some(serde_json::Value::Object(map)) = value.get("weight_map") else {
        return Err(Error::user(format!(
            "{}: key 'weight_map': missing or not an object of tensor name -> shard file",
            path.display()
        )));
    };
    map.iter()
        .map(|(name, file)| match file {
            serde_json::Value::String(f) => Ok((name.clone(), f.clone())),
            other => Err(Error::user(format!(
                "{}: key 'weight_map.{name}': expected a shard file name, found {other}",
                path.display()
            ))),
        })
        .collect()
}

/// Loads a BERT folder (BertForSequenceClassification, or a pretrained BertModel whose
/// pooler and classifier start fresh when training).
fn load_bert(dir: &Path, config_path: &Path, head: Head) -> Result<(HostModel<f32>, Vec<String>)> {
    let config = from_hf(&read_hf_config(config_path)?);
    config.validate(&config_path.display().to_string())?;
    let layout = ParamLayout::new(&config);
    let stored = FolderTensors {
        // A base model (BertModel) stores its tensors without the `bert.` prefix.
        prefix: "bert.",
        probe: "bert.embeddings.word_embeddings.weight",
        head_groups: &HEAD_GROUPS,
        head_missing: "; a trained reward model stores its pooler and classifier (only \
                       training from a pretrained encoder starts them fresh)",
        expected: "; expected every tensor of BERT (BertModel or BertForSequenceClassification \
                   names)",
    };
    load_folder_tensors(dir, config, &layout, &stored, head)
}

/// Loads a Llama, Mistral or Qwen2 folder (`*ForSequenceClassification`, `*ForCausalLM`
/// or base-model names); `score.weight` may be absent only when training.
fn load_decoder(
    dir: &Path,
    config_path: &Path,
    head: Head,
) -> Result<(HostModel<f32>, Vec<String>)> {
    let config = LlamaConfig::from_hf_json(config_path)?;
    config.warn_if_pad_is_eos(&config_path.display().to_string());
    let layout = ParamLayout::llama(&config);
    let stored = FolderTensors {
        // A base model (LlamaModel) stores its tensors without the `model.` prefix.
        prefix: "model.",
        probe: "model.embed_tokens.weight",
        head_groups: &["score."],
        head_missing: "; a trained reward model stores its head (only training starts it fresh)",
        expected: "; expected every tensor of the config's architecture",
    };
    load_folder_tensors(dir, config, &layout, &stored, head)
}

/// Loads a DeBERTa-v2/v3 folder (`DebertaV2ForSequenceClassification`, or a pretrained
/// `DebertaV2Model`/`ForMaskedLM` whose pooler and classifier start fresh when training).
fn load_deberta(
    dir: &Path,
    config_path: &Path,
    head: Head,
) -> Result<(HostModel<f32>, Vec<String>)> {
    let config = DebertaConfig::from_hf_json(config_path)?;
    let layout = ParamLayout::deberta(&config);
    let stored = FolderTensors {
        // A base model (DebertaV2Model) stores its tensors without the `deberta.` prefix.
        prefix: "deberta.",
        probe: "deberta.embeddings.word_embeddings.weight",
        head_groups: &["pooler.", "classifier."],
        head_missing: "; a trained reward model stores its pooler and classifier (only \
                       training starts them fresh)",
        expected: "; expected every tensor of the config's architecture",
    };
    load_folder_tensors(dir, config, &layout, &stored, head)
}

/// How an architecture's tensors are stored in a Hugging Face folder.
struct FolderTensors {
    /// The task model's prefix, which a base model's names lack.
    prefix: &'static str,
    /// A tensor every task-model folder has, with the prefix.
    probe: &'static str,
    /// The head's tensors, in groups by their layout names' prefixes: absent from a
    /// pretrained folder, started fresh for training; each group stored or absent whole.
    head_groups: &'static [&'static str],
    /// Appended to the error of a missing head when scoring.
    head_missing: &'static str,
    /// Appended to the error of any other missing tensor.
    expected: &'static str,
}

/// Reads every tensor of `layout` from the folder's safetensors (one file or shards):
/// config checked first by the caller, every tensor's shape and dtype from the headers,
/// then the weights, which must be finite. A head tensor may be absent only with
/// `Head::FreshIfAbsent`, and only with the rest of its group: it then starts as
/// transformers initialises it, and its name is returned.
fn load_folder_tensors(
    dir: &Path,
    config: impl Into<ModelConfig>,
    layout: &ParamLayout,
    stored: &FolderTensors,
    head: Head,
) -> Result<(HostModel<f32>, Vec<String>)> {
    let weights = FolderWeights::open(dir)?;
    let has_prefix = weights.get(stored.probe).is_some();
    let stored_name = |name: &str| match has_prefix {
        true => name.to_string(),
        false => name.strip_prefix(stored.prefix).unwrap_or(name).to_string(),
    };
    // What a missing tensor is blamed on: the single file, or the index that maps none.
    let where_ = FolderWeights::source(dir).display().to_string();
    let mut fresh = Vec::new();
    for spec in &layout.tensors {
        let name = stored_name(&spec.name);
        if let Some(shard) = weights.get(&name) {
            shard.float_tensor(&name, &spec.shape)?;
            continue;
        }
        let group = stored
            .head_groups
            .iter()
            .find(|group| spec.name.starts_with(*group));
        let why = match (group, head) {
            (None, _) => stored.expected.to_string(),
            (Some(_), Head::Stored) => stored.head_missing.to_string(),
            (Some(group), Head::FreshIfAbsent(_)) => {
                // Half a head is no pretrained encoder's: refused, not half started fresh.
                let present = layout
                    .tensors
                    .iter()
                    .filter(|t| t.name.starts_with(group))
                    .map(|t| stored_name(&t.name))
                    .find(|t| weights.get(t).is_some());
                match present {
                    None => {
                        fresh.push(spec.name.clone());
                        continue;
                    }
                    Some(present) => {
                        format!(" while `{present}` is stored; expected both or neither")
                    }
                }
            }
        };
        return Err(Error::user(format!(
            "{where_}: tensor `{name}` is missing{why}"
        )));
    }
    let mut model = HostModel::<f32>::zeros(config);
    for (index, spec) in layout.tensors.iter().enumerate() {
        let name = stored_name(&spec.name);
        let Some(shard) = weights.get(&name) else {
            if let Head::FreshIfAbsent(seed) = head {
                model.init_tensor(index, seed);
            }
            continue;
        };
        let values = shard.read_f32(&name, &spec.shape)?;
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::user(format!(
                "{}: tensor `{name}`: value {at} is {}; expected finite weights",
                shard.path().display(),
                values[at]
            )));
        }
        model.params[spec.range()].copy_from_slice(&values);
    }
    Ok((model, fresh))
}

/// The vocabulary of a model folder (its own `vocab.txt`, required), or the shipped one for
/// a model built from a named architecture.
pub fn vocab_path(model_dir: Option<&Path>) -> Result<PathBuf> {
    match model_dir {
        Some(dir) => {
            let path = dir.join("vocab.txt");
            if !path.is_file() {
                return Err(Error::user(format!(
                    "{}: missing; a model folder carries the vocabulary its ids were trained on",
                    path.display()
                )));
            }
            Ok(path)
        }
        None => Ok(crate::data::data_dir().join("vocab.txt")),
    }
}

/// The tokenizer file of a model folder, for its architecture (see `TOKENIZER_FILES`).
fn tokenizer_path(dir: &Path, config: &ModelConfig) -> Result<PathBuf> {
    match &config.arch {
        Arch::Bert(_) => vocab_path(Some(dir)),
        Arch::Deberta(_) => ["tokenizer.json", "spm.model"]
            .iter()
            .map(|name| dir.join(name))
            .find(|path| path.is_file())
            .ok_or_else(|| {
                Error::user(format!(
                    "{}: no tokenizer.json or spm.model; a DeBERTa folder carries the \
                     SentencePiece tokenizer its ids were trained on",
                    dir.display()
                ))
            }),
        Arch::Llama(_) => {
            let path = dir.join("tokenizer.json");
            match path.is_file() {
                true => Ok(path),
                false => Err(Error::user(format!(
                    "{}: missing; a decoder folder carries the tokenizer.json its ids were \
                     trained on",
                    path.display()
                ))),
            }
        }
    }
}

/// The tokenizer of a model folder, checked against its config.json; with its file.
fn folder_tokenizer(dir: &Path, model: &HostModel<f32>) -> Result<(Tokenizer, PathBuf)> {
    let path = tokenizer_path(dir, &model.config)?;
    let config = dir.join("config.json").display().to_string();
    Ok((model_tokenizer(&path, model, &config)?, path))
}

/// Reads a model's tokenizer and checks it against the model's config: an id for every
/// token inside the word embeddings (WordPiece: one entry per row exactly; DeBERTa-v3's
/// table has spare rows, 128,100 for 128,001 tokens), and the padding token where
/// `pad_token_id` says. `config` names what set the model's sizes (its config.json, or the
/// architecture's name).
fn model_tokenizer(path: &Path, model: &HostModel<f32>, config: &str) -> Result<Tokenizer> {
    let cfg = &model.config;
    let (tok, exact) = match &cfg.arch {
        Arch::Bert(_) => (Tokenizer::from_vocab_file(path)?, true),
        Arch::Deberta(_) => (Tokenizer::from_unigram_file(path)?, false),
        Arch::Llama(llama) => {
            let Some(&eos) = llama.eos_token_id.first() else {
                return Err(Error::user(format!(
                    "{config}: key 'eos_token_id': missing; a decoder's sequences end with it"
                )));
            };
            (
                Tokenizer::from_decoder_file(path, eos, llama.padding_id())?,
                false,
            )
        }
    };
    if (exact && tok.vocab_size() != cfg.vocab_size) || tok.vocab_size() > cfg.vocab_size {
        let expected = match exact {
            true => "one entry per row of the word embeddings",
            false => "no more tokens than rows of the word embeddings",
        };
        return Err(Error::user(format!(
            "{}: {} entries, but {config} has vocab_size {}; expected {expected}",
            path.display(),
            tok.vocab_size(),
            cfg.vocab_size
        )));
    }
    if tok.pad_id() != cfg.pad_token_id {
        return Err(Error::user(format!(
            "{config}: key 'pad_token_id': {} is not the id of the padding token ([PAD]) in {} ({})",
            cfg.pad_token_id,
            path.display(),
            tok.pad_id()
        )));
    }
    Ok(tok)
}

/// The model a run starts from and the tokenizer of its vocabulary.
/// Returns the model, its tokenizer and the vocabulary file. A pretrained encoder without
/// a pooler or classifier gets fresh ones, and stderr says so.
pub fn model_for_training(cfg: &Config) -> Result<(HostModel<f32>, Tokenizer, PathBuf)> {
    if let Some((arch, tokenizer)) = crate::models::named(&cfg.model_name) {
        let model = HostModel::init(arch, cfg.seed);
        let path = crate::data::data_dir().join(tokenizer);
        let tok = model_tokenizer(&path, &model, &cfg.model_name)?;
        return Ok((model, tok, path));
    }
    let dir = Path::new(&cfg.model_name);
    if !dir.is_dir() {
        return Err(Error::user(format!(
            "{}: model_name `{}` is neither a known architecture ({}) nor a model folder \
             (for the pretrained MiniLM run scripts/fetch-minilm.sh)",
            cfg.path.display(),
            cfg.model_name,
            crate::models::names().join(", ")
        )));
    }
    let (model, fresh) = load_model(dir, Head::FreshIfAbsent(cfg.seed))?;
    let (tok, vocab) = folder_tokenizer(dir, &model)?;
    if !fresh.is_empty() {
        eprintln!(
            "rcx: {} has no {}: starting them fresh (Hugging Face's initialisation, seed {})",
            FolderWeights::source(dir).display(),
            fresh.join(", "),
            cfg.seed
        );
    }
    Ok((model, tok, vocab))
}

/// A trained model folder (written by rcx, or any whole BertForSequenceClassification
/// folder) with its tokenizer and its `rcx.json` notes, when it has them.
pub fn load_for_scoring(dir: &Path) -> Result<(HostModel<f32>, Tokenizer, Option<ModelMeta>)> {
    let (model, _) = load_model(dir, Head::Stored)?;
    let (tok, _) = folder_tokenizer(dir, &model)?;
    let meta_path = dir.join("rcx.json");
    let meta = match fs::read_to_string(&meta_path) {
        Ok(text) => Some(read_model_meta(&meta_path, &text)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(&meta_path, e)),
    };
    Ok((model, tok, meta))
}

/// Parses `rcx.json`; every error names the file and the key. Keys this rcx does not
/// know are ignored (a later version's notes).
fn read_model_meta(path: &Path, text: &str) -> Result<ModelMeta> {
    use serde::de::value::MapDeserializer;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        Error::user(format!(
            "{}:{}: not valid JSON: {e}",
            path.display(),
            e.line()
        ))
    })?;
    let serde_json::Value::Object(entries) = value else {
        return Err(Error::user(format!(
            "{}: expected a JSON object of model notes",
            path.display()
        )));
    };
    // Deserialized entry by entry, so that a value's error can be told its key: the last
    // key handed out is the one whose value failed.
    let current_key = std::cell::RefCell::new(None);
    let tracked = entries.into_iter().map(|(key, value)| {
        current_key.replace(Some(key.clone()));
        (key, value)
    });
    let meta =
        ModelMeta::deserialize(MapDeserializer::new(tracked)).map_err(|e: serde_json::Error| {
            let message = e.to_string();
            // A missing field's message names it already, and no value was at fault.
            match current_key.borrow().as_deref() {
                Some(key) if !message.starts_with("missing field") => {
                    Error::user(format!("{}: key '{key}': {message}", path.display()))
                }
                _ => Error::user(format!("{}: {message}", path.display())),
            }
        })?;
    let bad =
        |key: &str, msg: String| Error::user(format!("{}: key '{key}': {msg}", path.display()));
    if meta.max_length < MIN_MAX_LENGTH {
        return Err(bad(
            "max_length",
            format!(
                "expected at least {} (the special tokens of a prompt and completion), found {}",
                MIN_MAX_LENGTH, meta.max_length
            ),
        ));
    }
    if !(meta.eps.is_finite() && meta.eps > 0.0) {
        return Err(bad(
            "eps",
            format!("expected a number > 0, found {}", meta.eps),
        ));
    }
    crate::loss::LossSpec::parse(&meta.loss).map_err(|e| bad("loss", e.to_string()))?;
    Ok(meta)
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

/// Every `checkpoint-<step>` folder of a run folder, oldest first.
fn checkpoints(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(|n| n.strip_prefix("checkpoint-")) else {
            continue;
        };
        if let Ok(step) = step.parse::<usize>()
            && entry.path().is_dir()
        {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// What saves killed half-way leave in a run folder: checkpoint folders being written
/// (`.checkpoint-<step>.tmp`) and files being replaced (`.<name>.tmp<pid>`, see
/// `safetensors::write_atomic`).
fn temporaries(dir: &Path) -> Result<Vec<PathBuf>> {
    let replaced = CHECKPOINT_FILES
        .iter()
        .chain(&TOKENIZER_FILES)
        .chain(&["metrics.jsonl", "trainer_state.json"])
        .map(|name| format!(".{name}.tmp"))
        .collect::<Vec<_>>();
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if (name.starts_with(".checkpoint-") && name.ends_with(".tmp"))
            || replaced
                .iter()
                .any(|prefix| name.starts_with(prefix.as_str()))
        {
            found.push(entry.path());
        }
    }
    Ok(found)
}

/// Removes a file or a folder of rcx's own.
fn remove(path: &Path) -> Result<()> {
    let removed = match path.is_dir() {
        true => fs::remove_dir_all(path),
        false => fs::remove_file(path),
    };
    removed.map_err(|e| Error::write(path, e))
}

/// Removes what a save killed half-way left behind: never a checkpoint, only in the way.
pub fn remove_partial_saves(dir: &Path) -> Result<()> {
    temporaries(dir)?.iter().try_for_each(|path| remove(path))
}

/// The outputs of an earlier run in a run folder: its checkpoints, final model files,
/// metrics and temporaries; never anything else.
fn previous_outputs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = checkpoints(dir)?.into_iter().map(|(_, p)| p).collect();
    let finals = [
        "model.safetensors",
        "config.json",
        "rcx.json",
        "metrics.jsonl",
    ];
    for name in finals.iter().chain(&TOKENIZER_FILES) {
        let path = dir.join(name);
        if path.is_file() {
            found.push(path);
        }
    }
    found.extend(temporaries(dir)?);
    Ok(found)
}

/// A fresh run must not silently destroy an earlier one, nor leave any of its outputs
/// behind to be mistaken for its own (`rcx eval` on an interrupted fresh run must not find
/// the old model): without `overwrite` it refuses while any is there, with it it removes
/// them all.
pub fn start_fresh(dir: &Path, overwrite: bool) -> Result<()> {
    let previous = previous_outputs(dir)?;
    if let Some(first) = previous.first()
        && !overwrite
    {
        return Err(Error::user(format!(
            "output_dir {} already holds a run ({}): pass --resume to continue it or \
             --overwrite to start again",
            dir.display(),
            first.file_name().unwrap_or_default().to_string_lossy()
        )));
    }
    previous.iter().try_for_each(|path| remove(path))
}

/// Appends one JSON line to `metrics.jsonl`.
pub fn append_metrics<T: Serialize>(dir: &Path, line: &T) -> Result<()> {
    let path = dir.join("metrics.jsonl");
    let text = serde_json::to_string(line).map_err(|e| Error::internal(e.to_string()))?;
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::write(&path, e))?;
    writeln!(file, "{text}").map_err(|e| Error::write(&path, e))
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

/// Writes a model's `model.safetensors` (Hugging Face's tensor names) and `config.json`
/// into `dir`: what transformers loads as the architecture's `*ForSequenceClassification`.
pub fn write_model_weights(dir: &Path, model: &Weights<'_>) -> Result<()> {
    write_tensors(
        &dir.join("model.safetensors"),
        &tensor_list(model.layout, model.params, ""),
    )?;
    write_model_config(&dir.join("config.json"), model.config)
}

/// Writes a model folder's files into `dir` (each file atomically).
fn write_model_files(
    dir: &Path,
    cfg: &Config,
    model: &Weights<'_>,
    tok_vocab: &Path,
) -> Result<()> {
    write_model_weights(dir, model)?;
    let tokenizer = dir.join(folder_name_of_tokenizer(tok_vocab));
    if tok_vocab != tokenizer {
        fs::copy(tok_vocab, &tokenizer).map_err(|e| Error::io(&tokenizer, e))?;
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

/// Saves `checkpoint-<step>` atomically and keeps the two newest; returns its folder.
/// What will be dropped goes first, so that keeping two needs room for two, never three:
/// every checkpoint but the newest one before `step` (those after it are ones `--resume`
/// skipped as not verifying). A failed save removes its temporary folder and leaves the
/// kept checkpoint as it was.
pub fn save_checkpoint(
    cfg: &Config,
    model: &Weights<'_>,
    vocab: &Path,
    m: &[f32],
    v: &[f32],
    state: &TrainState,
) -> Result<PathBuf> {
    let out = &cfg.output_dir;
    let all = checkpoints(out)?;
    let kept = all.iter().rev().find(|(s, _)| *s < state.step);
    for (s, old) in &all {
        if kept.is_none_or(|(k, _)| k != s) {
            remove(old)?;
        }
    }
    let tmp = out.join(format!(".checkpoint-{}.tmp", state.step));
    let written = write_checkpoint_files(&tmp, cfg, model, vocab, m, v, state);
    if written.is_err() {
        // Best effort: the error that stopped the save is the one to report.
        let _ = fs::remove_dir_all(&tmp);
    }
    written?;
    let dest = out.join(format!("checkpoint-{}", state.step));
    fs::rename(&tmp, &dest).map_err(|e| Error::write(&dest, e))?;
    Ok(dest)
}

/// Writes a whole checkpoint into the folder `tmp`, trainer_state.json with the checksums
/// of the other files last.
fn write_checkpoint_files(
    tmp: &Path,
    cfg: &Config,
    model: &Weights<'_>,
    vocab: &Path,
    m: &[f32],
    v: &[f32],
    state: &TrainState,
) -> Result<()> {
    if tmp.exists() {
        fs::remove_dir_all(tmp).map_err(|e| Error::write(tmp, e))?;
    }
    fs::create_dir_all(tmp).map_err(|e| Error::write(tmp, e))?;
    write_model_files(tmp, cfg, model, vocab)?;
    let mut moments = tensor_list(model.layout, m, ".exp_avg");
    moments.extend(tensor_list(model.layout, v, ".exp_avg_sq"));
    write_tensors(&tmp.join("optimizer.safetensors"), &moments)?;
    let mut state = state.clone();
    for name in CHECKPOINT_FILES
        .into_iter()
        .chain([folder_name_of_tokenizer(vocab)])
    {
        let path = tmp.join(name);
        let digest = sha256_file(&path).map_err(|e| Error::write(&path, e))?;
        state.files.insert(name.to_string(), digest);
    }
    let text = serde_json::to_string_pretty(&state).map_err(|e| Error::internal(e.to_string()))?;
    write_atomic(&tmp.join("trainer_state.json"), text.as_bytes())
}

/// Where in the parameter arenas a value is not finite: "the weights", "the AdamW first
/// moments" or "the AdamW second moments", with the first tensor holding one.
pub fn first_non_finite(model: &Weights<'_>, m: &[f32], v: &[f32]) -> Option<String> {
    let arenas = [
        ("the weights", model.params),
        ("the AdamW first moments", m),
        ("the AdamW second moments", v),
    ];
    for (what, arena) in arenas {
        if let Some(spec) = model
            .layout
            .tensors
            .iter()
            .find(|t| arena[t.range()].iter().any(|x| !x.is_finite()))
        {
            return Some(format!("{what} are not finite (first in `{}`)", spec.name));
        }
    }
    None
}

/// Loads the newest checkpoint of `out` that verifies into the run's arenas: its
/// trainer_state.json reads and names its own folder's step, every file matches its
/// checksum, and weights and moments are finite. Each one skipped is reported on stderr
/// with the reason; when none verifies, the error lists them all.
pub fn load_newest_verified(
    out: &Path,
    model: &mut HostModel<f32>,
    m: &mut [f32],
    v: &mut [f32],
) -> Result<(PathBuf, TrainState)> {
    let all = checkpoints(out)?;
    if all.is_empty() {
        return Err(Error::user(format!(
            "--resume: no checkpoint in {}",
            out.display()
        )));
    }
    let mut skipped = Vec::new();
    for (step, dir) in all.into_iter().rev() {
        match load_verified(&dir, step, model, m, v) {
            Ok(state) => {
                for why in &skipped {
                    eprintln!("rcx: warning: --resume skipped {why}");
                }
                if state.files.is_empty() {
                    eprintln!(
                        "rcx: warning: {} was written by an older rcx, without checksums or \
                         training settings: resuming from it unverified",
                        dir.display()
                    );
                }
                return Ok((dir, state));
            }
            Err(why) => skipped.push(why),
        }
    }
    // One line: every reason is in the error.
    Err(Error::user(format!(
        "--resume: no checkpoint in {} verifies ({})",
        out.display(),
        skipped.join("; ")
    )))
}

/// Verifies and loads one checkpoint; the reason it is unusable otherwise.
fn load_verified(
    dir: &Path,
    step: usize,
    model: &mut HostModel<f32>,
    m: &mut [f32],
    v: &mut [f32],
) -> std::result::Result<TrainState, String> {
    let state_path = dir.join("trainer_state.json");
    let text =
        fs::read_to_string(&state_path).map_err(|e| format!("{}: {e}", state_path.display()))?;
    let state: TrainState = serde_json::from_str(&text)
        .map_err(|e| format!("{}:{}: {e}", state_path.display(), e.line()))?;
    if state.step != step {
        return Err(format!(
            "{}: step {} is not its folder's step {step}",
            state_path.display(),
            state.step
        ));
    }
    if !state.files.is_empty() {
        for name in ["model.safetensors", "optimizer.safetensors"] {
            if !state.files.contains_key(name) {
                return Err(format!("{}: no checksum for {name}", state_path.display()));
            }
        }
        for (name, expected) in &state.files {
            let path = dir.join(name);
            let actual = sha256_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            if &actual != expected {
                return Err(format!(
                    "{}: its sha256 is not the one recorded in trainer_state.json (truncated or \
                     changed since the save)",
                    path.display()
                ));
            }
        }
    }
    load_train_state(dir, model, m, v).map_err(|e| e.to_string())?;
    if let Some(what) = first_non_finite(&model.weights(), m, v) {
        return Err(format!(
            "{}: {what} (saved by a run that had diverged)",
            dir.display()
        ));
    }
    Ok(state)
}

/// Loads weights and moments of a checkpoint into the run's arenas.
fn load_train_state(
    dir: &Path,
    model: &mut HostModel<f32>,
    m: &mut [f32],
    v: &mut [f32],
) -> Result<()> {
    // A checkpoint holds its whole head: a missing one must not resume as a random head.
    let (saved, _) = load_model(dir, Head::Stored)?;
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
    Ok(())
}

/// The trained model at the top of the output folder, for `rcx score` and `rcx eval`.
pub fn save_final(cfg: &Config, model: &Weights<'_>, vocab: &Path) -> Result<()> {
    write_model_files(&cfg.output_dir, cfg, model, vocab)
}
