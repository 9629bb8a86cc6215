//! The cache outside the repo: input keys, a build lock, atomic publication.
//!
//! An output's path contains the key of everything it was built from, so a
//! path that exists is a finished, current build: readers never need a lock,
//! only builders do (so two of them never share a kernel tree).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Hex digits of the sha256 kept in a cache key: 64 bits, plenty for the few
/// dozen builds a cache directory will ever hold, and short enough to read.
pub const KEY_HEX_LEN: usize = 16;

/// Hashes named inputs into a cache key.
///
/// Each part is framed by its name and length so that moving bytes from one
/// input to the next ("ab"+"c" vs "a"+"bc") changes the key.
pub fn key(parts: &[(&str, &[u8])]) -> String {
    let mut h = Sha256::new();
    for (name, bytes) in parts {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    let mut s = hex(&h.finalize());
    s.truncate(KEY_HEX_LEN);
    s
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// An exclusive `flock` on a file in the cache, held until dropped.
///
/// flock (not a lock file that exists/doesn't) so that a builder killed
/// mid-build releases the lock with its file descriptor and leaves nothing
/// stale behind.
#[derive(Debug)]
pub struct Lock {
    file: File,
    path: PathBuf,
}

impl Lock {
    /// Takes the lock, waiting (and saying so on stderr) if another builder holds it.
    pub fn acquire(path: &Path) -> Result<Lock> {
        let lock = Self::open(path)?;
        if !lock.flock(libc::LOCK_EX | libc::LOCK_NB)? {
            eprintln!(
                "jevm-rootfs-builder: waiting for {} (another build is running)",
                path.display()
            );
            lock.flock(libc::LOCK_EX)?;
        }
        Ok(lock)
    }

    /// Takes the lock only if it is free right now.
    #[cfg(test)]
    pub fn try_acquire(path: &Path) -> Result<Option<Lock>> {
        let lock = Self::open(path)?;
        Ok(lock.flock(libc::LOCK_EX | libc::LOCK_NB)?.then_some(lock))
    }

    fn open(path: &Path) -> Result<Lock> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        Ok(Lock {
            file,
            path: path.to_owned(),
        })
    }

    /// Returns false if `LOCK_NB` was given and the lock is held elsewhere.
    fn flock(&self, op: libc::c_int) -> Result<bool> {
        loop {
            // SAFETY: flock only reads its two integer arguments; the fd is
            // owned by `self.file` and so stays open for the whole call.
            let rc = unsafe { libc::flock(self.file.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(true);
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) if op & libc::LOCK_NB != 0 => return Ok(false),
                _ => {
                    return Err(err).with_context(|| format!("flock {}", self.path.display()));
                }
            }
        }
    }
}

/// A temporary name beside `dest`, unique to this process, so that
/// concurrent builders never write into each other's temp files.
fn temp_path(dest: &Path) -> Result<PathBuf> {
    let name = dest
        .file_name()
        .with_context(|| format!("{} has no file name", dest.display()))?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".tmp-{}", std::process::id()));
    Ok(dest.with_file_name(tmp))
}

/// Writes `dest` so that it either does not exist or is complete: readers
/// treat existence as "built", so a half-written file must never carry the
/// final name (a crash leaves only a dot-named temp file).
pub fn publish_bytes(dest: &Path, bytes: &[u8]) -> Result<()> {
    publish_with(dest, |tmp| {
        let mut f = File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))
    })
}

/// Like [`publish_bytes`], copying from a file (vmlinux is too big to hold
/// in memory for no reason).
pub fn publish_copy(src: &Path, dest: &Path) -> Result<()> {
    publish_with(dest, |tmp| {
        fs::copy(src, tmp)
            .with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
        File::open(tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", tmp.display()))
    })
}

fn publish_with(dest: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = dest
        .parent()
        .with_context(|| format!("{} has no parent directory", dest.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = temp_path(dest)?;
    let result = write(&tmp).and_then(|()| {
        fs::rename(&tmp, dest)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    // Make the rename itself durable, or a crash could lose a published file
    // whose inputs.txt/lock suggested it was done.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

/// The cache root as an absolute path (printed paths must work from any cwd).
pub fn absolute_dir(dir: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(dir)
        .with_context(|| format!("resolving cache directory {}", dir.display()))?;
    fs::create_dir_all(&abs)
        .with_context(|| format!("creating cache directory {}", abs.display()))?;
    if !abs.is_dir() {
        bail!("cache directory {} is not a directory", abs.display());
    }
    Ok(abs)
}

#[cfg(test)]
pub(crate) fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "jevm-rootfs-builder-test-{}-{name}",
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_every_part_and_on_part_boundaries() {
        let base = key(&[("a", b"xy"), ("b", b"z")]);
        assert_eq!(base.len(), KEY_HEX_LEN);
        assert!(base.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(base, key(&[("a", b"xy"), ("b", b"z")]));
        assert_ne!(base, key(&[("a", b"x"), ("b", b"yz")]));
        assert_ne!(base, key(&[("a", b"xy"), ("b", b"Z")]));
        assert_ne!(base, key(&[("A", b"xy"), ("b", b"z")]));
    }

    #[test]
    fn lock_excludes_a_second_holder_until_dropped() {
        let dir = test_dir("lock");
        let path = dir.join("x.lock");
        let held = Lock::acquire(&path).unwrap();
        assert!(Lock::try_acquire(&path).unwrap().is_none());
        drop(held);
        assert!(Lock::try_acquire(&path).unwrap().is_some());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn publish_replaces_atomically_and_leaves_no_temp_file() {
        let dir = test_dir("publish");
        let dest = dir.join("sub").join("out.bin");
        publish_bytes(&dest, b"one").unwrap();
        publish_bytes(&dest, b"two").unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"two");
        let src = dir.join("src.bin");
        fs::write(&src, b"three").unwrap();
        publish_copy(&src, &dest).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"three");
        let names: Vec<_> = fs::read_dir(dest.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.bin")]);
        fs::remove_dir_all(dir).unwrap();
    }
}
