//! Reward models over the `Backend` interface. An architecture (`bert`) writes its forward
//! and backward once, over `Buf` handles and backend ops; `Model` puts it on a backend and
//! is what training, scoring and checkpoints talk to: forward, backward, one training step,
//! and the parameter-shaped arenas on the host.
//!
//! Three architectures: BERT (`bert`), DeBERTa-v2/v3 (`deberta`; the two share the
//! feed-forward block after attention, `encoder`) and the Llama family of decoders (`llama`:
//! Llama, Mistral, Qwen2); `ModelConfig` says which, and `Model` dispatches to its file.
//!
//! Adding an architecture: a file beside bert.rs with its config (validated against sizes
//! before anything is allocated), its `ParamLayout` (Hugging Face's tensor names), its
//! activation layout and its forward/backward over `Backend`; its loader in checkpoint.rs.

pub mod bert;
pub mod deberta;
mod encoder;
pub mod llama;

use std::ops::Range;
use std::sync::Arc;

pub use bert::{ActLayout, BertConfig};
pub use deberta::DebertaConfig;
pub use llama::{Family, LlamaConfig};

pub use crate::backend::Batch;
use crate::backend::DType;
use crate::backend::cpu::Cpu;
use crate::backend::cuda::{Cuda, CudaRuntime};
use crate::backend::{AttentionDropout, Backend, Buf, OptimStep};
use crate::distributed::{Alone, StepSync};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::loss::{LossExtras, LossSpec, PromptType};
use crate::rng::{Rng, derive_seed};

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

    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// The parameter arena's layout: every tensor of the model in a fixed order (made by an
/// architecture's constructor, `ParamLayout::new` for BERT). Gradients and the optimizer's
/// moments use the same layout.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub tensors: Vec<TensorSpec>,
    pub total: usize,
}

impl ParamLayout {
    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// One (range, decay) per tensor: what the optimizer steps through.
    pub fn optimizer_tensors(&self) -> Vec<(Range<usize>, bool)> {
        self.tensors.iter().map(|t| (t.range(), t.decay)).collect()
    }
}

/// Which architecture a model is, with its config.
#[derive(Clone, Debug, PartialEq)]
pub enum Arch {
    Bert(BertConfig),
    Llama(LlamaConfig),
    Deberta(DebertaConfig),
}

/// A model's architecture, and the sizes every caller reads whatever the architecture (as
/// Hugging Face names them), copied from it by `From`: training, scoring and checkpoints
/// read these and never need to know which architecture runs.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub max_position_embeddings: usize,
    /// The id sequences are padded with (a decoder's: `LlamaConfig::padding_id`).
    pub pad_token_id: u32,
    /// 0 for a decoder: the Llama family has no hidden dropout.
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
}

impl From<BertConfig> for ModelConfig {
    fn from(cfg: BertConfig) -> ModelConfig {
        ModelConfig {
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            max_position_embeddings: cfg.max_position_embeddings,
            pad_token_id: cfg.pad_token_id,
            hidden_dropout_prob: cfg.hidden_dropout_prob,
            attention_probs_dropout_prob: cfg.attention_probs_dropout_prob,
            arch: Arch::Bert(cfg),
        }
    }
}

impl From<DebertaConfig> for ModelConfig {
    fn from(cfg: DebertaConfig) -> ModelConfig {
        ModelConfig {
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            max_position_embeddings: cfg.max_position_embeddings,
            pad_token_id: cfg.pad_token_id,
            hidden_dropout_prob: cfg.hidden_dropout_prob,
            attention_probs_dropout_prob: cfg.attention_probs_dropout_prob,
            arch: Arch::Deberta(cfg),
        }
    }
}

impl From<LlamaConfig> for ModelConfig {
    fn from(cfg: LlamaConfig) -> ModelConfig {
        ModelConfig {
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            max_position_embeddings: cfg.max_position_embeddings,
            pad_token_id: cfg.padding_id(),
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: cfg.attention_dropout,
            arch: Arch::Llama(cfg),
        }
    }
}

impl ModelConfig {
    /// The parameter layout of the architecture.
    pub fn layout(&self) -> ParamLayout {
        match &self.arch {
            Arch::Bert(cfg) => ParamLayout::new(cfg),
            Arch::Llama(cfg) => ParamLayout::llama(cfg),
            Arch::Deberta(cfg) => ParamLayout::deberta(cfg),
        }
    }
}

/// The architectures rcx builds from scratch by name, each with the file in data/ of its
/// tokenizer: `bert-*` (WordPiece vocab.txt), `deberta-v3-tiny` (SentencePiece),
/// `llama-*` (byte-level BPE tokenizer.json).
pub fn named(name: &str) -> Option<(ModelConfig, &'static str)> {
    if let Some(config) = BertConfig::named(name) {
        return Some((config.into(), "vocab.txt"));
    }
    if let Some((config, tokenizer)) = DebertaConfig::named(name) {
        return Some((config.into(), tokenizer));
    }
    LlamaConfig::named(name).map(|(config, tokenizer)| (config.into(), tokenizer))
}

/// Every name `named` knows.
pub fn names() -> Vec<&'static str> {
    [BertConfig::NAMES, DebertaConfig::NAMES, LlamaConfig::NAMES].concat()
}

/// A model's parameters on the host: what a checkpoint holds and a `Model` is built from.
pub struct HostModel<F> {
    pub config: ModelConfig,
    pub layout: ParamLayout,
    pub params: Vec<F>, // [layout.total]
}

impl<F: Float> HostModel<F> {
    /// A model initialised as Hugging Face initialises it: normal(0, 0.02) weights and
    /// embeddings (BERT's; a decoder's std is its initializer_range; the padding row of the
    /// token table zero), zero biases, unit norm weights.
    pub fn init(config: impl Into<ModelConfig>, seed: u64) -> HostModel<F> {
        let mut model = HostModel::zeros(config);
        for index in 0..model.layout.tensors.len() {
            model.init_tensor(index, seed);
        }
        model
    }

    /// All parameters zero: the arena a checkpoint is read into.
    pub fn zeros(config: impl Into<ModelConfig>) -> HostModel<F> {
        let config = config.into();
        let layout = config.layout();
        let params = vec![F::ZERO; layout.total];
        HostModel {
            config,
            layout,
            params,
        }
    }

    /// Hugging Face's initialisation of tensor `index` of the layout, from a stream of its
    /// own so that a tensor missing from a pretrained checkpoint (the pooler, the head) is
    /// drawn alone.
    pub fn init_tensor(&mut self, index: usize, seed: u64) {
        let spec = &self.layout.tensors[index];
        let values = &mut self.params[spec.range()];
        let mut rng = Rng::new(derive_seed(seed, &[0x1417, index as u64]));
        let (std, table, pad) = match &self.config.arch {
            Arch::Bert(cfg) => (0.02, "word_embeddings.weight", Some(cfg.pad_token_id)),
            Arch::Llama(cfg) => (
                cfg.initializer_range,
                "embed_tokens.weight",
                cfg.pad_token_id,
            ),
            Arch::Deberta(cfg) => (
                cfg.initializer_range,
                "word_embeddings.weight",
                Some(cfg.pad_token_id),
            ),
        };
        if spec.name.contains("LayerNorm.weight") || spec.name.ends_with("norm.weight") {
            values.fill(F::ONE);
        } else if spec.shape.len() == 2 {
            for x in values.iter_mut() {
                *x = F::from_f64(std * rng.normal());
            }
        } else {
            values.fill(F::ZERO);
        }
        let c = self.config.hidden_size;
        let pad = pad.map(|p| p as usize);
        if let Some(pad) = pad.filter(|&p| spec.name.ends_with(table) && p < self.config.vocab_size)
        {
            values[pad * c..(pad + 1) * c].fill(F::ZERO);
        }
    }

    pub fn num_params(&self) -> usize {
        self.layout.total
    }

    /// The model on the CPU backend, its parameters moved there.
    pub fn on_cpu(self) -> Model<Cpu<F>> {
        Model::new(self.config, Cpu::new(self.params))
    }
}

impl HostModel<f32> {
    pub fn weights(&self) -> Weights<'_> {
        Weights {
            config: &self.config,
            layout: &self.layout,
            params: &self.params,
        }
    }

    /// The model on the GPU, its parameters copied there in one upload.
    pub fn on_cuda(&self, rt: Arc<CudaRuntime>, dtype: DType) -> Result<Model<Cuda>> {
        Ok(Model::new(
            self.config.clone(),
            Cuda::new(rt, &self.params, dtype)?,
        ))
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

/// Indices of the dropout sites, so forward and backward derive the same seeds on
/// every backend. (p, seed) of a hidden-dropout site.
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

/// A model's parameters on the host, borrowed: what a checkpoint writes.
pub struct Weights<'a> {
    pub config: &'a ModelConfig,
    pub layout: &'a ParamLayout,
    pub params: &'a [f32], // [layout.total]
}

/// One micro-batch of a step: a padded batch of every completion of some prompts, their
/// counts K (contiguous, best first) and types, and the forward's dropout.
pub struct MicroBatch<'a> {
    pub batch: &'a Batch,
    pub ks: &'a [usize],
    pub types: &'a [Option<PromptType>],
    pub dropout: Option<Dropout>,
}

/// What a training step reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The mean over micro-batches of each one's mean pair loss.
    pub loss: f64,
    /// The global gradient norm before clipping (NaN when the loss was not finite).
    pub grad_norm: f64,
}

/// What a forward computed, on the host: the encoder's last hidden state [B, T, C], the
/// pooler output [B, C] (before the head's dropout) and the logits [B].
pub type Outputs<S> = (Vec<S>, Vec<S>, Vec<S>);

/// A reward model on a backend: the architecture's config and parameter layout, the
/// backend holding every arena, and the tokens and activation layout of the last forward
/// (which its backward reads).
pub struct Model<B: Backend> {
    pub config: ModelConfig,
    pub layout: ParamLayout,
    pub backend: B,
    /// Set by `start_training`: forwards then make room for the backward's scratch too.
    training: bool,
    /// Whether a decoder runs the common prefix of a batch's grouped sequences once
    /// (`llama::SharedSplit`); on unless `set_shared_prefix(false)`. Encoders ignore it.
    shared_prefix: bool,
    last: Option<(BatchTokens<B::Tokens>, Acts)>,
}

/// A batch's tokens on a backend: the whole sequences', or for a decoder that runs each
/// group's common prefix once, the prefixes' and the rest of the sequences'.
pub enum BatchTokens<T> {
    Whole(T),
    Shared { prompts: T, completions: T },
}

impl<T> BatchTokens<T> {
    /// The whole sequences' tokens: what an encoder reads.
    fn whole(&self) -> Result<&T> {
        match self {
            BatchTokens::Whole(tokens) => Ok(tokens),
            BatchTokens::Shared { .. } => Err(Error::internal(
                "an encoder was given the tokens of a shared prefix",
            )),
        }
    }
}

/// The activation layout of the last forward, of its architecture.
enum Acts {
    Bert(ActLayout),
    Llama(llama::ActLayout),
    // Boxed: its layout is several times the others'.
    Deberta(Box<deberta::ActLayout>),
}

impl Acts {
    fn logits(&self) -> Buf {
        match self {
            Acts::Bert(l) => l.logits(),
            Acts::Llama(l) => l.logits(),
            Acts::Deberta(l) => l.logits(),
        }
    }

    fn dlogits(&self) -> Buf {
        match self {
            Acts::Bert(l) => l.dlogits(),
            Acts::Llama(l) => l.dlogits(),
            Acts::Deberta(l) => l.dlogits(),
        }
    }

    fn last_hidden(&self) -> Buf {
        match self {
            Acts::Bert(l) => l.last_hidden(),
            Acts::Llama(l) => l.last_hidden(),
            Acts::Deberta(l) => l.last_hidden(),
        }
    }

    fn pooled(&self) -> Buf {
        match self {
            Acts::Bert(l) => l.pooled(),
            Acts::Llama(l) => l.pooled(),
            Acts::Deberta(l) => l.pooled(),
        }
    }

    /// Rows (tokens) the forward computed.
    fn rows(&self) -> usize {
        match self {
            Acts::Bert(l) => l.rows(),
            Acts::Llama(l) => l.rows(),
            Acts::Deberta(l) => l.rows(),
        }
    }

    /// Elements of the Acts and Stats arenas, for the forward alone or with the backward.
    fn lens(&self, training: bool) -> (usize, usize) {
        let (forward, all) = match self {
            Acts::Bert(l) => (l.forward_lens, l.lens),
            Acts::Llama(l) => (l.forward_lens, l.lens),
            Acts::Deberta(l) => (l.forward_lens, l.lens),
        };
        if training { all } else { forward }
    }
}

impl<B: Backend> Model<B> {
    pub fn new(config: impl Into<ModelConfig>, backend: B) -> Model<B> {
        let config = config.into();
        Model {
            layout: config.layout(),
            config,
            backend,
            training: false,
            shared_prefix: true,
            last: None,
        }
    }

    /// Turns the decoders' shared prefix on or off (on by default): the logits and
    /// gradients are the same either way, up to the order of floating-point sums (and the
    /// attention-dropout draw, whose masks differ between the two layouts).
    pub fn set_shared_prefix(&mut self, on: bool) {
        self.shared_prefix = on;
    }

    pub fn num_params(&self) -> usize {
        self.layout.total
    }

    /// Rejects a batch the model cannot embed, naming what is out of range.
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
        match &cfg.arch {
            Arch::Bert(bert) => {
                if let Some(&ty) = batch
                    .token_type_ids
                    .iter()
                    .find(|&&ty| ty as usize >= bert.type_vocab_size)
                {
                    return Err(Error::user(format!(
                        "token type {ty} is outside the model's {} token types",
                        bert.type_vocab_size
                    )));
                }
            }
            Arch::Deberta(deberta) if deberta.type_vocab_size > 0 => {
                if let Some(&ty) = batch
                    .token_type_ids
                    .iter()
                    .find(|&&ty| ty as usize >= deberta.type_vocab_size)
                {
                    return Err(Error::user(format!(
                        "token type {ty} is outside the model's {} token types",
                        deberta.type_vocab_size
                    )));
                }
            }
            Arch::Deberta(_) => {}
            Arch::Llama(llama) => {
                if batch.b > 0 && batch.t == 0 {
                    return Err(Error::user(
                        "a batch of empty sequences: a decoder reads each reward at a token",
                    ));
                }
                if let Some(window) = llama.sliding_window.filter(|&w| batch.t > w) {
                    return Err(Error::user(format!(
                        "a sequence of {} tokens is longer than the model's sliding_window of \
                         {window} (config.json): rcx attends to every earlier token, which \
                         differs past the window; lower `max_length` to at most {window}",
                        batch.t
                    )));
                }
            }
        }
        let (b, t) = (batch.b, batch.t);
        if [&batch.input_ids, &batch.token_type_ids]
            .iter()
            .any(|v| v.len() != b * t)
            || batch.mask.len() != b * t
        {
            return Err(Error::internal(format!(
                "a batch of {b} x {t} tokens holds {} ids, {} types, {} mask values",
                batch.input_ids.len(),
                batch.token_type_ids.len(),
                batch.mask.len()
            )));
        }
        Ok(())
    }

    /// The forward pass: returns the logits [B]. With `dropout`, training mode.
    pub fn forward(&mut self, batch: &Batch, dropout: Option<Dropout>) -> Result<Vec<B::Scalar>> {
        self.run_forward(batch, dropout)?;
        let (_, layout) = self.last()?;
        self.backend.read_stats(layout.logits())
    }

    /// The forward pass, its logits left in the Stats arena (a training step reads them
    /// there: on the device, no copy to the host).
    fn run_forward(&mut self, batch: &Batch, dropout: Option<Dropout>) -> Result<()> {
        self.check_batch(batch)?;
        let cfg = &self.config;
        let types = match &cfg.arch {
            Arch::Bert(bert) => bert.type_vocab_size,
            Arch::Llama(_) => 1,
            // Without a type table the types are not read: the pair template's two segments.
            Arch::Deberta(deberta) => deberta.type_vocab_size.max(2),
        };
        let tables = (cfg.vocab_size, cfg.max_position_embeddings, types);
        // The previous batch's tokens go first: on the device they are memory.
        self.last = None;
        let split = match &cfg.arch {
            Arch::Llama(llama) if self.shared_prefix => llama::SharedSplit::new(llama, batch),
            _ => None,
        };
        let tokens = match &split {
            None => BatchTokens::Whole(self.backend.tokens(batch, tables)?),
            Some(split) => BatchTokens::Shared {
                prompts: self.backend.tokens(&split.prompts, tables)?,
                completions: self.backend.tokens(&split.completions, tables)?,
            },
        };
        let layout = match &cfg.arch {
            Arch::Bert(bert) => Acts::Bert(ActLayout::new(bert, &self.backend, batch.b, batch.t)),
            Arch::Llama(llama) => Acts::Llama(llama::ActLayout::new(
                llama,
                &self.backend,
                batch,
                split.as_ref(),
            )),
            Arch::Deberta(deberta) => Acts::Deberta(Box::new(deberta::ActLayout::new(
                deberta,
                &self.backend,
                batch.b,
                batch.t,
            ))),
        };
        let (acts, stats) = layout.lens(self.training);
        self.backend.reserve(acts, stats)?;
        match (&cfg.arch, &layout) {
            (Arch::Bert(c), Acts::Bert(l)) => {
                bert::forward(c, &mut self.backend, tokens.whole()?, l, dropout)?
            }
            (Arch::Llama(c), Acts::Llama(l)) => {
                llama::forward(c, &mut self.backend, &tokens, l, dropout)?
            }
            (Arch::Deberta(c), Acts::Deberta(l)) => {
                deberta::forward(c, &mut self.backend, tokens.whole()?, l, dropout)?
            }
            _ => return Err(Error::internal("forward: a layout of another architecture")),
        }
        self.last = Some((tokens, layout));
        Ok(())
    }

    fn last(&self) -> Result<&(BatchTokens<B::Tokens>, Acts)> {
        self.last
            .as_ref()
            .ok_or_else(|| Error::internal("the model has run no forward pass"))
    }

    /// A backward needs a forward made for training (with room for its scratch).
    fn check_training(&self) -> Result<()> {
        match self.training {
            true => Ok(()),
            false => Err(Error::internal(
                "backward: the model was not prepared for training (start_training)",
            )),
        }
    }

    /// The token rows the last forward computed: B x T, or fewer for a decoder that ran
    /// each group's common prefix once.
    pub fn last_rows(&self) -> Result<usize> {
        Ok(self.last()?.1.rows())
    }

    /// What the last forward computed.
    pub fn outputs(&self) -> Result<Outputs<B::Scalar>> {
        let (_, l) = self.last()?;
        Ok((
            self.backend.read_acts(l.last_hidden())?,
            self.backend.read_stats(l.pooled())?,
            self.backend.read_stats(l.logits())?,
        ))
    }

    /// f(weights, AdamW first moments, second moments), brought to the host if they are
    /// not there (the moments are empty before `start_training`).
    pub fn with_weights<R>(&self, f: impl FnOnce(&Weights<'_>, &[f32], &[f32]) -> R) -> Result<R>
    where
        B: Backend<Scalar = f32>,
    {
        self.backend.with_state(|params, m, v| {
            let weights = Weights {
                config: &self.config,
                layout: &self.layout,
                params,
            };
            f(&weights, m, v)
        })
    }

    /// Allocates the gradient and optimizer arenas (zero).
    pub fn start_training(&mut self) -> Result<()> {
        self.backend.start_training()?;
        // A forward made before has no room for the backward's scratch.
        self.last = None;
        self.training = true;
        Ok(())
    }

    /// The backward pass of the last forward (same dropout): adds d loss / d parameter into
    /// the gradient arena, given `dlogits` [B].
    pub fn backward(&mut self, dropout: Option<Dropout>, dlogits: &[B::Scalar]) -> Result<()> {
        self.check_training()?;
        let (tokens, l) = self
            .last
            .as_ref()
            .ok_or_else(|| Error::internal("backward: the model has run no forward pass"))?;
        self.backend.write_stats(l.dlogits(), dlogits)?;
        arch_backward(&self.config, &mut self.backend, tokens, l, dropout)
    }

    /// Forward, the ranking loss and backward of one micro-batch: adds its gradient,
    /// divided by `micro_batches` (the step's mean), into the gradient arena. Returns the
    /// micro-batch's mean pair loss (with the terms of `extras`).
    pub fn accumulate(
        &mut self,
        micro: &MicroBatch<'_>,
        loss: &LossSpec,
        eps: f64,
        extras: &LossExtras,
        micro_batches: usize,
    ) -> Result<f64> {
        self.check_training()?;
        self.run_forward(micro.batch, micro.dropout)?;
        let (tokens, l) = self
            .last
            .as_ref()
            .ok_or_else(|| Error::internal("accumulate: the forward pass left no state"))?;
        let value = self.backend.ranking_loss(
            l.dlogits(),
            l.logits(),
            micro.ks,
            micro.types,
            loss,
            eps,
            extras,
            micro_batches,
        )?;
        arch_backward(&self.config, &mut self.backend, tokens, l, micro.dropout)?;
        Ok(value)
    }

    /// One optimizer step: zero the gradients, forward + loss + backward for every
    /// micro-batch, then the global norm, clipping (torch's clip_grad_norm_) and AdamW.
    /// A non-finite loss or norm leaves the parameters as they were.
    pub fn train_step(
        &mut self,
        micro_batches: &[MicroBatch<'_>],
        loss: &LossSpec,
        eps: f64,
        opt: &OptimStep,
    ) -> Result<StepStats> {
        let paper_loss = vec![LossExtras::default(); micro_batches.len()];
        self.train_step_with(micro_batches, &paper_loss, loss, eps, opt)
    }

    /// `train_step` with the loss options of each micro-batch (`extras[i]` for
    /// `micro_batches[i]`: its ties and margins, the centering).
    pub fn train_step_with(
        &mut self,
        micro_batches: &[MicroBatch<'_>],
        extras: &[LossExtras<'_>],
        loss: &LossSpec,
        eps: f64,
        opt: &OptimStep,
    ) -> Result<StepStats> {
        self.train_step_synced(micro_batches, extras, loss, eps, opt, &mut Alone)
    }

    /// `train_step_with` as one rank of a data-parallel step: this rank's micro-batches are
    /// its share of a global step of `sync.world_size()` equal shares; the gradients and the
    /// loss are summed over the ranks before the norm, clipping and AdamW, which every rank
    /// then computes alike.
    pub fn train_step_synced(
        &mut self,
        micro_batches: &[MicroBatch<'_>],
        extras: &[LossExtras<'_>],
        loss: &LossSpec,
        eps: f64,
        opt: &OptimStep,
        sync: &mut dyn StepSync<B>,
    ) -> Result<StepStats> {
        if micro_batches.is_empty() {
            return Err(Error::internal("train_step: no micro-batch"));
        }
        if extras.len() != micro_batches.len() {
            return Err(Error::internal(format!(
                "train_step: {} micro-batches with {} loss options",
                micro_batches.len(),
                extras.len()
            )));
        }
        self.backend.zero_grads()?;
        // Every rank holds an equal share of the global step's micro-batches.
        let count = micro_batches.len() * sync.world_size();
        let mut step_loss = 0.0;
        for (i, (micro, extras)) in micro_batches.iter().zip(extras).enumerate() {
            sync.micro_batch_starts(&mut self.backend, i + 1 == micro_batches.len())?;
            // The step's loss is the mean of its micro-batches' means, as the HF Trainer.
            step_loss += self.accumulate(micro, loss, eps, extras, count)? / count as f64;
        }
        sync.backward_done(&mut self.backend)?;
        if sync.world_size() > 1 {
            // Every rank then takes the same branch below, so none waits for the others.
            let mut summed = [step_loss];
            sync.sum_values(&mut summed)?;
            step_loss = summed[0];
        }
        if !step_loss.is_finite() {
            return Ok(StepStats {
                loss: step_loss,
                grad_norm: f64::NAN,
            });
        }
        let tensors = self.layout.optimizer_tensors();
        let grad_norm = sync.update(&mut self.backend, &tensors, opt)?;
        Ok(StepStats {
            loss: step_loss,
            grad_norm,
        })
    }
}

/// The backward of the architecture whose forward made `layout`.
fn arch_backward<B: Backend>(
    config: &ModelConfig,
    be: &mut B,
    tokens: &BatchTokens<B::Tokens>,
    layout: &Acts,
    dropout: Option<Dropout>,
) -> Result<()> {
    match (&config.arch, layout) {
        (Arch::Bert(c), Acts::Bert(l)) => bert::backward(c, be, tokens.whole()?, l, dropout),
        (Arch::Llama(c), Acts::Llama(l)) => llama::backward(c, be, tokens, l, dropout),
        (Arch::Deberta(c), Acts::Deberta(l)) => {
            deberta::backward(c, be, tokens.whole()?, l, dropout)
        }
        _ => Err(Error::internal(
            "backward: a layout of another architecture",
        )),
    }
}
