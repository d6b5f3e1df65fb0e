//! The whole reward model: the hand-written backward against central differences in f64.
//! (Dropout's determinism and padding are checked on the gradient checks' own model, by
//! the unit tests of src/gradcheck.rs, where its fixtures live.)

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

/// Scoring holds the forward's activations only; training makes room for the backward's
/// scratch, and a backward without `start_training` is refused rather than run out of room.
#[test]
fn an_evaluation_forward_holds_no_backward_scratch() {
    use rcx::models::{Batch, BertConfig, HostModel};
    let config = BertConfig::named("bert-tiny").unwrap();
    let batch = Batch::from_sequences([(&[101u32, 7592, 2088, 102][..], &[0u8; 4][..])], 0);
    let mut model = HostModel::<f32>::init(config, 1).on_cpu();
    let logits = model.forward(&batch, None).unwrap();
    let scoring_bytes = model.backend.activation_bytes();
    let refused = model.backward(None, &[1.0]).unwrap_err().to_string();
    assert!(refused.contains("start_training"), "{refused}");

    model.start_training().unwrap();
    assert_eq!(model.forward(&batch, None).unwrap(), logits);
    assert!(model.backend.activation_bytes() > scoring_bytes);
    model.backward(None, &[1.0]).unwrap();
    assert!(model.backend.grads().iter().any(|&g| g != 0.0));
}
