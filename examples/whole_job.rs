//! A program that runs as one whole MPI job, submitted from the login node by itself: for
//! clusters whose compute nodes cannot reach the login node (or each other) over TCP.
//!
//! Run on a machine with Slurm or Grid Engine (here: `ci/slurm.sh start`, `ci/sge.sh start`):
//!     cargo run --release --example whole_job -- slurm mpi     # or: sge, and tcp
//! The local process shows the job while it queues, prints what rank 0 prints while the job
//! runs, and exits with the job's status; Ctrl-C (or `kill -9`) cancels the job.

use std::time::Duration;

use clusterman::launch::scheduler::{JobOptions, SgeManager, SlurmManager};
use clusterman::mpi::{Transport, start_main_loop};
use clusterman::mpido;
use clusterman::prelude::*;

#[remote]
fn square(x: u64) -> u64 {
    x * x
}

#[remote]
fn add(a: u64, b: u64) -> u64 {
    a + b
}

fn main() -> clusterman::Result<()> {
    clusterman::init();
    let args: Vec<String> = std::env::args().collect();
    let mut job = JobOptions::new().name("clusterman-whole").walltime(Duration::from_secs(600));
    // Grid Engine does not forward the environment: pass on Open MPI's settings
    for (key, value) in std::env::vars().filter(|(k, _)| k.starts_with("OMPI_")) {
        job = job.env(key, value);
    }
    // the login node submits and waits here; the ranks of the job go on
    match args.get(1).map(String::as_str) {
        Some("sge") => SgeManager::new(4).job(job).run_as_job()?,
        _ => SlurmManager::new(4).job(job).run_as_job()?,
    }
    let transport = if args.get(2).map(String::as_str) == Some("tcp") { Transport::Tcp } else { Transport::Mpi };
    let mgr = start_main_loop(transport)?; // only rank 0 returns: it is the master
    let ranks: Vec<String> = mpido!(mgr, |comm| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("rank {} of {} on {}", comm.rank(), comm.size(), host.trim())
    })?;
    for line in ranks {
        println!("{line}");
    }
    let cluster = mgr.cluster().expect("rank 0 owns the cluster");
    let sum = cluster.map_reduce(square, (1..=100u64).map(|x| (x,)), add)?;
    println!("sum of squares 1..=100 over {transport:?}: {}", sum.unwrap_or(0));
    mgr.shutdown()
}
