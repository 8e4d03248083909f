//! A worker's connection to a peer (its master, or another worker): its sender, the table of
//! calls waiting for a reply on it, and when the peer was last heard from. Sending never
//! waits on the peer (see [`FrameOut`]). (The master keeps its calls in its protocol core.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::ids::Pid;
use crate::error::{Error, Result};
use crate::protocol::{Frame, FrameBuf, Header, Health, LEN_PREFIX, Liveness};
use crate::sys;
use crate::transport::FrameOut;

use super::slot::Waiter;

#[derive(Default)]
struct Pending {
    calls: HashMap<u64, Waiter>,
    /// Set once the connection is gone; new calls fail at once with this reason.
    dead: Option<String>,
    /// Why we gave up on the peer ourselves (no heartbeat), for whoever sees the end.
    given_up: Option<String>,
}

/// A connection to one peer.
pub(crate) struct Link {
    /// The pid on the other end.
    pub peer: Pid,
    out: Box<dyn FrameOut>,
    pending: Mutex<Pending>,
    /// Signalled when the link dies.
    died: Condvar,
    next_req: AtomicU64,
    /// Largest frame the peer accepts.
    max_frame: usize,
    /// [`sys::now_ms`] when the last frame from the peer arrived.
    heard: AtomicU64,
}

impl Link {
    pub(crate) fn new(peer: Pid, out: Box<dyn FrameOut>, max_frame: usize) -> Arc<Link> {
        Arc::new(Link {
            peer,
            out,
            pending: Mutex::new(Pending::default()),
            died: Condvar::new(),
            next_req: AtomicU64::new(1),
            max_frame,
            heard: AtomicU64::new(sys::now_ms()),
        })
    }

    /// Sends one finished frame (prefix included) without waiting: a peer whose connection
    /// has too much unread data makes this fail with [`Error::Busy`].
    pub(crate) fn send(&self, frame: Vec<u8>) -> Result<()> {
        self.out.send(frame, None).map_err(|e| self.send_error(e))
    }

    /// Sends one frame, waiting (until `deadline`) for room if the connection is backed up:
    /// for a worker's replies and output, which must not be dropped.
    pub(crate) fn send_patiently(&self, frame: Vec<u8>, deadline: Instant) -> Result<()> {
        self.out.send(frame, Some(deadline)).map_err(|e| self.send_error(e))
    }

    fn send_error(&self, e: std::io::Error) -> Error {
        match e.kind() {
            std::io::ErrorKind::WouldBlock => Error::Busy { pid: self.peer, reason: e.to_string() },
            _ => self.died(&e.to_string()),
        }
    }

    /// The error for a call that cannot complete because this link is gone.
    fn died(&self, reason: &str) -> Error {
        if self.peer == 1 {
            Error::MasterGone(reason.to_string()) // only a worker has a link to pid 1
        } else {
            Error::WorkerDied { pid: self.peer, reason: reason.to_string() }
        }
    }

    /// Sends a call (`header.req` is filled in here) whose payload `encode` writes,
    /// registering `waiter` first so a fast reply cannot overtake it. Returns the request id.
    pub(crate) fn call(&self, header: Header, payload_hint: usize, encode: impl FnOnce(&mut Vec<u8>) -> Result<()>, waiter: Option<Waiter>) -> Result<u64> {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let mut frame = FrameBuf::with_capacity(Header { req, ..header }, payload_hint);
        encode(frame.payload())?;
        let bytes = frame.finish()?;
        if bytes.len() - LEN_PREFIX > self.max_frame {
            return Err(Error::Protocol(format!(
                "a call of {} bytes exceeds the cluster's max_frame of {} bytes; raise ClusterBuilder::max_frame",
                bytes.len() - LEN_PREFIX,
                self.max_frame
            )));
        }
        if let Some(waiter) = waiter {
            let mut p = self.pending.lock().expect("pending lock");
            if let Some(reason) = &p.dead {
                return Err(self.died(reason));
            }
            p.calls.insert(req, waiter);
        }
        if let Err(e) = self.send(bytes) {
            self.pending.lock().expect("pending lock").calls.remove(&req);
            return Err(e);
        }
        Ok(req)
    }

    /// Forgets a call whose caller stopped waiting (its reply, if any, is dropped).
    pub(crate) fn forget(&self, req: u64) {
        self.pending.lock().expect("pending lock").calls.remove(&req);
    }

    /// Hands a reply or failure to whoever waits for it (unknown ids are dropped: the caller
    /// may have been failed already by a death notice, or stopped waiting).
    pub(crate) fn resolve(&self, frame: Frame) {
        let waiter = self.pending.lock().expect("pending lock").calls.remove(&frame.header.req);
        if let Some(w) = waiter {
            w.deliver(Ok(frame));
        }
    }

    /// Marks the link dead and fails every waiting call with `WorkerDied` (`MasterGone` for
    /// the master's link).
    pub(crate) fn fail_all(&self, reason: &str) {
        self.fail_all_with(reason, || self.died(reason));
    }

    /// Marks the link dead and fails every waiting call with `error()`.
    pub(crate) fn fail_all_with(&self, reason: &str, error: impl Fn() -> Error) {
        let calls = {
            let mut p = self.pending.lock().expect("pending lock");
            p.dead.get_or_insert_with(|| reason.to_string());
            std::mem::take(&mut p.calls)
        };
        self.died.notify_all();
        for (_, w) in calls {
            w.deliver(Err(error()));
        }
    }

    /// True once the connection is gone.
    pub(crate) fn is_dead(&self) -> bool {
        self.pending.lock().expect("pending lock").dead.is_some()
    }

    /// Closes the connection; the peer sees its end, our reader wakes up.
    pub(crate) fn close(&self) {
        self.out.close();
    }

    /// Gives up on the peer (it went silent): closes the connection and remembers why, so
    /// whoever sees the end reports that instead of "connection closed".
    pub(crate) fn give_up(&self, reason: String) {
        self.pending.lock().expect("pending lock").given_up.get_or_insert(reason);
        self.close();
    }

    /// Why we gave up on the peer, if we did.
    pub(crate) fn given_up(&self) -> Option<String> {
        self.pending.lock().expect("pending lock").given_up.clone()
    }

    /// Notes that the peer was just heard from.
    pub(crate) fn heard(&self) {
        self.heard.store(sys::now_ms(), Ordering::Relaxed);
    }

    /// How the peer is doing, by `liveness`: what we heard from it, and what the kernel knows.
    pub(crate) fn health(&self, liveness: &Liveness) -> Health {
        let heard = Duration::from_millis(sys::now_ms().saturating_sub(self.heard.load(Ordering::Relaxed)));
        liveness.judge(heard, self.out.pulse())
    }
}
