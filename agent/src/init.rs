//! What PID 1 sets up before anything else runs: the API file systems and
//! valid standard descriptors.

use log::error;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::mount::{mount, MsFlags};
use std::fs::OpenOptions;
use std::os::fd::{IntoRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

/// In mount order: a target's parent must already be mounted.
fn mounts() -> [Mount; 8] {
    let nosuid = MsFlags::MS_NOSUID;
    let nodev = MsFlags::MS_NODEV;
    let noexec = MsFlags::MS_NOEXEC;
    [
        Mount {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: nosuid | nodev | noexec,
            data: None,
        },
        Mount {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: nosuid | nodev | noexec,
            data: None,
        },
        Mount {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: nosuid,
            data: Some("mode=0755"),
        },
        // A private instance so container ptys never mix with the initial
        // one; since Linux 4.7 devtmpfs's /dev/ptmx resolves to pts/ptmx, so
        // no symlink is needed.
        Mount {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: nosuid | noexec,
            data: Some("newinstance,ptmxmode=0666,mode=0620"),
        },
        Mount {
            source: "shm",
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: nosuid | nodev,
            data: Some("mode=1777"),
        },
        Mount {
            source: "tmpfs",
            target: "/tmp",
            fstype: "tmpfs",
            flags: nosuid | nodev,
            data: Some("mode=1777"),
        },
        Mount {
            source: "tmpfs",
            target: "/run",
            fstype: "tmpfs",
            flags: nosuid | nodev,
            data: Some("mode=0755"),
        },
        Mount {
            source: "cgroup2",
            target: "/sys/fs/cgroup",
            fstype: "cgroup2",
            flags: nosuid | nodev | noexec,
            // Every container's stage moves itself into its cgroup (a
            // write to cgroup.procs); without it that write waits for an
            // RCU grace period each time (the kernel's default favours
            // fork and exit over moves; a VM runs few of either).
            data: Some("favordynmods"),
        },
    ]
}

/// Mounts the API file systems. A failure is logged and the rest still
/// mounted: PID 1 cannot give up, and most requests work without, say, cgroups.
pub fn mount_api_filesystems() {
    for m in mounts() {
        if let Err(e) = std::fs::create_dir_all(m.target) {
            error!("create {}: {e}", m.target);
            continue;
        }
        match mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
            // The kernel may have mounted it already (CONFIG_DEVTMPFS_MOUNT).
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => error!("mount {} on {}: {e}", m.fstype, m.target),
        }
        if m.target == "/dev" {
            ensure_std_fds();
        }
    }
}

/// Gives fds 0-2 a console (or /dev/null) if the kernel could not, because
/// the initramfs had no /dev/console. Otherwise the first sockets would get
/// those numbers and log lines written to "stderr" would land in a host
/// connection's byte stream.
pub fn ensure_std_fds() {
    let missing: Vec<RawFd> = (0..=2)
        .filter(|&fd| fcntl(fd, FcntlArg::F_GETFD) == Err(Errno::EBADF))
        .collect();
    if missing.is_empty() {
        return;
    }
    let file = ["/dev/console", "/dev/null"].iter().find_map(|path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(OFlag::O_NOCTTY.bits())
            .open(path)
            .ok()
    });
    let Some(file) = file else {
        // Nothing to log to either; the mount errors will show elsewhere.
        return;
    };
    // Kept open for good: it may itself have been given one of 0-2.
    let console = file.into_raw_fd();
    for fd in missing {
        if fd != console {
            let _ = nix::unistd::dup2(console, fd);
        }
    }
    if console > 2 {
        let _ = nix::unistd::close(console);
    }
}
