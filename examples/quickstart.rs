//! The flagship tour: local workers, typed remote calls, `everywhere`, a 10,000-item `pmap`.
//!
//! Run: `cargo run --release --example quickstart`

use std::time::Instant;

use clusterman::prelude::*;

/// A small Monte Carlo estimate of pi from a seed: real work, deterministic per seed.
#[remote]
fn estimate_pi(seed: u64, samples: u32) -> f64 {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let inside = (0..samples).filter(|_| {
        let (x, y) = (next(), next());
        x * x + y * y <= 1.0
    });
    4.0 * inside.count() as f64 / samples as f64
}

/// Where am I? Runs on every worker.
#[remote]
fn whoami() -> (Pid, u32, String) {
    println!("hello from pid {} (os pid {})", my_id(), std::process::id());
    (my_id(), std::process::id(), std::env::consts::OS.to_string())
}

/// A function that fails: the error comes back typed, with the worker's pid.
#[remote]
fn checked_sqrt(x: f64) -> Result<f64, String> {
    if x < 0.0 { Err(format!("cannot take the square root of {x}")) } else { Ok(x.sqrt()) }
}

/// A worker calling another worker (routed through the master).
#[remote]
fn ask_neighbour(neighbour: Pid, x: f64) -> clusterman::Result<f64> {
    let cluster = Cluster::current().expect("inside a remote function");
    cluster.remote_call_fetch(neighbour, checked_sqrt, (x,))
}

fn main() -> clusterman::Result<()> {
    clusterman::init();
    let cluster = Cluster::new()?;

    let t = Instant::now();
    let pids = cluster.add_procs(LocalManager::new(4))?;
    println!("started workers {pids:?} in {:.1} ms", ms(t));

    let t = Instant::now();
    let pi = cluster.remote_call(pids[0], estimate_pi, (7, 1_000_000))?.fetch()?;
    println!("pi ≈ {pi:.5} from worker {} in {:.1} ms", pids[0], ms(t));

    let t = Instant::now();
    let n = 1000;
    for _ in 0..n {
        cluster.remote_call_fetch(pids[1], checked_sqrt, (4.0,))?;
    }
    println!("{n} round trips of a small call: {:.1} µs each", ms(t) * 1e3 / n as f64);

    match cluster.remote_call_fetch(pids[2], checked_sqrt, (-1.0,)) {
        Err(e) => println!("an Err comes back as an error: {e}"),
        Ok(v) => println!("unexpected: {v}"),
    }
    let routed = cluster.remote_call_fetch(pids[0], ask_neighbour, (pids[3], 2.0))?;
    println!("worker {} asked worker {} for sqrt(2) = {routed:.6}", pids[0], pids[3]);

    let everyone = cluster.everywhere(whoami, ())?;
    for (pid, (reported, os_pid, os)) in &everyone {
        println!("pid {pid}: reports pid {reported}, os pid {os_pid} on {os}");
    }

    let t = Instant::now();
    let estimates = cluster.pmap(estimate_pi, (0..10_000).map(|seed| (seed, 10_000)))?;
    let mean = estimates.iter().sum::<f64>() / estimates.len() as f64;
    println!("pmap over {} items: mean pi ≈ {mean:.5} in {:.1} ms", estimates.len(), ms(t));

    let t = Instant::now();
    cluster.shutdown()?;
    println!("shut down in {:.1} ms", ms(t));
    Ok(())
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
