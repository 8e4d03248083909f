//! The dial-in listener. Connections are vetted on the I/O runtime, as tasks, not threads: a
//! connection still in its handshake costs a few hundred bytes and one descriptor; there are
//! at most [`HandshakeLimits::max_pending`] of them (a new one past the cap drops the oldest,
//! so a crowd of silent or trickling clients cannot keep real workers out), and each has one
//! deadline for its whole hello. The secret is checked before anything else is decoded.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use crate::error::{Error, Result};
use crate::fingerprint;
use crate::protocol::{Hello, LEN_PREFIX, MAX_HANDSHAKE, Refusal, Secret, Welcome, announced_len, check_hello};
use crate::sys;

use super::io as runtime;

/// Decides what to do with a connection whose hello checked out: its seat, or a refusal.
pub(crate) trait Admit: Send + Sync + 'static {
    /// Where an admitted connection goes (the master's seat for a worker, a peer's pid).
    type Seat: Send;
    /// Reserves the worker's seat, or refuses it. Returns the welcome to send. Runs on the
    /// I/O runtime: it must not wait for anything.
    fn admit(&self, hello: &Hello) -> std::result::Result<(Welcome, Self::Seat), Refusal>;
    /// Starts serving an admitted worker (after it was told its pid). Runs on the I/O runtime.
    fn serve(&self, seat: Self::Seat, hello: Hello, stream: tokio::net::TcpStream);
    /// Records a refused connection.
    fn refused(&self, peer: SocketAddr, refusal: &Refusal);
    /// This process ran out of file descriptors: connections wait in the kernel's queue.
    /// `problem` says so with the numbers and the fix.
    fn out_of_descriptors(&self, problem: &str) {
        let _ = problem;
    }
}

/// Bounds on connections that have not proved the secret yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HandshakeLimits {
    /// Connections in their handshake at once; a new one past this drops the oldest.
    pub max_pending: usize,
    /// Time a connection has for its whole hello.
    pub deadline: Duration,
}

impl Default for HandshakeLimits {
    /// 256 pending handshakes, 10 s each: a thousand workers starting at once get in (a
    /// real hello arrives within milliseconds of the connection), a flood does not pile up.
    fn default() -> Self {
        HandshakeLimits { max_pending: 256, deadline: Duration::from_secs(10) }
    }
}

/// A running listener; stops accepting when dropped.
pub(crate) struct Listener {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Listener {
    /// Binds `bind` and starts accepting on the I/O runtime.
    pub(crate) fn start<A: Admit>(bind: SocketAddr, secret: Secret, admit: Arc<A>, limits: HandshakeLimits) -> Result<Listener> {
        let socket = std::net::TcpListener::bind(bind).map_err(|e| Error::io(format!("cannot listen on {bind}"), e))?;
        let addr = socket.local_addr().map_err(|e| Error::io("reading the listen address", e))?;
        socket.set_nonblocking(true).map_err(|e| Error::io("making the listener non-blocking", e))?;
        let (stop, stopped) = oneshot::channel();
        runtime::spawn(accept_loop(socket, secret, admit, limits, stopped));
        tracing::debug!("listening for workers on {addr}");
        Ok(Listener { addr, stop: Some(stop) })
    }

    /// The bound address (the port is real even when 0 was asked for).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn accept_loop<A: Admit>(socket: std::net::TcpListener, secret: Secret, admit: Arc<A>, limits: HandshakeLimits, mut stopped: oneshot::Receiver<()>) {
    let listener = match tokio::net::TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => return tracing::error!("the listener cannot run: {e}"),
    };
    let mut pending: VecDeque<(SocketAddr, AbortHandle)> = VecDeque::new();
    let mut last_warning: Option<std::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                pending.retain(|(_, task)| !task.is_finished());
                if pending.len() >= limits.max_pending.max(1) {
                    let (oldest, task) = pending.pop_front().expect("pending is not empty");
                    task.abort();
                    let reason = format!("{} connections were in their handshake; dropped the oldest to make room", limits.max_pending);
                    admit.refused(oldest, &Refusal::anonymous(reason));
                    // an aborted task closes its connection when the runtime next runs it: let
                    // it, or a burst of connections holds more than the cap until the burst ends
                    tokio::task::yield_now().await;
                }
                let task = tokio::spawn(handshake(stream, peer, secret, admit.clone(), limits.deadline));
                pending.push_back((peer, task.abort_handle()));
            }
            Err(e) if sys::out_of_descriptors(&e) => {
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    let problem = format!(
                        "too many open files (all {} in use): the master needs about 2 descriptors per worker; raise `ulimit -n`",
                        sys::open_files_limit()
                    );
                    tracing::error!("{problem} (new connections wait meanwhile)");
                    admit.out_of_descriptors(&problem);
                    last_warning = Some(std::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => tracing::debug!("accept: {e}"),
        }
    }
    for (_, task) in pending {
        task.abort();
    }
}

async fn handshake<A: Admit>(mut stream: tokio::net::TcpStream, peer: SocketAddr, secret: Secret, admit: Arc<A>, deadline: Duration) {
    let _ = stream.set_nodelay(true);
    let outcome = match tokio::time::timeout(deadline, read_hello(&mut stream)).await {
        Err(_) => Err(Refusal::anonymous(format!("no complete hello within {deadline:?}"))),
        Ok(Err(refusal)) => Err(refusal),
        Ok(Ok(body)) => {
            let (fp, exe) = fingerprint::this_process();
            check_hello(&body, &secret, fp, exe).and_then(|hello| admit.admit(&hello).map(|welcome| (welcome, hello)))
        }
    };
    match outcome {
        Ok(((welcome, seat), hello)) => {
            let sent = tokio::time::timeout(deadline, stream.write_all(&welcome.encode())).await;
            let handed = match sent {
                Ok(Ok(())) => Ok(stream),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the welcome was not taken")),
            };
            match handed {
                Ok(stream) => admit.serve(seat, hello, stream),
                Err(e) => {
                    let reason = format!("worker {} (os pid {}) vanished during the handshake: {e}", hello.host, hello.os_pid);
                    admit.refused(peer, &Refusal { reason, launch: None });
                }
            }
        }
        Err(refusal) => {
            // recorded before the answer: whoever sees the refusal finds it listed
            admit.refused(peer, &refusal);
            let answer = Welcome::Refused(refusal.reason).encode();
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&answer)).await;
        }
    }
}

/// Reads the length-prefixed hello; memory grows only as bytes arrive.
async fn read_hello(stream: &mut tokio::net::TcpStream) -> std::result::Result<Vec<u8>, Refusal> {
    let mut prefix = [0u8; LEN_PREFIX];
    stream.read_exact(&mut prefix).await.map_err(|e| Refusal::anonymous(format!("no hello: {e}")))?;
    let len = announced_len(prefix, MAX_HANDSHAKE).map_err(|e| Refusal::anonymous(format!("a hello: {e}")))?;
    let mut body = Vec::new();
    let read = (&mut *stream).take(len as u64).read_to_end(&mut body).await.map_err(|e| Refusal::anonymous(format!("broken hello: {e}")))?;
    if read < len {
        return Err(Refusal::anonymous(format!("the hello ended after {read} of {len} bytes")));
    }
    Ok(body)
}
