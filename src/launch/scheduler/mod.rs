//! Batch schedulers. Each adapter is one file of the same shape — a [`Scheduler`]: render the
//! job (script text and submit command, a pure function), parse the job id, read the job's
//! state, cancel it. Everything else is shared here: submitting (optionally through a command
//! prefix such as `ssh login`), showing the job while it is queued, cancelling it on failure,
//! timeout, shutdown — and, through a small guard process, when the master dies.
//!
//! Workers still dial in. The secret is never in a job script, a job's environment or on a
//! command line (schedulers keep those where other users may read them): the script names a
//! file in the job's working directory that only its owner can read, written at submission
//! and deleted when the launch ends, or by the guard when the master dies.

mod batch;
pub mod htcondor;
pub mod kubernetes;
pub mod lsf;
pub mod options;
pub mod pbs;
mod qrsh;
pub mod scyld;
pub mod sge;
pub mod slurm;
mod whole_job;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::worker::UNREACHABLE_MASTER;
use crate::error::{Error, Result};

pub use super::shell::shell_quote;
use super::{Launch, LaunchStatus, SecretFile};
pub use batch::BatchManager;
use super::guard::CancelGuard;
pub use options::{JobOptions, Layout, Memory};
pub use htcondor::{HtCondor, HtCondorManager};
pub use kubernetes::KubernetesManager;
pub use lsf::{LimitsUnit, Lsf, LsfManager};
pub use pbs::{Pbs, PbsDialect, PbsManager};
pub use qrsh::QrshManager;
pub use scyld::ScyldManager;
pub use sge::{Sge, SgeManager};
pub use slurm::{Slurm, SlurmManager};

/// A job scheduler's command-line dialect.
pub trait Scheduler: Send + Sync {
    /// Short name (`slurm`, `sge`), used in messages and default job names.
    fn name(&self) -> &'static str;
    /// The job to submit for `spec` (pure: also what `job_script()` shows).
    fn job(&self, spec: &JobSpec<'_>) -> Result<Job>;
    /// The job id in the submit command's standard output.
    fn parse_job_id(&self, stdout: &str) -> Result<String>;
    /// The command whose output tells the job's state.
    fn state_command(&self, id: &str) -> Vec<String>;
    /// The job's state from that command's result.
    fn parse_state(&self, id: &str, result: &CommandResult) -> JobState;
    /// The command that cancels the job.
    fn cancel_command(&self, id: &str) -> Vec<String>;
    /// Where the job's own logs go (see [`JobOptions::logs`]).
    fn log_dir(&self, options: &JobOptions) -> String {
        options.log_dir()
    }
    /// For a scheduler whose state command does not say why a job waits: the command that
    /// does, asked while the job is pending. Default: none.
    fn pending_reason_command(&self, id: &str) -> Option<Vec<String>> {
        let _ = id;
        None
    }
    /// Why the job waits, from that command's standard output.
    fn parse_pending_reason(&self, stdout: &str) -> Option<String> {
        let _ = stdout;
        None
    }
    /// Whether a failed submission is worth trying again (a daemon briefly unavailable), as
    /// opposed to a refusal that will not change. Default: never.
    fn transient(&self, failure: &CommandResult) -> bool {
        let _ = failure;
        false
    }
    /// The command that removes the workers with these indices (0-based) from a job that
    /// goes on without them (`min_workers`), or `None` if they cannot be removed alone.
    fn trim_command(&self, id: &str, missing: &[u32]) -> Option<Vec<String>> {
        let _ = (id, missing);
        None
    }
    /// Inside an allocation this scheduler can start the workers directly (a Slurm job step)
    /// instead of submitting a job: the command, or `None` to submit.
    fn step(&self, spec: &JobSpec<'_>) -> Result<Option<Vec<String>>> {
        let _ = spec;
        Ok(None)
    }
}

/// What a scheduler command printed.
#[derive(Debug, Clone, Default)]
pub struct CommandResult {
    /// It exited with status 0.
    pub success: bool,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// What an adapter renders a job from.
#[derive(Debug)]
pub struct JobSpec<'a> {
    /// Common options.
    pub options: &'a JobOptions,
    /// Number of workers.
    pub workers: usize,
    /// The program every worker runs (the master's own binary).
    pub program: String,
    /// Its arguments (none for workers; a program that runs as a whole job keeps its own).
    pub args: Vec<String>,
    /// The workers' environment: `export` lines at the top of the script.
    pub exports: Vec<(String, String)>,
    /// Where the launch line's output and exit status go, when the job reports them back
    /// (see [`BatchManager::run_as_job`]).
    pub report: Option<Report>,
}

/// Files a job writes for the process that submitted it: the launch's output and its exit
/// status.
#[derive(Debug, Clone)]
pub struct Report {
    /// The output of every rank (standard output and error).
    pub output: String,
    /// The launcher's exit status, written when it ends.
    pub status: String,
}

impl<'a> JobSpec<'a> {
    /// A job of `workers` copies of `program` with no arguments and nothing reported back.
    pub fn new(options: &'a JobOptions, workers: usize, program: impl Into<String>, exports: Vec<(String, String)>) -> Self {
        JobSpec { options, workers, program: program.into(), args: Vec::new(), exports, report: None }
    }

    /// The program and its arguments, quoted for the shell.
    pub fn command(&self) -> String {
        std::iter::once(&self.program).chain(&self.args).map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ")
    }

    /// The script lines after the directives: exports, prologue, then `launch` (whose last
    /// line, when the job reports back, runs without `exec`, into the report's files).
    pub fn body(&self, launch: &str) -> String {
        let mut body = export_lines(&self.exports);
        for line in &self.options.prologue {
            body.push_str(line);
            body.push('\n');
        }
        match &self.report {
            None => body.push_str(launch),
            Some(report) => {
                let (before, last) = launch.rsplit_once('\n').unwrap_or(("", launch));
                if !before.is_empty() {
                    body.push_str(before);
                    body.push('\n');
                }
                let last = last.strip_prefix("exec ").unwrap_or(last);
                body.push_str(&format!("{last} > {} 2>&1\necho $? > {}", shell_quote(&report.output), shell_quote(&report.status)));
            }
        }
        body.push('\n');
        body
    }
}

/// A rendered job: the submit command and the script it reads on stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The submit command (without the command prefix).
    pub submit: Vec<String>,
    /// The job script, given to the submit command on stdin.
    pub script: String,
}

/// A job's state, as the scheduler reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Waiting to start; the text is the scheduler's reason, if any.
    Pending(String),
    /// Waiting for a reason that waiting cannot clear (it asks for more than its partition
    /// or QOS ever allows); the text says which.
    Stuck(String),
    /// Started.
    Running,
    /// Over (completed, cancelled, or gone from the queue).
    Finished(String),
    /// The state could not be read (the text says why); try again later.
    Unknown(String),
}

impl JobState {
    /// The state of a job from the states of its tasks (an array, or one job's lines): running
    /// if any task runs, else pending (or unknown) if any may still start, else the first
    /// task's end; no tasks at all means the job has left the queue.
    pub fn of_tasks(tasks: Vec<JobState>) -> JobState {
        if tasks.contains(&JobState::Running) {
            return JobState::Running;
        }
        if let Some(stuck) = tasks.iter().find(|s| matches!(s, JobState::Stuck(_))) {
            return stuck.clone();
        }
        if let Some(waiting) = tasks.iter().find(|s| matches!(s, JobState::Pending(_) | JobState::Unknown(_))) {
            return waiting.clone();
        }
        tasks.into_iter().next().unwrap_or_else(|| JobState::Finished("no longer in the queue".into()))
    }
}

/// The lines of a job script that start the workers as one MPI world of `np` ranks (a shell
/// word: `3`, `$NSLOTS`) with the job's launcher (default `mpirun`):
/// - Open MPI's ranks on other nodes get only the variables named with `-x`, so the script
///   names the job's (MPICH's Hydra passes the whole environment on by itself);
/// - `hostfile` (a shell word: `"$PBS_NODEFILE"`) places them on the job's nodes: Open MPI and
///   MPICH both read `-hostfile`, and without it an Open MPI built without the scheduler's
///   library starts every rank on the job's first node.
///
/// A launcher that is neither `mpirun` nor `mpiexec` gets neither.
pub(crate) fn mpirun_lines(spec: &JobSpec<'_>, np: &str, hostfile: Option<&str>) -> String {
    let launcher = spec.options.launcher.as_deref().unwrap_or("mpirun");
    let name = launcher.split_whitespace().next().and_then(|p| std::path::Path::new(p).file_name()).map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    if !(name.starts_with("mpirun") || name.starts_with("mpiexec")) {
        return format!("exec {launcher} -np {np} {}", spec.command());
    }
    let hosts = hostfile.map(|h| format!(" -hostfile {h}")).unwrap_or_default();
    format!("{}exec {launcher} \"$@\" -np {np}{hosts} {}", open_mpi_forwarding(launcher, spec.exports.iter().map(|(k, _)| k.as_str())), spec.command())
}

/// A shell line that, when `launcher` is Open MPI's, sets the script's arguments to `-x NAME`
/// for each of `names` (to be passed as `"$@"`).
pub(crate) fn open_mpi_forwarding<'a>(launcher: &str, names: impl IntoIterator<Item = &'a str>) -> String {
    let forward: Vec<String> = names.into_iter().map(|n| format!("-x {n}")).collect();
    format!("case \"$({launcher} --version 2>&1)\" in *'Open MPI'*) set -- {} ;; esac\n", forward.join(" "))
}

/// The variable that tells a worker started as an MPI rank by a scheduler's launcher to
/// initialise MPI first, and at which threading level.
pub(crate) fn mpi_rank_env() -> (String, String) {
    (crate::protocol::env::ENV_MPI.to_string(), "serialized".to_string())
}

/// The environment lines every job script starts with (values shell-quoted).
pub(crate) fn export_lines(exports: &[(String, String)]) -> String {
    exports.iter().map(|(k, v)| format!("export {k}={}\n", shell_quote(v))).collect()
}

/// Runs a scheduler command (behind the prefix, within the throttle), feeding `stdin`.
/// Errors name the command, the prefix option when the command is missing, and include the
/// command's stderr.
pub(crate) fn run(options: &JobOptions, argv: &[String], stdin: Option<&str>) -> Result<std::process::Output> {
    let _slot = options.throttle.as_ref().map(|t| t.acquire());
    let prefix = &options.command_prefix;
    let full: Vec<&String> = prefix.iter().chain(argv).collect();
    let (program, args) = full.split_first().ok_or_else(|| Error::Launch("empty scheduler command".into()))?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().map_err(|e| {
        let hint = if prefix.is_empty() {
            "is it installed and on PATH here? If the scheduler's commands live on another host, submit through it with JobOptions::command_prefix (e.g. [\"ssh\", \"login-node\"])".to_string()
        } else {
            format!("check JobOptions::command_prefix ({})", prefix.join(" "))
        };
        Error::io(format!("cannot run `{program}`: {hint}"), e)
    })?;
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("piped");
        // a command that exits without reading (missing behind `env`, refusing at once) is
        // reported by its exit status and stderr below, not by the broken pipe
        match pipe.write_all(text.as_bytes()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(Error::io(format!("writing the job script to `{program}`"), e)),
            _ => {}
        }
    }
    child.wait_with_output().map_err(|e| Error::io(format!("waiting for `{program}`"), e))
}

/// Submits `job` (a transient failure is retried after `options.submit_retry_delays`),
/// returns the running launch with its cancel guard, which also removes `secret`.
pub(crate) fn submit(scheduler: Box<dyn Scheduler>, options: &JobOptions, job: &Job, secret: Option<SecretFile>) -> Result<Box<dyn Launch>> {
    let mut delays = options.retry_delays().iter();
    let out = loop {
        let out = run(options, &job.submit, Some(&job.script))?;
        if out.status.success() {
            break out;
        }
        let failure = CommandResult {
            success: false,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        let why = format!("{} refused the job ({}): {}", job.submit[0], out.status, failure.stderr.trim());
        match delays.next().filter(|_| scheduler.transient(&failure)) {
            Some(delay) => {
                tracing::warn!("{why}; trying again in {delay:?}");
                std::thread::sleep(*delay);
            }
            None => return Err(Error::Launch(why)),
        }
    };
    let id = scheduler.parse_job_id(&String::from_utf8_lossy(&out.stdout))?;
    let cancel: Vec<String> = options.command_prefix.iter().cloned().chain(scheduler.cancel_command(&id)).collect();
    let guard = CancelGuard::start(&cancel, secret.as_ref().map(SecretFile::path)).map_err(|e| Error::io("starting the job's cancel guard", e))?;
    tracing::info!("submitted {} job {id}", scheduler.name());
    Ok(Box::new(BatchJob { scheduler, id, options: options.clone(), guard: Some(guard), last: None, started: false, _secret: secret }))
}

/// A submitted job.
struct BatchJob {
    scheduler: Box<dyn Scheduler>,
    id: String,
    options: JobOptions,
    guard: Option<CancelGuard>,
    last: Option<(Instant, LaunchStatus)>,
    started: bool,
    /// Deleted with the launch.
    _secret: Option<SecretFile>,
}

impl BatchJob {
    fn query(&self) -> JobState {
        let state = match run(&self.options, &self.scheduler.state_command(&self.id), None) {
            Ok(out) => self.scheduler.parse_state(&self.id, &CommandResult {
                success: out.status.success(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }),
            Err(e) => JobState::Unknown(e.to_string()),
        };
        match (state, self.scheduler.pending_reason_command(&self.id)) {
            (JobState::Pending(reason), Some(argv)) if reason.is_empty() => {
                let why = run(&self.options, &argv, None).ok().filter(|out| out.status.success());
                JobState::Pending(why.and_then(|out| self.scheduler.parse_pending_reason(&String::from_utf8_lossy(&out.stdout))).unwrap_or_default())
            }
            (state, _) => state,
        }
    }

    /// Why the job ended before its workers connected, with what its logs say.
    fn ended_early(&self, how: &str) -> String {
        let said = job_log_tail(std::path::Path::new(&self.scheduler.log_dir(&self.options)), &self.id);
        let name = self.scheduler.name();
        if let Some(line) = said.iter().find(|l| l.contains(UNREACHABLE_MASTER)) {
            return format!(
                "the workers of {name} job {} cannot reach this master ({}): where compute nodes have no route to this host, run the whole program as one job (BatchManager::run_as_job) with Transport::Mpi, or advertise an address they can reach (ClusterBuilder::advertise)",
                self.id,
                line.trim()
            );
        }
        let log = if said.is_empty() { String::new() } else { format!("; its log ends with:\n{}", said.join("\n")) };
        format!("{name} job {} ended before its workers connected: {how}{log}", self.id)
    }

    fn cancel(&mut self) {
        if let Some(guard) = self.guard.take() {
            guard.cancel_now();
        }
    }
}

impl Launch for BatchJob {
    fn status(&mut self) -> LaunchStatus {
        if let Some((at, status)) = &self.last {
            if at.elapsed() < Duration::from_secs(1) {
                return status.clone();
            }
        }
        let name = self.scheduler.name();
        let status = match self.query() {
            JobState::Pending(reason) if reason.is_empty() => LaunchStatus::Queued(format!("{name} job {} pending", self.id)),
            JobState::Pending(reason) => LaunchStatus::Queued(format!("{name} job {} pending ({reason})", self.id)),
            JobState::Running => {
                if !self.started {
                    tracing::info!("{name} job {} started", self.id);
                    self.started = true;
                }
                LaunchStatus::Running
            }
            JobState::Finished(how) => LaunchStatus::Failed(self.ended_early(&how)),
            JobState::Stuck(why) => LaunchStatus::Failed(format!("{name} job {} can never start: {why}", self.id)),
            // a scheduler that does not answer for a moment is no reason to give up
            JobState::Unknown(why) => match &self.last {
                Some((_, previous)) => {
                    tracing::debug!("{name} job {}: state unknown ({why}), keeping {previous:?}", self.id);
                    previous.clone()
                }
                None => LaunchStatus::Queued(format!("{name} job {} (state unknown: {why})", self.id)),
            },
        };
        self.last = Some((Instant::now(), status.clone()));
        status
    }

    fn stop(&mut self, grace: Duration) {
        // the workers were told to exit; give the job a moment to end by itself, then cancel
        // (a job that never started has no workers to wait for)
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            match self.query() {
                JobState::Finished(_) => {
                    if let Some(guard) = self.guard.take() {
                        guard.dismiss();
                    }
                    return;
                }
                JobState::Pending(_) | JobState::Stuck(_) => break,
                JobState::Running | JobState::Unknown(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        self.cancel();
    }

    fn describe(&self) -> String {
        format!("{} job {}: {:?}", self.scheduler.name(), self.id, self.query())
    }

    fn trim(&mut self, missing: &[u32]) {
        if self.options.layout_or_default() == Layout::Mpi {
            return; // the ranks of one MPI world are one job: none leaves it alone
        }
        if let Some(command) = self.scheduler.trim_command(&self.id, missing) {
            match run(&self.options, &command, None) {
                Ok(out) if out.status.success() => tracing::info!("removed the workers {missing:?} that did not start"),
                Ok(out) => tracing::warn!("could not remove the workers that did not start: {}", String::from_utf8_lossy(&out.stderr).trim()),
                Err(e) => tracing::warn!("could not remove the workers that did not start: {e}"),
            }
        }
    }
}

/// The last lines of the logs of job `id` in `dir`: files whose name holds the job's number
/// as a whole (`sim-961.out`, `sim.o961`, `sim.961.3.out`), a few lines of each.
fn job_log_tail(dir: &std::path::Path, id: &str) -> Vec<String> {
    let number: String = id.chars().take_while(char::is_ascii_digit).collect();
    if number.is_empty() {
        return Vec::new();
    }
    let names_job = |name: &str| name.split(|c: char| !c.is_ascii_digit()).any(|part| part == number);
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<_> = entries.filter_map(|e| e.ok()).filter(|e| names_job(&e.file_name().to_string_lossy())).map(|e| e.path()).collect();
    files.sort();
    let mut lines = Vec::new();
    for file in files.iter().take(3) {
        let Ok(text) = std::fs::read(file) else { continue };
        let text = String::from_utf8_lossy(&text[text.len().saturating_sub(4096)..]).into_owned();
        let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines.extend(all[all.len().saturating_sub(5)..].iter().map(|l| l.chars().take(512).collect::<String>()));
    }
    lines
}

impl Drop for BatchJob {
    fn drop(&mut self) {
        self.cancel(); // a dropped launch never leaves its job in the queue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_of_a_jobs_logs_is_found_by_its_number() {
        let dir = std::env::temp_dir().join(format!("cman-logtail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("sim-961.out"), "a\nb\nclusterman: cannot reach the master at 10.0.0.1:4000 (CLUSTERMAN_MASTER) from node2\n").unwrap();
        std::fs::write(dir.join("sim-9610.out"), "other job\n").unwrap();
        std::fs::write(dir.join("sim.o961.2"), "task\n").unwrap();
        let tail = job_log_tail(&dir, "961.headnode");
        assert_eq!(tail.len(), 4, "{tail:?}");
        assert!(tail.iter().any(|l| l.contains(UNREACHABLE_MASTER)) && !tail.iter().any(|l| l.contains("other job")), "{tail:?}");
        assert!(job_log_tail(&dir, "962").is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_missing_command_names_itself_and_the_prefix_option() {
        let err = run(&JobOptions::new(), &["no-such-sbatch".into()], None).unwrap_err().to_string();
        assert!(err.contains("cannot run `no-such-sbatch`") && err.contains("command_prefix"), "{err}");
        let err = run(&JobOptions::new().command_prefix(["no-such-ssh", "login"]), &["sbatch".into()], None).unwrap_err().to_string();
        assert!(err.contains("no-such-ssh") && err.contains("command_prefix (no-such-ssh login)"), "{err}");
    }
}
