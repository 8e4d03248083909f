//! The `pmap` planner, without I/O and without a clock: which items go to which worker in
//! which batch, when a failed item or a lost batch is tried again, and when the map is done.
//! The driver sends what it is told, reports what came back, and keeps the values.
//!
//! Items travel in batches; each worker has [`IN_FLIGHT`] batches out, so it never waits for
//! the next one, and more while its batches come back quickly: as many as it finishes in
//! [`QUEUE_AHEAD`] (at most [`MAX_IN_FLIGHT`]). Cheap items then hide the round trip, while
//! a worker never holds more than about that much work that another could have taken. A
//! failed item is retried alone after the next of the retry
//! delays; when the delays run out, the driver decides (an `on_error` value, or the map
//! fails). A batch lost with its worker is no fault of its items: it goes whole to the
//! others at once, up to [`MAX_LOSSES`] times (a batch that kills every worker it meets
//! then falls under the retry delays).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::ids::Pid;

/// Batches out per worker at least: one running, one queued behind it.
pub const IN_FLIGHT: usize = 2;

/// Batches out per worker at most, however quickly they come back (a round trip here can take
/// a few hundred microseconds of wake-ups, over which items of a few microseconds must last).
pub const MAX_IN_FLIGHT: usize = 256;

/// How much work (in time, as measured) a worker may have queued ahead of what it runs.
pub const QUEUE_AHEAD: Duration = Duration::from_millis(1);

/// Workers a batch may lose (die while holding it) before its loss counts as its failure.
pub const MAX_LOSSES: usize = 3;

#[derive(Debug, Clone)]
struct Job {
    items: Vec<usize>,
    attempts: usize,
    losses: usize,
    not_before: Instant,
}

/// How fast a worker goes through its batches.
#[derive(Debug, Default, Clone, Copy)]
struct Pace {
    /// When its last batch came back.
    last_return: Option<Instant>,
    /// Time per batch, smoothed: from its last return to this one while it was kept busy
    /// (its batches' own work), from send to return otherwise.
    per_batch: Option<Duration>,
}

impl Pace {
    /// Batches this worker may have out.
    fn depth(&self) -> usize {
        match self.per_batch {
            Some(t) if !t.is_zero() => ((QUEUE_AHEAD.as_nanos() / t.as_nanos()) as usize).clamp(IN_FLIGHT, MAX_IN_FLIGHT),
            Some(_) => MAX_IN_FLIGHT,
            None => IN_FLIGHT,
        }
    }

    /// A batch sent at `sent` came back at `now`.
    fn returned(&mut self, sent: Instant, now: Instant) {
        let start = self.last_return.map_or(sent, |last| last.max(sent));
        let sample = now.saturating_duration_since(start);
        self.per_batch = Some(self.per_batch.map_or(sample, |old| (old * 3 + sample) / 4));
        self.last_return = Some(now);
    }
}

/// A batch to send now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Names the batch when it comes back.
    pub tag: u64,
    /// The worker to send it to.
    pub pid: Pid,
    /// Indices of the items in it, ascending.
    pub items: Vec<usize>,
}

/// A batch that came back (or was lost), taken out of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Returned {
    /// The worker it went to.
    pub pid: Pid,
    /// Its items.
    pub items: Vec<usize>,
    /// Tries so far (0: the first).
    pub attempts: usize,
    /// Workers it was lost with so far.
    pub losses: usize,
}

/// The plan of one map.
#[derive(Debug)]
pub struct PmapPlan {
    pool: Vec<Pid>,
    load: HashMap<Pid, usize>,
    pace: HashMap<Pid, Pace>,
    queue: VecDeque<Job>,
    delayed: Vec<Job>,
    /// Batches out: their worker, their job, when they were sent.
    out: HashMap<u64, (Pid, Job, Instant)>,
    next_tag: u64,
    retry_delays: Vec<Duration>,
}

impl PmapPlan {
    /// `n` items over `pool`, `batch` items per message (0: about 8 batches per worker, at
    /// most 1024 items each), retried after each of `retry_delays` in turn.
    pub fn new(n: usize, pool: Vec<Pid>, batch: usize, retry_delays: Vec<Duration>, now: Instant) -> Self {
        let batch = if batch == 0 { n.div_ceil(pool.len().max(1) * 8).clamp(1, 1024) } else { batch };
        let queue = (0..n).step_by(batch).map(|s| Job { items: (s..(s + batch).min(n)).collect(), attempts: 0, losses: 0, not_before: now }).collect();
        let load = pool.iter().map(|p| (*p, 0)).collect();
        PmapPlan { pool, load, pace: HashMap::new(), queue, delayed: Vec::new(), out: HashMap::new(), next_tag: 0, retry_delays }
    }

    /// The next batch to send at `now`, to the least loaded worker with room (see
    /// [`QUEUE_AHEAD`]); `None` when nothing can go now.
    pub fn next_batch(&mut self, now: Instant) -> Option<Batch> {
        let (ready, later): (Vec<Job>, Vec<Job>) = std::mem::take(&mut self.delayed).into_iter().partition(|j| j.not_before <= now);
        self.queue.extend(ready);
        self.delayed = later;
        let depth = |p: &Pid| self.pace.get(p).map_or(IN_FLIGHT, Pace::depth);
        let pid = *self.pool.iter().filter(|p| self.load[p] < depth(p)).min_by_key(|p| self.load[p])?;
        let job = self.queue.pop_front()?;
        let tag = self.next_tag;
        self.next_tag += 1;
        *self.load.get_mut(&pid).expect("pid in pool") += 1;
        let items = job.items.clone();
        self.out.insert(tag, (pid, job, now));
        Some(Batch { tag, pid, items })
    }

    /// The batch `tag` came back at `now`: out of the plan, its time counted in its worker's
    /// pace. `None` if unknown (taken).
    pub fn came_back(&mut self, tag: u64, now: Instant) -> Option<Returned> {
        let sent = self.out.get(&tag)?.2;
        let returned = self.take(tag)?;
        if self.load.contains_key(&returned.pid) {
            self.pace.entry(returned.pid).or_default().returned(sent, now);
        }
        Some(returned)
    }

    /// The batch `tag` was not sent or was lost: out of the plan. `None` if unknown (taken).
    pub fn take(&mut self, tag: u64) -> Option<Returned> {
        let (pid, job, _) = self.out.remove(&tag)?;
        if let Some(load) = self.load.get_mut(&pid) {
            *load -= 1;
        }
        Some(Returned { pid, items: job.items, attempts: job.attempts, losses: job.losses })
    }

    /// Worker `pid` is gone (or cannot take work): nothing more goes to it.
    pub fn drop_worker(&mut self, pid: Pid) {
        self.pool.retain(|p| *p != pid);
        self.load.remove(&pid);
        self.pace.remove(&pid);
    }

    /// Puts a batch whose send failed at once back at the front, to go elsewhere now.
    pub fn unsent(&mut self, returned: Returned, now: Instant) {
        self.queue.push_front(Job { items: returned.items, attempts: returned.attempts, losses: returned.losses, not_before: now });
    }

    /// The batch was lost with its worker: it goes to the others at once, unless it has
    /// been lost [`MAX_LOSSES`] times (false: then it is a failure like any other).
    pub fn lost(&mut self, returned: Returned, now: Instant) -> bool {
        if returned.losses + 1 >= MAX_LOSSES {
            return false;
        }
        self.queue.push_front(Job { items: returned.items, attempts: returned.attempts, losses: returned.losses + 1, not_before: now });
        true
    }

    /// Schedules `items` (after `attempts` tries) for another try after the next delay;
    /// false when the delays have run out (their fate is the driver's).
    pub fn retry(&mut self, items: Vec<usize>, attempts: usize, now: Instant) -> bool {
        let Some(delay) = self.retry_delays.get(attempts) else { return false };
        self.delayed.push(Job { items, attempts: attempts + 1, losses: 0, not_before: now + *delay });
        true
    }

    /// Batches out, waiting to come back.
    pub fn outstanding(&self) -> usize {
        self.out.len()
    }

    /// True when every item has come back for good.
    pub fn finished(&self) -> bool {
        self.out.is_empty() && self.queue.is_empty() && self.delayed.is_empty()
    }

    /// True when work remains but no worker is left to do it.
    pub fn stranded(&self) -> bool {
        self.pool.is_empty() && !self.finished()
    }

    /// When the next delayed retry is due.
    pub fn wake_at(&self) -> Option<Instant> {
        self.delayed.iter().map(|j| j.not_before).min()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn all_sends(plan: &mut PmapPlan, now: Instant) -> Vec<Batch> {
        std::iter::from_fn(|| plan.next_batch(now)).collect()
    }

    #[test]
    fn batches_cover_every_item_once_and_fill_each_worker_to_two() {
        let t0 = Instant::now();
        let mut plan = PmapPlan::new(10, vec![2, 3], 3, vec![], t0);
        let sent = all_sends(&mut plan, t0);
        assert_eq!(sent.len(), 4, "2 workers x 2 in flight");
        assert_eq!(sent.iter().filter(|b| b.pid == 2).count(), 2);
        assert_eq!(sent.iter().map(|b| b.items.len()).collect::<Vec<_>>(), [3, 3, 3, 1]);
        let mut items: Vec<usize> = sent.iter().flat_map(|b| b.items.clone()).collect();
        items.sort();
        assert_eq!(items, (0..10).collect::<Vec<_>>());
        for b in sent {
            plan.take(b.tag).unwrap();
        }
        assert!(plan.finished());
    }

    /// Keeps `pid` (alone in the plan) fed for `rounds` returns of `per_batch` each, as a
    /// worker that runs its batches one after the other; returns the most it had out.
    fn run_at_pace(plan: &mut PmapPlan, per_batch: Duration, rounds: usize, t0: Instant) -> usize {
        let (mut now, mut out, mut most) = (t0, VecDeque::new(), 0);
        for _ in 0..rounds {
            out.extend(all_sends(plan, now).into_iter().map(|b| b.tag));
            most = most.max(out.len());
            now += per_batch;
            plan.came_back(out.pop_front().expect("work out"), now).unwrap();
        }
        most
    }

    #[test]
    fn cheap_batches_fill_a_deeper_pipeline_and_slow_ones_keep_two() {
        let t0 = Instant::now();
        let mut cheap = PmapPlan::new(100_000, vec![2], 1, vec![], t0);
        assert_eq!(all_sends(&mut cheap, t0).len(), IN_FLIGHT, "before any pace is known");
        let mut cheap = PmapPlan::new(100_000, vec![2], 1, vec![], t0);
        assert_eq!(run_at_pace(&mut cheap, Duration::from_micros(2), 1000, t0), MAX_IN_FLIGHT, "2 us per batch: as deep as allowed");
        let mut medium = PmapPlan::new(100_000, vec![2], 1, vec![], t0);
        let most = run_at_pace(&mut medium, Duration::from_micros(100), 500, t0);
        assert!((9..=11).contains(&most), "100 us per batch: about QUEUE_AHEAD of work out, got {most}");
        let mut slow = PmapPlan::new(1000, vec![2], 1, vec![], t0);
        assert_eq!(run_at_pace(&mut slow, Duration::from_millis(10), 100, t0), IN_FLIGHT, "10 ms per batch: one running, one waiting");
    }

    #[test]
    fn the_automatic_batch_is_about_eight_per_worker() {
        let t0 = Instant::now();
        let mut plan = PmapPlan::new(1600, vec![2, 3], 0, vec![], t0);
        assert_eq!(plan.next_batch(t0).unwrap().items.len(), 100);
    }

    #[test]
    fn a_dead_workers_batch_moves_to_the_others() {
        let t0 = Instant::now();
        let mut plan = PmapPlan::new(4, vec![2, 3], 1, vec![Duration::ZERO], t0);
        let sent = all_sends(&mut plan, t0);
        let lost: Vec<_> = sent.iter().filter(|b| b.pid == 2).collect();
        plan.drop_worker(2);
        for b in &lost {
            let r = plan.take(b.tag).unwrap();
            assert!(plan.retry(r.items, r.attempts, t0));
        }
        for b in sent.iter().filter(|b| b.pid == 3) {
            plan.take(b.tag).unwrap();
        }
        let again = all_sends(&mut plan, t0);
        assert_eq!(again.len(), 2);
        assert!(again.iter().all(|b| b.pid == 3), "{again:?}");
        for b in again {
            plan.take(b.tag).unwrap();
        }
        assert!(plan.finished());
    }

    #[test]
    fn a_batch_lost_with_its_worker_moves_on_without_retry_delays_a_bounded_number_of_times() {
        let t0 = Instant::now();
        let mut plan = PmapPlan::new(2, vec![2, 3, 4, 5], 2, vec![], t0);
        for (loss, pid) in [2, 3].into_iter().enumerate() {
            let b = plan.next_batch(t0).unwrap();
            assert_eq!((b.pid, b.items.clone()), (pid, vec![0, 1]), "loss {loss}");
            plan.drop_worker(b.pid);
            let r = plan.take(b.tag).unwrap();
            assert!(plan.lost(r, t0), "no retry delays needed");
        }
        let b = plan.next_batch(t0).unwrap();
        plan.drop_worker(b.pid);
        let r = plan.take(b.tag).unwrap();
        assert!(!plan.lost(r, t0), "a batch that kills every worker it meets is a failure");
    }

    #[test]
    fn retries_wait_for_their_delay_and_then_run_out() {
        let t0 = Instant::now();
        let delays = vec![Duration::from_secs(1), Duration::from_secs(4)];
        let mut plan = PmapPlan::new(1, vec![2], 1, delays, t0);
        let b = plan.next_batch(t0).unwrap();
        let r = plan.take(b.tag).unwrap();
        assert!(plan.retry(r.items, r.attempts, t0));
        assert_eq!(plan.next_batch(t0 + Duration::from_millis(999)), None, "not before its delay");
        assert_eq!(plan.wake_at(), Some(t0 + Duration::from_secs(1)));
        let b = plan.next_batch(t0 + Duration::from_secs(1)).unwrap();
        let r = plan.take(b.tag).unwrap();
        assert_eq!(r.attempts, 1);
        assert!(plan.retry(r.items, r.attempts, t0 + Duration::from_secs(1)));
        let b = plan.next_batch(t0 + Duration::from_secs(5)).unwrap();
        let r = plan.take(b.tag).unwrap();
        assert!(!plan.retry(r.items, r.attempts, t0 + Duration::from_secs(5)), "the delays have run out");
        assert!(plan.finished());
    }

    #[test]
    fn without_workers_work_is_stranded() {
        let t0 = Instant::now();
        let mut plan = PmapPlan::new(3, vec![2], 1, vec![], t0);
        let b = plan.next_batch(t0).unwrap();
        plan.drop_worker(2);
        let r = plan.take(b.tag).unwrap();
        plan.unsent(r, t0);
        assert!(plan.stranded());
        assert_eq!(plan.next_batch(t0), None);
    }

    /// Random interleavings of replies, item failures, lost batches and worker deaths: every
    /// item ends exactly once — done, or given up when its retries ran out — and nothing is
    /// sent to a worker after it died.
    #[test]
    fn every_item_ends_exactly_once_under_random_interleavings() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for round in 0..500 {
            let t0 = Instant::now();
            let n = 1 + next(40) as usize;
            let workers: Vec<Pid> = (2..2 + 1 + next(4) as Pid).collect();
            let delays = vec![Duration::from_millis(next(3)); next(3) as usize];
            let mut plan = PmapPlan::new(n, workers.clone(), next(5) as usize, delays, t0);
            let mut ended: BTreeMap<usize, &str> = BTreeMap::new();
            let mut dead: Vec<Pid> = Vec::new();
            let mut out: Vec<Batch> = Vec::new();
            let mut now = t0;
            for _ in 0..10_000 {
                while let Some(b) = plan.next_batch(now) {
                    assert!(!dead.contains(&b.pid), "round {round}: sent to dead worker {}", b.pid);
                    out.push(b);
                }
                if plan.finished() || plan.stranded() {
                    break;
                }
                if out.is_empty() {
                    now = plan.wake_at().expect("waiting for a retry");
                    continue;
                }
                let b = out.swap_remove(next(out.len() as u64) as usize);
                let r = plan.take(b.tag).expect("each batch comes back once");
                match next(10) {
                    0 if dead.len() + 1 < workers.len() && !dead.contains(&r.pid) => {
                        dead.push(r.pid);
                        plan.drop_worker(r.pid);
                        if !plan.lost(r.clone(), now) && !plan.retry(r.items.clone(), r.attempts, now) {
                            r.items.iter().for_each(|i| assert!(ended.insert(*i, "gave up").is_none()));
                        }
                    }
                    1 | 2 => {
                        for i in r.items {
                            if next(2) == 0 {
                                assert!(ended.insert(i, "done").is_none(), "round {round}: item {i} ended twice");
                            } else if !plan.retry(vec![i], r.attempts, now) {
                                assert!(ended.insert(i, "gave up").is_none());
                            }
                        }
                    }
                    _ => r.items.iter().for_each(|i| assert!(ended.insert(*i, "done").is_none(), "round {round}: item {i} ended twice")),
                }
            }
            assert!(plan.finished(), "round {round}: the map ends");
            assert_eq!(ended.len(), n, "round {round}: every item ends");
        }
    }
}
