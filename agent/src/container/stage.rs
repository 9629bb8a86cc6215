//! Starting the `container-init` stage and talking to it over the sync
//! socket (see `super::plan`).
//!
//! The agent is multithreaded: between `fork` and `execve` the child may
//! only make async-signal-safe calls, so everything it needs (paths, argv,
//! env, fd numbers) is prepared before the fork, and it only moves fds,
//! resets signals and `execve`s.

use super::exits::{self, Since};
use super::plan::{self, AgentMsg, InitPlan, StageMsg, INIT_ARG, SYNC_FD};
use super::stdio::Terminal;
use super::zygote::{Next, Zygote};
use jevm_protocol::{read_frame, write_frame, FrameError};
use std::ffi::{CString, OsString};
use std::io::{self, ErrorKind};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// How long the stage may take to build a container, or to `execve` after
/// `Start`. Generous: under TCG emulation everything is ~50x slower.
const STAGE_TIMEOUT: Duration = Duration::from_secs(120);

/// Lowest fd the child parks its fds at before moving them to 0-3, above
/// any of 0-3 so no move overwrites a source not yet moved.
const PARK_FD: RawFd = 10;

/// What to `execve` as the stage, prepared once.
pub struct StageCommand {
    exe: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
}

impl StageCommand {
    /// The agent binary itself, as `jevm-agent container-init`.
    pub fn agent() -> Self {
        let env = std::env::vars_os()
            .filter_map(|(k, v)| {
                let mut kv: OsString = k;
                kv.push("=");
                kv.push(v);
                CString::new(kv.into_vec()).ok()
            })
            .collect();
        Self {
            exe: c"/proc/self/exe".to_owned(),
            argv: vec![c"jevm-agent".to_owned(), cstring(INIT_ARG)],
            env,
        }
    }
}

impl StageCommand {
    /// The same program with another argv[1].
    pub fn with_arg(&self, arg: &str) -> StageCommand {
        let mut argv = self.argv.clone();
        argv.truncate(1);
        argv.push(cstring(arg));
        StageCommand {
            exe: self.exe.clone(),
            argv,
            env: self.env.clone(),
        }
    }

    /// Forks and `execve`s the command with `fds` as its fds 0-3; returns
    /// its PID. Hold the exit table's lock across the call to register
    /// the child before the reaper can see it exit.
    pub fn fork_exec(&self, fds: &[RawFd; 4]) -> io::Result<i32> {
        let argv: Vec<*const libc::c_char> = self
            .argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp: Vec<*const libc::c_char> = self
            .env
            .iter()
            .map(|e| e.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let exe = self.exe.as_ptr();
        // SAFETY: the child only calls `exec_child`, which makes
        // async-signal-safe calls on memory prepared above and never
        // returns; the parent continues normally.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: in the child of a fork, with pointers that stay valid
            // (the child's copy of this stack frame) until execve.
            unsafe { exec_child(fds, exe, argv.as_ptr(), envp.as_ptr()) }
        }
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(pid)
    }
}

fn cstring(s: &str) -> CString {
    // Only called with constants, which hold no NUL.
    CString::new(s).unwrap_or_default()
}

/// A stage process between fork and `execve` of the container process.
pub struct Stage {
    pid: i32,
    sync: UnixStream,
    since: Since,
    /// The container process, once the stage reported it.
    process_pid: Option<i32>,
    /// The process's terminal, once the stage sent it.
    terminal: Option<Terminal>,
    /// What the stage said its steps took, once it was ready.
    times: jevm_protocol::CreateTimes,
}

impl Stage {
    /// Starts a stage with `stdio` as its fds 0-2 and the sync socket as
    /// fd 3: from the zygote when there is one that answers, else by
    /// `fork` and `execve` of `command`.
    pub fn spawn(
        command: &StageCommand,
        zygote: Option<(&Zygote, Next)>,
        stdio: [RawFd; 3],
    ) -> io::Result<Stage> {
        let (sync, child_sync) = UnixStream::pair()?;
        let fds = [stdio[0], stdio[1], stdio[2], child_sync.as_raw_fd()];
        // Held until the stage is registered: the reaper cannot handle the
        // stage's exit before it is known as a stage.
        let mut table = exits::lock();
        let forked = match zygote.map(|(z, next)| (z, z.spawn(&fds, next))) {
            Some((_, Ok(pid))) => Ok(pid),
            Some((z, Err(e))) => {
                log::warn!(
                    "the container-init zygote (pid {}) failed: {e}; starting stages with exec from now on",
                    z.pid()
                );
                command.fork_exec(&fds)
            }
            None => command.fork_exec(&fds),
        };
        let pid = forked?;
        let since = table.watch_stage(pid);
        drop(table);
        drop(child_sync);
        sync.set_read_timeout(Some(STAGE_TIMEOUT))?;
        sync.set_write_timeout(Some(STAGE_TIMEOUT))?;
        Ok(Stage {
            pid,
            sync,
            since,
            process_pid: None,
            terminal: None,
            times: Default::default(),
        })
    }

    pub fn since(&self) -> Since {
        self.since
    }

    /// What the stage's steps took (zero until it was ready).
    pub fn times(&self) -> jevm_protocol::CreateTimes {
        self.times
    }

    /// The terminal the stage allocated (with `terminal`), once.
    pub fn take_terminal(&mut self) -> Option<Terminal> {
        self.terminal.take()
    }

    /// Sends the plan and waits until the process is ready to `execve`.
    /// Returns its PID; the error is the stage's message, or what went
    /// wrong talking to it.
    pub fn prepare(&mut self, plan: &InitPlan) -> Result<i32, String> {
        write_frame(&mut self.sync, plan).map_err(|e| self.lost("sending its plan", e))?;
        loop {
            let msg: StageMsg = read_frame(&mut self.sync)
                .map_err(|e| self.lost("waiting for it to be ready", e))?;
            match msg {
                StageMsg::Pid { pid } => {
                    let pid = i32::try_from(pid)
                        .ok()
                        .filter(|&p| p > 0)
                        .ok_or_else(|| format!("container-init reported a bad pid {pid}"))?;
                    self.process_pid = Some(pid);
                }
                StageMsg::Console if plan.terminal && self.terminal.is_none() => {
                    let master = plan::recv_console(self.sync.as_fd())
                        .map_err(|e| format!("container-init: receiving the terminal: {e}"))?;
                    let terminal = Terminal::new(master)
                        .map_err(|e| format!("container-init: taking the terminal: {e}"))?;
                    self.terminal = Some(terminal);
                }
                StageMsg::Console => {
                    return Err(format!(
                        "container-init sent a terminal that was {}",
                        if plan.terminal {
                            "already sent"
                        } else {
                            "not asked for"
                        }
                    ))
                }
                StageMsg::Ready { .. } if plan.terminal && self.terminal.is_none() => {
                    return Err("container-init was ready without sending the terminal".into())
                }
                StageMsg::Ready { times } => {
                    self.times = times;
                    return self
                        .process_pid
                        .ok_or_else(|| "container-init was ready without reporting a pid".into());
                }
                StageMsg::Error { message } => return Err(message),
            }
        }
    }

    /// Lets the process `execve`; Ok once it did (EOF on the sync socket).
    pub fn start(mut self) -> Result<(), String> {
        write_frame(&mut self.sync, &AgentMsg::Start).map_err(|e| self.lost("sending start", e))?;
        let result = match read_frame::<_, StageMsg>(&mut self.sync) {
            Err(FrameError::Io(e)) if e.kind() == ErrorKind::UnexpectedEof => Ok(()),
            Ok(StageMsg::Error { message }) => Err(message),
            Ok(other) => Err(format!("container-init answered start with {other:?}")),
            Err(e) => Err(self.lost("waiting for the process to start", e)),
        };
        self.finish();
        result
    }

    /// Gives up on the stage: kills it and the process it reported, unless
    /// they were reaped already.
    pub fn abort(self) {
        {
            let table = exits::lock();
            for pid in [Some(self.pid), self.process_pid].into_iter().flatten() {
                if table.peek(pid, self.since).is_none() {
                    // SAFETY: kill has no memory effects; the PID was not
                    // reaped since the fork, so it is still ours.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        self.finish();
    }

    /// Drops a stage whose process is gone before it was started.
    pub fn forget(self) {
        self.finish();
    }

    /// The stage's own exit status no longer matters to anyone, unless the
    /// stage is itself the container process.
    fn finish(&self) {
        if self.process_pid != Some(self.pid) {
            exits::lock().forget_stage(self.pid);
        }
    }

    fn lost(&self, doing: &str, e: FrameError) -> String {
        let status = exits::lock().peek(self.pid, self.since);
        match (e, status) {
            (_, Some(exit)) => format!(
                "container-init {doing}: it exited with status {} without a message",
                exit.status
            ),
            (FrameError::Io(e), None) if e.kind() == ErrorKind::UnexpectedEof => {
                format!("container-init {doing}: it closed the sync socket without a message")
            }
            (e, None) => format!("container-init {doing}: {e}"),
        }
    }
}

/// The child side of the fork: fds to 0-3, everything else closed, signals
/// as a fresh process has them, then `execve`.
///
/// # Safety
/// Call only in the child of `fork`, with NUL-terminated arrays.
unsafe fn exec_child(
    fds: &[RawFd; 4],
    exe: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> ! {
    // SAFETY: in the child of a fork, which may close any fd.
    unsafe { place_stage_fds(fds) };

    // SAFETY: sigset_t is plain data that sigemptyset initialises; the
    // calls are async-signal-safe.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
    // 64 = the kernel's _NSIG on every Linux architecture jevm runs on.
    for signal in 1..=64 {
        if signal != libc::SIGKILL && signal != libc::SIGSTOP {
            // SAFETY: signal() is async-signal-safe; SIG_DFL installs no
            // handler. Reserved numbers fail harmlessly with EINVAL.
            unsafe { libc::signal(signal, libc::SIG_DFL) };
        }
    }
    // SAFETY: all pointers are valid NUL-terminated C data prepared before
    // the fork; execve returns only on failure.
    unsafe { libc::execve(exe, argv, envp) };
    // SAFETY: async-signal-safe; the parent sees EOF on the sync socket.
    unsafe { libc::_exit(127) }
}

/// Moves `fds` to 0-3, where a stage finds its stdio and sync socket
/// (through copies at `PARK_FD` and up, so that no move overwrites a source
/// not yet moved), and closes every other fd. Async-signal-safe: for the
/// child of the agent's fork, and for the zygote's.
///
/// # Safety
/// Call only in a forked child, which may close any fd it holds.
pub(super) unsafe fn place_stage_fds(fds: &[RawFd; 4]) {
    let mut parked = [0; 4];
    for (slot, &fd) in parked.iter_mut().zip(fds) {
        // SAFETY: fcntl is async-signal-safe and only duplicates an fd.
        *slot = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, PARK_FD) };
        if *slot < 0 {
            // SAFETY: _exit is async-signal-safe and ends the child.
            unsafe { libc::_exit(126) }
        }
    }
    for (target, &fd) in parked.iter().enumerate() {
        // SAFETY: dup2 is async-signal-safe; the target loses close-on-exec.
        if unsafe { libc::dup2(fd, target as RawFd) } < 0 {
            // SAFETY: as above.
            unsafe { libc::_exit(126) }
        }
    }
    debug_assert_eq!(SYNC_FD, 3);
    // Everything else, parked copies included, whether or not another
    // thread opened it close-on-exec. Failure (pre-5.9 kernel) leaves only
    // close-on-exec fds, which execve closes.
    // SAFETY: a raw syscall without memory arguments.
    unsafe { libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) };
}
