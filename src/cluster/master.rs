//! The master's driver: the connections to its workers and the launches waiting for them,
//! around the protocol core ([`MasterCore`]: calls, routing, heartbeats; [`Admission`]: who
//! may join as which pid), which it feeds
//! every frame (on the I/O runtime, which reads all connections), every connection end and
//! the time, and whose output it carries out: sending, running calls addressed to the
//! master, resolving callers. The user's output sink and membership hooks run on an events
//! thread, never on the I/O runtime.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::ids::Pid;
use crate::codec::HeldWords;
use crate::protocol::admission::{Admission, Seat};
use crate::protocol::failure::{Failure, failure_frame};
use crate::protocol::id_map::IdMap;
use crate::protocol::master::{Event as CoreEvent, MasterCore, STOPPED, Transmit};
use crate::protocol::{Frame, Header, Hello, Kind, Liveness, call_frame, Refusal, Secret, Terms, Welcome};
use crate::transport::Out;
use crate::transport::listener::{Admit, Listener};
use crate::transport::reading::{Reading, read_frames};
use crate::transport::tcp::TcpOut;
use crate::sys::Hint;

use super::exec;
use super::launcher::Launch;
use super::output::OutputSink;
use super::pool::{Job, Pool};
use super::refusals::RefusalLog;
use super::slot::{Source, Waiter};
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

/// A connection to a worker.
pub(crate) struct WorkerEntry {
    pub info: WorkerInfo,
    out: Out,
    /// Read by the I/O runtime, which reports its end; an MPI link has no end of its own.
    evented: bool,
    /// How its connection is read (evented connections): a caller waiting for a reply from
    /// it may read it itself.
    reading: OnceLock<Weak<Reading>>,
    /// Output frames handed to the events thread and not printed yet: a reply that comes
    /// after them goes the same way, so a call's output is out before its result.
    output_pending: AtomicUsize,
    /// Where the protocol core keeps this worker's state ([`MasterCore::state_address`]).
    core_state: Hint,
}

impl WorkerEntry {
    /// Brings what a call to this worker touches beyond this entry into the caches: its
    /// connection's send state and the core's state of it (a round over many workers asks
    /// this a step ahead of each call).
    pub(crate) fn prefetch_for_call(&self) {
        self.out.prefetch();
        self.core_state.prefetch();
    }
}

impl Source for WorkerEntry {
    fn reading(&self) -> Option<Arc<Reading>> {
        self.reading.get()?.upgrade()
    }
}

/// The workers' entries by pid, and in pid order as one list, made when first asked for
/// after a change: an `everywhere` round takes that list, not a copy and a sort of its own.
#[derive(Default)]
pub(crate) struct Workers {
    by_pid: IdMap<Arc<WorkerEntry>, Pid>,
    in_order: OnceLock<InOrder>,
}

/// Every worker's entry, by ascending pid.
pub(crate) type InOrder = Arc<[(Pid, Arc<WorkerEntry>)]>;

impl Workers {
    pub(crate) fn get(&self, pid: &Pid) -> Option<&Arc<WorkerEntry>> {
        self.by_pid.get(pid)
    }

    pub(crate) fn pids(&self) -> Vec<Pid> {
        self.in_order().iter().map(|&(pid, _)| pid).collect()
    }

    fn in_order(&self) -> InOrder {
        let made = self.in_order.get_or_init(|| {
            let mut all: Vec<_> = self.by_pid.iter().map(|(&pid, entry)| (pid, entry.clone())).collect();
            all.sort_unstable_by_key(|&(pid, _)| pid);
            all.into()
        });
        made.clone()
    }

    fn insert(&mut self, pid: Pid, entry: Arc<WorkerEntry>) {
        self.by_pid.insert(pid, entry);
        self.in_order = OnceLock::new();
    }

    fn remove(&mut self, pid: &Pid) -> Option<Arc<WorkerEntry>> {
        let entry = self.by_pid.remove(pid)?;
        self.in_order = OnceLock::new();
        Some(entry)
    }
}

/// What the events thread does, in order.
pub(crate) enum Event {
    /// Lines a worker printed: to the output sink.
    Output(Arc<WorkerEntry>, Frame),
    /// A reply that must not overtake output still queued.
    Resolve(Waiter, Result<Frame>),
    /// A worker joined by itself, or is gone: run the membership hooks.
    Membership(Membership),
    /// End the process of a worker that stopped answering, where a launch of ours can.
    Kill(WorkerInfo),
    /// Everything sent before has been handled: say so.
    Barrier(crossbeam_channel::Sender<()>),
}

/// Bytes of worker output that may wait for the sink; past it, lines are dropped (counted).
const OUTPUT_QUEUE_LIMIT: usize = 64 << 20;

/// One `add_procs` waiting for its workers (their seats are in [`Admission`]).
pub(crate) struct LaunchWait {
    pub n: usize,
    state: Mutex<LaunchState>,
    cv: Condvar,
}

#[derive(Default)]
struct LaunchState {
    connected: Vec<Pid>,
    /// Why the launch cannot complete (a worker was refused, descriptors ran out).
    failure: Option<String>,
}

impl LaunchWait {
    /// Waits up to `timeout` for more workers; returns how many are connected, or why the
    /// launch cannot complete (a worker was refused, the master ran out of descriptors).
    pub(crate) fn wait(&self, timeout: Duration) -> std::result::Result<usize, String> {
        crate::transport::io::needed(); // workers are admitted on the I/O runtime
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
}

/// A change in who is in the cluster, as membership hooks are told it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Membership {
    /// A worker joined by itself (through an open join rule).
    Joined(Pid),
    /// A worker is gone (why is in the cluster's terminated list).
    Left(Pid),
}

/// Told every [`Membership`] change, on the events thread.
pub(crate) type MembershipHook = Box<dyn Fn(Membership) + Send + Sync>;

pub(crate) struct Master {
    pub secret: Secret,
    pub listener: Mutex<Option<Listener>>,
    pub addr: SocketAddr,
    pub advertise: std::net::IpAddr,
    /// Calls, routing and heartbeats.
    pub core: Mutex<MasterCore<Waiter>>,
    /// The connections, by pid.
    pub workers: RwLock<Workers>,
    /// Signalled when a worker is gone.
    pub departed: (Mutex<()>, Condvar),
    /// Who may join, as which pid.
    pub admission: Mutex<Admission>,
    pub waiting: Mutex<HashMap<u64, Arc<LaunchWait>>>,
    pub launches: Mutex<Vec<(u64, Box<dyn Launch>)>>,
    pub output: OutputSink,
    pub refusals: Mutex<RefusalLog>,
    /// Workers that are gone, with the reason (newest last).
    pub terminated: Mutex<Vec<(Pid, String)>>,
    /// Told who joins by themselves and who is gone (elastic managers keep their lists so).
    pub membership: Mutex<Vec<MembershipHook>>,
    pub shut: AtomicBool,
    pub max_frame: usize,
    pub liveness: Liveness,
    /// A listener that failed to start, reported by `ClusterBuilder::build`.
    pub start_error: Mutex<Option<crate::error::Error>>,
    /// All-to-all topology: workers connect to each other directly.
    pub direct_links: bool,
    /// Where each worker listens for direct links from its peers.
    pub peer_addresses: Mutex<HashMap<Pid, String>>,
    /// All-to-all workers that are connected but not yet listening for their peers: they
    /// count as started once they are, so no first call between them goes the long way.
    pub not_listening: Mutex<HashMap<Pid, Seat>>,
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
        self.admission.lock().expect("admission lock").open_launch(id, n);
        let wait = Arc::new(LaunchWait { n, state: Mutex::default(), cv: Condvar::new() });
        self.waiting.lock().expect("waiting lock").insert(id, wait.clone());
        wait
    }

    /// Stops waiting for the workers of launch `id`; returns the indices that never came.
    pub(crate) fn unregister_launch(&self, id: u64) -> Vec<u32> {
        self.waiting.lock().expect("waiting lock").remove(&id);
        self.admission.lock().expect("admission lock").close_launch(id)
    }

    pub(crate) fn worker(&self, pid: Pid) -> Option<Arc<WorkerEntry>> {
        self.workers.read().expect("workers lock").get(&pid).cloned()
    }

    /// Every worker's entry, by ascending pid.
    pub(crate) fn worker_entries(&self) -> InOrder {
        self.workers.read().expect("workers lock").in_order()
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

    /// Worker `pid` listens for its peers at `address` (all-to-all topology): it has started.
    pub(crate) fn listens(&self, pid: Pid, address: String) {
        self.peer_addresses.lock().expect("peer addresses lock").insert(pid, address);
        if let Some(seat) = self.not_listening.lock().expect("not listening lock").remove(&pid) {
            self.started(seat);
        }
    }

    /// A worker is ready for calls: its launch counts it, or its joining is told.
    fn started(&self, seat: Seat) {
        match seat {
            Seat::Launched { launch, pid } => {
                if let Some(wait) = self.waiting.lock().expect("waiting lock").get(&launch) {
                    wait.state.lock().expect("launch lock").connected.push(pid);
                    wait.cv.notify_all();
                }
            }
            Seat::Joined(pid) => {
                tracing::info!("worker {pid} joined");
                let _ = self.events.send(Event::Membership(Membership::Joined(pid)));
            }
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
pub(crate) struct Door(pub Weak<Inner>);

impl Admit for Door {
    type Seat = Seat;

    fn admit(&self, hello: &Hello) -> std::result::Result<(Welcome, Seat), Refusal> {
        let refuse = |reason: String| Refusal { reason, launch: hello.launch.map(|(id, _)| id) };
        let inner = self.0.upgrade().ok_or_else(|| refuse("the master is shutting down".into()))?;
        let m = inner.master();
        if m.shut.load(Ordering::Relaxed) {
            return Err(refuse("the master is shutting down".into()));
        }
        let seat = m.admission.lock().expect("admission lock").admit(hello).map_err(refuse)?;
        tracing::debug!(pid = seat.pid(), host = %hello.host, os_pid = hello.os_pid, "worker admitted");
        Ok((Welcome::Accepted(m.terms(seat.pid())), seat))
    }

    fn serve(&self, seat: Seat, hello: Hello, stream: tokio::net::TcpStream) {
        let Some(inner) = self.0.upgrade() else { return };
        serve_connection(&inner, seat.pid(), hello, stream);
        let m = inner.master();
        if m.direct_links {
            m.not_listening.lock().expect("not listening lock").insert(seat.pid(), seat);
        } else {
            m.started(seat);
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
/// runtime reads its connection from now on. Runs on the I/O runtime.
pub(crate) fn serve_connection(inner: &Arc<Inner>, pid: Pid, hello: Hello, stream: tokio::net::TcpStream) {
    let stream = match stream.into_std() {
        Ok(stream) => Arc::new(stream), // out of the runtime's own set: the poller reads it
        Err(e) => return tracing::warn!(pid, "worker {pid} lost at admission: {e}"),
    };
    let info = WorkerInfo { pid, host: hello.host, os_pid: hello.os_pid, mpi: hello.mpi };
    let entry = add_worker(inner, info, TcpOut::over(stream.clone()), true);
    let (weak, from) = (Arc::downgrade(inner), entry.clone());
    let on_frame = move |frame| match weak.upgrade() {
        Some(inner) => handle_frame(&inner, &from, frame),
        None => Err("the master is gone".to_string()),
    };
    let (weak, ended) = (Arc::downgrade(inner), entry.clone());
    let touched = [Hint::of(&*entry), entry.core_state]; // what a reply touches first
    let reading = read_frames(stream, inner.master().max_frame, on_frame, move |reason| {
        ended.out.close();
        if let Some(inner) = weak.upgrade() {
            closed(&inner, ended.info.pid, &reason);
        }
    }, touched);
    let _ = entry.reading.set(Arc::downgrade(&reading));
}

/// Puts a worker into the process table, talking through `out`.
pub(crate) fn add_worker(inner: &Arc<Inner>, info: WorkerInfo, out: Out, evented: bool) -> Arc<WorkerEntry> {
    let m = inner.master();
    let pid = info.pid;
    let core_state = {
        let mut core = m.core.lock().expect("core lock");
        core.add_worker(pid, Instant::now());
        core.state_address(pid).map_or_else(Hint::default, |(at, bytes)| Hint::raw(at, bytes))
    };
    let entry = Arc::new(WorkerEntry { info, out, evented, reading: OnceLock::new(), output_pending: AtomicUsize::new(0), core_state });
    m.workers.write().expect("workers lock").insert(pid, entry.clone());
    entry
}

/// A frame from worker `entry` (on the I/O runtime, or the MPI progress thread). `Err` ends
/// the conversation with that worker: its goodbye ([`STOPPED`]), or a broken protocol.
pub(crate) fn handle_frame(inner: &Arc<Inner>, entry: &Arc<WorkerEntry>, frame: Frame) -> std::result::Result<(), String> {
    let next = {
        let mut core = inner.master().core.lock().expect("core lock");
        core.handle_frame(Instant::now(), entry.info.pid, frame)?;
        Next::from(&mut core) // under the same lock
    };
    drive_from(inner, Some(entry), next);
    Ok(())
}

/// Worker `pid`'s connection ended, for `reason`.
pub(crate) fn closed(inner: &Arc<Inner>, pid: Pid, reason: &str) {
    inner.master().core.lock().expect("core lock").handle_closed(pid, reason);
    drive(inner, None);
}

/// Carries out what the core asks, until it asks nothing more: sends its transmits, and acts
/// on its events. `from`: the worker whose frame caused them (its output comes first).
fn drive(inner: &Arc<Inner>, from: Option<&Arc<WorkerEntry>>) {
    let next = Next::from(&mut inner.master().core.lock().expect("core lock"));
    drive_from(inner, from, next);
}

/// [`drive`], the core's first request already taken.
fn drive_from(inner: &Arc<Inner>, from: Option<&Arc<WorkerEntry>>, mut next: Next) {
    let m = inner.master();
    loop {
        match next {
            Next::Send(t) => {
                let failed = match m.worker(t.to) {
                    Some(entry) => entry.out.send(t.frame, None).err().map(|e| send_error(t.to, e)),
                    None => Some(Error::NoSuchWorker(t.to)),
                };
                if let Some(error) = failed.filter(|_| t.routed.is_some()) {
                    m.core.lock().expect("core lock").transmit_failed(Transmit { to: t.to, frame: Vec::new().into(), routed: t.routed }, &error);
                }
            }
            Next::Act(event) => act_on(inner, from, event),
            Next::Last(event) => return act_on(inner, from, event),
            Next::Done => return,
        }
        next = Next::from(&mut m.core.lock().expect("core lock"));
    }
}

/// What the core asks next: a frame to send, an event to act on (or the last it has, when
/// acting on it gives the core nothing more: whoever does drives it), or nothing more.
enum Next {
    Send(Transmit),
    Act(CoreEvent<Waiter>),
    Last(CoreEvent<Waiter>),
    Done,
}

impl Next {
    /// One at a time (no list to allocate per frame), every transmit before any event.
    fn from(core: &mut MasterCore<Waiter>) -> Next {
        if let Some(t) = core.poll_transmit() {
            return Next::Send(t);
        }
        match core.poll_event() {
            // delivering a reply gives the core nothing more (other events may: closing a link)
            Some(event @ CoreEvent::Resolved(..)) if core.is_drained() => Next::Last(event),
            Some(event) => Next::Act(event),
            None => Next::Done,
        }
    }
}

/// Acts on one event of the core.
fn act_on(inner: &Arc<Inner>, from: Option<&Arc<WorkerEntry>>, event: CoreEvent<Waiter>) {
    let m = inner.master();
    match event {
        CoreEvent::Resolved(waiter, result) => match from {
            // a reply must not overtake output of its worker that is still on its way
            Some(entry) if entry.output_pending.load(Ordering::Acquire) > 0 => {
                let _ = m.events.send(Event::Resolve(waiter, result));
            }
            _ => waiter.deliver(result),
        },
        CoreEvent::RunHere(pid, frame) => {
            if let Some(entry) = m.worker(pid) {
                run_here(inner, entry, frame);
            }
        }
        CoreEvent::Output(pid, frame) => {
            if let Some(entry) = m.worker(pid) {
                output(m, entry, frame);
            }
        }
        CoreEvent::Close { pid, kill } => {
            let Some(entry) = m.worker(pid) else { return };
            entry.out.close();
            if kill {
                let _ = m.events.send(Event::Kill(entry.info.clone()));
            }
            if !entry.evented {
                // no reader to see the end: it ends here
                m.core.lock().expect("core lock").handle_closed(pid, "its link was closed");
            }
        }
        CoreEvent::Gone { pid, reason } => gone(m, pid, reason),
    }
}

fn send_error(pid: Pid, e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::WouldBlock => Error::Busy { pid, reason: e.to_string() },
        _ => Error::WorkerDied { pid, reason: e.to_string() },
    }
}

/// Hands a worker's output to the events thread, within bounds.
fn output(m: &Master, entry: Arc<WorkerEntry>, frame: Frame) {
    let bytes = frame.payload().len();
    if m.output_queued.fetch_add(bytes, Ordering::Relaxed) + bytes > OUTPUT_QUEUE_LIMIT {
        m.output_queued.fetch_sub(bytes, Ordering::Relaxed);
        if m.output_dropped.fetch_add(1, Ordering::Relaxed) % 1000 == 0 {
            tracing::warn!("the output sink does not keep up: worker output is being dropped");
        }
        return;
    }
    entry.output_pending.fetch_add(1, Ordering::Release);
    let _ = m.events.send(Event::Output(entry, frame));
}

/// A worker is gone: out of the table (whoever waits for that is told), listed as
/// terminated; the membership hooks hear of it on the events thread.
fn gone(m: &Master, pid: Pid, reason: String) {
    let entry = {
        // listed as terminated before anyone can see it missing from the table
        let mut workers = m.workers.write().expect("workers lock");
        let Some(entry) = workers.remove(&pid) else { return };
        m.terminated.lock().expect("terminated lock").push((pid, reason.clone()));
        entry
    };
    if m.shut.load(Ordering::Relaxed) || reason == STOPPED {
        tracing::debug!("worker {pid} stopped: {reason}");
    } else {
        tracing::warn!("worker {pid} (os pid {} on {}) terminated: {reason}", entry.info.os_pid, entry.info.host);
    }
    m.peer_addresses.lock().expect("peer addresses lock").remove(&pid);
    m.not_listening.lock().expect("not listening lock").remove(&pid);
    {
        let _guard = m.departed.0.lock().expect("departed lock");
        m.departed.1.notify_all();
    }
    let _ = m.events.send(Event::Membership(Membership::Left(pid)));
}

/// The name of the events thread.
const EVENTS_THREAD: &str = "cman-events";

/// Starts the events thread: the user's output sink and membership hooks run there, in the
/// order things happened, and never on the I/O runtime. Ends with the cluster.
pub(crate) fn start_events(inner: Weak<Inner>, events: crossbeam_channel::Receiver<Event>) -> std::io::Result<()> {
    std::thread::Builder::new().name(EVENTS_THREAD.into()).spawn(move || {
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
                Event::Resolve(waiter, result) => waiter.deliver(result),
                Event::Membership(change) => m.membership.lock().expect("membership lock").iter().for_each(|hook| hook(change)),
                Event::Kill(info) => m.kill(&info),
                Event::Barrier(done) => {
                    let _ = done.send(());
                }
            }
        }
    })?;
    Ok(())
}

/// Sends a call (or a cast, without `waiter`) to worker `dst`; the payload is written by
/// `encode`. Returns the request id.
pub(crate) fn call(inner: &Arc<Inner>, header: Header, hint: usize, encode: impl FnOnce(&mut Vec<u8>) -> Result<Option<HeldWords>>, waiter: Option<Waiter>) -> Result<u64> {
    let Some(entry) = inner.master().worker(header.dst) else { return Err(Error::NoSuchWorker(header.dst)) };
    call_entry(inner, &entry, header, hint, encode, waiter)
}

/// [`call`] to the worker of `entry` (`header.dst`), already looked up: a round over every
/// worker takes them all under one lock, and spares a search per worker.
pub(crate) fn call_entry(inner: &Arc<Inner>, entry: &Arc<WorkerEntry>, header: Header, hint: usize, encode: impl FnOnce(&mut Vec<u8>) -> Result<Option<HeldWords>>, waiter: Option<Waiter>) -> Result<u64> {
    let m = inner.master();
    let dst = header.dst;
    if let Some(Waiter::Slot(slot)) = &waiter {
        slot.comes_from(Arc::downgrade(entry) as Weak<dyn Source>); // its count shares the line the lookup touched
    }
    let req = m.core.lock().expect("core lock").begin_call(dst, waiter)?;
    let sent = call_frame(Header { req, ..header }, hint, encode, m.max_frame).and_then(|frame| entry.out.send(frame, None).map_err(|e| send_error(dst, e)));
    if let Err(e) = sent {
        if m.core.lock().expect("core lock").cancel(dst, req).is_some() {
            return Err(e);
        }
        // it ended already (its worker died meanwhile): the waiter has been told
    }
    Ok(req)
}

/// Runs a call addressed to the master on the pool (the I/O runtime must keep reading);
/// a call the pool cannot take fails now.
fn run_here(inner: &Arc<Inner>, entry: Arc<WorkerEntry>, mut frame: Frame) {
    let cluster = Cluster::handle(inner.clone());
    let h = frame.header;
    let patience = inner.master().liveness.timeout;
    let refused_to = entry.clone();
    inner.master().pool.submit(Job {
        run: Box::new(move || {
            if let Some(reply) = super::with_current(&cluster, || exec::execute(1, &mut frame)) {
                let _ = entry.out.send(reply, Some(patience));
            }
        }),
        refuse: Box::new(move |reason| {
            tracing::warn!("a call from worker {} to the master was refused: {reason}", h.src);
            if h.kind != Kind::Cast {
                if let Ok(bytes) = failure_frame(1, h.src, h.req, &Failure::Busy { pid: 1, reason }) {
                    let _ = refused_to.out.send(bytes.into(), None);
                }
            }
        }),
    });
}

/// Asks workers to stop and waits (up to `grace`) until they are gone; those still there are
/// cut off and, where this master started them, killed.
pub(crate) fn stop_workers(inner: &Arc<Inner>, pids: &[Pid], grace: Duration) {
    {
        let mut core = inner.master().core.lock().expect("core lock");
        pids.iter().for_each(|p| core.stop(*p));
    }
    finish_stopping(inner, pids, grace);
}

/// Shuts every worker down as [`stop_workers`] does; calls still waiting fail with
/// [`Error::ShutDown`].
pub(crate) fn shut_down(inner: &Arc<Inner>, grace: Duration) {
    let pids = {
        let mut core = inner.master().core.lock().expect("core lock");
        core.shutdown();
        core.workers()
    };
    finish_stopping(inner, &pids, grace);
}

/// Sends the stop requests, waits up to `grace`, cuts off what is left; returns once what
/// the workers printed before they left has reached the output sink.
fn finish_stopping(inner: &Arc<Inner>, pids: &[Pid], grace: Duration) {
    let m = inner.master();
    drive(inner, None);
    if !wait_gone(m, pids, Instant::now() + grace) {
        cut_off(inner, pids, grace);
    }
    // a departure is seen on the I/O runtime while the last lines may still wait for the
    // events thread (bounded: the sink is user code; a hook that stops workers is that thread)
    let (done, handled) = crossbeam_channel::bounded(1);
    if std::thread::current().name() != Some(EVENTS_THREAD) && m.events.send(Event::Barrier(done)).is_ok() {
        let _ = handled.recv_timeout(Duration::from_secs(2));
    }
}

/// Cuts off the workers of `pids` still there after `grace`, and kills those we started.
fn cut_off(inner: &Arc<Inner>, pids: &[Pid], grace: Duration) {
    let m = inner.master();
    let stuck: Vec<Arc<WorkerEntry>> = pids.iter().filter_map(|p| m.worker(*p)).collect();
    {
        let mut core = m.core.lock().expect("core lock");
        for entry in &stuck {
            tracing::warn!("worker {} did not stop within {grace:?}; cutting it off", entry.info.pid);
            core.give_up(entry.info.pid, format!("did not stop within {} s of being asked", grace.as_secs()), false);
        }
    }
    drive(inner, None);
    // here, not on the events thread: the launches are still ours to ask
    stuck.iter().for_each(|entry| m.kill(&entry.info));
    wait_gone(m, pids, Instant::now() + Duration::from_secs(2));
}

/// Waits until none of `pids` is a worker any more, or `deadline`; true if none is.
fn wait_gone(m: &Master, pids: &[Pid], deadline: Instant) -> bool {
    crate::transport::io::needed(); // departures are seen on the I/O runtime
    let mut guard = m.departed.0.lock().expect("departed lock");
    loop {
        if pids.iter().all(|p| m.worker(*p).is_none()) {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        guard = m.departed.1.wait_timeout(guard, left).expect("departed lock").0;
    }
}

/// Starts the master's heartbeat on the I/O runtime: the core says when; heartbeats go out
/// and workers silent for the timeout are given up on. Ends with the cluster.
pub(crate) fn watch_workers(inner: Weak<Inner>) {
    crate::transport::io::spawn(async move {
        loop {
            let Some(due) = inner.upgrade().map(|i| i.master().core.lock().expect("core lock").poll_timeout()) else { return };
            tokio::time::sleep_until(due.into()).await;
            let Some(inner) = inner.upgrade() else { return };
            if inner.master().shut.load(Ordering::Relaxed) {
                return;
            }
            inner.master().core.lock().expect("core lock").handle_timeout(Instant::now());
            drive(&inner, None);
        }
    });
}
