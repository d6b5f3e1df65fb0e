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
