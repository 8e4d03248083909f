//! Nested calls never deadlock: relays that bounce between workers (and through the master)
//! eight levels deep, a hundred at once, in both topologies.

mod common;

use std::time::Duration;

use clusterman::prelude::*;
use clusterman::{Error, Topology};

clusterman::init_in_constructor!();

/// Calls the next process on `path` until `depth` runs out; returns the pid that ended it.
#[remote]
fn relay(path: Vec<Pid>, depth: u32) -> Result<Pid, String> {
    if depth == 0 {
        return Ok(my_id());
    }
    let next = path[depth as usize % path.len()];
    let cluster = Cluster::current().ok_or("no cluster here")?;
    cluster.remote_call_fetch(next, relay, (path, depth - 1)).map_err(|e| e.to_string())
}

fn hundred_relays_eight_deep(topology: Topology) {
    let cluster = Cluster::builder().topology(topology).build().unwrap();
    let pids = cluster.add_procs(LocalManager::new(3)).unwrap();
    let (a, b, c) = (pids[0], pids[1], pids[2]);
    // between two workers, around three, and through the master (pid 1) on the way
    let paths = [vec![a, b], vec![b, c, a], vec![a, 1, b], vec![c, b, 1, a]];
    let calls: Vec<_> = (0..100)
        .map(|i| {
            let path = paths[i % paths.len()].clone();
            // the relay at depth k runs on path[(k + 1) % len]
            let first = path[9 % path.len()];
            let last = path[1 % path.len()];
            (last, cluster.remote_call(first, relay, (path, 8)).unwrap())
        })
        .collect();
    for (i, (last, call)) in calls.into_iter().enumerate() {
        match call.fetch_timeout(Duration::from_secs(120)) {
            Ok(end) => assert_eq!(end, last, "relay {i} ended where its path says"),
            Err(e @ Error::Timeout { .. }) => panic!("relay {i} deadlocked: {e}"),
            Err(e) => panic!("relay {i} failed: {e}"),
        }
    }
    cluster.shutdown().unwrap();
}

#[test]
fn nested_calls_eight_deep_a_hundred_at_once_master_worker() {
    hundred_relays_eight_deep(Topology::MasterWorker);
}

#[test]
fn nested_calls_eight_deep_a_hundred_at_once_all_to_all() {
    hundred_relays_eight_deep(Topology::AllToAll);
}
