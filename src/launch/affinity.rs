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

    /// The CPU each worker will be pinned to.
    pub fn placement(&self) -> Result<Vec<usize>> {
        let topology = match &self.topology {
            Some(t) => t.clone(),
            None => CpuTopology::detect().map_err(Error::Unsupported)?,
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
