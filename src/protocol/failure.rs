//! Why a call failed, as sent on the wire.

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::{Error, RemoteError, Result};
use crate::ids::Pid;

use super::frame::{FrameBuf, Header, Kind};

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

/// A failure frame from `src` to `dst` for request `req`.
pub(crate) fn failure_frame(src: Pid, dst: Pid, req: u64, failure: &Failure) -> Result<Vec<u8>> {
    let mut frame = FrameBuf::new(Header { kind: Kind::Failure, src, dst, req, func: 0, words: 0 });
    codec::encode_into(failure, frame.payload())?;
    frame.finish()
}
