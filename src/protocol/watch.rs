//! Watching a launch while its workers connect, without a clock of its own: it is told the
//! time, what the launch's manager sees, and how many workers have connected, and answers
//! what to do. The launch timeout counts from when the launch is *running* (a job that waits
//! in a queue shows its id and state instead, and has its own optional limit); when it ends,
//! `min_workers` decides between going on with fewer and failing.

use std::time::{Duration, Instant};

/// What a launch is doing, as far as its manager can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchStatus {
    /// Waiting in a scheduler's queue; the text says which job and why (`job 961 pending (Resources)`).
    Queued(String),
    /// Started: the workers are starting or running.
    Running,
    /// Failed for good (a process exited before connecting, the job was cancelled).
    Failed(String),
}

/// What the watch says after a look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep waiting; show the user this line first, if any (`slurm job 961 pending (12 s)`).
    Wait(Option<String>),
    /// Every worker is there.
    Ready,
    /// The launch timeout ended with at least `min_workers` connected: go on with them.
    Enough(usize),
    /// The launch cannot complete; the text says why and what to do.
    Failed(String),
    /// The launch ran for its whole timeout without enough workers.
    TimedOut {
        /// How long it ran.
        ran: Duration,
        /// Workers that made it.
        connected: usize,
    },
}

/// How often a queued launch's unchanged state is shown again.
const SHOW_EVERY: Duration = Duration::from_secs(10);

/// The state of one launch's wait.
#[derive(Debug)]
pub struct LaunchWatch {
    expected: usize,
    min_workers: usize,
    launch_timeout: Duration,
    queue_timeout: Option<Duration>,
    submitted: Instant,
    running_since: Option<Instant>,
    shown: Option<(String, Instant)>,
}

impl LaunchWatch {
    /// A launch of `expected` workers submitted at `submitted`.
    pub fn new(expected: usize, min_workers: usize, launch_timeout: Duration, queue_timeout: Option<Duration>, submitted: Instant) -> Self {
        LaunchWatch { expected, min_workers, launch_timeout, queue_timeout, submitted, running_since: None, shown: None }
    }

    /// One look, at time `now`: the manager sees `status`, `connected` workers are in.
    pub fn observe(&mut self, now: Instant, status: &LaunchStatus, connected: usize) -> Verdict {
        let n = self.expected;
        if connected >= n {
            return Verdict::Ready;
        }
        match status {
            LaunchStatus::Failed(problem) => Verdict::Failed(format!("{problem} ({connected} of {n} workers had connected)")),
            LaunchStatus::Queued(state) => {
                let waited = now.saturating_duration_since(self.submitted);
                if let Some(limit) = self.queue_timeout.filter(|limit| waited >= *limit) {
                    return Verdict::Failed(format!(
                        "still queued after {limit:?}: {state}; the job was cancelled (ask for fewer resources, or raise JobOptions::queue_timeout)"
                    ));
                }
                let fresh = self.shown.as_ref().is_none_or(|(s, at)| s != state || now.saturating_duration_since(*at) >= SHOW_EVERY);
                if !fresh {
                    return Verdict::Wait(None);
                }
                self.shown = Some((state.clone(), now));
                Verdict::Wait(Some(format!("{state} ({} s)", waited.as_secs())))
            }
            LaunchStatus::Running => {
                let since = *self.running_since.get_or_insert(now);
                let ran = now.saturating_duration_since(since);
                if ran < self.launch_timeout {
                    Verdict::Wait(None)
                } else if connected > 0 && connected >= self.min_workers {
                    Verdict::Enough(connected)
                } else {
                    Verdict::TimedOut { ran, connected }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    fn queued() -> LaunchStatus {
        LaunchStatus::Queued("slurm job 7 pending (Resources)".into())
    }

    #[test]
    fn the_launch_timeout_counts_from_the_start_not_from_submission() {
        let t0 = Instant::now();
        let mut w = LaunchWatch::new(4, 4, Duration::from_secs(60), None, t0);
        assert_eq!(w.observe(t0, &queued(), 0), Verdict::Wait(Some("slurm job 7 pending (Resources) (0 s)".into())));
        // an hour in the queue is no timeout
        assert_eq!(w.observe(at(t0, 3600), &queued(), 0), Verdict::Wait(Some("slurm job 7 pending (Resources) (3600 s)".into())));
        assert_eq!(w.observe(at(t0, 3601), &LaunchStatus::Running, 1), Verdict::Wait(None));
        assert_eq!(w.observe(at(t0, 3660), &LaunchStatus::Running, 3), Verdict::Wait(None), "59 s of running");
        assert_eq!(w.observe(at(t0, 3661), &LaunchStatus::Running, 3), Verdict::TimedOut { ran: Duration::from_secs(60), connected: 3 });
    }

    #[test]
    fn every_worker_in_is_ready_whatever_the_status() {
        let t0 = Instant::now();
        let mut w = LaunchWatch::new(2, 2, Duration::from_secs(1), None, t0);
        assert_eq!(w.observe(at(t0, 99), &LaunchStatus::Failed("gone".into()), 2), Verdict::Ready);
    }

    #[test]
    fn min_workers_decides_between_going_on_and_failing() {
        let t0 = Instant::now();
        let mut enough = LaunchWatch::new(8, 5, Duration::from_secs(10), None, t0);
        enough.observe(t0, &LaunchStatus::Running, 0);
        assert_eq!(enough.observe(at(t0, 10), &LaunchStatus::Running, 5), Verdict::Enough(5));
        let mut short = LaunchWatch::new(8, 5, Duration::from_secs(10), None, t0);
        short.observe(t0, &LaunchStatus::Running, 0);
        assert!(matches!(short.observe(at(t0, 10), &LaunchStatus::Running, 4), Verdict::TimedOut { connected: 4, .. }));
        let mut none = LaunchWatch::new(8, 0, Duration::from_secs(10), None, t0);
        none.observe(t0, &LaunchStatus::Running, 0);
        assert!(matches!(none.observe(at(t0, 10), &LaunchStatus::Running, 0), Verdict::TimedOut { .. }), "never go on with no worker at all");
    }

    #[test]
    fn the_queue_timeout_fails_a_job_that_never_starts() {
        let t0 = Instant::now();
        let mut w = LaunchWatch::new(2, 2, Duration::from_secs(60), Some(Duration::from_secs(300)), t0);
        assert!(matches!(w.observe(at(t0, 299), &queued(), 0), Verdict::Wait(_)));
        let Verdict::Failed(why) = w.observe(at(t0, 300), &queued(), 0) else { panic!("still waiting") };
        assert!(why.contains("still queued after 300s") && why.contains("JobOptions::queue_timeout"), "{why}");
    }

    #[test]
    fn an_unchanged_queue_state_is_shown_again_only_every_ten_seconds() {
        let t0 = Instant::now();
        let mut w = LaunchWatch::new(1, 1, Duration::from_secs(60), None, t0);
        assert!(matches!(w.observe(t0, &queued(), 0), Verdict::Wait(Some(_))));
        assert_eq!(w.observe(at(t0, 5), &queued(), 0), Verdict::Wait(None));
        let other = LaunchStatus::Queued("slurm job 7 pending (Priority)".into());
        assert_eq!(w.observe(at(t0, 6), &other, 0), Verdict::Wait(Some("slurm job 7 pending (Priority) (6 s)".into())), "a new state at once");
        assert_eq!(w.observe(at(t0, 15), &other, 0), Verdict::Wait(None));
        assert!(matches!(w.observe(at(t0, 16), &other, 0), Verdict::Wait(Some(_))));
    }

    #[test]
    fn a_failed_launch_says_how_many_had_connected() {
        let t0 = Instant::now();
        let mut w = LaunchWatch::new(3, 3, Duration::from_secs(60), None, t0);
        assert_eq!(w.observe(t0, &LaunchStatus::Failed("mpirun exited with 1".into()), 1), Verdict::Failed("mpirun exited with 1 (1 of 3 workers had connected)".into()));
    }
}
