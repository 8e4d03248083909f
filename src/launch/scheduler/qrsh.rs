//! Grid Engine through `qrsh`: one interactive `qrsh -now n` per worker, whose client runs
//! here as a child process; or, with a parallel environment, one `qrsh -pe` whose `mpirun`
//! starts every worker as a rank of one MPI world. No shared filesystem involved; stopping
//! the launch ends the `qrsh` clients and with them their jobs.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cluster::{Cluster, WorkerInfo};
use crate::error::{Error, Result};
use crate::launch::local::{STDIN, spawn_children};
use crate::launch::{ClusterManager, Launch, LaunchContext, LaunchStatus, MpiRanks, RankMap};
use crate::protocol::env::{ENV_LAUNCH, ENV_MASTER, ENV_MPI, ENV_SECRET};
use crate::sys;

use super::{CommandResult, JobOptions, JobState, Scheduler, Sge, mpi_rank_env, open_mpi_forwarding, run, shell_quote};

/// Workers started with one `qrsh` each.
///
/// ```no_run
/// # use clusterman::prelude::*;
/// use clusterman::launch::scheduler::QrshManager;
/// # fn main() -> clusterman::Result<()> {
/// let cluster = Cluster::new()?;
/// cluster.add_procs(QrshManager::new(2).qsub_flags(["-q", "all.q"]))?;
/// let world = QrshManager::new(4).pe("mpi");            // one MPI world: mpido! works on it
/// cluster.add_procs(&world)?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct QrshManager {
    np: usize,
    flags: Vec<String>,
    job: JobOptions,
    /// The parallel environment of an MPI world, if one.
    pe: Option<String>,
    ranks: RankMap,
}

impl QrshManager {
    /// `np` workers.
    pub fn new(np: usize) -> Self {
        QrshManager { np, flags: Vec::new(), job: JobOptions::default(), pe: None, ranks: RankMap::default() }
    }

    /// The workers form one MPI world: one `qrsh -pe <pe> <np>` whose `mpirun` (or
    /// [`JobOptions::launcher`]) starts them over the slots Grid Engine grants, so `mpido!`
    /// runs on them. The secret still travels through qrsh's standard input; the launcher
    /// passes it on to the ranks in their environment (`-x` for Open MPI, whose remote ranks
    /// get only what is named; MPICH forwards the whole environment).
    pub fn pe(mut self, pe: impl Into<String>) -> Self {
        self.pe = Some(pe.into());
        self
    }

    /// Extra `qrsh` arguments (like Julia's `qsub_flags`).
    pub fn qsub_flags<S: Into<String>>(mut self, flags: impl IntoIterator<Item = S>) -> Self {
        self.flags = flags.into_iter().map(Into::into).collect();
        self
    }

    /// Job name, working directory, environment, launch timeout, and the launcher of an MPI
    /// world (other options do not apply to qrsh).
    pub fn job(mut self, options: JobOptions) -> Self {
        self.job = options.with_defaults(&self.job);
        self
    }

    /// The `qrsh` command of each worker, or of the one MPI world (without its environment).
    pub fn command(&self) -> Vec<String> {
        let mut argv: Vec<String> = ["qrsh", "-now", "n", "-V", "-N"].map(String::from).to_vec();
        argv.push(self.job.name.clone());
        argv.extend(["-wd".to_string(), self.job.workdir_or_current()]);
        if let Some(pe) = &self.pe {
            argv.extend(["-pe".to_string(), pe.clone(), self.np.to_string()]);
        }
        argv.extend(self.flags.iter().cloned());
        let program = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default();
        argv.push(match &self.pe {
            // qrsh hands its command line to the job's shell: one line, read there
            Some(_) => self.mpi_script(&program),
            None => program,
        });
        argv
    }

    /// The job's shell line of an MPI world: the secret from standard input into the
    /// launcher's environment, then the launcher over `$NSLOTS`.
    fn mpi_script(&self, program: &str) -> String {
        let launcher = self.job.launcher.as_deref().unwrap_or("mpirun");
        let names = [ENV_SECRET, ENV_MASTER, ENV_LAUNCH, ENV_MPI].into_iter().chain(self.job.env.iter().map(|(k, _)| k.as_str()));
        // one line: qrsh hands its command line to the job's shell as one
        let forward = open_mpi_forwarding(launcher, names).replace('\n', "; ");
        format!("IFS= read -r {ENV_SECRET} && export {ENV_SECRET}; {forward}exec {launcher} \"$@\" -np $NSLOTS {}", shell_quote(program))
    }
}

impl MpiRanks for QrshManager {
    fn ranks(&self) -> &RankMap {
        &self.ranks
    }
}

impl ClusterManager for QrshManager {
    fn name(&self) -> &str {
        "qrsh"
    }

    fn count(&self) -> usize {
        self.np
    }

    fn launch(&self, ctx: &LaunchContext) -> Result<Box<dyn Launch>> {
        if !self.job.command_prefix.is_empty() {
            return Err(Error::Launch("QrshManager cannot run through a command prefix (qrsh forwards its own environment); run the master where qrsh works".into()));
        }
        let argv = self.command();
        let master = ctx.master_address();
        // -V forwards this environment to the job, where `qstat -j` shows it to every user:
        // the secret goes through qrsh's standard input instead
        let envs: Vec<Vec<(String, String)>> = match &self.pe {
            Some(_) => {
                let mut env: Vec<_> = ctx.env_by_rank(&master).into_iter().filter(|(k, _)| k != ENV_SECRET).collect();
                env.push(mpi_rank_env());
                vec![env]
            }
            None => (0..self.np).map(|i| LaunchContext::secret_from(ctx.env(i as u32, &master), Path::new(STDIN))).collect(),
        };
        let commands = envs
            .into_iter()
            .map(|env| {
                let mut cmd = Command::new(&argv[0]);
                cmd.args(&argv[1..]).envs(env).envs(self.job.env.iter().cloned());
                sys::die_with_master(&mut cmd);
                cmd
            })
            .collect();
        let clients = spawn_children(commands, "qrsh", Some(ctx))?;
        Ok(Box::new(QrshLaunch { clients, name: self.job.name.clone(), options: self.job.clone(), checked: None }))
    }

    fn added(&self, cluster: &Cluster, workers: &[WorkerInfo]) -> Result<()> {
        match self.pe {
            Some(_) => self.ranks.record(cluster, workers, self.np),
            None => Ok(()),
        }
    }

    fn launch_timeout(&self) -> Duration {
        self.job.launch_timeout
    }
}

/// The qrsh clients, and what Grid Engine says of their jobs while they wait in the queue:
/// the launch timeout counts from the start, as for batch jobs.
struct QrshLaunch {
    clients: Box<dyn Launch>,
    name: String,
    options: JobOptions,
    checked: Option<(Instant, LaunchStatus)>,
}

impl QrshLaunch {
    /// Queued while a job of this name waits (with Grid Engine's reason), else running.
    fn queue_state(&self) -> LaunchStatus {
        let sge = Sge::default();
        let text = |argv: &[String]| run(&self.options, argv, None).ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        let (Some(detail), Some(list)) = (text(&["qstat".into(), "-j".into(), self.name.clone()]), text(&sge.state_command(""))) else {
            return LaunchStatus::Running; // no answer: the clients' own state is all there is
        };
        let list = CommandResult { success: true, stdout: list, stderr: String::new() };
        for id in detail.lines().filter_map(|l| l.strip_prefix("job_number:")).map(str::trim) {
            if let JobState::Pending(_) = sge.parse_state(id, &list) {
                let why = sge.parse_pending_reason(&detail).map(|r| format!(" ({r})")).unwrap_or_default();
                return LaunchStatus::Queued(format!("qrsh job {id} pending{why}"));
            }
        }
        LaunchStatus::Running
    }
}

impl Launch for QrshLaunch {
    fn status(&mut self) -> LaunchStatus {
        let clients = self.clients.status();
        if clients != LaunchStatus::Running {
            return clients;
        }
        match &self.checked {
            Some((at, status)) if at.elapsed() < Duration::from_secs(2) => status.clone(),
            _ => {
                let status = self.queue_state();
                self.checked = Some((Instant::now(), status.clone()));
                status
            }
        }
    }

    fn stop(&mut self, grace: Duration) {
        self.clients.stop(grace);
    }

    fn describe(&self) -> String {
        self.clients.describe()
    }

    fn kill_worker(&mut self, worker: &WorkerInfo) -> bool {
        self.clients.kill_worker(worker)
    }
}
