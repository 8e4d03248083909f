//! Mode 3's transport: every frame is one MPI message on a duplicated communicator (its own
//! context, so user traffic on `MPI_COMM_WORLD` never mixes with ours), moved by one
//! progress thread per process. Senders hand frames to the thread and wake it; it posts
//! non-blocking sends, completes them, and probes for incoming messages. It spins briefly
//! after activity (low latency while calls flow) and then sleeps with growing pauses, up to
//! 1 ms, so an idle rank does not burn a core. User code — `mpido!` bodies with their
//! collectives — runs on other threads at the same time, which is why this mode needs
//! `MPI_THREAD_MULTIPLE`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use ::mpi::ffi;
use ::mpi::point_to_point::MatchedReceiveVec;
use ::mpi::raw::AsRaw;
use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::{Communicator, Equivalence, Source};

use crate::error::{Error, Result};
use crate::protocol::{self, Frame, LEN_PREFIX};
use crate::transport::FrameOut;

/// Tag of every frame on the transport communicator.
const TAG: i32 = 7001;
/// Polls without sleeping after the last activity.
const SPIN_ROUNDS: u32 = 200;
/// Longest pause of an idle progress thread.
const MAX_PAUSE: Duration = Duration::from_millis(1);

/// A communicator handed to the progress thread.
pub(crate) struct SendComm(pub SimpleCommunicator);

// SAFETY: MPI was initialised with MPI_THREAD_MULTIPLE (checked by `start_main_loop`), so
// the communicator handle may be used from another thread; after the hand-over only the
// progress thread uses it.
unsafe impl Send for SendComm {}

/// Receives each incoming frame with the rank it came from.
pub(crate) type Deliver = Box<dyn FnMut(i32, Result<Frame>) + Send>;

struct Outgoing {
    rank: i32,
    frame: Vec<u8>,
}

/// The running progress thread of this process.
pub(crate) struct MpiTransport {
    tx: mpsc::Sender<Outgoing>,
    thread: Thread,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl MpiTransport {
    /// Starts the progress thread on `comm`, handing every received frame to `deliver`;
    /// a message larger than `max_frame` is delivered as an error, not received.
    pub(crate) fn start(comm: SendComm, deliver: Deliver, max_frame: usize) -> Result<MpiTransport> {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let handle = std::thread::Builder::new()
            .name("cman-mpi".into())
            .spawn({
                let stop = stop.clone();
                move || progress(comm, rx, deliver, &stop, max_frame)
            })
            .map_err(|e| Error::io("starting the MPI progress thread", e))?;
        Ok(MpiTransport { tx, thread: handle.thread().clone(), stop, handle: Some(handle) })
    }

    /// A frame sink that sends to `rank`.
    pub(crate) fn out(&self, rank: i32) -> Box<dyn FrameOut> {
        Box::new(MpiOut { rank, tx: self.tx.clone(), thread: self.thread.clone(), closed: AtomicBool::new(false) })
    }

    /// Sends what is queued, waits for the sends to complete, and ends the thread. Call
    /// before `MPI_Finalize`.
    pub(crate) fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.unpark();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

struct MpiOut {
    rank: i32,
    tx: mpsc::Sender<Outgoing>,
    thread: Thread,
    closed: AtomicBool,
}

impl FrameOut for MpiOut {
    fn send(&self, frame: Vec<u8>, _wait_until: Option<Instant>) -> std::io::Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the MPI link is closed"));
        }
        if i32::try_from(frame.len()).is_err() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too large for one MPI message (2 GiB)"));
        }
        self.tx.send(Outgoing { rank: self.rank, frame }).map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the MPI transport has stopped"))?;
        self.thread.unpark();
        Ok(())
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

/// A posted send and the buffer it reads from (kept alive until the send completes).
struct InFlight {
    _frame: Vec<u8>,
    request: ffi::MPI_Request,
}

fn progress(comm: SendComm, rx: mpsc::Receiver<Outgoing>, mut deliver: Deliver, stop: &AtomicBool, max_frame: usize) {
    let comm = comm.0;
    let mut in_flight: Vec<InFlight> = Vec::new();
    let mut idle = 0u32;
    let mut pause = Duration::from_micros(10);
    loop {
        let mut busy = false;
        while let Ok(out) = rx.try_recv() {
            in_flight.push(post_send(&comm, out));
            busy = true;
        }
        in_flight.retain_mut(|s| !send_done(s));
        while let Some((message, status)) = comm.any_process().immediate_matched_probe_with_tag(TAG) {
            busy = true;
            let len = status.count(u8::equivalent_datatype()) as usize;
            if len > max_frame {
                // not received: that rank's link is cut off, its message stays with MPI
                std::mem::forget(message);
                deliver(status.source_rank(), Err(protocol::too_long(len, max_frame)));
                continue;
            }
            let (body, _) = (message, status).matched_receive_vec::<u8>();
            let frame = Frame::from_body(body);
            deliver(status.source_rank(), frame);
        }
        if stop.load(Ordering::SeqCst) && in_flight.is_empty() && !busy {
            break;
        }
        if busy {
            idle = 0;
            pause = Duration::from_micros(10);
        } else if idle < SPIN_ROUNDS {
            idle += 1;
            std::thread::yield_now();
        } else {
            std::thread::park_timeout(pause);
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }
    // drain sends queued after the stop flag, bounded so a dead peer cannot hang us
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(out) = rx.try_recv() {
        in_flight.push(post_send(&comm, out));
    }
    while !in_flight.is_empty() && Instant::now() < deadline {
        in_flight.retain_mut(|s| !send_done(s));
        std::thread::yield_now();
    }
    if !in_flight.is_empty() {
        // MPI may still read these buffers: they are never freed (the process is ending)
        tracing::warn!("{} MPI sends did not complete; their buffers are left to MPI", in_flight.len());
        std::mem::forget(in_flight);
    }
}

fn post_send(comm: &SimpleCommunicator, out: Outgoing) -> InFlight {
    let body = &out.frame[LEN_PREFIX..]; // MPI keeps message bounds: no length prefix
    // SAFETY: `request` is written by MPI_Isend; the buffer is owned by the returned
    // InFlight, which lives until MPI_Test reports the send complete.
    unsafe {
        let mut request: ffi::MPI_Request = std::mem::zeroed();
        ffi::MPI_Isend(body.as_ptr().cast(), body.len() as i32, ffi::RSMPI_UINT8_T, out.rank, TAG, comm.as_raw(), &mut request);
        InFlight { _frame: out.frame, request }
    }
}

fn send_done(s: &mut InFlight) -> bool {
    let mut flag = 0;
    // SAFETY: testing a request we posted and have not completed yet.
    unsafe { ffi::MPI_Test(&mut s.request, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
    flag != 0
}
