//! Workers that join by themselves, by running a command that is printed for you: at any
//! time, through an open door ([`ElasticManager`]: a join rule on the master's one listener;
//! while it is open, a worker with the right secret and binary but no launch of its own
//! becomes the next pid of the cluster), or a given number of them as a launch
//! ([`ElasticWorkers`], a [`ClusterManager`] whose launch prints the command and waits).
//! Only the worker dials: no connection back from the master, so it works where a firewall
//! lets compute nodes reach the master but not the other way. The printed command names a
//! file that holds the secret (mode 0600 under `~/.clusterman/`), never the secret.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::cluster::launcher::{ClusterManager, Launch, LaunchContext, LaunchStatus};
use crate::cluster::master::Membership;
use crate::cluster::{Cluster, Inner};
use crate::error::{Error, Result};
use crate::ids::Pid;
use crate::protocol::env::{ENV_MASTER, ENV_SECRET_FILE};
use crate::sys;

use super::SecretFile;
use super::scheduler::export_lines;
use super::shell::shell_quote;

/// The address an [`ElasticManager`] tells workers to dial (the master's port).
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
/// The cookie of Julia's `ElasticManager` is the cluster's: build the cluster with
/// [`ClusterBuilder::cookie`](crate::ClusterBuilder::cookie), and a worker needs only the
/// master's address and that cookie. Neither `Display` nor the printed command shows it.
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
    cluster: Weak<Inner>,
    /// Whether the join rule is still open.
    open: bool,
    address: SocketAddr,
    secret: SecretFile,
    program: String,
    style: CommandStyle,
    /// The environment to source, when the style asks for one.
    env_file: Option<SecretFile>,
    shared: Arc<Shared>,
}

/// How [`ElasticManager::connect_command`] writes the command (Julia's `printing_kwargs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandStyle {
    /// The program by its absolute path (the default); `false`: by its file name, for
    /// machines where it is on the `PATH` at another place.
    pub absolute_program: bool,
    /// The environment in a file to source (`. file && program`) instead of assignments on
    /// the line. The file (mode 0600, beside the secret file) holds the master's address and
    /// the secret file's name, never the secret.
    pub env_file: bool,
}

impl Default for CommandStyle {
    fn default() -> Self {
        CommandStyle { absolute_program: true, env_file: false }
    }
}

impl ElasticManager {
    /// Opens `cluster` to workers that join by themselves, dialling `address` at the
    /// master's port. `port` is 0 or that port: the master has one listener (choose its
    /// port with [`ClusterBuilder::bind`](crate::ClusterBuilder::bind)).
    pub fn start(cluster: &Cluster, address: ElasticAddress, port: u16) -> Result<ElasticManager> {
        let inner = cluster.inner().clone();
        let master = inner.master.as_ref().ok_or_else(|| Error::Unsupported("only the master (pid 1) can accept workers".into()))?;
        let program = sys::own_program().map_err(Error::Launch)?.display().to_string();
        let listening = master.addr;
        if port != 0 && port != listening.port() {
            return Err(Error::Launch(format!(
                "workers join through the master's listener on port {}, not {port}: pass port 0, or build the cluster with ClusterBuilder::bind(\"0.0.0.0:{port}\".parse()?)",
                listening.port()
            )));
        }
        let ip = match address {
            ElasticAddress::Ip(ip) => ip,
            ElasticAddress::Auto => IpAddr::V4(sys::first_non_loopback_ipv4().ok_or_else(|| {
                Error::Launch("found no non-loopback IPv4 address on this host; start the ElasticManager with ElasticAddress::Ip(..)".into())
            })?),
        };
        if !listening.ip().is_unspecified() && listening.ip() != ip {
            return Err(Error::Launch(format!(
                "the master listens on {listening} only, so workers cannot join at {ip}: pass ElasticAddress::Ip({}), or build the cluster with ClusterBuilder::bind(\"0.0.0.0:0\".parse()?)",
                listening.ip()
            )));
        }
        if std::net::TcpListener::bind((ip, 0)).is_err() {
            return Err(Error::Launch(format!("{ip} is not an address of this host; pass one of its addresses, or ElasticAddress::Auto")));
        }
        let address = SocketAddr::new(ip, listening.port());
        static SEQUENCE: AtomicU32 = AtomicU32::new(0);
        let name = format!("elastic-{}-{}-{}", std::process::id(), address.port(), SEQUENCE.fetch_add(1, Ordering::Relaxed));
        let secret = SecretFile::write(&home(), &name, master.secret)?;
        let shared = Arc::new(Shared { members: Mutex::new(Members::default()), changed: Condvar::new() });
        let told = Arc::downgrade(&shared);
        master.membership.lock().expect("membership lock").push(Box::new(move |change| {
            if let Some(shared) = told.upgrade() {
                shared.record(change);
            }
        }));
        // opened last: nothing after it can fail and leave it open without a manager
        master.admission.lock().expect("admission lock").open_joining();
        tracing::info!("workers may join at {address}");
        Ok(ElasticManager { cluster: Arc::downgrade(&inner), open: true, address, secret, program, style: CommandStyle::default(), env_file: None, shared })
    }

    /// Writes the command as `style` says from now on.
    pub fn command_style(&mut self, style: CommandStyle) -> Result<()> {
        self.env_file = None;
        if style.env_file {
            let name = self.secret.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            self.env_file = Some(SecretFile::private(&home(), &format!("{name}.env"), &export_lines(&self.env()))?);
        }
        self.style = style;
        Ok(())
    }

    /// What a joining worker needs in its environment.
    fn env(&self) -> [(String, String); 2] {
        [(ENV_MASTER.to_string(), self.address.to_string()), (ENV_SECRET_FILE.to_string(), self.secret.path().display().to_string())]
    }

    /// The address workers dial.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The shell command that starts a worker from another shell or machine: the program
    /// (by its absolute path unless the [`CommandStyle`] says otherwise), with the address
    /// and the secret file's name in its environment. The file (mode 0600) must be readable
    /// there: on a shared home directory it is; elsewhere copy it to the same path.
    pub fn connect_command(&self) -> String {
        let program = match self.style.absolute_program {
            true => self.program.clone(),
            false => Path::new(&self.program).file_name().map_or_else(|| self.program.clone(), |n| n.to_string_lossy().into_owned()),
        };
        match &self.env_file {
            Some(file) => format!(". {} && {}", shell_quote(&file.path().display().to_string()), shell_quote(&program)),
            None => join_command(&self.env(), &program),
        }
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
        if std::mem::take(&mut self.open)
            && let Some(inner) = self.cluster.upgrade()
        {
            inner.master().admission.lock().expect("admission lock").close_joining();
        }
    }
}

/// Where the secret files of workers started by hand go (under `.clusterman/`): the home
/// directory, which is often shared with the other machines.
fn home() -> std::path::PathBuf {
    std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_else(|| ".".into())
}

/// The shell line that starts a worker with `env` (no secret in it: a file names it).
fn join_command(env: &[(String, String)], program: &str) -> String {
    let assignments: Vec<String> = env.iter().map(|(k, v)| format!("{k}={}", shell_quote(v))).collect();
    format!("{} {}", assignments.join(" "), shell_quote(program))
}

/// `count` workers started by hand, or by any tool that can run a command: the launch
/// prints the command that starts one (on standard error and in the log), and `add_procs`
/// returns once `count` have joined, each taking the next pid. Nothing is started for you,
/// so the default launch timeout is long (10 minutes).
///
/// ```no_run
/// use clusterman::prelude::*;
/// use clusterman::launch::ElasticWorkers;
/// # fn main() -> clusterman::Result<()> {
/// let cluster = Cluster::new()?;
/// // prints: start 4 workers, each with: CLUSTERMAN_MASTER=... CLUSTERMAN_SECRET_FILE=... /path/to/program
/// let pids = cluster.add_procs(ElasticWorkers::new(4))?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ElasticWorkers {
    count: usize,
    timeout: Duration,
    announce: fn(&str),
}

impl ElasticWorkers {
    /// Waits for `count` workers.
    pub fn new(count: usize) -> ElasticWorkers {
        ElasticWorkers { count, timeout: Duration::from_secs(600), announce: |line| eprintln!("{line}") }
    }

    /// How long `add_procs` waits for them all.
    pub fn launch_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Where the line with the command goes (default: standard error).
    pub fn announce(mut self, announce: fn(&str)) -> Self {
        self.announce = announce;
        self
    }
}

impl ClusterManager for ElasticWorkers {
    fn name(&self) -> &str {
        "elastic"
    }
    fn count(&self) -> usize {
        self.count
    }
    fn launch(&self, ctx: &LaunchContext) -> Result<Box<dyn Launch>> {
        let secret = SecretFile::for_launch(ctx, &home())?;
        let env = LaunchContext::secret_from(ctx.env_by_arrival(&ctx.master_address()), secret.path());
        let command = join_command(&env, &ctx.program().display().to_string());
        let line = format!("clusterman: start {} worker{}, each with: {command}", self.count, if self.count == 1 { "" } else { "s" });
        tracing::info!("{line}");
        (self.announce)(&line);
        Ok(Box::new(Announced { command, _secret: secret }))
    }
    fn launch_timeout(&self) -> Duration {
        self.timeout
    }
}

/// A launch whose workers someone else starts: there is nothing to watch or stop (the
/// workers that joined are told to exit at shutdown like any other).
struct Announced {
    command: String,
    /// Deleted with the launch.
    _secret: SecretFile,
}

impl Launch for Announced {
    fn status(&mut self) -> LaunchStatus {
        LaunchStatus::Running
    }
    fn stop(&mut self, _grace: Duration) {}
    fn describe(&self) -> String {
        format!("start each worker with: {}", self.command)
    }
}

impl Drop for ElasticManager {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    /// Keeps the lists: every worker that joins by itself is this manager's (all the
    /// elastic managers of a cluster share its listener).
    fn record(&self, change: Membership) {
        let mut m = self.members.lock().expect("members lock");
        match change {
            Membership::Joined(pid) => {
                m.active.insert(pid);
                m.on_join.iter().for_each(|f| f(pid));
            }
            Membership::Left(pid) => {
                if !m.active.remove(&pid) {
                    return;
                }
                m.terminated.insert(pid);
                m.on_leave.iter().for_each(|f| f(pid));
            }
        }
        self.changed.notify_all();
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
