//! The theory solver: the paper's n = 8 optima, KKT optimality, the Gauss-Lobatto
//! identity for log, the closed-form limits and the `rcx theory` command.

use rcx::loss::Utility;
use rcx::theory::{
    Limit, beta_density, kkt_residual, ks_distance, limit_cdf, regularized_incomplete_beta, solve,
};
use std::process::Command;

fn utility(name: &str) -> Utility {
    Utility::parse(name).expect("a valid utility name")
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "{what}: reward {i} is {g}, want {w} (+-{tol})"
        );
    }
}

/// sum_{i<j} U(r_j - r_i) for ascending rewards, the objective itself.
fn objective(u: &Utility, eps: f64, r: &[f64]) -> f64 {
    let mut total = 0.0;
    for i in 0..r.len() {
        for j in i + 1..r.len() {
            total += u.value_and_slope(r[j] - r[i], eps).0;
        }
    }
    total
}

#[test]
fn paper_optima_for_eight_completions() {
    // Notes section 6: the dashed lines of the paper's figure (pure forms).
    let log = solve(&utility("log"), 0.0, 8).unwrap();
    assert_close(
        &log,
        &[0.0, 0.064, 0.204, 0.395, 0.605, 0.796, 0.936, 1.0],
        1e-3,
        "log",
    );
    let x_inv = solve(&utility("x_inv"), 0.0, 8).unwrap();
    assert_close(
        &x_inv,
        &[0.0, 0.121, 0.267, 0.421, 0.579, 0.733, 0.879, 1.0],
        1e-3,
        "x_inv",
    );
    let x = solve(&utility("x"), 0.0, 8).unwrap();
    assert_eq!(x, vec![0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
}

#[test]
fn steps_for_linear_and_convex_utilities() {
    assert_eq!(
        solve(&utility("x"), 0.1, 5).unwrap(),
        vec![0.0, 0.0, 0.5, 1.0, 1.0]
    );
    assert_eq!(
        solve(&utility("x2"), 0.1, 6).unwrap(),
        vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    );
    assert_eq!(
        solve(&utility("power:2"), 0.0, 5).unwrap(),
        vec![0.0, 0.0, 0.0, 1.0, 1.0]
    );
    // The step satisfies the KKT conditions too.
    assert!(kkt_residual(&utility("x2"), 0.1, &solve(&utility("x2"), 0.1, 6).unwrap()) < 1e-12);
}

#[test]
fn optima_satisfy_kkt_and_symmetry() {
    let cases = [
        ("log", 0.0, 8),
        ("log", 0.1, 8),
        ("log", 0.1, 150),
        ("x_inv", 0.0, 31),
        ("x_inv", 0.1, 120),
        ("x_inv2", 0.1, 40),
        ("x_inv2", 0.0, 9),
        ("logsigmoid", 0.1, 100),
        ("power:0.5", 0.0, 77),
        ("power:0.5", 0.1, 100),
        ("neg_power:0.5", 0.0, 100),
        ("neg_power:1.5", 0.1, 10),
        ("log", 0.0, 2),
        ("log", 0.0, 3),
    ];
    for (name, eps, n) in cases {
        let u = utility(name);
        let r = solve(&u, eps, n).unwrap();
        let what = format!("{name} eps={eps} n={n}");
        assert_eq!(r.len(), n, "{what}");
        assert_eq!((r[0], r[n - 1]), (0.0, 1.0), "{what}: ends");
        assert!(r.windows(2).all(|w| w[0] <= w[1]), "{what}: ascending");
        for i in 0..n {
            assert!(
                (r[i] + r[n - 1 - i] - 1.0).abs() < 1e-12,
                "{what}: symmetry"
            );
        }
        let residual = kkt_residual(&u, eps, &r);
        assert!(residual < 1e-7, "{what}: KKT residual {residual}");
    }
}

#[test]
fn kkt_residual_rejects_a_perturbed_optimum() {
    let u = utility("x_inv");
    let mut r = solve(&u, 0.0, 8).unwrap();
    r[3] += 1e-3;
    assert!(kkt_residual(&u, 0.0, &r) > 1e-4);
}

#[test]
fn no_feasible_perturbation_improves_the_objective() {
    // Independent of the KKT code: nudge single rewards (staying ordered in [0, 1]).
    for (name, eps) in [("log", 0.1), ("x_inv", 0.0), ("logsigmoid", 0.1)] {
        let u = utility(name);
        let r = solve(&u, eps, 10).unwrap();
        let best = objective(&u, eps, &r);
        for i in 0..10 {
            for step in [-1e-4, 1e-4, -1e-2, 1e-2] {
                let mut p = r.clone();
                p[i] = (p[i] + step).clamp(0.0, 1.0);
                let lo = if i == 0 { 0.0 } else { p[i - 1] };
                let hi = if i == 9 { 1.0 } else { p[i + 1] };
                p[i] = p[i].clamp(lo, hi);
                assert!(
                    objective(&u, eps, &p) <= best + 1e-9,
                    "{name}: reward {i} {step}"
                );
            }
        }
    }
}

/// Gauss-Lobatto nodes on [-1, 1]: +-1 and the roots of P'_{n-1}, by Newton's method on
/// (1 - x^2) P'_{n-1}(x) from Chebyshev-Lobatto guesses.
fn lobatto_nodes(n: usize) -> Vec<f64> {
    let k = n - 1;
    let legendre = |x: f64| -> (f64, f64) {
        // P_k(x) and P'_k(x) by the three-term recurrence.
        let (mut p0, mut p1) = (1.0, x);
        for j in 2..=k {
            let p2 = ((2 * j - 1) as f64 * x * p1 - (j - 1) as f64 * p0) / j as f64;
            p0 = p1;
            p1 = p2;
        }
        let dp = k as f64 * (x * p1 - p0) / (x * x - 1.0);
        (p1, dp)
    };
    let mut nodes = vec![-1.0];
    for i in 1..k {
        let mut x = -(std::f64::consts::PI * i as f64 / k as f64).cos();
        for _ in 0..100 {
            // q = (1 - x^2) P'_k = k (P_{k-1} - x P_k); q' = -k (k + 1) P_k.
            let (p, dp) = legendre(x);
            let q = (1.0 - x * x) * dp;
            let dq = -((k * (k + 1)) as f64) * p;
            x -= q / dq;
        }
        nodes.push(x);
    }
    nodes.push(1.0);
    nodes
}

#[test]
fn log_optimum_is_gauss_lobatto() {
    for n in [5, 12, 25] {
        let want: Vec<f64> = lobatto_nodes(n).iter().map(|x| (x + 1.0) / 2.0).collect();
        let got = solve(&utility("log"), 0.0, n).unwrap();
        assert_close(&got, &want, 1e-8, &format!("log n={n}"));
    }
}

#[test]
fn extended_forms_differ_from_pure_ones() {
    let pure = solve(&utility("log"), 0.0, 8).unwrap();
    let extended = solve(&utility("log"), 0.1, 8).unwrap();
    assert!(
        pure.iter()
            .zip(&extended)
            .any(|(a, b)| (a - b).abs() > 1e-2)
    );
    // The shift makes ties affordable at the ends (U'(0+) = 10 is finite).
    assert_eq!(extended[1], 0.0);
}

#[test]
fn incomplete_beta_matches_closed_forms() {
    for x in [0.0f64, 0.01, 0.2, 0.5, 0.77, 0.999, 1.0] {
        let arcsine = 2.0 / std::f64::consts::PI * x.sqrt().asin();
        assert!((regularized_incomplete_beta(x, 0.5, 0.5) - arcsine).abs() < 1e-12);
        assert!((regularized_incomplete_beta(x, 1.0, 1.0) - x).abs() < 1e-12);
        assert!(
            (regularized_incomplete_beta(x, 2.0, 2.0) - (3.0 * x * x - 2.0 * x.powi(3))).abs()
                < 1e-12
        );
        assert!((regularized_incomplete_beta(x, 0.3, 1.0) - x.powf(0.3)).abs() < 1e-12);
    }
    // The density integrates to 1 (midpoint rule away from the integrable ends).
    let steps = 200_000;
    let integral: f64 = (0..steps)
        .map(|i| beta_density((i as f64 + 0.5) / steps as f64, 1.5, 1.5) / steps as f64)
        .sum();
    assert!((integral - 1.0).abs() < 1e-6, "{integral}");
    assert!((beta_density(0.5, 0.5, 0.5) - 2.0 / std::f64::consts::PI).abs() < 1e-12);
}

#[test]
fn limits_by_utility() {
    assert_eq!(Limit::of(&utility("log")), Some(Limit::Beta(0.5, 0.5)));
    assert_eq!(Limit::of(&utility("x_inv")), Some(Limit::Beta(1.0, 1.0)));
    assert_eq!(
        Limit::of(&utility("power:0.5")),
        Some(Limit::Beta(0.25, 0.25))
    );
    assert_eq!(
        Limit::of(&utility("neg_power:0.5")),
        Some(Limit::Beta(0.75, 0.75))
    );
    assert_eq!(Limit::of(&utility("logsigmoid")), None);
    assert_eq!(Limit::of(&utility("x_inv2")), None);
    assert_eq!(limit_cdf(&utility("x"), 0.3), Some(0.5));
    assert_eq!(limit_cdf(&utility("x"), 1.0), Some(1.0));
    assert_eq!(limit_cdf(&utility("x"), -0.1), Some(0.0));
    assert_eq!(
        ks_distance(&solve(&utility("x"), 0.0, 10).unwrap(), &utility("x")),
        Some(0.0)
    );
    assert_eq!(ks_distance(&[0.0, 1.0], &utility("logsigmoid")), None);
    // KS of a known sample against the uniform law: max of i/n - x_(i) and x_(i) - (i-1)/n.
    let ks = ks_distance(&[0.1, 0.2, 0.9], &utility("x_inv")).unwrap();
    assert!((ks - (2.0 / 3.0 - 0.2)).abs() < 1e-12, "{ks}");
}

#[test]
fn ks_distance_shrinks_with_n() {
    for name in ["log", "x_inv", "power:0.5", "neg_power:0.5"] {
        let u = utility(name);
        let ks: Vec<f64> = [20, 100, 1000]
            .iter()
            .map(|&n| ks_distance(&solve(&u, 0.0, n).unwrap(), &u).unwrap())
            .collect();
        assert!(ks[0] > ks[1] && ks[1] > ks[2], "{name}: {ks:?}");
        assert!(ks[2] < 0.02, "{name}: KS at n = 1000 is {}", ks[2]);
    }
}

#[test]
fn rejects_bad_arguments() {
    assert!(solve(&utility("log"), 0.0, 1).is_err());
    assert!(solve(&utility("log"), -0.1, 8).is_err());
    assert!(solve(&utility("log"), f64::NAN, 8).is_err());
}

fn rcx(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rcx"))
        .args(args)
        .output()
        .expect("run rcx")
}

#[test]
fn cli_table_and_json() {
    let out = rcx(&[
        "theory",
        "--utility",
        "x_inv",
        "--eps",
        "0",
        "--n",
        "8",
        "--json",
    ]);
    assert!(out.status.success());
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["utility"], "x_inv");
    assert_eq!(line["n"], 8);
    assert_eq!(line["eps"], 0.0);
    let rewards: Vec<f64> = serde_json::from_value(line["rewards"].clone()).unwrap();
    assert!((rewards[1] - 0.121).abs() < 1e-3);

    let out = rcx(&["theory", "--utility", "log", "--n", "4"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(rows[0], "index\treward");
    assert_eq!(rows.len(), 5);
    assert!(rows[4].starts_with("4\t1.000000"));
}

#[test]
fn cli_limit_and_svg() {
    let dir = std::env::temp_dir().join(format!("rcx-theory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("log.svg");
    let out = rcx(&[
        "theory",
        "--utility",
        "log",
        "--eps",
        "0",
        "--n",
        "50",
        "--limit",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("KS distance"), "{text}");
    let figure = std::fs::read_to_string(&svg).unwrap();
    assert!(figure.contains("class=\"bar\"") && figure.contains("class=\"line\""));
    assert!(!figure.contains("NaN"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cli_user_errors_exit_2() {
    for args in [
        &["theory", "--utility", "log", "--n", "1"][..],
        &["theory", "--utility", "nope", "--n", "8"],
        &["theory", "--utility", "log", "--eps", "-0.5", "--n", "8"],
        &[
            "theory",
            "--utility",
            "logsigmoid",
            "--eps",
            "0",
            "--n",
            "8",
            "--limit",
        ],
        &["theory", "--utility", "log", "--n", "8", "--limit"],
    ] {
        let out = rcx(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
}
