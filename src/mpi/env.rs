//! This process's MPI environment: initialised once, on the main thread, at the threading
//! level asked for; finalised once, on the same thread, when the process is done with MPI.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ::mpi::Threading;
use ::mpi::environment::Universe;
use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::Communicator;

use crate::error::{Error, Result};

/// `Some` between our `MPI_Init_thread` and `MPI_Finalize`.
static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);

/// What MPI granted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MpiIdentity {
    pub rank: i32,
    pub size: i32,
    pub threading: Threading,
}

/// Initialises MPI (unless it already is: then the program that did it also finalises it).
pub(crate) fn initialize(requested: Threading) -> Result<MpiIdentity> {
    let mut slot = UNIVERSE.lock().expect("universe lock");
    let threading = if ::mpi::environment::is_initialized() {
        ::mpi::environment::threading_support()
    } else {
        let (universe, granted) = ::mpi::initialize_with_threading(requested)
            .ok_or_else(|| Error::Unsupported("MPI could not be initialised (was it finalised already?)".into()))?;
        *slot = Some(universe);
        granted
    };
    let world = SimpleCommunicator::world();
    Ok(MpiIdentity { rank: world.rank(), size: world.size(), threading })
}

/// The world communicator, for code that runs on a rank (`mpido!` bodies).
pub(crate) fn world() -> Result<SimpleCommunicator> {
    if !::mpi::environment::is_initialized() || ::mpi::environment::is_finalized() {
        return Err(Error::Unsupported(
            "MPI is not initialised in this process: mpido! runs on workers started by an MpiManager or start_main_loop".into(),
        ));
    }
    Ok(SimpleCommunicator::world())
}

/// How long `MPI_Finalize` may take before the process leaves without it.
const FINALIZE_GRACE: Duration = Duration::from_secs(10);

/// `MPI_Finalize`, if we initialised MPI. Call on the thread that initialised it. Some MPI
/// builds hang in it now and then (MPICH over UCX's TCP transport across nodes, UCX 1.13,
/// openucx/ucx#8738): after [`FINALIZE_GRACE`] the process exits without it, so a finished
/// job's ranks never stay behind.
pub(crate) fn finalize() {
    let Some(universe) = UNIVERSE.lock().expect("universe lock").take() else { return };
    static RETURNED: AtomicBool = AtomicBool::new(false);
    std::thread::spawn(|| {
        std::thread::sleep(FINALIZE_GRACE);
        if !RETURNED.load(Ordering::SeqCst) {
            eprintln!("clusterman: MPI_Finalize did not return within {} s (a known hang of some MPI builds); exiting without it", FINALIZE_GRACE.as_secs());
            // SAFETY: _exit ends the process at once; nothing of ours runs after it
            unsafe { libc::_exit(0) };
        }
    });
    drop(universe);
    RETURNED.store(true, Ordering::SeqCst);
}

/// Parses a threading level name (`single`, `funneled`, `serialized`, `multiple`).
pub(crate) fn parse_threading(s: &str) -> Option<Threading> {
    Some(match s {
        "single" => Threading::Single,
        "funneled" => Threading::Funneled,
        "serialized" => Threading::Serialized,
        "multiple" => Threading::Multiple,
        _ => return None,
    })
}

/// The name [`parse_threading`] reads.
pub(crate) fn threading_name(t: Threading) -> &'static str {
    match t {
        Threading::Single => "single",
        Threading::Funneled => "funneled",
        Threading::Serialized => "serialized",
        Threading::Multiple => "multiple",
    }
}
