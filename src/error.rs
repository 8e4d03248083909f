//! Errors. Every message says what happened and, where there is one, what to do about it.

use crate::ids::Pid;

/// A failure inside a remote function: a panic or an `Err` it returned.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteError {
    /// The process the function ran on.
    pub pid: Pid,
    /// The registered name of the function.
    pub function: String,
    /// The panic message or the `Display` of the returned error.
    pub message: String,
    /// `file:line:column` of the panic; `None` for a returned `Err`.
    pub location: Option<String>,
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.location {
            Some(loc) => write!(f, "{} panicked on worker {} at {loc}: {}", self.function, self.pid, self.message),
            None => write!(f, "{} failed on worker {}: {}", self.function, self.pid, self.message),
        }
    }
}

impl std::error::Error for RemoteError {}

/// Everything that can go wrong in clusterman.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A remote function panicked or returned `Err`.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The worker died (or its connection broke) before answering.
    #[error("worker {pid} died before answering: {reason}")]
    WorkerDied {
        /// The worker that is gone.
        pid: Pid,
        /// What was seen: end of stream, a reset, a killed process.
        reason: String,
    },
    /// No such worker in this cluster.
    #[error("no worker with pid {0} in this cluster (see `Cluster::workers()`)")]
    NoSuchWorker(Pid),
    /// The function is not registered in the process that was asked to run it.
    #[error("function {name} (id {id:#018x}) is not registered on pid {pid}; is it marked #[remote] and are all processes the same binary?")]
    UnknownFunction {
        /// Where it was sent.
        pid: Pid,
        /// Its registered name.
        name: String,
        /// Its id (a hash of the name).
        id: u64,
    },
    /// Some ranks of an `mpido!` failed: each failing rank with its error, in rank order.
    #[error("mpido! failed on {} rank(s): {}", .0.len(), list_ranks(.0))]
    Ranks(Vec<(i32, Error)>),
    /// Starting workers failed.
    #[error("launch failed: {0}")]
    Launch(String),
    /// Workers did not connect in time.
    #[error("launch timed out after {waited:?}: {connected} of {expected} workers connected. {detail}")]
    LaunchTimeout {
        /// How long we waited.
        waited: std::time::Duration,
        /// Workers that made it.
        connected: usize,
        /// Workers asked for.
        expected: usize,
        /// What else is known (launcher output, hints).
        detail: String,
    },
    /// A peer broke the wire protocol (garbage, oversized or truncated frame).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The connection to the master is gone (on a worker).
    #[error("lost the master: {0}")]
    MasterGone(String),
    /// A worker was refused at the handshake.
    #[error("handshake refused: {0}")]
    Handshake(String),
    /// Encoding or decoding a value failed.
    #[error("serialization failed: {0}")]
    Codec(String),
    /// The cluster was shut down (also the fate of calls still running at `shutdown()`).
    #[error("the cluster is shut down")]
    ShutDown,
    /// A process cannot take the call now: its connection has a backlog of unread data, or
    /// (on the master) too many calls wait to run. Nothing was run; try again later.
    #[error("pid {pid} cannot take the call now: {reason}")]
    Busy {
        /// The process that was asked.
        pid: Pid,
        /// Why, with the numbers.
        reason: String,
    },
    /// A bounded wait ended before the result arrived ([`RemoteFuture::fetch_timeout`](crate::RemoteFuture::fetch_timeout)).
    /// The call may still run on the worker; its result will be dropped when it arrives.
    #[error("no result from pid {pid} within {waited:?}; the call may still be running there, and its result will be dropped")]
    Timeout {
        /// The process the call runs on.
        pid: Pid,
        /// How long we waited.
        waited: std::time::Duration,
    },
    /// This operation is not available here (wrong platform or wrong process).
    #[error("{0}")]
    Unsupported(String),
    /// An operating-system error.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn list_ranks(failures: &[(i32, Error)]) -> String {
    failures.iter().map(|(rank, e)| format!("rank {rank}: {e}")).collect::<Vec<_>>().join("; ")
}

/// `Result` with clusterman's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with what we were doing.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}
