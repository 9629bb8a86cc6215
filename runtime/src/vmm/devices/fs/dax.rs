//! The virtio-fs DAX window: a range of guest-physical addresses, offered
//! to the guest as the device's shared memory region 0 (the "cache"), into
//! which the device maps host files when the guest asks (FUSE
//! SETUPMAPPING) and out of which it unmaps them (REMOVEMAPPING).
//!
//! Why: without it, every file a container reads through the share is
//! copied into the guest's page cache, and in a clone each of those pages
//! is the pod's own copy of a template page (an idle busybox `sleep` pod
//! held 1.5 MiB of busybox that way, a third of its private guest memory).
//! Mapped through the window, the guest reads and writes the host's page
//! cache of the file: the pages are shared with every pod running the same
//! image layer and with the host, and a guest write is in the host file at
//! once.
//!
//! The window is one anonymous `PROT_NONE` reservation registered with KVM
//! as its own memory slot; a mapping replaces part of it (`MAP_FIXED`) with
//! the file, an unmapping puts `PROT_NONE` back, and KVM's MMU notifier
//! drops the guest's view of the old pages either way. A guest access to a
//! part that holds nothing makes `KVM_RUN` fail, which stops that VM only.
//! The window is never part of the VMM's `GuestMemory`: no device reads or
//! writes it on the guest's behalf, so a descriptor pointing into it is
//! refused like any address outside RAM, and the VMM itself never touches
//! a file the guest mapped (a host-side truncation cannot fault the VMM).
//!
//! Every request is checked before anything is mapped: page-aligned,
//! non-empty, inside the window. The file is the one the server opened for
//! the guest's handle (inside the share, read-only unless the guest asked
//! for a writable mapping and the host allows it).

use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use fuse_backend_rs::abi::virtio_fs::{RemovemappingOne, SetupmappingFlags};
use fuse_backend_rs::transport::FsCacheReqHandler;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

use crate::vmm::layout;

const PAGE: u64 = 4096;

/// The reserved host range behind the window.
#[derive(Debug)]
pub struct DaxWindow {
    host: NonNull<libc::c_void>,
    len: u64,
}

// SAFETY: the window is a plain address range; every change to it is an
// mmap(MAP_FIXED) syscall, which the kernel serialises, and nothing in the
// process dereferences it.
unsafe impl Send for DaxWindow {}
// SAFETY: as above: `&DaxWindow` only hands out the address for syscalls.
unsafe impl Sync for DaxWindow {}

impl DaxWindow {
    /// Reserves a window of `len` bytes (a multiple of the page size).
    pub fn new(len: u64) -> io::Result<DaxWindow> {
        if len == 0 || !len.is_multiple_of(PAGE) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh anonymous mapping at an address of the kernel's
        // choosing; nothing else is affected. The result is checked.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(DaxWindow {
            host: NonNull::new(host).expect("mmap returned NULL without MAP_FIXED"),
            len,
        })
    }

    /// The window's size in bytes (never 0).
    pub fn size(&self) -> u64 {
        self.len
    }

    /// Makes the window guest-physical memory at
    /// [`layout::DAX_WINDOW_BASE`], as KVM slot `slot`.
    pub fn register(&self, vm: &VmFd, slot: u32) -> io::Result<()> {
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: layout::DAX_WINDOW_BASE,
            memory_size: self.len,
            userspace_addr: self.host.as_ptr() as u64,
        };
        // SAFETY: the range is a live reservation owned by `self`, which the
        // VM keeps until after its VmFd is closed (Vm's Drop order).
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    /// The host address of window offset `moffset`, if `moffset..+len` is
    /// a non-empty, page-aligned part of the window.
    fn part(&self, moffset: u64, len: u64) -> io::Result<*mut libc::c_void> {
        let end = moffset.checked_add(len);
        if len == 0
            || !moffset.is_multiple_of(PAGE)
            || !len.is_multiple_of(PAGE)
            || end.is_none_or(|e| e > self.len)
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // In range, so the offset fits the reservation (and a usize).
        Ok(self.host.as_ptr().wrapping_byte_add(moffset as usize))
    }

    /// Maps `len` bytes of `fd` from `foffset` at window offset `moffset`.
    pub fn map(
        &self,
        fd: RawFd,
        foffset: u64,
        moffset: u64,
        len: u64,
        write: bool,
    ) -> io::Result<()> {
        let at = self.part(moffset, len)?;
        if !foffset.is_multiple_of(PAGE) || i64::try_from(foffset).is_err() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: `at..at+len` lies inside the window (checked by `part`),
        // which this process reserved and never dereferences; MAP_FIXED
        // replaces only that part. The result is checked.
        let got = unsafe {
            libc::mmap(
                at,
                len as usize,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd,
                foffset as libc::off_t,
            )
        };
        if got == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Puts the reservation back over `len` bytes at window offset `moffset`.
    pub fn unmap(&self, moffset: u64, len: u64) -> io::Result<()> {
        let at = self.part(moffset, len)?;
        // SAFETY: as in `map`: a part of the window, replaced in place.
        let got = unsafe {
            libc::mmap(
                at,
                len as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if got == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The host address of the window, for tests that look into it.
    #[cfg(test)]
    pub(crate) fn host_ptr(&self) -> *const u8 {
        self.host.as_ptr().cast()
    }
}

impl Drop for DaxWindow {
    fn drop(&mut self) {
        // SAFETY: the whole reservation, owned by `self` and unused from here.
        unsafe { libc::munmap(self.host.as_ptr(), self.len as usize) };
    }
}

/// The server's hook into the window, handed to it with each request
/// (`FsCacheReqHandler` must be `'static`, hence the `Arc`).
pub(super) struct WindowHandler(pub Arc<DaxWindow>);

impl FsCacheReqHandler for WindowHandler {
    fn map(
        &mut self,
        foffset: u64,
        moffset: u64,
        len: u64,
        flags: u64,
        fd: RawFd,
    ) -> io::Result<()> {
        let write = flags & SetupmappingFlags::WRITE.bits() != 0;
        self.0.map(fd, foffset, moffset, len, write)
    }

    /// Every range is checked before any is unmapped: a bad one fails the
    /// request and leaves the window as it was.
    fn unmap(&mut self, requests: Vec<RemovemappingOne>) -> io::Result<()> {
        for r in &requests {
            self.0.part(r.moffset, r.len)?;
        }
        for r in &requests {
            self.0.unmap(r.moffset, r.len)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    fn file(pages: usize) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        for i in 0..pages {
            f.write_all(&[b'a' + i as u8; PAGE as usize]).unwrap();
        }
        f
    }

    fn byte_at(w: &DaxWindow, off: u64) -> u8 {
        // SAFETY: tests read only parts they mapped.
        unsafe { w.host_ptr().add(off as usize).read_volatile() }
    }

    #[test]
    fn a_mapping_shows_the_file_and_a_writable_one_writes_it() {
        let w = DaxWindow::new(16 * PAGE).unwrap();
        let f = file(4);
        w.map(f.as_raw_fd(), PAGE, 2 * PAGE, 2 * PAGE, false)
            .unwrap();
        assert_eq!(byte_at(&w, 2 * PAGE), b'b');
        assert_eq!(byte_at(&w, 3 * PAGE + 7), b'c');
        w.map(f.as_raw_fd(), 0, 8 * PAGE, PAGE, true).unwrap();
        // SAFETY: mapped writable just above.
        unsafe { (w.host_ptr().add(8 * PAGE as usize) as *mut u8).write_volatile(b'Z') };
        let mut first = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut first, 0).unwrap();
        assert_eq!(
            first,
            [b'Z'],
            "a write through the window is in the file at once"
        );
        w.unmap(2 * PAGE, 2 * PAGE).unwrap();
        w.unmap(8 * PAGE, PAGE).unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let start = w.host_ptr() as u64;
        let file_maps_in_window = maps
            .lines()
            .filter(|l| {
                let range = l.split_whitespace().next().unwrap();
                let lo = u64::from_str_radix(range.split('-').next().unwrap(), 16).unwrap();
                lo >= start && lo < start + w.size() && l.split_whitespace().nth(4) != Some("0")
            })
            .count();
        assert_eq!(file_maps_in_window, 0, "unmapped parts still map the file");
    }

    #[test]
    fn requests_outside_the_window_or_unaligned_are_refused_and_change_nothing() {
        let w = Arc::new(DaxWindow::new(4 * PAGE).unwrap());
        let f = file(8);
        let fd = f.as_raw_fd();
        let einval = |r: io::Result<()>| r.unwrap_err().raw_os_error() == Some(libc::EINVAL);
        assert!(
            einval(w.map(fd, 0, 3 * PAGE, 2 * PAGE, false)),
            "past the end"
        );
        assert!(
            einval(w.map(fd, 0, u64::MAX - PAGE + 1, 2 * PAGE, false)),
            "wrapping"
        );
        assert!(
            einval(w.map(fd, 0, 1, PAGE, false)),
            "unaligned window offset"
        );
        assert!(
            einval(w.map(fd, 1, 0, PAGE, false)),
            "unaligned file offset"
        );
        assert!(einval(w.map(fd, 0, 0, 0, false)), "empty");
        assert!(
            einval(w.map(fd, 1 << 63, 0, PAGE, false)),
            "file offset beyond off_t"
        );
        assert!(einval(w.unmap(4 * PAGE, PAGE)), "unmap past the end");
        // A bad range among good ones unmaps none of them.
        w.map(fd, 0, 0, PAGE, false).unwrap();
        let batch = vec![
            RemovemappingOne {
                moffset: 0,
                len: PAGE,
            },
            RemovemappingOne {
                moffset: 4 * PAGE,
                len: PAGE,
            },
        ];
        assert!(WindowHandler(Arc::clone(&w)).unmap(batch).is_err());
        assert_eq!(byte_at(&w, 0), b'a', "the good range was unmapped anyway");
        // Read-only file, writable mapping: the host's refusal is the answer.
        let ro = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(w.map(ro.as_raw_fd(), 0, PAGE, PAGE, true).is_err());
    }
}
