//! The process's I/O runtime: one tokio current-thread runtime, started on first use. It
//! drains send queues that sockets could not take at once, reads the evented connections,
//! accepts and vets connections, runs heartbeat timers, and frees big buffers kept unused.
//! Nothing on it waits for user code.
//!
//! Whoever waits drives it. Its own thread (`cman-io`) drives it while no caller does; a
//! thread that blocks for a reply drives it itself ([`block_on`]) and so reads its own reply:
//! a round trip wakes the caller once, not an I/O thread that then wakes the caller. The I/O
//! thread steps aside when a caller comes and takes the runtime back only once no caller has
//! driven for a whole [`LINGER`], so a loop of calls does not wake it per call.
//!
//! While nobody drives it, a caller may even skip the runtime: it waits for its reply's
//! connection alone and reads it itself ([`read_own`]), which spares a turn of the runtime
//! per call. The runtime still turns at least every one to two [`UNTURNED_AT_MOST`] while calls
//! go on: the resting I/O thread looks that often, and marks a turn due when none came.

use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::Thread;
use std::time::Duration;

use tokio::runtime::{Builder, Handle, Runtime};
use tokio::sync::Notify;

use crate::buffers;

/// How long the I/O thread leaves the runtime to callers before it checks whether one still
/// drives it: long enough to span the user code between the calls of a loop, short enough
/// for what only the runtime sees (a worker's output, a timer), which waits at most twice
/// this while callers run user code and nobody else waits.
const LINGER: Duration = Duration::from_millis(5);

/// The longest the I/O thread rests while a caller keeps driving (a long call): that caller
/// wakes it when it leaves.
const LONGEST_REST: Duration = Duration::from_millis(64);

/// How often the resting I/O thread looks while callers read their own replies; a look
/// that finds no turn since the last makes the next caller turn the runtime, so what only
/// the runtime handles (the other connections, timers) waits at most about twice this. A
/// caller waits in its own read no longer than this either.
pub(crate) const UNTURNED_AT_MOST: Duration = Duration::from_millis(5);

/// Callers that read their own replies at once, at most (more wait through the runtime).
const OWN_READERS: usize = 8;

struct Io {
    runtime: Runtime,
    /// The runtime's metrics (its queue of tasks spawned from outside).
    metrics: tokio::runtime::RuntimeMetrics,
    /// The I/O thread, woken when the last caller leaves after it rested long.
    thread: Thread,
    /// Told when a caller wants the runtime while the I/O thread drives it.
    wanted: Notify,
    /// The I/O thread drives the runtime.
    io_drives: AtomicBool,
    /// Callers driving the runtime or waiting to.
    callers: AtomicUsize,
    /// Callers reading their own replies without the runtime ([`read_own`]). Each waits in
    /// its read for at most [`UNTURNED_AT_MOST`] (a socket's receive timeout, a timer of the
    /// timer wheel: no VM exit to arm it), then leaves its reply to the runtime.
    own_readers: AtomicUsize,
    /// Waits numbered so far.
    own_count: AtomicU64,
    /// Turns of the runtime so far: a caller drove it, or the I/O thread stopped driving it.
    turns: AtomicU64,
    /// The resting I/O thread saw no turn between two looks while callers read their own
    /// replies: the next caller must turn the runtime ([`read_own`] refuses).
    turn_due: AtomicBool,
    /// Callers that have left, ever: unchanged over a rest means none drove during it.
    left: AtomicU64,
    /// The I/O thread rests longer than [`LINGER`]: the last caller out must wake it.
    resting_long: AtomicBool,
    /// A thread waits for the runtime without driving it: the I/O thread must not rest.
    needed: AtomicBool,
}

static IO: OnceLock<Io> = OnceLock::new();

fn io() -> &'static Io {
    IO.get_or_init(|| {
        let runtime = Builder::new_current_thread().enable_io().enable_time().build().expect("cannot start the I/O runtime");
        runtime.spawn(async {
            loop {
                buffers::kept_some().await;
                tokio::time::sleep(buffers::KEPT_FOR / 2).await;
                buffers::release_idle();
            }
        });
        // the thread waits in `io()` until this initialisation is done
        let thread = std::thread::Builder::new().name("cman-io".into()).spawn(|| io().serve()).expect("cannot start the I/O thread");
        Io {
            metrics: runtime.metrics(),
            runtime,
            thread: thread.thread().clone(),
            wanted: Notify::new(),
            io_drives: AtomicBool::new(false),
            callers: AtomicUsize::new(0),
            own_readers: AtomicUsize::new(0),
            own_count: AtomicU64::new(0),
            turns: AtomicU64::new(0),
            turn_due: AtomicBool::new(false),
            left: AtomicU64::new(0),
            resting_long: AtomicBool::new(false),
            needed: AtomicBool::new(false),
        }
    })
}

impl Io {
    /// The I/O thread: drives the runtime until a caller wants it, rests while callers drive.
    fn serve(&self) -> ! {
        loop {
            self.io_drives.store(true, Ordering::SeqCst);
            if self.callers.load(Ordering::SeqCst) == 0 {
                self.runtime.block_on(self.wanted.notified());
            }
            self.io_drives.store(false, Ordering::SeqCst);
            self.turned_now();
            self.rest();
        }
    }

    fn turned_now(&self) {
        self.turns.fetch_add(1, Ordering::SeqCst);
        self.turn_due.store(false, Ordering::SeqCst);
    }

    /// Callers drive the runtime or read their own replies.
    fn busy(&self) -> bool {
        self.callers.load(Ordering::SeqCst) > 0 || self.reading_own()
    }

    fn reading_own(&self) -> bool {
        self.own_readers.load(Ordering::SeqCst) > 0
    }

    /// Returns once no caller has driven the runtime for a whole rest. While callers read
    /// their own replies it looks every [`UNTURNED_AT_MOST`] whether the runtime turned.
    fn rest(&self) {
        let mut rest = LINGER;
        let mut own_so_far = 0;
        let mut turns_seen = self.turns.load(Ordering::SeqCst);
        loop {
            if self.needed.swap(false, Ordering::SeqCst) {
                break;
            }
            let left = self.left.load(Ordering::SeqCst);
            let own = self.own_count.load(Ordering::SeqCst);
            if own != std::mem::replace(&mut own_so_far, own) || self.reading_own() {
                rest = rest.min(UNTURNED_AT_MOST); // callers read their own replies: look often
            }
            self.resting_long.store(rest > LINGER, Ordering::SeqCst);
            if rest > LINGER && !self.busy() {
                rest = LINGER; // the caller left before it could see it must wake us
                continue;
            }
            std::thread::park_timeout(rest);
            let turns = self.turns.load(Ordering::SeqCst);
            if turns == std::mem::replace(&mut turns_seen, turns) {
                self.turn_due.store(true, Ordering::SeqCst); // nobody turned it since the last look
            }
            let driving = self.busy();
            if !driving && self.left.load(Ordering::SeqCst) == left {
                break;
            }
            rest = if driving { (rest * 2).min(LONGEST_REST) } else { LINGER };
        }
        self.resting_long.store(false, Ordering::SeqCst);
    }
}

/// Counts a caller in while it drives the runtime (also when it unwinds).
struct Driving(&'static Io);

impl Driving {
    fn new(io: &'static Io) -> Driving {
        io.callers.fetch_add(1, Ordering::SeqCst);
        Driving(io)
    }
}

impl Drop for Driving {
    fn drop(&mut self) {
        self.0.callers.fetch_sub(1, Ordering::SeqCst);
        self.0.left_now();
    }
}

/// A caller reading its own reply: counted, for the I/O thread's looks.
struct OwnRead {
    io: &'static Io,
}

impl Drop for OwnRead {
    fn drop(&mut self) {
        self.io.own_readers.fetch_sub(1, Ordering::SeqCst);
        self.io.left_now();
    }
}

impl Io {
    /// A caller left: the I/O thread, if it rests long, must not wait out its rest.
    fn left_now(&self) {
        self.left.fetch_add(1, Ordering::SeqCst);
        if self.resting_long.load(Ordering::SeqCst) && !self.busy() {
            self.thread.unpark();
        }
    }
}

/// Tells the I/O thread to drive the runtime now if nobody does: this thread is about to
/// wait for something the runtime delivers (a reply it cannot read itself, a `pmap` batch)
/// and will not drive it, so the I/O thread must not finish a rest first.
pub(crate) fn needed() {
    let Some(io) = IO.get() else { return }; // not started: nothing it could deliver
    if !io.io_drives.load(Ordering::SeqCst) && io.callers.load(Ordering::SeqCst) == 0 {
        io.needed.store(true, Ordering::SeqCst);
        io.thread.unpark();
    }
}

/// Whether this thread may drive the I/O runtime: not inside an async runtime (the caller's
/// own, or this one), where blocking is the caller's affair, nor while the thread ends.
pub(crate) fn can_drive() -> bool {
    Handle::try_current().is_err_and(|e| e.is_missing_context())
}

/// Keeps the I/O thread resting while this thread sends what it will then wait for (a call
/// to each of many workers): it reads the replies itself when it waits. Only for a thread
/// whose next wait is a [`block_on`]: nobody else may be left to read the replies.
pub(crate) fn about_to_wait() -> impl Drop {
    Driving::new(io())
}

/// Lets this thread wait for its reply without the runtime, waiting in reads of the
/// reply's connection for up to [`UNTURNED_AT_MOST`] at a time, if nobody drives the runtime
/// and no turn of it is due (one is, once callers have read their own replies for one to
/// two [`UNTURNED_AT_MOST`] without it); `None` otherwise (then [`block_on`]). A wait that
/// long is a long call: then wait with [`block_on`]. Only where [`can_drive`].
pub(crate) fn read_own() -> Option<impl Drop> {
    let io = IO.get()?;
    // tasks queued from outside (a send queue to drain): the runtime must run them first
    let queued = io.metrics.global_queue_depth() > 0;
    if queued || io.io_drives.load(Ordering::SeqCst) || io.callers.load(Ordering::SeqCst) > 0 || io.turn_due.load(Ordering::SeqCst) {
        return None;
    }
    io.own_count.fetch_add(1, Ordering::SeqCst);
    if io.own_readers.fetch_add(1, Ordering::SeqCst) >= OWN_READERS {
        io.own_readers.fetch_sub(1, Ordering::SeqCst);
        return None;
    }
    let reading = OwnRead { io };
    if io.resting_long.load(Ordering::SeqCst) {
        io.thread.unpark(); // it is to look from now on, not at the end of a long rest
    }
    // should the I/O thread start driving all the same, the runtime reads the connection
    // whenever this thread does not: whoever reads first handles the reply
    (!io.io_drives.load(Ordering::SeqCst)).then_some(reading)
}

/// Runs `future` to completion on this thread, driving the I/O runtime meanwhile (reading
/// sockets, running timers and tasks). Only where [`can_drive`].
pub(crate) fn block_on<F: Future>(future: F) -> F::Output {
    let io = io();
    let _driving = Driving::new(io);
    if io.io_drives.load(Ordering::SeqCst) {
        io.wanted.notify_one(); // the I/O thread hands the runtime over
    }
    let output = io.runtime.block_on(future);
    io.turned_now();
    output
}

/// The I/O runtime's handle (the runtime and its thread start on first use).
pub(crate) fn handle() -> &'static Handle {
    io().runtime.handle()
}

/// Runs `task` on the I/O runtime.
pub(crate) fn spawn<F: Future<Output = ()> + Send + 'static>(task: F) -> tokio::task::JoinHandle<()> {
    handle().spawn(task)
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::thread;
    use std::time::Instant;

    use super::*;

    #[test]
    fn a_waiting_caller_comes_to_drive_the_runtime_itself() {
        let me = thread::current().id();
        let deadline = Instant::now() + Duration::from_secs(5);
        let ran_here = block_on(async {
            loop {
                // tasks run on whichever thread drives: once the I/O thread stepped aside, this one
                if tokio::spawn(async { thread::current().id() }).await.expect("task") == me {
                    return true;
                }
                if Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        assert!(ran_here, "the I/O thread never handed the runtime to a waiting caller");
    }

    #[test]
    fn the_io_thread_takes_the_runtime_back_when_callers_leave() {
        for _ in 0..20 {
            block_on(tokio::task::yield_now()); // a caller drove, and left
            let (tx, rx) = mpsc::channel();
            spawn(async move {
                let _ = tx.send(());
            });
            // nobody drives but the I/O thread, within a rest or two
            assert!(rx.recv_timeout(Duration::from_secs(2)).is_ok(), "a task spawned after the callers left never ran");
        }
    }

    #[test]
    fn events_are_handled_again_once_a_sender_stops_holding_the_io_thread_back() {
        block_on(tokio::task::yield_now()); // a caller drove: the I/O thread rests
        let waiting = about_to_wait();
        let (tx, rx) = mpsc::channel();
        spawn(async move {
            let _ = tx.send(());
        });
        drop(waiting); // it never waited: nobody drove, and the I/O thread takes over again
        assert!(rx.recv_timeout(Duration::from_secs(2)).is_ok(), "a task spawned while a sender held the I/O thread back never ran");
    }

    #[test]
    fn a_thread_that_waits_without_driving_gets_the_io_thread_back_before_its_rest_ends() {
        let mut prompt = 0;
        for _ in 0..20 {
            block_on(tokio::task::yield_now()); // a caller drove, and left: the I/O thread rests
            let (tx, rx) = mpsc::channel();
            spawn(async move {
                let _ = tx.send(());
            });
            let asked = Instant::now();
            needed();
            assert!(rx.recv_timeout(Duration::from_secs(2)).is_ok(), "a task that a waiting thread needed never ran");
            // without `needed` the task waits for the rest to end: a whole LINGER at least
            prompt += usize::from(asked.elapsed() < LINGER / 2);
        }
        assert!(prompt >= 10, "only {prompt} of 20 tasks ran before the I/O thread's rest would have ended");
    }

    #[test]
    fn callers_on_many_threads_each_get_their_own_result() {
        let threads: Vec<_> = (0..8u64)
            .map(|i| {
                thread::spawn(move || {
                    (0..200u64).map(|j| block_on(async move { tokio::spawn(async move { i * 1000 + j }).await.expect("task") })).sum::<u64>()
                })
            })
            .collect();
        for (i, t) in threads.into_iter().enumerate() {
            let i = i as u64;
            assert_eq!(t.join().expect("caller thread"), (0..200).map(|j| i * 1000 + j).sum::<u64>());
        }
    }

    #[test]
    fn inside_an_async_runtime_a_caller_does_not_drive() {
        assert!(can_drive());
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        assert!(!rt.block_on(async { can_drive() }));
        assert!(!block_on(async { can_drive() }), "tasks of the I/O runtime must not drive it again");
    }
}
