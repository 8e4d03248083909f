//! The worker side: started with the master's address and secret in its environment, a
//! process dials in, proves the secret, and serves calls on its main thread until told to
//! stop or until the master's connection is gone.

use std::cell::RefCell;
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, mpsc};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::Pid;
use crate::error::{Error, Result};
use crate::fingerprint;
use crate::protocol::{self, Frame, FrameBuf, Header, Hello, Kind, MAX_HANDSHAKE, Secret, Welcome};
use crate::sys;

use super::link::{Link, TcpOut};
use super::{Cluster, Peers, exec, output};

/// Environment variable holding the master's `host:port`.
pub const ENV_MASTER: &str = "CLUSTERMAN_MASTER";
/// Environment variable holding the secret (hex); removed as soon as it is read.
pub const ENV_SECRET: &str = "CLUSTERMAN_SECRET";
/// Environment variable naming the launch and this worker's index in it (`<id>:<index>`).
pub const ENV_LAUNCH: &str = "CLUSTERMAN_LAUNCH";
/// Environment variable telling a worker to initialise MPI first, at this threading level.
pub const ENV_MPI: &str = "CLUSTERMAN_MPI";

static MY_PID: AtomicU32 = AtomicU32::new(1);
/// Set when the master asked this worker to stop (possibly while a nested wait was pumping).
static STOPPING: AtomicBool = AtomicBool::new(false);

/// This process's pid in the cluster: 1 on the master, the assigned pid on a worker.
pub fn my_id() -> Pid {
    MY_PID.load(Ordering::Relaxed)
}

/// What a worker needs to dial in.
pub(crate) struct WorkerConfig {
    pub master: String,
    pub secret: Secret,
    pub launch: Option<(u64, u32)>,
    pub mpi: Option<(i32, i32)>,
}

impl WorkerConfig {
    /// Reads (and removes) the worker variables; `None` in a process that is not a worker.
    fn from_env() -> Option<Result<WorkerConfig>> {
        let master = std::env::var(ENV_MASTER).ok()?;
        let parent = std::env::var(sys::ENV_PARENT).ok().and_then(|p| p.parse().ok());
        let cpu = std::env::var(sys::ENV_CPU).ok().and_then(|c| c.parse().ok());
        if let Err(e) = sys::apply_child_settings(parent, cpu) {
            return Some(Err(Error::io("setting up a local worker", e)));
        }
        let secret = std::env::var(ENV_SECRET).ok();
        let launch = std::env::var(ENV_LAUNCH).ok();
        let mpi = std::env::var(ENV_MPI).ok();
        // SAFETY: called at the start of main (see `init`), before the program starts threads;
        // the variables must not reach processes this worker starts.
        unsafe {
            for var in [ENV_MASTER, ENV_SECRET, ENV_LAUNCH, ENV_MPI, sys::ENV_PARENT, sys::ENV_CPU] {
                std::env::remove_var(var);
            }
        }
        Some(Self::parse(master, secret, launch, mpi))
    }

    pub(crate) fn parse(master: String, secret: Option<String>, launch: Option<String>, mpi_level: Option<String>) -> Result<WorkerConfig> {
        let secret = secret
            .as_deref()
            .and_then(Secret::from_hex)
            .ok_or_else(|| Error::Handshake(format!("{ENV_SECRET} is missing or not 32 hex digits; start workers through a ClusterManager or the command an ElasticManager prints")))?;
        let mpi = match mpi_level {
            Some(level) => Some(init_mpi(&level)?),
            None => mpi_identity_from_env(),
        };
        let launch = match launch {
            None => None,
            Some(s) => {
                let (id, index) = s.split_once(':').ok_or_else(|| Error::Handshake(format!("malformed {ENV_LAUNCH}={s}")))?;
                let id = id.parse().map_err(|_| Error::Handshake(format!("malformed {ENV_LAUNCH}={s}")))?;
                let index = match index {
                    "rank" => mpi.map(|(rank, _)| rank as u32).ok_or_else(|| Error::Handshake("launched as an MPI rank, but no MPI rank is set in the environment (OMPI_COMM_WORLD_RANK, PMI_RANK, PMIX_RANK or SLURM_PROCID); is the launcher an MPI launcher?".into()))?,
                    "task" => array_task_index().ok_or_else(|| Error::Handshake("launched as a job array task, but no task id is set (SLURM_ARRAY_TASK_ID, SGE_TASK_ID, PBS_ARRAYID, PBS_ARRAY_INDEX or LSB_JOBINDEX)".into()))?,
                    n => n.parse().map_err(|_| Error::Handshake(format!("malformed {ENV_LAUNCH}={s}")))?,
                };
                Some((id, index))
            }
        };
        Ok(WorkerConfig { master, secret, launch, mpi })
    }
}

#[cfg(feature = "mpi")]
fn init_mpi(level: &str) -> Result<(i32, i32)> {
    crate::mpi::init_worker(level)
}

#[cfg(not(feature = "mpi"))]
fn init_mpi(_level: &str) -> Result<(i32, i32)> {
    Err(Error::Unsupported("started by an MpiManager, but this program was built without clusterman's `mpi` feature".into()))
}

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

/// Call first in `main`. In a process started as a worker, it connects to the master and
/// serves until shut down, then exits the process: it never returns. Elsewhere it returns
/// at once.
pub fn init() {
    let Some(config) = WorkerConfig::from_env() else { return };
    exit_worker(config.and_then(run));
}

/// Ends a worker process: status 0 after a requested stop, else 1 with the reason on the
/// original stderr. Runs the exit hooks first (finalising MPI).
pub(crate) fn exit_worker(outcome: Result<()>) -> ! {
    let code = match outcome {
        Ok(()) => 0,
        Err(e) => {
            output::finish_forwarding();
            let who = match my_id() {
                1 => String::from("clusterman worker"),
                pid => format!("clusterman worker {pid}"),
            };
            sys::write_original_stderr(&format!("{who} (os pid {}): {e}", std::process::id()));
            1
        }
    };
    for hook in std::mem::take(&mut *EXIT_HOOKS.lock().expect("exit hooks lock")) {
        hook();
    }
    std::process::exit(code);
}

/// Work to do on this (the main) thread just before a worker exits, newest first.
static EXIT_HOOKS: std::sync::Mutex<Vec<Box<dyn FnOnce() + Send>>> = std::sync::Mutex::new(Vec::new());

/// Registers `hook` to run when this worker exits (e.g. `MPI_Finalize`).
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn at_worker_exit(hook: impl FnOnce() + Send + 'static) {
    EXIT_HOOKS.lock().expect("exit hooks lock").insert(0, Box::new(hook));
}

pub(crate) fn run(config: WorkerConfig) -> Result<()> {
    let (stream, pid, direct_links) = dial(&config)?;
    let out = TcpOut::boxed(stream.try_clone().map_err(|e| Error::io("cloning the master connection", e))?);
    let link = Link::new(1, out);
    if !direct_links {
        return serve(pid, link, Inbox::Tcp(BufReader::with_capacity(64 * 1024, stream)), None);
    }
    // Direct links: replies may come on any connection, so every link gets a reader thread
    // and wakes the serving thread, which then waits on a channel instead of a socket.
    let (to_serving, inbox) = mpsc::channel();
    let _ = SERVING_WAKE.set(std::sync::Mutex::new(to_serving.clone()));
    // listen where this worker reaches the master from: its peers are on that network
    let ip = stream.local_addr().map_err(|e| Error::io("reading the local address", e))?.ip();
    read_uplink(stream, link.clone(), to_serving)?;
    let (peers, address) = Peers::start(pid, config.secret, ip)?;
    // registered before serving, so no peer can ask for this address too early
    Cluster::worker_handle(pid, link.clone(), None).remote_call_fetch(1, super::builtin_register_peer, (pid, address.to_string()))?;
    serve(pid, link, Inbox::Channel(inbox), Some(peers))
}

/// Serves calls on this thread as worker `pid` until the master says stop (`Ok`) or is
/// gone (`Err`). On a stop, the worker's output is flushed and a goodbye frame ends the
/// conversation, so the master knows nothing more is coming (MPI links have no EOF).
pub(crate) fn serve(pid: Pid, link: Arc<Link>, inbox: Inbox, peers: Option<Arc<Peers>>) -> Result<()> {
    MY_PID.store(pid, Ordering::Relaxed);
    if let Err(e) = output::start_forwarding(link.clone(), pid) {
        tracing::warn!("worker {pid}: output stays local, forwarding failed: {e}");
    }
    let _ = WORKER_CLUSTER.set(Cluster::worker_handle(pid, link.clone(), peers));
    SERVING.with(|s| *s.borrow_mut() = Some(Serving { inbox, link: link.clone(), me: pid }));
    let outcome = loop {
        match pump_once() {
            Ok(()) if !STOPPING.load(Ordering::Relaxed) => {}
            Ok(()) | Err(Error::ShutDown) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    SERVING.with(|s| *s.borrow_mut() = None);
    output::finish_forwarding();
    if outcome.is_ok() {
        let goodbye = FrameBuf::new(Header { kind: Kind::Shutdown, src: pid, dst: 1, req: 0, func: 0 });
        let _ = link.send(goodbye.finish()?);
    }
    outcome
}

/// Connects (retrying briefly: the master may still be binding on a slow node) and shakes
/// hands. Returns the connection, this worker's pid, and whether to open direct links.
fn dial(config: &WorkerConfig) -> Result<(TcpStream, Pid, bool)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match TcpStream::connect(&config.master) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("connecting to {}: {e}; retrying", config.master);
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(Error::io(format!("cannot reach the master at {} ({ENV_MASTER}); is it running and reachable from {}?", config.master, sys::hostname()), e)),
        }
    };
    stream.set_nodelay(true).map_err(|e| Error::io("setting TCP_NODELAY", e))?;
    let (fp, exe) = fingerprint::this_process();
    let hello = Hello {
        secret: config.secret,
        fingerprint: fp.clone(),
        exe: exe.clone(),
        launch: config.launch,
        host: sys::hostname(),
        os_pid: std::process::id(),
        mpi: config.mpi,
        peer: None,
    };
    stream.write_all(&hello.encode()).map_err(|e| Error::io("sending the hello", e))?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| Error::io("setting a timeout", e))?;
    let body = read_prefixed(&mut stream, MAX_HANDSHAKE).map_err(|e| Error::Handshake(format!("no answer from the master at {}: {e}", config.master)))?;
    stream.set_read_timeout(None).map_err(|e| Error::io("clearing a timeout", e))?;
    match Welcome::decode(&body).map_err(Error::Handshake)? {
        Welcome::Accepted { pid, direct_links } => Ok((stream, pid, direct_links)),
        Welcome::Refused(reason) => Err(Error::Handshake(format!("the master refused this worker: {reason}"))),
    }
}

/// Reads one `u32`-length-prefixed message of at most `max` bytes.
pub(crate) fn read_prefixed(r: &mut impl Read, max: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("message of {len} bytes exceeds {max}")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

static WORKER_CLUSTER: std::sync::OnceLock<Cluster> = std::sync::OnceLock::new();

/// Writes raw bytes to the master (tests of the master's protocol checks).
pub(crate) fn send_raw(bytes: &[u8]) -> bool {
    worker_cluster().and_then(|c| c.uplink()).is_some_and(|link| link.send(bytes.to_vec()).is_ok())
}

/// The cluster handle of a worker process (used by `Cluster::current`).
pub(crate) fn worker_cluster() -> Option<&'static Cluster> {
    WORKER_CLUSTER.get()
}

/// What a thread that reads for the serving thread hands over: a frame (or the transport's
/// failure), or `None` — a wake-up after it resolved a reply the serving thread may be
/// waiting for.
pub(crate) type Delivery = Option<Result<Frame>>;

/// Where a serving worker's incoming frames come from.
pub(crate) enum Inbox {
    /// Read straight from the master's socket (one connection: no thread switch).
    Tcp(BufReader<TcpStream>),
    /// Handed over by another thread: the MPI progress thread, or the master link's reader
    /// when the worker also has direct links (replies may then arrive on any link).
    Channel(mpsc::Receiver<Delivery>),
}

impl Inbox {
    /// The next frame, or `None` after a wake-up.
    fn next(&mut self) -> Result<Option<Frame>> {
        match self {
            Inbox::Tcp(reader) => match protocol::read_frame(reader, protocol::DEFAULT_MAX_FRAME) {
                Ok(Some(frame)) => Ok(Some(frame)),
                Ok(None) => Err(Error::MasterGone("it closed the connection; exiting".into())),
                Err(e) => Err(Error::MasterGone(format!("{e}; exiting"))),
            },
            Inbox::Channel(rx) => match rx.recv() {
                Ok(Some(frame)) => frame.map(Some),
                Ok(None) => Ok(None),
                Err(_) => Err(Error::MasterGone("the transport stopped; exiting".into())),
            },
        }
    }
}

/// Set when the serving thread waits on a channel rather than a socket (direct links): every
/// completed call sends it a wake-up, because it may be the thread waiting for the result.
static SERVING_WAKE: std::sync::OnceLock<std::sync::Mutex<mpsc::Sender<Delivery>>> = std::sync::OnceLock::new();

/// Wakes the serving thread if it waits on a channel (nothing to do otherwise).
pub(crate) fn wake_serving() {
    if let Some(tx) = SERVING_WAKE.get() {
        let _ = tx.lock().expect("wake lock").send(None);
    }
}

/// Reads the master link on its own thread (all-to-all topology): replies are resolved here,
/// everything else goes to the serving thread through `to_serving`.
fn read_uplink(stream: TcpStream, link: Arc<Link>, to_serving: mpsc::Sender<Delivery>) -> Result<()> {
    let spawned = std::thread::Builder::new().name("cman-uplink".into()).spawn(move || {
        let mut reader = BufReader::with_capacity(64 * 1024, stream);
        loop {
            let failure = match protocol::read_frame(&mut reader, protocol::DEFAULT_MAX_FRAME) {
                Ok(Some(frame)) if matches!(frame.header.kind, Kind::Reply | Kind::Failure) => {
                    link.resolve(frame);
                    continue;
                }
                Ok(Some(frame)) => {
                    let _ = to_serving.send(Some(Ok(frame)));
                    continue;
                }
                Ok(None) => "it closed the connection; exiting".to_string(),
                Err(e) => format!("{e}; exiting"),
            };
            link.fail_all(&failure);
            let _ = to_serving.send(Some(Err(Error::MasterGone(failure))));
            return;
        }
    });
    spawned.map(|_| ()).map_err(|e| Error::io("starting the master link's reader", e))
}

struct Serving {
    inbox: Inbox,
    link: Arc<Link>,
    me: Pid,
}

thread_local! {
    static SERVING: RefCell<Option<Serving>> = const { RefCell::new(None) };
}

/// True on the thread that reads the worker's connection.
pub(crate) fn serves_on_this_thread() -> bool {
    SERVING.with(|s| s.borrow().is_some())
}

/// Reads and handles one frame on the serving thread. Calls run right here, so a no-op call
/// costs no thread switch; a call that itself waits for a reply pumps recursively.
pub(crate) fn pump_once() -> Result<()> {
    let (frame, link, me) = SERVING.with(|s| {
        let mut s = s.borrow_mut();
        let s = s.as_mut().expect("pump_once on a thread that does not serve");
        (s.inbox.next(), s.link.clone(), s.me)
    });
    let Some(frame) = frame? else { return Ok(()) }; // a wake-up: the caller looks again
    match frame.header.kind {
        Kind::Call | Kind::Cast | Kind::Batch => {
            if let Some(reply) = exec::execute(me, &frame) {
                output::flush();
                link.send(reply)?;
            }
        }
        Kind::Reply | Kind::Failure => link.resolve(frame),
        Kind::Shutdown => {
            STOPPING.store(true, Ordering::Relaxed);
            link.fail_all("the worker is shutting down");
            return Err(Error::ShutDown);
        }
        Kind::Output => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parsing_reports_what_is_wrong() {
        let secret = Secret::random().to_hex();
        let ok = WorkerConfig::parse("h:1".into(), Some(secret.clone()), Some("5:3".into()), None).unwrap();
        assert_eq!(ok.launch, Some((5, 3)));
        let err = WorkerConfig::parse("h:1".into(), None, None, None).err().unwrap().to_string();
        assert!(err.contains(ENV_SECRET), "{err}");
        let err = WorkerConfig::parse("h:1".into(), Some(secret), Some("x".into()), None).err().unwrap().to_string();
        assert!(err.contains("malformed"), "{err}");
    }
}
