//! MPI: workers that are MPI ranks, and code that runs on every rank at once.
//!
//! Three modes, as in MPIClusterManagers.jl:
//! 1. **This program outside MPI** — [`MpiManager`]: `cluster.add_procs(&mgr)` starts
//!    `mpirun -np N <this program>`; the ranks dial in over TCP.
//! 2. **Every process a rank, messages over TCP** — [`start_main_loop`]`(`[`Transport::Tcp`]`)`
//!    under `mpirun`: rank 0 is the master.
//! 3. **Every process a rank, messages over MPI** — [`Transport::Mpi`], for clusters whose
//!    nodes have no TCP between them.
//!
//! In every mode, [`mpido!`](crate::mpido) runs a closure on every rank of a manager with
//! the rank's world communicator and returns the typed results in rank order; MPI
//! collectives inside it are fine, because frames keep moving while a rank is blocked in
//! one (on its own socket, or on the MPI progress thread).

mod env;
mod launcher;
mod main_loop;
mod manager;
mod transport;

pub use launcher::LauncherKind;
pub use main_loop::{MainLoop, Transport, start_main_loop};
pub(crate) use main_loop::{decode_untrusted, sample_messages};
pub use manager::MpiManager;
#[doc(hidden)]
pub use manager::{mpido_entry, mpido_run};

/// The communicator an `mpido!` body gets: the world of its ranks.
pub type Comm = ::mpi::topology::SimpleCommunicator;
/// rsmpi, re-exported: types and traits for code inside `mpido!`.
pub use ::mpi as rsmpi;
pub use ::mpi::Threading;
pub use ::mpi::collective::SystemOperation;
pub use ::mpi::traits;

pub(crate) use crate::protocol::env::ENV_MPI;

/// Worker side of mode 1: initialise MPI at `level` before dialling in, finalise at exit.
pub(crate) fn init_worker(level: &str) -> crate::error::Result<(i32, i32)> {
    let level = env::parse_threading(level).ok_or_else(|| crate::error::Error::Handshake(format!("unknown MPI threading level {level:?} in {ENV_MPI}")))?;
    let me = env::initialize(level)?;
    crate::cluster::worker::at_worker_exit(env::finalize);
    Ok((me.rank, me.size))
}

/// Runs a closure on every rank of an [`MpiManager`] and returns the typed results in rank
/// order: `Result<Vec<T>>`.
///
/// ```no_run
/// # use clusterman::mpi::{MpiManager, SystemOperation};
/// # fn f(mgr: &MpiManager) -> clusterman::Result<()> {
/// let ranks: Vec<i32> = clusterman::mpido!(mgr, |comm| comm.rank())?;
/// let sums: Vec<i32> = clusterman::mpido!(mgr, |comm| {
///     let mut sum = 0;
///     comm.all_reduce_into(&comm.rank(), &mut sum, SystemOperation::sum());
///     sum
/// })?;
/// let scale = 2.5f64;
/// let scaled: Vec<f64> = clusterman::mpido!(mgr, |comm, scale: f64| scale * comm.rank() as f64)?;
/// # Ok(()) }
/// ```
///
/// The body runs on each rank's MPI thread with `comm` bound to the world communicator
/// ([`Comm`]); rsmpi's traits are in scope. It cannot capture variables (it runs in other
/// processes): name them as extra parameters with their types, `|comm, x: f64, v: Vec<u8>|`,
/// and their values are sent along. If some ranks fail, the error
/// ([`Error::Ranks`](crate::Error::Ranks)) lists every failing rank with its message.
#[macro_export]
macro_rules! mpido {
    ($mgr:expr, |$comm:ident $(, $arg:ident : $ty:ty)* $(,)?| $body:expr) => {{
        #[$crate::__private::linkme::distributed_slice($crate::__private::REMOTE_FUNCTIONS)]
        #[linkme(crate = $crate::__private::linkme)]
        static MPIDO_BODY: $crate::__private::RemoteEntry = $crate::mpi::mpido_entry(
            ::core::concat!(::core::module_path!(), "::mpido!@", ::core::file!(), ":", ::core::line!(), ":", ::core::column!()),
            |$comm: &$crate::mpi::Comm, ($($arg,)*): ($($ty,)*)| {
                #[allow(unused_imports)]
                use $crate::mpi::traits::*;
                $body
            },
        );
        $crate::mpi::mpido_run(&$mgr, &MPIDO_BODY, &($(&$arg,)*), |$comm: &$crate::mpi::Comm, ($($arg,)*): ($($ty,)*)| {
            #[allow(unused_imports)]
            use $crate::mpi::traits::*;
            $body
        })
    }};
}
