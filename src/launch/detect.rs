//! Which batch allocation this program runs in, if any, and how many slots it has.

/// A batch allocation this program runs inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// `slurm`, `lsf`, `sge` or `pbs`.
    pub scheduler: &'static str,
    /// The job id.
    pub job_id: String,
    /// Task slots in the allocation, when the scheduler says.
    pub slots: Option<usize>,
}

/// The allocation this program runs in, from the scheduler's environment variables:
/// Slurm (`SLURM_JOB_ID`/`SLURM_JOBID`, slots `SLURM_NTASKS`), LSF (`LSB_JOBID`,
/// `LSB_DJOB_NUMPROC`), Grid Engine (`JOB_ID` with `SGE_O_HOST` or `PE_HOSTFILE`, `NSLOTS`),
/// PBS/Torque (`PBS_JOBID`, `PBS_NP` or the lines of `PBS_NODEFILE`).
pub fn detect_allocation() -> Option<Allocation> {
    detect_from(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
}

/// [`detect_allocation`] over any variable lookup (for tests and other environments).
pub fn detect_from(var: impl Fn(&str) -> Option<String>) -> Option<Allocation> {
    let number = |k: &str| var(k).and_then(|v| v.trim().parse().ok());
    if let Some(job_id) = var("SLURM_JOB_ID").or_else(|| var("SLURM_JOBID")) {
        return Some(Allocation { scheduler: "slurm", job_id, slots: number("SLURM_NTASKS").or_else(|| number("SLURM_NPROCS")) });
    }
    if let Some(job_id) = var("LSB_JOBID") {
        return Some(Allocation { scheduler: "lsf", job_id, slots: number("LSB_DJOB_NUMPROC").or_else(|| number("LSB_MAX_NUM_PROCESSORS")) });
    }
    if let Some(job_id) = var("JOB_ID").filter(|_| var("SGE_O_HOST").is_some() || var("PE_HOSTFILE").is_some()) {
        return Some(Allocation { scheduler: "sge", job_id, slots: number("NSLOTS") });
    }
    if let Some(job_id) = var("PBS_JOBID") {
        let from_nodefile = || var("PBS_NODEFILE").and_then(|f| std::fs::read_to_string(f).ok()).map(|t| t.lines().filter(|l| !l.trim().is_empty()).count());
        return Some(Allocation { scheduler: "pbs", job_id, slots: number("PBS_NP").or_else(from_nodefile) });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn each_scheduler_is_recognised_with_its_slots() {
        assert_eq!(detect_from(env(&[("SLURM_JOBID", "7"), ("SLURM_NTASKS", "4")])), Some(Allocation { scheduler: "slurm", job_id: "7".into(), slots: Some(4) }));
        assert_eq!(detect_from(env(&[("LSB_JOBID", "12"), ("LSB_DJOB_NUMPROC", "8")])).unwrap().slots, Some(8));
        assert_eq!(detect_from(env(&[("JOB_ID", "3"), ("SGE_O_HOST", "h"), ("NSLOTS", "2")])).unwrap().scheduler, "sge");
        assert_eq!(detect_from(env(&[("JOB_ID", "3")])), None, "JOB_ID alone is too generic");
        let nodefile = std::env::temp_dir().join(format!("cman-nodefile-{}", std::process::id()));
        std::fs::write(&nodefile, "n1\nn1\nn2\n").unwrap();
        let found = detect_from(env(&[("PBS_JOBID", "9.server"), ("PBS_NODEFILE", nodefile.to_str().unwrap())]));
        std::fs::remove_file(&nodefile).unwrap();
        assert_eq!(found, Some(Allocation { scheduler: "pbs", job_id: "9.server".into(), slots: Some(3) }));
        assert_eq!(detect_from(env(&[])), None);
    }
}
