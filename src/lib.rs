//! # clusterman
//!
//! Turn one Rust program into a cluster program: launch worker processes (locally, pinned
//! to CPUs, through `mpirun` and job schedulers, or let them join by themselves), then run
//! typed functions on them.
//!
//! ```no_run
//! use clusterman::prelude::*;
//!
//! #[remote]
//! fn simulate(seed: u64, steps: u32) -> f64 {
//!     (seed as f64) * (steps as f64)
//! }
//!
//! fn main() -> clusterman::Result<()> {
//!     clusterman::init(); // in a worker process this serves calls and never returns
//!     let cluster = Cluster::new()?;
//!     let pids = cluster.add_procs(LocalManager::new(4))?;
//!     let x: f64 = cluster.remote_call(pids[0], simulate, (7, 1000))?.fetch()?;
//!     let all: Vec<f64> = cluster.pmap(simulate, (0..10_000).map(|s| (s, 1000)))?;
//!     cluster.shutdown()?; // also on drop
//!     # let _ = (x, all);
//!     Ok(())
//! }
//! ```
//!
//! ## How it works
//!
//! Every worker is a copy of the master's own binary. Whatever starts it only has to set
//! three environment variables ([`LaunchContext::env`]); the worker then *dials in* to the
//! master's single listener, proves a 128-bit secret (never on a command line), and states
//! its protocol version and build fingerprint (the remote-function table and the binary's
//! build id): a worker built from another binary is refused with both fingerprints named.
//!
//! `#[remote]` registers a function in a link-time table under its module path; calls name
//! it by a hash of that path. Arguments and results are checked at compile time
//! ([`RemoteFn`]) and travel in a compact binary encoding in length-prefixed frames whose size is checked
//! before anything is allocated.
//!
//! Calls run on the worker's serving thread, straight from the socket; on the master, one
//! I/O runtime reads every worker connection, driven by the thread that waits for a reply (or
//! by its own thread while nobody waits), so a no-op round trip costs two socket writes and
//! wakes only the caller there, and the master's threads do not grow with its workers. Worker-to-worker calls go through
//! the master (one connection per worker, which also works where workers cannot reach each
//! other). A worker's stdout and stderr are forwarded line by line (`From worker 3: ...`).
//!
//! Nothing trusts the network or the peers: the secret is checked before anything else a
//! connection sent is decoded, every length is checked against the bytes present, sends never
//! wait on a peer, and both sides exchange heartbeats, so a worker that stops answering is
//! declared dead ([`ClusterBuilder::heartbeat`]) and a worker whose master is gone exits.
//!
//! The layers, bottom up; each imports only from those below it:
//! - `ids`, `sys`, `error`, `buffers`: the pid type, the OS calls, the errors, big buffers
//!   kept for reuse;
//! - `codec`, `protocol`, `registry`: bytes, frames, the handshake, the environment a worker
//!   is started with, the remote-function table (no I/O);
//! - `transport`: the I/O runtime, the master's connections read through one epoll set on
//!   it, TCP connections whose senders never wait, the listener;
//! - `cluster`: the process table, calls and futures, `pmap`, heartbeats, the worker's
//!   serving loop, and the traits a launcher implements ([`ClusterManager`], [`Launch`]);
//! - [`launch`]: the launchers (local, pinned, elastic, every scheduler) and a program that
//!   submits itself as one whole job (`BatchManager::run_as_job`);
//! - [`mpi`]: MPI ranks as workers, `mpido!`, the all-rank modes;
//! - this file: the public face, and [`init`], which wires MPI into the worker start.
//!
//! ## Tests and other programs without your own `main`
//!
//! A `cargo test` binary's `main` belongs to the test harness; put
//! [`init_in_constructor!()`](init_in_constructor) at the top level of the test file so
//! the binary can serve as its own workers.

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate self as clusterman;

mod buffers;
mod cluster;
mod codec;
mod error;
mod fingerprint;
#[doc(hidden)]
pub mod fuzzing;
mod ids;
pub mod launch;
#[cfg(feature = "mpi")]
pub mod mpi;
mod protocol;
mod registry;
mod sys;
mod transport;

pub use clusterman_macros::remote;
pub use cluster::worker::my_id;
pub use codec::bulk;
pub use protocol::env::{ENV_LAUNCH, ENV_MASTER, ENV_MPI, ENV_SECRET, ENV_SECRET_FILE};
pub use cluster::{Cluster, ClusterBuilder, OutputSink, PmapOptions, RemoteFuture, Topology, WorkerInfo, print_sink};
pub use cluster::pmap::exponential_backoff;
pub use error::{Error, RemoteError, Result};
pub use launch::topology::{AffinityMode, CpuTopology};
pub use launch::{ClusterManager, Launch, LaunchContext, LaunchStatus, LocalAffinityManager, LocalManager, MpiRanks, RankMap};
pub use registry::RemoteFn;

pub use ids::Pid;

/// The names most programs need: `use clusterman::prelude::*;`.
pub mod prelude {
    pub use crate::{AffinityMode, Cluster, ClusterManager, LocalAffinityManager, LocalManager, Pid, PmapOptions, RemoteFn, RemoteFuture, my_id, remote};
}

/// Items used by the code `#[remote]` generates. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::registry::{REMOTE_FUNCTIONS, RemoteEntry, entry};
    #[cfg(feature = "mpi")]
    pub use crate::mpi::{mpido_entry, mpido_run};
    pub use linkme;

    /// Test hook: writes raw bytes into a worker's connection to the master, to check how
    /// the master handles a misbehaving peer. Returns false outside a worker.
    pub fn send_raw_to_master(bytes: &[u8]) -> bool {
        crate::cluster::worker::send_raw(bytes)
    }

    /// Test hook: the cluster secret, for tests that prove nobody else can find it.
    pub fn secret_hex(cluster: &crate::Cluster) -> Option<String> {
        Some(cluster.inner().master.as_ref()?.secret.to_hex())
    }

    /// Test hook: where worker `pid` listens for direct links (all-to-all topology).
    pub fn peer_listener(cluster: &crate::Cluster, pid: crate::Pid) -> Option<String> {
        cluster.inner().master.as_ref()?.peer_addresses.lock().expect("peer addresses lock").get(&pid).cloned()
    }
}

/// Call first in `main`. In a process started as a worker, it connects to the master and
/// serves until shut down, then exits the process: it never returns. Elsewhere it returns
/// at once.
///
/// Called first thing, it also removes the worker's variables from the environment (and the
/// secret from the process's initial environment block); called after other threads have
/// started (under `#[tokio::main]`, say), it leaves the environment alone, because changing
/// it then would be unsound.
pub fn init() {
    #[cfg(feature = "mpi")]
    let mpi: Option<cluster::worker::MpiInit> = Some(mpi::init_worker);
    #[cfg(not(feature = "mpi"))]
    let mpi = None;
    cluster::worker::init_with(mpi);
}

/// Runs [`init`] before `main`, from the executable's constructor list, for binaries whose
/// `main` is not yours (test harnesses). Put it once at the top level of the binary's crate.
///
/// ```ignore
/// clusterman::init_in_constructor!();
/// ```
#[macro_export]
macro_rules! init_in_constructor {
    () => {
        #[used]
        #[unsafe(link_section = ".init_array")]
        static __CLUSTERMAN_INIT: extern "C" fn() = {
            extern "C" fn __clusterman_init() {
                $crate::init()
            }
            __clusterman_init
        };
    };
}
