//! A program that runs as one whole MPI job: started on the login node, it submits itself
//! as one job whose every rank runs the same program (with the same arguments), streams the
//! job's output back while it runs, and exits with the job's status. For clusters whose
//! compute nodes cannot reach the login node: nothing but the scheduler and the shared
//! filesystem connects the two, and inside the job the ranks talk over MPI
//! (`start_main_loop(Transport::Mpi)`) or over TCP among themselves.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::launch::LaunchStatus;
use crate::protocol::env::ENV_WHOLE_JOB;
use crate::sys;

use super::{BatchManager, JobSpec, Layout, Report, Scheduler, submit};

/// Environment variables that only a rank of an MPI world has (Open MPI, MPICH, PMIx).
const RANK_VARS: [&str; 4] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"];

/// How often the job's state and output are looked at.
const POLL: Duration = Duration::from_millis(200);

impl<S: Scheduler + Clone + 'static> BatchManager<S> {
    /// Runs this whole program as one MPI job of the manager's worker count: the way to use
    /// clusters whose compute nodes have no TCP route to the login node.
    ///
    /// On the login node it submits the program (the same binary and arguments) as one job
    /// of the manager's options, shows the job's state while it queues, streams what the
    /// ranks print while it runs, and exits with the launcher's exit status: it never
    /// returns there. Killing it (even `kill -9`) cancels the job. Inside the job it returns
    /// at once, and the program goes on, typically into
    /// `clusterman::mpi::start_main_loop` with either transport.
    ///
    /// ```no_run
    /// use clusterman::launch::scheduler::{JobOptions, SlurmManager};
    /// use clusterman::mpi::{Transport, start_main_loop};
    /// # fn main() -> clusterman::Result<()> {
    /// clusterman::init();
    /// SlurmManager::new(8).job(JobOptions::new().walltime(std::time::Duration::from_secs(600))).run_as_job()?;
    /// let mgr = start_main_loop(Transport::Mpi)?; // rank 0 of the job goes on here
    /// println!("{} processes", mgr.cluster().expect("rank 0").nprocs());
    /// mgr.shutdown()
    /// # }
    /// ```
    ///
    /// The job's working directory (default: the current one) must be on a filesystem the
    /// login node and the job share: the ranks' output and the exit status come back through
    /// files in its `clusterman-logs/` (or [`JobOptions::logs`](super::JobOptions::logs)).
    pub fn run_as_job(&self) -> Result<()> {
        if in_the_job() {
            return Ok(());
        }
        let code = self.submit_whole_program()?;
        let _ = std::io::stdout().flush();
        std::process::exit(code);
    }

    /// Submits the program as one job, follows it, and returns its exit status.
    fn submit_whole_program(&self) -> Result<i32> {
        if self.job.layout_asked() == Some(Layout::Array) {
            return Err(Error::Launch("run_as_job starts one MPI world: drop JobOptions::layout(Layout::Array)".into()));
        }
        let logs = self.scheduler.log_dir(&self.job);
        std::fs::create_dir_all(&logs).map_err(|e| Error::io(format!("cannot create the job log directory {logs} (JobOptions::logs)"), e))?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let tag = format!("{logs}/{}-{}-{nanos:09}", self.job.name, std::process::id());
        let report = Report { output: format!("{tag}.out"), status: format!("{tag}.status") };
        let program = sys::own_program().map_err(Error::Launch)?.display().to_string();
        let mut exports = vec![(ENV_WHOLE_JOB.to_string(), "1".to_string())];
        exports.extend(self.job.env.iter().cloned());
        let mut spec = JobSpec::new(&self.job, self.np, program, exports);
        spec.args = std::env::args().skip(1).collect();
        spec.report = Some(report.clone());
        let job = self.scheduler.job(&spec)?;
        let mut launch = submit(Box::new(self.scheduler.clone()), &self.job, &job, None)?;
        let mut output = Follow::new(&report.output);
        let mut shown = String::new();
        let ended = loop {
            let status = read_status(&report.status);
            output.copy_new();
            if let Some(code) = status {
                break Ok(code);
            }
            match launch.status() {
                LaunchStatus::Queued(note) if note != shown => {
                    eprintln!("clusterman: {note}");
                    shown = note;
                }
                LaunchStatus::Failed(why) => break Err(why),
                _ => {}
            }
            std::thread::sleep(POLL);
        };
        let ended = ended.or_else(|why| {
            // the job left the queue: its status file may reach this node a moment later
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Some(code) = read_status(&report.status) {
                    return Ok(code);
                }
                if Instant::now() > deadline {
                    return Err(why);
                }
                std::thread::sleep(POLL);
            }
        });
        output.copy_new();
        let _ = std::fs::remove_file(&report.status);
        launch.stop(Duration::from_secs(5));
        ended.map_err(|why| Error::Launch(format!("{why}; the job reported no exit status (cancelled, or over its time limit?); its logs are in {logs}")))
    }
}

/// Whether this process runs inside the job `run_as_job` submitted (or as any MPI rank).
fn in_the_job() -> bool {
    std::env::var_os(ENV_WHOLE_JOB).is_some() || RANK_VARS.iter().any(|v| std::env::var_os(v).is_some())
}

/// The exit status the job wrote, once it is whole.
fn read_status(path: &str) -> Option<i32> {
    let text = std::fs::read_to_string(path).ok()?;
    text.ends_with('\n').then(|| text.trim().parse().ok()).flatten()
}

/// Copies what a growing file gains to standard output.
struct Follow<'a> {
    path: &'a str,
    offset: u64,
    buf: Vec<u8>,
}

impl<'a> Follow<'a> {
    fn new(path: &'a str) -> Self {
        Follow { path, offset: 0, buf: vec![0; 64 * 1024] }
    }

    fn copy_new(&mut self) {
        let Ok(mut file) = std::fs::File::open(self.path) else { return };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut out = std::io::stdout().lock();
        while let Ok(n) = file.read(&mut self.buf) {
            if n == 0 || out.write_all(&self.buf[..n]).is_err() {
                break;
            }
            self.offset += n as u64;
        }
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::scheduler::{JobOptions, SgeManager, SlurmManager};

    #[test]
    fn the_job_runs_the_program_with_its_arguments_and_reports_back() {
        let o = JobOptions::new().workdir("/w");
        let report = Report { output: "/w/logs/x.out".into(), status: "/w/logs/x.status".into() };
        for (script, launch) in [
            (SlurmManager::new(4).job(o.clone()).scheduler.clone().job_of(&o, &report), "srun --ntasks=4 /opt/sim --size 'a b'"),
            (SgeManager::new(4).job(o.clone()).scheduler.clone().job_of(&o, &report), "mpirun \"$@\" -np $NSLOTS /opt/sim --size 'a b'"),
        ] {
            assert!(script.contains(&format!("export {ENV_WHOLE_JOB}=1\n")), "{script}");
            assert!(script.ends_with(&format!("\n{launch} > /w/logs/x.out 2>&1\necho $? > /w/logs/x.status\n")), "{script}");
        }
    }

    trait JobOf {
        fn job_of(&self, o: &JobOptions, report: &Report) -> String;
    }

    impl<S: Scheduler> JobOf for S {
        fn job_of(&self, o: &JobOptions, report: &Report) -> String {
            let mut spec = JobSpec::new(o, 4, "/opt/sim", vec![(ENV_WHOLE_JOB.into(), "1".into())]);
            spec.args = vec!["--size".into(), "a b".into()];
            spec.report = Some(report.clone());
            self.job(&spec).unwrap().script
        }
    }

    #[test]
    fn a_status_counts_once_it_is_whole() {
        let dir = std::env::temp_dir().join(format!("cman-status-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s").display().to_string();
        assert_eq!(read_status(&path), None);
        std::fs::write(&path, "3").unwrap();
        assert_eq!(read_status(&path), None, "not yet ended by a newline");
        std::fs::write(&path, "3\n").unwrap();
        assert_eq!(read_status(&path), Some(3));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
