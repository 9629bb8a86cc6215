//! Where things live in guest physical memory and in the I/O spaces.
//!
//! Low memory follows the Linux x86 boot conventions (zero page, command
//! line, MP table below the EBDA); virtio-mmio devices sit in a window above
//! RAM, which is why guest RAM is capped below it.

/// GDT for the 64-bit entry.
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const IDT_ADDR: u64 = 0x520;
/// The Linux "zero page" (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, one PDPT, four page directories.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// Start of the Extended BIOS Data Area; the MP table goes here and the RAM
/// map leaves [EBDA_START, 1 MiB) out so the kernel keeps its hands off it.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory: the kernel must load above this.
pub const HIMEM_START: u64 = 0x10_0000;

/// virtio-mmio devices: one 4 KiB window each, from here up.
pub const MMIO_BASE: u64 = 0xd000_0000;
pub const MMIO_SIZE: u64 = 0x1000;
/// Local APIC and IO-APIC addresses (what the MP table announces).
pub const APIC_ADDR: u32 = 0xfee0_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// TSS area KVM needs on Intel (three pages below the IO-APIC).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// First GSI handed to virtio devices (0-4 are the PIT, keyboard, cascade,
/// COM2 and COM1 of the ISA world).
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// IO-APIC pins.
pub const IOAPIC_PINS: u32 = 24;

/// Smallest guest RAM we accept: the kernel, its initramfs and a little room.
pub const MIN_MEM_MIB: u32 = 32;
/// Largest guest RAM that fits below the MMIO window without a second slot.
pub const MAX_MEM_MIB: u32 = 3072;

/// Where the virtio-fs DAX window (devices/fs/dax.rs) sits in guest-physical
/// memory: above 4 GiB, clear of RAM (capped below the MMIO window) and of
/// every MMIO address; 128 MiB-aligned, as the guest's memory hotplug wants
/// for the struct pages it makes for the window.
pub const DAX_WINDOW_BASE: u64 = 1 << 32;
/// The window's size: room for 128 of the guest's 2 MiB mapping ranges (it
/// recycles the least recently used when they run out). The guest spends
/// 64 bytes of its RAM per 4 KiB of window on struct pages (4 MiB here),
/// written once in the template and shared by its clones.
pub const DAX_WINDOW_SIZE: u64 = 256 << 20;
/// Its KVM memory slot; guest RAM is always the one slot 0.
pub const DAX_WINDOW_SLOT: u32 = 1;

/// Virtio device `index`'s MMIO base and GSI.
pub fn virtio_slot(index: u32) -> (u64, u32) {
    (
        MMIO_BASE + u64::from(index) * MMIO_SIZE,
        VIRTIO_FIRST_GSI + index,
    )
}
