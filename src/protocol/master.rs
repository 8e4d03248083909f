//! The master's side of the protocol, without I/O and without a clock (as quinn-proto's
//! `Connection` is): the workers it talks to, the calls waiting for their replies, the calls
//! it routes from one worker to another, and the heartbeats that tell a silent worker from a
//! live one. It is fed frames, connection ends and the time; it is asked what to send, what
//! happened, and when to wake next. The driver (one I/O thread, a lock around the core) does
//! the sending, runs calls addressed to the master, and calls the user back.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::ids::Pid;

use super::failure::{Failure, failure_frame};
use super::frame::{Frame, Kind, bare};
use super::liveness::Liveness;

/// What a worker's conversation ended with when it said goodbye.
pub const STOPPED: &str = "stopped";

/// Bytes to send to a worker.
#[derive(Debug)]
pub struct Transmit {
    /// The worker.
    pub to: Pid,
    /// The frame, length prefix included.
    pub bytes: Vec<u8>,
    /// The routed call it carries (caller, request id): if it cannot be sent, report it with
    /// [`MasterCore::transmit_failed`], and the caller is told.
    pub routed: Option<(Pid, u64)>,
}

/// What happened, for the driver to act on, in order.
#[derive(Debug)]
pub enum Event<W> {
    /// A call of ours ended: its reply, or why it never will.
    Resolved(W, Result<Frame>),
    /// A worker called the master: run it (its reply goes straight back to the worker).
    RunHere(Pid, Frame),
    /// Lines a worker printed.
    Output(Pid, Frame),
    /// End the connection to this worker now (it fell silent); its end comes back through
    /// [`MasterCore::handle_closed`]. `kill`: also end its process, where the driver can.
    Close {
        /// The worker.
        pid: Pid,
        /// End its process too.
        kill: bool,
    },
    /// A worker is gone, for this reason: every call on it has been resolved.
    Gone {
        /// The worker.
        pid: Pid,
        /// Why (a closed connection, a goodbye, silence, a broken protocol).
        reason: String,
    },
}

struct Peer<W> {
    heard: Instant,
    next_req: u64,
    /// Our calls to it, by request id.
    calls: HashMap<u64, W>,
    /// Calls other workers routed to it: (caller, their request id).
    routed: HashSet<(Pid, u64)>,
    /// Why we closed it, if we did (said instead of "connection closed").
    given_up: Option<String>,
}

/// The master's protocol state.
pub struct MasterCore<W> {
    liveness: Liveness,
    peers: BTreeMap<Pid, Peer<W>>,
    shut: bool,
    routed: u64,
    next_tick: Instant,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event<W>>,
}

impl<W> MasterCore<W> {
    /// A master with no workers yet, first heartbeat due `liveness.interval` after `now`.
    pub fn new(liveness: Liveness, now: Instant) -> Self {
        MasterCore { liveness, peers: BTreeMap::new(), shut: false, routed: 0, next_tick: now + liveness.interval, transmits: VecDeque::new(), events: VecDeque::new() }
    }

    /// A worker joined (its handshake is done).
    pub fn add_worker(&mut self, pid: Pid, now: Instant) {
        self.peers.insert(pid, Peer { heard: now, next_req: 1, calls: HashMap::new(), routed: HashSet::new(), given_up: None });
    }

    /// The workers, ascending.
    pub fn workers(&self) -> Vec<Pid> {
        self.peers.keys().copied().collect()
    }

    /// Frames routed from one worker to another so far.
    pub fn routed_frames(&self) -> u64 {
        self.routed
    }

    /// Starts a call to `dst`: its request id, with `waiter` told of its end (none for a
    /// cast). Build the frame with that id and send it; if that fails, [`cancel`](Self::cancel).
    pub fn begin_call(&mut self, dst: Pid, waiter: Option<W>) -> Result<u64> {
        if self.shut {
            return Err(Error::ShutDown);
        }
        let peer = self.peers.get_mut(&dst).ok_or(Error::NoSuchWorker(dst))?;
        let req = peer.next_req;
        peer.next_req += 1;
        if let Some(w) = waiter {
            peer.calls.insert(req, w);
        }
        Ok(req)
    }

    /// Forgets call `req` to `dst` (its frame could not be sent, or its caller stopped
    /// waiting); returns its waiter if it had not ended yet.
    pub fn cancel(&mut self, dst: Pid, req: u64) -> Option<W> {
        self.peers.get_mut(&dst)?.calls.remove(&req)
    }

    /// Asks worker `pid` to finish and exit.
    pub fn stop(&mut self, pid: Pid) {
        if self.peers.contains_key(&pid) {
            self.transmits.push_back(Transmit { to: pid, bytes: bare(Kind::Shutdown, 1, pid), routed: None });
        }
    }

    /// Gives up on worker `pid` (it did not stop when asked, or fell silent): its
    /// connection is to be closed, and with `kill` its process ended.
    pub fn give_up(&mut self, pid: Pid, reason: String, kill: bool) {
        if let Some(peer) = self.peers.get_mut(&pid).filter(|p| p.given_up.is_none()) {
            peer.given_up = Some(reason);
            self.events.push_back(Event::Close { pid, kill });
        }
    }

    /// Shuts the cluster down: no new calls; every worker is asked to stop; calls still
    /// waiting when their worker ends fail with [`Error::ShutDown`].
    pub fn shutdown(&mut self) {
        self.shut = true;
        for pid in self.workers() {
            self.stop(pid);
        }
    }

    /// A frame from worker `from`. `Err` (a broken protocol, or its goodbye: [`STOPPED`])
    /// ends the conversation: close the connection and report its end.
    pub fn handle_frame(&mut self, now: Instant, from: Pid, frame: Frame) -> std::result::Result<(), String> {
        let h = frame.header;
        if h.src != from {
            return Err(format!("protocol error: worker {from} sent a frame claiming to be from pid {}", h.src));
        }
        let Some(peer) = self.peers.get_mut(&from) else { return Ok(()) }; // gone meanwhile
        peer.heard = now;
        match h.kind {
            Kind::Heartbeat => {}
            Kind::Reply | Kind::Failure if h.dst == 1 => {
                if let Some(w) = peer.calls.remove(&h.req) {
                    self.events.push_back(Event::Resolved(w, Ok(frame)));
                }
            }
            Kind::Reply | Kind::Failure => {
                peer.routed.remove(&(h.dst, h.req));
                if self.peers.contains_key(&h.dst) {
                    self.transmits.push_back(Transmit { to: h.dst, bytes: frame.into_wire(), routed: None });
                }
            }
            Kind::Call | Kind::Cast | Kind::Batch if h.dst == 1 => self.events.push_back(Event::RunHere(from, frame)),
            Kind::Call | Kind::Cast | Kind::Batch => {
                let expects_reply = h.kind != Kind::Cast;
                match self.peers.get_mut(&h.dst) {
                    Some(target) => {
                        self.routed += 1;
                        if expects_reply {
                            target.routed.insert((from, h.req));
                        }
                        let routed = expects_reply.then_some((from, h.req));
                        self.transmits.push_back(Transmit { to: h.dst, bytes: frame.into_wire(), routed });
                    }
                    None if expects_reply => self.fail_for(from, h.dst, h.req, Failure::NoSuchWorker(h.dst)),
                    None => {}
                }
            }
            Kind::Output => self.events.push_back(Event::Output(from, frame)),
            Kind::Shutdown => return Err(STOPPED.into()),
        }
        Ok(())
    }

    /// A transmit could not be sent (`error`): if it carried a routed call, its caller is
    /// told (busy, or the target is dead).
    pub fn transmit_failed(&mut self, transmit: Transmit, error: &Error) {
        let Some((caller, req)) = transmit.routed else { return };
        if let Some(target) = self.peers.get_mut(&transmit.to) {
            target.routed.remove(&(caller, req));
        }
        let failure = match error {
            Error::Busy { pid, reason } => Failure::Busy { pid: *pid, reason: reason.clone() },
            e => Failure::WorkerDied { pid: transmit.to, reason: e.to_string() },
        };
        self.fail_for(caller, transmit.to, req, failure);
    }

    /// Tells worker `caller` that its call `req` to `to` failed.
    fn fail_for(&mut self, caller: Pid, to: Pid, req: u64, failure: Failure) {
        if self.peers.contains_key(&caller) {
            if let Ok(bytes) = failure_frame(to, caller, req, &failure) {
                self.transmits.push_back(Transmit { to: caller, bytes, routed: None });
            }
        }
    }

    /// Worker `pid`'s connection ended (`reason`: what the reader saw). Every call on it is
    /// resolved, callers routed through it are told, and it is gone. Once per worker.
    pub fn handle_closed(&mut self, pid: Pid, reason: &str) {
        let Some(peer) = self.peers.remove(&pid) else { return };
        let reason = peer.given_up.unwrap_or_else(|| reason.to_string());
        for (_, w) in peer.calls {
            let error = if self.shut { Error::ShutDown } else { Error::WorkerDied { pid, reason: reason.clone() } };
            self.events.push_back(Event::Resolved(w, Err(error)));
        }
        for (caller, req) in peer.routed {
            self.fail_for(caller, pid, req, Failure::WorkerDied { pid, reason: reason.clone() });
        }
        self.events.push_back(Event::Gone { pid, reason });
    }

    /// The time has come (see [`poll_timeout`](Self::poll_timeout)): heartbeats go out, and
    /// workers silent for the timeout are given up on.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + self.liveness.interval;
        if self.shut {
            return;
        }
        let mut silent = Vec::new();
        for (&pid, peer) in &self.peers {
            self.transmits.push_back(Transmit { to: pid, bytes: bare(Kind::Heartbeat, 1, pid), routed: None });
            let silence = now.saturating_duration_since(peer.heard);
            if silence >= self.liveness.timeout && peer.given_up.is_none() {
                silent.push((pid, silence));
            }
        }
        for (pid, silence) in silent {
            self.give_up(pid, format!("no heartbeat for {} s (stopped, hung, or its node or network is gone)", secs(silence)), true);
        }
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    pub fn poll_timeout(&self) -> Instant {
        self.next_tick
    }

    /// The next bytes to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next thing that happened.
    pub fn poll_event(&mut self) -> Option<Event<W>> {
        self.events.pop_front()
    }
}

fn secs(d: Duration) -> u64 {
    d.as_secs()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::codec;
    use crate::protocol::frame::{FrameBuf, FrameReader, Header};

    /// A fake worker: answers each call with its request id doubled, or relays it to
    /// another worker when the call's function id says so; a stopped one answers nothing.
    struct FakeWorker {
        pid: Pid,
        stopped: bool,
        next_req: u64,
        /// Relays it made: its request id -> (original caller, original request id).
        relays: HashMap<u64, (Pid, u64)>,
    }

    fn frame(bytes: Vec<u8>) -> Frame {
        let mut r = FrameReader::new(1 << 20);
        r.extend(&bytes);
        r.next_frame().unwrap().unwrap()
    }

    fn call_frame(src: Pid, dst: Pid, req: u64, func: u64) -> Vec<u8> {
        let mut f = FrameBuf::new(Header { kind: Kind::Call, src, dst, req, func });
        codec::encode_into(&(req,), f.payload()).unwrap();
        f.finish().unwrap()
    }

    fn reply_frame(src: Pid, dst: Pid, req: u64, value: u64) -> Vec<u8> {
        let mut f = FrameBuf::new(Header { kind: Kind::Reply, src, dst, req, func: 0 });
        codec::encode_into(&value, f.payload()).unwrap();
        f.finish().unwrap()
    }

    /// Function ids of the fake: 0 answers, `RELAY_TO + pid` relays to `pid`.
    const RELAY_TO: u64 = 1000;

    impl FakeWorker {
        fn receive(&mut self, f: Frame) -> Vec<Vec<u8>> {
            if self.stopped {
                return vec![];
            }
            let h = f.header;
            match h.kind {
                Kind::Call if h.func >= RELAY_TO => {
                    let req = self.next_req;
                    self.next_req += 1;
                    self.relays.insert(req, (h.src, h.req));
                    vec![call_frame(self.pid, (h.func - RELAY_TO) as Pid, req, 0)]
                }
                Kind::Call => vec![reply_frame(self.pid, h.src, h.req, h.req * 2)],
                Kind::Reply => {
                    let (caller, their_req) = self.relays.remove(&h.req).expect("a reply to a relay");
                    let value: u64 = codec::decode(f.payload()).unwrap();
                    vec![reply_frame(self.pid, caller, their_req, value + 1)]
                }
                Kind::Failure => {
                    let (caller, their_req) = self.relays.remove(&h.req).expect("a failure of a relay");
                    vec![failure_frame(self.pid, caller, their_req, &codec::decode::<Failure>(f.payload()).unwrap()).unwrap()]
                }
                _ => vec![],
            }
        }
    }

    /// One master core, fake workers, and the wire between them: in-memory queues.
    struct Pair {
        core: MasterCore<u64>,
        workers: BTreeMap<Pid, FakeWorker>,
        now: Instant,
        /// Bytes on their way to the master, with their sender.
        to_master: VecDeque<(Pid, Vec<u8>)>,
        resolved: Vec<(u64, Result<Frame>)>,
        gone: Vec<(Pid, String)>,
        closed: Vec<(Pid, bool)>,
    }

    impl Pair {
        fn new(n: Pid) -> Pair {
            let now = Instant::now();
            let mut core = MasterCore::new(Liveness { interval: Duration::from_secs(5), timeout: Duration::from_secs(60) }, now);
            let mut workers = BTreeMap::new();
            for pid in 2..2 + n {
                core.add_worker(pid, now);
                workers.insert(pid, FakeWorker { pid, stopped: false, next_req: 1, relays: HashMap::new() });
            }
            Pair { core, workers, now, to_master: VecDeque::new(), resolved: vec![], gone: vec![], closed: vec![] }
        }

        fn call(&mut self, dst: Pid, func: u64, waiter: u64) -> u64 {
            let req = self.core.begin_call(dst, Some(waiter)).unwrap();
            let bytes = call_frame(1, dst, req, func);
            self.deliver_to_worker(dst, bytes);
            req
        }

        fn deliver_to_worker(&mut self, to: Pid, bytes: Vec<u8>) {
            if let Some(w) = self.workers.get_mut(&to) {
                for out in w.receive(frame(bytes)) {
                    self.to_master.push_back((to, out));
                }
            }
        }

        /// Moves everything until nothing moves.
        fn settle(&mut self) {
            loop {
                let mut moved = false;
                while let Some((from, bytes)) = self.to_master.pop_front() {
                    moved = true;
                    if let Err(reason) = self.core.handle_frame(self.now, from, frame(bytes)) {
                        self.core.handle_closed(from, &reason);
                    }
                }
                while let Some(t) = self.core.poll_transmit() {
                    moved = true;
                    self.deliver_to_worker(t.to, t.bytes);
                }
                while let Some(e) = self.core.poll_event() {
                    moved = true;
                    match e {
                        Event::Resolved(w, r) => self.resolved.push((w, r)),
                        Event::Gone { pid, reason } => self.gone.push((pid, reason)),
                        Event::Close { pid, kill } => {
                            self.closed.push((pid, kill));
                            self.core.handle_closed(pid, "its connection closed");
                        }
                        Event::RunHere(..) | Event::Output(..) => {}
                    }
                }
                if !moved {
                    return;
                }
            }
        }

        fn advance(&mut self, d: Duration) {
            self.now += d;
            // worker heartbeats: every live one speaks each interval
            for (&pid, w) in &self.workers {
                if !w.stopped {
                    self.to_master.push_back((pid, bare(Kind::Heartbeat, pid, 1)));
                }
            }
            self.core.handle_timeout(self.now);
            self.settle();
        }

        fn value(&self, waiter: u64) -> Option<std::result::Result<u64, String>> {
            self.resolved.iter().find(|(w, _)| *w == waiter).map(|(_, r)| match r {
                Ok(f) if f.header.kind == Kind::Reply => Ok(codec::decode(f.payload()).unwrap()),
                Ok(f) => Err(crate::error::Error::from(codec::decode::<Failure>(f.payload()).unwrap()).to_string()),
                Err(e) => Err(e.to_string()),
            })
        }
    }

    #[test]
    fn calls_resolve_with_their_own_replies() {
        let mut p = Pair::new(2);
        let a = p.call(2, 0, 10);
        let b = p.call(3, 0, 11);
        p.settle();
        assert_eq!(p.value(10), Some(Ok(a * 2)));
        assert_eq!(p.value(11), Some(Ok(b * 2)));
    }

    #[test]
    fn a_worker_dying_mid_call_fails_exactly_its_calls() {
        let mut p = Pair::new(2);
        p.workers.get_mut(&2).unwrap().stopped = true;
        p.call(2, 0, 1);
        p.call(3, 0, 2);
        p.settle();
        p.core.handle_closed(2, "its connection closed");
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
        p.workers.get_mut(&2).unwrap().stopped = true; // SIGSTOP: no replies, no heartbeats
        p.call(2, 0, 1);
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
    fn routed_nested_calls_come_back_through_the_master() {
        let mut p = Pair::new(2);
        // the master asks 2 to relay to 3: 2 calls 3 through the master, 3 answers (its
        // request id 1, doubled), 2 adds one and answers the master
        let req = p.core.begin_call(2, Some(7)).unwrap();
        p.deliver_to_worker(2, call_frame(1, 2, req, RELAY_TO + 3));
        p.settle();
        assert_eq!(p.value(7), Some(Ok(3)));
        assert_eq!(p.core.routed_frames(), 1);
    }

    #[test]
    fn a_routed_callers_target_dying_fails_the_caller_not_the_master() {
        let mut p = Pair::new(2);
        p.workers.get_mut(&3).unwrap().stopped = true;
        let req = p.core.begin_call(2, Some(5)).unwrap();
        p.deliver_to_worker(2, call_frame(1, 2, req, RELAY_TO + 3));
        p.settle();
        assert_eq!(p.value(5), None, "3 is silent, 2 waits");
        p.core.handle_closed(3, "its connection closed");
        p.settle();
        let Some(Err(why)) = p.value(5) else { panic!("the relay ended") };
        assert!(why.contains("worker 3 died") && why.contains("its connection closed"), "2 was told, and passed it on: {why}");
    }

    #[test]
    fn a_call_to_a_worker_that_is_gone_is_refused_for_the_caller() {
        let mut p = Pair::new(1);
        let req = p.core.begin_call(2, Some(3)).unwrap();
        p.deliver_to_worker(2, call_frame(1, 2, req, RELAY_TO + 9));
        p.settle();
        let Some(Err(why)) = p.value(3) else { panic!("ended") };
        assert!(why.contains("no worker with pid 9"), "{why}");
    }

    #[test]
    fn shutdown_with_calls_in_flight_fails_them_with_shutdown() {
        let mut p = Pair::new(2);
        p.workers.get_mut(&2).unwrap().stopped = true;
        p.call(2, 0, 1);
        p.core.shutdown();
        assert!(matches!(p.core.begin_call(3, Some(2)), Err(Error::ShutDown)));
        let stops: Vec<Pid> = std::iter::from_fn(|| p.core.poll_transmit()).filter(|t| frame(t.bytes.clone()).header.kind == Kind::Shutdown).map(|t| t.to).collect();
        assert_eq!(stops, vec![2, 3], "every worker is asked to stop");
        p.core.handle_closed(2, "did not stop");
        p.settle();
        assert!(matches!(p.resolved.as_slice(), [(1, Err(Error::ShutDown))]));
    }

    #[test]
    fn a_frame_that_lies_about_its_sender_ends_that_conversation() {
        let mut p = Pair::new(2);
        let err = p.core.handle_frame(p.now, 2, frame(reply_frame(3, 1, 1, 0))).unwrap_err();
        assert!(err.contains("claiming to be from pid 3"), "{err}");
    }

    /// Random interleavings of calls, replies, deaths, silences and shutdown: every call is
    /// resolved exactly once, and nothing is resolved that was not called.
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
            for _ in 0..200 {
                match next(12) {
                    0..=5 => {
                        let dst = 2 + next(n as u64 + 1) as Pid; // sometimes one past the last
                        let func = if next(3) == 0 { RELAY_TO + 2 + next(n as u64) } else { 0 };
                        if let Ok(req) = p.core.begin_call(dst, Some(made)) {
                            p.deliver_to_worker(dst, call_frame(1, dst, req, func));
                            made += 1;
                        }
                    }
                    6 => {
                        let pid = 2 + next(n as u64) as Pid;
                        p.workers.get_mut(&pid).unwrap().stopped = true;
                    }
                    7 => {
                        let pid = 2 + next(n as u64) as Pid;
                        p.core.handle_closed(pid, "killed");
                    }
                    8 => p.advance(Duration::from_secs(5 * next(20))),
                    9 if next(10) == 0 => p.core.shutdown(),
                    _ => p.settle(),
                }
            }
            // the end: every worker's connection closes
            for pid in 2..2 + n {
                p.core.handle_closed(pid, "closed at the end");
            }
            p.settle();
            let mut seen: Vec<u64> = p.resolved.iter().map(|(w, _)| *w).collect();
            seen.sort();
            assert_eq!(seen, (0..made).collect::<Vec<_>>(), "round {round}: each of {made} calls resolved exactly once");
        }
    }
}
