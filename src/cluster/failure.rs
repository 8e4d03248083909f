//! Why a call failed, as sent on the wire.

use serde::{Deserialize, Serialize};

use crate::ids::Pid;
use crate::error::{Error, RemoteError};

/// The payload of a `Failure` frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Failure {
    Remote(RemoteError),
    UnknownFunction { pid: Pid, id: u64 },
    NoSuchWorker(Pid),
    WorkerDied { pid: Pid, reason: String },
    Busy { pid: Pid, reason: String },
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Error {
        match f {
            Failure::Remote(e) => Error::Remote(e),
            Failure::UnknownFunction { pid, id } => Error::UnknownFunction { pid, name: "?".into(), id },
            Failure::NoSuchWorker(pid) => Error::NoSuchWorker(pid),
            Failure::WorkerDied { pid, reason } => Error::WorkerDied { pid, reason },
            Failure::Busy { pid, reason } => Error::Busy { pid, reason },
        }
    }
}
