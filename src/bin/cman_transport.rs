//! Every process an MPI rank; rank 0 times remote identity calls on the others.
//!
//! `mpirun -np 5 target/release/cman_transport --tcp`   (messages over TCP)
//! `mpirun -np 5 target/release/cman_transport --mpi`   (messages over MPI)

use std::time::Instant;

use clusterman::mpi::{Transport, start_main_loop};
use clusterman::remote;

/// Sends the array back.
#[remote]
fn identity(values: Vec<f64>) -> Vec<f64> {
    values
}

fn main() {
    clusterman::init();
    let transport = match std::env::args().nth(1).as_deref() {
        Some("--tcp") => Transport::Tcp,
        Some("--mpi") => Transport::Mpi,
        _ => {
            eprintln!("usage: mpirun -np N cman_transport --tcp|--mpi   (--tcp: messages over TCP, --mpi: messages over MPI)");
            std::process::exit(1);
        }
    };
    if let Err(e) = run(transport) {
        eprintln!("cman_transport: {e}");
        std::process::exit(1);
    }
}

fn run(transport: Transport) -> clusterman::Result<()> {
    let mgr = start_main_loop(transport)?; // only rank 0 returns
    let cluster = mgr.cluster().expect("rank 0 owns the cluster");
    let target = *cluster.workers().first().ok_or_else(|| clusterman::Error::Launch("run with at least 2 ranks (mpirun -np 5)".into()))?;
    for n in [1_000usize, 1_000_000] {
        let values = vec![1.0f64; n];
        let started = Instant::now();
        for _ in 0..100 {
            let back = cluster.remote_call_fetch(target, identity, (values.clone(),))?;
            assert_eq!(back.len(), n);
        }
        println!("{:.6} seconds for 100 loops of send-recv of array size {n}", started.elapsed().as_secs_f64());
    }
    mgr.shutdown()
}
