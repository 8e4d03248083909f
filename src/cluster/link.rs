//! A worker's connection to a peer (its master, or another worker): its sender, and its
//! share of the worker's protocol core ([`WorkerCore`]: the calls waiting for a reply on
//! it, when the peer was last heard from). Sending never waits on the peer (see
//! [`Out`]). (The master keeps its calls in its own core.)

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};


use clusterman_macros::call_path;

use crate::error::{Error, Result};
use crate::ids::Pid;
use crate::protocol::worker::{Incoming, LinkId, WorkerCore, link_error, runs_uncounted};
use crate::codec::HeldWords;
use crate::protocol::{Frame, Header, Health, Outgoing, Terms, call_frame};
use crate::transport::Out;

use super::future::Forgets;
use super::slot::Waiter;

/// The protocol core of this worker, shared by its links.
pub(crate) type SharedCore = Arc<Mutex<WorkerCore<Waiter>>>;

/// What is left for the serving thread once a frame's replies are delivered.
pub(crate) enum Received {
    /// Run this call; answer on the link it came on.
    Run(Frame),
    /// The master said stop.
    Stop,
    /// Nothing.
    Nothing,
}

/// A connection to one peer.
pub(crate) struct Link {
    /// The pid on the other end.
    pub peer: Pid,
    /// Its id in the worker's core.
    id: LinkId,
    out: Out,
    core: SharedCore,
    /// The worker's terms of admission, at hand without the core's lock.
    terms: Terms,
    /// Calls from the master counted here, not in the core: the core learns of them at the
    /// next look at the master's health. A worker among a thousand finds the core's lock
    /// and map cold at every call; a call needs nothing else from them.
    calls_uncounted: AtomicU64,
    /// The master said stop (on this link, its uplink): known without the core's lock.
    stopping: AtomicBool,
}

impl Link {
    /// A link to `peer`, sending through `out`, registered with the worker's `core`.
    pub(crate) fn new(core: &SharedCore, peer: Pid, out: Out) -> Arc<Link> {
        let (id, terms) = {
            let mut locked = core.lock().expect("core lock");
            (locked.add_link(peer, Instant::now()), locked.terms())
        };
        Arc::new(Link { peer, id, out, core: core.clone(), terms, calls_uncounted: AtomicU64::new(0), stopping: AtomicBool::new(false) })
    }

    /// The terms this worker was admitted on.
    pub(crate) fn terms(&self) -> Terms {
        self.terms
    }

    /// The worker's protocol core.
    #[inline]
    pub(crate) fn core(&self) -> std::sync::MutexGuard<'_, WorkerCore<Waiter>> {
        self.core.lock().expect("core lock")
    }

    /// Sends one finished frame (prefix included) without waiting: a peer whose connection
    /// has too much unread data makes this fail with [`Error::Busy`].
    pub(crate) fn send(&self, frame: impl Into<Outgoing>) -> Result<()> {
        self.out.send(frame.into(), None).map_err(|e| self.send_error(e))
    }

    /// Brings the link's send state into the caches ahead of a send.
    #[inline]
    pub(crate) fn prefetch(&self) {
        self.out.prefetch();
    }

    /// Sends one frame, waiting up to `patience` for room if the connection is backed up:
    /// for a worker's replies and output, which must not be dropped.
    #[inline]
    pub(crate) fn send_patiently(&self, frame: impl Into<Outgoing>, patience: Duration) -> Result<()> {
        self.out.send(frame.into(), Some(patience)).map_err(|e| self.send_error(e))
    }

    fn send_error(&self, e: std::io::Error) -> Error {
        match e.kind() {
            std::io::ErrorKind::WouldBlock => Error::Busy { pid: self.peer, reason: e.to_string() },
            _ => link_error(self.peer, &e.to_string()),
        }
    }

    /// Sends a call (`header.req` is filled in here) whose payload `encode` writes,
    /// registering `waiter` first so a fast reply cannot overtake it. Returns the request id.
    pub(crate) fn call(&self, header: Header, payload_hint: usize, encode: impl FnOnce(&mut Vec<u8>) -> Result<Option<HeldWords>>, waiter: Option<Waiter>) -> Result<u64> {
        let (req, max_frame) = {
            let mut core = self.core();
            (core.begin_call(self.id, waiter)?, core.terms().max_frame)
        };
        let sent = call_frame(Header { req, ..header }, payload_hint, encode, max_frame).and_then(|frame| self.send(frame));
        if let Err(e) = sent {
            self.forget(req);
            return Err(e);
        }
        Ok(req)
    }

    /// Forgets a call whose caller stopped waiting (its reply, if any, is dropped).
    pub(crate) fn forget(&self, req: u64) {
        let waiter = self.core().cancel(self.id, req);
        drop(waiter); // outside the lock
    }

    /// A frame from the peer: replies go to whoever waits for them; what is left for the
    /// serving thread is returned. `Err` breaks the link.
    #[inline]
    #[call_path]
    pub(crate) fn receive(&self, frame: Frame) -> std::result::Result<Received, String> {
        if runs_uncounted(self.peer, frame.header.kind) {
            self.calls_uncounted.fetch_add(1, Ordering::Relaxed);
            return Ok(Received::Run(frame));
        }
        let incoming = match self.core().handle_frame(self.id, frame)? {
            Incoming::Run(frame) => return Ok(Received::Run(frame)), // ahead of the match: no jump table
            other => other,
        };
        Ok(match incoming {
            Incoming::Run(frame) => Received::Run(frame),
            Incoming::Resolved(w, frame) => {
                w.deliver(Ok(frame));
                Received::Nothing
            }
            Incoming::Stop(waiters) => {
                self.stopping.store(true, Ordering::SeqCst);
                for w in waiters {
                    w.deliver(Err(Error::ShutDown)); // this worker's own calls end with it
                }
                Received::Stop
            }
            Incoming::Nothing => Received::Nothing,
        })
    }

    /// The link ended (`reason`: what its reader saw): every call waiting on it fails.
    pub(crate) fn closed(&self, reason: &str) {
        let (reason, waiters) = self.core().handle_closed(self.id, reason);
        for w in waiters {
            w.deliver(Err(link_error(self.peer, &reason)));
        }
    }

    /// True once the connection is gone.
    pub(crate) fn is_dead(&self) -> bool {
        self.core().is_dead(self.id)
    }

    /// Closes the connection; the peer sees its end, our reader wakes up.
    pub(crate) fn close(&self) {
        self.out.close();
    }

    /// Gives up on the peer (it went silent): closes the connection and remembers why, so
    /// its end is reported with that instead of "connection closed".
    pub(crate) fn give_up(&self, reason: String) {
        self.core().give_up(self.id, reason);
        self.close();
    }

    /// How the peer is doing: what we heard from it, and what the kernel knows.
    pub(crate) fn health(&self) -> Health {
        let calls = self.calls_uncounted.swap(0, Ordering::Relaxed);
        let mut core = self.core();
        core.count_frames(self.id, calls);
        core.health(self.id, Instant::now(), self.out.pulse())
    }

    /// The master said stop on this link.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

impl Forgets for Link {
    fn forget_call(&self, _peer: Pid, req: u64) {
        self.forget(req);
    }
}
