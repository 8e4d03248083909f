//! Local workers pinned to CPUs.

use std::time::Duration;

use crate::error::{Error, Result};

use super::topology::{AffinityMode, CpuTopology, place};
use super::{ClusterManager, Launch, LaunchContext, LocalManager};

/// Like [`LocalManager`], with each worker pinned to one CPU (`sched_setaffinity`, set in the
/// child before it runs any code). Placement follows the socket/core topology read from
/// `/sys/devices/system/cpu`; see [`AffinityMode`] for the algorithms. Linux only.
///
/// ```no_run
/// # use clusterman::prelude::*;
/// # fn main() -> clusterman::Result<()> {
/// let cluster = Cluster::new()?;
/// cluster.add_procs(LocalAffinityManager::new(4))?;                          // Balanced
/// cluster.add_procs(LocalAffinityManager::new(2).mode(AffinityMode::Cpus(vec![0, 1])))?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LocalAffinityManager {
    local: LocalManager,
    np: usize,
    mode: AffinityMode,
    topology: Option<CpuTopology>,
}

impl LocalAffinityManager {
    /// `np` pinned workers, [`AffinityMode::Balanced`].
    pub fn new(np: usize) -> Self {
        LocalAffinityManager { local: LocalManager::new(np), np, mode: AffinityMode::Balanced, topology: None }
    }

    /// How CPUs are chosen.
    pub fn mode(mut self, mode: AffinityMode) -> Self {
        self.mode = mode;
        self
    }

    /// Place on this topology instead of the one read from sysfs.
    pub fn topology(mut self, topology: CpuTopology) -> Self {
        self.topology = Some(topology);
        self
    }

    /// How long to wait for the workers to connect (default 60 s).
    pub fn launch_timeout(mut self, timeout: Duration) -> Self {
        self.local = self.local.launch_timeout(timeout);
        self
    }

    /// Whether the workers run under Linux's `SCHED_BATCH` policy (by default when there
    /// are more of them than CPUs; see [`LocalManager::batch_scheduling`]).
    pub fn batch_scheduling(mut self, batch: bool) -> Self {
        self.local = self.local.batch_scheduling(batch);
        self
    }

    /// The CPU each worker will be pinned to. `Balanced` and `Compact` on the detected
    /// topology use only the CPUs this process may use (its cpuset or affinity mask: inside a
    /// Slurm allocation, under `taskset`); an explicit CPU list is taken as given.
    pub fn placement(&self) -> Result<Vec<usize>> {
        let topology = match &self.topology {
            Some(t) => t.clone(),
            None => {
                let online = CpuTopology::detect().map_err(Error::Unsupported)?;
                match (&self.mode, crate::sys::allowed_cpus()) {
                    (AffinityMode::Cpus(_), _) | (_, None) => online,
                    (_, Some(allowed)) => online.restricted_to(&allowed),
                }
            }
        };
        place(&topology, &self.mode, self.np).map_err(Error::Launch)
    }
}

impl ClusterManager for LocalAffinityManager {
    fn name(&self) -> &str {
        "local-affinity"
    }
    fn count(&self) -> usize {
        self.np
    }
    fn launch(&self, ctx: &LaunchContext) -> Result<Box<dyn Launch>> {
        if !cfg!(target_os = "linux") {
            return Err(Error::Unsupported("LocalAffinityManager needs Linux (sysfs topology and sched_setaffinity); use LocalManager".into()));
        }
        let cpus: Vec<Option<usize>> = self.placement()?.into_iter().map(Some).collect();
        self.local.spawn(ctx, &cpus)
    }
    fn launch_timeout(&self) -> Duration {
        self.local.launch_timeout_value()
    }
}
