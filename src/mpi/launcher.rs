//! Running `mpirun`/`mpiexec`: which family it is, the command line, and the running
//! launcher (its output forwarded and the tail of its stderr kept for error messages).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cluster::worker::{ENV_LAUNCH, ENV_MASTER, ENV_SECRET};
use crate::error::{Error, Result};
use crate::launch::Launch;
use crate::sys;

use super::ENV_MPI;

/// The MPI launcher family, which decides how environment variables reach remote ranks
/// (by name only: the secret never appears on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LauncherKind {
    /// Open MPI's `mpirun` (`-x NAME`).
    OpenMpi,
    /// MPICH / Intel MPI Hydra `mpiexec` (`-genvlist A,B`).
    Mpich,
    /// Anything else: the launcher must pass the environment on by itself.
    Other,
}

/// Finds `mpiexec` or `mpirun` on `PATH`.
pub(crate) fn find_on_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    ["mpiexec", "mpirun"].iter().find_map(|name| std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()))
}

/// Asks `launcher --version` which family it is.
pub(crate) fn detect_kind(launcher: &Path) -> Result<LauncherKind> {
    let out = Command::new(launcher).arg("--version").stdin(Stdio::null()).output().map_err(|e| {
        Error::io(format!("cannot run the MPI launcher {}: install Open MPI or MPICH, or set MpiManager::launcher", launcher.display()), e)
    })?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok(kind_from_version(&text))
}

/// The family named in a `--version` text.
pub(crate) fn kind_from_version(text: &str) -> LauncherKind {
    if text.contains("Open MPI") || text.contains("OpenRTE") {
        LauncherKind::OpenMpi
    } else if text.contains("HYDRA") || text.contains("MPICH") || text.contains("Intel(R) MPI") {
        LauncherKind::Mpich
    } else {
        LauncherKind::Other
    }
}

/// The launcher's arguments: `-np N`, the environment forwarding flags, the user's flags,
/// then the program.
pub(crate) fn command_args(kind: LauncherKind, np: usize, flags: &[String], program: &Path) -> Vec<String> {
    let forward = [ENV_MASTER, ENV_SECRET, ENV_LAUNCH, ENV_MPI];
    let mut args = vec!["-np".to_string(), np.to_string()];
    match kind {
        LauncherKind::OpenMpi => forward.iter().for_each(|v| args.extend(["-x".to_string(), v.to_string()])),
        LauncherKind::Mpich => args.extend(["-genvlist".to_string(), forward.join(",")]),
        LauncherKind::Other => {}
    }
    args.extend(flags.iter().cloned());
    args.push(program.display().to_string());
    args
}

/// Lines of launcher output kept for error messages.
const TAIL: usize = 30;

/// A running launcher process.
pub(crate) struct RunningLauncher {
    child: Child,
    name: String,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    status: Arc<Mutex<Option<ExitStatus>>>,
}

impl RunningLauncher {
    /// Starts `cmd` (dies with the master), forwarding its output as `[name] line`.
    pub(crate) fn start(mut cmd: Command, name: &str, status: Arc<Mutex<Option<ExitStatus>>>) -> Result<Self> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        sys::die_with_master(&mut cmd);
        let mut child = sys::spawn(cmd).map_err(|e| Error::io(format!("cannot start {name}"), e))?;
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        forward_lines(child.stdout.take().expect("piped"), name, None);
        forward_lines(child.stderr.take().expect("piped"), name, Some(stderr_tail.clone()));
        Ok(RunningLauncher { child, name: name.to_string(), stderr_tail, status })
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
    fn check(&mut self) -> std::result::Result<(), String> {
        match self.reap() {
            Some(status) => Err(format!("{} exited with {status} before every rank connected; {}", self.name, self.stderr_tail())),
            None => Ok(()),
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
    }

    fn describe(&self) -> String {
        self.stderr_tail()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_told_apart_by_their_version_text() {
        assert_eq!(kind_from_version("mpirun (Open MPI) 4.1.4\n"), LauncherKind::OpenMpi);
        assert_eq!(kind_from_version("HYDRA build details:\n    Version: 4.0.2"), LauncherKind::Mpich);
        assert_eq!(kind_from_version("srun 22.05"), LauncherKind::Other);
    }

    #[test]
    fn the_environment_is_forwarded_by_name_only() {
        let p = Path::new("/bin/prog");
        let flags = vec!["--oversubscribe".to_string()];
        let args = command_args(LauncherKind::OpenMpi, 4, &flags, p);
        assert_eq!(
            args.join(" "),
            "-np 4 -x CLUSTERMAN_MASTER -x CLUSTERMAN_SECRET -x CLUSTERMAN_LAUNCH -x CLUSTERMAN_MPI --oversubscribe /bin/prog"
        );
        let args = command_args(LauncherKind::Mpich, 2, &[], p);
        assert_eq!(args.join(" "), "-np 2 -genvlist CLUSTERMAN_MASTER,CLUSTERMAN_SECRET,CLUSTERMAN_LAUNCH,CLUSTERMAN_MPI /bin/prog");
        assert_eq!(command_args(LauncherKind::Other, 1, &[], p).join(" "), "-np 1 /bin/prog");
    }
}
