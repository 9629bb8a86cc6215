//! Where one process of a task (a container's init or an exec'd process)
//! stands, as containerd must see it, and what each step obliges the task
//! service to do.
//!
//! The transitions are pure: they take what happened (a start asked for,
//! answered or failed, an exit reported by the agent) and return what the
//! service must then do (publish a TaskExit, wake the waiters). The service
//! does the I/O; the ordering rules live here, where they can be tested
//! without a VM:
//!
//! - a TaskExit is published only after its process's TaskStart /
//!   TaskExecStarted: an exit the agent reports while `start` is still
//!   waiting for the guest is held until the start is answered, then
//!   published right after it, dated no earlier than it;
//! - waiters (`Wait`) learn an exit when it is final: at once, or for an
//!   exit held during a start, when that start ends either way;
//! - the first exit wins (a lost pod reports every process exited, and the
//!   agent may still report the real exit of some);
//! - an exec'd process the guest refused to create answers its `start`
//!   with the guest's error, as runc's shim does (runc creates an exec'd
//!   process only at start).

use containerd_shim_protos::api::Status;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// As runc reports it: the exit code, or 128 + signal number.
    pub status: u32,
    /// Host wall clock, nanoseconds since the epoch.
    pub at_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// The guest refused to create it; `start` answers this.
    CreateFailed(String),
    /// Created in the guest, stopped before `execve`.
    Created,
    /// A `start` is waiting for the guest; an exit seen meanwhile is held.
    Starting { exit: Option<ExitInfo> },
    /// Started: `start` has returned and its event is published.
    Running,
    /// Gone. `started`: it ran (its start returned first); `published`:
    /// its TaskExit is out.
    Exited {
        exit: ExitInfo,
        started: bool,
        published: bool,
    },
}

/// Why a `start` is refused before the guest is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartRefused {
    Exited,
    AlreadyStarted,
    /// The guest's error from creating it.
    CreateFailed(String),
}

/// What the service must do after an exit was reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OnExit {
    /// The first exit of this process: its stdin can be closed.
    pub recorded: bool,
    /// Publish TaskExit now.
    pub publish: bool,
    /// Tell the waiters this exit now.
    pub notify: Option<ExitInfo>,
}

/// What the service must do after the guest answered a `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OnStarted {
    /// An exit held during the start: publish it (after the start's own
    /// event) and tell the waiters.
    pub exit: Option<ExitInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifecycle {
    phase: Phase,
}

impl Lifecycle {
    pub fn created() -> Lifecycle {
        Lifecycle {
            phase: Phase::Created,
        }
    }

    pub fn create_failed(why: String) -> Lifecycle {
        Lifecycle {
            phase: Phase::CreateFailed(why),
        }
    }

    /// The status `State` reports.
    pub fn status(&self, paused: bool) -> Status {
        match &self.phase {
            Phase::Exited { .. } | Phase::Starting { exit: Some(_) } => Status::STOPPED,
            Phase::CreateFailed(_) | Phase::Created | Phase::Starting { exit: None } => {
                Status::CREATED
            }
            Phase::Running if paused => Status::PAUSED,
            Phase::Running => Status::RUNNING,
        }
    }

    /// The exit, once one was reported (held or not).
    pub fn exit(&self) -> Option<ExitInfo> {
        match self.phase {
            Phase::Exited { exit, .. } | Phase::Starting { exit: Some(exit) } => Some(exit),
            _ => None,
        }
    }

    /// Whether its start succeeded.
    pub fn started(&self) -> bool {
        matches!(
            self.phase,
            Phase::Running | Phase::Exited { started: true, .. }
        )
    }

    /// A `start` arrives: refused, or the process is now starting.
    pub fn begin_start(&mut self) -> Result<(), StartRefused> {
        match &self.phase {
            Phase::Created => {
                self.phase = Phase::Starting { exit: None };
                Ok(())
            }
            Phase::CreateFailed(why) => Err(StartRefused::CreateFailed(why.clone())),
            Phase::Exited { .. } | Phase::Starting { exit: Some(_) } => Err(StartRefused::Exited),
            Phase::Starting { exit: None } | Phase::Running => Err(StartRefused::AlreadyStarted),
        }
    }

    /// The guest refused the start: back to created, unless it exited
    /// meanwhile; then the waiters learn that exit now.
    pub fn start_failed(&mut self) -> Option<ExitInfo> {
        let Phase::Starting { exit } = self.phase else {
            return None;
        };
        match exit {
            Some(exit) => {
                self.phase = Phase::Exited {
                    exit,
                    started: false,
                    published: false,
                };
                Some(exit)
            }
            None => {
                self.phase = Phase::Created;
                None
            }
        }
    }

    /// The guest started it and the start's event is being published at
    /// `now_ns`. An exit held meanwhile is returned to be published after
    /// that event, dated no earlier.
    pub fn start_done(&mut self, now_ns: u64) -> OnStarted {
        let Phase::Starting { exit } = self.phase else {
            return OnStarted::default();
        };
        match exit {
            None => {
                self.phase = Phase::Running;
                OnStarted::default()
            }
            Some(mut exit) => {
                exit.at_ns = exit.at_ns.max(now_ns);
                self.phase = Phase::Exited {
                    exit,
                    started: true,
                    published: true,
                };
                OnStarted { exit: Some(exit) }
            }
        }
    }

    /// The process exited (the agent said so, or its pod was lost).
    pub fn on_exit(&mut self, exit: ExitInfo) -> OnExit {
        match self.phase {
            Phase::Created => {
                self.phase = Phase::Exited {
                    exit,
                    started: false,
                    published: false,
                };
                OnExit {
                    recorded: true,
                    publish: false,
                    notify: Some(exit),
                }
            }
            Phase::Starting { exit: None } => {
                self.phase = Phase::Starting { exit: Some(exit) };
                OnExit {
                    recorded: true,
                    publish: false,
                    notify: None,
                }
            }
            Phase::Running => {
                self.phase = Phase::Exited {
                    exit,
                    started: true,
                    published: true,
                };
                OnExit {
                    recorded: true,
                    publish: true,
                    notify: Some(exit),
                }
            }
            Phase::CreateFailed(_) | Phase::Starting { exit: Some(_) } | Phase::Exited { .. } => {
                OnExit::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: ExitInfo = ExitInfo {
        status: 3,
        at_ns: 100,
    };

    #[test]
    fn a_process_runs_then_its_exit_is_published_and_waiters_told_at_once() {
        let mut l = Lifecycle::created();
        assert_eq!(l.status(false), Status::CREATED);
        assert_eq!(l.begin_start(), Ok(()));
        assert_eq!(l.start_done(50), OnStarted::default());
        assert_eq!(l.status(false), Status::RUNNING);
        assert_eq!(l.status(true), Status::PAUSED);
        assert!(l.started());
        assert_eq!(
            l.on_exit(E),
            OnExit {
                recorded: true,
                publish: true,
                notify: Some(E)
            }
        );
        assert_eq!(l.status(false), Status::STOPPED);
        assert_eq!(l.exit(), Some(E));
    }

    #[test]
    fn an_exit_during_start_is_held_then_published_after_the_start_dated_after_it() {
        let mut l = Lifecycle::created();
        l.begin_start().unwrap();
        let held = l.on_exit(E);
        assert_eq!(
            held,
            OnExit {
                recorded: true,
                publish: false,
                notify: None
            }
        );
        assert_eq!(l.status(false), Status::STOPPED);
        let later = ExitInfo { at_ns: 200, ..E };
        assert_eq!(l.start_done(200), OnStarted { exit: Some(later) });
        assert!(l.started());
        // Published once: a late duplicate does nothing.
        assert_eq!(l.on_exit(E), OnExit::default());
        assert_eq!(l.exit(), Some(later));
    }

    #[test]
    fn an_exit_dated_after_the_start_keeps_its_time() {
        let mut l = Lifecycle::created();
        l.begin_start().unwrap();
        l.on_exit(E);
        assert_eq!(l.start_done(10).exit, Some(E));
    }

    #[test]
    fn a_failed_start_returns_to_created_or_releases_a_held_exit_to_waiters() {
        let mut l = Lifecycle::created();
        l.begin_start().unwrap();
        assert_eq!(l.start_failed(), None);
        assert_eq!(l.status(false), Status::CREATED);
        assert_eq!(l.begin_start(), Ok(()));
        l.on_exit(E);
        assert_eq!(l.start_failed(), Some(E));
        assert!(!l.started());
        assert_eq!(l.begin_start(), Err(StartRefused::Exited));
    }

    #[test]
    fn an_exit_before_any_start_tells_waiters_but_publishes_nothing() {
        let mut l = Lifecycle::created();
        assert_eq!(
            l.on_exit(E),
            OnExit {
                recorded: true,
                publish: false,
                notify: Some(E)
            }
        );
        assert_eq!(l.begin_start(), Err(StartRefused::Exited));
        assert!(!l.started());
    }

    #[test]
    fn a_second_start_is_refused_while_starting_and_after() {
        let mut l = Lifecycle::created();
        l.begin_start().unwrap();
        assert_eq!(l.begin_start(), Err(StartRefused::AlreadyStarted));
        l.start_done(1);
        assert_eq!(l.begin_start(), Err(StartRefused::AlreadyStarted));
    }

    #[test]
    fn a_process_the_guest_refused_answers_start_with_the_guest_error_and_ignores_exits() {
        let mut l = Lifecycle::create_failed("exec: \"nope\": not found".into());
        assert_eq!(l.status(false), Status::CREATED);
        assert_eq!(
            l.begin_start(),
            Err(StartRefused::CreateFailed(
                "exec: \"nope\": not found".into()
            ))
        );
        assert_eq!(l.on_exit(E), OnExit::default());
        assert_eq!(l.exit(), None);
    }

    #[test]
    fn the_first_exit_wins() {
        let mut l = Lifecycle::created();
        l.begin_start().unwrap();
        l.start_done(1);
        l.on_exit(E);
        let lost = ExitInfo {
            status: 255,
            at_ns: 900,
        };
        assert_eq!(l.on_exit(lost), OnExit::default());
        assert_eq!(l.exit(), Some(E));
    }
}
