//! What the agent hands the `container-init` stage, and what the stage
//! answers, over the sync socket (fd 3 of the stage process). Frames are
//! `jevm_protocol::{write_frame, read_frame}`.
//!
//! The agent is multithreaded, so after `fork` it may only `execve`: the
//! stage is the agent binary re-executed as `jevm-agent container-init`
//! (argv[1]), a fresh single-threaded process that can allocate and parse
//! freely while it builds the container (the way `runc init` works).
//!
//! Sequence on the sync socket:
//! 1. agent -> stage: [`InitPlan`]
//! 2. stage -> agent: [`StageMsg::Pid`] (the process that will `execve`,
//!    as a PID of the guest's root PID namespace), then [`StageMsg::Ready`]
//!    once everything up to `execve` is done, or [`StageMsg::Error`].
//! 3. agent -> stage: [`AgentMsg::Start`]; closing the socket instead
//!    aborts (the stage exits without running anything).
//! 4. the stage `execve`s; the socket is close-on-exec, so the agent reads
//!    EOF on success, or [`StageMsg::Error`] if `execve` failed.
//!
//! fds 0, 1, 2 of the stage are the process's stdio (pipes, `/dev/null`,
//! or a pseudo-terminal slave when `terminal`) and are kept across `execve`.

use serde::{Deserialize, Serialize};

/// File descriptor of the sync socket in the stage process.
pub const SYNC_FD: i32 = 3;

/// argv[1] that makes the agent binary run as the container-init stage.
pub const INIT_ARG: &str = "container-init";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitPlan {
    pub container_id: String,
    pub kind: PlanKind,
    /// The container's cgroup directory in the guest (absolute path, already
    /// created and limited by the agent); the stage joins it first.
    pub cgroup: String,
    /// fds 0-2 are a pseudo-terminal slave: become session leader and make
    /// it the controlling terminal.
    pub terminal: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PlanKind {
    /// A container's init process: everything the spec says. `root.path`
    /// is a guest path; namespaces with a `path` are joined (paths are
    /// guest paths such as `/proc/<pid>/ns/net`), the others created.
    Create { spec: Box<oci_spec::runtime::Spec> },
    /// An extra process in the running container whose init is `init_pid`
    /// (guest root-namespace PID): join its namespaces, then apply
    /// `process` (user, env, cwd, capabilities, rlimits, no_new_privileges)
    /// and the container's seccomp profile from `spec`.
    Exec {
        init_pid: u32,
        spec: Box<oci_spec::runtime::Spec>,
        process: Box<oci_spec::runtime::Process>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageMsg {
    Pid {
        pid: u32,
    },
    Ready,
    /// Names the object and the cause, in runc's words where runc has them
    /// (e.g. `exec: "nosuch": executable file not found in $PATH`).
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMsg {
    Start,
}
