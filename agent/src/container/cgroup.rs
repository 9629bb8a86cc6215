//! cgroup v2 inside the guest: one cgroup per container under
//! `/sys/fs/cgroup/jevm/<container id>`, limits from the OCI spec, freeze,
//! counters, and OOM-kill notification.
//!
//! (Signatures fixed for the agent's lifecycle code; bodies are filled in by
//! the container-init work.)
#![allow(dead_code, unused_variables)]

use jevm_protocol::ContainerStats;
use oci_spec::runtime::LinuxResources;
use std::io;
use std::path::{Path, PathBuf};

/// Parent of every container cgroup in the guest.
pub const ROOT: &str = "/sys/fs/cgroup/jevm";

pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates the container's cgroup (enabling the cpu, memory, pids and io
    /// controllers on the way down) and applies `resources`.
    pub fn create(container_id: &str, resources: Option<&LinuxResources>) -> io::Result<Cgroup> {
        todo!()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies new limits (`ctr task update`, CRI UpdateContainerResources).
    pub fn update(&self, resources: &LinuxResources) -> io::Result<()> {
        todo!()
    }

    /// Freezes (`true`) or thaws the cgroup and waits until the kernel says
    /// it is done.
    pub fn freeze(&self, frozen: bool) -> io::Result<()> {
        todo!()
    }

    /// PIDs (guest root namespace) of every process in the cgroup.
    pub fn pids(&self) -> io::Result<Vec<u32>> {
        todo!()
    }

    pub fn stats(&self) -> io::Result<ContainerStats> {
        todo!()
    }

    /// Sends `signal` to every process in the cgroup (`cgroup.kill` for
    /// SIGKILL), thawing it first if frozen so the signal is acted on.
    pub fn signal_all(&self, signal: i32) -> io::Result<()> {
        todo!()
    }

    /// Number of OOM kills so far (`memory.events` `oom_kill`).
    pub fn oom_kills(&self) -> io::Result<u64> {
        todo!()
    }

    /// Calls `on_oom` from a thread of its own each time `oom_kill` in
    /// `memory.events` grows (inotify, no polling). The watch ends when the
    /// cgroup is removed.
    pub fn watch_oom(&self, on_oom: Box<dyn Fn() + Send + 'static>) -> io::Result<()> {
        todo!()
    }

    /// Kills what is left, waits until the cgroup is empty, removes it.
    pub fn remove(self) -> io::Result<()> {
        todo!()
    }
}
