//! Workers that join by themselves: this prints a command; run it (from another shell on
//! this or another machine) once or several times, and each run adds a worker.
//!
//! Run:  cargo run --release --example elastic
//! then, in another shell, paste the printed command. The example waits (up to 10 minutes)
//! for 2 workers, uses them, and exits; or pass a number: `... --example elastic -- 1`.

use std::time::Duration;

use clusterman::launch::{ElasticAddress, ElasticManager};
use clusterman::prelude::*;

#[remote]
fn hello(from: String) -> String {
    format!("worker {} (os pid {}) says hello to {from}", my_id(), std::process::id())
}

fn main() -> clusterman::Result<()> {
    clusterman::init();
    let wanted: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(2);
    let cluster = Cluster::new()?;
    let elastic = ElasticManager::start(&cluster, ElasticAddress::Auto, 0)?;
    elastic.on_join(|pid| println!("worker {pid} joined"));
    elastic.on_leave(|pid| println!("worker {pid} left"));
    println!("{elastic}\n\nwaiting for {wanted} worker(s)...");
    let pids = elastic.wait_for(wanted, Duration::from_secs(600))?;
    for pid in pids {
        println!("{}", cluster.remote_call_fetch(pid, hello, ("the master".to_string(),))?);
    }
    println!("{elastic}");
    cluster.shutdown()
}
