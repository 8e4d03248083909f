//! TCP connections: a sender that never blocks on its peer, a reader for a thread that
//! blocks on its connection, and the worker side of the handshake (dial, hello, welcome) with
//! one deadline for all of it.
//!
//! A frame is written straight into the socket when it is free (`MSG_DONTWAIT`, no thread
//! switch); what the socket cannot take at once waits in a bounded queue that the I/O runtime
//! drains as the peer reads. A connection is read either by the I/O runtime (the master's:
//! no thread per worker, see [`reading`](super::reading)) or by a thread of its own,
//! blocking (a worker's, whose serving thread reads its master's socket directly, which makes
//! a call cheapest).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use clusterman_macros::call_path;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::buffers;
use crate::error::{Error, Result};
use crate::protocol::{Frame, FrameReader, Hello, LEN_PREFIX, MAX_HANDSHAKE, Outgoing, Welcome, announced_len};
use crate::sys;

use super::{FrameOut, Out, io as runtime};

/// Bytes that may wait for a peer that does not read, beyond the frame being written: past
/// this, sends fail at once (`WouldBlock`) instead of growing memory without bound.
pub(crate) const SEND_QUEUE_LIMIT: usize = 64 << 20;

/// Bytes a corked queue may hold before a send writes them out anyway.
const CORK_BYTES: usize = 64 << 10;

/// Slices one write takes at most (a frame is one or two: its bytes, a big value's words).
const WRITE_PARTS: usize = 16;

/// The sending half of a TCP connection, shared as an `Arc<dyn FrameOut>`: a send goes
/// straight to it, and finds what it checks (the lock, the queue) in the lines after the
/// `Arc`'s counts: among a thousand workers each send finds them cold.
#[repr(C)]
pub(crate) struct TcpOut {
    state: Mutex<Queue>,
    /// The socket's descriptor, at hand (no hop through the socket's own structures).
    fd: i32,
    /// Signalled when queued bytes drain (for senders that wait for room).
    room: Condvar,
    /// The socket, kept open while this sends on it.
    socket: Arc<TcpStream>,
    /// Itself, for the clone that a cork or a drain keeps.
    me: Weak<TcpOut>,
}

#[derive(Default)]
#[repr(C)] // what every send checks first
struct Queue {
    /// Why the connection can take no more (boxed: the queue a send checks stays small).
    failed: Option<Box<(ErrorKind, String)>>,
    /// The I/O runtime is draining the queue.
    draining: bool,
    frames: VecDeque<Outgoing>,
    /// Bytes of the front frame already written.
    written: usize,
    /// Bytes waiting, all frames.
    bytes: usize,
}

impl Queue {
    /// Writes queued bytes until done or the socket is full, several frames per call (a
    /// big value's words from where it holds them). `Ok(true)`: nothing left.
    fn write_out(&mut self, fd: i32) -> io::Result<bool> {
        while !self.frames.is_empty() {
            let mut parts = [io::IoSlice::new(&[]); WRITE_PARTS]; // on the stack: no allocation per send
            let (mut count, mut at) = (0, self.written);
            'gather: for frame in &self.frames {
                while at < frame.len() {
                    if count == WRITE_PARTS {
                        break 'gather;
                    }
                    let part = frame.rest(at);
                    at += part.len();
                    parts[count] = io::IoSlice::new(part);
                    count += 1;
                }
                at = 0;
            }
            let parts = &parts[..count];
            let offered: usize = parts.iter().map(|p| p.len()).sum();
            let sent = sys::send_vectored_nonblocking(fd, parts)?;
            self.bytes -= sent;
            let mut n = sent;
            while let Some(front) = self.frames.front().filter(|_| n > 0) {
                let left = front.len() - self.written;
                if n < left {
                    self.written += n;
                    break;
                }
                n -= left;
                self.written = 0;
                if let Some(done) = self.frames.pop_front() {
                    buffers::give(done.bytes);
                }
            }
            if sent < offered {
                return Ok(false); // the socket is full
            }
        }
        Ok(true)
    }
}

impl TcpOut {
    /// The sender of a connection that a thread of its own or the I/O runtime reads.
    pub(crate) fn over(stream: impl Into<Arc<TcpStream>>) -> Out {
        let socket = stream.into();
        let fd = socket.as_raw_fd();
        Out::Tcp(Arc::new_cyclic(|me| TcpOut { state: Mutex::default(), fd, room: Condvar::new(), socket, me: me.clone() }))
    }

    /// Itself, shared (it is only ever used through its `Arc`).
    fn shared(&self) -> Option<Arc<TcpOut>> {
        self.me.upgrade()
    }
}

thread_local! {
    /// Whether this thread runs [`corked`] (a flag of its own: asked on every send, and
    /// cheaper to read than the list, which needs a destructor).
    static CORKING: Cell<bool> = const { Cell::new(false) };
    /// While it does: the connections whose queues hold frames it sent.
    static CORKED: RefCell<Vec<Arc<TcpOut>>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f`; the frames it sends over TCP wait in their queues until it returns (or waits for
/// something, see [`flush_corked`]), then go several to a write: one system call, and one
/// wake-up of the peer, for a burst of small frames.
pub(crate) fn corked<R>(f: impl FnOnce() -> R) -> R {
    if !cork() {
        return f(); // already corked further up
    }
    let result = f();
    uncork();
    result
}

/// Corks this thread's sends from now on, as inside [`corked`]; false if it already was.
pub(crate) fn cork() -> bool {
    !CORKING.replace(true)
}

/// Writes what this thread's cork holds and ends the cork (nothing if not corked).
pub(crate) fn uncork() {
    flush_corked();
    CORKING.set(false);
}

/// Writes what this thread's cork holds now: a thread about to wait for a reply must have
/// sent what it asked.
#[inline(always)]
pub(crate) fn flush_corked() {
    if CORKING.get() {
        write_corked(); // apart: a serving worker's every call passes here, uncorked
    }
}

#[inline(never)]
fn write_corked() {
    for out in CORKED.with_borrow_mut(std::mem::take) {
        let mut q = out.state.lock().expect("send queue lock");
        if !q.draining && q.failed.is_none() {
            let _ = write_now(&out, &mut q); // a failure ends the connection, which its reader reports
        }
    }
}

/// Whether this thread is corked; if so, `out` is written when it uncorks. Tasks of the I/O
/// runtime never cork, even on a corked thread that drives it while it waits.
#[call_path]
fn corks(out: &TcpOut) -> bool {
    if !CORKING.get() || !runtime::can_drive() {
        return false;
    }
    CORKED.with_borrow_mut(|corked| {
        if !corked.iter().any(|o| std::ptr::eq(&**o, out)) {
            corked.extend(out.shared());
        }
    });
    true
}

/// Writes the queue now; what the socket does not take, the I/O runtime writes as it drains.
fn write_now(out: &TcpOut, q: &mut Queue) -> io::Result<()> {
    match q.write_out(out.fd) {
        Ok(true) => Ok(()),
        Ok(false) => {
            drain_later(out, q);
            Ok(())
        }
        Err(e) => {
            fail(out, q, &e);
            Err(e)
        }
    }
}

/// Writes `frame`, with nothing queued before it, straight from where it lies; what the
/// socket does not take waits in the queue, which the I/O runtime drains.
fn write_alone(out: &TcpOut, q: &mut Queue, frame: Outgoing) -> io::Result<()> {
    let parts = [io::IoSlice::new(frame.rest(0)), io::IoSlice::new(frame.rest(frame.bytes.len()))];
    let sent = sys::send_vectored_nonblocking(out.fd, &parts).inspect_err(|e| fail(out, q, e))?;
    if sent == frame.len() {
        buffers::give(frame.bytes);
        return Ok(());
    }
    q.written = sent;
    q.bytes = frame.len() - sent;
    q.frames.push_back(frame);
    drain_later(out, q);
    Ok(())
}

/// The socket is full: the I/O runtime writes the queue as the peer reads.
fn drain_later(out: &TcpOut, q: &mut Queue) {
    if let Some(out) = out.shared() {
        q.draining = true;
        runtime::spawn(drain(out));
    }
}

fn closed_error(failed: &(ErrorKind, String)) -> io::Error {
    io::Error::new(failed.0, failed.1.clone())
}

impl FrameOut for TcpOut {
    #[call_path]
    fn send(&self, frame: Outgoing, patience: Option<Duration>) -> io::Result<()> {
        let out = self;
        let mut q = out.state.lock().expect("send queue lock");
        let mut wait_until = None;
        loop {
            if let Some(failed) = &q.failed {
                return Err(closed_error(failed));
            }
            if q.frames.is_empty() || q.bytes + frame.len() <= SEND_QUEUE_LIMIT {
                break;
            }
            let deadline = *wait_until.get_or_insert_with(|| patience.map(|p| Instant::now() + p));
            let Some(deadline) = deadline.filter(|d| *d > Instant::now()) else {
                return Err(io::Error::new(ErrorKind::WouldBlock, format!("{} MiB already wait for a peer that is not reading", q.bytes >> 20)));
            };
            q = out.room.wait_timeout(q, deadline - Instant::now()).expect("send queue lock").0;
        }
        if q.frames.is_empty() && !q.draining && !(frame.len() <= CORK_BYTES && corks(out)) {
            return write_alone(out, &mut q, frame); // the common case: the queue stays untouched
        }
        q.bytes += frame.len();
        q.frames.push_back(frame);
        if q.draining || (q.bytes <= CORK_BYTES && corks(self)) {
            return Ok(()); // the I/O runtime, or the end of `corked`, sends it in turn
        }
        write_now(self, &mut q)
    }

    fn close(&self) {
        let out = self;
        let mut q = out.state.lock().expect("send queue lock");
        q.failed.get_or_insert_with(|| Box::new((ErrorKind::NotConnected, "the connection was closed".into())));
        q.frames.clear();
        q.bytes = 0;
        out.room.notify_all();
        sys::shutdown(out.fd);
    }

    fn pulse(&self) -> Option<sys::TcpPulse> {
        sys::tcp_pulse(self.fd)
    }
}

/// Marks the connection failed and shuts it down, so its reader sees the end too.
fn fail(out: &TcpOut, q: &mut Queue, e: &io::Error) {
    q.failed.get_or_insert_with(|| Box::new((e.kind(), e.to_string())));
    q.frames.clear();
    q.bytes = 0;
    out.room.notify_all();
    sys::shutdown(out.fd);
}

/// Runs on the I/O runtime: writes the queue out as the socket drains.
async fn drain(out: Arc<TcpOut>) {
    match out.socket.as_fd().try_clone_to_owned() {
        Ok(fd) => drain_through(&out, fd).await,
        Err(e) => fail(&out, &mut out.state.lock().expect("send queue lock"), &e),
    }
}

/// Drains a connection through a duplicate of its descriptor, registered with the I/O
/// runtime while the queue drains.
async fn drain_through(out: &TcpOut, fd: OwnedFd) {
    // SAFETY: `fd` is our own duplicate of the socket, owned by the AsyncFd and closed only
    // when it drops.
    let ready = match unsafe { AsyncFd::register_with_interest(fd, Interest::WRITABLE) } {
        Ok(r) => r,
        Err(e) => return fail(out, &mut out.state.lock().expect("send queue lock"), &e.into()),
    };
    loop {
        let mut guard = match ready.writable().await {
            Ok(g) => g,
            Err(e) => return fail(out, &mut out.state.lock().expect("send queue lock"), &e),
        };
        let mut q = out.state.lock().expect("send queue lock");
        let before = q.bytes;
        match q.write_out(out.fd) {
            Ok(true) => {
                q.draining = false;
                out.room.notify_all();
                return;
            }
            Ok(false) => {
                if q.bytes < before {
                    out.room.notify_all();
                }
                guard.clear_ready();
            }
            Err(e) => return fail(out, &mut q, &e),
        }
    }
}

/// Frames from a connection that a thread of its own reads, blocking: the same
/// [`FrameReader`] as the event loop's, read into straight (a scratch buffer takes a read
/// only when the reader's buffer is nearly full).
pub(crate) struct FrameStream {
    stream: TcpStream,
    frames: FrameReader,
    scratch: Box<[u8]>,
}

impl FrameStream {
    /// Reads `stream`, refusing frames longer than `max_frame`.
    pub(crate) fn new(stream: TcpStream, max_frame: usize) -> FrameStream {
        FrameStream { stream, frames: FrameReader::used_at_once(max_frame), scratch: vec![0; SCRATCH].into_boxed_slice() }
    }

    /// True when a whole frame is already read and waiting: the next `next` needs no system call.
    pub(crate) fn has_frame(&self) -> bool {
        self.frames.has_frame()
    }

    /// Waits until there is something to read or `left` has passed; false at the timeout.
    pub(crate) fn wait_readable_for(&self, left: Duration) -> bool {
        self.frames.has_frame() || sys::wait_readable_for(self.stream.as_raw_fd(), left)
    }

    /// The next frame, blocking; `Ok(None)` when the stream ended between frames.
    #[inline]
    pub(crate) fn next(&mut self) -> Result<Option<Frame>> {
        loop {
            if let Some(frame) = self.frames.next_frame()? {
                return Ok(Some(frame));
            }
            let read = match self.frames.read_room(SCRATCH) {
                // SAFETY: the reader's room holds `room` bytes; `advance` counts what came.
                Some((at, room)) => unsafe { sys::recv_into(self.stream.as_raw_fd(), at, room, true).inspect(|&n| self.frames.advance(n)) },
                None => self.stream.read(&mut self.scratch).inspect(|&n| self.frames.extend(&self.scratch[..n])),
            };
            match read {
                Ok(0) => return self.frames.end_of_stream().map(|()| None),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("reading a frame", e)),
            }
        }
    }
}

/// Bytes a blocking stream reads at once into its scratch buffer.
const SCRATCH: usize = 64 * 1024;

/// How long a refused connection is tried again (a master still binding on a slow node);
/// after that, refused means nobody listens there.
const REFUSED_FOR: Duration = Duration::from_secs(10);

/// Connects to `address` and shakes hands: sends `hello`, returns the stream and the
/// welcome. One deadline covers it all; a master that is still starting (connection refused,
/// for a few seconds) or that dropped us while busy with other handshakes (reset, end of
/// stream) is tried again.
pub(crate) fn dial(address: &str, hello: &Hello, deadline: Instant) -> io::Result<(TcpStream, Welcome)> {
    let message = hello.encode();
    let refused_until = Instant::now() + REFUSED_FOR;
    let mut pause = Duration::from_millis(20);
    loop {
        let e = match try_dial(address, &message, deadline) {
            Ok(done) => return Ok(done),
            Err(e) => e,
        };
        let retry = match e.kind() {
            ErrorKind::ConnectionRefused => Instant::now() < refused_until,
            ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe => true,
            _ => false,
        };
        if !retry || Instant::now() + pause >= deadline {
            return Err(e);
        }
        tracing::debug!("dialling {address}: {e}; trying again");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

fn try_dial(address: &str, message: &[u8], deadline: Instant) -> io::Result<(TcpStream, Welcome)> {
    let mut last = io::Error::new(ErrorKind::NotFound, format!("{address} resolves to no address"));
    for addr in address.to_socket_addrs()? {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let mut stream = match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => s,
            Err(e) => {
                last = e;
                continue;
            }
        };
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(left))?;
        stream.write_all(message)?;
        stream.set_write_timeout(None)?;
        let body = read_prefixed(&mut stream, MAX_HANDSHAKE, deadline)?;
        let welcome = Welcome::decode(&body).map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
        return Ok((stream, welcome));
    }
    Err(last)
}

/// Reads one `u32`-length-prefixed message of at most `max` bytes, all of it before
/// `deadline`. Memory grows only as bytes arrive.
pub(crate) fn read_prefixed(stream: &mut TcpStream, max: usize, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut prefix = [0u8; LEN_PREFIX];
    read_until(stream, &mut prefix, deadline)?;
    let len = announced_len(prefix, max).map_err(|e| io::Error::new(ErrorKind::InvalidData, e.to_string()))?;
    let mut body = Vec::new();
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let want = (len - body.len()).min(chunk.len());
        read_until(stream, &mut chunk[..want], deadline)?;
        body.extend_from_slice(&chunk[..want]);
    }
    Ok(body)
}

fn read_until(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(ErrorKind::TimedOut, "no answer before the deadline"));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(io::Error::new(ErrorKind::UnexpectedEof, "the connection closed during the handshake")),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Err(io::Error::new(ErrorKind::TimedOut, "no answer before the deadline")),
            Err(e) => return Err(e),
        }
    }
    stream.set_read_timeout(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn corked_frames_wait_for_the_end_or_a_flush_and_arrive_in_order() {
        let (a, mut b) = pair();
        b.set_nonblocking(true).unwrap();
        let out = TcpOut::over(a);
        let nothing_yet = |b: &mut TcpStream| matches!(b.read(&mut [0; 8]), Err(e) if e.kind() == ErrorKind::WouldBlock);
        corked(|| {
            for i in 0..3u8 {
                out.send(vec![i; 100].into(), None).unwrap();
            }
            assert!(nothing_yet(&mut b), "corked: nothing written yet");
            flush_corked(); // as a thread about to wait does
            out.send(vec![3; 100].into(), None).unwrap();
        });
        out.send(vec![4; 70_000].into(), None).unwrap(); // uncorked: at once
        b.set_nonblocking(false).unwrap();
        let mut got = vec![0u8; 400 + 70_000];
        b.read_exact(&mut got).unwrap();
        let expected: Vec<u8> = (0..4u8).flat_map(|i| [i; 100]).chain(std::iter::repeat_n(4, 70_000)).collect();
        assert!(got == expected, "every frame, in order");
    }

    #[test]
    fn a_peer_that_does_not_read_never_blocks_the_sender() {
        let (a, _b) = pair(); // b is never read
        let out = TcpOut::over(a);
        let started = Instant::now();
        let mut queued = 0usize;
        let err = loop {
            match out.send(vec![7u8; 1 << 20].into(), None) {
                Ok(()) => queued += 1,
                Err(e) => break e,
            }
            assert!(queued < 1000, "the queue is bounded");
        };
        assert_eq!(err.kind(), ErrorKind::WouldBlock, "{err}");
        assert!(err.to_string().contains("not reading"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(queued >= SEND_QUEUE_LIMIT >> 20, "{queued} MiB queued");
        let waited = Instant::now();
        let err = out.send(vec![1; 1 << 20].into(), Some(Duration::from_millis(200))).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::WouldBlock);
        assert!(waited.elapsed() >= Duration::from_millis(190), "waits for room until the deadline");
        out.close();
        assert!(out.send(vec![1].into(), None).is_err(), "a closed connection takes nothing");
    }

    #[test]
    fn queued_frames_arrive_whole_and_in_order() {
        let (a, mut b) = pair();
        let out = TcpOut::over(a);
        // every third frame carries words held apart, as a big value does: they follow its bytes
        let frames: Vec<Outgoing> = (0..40u8)
            .map(|i| {
                let mut bytes = vec![i; 300_000];
                let words = if i % 3 == 0 { crate::codec::encode_held_into(vec![u16::from(i) * 257; 150_000], &mut bytes, 0).unwrap() } else { None };
                Outgoing { bytes, words }
            })
            .collect();
        let expected: Vec<u8> = frames.iter().flat_map(|f| [f.rest(0), f.rest(f.bytes.len())].concat()).collect();
        assert_eq!(expected.len(), 40 * 300_000 + 14 * (8 + 300_000));
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; expected.len()];
            b.read_exact(&mut got).unwrap();
            assert!(got == expected, "bytes arrive in order");
        });
        for f in frames {
            out.send(f, Some(Duration::from_secs(10))).unwrap();
        }
        reader.join().unwrap();
    }
}
