//! The messages the jevm host side and the in-guest agent exchange over vsock.
//!
//! Both crates use these types, so the two ends cannot drift apart. The wire
//! format is a 4-byte big-endian length followed by that many bytes of JSON.
//! Why not ttrpc/protobuf like containerd: the agent is PID 1 of a tiny
//! initramfs and every byte of it is in every template; serde_json keeps it
//! small, needs no code generation, and the protocol is private to jevm (the
//! shim, not the agent, speaks ttrpc to containerd). `PROTOCOL_VERSION` is
//! checked on the first exchange so a host never drives an agent it does not
//! understand.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// Bumped on every incompatible change to [`Request`] or [`Response`].
pub const PROTOCOL_VERSION: u32 = 5;

/// vsock port the agent listens on for host requests.
pub const AGENT_PORT: u32 = 1024;

/// vsock port on the host (CID 2) the agent dials once, when it is ready to
/// serve requests. With the hybrid-vsock convention this is the Unix socket
/// `<vsock socket>_1023` on the host.
pub const READY_PORT: u32 = 1023;

/// Largest frame either side accepts; a bigger length prefix is an error,
/// not an allocation.
pub const MAX_FRAME: u32 = 16 << 20;

/// virtio-fs tag of the pod's shared directory. Every template carries the
/// device (probed, not mounted); a clone's device serves its pod's directory.
pub const SHARE_TAG: &str = "jevm-share";

/// Where the agent mounts the share in the guest, once per clone, when the
/// identity names it. Container rootfs and bind-mount sources are paths
/// under it (`<SHARE_MOUNT>/<container id>/rootfs`, ...).
pub const SHARE_MOUNT: &str = "/run/jevm/shared";

/// Spec annotation the shim sets on a container it creates: the path its
/// command has in the container, found through `PATH` on the host's view
/// of the rootfs where that view is certain to be the container's
/// (`shim/src/resolve.rs`). The guest checks it once and uses it instead of
/// trying each `PATH` directory over the share. Never the user's: the shim
/// removes a value the spec came with.
pub const EXEC_PATH_ANNOTATION: &str = "io.jevm.exec-path";

/// The home directory of `uid` in `passwd` (the text of `/etc/passwd`) as
/// runc finds it: the sixth field of the first line whose third is `uid`,
/// `/` when there is none or it is empty. The agent reads the container's
/// file; the shim reads the same file on the host when it can.
pub fn home_in_passwd(passwd: &str, uid: u64) -> String {
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() >= 6 && fields[2].parse::<u64>().ok() == Some(uid))
                .then(|| fields[5].to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/".to_string())
}

/// Sent by the agent on the READY connection, then the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub agent_version: String,
    pub protocol_version: u32,
    /// Guest `/proc/uptime` at the moment the agent was ready, in milliseconds.
    pub guest_uptime_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Agent and protocol version.
    Version,
    /// Liveness check; the agent echoes the nonce.
    Ping { nonce: u64 },
    /// Flush file systems, answer `ShuttingDown`, and power the guest off
    /// (the VM exits). The answer comes only after the flush, so the host
    /// may stop the VM as soon as it has it: nothing is left to lose.
    Shutdown,
    /// Diagnostics used by the test suite and `jevm` itself.
    Diag(Diag),
    /// Sent first to every clone, before anything else runs in it: what a
    /// forked VM must not share with its siblings and its template.
    Identity(Identity),
    /// Sent to a template's agent before the snapshot: mount the virtio-fs
    /// share [`SHARE_TAG`] (the template's device serves an empty
    /// directory) at [`SHARE_MOUNT`] and wait until its FUSE session is
    /// open, so that every clone finds it mounted and its device serves
    /// the pod's directory behind that session. Answer: `Done`.
    MountShare,

    // ---- containers (see `agent/src/container`) ------------------------
    /// Creates a container whose init process is set up (namespaces,
    /// mounts, user, capabilities, ...) and stopped just before `execve`,
    /// like `runc create`. Errors a user must see (missing binary, bad uid,
    /// unknown mount type) are reported here. Answer: `Created`.
    CreateContainer(CreateContainer),
    /// Lets the container's init process `execve`. Answer: `Started`.
    StartContainer { container_id: String },
    /// Creates an additional process in a running container's namespaces
    /// and cgroup (`ctr task exec`), stopped before `execve`. Answer: `Created`.
    Exec(ExecProcess),
    /// Lets an exec'd process `execve`. Answer: `Started`.
    StartExec {
        container_id: String,
        exec_id: String,
    },
    /// Sends `signal` to the init process (`exec_id` None) or an exec'd
    /// process; with `all`, to every process of the container. Answer: `Done`.
    Signal {
        container_id: String,
        exec_id: Option<String>,
        signal: i32,
        all: bool,
    },
    /// Closes the process's stdin (EOF for the reader). Answer: `Done`.
    CloseStdin {
        container_id: String,
        exec_id: Option<String>,
    },
    /// Sets the terminal size of a process created with a TTY. Answer: `Done`.
    ResizePty {
        container_id: String,
        exec_id: Option<String>,
        width: u32,
        height: u32,
    },
    /// Freezes the container's cgroup. Answer: `Done`.
    Pause { container_id: String },
    /// Thaws the container's cgroup. Answer: `Done`.
    Resume { container_id: String },
    /// Guest PIDs of the container's processes. Answer: `Pids`.
    Pids { container_id: String },
    /// The container's cgroup v2 counters. Answer: `Stats`.
    Stats { container_id: String },
    /// Applies new cgroup limits: `resources` is an OCI `LinuxResources`
    /// object (JSON). Answer: `Done`.
    Update {
        container_id: String,
        resources: serde_json::Value,
    },
    /// Forgets an exited exec'd process. Answer: `Done`.
    DeleteExec {
        container_id: String,
        exec_id: String,
    },
    /// Removes a container whose init has exited (kills what is left,
    /// removes its cgroup and mounts). Answer: `Done`.
    DeleteContainer { container_id: String },
    /// Turns this connection into the event stream: after the `Done` answer
    /// the agent writes only [`Event`] frames on it. One at a time; a new
    /// subscriber replaces the old one. Events that happen while no one is
    /// subscribed are queued, not lost.
    Events,
    /// Turns this connection into one raw byte stream of a created
    /// process's stdio: after the `Done` answer, bytes flow (host -> guest
    /// for stdin, guest -> host for stdout/stderr) until EOF. Must be sent
    /// before the process is started, for each stream named in its `Stdio`.
    /// With a TTY there is one output stream, `Stdout`.
    AttachStdio {
        container_id: String,
        exec_id: Option<String>,
        stream: StdioStream,
    },
}

/// Which stdio stream an [`Request::AttachStdio`] connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StdioStream {
    Stdin,
    Stdout,
    Stderr,
}

/// Which stdio streams a process has (containerd gives the shim a FIFO for
/// each one the user asked for); a stream not wanted is `/dev/null`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stdio {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    /// Allocate a pseudo-terminal: stdin/stdout/stderr of the process are
    /// its slave; the host sees one output stream (`Stdout`).
    pub terminal: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateContainer {
    pub container_id: String,
    /// The bundle's OCI runtime spec (`config.json`) as the host rewrote it:
    /// `root.path` and bind-mount sources are guest paths under
    /// [`SHARE_MOUNT`]; everything else is as containerd wrote it.
    pub spec: serde_json::Value,
    pub stdio: Stdio,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecProcess {
    pub container_id: String,
    pub exec_id: String,
    /// An OCI `Process` object (JSON), as `ctr task exec` sends it.
    pub process: serde_json::Value,
    pub stdio: Stdio,
}

/// What the agent reports on the event stream (see [`Request::Events`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A container's init (`exec_id` None) or exec'd process was reaped.
    /// Sent after its stdout/stderr streams reached EOF on the guest side
    /// or were given up on, so the host can close its FIFOs after it.
    Exited {
        container_id: String,
        exec_id: Option<String>,
        pid: u32,
        /// As runc reports it: the exit code, or 128 + signal number.
        exit_status: u32,
        /// Guest wall-clock time of the reaping, nanoseconds since the epoch.
        exited_at_ns: u64,
    },
    /// The container's cgroup had a process killed by the OOM killer.
    Oom { container_id: String },
}

/// A container's cgroup v2 counters, read from the guest's cgroup files.
/// Maps hold the `key value` lines of the file named in the comment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStats {
    /// `cpu.stat`
    pub cpu: std::collections::BTreeMap<String, u64>,
    /// `memory.current`
    pub memory_current: u64,
    /// `memory.max`; None when "max".
    pub memory_max: Option<u64>,
    /// `memory.stat`
    pub memory: std::collections::BTreeMap<String, u64>,
    /// `memory.events`
    pub memory_events: std::collections::BTreeMap<String, u64>,
    /// `pids.current`
    pub pids_current: u64,
    /// `pids.max`; None when "max".
    pub pids_max: Option<u64>,
}

/// A clone's own identity. Every clone starts from the same memory image, so
/// its RNG state, clock and name are the template's until this arrives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Fresh host entropy (at least 32 bytes) mixed into the guest RNG, which
    /// is then reseeded so no two clones produce the same random bytes.
    pub entropy: Vec<u8>,
    /// Host wall-clock time, nanoseconds since the Unix epoch.
    pub realtime_ns: u64,
    pub hostname: String,
    /// Have the virtio-fs share [`SHARE_TAG`] mounted at [`SHARE_MOUNT`]:
    /// a pod's clone does, a plain `jevm clone` need not. A clone whose
    /// template mounted it (`Request::MountShare`) keeps that mount, or
    /// loses it if this is false.
    #[serde(default)]
    pub mount_share: bool,
    /// The pod's network as the CNI plugins set it up in the pod's network
    /// namespace on the host; the agent gives the guest's virtio-net
    /// interface these settings and brings it up. None: the interface stays
    /// down (a template, a VM without a network namespace).
    #[serde(default)]
    pub network: Option<Network>,
}

/// A pod's network, copied from the pod's network namespace on the host.
/// The guest has one virtio-net interface; it takes the CNI interface's
/// name, MAC, MTU and addresses, so that packets the tc redirect hands
/// over in both directions need no rewriting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub interface: NetInterface,
    /// Routes of the main table through the interface, in the order the
    /// host listed them, without the prefix routes the kernel adds by
    /// itself for each address.
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInterface {
    /// The CNI interface's name (CRI asks for `eth0`).
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// IPv4 and IPv6 addresses, link-local IPv6 excluded (the guest kernel
    /// makes its own from the MAC).
    pub addresses: Vec<IpNet>,
}

/// An address with its prefix length (`10.88.0.5/16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpNet {
    pub addr: std::net::IpAddr,
    pub prefix_len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// `0.0.0.0/0` or `::/0` for a default route.
    pub destination: IpNet,
    /// None: the destination is on the link.
    pub gateway: Option<std::net::IpAddr>,
    /// Preferred source address, if the host route names one.
    pub source: Option<std::net::IpAddr>,
    /// Route priority (metric); 0 when the host route has none.
    pub metric: u32,
}

/// Small, explicit guest operations. They exist so the host can check what a
/// guest sees (a block device's bytes, a vsock path) without a shell in the
/// initramfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Diag {
    /// Read `len` bytes at `offset` of a guest file or device.
    ReadFile { path: String, offset: u64, len: u32 },
    /// Write bytes at `offset` of a guest file or device, then fsync it.
    WriteFile {
        path: String,
        offset: u64,
        data: Vec<u8>,
    },
    /// Write `data` at the start of an existing guest file through a shared
    /// writable mapping, without `msync`, and keep the mapping (tests of
    /// where such writes go: in the share, DAX puts them in the host file
    /// at once; elsewhere they are dirty guest pages until writeback).
    WriteMapped { path: String, data: Vec<u8> },
    /// Connect to the host (CID 2) on `port`, send `data`, and return what
    /// the host answers before it closes the connection (at most 64 KiB).
    DialHost { port: u32, data: Vec<u8> },
    /// Number of online CPUs the guest kernel sees.
    OnlineCpus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Version {
        agent_version: String,
        protocol_version: u32,
    },
    Pong {
        nonce: u64,
    },
    ShuttingDown,
    Bytes(Vec<u8>),
    Written {
        len: u64,
    },
    Count(u64),
    /// The identity was applied.
    IdentityApplied,
    /// A container or exec'd process was created; `pid` is its guest PID.
    /// `times`: where a container's create went in the guest.
    Created {
        pid: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        times: Option<CreateTimes>,
    },
    /// The process was let go; `pid` is its guest PID.
    Started {
        pid: u32,
    },
    /// The request was carried out; nothing to report.
    Done,
    Pids(Vec<u32>),
    Stats(ContainerStats),
    /// The request failed in the guest; `message` names the object and
    /// cause, `kind` says what kind of failure it is, so the host can map
    /// it (to a ttrpc status code) without reading the text.
    Error {
        message: String,
        #[serde(default)]
        kind: ErrorKind,
    },
}

/// Where the guest spent a container's create, in microseconds, step by
/// step (the shim logs them with its own timings).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateTimes {
    /// The container's cgroup made and its limits set.
    pub cgroup_us: u64,
    /// The container-init stage started (from the zygote, or fork+exec).
    pub stage_us: u64,
    /// In the stage: namespaces made or joined (loopback up in a new
    /// network namespace).
    pub namespaces_us: u64,
    /// In the stage: the fork of the container's PID 1 in a new PID
    /// namespace, until its PID reached the agent.
    pub pid_fork_us: u64,
    /// In the stage: the rootfs, the spec's mounts, device nodes,
    /// `pivot_root`, read-only paths, the hostname. The four
    /// `mounts_*_us` below are its parts.
    pub mounts_us: u64,
    /// Of `mounts_us`: the rootfs bound onto itself and the spec's mounts.
    #[serde(default)]
    pub mounts_spec_us: u64,
    /// Of `mounts_us`: `/dev`'s nodes and links, the working directory.
    #[serde(default)]
    pub mounts_devices_us: u64,
    /// Of `mounts_us`: `pivot_root` (or the move and `chroot`).
    #[serde(default)]
    pub mounts_pivot_us: u64,
    /// Of `mounts_us`: the terminal, the hostname, sysctls, read-only and
    /// masked paths, a read-only root.
    #[serde(default)]
    pub mounts_paths_us: u64,
    /// In the stage: limits, user, capabilities, HOME, the `PATH` search,
    /// the working directory, seccomp: ready to `execve`.
    pub process_us: u64,
    /// The whole create in the agent, request to answer.
    pub total_us: u64,
}

/// What kind of failure a [`Response::Error`] reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Anything else: the operation was tried and failed.
    #[default]
    Failed,
    /// The container, exec'd process or process named does not exist (or
    /// no longer does: a signal to a process that has exited).
    NotFound,
    /// A container or exec'd process with that id exists already.
    AlreadyExists,
    /// The request itself is malformed (a bad id, an invalid OCI spec).
    InvalidArgument,
    /// The object is not in a state that allows the request (still being
    /// created, being deleted, not started).
    FailedPrecondition,
}

impl Response {
    /// A [`Response::Error`] of kind [`ErrorKind::Failed`].
    pub fn failed(message: impl Into<String>) -> Response {
        Response::Error {
            message: message.into(),
            kind: ErrorKind::Failed,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("I/O error on the agent channel: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(u32),
    #[error("malformed message: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Writes one length-prefixed JSON frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge(u32::MAX))?;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Reads one length-prefixed JSON frame.
pub fn read_frame<R: Read, T: for<'de> Deserialize<'de>>(r: &mut R) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod fuzz;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips_a_request() {
        let mut buf = Vec::new();
        let req = Request::Diag(Diag::WriteFile {
            path: "/dev/vda".into(),
            offset: 512,
            data: vec![1, 2, 3],
        });
        write_frame(&mut buf, &req).unwrap();
        let back: Request = read_frame(&mut buf.as_slice()).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_allocating() {
        let mut buf = (MAX_FRAME + 1).to_be_bytes().to_vec();
        buf.extend_from_slice(b"{}");
        let err = read_frame::<_, Request>(&mut buf.as_slice()).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(n) if n == MAX_FRAME + 1));
    }

    #[test]
    fn truncated_frame_is_an_io_error() {
        let mut buf = 10u32.to_be_bytes().to_vec();
        buf.extend_from_slice(b"{\"Ping");
        assert!(matches!(
            read_frame::<_, Request>(&mut buf.as_slice()),
            Err(FrameError::Io(_))
        ));
    }
}
