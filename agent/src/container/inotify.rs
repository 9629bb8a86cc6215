//! inotify on cgroup files: a one-shot wait ([`Inotify`]), and one thread
//! that watches a file of every container's cgroup ([`Watcher`]).
//!
//! The watcher exists for the create path of a clone. A thread of its own
//! per container cost each create a thread start, and in a clone every
//! page a new thread touches (stacks, task, TLS) is a fresh nested page
//! fault. The agent starts one watcher before the template's snapshot;
//! a create only adds a watch to it.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

fn annotate(e: io::Error, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// One inotify instance.
pub struct Inotify {
    fd: OwnedFd,
}

impl Inotify {
    pub fn new() -> io::Result<Inotify> {
        // SAFETY: plain syscall; the result is checked below.
        let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(annotate(io::Error::last_os_error(), "inotify_init1"));
        }
        // SAFETY: `raw` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Inotify { fd })
    }

    /// A new instance watching `path` for `mask`.
    pub fn watch(path: &Path, mask: u32) -> io::Result<Inotify> {
        let inotify = Inotify::new()?;
        inotify.add(path, mask)?;
        Ok(inotify)
    }

    /// Adds a watch; returns its descriptor.
    pub fn add(&self, path: &Path, mask: u32) -> io::Result<i32> {
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
        // SAFETY: `c_path` is a valid C string alive for the call.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c_path.as_ptr(), mask) };
        if wd < 0 {
            return Err(annotate(
                io::Error::last_os_error(),
                format!("inotify watch {}", path.display()),
            ));
        }
        Ok(wd)
    }

    /// Removes a watch. The file may be gone already, and with it the
    /// watch (EINVAL): either way nothing is watched after.
    fn remove(&self, wd: i32) {
        // SAFETY: plain syscall on our descriptor; no memory is passed.
        unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
    }

    /// Waits up to `timeout` for an event and drains it; false on timeout.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd, alive for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(true)
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(false);
        }
        self.read()?;
        Ok(true)
    }

    /// Blocks for events; returns their (watch descriptor, mask) pairs.
    pub fn read(&self) -> io::Result<Vec<(i32, u32)>> {
        let mut buf = [0u8; 4096];
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        let header = std::mem::size_of::<libc::inotify_event>();
        let mut events = Vec::new();
        let mut at = 0;
        while at + header <= n {
            // SAFETY: the kernel wrote a whole inotify_event at `at`;
            // read_unaligned copes with the byte buffer's alignment.
            let event: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf.as_ptr().add(at).cast()) };
            events.push((event.wd, event.mask));
            at += header + event.len as usize;
        }
        Ok(events)
    }
}

type OnChange = Box<dyn FnMut() + Send + 'static>;

/// One thread calling back on changes to any number of watched files.
/// It lives as long as the process: the agent starts one.
pub struct Watcher {
    inotify: Inotify,
    /// Held while a callback runs and while a watch is added, so a change
    /// right after `inotify_add_watch` waits for its callback to be known.
    watches: Mutex<HashMap<i32, OnChange>>,
}

/// A file watched by a [`Watcher`]; dropping it ends the watch.
pub struct Watch {
    watcher: Arc<Watcher>,
    wd: i32,
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

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, OnChange>> {
        self.watches.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls `on_change` (from the watcher's thread) each time `file` is
    /// modified, until the returned [`Watch`] is dropped.
    pub fn watch(self: &Arc<Self>, file: &Path, on_change: OnChange) -> io::Result<Watch> {
        let mut watches = self.lock();
        let wd = self.inotify.add(file, libc::IN_MODIFY)?;
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
                if mask & libc::IN_MODIFY != 0 {
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
