//! File-system helpers: the immutable inode flag, directory fsync, and
//! removing a tree whose files may be immutable.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `FS_IMMUTABLE_FL` from <linux/fs.h> (`chattr +i`).
pub(crate) const FS_IMMUTABLE_FL: libc::c_int = 0x0000_0010;

/// The file's inode flags (`FS_IOC_GETFLAGS`), or `None` where the file
/// system has none (tmpfs before Linux 6.0, overlayfs on some lowers, ...).
pub(crate) fn inode_flags(file: &File) -> io::Result<Option<libc::c_int>> {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int (the kernel uses `int`, whatever
    // the ioctl number's size says) through the pointer, which points to a
    // live, aligned c_int; the fd is owned by `file` and open.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    if r == 0 {
        return Ok(Some(flags));
    }
    let e = io::Error::last_os_error();
    if unsupported(&e) {
        Ok(None)
    } else {
        Err(e)
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL)
    )
}

/// Sets or clears `FS_IMMUTABLE_FL` on the file. Returns whether the flag
/// now has the wanted value. "Not supported here" (EOPNOTSUPP, ENOTTY,
/// EINVAL) and "not permitted" (EPERM: setting it needs CAP_LINUX_IMMUTABLE)
/// are not errors: the flag is an extra guard on top of mode 0444.
pub(crate) fn set_immutable(file: &File, on: bool) -> io::Result<bool> {
    let Some(flags) = inode_flags(file)? else {
        return Ok(false);
    };
    let new = if on {
        flags | FS_IMMUTABLE_FL
    } else {
        flags & !FS_IMMUTABLE_FL
    };
    if new == flags {
        return Ok(true);
    }
    // SAFETY: FS_IOC_SETFLAGS reads one int through the pointer, which points
    // to a live, aligned c_int; the fd is owned by `file` and open.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_SETFLAGS, &new) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if unsupported(&e) || e.raw_os_error() == Some(libc::EPERM) {
        log::debug!(
            "cannot {} the immutable flag: {e}",
            if on { "set" } else { "clear" }
        );
        Ok(false)
    } else {
        Err(e)
    }
}

/// Whether the file at `path` carries `FS_IMMUTABLE_FL`.
#[cfg(test)]
pub(crate) fn is_immutable(path: &Path) -> io::Result<bool> {
    let f = open_for_flags(path)?;
    Ok(inode_flags(&f)?.is_some_and(|f| f & FS_IMMUTABLE_FL != 0))
}

/// Opens a file or directory read-only without following a final symlink
/// and without blocking on FIFOs: enough for the flag ioctls and fsync.
fn open_for_flags(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

/// fsync of a directory, so renames and creations in it are durable.
pub(crate) fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Removes `path` and everything under it, clearing the immutable flag on
/// each file and directory first. A missing `path` is not an error.
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.file_type().is_symlink() {
        return std::fs::remove_file(path);
    }
    if meta.is_file() || meta.is_dir() {
        match open_for_flags(path) {
            Ok(f) => {
                if let Err(e) = set_immutable(&f, false) {
                    log::debug!("{}: cannot clear the immutable flag: {e}", path.display());
                }
            }
            Err(e) => log::debug!("{}: cannot open to clear flags: {e}", path.display()),
        }
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            remove_tree(&entry?.path())?;
        }
        std::fs::remove_dir(path)
    } else {
        std::fs::remove_file(path)
    }
}
