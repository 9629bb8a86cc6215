//! The per-key lock: `flock(2)` on `<root>/<key>.lock`.
//!
//! flock locks belong to the open file description, so two `File`s opened
//! separately (in one process or two) exclude each other, and a process
//! that dies releases its lock. Builders and removers hold it exclusively;
//! readers (open, get_or_create's fast path) hold it shared.
//!
//! The lock file may be unlinked, but only by an exclusive holder as the very
//! last thing it does under the lock. Everyone who locks checks afterwards
//! that the path still names the inode they locked and retries if not, so a
//! waiter that was queued on an unlinked inode cannot end up "holding" the
//! lock next to someone who locked the new file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockMode {
    Shared,
    Exclusive,
}

#[derive(Debug)]
pub(crate) struct KeyLock {
    file: File,
    path: PathBuf,
    mode: LockMode,
}

impl KeyLock {
    /// Blocks until the lock is held.
    pub fn acquire(path: &Path, mode: LockMode) -> io::Result<KeyLock> {
        Ok(Self::lock(path, mode, true)?.expect("blocking flock returned without the lock"))
    }

    /// Returns `None` if someone else holds a conflicting lock.
    pub fn try_acquire(path: &Path, mode: LockMode) -> io::Result<Option<KeyLock>> {
        Self::lock(path, mode, false)
    }

    fn lock(path: &Path, mode: LockMode, block: bool) -> io::Result<Option<KeyLock>> {
        loop {
            let file = match OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(path)
            {
                Ok(f) => f,
                // A reader without write access to the root (a non-root
                // `jevm template list`): flock works on a read-only
                // descriptor too, if the lock file exists.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EROFS)) => {
                    File::open(path).map_err(|_| e)?
                }
                Err(e) => return Err(e),
            };
            let mut op = match mode {
                LockMode::Shared => libc::LOCK_SH,
                LockMode::Exclusive => libc::LOCK_EX,
            };
            if !block {
                op |= libc::LOCK_NB;
            }
            loop {
                // SAFETY: flock on a descriptor we own, open for the duration
                // of the call; no memory is passed.
                let r = unsafe { libc::flock(file.as_raw_fd(), op) };
                if r == 0 {
                    break;
                }
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EWOULDBLOCK) if !block => return Ok(None),
                    _ => return Err(e),
                }
            }
            // Did an exclusive holder unlink (or replace) the file while we
            // waited? Then this lock protects nothing: start over.
            let locked = file.metadata()?;
            match std::fs::metadata(path) {
                Ok(now) if now.dev() == locked.dev() && now.ino() == locked.ino() => {
                    return Ok(Some(KeyLock {
                        file,
                        path: path.to_owned(),
                        mode,
                    }))
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Removes the lock file and releases the lock. Only for an exclusive
    /// holder that is done: see the module docs for why this is safe.
    pub fn unlink_and_release(self) {
        debug_assert_eq!(self.mode, LockMode::Exclusive);
        if self.mode == LockMode::Exclusive {
            if let Err(e) = std::fs::remove_file(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    log::debug!("cannot remove lock file {}: {e}", self.path.display());
                }
            }
        }
        drop(self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_lock_excludes_other_open_file_descriptions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.lock");
        let a = KeyLock::acquire(&p, LockMode::Exclusive).unwrap();
        assert!(KeyLock::try_acquire(&p, LockMode::Shared)
            .unwrap()
            .is_none());
        drop(a);
        let s1 = KeyLock::try_acquire(&p, LockMode::Shared).unwrap().unwrap();
        let s2 = KeyLock::try_acquire(&p, LockMode::Shared).unwrap().unwrap();
        assert!(KeyLock::try_acquire(&p, LockMode::Exclusive)
            .unwrap()
            .is_none());
        drop((s1, s2));
        let x = KeyLock::try_acquire(&p, LockMode::Exclusive)
            .unwrap()
            .unwrap();
        x.unlink_and_release();
        assert!(!p.exists());
    }

    #[test]
    fn waiter_on_unlinked_lock_file_retries_on_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.lock");
        let holder = KeyLock::acquire(&p, LockMode::Exclusive).unwrap();
        let p2 = p.clone();
        let waiter = std::thread::spawn(move || {
            let l = KeyLock::acquire(&p2, LockMode::Exclusive).unwrap();
            let ino = l.file.metadata().unwrap().ino();
            (ino, std::fs::metadata(&p2).unwrap().ino())
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        holder.unlink_and_release();
        let (locked, on_disk) = waiter.join().unwrap();
        assert_eq!(locked, on_disk);
    }
}
