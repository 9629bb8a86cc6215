//! The process's pseudo-terminal, allocated the way runc does: from the
//! container's own devpts (its `/dev/ptmx`, a link to `pts/ptmx`), once
//! the stage sees the container's mounts, so that the process finds itself
//! on the container's `/dev/pts/N`. The master goes to the agent, which
//! pumps and resizes it.

use super::errors::{io_err, os_err};
use super::sync::Sync;
use anyhow::Result;
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// Makes a new terminal's slave fds 0-2 (the process makes it its
/// controlling terminal once it is a session leader), binds it on
/// `/dev/console` when `console`, and sends the master to the agent. Call
/// with the container's root as `/`.
pub fn set_up(sync: &mut Sync, console: bool) -> Result<()> {
    let master = open(
        "/dev/ptmx",
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| os_err("terminal: open /dev/ptmx", e))?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from the pointer, which outlives
    // the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } != 0 {
        return Err(os_err("terminal: unlock the pty", Errno::last()));
    }
    let mut number: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one unsigned int into `number`, which
    // outlives the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut number) } != 0 {
        return Err(os_err("terminal: pty number", Errno::last()));
    }
    let slave_path = format!("/dev/pts/{number}");
    // The peer of this very master, whatever is at the path by now.
    // SAFETY: TIOCGPTPEER takes open flags as an integer and returns a new
    // fd that this process then owns.
    let slave = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(os_err(
            format!("terminal: open {slave_path}"),
            Errno::last(),
        ));
    }
    // SAFETY: the ioctl just returned this descriptor and nothing else owns it.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    for target in 0..3 as RawFd {
        // dup2 leaves the copies without close-on-exec: they are the
        // process's stdio.
        // SAFETY: dup2 on fds this process owns; 0-2 are replaced, not leaked.
        if unsafe { libc::dup2(slave.as_raw_fd(), target) } < 0 {
            return Err(os_err(
                format!("terminal: {slave_path} as fd {target}"),
                Errno::last(),
            ));
        }
    }
    drop(slave);
    if console {
        bind_console(&slave_path)?;
    }
    sync.send_console(master.as_fd())
}

/// Binds the terminal's slave on `/dev/console`, creating an empty file
/// there first if nothing is; something already there (a device of a
/// bind-mounted `/dev`) is never opened.
fn bind_console(slave: &str) -> Result<()> {
    let console = Path::new("/dev/console");
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(console)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("create /dev/console", &e)),
    }
    mount(
        Some(slave),
        console,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| os_err(format!("bind {slave} to /dev/console"), e))
}
