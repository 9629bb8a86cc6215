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
//!    as a PID of the guest's root PID namespace), with `terminal`
//!    [`StageMsg::Console`] followed by the terminal's master (see
//!    [`send_console`]), then [`StageMsg::Ready`] once everything up to
//!    `execve` is done, or [`StageMsg::Error`].
//! 3. agent -> stage: [`AgentMsg::Start`]; closing the socket instead
//!    aborts (the stage exits without running anything).
//! 4. the stage `execve`s; the socket is close-on-exec, so the agent reads
//!    EOF on success, or [`StageMsg::Error`] if `execve` failed.
//!
//! fds 0, 1, 2 of the stage are the process's stdio (pipes or `/dev/null`)
//! and are kept across `execve`. With `terminal` they are `/dev/null` and
//! the stage replaces them with a pseudo-terminal slave it allocates from
//! the container's own devpts, as runc does, so that the process finds
//! itself on the container's `/dev/pts/N`.

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

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
    /// Allocate a pseudo-terminal in the container, make its slave fds 0-2
    /// and the controlling terminal (and, for `Create`, `/dev/console`),
    /// and hand its master to the agent.
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
    /// The process's pseudo-terminal (only with `terminal`, before
    /// `Ready`): its master follows on the socket, see [`send_console`].
    Console,
    /// `times`: the stage's own steps of `CreateTimes` (namespaces, PID 1
    /// fork, mounts, process set-up); the agent fills in the rest.
    Ready {
        #[serde(default)]
        times: jevm_protocol::CreateTimes,
    },
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

/// The byte that carries the terminal master as SCM_RIGHTS.
const CONSOLE_BYTE: u8 = b'c';

/// Sends `master` after a [`StageMsg::Console`] frame: one byte carrying it
/// as SCM_RIGHTS, apart from any frame, since frames are read with plain
/// `read`s, which drop ancillary data.
pub fn send_console(socket: BorrowedFd<'_>, master: BorrowedFd<'_>) -> io::Result<()> {
    let fds = [master.as_raw_fd()];
    let byte = [CONSOLE_BYTE];
    loop {
        match sendmsg::<()>(
            socket.as_raw_fd(),
            &[IoSlice::new(&byte)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        ) {
            Ok(1) => return Ok(()),
            Ok(_) => return Err(io::Error::new(io::ErrorKind::WriteZero, "nothing sent")),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives what [`send_console`] sent: exactly one fd, close-on-exec.
pub fn recv_console(socket: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    // Room for as many fds as one message can carry (the kernel's
    // SCM_MAX_FD), so none is installed here and then lost to truncation.
    let mut space = nix::cmsg_space!([RawFd; 253]);
    let (n, mut fds) = loop {
        let mut iov = [IoSliceMut::new(&mut byte)];
        match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds: Vec<OwnedFd> = Vec::new();
                for cmsg in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(raw) = cmsg {
                        // SAFETY: the kernel just installed these fds in
                        // this process for this message; nothing else owns
                        // them.
                        fds.extend(
                            raw.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                break (msg.bytes, fds);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the socket closed before the terminal arrived",
        ));
    }
    if byte[0] != CONSOLE_BYTE || fds.len() != 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "expected the terminal as one fd on byte {CONSOLE_BYTE:#x}, got {} fds on byte {:#x}",
                fds.len(),
                byte[0]
            ),
        ));
    }
    fds.pop()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no fd"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn the_terminal_crosses_the_socket_as_one_fd() {
        let (stage, agent) = UnixStream::pair().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        send_console(stage.as_fd(), w.as_fd()).unwrap();
        drop(w);
        let got = recv_console(agent.as_fd()).unwrap();
        std::fs::File::from(got).write_all(b"x").unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(nix::unistd::read(r.as_raw_fd(), &mut buf).unwrap(), 1);
        assert_eq!(&buf, b"x");
    }

    #[test]
    fn a_byte_without_an_fd_or_an_eof_is_refused() {
        let (mut stage, agent) = UnixStream::pair().unwrap();
        stage.write_all(&[CONSOLE_BYTE]).unwrap();
        let e = recv_console(agent.as_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        drop(stage);
        let e = recv_console(agent.as_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }
}
