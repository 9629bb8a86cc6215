//! Guest physical memory: one memfd, mapped into the VMM and registered with
//! KVM as slot 0.
//!
//! Guest RAM lives in a memfd rather than anonymous memory so that a booted
//! VM's memory can later be saved as a template file and mapped again
//! `MAP_PRIVATE` by clones (copy-on-write).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::GuestRegionMmap;
use vm_memory::{FileOffset, GuestAddress, GuestMemory as _, GuestMemoryRegion, MmapRegion};

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
    #[error("template memory {path}: {source}")]
    Template {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("template memory {path} is {actual} bytes, the saved VM had {expected}")]
    TemplateSize {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("cannot map template memory {path}: {source}")]
    TemplateMap {
        path: PathBuf,
        source: vm_memory::mmap::FromRangesError,
    },
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

/// Maps a template's memory file copy-on-write: the clone reads the
/// template's pages (shared with every sibling through the page cache) and
/// gets a private copy of each page it writes. The file is opened read-only,
/// so no write through this mapping can ever reach it.
pub fn map_template(
    path: &Path,
    file: Option<Arc<File>>,
    expected: u64,
) -> Result<GuestRam, MemoryError> {
    let err = |source| MemoryError::Template {
        path: path.to_owned(),
        source,
    };
    let file = match file {
        Some(f) => f,
        None => Arc::new(File::open(path).map_err(err)?),
    };
    let actual = file.metadata().map_err(err)?.len();
    if actual != expected {
        return Err(MemoryError::TemplateSize {
            path: path.to_owned(),
            actual,
            expected,
        });
    }
    let map_err = |source| MemoryError::TemplateMap {
        path: path.to_owned(),
        source,
    };
    let region = MmapRegion::build(
        Some(FileOffset::from_arc(file.clone(), 0)),
        expected as usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_NORESERVE,
    )
    .map_err(|e| map_err(vm_memory::mmap::FromRangesError::MmapRegion(e)))?;
    advise_huge_pages(&region, &file);
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| map_err(vm_memory::mmap::FromRangesError::InvalidGuestRegion))?;
    let mem = GuestMemory::from_regions(vec![region]).map_err(|e| map_err(e.into()))?;
    Ok(GuestRam {
        mem,
        file,
        size: expected,
    })
}

/// Lets the kernel map the template's huge pages (a template store on a
/// tmpfs with huge pages) 2 MiB at a time in this mapping even where the
/// process has THP off (Linux 6.12 and later ask for the advice). A region
/// the clone writes still gets 4 KiB copies: no anonymous huge page is
/// ever made in a private file mapping. Best effort: without it the guest
/// runs the same, with more faults.
///
/// Only on a tmpfs: elsewhere the file has no huge pages to map, and the
/// advice costs instead (a template on ext4, Linux 6.18: a clone's
/// host-side restore 1.02-1.10 ms without it, 1.17-3.76 ms with it,
/// `jevm-bench tiny-clone` alternated).
fn advise_huge_pages(region: &MmapRegion, file: &File) {
    // SAFETY: fstatfs fills the zeroed struct it is given; the result is
    // checked.
    let on_tmpfs = unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        libc::fstatfs(file.as_raw_fd(), &mut fs) == 0 && fs.f_type == libc::TMPFS_MAGIC
    };
    if !on_tmpfs {
        return;
    }
    // SAFETY: madvise over a live mapping this region owns; the advice
    // changes no data.
    let _ = unsafe { libc::madvise(region.as_ptr().cast(), region.size(), libc::MADV_HUGEPAGE) };
}

/// Writes guest RAM to `path` as a sparse file: only the pages the guest
/// ever touched (the memfd's data extents) are copied.
pub fn save(ram: &GuestRam, path: &Path) -> std::io::Result<u64> {
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    out.set_len(ram.size)?;
    let fd = ram.file.as_raw_fd();
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    let mut pos: i64 = 0;
    let size = ram.size as i64;
    while pos < size {
        // SAFETY: lseek on a valid fd owned by `ram`; the result is checked.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `pos`
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size } else { hole.min(size) };
        let mut off = data as u64;
        while off < end as u64 {
            let n = ((end as u64 - off) as usize).min(buf.len());
            ram.file.read_exact_at(&mut buf[..n], off)?;
            out.write_all_at(&buf[..n], off)?;
            off += n as u64;
            copied += n as u64;
        }
        pos = end;
    }
    out.flush()?;
    out.sync_all()?;
    Ok(copied)
}
