//! PBS in its two dialects, Torque and PBS Pro (OpenPBS): `qsub` a job array (`-t 1-N`
//! under Torque, `-J 1-N` with `-r y` under PBS Pro) of independent workers, or one job of
//! N chunks running `mpirun`. The script goes to `qsub` on stdin with `#PBS` directives and
//! changes to the working directory itself (PBS starts jobs in `$HOME`). State from
//! `qstat -f`, cancel with `qdel`.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::error::{Error, Result};

use super::options::refuse_owned;
use super::options::hms;
use super::{BatchManager, CommandResult, Job, JobOptions, JobSpec, JobState, Layout, Scheduler, mpirun_lines, run, shell_quote};

/// Workers started through PBS's `qsub`.
///
/// ```no_run
/// use clusterman::prelude::*;
/// use clusterman::launch::scheduler::{JobOptions, Layout};
/// use clusterman::launch::scheduler::pbs::{PbsDialect, PbsManager};
/// # fn main() -> clusterman::Result<()> {
/// let cluster = Cluster::new()?;
/// // the dialect is detected from `qstat --version` unless given
/// let pbs = PbsManager::new(4).dialect(PbsDialect::PbsPro).qsub_flags(["-l", "place=scatter"]).wd("/scratch/run");
/// let pids = cluster.add_procs(&pbs)?;                      // one MPI world: mpido! works
/// let array = PbsManager::new(8).job(JobOptions::new().layout(Layout::Array));
/// # Ok(()) }
/// ```
pub type PbsManager = BatchManager<Pbs>;

/// Which PBS: they differ in array flags, resource syntax and array task variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PbsDialect {
    /// Torque (Adaptive Computing): `-t 1-N`, `-l nodes=N:ppn=C`, `$PBS_ARRAYID`.
    Torque,
    /// PBS Pro / OpenPBS (Altair): `-J 1-N` with `-r y`, `-l select=N:ncpus=C`,
    /// `$PBS_ARRAY_INDEX`.
    PbsPro,
}

/// The PBS dialect of a manager: chosen, or detected once from `qstat --version`.
#[derive(Debug, Clone, Default)]
pub struct Pbs {
    dialect: Option<PbsDialect>,
    detected: OnceLock<PbsDialect>,
    flags: Vec<String>,
    wd: Option<PathBuf>,
}

/// `qsub` flags the manager sets itself (or that would make `qsub` wait), and what to use
/// instead.
const OWNED: &[(&str, &str)] = &[
    ("-N", "use JobOptions::name"),
    ("-o", "worker output reaches the master by itself; the job's log goes to <workdir>/clusterman-logs/ (place it with JobOptions::logs)"),
    ("-e", "the job's standard error goes to its log (-j oe)"),
    ("-j", "the job's standard error goes to its log (-j oe)"),
    ("-t", "use JobOptions::layout(Layout::Array)"),
    ("-J", "use JobOptions::layout(Layout::Array)"),
    ("-d", "use PbsManager::wd or JobOptions::workdir"),
    ("-w", "use PbsManager::wd or JobOptions::workdir"),
    ("-I", "clusterman submits the job and watches it itself"),
];

impl PbsManager {
    /// `np` workers. Unless set with [`PbsManager::dialect`], the dialect is asked of
    /// `qstat --version` (through the command prefix) when the job is first rendered: at
    /// launch, or by `job_script()`.
    pub fn new(np: usize) -> Self {
        BatchManager::with(np, Pbs::default())
    }

    /// Torque or PBS Pro, instead of asking `qstat --version`.
    pub fn dialect(mut self, dialect: PbsDialect) -> Self {
        self.scheduler.dialect = Some(dialect);
        self
    }

    /// Extra `qsub` arguments, as given on its command line (like Julia's `qsub_flags`).
    /// Flags the manager sets itself (`-N`, `-o`, `-j`, `-t`/`-J`...) are refused at launch.
    pub fn qsub_flags<S: Into<String>>(mut self, flags: impl IntoIterator<Item = S>) -> Self {
        self.scheduler.flags = flags.into_iter().map(Into::into).collect();
        self
    }

    /// The job's working directory (like Julia's `wd`); it wins over
    /// [`JobOptions::workdir`].
    pub fn wd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.scheduler.wd = Some(dir.into());
        self
    }
}

impl Pbs {
    /// The chosen dialect, or the one `qstat --version` reports (asked once).
    fn dialect_for(&self, options: &JobOptions) -> Result<PbsDialect> {
        if let Some(d) = self.dialect.or_else(|| self.detected.get().copied()) {
            return Ok(d);
        }
        let out = run(options, &["qstat".into(), "--version".into()], None)?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let d = detect(&text).ok_or_else(|| {
            Error::Launch(format!("cannot tell Torque from PBS Pro by `qstat --version` ({}): choose with PbsManager::dialect", text.trim()))
        })?;
        Ok(*self.detected.get_or_init(|| d))
    }
}

/// The dialect from `qstat --version`: PBS Pro prints `pbs_version = 19.1.3`, Torque
/// `Version: 6.1.3` (Torque 2.x: `version: 2.5.13`).
fn detect(version: &str) -> Option<PbsDialect> {
    if version.contains("pbs_version") {
        Some(PbsDialect::PbsPro)
    } else if version.lines().any(|l| l.trim_start().to_ascii_lowercase().starts_with("version:")) {
        Some(PbsDialect::Torque)
    } else {
        None
    }
}

impl Scheduler for Pbs {
    fn name(&self) -> &'static str {
        "pbs"
    }

    /// The job's own working directory (`wd`) holds its logs too, unless they are placed.
    fn log_dir(&self, options: &JobOptions) -> String {
        match &self.wd {
            Some(wd) if !options.logs_placed() => format!("{}/clusterman-logs", wd.display()),
            _ => options.log_dir(),
        }
    }

    fn job(&self, spec: &JobSpec<'_>) -> Result<Job> {
        refuse_owned("qsub", &self.flags, OWNED)?;
        let o = spec.options;
        let dialect = self.dialect_for(o)?;
        let wd = self.wd.as_ref().map(|w| w.display().to_string()).unwrap_or_else(|| o.workdir_or_current());
        // a directory: Torque names the log <name>.o<seq> there (array tasks: -<index>), PBS
        // Pro <job id>.OU (subjobs: <seq>[<index>].<server>.OU)
        let mut d = vec![format!("-N {}", o.name), "-j oe".into(), format!("-o {}/", self.log_dir(o))];
        let cpus = o.cpus_per_worker.unwrap_or(1);
        // PBS's units: kb, mb, gb (binary); it refuses Gi-style spellings
        let mem = o.memory.map(|m| m.binary()).map(|(n, unit)| format!("{n}{}b", unit.to_ascii_lowercase()));
        let mem = mem.as_deref();
        match (dialect, o.layout_or_default()) {
            (PbsDialect::Torque, Layout::Mpi) => {
                d.push(format!("-l nodes={}:ppn={cpus}", spec.workers));
                d.extend(mem.map(|m| format!("-l pmem={m}"))); // per process, i.e. per worker
            }
            (PbsDialect::Torque, Layout::Array) => {
                d.push(format!("-t 1-{}", spec.workers));
                d.extend(o.cpus_per_worker.map(|c| format!("-l nodes=1:ppn={c}")));
                d.extend(mem.map(|m| format!("-l mem={m}")));
            }
            (PbsDialect::PbsPro, Layout::Mpi) => {
                let mem = mem.map(|m| format!(":mem={m}")).unwrap_or_default();
                d.push(format!("-l select={}:ncpus={cpus}:mpiprocs=1{mem}", spec.workers));
            }
            (PbsDialect::PbsPro, Layout::Array) => {
                // PBS Pro refuses a range that does not grow (`1-1`): one worker is `1-2:2`
                d.push(if spec.workers == 1 { "-J 1-2:2".to_string() } else { format!("-J 1-{}", spec.workers) });
                d.push("-r y".into()); // PBS Pro only runs arrays of rerunnable jobs
                if o.cpus_per_worker.is_some() || mem.is_some() {
                    d.push(format!("-l select=1:ncpus={cpus}{}", mem.map(|m| format!(":mem={m}")).unwrap_or_default()));
                }
            }
        }
        d.extend(o.walltime.map(|t| format!("-l walltime={}", hms(t))));
        d.extend(o.queue.as_ref().map(|q| format!("-q {q}")));
        d.extend(o.account.as_ref().map(|a| format!("-A {a}")));
        let mut script = String::from("#!/bin/bash\n");
        for directive in o.directives(d) {
            script.push_str(&format!("#PBS {directive}\n"));
        }
        script.push_str(&format!("cd {} || exit 1\n", shell_quote(&wd)));
        let launch = match (dialect, o.layout_or_default()) {
            // Torque lists each node once per processor (ppn): one line in `cpus` is one worker,
            // or Open MPI's by-slot placement would pack workers onto the first nodes
            (PbsDialect::Torque, Layout::Mpi) if cpus > 1 => {
                let hosts = format!("{}/hosts-\"$PBS_JOBID\"", shell_quote(&self.log_dir(o)));
                format!("sed -n '1~{cpus}p' \"$PBS_NODEFILE\" > {hosts}\n{}", mpirun_lines(spec, &spec.workers.to_string(), Some(&hosts)))
            }
            // PBS Pro lists each chunk once per MPI process (mpiprocs=1)
            (_, Layout::Mpi) => mpirun_lines(spec, &spec.workers.to_string(), Some("\"$PBS_NODEFILE\"")),
            (_, Layout::Array) => format!("exec {}", shell_quote(&spec.program)),
        };
        script.push_str(&spec.body(&launch));
        let mut submit = vec!["qsub".to_string()];
        submit.extend(self.flags.iter().cloned());
        Ok(Job { submit, script })
    }

    fn parse_job_id(&self, stdout: &str) -> Result<String> {
        // the whole line: `123.server`, or `123[].server` for an array
        let id = stdout.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default();
        if !id.starts_with(|c: char| c.is_ascii_digit()) || id.contains(char::is_whitespace) {
            return Err(Error::Launch(format!("unexpected qsub output (no job id): {stdout:?}")));
        }
        Ok(id.to_string())
    }

    fn state_command(&self, id: &str) -> Vec<String> {
        let mut argv = vec!["qstat".to_string(), "-f".into()];
        if id.contains("[]") {
            argv.push("-t".into()); // every array task, not just the array's summary
        }
        argv.push(id.into());
        argv
    }

    fn parse_state(&self, _id: &str, r: &CommandResult) -> JobState {
        if !r.success {
            return if r.stderr.contains("Unknown Job Id") {
                JobState::Finished("no longer known to PBS".into())
            } else if r.stderr.contains("Job has finished") {
                JobState::Finished("finished".into())
            } else {
                JobState::Unknown(r.stderr.trim().to_string())
            };
        }
        let states: Vec<JobState> = r.stdout.lines().filter_map(|l| l.trim().strip_prefix("job_state = ")).map(task_state).collect();
        JobState::of_tasks(states)
    }

    fn cancel_command(&self, id: &str) -> Vec<String> {
        vec!["qdel".into(), id.into()]
    }
}

/// One `job_state` letter of `qstat -f`, in either dialect.
fn task_state(state: &str) -> JobState {
    match state.trim() {
        "Q" => JobState::Pending(String::new()),
        "H" => JobState::Pending("on hold".into()),
        "W" => JobState::Pending("waiting for its start time".into()),
        "T" => JobState::Pending("being moved".into()),
        // PBS Pro: moved to another server, where it waits or runs on (not an end)
        "M" => JobState::Pending("moved to another server (M); `qstat -f <id>@<server>` shows it there".into()),
        "S" | "U" => JobState::Pending("suspended".into()),
        "R" | "B" => JobState::Running, // B: an array with tasks started (PBS Pro)
        "E" => JobState::Finished("exiting".into()),
        "C" => JobState::Finished("completed".into()),
        "F" => JobState::Finished("finished".into()),
        "X" => JobState::Finished("expired".into()),
        other => JobState::Finished(format!("in state {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::scheduler::Memory;
    use std::time::Duration;

    fn spec(options: &JobOptions) -> JobSpec<'_> {
        JobSpec::new(options, 3, "/opt/app/bin/sim", vec![("CLUSTERMAN_MASTER".into(), "10.0.0.1:4000".into())])
    }

    fn pbs(dialect: PbsDialect) -> Pbs {
        Pbs { dialect: Some(dialect), ..Pbs::default() }
    }

    fn full() -> JobOptions {
        JobOptions::new().name("sim").workdir("/w").walltime(Duration::from_secs(3600)).queue("batch").account("proj").memory(Memory::gib(2)).cpus_per_worker(2).prologue("module load openmpi")
    }

    #[test]
    fn golden_torque_mpi_script() {
        let job = Pbs { flags: vec!["-V".into()], ..pbs(PbsDialect::Torque) }.job(&spec(&full())).unwrap();
        assert_eq!(job.submit, ["qsub", "-V"]);
        assert_eq!(
            job.script,
            "#!/bin/bash
#PBS -N sim
#PBS -j oe
#PBS -o /w/clusterman-logs/
#PBS -l nodes=3:ppn=2
#PBS -l pmem=2gb
#PBS -l walltime=01:00:00
#PBS -q batch
#PBS -A proj
cd /w || exit 1
export CLUSTERMAN_MASTER=10.0.0.1:4000
module load openmpi
sed -n '1~2p' \"$PBS_NODEFILE\" > /w/clusterman-logs/hosts-\"$PBS_JOBID\"
case \"$(mpirun --version 2>&1)\" in *'Open MPI'*) set -- -x CLUSTERMAN_MASTER ;; esac
exec mpirun \"$@\" -np 3 -hostfile /w/clusterman-logs/hosts-\"$PBS_JOBID\" /opt/app/bin/sim
"
        );
    }

    #[test]
    fn golden_torque_array_script() {
        let o = JobOptions::new().workdir("/w").layout(Layout::Array);
        let job = Pbs { wd: Some("/runs/b".into()), ..pbs(PbsDialect::Torque) }.job(&spec(&o)).unwrap();
        assert_eq!(job.submit, ["qsub"]);
        assert_eq!(
            job.script,
            "#!/bin/bash
#PBS -N clusterman
#PBS -j oe
#PBS -o /runs/b/clusterman-logs/
#PBS -t 1-3
cd /runs/b || exit 1
export CLUSTERMAN_MASTER=10.0.0.1:4000
exec /opt/app/bin/sim
"
        );
    }

    #[test]
    fn a_pbs_pro_array_of_one_is_a_growing_range() {
        let o = JobOptions::new().workdir("/w").layout(Layout::Array);
        let one = JobSpec::new(&o, 1, "/opt/app/bin/sim", vec![]);
        assert!(pbs(PbsDialect::PbsPro).job(&one).unwrap().script.contains("#PBS -J 1-2:2\n"));
        assert!(pbs(PbsDialect::Torque).job(&one).unwrap().script.contains("#PBS -t 1-1\n"), "Torque takes 1-1");
    }

    #[test]
    fn golden_pbs_pro_scripts() {
        let job = pbs(PbsDialect::PbsPro).job(&spec(&full())).unwrap();
        assert_eq!(
            job.script,
            "#!/bin/bash
#PBS -N sim
#PBS -j oe
#PBS -o /w/clusterman-logs/
#PBS -l select=3:ncpus=2:mpiprocs=1:mem=2gb
#PBS -l walltime=01:00:00
#PBS -q batch
#PBS -A proj
cd /w || exit 1
export CLUSTERMAN_MASTER=10.0.0.1:4000
module load openmpi
case \"$(mpirun --version 2>&1)\" in *'Open MPI'*) set -- -x CLUSTERMAN_MASTER ;; esac
exec mpirun \"$@\" -np 3 -hostfile \"$PBS_NODEFILE\" /opt/app/bin/sim
"
        );
        let o = JobOptions::new().workdir("/w").layout(Layout::Array).memory(Memory::gib(1)).skip_directive("-j oe");
        let job = pbs(PbsDialect::PbsPro).job(&spec(&o)).unwrap();
        assert_eq!(
            job.script,
            "#!/bin/bash
#PBS -N clusterman
#PBS -o /w/clusterman-logs/
#PBS -J 1-3
#PBS -r y
#PBS -l select=1:ncpus=1:mem=1gb
cd /w || exit 1
export CLUSTERMAN_MASTER=10.0.0.1:4000
exec /opt/app/bin/sim
"
        );
    }

    #[test]
    fn flags_clusterman_sets_are_refused_with_the_flag_named() {
        for flag in ["-N", "-o", "-j", "-t", "-J", "-d"] {
            let p = Pbs { flags: vec!["-l".into(), "nodes=1".into(), flag.into(), "x".into()], ..pbs(PbsDialect::Torque) };
            let err = p.job(&spec(&JobOptions::new())).unwrap_err().to_string();
            assert!(err.contains(&format!("qsub flag {flag} clashes")), "{err}");
        }
    }

    #[test]
    fn the_dialect_is_told_by_qstat_version() {
        assert_eq!(detect("pbs_version = 19.1.3\n"), Some(PbsDialect::PbsPro));
        assert_eq!(detect("Version: 6.1.3\nCommit: 0c8ff3b\n"), Some(PbsDialect::Torque));
        assert_eq!(detect("version: 2.5.13\n"), Some(PbsDialect::Torque), "Torque 2.x writes it in lower case");
        assert_eq!(detect("qstat: invalid option -- '-'\n"), None);
    }

    #[test]
    fn job_ids_and_states_parse() {
        let s = pbs(PbsDialect::Torque);
        assert_eq!(s.parse_job_id("123.headnode\n").unwrap(), "123.headnode");
        assert_eq!(s.parse_job_id("124[].headnode\n").unwrap(), "124[].headnode");
        assert!(s.parse_job_id("qsub: submit error (Unknown queue  MSG=requested queue not found)\n").is_err());
        assert_eq!(s.state_command("123.h"), ["qstat", "-f", "123.h"]);
        assert_eq!(s.state_command("124[].h"), ["qstat", "-f", "-t", "124[].h"]);
        let ok = |stdout: &str| CommandResult { success: true, stdout: stdout.into(), stderr: String::new() };
        let full = |states: &[&str]| ok(&states.iter().enumerate().map(|(i, s)| format!("Job Id: 124[{i}].h\n    Job_Name = sim\n    job_state = {s}\n    queue = batch\n\n")).collect::<String>());
        assert_eq!(s.parse_state("1", &full(&["Q"])), JobState::Pending(String::new()));
        assert_eq!(s.parse_state("1", &full(&["H"])), JobState::Pending("on hold".into()));
        assert!(matches!(s.parse_state("1", &full(&["M"])), JobState::Pending(why) if why.contains("moved to another server")), "moved is not over");
        assert_eq!(s.parse_state("1", &full(&["C", "R", "Q"])), JobState::Running, "an array with one task running");
        assert_eq!(s.parse_state("1", &full(&["B", "X", "Q"])), JobState::Running, "a PBS Pro array that has begun");
        assert_eq!(s.parse_state("1", &full(&["C", "C"])), JobState::Finished("completed".into()));
        assert_eq!(s.parse_state("1", &full(&["F"])), JobState::Finished("finished".into()));
        let err = |stderr: &str| CommandResult { success: false, stdout: String::new(), stderr: stderr.into() };
        assert_eq!(s.parse_state("1", &err("qstat: Unknown Job Id 1.h\n")), JobState::Finished("no longer known to PBS".into()));
        assert_eq!(s.parse_state("1", &err("qstat: 1.h Job has finished, use -x or -H to obtain historical job information\n")), JobState::Finished("finished".into()));
        assert!(matches!(s.parse_state("1", &err("Connection refused\nqstat: cannot connect to server h (errno=111)\n")), JobState::Unknown(_)));
        assert_eq!(s.cancel_command("124[].h"), ["qdel", "124[].h"]);
    }
}
