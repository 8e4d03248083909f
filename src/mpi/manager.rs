//! `MpiManager`: the workers of one MPI world, their pid↔rank maps, and `mpido!`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::mpi::Threading;
use serde::{Serialize, de::DeserializeOwned};

use crate::ids::Pid;
use crate::cluster::{Cluster, WorkerInfo};
use crate::codec;
use crate::error::{Error, RemoteError, Result};
use crate::launch::{ClusterManager, Launch, LaunchContext, MpiRanks, RankMap};
use crate::codec::{Bulk, HeldWords};
use crate::registry::{CallError, RemoteEntry, catch, encode_result, fn_id};

use super::launcher;
use crate::launch::process::RunningLauncher;
use super::{Comm, ENV_MPI, env};

/// Workers started as the ranks of one `mpirun` (mode 1: this program stays outside MPI),
/// or — from [`start_main_loop`](super::start_main_loop) — every rank of the world.
///
/// ```no_run
/// use clusterman::prelude::*;
/// use clusterman::mpi::MpiManager;
/// # fn main() -> clusterman::Result<()> {
/// clusterman::init();
/// let cluster = Cluster::new()?;
/// let mgr = MpiManager::new(4);
/// let pids = cluster.add_procs(&mgr)?;            // pids in rank order
/// let ranks: Vec<i32> = clusterman::mpido!(mgr, |comm| comm.rank())?;
/// assert_eq!(ranks, vec![0, 1, 2, 3]);
/// # Ok(()) }
/// ```
///
/// Ranks initialise MPI at the [`threading`](MpiManager::threading) level asked for
/// (default `Serialized`) and dial the master over TCP with their rank and world size in the
/// handshake. One manager launches once; several managers are separate MPI worlds.
#[derive(Debug, Clone)]
pub struct MpiManager {
    np: usize,
    launcher: Option<PathBuf>,
    flags: Vec<String>,
    threading: Threading,
    timeout: Duration,
    master_ip: Option<IpAddr>,
    ranks: RankMap,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
pub(crate) struct State {
    launched: bool,
    launcher_status: Arc<Mutex<Option<ExitStatus>>>,
    /// The all-rank modes' ranks, to shut the cluster down before the hooks run on drop.
    ranks: Option<RankMap>,
    /// Runs when the manager shuts down, after the workers are gone (all-rank modes).
    pub(crate) on_shutdown: Vec<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiState").field("launched", &self.launched).finish()
    }
}

impl MpiManager {
    /// As many ranks as the job allocation this program runs in has slots (Slurm, Grid
    /// Engine, PBS, LSF): MPIClusterManagers' `MPIWorkerManager()`, which takes no count.
    /// Outside an allocation, or where the scheduler does not say, an error that says to give
    /// the count with [`MpiManager::new`].
    pub fn from_allocation() -> Result<Self> {
        Self::sized_by(crate::launch::detect_allocation())
    }

    fn sized_by(allocation: Option<crate::launch::Allocation>) -> Result<Self> {
        match allocation {
            Some(crate::launch::Allocation { slots: Some(n), .. }) if n > 0 => Ok(Self::new(n)),
            Some(a) => Err(Error::Launch(format!(
                "the {} job {} does not say how many slots it has; give the number of ranks with MpiManager::new(n)",
                a.scheduler, a.job_id
            ))),
            None => Err(Error::Launch(
                "not inside a Slurm, Grid Engine, PBS or LSF job, so there is no allocation to size the MPI world by; give the number of ranks with MpiManager::new(n)".into(),
            )),
        }
    }

    /// `np` ranks, started by `mpiexec`/`mpirun` from `PATH`.
    pub fn new(np: usize) -> Self {
        MpiManager {
            np,
            launcher: None,
            flags: Vec::new(),
            threading: Threading::Serialized,
            timeout: Duration::from_secs(60),
            master_ip: None,
            ranks: RankMap::default(),
            state: Arc::default(),
        }
    }

    /// The launcher to run (like Julia's `mpiexec=`), e.g. `/usr/bin/mpiexec.mpich`.
    pub fn launcher(mut self, path: impl Into<PathBuf>) -> Self {
        self.launcher = Some(path.into());
        self
    }

    /// Extra launcher flags before the program (like Julia's `mpiflags=`), e.g.
    /// `["--oversubscribe", "--hostfile", "hosts"]`.
    pub fn flags<S: Into<String>>(mut self, flags: impl IntoIterator<Item = S>) -> Self {
        self.flags = flags.into_iter().map(Into::into).collect();
        self
    }

    /// MPI threading level the ranks ask for (default `Serialized`). `mpido!` bodies run on
    /// the thread that initialised MPI, so `Funneled` is enough unless your code starts
    /// threads that call MPI.
    pub fn threading(mut self, level: Threading) -> Self {
        self.threading = level;
        self
    }

    /// How long to wait for every rank to connect, counted from the launcher's start
    /// (default 60 s).
    pub fn launch_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The address ranks dial to reach the master (default: the cluster's advertised
    /// address, a non-loopback address of this host, so ranks on other nodes can reach it).
    pub fn master_address(mut self, ip: IpAddr) -> Self {
        self.master_ip = Some(ip);
        self
    }

    pub(crate) fn for_all_ranks(cluster: Cluster, ranks: impl IntoIterator<Item = (i32, Pid)>) -> Self {
        let mgr = MpiManager::new(0);
        mgr.ranks.set(cluster, ranks);
        let mut s = mgr.state();
        s.launched = true;
        s.ranks = Some(mgr.ranks.clone());
        drop(s);
        mgr
    }

    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("mpi state lock")
    }

    /// The MPI rank of cluster process `pid`, if it is one of this manager's.
    pub fn pid_to_rank(&self, pid: Pid) -> Option<i32> {
        self.ranks.pid_to_rank(pid)
    }

    /// The cluster pid of MPI rank `rank`.
    pub fn rank_to_pid(&self, rank: i32) -> Option<Pid> {
        self.ranks.rank_to_pid(rank)
    }

    /// The pids of this manager's ranks, ascending (in rank order).
    pub fn procs(&self) -> Vec<Pid> {
        self.ranks.procs()
    }

    /// This manager's ranks, ascending.
    pub fn mpi_procs(&self) -> Vec<i32> {
        self.ranks.mpi_procs()
    }

    /// A handle on the cluster these ranks belong to (after launch).
    pub fn cluster(&self) -> Option<Cluster> {
        self.ranks.cluster()
    }

    /// How the launcher (`mpirun`) exited, once it has.
    pub fn launcher_status(&self) -> Option<ExitStatus> {
        *self.state().launcher_status.lock().expect("status lock")
    }

    /// Stops this manager's ranks: each flushes its output, finalises MPI and exits 0; the
    /// launcher then exits. When every process is a rank (modes 2 and 3), this is the end
    /// of the program's MPI: the master's own MPI is finalised too. Idempotent.
    pub fn shutdown(&self) -> Result<()> {
        let hooks = std::mem::take(&mut self.state().on_shutdown);
        let pids = self.procs();
        let Some(cluster) = self.cluster() else { return Ok(()) };
        let result = if hooks.is_empty() {
            let mine: Vec<Pid> = pids.into_iter().filter(|p| cluster.workers().contains(p)).collect();
            let r = if mine.is_empty() { Ok(()) } else { cluster.rm_procs(&mine) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.launcher_status().is_none() && Instant::now() < deadline {
                cluster.reap_launches();
                std::thread::sleep(Duration::from_millis(10));
            }
            r
        } else {
            cluster.shutdown()
        };
        for hook in hooks {
            hook();
        }
        result
    }
}

impl Drop for State {
    fn drop(&mut self) {
        // the all-rank modes finalise MPI when their manager goes away without a shutdown
        let hooks = std::mem::take(&mut self.on_shutdown);
        if !hooks.is_empty() {
            drop(self.ranks.as_ref().and_then(RankMap::take_cluster)); // the owner: shuts down
        }
        for hook in hooks {
            hook();
        }
    }
}

impl MpiRanks for MpiManager {
    fn ranks(&self) -> &RankMap {
        &self.ranks
    }
}

impl ClusterManager for MpiManager {
    fn name(&self) -> &str {
        "mpirun"
    }

    fn count(&self) -> usize {
        self.np
    }

    fn launch(&self, ctx: &LaunchContext) -> Result<Box<dyn Launch>> {
        let status = {
            let mut s = self.state();
            if s.launched {
                return Err(Error::Launch("this MpiManager has already launched its ranks; create a new MpiManager for more workers (each is its own MPI world)".into()));
            }
            s.launched = true;
            s.launcher_status.clone()
        };
        let launcher = match &self.launcher {
            Some(l) => l.clone(),
            None => launcher::find_on_path().ok_or_else(|| Error::Launch("no mpiexec or mpirun on PATH: install Open MPI or MPICH, or set MpiManager::launcher".into()))?,
        };
        let kind = launcher::detect_kind(&launcher)?;
        let address = match self.master_ip {
            Some(ip) => SocketAddr::new(ip, ctx.master_port()).to_string(),
            None => ctx.master_address(),
        };
        let mut cmd = Command::new(&launcher);
        cmd.args(launcher::command_args(kind, self.np, &self.flags, ctx.program()));
        cmd.envs(ctx.env_by_rank(&address)).env(ENV_MPI, env::threading_name(self.threading));
        tracing::info!("starting {} ranks: {} {}", self.np, launcher.display(), launcher::command_args(kind, self.np, &self.flags, ctx.program()).join(" "));
        let running = RunningLauncher::start(cmd, "mpirun", status)?;
        Ok(Box::new(running))
    }

    fn launch_timeout(&self) -> Duration {
        self.timeout
    }

    fn added(&self, cluster: &Cluster, workers: &[WorkerInfo]) -> Result<()> {
        self.ranks.record(cluster, workers, self.np)
    }
}

/// Builds the registry entry of an `mpido!` body (used by the macro).
pub const fn mpido_entry<C, A, T>(name: &'static str, body: C) -> RemoteEntry
where
    C: Fn(&Comm, A) -> T + 'static,
    A: DeserializeOwned + 'static,
    T: Serialize + 'static,
{
    assert!(std::mem::size_of::<C>() == 0, "an mpido! body cannot capture variables: pass them as `|comm, name: Type|` parameters");
    std::mem::forget(body);
    RemoteEntry { name, signature: "mpido!", call: run_body::<C, A, T>, batch: no_batch, fold: no_fold }
}

fn run_body<C, A, T>(payload: &[u8], words: Option<Bulk>, out: &mut Vec<u8>) -> std::result::Result<Option<HeldWords>, CallError>
where
    C: Fn(&Comm, A) -> T + 'static,
    A: DeserializeOwned + 'static,
    T: Serialize + 'static,
{
    // SAFETY: `mpido_entry` checked at compile time that `C` is zero-sized: a closure that
    // captures nothing, so a value of it carries no data that could be invalid.
    let body: C = unsafe { std::mem::zeroed() };
    let fail = |message: String| CallError { message, location: None };
    let args: A = codec::decode_with(payload, words).map_err(|e| fail(format!("cannot decode the mpido! arguments: {e}")))?;
    let comm = env::world().map_err(|e| fail(e.to_string()))?;
    let value = catch(|| Ok(body(&comm, args)))?;
    encode_result(value, out)
}

fn no_batch(_: &[u8], _: &mut Vec<u8>) -> std::result::Result<(), CallError> {
    Err(CallError { message: "mpido! bodies cannot be used with pmap".into(), location: None })
}

fn no_fold(_: &[u8], _: &RemoteEntry, _: &mut Vec<u8>) -> std::result::Result<(), CallError> {
    Err(CallError { message: "mpido! bodies cannot be used with map_reduce".into(), location: None })
}

/// Runs a registered `mpido!` body on every rank of `mgr` (used by the macro): sends it to
/// the other ranks first, then runs it here if this process is a rank, so collectives meet.
/// `_body` only ties the result type to the body.
pub fn mpido_run<M, A, T, C, W>(mgr: &M, entry: &'static RemoteEntry, args: &A, _body: C) -> Result<Vec<T>>
where
    M: MpiRanks + ?Sized,
    A: Serialize + ?Sized,
    T: DeserializeOwned + 'static,
    C: Fn(&Comm, W) -> T,
{
    let (cluster, ranks) = mgr.ranks().entries().ok_or_else(|| Error::Unsupported("mpido!: this manager has no ranks yet; add_procs(&manager) first".into()))?;
    let payload = codec::encode(args)?;
    let id = fn_id(entry.name);
    let me = cluster.my_id();
    let mut pending = Vec::with_capacity(ranks.len());
    for &(rank, pid) in ranks.iter().filter(|(_, p)| *p != me) {
        pending.push((rank, cluster.call_with_payload::<T>(pid, id, &payload)));
    }
    let mut results: Vec<(i32, Result<T>)> = Vec::with_capacity(ranks.len());
    if let Some(&(rank, _)) = ranks.iter().find(|(_, p)| *p == me) {
        let mut out = Vec::new();
        let local = (entry.call)(&payload, None, &mut out)
            .map_err(|e| Error::Remote(RemoteError { pid: me, function: "mpido!".into(), message: e.message, location: e.location }))
            .and_then(|words| {
                if let Some(words) = words {
                    words.append_to(&mut out);
                }
                codec::decode::<T>(&out)
            });
        results.push((rank, local));
    }
    for (rank, fut) in pending {
        results.push((rank, fut.and_then(|f| f.fetch())));
    }
    results.sort_by_key(|(rank, _)| *rank);
    let mut values = Vec::with_capacity(results.len());
    let mut failures = Vec::new();
    for (rank, r) in results {
        match r {
            Ok(v) => values.push(v),
            Err(e) => failures.push((rank, e)),
        }
    }
    if failures.is_empty() { Ok(values) } else { Err(Error::Ranks(failures)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::{ClusterManager, detect_from};

    #[test]
    fn the_allocation_sizes_the_world_or_the_error_says_to_give_np() {
        let slurm = detect_from(|k| match k {
            "SLURM_JOB_ID" => Some("77".into()),
            "SLURM_NTASKS" => Some("6".into()),
            _ => None,
        });
        assert_eq!(MpiManager::sized_by(slurm).unwrap().count(), 6);
        let silent = detect_from(|k| (k == "LSB_JOBID").then(|| "5".to_string()));
        let err = MpiManager::sized_by(silent).unwrap_err().to_string();
        assert!(err.contains("lsf job 5 does not say") && err.contains("MpiManager::new(n)"), "{err}");
        assert!(MpiManager::sized_by(None).unwrap_err().to_string().contains("not inside a Slurm"));
    }
}
