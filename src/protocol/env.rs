//! The environment contract between whatever starts a worker and the worker itself: three
//! or four variables, and how their values are spelled.

/// Environment variable holding the master's `host:port`.
pub const ENV_MASTER: &str = "CLUSTERMAN_MASTER";
/// Environment variable holding the secret itself (hex). Used where the environment stays
/// private to the user (local `mpirun`, `srun` steps, Kubernetes secrets); the worker
/// scrubs it from its own environment when it reads it.
pub const ENV_SECRET: &str = "CLUSTERMAN_SECRET";
/// Environment variable naming a file that holds the secret (mode 0600, or a pipe such as
/// `/dev/stdin`). Used wherever a scheduler keeps job scripts or environments that other
/// users may read.
pub const ENV_SECRET_FILE: &str = "CLUSTERMAN_SECRET_FILE";
/// Environment variable naming the launch and this worker's index in it (`<id>:<index>`,
/// `<id>:rank` or `<id>:task`).
pub const ENV_LAUNCH: &str = "CLUSTERMAN_LAUNCH";
/// Environment variable telling a worker to initialise MPI first, at this threading level.
pub const ENV_MPI: &str = "CLUSTERMAN_MPI";
/// Environment variable set in a job that runs the whole program on every rank (see
/// `BatchManager::run_as_job`): there the program goes on instead of submitting itself.
pub const ENV_WHOLE_JOB: &str = "CLUSTERMAN_WHOLE_JOB";

/// How a worker learns its index in its launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Index {
    /// Given outright.
    Given(u32),
    /// Its MPI rank.
    Rank,
    /// Its job-array task id, counted from 1 by the scheduler.
    Task,
    /// The first seat still free: for workers started by hand, in any order.
    Any,
}

/// The index a hello carries for [`Index::Any`].
pub const ANY_SEAT: u32 = u32::MAX;

impl Index {
    /// How the index is written in [`ENV_LAUNCH`].
    pub fn spelling(self) -> String {
        match self {
            Index::Given(i) => i.to_string(),
            Index::Rank => "rank".into(),
            Index::Task => "task".into(),
            Index::Any => "any".into(),
        }
    }
}

/// The value of [`ENV_LAUNCH`] for `launch` and `index`.
pub fn launch_value(launch: u64, index: Index) -> String {
    format!("{launch}:{}", index.spelling())
}

/// Parses a value of [`ENV_LAUNCH`].
pub fn parse_launch(value: &str) -> Result<(u64, Index), String> {
    let malformed = || format!("malformed {ENV_LAUNCH}={value}");
    let (id, index) = value.split_once(':').ok_or_else(malformed)?;
    let id = id.parse().map_err(|_| malformed())?;
    let index = match index {
        "rank" => Index::Rank,
        "task" => Index::Task,
        "any" => Index::Any,
        n => Index::Given(n.parse().map_err(|_| malformed())?),
    };
    Ok((id, index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_values_round_trip() {
        for index in [Index::Given(3), Index::Rank, Index::Task, Index::Any] {
            assert_eq!(parse_launch(&launch_value(77, index)).unwrap(), (77, index));
        }
        assert!(parse_launch("x").unwrap_err().contains("malformed"));
        assert!(parse_launch("1:x").is_err());
    }
}
