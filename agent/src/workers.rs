//! Threads started ahead, in the template, and kept parked between jobs:
//! for host connections (`server`) and for exit reports
//! (`container::process`).
//!
//! Starting a thread is the slowest part of answering a clone's first
//! connection. Measured in the KVM test host: 21-40 ms from `accept`
//! returning to the new thread running, against 3-9 ms for reading and
//! applying the identity it carries. A new thread allocates its stacks
//! (user, kernel, signal), its task and TLS, and every page it touches is
//! a fresh page of the clone: each a nested page fault. A thread started
//! in the template and parked there costs the clone only a wake-up and the
//! copies of the few stack pages it writes.
//!
//! Prestarted threads are parked when the agent starts, before the
//! template's snapshot; a clone's first connections (identity, events, the
//! stdio streams opened ahead) each find one. A thread that finished its
//! job parks again while fewer than `keep` are parked, else it exits,
//! freeing its stacks. When none is parked a job gets a new thread, as
//! every connection did before: a connection is never left waiting for a
//! busy one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a thread begins: with a job, or parked (prestarted), saying so on
/// the sender when it is about to.
enum Start<J> {
    Job(J),
    Park(Sender<()>),
}

/// How long `prestart` waits for its threads to reach their park.
const PARK_WAIT: Duration = Duration::from_secs(5);

pub struct Workers<J> {
    name: &'static str,
    keep: usize,
    /// Threads parked, or committed to park, on `jobs`. `run` claims one
    /// (decrements) before it sends, so every job sent has a thread bound
    /// to receive it.
    idle: AtomicUsize,
    sender: Sender<J>,
    jobs: Mutex<Receiver<J>>,
    serve: Box<dyn Fn(J) + Send + Sync>,
}

impl<J: Send + 'static> Workers<J> {
    /// A pool whose threads run `serve` on each job; up to `keep` threads
    /// stay parked between jobs.
    pub fn new(
        name: &'static str,
        keep: usize,
        serve: impl Fn(J) + Send + Sync + 'static,
    ) -> Arc<Self> {
        let (sender, receiver) = channel();
        Arc::new(Workers {
            name,
            keep,
            idle: AtomicUsize::new(0),
            sender,
            jobs: Mutex::new(receiver),
            serve: Box::new(serve),
        })
    }

    /// Starts `n` threads that park at once (and are kept, whatever
    /// `keep` says, until they have served a job), and waits until they
    /// are about to park. In the template that is before the snapshot: a
    /// thread still starting up when the snapshot is taken would finish
    /// starting in every clone, on fresh pages.
    pub fn prestart(self: &Arc<Self>, n: usize) -> std::io::Result<()> {
        let (ready, parking) = channel();
        for _ in 0..n {
            self.idle.fetch_add(1, Ordering::SeqCst);
            if let Err(e) = self.spawn(Some(Start::Park(ready.clone()))) {
                self.idle.fetch_sub(1, Ordering::SeqCst);
                return Err(e);
            }
        }
        let deadline = Instant::now() + PARK_WAIT;
        for parked in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            if parking.recv_timeout(left).is_err() {
                log::warn!(
                    "{}: {parked} of {n} threads started ahead reached their park within {PARK_WAIT:?}",
                    self.name
                );
                break;
            }
        }
        Ok(())
    }

    /// Hands `job` to a parked thread, or to a new one when none is.
    pub fn run(self: &Arc<Self>, job: J) -> std::io::Result<()> {
        let claimed = self
            .idle
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if claimed {
            // The receiver lives as long as the pool, which `self` holds.
            let _ = self.sender.send(job);
            Ok(())
        } else {
            self.spawn(Some(Start::Job(job)))
        }
    }

    /// Threads parked now.
    #[cfg(test)]
    pub fn idle(&self) -> usize {
        self.idle.load(Ordering::SeqCst)
    }

    fn spawn(self: &Arc<Self>, start: Option<Start<J>>) -> std::io::Result<()> {
        let pool = Arc::clone(self);
        std::thread::Builder::new()
            .name(self.name.into())
            .spawn(move || pool.work(start))
            .map(drop)
    }

    fn work(&self, start: Option<Start<J>>) {
        // A prestarted thread was counted idle by `prestart`.
        let (mut job, mut counted, mut ready) = match start {
            Some(Start::Job(j)) => (Some(j), false, None),
            Some(Start::Park(ready)) => (None, true, Some(ready)),
            None => (None, true, None),
        };
        loop {
            if let Some(j) = job.take() {
                (self.serve)(j);
            }
            let parked = counted
                || self
                    .idle
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                        (n < self.keep).then_some(n + 1)
                    })
                    .is_ok();
            counted = false;
            if !parked {
                return;
            }
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
            let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            match jobs.recv() {
                Ok(j) => job = Some(j),
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::sync_channel;
    use std::time::{Duration, Instant};

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Each job reports the thread that ran it and blocks until released.
    type Job = (Sender<std::thread::ThreadId>, Receiver<()>);

    fn pool(prestart: usize, keep: usize) -> Arc<Workers<Job>> {
        let p = Workers::new("test-worker", keep, |(report, release): Job| {
            report.send(std::thread::current().id()).unwrap();
            let _ = release.recv();
        });
        p.prestart(prestart).unwrap();
        p
    }

    fn start(pool: &Arc<Workers<Job>>) -> (std::thread::ThreadId, Sender<()>) {
        let (report, ran_on) = channel();
        let (release, released) = channel();
        pool.run((report, released)).unwrap();
        let id = ran_on.recv_timeout(Duration::from_secs(10)).unwrap();
        (id, release)
    }

    #[test]
    fn prestarted_threads_park_and_serve_jobs_without_a_new_thread() {
        let p = pool(2, 2);
        wait_for("two parked threads", || p.idle() == 2);
        let (a, release_a) = start(&p);
        let (b, release_b) = start(&p);
        assert_ne!(a, b);
        assert_eq!(p.idle(), 0);
        release_a.send(()).unwrap();
        release_b.send(()).unwrap();
        wait_for("both back", || p.idle() == 2);
        // The same threads serve the next jobs.
        let (c, release_c) = start(&p);
        assert!(c == a || c == b);
        release_c.send(()).unwrap();
    }

    /// A job never waits for a busy thread: with every thread held by a
    /// long job (as a stdio stream holds its connection), the next job
    /// gets a thread of its own at once.
    #[test]
    fn a_job_gets_a_new_thread_when_every_thread_is_busy() {
        let p = pool(1, 1);
        wait_for("one parked thread", || p.idle() == 1);
        let (a, release_a) = start(&p);
        let (b, release_b) = start(&p);
        let (c, release_c) = start(&p);
        assert!(a != b && b != c && a != c);
        // Only `keep` of them park again; the others exit.
        for r in [release_a, release_b, release_c] {
            r.send(()).unwrap();
        }
        wait_for("one parked thread again", || p.idle() == 1);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(p.idle(), 1);
    }

    #[test]
    fn jobs_sent_together_are_all_served() {
        let p = Workers::new("test-worker", 2, |done: std::sync::mpsc::SyncSender<()>| {
            done.send(()).unwrap();
        });
        p.prestart(2).unwrap();
        let (done, finished) = sync_channel(64);
        for _ in 0..32 {
            p.run(done.clone()).unwrap();
        }
        for _ in 0..32 {
            finished.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        wait_for("the threads parked", || p.idle() == 2);
    }
}
