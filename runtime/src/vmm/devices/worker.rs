//! The thread a virtio device serves its queues on, and the eventfd that
//! tells it to stop. One place for every device, so a device worker is
//! started, stopped and (on a panic or a failed stop) reported the same way.

use std::io;
use std::os::fd::AsRawFd;

use log::error;

use crate::jail::{self, ThreadKind};
use vmm_sys_util::eventfd::EventFd;

/// A running worker. `W` is what the thread hands back when it stops: the
/// worker itself where `pause` must read its queue positions.
pub(super) struct WorkerThread<W> {
    stop: EventFd,
    thread: jail::Thread<W>,
}

/// The stop signal: the device keeps one end, the worker polls the other
/// (add it to the worker's epoll before spawning).
pub(super) fn stop_pair() -> io::Result<(EventFd, EventFd)> {
    let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
    let worker_end = stop.try_clone()?;
    Ok((stop, worker_end))
}

impl<W: Send + 'static> WorkerThread<W> {
    /// Runs `run` on a thread called `thread_name` (what `ps -L` shows),
    /// in the jail of `kind` (crate::jail): it serves guest input.
    pub(super) fn spawn(
        thread_name: &str,
        kind: ThreadKind,
        stop: EventFd,
        run: impl FnOnce() -> W + Send + 'static,
    ) -> io::Result<Self> {
        let thread = jail::spawn(thread_name, kind, run)?;
        Ok(WorkerThread { stop, thread })
    }

    /// [`WorkerThread::spawn`] for a worker that serves a directory: it
    /// may reach files by path only beneath `dir` (None: none at all).
    pub(super) fn spawn_beneath(
        thread_name: &str,
        kind: ThreadKind,
        dir: Option<std::path::PathBuf>,
        stop: EventFd,
        run: impl FnOnce() -> W + Send + 'static,
    ) -> io::Result<Self> {
        let thread = jail::spawn_beneath(thread_name, kind, dir, run)?;
        Ok(WorkerThread { stop, thread })
    }

    #[cfg(test)]
    pub(super) fn thread_name(&self) -> Option<&str> {
        Some(self.thread.name())
    }

    /// Signals the worker and waits for it. None when the signal could not
    /// be sent (the thread is then left running: a leaked thread beats a
    /// VMM hung in `join`) or the thread panicked; `device` names it in the
    /// log.
    pub(super) fn stop(self, device: &str) -> Option<W> {
        if let Err(e) = self.stop.write(1) {
            error!(
                "{device}: cannot stop the worker thread (eventfd {}): {e}",
                self.stop.as_raw_fd()
            );
            return None;
        }
        match self.thread.join() {
            Ok(w) => w,
            Err(_) => {
                error!("{device}: the worker thread panicked");
                None
            }
        }
    }
}
