//! Slurm: `sbatch` a job whose script runs `srun` (or `mpirun`); inside an allocation, start
//! the workers directly as a job step with `srun`. State from `squeue`, cancel with `scancel`.

use crate::error::{Error, Result};

use super::options::{check_owned, hms, keyword_flag};
use super::{BatchManager, CommandResult, Job, JobSpec, JobState, Layout, Scheduler, shell_quote};

/// Workers started through Slurm.
///
/// ```no_run
/// use std::time::Duration;
/// use clusterman::prelude::*;
/// use clusterman::launch::scheduler::{JobOptions, SlurmManager};
/// # fn main() -> clusterman::Result<()> {
/// let cluster = Cluster::new()?;
/// let slurm = SlurmManager::new(4)
///     .job(JobOptions::new().walltime(Duration::from_secs(600)).queue("debug"))
///     .option("exclusive", "")              // --exclusive
///     .option("mem_per_cpu", "100");        // --mem-per-cpu=100
/// println!("{}", slurm.job_script()?);       // what would be submitted
/// let pids = cluster.add_procs(&slurm)?;    // prints "slurm job 961 pending (12 s)" while queued
/// # Ok(()) }
/// ```
///
/// Inside an allocation (`SLURM_JOB_ID` and `SLURM_NTASKS` set, e.g. in an `sbatch` script)
/// it starts the workers as a job step with `srun` instead of submitting a job;
/// [`SlurmManager::in_allocation`] takes the worker count from the allocation.
pub type SlurmManager = BatchManager<Slurm>;

/// The Slurm dialect.
#[derive(Debug, Clone, Default)]
pub struct Slurm {
    options: Vec<(String, String)>,
    submit_always: bool,
}

/// Flags the manager sets itself, and what to use instead.
const OWNED: &[(&str, &str, &str)] = &[
    ("J", "job-name", "use JobOptions::name"),
    ("o", "output", "worker output reaches the master by itself; the job's own log goes to <workdir>/clusterman-logs/<name>-<job id>.out (place it with JobOptions::logs)"),
    ("n", "ntasks", "the worker count is SlurmManager::new(np)"),
    ("a", "array", "use JobOptions::layout(Layout::Array)"),
    ("D", "chdir", "use JobOptions::workdir"),
];

impl SlurmManager {
    /// `np` workers.
    pub fn new(np: usize) -> Self {
        BatchManager::with(np, Slurm::default())
    }

    /// As many workers as the allocation this program runs in has tasks (`SLURM_NTASKS`).
    pub fn in_allocation() -> Result<Self> {
        let tasks = allocation_tasks().ok_or_else(|| {
            Error::Launch("not inside a Slurm allocation (SLURM_JOB_ID and SLURM_NTASKS are not set): use SlurmManager::new(np), or run under sbatch/salloc".into())
        })?;
        Ok(Self::new(tasks))
    }

    /// A free-form `sbatch` option, translated like ClusterManagers.jl's keywords: a
    /// one-letter key becomes `-k value`, a longer one `--long-name=value` (`_` → `-`), an
    /// empty value a bare flag. Flags the manager sets itself are refused at launch.
    pub fn option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.scheduler.options.push((key.into(), value.into()));
        self
    }

    /// Submit a new job even inside an allocation (instead of a job step).
    pub fn submit_always(mut self) -> Self {
        self.scheduler.submit_always = true;
        self
    }
}

fn allocation_tasks() -> Option<usize> {
    std::env::var("SLURM_JOB_ID").or_else(|_| std::env::var("SLURM_JOBID")).ok()?;
    std::env::var("SLURM_NTASKS").ok()?.parse().ok()
}

impl Scheduler for Slurm {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn job(&self, spec: &JobSpec<'_>) -> Result<Job> {
        check_owned(&self.options, OWNED)?;
        let o = spec.options;
        let (wd, logs) = (o.workdir_or_current(), o.log_dir());
        let mut d = vec![format!("--job-name={}", o.name)];
        match o.layout_or_default() {
            Layout::Mpi => {
                d.push(format!("--output={logs}/{}-%j.out", o.name));
                d.push(format!("--ntasks={}", spec.workers));
            }
            Layout::Array => {
                d.push(format!("--output={logs}/{}-%A_%a.out", o.name));
                d.push(format!("--array=1-{}", spec.workers));
                d.push("--ntasks=1".into());
            }
        }
        d.push(format!("--chdir={wd}"));
        d.extend(o.cpus_per_worker.map(|c| format!("--cpus-per-task={c}")));
        d.extend(o.walltime.map(|t| format!("--time={}", hms(t))));
        d.extend(o.queue.as_ref().map(|q| format!("--partition={q}")));
        d.extend(o.account.as_ref().map(|a| format!("--account={a}")));
        d.extend(o.memory.as_ref().map(|m| format!("--mem={m}")));
        d.extend(self.options.iter().map(|(k, v)| keyword_flag(k, v).join(" ")));
        let mut script = String::from("#!/bin/bash\n");
        for directive in o.directives(d) {
            script.push_str(&format!("#SBATCH {directive}\n"));
        }
        let program = shell_quote(&spec.program);
        let launch = match o.layout_or_default() {
            Layout::Mpi => format!("exec {} {program}", o.launcher.as_deref().unwrap_or("srun")),
            Layout::Array => format!("exec {program}"),
        };
        script.push_str(&spec.body(&launch));
        Ok(Job { submit: vec!["sbatch".into(), "--parsable".into()], script })
    }

    fn step(&self, spec: &JobSpec<'_>) -> Result<Option<Vec<String>>> {
        if self.submit_always || spec.options.layout_or_default() != Layout::Mpi || allocation_tasks().is_none() {
            return Ok(None);
        }
        check_owned(&self.options, OWNED)?;
        let mut argv = vec!["srun".to_string(), format!("--ntasks={}", spec.workers), format!("--job-name={}", spec.options.name)];
        argv.extend(spec.options.cpus_per_worker.map(|c| format!("--cpus-per-task={c}")));
        argv.extend(self.options.iter().flat_map(|(k, v)| keyword_flag(k, v)));
        argv.push(spec.program.clone());
        Ok(Some(argv))
    }

    fn parse_job_id(&self, stdout: &str) -> Result<String> {
        // `sbatch --parsable` prints `<id>` or `<id>;<cluster>`
        let id = stdout.trim().split(';').next().unwrap_or_default();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::Launch(format!("unexpected sbatch output (no job id): {stdout:?}")));
        }
        Ok(id.to_string())
    }

    fn state_command(&self, id: &str) -> Vec<String> {
        ["squeue", "-h", "-j", id, "-t", "all", "-o", "%T|%r"].map(String::from).to_vec()
    }

    fn parse_state(&self, _id: &str, r: &CommandResult) -> JobState {
        if !r.success {
            return if r.stderr.contains("Invalid job id") {
                JobState::Finished("no longer known to Slurm".into())
            } else {
                JobState::Unknown(r.stderr.trim().to_string())
            };
        }
        let states: Vec<JobState> = r.stdout.lines().filter(|l| !l.trim().is_empty()).map(task_state).collect();
        JobState::of_tasks(states)
    }

    fn cancel_command(&self, id: &str) -> Vec<String> {
        vec!["scancel".into(), id.into()]
    }
}

/// Pending reasons that only a change of the job (or of the site's limits) can clear: the job
/// asks for more than its partition, QOS or account ever allows, or can never run as written.
fn never_clears(reason: &str) -> bool {
    let per_job_limit = (reason.starts_with("QOSMax") || reason.starts_with("AssocMax")) && reason.ends_with("PerJobLimit");
    per_job_limit
        || matches!(reason, "PartitionConfig" | "PartitionNodeLimit" | "PartitionTimeLimit" | "BadConstraints" | "InvalidAccount" | "InvalidQOS" | "DependencyNeverSatisfied")
}

/// One `STATE|REASON` line of `squeue -o %T|%r`.
fn task_state(line: &str) -> JobState {
    let (state, reason) = line.trim().split_once('|').unwrap_or((line.trim(), ""));
    let reason = if reason == "None" { "" } else { reason };
    match state {
        "PENDING" if never_clears(reason) => JobState::Stuck(format!("Slurm keeps it pending for {reason}, which waiting cannot clear (see `scontrol show job`); ask for less, or another partition or QOS")),
        "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESV_DEL_HOLD" | "SUSPENDED" => JobState::Pending(reason.to_string()),
        "RUNNING" | "CONFIGURING" => JobState::Running,
        other if reason.is_empty() => JobState::Finished(other.to_lowercase()),
        other => JobState::Finished(format!("{} ({reason})", other.to_lowercase())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::scheduler::JobOptions;
    use std::time::Duration;

    fn spec(options: &JobOptions) -> JobSpec<'_> {
        JobSpec { options, workers: 4, program: "/opt/app/bin/sim".into(), exports: vec![("CLUSTERMAN_MASTER".into(), "10.0.0.1:4000".into())] }
    }

    #[test]
    fn a_job_pending_for_a_limit_it_can_never_meet_is_stuck() {
        for reason in ["PartitionTimeLimit", "PartitionConfig", "QOSMaxCpuPerJobLimit", "AssocMaxWallDurationPerJobLimit"] {
            assert!(matches!(task_state(&format!("PENDING|{reason}")), JobState::Stuck(why) if why.contains(reason)), "{reason}");
        }
        for reason in ["Resources", "Priority", "QOSGrpCpuLimit", "ReqNodeNotAvail"] {
            assert_eq!(task_state(&format!("PENDING|{reason}")), JobState::Pending(reason.into()), "{reason} may clear");
        }
        let array = vec![JobState::Pending("Priority".into()), JobState::Stuck("x".into())];
        assert_eq!(JobState::of_tasks(array.clone()), JobState::Stuck("x".into()));
        assert_eq!(JobState::of_tasks([array, vec![JobState::Running]].concat()), JobState::Running, "running tasks may be enough (min_workers)");
    }

    #[test]
    fn golden_mpi_script() {
        let o = JobOptions::new().name("sim").workdir("/scratch/run").walltime(Duration::from_secs(300)).queue("debug").account("proj").memory("4G").cpus_per_worker(2).prologue("module load openmpi");
        let slurm = Slurm { options: vec![("exclusive".into(), "".into()), ("t".into(), "00:05:00".into())], submit_always: false };
        let job = slurm.job(&spec(&o)).unwrap();
        assert_eq!(job.submit, ["sbatch", "--parsable"]);
        assert_eq!(
            job.script,
            "#!/bin/bash
#SBATCH --job-name=sim
#SBATCH --output=/scratch/run/clusterman-logs/sim-%j.out
#SBATCH --ntasks=4
#SBATCH --chdir=/scratch/run
#SBATCH --cpus-per-task=2
#SBATCH --time=00:05:00
#SBATCH --partition=debug
#SBATCH --account=proj
#SBATCH --mem=4G
#SBATCH --exclusive
#SBATCH -t 00:05:00
export CLUSTERMAN_MASTER=10.0.0.1:4000
module load openmpi
exec srun /opt/app/bin/sim
"
        );
    }

    #[test]
    fn golden_array_script_with_skipped_and_extra_directives() {
        let o = JobOptions::new().workdir("/w").layout(Layout::Array).skip_directive("--output").extra_directive("--gres=gpu:1");
        let job = Slurm::default().job(&spec(&o)).unwrap();
        assert_eq!(
            job.script,
            "#!/bin/bash
#SBATCH --job-name=clusterman
#SBATCH --array=1-4
#SBATCH --ntasks=1
#SBATCH --chdir=/w
#SBATCH --gres=gpu:1
export CLUSTERMAN_MASTER=10.0.0.1:4000
exec /opt/app/bin/sim
"
        );
    }

    #[test]
    fn owned_flags_are_refused_with_the_flag_named() {
        let o = JobOptions::new();
        for key in ["o", "output", "J", "job_name", "n", "ntasks"] {
            let slurm = Slurm { options: vec![(key.into(), "x".into())], submit_always: false };
            let err = slurm.job(&spec(&o)).unwrap_err().to_string();
            assert!(err.contains(&format!("option `{key}` clashes with")), "{err}");
        }
    }

    #[test]
    fn job_ids_and_states_parse() {
        let s = Slurm::default();
        assert_eq!(s.parse_job_id("961\n").unwrap(), "961");
        assert_eq!(s.parse_job_id("961;cluster\n").unwrap(), "961");
        assert!(s.parse_job_id("sbatch: error: x").is_err());
        let ok = |stdout: &str| CommandResult { success: true, stdout: stdout.into(), stderr: String::new() };
        assert_eq!(s.parse_state("1", &ok("PENDING|Resources\n")), JobState::Pending("Resources".into()));
        assert_eq!(s.parse_state("1", &ok("PENDING|None\n")), JobState::Pending(String::new()));
        assert_eq!(s.parse_state("1", &ok("RUNNING|None\n")), JobState::Running);
        assert_eq!(s.parse_state("1", &ok("PENDING|None\nRUNNING|None\n")), JobState::Running, "an array with one task running");
        assert_eq!(s.parse_state("1", &ok("CANCELLED|None\n")), JobState::Finished("cancelled".into()));
        assert_eq!(s.parse_state("1", &ok("")), JobState::Finished("no longer in the queue".into()));
        let gone = CommandResult { success: false, stdout: String::new(), stderr: "slurm_load_jobs error: Invalid job id specified\n".into() };
        assert_eq!(s.parse_state("1", &gone), JobState::Finished("no longer known to Slurm".into()));
        let down = CommandResult { success: false, stdout: String::new(), stderr: "Unable to contact slurm controller\n".into() };
        assert!(matches!(s.parse_state("1", &down), JobState::Unknown(_)));
        assert_eq!(s.cancel_command("961"), ["scancel", "961"]);
    }
}
