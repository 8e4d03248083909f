//! The evented connections (the master's, one per worker), read on the I/O runtime through
//! one epoll set of their own that the runtime watches as a single descriptor. A burst of
//! replies costs the runtime one wake-up, and each reply one read: no task, waker or
//! runtime registration per connection, whose cache lines a thousand workers would leave
//! cold for every reply. A thread that waits for a reply may wait in a read of its
//! connection itself ([`Reading::read_waiting`]): a call then costs it one system call to
//! wait and read. Frames are handled in the order they came either way. A connection that
//! callers read themselves turn after turn (a loop of calls) leaves the set until the
//! runtime's next turn, so that a reply wakes the caller alone ([`UNWATCHED_AFTER`]).

use std::io::{self, ErrorKind};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError};
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::protocol::{Frame, FrameReader};
use crate::sys;
use crate::sys::Hint;

use super::io as runtime;

/// Reads frames from `stream` on the I/O runtime until it ends: `on_frame` handles each (an
/// `Err` ends the connection with that reason), then `on_end` gets the reason. `on_frame`
/// runs on whichever thread reads: it must not wait for anything. The socket is made
/// blocking, with [`OWN_WAIT`] as its receive timeout, for a caller that waits in its own
/// read ([`Reading::read_waiting`]); every other read and write on it says not to wait.
pub(crate) fn read_frames(
    stream: Arc<TcpStream>,
    max_frame: usize,
    on_frame: impl FnMut(Frame) -> Result<(), String> + Send + 'static,
    on_end: impl FnOnce(String) + Send + 'static,
    touched: [Hint; 2],
) -> Arc<Reading> {
    let on_frame: Box<dyn FnMut(Frame) -> Result<(), String> + Send> = Box::new(on_frame);
    let reading = Arc::new(Reading {
        fd: stream.as_raw_fd(),
        touched: [Hint::of(&*on_frame), touched[0], touched[1]],
        stream,
        state: Mutex::new(ReadState { frames: FrameReader::new(max_frame), on_frame, on_end: Some(Box::new(on_end)) }),
        missed: AtomicBool::new(false),
        own_turns: AtomicU32::new(0),
        unwatched: AtomicBool::new(false),
        over: AtomicBool::new(false),
    });
    let watched = (reading.stream.set_nonblocking(false))
        .and_then(|()| reading.stream.set_read_timeout(Some(OWN_WAIT)))
        .and_then(|()| poller())
        .and_then(|p| p.watch(&reading));
    if let Err(e) = watched {
        let end = reading.state.lock().unwrap_or_else(|p| p.into_inner()).on_end.take();
        if let Some(end) = end {
            end(format!("its connection could not be watched: {e}"));
        }
    }
    reading
}

/// The longest a caller waits in its own read ([`Reading::read_waiting`]) before it leaves
/// its reply to the runtime: as long as the runtime may go unturned while callers read their
/// own replies. A call takes longer rarely, and then one more wake-up does not count.
pub(crate) const OWN_WAIT: Duration = runtime::UNTURNED_AT_MOST;

/// How an evented connection is read: by the I/O runtime when its epoll set says the
/// connection has news, or by a thread that waits for a reply on it, one at a time.
pub(crate) struct Reading {
    /// The socket's descriptor, at hand (no hop through the socket's own allocation).
    fd: RawFd,
    /// What a turn reads first beyond the reading: the `on_frame` closure, and what the
    /// caller said it reads (fetched into the caches ahead of a turn, see [`Poller::run`]).
    touched: [Hint; 3],
    stream: Arc<TcpStream>,
    state: Mutex<ReadState>,
    /// The runtime found the connection being read by another thread, which is to read on
    /// once it lets go (news may have come after its last read).
    missed: AtomicBool,
    /// Turns in a row read by waiting callers, none by the runtime.
    own_turns: AtomicU32,
    /// Out of the epoll set while callers read it themselves (see [`UNWATCHED_AFTER`]).
    unwatched: AtomicBool,
    /// The connection ended (as `on_end` taken says, but readable without the lock that a
    /// waiting caller may hold): it never goes back into the set.
    over: AtomicBool,
}

/// Turns in a row that waiting callers read a connection themselves (a loop of calls) after
/// which one takes it out of the epoll set until the runtime's next turn. Meanwhile a reply
/// wakes only the caller blocked in its read: no epoll callback runs in the sender's
/// context (0.1 µs a round trip on one CPU). The runtime turns every 5 to 10 ms while
/// callers read their own replies; it puts the connection back then.
const UNWATCHED_AFTER: u32 = 16;

struct ReadState {
    frames: FrameReader,
    on_frame: Box<dyn FnMut(Frame) -> Result<(), String> + Send>,
    /// `None` once the connection ended (and this was called).
    on_end: Option<Box<dyn FnOnce(String) + Send>>,
}

/// What a turn of reading did.
#[derive(Clone, Copy, Default)]
struct Turn {
    /// Bytes came (or the connection ended).
    read: bool,
    /// The turn's reads ran out before the socket did.
    more: bool,
}

/// Reads of one connection per turn, at most: one that streams does not hold the others up.
const READS_PER_TURN: usize = 16;

impl Reading {
    fn fd(&self) -> RawFd {
        self.fd
    }

    /// Brings what a turn reads first beyond the reading into the caches.
    fn prefetch_touched(&self) {
        self.touched.iter().for_each(|hint| hint.prefetch());
    }

    /// Waits for bytes on this thread, up to [`OWN_WAIT`], reads them and handles the frames
    /// (a thread's own reply among them, mostly: one system call for the wait and the read).
    /// `done` is asked first, under the connection's lock: no reply on it can come between
    /// that and the wait; and after, if bytes are left: once done, the runtime reads them.
    /// `Some(true)` if bytes came or `done` said so, `Some(false)` if none came in time,
    /// `None` if another thread reads the connection or it ended.
    pub(crate) fn read_waiting(self: &Arc<Self>, done: impl Fn() -> bool) -> Option<bool> {
        let state = self.state.try_lock().ok()?;
        state.on_end.as_ref()?; // it ended
        if done() {
            return Some(true);
        }
        let own_turns = self.own_turns.load(Ordering::Relaxed) + 1;
        self.own_turns.store(own_turns, Ordering::Relaxed); // only the lock's holder counts up
        let mut turn = self.read_turn(state, true);
        // what the turn left is this thread's to read on, unless that was all it waited for
        turn.more &= done();
        self.read_on(turn);
        if own_turns >= UNWATCHED_AFTER {
            self.unwatch();
        }
        Some(turn.read)
    }

    /// Reads a turn on the runtime's behalf, unless another thread reads the connection:
    /// that one reads on when it lets go. What the turn did.
    fn read_for_runtime(&self) -> Turn {
        self.own_turns.store(0, Ordering::Relaxed);
        let state = match self.state.try_lock() {
            Ok(state) => state,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                self.missed.store(true, Ordering::SeqCst);
                match self.state.try_lock() {
                    Ok(state) => {
                        self.missed.store(false, Ordering::SeqCst); // it let go before it saw the flag: read here
                        state
                    }
                    Err(_) => return Turn::default(),
                }
            }
        };
        self.read_turn(state, false)
    }

    /// After this thread's turn: reads on if the runtime found the connection busy meanwhile,
    /// and leaves to the runtime what the turn's reads did not take.
    fn read_on(self: &Arc<Self>, mut turn: Turn) {
        while self.missed.swap(false, Ordering::SeqCst) {
            match self.state.try_lock() {
                Ok(state) => turn = self.read_turn(state, false),
                Err(_) => {
                    self.missed.store(true, Ordering::SeqCst); // for whoever holds it now
                    break;
                }
            }
        }
        if turn.more {
            if let Ok(p) = poller() {
                p.read_later(self.clone());
            }
        }
    }

    /// Takes the connection out of the epoll set (once), for the runtime to put back at its
    /// next turn.
    fn unwatch(self: &Arc<Self>) {
        if self.unwatched.swap(true, Ordering::SeqCst) {
            return;
        }
        match poller() {
            Ok(p) => p.unwatched(self.clone()),
            Err(_) => self.unwatched.store(false, Ordering::SeqCst),
        }
    }

    /// Reads until the socket is empty, the turn's reads run out, or the connection ends;
    /// with `wait`, the first read waits for bytes (up to the socket's receive timeout).
    fn read_turn(&self, mut guard: MutexGuard<'_, ReadState>, mut wait: bool) -> Turn {
        let state = &mut *guard;
        let mut reason = None;
        let mut turn = Turn { read: false, more: true };
        for _ in 0..READS_PER_TURN {
            if state.on_end.is_none() {
                return Turn::default();
            }
            match read_some(self.fd(), &mut state.frames, std::mem::take(&mut wait)) {
                Ok((0, _)) => reason = Some(state.frames.end_of_stream().map_or_else(|e| e.to_string(), |()| "its connection closed".to_string())),
                Ok((_, filled)) => {
                    turn.read = true;
                    loop {
                        match state.frames.next_frame() {
                            Ok(Some(frame)) => {
                                if let Err(why) = (state.on_frame)(frame) {
                                    reason = Some(why);
                                    break;
                                }
                            }
                            Ok(None) => {
                                state.frames.release_idle(); // nothing under way: an idle connection holds no buffer
                                break;
                            }
                            Err(e) => {
                                reason = Some(e.to_string());
                                break;
                            }
                        }
                    }
                    turn.more &= filled; // a read that did not fill its room emptied the socket
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => turn.more = false,
                Err(e) => reason = Some(e.to_string()),
            }
            if reason.is_some() || !turn.more {
                break;
            }
        }
        if let Some(reason) = reason {
            let end = state.on_end.take();
            drop(guard);
            self.ended(end, reason);
            return Turn { read: true, more: false };
        }
        turn
    }

    /// The connection ended: `end` is told why, and the poller lets go of it.
    fn ended(&self, end: Option<Box<dyn FnOnce(String) + Send>>, reason: String) {
        self.over.store(true, Ordering::SeqCst); // before the poller hears of it
        if let Some(end) = end {
            end(reason);
            if let Ok(p) = poller() {
                p.let_go(self);
            }
        }
    }
}

/// Bytes read at once into the shared scratch buffer.
const SCRATCH: usize = 64 * 1024;

/// One scratch buffer for all evented connections: an idle connection holds no buffer of
/// its own. Only the thread that drives the runtime, or a caller while nobody drives it,
/// reads them, so the lock is hardly ever contended.
static SCRATCH_BUF: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// One read, straight into the reader's buffer: the rest of a big frame into its own (a big
/// value's words into theirs), small frames into a buffer the last frame left (the scratch
/// buffer takes a read only when that is nearly full, and never waits: others share it). A
/// read that found nothing leaves an idle connection holding no buffer. Returns the bytes
/// read and whether they filled the room (if not, the socket is empty).
fn read_some(fd: RawFd, reader: &mut FrameReader, wait: bool) -> io::Result<(usize, bool)> {
    if let Some((at, room)) = reader.read_room(SCRATCH) {
        // SAFETY: the reader's room holds `room` writable bytes at `at`.
        let n = unsafe { sys::recv_into(fd, at, room, wait) }.inspect_err(|_| reader.release_idle())?;
        // SAFETY: `recv_into` wrote `n` bytes into the reader's room.
        unsafe { reader.advance(n) };
        return Ok((n, n == room));
    }
    let mut scratch = SCRATCH_BUF.lock().unwrap_or_else(|p| p.into_inner());
    if scratch.is_empty() {
        scratch.resize(SCRATCH, 0);
    }
    // SAFETY: the scratch buffer holds `SCRATCH` writable bytes.
    let n = unsafe { sys::recv_into(fd, scratch.as_mut_ptr(), scratch.len(), false) }?;
    reader.extend(&scratch[..n]);
    Ok((n, n == scratch.len()))
}

/// The epoll set of the evented connections. Each is in it with the address of its
/// [`Reading`] as tag, a strong count the set holds: only the task that reads the set lets
/// go of it, between two looks, after taking it out, so a tag it finds always points to a
/// live reading.
struct Poller {
    epoll: OwnedFd,
    /// Rung when [`Poller::ended`] or [`Poller::again`] has news for the task.
    bell: OwnedFd,
    /// Tags of readings whose connection ended: out of the set at the next look.
    ended: Mutex<Vec<usize>>,
    /// Readings a caller left with bytes unread: read at the next look.
    again: Mutex<Vec<Arc<Reading>>>,
    /// Readings callers took out of the set: back in at the next look.
    out: Mutex<Vec<Arc<Reading>>>,
}

/// The tag of the bell's event (a reading's is its address, never 0).
const BELL: u64 = 0;

/// Events taken per look; fewer mean the set had no more.
const EVENTS: usize = 256;

static POLLER: OnceLock<io::Result<Poller>> = OnceLock::new();

/// The poller, started on first use.
fn poller() -> io::Result<&'static Poller> {
    let poller = POLLER.get_or_init(|| {
        let p = Poller { epoll: sys::epoll()?, bell: sys::bell()?, ended: Mutex::default(), again: Mutex::default(), out: Mutex::default() };
        sys::epoll_add(p.epoll.as_raw_fd(), p.bell.as_raw_fd(), BELL)?;
        Ok(p)
    });
    match poller {
        Ok(p) => {
            static STARTED: std::sync::Once = std::sync::Once::new();
            STARTED.call_once(|| drop(runtime::spawn(p.run())));
            Ok(p)
        }
        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
    }
}

impl Poller {
    /// Puts `reading`'s connection in the set; bytes it holds already are news.
    fn watch(&self, reading: &Arc<Reading>) -> io::Result<()> {
        let tag = Arc::into_raw(reading.clone());
        sys::epoll_add(self.epoll.as_raw_fd(), reading.fd(), tag as u64).inspect_err(|_| {
            // SAFETY: the strong count taken above, which the set did not take.
            drop(unsafe { Arc::from_raw(tag) });
        })
    }

    /// `reading` ended: out of the set, and let go, at the next look.
    fn let_go(&self, reading: &Reading) {
        self.ended.lock().unwrap_or_else(|p| p.into_inner()).push(reading as *const Reading as usize);
        sys::ring(self.bell.as_raw_fd());
    }

    /// Takes `reading` out of the set until the next look (see [`UNWATCHED_AFTER`]).
    fn unwatched(&self, reading: Arc<Reading>) {
        sys::epoll_remove(self.epoll.as_raw_fd(), reading.fd());
        self.out.lock().unwrap_or_else(|p| p.into_inner()).push(reading);
        sys::ring(self.bell.as_raw_fd());
    }

    /// Puts the readings callers took out back into the set, but for those that ended
    /// (their count went with [`let_go_ended`](Self::let_go_ended), or goes at its next call).
    fn watch_again(&self) {
        let out = std::mem::take(&mut *self.out.lock().unwrap_or_else(|p| p.into_inner()));
        for reading in out {
            reading.own_turns.store(0, Ordering::Relaxed);
            reading.unwatched.store(false, Ordering::SeqCst);
            if !reading.over.load(Ordering::SeqCst) {
                // the same tag as before: the set's count never left it; bytes already there
                // are news at once
                let _ = sys::epoll_add(self.epoll.as_raw_fd(), reading.fd(), Arc::as_ptr(&reading) as u64);
            }
        }
    }

    /// `reading` holds more than a caller read: the task reads on at its next look.
    fn read_later(&self, reading: Arc<Reading>) {
        self.again.lock().unwrap_or_else(|p| p.into_inner()).push(reading);
        sys::ring(self.bell.as_raw_fd());
    }

    /// The task that reads the set, on the I/O runtime, for as long as the process lives.
    async fn run(&'static self) {
        let registered = self.epoll.try_clone().and_then(|fd| {
            // SAFETY: `fd` is our own duplicate of the set, owned by the AsyncFd, which this
            // task keeps for as long as the process lives.
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(io::Error::from)
        });
        let ready = match registered {
            Ok(ready) => ready,
            Err(e) => return tracing::error!("the master cannot read its connections: {e}"),
        };
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        let mut more: Vec<Arc<Reading>> = Vec::new();
        loop {
            let guard = if more.is_empty() {
                match ready.readable().await {
                    Ok(guard) => Some(guard),
                    Err(e) => return tracing::error!("the master cannot read its connections: {e}"),
                }
            } else {
                tokio::task::yield_now().await; // connections that stream: the others' turn first
                None
            };
            self.let_go_ended();
            self.watch_again();
            let mut rest = std::mem::take(&mut more);
            let n = sys::epoll_ready(self.epoll.as_raw_fd(), &mut events);
            for (i, event) in events[..n].iter().enumerate() {
                // a burst of news finds each connection's state cold (the workers that ran
                // since its last news evicted it): the reading is fetched two events ahead,
                // what its turn reads through it one event ahead
                if let Some(later) = events[..n].get(i + 2).filter(|e| e.u64 != BELL) {
                    sys::prefetch(later.u64 as *const Reading, std::mem::size_of::<Reading>());
                }
                if let Some(next) = events[..n].get(i + 1).filter(|e| e.u64 != BELL) {
                    // SAFETY: a tag in the set points to a live reading (see `Poller`).
                    unsafe { &*(next.u64 as *const Reading) }.prefetch_touched();
                }
                if event.u64 == BELL {
                    sys::hush(self.bell.as_raw_fd());
                    rest.append(&mut self.again.lock().unwrap_or_else(|p| p.into_inner()));
                    continue;
                }
                // SAFETY: a tag in the set points to a live reading (see `Poller`).
                let reading = unsafe { &*(event.u64 as *const Reading) };
                if reading.read_for_runtime().more {
                    // SAFETY: as above; one more count for the list.
                    more.push(unsafe {
                        Arc::increment_strong_count(reading);
                        Arc::from_raw(reading as *const Reading)
                    });
                }
            }
            for reading in rest {
                if reading.read_for_runtime().more {
                    more.push(reading);
                }
            }
            if let Some(mut guard) = guard.filter(|_| n < EVENTS) {
                guard.clear_ready(); // the set had no more: its next news is a new edge
            }
        }
    }

    /// Takes the ended readings out of the set and lets go of them.
    fn let_go_ended(&self) {
        let ended = std::mem::take(&mut *self.ended.lock().unwrap_or_else(|p| p.into_inner()));
        for tag in ended {
            let tag = tag as *const Reading;
            // SAFETY: the set's count still holds: only this task lets go, here.
            let reading = unsafe { Arc::from_raw(tag) };
            sys::epoll_remove(self.epoll.as_raw_fd(), reading.fd());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    use super::*;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (a, l.accept().unwrap().0)
    }

    /// A connection's far end, its near end read through the poller, and the request ids
    /// of the frames handed on, in the order they were.
    fn read_pair() -> (TcpStream, Arc<Reading>, std::sync::mpsc::Receiver<u64>) {
        let (a, b) = pair();
        let (frames, got) = std::sync::mpsc::channel();
        let on_frame = move |f: Frame| frames.send(f.header.req).map_err(|e| e.to_string());
        (a, read_frames(Arc::new(b), 1 << 20, on_frame, |_| (), [Hint::default(); 2]), got)
    }

    /// A frame with nothing in it, numbered `req`.
    fn empty_cast(req: u64) -> Vec<u8> {
        use crate::protocol::{FrameBuf, Header, Kind};
        FrameBuf::with_capacity(Header { kind: Kind::Cast, src: 2, dst: 1, req, func: 0, words: 0 }, 0).finish().unwrap().to_vec()
    }

    #[test]
    fn frames_read_in_turn_by_the_runtime_and_by_a_waiting_thread_arrive_once_and_in_order() {
        use crate::protocol::{FrameBuf, Header, Kind};
        const N: u64 = 20_000;
        let (mut a, b) = pair();
        let stream = Arc::new(b);
        let (frames, got) = std::sync::mpsc::channel();
        let (ended, end) = std::sync::mpsc::channel();
        let on_frame = move |f: Frame| frames.send(f.header.req).map_err(|e| e.to_string());
        let reading = read_frames(stream, 1 << 20, on_frame, move |reason| ended.send(reason).unwrap(), [Hint::default(); 2]);
        let writer = std::thread::spawn(move || {
            for req in 0..N {
                // sizes vary, so that frames straddle reads
                let mut f = FrameBuf::with_capacity(Header { kind: Kind::Cast, src: 2, dst: 1, req, func: 0, words: 0 }, 300);
                f.payload().extend(std::iter::repeat_n(7u8, (req % 300) as usize));
                a.write_all(&f.finish().unwrap()).unwrap();
            }
        }); // then `a` is dropped: the connection ends
        // this thread waits in its own reads, as a waiting caller does; the I/O runtime reads
        // whenever its epoll set says so
        let (mut by_this_thread, deadline) = (0, Instant::now() + Duration::from_secs(60));
        let reason = loop {
            if let Ok(reason) = end.try_recv() {
                break reason;
            }
            assert!(Instant::now() < deadline, "the connection's end was never seen");
            if reading.read_waiting(|| false) == Some(true) {
                by_this_thread += 1;
            }
        };
        writer.join().unwrap();
        assert_eq!(reason, "its connection closed");
        assert!(got.try_iter().eq(0..N), "every frame once, in order");
        assert!(by_this_thread > 0, "the waiting thread never read");
        assert_eq!(reading.read_waiting(|| false), None, "an ended connection is not read again");
        let let_go = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&reading) > 1 {
            assert!(Instant::now() < let_go, "the runtime never let go of an ended connection");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn what_comes_while_a_caller_holds_the_connection_it_reads_when_it_lets_go() {
        let (mut a, reading, got) = read_pair();
        let held = reading.state.lock().unwrap(); // a caller's turn, under way
        for req in 0..10 {
            a.write_all(&empty_cast(req)).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !reading.missed.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the runtime never found the connection busy");
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(held);
        reading.read_on(Turn::default()); // the caller's turn ends
        assert!(got.try_iter().eq(0..10), "what came meanwhile was read when the caller let go, in order");
    }

    #[test]
    fn what_a_caller_leaves_unread_once_its_reply_came_the_runtime_reads() {
        use crate::protocol::{FrameBuf, Header, Kind};
        const N: u64 = 2000; // 2 MB: more than a turn's reads take
        let (mut a, b) = pair();
        // all that is written must wait in the socket at once
        let (mut room, mut len): (libc::c_int, libc::socklen_t) = (4 << 20, 4);
        // SAFETY: setting and reading an int option of a socket this test owns.
        unsafe {
            libc::setsockopt(b.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, (&raw const room).cast(), len);
            libc::getsockopt(b.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, (&raw mut room).cast(), &mut len);
        }
        if room < 4 << 20 {
            eprintln!("skipped: a socket here takes {room} bytes at most (net.core.rmem_max), too few to hold more than a turn");
            return;
        }
        let (frames, got) = std::sync::mpsc::channel();
        let on_frame = move |f: Frame| frames.send((f.header.req, std::thread::current().id())).map_err(|e| e.to_string());
        let reading = read_frames(Arc::new(b), 1 << 20, on_frame, |_| (), [Hint::default(); 2]);
        let held = reading.state.lock().unwrap(); // nobody reads while the bytes come
        for req in 0..N {
            let mut f = FrameBuf::with_capacity(Header { kind: Kind::Cast, src: 2, dst: 1, req, func: 0, words: 0 }, 1000);
            f.payload().extend([7u8; 1000]);
            a.write_all(&f.finish().unwrap()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50)); // the runtime saw the connection busy meanwhile
        drop(held);
        reading.missed.store(false, Ordering::SeqCst); // what it missed is for the hand-over to say
        // the caller's reply is in its first turn: it reads no further
        let asked = std::cell::Cell::new(0);
        assert_eq!(reading.read_waiting(|| asked.replace(asked.get() + 1) > 0), Some(true));
        let (me, deadline) = (std::thread::current().id(), Instant::now() + Duration::from_secs(10));
        let (mut next, mut by_caller) = (0, 0);
        while next < N {
            let left = deadline.saturating_duration_since(Instant::now());
            let (req, by) = got.recv_timeout(left).unwrap_or_else(|_| panic!("the runtime read {} of the {} frames the caller left", next - by_caller, N - by_caller));
            assert_eq!(req, next, "in order");
            by_caller += u64::from(by == me);
            next += 1;
        }
        assert!(by_caller < N, "one turn read all {N} frames: nothing was left to hand over");
        assert!(by_caller > 0, "the caller's turn read nothing");
    }

    #[test]
    fn a_connection_a_caller_took_out_of_the_set_comes_back_for_the_runtime() {
        let (mut a, reading, got) = read_pair();
        let mut send = |req| a.write_all(&empty_cast(req)).unwrap();
        // a loop of calls: each reply read by the waiting caller, until it takes the
        // connection out of the set
        let mut req = 0;
        while !reading.unwatched.load(Ordering::SeqCst) {
            assert!(req < 10 * u64::from(UNWATCHED_AFTER), "a caller that read {req} replies in a row never took its connection out of the set");
            send(req);
            let deadline = Instant::now() + Duration::from_secs(10);
            while got.try_recv() != Ok(req) {
                assert!(Instant::now() < deadline, "frame {req} was never read");
                reading.read_waiting(|| false);
            }
            req += 1;
        }
        // the caller is gone: what comes now, only the runtime reads
        send(req);
        assert_eq!(got.recv_timeout(Duration::from_secs(10)), Ok(req), "the runtime never put the connection back into its set");
        assert!(!reading.unwatched.load(Ordering::SeqCst));
    }
}
