//! `pmap` on real workers: order, batching, retries, `on_error`, a worker killed mid-map.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clusterman::prelude::*;
use clusterman::{Error, Topology, exponential_backoff};

clusterman::init_in_constructor!();

#[remote]
fn square(x: u64) -> u64 {
    x * x
}

#[remote]
fn slow_square(x: u64, ms: u64) -> (u64, Pid) {
    std::thread::sleep(Duration::from_millis(ms));
    (x * x, my_id())
}

static FAILED_ONCE: AtomicBool = AtomicBool::new(false);

/// Fails the first time it runs in each process, then works: a transient failure.
#[remote]
fn flaky(x: u64) -> Result<u64, String> {
    if !FAILED_ONCE.swap(true, Ordering::SeqCst) { Err(format!("transient failure on {x}")) } else { Ok(x + 1) }
}

#[remote]
fn odd_fails(x: u64) -> u64 {
    assert!(x % 2 == 0, "odd input {x}");
    x
}

#[remote]
fn os_pid() -> u32 {
    std::process::id()
}

#[test]
fn results_come_back_in_input_order_for_every_batch_size() {
    let cluster = Cluster::new().unwrap();
    cluster.add_procs(LocalManager::new(3)).unwrap();
    let expected: Vec<u64> = (0..5_000u64).map(|x| x * x).collect();
    for batch in [1, 7, 1000, 10_000] {
        let got = cluster.pmap_with(square, (0..5_000u64).map(|x| (x,)), PmapOptions::new().batch_size(batch)).unwrap();
        assert_eq!(got, expected, "batch size {batch}");
    }
    assert_eq!(cluster.pmap(square, (0..5_000u64).map(|x| (x,))).unwrap(), expected, "automatic batch size");
    assert!(cluster.pmap(square, std::iter::empty()).unwrap().is_empty());
}

/// Does nothing; sent without a reply (`remote_do`), so a worker may find one right behind a
/// pmap batch.
#[remote]
fn ignore(_x: u64) {}

#[test]
fn replies_held_for_the_next_batch_still_go_when_what_follows_is_no_batch() {
    // A worker holds the reply to a quick batch while the next frame is already here. When
    // that frame asks for no reply (a remote_do), the held replies must still go before the
    // worker waits for more: else the map stalls until the next heartbeat (5 s) writes them.
    let cluster = Cluster::new().unwrap();
    let pid = cluster.add_procs(LocalManager::new(1)).unwrap()[0];
    let mapping = AtomicBool::new(true);
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0;
            // (ends by itself too, should the maps below fail)
            while mapping.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                cluster.remote_do(pid, ignore, (i,)).unwrap();
                i += 1;
                std::thread::sleep(Duration::from_micros(200)); // a steady trickle, not a flood
            }
        });
        for round in 0..5u64 {
            let got = cluster.pmap_with(square, (0..2_000u64).map(|x| (x + round,)), PmapOptions::new().batch_size(1)).unwrap();
            assert!(got.iter().enumerate().all(|(i, v)| *v == (i as u64 + round).pow(2)), "round {round}");
        }
        mapping.store(false, Ordering::Relaxed);
    });
    assert!(started.elapsed() < Duration::from_secs(4), "5 maps of 2,000 quick items took {:?}", started.elapsed());
}

#[test]
fn work_is_spread_over_all_workers() {
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(LocalManager::new(3)).unwrap();
    let out = cluster.pmap_with(slow_square, (0..30u64).map(|x| (x, 5)), PmapOptions::new().batch_size(1)).unwrap();
    let used: std::collections::BTreeSet<Pid> = out.iter().map(|(_, p)| *p).collect();
    assert_eq!(used.into_iter().collect::<Vec<_>>(), pids);
    assert_eq!(out.iter().map(|(v, _)| *v).collect::<Vec<_>>(), (0..30u64).map(|x| x * x).collect::<Vec<_>>());
}

#[test]
fn a_failed_item_fails_the_map_unless_retried_or_handled() {
    let cluster = Cluster::new().unwrap();
    cluster.add_procs(LocalManager::new(2)).unwrap();
    let err = cluster.pmap(odd_fails, (0..10u64).map(|x| (x,))).unwrap_err();
    assert!(matches!(&err, Error::Remote(e) if e.message.starts_with("odd input")), "{err}");
    let handled = cluster.pmap_with(odd_fails, (0..6u64).map(|x| (x,)), PmapOptions::new().batch_size(2).on_error(|_| 999)).unwrap();
    assert_eq!(handled, vec![0, 999, 2, 999, 4, 999]);
    let retried = cluster
        .pmap_with(flaky, (0..20u64).map(|x| (x,)), PmapOptions::new().batch_size(3).retry_delays([Duration::from_millis(5), Duration::from_millis(10)]))
        .unwrap();
    assert_eq!(retried, (1..=20u64).collect::<Vec<_>>());
}

#[test]
fn a_worker_killed_mid_pmap_has_its_items_finished_by_the_others() {
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(LocalManager::new(3)).unwrap();
    let victim = cluster.remote_call_fetch(pids[0], os_pid, ()).unwrap();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        std::process::Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap();
    });
    // no retry delays needed: work lost with a worker is no failure of its items
    let out = cluster.pmap_with(slow_square, (0..120u64).map(|x| (x, 10)), PmapOptions::new().batch_size(2)).unwrap();
    killer.join().unwrap();
    assert_eq!(out.iter().map(|(v, _)| *v).collect::<Vec<_>>(), (0..120u64).map(|x| x * x).collect::<Vec<_>>());
    assert!(out.iter().any(|(_, p)| *p == pids[0]), "the victim did some work before it died");
    assert!(!cluster.workers().contains(&pids[0]));
    assert!(out[100..].iter().all(|(_, p)| *p != pids[0]), "items after the kill ran on the survivors");
}

#[test]
fn when_every_worker_dies_the_map_fails_and_says_so() {
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(LocalManager::new(1)).unwrap();
    let victim = cluster.remote_call_fetch(pids[0], os_pid, ()).unwrap();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        std::process::Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap();
    });
    let err = cluster.pmap_with(slow_square, (0..200u64).map(|x| (x, 10)), PmapOptions::new().batch_size(1)).unwrap_err();
    killer.join().unwrap();
    assert!(err.to_string().contains("every worker died") && err.to_string().contains("add workers"), "{err}");
}

#[test]
fn exponential_backoff_grows_and_caps() {
    let d = exponential_backoff(5, Duration::from_secs(1), 2.0, Duration::from_secs(5));
    assert_eq!(d, [1, 2, 4, 5, 5].map(Duration::from_secs));
}

/// On a worker: maps `square` over the other workers, and says which served.
#[remote]
fn pmap_from_a_worker(others: Vec<Pid>) -> clusterman::Result<(Vec<u64>, Vec<Pid>)> {
    let cluster = Cluster::current().expect("a worker has a current cluster");
    let squares = cluster.pmap_with(square, (0..200u64).map(|x| (x,)), PmapOptions::new().workers(others.clone()).batch_size(3))?;
    let served = cluster.pmap_with(slow_square, (0..8u64).map(|x| (x, 20)), PmapOptions::new().workers(others).batch_size(1))?;
    let mut pids: Vec<Pid> = served.into_iter().map(|(_, pid)| pid).collect();
    pids.sort();
    pids.dedup();
    Ok((squares, pids))
}

#[test]
fn a_worker_runs_pmap_over_the_others_in_both_topologies() {
    // all-to-all: the replies come on direct links, read by other threads than the one
    // that maps (which serves calls meanwhile); master-worker: they come through the master
    for topology in [Topology::AllToAll, Topology::MasterWorker] {
        let cluster = Cluster::builder().topology(topology).build().unwrap();
        let pids = cluster.add_procs(LocalManager::new(3)).unwrap();
        let (squares, served) = cluster.remote_call_fetch(pids[0], pmap_from_a_worker, (pids[1..].to_vec(),)).unwrap();
        assert_eq!(squares, (0..200u64).map(|x| x * x).collect::<Vec<_>>(), "{topology:?}");
        assert_eq!(served, pids[1..].to_vec(), "both other workers served ({topology:?})");
    }
}

/// A value, and the pids of the processes that folded it.
#[remote]
fn seeded(x: u64) -> (u64, Vec<Pid>) {
    (x, Vec::new())
}

#[remote]
fn add_noting_where(a: (u64, Vec<Pid>), b: (u64, Vec<Pid>)) -> (u64, Vec<Pid>) {
    let mut pids = [a.1, b.1].concat();
    pids.push(my_id());
    pids.sort_unstable();
    pids.dedup();
    (a.0 + b.0, pids)
}

#[test]
fn map_reduce_folds_on_each_worker_then_here() {
    let cluster = Cluster::new().unwrap();
    assert_eq!(cluster.map_reduce(seeded, (1..=10u64).map(|x| (x,)), add_noting_where).unwrap().map(|r| r.0), Some(55), "no workers: all here");
    let pids = cluster.add_procs(LocalManager::new(2)).unwrap();
    let (sum, folded_on) = cluster.map_reduce(seeded, (1..=1000u64).map(|x| (x,)), add_noting_where).unwrap().unwrap();
    assert_eq!(sum, 500_500);
    assert!(pids.iter().all(|p| folded_on.contains(p)), "every worker folded its shares: {folded_on:?}");
    assert!(folded_on.contains(&1), "and the master folded theirs: {folded_on:?}");
    assert_eq!(cluster.map_reduce(seeded, std::iter::empty(), add_noting_where).unwrap(), None);
    // a failing item fails the reduction, naming the function and its message
    let err = cluster.map_reduce(odd_fails, (0..10u64).map(|x| (x,)), add).unwrap_err().to_string();
    assert!(err.contains("odd_fails") && err.contains("odd input"), "{err}");
}

#[remote]
fn add(a: u64, b: u64) -> u64 {
    a + b
}
