//! Identifiers every layer shares.

/// A process in the cluster: 1 is the master, workers are 2, 3, ...
pub type Pid = u32;
