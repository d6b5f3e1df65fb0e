//! The theory of reward collapse (notes section 7): the optimal rewards of
//!   maximise sum_{i<j} U(r_j - r_i) over 0 <= r_1 <= ... <= r_n <= 1
//! (rewards ascending: worst completion first), their closed-form limits as n grows, and
//! the `rcx theory` command that prints and plots them.

use crate::error::{Error, Result};
use crate::loss::Utility;
use crate::plot::{Figure, Histogram, Line, Panel};

/// The largest n the solver accepts: it keeps O(n^2) pair tables in memory.
pub const MAX_N: usize = 2000;

/// How U curves on x >= 0 (the only differences an ordered reward vector produces); it
/// decides how the optimum is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// U = x: the objective is linear in the rewards.
    Linear,
    /// x^2, x^g with g > 1: a convex objective, maximised at a vertex (a step).
    Convex,
    /// Everything else: a strictly concave objective with a unique, symmetric optimum.
    StrictlyConcave,
}

fn shape(utility: &Utility) -> Shape {
    match *utility {
        Utility::X => Shape::Linear,
        Utility::Power(1.0) => Shape::Linear,
        Utility::X2 => Shape::Convex,
        Utility::Power(g) if g > 1.0 => Shape::Convex,
        _ => Shape::StrictlyConcave,
    }
}

/// Whether two rewards may tie at the optimum, i.e. U'(0+) is finite. The pure forms
/// (eps = 0) of log, x_inv, x_inv2, x^g and -x^-g have U'(0+) = inf, so their optimum is
/// strictly increasing and the solver keeps every gap positive.
fn ties_allowed(utility: &Utility, eps: f64) -> bool {
    eps > 0.0 || matches!(utility, Utility::LogSigmoid)
}

/// U(x) for a difference x >= 0 of ordered rewards: the right limit at x = 0 (the
/// extended forms switch to their x <= 0 branch at 0), -inf for a tie where U'(0+) = inf.
fn pair_value(utility: &Utility, x: f64, eps: f64, ties: bool) -> f64 {
    if x > 0.0 {
        utility.value_and_slope(x, eps).0
    } else if ties {
        utility.value_and_slope(f64::MIN_POSITIVE, eps).0
    } else {
        f64::NEG_INFINITY
    }
}

/// U'(x) for x >= 0, the right derivative at 0.
fn pair_slope(utility: &Utility, x: f64, eps: f64) -> f64 {
    utility.value_and_slope(x.max(f64::MIN_POSITIVE), eps).1
}

/// U''(x) for x >= 0 by differences of the analytic slope. The step is relative to the
/// scale on which U' varies (x + eps for the shifted forms), so it stays accurate for the
/// tiny gaps of the pure forms; near 0 a one-sided formula keeps off the x <= 0 branch.
/// Only Newton's Hessian uses it: its error slows convergence, it does not move the optimum.
fn pair_curvature(utility: &Utility, x: f64, eps: f64) -> f64 {
    let scale = match utility {
        Utility::LogSigmoid => x + 0.25,
        _ => x + eps,
    };
    let h = 1e-4 * scale;
    if x - h > 0.0 {
        (pair_slope(utility, x + h, eps) - pair_slope(utility, x - h, eps)) / (2.0 * h)
    } else {
        (-3.0 * pair_slope(utility, x, eps) + 4.0 * pair_slope(utility, x + h, eps)
            - pair_slope(utility, x + 2.0 * h, eps))
            / (2.0 * h)
    }
}

fn check_arguments(utility: &Utility, eps: f64, n: usize) -> Result<()> {
    if n < 2 {
        return Err(Error::user(format!(
            "--n: the number of completions must be at least 2, got {n}"
        )));
    }
    if n > MAX_N {
        return Err(Error::user(format!(
            "--n: at most {MAX_N} completions are supported, got {n}"
        )));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::user(format!(
            "--eps: the shift must be a finite number >= 0, got {eps}"
        )));
    }
    if let Utility::Power(g) | Utility::NegPower(g) = *utility
        && !(g.is_finite() && g > 0.0)
    {
        return Err(Error::user(format!(
            "utility `{}`: the exponent must be a positive number",
            utility.name()
        )));
    }
    Ok(())
}

/// The optimal rewards for n ranked completions, ascending (worst completion first), to
/// about 1e-9. eps = 0 selects the pure forms of the theory, eps > 0 the extended forms
/// used in training.
///
/// U = x: every step with half the rewards at 0 and half at 1 is optimal; for odd n the
/// middle reward can be anywhere in [0, 1] and is returned as 0.5. Convex U (x2, x^g with
/// g > 1): the optimum is the same step; for odd n the middle reward must be 0 or 1 (both
/// optimal) and is returned as 0. Strictly concave U: the unique optimum.
pub fn solve(utility: &Utility, eps: f64, n: usize) -> Result<Vec<f64>> {
    check_arguments(utility, eps, n)?;
    let half = n / 2;
    match shape(utility) {
        Shape::Linear | Shape::Convex => {
            let middle = if shape(utility) == Shape::Linear {
                0.5
            } else {
                0.0
            };
            Ok((0..n)
                .map(|i| {
                    if i < half {
                        0.0
                    } else if i >= n - half {
                        1.0
                    } else {
                        middle
                    }
                })
                .collect())
        }
        Shape::StrictlyConcave => solve_concave(utility, eps, n),
    }
}

/// Below this n the concave solver starts from uniform gaps; above, from the optimum for
/// about n/2 completions resampled (continuation in n): its shape, ties included, is
/// nearly right, so few Newton steps remain.
const CONTINUATION_FROM: usize = 64;

/// The optimum for `coarse.len()` completions as a start for n: its rewards, read as a
/// quantile function on [0, 1], interpolated linearly at i/(n-1).
fn resample(coarse: &[f64], n: usize) -> Vec<f64> {
    let last = (coarse.len() - 1) as f64;
    (0..n)
        .map(|i| {
            let position = i as f64 / (n - 1) as f64 * last;
            let below = (position.floor() as usize).min(coarse.len() - 2);
            let fraction = position - below as f64;
            coarse[below] + fraction * (coarse[below + 1] - coarse[below])
        })
        .collect()
}

/// The pair tables of one point: for every pair i < j (row-major in an n x n table, lower
/// triangle unused) U(x_ij), U'(x_ij) and U''(x_ij) of the difference x_ij = r_j - r_i.
struct PairTables {
    n: usize,
    value: Vec<f64>, // [n, n]
    slope: Vec<f64>, // [n, n]
    curv: Vec<f64>,  // [n, n]
}

impl PairTables {
    fn new(n: usize) -> Self {
        PairTables {
            n,
            value: vec![0.0; n * n],
            slope: vec![0.0; n * n],
            curv: vec![0.0; n * n],
        }
    }

    /// Fills the tables from the gaps d (length n-1). Differences are summed from the gaps
    /// rather than subtracted from rewards, so tiny gaps keep their relative precision.
    fn fill(&mut self, utility: &Utility, eps: f64, ties: bool, gaps: &[f64]) {
        let n = self.n;
        for i in 0..n {
            let mut x = 0.0;
            for j in i + 1..n {
                x += gaps[j - 1];
                let at = i * n + j;
                self.value[at] = pair_value(utility, x, eps, ties);
                self.slope[at] = pair_slope(utility, x, eps);
                self.curv[at] = pair_curvature(utility, x, eps);
            }
        }
    }
}

/// dF/dd_k = sum over pairs i <= k < j of U'(x_ij), for a table of slopes [n, n].
fn gap_gradient(n: usize, slope: &[f64]) -> Vec<f64> {
    // Moving from gap k-1 to gap k drops the pairs ending at reward k and adds those
    // starting at reward k.
    let mut grad = vec![0.0; n - 1]; // [n-1]
    let mut running = 0.0;
    for k in 0..n - 1 {
        for i in 0..k {
            running -= slope[i * n + k];
        }
        for j in k + 1..n {
            running += slope[k * n + j];
        }
        grad[k] = running;
    }
    grad
}

/// d2F/dd_k dd_l = sum over pairs i <= min(k,l), j > max(k,l) of U''(x_ij): rectangle sums
/// of the curvature table [n, n], returned as [n-1, n-1].
fn gap_hessian(n: usize, curv: &[f64]) -> Vec<f64> {
    let m = n - 1;
    // suffix[i][l] = sum_{j > l} curv[i][j] for l >= i, as [n, n].
    let mut suffix = vec![0.0; n * n];
    for i in 0..n {
        let mut acc = 0.0;
        for l in (i..n - 1).rev() {
            acc += curv[i * n + l + 1];
            suffix[i * n + l] = acc;
        }
    }
    let mut hess = vec![0.0; m * m]; // [m, m]
    for l in 0..m {
        let mut acc = 0.0;
        for k in 0..=l {
            acc += suffix[k * n + l];
            hess[k * m + l] = acc;
            hess[l * m + k] = acc;
        }
    }
    hess
}

/// In-place Cholesky factorisation of a symmetric positive definite [d, d] matrix (lower
/// triangle). Returns false if it is not positive definite.
fn cholesky(a: &mut [f64], d: usize) -> bool {
    for j in 0..d {
        let mut diag = a[j * d + j];
        for p in 0..j {
            diag -= a[j * d + p] * a[j * d + p];
        }
        if diag.is_nan() || diag <= 0.0 {
            return false;
        }
        let diag = diag.sqrt();
        a[j * d + j] = diag;
        for i in j + 1..d {
            let mut v = a[i * d + j];
            for p in 0..j {
                v -= a[i * d + p] * a[j * d + p];
            }
            a[i * d + j] = v / diag;
        }
    }
    true
}

/// Solves L L^T x = b with the factor from `cholesky`.
fn cholesky_solve(l: &[f64], d: usize, b: &[f64]) -> Vec<f64> {
    let mut y = b.to_vec();
    for i in 0..d {
        for p in 0..i {
            y[i] -= l[i * d + p] * y[p];
        }
        y[i] /= l[i * d + i];
    }
    for i in (0..d).rev() {
        for p in i + 1..d {
            y[i] -= l[p * d + i] * y[p];
        }
        y[i] /= l[i * d + i];
    }
    y
}

/// The strictly concave case. The optimum has r_1 = 0, r_n = 1 and is symmetric
/// (r_i + r_{n+1-i} = 1), so it is parametrised by the gaps d_k = r_{k+1} - r_k >= 0
/// (sum 1) with d_k = d_{m+1-k}: h = ceil(m/2) gaps e, each standing for c_k = 2 mirrored
/// gaps (1 for the middle gap of odd m). The middle e_b, the widest gap at the optimum, is
/// eliminated by sum c_k e_k = 1, leaving only the bounds e_k >= 0: a projected Newton
/// method (Bertsekas 1982) for those. Gaps at (or within eps_k of) 0 whose gradient pushes
/// them down are held by a diagonal step, Newton moves the rest, and the step is projected
/// onto the bounds, so many ties can form in one iteration. Where U'(0+) = inf no tie can
/// be optimal: no gap is held and the line search keeps every gap positive.
fn solve_concave(utility: &Utility, eps: f64, n: usize) -> Result<Vec<f64>> {
    let ties = ties_allowed(utility, eps);
    let m = n - 1;
    let h = m.div_ceil(2);
    let b = h - 1; // the eliminated middle gap
    let weight: Vec<f64> = (0..h)
        .map(|k| if m - 1 - k == k { 1.0 } else { 2.0 })
        .collect(); // [h]
    let mirror_pairs: Vec<[usize; 2]> = (0..h).map(|k| [k, m - 1 - k]).collect();
    let images = |k: usize| -> &[usize] {
        if m - 1 - k == k {
            &mirror_pairs[k][..1]
        } else {
            &mirror_pairs[k][..]
        }
    };
    let unfold = |e: &[f64]| -> Vec<f64> { (0..m).map(|k| e[k.min(m - 1 - k)]).collect() };
    // The eliminated gap from the others.
    let complete = |e: &mut [f64]| {
        let rest: f64 = (0..b).map(|k| weight[k] * e[k]).sum();
        e[b] = (1.0 - rest) / weight[b];
    };

    let mut e = if n > CONTINUATION_FROM {
        let start = resample(&solve_concave(utility, eps, n.div_ceil(2))?, n);
        let mut e: Vec<f64> = (0..h).map(|k| start[k + 1] - start[k]).collect(); // [h]
        complete(&mut e);
        e
    } else {
        vec![1.0 / m as f64; h] // [h] uniform gaps
    };
    let mut tables = PairTables::new(n);
    let mut previous_move = f64::INFINITY;
    let dot = |a: &[f64], c: &[f64]| a.iter().zip(c).map(|(x, y)| x * y).sum::<f64>();

    const MAX_ITERATIONS: usize = 500;
    for _ in 0..MAX_ITERATIONS {
        tables.fill(utility, eps, ties, &unfold(&e));
        let grad = gap_gradient(n, &tables.slope); // [m]
        let hess = gap_hessian(n, &tables.curv); // [m, m]
        // Fold onto the symmetric gaps: G = P^T g [h], He = P^T H P [h, h].
        let fold_grad: Vec<f64> = (0..h)
            .map(|k| images(k).iter().map(|&a| grad[a]).sum())
            .collect();
        let mut fold_hess = vec![0.0; h * h];
        for k in 0..h {
            for l in 0..h {
                let mut acc = 0.0;
                for &p in images(k) {
                    for &q in images(l) {
                        acc += hess[p * m + q];
                    }
                }
                fold_hess[k * h + l] = acc;
            }
        }
        // Eliminate e_b = (1 - sum_{k<b} c_k e_k) / c_b: reduced gradient [b] and Hessian [b, b].
        let ratio = |k: usize| weight[k] / weight[b];
        let red_grad: Vec<f64> = (0..b)
            .map(|k| fold_grad[k] - ratio(k) * fold_grad[b])
            .collect();
        let red_hess = |k: usize, l: usize| {
            fold_hess[k * h + l] - ratio(l) * fold_hess[k * h + b] - ratio(k) * fold_hess[b * h + l]
                + ratio(k) * ratio(l) * fold_hess[b * h + b]
        };
        let diag_step: Vec<f64> = (0..b).map(|k| 1.0 / -red_hess(k, k)).collect(); // [b]

        // Held gaps: at the bound (within eps_k) with the gradient pushing them down.
        let mut held = vec![false; b];
        if ties {
            let distance = (0..b)
                .map(|k| (e[k] - (e[k] + diag_step[k] * red_grad[k]).max(0.0)).abs())
                .fold(0.0, f64::max);
            let threshold = distance.min(1.0 / m as f64);
            for k in 0..b {
                held[k] = e[k] <= threshold && red_grad[k] < 0.0;
            }
        }
        let free: Vec<usize> = (0..b).filter(|&k| !held[k]).collect();
        let f = free.len();
        let mut mat = vec![0.0; f * f]; // [f, f] minus the reduced Hessian on the free gaps
        for (p, &k) in free.iter().enumerate() {
            for (q, &l) in free.iter().enumerate() {
                mat[p * f + q] = -red_hess(k, l);
            }
        }
        if !cholesky(&mut mat, f) {
            return Err(Error::internal(format!(
                "theory: the Hessian of `{}` is not negative definite (n = {n}, eps = {eps})",
                utility.name()
            )));
        }
        let g_free: Vec<f64> = free.iter().map(|&k| red_grad[k]).collect();
        let newton = cholesky_solve(&mat, f, &g_free); // [f]
        let mut delta = vec![0.0; b]; // [b]
        for (p, &k) in free.iter().enumerate() {
            delta[k] = newton[p];
        }
        for k in (0..b).filter(|&k| held[k]) {
            delta[k] = diag_step[k] * red_grad[k];
        }
        let newton_gain = dot(&g_free, &newton);
        // How far a full step moves the gaps; held gaps only move as far as the bound.
        let full_step: Vec<f64> = (0..b).map(|k| (e[k] + delta[k]).max(0.0) - e[k]).collect();
        let step_b: f64 = -(0..b).map(|k| ratio(k) * full_step[k]).sum::<f64>();
        let reward_move =
            (0..b).map(|k| weight[k] * full_step[k].abs()).sum::<f64>() + weight[b] * step_b.abs();
        // Newton's steps shrink quadratically until rounding in the gradient (sums of ~n^2/2
        // slopes) stalls them, near 1e-10 at n = 1000: stop at 1e-13 or at a stall below 1e-8.
        let stalled = reward_move < 1e-8 && reward_move > 0.25 * previous_move;
        previous_move = reward_move;
        if reward_move < 1e-13 || stalled {
            let total: f64 = dot(&e, &weight);
            let gaps: Vec<f64> = unfold(&e).iter().map(|d| d / total).collect();
            return Ok(rewards_from_gaps(&gaps));
        }

        // Armijo search along the projected arc e(t) = max(0, e + t delta).
        let mut t = 1.0;
        let accepted = loop {
            let mut candidate = e.clone();
            for k in 0..b {
                candidate[k] = (e[k] + t * delta[k]).max(0.0);
            }
            complete(&mut candidate);
            let feasible =
                candidate[b] > 0.0 && (ties || (0..b).all(|k| e[k] + t * delta[k] > 0.0));
            if feasible {
                let gaps = unfold(&candidate);
                let mut change = 0.0;
                for i in 0..n {
                    let mut x = 0.0;
                    for j in i + 1..n {
                        x += gaps[j - 1];
                        change += pair_value(utility, x, eps, ties) - tables.value[i * n + j];
                    }
                }
                let held_gain: f64 = (0..b)
                    .filter(|&k| held[k])
                    .map(|k| red_grad[k] * (candidate[k] - e[k]))
                    .sum();
                let expected = t * newton_gain + held_gain;
                // Close to the optimum the change is below rounding; a finite one is accepted.
                if change >= 1e-4 * expected || (reward_move * t < 1e-12 && change.is_finite()) {
                    break Some(candidate);
                }
            }
            t *= 0.5;
            if t < 1e-20 {
                break None;
            }
        };
        match accepted {
            Some(candidate) => e = candidate,
            None => {
                return Err(Error::internal(format!(
                    "theory: the line search failed for `{}` (n = {n}, eps = {eps})",
                    utility.name()
                )));
            }
        }
    }
    Err(Error::internal(format!(
        "theory: no convergence for `{}` after {MAX_ITERATIONS} Newton steps (n = {n}, eps = {eps})",
        utility.name()
    )))
}

/// Rewards r_1 = 0, r_{k+1} = r_k + d_k for the lower half, and the upper half mirrored
/// (r_{n+1-i} = 1 - r_i) so that the symmetry and r_n = 1 hold exactly.
fn rewards_from_gaps(gaps: &[f64]) -> Vec<f64> {
    let n = gaps.len() + 1;
    let mut rewards = vec![0.5; n]; // [n] the middle one of odd n stays at 1/2
    let mut r = 0.0;
    for i in 0..n / 2 {
        rewards[i] = r;
        rewards[n - 1 - i] = 1.0 - r;
        r += gaps[i];
    }
    rewards
}

/// How far ascending rewards are from the KKT conditions of the problem, relative to the
/// multiplier lambda of the constraint sum of gaps = 1: with g_k = dF/dd_k, every open gap
/// must have g_k = lambda, every tied one g_k <= lambda, and lambda > 0 (a wider span
/// helps, so r_1 = 0 and r_n = 1). Returns the largest violation; infinity if the rewards
/// are not ordered in [0, 1] with r_1 = 0 and r_n = 1.
pub fn kkt_residual(utility: &Utility, eps: f64, rewards: &[f64]) -> f64 {
    let n = rewards.len();
    let ordered = rewards.windows(2).all(|w| w[0] <= w[1]);
    if n < 2 || !ordered || rewards[0] != 0.0 || rewards[n - 1] != 1.0 {
        return f64::INFINITY;
    }
    let mut slope = vec![0.0; n * n]; // [n, n]
    for i in 0..n {
        for j in i + 1..n {
            slope[i * n + j] = pair_slope(utility, rewards[j] - rewards[i], eps);
        }
    }
    let grad = gap_gradient(n, &slope);
    let open: Vec<f64> = (0..n - 1)
        .filter(|&k| rewards[k + 1] > rewards[k])
        .map(|k| grad[k])
        .collect();
    let lambda = open.iter().sum::<f64>() / open.len() as f64;
    if lambda.is_nan() || lambda <= 0.0 {
        return f64::INFINITY;
    }
    let mut worst: f64 = 0.0;
    for k in 0..n - 1 {
        let violation = if rewards[k + 1] > rewards[k] {
            (grad[k] - lambda).abs()
        } else {
            grad[k] - lambda
        };
        worst = worst.max(violation / lambda);
    }
    worst
}

/// The closed-form limit (n -> inf) of the empirical distribution of the optimal rewards.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Limit {
    /// Mass 1/2 at 0 and 1/2 at 1 (linear and convex U).
    TwoPoint,
    /// Beta(a, b) on [0, 1].
    Beta(f64, f64),
}

impl Limit {
    /// The limit of the pure form of `utility` (notes section 7), if one is known: x (and
    /// the convex x2, x^g with g >= 1, whose optimum is the same step) -> two point masses;
    /// x^g, 0 < g < 1 -> Beta((1-g)/2, (1-g)/2); log -> Beta(1/2, 1/2); -x^-g, 0 < g <= 1
    /// -> Beta((1+g)/2, (1+g)/2), with x_inv (g = 1) the uniform law.
    pub fn of(utility: &Utility) -> Option<Limit> {
        match *utility {
            Utility::X | Utility::X2 => Some(Limit::TwoPoint),
            Utility::Power(g) if g >= 1.0 => Some(Limit::TwoPoint),
            Utility::Power(g) if g > 0.0 => Some(Limit::Beta((1.0 - g) / 2.0, (1.0 - g) / 2.0)),
            Utility::Log => Some(Limit::Beta(0.5, 0.5)),
            Utility::XInv => Some(Limit::Beta(1.0, 1.0)),
            Utility::NegPower(g) if g > 0.0 && g <= 1.0 => {
                Some(Limit::Beta((1.0 + g) / 2.0, (1.0 + g) / 2.0))
            }
            _ => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Limit::TwoPoint => "mass 1/2 at 0 and 1/2 at 1".into(),
            Limit::Beta(a, b) => format!("Beta({a}, {b})"),
        }
    }

    /// P(X <= x).
    pub fn cdf(&self, x: f64) -> f64 {
        match *self {
            Limit::TwoPoint if x < 0.0 => 0.0,
            Limit::TwoPoint if x < 1.0 => 0.5,
            Limit::TwoPoint => 1.0,
            Limit::Beta(a, b) => regularized_incomplete_beta(x, a, b),
        }
    }

    /// P(X < x), which differs from the cdf only at the atoms.
    pub fn cdf_left(&self, x: f64) -> f64 {
        match *self {
            Limit::TwoPoint if x <= 0.0 => 0.0,
            Limit::TwoPoint if x <= 1.0 => 0.5,
            Limit::TwoPoint => 1.0,
            Limit::Beta(..) => self.cdf(x),
        }
    }

    /// The density on (0, 1); `None` for the two point masses, which have none.
    pub fn density(&self, x: f64) -> Option<f64> {
        match *self {
            Limit::TwoPoint => None,
            Limit::Beta(a, b) => Some(beta_density(x, a, b)),
        }
    }
}

/// The cdf at x of the limit of the pure form of `utility`, if a closed form is known.
pub fn limit_cdf(utility: &Utility, x: f64) -> Option<f64> {
    Limit::of(utility).map(|limit| limit.cdf(x))
}

/// ln B(a, b) = ln Gamma(a) + ln Gamma(b) - ln Gamma(a + b).
fn ln_beta(a: f64, b: f64) -> f64 {
    libm::lgamma(a) + libm::lgamma(b) - libm::lgamma(a + b)
}

/// The Beta(a, b) density x^(a-1) (1-x)^(b-1) / B(a, b); 0 outside [0, 1].
pub fn beta_density(x: f64, a: f64, b: f64) -> f64 {
    if !(0.0..=1.0).contains(&x) {
        return 0.0;
    }
    ((a - 1.0) * x.ln() + (b - 1.0) * (1.0 - x).ln() - ln_beta(a, b)).exp()
}

/// I_x(a, b), the Beta(a, b) cdf at x. The continued fraction
///   I_x(a, b) = x^a (1-x)^b / (a B(a, b)) / (1 + c_1/(1 + c_2/(1 + ...))),
///   c_{2m+1} = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1)),  c_{2m} = m(b-m) x / ((a+2m-1)(a+2m)),
/// converges fast for x < (a+1)/(a+b+2); above that I_x(a, b) = 1 - I_{1-x}(b, a) is used.
pub fn regularized_incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a);
    }
    let prefactor = (a * x.ln() + b * (1.0 - x).ln() - ln_beta(a, b)).exp() / a;
    prefactor / continued_fraction(x, a, b)
}

/// 1 + c_1/(1 + c_2/(1 + ...)) by the modified Lentz method: the convergents are built as
/// a running product f = prod C_k / D_k, with tiny values standing in for zeros.
fn continued_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let guard = |v: f64| if v.abs() < TINY { TINY } else { v };
    let mut f = 1.0;
    let mut c = 1.0; // C_k = b_k + a_k / C_{k-1}
    let mut d = 0.0; // D_k = 1 / (b_k + a_k D_{k-1})
    for step in 1..=10_000 {
        let m = (step / 2) as f64;
        let coefficient = if step % 2 == 1 {
            -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0))
        } else {
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m))
        };
        d = 1.0 / guard(1.0 + coefficient * d);
        c = guard(1.0 + coefficient / c);
        let factor = c * d;
        f *= factor;
        if (factor - 1.0).abs() < 1e-15 {
            break;
        }
    }
    f
}

/// The Kolmogorov-Smirnov distance sup_x |F_n(x) - F(x)| between the empirical
/// distribution of `rewards` and the limit of the pure form of `utility`; `None` if no
/// limit is known. Both cdfs are right-continuous and F_n is constant between rewards, so
/// the supremum is found at the rewards and the limit's atoms, from the left and the right.
pub fn ks_distance(rewards: &[f64], utility: &Utility) -> Option<f64> {
    let limit = Limit::of(utility)?;
    let mut sorted = rewards.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    let mut points = sorted.clone();
    if limit == Limit::TwoPoint {
        points.extend([0.0, 1.0]);
    }
    let mut distance: f64 = 0.0;
    for &x in &points {
        let below = sorted.partition_point(|&r| r < x) as f64 / n; // F_n(x-)
        let at_or_below = sorted.partition_point(|&r| r <= x) as f64 / n; // F_n(x)
        distance = distance
            .max((at_or_below - limit.cdf(x)).abs())
            .max((below - limit.cdf_left(x)).abs());
    }
    Some(distance)
}

/// `rcx theory`: the optimal rewards of n ranked completions under one utility.
#[derive(clap::Args, Debug)]
pub struct TheoryArgs {
    /// Utility: x, x2, log, x_inv, x_inv2, logsigmoid, power:G, neg_power:G.
    #[arg(long)]
    pub utility: String,
    /// Shift of the extended forms (0.1 in training); 0 selects the pure forms.
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    pub eps: f64,
    /// Number of ranked completions.
    #[arg(long)]
    pub n: usize,
    /// Print one JSON line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Compare with the closed-form limit as n -> inf (pure forms, --eps 0): KS distance.
    #[arg(long)]
    pub limit: bool,
    /// Write an SVG figure: histogram and cdf of the optimal rewards (with --limit, also
    /// the limit's density and cdf).
    #[arg(long)]
    pub svg: Option<std::path::PathBuf>,
}

pub fn cmd_theory(args: TheoryArgs) -> Result<()> {
    let utility =
        Utility::parse(&args.utility).map_err(|e| Error::user(format!("--utility: {e}")))?;
    check_arguments(&utility, args.eps, args.n)?;
    let limit = if args.limit {
        let limit = Limit::of(&utility).ok_or_else(|| {
            Error::user(format!(
                "--limit: no closed-form limit is known for `{}`; known for x, x2, log, \
                 x_inv, power:G, neg_power:G with 0 < G <= 1",
                utility.name()
            ))
        })?;
        if args.eps != 0.0 && shape(&utility) == Shape::StrictlyConcave {
            return Err(Error::user(format!(
                "--limit: the closed-form limits are those of the pure forms; pass --eps 0 \
                 (got --eps {})",
                args.eps
            )));
        }
        Some(limit)
    } else {
        None
    };

    let rewards = solve(&utility, args.eps, args.n)?;
    let ks = limit.and_then(|_| ks_distance(&rewards, &utility));

    if args.json {
        let mut line = serde_json::json!({
            "utility": utility.name(),
            "eps": args.eps,
            "n": args.n,
            "rewards": rewards,
        });
        if let (Some(limit), Some(ks)) = (limit, ks) {
            line["limit"] =
                serde_json::json!({"distribution": limit.describe(), "ks_distance": ks});
        }
        println!("{line}");
    } else {
        println!(
            "# optimum of sum_(i<j) U(r_j - r_i), U = {}, eps = {}, n = {} (ascending)",
            utility.name(),
            args.eps,
            args.n
        );
        println!("index\treward");
        for (i, r) in rewards.iter().enumerate() {
            println!("{}\t{r:.6}", i + 1);
        }
        if let (Some(limit), Some(ks)) = (limit, ks) {
            println!("# limit: {}; KS distance: {ks:.6}", limit.describe());
        }
    }

    if let Some(path) = &args.svg {
        theory_figure(&utility, args.eps, &rewards, limit).write(path)?;
    }
    Ok(())
}

/// Two panels: the density (histogram of the optimal rewards, the limit's density) and
/// the cdf (empirical, the limit's).
fn theory_figure(utility: &Utility, eps: f64, rewards: &[f64], limit: Option<Limit>) -> Figure {
    let n = rewards.len();
    let bins = ((n as f64).sqrt().round() as usize).clamp(4, 40);
    let histogram = Histogram::of_values(rewards, bins, (0.0, 1.0), true).label("optimum");
    let mut density = Panel::new("density")
        .x_label("reward")
        .y_label("density")
        .x_range(0.0, 1.0)
        .histogram(histogram.clone());
    // The empirical cdf as a staircase.
    let mut xs = vec![0.0];
    let mut ys = vec![0.0];
    for (i, &r) in rewards.iter().enumerate() {
        xs.extend([r, r]);
        ys.extend([i as f64 / n as f64, (i + 1) as f64 / n as f64]);
    }
    xs.push(1.0);
    ys.push(1.0);
    let mut cdf = Panel::new("cdf")
        .x_label("reward")
        .y_label("P(reward <= x)")
        .x_range(0.0, 1.0)
        .y_range(0.0, 1.0)
        .line(Line::new(xs, ys).label("optimum"));

    let mut y_top = histogram.heights.iter().cloned().fold(0.0, f64::max);
    if let Some(limit) = limit {
        let grid: Vec<f64> = (0..=400).map(|i| i as f64 / 400.0).collect();
        let limit_cdf: Vec<f64> = grid.iter().map(|&x| limit.cdf(x)).collect();
        let label = format!("limit: {}", limit.describe());
        match limit {
            Limit::Beta(..) => {
                // The density may blow up at the ends; the axis follows the bulk.
                let inner: Vec<f64> = grid[2..grid.len() - 2].to_vec();
                let dens: Vec<f64> = inner.iter().filter_map(|&x| limit.density(x)).collect();
                let bulk = inner
                    .iter()
                    .zip(&dens)
                    .filter(|(x, _)| (0.05..=0.95).contains(*x))
                    .map(|(_, d)| *d)
                    .fold(0.0, f64::max);
                y_top = y_top.max(bulk);
                density = density.line(Line::new(inner, dens).label(&label).dashed());
            }
            Limit::TwoPoint => {
                // No density: the limit's mass per bin over the bin width, as bars.
                let edges = histogram.edges.clone();
                let heights: Vec<f64> = edges
                    .windows(2)
                    .enumerate()
                    .map(|(i, w)| {
                        let lower = if i == 0 {
                            limit.cdf_left(w[0])
                        } else {
                            limit.cdf(w[0])
                        };
                        (limit.cdf(w[1]) - lower) / (w[1] - w[0])
                    })
                    .collect();
                y_top = y_top.max(heights.iter().cloned().fold(0.0, f64::max));
                density = density.histogram(Histogram::new(edges, heights).label(&label).outline());
            }
        }
        cdf = cdf.line(Line::new(grid, limit_cdf).label(&label).dashed());
    }
    density = density.y_range(0.0, (1.15 * y_top).max(1e-9));
    Figure::new()
        .title(&format!(
            "optimal rewards, U = {}, eps = {}, n = {}",
            utility.name(),
            eps,
            n
        ))
        .panel(density)
        .panel(cdf)
}
