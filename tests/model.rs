//! The whole reward model: the hand-written backward against central differences in f64,
//! and dropout's determinism.

use rcx::gradcheck::{tiny_random_model, tiny_ranked_batch};
use rcx::models::{Batch, Dropout};
use rcx::rng::Rng;

/// The whole model's backward against central differences, per parameter tensor, in eval
/// mode under x_inv and with both dropouts under the prompt-aware adaptive2
/// (`rcx::gradcheck::model_checks`).
#[test]
fn whole_model_gradient_matches_finite_differences() {
    let checks = rcx::gradcheck::model_checks(42).unwrap();
    assert_eq!(checks.len(), 2);
    for check in &checks {
        assert!(check.passed(), "{check}");
    }
}

#[test]
fn dropout_is_a_function_of_its_seed_and_off_in_eval() {
    let mut rng = Rng::new(5);
    let mut model = tiny_random_model(&mut rng);
    let batch = tiny_ranked_batch(&mut rng).batch;
    let eval_a = model.forward(&batch, None).unwrap();
    let eval_b = model.forward(&batch, None).unwrap();
    assert_eq!(eval_a, eval_b);
    let d = |seed| {
        Some(Dropout {
            hidden: 0.3,
            attention: 0.3,
            seed,
        })
    };
    let train_a = model.forward(&batch, d(1)).unwrap();
    let train_b = model.forward(&batch, d(1)).unwrap();
    let train_c = model.forward(&batch, d(2)).unwrap();
    assert_eq!(train_a, train_b, "same seed, same mask");
    assert_ne!(train_a, train_c, "another seed, another mask");
    assert_ne!(train_a, eval_a, "dropout must change the training forward");
}

/// Attention-probability dropout acts on its own; adding it left the hidden sites' masks
/// as they were: hidden dropout alone gives the logits the model gave before it existed.
#[test]
fn attention_dropout_is_its_own_site() {
    let mut rng = Rng::new(5);
    let mut model = tiny_random_model(&mut rng);
    let batch = tiny_ranked_batch(&mut rng).batch;
    let eval = model.forward(&batch, None).unwrap();
    let mut logits = |hidden, attention| {
        let dropout = Dropout {
            hidden,
            attention,
            seed: 1,
        };
        model.forward(&batch, Some(dropout)).unwrap()
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
    let mut model = tiny_random_model(&mut rng);
    let short: (Vec<u32>, Vec<u8>) = (vec![3, 4, 5, 6], vec![0, 0, 1, 1]);
    let long: (Vec<u32>, Vec<u8>) = (vec![7, 8, 9, 10, 11, 12, 13, 14, 15], vec![0; 9]);
    let alone = Batch::from_sequences([(&short.0[..], &short.1[..])], 0);
    let a = model.forward(&alone, None).unwrap()[0];
    let both = Batch::from_sequences(
        [(&short.0[..], &short.1[..]), (&long.0[..], &long.1[..])],
        0,
    );
    let b = model.forward(&both, None).unwrap()[0];
    assert!((a - b).abs() < 1e-12, "alone {a} vs padded {b}");
}

/// The model checks draw their model and batch so that every ranked pair's reward
/// difference is clear of the utilities' kink at 0 (where the extended forms switch to
/// their linear continuation): by at least the loss checks' margin, far more than a step of
/// the central differences moves it. In both modes the checks run (the dropout of
/// `model_checks`).
#[test]
fn model_check_inputs_keep_reward_differences_off_the_kink() {
    let dropout = Some(rcx::gradcheck::MODEL_CHECK_DROPOUT);
    for seed in 0..200 {
        for mode in [None, dropout] {
            let (mut model, data) = rcx::gradcheck::model_check_inputs(seed, mode).unwrap();
            let logits = model.forward(&data.batch, mode).unwrap();
            let gap = rcx::gradcheck::smallest_reward_gap(&logits, &data.ks);
            assert!(
                gap >= rcx::gradcheck::KINK_MARGIN,
                "seed {seed}, dropout {mode:?}: a pair's rewards differ by {gap:e}"
            );
        }
    }
}
