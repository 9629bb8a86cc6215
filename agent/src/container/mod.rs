//! Containers in the guest: the requests of `jevm_protocol` that create,
//! start, signal and watch containers and their processes.

pub mod cgroup;
pub mod init;
pub mod plan;
