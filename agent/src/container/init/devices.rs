//! `/dev` as runc makes it: the default character devices, the spec's
//! devices, the `/dev/fd` family of symlinks, `ptmx` pointing into the
//! container's devpts (`/dev/console` is bound to the terminal by
//! `console`).
//!
//! In a user namespace mknod(2) is refused: as runc does, each device is
//! then the guest's node of the same path bind-mounted onto an empty file
//! (its owner and mode are the guest's, seen through the namespace's
//! mapping).

use super::errors::{io_err, os_err};
use super::mounts::{ensure_dir, secure_join};
use anyhow::{bail, Result};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// (path, major, minor) of the devices every container gets, mode 0666,
/// in runc's order (which shows in the mount table when they are bound).
const DEFAULT_DEVICES: [(&str, u64, u64); 6] = [
    ("/dev/null", 1, 3),
    ("/dev/random", 1, 8),
    ("/dev/full", 1, 7),
    ("/dev/tty", 5, 0),
    ("/dev/zero", 1, 5),
    ("/dev/urandom", 1, 9),
];

pub fn populate(rootfs: &Path, spec_devices: &[LinuxDevice], bind: bool) -> Result<()> {
    for (path, major, minor) in DEFAULT_DEVICES {
        if spec_devices.iter().any(|d| d.path() == Path::new(path)) {
            continue;
        }
        if bind {
            bind_device(rootfs, Path::new(path))?;
            continue;
        }
        create_device(
            rootfs,
            Path::new(path),
            SFlag::S_IFCHR,
            major,
            minor,
            0o666,
            0,
            0,
        )?;
    }
    // /dev/ptmx is the link into devpts made below, whatever the spec says.
    for d in spec_devices
        .iter()
        .filter(|d| d.path() != Path::new("/dev/ptmx"))
    {
        if bind {
            if d.typ() == LinuxDeviceType::A {
                bail!(
                    "device {:?}: type \"a\" is not a device",
                    d.path().display().to_string()
                );
            }
            bind_device(rootfs, d.path())?;
            continue;
        }
        let kind = match d.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
            LinuxDeviceType::B => SFlag::S_IFBLK,
            LinuxDeviceType::P => SFlag::S_IFIFO,
            LinuxDeviceType::A => bail!(
                "device {:?}: type \"a\" is not a device",
                d.path().display().to_string()
            ),
        };
        create_device(
            rootfs,
            d.path(),
            kind,
            u64::try_from(d.major()).unwrap_or(0),
            u64::try_from(d.minor()).unwrap_or(0),
            d.file_mode().unwrap_or(0o666),
            d.uid().unwrap_or(0),
            d.gid().unwrap_or(0),
        )?;
    }
    for (target, link) in [
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ] {
        symlink(rootfs, target, link)?;
    }
    // runc adds this link when *its* /proc has kcore, which a host kernel
    // has; the guest kernel is built without it, so the link is made
    // regardless to give containers the /dev they get under runc.
    symlink(rootfs, "/proc/kcore", "/dev/core")?;
    // The container's own devpts instance serves its ptys.
    let ptmx = secure_join(rootfs, Path::new("/dev/ptmx"))?;
    match std::fs::remove_file(&ptmx) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove /dev/ptmx", &e)),
    }
    std::os::unix::fs::symlink("pts/ptmx", &ptmx).map_err(|e| io_err("symlink /dev/ptmx", &e))
}

#[allow(clippy::too_many_arguments)]
fn create_device(
    rootfs: &Path,
    path: &Path,
    kind: SFlag,
    major: u64,
    minor: u64,
    mode: u32,
    uid: u32,
    gid: u32,
) -> Result<()> {
    let shown = path.display().to_string();
    let dest = device_path(rootfs, path)?;
    let perm = Mode::from_bits_truncate(mode & 0o7777);
    mknod(&dest, kind, perm, makedev(major, minor))
        .map_err(|e| os_err(format!("mknod {shown:?}"), e))?;
    nix::unistd::chown(&dest, Some(uid.into()), Some(gid.into()))
        .map_err(|e| os_err(format!("chown {shown:?}"), e))
}

/// Where device `path` goes in the rootfs, its parent made and anything
/// already there removed.
fn device_path(rootfs: &Path, path: &Path) -> Result<std::path::PathBuf> {
    let shown = path.display().to_string();
    let dest = secure_join(rootfs, path)?;
    if let Some(parent) = dest.parent() {
        ensure_dir(parent).map_err(|e| io_err(format!("device {shown:?}: mkdir"), &e))?;
    }
    match std::fs::remove_file(&dest) {
        Ok(()) => Ok(dest),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(dest),
        Err(e) => Err(io_err(format!("device {shown:?}: remove"), &e)),
    }
}

/// The guest's device at `path` bound onto an empty file at the same path
/// in the rootfs.
fn bind_device(rootfs: &Path, path: &Path) -> Result<()> {
    let shown = path.display().to_string();
    let dest = device_path(rootfs, path)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(&dest)
        .map_err(|e| io_err(format!("device {shown:?}: create the mount point"), &e))?;
    mount(
        Some(path),
        &dest,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| os_err(format!("bind device {shown:?}"), e))
}

fn symlink(rootfs: &Path, target: &str, link: &str) -> Result<()> {
    let dest = secure_join(rootfs, Path::new(link))?;
    match std::os::unix::fs::symlink(target, &dest) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(format!("symlink {link}"), &e)),
    }
}
