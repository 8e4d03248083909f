//! Workers that join by running the printed command: through an ElasticManager, from this
//! host or from another network namespace (a veth pair with private addresses), and a wrong
//! secret; and a given number of them as a launch (ElasticWorkers).

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clusterman::launch::{CommandStyle, ElasticAddress, ElasticManager, ElasticWorkers};
use clusterman::prelude::*;

clusterman::init_in_constructor!();

#[remote]
fn host_and_pid() -> (String, u32) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
    (host, std::process::id())
}

/// Runs the printed command exactly as a user would paste it (bash then becomes the worker).
fn start_worker(command: &str) -> std::process::Child {
    Command::new("bash").args(["-c", command]).stdout(Stdio::null()).spawn().unwrap()
}

#[test]
fn a_worker_started_with_the_printed_command_joins_and_leaves() {
    let cluster = Cluster::new().unwrap();
    let elastic = ElasticManager::start(&cluster, ElasticAddress::Ip("127.0.0.1".parse().unwrap()), 0).unwrap();
    let joined: Arc<Mutex<Vec<Pid>>> = Arc::default();
    let left: Arc<Mutex<Vec<Pid>>> = Arc::default();
    let (j, l) = (joined.clone(), left.clone());
    elastic.on_join(move |pid| j.lock().unwrap().push(pid));
    elastic.on_leave(move |pid| l.lock().unwrap().push(pid));
    let command = elastic.connect_command();
    assert!(command.contains(&std::env::current_exe().unwrap().display().to_string()), "absolute program path: {command}");
    let mut a = start_worker(&command);
    let mut b = start_worker(&command);
    let pids = elastic.wait_for(2, Duration::from_secs(30)).unwrap();
    assert_eq!(cluster.workers(), pids);
    let mut seen = joined.lock().unwrap().clone();
    seen.sort_unstable(); // two workers joining at once may be announced in either order
    assert_eq!(seen, pids);
    let (_, os) = cluster.remote_call_fetch(pids[0], host_and_pid, ()).unwrap();
    assert!(os == a.id() || os == b.id());
    let shown = elastic.to_string();
    assert!(shown.contains(&format!("Active workers : [{}, {}]", pids[0], pids[1])) && shown.contains("Worker connect command"), "{shown}");
    // a worker that leaves: its pending call fails, it is listed as terminated
    let victim = if os == a.id() { &mut a } else { &mut b };
    let pending = cluster.remote_call(pids[0], host_and_pid, ()).unwrap();
    victim.kill().unwrap();
    victim.wait().unwrap();
    let _ = pending.fetch(); // answered before the kill, or failed with WorkerDied: never hangs
    assert!(common::wait_until(Duration::from_secs(10), || elastic.terminated() == vec![pids[0]]), "{elastic}");
    assert_eq!(*left.lock().unwrap(), vec![pids[0]]);
    assert!(elastic.to_string().contains(&format!("Terminated workers : [{}]", pids[0])));
    assert_eq!(elastic.active(), vec![pids[1]]);
    cluster.shutdown().unwrap();
    let _ = a.wait();
    let _ = b.wait();
}

#[test]
fn a_cookie_of_the_users_choosing_lets_workers_join_with_no_secret_file() {
    let err = Cluster::builder().cookie("short").build().unwrap_err().to_string();
    assert!(err.contains("8 to 16 printable ASCII characters"), "{err}");
    let cluster = Cluster::builder().cookie("our-own-cookie").build().unwrap();
    let elastic = ElasticManager::start(&cluster, ElasticAddress::Ip("127.0.0.1".parse().unwrap()), 0).unwrap();
    assert!(!elastic.to_string().contains("our-own-cookie") && !elastic.connect_command().contains("our-own-cookie"), "{elastic}");
    let worker = |cookie: &str| {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.env("CLUSTERMAN_MASTER", elastic.address().to_string()).env("CLUSTERMAN_SECRET", cookie);
        c
    };
    let refused = worker("not-our-cookie").output().unwrap();
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("wrong secret"), "{}", String::from_utf8_lossy(&refused.stderr));
    // the address and the cookie are all a worker needs (say, on a machine without our home)
    let mut joined = worker("our-own-cookie").stdout(Stdio::null()).spawn().unwrap();
    let pids = elastic.wait_for(1, Duration::from_secs(30)).unwrap();
    assert_eq!(cluster.remote_call_fetch(pids[0], host_and_pid, ()).unwrap().1, joined.id());
    cluster.shutdown().unwrap();
    let _ = joined.wait();
}

#[test]
fn a_wrong_secret_is_refused_and_the_manager_keeps_serving() {
    let cluster = Cluster::new().unwrap();
    let elastic = ElasticManager::start(&cluster, ElasticAddress::Ip("127.0.0.1".parse().unwrap()), 0).unwrap();
    let command = elastic.connect_command();
    assert!(!command.contains("CLUSTERMAN_SECRET="), "the command names a file, not the secret: {command}");
    let wrong = format!("CLUSTERMAN_SECRET={} {command}", "0".repeat(32));
    let out = Command::new("bash").args(["-c", &wrong]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong secret"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(cluster.refusals().iter().any(|r| r.contains("wrong secret")));
    let mut good = start_worker(&command);
    let pids = elastic.wait_for(1, Duration::from_secs(30)).unwrap();
    assert_eq!(cluster.remote_call_fetch(pids[0], host_and_pid, ()).unwrap().1, good.id());
    cluster.shutdown().unwrap();
    let _ = good.wait();
}

#[test]
fn a_worker_in_another_network_namespace_joins_through_the_auto_address() {
    let ns = match common::Netns::create(std::process::id() % 1000) {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("skipped: cannot create a network namespace: {why}");
            return;
        }
    };
    let cluster = Cluster::new().unwrap();
    let elastic = ElasticManager::start(&cluster, ElasticAddress::Auto, 0).unwrap();
    assert!(!elastic.address().ip().is_loopback(), "auto picks a reachable address: {}", elastic.address());
    let command = format!("ip netns exec {} env {}", ns.name, elastic.connect_command());
    let mut worker = start_worker(&command);
    let pids = elastic.wait_for(1, Duration::from_secs(30)).unwrap();
    let (_, os) = cluster.remote_call_fetch(pids[0], host_and_pid, ()).unwrap();
    assert_eq!(os, worker.id(), "the worker in the namespace answers");
    cluster.shutdown().unwrap();
    let _ = worker.wait();
}

#[test]
fn workers_join_only_while_a_manager_is_open_and_through_the_one_listener() {
    let cluster = Cluster::new().unwrap();
    let mut elastic = ElasticManager::start(&cluster, ElasticAddress::Ip("127.0.0.1".parse().unwrap()), 0).unwrap();
    assert_eq!(elastic.address().port(), cluster.listen_addr().unwrap().port(), "the master has one listener");
    let command = elastic.connect_command();
    let mut first = start_worker(&command);
    let pids = elastic.wait_for(1, Duration::from_secs(30)).unwrap();
    elastic.stop();
    let late = Command::new("bash").args(["-c", &command]).output().unwrap();
    assert!(!late.status.success(), "a worker that dials after stop() is turned away");
    let told = String::from_utf8_lossy(&late.stderr);
    assert!(told.contains("start an ElasticManager"), "the refusal names the fix: {told}");
    assert_eq!(cluster.workers(), pids, "the worker that joined stays");
    assert_eq!(cluster.remote_call_fetch(pids[0], host_and_pid, ()).unwrap().1, first.id());
    cluster.shutdown().unwrap();
    let _ = first.wait();
}

#[test]
fn an_address_or_port_the_master_does_not_listen_on_is_an_error_that_names_the_fix() {
    let loopback = Cluster::builder().bind("127.0.0.1:0".parse().unwrap()).build().unwrap();
    let other_port = loopback.listen_addr().unwrap().port().wrapping_add(1).max(1);
    let err = ElasticManager::start(&loopback, ElasticAddress::Ip("127.0.0.1".parse().unwrap()), other_port).unwrap_err().to_string();
    assert!(err.contains("pass port 0") && err.contains("ClusterBuilder::bind"), "{err}");
    if let Ok(elsewhere) = ElasticManager::start(&loopback, ElasticAddress::Auto, 0) {
        panic!("a master bound to loopback cannot be joined from {}", elsewhere.address());
    }
    let err = ElasticManager::start(&loopback, ElasticAddress::Ip("192.0.2.1".parse().unwrap()), 0).unwrap_err().to_string();
    assert!(err.contains("listens on 127.0.0.1") && err.contains("ClusterBuilder::bind"), "{err}");
    let everywhere = Cluster::new().unwrap();
    let err = ElasticManager::start(&everywhere, ElasticAddress::Ip("192.0.2.1".parse().unwrap()), 0).unwrap_err().to_string();
    assert!(err.contains("192.0.2.1 is not an address of this host"), "{err}");
}

/// What the last `ElasticWorkers` launch printed.
static ANNOUNCED: Mutex<String> = Mutex::new(String::new());

#[test]
fn add_procs_prints_the_command_and_returns_when_that_many_have_joined() {
    let cluster = Cluster::new().unwrap();
    // a user who reads the printed line and runs the command twice
    let user = std::thread::spawn(|| {
        assert!(common::wait_until(Duration::from_secs(30), || !ANNOUNCED.lock().unwrap().is_empty()), "the command is printed");
        let line = ANNOUNCED.lock().unwrap().clone();
        let command = line.split_once("each with: ").expect("the line names the command").1.to_string();
        ((0..2).map(|_| start_worker(&command)).collect::<Vec<_>>(), line, command)
    });
    let pids = cluster.add_procs(ElasticWorkers::new(2).announce(|line| *ANNOUNCED.lock().unwrap() = line.to_string())).unwrap();
    let (mut workers, line, command) = user.join().unwrap();
    assert!(line.starts_with("clusterman: start 2 workers, each with: "), "{line}");
    assert!(command.contains("CLUSTERMAN_SECRET_FILE=") && !command.contains("CLUSTERMAN_SECRET="), "a file, never the secret: {command}");
    assert_eq!(pids.len(), 2);
    let mut served: Vec<u32> = pids.iter().map(|&p| cluster.remote_call_fetch(p, host_and_pid, ()).unwrap().1).collect();
    let mut started: Vec<u32> = workers.iter().map(std::process::Child::id).collect();
    served.sort();
    started.sort();
    assert_eq!(served, started, "the two processes the user started are the workers");
    // the launch is complete: one more is turned away, saying why
    let late = Command::new("bash").args(["-c", &command]).output().unwrap();
    assert!(!late.status.success());
    assert!(String::from_utf8_lossy(&late.stderr).contains("is waiting for workers"), "{}", String::from_utf8_lossy(&late.stderr));
    cluster.shutdown().unwrap();
    for w in &mut workers {
        let _ = w.wait();
    }
}

#[test]
fn a_launch_nobody_starts_workers_for_times_out_showing_the_command() {
    let cluster = Cluster::new().unwrap();
    let err = cluster.add_procs(ElasticWorkers::new(1).launch_timeout(Duration::from_millis(500)).announce(|_| {})).unwrap_err().to_string();
    assert!(err.contains("start each worker with: CLUSTERMAN_MASTER="), "{err}");
    assert!(cluster.workers().is_empty());
}

#[test]
fn the_command_can_name_the_program_by_its_file_name_and_source_its_environment() {
    use std::os::unix::fs::PermissionsExt;
    let cluster = Cluster::new().unwrap();
    let mut elastic = ElasticManager::start(&cluster, ElasticAddress::Ip("127.0.0.1".parse().unwrap()), 0).unwrap();
    elastic.command_style(CommandStyle { absolute_program: false, env_file: true }).unwrap();
    let command = elastic.connect_command();
    let exe = std::env::current_exe().unwrap();
    let name = exe.file_name().unwrap().to_string_lossy().into_owned();
    assert!(command.starts_with(". ") && command.ends_with(&name) && !command.contains(&exe.display().to_string()), "{command}");
    let env_file = command[2..].split(" && ").next().unwrap().trim_matches('\'').to_string();
    let text = std::fs::read_to_string(&env_file).unwrap();
    assert!(text.contains("export CLUSTERMAN_MASTER=") && text.contains("export CLUSTERMAN_SECRET_FILE="), "{text}");
    assert!(!text.contains(&clusterman::__private::secret_hex(&cluster).unwrap()), "the file to source holds no secret");
    assert_eq!(std::fs::metadata(&env_file).unwrap().permissions().mode() & 0o777, 0o600);
    // a machine where the program is found on the PATH
    let path = format!("{}:{}", exe.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let mut worker = Command::new("bash").args(["-c", &command]).env("PATH", path).stdout(Stdio::null()).spawn().unwrap();
    let pids = elastic.wait_for(1, Duration::from_secs(30)).unwrap();
    assert_eq!(cluster.remote_call_fetch(pids[0], host_and_pid, ()).unwrap().0, std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim());
    cluster.shutdown().unwrap();
    let _ = worker.wait();
    drop(elastic);
    assert!(!std::path::Path::new(&env_file).exists(), "removed with the manager");
}
