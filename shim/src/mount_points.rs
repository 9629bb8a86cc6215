//! The spec's mount points that the image lacks, made in the rootfs on the
//! host before the guest needs them.
//!
//! The guest makes a missing mount point itself (`init::mounts::make_target`),
//! and in a new clone that costs it four round trips to the share: a
//! LOOKUP finding nothing, the LOOKUP the kernel repeats for a create, the
//! MKDIR, and the parent's attributes again; one that exists costs one
//! LOOKUP. containerd's default spec mounts a tmpfs on `/run`, which many
//! small images (busybox's among them) do not have. runc makes mount
//! points the same way, in the rootfs on the host, so the snapshot keeps
//! what it would keep under runc.
//!
//! Only what the guest would certainly make the same way is made: a
//! directory for a mount that is not a bind (a bind's point is a file or a
//! directory after its source, which the guest sees), directly in the
//! rootfs (no earlier mount at or above it, its parent there with no
//! symbolic link on the way, nothing at all under its name), by a
//! container without a user namespace of its own (the stage makes mount
//! points as root of the guest, whose MKDIR the share's server performs
//! as root too; in a user namespace the owner would be the mapped root).
//! The mode is runc's, 0755, which the guest asks for too (under this
//! process's umask, as the share's server in this process applies it to a
//! guest's MKDIR; a shim's is 0). Anything else, or any error, is left to
//! the guest.

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstatat, mkdirat, Mode};
use serde_json::Value;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::resolve::{normal, open_plain, open_root};

/// Makes the missing mount points of `spec` that the guest would make
/// (see the module's doc) in `rootfs`, the container's root as mounted on
/// the host; returns how many.
pub fn make_ahead(spec: &Value, rootfs: &Path) -> usize {
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
        if inside_another || is_bind(m) {
            continue;
        }
        let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
            continue;
        };
        let Ok(dir) = open_plain(&root, parent, OFlag::O_PATH | OFlag::O_DIRECTORY) else {
            continue;
        };
        let missing = matches!(
            fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW),
            Err(Errno::ENOENT)
        );
        if missing && mkdirat(Some(dir.as_raw_fd()), name, Mode::from_bits_truncate(0o755)).is_ok()
        {
            made += 1;
        }
    }
    made
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

    #[test]
    fn missing_mount_points_directly_in_the_rootfs_are_made_as_the_guest_would() {
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
                tmpfs("/afile"),
                {"destination": "/data", "type": "bind", "source": "/v"},
                {"destination": "/opt", "type": "none", "source": "/v", "options": ["rbind"]},
                tmpfs("/srv/./a/../b"),
                tmpfs("/srv/c"),
            ],
        });
        let made = make_ahead(&spec, r);
        // /dev and /run; not /dev/shm or /run/lock (in the tmpfs the guest
        // mounts first), nothing through a link, under a missing parent,
        // over a file or for a bind; and after a path with `..` in it
        // nothing more (the guest resolves it in the rootfs).
        assert_eq!(made, 2);
        for d in ["dev", "run"] {
            let m = fs::symlink_metadata(r.join(d)).unwrap();
            assert!(m.is_dir(), "{d}");
            assert_eq!(m.mode() & 0o7777, 0o755 & !umask(), "{d}");
        }
        for absent in [
            "dev/shm",
            "run/lock",
            "elsewhere/x",
            "no",
            "data",
            "opt",
            "srv/b",
            "srv/c",
        ] {
            assert!(!r.join(absent).exists(), "{absent} was made");
        }
        assert!(fs::symlink_metadata(r.join("afile")).unwrap().is_file());
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
        assert_eq!(make_ahead(&spec, dir.path()), 0);
        assert!(!dir.path().join("run").exists());
        let spec = json!({
            "mounts": [tmpfs("/run")],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]},
        });
        assert_eq!(make_ahead(&spec, dir.path()), 1);
        assert!(dir.path().join("run").is_dir());
    }
}
