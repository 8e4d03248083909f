//! Hung peers: a stopped worker fails its calls within the heartbeat timeout and never blocks
//! a caller or `shutdown()`; a worker stuck in a loop is ended by `rm_procs`; a worker whose
//! master's host vanishes exits; a bounded wait ends with a timeout error.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clusterman::launch::{ElasticAddress, ElasticManager};
use clusterman::prelude::*;
use clusterman::{Error, PmapOptions};

clusterman::init_in_constructor!();

#[remote]
fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[remote]
fn echo(bytes: Vec<u8>) -> usize {
    bytes.len()
}

#[remote]
fn square(x: u64) -> u64 {
    x * x
}

/// Never returns (sleeps, so it does not burn a core).
#[remote]
fn stuck_forever() {
    loop {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(os_pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on a worker process this test started.
    unsafe { libc::kill(os_pid as libc::pid_t, signal) };
}

/// A cluster whose heartbeat declares a worker dead after 1.5 s of silence.
fn quick_heartbeat() -> Cluster {
    Cluster::builder().heartbeat(Duration::from_millis(100), Duration::from_millis(1500)).build().unwrap()
}

#[test]
fn a_stopped_worker_fails_its_call_within_the_heartbeat_timeout_and_shutdown_returns() {
    let cluster = quick_heartbeat();
    let pids = cluster.add_procs(LocalManager::new(2)).unwrap();
    let os = cluster.worker_info(pids[0]).unwrap().os_pid;
    let call = cluster.remote_call(pids[0], sleep_ms, (5_000,)).unwrap();
    signal(os, libc::SIGSTOP);
    let started = Instant::now();
    let err = call.fetch().unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(&err, Error::WorkerDied { pid, reason } if *pid == pids[0] && reason.contains("no heartbeat")), "{err}");
    assert!(waited < Duration::from_secs(5), "declared dead after {waited:?}");
    assert_eq!(cluster.workers(), vec![pids[1]], "workers() drops it");
    assert!(common::wait_until(Duration::from_secs(5), || !common::process_alive(os)), "a local worker that stopped answering is killed");
    assert_eq!(cluster.remote_call_fetch(pids[1], square, (7,)).unwrap(), 49, "the other worker is unaffected");
    let started = Instant::now();
    cluster.shutdown().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "shutdown took {:?}", started.elapsed());
}

#[test]
fn a_worker_stopped_while_another_thread_calls_back_to_back_is_still_found_dead() {
    // a thread calling in a tight loop reads its own replies, bypassing the I/O runtime:
    // the runtime must still turn for the heartbeats of the other workers
    let cluster = quick_heartbeat();
    let pids = cluster.add_procs(LocalManager::new(2)).unwrap();
    let os = cluster.worker_info(pids[1]).unwrap().os_pid;
    let (stop, calls) = (AtomicBool::new(false), AtomicU64::new(0));
    let (found, calls_meanwhile) = std::thread::scope(|s| {
        let caller = s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(cluster.remote_call_fetch(pids[0], square, (3,)).unwrap(), 9);
                calls.fetch_add(1, Ordering::Relaxed);
            }
        });
        assert!(common::wait_until(Duration::from_secs(10), || calls.load(Ordering::Relaxed) > 1000), "the calls did not get going");
        signal(os, libc::SIGSTOP);
        let before = calls.load(Ordering::Relaxed);
        let found = common::wait_until(Duration::from_secs(8), || !cluster.workers().contains(&pids[1]));
        let meanwhile = calls.load(Ordering::Relaxed) - before;
        stop.store(true, Ordering::Relaxed);
        caller.join().expect("the calling thread");
        (found, meanwhile)
    });
    assert!(found, "a stopped worker was not declared dead while another thread called in a loop");
    assert!(calls_meanwhile > 100, "the loop of calls stalled meanwhile ({calls_meanwhile} calls)");
    assert_eq!(cluster.workers(), vec![pids[0]]);
}

#[test]
fn pmap_moves_the_work_of_a_stopped_worker_to_the_others() {
    let cluster = quick_heartbeat();
    let pids = cluster.add_procs(LocalManager::new(3)).unwrap();
    let os = cluster.worker_info(pids[0]).unwrap().os_pid;
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        signal(os, libc::SIGSTOP);
    });
    let items: Vec<(u64,)> = (0..60).map(|x| (x,)).collect();
    // slow items, so the stop lands mid-map
    let options = PmapOptions::new().batch_size(1).retry_delays([Duration::ZERO; 3]);
    let squares = cluster.pmap_with(sleep_ms, items.iter().map(|(x,)| (20 + x % 3,)), options).unwrap();
    assert_eq!(squares.len(), 60);
    assert!(squares.iter().enumerate().all(|(i, v)| *v == 20 + i as u64 % 3), "every item exactly once, in order");
    stopper.join().unwrap();
    assert!(!cluster.workers().contains(&pids[0]));
    cluster.shutdown().unwrap();
}

#[test]
fn remote_call_returns_promptly_when_the_worker_is_stopped() {
    // a long heartbeat timeout: the worker stays "stopped", not dead, for the whole test
    let cluster = Cluster::builder().heartbeat(Duration::from_millis(100), Duration::from_secs(60)).build().unwrap();
    let pids = cluster.add_procs(LocalManager::new(1)).unwrap();
    let os = cluster.worker_info(pids[0]).unwrap().os_pid;
    signal(os, libc::SIGSTOP);
    let payload = vec![7u8; 1 << 20];
    let started = Instant::now();
    let mut outcomes = Vec::new();
    // far more than the socket buffers hold: with blocking writes this hung forever
    for _ in 0..200 {
        let sent = Instant::now();
        outcomes.push(cluster.remote_call(pids[0], echo, (payload.clone(),)).map(drop));
        assert!(sent.elapsed() < Duration::from_secs(1), "one remote_call took {:?}", sent.elapsed());
    }
    assert!(started.elapsed() < Duration::from_secs(10), "200 calls to a stopped worker took {:?}", started.elapsed());
    assert!(outcomes.iter().any(|o| matches!(o, Err(Error::Busy { .. }))), "a backed-up worker makes calls fail as busy, not wait");
    let started = Instant::now();
    cluster.shutdown().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "shutdown took {:?}", started.elapsed());
    assert!(common::wait_until(Duration::from_secs(5), || !common::process_alive(os)));
}

#[test]
fn rm_procs_ends_a_worker_stuck_in_a_remote_function() {
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(LocalManager::new(2)).unwrap();
    let os = cluster.worker_info(pids[0]).unwrap().os_pid;
    cluster.remote_do(pids[0], stuck_forever, ()).unwrap();
    let started = Instant::now();
    cluster.rm_procs(&[pids[0]]).unwrap();
    assert!(started.elapsed() < Duration::from_secs(15), "rm_procs took {:?}", started.elapsed());
    assert!(common::wait_until(Duration::from_secs(5), || !common::process_alive(os)), "the stuck worker's process is gone");
    assert_eq!(cluster.workers(), vec![pids[1]]);
    cluster.shutdown().unwrap();
}

#[test]
fn fetch_timeout_gives_up_with_a_timeout_error_and_the_worker_serves_on() {
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(LocalManager::new(1)).unwrap();
    let started = Instant::now();
    let err = cluster.remote_call(pids[0], sleep_ms, (1_000,)).unwrap().fetch_timeout(Duration::from_millis(100)).unwrap_err();
    assert!(matches!(err, Error::Timeout { pid, .. } if pid == pids[0]), "{err}");
    assert!(started.elapsed() < Duration::from_millis(900));
    assert_eq!(cluster.remote_call(pids[0], square, (3,)).unwrap().fetch_timeout(Duration::from_secs(30)).unwrap(), 9);
    cluster.shutdown().unwrap();
}

#[test]
fn calls_cut_off_by_shutdown_fail_with_a_shutdown_error() {
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(LocalManager::new(1)).unwrap();
    cluster.remote_do(pids[0], stuck_forever, ()).unwrap();
    let pending = cluster.remote_call(pids[0], square, (2,)).unwrap();
    let handle = std::thread::spawn(move || pending.fetch());
    cluster.shutdown().unwrap();
    let err = handle.join().unwrap().unwrap_err();
    assert!(matches!(err, Error::ShutDown), "{err}");
}

#[test]
fn a_worker_whose_master_host_vanishes_exits() {
    let ns = match common::Netns::create(500 + std::process::id() % 400) {
        Ok(ns) => ns,
        Err(why) if !common::schedulers_required() => return eprintln!("skipped: cannot create a network namespace: {why}"),
        Err(why) => panic!("cannot create a network namespace: {why}"),
    };
    let cluster = quick_heartbeat();
    let elastic = ElasticManager::start(&cluster, ElasticAddress::Ip(ns.host_ip.parse().unwrap()), 0).unwrap();
    let command = format!("exec ip netns exec {} env {}", ns.name, elastic.connect_command());
    let mut worker = Command::new("bash").args(["-c", &command]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let pids = elastic.wait_for(1, Duration::from_secs(30)).unwrap();
    assert_eq!(cluster.remote_call_fetch(pids[0], square, (5,)).unwrap(), 25);
    ns.cut(); // the master's host is gone, as far as the worker can tell
    let cut = Instant::now();
    assert!(common::wait_until(Duration::from_secs(20), || matches!(worker.try_wait(), Ok(Some(_)))), "the worker still runs 20 s after its master vanished");
    let status = worker.wait().unwrap();
    assert!(!status.success(), "{status}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut worker.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("no heartbeat from the master"), "the worker says why it left: {stderr}");
    assert!(cut.elapsed() < Duration::from_secs(10), "exited {:?} after the cut", cut.elapsed());
    // and the master, for its part, declared the worker dead
    assert!(common::wait_until(Duration::from_secs(10), || cluster.workers().is_empty()));
    assert!(cluster.terminated_workers().iter().any(|(p, why)| *p == pids[0] && why.contains("no heartbeat")), "{:?}", cluster.terminated_workers());
    cluster.shutdown().unwrap();
}
