//! Direct boot of an ELF `vmlinux` through the Linux 64-bit boot protocol:
//! the kernel, initramfs, command line and zero page are written straight
//! into guest memory and the boot vCPU starts at the kernel's 64-bit entry
//! with paging on. No firmware, no real mode, no decompressor.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemory as _};

use super::devices::GuestMemory;
use super::layout::*;

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel {path}: {source}")]
    KernelOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {path} is not a loadable x86_64 ELF vmlinux: {cause}")]
    KernelFormat { path: PathBuf, cause: String },
    #[error("initramfs {path}: {source}")]
    InitrdOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory above the kernel; give the VM more memory")]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("guest memory of {mem_mib} MiB is too small for kernel {path} (it ends at {end:#x})")]
    KernelTooLarge {
        path: PathBuf,
        mem_mib: u64,
        end: u64,
    },
    #[error("cannot write boot data into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Where the boot vCPU starts.
pub struct BootEntry {
    pub entry: GuestAddress,
}

/// Loads kernel, initramfs and command line and writes the zero page,
/// page tables and GDT.
pub fn load(
    mem: &GuestMemory,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootEntry, BootError> {
    let mut kfile = File::open(kernel).map_err(|source| BootError::KernelOpen {
        path: kernel.to_owned(),
        source,
    })?;
    let loaded =
        Elf::load(mem, None, &mut kfile, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            match e {
                // linux-loader reports an image that runs past the end of guest
                // memory as a read/write failure; say what the user can change.
                linux_loader::loader::Error::Elf(
                    linux_loader::loader::elf::Error::ReadKernelImage,
                ) => BootError::KernelTooLarge {
                    path: kernel.to_owned(),
                    mem_mib: mem.last_addr().raw_value().div_ceil(1 << 20),
                    end: 0,
                },
                other => BootError::KernelFormat {
                    path: kernel.to_owned(),
                    cause: other.to_string(),
                },
            }
        })?;
    let mem_end = mem.last_addr().raw_value() + 1;
    if loaded.kernel_end >= mem_end {
        return Err(BootError::KernelTooLarge {
            path: kernel.to_owned(),
            mem_mib: mem_end >> 20,
            end: loaded.kernel_end,
        });
    }

    let mut params = boot_params::default();
    if let Some(initrd) = initrd {
        let (addr, size) = load_initrd(mem, initrd, loaded.kernel_end)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let cmd = cmdline.as_bytes();
    if cmd.len() + 1 > CMDLINE_MAX {
        return Err(BootError::Cmdline(format!(
            "{} bytes, at most {} fit",
            cmd.len(),
            CMDLINE_MAX - 1
        )));
    }
    if cmd.contains(&0) {
        return Err(BootError::Cmdline("contains a NUL byte".into()));
    }
    mem.write_slice(cmd, GuestAddress(CMDLINE_ADDR))?;
    mem.write_obj(0u8, GuestAddress(CMDLINE_ADDR + cmd.len() as u64))?;

    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmd.len() as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    add_e820(&mut params, 0, EBDA_START)?;
    add_e820(&mut params, HIMEM_START, mem_end - HIMEM_START)?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))?;

    write_page_tables(mem)?;
    write_gdt(mem)?;
    Ok(BootEntry {
        entry: loaded.kernel_load,
    })
}

fn add_e820(params: &mut boot_params, addr: u64, size: u64) -> Result<(), BootError> {
    let i = params.e820_entries as usize;
    params.e820_table[i] = boot_e820_entry {
        addr,
        size,
        type_: E820_RAM,
    };
    params.e820_entries += 1;
    Ok(())
}

/// Puts the initramfs at the top of RAM, page aligned, as bootloaders do.
fn load_initrd(mem: &GuestMemory, path: &Path, kernel_end: u64) -> Result<(u64, u64), BootError> {
    let mut f = File::open(path).map_err(|source| BootError::InitrdOpen {
        path: path.to_owned(),
        source,
    })?;
    let size = f
        .metadata()
        .map_err(|source| BootError::InitrdOpen {
            path: path.to_owned(),
            source,
        })?
        .len();
    let mem_end = mem.last_addr().raw_value() + 1;
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_owned(),
        size,
    };
    let addr = mem_end.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr <= kernel_end {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|_| BootError::InitrdOpen {
            path: path.to_owned(),
            source: std::io::Error::other("short read"),
        })?;
    Ok((addr, size))
}

/// Identity-maps the first 4 GiB with 2 MiB pages: the 64-bit entry needs
/// paging on and the kernel, zero page and command line mapped 1:1.
fn write_page_tables(mem: &GuestMemory) -> Result<(), BootError> {
    mem.write_obj(PDPT_ADDR | 0x03, GuestAddress(PML4_ADDR))?;
    for gib in 0..4u64 {
        let pd = PD_ADDR + gib * 0x1000;
        mem.write_obj(pd | 0x03, GuestAddress(PDPT_ADDR + gib * 8))?;
        for i in 0..512u64 {
            // present | writable | page size (2 MiB)
            let entry = ((gib << 30) + (i << 21)) | 0x83;
            mem.write_obj(entry, GuestAddress(pd + i * 8))?;
        }
    }
    Ok(())
}

/// GDT entries: null, 64-bit code, data, TSS (the order the selectors in
/// `vcpu.rs` assume).
pub const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn write_gdt(mem: &GuestMemory) -> Result<(), BootError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    Ok(())
}

// boot_params is plain old data from the kernel's headers.
const _: fn() = || {
    fn assert_pod<T: ByteValued>() {}
    assert_pod::<boot_params>();
};
