//! Workers as child processes on this machine.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sys;

use super::{ClusterManager, Launch, LaunchContext, LaunchStatus};

/// Starts `np` workers as child processes of this program on this machine.
///
/// Children inherit stdout/stderr until they connect (so a crash at start-up is visible),
/// die with the master even after `kill -9` (`PR_SET_PDEATHSIG`), and also exit on their own
/// when the master's connection closes. The secret reaches them on their standard input,
/// so it is in no environment and on no command line. A launch of more workers than this
/// process has CPUs runs them under Linux's `SCHED_BATCH` policy
/// ([`LocalManager::batch_scheduling`]).
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
    batch: Option<bool>,
}

impl LocalManager {
    /// `np` local workers.
    pub fn new(np: usize) -> Self {
        LocalManager { np, timeout: Duration::from_secs(60), env: Vec::new(), batch: None }
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

    /// Whether the workers run under Linux's `SCHED_BATCH` policy. By default they do when
    /// this launch starts more workers than this process may use CPUs. Then workers share
    /// cores with each other and with the master, and under the default policy a worker woken
    /// by a call preempts whatever runs on its core, the master too: the master, which sends
    /// every call and reads every reply, is the one that waits, and the work piles up behind
    /// it (a no-op `everywhere` round over 1,024 workers on 2 cores took 5-10 % longer). A
    /// batch worker waits for its turn instead; its share of the CPU (its nice value) is
    /// unchanged. With a core each, a worker rarely has anyone to preempt, and one woken
    /// at once answers sooner (a no-op round trip with master and worker on one CPU: 5.9 µs,
    /// 6.2 µs batch). `true` or `false` decides for every launch. Other platforms ignore
    /// this.
    pub fn batch_scheduling(mut self, batch: bool) -> Self {
        self.batch = Some(batch);
        self
    }

    /// Whether this launch's workers run as batch work (see [`Self::batch_scheduling`]).
    fn batch_for(&self, workers: usize) -> bool {
        // the CPUs this process may use: its affinity mask and its cgroup's quota
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.batch.unwrap_or(workers > cpus)
    }

    /// Spawns one child per entry of `cpus` (`None`: not pinned).
    pub(crate) fn spawn(&self, ctx: &LaunchContext, cpus: &[Option<usize>]) -> Result<Box<dyn Launch>> {
        let master = ctx.local_master_address();
        let batch = self.batch_for(cpus.len());
        let commands = cpus
            .iter()
            .enumerate()
            .map(|(index, cpu)| {
                let mut cmd = Command::new(ctx.program());
                cmd.envs(LaunchContext::secret_from(ctx.env(index as u32, &master), Path::new(STDIN))).envs(self.env.iter().cloned());
                sys::ChildSettings::local_worker(*cpu, batch).pass(&mut cmd);
                cmd
            })
            .collect();
        spawn_children(commands, "worker", Some(ctx))
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

/// Where a child reads the secret from when it arrives on its standard input.
pub(crate) const STDIN: &str = "/dev/stdin";

/// Starts each command as a child of this process (from the long-lived spawner thread). With
/// `secret_for`, each child's standard input carries the secret (one line, then the end).
pub(crate) fn spawn_children(commands: Vec<Command>, what: &str, secret_for: Option<&LaunchContext>) -> Result<Box<dyn Launch>> {
    let mut launch = LocalLaunch { children: Vec::new() };
    for (index, mut cmd) in commands.into_iter().enumerate() {
        let program = cmd.get_program().to_string_lossy().into_owned();
        cmd.stdin(if secret_for.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = sys::spawn(cmd).map_err(|e| {
            let hint = if sys::out_of_descriptors(&e) { "; this process is out of file descriptors: raise `ulimit -n`" } else { "" };
            Error::io(format!("cannot start {what} {index} ({program}){hint}"), e)
        })?;
        if let (Some(ctx), Some(mut stdin)) = (secret_for, child.stdin.take()) {
            // 33 bytes: far below a pipe's capacity, so this never waits for the child
            let _ = writeln!(stdin, "{}", ctx.secret().to_hex());
        }
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

    fn kill_worker(&mut self, worker: &crate::cluster::WorkerInfo) -> bool {
        let Some((child, status)) = self.children.iter_mut().find(|(c, s)| c.id() == worker.os_pid && s.is_none()) else { return false };
        sys::kill(child.id(), libc::SIGKILL);
        *status = child.wait().ok();
        true
    }
}
