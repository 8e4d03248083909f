//! Workers from Grid Engine: an array job of independent workers, then a parallel-environment
//! job whose ranks form one MPI world, then qrsh workers.
//!
//! Run on a machine with Grid Engine (here: `ci/sge.sh start`, then
//! `. /var/lib/gridengine/default/common/settings.sh`):
//!     cargo run --release --example sge
//! As root, the PE job's mpirun needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
//! (passed to the job below).

use clusterman::launch::scheduler::{JobOptions, Layout, QrshManager, SgeManager};
use clusterman::mpido;
use clusterman::prelude::*;

#[remote]
fn task() -> (Pid, String) {
    (my_id(), std::env::var("SGE_TASK_ID").unwrap_or_else(|_| "-".into()))
}

fn main() -> clusterman::Result<()> {
    clusterman::init();
    let cluster = Cluster::new()?;

    let array = SgeManager::new(3).job(JobOptions::new().name("cman-array").layout(Layout::Array));
    for pid in cluster.add_procs(&array)? {
        let (p, t) = cluster.remote_call_fetch(pid, task, ())?;
        println!("worker {p} is array task {t}");
    }

    let root_ok = JobOptions::new().name("cman-pe").env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    let pe = SgeManager::new(2).pe("mpi").job(root_ok);
    println!("PE job script:\n{}", pe.job_script()?);
    cluster.add_procs(&pe)?;
    let world: Vec<(i32, i32)> = mpido!(pe, |comm| (comm.rank(), comm.size()))?;
    println!("the PE job's MPI world: {world:?}");

    let qrsh = cluster.add_procs(QrshManager::new(2))?;
    println!("qrsh workers: {qrsh:?}");
    cluster.shutdown()?; // qdel, qrsh ended: qstat shows nothing of ours
    Ok(())
}
