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

/// Tiny hand-written guests: a few bytes of 64-bit code in a minimal ELF
/// that the VMM enters exactly like a vmlinux. They run on any /dev/kvm,
/// including the PVM one here (keep them to integer code and port I/O).
pub mod tiny {
    const LOAD_ADDR: u64 = 0x100_0000;

    /// A saved VM's state with every virtio device made active, as a Linux
    /// guest's drivers leave them in a template: features VERSION_1, every
    /// queue ready (64 entries) on rings at 1 MiB and up in guest memory,
    /// positions at 0, the share mounted over virtio-fs. A tiny guest has no
    /// drivers, so its own state has them all unprobed; with this a restore
    /// starts the devices' workers (and takes over the FUSE session) as a
    /// real clone's does.
    pub fn with_devices_active(state: &jevm_runtime::vmm::VmState) -> jevm_runtime::vmm::VmState {
        let mut v = serde_json::to_value(state).expect("a VM state serialises");
        for (i, dev) in v["devices"]
            .as_array_mut()
            .expect("devices")
            .iter_mut()
            .enumerate()
        {
            let t = &mut dev["transport"];
            t["status"] = 15.into();
            t["acked_features"] = (1u64 << 32).into();
            t["activated"] = true.into();
            let queues = t["queues"].as_array_mut().expect("queues");
            for (q, queue) in queues.iter_mut().enumerate() {
                let base = 0x10_0000 + (i as u64 * 8 + q as u64) * 0x1_0000;
                queue["ready"] = true.into();
                // 64 entries, or the device's limit if lower (a driver
                // takes QueueNumMax at most).
                queue["size"] = queue["max_size"].as_u64().unwrap_or(64).min(64).into();
                queue["desc_table"] = base.into();
                queue["avail_ring"] = (base + 0x4000).into();
                queue["used_ring"] = (base + 0x8000).into();
            }
            let n = queues.len();
            dev["queues"] = (0..n)
                .map(|_| serde_json::json!({"next_avail": 0, "next_used": 0}))
                .collect();
            // virtio-fs as a real template leaves it: the guest mounted
            // the share (a 6.1 kernel's INIT, FUSE 7.38).
            if dev["device_type"] == 26 {
                dev["device"] = serde_json::json!({
                    "Fs": {"major": 7, "minor": 38, "flags": 0x3_ffff_ffffu64}
                });
            }
        }
        serde_json::from_value(v).expect("the edited state parses")
    }

    /// A one-segment ELF64 executable whose entry point is `code` at 16 MiB.
    pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(b"\x7fELF");
        e.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1
        e.extend_from_slice(&[0; 8]);
        e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
        e.extend_from_slice(&1u32.to_le_bytes());
        e.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // entry
        e.extend_from_slice(&64u64.to_le_bytes()); // phoff
        e.extend_from_slice(&0u64.to_le_bytes()); // shoff
        e.extend_from_slice(&0u32.to_le_bytes()); // flags
        e.extend_from_slice(&64u16.to_le_bytes()); // ehsize
        e.extend_from_slice(&56u16.to_le_bytes()); // phentsize
        e.extend_from_slice(&1u16.to_le_bytes()); // phnum
        e.extend_from_slice(&64u16.to_le_bytes()); // shentsize
        e.extend_from_slice(&0u16.to_le_bytes()); // shnum
        e.extend_from_slice(&0u16.to_le_bytes()); // shstrndx
        let offset = 64 + 56u64;
        e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        e.extend_from_slice(&5u32.to_le_bytes()); // R+X
        e.extend_from_slice(&offset.to_le_bytes());
        e.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // vaddr
        e.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // paddr
        e.extend_from_slice(&(code.len() as u64).to_le_bytes());
        e.extend_from_slice(&(code.len() as u64).to_le_bytes());
        e.extend_from_slice(&0x1000u64.to_le_bytes());
        e.extend_from_slice(code);
        e
    }

    /// Prints "A", spins until the byte at 0x3000 is non-zero, prints that
    /// byte, resets.
    pub const SPIN_ON_FLAG: &[u8] = &[
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'A', 0xee, // mov al,'A'; out dx,al
        0xb0, b'\n', 0xee, // mov al,'\n'; out dx,al
        0x8a, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00, // spin: mov al,[0x3000]
        0x84, 0xc0, // test al,al
        0x74, 0xf5, // jz spin
        0xee, // out dx,al
        0xb0, b'\n', 0xee, // mov al,'\n'; out dx,al
        0xb0, 0xfe, 0xe6, 0x64, // mov al,0xfe; out 0x64,al
        0xf4, // hlt
    ];
}

/// What this process holds more than `before`, waiting up to `timeout` for
/// it to settle: threads of a finished test or VM take a moment to be
/// reaped, and a thread that was exiting when `before` was taken may be gone
/// (fewer threads is not a leak). `None` when nothing leaked.
pub fn leak_since(
    before: &ProcessFootprint,
    timeout: std::time::Duration,
) -> Option<ProcessFootprint> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let now = footprint();
        let clean =
            now.fds <= before.fds && now.memfds <= before.memfds && now.threads <= before.threads;
        if clean {
            return None;
        }
        if std::time::Instant::now() >= deadline {
            return Some(now);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// `/proc/<pid>/smaps_rollup`: each field (Rss, Pss, Private_Dirty, ...)
/// in KiB.
pub fn smaps_rollup(pid: u32) -> std::io::Result<std::collections::HashMap<String, u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((
                k.trim().to_string(),
                v.trim().trim_end_matches("kB").trim().parse().ok()?,
            ))
        })
        .collect())
}

/// Running the same `ctr` commands under runc and jevm (containerd tests).
pub mod api;
/// Kubernetes' CRI against containerd's CRI plugin, pods under runc and jevm.
pub mod cri;
pub mod ctr;
