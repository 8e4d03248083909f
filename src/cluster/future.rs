//! [`RemoteFuture`]: a call's result, arriving later.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::ids::Pid;
use crate::error::{Error, Result};
use crate::protocol::{Frame, Kind};

use crate::protocol::failure::Failure;
use super::slot::Slot;

/// Decodes a reply frame into the caller's type.
pub(crate) fn decode_reply<R: DeserializeOwned + 'static>(frame: Result<Frame>) -> Result<R> {
    let frame = frame?;
    match frame.header.kind {
        Kind::Reply => frame.decode(),
        Kind::Failure => Err(frame.decode::<Failure>()?.into()),
        other => Err(Error::Protocol(format!("expected a reply, got a {other:?} frame"))),
    }
}

/// The result of a [`Cluster::remote_call`](crate::Cluster::remote_call), arriving later.
///
/// Wait with [`fetch`](RemoteFuture::fetch) or [`fetch_timeout`](RemoteFuture::fetch_timeout),
/// or `.await` it (it is a `std::future::Future` that works on any executor). Dropping it does
/// not cancel the call.
#[must_use = "a remote call's result is lost unless fetched or awaited"]
pub struct RemoteFuture<R> {
    pid: Pid,
    inner: FutureInner<R>,
    _result: PhantomData<fn() -> R>,
}

/// What forgets calls whose callers stopped waiting: the master's core, or a worker's link.
pub(crate) trait Forgets: Send + Sync {
    /// Forgets call `req` to `pid` (its reply, if any, is then dropped).
    fn forget_call(&self, pid: Pid, req: u64);
}

/// How to forget one call: a value, not a boxed closure, so a call allocates nothing for it.
pub(crate) struct Forget {
    by: Weak<dyn Forgets>,
    pid: Pid,
    req: u64,
}

impl Forget {
    /// How `by` forgets call `req` to `pid` (held weakly: a pending future keeps no cluster
    /// or link alive).
    pub(crate) fn new<F: Forgets + 'static>(by: &Arc<F>, pid: Pid, req: u64) -> Forget {
        Forget { by: Arc::<F>::downgrade(by), pid, req }
    }

    /// Forgets the call (nothing if what would forget it is gone already).
    pub(crate) fn forget(self) {
        if let Some(by) = self.by.upgrade() {
            by.forget_call(self.pid, self.req);
        }
    }
}

enum FutureInner<R> {
    /// The slot, and how to forget the call if the caller stops waiting.
    Pending(Arc<Slot>, Forget),
    Ready(Option<Result<R>>),
}

impl<R> std::fmt::Debug for RemoteFuture<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteFuture").field("pid", &self.pid).field("ready", &self.is_ready()).finish()
    }
}

// The result is only moved out, never pinned in place.
impl<R> Unpin for RemoteFuture<R> {}

impl<R> RemoteFuture<R> {
    /// The process the call runs on.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// True once the result (or the failure) has arrived; `fetch` will not block.
    pub fn is_ready(&self) -> bool {
        match &self.inner {
            FutureInner::Pending(slot, ..) => slot.is_filled(),
            FutureInner::Ready(_) => true,
        }
    }
}

impl<R: DeserializeOwned + 'static> RemoteFuture<R> {
    pub(crate) fn pending(pid: Pid, slot: Arc<Slot>, forget: Forget) -> Self {
        RemoteFuture { pid, inner: FutureInner::Pending(slot, forget), _result: PhantomData }
    }

    pub(crate) fn ready(pid: Pid, result: Result<R>) -> Self {
        RemoteFuture { pid, inner: FutureInner::Ready(Some(result)), _result: PhantomData }
    }

    /// Blocks until the result arrives. Errors: [`Error::Remote`] for a panic or `Err` in the
    /// function, [`Error::WorkerDied`] if the worker dies first (a worker that stops
    /// answering counts as dead after the cluster's heartbeat timeout), [`Error::ShutDown`]
    /// if the cluster shuts down first.
    pub fn fetch(self) -> Result<R> {
        match self.inner {
            FutureInner::Pending(slot, ..) => {
                let frame = slot.wait(None).expect("waits without a deadline end with a result");
                Slot::recycle(slot);
                decode_reply(frame)
            }
            FutureInner::Ready(r) => r.expect("a ready future holds its result until fetched"),
        }
    }

    /// Like [`fetch`](RemoteFuture::fetch), but gives up after `timeout` with
    /// [`Error::Timeout`]. The call is not cancelled: it may still run on the worker, and its
    /// result is dropped when it arrives.
    pub fn fetch_timeout(self, timeout: Duration) -> Result<R> {
        match self.inner {
            FutureInner::Pending(slot, forget) => match slot.wait(Some(Instant::now() + timeout)) {
                Some(frame) => decode_reply(frame),
                None => {
                    forget.forget();
                    Err(Error::Timeout { pid: self.pid, waited: timeout })
                }
            },
            FutureInner::Ready(r) => r.expect("a ready future holds its result until fetched"),
        }
    }
}

impl<R: DeserializeOwned + 'static> Future for RemoteFuture<R> {
    type Output = Result<R>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<R>> {
        let this = self.get_mut();
        match &mut this.inner {
            FutureInner::Pending(slot, ..) => match slot.poll(cx) {
                Poll::Ready(frame) => {
                    let r = decode_reply(frame);
                    this.inner = FutureInner::Ready(None);
                    Poll::Ready(r)
                }
                Poll::Pending => Poll::Pending,
            },
            FutureInner::Ready(r) => Poll::Ready(r.take().unwrap_or(Err(Error::Protocol("RemoteFuture polled after completion".into())))),
        }
    }
}
