//! The protocol, without I/O and without a clock: the wire format, and the state machines
//! the drivers feed with frames, connection ends and the time.
//!
//! Every message is one frame: a little-endian `u32` body length, then the body. The body
//! starts with a fixed [`Header`] (kind, source pid, destination pid, request id, function id)
//! followed by the payload (codec bytes, or raw text for output lines). Lengths are written
//! and checked in one place (`frame.rs`), against a maximum before anything is allocated, and
//! every parse failure is an error value, never a panic. The transports (TCP, MPI) only move
//! these bytes.
//!
//! The state machines: `master` (calls, routing, heartbeats, departures, shutdown),
//! `worker` (a worker's links and its calls on them), `admission` (who may join, as which
//! pid), `plan` (pmap's batches and retries), `watch` (a launch's queue and timeouts) and
//! `liveness` (judging a silent peer). `pair` tests a master core against worker cores.

pub(crate) mod admission;
pub(crate) mod env;
pub(crate) mod failure;
mod frame;
mod handshake;
pub(crate) mod id_map;
pub(crate) mod liveness;
pub(crate) mod master;
#[cfg(test)]
mod pair;
pub(crate) mod plan;
pub(crate) mod watch;
pub(crate) mod worker;

pub use frame::{Frame, FrameBuf, FrameReader, Header, Kind, LEN_PREFIX, Outgoing, announced_len, bare, call_frame};
#[cfg(feature = "mpi")]
pub use frame::{WORDS_HEAD, words_apart};
#[cfg(feature = "mpi")]
pub use frame::{check_len, len_prefix, too_long};
pub use handshake::{MAGIC, PROTOCOL_VERSION};
pub use handshake::{Fingerprint, Hello, MAX_HANDSHAKE, Refusal, Secret, Terms, Welcome, check_hello};
pub use liveness::{Health, Liveness};

/// Default largest frame a peer may send (1 GiB); raise it with
/// [`ClusterBuilder::max_frame`](crate::ClusterBuilder::max_frame) for bigger single values.
pub const DEFAULT_MAX_FRAME: usize = 1 << 30;
