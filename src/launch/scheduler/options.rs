//! Options every scheduler understands, and the keyword → flag rule of ClusterManagers.jl.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};

/// How the workers of one job are started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// One job whose launcher (`srun` under Slurm, `mpirun` elsewhere) starts every worker
    /// as a rank of one MPI world: `mpido!` works on them.
    #[default]
    Mpi,
    /// An array of independent single-worker tasks (no MPI between them).
    Array,
}

/// Options shared by every batch scheduler. Unset options are left out of the job script.
#[derive(Debug, Clone)]
pub struct JobOptions {
    pub(crate) name: String,
    pub(crate) workdir: Option<PathBuf>,
    logs: Option<PathBuf>,
    pub(crate) walltime: Option<Duration>,
    pub(crate) queue: Option<String>,
    pub(crate) account: Option<String>,
    pub(crate) memory: Option<Memory>,
    pub(crate) cpus_per_worker: Option<u32>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) extra_directives: Vec<String>,
    pub(crate) skip_directives: Vec<String>,
    pub(crate) prologue: Vec<String>,
    pub(crate) command_prefix: Vec<String>,
    pub(crate) launcher: Option<String>,
    /// `None` until set: the manager's default applies (see [`JobOptions::with_defaults`]).
    layout: Option<Layout>,
    pub(crate) launch_timeout: Duration,
    pub(crate) queue_timeout: Option<Duration>,
    pub(crate) min_workers: Option<usize>,
    submit_retry_delays: Option<Vec<Duration>>,
    pub(crate) throttle: Option<Arc<Throttle>>,
}

/// Bounds how many scheduler commands of one manager run at once.
#[derive(Debug)]
pub(crate) struct Throttle {
    max: usize,
    running: Mutex<usize>,
    freed: Condvar,
}

impl Throttle {
    /// Waits for a free slot; the slot is given back when the guard drops.
    pub(crate) fn acquire(&self) -> ThrottleGuard<'_> {
        let mut n = self.running.lock().expect("throttle lock");
        while *n >= self.max {
            n = self.freed.wait(n).expect("throttle lock");
        }
        *n += 1;
        ThrottleGuard(self)
    }
}

/// A slot of a [`Throttle`].
pub(crate) struct ThrottleGuard<'a>(&'a Throttle);

impl Drop for ThrottleGuard<'_> {
    fn drop(&mut self) {
        *self.0.running.lock().expect("throttle lock") -= 1;
        self.0.freed.notify_one();
    }
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            name: "clusterman".into(),
            workdir: None,
            logs: None,
            walltime: None,
            queue: None,
            account: None,
            memory: None,
            cpus_per_worker: None,
            env: Vec::new(),
            extra_directives: Vec::new(),
            skip_directives: Vec::new(),
            prologue: Vec::new(),
            command_prefix: Vec::new(),
            launcher: None,
            layout: None,
            launch_timeout: Duration::from_secs(60),
            queue_timeout: None,
            min_workers: None,
            submit_retry_delays: None,
            throttle: None,
        }
    }
}

impl JobOptions {
    /// Defaults: job name `clusterman`, MPI layout, 60 s launch timeout after the job
    /// starts, no limit on queueing.
    pub fn new() -> Self {
        Self::default()
    }
    /// The job's name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
    /// Working directory of the job (default: the master's current directory).
    pub fn workdir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.workdir = Some(dir.into());
        self
    }
    /// Where the job's own logs go: what it prints outside the worker connection (worker
    /// output reaches the master by itself). Default: `clusterman-logs/` in the working
    /// directory, made at submission, so jobs leave one directory, not a file each.
    pub fn logs(mut self, dir: impl Into<PathBuf>) -> Self {
        self.logs = Some(dir.into());
        self
    }
    /// Wall-clock limit.
    pub fn walltime(mut self, limit: Duration) -> Self {
        self.walltime = Some(limit);
        self
    }
    /// Queue (partition under Slurm).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }
    /// Account (project) to charge.
    pub fn account(mut self, account: impl Into<String>) -> Self {
        self.account = Some(account.into());
        self
    }
    /// Memory per worker (`Memory::gib(4)`), written in each scheduler's own units.
    pub fn memory(mut self, memory: Memory) -> Self {
        self.memory = Some(memory);
        self
    }
    /// CPUs per worker.
    pub fn cpus_per_worker(mut self, cpus: u32) -> Self {
        self.cpus_per_worker = Some(cpus);
        self
    }
    /// An environment variable set for the workers (on top of what the scheduler forwards).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
    /// An extra directive line, as the scheduler writes it (`--gres=gpu:1` under Slurm).
    pub fn extra_directive(mut self, directive: impl Into<String>) -> Self {
        self.extra_directives.push(directive.into());
        self
    }
    /// Leave out every generated directive containing `text` (for sites that reject one).
    pub fn skip_directive(mut self, text: impl Into<String>) -> Self {
        self.skip_directives.push(text.into());
        self
    }
    /// A shell line run in the job before the workers start (`module load openmpi`).
    pub fn prologue(mut self, line: impl Into<String>) -> Self {
        self.prologue.push(line.into());
        self
    }
    /// Runs every scheduler command through this prefix, e.g. `["ssh", "login-node"]`, for
    /// masters on a machine without the scheduler's commands.
    pub fn command_prefix<S: Into<String>>(mut self, prefix: impl IntoIterator<Item = S>) -> Self {
        self.command_prefix = prefix.into_iter().map(Into::into).collect();
        self
    }
    /// The command that starts the workers inside an MPI-layout job (default `srun` under
    /// Slurm, `mpirun` elsewhere).
    pub fn launcher(mut self, launcher: impl Into<String>) -> Self {
        self.launcher = Some(launcher.into());
        self
    }
    /// One MPI world (default) or an array of independent workers.
    pub fn layout(mut self, layout: Layout) -> Self {
        self.layout = Some(layout);
        self
    }
    /// How long the workers may take to connect once the job runs (default 60 s).
    pub fn launch_timeout(mut self, timeout: Duration) -> Self {
        self.launch_timeout = timeout;
        self
    }
    /// How long the job may wait in the queue (default: no limit). When it runs out, the
    /// job is cancelled.
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.queue_timeout = Some(timeout);
        self
    }
    /// Go on with at least this many workers if not all connect within the launch timeout
    /// (default: all are needed).
    pub fn min_workers(mut self, n: usize) -> Self {
        self.min_workers = Some(n);
        self
    }

    /// If submitting fails, try again after each of these delays in turn (for schedulers
    /// whose daemons are sometimes briefly unavailable); the last failure is reported.
    pub fn submit_retry_delays(mut self, delays: impl IntoIterator<Item = Duration>) -> Self {
        self.submit_retry_delays = Some(delays.into_iter().collect());
        self
    }
    /// At most `n` scheduler commands of this manager run at once (submit, state, cancel).
    pub fn throttle(mut self, n: usize) -> Self {
        self.throttle = Some(Arc::new(Throttle { max: n.max(1), running: Mutex::new(0), freed: Condvar::new() }));
        self
    }

    /// The layout (default: one MPI world).
    pub(crate) fn layout_or_default(&self) -> Layout {
        self.layout.unwrap_or_default()
    }

    /// The layout, if one was asked for.
    pub(crate) fn layout_asked(&self) -> Option<Layout> {
        self.layout
    }

    /// The delays between submission attempts (default: none).
    pub(crate) fn retry_delays(&self) -> &[Duration] {
        self.submit_retry_delays.as_deref().unwrap_or_default()
    }

    /// These options, with what they leave unset (layout, retry delays, throttle) taken
    /// from `defaults`: a manager's own defaults survive `manager.job(JobOptions::new()...)`.
    pub(crate) fn with_defaults(mut self, defaults: &JobOptions) -> JobOptions {
        self.layout = self.layout.or(defaults.layout);
        self.submit_retry_delays = self.submit_retry_delays.or_else(|| defaults.submit_retry_delays.clone());
        self.throttle = self.throttle.or_else(|| defaults.throttle.clone());
        self
    }

    /// The generated directives minus the skipped ones, then the extra ones.
    pub(crate) fn directives(&self, generated: Vec<String>) -> Vec<String> {
        let kept = generated.into_iter().filter(|d| !self.skip_directives.iter().any(|s| d.contains(s.as_str())));
        kept.chain(self.extra_directives.iter().cloned()).collect()
    }

    /// The working directory, absolute.
    pub(crate) fn workdir_or_current(&self) -> String {
        self.workdir.clone().or_else(|| std::env::current_dir().ok()).unwrap_or_else(|| PathBuf::from(".")).display().to_string()
    }

    /// Whether [`JobOptions::logs`] was given.
    pub(crate) fn logs_placed(&self) -> bool {
        self.logs.is_some()
    }

    /// The directory of the job's logs (see [`JobOptions::logs`]), absolute.
    pub(crate) fn log_dir(&self) -> String {
        match &self.logs {
            Some(dir) => std::path::absolute(dir).unwrap_or_else(|_| dir.clone()).display().to_string(),
            None => format!("{}/clusterman-logs", self.workdir_or_current()),
        }
    }
}

/// An amount of memory. Batch systems read `4G` as 4 GiB and Kubernetes as 4·10⁹ bytes, and
/// each refuses some spellings (`4Gi` under PBS and HTCondor, `2GB` under Kubernetes, any
/// unit under LSF before 10.1.0.2): a typed size is written as each scheduler reads it.
///
/// ```
/// use clusterman::launch::scheduler::Memory;
/// assert_eq!(Memory::gib(4), "4G".parse().unwrap());       // K, M, G, T: binary, as batch systems read them
/// assert_eq!(Memory::mib(1536), "1.5GiB".parse().unwrap());
/// assert!("4 bananas".parse::<Memory>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Memory(u64);

impl Memory {
    /// `n` bytes.
    pub const fn bytes(n: u64) -> Memory {
        Memory(n)
    }
    /// `n` MiB.
    pub const fn mib(n: u64) -> Memory {
        Memory(n << 20)
    }
    /// `n` GiB.
    pub const fn gib(n: u64) -> Memory {
        Memory(n << 30)
    }
    /// The size in bytes.
    pub const fn as_bytes(self) -> u64 {
        self.0
    }
    /// Whole MiB, rounded up: a job never gets less than asked.
    pub fn mib_ceil(self) -> u64 {
        self.0.div_ceil(1 << 20).max(1)
    }
    /// Whole GiB when it is a whole number of them, else whole MiB: `(n, 'G' | 'M')`.
    pub(crate) fn binary(self) -> (u64, char) {
        let mib = self.mib_ceil();
        if mib % 1024 == 0 { (mib / 1024, 'G') } else { (mib, 'M') }
    }
}

impl std::str::FromStr for Memory {
    type Err = Error;
    /// A number and a unit: `B`, `K`, `M`, `G`, `T`, with or without `B` or `iB`, in any case;
    /// all binary, as batch systems read them. No unit means bytes.
    fn from_str(text: &str) -> Result<Memory> {
        let bad = || Error::Launch(format!("{text:?} is not a memory size: write a number and a unit such as 512M or 4G (binary units), or use Memory::mib / Memory::gib"));
        let t = text.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let number: f64 = number.parse().map_err(|_| bad())?;
        let unit = unit.trim().to_ascii_lowercase();
        let shift = match unit.trim_end_matches("ib").trim_end_matches('b') {
            "" => 0,
            "k" => 10,
            "m" => 20,
            "g" => 30,
            "t" => 40,
            _ => return Err(bad()),
        };
        if !number.is_finite() || number < 0.0 || (unit == "ib") {
            return Err(bad());
        }
        Ok(Memory((number * (1u64 << shift) as f64).ceil() as u64))
    }
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (n, unit) = self.binary();
        write!(f, "{n} {unit}iB")
    }
}

/// `HH:MM:SS`, as Slurm and Grid Engine write wall-clock limits.
pub fn hms(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// The flag for a free-form option, by ClusterManagers.jl's rule: a one-letter key becomes
/// `-k value`, a longer one `--long-name=value` with `_` turned into `-`, an empty value a
/// bare flag.
///
/// ```
/// use clusterman::launch::scheduler::options::keyword_flag;
/// assert_eq!(keyword_flag("t", "00:05:00"), ["-t", "00:05:00"]);
/// assert_eq!(keyword_flag("mem_per_cpu", "100"), ["--mem-per-cpu=100"]);
/// assert_eq!(keyword_flag("exclusive", ""), ["--exclusive"]);
/// ```
pub fn keyword_flag(key: &str, value: &str) -> Vec<String> {
    match (key.chars().count(), value.is_empty()) {
        (1, true) => vec![format!("-{key}")],
        (1, false) => vec![format!("-{key}"), value.to_string()],
        (_, true) => vec![format!("--{}", key.replace('_', "-"))],
        (_, false) => vec![format!("--{}={value}", key.replace('_', "-"))],
    }
}

/// Checks free-form options against the flags the manager sets itself: `owned` holds
/// `(short, long)` pairs such as `("J", "job-name")`.
pub(crate) fn check_owned(options: &[(String, String)], owned: &[(&str, &str, &str)]) -> Result<()> {
    for (key, _) in options {
        let long = key.replace('_', "-");
        if let Some((short, long_flag, instead)) = owned.iter().find(|(s, l, _)| key == s || long == *l) {
            return Err(Error::Launch(format!("option `{key}` clashes with -{short}/--{long_flag}, which clusterman sets itself; {instead}")));
        }
    }
    Ok(())
}

/// Refuses submit flags that clash with the ones the manager sets (ClusterManagers.jl
/// issue #142: a user's `-J` broke the job array), naming the flag.
pub(crate) fn refuse_owned(command: &str, flags: &[String], owned: &[(&str, &str)]) -> Result<()> {
    match owned.iter().find(|(flag, _)| flags.iter().any(|f| f == flag)) {
        Some((flag, instead)) => Err(Error::Launch(format!("{command} flag {flag} clashes with one clusterman sets itself; {instead}"))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_translate_like_clustermanagers_jl() {
        assert_eq!(keyword_flag("exclusive", ""), ["--exclusive"]);
        assert_eq!(keyword_flag("mem_per_cpu", "100"), ["--mem-per-cpu=100"]);
        assert_eq!(keyword_flag("t", "00:05:00"), ["-t", "00:05:00"]);
        assert_eq!(keyword_flag("p", ""), ["-p"]);
        assert_eq!(keyword_flag("partition", "debug"), ["--partition=debug"]);
    }

    #[test]
    fn owned_flags_are_refused_by_either_name() {
        let owned = [("J", "job-name", "use JobOptions::name")];
        for key in ["J", "job_name", "job-name"] {
            let err = check_owned(&[(key.into(), "x".into())], &owned).unwrap_err().to_string();
            assert!(err.contains(&format!("option `{key}`")) && err.contains("-J/--job-name") && err.contains("JobOptions::name"), "{err}");
        }
        assert!(check_owned(&[("time".into(), "1".into())], &owned).is_ok());
    }

    #[test]
    fn skipped_directives_go_and_extra_ones_come_last() {
        let o = JobOptions::new().skip_directive("--mem").extra_directive("--gres=gpu:1");
        assert_eq!(o.directives(vec!["--mem=4G".into(), "--time=1".into()]), ["--time=1", "--gres=gpu:1"]);
    }

    #[test]
    fn options_left_unset_keep_the_managers_defaults() {
        let defaults = JobOptions::new().layout(Layout::Array).submit_retry_delays([Duration::from_secs(1)]);
        let merged = JobOptions::new().name("x").with_defaults(&defaults);
        assert_eq!((merged.layout_or_default(), merged.retry_delays()), (Layout::Array, &[Duration::from_secs(1)][..]));
        let chosen = JobOptions::new().layout(Layout::Mpi).submit_retry_delays([]).with_defaults(&defaults);
        assert_eq!((chosen.layout_or_default(), chosen.retry_delays()), (Layout::Mpi, &[][..]));
        assert!(crate::launch::scheduler::HtCondorManager::new(2).job(JobOptions::new().name("x")).job_script().is_ok(), "still an array, which HTCondor needs");
    }

    #[test]
    fn memory_sizes_parse_in_binary_units_and_round_up_to_mib() {
        for (text, bytes) in [("4G", 4 << 30), ("4g", 4 << 30), ("4GB", 4 << 30), ("4GiB", 4 << 30), ("512M", 512 << 20), ("1.5 GiB", 3 << 29), ("100", 100), ("2T", 2 << 40)] {
            assert_eq!(text.parse::<Memory>().unwrap(), Memory::bytes(bytes), "{text}");
        }
        for text in ["", "G", "4Gx", "-1G", "4 bananas", "4iB"] {
            assert!(text.parse::<Memory>().is_err(), "{text}");
        }
        assert_eq!(Memory::gib(2).binary(), (2, 'G'));
        assert_eq!(Memory::mib(1536).binary(), (1536, 'M'));
        assert_eq!(Memory::bytes(1).binary(), (1, 'M'), "never less than asked");
        assert_eq!(Memory::mib(1536).to_string(), "1536 MiB");
    }

    #[test]
    fn walltime_is_hours_minutes_seconds() {
        assert_eq!(hms(Duration::from_secs(3 * 3600 + 5 * 60 + 7)), "03:05:07");
        assert_eq!(hms(Duration::from_secs(100 * 3600)), "100:00:00");
    }
}
