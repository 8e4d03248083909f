//! A real multi-node Slurm (`ci/multinode.sh`): a controller, a login host and two compute
//! nodes, each in its own network, UTS, mount, PID and IPC namespaces on a bridge. The master
//! runs on the login host, as on a real cluster. Jobs span both nodes; nodes that cannot
//! reach the login host, a node that dies and a node cut off from the network mid-call; after
//! each, no job in the queue and no worker process on any node.
//!
//! Each test here drives one ignored `on_login_*` test, which this binary runs on the login
//! host (`ci/multinode.sh exec login ...`) and which prints what it saw.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clusterman::launch::scheduler::SlurmManager;
use clusterman::mpido;
use clusterman::prelude::*;
use clusterman::{Error, Pid};

clusterman::init_in_constructor!();

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/ci/multinode.sh");

/// One test at a time: they cut links and kill nodes of the one cluster.
static SERIAL: Mutex<()> = Mutex::new(());

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string()
}

#[remote]
fn hostname() -> String {
    host()
}

#[remote]
fn square_on(x: u64, pause_ms: u64) -> (u64, String) {
    std::thread::sleep(Duration::from_millis(pause_ms));
    (x * x, host())
}

#[remote]
fn sleep_secs(s: u64) -> u64 {
    std::thread::sleep(Duration::from_secs(s));
    s
}

/// Runs `ci/multinode.sh args...`; its stdout.
fn mn(args: &[&str]) -> String {
    let out = Command::new("bash").arg(SCRIPT).args(args).output().unwrap();
    assert!(out.status.success(), "ci/multinode.sh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The multi-node cluster is up (or the test must fail, because CI promised it), and whole:
/// whatever an earlier test that failed midway cut or killed is mended.
fn multinode_up() -> bool {
    let up = Command::new("bash").args([SCRIPT, "exec", "login", "sinfo", "-h"]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    assert!(up || std::env::var_os("CMAN_REQUIRE_MULTINODE").is_none(), "CMAN_REQUIRE_MULTINODE is set but the multi-node Slurm does not answer (ci/multinode.sh up)");
    if !up {
        eprintln!("skipped: no multi-node Slurm here; start one with `ci/multinode.sh up` (as root)");
    }
    up
}

/// Takes the one-test-at-a-time lock and mends the cluster.
fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    let one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    mn(&["mend"]);
    one
}

/// Runs this binary's ignored test `inner` on the login host, with `env`.
fn on_login(inner: &str, env: &[(&str, &str)]) -> Child {
    let exe = std::env::current_exe().unwrap();
    Command::new("bash")
        .args([SCRIPT, "exec", "login"])
        .arg(exe)
        .args(["--ignored", "--exact", inner, "--nocapture", "--test-threads=1"])
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Our workers' processes on `host`: those running this binary.
fn workers_on(host: &str) -> Vec<u32> {
    let me = std::env::current_exe().unwrap();
    mn(&["pids", host]).split_whitespace().filter_map(|p| p.parse().ok()).filter(|p| std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == me)).collect()
}

fn jobs_in_queue() -> String {
    mn(&["exec", "login", "squeue", "-h", "-o", "%i %T %N"])
}

/// After a test: the queue empties and no worker is left on any node.
fn assert_nothing_left(within: Duration) {
    assert!(common::wait_until(within, || jobs_in_queue().trim().is_empty()), "jobs left: {}", jobs_in_queue());
    for node in ["node1", "node2"] {
        assert!(common::wait_until(Duration::from_secs(10), || workers_on(node).is_empty()), "workers left on {node}: {:?}", workers_on(node));
    }
}

/// Four workers, two on each node (a job that cannot start fails instead of waiting). A
/// binary built with MPICH (`CMAN_MPIEXEC=mpiexec.mpich`) needs srun's PMI-2, not PMIx.
fn two_nodes(tag: &str) -> SlurmManager {
    let slurm = SlurmManager::new(4).job(common::test_job(tag).queue_timeout(Duration::from_secs(60))).option("nodes", 2).option("ntasks_per_node", 2);
    if common::mpi_launcher().contains("mpich") { slurm.option("mpi", "pmi2") } else { slurm }
}

/// The pids of the workers on each host.
fn by_host(cluster: &Cluster) -> std::collections::BTreeMap<String, Vec<Pid>> {
    let mut hosts = std::collections::BTreeMap::<String, Vec<Pid>>::new();
    for (pid, host) in cluster.everywhere(hostname, ()).unwrap() {
        hosts.entry(host).or_default().push(pid);
    }
    hosts
}

#[test]
#[ignore = "run on the login host by workers_span_two_nodes_in_one_mpi_world"]
fn on_login_span() {
    let cluster = Cluster::new().unwrap();
    let slurm = two_nodes("mn-span");
    cluster.add_procs(&slurm).unwrap();
    let world: Vec<(i32, i32, String)> = mpido!(slurm, |comm| {
        let mut sum = 0;
        comm.all_reduce_into(&1, &mut sum, clusterman::mpi::SystemOperation::sum());
        (comm.rank(), sum, std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string())
    })
    .unwrap();
    let hosts: BTreeSet<&str> = world.iter().map(|(_, _, h)| h.as_str()).collect();
    assert!(world.iter().all(|(_, sum, _)| *sum == 4), "one MPI world of 4: {world:?}");
    assert_eq!(by_host(&cluster).keys().map(String::as_str).collect::<BTreeSet<_>>(), hosts, "everywhere reaches every worker");
    let squares = cluster.pmap(square_on, (0..100u64).map(|x| (x, 0))).unwrap();
    assert_eq!(squares.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (0..100u64).map(|x| x * x).collect::<Vec<_>>());
    let served: BTreeSet<&str> = squares.iter().map(|(_, h)| h.as_str()).collect();
    cluster.shutdown().unwrap();
    println!("MPI-HOSTS {}", hosts.into_iter().collect::<Vec<_>>().join(","));
    println!("PMAP-HOSTS {}", served.into_iter().collect::<Vec<_>>().join(","));
}

#[test]
fn workers_span_two_nodes_in_one_mpi_world() {
    if !multinode_up() {
        return;
    }
    let _one = exclusive();
    let (status, out, err) = common::output_within(on_login("on_login_span", &[]), Duration::from_secs(120));
    assert!(status.success(), "{out}\n{err}");
    assert!(out.contains("MPI-HOSTS node1,node2\n"), "mpido! on both nodes:\n{out}");
    assert!(out.contains("PMAP-HOSTS node1,node2\n"), "pmap used both nodes:\n{out}");
    assert_nothing_left(Duration::from_secs(30));
}

#[test]
#[ignore = "run on the login host by nodes_without_a_route_to_the_login_host"]
fn on_login_unreachable() {
    let cluster = Cluster::new().unwrap();
    let started = Instant::now();
    let job = common::test_job("mn-unreachable").queue_timeout(Duration::from_secs(60));
    let err = cluster.add_procs(SlurmManager::new(2).job(job)).unwrap_err().to_string();
    println!("ERROR after {:.1} s: {err}", started.elapsed().as_secs_f64());
}

/// A program that submits itself as one job, for `nodes_without_a_route_to_the_login_host`.
#[test]
#[ignore = "run on the login host by nodes_without_a_route_to_the_login_host"]
fn whole_program() {
    let Ok(name) = std::env::var("CMAN_JOB_NAME") else { return };
    two_nodes("mn-whole").job(common::whole_program_job(&name)).run_as_job().unwrap();
    common::whole_program_ranks();
}

#[test]
fn nodes_without_a_route_to_the_login_host() {
    if !multinode_up() {
        return;
    }
    let _one = exclusive();
    mn(&["isolate-login"]);
    let _undo = Mended;
    // workers that must dial the master fail at once, with the way out
    let (status, out, err) = common::output_within(on_login("on_login_unreachable", &[]), Duration::from_secs(120));
    assert!(status.success(), "{out}\n{err}");
    let line = out.lines().find_map(|l| l.find("ERROR after").map(|at| &l[at..])).unwrap_or_else(|| panic!("{out}\n{err}"));
    assert!(line.contains("cannot reach this master") && line.contains("run_as_job") && line.contains("Transport::Mpi"), "{line}");
    let secs: f64 = line["ERROR after ".len()..].split(' ').next().unwrap().parse().unwrap();
    assert!(secs < 30.0, "fails fast, not at the launch timeout: {line}");
    assert_nothing_left(Duration::from_secs(30));
    // the program submitted as one job runs over MPI on both nodes and reports back
    let name = format!("cman-mn-whole-{}", std::process::id());
    let env = [("CMAN_JOB_NAME", name.as_str()), ("CMAN_TRANSPORT", "mpi"), ("CMAN_EXIT", "7")];
    let (status, out, err) = common::output_within(on_login("whole_program", &env), Duration::from_secs(120));
    assert!(out.contains("HOSTS node1,node2\n") && out.contains("WHOLE world=4 sum=10 transport=mpi\n"), "the ranks' output comes back:\n{out}\n{err}");
    assert_eq!(status.code(), Some(7), "the job's status:\n{out}\n{err}");
    assert_nothing_left(Duration::from_secs(30));
}

#[test]
#[ignore = "run on the login host by a_node_that_dies_mid_pmap"]
fn on_login_node_dies() {
    let cluster = Cluster::builder().heartbeat(Duration::from_millis(200), Duration::from_secs(3)).build().unwrap();
    cluster.add_procs(two_nodes("mn-dies")).unwrap();
    let hosts = by_host(&cluster);
    println!("KILL node2");
    let started = Instant::now();
    let results = cluster.pmap(square_on, (0..80u64).map(|x| (x, 200))).unwrap();
    assert_eq!(results.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (0..80u64).map(|x| x * x).collect::<Vec<_>>(), "every item once");
    assert_eq!(cluster.workers(), hosts["node1"], "node2's workers are gone");
    cluster.shutdown().unwrap();
    println!("PMAP-DONE in {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn a_node_that_dies_mid_pmap() {
    if !multinode_up() {
        return;
    }
    let _one = exclusive();
    let mut child = on_login("on_login_node_dies", &[]);
    let lines = common::lines_of(&mut child);
    common::expect_line(&mut child, &lines, "KILL node2", Duration::from_secs(90));
    mn(&["kill", "node2"]); // its link first: no goodbye reaches the master, only silence
    let _revive = Mended;
    let done = common::expect_line(&mut child, &lines, "PMAP-DONE", Duration::from_secs(60));
    let (status, _, err) = common::output_within(child, Duration::from_secs(30));
    assert!(status.success(), "{done}\n{err}");
    assert_nothing_left(Duration::from_secs(60));
}

/// Mends the cluster when dropped (routes back, links up, a killed node revived), so a
/// test that fails midway leaves it whole.
struct Mended;

impl Drop for Mended {
    fn drop(&mut self) {
        mn(&["mend"]);
    }
}

#[test]
#[ignore = "run on the login host by a_node_cut_off_mid_call"]
fn on_login_cut_off() {
    let cluster = Cluster::builder().heartbeat(Duration::from_millis(200), Duration::from_secs(3)).build().unwrap();
    cluster.add_procs(two_nodes("mn-cut")).unwrap();
    let hosts = by_host(&cluster);
    let call = cluster.remote_call(hosts["node2"][0], sleep_secs, (60,)).unwrap();
    println!("CUT node2");
    let started = Instant::now();
    let outcome = call.fetch();
    let waited = started.elapsed().as_secs_f64();
    assert!(matches!(&outcome, Err(Error::WorkerDied { reason, .. }) if reason.contains("heartbeat")), "{outcome:?}");
    // node2's other worker falls silent at the same moment, but its silence is its own
    assert!(common::wait_until(Duration::from_secs(2), || cluster.workers() == hosts["node1"]), "{:?}", cluster.workers());
    cluster.shutdown().unwrap();
    println!("DECLARED-DEAD after {waited:.1} s");
}

#[test]
fn a_node_cut_off_mid_call() {
    if !multinode_up() {
        return;
    }
    let _one = exclusive();
    let mut child = on_login("on_login_cut_off", &[]);
    let lines = common::lines_of(&mut child);
    common::expect_line(&mut child, &lines, "CUT node2", Duration::from_secs(90));
    let _undo = Mended;
    mn(&["cut", "node2"]);
    let dead = common::expect_line(&mut child, &lines, "DECLARED-DEAD", Duration::from_secs(30));
    let secs: f64 = dead["DECLARED-DEAD after ".len()..].split(' ').next().unwrap().parse().unwrap();
    assert!(secs < 8.0, "within the 3 s heartbeat timeout (and a poll): {dead}");
    let (status, _, err) = common::output_within(child, Duration::from_secs(30));
    assert!(status.success(), "{err}");
    // the cut-off workers hear no heartbeat and exit by themselves, before the link heals
    assert!(common::wait_until(Duration::from_secs(15), || workers_on("node2").is_empty()), "workers left on the cut-off node: {:?}", workers_on("node2"));
    mn(&["heal", "node2"]);
    assert_nothing_left(Duration::from_secs(60));
}
