//! Scyld through the fake CLI in `tests/fixtures/scyld`: `beomap` maps workers to nodes, `bpsh`
//! runs each worker here (exec'ing it, environment intact) and logs its calls to
//! `$FAKE_BPSH_LOG`, so the tests see which nodes were used and how workers were stopped; the
//! fake ClusterWare `mpirun` checks its `--map` and starts the ranks with this machine's MPI.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clusterman::launch::scheduler::scyld::ScyldManager;
use clusterman::launch::scheduler::{JobOptions, Layout};
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

#[remote]
fn scyld_view() -> (PathBuf, Option<String>) {
    (std::env::current_dir().unwrap(), std::env::var("CMAN_COLOUR").ok())
}

/// Job options reaching the fakes, and the fake bpsh's call log.
fn setup(tag: &str, extra: &[&str]) -> (PathBuf, JobOptions) {
    let log = common::temp_dir(tag).join("bpsh.log");
    let mut prefix = common::fixtures_prefix("scyld");
    prefix.push(format!("FAKE_BPSH_LOG={}", log.display()));
    prefix.extend(extra.iter().map(|e| e.to_string()));
    (log, JobOptions::new().command_prefix(prefix).launch_timeout(Duration::from_secs(30)))
}

fn calls(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log).unwrap_or_default().lines().map(String::from).collect()
}

#[test]
fn scyld_workers_run_on_beomap_nodes_and_leave_nothing() {
    let (log, job) = setup("scyld-e2e", &["FAKE_SCYLD_NODES=4,7"]);
    let workdir = common::temp_dir("scyld-wd");
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(ScyldManager::new(3).job(job.workdir(&workdir).env("CMAN_COLOUR", "deep blue"))).unwrap();
    assert_eq!(pids.len(), 3);
    let program = std::env::current_exe().unwrap().display().to_string();
    let mut calls_made = calls(&log);
    calls_made[1..].sort(); // the bpsh clients run concurrently
    assert_eq!(calls_made, ["-1 beomap --no-local --np 3".to_string(), format!("4 {program}"), format!("4 {program}"), format!("7 {program}")], "one bpsh per worker, on beomap's nodes (4:7:4)");
    for pid in &pids {
        assert_eq!(cluster.remote_call_fetch(*pid, scyld_view, ()).unwrap(), (workdir.clone(), Some("deep blue".to_string())));
    }
    assert_eq!(cluster.pmap(square, (0..30u64).map(|x| (x,))).unwrap(), (0..30u64).map(|x| x * x).collect::<Vec<_>>());
    let os_pids: Vec<u32> = pids.iter().map(|p| cluster.worker_info(*p).unwrap().os_pid).collect();
    cluster.shutdown().unwrap();
    assert!(os_pids.iter().all(|p| !common::process_alive(*p)), "workers (and their bpsh) gone after shutdown");
    assert_eq!(calls(&log).len(), 4, "workers that exit by themselves need no kill through bpsh");
}

#[test]
fn scyld_mpi_world_is_one_mpirun_over_the_beomap_nodes() {
    let mpirun = format!("FAKE_SCYLD_MPIRUN={}", common::mpi_launcher());
    let (log, job) = setup("scyld-mpi", &["FAKE_SCYLD_NODES=4,7", &mpirun]);
    let job = common::open_mpi_here(job.layout(Layout::Mpi));
    let cluster = Cluster::new().unwrap();
    let world = ScyldManager::new(3).job(job.env("CMAN_COLOUR", "green"));
    let pids = cluster.add_procs(&world).unwrap();
    common::assert_one_world(&world, 3);
    let program = std::env::current_exe().unwrap().display().to_string();
    assert_eq!(calls(&log), ["-1 beomap --no-local --np 3".to_string(), format!("mpirun --map 4:7:4 {program}")], "ClusterWare's mpirun over beomap's nodes, no bpsh per worker");
    assert_eq!(cluster.remote_call_fetch(pids[2], scyld_view, ()).unwrap().1.as_deref(), Some("green"), "the environment reaches the ranks");
    let os_pids: Vec<u32> = pids.iter().map(|p| cluster.worker_info(*p).unwrap().os_pid).collect();
    cluster.shutdown().unwrap();
    assert!(os_pids.iter().all(|p| !common::process_alive(*p)), "ranks gone after shutdown");
}

#[test]
fn scyld_mpirun_refusing_a_node_fails_the_launch_with_its_words() {
    // beomap maps onto nodes 0 and 1, but node 1 is down by the time mpirun runs
    let (_, job) = setup("scyld-mpi-down", &["FAKE_SCYLD_NODES=0,1", "FAKE_SCYLD_DOWN=1"]);
    let cluster = Cluster::new().unwrap();
    let err = cluster.add_procs(ScyldManager::new(2).job(job.layout(Layout::Mpi))).unwrap_err().to_string();
    assert!(err.contains("mpirun: node 1 is down"), "{err}");
}

#[test]
fn scyld_workers_that_do_not_stop_are_killed_through_bpsh() {
    let (log, job) = setup("scyld-kill", &[]);
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(ScyldManager::new(2).job(job)).unwrap();
    let busy = pids[0];
    let os_pid = cluster.worker_info(busy).unwrap().os_pid;
    cluster.remote_do(busy, sleep_secs, (120,)).unwrap();
    cluster.shutdown().unwrap();
    assert!(common::wait_until(Duration::from_secs(5), || !common::process_alive(os_pid)), "the busy worker is gone");
    assert!(calls(&log).contains(&format!("0 kill -KILL {os_pid}")), "killed on its node through bpsh: {:?}", calls(&log));
}

#[test]
fn scyld_failing_beomap_is_a_clear_error() {
    let (log, job) = setup("scyld-beomap", &["FAKE_BEOMAP_FAIL=1"]);
    let cluster = Cluster::new().unwrap();
    let err = cluster.add_procs(ScyldManager::new(2).job(job)).unwrap_err().to_string();
    assert!(err.contains("node availability inaccessible (could not run beomap)") && err.contains("bpsh -1 beomap --no-local --np 2"), "{err}");
    assert!(err.contains("no compute nodes are up") && err.contains("JobOptions::command_prefix"), "beomap's stderr and the prefix option: {err}");
    assert_eq!(calls(&log), ["-1 beomap --no-local --np 2"], "no worker started");
}

#[test]
fn scyld_missing_bpsh_names_it_and_the_prefix_option() {
    assert!(!common::have("bpsh"), "this test expects no real Scyld on PATH");
    let cluster = Cluster::new().unwrap();
    let err = cluster.add_procs(ScyldManager::new(1)).unwrap_err().to_string();
    assert!(err.contains("could not run beomap") && err.contains("cannot run `bpsh`") && err.contains("JobOptions::command_prefix"), "{err}");
}

#[test]
fn scyld_worker_on_a_node_that_went_down_fails_the_launch() {
    // beomap maps onto nodes 0 and 1, but node 1 is down by the time bpsh runs
    let (_, job) = setup("scyld-down", &["FAKE_SCYLD_NODES=0,1", "FAKE_SCYLD_DOWN=1"]);
    let cluster = Cluster::new().unwrap();
    let err = cluster.add_procs(ScyldManager::new(2).job(job)).unwrap_err().to_string();
    assert!(err.contains("bpsh of worker 1 on node 1 exited with exit status: 1"), "{err}");
    assert!(cluster.workers().is_empty(), "the worker that did start was stopped again");
}
