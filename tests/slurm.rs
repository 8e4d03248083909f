//! Slurm, for real: a single-node slurmctld + slurmd started by `ci/slurm.sh`. Jobs are
//! submitted with `sbatch`, their workers dial in, `mpido!` runs over the job's ranks, and
//! after every test `squeue` shows no job of ours.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use clusterman::launch::scheduler::{JobOptions, Layout, SlurmManager};
use clusterman::prelude::*;
use clusterman::mpi::MpiManager;
use clusterman::{Error, mpido};

clusterman::init_in_constructor!();

#[remote]
fn square(x: u64) -> u64 {
    x * x
}

#[remote]
fn job_id_here() -> Option<String> {
    std::env::var("SLURM_JOB_ID").ok()
}

#[remote]
fn env_here(key: String) -> Option<String> {
    std::env::var(key).ok()
}

/// Slurm is there (or the test must fail because CI promised it).
fn slurm_up() -> bool {
    let up = Command::new("sinfo").arg("-h").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    assert!(up || !common::schedulers_required(), "CMAN_REQUIRE_SCHEDULERS is set but Slurm does not answer (ci/slurm.sh start)");
    if !up {
        eprintln!("skipped: no Slurm here; start one with `ci/slurm.sh start`");
    }
    up
}

/// Job options for a test: a unique name (to find our jobs) and a scratch working directory.
fn job(tag: &str) -> JobOptions {
    common::test_job(tag)
}

fn our_jobs(name: &str) -> String {
    common::output_of(&["squeue", "-h", "-n", name, "-o", "%i %T"])
}

fn assert_no_job_left(name: &str) {
    assert!(common::wait_until(Duration::from_secs(15), || our_jobs(name).trim().is_empty()), "jobs left in the queue: {}", our_jobs(name));
}

#[test]
fn sbatch_with_srun_forms_one_mpi_world() {
    if !slurm_up() {
        return;
    }
    let options = job("srun");
    let name = options_name(&options);
    let cluster = Cluster::new().unwrap();
    let slurm = SlurmManager::new(3).job(options);
    let pids = cluster.add_procs(&slurm).unwrap();
    assert_eq!(pids.len(), 3);
    let ranks: Vec<(i32, i32)> = mpido!(slurm, |comm| (comm.rank(), comm.size())).unwrap();
    assert_eq!(ranks, vec![(0, 3), (1, 3), (2, 3)]);
    let jobs: Vec<Option<String>> = pids.iter().map(|p| cluster.remote_call_fetch(*p, job_id_here, ()).unwrap()).collect();
    assert!(jobs.iter().all(|j| j.is_some() && *j == jobs[0]), "all workers in one job: {jobs:?}");
    assert_eq!(cluster.pmap(square, (0..50u64).map(|x| (x,))).unwrap(), (0..50u64).map(|x| x * x).collect::<Vec<_>>());
    cluster.shutdown().unwrap();
    assert_no_job_left(&name);
}

#[test]
fn sbatch_with_mpirun_inside_the_job() {
    if !slurm_up() {
        return;
    }
    let options = job("mpirun").launcher("mpirun");
    let name = options_name(&options);
    let cluster = Cluster::new().unwrap();
    let slurm = SlurmManager::new(2).job(options);
    assert!(slurm.job_script().unwrap().contains("exec mpirun "), "{}", slurm.job_script().unwrap());
    cluster.add_procs(&slurm).unwrap();
    let sums: Vec<i32> = mpido!(slurm, |comm| {
        let mut sum = 0;
        comm.all_reduce_into(&(comm.rank() + 1), &mut sum, clusterman::mpi::SystemOperation::sum());
        sum
    })
    .unwrap();
    assert_eq!(sums, vec![3, 3]);
    drop(cluster); // drop shuts down and cancels too
    assert_no_job_left(&name);
}

#[test]
fn keywords_are_srun_flags_and_reach_the_allocation() {
    if !slurm_up() {
        return;
    }
    let dir = common::temp_dir("keywords");
    let options = job("keywords").workdir(&dir);
    let name = options_name(&options);
    let cluster = Cluster::new().unwrap();
    // ClusterManagers.jl's keywords: srun-only flags (sbatch refuses --mpi, --cpu-bind, ...)
    // beside flags of the allocation
    let slurm = SlurmManager::new(2)
        .job(options)
        .option("mpi", "pmix")
        .option("cpu_bind", "cores")
        .option("unbuffered", "")
        .option("kill_on_bad_exit", 1)
        .option("partition", "debug")
        .option("t", "00:05:00")
        .option("mem_per_cpu", 100)
        .option("exclusive", "")
        .option("o", "task-%j-%t.out");
    let pids = cluster.add_procs(&slurm).unwrap();
    assert_eq!(mpido!(slurm, |comm| comm.size()).unwrap(), vec![2, 2], "one MPI world");
    let env = |key: &str| -> Vec<Option<String>> { pids.iter().map(|p| cluster.remote_call_fetch(*p, env_here, (key.to_string(),)).unwrap()).collect() };
    assert_eq!(env("SLURM_CPU_BIND_TYPE"), vec![Some("cores".to_string()); 2], "srun got --cpu-bind=cores");
    assert_eq!(env("PYTHONUNBUFFERED"), vec![Some("1".to_string()); 2], "srun got --unbuffered");
    let id = cluster.remote_call_fetch(pids[0], job_id_here, ()).unwrap().unwrap();
    let job = common::output_of(&["scontrol", "show", "job", &id]);
    for reached in ["Partition=debug", "TimeLimit=00:05:00", "MinMemoryCPU=100M", "OverSubscribe=NO"] {
        assert!(job.contains(reached), "the allocation lacks {reached}: {job}");
    }
    cluster.shutdown().unwrap();
    assert_no_job_left(&name);
    for task in 0..2 {
        let file = dir.join(format!("task-{id}-{task}.out"));
        assert!(file.exists(), "srun's -o with %j/%t: no {}", file.display());
    }
}

#[test]
fn an_array_of_independent_workers() {
    if !slurm_up() {
        return;
    }
    let options = job("array").layout(Layout::Array);
    let name = options_name(&options);
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(SlurmManager::new(3).job(options)).unwrap();
    assert_eq!(pids.len(), 3);
    let squares = cluster.pmap(square, (0..30u64).map(|x| (x,))).unwrap();
    assert_eq!(squares[29], 29 * 29);
    cluster.shutdown().unwrap();
    assert_no_job_left(&name);
}

#[test]
fn a_job_that_cannot_start_is_a_clear_error_and_leaves_nothing() {
    if !slurm_up() {
        return;
    }
    let options = job("impossible").queue_timeout(Duration::from_secs(10));
    let name = options_name(&options);
    let cluster = Cluster::new().unwrap();
    // 64 tasks on a node with 8 CPUs: refused at submission, or failed at once as pending
    // for a reason that cannot clear, or (at worst) still queued at the queue timeout
    let err = cluster.add_procs(SlurmManager::new(64).job(options)).unwrap_err();
    let text = err.to_string();
    eprintln!("the error a user sees: {text}");
    assert!(matches!(err, Error::Launch(_)), "{text}");
    assert!(text.contains("sbatch refused the job") || text.contains("can never start") || text.contains("still queued"), "{text}");
    assert_no_job_left(&name);
    assert!(cluster.workers().is_empty());
}

#[test]
fn a_job_that_can_never_start_fails_at_once_naming_the_reason() {
    if !slurm_up() {
        return;
    }
    // ci/slurm.sh's partition `short` allows 1 minute: a 10-minute job pends there for ever
    let options = job("never");
    let name = options_name(&options);
    let cluster = Cluster::new().unwrap();
    let started = std::time::Instant::now();
    let err = cluster.add_procs(SlurmManager::new(1).option("partition", "short").option("t", "10").job(options)).unwrap_err().to_string();
    // (Slurm names the time limit, or the partition's configuration as a whole)
    assert!(err.contains("can never start") && (err.contains("PartitionTimeLimit") || err.contains("PartitionConfig")), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "at once, not at a timeout: {:?}", started.elapsed());
    assert_no_job_left(&name);
}

#[test]
fn the_launch_timeout_counts_from_the_job_start_not_from_submission() {
    if !slurm_up() {
        return;
    }
    // a job holding all 8 CPUs for 10 s keeps ours queued longer than its 3 s launch timeout
    let blocker = common::output_of(&["sbatch", "--parsable", "-n", "8", "-J", &format!("cman-blocker-{}", std::process::id()), "-o", "/dev/null", "--wrap", "sleep 10"]);
    // (other tests' jobs may hold CPUs for a moment: ours must queue behind a running blocker)
    let running = || common::output_of(&["squeue", "-h", "-j", blocker.trim(), "-o", "%T"]).trim() == "RUNNING";
    assert!(common::wait_until(Duration::from_secs(60), running), "the blocking job never started");
    let options = job("queued").launch_timeout(Duration::from_secs(3));
    let name = options_name(&options);
    let cluster = Cluster::new().unwrap();
    let started = std::time::Instant::now();
    let pids = cluster.add_procs(SlurmManager::new(2).job(options)).unwrap();
    assert!(started.elapsed() > Duration::from_secs(3), "it did wait in the queue ({:?}) and still succeeded", started.elapsed());
    assert_eq!(pids.len(), 2);
    cluster.shutdown().unwrap();
    assert_no_job_left(&name);
    let _ = Command::new("scancel").arg(blocker.trim()).status();
}

#[test]
fn a_missing_sbatch_names_the_command_and_the_prefix_option() {
    let cluster = Cluster::new().unwrap();
    let options = job("missing").command_prefix(["env", "PATH=/nonexistent"]);
    let err = cluster.add_procs(SlurmManager::new(1).job(options)).unwrap_err().to_string();
    assert!(err.contains("sbatch"), "{err}");
}

/// Rank of the master inside an allocation: run by `a_master_inside_an_sbatch_job`.
#[test]
#[ignore = "runs inside an sbatch job (see a_master_inside_an_sbatch_job)"]
fn master_in_allocation() {
    // the job step's launcher is configurable (a site with MpiDefault=none needs --mpi=pmix)
    let slurm = SlurmManager::in_allocation().unwrap().job(JobOptions::new().launcher("srun --unbuffered --mpi=pmix"));
    assert_eq!(slurm.count(), std::env::var("SLURM_NTASKS").unwrap().parse::<usize>().unwrap());
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(&slurm).unwrap();
    let here = std::env::var("SLURM_JOB_ID").unwrap();
    for pid in &pids {
        assert_eq!(cluster.remote_call_fetch(*pid, job_id_here, ()).unwrap(), Some(here.clone()), "a step of this job");
        assert_eq!(cluster.remote_call_fetch(*pid, env_here, ("PYTHONUNBUFFERED".to_string(),)).unwrap().as_deref(), Some("1"), "started by the configured launcher");
    }
    let ranks: Vec<i32> = mpido!(slurm, |comm| comm.rank()).unwrap();
    assert_eq!(ranks, (0..pids.len() as i32).collect::<Vec<_>>());
    cluster.shutdown().unwrap();
    // mpirun with no count: the allocation sizes the world
    let mpi = MpiManager::from_allocation().unwrap();
    assert_eq!(mpi.count(), pids.len());
    let cluster = Cluster::new().unwrap();
    let ranks_pids = cluster.add_procs(&mpi).unwrap();
    let world: Vec<(i32, i32)> = mpido!(mpi, |comm| (comm.rank(), comm.size())).unwrap();
    assert_eq!(world, (0..ranks_pids.len() as i32).map(|r| (r, ranks_pids.len() as i32)).collect::<Vec<_>>());
    cluster.shutdown().unwrap();
    println!("CHECKED {} workers in job {here}", pids.len());
}

#[test]
fn a_master_inside_an_sbatch_job() {
    if !slurm_up() {
        return;
    }
    let dir = common::temp_dir("inside");
    let log = dir.join("master.out");
    let me = std::env::current_exe().unwrap();
    let out = Command::new("sbatch")
        .args(["--wait", "-n", "3", "-J", &format!("cman-inside-{}", std::process::id()), "-o"])
        .arg(&log)
        .arg(format!("--wrap={} --ignored --exact master_in_allocation --nocapture --test-threads=1", me.display()))
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(out.status.success(), "sbatch --wait failed: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("CHECKED 3 workers in job"), "{text}");
}

/// A program that submits itself as one job: run by the whole-program tests below.
#[test]
#[ignore = "run by a_program_runs_as_one_mpi_job_from_the_login_node"]
fn whole_program() {
    let Ok(name) = std::env::var("CMAN_JOB_NAME") else { return };
    SlurmManager::new(3).job(common::whole_program_job(&name)).run_as_job().unwrap();
    common::whole_program_ranks(); // every rank of the job, on either transport
}

#[test]
fn a_program_runs_as_one_mpi_job_from_the_login_node() {
    if !slurm_up() {
        return;
    }
    common::check_whole_program(|tag| format!("cman-{tag}-{}", std::process::id()), Duration::from_secs(90), |name| !our_jobs(name).trim().is_empty());
}

/// A master that submits a job and reports it, for `killing_the_master_cancels_its_job`.
#[test]
#[ignore = "run by killing_the_master_cancels_its_job"]
fn master_to_be_killed() {
    let Ok(name) = std::env::var("CMAN_JOB_NAME") else { return };
    let cluster = Cluster::new().unwrap();
    let opts = JobOptions::new().name(name).workdir(common::temp_dir("killed"));
    let pids = cluster.add_procs(SlurmManager::new(2).job(opts)).unwrap();
    let os: Vec<String> = pids.iter().map(|p| cluster.worker_info(*p).unwrap().os_pid.to_string()).collect();
    println!("WORKERS {}", os.join(" "));
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn killing_the_master_cancels_its_job() {
    if !slurm_up() {
        return;
    }
    let name = format!("cman-killed-{}", std::process::id());
    let mut master = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "master_to_be_killed", "--nocapture"])
        .env("CMAN_JOB_NAME", &name)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let workers = common::read_workers_line(master.stdout.take().unwrap(), Duration::from_secs(60));
    assert!(!our_jobs(&name).trim().is_empty(), "the job runs");
    master.kill().unwrap();
    master.wait().unwrap();
    assert_no_job_left(&name);
    assert!(common::wait_until(Duration::from_secs(10), || workers.iter().all(|p| !common::process_alive(*p))), "workers still alive");
}

fn options_name(o: &JobOptions) -> String {
    // the name is the first directive of the rendered script
    let script = SlurmManager::new(1).job(o.clone()).job_script().unwrap();
    script.lines().find_map(|l| l.strip_prefix("#SBATCH --job-name=")).unwrap().to_string()
}

#[test]
fn no_other_user_finds_the_secret_of_a_slurm_job() {
    if !slurm_up() {
        return;
    }
    let dir = common::temp_dir("slurm-scan");
    let options = job("scan").workdir(dir.clone());
    let name = options_name(&options);
    let cluster = Cluster::new().unwrap();
    let slurm = SlurmManager::new(2).job(options);
    let pids = cluster.add_procs(&slurm).unwrap();
    let secret = clusterman::__private::secret_hex(&cluster).unwrap();
    let id = cluster.remote_call_fetch(pids[0], job_id_here, ()).unwrap().unwrap();
    assert_eq!(common::secret_files(&dir).len(), 1, "the workers read the secret from a file");
    assert_eq!(common::secret_in_processes(&secret, &common::worker_os_pids(&cluster, &pids)), Vec::<String>::new());
    let places = [dir.as_path(), std::path::Path::new("/var/spool/slurmd"), std::path::Path::new("/var/spool/slurmctld"), std::path::Path::new("/var/log/slurm"), &std::env::temp_dir()];
    let commands = [format!("scontrol show job -dd {id}"), format!("scontrol write batch_script {id} -"), "squeue -a -o %all".to_string()];
    common::assert_nobody_finds(&secret, &places, &commands);
    cluster.shutdown().unwrap();
    assert_no_job_left(&name);
    assert!(common::secret_files(&dir).is_empty(), "the secret file goes with the launch");
}
