//! The `container-init` stage: builds a container (or joins one, for exec)
//! from an [`InitPlan`](super::plan::InitPlan) and `execve`s its process.
//! See `super::plan` for the conversation with the agent.
//!
//! The stage is single-threaded and short-lived, so it may fork, change
//! namespaces and credentials freely; everything it mounts lives in a mount
//! namespace of its own, which dies with it when anything fails.

mod console;
mod devices;
mod errors;
mod mounts;
mod namespaces;
pub mod premade;
mod process;
mod seccomp;
mod sync;
mod syscalls;

use super::plan::{InitPlan, PlanKind, StageMsg};
use anyhow::{bail, Context, Result};
use errors::errno_text;
use jevm_protocol::CreateTimes;
use namespaces::Forked;
use oci_spec::runtime::{Process, Spec};
use std::path::Path;
use sync::Sync;

/// Entry point when the agent binary runs as `jevm-agent container-init`.
pub fn main() -> ! {
    let mut sync = match Sync::take() {
        Ok(sync) => sync,
        Err(e) => {
            eprintln!("container-init: {e:#}");
            std::process::exit(1)
        }
    };
    let result = sync.read_plan().and_then(|plan| run(&mut sync, plan));
    // `run` only returns on failure: success ends in execve.
    let message = match result {
        Ok(never) => match never {},
        Err(e) => format!("{e:#}"),
    };
    // The agent may be gone already; the exit code still tells.
    let _ = sync.send(&StageMsg::Error { message });
    std::process::exit(1)
}

enum Never {}

/// Microseconds between laps, for the stage's steps of [`CreateTimes`].
pub(super) struct Clock(std::time::Instant);

impl Clock {
    pub(super) fn start() -> Clock {
        Clock(std::time::Instant::now())
    }

    pub(super) fn lap(&mut self) -> u64 {
        let now = std::time::Instant::now();
        let us = super::micros(now.duration_since(self.0));
        self.0 = now;
        us
    }
}

fn run(sync: &mut Sync, plan: InitPlan) -> Result<Never> {
    process::close_inherited_fds()?;
    join_cgroup(Path::new(&plan.cgroup))?;
    match plan.kind {
        PlanKind::Create { spec } => create(sync, &spec, plan.terminal),
        PlanKind::Exec {
            init_pid,
            spec,
            process,
        } => exec(sync, init_pid, &spec, &process, plan.terminal),
    }
}

/// Moves the stage (and so everything it forks) into the container's cgroup
/// before anything else, so that no process of the container ever runs
/// outside its limits.
fn join_cgroup(cgroup: &Path) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    std::fs::write(&procs, "0")
        .map_err(|e| anyhow::anyhow!("join cgroup {:?}: {}", cgroup, errno_text(&e)))
}

fn create(sync: &mut Sync, spec: &Spec, terminal: bool) -> Result<Never> {
    let process = spec.process().as_ref().context("spec has no process")?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        bail!("args must not be empty");
    }
    let plan = namespaces::Plan::from_spec(spec)?;
    let userns = plan.user_namespace();
    let mut clock = Clock::start();
    if userns {
        process::set_limits(process)?;
    }
    plan.enter()?;
    let namespaces_us = clock.lap();
    // A new PID namespace takes effect for children only: the container's
    // PID 1 is a child of the stage, which reports it and leaves.
    let forked = if plan.needs_fork() {
        namespaces::fork_child(sync)?
    } else {
        Forked::NotForked
    };
    report_pid(sync, &forked)?;
    let pid_fork_us = clock.lap();

    let rootfs = mounts::prepare_rootfs(spec, userns)?;
    let before_paths = clock.lap();
    // With the container's mounts in place (its devpts) but before any is
    // made read-only: /dev/console may have to be created.
    if terminal {
        console::set_up(sync, true)?;
    }
    namespaces::set_hostname(spec, &plan)?;
    mounts::finish_rootfs(spec)?;
    let mounts_paths_us = clock.lap();
    let mounts_us = before_paths + mounts_paths_us;
    if !userns {
        process::set_limits(process)?;
    }
    let exec_path = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(jevm_protocol::EXEC_PATH_ANNOTATION))
        .map(String::as_str);
    let prepared = process::prepare(process, spec, terminal, exec_path)?;
    let times = CreateTimes {
        namespaces_us,
        pid_fork_us,
        mounts_us,
        mounts_spec_us: rootfs.spec_us,
        mounts_devices_us: rootfs.devices_us,
        mounts_pivot_us: rootfs.pivot_us,
        mounts_paths_us,
        process_us: clock.lap(),
        ..CreateTimes::default()
    };
    sync.send(&StageMsg::Ready { times })?;
    sync.wait_start()?;
    prepared.exec()
}

fn exec(
    sync: &mut Sync,
    init_pid: u32,
    spec: &Spec,
    process: &Process,
    terminal: bool,
) -> Result<Never> {
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        bail!("args must not be empty");
    }
    let container = namespaces::Container::open(init_pid)?;
    let userns = container.user_namespace();
    let mut clock = Clock::start();
    if userns {
        process::set_limits(process)?;
    }
    container.enter()?;
    let namespaces_us = clock.lap();
    let forked = namespaces::fork_child(sync)?;
    report_pid(sync, &forked)?;
    let pid_fork_us = clock.lap();
    if terminal {
        console::set_up(sync, false)?;
    }
    if !userns {
        process::set_limits(process)?;
    }
    let prepared = process::prepare(process, spec, terminal, None)?;
    let times = CreateTimes {
        namespaces_us,
        pid_fork_us,
        process_us: clock.lap(),
        ..CreateTimes::default()
    };
    sync.send(&StageMsg::Ready { times })?;
    sync.wait_start()?;
    prepared.exec()
}

/// Tells the agent which process will `execve`. After a fork the parent has
/// already reported the child's PID (only it knows the child's PID in the
/// guest's root PID namespace).
fn report_pid(sync: &mut Sync, forked: &Forked) -> Result<()> {
    match forked {
        Forked::Child => Ok(()),
        Forked::NotForked => sync.send(&StageMsg::Pid {
            pid: std::process::id(),
        }),
    }
}
