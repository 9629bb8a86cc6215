//! Which device nodes the guest may create in its share.
//!
//! A FUSE MKNOD of a character or block device becomes a real device node
//! in a host directory (a container's rootfs upper layer, a volume). The
//! guest is untrusted, so the host decides: a device node is created only
//! where the OCI spec of a container in the pod grants `m` (mknod) for it in
//! `linux.resources.devices`, the rules a runc container's device cgroup
//! enforces. The server cannot tell which container sent a request (FUSE
//! carries the guest's pid, not its cgroup), so the pod's containers'
//! grants are pooled. Whiteouts (character device 0:0, what overlayfs makes
//! for a deleted file) and FIFOs, sockets and regular files are always
//! allowed: none of them reaches a device.

use std::collections::HashMap;
use std::sync::RwLock;

use crate::vmm::devices::guest_errors::GuestErrors;

/// A device class of an OCI `LinuxDeviceCgroup` rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// `a`: both character and block devices.
    All,
    Char,
    Block,
}

/// One OCI device cgroup rule, reduced to what decides a mknod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRule {
    pub allow: bool,
    pub kind: DeviceKind,
    /// None: any.
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// The rule's access string has `m`.
    pub mknod: bool,
}

impl DeviceRule {
    fn matches(&self, kind: DeviceKind, major: u32, minor: u32) -> bool {
        (self.kind == DeviceKind::All || self.kind == kind)
            && self.major.is_none_or(|m| m == major)
            && self.minor.is_none_or(|m| m == minor)
    }
}

/// The grants of every container of one pod, by container id.
#[derive(Debug, Default)]
pub struct DeviceNodeGrants {
    by_container: RwLock<HashMap<String, Vec<DeviceRule>>>,
    refused: GuestErrors,
}

impl DeviceNodeGrants {
    /// Sets `container`'s rules (its spec's, in order), replacing any it had.
    pub fn grant(&self, container: &str, rules: Vec<DeviceRule>) {
        self.write().insert(container.to_owned(), rules);
    }

    /// Forgets `container`'s rules (it was deleted).
    pub fn revoke(&self, container: &str) {
        self.write().remove(container);
    }

    /// Whether a MKNOD with this `mode` and `rdev` (the kernel's encoding,
    /// as FUSE carries it) may create its node.
    pub fn allows_mknod(&self, mode: u32, rdev: u32) -> bool {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFCHR => DeviceKind::Char,
            libc::S_IFBLK => DeviceKind::Block,
            _ => return true,
        };
        let (major, minor) = (libc::major(rdev.into()), libc::minor(rdev.into()));
        if kind == DeviceKind::Char && major == 0 && minor == 0 {
            return true;
        }
        let by_container = self.by_container.read().unwrap_or_else(|p| p.into_inner());
        by_container
            .values()
            .any(|rules| container_allows(rules, kind, major, minor))
    }

    /// The refused MKNODs, for the rate-limited log.
    pub fn refusals(&self) -> &GuestErrors {
        &self.refused
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Vec<DeviceRule>>> {
        self.by_container.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// As a device cgroup reads an OCI rule list: the last rule that matches
/// decides; nothing matching is a denial. Rules without `m` say nothing
/// about mknod.
fn container_allows(rules: &[DeviceRule], kind: DeviceKind, major: u32, minor: u32) -> bool {
    rules
        .iter()
        .rev()
        .find(|r| r.mknod && r.matches(kind, major, minor))
        .is_some_and(|r| r.allow)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHR: u32 = libc::S_IFCHR | 0o600;
    const BLK: u32 = libc::S_IFBLK | 0o600;

    fn rdev(major: u32, minor: u32) -> u32 {
        libc::makedev(major, minor) as u32
    }

    fn rule(
        allow: bool,
        kind: DeviceKind,
        major: Option<u32>,
        minor: Option<u32>,
        access: &str,
    ) -> DeviceRule {
        DeviceRule {
            allow,
            kind,
            major,
            minor,
            mknod: access.contains('m'),
        }
    }

    /// containerd's default for an unprivileged container: deny all, then
    /// the standard /dev nodes with rwm.
    fn default_container() -> Vec<DeviceRule> {
        vec![
            rule(false, DeviceKind::All, None, None, "rwm"),
            rule(true, DeviceKind::Char, Some(1), Some(3), "rwm"),
            rule(true, DeviceKind::Char, Some(1), Some(9), "rwm"),
            rule(true, DeviceKind::Char, Some(136), None, "rwm"),
        ]
    }

    #[test]
    fn without_any_container_only_non_devices_and_whiteouts_are_created() {
        let g = DeviceNodeGrants::default();
        assert!(g.allows_mknod(libc::S_IFIFO | 0o644, 0));
        assert!(g.allows_mknod(libc::S_IFSOCK | 0o644, 0));
        assert!(g.allows_mknod(libc::S_IFREG | 0o644, 0));
        assert!(g.allows_mknod(CHR, rdev(0, 0)), "overlayfs whiteout");
        assert!(!g.allows_mknod(CHR, rdev(1, 3)));
        assert!(!g.allows_mknod(BLK, rdev(8, 0)));
    }

    #[test]
    fn an_unprivileged_container_gets_only_its_granted_nodes() {
        let g = DeviceNodeGrants::default();
        g.grant("c1", default_container());
        assert!(g.allows_mknod(CHR, rdev(1, 3)));
        assert!(g.allows_mknod(CHR, rdev(136, 7)), "any minor of 136");
        assert!(!g.allows_mknod(BLK, rdev(8, 0)), "the host's disk");
        assert!(!g.allows_mknod(CHR, rdev(1, 1)), "/dev/mem");
        assert!(!g.allows_mknod(BLK, rdev(1, 3)), "the class counts");
    }

    #[test]
    fn the_last_matching_rule_decides_and_rules_without_m_do_not_count() {
        let g = DeviceNodeGrants::default();
        g.grant(
            "c1",
            vec![
                rule(true, DeviceKind::All, None, None, "m"),
                rule(false, DeviceKind::Block, Some(8), None, "m"),
                rule(true, DeviceKind::Block, Some(8), Some(0), "rw"),
            ],
        );
        assert!(g.allows_mknod(BLK, rdev(7, 0)));
        assert!(
            !g.allows_mknod(BLK, rdev(8, 0)),
            "rw without m says nothing"
        );
        assert!(!g.allows_mknod(BLK, rdev(8, 1)));
    }

    #[test]
    fn a_privileged_container_grants_every_node_until_it_is_revoked() {
        let g = DeviceNodeGrants::default();
        g.grant("plain", default_container());
        g.grant("priv", vec![rule(true, DeviceKind::All, None, None, "rwm")]);
        assert!(g.allows_mknod(BLK, rdev(8, 0)));
        g.revoke("priv");
        assert!(!g.allows_mknod(BLK, rdev(8, 0)));
        assert!(g.allows_mknod(CHR, rdev(1, 3)));
    }

    #[test]
    fn large_majors_and_minors_decode_as_the_kernel_encodes_them() {
        let g = DeviceNodeGrants::default();
        g.grant(
            "c1",
            vec![rule(true, DeviceKind::Char, Some(511), Some(70000), "m")],
        );
        // new_encode_dev: minor's low byte, major << 8, minor's rest << 12.
        let encoded = (70000 & 0xff) | (511 << 8) | ((70000 & !0xff) << 12);
        assert_eq!(encoded, rdev(511, 70000));
        assert!(g.allows_mknod(CHR, encoded));
        assert!(!g.allows_mknod(CHR, rdev(511, 70001)));
    }
}
