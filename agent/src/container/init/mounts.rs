//! The container's file system view: the rootfs bind-mounted onto itself,
//! the spec's mounts in order, `/dev`, `pivot_root`, then sysctls, read-only
//! and masked paths and a read-only root, as runc builds them.

use super::devices;
use super::errors::{errno_desc, io_err, os_err};
use anyhow::{bail, Result};
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::Mode;
use nix::unistd::{fchdir, pivot_root};
use oci_spec::runtime::{Mount, Spec};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

/// Flags and data of a mount, from its OCI options.
#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub flags: MsFlags,
    /// Propagation changes, applied after the mount itself.
    pub propagation: Vec<MsFlags>,
    pub data: Vec<String>,
}

impl Options {
    pub fn parse(options: &[String]) -> Options {
        let mut out = Options {
            flags: MsFlags::empty(),
            propagation: Vec::new(),
            data: Vec::new(),
        };
        for option in options {
            if let Some((set, flag)) = flag_of(option) {
                if set {
                    out.flags |= flag;
                } else {
                    out.flags &= !flag;
                }
            } else if let Some(p) = propagation_of(option) {
                out.propagation.push(p);
            } else {
                out.data.push(option.clone());
            }
        }
        out
    }

    fn data(&self) -> Option<String> {
        (!self.data.is_empty()).then(|| self.data.join(","))
    }

    fn is_bind(&self) -> bool {
        self.flags.contains(MsFlags::MS_BIND)
    }
}

/// (set?, flag) of a mount(8) flag option.
fn flag_of(option: &str) -> Option<(bool, MsFlags)> {
    use MsFlags as F;
    Some(match option {
        "acl" => (true, F::MS_POSIXACL),
        "async" => (false, F::MS_SYNCHRONOUS),
        "atime" => (false, F::MS_NOATIME),
        "bind" => (true, F::MS_BIND),
        "defaults" => (true, F::empty()),
        "dev" => (false, F::MS_NODEV),
        "diratime" => (false, F::MS_NODIRATIME),
        "dirsync" => (true, F::MS_DIRSYNC),
        "exec" => (false, F::MS_NOEXEC),
        "iversion" => (true, F::MS_I_VERSION),
        "lazytime" => (true, F::MS_LAZYTIME),
        "loud" => (false, F::MS_SILENT),
        "mand" => (true, F::MS_MANDLOCK),
        "noacl" => (false, F::MS_POSIXACL),
        "noatime" => (true, F::MS_NOATIME),
        "nodev" => (true, F::MS_NODEV),
        "nodiratime" => (true, F::MS_NODIRATIME),
        "noexec" => (true, F::MS_NOEXEC),
        "noiversion" => (false, F::MS_I_VERSION),
        "nolazytime" => (false, F::MS_LAZYTIME),
        "nomand" => (false, F::MS_MANDLOCK),
        "norelatime" => (false, F::MS_RELATIME),
        "nostrictatime" => (false, F::MS_STRICTATIME),
        "nosuid" => (true, F::MS_NOSUID),
        "rbind" => (true, F::MS_BIND.union(F::MS_REC)),
        "relatime" => (true, F::MS_RELATIME),
        "remount" => (true, F::MS_REMOUNT),
        "ro" => (true, F::MS_RDONLY),
        "rw" => (false, F::MS_RDONLY),
        "silent" => (true, F::MS_SILENT),
        "strictatime" => (true, F::MS_STRICTATIME),
        "suid" => (false, F::MS_NOSUID),
        "sync" => (true, F::MS_SYNCHRONOUS),
        _ => return None,
    })
}

fn propagation_of(option: &str) -> Option<MsFlags> {
    use MsFlags as F;
    Some(match option {
        "private" => F::MS_PRIVATE,
        "rprivate" => F::MS_PRIVATE | F::MS_REC,
        "shared" => F::MS_SHARED,
        "rshared" => F::MS_SHARED | F::MS_REC,
        "slave" => F::MS_SLAVE,
        "rslave" => F::MS_SLAVE | F::MS_REC,
        "unbindable" => F::MS_UNBINDABLE,
        "runbindable" => F::MS_UNBINDABLE | F::MS_REC,
        _ => return None,
    })
}

/// `path` (absolute or not, as the spec says) resolved inside `root`: every
/// symlink on the way is followed as if `root` were `/`, so nothing a
/// container image contains can point a mount outside its rootfs.
pub fn secure_join(root: &Path, path: &Path) -> Result<PathBuf> {
    let mut pending: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate: PathBuf = std::iter::once(root.as_os_str())
            .chain(resolved.iter().map(|p| p.as_os_str()))
            .chain(std::iter::once(part.as_os_str()))
            .collect();
        match std::fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 255 {
                    bail!("{}: too many levels of symbolic links", path.display());
                }
                let target = std::fs::read_link(&candidate)
                    .map_err(|e| io_err(format!("readlink {}", candidate.display()), &e))?;
                if target.is_absolute() {
                    resolved.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => resolved.push(part),
        }
    }
    Ok(std::iter::once(root.as_os_str())
        .chain(resolved.iter().map(|p| p.as_os_str()))
        .collect())
}

fn do_mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> nix::Result<()> {
    mount(source, target, fstype, flags, data)
}

fn mount_err(dest: &Path, typ: &str, e: Errno) -> anyhow::Error {
    anyhow::anyhow!(
        "mount {:?} (type {:?}): {}",
        dest.display().to_string(),
        typ,
        errno_desc(e)
    )
}

/// How long the parts of [`prepare_rootfs`] took, in microseconds.
#[derive(Debug, Default)]
pub struct RootfsTimes {
    pub spec_us: u64,
    pub devices_us: u64,
    pub pivot_us: u64,
}

/// Builds the container's mounts under its rootfs and pivots into it.
/// `userns`: the stage is in the container's user namespace, where device
/// nodes cannot be made (they are bound from the guest's `/dev`).
pub fn prepare_rootfs(spec: &Spec, userns: bool) -> Result<RootfsTimes> {
    let mut clock = super::Clock::start();
    let mut times = RootfsTimes::default();
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .ok_or_else(|| anyhow::anyhow!("spec has no root"))?;
    let rootfs = std::fs::canonicalize(&root)
        .map_err(|e| io_err(format!("rootfs {:?}", root.display().to_string()), &e))?;
    if !rootfs.is_dir() {
        bail!("rootfs {:?}: not a directory", rootfs.display().to_string());
    }
    learn_top_names(&rootfs);
    let linux = spec.linux().as_ref();

    // Nothing done below may propagate back to the guest's mounts.
    let propagation = match linux.and_then(|l| l.rootfs_propagation().as_deref()) {
        None | Some("") => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        Some(p) => {
            propagation_of(p).ok_or_else(|| anyhow::anyhow!("rootfsPropagation {p:?}: unknown"))?
        }
    };
    do_mount(None, Path::new("/"), None, propagation, None)
        .map_err(|e| os_err("make / private to the container", e))?;
    do_mount(
        Some(&rootfs),
        &rootfs,
        Some("bind"),
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )
    .map_err(|e| os_err(format!("bind rootfs {:?}", rootfs.display().to_string()), e))?;

    // runc creates everything world-accessible and applies the process's
    // umask only at the end.
    nix::sys::stat::umask(Mode::empty());
    let mounts = spec.mounts().as_deref().unwrap_or_default();
    for m in mounts {
        mount_one(&rootfs, m)?;
    }
    times.spec_us = clock.lap();
    let dev_bound = mounts.iter().any(|m| {
        m.destination() == Path::new("/dev")
            && Options::parse(m.options().as_deref().unwrap_or_default()).is_bind()
    });
    if !dev_bound {
        devices::populate(
            &rootfs,
            linux
                .and_then(|l| l.devices().as_deref())
                .unwrap_or_default(),
            userns,
        )?;
    }
    if let Some(process) = spec.process() {
        let cwd = secure_join(&rootfs, process.cwd())?;
        ensure_dir(&cwd).map_err(|e| {
            io_err(
                format!("mkdir cwd {:?}", process.cwd().display().to_string()),
                &e,
            )
        })?;
    }
    times.devices_us = clock.lap();
    enter_rootfs(&rootfs)?;
    times.pivot_us = clock.lap();
    Ok(times)
}

/// Reads the first batch of the rootfs's top directory and drops it: on
/// the share that is one READDIRPLUS, whose answer the kernel keeps as a
/// directory entry, with attributes, for every name in it (a page of them,
/// ~25 names: a rootfs's top directory), where the mounts and the process
/// would have looked up `proc`, `dev`, `sys`, `run`, `etc`, the working
/// directory and the command's directory one round trip each. Opening and
/// closing the directory cost two round trips more, so it pays from the
/// third name on. An error only means the names are looked up one by one.
fn learn_top_names(rootfs: &Path) {
    if let Ok(mut names) = std::fs::read_dir(rootfs) {
        let _ = names.next();
    }
}

fn mount_one(rootfs: &Path, m: &Mount) -> Result<()> {
    let dest_in = m.destination();
    let shown = dest_in.display().to_string();
    if !dest_in.is_absolute() {
        bail!("mount {shown:?}: destination must be an absolute path");
    }
    let dest = secure_join(rootfs, dest_in)?;
    let typ = m.typ().as_deref().unwrap_or("");
    let opts = Options::parse(m.options().as_deref().unwrap_or_default());
    let source = m.source().as_deref();

    if typ == "bind" || opts.is_bind() {
        let source = source
            .ok_or_else(|| anyhow::anyhow!("mount {shown:?}: bind mount without a source"))?;
        let meta = std::fs::metadata(source).map_err(|e| {
            io_err(
                format!("mount {shown:?}: source {:?}", source.display().to_string()),
                &e,
            )
        })?;
        make_target(&dest, meta.is_dir())
            .map_err(|e| io_err(format!("mount {shown:?}: mkdir"), &e))?;
        let bind_flags = opts.flags & (MsFlags::MS_BIND | MsFlags::MS_REC);
        do_mount(Some(source), &dest, Some("bind"), bind_flags, None)
            .map_err(|e| mount_err(dest_in, "bind", e))?;
        // A bind mount ignores every flag but MS_REC; they take effect on a
        // remount of it.
        let rest = opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
        if !rest.is_empty() {
            do_mount(
                None,
                &dest,
                None,
                rest | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                None,
            )
            .map_err(|e| mount_err(dest_in, "bind", e))?;
        }
    } else {
        make_target(&dest, true).map_err(|e| io_err(format!("mount {shown:?}: mkdir"), &e))?;
        let data = opts.data();
        // cgroup v1 does not exist in the guest: "cgroup" means the v2
        // hierarchy, as runc does on a unified host.
        let fstype = if typ == "cgroup" { "cgroup2" } else { typ };
        let source = source.unwrap_or(Path::new(fstype));
        let result = do_mount(
            Some(source),
            &dest,
            Some(fstype),
            opts.flags,
            data.as_deref(),
        );
        match result {
            Ok(()) => {}
            // Without namespaces of their own, sysfs, mqueue and cgroup2
            // cannot be mounted afresh: bind the guest's instead, as runc does.
            Err(Errno::EPERM | Errno::EBUSY)
                if matches!(fstype, "sysfs" | "mqueue" | "cgroup2") =>
            {
                let host = match fstype {
                    "sysfs" => "/sys",
                    "mqueue" => "/dev/mqueue",
                    _ => "/sys/fs/cgroup",
                };
                do_mount(
                    Some(Path::new(host)),
                    &dest,
                    Some("bind"),
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None,
                )
                .map_err(|e| mount_err(dest_in, typ, e))?;
                do_mount(
                    None,
                    &dest,
                    None,
                    opts.flags | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                    None,
                )
                .map_err(|e| mount_err(dest_in, typ, e))?;
            }
            Err(e) => return Err(mount_err(dest_in, typ, e)),
        }
    }
    for p in &opts.propagation {
        do_mount(None, &dest, None, *p, None).map_err(|e| mount_err(dest_in, typ, e))?;
    }
    Ok(())
}

/// Creates a mount point: a directory, or an empty file for a file bind,
/// mode 0755 as runc makes both (the stage's umask is 0 here).
fn make_target(dest: &Path, dir: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if dir {
        return ensure_dir(dest);
    }
    if let Some(parent) = dest.parent() {
        ensure_dir(parent)?;
    }
    match std::fs::symlink_metadata(dest) {
        Ok(_) => Ok(()),
        Err(_) => std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o755)
            .open(dest)
            .map(drop),
    }
}

/// `create_dir_all` with runc's mode for what it makes in a rootfs (mount
/// points, the working directory, device nodes' parents: 0755), but a
/// directory already there is only looked at. `mkdir` of an existing path
/// in the rootfs is not free: the kernel revalidates the last component
/// with `LOOKUP_EXCL`, which FUSE always answers with a LOOKUP round trip
/// to the host (every mount point and every device node's parent paid
/// one), where a `stat` is answered from the guest's cache.
pub(super) fn ensure_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        _ => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(path),
    }
}

/// Makes the rootfs the process's root: `pivot_root` as runc does, or,
/// when the current root is the initramfs (the guest's: the kernel refuses
/// to pivot it away), a move onto `/` and `chroot` as `runc --no-pivot`
/// does. `JEVM_NO_PIVOT` in the stage's environment forces the latter
/// (tests exercise it on hosts where pivoting works).
fn enter_rootfs(rootfs: &Path) -> Result<()> {
    if std::env::var_os("JEVM_NO_PIVOT").is_none() {
        match pivot(rootfs) {
            Ok(()) => return Ok(()),
            Err(Errno::EINVAL) => {}
            Err(e) => {
                return Err(os_err(
                    format!("pivot_root {:?}", rootfs.display().to_string()),
                    e,
                ))
            }
        }
    }
    move_root(rootfs)
}

/// `pivot_root` with the old root stacked under the new one, then detached:
/// no directory is needed for it inside the rootfs.
fn pivot(rootfs: &Path) -> nix::Result<()> {
    let dir_flags = OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let old = open(Path::new("/"), dir_flags, Mode::empty())?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let old = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(old) };
    nix::unistd::chdir(rootfs)?;
    pivot_root(".", ".")?;
    fchdir(old.as_raw_fd())?;
    // Slave first, so detaching the old root cannot unmount anything in
    // the guest's namespace through propagation.
    do_mount(
        None,
        Path::new("."),
        None,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None,
    )?;
    umount2(".", MntFlags::MNT_DETACH)?;
    nix::unistd::chdir("/")
}

/// The rootfs moved onto `/` and `chroot`ed into. Every other mount of this
/// namespace (the guest's /proc, /sys, /dev, the share holding the other
/// containers' rootfs...) is detached first, so that nothing but the bare
/// initramfs stays under the container's root.
fn move_root(rootfs: &Path) -> Result<()> {
    let shown = rootfs.display().to_string();
    nix::unistd::chdir(rootfs).map_err(|e| os_err(format!("chdir {shown:?}"), e))?;
    do_mount(Some(rootfs), Path::new("/"), None, MsFlags::MS_MOVE, None)
        .map_err(|e| os_err(format!("move rootfs {shown:?} onto /"), e))?;
    // Until the chroot, absolute paths still start at the old root, beneath
    // the rootfs just moved over it: they name the guest's mounts only.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| io_err("read /proc/self/mountinfo", &e))?;
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| *p != "/")
        .map(unescape_mountinfo)
        .collect();
    // Deepest first; a point already gone with its parent is EINVAL/ENOENT.
    points.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    points.dedup();
    for p in &points {
        match umount2(p.as_str(), MntFlags::MNT_DETACH) {
            Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => {}
            Err(e) => return Err(os_err(format!("detach {p:?} from the container"), e)),
        }
    }
    nix::unistd::chroot(".").map_err(|e| os_err(format!("chroot {shown:?}"), e))?;
    nix::unistd::chdir("/").map_err(|e| os_err("chdir /", e))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b));
        if bytes[i] == b'\\' && octal {
            let digit = |k: usize| u32::from(bytes[i + k] - b'0');
            out.push((digit(1) * 64 + digit(2) * 8 + digit(3)) as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// After `pivot_root`: sysctls, read-only and masked paths, read-only root.
pub fn finish_rootfs(spec: &Spec) -> Result<()> {
    let Some(linux) = spec.linux().as_ref() else {
        return Ok(());
    };
    if let Some(sysctls) = linux.sysctl() {
        for (key, value) in sysctls {
            let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
            std::fs::write(&path, value)
                .map_err(|e| io_err(format!("write sysctl {key:?}"), &e))?;
        }
    }
    for path in linux.readonly_paths().as_deref().unwrap_or_default() {
        readonly_path(Path::new(path))?;
    }
    for path in linux.masked_paths().as_deref().unwrap_or_default() {
        mask_path(Path::new(path))?;
    }
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        remount_readonly(Path::new("/"), MsFlags::empty())
            .map_err(|e| os_err("remount / read-only", e))?;
    }
    Ok(())
}

/// Remounts a bind mount read-only, keeping the flags it already has (the
/// kernel refuses to drop nosuid/nodev/noexec silently in some cases).
fn remount_readonly(path: &Path, extra: MsFlags) -> nix::Result<()> {
    let current = nix::sys::statvfs::statvfs(path)?.flags();
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | extra;
    use nix::sys::statvfs::FsFlags;
    for (st, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if current.contains(st) {
            flags |= ms;
        }
    }
    do_mount(None, path, None, flags, None)
}

fn readonly_path(path: &Path) -> Result<()> {
    let shown = path.display().to_string();
    match do_mount(
        Some(path),
        path,
        Some("bind"),
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    ) {
        Ok(()) => {}
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(os_err(format!("readonly path {shown:?}"), e)),
    }
    remount_readonly(path, MsFlags::MS_REC)
        .map_err(|e| os_err(format!("readonly path {shown:?}"), e))
}

fn mask_path(path: &Path) -> Result<()> {
    let shown = path.display().to_string();
    let null = Path::new("/dev/null");
    match do_mount(Some(null), path, Some("bind"), MsFlags::MS_BIND, None) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::ENOTDIR) => {
            // A directory: an empty read-only tmpfs hides it.
            do_mount(
                Some(Path::new("tmpfs")),
                path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None,
            )
            .map_err(|e| os_err(format!("masked path {shown:?}"), e))
        }
        Err(e) => Err(os_err(format!("masked path {shown:?}"), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> Options {
        Options::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let o = opts(&[
            "nosuid",
            "noexec",
            "newinstance",
            "ptmxmode=0666",
            "rslave",
            "ro",
        ]);
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY
        );
        assert_eq!(o.propagation, vec![MsFlags::MS_SLAVE | MsFlags::MS_REC]);
        assert_eq!(o.data(), Some("newinstance,ptmxmode=0666".to_string()));
        assert_eq!(opts(&["ro", "rw"]).flags, MsFlags::empty());
        assert!(opts(&["rbind"])
            .flags
            .contains(MsFlags::MS_BIND | MsFlags::MS_REC));
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo("/plain\\"), "/plain\\");
    }

    #[test]
    fn secure_join_keeps_symlinks_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("real/sub")).unwrap();
        std::os::unix::fs::symlink("/real", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../..", root.join("real/up")).unwrap();
        assert_eq!(
            secure_join(root, Path::new("/abs/sub")).unwrap(),
            root.join("real/sub")
        );
        assert_eq!(
            secure_join(root, Path::new("/real/up/etc")).unwrap(),
            root.join("etc")
        );
        assert_eq!(
            secure_join(root, Path::new("/../../x")).unwrap(),
            root.join("x")
        );
    }
}
