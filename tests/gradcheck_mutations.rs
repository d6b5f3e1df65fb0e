//! The loss and whole-model gradient checks have teeth: given a deliberately wrong backward
//! (a wrong slope, a missing term), each reports a failure, and given the right one it
//! passes. The wrong backwards live here, as closures handed to the checkers
//! (`judge_loss_gradient`, `judge_model_gradient`); the product has none.

use rcx::backend::cpu::Cpu;
use rcx::gradcheck::{
    LOSS_EPS, MODEL_CHECK_DROPOUT, UTILITIES, judge_loss_gradient, judge_model_gradient,
    loss_check_logits, pair_across_the_kink,
};
use rcx::loss::{LossSpec, PromptType, Utility, ranking_loss_forward_backward, sigmoid};
use rcx::models::{Dropout, Model};
use rcx::rng::Rng;

/// What a hand-written ranking-loss backward gets wrong.
#[derive(Clone, Copy, Debug)]
enum LossBug {
    /// None: the backward as it should be.
    Correct,
    /// U' off by this factor where the pair is rightly ordered (x > 0).
    SlopeOnRightOrder(f64),
    /// U' off by this factor on the linear continuation (x <= 0).
    SlopeOnWrongOrder(f64),
    /// The chain rule through the sigmoid (r (1 - r)) left out.
    NoSigmoidFactor,
    /// Only the better completion of each pair gets its term.
    OneSidedPairs,
    /// The mean over pairs taken per prompt instead of over the batch.
    PerPromptMean,
}

/// d loss / d logit of the batch ranking loss, written out pair by pair with `bug` in it.
fn loss_backward(
    logits: &[f64],
    ks: &[usize],
    types: &[Option<PromptType>],
    spec: &LossSpec,
    bug: LossBug,
    dlogits: &mut [f64],
) {
    let rewards: Vec<f64> = logits.iter().map(|&s| sigmoid(s)).collect();
    let pairs: usize = ks.iter().map(|k| k * (k - 1) / 2).sum();
    let mut drewards = vec![0.0; logits.len()];
    let mut start = 0;
    for (&k, &ty) in ks.iter().zip(types) {
        let utility = spec.utility_for(ty).unwrap();
        let scale = match bug {
            LossBug::PerPromptMean => 1.0 / (k * (k - 1) / 2) as f64,
            _ => 1.0 / pairs as f64,
        };
        for i in start..start + k {
            for j in i + 1..start + k {
                let x = rewards[i] - rewards[j];
                let (_, mut slope) = utility.value_and_slope(x, LOSS_EPS);
                match bug {
                    LossBug::SlopeOnRightOrder(f) if x > 0.0 => slope *= f,
                    LossBug::SlopeOnWrongOrder(f) if x <= 0.0 => slope *= f,
                    _ => {}
                }
                drewards[i] -= slope * scale;
                if !matches!(bug, LossBug::OneSidedPairs) {
                    drewards[j] += slope * scale;
                }
            }
        }
        start += k;
    }
    for ((d, &r), &dr) in dlogits.iter_mut().zip(&rewards).zip(&drewards) {
        *d = match bug {
            LossBug::NoSigmoidFactor => dr,
            _ => dr * r * (1.0 - r),
        };
    }
}

/// Every utility alone and one prompt-aware spec, with the prompt types each needs.
fn specs() -> Vec<(String, LossSpec, Vec<Option<PromptType>>)> {
    let (open, closed) = (Some(PromptType::Open), Some(PromptType::Closed));
    let mut out: Vec<_> = UTILITIES
        .iter()
        .map(|name| {
            let spec = LossSpec::Single(Utility::parse(name).unwrap());
            (name.to_string(), spec, vec![None, closed, None, open])
        })
        .collect();
    out.push((
        "adaptive".into(),
        LossSpec::parse("adaptive").unwrap(),
        vec![open, closed, open, closed],
    ));
    out
}

#[test]
fn loss_check_fails_every_wrong_slope_and_missing_term_and_passes_the_right_backward() {
    let ks = [2, 3, 8, 3];
    let bugs = [
        LossBug::SlopeOnRightOrder(1.01),
        LossBug::SlopeOnWrongOrder(1.01),
        LossBug::NoSigmoidFactor,
        LossBug::OneSidedPairs,
        LossBug::PerPromptMean,
    ];
    let mut rng = Rng::new(3);
    for (name, spec, types) in specs() {
        let logits = loss_check_logits(&mut rng, &ks);
        let judge = |bug: LossBug| {
            judge_loss_gradient(
                &format!("{name} {bug:?}"),
                &logits,
                |l| {
                    let mut scratch = vec![0.0; l.len()];
                    ranking_loss_forward_backward(l, &ks, &types, &spec, LOSS_EPS, &mut scratch)
                },
                |l, d| {
                    loss_backward(l, &ks, &types, &spec, bug, d);
                    Ok(())
                },
            )
            .unwrap()
        };
        // The hand-written backward is right when no bug is in it: the failures below are
        // the bugs', not the rewriting's.
        let control = judge(LossBug::Correct);
        assert!(control.passed(), "{control}");
        for bug in bugs {
            let check = judge(bug);
            assert!(!check.passed(), "a wrong backward passed: {check}");
            // Not a borderline miss: even a slope 1% off on the branch whose slopes are the
            // smallest (x_inv2's continuation, 1 against up to 2000) is 10x the tolerance.
            assert!(check.worst > 10.0 * check.tolerance, "{check}");
        }
    }
}

/// What a hand-written model backward gets wrong.
#[derive(Clone, Copy, Debug)]
enum ModelBug {
    Correct,
    /// A wrong slope in one layer: this tensor's gradient 0.1% off.
    TensorSlope(&'static str),
    /// A wrong slope at the head: the loss's dlogits 0.1% off.
    DlogitsSlope,
    /// A missing term: this tensor gets no gradient.
    TensorLeftOut(&'static str),
    /// A missing term: the backward forgets the forward's dropout masks.
    DropoutLeftOut,
}

/// The range of a named parameter tensor in the model's arena.
fn tensor_range(model: &Model<Cpu<f64>>, suffix: &str) -> std::ops::Range<usize> {
    model
        .layout
        .tensors
        .iter()
        .find(|t| t.name.ends_with(suffix))
        .unwrap_or_else(|| panic!("no tensor {suffix}"))
        .range()
}

/// The model's backward with `bug` in it: the gradient arena it leaves.
fn model_backward(
    bug: ModelBug,
    model: &mut Model<Cpu<f64>>,
    dropout: Option<Dropout>,
    dlogits: &[f64],
) -> rcx::error::Result<Vec<f64>> {
    match bug {
        ModelBug::DlogitsSlope => {
            let scaled: Vec<f64> = dlogits.iter().map(|x| x * 1.001).collect();
            model.backward(dropout, &scaled)?;
        }
        ModelBug::DropoutLeftOut => model.backward(None, dlogits)?,
        _ => model.backward(dropout, dlogits)?,
    }
    let mut grads = model.backend.grads().to_vec();
    match bug {
        ModelBug::TensorSlope(name) => {
            for g in &mut grads[tensor_range(model, name)] {
                *g *= 1.001;
            }
        }
        ModelBug::TensorLeftOut(name) => grads[tensor_range(model, name)].fill(0.0),
        _ => {}
    }
    Ok(grads)
}

#[test]
fn model_check_fails_a_wrong_slope_or_a_missing_term_and_passes_the_right_backward() {
    let spec = LossSpec::parse("adaptive2").unwrap();
    let seed = 42;
    let judge = |bug: ModelBug, dropout: Option<Dropout>| {
        judge_model_gradient(
            &format!("{bug:?}"),
            &spec,
            dropout,
            seed,
            |model, dropout, dlogits| model_backward(bug, model, dropout, dlogits),
        )
        .unwrap()
    };
    let dropout = Some(MODEL_CHECK_DROPOUT);
    for mode in [None, dropout] {
        let control = judge(ModelBug::Correct, mode);
        assert!(control.passed(), "{control}");
    }
    let layernorm = "layer.1.output.LayerNorm.weight";
    let positions = "position_embeddings.weight";
    for (bug, mode, blamed) in [
        (ModelBug::TensorSlope(layernorm), None, Some(layernorm)),
        (ModelBug::DlogitsSlope, dropout, None),
        (ModelBug::TensorLeftOut(positions), None, Some(positions)),
        (ModelBug::DropoutLeftOut, dropout, None),
    ] {
        let check = judge(bug, mode);
        assert!(!check.passed(), "a wrong backward passed: {check}");
        // The worst error is where the bug is.
        if let Some(tensor) = blamed {
            assert!(check.worst_at.ends_with(tensor), "{check}");
        }
    }
}

/// The model check's guard against the kink fires when a reward difference changes sign.
#[test]
fn a_pair_moved_across_the_kink_is_reported() {
    let ks = [2, 3];
    let base = [0.5, -0.5, 1.0, 0.0, -1.0];
    assert_eq!(pair_across_the_kink(&base, &base, &ks), None);
    let mut moved = base;
    moved[3] = 1.0 + 1e-9; // completion 1 of prompt 1 now above completion 0
    assert_eq!(pair_across_the_kink(&base, &moved, &ks), Some((1, 0, 1)));
}
