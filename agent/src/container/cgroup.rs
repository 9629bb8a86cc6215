//! cgroup v2 inside the guest: one cgroup per container under
//! `/sys/fs/cgroup/jevm/<container id>` (the VM's first container gets
//! `jevm/first`, made ahead: see [`Cgroup::prepare_in`]), limits from the
//! OCI spec, freeze, counters, and OOM-kill notification.
//!
//! Waiting (freeze, emptiness, OOM kills) uses inotify on the cgroup's
//! event files, which the kernel marks modified on every change: no
//! polling.
// Used by the agent's lifecycle code, merged separately.
#![allow(dead_code)]

use super::inotify::{Inotify, Watch, Watcher};
use jevm_protocol::ContainerStats;
use nix::sys::inotify::AddWatchFlags;
use oci_spec::runtime::LinuxResources;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The guest's cgroup v2 hierarchy; every container cgroup is made under
/// its `jevm` cgroup.
pub const HIERARCHY: &str = "/sys/fs/cgroup";

/// Controllers a container's limits and counters need.
const CONTROLLERS: [&str; 6] = ["cpu", "cpuset", "memory", "pids", "io", "hugetlb"];

/// How long freezing or emptying a cgroup may take before it is an error.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Cgroup {
    path: PathBuf,
}

fn annotate(e: io::Error, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value)
        .map_err(|e| annotate(e, format!("write {value:?} to {}", path.display())))
}

fn read_file(path: &Path) -> io::Result<String> {
    std::fs::read_to_string(path).map_err(|e| annotate(e, format!("read {}", path.display())))
}

/// `key value` lines (cpu.stat, memory.stat, memory.events, cgroup.events).
fn parse_flat_keyed(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// A number or "max".
fn parse_max(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// Refuses an id that cannot name a cgroup directory.
pub fn check_id(container_id: &str) -> io::Result<()> {
    if container_id.is_empty()
        || container_id.contains('/')
        || container_id == "."
        || container_id == ".."
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("container id {container_id:?} cannot name a cgroup"),
        ));
    }
    Ok(())
}

/// Enables the container controllers this cgroup offers in its
/// subtree_control, so that its children get them.
fn enable_controllers(dir: &Path) -> io::Result<()> {
    let available = read_file(&dir.join("cgroup.controllers"))?;
    let enabled = read_file(&dir.join("cgroup.subtree_control"))?;
    let enabled: Vec<&str> = enabled.split_whitespace().collect();
    for c in available.split_whitespace() {
        if CONTROLLERS.contains(&c) && !enabled.contains(&c) {
            write_file(&dir.join("cgroup.subtree_control"), &format!("+{c}"))?;
        }
    }
    Ok(())
}

/// runc's mapping of cgroup v1 cpu.shares [2, 262144] to cpu.weight [1, 10000].
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// runc's mapping of blkio.weight [10, 1000] to io.weight [1, 10000].
pub fn blkio_weight_to_io_weight(weight: u16) -> u64 {
    let weight = u64::from(weight.clamp(10, 1000));
    1 + ((weight - 10) * 9999) / 990
}

/// OCI `swap` is memory+swap; cgroup v2 limits swap alone. None: leave
/// memory.swap.max as it is.
pub fn swap_max(swap: i64, limit: Option<i64>) -> io::Result<Option<String>> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
    match (swap, limit.unwrap_or(0)) {
        (0, _) => Ok(None),
        (s, _) if s < 0 => Ok(Some("max".into())),
        (_, l) if l < 0 => Ok(Some("max".into())),
        (_, 0) => Err(invalid(
            "memory.swap: a swap limit needs a memory limit".into(),
        )),
        (s, l) if s < l => Err(invalid(format!(
            "memory.swap: memory+swap limit {s} is below the memory limit {l}"
        ))),
        (s, l) => Ok(Some((s - l).to_string())),
    }
}

/// `cpu.max` for a quota and period; None: leave it as it is.
pub fn cpu_max(quota: Option<i64>, period: Option<u64>) -> Option<String> {
    if quota.unwrap_or(0) == 0 && period.unwrap_or(0) == 0 {
        return None;
    }
    let period = period.filter(|p| *p != 0).unwrap_or(100_000);
    Some(match quota {
        Some(q) if q > 0 => format!("{q} {period}"),
        _ => format!("max {period}"),
    })
}

fn limit_text(value: i64) -> String {
    if value < 0 {
        "max".into()
    } else {
        value.to_string()
    }
}

/// The name of the cgroup made ahead for a VM's first container.
pub const FIRST: &str = "first";

impl Cgroup {
    /// Makes the cgroup every container's is made in, with the controllers
    /// enabled on the way down, and in it the cgroup the VM's first
    /// container will get, [`FIRST`]. The agent does it when it starts: in
    /// a template, before the snapshot. Making a cgroup allocates every
    /// controller's state, and in a fresh clone each page that touches is a
    /// fault: a clone's first container saves ~10 ms by finding its cgroup
    /// made. It keeps that name, since cgroup v2 cannot rename a cgroup.
    pub fn prepare_in(hierarchy: &Path) -> io::Result<Cgroup> {
        let parent = Self::parent_in(hierarchy)?;
        let path = parent.join(FIRST);
        std::fs::create_dir(&path).map_err(|e| annotate(e, format!("mkdir {}", path.display())))?;
        Ok(Cgroup { path })
    }

    fn parent_in(hierarchy: &Path) -> io::Result<PathBuf> {
        enable_controllers(hierarchy)?;
        let parent = hierarchy.join("jevm");
        match std::fs::create_dir(&parent) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(annotate(e, format!("mkdir {}", parent.display()))),
        }
        enable_controllers(&parent)?;
        Ok(parent)
    }

    /// Creates the container's cgroup, `<hierarchy>/jevm/<container id>`
    /// (enabling the cpu, memory, pids and io controllers on the way down),
    /// and applies `resources`.
    pub fn create_in(
        hierarchy: &Path,
        container_id: &str,
        resources: Option<&LinuxResources>,
    ) -> io::Result<Cgroup> {
        check_id(container_id)?;
        let parent = Self::parent_in(hierarchy)?;
        let path = parent.join(container_id);
        std::fs::create_dir(&path).map_err(|e| annotate(e, format!("mkdir {}", path.display())))?;
        Cgroup { path }.limited(resources)
    }

    /// Applies `resources` to a new cgroup (or one made ahead, see
    /// [`Cgroup::prepare_in`]); on failure the cgroup is removed, so a
    /// failed create leaves none behind.
    pub fn limited(self, resources: Option<&LinuxResources>) -> io::Result<Cgroup> {
        if let Some(r) = resources {
            if let Err(e) = self.update(r) {
                let _ = std::fs::remove_dir(&self.path);
                return Err(e);
            }
        }
        Ok(self)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn set(&self, name: &str, value: &str) -> io::Result<()> {
        let path = self.file(name);
        std::fs::write(&path, value).map_err(|e| {
            // cgroupfs refuses to create files: a missing one is EACCES.
            let reason = if !path.exists() {
                "the controller is not available".to_string()
            } else {
                e.to_string()
            };
            io::Error::new(
                e.kind(),
                format!(
                    "cgroup {}: set {name} to {value:?}: {reason}",
                    self.path.display()
                ),
            )
        })
    }

    /// Applies new limits (`ctr task update`, CRI UpdateContainerResources).
    pub fn update(&self, resources: &LinuxResources) -> io::Result<()> {
        if let Some(m) = resources.memory() {
            if let Some(limit) = m.limit().filter(|l| *l != 0) {
                self.set("memory.max", &limit_text(limit))?;
            }
            if let Some(low) = m.reservation().filter(|l| *l != 0) {
                self.set("memory.low", &limit_text(low))?;
            }
            if let Some(swap) = m.swap() {
                if let Some(value) = swap_max(swap, m.limit())? {
                    // Without swap accounting the file does not exist, and
                    // there is no swap to limit.
                    if self.file("memory.swap.max").exists() || value != "max" {
                        self.set("memory.swap.max", &value)?;
                    }
                }
            }
        }
        if let Some(c) = resources.cpu() {
            if let Some(shares) = c.shares().filter(|s| *s != 0) {
                self.set("cpu.weight", &shares_to_weight(shares).to_string())?;
            }
            if let Some(max) = cpu_max(c.quota(), c.period()) {
                self.set("cpu.max", &max)?;
            }
            if let Some(cpus) = c.cpus().as_deref().filter(|s| !s.is_empty()) {
                self.set("cpuset.cpus", cpus)?;
            }
            if let Some(mems) = c.mems().as_deref().filter(|s| !s.is_empty()) {
                self.set("cpuset.mems", mems)?;
            }
        }
        if let Some(p) = resources.pids() {
            if p.limit() != 0 {
                self.set("pids.max", &limit_text(p.limit()))?;
            }
        }
        if let Some(b) = resources.block_io() {
            if let Some(w) = b.weight().filter(|w| *w != 0) {
                if self.file("io.bfq.weight").exists() {
                    self.set("io.bfq.weight", &w.to_string())?;
                } else {
                    self.set("io.weight", &blkio_weight_to_io_weight(w).to_string())?;
                }
            }
            let throttles = [
                ("rbps", b.throttle_read_bps_device()),
                ("wbps", b.throttle_write_bps_device()),
                ("riops", b.throttle_read_iops_device()),
                ("wiops", b.throttle_write_iops_device()),
            ];
            for (key, devices) in throttles {
                for d in devices.as_deref().unwrap_or_default() {
                    let rate = if d.rate() == 0 {
                        "max".to_string()
                    } else {
                        d.rate().to_string()
                    };
                    self.set(
                        "io.max",
                        &format!("{}:{} {key}={rate}", d.major(), d.minor()),
                    )?;
                }
            }
        }
        for h in resources.hugepage_limits().as_deref().unwrap_or_default() {
            self.set(
                &format!("hugetlb.{}.max", h.page_size()),
                &h.limit().to_string(),
            )?;
        }
        if let Some(unified) = resources.unified() {
            for (key, value) in unified {
                if key.contains('/') || key.starts_with('.') {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("cgroup unified key {key:?} is not a cgroup file"),
                    ));
                }
                self.set(key, value)?;
            }
        }
        Ok(())
    }

    fn events(&self) -> io::Result<BTreeMap<String, u64>> {
        Ok(parse_flat_keyed(&read_file(&self.file("cgroup.events"))?))
    }

    /// Waits until `cgroup.events` has `key` = `value`.
    fn wait_event(&self, key: &str, value: u64) -> io::Result<()> {
        let events = self.file("cgroup.events");
        let watch = Inotify::watch(&events, AddWatchFlags::IN_MODIFY)?;
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            // Read after the watch is in place, so no change is missed.
            if self.events()?.get(key) == Some(&value) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !watch.wait(left)? {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "cgroup {}: {key} did not become {value} within {SETTLE_TIMEOUT:?}",
                        self.path.display()
                    ),
                ));
            }
        }
    }

    /// Freezes (`true`) or thaws the cgroup and waits until the kernel says
    /// it is done.
    pub fn freeze(&self, frozen: bool) -> io::Result<()> {
        self.set("cgroup.freeze", if frozen { "1" } else { "0" })?;
        self.wait_event("frozen", u64::from(frozen))
    }

    /// PIDs (guest root namespace) of every process in the cgroup.
    pub fn pids(&self) -> io::Result<Vec<u32>> {
        Ok(read_file(&self.file("cgroup.procs"))?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    pub fn stats(&self) -> io::Result<ContainerStats> {
        // A counter whose controller is not enabled reads as zero.
        let optional = |name: &str| -> io::Result<Option<String>> {
            match std::fs::read_to_string(self.file(name)) {
                Ok(text) => Ok(Some(text)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(annotate(e, format!("read {}", self.file(name).display()))),
            }
        };
        let keyed = |name: &str| -> io::Result<BTreeMap<String, u64>> {
            Ok(optional(name)?
                .map(|t| parse_flat_keyed(&t))
                .unwrap_or_default())
        };
        let number = |name: &str| -> io::Result<Option<u64>> {
            Ok(optional(name)?.and_then(|t| parse_max(&t)))
        };
        Ok(ContainerStats {
            cpu: keyed("cpu.stat")?,
            memory_current: number("memory.current")?.unwrap_or(0),
            memory_max: number("memory.max")?,
            memory: keyed("memory.stat")?,
            memory_events: keyed("memory.events")?,
            pids_current: number("pids.current")?.unwrap_or(0),
            pids_max: number("pids.max")?,
        })
    }

    /// Sends `signal` to every process in the cgroup (`cgroup.kill` for
    /// SIGKILL), thawing it first if frozen so the signal is acted on.
    pub fn signal_all(&self, signal: i32) -> io::Result<()> {
        if signal == libc::SIGKILL && self.file("cgroup.kill").exists() {
            return self.set("cgroup.kill", "1");
        }
        if self.events()?.get("frozen") == Some(&1) {
            self.freeze(false)?;
        }
        let sig = nix::sys::signal::Signal::try_from(signal).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("signal {signal}: {e}"))
        })?;
        for pid in self.pids()? {
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("kill {pid} with {sig}: {e}"),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Number of OOM kills so far (`memory.events` `oom_kill`).
    pub fn oom_kills(&self) -> io::Result<u64> {
        match std::fs::read_to_string(self.file("memory.events")) {
            Ok(text) => Ok(parse_flat_keyed(&text)
                .get("oom_kill")
                .copied()
                .unwrap_or(0)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(annotate(
                e,
                format!("read {}", self.file("memory.events").display()),
            )),
        }
    }

    /// Calls `on_oom` (from `watcher`'s thread) each time `oom_kill` in
    /// `memory.events` grows, until the returned watch is dropped.
    pub fn watch_oom(
        &self,
        watcher: &Arc<Watcher>,
        on_oom: Box<dyn Fn() + Send + 'static>,
    ) -> io::Result<Watch> {
        let path = self.path.clone();
        let count = move || -> u64 { Cgroup { path: path.clone() }.oom_kills().unwrap_or(0) };
        let mut last = count();
        watcher.watch(
            &self.file("memory.events"),
            Box::new(move || {
                let now = count();
                if now > last {
                    last = now;
                    on_oom();
                }
            }),
        )
    }

    /// Kills what is left, waits until the cgroup is empty, removes it.
    pub fn remove(self) -> io::Result<()> {
        remove_tree(&self.path)
    }
}

/// Empties and removes `dir` and the cgroups under it, deepest first.
fn remove_tree(dir: &Path) -> io::Result<()> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| annotate(e, format!("read {}", dir.display())))?;
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    let cgroup = Cgroup {
        path: dir.to_path_buf(),
    };
    if cgroup.events()?.get("populated") != Some(&0) {
        cgroup.signal_all(libc::SIGKILL)?;
        cgroup.wait_event("populated", 0)?;
    }
    std::fs::remove_dir(dir).map_err(|e| annotate(e, format!("rmdir {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn runc_formulas() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(blkio_weight_to_io_weight(10), 1);
        assert_eq!(blkio_weight_to_io_weight(500), 4950);
        assert_eq!(blkio_weight_to_io_weight(1000), 10_000);
        assert_eq!(
            cpu_max(Some(50_000), Some(100_000)).as_deref(),
            Some("50000 100000")
        );
        assert_eq!(cpu_max(Some(-1), None).as_deref(), Some("max 100000"));
        assert_eq!(cpu_max(None, None), None);
        assert_eq!(swap_max(-1, Some(100)).unwrap().as_deref(), Some("max"));
        assert_eq!(swap_max(300, Some(100)).unwrap().as_deref(), Some("200"));
        assert_eq!(swap_max(0, Some(100)).unwrap(), None);
        assert!(swap_max(50, Some(100)).is_err());
        assert!(swap_max(50, None).is_err());
    }

    /// A scratch cgroup v2 directory of the host to play the guest's
    /// /sys/fs/cgroup, or None (tests print why they skip).
    fn scratch(name: &str) -> Option<PathBuf> {
        if !nix::unistd::geteuid().is_root() {
            crate::test_skip::skipped("not root");
            return None;
        }
        for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
            let root = Path::new(root);
            if root.join("cgroup.subtree_control").exists() {
                let dir = root.join(format!("jevm-cgtest-{name}-{}", std::process::id()));
                if std::fs::create_dir(&dir).is_ok() {
                    return Some(dir);
                }
            }
        }
        crate::test_skip::skipped("no writable cgroup v2 hierarchy");
        None
    }

    fn sleeper(cgroup: &Cgroup) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let procs = cgroup.file("cgroup.procs");
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        // SAFETY: only open/write/close, async-signal-safe, before exec.
        unsafe {
            cmd.pre_exec(move || std::fs::write(&procs, "0"));
        }
        cmd.spawn().unwrap()
    }

    /// The signal that ended `child`, reaped after `since`. The lifecycle
    /// tests' reaper (`container::tests`), once started, reaps every child
    /// of the test process: then the status is in the exit table, and
    /// `wait` finds no child.
    fn killed_by(child: &mut std::process::Child, since: crate::container::exits::Since) -> i32 {
        use std::os::unix::process::ExitStatusExt;
        match child.wait() {
            Ok(status) => status.signal().unwrap_or(0),
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let pid = child.id() as i32;
                    if let Some(exit) = crate::container::exits::lock().peek(pid, since) {
                        return exit.status as i32 - 128;
                    }
                    assert!(Instant::now() < deadline, "process {pid} was never reaped");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Err(e) => panic!("waiting for process {}: {e}", child.id()),
        }
    }

    #[test]
    fn lifecycle_on_the_host() {
        let Some(scratch) = scratch("life") else {
            return;
        };
        let hugetlb = std::fs::read_to_string(scratch.join("cgroup.controllers"))
            .unwrap()
            .contains("hugetlb");
        let resources: LinuxResources = if hugetlb {
            serde_json::from_str(r#"{"hugepageLimits":[{"pageSize":"2MB","limit":4194304}]}"#)
                .unwrap()
        } else {
            LinuxResources::default()
        };
        let cg = Cgroup::create_in(&scratch, "c1", Some(&resources)).unwrap();
        assert_eq!(cg.path(), scratch.join("jevm/c1"));
        if hugetlb {
            assert_eq!(
                std::fs::read_to_string(cg.file("hugetlb.2MB.max"))
                    .unwrap()
                    .trim(),
                "4194304"
            );
        }
        // memory.events needs the memory controller; cgroup.events has the
        // same inotify behaviour and shows the watch ending on removal.
        let changes = Arc::new(AtomicUsize::new(0));
        let seen = changes.clone();
        let watcher = Watcher::start("test-cgroup-watch").unwrap();
        let watch = watcher
            .watch(
                &cg.file("cgroup.events"),
                Box::new(move || {
                    seen.fetch_add(1, Ordering::SeqCst);
                }),
            )
            .unwrap();

        let since = crate::container::exits::lock().since_now();
        let mut a = sleeper(&cg);
        let mut b = sleeper(&cg);
        let mut pids = cg.pids().unwrap();
        pids.sort();
        let mut want = vec![a.id(), b.id()];
        want.sort();
        assert_eq!(pids, want);

        cg.freeze(true).unwrap();
        assert_eq!(cg.events().unwrap()["frozen"], 1);
        cg.freeze(false).unwrap();
        assert_eq!(cg.events().unwrap()["frozen"], 0);

        let stats = cg.stats().unwrap();
        assert!(stats.cpu.contains_key("usage_usec"), "{stats:?}");
        assert_eq!(
            cg.oom_kills().unwrap(),
            stats.memory_events.get("oom_kill").copied().unwrap_or(0)
        );

        // A frozen cgroup is thawed so that SIGTERM is acted on.
        cg.freeze(true).unwrap();
        cg.signal_all(libc::SIGTERM).unwrap();
        assert_eq!(killed_by(&mut a, since), libc::SIGTERM);
        assert_eq!(killed_by(&mut b, since), libc::SIGTERM);
        let mut d = sleeper(&cg);
        cg.signal_all(libc::SIGKILL).unwrap();
        assert_eq!(killed_by(&mut d, since), libc::SIGKILL);
        assert!(
            changes.load(Ordering::SeqCst) > 0,
            "cgroup.events changes were seen"
        );

        let mut c = sleeper(&cg);
        let path = cg.path().to_path_buf();
        cg.remove().unwrap();
        assert!(!path.exists());
        assert_eq!(killed_by(&mut c, since), libc::SIGKILL);
        // The watch of a removed cgroup's file ends without an error.
        drop(watch);
        assert_eq!(watcher.watching(), 0);

        std::fs::remove_dir(scratch.join("jevm")).unwrap();
        std::fs::remove_dir(&scratch).unwrap();
    }

    #[test]
    fn the_first_container_takes_the_cgroup_made_ahead() {
        use super::super::cgroup_ops::{Cgroups, GuestCgroups};
        let Some(scratch) = scratch("ahead") else {
            return;
        };
        let cgroups = GuestCgroups::prepare(&scratch);
        assert!(scratch.join("jevm").join(FIRST).is_dir());
        let first = cgroups.create("c1", None).unwrap();
        assert_eq!(first.path(), scratch.join("jevm").join(FIRST));
        let second = cgroups.create("c2", None).unwrap();
        assert_eq!(second.path(), scratch.join("jevm/c2"));
        first.remove().unwrap();
        second.remove().unwrap();

        // A bad id leaves it for the next create; a first create whose
        // limits fail removes it, and the next one makes its own.
        let cgroups = GuestCgroups::prepare(&scratch);
        assert!(cgroups.create("../x", None).is_err());
        assert!(scratch.join("jevm").join(FIRST).is_dir());
        let swap_without_limit: LinuxResources =
            serde_json::from_str(r#"{"memory":{"swap":1048576}}"#).unwrap();
        assert!(cgroups.create("c0", Some(&swap_without_limit)).is_err());
        assert!(!scratch.join("jevm").join(FIRST).exists());
        let next = cgroups.create("c3", None).unwrap();
        assert_eq!(next.path(), scratch.join("jevm/c3"));
        next.remove().unwrap();
        std::fs::remove_dir(scratch.join("jevm")).unwrap();
        std::fs::remove_dir(&scratch).unwrap();
    }

    #[test]
    fn bad_ids_and_missing_controllers_are_errors() {
        let Some(scratch) = scratch("bad") else {
            return;
        };
        assert!(Cgroup::create_in(&scratch, "../x", None).is_err());
        let available = std::fs::read_to_string(scratch.join("cgroup.controllers")).unwrap();
        if !available.contains("memory") {
            let r: LinuxResources =
                serde_json::from_str(r#"{"memory":{"limit":1048576}}"#).unwrap();
            let e = Cgroup::create_in(&scratch, "m", Some(&r))
                .err()
                .unwrap()
                .to_string();
            assert!(
                e.contains("memory.max") && e.contains("not available"),
                "{e}"
            );
            assert!(
                !scratch.join("jevm/m").exists(),
                "a failed create leaves nothing"
            );
        }
        let _ = std::fs::remove_dir(scratch.join("jevm"));
        std::fs::remove_dir(&scratch).unwrap();
    }
}
