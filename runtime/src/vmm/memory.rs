//! Guest physical memory: one memfd, mapped into the VMM and registered with
//! KVM as slot 0.
//!
//! Guest RAM lives in a memfd rather than anonymous memory so that a booted
//! VM's memory can later be saved as a template file and mapped again
//! `MAP_PRIVATE` by clones (copy-on-write).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemory as _, GuestMemoryRegion};

use super::devices::GuestMemory;
use super::layout;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is too small (at least {min} MiB are needed)", min = layout::MIN_MEM_MIB)]
    TooSmall(u32),
    #[error("guest memory of {0} MiB is too large (at most {max} MiB are supported)", max = layout::MAX_MEM_MIB)]
    TooLarge(u32),
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
    #[error("cannot map guest memory: {0}")]
    Map(vm_memory::mmap::FromRangesError),
    #[error("KVM refused the guest memory slot: {0}")]
    Register(kvm_ioctls::Error),
}

/// Guest RAM and the file behind it.
pub struct GuestRam {
    pub mem: GuestMemory,
    pub file: Arc<File>,
    pub size: u64,
}

/// Creates `mem_mib` MiB of guest RAM at guest physical address 0.
pub fn create(mem_mib: u32) -> Result<GuestRam, MemoryError> {
    if mem_mib < layout::MIN_MEM_MIB {
        return Err(MemoryError::TooSmall(mem_mib));
    }
    if mem_mib > layout::MAX_MEM_MIB {
        return Err(MemoryError::TooLarge(mem_mib));
    }
    let size = u64::from(mem_mib) << 20;
    let name = CString::new("jevm-guest-ram").unwrap();
    // SAFETY: memfd_create takes a valid NUL-terminated name and flags; the
    // returned fd is checked before use and owned by the File below.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a freshly created memfd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Memfd)?;
    let file = Arc::new(file);
    let mem = GuestMemory::from_ranges_with_files([(
        GuestAddress(0),
        size as usize,
        Some(FileOffset::from_arc(file.clone(), 0)),
    )])
    .map_err(MemoryError::Map)?;
    Ok(GuestRam { mem, file, size })
}

/// Registers every region of `mem` with KVM, slot numbers in order.
pub fn register(vm: &VmFd, mem: &GuestMemory) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region.as_ptr() as u64;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by
        // `mem`, which the VM (and so KVM's use of it) never outlives: the Vm
        // struct drops its VmFd before its guest memory.
        unsafe { vm.set_user_memory_region(desc) }.map_err(MemoryError::Register)?;
    }
    Ok(())
}
