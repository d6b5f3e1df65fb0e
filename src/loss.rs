//! The ranking utilities of the paper (notes section 2) and the per-prompt choice of the
//! prompt-aware ones. A utility U is maximised over ranked pairs; the loss of a pair whose
//! reward difference is x = r_better - r_worse is -U(x).

use crate::error::{Error, Result};
use crate::float::Float;

/// Whether a prompt is open-ended (wants spread rewards) or closed-ended (polarized ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PromptType {
    Open,
    Closed,
}

impl PromptType {
    pub fn name(self) -> &'static str {
        match self {
            PromptType::Open => "open",
            PromptType::Closed => "closed",
        }
    }
}

/// One utility. The named ones are exactly the authors' extended forms (shifted by eps,
/// continued linearly for x <= 0 with the authors' slopes); the `power:G` and
/// `neg_power:G` families are shifted the same way and continued with matching slope.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Utility {
    /// U = x
    X,
    /// U = (x+eps)^2 - eps^2 for x > 0; x otherwise
    X2,
    /// U = ln(x+eps) - ln(eps) for x > 0; 10x otherwise (the authors' slope, 1/eps at 0.1)
    Log,
    /// U = 1/eps - 1/(x+eps) for x > 0; 100x otherwise
    XInv,
    /// U = 1/eps^2 - 1/(x+eps)^2 for x > 0; x otherwise
    XInv2,
    /// U = ln sigmoid(4x)
    LogSigmoid,
    /// U = (x+eps)^g - eps^g for x > 0; g eps^(g-1) x otherwise
    Power(f64),
    /// U = eps^-g - (x+eps)^-g for x > 0; g eps^(-g-1) x otherwise
    NegPower(f64),
}

/// The exponents G of `power:G` and `neg_power:G` rcx trains with. Below 1e-3 the shifted
/// power (x+eps)^G - eps^G is a difference of two numbers within G ln(1+1/eps) of 1 and
/// loses its digits (power:1e-300 is exactly 0); above 1e3 U or U' overflows or vanishes
/// for almost every eps (1.1^1000 = 2.5e41, 0.1^1000 = 0). `Utility::check_with_eps`
/// narrows the range for the eps at hand.
pub const EXPONENT_RANGE: (f64, f64) = (1e-3, 1e3);

/// The shifts eps rcx trains with; `Utility::check_with_eps` narrows the range for each
/// utility (x_inv2 needs eps >= about 1e-4). Below 1e-6 even x_inv, the paper's utility
/// for open prompts, exceeds `SLOPE_RATIO_LIMIT`; above 1e3 the named utilities are linear
/// to within 0.3% over the rewards' range (U'(0+)/U'(1) = (1 + 1/eps)^k, k <= 3), so eps
/// no longer shapes them, and at 1e308 x_inv's slope 1/(x+eps)^2 is 0.
pub const EPS_RANGE: (f64, f64) = (1e-6, 1e3);

/// The magnitudes |U(x)| and U'(x) may reach over the reward differences x in (-1, 1):
/// training computes the loss and d loss / d logit in f32 (largest 3.4e38, smallest normal
/// 1.2e-38), so 1e30 leaves eight decades for the gradient's way back through the model,
/// and a slope below 1e-30 would vanish there and leave the theory's optimum undefined.
pub const UTILITY_LIMITS: (f64, f64) = (1e-30, 1e30);

/// How many times steeper U may be at 0+ than at 1 (or the reverse). The theory's
/// optimum, which every evaluation compares the rewards with, is found by Newton's method
/// in f64: it fails from a ratio of about 1e15 (x_inv2 at eps 1e-5, neg_power:5 at 3e-3).
pub const SLOPE_RATIO_LIMIT: f64 = 1e12;

/// A number for a message, at most about ten characters: as written for ordinary
/// magnitudes, else as a four-digit mantissa and exponent (1e308, not 309 digits).
pub fn short_number(x: f64) -> String {
    let plain = format!("{x}");
    if x == 0.0 || !x.is_finite() || ((1e-3..1e6).contains(&x.abs()) && plain.len() <= 8) {
        return plain;
    }
    let exponent_form = format!("{x:.3e}");
    match exponent_form.split_once('e') {
        Some((mantissa, exponent)) if mantissa.contains('.') => {
            format!(
                "{}e{exponent}",
                mantissa.trim_end_matches('0').trim_end_matches('.')
            )
        }
        _ => exponent_form,
    }
}

/// A number exactly (it parses back to itself), in exponent form when that is shorter.
fn exact_number(x: f64) -> String {
    let (plain, exponent_form) = (format!("{x}"), format!("{x:e}"));
    if exponent_form.len() < plain.len() {
        exponent_form
    } else {
        plain
    }
}

impl Utility {
    /// Parses a utility name as used everywhere in rcx: `x`, `x2`, `log`, `x_inv`, `x_inv2`,
    /// `logsigmoid`, `power:G`, `neg_power:G` with G in `EXPONENT_RANGE`.
    pub fn parse(name: &str) -> Result<Utility> {
        let name = name.trim();
        let exponent = |s: &str| -> Result<f64> {
            let (low, high) = EXPONENT_RANGE;
            match s.trim().parse::<f64>() {
                Ok(g) if (low..=high).contains(&g) => Ok(g),
                parsed => {
                    let got = match parsed {
                        Ok(g) => short_number(g),
                        Err(_) => format!("`{s}`"),
                    };
                    Err(Error::user(format!(
                        "utility `{}`: the exponent must be a number in [{}, {}], got {got}",
                        name.split(':').next().unwrap_or(name),
                        short_number(low),
                        short_number(high)
                    )))
                }
            }
        };
        Ok(match name {
            "x" => Utility::X,
            "x2" => Utility::X2,
            "log" => Utility::Log,
            "x_inv" => Utility::XInv,
            "x_inv2" => Utility::XInv2,
            "logsigmoid" => Utility::LogSigmoid,
            _ => {
                if let Some(g) = name.strip_prefix("power:") {
                    Utility::Power(exponent(g)?)
                } else if let Some(g) = name.strip_prefix("neg_power:") {
                    Utility::NegPower(exponent(g)?)
                } else {
                    return Err(Error::user(format!(
                        "unknown utility `{name}`: expected one of x, x2, log, x_inv, x_inv2, \
                         logsigmoid, power:G, neg_power:G"
                    )));
                }
            }
        })
    }

    /// The name `parse` reads back.
    pub fn name(&self) -> String {
        match self {
            Utility::X => "x".into(),
            Utility::X2 => "x2".into(),
            Utility::Log => "log".into(),
            Utility::XInv => "x_inv".into(),
            Utility::XInv2 => "x_inv2".into(),
            Utility::LogSigmoid => "logsigmoid".into(),
            Utility::Power(g) => format!("power:{}", exact_number(*g)),
            Utility::NegPower(g) => format!("neg_power:{}", exact_number(*g)),
        }
    }

    /// U(x) and U'(x) for the extended form with shift `eps` (eps > 0 for training). With
    /// eps = 0 the pure forms of the theory (x, x^2, ln x, -1/x, -1/x^2, x^g, -x^-g) are
    /// returned for x > 0; only the theory solver asks for those.
    pub fn value_and_slope(&self, x: f64, eps: f64) -> (f64, f64) {
        match *self {
            Utility::X => (x, 1.0),
            Utility::LogSigmoid => {
                // ln sigmoid(4x) = -softplus(-4x), written to stay finite for large |x|.
                let z = -4.0 * x;
                let softplus = if z > 0.0 {
                    z + (-z).exp().ln_1p()
                } else {
                    z.exp().ln_1p()
                };
                let sig = 1.0 / (1.0 + (-4.0 * x).exp());
                (-softplus, 4.0 * (1.0 - sig))
            }
            Utility::X2 if x > 0.0 => ((x + eps).powi(2) - eps * eps, 2.0 * (x + eps)),
            Utility::X2 => (x, 1.0),
            Utility::Log if x > 0.0 => {
                let shift = if eps > 0.0 { eps.ln() } else { 0.0 };
                ((x + eps).ln() - shift, 1.0 / (x + eps))
            }
            Utility::Log => (10.0 * x, 10.0),
            Utility::XInv if x > 0.0 => {
                let shift = if eps > 0.0 { 1.0 / eps } else { 0.0 };
                (shift - 1.0 / (x + eps), 1.0 / (x + eps).powi(2))
            }
            Utility::XInv => (100.0 * x, 100.0),
            Utility::XInv2 if x > 0.0 => {
                let shift = if eps > 0.0 { 1.0 / (eps * eps) } else { 0.0 };
                (shift - 1.0 / (x + eps).powi(2), 2.0 / (x + eps).powi(3))
            }
            Utility::XInv2 => (x, 1.0),
            Utility::Power(g) if x > 0.0 => {
                ((x + eps).powf(g) - eps.powf(g), g * (x + eps).powf(g - 1.0))
            }
            Utility::Power(g) => {
                let slope = g * eps.powf(g - 1.0);
                (slope * x, slope)
            }
            Utility::NegPower(g) if x > 0.0 => {
                let shift = if eps > 0.0 { eps.powf(-g) } else { 0.0 };
                (shift - (x + eps).powf(-g), g * (x + eps).powf(-g - 1.0))
            }
            Utility::NegPower(g) => {
                let slope = g * eps.powf(-g - 1.0);
                (slope * x, slope)
            }
        }
    }

    /// Checks that U and U' stay within `UTILITY_LIMITS` for every reward difference x in
    /// (-1, 1) with this eps. Every U is increasing and U' is monotone on each side of 0
    /// (the x <= 0 branch is linear; x > 0 is concave or convex), so their extremes are at
    /// x = -1, 0 (the linear branch), 0+ and 1: those four points decide. The error names
    /// the point and value that fail.
    pub fn check_with_eps(&self, eps: f64) -> std::result::Result<(), String> {
        let (smallest_slope, largest) = UTILITY_LIMITS;
        let out_of_limits = |problem: String| {
            format!(
                "`{}` with eps {} has {problem} on reward differences in (-1, 1), outside \
                 what training holds in f32 (|U| <= {}, {} <= U' <= {}); change the \
                 exponent or eps",
                self.name(),
                short_number(eps),
                short_number(largest),
                short_number(smallest_slope),
                short_number(largest)
            )
        };
        for (x, at) in [
            (-1.0, "-1"),
            (0.0, "0"),
            (f64::MIN_POSITIVE, "0+"),
            (1.0, "1"),
        ] {
            let (value, slope) = self.value_and_slope(x, eps);
            // Written so that a NaN fails too.
            let problem = if !(..=largest).contains(&value.abs()) {
                format!("U({at}) = {}", short_number(value))
            } else if !(smallest_slope..=largest).contains(&slope) {
                format!("U'({at}) = {}", short_number(slope))
            } else {
                continue;
            };
            return Err(out_of_limits(problem));
        }
        let (steepest, flattest) = {
            let (at_0, at_1) = (
                self.value_and_slope(f64::MIN_POSITIVE, eps).1,
                self.value_and_slope(1.0, eps).1,
            );
            (at_0.max(at_1), at_0.min(at_1))
        };
        if steepest / flattest > SLOPE_RATIO_LIMIT {
            return Err(format!(
                "`{}` with eps {}: its slope varies {}-fold over reward differences in (0, 1), \
                 more than the {}-fold the theory's optimum (computed at every evaluation) \
                 resolves in f64; raise eps or lower the exponent",
                self.name(),
                short_number(eps),
                short_number(steepest / flattest),
                short_number(SLOPE_RATIO_LIMIT)
            ));
        }
        Ok(())
    }
}

/// The loss as configured: one utility for every prompt, or one per prompt type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LossSpec {
    Single(Utility),
    PromptAware { open: Utility, closed: Utility },
}

impl LossSpec {
    /// Parses a loss name: any utility name, `adaptive` (open: x_inv, closed: x),
    /// `adaptive2` (open: x_inv2, closed: x2), or `open=UTILITY,closed=UTILITY` (the name
    /// the config gives a mapping).
    pub fn parse(name: &str) -> Result<LossSpec> {
        if let Some((open, closed)) = name
            .trim()
            .strip_prefix("open=")
            .and_then(|rest| rest.split_once(",closed="))
        {
            return Ok(LossSpec::PromptAware {
                open: Utility::parse(open)?,
                closed: Utility::parse(closed)?,
            });
        }
        match name.trim() {
            "adaptive" => Ok(LossSpec::PromptAware {
                open: Utility::XInv,
                closed: Utility::X,
            }),
            "adaptive2" => Ok(LossSpec::PromptAware {
                open: Utility::XInv2,
                closed: Utility::X2,
            }),
            // A bad exponent keeps its own message; any other name is unknown.
            other if other.starts_with("power:") || other.starts_with("neg_power:") => {
                Utility::parse(other).map(LossSpec::Single)
            }
            other => Utility::parse(other).map(LossSpec::Single).map_err(|_| {
                Error::user(format!(
                    "unknown loss `{other}`: expected one of x, x2, log, x_inv, x_inv2, \
                     logsigmoid, adaptive, adaptive2, power:G, neg_power:G, or a mapping \
                     {{open: UTILITY, closed: UTILITY}}"
                ))
            }),
        }
    }

    /// The utility a prompt of this type is trained with. `None` for a prompt-aware loss and
    /// an untyped prompt.
    pub fn utility_for(&self, prompt_type: Option<PromptType>) -> Option<Utility> {
        match (self, prompt_type) {
            (LossSpec::Single(u), _) => Some(*u),
            (LossSpec::PromptAware { open, .. }, Some(PromptType::Open)) => Some(*open),
            (LossSpec::PromptAware { closed, .. }, Some(PromptType::Closed)) => Some(*closed),
            (LossSpec::PromptAware { .. }, None) => None,
        }
    }

    pub fn is_prompt_aware(&self) -> bool {
        matches!(self, LossSpec::PromptAware { .. })
    }
}

/// The logistic function, written so that neither branch overflows: exp is only ever taken
/// of a non-positive number.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The number of ranked pairs of a batch: sum over prompts of K_p (K_p - 1) / 2.
pub fn pair_count(ks: &[usize]) -> usize {
    ks.iter().map(|&k| k * k.saturating_sub(1) / 2).sum()
}

/// The margins a record may carry, in reward units: rewards lie in (0, 1), so a pair can
/// meet a margin below 1 and no other; a negative one would ask nothing of the order.
pub const MARGIN_RANGE: (f64, f64) = (0.0, 1.0);

/// What a batch's prompts say about their pairs beyond their order (ties and margins);
/// `PairLabels::default()` (both empty) is the paper's loss: every pair, best first, no
/// margin.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairLabels<'a> {
    /// [sum_p K_p] or empty. Given, a pair is formed only between two completions of
    /// different scores, the higher one ranked above (equal scores are a tie and form no
    /// pair); empty, every pair is formed, the completions best first.
    pub scores: &'a [f64],
    /// [P] or empty (all 0). The margin m of each prompt, in reward units, in
    /// `MARGIN_RANGE`: each of its pairs costs -U(r_better - r_worse - m), so the utility asks
    /// the better reward to lead by more than m (TRL's -logsigmoid(r_c - r_r - m) has the
    /// same form on its logits).
    pub margins: &'a [f64],
}

/// The options of the training loss beyond its utility, all off by default.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossExtras<'a> {
    pub labels: PairLabels<'a>,
    /// c >= 0: adds c * mean(logit^2) over the batch's logits (TRL's
    /// `center_rewards_coefficient`), which pulls the logits, and so the rewards, towards
    /// the middle without changing their order.
    pub center_rewards_coefficient: f64,
}

impl LossExtras<'_> {
    /// Whether this is the paper's loss (no ties, margins or centering).
    pub fn is_off(&self) -> bool {
        self.labels.scores.is_empty()
            && self.labels.margins.is_empty()
            && self.center_rewards_coefficient == 0.0
    }
}

/// Checks the shapes of a batch and picks each prompt's utility. Shape mismatches are bugs
/// of the caller (internal); an untyped prompt under a prompt-aware loss is bad data (user).
fn utilities_per_prompt(
    n_scores: usize,
    ks: &[usize],
    types: &[Option<PromptType>],
    spec: &LossSpec,
    eps: f64,
) -> Result<Vec<Utility>> {
    if ks.len() != types.len() {
        return Err(Error::internal(format!(
            "ranking loss: {} prompt sizes but {} prompt types",
            ks.len(),
            types.len()
        )));
    }
    if let Some(p) = ks.iter().position(|&k| k < 2) {
        return Err(Error::internal(format!(
            "ranking loss: prompt {p} has {} completions, at least 2 are needed for a pair",
            ks[p]
        )));
    }
    let total: usize = ks.iter().sum();
    if total != n_scores {
        return Err(Error::internal(format!(
            "ranking loss: the prompt sizes add up to {total} but {n_scores} scores were given"
        )));
    }
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::internal(format!(
            "ranking loss: eps must be positive, got {eps}"
        )));
    }
    types
        .iter()
        .enumerate()
        .map(|(p, &t)| {
            spec.utility_for(t).ok_or_else(|| {
                Error::user(format!(
                    "prompt {p} of the batch has no type (open/closed), which the \
                     prompt-aware loss needs to pick its utility"
                ))
            })
        })
        .collect()
}

/// Whether completions i < j of a prompt form a pair, and which is the better one:
/// (better, worse). `scores` are the prompt's own, or empty (best first).
fn ranked_pair(scores: &[f64], i: usize, j: usize) -> Option<(usize, usize)> {
    if scores.is_empty() {
        return Some((i, j));
    }
    match scores[i].partial_cmp(&scores[j]) {
        Some(std::cmp::Ordering::Greater) => Some((i, j)),
        Some(std::cmp::Ordering::Less) => Some((j, i)),
        _ => None,
    }
}

/// The scores of the prompt whose completions are `start..start + k` (empty when none).
fn prompt_scores<'a>(labels: &PairLabels<'a>, start: usize, k: usize) -> &'a [f64] {
    match labels.scores.is_empty() {
        true => &[],
        false => &labels.scores[start..start + k],
    }
}

/// Checks the labels against a batch of `n_scores` completions in prompts of `ks` (already
/// checked) and counts its pairs. Labels come from checked data, so a bad one is a bug.
fn labelled_pair_count(n_scores: usize, ks: &[usize], labels: &PairLabels) -> Result<usize> {
    let (scores, margins) = (labels.scores, labels.margins);
    if !scores.is_empty() && scores.len() != n_scores {
        return Err(Error::internal(format!(
            "ranking loss: {} completion scores for {n_scores} completions",
            scores.len()
        )));
    }
    if let Some(s) = scores.iter().find(|s| !s.is_finite()) {
        return Err(Error::internal(format!(
            "ranking loss: a completion score is {s}"
        )));
    }
    if !margins.is_empty() && margins.len() != ks.len() {
        return Err(Error::internal(format!(
            "ranking loss: {} margins for {} prompts",
            margins.len(),
            ks.len()
        )));
    }
    if let Some(m) = margins
        .iter()
        .find(|&&m| !(MARGIN_RANGE.0..MARGIN_RANGE.1).contains(&m))
    {
        return Err(Error::internal(format!(
            "ranking loss: margin {m} outside [0, 1)"
        )));
    }
    let mut pairs = 0;
    let mut start = 0;
    for (p, &k) in ks.iter().enumerate() {
        let s = prompt_scores(labels, start, k);
        let prompt_pairs = (0..k)
            .flat_map(|i| (i + 1..k).map(move |j| (i, j)))
            .filter(|&(i, j)| ranked_pair(s, i, j).is_some())
            .count();
        if prompt_pairs == 0 {
            return Err(Error::internal(format!(
                "ranking loss: prompt {p}'s completions all have one score: no pair to rank"
            )));
        }
        pairs += prompt_pairs;
        start += k;
    }
    Ok(pairs)
}

/// Mean over all ranked pairs of -U(r_better - r_worse - margin), and its gradient with
/// respect to the rewards written into `drewards` (overwritten). Shapes as in
/// `ranking_loss_forward_backward`, already checked; `pairs` from `labelled_pair_count`.
fn ranking_loss_of_rewards_with_grad(
    rewards: &[f64],       // [sum_p K_p]
    ks: &[usize],          // [P]
    utilities: &[Utility], // [P]
    eps: f64,
    labels: &PairLabels,
    pairs: usize,
    drewards: &mut [f64], // [sum_p K_p]
) -> f64 {
    // The paper's code averages over every pair of the batch, so a prompt with more
    // completions weighs more (K(K-1)/2 pairs).
    let scale = 1.0 / pairs as f64;
    drewards.fill(0.0);
    let mut loss = 0.0;
    let mut start = 0;
    for (p, (&k, utility)) in ks.iter().zip(utilities).enumerate() {
        let r = &rewards[start..start + k];
        let dr = &mut drewards[start..start + k];
        let scores = prompt_scores(labels, start, k);
        let margin = labels.margins.get(p).copied().unwrap_or(0.0);
        for i in 0..k {
            for j in i + 1..k {
                let Some((better, worse)) = ranked_pair(scores, i, j) else {
                    continue;
                };
                // The utility rewards r_better - r_worse being large.
                let (u, slope) = utility.value_and_slope(r[better] - r[worse] - margin, eps);
                loss -= u * scale;
                dr[better] -= slope * scale;
                dr[worse] += slope * scale;
            }
        }
        start += k;
    }
    loss
}

/// The batch ranking loss evaluated on rewards directly (in [0, 1], best first per prompt),
/// in f64: for analysis, e.g. the loss at the theoretical optimum.
pub fn ranking_loss_of_rewards(
    rewards: &[f64],              // [sum_p K_p]
    ks: &[usize],                 // [P]
    types: &[Option<PromptType>], // [P]
    spec: &LossSpec,
    eps: f64,
) -> Result<f64> {
    ranking_loss_of_rewards_labelled(rewards, ks, types, spec, eps, &PairLabels::default())
}

/// `ranking_loss_of_rewards` with ties and margins (`PairLabels`): the pair loss an
/// evaluation reports (centering acts on logits, not rewards, and is not part of it).
pub fn ranking_loss_of_rewards_labelled(
    rewards: &[f64],              // [sum_p K_p]
    ks: &[usize],                 // [P]
    types: &[Option<PromptType>], // [P]
    spec: &LossSpec,
    eps: f64,
    labels: &PairLabels,
) -> Result<f64> {
    let utilities = utilities_per_prompt(rewards.len(), ks, types, spec, eps)?;
    let pairs = labelled_pair_count(rewards.len(), ks, labels)?;
    let mut drewards = vec![0.0; rewards.len()]; // [sum_p K_p]
    Ok(ranking_loss_of_rewards_with_grad(
        rewards,
        ks,
        &utilities,
        eps,
        labels,
        pairs,
        &mut drewards,
    ))
}

/// logits: [sum_p K_p], completions of each prompt contiguous, best first; ks[p] = K_p (>= 2).
/// Returns the mean over all ranked pairs of the batch of -U(r_i - r_j), r = sigmoid(logit),
/// and writes dlogits (same shape, = d loss / d logit, OVERWRITTEN not accumulated).
///
/// Each completion is scored once and all K(K-1)/2 pairs are formed on the K rewards (the
/// authors' code ran both sequences of every pair through the encoder). Under a
/// prompt-aware loss the utility is chosen per prompt from `types[p]` (the authors' code
/// chose it once per batch from the last prompt). The arithmetic is done in f64 whatever F
/// is: it is O(K^2) scalars per prompt, negligible beside the encoder, and it keeps the
/// steep utilities (x_inv2 has slope 2000 at 0) accurate in f32 training.
pub fn ranking_loss_forward_backward<F: Float>(
    logits: &[F],                 // [sum_p K_p]
    ks: &[usize],                 // [P]
    types: &[Option<PromptType>], // [P]
    spec: &LossSpec,
    eps: f64,
    dlogits: &mut [F], // [sum_p K_p]
) -> Result<F> {
    ranking_loss_forward_backward_with(
        logits,
        ks,
        types,
        spec,
        eps,
        &LossExtras::default(),
        dlogits,
    )
}

/// `ranking_loss_forward_backward` with the options of `extras`: pairs only between
/// different scores, each pair's margin, and c * mean(logit^2) over the batch added to the
/// mean pair loss (its gradient 2 c logit / B added to dlogits).
pub fn ranking_loss_forward_backward_with<F: Float>(
    logits: &[F],                 // [sum_p K_p]
    ks: &[usize],                 // [P]
    types: &[Option<PromptType>], // [P]
    spec: &LossSpec,
    eps: f64,
    extras: &LossExtras,
    dlogits: &mut [F], // [sum_p K_p]
) -> Result<F> {
    if dlogits.len() != logits.len() {
        return Err(Error::internal(format!(
            "ranking loss: {} logits but room for {} gradients",
            logits.len(),
            dlogits.len()
        )));
    }
    let center = extras.center_rewards_coefficient;
    if !(center.is_finite() && center >= 0.0) {
        return Err(Error::internal(format!(
            "ranking loss: center_rewards_coefficient must be >= 0, got {center}"
        )));
    }
    let utilities = utilities_per_prompt(logits.len(), ks, types, spec, eps)?;
    let pairs = labelled_pair_count(logits.len(), ks, &extras.labels)?;
    let rewards: Vec<f64> = logits.iter().map(|s| sigmoid(s.to_f64())).collect(); // [sum_p K_p]
    let mut drewards = vec![0.0; rewards.len()]; // [sum_p K_p]
    let mut loss = ranking_loss_of_rewards_with_grad(
        &rewards,
        ks,
        &utilities,
        eps,
        &extras.labels,
        pairs,
        &mut drewards,
    );
    for ((ds, &r), &dr) in dlogits.iter_mut().zip(&rewards).zip(&drewards) {
        // d sigmoid(s) / ds = r (1 - r)
        *ds = F::from_f64(dr * r * (1.0 - r));
    }
    // Skipped when off, so that the paper's loss is computed exactly as before.
    if center > 0.0 {
        let n = logits.len() as f64;
        for (ds, s) in dlogits.iter_mut().zip(logits) {
            let s = s.to_f64();
            loss += center * s * s / n;
            *ds = F::from_f64(ds.to_f64() + 2.0 * center * s / n);
        }
    }
    Ok(F::from_f64(loss))
}

/// Rewards closer than this count as a tie in `pairwise_accuracy`.
pub const TIE_TOLERANCE: f64 = 1e-3;

/// Counts, over all ranked pairs (i above j) of each prompt, those ordered correctly
/// (r_i - r_j > 1e-3) and the ties (|r_i - r_j| <= 1e-3). Returns (correct, ties, total).
/// rewards: [sum_p K_p], best first per prompt, as for the loss.
pub fn pairwise_accuracy(rewards: &[f64], ks: &[usize]) -> (usize, usize, usize) {
    assert_eq!(
        ks.iter().sum::<usize>(),
        rewards.len(),
        "pairwise_accuracy: prompt sizes do not match the rewards"
    );
    let (mut correct, mut ties) = (0, 0);
    let mut start = 0;
    for &k in ks {
        let r = &rewards[start..start + k];
        for i in 0..k {
            for j in i + 1..k {
                let x = r[i] - r[j];
                if x.abs() <= TIE_TOLERANCE {
                    ties += 1;
                } else if x > 0.0 {
                    correct += 1;
                }
            }
        }
        start += k;
    }
    (correct, ties, pair_count(ks))
}
