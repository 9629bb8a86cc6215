//! What the shim leaves in a container's bundle so `shim delete` can clean
//! up after a dead shim: the shim process (and the VM in it) is gone, but
//! mounts and directories on the host are not.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::layout::PodLayout;
use crate::mounts::{remove_tree, teardown};

pub const FILE: &str = "jevm-shim.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRecord {
    pub container_id: String,
    pub pod_id: String,
    pub pod_dir: PathBuf,
    /// The VM's run directory, once the VM exists.
    pub vm_dir: Option<PathBuf>,
    /// The container's guest init PID, once created.
    pub pid: u32,
}

pub fn write(bundle: &Path, r: &BundleRecord) -> Result<(), String> {
    let path = bundle.join(FILE);
    let tmp = bundle.join(format!(".{FILE}.tmp"));
    let json = serde_json::to_vec(r).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

pub fn read(bundle: &Path) -> Option<BundleRecord> {
    let bytes = std::fs::read(bundle.join(FILE)).ok()?;
    serde_json::from_slice(&bytes)
        .inspect_err(|e| log::warn!("{}: {e}", bundle.join(FILE).display()))
        .ok()
}

pub fn remove(bundle: &Path) {
    let _ = std::fs::remove_file(bundle.join(FILE));
}

/// Cleans up what a dead shim left for container `cid` of `bundle`: its
/// mounts and directory in the pod share; and when it was the pod's last
/// container, the pod directory and the VM's run directory. Returns the
/// container's init PID (0 when unknown).
pub fn cleanup_after_dead_shim(bundle: &Path, cid: &str) -> u32 {
    let Some(r) = read(bundle) else {
        log::info!(
            "container {cid}: no {FILE} in {}; nothing to clean",
            bundle.display()
        );
        return 0;
    };
    let layout = PodLayout::at(r.pod_dir.clone());
    teardown(&layout.container(cid));
    // Other containers of the pod keep `shared/` non-empty; each of their
    // own deletes gets here too, and the last one removes the pod. (The
    // share is a mount point, bound onto itself: it is unmounted with the
    // pod, not removed here.)
    let last = match std::fs::read_dir(layout.shared()) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    };
    if last {
        teardown(layout.dir());
        if let Some(vm) = &r.vm_dir {
            if let Err(e) = remove_tree(vm) {
                log::error!("cleanup: {e}");
            }
        }
    }
    remove(bundle);
    r.pid
}

/// Removes the socket of the dead shim that served `bundle` (its
/// `address` file names it, `unix:///run/containerd/s/<hash>`): containerd
/// leaves it behind when a shim is killed, as runc's shim does. Only when
/// nothing listens on it any more: a pod's containers share one shim, and
/// containerd also runs `delete` after a failed start while the pod's shim
/// lives on.
pub fn remove_dead_socket(bundle: &Path) {
    let Ok(address) = std::fs::read_to_string(bundle.join("address")) else {
        return;
    };
    let Some(path) = address.trim().strip_prefix("unix://") else {
        return;
    };
    match std::os::unix::net::UnixStream::connect(path) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            match std::fs::remove_file(path) {
                Ok(()) => log::info!("removed the dead shim's socket {path}"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("cannot remove the dead shim's socket {path}: {e}"),
            }
        }
        _ => {}
    }
}

/// Every path under `dir` (for tests that compare what is left).
#[cfg(test)]
pub fn walk_for_tests(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                out.extend(walk_for_tests(&p));
            }
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_shim_cleanup_removes_the_container_then_the_pod_with_its_last_container() {
        let base = std::env::temp_dir().join(format!("jevm-record-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let layout = PodLayout::new(&base.join("run"), "pod");
        let vm_dir = base.join("run/vms/vm-1-2");
        // As create makes it: with root, the share is a mount point.
        if nix::unistd::geteuid().is_root() {
            crate::mounts::make_pod_dir(layout.dir(), &layout.shared()).unwrap();
        }
        for c in ["c1", "c2"] {
            std::fs::create_dir_all(layout.rootfs(c)).unwrap();
            std::fs::create_dir_all(layout.mounts(c)).unwrap();
        }
        std::fs::create_dir_all(&vm_dir).unwrap();
        std::fs::write(vm_dir.join("console.log"), b"x").unwrap();
        let bundles = [base.join("b1"), base.join("b2")];
        for (b, c) in bundles.iter().zip(["c1", "c2"]) {
            std::fs::create_dir_all(b).unwrap();
            let r = BundleRecord {
                container_id: c.into(),
                pod_id: "pod".into(),
                pod_dir: layout.dir().to_owned(),
                vm_dir: Some(vm_dir.clone()),
                pid: 7,
            };
            write(b, &r).unwrap();
            assert_eq!(read(b), Some(r));
        }
        assert_eq!(cleanup_after_dead_shim(&bundles[0], "c1"), 7);
        assert!(!layout.container("c1").exists());
        assert!(layout.container("c2").exists() && vm_dir.exists());
        assert_eq!(cleanup_after_dead_shim(&bundles[1], "c2"), 7);
        assert!(!layout.dir().exists() && !vm_dir.exists());
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert_eq!(
            crate::mounts::mounts_under(&info, &base),
            Vec::<PathBuf>::new()
        );
        assert!(!bundles[1].join(FILE).exists());
        // The dead shim's socket goes; a live one stays.
        let dead = base.join("dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
        std::fs::write(
            bundles[0].join("address"),
            format!("unix://{}\n", dead.display()),
        )
        .unwrap();
        remove_dead_socket(&bundles[0]);
        assert!(!dead.exists());
        let live = base.join("live.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
        std::fs::write(
            bundles[1].join("address"),
            format!("unix://{}", live.display()),
        )
        .unwrap();
        remove_dead_socket(&bundles[1]);
        assert!(live.exists());
        // A second delete finds nothing and does not fail.
        assert_eq!(cleanup_after_dead_shim(&bundles[1], "c2"), 0);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
