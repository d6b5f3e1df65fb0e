//! Dynamic batching: requests queue their token sequences; the model's own thread gathers
//! what has arrived into one forward pass, up to `max_batch` sequences or until the oldest
//! request has waited `max_wait`, and answers each request with its logits. Waiting pays
//! only when other requests are coming, so after a gather that found a lone request the
//! next one is scored at once, until a gather finds several again (concurrent clients):
//! a lone client does not pay the wait on every request. The queue is
//! bounded (in sequences), so that a flood of requests is refused instead of growing memory.

use super::metrics::Metrics;
use crate::backend::Batch;
use crate::error::Result;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// One encoded sequence: input ids and their token types.
pub type Sequence = (Vec<u32>, Vec<u8>);

/// The logits of a request's sequences in its order, or why the model failed on them.
pub type Reply = std::result::Result<Vec<f32>, String>;

/// Why a request was not queued.
#[derive(Debug, PartialEq)]
pub enum Refused {
    /// The queue holds too many sequences already: try again later.
    Full,
    /// The server is shutting down.
    Closed,
}

struct Job {
    sequences: Vec<Sequence>,
    reply: oneshot::Sender<Reply>,
    arrived: Instant,
}

struct Queue {
    jobs: VecDeque<Job>,
    pending: usize, // sequences in `jobs`
    closed: bool,
    /// The last gather took several requests or left some queued (and, before the first
    /// gather, the batching asked for): clients are concurrent, so the next gather waits
    /// (up to `max_wait`) for more.
    concurrent: bool,
}

pub struct Batcher {
    queue: Mutex<Queue>,
    arrived: Condvar,
    max_batch: usize,
    max_wait: Duration,
    capacity: usize, // sequences the queue may hold
}

impl Batcher {
    pub fn new(max_batch: usize, max_wait: Duration, capacity: usize) -> Batcher {
        Batcher {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                pending: 0,
                closed: false,
                concurrent: true,
            }),
            arrived: Condvar::new(),
            max_batch,
            max_wait,
            capacity,
        }
    }

    /// Queues a request's sequences; the receiver gets their logits.
    pub fn submit(
        &self,
        sequences: Vec<Sequence>,
    ) -> std::result::Result<oneshot::Receiver<Reply>, Refused> {
        let (reply, receiver) = oneshot::channel();
        let mut queue = lock(&self.queue);
        if queue.closed {
            return Err(Refused::Closed);
        }
        if queue.pending + sequences.len() > self.capacity {
            return Err(Refused::Full);
        }
        queue.pending += sequences.len();
        queue.jobs.push_back(Job {
            sequences,
            reply,
            arrived: Instant::now(),
        });
        drop(queue);
        self.arrived.notify_one();
        Ok(receiver)
    }

    /// Sequences waiting for the model.
    pub fn depth(&self) -> usize {
        lock(&self.queue).pending
    }

    /// Refuses new requests; the model thread answers those queued, then ends.
    pub fn close(&self) {
        lock(&self.queue).closed = true;
        self.arrived.notify_all();
    }

    /// The next gather of requests for the model: blocks until one has arrived, then (if the
    /// clients are concurrent) until `max_batch` sequences wait or the oldest has waited
    /// `max_wait`. None once closed and empty.
    fn gather(&self) -> Option<Vec<Job>> {
        let mut queue = lock(&self.queue);
        loop {
            match queue.jobs.front() {
                None if queue.closed => return None,
                None => queue = wait(&self.arrived, queue),
                Some(oldest) => {
                    let waited = oldest.arrived.elapsed();
                    if !queue.concurrent
                        || queue.pending >= self.max_batch
                        || queue.closed
                        || waited >= self.max_wait
                    {
                        break;
                    }
                    let rest = self.max_wait - waited;
                    queue = match self.arrived.wait_timeout(queue, rest) {
                        Ok((guard, _)) => guard,
                        Err(poisoned) => poisoned.into_inner().0,
                    };
                }
            }
        }
        // Whole requests in arrival order up to max_batch sequences; a larger request alone
        // (`run` splits it into forwards of max_batch).
        let mut jobs = Vec::new();
        let mut taken = 0;
        while let Some(next) = queue.jobs.front() {
            let n = next.sequences.len();
            if taken > 0 && taken + n > self.max_batch {
                break;
            }
            taken += n;
            jobs.extend(queue.jobs.pop_front());
        }
        queue.pending -= taken;
        queue.concurrent = jobs.len() > 1 || !queue.jobs.is_empty();
        Some(jobs)
    }
}

/// A model's evaluation forward on whichever backend it lives: the logits of a batch.
pub type Forward<'a> = dyn FnMut(&Batch) -> Result<Vec<f32>> + 'a;

/// The model thread: gathers requests, scores them with `forward`, answers, until the
/// batcher is closed and empty.
pub fn run(batcher: &Batcher, forward: &mut Forward<'_>, pad_id: u32, metrics: &Metrics) {
    while let Some(jobs) = batcher.gather() {
        // (job, position in the job) of every sequence, shortest first, cut into forwards
        // of neighbouring lengths, so that each pads little.
        let mut order: Vec<(usize, usize)> = jobs
            .iter()
            .enumerate()
            .flat_map(|(j, job)| (0..job.sequences.len()).map(move |s| (j, s)))
            .collect();
        order.sort_by_key(|&(j, s)| jobs[j].sequences[s].0.len());
        let lengths: Vec<usize> = order
            .iter()
            .map(|&(j, s)| jobs[j].sequences[s].0.len())
            .collect();
        let mut logits: Vec<Vec<f32>> = jobs
            .iter()
            .map(|job| vec![0.0; job.sequences.len()])
            .collect();
        let mut failure = None;
        for range in forwards(&lengths, batcher.max_batch) {
            let chunk = &order[range];
            let batch = Batch::from_sequences(
                chunk.iter().map(|&(j, s)| {
                    let (ids, types) = &jobs[j].sequences[s];
                    (&ids[..], &types[..])
                }),
                pad_id,
            );
            // A panic in the model must not leave the queue unanswered forever.
            let started = Instant::now();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| forward(&batch)));
            match result {
                Ok(Ok(out)) => {
                    metrics.record_forward(chunk.len(), started.elapsed());
                    for (&(j, s), value) in chunk.iter().zip(out) {
                        logits[j][s] = value;
                    }
                }
                Ok(Err(e)) => failure = Some(e.to_string()),
                Err(_) => failure = Some("the model panicked on this batch".to_string()),
            }
            if failure.is_some() {
                break;
            }
        }
        for (job, values) in jobs.into_iter().zip(logits) {
            let reply = match &failure {
                Some(why) => Err(why.clone()),
                None => Ok(values),
            };
            // The client may have gone away: nothing to answer then.
            let _ = job.reply.send(reply);
        }
    }
}

/// A forward's fixed cost (launches, the weights' packing, its buffers) in tokens of work:
/// measured on the CPU (examples/serve_forward.rs), a forward of one 60-token sequence
/// takes as long as about 160 tokens inside a large batch.
const FORWARD_COST_TOKENS: usize = 100;

/// Cuts sequences sorted by length (ascending) into forwards: consecutive runs of at most
/// `max_batch`, chosen to minimise the work Σ (FORWARD_COST_TOKENS + sequences × longest),
/// a forward's cost being its padded tokens plus its fixed cost. Mixed lengths (the K
/// completions of a ranking) cost less as several forwards than padded together, and a
/// forward of one or two sequences only pays where their length sets them far apart.
fn forwards(lengths: &[usize], max_batch: usize) -> Vec<std::ops::Range<usize>> {
    let n = lengths.len();
    // best[i]: the least work for the first i sequences, and where its last run starts.
    let mut best: Vec<(usize, usize)> = vec![(0, 0); n + 1];
    for end in 1..=n {
        best[end] = (1..=max_batch.max(1).min(end))
            .map(|count| {
                let start = end - count;
                let work = best[start].0 + FORWARD_COST_TOKENS + count * lengths[end - 1];
                (work, start)
            })
            .min()
            .unwrap_or((0, 0));
    }
    let mut runs = Vec::new();
    let mut end = n;
    while end > 0 {
        let start = best[end].1;
        runs.push(start..end);
        end = start;
    }
    runs.reverse();
    runs
}

/// The queue survives a panicking holder: its state is updated in whole steps.
fn lock(queue: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    queue
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn wait<'a>(
    condvar: &Condvar,
    guard: std::sync::MutexGuard<'a, Queue>,
) -> std::sync::MutexGuard<'a, Queue> {
    condvar
        .wait(guard)
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_refuses_and_a_closed_one_too() {
        let batcher = Batcher::new(4, Duration::from_millis(1), 3);
        let seq = || (vec![1u32, 2], vec![0u8, 0]);
        let _first = batcher.submit(vec![seq(), seq()]).unwrap();
        assert_eq!(batcher.depth(), 2);
        assert_eq!(
            batcher.submit(vec![seq(), seq()]).unwrap_err(),
            Refused::Full
        );
        let _second = batcher.submit(vec![seq()]).unwrap();
        batcher.close();
        assert_eq!(batcher.submit(vec![seq()]).unwrap_err(), Refused::Closed);
    }

    #[test]
    fn forwards_minimise_padded_tokens_plus_a_fixed_cost_each() {
        let whole = |n| std::ops::Range { start: 0, end: n };
        // Equal lengths: only max_batch cuts (the first run the shortest, ties to the
        // earliest start).
        assert_eq!(forwards(&[10; 5], 2), [0..1, 1..3, 3..5]);
        assert_eq!(forwards(&[10; 5], 8), [whole(5)]);
        // 10, 11, 12 and 40, 41: one forward pads to 5 x 41 = 205 tokens + 100; two cost
        // 3 x 12 + 100 + 2 x 41 + 100 = 318: one.
        assert_eq!(forwards(&[10, 11, 12, 40, 41], 8), [whole(5)]);
        // Eight short and eight long: 16 x 400 + 100 against 8 x 20 + 8 x 400 + 200.
        let lengths: Vec<usize> = [[20; 8], [400; 8]].concat();
        assert_eq!(forwards(&lengths, 64), [0..8, 8..16]);
        // A long one alone only where its padding outweighs a forward's fixed cost.
        assert_eq!(forwards(&[1, 1, 1, 300], 8), [0..3, 3..4]);
        assert_eq!(forwards(&[7], 8), [whole(1)]);
        assert!(forwards(&[], 8).is_empty());
        // Every run within max_batch, the runs covering the sequences in order.
        let lengths: Vec<usize> = (0..100).map(|i| 20 + i * i % 140).collect();
        let mut sorted = lengths.clone();
        sorted.sort();
        let runs = forwards(&sorted, 16);
        assert!(runs.iter().all(|r| !r.is_empty() && r.len() <= 16));
        assert!(runs.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!((runs[0].start, runs[runs.len() - 1].end), (0, 100));
    }

    #[test]
    fn a_lone_client_is_not_kept_waiting_and_concurrent_ones_are_gathered() {
        let wait = Duration::from_millis(200);
        let batcher = Batcher::new(8, wait, 100);
        let seq = || (vec![1u32], vec![0u8]);
        let gather_alone = |batcher: &Batcher| {
            let _job = batcher.submit(vec![seq()]).unwrap();
            let started = Instant::now();
            assert_eq!(batcher.gather().unwrap().len(), 1);
            started.elapsed()
        };
        // Before any traffic the batching asked for holds: the first request waits.
        assert!(gather_alone(&batcher) >= wait);
        // It was alone: the next lone request is taken at once.
        assert!(gather_alone(&batcher) < wait / 2);
        // Two requests in one gather: concurrent clients, so the next gather waits for
        // max_wait (a second request never comes), and the one after it not.
        let (_b, _c) = (batcher.submit(vec![seq()]), batcher.submit(vec![seq()]));
        assert_eq!(batcher.gather().unwrap().len(), 2);
        assert!(gather_alone(&batcher) >= wait);
        assert!(gather_alone(&batcher) < wait / 2);
    }

    #[test]
    fn a_gather_takes_whole_requests_up_to_max_batch() {
        let batcher = Batcher::new(4, Duration::ZERO, 100);
        let seq = || (vec![1u32], vec![0u8]);
        let _a = batcher.submit(vec![seq(), seq(), seq()]).unwrap();
        let _b = batcher.submit(vec![seq(), seq()]).unwrap();
        let _c = batcher.submit(vec![seq(); 6]).unwrap();
        let sizes = |jobs: Vec<Job>| jobs.iter().map(|j| j.sequences.len()).collect::<Vec<_>>();
        // 3 + 2 > 4: b waits for the next gather; c, larger than max_batch, goes alone.
        assert_eq!(sizes(batcher.gather().unwrap()), [3]);
        assert_eq!(sizes(batcher.gather().unwrap()), [2]);
        assert_eq!(sizes(batcher.gather().unwrap()), [6]);
        assert_eq!(batcher.depth(), 0);
        batcher.close();
        assert!(batcher.gather().is_none());
    }
}
