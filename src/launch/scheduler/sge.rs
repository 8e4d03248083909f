//! Grid Engine: `qsub` a job that is an array of independent workers (`-t 1-N`) or a
//! parallel-environment job (`-pe <pe> N`) running `mpirun`. State from `qstat`, cancel with
//! `qdel`. No output-file polling: workers dial in.

use crate::error::{Error, Result};

use super::options::{hms, refuse_owned};
use super::{BatchManager, CommandResult, Job, JobSpec, JobState, Layout, Scheduler, mpirun_lines};

/// Workers started through Grid Engine's `qsub`.
///
/// ```no_run
/// use clusterman::prelude::*;
/// use clusterman::launch::scheduler::{JobOptions, Layout, SgeManager};
/// # fn main() -> clusterman::Result<()> {
/// let cluster = Cluster::new()?;
/// let sge = SgeManager::new(4).pe("mpi").qsub_flags(["-l", "h_vmem=4G"]);
/// let pids = cluster.add_procs(&sge)?;                      // one MPI world: mpido! works
/// let array = SgeManager::new(8).job(JobOptions::new().layout(Layout::Array));
/// # Ok(()) }
/// ```
pub type SgeManager = BatchManager<Sge>;

/// The Grid Engine dialect.
#[derive(Debug, Clone)]
pub struct Sge {
    pe: String,
    flags: Vec<String>,
}

impl Default for Sge {
    fn default() -> Self {
        Sge { pe: "mpi".into(), flags: Vec::new() }
    }
}

impl SgeManager {
    /// `np` workers.
    pub fn new(np: usize) -> Self {
        BatchManager::with(np, Sge::default())
    }

    /// The parallel environment of an MPI-layout job (default `mpi`).
    pub fn pe(mut self, pe: impl Into<String>) -> Self {
        self.scheduler.pe = pe.into();
        self
    }

    /// Extra `qsub` arguments, as given on its command line (like Julia's `qsub_flags`).
    pub fn qsub_flags<S: Into<String>>(mut self, flags: impl IntoIterator<Item = S>) -> Self {
        self.scheduler.flags = flags.into_iter().map(Into::into).collect();
        self
    }
}

impl Scheduler for Sge {
    fn name(&self) -> &'static str {
        "sge"
    }

    fn job(&self, spec: &JobSpec<'_>) -> Result<Job> {
        let instead = "use JobOptions (name, workdir, layout) instead";
        let owned = ["-N", "-o", "-e", "-t", "-pe", "-wd", "-cwd", "-terse", "-w"].map(|f| (f, instead));
        refuse_owned("qsub", &self.flags, &owned)?;
        let o = spec.options;
        let (wd, logs) = (o.workdir_or_current(), o.log_dir());
        let mut d = vec![format!("-N {}", o.name), "-S /bin/bash".into(), format!("-wd {wd}"), "-j y".into()];
        match o.layout_or_default() {
            Layout::Mpi => {
                d.push(format!("-o {logs}/{}.o$JOB_ID", o.name));
                d.push(format!("-pe {} {}", self.pe, spec.workers));
            }
            Layout::Array => {
                d.push(format!("-o {logs}/{}.o$JOB_ID.$TASK_ID", o.name));
                d.push(format!("-t 1-{}", spec.workers));
            }
        }
        d.extend(o.walltime.map(|t| format!("-l h_rt={}", hms(t))));
        d.extend(o.queue.as_ref().map(|q| format!("-q {q}")));
        d.extend(o.account.as_ref().map(|a| format!("-A {a}")));
        d.extend(o.memory.map(|m| m.binary()).map(|(n, unit)| format!("-l h_vmem={n}{unit}")));
        let mut script = String::from("#!/bin/bash\n");
        for directive in o.directives(d) {
            script.push_str(&format!("#$ {directive}\n"));
        }
        let launch = match o.layout_or_default() {
            // Grid Engine's parallel environment tells Open MPI and MPICH the hosts itself
            Layout::Mpi => mpirun_lines(spec, "$NSLOTS", None),
            Layout::Array => format!("exec {}", spec.command()),
        };
        script.push_str(&spec.body(&launch));
        // -w e: a request no queue could ever satisfy is refused at once, not left waiting
        let mut submit = ["qsub", "-terse", "-w", "e"].map(String::from).to_vec();
        submit.extend(self.flags.iter().cloned());
        Ok(Job { submit, script })
    }

    fn parse_job_id(&self, stdout: &str) -> Result<String> {
        // `qsub -terse` prints `<id>`, or `<id>.<first>-<last>:<step>` for an array
        let id = stdout.trim().split('.').next().unwrap_or_default();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::Launch(format!("unexpected qsub output (no job id): {stdout:?}")));
        }
        Ok(id.to_string())
    }

    fn state_command(&self, _id: &str) -> Vec<String> {
        vec!["qstat".into()]
    }

    fn parse_state(&self, id: &str, r: &CommandResult) -> JobState {
        if !r.success {
            return JobState::Unknown(r.stderr.trim().to_string());
        }
        // job-ID prior name user state submit/start-at queue slots ja-task-ID
        let states: Vec<&str> = r.stdout.lines().map(str::split_whitespace).filter_map(|mut cols| (cols.next() == Some(id)).then(|| cols.nth(3)).flatten()).collect();
        if states.is_empty() {
            return JobState::Finished("no longer in the queue".into());
        }
        if let Some(error) = states.iter().find(|s| s.contains('E')) {
            return JobState::Finished(format!("in error state {error} (see qstat -j {id})"));
        }
        if states.iter().any(|s| s.contains('r') || s.contains('t')) {
            return JobState::Running;
        }
        if states.iter().all(|s| s.contains('d')) {
            return JobState::Finished("being deleted".into());
        }
        JobState::Pending(if states.iter().any(|s| s.contains('h')) { "on hold".into() } else { String::new() })
    }

    fn cancel_command(&self, id: &str) -> Vec<String> {
        vec!["qdel".into(), id.into()]
    }

    fn pending_reason_command(&self, id: &str) -> Option<Vec<String>> {
        Some(vec!["qstat".into(), "-j".into(), id.into()])
    }

    /// The first line of `scheduling info:` (shown when the site keeps `schedd_job_info`).
    fn parse_pending_reason(&self, stdout: &str) -> Option<String> {
        let info = stdout.lines().find_map(|l| l.strip_prefix("scheduling info:"))?.trim();
        let info: String = info.chars().take(200).collect();
        (!info.is_empty() && !info.contains("Collecting of scheduler job information is turned off")).then_some(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::scheduler::{JobOptions, Memory};
    use std::time::Duration;

    fn spec(options: &JobOptions) -> JobSpec<'_> {
        JobSpec::new(options, 3, "/opt/app/bin/sim", vec![("CLUSTERMAN_MASTER".into(), "10.0.0.1:4000".into())])
    }

    #[test]
    fn a_pending_job_says_why_from_its_scheduling_info() {
        // as Grid Engine 8.1.9 prints it (qstat -j)
        let qstat_j = "job_name:                   probe\nscript_file:                STDIN\nscheduling info:            (-l arch=nosucharch) cannot run at host \"vm\" because it offers only hl:arch=lx-amd64\n";
        let sge = Sge { pe: String::new(), flags: vec![] };
        assert_eq!(sge.pending_reason_command("153").unwrap(), ["qstat", "-j", "153"]);
        assert_eq!(sge.parse_pending_reason(qstat_j).unwrap(), "(-l arch=nosucharch) cannot run at host \"vm\" because it offers only hl:arch=lx-amd64");
        let off = "scheduling info:            (Collecting of scheduler job information is turned off)\n";
        assert_eq!(sge.parse_pending_reason(off), None, "nothing to show where the site turned it off");
        assert_eq!(sge.parse_pending_reason("job_name: x\n"), None);
    }

    #[test]
    fn golden_pe_script() {
        let o = JobOptions::new().name("sim").workdir("/w").walltime(Duration::from_secs(3600)).queue("all.q").memory(Memory::gib(2)).prologue("module load mpi");
        let job = Sge { pe: "orte".into(), flags: vec!["-P".into(), "proj".into()] }.job(&spec(&o)).unwrap();
        assert_eq!(job.submit, ["qsub", "-terse", "-w", "e", "-P", "proj"]);
        assert_eq!(
            job.script,
            "#!/bin/bash
#$ -N sim
#$ -S /bin/bash
#$ -wd /w
#$ -j y
#$ -o /w/clusterman-logs/sim.o$JOB_ID
#$ -pe orte 3
#$ -l h_rt=01:00:00
#$ -q all.q
#$ -l h_vmem=2G
export CLUSTERMAN_MASTER=10.0.0.1:4000
module load mpi
case \"$(mpirun --version 2>&1)\" in *'Open MPI'*) set -- -x CLUSTERMAN_MASTER ;; esac
exec mpirun \"$@\" -np $NSLOTS /opt/app/bin/sim
"
        );
    }

    #[test]
    fn golden_array_script() {
        let o = JobOptions::new().workdir("/w").layout(Layout::Array);
        let job = Sge::default().job(&spec(&o)).unwrap();
        assert_eq!(
            job.script,
            "#!/bin/bash
#$ -N clusterman
#$ -S /bin/bash
#$ -wd /w
#$ -j y
#$ -o /w/clusterman-logs/clusterman.o$JOB_ID.$TASK_ID
#$ -t 1-3
export CLUSTERMAN_MASTER=10.0.0.1:4000
exec /opt/app/bin/sim
"
        );
    }

    #[test]
    fn flags_clusterman_sets_are_refused() {
        let err = Sge { pe: "mpi".into(), flags: vec!["-N".into(), "x".into()] }.job(&spec(&JobOptions::new())).unwrap_err().to_string();
        assert!(err.contains("qsub flag -N clashes"), "{err}");
    }

    #[test]
    fn job_ids_and_states_parse() {
        let s = Sge::default();
        assert_eq!(s.parse_job_id("42\n").unwrap(), "42");
        assert_eq!(s.parse_job_id("43.1-3:1\n").unwrap(), "43");
        assert!(s.parse_job_id("Unable to run job").is_err());
        let qstat = "job-ID  prior   name       user         state submit/start at     queue                          slots ja-task-ID
-----------------------------------------------------------------------------------------------------------------
     42 0.55500 sim        root         qw    11/20/2026 23:30:01                                    3
     43 0.55500 arr        root         r     11/20/2026 23:30:02 all.q@vm                           1 1
     43 0.55500 arr        root         qw    11/20/2026 23:30:02                                    1 2,3
     44 0.55500 bad        root         Eqw   11/20/2026 23:30:03                                    1
";
        let r = CommandResult { success: true, stdout: qstat.into(), stderr: String::new() };
        assert_eq!(s.parse_state("42", &r), JobState::Pending(String::new()));
        assert_eq!(s.parse_state("43", &r), JobState::Running);
        assert!(matches!(s.parse_state("44", &r), JobState::Finished(m) if m.contains("Eqw")));
        assert_eq!(s.parse_state("45", &r), JobState::Finished("no longer in the queue".into()));
        assert_eq!(s.cancel_command("42"), ["qdel", "42"]);
    }
}
