//! Worker output: a worker's stdout and stderr go into a pipe; a thread sends what arrives, a
//! line at a time, to the master, which prints `From worker 3: ...` (or calls your sink).

use std::fs::File;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use crate::Pid;
use crate::protocol::{FrameBuf, Header, Kind};
use crate::sys;

use super::link::Link;

/// Receives every line a worker prints: `(pid, line)`.
pub type OutputSink = Arc<dyn Fn(Pid, &str) + Send + Sync>;

/// The default sink: `From worker 3: <line>` on the master's stdout.
pub fn print_sink() -> OutputSink {
    Arc::new(|pid, line| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "From worker {pid}: {line}");
    })
}

static FORWARDER_DONE: Mutex<Option<mpsc::Receiver<()>>> = Mutex::new(None);

/// Sends this worker's stdout and stderr to the master from now on.
pub(crate) fn start_forwarding(link: Arc<Link>, me: Pid) -> std::io::Result<()> {
    let mut pipe: File = sys::redirect_stdio_to_pipe()?;
    let (done_tx, done_rx) = mpsc::channel();
    *FORWARDER_DONE.lock().expect("forwarder lock") = Some(done_rx);
    std::thread::Builder::new().name("cman-output".into()).spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut partial: Vec<u8> = Vec::new();
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            partial.extend_from_slice(&buf[..n]);
            if let Some(end) = partial.iter().rposition(|&b| b == b'\n') {
                let rest = partial.split_off(end + 1);
                send_lines(&link, me, &partial[..end]);
                partial = rest;
            }
        }
        if !partial.is_empty() {
            send_lines(&link, me, &partial);
        }
        let _ = done_tx.send(());
    })?;
    Ok(())
}

fn send_lines(link: &Link, me: Pid, text: &[u8]) {
    let mut frame = FrameBuf::with_capacity(Header { kind: Kind::Output, src: me, dst: 1, req: 0, func: 0 }, text.len());
    frame.payload().extend_from_slice(text);
    if let Ok(bytes) = frame.finish() {
        let _ = link.send(bytes);
    }
}

/// Flushes what the worker printed to the master before it exits (nothing to do if
/// forwarding never started).
pub(crate) fn finish_forwarding() {
    let Some(done) = FORWARDER_DONE.lock().expect("forwarder lock").take() else { return };
    let _ = std::io::stdout().flush();
    sys::detach_stdio();
    let _ = done.recv_timeout(Duration::from_secs(2));
}
