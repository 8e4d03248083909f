//! Shared helpers for the integration tests: waiting on conditions with deadlines, reading
//! process state from /proc, a minimal executor for `RemoteFuture` as a `Future`.

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

/// Polls `cond` until it is true or `timeout` passes; returns whether it became true.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True while the process exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().and_then(|s| s.split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

/// `Cpus_allowed_list` of a process, parsed.
pub fn cpus_allowed(pid: u32) -> Vec<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let line = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")).expect("Cpus_allowed_list");
    let list = line.split(':').nth(1).unwrap().trim();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    cpus
}

struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs a future to completion on this thread (enough to test `impl Future`).
pub fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// A fresh directory in this test process's scratch root (for job working directories).
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = scratch_root().join(format!("{tag}-{}", rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// This test process's scratch root in the system temp dir, `cman-test-<pid>.<pid namespace>`:
/// removed with all it holds when the process exits, unless `CMAN_KEEP_TEST_DIRS` is set (to
/// read a failed test's job logs). A process that is killed (a master some test kills on
/// purpose) runs no exit hook: its root goes when the next test process of its PID namespace
/// starts (the multi-node tests' nodes share /tmp, each with PIDs of its own).
fn scratch_root() -> &'static std::path::Path {
    static ROOT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    extern "C" fn remove_root() {
        if let Some(root) = ROOT.get() {
            let _ = std::fs::remove_dir_all(root);
        }
    }
    ROOT.get_or_init(|| {
        let (tmp, namespace) = (std::env::temp_dir(), pid_namespace());
        if std::env::var_os("CMAN_KEEP_TEST_DIRS").is_none() {
            remove_roots_of_killed_processes(&tmp, namespace);
            // SAFETY: registers a plain function, run once by `exit` (the test harness ends so)
            unsafe { libc::atexit(remove_root) };
        }
        tmp.join(format!("cman-test-{}.{namespace}", std::process::id()))
    })
}

/// This process's PID namespace (the inode `/proc/self/ns/pid` names; 0 if unreadable).
fn pid_namespace() -> u64 {
    let link = std::fs::read_link("/proc/self/ns/pid").unwrap_or_default();
    link.to_string_lossy().trim_start_matches("pid:[").trim_end_matches(']').parse().unwrap_or(0)
}

/// Removes the scratch roots in `tmp` of test processes of `namespace` that no longer exist.
fn remove_roots_of_killed_processes(tmp: &std::path::Path, namespace: u64) {
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((pid, ns)) = name.to_str().and_then(|n| n.strip_prefix("cman-test-")).and_then(|rest| rest.split_once('.')) else { continue };
        let (Ok(pid), Ok(ns)) = (pid.parse::<libc::pid_t>(), ns.parse::<u64>()) else { continue };
        // SAFETY: signal 0 sends nothing; it only asks whether the process exists
        let gone = ns == namespace && unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
}

/// True if `program --help`-style probing finds the command on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// Whether the real scheduler daemons must be there (scripts/test.sh starts them and sets
/// this); otherwise a test without them says so and does nothing.
pub fn schedulers_required() -> bool {
    std::env::var_os("CMAN_REQUIRE_SCHEDULERS").is_some()
}

/// Output of a command (stdout), panicking with its stderr if it fails.
pub fn output_of(argv: &[&str]) -> String {
    let out = std::process::Command::new(argv[0]).args(&argv[1..]).output().unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(out.status.success(), "{argv:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads `WORKERS <os pid> ...` from a child's stdout (with a deadline).
pub fn read_workers_line(stdout: impl std::io::Read + Send + 'static, timeout: Duration) -> Vec<u32> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("WORKERS ") {
                let _ = tx.send(rest.split_whitespace().map(|p| p.parse::<u32>().unwrap()).collect::<Vec<_>>());
            }
        }
    });
    rx.recv_timeout(timeout).expect("the child reports its workers")
}

/// A command prefix that puts `tests/fixtures/<dir>` (fake scheduler CLIs) first on PATH
/// for every scheduler command, the cancel guard's included.
pub fn fixtures_prefix(dir: &str) -> Vec<String> {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(dir);
    vec!["env".into(), format!("PATH={}:{}", fixtures.display(), std::env::var("PATH").unwrap_or_default())]
}

/// Job options for a scheduler test: a unique name, a scratch working directory, a 60 s
/// launch timeout, and the variables Open MPI needs here (see [`open_mpi_here`]).
pub fn test_job(tag: &str) -> clusterman::launch::scheduler::JobOptions {
    open_mpi_here(clusterman::launch::scheduler::JobOptions::new().name(format!("cman-{tag}-{}", std::process::id())).workdir(temp_dir(tag)).launch_timeout(Duration::from_secs(60)))
}

/// `job` with the variables Open MPI needs to run as root (CI runs as root) and with more
/// ranks than cores.
pub fn open_mpi_here(job: clusterman::launch::scheduler::JobOptions) -> clusterman::launch::scheduler::JobOptions {
    job.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").env("OMPI_MCA_rmaps_base_oversubscribe", "1")
}

/// Asserts that `world`'s ranks are one MPI world of `n`: after a barrier, each reports its
/// rank and the world's size.
pub fn assert_one_world<M: clusterman::MpiRanks + ?Sized>(world: &M, n: i32) {
    let ranks: Vec<(i32, i32)> = clusterman::mpido!(*world, |comm| {
        comm.barrier();
        (comm.rank(), comm.size())
    })
    .unwrap();
    assert_eq!(ranks, (0..n).map(|r| (r, n)).collect::<Vec<_>>(), "one MPI world of {n}");
}

/// The OS pids of these workers.
pub fn worker_os_pids(cluster: &clusterman::Cluster, pids: &[clusterman::Pid]) -> Vec<u32> {
    pids.iter().map(|p| cluster.worker_info(*p).unwrap().os_pid).collect()
}

/// Waits (up to 10 s) until none of these processes is alive.
pub fn assert_gone(os_pids: &[u32]) {
    assert!(wait_until(Duration::from_secs(10), || os_pids.iter().all(|p| !process_alive(*p))), "still alive: {os_pids:?}");
}

/// The process groups a fake scheduler started for one job (`<dir>/*.pgid`).
pub fn fake_job_groups(dir: &std::path::Path) -> Vec<u32> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let path = e.ok()?.path();
            (path.extension()? == "pgid").then(|| std::fs::read_to_string(&path).ok()?.parse().ok()).flatten()
        })
        .collect()
}

/// A network namespace joined to this one by a veth pair with private addresses.
pub struct Netns {
    /// The namespace's name (for `ip netns exec`).
    pub name: String,
    /// This side's end of the veth pair.
    pub host_if: String,
    /// This side's address on the pair; the namespace has `.2`.
    pub host_ip: String,
}

impl Netns {
    /// Cuts the link: the namespace can no longer reach this side, nor this side it.
    pub fn cut(&self) {
        let _ = std::process::Command::new("ip").args(["link", "set", &self.host_if, "down"]).status();
    }

    /// Creates namespace `cmanel<tag>` and its veth pair (needs root).
    pub fn create(tag: u32) -> Result<Netns, String> {
        let name = format!("cmanel{tag}");
        let host_if = format!("cmh{tag}");
        let peer_if = format!("cmp{tag}");
        let net = 200 + (tag % 50);
        let run = |args: &[&str]| -> Result<(), String> {
            let s = std::process::Command::new("ip").args(args).status().map_err(|e| format!("cannot run ip: {e}"))?;
            if s.success() { Ok(()) } else { Err(format!("`ip {}` failed (needs root)", args.join(" "))) }
        };
        run(&["netns", "add", &name])?;
        let ns = Netns { name: name.clone(), host_if: host_if.clone(), host_ip: format!("10.{net}.0.1") };
        run(&["link", "add", &host_if, "type", "veth", "peer", "name", &peer_if])?;
        run(&["link", "set", &peer_if, "netns", &name])?;
        run(&["addr", "add", &format!("10.{net}.0.1/24"), "dev", &host_if])?;
        run(&["link", "set", &host_if, "up"])?;
        run(&["netns", "exec", &name, "ip", "addr", "add", &format!("10.{net}.0.2/24"), "dev", &peer_if])?;
        run(&["netns", "exec", &name, "ip", "link", "set", &peer_if, "up"])?;
        run(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"])?;
        run(&["netns", "exec", &name, "ip", "route", "add", "default", "via", &format!("10.{net}.0.1")])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &self.host_if]).status();
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}


/// Where the user `nobody` finds `secret` (empty: nowhere): every process's command line
/// and environment, every file it can read under `dirs`, and the output of `commands` run as
/// nobody (`qstat -j 42`, `scontrol show job 42`), plus `ps auxeww`. `None` where `runuser`
/// or the user `nobody` is missing (not root).
pub fn secret_seen_by_nobody(secret: &str, dirs: &[&std::path::Path], commands: &[String]) -> Option<Vec<String>> {
    const SCAN: &str = r#"
pattern=$1; shift; dirs=$1; shift
hit() { grep -qaF -f "$pattern" && echo "FOUND $1"; }
for p in /proc/[0-9]*; do
  cat "$p/cmdline" 2>/dev/null | hit "command line of ${p#/proc/}"
  cat "$p/environ" 2>/dev/null | hit "environment of ${p#/proc/}"
done
for d in $dirs; do
  find "$d" -type f -readable 2>/dev/null | while read -r f; do hit "file $f" < "$f"; done
done
for c in "$@"; do sh -c "$c" 2>&1 | hit "output of: $c"; done
ps auxeww 2>&1 | hit "ps auxeww"
echo SCANNED
"#;
    let dirs = dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(" ");
    // the pattern goes in a file (outside every scanned place): on a command line the scan
    // would find itself
    let pattern = std::path::PathBuf::from(format!("/dev/shm/cman-pattern-{}-{}", std::process::id(), rand_suffix()));
    std::fs::write(&pattern, format!("{secret}\n")).ok()?;
    std::fs::set_permissions(&pattern, std::os::unix::fs::PermissionsExt::from_mode(0o644)).ok()?;
    let out = std::process::Command::new("runuser").args(["-u", "nobody", "--", "sh", "-c", SCAN, "scan"]).arg(&pattern).arg(&dirs).args(commands).output();
    let _ = std::fs::remove_file(&pattern);
    let out = out.ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.contains("SCANNED") {
        return None;
    }
    Some(text.lines().filter_map(|l| l.strip_prefix("FOUND ")).map(String::from).collect())
}

/// Whether the secret appears in any of these processes' environments or command lines, as
/// this (root) process sees them.
pub fn secret_in_processes(secret: &str, os_pids: &[u32]) -> Vec<String> {
    let mut found = Vec::new();
    for pid in os_pids {
        for what in ["environ", "cmdline"] {
            if std::fs::read(format!("/proc/{pid}/{what}")).is_ok_and(|b| b.windows(secret.len()).any(|w| w == secret.as_bytes())) {
                found.push(format!("{what} of {pid}"));
            }
        }
    }
    found
}

/// Asserts that the user `nobody` finds `secret` nowhere (see [`secret_seen_by_nobody`]). Where
/// no scan can run (not root), says so, unless the test run requires the schedulers (CI).
pub fn assert_nobody_finds(secret: &str, dirs: &[&std::path::Path], commands: &[String]) {
    match secret_seen_by_nobody(secret, dirs, commands) {
        Some(found) => assert!(found.is_empty(), "the user nobody found the secret: {found:?}"),
        None if schedulers_required() => panic!("cannot run a scan as the user nobody"),
        None => eprintln!("skipped the scan as nobody: runuser or the user nobody is missing"),
    }
}

/// Files of `<dir>/.clusterman/` (the secret files of launches).
pub fn secret_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir.join(".clusterman")).map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect()).unwrap_or_default()
}

/// The launcher that matches the MPI this binary was built with: `CMAN_MPIEXEC`, else
/// `mpirun` (the MPICH run of the suite sets `mpiexec.mpich`).
#[allow(dead_code)]
pub fn mpi_launcher() -> String {
    std::env::var("CMAN_MPIEXEC").unwrap_or_else(|_| "mpirun".into())
}

/// The hosts that the `mpirun` (or `mpiexec`) this process descends from read from its
/// `-hostfile`, or `None` when no such launcher or flag is found among its ancestors.
#[allow(dead_code)]
pub fn launcher_hostfile() -> Option<Vec<String>> {
    let mut pid = std::process::id();
    while pid > 1 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        pid = stat.rsplit_once(") ")?.1.split_whitespace().nth(1)?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let argv: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let name = std::path::Path::new(&argv[0]).file_name()?.to_string_lossy().into_owned();
        if name.starts_with("mpirun") || name.starts_with("mpiexec") {
            let file = argv.iter().position(|a| a == "-hostfile").and_then(|i| argv.get(i + 1))?;
            return Some(std::fs::read_to_string(file).ok()?.lines().map(String::from).collect());
        }
    }
    None
}

/// The ranks' part of a whole-program job (`BatchManager::run_as_job`), run on every rank
/// of the job: over the transport `CMAN_TRANSPORT` names, rank 0 prints `WHOLE world=<n>
/// sum=<allreduce of rank+1> transport=<t>`, then (with `CMAN_HOLD`) `HOLDING` and waits,
/// and exits with the status `CMAN_EXIT` names.
#[allow(dead_code)]
pub fn whole_program_ranks() {
    use clusterman::mpi::{SystemOperation, Transport, start_main_loop};
    let named = std::env::var("CMAN_TRANSPORT").unwrap_or_default();
    let transport = if named == "tcp" { Transport::Tcp } else { Transport::Mpi };
    let mgr = start_main_loop(transport).unwrap(); // ranks > 0 never return
    let size = mgr.cluster().unwrap().nprocs();
    let sums: Vec<i32> = clusterman::mpido!(mgr, |comm| {
        let mut sum = 0;
        comm.all_reduce_into(&(comm.rank() + 1), &mut sum, SystemOperation::sum());
        sum
    })
    .unwrap();
    let hosts: std::collections::BTreeSet<String> = clusterman::mpido!(mgr, |_comm| std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string()).unwrap().into_iter().collect();
    println!("HOSTS {}", hosts.into_iter().collect::<Vec<_>>().join(","));
    println!("WHOLE world={size} sum={} transport={named}", sums[0]);
    if std::env::var_os("CMAN_HOLD").is_some() {
        println!("HOLDING");
        std::thread::sleep(Duration::from_secs(120));
    }
    mgr.shutdown().unwrap();
    std::process::exit(std::env::var("CMAN_EXIT").ok().and_then(|c| c.parse().ok()).unwrap_or(0));
}

/// Starts this test binary's ignored test `whole_program` as a login-node program that
/// submits itself with `run_as_job`, as job `name`, over `transport`, exiting with `exit`.
#[allow(dead_code)]
pub fn start_whole_program(name: &str, transport: &str, exit: i32, hold: bool) -> std::process::Child {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--ignored", "--exact", "whole_program", "--nocapture", "--test-threads=1"]).env("CMAN_JOB_NAME", name).env("CMAN_TRANSPORT", transport).env("CMAN_EXIT", exit.to_string());
    if hold {
        cmd.env("CMAN_HOLD", "1");
    }
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
}

/// The whole-program checks on one scheduler (a world of 3): over both transports, the
/// ranks' output comes back and the local process exits with the job's status; killed with
/// `kill -9` while the job runs (its output streaming back meanwhile), the job goes.
/// `name_of` names a test's job; `listed` says whether a job of that name is in the queue.
#[allow(dead_code)]
pub fn check_whole_program(name_of: impl Fn(&str) -> String, timeout: Duration, listed: impl Fn(&str) -> bool) {
    let gone = |name: &str| assert!(wait_until(Duration::from_secs(20), || !listed(name)), "job {name} is still in the queue");
    let runs: Vec<_> = [("mpi", 0), ("tcp", 7)].into_iter().map(|(transport, exit)| {
        let name = name_of(&format!("whole-{transport}"));
        (transport, exit, name.clone(), start_whole_program(&name, transport, exit, false))
    }).collect();
    for (transport, exit, name, child) in runs {
        let (status, out, err) = output_within(child, timeout);
        assert!(out.contains(&format!("WHOLE world=3 sum=6 transport={transport}\n")), "the ranks' output comes back:\n{out}\n{err}");
        assert_eq!(status.code(), Some(exit), "the job's status is the program's:\n{out}\n{err}");
        gone(&name);
    }
    let name = name_of("whole-killed");
    let mut child = start_whole_program(&name, "mpi", 0, true);
    let lines = lines_of(&mut child);
    expect_line(&mut child, &lines, "HOLDING", timeout); // output streams back while the job runs
    assert!(listed(&name), "the job runs");
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    gone(&name);
}

/// The job options of a whole-program job: named `name`, carrying the test's variables.
#[allow(dead_code)]
pub fn whole_program_job(name: &str) -> clusterman::launch::scheduler::JobOptions {
    let mut job = test_job(name).name(name);
    for var in ["CMAN_JOB_NAME", "CMAN_TRANSPORT", "CMAN_EXIT", "CMAN_HOLD"] {
        if let Ok(value) = std::env::var(var) {
            job = job.env(var, value);
        }
    }
    job
}

/// A child's whole output (what of it was not taken already), or a panic after `timeout`
/// (the child is killed then).
#[allow(dead_code)]
pub fn output_within(mut child: std::process::Child, timeout: Duration) -> (std::process::ExitStatus, String, String) {
    fn read_all(pipe: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    }
    let (out, err) = (read_all(child.stdout.take()), read_all(child.stderr.take()));
    let ended = wait_until(timeout, || child.try_wait().unwrap().is_some());
    if !ended {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let (o, e) = (out.join().unwrap(), err.join().unwrap());
    assert!(ended, "still running after {timeout:?}:\n{o}\n{e}");
    (status, o, e)
}

/// The lines a child prints, as they come (the reader thread ends with the child's output).
#[allow(dead_code)]
pub fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Waits (with a deadline) for a line holding `prefix`; returns it from there (the test
/// harness may have printed `test name ... ` before it). Without one, the child's story.
#[allow(dead_code)]
pub fn expect_line(child: &mut std::process::Child, lines: &std::sync::mpsc::Receiver<String>, prefix: &str, timeout: Duration) -> String {
    let deadline = std::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(prefix) => return line[line.find(prefix).unwrap_or(0)..].to_string(),
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
                panic!("no line {prefix:?} within {timeout:?}:\n{}\n{err}", seen.join("\n"));
            }
        }
    }
}
