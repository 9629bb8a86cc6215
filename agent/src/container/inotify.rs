//! inotify on cgroup files: a one-shot wait ([`Inotify`]), and one thread
//! that watches a file of every container's cgroup ([`Watcher`]).
//!
//! The watcher exists for the create path of a clone. A thread of its own
//! per container cost each create a thread start, and in a clone every
//! page a new thread touches (stacks, task, TLS) is a fresh nested page
//! fault. The agent starts one watcher before the template's snapshot;
//! a create only adds a watch to it.

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, WatchDescriptor};
use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

fn annotate(e: nix::Error, what: impl std::fmt::Display) -> io::Error {
    let e = io::Error::from(e);
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// One inotify instance (nix's, with errors that name the file).
pub struct Inotify {
    inner: nix::sys::inotify::Inotify,
}

impl Inotify {
    pub fn new() -> io::Result<Inotify> {
        let inner = nix::sys::inotify::Inotify::init(InitFlags::IN_CLOEXEC)
            .map_err(|e| annotate(e, "inotify_init1"))?;
        Ok(Inotify { inner })
    }

    /// A new instance watching `path` for `mask`.
    pub fn watch(path: &Path, mask: AddWatchFlags) -> io::Result<Inotify> {
        let inotify = Inotify::new()?;
        inotify.add(path, mask)?;
        Ok(inotify)
    }

    /// Adds a watch; returns its descriptor.
    pub fn add(&self, path: &Path, mask: AddWatchFlags) -> io::Result<WatchDescriptor> {
        self.inner
            .add_watch(path, mask)
            .map_err(|e| annotate(e, format!("inotify watch {}", path.display())))
    }

    /// Removes a watch. The file may be gone already, and with it the
    /// watch (EINVAL): either way nothing is watched after.
    fn remove(&self, wd: WatchDescriptor) {
        let _ = self.inner.rm_watch(wd);
    }

    /// Waits up to `timeout` for an event and drains it; false on timeout.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut fds = [PollFd::new(self.inner.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(0) => Ok(false),
            Ok(_) => self.read().map(|_| true),
            Err(nix::Error::EINTR) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    /// Blocks for events; returns their (watch descriptor, mask) pairs.
    pub fn read(&self) -> io::Result<Vec<(WatchDescriptor, AddWatchFlags)>> {
        Ok(self
            .inner
            .read_events()?
            .into_iter()
            .map(|e| (e.wd, e.mask))
            .collect())
    }
}

type OnChange = Box<dyn FnMut() + Send + 'static>;

/// One thread calling back on changes to any number of watched files.
/// It lives as long as the process: the agent starts one.
pub struct Watcher {
    inotify: Inotify,
    /// Held while a callback runs and while a watch is added, so a change
    /// right after `inotify_add_watch` waits for its callback to be known.
    watches: Mutex<HashMap<WatchDescriptor, OnChange>>,
}

/// A file watched by a [`Watcher`]; dropping it ends the watch.
pub struct Watch {
    watcher: Arc<Watcher>,
    wd: WatchDescriptor,
}

impl Watcher {
    /// A watcher and its thread, named `name`.
    pub fn start(name: &str) -> io::Result<Arc<Watcher>> {
        let watcher = Arc::new(Watcher {
            inotify: Inotify::new()?,
            watches: Mutex::new(HashMap::new()),
        });
        let serving = Arc::clone(&watcher);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || serving.serve())?;
        Ok(watcher)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<WatchDescriptor, OnChange>> {
        self.watches.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls `on_change` (from the watcher's thread) each time `file` is
    /// modified, until the returned [`Watch`] is dropped.
    pub fn watch(self: &Arc<Self>, file: &Path, on_change: OnChange) -> io::Result<Watch> {
        let mut watches = self.lock();
        let wd = self.inotify.add(file, AddWatchFlags::IN_MODIFY)?;
        // The same inode watched twice gets the same descriptor; a second
        // watch of one file would end the first's callbacks.
        if watches.contains_key(&wd) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} is watched already", file.display()),
            ));
        }
        watches.insert(wd, on_change);
        Ok(Watch {
            watcher: Arc::clone(self),
            wd,
        })
    }

    /// Files watched now.
    #[cfg(test)]
    pub fn watching(&self) -> usize {
        self.lock().len()
    }

    fn serve(&self) {
        loop {
            let events = match self.inotify.read() {
                Ok(events) => events,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("inotify watcher: {e}; no more changes will be reported");
                    return;
                }
            };
            let mut watches = self.lock();
            for (wd, mask) in events {
                // A removed watch may still have events queued: its
                // descriptor is no longer in the table.
                if mask.contains(AddWatchFlags::IN_MODIFY) {
                    if let Some(on_change) = watches.get_mut(&wd) {
                        on_change();
                    }
                }
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut watches = self.watcher.lock();
        watches.remove(&self.wd);
        self.watcher.inotify.remove(self.wd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    fn counter() -> (Arc<AtomicUsize>, OnChange) {
        let count = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&count);
        (
            count,
            Box::new(move || {
                seen.fetch_add(1, Ordering::SeqCst);
            }),
        )
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn one_thread_reports_changes_to_each_file_until_its_watch_is_dropped() {
        let dir = std::env::temp_dir().join(format!("jevm-inotify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, "").unwrap();
        std::fs::write(&b, "").unwrap();
        let watcher = Watcher::start("test-watch").unwrap();
        let (count_a, on_a) = counter();
        let (count_b, on_b) = counter();
        let watch_a = watcher.watch(&a, on_a).unwrap();
        let watch_b = watcher.watch(&b, on_b).unwrap();
        assert_eq!(watcher.watching(), 2);
        let (_, again) = counter();
        assert!(watcher.watch(&a, again).is_err(), "a file watched twice");

        std::fs::write(&a, "1").unwrap();
        wait_for("a's change", || count_a.load(Ordering::SeqCst) >= 1);
        assert_eq!(count_b.load(Ordering::SeqCst), 0, "b did not change");

        drop(watch_a);
        assert_eq!(watcher.watching(), 1);
        let before = count_a.load(Ordering::SeqCst);
        std::fs::write(&a, "2").unwrap();
        std::fs::write(&b, "2").unwrap();
        // b's change comes after a's: once b's is seen, a's would have been.
        wait_for("b's change", || count_b.load(Ordering::SeqCst) >= 1);
        assert_eq!(
            count_a.load(Ordering::SeqCst),
            before,
            "a is no longer watched"
        );

        // A file removed while watched, then its watch dropped.
        std::fs::remove_file(&b).unwrap();
        drop(watch_b);
        assert_eq!(watcher.watching(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
