//! `kill -9` of the master leaves no worker behind: local children die with it
//! (PR_SET_PDEATHSIG), and any worker exits when its connection to the master is gone.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use clusterman::prelude::*;
use clusterman::{Launch, LaunchContext, LaunchStatus};

clusterman::init_in_constructor!();

/// Starts one worker as a plain child process: no death signal, so only the closed
/// connection can end it.
struct PlainChild;

struct Child(std::process::Child);

impl Launch for Child {
    fn status(&mut self) -> LaunchStatus {
        LaunchStatus::Running
    }
    fn stop(&mut self, _: Duration) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl ClusterManager for PlainChild {
    fn name(&self) -> &str {
        "plain"
    }
    fn count(&self) -> usize {
        1
    }
    fn launch(&self, ctx: &LaunchContext) -> clusterman::Result<Box<dyn Launch>> {
        let child = Command::new(ctx.program()).envs(ctx.env(0, &ctx.local_master_address())).spawn().unwrap();
        Ok(Box::new(Child(child)))
    }
}

/// The master process of the test below; runs only when asked to.
#[test]
#[ignore = "run by master_kill_leaves_no_worker"]
fn master_process() {
    if std::env::var("CMAN_TEST_MASTER").is_err() {
        return;
    }
    let cluster = Cluster::new().unwrap();
    let mut pids = cluster.add_procs(LocalManager::new(2)).unwrap();
    pids.extend(cluster.add_procs(PlainChild).unwrap());
    let os: Vec<String> = pids.iter().map(|p| cluster.worker_info(*p).unwrap().os_pid.to_string()).collect();
    println!("WORKERS {}", os.join(" "));
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn master_kill_leaves_no_worker() {
    let mut master = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "master_process", "--nocapture"])
        .env("CMAN_TEST_MASTER", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = master.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("WORKERS ") {
                let _ = tx.send(rest.split_whitespace().map(|p| p.parse::<u32>().unwrap()).collect::<Vec<_>>());
            }
        }
    });
    let workers = rx.recv_timeout(Duration::from_secs(30)).expect("the master process reports its workers");
    assert_eq!(workers.len(), 3);
    assert!(workers.iter().all(|p| common::process_alive(*p)));
    master.kill().unwrap(); // SIGKILL
    master.wait().unwrap();
    let gone = common::wait_until(Duration::from_secs(10), || workers.iter().all(|p| !common::process_alive(*p)));
    let alive: Vec<_> = workers.iter().filter(|p| common::process_alive(**p)).collect();
    assert!(gone, "workers still alive 10 s after the master was killed: {alive:?}");
}
