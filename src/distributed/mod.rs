//! Training on several processes (ranks), each with its own device: what one training step
//! shares with the other ranks. docs/scaling.md has the design.

pub mod data_parallel;
pub mod launch;
pub mod rendezvous;

use std::ops::Range;

use crate::backend::{Backend, OptimStep};
use crate::error::Result;

/// Where this process stands in a run over several processes: its rank among `world_size`,
/// and `local_rank` among those of its machine (the GPU it takes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rank {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
}

/// What a training step exchanges with the other ranks of a data-parallel run. Each rank's
/// micro-batch gradients are already divided by the global step's micro-batch count, so sums
/// over the ranks give the single-process step.
pub trait StepSync<B: Backend> {
    /// How many ranks share the step (1: none).
    fn world_size(&self) -> usize;
    /// Replaces `values` on every rank by their sum over the ranks.
    fn sum_values(&mut self, values: &mut [f64]) -> Result<()>;
    /// Before each of this rank's micro-batches; `last`: the step's last, whose backward
    /// finishes the gradients (and may start summing them, `Backend::grads_final`).
    fn micro_batch_starts(&mut self, _backend: &mut B, _last: bool) -> Result<()> {
        Ok(())
    }
    /// After this rank's last backward of the step: the sums it started are finished.
    fn backward_done(&mut self, _backend: &mut B) -> Result<()> {
        Ok(())
    }
    /// After every rank's backward: the global gradient norm, clipping (torch's
    /// clip_grad_norm_) and AdamW over `tensors` (ranges of the arena, decay flag), every
    /// rank ending with the same weights. Returns the norm before clipping; a norm that is
    /// not finite updates nothing.
    fn update(
        &mut self,
        backend: &mut B,
        tensors: &[(Range<usize>, bool)],
        opt: &OptimStep,
    ) -> Result<f64>;
}

/// The update of one process, or of a rank whose gradient arena already holds the sum.
pub fn clip_and_update<B: Backend>(
    backend: &mut B,
    tensors: &[(Range<usize>, bool)],
    opt: &OptimStep,
) -> Result<f64> {
    let grad_norm = backend.grad_norm()?;
    if grad_norm.is_finite() {
        backend.adamw_update(tensors, opt, opt.clip_factor(grad_norm))?;
    }
    Ok(grad_norm)
}

/// One process training alone: nothing to share.
pub struct Alone;

impl<B: Backend> StepSync<B> for Alone {
    fn world_size(&self) -> usize {
        1
    }

    fn sum_values(&mut self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn update(
        &mut self,
        backend: &mut B,
        tensors: &[(Range<usize>, bool)],
        opt: &OptimStep,
    ) -> Result<f64> {
        clip_and_update(backend, tensors, opt)
    }
}
