//! Benchmarks: worker start-up, no-op round trip (pinned, and all on one CPU), 64 MiB and
//! 512 MiB fetches, peak memory over the payload, pmap throughput, and scale (1024 and 4096
//! local workers: start-up, one `everywhere` round, the master's threads and memory). Under
//! `mpirun -np 2 bench --mpi-rtt [--busy]`: the MPI transport's round trip, bulk transfers and
//! idle CPU.
//!
//! Run: `cargo run --release --example bench` (or `scripts/bench.sh`, which also runs the MPI
//! figures and `cman_transport`, and writes `BENCHMARKS.md`). One group alone, to compare two
//! builds: `bench --pair` (rtt_* and fetch_*), `bench --one-cpu`, `bench --pmap`,
//! `bench --scale 1024`. Each group runs 5 times in fresh processes, and each figure is the
//! median run's; `bench --median-of N command...` does that for any command that prints
//! `BENCH` lines.
//!
//! Every figure is printed as one line
//!
//! ```text
//! BENCH <name> <value> <unit> baseline=<value> ratio=<value>
//! ```
//!
//! where `ratio` is always ours / baseline:
//! - latency figures (`us`, microseconds): LOWER is better; 1.0 means "as fast as raw TCP";
//! - throughput figures (`MB/s`, 10^6 bytes/s): HIGHER is better; 1.0 means "as fast as raw TCP".
//!
//! Figures without a baseline print `baseline=- ratio=-`. Lines starting with `#` are notes.
//!
//! The baselines are measured in the same run against a child process that is this same
//! executable started with `--raw-echo`: one plain TCP_NODELAY loopback socket, blocking
//! reads and writes, no framing. It echoes small messages and streams bulk data on request,
//! and it is pinned exactly like the clusterman worker it is compared with.

use std::borrow::Cow;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use clusterman::prelude::*;

/// Size of a raw ping-pong message: a clusterman no-op call frame is the same size
/// (4-byte length prefix + 25-byte header; `()` encodes to nothing), and so is its reply.
const MSG: usize = 29;
/// Round trips measured per side, after `RTT_WARMUP` unmeasured ones.
const RTT_ITERS: usize = 20_000;
const RTT_WARMUP: usize = 2_000;
/// The bulk transfer: 64 MiB, `FETCH_REPS` times after one warm-up.
const FETCH_BYTES: usize = 64 << 20;
const FETCH_REPS: usize = 5;
/// The big transfer: 512 MiB of `u8`, `BIG_FETCH_REPS` times after one warm-up.
const BIG_FETCH_BYTES: usize = 512 << 20;
const BIG_FETCH_REPS: usize = 3;

// ---- remote functions -------------------------------------------------------------------

/// The cheapest possible call: no arguments, no result.
#[remote]
fn noop() {}

/// One pmap item.
#[remote]
fn identity_u64(x: u64) -> u64 {
    x
}

/// A `bytes`-long result of `u8`s (at most [`BIG_FETCH_BYTES`]). It borrows a vector built
/// once per worker, so a fetch times clusterman (encode, transfer, decode into a new owned
/// vector on the master) and not a copy inside the function. `Cow` encodes like the slice
/// and arrives as `Cow::Owned(Vec)`.
#[remote]
fn blob_u8(bytes: usize) -> Cow<'static, [u8]> {
    static DATA: OnceLock<Vec<u8>> = OnceLock::new();
    Cow::Borrowed(&DATA.get_or_init(|| vec![0xa5; BIG_FETCH_BYTES])[..bytes])
}

/// The same number of bytes as `f64`s.
#[remote]
fn blob_f64(bytes: usize) -> Cow<'static, [f64]> {
    Cow::Borrowed(f64_data(bytes))
}

/// `bytes` of `f64`s, built once per worker.
fn f64_data(bytes: usize) -> &'static [f64] {
    static DATA: OnceLock<Vec<f64>> = OnceLock::new();
    &DATA.get_or_init(|| vec![std::f64::consts::PI; FETCH_BYTES / 8])[..bytes / 8]
}

/// A struct holding a vector, which serde hands over one element at a time.
#[derive(serde::Serialize, serde::Deserialize)]
struct Series {
    label: u32,
    values: Cow<'static, [f64]>,
}

/// The same struct with its vector marked `clusterman::bulk`: one block.
#[derive(serde::Serialize, serde::Deserialize)]
struct BulkSeries {
    label: u32,
    #[serde(with = "clusterman::bulk")]
    values: Cow<'static, [f64]>,
}

#[remote]
fn series(bytes: usize) -> Series {
    Series { label: 1, values: Cow::Borrowed(f64_data(bytes)) }
}

#[remote]
fn bulk_series(bytes: usize) -> BulkSeries {
    BulkSeries { label: 1, values: Cow::Borrowed(f64_data(bytes)) }
}

// ---- main -------------------------------------------------------------------------------

fn main() -> clusterman::Result<()> {
    clusterman::init(); // a worker serves here and never returns; elsewhere this returns at once

    // The raw baseline child, selected by argv. It is started without clusterman's
    // environment variables, so `init` above has returned without doing anything.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--raw-echo") {
        raw_echo_server(&args[2], args.get(3).and_then(|c| c.parse().ok()));
    }
    if args.get(1).map(String::as_str) == Some("--scale") {
        let n = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1024);
        return scale::run(n, args.get(3).map(String::as_str) != Some("--no-baseline")); // the scale figures alone
    }
    if args.get(1).map(String::as_str) == Some("--one-cpu") {
        return same_cpu_rtt(affinity::get()[0]); // the one-CPU round trips alone
    }
    if args.get(1).map(String::as_str) == Some("--pmap") {
        return pmap_throughput(); // the pmap figures alone
    }
    if args.get(1).map(String::as_str) == Some("--peak") {
        return peak::run(); // a fresh process for the peak memory figures
    }
    if args.get(1).map(String::as_str) == Some("--mpi-rtt") {
        // every process is an MPI rank: `mpirun -np 2 bench --mpi-rtt [--busy]`
        return mpi_rtt::run(args.get(2).map(String::as_str) == Some("--busy"));
    }

    if args.get(1).map(String::as_str) == Some("--pair") {
        return pair_figures(); // rtt_* and fetch_* alone
    }
    if args.get(1).map(String::as_str) == Some("--median-of") {
        // `bench --median-of N command...`: each figure of N runs of the command, the median
        let runs = args.get(2).and_then(|n| n.parse().ok()).expect("--median-of N command...");
        median_of_runs(runs, &args[3..]);
        return Ok(());
    }

    println!("# ratio = ours/baseline: for us (latency) lower is better, for MB/s (throughput) higher is better");
    // First, while this process is still small (fork cost grows with the master's memory).
    workers_ready()?;
    // Every other group in fresh processes, RUNS of each: a figure varies more from one
    // process to the next (where its pages and threads land) than within one.
    let exe = std::env::current_exe().expect("own executable").display().to_string();
    let group = |args: &[&str]| median_of_runs(RUNS, &[&[exe.as_str()], args].concat());
    group(&["--pair"]);
    if affinity::get().len() >= 2 {
        // The round trips with everything on one CPU: there, waking a thread on the idle
        // other vCPU (tens of µs in a VM) no longer hides the library's own overhead.
        group(&["--one-cpu"]);
    }
    group(&["--pmap"]);
    group(&["--peak"]);
    group(&["--scale", "1024"]);
    median_of_runs(1, &[exe.as_str(), "--scale", "4096", "--no-baseline"]); // once: no baseline, and minutes long
    Ok(())
}

/// Runs of each group of figures, in fresh processes; each figure is the median run's.
const RUNS: usize = 5;

/// `rtt_*` and `fetch_*`: the master process pinned on one CPU, the worker (or the raw echo
/// child) on another, if there are two.
fn pair_figures() -> clusterman::Result<()> {
    match affinity::get()[..] {
        [master, worker, ..] => {
            println!("# pinning for rtt_* and fetch_*: master process on CPU {master}, clusterman worker / raw echo child on CPU {worker}; the other figures run unpinned");
            latency_and_bandwidth(Some((master, worker)))
        }
        ref allowed => {
            println!("# pinning: none (only {} CPU may be used); all figures unpinned", allowed.len());
            latency_and_bandwidth(None)
        }
    }
}

/// Runs `command` `runs` times, one after the other, and prints each figure's `BENCH` line
/// from the run with the median ratio (the median value, for a figure without a baseline),
/// then every run's ratio or value as a note (`# runs of <name>: ...`), then the first
/// run's other notes. A run that fails is told, and the others count. Each run is a fresh
/// process: figures that read the process's memory see nothing earlier ones left.
fn median_of_runs<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(runs: usize, command: &[S]) {
    let mut lines: Vec<(String, Vec<(f64, String)>)> = Vec::new(); // by figure, in first-seen order
    let mut notes = Vec::new();
    for _ in 0..runs {
        let out = match Command::new(&command[0]).args(&command[1..]).stdin(Stdio::null()).output() {
            Ok(out) if out.status.success() => out,
            Ok(out) => {
                println!("# {command:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
                continue;
            }
            Err(e) => {
                println!("# could not run {command:?}: {e}");
                continue;
            }
        };
        let first = notes.is_empty() && lines.is_empty();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields[..] {
                ["BENCH", name, value, _, _, ratio, ..] => {
                    // the ratio if there is one, else the value
                    let key = ratio.strip_prefix("ratio=").and_then(|r| r.parse().ok()).or_else(|| value.parse().ok()).unwrap_or(f64::NAN);
                    match lines.iter_mut().find(|(n, _)| n == name) {
                        Some((_, seen)) => seen.push((key, line.to_string())),
                        None => lines.push((name.to_string(), vec![(key, line.to_string())])),
                    }
                }
                _ if first && line.starts_with('#') => notes.push(line.to_string()),
                _ => {}
            }
        }
    }
    for (name, mut seen) in lines {
        let each: Vec<String> = seen.iter().map(|(key, _)| fmt(*key)).collect();
        seen.sort_by(|a, b| a.0.total_cmp(&b.0));
        println!("{}", seen[(seen.len() - 1) / 2].1);
        println!("# runs of {name}: {}", each.join(" "));
    }
    notes.iter().for_each(|note| println!("{note}"));
}


/// Everything the latency and bandwidth figures need: a cluster with one worker and the raw
/// echo child, both pinned to `pins.1` while this process is pinned to `pins.0`.
struct Pair {
    cluster: Cluster,
    pid: Pid,
    raw: RawPeer,
}

impl Pair {
    fn start(pins: Option<(usize, usize)>) -> clusterman::Result<Pair> {
        // Pin before the cluster exists: every thread of the master, and the connection reader
        // threads started later, sit on one CPU.
        if let Some((master_cpu, _)) = pins {
            affinity::set(&[master_cpu]);
        }
        let worker_cpu = pins.map(|(_, w)| w);
        let raw = RawPeer::start(worker_cpu);
        let cluster = Cluster::new()?;
        let pid = match worker_cpu {
            Some(cpu) => cluster.add_procs(LocalAffinityManager::new(1).mode(AffinityMode::Cpus(vec![cpu])))?[0],
            None => cluster.add_procs(LocalManager::new(1))?[0],
        };
        Ok(Pair { cluster, pid, raw })
    }

    /// Round trips, ours and raw, in alternating blocks so drift hits both alike.
    fn rtt(&mut self) -> clusterman::Result<(Summary, Summary)> {
        for _ in 0..RTT_WARMUP {
            self.raw.ping();
            self.cluster.remote_call_fetch(self.pid, noop, ())?;
        }
        const BLOCKS: usize = 4;
        let (mut ours, mut base) = (Vec::with_capacity(RTT_ITERS), Vec::with_capacity(RTT_ITERS));
        for _ in 0..BLOCKS {
            for _ in 0..RTT_ITERS / BLOCKS {
                let t = Instant::now();
                self.raw.ping();
                base.push(t.elapsed());
            }
            for _ in 0..RTT_ITERS / BLOCKS {
                let t = Instant::now();
                self.cluster.remote_call_fetch(self.pid, noop, ())?;
                ours.push(t.elapsed());
            }
        }
        Ok((Summary::of(ours), Summary::of(base)))
    }

    fn stop(self) -> clusterman::Result<()> {
        self.raw.stop();
        self.cluster.shutdown()
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `rtt_noop_*` and `fetch_64mib`, each beside its raw TCP baseline, with identical pinning.
fn latency_and_bandwidth(pins: Option<(usize, usize)>) -> clusterman::Result<()> {
    let mut pair = Pair::start(pins)?;
    let (ours, base) = pair.rtt()?;
    println!("# rtt: {RTT_ITERS} round trips each after {RTT_WARMUP} warm-up ones, raw messages of {MSG} bytes; minimum ours {:.1} us, raw {:.1} us", us(ours.min), us(base.min));
    bench("rtt_noop_median", us(ours.median), "us", Some(us(base.median)));
    bench("rtt_noop_p99", us(ours.p99), "us", Some(us(base.p99)));

    // 64 MiB results beside 64 MiB streamed over the raw socket, into a reused buffer and
    // into a fresh one (as a result must be: its own new allocation)
    let mb_per_s = |d: Duration| FETCH_BYTES as f64 / d.as_secs_f64() / 1e6;
    let Pair { cluster, pid, raw } = &mut pair;
    // rounds alternate between them all, so the machine's drift hits them alike
    let timed = |f: &dyn Fn() -> clusterman::Result<usize>| -> clusterman::Result<Duration> {
        let t = Instant::now();
        let len = f()?;
        let elapsed = t.elapsed();
        assert_eq!(len, FETCH_BYTES / 8);
        Ok(elapsed)
    };
    let mut times: [Vec<Duration>; 6] = Default::default();
    for round in 0..=FETCH_REPS {
        let (u8_time, f64_time) = (timed_fetch(cluster, *pid, FETCH_BYTES, false)?, timed_fetch(cluster, *pid, FETCH_BYTES, true)?);
        let struct_time = timed(&|| Ok(cluster.remote_call_fetch(*pid, series, (FETCH_BYTES,))?.values.len()))?;
        let bulk_time = timed(&|| Ok(cluster.remote_call_fetch(*pid, bulk_series, (FETCH_BYTES,))?.values.len()))?;
        let round_times = [raw.stream_fresh(FETCH_BYTES), raw.stream(FETCH_BYTES), u8_time, f64_time, struct_time, bulk_time];
        if round > 0 {
            times.iter_mut().zip(round_times).for_each(|(all, t)| all.push(t));
        }
    }
    let [fresh, reused, u8_time, f64_time, struct_time, bulk_time] = times.map(|t| Summary::of(t).median);
    println!(
        "# fetch_64mib_*: median of {FETCH_REPS} alternating rounds after one; the remote fn returns a borrowed slice (no copy in it), the master gets an owned Vec. Raw: 64 MiB streamed by the echo child, into a fresh buffer (the baseline) {:.0} MB/s, into a reused one {:.0} MB/s",
        mb_per_s(fresh),
        mb_per_s(reused)
    );
    bench("fetch_64mib_u8", mb_per_s(u8_time), "MB/s", Some(mb_per_s(fresh)));
    bench("fetch_64mib_f64", mb_per_s(f64_time), "MB/s", Some(mb_per_s(fresh)));
    println!("# fetch_64mib_struct_f64*: the f64s inside a struct, element by element (serde's way) and marked #[serde(with = \"clusterman::bulk\")]");
    bench("fetch_64mib_struct_f64", mb_per_s(struct_time), "MB/s", Some(mb_per_s(fresh)));
    bench("fetch_64mib_struct_f64_bulk", mb_per_s(bulk_time), "MB/s", Some(mb_per_s(fresh)));

    // 512 MiB of u8, beside the raw socket into a fresh buffer, alternating
    let big_mb_per_s = |d: Duration| BIG_FETCH_BYTES as f64 / d.as_secs_f64() / 1e6;
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for round in 0..=BIG_FETCH_REPS {
        let elapsed = timed_fetch(cluster, *pid, BIG_FETCH_BYTES, false)?;
        let raw_time = raw.stream_fresh(BIG_FETCH_BYTES);
        if round > 0 {
            ours.push(elapsed);
            base.push(raw_time);
        }
    }
    println!("# fetch_512mib_u8: median of {BIG_FETCH_REPS} alternating rounds after one, beside raw TCP into a fresh buffer");
    bench("fetch_512mib_u8", big_mb_per_s(Summary::of(ours).median), "MB/s", Some(big_mb_per_s(Summary::of(base).median)));
    pair.stop()
}

/// Fetches `bytes` from `pid` as `u8`s or as `f64`s; the time it took (the result dropped
/// after the clock stops, as a user would keep it).
fn timed_fetch(cluster: &Cluster, pid: Pid, bytes: usize, f64s: bool) -> clusterman::Result<Duration> {
    let t = Instant::now();
    let (elapsed, len) = if f64s {
        let v = cluster.remote_call_fetch(pid, blob_f64, (bytes,))?;
        (t.elapsed(), v.len() * 8)
    } else {
        let v = cluster.remote_call_fetch(pid, blob_u8, (bytes,))?;
        (t.elapsed(), v.len())
    };
    assert_eq!(len, bytes);
    Ok(elapsed)
}

/// `rtt_noop_one_cpu_*`: the round trip when master, worker and echo child all share `cpu`.
fn same_cpu_rtt(cpu: usize) -> clusterman::Result<()> {
    let mut pair = Pair::start(Some((cpu, cpu)))?;
    let (ours, base) = pair.rtt()?;
    println!("# rtt_noop_one_cpu_*: the same round trips with master, worker and echo child all on CPU {cpu}");
    bench("rtt_noop_one_cpu_median", us(ours.median), "us", Some(us(base.median)));
    bench("rtt_noop_one_cpu_p99", us(ours.p99), "us", Some(us(base.p99)));
    pair.stop()
}

/// `pmap_items_per_s_batch*`: identity over u64 on 2 local workers.
fn pmap_throughput() -> clusterman::Result<()> {
    let cluster = Cluster::new()?;
    cluster.add_procs(LocalManager::new(2))?;
    let run = |n: u64, batch: usize| -> clusterman::Result<(f64, Duration)> {
        let t = Instant::now();
        let out = cluster.pmap_with(identity_u64, (0..n).map(|i| (i,)), PmapOptions::new().batch_size(batch))?;
        let elapsed = t.elapsed();
        assert!(out.len() as u64 == n && out.iter().enumerate().all(|(i, x)| *x == i as u64));
        Ok((n as f64 / elapsed.as_secs_f64(), elapsed))
    };
    run(100_000, 1000)?; // warm-up
    // the median of 3 runs each: a single short run is at the mercy of one scheduling hiccup
    let median = |n: u64, batch: usize| -> clusterman::Result<(f64, Duration)> {
        let mut runs = (0..3).map(|_| run(n, batch)).collect::<clusterman::Result<Vec<_>>>()?;
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(runs[1])
    };
    let (rate1, t1) = median(50_000, 1)?;
    let (rate1000, t1000) = median(16_000_000, 1000)?;
    println!("# pmap: 2 LocalManager workers; 50,000 items at batch 1 took {:.2} s, 16,000,000 at batch 1000 took {:.2} s (the median of 3 runs each, after a warm-up)", t1.as_secs_f64(), t1000.as_secs_f64());
    bench("pmap_items_per_s_batch1", rate1, "items/s", None);
    bench("pmap_items_per_s_batch1000", rate1000, "items/s", None);
    cluster.shutdown()
}

/// `workers_ready_8`: `add_procs(LocalManager::new(8))` on a fresh cluster, median of 5; and
/// the same with 1 GiB of touched heap in the master, as a note.
fn workers_ready() -> clusterman::Result<()> {
    let ready_ms = |reps| {
        median_of(reps, || {
            let cluster = Cluster::new()?;
            let t = Instant::now();
            cluster.add_procs(LocalManager::new(8))?;
            let elapsed = t.elapsed();
            cluster.shutdown()?;
            Ok(elapsed)
        })
        .map(|d| d.as_secs_f64() * 1e3)
    };
    bench("workers_ready_8", ready_ms(5)?, "ms", None);
    let ballast = vec![1u8; 1 << 30]; // every page written, so it is resident
    let heavy = ready_ms(3)?;
    drop(std::hint::black_box(ballast));
    println!("# workers_ready_8 with 1 GiB of touched heap in the master: {heavy:.1} ms (median of 3)");
    Ok(())
}

// ---- peak memory ------------------------------------------------------------------------

/// `peak_*_over_payload`: a fresh master fetches one 64 MiB `Vec<u8>` that a fresh worker
/// makes in the call. Each side's highest resident memory during the transfer, above what it
/// held before, over the payload: the receiver's result and the sender's value count, so 1.0
/// is the least possible.
mod peak {
    use clusterman::prelude::*;

    use super::{FETCH_BYTES, bench};

    /// Makes a vector in the call: the sender's value is part of its peak.
    #[remote]
    fn fresh_u8(bytes: usize) -> Vec<u8> {
        vec![0xa5; bytes]
    }

    /// [`reset_peak_here`] on a worker.
    #[remote]
    fn reset_peak() -> u64 {
        reset_peak_here()
    }

    /// [`peak_kib_here`] on a worker.
    #[remote]
    fn peak_kib() -> u64 {
        peak_kib_here()
    }

    /// Resets this process's peak resident memory; returns the resident memory now (KiB).
    fn reset_peak_here() -> u64 {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        status_kib("VmRSS:")
    }

    /// This process's peak resident memory since the last reset (KiB).
    fn peak_kib_here() -> u64 {
        status_kib("VmHWM:")
    }

    fn status_kib(field: &str) -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
    }

    /// Runs `--peak` as a child and passes its lines on.
    pub fn run() -> clusterman::Result<()> {
        let cluster = Cluster::new()?;
        let pid = cluster.add_procs(LocalManager::new(1))?[0];
        cluster.remote_call_fetch(pid, fresh_u8, (1,))?; // warm the call path
        let worker_before = cluster.remote_call_fetch(pid, reset_peak, ())?;
        let master_before = reset_peak_here();
        let v = cluster.remote_call_fetch(pid, fresh_u8, (FETCH_BYTES,))?;
        let master_peak = peak_kib_here();
        assert_eq!(v.len(), FETCH_BYTES);
        let worker_peak = cluster.remote_call_fetch(pid, peak_kib, ())?;
        let over = |peak: u64, before: u64| peak.saturating_sub(before) as f64 * 1024.0 / FETCH_BYTES as f64;
        println!("# peak_*_over_payload: one 64 MiB Vec<u8> made in the call, fresh processes; peak resident memory (VmHWM after a reset) above what each held before, over the payload");
        bench("peak_receive_over_payload", over(master_peak, master_before), "x", None);
        bench("peak_send_over_payload", over(worker_peak, worker_before), "x", None);
        cluster.shutdown()
    }
}

// ---- the MPI transport ------------------------------------------------------------------

/// No-op round trip over the MPI transport (mode 3) beside a raw MPI ping-pong of the same
/// message size between the same two ranks, measured in the same run.
mod mpi_rtt {
    use std::time::Instant;

    use clusterman::mpi::rsmpi::traits::{Communicator, Destination, Source};
    use clusterman::mpi::{Comm, Transport, start_main_loop};

    use super::{BIG_FETCH_BYTES, BIG_FETCH_REPS, FETCH_BYTES, FETCH_REPS, MSG, RTT_WARMUP, Summary, bench, noop, timed_fetch, us};

    /// Round trips measured per side: a round trip takes microseconds here, and 20 000 of
    /// them (the TCP figure's count) last 60 ms, short enough for one hiccup of the host to
    /// move the p99.
    const RTT_ITERS: usize = 100_000;

    /// `busy`: another process keeps a core busy meanwhile (`scripts/bench.sh` starts one), and
    /// the figures are named `mpi_rtt_noop_busy_*`; quiet, the idle CPU figure follows.
    pub fn run(busy: bool) -> clusterman::Result<()> {
        let mgr = start_main_loop(Transport::Mpi)?; // rank 1 serves and never returns
        let cluster = mgr.cluster().expect("rank 0 owns the cluster");
        let worker = cluster.workers()[0];
        // raw first, on MPI_COMM_WORLD while rank 1 also serves: bounce the message through
        // an mpido! body that echoes on the world communicator (the same two ranks, the same
        // threads that run user code)
        let raw = clusterman::mpido!(mgr, |comm| ping_pong(comm))?;
        let base = raw[0].clone().expect("rank 0 measures");
        for _ in 0..RTT_WARMUP {
            cluster.remote_call_fetch(worker, noop, ())?;
        }
        let ours: Vec<_> = (0..RTT_ITERS)
            .map(|_| {
                let t = Instant::now();
                cluster.remote_call_fetch(worker, noop, ()).map(|()| t.elapsed())
            })
            .collect::<clusterman::Result<_>>()?;
        let (ours, base) = (Summary::of(ours), Summary::of(base.into_iter().map(std::time::Duration::from_nanos).collect()));
        let name = if busy { "mpi_rtt_noop_busy" } else { "mpi_rtt_noop" };
        if busy {
            println!("# {name}: the same, while another process spins on one of the cores");
        } else {
            println!("# mpi transport: mpirun -np 2, {RTT_ITERS} round trips each; raw = blocking MPI_Send/MPI_Recv ping-pong of {MSG} bytes on MPI_COMM_WORLD between the same ranks");
        }
        bench(&format!("{name}_median"), us(ours.median), "us", Some(us(base.median)));
        bench(&format!("{name}_p99"), us(ours.p99), "us", Some(us(base.p99)));
        if !busy {
            bulk(&mgr, worker)?;
            idle_cpu(&mgr)?;
        }
        mgr.shutdown()
    }

    /// `mpi_fetch_*`: 64 MiB results (u8 and f64) and a 512 MiB one (u8) over the MPI
    /// transport, each beside a raw MPI transfer of as many bytes between the same ranks into
    /// a reused buffer.
    fn bulk(mgr: &clusterman::mpi::MpiManager, worker: clusterman::Pid) -> clusterman::Result<()> {
        let cluster = mgr.cluster().expect("rank 0 owns the cluster");
        let raw = |bytes: usize| -> clusterman::Result<std::time::Duration> {
            let times = clusterman::mpido!(mgr, |comm, bytes: usize| raw_bulk(comm, bytes))?;
            Ok(Summary::of(times[0].clone().expect("rank 0 measures").into_iter().map(std::time::Duration::from_nanos).collect()).median)
        };
        let median = |bytes: usize, f64s: bool, reps: usize| -> clusterman::Result<std::time::Duration> {
            timed_fetch(&cluster, worker, bytes, f64s)?;
            let times = (0..reps).map(|_| timed_fetch(&cluster, worker, bytes, f64s)).collect::<clusterman::Result<Vec<_>>>()?;
            Ok(Summary::of(times).median)
        };
        let mb_per_s = |bytes: usize, d: std::time::Duration| bytes as f64 / d.as_secs_f64() / 1e6;
        println!("# mpi_fetch_*: median of {FETCH_REPS} (512 MiB: {BIG_FETCH_REPS}) after one; raw = MPI_Send from rank 1 into a reused buffer on rank 0 (MPI_Recv), after a 1-byte request");
        let raw_64 = raw(FETCH_BYTES)?;
        bench("mpi_fetch_64mib_u8", mb_per_s(FETCH_BYTES, median(FETCH_BYTES, false, FETCH_REPS)?), "MB/s", Some(mb_per_s(FETCH_BYTES, raw_64)));
        bench("mpi_fetch_64mib_f64", mb_per_s(FETCH_BYTES, median(FETCH_BYTES, true, FETCH_REPS)?), "MB/s", Some(mb_per_s(FETCH_BYTES, raw_64)));
        let raw_512 = raw(BIG_FETCH_BYTES)?;
        bench("mpi_fetch_512mib_u8", mb_per_s(BIG_FETCH_BYTES, median(BIG_FETCH_BYTES, false, BIG_FETCH_REPS)?), "MB/s", Some(mb_per_s(BIG_FETCH_BYTES, raw_512)));
        Ok(())
    }

    /// Rank 0 asks with one byte, rank 1 sends `bytes`; rank 0 returns the times in ns.
    fn raw_bulk(comm: &Comm, bytes: usize) -> Option<Vec<u64>> {
        let mut data = vec![0xa5u8; bytes];
        let mut ask = [0u8; 1];
        let (zero, one) = (comm.process_at_rank(0), comm.process_at_rank(1));
        let mut times = Vec::new();
        for round in 0..=FETCH_REPS {
            if comm.rank() == 0 {
                let t = Instant::now();
                one.send(&ask[..]);
                one.receive_into(&mut data[..]);
                if round > 0 {
                    times.push(t.elapsed().as_nanos() as u64);
                }
            } else {
                zero.receive_into(&mut ask[..]);
                zero.send(&data[..]);
            }
        }
        (comm.rank() == 0).then_some(times)
    }

    /// `mpi_idle_cpu`: the CPU both ranks spend over 10 s in which no call is outstanding
    /// (heartbeats still flow), as a percentage of one core, the busier rank's figure.
    fn idle_cpu(mgr: &clusterman::mpi::MpiManager) -> clusterman::Result<()> {
        const IDLE: std::time::Duration = std::time::Duration::from_secs(10);
        let before = clusterman::mpido!(mgr, |_comm| cpu_seconds())?;
        let t = Instant::now();
        std::thread::sleep(IDLE);
        let after = clusterman::mpido!(mgr, |_comm| cpu_seconds())?;
        let wall = t.elapsed().as_secs_f64();
        let percent: Vec<f64> = before.iter().zip(&after).map(|(b, a)| (a - b) / wall * 100.0).collect();
        println!("# mpi_idle_cpu: {IDLE:?} with no call outstanding; rank 0 {:.2} %, rank 1 {:.2} % of a core (utime + stime from /proc/self/stat)", percent[0], percent[1]);
        bench("mpi_idle_cpu", percent.iter().cloned().fold(0.0, f64::max), "%core", None);
        Ok(())
    }

    /// This process's user + system CPU time, in seconds.
    fn cpu_seconds() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // the fields after the command name (which may hold spaces) start with the state
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(11) + ticks(12)) / 100.0 // utime and stime, in USER_HZ (100 on Linux)
    }

    /// Rank 0 sends, rank 1 echoes; rank 0 returns its round-trip times in nanoseconds.
    fn ping_pong(comm: &Comm) -> Option<Vec<u64>> {
        let mut msg = [0u8; MSG];
        let (zero, one) = (comm.process_at_rank(0), comm.process_at_rank(1));
        let mut times = Vec::with_capacity(RTT_ITERS);
        for i in 0..RTT_WARMUP + RTT_ITERS {
            if comm.rank() == 0 {
                let t = Instant::now();
                one.send(&msg[..]);
                one.receive_into(&mut msg[..]);
                if i >= RTT_WARMUP {
                    times.push(t.elapsed().as_nanos() as u64);
                }
            } else {
                zero.receive_into(&mut msg[..]);
                zero.send(&msg[..]);
            }
        }
        (comm.rank() == 0).then_some(times)
    }
}

// ---- reporting --------------------------------------------------------------------------

/// Prints one figure; the ratio is ours / baseline (see the file header for the direction).
fn bench(name: &str, value: f64, unit: &str, baseline: Option<f64>) {
    match baseline {
        Some(b) => println!("BENCH {name} {} {unit} baseline={} ratio={:.2}", fmt(value), fmt(b), value / b),
        None => println!("BENCH {name} {} {unit} baseline=- ratio=-", fmt(value)),
    }
}

/// Whole numbers from 100 up, two decimals below.
fn fmt(x: f64) -> String {
    if x >= 100.0 { format!("{x:.0}") } else { format!("{x:.2}") }
}

struct Summary {
    min: Duration,
    median: Duration,
    p99: Duration,
}

impl Summary {
    fn of(mut samples: Vec<Duration>) -> Summary {
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
        Summary { min: samples[0], median: at(0.5), p99: at(0.99) }
    }
}

/// Runs `f` once to warm up, then `reps` times; the median of the durations it returns.
fn median_of(reps: usize, mut f: impl FnMut() -> clusterman::Result<Duration>) -> clusterman::Result<Duration> {
    f()?;
    let samples = (0..reps).map(|_| f()).collect::<clusterman::Result<Vec<_>>>()?;
    Ok(Summary::of(samples).median)
}

// ---- the raw TCP baseline ---------------------------------------------------------------

/// The master's end of the raw baseline: a child process and one TCP_NODELAY socket to it.
struct RawPeer {
    child: Child,
    socket: TcpStream,
    sink: Vec<u8>,
}

impl RawPeer {
    /// Starts the echo child (pinned to `cpu`, if given) and waits for it to dial in, as a
    /// clusterman worker does.
    fn start(cpu: Option<usize>) -> RawPeer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address").to_string();
        let mut cmd = Command::new(std::env::current_exe().expect("own executable"));
        cmd.arg("--raw-echo").arg(&addr).args(cpu.map(|c| c.to_string())).stdin(Stdio::null());
        for var in [clusterman::ENV_MASTER, clusterman::ENV_SECRET, clusterman::ENV_LAUNCH] {
            cmd.env_remove(var);
        }
        let child = cmd.spawn().expect("start the raw echo child");
        // Accept on a helper thread, so that a child that dies at start-up cannot hang us.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(listener.accept().map(|(s, _)| s)));
        let socket = rx.recv_timeout(Duration::from_secs(10)).expect("the raw echo child did not connect within 10 s").expect("accept");
        socket.set_nodelay(true).expect("TCP_NODELAY");
        RawPeer { child, socket, sink: vec![0; FETCH_BYTES] }
    }

    /// One MSG-byte round trip.
    fn ping(&mut self) {
        let mut msg = [0u8; MSG];
        msg[0] = b'p';
        self.socket.write_all(&msg).expect("raw ping");
        self.socket.read_exact(&mut msg).expect("raw pong");
    }

    /// Asks for `bytes` bytes; the time until the last one has arrived.
    fn stream(&mut self, bytes: usize) -> Duration {
        let mut msg = [0u8; MSG];
        msg[0] = b's';
        msg[1..9].copy_from_slice(&(bytes as u64).to_le_bytes());
        let t = Instant::now();
        self.socket.write_all(&msg).expect("raw stream request");
        self.socket.read_exact(&mut self.sink[..bytes]).expect("raw stream");
        t.elapsed()
    }

    /// [`stream`](RawPeer::stream) into a newly allocated buffer, the time including the
    /// allocation (a value received is a new allocation too).
    fn stream_fresh(&mut self, bytes: usize) -> Duration {
        let mut msg = [0u8; MSG];
        msg[0] = b's';
        msg[1..9].copy_from_slice(&(bytes as u64).to_le_bytes());
        let t = Instant::now();
        self.socket.write_all(&msg).expect("raw stream request");
        let mut buffer = vec![0u8; bytes];
        self.socket.read_exact(&mut buffer).expect("raw stream");
        let elapsed = t.elapsed();
        drop(std::hint::black_box(buffer));
        elapsed
    }

    /// Closes the socket (the child exits at end of stream) and reaps the child.
    fn stop(mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        let _ = self.child.wait();
    }
}

/// The child side: pin, dial the master, then serve requests until the socket closes.
/// `p...`: echo the message back. `s` + u64 length: stream that many bytes.
fn raw_echo_server(addr: &str, cpu: Option<usize>) -> ! {
    if let Some(cpu) = cpu {
        affinity::set(&[cpu]);
    }
    let mut socket = TcpStream::connect(addr).expect("raw echo: connect to the master");
    socket.set_nodelay(true).expect("TCP_NODELAY");
    let mut chunk = Vec::new(); // made on the first stream request: thousands of these run at once
    let mut msg = [0u8; MSG];
    while socket.read_exact(&mut msg).is_ok() {
        let ok = match msg[0] {
            b'p' => socket.write_all(&msg).is_ok(),
            b's' => {
                chunk.resize(1 << 20, 0x5a);
                let mut left = u64::from_le_bytes(msg[1..9].try_into().expect("8 bytes")) as usize;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if socket.write_all(&chunk[..n]).is_err() {
                        break;
                    }
                    left -= n;
                }
                left == 0
            }
            other => panic!("raw echo: unknown request {other}"),
        };
        if !ok {
            break;
        }
    }
    std::process::exit(0);
}

// ---- CPU affinity (Linux; elsewhere nothing is pinned) ----------------------------------

mod affinity {
    /// The CPUs the calling thread may run on, ascending.
    #[cfg(target_os = "linux")]
    pub fn get() -> Vec<usize> {
        // SAFETY: sched_getaffinity fills a zeroed cpu_set_t of the size we pass.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return Vec::new();
            }
            (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
        }
    }

    /// Restricts every thread of this process, and the threads they start from now on, to
    /// `cpus` (the library's I/O thread, started by an earlier cluster, included).
    #[cfg(target_os = "linux")]
    pub fn set(cpus: &[usize]) {
        let tasks: Vec<libc::pid_t> = std::fs::read_dir("/proc/self/task").unwrap().filter_map(|t| t.ok()?.file_name().to_str()?.parse().ok()).collect();
        for tid in tasks {
            // SAFETY: sched_setaffinity reads a cpu_set_t we built on the stack.
            let rc = unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                for &c in cpus {
                    libc::CPU_SET(c, &mut set);
                }
                libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
            };
            let err = std::io::Error::last_os_error();
            assert!(rc == 0 || err.raw_os_error() == Some(libc::ESRCH), "sched_setaffinity({cpus:?}): {err}");
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub fn get() -> Vec<usize> {
        Vec::new()
    }

    #[cfg(not(target_os = "linux"))]
    pub fn set(_cpus: &[usize]) {}
}

// ---- scale ------------------------------------------------------------------------------

/// Many local workers at once, beside a raw baseline of as many children of this executable
/// that only dial a plain listener and answer one ping (`--raw-echo`).
mod scale {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use clusterman::prelude::*;

    use super::{MSG, bench, noop};

    /// `everywhere` rounds timed, for ours and raw alike, after [`WARM_UP`] untimed ones: a
    /// round takes tens of ms, and the first rounds after a start are slower (a thousand
    /// fresh processes fault their pages in; after 5 rounds ours still read a quarter above
    /// its steady state).
    const ROUNDS: usize = 60;
    const WARM_UP: usize = 20;
    /// Ours and raw take turns in blocks of this many timed rounds, each block after
    /// [`REWARM`] untimed ones (the other side's block left the caches cold): both see the
    /// host's drift, and both are timed warm, back to back.
    const BLOCK: usize = 10;
    const REWARM: usize = 3;

    fn status(field: &str) -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
    }

    /// The raw baseline: `n` children of this executable that dial a plain listener and
    /// answer each ping with a pong (`--raw-echo`).
    struct RawCrowd {
        children: Vec<Child>,
        sockets: Vec<TcpStream>,
    }

    impl RawCrowd {
        /// Starts the children; returns them once all have connected, and how long that took.
        fn start(n: usize) -> (RawCrowd, Duration) {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("address").to_string();
            let t = Instant::now();
            let children: Vec<Child> = (0..n)
                .map(|_| {
                    let mut cmd = Command::new(std::env::current_exe().expect("own executable"));
                    cmd.arg("--raw-echo").arg(&addr).stdin(Stdio::null());
                    for var in [clusterman::ENV_MASTER, clusterman::ENV_SECRET, clusterman::ENV_LAUNCH] {
                        cmd.env_remove(var);
                    }
                    cmd.spawn().expect("start a raw child")
                })
                .collect();
            let sockets: Vec<TcpStream> = (0..n).map(|_| listener.accept().expect("accept").0).collect();
            (RawCrowd { children, sockets }, t.elapsed())
        }

        /// One ping to each child, then every pong back.
        fn round(&mut self) -> Duration {
            let t = Instant::now();
            let mut msg = [0u8; MSG];
            msg[0] = b'p';
            for s in &mut self.sockets {
                s.write_all(&msg).expect("raw ping");
            }
            for s in &mut self.sockets {
                s.read_exact(&mut msg).expect("raw pong");
            }
            t.elapsed()
        }

        fn stop(mut self) {
            self.sockets.clear(); // the children exit at end of stream
            for c in &mut self.children {
                let _ = c.wait();
            }
        }
    }

    fn median(mut times: Vec<Duration>) -> Duration {
        times.sort();
        times[times.len() / 2]
    }

    /// With `compare`, the raw children start first (their start-up timed alone) and stay up
    /// beside the workers; `everywhere` rounds and raw rounds then take turns in blocks
    /// ([`BLOCK`]): this host's speed drifts over seconds, and both see the same drift.
    pub fn run(n: usize, compare: bool) -> clusterman::Result<()> {
        let (mut raw, raw_ready) = match compare {
            true => {
                let (crowd, ready) = RawCrowd::start(n);
                (Some(crowd), ready)
            }
            false => (None, Duration::ZERO),
        };
        let cluster = Cluster::new()?;
        let (threads_before, rss_before, fds_before) = (status("Threads:"), status("VmRSS:"), open_fds());
        let t = Instant::now();
        let pids = cluster.add_procs(LocalManager::new(n).launch_timeout(Duration::from_secs(300)))?;
        let ready = t.elapsed();
        assert_eq!(pids.len(), n);
        let ours = || -> clusterman::Result<Duration> {
            let t = Instant::now();
            let all = cluster.everywhere(noop, ())?;
            assert_eq!(all.len(), n);
            Ok(t.elapsed())
        };
        for _ in 0..WARM_UP {
            ours()?;
            if let Some(raw) = &mut raw {
                raw.round();
            }
        }
        let (mut rounds, mut raw_rounds) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS / BLOCK {
            if let Some(raw) = &mut raw {
                raw_rounds.extend((0..REWARM + BLOCK).map(|_| raw.round()).skip(REWARM));
            }
            for i in 0..REWARM + BLOCK {
                let t = ours()?;
                if i >= REWARM {
                    rounds.push(t);
                }
            }
        }
        let round = median(rounds);
        let raw_round = if compare { median(raw_rounds) } else { Duration::ZERO };
        if let Some(raw) = raw {
            raw.stop();
        }
        let (threads, rss, fds) = (status("Threads:"), status("VmRSS:"), open_fds());
        let kib_per_worker = rss.saturating_sub(rss_before) as f64 / n as f64;
        println!(
            "# scale {n}: master threads {threads_before} -> {threads}, descriptors {fds_before} -> {fds}, RSS {rss_before} -> {rss} KiB; everywhere: median of {ROUNDS} rounds after {WARM_UP}, in turns of {BLOCK} with raw"
        );
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let base = |d: Duration| compare.then(|| ms(d));
        bench(&format!("scale_ready_{n}"), ms(ready), "ms", base(raw_ready));
        if compare {
            bench(&format!("scale_everywhere_{n}"), ms(round), "ms", base(raw_round));
            bench(&format!("scale_master_threads_{n}"), threads as f64, "threads", None);
            bench(&format!("scale_master_kib_per_worker_{n}"), kib_per_worker, "KiB", None);
        } else {
            println!("# scale {n}: everywhere round {:.1} ms, {kib_per_worker:.1} KiB of master memory per worker", ms(round));
        }
        cluster.shutdown()
    }
}
