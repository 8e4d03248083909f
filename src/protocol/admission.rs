//! Who may join the master, and as which pid: the workers of a launch still waiting for them
//! (each in the seat its index names), and workers that dial in by themselves while a join
//! rule is open (an `ElasticManager`). Decided from the hello alone; no I/O.

use std::collections::HashMap;

use crate::ids::Pid;

use super::Hello;
use super::env::ANY_SEAT;

/// The seat an admitted worker takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seat {
    /// Worker `pid` of launch `launch`.
    Launched { launch: u64, pid: Pid },
    /// A worker that joined by itself.
    Joined(Pid),
}

impl Seat {
    pub(crate) fn pid(self) -> Pid {
        match self {
            Seat::Launched { pid, .. } | Seat::Joined(pid) => pid,
        }
    }
}

/// The pids handed out and the seats still open.
#[derive(Debug)]
pub(crate) struct Admission {
    next_pid: Pid,
    launches: HashMap<u64, Seats>,
    /// Join rules open now; workers without a launch are admitted while there is one.
    joining: usize,
}

#[derive(Debug)]
struct Seats {
    base: Pid,
    taken: Vec<bool>,
}

impl Default for Admission {
    fn default() -> Self {
        Admission { next_pid: 2, launches: HashMap::new(), joining: 0 }
    }
}

impl Admission {
    /// Opens `n` seats for launch `id`; returns the pid of its first worker.
    pub(crate) fn open_launch(&mut self, id: u64, n: usize) -> Pid {
        let base = self.take_pids(n);
        self.launches.insert(id, Seats { base, taken: vec![false; n] });
        base
    }

    /// Closes the seats of launch `id`; returns the indices no worker took.
    pub(crate) fn close_launch(&mut self, id: u64) -> Vec<u32> {
        let seats = self.launches.remove(&id);
        seats.map(|s| s.taken.iter().enumerate().filter(|(_, t)| !**t).map(|(i, _)| i as u32).collect()).unwrap_or_default()
    }

    /// Opens a join rule: workers that dial in without a launch are admitted until it closes.
    pub(crate) fn open_joining(&mut self) {
        self.joining += 1;
    }

    /// Closes one join rule.
    pub(crate) fn close_joining(&mut self) {
        self.joining = self.joining.saturating_sub(1);
    }

    /// Records that `pid` was given out by other means (an MPI rank): never hand it out again.
    pub(crate) fn taken(&mut self, pid: Pid) {
        self.next_pid = self.next_pid.max(pid.saturating_add(1));
    }

    /// The seat for the worker that sent `hello` (whose secret and build already matched),
    /// or why it may not join.
    pub(crate) fn admit(&mut self, hello: &Hello) -> Result<Seat, String> {
        if let Some(problem) = &hello.problem {
            return Err(format!("worker on {} (os pid {}): {problem}", hello.host, hello.os_pid));
        }
        if hello.peer.is_some() {
            return Err("a worker-to-worker hello sent to the master's listener".into());
        }
        let Some((launch, index)) = hello.launch else {
            if self.joining == 0 {
                return Err(
                    "this master accepts only workers it launched (no CLUSTERMAN_LAUNCH); start an ElasticManager for workers that join by themselves".into(),
                );
            }
            return Ok(Seat::Joined(self.take_pids(1)));
        };
        let seats = self
            .launches
            .get_mut(&launch)
            .ok_or_else(|| format!("no launch {launch} is waiting for workers (it timed out, or this worker belongs to another master)"))?;
        let n = seats.taken.len();
        let index = match index {
            ANY_SEAT => seats.taken.iter().position(|t| !t).ok_or_else(|| format!("launch {launch} has all its {n} workers already"))? as u32,
            given => given,
        };
        match seats.taken.get_mut(index as usize) {
            None => Err(format!("worker index {index} is outside launch {launch} of {n} workers")),
            Some(true) => Err(match hello.mpi {
                Some((rank, 1)) => format!(
                    "MPI rank {rank} reports a world of 1 process, and its index was taken: the launcher does not match the MPI this program was built with (it started single-rank copies); use the matching mpirun/mpiexec"
                ),
                _ => format!("worker index {index} of launch {launch} has already connected"),
            }),
            Some(taken) => {
                *taken = true;
                Ok(Seat::Launched { launch, pid: seats.base + index })
            }
        }
    }

    fn take_pids(&mut self, n: usize) -> Pid {
        let base = self.next_pid;
        self.next_pid = base.saturating_add(Pid::try_from(n).unwrap_or(Pid::MAX));
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Fingerprint, Secret};

    fn hello(launch: Option<(u64, u32)>) -> Hello {
        Hello {
            secret: Secret::random(),
            fingerprint: Fingerprint { registry: 1, build: "b".into() },
            exe: "w".into(),
            launch,
            host: "h".into(),
            os_pid: 7,
            mpi: None,
            peer: None,
            problem: None,
        }
    }

    #[test]
    fn each_launch_index_gets_its_own_pid_once() {
        let mut a = Admission::default();
        let base = a.open_launch(9, 3);
        assert_eq!(base, 2);
        assert_eq!(a.admit(&hello(Some((9, 2)))), Ok(Seat::Launched { launch: 9, pid: 4 }));
        assert_eq!(a.admit(&hello(Some((9, 0)))), Ok(Seat::Launched { launch: 9, pid: 2 }));
        assert!(a.admit(&hello(Some((9, 2)))).unwrap_err().contains("already connected"));
        assert!(a.admit(&hello(Some((9, 3)))).unwrap_err().contains("outside launch 9 of 3"));
        assert!(a.admit(&hello(Some((8, 0)))).unwrap_err().contains("no launch 8 is waiting"));
        assert_eq!(a.close_launch(9), vec![1], "index 1 never came");
        assert!(a.admit(&hello(Some((9, 1)))).unwrap_err().contains("no launch 9"), "a late worker of a closed launch is refused");
    }

    #[test]
    fn workers_started_by_hand_take_the_free_seats_in_turn() {
        let mut a = Admission::default();
        a.open_launch(5, 3);
        assert_eq!(a.admit(&hello(Some((5, 1)))), Ok(Seat::Launched { launch: 5, pid: 3 }));
        assert_eq!(a.admit(&hello(Some((5, ANY_SEAT)))), Ok(Seat::Launched { launch: 5, pid: 2 }));
        assert_eq!(a.admit(&hello(Some((5, ANY_SEAT)))), Ok(Seat::Launched { launch: 5, pid: 4 }));
        assert!(a.admit(&hello(Some((5, ANY_SEAT)))).unwrap_err().contains("launch 5 has all its 3 workers already"));
    }

    #[test]
    fn launches_never_share_pids() {
        let mut a = Admission::default();
        let first = a.open_launch(1, 4);
        let second = a.open_launch(2, 2);
        assert_eq!((first, second), (2, 6));
        a.close_launch(1);
        assert_eq!(a.open_launch(3, 1), 8, "the seats of a closed launch are not handed out again");
    }

    #[test]
    fn workers_without_a_launch_join_only_while_a_rule_is_open() {
        let mut a = Admission::default();
        assert!(a.admit(&hello(None)).unwrap_err().contains("start an ElasticManager"));
        a.open_joining();
        a.open_launch(5, 2);
        assert_eq!(a.admit(&hello(None)), Ok(Seat::Joined(4)));
        assert_eq!(a.admit(&hello(None)), Ok(Seat::Joined(5)));
        a.close_joining();
        assert!(a.admit(&hello(None)).is_err(), "closed again");
        assert_eq!(a.admit(&hello(Some((5, 1)))), Ok(Seat::Launched { launch: 5, pid: 3 }), "launches are not affected");
    }

    #[test]
    fn pids_given_out_elsewhere_are_not_reused() {
        let mut a = Admission::default();
        a.taken(10);
        assert_eq!(a.open_launch(1, 1), 11);
        a.taken(3);
        assert_eq!(a.open_launch(2, 1), 12);
    }

    #[test]
    fn a_worker_that_cannot_serve_or_dials_as_a_peer_is_refused() {
        let mut a = Admission::default();
        a.open_launch(1, 2);
        let sick = Hello { problem: Some("never called clusterman::init()".into()), ..hello(Some((1, 0))) };
        assert!(a.admit(&sick).unwrap_err().contains("never called clusterman::init()"));
        let peer = Hello { peer: Some(3), ..hello(Some((1, 0))) };
        assert!(a.admit(&peer).unwrap_err().contains("worker-to-worker"));
        assert_eq!(a.admit(&hello(Some((1, 0)))), Ok(Seat::Launched { launch: 1, pid: 2 }), "its seat is still free");
        let wrong_mpi = Hello { mpi: Some((0, 1)), ..hello(Some((1, 0))) };
        assert!(a.admit(&wrong_mpi).unwrap_err().contains("does not match the MPI"));
    }
}
