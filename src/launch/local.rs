//! Workers as child processes on this machine.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sys;

use super::{ClusterManager, Launch, LaunchContext, LaunchStatus};

/// Starts `np` workers as child processes of this program on this machine.
///
/// Children inherit stdout/stderr until they connect (so a crash at start-up is visible),
/// die with the master even after `kill -9` (`PR_SET_PDEATHSIG`), and also exit on their own
/// when the master's connection closes.
///
/// ```no_run
/// # use clusterman::prelude::*;
/// # fn main() -> clusterman::Result<()> {
/// let cluster = Cluster::new()?;
/// let pids = cluster.add_procs(LocalManager::new(4))?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LocalManager {
    np: usize,
    timeout: Duration,
    env: Vec<(String, String)>,
}

impl LocalManager {
    /// `np` local workers.
    pub fn new(np: usize) -> Self {
        LocalManager { np, timeout: Duration::from_secs(60), env: Vec::new() }
    }

    /// How long to wait for the workers to connect (default 60 s).
    pub fn launch_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub(crate) fn launch_timeout_value(&self) -> Duration {
        self.timeout
    }

    /// An extra environment variable for the workers.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Spawns one child per entry of `cpus` (`None`: not pinned).
    pub(crate) fn spawn(&self, ctx: &LaunchContext, cpus: &[Option<usize>]) -> Result<Box<dyn Launch>> {
        let master = ctx.local_master_address();
        let commands = cpus
            .iter()
            .enumerate()
            .map(|(index, cpu)| {
                let mut cmd = Command::new(ctx.program());
                cmd.envs(ctx.env(index as u32, &master)).envs(self.env.iter().cloned()).stdin(Stdio::null());
                sys::prepare_child(&mut cmd, *cpu);
                cmd
            })
            .collect();
        spawn_children(commands, "worker")
    }
}

impl ClusterManager for LocalManager {
    fn name(&self) -> &str {
        "local"
    }
    fn count(&self) -> usize {
        self.np
    }
    fn launch(&self, ctx: &LaunchContext) -> Result<Box<dyn Launch>> {
        self.spawn(ctx, &vec![None; self.np])
    }
    fn launch_timeout(&self) -> Duration {
        self.timeout
    }
}

/// Starts each command as a child of this process (from the long-lived spawner thread).
pub(crate) fn spawn_children(commands: Vec<Command>, what: &str) -> Result<Box<dyn Launch>> {
    let mut launch = LocalLaunch { children: Vec::new() };
    for (index, cmd) in commands.into_iter().enumerate() {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = sys::spawn(cmd).map_err(|e| Error::io(format!("cannot start {what} {index} ({program})"), e))?;
        launch.children.push((child, None));
    }
    Ok(Box::new(launch))
}

/// Local children and, once reaped, their exit status.
struct LocalLaunch {
    children: Vec<(Child, Option<std::process::ExitStatus>)>,
}

impl Launch for LocalLaunch {
    fn status(&mut self) -> LaunchStatus {
        for (child, status) in &mut self.children {
            if status.is_none() {
                if let Ok(Some(s)) = child.try_wait() {
                    *status = Some(s);
                    return LaunchStatus::Failed(format!("worker process {} exited with {s} (its stderr is above)", child.id()));
                }
            }
        }
        LaunchStatus::Running
    }

    fn stop(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        for (child, status) in &mut self.children {
            while status.is_none() {
                match child.try_wait() {
                    Ok(Some(s)) => *status = Some(s),
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                    _ => {
                        tracing::warn!("worker process {} still running after {grace:?}; killing it", child.id());
                        sys::kill(child.id(), libc::SIGKILL);
                        *status = child.wait().ok();
                        break;
                    }
                }
            }
        }
    }

    fn describe(&self) -> String {
        let running = self.children.iter().filter(|(_, s)| s.is_none()).count();
        format!("{running} of {} local worker processes still running", self.children.len())
    }
}
