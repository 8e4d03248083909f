//! HTCondor: a submit description (vanilla universe, one queued proc per worker; or, for an
//! MPI world, one parallel-universe job over N machines) given to `condor_submit` on stdin.
//! State from `condor_q <cluster> -af ProcId JobStatus HoldReason`, cancel with
//! `condor_rm <cluster>`; procs that never started are removed alone
//! (`condor_rm <cluster>.<proc>`). Workers dial in by themselves: no telnet, no port range.
//!
//! Each proc learns its worker index from `$(Process)`, which `condor_submit` expands in the
//! `environment` line (HTCondor sets no task-id variable of its own), so the worker needs no
//! HTCondor-specific code and the index is the proc id that `condor_q` and `condor_rm` use.
//! The ranks of a parallel job take their index from their MPI rank.

use crate::protocol::env::{ENV_LAUNCH, ENV_SECRET_FILE};
use crate::error::{Error, Result};

use super::{BatchManager, CommandResult, Job, JobOptions, JobSpec, JobState, Layout, Scheduler, shell_quote};

/// Workers started through HTCondor: one queued proc each, or one parallel-universe job.
///
/// ```no_run
/// use clusterman::prelude::*;
/// use clusterman::launch::scheduler::htcondor::HtCondorManager;
/// # fn main() -> clusterman::Result<()> {
/// let cluster = Cluster::new()?;
/// let condor = HtCondorManager::new(8)
///     .extra("requirements = (OpSys == \"LINUX\")")
///     .input_files(["params.toml"]);
/// println!("{}", condor.job_script()?);        // the submit description (secret hidden)
/// let pids = cluster.add_procs(&condor)?;
/// # Ok(()) }
/// ```
///
/// By default each worker is one proc of the vanilla universe ([`Layout::Array`]: `new` sets
/// it). For one MPI world, on which `mpido!` runs, ask for [`Layout::Mpi`]: the job goes to
/// HTCondor's **parallel universe** as its manual describes for MPI, `machine_count = N`
/// machines running an mpirun wrapper script whose argument is the program. The wrapper is
/// HTCondor's `openmpiscript` (copy it from `$(condor_config_val RELEASE_DIR)/etc/examples` into
/// the working directory) unless [`JobOptions::launcher`] names another; on the job's first
/// machine it runs mpirun over all of them.
///
/// ```no_run
/// # use clusterman::prelude::*;
/// # use clusterman::launch::scheduler::{JobOptions, Layout, htcondor::HtCondorManager};
/// # fn main() -> clusterman::Result<()> {
/// # let cluster = Cluster::new()?;
/// let world = HtCondorManager::new(4).job(JobOptions::new().layout(Layout::Mpi));
/// cluster.add_procs(&world)?;
/// let ranks: Vec<i32> = clusterman::mpido!(world, |comm| comm.rank())?;
/// # Ok(()) }
/// ```
///
/// Nothing needs to be shared with the execute nodes: the program (the master's own binary)
/// and the file holding the secret go with the job into its scratch directory, which only
/// the job can enter; its environment names that file by a relative path, so the job ad
/// holds no secret and no path of the submit host. With [`JobOptions::prologue`] lines,
/// `/bin/sh -c` runs them first and then the transferred program (vanilla universe only: in
/// the parallel universe, the wrapper script is where such lines go).
pub type HtCondorManager = BatchManager<HtCondor>;

/// The mpirun wrapper of a parallel-universe job unless [`JobOptions::launcher`] names another:
/// HTCondor's own, from its examples directory, relative to the working directory.
const MPI_WRAPPER: &str = "openmpiscript";

/// The HTCondor dialect: extra submit-description lines and input files.
#[derive(Debug, Clone, Default)]
pub struct HtCondor {
    extra: Vec<String>,
    input_files: Vec<String>,
}

impl HtCondorManager {
    /// `np` workers (array layout).
    pub fn new(np: usize) -> Self {
        BatchManager::with(np, HtCondor::default()).job(JobOptions::new().layout(Layout::Array))
    }

    /// An extra submit-description line (`requirements = ...`, `+ProjectName = "x"`), placed
    /// before `queue` (like Julia's `extrajdl`).
    pub fn extra(mut self, line: impl Into<String>) -> Self {
        self.scheduler.extra.push(line.into());
        self
    }

    /// Files copied to each worker's scratch directory (`transfer_input_files`; relative paths
    /// are relative to the job's working directory), like Julia's `extrainputs`.
    pub fn input_files<S: Into<String>>(mut self, files: impl IntoIterator<Item = S>) -> Self {
        self.scheduler.input_files.extend(files.into_iter().map(Into::into));
        self
    }
}

impl Scheduler for HtCondor {
    fn name(&self) -> &'static str {
        "htcondor"
    }

    fn job(&self, spec: &JobSpec<'_>) -> Result<Job> {
        let o = spec.options;
        let parallel = o.layout_or_default() == Layout::Mpi;
        if parallel && !o.prologue.is_empty() {
            return Err(Error::Launch("JobOptions::prologue is for the vanilla universe: in HTCondor's parallel universe (Layout::Mpi) put those lines in the mpirun wrapper script (JobOptions::launcher)".into()));
        }
        if let Some(queue) = &o.queue {
            return Err(Error::Launch(format!("HTCondor has no queues (JobOptions::queue({queue:?})): choose machines with HtCondorManager::extra(\"requirements = ...\")")));
        }
        let (wd, logs) = (o.workdir_or_current(), o.log_dir());
        // Nothing is assumed shared with the execute node: the program and the secret file
        // travel with the job into its scratch directory (private to the job), and the
        // environment names the secret file there, by a relative path.
        let mut inputs: Vec<String> = Vec::new();
        let mut exports = spec.exports.clone();
        for (key, value) in &mut exports {
            if key == ENV_SECRET_FILE && value.starts_with('/') {
                inputs.push(value.clone());
                *value = file_name(value);
            }
        }
        let mut d = vec![format!("universe = {}", if parallel { "parallel" } else { "vanilla" }), format!("batch_name = {}", o.name)];
        if parallel {
            // HTCondor's recipe for MPI: the wrapper runs on every machine of the job and, on
            // the first, starts mpirun over all of them with the program (an input file)
            d.push(format!("executable = {}", o.launcher.as_deref().unwrap_or(MPI_WRAPPER)));
            d.push(format!("arguments = \"{}\"", condor_quote(&file_name(&spec.program))));
            d.push(format!("machine_count = {}", spec.workers));
            inputs.push(spec.program.clone());
        } else if o.prologue.is_empty() {
            // transferred by HTCondor (transfer_executable defaults to true)
            d.push(format!("executable = {}", spec.program));
        } else {
            // the node's own shell runs the prologue, then becomes the worker: the program
            // comes as an input file (transfer may drop its execute bit). Paths are made
            // absolute first, in the scratch directory, since the prologue may `cd`.
            let program = format!("\"$scratch\"/{}", shell_quote(&file_name(&spec.program)));
            let script = format!(
                "scratch=$PWD; {ENV_SECRET_FILE}=\"$scratch/${ENV_SECRET_FILE}\"; export {ENV_SECRET_FILE}; {}; chmod u+x {program} && exec {program}",
                o.prologue.join("; ")
            );
            d.extend(["executable = /bin/sh".to_string(), "transfer_executable = false".to_string()]);
            d.push(format!("arguments = \"-c {}\"", condor_quote(&script)));
            inputs.push(spec.program.clone());
        }
        d.push(format!("environment = \"{}\"", environment(&exports)?));
        d.push(format!("initialdir = {wd}"));
        // one file per proc, or per machine of a parallel job
        let part = if parallel { "$(Node)" } else { "$(Process)" };
        d.push(format!("output = {logs}/{}.$(Cluster).{part}.out", o.name));
        d.push(format!("error = {logs}/{}.$(Cluster).{part}.err", o.name));
        d.push(format!("log = {logs}/{}.$(Cluster).log", o.name));
        d.extend(o.cpus_per_worker.map(|c| format!("request_cpus = {c}")));
        // a bare number is MiB; HTCondor refuses Gi-style units
        d.extend(o.memory.map(|m| format!("request_memory = {}", m.mib_ceil())));
        d.extend(o.account.as_ref().map(|a| format!("accounting_group = {a}")));
        // no wall-clock limit in the vanilla universe: remove procs that run longer
        d.extend(o.walltime.map(|t| format!("periodic_remove = JobStatus == 2 && time() - EnteredCurrentStatus > {}", t.as_secs())));
        inputs.extend(self.input_files.iter().cloned());
        d.push("should_transfer_files = YES".into());
        d.push("when_to_transfer_output = ON_EXIT".into());
        if !inputs.is_empty() {
            d.push(format!("transfer_input_files = {}", inputs.join(",")));
        }
        let mut script: String = o.directives(d).into_iter().chain(self.extra.iter().cloned()).map(|l| l + "\n").collect();
        script.push_str(&if parallel { "queue\n".to_string() } else { format!("queue {}\n", spec.workers) });
        // `-` reads the description from stdin (which alone would imply -verbose, printing
        // every job ad, environment and secret included); -terse prints just the id range
        Ok(Job { submit: ["condor_submit", "-terse", "-"].map(String::from).to_vec(), script })
    }

    fn parse_job_id(&self, stdout: &str) -> Result<String> {
        // `-terse`: `42.0 - 42.2`; plain: `3 job(s) submitted to cluster 42.`
        let cluster = stdout.lines().find_map(|line| match line.split_once("submitted to cluster ") {
            Some((_, rest)) => Some(rest.trim().trim_end_matches('.')),
            None => line.trim().split_once(" - ").and_then(|(first, _)| first.split_once('.')).map(|(cluster, _)| cluster),
        });
        match cluster {
            Some(id) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => Ok(id.to_string()),
            // only the first line: a verbose condor_submit prints job ads, secret included
            _ => Err(Error::Launch(format!("unexpected condor_submit output (no cluster id): {:?}", stdout.lines().next().unwrap_or_default()))),
        }
    }

    fn state_command(&self, id: &str) -> Vec<String> {
        ["condor_q", id, "-af", "ProcId", "JobStatus", "HoldReason"].map(String::from).to_vec()
    }

    fn parse_state(&self, _id: &str, r: &CommandResult) -> JobState {
        if !r.success {
            return JobState::Unknown(r.stderr.trim().to_string());
        }
        // `<ProcId> <JobStatus> <HoldReason or "undefined">` per proc still in the queue
        let mut procs = Vec::new();
        for line in r.stdout.lines().filter(|l| !l.trim().is_empty()) {
            let mut cols = line.trim().splitn(3, ' ');
            match cols.nth(1).and_then(|s| s.parse::<u8>().ok()) {
                Some(status) => procs.push((status, cols.next().unwrap_or_default().trim())),
                None => return JobState::Unknown(format!("unexpected condor_q line {line:?}")),
            }
        }
        // 1 Idle, 2 Running, 3 Removed, 4 Completed, 5 Held, 6 Transferring output, 7 Suspended
        if procs.is_empty() {
            JobState::Finished("no longer in the queue".into())
        } else if procs.iter().any(|(s, _)| matches!(s, 2 | 6 | 7)) {
            JobState::Running
        } else if let Some((_, reason)) = procs.iter().find(|(s, _)| *s == 5) {
            JobState::Pending(format!("held: {reason}"))
        } else if procs.iter().any(|(s, _)| *s == 1) {
            JobState::Pending(String::new())
        } else if procs.iter().all(|(s, _)| *s == 3) {
            JobState::Finished("removed".into())
        } else {
            JobState::Finished("completed".into())
        }
    }

    fn cancel_command(&self, id: &str) -> Vec<String> {
        vec!["condor_rm".into(), id.into()]
    }

    fn trim_command(&self, id: &str, missing: &[u32]) -> Option<Vec<String>> {
        // worker i is proc i (see the module docs)
        Some(std::iter::once("condor_rm".to_string()).chain(missing.iter().map(|i| format!("{id}.{i}"))).collect())
    }
}

/// The `environment` value in HTCondor's quoted syntax (without the outer double quotes);
/// the array-task index of [`ENV_LAUNCH`] becomes `$(Process)`.
fn environment(exports: &[(String, String)]) -> Result<String> {
    let mut entries = Vec::new();
    for (key, value) in exports {
        if value.contains('\n') || key.contains(|c: char| c == '=' || c.is_whitespace()) {
            return Err(Error::Launch(format!("environment variable {key:?} cannot be written in an HTCondor submit description")));
        }
        match value.strip_suffix(":task").filter(|_| key == ENV_LAUNCH) {
            Some(launch) => entries.push(format!("{key}={}:$(Process)", condor_quote(launch))),
            None => entries.push(format!("{key}={}", condor_quote(value))),
        }
    }
    Ok(entries.join(" "))
}

/// The last component of a path.
fn file_name(path: &str) -> String {
    std::path::Path::new(path).file_name().map_or_else(|| path.to_string(), |n| n.to_string_lossy().into_owned())
}

/// One word of HTCondor's quoted `environment`/`arguments` syntax: single quotes around
/// whitespace (a quote inside doubled), double quotes doubled, and `$` as the `$(DOLLAR)`
/// macro so `condor_submit` expands nothing of ours.
fn condor_quote(s: &str) -> String {
    let s = s.replace('$', "$(DOLLAR)").replace('"', "\"\"");
    if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == '\'') {
        format!("'{}'", s.replace('\'', "''"))
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::scheduler::Memory;
    use std::time::Duration;

    fn spec(options: &JobOptions) -> JobSpec<'_> {
        let exports = vec![
            ("CLUSTERMAN_MASTER".into(), "10.0.0.1:4000".into()),
            ("CLUSTERMAN_LAUNCH".into(), "77:task".into()),
            ("GREETING".into(), "it's a \"test\" of $HOME".into()),
        ];
        JobSpec::new(options, 3, "/opt/app/bin/sim", exports)
    }

    #[test]
    fn golden_submit_description() {
        let o = JobOptions::new().name("sim").workdir("/w").layout(Layout::Array).cpus_per_worker(2).memory(Memory::gib(4)).account("group_physics.alice").walltime(Duration::from_secs(600)).extra_directive("+ProjectName = \"x\"");
        let condor = HtCondor { extra: vec!["requirements = (OpSys == \"LINUX\")".into()], input_files: vec!["/data/a.toml".into(), "b.csv".into()] };
        let job = condor.job(&spec(&o)).unwrap();
        assert_eq!(job.submit, ["condor_submit", "-terse", "-"]);
        assert_eq!(
            job.script,
            r#"universe = vanilla
batch_name = sim
executable = /opt/app/bin/sim
environment = "CLUSTERMAN_MASTER=10.0.0.1:4000 CLUSTERMAN_LAUNCH=77:$(Process) GREETING='it''s a ""test"" of $(DOLLAR)HOME'"
initialdir = /w
output = /w/clusterman-logs/sim.$(Cluster).$(Process).out
error = /w/clusterman-logs/sim.$(Cluster).$(Process).err
log = /w/clusterman-logs/sim.$(Cluster).log
request_cpus = 2
request_memory = 4096
accounting_group = group_physics.alice
periodic_remove = JobStatus == 2 && time() - EnteredCurrentStatus > 600
should_transfer_files = YES
when_to_transfer_output = ON_EXIT
transfer_input_files = /data/a.toml,b.csv
+ProjectName = "x"
requirements = (OpSys == "LINUX")
queue 3
"#
        );
    }

    #[test]
    fn golden_prologue_runs_through_sh_and_skipped_lines_go() {
        let o = JobOptions::new().workdir("/w").layout(Layout::Array).prologue("module load gcc").prologue("cd 'my dir'").skip_directive("log =");
        let job = HtCondor::default().job(&spec(&o)).unwrap();
        assert_eq!(
            job.script,
            r#"universe = vanilla
batch_name = clusterman
executable = /bin/sh
transfer_executable = false
arguments = "-c 'scratch=$(DOLLAR)PWD; CLUSTERMAN_SECRET_FILE=""$(DOLLAR)scratch/$(DOLLAR)CLUSTERMAN_SECRET_FILE""; export CLUSTERMAN_SECRET_FILE; module load gcc; cd ''my dir''; chmod u+x ""$(DOLLAR)scratch""/sim && exec ""$(DOLLAR)scratch""/sim'"
environment = "CLUSTERMAN_MASTER=10.0.0.1:4000 CLUSTERMAN_LAUNCH=77:$(Process) GREETING='it''s a ""test"" of $(DOLLAR)HOME'"
initialdir = /w
output = /w/clusterman-logs/clusterman.$(Cluster).$(Process).out
error = /w/clusterman-logs/clusterman.$(Cluster).$(Process).err
should_transfer_files = YES
when_to_transfer_output = ON_EXIT
transfer_input_files = /opt/app/bin/sim
queue 3
"#
        );
    }

    #[test]
    fn the_secret_file_travels_with_the_job_and_the_environment_names_it_there() {
        let o = JobOptions::new().workdir("/w").layout(Layout::Array);
        let exports = vec![(ENV_SECRET_FILE.to_string(), "/w/.clusterman/secret-77".to_string())];
        let job = HtCondor::default().job(&JobSpec::new(&o, 1, "/opt/app/bin/sim", exports)).unwrap();
        assert!(job.script.contains("environment = \"CLUSTERMAN_SECRET_FILE=secret-77\"\n"), "{}", job.script);
        assert!(job.script.contains("transfer_input_files = /w/.clusterman/secret-77\n") && job.script.contains("should_transfer_files = YES\n"), "{}", job.script);
    }

    #[test]
    fn the_manager_defaults_to_an_array_and_shows_no_secret() {
        let m = HtCondorManager::new(2).job(JobOptions::new().layout(Layout::Array).workdir("/w"));
        let script = m.job_script().unwrap();
        assert!(script.contains("CLUSTERMAN_SECRET_FILE=<secret-file>") && script.contains("CLUSTERMAN_LAUNCH=<launch>:$(Process)") && script.ends_with("queue 2\n"), "{script}");
        assert!(HtCondorManager::new(1).job_script().is_ok(), "new() picks the array layout");
    }

    #[test]
    fn golden_parallel_universe_runs_the_mpi_wrapper_over_n_machines() {
        let o = JobOptions::new().name("sim").workdir("/w").layout(Layout::Mpi).cpus_per_worker(2);
        let exports = vec![("CLUSTERMAN_LAUNCH".to_string(), "77:rank".to_string()), (ENV_SECRET_FILE.to_string(), "/w/.clusterman/secret-77".to_string())];
        let job = HtCondor::default().job(&JobSpec::new(&o, 4, "/opt/app/bin/sim", exports.clone())).unwrap();
        assert_eq!(
            job.script,
            r#"universe = parallel
batch_name = sim
executable = openmpiscript
arguments = "sim"
machine_count = 4
environment = "CLUSTERMAN_LAUNCH=77:rank CLUSTERMAN_SECRET_FILE=secret-77"
initialdir = /w
output = /w/clusterman-logs/sim.$(Cluster).$(Node).out
error = /w/clusterman-logs/sim.$(Cluster).$(Node).err
log = /w/clusterman-logs/sim.$(Cluster).log
request_cpus = 2
should_transfer_files = YES
when_to_transfer_output = ON_EXIT
transfer_input_files = /w/.clusterman/secret-77,/opt/app/bin/sim
queue
"#
        );
        let own = o.clone().launcher("/site/mpich-wrapper");
        assert!(HtCondor::default().job(&JobSpec::new(&own, 4, "/opt/app/bin/sim", exports)).unwrap().script.contains("executable = /site/mpich-wrapper\n"));
    }

    #[test]
    fn prologues_in_the_parallel_universe_and_queues_are_clear_errors() {
        let err = HtCondor::default().job(&spec(&JobOptions::new().prologue("module load mpi"))).unwrap_err().to_string();
        assert!(err.contains("parallel universe") && err.contains("wrapper script"), "{err}");
        let err = HtCondor::default().job(&spec(&JobOptions::new().layout(Layout::Array).queue("long"))).unwrap_err().to_string();
        assert!(err.contains("no queues") && err.contains("requirements"), "{err}");
    }

    #[test]
    fn cluster_ids_parse() {
        let c = HtCondor::default();
        assert_eq!(c.parse_job_id("42.0 - 42.2\n").unwrap(), "42");
        assert_eq!(c.parse_job_id("Submitting job(s)...\n3 job(s) submitted to cluster 42.\n").unwrap(), "42");
        let err = c.parse_job_id("ERROR: Can't find address of local schedd\nsecret stuff").unwrap_err().to_string();
        assert!(err.contains("no cluster id") && !err.contains("secret"), "{err}");
    }

    #[test]
    fn states_parse() {
        let c = HtCondor::default();
        let ok = |stdout: &str| CommandResult { success: true, stdout: stdout.into(), stderr: String::new() };
        assert_eq!(c.parse_state("42", &ok("0 1 undefined\n1 1 undefined\n")), JobState::Pending(String::new()));
        assert_eq!(c.parse_state("42", &ok("0 1 undefined\n1 2 undefined\n")), JobState::Running, "one proc running");
        assert_eq!(c.parse_state("42", &ok("0 5 Error from slot1@node3: out of disk\n")), JobState::Pending("held: Error from slot1@node3: out of disk".into()));
        assert_eq!(c.parse_state("42", &ok("0 3 undefined\n1 3 undefined\n")), JobState::Finished("removed".into()));
        assert_eq!(c.parse_state("42", &ok("0 4 undefined\n")), JobState::Finished("completed".into()));
        assert_eq!(c.parse_state("42", &ok("")), JobState::Finished("no longer in the queue".into()));
        assert!(matches!(c.parse_state("42", &ok("garbage\n")), JobState::Unknown(_)));
        let down = CommandResult { success: false, stdout: String::new(), stderr: "-- Failed to fetch ads from: <127.0.0.1:9618>\n".into() };
        assert!(matches!(c.parse_state("42", &down), JobState::Unknown(m) if m.contains("Failed to fetch ads")));
        assert_eq!(c.state_command("42"), ["condor_q", "42", "-af", "ProcId", "JobStatus", "HoldReason"]);
        assert_eq!(c.cancel_command("42"), ["condor_rm", "42"]);
        assert_eq!(c.trim_command("42", &[1, 3]).unwrap(), ["condor_rm", "42.1", "42.3"]);
    }
}
