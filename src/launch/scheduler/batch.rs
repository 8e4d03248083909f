//! `BatchManager`: a [`ClusterManager`] for any [`Scheduler`] — it renders, submits and
//! watches one job, and records the MPI ranks of its workers.

use std::time::Duration;

use crate::cluster::{Cluster, WorkerInfo};
use crate::error::{Error, Result};
use crate::launch::process::RunningLauncher;
use crate::launch::{ClusterManager, Launch, LaunchContext, MpiRanks, RankMap, SecretFile};
use crate::protocol::env::{ENV_LAUNCH, ENV_MASTER, ENV_SECRET_FILE};

use super::{JobOptions, JobSpec, Layout, Scheduler, mpi_rank_env, submit};

/// Workers started by one job of scheduler `S`. Use it through the scheduler's alias, such
/// as [`SlurmManager`](super::SlurmManager) or [`SgeManager`](super::SgeManager).
#[derive(Debug, Clone)]
pub struct BatchManager<S> {
    pub(crate) np: usize,
    pub(crate) scheduler: S,
    pub(crate) job: JobOptions,
    ranks: RankMap,
}

impl<S: Scheduler + Clone + 'static> BatchManager<S> {
    pub(crate) fn with(np: usize, scheduler: S) -> Self {
        BatchManager { np, scheduler, job: JobOptions::default(), ranks: RankMap::default() }
    }

    /// Sets the common job options (name, walltime, queue, account, memory, timeouts...).
    /// What they leave unset keeps the manager's default (an HTCondor job array, LSF's
    /// submission retries).
    pub fn job(mut self, options: JobOptions) -> Self {
        self.job = options.with_defaults(&self.job);
        self
    }

    /// The job script that would be submitted (dry run). The secret is never in it: the
    /// workers read it from a file only you can read (`<secret-file>` here).
    pub fn job_script(&self) -> Result<String> {
        Ok(self.scheduler.job(&self.spec(placeholder_exports(&self.job)))?.script)
    }

    /// The submit command that would run (dry run), without the command prefix.
    pub fn submit_command(&self) -> Result<Vec<String>> {
        Ok(self.scheduler.job(&self.spec(placeholder_exports(&self.job)))?.submit)
    }

    fn spec(&self, exports: Vec<(String, String)>) -> JobSpec<'_> {
        let program = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "<program>".into());
        JobSpec::new(&self.job, self.np, program, exports)
    }
}

/// What a job script exports, with stand-ins for the values only a launch knows.
fn placeholder_exports(job: &JobOptions) -> Vec<(String, String)> {
    let index = if job.layout_or_default() == Layout::Mpi { "rank" } else { "task" };
    let mut env = vec![
        (ENV_MASTER.to_string(), "<master-address>".to_string()),
        (ENV_SECRET_FILE.to_string(), "<secret-file>".to_string()),
        (ENV_LAUNCH.to_string(), format!("<launch>:{index}")),
    ];
    if job.layout_or_default() == Layout::Mpi {
        env.push(mpi_rank_env());
    }
    env.extend(job.env.iter().cloned());
    env
}

/// The real exports of a launch: where to dial, the secret, the launch id and how a worker
/// finds its index (its MPI rank, or its array task), then the user's variables. The secret
/// itself is in them: a submitted job gets the name of a file instead.
fn exports(ctx: &LaunchContext, job: &JobOptions) -> Vec<(String, String)> {
    let master = ctx.master_address();
    let mut env = match job.layout_or_default() {
        Layout::Mpi => {
            let mut e = ctx.env_by_rank(&master);
            e.push(mpi_rank_env());
            e
        }
        Layout::Array => ctx.env_by_task(&master),
    };
    env.extend(job.env.iter().cloned());
    env
}

impl<S> MpiRanks for BatchManager<S> {
    fn ranks(&self) -> &RankMap {
        &self.ranks
    }
}

impl<S: Scheduler + Clone + 'static> ClusterManager for BatchManager<S> {
    fn name(&self) -> &str {
        self.scheduler.name()
    }

    fn count(&self) -> usize {
        self.np
    }

    fn launch(&self, ctx: &LaunchContext) -> Result<Box<dyn Launch>> {
        let env = exports(ctx, &self.job);
        let spec = self.spec(env.clone());
        if let Some(step) = self.scheduler.step(&spec)? {
            // inside an allocation: start the workers directly, as a job step
            tracing::info!("starting {} workers as a job step: {}", self.np, step.join(" "));
            let mut cmd = std::process::Command::new(&step[0]);
            cmd.args(&step[1..]).envs(env);
            return Ok(Box::new(RunningLauncher::start(cmd, &step[0], Default::default())?));
        }
        // Schedulers keep job scripts and environments where other users may read them
        // (Grid Engine's spool, `qstat -j`): the job names a file only its owner can read.
        let secret = SecretFile::for_launch(ctx, std::path::Path::new(&self.job.workdir_or_current()))?;
        let logs = self.scheduler.log_dir(&self.job);
        std::fs::create_dir_all(&logs).map_err(|e| Error::io(format!("cannot create the job log directory {logs} (JobOptions::logs)"), e))?;
        let job = self.scheduler.job(&self.spec(LaunchContext::secret_from(env, secret.path())))?;
        submit(Box::new(self.scheduler.clone()), &self.job, &job, Some(secret))
    }

    fn launch_timeout(&self) -> Duration {
        self.job.launch_timeout
    }

    fn queue_timeout(&self) -> Option<Duration> {
        self.job.queue_timeout
    }

    fn min_workers(&self) -> usize {
        self.job.min_workers.unwrap_or(self.np)
    }

    fn added(&self, cluster: &Cluster, workers: &[WorkerInfo]) -> Result<()> {
        match self.job.layout_or_default() {
            Layout::Mpi => self.ranks.record(cluster, workers, self.np),
            Layout::Array => Ok(()),
        }
    }
}
