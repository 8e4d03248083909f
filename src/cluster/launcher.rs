//! What the cluster needs from a way of starting workers: the [`ClusterManager`] and
//! [`Launch`] traits and the [`LaunchContext`] a manager starts workers with. The managers
//! themselves (`clusterman::launch`) live above the cluster.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::error::Result;
use crate::protocol::Secret;
pub use crate::protocol::watch::LaunchStatus;
use crate::protocol::env::{ENV_LAUNCH, ENV_MASTER, ENV_SECRET, ENV_SECRET_FILE, Index, launch_value};

/// A way of starting workers: local processes, `mpirun`, a job scheduler...
///
/// Implement it to add a launcher: [`launch`](ClusterManager::launch) starts
/// [`count`](ClusterManager::count) processes running [`LaunchContext::program`] with
/// [`LaunchContext::env`] for worker `i` in their environment, and returns a [`Launch`]
/// that can check on them and stop them.
pub trait ClusterManager {
    /// Short name for logs and errors (`"local"`, `"mpirun"`, `"slurm"`).
    fn name(&self) -> &str;
    /// How many workers this manager starts.
    fn count(&self) -> usize;
    /// Starts the workers; does not wait for them to connect.
    fn launch(&self, ctx: &LaunchContext) -> Result<Box<dyn Launch>>;
    /// How long `add_procs` waits for every worker to connect (default 60 s), counted from
    /// when the launch is [`Running`](LaunchStatus::Running), not from submission.
    fn launch_timeout(&self) -> Duration {
        Duration::from_secs(60)
    }
    /// How long a launch may stay [`Queued`](LaunchStatus::Queued) (default: no limit).
    fn queue_timeout(&self) -> Option<Duration> {
        None
    }
    /// The fewest workers worth going on with when the launch timeout ends (default: all of
    /// them, so a missing worker fails the launch).
    fn min_workers(&self) -> usize {
        self.count()
    }
    /// Called once every worker has connected, before `add_procs` returns; an `Err` makes
    /// the launch fail (its workers are stopped). Managers that keep per-worker state (MPI
    /// rank maps) record it here.
    fn added(&self, cluster: &super::Cluster, workers: &[super::WorkerInfo]) -> Result<()> {
        let _ = (cluster, workers);
        Ok(())
    }
}

impl<M: ClusterManager + ?Sized> ClusterManager for &M {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn count(&self) -> usize {
        (**self).count()
    }
    fn launch(&self, ctx: &LaunchContext) -> Result<Box<dyn Launch>> {
        (**self).launch(ctx)
    }
    fn launch_timeout(&self) -> Duration {
        (**self).launch_timeout()
    }
    fn queue_timeout(&self) -> Option<Duration> {
        (**self).queue_timeout()
    }
    fn min_workers(&self) -> usize {
        (**self).min_workers()
    }
    fn added(&self, cluster: &super::Cluster, workers: &[super::WorkerInfo]) -> Result<()> {
        (**self).added(cluster, workers)
    }
}

/// What a manager started: watched while workers connect, stopped at shutdown.
pub trait Launch: Send {
    /// Cheap, non-blocking look at the launch (called about every 100 ms while workers
    /// connect; managers that ask a scheduler should cache the answer for a second or so).
    fn status(&mut self) -> LaunchStatus;
    /// Stops everything this launch started. Workers have been asked to exit already; wait
    /// up to `grace` for that, then force it (kill, cancel the job).
    fn stop(&mut self, grace: Duration);
    /// What is known about the launch for a timeout message (states, output tails).
    fn describe(&self) -> String {
        String::new()
    }
    /// The launch goes on without the workers of these indices (`min_workers`): remove
    /// what was started for them, if that can be done alone (stuck pods, array tasks).
    fn trim(&mut self, missing: &[u32]) {
        let _ = missing;
    }
    /// Ends the process of a worker that stopped answering, if this launch started it and
    /// can do that alone (a local child, a rank of a local `mpirun`). Returns whether it did.
    fn kill_worker(&mut self, worker: &super::WorkerInfo) -> bool {
        let _ = worker;
        false
    }
}

/// Everything a manager needs to start workers that will find this master.
#[derive(Debug, Clone)]
pub struct LaunchContext {
    id: u64,
    count: usize,
    listen: SocketAddr,
    advertise: IpAddr,
    secret: Secret,
    program: PathBuf,
}

impl LaunchContext {
    pub(crate) fn new(id: u64, count: usize, listen: SocketAddr, advertise: IpAddr, secret: Secret, program: PathBuf) -> Self {
        LaunchContext { id, count, listen, advertise, secret, program }
    }

    /// Identifies this launch (its workers carry it in their hello).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The cluster secret.
    pub(crate) fn secret(&self) -> Secret {
        self.secret
    }

    /// Number of workers to start.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The program to run: this process's own executable, so the worker has the same
    /// remote functions (the handshake checks it).
    pub fn program(&self) -> &std::path::Path {
        &self.program
    }

    /// `host:port` of the master for workers on other hosts.
    pub fn master_address(&self) -> String {
        SocketAddr::new(self.advertise, self.listen.port()).to_string()
    }

    /// The port the master listens on.
    pub fn master_port(&self) -> u16 {
        self.listen.port()
    }

    /// `host:port` of the master for workers on this host.
    pub fn local_master_address(&self) -> String {
        let ip = if self.listen.ip().is_unspecified() { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { self.listen.ip() };
        SocketAddr::new(ip, self.listen.port()).to_string()
    }

    /// Environment for worker `index` dialling `master` (one of the two addresses above).
    /// The secret is in it: pass it through the environment (which only its owner can read),
    /// never on a command line; where a scheduler stores job environments or scripts that
    /// other users may read, put it in a file instead (`launch::SecretFile::for_launch`).
    pub fn env(&self, index: u32, master: &str) -> Vec<(String, String)> {
        self.env_with_index(Index::Given(index), master)
    }

    /// Environment for a launch whose workers take their index from their MPI rank.
    pub fn env_by_rank(&self, master: &str) -> Vec<(String, String)> {
        self.env_with_index(Index::Rank, master)
    }

    /// Environment for a job array whose workers take their index from their task id
    /// (`SLURM_ARRAY_TASK_ID`, `SGE_TASK_ID`, `PBS_ARRAYID`, `PBS_ARRAY_INDEX` or
    /// `LSB_JOBINDEX`, counted from 1).
    pub fn env_by_task(&self, master: &str) -> Vec<(String, String)> {
        self.env_with_index(Index::Task, master)
    }

    /// Environment for workers started by hand, each taking the first index still free.
    pub fn env_by_arrival(&self, master: &str) -> Vec<(String, String)> {
        self.env_with_index(Index::Any, master)
    }

    fn env_with_index(&self, index: Index, master: &str) -> Vec<(String, String)> {
        vec![(ENV_MASTER.into(), master.into()), (ENV_SECRET.into(), self.secret.to_hex()), (ENV_LAUNCH.into(), launch_value(self.id, index))]
    }

    /// `env` with the secret replaced by the name of a file (or pipe, such as `/dev/stdin`)
    /// that holds it.
    pub fn secret_from(env: Vec<(String, String)>, file: &std::path::Path) -> Vec<(String, String)> {
        env.into_iter()
            .map(|(k, v)| if k == ENV_SECRET { (ENV_SECRET_FILE.to_string(), file.display().to_string()) } else { (k, v) })
            .collect()
    }
}
