//! The master's state: the process table, the launches waiting for their workers, the
//! handling of every frame from a worker (on the I/O thread, which reads all connections:
//! it resolves replies, routes worker-to-worker frames and hands output on), the events
//! thread (which calls the user's output sink and departure hooks, off the I/O thread), and
//! the heartbeat that declares silent workers dead.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::ids::Pid;
use crate::error::Error;
use super::launcher::Launch;
use crate::protocol::{Frame, Health, Hello, Kind, Liveness, Refusal, Secret, Terms, Welcome, bare};
use crate::transport::listener::{Admit, HandshakeLimits, Listener};
use crate::transport::tcp::{TcpOut, read_frames};

use super::exec;
use crate::protocol::failure::Failure;
use super::link::Link;
use crate::protocol::failure::failure_frame;
use super::output::OutputSink;
use super::pool::{Job, Pool};
use super::refusals::RefusalLog;
use super::{Cluster, Inner};

/// What the master knows about a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Its pid in the cluster.
    pub pid: Pid,
    /// Host name it reported.
    pub host: String,
    /// Its operating-system process id.
    pub os_pid: u32,
    /// MPI rank and world size, for MPI-launched workers.
    pub mpi: Option<(i32, i32)>,
}

pub(crate) struct WorkerEntry {
    pub info: WorkerInfo,
    pub link: Arc<Link>,
    /// Output frames handed to the events thread and not printed yet: a reply that comes
    /// after them goes the same way, so a call's output is out before its result.
    output_pending: AtomicUsize,
}

/// What the events thread does, in order.
pub(crate) enum Event {
    /// Lines a worker printed: to the output sink.
    Output(Arc<WorkerEntry>, Frame),
    /// A reply that must not overtake output still queued.
    Resolve(Arc<WorkerEntry>, Frame),
    /// A worker is gone: fail its calls, run the departure hooks.
    Gone(Arc<WorkerEntry>, String),
}

/// Bytes of worker output that may wait for the sink; past it, lines are dropped (counted).
const OUTPUT_QUEUE_LIMIT: usize = 64 << 20;

/// One `add_procs` waiting for its workers.
pub(crate) struct LaunchWait {
    pub base: Pid,
    pub n: usize,
    state: Mutex<LaunchState>,
    cv: Condvar,
}

#[derive(Default)]
struct LaunchState {
    reserved: Vec<bool>,
    connected: Vec<Pid>,
    /// Why the launch cannot complete (a worker was refused, descriptors ran out).
    failure: Option<String>,
}

impl LaunchWait {
    /// Waits up to `timeout` for more workers; returns how many are connected, or why the
    /// launch cannot complete (a worker was refused, the master ran out of descriptors).
    pub(crate) fn wait(&self, timeout: Duration) -> std::result::Result<usize, String> {
        let s = self.state.lock().expect("launch lock");
        let (s, _) = self.cv.wait_timeout_while(s, timeout, |s| s.connected.len() < self.n && s.failure.is_none()).expect("launch lock");
        match &s.failure {
            Some(reason) => Err(reason.clone()),
            None => Ok(s.connected.len()),
        }
    }

    pub(crate) fn connected(&self) -> Vec<Pid> {
        self.state.lock().expect("launch lock").connected.clone()
    }

    /// Indices of the workers that never connected.
    pub(crate) fn missing(&self) -> Vec<u32> {
        let s = self.state.lock().expect("launch lock");
        s.reserved.iter().enumerate().filter(|(_, r)| !**r).map(|(i, _)| i as u32).collect()
    }
}

/// Called with the pid and the reason when a worker's connection ends.
pub(crate) type DepartureHook = Box<dyn Fn(Pid, &str) + Send + Sync>;

pub(crate) struct Master {
    pub secret: Secret,
    pub listener: Mutex<Option<Listener>>,
    pub addr: SocketAddr,
    pub advertise: std::net::IpAddr,
    pub workers: RwLock<BTreeMap<Pid, Arc<WorkerEntry>>>,
    pub next_pid: AtomicU32,
    pub waiting: Mutex<HashMap<u64, Arc<LaunchWait>>>,
    pub launches: Mutex<Vec<(u64, Box<dyn Launch>)>>,
    pub output: OutputSink,
    pub refusals: Mutex<RefusalLog>,
    /// Workers that are gone, with the reason (newest last).
    pub terminated: Mutex<Vec<(Pid, String)>>,
    /// Told about every worker that is gone (elastic managers keep their lists with it).
    pub departures: Mutex<Vec<DepartureHook>>,
    pub shut: AtomicBool,
    pub max_frame: usize,
    pub liveness: Liveness,
    pub handshakes: HandshakeLimits,
    /// A listener that failed to start, reported by `ClusterBuilder::build`.
    pub start_error: Mutex<Option<crate::error::Error>>,
    /// All-to-all topology: workers connect to each other directly.
    pub direct_links: bool,
    /// Where each worker listens for direct links from its peers.
    pub peer_addresses: Mutex<HashMap<Pid, String>>,
    /// Frames forwarded from one worker to another.
    pub routed: std::sync::atomic::AtomicU64,
    /// Runs calls addressed to pid 1.
    pub pool: Pool,
    /// To the events thread.
    pub events: crossbeam_channel::Sender<Event>,
    /// Worker output bytes waiting for the sink, and lines dropped for want of room.
    pub output_queued: AtomicUsize,
    pub output_dropped: std::sync::atomic::AtomicU64,
}

impl Master {
    pub(crate) fn register_launch(&self, id: u64, n: usize) -> Arc<LaunchWait> {
        let base = self.next_pid.fetch_add(n as u32, Ordering::Relaxed);
        let state = LaunchState { reserved: vec![false; n], ..LaunchState::default() };
        let wait = Arc::new(LaunchWait { base, n, state: Mutex::new(state), cv: Condvar::new() });
        self.waiting.lock().expect("waiting lock").insert(id, wait.clone());
        wait
    }

    pub(crate) fn unregister_launch(&self, id: u64) {
        self.waiting.lock().expect("waiting lock").remove(&id);
    }

    pub(crate) fn worker(&self, pid: Pid) -> Option<Arc<WorkerEntry>> {
        self.workers.read().expect("workers lock").get(&pid).cloned()
    }

    /// The terms every worker of this master is admitted on.
    pub(crate) fn terms(&self, pid: Pid) -> Terms {
        Terms { pid, direct_links: self.direct_links, max_frame: self.max_frame, liveness: self.liveness }
    }

    /// Records a refused connection (bounded) and, when it names a waiting launch, fails
    /// that launch at once with the reason.
    pub(crate) fn refused(&self, what: &str, peer: SocketAddr, refusal: &Refusal) {
        self.refusals.lock().expect("refusals lock").record(what, peer, &refusal.reason);
        if let Some(wait) = refusal.launch.and_then(|id| self.waiting.lock().expect("waiting lock").get(&id).cloned()) {
            wait.state.lock().expect("launch lock").failure.get_or_insert_with(|| format!("a worker was refused: {}", refusal.reason));
            wait.cv.notify_all();
        }
    }

    /// Ends the process of a worker that does not answer, where this master started it.
    fn kill(&self, info: &WorkerInfo) {
        for (_, launch) in self.launches.lock().expect("launches lock").iter_mut() {
            if launch.kill_worker(info) {
                tracing::info!("killed worker {} (os pid {} on {})", info.pid, info.os_pid, info.host);
                return;
            }
        }
    }
}

/// The listener's view of the master. Weak, so a forgotten cluster can still be dropped.
pub(crate) struct Admission(pub Weak<Inner>);

impl Admit for Admission {
    fn admit(&self, hello: &Hello) -> std::result::Result<Welcome, Refusal> {
        let refuse = |reason: String| Refusal { reason, launch: hello.launch.map(|(id, _)| id) };
        let inner = self.0.upgrade().ok_or_else(|| refuse("the master is shutting down".into()))?;
        let m = inner.master();
        if m.shut.load(Ordering::Relaxed) {
            return Err(refuse("the master is shutting down".into()));
        }
        if let Some(problem) = &hello.problem {
            return Err(refuse(format!("worker on {} (os pid {}): {problem}", hello.host, hello.os_pid)));
        }
        if hello.peer.is_some() {
            return Err(refuse("a worker-to-worker hello sent to the master's listener".into()));
        }
        let Some((launch, index)) = hello.launch else {
            return Err(refuse("this master accepts only workers it launched (no CLUSTERMAN_LAUNCH); use an ElasticManager for workers that join by themselves".into()));
        };
        let wait = m.waiting.lock().expect("waiting lock").get(&launch).cloned().ok_or_else(|| {
            refuse(format!("no launch {launch} is waiting for workers (it timed out, or this worker belongs to another master)"))
        })?;
        let index = index as usize;
        let mut s = wait.state.lock().expect("launch lock");
        match s.reserved.get_mut(index) {
            None => Err(format!("worker index {index} is outside launch {launch} of {} workers", wait.n)),
            Some(true) => Err(match hello.mpi {
                Some((rank, 1)) => format!(
                    "MPI rank {rank} reports a world of 1 process, and its index was taken: the launcher does not match the MPI this program was built with (it started single-rank copies); use the matching mpirun/mpiexec"
                ),
                _ => format!("worker index {index} of launch {launch} has already connected"),
            }),
            Some(r) => {
                *r = true;
                Ok(wait.base + index as Pid)
            }
        }
        .map_err(refuse)
        .map(|pid| {
            tracing::debug!(pid, host = %hello.host, os_pid = hello.os_pid, "worker admitted");
            Welcome::Accepted(m.terms(pid))
        })
    }

    fn serve(&self, pid: Pid, hello: Hello, stream: tokio::net::TcpStream) {
        let Some(inner) = self.0.upgrade() else { return };
        let Some((launch, _)) = hello.launch else { return };
        serve_connection(&inner, pid, hello, stream);
        if let Some(wait) = inner.master().waiting.lock().expect("waiting lock").get(&launch) {
            wait.state.lock().expect("launch lock").connected.push(pid);
            wait.cv.notify_all();
        }
    }

    fn refused(&self, peer: SocketAddr, refusal: &Refusal) {
        if let Some(inner) = self.0.upgrade() {
            inner.master().refused("the master", peer, refusal);
        }
    }

    fn out_of_descriptors(&self, problem: &str) {
        // the launches waiting now cannot complete: say why at once, not at their timeout
        let Some(inner) = self.0.upgrade() else { return };
        for wait in inner.master().waiting.lock().expect("waiting lock").values() {
            wait.state.lock().expect("launch lock").failure.get_or_insert_with(|| problem.to_string());
            wait.cv.notify_all();
        }
    }
}

/// Puts a worker that passed the handshake on `stream` into the process table; the I/O
/// thread reads its connection from now on. Runs on the I/O thread.
pub(crate) fn serve_connection(inner: &Arc<Inner>, pid: Pid, hello: Hello, stream: tokio::net::TcpStream) -> Arc<WorkerEntry> {
    let stream = Arc::new(stream);
    let info = WorkerInfo { pid, host: hello.host, os_pid: hello.os_pid, mpi: hello.mpi };
    let max_frame = inner.master().max_frame;
    let entry = add_worker(inner, info, Link::new(pid, TcpOut::evented(stream.clone()), max_frame));
    let (weak, reading) = (Arc::downgrade(inner), entry.clone());
    let on_frame = move |frame| match weak.upgrade() {
        Some(inner) => dispatch(&inner, &reading, frame),
        None => Err("the master is gone".to_string()),
    };
    let (events, ended) = (inner.master().events.clone(), entry.clone());
    read_frames(stream, max_frame, on_frame, move |reason| {
        ended.link.close();
        let reason = ended.link.given_up().unwrap_or(reason);
        let _ = events.send(Event::Gone(ended, reason));
    });
    entry
}

/// Puts a worker into the process table.
pub(crate) fn add_worker(inner: &Arc<Inner>, info: WorkerInfo, link: Arc<Link>) -> Arc<WorkerEntry> {
    let entry = Arc::new(WorkerEntry { info, link, output_pending: AtomicUsize::new(0) });
    inner.master().workers.write().expect("workers lock").insert(entry.info.pid, entry.clone());
    entry
}

/// Starts the events thread: the user's output sink and departure hooks run there, in the
/// order things happened, and never on the I/O thread. Ends with the cluster.
pub(crate) fn start_events(inner: Weak<Inner>, events: crossbeam_channel::Receiver<Event>) -> std::io::Result<()> {
    std::thread::Builder::new().name("cman-events".into()).spawn(move || {
        for event in events {
            let Some(inner) = inner.upgrade() else { return };
            let m = inner.master();
            match event {
                Event::Output(entry, frame) => {
                    m.output_queued.fetch_sub(frame.payload().len(), Ordering::Relaxed);
                    let text = String::from_utf8_lossy(frame.payload());
                    for line in text.lines() {
                        (m.output)(entry.info.pid, line);
                    }
                    entry.output_pending.fetch_sub(1, Ordering::Release);
                }
                Event::Resolve(entry, frame) => entry.link.resolve(frame),
                Event::Gone(entry, reason) => worker_gone(&inner, &entry, &reason),
            }
        }
    })?;
    Ok(())
}

/// What stopped a worker's conversation after a goodbye.
pub(crate) const STOPPED: &str = "stopped";

/// Handles one frame from worker `entry`. `Err` ends the conversation with that worker:
/// its goodbye ([`STOPPED`]), or a broken protocol.
pub(crate) fn dispatch(inner: &Arc<Inner>, entry: &Arc<WorkerEntry>, frame: Frame) -> std::result::Result<(), String> {
    let h = frame.header;
    let from = entry.info.pid;
    if h.src != from {
        return Err(format!("protocol error: worker {from} sent a frame claiming to be from pid {}", h.src));
    }
    entry.link.heard();
    let m = inner.master();
    match h.kind {
        Kind::Heartbeat => {}
        Kind::Reply | Kind::Failure if h.dst == 1 => {
            if entry.output_pending.load(Ordering::Acquire) > 0 {
                let _ = m.events.send(Event::Resolve(entry.clone(), frame));
            } else {
                entry.link.resolve(frame);
            }
        }
        Kind::Reply | Kind::Failure => {
            entry.link.routed_done(h.dst, h.req);
            if let Some(target) = m.worker(h.dst) {
                let _ = target.link.forward(frame);
            }
        }
        Kind::Call | Kind::Cast | Kind::Batch if h.dst == 1 => run_here(inner, entry.link.clone(), frame),
        Kind::Call | Kind::Cast | Kind::Batch => match m.worker(h.dst) {
            Some(target) => {
                m.routed.fetch_add(1, Ordering::Relaxed);
                if h.kind != Kind::Cast {
                    target.link.note_routed(from, h.req);
                }
                if let Err(e) = target.link.forward(frame) {
                    if h.kind != Kind::Cast {
                        target.link.routed_done(from, h.req);
                        let failure = match e {
                            Error::Busy { pid, reason } => Failure::Busy { pid, reason },
                            e => Failure::WorkerDied { pid: h.dst, reason: e.to_string() },
                        };
                        send_failure(entry, h.dst, h.req, &failure);
                    }
                }
            }
            None if h.kind != Kind::Cast => send_failure(entry, h.dst, h.req, &Failure::NoSuchWorker(h.dst)),
            None => {}
        },
        Kind::Output => {
            let bytes = frame.payload().len();
            if m.output_queued.fetch_add(bytes, Ordering::Relaxed) + bytes > OUTPUT_QUEUE_LIMIT {
                m.output_queued.fetch_sub(bytes, Ordering::Relaxed);
                if m.output_dropped.fetch_add(1, Ordering::Relaxed) % 1000 == 0 {
                    tracing::warn!("the output sink does not keep up: worker output is being dropped");
                }
            } else {
                entry.output_pending.fetch_add(1, Ordering::Release);
                let _ = m.events.send(Event::Output(entry.clone(), frame));
            }
        }
        Kind::Shutdown => return Err(STOPPED.into()),
    }
    Ok(())
}

/// Runs a call addressed to the master on the pool (the reader must keep reading, or a call
/// that waits for this same worker would deadlock); a call the pool cannot take fails now.
fn run_here(inner: &Arc<Inner>, reply_to: Arc<Link>, frame: Frame) {
    let cluster = Cluster::handle(inner.clone());
    let h = frame.header;
    let patience = inner.master().liveness.timeout;
    let refused_to = reply_to.clone();
    inner.master().pool.submit(Job {
        run: Box::new(move || {
            if let Some(reply) = super::with_current(&cluster, || exec::execute(1, &frame)) {
                let _ = reply_to.send_patiently(reply, Instant::now() + patience);
            }
        }),
        refuse: Box::new(move |reason| {
            tracing::warn!("a call from worker {} to the master was refused: {reason}", h.src);
            if h.kind != Kind::Cast {
                if let Ok(bytes) = failure_frame(1, h.src, h.req, &Failure::Busy { pid: 1, reason }) {
                    let _ = refused_to.send(bytes);
                }
            }
        }),
    });
}

fn send_failure(to: &WorkerEntry, from: Pid, req: u64, failure: &Failure) {
    if let Ok(bytes) = failure_frame(from, to.info.pid, req, failure) {
        let _ = to.link.send(bytes);
    }
}

/// A worker's connection is gone: fail what waits on it, tell callers routed through it.
/// Runs once per worker (later calls find it gone and do nothing).
pub(crate) fn worker_gone(inner: &Arc<Inner>, entry: &Arc<WorkerEntry>, reason: &str) {
    let pid = entry.info.pid;
    let m = inner.master();
    // Out of the table first: whoever waits for the link to die then sees the worker gone.
    if m.workers.write().expect("workers lock").remove(&pid).is_none() {
        return;
    }
    let shutting_down = m.shut.load(Ordering::Relaxed);
    if shutting_down || reason == STOPPED {
        tracing::debug!("worker {pid} stopped: {reason}");
    } else {
        tracing::warn!("worker {pid} (os pid {} on {}) terminated: {reason}", entry.info.os_pid, entry.info.host);
    }
    m.peer_addresses.lock().expect("peer addresses lock").remove(&pid);
    m.terminated.lock().expect("terminated lock").push((pid, reason.to_string()));
    if shutting_down {
        entry.link.fail_all_with(reason, || Error::ShutDown);
    } else {
        entry.link.fail_all(reason);
    }
    for hook in m.departures.lock().expect("departures lock").iter() {
        hook(pid, reason);
    }
    for (caller, req) in entry.link.take_routed() {
        if let Some(c) = m.worker(caller) {
            send_failure(&c, pid, req, &Failure::WorkerDied { pid, reason: reason.to_string() });
        }
    }
}

/// Gives up on a worker that does not answer: closes its connection, fails what waits on
/// it, and ends its process where this master started it.
fn give_up(inner: &Arc<Inner>, entry: &Arc<WorkerEntry>, reason: String) {
    entry.link.give_up(reason.clone());
    worker_gone(inner, entry, &reason);
    inner.master().kill(&entry.info);
}

/// Asks workers to stop and waits (up to `grace`) until their connections are gone; those
/// still there are cut off and, where this master started them, killed.
pub(crate) fn stop_workers(inner: &Arc<Inner>, pids: &[Pid], grace: Duration) {
    let m = inner.master();
    let entries: Vec<_> = pids.iter().filter_map(|p| m.worker(*p)).collect();
    for e in &entries {
        let _ = e.link.send(bare(Kind::Shutdown, 1, e.info.pid));
    }
    let deadline = Instant::now() + grace;
    for e in &entries {
        if !e.link.wait_dead(deadline.saturating_duration_since(Instant::now())) {
            tracing::warn!("worker {} did not stop within {grace:?}; cutting it off", e.info.pid);
            give_up(inner, e, format!("did not stop within {} s of being asked", grace.as_secs()));
        }
    }
}

/// Starts the master's heartbeat on the I/O thread: every interval it sends each worker a
/// heartbeat and gives up on workers silent for the timeout. Ends with the cluster.
pub(crate) fn watch_workers(inner: Weak<Inner>, liveness: Liveness) {
    crate::transport::io::spawn(async move {
        let mut tick = tokio::time::interval(liveness.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else { return };
            let m = inner.master();
            if m.shut.load(Ordering::Relaxed) {
                return;
            }
            let entries: Vec<Arc<WorkerEntry>> = m.workers.read().expect("workers lock").values().cloned().collect();
            for entry in entries.into_iter().filter(|e| e.link.given_up().is_none()) {
                let _ = entry.link.send(bare(Kind::Heartbeat, 1, entry.info.pid));
                if let Health::Silent(silence) = entry.link.health(&liveness) {
                    let reason = format!("no heartbeat for {} s (stopped, hung, or its node or network is gone)", silence.as_secs());
                    // user callbacks run on worker death: not on the I/O thread
                    let inner = inner.clone();
                    entry.link.give_up(reason.clone());
                    let spawned = std::thread::Builder::new().name("cman-give-up".into()).spawn(move || give_up(&inner, &entry, reason));
                    if let Err(e) = spawned {
                        tracing::error!("cannot start a thread to clean up after a dead worker: {e}");
                    }
                }
            }
        }
    });
}
