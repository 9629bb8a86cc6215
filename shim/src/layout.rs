//! Where a pod's files live on the host, and what the guest calls them.
//!
//! ```text
//! <run_dir>/pods/<pod id>/                 the pod (removed with its VM)
//! <run_dir>/pods/<pod id>/shared/          virtio-fs root = guest SHARE_MOUNT
//! <run_dir>/pods/<pod id>/shared/<cid>/rootfs     the container's rootfs mount
//! <run_dir>/pods/<pod id>/shared/<cid>/mounts/<n> the n-th OCI bind mount
//! <run_dir>/vms/vm-<shim pid>-<rand>/      the VM's sockets and console log
//! ```
//!
//! The VM directory is not under the pod: a CRI pod id is 64 characters and
//! the vsock socket path would pass the 108-byte `sun_path` limit.

use std::path::{Path, PathBuf};

use jevm_protocol::SHARE_MOUNT;

/// Checks that a containerd id can be one path component.
pub fn check_id(kind: &str, id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 255
        && id != "."
        && id != ".."
        && id.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+' | b'@' | b':')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{kind} id {id:?} cannot name a directory"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLayout {
    dir: PathBuf,
}

impl PodLayout {
    pub fn new(run_dir: &Path, pod_id: &str) -> Self {
        PodLayout {
            dir: run_dir.join("pods").join(pod_id),
        }
    }

    /// A layout for an existing pod directory (read back from a bundle).
    pub fn at(dir: PathBuf) -> Self {
        PodLayout { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory the pod's virtio-fs device serves.
    pub fn shared(&self) -> PathBuf {
        self.dir.join("shared")
    }

    pub fn container(&self, cid: &str) -> PathBuf {
        self.shared().join(cid)
    }

    pub fn rootfs(&self, cid: &str) -> PathBuf {
        self.container(cid).join("rootfs")
    }

    pub fn mounts(&self, cid: &str) -> PathBuf {
        self.container(cid).join("mounts")
    }

    pub fn mount(&self, cid: &str, n: usize) -> PathBuf {
        self.mounts(cid).join(n.to_string())
    }
}

/// Where the VMs' own directories are created.
pub fn vms_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("vms")
}

/// The guest path of a container's rootfs.
pub fn guest_rootfs(cid: &str) -> String {
    format!("{SHARE_MOUNT}/{cid}/rootfs")
}

/// The guest path of a container's n-th bind mount source.
pub fn guest_mount(cid: &str, n: usize) -> String {
    format!("{SHARE_MOUNT}/{cid}/mounts/{n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_guest_paths_match_under_the_share() {
        let l = PodLayout::new(Path::new("/run/jevm"), "pod1");
        assert_eq!(l.dir(), Path::new("/run/jevm/pods/pod1"));
        assert_eq!(l.shared(), Path::new("/run/jevm/pods/pod1/shared"));
        assert_eq!(
            l.rootfs("c1"),
            Path::new("/run/jevm/pods/pod1/shared/c1/rootfs")
        );
        assert_eq!(
            l.mount("c1", 3),
            Path::new("/run/jevm/pods/pod1/shared/c1/mounts/3")
        );
        // Same relative path on both sides of the share.
        let rel = l.rootfs("c1");
        let rel = rel.strip_prefix(l.shared()).unwrap();
        assert_eq!(
            guest_rootfs("c1"),
            format!("{SHARE_MOUNT}/{}", rel.display())
        );
        let rel = l.mount("c1", 3);
        let rel = rel.strip_prefix(l.shared()).unwrap();
        assert_eq!(
            guest_mount("c1", 3),
            format!("{SHARE_MOUNT}/{}", rel.display())
        );
        assert_eq!(vms_dir(Path::new("/run/jevm")), Path::new("/run/jevm/vms"));
    }

    #[test]
    fn ids_that_could_escape_the_pod_directory_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x", "a\0b", "sp ace"] {
            assert!(check_id("container", bad).is_err(), "{bad:?}");
        }
        for good in ["c1", "redis-1", "a.b_c", &"f".repeat(64)] {
            check_id("container", good).unwrap();
        }
    }

    #[test]
    fn vsock_socket_path_of_a_vm_fits_sun_path() {
        // vm-<pid up to 7 digits>-<8 hex>/vsock.sock_<port up to 10 digits>
        let p = vms_dir(Path::new("/run/jevm"))
            .join("vm-4194304-ffffffff")
            .join("vsock.sock_4294967295");
        assert!(p.as_os_str().len() < 108, "{}", p.display());
    }
}
