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
//! nothing, and to 10 ms after a second without traffic, so an idle rank spends next to no
//! CPU. User code — `mpido!` bodies with their collectives — runs on other threads at the
//! same time, which is why this mode needs `MPI_THREAD_MULTIPLE`.
//!
//! A frame of up to [`SMALL`] bytes lands in a receive posted in advance, which costs less than
//! probing for it and then receiving it. A bigger frame is announced there by its length
//! prefix and follows as a message of its own, received straight into a buffer of its size.
//! The words of a big argument or result (see `Header::words`) go as a further message, from
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
use crate::transport::{FrameOut, Out};
use crate::transport::polled::{self, Polled};

/// Tag of a frame of at most [`SMALL`] bytes, or of the length prefix announcing a bigger one.
const TAG: i32 = 7001;
/// Tag of the message holding a big value's words, right after its frame from that rank.
const WORDS_TAG: i32 = 7002;
/// Tag of a frame bigger than [`SMALL`], right after its announcement from that rank.
const BIG_TAG: i32 = 7003;
/// The largest frame that lands in the receive posted in advance (copied out of it: a
/// frame this small costs less to copy than a buffer of its own would to allocate).
const SMALL: usize = 8 * 1024;
/// How long the rest of a message (a big frame, a value's words) may take to follow its start.
const FOLLOWS_WITHIN: Duration = Duration::from_secs(30);
/// First pause of the progress thread after activity.
const MIN_PAUSE: Duration = Duration::from_micros(20);
/// Longest pause while this process waits for a reply.
const ALERT_PAUSE: Duration = Duration::from_micros(100);
/// Longest pause of an idle progress thread.
const MAX_PAUSE: Duration = Duration::from_millis(2);
/// Longest pause once nothing has come or gone for [`QUIET`]: a wake-up costs tens of µs
/// (MPI polls every transport it has), so a rank left alone wakes 100 times a second, not 500;
/// the first call after such a silence waits for it up to this long.
const DEEP_PAUSE: Duration = Duration::from_millis(10);
/// Silence after which the progress thread pauses up to [`DEEP_PAUSE`].
const QUIET: Duration = Duration::from_secs(1);
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
    /// Set by the stop: MPI may be finalised, nothing more is received.
    closed: bool,
    /// The receive posted for the next message on [`TAG`] from any rank, and where it lands
    /// (boxed: MPI writes there while this struct may move).
    next: ffi::MPI_Request,
    landing: Box<[u8]>,
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
    requests: [ffi::MPI_Request; 3],
    posted: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        buffers::give(std::mem::take(&mut self.frame.bytes)); // sent: a big one serves the next
    }
}

impl Receiving {
    /// Receives nothing more: cancels the posted receive and waits for the cancel (or for
    /// the message it matched, dropped), so that MPI no longer writes into the landing.
    fn close(&mut self) {
        self.closed = true;
        // SAFETY: cancelling and completing the receive we posted.
        unsafe {
            ffi::MPI_Cancel(&mut self.next);
            ffi::MPI_Wait(&mut self.next, ffi::RSMPI_STATUS_IGNORE);
        }
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
        // SAFETY: MPI_REQUEST_NULL is a constant MPI defines.
        let next = unsafe { ffi::RSMPI_REQUEST_NULL };
        let receiving = Receiving { deliver, max_frame, closed: false, next, landing: vec![0; SMALL].into_boxed_slice() };
        let shared = Arc::new(Shared {
            comm,
            receiving: Mutex::new(receiving),
            sends: Mutex::new(Sends { posted: Vec::new(), closed: false }),
            stop: AtomicBool::new(false),
            awaiting,
            progress: OnceLock::new(),
        });
        shared.post(&mut lock(&shared.receiving));
        let handle = std::thread::Builder::new()
            .name("cman-mpi".into())
            .spawn({
                let shared = shared.clone();
                move || progress(&shared)
            })
            .map_err(|e| {
                lock(&shared.receiving).close();
                Error::io("starting the MPI progress thread", e)
            })?;
        let _ = shared.progress.set(handle.thread().clone());
        polled::install(shared.clone());
        Ok(MpiTransport { shared, handle: Some(handle) })
    }

    /// A frame sink that sends to `rank`.
    pub(crate) fn out(&self, rank: i32) -> Out {
        Out::Other(Arc::new(MpiOut { rank, shared: self.shared.clone(), closed: AtomicBool::new(false) }))
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

    /// Posts the receive for the next message on [`TAG`].
    fn post(&self, r: &mut Receiving) {
        // SAFETY: the landing buffer is boxed and outlives the request: the request completes
        // or is cancelled (`Receiving::close`) before `Receiving` is dropped.
        unsafe { ffi::MPI_Irecv(r.landing.as_mut_ptr().cast(), SMALL as i32, ffi::RSMPI_UINT8_T, ffi::RSMPI_ANY_SOURCE, TAG, self.comm.as_raw(), &mut r.next) };
    }

    /// Receives and delivers the next message that has arrived, unless another thread polls:
    /// one at a time, so that a waiting thread sees its reply before the next test.
    fn receive(&self) -> bool {
        let mut r = match self.receiving.try_lock() {
            Ok(r) => r,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        if r.closed {
            return false;
        }
        let (mut flag, mut count) = (0, 0);
        // SAFETY: a status is plain data MPI fills in.
        let mut status: ffi::MPI_Status = unsafe { std::mem::zeroed() };
        // SAFETY: testing the receive we posted; its count is read from the status MPI filled.
        unsafe {
            ffi::MPI_Test(&mut r.next, &mut flag, &mut status);
            if flag == 0 {
                return false;
            }
            ffi::MPI_Get_count(&status, ffi::RSMPI_UINT8_T, &mut count);
        }
        let (source, len) = (status.MPI_SOURCE, count as usize);
        let start = r.landing[..len].to_vec();
        self.post(&mut r); // the next message lands while this one is handled
        let body = match <[u8; LEN_PREFIX]>::try_from(&start[..]) {
            // no frame is this short: the length prefix of a bigger one, which follows
            Ok(prefix) => protocol::check_len(prefix, r.max_frame).and_then(|len| self.receive_big(source, len)),
            Err(_) if len > r.max_frame => Err(protocol::too_long(len, r.max_frame)),
            Err(_) => Ok(start),
        };
        let frame = body.and_then(|body| {
            let marked = protocol::Header::parse(&body).is_ok_and(|h| h.words != 0);
            if body.len() == WORDS_HEAD && marked { self.receive_words(source, body, r.max_frame) } else { Frame::from_body(body) }
        });
        (r.deliver)(source, frame);
        true
    }

    /// Waits for the message with `tag` that `source` sent right after the one just
    /// received (`what` it holds, for the error).
    fn follower(&self, source: i32, tag: i32, what: &str) -> Result<(::mpi::point_to_point::Message, ::mpi::point_to_point::Status)> {
        let deadline = Instant::now() + FOLLOWS_WITHIN;
        loop {
            // posted right after the message before it: it is on its way
            if let Some(found) = self.comm.process_at_rank(source).immediate_matched_probe_with_tag(tag) {
                return Ok(found);
            }
            if Instant::now() > deadline {
                return Err(Error::Protocol(format!("{what} from rank {source} did not follow within {FOLLOWS_WITHIN:?}")));
            }
            std::thread::yield_now();
        }
    }

    /// The frame of `len` bytes that `source` announced, received into a buffer of its size.
    fn receive_big(&self, source: i32, len: usize) -> Result<Vec<u8>> {
        let (mut message, status) = self.follower(source, BIG_TAG, "an announced frame")?;
        let got = status.count(u8::equivalent_datatype()) as usize;
        if got != len {
            std::mem::forget(message); // not received: that rank's link is cut off
            return Err(Error::Protocol(format!("a frame of {got} bytes from rank {source} where {len} were announced")));
        }
        let mut body = buffers::take(len).unwrap_or_else(|| Vec::with_capacity(len));
        // SAFETY: MPI writes the probed message, `len` bytes, into the buffer's room; the
        // message handle is null afterwards (received), as its Drop expects.
        unsafe {
            ffi::MPI_Mrecv(body.as_mut_ptr().cast(), len as i32, ffi::RSMPI_UINT8_T, message.as_raw_mut(), ffi::RSMPI_STATUS_IGNORE);
            body.set_len(len);
        }
        Ok(body)
    }

    /// The words that follow the frame `head` from `source`, if the frame announces
    /// some (an empty vector announces none), received into a block of their own.
    fn receive_words(&self, source: i32, head: Vec<u8>, max_frame: usize) -> Result<Frame> {
        let count = u64::from_le_bytes(head[WORDS_HEAD - 8..].try_into().expect("8 bytes"));
        if count == 0 {
            return Frame::from_body(head);
        }
        let (mut message, status) = self.follower(source, WORDS_TAG, "the words of a frame")?;
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
    fn send(&self, rank: i32, mut frame: Outgoing) -> std::io::Result<bool> {
        let mut sends = lock(&self.sends);
        if sends.closed {
            return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the MPI transport has stopped"));
        }
        // MPI keeps message bounds: a small frame goes without its length prefix, a bigger
        // one after it. A big value's words go from where they are held as a message of
        // their own. All are posted at once, under the lock: nothing to that rank comes
        // between them.
        let body_len = frame.bytes.len() - LEN_PREFIX;
        let big = body_len > SMALL;
        debug_assert!(!big || frame.words.is_none(), "a frame with words is only its head");
        if big {
            let prefix = protocol::len_prefix(body_len).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
            frame.bytes[..LEN_PREFIX].copy_from_slice(&prefix);
        }
        let (prefix, body) = frame.bytes.split_at(LEN_PREFIX);
        let parts = if big { [Some((prefix, TAG)), Some((body, BIG_TAG))] } else { [Some((body, TAG)), None] };
        let words = frame.words.as_ref().map(|words| (words.bytes(), WORDS_TAG));
        // SAFETY: MPI_REQUEST_NULL is a constant MPI defines.
        let mut requests = [unsafe { ffi::RSMPI_REQUEST_NULL }; 3];
        let mut posted = 0;
        for (part, tag) in parts.into_iter().flatten().chain(words) {
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
    let mut last_traffic = Instant::now();
    loop {
        // a thread that polls receives all the same, and a message this thread took would
        // wake the poller's reply through it: leave the receiving to that thread
        let received = !polled::someone_polls() && shared.receive();
        let sending = shared.complete_sends();
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        if received || sending {
            last_traffic = Instant::now();
        }
        if received {
            pause = MIN_PAUSE;
        } else if sending {
            std::thread::yield_now(); // a large send needs MPI's progress to complete
        } else {
            // a thread that waits and polls itself tells us when it stops (`sleeping`)
            let longest = if (shared.awaiting)() && !polled::someone_polls() {
                ALERT_PAUSE
            } else if last_traffic.elapsed() < QUIET {
                MAX_PAUSE
            } else {
                DEEP_PAUSE
            };
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
    lock(&shared.receiving).close();
}

fn send_done(s: &mut InFlight) -> bool {
    s.requests[..s.posted].iter_mut().all(|request| {
        let mut flag = 0;
        // SAFETY: testing a request we posted (a completed one is MPI_REQUEST_NULL).
        unsafe { ffi::MPI_Test(request, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
        flag != 0
    })
}
