//! The cluster handle: process table, remote calls, futures, `everywhere`, `pmap`, and the
//! worker's serving loop.

pub(crate) mod exec;
pub(crate) mod future;
pub(crate) mod launcher;
pub(crate) mod link;
pub(crate) mod master;
pub(crate) mod output;
mod peers;
mod placed;
pub(crate) mod pmap;
mod pool;
mod refusals;
mod round;
mod slot;
pub(crate) mod worker;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::ids::Pid;
use crate::codec::{self, HeldWords};
use crate::error::{Error, RemoteError, Result};
use launcher::{ClusterManager, Launch, LaunchContext};
use crate::protocol::watch::{LaunchWatch, Verdict};
use crate::protocol::master::MasterCore;
use crate::protocol::{DEFAULT_MAX_FRAME, Header, Kind, Liveness, Secret};
use crate::registry::{self, RemoteFn};
use crate::transport::listener::{HandshakeLimits, Listener};

pub use future::RemoteFuture;
pub(crate) use future::Forget;
pub(crate) use peers::Peers;
pub use master::WorkerInfo;
pub use output::{OutputSink, print_sink};
pub use pmap::PmapOptions;

use link::Link;
use slot::Waiter;
use master::{Door, Master};

pub(crate) struct Inner {
    me: Pid,
    /// A worker's connection to the master (its calls go there, also those for other
    /// workers unless it has a direct link to them).
    uplink: Option<Arc<Link>>,
    /// A worker's direct links to other workers (all-to-all topology).
    peers: Option<Arc<peers::Peers>>,
    pub(crate) master: Option<Master>,
}

/// How workers reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Topology {
    /// Every worker has one connection, to the master, which routes worker-to-worker calls
    /// (works wherever workers cannot reach each other).
    #[default]
    MasterWorker,
    /// Workers also connect to each other directly, on their first call (lazy); where a
    /// peer cannot be dialled, its calls still go through the master.
    AllToAll,
}

impl Inner {
    pub(crate) fn master(&self) -> &Master {
        self.master.as_ref().expect("master-only operation on a worker handle")
    }
}

/// A cluster of processes: this one (pid 1, the master) and the workers it added.
///
/// Created with [`Cluster::new`] or [`Cluster::builder`]. Workers are added with
/// [`add_procs`](Cluster::add_procs) and stopped with [`shutdown`](Cluster::shutdown), which
/// also runs when the `Cluster` is dropped. Inside a remote function,
/// [`Cluster::current`] gives a handle for calling other processes.
pub struct Cluster {
    inner: Arc<Inner>,
    /// The handle returned by `new` owns the workers; handles from `current` do not.
    owner: bool,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Cluster");
        d.field("my_id", &self.inner.me);
        if let Some(m) = &self.inner.master {
            d.field("listen", &m.addr).field("workers", &self.workers());
        }
        d.finish()
    }
}

/// Options for a new [`Cluster`].
#[derive(Clone)]
pub struct ClusterBuilder {
    bind: SocketAddr,
    advertise: Option<IpAddr>,
    output: Option<OutputSink>,
    max_frame: usize,
    topology: Topology,
    liveness: Liveness,
    handshakes: HandshakeLimits,
    /// A secret of the user's choosing, checked at `build`.
    cookie: Option<String>,
}

impl std::fmt::Debug for ClusterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBuilder")
            .field("bind", &self.bind)
            .field("advertise", &self.advertise)
            .field("max_frame", &self.max_frame)
            .field("topology", &self.topology)
            .field("liveness", &self.liveness)
            .field("handshakes", &self.handshakes)
            .finish()
    }
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        ClusterBuilder {
            bind: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            advertise: None,
            output: None,
            max_frame: DEFAULT_MAX_FRAME,
            topology: Topology::MasterWorker,
            liveness: Liveness::default(),
            handshakes: HandshakeLimits::default(),
            cookie: None,
        }
    }
}

impl ClusterBuilder {
    /// Address the master listens on for workers (default `0.0.0.0:0`: every interface, a
    /// port the OS picks). Workers on other nodes must be able to reach it.
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    /// Address remote workers are told to dial (default: the bind address, or this host's
    /// first non-loopback IPv4 address when bound to all interfaces). Local workers always
    /// dial the loopback address.
    pub fn advertise(mut self, ip: IpAddr) -> Self {
        self.advertise = Some(ip);
        self
    }

    /// Where worker output goes: called with `(pid, line)` for every line (default: printed
    /// as `From worker 3: ...` on stdout).
    pub fn output(mut self, sink: impl Fn(Pid, &str) + Send + Sync + 'static) -> Self {
        self.output = Some(Arc::new(sink));
        self
    }

    /// Largest frame (one call's arguments or one result) accepted in either direction
    /// (default 1 GiB). Workers are told this limit: a larger result fails its call with an
    /// error that says so, and a peer that sends a larger frame is cut off.
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }

    /// Heartbeats (default: every 5 s, a peer silent for 60 s is dead). Master and workers
    /// both send them; a worker silent for `timeout` (stopped, hung, its node or network
    /// gone) is declared dead, its calls fail and `pmap` moves its work; a worker that hears
    /// nothing from the master for `timeout` exits, and its job with it.
    pub fn heartbeat(mut self, interval: Duration, timeout: Duration) -> Self {
        self.liveness = Liveness { interval: interval.max(Duration::from_millis(10)), timeout: timeout.max(interval) };
        self
    }

    /// Connections that may be in their handshake at once (default 256; past it the oldest
    /// is dropped), and the time each has for its whole hello (default 10 s). Only
    /// connections that have not proved the secret count.
    pub fn handshakes(mut self, max_pending: usize, deadline: Duration) -> Self {
        self.handshakes = HandshakeLimits { max_pending: max_pending.max(1), deadline };
        self
    }

    /// The cluster's secret, of your choosing (Julia's cluster cookie; default: 16 random
    /// bytes): 8 to 16 printable ASCII characters without spaces. Workers you start yourself
    /// then need only the master's address and the cookie (in `CLUSTERMAN_SECRET`, or in a
    /// file of mode 0600 named by `CLUSTERMAN_SECRET_FILE`), not a copy of a secret file.
    /// It is never printed; `build` refuses a cookie of the wrong length.
    pub fn cookie(mut self, cookie: impl Into<String>) -> Self {
        self.cookie = Some(cookie.into());
        self
    }

    /// How workers reach each other (default [`Topology::MasterWorker`]).
    pub fn topology(mut self, topology: Topology) -> Self {
        self.topology = topology;
        self
    }

    /// Starts listening and returns the cluster (with no workers yet).
    ///
    /// In a process that was started as a worker but whose program never called
    /// [`init`](crate::init), this reports the mistake to the master and exits: such a
    /// process would otherwise run the master's code again and start workers of its own.
    pub fn build(self) -> Result<Cluster> {
        worker::refuse_to_run_without_init();
        crate::sys::raise_open_files_limit();
        let secret = match &self.cookie {
            Some(cookie) => Secret::from_cookie(cookie).map_err(|e| Error::Launch(format!("ClusterBuilder::cookie: {e}")))?,
            None => Secret::random(),
        };
        let (events, to_events) = crossbeam_channel::unbounded();
        let inner = Arc::new_cyclic(|weak| {
            let listener = Listener::start(self.bind, secret, Arc::new(Door(weak.clone())), self.handshakes);
            let (listener, addr, error) = match listener {
                Ok(l) => {
                    let a = l.addr();
                    (Some(l), a, None)
                }
                Err(e) => (None, self.bind, Some(e)),
            };
            let master = Master {
                secret,
                listener: Mutex::new(listener),
                addr,
                advertise: self.advertise.unwrap_or_else(|| advertised_ip(self.bind.ip())),
                core: Mutex::new(MasterCore::new(self.liveness, Instant::now())),
                workers: RwLock::new(Default::default()),
                departed: Default::default(),
                admission: Mutex::default(),
                waiting: Mutex::new(HashMap::new()),
                launches: Mutex::new(Vec::new()),
                output: self.output.unwrap_or_else(print_sink),
                refusals: Mutex::default(),
                terminated: Mutex::new(Vec::new()),
                membership: Mutex::new(Vec::new()),
                shut: AtomicBool::new(error.is_some()),
                max_frame: self.max_frame,
                liveness: self.liveness,
                start_error: Mutex::new(error),
                direct_links: self.topology == Topology::AllToAll,
                peer_addresses: Mutex::new(HashMap::new()),
                not_listening: Mutex::new(HashMap::new()),
                pool: pool::Pool::new(),
                events,
                output_queued: AtomicUsize::new(0),
                output_dropped: std::sync::atomic::AtomicU64::new(0),
            };
            Inner { me: 1, uplink: None, peers: None, master: Some(master) }
        });
        if let Some(e) = inner.master().start_error.lock().expect("start lock").take() {
            return Err(e);
        }
        master::start_events(Arc::downgrade(&inner), to_events).map_err(|e| Error::io("starting the events thread", e))?;
        master::watch_workers(Arc::downgrade(&inner));
        Ok(Cluster { inner, owner: true })
    }
}

fn advertised_ip(bind: IpAddr) -> IpAddr {
    if bind.is_unspecified() {
        crate::sys::first_non_loopback_ipv4().map(IpAddr::V4).unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
    } else {
        bind
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Cluster>> = const { RefCell::new(None) };
}

/// Runs `f` with `cluster` as [`Cluster::current`] on this thread.
pub(crate) fn with_current<T>(cluster: &Cluster, f: impl FnOnce() -> T) -> T {
    let previous = CURRENT.with(|c| c.replace(Some(cluster.clone_handle())));
    let out = f();
    CURRENT.with(|c| *c.borrow_mut() = previous);
    out
}

impl Cluster {
    /// A cluster with default options (see [`ClusterBuilder`]).
    pub fn new() -> Result<Cluster> {
        ClusterBuilder::default().build()
    }

    /// Options for a new cluster.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// The cluster this code runs in, for remote functions that call other processes:
    /// on a worker, a handle that reaches every pid through the master; on the master, the
    /// cluster that received the call. `None` outside remote functions on the master.
    pub fn current() -> Option<Cluster> {
        CURRENT.with(|c| c.borrow().as_ref().map(Cluster::clone_handle)).or_else(|| worker::worker_cluster().map(Cluster::clone_handle))
    }

    pub(crate) fn handle(inner: Arc<Inner>) -> Cluster {
        Cluster { inner, owner: false }
    }

    pub(crate) fn worker_handle(me: Pid, uplink: Arc<Link>, peers: Option<Arc<peers::Peers>>) -> Cluster {
        Cluster { inner: Arc::new(Inner { me, uplink: Some(uplink), peers, master: None }), owner: false }
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    pub(crate) fn uplink(&self) -> Option<Arc<Link>> {
        self.inner.uplink.clone()
    }

    pub(crate) fn clone_handle(&self) -> Cluster {
        Cluster::handle(self.inner.clone())
    }

    fn master(&self) -> Result<&Master> {
        self.inner.master.as_ref().ok_or_else(|| Error::Unsupported("only the master (pid 1) can add or remove workers".into()))
    }

    /// This process's pid (1 on the master).
    pub fn my_id(&self) -> Pid {
        self.inner.me
    }

    /// The address workers dial (the port the OS picked when binding port 0).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.inner.master.as_ref().map(|m| m.addr)
    }

    /// Pids of the connected workers, ascending. On a worker this asks the master.
    pub fn workers(&self) -> Vec<Pid> {
        match &self.inner.master {
            Some(m) => m.workers.read().expect("workers lock").pids(),
            None => self.remote_call_fetch(1, builtin_workers, ()).unwrap_or_default(),
        }
    }

    /// Number of processes: the workers plus the master.
    pub fn nprocs(&self) -> usize {
        self.workers().len() + 1
    }

    /// What the master knows about worker `pid` (host, OS pid, MPI rank).
    pub fn worker_info(&self, pid: Pid) -> Option<WorkerInfo> {
        self.inner.master.as_ref()?.worker(pid).map(|e| e.info.clone())
    }

    /// The newest refused connection attempts (wrong secret, other binary, garbage, too
    /// slow), newest last: the last 100, each cut to 512 bytes.
    pub fn refusals(&self) -> Vec<String> {
        self.inner.master.as_ref().map(|m| m.refusals.lock().expect("refusals lock").recent()).unwrap_or_default()
    }

    /// How many connection attempts were refused in all.
    pub fn refusal_count(&self) -> u64 {
        self.inner.master.as_ref().map_or(0, |m| m.refusals.lock().expect("refusals lock").total())
    }

    /// Workers that are gone, each with the reason its connection ended (oldest first):
    /// stopped by `rm_procs` or `shutdown`, killed, or cut off for breaking the protocol.
    pub fn terminated_workers(&self) -> Vec<(Pid, String)> {
        self.inner.master.as_ref().map(|m| m.terminated.lock().expect("terminated lock").clone()).unwrap_or_default()
    }

    /// Starts the workers `manager` describes and waits until all have dialled in. Returns
    /// their pids (ascending; in rank order for MPI launches). On failure or timeout, the
    /// workers of this launch that did start are stopped again.
    pub fn add_procs(&self, manager: impl ClusterManager) -> Result<Vec<Pid>> {
        let m = self.master()?;
        if m.shut.load(Ordering::Relaxed) {
            return Err(Error::ShutDown);
        }
        let n = manager.count();
        if n == 0 {
            return Err(Error::Launch(format!("the {} manager was asked for 0 workers; ask for at least one", manager.name())));
        }
        let program = crate::sys::own_program().map_err(Error::Launch)?;
        let id = random_u64();
        let wait = m.register_launch(id, n);
        let ctx = LaunchContext::new(id, n, m.addr, m.advertise, m.secret, program);
        let started = Instant::now();
        let mut launch = match manager.launch(&ctx) {
            Ok(l) => l,
            Err(e) => {
                m.unregister_launch(id);
                return Err(e);
            }
        };
        let outcome = wait_for_workers(&manager, &wait, &mut *launch, started);
        let missing = m.unregister_launch(id);
        let mut pids = wait.connected();
        pids.sort_unstable();
        let outcome = outcome.and_then(|()| {
            let infos: Vec<WorkerInfo> = pids.iter().filter_map(|p| self.worker_info(*p)).collect();
            manager.added(self, &infos)
        });
        match outcome {
            Ok(()) => {
                if pids.len() < n {
                    launch.trim(&missing);
                }
                tracing::info!("{} {} workers ready in {:.1} ms: pids {pids:?}", pids.len(), manager.name(), started.elapsed().as_secs_f64() * 1e3);
                m.launches.lock().expect("launches lock").push((id, launch));
                Ok(pids)
            }
            Err(e) => {
                master::stop_workers(&self.inner, &pids, Duration::from_secs(2));
                launch.stop(Duration::from_secs(2));
                Err(e)
            }
        }
    }

    /// Stops the given workers: they finish the call they are running, then exit. A worker
    /// still busy after 10 s is cut off (its process killed where this master started it;
    /// elsewhere it exits when it sees the connection gone).
    pub fn rm_procs(&self, pids: &[Pid]) -> Result<()> {
        let m = self.master()?;
        if let Some(p) = pids.iter().find(|p| m.worker(**p).is_none()) {
            return Err(Error::NoSuchWorker(*p));
        }
        master::stop_workers(&self.inner, pids, Duration::from_secs(10));
        self.reap_launches();
        Ok(())
    }

    /// Adds a worker that was identified by another transport (MPI) and talks through `out`.
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub(crate) fn attach_worker(&self, info: WorkerInfo, out: crate::transport::Out) {
        let Some(m) = &self.inner.master else { return };
        m.admission.lock().expect("admission lock").taken(info.pid);
        master::add_worker(&self.inner, info, out, false);
    }

    /// Handles a frame from worker `pid` that arrived through another transport (MPI).
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub(crate) fn receive_from(&self, pid: Pid, frame: Result<crate::protocol::Frame>) {
        let Some(entry) = self.inner.master.as_ref().and_then(|m| m.worker(pid)) else { return };
        let outcome = frame.map_err(|e| e.to_string()).and_then(|f| master::handle_frame(&self.inner, &entry, f));
        if let Err(reason) = outcome {
            master::closed(&self.inner, pid, &reason);
        }
    }

    /// Whether a call of this master still waits for its reply.
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub(crate) fn awaits_replies(&self) -> bool {
        self.inner.master.as_ref().is_some_and(|m| m.core.lock().expect("core lock").awaits_replies())
    }

    /// Lets every launch notice processes that have exited (reaps local children).
    pub(crate) fn reap_launches(&self) {
        if let Some(m) = &self.inner.master {
            for (_, launch) in m.launches.lock().expect("launches lock").iter_mut() {
                let _ = launch.status();
            }
        }
    }

    /// The link a worker's frame for `pid` goes on: a direct link if it has one to `pid`,
    /// else its connection to the master.
    fn link_to(&self, pid: Pid) -> Result<Arc<Link>> {
        let up = self.inner.uplink.as_ref().ok_or(Error::ShutDown)?;
        Ok(self.inner.peers.as_ref().filter(|_| pid != 1).and_then(|p| p.link(self, pid)).unwrap_or_else(|| up.clone()))
    }

    /// Sends one call frame to `pid`; the payload is written by `encode`. Returns what to do
    /// if the caller stops waiting (forget the call, so its reply is dropped).
    pub(crate) fn send(&self, kind: Kind, pid: Pid, func: u64, hint: usize, encode: impl FnOnce(&mut Vec<u8>) -> Result<Option<HeldWords>>, waiter: Option<Waiter>) -> Result<Forget> {
        let header = Header { kind, src: self.inner.me, dst: pid, req: 0, func, words: 0 };
        if self.inner.master.is_some() {
            let req = master::call(&self.inner, header, hint, encode, waiter)?;
            return Ok(Forget::new(&self.inner, pid, req));
        }
        let link = self.link_to(pid)?;
        let req = link.call(header, hint, encode, waiter)?;
        Ok(Forget::new(&link, pid, req))
    }

    /// Frames the master forwarded from one worker to another (with
    /// [`Topology::AllToAll`], only calls to workers that could not be dialled directly).
    pub fn routed_frames(&self) -> u64 {
        self.inner.master.as_ref().map_or(0, |m| m.core.lock().expect("core lock").routed_frames())
    }

    /// Runs `f(args)` on process `pid` and returns at once with a future of the result.
    ///
    /// The types are checked at compile time: `args` must be `f`'s argument tuple and the
    /// future yields `f`'s result type. On `pid == my_id()` the call runs here, now.
    pub fn remote_call<F: RemoteFn>(&self, pid: Pid, f: F, args: F::Args) -> Result<RemoteFuture<F::Output>> {
        let _ = f;
        if pid == self.inner.me {
            return Ok(RemoteFuture::ready(pid, run_here::<F>(pid, args)));
        }
        let slot = slot::Slot::fresh();
        let forget = self.send(Kind::Call, pid, F::ID, 64, |buf| codec::encode_held_into(args, buf, codec::BULK_FROM), Some(Waiter::Slot(slot.clone())))?;
        Ok(RemoteFuture::pending(pid, slot, forget))
    }

    /// [`remote_call`](Cluster::remote_call) and wait for the result.
    pub fn remote_call_fetch<F: RemoteFn>(&self, pid: Pid, f: F, args: F::Args) -> Result<F::Output> {
        self.remote_call(pid, f, args)?.fetch()
    }

    /// Runs `f(args)` on `pid` without waiting or a reply; a failure is logged on `pid`.
    pub fn remote_do<F: RemoteFn>(&self, pid: Pid, f: F, args: F::Args) -> Result<()> {
        let _ = f;
        if pid == self.inner.me {
            if let Err(e) = run_here::<F>(pid, args) {
                tracing::warn!("remote_do on pid {pid} failed: {e}");
            }
            return Ok(());
        }
        self.send(Kind::Cast, pid, F::ID, 64, |buf| codec::encode_held_into(args, buf, codec::BULK_FROM), None).map(|_| ())
    }

    /// Calls function `func` on `pid` with an already encoded argument tuple.
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub(crate) fn call_with_payload<R: serde::de::DeserializeOwned + 'static>(&self, pid: Pid, func: u64, payload: &[u8]) -> Result<RemoteFuture<R>> {
        let slot = slot::Slot::fresh();
        let forget = self.call_encoded(pid, func, payload, Waiter::Slot(slot.clone()))?;
        Ok(RemoteFuture::pending(pid, slot, forget))
    }

    /// Sends a call of `func` on `pid` with an already encoded argument tuple; `waiter` is
    /// told its end.
    pub(crate) fn call_encoded(&self, pid: Pid, func: u64, payload: &[u8], waiter: Waiter) -> Result<Forget> {
        self.send(Kind::Call, pid, func, payload.len(), copying(payload), Some(waiter))
    }

    /// [`call_encoded`](Cluster::call_encoded) on the master, to the worker of `entry`.
    pub(crate) fn call_entry_encoded(&self, entry: &Arc<master::WorkerEntry>, pid: Pid, func: u64, payload: &[u8], waiter: Waiter) -> Result<()> {
        let header = Header { kind: Kind::Call, src: self.inner.me, dst: pid, req: 0, func, words: 0 };
        master::call_entry(&self.inner, entry, header, payload.len(), copying(payload), Some(waiter)).map(drop)
    }

    /// Runs `f(args)` on every worker at once; results by pid. The first failure (by pid)
    /// is returned as the error, after every call has finished.
    pub fn everywhere<F: RemoteFn>(&self, f: F, args: F::Args) -> Result<BTreeMap<Pid, F::Output>> {
        let _ = f;
        let mut payload = Vec::new();
        codec::encode_value_into(&args, &mut payload)?;
        round::everywhere(self, F::ID, &payload)
    }

    /// Maps `f` over `items` on all workers, dynamically balanced; results in input order.
    /// Items go out in batches (see [`PmapOptions::batch_size`]); any failure fails the map.
    /// A worker that dies (or goes silent past the heartbeat timeout) is no failure: its
    /// batches go to the others at once, each item still counted once; a batch lost with 3
    /// workers in turn fails like an item (see [`PmapOptions::retry_delays`]).
    pub fn pmap<F: RemoteFn>(&self, f: F, items: impl IntoIterator<Item = F::Args>) -> Result<Vec<F::Output>> {
        self.pmap_with(f, items, PmapOptions::new())
    }

    /// Julia's `@distributed (op) for`: maps `f` over `items` on the workers and folds the
    /// results in input order with `op`, a remote function of two results. Each worker folds
    /// its own share of the items, so only one value per share comes back, and this process
    /// folds those. The shares are balanced and moved off dead workers like `pmap`'s batches.
    /// `None` for no items.
    ///
    /// ```no_run
    /// # use clusterman::prelude::*;
    /// #[remote]
    /// fn square(x: u64) -> u64 { x * x }
    /// #[remote]
    /// fn add(a: u64, b: u64) -> u64 { a + b }
    /// # fn main() -> clusterman::Result<()> {
    /// # let cluster = Cluster::new()?;
    /// let sum = cluster.map_reduce(square, (1..=100u64).map(|x| (x,)), add)?; // Some(338350)
    /// # Ok(()) }
    /// ```
    pub fn map_reduce<F, Op>(&self, f: F, items: impl IntoIterator<Item = F::Args>, op: Op) -> Result<Option<F::Output>>
    where
        F: RemoteFn,
        Op: RemoteFn<Args = (F::Output, F::Output), Output = F::Output>,
    {
        pmap::map_reduce(self, f, items.into_iter().collect(), op)
    }

    /// [`pmap`](Cluster::pmap) with options: batch size, retries with delays, an error
    /// handler that supplies a value for items that failed for good, or a subset of workers.
    pub fn pmap_with<F: RemoteFn>(&self, f: F, items: impl IntoIterator<Item = F::Args>, options: PmapOptions<F::Output>) -> Result<Vec<F::Output>> {
        pmap::run(self, f, items.into_iter().collect(), options)
    }

    /// Stops every worker and everything the launches started (children, jobs). Idempotent;
    /// also runs on drop. Workers finish the call they are running first (up to 5 s); then
    /// those still there are cut off and killed, and jobs are cancelled, so this returns
    /// within seconds whatever the workers do. Calls still waiting fail with
    /// [`Error::ShutDown`].
    pub fn shutdown(&self) -> Result<()> {
        let Some(m) = &self.inner.master else { return Ok(()) };
        if m.shut.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let pids = self.workers();
        drop(m.listener.lock().expect("listener lock").take());
        master::shut_down(&self.inner, Duration::from_secs(5));
        let launches = std::mem::take(&mut *m.launches.lock().expect("launches lock"));
        for (_, mut launch) in launches {
            launch.stop(Duration::from_secs(3));
        }
        tracing::debug!("cluster shut down ({} workers stopped)", pids.len());
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.owner {
            if let Err(e) = self.shutdown() {
                tracing::warn!("shutdown on drop: {e}");
            }
        }
    }
}

impl future::Forgets for Inner {
    fn forget_call(&self, pid: Pid, req: u64) {
        self.master().core.lock().expect("core lock").cancel(pid, req);
    }
}

/// Waits until every worker of a launch has connected, as the [`LaunchWatch`] rules.
fn wait_for_workers(manager: &impl ClusterManager, wait: &master::LaunchWait, launch: &mut dyn Launch, submitted: Instant) -> Result<()> {
    let mut watch = LaunchWatch::new(manager.count(), manager.min_workers(), manager.launch_timeout(), manager.queue_timeout(), submitted);
    loop {
        let connected = wait.wait(Duration::from_millis(100)).map_err(Error::Launch)?;
        match watch.observe(Instant::now(), &launch.status(), connected) {
            Verdict::Wait(None) => {}
            Verdict::Wait(Some(line)) => {
                tracing::info!("{line}");
                eprintln!("clusterman: {line}");
            }
            Verdict::Ready => return Ok(()),
            Verdict::Enough(n) => {
                tracing::warn!("going on with {n} of {} workers after {:?} (min_workers {})", manager.count(), manager.launch_timeout(), manager.min_workers());
                return Ok(());
            }
            Verdict::Failed(why) => return Err(Error::Launch(why)),
            Verdict::TimedOut { ran, connected } => return Err(Error::LaunchTimeout { waited: ran, connected, expected: manager.count(), detail: launch.describe() }),
        }
    }
}

/// Writes an already encoded payload into a frame.
fn copying(payload: &[u8]) -> impl FnOnce(&mut Vec<u8>) -> Result<Option<HeldWords>> + '_ {
    |buf: &mut Vec<u8>| {
        buf.extend_from_slice(payload);
        Ok(None)
    }
}

/// Runs `F` in this process, with a panic or `Err` turned into a [`RemoteError`].
fn run_here<F: RemoteFn>(pid: Pid, args: F::Args) -> Result<F::Output> {
    registry::catch(|| F::invoke(args)).map_err(|e| Error::Remote(RemoteError { pid, function: F::NAME.into(), message: e.message, location: e.location }))
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the operating system has no random source");
    u64::from_le_bytes(b)
}

/// Runs on the master: a worker says where it listens for direct links.
#[clusterman_macros::remote]
fn builtin_register_peer(pid: Pid, address: String) {
    if let Some(c) = Cluster::current() {
        if let Some(m) = &c.inner.master {
            m.listens(pid, address);
        }
    }
}

/// Runs on the master: where worker `pid` listens for direct links — `Ok(None)` while it
/// has connected but not registered its address yet, `Err(())` if there is no such worker.
/// It answers at once: a pool thread must never wait on another worker's start-up.
#[clusterman_macros::remote]
fn builtin_peer_address(pid: Pid) -> std::result::Result<Option<String>, String> {
    let cluster = Cluster::current().ok_or("no cluster")?;
    let m = cluster.inner.master.as_ref().ok_or("not the master")?;
    if let Some(address) = m.peer_addresses.lock().expect("peer addresses lock").get(&pid) {
        return Ok(Some(address.clone()));
    }
    match m.worker(pid) {
        Some(_) => Ok(None),
        None => Err(format!("no worker {pid}")),
    }
}

/// Runs on the master for a worker's `Cluster::workers()`.
#[clusterman_macros::remote]
fn builtin_workers() -> Vec<Pid> {
    Cluster::current().map(|c| c.workers()).unwrap_or_default()
}
