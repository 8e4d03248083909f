//! Worker output reaches the master, line by line, tagged with the worker's pid.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clusterman::prelude::*;

clusterman::init_in_constructor!();

#[remote]
fn shout(lines: u32) {
    for i in 0..lines {
        println!("line {i} from {}", my_id());
    }
    eprintln!("and one on stderr from {}", my_id());
}

#[remote]
fn nothing() {}

/// Prints through a thread it joins and a child process it waits for, not itself.
#[remote]
fn shout_through_others() {
    let me = my_id();
    std::thread::spawn(move || println!("from a thread of {me}")).join().unwrap();
    let child = std::process::Command::new("sh").args(["-c", &format!("echo from a child of {me}")]).status().unwrap();
    assert!(child.success());
}

#[remote]
fn nap(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

#[test]
fn stdout_and_stderr_lines_arrive_with_the_pid() {
    let seen: Arc<Mutex<Vec<(Pid, String)>>> = Arc::default();
    let sink = seen.clone();
    let cluster = Cluster::builder().output(move |pid, line| sink.lock().unwrap().push((pid, line.to_string()))).build().unwrap();
    let pids = cluster.add_procs(LocalManager::new(2)).unwrap();
    cluster.everywhere(shout, (3,)).unwrap();
    let expected = 2 * 4;
    assert!(common::wait_until(Duration::from_secs(10), || seen.lock().unwrap().len() >= expected), "got {:?}", seen.lock().unwrap());
    let seen = seen.lock().unwrap();
    for &p in &pids {
        let mine: Vec<&str> = seen.iter().filter(|(q, _)| *q == p).map(|(_, l)| l.as_str()).collect();
        assert!(mine.contains(&format!("line 0 from {p}").as_str()) && mine.contains(&format!("line 2 from {p}").as_str()), "{mine:?}");
        assert!(mine.contains(&format!("and one on stderr from {p}").as_str()), "{mine:?}");
        let order: Vec<&str> = mine.iter().copied().filter(|l| l.starts_with("line")).collect();
        assert_eq!(order, (0..3).map(|i| format!("line {i} from {p}")).collect::<Vec<_>>(), "lines keep their order");
    }
}

/// A cluster whose output sink keeps the lines its workers print.
fn cluster_keeping_lines() -> (Cluster, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = seen.clone();
    (Cluster::builder().output(move |_, line| sink.lock().unwrap().push(line.to_string())).build().unwrap(), seen)
}

#[test]
fn a_calls_output_arrives_before_its_result() {
    let (cluster, seen) = cluster_keeping_lines();
    let pids = cluster.add_procs(LocalManager::new(1)).unwrap();
    for round in 0..20 {
        seen.lock().unwrap().clear();
        cluster.remote_call_fetch(pids[0], shout, (3,)).unwrap();
        let lines = seen.lock().unwrap().clone(); // no waiting: already there
        assert_eq!(lines.len(), 4, "round {round}: {lines:?}");
        assert_eq!(lines[2], format!("line 2 from {}", pids[0]));
        // a quiet call in between: nothing is left over for the next round to see
        cluster.remote_call_fetch(pids[0], nothing, ()).unwrap();
        seen.lock().unwrap().clear();
        cluster.remote_call_fetch(pids[0], shout_through_others, ()).unwrap();
        let lines = seen.lock().unwrap().clone();
        let p = pids[0];
        assert_eq!(lines, [format!("from a thread of {p}"), format!("from a child of {p}")], "round {round}");
    }
}

#[test]
fn output_printed_just_before_shutdown_is_not_lost() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = seen.clone();
    // a slow sink (a terminal, a file on a busy disk): shutdown still returns only after it
    // has had every line printed before the workers left
    let slow_sink = move |_, line: &str| {
        std::thread::sleep(std::time::Duration::from_millis(1));
        sink.lock().unwrap().push(line.to_string());
    };
    let cluster = Cluster::builder().output(slow_sink).build().unwrap();
    let pids = cluster.add_procs(LocalManager::new(1)).unwrap();
    cluster.remote_do(pids[0], shout, (50,)).unwrap();
    cluster.shutdown().unwrap();
    let seen = seen.lock().unwrap();
    assert!(seen.iter().any(|l| l == &format!("line 49 from {}", pids[0])), "last line missing: {} lines", seen.len());
}

#[test]
fn output_arrives_while_another_thread_calls_back_to_back() {
    // that thread reads its own replies, bypassing the I/O runtime, which must still turn
    // for the other workers' connections
    let (cluster, seen) = cluster_keeping_lines();
    let pids = cluster.add_procs(LocalManager::new(2)).unwrap();
    let expected = format!("line 0 from {}", pids[1]);
    let (stop, calls) = (AtomicBool::new(false), AtomicU64::new(0));
    let (arrived, still_calling) = std::thread::scope(|s| {
        let caller = s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                cluster.remote_call_fetch(pids[0], nothing, ()).unwrap();
                calls.fetch_add(1, Ordering::Relaxed);
            }
        });
        assert!(common::wait_until(Duration::from_secs(10), || calls.load(Ordering::Relaxed) > 1000), "the calls did not get going");
        cluster.remote_do(pids[1], shout, (1,)).unwrap();
        // the runtime turns every few milliseconds while the calls go on: half a second is ample
        let arrived = common::wait_until(Duration::from_millis(500), || seen.lock().unwrap().contains(&expected));
        let still_calling = !caller.is_finished();
        stop.store(true, Ordering::Relaxed);
        caller.join().expect("the calling thread");
        (arrived, still_calling)
    });
    assert!(still_calling, "the calling thread ended early");
    assert!(arrived, "a line printed by another worker did not arrive within 0.5 s while the calls went on: {:?}", seen.lock().unwrap());
}

#[test]
fn output_arrives_while_another_thread_waits_for_a_long_call() {
    // a thread that just made quick calls waits for a long one on its connection alone at
    // first: it must soon leave the waiting to the I/O runtime, which serves the others too
    let (cluster, seen) = cluster_keeping_lines();
    let pids = cluster.add_procs(LocalManager::new(2)).unwrap();
    let expected = format!("line 0 from {}", pids[1]);
    let napping = AtomicBool::new(false);
    let arrived = std::thread::scope(|s| {
        let caller = s.spawn(|| {
            for _ in 0..200 {
                cluster.remote_call_fetch(pids[0], nothing, ()).unwrap();
            }
            napping.store(true, Ordering::SeqCst);
            cluster.remote_call_fetch(pids[0], nap, (3000,)).unwrap();
        });
        assert!(common::wait_until(Duration::from_secs(10), || napping.load(Ordering::SeqCst)), "the quick calls did not end");
        cluster.remote_do(pids[1], shout, (1,)).unwrap();
        let arrived = common::wait_until(Duration::from_millis(1000), || seen.lock().unwrap().contains(&expected));
        assert!(!caller.is_finished(), "the long call ended early");
        caller.join().expect("the calling thread");
        arrived
    });
    assert!(arrived, "a line printed by another worker did not arrive within 1 s during a 3 s call: {:?}", seen.lock().unwrap());
}
