//! Workers from a Slurm job: submitted with sbatch, shown while queued, cancelled at the end.
//!
//! Run on a machine with Slurm (here: `ci/slurm.sh start` gives a one-node Slurm):
//!     cargo run --release --example slurm
//! Inside an allocation (`salloc -n 4`, or an sbatch script) the same program starts its
//! workers as a job step with srun instead of submitting a job.

use std::time::Duration;

use clusterman::launch::detect_allocation;
use clusterman::launch::scheduler::{JobOptions, SlurmManager};
use clusterman::mpido;
use clusterman::prelude::*;

#[remote]
fn where_am_i() -> (Pid, String) {
    (my_id(), std::env::var("SLURM_JOB_ID").unwrap_or_default())
}

fn main() -> clusterman::Result<()> {
    clusterman::init();
    let cluster = Cluster::new()?;
    let slurm = match detect_allocation() {
        Some(a) if a.scheduler == "slurm" => {
            println!("inside Slurm job {} with {:?} tasks: starting a job step", a.job_id, a.slots);
            SlurmManager::in_allocation()?
        }
        _ => SlurmManager::new(4)
            .job(JobOptions::new().name("clusterman-example").walltime(Duration::from_secs(600)).queue_timeout(Duration::from_secs(300)))
            .option("mem_per_cpu", 100), // srun --mem-per-cpu=100, ClusterManagers.jl style
    };
    println!("job script:\n{}", slurm.job_script()?);
    let pids = cluster.add_procs(&slurm)?;
    for pid in &pids {
        let (p, job) = cluster.remote_call_fetch(*pid, where_am_i, ())?;
        println!("worker {p} runs in Slurm job {job}");
    }
    let ranks: Vec<i32> = mpido!(slurm, |comm| comm.rank())?;
    println!("MPI ranks of the job: {ranks:?}");
    cluster.shutdown()?; // the job ends (or is cancelled): nothing stays in the queue
    Ok(())
}
