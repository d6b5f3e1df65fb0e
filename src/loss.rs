//! The ranking utilities of the paper (notes section 2) and the per-prompt choice of the
//! prompt-aware ones. A utility U is maximised over ranked pairs; the loss of a pair whose
//! reward difference is x = r_better - r_worse is -U(x).

use crate::error::{Error, Result};

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

impl Utility {
    /// Parses a utility name as used everywhere in rcx: `x`, `x2`, `log`, `x_inv`, `x_inv2`,
    /// `logsigmoid`, `power:G`, `neg_power:G`.
    pub fn parse(name: &str) -> Result<Utility> {
        let name = name.trim();
        let exponent = |s: &str| -> Result<f64> {
            match s.parse::<f64>() {
                Ok(g) if g.is_finite() && g > 0.0 => Ok(g),
                _ => Err(Error::user(format!(
                    "utility `{name}`: the exponent must be a positive number, got `{s}`"
                ))),
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
            Utility::Power(g) => format!("power:{g}"),
            Utility::NegPower(g) => format!("neg_power:{g}"),
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
}

/// The loss as configured: one utility for every prompt, or one per prompt type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LossSpec {
    Single(Utility),
    PromptAware { open: Utility, closed: Utility },
}

impl LossSpec {
    /// Parses a loss name: any utility name, or `adaptive` (open: x_inv, closed: x) and
    /// `adaptive2` (open: x_inv2, closed: x2).
    pub fn parse(name: &str) -> Result<LossSpec> {
        match name.trim() {
            "adaptive" => Ok(LossSpec::PromptAware {
                open: Utility::XInv,
                closed: Utility::X,
            }),
            "adaptive2" => Ok(LossSpec::PromptAware {
                open: Utility::XInv2,
                closed: Utility::X2,
            }),
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
