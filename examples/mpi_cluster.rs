//! The tour of Julia's `juliacman.jl`, in Rust: this program stays outside MPI and starts 4
//! MPI ranks with `mpirun`; then MPI code runs on every rank with `mpido!`, mixed with
//! ordinary cluster calls.
//!
//! Run (no mpirun needed): `cargo run --release --example mpi_cluster`
//! As root, Open MPI also needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
//! (scripts/demo.sh sets them), and OMPI_MCA_rmaps_base_oversubscribe=1 with fewer cores.

use clusterman::mpi::{MpiManager, SystemOperation};
use clusterman::mpido;
use clusterman::prelude::*;

/// Heads (1) or tails (0) of coin flip `i`, from a fixed pseudo-random sequence.
#[remote]
fn flip(i: u64) -> u64 {
    (i.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) >> 63) & 1
}

/// Trace of a small matrix built from a seed: stand-in for Julia's `svd` pmap.
/// `+`, as a remote function: the reduction runs on the workers too.
#[remote]
fn add(a: u64, b: u64) -> u64 {
    a + b
}

#[remote]
fn trace_of(seed: u64) -> f64 {
    (0..10).map(|i| ((seed * 31 + i * 7) % 101) as f64 / 10.0).sum()
}

fn main() -> clusterman::Result<()> {
    clusterman::init();
    let cluster = Cluster::new()?;
    let mgr = MpiManager::new(4);
    cluster.add_procs(&mgr)?;
    println!("Added procs {:?}", std::iter::once(1).chain(cluster.workers()).collect::<Vec<_>>());

    println!("Running 01-hello as part of a clusterman cluster");
    mpido!(mgr, |comm| println!("Hello world, I am {} of {}", comm.rank(), comm.size()))?;

    println!("Running 02-broadcast as part of a clusterman cluster");
    mpido!(mgr, |comm| {
        let root = comm.process_at_rank(0);
        let rank = comm.rank();
        if rank == 0 {
            println!("{}", "-".repeat(78));
            println!(" Running on {} processes", comm.size());
            println!("{}", "-".repeat(78));
        }
        let mut a: Vec<f64> = if rank == 0 { (1..=5).map(|i| i as f64 * 1.5).collect() } else { vec![0.0; 5] };
        root.broadcast_into(&mut a[..]);
        // a map travels as bytes: its length first, then the encoded pairs
        let mut text = if rank == 0 { b"foo=bar".to_vec() } else { Vec::new() };
        let mut len = text.len() as u64;
        root.broadcast_into(&mut len);
        text.resize(len as usize, 0);
        root.broadcast_into(&mut text[..]);
        let map: std::collections::BTreeMap<String, String> = String::from_utf8_lossy(&text)
            .split(',')
            .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect();
        println!("[{rank:02}] A: {a:?}");
        println!("[{rank:02}] B: {map:?}");
    })?;

    let pis = cluster.pmap(trace_of, (0..10u64).map(|s| (s,)))?;
    assert_eq!(pis.len(), 10);
    println!("pmap successful");

    // Julia's `@distributed (+) for i in 1:n ... end`: each worker maps and folds its share
    let n = 100_000u64;
    let heads = cluster.map_reduce(flip, (0..n).map(|i| (i,)), add)?.unwrap_or(0);
    let here: u64 = (0..n).map(flip::call).sum(); // the same flips, here
    assert_eq!(heads, here);
    println!("parallel reduction: {heads} heads in {n} flips");

    println!("Running 03-reduce as part of a clusterman cluster");
    let sums: Vec<i32> = mpido!(mgr, |comm| {
        let mut sum = 0;
        comm.all_reduce_into(&comm.rank(), &mut sum, SystemOperation::sum());
        sum
    })?;
    println!("sum of ranks: {}", sums[0]);

    println!("clusterman pids {:?}", mgr.procs());
    println!("MPI ranks {:?}", mgr.mpi_procs());

    println!("Running 04-sendrecv as part of a clusterman cluster");
    mpido!(mgr, |comm| {
        let (rank, size) = (comm.rank(), comm.size());
        let (next, prev) = ((rank + 1) % size, (rank + size - 1) % size);
        let send = [rank as f64; 4];
        let mut recv = [0.0f64; 4];
        println!("{rank}: Sending   {rank} -> {next} = {send:?}");
        clusterman::mpi::rsmpi::point_to_point::send_receive_into_with_tags(
            &send[..],
            &comm.process_at_rank(next),
            rank + 32,
            &mut recv[..],
            &comm.process_at_rank(prev),
            prev + 32,
        );
        println!("{rank}: Receiving {prev} -> {rank} = {recv:?}");
    })?;

    println!("Exiting");
    mgr.shutdown()?;
    println!("mpirun exited with {:?}", mgr.launcher_status());
    Ok(())
}
