//! The master's pool for calls addressed to pid 1: a few threads, started as needed, and a
//! bounded queue. A call that finds the queue full fails at once ("busy") instead of growing
//! memory or threads. A pool thread that waits for a reply runs queued calls meanwhile, so
//! calls that call back into the master (at any depth) cannot starve the pool.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_channel::{Receiver, Sender, TrySendError, select};

/// Threads at most.
const MAX_THREADS: usize = 16;
/// Calls that may wait for a thread.
const MAX_QUEUED: usize = 4096;

/// One call to run: `run` it, or, if it cannot run, `refuse` it with the reason.
pub(crate) struct Job {
    pub run: Box<dyn FnOnce() + Send>,
    pub refuse: Box<dyn FnOnce(String) + Send>,
}

pub(crate) struct Pool {
    jobs: Sender<Job>,
    queue: Receiver<Job>,
    threads: AtomicUsize,
    idle: std::sync::Arc<AtomicUsize>,
}

thread_local! {
    /// Set on pool threads: the queue they help with while waiting.
    static HELPING: RefCell<Option<Receiver<Job>>> = const { RefCell::new(None) };
}

impl Pool {
    pub(crate) fn new() -> Pool {
        let (jobs, queue) = crossbeam_channel::bounded(MAX_QUEUED);
        Pool { jobs, queue, threads: AtomicUsize::new(0), idle: Default::default() }
    }

    /// Queues `job`; refuses it at once when the queue is full or no thread can run it.
    pub(crate) fn submit(&self, job: Job) {
        if let Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) = self.jobs.try_send(job) {
            return (job.refuse)(format!("{MAX_QUEUED} calls already wait to run on the master"));
        }
        if self.idle.load(Ordering::SeqCst) > 0 || self.threads.load(Ordering::SeqCst) >= MAX_THREADS {
            return;
        }
        let n = self.threads.fetch_add(1, Ordering::SeqCst);
        let (queue, idle) = (self.queue.clone(), self.idle.clone());
        let spawned = std::thread::Builder::new().name(format!("cman-exec-{n}")).spawn(move || serve(queue, idle));
        if let Err(e) = spawned {
            self.threads.fetch_sub(1, Ordering::SeqCst);
            if self.threads.load(Ordering::SeqCst) == 0 {
                while let Ok(job) = self.queue.try_recv() {
                    (job.refuse)(format!("no thread can be started to run it: {e}"));
                }
            }
        }
    }
}

fn serve(queue: Receiver<Job>, idle: std::sync::Arc<AtomicUsize>) {
    HELPING.with(|h| *h.borrow_mut() = Some(queue.clone()));
    loop {
        idle.fetch_add(1, Ordering::SeqCst);
        let job = queue.recv();
        idle.fetch_sub(1, Ordering::SeqCst);
        match job {
            Ok(job) => (job.run)(),
            Err(_) => return, // the pool is gone
        }
    }
}

/// The queue this thread helps with while it waits (pool threads only).
pub(crate) fn helping_queue() -> Option<Receiver<Job>> {
    HELPING.with(|h| h.borrow().clone())
}

/// Waits until `woken` receives (the awaited reply is in) or `deadline`, running one queued
/// call if one comes first.
pub(crate) fn help_once(queue: &Receiver<Job>, woken: &Receiver<()>, deadline: Option<std::time::Instant>) {
    let timeout = deadline.map_or(crossbeam_channel::never(), crossbeam_channel::at);
    select! {
        recv(queue) -> job => if let Ok(job) = job { (job.run)() },
        recv(woken) -> _ => {},
        recv(timeout) -> _ => {},
    }
}
