//! The operating-system calls clusterman needs, each wrapped once. All of the crate's `unsafe`
//! outside the MPI layer is here.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock, mpsc};

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

/// Asks a local child to die with the master and, if `cpu` is given, to pin itself there.
/// The child does both first thing in `init()`: no `pre_exec` hook, so the standard
/// library can use `posix_spawn` instead of copying the master's page tables with `fork`
/// (which costs ~0.5 s per 8 workers for a master with 1 GiB of heap).
pub(crate) fn prepare_child(cmd: &mut Command, cpu: Option<usize>) {
    cmd.env(ENV_PARENT, std::process::id().to_string());
    if let Some(cpu) = cpu {
        cmd.env(ENV_CPU, cpu.to_string());
    }
}

/// Child side of [`prepare_child`]: die with SIGKILL when the spawning thread of the master
/// ends (children are spawned from one long-lived thread, see [`spawn`], so in practice
/// when the master process ends, even by `kill -9`), and pin to the CPU asked for.
pub(crate) fn apply_child_settings(parent: Option<u32>, cpu: Option<usize>) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl, getppid and sched_setaffinity with a zeroed, then filled, cpu set.
    unsafe {
        if let Some(parent) = parent {
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
            if libc::getppid() as u32 != parent {
                return Err(io::Error::other("the master exited while this worker started"));
            }
        }
        if let Some(cpu) = cpu {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            check(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set))?;
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (parent, cpu);
    Ok(())
}

/// For a child that is not our own binary (a launcher such as `mpirun`): set its death
/// signal between fork and exec. Costs one `fork` of the master; workers use
/// [`prepare_child`] instead.
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
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock().expect("spawner lock").send((cmd, reply_tx)).map_err(|_| io::Error::other("spawner thread is gone"))?;
    reply_rx.recv().map_err(|_| io::Error::other("spawner thread is gone"))?
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
