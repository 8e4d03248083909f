//! CPU topology discovery and worker-to-CPU placement.
//!
//! Placement works on the real socket/core/hyperthread layout read from sysfs,
//! because numeric CPU ids alone say nothing about which CPUs share a core or a socket.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::Path;

/// One logical CPU as seen in sysfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpu {
    /// Logical CPU id (the `N` in `cpuN`), as passed to `sched_setaffinity`.
    pub id: usize,
    /// Physical package (socket) id.
    pub socket: usize,
    /// Core id within the socket; CPUs with equal `(socket, core)` are hyperthread siblings.
    pub core: usize,
    /// Index of this CPU among its core's siblings by ascending id (0 = first sibling).
    pub thread: usize,
}

/// The socket/core/thread layout of this machine's online CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuTopology {
    cpus: Vec<Cpu>, // sorted by id, ids unique
}

impl CpuTopology {
    /// Reads `<root>/cpu<N>/topology/physical_package_id` and `core_id` for every online CPU.
    ///
    /// Online CPUs come from `<root>/online` (a cpulist such as `0-3,8-11`); if that file is
    /// missing, every `cpu<N>` directory counts. A CPU whose topology files are missing (or
    /// report `-1`, as some VMs do) is treated as socket 0, core = its id, i.e. its own core.
    pub fn from_sysfs(root: &Path) -> io::Result<CpuTopology> {
        let ids = match fs::read_to_string(root.join("online")) {
            Ok(list) => {
                parse_cpu_list(&list).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => cpu_dirs(root)?,
            Err(e) => return Err(e),
        };
        let triples = ids
            .into_iter()
            .map(|id| {
                let topo = root.join(format!("cpu{id}")).join("topology");
                let socket = read_id(&topo.join("physical_package_id"))?.unwrap_or(0);
                let core = read_id(&topo.join("core_id"))?.unwrap_or(id);
                Ok((id, socket, core))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self::from_triples(&triples))
    }

    /// `from_sysfs("/sys/devices/system/cpu")` on Linux; an `Err` elsewhere, since pinning
    /// relies on Linux-only interfaces.
    pub fn detect() -> Result<CpuTopology, String> {
        if !cfg!(target_os = "linux") {
            return Err(
                "CPU pinning needs Linux (sysfs topology and sched_setaffinity)".to_string(),
            );
        }
        let root = Path::new("/sys/devices/system/cpu");
        let topology = Self::from_sysfs(root)
            .map_err(|e| format!("cannot read CPU topology from {}: {e}", root.display()))?;
        if topology.is_empty() {
            return Err(format!("no online CPUs found under {}", root.display()));
        }
        Ok(topology)
    }

    /// Only the CPUs in `allowed` (such as the affinity mask of this process: inside a
    /// cpuset, under `taskset` or in a Slurm allocation).
    pub fn restricted_to(&self, allowed: &[usize]) -> CpuTopology {
        CpuTopology { cpus: self.cpus.iter().filter(|c| allowed.contains(&c.id)).cloned().collect() }
    }

    /// Builds a topology from explicit `(id, socket, core)` triples, so tests and users can
    /// describe a machine without sysfs; computes `thread`. Duplicate ids keep the first triple.
    pub fn from_triples(cpus: &[(usize, usize, usize)]) -> CpuTopology {
        let mut sorted = cpus.to_vec();
        sorted.sort_by_key(|&(id, _, _)| id); // stable: the first triple for an id wins
        sorted.dedup_by_key(|&mut (id, _, _)| id);
        let mut siblings: BTreeMap<(usize, usize), usize> = BTreeMap::new();
        let cpus = sorted
            .into_iter()
            .map(|(id, socket, core)| {
                let seen = siblings.entry((socket, core)).or_insert(0);
                let thread = *seen;
                *seen += 1;
                Cpu {
                    id,
                    socket,
                    core,
                    thread,
                }
            })
            .collect();
        CpuTopology { cpus }
    }

    /// All CPUs, sorted by id.
    pub fn cpus(&self) -> &[Cpu] {
        &self.cpus
    }

    /// Number of distinct sockets.
    pub fn sockets(&self) -> usize {
        self.cpus
            .iter()
            .map(|c| c.socket)
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// Number of CPUs.
    pub fn len(&self) -> usize {
        self.cpus.len()
    }

    /// True if the topology has no CPUs (nothing can be pinned).
    pub fn is_empty(&self) -> bool {
        self.cpus.is_empty()
    }

    /// Order in which Compact hands out CPUs (see [`AffinityMode`]).
    pub fn compact_order(&self) -> Vec<usize> {
        self.compact_cpus().iter().map(|c| c.id).collect()
    }

    /// Order in which Balanced hands out CPUs (see [`AffinityMode`]).
    pub fn balanced_order(&self) -> Vec<usize> {
        let mut per_socket: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for cpu in self.compact_cpus() {
            per_socket.entry(cpu.socket).or_default().push(cpu.id);
        }
        let rounds = per_socket.values().map(Vec::len).max().unwrap_or(0);
        // Exhausted sockets simply yield nothing in later rounds.
        (0..rounds)
            .flat_map(|round| {
                per_socket
                    .values()
                    .filter_map(move |ids| ids.get(round).copied())
            })
            .collect()
    }

    /// CPUs by socket, then thread index, then core: physical cores before hyperthreads.
    fn compact_cpus(&self) -> Vec<Cpu> {
        let mut cpus = self.cpus.clone();
        cpus.sort_by_key(|c| (c.socket, c.thread, c.core, c.id));
        cpus
    }

    fn contains(&self, id: usize) -> bool {
        self.cpus.binary_search_by_key(&id, |c| c.id).is_ok()
    }
}

/// How `LocalAffinityManager` chooses a CPU for each worker.
///
/// Both automatic modes use the real sockets and hyperthreads from sysfs. Julia's
/// `LocalAffinityManager` only spreads over numeric CPU ids (and its `COMPACT` starts at
/// CPU 1), so it may put two workers on sibling hyperthreads while whole cores sit idle, or
/// crowd one socket's memory bandwidth while the other socket is unused.
///
/// Worked example: 2 sockets × 4 cores × 2 hyperthreads, numbered the Linux way (socket 0:
/// cores on CPUs 0-3, their siblings 8-11; socket 1: cores on CPUs 4-7, siblings 12-15).
///
/// ```text
/// Compact:  0,1,2,3,8,9,10,11, 4,5,6,7,12,13,14,15
/// Balanced: 0,4,1,5,2,6,3,7, 8,12,9,13,10,14,11,15
/// ```
///
/// Worker `i` gets `order[i % order.len()]`, so more workers than CPUs wrap around.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AffinityMode {
    /// Fill one socket before the next (shared caches, one NUMA node): within a socket first
    /// one CPU per physical core (thread 0, by core id), then the second hyperthreads, etc.
    Compact,
    /// Spread workers over sockets round-robin (more total memory bandwidth): worker `k` goes
    /// to socket `k mod S`, taking each socket's CPUs in its compact order; exhausted sockets
    /// are skipped when sockets have different CPU counts.
    #[default]
    Balanced,
    /// Explicit CPU ids: worker `i` gets `list[i % list.len()]`.
    Cpus(Vec<usize>),
}

/// The CPU id for each of `np` workers under `mode`.
///
/// Fails if the topology is empty, or if a `Cpus` list is empty or names a CPU that does not
/// exist (the message lists the CPUs that do).
pub fn place(topology: &CpuTopology, mode: &AffinityMode, np: usize) -> Result<Vec<usize>, String> {
    let order = match mode {
        AffinityMode::Compact => topology.compact_order(),
        AffinityMode::Balanced => topology.balanced_order(),
        AffinityMode::Cpus(list) => {
            if list.is_empty() {
                return Err("AffinityMode::Cpus needs at least one CPU id".to_string());
            }
            if let Some(bad) = list.iter().find(|&&id| !topology.contains(id)) {
                let ids: Vec<usize> = topology.cpus().iter().map(|c| c.id).collect();
                return Err(format!(
                    "CPU {bad} is not online, or not one this process may use (its cpuset or affinity mask); usable CPUs: {}",
                    format_cpu_list(&ids)
                ));
            }
            list.clone()
        }
    };
    if order.is_empty() {
        return Err("no CPUs available to pin workers to".to_string());
    }
    Ok((0..np).map(|i| order[i % order.len()]).collect())
}

/// Parses a Linux cpulist (`"0-3,8,10-11"`) into ascending, deduplicated ids; also used to
/// read back `Cpus_allowed_list` from `/proc/<pid>/status`. An empty string is an empty list.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let list = s.trim();
    let num = |t: &str| {
        t.trim()
            .parse::<usize>()
            .map_err(|_| format!("invalid CPU list {list:?}: bad CPU id {t:?}"))
    };
    let mut ids = Vec::new();
    if list.is_empty() {
        return Ok(ids);
    }
    for part in list.split(',') {
        match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (num(lo)?, num(hi)?);
                if lo > hi {
                    return Err(format!(
                        "invalid CPU list {list:?}: range {lo}-{hi} is reversed"
                    ));
                }
                ids.extend(lo..=hi);
            }
            None => ids.push(num(part)?),
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Formats ascending ids as a cpulist (`0-3,8`) so error messages stay short on big machines.
fn format_cpu_list(ids: &[usize]) -> String {
    let runs = ids.chunk_by(|a, b| a + 1 == *b).map(|run| match run {
        [lo, .., hi] => format!("{lo}-{hi}"),
        _ => run[0].to_string(),
    });
    runs.collect::<Vec<_>>().join(",")
}

/// Ids of all `cpu<N>` directories (skipping `cpufreq`, `cpuidle`, ...).
fn cpu_dirs(root: &Path) -> io::Result<Vec<usize>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(root)? {
        let name = entry?.file_name();
        let digits = name.to_str().and_then(|n| n.strip_prefix("cpu"));
        if let Some(id) = digits
            .filter(|d| d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse().ok())
        {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// Reads a sysfs id; `None` if the file is missing or negative (unknown topology).
fn read_id(path: &Path) -> io::Result<Option<usize>> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let value: i64 = text.trim().parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: not a number: {text:?}", path.display()),
                )
            })?;
            Ok(usize::try_from(value).ok())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::AffinityMode::{Balanced, Compact, Cpus};
    use super::*;
    use std::path::PathBuf;

    /// 2 sockets × 4 cores × 2 hyperthreads, Linux numbering.
    fn two_socket() -> CpuTopology {
        let triples: Vec<_> = (0..16).map(|id| (id, (id % 8) / 4, id % 4)).collect();
        CpuTopology::from_triples(&triples)
    }

    /// `(id, socket, core, thread)` of every CPU, for compact assertions.
    fn layout(t: &CpuTopology) -> Vec<(usize, usize, usize, usize)> {
        t.cpus()
            .iter()
            .map(|c| (c.id, c.socket, c.core, c.thread))
            .collect()
    }

    #[test]
    fn a_cpuset_keeps_only_its_cpus_in_every_order() {
        let t = CpuTopology::from_triples(&[(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]).restricted_to(&[1, 3]);
        assert_eq!(t.cpus().iter().map(|c| c.id).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(place(&t, &Balanced, 3).unwrap(), vec![1, 3, 1]);
        assert_eq!(place(&t, &Compact, 2).unwrap(), vec![1, 3]);
        assert!(place(&t, &Cpus(vec![0]), 1).unwrap_err().contains("not one this process may use"));
    }

    #[test]
    fn two_socket_orders() {
        let t = two_socket();
        assert_eq!((t.len(), t.sockets()), (16, 2));
        assert_eq!(layout(&t)[8], (8, 0, 0, 1));
        let compact = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15];
        let balanced = [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15];
        assert_eq!(t.compact_order(), compact);
        assert_eq!(t.balanced_order(), balanced);
        assert_eq!(place(&t, &AffinityMode::default(), 3).unwrap(), [0, 4, 1]);
    }

    #[test]
    fn single_socket_without_hyperthreads() {
        let t = CpuTopology::from_triples(&[(1, 0, 1), (0, 0, 0)]);
        assert_eq!(layout(&t), [(0, 0, 0, 0), (1, 0, 1, 0)]);
        assert_eq!(t.sockets(), 1);
        assert_eq!(t.compact_order(), [0, 1]);
        assert_eq!(t.balanced_order(), [0, 1]);
    }

    #[test]
    fn balanced_skips_exhausted_sockets() {
        let t = CpuTopology::from_triples(&[(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 1, 0)]);
        assert_eq!(t.balanced_order(), [0, 3, 1, 2]);
    }

    #[test]
    fn wraps_around_with_more_workers_than_cpus() {
        let t = CpuTopology::from_triples(&[(0, 0, 0), (1, 1, 0)]);
        assert_eq!(place(&t, &Compact, 5).unwrap(), [0, 1, 0, 1, 0]);
        assert!(place(&t, &Balanced, 0).unwrap().is_empty());
        let empty = CpuTopology::from_triples(&[]);
        assert!(place(&empty, &Balanced, 1).is_err());
    }

    #[test]
    fn explicit_cpus() {
        let t = two_socket();
        assert_eq!(place(&t, &Cpus(vec![5, 3]), 3).unwrap(), [5, 3, 5]);
        let err = place(&t, &Cpus(vec![]), 1).unwrap_err();
        assert!(err.contains("at least one"), "{err}");
        let err = place(&t, &Cpus(vec![2, 99]), 1).unwrap_err();
        assert!(err.contains("CPU 99") && err.contains("0-15"), "{err}");
    }

    #[test]
    fn parses_cpu_lists() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n").unwrap(),
            [0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpu_list("5,1-2,2").unwrap(), [1, 2, 5]);
        assert!(parse_cpu_list("  ").unwrap().is_empty());
        for bad in ["a", "1,,2", "3-1", "1-", "-1", "0-3:2"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(format_cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
    }

    /// cpu0..cpu3: 1 socket, 2 cores, 2 hyperthreads; cpu4 has no topology files.
    fn fake_sysfs(name: &str) -> PathBuf {
        let dir = format!("clusterman-topology-{}-{name}", std::process::id());
        let root = std::env::temp_dir().join(dir);
        let _ = fs::remove_dir_all(&root);
        for (id, core) in [(0, 0), (1, 1), (2, 0), (3, 1)] {
            let topo = root.join(format!("cpu{id}/topology"));
            fs::create_dir_all(&topo).unwrap();
            fs::write(topo.join("physical_package_id"), "0\n").unwrap();
            fs::write(topo.join("core_id"), format!("{core}\n")).unwrap();
        }
        fs::create_dir_all(root.join("cpu4")).unwrap();
        fs::create_dir_all(root.join("cpufreq")).unwrap();
        root
    }

    #[test]
    fn reads_fake_sysfs_and_skips_offline_cpus() {
        let root = fake_sysfs("online");
        fs::write(root.join("online"), "0-1,3-4\n").unwrap(); // cpu2 offline
        let t = CpuTopology::from_sysfs(&root).unwrap();
        fs::remove_dir_all(&root).unwrap();
        let expected = [(0, 0, 0, 0), (1, 0, 1, 0), (3, 0, 1, 1), (4, 0, 4, 0)];
        assert_eq!(layout(&t), expected);
        assert_eq!(t.compact_order(), [0, 1, 4, 3]);
    }

    #[test]
    fn fake_sysfs_without_online_file_uses_cpu_dirs() {
        let root = fake_sysfs("dirs");
        let t = CpuTopology::from_sysfs(&root).unwrap();
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(t.len(), 5);
        assert_eq!(t.compact_order(), [0, 1, 4, 2, 3]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn detects_this_machine() {
        let t = CpuTopology::detect().unwrap();
        assert!(!t.is_empty() && t.sockets() >= 1);
    }
}
