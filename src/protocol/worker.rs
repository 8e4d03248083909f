//! The worker's side of the protocol, without I/O and without a clock: its links (to the
//! master, and direct links to other workers; two workers that dial each other at once
//! have two links, so links have ids of their own), the calls it made on each and still waits
//! for, whether each peer was heard from, and what an incoming frame asks of it. Fed
//! frames, link ends and the time; each input returns what to do. The driver (the serving
//! thread and the links' readers, around one lock) runs calls, sends, and wakes callers.
//!
//! A frame is counted, not timed: reading the clock for each one would cost a worker among a
//! thousand more than its whole call. The time a peer was last heard is the first look at its
//! health that found new frames; looks come every heartbeat interval, so a silence is seen at
//! most one interval after the timeout, never before it. Calls from the master do not even
//! pass through the core: the driver hands them on and counts them, and tells the count at
//! the next look ([`WorkerCore::count_frames`]).

use std::time::Instant;

use crate::error::{Error, RemoteError, Result};
use crate::ids::Pid;
use crate::sys::TcpPulse;

use super::failure::{Failure, failure_frame};
use super::frame::{Frame, Header, Kind, LEN_PREFIX, Outgoing};
use super::handshake::Terms;
use super::id_map::IdMap;
use super::liveness::Health;

/// What a frame asks of the worker.
#[derive(Debug)]
pub(crate) enum Incoming<W> {
    /// Run this call; its reply goes back on the link it came on.
    Run(Frame),
    /// A call of ours ended: wake its waiter with this reply or failure.
    Resolved(W, Frame),
    /// The master asked this worker to stop: finish, say goodbye, exit. These calls of ours
    /// will never end: fail them.
    Stop(Vec<W>),
    /// Nothing (a heartbeat; a reply nobody waits for any more).
    Nothing,
}

/// One connection of a worker, as its core knows it.
pub(crate) type LinkId = u64;

struct LinkState<W> {
    /// The pid on the other end (1: the master).
    peer: Pid,
    /// Frames received on it, and how many of them the last look at its health had seen.
    frames: u64,
    frames_looked_at: u64,
    /// When a look at its health last found new frames (or when it came up).
    heard: Instant,
    next_req: u64,
    /// Our calls on it, by request id.
    calls: IdMap<W>,
    /// Set once it is gone; new calls on it fail at once with this reason.
    dead: Option<String>,
    /// Why we gave up on the peer ourselves (no heartbeat), said instead of "closed".
    given_up: Option<String>,
}

/// A worker's protocol state.
pub(crate) struct WorkerCore<W> {
    terms: Terms,
    links: IdMap<LinkState<W>>,
    next_link: LinkId,
}

impl<W> WorkerCore<W> {
    /// A worker admitted on `terms`, with no links yet.
    pub(crate) fn new(terms: Terms) -> Self {
        WorkerCore { terms, links: IdMap::default(), next_link: 0 }
    }

    /// The terms it was admitted on.
    pub(crate) fn terms(&self) -> Terms {
        self.terms
    }

    /// A link to `peer` (1: the master) is up: its id.
    pub(crate) fn add_link(&mut self, peer: Pid, now: Instant) -> LinkId {
        let id = self.next_link;
        self.next_link += 1;
        self.links.insert(id, LinkState { peer, frames: 0, frames_looked_at: 0, heard: now, next_req: 1, calls: IdMap::default(), dead: None, given_up: None });
        id
    }

    /// Starts a call on `link`: its request id, with `waiter` told of its end (none for a
    /// cast). If its frame cannot be sent, [`cancel`](Self::cancel) it.
    pub(crate) fn begin_call(&mut self, link: LinkId, waiter: Option<W>) -> Result<u64> {
        let link = self.links.get_mut(&link).ok_or_else(|| Error::Protocol(format!("no link {link}")))?;
        if let Some(reason) = &link.dead {
            return Err(link_error(link.peer, reason));
        }
        let req = link.next_req;
        link.next_req += 1;
        if let Some(w) = waiter {
            link.calls.insert(req, w);
        }
        Ok(req)
    }

    /// Forgets call `req` on `link`; returns its waiter if it had not ended.
    pub(crate) fn cancel(&mut self, link: LinkId, req: u64) -> Option<W> {
        self.links.get_mut(&link)?.calls.remove(&req)
    }

    /// A frame that arrived on `link`. `Err` breaks the link (a peer that lies about who it
    /// is, or sends what a link of its kind never carries).
    #[inline]
    pub(crate) fn handle_frame(&mut self, link: LinkId, frame: Frame) -> std::result::Result<Incoming<W>, String> {
        let h = frame.header;
        let Some(state) = self.links.get_mut(&link) else { return Ok(Incoming::Nothing) };
        let direct = state.peer != 1;
        if direct && h.src != state.peer {
            return Err(format!("worker {} sent a frame claiming to be from pid {}", state.peer, h.src));
        }
        state.frames += 1;
        if runs(h.kind) {
            return Ok(Incoming::Run(frame)); // ahead of the match: a call reads no jump table
        }
        Ok(match h.kind {
            Kind::Reply | Kind::Failure => match state.calls.remove(&h.req) {
                Some(w) => Incoming::Resolved(w, frame),
                None => Incoming::Nothing,
            },
            Kind::Call | Kind::Cast | Kind::Batch => Incoming::Run(frame), // returned above
            Kind::Heartbeat => Incoming::Nothing,
            Kind::Shutdown if !direct => Incoming::Stop(self.end_all("the worker is shutting down")),
            Kind::Output if !direct => Incoming::Nothing,
            other => return Err(format!("unexpected {other:?} frame on a direct link")),
        })
    }

    /// Whether a call of this worker still waits for its reply.
    #[cfg_attr(not(any(feature = "mpi", test)), allow(dead_code))]
    pub(crate) fn awaits_replies(&self) -> bool {
        self.links.values().any(|l| !l.calls.is_empty())
    }

    /// `link` ended (`reason`: what its reader saw). Returns why, as it should be reported,
    /// and the waiters of its calls, which never end: fail them.
    pub(crate) fn handle_closed(&mut self, link: LinkId, reason: &str) -> (String, Vec<W>) {
        let Some(link) = self.links.get_mut(&link) else { return (reason.to_string(), Vec::new()) };
        let reason = link.dead.clone().or_else(|| link.given_up.clone()).unwrap_or_else(|| reason.to_string());
        link.dead = Some(reason.clone());
        (reason, link.calls.drain().map(|(_, w)| w).collect())
    }

    /// Gives up on the peer of `link` (it fell silent): close the link; its end is reported
    /// with `reason`.
    pub(crate) fn give_up(&mut self, link: LinkId, reason: String) {
        if let Some(link) = self.links.get_mut(&link) {
            link.given_up.get_or_insert(reason);
        }
    }

    /// True once `link` is gone (or never was).
    pub(crate) fn is_dead(&self, link: LinkId) -> bool {
        self.links.get(&link).is_none_or(|l| l.dead.is_some())
    }

    /// `frames` more came on `link`, counted by the driver (see [`runs_uncounted`]).
    pub(crate) fn count_frames(&mut self, link: LinkId, frames: u64) {
        if let Some(l) = self.links.get_mut(&link) {
            l.frames += frames;
        }
    }

    /// How the peer of `link` is doing at `now`, from what we heard of it and, for TCP, what
    /// the kernel knows. Frames that came since the last look count as heard `now`.
    pub(crate) fn health(&mut self, link: LinkId, now: Instant, kernel: Option<TcpPulse>) -> Health {
        let heard = self.links.get_mut(&link).map_or(now, |l| {
            if l.frames != l.frames_looked_at {
                l.frames_looked_at = l.frames;
                l.heard = now;
            }
            l.heard
        });
        self.terms.liveness.judge(now.saturating_duration_since(heard), kernel)
    }

    /// Marks every link dead with `reason`; returns the waiters of every call.
    fn end_all(&mut self, reason: &str) -> Vec<W> {
        let mut waiters = Vec::new();
        for link in self.links.values_mut() {
            link.dead.get_or_insert_with(|| reason.to_string());
            waiters.extend(link.calls.drain().map(|(_, w)| w));
        }
        waiters
    }
}

/// The frame that answers `call` on a worker admitted on `terms`: `reply` as it is, or,
/// when it is larger than the cluster accepts, a failure that says so (`function` names the
/// call).
#[inline]
pub(crate) fn answer(terms: &Terms, call: Header, reply: Outgoing, function: impl FnOnce() -> String) -> Result<Outgoing> {
    if reply.len() <= terms.max_frame + LEN_PREFIX {
        return Ok(reply);
    }
    too_big(terms, call, reply.len(), function())
}

/// The failure that replaces a reply of `len` bytes, too big for the cluster's frames.
#[cold]
#[inline(never)]
fn too_big(terms: &Terms, call: Header, len: usize, function: String) -> Result<Outgoing> {
    let max = terms.max_frame;
    let message = format!("its result of {len} bytes exceeds the cluster's max_frame of {max}; raise ClusterBuilder::max_frame");
    let failure = Failure::Remote(RemoteError { pid: terms.pid, function, message, location: None });
    failure_frame(terms.pid, call.src, call.req, &failure).map(Outgoing::from)
}

/// Whether a frame of `kind` is a call to run here.
fn runs(kind: Kind) -> bool {
    matches!(kind, Kind::Call | Kind::Cast | Kind::Batch)
}

/// Whether a frame of `kind` from `peer` needs nothing of the core but a count: a call from
/// the master, which [`WorkerCore::handle_frame`] would only count and hand on to be run.
/// The driver then counts it itself and tells the core ([`WorkerCore::count_frames`]).
#[inline]
pub(crate) fn runs_uncounted(peer: Pid, kind: Kind) -> bool {
    peer == 1 && runs(kind)
}

/// The error for a call on the link to `peer`, which is gone for `reason`.
pub(crate) fn link_error(peer: Pid, reason: &str) -> Error {
    if peer == 1 {
        Error::MasterGone(reason.to_string())
    } else {
        Error::WorkerDied { pid: peer, reason: reason.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::{FrameBuf, FrameReader};
    use crate::protocol::liveness::Liveness;

    fn reply(src: Pid, req: u64) -> Frame {
        let mut reader = FrameReader::new(1 << 10);
        reader.extend(&FrameBuf::new(Header { kind: Kind::Reply, src, dst: 2, req, func: 0, words: 0 }).finish().unwrap());
        reader.next_frame().unwrap().unwrap()
    }

    #[test]
    fn two_links_to_one_peer_keep_their_calls_apart() {
        // workers 2 and 3 dialled each other at once: two links, request ids from 1 on each
        let now = Instant::now();
        let mut core = WorkerCore::new(Terms { pid: 2, direct_links: true, max_frame: 1 << 10, liveness: Liveness::default() });
        let (a, b) = (core.add_link(3, now), core.add_link(3, now));
        assert_eq!((core.begin_call(a, Some("on a")).unwrap(), core.begin_call(b, Some("on b")).unwrap()), (1, 1));
        assert!(matches!(core.handle_frame(b, reply(3, 1)), Ok(Incoming::Resolved("on b", _))));
        let (_, failed) = core.handle_closed(a, "closed");
        assert_eq!(failed, vec!["on a"], "closing one link fails only its calls");
        assert!(core.is_dead(a) && !core.is_dead(b));
    }

    #[test]
    fn a_direct_link_that_lies_about_its_sender_is_broken() {
        let now = Instant::now();
        let mut core = WorkerCore::<()>::new(Terms { pid: 2, direct_links: true, max_frame: 1 << 10, liveness: Liveness::default() });
        let link = core.add_link(3, now);
        let err = core.handle_frame(link, reply(4, 1)).unwrap_err();
        assert!(err.contains("worker 3 sent a frame claiming to be from pid 4"), "{err}");
    }

    #[test]
    fn frames_the_driver_counted_are_heard_at_the_next_look() {
        let start = Instant::now();
        let liveness = Liveness::default();
        let mut core = WorkerCore::<()>::new(Terms { pid: 2, direct_links: false, max_frame: 1 << 10, liveness });
        let uplink = core.add_link(1, start);
        let late = start + liveness.timeout;
        assert!(runs_uncounted(1, Kind::Call) && runs_uncounted(1, Kind::Batch), "calls from the master");
        assert!(!runs_uncounted(3, Kind::Call) && !runs_uncounted(1, Kind::Reply) && !runs_uncounted(1, Kind::Shutdown), "not a direct link's call, nor a reply or a stop");
        core.count_frames(uplink, 3); // calls the driver handed on without the core
        assert!(matches!(core.health(uplink, late, None), Health::Alive), "the calls count as heard at this look");
        assert!(matches!(core.health(uplink, late + liveness.timeout, None), Health::Silent(_)), "and then nothing came");
        core.count_frames(uplink, 0);
        assert!(matches!(core.health(uplink, late + liveness.timeout * 2, None), Health::Silent(_)), "no count is no frame");
    }
}
