//! `ElasticManager`: workers that join by themselves, at any time, by running the command it
//! prints. It has its own listener (an explicit address, or "auto": a non-loopback address of
//! this host that other machines can reach); joined workers become ordinary pids of the
//! cluster. Only the worker dials: no connection back from the master, so it works where a
//! firewall lets compute nodes reach the master but not the other way. The printed command
//! names a file that holds the secret (mode 0600 under `~/.clusterman/`), never the secret.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::ids::Pid;
use crate::cluster::master::serve_connection;
use crate::cluster::{Cluster, Inner};
use crate::error::{Error, Result};
use crate::protocol::{Hello, Refusal, Welcome};
use crate::transport::listener::{Admit, Listener};
use crate::protocol::env::{ENV_MASTER, ENV_SECRET_FILE};
use crate::sys;

use super::SecretFile;
use super::shell::shell_quote;

/// Where an [`ElasticManager`] listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElasticAddress {
    /// This host's first non-loopback IPv4 address.
    Auto,
    /// This address.
    Ip(IpAddr),
}

/// Called with a worker's pid when it joins or leaves.
type Callback = Box<dyn Fn(Pid) + Send + Sync>;

#[derive(Default)]
struct Members {
    active: BTreeSet<Pid>,
    terminated: BTreeSet<Pid>,
    on_join: Vec<Callback>,
    on_leave: Vec<Callback>,
}

struct Shared {
    members: Mutex<Members>,
    changed: Condvar,
}

/// Accepts workers that dial in by themselves, at any time.
///
/// ```no_run
/// use clusterman::prelude::*;
/// use clusterman::launch::{ElasticAddress, ElasticManager};
/// # fn main() -> clusterman::Result<()> {
/// let cluster = Cluster::new()?;
/// let elastic = ElasticManager::start(&cluster, ElasticAddress::Auto, 0)?;
/// println!("{elastic}");                               // includes the command to start a worker
/// elastic.on_join(|pid| println!("worker {pid} joined"));
/// let pids = elastic.wait_for(2, std::time::Duration::from_secs(600))?;
/// # Ok(()) }
/// ```
pub struct ElasticManager {
    listener: Option<Listener>,
    address: SocketAddr,
    secret: SecretFile,
    program: String,
    shared: Arc<Shared>,
}

impl ElasticManager {
    /// Listens on `address` and `port` (0: the OS picks one) for workers of `cluster`.
    pub fn start(cluster: &Cluster, address: ElasticAddress, port: u16) -> Result<ElasticManager> {
        let inner = cluster.inner().clone();
        let master = inner.master.as_ref().ok_or_else(|| Error::Unsupported("only the master (pid 1) can accept workers".into()))?;
        let ip = match address {
            ElasticAddress::Ip(ip) => ip,
            ElasticAddress::Auto => IpAddr::V4(sys::first_non_loopback_ipv4().ok_or_else(|| {
                Error::Launch("found no non-loopback IPv4 address on this host; start the ElasticManager with ElasticAddress::Ip(..)".into())
            })?),
        };
        let shared = Arc::new(Shared { members: Mutex::new(Members::default()), changed: Condvar::new() });
        let admit = Arc::new(ElasticAdmission { cluster: Arc::downgrade(&inner), shared: shared.clone() });
        let listener = Listener::start(SocketAddr::new(ip, port), master.secret, admit, master.handshakes)?;
        let address = listener.addr();
        let home = std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_else(|| ".".into());
        let secret = SecretFile::write(&home, &format!("elastic-{}-{}", std::process::id(), address.port()), master.secret)?;
        let departed = Arc::downgrade(&shared);
        master.departures.lock().expect("departures lock").push(Box::new(move |pid, _reason| {
            let Some(shared) = departed.upgrade() else { return };
            let mut m = shared.members.lock().expect("members lock");
            if m.active.remove(&pid) {
                m.terminated.insert(pid);
                m.on_leave.iter().for_each(|f| f(pid));
                shared.changed.notify_all();
            }
        }));
        let program = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "<program>".into());
        tracing::info!("elastic manager listening on {address}");
        Ok(ElasticManager { listener: Some(listener), address, secret, program, shared })
    }

    /// The address workers dial.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The shell command that starts a worker from another shell or machine: the absolute
    /// program path, with the address and the secret file's name in its environment. The
    /// file (mode 0600) must be readable there: on a shared home directory it is; elsewhere
    /// copy it to the same path.
    pub fn connect_command(&self) -> String {
        let file = shell_quote(&self.secret.path().display().to_string());
        format!("{ENV_MASTER}={} {ENV_SECRET_FILE}={file} {}", self.address, shell_quote(&self.program))
    }

    /// Calls `f(pid)` whenever a worker joins.
    pub fn on_join(&self, f: impl Fn(Pid) + Send + Sync + 'static) {
        self.shared.members.lock().expect("members lock").on_join.push(Box::new(f));
    }

    /// Calls `f(pid)` whenever a worker leaves (its pending futures fail with `WorkerDied`).
    pub fn on_leave(&self, f: impl Fn(Pid) + Send + Sync + 'static) {
        self.shared.members.lock().expect("members lock").on_leave.push(Box::new(f));
    }

    /// Workers that joined and are still here.
    pub fn active(&self) -> Vec<Pid> {
        self.shared.members.lock().expect("members lock").active.iter().copied().collect()
    }

    /// Workers that joined and left.
    pub fn terminated(&self) -> Vec<Pid> {
        self.shared.members.lock().expect("members lock").terminated.iter().copied().collect()
    }

    /// Waits until at least `n` workers are active; returns them.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Result<Vec<Pid>> {
        let started = Instant::now();
        let m = self.shared.members.lock().expect("members lock");
        let (m, _) = self.shared.changed.wait_timeout_while(m, timeout, |m| m.active.len() < n).expect("members lock");
        if m.active.len() < n {
            return Err(Error::LaunchTimeout {
                waited: started.elapsed(),
                connected: m.active.len(),
                expected: n,
                detail: format!("start workers with: {}", self.connect_command()),
            });
        }
        Ok(m.active.iter().copied().collect())
    }

    /// Stops accepting workers (those that joined stay).
    pub fn stop(&mut self) {
        self.listener = None;
    }
}

impl fmt::Display for ElasticManager {
    /// Like Julia's: active and terminated workers, and the command that adds one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |pids: Vec<Pid>| format!("[{}]", pids.iter().map(Pid::to_string).collect::<Vec<_>>().join(", "));
        writeln!(f, "ElasticManager:")?;
        writeln!(f, "  Active workers : {}", list(self.active()))?;
        writeln!(f, "  Terminated workers : {}", list(self.terminated()))?;
        writeln!(f, "  Worker connect command :")?;
        write!(f, "    {}", self.connect_command())
    }
}

impl fmt::Debug for ElasticManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ElasticManager").field("address", &self.address).field("active", &self.active()).finish()
    }
}

/// Admits any worker with the right secret and binary, as the next free pid.
struct ElasticAdmission {
    cluster: Weak<Inner>,
    shared: Arc<Shared>,
}

impl Admit for ElasticAdmission {
    fn admit(&self, hello: &Hello) -> std::result::Result<Welcome, Refusal> {
        let refuse = |reason: &str| Refusal { reason: reason.into(), launch: None };
        let inner = self.cluster.upgrade().ok_or_else(|| refuse("the master is shutting down"))?;
        let master = inner.master.as_ref().ok_or_else(|| refuse("not a master"))?;
        if master.shut.load(Ordering::Relaxed) {
            return Err(refuse("the master is shutting down"));
        }
        if hello.peer.is_some() {
            return Err(refuse("a worker-to-worker hello sent to the master's elastic listener"));
        }
        if let Some(problem) = &hello.problem {
            return Err(refuse(problem));
        }
        Ok(Welcome::Accepted(master.terms(master.next_pid.fetch_add(1, Ordering::Relaxed))))
    }

    fn serve(&self, pid: Pid, hello: Hello, stream: tokio::net::TcpStream) {
        let Some(inner) = self.cluster.upgrade() else { return };
        let (host, os_pid) = (hello.host.clone(), hello.os_pid);
        serve_connection(&inner, pid, hello, stream);
        tracing::info!("worker {pid} joined from {host} (os pid {os_pid})");
        let mut m = self.shared.members.lock().expect("members lock");
        m.active.insert(pid);
        m.on_join.iter().for_each(|f| f(pid));
        self.shared.changed.notify_all();
    }

    fn refused(&self, peer: SocketAddr, refusal: &Refusal) {
        if let Some(m) = self.cluster.upgrade().as_ref().and_then(|inner| inner.master.as_ref()) {
            m.refused("the elastic manager", peer, refusal);
        }
    }
}
