//! The cgroup operations the container lifecycle uses, as traits: the guest
//! implements them with [`Cgroup`], unit tests with a fake, so the lifecycle
//! can be tested on any host.

use super::cgroup::Cgroup;
use super::inotify::{Watch, Watcher};
use jevm_protocol::ContainerStats;
use oci_spec::runtime::LinuxResources;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
    /// Started ahead as well: every container's OOM watch goes to it.
    watcher: Option<Arc<Watcher>>,
}

/// A container's cgroup in the guest, with its OOM watch.
struct GuestCgroup {
    cgroup: Cgroup,
    watcher: Option<Arc<Watcher>>,
    oom: Mutex<Option<Watch>>,
}

impl GuestCgroups {
    /// Prepares `hierarchy` for containers (see [`Cgroup::prepare_in`])
    /// and starts the OOM watcher. A failure is logged; it shows again,
    /// with the container's name, at create.
    pub fn prepare(hierarchy: &Path) -> GuestCgroups {
        let ahead = match Cgroup::prepare_in(hierarchy) {
            Ok(cg) => Some(cg),
            Err(e) => {
                log::warn!("preparing the containers' cgroups: {e}");
                None
            }
        };
        let watcher = match Watcher::start("oom-watch") {
            Ok(w) => Some(w),
            Err(e) => {
                log::warn!("starting the OOM watcher: {e}");
                None
            }
        };
        GuestCgroups {
            hierarchy: hierarchy.to_owned(),
            ahead: Mutex::new(ahead),
            watcher,
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
        let cgroup = match ahead {
            Some(cg) => cg.limited(resources)?,
            None => Cgroup::create_in(&self.hierarchy, container_id, resources)?,
        };
        Ok(Box::new(GuestCgroup {
            cgroup,
            watcher: self.watcher.clone(),
            oom: Mutex::new(None),
        }))
    }
}

impl ContainerCgroup for GuestCgroup {
    fn path(&self) -> &Path {
        self.cgroup.path()
    }
    fn update(&self, resources: &LinuxResources) -> io::Result<()> {
        self.cgroup.update(resources)
    }
    fn freeze(&self, frozen: bool) -> io::Result<()> {
        self.cgroup.freeze(frozen)
    }
    fn pids(&self) -> io::Result<Vec<u32>> {
        self.cgroup.pids()
    }
    fn stats(&self) -> io::Result<ContainerStats> {
        self.cgroup.stats()
    }
    fn signal_all(&self, signal: i32) -> io::Result<()> {
        self.cgroup.signal_all(signal)
    }
    fn watch_oom(&self, on_oom: Box<dyn Fn() + Send + 'static>) -> io::Result<()> {
        let watcher = self
            .watcher
            .as_ref()
            .ok_or_else(|| io::Error::other("the OOM watcher did not start"))?;
        let watch = self.cgroup.watch_oom(watcher, on_oom)?;
        *self.oom.lock().unwrap_or_else(|p| p.into_inner()) = Some(watch);
        Ok(())
    }
    fn remove(self: Box<Self>) -> io::Result<()> {
        // No OOM kill is reported once the container is being deleted.
        drop(self.oom.lock().unwrap_or_else(|p| p.into_inner()).take());
        self.cgroup.remove()
    }
}
