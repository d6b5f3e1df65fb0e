//! ZeRO-1 (`zero_stage: 1`): AdamW's moments sharded over the ranks of a data-parallel run.
//!
//! The parameter arena [P] splits into N shards of S = P / N elements and a tail
//! [N·S, P) of fewer than N. Rank r owns shard r and, like every rank, the tail, so its
//! moments are [S + tail] instead of [P] each. During a step's backward the gradient
//! buckets (`super::buckets`) reduce each part of the arena to its owner (rank r's shard
//! becomes the sum of everyone's: a reduce-scatter in buckets) and all-reduce the tail;
//! the update sums the squared norms of the shards (the tail counted once), updates its
//! shard and the tail with the common clipping factor, and all-gathers the fp32 weights in
//! place (then refreshes the bf16 copy). The result is plain data parallelism's: the same
//! sums, the same elementwise AdamW. Checkpoints hold whole moments: `with_state` gathers them.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::CudaSlice;

use super::backend::Cuda;
use super::buckets::Owners;
use super::nccl::Communicator;
use super::runtime::{CudaRuntime, driver};
use crate::backend::{Backend, OptimStep};
use crate::error::{Error, Result};

/// A communicator that the training loop and the backend's optimizer shard both use.
pub type SharedCommunicator = Arc<Mutex<Communicator>>;

/// The communicator of `shared`, or an error if a panic poisoned it.
pub fn lock(shared: &SharedCommunicator) -> Result<MutexGuard<'_, Communicator>> {
    shared
        .lock()
        .map_err(|_| Error::internal("the NCCL communicator was poisoned by a panic"))
}

pub struct OptimizerShard {
    comm: SharedCommunicator,
    rank: usize,
    world_size: usize,
    shard: usize, // S
}

impl OptimizerShard {
    /// The shards' owners, for the gradient buckets.
    pub fn owners(&self) -> Owners {
        Owners {
            world_size: self.world_size,
            shard: self.shard,
        }
    }

    /// Rank r's parameter ranges: its shard, then the tail.
    pub fn owned(&self, total: usize) -> [Range<usize>; 2] {
        let (r, s) = (self.rank, self.shard);
        [r * s..(r + 1) * s, self.world_size * s..total]
    }

    /// The whole [total] of a moment arena `part` [S + tail] sharded this way.
    pub fn gather(
        &self,
        rt: &CudaRuntime,
        part: &CudaSlice<f32>,
        total: usize,
    ) -> Result<Vec<f32>> {
        let mut whole = rt.zeros::<f32>(self.world_size * self.shard)?;
        lock(&self.comm)?.all_gather(&part.slice(..self.shard), &mut whole)?;
        let mut host = rt.download(&whole)?;
        if part.len() > self.shard {
            let tail = rt
                .stream()
                .clone_dtoh(&part.slice(self.shard..))
                .map_err(driver("copy the moments' tail to the host"))?;
            host.extend(tail);
        }
        match host.len() == total {
            true => Ok(host),
            false => Err(Error::internal(format!(
                "ZeRO-1: gathered {} moments of {total} parameters",
                host.len()
            ))),
        }
    }
}

impl Cuda {
    /// Whether ZeRO-1 shards this backend's AdamW moments.
    pub fn optimizer_sharded(&self) -> bool {
        self.optimizer_shard.is_some()
    }

    /// Shards AdamW's moments over the ranks of `comm` (ZeRO-1): from now on this backend
    /// holds only its rank's part of them (zeros; `upload_moments` takes whole moments and
    /// keeps that part). Call after `start_training`.
    pub fn shard_optimizer(&mut self, comm: SharedCommunicator) -> Result<()> {
        self.training()?;
        let (rank, world_size) = {
            let comm = lock(&comm)?;
            (comm.rank(), comm.world_size())
        };
        self.optimizer_shard = Some(OptimizerShard {
            shard: self.params.len() / world_size,
            comm,
            rank,
            world_size,
        });
        let moments: usize = self.moment_ranges().iter().map(|r| r.len()).sum();
        self.m = self.rt.zeros(moments)?;
        self.v = self.rt.zeros(moments)?;
        Ok(())
    }

    /// ZeRO-1's update (see the module's comment), after the gradient buckets have brought
    /// each rank the sums of its shard and of the tail; returns the global gradient norm
    /// before clipping. Every rank calls it at the same step.
    pub fn sharded_update(
        &mut self,
        tensors: &[(Range<usize>, bool)],
        opt: &OptimStep,
    ) -> Result<f64> {
        let total = self.params.len();
        let shard = self
            .optimizer_shard
            .as_ref()
            .ok_or_else(|| Error::internal("sharded_update without an optimizer shard"))?;
        let [own, tail] = shard.owned(total);
        let main = shard.world_size * shard.shard;
        let comm = shard.comm.clone();
        let first = shard.rank == 0;
        let tail_squares = match first {
            true => self.rt.global_norm_squared(&[self.grads.slice(tail)])?,
            false => 0.0,
        };
        let mut squares = [self
            .rt
            .global_norm_squared(&[self.grads.slice(own.clone())])?
            + tail_squares];
        lock(&comm)?.all_reduce_sum_host(&mut squares)?;
        let grad_norm = squares[0].sqrt();
        if grad_norm.is_finite() {
            // Updates the shard and the tail: the ranges whose moments this rank holds.
            self.adamw_update(tensors, opt, opt.clip_factor(grad_norm))?;
            lock(&comm)?.all_gather_in_place(&mut self.params.slice_mut(..main))?;
            self.refresh_bf16_weights()?;
        }
        Ok(grad_norm)
    }
}
