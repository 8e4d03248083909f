//! The master's side of the protocol, without I/O and without a clock (as quinn-proto's
//! `Connection` is): the workers it talks to, the calls waiting for their replies, the calls
//! it routes from one worker to another, and the heartbeats that tell a silent worker from a
//! live one. It is fed frames, connection ends and the time; it is asked what to send, what
//! happened, and when to wake next. The driver (one I/O runtime, a lock around the core) does
//! the sending, runs calls addressed to the master, and calls the user back.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::ids::Pid;

use super::failure::{Failure, failure_frame};
use super::frame::{Frame, Kind, Outgoing, bare};
use super::id_map::{IdMap, sorted_keys};
use super::liveness::Liveness;

/// What a worker's conversation ended with when it said goodbye.
pub const STOPPED: &str = "stopped";

/// Bytes to send to a worker.
#[derive(Debug)]
pub struct Transmit {
    /// The worker.
    pub to: Pid,
    /// The frame, length prefix included.
    pub frame: Outgoing,
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
    /// A worker is gone, for this reason (its calls' ends follow).
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
    calls: Calls<W>,
    /// What few calls touch, apart: the entry that every call touches stays small (a round
    /// over a thousand workers touches each entry once, from cold).
    rare: Box<Rare>,
}

/// What a worker's entry holds that a plain call does not touch.
#[derive(Default)]
struct Rare {
    /// Calls other workers routed to it: (caller, their request id).
    routed: HashSet<(Pid, u64)>,
    /// Why we closed it, if we did (said instead of "connection closed").
    given_up: Option<String>,
}

/// Our calls to one worker, by request id. The first is kept in place, more in a map: a
/// worker mostly has one call at a time, and then a round of `everywhere` over a thousand
/// workers touches no table of each (whose lines all come cold).
struct Calls<W> {
    first: Option<(u64, W)>,
    more: Box<IdMap<W>>,
}

impl<W> Calls<W> {
    fn new() -> Self {
        Calls { first: None, more: Box::default() }
    }

    fn insert(&mut self, req: u64, waiter: W) {
        match self.first {
            None => self.first = Some((req, waiter)),
            Some(_) => {
                self.more.insert(req, waiter);
            }
        }
    }

    fn remove(&mut self, req: u64) -> Option<W> {
        match self.first {
            Some((first, _)) if first == req => self.first.take().map(|(_, w)| w),
            _ => self.more.remove(&req),
        }
    }

    fn is_empty(&self) -> bool {
        self.first.is_none() && self.more.is_empty()
    }

    fn into_waiters(self) -> impl Iterator<Item = W> {
        self.first.map(|(_, w)| w).into_iter().chain(self.more.into_values())
    }
}

/// The master's protocol state.
pub struct MasterCore<W> {
    liveness: Liveness,
    /// Boxed, so that each stays where it is: a driver may have it fetched into the caches
    /// ahead of use ([`state_address`](Self::state_address)).
    peers: IdMap<Box<Peer<W>>, Pid>,
    shut: bool,
    routed: u64,
    next_tick: Instant,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event<W>>,
}

impl<W> MasterCore<W> {
    /// A master with no workers yet, first heartbeat due `liveness.interval` after `now`.
    pub fn new(liveness: Liveness, now: Instant) -> Self {
        MasterCore { liveness, peers: IdMap::default(), shut: false, routed: 0, next_tick: now + liveness.interval, transmits: VecDeque::new(), events: VecDeque::new() }
    }

    /// A worker joined (its handshake is done).
    pub fn add_worker(&mut self, pid: Pid, now: Instant) {
        self.peers.insert(pid, Box::new(Peer { heard: now, next_req: 1, calls: Calls::new(), rare: Box::default() }));
    }

    /// Where worker `pid`'s state lies, and its size, for as long as it is in the cluster:
    /// a driver that goes through many workers in turn has it brought into the caches a step
    /// ahead. Only a hint: nothing may be read through it.
    pub fn state_address(&self, pid: Pid) -> Option<(*const u8, usize)> {
        self.peers.get(&pid).map(|peer| ((&raw const **peer).cast(), std::mem::size_of::<Peer<W>>()))
    }

    /// The workers, ascending.
    pub fn workers(&self) -> Vec<Pid> {
        sorted_keys(&self.peers)
    }

    /// Whether a call still waits for its reply.
    #[cfg_attr(not(any(feature = "mpi", test)), allow(dead_code))]
    pub fn awaits_replies(&self) -> bool {
        self.peers.values().any(|p| !p.calls.is_empty())
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
        let Some(peer) = self.peers.get_mut(&dst) else { return Err(Error::NoSuchWorker(dst)) };
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
        self.peers.get_mut(&dst)?.calls.remove(req)
    }

    /// Asks worker `pid` to finish and exit.
    pub fn stop(&mut self, pid: Pid) {
        if self.peers.contains_key(&pid) {
            self.transmits.push_back(Transmit { to: pid, frame: bare(Kind::Shutdown, 1, pid).into(), routed: None });
        }
    }

    /// Gives up on worker `pid` (it did not stop when asked, or fell silent): its
    /// connection is to be closed, and with `kill` its process ended.
    pub fn give_up(&mut self, pid: Pid, reason: String, kill: bool) {
        if let Some(peer) = self.peers.get_mut(&pid).filter(|p| p.rare.given_up.is_none()) {
            peer.rare.given_up = Some(reason);
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
                if let Some(w) = peer.calls.remove(h.req) {
                    self.events.push_back(Event::Resolved(w, Ok(frame)));
                }
            }
            Kind::Reply | Kind::Failure => {
                peer.rare.routed.remove(&(h.dst, h.req));
                if self.peers.contains_key(&h.dst) {
                    self.transmits.push_back(Transmit { to: h.dst, frame: frame.into_wire(), routed: None });
                }
            }
            Kind::Call | Kind::Cast | Kind::Batch if h.dst == 1 => self.events.push_back(Event::RunHere(from, frame)),
            Kind::Call | Kind::Cast | Kind::Batch => {
                let expects_reply = h.kind != Kind::Cast;
                match self.peers.get_mut(&h.dst) {
                    Some(target) => {
                        self.routed += 1;
                        if expects_reply {
                            target.rare.routed.insert((from, h.req));
                        }
                        let routed = expects_reply.then_some((from, h.req));
                        self.transmits.push_back(Transmit { to: h.dst, frame: frame.into_wire(), routed });
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
            target.rare.routed.remove(&(caller, req));
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
                self.transmits.push_back(Transmit { to: caller, frame: bytes.into(), routed: None });
            }
        }
    }

    /// Worker `pid`'s connection ended (`reason`: what the reader saw). Every call on it is
    /// resolved, callers routed through it are told, and it is gone. Once per worker.
    pub fn handle_closed(&mut self, pid: Pid, reason: &str) {
        let Some(peer) = self.peers.remove(&pid).map(|peer| *peer) else { return };
        let reason = peer.rare.given_up.unwrap_or_else(|| reason.to_string());
        // gone first: whoever a failed call wakes finds the worker out of the table
        self.events.push_back(Event::Gone { pid, reason: reason.clone() });
        for w in peer.calls.into_waiters() {
            let error = if self.shut { Error::ShutDown } else { Error::WorkerDied { pid, reason: reason.clone() } };
            self.events.push_back(Event::Resolved(w, Err(error)));
        }
        for (caller, req) in peer.rare.routed {
            self.fail_for(caller, pid, req, Failure::WorkerDied { pid, reason: reason.clone() });
        }
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
            self.transmits.push_back(Transmit { to: pid, frame: bare(Kind::Heartbeat, 1, pid).into(), routed: None });
            let silence = now.saturating_duration_since(peer.heard);
            if silence >= self.liveness.timeout && peer.rare.given_up.is_none() {
                silent.push((pid, silence));
            }
        }
        silent.sort_unstable(); // given up in pid order
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

    /// Nothing left to send and nothing left to tell.
    pub fn is_drained(&self) -> bool {
        self.transmits.is_empty() && self.events.is_empty()
    }
}

fn secs(d: Duration) -> u64 {
    d.as_secs()
}
