//! Reaping: as PID 1 the agent inherits every orphan in the guest and must
//! wait for them, or they stay zombies forever.
//!
//! SIGCHLD is blocked in every thread and collected by one thread with
//! `sigwait`, rather than a signal handler, so no other thread's blocking
//! call is ever interrupted with EINTR. Every status reaped goes to the
//! container exit table (`container::exits`), which keeps it until the
//! process it belongs to is claimed.

use crate::container::exits;
use log::{error, warn};
use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::time::Duration;

fn sigchld() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set
}

/// Blocks SIGCHLD in the calling thread. Call it before spawning any thread:
/// threads inherit the mask, and a thread without it would take the signal.
pub fn block_sigchld() -> nix::Result<()> {
    sigchld().thread_block()
}

/// Starts the reaper thread.
pub fn spawn() -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(|| {
            let set = sigchld();
            loop {
                match set.wait() {
                    Ok(_) => reap_all(),
                    Err(e) => {
                        error!("waiting for SIGCHLD: {e}");
                        std::thread::sleep(Duration::from_secs(1));
                        reap_all();
                    }
                }
            }
        })
        .map(drop)
}

/// Several exits may have been folded into one pending SIGCHLD, so this
/// drains every exited child, not one.
fn reap_all() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(status) => {
                // Container processes are waited for by the container
                // table; every other child is an orphan or a stage
                // intermediate and is simply gone now.
                if let Some((pid, status)) = exits::status_of(status) {
                    exits::reaped(pid, status);
                }
            }
            Err(Errno::EINTR) => {}
            Err(e) => {
                warn!("reaping children: {e}");
                return;
            }
        }
    }
}
