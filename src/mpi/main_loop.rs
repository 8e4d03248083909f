//! Modes 2 and 3: every process is an MPI rank. Rank 0 becomes the master (pid 1) and gets
//! an [`MpiManager`] back; every other rank serves as worker `rank + 1` and exits (MPI
//! finalised, status 0) when the master shuts down.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ::mpi::Threading;
use ::mpi::topology::SimpleCommunicator;
use ::mpi::point_to_point::MatchedReceiveVec;
use ::mpi::traits::{Communicator, Destination, Root, Source};
use serde::{Deserialize, Serialize};

use crate::ids::Pid;
use crate::cluster::link::{Link, Received, SharedCore};
use crate::cluster::worker::{self, Delivery, Inbox, WorkerConfig, at_worker_exit, exit_worker};
use crate::cluster::{Cluster, WorkerInfo};
use crate::codec;
use crate::error::{Error, Result};
use crate::fingerprint;
use crate::launch::{ClusterManager, Launch, LaunchContext, LaunchStatus};
use crate::protocol::worker::WorkerCore;
use crate::protocol::{DEFAULT_MAX_FRAME, Fingerprint, Liveness, PROTOCOL_VERSION, Secret, Terms};
use crate::sys;

use super::env::{self, MpiIdentity};
use super::manager::MpiManager;
use super::transport::MpiTransport;

/// How the processes of an all-rank program talk to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Over TCP: rank 0 sends its address and the secret to the others over MPI, and they
    /// dial in like any worker. Needs TCP between the nodes.
    Tcp,
    /// Over MPI itself, for clusters whose nodes have no TCP between them. Needs
    /// `MPI_THREAD_MULTIPLE` (Open MPI and MPICH grant it).
    Mpi,
}

/// Starts the all-rank main loop with default options; see [`MainLoop`].
///
/// ```no_run
/// use clusterman::mpi::{Transport, start_main_loop};
/// # fn main() -> clusterman::Result<()> {
/// clusterman::init();
/// let mgr = start_main_loop(Transport::Mpi)?; // only rank 0 gets here
/// let cluster = mgr.cluster().expect("rank 0 owns the cluster");
/// println!("{} processes", cluster.nprocs());
/// mgr.shutdown()?;                             // every rank finalises MPI and exits
/// # Ok(()) }
/// ```
pub fn start_main_loop(transport: Transport) -> Result<MpiManager> {
    MainLoop::new(transport).start()
}

/// Options for the all-rank modes.
#[derive(Debug, Clone)]
pub struct MainLoop {
    transport: Transport,
    threading: Option<Threading>,
    bind: Option<SocketAddr>,
    advertise: Option<IpAddr>,
    timeout: Duration,
}

impl MainLoop {
    /// Defaults: bind all interfaces, advertise this host's first non-loopback address
    /// (reachable from other nodes), 60 s for the ranks to connect.
    pub fn new(transport: Transport) -> Self {
        MainLoop { transport, threading: None, bind: None, advertise: None, timeout: Duration::from_secs(60) }
    }

    /// Threading level to ask MPI for (default `Serialized` for TCP, `Multiple` for MPI).
    pub fn threading(mut self, level: Threading) -> Self {
        self.threading = Some(level);
        self
    }

    /// Address rank 0 listens on (TCP transport).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = Some(addr);
        self
    }

    /// Address the other ranks dial (TCP transport), e.g. the one on the cluster network.
    pub fn advertise(mut self, ip: IpAddr) -> Self {
        self.advertise = Some(ip);
        self
    }

    /// How long rank 0 waits for the other ranks to connect (TCP transport).
    pub fn launch_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Initialises MPI and starts the loop. Rank 0 returns the manager; other ranks serve
    /// and exit the process when told to, so this returns only on rank 0 (or on error).
    pub fn start(self) -> Result<MpiManager> {
        let wanted = self.threading.unwrap_or(match self.transport {
            Transport::Tcp => Threading::Serialized,
            Transport::Mpi => Threading::Multiple,
        });
        let me = env::initialize(wanted)?;
        if self.transport == Transport::Mpi && me.threading != Threading::Multiple {
            return Err(Error::Unsupported(format!(
                "the MPI transport needs MPI_THREAD_MULTIPLE, this MPI granted {}; use Transport::Tcp or an MPI built with thread support",
                env::threading_name(me.threading)
            )));
        }
        match self.transport {
            Transport::Tcp => self.start_tcp(me),
            Transport::Mpi => self.start_mpi(me),
        }
    }

    fn cluster(&self) -> Result<Cluster> {
        let mut b = Cluster::builder();
        if let Some(bind) = self.bind {
            b = b.bind(bind);
        }
        if let Some(ip) = self.advertise {
            b = b.advertise(ip);
        }
        b.build()
    }

    fn start_tcp(self, me: MpiIdentity) -> Result<MpiManager> {
        let world = SimpleCommunicator::world();
        if me.rank != 0 {
            let Invitation { master, secret, launch } = receive_broadcast(&world);
            let config = WorkerConfig { master: master.clone(), secret, launch: Some((launch, me.rank as u32 - 1)), mpi: Some((me.rank, me.size)) };
            at_worker_exit(env::finalize);
            exit_worker(worker::run(config).map_err(|e| {
                let why = match &e {
                    Error::Io { source, .. } => source.to_string(),
                    Error::Handshake(_) => e.to_string(),
                    _ => return e,
                };
                let message = format!("rank {} cannot reach rank 0 at {master} over TCP: {why}. If the nodes have no TCP route to each other, use Transport::Mpi", me.rank);
                // MPI still works: tell rank 0, so it fails now instead of at its timeout
                world.process_at_rank(0).send_with_tag(message.as_bytes(), DIAL_FAILED);
                Error::Launch(message)
            }));
        }
        let cluster = self.cluster()?;
        let pids = match me.size {
            1 => Vec::new(), // rank 0 alone: nobody to invite
            size => cluster.add_procs(Invite { n: size as usize - 1, timeout: self.timeout })?,
        };
        let ranks = std::iter::once((0, 1)).chain(pids.iter().map(|&pid| (pid as i32 - 1, pid)));
        let mgr = MpiManager::for_all_ranks(cluster, ranks);
        mgr.state().on_shutdown.push(Box::new(env::finalize));
        Ok(mgr)
    }

    fn start_mpi(self, me: MpiIdentity) -> Result<MpiManager> {
        let world = SimpleCommunicator::world();
        let comm = world.duplicate();
        let mine = Identity { version: PROTOCOL_VERSION, fingerprint: fingerprint::this_process().0.clone(), exe: fingerprint::this_process().1.clone(), host: sys::hostname(), os_pid: std::process::id() };
        if me.rank != 0 {
            comm.process_at_rank(0).send(&codec::encode(&mine)?[..]);
            let terms = Terms { pid: me.rank as Pid + 1, direct_links: false, max_frame: DEFAULT_MAX_FRAME, liveness: Liveness::default() };
            let (tx, inbox) = crossbeam_channel::unbounded();
            // the link is made once the transport runs (it sends through it): frames that come
            // before go to the serving thread all the same, as frames of the master's link
            let uplink: Arc<OnceLock<Arc<Link>>> = Arc::default();
            let (receiving, watching) = (uplink.clone(), uplink.clone());
            let awaiting = Box::new(move || watching.get().is_some_and(|link| link.core().awaits_replies()));
            let transport = MpiTransport::start(comm, Box::new(move |_, frame| {
                let delivery = match (frame, receiving.get()) {
                    (Err(e), _) => Delivery::Failed(e),
                    (Ok(frame), None) => Delivery::Frame(frame),
                    (Ok(frame), Some(link)) => match link.receive(frame) {
                        Ok(Received::Nothing) => return,
                        Ok(received) => Delivery::Received(received, link.clone()),
                        Err(e) => Delivery::Failed(Error::MasterGone(e)),
                    },
                };
                let _ = tx.send(delivery);
            }), terms.max_frame, awaiting)?;
            let verdict = String::from_utf8_lossy(&receive_bytes(&world)).into_owned();
            at_worker_exit(env::finalize);
            if !verdict.is_empty() {
                transport.stop();
                exit_worker(Err(Error::Handshake(verdict)));
            }
            let core: SharedCore = Arc::new(Mutex::new(WorkerCore::new(terms)));
            let link = Link::new(&core, 1, transport.out(0));
            let _ = uplink.set(link.clone());
            at_worker_exit(move || transport.stop());
            exit_worker(worker::serve(link, Inbox::Channel(inbox), None));
        }
        let mut others = Vec::new();
        let mut problems = Vec::new();
        for rank in 1..me.size {
            let (bytes, _) = comm.process_at_rank(rank).receive_vec::<u8>();
            match codec::decode::<Identity>(&bytes) {
                Ok(id) if id.version != PROTOCOL_VERSION => problems.push(format!("rank {rank} speaks protocol {}, rank 0 speaks {PROTOCOL_VERSION}", id.version)),
                Ok(id) if id.fingerprint != mine.fingerprint => problems.push(format!(
                    "rank {rank} ({}) has build [{}], rank 0 ({}) has [{}]; run the same binary on every rank",
                    id.exe, id.fingerprint, mine.exe, mine.fingerprint
                )),
                Ok(id) => others.push((rank, id)),
                Err(e) => problems.push(format!("rank {rank} sent a malformed identity: {e}")),
            }
        }
        let verdict = problems.join("; ");
        let cluster = match self.cluster() {
            Ok(c) => c,
            Err(e) => {
                broadcast_bytes(&world, e.to_string().as_bytes());
                return Err(e);
            }
        };
        let (handle, watching) = (cluster.clone_handle(), cluster.clone_handle());
        let deliver = Box::new(move |rank, frame| handle.receive_from(rank as Pid + 1, frame));
        let transport = MpiTransport::start(comm, deliver, DEFAULT_MAX_FRAME, Box::new(move || watching.awaits_replies()))?;
        if verdict.is_empty() {
            for (rank, id) in others {
                let info = WorkerInfo { pid: rank as Pid + 1, host: id.host, os_pid: id.os_pid, mpi: Some((rank, me.size)) };
                cluster.attach_worker(info, transport.out(rank));
            }
        }
        broadcast_bytes(&world, verdict.as_bytes());
        if !verdict.is_empty() {
            transport.stop();
            env::finalize();
            return Err(Error::Handshake(verdict));
        }
        let ranks: Vec<(i32, Pid)> = (0..me.size).map(|r| (r, r as Pid + 1)).collect();
        let mgr = MpiManager::for_all_ranks(cluster, ranks);
        let mut s = mgr.state();
        s.on_shutdown.push(Box::new(move || transport.stop()));
        s.on_shutdown.push(Box::new(env::finalize));
        drop(s);
        Ok(mgr)
    }
}

/// What a rank tells rank 0 about itself in mode 3 (the MPI world replaces the secret).
#[derive(Serialize, Deserialize)]
struct Identity {
    version: u16,
    fingerprint: Fingerprint,
    exe: String,
    host: String,
    os_pid: u32,
}

/// What rank 0 broadcasts in mode 2.
#[derive(Serialize, Deserialize)]
struct Invitation {
    master: String,
    secret: Secret,
    launch: u64,
}

/// Tag of a rank's report that it cannot dial rank 0 (mode 2).
const DIAL_FAILED: i32 = 7002;

/// The "launcher" of mode 2: the ranks already run; it only tells them where to dial.
struct Invite {
    n: usize,
    timeout: Duration,
}

impl ClusterManager for Invite {
    fn name(&self) -> &str {
        "mpi-ranks"
    }
    fn count(&self) -> usize {
        self.n
    }
    fn launch(&self, ctx: &LaunchContext) -> Result<Box<dyn Launch>> {
        let invitation = Invitation { master: ctx.master_address(), secret: ctx.secret(), launch: ctx.id() };
        broadcast_bytes(&SimpleCommunicator::world(), &codec::encode(&invitation)?);
        Ok(Box::new(RanksAlreadyRunning))
    }
    fn launch_timeout(&self) -> Duration {
        self.timeout
    }
}

struct RanksAlreadyRunning;

impl Launch for RanksAlreadyRunning {
    /// Runs on the thread that called `start_main_loop`, which initialised MPI.
    fn status(&mut self) -> LaunchStatus {
        let world = SimpleCommunicator::world();
        match world.any_process().immediate_matched_probe_with_tag(DIAL_FAILED) {
            Some(report) => LaunchStatus::Failed(String::from_utf8_lossy(&report.matched_receive_vec::<u8>().0).into_owned()),
            None => LaunchStatus::Running,
        }
    }
    fn stop(&mut self, _grace: Duration) {}
    fn describe(&self) -> String {
        "ranks that cannot reach rank 0 over TCP print why; if the nodes have no TCP route to each other, use Transport::Mpi".into()
    }
}

/// Broadcasts `bytes` from rank 0: the length, then the bytes (skipped when empty: an
/// empty slice's dangling pointer is 0x1, which Open MPI reads as `MPI_IN_PLACE`).
fn broadcast_bytes(world: &SimpleCommunicator, bytes: &[u8]) {
    let root = world.process_at_rank(0);
    let mut len = bytes.len() as u64;
    root.broadcast_into(&mut len);
    if len > 0 {
        let mut buf = bytes.to_vec();
        root.broadcast_into(&mut buf[..]);
    }
}

/// Receives what rank 0 sends with [`broadcast_bytes`].
fn receive_bytes(world: &SimpleCommunicator) -> Vec<u8> {
    let root = world.process_at_rank(0);
    let mut len = 0u64;
    root.broadcast_into(&mut len);
    let mut buf = vec![0u8; len as usize];
    if len > 0 {
        root.broadcast_into(&mut buf[..]);
    }
    buf
}

fn receive_broadcast(world: &SimpleCommunicator) -> Invitation {
    codec::decode(&receive_bytes(world)).unwrap_or_else(|e| exit_worker(Err(Error::Protocol(format!("bad invitation from rank 0: {e}")))))
}

/// Decodes `bytes` as each message the all-rank modes exchange (for the fuzz harness).
pub(crate) fn decode_untrusted(bytes: &[u8]) {
    let _ = codec::decode::<Identity>(bytes);
    let _ = codec::decode::<Invitation>(bytes);
}

/// Valid messages of the all-rank modes (seeds for the fuzz harness).
pub(crate) fn sample_messages() -> Vec<Vec<u8>> {
    let (fingerprint, exe) = fingerprint::this_process();
    let identity = Identity { version: PROTOCOL_VERSION, fingerprint: fingerprint.clone(), exe: exe.clone(), host: "node1".into(), os_pid: 4242 };
    let invitation = Invitation { master: "10.0.0.1:4000".into(), secret: Secret::random(), launch: 7 };
    vec![codec::encode(&identity).expect("encodes"), codec::encode(&invitation).expect("encodes")]
}
