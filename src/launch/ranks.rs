//! The ranks of one MPI world inside a cluster: pid ↔ rank in both directions, and a handle on
//! the cluster. Any manager whose workers form an MPI world carries one (`mpido!` needs it).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::ids::Pid;
use crate::cluster::{Cluster, WorkerInfo};
use crate::error::{Error, Result};

/// pid ↔ rank maps of one MPI world; clones share them.
#[derive(Debug, Clone, Default)]
pub struct RankMap(Arc<Mutex<Ranks>>);

#[derive(Debug, Default)]
struct Ranks {
    cluster: Option<Cluster>,
    pid_to_rank: BTreeMap<Pid, i32>,
    rank_to_pid: BTreeMap<i32, Pid>,
}

/// A manager whose workers are the ranks of one MPI world: `mpido!` runs on them.
pub trait MpiRanks {
    /// The world's rank map (filled in when the workers have connected).
    fn ranks(&self) -> &RankMap;
}

impl<T: MpiRanks + ?Sized> MpiRanks for &T {
    fn ranks(&self) -> &RankMap {
        (**self).ranks()
    }
}

impl RankMap {
    fn lock(&self) -> MutexGuard<'_, Ranks> {
        self.0.lock().expect("rank map lock")
    }

    /// The MPI rank of cluster process `pid`, if it is in this world.
    pub fn pid_to_rank(&self, pid: Pid) -> Option<i32> {
        self.lock().pid_to_rank.get(&pid).copied()
    }

    /// The cluster pid of MPI rank `rank`.
    pub fn rank_to_pid(&self, rank: i32) -> Option<Pid> {
        self.lock().rank_to_pid.get(&rank).copied()
    }

    /// The pids of this world, ascending (which is rank order).
    pub fn procs(&self) -> Vec<Pid> {
        self.lock().pid_to_rank.keys().copied().collect()
    }

    /// The ranks of this world, ascending.
    pub fn mpi_procs(&self) -> Vec<i32> {
        self.lock().rank_to_pid.keys().copied().collect()
    }

    /// A handle on the cluster this world belongs to (once its ranks have connected).
    pub fn cluster(&self) -> Option<Cluster> {
        self.lock().cluster.as_ref().map(Cluster::clone_handle)
    }

    /// `(rank, pid)` pairs in rank order, with the cluster.
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub(crate) fn entries(&self) -> Option<(Cluster, Vec<(i32, Pid)>)> {
        let r = self.lock();
        Some((r.cluster.as_ref()?.clone_handle(), r.rank_to_pid.iter().map(|(r, p)| (*r, *p)).collect()))
    }

    /// Records the ranks of workers that just connected; every one must report a world of
    /// `size` (a launcher of another MPI starts single-rank copies instead).
    pub(crate) fn record(&self, cluster: &Cluster, workers: &[WorkerInfo], size: usize) -> Result<()> {
        let mut r = self.lock();
        for w in workers {
            let (rank, reported) = w.mpi.ok_or_else(|| Error::Launch(format!("worker {} did not report an MPI rank", w.pid)))?;
            if reported as usize != size {
                return Err(Error::Launch(format!(
                    "rank {rank} reports a world of {reported} processes, not {size}: the launcher and the MPI this program was built with do not match (e.g. MPICH's mpiexec running an Open MPI build starts single-rank copies)"
                )));
            }
            r.pid_to_rank.insert(w.pid, rank);
            r.rank_to_pid.insert(rank, w.pid);
        }
        r.cluster = Some(cluster.clone_handle());
        Ok(())
    }

    /// Sets the whole map at once and keeps `cluster` (the all-rank modes own theirs here).
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub(crate) fn set(&self, cluster: Cluster, ranks: impl IntoIterator<Item = (i32, Pid)>) {
        let mut r = self.lock();
        for (rank, pid) in ranks {
            r.pid_to_rank.insert(pid, rank);
            r.rank_to_pid.insert(rank, pid);
        }
        r.cluster = Some(cluster);
    }

    /// Forgets the cluster (dropping it shuts it down if this map owned it).
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub(crate) fn take_cluster(&self) -> Option<Cluster> {
        self.lock().cluster.take()
    }
}
