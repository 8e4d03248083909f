//! Reply slots and [`RemoteFuture`].

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::Pid;
use crate::codec;
use crate::error::{Error, Result};
use crate::protocol::{Frame, Kind};

use super::failure::Failure;
use super::link::Link;
use super::{pool, worker};

/// Where a reply lands: one per outstanding call. The thread that reads the reply fills the
/// slot and wakes the waiter: a parked thread, an async task, or a pool thread that runs
/// other calls while it waits.
#[derive(Default)]
pub(crate) struct Slot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    result: Option<Result<Frame>>,
    wake: Option<Wake>,
}

enum Wake {
    Thread(Thread),
    Task(Waker),
    Channel(crossbeam_channel::Sender<()>),
}

impl Slot {
    pub(crate) fn fill(&self, result: Result<Frame>) {
        let wake = {
            let mut s = self.state.lock().expect("slot lock");
            if s.result.is_some() {
                return; // first answer wins (a reply racing a death notice)
            }
            s.result = Some(result);
            s.wake.take()
        };
        match wake {
            Some(Wake::Thread(t)) => t.unpark(),
            Some(Wake::Task(w)) => w.wake(),
            Some(Wake::Channel(tx)) => {
                let _ = tx.send(());
            }
            None => {}
        }
    }

    pub(crate) fn is_filled(&self) -> bool {
        self.state.lock().expect("slot lock").result.is_some()
    }

    /// Blocks until filled or `deadline` (then `None`). A worker's serving thread keeps
    /// serving while it waits (it may be the only reader of the reply's connection); a pool
    /// thread on the master runs queued calls.
    pub(crate) fn wait(&self, deadline: Option<Instant>) -> Option<Result<Frame>> {
        let serving = worker::serves_on_this_thread();
        let helping = pool::helping_queue().map(|queue| (queue, crossbeam_channel::bounded::<()>(1)));
        loop {
            let mut s = self.state.lock().expect("slot lock");
            if let Some(r) = s.result.take() {
                return Some(r);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return None;
            }
            if serving {
                drop(s);
                if let Err(e) = worker::pump_once(deadline) {
                    return Some(Err(e));
                }
                continue;
            }
            match &helping {
                Some((queue, (tx, rx))) => {
                    s.wake = Some(Wake::Channel(tx.clone()));
                    drop(s);
                    pool::help_once(queue, rx, deadline);
                }
                None => {
                    s.wake = Some(Wake::Thread(std::thread::current()));
                    drop(s);
                    match deadline {
                        Some(d) => std::thread::park_timeout(d.saturating_duration_since(Instant::now())),
                        None => std::thread::park(),
                    }
                }
            }
        }
    }

    fn poll(&self, cx: &mut Context<'_>) -> Poll<Result<Frame>> {
        let mut s = self.state.lock().expect("slot lock");
        match s.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                s.wake = Some(Wake::Task(cx.waker().clone()));
                Poll::Pending
            }
        }
    }
}

/// Decodes a reply frame into the caller's type.
pub(crate) fn decode_reply<R: DeserializeOwned>(frame: Result<Frame>) -> Result<R> {
    let frame = frame?;
    match frame.header.kind {
        Kind::Reply => codec::decode(frame.payload()),
        Kind::Failure => Err(codec::decode::<Failure>(frame.payload())?.into()),
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

enum FutureInner<R> {
    /// The slot, and the link and request id to forget if the caller stops waiting.
    Pending(Arc<Slot>, Weak<Link>, u64),
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

impl<R: DeserializeOwned> RemoteFuture<R> {
    pub(crate) fn pending(pid: Pid, slot: Arc<Slot>, link: &Arc<Link>, req: u64) -> Self {
        RemoteFuture { pid, inner: FutureInner::Pending(slot, Arc::downgrade(link), req), _result: PhantomData }
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
            FutureInner::Pending(slot, ..) => decode_reply(slot.wait(None).expect("waits without a deadline end with a result")),
            FutureInner::Ready(r) => r.expect("a ready future holds its result until fetched"),
        }
    }

    /// Like [`fetch`](RemoteFuture::fetch), but gives up after `timeout` with
    /// [`Error::Timeout`]. The call is not cancelled: it may still run on the worker, and its
    /// result is dropped when it arrives.
    pub fn fetch_timeout(self, timeout: Duration) -> Result<R> {
        match self.inner {
            FutureInner::Pending(slot, link, req) => match slot.wait(Some(Instant::now() + timeout)) {
                Some(frame) => decode_reply(frame),
                None => {
                    if let Some(link) = link.upgrade() {
                        link.forget(req);
                    }
                    Err(Error::Timeout { pid: self.pid, waited: timeout })
                }
            },
            FutureInner::Ready(r) => r.expect("a ready future holds its result until fetched"),
        }
    }
}

impl<R: DeserializeOwned> Future for RemoteFuture<R> {
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
