//! Calls addressed to the master run on a bounded pool: thousands of them at once do not
//! grow the master's threads, and every one runs. (One test in its own binary: the thread
//! count is of this process.)

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clusterman::prelude::*;

clusterman::init_in_constructor!();

static RAN: AtomicU64 = AtomicU64::new(0);

/// Runs on the master.
#[remote]
fn on_master(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
    RAN.fetch_add(1, Ordering::SeqCst);
}

/// Runs on a worker: `n` calls to the master without waiting for them.
#[remote]
fn flood_the_master(n: u64) -> Result<(), String> {
    let cluster = Cluster::current().ok_or("no cluster")?;
    for _ in 0..n {
        cluster.remote_do(1, on_master, (1,)).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("Threads:")).unwrap().trim().parse().unwrap()
}

#[test]
fn two_thousand_calls_to_the_master_run_on_a_bounded_pool() {
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(LocalManager::new(2)).unwrap();
    let before = threads();
    let mut most = before;
    for pid in &pids {
        cluster.remote_call_fetch(*pid, flood_the_master, (1000,)).unwrap();
    }
    let all_ran = common::wait_until(Duration::from_secs(60), || {
        most = most.max(threads());
        RAN.load(Ordering::SeqCst) == 2000
    });
    assert!(all_ran, "{} of 2000 calls ran", RAN.load(Ordering::SeqCst));
    assert!(most <= before + 16, "threads grew from {before} to {most}");
    cluster.shutdown().unwrap();
}
