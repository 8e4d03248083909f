//! Typed remote calls on real worker processes: results, panics, `Err`, futures,
//! `remote_do`, `everywhere`, worker-to-worker calls, removing workers.

mod common;

use std::time::Duration;

use clusterman::prelude::*;
use clusterman::{Error, RemoteError, Topology};

clusterman::init_in_constructor!();

#[remote]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[remote]
fn describe(name: String, values: Vec<u32>) -> (String, u32, Pid) {
    (name.to_uppercase(), values.iter().sum(), my_id())
}

#[remote]
fn explode(msg: String) -> u8 {
    panic!("exploding: {msg}")
}

#[remote]
fn parse_number(s: String) -> Result<u32, std::num::ParseIntError> {
    s.parse()
}

#[remote]
fn os_pid() -> u32 {
    std::process::id()
}

/// Calls `add` on another worker from inside a worker.
#[remote]
fn add_via(other: Pid, a: i64, b: i64) -> clusterman::Result<(Pid, i64)> {
    let cluster = Cluster::current().expect("a worker has a current cluster");
    Ok((my_id(), cluster.remote_call_fetch(other, add, (a, b))?))
}

/// Calls back into the master (pid 1).
#[remote]
fn ask_master_for_workers() -> Vec<Pid> {
    Cluster::current().unwrap().workers()
}

/// On worker B: calls `add` back on the worker that asked (a call in each direction).
#[remote]
fn bounce(origin: Pid) -> clusterman::Result<i64> {
    Cluster::current().unwrap().remote_call_fetch(origin, add, (my_id() as i64, 1000))
}

#[remote]
fn call_sleeper(other: Pid, ms: u64) -> clusterman::Result<u64> {
    Cluster::current().unwrap().remote_call_fetch(other, sleep_ms, (ms,))
}

#[test]
fn all_to_all_workers_call_each_other_directly() {
    let cluster = Cluster::builder().topology(Topology::AllToAll).build().unwrap();
    let pids = cluster.add_procs(LocalManager::new(3)).unwrap();
    for round in 0..10 {
        assert_eq!(cluster.remote_call_fetch(pids[round % 3], add_via, (pids[(round + 1) % 3], round as i64, 1)).unwrap(), (pids[round % 3], round as i64 + 1));
    }
    // a call that calls back the worker it came from: direct links in both directions
    assert_eq!(cluster.remote_call_fetch(pids[0], call_bounce, (pids[1],)).unwrap(), pids[1] as i64 + 1000);
    assert_eq!(cluster.routed_frames(), 0, "nothing went through the master");
    // a peer that dies: the direct call pending on it fails, it does not hang
    let victim = cluster.worker_info(pids[2]).unwrap().os_pid;
    let pending = cluster.remote_call(pids[0], call_sleeper, (pids[2], 30_000)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    unsafe_kill(victim);
    let err = pending.fetch().unwrap_err();
    assert!(err.to_string().contains("died"), "{err}");
    assert_eq!(cluster.remote_call_fetch(pids[0], add_via, (pids[1], 2, 2)).unwrap(), (pids[0], 4));
}

/// On worker A: asks B to call A back.
#[remote]
fn call_bounce(other: Pid) -> clusterman::Result<i64> {
    Cluster::current().unwrap().remote_call_fetch(other, bounce, (my_id(),))
}

static TOUCHED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[remote]
fn touch(v: u64) {
    TOUCHED.store(v, std::sync::atomic::Ordering::SeqCst);
}

#[remote]
fn touched() -> u64 {
    TOUCHED.load(std::sync::atomic::Ordering::SeqCst)
}

fn cluster_with(n: usize) -> (Cluster, Vec<Pid>) {
    let cluster = Cluster::new().expect("cluster");
    let pids = cluster.add_procs(LocalManager::new(n)).expect("workers start");
    (cluster, pids)
}

#[test]
fn typed_calls_return_typed_results() {
    let (cluster, pids) = cluster_with(2);
    assert_eq!(pids, vec![2, 3]);
    assert_eq!(cluster.workers(), pids);
    assert_eq!(cluster.nprocs(), 3);
    assert_eq!(cluster.remote_call_fetch(pids[0], add, (40, 2)).unwrap(), 42);
    let (name, sum, ran_on) = cluster.remote_call(pids[1], describe, ("abc".into(), vec![1, 2, 3])).unwrap().fetch().unwrap();
    assert_eq!((name.as_str(), sum, ran_on), ("ABC", 6, pids[1]));
    // each worker is its own process, and not the master
    let a = cluster.remote_call_fetch(pids[0], os_pid, ()).unwrap();
    let b = cluster.remote_call_fetch(pids[1], os_pid, ()).unwrap();
    assert!(a != b && a != std::process::id());
    assert_eq!(cluster.worker_info(pids[0]).unwrap().os_pid, a);
    // calling pid 1 (this process) runs here
    assert_eq!(cluster.remote_call_fetch(1, describe, ("x".into(), vec![])).unwrap().2, 1);
}

/// Scales a vector of numbers: a block each way (a single argument and a result).
#[remote]
fn scaled(values: Vec<f64>) -> Vec<f64> {
    values.iter().map(|v| v * 2.0).collect()
}

/// Bytes, and a struct holding a vector (which goes element by element).
#[remote]
fn reversed(bytes: Vec<u8>, tag: (u32, Vec<i16>)) -> (Vec<u8>, Vec<i16>) {
    (bytes.into_iter().rev().collect(), tag.1.into_iter().map(|v| v + tag.0 as i16).collect())
}

#[test]
fn big_vectors_arrive_exact_both_ways_again_and_again() {
    // a few MiB each: big enough that their buffers are kept and reused between calls
    let (cluster, pids) = cluster_with(1);
    for round in 0..3u32 {
        let values: Vec<f64> = (0..500_000).map(|i| f64::from(i) * 0.5 + f64::from(round)).collect();
        let doubled = cluster.remote_call_fetch(pids[0], scaled, (values.clone(),)).unwrap();
        assert_eq!(doubled.len(), values.len());
        assert!(doubled.iter().zip(&values).all(|(d, v)| *d == v * 2.0), "round {round}");
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(round + 7) >> 3) as u8).collect();
        let (back, tagged) = cluster.remote_call_fetch(pids[0], reversed, (bytes.clone(), (round, vec![1, -2]))).unwrap();
        assert!(back.iter().rev().eq(bytes.iter()), "round {round}");
        assert_eq!(tagged, vec![1 + round as i16, -2 + round as i16]);
    }
    let shares = cluster.everywhere(scaled, (vec![1.5; 300_000],)).unwrap();
    assert!(shares[&pids[0]].iter().all(|v| *v == 3.0));
    // 24 MB: more than the stretch whose pages a socket read has made memory ahead
    let values: Vec<f64> = (0..3_000_000).map(f64::from).collect();
    let doubled = cluster.remote_call_fetch(pids[0], scaled, (values.clone(),)).unwrap();
    assert!(doubled.len() == values.len() && doubled.iter().zip(&values).all(|(d, v)| *d == v * 2.0), "24 MB of f64");
}

/// A struct whose vectors travel as one block each (`clusterman::bulk`).
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
struct Samples {
    channel: u32,
    #[serde(with = "clusterman::bulk")]
    values: Vec<f64>,
    #[serde(with = "clusterman::bulk")]
    flags: Vec<u8>,
}

#[remote]
fn shifted(samples: Samples, by: f64) -> Samples {
    Samples { channel: samples.channel + 1, values: samples.values.iter().map(|v| v + by).collect(), flags: samples.flags.iter().map(|f| !f).collect() }
}

#[test]
fn struct_fields_marked_bulk_arrive_exact_both_ways() {
    let (cluster, pids) = cluster_with(1);
    let samples = Samples { channel: 3, values: (0..400_000).map(|i| f64::from(i) / 3.0).collect(), flags: (0..1_000_001u32).map(|i| (i % 251) as u8).collect() };
    let back = cluster.remote_call_fetch(pids[0], shifted, (samples.clone(), 0.5)).unwrap();
    assert_eq!(back.channel, 4);
    assert!(back.values.iter().zip(&samples.values).all(|(b, v)| *b == v + 0.5));
    assert!(back.flags.iter().zip(&samples.flags).all(|(b, f)| *b == !f) && back.flags.len() == samples.flags.len());
}

#[test]
fn many_futures_in_flight_resolve_to_their_own_results() {
    let (cluster, pids) = cluster_with(2);
    let futures: Vec<_> = (0..200).map(|i| cluster.remote_call(pids[i % 2], add, (i as i64, 1000)).unwrap()).collect();
    for (i, f) in futures.into_iter().enumerate() {
        assert_eq!(f.pid(), pids[i % 2]);
        assert_eq!(f.fetch().unwrap(), i as i64 + 1000);
    }
}

#[test]
fn calls_work_from_inside_a_users_tokio_runtime() {
    let (cluster, pids) = cluster_with(2);
    // a blocking call first: its thread drove the I/O runtime, whose own thread now rests
    assert_eq!(cluster.remote_call_fetch(pids[0], add, (1, 2)).unwrap(), 3);
    let (done, finished) = std::sync::mpsc::channel();
    let user = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        runtime.block_on(async {
            // blocking calls inside an async runtime: this thread cannot drive ours, it waits
            assert_eq!(cluster.everywhere(add, (3, 3)).unwrap().into_values().collect::<Vec<_>>(), vec![6, 6]);
            assert_eq!(cluster.remote_call_fetch(pids[1], add, (2, 2)).unwrap(), 4);
            // and awaited ones, which a task of the user's runtime polls
            let awaited = cluster.remote_call(pids[0], add, (4, 4)).unwrap().await.unwrap();
            let timed = tokio::time::timeout(Duration::from_secs(10), cluster.remote_call(pids[1], add, (5, 5)).unwrap()).await;
            assert_eq!((awaited, timed.expect("an awaited call answered").unwrap()), (8, 10));
        });
        let _ = done.send(());
    });
    let answered = finished.recv_timeout(Duration::from_secs(60));
    assert!(user.is_finished() || answered.is_ok(), "calls made inside a tokio runtime hang");
    user.join().expect("the calls inside the runtime");
}

/// Runs on the master (pid 1), called by a worker: a call to every worker from the master's
/// pool.
#[remote]
fn add_everywhere() -> usize {
    Cluster::current().unwrap().everywhere(add, (1, 1)).unwrap().len()
}

#[remote]
fn ask_the_master_to_add_everywhere() -> usize {
    Cluster::current().unwrap().remote_call_fetch(1, add_everywhere, ()).unwrap()
}

#[test]
fn everywhere_run_by_the_master_for_a_worker_answers_while_the_caller_cannot_read_replies() {
    let (cluster, pids) = cluster_with(2);
    assert_eq!(cluster.remote_call_fetch(pids[0], add, (1, 2)).unwrap(), 3); // the I/O thread rests now
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // inside an async runtime the caller cannot read replies itself: only the I/O thread can
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let _ = done.send(runtime.block_on(async { cluster.remote_call_fetch(pids[0], ask_the_master_to_add_everywhere, ()) }));
    });
    let reached = finished.recv_timeout(Duration::from_secs(60)).expect("the pool's everywhere hangs");
    assert_eq!(reached.unwrap(), 2);
}

#[test]
fn remote_future_is_a_std_future() {
    let (cluster, pids) = cluster_with(1);
    let fut = cluster.remote_call(pids[0], add, (2, 3)).unwrap();
    assert_eq!(common::block_on(fut).unwrap(), 5);
    let both = async {
        let a = cluster.remote_call(pids[0], add, (1, 1)).unwrap().await.unwrap();
        cluster.remote_call(pids[0], add, (a, 1)).unwrap().await.unwrap()
    };
    assert_eq!(common::block_on(both), 3);
}

#[test]
fn a_panic_comes_back_as_remote_error_with_location() {
    let (cluster, pids) = cluster_with(1);
    let err = cluster.remote_call_fetch(pids[0], explode, ("kaboom".into(),)).unwrap_err();
    match err {
        Error::Remote(RemoteError { pid, function, message, location }) => {
            assert_eq!(pid, pids[0]);
            assert!(function.ends_with("::explode"), "{function}");
            assert_eq!(message, "exploding: kaboom");
            assert!(location.unwrap().contains("calls.rs"));
        }
        other => panic!("expected a RemoteError, got {other}"),
    }
    // the worker survived its panic
    assert_eq!(cluster.remote_call_fetch(pids[0], add, (1, 2)).unwrap(), 3);
}

#[test]
fn an_err_comes_back_as_remote_error_without_location() {
    let (cluster, pids) = cluster_with(1);
    assert_eq!(cluster.remote_call_fetch(pids[0], parse_number, ("17".into(),)).unwrap(), 17);
    let err = cluster.remote_call_fetch(pids[0], parse_number, ("x7".into(),)).unwrap_err();
    let Error::Remote(e) = err else { panic!("expected RemoteError") };
    assert_eq!((e.pid, e.message.as_str(), e.location), (pids[0], "invalid digit found in string", None));
}

#[test]
fn workers_call_each_other_and_the_master() {
    let (cluster, pids) = cluster_with(2);
    assert_eq!(cluster.remote_call_fetch(pids[0], add_via, (pids[1], 20, 22)).unwrap(), (pids[0], 42));
    assert_eq!(cluster.routed_frames(), 1, "master-worker topology: routed through the master");
    assert_eq!(cluster.remote_call_fetch(pids[1], ask_master_for_workers, ()).unwrap(), pids);
    // a worker asking for a pid that does not exist gets a clear error
    let err = cluster.remote_call_fetch(pids[0], add_via, (99, 1, 1)).unwrap_err();
    assert!(err.to_string().contains("no worker with pid 99"), "{err}");
}

#[test]
fn remote_do_runs_without_a_reply_and_everywhere_reaches_all() {
    let (cluster, pids) = cluster_with(3);
    for &p in &pids {
        cluster.remote_do(p, touch, (p as u64 * 10,)).unwrap();
    }
    // a call after remote_do on the same connection sees its effect (frames are in order)
    let seen = cluster.everywhere(touched, ()).unwrap();
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), pids.iter().map(|&p| (p, p as u64 * 10)).collect::<Vec<_>>());
    let all = cluster.everywhere(describe, ("w".into(), vec![5])).unwrap();
    assert_eq!(all.keys().copied().collect::<Vec<_>>(), pids);
    assert!(all.iter().all(|(pid, (_, sum, ran_on))| *sum == 5 && ran_on == pid));
    // one failing worker fails everywhere with its error
    let err = cluster.everywhere(explode, ("all".into(),)).unwrap_err();
    assert!(matches!(err, Error::Remote(ref e) if e.pid == pids[0]), "{err}");
}

/// Ends the worker process that runs it when it is `pid`; the others answer their pid.
#[remote]
fn die_if(pid: u32) -> u32 {
    let me = clusterman::my_id();
    if me == pid {
        std::process::exit(3);
    }
    me
}

#[test]
fn a_worker_that_dies_mid_everywhere_fails_the_round_with_its_death_and_the_next_round_runs_on_the_others() {
    let (cluster, pids) = cluster_with(3);
    let started = std::time::Instant::now();
    let err = cluster.everywhere(die_if, (pids[1],)).unwrap_err();
    assert!(matches!(err, Error::WorkerDied { pid, .. } if pid == pids[1]), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "told at the worker's death, not at a timeout: {:?}", started.elapsed());
    let again = cluster.everywhere(die_if, (0,)).unwrap();
    assert_eq!(again.into_iter().collect::<Vec<_>>(), vec![(pids[0], pids[0]), (pids[2], pids[2])]);
}

#[test]
fn rm_procs_stops_workers_and_their_processes() {
    let (cluster, pids) = cluster_with(2);
    let os = cluster.worker_info(pids[0]).unwrap().os_pid;
    cluster.rm_procs(&pids[..1]).unwrap();
    assert_eq!(cluster.workers(), vec![pids[1]]);
    assert!(common::wait_until(Duration::from_secs(10), || !common::process_alive(os)), "worker process {os} still alive");
    let err = cluster.remote_call(pids[0], add, (1, 1)).unwrap_err();
    assert!(matches!(err, Error::NoSuchWorker(p) if p == pids[0]));
    assert!(matches!(cluster.rm_procs(&[77]), Err(Error::NoSuchWorker(77))));
    assert_eq!(cluster.remote_call_fetch(pids[1], add, (1, 1)).unwrap(), 2);
}

#[test]
fn shutdown_is_idempotent_and_leaves_no_process() {
    let (cluster, pids) = cluster_with(3);
    let os: Vec<u32> = pids.iter().map(|p| cluster.worker_info(*p).unwrap().os_pid).collect();
    cluster.shutdown().unwrap();
    cluster.shutdown().unwrap();
    assert!(cluster.workers().is_empty());
    for p in os {
        assert!(!common::process_alive(p), "worker process {p} survived shutdown");
    }
    assert!(matches!(cluster.add_procs(LocalManager::new(1)), Err(Error::ShutDown)));
    drop(cluster); // drop after shutdown does nothing more
}

#[test]
fn drop_stops_the_workers() {
    let (cluster, pids) = cluster_with(2);
    let os: Vec<u32> = pids.iter().map(|p| cluster.worker_info(*p).unwrap().os_pid).collect();
    drop(cluster);
    for p in os {
        assert!(!common::process_alive(p), "worker process {p} survived drop");
    }
}

#[test]
fn a_dead_worker_fails_pending_calls_promptly() {
    let (cluster, pids) = cluster_with(2);
    let os = cluster.worker_info(pids[0]).unwrap().os_pid;
    let slow = cluster.remote_call(pids[0], sleep_ms, (30_000,)).unwrap();
    unsafe_kill(os);
    let started = std::time::Instant::now();
    let err = slow.fetch().unwrap_err();
    assert!(matches!(err, Error::WorkerDied { pid, .. } if pid == pids[0]), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(common::wait_until(Duration::from_secs(5), || cluster.workers() == vec![pids[1]]));
    // a call routed through the master to the dead worker fails too, the others still serve
    let err = cluster.remote_call_fetch(pids[1], add_via, (pids[0], 1, 1)).unwrap_err();
    assert!(err.to_string().contains(&format!("no worker with pid {}", pids[0])), "{err}");
    assert_eq!(cluster.remote_call_fetch(pids[1], add, (2, 2)).unwrap(), 4);
}

/// Claims 3 workers but starts only 2: a launch that never completes.
struct TwoOfThree {
    min: Option<usize>,
}

impl ClusterManager for TwoOfThree {
    fn name(&self) -> &str {
        "two-of-three"
    }
    fn count(&self) -> usize {
        3
    }
    fn launch(&self, ctx: &clusterman::LaunchContext) -> clusterman::Result<Box<dyn clusterman::Launch>> {
        LocalManager::new(2).launch(ctx)
    }
    fn launch_timeout(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn min_workers(&self) -> usize {
        self.min.unwrap_or(3)
    }
}

#[test]
fn min_workers_decides_between_going_on_and_failing() {
    let cluster = Cluster::new().unwrap();
    let err = cluster.add_procs(TwoOfThree { min: None }).unwrap_err();
    assert!(matches!(err, Error::LaunchTimeout { connected: 2, expected: 3, .. }), "{err}");
    assert!(cluster.workers().is_empty(), "the workers of a failed launch are stopped");
    let pids = cluster.add_procs(TwoOfThree { min: Some(2) }).unwrap();
    assert_eq!(pids.len(), 2);
    assert_eq!(cluster.remote_call_fetch(pids[1], add, (1, 1)).unwrap(), 2);
}

#[remote]
fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

fn unsafe_kill(pid: u32) {
    let status = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(status.success());
}

#[test]
fn asking_for_zero_workers_is_an_error_that_says_so() {
    let cluster = Cluster::new().unwrap();
    let err = cluster.add_procs(LocalManager::new(0)).unwrap_err().to_string();
    assert!(err.contains("0 workers") && err.contains("at least one"), "{err}");
}

/// A master whose program file is replaced while it runs: run by
/// `a_rebuilt_program_is_an_error_that_says_to_restart`.
#[test]
#[ignore = "run by a_rebuilt_program_is_an_error_that_says_to_restart"]
fn master_of_a_replaced_file() {
    let replaced = || std::fs::read_link("/proc/self/exe").is_ok_and(|p| p.to_string_lossy().ends_with(" (deleted)"));
    assert!(common::wait_until(Duration::from_secs(30), replaced), "the file was not replaced");
    let cluster = Cluster::new().unwrap();
    println!("ERROR {}", cluster.add_procs(LocalManager::new(1)).unwrap_err());
}

#[test]
fn a_rebuilt_program_is_an_error_that_says_to_restart() {
    let dir = common::temp_dir("rebuilt");
    let copy = dir.join("prog");
    std::fs::copy(std::env::current_exe().unwrap(), &copy).unwrap();
    let start = || {
        std::process::Command::new(&copy)
            .args(["--ignored", "--exact", "master_of_a_replaced_file", "--nocapture", "--test-threads=1"])
            .stdout(std::process::Stdio::piped())
            .spawn()
    };
    // "text file busy" while a child another test thread forked still holds the copy open
    let mut master = start();
    for _ in 0..50 {
        match &master {
            Err(e) if e.raw_os_error() == Some(26) => std::thread::sleep(Duration::from_millis(20)),
            _ => break,
        }
        master = start();
    }
    let master = master.unwrap();
    // what a rebuild does: a new file under the same name
    std::fs::remove_file(&copy).unwrap();
    std::fs::copy(std::env::current_exe().unwrap(), &copy).unwrap();
    let out = master.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let expected = format!("{} was replaced since this program started (rebuilt?), so workers would run another build; restart the program", copy.display());
    assert!(text.contains(&expected), "{text}");
    let _ = std::fs::remove_dir_all(&dir); // a copy of the test program: tens of MB
}
