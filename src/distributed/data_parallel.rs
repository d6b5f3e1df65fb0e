//! One rank of a data-parallel training run: it meets the other ranks (the rendezvous, then
//! an NCCL communicator on its GPU), takes its share of each global step's micro-batches,
//! and sums gradients and losses with the others (`StepSync`). Rank 0 alone writes.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::launch::WorldEnv;
use super::rendezvous::{self, Control};
use super::{Rank, StepSync, clip_and_update};
use crate::backend::OptimStep;
use crate::backend::cuda::nccl::{self, Communicator};
use crate::backend::cuda::zero::{SharedCommunicator, lock};
use crate::backend::cuda::{Cuda, CudaRuntime};
use crate::error::{Error, Result};

pub struct DataParallel {
    pub rank: Rank,
    comm: SharedCommunicator,
    control: Control,
    /// The gradient buckets have summed this step's gradients during its backward.
    summed: bool,
}

impl DataParallel {
    /// Meets the other ranks of `world` (each within `timeout`) and makes the communicator
    /// on `rt`'s device.
    pub fn join(world: &WorldEnv, rt: &Arc<CudaRuntime>, timeout: Duration) -> Result<Self> {
        let rank = world.rank;
        nccl::available().map_err(|why| {
            Error::user(format!(
                "WORLD_SIZE {}: training on several processes needs NCCL: {why}",
                rank.world_size
            ))
        })?;
        let (id, control) = rendezvous::join(world, nccl::unique_id, timeout)?;
        let comm = Communicator::new(rt, &id, rank.rank, rank.world_size, timeout)?;
        let comm = Arc::new(Mutex::new(comm));
        Ok(DataParallel {
            rank,
            comm,
            control,
            summed: false,
        })
    }

    /// Sums each step's gradients in buckets of at least `bucket_len` elements while the
    /// backward runs (`backend::cuda::buckets`): required before the first step.
    pub fn overlap_gradients(&self, backend: &mut Cuda, bucket_len: usize) -> Result<()> {
        backend.overlap_grad_sums(self.comm.clone(), bucket_len)
    }

    /// ZeRO-1: shards `backend`'s AdamW moments over the ranks.
    pub fn shard_optimizer(&self, backend: &mut Cuda) -> Result<()> {
        backend.shard_optimizer(self.comm.clone())
    }

    /// The run's last meeting: every rank has finished (rank 0 its saves).
    pub fn finish(self, timeout: Duration) -> Result<()> {
        self.control.finish(timeout)
    }

    /// This rank's micro-batches (indices into the global step's `micro_batches`, which the
    /// config has checked is a multiple of the world size).
    pub fn share(&self, micro_batches: usize) -> Range<usize> {
        let each = micro_batches / self.rank.world_size;
        self.rank.rank * each..(self.rank.rank + 1) * each
    }

    /// Fails on every rank unless all ranks start from the same `fingerprint` (of their
    /// settings, step and weights): ranks that disagree would train different models.
    pub fn check_same_start(&mut self, fingerprint: u64) -> Result<()> {
        // 52 bits, so that the f64 holds it exactly; rank 0's value reaches every rank as
        // the sum of itself and zeros (exact), then the ranks count their differences.
        let mine = (fingerprint >> 12) as f64;
        let mut first = [if self.rank.rank == 0 { mine } else { 0.0 }];
        self.sum_values(&mut first)?;
        let mut differ = [if first[0] == mine { 0.0 } else { 1.0 }];
        self.sum_values(&mut differ)?;
        if differ[0] != 0.0 {
            return Err(Error::user(format!(
                "{} of the {} ranks start from other settings, data or weights than rank 0 \
                 (each rank must read the same config, data and model files)",
                differ[0], self.rank.world_size
            )));
        }
        Ok(())
    }

    /// The error of a lost peer, if the control channel has seen one.
    fn check_peers(&self) -> Result<()> {
        match self.control.peer_lost() {
            Some(lost) => Err(Error::internal(format!(
                "rank {} of {}: {lost}",
                self.rank.rank, self.rank.world_size
            ))),
            None => Ok(()),
        }
    }
}

impl StepSync<Cuda> for DataParallel {
    fn world_size(&self) -> usize {
        self.rank.world_size
    }

    fn sum_values(&mut self, values: &mut [f64]) -> Result<()> {
        self.check_peers()?;
        lock(&self.comm)?.all_reduce_sum_host(values)
    }

    fn micro_batch_starts(&mut self, backend: &mut Cuda, last: bool) -> Result<()> {
        self.summed = false;
        if last {
            self.check_peers()?;
            backend.arm_grad_sums();
        }
        Ok(())
    }

    fn backward_done(&mut self, backend: &mut Cuda) -> Result<()> {
        self.summed = backend.finish_grad_sums()?;
        Ok(())
    }

    fn update(
        &mut self,
        backend: &mut Cuda,
        tensors: &[(Range<usize>, bool)],
        opt: &OptimStep,
    ) -> Result<f64> {
        self.check_peers()?;
        if !self.summed {
            return Err(Error::internal(
                "data parallel: the step's gradients were not summed (overlap_gradients)",
            ));
        }
        match backend.optimizer_sharded() {
            true => backend.sharded_update(tensors, opt),
            false => clip_and_update(backend, tensors, opt),
        }
    }
}
