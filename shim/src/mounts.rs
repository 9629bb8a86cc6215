//! Host-side mounts of a pod's share: container rootfs and OCI bind
//! mounts, and taking them all down again.
//!
//! Removal never crosses a mount point: a bind mount of a user's directory
//! left mounted by mistake must not have its files deleted with the pod.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use containerd_shim_protos::api::Mount;
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::spec::HostBind;

/// Makes the pod's directory and its share. The pod directory is 0700, so
/// no one but root on the host reaches what the guest writes; the share is
/// bound onto itself `nosuid,nodev`, so a set-uid file or a device node the
/// guest creates there is inert on the host (the mounts later placed inside
/// it are sealed the same way, see [`seal`]).
pub fn make_pod_dir(pod_dir: &Path, share: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    let fail = |what: &Path, e: String| format!("{}: {e}", what.display());
    if let Some(parent) = pod_dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| fail(parent, cause(&e)))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(pod_dir)
        .map_err(|e| fail(pod_dir, cause(&e)))?;
    std::fs::create_dir(share).map_err(|e| fail(share, cause(&e)))?;
    mount(
        Some(share),
        share,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| fail(share, format!("binding onto itself: {}", errno_text(e))))?;
    seal(share)
}

/// Remounts every mount at or under `target` `nosuid,nodev`, keeping the
/// flags it had (read-only, noexec...). A recursive bind carries the
/// source's submounts, each with its own flags: each is sealed.
pub fn seal(target: &Path) -> Result<(), String> {
    use nix::sys::statvfs::{statvfs, FsFlags};
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    for point in mounts_under(&info, target) {
        let have = statvfs(&point)
            .map_err(|e| format!("{}: statvfs: {}", point.display(), errno_text(e)))?
            .flags();
        let mut flags =
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        for (st, ms) in [
            (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        ] {
            if have.contains(st) {
                flags |= ms;
            }
        }
        mount(None::<&str>, &point, None::<&str>, flags, None::<&str>).map_err(|e| {
            format!(
                "{}: remounting nosuid,nodev: {}",
                point.display(),
                errno_text(e)
            )
        })?;
    }
    Ok(())
}

/// Mounts containerd's rootfs mounts (usually one overlay) on `target`, in
/// order, as runc's shim does on `bundle/rootfs`.
pub fn mount_rootfs(cid: &str, mounts: &[Mount], target: &Path) -> Result<(), String> {
    for m in mounts {
        let (ty, src, opts) = (m.type_.clone(), m.source.clone(), m.options.clone());
        let t = target.to_owned();
        // The crate's helper may unshare(CLONE_FS) and chdir (long overlay
        // lowerdirs); a thread of its own keeps that away from the runtime's
        // threads.
        let r = std::thread::scope(|s| {
            s.spawn(|| {
                containerd_shim::mount::mount_rootfs(
                    Some(ty.as_str()).filter(|t| !t.is_empty()),
                    Some(src.as_str()).filter(|s| !s.is_empty()),
                    &opts,
                    &t,
                )
            })
            .join()
        });
        let r = r.map_err(|_| format!("container {cid:?}: rootfs mount thread panicked"))?;
        r.map_err(|e| {
            format!(
                "container {cid:?}: rootfs mount (type {:?}, source {:?}) on {}: {e}",
                m.type_,
                m.source,
                target.display()
            )
        })?;
    }
    Ok(())
}

/// Binds a host directory as the rootfs (a bundle without rootfs mounts:
/// the spec's `root.path` names a prepared directory).
pub fn bind_rootfs_dir(cid: &str, source: &Path, target: &Path) -> Result<(), String> {
    let md = std::fs::metadata(source).map_err(|e| {
        format!(
            "container {cid:?}: rootfs {}: {}",
            source.display(),
            cause(&e)
        )
    })?;
    if !md.is_dir() {
        return Err(format!(
            "container {cid:?}: rootfs {}: not a directory",
            source.display()
        ));
    }
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| {
        format!(
            "container {cid:?}: binding rootfs {}: {}",
            source.display(),
            errno_text(e)
        )
    })
}

/// Binds `b.source` on `target` (created as an empty file or directory
/// matching the source), read-only when the spec says so; tells whether
/// the source is a directory.
pub fn bind(cid: &str, b: &HostBind, target: &Path) -> Result<bool, String> {
    let what = || {
        format!(
            "container {cid:?}: bind mount source {}",
            b.source.display()
        )
    };
    let md = std::fs::metadata(&b.source).map_err(|e| format!("{}: {}", what(), cause(&e)))?;
    let created = if md.is_dir() {
        std::fs::create_dir(target)
    } else {
        std::fs::File::create(target).map(drop)
    };
    created.map_err(|e| format!("{}: creating {}: {}", what(), target.display(), cause(&e)))?;
    let mut flags = MsFlags::MS_BIND;
    if b.recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(Some(&b.source), target, None::<&str>, flags, None::<&str>)
        .map_err(|e| format!("{}: {}", what(), errno_text(e)))?;
    if b.readonly {
        let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount(None::<&str>, target, None::<&str>, ro, None::<&str>) {
            let _ = umount2(target, MntFlags::MNT_DETACH);
            return Err(format!(
                "{}: remounting read-only: {}",
                what(),
                errno_text(e)
            ));
        }
    }
    Ok(md.is_dir())
}

fn cause(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => errno_text(Errno::from_raw(n)),
        None => e.to_string(),
    }
}

/// An errno's text the way runc (Go) prints it, lower-case first: users
/// and scripts see the same words from either runtime.
pub fn errno_text(e: Errno) -> String {
    let desc = e.desc();
    let mut chars = desc.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => format!("errno {}", e as i32),
    }
}

/// Mount points at or under `prefix`, deepest first, from a mountinfo text.
pub fn mounts_under(mountinfo: &str, prefix: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|p| p.starts_with(prefix))
        .collect();
    // Longest first: children before parents; stacked mounts repeat.
    v.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    v
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Unmounts everything at or under `prefix` (lazily when busy: the VM's
/// virtio-fs server may still hold files open).
pub fn unmount_all(prefix: &Path) -> Result<(), String> {
    for _ in 0..8 {
        let info = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
        let points = mounts_under(&info, prefix);
        if points.is_empty() {
            return Ok(());
        }
        for p in points {
            match umount2(&p, MntFlags::empty()) {
                Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
                Err(Errno::EBUSY) => {
                    if let Err(e) = umount2(&p, MntFlags::MNT_DETACH) {
                        log::warn!("unmounting {} (detached): {}", p.display(), errno_text(e));
                    }
                }
                Err(e) => log::warn!("unmounting {}: {}", p.display(), errno_text(e)),
            }
        }
    }
    Err(format!("mounts remain under {}", prefix.display()))
}

/// Removes `path` and everything below it that is on the same file system;
/// refuses (and keeps) anything on another one.
pub fn remove_tree(path: &Path) -> Result<(), String> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    remove_same_dev(path, md.dev())
}

fn remove_same_dev(path: &Path, dev: u64) -> Result<(), String> {
    let md = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if md.dev() != dev {
        return Err(format!(
            "{}: still a mount point, not removed",
            path.display()
        ));
    }
    if md.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for e in entries {
            let e = e.map_err(|e| format!("{}: {e}", path.display()))?;
            remove_same_dev(&e.path(), dev)?;
        }
        std::fs::remove_dir(path).map_err(|e| format!("{}: {e}", path.display()))
    } else {
        std::fs::remove_file(path).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Unmounts and removes a directory tree; errors are logged, not returned:
/// cleanup goes on with the next thing.
pub fn teardown(path: &Path) -> bool {
    let mut ok = true;
    if let Err(e) = unmount_all(path) {
        log::error!("cleanup: {e}");
        ok = false;
    }
    if let Err(e) = remove_tree(path) {
        log::error!("cleanup: {e}");
        ok = false;
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
90 27 0:50 / /run/jevm/pods/p1/shared/c1/rootfs rw - overlay overlay rw,lowerdir=/a
91 90 0:51 / /run/jevm/pods/p1/shared/c1/mounts/0 ro - ext4 /dev/sda1 rw
92 27 0:52 / /run/jevm/pods/p10/shared/c1/rootfs rw - overlay overlay rw
93 27 0:53 / /run/jevm/pods/p1/shared/c\\0402/rootfs rw - overlay overlay rw
";

    #[test]
    fn mounts_under_a_pod_deepest_first_and_not_its_neighbours() {
        let v = mounts_under(INFO, Path::new("/run/jevm/pods/p1"));
        assert_eq!(
            v,
            vec![
                PathBuf::from("/run/jevm/pods/p1/shared/c1/mounts/0"),
                PathBuf::from("/run/jevm/pods/p1/shared/c 2/rootfs"),
                PathBuf::from("/run/jevm/pods/p1/shared/c1/rootfs"),
            ]
        );
    }

    #[test]
    fn remove_tree_removes_a_plain_tree_and_tolerates_absence() {
        let d = std::env::temp_dir().join(format!("jevm-rm-test-{}", std::process::id()));
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/b/f"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc", d.join("a/link")).unwrap();
        remove_tree(&d).unwrap();
        assert!(!d.exists());
        assert!(Path::new("/etc").exists());
        remove_tree(&d).unwrap();
    }

    /// A pod directory as create makes it, a read-only recursive bind with
    /// a submount inside its share: everything under the share is nosuid,
    /// nodev, read-only stays read-only, and teardown leaves nothing.
    #[test]
    fn the_share_and_every_mount_in_it_are_nosuid_nodev() {
        use nix::sys::statvfs::{statvfs, FsFlags};
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            crate::test_skip::skipped("needs root to mount");
            return;
        }
        let scratch = tempfile::tempdir().unwrap();
        let pod = scratch.path().join("pods/p1");
        let share = pod.join("shared");
        make_pod_dir(&pod, &share).unwrap();
        let mode = std::fs::metadata(&pod).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "pod directory mode {mode:o}");

        // A host volume with a tmpfs inside: the recursive bind brings it.
        let volume = scratch.path().join("volume");
        std::fs::create_dir_all(volume.join("sub")).unwrap();
        mount(
            Some("tmpfs"),
            &volume.join("sub"),
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        let c1 = share.join("c1");
        std::fs::create_dir_all(c1.join("mounts")).unwrap();
        let b = HostBind {
            index: 0,
            source: volume.clone(),
            readonly: true,
            recursive: true,
        };
        let target = c1.join("mounts/0");
        bind("c1", &b, &target).unwrap();
        seal(&c1).unwrap();

        let flags = |p: &Path| statvfs(p).unwrap().flags();
        for p in [share.clone(), target.clone(), target.join("sub")] {
            let f = flags(&p);
            assert!(
                f.contains(FsFlags::ST_NOSUID | FsFlags::ST_NODEV),
                "{}: {f:?}",
                p.display()
            );
        }
        assert!(flags(&target).contains(FsFlags::ST_RDONLY));
        assert!(
            !flags(&volume.join("sub")).contains(FsFlags::ST_NOSUID),
            "sealing the share changed the host's own mount"
        );

        assert!(teardown(&pod));
        assert!(!pod.exists());
        umount2(&volume.join("sub"), MntFlags::MNT_DETACH).unwrap();
    }
}
