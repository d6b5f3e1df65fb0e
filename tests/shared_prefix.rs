//! The shared prefix is exact: a decoder that runs the common prefix of each prompt's
//! completions once (`llama::SharedSplit`) gives the loss, the logits and every parameter
//! gradient of the K whole sequences, in f64 to a relative 1e-9 (issue 12, item 5), while
//! computing fewer token rows.

use rcx::backend::Backend;
use rcx::backend::cpu::{Cpu, Llama3RopeScaling};
use rcx::loss::{LossExtras, LossSpec, PromptType};
use rcx::models::{Batch, Family, HostModel, LlamaConfig, MicroBatch, Model};
use rcx::rng::Rng;

/// A small decoder of `family`: GQA (4 query heads over 2 key/value heads of 6 channels);
/// Llama with llama3 rope scaling and MLP biases, Qwen2 with its q/k/v biases and
/// pad_token_id equal to the EOS id (the trap where a trailing EOS counts as padding).
fn tiny(family: Family) -> LlamaConfig {
    let llama = family == Family::Llama;
    LlamaConfig {
        family,
        vocab_size: 31,
        hidden_size: 12,
        intermediate_size: 20,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 6,
        rms_norm_eps: 1e-6,
        rope_theta: 100.0,
        rope_scaling: llama.then_some(Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 16.0,
        }),
        qkv_bias: !llama,
        o_bias: false,
        mlp_bias: llama,
        max_position_embeddings: 64,
        pad_token_id: Some(if llama { 0 } else { 1 }),
        eos_token_id: vec![1],
        initializer_range: 0.02,
        attention_dropout: 0.0,
        sliding_window: None,
    }
}

/// Three prompts as the sequence convention lays them out (BOS 2, prompt, completion, EOS
/// 1), grouped by prompt: prompt 0 (K = 4) with completions of different lengths, one of
/// them empty; prompt 1 (K = 3) with one completion whose prompt was cut from its start
/// (BOS kept), so that its group shares only the BOS; prompt 2 (K = 2) whose completions
/// begin with the same two tokens, shared too.
fn batch(rng: &mut Rng, pad: u32) -> (Batch, Vec<usize>) {
    let mut token = || 3 + rng.below(28) as u32;
    let prompts: Vec<Vec<u32>> = [9, 6, 4]
        .iter()
        .map(|&len| (0..len).map(|_| token()).collect())
        .collect();
    let common: Vec<u32> = (0..2).map(|_| token()).collect();
    let mut seqs = Vec::new();
    let mut sequence = |prompt: &[u32], answer: Vec<u32>| {
        let mut ids = vec![2];
        ids.extend_from_slice(prompt);
        ids.extend(answer);
        ids.push(1);
        seqs.push(ids);
    };
    for len in [5, 0, 8, 2] {
        let answer = (0..len).map(|_| token()).collect();
        sequence(&prompts[0], answer);
    }
    for (cut, len) in [(0, 3), (2, 4), (0, 1)] {
        let answer = (0..len).map(|_| token()).collect();
        sequence(&prompts[1][cut..], answer);
    }
    for len in [3, 6] {
        let mut answer = common.clone();
        answer.extend((0..len).map(|_| token()));
        sequence(&prompts[2], answer);
    }
    let types: Vec<Vec<u8>> = seqs.iter().map(|s| vec![0; s.len()]).collect();
    let ks = vec![4, 3, 2];
    let batch = Batch::from_sequences(
        seqs.iter()
            .map(|s| &s[..])
            .zip(types.iter().map(|t| &t[..])),
        pad,
    )
    .grouped(ks.clone());
    (batch, ks)
}

/// Init plus noise on every parameter, so that no gradient vanishes by symmetry.
fn model(cfg: &LlamaConfig, rng: &mut Rng, shared: bool) -> Model<Cpu<f64>> {
    let mut host = HostModel::<f64>::init(cfg.clone(), 5);
    for p in host.params.iter_mut() {
        *p += 0.2 * rng.normal();
    }
    let mut model = host.on_cpu();
    model.set_shared_prefix(shared);
    model.start_training().unwrap();
    model
}

/// Loss, logits, gradient arena and token rows computed of one micro-batch.
fn step(
    model: &mut Model<Cpu<f64>>,
    batch: &Batch,
    ks: &[usize],
) -> (f64, Vec<f64>, Vec<f64>, usize) {
    let types = vec![
        Some(PromptType::Open),
        Some(PromptType::Closed),
        Some(PromptType::Open),
    ];
    let micro = MicroBatch {
        batch,
        ks,
        types: &types,
        dropout: None,
    };
    let spec = LossSpec::parse("adaptive2").unwrap();
    let loss = model
        .accumulate(&micro, &spec, 0.1, &LossExtras::default(), 1)
        .unwrap();
    let logits = model.outputs().unwrap().2;
    let grads = model.backend.download_grads().unwrap();
    (loss, logits, grads, model.last_rows().unwrap())
}

fn check_family(family: Family) {
    let cfg = tiny(family);
    let (batch, ks) = batch(&mut Rng::new(11), cfg.padding_id());
    let (mut whole, mut shared) = (
        model(&cfg, &mut Rng::new(3), false),
        model(&cfg, &mut Rng::new(3), true),
    );
    let (loss_w, logits_w, grads_w, rows_w) = step(&mut whole, &batch, &ks);
    let (loss_s, logits_s, grads_s, rows_s) = step(&mut shared, &batch, &ks);

    assert_eq!(rows_w, batch.b * batch.t);
    assert!(
        rows_s < rows_w,
        "{family:?}: the shared prefix computed {rows_s} rows of the whole {rows_w}"
    );
    let close = |a: f64, b: f64, scale: f64| (a - b).abs() <= 1e-9 * scale;
    assert!(
        loss_w.is_finite() && close(loss_s, loss_w, loss_w.abs()),
        "{family:?}: loss {loss_s} vs {loss_w}"
    );
    let logit_scale = logits_w.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for (i, (s, w)) in logits_s.iter().zip(&logits_w).enumerate() {
        assert!(
            close(*s, *w, logit_scale),
            "{family:?}: logit {i}: {s} vs {w}"
        );
    }
    for tensor in &whole.layout.tensors {
        let (s, w) = (&grads_s[tensor.range()], &grads_w[tensor.range()]);
        let scale = w.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(
            scale > 0.0 || tensor.name.contains("embed_tokens"),
            "{family:?}: {} has no gradient: the check would be empty",
            tensor.name
        );
        let worst = s
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f64, f64::max);
        assert!(
            worst <= 1e-9 * scale,
            "{family:?}: {}: gradients differ by {worst:e} (largest {scale:e})",
            tensor.name
        );
    }
}

#[test]
fn shared_prefix_equals_whole_sequences_llama() {
    check_family(Family::Llama);
}

#[test]
fn shared_prefix_equals_whole_sequences_qwen2_with_pad_as_eos() {
    check_family(Family::Qwen2);
}

/// A batch whose sequences are not grouped, or whose groups share nothing worth the
/// padding, runs whole.
#[test]
fn ungrouped_batches_run_whole() {
    let cfg = tiny(Family::Llama);
    let (grouped, ks) = batch(&mut Rng::new(11), cfg.padding_id());
    let mut ungrouped = grouped.clone();
    ungrouped.groups.clear();
    let mut m = model(&cfg, &mut Rng::new(3), true);
    let (_, _, _, rows) = step(&mut m, &ungrouped, &ks);
    assert_eq!(rows, ungrouped.b * ungrouped.t);
}
