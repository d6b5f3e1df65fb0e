//! Training on several processes (ranks), each with its own device: what one training step
//! shares with the other ranks. docs/scaling.md has the design.

pub mod launch;
pub mod rendezvous;

use crate::backend::Backend;
use crate::error::Result;

/// Where this process stands in a run over several processes: its rank among `world_size`,
/// and `local_rank` among those of its machine (the GPU it takes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rank {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
}

/// What a training step exchanges with the other ranks of a data-parallel run: the sum of
/// their gradient arenas, and the sum of a few numbers (the loss). Each rank's micro-batch
/// gradients are already divided by the global step's micro-batch count, so the sums are the
/// single-process step's mean.
pub trait StepSync<B: Backend> {
    /// How many ranks share the step (1: none).
    fn world_size(&self) -> usize;
    /// Replaces every rank's gradient arena by the sum over the ranks.
    fn sum_gradients(&mut self, backend: &mut B) -> Result<()>;
    /// Replaces `values` on every rank by their sum over the ranks.
    fn sum_values(&mut self, values: &mut [f64]) -> Result<()>;
}

/// One process training alone: nothing to share.
pub struct Alone;

impl<B: Backend> StepSync<B> for Alone {
    fn world_size(&self) -> usize {
        1
    }

    fn sum_gradients(&mut self, _backend: &mut B) -> Result<()> {
        Ok(())
    }

    fn sum_values(&mut self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
}
