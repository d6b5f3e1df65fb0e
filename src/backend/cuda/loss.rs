//! The ranking-utility loss of a whole batch in one launch (kernels/ranking_loss.cu), the
//! CUDA twin of `crate::loss::ranking_loss_forward_backward`.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::ops::{checked_view, checked_view_mut, launch};
use super::runtime::{CudaRuntime, DeviceRead, DeviceWrite, check_len, dim};
use crate::error::{Error, Result};
use crate::loss::{LossSpec, PromptType, Utility};

/// The per-prompt layout of a batch, resolved on the host once: where each prompt's
/// completions are, and which utility it is trained with.
pub struct RankingBatch {
    prompts: usize,
    completions: usize,
    pairs: usize,
    offsets: CudaSlice<i32>,  // [P+1]
    utility: CudaSlice<i32>,  // [P]
    exponent: CudaSlice<f64>, // [P]
}

impl RankingBatch {
    /// ks [P]: completions per prompt (>= 2), contiguous and best first in the logits;
    /// types [P]: the prompt types a prompt-aware loss needs.
    pub fn new(
        rt: &CudaRuntime,
        ks: &[usize],
        types: &[Option<PromptType>],
        spec: &LossSpec,
    ) -> Result<RankingBatch> {
        let op = "ranking loss";
        check_len(op, "types", types.len(), ks.len())?;
        if ks.is_empty() {
            return Err(Error::internal(format!("{op}: the batch has no prompt")));
        }
        let mut offsets = vec![0i32];
        let (mut utility, mut exponent) = (Vec::new(), Vec::new());
        let mut pairs = 0usize;
        for (p, (&k, &prompt_type)) in ks.iter().zip(types).enumerate() {
            if k < 2 {
                return Err(Error::internal(format!(
                    "{op}: prompt {p} has {k} completions; a ranking needs at least 2"
                )));
            }
            let u = spec.utility_for(prompt_type).ok_or_else(|| {
                Error::user(format!(
                    "prompt {p} of the batch has no type (open/closed), which the \
                     prompt-aware loss needs to pick its utility"
                ))
            })?;
            let (code, g) = utility_code(u);
            utility.push(code);
            exponent.push(g);
            pairs += k * (k - 1) / 2;
            let end = offsets[p] as usize + k;
            offsets.push(dim(op, "completions", end)?);
        }
        Ok(RankingBatch {
            prompts: ks.len(),
            completions: offsets[ks.len()] as usize,
            pairs,
            offsets: rt.upload(&offsets)?,
            utility: rt.upload(&utility)?,
            exponent: rt.upload(&exponent)?,
        })
    }
}

/// The kernel's utility id (its UTILITY_* defines) and exponent.
fn utility_code(u: Utility) -> (i32, f64) {
    match u {
        Utility::X => (0, 0.0),
        Utility::X2 => (1, 0.0),
        Utility::Log => (2, 0.0),
        Utility::XInv => (3, 0.0),
        Utility::XInv2 => (4, 0.0),
        Utility::LogSigmoid => (5, 0.0),
        Utility::Power(g) => (6, g),
        Utility::NegPower(g) => (7, g),
    }
}

impl CudaRuntime {
    /// Mean over all ranked pairs of the batch of -U(sigmoid(l_i) - sigmoid(l_j)), computed
    /// in f64; dlogits [sum K_p] = d loss / d logit (OVERWRITTEN). Returns the loss (one
    /// small copy to the host). eps > 0 is the utilities' shift.
    pub fn ranking_loss_forward_backward(
        &self,
        dlogits: &mut impl DeviceWrite<f32>,
        logits: &impl DeviceRead<f32>,
        batch: &RankingBatch,
        eps: f64,
    ) -> Result<f64> {
        let op = "ranking_loss_forward_backward";
        let logits = &checked_view(op, "logits", logits, batch.completions)?;
        let dlogits = &mut checked_view_mut(op, "dlogits", dlogits, batch.completions)?;
        if !(eps.is_finite() && eps > 0.0) {
            return Err(Error::internal(format!(
                "{op}: eps must be positive, got {eps}"
            )));
        }
        let mut prompt_loss = self.zeros::<f64>(batch.prompts)?; // [P], sums of -U
        let shape = launch::ranking_loss(op, batch.prompts)?;
        let kernel = self.kernel(op, "ranking_loss", op, shape)?;
        let scale = 1.0 / batch.pairs as f64;
        let mut args = kernel.args();
        args.arg(&mut prompt_loss)
            .arg(dlogits)
            .arg(logits)
            .arg(&batch.offsets)
            .arg(&batch.utility)
            .arg(&batch.exponent)
            .arg(&eps)
            .arg(&scale);
        unsafe { kernel.launch(args) }?;
        let sums = self.download(&prompt_loss)?;
        Ok(sums.iter().sum::<f64>() * scale)
    }
}
