//! Frame layout and parsing.

use std::any::Any;

use clusterman_macros::call_path;
use serde::de::DeserializeOwned;

use crate::buffers;
use crate::codec::{self, BULK_FROM, Bulk, HeldWords};
use crate::error::{Error, Result};
use crate::ids::Pid;

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Bytes of the fixed header at the start of every body.
pub const HEADER_LEN: usize = 1 + 4 + 4 + 8 + 8 + 1;
/// Bytes of a payload before the words it carries as one block: their count.
const WORDS_AT: usize = 8;
/// Where the header keeps [`Header::words`].
const WORDS_BYTE: usize = 25;

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
    /// For a call or reply whose payload is a big vector of plain numbers (a `u64` count,
    /// then the words): the size of one word (1, 2, 4, 8 or 16). The sender writes the words
    /// from where its value holds them, the receiver takes them into a vector of their own
    /// (see [`codec::BULK_FROM`]); 0 for every other frame.
    pub words: u8,
}

impl Header {
    /// Writes the header into `out[..HEADER_LEN]`.
    #[inline]
    fn write(&self, out: &mut [u8]) {
        out[0] = self.kind as u8;
        out[1..5].copy_from_slice(&self.src.to_le_bytes());
        out[5..9].copy_from_slice(&self.dst.to_le_bytes());
        out[9..17].copy_from_slice(&self.req.to_le_bytes());
        out[17..25].copy_from_slice(&self.func.to_le_bytes());
        out[WORDS_BYTE] = self.words;
    }

    /// Parses the header at the start of a frame body.
    pub fn parse(body: &[u8]) -> Result<Header> {
        if body.len() < HEADER_LEN {
            return Err(Error::Protocol(format!("frame of {} bytes is shorter than its {HEADER_LEN}-byte header", body.len())));
        }
        let kind = Kind::from_u8(body[0]).ok_or_else(|| Error::Protocol(format!("unknown frame kind {}", body[0])))?;
        let u32_at = |i: usize| u32::from_le_bytes(body[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
        Ok(Header { kind, src: u32_at(1), dst: u32_at(5), req: u64_at(9), func: u64_at(17), words: body[WORDS_BYTE] })
    }
}

/// Bytes of a body up to a big value's words: header, count.
pub const WORDS_HEAD: usize = HEADER_LEN + WORDS_AT;

/// The word size of a call or reply whose words go apart, from the start of its body (at least
/// [`WORDS_HEAD`] bytes) and the length of the whole body: when its header marks words (see
/// [`Header::words`]), its count of them adds up to the body, and they are big enough to be
/// worth a block of their own. `None` for every other frame.
pub fn words_apart(head: &[u8], body_len: usize) -> Option<usize> {
    let header = Header::parse(head).ok()?;
    let count = u64::from_le_bytes(head.get(HEADER_LEN..WORDS_HEAD)?.try_into().ok()?);
    let size = header.words as usize;
    let data = body_len.checked_sub(WORDS_HEAD)?;
    let adds_up = usize::try_from(count).ok().and_then(|c| c.checked_mul(size)) == Some(data);
    let kind = matches!(header.kind, Kind::Call | Kind::Cast | Kind::Reply);
    (kind && size != 0 && data >= BULK_FROM && adds_up).then_some(size)
}

/// A frame without payload (heartbeats, shutdown), ready to send.
pub fn bare(kind: Kind, src: Pid, dst: Pid) -> Vec<u8> {
    FrameBuf::new(Header { kind, src, dst, req: 0, func: 0, words: 0 }).finish().expect("a bare frame fits")
}

/// The length prefix of a message of `len` bytes. Frames, the hello and the welcome are all
/// prefixed here, and their prefixes read by [`announced_len`].
pub fn len_prefix(len: usize) -> Result<[u8; LEN_PREFIX]> {
    u32::try_from(len).map(u32::to_le_bytes).map_err(|_| Error::Protocol(format!("a message of {len} bytes is larger than the 4 GiB frame limit")))
}

/// `body` with its length prefix in front.
pub fn prefixed(body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(LEN_PREFIX + body.len());
    out.extend_from_slice(&len_prefix(body.len())?);
    out.extend_from_slice(body);
    Ok(out)
}

/// The length a prefix announces, refused when it is above `max`, before anything is
/// allocated for it.
pub fn announced_len(prefix: [u8; LEN_PREFIX], max: usize) -> Result<usize> {
    let len = prefix_len(prefix);
    if len > max {
        return Err(too_long(len, max));
    }
    Ok(len)
}

/// The length a prefix says, unchecked.
fn prefix_len(prefix: [u8; LEN_PREFIX]) -> usize {
    u32::from_le_bytes(prefix) as usize
}

/// The error for a frame of `len` bytes where at most `max` are accepted.
pub fn too_long(len: usize, max: usize) -> Error {
    Error::Protocol(format!("frame length {len} exceeds the maximum of {max} bytes"))
}

/// Checks a frame's length prefix: at most `max`, and room for the header.
pub fn check_len(prefix: [u8; LEN_PREFIX], max: usize) -> Result<usize> {
    let len = announced_len(prefix, max)?;
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
    #[inline]
    pub fn new(header: Header) -> FrameBuf {
        Self::with_capacity(header, NEW_PAYLOAD)
    }

    /// Makes, now, the two buffers a served call uses (the one its frame is read into, the
    /// one its reply is written into) this thread's spares. Made beside the state that
    /// serves the calls, a call's heap lies in two pages, not three: among a thousand workers
    /// each page a call touches costs a TLB miss.
    pub fn spare_call_buffers() {
        buffers::give(Vec::with_capacity(LEN_PREFIX + HEADER_LEN + NEW_PAYLOAD));
        buffers::give(Vec::with_capacity(SMALL_READ));
    }

    /// Like [`FrameBuf::new`] with room for `payload` bytes.
    #[inline(never)]
    #[call_path]
    pub fn with_capacity(header: Header, payload: usize) -> FrameBuf {
        let mut buf = buffers::small(LEN_PREFIX + HEADER_LEN + payload);
        buf.extend_from_slice(&[0; LEN_PREFIX + HEADER_LEN]); // a few stores, not a call to memset
        header.write(&mut buf[LEN_PREFIX..]);
        FrameBuf { buf }
    }

    /// The payload area (append to it).
    pub fn payload(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Patches the length prefix and returns the bytes to write. Fails if the body does not
    /// fit the `u32` prefix.
    #[inline(never)]
    #[call_path]
    pub fn finish(mut self) -> Result<Vec<u8>> {
        let prefix = len_prefix(self.buf.len() - LEN_PREFIX)?;
        self.buf[..LEN_PREFIX].copy_from_slice(&prefix);
        Ok(self.buf)
    }

    /// [`finish`](FrameBuf::finish) for a frame whose payload so far is the count of `words`,
    /// which follow it on the wire from where the value holds them (see [`Header::words`]).
    #[inline]
    pub fn finish_held(mut self, words: Option<HeldWords>) -> Result<Outgoing> {
        let Some(words) = words else { return self.finish().map(Outgoing::from) };
        self.buf[LEN_PREFIX + WORDS_BYTE] = words.element_size() as u8;
        let prefix = len_prefix(self.buf.len() - LEN_PREFIX + words.bytes().len())?;
        self.buf[..LEN_PREFIX].copy_from_slice(&prefix);
        Ok(Outgoing { bytes: self.buf, words: Some(words) })
    }
}

/// A frame to send: its bytes (length prefix included), then, for a big value, its words
/// where they are held (see [`Header::words`]): in the arguments or result themselves, or
/// in the block a forwarded frame was received into.
#[derive(Debug)]
pub struct Outgoing {
    /// The frame up to its words (all of it when it has none).
    pub bytes: Vec<u8>,
    /// The words that follow on the wire.
    pub words: Option<HeldWords>,
}

impl Outgoing {
    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.bytes.len() + self.words.as_ref().map_or(0, |w| w.bytes().len())
    }

    /// The wire bytes from `at` on, up to the end of the bytes or of the words.
    pub fn rest(&self, at: usize) -> &[u8] {
        match at.checked_sub(self.bytes.len()) {
            None => &self.bytes[at..],
            Some(at) => self.words.as_ref().map_or(&[][..], |w| &w.bytes()[at..]),
        }
    }

    /// The wire bytes in one vector (copying the words, if any).
    #[cfg(test)]
    pub fn joined(mut self) -> Vec<u8> {
        if let Some(words) = self.words.take() {
            self.bytes.extend_from_slice(words.bytes());
        }
        std::mem::take(&mut self.bytes)
    }
}

impl From<Vec<u8>> for Outgoing {
    fn from(bytes: Vec<u8>) -> Outgoing {
        Outgoing { bytes, words: None }
    }
}

/// A call frame with room for `hint` payload bytes, which `encode` writes. The other side
/// accepts at most `max_frame` bytes: a larger call fails here, saying how to allow it.
/// `encode` may leave the words of a big argument where they are (see [`Header::words`]).
pub fn call_frame(header: Header, hint: usize, encode: impl FnOnce(&mut Vec<u8>) -> Result<Option<HeldWords>>, max_frame: usize) -> Result<Outgoing> {
    let mut frame = FrameBuf::with_capacity(header, hint);
    let words = encode(frame.payload())?;
    let bytes = frame.finish_held(words)?;
    let len = bytes.len() - LEN_PREFIX;
    if len > max_frame {
        return Err(Error::Protocol(format!("a call of {len} bytes exceeds the cluster's max_frame of {max_frame} bytes; raise ClusterBuilder::max_frame")));
    }
    Ok(bytes)
}

/// A received frame: its bytes (as they came: with the length prefix from a stream, without
/// it from MPI) and the parsed header; a big value's words apart, in a block of their own.
#[derive(Debug)]
pub struct Frame {
    /// Parsed header.
    pub header: Header,
    bytes: Vec<u8>,
    /// Where the body starts in `bytes` (after the prefix, if there is one).
    body_at: usize,
    /// The words of a big value (see [`Header::words`]), which follow `bytes` on the wire.
    /// Boxed: a frame is moved through many calls, and nearly none has words.
    bulk: Option<Box<Bulk>>,
}

impl Frame {
    /// A frame from its body (a message that has its own bounds, such as an MPI message).
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub fn from_body(body: Vec<u8>) -> Result<Frame> {
        Ok(Frame { header: Header::parse(&body)?, bytes: body, body_at: 0, bulk: None })
    }

    /// A frame from its body without its words, and the words (a message and the one
    /// after it, as the MPI transport sends a big value).
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub fn from_parts(head: Vec<u8>, words: Bulk) -> Result<Frame> {
        Ok(Frame { header: Header::parse(&head)?, bytes: head, body_at: 0, bulk: Some(Box::new(words)) })
    }

    /// A frame from its bytes on a stream: length prefix, then body.
    #[inline(never)]
    #[call_path]
    fn from_wire(wire: Vec<u8>, bulk: Option<Bulk>) -> Result<Frame> {
        Ok(Frame { header: Header::parse(&wire[LEN_PREFIX..])?, bytes: wire, body_at: LEN_PREFIX, bulk: bulk.map(Box::new) })
    }

    /// The payload bytes. For a big value whose words came apart ([`Frame::decode`] takes
    /// them), only what precedes them: decode it with [`Frame::decode`].
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.bytes[self.body_at + HEADER_LEN..]
    }

    /// The payload decoded as a `T`; the words of a big value become a vector without a
    /// copy when `T` is one of their type.
    pub fn decode<T: DeserializeOwned + Any>(mut self) -> Result<T> {
        let words = self.bulk.take().map(|b| *b);
        codec::decode_with(self.payload(), words)
    }

    /// The payload, and the words of a big value that came apart (taken: decode both with
    /// `codec::decode_with`).
    #[inline]
    pub fn payload_and_words(&mut self) -> (&[u8], Option<Bulk>) {
        let words = self.bulk.take().map(|b| *b);
        (self.payload(), words)
    }

    /// The frame to send on as it came, prefix included (no copy when it came that way; a
    /// big value's words stay in their block).
    pub fn into_wire(mut self) -> Outgoing {
        let words = self.bulk.take().map(|b| *b);
        let words_len = words.as_ref().map_or(0, Bulk::len);
        let bytes = if self.body_at == LEN_PREFIX {
            std::mem::take(&mut self.bytes)
        } else {
            let mut bytes = Vec::with_capacity(LEN_PREFIX + self.bytes.len());
            bytes.extend_from_slice(&len_prefix(self.bytes.len() + words_len).expect("a received frame's length fits its prefix"));
            bytes.extend_from_slice(&self.bytes);
            bytes
        };
        Outgoing { bytes, words: words.map(HeldWords::from) }
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        buffers::give(std::mem::take(&mut self.bytes)); // its buffer serves the next frame
    }
}

/// Appends `bytes` to `words`, which still miss `missing` bytes in all (room is asked for all
/// of them at once: see `Bulk::room`).
fn append_words(words: &mut Bulk, mut bytes: &[u8], mut missing: usize) {
    while !bytes.is_empty() {
        let (at, room) = words.room(missing);
        let n = room.min(bytes.len());
        // SAFETY: the room holds `n` bytes, copied here.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), at, n);
            words.advance(n);
        }
        bytes = &bytes[n..];
        missing -= n;
    }
}

/// Cuts a byte stream into frames without doing I/O: the caller appends what it read with
/// [`extend`](FrameReader::extend), or reads straight into [`room`](FrameReader::room), and
/// takes the complete frames from [`next_frame`](FrameReader::next_frame). Memory grows
/// only as bytes arrive (at most doubling what is there), so a lying length prefix costs
/// nothing; an idle connection holds at most a few KiB. The words of a big value (see
/// [`Header::words`]) go into a block of their own as they come: its address space is taken
/// at once (at most `max`), its memory still only as they come.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    max: usize,
    /// The words of the frame under way; `buf` then holds its head only.
    words: Option<Bulk>,
    /// Bytes that came after the frame under way, while its words were read.
    after: Vec<u8>,
    /// Small frames are copied out of their read buffer (see [`COPY_OUT_BELOW`]), even one
    /// that fills it alone.
    copies_out: bool,
}

/// Payload bytes a [`FrameBuf::new`] has room for.
const NEW_PAYLOAD: usize = 64;
/// What a read straight into the buffer has room for at least.
const READ_ROOM: usize = 64 * 1024;
/// A buffer for small frames holds this much: calls and replies of a few KiB are read in one.
const SMALL_READ: usize = 4096;
/// A frame this small is copied out of the buffer it was read into: the buffer serves the
/// next reads, and a reply kept until it is fetched holds its own few bytes, not a read
/// buffer (an `everywhere` round keeps a thousand).
const COPY_OUT_BELOW: usize = SMALL_READ / 4;
/// Bytes of a frame up to its words on a stream: prefix, header, count.
const HEAD: usize = LEN_PREFIX + WORDS_HEAD;

impl FrameReader {
    /// A reader that refuses frames longer than `max`.
    pub fn new(max: usize) -> FrameReader {
        FrameReader { buf: Vec::new(), max, words: None, after: Vec::new(), copies_out: true }
    }

    /// A reader whose frames are mostly used at once and let go (a worker's calls): a frame
    /// that fills its read buffer alone takes that buffer, not a copy (no `memcpy`, and one
    /// buffer less in play per call).
    pub fn used_at_once(max: usize) -> FrameReader {
        FrameReader { copies_out: false, ..FrameReader::new(max) }
    }

    /// Bytes of the frame under way that are here.
    fn received(&self) -> usize {
        self.buf.len() + self.words.as_ref().map_or(0, Bulk::len)
    }

    /// Bytes the frame under way still needs; 0 while its length is not known yet.
    pub fn missing(&self) -> usize {
        match self.buf.get(..LEN_PREFIX) {
            Some(prefix) => {
                let len = prefix_len(prefix.try_into().expect("4 bytes"));
                (LEN_PREFIX + len.min(self.max)).saturating_sub(self.received())
            }
            None => 0,
        }
    }

    /// Whether the next read should go straight into [`room`](FrameReader::room) rather than
    /// through a scratch buffer of `scratch` bytes: inside a big frame.
    pub fn reads_direct(&self, scratch: usize) -> bool {
        self.words.is_some() || self.missing() > scratch
    }

    /// Where to read the rest of a big frame straight into, and how many bytes may go there
    /// (at most what the frame still needs). Room is reserved as bytes arrive: at most as
    /// much again as is already there, and at least a few KiB. Call
    /// [`advance`](FrameReader::advance) with what was read.
    pub fn room(&mut self) -> (*mut u8, usize) {
        let missing = self.missing();
        if let Some(words) = &mut self.words {
            let (at, room) = words.room_ahead(missing);
            return (at, room.min(missing));
        }
        if self.buf.capacity() - self.buf.len() < missing {
            // a kept buffer that holds the whole frame is no new memory: read into it
            if let Some(mut kept) = buffers::take(self.buf.len() + missing) {
                kept.extend_from_slice(&self.buf);
                self.buf = kept;
            }
        }
        let want = missing.min(self.buf.len().max(READ_ROOM)).max(READ_ROOM);
        self.buf.reserve(want);
        let room = (self.buf.capacity() - self.buf.len()).min(missing.max(1));
        // SAFETY: `len` is inside the allocation.
        (unsafe { self.buf.as_mut_ptr().add(self.buf.len()) }, room)
    }

    /// Where the next read goes: the rest of a big frame straight into its
    /// [`room`](FrameReader::room), small frames into the room left in their buffer (no
    /// scratch buffer, no copy). `None` with too little room left: read into a scratch
    /// buffer of `scratch` bytes and [`extend`](FrameReader::extend). Call
    /// [`advance`](FrameReader::advance) with what was read.
    #[inline]
    pub fn read_room(&mut self, scratch: usize) -> Option<(*mut u8, usize)> {
        if self.reads_direct(scratch) { Some(self.room()) } else { self.spare_room() }
    }

    /// Room left in the buffer of the small frames under way (`None` inside a big value's
    /// words, or with too little room left).
    #[inline]
    fn spare_room(&mut self) -> Option<(*mut u8, usize)> {
        if self.words.is_some() {
            return None;
        }
        if self.buf.capacity() == 0 {
            self.buf = buffers::small(SMALL_READ); // the last frame's buffer, mostly
        }
        let room = self.buf.capacity() - self.buf.len();
        // SAFETY: `len` is inside the allocation.
        (room >= SMALL_READ / 4).then(|| (unsafe { self.buf.as_mut_ptr().add(self.buf.len()) }, room))
    }

    /// Gives back the buffer if no frame is under way (a connection that goes idle holds none).
    pub fn release_idle(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 && self.words.is_none() {
            buffers::give(std::mem::take(&mut self.buf));
        }
    }

    /// Counts `n` bytes read into [`room`](FrameReader::room) or
    /// [`read_room`](FrameReader::read_room).
    ///
    /// # Safety
    /// The `n` bytes at the room's start must have been written, `n` at most its size.
    #[inline]
    pub unsafe fn advance(&mut self, n: usize) {
        match &mut self.words {
            // SAFETY: as the caller promises.
            Some(words) => unsafe { words.advance(n) },
            None => {
                // SAFETY: as the caller promises: written, inside the capacity.
                unsafe { self.buf.set_len(self.buf.len() + n) };
                self.split_words();
            }
        }
    }

    /// Appends bytes read elsewhere (a scratch buffer).
    pub fn extend(&mut self, bytes: &[u8]) {
        let missing = self.missing();
        match &mut self.words {
            Some(words) => {
                let (now, later) = bytes.split_at(bytes.len().min(missing));
                append_words(words, now, missing);
                self.after.extend_from_slice(later);
            }
            None => {
                self.buf.extend_from_slice(bytes);
                self.split_words();
            }
        }
    }

    /// Once the head of a big value is here, moves its words into a block of their own (see
    /// [`Header::words`]); anything that does not add up stays as it is, for `next_frame`.
    #[inline(never)]
    #[call_path]
    fn split_words(&mut self) {
        if self.words.is_some() || self.buf.len() < HEAD {
            return;
        }
        let Ok(len) = check_len(self.buf[..LEN_PREFIX].try_into().expect("4 bytes"), self.max) else { return };
        let Some(mut words) = words_apart(&self.buf[LEN_PREFIX..HEAD], len).and_then(Bulk::new) else { return };
        let data = LEN_PREFIX + len - HEAD;
        let present = (self.buf.len() - HEAD).min(data); // the rest is the next frames'
        append_words(&mut words, &self.buf[HEAD..HEAD + present], data);
        self.after.extend_from_slice(&self.buf[HEAD + present..]);
        self.buf.truncate(HEAD);
        self.words = Some(words);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. An oversized length or
    /// a bad header is an error (the stream cannot be trusted after it).
    #[inline(never)]
    #[call_path]
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        if self.words.is_some() {
            if self.missing() > 0 {
                return Ok(None);
            }
            let head = std::mem::replace(&mut self.buf, std::mem::take(&mut self.after));
            let frame = Frame::from_wire(head, self.words.take());
            self.split_words();
            return frame.map(Some);
        }
        let Some(prefix) = self.buf.get(..LEN_PREFIX) else { return Ok(None) };
        let len = check_len(prefix.try_into().expect("4 bytes"), self.max)?;
        let end = LEN_PREFIX + len;
        if self.buf.len() < end {
            return Ok(None);
        }
        let alone = self.buf.len() == end && !self.copies_out;
        let wire = if end <= COPY_OUT_BELOW && self.buf.capacity() >= SMALL_READ && !alone {
            let mut wire = buffers::small(end);
            wire.extend_from_slice(&self.buf[..end]);
            self.buf.drain(..end); // what follows moves up
            wire
        } else if self.buf.len() == end {
            std::mem::take(&mut self.buf) // the only case for big frames
        } else {
            let rest = self.buf.split_off(end);
            std::mem::replace(&mut self.buf, rest)
        };
        self.split_words();
        Frame::from_wire(wire, None).map(Some)
    }

    /// True when a whole frame (or a length already refused) is buffered: no need to read.
    pub fn has_frame(&self) -> bool {
        self.buf.len() >= LEN_PREFIX && self.missing() == 0
    }

    /// Bytes received that are not part of a complete frame yet.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.received() + self.after.len()
    }

    /// The stream ended: fine between frames, an error inside one.
    pub fn end_of_stream(&self) -> Result<()> {
        match self.received() + self.after.len() {
            0 => Ok(()),
            n => Err(Error::Protocol(format!("the connection closed inside a frame ({n} bytes of it had come)"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header { kind: Kind::Call, src: 1, dst: 7, req: 42, func: 0xdead_beef, words: 0 }
    }

    /// The first frame of a whole stream, as a connection's reader would see it.
    fn read_frame(stream: &[u8], max: usize) -> Result<Option<Frame>> {
        let mut reader = FrameReader::new(max);
        reader.extend(stream);
        match reader.next_frame()? {
            Some(frame) => Ok(Some(frame)),
            None => reader.end_of_stream().map(|()| None),
        }
    }

    #[test]
    fn frame_round_trip() {
        let mut f = FrameBuf::new(header());
        f.payload().extend_from_slice(b"hello");
        let bytes = f.finish().unwrap();
        let frame = read_frame(&bytes, 1024).unwrap().unwrap();
        assert_eq!(frame.header, header());
        assert_eq!(frame.payload(), b"hello");
    }

    #[test]
    fn a_small_frame_alone_in_its_read_buffer_takes_it_where_frames_are_used_at_once() {
        let bytes = FrameBuf::new(header()).finish().unwrap();
        for (mut reader, copied) in [(FrameReader::new(1024), true), (FrameReader::used_at_once(1024), false)] {
            let (at, room) = reader.read_room(1 << 16).expect("room for a small frame");
            assert!(room >= bytes.len());
            // SAFETY: `room` bytes at `at` are the reader's; `bytes` fits.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), at, bytes.len());
                reader.advance(bytes.len());
            }
            let frame = reader.next_frame().unwrap().unwrap();
            assert_eq!(frame.header, header());
            assert_eq!(frame.bytes.as_ptr() != at.cast_const(), copied, "copied out: {copied}");
        }
    }

    #[test]
    fn clean_eof_between_frames_is_none() {
        assert!(read_frame(&[], 1024).unwrap().is_none());
    }

    #[test]
    fn oversized_length_is_refused_before_reading() {
        let mut bytes = (2000u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0u8; 10]);
        let err = read_frame(&bytes, 1024).unwrap_err().to_string();
        assert!(err.contains("exceeds the maximum of 1024"), "{err}");
    }

    #[test]
    fn a_stream_that_ends_inside_a_lying_length_is_an_error() {
        // claims 900 MB, sends 30 bytes: an error at the end of the stream
        let mut bytes = (900_000_000u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[1u8; 30]);
        let err = read_frame(&bytes, 1 << 30).unwrap_err().to_string();
        assert!(err.contains("closed inside a frame (34 bytes of it had come)"), "{err}");
    }

    #[test]
    fn truncated_frames_are_errors_at_every_cut() {
        let mut f = FrameBuf::new(header());
        f.payload().extend_from_slice(b"payload");
        let bytes = f.finish().unwrap();
        for cut in 1..bytes.len() {
            assert!(read_frame(&bytes[..cut], 1024).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn the_reader_cuts_any_split_of_a_stream_into_the_same_frames() {
        let frames: Vec<Vec<u8>> = (0..5u8)
            .map(|i| {
                let mut f = FrameBuf::new(Header { req: i as u64, ..header() });
                f.payload().extend(std::iter::repeat_n(i, 1000 * i as usize));
                f.finish().unwrap()
            })
            .collect();
        let stream = frames.concat();
        for chunk in [1, 3, 7, 64, 1000, stream.len()] {
            let mut reader = FrameReader::new(1 << 20);
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                reader.extend(piece);
                while let Some(frame) = reader.next_frame().unwrap() {
                    got.push(frame);
                }
            }
            assert_eq!(reader.pending(), 0);
            assert_eq!(got.len(), 5, "chunks of {chunk}");
            for (i, frame) in got.into_iter().enumerate() {
                assert_eq!(frame.header.req, i as u64);
                assert_eq!(frame.payload().len(), 1000 * i);
                assert_eq!(frame.into_wire().joined(), frames[i], "forwarded as received");
            }
        }
    }

    #[test]
    fn small_frames_are_copied_out_of_the_read_buffer_which_stays() {
        let small = FrameBuf::new(Header { req: 1, ..header() }).finish().unwrap();
        let mut stream = small.clone();
        stream.extend_from_slice(&small);
        let mut reader = FrameReader::new(1 << 20);
        let (at, room) = reader.read_room(0).expect("room for small frames");
        assert!(room >= SMALL_READ / 4);
        // SAFETY: `room` bytes at `at` are the reader's; the stream fits in them.
        unsafe {
            std::ptr::copy_nonoverlapping(stream.as_ptr(), at, stream.len());
            reader.advance(stream.len());
        }
        let buffer = reader.buf.as_ptr();
        let first = reader.next_frame().unwrap().expect("a whole frame");
        assert!(first.bytes.capacity() < SMALL_READ, "a reply kept until fetched holds its own bytes, not a read buffer");
        assert_eq!((reader.buf.as_ptr(), reader.buf.len()), (buffer, small.len()), "the buffer stays for the next reads, the next frame moved up");
        let second = reader.next_frame().unwrap().expect("the next frame");
        assert_eq!((first.header.req, second.into_wire().joined()), (1, small));
    }

    #[test]
    fn the_reader_refuses_a_lying_length_without_reserving_it() {
        let mut reader = FrameReader::new(1 << 30);
        reader.extend(&(900_000_000u32).to_le_bytes());
        reader.extend(&[1u8; 30]);
        assert!(reader.next_frame().unwrap().is_none(), "waits for the rest");
        assert_eq!(reader.missing(), 900_000_000 - 30);
        let (_, room) = reader.room();
        assert!(room <= 1 << 17, "reserved {room} bytes for 34 present");
        let mut reader = FrameReader::new(1024);
        reader.extend(&(2000u32).to_le_bytes());
        assert!(reader.next_frame().unwrap_err().to_string().contains("exceeds the maximum of 1024"));
    }

    /// A reply carrying `values` as one block of words, marked as such when `mark`.
    fn reply_of(values: &Vec<f64>, mark: bool) -> Vec<u8> {
        let mut f = FrameBuf::new(Header { kind: Kind::Reply, src: 2, dst: 1, req: 5, func: 0, words: 0 });
        if !mark {
            codec::encode_value_into(values, f.payload()).unwrap();
            return f.finish().unwrap();
        }
        let words = codec::encode_held_into(values.clone(), f.payload(), 0).unwrap();
        assert!(words.is_some(), "a Vec<f64> is held apart");
        f.finish_held(words).unwrap().joined()
    }

    #[test]
    fn a_big_replys_words_come_apart_and_become_the_vector_however_the_stream_is_cut() {
        let values: Vec<f64> = (0..300_000).map(|i| i as f64 * 0.5).collect(); // 2.4 MB of words
        let reply = reply_of(&values, true);
        let small = FrameBuf::new(Header { kind: Kind::Heartbeat, src: 2, dst: 1, req: 0, func: 0, words: 0 }).finish().unwrap();
        let stream = [small.clone(), reply.clone(), small.clone(), reply.clone()].concat();
        for chunk in [7, 4096, 65_536, 1 << 20, stream.len()] {
            let mut reader = FrameReader::new(1 << 30);
            let mut got = Vec::new();
            let mut at = 0;
            while at < stream.len() {
                if reader.reads_direct(65_536) {
                    // as a socket would: straight into the room, at most what it offers
                    let (ptr, room) = reader.room();
                    let n = room.min(chunk).min(stream.len() - at);
                    // SAFETY: `n` bytes fit the room; they are written before `advance`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(stream[at..].as_ptr(), ptr, n);
                        reader.advance(n);
                    }
                    at += n;
                } else {
                    let n = chunk.min(stream.len() - at);
                    reader.extend(&stream[at..at + n]);
                    at += n;
                }
                while let Some(frame) = reader.next_frame().unwrap() {
                    got.push(frame);
                }
            }
            assert_eq!(reader.pending(), 0, "chunks of {chunk}");
            let kinds: Vec<Kind> = got.iter().map(|f| f.header.kind).collect();
            assert_eq!(kinds, [Kind::Heartbeat, Kind::Reply, Kind::Heartbeat, Kind::Reply], "chunks of {chunk}");
            let mut replies = got.into_iter().filter(|f| f.header.kind == Kind::Reply);
            let first = replies.next().unwrap();
            assert!(first.bulk.is_some(), "the words came apart (chunks of {chunk})");
            assert_eq!(first.into_wire().joined(), reply, "forwarded as received");
            assert_eq!(replies.next().unwrap().decode::<Vec<f64>>().unwrap(), values, "chunks of {chunk}");
        }
    }

    #[test]
    fn words_that_do_not_add_up_stay_in_the_frame() {
        let values: Vec<f64> = vec![1.5; 200_000];
        let unmarked = reply_of(&values, false);
        let frame = read_frame(&unmarked, 1 << 30).unwrap().unwrap();
        assert!(frame.bulk.is_none());
        assert_eq!(frame.decode::<Vec<f64>>().unwrap(), values);
        // a count that disagrees with the length: no block, and decoding says what is wrong
        let mut lying = reply_of(&values, true);
        lying[HEAD - WORDS_AT..HEAD].copy_from_slice(&7u64.to_le_bytes());
        let frame = read_frame(&lying, 1 << 30).unwrap().unwrap();
        assert!(frame.bulk.is_none());
        assert!(frame.decode::<Vec<f64>>().is_err());
        // decoded as another type than its words: joined again, decoded the usual way
        let frame = read_frame(&reply_of(&values, true), 1 << 30).unwrap().unwrap();
        assert!(frame.bulk.is_some());
        assert_eq!(frame.decode::<Vec<u64>>().unwrap(), vec![1.5f64.to_bits(); 200_000]);
        let frame = read_frame(&reply_of(&values, true), 1 << 30).unwrap().unwrap();
        assert!(frame.decode::<Vec<u32>>().unwrap_err().to_string().contains("elements of 8 bytes"));
    }

    #[test]
    fn garbage_kind_and_short_bodies_are_errors() {
        let mut body = vec![99u8; HEADER_LEN];
        let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
        bytes.append(&mut body);
        assert!(read_frame(&bytes, 1024).unwrap_err().to_string().contains("unknown frame kind 99"));
        let short = 3u32.to_le_bytes();
        assert!(read_frame(&short, 1024).is_err());
    }
}
