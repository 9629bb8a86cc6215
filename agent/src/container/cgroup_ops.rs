//! The cgroup operations the container lifecycle uses, as traits: the guest
//! implements them with [`Cgroup`], unit tests with a fake, so the lifecycle
//! can be tested on any host.

use super::cgroup::Cgroup;
use jevm_protocol::ContainerStats;
use oci_spec::runtime::LinuxResources;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub trait ContainerCgroup: Send + Sync {
    fn path(&self) -> &Path;
    fn update(&self, resources: &LinuxResources) -> io::Result<()>;
    fn freeze(&self, frozen: bool) -> io::Result<()>;
    fn pids(&self) -> io::Result<Vec<u32>>;
    fn stats(&self) -> io::Result<ContainerStats>;
    fn signal_all(&self, signal: i32) -> io::Result<()>;
    fn watch_oom(&self, on_oom: Box<dyn Fn() + Send + 'static>) -> io::Result<()>;
    /// Kills what is left, waits until the cgroup is empty, removes it.
    fn remove(self: Box<Self>) -> io::Result<()>;
}

pub trait Cgroups: Send + Sync {
    fn create(
        &self,
        container_id: &str,
        resources: Option<&LinuxResources>,
    ) -> io::Result<Box<dyn ContainerCgroup>>;
}

/// The guest's cgroup v2 tree (tests: a scratch cgroup of the host).
pub struct GuestCgroups {
    hierarchy: PathBuf,
    /// Made ahead for the VM's first container, until a create takes it.
    ahead: Mutex<Option<Cgroup>>,
}

impl GuestCgroups {
    /// Prepares `hierarchy` for containers (see [`Cgroup::prepare_in`]).
    /// A failure is logged; it shows again, with the container's name, at
    /// create.
    pub fn prepare(hierarchy: &Path) -> GuestCgroups {
        let ahead = match Cgroup::prepare_in(hierarchy) {
            Ok(cg) => Some(cg),
            Err(e) => {
                log::warn!("preparing the containers' cgroups: {e}");
                None
            }
        };
        GuestCgroups {
            hierarchy: hierarchy.to_owned(),
            ahead: Mutex::new(ahead),
        }
    }
}

impl Cgroups for GuestCgroups {
    fn create(
        &self,
        container_id: &str,
        resources: Option<&LinuxResources>,
    ) -> io::Result<Box<dyn ContainerCgroup>> {
        let ahead = {
            let mut ahead = self.ahead.lock().unwrap_or_else(|p| p.into_inner());
            // Before taking it: a bad id leaves it for the next create
            // (`create_in` checks the id on its own).
            if ahead.is_some() {
                super::cgroup::check_id(container_id)?;
            }
            ahead.take()
        };
        Ok(Box::new(match ahead {
            Some(cg) => cg.limited(resources)?,
            None => Cgroup::create_in(&self.hierarchy, container_id, resources)?,
        }))
    }
}

impl ContainerCgroup for Cgroup {
    fn path(&self) -> &Path {
        Cgroup::path(self)
    }
    fn update(&self, resources: &LinuxResources) -> io::Result<()> {
        Cgroup::update(self, resources)
    }
    fn freeze(&self, frozen: bool) -> io::Result<()> {
        Cgroup::freeze(self, frozen)
    }
    fn pids(&self) -> io::Result<Vec<u32>> {
        Cgroup::pids(self)
    }
    fn stats(&self) -> io::Result<ContainerStats> {
        Cgroup::stats(self)
    }
    fn signal_all(&self, signal: i32) -> io::Result<()> {
        Cgroup::signal_all(self, signal)
    }
    fn watch_oom(&self, on_oom: Box<dyn Fn() + Send + 'static>) -> io::Result<()> {
        Cgroup::watch_oom(self, on_oom)
    }
    fn remove(self: Box<Self>) -> io::Result<()> {
        Cgroup::remove(*self)
    }
}
