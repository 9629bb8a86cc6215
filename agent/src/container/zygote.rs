//! The container-init zygote: a `container-init` stage started once, when
//! the agent starts (in a template, before the snapshot), that waits for
//! work instead of reading a plan. Starting a stage then costs two `fork`s
//! of a small single-threaded process instead of a `fork` of the whole
//! multithreaded agent plus an `execve` of its binary, and every clone of
//! the template inherits the zygote paged in and shared.
//!
//! The agent sends the zygote, on a SOCK_SEQPACKET control socket (fd 3
//! of the zygote), one byte and four fds: the new stage's stdio and its
//! sync socket. The zygote forks an intermediate process, which forks the
//! stage and exits, so that the stage is reparented to the agent (PID 1 in
//! the guest, a subreaper elsewhere) exactly as a stage the agent forked
//! itself would be its child: the agent's reaper sees its exit. The stage
//! moves the fds to 0-3, closes the rest, and runs the `container-init`
//! code from the top, as a freshly executed stage would. The zygote then
//! answers with the stage's PID (or a negative errno) as 4 bytes.
//!
//! The forks are done ahead when they can be: the zygote keeps one stage
//! forked and waiting for its fds (a [`Spare`], made when the zygote starts
//! and again after an answer when the request asks for it, see [`Next`]),
//! and a request hands the spare its fds instead of forking. A template's
//! zygote holds one at the snapshot, so the first container of every clone
//! starts without a fork, and in a network and an IPC namespace made ahead
//! (`init::premade`). The agent
//! waits for the zygote's first answer (0, started) before it goes on, so
//! a template is never saved with the zygote half started.
//!
//! The zygote never changes its signal dispositions or mask, and holds no
//! fd but its control socket and stdio, so the stage starts from what an
//! `execve`d stage starts from. A zygote that fails or goes away is left
//! behind: the agent starts stages with `fork`+`execve` again.

use super::init::premade::Premade;
use super::stage::StageCommand;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// argv[1] that makes the agent binary run as the zygote.
pub const ZYGOTE_ARG: &str = "container-init-zygote";

/// The control socket's fd in the zygote.
const CTL_FD: RawFd = 3;

/// How long the agent waits for the zygote's answer before it gives up on
/// it (two forks; generous for an emulated guest).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's end of a running zygote.
pub struct Zygote {
    /// None once the zygote failed: it is not asked again.
    ctl: Mutex<Option<OwnedFd>>,
    pid: i32,
    /// Stages it started (for tests to tell the two ways apart).
    served: AtomicUsize,
}

impl Zygote {
    /// Starts the zygote: the stage command with [`ZYGOTE_ARG`], stdin
    /// /dev/null, stdout and stderr the agent's stderr (its messages reach
    /// the guest's log), the control socket at fd 3.
    pub fn start(command: &StageCommand) -> io::Result<Zygote> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let null = std::fs::File::open("/dev/null")?;
        let fds = [
            null.as_raw_fd(),
            libc::STDERR_FILENO,
            libc::STDERR_FILENO,
            theirs.as_raw_fd(),
        ];
        let pid = command.with_arg(ZYGOTE_ARG).fork_exec(&fds)?;
        let timeout = nix::sys::time::TimeVal::new(ANSWER_TIMEOUT.as_secs() as i64, 0);
        nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)?;
        // Waited for, so that a template is saved with the zygote's spare
        // (and the namespaces made ahead) in place, never half made.
        read_answer(ours.as_raw_fd())
            .map_err(|e| io::Error::new(e.kind(), format!("the zygote did not start: {e}")))?;
        Ok(Zygote {
            ctl: Mutex::new(Some(ours)),
            pid,
            served: AtomicUsize::new(0),
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// How many stages it started.
    #[cfg(test)]
    pub fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }

    /// Has the zygote start a stage with `fds` (stdio 0-2 and the sync
    /// socket) as its fds 0-3; returns the stage's PID. With `then`
    /// [`Next::Spare`] the zygote forks a spare for the next request once it
    /// answered. An error means the zygote is no longer used.
    pub fn spawn(&self, fds: &[RawFd; 4], then: Next) -> io::Result<i32> {
        let mut ctl = self.ctl.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sock) = ctl.as_ref() else {
            return Err(io::Error::other("the zygote failed before"));
        };
        let result = ask(sock.as_raw_fd(), fds, then);
        match result {
            Ok(_) => {
                self.served.fetch_add(1, Ordering::Relaxed);
            }
            // Whatever it was, the conversation is out of step now.
            Err(_) => *ctl = None,
        }
        result
    }
}

/// What the zygote does once it answered a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Forks a spare (unless it has one), so the next request is answered
    /// without a fork: for pods where more containers or execs are expected.
    Spare,
    /// Nothing: a spare would be a process's worth of the pod's own guest
    /// memory, kept for a request that may never come.
    Wait,
}

impl Next {
    fn byte(self) -> u8 {
        match self {
            Next::Spare => b's',
            Next::Wait => b'w',
        }
    }
}

/// One byte with `fds` as SCM_RIGHTS: a request to the zygote (the byte
/// says [`Next`]), or the zygote's handover to a spare.
fn send_fds(sock: RawFd, fds: &[RawFd; 4], byte: u8) -> nix::Result<()> {
    let rights = [ControlMessage::ScmRights(fds)];
    sendmsg::<()>(
        sock,
        &[IoSlice::new(&[byte])],
        &rights,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map(drop)
}

fn raw(fds: &[OwnedFd; 4]) -> [RawFd; 4] {
    fds.each_ref().map(AsRawFd::as_raw_fd)
}

fn ask(sock: RawFd, fds: &[RawFd; 4], then: Next) -> io::Result<i32> {
    send_fds(sock, fds, then.byte())?;
    match read_answer(sock)? {
        pid if pid > 0 => Ok(pid),
        errno => Err(io::Error::from_raw_os_error(-errno)),
    }
}

/// The zygote's 4-byte answer: a PID, a negative errno, or 0 (started).
fn read_answer(sock: RawFd) -> io::Result<i32> {
    let mut answer = [0u8; 4];
    let n = loop {
        match nix::sys::socket::recv(sock, &mut answer, MsgFlags::empty()) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other?,
        }
    };
    if n != answer.len() {
        return Err(io::Error::other(format!(
            "the zygote answered {n} bytes (it is gone)"
        )));
    }
    Ok(i32::from_le_bytes(answer))
}

/// The zygote process: answers requests until the agent closes the
/// control socket, running `stage_main` in each stage it starts.
pub fn serve(stage_main: fn() -> !) -> ! {
    // Held for the zygote's life (see `premade`); only the first spare sits
    // in them.
    let premade = make_premade();
    let mut spare = Spare::fork(stage_main, premade.as_ref());
    if !answer(0) {
        std::process::exit(1);
    }
    loop {
        let (n, byte, fds) = match receive(CTL_FD) {
            Ok(msg) => msg,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => std::process::exit(1),
        };
        if n == 0 {
            // The agent is gone, or gave up on this zygote.
            std::process::exit(0);
        }
        let reply = match <&[OwnedFd; 4]>::try_from(fds.as_slice()) {
            Ok(fds) => match spare.take().and_then(|s| s.hand(fds)) {
                Some(pid) => pid,
                None => start_stage(fds, stage_main),
            },
            Err(_) => -libc::EINVAL,
        };
        drop(fds);
        if !answer(reply) {
            std::process::exit(1);
        }
        if spare.is_none() && byte == Next::Spare.byte() {
            spare = Spare::fork(stage_main, None);
        }
    }
}

/// Sends the agent a 4-byte answer on the control socket; false if it is
/// gone.
fn answer(value: i32) -> bool {
    // SAFETY: a 4-byte buffer on the stack; the fd is the control socket.
    let sent = unsafe {
        libc::send(
            CTL_FD,
            value.to_le_bytes().as_ptr().cast(),
            4,
            libc::MSG_NOSIGNAL,
        )
    };
    sent == 4
}

/// The namespaces made ahead, where the agent is PID 1 (the guest). A
/// failure leaves them out, unless the zygote could not go back to its own
/// namespaces: then it exits, and the agent starts stages with exec.
fn make_premade() -> Option<Premade> {
    if std::os::unix::process::parent_id() != 1 {
        return None;
    }
    match Premade::make() {
        Ok(premade) => Some(premade),
        Err((e, fatal)) => {
            eprintln!("container-init zygote: namespaces made ahead: {e}");
            if fatal {
                std::process::exit(1);
            }
            None
        }
    }
}

/// One message with up to four fds on `sock`: its length, its byte and
/// the fds.
fn receive(sock: RawFd) -> nix::Result<(usize, u8, Vec<OwnedFd>)> {
    let mut byte = [0u8; 1];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut byte)];
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(rs) = c {
                // SAFETY: the kernel just installed these fds in this
                // process; nothing else owns them.
                fds.extend(rs.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
    }
    Ok((msg.bytes, byte[0], fds))
}

/// A stage forked ahead of the request that will use it, waiting on a
/// socket for its four fds: that request is answered without a fork. The
/// zygote forks one when it starts (so a template holds one, and the first
/// container of every clone takes it) and another after each request that
/// asked for one ([`Next::Spare`]).
struct Spare {
    pid: i32,
    /// The zygote's end; the spare exits when it closes.
    sock: OwnedFd,
}

impl Spare {
    fn fork(stage_main: fn() -> !, premade: Option<&Premade>) -> Option<Spare> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .ok()?;
        let (ours_fd, theirs_fd) = (ours.as_raw_fd(), theirs.as_raw_fd());
        let zygote = std::process::id();
        let pid = fork_stage(move || {
            // The agent must see EOF on the control socket once the zygote
            // is gone, and the spare must see it on its own when the
            // zygote goes: it holds neither the control socket nor the
            // zygote's end of its own.
            // SAFETY: closing fds this forked child does not use again.
            unsafe {
                libc::close(CTL_FD);
                libc::close(ours_fd);
            }
            if let Some(premade) = premade {
                premade.enter();
            }
            name_spare(zygote);
            // SAFETY: one byte from a static buffer on our own socket.
            unsafe { libc::send(theirs_fd, b"e".as_ptr().cast(), 1, libc::MSG_NOSIGNAL) };
            let fds = loop {
                match receive(theirs_fd) {
                    Ok((n, _, fds)) if n > 0 => match <[OwnedFd; 4]>::try_from(fds) {
                        Ok(fds) => break fds,
                        // SAFETY: ends the spare: the zygote spoke out of turn.
                        Err(_) => unsafe { libc::_exit(0) },
                    },
                    Err(nix::errno::Errno::EINTR) => continue,
                    // SAFETY: ends the spare: the zygote is gone or spoke
                    // out of turn.
                    _ => unsafe { libc::_exit(0) },
                }
            };
            // SAFETY: in a forked child of a single-threaded process.
            unsafe { super::stage::place_stage_fds(&raw(&fds)) };
            stage_main()
        });
        // The spare's end: a spare that dies is then seen as EOF.
        drop(theirs);
        if pid > 0 {
            // The spare is set up (in the namespaces made ahead) before the
            // zygote answers again (and so before a template is saved).
            let mut byte = [0u8; 1];
            let _ = nix::sys::socket::recv(ours_fd, &mut byte, MsgFlags::empty());
        }
        (pid > 0).then_some(Spare { pid, sock: ours })
    }

    /// Gives the spare its fds; its PID, or None if it is gone (it was
    /// killed while it waited).
    fn hand(self, fds: &[OwnedFd; 4]) -> Option<i32> {
        send_fds(self.sock.as_raw_fd(), &raw(fds), b'h')
            .ok()
            .map(|()| self.pid)
    }
}

/// Names a spare `spare-<zygote's PID>` (its stage keeps the name until it
/// `execve`s): in the guest's process list, and for tests to tell a stage
/// that was a spare from one forked on request.
fn name_spare(zygote: u32) {
    let mut name = [0u8; 16];
    let text = format!("spare-{zygote}");
    let len = text.len().min(15);
    name[..len].copy_from_slice(&text.as_bytes()[..len]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
    // bytes from `name`, which lives for the call.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

/// Forks the intermediate, which forks the stage (running `stage`, which
/// does not return) and reports its PID on a pipe; returns that PID, or a
/// negative errno. The intermediate exits at once, so the stage is the
/// agent's child.
fn fork_stage(stage: impl FnOnce()) -> i32 {
    let (r, w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return -(e as i32),
    };
    // SAFETY: the zygote is single-threaded, so the child may do anything.
    match unsafe { libc::fork() } {
        0 => {
            // SAFETY: as above, in the intermediate.
            let answer = match unsafe { libc::fork() } {
                0 => {
                    drop((r, w));
                    stage();
                    // SAFETY: `stage` ends in exec or exit; should it
                    // return, the child ends here.
                    unsafe { libc::_exit(127) }
                }
                pid if pid > 0 => pid,
                _ => -io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO),
            };
            // SAFETY: a 4-byte buffer; `w` is the pipe's write end.
            unsafe { libc::write(w.as_raw_fd(), answer.to_le_bytes().as_ptr().cast(), 4) };
            // SAFETY: ends the intermediate without running anything else.
            unsafe { libc::_exit(0) }
        }
        pid if pid > 0 => {
            drop(w);
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            let mut answer = [0u8; 4];
            match nix::unistd::read(r.as_raw_fd(), &mut answer) {
                Ok(4) => i32::from_le_bytes(answer),
                _ => -libc::EIO,
            }
        }
        _ => -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    }
}

/// Starts a stage with `fds` now (no spare was waiting).
fn start_stage(fds: &[OwnedFd; 4], stage_main: fn() -> !) -> i32 {
    let raw = raw(fds);
    fork_stage(move || {
        // SAFETY: in a forked child of a single-threaded process.
        unsafe { super::stage::place_stage_fds(&raw) };
        stage_main()
    })
}
