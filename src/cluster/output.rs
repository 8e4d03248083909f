//! Worker output: a worker's stdout and stderr go into a pipe, and what arrives is sent, a
//! line at a time, to the master, which prints `From worker 3: ...` (or calls your sink).
//!
//! Two readers share the pipe: a thread that waits for output at any time, and the serving
//! thread, which drains the pipe before it sends each reply. So the lines a call printed
//! always reach the master before that call's result. The serving thread watches the pipe
//! through io_uring where the kernel allows ([`sys::PipeWatch`]): it learns that nothing was
//! printed, as most calls print nothing, without a system call.

use std::cell::OnceCell;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use crate::ids::Pid;
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

/// The read end of the worker's output pipe (non-blocking) and what it has forwarded.
struct Forwarder {
    pipe: File,
    partial: Vec<u8>,
    link: Arc<Link>,
    me: Pid,
    /// How long a line may wait for room on a backed-up connection before it is dropped.
    patience: Duration,
    /// Reused for every read (the serving thread drains the pipe before every reply: a
    /// fresh zeroed buffer each time would cost more than a no-op call).
    chunk: Vec<u8>,
}

/// A line longer than this is sent in pieces (a program printing without newlines must not
/// grow the buffer without bound).
const LONGEST_LINE: usize = 1 << 20;

impl Forwarder {
    /// Reads what is in the pipe now and sends the complete lines. `Ok(false)` at end of file.
    #[inline]
    fn drain(&mut self) -> std::io::Result<bool> {
        match sys::read_ready(self.pipe.as_raw_fd(), &mut self.chunk)? {
            None if self.partial.is_empty() => Ok(true), // nothing printed: most calls, inline
            read => self.forward(read),
        }
    }

    /// [`drain`](Self::drain) once the first read is `read`: off a call's way, for the calls
    /// that printed.
    #[inline(never)]
    fn forward(&mut self, mut read: Option<usize>) -> std::io::Result<bool> {
        let fd = self.pipe.as_raw_fd();
        let open = loop {
            match read {
                None => break true,
                Some(0) => break false,
                Some(n) => {
                    self.partial.extend_from_slice(&self.chunk[..n]);
                    if self.partial.len() >= LONGEST_LINE {
                        break true;
                    }
                }
            }
            read = sys::read_ready(fd, &mut self.chunk)?;
        };
        let end = match self.partial.iter().rposition(|&b| b == b'\n') {
            _ if !open || self.partial.len() >= LONGEST_LINE => Some(self.partial.len()),
            newline => newline.map(|i| i + 1),
        };
        if let Some(end) = end.filter(|&e| e > 0) {
            let rest = self.partial.split_off(end);
            let text = std::mem::replace(&mut self.partial, rest);
            send_lines(&self.link, self.me, text.strip_suffix(b"\n").unwrap_or(&text), self.patience);
        }
        Ok(open)
    }
}

static FORWARDER: Mutex<Option<Forwarder>> = Mutex::new(None);
static FORWARDER_DONE: Mutex<Option<mpsc::Receiver<()>>> = Mutex::new(None);

thread_local! {
    /// The output pipe, watched for the thread that started forwarding (the serving thread):
    /// while it says nothing came, that thread need not read the pipe before a reply.
    static WATCH: OnceCell<sys::PipeWatch> = const { OnceCell::new() };
}

/// Sends this worker's stdout and stderr to the master from now on.
pub(crate) fn start_forwarding(link: Arc<Link>, me: Pid, patience: Duration) -> std::io::Result<()> {
    let pipe: File = sys::redirect_stdio_to_pipe()?;
    let fd = pipe.as_raw_fd();
    sys::set_nonblocking(fd)?;
    match sys::PipeWatch::new(fd) {
        Ok(watch) => WATCH.with(|w| {
            w.get_or_init(|| watch); // a second serving on this thread keeps the first watch
        }),
        Err(e) => tracing::debug!("worker {me}: the output pipe is read before every reply (io_uring: {e})"),
    }
    *FORWARDER.lock().expect("forwarder lock") = Some(Forwarder { pipe, partial: Vec::new(), link, me, patience, chunk: vec![0; 64 * 1024] });
    let (done_tx, done_rx) = mpsc::channel();
    *FORWARDER_DONE.lock().expect("forwarder lock") = Some(done_rx);
    std::thread::Builder::new().name("cman-output".into()).spawn(move || {
        loop {
            sys::wait_readable(fd);
            let mut f = FORWARDER.lock().expect("forwarder lock");
            match f.as_mut().map(Forwarder::drain) {
                Some(Ok(true)) => {}
                _ => break, // end of file, an error, or forwarding finished
            }
        }
        let _ = done_tx.send(());
    })?;
    Ok(())
}

/// Brings what [`flush`] looks at into the caches, while the call it follows runs.
#[inline]
pub(crate) fn prefetch() {
    let _ = WATCH.try_with(|w| w.get().map(|w| w.prefetch()));
}

/// Sends the lines the worker printed so far (called before each reply, so output comes
/// first). Rust's stdout needs no flush for that: it is line-buffered, so each line is in
/// the pipe once printed; only an unfinished line waits, and one is not sent anyway.
#[inline]
pub(crate) fn flush() {
    if WATCH.try_with(|w| w.get().is_some_and(|w| !w.news())).unwrap_or(false) {
        return; // nothing was printed
    }
    if let Some(f) = FORWARDER.lock().expect("forwarder lock").as_mut() {
        let _ = f.drain();
    }
}

fn send_lines(link: &Link, me: Pid, text: &[u8], patience: Duration) {
    let mut frame = FrameBuf::with_capacity(Header { kind: Kind::Output, src: me, dst: 1, req: 0, func: 0, words: 0 }, text.len());
    frame.payload().extend_from_slice(text);
    if let Ok(bytes) = frame.finish() {
        let _ = link.send_patiently(bytes, patience);
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
