//! Reply slots and [`RemoteFuture`].

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::Thread;

use serde::de::DeserializeOwned;

use crate::Pid;
use crate::codec;
use crate::error::{Error, Result};
use crate::protocol::{Frame, Kind};

use super::failure::Failure;

/// Where a reply lands: one per outstanding call. The waiting thread parks; the thread that
/// reads the reply fills the slot and unparks it (or wakes the async task).
#[derive(Default)]
pub(crate) struct Slot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    result: Option<Result<Frame>>,
    thread: Option<Thread>,
    waker: Option<Waker>,
}

impl Slot {
    pub(crate) fn fill(&self, result: Result<Frame>) {
        let (thread, waker) = {
            let mut s = self.state.lock().expect("slot lock");
            if s.result.is_some() {
                return; // first answer wins (a reply racing a death notice)
            }
            s.result = Some(result);
            (s.thread.take(), s.waker.take())
        };
        if let Some(t) = thread {
            t.unpark();
        }
        if let Some(w) = waker {
            w.wake();
        }
    }

    pub(crate) fn is_filled(&self) -> bool {
        self.state.lock().expect("slot lock").result.is_some()
    }

    /// Blocks until filled. A worker's serving thread keeps serving while it waits (it may be
    /// the only reader of the reply's connection; with direct links, their readers wake it).
    pub(crate) fn wait(&self) -> Result<Frame> {
        loop {
            {
                let mut s = self.state.lock().expect("slot lock");
                if let Some(r) = s.result.take() {
                    return r;
                }
                if super::worker::serves_on_this_thread() {
                    drop(s);
                    super::worker::pump_once()?;
                    continue;
                }
                s.thread = Some(std::thread::current());
            }
            std::thread::park();
        }
    }

    fn poll(&self, cx: &mut Context<'_>) -> Poll<Result<Frame>> {
        let mut s = self.state.lock().expect("slot lock");
        match s.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                s.waker = Some(cx.waker().clone());
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
/// Wait with [`fetch`](RemoteFuture::fetch), or `.await` it (it is a `std::future::Future`
/// that works on any executor). Dropping it does not cancel the call.
#[must_use = "a remote call's result is lost unless fetched or awaited"]
pub struct RemoteFuture<R> {
    pid: Pid,
    inner: FutureInner<R>,
    _result: PhantomData<fn() -> R>,
}

enum FutureInner<R> {
    Pending(Arc<Slot>),
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
            FutureInner::Pending(slot) => slot.is_filled(),
            FutureInner::Ready(_) => true,
        }
    }
}

impl<R: DeserializeOwned> RemoteFuture<R> {
    pub(crate) fn pending(pid: Pid, slot: Arc<Slot>) -> Self {
        RemoteFuture { pid, inner: FutureInner::Pending(slot), _result: PhantomData }
    }

    pub(crate) fn ready(pid: Pid, result: Result<R>) -> Self {
        RemoteFuture { pid, inner: FutureInner::Ready(Some(result)), _result: PhantomData }
    }

    /// Blocks until the result arrives. Errors: [`Error::Remote`] for a panic or `Err` in the
    /// function, [`Error::WorkerDied`] if the worker dies first.
    pub fn fetch(self) -> Result<R> {
        match self.inner {
            FutureInner::Pending(slot) => decode_reply(slot.wait()),
            FutureInner::Ready(r) => r.expect("a ready future holds its result until fetched"),
        }
    }
}

impl<R: DeserializeOwned> Future for RemoteFuture<R> {
    type Output = Result<R>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<R>> {
        let this = self.get_mut();
        match &mut this.inner {
            FutureInner::Pending(slot) => match slot.poll(cx) {
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
