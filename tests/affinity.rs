//! Local workers as the kernel sees them: each pinned worker's CPU mask matches the
//! placement, and every thread of a worker launched beyond one per CPU runs under the batch
//! policy unless the manager was told otherwise.

mod common;

use clusterman::prelude::*;
use clusterman::{CpuTopology, Error};

clusterman::init_in_constructor!();

#[remote]
fn allowed_cpus() -> Vec<usize> {
    common::cpus_allowed(std::process::id())
}

/// The scheduling policy of every thread of this process (`SCHED_OTHER` is 0, `SCHED_BATCH` 3).
#[remote]
fn thread_policies() -> Vec<i32> {
    let tasks = std::fs::read_dir("/proc/self/task").unwrap();
    // SAFETY: sched_getscheduler only reads the policy of a thread id.
    tasks.map(|t| unsafe { libc::sched_getscheduler(t.unwrap().file_name().to_str().unwrap().parse().unwrap()) }).collect()
}

#[test]
fn local_workers_beyond_one_per_cpu_run_as_batch_work_unless_told_otherwise() {
    let cpus = online_cpus().len();
    let cluster = Cluster::new().unwrap();
    let one = cluster.add_procs(LocalManager::new(1)).unwrap()[0];
    let crowd = cluster.add_procs(LocalManager::new(cpus + 1)).unwrap()[0];
    let asked = cluster.add_procs(LocalManager::new(1).batch_scheduling(true)).unwrap()[0];
    let refused = cluster.add_procs(LocalManager::new(cpus + 1).batch_scheduling(false)).unwrap()[0];
    let pinned = cluster.add_procs(LocalAffinityManager::new(cpus + 1)).unwrap()[0];
    let expected = [(one, libc::SCHED_OTHER), (crowd, libc::SCHED_BATCH), (asked, libc::SCHED_BATCH), (refused, libc::SCHED_OTHER), (pinned, libc::SCHED_BATCH)];
    for (pid, policy) in expected {
        let policies = cluster.remote_call_fetch(pid, thread_policies, ()).unwrap();
        assert!(policies.len() >= 2 && policies.iter().all(|&p| p == policy), "worker {pid}: {policies:?}, wanted {policy} on every thread");
    }
    assert_eq!(thread_policies::call(), vec![libc::SCHED_OTHER; thread_policies::call().len()], "the master keeps its own policy");
}

fn online_cpus() -> Vec<usize> {
    CpuTopology::detect().unwrap().cpus().iter().map(|c| c.id).collect()
}

#[test]
fn explicit_cpu_list_pins_each_worker() {
    let cpus = online_cpus();
    let wanted: Vec<usize> = cpus.iter().rev().copied().collect(); // reverse order: not the default
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(LocalAffinityManager::new(wanted.len()).mode(AffinityMode::Cpus(wanted.clone()))).unwrap();
    for (pid, cpu) in pids.iter().zip(&wanted) {
        let os = cluster.worker_info(*pid).unwrap().os_pid;
        assert_eq!(common::cpus_allowed(os), vec![*cpu], "worker {pid} read from /proc/{os}/status");
        assert_eq!(cluster.remote_call_fetch(*pid, allowed_cpus, ()).unwrap(), vec![*cpu]);
    }
}

#[test]
fn balanced_and_compact_follow_the_topology() {
    let topology = CpuTopology::detect().unwrap();
    let np = topology.len() + 1; // one more than CPUs: wraps around
    for mode in [AffinityMode::Balanced, AffinityMode::Compact] {
        let manager = LocalAffinityManager::new(np).mode(mode.clone());
        let placement = manager.placement().unwrap();
        let order = if mode == AffinityMode::Balanced { topology.balanced_order() } else { topology.compact_order() };
        assert_eq!(placement[..topology.len()], order[..], "{mode:?}");
        assert_eq!(placement[topology.len()], order[0], "{mode:?} wraps around");
        let cluster = Cluster::new().unwrap();
        let pids = cluster.add_procs(manager).unwrap();
        for (pid, cpu) in pids.iter().zip(&placement) {
            assert_eq!(common::cpus_allowed(cluster.worker_info(*pid).unwrap().os_pid), vec![*cpu], "{mode:?} worker {pid}");
        }
    }
}

#[test]
fn a_cpu_that_does_not_exist_is_a_clear_error() {
    let cluster = Cluster::new().unwrap();
    let err = cluster.add_procs(LocalAffinityManager::new(1).mode(AffinityMode::Cpus(vec![4096]))).unwrap_err();
    assert!(matches!(&err, Error::Launch(m) if m.contains("4096")), "{err}");
    assert!(cluster.workers().is_empty());
}

#[test]
#[ignore = "run by pinned_workers_stay_inside_the_masters_affinity_mask"]
fn pinned_inside_a_mask() {
    let allowed = common::cpus_allowed(std::process::id());
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(LocalAffinityManager::new(2)).unwrap();
    for pid in pids {
        let os = cluster.worker_info(pid).unwrap().os_pid;
        assert!(allowed.contains(&common::cpus_allowed(os)[0]), "worker {pid} pinned outside {allowed:?}");
    }
    // an explicit list is taken as given, also outside the master's mask
    let first = online_cpus()[0];
    let pid = cluster.add_procs(LocalAffinityManager::new(1).mode(AffinityMode::Cpus(vec![first]))).unwrap()[0];
    assert_eq!(common::cpus_allowed(cluster.worker_info(pid).unwrap().os_pid), vec![first]);
    println!("PINNED INSIDE {allowed:?}");
}

#[test]
fn pinned_workers_stay_inside_the_masters_affinity_mask() {
    // as under `srun` or in a container cpuset: the master may use only its last CPU
    let last = *online_cpus().last().unwrap();
    let out = std::process::Command::new("taskset")
        .args(["-c", &last.to_string()])
        .arg(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "pinned_inside_a_mask", "--nocapture", "--test-threads=1"])
        .output()
        .expect("taskset (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains(&format!("PINNED INSIDE [{last}]")), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
}
