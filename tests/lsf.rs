//! LSF through a fake `bsub`/`bjobs`/`bkill` (tests/fixtures/lsf: small python scripts that
//! run the job on this machine and keep its state in a directory, one per test). An array
//! job and an MPI job running `mpirun` (with `mpido!`), each leaving the job DONE and no
//! process behind; and the error paths: `bsub` missing, a refused submission, a job that
//! never starts, transient `bsub` failures overcome by retrying.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use clusterman::launch::scheduler::lsf::LsfManager;
use clusterman::launch::scheduler::{JobOptions, Layout, LimitsUnit, Memory};
use clusterman::prelude::*;
use clusterman::Error;

clusterman::init_in_constructor!();

#[remote]
fn square(x: u64) -> u64 {
    x * x
}

#[remote]
fn lsf_job() -> (Option<String>, Option<String>) {
    (std::env::var("LSB_JOBID").ok(), std::env::var("LSB_JOBINDEX").ok())
}

/// One fake LSF: its state directory and the command prefix that reaches it.
struct FakeLsf {
    state: PathBuf,
    prefix: Vec<String>,
}

impl FakeLsf {
    /// A fresh fake LSF; `faults` are `FAKE_...=...` settings for it.
    fn new(tag: &str, faults: &[&str]) -> Self {
        let state = common::temp_dir(&format!("lsf-state-{tag}"));
        let mut prefix = common::fixtures_prefix("lsf");
        prefix.push(format!("FAKE_LSF_STATE={}", state.display()));
        prefix.extend(faults.iter().map(|f| f.to_string()));
        FakeLsf { state, prefix }
    }

    /// Job options for a test: a unique name, a scratch working directory, this fake.
    fn job(&self, tag: &str) -> JobOptions {
        common::test_job(tag).command_prefix(self.prefix.clone())
    }

    /// The ids of the jobs submitted to this fake.
    fn jobs(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.state).unwrap().filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.parse::<u32>().is_ok()).collect();
        ids.sort();
        ids
    }

    /// What the fake `bjobs` says of every element of job `id` (its STAT column).
    fn stats(&self, id: &str) -> Vec<String> {
        let out = Command::new(&self.prefix[0]).args(&self.prefix[1..]).args(["bjobs", "-w", id]).output().unwrap();
        assert!(out.status.success(), "bjobs {id}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().skip(1).filter_map(|l| l.split_whitespace().nth(2)).map(String::from).collect()
    }

    /// Waits until every element of the only job is `stat`, and none of its processes is left.
    fn assert_job_ended(&self, stat: &str) {
        let jobs = self.jobs();
        assert_eq!(jobs.len(), 1, "one job: {jobs:?}");
        let ended = || self.stats(&jobs[0]).iter().all(|s| s == stat);
        assert!(common::wait_until(Duration::from_secs(15), ended), "job {} should be {stat}: {:?}", jobs[0], self.stats(&jobs[0]));
        common::assert_gone(&common::fake_job_groups(&self.state.join(&jobs[0])));
    }
}


#[test]
fn lsf_array_job_of_independent_workers() {
    let lsf = FakeLsf::new("array", &[]);
    let cluster = Cluster::new().unwrap();
    let wd = common::temp_dir("lsf-array-wd");
    let manager = LsfManager::new(3).job(lsf.job("lsf-array").workdir(&wd).layout(Layout::Array)).throttle(1);
    assert!(manager.job_script().unwrap().contains("#BSUB -J \"cman-lsf-array-"), "{}", manager.job_script().unwrap());
    let pids = cluster.add_procs(&manager).unwrap();
    let ids: Vec<(Option<String>, Option<String>)> = pids.iter().map(|p| cluster.remote_call_fetch(*p, lsf_job, ()).unwrap()).collect();
    let indices: BTreeSet<String> = ids.iter().map(|(_, i)| i.clone().expect("an array element")).collect();
    assert_eq!(indices.into_iter().collect::<Vec<_>>(), ["1", "2", "3"]);
    assert!(ids.iter().all(|(j, _)| *j == Some(lsf.jobs()[0].clone())), "one job: {ids:?}");
    assert_eq!(cluster.pmap(square, (0..20u64).map(|x| (x,))).unwrap(), (0..20u64).map(|x| x * x).collect::<Vec<_>>());
    let os_pids = common::worker_os_pids(&cluster, &pids);
    cluster.shutdown().unwrap();
    lsf.assert_job_ended("DONE");
    common::assert_gone(&os_pids);
    for index in 1..=3 {
        let log = wd.join("clusterman-logs").join(format!("cman-lsf-array-{}.{}.{index}.out", std::process::id(), lsf.jobs()[0]));
        assert!(log.exists(), "the element's log {} is in the working directory", log.display());
    }
}

#[remote]
fn mpirun_hosts() -> Option<Vec<String>> {
    common::launcher_hostfile()
}

#[test]
fn lsf_mpi_job_runs_mpirun_and_mpido() {
    let lsf = FakeLsf::new("mpi", &[]);
    let cluster = Cluster::new().unwrap();
    let manager = LsfManager::new(2).job(lsf.job("lsf-mpi").launcher(common::mpi_launcher()));
    let script = manager.job_script().unwrap();
    assert!(script.contains("#BSUB -n 2\n") && script.contains(&format!("exec {} \"$@\" -np 2 -hostfile ", common::mpi_launcher())), "{script}");
    let pids = cluster.add_procs(&manager).unwrap();
    common::assert_one_world(&manager, 2);
    let hosts = cluster.remote_call_fetch(pids[0], mpirun_hosts, ()).unwrap();
    assert_eq!(hosts, Some(vec!["localhost".to_string(), "127.0.0.1".to_string()]), "mpirun reads the job's hosts (LSB_DJOB_HOSTFILE)");
    assert_eq!(cluster.pmap(square, (0..10u64).map(|x| (x,))).unwrap()[9], 81);
    let os_pids = common::worker_os_pids(&cluster, &pids);
    cluster.shutdown().unwrap();
    lsf.assert_job_ended("DONE");
    common::assert_gone(&os_pids);
}

#[test]
fn lsf_missing_bsub_names_the_command_and_the_prefix_option() {
    let cluster = Cluster::new().unwrap();
    if !common::have("bsub") {
        // no LSF on this machine: the plain command is missing
        let options = JobOptions::new().workdir(common::temp_dir("lsf-missing"));
        let err = cluster.add_procs(LsfManager::new(1).job(options).retry_delays([])).unwrap_err().to_string();
        assert!(err.contains("cannot run `bsub`") && err.contains("JobOptions::command_prefix"), "{err}");
    }
    let options = JobOptions::new().workdir(common::temp_dir("lsf-missing")).command_prefix(["/nonexistent/lsf-login"]);
    let err = cluster.add_procs(LsfManager::new(1).job(options).retry_delays([])).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/lsf-login") && err.contains("JobOptions::command_prefix (/nonexistent/lsf-login)"), "{err}");
    // behind a prefix, a missing bsub is the prefix's error (env: 'bsub': No such file...).
    // `env` may exit before the script is written to it: the library then reports the
    // broken pipe instead (a race in scheduler::run, reported to be fixed there)
    let options = JobOptions::new().workdir(common::temp_dir("lsf-missing")).command_prefix(["env", "PATH=/nonexistent"]);
    let err = cluster.add_procs(LsfManager::new(1).job(options).retry_delays([])).unwrap_err().to_string();
    let shown = err.contains("bsub refused the job") && err.contains("No such file or directory");
    assert!(shown || err.contains("writing the job script to `env`: Broken pipe"), "{err}");
}

#[test]
fn lsf_refused_submission_shows_bsub_stderr() {
    let lsf = FakeLsf::new("refused", &[]);
    let cluster = Cluster::new().unwrap();
    let manager = LsfManager::new(2).job(lsf.job("lsf-refused").queue("nosuch")).retry_delays([]);
    let err = cluster.add_procs(&manager).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Launch(_)), "{text}");
    assert!(text.contains("bsub refused the job") && text.contains("nosuch: No such queue. Job not submitted."), "{text}");
    assert!(lsf.jobs().is_empty(), "nothing submitted: {:?}", lsf.jobs());
}

#[test]
fn lsf_a_host_waking_up_is_waited_for_before_the_launch_timeout_starts() {
    // PROV for 4 s: the job has not started yet, so a 2 s launch timeout is not running
    let lsf = FakeLsf::new("prov", &["FAKE_LSF_PROV=4"]);
    let cluster = Cluster::new().unwrap();
    let started = std::time::Instant::now();
    let manager = LsfManager::new(1).job(lsf.job("lsf-prov").layout(Layout::Array).launch_timeout(Duration::from_secs(2)));
    assert_eq!(cluster.add_procs(&manager).unwrap().len(), 1);
    assert!(started.elapsed() > Duration::from_secs(4), "{:?}", started.elapsed());
    cluster.shutdown().unwrap();
    lsf.assert_job_ended("DONE");
}

#[test]
fn lsf_job_that_never_starts_is_cancelled_after_the_queue_timeout() {
    let lsf = FakeLsf::new("held", &["FAKE_HOLD=1"]);
    let cluster = Cluster::new().unwrap();
    let manager = LsfManager::new(2).job(lsf.job("lsf-held").layout(Layout::Array).queue_timeout(Duration::from_secs(3)));
    let err = cluster.add_procs(&manager).unwrap_err().to_string();
    eprintln!("the error a user sees: {err}");
    assert!(err.contains("still queued after 3s") && err.contains("lsf job") && err.contains("pending"), "{err}");
    lsf.assert_job_ended("EXIT"); // bkill'ed
    assert!(cluster.workers().is_empty());
}

#[test]
fn lsf_transient_bsub_failures_are_retried() {
    let cluster = Cluster::new().unwrap();
    // failing more often than the delays allow: the last failure is the error
    let lsf = FakeLsf::new("transient-out", &["FAKE_BSUB_FAIL_TIMES=5"]);
    let manager = LsfManager::new(1).job(lsf.job("lsf-transient-out")).retry_delays([Duration::from_millis(10); 2]);
    let err = cluster.add_procs(&manager).unwrap_err().to_string();
    assert!(err.contains("bsub refused the job") && err.contains("Slave LIM configuration is not ready yet"), "{err}");
    assert_eq!(std::fs::read_to_string(lsf.state.join("bsub-failures")).unwrap(), "3", "three tries");
    assert!(lsf.jobs().is_empty());

    let lsf = FakeLsf::new("transient", &["FAKE_BSUB_FAIL_TIMES=2"]);
    let manager = LsfManager::new(1).job(lsf.job("lsf-transient").layout(Layout::Array)).retry_delays([Duration::from_millis(100); 3]);
    let pids = cluster.add_procs(&manager).unwrap();
    assert_eq!(std::fs::read_to_string(lsf.state.join("bsub-failures")).unwrap(), "2", "bsub failed twice first");
    assert_eq!(cluster.remote_call_fetch(pids[0], square, (7,)).unwrap(), 49);
    cluster.shutdown().unwrap();
    lsf.assert_job_ended("DONE");
}

#[test]
fn an_old_lsf_takes_memory_as_a_bare_number_and_its_jobs_are_followed_without_bjobs_o() {
    // 9.0: no units on memory sizes (before 10.1.0.2), no `bjobs -o` (before 9.1)
    let lsf = FakeLsf::new("old", &["FAKE_LSF_VERSION=9.0.1"]);
    let cluster = Cluster::new().unwrap();
    let job = || lsf.job("lsf-old").layout(Layout::Array).memory(Memory::gib(2));
    let err = cluster.add_procs(LsfManager::new(1).job(job()).retry_delays([])).unwrap_err().to_string();
    assert!(err.contains("2GB: Bad memory limit specification"), "a unit is refused there: {err}");
    let manager = LsfManager::new(1).job(job()).limits_unit(LimitsUnit::Mb);
    assert!(manager.job_script().unwrap().contains("#BSUB -M 2048\n#BSUB -R \"rusage[mem=2048]\"\n"), "{}", manager.job_script().unwrap());
    assert_eq!(cluster.add_procs(&manager).unwrap().len(), 1);
    cluster.shutdown().unwrap();
    lsf.assert_job_ended("DONE"); // its end was seen: not cancelled as a job of unknown state
}
