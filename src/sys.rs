//! The operating-system calls clusterman needs, each wrapped once. All of the crate's `unsafe`
//! outside the MPI layer is here.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock, mpsc};

mod uring;
pub(crate) use uring::PipeWatch;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// The stderr this process started with, kept open after stdio is redirected, for the
/// worker's own last words (a refused handshake, a lost master).
static ORIGINAL_STDERR: OnceLock<RawFd> = OnceLock::new();

/// Writes a line to the original stderr, even after stdio went to the master.
pub(crate) fn write_original_stderr(line: &str) {
    let fd = *ORIGINAL_STDERR.get().unwrap_or(&2);
    let text = format!("{line}\n");
    // SAFETY: writing a valid buffer to a file descriptor we own (or fd 2); errors ignored.
    unsafe { libc::write(fd, text.as_ptr().cast(), text.len()) };
}

/// Points fd 1 and 2 at a new pipe and returns its read end. Rust's `stdout()` then writes
/// into the pipe, and so does any C code or child process that inherits them.
pub(crate) fn redirect_stdio_to_pipe() -> io::Result<File> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills two fds into a valid array; dup/dup2/close act on fds we own.
    unsafe {
        check(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC))?;
        let saved = check(libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3))?;
        let _ = ORIGINAL_STDERR.set(saved);
        check(libc::dup2(fds[1], 1))?;
        check(libc::dup2(fds[1], 2))?;
        libc::close(fds[1]);
        Ok(File::from_raw_fd(fds[0]))
    }
}

/// Makes reads on `fd` return `WouldBlock` instead of waiting.
pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = check(libc::fcntl(fd, libc::F_GETFL))?;
        check(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK))?;
    }
    Ok(())
}

/// Blocks until `fd` is readable (or at end of file, or in error).
pub(crate) fn wait_readable(fd: RawFd) {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: poll on one valid pollfd; an interrupted poll just returns early.
    unsafe { libc::poll(&mut p, 1, -1) };
}

/// Points fd 1 and 2 at /dev/null, closing the pipe so the forwarder sees end of file.
pub(crate) fn detach_stdio() {
    // SAFETY: open/dup2/close on fds we own; a failure leaves stdio as it was.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            libc::close(null);
        }
    }
}

/// Environment variable: the OS pid of the master that spawned this worker locally.
pub(crate) const ENV_PARENT: &str = "CLUSTERMAN_PARENT";
/// Environment variable: the CPU a local worker pins itself to.
pub(crate) const ENV_CPU: &str = "CLUSTERMAN_CPU";
/// Environment variable: `batch` asks a local worker to run under `SCHED_BATCH`.
pub(crate) const ENV_SCHED: &str = "CLUSTERMAN_SCHED";

/// How a local child sets itself up first thing in `init()`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChildSettings {
    /// The master's OS pid: die with it.
    pub parent: Option<u32>,
    /// The CPU to pin to.
    pub cpu: Option<usize>,
    /// Run under `SCHED_BATCH`.
    pub batch: bool,
}

impl ChildSettings {
    /// The settings for a worker this process starts on this machine: it dies with this
    /// process.
    pub(crate) fn local_worker(cpu: Option<usize>, batch: bool) -> ChildSettings {
        ChildSettings { parent: Some(std::process::id()), cpu, batch }
    }

    /// The settings the master's [`ChildSettings::pass`] left in this process's environment.
    pub(crate) fn from_env() -> ChildSettings {
        ChildSettings {
            parent: std::env::var(ENV_PARENT).ok().and_then(|p| p.parse().ok()),
            cpu: std::env::var(ENV_CPU).ok().and_then(|c| c.parse().ok()),
            batch: std::env::var(ENV_SCHED).is_ok_and(|s| s == "batch"),
        }
    }

    /// Asks the child `cmd` starts for these settings. The child applies them itself
    /// ([`ChildSettings::apply`]): no `pre_exec` hook, so the standard library can use
    /// `posix_spawn` instead of copying the master's page tables with `fork` (which costs
    /// ~0.5 s per 8 workers for a master with 1 GiB of heap).
    pub(crate) fn pass(self, cmd: &mut Command) {
        if let Some(parent) = self.parent {
            cmd.env(ENV_PARENT, parent.to_string());
        }
        if let Some(cpu) = self.cpu {
            cmd.env(ENV_CPU, cpu.to_string());
        }
        if self.batch {
            cmd.env(ENV_SCHED, "batch");
        }
    }

    /// Child side: die with SIGKILL when the spawning thread of the master ends (children
    /// are spawned from one long-lived thread, see [`spawn`], so in practice when the master
    /// process ends, even by `kill -9`), pin to the CPU asked for, and take the batch policy
    /// where the system allows. Threads started afterwards inherit the pinning and the policy.
    pub(crate) fn apply(self) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        // SAFETY: prctl, getppid, sched_setaffinity with a zeroed, then filled, cpu set, and
        // sched_setscheduler with a valid parameter block.
        unsafe {
            if let Some(parent) = self.parent {
                check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::other("the master exited while this worker started"));
                }
            }
            if let Some(cpu) = self.cpu {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                check(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set))?;
            }
            if self.batch {
                // only a help to the master: a sandbox that refuses it leaves the default
                let param = libc::sched_param { sched_priority: 0 };
                let _ = libc::sched_setscheduler(0, libc::SCHED_BATCH, &param);
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = self;
        Ok(())
    }
}

/// For a child that is not our own binary (a `qrsh` or `bpsh` client): set its death
/// signal between fork and exec. Costs one `fork` of the master; workers use
/// [`ChildSettings::pass`] instead.
pub(crate) fn die_with_master(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // syscalls (prctl, getppid, _exit).
    unsafe {
        use std::os::unix::process::CommandExt;
        let parent = libc::getpid();
        cmd.pre_exec(move || {
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// For a launcher whose output pipes lead to the master: if the master dies, writing its
/// output must fail with an error, not kill it (by `SIGPIPE`) before it has stopped its
/// workers and cleaned up.
pub(crate) fn survive_broken_pipes(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls signal(2), which is
    // async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            Ok(())
        });
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as the process: PR_SET_PDEATHSIG fires when
/// the *spawning thread* exits, so spawning from a short-lived user thread would kill the
/// workers with it.
pub(crate) fn spawn(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("cman-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(retry_busy(|| cmd.spawn()));
                }
            })
            .expect("cannot start the spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock().expect("spawner lock").send((cmd, reply_tx)).map_err(|_| io::Error::other("spawner thread is gone"))?;
    reply_rx.recv().map_err(|_| io::Error::other("spawner thread is gone"))?
}

/// Runs `start` (a spawn) again while its program is "text file busy": a script written
/// just before may still be open for writing in a child another thread forked, until that
/// child execs. Gives up after about half a second.
pub(crate) fn retry_busy<T>(mut start: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut pause = std::time::Duration::from_millis(5);
    loop {
        match start() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && pause < std::time::Duration::from_millis(300) => {
                std::thread::sleep(pause);
                pause *= 2;
            }
            done => return done,
        }
    }
}

/// The CPUs this thread may run on (its affinity mask: a cpuset, `taskset`, a Slurm
/// allocation); `None` where that cannot be read.
pub(crate) fn allowed_cpus() -> Option<Vec<usize>> {
    #[cfg(target_os = "linux")]
    // SAFETY: sched_getaffinity fills a zeroed cpu set of the size we pass.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        Some((0..libc::CPU_SETSIZE as usize).filter(|&cpu| libc::CPU_ISSET(cpu, &set)).collect())
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// This program's file, which workers run. A file replaced since the start (a rebuild) or
/// deleted is an error that says what happened and what to do: the kernel then names the
/// old file `<path> (deleted)`, which no worker can run.
pub(crate) fn own_program() -> Result<std::path::PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program's file (/proc/self/exe): {e}"))?;
    let Some(original) = exe.to_str().and_then(|p| p.strip_suffix(" (deleted)")) else { return Ok(exe) };
    Err(if std::path::Path::new(original).exists() {
        format!("{original} was replaced since this program started (rebuilt?), so workers would run another build; restart the program")
    } else {
        format!("{original} was deleted since this program started, and workers run that file; restore it, or restart the program")
    })
}

/// Sends `signal` to process `pid` (ignores a process that is already gone).
pub(crate) fn kill(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) with a pid we started; no memory involved.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// The host name of this machine.
pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The first IPv4 address of an interface that is up and not loopback: the address other
/// hosts most likely reach this one at.
pub(crate) fn first_non_loopback_ipv4() -> Option<std::net::Ipv4Addr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free exactly once.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return None;
        }
        let mut found = None;
        let mut cur = list;
        while !cur.is_null() {
            let ifa = &*cur;
            let up = ifa.ifa_flags & libc::IFF_UP as libc::c_uint != 0;
            let loopback = ifa.ifa_flags & libc::IFF_LOOPBACK as libc::c_uint != 0;
            if up && !loopback && !ifa.ifa_addr.is_null() && (*ifa.ifa_addr).sa_family as libc::c_int == libc::AF_INET {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                found = Some(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
                break;
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
        found
    }
}

/// Sends as much of `parts`, in order, as the socket takes now with one call, without waiting
/// and without SIGPIPE; returns how many bytes went (0 when the send buffer is full). A
/// frame in one piece (nearly all) goes with `send`, which the kernel takes with less work
/// than a message of slices.
#[inline]
pub(crate) fn send_vectored_nonblocking(fd: RawFd, parts: &[io::IoSlice<'_>]) -> io::Result<usize> {
    const FLAGS: i32 = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    let whole = parts.iter().skip(1).all(|p| p.is_empty()).then(|| parts.first()).flatten();
    loop {
        let n = match whole {
            // SAFETY: send(2) reads the slice, which outlives the call.
            Some(part) => unsafe { direct::send(fd, part.as_ptr(), part.len(), FLAGS) },
            None => {
                // SAFETY: a zeroed msghdr is valid (no address, no control data).
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                // IoSlice is ABI-compatible with iovec; sendmsg only reads them
                msg.msg_iov = parts.as_ptr() as *mut libc::iovec;
                msg.msg_iovlen = parts.len() as _;
                // SAFETY: sendmsg(2) reads the `parts` slices, which outlive the call.
                direct::outcome(unsafe { libc::sendmsg(fd, &msg, FLAGS) })
            }
        };
        match n {
            Ok(n) => return Ok(n),
            Err(libc::EINTR) => {}
            Err(libc::EAGAIN) => return Ok(0),
            Err(e) => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// Reads what the non-blocking `fd` holds now into `buf`: `Ok(None)` when it holds nothing
/// (told by the error number alone: a worker reads its output pipe this way before every
/// reply, and it is nearly always empty); `Ok(Some(0))` at end of file.
pub(crate) fn read_ready(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        match unsafe { direct::read(fd, buf.as_mut_ptr(), buf.len()) } {
            Ok(n) => return Ok(Some(n)),
            Err(libc::EAGAIN) => return Ok(None),
            Err(libc::EINTR) => {}
            Err(e) => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// Receives at most `len` bytes into `ptr`; interrupted calls are repeated. With `wait`, as
/// the socket says (a blocking socket waits for bytes, up to its receive timeout, then
/// `WouldBlock`); without, it never waits (`WouldBlock` at once).
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
#[inline]
pub(crate) unsafe fn recv_into(fd: RawFd, ptr: *mut u8, len: usize, wait: bool) -> io::Result<usize> {
    let flags = if wait { 0 } else { libc::MSG_DONTWAIT };
    loop {
        // SAFETY: the caller gives `len` writable bytes at `ptr`.
        match unsafe { direct::recv(fd, ptr, len, flags) } {
            Ok(n) => return Ok(n),
            Err(libc::EINTR) => {}
            Err(e) => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// The system calls of every call a worker serves (`recv` the call, `send` the reply, and
/// `read` its output pipe where that is not watched), made without libc where the instruction is at hand. Among a
/// thousand workers on two cores each call finds its TLB and caches cold, and libc's
/// wrappers (with their cancellation points and `errno`) cost pages of their own. Each
/// returns the count, or the error number.
mod direct {
    use std::os::fd::RawFd;

    /// `Ok(n)` for a count, `Err(errno)` for a failure, from libc's convention.
    #[inline]
    pub(super) fn outcome(n: isize) -> Result<usize, i32> {
        if n >= 0 { Ok(n as usize) } else { Err(super::errno()) }
    }

    /// # Safety
    /// `ptr` must be valid for writes of `len` bytes.
    #[inline]
    pub(super) unsafe fn recv(fd: RawFd, ptr: *mut u8, len: usize, flags: i32) -> Result<usize, i32> {
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        // SAFETY: recvfrom(2) with no address writes at most `len` bytes at `ptr`.
        return kernel(unsafe { syscall6(libc::SYS_recvfrom, fd as usize, ptr as usize, len, flags as usize, 0, 0) });
        #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
        // SAFETY: as above.
        return outcome(unsafe { libc::recv(fd, ptr.cast(), len, flags) });
    }

    /// # Safety
    /// `ptr` must be valid for reads of `len` bytes.
    #[inline]
    pub(super) unsafe fn send(fd: RawFd, ptr: *const u8, len: usize, flags: i32) -> Result<usize, i32> {
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        // SAFETY: sendto(2) with no address reads `len` bytes at `ptr`.
        return kernel(unsafe { syscall6(libc::SYS_sendto, fd as usize, ptr as usize, len, flags as usize, 0, 0) });
        #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
        // SAFETY: as above.
        return outcome(unsafe { libc::send(fd, ptr.cast(), len, flags) });
    }

    /// # Safety
    /// `ptr` must be valid for writes of `len` bytes.
    #[inline]
    pub(super) unsafe fn read(fd: RawFd, ptr: *mut u8, len: usize) -> Result<usize, i32> {
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        // SAFETY: read(2) writes at most `len` bytes at `ptr`.
        return kernel(unsafe { syscall6(libc::SYS_read, fd as usize, ptr as usize, len, 0, 0, 0) });
        #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
        // SAFETY: as above.
        return outcome(unsafe { libc::read(fd, ptr.cast(), len) });
    }

    /// The kernel's convention: -4095..-1 is an error number.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[inline]
    fn kernel(ret: isize) -> Result<usize, i32> {
        if (-4095..0).contains(&ret) { Err(-ret as i32) } else { Ok(ret as usize) }
    }

    /// # Safety
    /// The arguments must make a valid call `nr`: the kernel reads and writes the memory
    /// they point to.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[inline]
    unsafe fn syscall6(nr: libc::c_long, a: usize, b: usize, c: usize, d: usize, e: usize, f: usize) -> isize {
        let ret: isize;
        // SAFETY: the x86-64 Linux system call convention: number in rax, arguments in
        // rdi, rsi, rdx, r10, r8, r9; the kernel clobbers rcx and r11. No `nomem`: the
        // kernel may read and write the memory the arguments point to.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") nr as isize => ret,
                in("rdi") a, in("rsi") b, in("rdx") c, in("r10") d, in("r8") e, in("r9") f,
                lateout("rcx") _, lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }
}

/// The calling thread's error number, read without building an `io::Error`.
fn errno() -> i32 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    // SAFETY: __errno_location returns this thread's errno, valid for its life.
    return unsafe { *libc::__errno_location() };
    #[cfg(target_vendor = "apple")]
    // SAFETY: as above, under its name on Apple systems.
    return unsafe { *libc::__error() };
    #[cfg(not(any(target_os = "linux", target_os = "android", target_vendor = "apple")))]
    return io::Error::last_os_error().raw_os_error().unwrap_or(0);
}

/// Raises this process's soft limit on open files to the hard limit (a master needs about
/// two descriptors per worker); returns the limit now in force.
pub(crate) fn raise_open_files_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

/// This process's soft limit on open files.
pub(crate) fn open_files_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit with a valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_cur
}

/// True for the errors that mean "out of file descriptors".
pub(crate) fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// What the kernel knows about a TCP connection the application may not be reading.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TcpPulse {
    /// Time since the last data arrived from the peer (read or not).
    pub since_data: std::time::Duration,
    /// Bytes received and not yet read.
    pub unread: usize,
    /// The peer closed its side, or the connection failed.
    pub closed: bool,
}

/// Reads [`TcpPulse`] of socket `fd` (Linux: `TCP_INFO`, `FIONREAD`, `poll(POLLRDHUP)`).
pub(crate) fn tcp_pulse(fd: RawFd) -> Option<TcpPulse> {
    #[cfg(target_os = "linux")]
    // SAFETY: getsockopt fills at most `len` bytes of a u32 array; ioctl(FIONREAD) writes one
    // int; poll reads one pollfd. All on a descriptor the caller owns.
    unsafe {
        // struct tcp_info: 8 one-byte fields, then u32s; tcpi_last_data_recv is the 14th u32
        let mut info = [0u32; 26];
        let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
        if libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len) != 0 || (len as usize) < 14 * 4 {
            return None;
        }
        let last_data_recv_ms = info[13];
        let mut unread: libc::c_int = 0;
        libc::ioctl(fd, libc::FIONREAD, &mut unread);
        let mut p = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
        libc::poll(&mut p, 1, 0);
        let closed = p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0;
        Some(TcpPulse { since_data: std::time::Duration::from_millis(last_data_recv_ms.into()), unread: unread.max(0) as usize, closed })
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = fd;
        None
    }
}

/// Fields of `/proc/<pid>/stat` after the command name (field 3, the state, is index 0).
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(')')?.1.split_whitespace().map(String::from).collect())
}

/// Threads of this process (`None` where it cannot be told).
pub(crate) fn thread_count() -> Option<usize> {
    stat_fields("self")?.get(17)?.parse().ok()
}

/// Removes `name` from the environment and overwrites its value in the process's initial
/// environment block, which is what `/proc/<pid>/environ` shows for the whole life of the
/// process. Returns false (and changes nothing) unless this is the process's only thread:
/// changing the environment while another thread may read it is undefined behaviour.
pub(crate) fn scrub_env(name: &str) -> bool {
    if thread_count() != Some(1) {
        return false;
    }
    #[cfg(target_os = "linux")]
    if let Some(fields) = stat_fields("self") {
        // env_start and env_end are fields 50 and 51
        let bound = |i: usize| fields.get(i).and_then(|f| f.parse::<usize>().ok());
        if let (Some(start), Some(end)) = (bound(47), bound(48)) {
            let key = format!("{name}=");
            // SAFETY: [start, end) is this process's initial environment block, mapped and
            // writable for the life of the process (it sits on the initial stack); we are the
            // only thread, so nobody reads it while it changes.
            unsafe {
                let block = std::slice::from_raw_parts_mut(start as *mut u8, end.saturating_sub(start));
                let mut at = 0;
                while at < block.len() {
                    let len = block[at..].iter().position(|&b| b == 0).unwrap_or(block.len() - at);
                    if block[at..at + len].starts_with(key.as_bytes()) {
                        block[at + key.len()..at + len].fill(b'0');
                    }
                    at += len + 1;
                }
            }
        }
    }
    // SAFETY: this is the process's only thread (checked above).
    unsafe { std::env::remove_var(name) };
    true
}

/// Blocks until `fd` is readable or `timeout` passes; true if readable (or closed).
pub(crate) fn wait_readable_for(fd: RawFd, timeout: std::time::Duration) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: poll on one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// A counter that wakes whoever waits on it, in an epoll set or a poll (an eventfd, non-blocking).
pub(crate) fn bell() -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: eventfd makes a new descriptor, owned from here on.
    unsafe { Ok(std::os::fd::OwnedFd::from_raw_fd(check(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK))?)) }
}

/// A new epoll set (close-on-exec).
pub(crate) fn epoll() -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: epoll_create1 makes a new descriptor, owned from here on.
    unsafe { Ok(std::os::fd::OwnedFd::from_raw_fd(check(libc::epoll_create1(libc::EPOLL_CLOEXEC))?)) }
}

/// Adds `fd` to `epoll`, edge-triggered for input and its end, tagged `data`. What `fd`
/// holds already counts as an edge.
pub(crate) fn epoll_add(epoll: RawFd, fd: RawFd, data: u64) -> io::Result<()> {
    let mut event = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32, u64: data };
    // SAFETY: a valid event for two descriptors the caller holds.
    check(unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event) }).map(drop)
}

/// Takes `fd` out of `epoll` (before `fd` closes: a duplicate would keep it in).
pub(crate) fn epoll_remove(epoll: RawFd, fd: RawFd) {
    // SAFETY: a null event is allowed for EPOLL_CTL_DEL; an fd not in the set only fails.
    unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
}

/// The events of `epoll` ready now (no wait), into `events`; how many.
pub(crate) fn epoll_ready(epoll: RawFd, events: &mut [libc::epoll_event]) -> usize {
    let max = events.len().min(i32::MAX as usize) as libc::c_int;
    // SAFETY: `events` has room for `max` events.
    let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), max, 0) };
    n.max(0) as usize
}

/// Silences `bell` (takes its rings).
pub(crate) fn hush(bell: RawFd) {
    let mut count = 0u64;
    // SAFETY: reading an eventfd's 8-byte counter (non-blocking).
    unsafe { libc::read(bell, (&raw mut count).cast(), 8) };
}

/// Rings `bell`: whoever waits on it wakes.
pub(crate) fn ring(bell: RawFd) {
    let one = 1u64;
    // SAFETY: writing 8 bytes to an eventfd; a full counter only means it rang already.
    unsafe { libc::write(bell, (&raw const one).cast(), 8) };
}

/// True if process `pid` descends from process `ancestor` (walks the parent chain).
pub(crate) fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut current = pid;
    for _ in 0..64 {
        if current == ancestor {
            return true;
        }
        match stat_fields(&current.to_string()).and_then(|f| f.get(1)?.parse::<u32>().ok()) {
            Some(parent) if parent > 1 => current = parent,
            _ => return false,
        }
    }
    false
}

/// This process's real user id.
pub(crate) fn uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// Ends the process at once, from any thread, without running exit handlers (which could
/// wait on locks held by a thread that is stuck in user code).
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit is always safe to call; it does not return.
    unsafe { libc::_exit(code) }
}

/// Shuts a socket down both ways: its peer sees the end, a thread reading it wakes up.
pub(crate) fn shutdown(fd: RawFd) {
    // SAFETY: shutdown(2) on a socket descriptor the caller owns; errors are ignored.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// Makes the `len` bytes at `ptr` memory now (page faults here rather than in the first
/// write to them); false where the system cannot (before Linux 5.14).
pub(crate) fn populate(ptr: *mut u8, len: usize) -> bool {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    let page = ptr as usize & !4095; // madvise takes whole pages; the first is the allocation's too
    // SAFETY: populating changes no contents; the pages hold the caller's allocation.
    unsafe { libc::madvise(page as *mut libc::c_void, ptr as usize + len - page, MADV_POPULATE_WRITE) == 0 }
}

/// Asks for transparent huge pages behind the whole 2 MiB pages of `len` bytes at `ptr`,
/// before they are first written: a big buffer then costs one page fault per 2 MiB instead
/// of one per 4 KiB (the faults, not the copy, are most of the cost of filling fresh
/// memory). A hint: where huge pages are off, nothing changes.
pub(crate) fn prefer_huge_pages(ptr: *mut u8, len: usize) {
    const HUGE: usize = 2 << 20;
    let start = (ptr as usize).next_multiple_of(HUGE);
    let end = (ptr as usize + len) / HUGE * HUGE;
    if end > start {
        // SAFETY: the range lies inside the caller's allocation; MADV_HUGEPAGE changes no contents.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

/// Asks the CPU to bring the `bytes` at `at` into its caches ahead of their use. Among a
/// thousand workers on a few cores, what one call touches lies cold (the processes that ran
/// in between evicted it), and misses taken one after the other, each waiting for the last,
/// cost far more than the same misses taken at once. A hint: it never faults, whatever the
/// address, and does nothing on other architectures.
#[inline(always)]
pub(crate) fn prefetch<T: ?Sized>(at: *const T, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..bytes).step_by(64) {
        // SAFETY: a prefetch of any address is allowed: it neither faults nor reads into
        // the program.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast::<i8>().wrapping_add(line)) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, bytes);
}

/// Where some state lies and how big it is, to [`prefetch`] it later. Only a hint: nothing
/// is read through it, so it may outlive what it points to.
#[derive(Clone, Copy, Default)]
pub(crate) struct Hint {
    at: usize,
    bytes: usize,
}

impl Hint {
    /// Where `value` lies.
    pub(crate) fn of<T: ?Sized>(value: &T) -> Hint {
        Hint::raw((value as *const T).cast(), std::mem::size_of_val(value))
    }

    /// The `bytes` at `at`.
    pub(crate) fn raw(at: *const u8, bytes: usize) -> Hint {
        Hint { at: at as usize, bytes }
    }

    /// Brings it into the caches.
    #[inline(always)]
    pub(crate) fn prefetch(self) {
        prefetch(self.at as *const u8, self.bytes);
    }
}
