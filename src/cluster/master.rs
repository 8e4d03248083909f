//! The master's state: the process table, the launches waiting for their workers, and the
//! reader thread of each worker connection, which resolves replies, routes worker-to-worker
//! frames and prints worker output.

use std::collections::{BTreeMap, HashMap};
use std::io::BufReader;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::Duration;

use crate::Pid;
use crate::error::Result;
use crate::launch::listener::{Admit, Listener};
use crate::launch::Launch;
use crate::protocol::{self, Frame, Hello, Kind, Refusal, Secret, Welcome};

use super::exec;
use super::failure::Failure;
use super::link::{Link, TcpOut, failure_frame};
use super::output::OutputSink;
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
}

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
    /// Why a worker of this launch was refused (the launch cannot complete).
    failure: Option<String>,
}

impl LaunchWait {
    /// Waits up to `timeout` for more workers; returns how many are connected, or why one
    /// of them was refused.
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
    pub refusals: Mutex<Vec<String>>,
    /// Workers that are gone, with the reason (newest last).
    pub terminated: Mutex<Vec<(Pid, String)>>,
    /// Told about every worker that is gone (elastic managers keep their lists with it).
    pub departures: Mutex<Vec<DepartureHook>>,
    pub shut: AtomicBool,
    pub max_frame: usize,
    /// A listener that failed to start, reported by `ClusterBuilder::build`.
    pub start_error: Mutex<Option<crate::Error>>,
    /// All-to-all topology: workers connect to each other directly.
    pub direct_links: bool,
    /// Where each worker listens for direct links from its peers.
    pub peer_addresses: Mutex<HashMap<Pid, String>>,
    /// Frames forwarded from one worker to another.
    pub routed: std::sync::atomic::AtomicU64,
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
            Welcome::Accepted { pid, direct_links: m.direct_links }
        })
    }

    fn serve(&self, pid: Pid, hello: Hello, stream: TcpStream) {
        let Some(inner) = self.0.upgrade() else { return };
        let Some((launch, _)) = hello.launch else { return };
        if serve_connection(&inner, pid, hello, stream).is_none() {
            return;
        }
        if let Some(wait) = inner.master().waiting.lock().expect("waiting lock").get(&launch) {
            wait.state.lock().expect("launch lock").connected.push(pid);
            wait.cv.notify_all();
        }
    }

    fn refused(&self, peer: SocketAddr, refusal: &Refusal) {
        tracing::warn!("refused a connection from {peer}: {}", refusal.reason);
        let Some(inner) = self.0.upgrade() else { return };
        let m = inner.master();
        m.refusals.lock().expect("refusals lock").push(format!("{peer}: {}", refusal.reason));
        // A worker of a waiting launch was refused: that launch cannot complete, say why now.
        if let Some(wait) = refusal.launch.and_then(|id| m.waiting.lock().expect("waiting lock").get(&id).cloned()) {
            wait.state.lock().expect("launch lock").failure.get_or_insert_with(|| refusal.reason.clone());
            wait.cv.notify_all();
        }
    }
}

/// Puts a worker that passed the handshake on `stream` into the process table and starts
/// reading its connection.
pub(crate) fn serve_connection(inner: &Arc<Inner>, pid: Pid, hello: Hello, stream: TcpStream) -> Option<Arc<WorkerEntry>> {
    let reader = stream.try_clone().ok()?;
    let info = WorkerInfo { pid, host: hello.host, os_pid: hello.os_pid, mpi: hello.mpi };
    let entry = add_worker(inner, info, Link::new(pid, TcpOut::boxed(stream)));
    let spawned = std::thread::Builder::new().name(format!("cman-worker-{pid}")).spawn({
        let (inner, entry) = (inner.clone(), entry.clone());
        move || read_worker(inner, entry, reader)
    });
    if spawned.is_err() {
        tracing::error!("cannot start a reader thread for worker {pid}");
    }
    Some(entry)
}

/// Puts a worker into the process table.
pub(crate) fn add_worker(inner: &Arc<Inner>, info: WorkerInfo, link: Arc<Link>) -> Arc<WorkerEntry> {
    let entry = Arc::new(WorkerEntry { info, link });
    inner.master().workers.write().expect("workers lock").insert(entry.info.pid, entry.clone());
    entry
}

/// The reader thread of one worker connection.
fn read_worker(inner: Arc<Inner>, entry: Arc<WorkerEntry>, stream: TcpStream) {
    let max = inner.master().max_frame;
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let reason = loop {
        let frame = match protocol::read_frame(&mut reader, max) {
            Ok(Some(frame)) => frame,
            Ok(None) => break "its connection closed".to_string(),
            Err(e) => break e.to_string(),
        };
        if let Err(reason) = dispatch(&inner, &entry, frame) {
            break reason;
        }
    };
    entry.link.close();
    worker_gone(&inner, &entry, &reason);
}

/// What stopped a worker's conversation after a goodbye.
pub(crate) const STOPPED: &str = "stopped";

/// Handles one frame from worker `entry`. `Err` ends the conversation with that worker:
/// its goodbye ([`STOPPED`]), or a broken protocol.
pub(crate) fn dispatch(inner: &Arc<Inner>, entry: &WorkerEntry, frame: Frame) -> std::result::Result<(), String> {
    let h = frame.header;
    let from = entry.info.pid;
    if h.src != from {
        return Err(format!("protocol error: worker {from} sent a frame claiming to be from pid {}", h.src));
    }
    match h.kind {
        Kind::Reply | Kind::Failure if h.dst == 1 => entry.link.resolve(frame),
        Kind::Reply | Kind::Failure => {
            entry.link.routed_done(h.dst, h.req);
            if let Some(target) = inner.master().worker(h.dst) {
                let _ = target.link.forward(&frame.body);
            }
        }
        Kind::Call | Kind::Cast | Kind::Batch if h.dst == 1 => {
            // Run on a fresh thread: the reader must keep reading, or a call that waits for
            // this same worker would deadlock.
            let cluster = Cluster::handle(inner.clone());
            let link = entry.link.clone();
            let _ = std::thread::Builder::new().name("cman-exec".into()).spawn(move || {
                let reply = super::with_current(&cluster, || exec::execute(1, &frame));
                if let Some(reply) = reply {
                    let _ = link.send(reply);
                }
            });
        }
        Kind::Call | Kind::Cast | Kind::Batch => match inner.master().worker(h.dst) {
            Some(target) => {
                inner.master().routed.fetch_add(1, Ordering::Relaxed);
                if h.kind != Kind::Cast {
                    target.link.note_routed(from, h.req);
                }
                if target.link.forward(&frame.body).is_err() && h.kind != Kind::Cast {
                    target.link.routed_done(from, h.req);
                    let reason = "its connection failed".to_string();
                    send_failure(entry, h.dst, h.req, &Failure::WorkerDied { pid: h.dst, reason });
                }
            }
            None if h.kind != Kind::Cast => send_failure(entry, h.dst, h.req, &Failure::NoSuchWorker(h.dst)),
            None => {}
        },
        Kind::Output => {
            let text = String::from_utf8_lossy(frame.payload());
            for line in text.lines() {
                (inner.master().output)(from, line);
            }
        }
        Kind::Shutdown => return Err(STOPPED.into()),
    }
    Ok(())
}

fn send_failure(to: &WorkerEntry, from: Pid, req: u64, failure: &Failure) {
    if let Ok(bytes) = failure_frame(from, to.info.pid, req, failure) {
        let _ = to.link.send(bytes);
    }
}

/// A worker's connection is gone: fail what waits on it, tell callers routed through it.
pub(crate) fn worker_gone(inner: &Arc<Inner>, entry: &Arc<WorkerEntry>, reason: &str) {
    let pid = entry.info.pid;
    let m = inner.master();
    if m.shut.load(Ordering::Relaxed) || reason == STOPPED {
        tracing::debug!("worker {pid} stopped: {reason}");
    } else {
        tracing::warn!("worker {pid} (os pid {} on {}) terminated: {reason}", entry.info.os_pid, entry.info.host);
    }
    // Out of the table first: whoever waits for the link to die then sees the worker gone.
    m.workers.write().expect("workers lock").remove(&pid);
    m.peer_addresses.lock().expect("peer addresses lock").remove(&pid);
    m.terminated.lock().expect("terminated lock").push((pid, reason.to_string()));
    entry.link.fail_all(reason);
    for hook in m.departures.lock().expect("departures lock").iter() {
        hook(pid, reason);
    }
    for (caller, req) in entry.link.take_routed() {
        if let Some(c) = m.worker(caller) {
            send_failure(&c, pid, req, &Failure::WorkerDied { pid, reason: reason.to_string() });
        }
    }
}

/// Asks workers to stop and waits (up to `grace`) until their connections are gone.
pub(crate) fn stop_workers(m: &Master, pids: &[Pid], grace: Duration) -> Result<()> {
    let entries: Vec<_> = pids.iter().filter_map(|p| m.worker(*p)).collect();
    for e in &entries {
        let frame = crate::protocol::FrameBuf::new(crate::protocol::Header { kind: Kind::Shutdown, src: 1, dst: e.info.pid, req: 0, func: 0 });
        let _ = e.link.send(frame.finish()?);
    }
    let deadline = std::time::Instant::now() + grace;
    for e in &entries {
        if !e.link.wait_dead(deadline.saturating_duration_since(std::time::Instant::now())) {
            tracing::warn!("worker {} did not stop within {grace:?}; closing its connection", e.info.pid);
            e.link.close();
        }
    }
    Ok(())
}
