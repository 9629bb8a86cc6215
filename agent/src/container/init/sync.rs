//! The sync socket (fd 3): the plan in, `Pid`/`Console`/`Ready`/`Error`
//! out, `Start` in.

use super::super::plan::{self, AgentMsg, InitPlan, StageMsg, SYNC_FD};
use anyhow::{anyhow, bail, Context, Result};
use jevm_protocol::{read_frame, write_frame, FrameError};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd};

pub struct Sync {
    socket: File,
}

impl Sync {
    /// Takes ownership of fd 3 and makes it close-on-exec: the agent learns
    /// that `execve` succeeded from the EOF.
    pub fn take() -> Result<Sync> {
        fcntl(SYNC_FD, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
            .map_err(|e| anyhow!("sync socket (fd {SYNC_FD}): {e}"))?;
        // SAFETY: fd 3 is the sync socket by contract with the agent and
        // nothing else in this process owns it.
        let socket = unsafe { File::from_raw_fd(SYNC_FD) };
        Ok(Sync { socket })
    }

    pub fn read_plan(&mut self) -> Result<InitPlan> {
        read_frame(&mut self.socket).context("reading the plan from the agent")
    }

    pub fn send(&mut self, msg: &StageMsg) -> Result<()> {
        write_frame(&mut self.socket, msg).context("writing to the agent")
    }

    /// Hands the terminal's master to the agent.
    pub fn send_console(&mut self, master: BorrowedFd<'_>) -> Result<()> {
        self.send(&StageMsg::Console)?;
        plan::send_console(self.socket.as_fd(), master).context("sending the terminal to the agent")
    }

    /// Waits for `Start`; EOF means the agent aborted the container.
    pub fn wait_start(&mut self) -> Result<()> {
        match read_frame::<_, AgentMsg>(&mut self.socket) {
            Ok(AgentMsg::Start) => Ok(()),
            Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                // Nothing to report: nobody is listening.
                std::process::exit(1)
            }
            Err(e) => bail!("waiting for start: {e}"),
        }
    }
}
