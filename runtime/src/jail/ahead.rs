//! Threads jailed ahead of need. Entering a jail costs the kernel a check
//! and JIT compile of the filter plus a per-syscall cache pass over it
//! (about 60 us + 0.5 us per BPF instruction: a quarter of a millisecond
//! for the file server's list), too much for a clone's critical path. So a
//! VM about to start asks for the threads it will run ([`prepare`]); the
//! spawner starts them in the background, each enters its jail and parks.
//! Starting a jailed thread then hands the work to a parked one of its
//! kind: a channel send and a wake-up. Only what depends on the work
//! (the thread's name, Landlock beneath the directory it serves) is done
//! after it unparks.

use std::any::Any;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::ThreadKind;

/// What a jailed thread hands back when it ends: the work's result, typed
/// again by [`super::Thread::join`].
pub(super) type Output = Option<Box<dyn Any + Send>>;

/// The work a parked thread is given.
pub(super) struct Work {
    pub name: String,
    /// Landlock: Some(dir) confines file access by path beneath `dir`
    /// (Some(None): no file at all); None: not confined by path.
    pub files: Option<Option<PathBuf>>,
    pub run: Box<dyn FnOnce() -> Box<dyn Any + Send> + Send>,
    /// Told once the thread is confined and about to run, or why not.
    pub started: SyncSender<Result<(), String>>,
}

/// A thread in its jail, blocked until it is given work.
pub(super) struct Parked {
    work: SyncSender<Work>,
    pub thread: JoinHandle<Output>,
    /// Set once the thread is in its jail.
    entered: Arc<AtomicBool>,
}

impl Parked {
    /// Gives the thread its work; hands the work back if the thread is gone.
    pub fn assign(self, work: Work) -> Result<JoinHandle<Output>, Work> {
        match self.work.send(work) {
            Ok(()) => Ok(self.thread),
            Err(mpsc::SendError(work)) => Err(work),
        }
    }
}

#[derive(Default)]
struct State {
    /// Indexed by `ThreadKind as usize - 1`.
    parked: [Vec<Parked>; ThreadKind::ALL.len()],
    /// Threads the spawner is still starting, per kind.
    starting: [usize; ThreadKind::ALL.len()],
}

#[derive(Default)]
pub(super) struct Pool {
    state: Mutex<State>,
    changed: Condvar,
}

/// How long a caller waits for a thread the spawner is starting before it
/// starts one itself (the spawner is normally done in well under 1 ms).
const WAIT_FOR_STARTING: Duration = Duration::from_millis(500);

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many more threads of `kind` to start so that `count` are parked
    /// or on their way; counts them as starting.
    pub fn reserve(&self, kind: ThreadKind, count: usize) -> usize {
        let mut s = self.lock();
        let i = kind as usize - 1;
        let more = count.saturating_sub(s.parked[i].len() + s.starting[i]);
        s.starting[i] += more;
        more
    }

    /// How many threads of `kind` are parked in their jail now.
    #[cfg(test)]
    pub fn parked(&self, kind: ThreadKind) -> usize {
        self.lock().parked[kind as usize - 1]
            .iter()
            .filter(|p| p.entered.load(Ordering::Acquire))
            .count()
    }

    /// Takes back `count` reserved starts that will not happen.
    pub fn unreserve(&self, kind: ThreadKind, count: usize) {
        let mut s = self.lock();
        let i = kind as usize - 1;
        s.starting[i] = s.starting[i].saturating_sub(count);
        drop(s);
        self.changed.notify_all();
    }

    /// Takes up to `count` parked threads of `kind` out of the pool, once
    /// the spawner started those on their way (for a VM that failed before
    /// it used them); their threads end when the returned handles' senders
    /// are dropped.
    pub fn release(&self, kind: ThreadKind, count: usize) -> Vec<JoinHandle<Output>> {
        let i = kind as usize - 1;
        let mut s = self.lock();
        let deadline = std::time::Instant::now() + WAIT_FOR_STARTING;
        while s.starting[i] > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let n = count.min(s.parked[i].len());
        let start = s.parked[i].len() - n;
        s.parked[i]
            .drain(start..)
            .map(|p| {
                let Parked { work, thread, .. } = p;
                drop(work);
                thread
            })
            .collect()
    }

    /// A parked thread of `kind`, waiting for one the spawner is starting;
    /// None when there is none to be had.
    pub fn take(&self, kind: ThreadKind) -> Option<Parked> {
        let i = kind as usize - 1;
        let mut s = self.lock();
        loop {
            // One already in its jail if there is one, else one on its way.
            let parked = &mut s.parked[i];
            let pick = parked
                .iter()
                .rposition(|p| p.entered.load(Ordering::Acquire))
                .or(parked.len().checked_sub(1));
            if let Some(at) = pick {
                return Some(parked.swap_remove(at));
            }
            if s.starting[i] == 0 {
                return None;
            }
            let (next, timeout) = self
                .changed
                .wait_timeout(s, WAIT_FOR_STARTING)
                .unwrap_or_else(|p| p.into_inner());
            s = next;
            if timeout.timed_out() && s.parked[i].is_empty() {
                return None;
            }
        }
    }

    /// Runs on the spawner: starts one thread of `kind` and parks it at
    /// once; the thread enters its jail by itself, in parallel with the
    /// others being started, and only then reads its work.
    pub fn start_one(&self, kind: ThreadKind) {
        let parked = start_parked(kind);
        let mut s = self.lock();
        let i = kind as usize - 1;
        s.starting[i] -= 1;
        match parked {
            Ok(p) => s.parked[i].push(p),
            Err(e) => log::warn!("jail: cannot start a {} thread ahead: {e}", kind.name()),
        }
        drop(s);
        self.changed.notify_all();
    }
}

fn start_parked(kind: ThreadKind) -> std::io::Result<Parked> {
    let (work_tx, work_rx) = mpsc::sync_channel::<Work>(1);
    let entered = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&entered);
    let thread = std::thread::Builder::new()
        .name(kind.name().into())
        .spawn(move || parked_body(kind, work_rx, &flag))?;
    Ok(Parked {
        work: work_tx,
        thread,
        entered,
    })
}

fn parked_body(kind: ThreadKind, work: Receiver<Work>, flag: &AtomicBool) -> Output {
    let entered = super::enter(kind);
    flag.store(entered.is_ok(), Ordering::Release);
    // The sender goes away with the process (or a pool that is dropped):
    // then there is nothing to do.
    let work = work.recv().ok()?;
    if let Err(e) = entered {
        // The taker learns why, as from a thread started on the spot.
        let _ = work.started.send(Err(e.to_string()));
        return None;
    }
    super::run_work(kind, work)
}
