//! The evaluation statistics on hand-made scores: accuracy with ties apart, the reward
//! distribution by response index, the collapse gap and the distance to the theory.

use rcx::eval::summarize;
use rcx::loss::{LossSpec, PromptType};
use rcx::scoring::PromptScores;

fn prompt(ty: PromptType, best_first: &[f64]) -> PromptScores {
    PromptScores {
        prompt_type: Some(ty),
        rewards: best_first.to_vec(),
    }
}

#[test]
fn accuracy_counts_ties_apart_from_wrong_orders() {
    // Open: 3 pairs, one wrong (0.5 < 0.6). Closed: 3 pairs, one tie (0.9 vs 0.9004).
    let scores = [
        prompt(PromptType::Open, &[0.5, 0.6, 0.1]),
        prompt(PromptType::Closed, &[0.9004, 0.9, 0.0]),
    ];
    let r = summarize(&scores, None).unwrap();
    let open = r.for_type("open").unwrap();
    assert!((open.pairwise_accuracy - 2.0 / 3.0).abs() < 1e-12);
    assert!((open.wrong_rate - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(open.tie_rate, 0.0);
    let closed = r.for_type("closed").unwrap();
    assert!((closed.tie_rate - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(closed.wrong_rate, 0.0);
    assert!((r.pairwise_accuracy - 4.0 / 6.0).abs() < 1e-12);
    // K = 3: the halves are {best} and {2nd, 3rd}; of the two cross pairs one is the tie.
    assert_eq!(closed.cross_half_accuracy, 0.5);
}

#[test]
fn ranks_run_from_worst_and_hold_mean_std_and_percentiles() {
    let scores: Vec<PromptScores> = (0..11)
        .map(|i| prompt(PromptType::Open, &[1.0, i as f64 / 10.0]))
        .collect();
    let r = summarize(&scores, None).unwrap();
    let ranks = &r.for_type("open").unwrap().ranks;
    // Index 1 is the worst completion: rewards 0.0, 0.1, ..., 1.0.
    assert!((ranks[0].mean - 0.5).abs() < 1e-12);
    assert!((ranks[0].p10 - 0.1).abs() < 1e-12);
    assert!((ranks[0].p90 - 0.9).abs() < 1e-12);
    let std = (0..11)
        .map(|i| (i as f64 / 10.0 - 0.5).powi(2))
        .sum::<f64>()
        / 11.0;
    assert!((ranks[0].std - std.sqrt()).abs() < 1e-12);
    assert_eq!(ranks[1].mean, 1.0);
    assert_eq!(ranks[1].std, 0.0);
}

#[test]
fn collapse_gap_and_distance_to_the_prediction() {
    // Open prompts exactly at the x_inv optimum, closed ones exactly at the step of x:
    // distance 0 for both, and the gap is the mean |difference| of the two curves.
    let open_opt = rcx::theory::solve(&rcx::loss::Utility::XInv, 0.1, 4).unwrap();
    let closed_opt = rcx::theory::solve(&rcx::loss::Utility::X, 0.1, 4).unwrap();
    let best_first = |asc: &[f64]| asc.iter().rev().copied().collect::<Vec<f64>>();
    let scores = [
        prompt(PromptType::Open, &best_first(&open_opt)),
        prompt(PromptType::Closed, &best_first(&closed_opt)),
    ];
    let spec = LossSpec::parse("adaptive").unwrap();
    let r = summarize(&scores, Some((&spec, 0.1))).unwrap();
    for name in ["open", "closed"] {
        let p = r.for_type(name).unwrap().prediction.as_ref().unwrap();
        assert!(p.distance < 1e-12, "{name}: distance {}", p.distance);
    }
    let gap: f64 = open_opt
        .iter()
        .zip(&closed_opt)
        .map(|(a, b)| (a - b).abs())
        .sum::<f64>()
        / 4.0;
    assert!(gap > 0.05, "the two optima differ");
    assert!((r.collapse_gap.unwrap() - gap).abs() < 1e-12);

    // Under a single utility both types are compared with the same optimum.
    let single = LossSpec::parse("x").unwrap();
    let r = summarize(&scores, Some((&single, 0.1))).unwrap();
    let open = r.for_type("open").unwrap().prediction.as_ref().unwrap();
    assert_eq!(open.utility, "x");
    assert!(open.distance > 0.05, "open rewards are not the step of x");
}
