//! Mode 3's transport: every frame is one MPI message on a duplicated communicator (its own
//! context, so user traffic on `MPI_COMM_WORLD` never mixes with ours).
//!
//! A sending thread posts its own non-blocking send. A thread that waits for a message (a
//! caller for its reply, a serving worker for its next call) polls for it itself for a short
//! while (`transport::polled`), so a quick round trip costs no thread switch. One progress
//! thread per process does the rest: it completes sends that did not finish at once and
//! receives when nobody else polls. MPI offers nothing a thread could sleep on until a
//! message comes (Open MPI's blocking calls poll), so that thread sleeps in short pauses:
//! at most 100 µs while this process waits for a reply, growing to 2 ms when it waits for
//! nothing, so an idle rank spends next to no CPU. User code — `mpido!` bodies with their
//! collectives — runs on other threads at the same time, which is why this mode needs
//! `MPI_THREAD_MULTIPLE`.
//!
//! The words of a big argument or result (see `Header::words`) go as a second message, from
//! where the value holds them, which the receiver takes straight into a block of their own:
//! the vector it decodes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use ::mpi::ffi;
use ::mpi::raw::{AsRaw, AsRawMut};
use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::{Communicator, Equivalence, Source};

use crate::buffers;
use crate::codec::Bulk;
use crate::error::{Error, Result};
use crate::protocol::{self, Frame, LEN_PREFIX, Outgoing, WORDS_HEAD, words_apart};
use crate::transport::FrameOut;
use crate::transport::polled::{self, Polled};

/// Tag of every frame on the transport communicator.
const TAG: i32 = 7001;
/// Tag of the message holding a big value's words, right after its frame from that rank.
const WORDS_TAG: i32 = 7002;
/// How long the words of a frame that came may take to follow it.
const WORDS_WITHIN: Duration = Duration::from_secs(30);
/// First pause of the progress thread after activity.
const MIN_PAUSE: Duration = Duration::from_micros(20);
/// Longest pause while this process waits for a reply.
const ALERT_PAUSE: Duration = Duration::from_micros(100);
/// Longest pause of an idle progress thread.
const MAX_PAUSE: Duration = Duration::from_millis(2);
/// How long the stop waits for queued sends to complete (a dead peer must not hang it).
const DRAIN: Duration = Duration::from_secs(5);

/// Receives each incoming frame with the rank it came from.
pub(crate) type Deliver = Box<dyn FnMut(i32, Result<Frame>) + Send>;
/// Whether this process waits for a reply (the progress thread then pauses only briefly).
pub(crate) type Awaiting = Box<dyn Fn() -> bool + Send + Sync>;

/// The running transport of this process.
pub(crate) struct MpiTransport {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

/// What the sending threads, the polling threads and the progress thread share.
struct Shared {
    comm: SimpleCommunicator,
    receiving: Mutex<Receiving>,
    sends: Mutex<Sends>,
    stop: AtomicBool,
    awaiting: Awaiting,
    /// The progress thread.
    progress: OnceLock<Thread>,
}

// SAFETY: MPI was initialised with MPI_THREAD_MULTIPLE (checked by `start_main_loop`), so the
// communicator and request handles may be used from any thread; each request is used under
// the `sends` lock only.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

struct Receiving {
    deliver: Deliver,
    max_frame: usize,
    /// Set by the stop: MPI may be finalised, nothing more is probed.
    closed: bool,
}

struct Sends {
    posted: Vec<InFlight>,
    /// Set by the stop: sends are refused.
    closed: bool,
}

/// A posted send and the buffer it reads from (kept alive until the send completes): one
/// message, or a big value's two (its frame and its words).
struct InFlight {
    frame: Outgoing,
    /// The first `posted` are ours (in place: no allocation per send). MPI sets a completed
    /// one to `MPI_REQUEST_NULL`, which tests complete again at once.
    requests: [ffi::MPI_Request; 2],
    posted: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        buffers::give(std::mem::take(&mut self.frame.bytes)); // sent: a big one serves the next
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MpiTransport {
    /// Starts the transport on `comm` (handed over: only the transport uses it from now on),
    /// handing every received frame to `deliver`; a message larger than `max_frame` is
    /// delivered as an error, not received. Waiting threads of this process poll it.
    pub(crate) fn start(comm: SimpleCommunicator, deliver: Deliver, max_frame: usize, awaiting: Awaiting) -> Result<MpiTransport> {
        let shared = Arc::new(Shared {
            comm,
            receiving: Mutex::new(Receiving { deliver, max_frame, closed: false }),
            sends: Mutex::new(Sends { posted: Vec::new(), closed: false }),
            stop: AtomicBool::new(false),
            awaiting,
            progress: OnceLock::new(),
        });
        let handle = std::thread::Builder::new()
            .name("cman-mpi".into())
            .spawn({
                let shared = shared.clone();
                move || progress(&shared)
            })
            .map_err(|e| Error::io("starting the MPI progress thread", e))?;
        let _ = shared.progress.set(handle.thread().clone());
        polled::install(shared.clone());
        Ok(MpiTransport { shared, handle: Some(handle) })
    }

    /// A frame sink that sends to `rank`.
    pub(crate) fn out(&self, rank: i32) -> Box<dyn FrameOut> {
        Box::new(MpiOut { rank, shared: self.shared.clone(), closed: AtomicBool::new(false) })
    }

    /// Waits for the posted sends to complete (bounded), then ends the transport: nothing is
    /// sent or received afterwards. Call before `MPI_Finalize`.
    pub(crate) fn stop(mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake_progress();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Polled for Shared {
    fn poll(&self) -> bool {
        self.receive()
    }

    fn sleeping(&self) {
        self.wake_progress(); // it may be in a long idle pause: it pauses briefly while a call waits
    }
}

impl Shared {
    fn wake_progress(&self) {
        if let Some(progress) = self.progress.get() {
            progress.unpark();
        }
    }

    /// Receives and delivers the next message that has arrived, unless another thread polls:
    /// one at a time, so that a waiting thread sees its reply before the next probe.
    fn receive(&self) -> bool {
        let mut r = match self.receiving.try_lock() {
            Ok(r) => r,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        if r.closed {
            return false;
        }
        let Some((mut message, status)) = self.comm.any_process().immediate_matched_probe_with_tag(TAG) else { return false };
        let len = status.count(u8::equivalent_datatype()) as usize;
        if len > r.max_frame {
            // not received: that rank's link is cut off, its message stays with MPI
            std::mem::forget(message);
            let error = protocol::too_long(len, r.max_frame);
            (r.deliver)(status.source_rank(), Err(error));
            return true;
        }
        let mut body = buffers::take(len).unwrap_or_else(|| Vec::with_capacity(len));
        // SAFETY: MPI writes the probed message, `len` bytes, into the buffer's room; the
        // message handle is null afterwards (received), as its Drop expects.
        unsafe {
            ffi::MPI_Mrecv(body.as_mut_ptr().cast(), len as i32, ffi::RSMPI_UINT8_T, message.as_raw_mut(), ffi::RSMPI_STATUS_IGNORE);
            body.set_len(len);
        }
        let source = status.source_rank();
        let marked = protocol::Header::parse(&body).is_ok_and(|h| h.words != 0);
        let frame = if len == WORDS_HEAD && marked {
            self.receive_words(source, body, r.max_frame)
        } else {
            Frame::from_body(body)
        };
        (r.deliver)(source, frame);
        true
    }

    /// The words that follow the frame `head` from `source`, if the frame announces
    /// some (an empty vector announces none), received into a block of their own.
    fn receive_words(&self, source: i32, head: Vec<u8>, max_frame: usize) -> Result<Frame> {
        let count = u64::from_le_bytes(head[WORDS_HEAD - 8..].try_into().expect("8 bytes"));
        if count == 0 {
            return Frame::from_body(head);
        }
        let deadline = Instant::now() + WORDS_WITHIN;
        let (mut message, status) = loop {
            // posted right after the frame: it is on its way
            if let Some(found) = self.comm.process_at_rank(source).immediate_matched_probe_with_tag(WORDS_TAG) {
                break found;
            }
            if Instant::now() > deadline {
                return Err(Error::Protocol(format!("the words of a frame from rank {source} did not follow it within {WORDS_WITHIN:?}")));
            }
            std::thread::yield_now();
        };
        let len = status.count(u8::equivalent_datatype()) as usize;
        let size = words_apart(&head, WORDS_HEAD + len).filter(|_| WORDS_HEAD + len <= max_frame);
        let Some(mut words) = size.and_then(Bulk::new) else {
            std::mem::forget(message); // not received: that rank's link is cut off
            return Err(Error::Protocol(format!("{len} bytes of words from rank {source} do not match the frame they follow (or exceed max_frame)")));
        };
        let (at, room) = words.room(len);
        if room < len {
            std::mem::forget(message); // not received: that rank's link is cut off
            return Err(Error::Protocol(format!("no room for {len} bytes of words from rank {source}")));
        }
        // SAFETY: MPI writes the probed message, `len` bytes, into the block's room; the
        // message handle is null afterwards (received), as its Drop expects.
        unsafe {
            ffi::MPI_Mrecv(at.cast(), len as i32, ffi::RSMPI_UINT8_T, message.as_raw_mut(), ffi::RSMPI_STATUS_IGNORE);
            words.advance(len);
        }
        Frame::from_parts(head, words)
    }

    /// Posts a send of `frame` to `rank`; false when it did not complete at once (the
    /// progress thread then completes it).
    fn send(&self, rank: i32, frame: Outgoing) -> std::io::Result<bool> {
        let mut sends = lock(&self.sends);
        if sends.closed {
            return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the MPI transport has stopped"));
        }
        // MPI keeps message bounds: no length prefix. A big value's words go from where they
        // are held as a message of their own, posted at once after its frame (under the
        // lock: no other frame to that rank comes between them).
        let words = frame.words.as_ref().map(|words| (words.bytes(), WORDS_TAG));
        // SAFETY: MPI_REQUEST_NULL is a constant MPI defines.
        let mut requests = [unsafe { ffi::RSMPI_REQUEST_NULL }; 2];
        let mut posted = 0;
        for (part, tag) in std::iter::once((&frame.bytes[LEN_PREFIX..], TAG)).chain(words) {
            // SAFETY: the request is written by MPI_Isend; the buffer is owned by the
            // InFlight, which lives until MPI_Test reports every send complete.
            unsafe { ffi::MPI_Isend(part.as_ptr().cast(), part.len() as i32, ffi::RSMPI_UINT8_T, rank, tag, self.comm.as_raw(), &mut requests[posted]) };
            posted += 1;
        }
        let mut sent = InFlight { frame, requests, posted };
        if send_done(&mut sent) {
            return Ok(true);
        }
        sends.posted.push(sent);
        Ok(false)
    }

    /// Completes what it can of the posted sends; true when some are still in flight.
    fn complete_sends(&self) -> bool {
        let mut sends = lock(&self.sends);
        sends.posted.retain_mut(|s| !send_done(s));
        !sends.posted.is_empty()
    }
}

struct MpiOut {
    rank: i32,
    shared: Arc<Shared>,
    closed: AtomicBool,
}

impl FrameOut for MpiOut {
    fn send(&self, frame: Outgoing, _patience: Option<Duration>) -> std::io::Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the MPI link is closed"));
        }
        if i32::try_from(frame.len()).is_err() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too large for one MPI message (2 GiB)"));
        }
        if !self.shared.send(self.rank, frame)? {
            self.shared.wake_progress(); // it completes the send
        }
        Ok(())
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

fn progress(shared: &Shared) {
    let mut pause = MIN_PAUSE;
    loop {
        let received = shared.receive();
        let sending = shared.complete_sends();
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        if received {
            pause = MIN_PAUSE;
        } else if sending {
            std::thread::yield_now(); // a large send needs MPI's progress to complete
        } else {
            // a thread that waits and polls itself tells us when it stops (`sleeping`)
            let longest = if (shared.awaiting)() && !polled::someone_polls() { ALERT_PAUSE } else { MAX_PAUSE };
            std::thread::park_timeout(pause.min(longest));
            pause = (pause * 2).min(longest);
        }
    }
    // complete the sends posted before the stop, bounded so a dead peer cannot hang us
    let deadline = Instant::now() + DRAIN;
    while shared.complete_sends() && Instant::now() < deadline {
        std::thread::yield_now();
    }
    let mut sends = lock(&shared.sends);
    sends.closed = true;
    if !sends.posted.is_empty() {
        // MPI may still read these buffers: they are never freed (the process is ending)
        tracing::warn!("{} MPI sends did not complete; their buffers are left to MPI", sends.posted.len());
        std::mem::forget(std::mem::take(&mut sends.posted));
    }
    drop(sends);
    lock(&shared.receiving).closed = true;
}

fn send_done(s: &mut InFlight) -> bool {
    s.requests[..s.posted].iter_mut().all(|request| {
        let mut flag = 0;
        // SAFETY: testing a request we posted (a completed one is MPI_REQUEST_NULL).
        unsafe { ffi::MPI_Test(request, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
        flag != 0
    })
}
