//! Gradient buckets: a data-parallel rank starts summing its gradients with the other
//! ranks' while its backward still runs (docs/scaling.md section 1, "Buckets").
//!
//! The gradients live in one arena in the parameter layout's order (embeddings, layer 0 ...
//! layer L-1, head) and the backward finishes them from the end of that order to its start.
//! After each layer the model says which range of the arena is final (`grads_final`); the
//! plan gathers adjacent final ranges into a bucket until it holds `min_len` elements
//! (PyTorch DDP's bucket_cap_mb, `bucket_mb` in the config), then the bucket's sum starts
//! on the communicator's side stream while the compute stream goes on with the layers
//! below. What no layer announced (the embeddings, the head, tensors that several layers
//! share) is summed when the backward ends. Buckets are ranges of the arena itself, summed
//! in place: no packing copy.
//!
//! Plain data parallelism all-reduces each bucket. Under ZeRO-1 rank r needs only its
//! shard's sum, so a bucket is reduced (ncclReduce) to the owner of each shard it crosses,
//! and the tail that every rank owns is all-reduced: the bytes of a reduce-scatter, in
//! buckets.
//!
//! Only the last micro-batch of a step arms the plan: the earlier ones add into the arena
//! locally. Every rank makes the same calls in the same order, as NCCL requires, because
//! every rank runs the same model over the same layout.

use std::ops::Range;

use super::backend::Cuda;
use super::zero::{SharedCommunicator, lock};
use crate::error::{Error, Result};

/// One sum over the ranks of a range of the gradient arena.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BucketSum {
    /// Every rank gets the sum (ncclAllReduce).
    All(Range<usize>),
    /// Only `root` gets the sum (ncclReduce); the range lies in its ZeRO-1 shard.
    To(Range<usize>, usize),
}

/// Which rank owns which part of the arena under ZeRO-1: `world_size` shards of `shard`
/// elements, then a tail every rank owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owners {
    pub world_size: usize,
    pub shard: usize,
}

/// The plan of one step's buckets over an arena of `total` elements.
#[derive(Debug)]
pub struct GradBuckets {
    total: usize,
    min_len: usize,
    /// Set by `arm` for the step's last backward; None otherwise (ZeRO-1's owners inside).
    armed: Option<Option<Owners>>,
    /// Final, adjacent ranges not summed yet.
    pending: Option<Range<usize>>,
    /// Ranges whose sums have started this step.
    started: Vec<Range<usize>>,
}

impl GradBuckets {
    pub fn new(total: usize, min_len: usize) -> GradBuckets {
        GradBuckets {
            total,
            min_len,
            armed: None,
            pending: None,
            started: Vec::new(),
        }
    }

    /// The next backward is the step's last: from now on final ranges are summed.
    pub fn arm(&mut self, owners: Option<Owners>) {
        self.armed = Some(owners);
        self.pending = None;
        self.started.clear();
    }

    pub fn armed(&self) -> bool {
        self.armed.is_some()
    }

    /// `range` of the arena is final: the sums to start now (none while unarmed, or while
    /// the bucket is smaller than `min_len`).
    pub fn finished(&mut self, range: Range<usize>) -> Result<Vec<BucketSum>> {
        let Some(owners) = self.armed else {
            return Ok(Vec::new());
        };
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let overlaps = |r: &Range<usize>| r.start < range.end && range.start < r.end;
        if range.end > self.total
            || self.started.iter().any(overlaps)
            || self.pending.as_ref().is_some_and(overlaps)
        {
            return Err(Error::internal(format!(
                "gradient buckets: {range:?} was announced final twice or lies outside the \
                 {} gradients",
                self.total
            )));
        }
        let mut sums = Vec::new();
        self.pending = match self.pending.take() {
            Some(p) if p.start == range.end => Some(range.start..p.end),
            Some(p) if p.end == range.start => Some(p.start..range.end),
            Some(p) => {
                sums.extend(self.start(p, owners));
                Some(range)
            }
            None => Some(range),
        };
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.len() >= self.min_len)
        {
            let full = self.pending.take().unwrap_or_default();
            sums.extend(self.start(full, owners));
        }
        Ok(sums)
    }

    /// The backward has ended: the sums of everything not started yet (the pending bucket,
    /// then the gaps between the started ones in arena order). Disarms the plan.
    pub fn finish(&mut self) -> Vec<BucketSum> {
        let Some(owners) = self.armed.take() else {
            return Vec::new();
        };
        let mut sums = Vec::new();
        if let Some(p) = self.pending.take() {
            sums.extend(self.start(p, owners));
        }
        let mut done = std::mem::take(&mut self.started);
        done.sort_by_key(|r| r.start);
        let mut at = 0;
        for r in done
            .iter()
            .chain(std::iter::once(&(self.total..self.total)))
        {
            if at < r.start {
                sums.extend(split(at..r.start, owners, self.total));
            }
            at = at.max(r.end);
        }
        sums
    }

    fn start(&mut self, range: Range<usize>, owners: Option<Owners>) -> Vec<BucketSum> {
        self.started.push(range.clone());
        split(range, owners, self.total)
    }
}

/// The sums of `range`: one all-reduce, or under ZeRO-1 one reduce per owner it crosses
/// and an all-reduce of its part of the tail.
fn split(range: Range<usize>, owners: Option<Owners>, total: usize) -> Vec<BucketSum> {
    let Some(Owners { world_size, shard }) = owners else {
        return vec![BucketSum::All(range)];
    };
    let cut = |part: Range<usize>| range.start.max(part.start)..range.end.min(part.end);
    let mut sums: Vec<BucketSum> = (0..world_size)
        .map(|r| (cut(r * shard..(r + 1) * shard), r))
        .filter(|(part, _)| !part.is_empty())
        .map(|(part, r)| BucketSum::To(part, r))
        .collect();
    let tail = cut(world_size * shard..total);
    if !tail.is_empty() {
        sums.push(BucketSum::All(tail));
    }
    sums
}

/// A backend's buckets and the communicator they are summed over.
pub struct GradSync {
    plan: GradBuckets,
    comm: SharedCommunicator,
}

impl Cuda {
    /// From now on the step's last backward sums its gradients over `comm`'s ranks in
    /// buckets of at least `min_len` elements while it runs (`arm_grad_sums` each step).
    pub fn overlap_grad_sums(&mut self, comm: SharedCommunicator, min_len: usize) -> Result<()> {
        self.training()?;
        self.grad_sync = Some(GradSync {
            plan: GradBuckets::new(self.grads.len(), min_len.max(1)),
            comm,
        });
        Ok(())
    }

    /// The next backward is the step's last: its final gradients are summed as they come.
    pub fn arm_grad_sums(&mut self) {
        let owners = self.optimizer_shard.as_ref().map(|s| s.owners());
        if let Some(sync) = &mut self.grad_sync {
            sync.plan.arm(owners);
        }
    }

    /// `range` of the gradient arena is final (`Backend::grads_final`).
    pub(super) fn start_grad_sums(&mut self, range: Range<usize>) -> Result<()> {
        let Some(sync) = &mut self.grad_sync else {
            return Ok(());
        };
        let sums = sync.plan.finished(range)?;
        run_sums(&sync.comm, &mut self.grads, sums, false)
    }

    /// The end of the step's backward: sums what is left and waits for every bucket.
    /// Returns whether the gradients were summed (false unless `arm_grad_sums` armed them).
    pub fn finish_grad_sums(&mut self) -> Result<bool> {
        let Some(sync) = self.grad_sync.as_mut().filter(|s| s.plan.armed()) else {
            return Ok(false);
        };
        let sums = sync.plan.finish();
        run_sums(&sync.comm, &mut self.grads, sums, true)?;
        Ok(true)
    }
}

fn run_sums(
    comm: &SharedCommunicator,
    grads: &mut cudarc::driver::CudaSlice<f32>,
    sums: Vec<BucketSum>,
    wait: bool,
) -> Result<()> {
    if sums.is_empty() && !wait {
        return Ok(());
    }
    let mut comm = lock(comm)?;
    for sum in sums {
        match sum {
            BucketSum::All(range) => comm.start_sum(grads, range, None)?,
            BucketSum::To(range, root) => comm.start_sum(grads, range, Some(root))?,
        }
    }
    if wait {
        comm.wait_started()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element of 0..total summed exactly once over `sums`, per owner under ZeRO-1.
    fn covers_once(sums: &[BucketSum], total: usize) -> bool {
        let mut count = vec![0; total];
        for s in sums {
            let (BucketSum::All(r) | BucketSum::To(r, _)) = s;
            for c in &mut count[r.clone()] {
                *c += 1;
            }
        }
        count.iter().all(|&c| c == 1)
    }

    /// A BERT-like arena: embeddings [0, 100), layers of 30 at 100, 130, 160, head [190, 200).
    fn layers() -> Vec<Range<usize>> {
        vec![160..190, 130..160, 100..130]
    }

    #[test]
    fn each_layer_starts_its_sum_as_soon_as_it_is_final() {
        let mut plan = GradBuckets::new(200, 30);
        plan.arm(None);
        for layer in layers() {
            assert_eq!(
                plan.finished(layer.clone()).unwrap(),
                [BucketSum::All(layer)]
            );
        }
        let rest = plan.finish();
        assert_eq!(rest, [BucketSum::All(0..100), BucketSum::All(190..200)]);
        let mut all = rest;
        all.extend(layers().into_iter().map(BucketSum::All));
        assert!(covers_once(&all, 200));
        assert!(!plan.armed());
    }

    #[test]
    fn small_layers_gather_into_one_bucket() {
        let mut plan = GradBuckets::new(200, 60);
        plan.arm(None);
        let mut sums = Vec::new();
        for layer in layers() {
            sums.push(plan.finished(layer).unwrap());
        }
        // Layers 2 and 1 make 60 elements; layer 0 waits for the end.
        assert_eq!(sums[0], []);
        assert_eq!(sums[1], [BucketSum::All(130..190)]);
        assert_eq!(sums[2], []);
        let rest = plan.finish();
        assert_eq!(
            rest,
            [
                BucketSum::All(100..130),
                BucketSum::All(0..100),
                BucketSum::All(190..200)
            ]
        );
        let mut all = rest;
        all.extend(sums.concat());
        assert!(covers_once(&all, 200));
    }

    #[test]
    fn zero_1_reduces_each_part_to_its_owner_and_all_reduces_the_tail() {
        // 3 ranks of 66 elements each own [0, 66), [66, 132), [132, 198); tail [198, 200).
        let owners = Owners {
            world_size: 3,
            shard: 66,
        };
        let mut plan = GradBuckets::new(200, 1);
        plan.arm(Some(owners));
        let mut all = Vec::new();
        for layer in layers() {
            all.extend(plan.finished(layer).unwrap());
        }
        assert_eq!(
            all,
            [
                BucketSum::To(160..190, 2),
                BucketSum::To(130..132, 1),
                BucketSum::To(132..160, 2),
                BucketSum::To(100..130, 1),
            ]
        );
        all.extend(plan.finish());
        assert!(covers_once(&all, 200));
        assert!(all.contains(&BucketSum::All(198..200)));
        for s in &all {
            if let BucketSum::To(r, owner) = s {
                assert!(r.start >= owner * 66 && r.end <= (owner + 1) * 66, "{s:?}");
            }
        }
    }

    #[test]
    fn an_unarmed_plan_sums_nothing() {
        let mut plan = GradBuckets::new(200, 1);
        assert_eq!(plan.finished(160..190).unwrap(), []);
        assert_eq!(plan.finish(), []);
    }

    #[test]
    fn a_range_announced_twice_or_outside_is_an_error() {
        let mut plan = GradBuckets::new(200, 1000);
        plan.arm(None);
        plan.finished(160..190).unwrap();
        assert!(plan.finished(170..175).is_err());
        assert!(plan.finished(190..210).is_err());
        // A new step starts clean.
        plan.arm(None);
        assert_eq!(plan.finished(160..190).unwrap(), []);
    }
}
