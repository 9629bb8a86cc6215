//! The spec's mount points that the image lacks, made in the rootfs on the
//! host before the guest needs them.
//!
//! The guest makes a missing mount point itself (`init::mounts::make_target`),
//! and in a new clone that costs it four round trips to the share: a
//! LOOKUP finding nothing, the LOOKUP the kernel repeats for a create, the
//! MKDIR (or CREATE), and the parent's attributes again; one that exists
//! costs one LOOKUP, or none when the stage's READDIRPLUS of the rootfs's
//! top directory listed it. containerd's default spec mounts a tmpfs on
//! `/run`, which many small images (busybox's among them) do not have, and
//! a volume's mount point is seldom in the image. runc makes mount points
//! the same way, in the rootfs on the host, so the snapshot keeps what it
//! would keep under runc.
//!
//! Only what the guest would certainly make the same way is made: a
//! directory for a mount that is not a bind, and for a bind a directory or
//! an empty file after its source (every bind's source is a host path the
//! share carries, so the host sees the type the guest's `stat` would),
//! with the missing directories above it; in the rootfs itself (no earlier
//! mount at or above it, no symbolic link on the way, nothing at all under
//! its name), for a container without a user namespace of its own (the
//! stage makes mount points as root of the guest, whose MKDIR the share's
//! server performs as root too; in a user namespace the owner would be the
//! mapped root). The mode is runc's, 0755 for both, which the guest asks
//! for too (under this process's umask, as the share's server in this
//! process applies it to a guest's MKDIR; a shim's is 0). Anything else,
//! or any error, is left to the guest.

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fstatat, mkdirat, Mode};
use nix::unistd::close;
use serde_json::Value;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use crate::resolve::{normal, open_plain, open_root};

/// runc's mode for every mount point it makes, file or directory.
const MODE: u32 = 0o755;

/// Makes the missing mount points of `spec` that the guest would make
/// (see the module's doc) in `rootfs`, the container's root as mounted on
/// the host; `source_is_dir` tells, for a bind's source as the spec names
/// it to the guest, whether it is a directory (None: unknown, left to the
/// guest). Returns how many files and directories it made.
pub fn make_ahead(
    spec: &Value,
    rootfs: &Path,
    source_is_dir: impl Fn(&str) -> Option<bool>,
) -> usize {
    let user_ns = spec
        .pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .is_some_and(|n| n.iter().any(|n| n.get("type") == Some(&"user".into())));
    let mounts = spec.get("mounts").and_then(Value::as_array);
    let (false, Some(mounts)) = (user_ns, mounts) else {
        return 0;
    };
    let Ok(root) = open_root(rootfs) else {
        return 0;
    };
    let mut earlier: Vec<PathBuf> = Vec::new();
    let mut made = 0;
    for m in mounts {
        let Some(dest) = m
            .get("destination")
            .and_then(Value::as_str)
            .and_then(|d| normal(Path::new(d)))
        else {
            // The guest resolves it in the rootfs, links and all: what it
            // covers, and so where later mount points lie, is not known.
            return made;
        };
        let inside_another = earlier.iter().any(|e| dest.starts_with(e));
        earlier.push(dest.clone());
        if inside_another {
            continue;
        }
        let is_dir = if is_bind(m) {
            match m
                .get("source")
                .and_then(Value::as_str)
                .and_then(&source_is_dir)
            {
                Some(dir) => dir,
                None => continue,
            }
        } else {
            true
        };
        let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
            continue;
        };
        let Some(below_root) = make_dirs(&root, parent, &mut made) else {
            continue;
        };
        let parent = below_root.as_ref().unwrap_or(&root);
        let missing = matches!(
            fstatat(Some(parent.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW),
            Err(Errno::ENOENT)
        );
        if missing && make(parent, name, is_dir).is_ok() {
            made += 1;
        }
    }
    made
}

/// Opens the directory `path` (absolute, normal) in `root`, making what is
/// missing of it as the guest's `create_dir_all` would (mode 0755 each):
/// Some(None) for `root` itself; None where a link, or anything but a
/// directory, is on the way.
fn make_dirs(root: &OwnedFd, path: &Path, made: &mut usize) -> Option<Option<OwnedFd>> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY;
    let mut dir: Option<OwnedFd> = None;
    for c in path.components() {
        let Component::Normal(name) = c else {
            continue;
        };
        let at = dir.as_ref().unwrap_or(root);
        let next = match open_plain(at, Path::new(name), flags) {
            Err(Errno::ENOENT) => {
                make(at, name, true).ok()?;
                *made += 1;
                open_plain(at, Path::new(name), flags)
            }
            other => other,
        };
        dir = Some(next.ok()?);
    }
    Some(dir)
}

/// A directory, or an empty file, `name` in `dir`, with runc's mode.
fn make(dir: &OwnedFd, name: &std::ffi::OsStr, is_dir: bool) -> nix::Result<()> {
    let mode = Mode::from_bits_truncate(MODE);
    if is_dir {
        return mkdirat(Some(dir.as_raw_fd()), name, mode);
    }
    let flags =
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    close(openat(Some(dir.as_raw_fd()), name, flags, mode)?)
}

/// As the guest's `Options::is_bind` reads a mount.
fn is_bind(m: &Value) -> bool {
    m.get("type").and_then(Value::as_str) == Some("bind")
        || m.get("options").and_then(Value::as_array).is_some_and(|o| {
            o.iter()
                .any(|o| matches!(o.as_str(), Some("bind" | "rbind")))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::fs;
    use std::os::unix::fs::{symlink, MetadataExt};

    fn tmpfs(dest: &str) -> Value {
        json!({"destination": dest, "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]})
    }

    /// No bind's source is known: as for a bind the guest's `stat` of
    /// its source would decide.
    fn unknown(_: &str) -> Option<bool> {
        None
    }

    #[test]
    fn missing_mount_points_in_the_rootfs_are_made_as_the_guest_would() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        fs::create_dir_all(r.join("proc")).unwrap();
        fs::create_dir_all(r.join("elsewhere")).unwrap();
        fs::create_dir_all(r.join("srv")).unwrap();
        symlink("/elsewhere", r.join("linked")).unwrap();
        fs::write(r.join("afile"), b"").unwrap();
        let spec = json!({
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                tmpfs("/dev"),
                tmpfs("/dev/shm"),
                tmpfs("/run"),
                tmpfs("/run/lock"),
                tmpfs("/linked/x"),
                tmpfs("/no/parent"),
                tmpfs("/afile/x"),
                tmpfs("/afile"),
                {"destination": "/data", "type": "bind", "source": "/v"},
                {"destination": "/opt", "type": "none", "source": "/v", "options": ["rbind"]},
                tmpfs("/srv/./a/../b"),
                tmpfs("/srv/c"),
            ],
        });
        let made = make_ahead(&spec, r, unknown);
        // /dev, /run, /no and /no/parent; not /dev/shm or /run/lock (in
        // the tmpfs the guest mounts first), nothing through a link, over
        // or under a file, or for a bind whose source is not known; and
        // after a path with `..` in it nothing more (the guest resolves it
        // in the rootfs).
        assert_eq!(made, 4);
        for d in ["dev", "run", "no", "no/parent"] {
            let m = fs::symlink_metadata(r.join(d)).unwrap();
            assert!(m.is_dir(), "{d}");
            assert_eq!(m.mode() & 0o7777, 0o755 & !umask(), "{d}");
        }
        for absent in [
            "dev/shm",
            "run/lock",
            "elsewhere/x",
            "data",
            "opt",
            "srv/b",
            "srv/c",
        ] {
            assert!(!r.join(absent).exists(), "{absent} was made");
        }
        assert!(fs::symlink_metadata(r.join("afile")).unwrap().is_file());
    }

    #[test]
    fn a_binds_mount_point_is_a_file_or_a_directory_after_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::write(r.join("etc/hosts"), b"kept").unwrap();
        symlink("/etc", r.join("linked")).unwrap();
        let bind = |dest: &str, source: &str| json!({"destination": dest, "type": "bind", "source": source, "options": ["rbind", "ro"]});
        let spec = json!({
            "mounts": [
                bind("/etc/hosts", "/s/file"),
                bind("/etc/hostname", "/s/file"),
                bind("/var/lib/data", "/s/dir"),
                bind("/var/lib/data/sub", "/s/dir"),
                bind("/linked/resolv.conf", "/s/file"),
                bind("/mystery", "/s/unknown"),
                bind("/dev/termination-log", "/s/file"),
                tmpfs("/dev"),
            ],
        });
        let is_dir = |source: &str| match source {
            "/s/file" => Some(false),
            "/s/dir" => Some(true),
            _ => None,
        };
        // /etc/hostname; /var, /var/lib and /var/lib/data; /dev and the
        // file in it (the tmpfs on /dev comes after it).
        assert_eq!(make_ahead(&spec, r, is_dir), 6);
        let mode = 0o755 & !umask();
        let hostname = fs::symlink_metadata(r.join("etc/hostname")).unwrap();
        assert!(hostname.is_file() && hostname.len() == 0);
        assert_eq!(hostname.mode() & 0o7777, mode);
        for d in ["var", "var/lib", "var/lib/data"] {
            let m = fs::symlink_metadata(r.join(d)).unwrap();
            assert!(m.is_dir(), "{d}");
            assert_eq!(m.mode() & 0o7777, mode, "{d}");
        }
        assert!(r.join("dev/termination-log").is_file());
        assert_eq!(fs::read(r.join("etc/hosts")).unwrap(), b"kept");
        // Inside the bind before it: the guest's to make, in the source.
        assert!(!r.join("var/lib/data/sub").exists());
        assert!(!r.join("etc/resolv.conf").exists());
        assert!(!r.join("mystery").exists());
    }

    /// This process's umask, read without changing it.
    fn umask() -> u32 {
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .unwrap();
        u32::from_str_radix(line.trim(), 8).unwrap()
    }

    #[test]
    fn a_container_with_its_own_user_namespace_is_left_to_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        let spec = json!({
            "mounts": [tmpfs("/run")],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "user"}]},
        });
        assert_eq!(make_ahead(&spec, dir.path(), unknown), 0);
        assert!(!dir.path().join("run").exists());
        let spec = json!({
            "mounts": [tmpfs("/run")],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]},
        });
        assert_eq!(make_ahead(&spec, dir.path(), unknown), 1);
        assert!(dir.path().join("run").is_dir());
    }
}
