//! PBS, Torque and PBS Pro, through a fake `qsub`/`qstat`/`qdel` (tests/fixtures/pbs: small
//! python scripts that run the job on this machine, in the dialect `FAKE_PBS_DIALECT`
//! names, and keep its state in a directory, one per test). Array jobs and MPI jobs running
//! `mpirun` (with `mpido!`) in both dialects, each leaving the job finished and no process
//! behind; and the error paths: `qsub` missing, a refused submission, a job that never starts.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use clusterman::launch::scheduler::pbs::{PbsDialect, PbsManager};
use clusterman::launch::scheduler::{JobOptions, Layout, Memory};
use clusterman::prelude::*;
use clusterman::Error;

clusterman::init_in_constructor!();

#[remote]
fn square(x: u64) -> u64 {
    x * x
}

/// `PBS_JOBID`, the array index (Torque's or PBS Pro's variable) and the working directory.
#[remote]
fn pbs_task() -> (Option<String>, Option<String>, PathBuf) {
    let index = std::env::var("PBS_ARRAYID").or_else(|_| std::env::var("PBS_ARRAY_INDEX")).ok();
    (std::env::var("PBS_JOBID").ok(), index, std::env::current_dir().unwrap())
}

#[remote]
fn mpirun_hosts() -> Option<Vec<String>> {
    common::launcher_hostfile()
}

/// One fake PBS server: its state directory and the command prefix that reaches it.
struct FakePbs {
    state: PathBuf,
    prefix: Vec<String>,
}

impl FakePbs {
    /// A fresh fake PBS speaking `dialect` (`torque` or `pbspro`); `faults` are `FAKE_...`
    /// settings for it.
    fn new(tag: &str, dialect: &str, faults: &[&str]) -> Self {
        let state = common::temp_dir(&format!("pbs-state-{tag}"));
        let mut prefix = common::fixtures_prefix("pbs");
        prefix.push(format!("FAKE_PBS_STATE={}", state.display()));
        prefix.push(format!("FAKE_PBS_DIALECT={dialect}"));
        prefix.push("FAKE_PBS_SERVER=headnode".into());
        prefix.extend(faults.iter().map(|f| f.to_string()));
        FakePbs { state, prefix }
    }

    /// Job options for a test: a unique name, a scratch working directory, this fake.
    fn job(&self, tag: &str) -> JobOptions {
        common::test_job(tag).command_prefix(self.prefix.clone())
    }

    /// The sequence numbers of the jobs submitted to this fake.
    fn jobs(&self) -> Vec<String> {
        std::fs::read_dir(&self.state).unwrap().filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.parse::<u32>().is_ok()).collect()
    }

    /// What the fake says of job `id`: `qstat -f` (with the array's tasks and, under PBS
    /// Pro, finished jobs too).
    fn qstat(&self, id: &str) -> String {
        let history: &[&str] = if self.prefix.iter().any(|a| a == "FAKE_PBS_DIALECT=pbspro") { &["-x"] } else { &[] };
        let out = Command::new(&self.prefix[0]).args(&self.prefix[1..]).args(["qstat", "-f", "-t"]).args(history).arg(id).output().unwrap();
        assert!(out.status.success(), "qstat {id}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until every record of job `id` has finished in `state` with `exit` status, and
    /// none of its processes is left.
    fn assert_job_ended(&self, id: &str, states: &[&str], exit: &str) {
        let ended = || {
            let text = self.qstat(id);
            let finished = text.lines().filter_map(|l| l.trim().strip_prefix("job_state = ")).all(|s| states.contains(&s));
            finished && text.lines().filter_map(|l| l.trim().split_once("xit_status = ")).all(|(_, e)| e == exit)
        };
        assert!(common::wait_until(Duration::from_secs(15), ended), "job {id} should be {states:?} with exit status {exit}:\n{}", self.qstat(id));
        let seq = id.split(['[', '.']).next().unwrap();
        common::assert_gone(&common::fake_job_groups(&self.state.join(seq)));
    }
}


/// An array of 3 through a fake of `dialect`, which the manager detects from `qstat --version`;
/// the job runs in the directory given by `wd`, where PBS also writes its logs.
fn array_job(dialect: &str, log_names: [&str; 3]) {
    let pbs = FakePbs::new(&format!("array-{dialect}"), dialect, &[]);
    let name = format!("cman-pbs-{dialect}-array-{}", std::process::id());
    let wd = common::temp_dir(&format!("pbs-wd-{dialect}"));
    let cluster = Cluster::new().unwrap();
    // wd wins over the JobOptions::workdir that pbs.job sets
    let manager = PbsManager::new(3).job(pbs.job(&format!("pbs-{dialect}-array")).layout(Layout::Array)).wd(&wd);
    let pids = cluster.add_procs(&manager).unwrap();
    let tasks: Vec<(Option<String>, Option<String>, PathBuf)> = pids.iter().map(|p| cluster.remote_call_fetch(*p, pbs_task, ()).unwrap()).collect();
    let indices: BTreeSet<String> = tasks.iter().map(|(_, i, _)| i.clone().expect("an array task")).collect();
    assert_eq!(indices.into_iter().collect::<Vec<_>>(), ["1", "2", "3"]);
    let seq = &pbs.jobs()[0];
    for (job_id, index, dir) in &tasks {
        assert_eq!(job_id.as_deref(), Some(format!("{seq}[{}].headnode", index.as_ref().unwrap()).as_str()));
        assert_eq!(dir, &wd, "the job changed to its working directory");
    }
    assert_eq!(cluster.pmap(square, (0..20u64).map(|x| (x,))).unwrap(), (0..20u64).map(|x| x * x).collect::<Vec<_>>());
    let os_pids = common::worker_os_pids(&cluster, &pids);
    cluster.shutdown().unwrap();
    let finished: &[&str] = if dialect == "torque" { &["C"] } else { &["F", "X"] };
    pbs.assert_job_ended(&format!("{seq}[].headnode"), finished, "0");
    common::assert_gone(&os_pids);
    for log in log_names {
        let log = wd.join("clusterman-logs").join(log.replace("<name>", &name).replace("<seq>", seq));
        assert!(log.exists(), "PBS's log {} is in the log directory of the working directory", log.display());
    }
}

#[test]
fn pbs_torque_array_job_with_the_dialect_detected() {
    array_job("torque", ["<name>.o<seq>-1", "<name>.o<seq>-2", "<name>.o<seq>-3"]);
}

#[test]
fn pbs_pro_array_job_with_the_dialect_detected() {
    array_job("pbspro", ["<seq>[1].headnode.OU", "<seq>[2].headnode.OU", "<seq>[3].headnode.OU"]);
}

#[test]
fn torque_2_is_told_from_its_lower_case_version_line() {
    let pbs = FakePbs::new("torque-2", "torque", &["FAKE_PBS_TORQUE_VERSION=2.5.13"]);
    let script = PbsManager::new(2).job(pbs.job("pbs-torque-2").layout(Layout::Array)).job_script().unwrap();
    assert!(script.contains("#PBS -t 1-2\n"), "detected as Torque: {script}");
}

#[test]
fn pbs_pro_array_of_one_worker_is_a_range_pbs_pro_accepts() {
    // PBS Pro refuses `-J 1-1` (the range must grow); the fake refuses it too
    let pbs = FakePbs::new("pro-one", "pbspro", &[]);
    let refused = Command::new(&pbs.prefix[0]).args(&pbs.prefix[1..]).args(["qsub", "-J", "1-1", "-r", "y"]).stdin(std::process::Stdio::piped()).output().unwrap();
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("illegal -J value"), "{refused:?}");
    let cluster = Cluster::new().unwrap();
    let manager = PbsManager::new(1).dialect(PbsDialect::PbsPro).job(pbs.job("pbs-pro-one").layout(Layout::Array));
    let pids = cluster.add_procs(&manager).unwrap();
    let (job_id, index, _) = cluster.remote_call_fetch(pids[0], pbs_task, ()).unwrap();
    assert_eq!(index.as_deref(), Some("1"), "the one subjob has index 1 ({job_id:?})");
    cluster.shutdown().unwrap();
}

/// An MPI job of 2 ranks of `cpus` CPUs each through a fake of `dialect`, chosen explicitly:
/// mpirun places one rank on each of the job's nodes (the fake's are names of this host).
fn mpi_job(dialect: PbsDialect, fake: &str, cpus: u32, resources: &str, finished: &str) {
    let pbs = FakePbs::new(&format!("mpi-{fake}"), fake, &[]);
    let cluster = Cluster::new().unwrap();
    let job = pbs.job(&format!("pbs-{fake}-mpi")).cpus_per_worker(cpus).launcher(common::mpi_launcher());
    let manager = PbsManager::new(2).dialect(dialect).job(job);
    let script = manager.job_script().unwrap();
    assert!(script.contains(resources) && script.contains(&format!("exec {} \"$@\" -np 2 -hostfile ", common::mpi_launcher())), "{script}");
    let pids = cluster.add_procs(&manager).unwrap();
    common::assert_one_world(&manager, 2);
    let nodes = Some(vec!["localhost".to_string(), "127.0.0.1".to_string()]);
    assert_eq!(cluster.remote_call_fetch(pids[0], mpirun_hosts, ()).unwrap(), nodes, "mpirun's hostfile: one line per worker, on the job's nodes");
    assert_eq!(cluster.pmap(square, (0..10u64).map(|x| (x,))).unwrap()[9], 81);
    let os_pids = common::worker_os_pids(&cluster, &pids);
    drop(cluster); // drop shuts down too
    pbs.assert_job_ended(&format!("{}.headnode", pbs.jobs()[0]), &[finished], "0");
    common::assert_gone(&os_pids);
}

#[test]
fn pbs_torque_mpi_job_runs_mpirun_and_mpido() {
    // Torque's nodefile has a line per processor: localhost twice, then 127.0.0.1 twice
    mpi_job(PbsDialect::Torque, "torque", 2, "#PBS -l nodes=2:ppn=2\n", "C");
}

#[test]
fn pbs_pro_mpi_job_runs_mpirun_and_mpido() {
    mpi_job(PbsDialect::PbsPro, "pbspro", 1, "#PBS -l select=2:ncpus=1:mpiprocs=1\n", "F");
}

#[test]
fn pbs_missing_commands_are_named_with_the_prefix_option() {
    let cluster = Cluster::new().unwrap();
    let options = |prefix: &[&str]| JobOptions::new().workdir(common::temp_dir("pbs-missing")).command_prefix(prefix.iter().copied());
    let err = cluster.add_procs(PbsManager::new(1).dialect(PbsDialect::Torque).job(options(&["/nonexistent/pbs-login"]))).unwrap_err().to_string();
    assert!(err.contains("cannot run `/nonexistent/pbs-login`") && err.contains("JobOptions::command_prefix (/nonexistent/pbs-login)"), "{err}");
    // the dialect is asked of qstat first: its absence is named
    let err = cluster.add_procs(PbsManager::new(1).job(options(&["env", "PATH=/nonexistent"]))).unwrap_err().to_string();
    assert!(err.contains("qstat --version") && err.contains("qstat") && err.contains("No such file or directory") && err.contains("PbsManager::dialect"), "{err}");
    // a missing qsub behind the prefix is the prefix's error (see the LSF test about the pipe)
    let err = cluster.add_procs(PbsManager::new(1).dialect(PbsDialect::PbsPro).job(options(&["env", "PATH=/nonexistent"]))).unwrap_err().to_string();
    let shown = err.contains("qsub refused the job") && err.contains("No such file or directory");
    assert!(shown || err.contains("writing the job script to `env`: Broken pipe"), "{err}");
}

#[test]
fn pbs_refused_submission_shows_qsub_stderr() {
    let pbs = FakePbs::new("refused", "torque", &[]);
    let cluster = Cluster::new().unwrap();
    let err = cluster.add_procs(PbsManager::new(2).dialect(PbsDialect::Torque).job(pbs.job("pbs-refused").queue("nosuch"))).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Launch(_)), "{text}");
    assert!(text.contains("qsub refused the job") && text.contains("qsub: submit error (Unknown queue  MSG=requested queue not found)"), "{text}");
    // a dialect mix-up is refused by the scheduler, too: PBS Pro has no pmem
    let pro = FakePbs::new("mixed", "pbspro", &[]);
    let err = cluster.add_procs(PbsManager::new(2).dialect(PbsDialect::Torque).job(pro.job("pbs-mixed").memory(Memory::gib(1)))).unwrap_err().to_string();
    assert!(err.contains("qsub: Unknown resource Resource_List.pmem"), "{err}");
    assert!(pbs.jobs().is_empty() && pro.jobs().is_empty());
}

#[test]
fn pbs_job_that_never_starts_is_cancelled_after_the_queue_timeout() {
    // held in the queue, or (PBS Pro) moved on to another server: waiting, not ended
    for fault in ["FAKE_HOLD=1", "FAKE_PBS_MOVED=1"] {
        let pbs = FakePbs::new("held", "pbspro", &[fault]);
        let cluster = Cluster::new().unwrap();
        let manager = PbsManager::new(2).job(pbs.job("pbs-held").layout(Layout::Array).queue_timeout(Duration::from_secs(3)));
        let err = cluster.add_procs(&manager).unwrap_err().to_string();
        eprintln!("the error a user sees: {err}");
        assert!(err.contains("still queued after 3s") && err.contains("pbs job") && err.contains("pending"), "{fault}: {err}");
        pbs.assert_job_ended(&format!("{}[].headnode", pbs.jobs()[0]), &["F", "X"], "271"); // qdel'ed
        assert!(cluster.workers().is_empty());
    }
}

#[test]
fn pbs_memory_is_written_in_pbs_units_which_refuse_gi() {
    for dialect in ["torque", "pbspro"] {
        let pbs = FakePbs::new(&format!("mem-{dialect}"), dialect, &[]);
        let cluster = Cluster::new().unwrap();
        let manager = PbsManager::new(1).job(pbs.job(&format!("pbs-mem-{dialect}")).layout(Layout::Array).memory(Memory::mib(1536)));
        assert!(manager.job_script().unwrap().contains("mem=1536mb"), "{}", manager.job_script().unwrap());
        assert_eq!(cluster.add_procs(&manager).unwrap().len(), 1);
        // what a user might have written by hand, and PBS refuses
        let err = cluster.add_procs(PbsManager::new(1).job(pbs.job("pbs-gi").layout(Layout::Array).extra_directive("-l mem=4Gi"))).unwrap_err().to_string();
        assert!(err.contains("Illegal attribute or resource value"), "{err}");
        cluster.shutdown().unwrap();
    }
}
