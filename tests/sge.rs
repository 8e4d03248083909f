//! Grid Engine, for real: sge_qmaster + sge_execd started by `ci/sge.sh`. Array jobs, a
//! parallel-environment job running `mpirun` (with `mpido!` over its ranks), `qrsh` workers,
//! a request that cannot be met, and a killed master; after each, `qstat` shows no job of ours.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use clusterman::launch::scheduler::{JobOptions, Layout, QrshManager, SgeManager};
use clusterman::prelude::*;
use clusterman::{Error, mpido};

clusterman::init_in_constructor!();

#[remote]
fn square(x: u64) -> u64 {
    x * x
}

#[remote]
fn sge_job() -> (Option<String>, Option<String>) {
    (std::env::var("JOB_ID").ok(), std::env::var("SGE_TASK_ID").ok())
}

fn sge_up() -> bool {
    let up = Command::new("qstat").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    assert!(up || !common::schedulers_required(), "CMAN_REQUIRE_SCHEDULERS is set but Grid Engine does not answer (ci/sge.sh start)");
    if !up {
        eprintln!("skipped: no Grid Engine here; start one with `ci/sge.sh start` and source its settings.sh");
    }
    up
}

fn name(tag: &str) -> String {
    format!("cman-{tag}-{}", std::process::id())
}

/// Test job options named exactly `name` (the tests find their jobs by it).
fn job(name: &str) -> JobOptions {
    common::test_job(name).name(name)
}

/// Lines of `qstat` for jobs named `name` (qstat truncates names to 10 characters, so match
/// on the job ids of `qstat -j`-resolvable names instead).
fn our_jobs(name: &str) -> String {
    let out = Command::new("qstat").args(["-j", name]).output().unwrap();
    if out.status.success() { String::from_utf8_lossy(&out.stdout).into_owned() } else { String::new() }
}

fn assert_no_job_left(name: &str) {
    assert!(common::wait_until(Duration::from_secs(20), || our_jobs(name).trim().is_empty()), "job {name} is still known to qstat:\n{}", our_jobs(name));
}

#[test]
fn an_array_job_of_independent_workers() {
    if !sge_up() {
        return;
    }
    let n = name("arr");
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(SgeManager::new(3).job(job(&n).layout(Layout::Array))).unwrap();
    let ids: Vec<(Option<String>, Option<String>)> = pids.iter().map(|p| cluster.remote_call_fetch(*p, sge_job, ()).unwrap()).collect();
    let tasks: std::collections::BTreeSet<String> = ids.iter().map(|(_, t)| t.clone().expect("an array task")).collect();
    assert_eq!(tasks.into_iter().collect::<Vec<_>>(), ["1", "2", "3"]);
    assert!(ids.iter().all(|(j, _)| j.is_some() && *j == ids[0].0), "one job: {ids:?}");
    assert_eq!(cluster.pmap(square, (0..20u64).map(|x| (x,))).unwrap()[19], 361);
    cluster.shutdown().unwrap();
    assert_no_job_left(&n);
}

#[test]
fn a_parallel_environment_job_runs_mpirun_and_mpido() {
    if !sge_up() {
        return;
    }
    let n = name("pe");
    let cluster = Cluster::new().unwrap();
    let sge = SgeManager::new(2).pe("mpi").job(job(&n));
    cluster.add_procs(&sge).unwrap();
    let world: Vec<(i32, i32)> = mpido!(sge, |comm| {
        comm.barrier();
        (comm.rank(), comm.size())
    })
    .unwrap();
    assert_eq!(world, vec![(0, 2), (1, 2)]);
    drop(cluster);
    assert_no_job_left(&n);
}

#[test]
fn qrsh_workers() {
    if !sge_up() {
        return;
    }
    let n = name("qrsh");
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(QrshManager::new(2).job(job(&n))).unwrap();
    for pid in &pids {
        let (job_id, _) = cluster.remote_call_fetch(*pid, sge_job, ()).unwrap();
        assert!(job_id.is_some(), "runs inside a Grid Engine job");
    }
    assert_eq!(cluster.remote_call_fetch(pids[1], square, (9,)).unwrap(), 81);
    cluster.shutdown().unwrap();
    assert_no_job_left(&n);
}

#[test]
fn qrsh_with_a_parallel_environment_forms_one_mpi_world() {
    if !sge_up() {
        return;
    }
    let n = name("qrsh-pe");
    let cluster = Cluster::new().unwrap();
    let qrsh = QrshManager::new(3).pe("mpi").job(job(&n));
    let pids = cluster.add_procs(&qrsh).unwrap();
    let world: Vec<(i32, i32)> = mpido!(qrsh, |comm| {
        comm.barrier();
        (comm.rank(), comm.size())
    })
    .unwrap();
    assert_eq!(world, vec![(0, 3), (1, 3), (2, 3)]);
    let jobs: Vec<Option<String>> = pids.iter().map(|p| cluster.remote_call_fetch(*p, sge_job, ()).unwrap().0).collect();
    assert!(jobs[0].is_some() && jobs.iter().all(|j| *j == jobs[0]), "one Grid Engine job: {jobs:?}");
    cluster.shutdown().unwrap();
    assert_no_job_left(&n);
}

#[test]
fn a_queued_qrsh_job_is_waited_for_its_launch_timeout_counting_from_its_start() {
    if !sge_up() {
        return;
    }
    // a job holding all 8 slots for 8 s keeps the qrsh job queued past its 3 s launch timeout
    let blocker = name("qrsh-blocker");
    let id = common::output_of(&["qsub", "-terse", "-b", "y", "-N", &blocker, "-pe", "mpi", "8", "-o", "/dev/null", "-j", "y", "sleep", "8"]);
    let running = || common::output_of(&["qstat"]).lines().any(|l| l.split_whitespace().next() == Some(id.trim()) && l.split_whitespace().nth(4) == Some("r"));
    assert!(common::wait_until(Duration::from_secs(60), running), "the blocking job never started");
    let n = name("qrsh-queued");
    let cluster = Cluster::new().unwrap();
    let started = std::time::Instant::now();
    let pids = cluster.add_procs(QrshManager::new(1).job(job(&n).launch_timeout(Duration::from_secs(3)))).unwrap();
    assert!(started.elapsed() > Duration::from_secs(3), "it did wait in the queue ({:?}) and still succeeded", started.elapsed());
    assert_eq!(pids.len(), 1);
    cluster.shutdown().unwrap();
    assert_no_job_left(&n);
    let _ = Command::new("qdel").arg(id.trim()).output();
}

#[test]
fn a_request_that_cannot_be_met_is_a_clear_error_and_leaves_nothing() {
    if !sge_up() {
        return;
    }
    let n = name("impossible");
    let cluster = Cluster::new().unwrap();
    let err = cluster.add_procs(SgeManager::new(64).pe("mpi").job(job(&n).queue_timeout(Duration::from_secs(10)))).unwrap_err();
    let text = err.to_string();
    eprintln!("the error a user sees: {text}");
    assert!(matches!(err, Error::Launch(_)), "{text}");
    assert!(text.contains("qsub refused the job") && text.contains("no suitable queues"), "refused at once (qsub -w e): {text}");
    assert_no_job_left(&n);
}

#[test]
#[ignore = "run by killing_the_master_cancels_its_job"]
fn master_to_be_killed() {
    let Ok(n) = std::env::var("CMAN_JOB_NAME") else { return };
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(SgeManager::new(2).job(job(&n).layout(Layout::Array))).unwrap();
    let os: Vec<String> = pids.iter().map(|p| cluster.worker_info(*p).unwrap().os_pid.to_string()).collect();
    println!("WORKERS {}", os.join(" "));
    std::thread::sleep(Duration::from_secs(120));
}

/// A program that submits itself as one job: run by the whole-program tests below.
#[test]
#[ignore = "run by a_program_runs_as_one_mpi_job_from_the_login_node"]
fn whole_program() {
    let Ok(name) = std::env::var("CMAN_JOB_NAME") else { return };
    SgeManager::new(3).job(common::whole_program_job(&name)).run_as_job().unwrap();
    common::whole_program_ranks(); // every rank of the job, on either transport
}

#[test]
fn a_program_runs_as_one_mpi_job_from_the_login_node() {
    if !sge_up() {
        return;
    }
    common::check_whole_program(name, Duration::from_secs(180), |name| !our_jobs(name).trim().is_empty());
}

#[test]
fn killing_the_master_cancels_its_job() {
    if !sge_up() {
        return;
    }
    let n = name("killed");
    let mut master = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "master_to_be_killed", "--nocapture"])
        .env("CMAN_JOB_NAME", &n)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let workers = common::read_workers_line(master.stdout.take().unwrap(), Duration::from_secs(90));
    assert!(!our_jobs(&n).trim().is_empty(), "the job runs");
    master.kill().unwrap();
    master.wait().unwrap();
    assert_no_job_left(&n);
    assert!(common::wait_until(Duration::from_secs(10), || workers.iter().all(|p| !common::process_alive(*p))), "workers still alive");
}

#[test]
fn no_other_user_finds_the_secret_of_grid_engine_jobs() {
    if !sge_up() {
        return;
    }
    let n = name("scan");
    let dir = common::temp_dir("sge-scan");
    let cluster = Cluster::new().unwrap();
    let sge = SgeManager::new(2).pe("mpi").job(job(&n).workdir(dir.clone()));
    let pids = cluster.add_procs(&sge).unwrap();
    let qrsh = cluster.add_procs(QrshManager::new(1).job(JobOptions::new().name(format!("{n}q")).workdir(dir.clone()))).unwrap();
    let secret = clusterman::__private::secret_hex(&cluster).unwrap();
    let (id, _) = cluster.remote_call_fetch(pids[0], sge_job, ()).unwrap();
    let (qrsh_id, _) = cluster.remote_call_fetch(qrsh[0], sge_job, ()).unwrap();
    assert_eq!(common::secret_files(&dir).len(), 1, "the PE job's workers read the secret from a file; qrsh's get it on stdin");
    let all: Vec<Pid> = pids.iter().chain(&qrsh).copied().collect();
    assert_eq!(common::secret_in_processes(&secret, &common::worker_os_pids(&cluster, &all)), Vec::<String>::new());
    let places = [dir.as_path(), std::path::Path::new("/var/spool/gridengine"), &std::env::temp_dir()];
    let commands = [format!("qstat -j {}", id.unwrap()), format!("qstat -j {}", qrsh_id.unwrap()), "qstat -f -u '*'".to_string()];
    common::assert_nobody_finds(&secret, &places, &commands);
    cluster.shutdown().unwrap();
    assert_no_job_left(&n);
    assert!(common::secret_files(&dir).is_empty(), "the secret file goes with the launch");
}
