//! IBM Spectrum LSF: `bsub` a job array (`-J name[1-N]`) of independent workers, or one job
//! of `-n N` slots running `mpirun`. The script goes to `bsub` on stdin with `#BSUB`
//! directives. State from `bjobs`, cancel with `bkill`. Submission is retried, because
//! `bsub` fails now and then while LSF's daemons are busy or restarting.

use std::time::Duration;

use crate::error::{Error, Result};

use super::{BatchManager, CommandResult, Job, JobSpec, JobState, Layout, Scheduler, mpirun_lines, shell_quote};

/// Workers started through LSF's `bsub`.
///
/// `JobOptions::cpus_per_worker(c)` becomes `-R "affinity[core(c)]"`, which needs affinity
/// scheduling enabled at the site (not available on LSF Express): where it is not, leave
/// `cpus_per_worker` unset and ask for slots with `bsub_flags`.
///
/// ```no_run
/// use std::time::Duration;
/// use clusterman::prelude::*;
/// use clusterman::launch::scheduler::{JobOptions, Layout};
/// use clusterman::launch::scheduler::lsf::LsfManager;
/// # fn main() -> clusterman::Result<()> {
/// let cluster = Cluster::new()?;
/// let lsf = LsfManager::new(8)
///     .job(JobOptions::new().layout(Layout::Array).queue("short").command_prefix(["ssh", "login"]))
///     .bsub_flags(["-P", "scicompsoft"])
///     .retry_delays([1, 5, 30].map(Duration::from_secs)) // after .job(), which replaces them
///     .throttle(2);
/// let pids = cluster.add_procs(&lsf)?;
/// # Ok(()) }
/// ```
pub type LsfManager = BatchManager<Lsf>;

/// The LSF dialect.
#[derive(Debug, Clone, Default)]
pub struct Lsf {
    flags: Vec<String>,
    /// The site's `LSF_UNIT_FOR_LIMITS`, for LSF before 10.1.0.2 (memory without a unit).
    limits_unit: Option<LimitsUnit>,
}

/// The unit an LSF site reads memory limits in (`LSF_UNIT_FOR_LIMITS` in `lsf.conf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitsUnit {
    /// KB (LSF's default).
    Kb,
    /// MB.
    Mb,
    /// GB.
    Gb,
}

/// `bsub` flags the manager sets itself (or that would make `bsub` wait for the job), and
/// what to use instead.
const OWNED: &[(&str, &str)] = &[
    ("-J", "use JobOptions::name and JobOptions::layout"),
    ("-o", "worker output reaches the master by itself; the job's log goes to <workdir>/clusterman-logs/<name>.%J.out (place it with JobOptions::logs)"),
    ("-oo", "the job's log goes to <workdir>/clusterman-logs/<name>.%J.out (place it with JobOptions::logs)"),
    ("-e", "the job's standard error goes to its log, <workdir>/clusterman-logs/<name>.%J.out (place it with JobOptions::logs)"),
    ("-eo", "the job's standard error goes to its log, <workdir>/clusterman-logs/<name>.%J.out (place it with JobOptions::logs)"),
    ("-cwd", "use JobOptions::workdir"),
    ("-n", "the worker count is LsfManager::new(np); CPUs per worker are JobOptions::cpus_per_worker"),
    ("-K", "clusterman submits the job and watches it itself"),
    ("-I", "clusterman submits the job and watches it itself"),
    ("-Ip", "clusterman submits the job and watches it itself"),
    ("-Is", "clusterman submits the job and watches it itself"),
];

impl LsfManager {
    /// `np` workers. A transient submission failure (LSF's daemons briefly unavailable) is
    /// retried after 1, 2, 4 … 512 s (ten retries, like ClusterManagers.jl's
    /// `ExponentialBackOff(n=10)`); a refusal (a misspelt queue) fails at once.
    pub fn new(np: usize) -> Self {
        BatchManager::with(np, Lsf::default()).retry_delays((0..10).map(|i| Duration::from_secs(1 << i)))
    }

    /// Extra `bsub` arguments, as given on its command line (like Julia's `bsub_flags`).
    /// Flags the manager sets itself (`-J`, `-o`, `-e`, `-cwd`, `-n`...) are refused at launch.
    pub fn bsub_flags<S: Into<String>>(mut self, flags: impl IntoIterator<Item = S>) -> Self {
        self.scheduler.flags = flags.into_iter().map(Into::into).collect();
        self
    }

    /// For LSF before 10.1.0.2, which refuses a unit on memory sizes: write them as bare
    /// numbers in the site's `LSF_UNIT_FOR_LIMITS` (rounded up). By default sizes carry
    /// their unit (`-M 4GB`), which LSF 10.1.0.2 and later read whatever that setting.
    pub fn limits_unit(mut self, unit: LimitsUnit) -> Self {
        self.scheduler.limits_unit = Some(unit);
        self
    }

    /// Waits between submission attempts when `bsub` fails (empty: no retry). Set it after
    /// [`job`](BatchManager::job), which replaces every job option.
    pub fn retry_delays(mut self, delays: impl IntoIterator<Item = Duration>) -> Self {
        self.job = self.job.submit_retry_delays(delays);
        self
    }

    /// At most `n` LSF commands of this manager run at once. Set it after
    /// [`job`](BatchManager::job), which replaces every job option.
    pub fn throttle(mut self, n: usize) -> Self {
        self.job = self.job.throttle(n);
        self
    }
}

impl Scheduler for Lsf {
    fn name(&self) -> &'static str {
        "lsf"
    }

    fn transient(&self, failure: &CommandResult) -> bool {
        // what bsub prints while its daemons (LIM, mbatchd) are starting or overloaded
        let text = format!("{}{}", failure.stdout, failure.stderr);
        ["LIM", "mbatchd", "not responding", "LSF is down", "Please wait", "try again"].iter().any(|m| text.contains(m))
    }

    fn job(&self, spec: &JobSpec<'_>) -> Result<Job> {
        super::options::refuse_owned("bsub", &self.flags, OWNED)?;
        let o = spec.options;
        let (wd, logs) = (o.workdir_or_current(), o.log_dir());
        let mut d = match o.layout_or_default() {
            Layout::Mpi => vec![format!("-J {}", o.name), format!("-o {logs}/{}.%J.out", o.name)],
            // quoted as in LSF's manual: the brackets are part of the name
            Layout::Array => vec![format!("-J \"{}[1-{}]\"", o.name, spec.workers), format!("-o {logs}/{}.%J.%I.out", o.name)],
        };
        d.push(format!("-cwd {wd}"));
        if o.layout_or_default() == Layout::Mpi {
            d.push(format!("-n {}", spec.workers));
        }
        // needs the site's affinity scheduling (not on LSF Express; see LsfManager's docs)
        d.extend(o.cpus_per_worker.map(|c| format!("-R \"affinity[core({c})]\"")));
        // LSF's run limit is in minutes; round up so the job never gets less than asked
        d.extend(o.walltime.map(|t| format!("-W {}", t.as_secs().div_ceil(60).max(1))));
        d.extend(o.queue.as_ref().map(|q| format!("-q {q}")));
        d.extend(o.account.as_ref().map(|a| format!("-P {a}")));
        if let Some(m) = o.memory {
            let m = match self.limits_unit {
                Some(unit) => {
                    let shift = match unit {
                        LimitsUnit::Kb => 10,
                        LimitsUnit::Mb => 20,
                        LimitsUnit::Gb => 30,
                    };
                    m.as_bytes().div_ceil(1 << shift).max(1).to_string()
                }
                None => {
                    let (n, unit) = m.binary();
                    format!("{n}{unit}B")
                }
            };
            // -M is the enforced limit, rusage the reservation the scheduler plans with
            d.push(format!("-M {m}"));
            d.push(format!("-R \"rusage[mem={m}]\""));
        }
        let mut script = String::from("#!/bin/bash\n");
        for directive in o.directives(d) {
            script.push_str(&format!("#BSUB {directive}\n"));
        }
        let launch = match o.layout_or_default() {
            // LSF lists each host once per slot
            Layout::Mpi => mpirun_lines(spec, &spec.workers.to_string(), Some("\"$LSB_DJOB_HOSTFILE\"")),
            Layout::Array => format!("exec {}", shell_quote(&spec.program)),
        };
        script.push_str(&spec.body(&launch));
        let mut submit = vec!["bsub".to_string()];
        submit.extend(self.flags.iter().cloned());
        Ok(Job { submit, script })
    }

    fn parse_job_id(&self, stdout: &str) -> Result<String> {
        // `Job <123> is submitted to queue <normal>.`
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("Job <")?.split_once("> is submitted").map(|(id, _)| id))
            .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
            .map(str::to_string)
            .ok_or_else(|| Error::Launch(format!("unexpected bsub output (no job id): {stdout:?}")))
    }

    fn state_command(&self, id: &str) -> Vec<String> {
        // LSF's own table, which every version prints (`-o` needs 9.1): a header, then one
        // line per array element; -w keeps columns whole
        ["bjobs", "-w", id].map(String::from).to_vec()
    }

    fn parse_state(&self, id: &str, r: &CommandResult) -> JobState {
        if !r.success {
            return if r.stderr.contains("is not found") {
                JobState::Finished("no longer known to LSF".into())
            } else {
                JobState::Unknown(r.stderr.trim().to_string())
            };
        }
        let mut lines = r.stdout.lines().filter(|l| !l.trim().is_empty());
        let Some(column) = lines.next().and_then(|header| header.split_whitespace().position(|c| c == "STAT")) else {
            return JobState::Unknown(format!("unexpected bjobs output: {:?}", r.stdout.lines().next().unwrap_or_default()));
        };
        let states: Vec<JobState> = lines.filter_map(|l| l.split_whitespace().nth(column)).map(|s| element_state(id, s)).collect();
        JobState::of_tasks(states)
    }

    fn cancel_command(&self, id: &str) -> Vec<String> {
        vec!["bkill".into(), id.into()]
    }
}

/// One element's `STAT` column of `bjobs`.
fn element_state(id: &str, stat: &str) -> JobState {
    match stat {
        "PEND" | "WAIT" => JobState::Pending(String::new()),
        "PSUSP" => JobState::Pending("suspended while pending (PSUSP); see bjobs -l".into()),
        "USUSP" | "SSUSP" => JobState::Pending(format!("suspended ({stat})")),
        // PROV: dispatched to a power-saved host that is still waking up: not started yet
        "PROV" => JobState::Pending("its host is waking up (PROV)".into()),
        "RUN" => JobState::Running,
        "DONE" => JobState::Finished("done".into()),
        "EXIT" => JobState::Finished(format!("exited (EXIT; see bhist -l {id})")),
        "UNKWN" => JobState::Unknown("LSF lost contact with the job's host (UNKWN)".into()),
        other => JobState::Finished(other.to_lowercase()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::scheduler::{JobOptions, Memory};

    fn spec(options: &JobOptions) -> JobSpec<'_> {
        JobSpec::new(options, 3, "/opt/app/bin/sim", vec![("CLUSTERMAN_MASTER".into(), "10.0.0.1:4000".into())])
    }

    #[test]
    fn golden_mpi_script() {
        let o = JobOptions::new().name("sim").workdir("/w").walltime(Duration::from_secs(3601)).queue("normal").account("proj").memory(Memory::gib(2)).cpus_per_worker(2).prologue("module load openmpi");
        let job = Lsf { flags: vec!["-x".into()], ..Lsf::default() }.job(&spec(&o)).unwrap();
        assert_eq!(job.submit, ["bsub", "-x"]);
        assert_eq!(
            job.script,
            r#"#!/bin/bash
#BSUB -J sim
#BSUB -o /w/clusterman-logs/sim.%J.out
#BSUB -cwd /w
#BSUB -n 3
#BSUB -R "affinity[core(2)]"
#BSUB -W 61
#BSUB -q normal
#BSUB -P proj
#BSUB -M 2GB
#BSUB -R "rusage[mem=2GB]"
export CLUSTERMAN_MASTER=10.0.0.1:4000
module load openmpi
case "$(mpirun --version 2>&1)" in *'Open MPI'*) set -- -x CLUSTERMAN_MASTER ;; esac
exec mpirun "$@" -np 3 -hostfile "$LSB_DJOB_HOSTFILE" /opt/app/bin/sim
"#
        );
    }

    #[test]
    fn golden_array_script() {
        let o = JobOptions::new().workdir("/w").layout(Layout::Array).extra_directive("-G grp");
        let job = Lsf::default().job(&spec(&o)).unwrap();
        assert_eq!(job.submit, ["bsub"]);
        assert_eq!(
            job.script,
            r#"#!/bin/bash
#BSUB -J "clusterman[1-3]"
#BSUB -o /w/clusterman-logs/clusterman.%J.%I.out
#BSUB -cwd /w
#BSUB -G grp
export CLUSTERMAN_MASTER=10.0.0.1:4000
exec /opt/app/bin/sim
"#
        );
    }

    #[test]
    fn flags_clusterman_sets_are_refused_with_the_flag_named() {
        for flag in ["-J", "-o", "-e", "-cwd", "-n", "-K"] {
            let lsf = Lsf { flags: vec!["-P".into(), "proj".into(), flag.into(), "x".into()], ..Lsf::default() };
            let err = lsf.job(&spec(&JobOptions::new())).unwrap_err().to_string();
            assert!(err.contains(&format!("bsub flag {flag} clashes")), "{err}");
        }
    }

    #[test]
    fn default_retries_back_off_exponentially() {
        let delays = LsfManager::new(1).job.retry_delays().to_vec();
        assert_eq!(delays.len(), 10);
        assert_eq!((delays[0], delays[1], delays[9]), (Duration::from_secs(1), Duration::from_secs(2), Duration::from_secs(512)));
        assert!(LsfManager::new(1).retry_delays([]).job.retry_delays().is_empty());
    }

    #[test]
    fn job_ids_and_states_parse() {
        let s = Lsf::default();
        assert_eq!(s.parse_job_id("Job <123> is submitted to queue <normal>.\n").unwrap(), "123");
        assert_eq!(s.parse_job_id("Job <4> is submitted to default queue <short>.\n").unwrap(), "4");
        assert!(s.parse_job_id("normal: No such queue. Job not submitted.\n").is_err());
        let table = |stats: &[&str]| {
            let rows: String = stats.iter().map(|st| format!("1       alice   {st:<5} normal     login1      -           cman[1]    Dec  1 10:00\n")).collect();
            CommandResult { success: true, stdout: format!("JOBID   USER    STAT  QUEUE      FROM_HOST   EXEC_HOST   JOB_NAME   SUBMIT_TIME\n{rows}"), stderr: String::new() }
        };
        let ok = |stdout: &str| table(&stdout.split_whitespace().collect::<Vec<_>>());
        assert_eq!(s.parse_state("1", &ok("PEND \n")), JobState::Pending(String::new()));
        assert_eq!(s.parse_state("1", &ok("RUN  \n")), JobState::Running);
        assert_eq!(s.parse_state("1", &ok("PROV \n")), JobState::Pending("its host is waking up (PROV)".into()), "not started yet");
        assert_eq!(s.parse_state("1", &ok("DONE \nRUN  \nPEND \n")), JobState::Running, "an array with one element running");
        assert_eq!(s.parse_state("1", &ok("DONE \nDONE \n")), JobState::Finished("done".into()));
        assert!(matches!(s.parse_state("1", &ok("EXIT \n")), JobState::Finished(m) if m.contains("EXIT")));
        assert!(matches!(s.parse_state("1", &ok("PSUSP\n")), JobState::Pending(m) if m.contains("PSUSP")));
        assert!(matches!(s.parse_state("1", &ok("UNKWN\n")), JobState::Unknown(_)));
        let gone = CommandResult { success: false, stdout: String::new(), stderr: "Job <1> is not found\n".into() };
        assert_eq!(s.parse_state("1", &gone), JobState::Finished("no longer known to LSF".into()));
        let down = CommandResult { success: false, stdout: String::new(), stderr: "LSF is down. Please wait ...\n".into() };
        assert!(matches!(s.parse_state("1", &down), JobState::Unknown(_)));
        assert!(matches!(s.parse_state("1", &CommandResult { success: true, stdout: "garbage\n".into(), stderr: String::new() }), JobState::Unknown(_)));
        assert_eq!(s.state_command("7"), ["bjobs", "-w", "7"]);
        assert_eq!(s.cancel_command("7"), ["bkill", "7"]);
    }
}
