//! The batch ranking loss: gradients against central finite differences for every utility
//! and prompt-aware spec, hand-computed values, the linear continuation of the notes' table,
//! the per-prompt choice of utility, and f32 against f64.

use rcx::error::Error;
use rcx::loss::{
    LossSpec, PromptType, Utility, pair_count, pairwise_accuracy, ranking_loss_forward_backward,
    ranking_loss_of_rewards, sigmoid,
};

const EPS: f64 = 0.1;

fn logit(r: f64) -> f64 {
    (r / (1.0 - r)).ln()
}

/// Logits for prompts of sizes `ks`, no pair of a prompt near the kink at x = 0.
fn random_logits(ks: &[usize], seed: u64) -> Vec<f64> {
    rcx::gradcheck::spaced_logits(&mut rcx::rng::Rng::new(seed), ks)
}

fn loss_f64(
    logits: &[f64],
    ks: &[usize],
    types: &[Option<PromptType>],
    spec: &LossSpec,
) -> (f64, Vec<f64>) {
    let mut dlogits = vec![f64::NAN; logits.len()];
    let loss = ranking_loss_forward_backward(logits, ks, types, spec, EPS, &mut dlogits).unwrap();
    (loss, dlogits)
}

const KS: [usize; 4] = [2, 3, 8, 3];
const TYPES: [Option<PromptType>; 4] = [
    Some(PromptType::Open),
    Some(PromptType::Closed),
    Some(PromptType::Open),
    Some(PromptType::Closed),
];

fn all_utilities() -> Vec<Utility> {
    rcx::gradcheck::UTILITIES
        .iter()
        .map(|n| Utility::parse(n).unwrap())
        .collect()
}

/// Every utility (untyped prompts under a single utility) and the prompt-aware specs,
/// through `rcx::gradcheck`, on both branches of every utility.
#[test]
fn gradient_matches_finite_differences_for_every_utility_and_prompt_aware_spec() {
    for seed in [11, 12] {
        let checks = rcx::gradcheck::loss_checks(seed).unwrap();
        // Each utility alone and with every loss option, the 3 prompt-aware specs, the 3
        // loss options alone.
        assert_eq!(checks.len(), 2 * all_utilities().len() + 6);
        for check in &checks {
            assert_eq!(check.entries, KS.iter().sum::<usize>(), "{check}");
            assert!(check.passed(), "seed {seed}: {check}");
        }
    }
}

fn two_rewards(spec: &str, better: f64, worse: f64) -> (f64, Vec<f64>) {
    let logits = [logit(better), logit(worse)];
    loss_f64(&logits, &[2], &[None], &LossSpec::parse(spec).unwrap())
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

#[test]
fn values_match_hand_computation() {
    // x_inv, rewards 0.9 and 0.1: x = 0.8, loss = 1/(0.8+0.1) - 1/0.1.
    let (loss, dlogits) = two_rewards("x_inv", 0.9, 0.1);
    assert!(close(loss, 1.0 / 0.9 - 10.0, 1e-12), "{loss}");
    // d loss / d r_better = -1/(x+eps)^2; d r / d s = r(1-r) = 0.09 for both.
    assert!(close(dlogits[0], -0.09 / 0.81, 1e-12), "{dlogits:?}");
    assert!(close(dlogits[1], 0.09 / 0.81, 1e-12), "{dlogits:?}");

    assert!(close(two_rewards("x", 0.9, 0.1).0, -0.8, 1e-12));
    assert!(close(two_rewards("log", 0.9, 0.1).0, -(9.0f64).ln(), 1e-12));
    assert!(close(two_rewards("x2", 0.9, 0.1).0, -(0.81 - 0.01), 1e-12));
    assert!(close(
        two_rewards("x_inv2", 0.9, 0.1).0,
        1.0 / 0.81 - 100.0,
        1e-12
    ));
    let logsigmoid = two_rewards("logsigmoid", 0.9, 0.1).0;
    assert!(close(logsigmoid, (1.0 + (-3.2f64).exp()).ln(), 1e-12));

    // Three completions, x_inv: the mean of the three pair losses.
    let rewards = [0.8, 0.5, 0.2];
    let logits: Vec<f64> = rewards.iter().map(|&r| logit(r)).collect();
    let (loss, _) = loss_f64(&logits, &[3], &[None], &LossSpec::parse("x_inv").unwrap());
    let pair = |x: f64| 1.0 / (x + 0.1) - 10.0;
    assert!(close(
        loss,
        (pair(0.3) + pair(0.6) + pair(0.3)) / 3.0,
        1e-12
    ));
}

#[test]
fn wrongly_ordered_pairs_follow_the_linear_continuation() {
    // Notes' table for x <= 0: log -10x, x_inv -100x, x2 -x, x_inv2 -x, x -x.
    let (better, worse) = (0.3, 0.6);
    let x = better - worse;
    let dr_ds = better * (1.0 - better);
    for (name, slope) in [
        ("log", 10.0),
        ("x_inv", 100.0),
        ("x2", 1.0),
        ("x_inv2", 1.0),
        ("x", 1.0),
    ] {
        let (loss, dlogits) = two_rewards(name, better, worse);
        assert!(close(loss, -slope * x, 1e-12), "{name}: loss {loss}");
        assert!(
            close(dlogits[0], -slope * dr_ds, 1e-12),
            "{name}: {dlogits:?}"
        );
        let (u, du) = Utility::parse(name).unwrap().value_and_slope(-0.5, EPS);
        assert!(
            close(u, -0.5 * slope, 1e-12) && close(du, slope, 1e-12),
            "{name}"
        );
    }
}

#[test]
fn prompt_aware_loss_picks_the_utility_per_prompt() {
    let adaptive = LossSpec::parse("adaptive").unwrap();
    let open_only = LossSpec::Single(Utility::XInv);
    let closed_only = LossSpec::Single(Utility::X);
    let ks = [3, 8];
    let logits = random_logits(&ks, 7);
    let (open_logits, closed_logits) = logits.split_at(3);

    let (open_loss, open_grad) = loss_f64(open_logits, &[3], &[None], &open_only);
    let (closed_loss, closed_grad) = loss_f64(closed_logits, &[8], &[None], &closed_only);
    let (open_pairs, closed_pairs) = (3.0, 28.0);
    let total = open_pairs + closed_pairs;
    let expected = (open_pairs * open_loss + closed_pairs * closed_loss) / total;

    // Both orders of the two prompts: the authors' once-per-batch choice would use the
    // last prompt's utility for both and fail one of them.
    for swap in [false, true] {
        let (batch_logits, batch_ks, batch_types) = if swap {
            (
                [closed_logits, open_logits].concat(),
                [8, 3],
                [Some(PromptType::Closed), Some(PromptType::Open)],
            )
        } else {
            (
                logits.clone(),
                [3, 8],
                [Some(PromptType::Open), Some(PromptType::Closed)],
            )
        };
        let (loss, grad) = loss_f64(&batch_logits, &batch_ks, &batch_types, &adaptive);
        assert!(
            close(loss, expected, 1e-12),
            "swap {swap}: {loss} vs {expected}"
        );
        let (open_part, closed_part) = if swap {
            (&grad[8..], &grad[..8])
        } else {
            (&grad[..3], &grad[3..])
        };
        for (g, g1) in open_part.iter().zip(&open_grad) {
            assert!(close(*g, g1 * open_pairs / total, 1e-12));
        }
        for (g, g1) in closed_part.iter().zip(&closed_grad) {
            assert!(close(*g, g1 * closed_pairs / total, 1e-12));
        }
    }

    // Same check on rewards directly, through the analysis entry point.
    let rewards: Vec<f64> = logits.iter().map(|&s| sigmoid(s)).collect();
    let by_rewards = ranking_loss_of_rewards(
        &rewards,
        &ks,
        &[Some(PromptType::Open), Some(PromptType::Closed)],
        &adaptive,
        EPS,
    )
    .unwrap();
    assert!(close(by_rewards, expected, 1e-12));
}

#[test]
fn untyped_prompt_under_prompt_aware_loss_is_a_user_error() {
    let logits = random_logits(&[2, 3], 3);
    let mut dlogits = vec![0.0; 5];
    let err = ranking_loss_forward_backward(
        &logits,
        &[2, 3],
        &[Some(PromptType::Open), None],
        &LossSpec::parse("adaptive2").unwrap(),
        EPS,
        &mut dlogits,
    )
    .unwrap_err();
    assert!(matches!(err, Error::User(_)), "{err:?}");
    assert!(err.to_string().contains("prompt 1"), "{err}");
}

#[test]
fn malformed_batches_are_rejected() {
    let spec = LossSpec::parse("x").unwrap();
    let mut d = vec![0.0f64; 4];
    let logits = [0.1, 0.2, 0.3, 0.4];
    // Sizes not adding up, a prompt with one completion, types of the wrong length.
    assert!(
        ranking_loss_forward_backward(&logits, &[2, 3], &[None, None], &spec, EPS, &mut d).is_err()
    );
    assert!(
        ranking_loss_forward_backward(&logits, &[1, 3], &[None, None], &spec, EPS, &mut d).is_err()
    );
    assert!(ranking_loss_forward_backward(&logits, &[2, 2], &[None], &spec, EPS, &mut d).is_err());
    assert!(ranking_loss_forward_backward(&logits, &[4], &[None], &spec, 0.0, &mut d).is_err());
    let mut short = vec![0.0f64; 3];
    assert!(ranking_loss_forward_backward(&logits, &[4], &[None], &spec, EPS, &mut short).is_err());
}

#[test]
fn gradient_is_overwritten_not_accumulated() {
    let spec = LossSpec::parse("log").unwrap();
    let logits = random_logits(&[8], 5);
    let (_, fresh) = loss_f64(&logits, &[8], &[None], &spec);
    let mut dirty = vec![123.0; 8];
    ranking_loss_forward_backward(&logits, &[8], &[None], &spec, EPS, &mut dirty).unwrap();
    assert_eq!(fresh, dirty);
}

#[test]
fn f32_agrees_with_f64() {
    for (n, spec) in all_utilities()
        .into_iter()
        .map(LossSpec::Single)
        .chain(["adaptive", "adaptive2"].map(|s| LossSpec::parse(s).unwrap()))
        .enumerate()
    {
        let logits = random_logits(&KS, 31 + n as u64);
        let (loss64, grad64) = loss_f64(&logits, &KS, &TYPES, &spec);
        let logits32: Vec<f32> = logits.iter().map(|&s| s as f32).collect();
        let mut grad32 = vec![0.0f32; logits.len()];
        let loss32 =
            ranking_loss_forward_backward(&logits32, &KS, &TYPES, &spec, EPS, &mut grad32).unwrap();
        assert!(
            close(loss32 as f64, loss64, 1e-5),
            "{spec:?}: {loss32} vs {loss64}"
        );
        let scale = grad64.iter().fold(0.0f64, |m, g| m.max(g.abs()));
        for (g32, g64) in grad32.iter().zip(&grad64) {
            assert!(
                (*g32 as f64 - g64).abs() <= 1e-5 * scale,
                "{spec:?}: {g32} vs {g64}"
            );
        }
    }
}

#[test]
fn sigmoid_is_stable_at_the_extremes() {
    assert_eq!(sigmoid(0.0), 0.5);
    assert_eq!(sigmoid(800.0), 1.0);
    assert!(sigmoid(-800.0) >= 0.0 && sigmoid(-800.0) < 1e-300);
    assert!(close(
        sigmoid(-30.0),
        (-30.0f64).exp() / (1.0 + (-30.0f64).exp()),
        1e-14
    ));
    assert!(close(sigmoid(2.0) + sigmoid(-2.0), 1.0, 1e-15));
}

#[test]
fn pairwise_accuracy_counts_correct_ties_and_total() {
    // Prompt 1 (K=3): 0.9 > 0.5 right, 0.9 vs 0.5005 right, 0.5 vs 0.5005 tie.
    // Prompt 2 (K=2): 0.2 below 0.7, wrong.
    let rewards = [0.9, 0.5, 0.5005, 0.2, 0.7];
    assert_eq!(pairwise_accuracy(&rewards, &[3, 2]), (2, 1, 4));
    assert_eq!(pair_count(&[2, 3, 8]), 1 + 3 + 28);
}
