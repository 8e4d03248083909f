//! Transports that move a message only when some thread asks them to (MPI has no readiness a
//! thread could sleep on). A thread about to sleep waiting for a message polls the process's
//! polled transport itself for a short while first: a message that comes soon is received,
//! delivered and picked up by the thread that waits for it, with no thread switch. The
//! transport's own thread covers the rest.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A transport that delivers what has arrived when polled.
pub(crate) trait Polled: Send + Sync {
    /// Receives and delivers what has arrived; true if anything was. Returns at once when
    /// another thread is polling.
    fn poll(&self) -> bool;
    /// A thread stops polling and sleeps until its message is delivered: the transport's own
    /// thread must now look out for it.
    fn sleeping(&self);
}

/// How long a waiting thread polls before it sleeps: longer than a short call's round trip,
/// short enough that a thread waiting for a long call spends little CPU on it.
const SPIN: Duration = Duration::from_micros(200);

static POLLED: OnceLock<Arc<dyn Polled>> = OnceLock::new();

/// Threads polling in [`spin_until`] now.
static SPINNING: AtomicUsize = AtomicUsize::new(0);

/// Whether some thread polls the transport now: the transport's own thread need not, and
/// waking it would only take a core from the one that does.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn someone_polls() -> bool {
    SPINNING.load(Ordering::SeqCst) > 0
}

/// Makes `transport` the one waiting threads poll (a process has at most one).
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn install(transport: Arc<dyn Polled>) {
    let _ = POLLED.set(transport);
}

/// Whether the process has a polled transport (MPI) that waiting threads poll.
#[inline]
pub(crate) fn installed() -> bool {
    POLLED.get().is_some()
}

/// Polls the process's polled transport until `done()` or for [`SPIN`]; true when `done()`.
/// Without such a transport (TCP) there is nothing to poll: returns false at once.
pub(crate) fn spin_until(mut done: impl FnMut() -> bool) -> bool {
    let Some(transport) = POLLED.get() else { return false };
    let start = Instant::now();
    SPINNING.fetch_add(1, Ordering::SeqCst);
    loop {
        if done() {
            SPINNING.fetch_sub(1, Ordering::SeqCst);
            return true;
        }
        if !transport.poll() {
            let spun = start.elapsed();
            if spun >= SPIN {
                let done = done();
                SPINNING.fetch_sub(1, Ordering::SeqCst);
                if !done {
                    transport.sleeping();
                }
                return done;
            }
            // no yield: on a busy machine it hands the core to a process that keeps it for
            // a whole time slice (milliseconds); the spin is short and then the thread sleeps
            std::hint::spin_loop();
        }
    }
}
