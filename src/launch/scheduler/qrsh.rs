//! Grid Engine through `qrsh`: one interactive `qrsh -now n` per worker, whose client runs
//! here as a child process. No shared filesystem involved; stopping the launch ends the
//! `qrsh` clients and with them their jobs.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::launch::local::{STDIN, spawn_children};
use crate::launch::{ClusterManager, Launch, LaunchContext};
use crate::sys;

use super::JobOptions;

/// Workers started with one `qrsh` each.
///
/// ```no_run
/// # use clusterman::prelude::*;
/// use clusterman::launch::scheduler::QrshManager;
/// # fn main() -> clusterman::Result<()> {
/// let cluster = Cluster::new()?;
/// cluster.add_procs(QrshManager::new(2).qsub_flags(["-q", "all.q"]))?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct QrshManager {
    np: usize,
    flags: Vec<String>,
    job: JobOptions,
}

impl QrshManager {
    /// `np` workers.
    pub fn new(np: usize) -> Self {
        QrshManager { np, flags: Vec::new(), job: JobOptions::default() }
    }

    /// Extra `qrsh` arguments (like Julia's `qsub_flags`).
    pub fn qsub_flags<S: Into<String>>(mut self, flags: impl IntoIterator<Item = S>) -> Self {
        self.flags = flags.into_iter().map(Into::into).collect();
        self
    }

    /// Job name, working directory and launch timeout (other options do not apply to qrsh).
    pub fn job(mut self, options: JobOptions) -> Self {
        self.job = options.with_defaults(&self.job);
        self
    }

    /// The `qrsh` command of each worker (without its environment).
    pub fn command(&self) -> Vec<String> {
        let mut argv: Vec<String> = ["qrsh", "-now", "n", "-V", "-N"].map(String::from).to_vec();
        argv.push(self.job.name.clone());
        argv.extend(["-wd".to_string(), self.job.workdir_or_current()]);
        argv.extend(self.flags.iter().cloned());
        argv.push(std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default());
        argv
    }
}

impl ClusterManager for QrshManager {
    fn name(&self) -> &str {
        "qrsh"
    }

    fn count(&self) -> usize {
        self.np
    }

    fn launch(&self, ctx: &LaunchContext) -> Result<Box<dyn Launch>> {
        if !self.job.command_prefix.is_empty() {
            return Err(Error::Launch("QrshManager cannot run through a command prefix (qrsh forwards its own environment); run the master where qrsh works".into()));
        }
        let argv = self.command();
        let commands = (0..self.np)
            .map(|i| {
                let mut cmd = Command::new(&argv[0]);
                // -V forwards this environment to the job, where `qstat -j` shows it to every
                // user: the secret goes through qrsh's standard input instead
                cmd.args(&argv[1..]).envs(LaunchContext::secret_from(ctx.env(i as u32, &ctx.master_address()), Path::new(STDIN)));
                sys::die_with_master(&mut cmd);
                cmd
            })
            .collect();
        spawn_children(commands, "qrsh", Some(ctx))
    }

    fn launch_timeout(&self) -> Duration {
        self.job.launch_timeout
    }
}
