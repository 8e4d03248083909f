//! A pipe watched through io_uring, so that a worker learns whether anything was printed
//! without a system call: one multishot poll on the pipe, on a ring whose completions wait
//! for the watching thread (`DEFER_TASKRUN`). A write to the pipe, by any thread or process,
//! sets a flag in memory the kernel shares before the write returns
//! (`IORING_SQ_TASKRUN`); while the flag is clear, nothing came. At a thousand workers a
//! read of an empty pipe per call cost 1-1.8 µs of cold kernel structures; the flag is one
//! load. Kernels before 6.1, and sandboxes that forbid io_uring, refuse the ring: then the
//! pipe is read as before.

use std::cell::Cell;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

/// `struct io_uring_params` (linux/io_uring.h).
#[repr(C)]
#[derive(Default)]
struct Params {
    sq_entries: u32,
    cq_entries: u32,
    flags: u32,
    sq_thread_cpu: u32,
    sq_thread_idle: u32,
    features: u32,
    wq_fd: u32,
    resv: [u32; 3],
    sq_off: [u32; 10], // head, tail, ring_mask, ring_entries, flags, dropped, array, resv1, resv2 (u64)
    cq_off: [u32; 10], // head, tail, ring_mask, ring_entries, overflow, cqes, flags, resv1, resv2 (u64)
}

/// `struct io_uring_sqe`, as a poll request fills it.
#[repr(C)]
struct Sqe {
    opcode: u8,
    flags: u8,
    ioprio: u16,
    fd: i32,
    off: u64,
    addr: u64,
    len: u32,
    poll32_events: u32,
    user_data: u64,
    rest: [u64; 3],
}

/// `struct io_uring_cqe`.
#[repr(C)]
struct Cqe {
    user_data: u64,
    res: i32,
    flags: u32,
}

const SETUP_TASKRUN_FLAG: u32 = 1 << 9;
const SETUP_SINGLE_ISSUER: u32 = 1 << 12;
const SETUP_DEFER_TASKRUN: u32 = 1 << 13;
const FEAT_SINGLE_MMAP: u32 = 1 << 0;
const OFF_SQES: libc::off_t = 0x1000_0000;
const OP_POLL_ADD: u8 = 6;
const POLL_ADD_MULTI: u32 = 1 << 0;
const CQE_F_MORE: u32 = 1 << 1;
const SQ_TASKRUN: u32 = 1 << 2;
const ENTER_GETEVENTS: u32 = 1 << 0;

/// A mapping of the ring, unmapped when dropped.
struct Mapped {
    at: *mut u8,
    len: usize,
}

impl Mapped {
    fn new(ring: RawFd, len: usize, offset: libc::off_t) -> io::Result<Mapped> {
        // SAFETY: a fresh shared mapping of the ring's own memory; checked below.
        let at = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | libc::MAP_POPULATE, ring, offset) };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapped { at: at.cast(), len })
    }

    /// The `u32` the kernel shares at `offset`.
    fn word(&self, offset: u32) -> &AtomicU32 {
        assert!(offset as usize + 4 <= self.len && offset % 4 == 0, "an offset inside the ring");
        // SAFETY: in bounds and aligned (checked), and the mapping lives as long as `self`.
        unsafe { &*self.at.add(offset as usize).cast::<AtomicU32>() }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used.
        unsafe { libc::munmap(self.at.cast(), self.len) };
    }
}

/// The read end of a pipe, watched for bytes by the thread that made this (only it may ask).
pub(crate) struct PipeWatch {
    ring: OwnedFd,
    pipe: RawFd,
    rings: Mapped,
    sqes: Mapped,
    params: Params,
    /// The words [`news`](PipeWatch::news) looks at, inside `rings`: the submission ring's
    /// flags, the completion ring's head and tail.
    looked_at: [*const AtomicU32; 3],
    /// The poll ended and could not be armed again: every look says "maybe".
    blind: Cell<bool>,
    /// Only the thread that made the ring may run its completions.
    _this_thread: PhantomData<*const ()>,
}

impl PipeWatch {
    /// Watches `pipe` from this thread, if the kernel lets us.
    pub(crate) fn new(pipe: RawFd) -> io::Result<PipeWatch> {
        let mut params = Params { flags: SETUP_SINGLE_ISSUER | SETUP_DEFER_TASKRUN | SETUP_TASKRUN_FLAG, ..Params::default() };
        // SAFETY: io_uring_setup fills `params`, a valid `struct io_uring_params`.
        let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 2 as libc::c_long, &mut params as *mut Params) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor the kernel just gave us.
        let ring = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        if params.features & FEAT_SINGLE_MMAP == 0 {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "an io_uring without a single mapping"));
        }
        let sq_len = params.sq_off[6] as usize + params.sq_entries as usize * 4;
        let cq_len = params.cq_off[5] as usize + params.cq_entries as usize * size_of::<Cqe>();
        let rings = Mapped::new(ring.as_raw_fd(), sq_len.max(cq_len), 0)?;
        let sqes = Mapped::new(ring.as_raw_fd(), params.sq_entries as usize * size_of::<Sqe>(), OFF_SQES)?;
        let looked_at = [params.sq_off[4], params.cq_off[0], params.cq_off[1]].map(|offset| rings.word(offset) as *const AtomicU32);
        let watch = PipeWatch { ring, pipe, rings, sqes, params, looked_at, blind: Cell::new(false), _this_thread: PhantomData };
        watch.arm()?;
        Ok(watch)
    }

    /// Whether bytes may have come since the last look (`true` when unsure). Cheap while
    /// nothing came: two loads from one cache line.
    #[inline]
    pub(crate) fn news(&self) -> bool {
        let [flags, head, tail] = self.looked_at();
        let came = flags.load(Ordering::Acquire) & SQ_TASKRUN != 0 || head.load(Ordering::Relaxed) != tail.load(Ordering::Acquire);
        if came || self.blind.get() { self.take_news() } else { false }
    }

    /// Brings the words [`news`](Self::news) reads into the caches (they lie on a page of
    /// their own, which a worker among a thousand finds cold at every call).
    #[inline]
    pub(crate) fn prefetch(&self) {
        super::prefetch(self.looked_at[0], 64);
    }

    /// The submission ring's flags, the completion ring's head and tail.
    #[inline]
    fn looked_at(&self) -> [&AtomicU32; 3] {
        // SAFETY: words inside `rings`, which lives as long as `self`.
        self.looked_at.map(|word| unsafe { &*word })
    }

    /// Something came: the poll's completions are run and taken, and the poll armed again if
    /// it ended. `true` (look in the pipe).
    #[cold]
    #[inline(never)]
    fn take_news(&self) -> bool {
        // SAFETY: io_uring_enter on our ring, submitting nothing: it runs the deferred work
        // (which posts the poll's completions) and clears the flag. A failure leaves the
        // flag set, and the next look reads the pipe again.
        unsafe { libc::syscall(libc::SYS_io_uring_enter, self.ring.as_raw_fd() as libc::c_long, 0 as libc::c_long, 0 as libc::c_long, ENTER_GETEVENTS as libc::c_long, 0 as libc::c_long, 0 as libc::c_long) };
        let [_, head, tail] = self.looked_at();
        let (mask, cqes) = (self.rings.word(self.params.cq_off[2]).load(Ordering::Relaxed), self.params.cq_off[5] as usize);
        let end = tail.load(Ordering::Acquire);
        let mut at = head.load(Ordering::Relaxed);
        let mut ended = false;
        while at != end {
            // SAFETY: `at & mask` indexes the ring's completion array, inside the mapping.
            let cqe = unsafe { &*self.rings.at.add(cqes + (at & mask) as usize * size_of::<Cqe>()).cast::<Cqe>() };
            ended |= cqe.flags & CQE_F_MORE == 0;
            at = at.wrapping_add(1);
        }
        head.store(end, Ordering::Release);
        if ended && !self.blind.get() && self.arm().is_err() {
            self.blind.set(true); // no poll any more: its flag would stay clear
        }
        true
    }

    /// Submits the multishot poll for bytes on the pipe.
    fn arm(&self) -> io::Result<()> {
        let tail = self.rings.word(self.params.sq_off[1]);
        let mask = self.rings.word(self.params.sq_off[2]).load(Ordering::Relaxed);
        let at = tail.load(Ordering::Relaxed);
        let index = at & mask;
        let sqe = Sqe { opcode: OP_POLL_ADD, flags: 0, ioprio: 0, fd: self.pipe, off: 0, addr: 0, len: POLL_ADD_MULTI, poll32_events: libc::POLLIN as u32, user_data: 1, rest: [0; 3] };
        assert!((index as usize + 1) * size_of::<Sqe>() <= self.sqes.len, "a slot inside the ring");
        // SAFETY: the slot is inside the submission array (checked) and not in flight: the
        // kernel consumed every earlier submission in its io_uring_enter.
        unsafe { self.sqes.at.cast::<Sqe>().add(index as usize).write(sqe) };
        let array = self.params.sq_off[6] + index * 4;
        self.rings.word(array).store(index, Ordering::Relaxed);
        tail.store(at.wrapping_add(1), Ordering::Release);
        // SAFETY: io_uring_enter on our ring, submitting the one entry written above.
        let rc = unsafe { libc::syscall(libc::SYS_io_uring_enter, self.ring.as_raw_fd() as libc::c_long, 1 as libc::c_long, 0 as libc::c_long, 0 as libc::c_long, 0 as libc::c_long, 0 as libc::c_long) };
        if rc == 1 { Ok(()) } else { Err(if rc < 0 { io::Error::last_os_error() } else { io::Error::other("the poll was not submitted") }) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors we then own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) }, 0);
        // SAFETY: both are fresh descriptors.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn write(fd: &OwnedFd) {
        // SAFETY: two bytes from a valid buffer.
        assert_eq!(unsafe { libc::write(fd.as_raw_fd(), b"x\n".as_ptr().cast(), 2) }, 2);
    }

    fn empty(fd: &OwnedFd) {
        let mut buf = [0u8; 64];
        // SAFETY: into a valid buffer.
        while unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }

    #[test]
    fn a_write_from_this_thread_another_or_a_child_process_is_news_before_it_returns() {
        let (read_end, write_end) = pipe();
        let watch = match PipeWatch::new(read_end.as_raw_fd()) {
            Ok(watch) => watch,
            Err(e) => return eprintln!("io_uring refused here ({e}): the pipe is read at every look instead"),
        };
        let _ = watch.news(); // whatever arming found
        assert!(!watch.news(), "nothing written yet");
        for round in 0..3 {
            write(&write_end);
            assert!(watch.news(), "round {round}: a write by this thread");
            empty(&read_end);
            assert!(!watch.news(), "round {round}: taken");
        }
        std::thread::scope(|s| s.spawn(|| write(&write_end)).join().unwrap());
        assert!(watch.news(), "a write by another thread, joined");
        empty(&read_end);
        assert!(!watch.news());
        let status = std::process::Command::new("sh").args(["-c", "echo hi"]).stdout(write_end.try_clone().unwrap()).status().unwrap();
        assert!(status.success());
        assert!(watch.news(), "a write by a child process, waited for");
        empty(&read_end);
        // writes while nobody looks do not pile up: one look takes them all
        for _ in 0..100 {
            write(&write_end);
            empty(&read_end);
        }
        assert!(watch.news());
        assert!(!watch.news(), "one look took them all");
    }
}
