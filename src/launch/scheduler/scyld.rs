//! Scyld ClusterWare (BProc): `bpsh -1 beomap --no-local --np N` picks the compute nodes,
//! then one `bpsh <node> <program>` per worker runs here as a child process; or, for one MPI
//! world, ClusterWare's `mpirun -np N --map <those nodes> <program>`. BProc carries the
//! environment to the node — the master's address, the secret and the worker's index travel
//! there, never on a command line. Stopping signals the workers through bpsh (or ends mpirun).

use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cluster::{Cluster, WorkerInfo};
use crate::error::{Error, Result};
use crate::launch::process::RunningLauncher;
use crate::launch::{ClusterManager, Launch, LaunchContext, LaunchStatus, MpiRanks, RankMap};
use crate::sys;

use super::{JobOptions, Layout, mpi_rank_env, run};

/// The operating-system pids of one launch's workers, by index (filled in once they connect).
type OsPids = Arc<Mutex<Vec<Option<u32>>>>;

/// Workers started with `bpsh` on the nodes `beomap` chooses.
///
/// ```no_run
/// use clusterman::prelude::*;
/// use clusterman::launch::scheduler::scyld::ScyldManager;
/// # fn main() -> clusterman::Result<()> {
/// let cluster = Cluster::new()?;
/// let pids = cluster.add_procs(ScyldManager::new(4))?;
/// # Ok(()) }
/// ```
///
/// Its workers are independent processes unless [`JobOptions::layout`] asks for
/// [`Layout::Mpi`]: then ClusterWare's own `mpirun` (BeoMPI, or [`JobOptions::launcher`])
/// starts them as the ranks of one world, on the nodes `beomap` chose (`--map 4:7:4`), and
/// `mpido!` runs on them:
///
/// ```no_run
/// # use clusterman::prelude::*;
/// # use clusterman::launch::scheduler::{JobOptions, Layout, scyld::ScyldManager};
/// # fn main() -> clusterman::Result<()> {
/// # let cluster = Cluster::new()?;
/// let world = ScyldManager::new(4).job(JobOptions::new().layout(Layout::Mpi));
/// cluster.add_procs(&world)?;
/// let sizes: Vec<i32> = clusterman::mpido!(world, |comm| comm.size())?;
/// # Ok(()) }
/// ```
///
/// Of [`JobOptions`] it uses the layout and launcher, the working directory (where the bpsh
/// clients or mpirun start), the extra environment, the launch timeout and the command prefix
/// (for `bpsh`, `beomap` and `mpirun`; the prefix must pass the environment on, as `env` does
/// and `ssh` does not). At shutdown, workers that do not exit when told (a call still running)
/// get `bpsh <node> kill -TERM <pid>`, then `-KILL`, on their node; an MPI world's `mpirun`
/// is ended instead, and its ranks with it.
#[derive(Debug, Clone)]
pub struct ScyldManager {
    np: usize,
    job: JobOptions,
    /// The pids of the launch that is waiting for its workers (`launch` → `added`).
    pending: Arc<Mutex<Option<OsPids>>>,
    ranks: RankMap,
}

impl ScyldManager {
    /// `np` workers.
    pub fn new(np: usize) -> Self {
        ScyldManager { np, job: JobOptions::default(), pending: Arc::default(), ranks: RankMap::default() }
    }

    /// Layout, launcher, working directory, environment, launch timeout and command prefix
    /// (other options do not apply to bpsh).
    pub fn job(mut self, options: JobOptions) -> Self {
        self.job = options.with_defaults(&self.job);
        self
    }

    /// The nodes `beomap` gives the workers, one per worker (`0:1:1:2` → `[0, 1, 1, 2]`).
    pub fn nodes(&self) -> Result<Vec<i32>> {
        let argv: Vec<String> = ["bpsh", "-1", "beomap", "--no-local", "--np"].iter().map(|s| s.to_string()).chain([self.np.to_string()]).collect();
        let fail = |why: String| Error::Launch(format!("node availability inaccessible (could not run beomap): {why}"));
        let out = run(&self.job, &argv, None).map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            return Err(fail(format!(
                "`{}` exited with {}: {}; check that bpsh and beomap work here, or run them through JobOptions::command_prefix",
                argv.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let nodes: Vec<i32> = text.trim().split(':').map(|n| n.trim().parse()).collect::<std::result::Result<_, _>>().map_err(|_| fail(format!("unexpected beomap output {:?} (expected node numbers joined by ':')", text.trim())))?;
        if nodes.len() != self.np {
            return Err(fail(format!("beomap gave {} nodes ({}) for {} workers", nodes.len(), text.trim(), self.np)));
        }
        Ok(nodes)
    }

    /// `bpsh <node> <args>` behind the command prefix.
    fn bpsh(&self, node: i32, args: impl IntoIterator<Item = String>) -> Vec<String> {
        self.job.command_prefix.iter().cloned().chain(["bpsh".to_string(), node.to_string()]).chain(args).collect()
    }

    /// The command that starts an MPI world on `nodes`, behind the command prefix:
    /// ClusterWare's `mpirun` places rank i on the i-th node of `--map`.
    fn mpirun(&self, nodes: &[i32], program: &str) -> Vec<String> {
        let map: Vec<String> = nodes.iter().map(i32::to_string).collect();
        let launcher = self.job.launcher.as_deref().unwrap_or("mpirun").split_whitespace().map(String::from);
        self.job.command_prefix.iter().cloned().chain(launcher).chain(["-np".to_string(), nodes.len().to_string(), "--map".into(), map.join(":"), program.into()]).collect()
    }

    /// Starts the workers as one MPI world: a single `mpirun` child, its ranks told to
    /// initialise MPI and to take their index from their rank.
    fn launch_world(&self, ctx: &LaunchContext, nodes: &[i32]) -> Result<Box<dyn Launch>> {
        let argv = self.mpirun(nodes, &ctx.program().display().to_string());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).envs(ctx.env_by_rank(&ctx.master_address())).envs([mpi_rank_env()]).envs(self.job.env.iter().cloned());
        if let Some(dir) = &self.job.workdir {
            cmd.current_dir(dir);
        }
        tracing::info!("starting {} ranks on Scyld nodes: {}", self.np, argv.join(" "));
        let name = &argv[self.job.command_prefix.len()]; // the launcher, not the prefix
        Ok(Box::new(RunningLauncher::start(cmd, name, Default::default())?))
    }
}

impl MpiRanks for ScyldManager {
    fn ranks(&self) -> &RankMap {
        &self.ranks
    }
}

impl ClusterManager for ScyldManager {
    fn name(&self) -> &str {
        "scyld"
    }

    fn count(&self) -> usize {
        self.np
    }

    fn launch(&self, ctx: &LaunchContext) -> Result<Box<dyn Launch>> {
        let nodes = self.nodes()?;
        if self.job.layout_asked() == Some(Layout::Mpi) {
            return self.launch_world(ctx, &nodes);
        }
        let os_pids: OsPids = Arc::new(Mutex::new(vec![None; self.np]));
        *self.pending.lock().expect("pending lock") = Some(os_pids.clone());
        let mut launch = ScyldLaunch { options: self.job.clone(), workers: Vec::new(), os_pids };
        let master = ctx.master_address();
        for (index, node) in nodes.into_iter().enumerate() {
            let argv = self.bpsh(node, [ctx.program().display().to_string()]);
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..]).envs(ctx.env(index as u32, &master)).envs(self.job.env.iter().cloned()).stdin(Stdio::null());
            if let Some(dir) = &self.job.workdir {
                cmd.current_dir(dir);
            }
            sys::die_with_master(&mut cmd);
            // on failure, dropping `launch` stops the clients already started
            let child = sys::spawn(cmd).map_err(|e| Error::io(format!("cannot run `{}` for worker {index}: is bpsh on PATH here? (or set JobOptions::command_prefix)", argv[0]), e))?;
            launch.workers.push(Bpsh { node, child, status: None });
        }
        Ok(Box::new(launch))
    }

    fn launch_timeout(&self) -> Duration {
        self.job.launch_timeout
    }

    fn added(&self, cluster: &Cluster, workers: &[WorkerInfo]) -> Result<()> {
        if self.job.layout_asked() == Some(Layout::Mpi) {
            return self.ranks.record(cluster, workers, self.np);
        }
        // every worker is needed (no min_workers), so index = position in pid order
        if let Some(slots) = self.pending.lock().expect("pending lock").take() {
            let mut slots = slots.lock().expect("os pids lock");
            if workers.len() == slots.len() {
                for (slot, w) in slots.iter_mut().zip(workers) {
                    *slot = Some(w.os_pid);
                }
            }
        }
        Ok(())
    }
}

/// One `bpsh` client and, once reaped, its exit status.
struct Bpsh {
    node: i32,
    child: Child,
    status: Option<ExitStatus>,
}

impl Bpsh {
    fn running(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status.is_none()
    }
}

/// The bpsh clients of one launch.
struct ScyldLaunch {
    options: JobOptions,
    workers: Vec<Bpsh>,
    os_pids: OsPids,
}

impl ScyldLaunch {
    /// Waits until every client has exited or `deadline` passes; true if all have.
    fn wait_all(&mut self, deadline: Instant) -> bool {
        loop {
            if self.workers.iter_mut().map(Bpsh::running).filter(|r| *r).count() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (a `kill` name: `TERM`, `KILL`) to the workers still running, on their
    /// nodes through bpsh; a worker that never reported its pid gets it through its client.
    fn signal(&mut self, signal: &str, local: libc::c_int) {
        let os_pids = self.os_pids.lock().expect("os pids lock").clone();
        for (index, w) in self.workers.iter_mut().enumerate() {
            if !w.running() {
                continue;
            }
            let Some(os_pid) = os_pids[index] else {
                sys::kill(w.child.id(), local);
                continue;
            };
            let argv = ["bpsh".to_string(), w.node.to_string(), "kill".into(), format!("-{signal}"), os_pid.to_string()];
            match run(&self.options, &argv, None) {
                Ok(out) if out.status.success() => {}
                Ok(out) => tracing::warn!("`{}` failed: {}", argv.join(" "), String::from_utf8_lossy(&out.stderr).trim()),
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }
}

impl Launch for ScyldLaunch {
    fn status(&mut self) -> LaunchStatus {
        for (index, w) in self.workers.iter_mut().enumerate() {
            // report each client's exit once (later calls only reap)
            if w.status.is_none() && !w.running() {
                let status = w.status.expect("just reaped");
                return LaunchStatus::Failed(format!("bpsh of worker {index} on node {} exited with {status} (its stderr is above)", w.node));
            }
        }
        LaunchStatus::Running
    }

    fn stop(&mut self, grace: Duration) {
        if self.wait_all(Instant::now() + grace) {
            return;
        }
        tracing::warn!("scyld workers still running after {grace:?}; terminating them through bpsh");
        self.signal("TERM", libc::SIGTERM);
        if self.wait_all(Instant::now() + Duration::from_secs(2)) {
            return;
        }
        self.signal("KILL", libc::SIGKILL);
        if !self.wait_all(Instant::now() + Duration::from_secs(2)) {
            for w in self.workers.iter_mut().filter(|w| w.status.is_none()) {
                sys::kill(w.child.id(), libc::SIGKILL);
                w.status = w.child.wait().ok();
            }
        }
    }

    fn describe(&self) -> String {
        let running: Vec<String> = self.workers.iter().filter(|w| w.status.is_none()).map(|w| w.node.to_string()).collect();
        format!("{} of {} bpsh clients still running (nodes {})", running.len(), self.workers.len(), running.join(", "))
    }

    fn kill_worker(&mut self, worker: &WorkerInfo) -> bool {
        let os_pids = self.os_pids.lock().expect("os pids lock").clone();
        let Some(index) = os_pids.iter().position(|p| *p == Some(worker.os_pid)) else { return false };
        let argv = ["bpsh".to_string(), self.workers[index].node.to_string(), "kill".into(), "-KILL".into(), worker.os_pid.to_string()];
        run(&self.options, &argv, None).is_ok_and(|out| out.status.success())
    }
}

impl Drop for ScyldLaunch {
    fn drop(&mut self) {
        // a launch that failed half-way (or was never stopped) leaves no client behind
        if self.workers.iter_mut().any(Bpsh::running) {
            self.stop(Duration::ZERO);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        // a one-line stand-in for bpsh: `sh -c <script> bpsh <node> ...`
        vec!["sh".into(), "-c".into(), script.into(), "bpsh".into()]
    }

    #[test]
    fn an_mpi_world_is_one_mpirun_over_the_beomap_nodes() {
        let m = ScyldManager::new(3).job(JobOptions::new().command_prefix(["env"]).layout(Layout::Mpi));
        assert_eq!(m.mpirun(&[4, 7, 4], "/bin/prog"), ["env", "mpirun", "-np", "3", "--map", "4:7:4", "/bin/prog"]);
        let m = m.job(JobOptions::new().command_prefix(["env"]).launcher("/opt/beompi/bin/mpirun --all_cpus"));
        assert_eq!(m.mpirun(&[0], "/bin/prog"), ["env", "/opt/beompi/bin/mpirun", "--all_cpus", "-np", "1", "--map", "0", "/bin/prog"]);
    }

    #[test]
    fn beomap_output_gives_one_node_per_worker() {
        let m = ScyldManager::new(4).job(JobOptions::new().command_prefix(sh("echo 0:1:1:2")));
        assert_eq!(m.nodes().unwrap(), [0, 1, 1, 2]);
        let err = ScyldManager::new(3).job(JobOptions::new().command_prefix(sh("echo 0:1"))).nodes().unwrap_err().to_string();
        assert!(err.contains("beomap gave 2 nodes (0:1) for 3 workers"), "{err}");
        let err = ScyldManager::new(1).job(JobOptions::new().command_prefix(sh("echo n1"))).nodes().unwrap_err().to_string();
        assert!(err.contains("unexpected beomap output \"n1\""), "{err}");
    }

    #[test]
    fn a_failing_beomap_is_named_with_its_stderr() {
        let m = ScyldManager::new(2).job(JobOptions::new().command_prefix(sh("echo 'beomap: no nodes are up' >&2; exit 1")));
        let err = m.nodes().unwrap_err().to_string();
        assert!(err.contains("node availability inaccessible (could not run beomap)") && err.contains("bpsh -1 beomap --no-local --np 2") && err.contains("beomap: no nodes are up") && err.contains("command_prefix"), "{err}");
    }

    #[test]
    fn bpsh_commands_go_through_the_prefix() {
        let m = ScyldManager::new(1).job(JobOptions::new().command_prefix(["env", "A=1"]));
        assert_eq!(m.bpsh(3, ["/bin/prog".to_string()]), ["env", "A=1", "bpsh", "3", "/bin/prog"]);
    }
}
