//! The whole reward model: the hand-written backward against central differences in f64,
//! and dropout's determinism.

use rcx::loss::{LossSpec, PromptType, Utility, ranking_loss_forward_backward};
use rcx::model::{Batch, BertConfig, BertModel, Dropout, Workspace};
use rcx::rng::Rng;

fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: 23,
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 12,
        max_position_embeddings: 16,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        pad_token_id: 0,
    }
}

/// Two prompts (K = 3 and K = 2), sequences of different lengths, padded; token 0 only as
/// padding (its row gets no gradient, as nn.Embedding(padding_idx=0)).
fn tiny_batch(rng: &mut Rng) -> (Batch, Vec<usize>, Vec<Option<PromptType>>) {
    let lengths = [7, 5, 3, 6, 4];
    let seqs: Vec<(Vec<u32>, Vec<u8>)> = lengths
        .iter()
        .map(|&len| {
            let ids = (0..len).map(|_| 1 + rng.below(22) as u32).collect();
            let types = (0..len).map(|j| (j >= len / 2) as u8).collect();
            (ids, types)
        })
        .collect();
    let batch = Batch::from_sequences(seqs.iter().map(|(i, t)| (&i[..], &t[..])), 0);
    (
        batch,
        vec![3, 2],
        vec![Some(PromptType::Open), Some(PromptType::Closed)],
    )
}

/// Random non-trivial parameters: BERT's init plus noise on LayerNorm and biases, so that
/// no gradient vanishes by symmetry.
fn random_model(rng: &mut Rng) -> BertModel<f64> {
    let mut model = BertModel::<f64>::init(tiny_config(), 7);
    for (i, p) in model.params.iter_mut().enumerate() {
        if i >= tiny_config().hidden_size {
            *p += 0.3 * rng.normal();
        }
    }
    model
}

/// A batch with its ranking: K per prompt and each prompt's type.
struct Ranked {
    batch: Batch,
    ks: Vec<usize>,
    types: Vec<Option<PromptType>>,
}

fn loss_of(
    model: &BertModel<f64>,
    ws: &mut Workspace<f64>,
    data: &Ranked,
    spec: &LossSpec,
    dropout: Option<Dropout>,
    dlogits: &mut Vec<f64>,
) -> f64 {
    let logits = model.forward(ws, &data.batch, dropout).unwrap();
    dlogits.resize(logits.len(), 0.0);
    ranking_loss_forward_backward(logits, &data.ks, &data.types, spec, 0.1, dlogits).unwrap()
}

/// ||a - b|| / max(||a||, ||b||), per tensor: robust where single entries are ~0.
fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm_a: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let norm_b: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    diff / norm_a.max(norm_b).max(1e-300)
}

fn gradient_check(spec: LossSpec, dropout: Option<Dropout>) {
    let mut rng = Rng::new(42);
    let mut model = random_model(&mut rng);
    let (batch, ks, types) = tiny_batch(&mut rng);
    let data = Ranked { batch, ks, types };
    let mut ws = Workspace::new();
    let mut dlogits = Vec::new();
    loss_of(&model, &mut ws, &data, &spec, dropout, &mut dlogits);
    let mut grads = vec![0.0; model.num_params()];
    model.backward(&mut ws, &data.batch, dropout, &dlogits, &mut grads);

    let h = 1e-6;
    let mut scratch = Vec::new();
    for spec_t in model.layout.tensors.clone() {
        let mut numeric = Vec::with_capacity(spec_t.len());
        for idx in spec_t.range() {
            let saved = model.params[idx];
            model.params[idx] = saved + h;
            let up = loss_of(&model, &mut ws, &data, &spec, dropout, &mut scratch);
            model.params[idx] = saved - h;
            let down = loss_of(&model, &mut ws, &data, &spec, dropout, &mut scratch);
            model.params[idx] = saved;
            numeric.push((up - down) / (2.0 * h));
        }
        let analytic = &grads[spec_t.range()];
        let norm: f64 = analytic.iter().map(|g| g * g).sum::<f64>().sqrt();
        if spec_t.name.ends_with("attention.self.key.bias") {
            // A key bias adds the same q.b to every score of a query: softmax ignores it, so
            // its true gradient is zero: analytic up to rounding, numeric up to the
            // difference quotient's noise (loss rounding / h, about 1e-8).
            let max_abs = |g: &[f64]| g.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            assert!(
                max_abs(analytic) < 1e-12,
                "{}: analytic gradient should vanish",
                spec_t.name
            );
            assert!(
                max_abs(&numeric) < 1e-7,
                "{}: numeric gradient should vanish",
                spec_t.name
            );
            continue;
        }
        let err = relative_error(analytic, &numeric);
        let is_pad_row_table = spec_t.name.ends_with("word_embeddings.weight");
        assert!(
            norm > 0.0 || is_pad_row_table,
            "{}: the gradient is exactly zero, the check would prove nothing",
            spec_t.name
        );
        assert!(
            err < 1e-6,
            "{}: relative error {err:e} (|grad| {norm:e})",
            spec_t.name
        );
    }
}

#[test]
fn whole_model_gradient_matches_finite_differences_in_eval_mode() {
    gradient_check(LossSpec::Single(Utility::XInv), None);
}

#[test]
fn whole_model_gradient_matches_finite_differences_with_dropout_and_adaptive_loss() {
    let spec = LossSpec::parse("adaptive2").unwrap();
    // Both dropouts on, with different rates: hidden and attention probabilities.
    let dropout = Dropout {
        hidden: 0.2,
        attention: 0.3,
        seed: 99,
    };
    gradient_check(spec, Some(dropout));
}

#[test]
fn dropout_is_a_function_of_its_seed_and_off_in_eval() {
    let mut rng = Rng::new(5);
    let model = random_model(&mut rng);
    let (batch, _, _) = tiny_batch(&mut rng);
    let mut ws = Workspace::new();
    let eval_a = model.forward(&mut ws, &batch, None).unwrap().to_vec();
    let eval_b = model.forward(&mut ws, &batch, None).unwrap().to_vec();
    assert_eq!(eval_a, eval_b);
    let d = |seed| {
        Some(Dropout {
            hidden: 0.3,
            attention: 0.3,
            seed,
        })
    };
    let train_a = model.forward(&mut ws, &batch, d(1)).unwrap().to_vec();
    let train_b = model.forward(&mut ws, &batch, d(1)).unwrap().to_vec();
    let train_c = model.forward(&mut ws, &batch, d(2)).unwrap().to_vec();
    assert_eq!(train_a, train_b, "same seed, same mask");
    assert_ne!(train_a, train_c, "another seed, another mask");
    assert_ne!(train_a, eval_a, "dropout must change the training forward");
}

/// Attention-probability dropout acts on its own; adding it left the hidden sites' masks
/// as they were: hidden dropout alone gives the logits the model gave before it existed.
#[test]
fn attention_dropout_is_its_own_site() {
    let mut rng = Rng::new(5);
    let model = random_model(&mut rng);
    let (batch, _, _) = tiny_batch(&mut rng);
    let mut ws = Workspace::new();
    let eval = model.forward(&mut ws, &batch, None).unwrap().to_vec();
    let mut logits = |hidden, attention| {
        let dropout = Dropout {
            hidden,
            attention,
            seed: 1,
        };
        model
            .forward(&mut ws, &batch, Some(dropout))
            .unwrap()
            .to_vec()
    };
    let hidden_only = logits(0.3, 0.0);
    assert_ne!(hidden_only, eval, "hidden dropout alone changed nothing");
    let both = logits(0.3, 0.3);
    assert_ne!(both, hidden_only, "attention dropout changed nothing");
    let attention_only = logits(0.0, 0.3);
    assert_ne!(
        attention_only, eval,
        "attention dropout alone changed nothing"
    );
    assert_eq!(
        logits(0.0, 0.0),
        eval,
        "p = 0 everywhere must be evaluation"
    );
}

#[test]
fn padding_does_not_change_a_sequence_logit() {
    // The same sequence alone and in a batch with a longer one: its logit must not move.
    let mut rng = Rng::new(11);
    let model = random_model(&mut rng);
    let short: (Vec<u32>, Vec<u8>) = (vec![3, 4, 5, 6], vec![0, 0, 1, 1]);
    let long: (Vec<u32>, Vec<u8>) = (vec![7, 8, 9, 10, 11, 12, 13, 14, 15], vec![0; 9]);
    let mut ws = Workspace::new();
    let alone = Batch::from_sequences([(&short.0[..], &short.1[..])], 0);
    let a = model.forward(&mut ws, &alone, None).unwrap()[0];
    let both = Batch::from_sequences(
        [(&short.0[..], &short.1[..]), (&long.0[..], &long.1[..])],
        0,
    );
    let b = model.forward(&mut ws, &both, None).unwrap()[0];
    assert!((a - b).abs() < 1e-12, "alone {a} vs padded {b}");
}
