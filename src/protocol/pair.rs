//! One [`MasterCore`] wired to worker cores ([`WorkerCore`]) through in-memory queues, on a
//! simulated clock: the whole protocol, deaths, silences and shutdown included, proved in
//! milliseconds and without a process.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::codec;
use crate::error::Error;
use crate::ids::Pid;

use super::failure::{Failure, failure_frame};
use super::frame::{Frame, FrameBuf, FrameReader, Header, Kind, bare};
use super::handshake::Terms;
use super::liveness::{Health, Liveness};
use super::master::{Event, MasterCore, STOPPED};
use super::worker::{self, Incoming, LinkId, WorkerCore};

const LIVENESS: Liveness = Liveness { interval: Duration::from_secs(5), timeout: Duration::from_secs(60) };

/// Function ids of the simulated workers: 0 answers with the request id doubled;
/// `RELAY_TO + pid` calls worker `pid` (through the master) and answers with its answer
/// plus one, or passes its failure on.
const RELAY_TO: u64 = 1000;

fn frame(bytes: Vec<u8>) -> Frame {
    let mut r = FrameReader::new(1 << 20);
    r.extend(&bytes);
    r.next_frame().unwrap().unwrap()
}

fn call_frame(src: Pid, dst: Pid, req: u64, func: u64) -> Vec<u8> {
    let mut f = FrameBuf::new(Header { kind: Kind::Call, src, dst, req, func, words: 0 });
    codec::encode_into(&(req,), f.payload()).unwrap();
    f.finish().unwrap()
}

fn reply_frame(src: Pid, dst: Pid, req: u64, value: u64) -> Vec<u8> {
    let mut f = FrameBuf::new(Header { kind: Kind::Reply, src, dst, req, func: 0, words: 0 });
    codec::encode_into(&value, f.payload()).unwrap();
    f.finish().unwrap()
}

/// A worker process: its core and what its program does with calls.
struct SimWorker {
    core: WorkerCore<u64>,
    /// Its link to the master.
    uplink: LinkId,
    /// SIGSTOP: it reads nothing and sends nothing.
    stopped: bool,
    /// Its connection is gone (it exited, was killed, or was cut off).
    closed: bool,
    /// Its relays in flight: waiter token -> the call it will answer.
    relays: HashMap<u64, Header>,
    next_token: u64,
    /// How its own calls ended, by token (`Err`: failed without an answer).
    ended: Vec<(u64, Result<Kind, String>)>,
}

impl SimWorker {
    fn new(pid: Pid, max_frame: usize, now: Instant) -> SimWorker {
        let mut core = WorkerCore::new(Terms { pid, direct_links: false, max_frame, liveness: LIVENESS });
        let uplink = core.add_link(1, now);
        SimWorker { core, uplink, stopped: false, closed: false, relays: HashMap::new(), next_token: 0, ended: vec![] }
    }

    fn me(&self) -> Pid {
        self.core.terms().pid
    }

    /// Bytes from the master; returns what it sends back.
    fn receive(&mut self, bytes: Vec<u8>) -> Vec<Vec<u8>> {
        if self.stopped || self.closed {
            return vec![];
        }
        let me = self.me();
        match self.core.handle_frame(self.uplink, frame(bytes)).expect("the master speaks the protocol") {
            Incoming::Run(call) => {
                let h = call.header;
                if h.func >= RELAY_TO {
                    let token = self.next_token;
                    self.next_token += 1;
                    let req = self.core.begin_call(self.uplink, Some(token)).unwrap();
                    self.relays.insert(token, h);
                    return vec![call_frame(me, (h.func - RELAY_TO) as Pid, req, 0)];
                }
                let answer = if h.func == 1 { vec![0; 4096] } else { reply_frame(me, h.src, h.req, h.req * 2) };
                vec![worker::answer(&self.core.terms(), h, answer.into(), || "big".into()).unwrap().joined()]
            }
            Incoming::Resolved(token, answer) => {
                self.ended.push((token, Ok(answer.header.kind)));
                let Some(call) = self.relays.remove(&token) else { return vec![] };
                let out = match answer.header.kind {
                    Kind::Reply => reply_frame(me, call.src, call.req, codec::decode::<u64>(answer.payload()).unwrap() + 1),
                    _ => failure_frame(me, call.src, call.req, &codec::decode::<Failure>(answer.payload()).unwrap()).unwrap(),
                };
                vec![out]
            }
            Incoming::Stop(waiters) => {
                self.ended.extend(waiters.into_iter().map(|w| (w, Err("the worker is shutting down".to_string()))));
                self.closed = true;
                vec![bare(Kind::Shutdown, me, 1)] // its goodbye, then it exits
            }
            Incoming::Nothing => vec![],
        }
    }

    /// Its connection is gone: its calls in flight fail.
    fn close(&mut self, reason: &str) {
        let (reason, waiters) = self.core.handle_closed(self.uplink, reason);
        self.ended.extend(waiters.into_iter().map(|w| (w, Err(reason.clone()))));
        self.closed = true;
    }
}

/// One master core, worker cores, and the wire between them: a queue each way per worker.
struct Pair {
    core: MasterCore<u64>,
    workers: BTreeMap<Pid, SimWorker>,
    now: Instant,
    to_master: BTreeMap<Pid, VecDeque<Vec<u8>>>,
    to_worker: BTreeMap<Pid, VecDeque<Vec<u8>>>,
    resolved: Vec<(u64, crate::error::Result<Frame>)>,
    gone: Vec<(Pid, String)>,
    closed: Vec<(Pid, bool)>,
}

impl Pair {
    fn new(n: Pid) -> Pair {
        Self::with_max_frame(n, 1 << 20)
    }

    fn with_max_frame(n: Pid, max_frame: usize) -> Pair {
        let now = Instant::now();
        let mut core = MasterCore::new(LIVENESS, now);
        let mut workers = BTreeMap::new();
        for pid in 2..2 + n {
            core.add_worker(pid, now);
            workers.insert(pid, SimWorker::new(pid, max_frame, now));
        }
        let queues = || (2..2 + n).map(|p| (p, VecDeque::new())).collect();
        Pair { core, workers, now, to_master: queues(), to_worker: queues(), resolved: vec![], gone: vec![], closed: vec![] }
    }

    fn worker(&mut self, pid: Pid) -> &mut SimWorker {
        self.workers.get_mut(&pid).unwrap()
    }

    /// The master calls `dst`; the frame is on its way.
    fn call(&mut self, dst: Pid, func: u64, waiter: u64) -> crate::error::Result<u64> {
        let req = self.core.begin_call(dst, Some(waiter))?;
        self.to_worker.get_mut(&dst).unwrap().push_back(call_frame(1, dst, req, func));
        Ok(req)
    }

    /// A worker's process ends: its connection closes at both ends.
    fn kill(&mut self, pid: Pid, reason: &str) {
        self.worker(pid).close(reason);
        self.to_worker.get_mut(&pid).unwrap().clear();
        self.core.handle_closed(pid, reason);
    }

    /// Moves one frame on the connection of `pid`, master-bound first; true if it did.
    fn step(&mut self, pid: Pid) -> bool {
        if let Some(bytes) = self.to_master.get_mut(&pid).unwrap().pop_front() {
            if let Err(reason) = self.core.handle_frame(self.now, pid, frame(bytes)) {
                self.kill(pid, &reason);
            }
        } else if let Some(bytes) = self.to_worker.get_mut(&pid).unwrap().pop_front() {
            let out = self.worker(pid).receive(bytes);
            self.to_master.get_mut(&pid).unwrap().extend(out);
        } else {
            return false;
        }
        self.drain_core();
        true
    }

    /// Carries out what the master core asks for.
    fn drain_core(&mut self) {
        loop {
            if let Some(t) = self.core.poll_transmit() {
                if !self.workers[&t.to].closed {
                    self.to_worker.get_mut(&t.to).unwrap().push_back(t.frame.joined());
                }
                continue;
            }
            let Some(event) = self.core.poll_event() else { return };
            match event {
                Event::Resolved(w, r) => self.resolved.push((w, r)),
                Event::Gone { pid, reason } => self.gone.push((pid, reason)),
                Event::Close { pid, kill } => {
                    self.closed.push((pid, kill));
                    self.kill(pid, "its connection closed");
                }
                Event::RunHere(from, call) => {
                    let h = call.header;
                    self.to_worker.get_mut(&from).unwrap().push_back(reply_frame(1, from, h.req, h.req * 2));
                }
                Event::Output(..) => {}
            }
        }
    }

    /// Moves everything until nothing moves.
    fn settle(&mut self) {
        self.drain_core();
        let pids: Vec<Pid> = self.workers.keys().copied().collect();
        while pids.iter().fold(false, |moved, &p| self.step(p) | moved) {}
    }

    /// Time passes: heartbeats go both ways (from workers still running) and the sides
    /// judge each other.
    fn advance(&mut self, d: Duration) {
        self.now += d;
        for (&pid, w) in &mut self.workers {
            if !w.stopped && !w.closed {
                self.to_master.get_mut(&pid).unwrap().push_back(bare(Kind::Heartbeat, pid, 1));
            }
        }
        self.core.handle_timeout(self.now);
        self.drain_core();
        self.settle();
    }

    fn value(&self, waiter: u64) -> Option<Result<u64, String>> {
        self.resolved.iter().find(|(w, _)| *w == waiter).map(|(_, r)| match r {
            Ok(f) if f.header.kind == Kind::Reply => Ok(codec::decode(f.payload()).unwrap()),
            Ok(f) => Err(Error::from(codec::decode::<Failure>(f.payload()).unwrap()).to_string()),
            Err(e) => Err(e.to_string()),
        })
    }
}

#[test]
fn calls_resolve_with_their_own_replies() {
    let mut p = Pair::new(2);
    let a = p.call(2, 0, 10).unwrap();
    let b = p.call(3, 0, 11).unwrap();
    p.settle();
    assert_eq!(p.value(10), Some(Ok(a * 2)));
    assert_eq!(p.value(11), Some(Ok(b * 2)));
}

#[test]
fn several_calls_to_one_worker_each_resolve_with_their_own_reply_or_its_death() {
    let mut p = Pair::new(1);
    let reqs: Vec<u64> = (0..4).map(|waiter| p.call(2, 0, waiter).unwrap()).collect();
    p.settle();
    for (waiter, req) in reqs.iter().enumerate() {
        assert_eq!(p.value(waiter as u64), Some(Ok(req * 2)), "call {waiter}");
    }
    assert!(!p.core.awaits_replies());
    // and when it dies with several outstanding, each fails
    p.worker(2).stopped = true;
    for waiter in 10..13 {
        p.call(2, 0, waiter).unwrap();
    }
    p.settle();
    p.kill(2, "its connection closed");
    p.settle();
    for waiter in 10..13 {
        assert!(matches!(p.value(waiter), Some(Err(ref e)) if e.contains("worker 2 died")), "call {waiter}: {:?}", p.value(waiter));
    }
}

#[test]
fn a_worker_dying_mid_call_fails_exactly_its_calls() {
    let mut p = Pair::new(2);
    p.worker(2).stopped = true;
    p.call(2, 0, 1).unwrap();
    p.call(3, 0, 2).unwrap();
    p.settle();
    p.kill(2, "its connection closed");
    p.settle();
    assert_eq!(p.value(1), Some(Err("worker 2 died before answering: its connection closed".into())));
    assert!(matches!(p.value(2), Some(Ok(_))));
    assert_eq!(p.gone, vec![(2, "its connection closed".to_string())]);
    assert_eq!(p.core.workers(), vec![3]);
    assert!(matches!(p.core.begin_call(2, Some(9)), Err(Error::NoSuchWorker(2))));
}

#[test]
fn a_silent_worker_is_given_up_after_the_timeout_and_killed() {
    let mut p = Pair::new(2);
    p.worker(2).stopped = true; // SIGSTOP: no replies, no heartbeats
    p.call(2, 0, 1).unwrap();
    for _ in 0..11 {
        p.advance(Duration::from_secs(5)); // 55 s
    }
    assert_eq!(p.value(1), None, "still within the timeout");
    p.advance(Duration::from_secs(5)); // 60 s
    assert_eq!(p.closed, vec![(2, true)], "its connection is closed and its process killed");
    let Some(Err(why)) = p.value(1) else { panic!("the call ended") };
    assert!(why.contains("worker 2 died") && why.contains("no heartbeat for 60 s"), "{why}");
    assert_eq!(p.core.workers(), vec![3], "the live worker stays");
}

#[test]
fn a_worker_whose_master_falls_silent_knows_it_a_timeout_after_the_look_that_last_heard_it() {
    let mut p = Pair::new(1);
    let start = p.now;
    let judge = |p: &mut Pair, at: Duration| {
        let w = p.workers.get_mut(&2).unwrap();
        w.core.health(w.uplink, start + at, None)
    };
    assert_eq!(judge(&mut p, Duration::from_secs(59)), Health::Alive);
    assert_eq!(judge(&mut p, Duration::from_secs(60)), Health::Silent(Duration::from_secs(60)));
    p.advance(Duration::from_secs(30)); // the master's heartbeat arrives
    // frames are counted, not timed: the look at 31 s is when they count as heard
    assert_eq!(judge(&mut p, Duration::from_secs(31)), Health::Alive);
    assert_eq!(judge(&mut p, Duration::from_secs(90)), Health::Alive, "heard at the look 59 s ago");
    assert_eq!(judge(&mut p, Duration::from_secs(91)), Health::Silent(Duration::from_secs(60)));
    assert_eq!(judge(&mut p, Duration::from_secs(95)), Health::Silent(Duration::from_secs(64)), "a look that finds nothing new moves nothing");
}

#[test]
fn routed_nested_calls_come_back_through_the_master() {
    // the master asks 2 to relay to 3: 2 calls 3 through the master, 3 answers (2's request
    // id 1, doubled), 2 adds one and answers the master
    let mut p = Pair::new(2);
    p.call(2, RELAY_TO + 3, 7).unwrap();
    p.settle();
    assert_eq!(p.value(7), Some(Ok(3)));
    assert_eq!(p.core.routed_frames(), 1);
    assert_eq!(p.workers[&2].ended, vec![(0, Ok(Kind::Reply))], "the relay's own call ended once");
}

#[test]
fn a_routed_callers_target_dying_fails_the_caller_not_the_master() {
    let mut p = Pair::new(2);
    p.worker(3).stopped = true;
    p.call(2, RELAY_TO + 3, 5).unwrap();
    p.settle();
    assert_eq!(p.value(5), None, "3 is silent, 2 waits");
    p.kill(3, "its connection closed");
    p.settle();
    let Some(Err(why)) = p.value(5) else { panic!("the relay ended") };
    assert!(why.contains("worker 3 died") && why.contains("its connection closed"), "2 was told, and passed it on: {why}");
    assert_eq!(p.core.workers(), vec![2]);
}

#[test]
fn cores_know_whether_they_wait_for_a_reply() {
    // what the MPI transport asks before it lets its thread sleep longer
    let mut p = Pair::new(2);
    assert!(!p.core.awaits_replies());
    p.worker(3).stopped = true;
    p.call(2, RELAY_TO + 3, 5).unwrap();
    p.settle();
    assert!(p.core.awaits_replies() && p.workers[&2].core.awaits_replies(), "the master waits on 2, 2 on 3");
    assert!(!p.workers[&3].core.awaits_replies());
    p.kill(3, "its connection closed");
    p.settle();
    assert!(!p.core.awaits_replies() && !p.workers[&2].core.awaits_replies());
}

#[test]
fn a_call_to_a_worker_that_is_gone_is_refused_for_the_caller() {
    let mut p = Pair::new(1);
    p.call(2, RELAY_TO + 9, 3).unwrap();
    p.settle();
    let Some(Err(why)) = p.value(3) else { panic!("ended") };
    assert!(why.contains("no worker with pid 9"), "{why}");
}

#[test]
fn shutdown_with_calls_in_flight_fails_them_with_shutdown() {
    let mut p = Pair::new(3);
    p.worker(2).stopped = true; // hangs: never says goodbye
    p.call(2, 0, 1).unwrap();
    p.worker(4).stopped = true;
    p.call(3, RELAY_TO + 4, 2).unwrap(); // 3 waits on 4, which hangs
    p.settle();
    p.core.shutdown();
    assert!(matches!(p.core.begin_call(3, Some(9)), Err(Error::ShutDown)));
    p.drain_core();
    p.settle();
    assert_eq!(p.workers[&3].ended, vec![(0, Err("the worker is shutting down".into()))], "3's own call failed at the stop");
    assert!(p.gone.contains(&(3, STOPPED.to_string())), "3 said goodbye: {:?}", p.gone);
    // the driver gives up on workers that do not stop within its grace
    for pid in [2, 4] {
        p.core.give_up(pid, "did not stop".into(), true);
    }
    p.drain_core();
    let mut ends: Vec<(u64, String)> = p.resolved.iter().map(|(w, r)| (*w, r.as_ref().err().map(|e| e.to_string()).unwrap_or_default())).collect();
    ends.sort();
    assert_eq!(ends, vec![(1, Error::ShutDown.to_string()), (2, Error::ShutDown.to_string())]);
    assert!(p.core.workers().is_empty());
}

#[test]
fn a_frame_that_lies_about_its_sender_ends_that_conversation() {
    let mut p = Pair::new(2);
    let err = p.core.handle_frame(p.now, 2, frame(reply_frame(3, 1, 1, 0))).unwrap_err();
    assert!(err.contains("claiming to be from pid 3"), "{err}");
}

#[test]
fn a_result_larger_than_the_cluster_accepts_fails_that_call_only() {
    let mut p = Pair::with_max_frame(1, 1024);
    p.call(2, 1, 1).unwrap(); // answers 4 KiB
    p.call(2, 0, 2).unwrap();
    p.settle();
    let Some(Err(why)) = p.value(1) else { panic!("ended") };
    assert!(why.contains("exceeds the cluster's max_frame of 1024"), "{why}");
    assert!(matches!(p.value(2), Some(Ok(_))), "the worker serves on");
}

/// Random interleavings of calls (direct and relayed), frames moving on random
/// connections, deaths, silences, time and shutdown: every call of the master and of every
/// worker ends exactly once, and nothing ends that was not called.
#[test]
fn every_call_resolves_exactly_once() {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for round in 0..300 {
        let n = 1 + next(4) as Pid;
        let mut p = Pair::new(n);
        let mut made = 0u64;
        for _ in 0..300 {
            let pid = 2 + next(n as u64) as Pid;
            match next(14) {
                0..=4 => {
                    let dst = 2 + next(n as u64 + 1) as Pid; // sometimes one past the last
                    let func = if next(3) == 0 { RELAY_TO + 2 + next(n as u64 + 1) } else { 0 };
                    if p.workers.contains_key(&dst) && p.call(dst, func, made).is_ok() {
                        made += 1;
                    }
                }
                5..=9 => {
                    p.step(pid);
                }
                10 => p.worker(pid).stopped = true,
                11 if !p.workers[&pid].closed => p.kill(pid, "killed"),
                12 => p.advance(Duration::from_secs(5 * next(20))),
                13 if next(10) == 0 => {
                    p.core.shutdown();
                    p.drain_core();
                }
                _ => p.settle(),
            }
        }
        // the end: what moves, moves; every worker left is cut off
        p.settle();
        for pid in 2..2 + n {
            if !p.workers[&pid].closed {
                p.kill(pid, "closed at the end");
            }
        }
        p.drain_core();
        let mut seen: Vec<u64> = p.resolved.iter().map(|(w, _)| *w).collect();
        seen.sort();
        assert_eq!(seen, (0..made).collect::<Vec<_>>(), "round {round}: each of the master's {made} calls ended exactly once");
        for (pid, w) in &p.workers {
            let mut ended: Vec<u64> = w.ended.iter().map(|(t, _)| *t).collect();
            ended.sort();
            assert_eq!(ended, (0..w.next_token).collect::<Vec<_>>(), "round {round}: worker {pid}'s own calls ended exactly once");
        }
    }
}

#[test]
fn a_workers_state_stays_where_it_is_while_others_join_and_leave() {
    // the driver keeps the address to have the state fetched ahead of calls
    let now = Instant::now();
    let mut core: MasterCore<u64> = MasterCore::new(LIVENESS, now);
    core.add_worker(2, now);
    let first = core.state_address(2).expect("a worker's state");
    for pid in 3..2000 {
        core.add_worker(pid, now); // the table grows many times over
    }
    for pid in 3..1000 {
        core.handle_closed(pid, "its connection closed");
    }
    assert_eq!(core.state_address(2), Some(first), "worker 2's state moved");
    assert_eq!(core.state_address(3), None, "a worker that left has no state");
}
