//! Helpers shared by the end-to-end tests and the benchmark: where the
//! guest kernel and initramfs are, and how to see what a test left behind.

use std::path::PathBuf;

/// Guest kernel and initramfs from the environment (`make test` sets them
/// from rootfs-builder's output). Missing variables are a test failure with
/// a message, never a silent skip.
pub fn guest_artifacts() -> (PathBuf, PathBuf) {
    let get = |name: &str| {
        let v = std::env::var_os(name).unwrap_or_else(|| {
            panic!("{name} is not set: run the guest tests through `make test` (it builds the guest kernel and initramfs and sets JEVM_KERNEL/JEVM_INITRD)")
        });
        let p = PathBuf::from(v);
        assert!(p.is_file(), "{name}={} does not exist", p.display());
        p
    };
    (get("JEVM_KERNEL"), get("JEVM_INITRD"))
}

/// What this process holds that a VM could leak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessFootprint {
    pub threads: usize,
    pub fds: usize,
    pub memfds: usize,
}

pub fn footprint() -> ProcessFootprint {
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0);
    let mut fds = 0;
    let mut memfds = 0;
    if let Ok(d) = std::fs::read_dir("/proc/self/fd") {
        for e in d.flatten() {
            fds += 1;
            if let Ok(target) = std::fs::read_link(e.path()) {
                if target.to_string_lossy().starts_with("/memfd:") {
                    memfds += 1;
                }
            }
        }
    }
    ProcessFootprint {
        threads,
        fds,
        memfds,
    }
}

/// Writes a gzip-free newc cpio holding the given (path, mode, contents)
/// files: enough to build broken initramfs images for failure tests.
pub fn newc_cpio(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let hdr = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0, 0, 1, 0, data.len(), 0, 0, 0, 0, name.len() + 1, 0
        );
        out.extend_from_slice(hdr.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    for (i, (name, mode, data)) in files.iter().enumerate() {
        entry(&mut out, i as u32 + 1, name, *mode, data);
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}
