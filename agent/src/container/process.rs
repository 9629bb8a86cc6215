//! One process of a container (its init or an exec'd one): its PID, its
//! stage until it is started, its stdio ends until the host attaches them,
//! and how it ended.

use super::events::Events;
use super::exits::{self, Exit, Since};
use super::stage::Stage;
use super::stdio::{self, AgentStdio};
use super::Failure;
use crate::workers::Workers;
use jevm_protocol::{ErrorKind, Event, StdioStream};
use std::fs::File;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long `Exited` waits for the process's output streams to reach EOF:
/// a grandchild that inherited stdout may hold it open for good.
const OUTPUT_DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// How long `CloseStdin` lets an attached stdin stream end by itself (the
/// host shut its side down and the agent is still forwarding what was sent)
/// before cutting it off.
const STDIN_DRAIN_LIMIT: Duration = Duration::from_secs(1);

/// What `Signal` answers for a process that is gone; containerd's shims
/// recognise runc's wording.
pub const ALREADY_FINISHED: &str = "process already finished";

/// Runs on the connection's thread once the `Done` answer is out.
pub type Attachment = Box<dyn FnOnce(UnixStream) + Send>;

/// Threads that report exits. Each exit's report waits for the process's
/// output to drain, so it runs on a thread of its own; one is started
/// with the agent, before the template's snapshot, and kept parked (see
/// `crate::workers`): a clone's first exit costs no thread start.
pub type Reports = Workers<Box<dyn FnOnce() + Send>>;

/// A pool for [`Process::watch_exit`], with one thread started ahead.
pub fn start_reports() -> Arc<Reports> {
    let reports = Workers::new("exit", 1, |report: Box<dyn FnOnce() + Send>| report());
    if let Err(e) = reports.prestart(1) {
        // Not fatal: an exit then gets a new thread.
        log::warn!("starting the exit-report thread ahead: {e}");
    }
    reports
}

enum Stdin {
    NotWanted,
    Pending(File),
    Attached { done: bool },
    Closed,
}

struct State {
    stage: Option<Stage>,
    started: bool,
    exit: Option<Exit>,
    stdin: Stdin,
    stdout: Option<File>,
    stderr: Option<File>,
    /// Output streams that have not reached EOF yet.
    outputs_pending: u32,
    stdin_conn: Option<UnixStream>,
    /// Every attached connection, shut down when the process is forgotten.
    connections: Vec<UnixStream>,
}

pub struct Process {
    pub container_id: String,
    pub exec_id: Option<String>,
    pub pid: i32,
    since: Since,
    master: Option<OwnedFd>,
    wanted: jevm_protocol::Stdio,
    state: Mutex<State>,
    changed: Condvar,
}

impl Process {
    pub fn new(
        container_id: &str,
        exec_id: Option<&str>,
        pid: i32,
        mut stage: Stage,
        wanted: jevm_protocol::Stdio,
        ends: AgentStdio,
    ) -> Arc<Process> {
        // With a terminal the ends are the master the stage allocated.
        let ends = match stage.take_terminal() {
            Some(terminal) => terminal.ends(&wanted),
            None => ends,
        };
        let outputs_pending = if wanted.terminal {
            u32::from(wanted.stdout)
        } else {
            u32::from(wanted.stdout) + u32::from(wanted.stderr)
        };
        Arc::new(Process {
            container_id: container_id.into(),
            exec_id: exec_id.map(Into::into),
            pid,
            since: stage.since(),
            master: ends.master,
            wanted,
            changed: Condvar::new(),
            state: Mutex::new(State {
                stage: Some(stage),
                started: false,
                exit: None,
                stdin: match ends.stdin {
                    Some(file) => Stdin::Pending(file),
                    None => Stdin::NotWanted,
                },
                stdout: ends.stdout,
                stderr: ends.stderr,
                outputs_pending,
                stdin_conn: None,
                connections: Vec::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `container "c"` or `exec "e" in container "c"`, for messages.
    pub fn name(&self) -> String {
        match &self.exec_id {
            None => format!("container {:?}", self.container_id),
            Some(exec) => format!("exec {exec:?} in container {:?}", self.container_id),
        }
    }

    /// From now on, the process's exit is recorded and reported as
    /// `Exited` on `events` (at once if it was reaped already), from a
    /// thread of `reports`.
    pub fn watch_exit(self: &Arc<Self>, events: Arc<Events>, reports: Arc<Reports>) {
        let process = Arc::clone(self);
        exits::claim(
            self.pid,
            self.since,
            Box::new(move |exit| process.exited(exit, events, &reports)),
        );
    }

    fn exited(self: Arc<Self>, exit: Exit, events: Arc<Events>, reports: &Arc<Reports>) {
        let stage = {
            let mut state = self.lock();
            state.exit = Some(exit);
            // A process that died before `Start` has nothing to start.
            state.stage.take()
        };
        self.changed.notify_all();
        if let Some(stage) = stage {
            stage.forget();
        }
        let process = Arc::clone(&self);
        let report = move || {
            process.wait_for_output(Instant::now() + OUTPUT_DRAIN_LIMIT);
            events.push(Event::Exited {
                container_id: process.container_id.clone(),
                exec_id: process.exec_id.clone(),
                pid: process.pid as u32,
                exit_status: exit.status,
                exited_at_ns: exit.at_ns,
            });
        };
        // Not on the reaper's thread: it must go on reaping meanwhile.
        if let Err(e) = reports.run(Box::new(report)) {
            log::error!("{}: reporting its exit: {e}", self.name());
        }
    }

    fn wait_for_output(&self, deadline: Instant) {
        let mut state = self.lock();
        while state.outputs_pending > 0 {
            let now = Instant::now();
            if now >= deadline {
                log::debug!(
                    "{}: output still open after exit; reporting it anyway",
                    self.name()
                );
                return;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .map(|(s, _)| s)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    pub fn exit(&self) -> Option<Exit> {
        self.lock().exit
    }

    pub fn started(&self) -> bool {
        self.lock().started
    }

    /// Waits up to `limit` for the process to be reaped.
    pub fn wait_exit(&self, limit: Duration) -> Option<Exit> {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        loop {
            if state.exit.is_some() {
                return state.exit;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .map(|(s, _)| s)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Lets the process `execve`.
    pub fn start(&self) -> Result<u32, Failure> {
        let stage = {
            let mut state = self.lock();
            match state.stage.take() {
                Some(stage) => stage,
                None if state.started => {
                    return Err(Failure::new(
                        ErrorKind::FailedPrecondition,
                        format!("{} was already started", self.name()),
                    ))
                }
                None => {
                    return Err(Failure::new(
                        ErrorKind::FailedPrecondition,
                        format!("{}: {ALREADY_FINISHED}", self.name()),
                    ))
                }
            }
        };
        let result = stage.start();
        if result.is_ok() {
            self.lock().started = true;
        }
        result.map(|()| self.pid as u32).map_err(Failure::from)
    }

    /// Kills a process that was created but never started; its stage goes
    /// with it. Started processes are left alone (the caller signals them).
    pub fn abort_if_unstarted(&self) {
        let stage = self.lock().stage.take();
        if let Some(stage) = stage {
            stage.abort();
        }
    }

    /// Signalling a process that has exited is [`ErrorKind::NotFound`], as
    /// runc's shim answers ("process already finished: not found").
    pub fn signal(&self, signal: i32) -> Result<(), Failure> {
        let finished = || Failure::new(ErrorKind::NotFound, ALREADY_FINISHED);
        // Under the lock: the reaper records the exit under it too, so the
        // PID cannot be a recycled one while this holds.
        let state = self.lock();
        if state.exit.is_some() {
            return Err(finished());
        }
        // SAFETY: kill has no memory effects.
        if unsafe { libc::kill(self.pid, signal) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Err(finished());
            }
            return Err(format!("{}: signal {signal}: {e}", self.name()).into());
        }
        Ok(())
    }

    pub fn resize(&self, width: u32, height: u32) -> Result<(), String> {
        let master = self
            .master
            .as_ref()
            .ok_or_else(|| format!("{} has no terminal", self.name()))?;
        stdio::resize(master, width, height)
            .map_err(|e| format!("{}: resizing its terminal: {e}", self.name()))
    }

    /// Takes the agent's end of `stream`, for a pump on the host's
    /// connection.
    pub fn attach(self: &Arc<Self>, stream: StdioStream) -> Result<Attachment, String> {
        let what = match stream {
            StdioStream::Stdin => "stdin",
            StdioStream::Stdout => "stdout",
            StdioStream::Stderr => "stderr",
        };
        let wanted = match stream {
            StdioStream::Stdin => self.wanted.stdin,
            StdioStream::Stdout => self.wanted.stdout,
            StdioStream::Stderr => self.wanted.stderr && !self.wanted.terminal,
        };
        if !wanted {
            return Err(format!(
                "{}: {what} was not asked for when it was created",
                self.name()
            ));
        }
        let mut state = self.lock();
        let taken = match stream {
            StdioStream::Stdin => match std::mem::replace(&mut state.stdin, Stdin::Closed) {
                Stdin::Pending(file) => {
                    state.stdin = Stdin::Attached { done: false };
                    Some(file)
                }
                other => {
                    state.stdin = other;
                    None
                }
            },
            StdioStream::Stdout => state.stdout.take(),
            StdioStream::Stderr => state.stderr.take(),
        };
        let file = taken
            .ok_or_else(|| format!("{}: {what} is already attached or closed", self.name()))?;
        drop(state);
        let process = Arc::clone(self);
        Ok(Box::new(move |conn: UnixStream| {
            process.remember(&conn, stream);
            match stream {
                StdioStream::Stdin => {
                    stdio::pump_input(conn, file);
                    process.lock().stdin = Stdin::Attached { done: true };
                }
                StdioStream::Stdout | StdioStream::Stderr => {
                    stdio::pump_output(file, conn);
                    let mut state = process.lock();
                    state.outputs_pending = state.outputs_pending.saturating_sub(1);
                }
            }
            process.changed.notify_all();
        }))
    }

    fn remember(&self, conn: &UnixStream, stream: StdioStream) {
        let Ok(clone) = conn.try_clone() else {
            return;
        };
        let mut state = self.lock();
        if stream == StdioStream::Stdin {
            state.stdin_conn = conn.try_clone().ok();
        }
        state.connections.push(clone);
    }

    /// The process reads EOF on stdin, once what the host already sent has
    /// been forwarded (bounded by [`STDIN_DRAIN_LIMIT`]).
    pub fn close_stdin(&self) {
        let mut state = self.lock();
        match std::mem::replace(&mut state.stdin, Stdin::Closed) {
            // Dropping the write end is the EOF.
            Stdin::Pending(_) | Stdin::Closed | Stdin::NotWanted => return,
            Stdin::Attached { done: true } => return,
            Stdin::Attached { done: false } => state.stdin = Stdin::Attached { done: false },
        }
        let deadline = Instant::now() + STDIN_DRAIN_LIMIT;
        loop {
            if matches!(state.stdin, Stdin::Attached { done: true }) {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .map(|(s, _)| s)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        // The pump is blocked reading the host: cut it off, it then drops
        // the write end.
        if let Some(conn) = &state.stdin_conn {
            let _ = conn.shutdown(Shutdown::Read);
        }
    }

    /// Ends every pump of this process (the process is being forgotten).
    pub fn disconnect(&self) {
        let mut state = self.lock();
        for conn in state.connections.drain(..) {
            let _ = conn.shutdown(Shutdown::Both);
        }
        state.stdin = Stdin::Closed;
        state.stdout = None;
        state.stderr = None;
    }
}
