//! A launcher process (`mpirun`, an `srun` job step): its output forwarded as `[name] line`,
//! the tail of its stderr kept for error messages. If the master dies, its workers notice at
//! once and exit, and the launcher ends by itself, cleanly; a guard process stops it (`SIGTERM`,
//! then `SIGKILL`) if it is still there seconds later. (A death signal straight to `mpirun`
//! races its ranks' exits, and Open MPI then leaves its session directory behind.)

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sys;

use super::guard::CancelGuard;
use super::{Launch, LaunchStatus};

/// Lines of launcher output kept for error messages.
const TAIL: usize = 30;

/// A running launcher process.
pub(crate) struct RunningLauncher {
    child: Child,
    name: String,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    status: Arc<Mutex<Option<ExitStatus>>>,
    guard: Option<CancelGuard>,
}

impl RunningLauncher {
    /// Starts `cmd` (stopped by a guard if the master dies), forwarding its output as
    /// `[name] line`.
    pub(crate) fn start(mut cmd: Command, name: &str, status: Arc<Mutex<Option<ExitStatus>>>) -> Result<Self> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        sys::survive_broken_pipes(&mut cmd);
        let mut child = sys::spawn(cmd).map_err(|e| Error::io(format!("cannot start {name}"), e))?;
        let guard = CancelGuard::for_process(child.id()).map_err(|e| tracing::warn!("no guard for {name}: {e}")).ok();
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        forward_lines(child.stdout.take().expect("piped"), name, None);
        forward_lines(child.stderr.take().expect("piped"), name, Some(stderr_tail.clone()));
        Ok(RunningLauncher { child, name: name.to_string(), stderr_tail, status, guard })
    }

    /// The last lines the launcher wrote to stderr.
    pub(crate) fn stderr_tail(&self) -> String {
        let tail = self.stderr_tail.lock().expect("tail lock");
        if tail.is_empty() {
            format!("{} wrote nothing to stderr", self.name)
        } else {
            format!("last lines of {}'s stderr:\n{}", self.name, tail.iter().cloned().collect::<Vec<_>>().join("\n"))
        }
    }

    fn reap(&mut self) -> Option<ExitStatus> {
        let mut status = self.status.lock().expect("status lock");
        if status.is_none() {
            *status = self.child.try_wait().ok().flatten();
        }
        *status
    }
}

fn forward_lines(stream: impl Read + Send + 'static, name: &str, tail: Option<Arc<Mutex<VecDeque<String>>>>) {
    let name = name.to_string();
    let _ = std::thread::Builder::new().name(format!("cman-{name}-output")).spawn(move || {
        for line in BufReader::new(stream).lines().map_while(std::result::Result::ok) {
            eprintln!("[{name}] {line}");
            if let Some(tail) = &tail {
                let mut t = tail.lock().expect("tail lock");
                if t.len() == TAIL {
                    t.pop_front();
                }
                t.push_back(line);
            }
        }
    });
}

impl Launch for RunningLauncher {
    fn status(&mut self) -> LaunchStatus {
        match self.reap() {
            Some(status) => LaunchStatus::Failed(format!("{} exited with {status} before every worker connected; {}", self.name, self.stderr_tail())),
            None => LaunchStatus::Running,
        }
    }

    fn stop(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while self.reap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.reap().is_none() {
            tracing::warn!("{} still running after {grace:?}; terminating it", self.name);
            sys::kill(self.child.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.reap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.reap().is_none() {
                sys::kill(self.child.id(), libc::SIGKILL);
                let status = self.child.wait().ok();
                *self.status.lock().expect("status lock") = status;
            }
        }
        if let Some(guard) = self.guard.take() {
            guard.dismiss();
        }
    }

    fn describe(&self) -> String {
        self.stderr_tail()
    }

    fn kill_worker(&mut self, worker: &crate::cluster::WorkerInfo) -> bool {
        // only a process of ours: one this launcher started on this host
        if self.reap().is_some() || worker.host != sys::hostname() || !sys::descends_from(worker.os_pid, self.child.id()) {
            return false;
        }
        sys::kill(worker.os_pid, libc::SIGKILL);
        true
    }
}

