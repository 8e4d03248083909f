//! Moving frames: the process's I/O runtime (tokio; it writes what sockets could not take at
//! once, runs the listener and keeps the timers; driven by its own thread or by a thread that
//! waits for a reply), the master's connections read through one epoll set on it
//! ([`reading`]), TCP connections whose senders never wait on a peer, and the listener
//! workers dial. The MPI transport implements the same
//! [`FrameOut`] (see `mpi`), and waiting threads poll it ([`polled`]). Nothing here knows
//! what a frame means.

pub(crate) mod io;
pub(crate) mod listener;
pub(crate) mod polled;
pub(crate) mod reading;
pub(crate) mod tcp;

use std::sync::Arc;
use std::time::Duration;

use crate::protocol::Outgoing;

/// Where a link's outgoing frames go: a TCP connection, sent to directly (among a thousand
/// workers, a call through a vtable costs the vtable's page on every call), or another
/// transport's sender (MPI).
pub(crate) enum Out {
    Tcp(Arc<tcp::TcpOut>),
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))] // the MPI transport's, built with MPI only
    Other(Arc<dyn FrameOut>),
}

impl Out {
    /// Brings the connection's send state into the caches ahead of a send.
    #[inline]
    pub(crate) fn prefetch(&self) {
        if let Out::Tcp(tcp) = self {
            crate::sys::Hint::of(&**tcp).prefetch();
        }
    }

    /// See [`FrameOut::send`].
    #[inline]
    pub(crate) fn send(&self, frame: Outgoing, patience: Option<Duration>) -> std::io::Result<()> {
        match self {
            Out::Tcp(tcp) => tcp.send(frame, patience),
            Out::Other(other) => other.send(frame, patience),
        }
    }

    /// See [`FrameOut::close`].
    pub(crate) fn close(&self) {
        match self {
            Out::Tcp(tcp) => tcp.close(),
            Out::Other(other) => other.close(),
        }
    }

    /// See [`FrameOut::pulse`].
    pub(crate) fn pulse(&self) -> Option<crate::sys::TcpPulse> {
        match self {
            Out::Tcp(tcp) => tcp.pulse(),
            Out::Other(other) => other.pulse(),
        }
    }
}

/// Where a link's outgoing frames go: a socket, or the MPI progress thread.
pub(crate) trait FrameOut: Send + Sync {
    /// Sends one whole frame (length prefix included; MPI drops it, messages have bounds).
    /// Never blocks on the peer: with `patience` it may wait that long for queue space (the
    /// clock is read only then); without, a full queue is an error of kind `WouldBlock`.
    fn send(&self, frame: Outgoing, patience: Option<Duration>) -> std::io::Result<()>;
    /// Stops the connection so that the reading side sees its end.
    fn close(&self);
    /// What the kernel knows about the connection's liveness (TCP only).
    fn pulse(&self) -> Option<crate::sys::TcpPulse> {
        None
    }
}
