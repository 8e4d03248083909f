//! The worker side: started with the master's address and secret in its environment, a
//! process dials in, proves the secret, and serves calls on its main thread until told to
//! stop, until the master's connection is gone, or until the master stops sending
//! heartbeats (a vanished host, a hung master).

use std::cell::{Cell, RefCell};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clusterman_macros::call_path;
use crossbeam_channel::{Receiver, Sender, select};

use crate::ids::Pid;
use crate::error::{Error, Result};
use crate::fingerprint;
use crate::registry;
use crate::protocol::env::{ENV_LAUNCH, ENV_MASTER, ENV_MPI, ENV_SECRET, ENV_SECRET_FILE, ANY_SEAT, Index, parse_launch};
use crate::protocol::worker::{WorkerCore, answer};
use crate::protocol::{Frame, FrameBuf, Health, Hello, Kind, Liveness, Secret, Terms, Welcome, bare};
use crate::sys;
use crate::transport::{self, polled, tcp::{self, FrameStream, TcpOut}};

use super::link::{Link, Received, SharedCore};
use super::{Cluster, Peers, exec, output, slot};

static MY_PID: AtomicU32 = AtomicU32::new(1);
/// Set once `init()` ran: a process started as a worker that builds a cluster without it
/// would run the master's code again (and start workers of its own).
static INIT_RAN: AtomicBool = AtomicBool::new(false);

/// This process's pid in the cluster: 1 on the master, the assigned pid on a worker.
pub fn my_id() -> Pid {
    MY_PID.load(Ordering::Relaxed)
}

/// How long a worker tries to reach its master (it may still be binding on a slow node, or
/// busy with a crowd of other handshakes).
const DIAL_DEADLINE: Duration = Duration::from_secs(60);

/// What a worker needs to dial in.
pub(crate) struct WorkerConfig {
    pub master: String,
    pub secret: Secret,
    pub launch: Option<(u64, u32)>,
    pub mpi: Option<(i32, i32)>,
}

/// The worker variables as read, before MPI is initialised.
struct WorkerEnv {
    master: String,
    secret: Secret,
    launch: Option<String>,
    mpi: Option<String>,
}

impl WorkerEnv {
    fn into_config(self, mpi: Option<MpiInit>) -> Result<WorkerConfig> {
        WorkerConfig::parse(self.master, self.secret, self.launch, self.mpi, mpi)
    }
}

impl WorkerConfig {
    /// Reads the worker variables (and removes them, where that is sound); `None` in a
    /// process that is not a worker. MPI, if asked for, is initialised by the caller of
    /// [`WorkerEnv::into_config`].
    fn from_env() -> Option<Result<WorkerEnv>> {
        let master = std::env::var(ENV_MASTER).ok()?;
        if let Err(e) = sys::ChildSettings::from_env().apply() {
            return Some(Err(Error::io("setting up a local worker", e)));
        }
        let secret = read_secret();
        let launch = std::env::var(ENV_LAUNCH).ok();
        let mpi = std::env::var(ENV_MPI).ok();
        // The variables must not reach processes this worker starts, and the secret must not
        // stay in /proc/<pid>/environ. Changing the environment is only sound on the only
        // thread (init() at the top of main, or init_in_constructor!); elsewhere they stay.
        for var in [ENV_SECRET, ENV_MASTER, ENV_SECRET_FILE, ENV_LAUNCH, ENV_MPI, sys::ENV_PARENT, sys::ENV_CPU, sys::ENV_SCHED] {
            if std::env::var_os(var).is_some() && !sys::scrub_env(var) {
                tracing::debug!("{var} stays in the environment: other threads already run");
            }
        }
        Some(secret.map(|secret| WorkerEnv { master, secret, launch, mpi }))
    }

    pub(crate) fn parse(master: String, secret: Secret, launch: Option<String>, mpi_level: Option<String>, mpi_init: Option<MpiInit>) -> Result<WorkerConfig> {
        let mpi = match (mpi_level, mpi_init) {
            (Some(level), Some(init)) => Some(init(&level)?),
            (Some(_), None) => {
                return Err(Error::Unsupported("started by an MpiManager, but this program was built without clusterman's `mpi` feature".into()));
            }
            (None, _) => mpi_identity_from_env(),
        };
        let launch = match launch {
            None => None,
            Some(s) => {
                let (id, index) = parse_launch(&s).map_err(Error::Handshake)?;
                let index = match index {
                    Index::Given(n) => n,
                    Index::Any => ANY_SEAT,
                    Index::Rank => mpi.map(|(rank, _)| rank as u32).ok_or_else(|| Error::Handshake("launched as an MPI rank, but no MPI rank is set in the environment (OMPI_COMM_WORLD_RANK, PMI_RANK, PMIX_RANK or SLURM_PROCID); is the launcher an MPI launcher?".into()))?,
                    Index::Task => array_task_index().ok_or_else(|| Error::Handshake("launched as a job array task, but no task id is set (SLURM_ARRAY_TASK_ID, SGE_TASK_ID, PBS_ARRAYID, PBS_ARRAY_INDEX or LSB_JOBINDEX)".into()))?,
                };
                Some((id, index))
            }
        };
        Ok(WorkerConfig { master, secret, launch, mpi })
    }
}

/// The secret, from [`ENV_SECRET`] or the file [`ENV_SECRET_FILE`] names: its hex form or
/// the cluster's cookie.
fn read_secret() -> Result<Secret> {
    let missing = || {
        Error::Handshake(format!(
            "neither {ENV_SECRET} nor {ENV_SECRET_FILE} holds a secret (32 hex digits, or the cluster's cookie); start workers through a ClusterManager or with the command an ElasticManager prints"
        ))
    };
    if let Ok(hex) = std::env::var(ENV_SECRET) {
        return Secret::parse(&hex).ok_or_else(missing);
    }
    let path = std::env::var(ENV_SECRET_FILE).map_err(|_| missing())?;
    let file = std::fs::File::open(&path).map_err(|e| Error::io(format!("cannot read the secret file {path} ({ENV_SECRET_FILE}); is it on a filesystem this node sees?"), e))?;
    let meta = file.metadata().map_err(|e| Error::io(format!("reading {path}"), e))?;
    if meta.is_file() {
        use std::os::unix::fs::MetadataExt;
        // a file others may read is still private inside a directory only we can enter (a
        // batch job's scratch directory, where file transfer may not keep the mode)
        let private_dir = || {
            let dir = std::path::Path::new(&path).parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            std::fs::metadata(dir).is_ok_and(|d| d.uid() == sys::uid() && d.mode() & 0o077 == 0)
        };
        if meta.uid() != sys::uid() || (meta.mode() & 0o077 != 0 && !private_dir()) {
            return Err(Error::Handshake(format!("the secret file {path} can be read by other users (mode {:o}, owner {}): refusing to use it", meta.mode() & 0o777, meta.uid())));
        }
    }
    let mut line = String::new();
    BufReader::new(file.take(256)).read_line(&mut line).map_err(|e| Error::io(format!("reading {path}"), e))?;
    Secret::parse(&line).ok_or_else(missing)
}

/// Initialises MPI at a threading level (`serialized`, ...) and returns this process's
/// rank and world size. Given by the crate root, which knows whether MPI is built in.
pub(crate) type MpiInit = fn(&str) -> Result<(i32, i32)>;

/// This job-array task's index, from 0 (schedulers count tasks from 1).
fn array_task_index() -> Option<u32> {
    ["SLURM_ARRAY_TASK_ID", "SGE_TASK_ID", "PBS_ARRAYID", "PBS_ARRAY_INDEX", "LSB_JOBINDEX"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse::<u32>().ok())
        .and_then(|task| task.checked_sub(1))
}

/// Rank and size as MPI launchers publish them, read without initialising MPI.
fn mpi_identity_from_env() -> Option<(i32, i32)> {
    let pairs = [("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"), ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")];
    pairs.iter().find_map(|(r, s)| {
        let rank = std::env::var(r).ok()?.parse().ok()?;
        let size = std::env::var(s).ok()?.parse().ok()?;
        Some((rank, size))
    })
}

/// [`init`](crate::init): in a process started as a worker, serves until shut down and exits;
/// elsewhere returns at once. `mpi` initialises MPI when the launch asks for it.
pub(crate) fn init_with(mpi: Option<MpiInit>) {
    INIT_RAN.store(true, Ordering::SeqCst);
    let Some(env) = WorkerConfig::from_env() else { return };
    // A call that waits for a reply serves other calls meanwhile, so calls nest on the
    // serving thread's stack: give it room (address space only; pages are used as touched).
    // MPI is initialised there too, so that thread is MPI's main thread.
    let env = std::sync::Mutex::new(Some(env));
    let serve = || exit_worker(env.lock().expect("env lock").take().expect("served once").and_then(|e| e.into_config(mpi)).and_then(run));
    let spawned = std::thread::scope(|scope| {
        std::thread::Builder::new().name("cman-serve".into()).stack_size(SERVING_STACK).spawn_scoped(scope, serve).map(|serving| serving.join())
    });
    match spawned {
        Ok(_) => exit_worker(Err(Error::Unsupported("the worker's serving thread panicked (its message is above)".into()))),
        Err(e) => {
            // a system that accounts for every stack byte up front: serve on this thread
            tracing::warn!("cannot start a serving thread with a {} MiB stack ({e}); serving on the main thread", SERVING_STACK >> 20);
            serve()
        }
    }
}

/// A pmap batch that ran for less than this may have its reply coalesced with the next ones.
const COALESCE_BELOW: Duration = Duration::from_micros(20);
/// Replies coalesced into one write at most: the master refills as they come, so holding
/// them until the worker runs dry would leave it waiting a round trip for work.
const COALESCE_AT_MOST: u32 = 8;

/// Stack of a worker's serving thread.
const SERVING_STACK: usize = 256 << 20;

/// In a process started as a worker whose program never called [`init`] (it is running the
/// master's code again): tells the master why, then exits. Never returns in that case.
pub(crate) fn refuse_to_run_without_init() {
    if INIT_RAN.load(Ordering::SeqCst) || std::env::var_os(ENV_MASTER).is_none() {
        return;
    }
    let problem = format!(
        "{} was started as a worker, but it does not call clusterman::init() at the start of main, so it ran the master's code instead of serving; add `clusterman::init();` as the first line of main (or `clusterman::init_in_constructor!();` in a test binary)",
        std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "this program".into())
    );
    sys::write_original_stderr(&format!("clusterman: {problem}"));
    // tell the master, so the launch fails at once with this text instead of a timeout
    if let (Ok(master), Ok(secret)) = (std::env::var(ENV_MASTER), read_secret()) {
        let launch = std::env::var(ENV_LAUNCH).ok().and_then(|s| parse_launch(&s).ok()).map(|(id, index)| (id, if let Index::Given(i) = index { i } else { 0 }));
        let mut hello = hello(secret, launch, None, None);
        hello.problem = Some(problem);
        let _ = transport::tcp::dial(&master, &hello, Instant::now() + Duration::from_secs(10));
    }
    std::process::exit(1);
}

/// This process's hello.
fn hello(secret: Secret, launch: Option<(u64, u32)>, mpi: Option<(i32, i32)>, peer: Option<Pid>) -> Hello {
    let (fp, exe) = fingerprint::this_process();
    Hello { secret, fingerprint: fp.clone(), exe: exe.clone(), launch, host: sys::hostname(), os_pid: std::process::id(), mpi, peer, problem: None }
}

/// Ends a worker process: status 0 after a requested stop, else 1 with the reason on the
/// original stderr. Runs the exit hooks first (finalising MPI).
pub(crate) fn exit_worker(outcome: Result<()>) -> ! {
    let code = match outcome {
        Ok(()) => 0,
        Err(e) => {
            output::finish_forwarding();
            sys::write_original_stderr(&format!("{} (os pid {}): {e}", who_am_i(), std::process::id()));
            1
        }
    };
    for hook in std::mem::take(&mut *EXIT_HOOKS.lock().expect("exit hooks lock")) {
        hook();
    }
    std::process::exit(code);
}

fn who_am_i() -> String {
    match my_id() {
        1 => String::from("clusterman worker"),
        pid => format!("clusterman worker {pid}"),
    }
}

/// Work to do on the serving thread (MPI's main thread) just before a worker exits, newest first.
static EXIT_HOOKS: std::sync::Mutex<Vec<Box<dyn FnOnce() + Send>>> = std::sync::Mutex::new(Vec::new());

/// Registers `hook` to run when this worker exits (e.g. `MPI_Finalize`).
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn at_worker_exit(hook: impl FnOnce() + Send + 'static) {
    EXIT_HOOKS.lock().expect("exit hooks lock").insert(0, Box::new(hook));
}

pub(crate) fn run(config: WorkerConfig) -> Result<()> {
    sys::raise_open_files_limit();
    let (stream, terms) = dial(&config)?;
    let out = TcpOut::over(stream.try_clone().map_err(|e| Error::io("cloning the master connection", e))?);
    let core: SharedCore = Arc::new(Mutex::new(WorkerCore::new(terms)));
    let link = Link::new(&core, 1, out);
    if !terms.direct_links {
        return serve(link, Inbox::Tcp(FrameStream::new(stream, terms.max_frame)), None);
    }
    // Direct links: calls and replies may come on any connection, so every link gets a
    // reader thread that resolves replies and hands the serving thread its calls.
    let (to_serving, inbox) = crossbeam_channel::unbounded();
    // listen where this worker reaches the master from: its peers are on that network
    let ip = stream.local_addr().map_err(|e| Error::io("reading the local address", e))?.ip();
    read_uplink(stream, link.clone(), to_serving.clone(), terms.max_frame)?;
    let (peers, address) = Peers::start(&core, config.secret, ip, to_serving)?;
    // registered before serving, so no peer can ask for this address too early
    Cluster::worker_handle(terms.pid, link.clone(), None).remote_call_fetch(1, super::builtin_register_peer, (terms.pid, address.to_string()))?;
    serve(link, Inbox::Channel(inbox), Some(peers))
}

/// Serves calls on this thread until the master at the other end of `link` says stop (`Ok`)
/// or is gone (`Err`). On a stop, the worker's output is flushed and a goodbye frame ends the
/// conversation, so the master knows nothing more is coming (MPI links have no EOF).
pub(crate) fn serve(link: Arc<Link>, inbox: Inbox, peers: Option<Arc<Peers>>) -> Result<()> {
    let terms = link.terms();
    let pid = terms.pid;
    MY_PID.store(pid, Ordering::Relaxed);
    if let Err(e) = output::start_forwarding(link.clone(), pid, terms.liveness.timeout) {
        tracing::warn!("worker {pid}: output stays local, forwarding failed: {e}");
    }
    watch_master(link.clone(), peers.clone(), terms.liveness);
    let _ = WORKER_CLUSTER.set(Cluster::worker_handle(pid, link.clone(), peers));
    let serving = Rc::new(Serving { inbox: RefCell::new(inbox), uplink: link.clone(), holding: Cell::new((0, false)) });
    FrameBuf::spare_call_buffers();
    SERVING.with(|s| *s.borrow_mut() = Some(serving.clone()));
    slot::serve_while_waiting(Some(pump_once));
    let outcome = serving.serve_until_stopped();
    serving.release_replies(); // replies still held go before anything else
    slot::serve_while_waiting(None);
    SERVING.with(|s| *s.borrow_mut() = None);
    output::finish_forwarding();
    if outcome.is_ok() {
        let _ = link.send_patiently(bare(Kind::Shutdown, pid, 1), terms.liveness.timeout);
    }
    outcome
}

/// How a worker that cannot dial its master starts its message (launchers look for it in
/// job logs).
pub(crate) const UNREACHABLE_MASTER: &str = "cannot reach the master at";

/// Dials the master and shakes hands. Returns the connection and the terms of admission.
fn dial(config: &WorkerConfig) -> Result<(TcpStream, Terms)> {
    let hello = hello(config.secret, config.launch, config.mpi, None);
    let (stream, welcome) = transport::tcp::dial(&config.master, &hello, Instant::now() + DIAL_DEADLINE).map_err(|e| {
        let hint = if sys::out_of_descriptors(&e) { "; this process is out of file descriptors: raise `ulimit -n`" } else { "" };
        Error::io(format!("{UNREACHABLE_MASTER} {} ({ENV_MASTER}) from {}{hint}; is it running, and reachable from here?", config.master, sys::hostname()), e)
    })?;
    match welcome {
        Welcome::Accepted(terms) => Ok((stream, terms)),
        Welcome::Refused(reason) => Err(Error::Handshake(format!("the master refused this worker: {reason}"))),
    }
}

/// Watches the master from a thread of its own: sends this worker's heartbeats (also while
/// a long call runs on the serving thread) and ends the process when the master is gone —
/// its connection closed, or no heartbeat from it for the timeout (a vanished host, a
/// partition, a hung master). Direct links to peers are watched the same way. A plain
/// thread wakes once a beat; a timer of the I/O runtime that far out wakes its thread two or
/// three times on the way, and a thousand idle workers on a few cores feel each wake-up.
fn watch_master(uplink: Arc<Link>, peers: Option<Arc<Peers>>, liveness: Liveness) {
    let me = my_id();
    let watch = move || loop {
        std::thread::sleep(liveness.interval);
        if uplink.is_stopping() {
            return;
        }
        let _ = uplink.send(bare(Kind::Heartbeat, me, 1));
        let why = match uplink.health() {
            Health::Alive => None,
            Health::Closed => Some("the master closed the connection".to_string()),
            Health::Silent(silence) => Some(format!("no heartbeat from the master for {} s (its host vanished, the network is cut, or it hangs)", silence.as_secs())),
        };
        if let Some(why) = why {
            if uplink.is_stopping() {
                return;
            }
            sys::write_original_stderr(&format!("{} (os pid {}): lost the master: {why}; exiting", who_am_i(), std::process::id()));
            // Closing the connection wakes a serving thread that waits for frames: it exits
            // the normal way (finalising MPI, so mpirun ends cleanly). One deep in user
            // code cannot: then the process ends from here.
            uplink.close();
            std::thread::sleep(Duration::from_secs(2));
            sys::exit_now(1);
        }
        if let Some(peers) = &peers {
            peers.heartbeat(me);
        }
    };
    if let Err(e) = std::thread::Builder::new().name("cman-watch".into()).stack_size(WATCH_STACK).spawn(watch) {
        tracing::warn!("worker {me}: cannot start the thread that watches the master ({e}); a lost master goes unnoticed");
    }
}

/// Stack of the thread that watches the master: it runs no user code.
const WATCH_STACK: usize = 256 << 10;

static WORKER_CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// Writes raw bytes to the master (tests of the master's protocol checks).
pub(crate) fn send_raw(bytes: &[u8]) -> bool {
    worker_cluster().and_then(|c| c.uplink()).is_some_and(|link| link.send(bytes.to_vec()).is_ok())
}

/// The cluster handle of a worker process (used by `Cluster::current`).
pub(crate) fn worker_cluster() -> Option<&'static Cluster> {
    WORKER_CLUSTER.get()
}

/// What other threads hand the serving thread.
pub(crate) enum Delivery {
    /// A frame from the master that nobody looked at yet (MPI, before its link is up).
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    Frame(Frame),
    /// What a link's reader received for the serving thread (a call, the master's stop),
    /// and the link it came on.
    Received(Received, Arc<Link>),
    /// The transport failed.
    Failed(Error),
}

/// Where a serving worker's incoming frames come from.
pub(crate) enum Inbox {
    /// Read straight from the master's socket (one connection: no thread switch).
    Tcp(FrameStream),
    /// Handed over by other threads: the MPI progress thread, or the readers of the master
    /// link and the direct links when the worker has those.
    Channel(Receiver<Delivery>),
}

impl Inbox {
    /// True when the next frame is already here (read, not yet handled).
    fn has_frame(&self) -> bool {
        match self {
            Inbox::Tcp(reader) => reader.has_frame(),
            Inbox::Channel(_) => false,
        }
    }

    /// What the next frame leaves for the serving thread, and the link it came on; `None`
    /// when `woken` receives (a reply the thread waits for was delivered by another thread)
    /// or at `deadline`.
    #[call_path]
    fn next(&mut self, uplink: &Arc<Link>, deadline: Option<Instant>, woken: &Receiver<()>) -> Result<Option<(Received, Arc<Link>)>> {
        match self {
            // the only connection, read by this thread: its replies are resolved right here
            Inbox::Tcp(reader) => {
                if let Some(d) = deadline {
                    let left = d.saturating_duration_since(Instant::now());
                    if !reader.wait_readable_for(left) {
                        return Ok(None);
                    }
                }
                match reader.next() {
                    Ok(Some(frame)) => from_master(uplink, frame),
                    Ok(None) => Err(Error::MasterGone("it closed the connection; exiting".into())),
                    Err(e) => Err(Error::MasterGone(format!("{e}; exiting"))),
                }
            }
            Inbox::Channel(rx) => next_handed_over(rx, uplink, deadline, woken),
        }
    }
}

/// [`Inbox::next`] from a channel: what the MPI progress thread, or the readers of the
/// master link and the direct links, handed over.
#[inline(never)]
fn next_handed_over(rx: &Receiver<Delivery>, uplink: &Arc<Link>, deadline: Option<Instant>, woken: &Receiver<()>) -> Result<Option<(Received, Arc<Link>)>> {
    // over a polled transport (MPI) this thread reads what comes soon itself
    polled::spin_until(|| !rx.is_empty() || !woken.is_empty() || deadline.is_some_and(|d| Instant::now() >= d));
    let got = match rx.try_recv() {
        Ok(got) => got, // it came while this thread polled: no select
        Err(_) => {
            let timeout = deadline.map_or(crossbeam_channel::never(), crossbeam_channel::at);
            select! {
                recv(rx) -> got => got.map_err(|_| Error::MasterGone("the transport stopped; exiting".into()))?,
                recv(woken) -> _ => return Ok(None),
                recv(timeout) -> _ => return Ok(None),
            }
        }
    };
    match got {
        Delivery::Frame(frame) => from_master(uplink, frame),
        Delivery::Received(received, link) => Ok(Some((received, link))),
        Delivery::Failed(e) => Err(e),
    }
}

/// What a frame from the master leaves for the serving thread.
#[call_path]
fn from_master(uplink: &Arc<Link>, frame: Frame) -> Result<Option<(Received, Arc<Link>)>> {
    uplink.receive(frame).map(|r| Some((r, uplink.clone()))).map_err(|e| Error::MasterGone(format!("{e}; exiting")))
}

/// Reads the master link on its own thread (all-to-all topology): replies are resolved here,
/// everything else goes to the serving thread through `to_serving`.
fn read_uplink(stream: TcpStream, link: Arc<Link>, to_serving: Sender<Delivery>, max_frame: usize) -> Result<()> {
    let spawned = std::thread::Builder::new().name("cman-uplink".into()).spawn(move || {
        let mut reader = FrameStream::new(stream, max_frame);
        let failure = loop {
            let received = match reader.next() {
                Ok(Some(frame)) => link.receive(frame),
                Ok(None) => break "it closed the connection; exiting".to_string(),
                Err(e) => break format!("{e}; exiting"),
            };
            match received {
                Ok(Received::Nothing) => {}
                Ok(received) => {
                    let _ = to_serving.send(Delivery::Received(received, link.clone()));
                }
                Err(e) => break format!("{e}; exiting"),
            }
        };
        link.closed(&failure);
        let _ = to_serving.send(Delivery::Failed(Error::MasterGone(failure)));
    });
    spawned.map(|_| ()).map_err(|e| Error::io("starting the master link's reader", e))
}

/// What the serving thread serves from. The thread's own loop holds it; a call that waits
/// for a reply (and serves meanwhile, see `pump_once`) finds it in `SERVING`. A call passes
/// no thread-local on its way: each costs a lookup through pages of its own.
struct Serving {
    inbox: RefCell<Inbox>,
    uplink: Arc<Link>,
    /// Replies held corked (see `pump`), and whether this thread corked itself for them
    /// (rather than finding itself corked by a `pmap` further up its stack).
    holding: Cell<(u32, bool)>,
}

thread_local! {
    static SERVING: RefCell<Option<Rc<Serving>>> = const { RefCell::new(None) };
}

/// Serves while a call on the serving thread waits for a reply (see [`slot::Pump`]).
fn pump_once(deadline: Option<Instant>, woken: &Receiver<()>) -> Result<()> {
    let serving = SERVING.with(|s| s.borrow().clone()).expect("pump_once on a thread that does not serve");
    serving.pump(deadline, woken)
}

impl Serving {
    #[call_path]
    #[inline(never)] // in the section, not inlined into `serve`
    fn serve_until_stopped(&self) -> Result<()> {
        let never = crossbeam_channel::never();
        loop {
            match self.pump(None, &never) {
                Ok(()) if !self.uplink.is_stopping() => {}
                Ok(()) | Err(Error::ShutDown) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends the replies this thread holds, and ends the cork it started for them (a cork
    /// it found stays, flushed: a thread about to wait must have sent what it has).
    #[inline(always)]
    fn release_replies(&self) {
        let (_, corked_here) = self.holding.replace((0, false));
        if corked_here {
            tcp::uncork();
        } else {
            tcp::flush_corked();
        }
    }

    /// What the next frame leaves for this thread, and the link it came on (see
    /// [`Inbox::next`]); before this thread waits, it sends the replies it holds.
    #[inline(always)]
    fn next(&self, deadline: Option<Instant>, woken: &Receiver<()>) -> Result<Option<(Received, Arc<Link>)>> {
        let mut inbox = self.inbox.borrow_mut();
        if matches!(&*inbox, Inbox::Tcp(reader) if !reader.has_frame()) {
            self.release_replies(); // held for the frames that were here: they go before we wait
        }
        inbox.next(&self.uplink, deadline, woken)
    }

    /// Reads and handles one frame (or returns when `woken` receives, or at `deadline`).
    /// Calls run right here, so a no-op call costs no thread switch; a call that itself
    /// waits for a reply pumps recursively, so nested calls at any depth cannot deadlock.
    ///
    /// What a call passes through reads no clock and is in [`call_path`]'s section: among
    /// a thousand workers on two cores each call finds its caches and TLB cold, and pays per
    /// page and per line it touches far more than per instruction.
    #[call_path]
    fn pump(&self, deadline: Option<Instant>, woken: &Receiver<()>) -> Result<()> {
        let Some((received, from)) = self.next(deadline, woken)? else { return Ok(()) }; // a wake-up: the caller looks again
        // a worker among a thousand finds what a call touches cold: what the call and its
        // reply will read is asked for at once, so that its misses overlap
        registry::prefetch();
        output::prefetch();
        from.prefetch();
        match received {
            Received::Run(mut frame) => {
                let me = my_id();
                let batch_started = (frame.header.kind == Kind::Batch).then(Instant::now);
                if let Some(reply) = exec::execute(me, &mut frame) {
                    let terms = from.terms();
                    let reply = answer(&terms, frame.header, reply, || exec::function_name(frame.header.func))?;
                    output::flush();
                    // The reply to a quick pmap batch is held (corked) while the next frame is
                    // already here, and goes with up to 7 replies after it in one write (a
                    // system call per item would cost more than the item). It waits for frames
                    // that were already sent: the master queues about a millisecond of work per
                    // worker. Replies to calls, and to batches that took longer, go at once.
                    let (held, corked_here) = self.holding.get();
                    let coalesce = held + 1 < COALESCE_AT_MOST && batch_started.is_some_and(|t| t.elapsed() < COALESCE_BELOW) && self.inbox.borrow().has_frame();
                    if coalesce {
                        self.holding.set((held + 1, corked_here || tcp::cork()));
                    }
                    from.send_patiently(reply, terms.liveness.timeout)?;
                    if !coalesce {
                        self.release_replies();
                    }
                }
                Ok(())
            }
            Received::Stop => Err(Error::ShutDown),
            Received::Nothing => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parsing_reports_what_is_wrong() {
        let secret = Secret::random();
        let ok = WorkerConfig::parse("h:1".into(), secret, Some("5:3".into()), None, None).unwrap();
        assert_eq!(ok.launch, Some((5, 3)));
        let err = WorkerConfig::parse("h:1".into(), secret, Some("x".into()), None, None).err().unwrap().to_string();
        assert!(err.contains("malformed"), "{err}");
    }
}
