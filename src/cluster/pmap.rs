//! `pmap`: a dynamically balanced parallel map. The plan (which items go where, retries,
//! when it is done) is [`PmapPlan`]'s; this drives it: sends its batches, places the results
//! by index, and applies `on_error` to items that failed for good.

use std::any::Any;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::ids::Pid;
use crate::codec;
use crate::error::{Error, RemoteError, Result};
use crate::protocol::plan::{PmapPlan, Returned};
use crate::protocol::{Frame, Kind};
use crate::transport::tcp::corked;
use crate::registry::{self, BatchResults, RemoteFn};

use crate::protocol::failure::Failure;
use super::placed::Placed;
use super::slot::{self, Waiter};
use super::{Cluster, run_here};

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
    /// Defaults: automatic batch size, no retries, the first failure fails the map. (Work
    /// lost with a worker that died is no failure: it goes to the others, see
    /// [`Cluster::pmap`](crate::Cluster::pmap).)
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

pub(crate) fn run<F: RemoteFn>(cluster: &Cluster, _f: F, items: Vec<F::Args>, options: PmapOptions<F::Output>) -> Result<Vec<F::Output>> {
    let n = items.len();
    let pool = options.workers.clone().unwrap_or_else(|| cluster.workers());
    if pool.is_empty() {
        // No workers: run here, like Julia's pmap on a lone master.
        return items.into_iter().map(|a| run_here::<F>(cluster.my_id(), a)).collect();
    }
    let mut plan = PmapPlan::new(n, pool, options.batch_size.unwrap_or(0), options.retry_delays.clone(), Instant::now());
    let mut results = Placed::new(n);
    let (tx, rx) = crossbeam_channel::unbounded::<(u64, Result<Frame>)>();
    // on a serving thread, replies that other threads read ring this while it serves
    let bell = slot::pumping().map(|_| crossbeam_channel::bounded::<()>(1));
    let mut scratch = Vec::new();

    loop {
        // the batches there is room for, several to a write
        corked(|| -> Result<()> {
            while let Some(batch) = plan.next_batch(Instant::now()) {
                scratch.clear();
                scratch.extend(batch.items.iter().map(|&i| &items[i]));
                let waiter = Waiter::Queue { tx: tx.clone(), tag: batch.tag, bell: bell.as_ref().map(|(ring, _)| ring.clone()) };
                match cluster.send(Kind::Batch, batch.pid, F::ID, 16 * scratch.len(), |buf| codec::encode_into(&scratch, buf).map(|()| None), Some(waiter)) {
                    Ok(_) => {}
                    Err(Error::WorkerDied { .. } | Error::NoSuchWorker(_) | Error::Busy { .. }) => {
                        plan.drop_worker(batch.pid);
                        let unsent = plan.take(batch.tag).expect("just planned");
                        plan.unsent(unsent, Instant::now());
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })?;
        if plan.finished() {
            break;
        }
        if plan.stranded() {
            return Err(Error::Launch(format!("pmap: every worker died with {} items unfinished; add workers and run it again", results.missing())));
        }

        let Some(first) = next_completion(&rx, bell.as_ref().map(|(_, rung)| rung), plan.wake_at(), plan.outstanding() > 0)? else { continue };
        // every reply that is here already, before the batches they make room for
        for (tag, reply) in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            if let Some(batch) = plan.came_back(tag, Instant::now()) {
                settle(&mut plan, batch, reply, F::NAME, &options, &mut results)?;
            }
        }
    }
    Ok(results.into_vec())
}

/// Takes the reply to `batch` (or the error instead of it): places its values; failed items
/// and lost batches go to the plan, `on_error` or the caller.
fn settle<T: DeserializeOwned + Any>(plan: &mut PmapPlan, batch: Returned, reply: Result<Frame>, function: &str, options: &PmapOptions<T>, results: &mut Placed<T>) -> Result<()> {
    let outcome: Result<BatchResults<T>> = reply.and_then(|frame| match frame.header.kind {
        Kind::Reply => BatchResults::decode(frame.payload()),
        _ => Err(frame.decode::<Failure>()?.into()),
    });
    match outcome {
        Ok(returned) if returned.len() != batch.items.len() => {
            Err(Error::Protocol(format!("worker {} returned {} results for a batch of {}", batch.pid, returned.len(), batch.items.len())))
        }
        Ok(BatchResults::AllOk(values)) => {
            for (index, value) in batch.items.iter().copied().zip(values) {
                results.put(index, value);
            }
            Ok(())
        }
        Ok(BatchResults::Each(values)) => {
            for (index, value) in batch.items.iter().copied().zip(values) {
                match value {
                    Ok(v) => results.put(index, v),
                    Err(e) => {
                        let error = Error::Remote(RemoteError { pid: batch.pid, function: function.into(), message: e.message, location: e.location });
                        let alone = Returned { items: vec![index], ..batch.clone() };
                        failed(plan, alone, error, options, results)?;
                    }
                }
            }
            Ok(())
        }
        Err(error) => {
            if matches!(error, Error::WorkerDied { .. }) {
                tracing::warn!("pmap: worker {} died with a batch of {} items: {error}; they go to the others", batch.pid, batch.items.len());
                plan.drop_worker(batch.pid);
                if plan.lost(batch.clone(), Instant::now()) {
                    return Ok(());
                }
            }
            failed(plan, batch, error, options, results)
        }
    }
}

/// Schedules a retry, or applies `on_error`, or fails the map.
fn failed<R>(plan: &mut PmapPlan, batch: Returned, error: Error, options: &PmapOptions<R>, results: &mut Placed<R>) -> Result<()> {
    if plan.retry(batch.items.clone(), batch.attempts, Instant::now()) {
        return Ok(());
    }
    match &options.on_error {
        Some(handler) => {
            for i in batch.items {
                results.put(i, handler(&error));
            }
            Ok(())
        }
        None => Err(error),
    }
}

/// Waits for the next reply (until `wake_at`, if given). On a worker's serving thread it
/// keeps serving while it waits (replies may arrive on the connection it reads, or ring
/// `bell` when another thread reads them), retry delays included.
fn next_completion(rx: &crossbeam_channel::Receiver<(u64, Result<Frame>)>, bell: Option<&crossbeam_channel::Receiver<()>>, wake_at: Option<Instant>, expecting: bool) -> Result<Option<(u64, Result<Frame>)>> {
    if let (Some(pump), Some(bell)) = (slot::pumping(), bell) {
        loop {
            if let Ok(c) = rx.try_recv() {
                return Ok(Some(c));
            }
            if !expecting && wake_at.is_none() || wake_at.is_some_and(|t| Instant::now() >= t) {
                return Ok(None);
            }
            pump(wake_at, bell)?;
        }
    }
    crate::transport::io::needed(); // the replies come through the I/O runtime
    let received = match wake_at {
        Some(t) => rx.recv_deadline(t).ok(),
        None => rx.recv().ok(),
    };
    Ok(received)
}

/// Runs on a worker: `f` over a share of `map_reduce`'s items, folded with `op` (both named by
/// id; the call site typed them); the encoded `Option` of the folded value.
#[clusterman_macros::remote]
fn builtin_map_fold(f: u64, op: u64, items: Vec<u8>) -> std::result::Result<Vec<u8>, String> {
    let lookup = |id| registry::lookup(id).ok_or_else(|| format!("function {id:#018x} is not registered here"));
    let (f, op) = (lookup(f)?, lookup(op)?);
    let mut out = Vec::new();
    (f.fold)(&items, op, &mut out).map_err(|e| format!("{}: {}{}", f.name, e.message, e.location.map(|l| format!(" at {l}")).unwrap_or_default()))?;
    Ok(out)
}

/// [`Cluster::map_reduce`]: shares of about a quarter of `pmap`'s automatic batch (4 per
/// worker), each folded where it runs, the partial results folded here in order.
pub(crate) fn map_reduce<F, Op>(cluster: &Cluster, _f: F, items: Vec<F::Args>, _op: Op) -> Result<Option<F::Output>>
where
    F: RemoteFn,
    Op: RemoteFn<Args = (F::Output, F::Output), Output = F::Output>,
{
    let fold = |acc: Option<F::Output>, value: F::Output| -> Result<Option<F::Output>> {
        Ok(Some(match acc {
            None => value,
            Some(left) => Op::invoke((left, value)).map_err(|message| Error::Remote(RemoteError { pid: cluster.my_id(), function: Op::NAME.into(), message, location: None }))?,
        }))
    };
    let workers = cluster.workers().len();
    if workers == 0 {
        // no workers: all of it here, like pmap on a lone master
        let mut acc = None;
        for args in items {
            acc = fold(acc, run_here::<F>(cluster.my_id(), args)?)?;
        }
        return Ok(acc);
    }
    let share = items.len().div_ceil(workers * 4).max(1);
    let shares: Vec<(u64, u64, Vec<u8>)> = items.chunks(share).map(|c| Ok((F::ID, Op::ID, codec::encode(c)?))).collect::<Result<_>>()?;
    let partials = cluster.pmap_with(builtin_map_fold, shares, PmapOptions::new().batch_size(1))?;
    let mut acc = None;
    for partial in partials {
        if let Some(value) = codec::decode::<Option<F::Output>>(&partial)? {
            acc = fold(acc, value)?;
        }
    }
    Ok(acc)
}
