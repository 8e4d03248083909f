//! The dial-in: one TCP listener per master. Each connection gets its own short-lived
//! handshake thread (a slow or hostile client cannot hold up the others), proves the secret,
//! and is handed to the master as a worker or refused with a reason.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::Pid;
use crate::cluster::worker::read_prefixed;
use crate::error::{Error, Result};
use crate::fingerprint;
use crate::protocol::{Hello, MAX_HANDSHAKE, Refusal, Secret, Welcome, check_hello};

/// Decides what to do with a worker whose hello checked out: its pid, or a refusal.
pub(crate) trait Admit: Send + Sync + 'static {
    /// Reserves the worker's pid, or refuses it. Returns the welcome to send.
    fn admit(&self, hello: &Hello) -> std::result::Result<Welcome, Refusal>;
    /// Starts serving an admitted worker (after it was told its pid).
    fn serve(&self, pid: Pid, hello: Hello, stream: TcpStream);
    /// Records a refused connection (logged, kept for [`crate::Cluster::refusals`]).
    fn refused(&self, peer: SocketAddr, refusal: &Refusal);
}

/// A running listener; stops when dropped.
pub(crate) struct Listener {
    addr: SocketAddr,
    socket: TcpListener,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Binds `bind` and starts accepting.
    pub(crate) fn start(bind: SocketAddr, secret: Secret, admit: Arc<dyn Admit>) -> Result<Listener> {
        let socket = TcpListener::bind(bind).map_err(|e| Error::io(format!("cannot listen on {bind}"), e))?;
        let addr = socket.local_addr().map_err(|e| Error::io("reading the listen address", e))?;
        let accepting = socket.try_clone().map_err(|e| Error::io("cloning the listener", e))?;
        let thread = std::thread::Builder::new()
            .name("cman-listener".into())
            .spawn(move || {
                for stream in accepting.incoming() {
                    let stream = match stream {
                        Ok(s) => s,
                        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => break, // shut down
                        Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                            tracing::warn!("accept: {e}; too many open files, pausing");
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                        Err(e) => {
                            tracing::debug!("accept: {e}");
                            continue;
                        }
                    };
                    let admit = admit.clone();
                    let _ = std::thread::Builder::new().name("cman-handshake".into()).spawn(move || handshake(stream, secret, &*admit));
                }
            })
            .map_err(|e| Error::io("starting the listener thread", e))?;
        tracing::debug!("listening for workers on {addr}");
        Ok(Listener { addr, socket, thread: Some(thread) })
    }

    /// The bound address (the port is real even when 0 was asked for).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // SAFETY: shutdown(2) on our own listening socket makes the blocked accept return.
        unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn handshake(mut stream: TcpStream, secret: Secret, admit: &dyn Admit) {
    let peer = stream.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let body = match read_prefixed(&mut stream, MAX_HANDSHAKE) {
        Ok(b) => b,
        Err(e) => {
            admit.refused(peer, &Refusal { reason: format!("no valid hello within 10 s: {e}"), launch: None });
            return;
        }
    };
    let (fp, exe) = fingerprint::this_process();
    let outcome = check_hello(&body, &secret, fp, exe).and_then(|hello| admit.admit(&hello).map(|welcome| (welcome, hello)));
    match outcome {
        Ok((welcome, hello)) => {
            let Welcome::Accepted { pid, .. } = welcome else { return };
            if stream.write_all(&welcome.encode()).is_err() || stream.set_read_timeout(None).is_err() {
                let reason = format!("worker {} (os pid {}) vanished during the handshake", hello.host, hello.os_pid);
                admit.refused(peer, &Refusal { reason, launch: None });
                return;
            }
            admit.serve(pid, hello, stream);
        }
        Err(refusal) => {
            let _ = stream.write_all(&Welcome::Refused(refusal.reason.clone()).encode());
            admit.refused(peer, &refusal);
        }
    }
}
