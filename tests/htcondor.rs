//! HTCondor through the fake CLI in `tests/fixtures/htcondor` (condor_submit runs the procs
//! here, in the background; condor_q and condor_rm read and change its state directory). Each
//! test has its own state directory, so the cluster it submits is cluster 1.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use clusterman::launch::scheduler::{JobOptions, Layout, Memory};
use clusterman::launch::scheduler::htcondor::HtCondorManager;
use clusterman::prelude::*;

clusterman::init_in_constructor!();

#[remote]
fn square(x: u64) -> u64 {
    x * x
}

#[remote]
fn sleep_secs(s: u64) {
    std::thread::sleep(Duration::from_secs(s));
}

/// What a proc sees: HTCondor's variables, the user's variable, its directory, an input file.
#[remote]
fn condor_view() -> (Option<String>, Option<String>, PathBuf, Option<String>, Option<String>) {
    let scratch = std::env::var("_CONDOR_SCRATCH_DIR").ok();
    (std::env::var("BATCH_SYSTEM").ok(), std::env::var("CMAN_GREETING").ok(), std::env::current_dir().unwrap(), scratch, std::fs::read_to_string("params.txt").ok())
}

/// Whether `path` exists where this worker runs.
#[remote]
fn exists_here(path: PathBuf) -> bool {
    path.exists()
}

/// A fresh fake-HTCondor state directory and job options that reach the fakes through it.
fn setup(tag: &str, faults: &[&str]) -> (PathBuf, PathBuf, JobOptions) {
    let state = common::temp_dir(&format!("condor-state-{tag}"));
    let workdir = common::temp_dir(tag);
    let mut prefix = common::fixtures_prefix("htcondor");
    prefix.push(format!("FAKE_CONDOR_STATE={}", state.display()));
    prefix.extend(faults.iter().map(|f| f.to_string()));
    let job = JobOptions::new().layout(Layout::Array).name(format!("cman-{tag}")).workdir(&workdir).command_prefix(prefix).launch_timeout(Duration::from_secs(30));
    (state, workdir, job)
}

/// `(cluster.proc, JobStatus)` of every proc the fake knows.
fn procs(state: &Path) -> Vec<(String, String)> {
    let mut procs = Vec::new();
    for cluster in std::fs::read_dir(state).unwrap().flatten().filter(|e| e.path().is_dir()) {
        for file in std::fs::read_dir(cluster.path()).unwrap().flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            if let Some(proc) = name.strip_suffix(".status") {
                let status = std::fs::read_to_string(file.path()).unwrap().trim().to_string();
                procs.push((format!("{}.{proc}", cluster.file_name().to_string_lossy()), status));
            }
        }
    }
    procs.sort();
    procs
}

/// The procs' scratch directories still on disk (HTCondor removes each when its proc ends).
fn scratch_dirs(state: &Path) -> Vec<PathBuf> {
    let clusters = std::fs::read_dir(state).unwrap().flatten().filter(|e| e.path().is_dir());
    clusters.flat_map(|c| std::fs::read_dir(c.path()).unwrap().flatten().map(|f| f.path())).filter(|p| p.extension().is_some_and(|e| e == "scratch")).collect()
}

/// The fake's `condor_q` output for cluster 1 (what BatchJob reads).
fn condor_q(state: &Path) -> String {
    let fake = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/htcondor/condor_q");
    let out = Command::new(fake).args(["1", "-af", "ProcId", "JobStatus"]).env("FAKE_CONDOR_STATE", state).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn all_in(state: &Path, statuses: &[&str]) -> bool {
    let p = procs(state);
    !p.is_empty() && p.iter().all(|(_, s)| statuses.contains(&s.as_str()))
}

#[test]
fn htcondor_procs_dial_in_run_pmap_and_leave_nothing() {
    let (state, workdir, job) = setup("condor-e2e", &[]);
    std::fs::write(workdir.join("params.txt"), "alpha=1\n").unwrap();
    let greeting = "it's a \"quoted\" $HOME value";
    let condor = HtCondorManager::new(3).job(job.env("CMAN_GREETING", greeting)).input_files(["params.txt"]);
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(&condor).unwrap();
    assert_eq!(pids.len(), 3);
    assert_eq!(condor_q(&state), "0 2\n1 2\n2 2\n", "all three procs running");
    for pid in &pids {
        let (batch, greet, cwd, scratch, params) = cluster.remote_call_fetch(*pid, condor_view, ()).unwrap();
        assert_eq!(batch.as_deref(), Some("HTCondor"), "runs as an HTCondor job");
        assert_eq!(greet.as_deref(), Some(greeting), "environment quoting survives condor_submit");
        assert_eq!(Some(cwd.display().to_string()), scratch, "runs in its scratch directory");
        assert_eq!(params.as_deref(), Some("alpha=1\n"), "transfer_input_files reached it");
    }
    assert_eq!(cluster.pmap(square, (0..40u64).map(|x| (x,))).unwrap(), (0..40u64).map(|x| x * x).collect::<Vec<_>>());
    let os_pids: Vec<u32> = pids.iter().map(|p| cluster.worker_info(*p).unwrap().os_pid).collect();
    cluster.shutdown().unwrap();
    assert!(all_in(&state, &["4"]), "every proc completed: {:?}", procs(&state));
    assert_eq!(condor_q(&state), "", "nothing left in the queue");
    assert!(common::wait_until(Duration::from_secs(5), || os_pids.iter().all(|p| !common::process_alive(*p))), "workers still alive");
    assert!(common::wait_until(Duration::from_secs(5), || scratch_dirs(&state).is_empty()), "scratch directories (and the secret file in each) left: {:?}", scratch_dirs(&state));
    for proc in 0..3 {
        assert!(workdir.join("clusterman-logs").join(format!("cman-condor-e2e.1.{proc}.out")).exists(), "output file of proc {proc} in the log directory");
    }
    assert!(std::fs::read_to_string(workdir.join("clusterman-logs/cman-condor-e2e.1.log")).unwrap().contains("Job submitted"));
}

#[test]
fn htcondor_parallel_universe_forms_one_mpi_world_through_the_mpi_wrapper() {
    let (state, workdir, job) = setup("condor-mpi", &[]);
    // as HTCondor's manual says: its openmpiscript, copied next to the job
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/htcondor/openmpiscript"), workdir.join("openmpiscript")).unwrap();
    let job = common::open_mpi_here(job.layout(Layout::Mpi));
    let world = HtCondorManager::new(3).job(job.env("CMAN_GREETING", "parallel"));
    let script = world.job_script().unwrap();
    assert!(script.starts_with("universe = parallel\n") && script.contains("executable = openmpiscript\n") && script.contains("machine_count = 3\n") && script.ends_with("\nqueue\n"), "{script}");
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(&world).unwrap();
    common::assert_one_world(&world, 3);
    assert_eq!(procs(&state), [("1.0".to_string(), "2".to_string())], "one parallel job, running");
    let (batch, greet, cwd, scratch, _) = cluster.remote_call_fetch(pids[2], condor_view, ()).unwrap();
    assert_eq!((batch.as_deref(), greet.as_deref()), (Some("HTCondor"), Some("parallel")));
    assert_eq!(Some(cwd.display().to_string()), scratch, "the ranks run in the first machine's scratch directory");
    let os_pids = common::worker_os_pids(&cluster, &pids);
    cluster.shutdown().unwrap();
    assert!(common::wait_until(Duration::from_secs(10), || all_in(&state, &["3", "4"])), "the job left the queue: {:?}", procs(&state));
    common::assert_gone(&os_pids);
    assert!(common::wait_until(Duration::from_secs(5), || scratch_dirs(&state).is_empty()), "scratch directories left: {:?}", scratch_dirs(&state));
}

#[test]
fn htcondor_parallel_universe_without_the_wrapper_names_it() {
    let (_, _, job) = setup("condor-mpi-nowrapper", &[]);
    let cluster = Cluster::new().unwrap();
    let err = cluster.add_procs(HtCondorManager::new(2).job(job.layout(Layout::Mpi))).unwrap_err().to_string();
    assert!(err.contains("openmpiscript") && err.contains("does not exist"), "condor_submit's refusal: {err}");
}

#[test]
fn htcondor_job_that_never_starts_is_removed_after_the_queue_timeout() {
    let (state, _, job) = setup("condor-idle", &["FAKE_CONDOR_IDLE=1"]);
    let cluster = Cluster::new().unwrap();
    let err = cluster.add_procs(HtCondorManager::new(2).job(job.queue_timeout(Duration::from_secs(2)))).unwrap_err().to_string();
    assert!(err.contains("still queued after 2s") && err.contains("htcondor job 1 pending") && err.contains("cancelled"), "{err}");
    assert_eq!(procs(&state), [("1.0".to_string(), "3".to_string()), ("1.1".to_string(), "3".to_string())], "condor_rm removed both procs");
    assert_eq!(condor_q(&state), "");
}

#[test]
fn htcondor_proc_that_never_starts_is_removed_alone_with_min_workers() {
    let (state, _, job) = setup("condor-trim", &["FAKE_CONDOR_IDLE_PROCS=2"]);
    let cluster = Cluster::new().unwrap();
    let job = job.min_workers(2).launch_timeout(Duration::from_secs(2));
    let pids = cluster.add_procs(HtCondorManager::new(3).job(job)).unwrap();
    assert_eq!(pids.len(), 2, "goes on with the two that started");
    assert_eq!(procs(&state), [("1.0", "2"), ("1.1", "2"), ("1.2", "3")].map(|(p, s)| (p.to_string(), s.to_string())), "condor_rm 1.2 removed the idle proc alone");
    cluster.shutdown().unwrap();
    assert!(all_in(&state, &["3", "4"]) && procs(&state)[..2].iter().all(|(_, s)| s == "4"), "{:?}", procs(&state));
}

#[test]
fn htcondor_refused_submission_shows_condor_submit_stderr() {
    let (state, _, job) = setup("condor-refused", &["FAKE_CONDOR_REFUSE=1"]);
    let cluster = Cluster::new().unwrap();
    let err = cluster.add_procs(HtCondorManager::new(2).job(job)).unwrap_err().to_string();
    assert!(err.contains("condor_submit refused the job") && err.contains("Can't find address of local schedd"), "{err}");
    assert!(procs(&state).is_empty(), "nothing submitted");
}

#[test]
fn htcondor_missing_condor_submit_names_it_and_the_prefix_option() {
    assert!(!common::have("condor_submit"), "this test expects no real HTCondor on PATH");
    let cluster = Cluster::new().unwrap();
    let job = JobOptions::new().layout(Layout::Array).workdir(common::temp_dir("condor-missing"));
    let err = cluster.add_procs(HtCondorManager::new(1).job(job)).unwrap_err().to_string();
    assert!(err.contains("cannot run `condor_submit`") && err.contains("JobOptions::command_prefix"), "{err}");
}

#[test]
#[ignore = "run by htcondor_killing_the_master_removes_its_job"]
fn htcondor_master_to_be_killed() {
    let (Ok(state), Ok(tag)) = (std::env::var("CMAN_CONDOR_STATE"), std::env::var("CMAN_CONDOR_TAG")) else { return };
    let (_, _, job) = setup(&tag, &[]);
    let mut prefix = common::fixtures_prefix("htcondor");
    prefix.push(format!("FAKE_CONDOR_STATE={state}"));
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(HtCondorManager::new(2).job(job.command_prefix(prefix))).unwrap();
    for pid in &pids {
        // busy: only condor_rm (run by the cancel guard) can end them once the master is gone
        cluster.remote_do(*pid, sleep_secs, (120,)).unwrap();
    }
    let os: Vec<String> = pids.iter().map(|p| cluster.worker_info(*p).unwrap().os_pid.to_string()).collect();
    println!("WORKERS {}", os.join(" "));
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn htcondor_killing_the_master_removes_its_job() {
    let state = common::temp_dir("condor-state-killed");
    let mut master = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "htcondor_master_to_be_killed", "--nocapture"])
        .env("CMAN_CONDOR_STATE", &state)
        .env("CMAN_CONDOR_TAG", "condor-killed")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let workers = common::read_workers_line(master.stdout.take().unwrap(), Duration::from_secs(60));
    assert!(all_in(&state, &["2"]), "the job runs: {:?}", procs(&state));
    master.kill().unwrap();
    master.wait().unwrap();
    // the guard's condor_rm removes what is left; a worker that saw the master's connection
    // close may have ended (completed) by itself first
    assert!(common::wait_until(Duration::from_secs(15), || all_in(&state, &["3", "4"])), "nothing of the job is left: {:?}", procs(&state));
    assert!(common::wait_until(Duration::from_secs(10), || workers.iter().all(|p| !common::process_alive(*p))), "workers still alive");
}


#[test]
fn htcondor_needs_no_shared_filesystem_the_program_and_the_secret_travel_with_the_job() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the fake hides the submit host's files in a mount namespace, which needs root");
        return;
    }
    let (state, workdir, job) = setup("condor-noshare", &["FAKE_CONDOR_NO_SHARED_FS=1"]);
    let cluster = Cluster::new().unwrap();
    // the program itself, and a shell running a prologue that changes directory first
    let plain = HtCondorManager::new(1).job(job.clone());
    let with_prologue = HtCondorManager::new(1).job(job.prologue("cd /"));
    let script = plain.job_script().unwrap();
    assert!(script.contains("CLUSTERMAN_SECRET_FILE=<secret-file>") && !script.contains(&workdir.join(".clusterman").display().to_string()), "{script}");
    for manager in [plain, with_prologue] {
        let pids = cluster.add_procs(&manager).unwrap();
        let (batch, _, _, scratch, _) = cluster.remote_call_fetch(pids[0], condor_view, ()).unwrap();
        assert_eq!(batch.as_deref(), Some("HTCondor"));
        assert!(scratch.is_some(), "in its scratch directory");
        assert!(!cluster.remote_call_fetch(pids[0], exists_here, (workdir.join("clusterman-logs"),)).unwrap(), "the submit host's working directory is not there");
    }
    cluster.shutdown().unwrap();
    assert!(common::wait_until(Duration::from_secs(10), || all_in(&state, &["4"])), "every proc completed: {:?}", procs(&state));
}

#[test]
fn htcondor_memory_is_a_number_of_mib_and_gi_is_refused() {
    let (_state, _workdir, job) = setup("condor-mem", &[]);
    let cluster = Cluster::new().unwrap();
    let condor = HtCondorManager::new(1).job(job.clone().memory(Memory::gib(4)));
    assert!(condor.job_script().unwrap().contains("request_memory = 4096\n"));
    assert_eq!(cluster.add_procs(&condor).unwrap().len(), 1);
    let err = cluster.add_procs(HtCondorManager::new(1).job(job).extra("request_memory = 4Gi")).unwrap_err().to_string();
    assert!(err.contains("request_memory = 4Gi is not a valid size"), "{err}");
    cluster.shutdown().unwrap();
}
