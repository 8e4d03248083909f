//! Frame layout and parsing.

use std::io::Read;

use crate::Pid;
use crate::error::{Error, Result};

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Bytes of the fixed header at the start of every body.
pub const HEADER_LEN: usize = 1 + 4 + 4 + 8 + 8;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Run a function and reply (payload: encoded argument tuple).
    Call = 1,
    /// Run a function, no reply (payload: encoded argument tuple).
    Cast = 2,
    /// Run a function over a batch of argument tuples and reply with one result per item.
    Batch = 3,
    /// A successful result (payload: encoded value).
    Reply = 4,
    /// A failed call (payload: encoded [`crate::cluster::Failure`]).
    Failure = 5,
    /// Lines a worker wrote to stdout or stderr (payload: UTF-8 text).
    Output = 6,
    /// Master to worker: finish and exit; worker to master: goodbye, nothing more follows.
    Shutdown = 7,
    /// "Still here": sent every heartbeat interval in both directions (no payload).
    Heartbeat = 8,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Call,
            2 => Kind::Cast,
            3 => Kind::Batch,
            4 => Kind::Reply,
            5 => Kind::Failure,
            6 => Kind::Output,
            7 => Kind::Shutdown,
            8 => Kind::Heartbeat,
            _ => return None,
        })
    }
}

/// The fixed part of every frame body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the frame carries.
    pub kind: Kind,
    /// Sender pid.
    pub src: Pid,
    /// Final destination pid (the master routes frames between workers).
    pub dst: Pid,
    /// Request id, chosen by the caller, echoed in the reply.
    pub req: u64,
    /// Registered function id (calls) or 0.
    pub func: u64,
}

impl Header {
    /// Writes the header into `out[..HEADER_LEN]`.
    fn write(&self, out: &mut [u8]) {
        out[0] = self.kind as u8;
        out[1..5].copy_from_slice(&self.src.to_le_bytes());
        out[5..9].copy_from_slice(&self.dst.to_le_bytes());
        out[9..17].copy_from_slice(&self.req.to_le_bytes());
        out[17..25].copy_from_slice(&self.func.to_le_bytes());
    }

    /// Parses the header at the start of a frame body.
    pub fn parse(body: &[u8]) -> Result<Header> {
        if body.len() < HEADER_LEN {
            return Err(Error::Protocol(format!("frame of {} bytes is shorter than its {HEADER_LEN}-byte header", body.len())));
        }
        let kind = Kind::from_u8(body[0]).ok_or_else(|| Error::Protocol(format!("unknown frame kind {}", body[0])))?;
        let u32_at = |i: usize| u32::from_le_bytes(body[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
        Ok(Header { kind, src: u32_at(1), dst: u32_at(5), req: u64_at(9), func: u64_at(17) })
    }
}

/// A frame without payload (heartbeats, shutdown), ready to send.
pub fn bare(kind: Kind, src: Pid, dst: Pid) -> Vec<u8> {
    FrameBuf::new(Header { kind, src, dst, req: 0, func: 0 }).finish().expect("a bare frame fits")
}

/// Checks a length prefix against the maximum before any allocation.
pub fn check_len(prefix: [u8; LEN_PREFIX], max: usize) -> Result<usize> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > max {
        return Err(Error::Protocol(format!("frame length {len} exceeds the maximum of {max} bytes")));
    }
    if len < HEADER_LEN {
        return Err(Error::Protocol(format!("frame length {len} is shorter than the {HEADER_LEN}-byte header")));
    }
    Ok(len)
}

/// An outgoing frame being built in place: the prefix and header are reserved up front so
/// the payload is encoded straight into the buffer that is written to the socket.
#[derive(Debug)]
pub struct FrameBuf {
    buf: Vec<u8>,
}

impl FrameBuf {
    /// Starts a frame with `header`; append the payload to [`FrameBuf::payload`].
    pub fn new(header: Header) -> FrameBuf {
        Self::with_capacity(header, 64)
    }

    /// Like [`FrameBuf::new`] with room for `payload` bytes.
    pub fn with_capacity(header: Header, payload: usize) -> FrameBuf {
        let mut buf = Vec::with_capacity(LEN_PREFIX + HEADER_LEN + payload);
        buf.resize(LEN_PREFIX + HEADER_LEN, 0);
        header.write(&mut buf[LEN_PREFIX..]);
        FrameBuf { buf }
    }

    /// The payload area (append to it).
    pub fn payload(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Patches the length prefix and returns the bytes to write. Fails if the body does not
    /// fit the `u32` prefix.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        let body = self.buf.len() - LEN_PREFIX;
        let len = u32::try_from(body)
            .map_err(|_| Error::Protocol(format!("message of {body} bytes is larger than the 4 GiB frame limit")))?;
        self.buf[..LEN_PREFIX].copy_from_slice(&len.to_le_bytes());
        Ok(self.buf)
    }
}

/// A received frame: the body bytes with the parsed header; the payload is `body[HEADER_LEN..]`.
#[derive(Debug)]
pub struct Frame {
    /// Parsed header.
    pub header: Header,
    /// The whole body (header included, so no copy is needed to split it).
    pub body: Vec<u8>,
}

impl Frame {
    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.body[HEADER_LEN..]
    }
}

/// Reads one frame. `Ok(None)` is a clean end of stream between frames; a stream that ends
/// inside a frame, an oversized length or a bad header is an error. Memory grows only as
/// bytes actually arrive, so a lying length prefix cannot make us allocate it.
pub fn read_frame(r: &mut impl Read, max: usize) -> Result<Option<Frame>> {
    let mut prefix = [0u8; LEN_PREFIX];
    let mut got = 0;
    while got < LEN_PREFIX {
        match r.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(Error::Protocol("stream ended inside a length prefix".into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("reading a frame", e)),
        }
    }
    let len = check_len(prefix, max)?;
    // grows as bytes arrive (doubling): a lying length costs at most 1 MiB up front
    let mut body = Vec::with_capacity(len.min(1 << 20));
    let read = r.take(len as u64).read_to_end(&mut body).map_err(|e| Error::io("reading a frame", e))?;
    if read < len {
        return Err(Error::Protocol(format!("stream ended after {read} of {len} frame bytes")));
    }
    let header = Header::parse(&body)?;
    Ok(Some(Frame { header, body }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header { kind: Kind::Call, src: 1, dst: 7, req: 42, func: 0xdead_beef }
    }

    #[test]
    fn frame_round_trip() {
        let mut f = FrameBuf::new(header());
        f.payload().extend_from_slice(b"hello");
        let bytes = f.finish().unwrap();
        let frame = read_frame(&mut &bytes[..], 1024).unwrap().unwrap();
        assert_eq!(frame.header, header());
        assert_eq!(frame.payload(), b"hello");
    }

    #[test]
    fn clean_eof_between_frames_is_none() {
        assert!(read_frame(&mut &[][..], 1024).unwrap().is_none());
    }

    #[test]
    fn oversized_length_is_refused_before_reading() {
        let mut bytes = (2000u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0u8; 10]);
        let err = read_frame(&mut &bytes[..], 1024).unwrap_err().to_string();
        assert!(err.contains("exceeds the maximum of 1024"), "{err}");
    }

    #[test]
    fn lying_length_does_not_allocate_it() {
        // claims 900 MB, sends 30 bytes: an error, and the body vector never grew past 1 MiB
        let mut bytes = (900_000_000u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[1u8; 30]);
        let err = read_frame(&mut &bytes[..], 1 << 30).unwrap_err().to_string();
        assert!(err.contains("stream ended after 30 of 900000000"), "{err}");
    }

    #[test]
    fn truncated_frames_are_errors_at_every_cut() {
        let mut f = FrameBuf::new(header());
        f.payload().extend_from_slice(b"payload");
        let bytes = f.finish().unwrap();
        for cut in 1..bytes.len() {
            assert!(read_frame(&mut &bytes[..cut], 1024).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn garbage_kind_and_short_bodies_are_errors() {
        let mut body = vec![99u8; HEADER_LEN];
        let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
        bytes.append(&mut body);
        assert!(read_frame(&mut &bytes[..], 1024).unwrap_err().to_string().contains("unknown frame kind 99"));
        let short = 3u32.to_le_bytes();
        assert!(read_frame(&mut &short[..], 1024).is_err());
    }
}
