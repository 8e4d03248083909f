//! `pmap`: a dynamically balanced parallel map. Items travel in batches; each worker has up
//! to two batches in flight so it never waits for the next one; results are placed by index.
//! A failed item is retried alone after the next delay of `retry_delays`; a batch lost with
//! its worker is retried whole on the others.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::ids::Pid;
use crate::codec;
use crate::error::{Error, RemoteError, Result};
use crate::protocol::{Frame, Kind};
use crate::registry::{CallError, RemoteFn};

use super::failure::Failure;
use super::slot::{self, Waiter};
use super::{Cluster, run_here};

/// Batches in flight per worker: one running, one queued behind it.
const IN_FLIGHT: usize = 2;

/// Supplies a result for an item that failed for good.
type ErrorHandler<R> = Box<dyn Fn(&Error) -> R + Send + Sync>;

/// Options for [`Cluster::pmap_with`].
pub struct PmapOptions<R> {
    batch_size: Option<usize>,
    retry_delays: Vec<Duration>,
    on_error: Option<ErrorHandler<R>>,
    workers: Option<Vec<Pid>>,
}

impl<R> std::fmt::Debug for PmapOptions<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PmapOptions")
            .field("batch_size", &self.batch_size)
            .field("retry_delays", &self.retry_delays)
            .field("on_error", &self.on_error.is_some())
            .field("workers", &self.workers)
            .finish()
    }
}

impl<R> Default for PmapOptions<R> {
    fn default() -> Self {
        PmapOptions { batch_size: None, retry_delays: Vec::new(), on_error: None, workers: None }
    }
}

impl<R> PmapOptions<R> {
    /// Defaults: automatic batch size, no retries, the first failure fails the map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Items per message. Default: enough batches for about 8 per worker, at most 1024
    /// items each, so small items are cheap and the load still balances.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = Some(n.max(1));
        self
    }

    /// Retry a failed item (or a batch lost with its worker) after each of these delays in
    /// turn; when they run out the failure is final.
    pub fn retry_delays(mut self, delays: impl IntoIterator<Item = Duration>) -> Self {
        self.retry_delays = delays.into_iter().collect();
        self
    }

    /// For an item that failed for good, use `f(&error)` as its result instead of failing
    /// the whole map.
    pub fn on_error(mut self, f: impl Fn(&Error) -> R + Send + Sync + 'static) -> Self {
        self.on_error = Some(Box::new(f));
        self
    }

    /// Use only these workers (default: all of them).
    pub fn workers(mut self, pids: Vec<Pid>) -> Self {
        self.workers = Some(pids);
        self
    }
}

/// `n` delays growing from `first` by `factor`, capped at `max` (like Julia's
/// `ExponentialBackOff` without jitter).
pub fn exponential_backoff(n: usize, first: Duration, factor: f64, max: Duration) -> Vec<Duration> {
    std::iter::successors(Some(first), |d| Some(d.mul_f64(factor).min(max))).take(n).collect()
}

struct Job {
    items: Vec<usize>,
    attempts: usize,
    not_before: Instant,
}

pub(crate) fn run<F: RemoteFn>(cluster: &Cluster, _f: F, items: Vec<F::Args>, options: PmapOptions<F::Output>) -> Result<Vec<F::Output>> {
    let n = items.len();
    let mut pool = options.workers.clone().unwrap_or_else(|| cluster.workers());
    if pool.is_empty() {
        // No workers: run here, like Julia's pmap on a lone master.
        return items.into_iter().map(|a| run_here::<F>(cluster.my_id(), a)).collect();
    }
    let batch = options.batch_size.unwrap_or_else(|| n.div_ceil(pool.len() * 8).clamp(1, 1024));
    let now = Instant::now();
    let mut queue: VecDeque<Job> = (0..n).step_by(batch).map(|s| Job { items: (s..(s + batch).min(n)).collect(), attempts: 0, not_before: now }).collect();
    let mut delayed: Vec<Job> = Vec::new();
    let mut results: Vec<Option<F::Output>> = (0..n).map(|_| None).collect();
    let mut in_flight: HashMap<u64, (Pid, Job)> = HashMap::new();
    let mut load: HashMap<Pid, usize> = pool.iter().map(|p| (*p, 0)).collect();
    let (tx, rx) = crossbeam_channel::unbounded::<(u64, Result<Frame>)>();
    let mut next_tag = 0u64;
    let mut scratch = Vec::new();

    loop {
        let now = Instant::now();
        let (ready, later): (Vec<Job>, Vec<Job>) = std::mem::take(&mut delayed).into_iter().partition(|j| j.not_before <= now);
        queue.extend(ready);
        delayed = later;

        // Fill every live worker up to IN_FLIGHT batches.
        'fill: while !queue.is_empty() {
            let Some(&pid) = pool.iter().filter(|p| load[p] < IN_FLIGHT).min_by_key(|p| load[p]) else { break };
            let job = queue.pop_front().expect("queue is not empty");
            scratch.clear();
            scratch.extend(job.items.iter().map(|&i| &items[i]));
            let tag = next_tag;
            next_tag += 1;
            let waiter = Waiter::Queue { tx: tx.clone(), tag };
            match cluster.send(Kind::Batch, pid, F::ID, 16 * scratch.len(), |buf| codec::encode_into(&scratch, buf), Some(waiter)) {
                Ok(_) => {
                    *load.get_mut(&pid).expect("pid in pool") += 1;
                    in_flight.insert(tag, (pid, job));
                }
                Err(Error::WorkerDied { .. } | Error::NoSuchWorker(_) | Error::Busy { .. }) => {
                    pool.retain(|p| *p != pid);
                    queue.push_front(job);
                    if pool.is_empty() {
                        break 'fill;
                    }
                }
                Err(e) => return Err(e),
            }
        }

        if in_flight.is_empty() {
            if queue.is_empty() && delayed.is_empty() {
                break;
            }
            if pool.is_empty() {
                return Err(Error::Launch(format!("pmap: every worker died with {} items unfinished; add workers and run it again", results.iter().filter(|r| r.is_none()).count())));
            }
        }

        let wake_at = delayed.iter().map(|j| j.not_before).min();
        let Some((tag, reply)) = next_completion(&rx, wake_at, !in_flight.is_empty())? else { continue };
        let Some((pid, job)) = in_flight.remove(&tag) else { continue };
        *load.get_mut(&pid).expect("pid in pool") -= 1;

        let outcome: Result<Vec<Result<F::Output, CallError>>> = reply.and_then(|frame| match frame.header.kind {
            Kind::Reply => codec::decode(frame.payload()),
            _ => Err(codec::decode::<Failure>(frame.payload())?.into()),
        });
        match outcome {
            Ok(values) => {
                if values.len() != job.items.len() {
                    return Err(Error::Protocol(format!("worker {pid} returned {} results for a batch of {}", values.len(), job.items.len())));
                }
                for (index, value) in job.items.iter().copied().zip(values) {
                    match value {
                        Ok(v) => results[index] = Some(v),
                        Err(e) => {
                            let error = Error::Remote(RemoteError { pid, function: F::NAME.into(), message: e.message, location: e.location });
                            let retry = Job { items: vec![index], attempts: job.attempts, not_before: now };
                            failed(retry, error, &options, &mut delayed, &mut results)?;
                        }
                    }
                }
            }
            Err(error) => {
                if matches!(error, Error::WorkerDied { .. }) {
                    tracing::warn!("pmap: worker {pid} died with a batch of {} items: {error}", job.items.len());
                    pool.retain(|p| *p != pid);
                }
                failed(job, error, &options, &mut delayed, &mut results)?;
            }
        }
    }
    Ok(results.into_iter().map(|r| r.expect("every item has a result")).collect())
}

/// Schedules a retry, or applies `on_error`, or fails the map.
fn failed<R>(mut job: Job, error: Error, options: &PmapOptions<R>, delayed: &mut Vec<Job>, results: &mut [Option<R>]) -> Result<()> {
    if let Some(delay) = options.retry_delays.get(job.attempts) {
        job.attempts += 1;
        job.not_before = Instant::now() + *delay;
        delayed.push(job);
        return Ok(());
    }
    match &options.on_error {
        Some(handler) => {
            for i in job.items {
                results[i] = Some(handler(&error));
            }
            Ok(())
        }
        None => Err(error),
    }
}

/// Waits for the next reply (until `wake_at`, if given). On a worker's serving thread it
/// keeps serving while it waits, since replies arrive on that same connection.
fn next_completion(rx: &crossbeam_channel::Receiver<(u64, Result<Frame>)>, wake_at: Option<Instant>, expecting: bool) -> Result<Option<(u64, Result<Frame>)>> {
    if let Some(pump) = slot::pumping() {
        loop {
            if let Ok(c) = rx.try_recv() {
                return Ok(Some(c));
            }
            if !expecting {
                if let Some(t) = wake_at {
                    std::thread::sleep(t.saturating_duration_since(Instant::now()));
                }
                return Ok(None);
            }
            pump(wake_at)?;
            if wake_at.is_some_and(|t| Instant::now() >= t) {
                return Ok(None);
            }
        }
    }
    let received = match wake_at {
        Some(t) => rx.recv_deadline(t).ok(),
        None => rx.recv().ok(),
    };
    Ok(received)
}
