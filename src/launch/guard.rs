//! The cancel guard: one tiny shell process per submitted job (or launcher process) that
//! waits on a pipe from the master. If the pipe closes without the word `done` — the master
//! exited without cleaning up, even by `kill -9` — it runs the cancel command. Either way it
//! removes the launch's secret file. It ignores the terminal's signals and has its own process
//! group, so a Ctrl-C that kills the master does not kill it.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use super::shell::shell_quote;

pub(crate) struct CancelGuard {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl CancelGuard {
    /// Starts a guard that runs `cancel` unless dismissed, and removes `cleanup` when done.
    pub(crate) fn start(cancel: &[String], cleanup: Option<&Path>) -> std::io::Result<CancelGuard> {
        let command: Vec<String> = cancel.iter().map(|a| shell_quote(a)).collect();
        let cleanup = cleanup.map_or_else(|| "exit 0".to_string(), |p| format!("exec rm -f {}", shell_quote(&p.display().to_string())));
        let script = format!("trap '' INT HUP TERM; read line; [ \"$line\" = done ] || {} >/dev/null 2>&1; {cleanup}", command.join(" "));
        let mut child = Command::new("/bin/sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        let pipe = child.stdin.take();
        Ok(CancelGuard { child, pipe })
    }

    /// Runs the cancel command now and waits (up to 10 s) for it to finish.
    pub(crate) fn cancel_now(mut self) {
        drop(self.pipe.take()); // end of file without "done"
        self.reap();
    }

    /// A guard that stops launcher process `pid` if the master dies: it first gives the
    /// workers a few seconds to exit by themselves (they notice at once; `mpirun` then ends
    /// cleanly, session directory included), then sends `SIGTERM`, then `SIGKILL`. It checks
    /// the process's start time before each signal, so a recycled pid is never hit.
    pub(crate) fn for_process(pid: u32) -> std::io::Result<CancelGuard> {
        let started = std::fs::read_to_string(format!("/proc/{pid}/stat"))?
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(19).map(String::from))
            .ok_or_else(|| std::io::Error::other("cannot read the launcher's start time"))?;
        let same = format!("[ \"$(cut -d')' -f2- /proc/{pid}/stat 2>/dev/null | cut -d' ' -f21)\" = {started} ]");
        let script = format!("sleep 5; {same} && kill -TERM {pid}; sleep 5; {same} && kill -KILL {pid}");
        Self::start(&["sh".into(), "-c".into(), script], None)
    }

    /// The job ended by itself: the guard exits without cancelling.
    pub(crate) fn dismiss(mut self) {
        if let Some(mut pipe) = self.pipe.take() {
            let _ = pipe.write_all(b"done\n");
        }
        self.reap();
    }

    fn reap(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!("the job's cancel command is still running after 10 s");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("cman-guard-{tag}-{}", std::process::id()))
    }

    #[test]
    fn cancels_when_told_and_not_when_dismissed() {
        let cancelled = marker("cancel");
        let secret = marker("secret1");
        std::fs::write(&secret, "x").unwrap();
        let guard = CancelGuard::start(&["touch".into(), cancelled.display().to_string()], Some(&secret)).unwrap();
        guard.cancel_now();
        assert!(cancelled.exists());
        assert!(!secret.exists(), "the secret file goes too");
        std::fs::remove_file(&cancelled).unwrap();

        let kept = marker("dismiss");
        std::fs::write(&secret, "x").unwrap();
        let guard = CancelGuard::start(&["touch".into(), kept.display().to_string()], Some(&secret)).unwrap();
        guard.dismiss();
        assert!(!kept.exists());
        assert!(!secret.exists());
    }

    #[test]
    fn cancels_when_the_master_side_of_the_pipe_just_disappears() {
        let cancelled = marker("vanish");
        let mut guard = CancelGuard::start(&["touch".into(), cancelled.display().to_string()], None).unwrap();
        drop(guard.pipe.take()); // what the kernel does when the master dies
        guard.reap();
        assert!(cancelled.exists());
        std::fs::remove_file(&cancelled).unwrap();
    }
}
