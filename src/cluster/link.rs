//! One connection to a peer: a locked writer, the table of calls waiting for a reply on it,
//! and (on the master) the calls it routes to this peer for other workers.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::Duration;

use crate::Pid;
use crate::codec;
use crate::error::{Error, Result};
use crate::protocol::{Frame, FrameBuf, Header, Kind, LEN_PREFIX};

use super::failure::Failure;
use super::future::Slot;

/// Who is told when a reply arrives.
pub(crate) enum Waiter {
    /// A single caller (a `RemoteFuture`).
    Slot(Arc<Slot>),
    /// A scheduler waiting on many calls at once (pmap), told the tag of each.
    Queue { tx: mpsc::Sender<(u64, Result<Frame>)>, tag: u64 },
}

impl Waiter {
    fn deliver(self, result: Result<Frame>) {
        match self {
            Waiter::Slot(slot) => slot.fill(result),
            Waiter::Queue { tx, tag } => {
                let _ = tx.send((tag, result)); // a scheduler that gave up is not an error
            }
        }
        // the worker's serving thread may be the one waiting, on its channel, not parked
        super::worker::wake_serving();
    }
}

#[derive(Default)]
struct Pending {
    calls: HashMap<u64, Waiter>,
    /// Set once the connection is gone; new calls fail at once with this reason.
    dead: Option<String>,
}

/// Where a link's outgoing frames go: a socket, or the MPI progress thread.
pub(crate) trait FrameOut: Send + Sync {
    /// Sends one whole frame (length prefix included; MPI drops it, messages have bounds).
    fn send(&self, frame: Vec<u8>) -> std::io::Result<()>;
    /// Stops the connection so that the reading side sees its end.
    fn close(&self);
}

/// A TCP connection's writing half.
pub(crate) struct TcpOut(Mutex<TcpStream>);

impl TcpOut {
    pub(crate) fn boxed(stream: TcpStream) -> Box<dyn FrameOut> {
        Box::new(TcpOut(Mutex::new(stream)))
    }
}

impl FrameOut for TcpOut {
    fn send(&self, frame: Vec<u8>) -> std::io::Result<()> {
        self.0.lock().expect("writer lock").write_all(&frame)
    }
    fn close(&self) {
        let _ = self.0.lock().expect("writer lock").shutdown(Shutdown::Both);
    }
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
    /// Master only: (caller pid, request id) of calls routed to this peer for other workers.
    routed: Mutex<HashSet<(Pid, u64)>>,
}

impl Link {
    pub(crate) fn new(peer: Pid, out: Box<dyn FrameOut>) -> Arc<Link> {
        Arc::new(Link {
            peer,
            out,
            pending: Mutex::new(Pending::default()),
            died: Condvar::new(),
            next_req: AtomicU64::new(1),
            routed: Mutex::new(HashSet::new()),
        })
    }

    /// Sends one finished frame (prefix included).
    pub(crate) fn send(&self, frame: Vec<u8>) -> Result<()> {
        self.out.send(frame).map_err(|e| self.died(&e.to_string()))
    }

    /// Sends a received frame body on to this peer (routing), prefix added.
    pub(crate) fn forward(&self, body: &[u8]) -> Result<()> {
        let mut frame = Vec::with_capacity(LEN_PREFIX + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(body);
        self.send(frame)
    }

    fn died(&self, reason: &str) -> Error {
        Error::WorkerDied { pid: self.peer, reason: reason.to_string() }
    }

    /// Sends a call (`header.req` is filled in here) whose payload `encode` writes,
    /// registering `waiter` first so a fast reply cannot overtake it. Returns the request id.
    pub(crate) fn call(&self, header: Header, payload_hint: usize, encode: impl FnOnce(&mut Vec<u8>) -> Result<()>, waiter: Option<Waiter>) -> Result<u64> {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let mut frame = FrameBuf::with_capacity(Header { req, ..header }, payload_hint);
        encode(frame.payload())?;
        let bytes = frame.finish()?;
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

    /// Hands a reply or failure to whoever waits for it (unknown ids are dropped: the caller
    /// may have been failed already by a death notice).
    pub(crate) fn resolve(&self, frame: Frame) {
        let waiter = self.pending.lock().expect("pending lock").calls.remove(&frame.header.req);
        if let Some(w) = waiter {
            w.deliver(Ok(frame));
        }
    }

    /// Marks the link dead and fails every waiting call with `WorkerDied`.
    pub(crate) fn fail_all(&self, reason: &str) {
        let calls = {
            let mut p = self.pending.lock().expect("pending lock");
            p.dead.get_or_insert_with(|| reason.to_string());
            std::mem::take(&mut p.calls)
        };
        self.died.notify_all();
        for (_, w) in calls {
            w.deliver(Err(self.died(reason)));
        }
    }

    /// True once the connection is gone.
    pub(crate) fn is_dead(&self) -> bool {
        self.pending.lock().expect("pending lock").dead.is_some()
    }

    /// Waits up to `timeout` for the link to die; true if it did.
    pub(crate) fn wait_dead(&self, timeout: Duration) -> bool {
        let p = self.pending.lock().expect("pending lock");
        let (p, _) = self.died.wait_timeout_while(p, timeout, |p| p.dead.is_none()).expect("pending lock");
        p.dead.is_some()
    }

    /// Closes the connection; the peer sees its end, our reader wakes up.
    pub(crate) fn close(&self) {
        self.out.close();
    }

    pub(crate) fn note_routed(&self, caller: Pid, req: u64) {
        self.routed.lock().expect("routed lock").insert((caller, req));
    }

    pub(crate) fn routed_done(&self, caller: Pid, req: u64) {
        self.routed.lock().expect("routed lock").remove(&(caller, req));
    }

    pub(crate) fn take_routed(&self) -> Vec<(Pid, u64)> {
        self.routed.lock().expect("routed lock").drain().collect()
    }
}

/// Builds a failure frame addressed to `dst` for request `req`.
pub(crate) fn failure_frame(src: Pid, dst: Pid, req: u64, failure: &Failure) -> Result<Vec<u8>> {
    let mut frame = FrameBuf::new(Header { kind: Kind::Failure, src, dst, req, func: 0 });
    codec::encode_into(failure, frame.payload())?;
    frame.finish()
}
