//! MPI under a real launcher: mode 1 (this test process outside MPI, ranks started by
//! `mpirun`), and modes 2 and 3 (the test binary itself run as every rank of `mpirun -np N`).
//! `CMAN_MPIEXEC` names the launcher that matches the MPI this binary was built with
//! (default `mpirun`; `mpiexec.mpich` for the MPICH build). Every test asserts the world
//! size, because a mismatched launcher silently runs N single-rank copies.
#![cfg(feature = "mpi")]

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clusterman::mpi::{MpiManager, SystemOperation, Transport, start_main_loop};
use clusterman::prelude::*;
use clusterman::{Error, mpido};

clusterman::init_in_constructor!();

use common::mpi_launcher as launcher;

fn manager(np: usize) -> MpiManager {
    MpiManager::new(np).launcher(launcher()).launch_timeout(Duration::from_secs(60))
}

#[remote]
fn rank_and_size() -> (Pid, i32, i32) {
    let (rank, size) = mpi_env();
    (my_id(), rank, size)
}

fn mpi_env() -> (i32, i32) {
    let r = std::env::var("OMPI_COMM_WORLD_RANK").or_else(|_| std::env::var("PMI_RANK")).unwrap().parse().unwrap();
    let s = std::env::var("OMPI_COMM_WORLD_SIZE").or_else(|_| std::env::var("PMI_SIZE")).unwrap().parse().unwrap();
    (r, s)
}

#[test]
fn ranks_dial_in_in_rank_order_with_maps() {
    let cluster = Cluster::new().unwrap();
    let mgr = manager(3);
    let pids = cluster.add_procs(&mgr).unwrap();
    assert_eq!(pids, vec![2, 3, 4]);
    assert_eq!(mgr.procs(), pids);
    assert_eq!(mgr.mpi_procs(), vec![0, 1, 2]);
    for (rank, pid) in pids.iter().enumerate() {
        assert_eq!(mgr.pid_to_rank(*pid), Some(rank as i32));
        assert_eq!(mgr.rank_to_pid(rank as i32), Some(*pid));
        assert_eq!(cluster.worker_info(*pid).unwrap().mpi, Some((rank as i32, 3)));
        assert_eq!(cluster.remote_call_fetch(*pid, rank_and_size, ()).unwrap(), (*pid, rank as i32, 3));
    }
    let ranks: Vec<(i32, i32)> = mpido!(mgr, |comm| (comm.rank(), comm.size())).unwrap();
    assert_eq!(ranks, vec![(0, 3), (1, 3), (2, 3)], "one world of 3 ranks");
    mgr.shutdown().unwrap();
    assert!(mgr.launcher_status().unwrap().success(), "mpirun exits 0: {:?}", mgr.launcher_status());
    assert!(cluster.workers().is_empty());
}

#[test]
fn collectives_inside_mpido_do_not_deadlock() {
    let cluster = Cluster::new().unwrap();
    let mgr = manager(4);
    cluster.add_procs(&mgr).unwrap();
    let sizes: Vec<i32> = mpido!(mgr, |comm| {
        comm.barrier();
        comm.size()
    })
    .unwrap();
    assert_eq!(sizes, vec![4; 4]);
    let sums: Vec<i32> = mpido!(mgr, |comm| {
        let mut sum = 0;
        comm.all_reduce_into(&comm.rank(), &mut sum, SystemOperation::sum());
        sum
    })
    .unwrap();
    assert_eq!(sums, vec![6; 4]);
    let seed = 2.5f64;
    let broadcast: Vec<Vec<f64>> = mpido!(mgr, |comm, seed: f64| {
        let mut data = if comm.rank() == 0 { vec![seed, seed * 2.0] } else { vec![0.0; 2] };
        comm.process_at_rank(0).broadcast_into(&mut data[..]);
        data
    })
    .unwrap();
    assert_eq!(broadcast, vec![vec![2.5, 5.0]; 4]);
    let ring: Vec<i32> = mpido!(mgr, |comm| {
        let (rank, size) = (comm.rank(), comm.size());
        let mut got = -1;
        clusterman::mpi::rsmpi::point_to_point::send_receive_into(&rank, &comm.process_at_rank((rank + 1) % size), &mut got, &comm.process_at_rank((rank + size - 1) % size));
        got
    })
    .unwrap();
    assert_eq!(ring, vec![3, 0, 1, 2]);
}

#[test]
fn failing_ranks_are_all_listed() {
    let cluster = Cluster::new().unwrap();
    let mgr = manager(3);
    cluster.add_procs(&mgr).unwrap();
    let limit = 1i32;
    let err = mpido!(mgr, |comm, limit: i32| {
        assert!(comm.rank() < limit, "rank {} is over the limit", comm.rank());
        comm.rank()
    })
    .unwrap_err();
    let Error::Ranks(failures) = &err else { panic!("expected Error::Ranks, got {err}") };
    assert_eq!(failures.iter().map(|(r, _)| *r).collect::<Vec<_>>(), vec![1, 2]);
    let text = err.to_string();
    assert!(text.contains("rank 1: ") && text.contains("rank 1 is over the limit") && text.contains("rank 2 is over the limit"), "{text}");
    // the ranks survived their panics
    let ok: Vec<i32> = mpido!(mgr, |comm| comm.rank()).unwrap();
    assert_eq!(ok, vec![0, 1, 2]);
}

#[test]
fn two_managers_are_two_worlds() {
    let cluster = Cluster::new().unwrap();
    let (a, b) = (manager(2), manager(3));
    let pa = cluster.add_procs(&a).unwrap();
    let pb = cluster.add_procs(&b).unwrap();
    assert_eq!((pa.len(), pb.len()), (2, 3));
    assert!(pa.iter().all(|p| !pb.contains(p)));
    let wa: Vec<(Pid, i32)> = mpido!(a, |comm| (clusterman::my_id(), comm.size())).unwrap();
    let wb: Vec<(Pid, i32)> = mpido!(b, |comm| (clusterman::my_id(), comm.size())).unwrap();
    assert_eq!(wa, pa.iter().map(|p| (*p, 2)).collect::<Vec<_>>(), "mpido on a touches only a's ranks");
    assert_eq!(wb, pb.iter().map(|p| (*p, 3)).collect::<Vec<_>>());
    assert_eq!(b.mpi_procs(), vec![0, 1, 2]);
    a.shutdown().unwrap();
    assert_eq!(cluster.workers(), pb, "shutting down one world leaves the other");
    assert_eq!(mpido!(b, |comm| comm.rank()).unwrap(), vec![0, 1, 2]);
}

#[test]
fn a_manager_launches_once() {
    let cluster = Cluster::new().unwrap();
    let mgr = manager(1);
    cluster.add_procs(&mgr).unwrap();
    let err = cluster.add_procs(&mgr).unwrap_err();
    assert!(err.to_string().contains("already launched"), "{err}");
}

#[test]
fn output_of_every_rank_reaches_the_master() {
    let lines: Arc<Mutex<Vec<(Pid, String)>>> = Arc::default();
    let sink = lines.clone();
    let cluster = Cluster::builder().output(move |pid, line| sink.lock().unwrap().push((pid, line.into()))).build().unwrap();
    let mgr = manager(2);
    let pids = cluster.add_procs(&mgr).unwrap();
    mpido!(mgr, |comm| println!("hello from rank {}", comm.rank())).unwrap();
    assert!(common::wait_until(Duration::from_secs(10), || lines.lock().unwrap().len() >= 2));
    let got: BTreeSet<(Pid, String)> = lines.lock().unwrap().iter().cloned().collect();
    assert!(got.contains(&(pids[0], "hello from rank 0".into())) && got.contains(&(pids[1], "hello from rank 1".into())), "{got:?}");
}

#[test]
fn a_launcher_that_never_starts_ranks_times_out_with_its_stderr() {
    let script = std::env::temp_dir().join(format!("cman-fake-mpirun-{}", std::process::id()));
    std::fs::write(&script, "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'mpirun (Open MPI) 4.1.4'; exit 0; }\necho 'not enough slots available' >&2\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cluster = Cluster::new().unwrap();
    let mgr = MpiManager::new(2).launcher(&script).launch_timeout(Duration::from_secs(2));
    let err = cluster.add_procs(&mgr).unwrap_err();
    std::fs::remove_file(&script).unwrap();
    let text = err.to_string();
    assert!(matches!(err, Error::LaunchTimeout { connected: 0, expected: 2, .. }), "{text}");
    assert!(text.contains("not enough slots available"), "shows the launcher's stderr: {text}");
    assert!(mgr.launcher_status().is_some(), "the launcher was stopped");
}

#[test]
fn shutdown_finalizes_every_rank_and_leaves_no_process() {
    let cluster = Cluster::new().unwrap();
    let mgr = manager(3);
    let pids = cluster.add_procs(&mgr).unwrap();
    let os: Vec<u32> = pids.iter().map(|p| cluster.worker_info(*p).unwrap().os_pid).collect();
    cluster.shutdown().unwrap();
    assert!(common::wait_until(Duration::from_secs(10), || mgr.launcher_status().is_some()), "mpirun still running");
    assert!(mgr.launcher_status().unwrap().success(), "{:?}", mgr.launcher_status());
    assert!(os.iter().all(|p| !common::process_alive(*p)), "ranks still alive");
    mgr.shutdown().unwrap(); // after the cluster's shutdown: nothing left to do, no error
}

// ---- modes 2 and 3: this binary as every rank ----

/// Body run on every rank by `all_ranks`; rank 0 checks and prints `CHECKED <n>`.
fn all_rank_checks(transport: Transport) {
    let mgr = start_main_loop(transport).unwrap(); // ranks > 0 never return
    let cluster = mgr.cluster().unwrap();
    let size = cluster.nprocs();
    assert!(size >= 2, "a world of {size}: run with mpirun -np N, N >= 2");
    assert_eq!(mgr.rank_to_pid(0), Some(1));
    assert_eq!(mgr.pid_to_rank(1), Some(0));
    assert_eq!(mgr.procs(), (1..=size as Pid).collect::<Vec<_>>());
    assert_eq!(mgr.mpi_procs(), (0..size as i32).collect::<Vec<_>>());
    let ranks: Vec<(Pid, i32, i32)> = mpido!(mgr, |comm| (clusterman::my_id(), comm.rank(), comm.size())).unwrap();
    assert_eq!(ranks, (0..size as i32).map(|r| (r as Pid + 1, r, size as i32)).collect::<Vec<_>>());
    let sums: Vec<i32> = mpido!(mgr, |comm| {
        comm.barrier();
        let mut sum = 0;
        comm.all_reduce_into(&comm.rank(), &mut sum, SystemOperation::sum());
        sum
    })
    .unwrap();
    let expected = (0..size as i32).sum::<i32>();
    assert_eq!(sums, vec![expected; size]);
    let last = *cluster.workers().last().unwrap();
    // a worker calls another worker (over the transport, through rank 0)
    assert_eq!(cluster.remote_call_fetch(2, call_other, (last,)).unwrap(), (last, last as i32 - 1));
    let squares = cluster.pmap(square, (0..100u64).map(|x| (x,))).unwrap();
    assert_eq!(squares, (0..100u64).map(|x| x * x).collect::<Vec<_>>());
    // big vectors come back as they were: straight from rank `last`, and from it through
    // rank 0 to another worker and back (their words travel apart from their frames)
    for n in [0, 3, 300_000] {
        let expected: Vec<f64> = (0..n).map(|i| i as f64 * 0.25).collect();
        assert_eq!(cluster.remote_call_fetch(last, quarters, (n,)).unwrap(), expected, "{n} f64 from pid {last}");
        assert_eq!(cluster.remote_call_fetch(2, quarters_of, (last, n)).unwrap(), expected, "{n} f64 routed");
    }
    // frames on both sides of the size that lands in the receive posted in advance (bigger
    // ones are announced, then follow): to rank `last` and back, and routed through rank 0
    for n in (8_120..8_200).chain([200_000]) {
        let text = "x".repeat(n);
        assert_eq!(cluster.remote_call_fetch(last, echo, (text.clone(),)).unwrap(), text, "{n} chars");
        assert_eq!(cluster.remote_call_fetch(2, echo_via, (last, text.clone())).unwrap(), text, "{n} chars routed");
    }
    // one MPI message straight into the result's block, below and above the size whose
    // pages a socket read has made memory ahead
    for n in [3 << 20, 20 << 20] {
        let bytes = cluster.remote_call_fetch(last, byte_ramp, (n,)).unwrap();
        assert!(bytes.len() == n && bytes.iter().enumerate().all(|(i, b)| *b == i as u8), "{} MiB of u8", n >> 20);
    }
    // big arguments too: to rank `last`, and from another worker to it
    let sent: Vec<f64> = (0..300_000).map(|i| i as f64 * 0.25).collect();
    let expected = (sent.len(), sent.iter().sum::<f64>());
    assert_eq!(cluster.remote_call_fetch(last, count_and_sum, (sent,)).unwrap(), expected, "a big argument");
    assert_eq!(cluster.remote_call_fetch(2, count_and_sum_on, (last, 300_000)).unwrap(), expected, "a big argument from a worker");
    mgr.shutdown().unwrap();
    println!("CHECKED world={size}");
}

#[remote]
fn square(x: u64) -> u64 {
    x * x
}

#[remote]
fn quarters(n: usize) -> Vec<f64> {
    (0..n).map(|i| i as f64 * 0.25).collect()
}

#[remote]
fn quarters_of(pid: Pid, n: usize) -> clusterman::Result<Vec<f64>> {
    Cluster::current().unwrap().remote_call_fetch(pid, quarters, (n,))
}

#[remote]
fn count_and_sum(values: Vec<f64>) -> (usize, f64) {
    (values.len(), values.iter().sum())
}

#[remote]
fn count_and_sum_on(pid: Pid, n: usize) -> clusterman::Result<(usize, f64)> {
    Cluster::current().unwrap().remote_call_fetch(pid, count_and_sum, ((0..n).map(|i| i as f64 * 0.25).collect(),))
}

#[remote]
fn echo(text: String) -> String {
    text
}

#[remote]
fn echo_via(pid: Pid, text: String) -> clusterman::Result<String> {
    Cluster::current().unwrap().remote_call_fetch(pid, echo, (text,))
}

#[remote]
fn byte_ramp(n: usize) -> Vec<u8> {
    (0..n).map(|i| i as u8).collect()
}

#[remote]
fn call_other(pid: Pid) -> clusterman::Result<(Pid, i32)> {
    let (p, rank, _) = Cluster::current().unwrap().remote_call_fetch(pid, rank_and_size, ())?;
    Ok((p, rank))
}

#[test]
#[ignore = "runs as every rank under mpirun (see all_ranks_tcp)"]
fn rank_main_tcp() {
    all_rank_checks(Transport::Tcp);
}

#[test]
#[ignore = "runs as every rank under mpirun (see all_ranks_mpi)"]
fn rank_main_mpi() {
    all_rank_checks(Transport::Mpi);
}

fn mpirun_self(np: usize, test: &str, wrap: &[&str]) -> Output {
    let me = std::env::current_exe().unwrap();
    let mut cmd = Command::new(launcher());
    cmd.args(["-np", &np.to_string()]).args(wrap).arg(&me).args(["--ignored", "--exact", test, "--nocapture", "--test-threads=1"]);
    let out = cmd.output().expect("run the MPI launcher");
    eprintln!("--- {test} -np {np}\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

fn check_all_ranks(test: &str) {
    for np in [2, 3, 5] {
        let out = mpirun_self(np, test, &[]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "mpirun -np {np} failed: {:?}", out.status);
        assert!(stdout.contains(&format!("CHECKED world={np}")), "rank 0 saw a world of {np}: {stdout}");
    }
}

#[test]
fn all_ranks_tcp() {
    check_all_ranks("rank_main_tcp");
}

#[test]
fn all_ranks_mpi() {
    check_all_ranks("rank_main_mpi");
}

#[test]
fn a_launcher_of_another_mpi_is_a_clear_error() {
    // Only meaningful for the Open MPI build with MPICH installed beside it (as in CI).
    if std::env::var("CMAN_MPIEXEC").is_ok() || Command::new("mpiexec.mpich").arg("--version").output().is_err() {
        eprintln!("skipped: needs the default (Open MPI) build and mpiexec.mpich");
        return;
    }
    let cluster = Cluster::new().unwrap();
    let mgr = MpiManager::new(2).launcher("mpiexec.mpich").launch_timeout(Duration::from_secs(30));
    let started = std::time::Instant::now();
    let err = cluster.add_procs(&mgr).unwrap_err().to_string();
    assert!(err.contains("does not match the MPI this program was built with"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "failed fast, not by timeout");
}

/// Network namespaces with only loopback, deleted on drop.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn create(n: usize) -> Result<Namespaces, String> {
        let mut made = Namespaces(Vec::new());
        for i in 0..n {
            let name = format!("cman{}-{i}", std::process::id());
            let ok = Command::new("ip").args(["netns", "add", &name]).status().map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
            if !ok.success() {
                return Err(format!("`ip netns add` failed ({ok}): creating network namespaces needs root (CAP_SYS_ADMIN)"));
            }
            made.0.push(name.clone());
            Command::new("ip").args(["netns", "exec", &name, "ip", "link", "set", "lo", "up"]).status().unwrap();
        }
        Ok(made)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Rank 0 of a TCP world whose ranks cannot reach it: the others must say why and stop.
#[test]
#[ignore = "runs as every rank under mpirun (see ranks_without_tcp_between_them)"]
fn rank_main_tcp_isolated() {
    match clusterman::mpi::MainLoop::new(Transport::Tcp).launch_timeout(Duration::from_secs(60)).start() {
        Ok(mgr) => println!("UNEXPECTED success: {:?}", mgr.procs()),
        Err(e) => println!("RANK0 ERROR: {e}"),
    }
}

/// Each rank in its own network namespace with only loopback (MPI still runs over shared
/// memory): the MPI transport works there, the TCP transport fails saying to use it.
#[test]
fn ranks_without_tcp_between_them() {
    if launcher() != "mpiexec.mpich" {
        eprintln!(
            "skipped in this run: Open MPI's PMIx client reaches mpirun over loopback TCP, so a rank in its own network namespace cannot start; the MPICH run of these tests (CMAN_MPIEXEC=mpiexec.mpich, whose launcher hands each rank an inherited socket) covers it"
        );
        return;
    }
    let ns = match Namespaces::create(3) {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let me = std::env::current_exe().unwrap();
    let run = |test: &str| {
        let mut cmd = Command::new(launcher());
        for (i, name) in ns.0.iter().enumerate() {
            if i > 0 {
                cmd.arg(":");
            }
            cmd.args(["-np", "1", "ip", "netns", "exec", name]).arg(&me).args(["--ignored", "--exact", test, "--nocapture", "--test-threads=1"]);
        }
        let out = cmd.output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        eprintln!("--- {test}\n{text}");
        (out.status, text)
    };
    let (status, text) = run("rank_main_mpi");
    assert!(status.success() && text.contains("CHECKED world=3"), "the MPI transport works without TCP: {text}");
    let started = std::time::Instant::now();
    let (_, text) = run("rank_main_tcp_isolated");
    let rank0 = text.lines().find(|l| l.contains("RANK0 ERROR")).unwrap_or_else(|| panic!("rank 0 reports an error: {text}"));
    assert!(rank0.contains("cannot reach rank 0") && rank0.contains("use Transport::Mpi"), "{rank0}");
    assert!(started.elapsed() < Duration::from_secs(30), "rank 0 failed at once, not at its 60 s timeout");
}

#[test]
fn no_other_user_finds_the_secret_of_an_mpirun_launch() {
    let cluster = Cluster::new().unwrap();
    let mgr = manager(2);
    let pids = cluster.add_procs(&mgr).unwrap();
    let secret = clusterman::__private::secret_hex(&cluster).unwrap();
    let ranks = common::worker_os_pids(&cluster, &pids);
    assert_eq!(common::secret_in_processes(&secret, &ranks), Vec::<String>::new(), "each rank scrubbed it from its own environment");
    common::assert_nobody_finds(&secret, &[&std::env::temp_dir()], &[]);
    mgr.shutdown().unwrap();
}

/// The master of the test below; runs only when asked to.
#[test]
#[ignore = "run by killing_the_master_stops_mpirun_and_its_ranks_cleanly"]
fn mpi_master_to_be_killed() {
    if std::env::var("CMAN_MPI_MASTER").is_err() {
        return;
    }
    let cluster = Cluster::new().unwrap();
    let mgr = manager(2);
    let pids = cluster.add_procs(&mgr).unwrap();
    println!("WORKERS {}", common::worker_os_pids(&cluster, &pids).iter().map(u32::to_string).collect::<Vec<_>>().join(" "));
    std::thread::sleep(Duration::from_secs(120));
}

fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(')').unwrap().1.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn killing_the_master_stops_mpirun_and_its_ranks_cleanly() {
    let mut master = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "mpi_master_to_be_killed", "--nocapture"])
        .env("CMAN_MPI_MASTER", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ranks = common::read_workers_line(master.stdout.take().unwrap(), Duration::from_secs(60));
    let mut launcher_pid = parent_of(ranks[0]);
    while parent_of(launcher_pid) != master.id() {
        launcher_pid = parent_of(launcher_pid); // MPICH: hydra's proxy sits between
        assert!(launcher_pid > 1, "rank {} does not descend from the master", ranks[0]);
    }
    // Open MPI keeps a session directory per mpirun; stopped with SIGKILL it stays behind
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    // SAFETY: getuid cannot fail.
    let session = std::path::PathBuf::from(format!("/tmp/ompi.{host}.{}/pid.{launcher_pid}", unsafe { libc::getuid() }));
    let open_mpi = session.exists();
    master.kill().unwrap(); // SIGKILL
    master.wait().unwrap();
    let mut all = ranks.clone();
    all.push(launcher_pid);
    assert!(common::wait_until(Duration::from_secs(20), || all.iter().all(|p| !common::process_alive(*p))), "left running: {all:?}");
    if open_mpi {
        assert!(common::wait_until(Duration::from_secs(5), || !session.exists()), "mpirun left its session directory {}", session.display());
    }
}
