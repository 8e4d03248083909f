//! Starting workers. A [`ClusterManager`] only has to start N copies of this program with
//! the environment [`LaunchContext`] gives it, and to stop them again; every worker then
//! dials the master's listener by itself (no output scraping, no dial-back).

pub(crate) mod affinity;
mod detect;
mod elastic;
pub(crate) mod guard;
pub(crate) mod local;
pub(crate) mod process;
mod ranks;
pub mod scheduler;
mod secret;
mod shell;
pub mod topology;

pub use crate::cluster::launcher::{ClusterManager, Launch, LaunchContext, LaunchStatus};
pub use affinity::LocalAffinityManager;
pub use detect::{Allocation, detect_allocation, detect_from};
pub use elastic::{CommandStyle, ElasticAddress, ElasticManager, ElasticWorkers};
pub use local::LocalManager;
pub use ranks::{MpiRanks, RankMap};
pub use secret::SecretFile;

