//! Slurm: `sbatch` a job whose script runs `srun` (or `mpirun`); inside an allocation, start
//! the workers directly as a job step with `srun`. State from `squeue`, cancel with `scancel`.

use crate::error::{Error, Result};

use super::options::{JobOptions, check_owned, hms, keyword_flag};
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
///     .option("exclusive", "")              // srun --exclusive (and #SBATCH --exclusive)
///     .option("mem_per_cpu", 100)           // srun --mem-per-cpu=100 (and #SBATCH)
///     .option("mpi", "pmix")                // srun --mpi=pmix (srun only)
///     .sbatch_option("mail_type", "END");   // #SBATCH --mail-type=END only
/// println!("{}", slurm.job_script()?);       // what would be submitted
/// let pids = cluster.add_procs(&slurm)?;    // prints "slurm job 961 pending (12 s)" while queued
/// # Ok(()) }
/// ```
///
/// Keywords given with [`option`](BatchManager::option) are flags of the `srun` that starts
/// the workers, as in ClusterManagers.jl; those `sbatch` also knows reach the allocation too.
///
/// Inside an allocation (`SLURM_JOB_ID` and `SLURM_NTASKS` set, e.g. in an `sbatch` script)
/// it starts the workers as a job step with `srun` instead of submitting a job;
/// [`SlurmManager::in_allocation`] takes the worker count from the allocation.
pub type SlurmManager = BatchManager<Slurm>;

/// The Slurm dialect.
#[derive(Debug, Clone, Default)]
pub struct Slurm {
    /// Keywords: flags of `srun`, and of the allocation where `sbatch` knows them.
    options: Vec<(String, String)>,
    /// Flags of the allocation only (`#SBATCH` lines).
    sbatch_options: Vec<(String, String)>,
    submit_always: bool,
}

/// `srun` flags that `sbatch` refuses, or reads differently (`-o` is the batch script's log
/// to sbatch, `--wait` blocks sbatch, `--threads` abbreviates `--threads-per-core`): these go
/// on the `srun` line only. `(short, long)`; `""` where there is no short form.
const STEP_ONLY: &[(&str, &str)] = &[
    ("", "accel-bind"), ("", "bcast"), ("", "bcast-exclude"), ("", "compress"), ("", "cpu-bind"),
    ("X", "disable-status"), ("e", "error"), ("", "epilog"), ("", "exact"), ("", "external-launcher"),
    ("", "het-group"), ("I", "immediate"), ("i", "input"), ("", "jobid"), ("K", "kill-on-bad-exit"),
    ("l", "label"), ("", "mpi"), ("", "multi-prog"), ("Z", "no-allocate"), ("o", "output"),
    ("", "overlap"), ("E", "preserve-env"), ("", "prolog"), ("", "pty"), ("q", "quit-on-interrupt"),
    ("r", "relative"), ("", "resv-ports"), ("", "send-libs"), ("", "slurmd-debug"), ("", "task-epilog"),
    ("", "task-prolog"), ("", "tres-per-task"), ("T", "threads"), ("u", "unbuffered"), ("W", "wait"),
];

/// Whether keyword `key` is an `srun` flag that must not reach `sbatch`.
fn step_only(key: &str) -> bool {
    let long = key.replace('_', "-");
    STEP_ONLY.iter().any(|(short, l)| key == *short || long == *l)
}

/// Flags the manager sets itself, and what to use instead.
const OWNED: &[(&str, &str, &str)] = &[
    ("J", "job-name", "use JobOptions::name"),
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

    /// A flag of the `srun` that starts the workers, as ClusterManagers.jl's keywords: a
    /// one-letter key becomes `-k value`, a longer one `--long-name=value` (`_` → `-`), an
    /// empty value a bare flag. Where `sbatch` knows the flag too (`partition`, `t`,
    /// `mem_per_cpu`, `exclusive`, ...), it also reaches the allocation as an `#SBATCH` line;
    /// srun-only flags (`mpi`, `cpu_bind`, `unbuffered`, `kill_on_bad_exit`, `o`/`output`
    /// with Slurm's `%j`/`%t` patterns, ...) stay on the srun line. Flags the manager sets
    /// itself (`J`, `n`, `a`, `D`) are refused at launch.
    pub fn option(mut self, key: impl Into<String>, value: impl std::fmt::Display) -> Self {
        self.scheduler.options.push((key.into(), value.to_string()));
        self
    }

    /// A flag of the allocation only (an `#SBATCH` line, not an srun flag), by the same
    /// keyword rule: `sbatch_option("mail_type", "END")`. Inside an allocation, where the
    /// workers start as a job step, there is no new allocation and it is not used.
    pub fn sbatch_option(mut self, key: impl Into<String>, value: impl std::fmt::Display) -> Self {
        self.scheduler.sbatch_options.push((key.into(), value.to_string()));
        self
    }

    /// Submit a new job even inside an allocation (instead of a job step).
    pub fn submit_always(mut self) -> Self {
        self.scheduler.submit_always = true;
        self
    }
}

impl Slurm {
    fn check_owned(&self) -> Result<()> {
        check_owned(&self.options, OWNED)?;
        check_owned(&self.sbatch_options, OWNED)
    }

    /// Every keyword as an srun flag.
    fn srun_flags(&self) -> impl Iterator<Item = String> + '_ {
        self.options.iter().flat_map(|(k, v)| keyword_flag(k, v))
    }

    /// The command that starts `workers` workers of one MPI world, program not included:
    /// `srun --ntasks=N <keywords>` by default, or the launcher of [`JobOptions::launcher`]
    /// (its words: `srun --mpi=pmix`, or an `mpirun`, which gets `-np N` and no srun flags).
    fn launcher(&self, o: &JobOptions, workers: usize) -> Result<Vec<String>> {
        let mut argv: Vec<String> = o.launcher.as_deref().unwrap_or("srun").split_whitespace().map(String::from).collect();
        if is_srun(&argv) {
            argv.insert(1, format!("--ntasks={workers}"));
            argv.extend(self.srun_flags());
            return Ok(argv);
        }
        if let Some((key, _)) = self.options.iter().find(|(k, _)| step_only(k)) {
            return Err(Error::Launch(format!(
                "option `{key}` is a flag of srun, but the workers start with `{}` (JobOptions::launcher): drop the option, or let srun start them",
                argv.join(" ")
            )));
        }
        argv.extend(["-np".to_string(), workers.to_string()]);
        Ok(argv)
    }
}

/// Whether a launcher command is Slurm's `srun`.
fn is_srun(argv: &[String]) -> bool {
    argv.first().is_some_and(|p| std::path::Path::new(p).file_name().is_some_and(|f| f == "srun"))
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
        self.check_owned()?;
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
        d.extend(o.memory.map(|m| m.binary()).map(|(n, unit)| format!("--mem={n}{unit}")));
        let allocation = self.options.iter().filter(|(k, _)| !step_only(k)).chain(&self.sbatch_options);
        d.extend(allocation.map(|(k, v)| keyword_flag(k, v).join(" ")));
        let mut script = String::from("#!/bin/bash\n");
        for directive in o.directives(d) {
            script.push_str(&format!("#SBATCH {directive}\n"));
        }
        let mut launch = vec!["exec".to_string()];
        match o.layout_or_default() {
            Layout::Mpi => launch.extend(self.launcher(o, spec.workers)?.iter().map(|w| shell_quote(w))),
            // each array task is a one-task allocation: srun starts its worker with the flags
            Layout::Array => launch.extend(["srun".to_string()].into_iter().chain(self.srun_flags()).map(|w| shell_quote(&w))),
        }
        launch.push(spec.command());
        script.push_str(&spec.body(&launch.join(" ")));
        Ok(Job { submit: vec!["sbatch".into(), "--parsable".into()], script })
    }

    fn step(&self, spec: &JobSpec<'_>) -> Result<Option<Vec<String>>> {
        if self.submit_always || spec.options.layout_or_default() != Layout::Mpi || allocation_tasks().is_none() {
            return Ok(None);
        }
        self.check_owned()?;
        if !self.sbatch_options.is_empty() {
            tracing::warn!("sbatch options are not used: the workers start as a job step of the allocation this program runs in");
        }
        let mut argv = self.launcher(spec.options, spec.workers)?;
        if is_srun(&argv) {
            argv.insert(1, format!("--job-name={}", spec.options.name));
            argv.extend(spec.options.cpus_per_worker.map(|c| format!("--cpus-per-task={c}")));
        }
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
    use crate::launch::scheduler::{JobOptions, Memory};
    use std::time::Duration;

    impl Slurm {
        fn option(mut self, key: &str, value: impl std::fmt::Display) -> Self {
            self.options.push((key.into(), value.to_string()));
            self
        }
    }

    fn spec(options: &JobOptions) -> JobSpec<'_> {
        JobSpec::new(options, 4, "/opt/app/bin/sim", vec![("CLUSTERMAN_MASTER".into(), "10.0.0.1:4000".into())])
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
        let o = JobOptions::new().name("sim").workdir("/scratch/run").walltime(Duration::from_secs(300)).queue("debug").account("proj").memory(Memory::gib(4)).cpus_per_worker(2).prologue("module load openmpi");
        let slurm = Slurm::default().option("exclusive", "").option("t", "00:05:00").option("mpi", "pmix").option("o", "task-%j-%t.out");
        let slurm = Slurm { sbatch_options: vec![("mail_type".into(), "END".into())], ..slurm };
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
#SBATCH --mail-type=END
export CLUSTERMAN_MASTER=10.0.0.1:4000
module load openmpi
exec srun --ntasks=4 --exclusive -t 00:05:00 --mpi=pmix -o task-%j-%t.out /opt/app/bin/sim
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
exec srun /opt/app/bin/sim
"
        );
    }

    #[test]
    fn srun_only_keywords_never_reach_sbatch() {
        for key in ["mpi", "cpu_bind", "unbuffered", "u", "kill_on_bad_exit", "K", "o", "output", "wait", "threads", "label"] {
            assert!(step_only(key), "{key}");
        }
        for key in ["partition", "p", "t", "time", "mem_per_cpu", "exclusive", "nodes", "N", "gres", "constraint", "C"] {
            assert!(!step_only(key), "{key} is also a flag of the allocation");
        }
        let o = JobOptions::new().layout(Layout::Array);
        let script = Slurm::default().option("unbuffered", "").option("mem_per_cpu", 100).job(&spec(&o)).unwrap().script;
        assert!(script.contains("#SBATCH --mem-per-cpu=100\n") && !script.contains("#SBATCH --unbuffered"), "{script}");
        assert!(script.contains("exec srun --unbuffered --mem-per-cpu=100 /opt/app/bin/sim\n"), "array tasks carry the flags too: {script}");
    }

    #[test]
    fn an_mpirun_launcher_takes_no_srun_flags() {
        let o = JobOptions::new().launcher("mpirun");
        let script = Slurm::default().option("partition", "debug").job(&spec(&o)).unwrap().script;
        assert!(script.contains("#SBATCH --partition=debug\n") && script.contains("exec mpirun -np 4 /opt/app/bin/sim\n"), "{script}");
        let err = Slurm::default().option("mpi", "pmix").job(&spec(&o)).unwrap_err().to_string();
        assert!(err.contains("option `mpi` is a flag of srun") && err.contains("mpirun"), "{err}");
    }

    #[test]
    fn a_configured_launcher_starts_the_job_step() {
        let slurm = Slurm::default().option("cpu_bind", "cores");
        let o = JobOptions::new().name("sim").launcher("srun --mpi=pmix");
        let argv = slurm.launcher(&o, 4).unwrap();
        assert_eq!(argv, ["srun", "--ntasks=4", "--mpi=pmix", "--cpu-bind=cores"]);
        let o = JobOptions::new().launcher("/opt/slurm/bin/srun");
        assert_eq!(slurm.launcher(&o, 2).unwrap(), ["/opt/slurm/bin/srun", "--ntasks=2", "--cpu-bind=cores"]);
    }

    #[test]
    fn owned_flags_are_refused_with_the_flag_named() {
        let o = JobOptions::new();
        for key in ["J", "job_name", "n", "ntasks", "D", "chdir"] {
            for slurm in [Slurm::default().option(key, "x"), Slurm { sbatch_options: vec![(key.into(), "x".into())], ..Slurm::default() }] {
                let err = slurm.job(&spec(&o)).unwrap_err().to_string();
                assert!(err.contains(&format!("option `{key}` clashes with")), "{err}");
            }
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
