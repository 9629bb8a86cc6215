//! Exit statuses of reaped children, matched with the processes waiting for
//! them.
//!
//! The reaper may collect a PID before anyone asked for it: a container
//! process can die while its stage is still reporting its PID, and a process
//! reparented to the agent is reaped here like any orphan. Statuses nobody
//! claimed yet are therefore kept for a while, each with the sequence number
//! of its reaping, so a claim can tell a status of "its" process from one
//! left by an earlier process that had the same PID.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long an unclaimed status is kept: far longer than a stage takes to
/// report a PID, short enough that the statuses of stage intermediates (which
/// nobody claims) do not pile up.
const UNCLAIMED_TTL: Duration = Duration::from_secs(120);

/// How a process ended, as runc reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + the signal that killed it.
    pub status: u32,
    /// Guest wall-clock time of the reaping, nanoseconds since the epoch.
    pub at_ns: u64,
}

pub type OnExit = Box<dyn FnOnce(Exit) + Send>;

enum Watch {
    /// A stage process the agent forked: its status matters only to the
    /// spawn that forked it, until that spawn is over.
    Stage,
    Process(OnExit),
}

struct Unclaimed {
    exit: Exit,
    seq: u64,
    reaped: Instant,
}

#[derive(Default)]
pub struct Exits {
    seq: u64,
    watches: HashMap<i32, Watch>,
    unclaimed: HashMap<i32, Unclaimed>,
}

/// Marks the moment a spawn began: statuses reaped before it cannot belong
/// to a process that spawn created.
#[derive(Debug, Clone, Copy)]
pub struct Since(u64);

static EXITS: LazyLock<Mutex<Exits>> = LazyLock::new(Mutex::default);

/// The table every reaped child goes through. Held across `fork` by the
/// spawn code so the reaper cannot see the stage before it is registered.
pub fn lock() -> MutexGuard<'static, Exits> {
    EXITS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Called by the reaper for every child it reaped. `wait_status` is what
/// `waitpid` answered.
pub fn reaped(pid: i32, status: u32) {
    let exit = Exit {
        status,
        at_ns: now_ns(),
    };
    let on_exit = lock().record(pid, exit);
    // Outside the lock: the callback takes the container table's locks.
    if let Some(on_exit) = on_exit {
        on_exit(exit);
    }
}

/// runc's exit status: the code, or 128 + signal.
pub fn status_of(wait: nix::sys::wait::WaitStatus) -> Option<(i32, u32)> {
    use nix::sys::wait::WaitStatus;
    match wait {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), (code & 0xff) as u32)),
        WaitStatus::Signaled(pid, signal, _) => Some((pid.as_raw(), 128 + signal as u32)),
        _ => None,
    }
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Exits {
    /// Returns the callback to run for `pid`, if someone waits for it.
    fn record(&mut self, pid: i32, exit: Exit) -> Option<OnExit> {
        self.seq += 1;
        match self.watches.remove(&pid) {
            Some(Watch::Process(on_exit)) => return Some(on_exit),
            // Kept: the spawn may learn that the stage itself is the
            // container process, or report the stage's status in an error.
            Some(Watch::Stage) | None => {}
        }
        let now = Instant::now();
        self.unclaimed
            .retain(|_, u| now.duration_since(u.reaped) < UNCLAIMED_TTL);
        self.unclaimed.insert(
            pid,
            Unclaimed {
                exit,
                seq: self.seq,
                reaped: now,
            },
        );
        None
    }

    /// Call with the lock held across `fork`, right after it.
    pub fn watch_stage(&mut self, pid: i32) -> Since {
        // A status left by an earlier process with this PID is stale.
        self.unclaimed.remove(&pid);
        self.watches.insert(pid, Watch::Stage);
        Since(self.seq)
    }

    #[cfg(test)]
    /// The sequence point for a spawn whose stage is not forked here.
    pub fn since_now(&self) -> Since {
        Since(self.seq)
    }

    /// The status of `pid` if it was reaped after `since`.
    pub fn peek(&self, pid: i32, since: Since) -> Option<Exit> {
        self.unclaimed
            .get(&pid)
            .filter(|u| u.seq > since.0)
            .map(|u| u.exit)
    }

    /// Ends the spawn's interest in its stage process: its status is dropped
    /// now or when it is reaped.
    pub fn forget_stage(&mut self, pid: i32) {
        if matches!(self.watches.get(&pid), Some(Watch::Stage)) {
            self.watches.remove(&pid);
        }
        self.unclaimed.remove(&pid);
    }

    /// Calls `on_exit` when `pid` is reaped; at once (returned to the caller
    /// to run outside the lock) if it was reaped after `since`.
    #[must_use]
    pub fn claim(&mut self, pid: i32, since: Since, on_exit: OnExit) -> Option<(OnExit, Exit)> {
        if let Some(u) = self.unclaimed.remove(&pid) {
            if u.seq > since.0 {
                return Some((on_exit, u.exit));
            }
        }
        self.watches.insert(pid, Watch::Process(on_exit));
        None
    }
}

/// `claim` on the global table, running an immediate callback outside it.
pub fn claim(pid: i32, since: Since, on_exit: OnExit) {
    let ready = lock().claim(pid, since, on_exit);
    if let Some((on_exit, exit)) = ready {
        on_exit(exit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn exit(status: u32) -> Exit {
        Exit { status, at_ns: 1 }
    }

    fn recorder() -> (OnExit, mpsc::Receiver<u32>) {
        let (tx, rx) = mpsc::channel();
        (
            Box::new(move |e: Exit| {
                let _ = tx.send(e.status);
            }),
            rx,
        )
    }

    #[test]
    fn a_claimed_pid_gets_its_status_when_reaped() {
        let mut t = Exits::default();
        let since = t.since_now();
        let (cb, rx) = recorder();
        assert!(t.claim(10, since, cb).is_none());
        t.record(10, exit(42)).unwrap()(exit(42));
        assert_eq!(rx.try_recv(), Ok(42));
    }

    #[test]
    fn a_status_reaped_before_the_claim_is_kept_for_it() {
        let mut t = Exits::default();
        let since = t.since_now();
        assert!(t.record(11, exit(137)).is_none());
        assert_eq!(t.peek(11, since), Some(exit(137)));
        let (cb, _rx) = recorder();
        let (_, e) = t.claim(11, since, cb).expect("reaped already");
        assert_eq!(e.status, 137);
        assert!(t.unclaimed.is_empty() && t.watches.is_empty());
    }

    #[test]
    fn a_status_from_before_the_spawn_is_stale_for_a_reused_pid() {
        let mut t = Exits::default();
        assert!(t.record(12, exit(1)).is_none());
        let since = t.since_now();
        assert_eq!(t.peek(12, since), None);
        let (cb, rx) = recorder();
        assert!(t.claim(12, since, cb).is_none(), "stale status taken");
        t.record(12, exit(0)).unwrap()(exit(0));
        assert_eq!(rx.try_recv(), Ok(0));
    }

    #[test]
    fn a_stage_pid_is_kept_until_forgotten_and_then_dropped() {
        let mut t = Exits::default();
        let since = t.watch_stage(13);
        assert!(t.record(13, exit(0)).is_none());
        assert_eq!(t.peek(13, since), Some(exit(0)));
        t.forget_stage(13);
        assert!(t.unclaimed.is_empty() && t.watches.is_empty());

        // Forgotten before it is reaped: its later status is only parked.
        let _ = t.watch_stage(14);
        t.forget_stage(14);
        assert!(t.watches.is_empty());
    }

    #[test]
    fn a_stage_that_is_the_container_process_can_be_claimed() {
        let mut t = Exits::default();
        let since = t.watch_stage(15);
        let (cb, rx) = recorder();
        assert!(t.claim(15, since, cb).is_none());
        t.record(15, exit(3)).unwrap()(exit(3));
        assert_eq!(rx.try_recv(), Ok(3));
    }

    #[test]
    fn signals_become_128_plus_the_signal_number() {
        use nix::sys::signal::Signal;
        use nix::sys::wait::WaitStatus;
        use nix::unistd::Pid;
        let pid = Pid::from_raw(5);
        assert_eq!(status_of(WaitStatus::Exited(pid, 42)), Some((5, 42)));
        assert_eq!(
            status_of(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some((5, 137))
        );
        assert_eq!(status_of(WaitStatus::StillAlive), None);
    }
}
