//! Where replies land and how a thread waits for one: on its reply's connection, reading it
//! itself (a caller on the master), driving the I/O runtime, parked, as an async task, as a
//! pool thread that runs queued calls meanwhile, or as a worker's serving thread that serves
//! calls meanwhile (the serving loop registers itself here, so nested calls cannot deadlock).
//! A thread that waits on several sources is told of its reply on a channel it selects on.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::thread::Thread;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use crate::error::Result;
use crate::protocol::Frame;
use crate::transport::reading::Reading;
use crate::transport::{io, polled};

use super::pool;

/// Handles one incoming frame on a serving thread, or returns when `woken` receives (what
/// the caller waits for has come) or at the deadline.
pub(crate) type Pump = fn(Option<Instant>, &Receiver<()>) -> Result<()>;

thread_local! {
    /// Set on a worker's serving thread: what to do while waiting instead of parking.
    static PUMP: Cell<Option<Pump>> = const { Cell::new(None) };
}

/// Makes this thread serve with `pump` while it waits for replies (`None`: stop).
pub(crate) fn serve_while_waiting(pump: Option<Pump>) {
    PUMP.with(|p| p.set(pump));
}

/// The pump of this thread, if it serves while it waits.
pub(crate) fn pumping() -> Option<Pump> {
    PUMP.with(Cell::get)
}

/// Where a reply comes from (a worker), for a caller that would read it itself.
pub(crate) trait Source: Send + Sync {
    /// How its connection is read, if the I/O runtime reads it and it is open.
    fn reading(&self) -> Option<Arc<Reading>>;
}

/// Calls whose replies are taken as they come, each by its place in the group (the calls of
/// an `everywhere` round): no slot per call.
pub(crate) trait Gather: Send + Sync {
    /// The reply to call `index` of the group, or why there is none.
    fn deliver(&self, index: usize, result: Result<Frame>);
}

/// Who is told when a reply arrives.
pub(crate) enum Waiter {
    /// A single caller (a `RemoteFuture`).
    Slot(Arc<Slot>),
    /// A scheduler waiting on many calls at once (pmap), told the tag of each; `bell` rings
    /// too when the scheduler runs on a serving thread, which waits on several sources.
    Queue { tx: Sender<(u64, Result<Frame>)>, tag: u64, bell: Option<Sender<()>> },
    /// One call of a group, by its index.
    Gather(Arc<dyn Gather>, usize),
}

impl Waiter {
    pub(crate) fn deliver(self, result: Result<Frame>) {
        match self {
            Waiter::Slot(slot) => slot.fill(result),
            Waiter::Gather(group, index) => group.deliver(index, result),
            Waiter::Queue { tx, tag, bell } => {
                let _ = tx.send((tag, result)); // a scheduler that gave up is not an error
                if let Some(bell) = bell {
                    let _ = bell.try_send(()); // one ring is enough
                }
            }
        }
    }
}

/// Where a reply lands: one per outstanding call. The thread that reads the reply fills the
/// slot and wakes the waiter: a parked thread, an async task, or a pool thread that runs
/// other calls while it waits.
#[derive(Default)]
pub(crate) struct Slot {
    state: Mutex<SlotState>,
    /// Set once a result is in `state`: a thread that waits in reads of its connection asks
    /// after each read, and needs no lock for that.
    filled: AtomicBool,
}

#[derive(Default)]
struct SlotState {
    result: Option<Result<Frame>>,
    wake: Option<Wake>,
    /// Where the reply comes from (a caller may read its connection itself).
    source: Option<Weak<dyn Source>>,
}

enum Wake {
    Thread(Thread),
    Task(Waker),
    Channel(Sender<()>),
}

thread_local! {
    /// The slot of this thread's last call that nobody else held: its next call's.
    static SPARE_SLOT: Cell<Option<Arc<Slot>>> = const { Cell::new(None) };
    /// More such slots, for a thread that waits on many calls at once (`everywhere`). Apart
    /// from `SPARE_SLOT`, so that a loop of single calls touches only that.
    static MORE_SLOTS: RefCell<Vec<Arc<Slot>>> = const { RefCell::new(Vec::new()) };
}

/// Slots a thread keeps at most besides its spare (about 150 KiB): an `everywhere` over
/// this many workers then allocates and frees none per worker.
const MORE_SLOTS_AT_MOST: usize = 1024;

impl Slot {
    /// A slot for a new call: one of this thread's spares if it has one (a loop of calls, or
    /// of `everywhere`, then allocates none), else a new one.
    pub(crate) fn fresh() -> Arc<Slot> {
        match SPARE_SLOT.try_with(Cell::take) {
            Ok(Some(slot)) => slot,
            _ => MORE_SLOTS.try_with(|more| more.borrow_mut().pop()).ok().flatten().unwrap_or_default(),
        }
    }

    /// Takes back the slot of a call that ended, for this thread's next calls, if nobody else
    /// holds it any more (the thread that filled it may not have let go yet).
    pub(crate) fn recycle(mut slot: Arc<Slot>) {
        if let Some(emptied) = Arc::get_mut(&mut slot) {
            *emptied = Slot::default(); // what it held goes before the spares are borrowed
            let Ok(Some(slot)) = SPARE_SLOT.try_with(|spare| spare.replace(Some(slot))) else { return };
            let _ = MORE_SLOTS.try_with(|more| {
                let mut more = more.borrow_mut();
                if more.len() < MORE_SLOTS_AT_MOST {
                    more.push(slot);
                }
            });
        }
    }

    pub(crate) fn fill(&self, result: Result<Frame>) {
        let wake = {
            let mut s = self.state.lock().expect("slot lock");
            if s.result.is_some() {
                return; // first answer wins (a reply racing a death notice)
            }
            s.result = Some(result);
            self.filled.store(true, Ordering::Release);
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

    /// The reply comes from `source`: a caller may read its connection itself.
    pub(crate) fn comes_from(&self, source: Weak<dyn Source>) {
        self.state.lock().expect("slot lock").source = Some(source);
    }

    pub(crate) fn is_filled(&self) -> bool {
        self.filled.load(Ordering::Acquire)
    }

    /// Whether [`wait`](Slot::wait) on this thread drives the I/O runtime (and so reads the
    /// replies itself), rather than serving, helping the pool or parking meanwhile.
    pub(crate) fn waits_driving() -> bool {
        pumping().is_none() && pool::helping_queue().is_none() && io::can_drive()
    }

    /// Blocks until filled or `deadline` (then `None`). A worker's serving thread keeps
    /// serving while it waits (it may be the only reader of the reply's connection); a pool
    /// thread on the master runs queued calls.
    pub(crate) fn wait(&self, deadline: Option<Instant>) -> Option<Result<Frame>> {
        crate::transport::tcp::flush_corked(); // what this thread sent corked goes now
        let pump = pumping();
        let helping = pool::helping_queue();
        // a thread that works while it waits is told on a channel it selects on; others park
        let woken = (pump.is_some() || helping.is_some()).then(|| crossbeam_channel::bounded::<()>(1));
        let mut spun = false;
        loop {
            let mut s = self.state.lock().expect("slot lock");
            if let Some(r) = s.result.take() {
                return Some(r);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return None;
            }
            if !spun && polled::installed() {
                // a reply over a polled transport (MPI) that comes soon is read by this thread
                spun = true;
                drop(s);
                polled::spin_until(|| self.is_filled());
                continue;
            }
            match (pump, &helping, &woken) {
                (Some(pump), _, Some((tx, rx))) => {
                    s.wake = Some(Wake::Channel(tx.clone()));
                    drop(s);
                    if let Err(e) = pump(deadline, rx) {
                        return Some(Err(e));
                    }
                }
                (None, Some(queue), Some((tx, rx))) => {
                    s.wake = Some(Wake::Channel(tx.clone()));
                    drop(s);
                    pool::help_once(queue, rx, deadline);
                }
                _ if io::can_drive() => {
                    // that wait has no timer: a deadline is the runtime's to keep
                    let source = deadline.is_none().then(|| s.source.as_ref().and_then(Weak::upgrade)).flatten();
                    drop(s);
                    if let Some(result) = source.and_then(|source| self.read_own_reply(&*source)) {
                        return Some(result);
                    }
                    return io::block_on(self.filled(deadline)); // reads its own reply
                }
                _ => {
                    s.wake = Some(Wake::Thread(std::thread::current()));
                    drop(s);
                    io::needed();
                    match deadline {
                        Some(d) => std::thread::park_timeout(d.saturating_duration_since(Instant::now())),
                        None => std::thread::park(),
                    }
                }
            }
        }
    }

    /// Waits in reads of the reply's connection (`source`'s) on this thread, without a turn
    /// of the I/O runtime, while nobody drives it ([`io::read_own`]): a quick call then costs
    /// one system call to wait and read. `None` when the runtime must take over: the call is long
    /// (nothing came for a [`OWN_WAIT`](crate::transport::reading::OWN_WAIT)), or another thread reads the connection. A
    /// reply that comes another way (a death notice, a shutdown) is seen at the latest then.
    fn read_own_reply(&self, source: &dyn Source) -> Option<Result<Frame>> {
        let reading = source.reading()?;
        let _reading_own = io::read_own()?;
        loop {
            if reading.read_waiting(|| self.is_filled()) != Some(true) {
                return self.state.lock().expect("slot lock").result.take();
            }
            if let Some(r) = self.state.lock().expect("slot lock").result.take() {
                return Some(r);
            }
        }
    }

    /// Filled, or `None` at the deadline.
    async fn filled(&self, deadline: Option<Instant>) -> Option<Result<Frame>> {
        let filled = std::future::poll_fn(|cx| self.poll(cx));
        match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), filled).await.ok(),
            None => Some(filled.await),
        }
    }

    pub(crate) fn poll(&self, cx: &mut Context<'_>) -> Poll<Result<Frame>> {
        let mut s = self.state.lock().expect("slot lock");
        match s.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                s.wake = Some(Wake::Task(cx.waker().clone()));
                drop(s);
                io::needed(); // a caller's executor waits: someone must read its reply
                Poll::Pending
            }
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_nobody_else_holds_serves_the_threads_next_call_emptied() {
        let slot = Slot::fresh();
        slot.fill(Err(crate::error::Error::ShutDown));
        assert!(slot.is_filled());
        let at = Arc::as_ptr(&slot);
        Slot::recycle(slot);
        let next = Slot::fresh();
        assert_eq!(Arc::as_ptr(&next), at, "the same allocation");
        assert!(!next.is_filled(), "emptied");

        let held = next.clone(); // the thread that filled it has not let go yet
        Slot::recycle(next);
        assert_ne!(Arc::as_ptr(&Slot::fresh()), at, "a slot still held elsewhere is not reused");
        assert_eq!(Arc::strong_count(&held), 1);

        // a round over more workers than the thread keeps slots for
        let round: Vec<_> = (0..MORE_SLOTS_AT_MOST + 10).map(|_| Slot::fresh()).collect();
        round.into_iter().for_each(Slot::recycle);
        assert_eq!(MORE_SLOTS.with(|s| s.borrow().len()), MORE_SLOTS_AT_MOST, "kept up to the cap, no more");
    }
}
