//! A flood of connections that never authenticate — a thousand silent ones and two hundred
//! that send a byte a second — while the master keeps serving: calls keep their latency, a
//! new worker still gets in, and the master's threads, descriptors and memory stay bounded.
//! (One test in its own binary: the thread and descriptor counts are of this process.)

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clusterman::prelude::*;

clusterman::init_in_constructor!();

#[remote]
fn noop() {}

/// The attacker's process: opens the connections, says READY, holds them for a while.
#[test]
#[ignore = "run by a_connection_flood_leaves_calls_fast_and_resources_bounded"]
fn attacker() {
    let Ok(target) = std::env::var("CMAN_FLOOD_TARGET") else { return };
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid struct: room for 1200 sockets.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    let silent: Vec<TcpStream> = (0..1000).filter_map(|_| TcpStream::connect(&target).ok()).collect();
    let mut trickling: Vec<TcpStream> = (0..200).filter_map(|_| TcpStream::connect(&target).ok()).collect();
    println!("READY {} {}", silent.len(), trickling.len());
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        for s in &mut trickling {
            let _ = s.write_all(b"C");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    drop(silent);
}

fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("Threads:")).unwrap().trim().parse().unwrap()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").trim().parse().unwrap()
}

/// Median round trip of 200 no-op calls.
fn latency(cluster: &Cluster, pid: Pid) -> Duration {
    let mut times: Vec<Duration> = (0..200)
        .map(|_| {
            let t = Instant::now();
            cluster.remote_call_fetch(pid, noop, ()).unwrap();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

#[test]
fn a_connection_flood_leaves_calls_fast_and_resources_bounded() {
    let cluster = Cluster::builder().handshakes(256, Duration::from_secs(5)).build().unwrap();
    let pids = cluster.add_procs(LocalManager::new(1)).unwrap();
    let quiet = latency(&cluster, pids[0]);
    let (threads_before, fds_before, rss_before) = (threads(), open_fds(), rss_kib());

    let target = format!("127.0.0.1:{}", cluster.listen_addr().unwrap().port());
    let mut attacker = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "attacker", "--nocapture"])
        .env("CMAN_FLOOD_TARGET", &target)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(attacker.stdout.take().unwrap()).lines();
    let ready = lines.find_map(|l| l.ok()?.strip_prefix("READY ").map(String::from)).expect("the attacker connects");
    assert_eq!(ready, "1000 200", "every attacking connection was accepted by the kernel");

    let flooded = latency(&cluster, pids[0]);
    let (threads_during, fds_during, rss_during) = (threads(), open_fds(), rss_kib());
    let joined = cluster.add_procs(LocalManager::new(1)).expect("a real worker gets in during the flood");
    assert_eq!(cluster.workers().len(), 2);
    let _ = attacker.wait();

    eprintln!("latency {quiet:?} -> {flooded:?}; threads {threads_before} -> {threads_during}; fds {fds_before} -> {fds_during}; RSS {rss_before} -> {rss_during} KiB; refused {}", cluster.refusal_count());
    assert!(flooded <= quiet * 3 + Duration::from_millis(2), "calls slowed from {quiet:?} to {flooded:?}");
    assert!(threads_during <= threads_before + 2, "threads grew from {threads_before} to {threads_during}");
    assert!(fds_during <= fds_before + 256 + 16, "descriptors grew from {fds_before} to {fds_during} (cap 256 pending)");
    assert!(rss_during <= rss_before + 64 * 1024, "memory grew from {rss_before} to {rss_during} KiB");
    assert!(cluster.refusal_count() >= 1000, "the flood was refused: {}", cluster.refusal_count());
    assert!(cluster.refusals().len() <= 100);
    assert_eq!(cluster.remote_call_fetch(joined[0], noop, ()).ok(), Some(()));
    cluster.shutdown().unwrap();
}
