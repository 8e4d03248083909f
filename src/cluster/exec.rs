//! Running an incoming call: the same on master and workers.

use clusterman_macros::call_path;

use crate::ids::Pid;
use crate::codec;
use crate::error::RemoteError;
use crate::protocol::{Frame, FrameBuf, Header, Kind, Outgoing};
use crate::registry;

use crate::protocol::failure::Failure;

/// Runs a `Call`, `Cast` or `Batch` frame addressed to `me`. Returns the reply frame to send
/// back, or `None` for a `Cast` (whose failure is logged here, as nobody waits for it).
#[inline]
#[call_path]
pub(crate) fn execute(me: Pid, frame: &mut Frame) -> Option<Outgoing> {
    let h = frame.header;
    let mut out = FrameBuf::new(Header { kind: Kind::Reply, src: me, dst: h.src, req: h.req, func: 0, words: 0 });
    let ran = match h.kind {
        Kind::Batch => registry::lookup(h.func).map(|entry| (entry.batch)(frame.payload(), out.payload()).map(|()| None)),
        _ => registry::lookup_call(h.func).map(|call| {
            let (payload, words) = frame.payload_and_words();
            call(payload, words, out.payload())
        }),
    };
    let result = match ran {
        None => Err(Failure::UnknownFunction { pid: me, id: h.func }),
        Some(ran) => ran.map_err(|e| Failure::Remote(RemoteError { pid: me, function: function_name(h.func), message: e.message, location: e.location })),
    };
    if h.kind == Kind::Cast {
        if let Err(f) = result {
            tracing::warn!(pid = me, "remote_do from pid {} failed: {}", h.src, crate::error::Error::from(f));
        }
        return None;
    }
    let failure = match result {
        Ok(words) => match out.finish_held(words) {
            Ok(reply) => return Some(reply),
            Err(e) => Failure::Remote(RemoteError {
                pid: me,
                function: function_name(h.func),
                message: e.to_string(),
                location: None,
            }),
        },
        Err(f) => f,
    };
    Some(failure_reply(me, h, &failure))
}

/// The reply to call `h` that failed: apart from [`execute`], off a call's way.
#[cold]
#[inline(never)]
fn failure_reply(me: Pid, h: Header, failure: &Failure) -> Outgoing {
    let mut out = FrameBuf::new(Header { kind: Kind::Failure, src: me, dst: h.src, req: h.req, func: 0, words: 0 });
    codec::encode_into(failure, out.payload()).expect("failures always encode");
    out.finish().expect("failure frames are small").into()
}

/// The registered name of function `id` (`?` if unknown), for error messages.
pub(crate) fn function_name(id: u64) -> String {
    registry::lookup(id).map_or("?", |e| e.name).to_string()
}
