//! A running microVM: KVM VM, guest RAM, devices and vCPU threads, owned
//! together so that dropping a [`Vm`] leaves nothing behind.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jevm_protocol::SHARE_TAG;

use crate::jail::ThreadKind;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::boot::{self, BootError};
use super::bus::Bus;
use super::copies::{self, CopiesReport};
use super::devices::balloon::{Balloon, FreePageReports, FreedPages, VIRTIO_ID_BALLOON};
use super::devices::block::Block;
use super::devices::fs::{DaxWindow, DeviceNodeGrants, Fs, ShareRequests, VIRTIO_ID_FS};
use super::devices::gate::MemoryGate;
use super::devices::mmio::{MmioDeviceState, MmioTransport};
use super::devices::net::{Net, VIRTIO_ID_NET};
use super::devices::serial::{Com1, Com1State, ConsoleLog, ConsoleNote, ConsoleSink, COM1_IRQ};
use super::devices::vsock::Vsock;
use super::devices::{IrqLine, VirtioDevice};
use super::layout::{self, KVM_TSS_ADDR};
use super::memory::{self, GuestRam, MemoryError};
use super::mptable::{self, MpTableError};
use super::vcpu::{self, StopReason, VcpuError, VcpuState, VmControl};

/// Guest CID of every jevm VM: each VM has its own vsock device and host
/// socket, so CIDs never meet.
pub const GUEST_CID: u64 = 3;

/// Largest vCPU count we configure (the guest kernel is built with
/// NR_CPUS=64).
pub const MAX_VCPUS: u8 = 64;

/// The kernel command line every jevm guest gets; `extra_cmdline` and the
/// virtio-mmio device list are appended.
/// `reboot=t` + `panic=-1`: no ACPI means no power-off, so both a requested
/// reboot and a panic end in a triple fault the VMM sees as a reset (a
/// halt or power-off is seen on the console, see [`ConsoleNote::Halt`]).
/// `page_reporting.page_reporting_order=0`: the guest reports free pages
/// down to single 4 KiB pages, not only whole 2 MiB blocks (its default):
/// what a clone dirties and frees again is scattered (devices/balloon.rs).
/// `slub_max_order=0`: slabs of one page where the object fits, not up to
/// eight: a clone that takes an object from a slab the template left
/// partly used copies the page it lands in, and a new slab is written
/// whole (its free list runs through every object). Four idle pods each
/// way in the KVM test host: 2.86 -> 2.78 MiB of guest copies per pod.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 pci=off quiet 8250.nr_uarts=1 \
     rdinit=/init page_reporting.page_reporting_order=0 slub_max_order=0";

/// Kernel parameters sizing the dentry and inode hash tables to the guest:
/// 16 and 8 buckets per MiB of guest memory (4096 and 2048 for 256 MiB),
/// an eighth of the kernel's default of 128 and 64.
///
/// Both tables are allocated at boot, so in a clone they are the template's
/// pages, and every name the guest adds (or looks up under the bucket's
/// lock bit) writes a bucket at a hash-random place: a container's create
/// (its mounts, /proc, /dev, the share's lookups) dirtied most of the
/// default tables' 96 pages, each then a private copy the pod keeps.
/// Measured with four idle pods in the KVM test host: 3.36 -> 3.19 MiB of
/// guest copies per pod. At this size the chains stay short (a few entries
/// for tens of thousands of cached names in 256 MiB).
fn name_cache_params(mem_mib: u32) -> String {
    let mib = mem_mib.max(1);
    format!(" dhash_entries={} ihash_entries={}", 16 * mib, 8 * mib)
}

#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub extra_cmdline: String,
    /// Host side of the guest's vsock device (hybrid vsock Unix socket).
    pub vsock_uds: Option<PathBuf>,
    pub disks: Vec<DiskConfig>,
    /// The directory the virtio-fs device serves; None leaves it
    /// unattached. A template's is an empty directory its guest mounts
    /// before the snapshot (see `devices::fs`).
    pub share: Option<PathBuf>,
    /// Where the guest console goes (in addition to the in-memory tail).
    pub console_log: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("vCPU count must be between 1 and {MAX_VCPUS}, got {0}")]
    VcpuCount(u8),
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it? try `jevm check`)")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM: cannot {what}: {source}")]
    KvmSetup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("console log {path}: {source}")]
    ConsoleLog {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("device {name}: {cause}")]
    Device { name: String, cause: String },
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    #[error("cannot save the VM: {0}")]
    Save(String),
    #[error("cannot restore the VM from its saved state: {0}")]
    Restore(String),
    #[error("giving back guest pages identical to the template's: {0}")]
    Copies(String),
}

/// Everything a clone needs besides guest memory: vCPUs, interrupt
/// controllers, PIT, clock, the UART and every virtio device.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub mem_size: u64,
    pub vcpus: Vec<VcpuState>,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub serial: Com1State,
    /// In virtio-mmio slot order.
    pub devices: Vec<MmioDeviceState>,
}

/// What differs between clones of one template.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// The template's memory file, mapped copy-on-write.
    pub memory: PathBuf,
    /// An already open read-only handle to `memory` (the one the template
    /// store validated), used instead of opening the path again.
    pub memory_file: Option<Arc<File>>,
    pub vsock_uds: PathBuf,
    pub console_log: Option<PathBuf>,
    /// The directory the clone's virtio-fs device serves (a pod's shared
    /// directory). None leaves the device unattached, as in the template.
    pub share: Option<PathBuf>,
    /// The device nodes the guest may create in the share.
    pub share_device_nodes: Arc<DeviceNodeGrants>,
    /// The tap the clone's virtio-net device sends and receives on (a
    /// pod's, made in its network namespace). None leaves the device
    /// unattached, as in the template.
    pub tap: Option<Arc<File>>,
}

/// Virtio device type IDs we know how to rebuild in a clone.
pub(crate) const VIRTIO_ID_VSOCK: u32 = 19;

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmSetup { what, source }
}

/// A running (or stopped, not yet dropped) microVM.
pub struct Vm {
    kvm: Kvm,
    ctl: Arc<VmControl>,
    vcpu_threads: Vec<crate::jail::Thread<VcpuFd>>,
    /// vCPUs handed back by their threads after a stop, for saving.
    stopped_vcpus: Vec<VcpuFd>,
    console: Arc<Mutex<ConsoleLog>>,
    bus: Arc<Bus>,
    vm_fd: Option<VmFd>,
    ram: Option<GuestRam>,
    /// Dropped after `vm_fd`, like `ram`: KVM maps it as guest memory.
    dax: Option<Arc<DaxWindow>>,
    /// Held by every device worker while it writes guest memory.
    gate: MemoryGate,
    /// Guest pages the copies pass put on the zero page (sorted; see
    /// `copies`). Also the pass's lock: one pass at a time.
    on_zero_page: Mutex<Vec<usize>>,
}

/// How long [`Vm::drop_identical_copies`] waits for the vCPUs to park and
/// the device workers to leave guest memory before it gives up on a pass.
pub const COPIES_PAUSE_WAIT: Duration = Duration::from_millis(50);

/// How long a paused guest waits for the pages to be compared again and
/// dropped (~100 pages: well under a millisecond on an idle host). On a
/// host short of CPU the pass stops there and the rest stay copies: the CI
/// soak test's forty pods had their guests held for up to 266 ms without
/// this bound.
pub const COPIES_DROP_BUDGET: Duration = Duration::from_millis(10);

/// The parts boot and restore build the same way.
struct Base {
    kvm: Kvm,
    vm_fd: VmFd,
    ram: GuestRam,
    dax: Arc<DaxWindow>,
}

fn base(ram: GuestRam) -> Result<Base, VmError> {
    let (kvm, vm_fd, dax) = super::ahead::take_or_create()?;
    // Guest memory before the irqchip: registering a slot right after
    // KVM_CREATE_IRQCHIP was measured to stall for milliseconds.
    memory::register(&vm_fd, &ram.mem)?;
    vm_fd
        .set_tss_address(KVM_TSS_ADDR)
        .map_err(kvm_err("set the TSS address"))?;
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
    Ok(Base {
        kvm,
        vm_fd,
        ram,
        dax,
    })
}

/// The VM's virtio-fs device and its name: serving `share`, or unattached.
fn fs_device(
    share: Option<&Path>,
    device_nodes: &Arc<DeviceNodeGrants>,
    dax: &Arc<DaxWindow>,
) -> Result<(String, Fs), VmError> {
    let window = Some(Arc::clone(dax));
    let (name, fs) = match share {
        Some(dir) => (
            format!("virtio-fs {}", dir.display()),
            Fs::with_share(SHARE_TAG, dir, Arc::clone(device_nodes), window),
        ),
        None => (
            "virtio-fs (unattached)".into(),
            Fs::unattached(SHARE_TAG, window),
        ),
    };
    let fs = fs.map_err(|e| device_err(&name)(e.to_string()))?;
    Ok((name, fs))
}

fn device_err(name: &str) -> impl Fn(String) -> VmError + '_ {
    move |cause| VmError::Device {
        name: name.to_string(),
        cause,
    }
}

/// Wires virtio device `index` (already wrapped in its transport by `make`)
/// to KVM: irqfd on its GSI, one ioeventfd per queue.
fn attach_mmio(
    vm_fd: &VmFd,
    index: usize,
    name: &str,
    make: impl FnOnce(Arc<IrqLine>) -> Result<MmioTransport, String>,
) -> Result<(u64, Mutex<MmioTransport>), VmError> {
    let (base, gsi) = layout::virtio_slot(index as u32);
    let irq = Arc::new(IrqLine::new(gsi).map_err(|e| device_err(name)(e.to_string()))?);
    vm_fd
        .register_irqfd(&irq.evt, gsi)
        .map_err(kvm_err("register a device irqfd"))?;
    let transport = make(irq).map_err(device_err(name))?;
    for (q, evt) in transport.queue_notify_eventfds().iter().enumerate() {
        vm_fd
            .register_ioevent(evt, &IoEventAddress::Mmio(base + 0x50), q as u32)
            .map_err(kvm_err("register a queue ioeventfd"))?;
    }
    Ok((base, Mutex::new(transport)))
}

fn console(path: Option<&PathBuf>) -> Result<(Arc<Mutex<ConsoleLog>>, Option<File>), VmError> {
    let file = match path {
        Some(p) => Some(File::create(p).map_err(|source| VmError::ConsoleLog {
            path: p.clone(),
            source,
        })?),
        None => None,
    };
    Ok((Arc::new(Mutex::new(ConsoleLog::default())), file))
}

/// The console writer: the log file, the in-memory tail, and the lines
/// that end the guest reported to `ctl` (a halted guest exits nowhere else).
fn console_sink(
    file: Option<File>,
    console: &Arc<Mutex<ConsoleLog>>,
    ctl: &Arc<VmControl>,
) -> ConsoleSink {
    let ctl = Arc::clone(ctl);
    ConsoleSink::new(file, console.clone()).with_observer(Box::new(move |note| match note {
        ConsoleNote::Panic => ctl.note_panic(),
        ConsoleNote::Halt => ctl.request_stop(StopReason::GuestHalt),
    }))
}

fn serial_irq(vm_fd: &VmFd) -> Result<EventFd, VmError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| device_err("serial")(e.to_string()))?;
    vm_fd
        .register_irqfd(&evt, COM1_IRQ)
        .map_err(kvm_err("register the serial irqfd"))?;
    Ok(evt)
}

/// Sets the process's jail up (jail/), unless its owner did with a mode of
/// its own, and has it start threads ahead while the VM is built: its
/// vCPUs and the workers of the devices (by virtio type) the VM activates
/// as it is built. What a VM that fails does not take is released when
/// the returned value is dropped without [`ThreadsAhead::taken`].
pub(crate) fn jail_threads_ahead(
    vcpus: usize,
    devices: impl IntoIterator<Item = u32>,
) -> Result<ThreadsAhead, VmError> {
    if crate::jail::mode().is_none() {
        crate::jail::init(crate::jail::Mode::from_env())?;
    }
    let mut counts: Vec<(ThreadKind, usize)> = Vec::new();
    for device_type in devices {
        let kind = match device_type {
            VIRTIO_ID_VSOCK => ThreadKind::Vsock,
            VIRTIO_ID_FS => ThreadKind::Fs,
            VIRTIO_ID_NET => ThreadKind::Net,
            virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK => ThreadKind::Block,
            _ => continue,
        };
        match counts.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => counts.push((kind, 1)),
        }
    }
    // Workers first: a restore activates them before its vCPUs start.
    counts.push((ThreadKind::Vcpu, vcpus));
    for &(kind, count) in &counts {
        crate::jail::prepare(kind, count);
    }
    Ok(ThreadsAhead { counts })
}

/// Threads a VM being built asked the jail for (see [`jail_threads_ahead`]).
#[must_use]
pub(crate) struct ThreadsAhead {
    counts: Vec<(ThreadKind, usize)>,
}

impl ThreadsAhead {
    /// The VM was built and took them.
    pub(crate) fn taken(mut self) {
        self.counts.clear();
    }
}

impl Drop for ThreadsAhead {
    fn drop(&mut self) {
        for &(kind, count) in &self.counts {
            crate::jail::release(kind, count);
        }
    }
}

impl Vm {
    /// Builds the VM and starts its vCPUs.
    pub fn start(cfg: &VmConfig) -> Result<Vm, VmError> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(VmError::VcpuCount(cfg.vcpus));
        }
        // Cheap checks first: a missing kernel must not cost a VM.
        if let Err(source) = std::fs::metadata(&cfg.kernel) {
            return Err(BootError::KernelOpen {
                path: cfg.kernel.clone(),
                source,
            }
            .into());
        }
        if let Some(initrd) = &cfg.initrd {
            if let Err(source) = std::fs::metadata(initrd) {
                return Err(BootError::InitrdOpen {
                    path: initrd.clone(),
                    source,
                }
                .into());
            }
        }
        // The vCPUs only: the guest activates its devices seconds later,
        // and their workers come from the spawner then.
        let ahead = jail_threads_ahead(cfg.vcpus as usize, [])?;
        vcpu::install_kick_handler();
        let Base {
            kvm,
            vm_fd,
            ram,
            dax,
        } = base(memory::create(cfg.mem_mib)?)?;

        // Devices: vsock first so it is always virtio-mmio slot 0.
        let mut virtio: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
        if let Some(uds) = &cfg.vsock_uds {
            let name = format!("vsock {}", uds.display());
            let dev =
                Vsock::new(GUEST_CID, uds.clone()).map_err(|e| device_err(&name)(e.to_string()))?;
            virtio.push((name, Box::new(dev)));
        }
        // Every VM carries one virtio-fs device: a template's guest must
        // have probed (and mounted) it for its clones to use it.
        let (fs_name, fs) = fs_device(cfg.share.as_deref(), &Arc::default(), &dax)?;
        virtio.push((fs_name, Box::new(fs)));
        // And one virtio-net device, unattached at boot for the same reason.
        virtio.push((
            "virtio-net (unattached)".into(),
            Box::new(Net::unattached()),
        ));
        // And the balloon, whose only use is free page reporting: pages the
        // guest frees go back to the host (devices/balloon.rs).
        virtio.push((
            "virtio-balloon".into(),
            Box::new(Balloon::new(FreedPages::PunchHoles)),
        ));
        for d in &cfg.disks {
            let name = format!("disk {}", d.path.display());
            let dev =
                Block::new(&d.path, d.read_only).map_err(|e| device_err(&name)(e.to_string()))?;
            virtio.push((name, Box::new(dev)));
        }
        let mut cmdline = String::from(BASE_CMDLINE);
        cmdline.push_str(&name_cache_params(cfg.mem_mib));
        let gate = MemoryGate::default();
        let mut mmio = Vec::new();
        for (i, (name, mut dev)) in virtio.into_iter().enumerate() {
            dev.set_memory_gate(gate.clone());
            let mem = ram.mem.clone();
            mmio.push(attach_mmio(&vm_fd, i, &name, |irq| {
                MmioTransport::new(dev, mem, irq).map_err(|e| e.to_string())
            })?);
            let (base, gsi) = layout::virtio_slot(i as u32);
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"));
        }
        if !cfg.extra_cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&cfg.extra_cmdline);
        }

        let (console, log_file) = console(cfg.console_log.as_ref())?;
        let ctl = VmControl::new();
        let com1 = Com1::new(serial_irq(&vm_fd)?, console_sink(log_file, &console, &ctl));
        let bus = Arc::new(Bus { com1, mmio });

        let entry = boot::load(&ram.mem, &cfg.kernel, cfg.initrd.as_deref(), &cmdline)?;
        mptable::write(&ram.mem, cfg.vcpus)?;

        let base_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("read the supported CPUID"))?;
        let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
        for id in 0..cfg.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create a vCPU"))?;
            vcpu::configure(&fd, id, cfg.vcpus, &base_cpuid, entry.entry)?;
            vcpus.push(fd);
        }
        log::debug!(
            "VM starting: {} vCPUs, {} MiB, cmdline {cmdline:?}",
            cfg.vcpus,
            cfg.mem_mib
        );
        let vm = Self::run(kvm, vm_fd, (ram, dax, gate), bus, console, ctl, vcpus)?;
        ahead.taken();
        Ok(vm)
    }

    /// Builds a VM from a template's saved state and memory file and starts
    /// its vCPUs where the template's stopped.
    pub fn restore(state: &VmState, cfg: &RestoreConfig) -> Result<Vm, VmError> {
        // Cheap checks first: a bad share directory must not cost a VM.
        let fs_devices = state
            .devices
            .iter()
            .filter(|d| d.device_type == VIRTIO_ID_FS)
            .count();
        if fs_devices != 1 {
            return Err(VmError::Restore(format!(
                "the saved VM has {fs_devices} virtio-fs devices, expected exactly 1"
            )));
        }
        if let Some(dir) = &cfg.share {
            let name = format!("virtio-fs {}", dir.display());
            Fs::check_share(dir).map_err(|e| device_err(&name)(e.to_string()))?;
        }
        let net_devices = state
            .devices
            .iter()
            .filter(|d| d.device_type == VIRTIO_ID_NET)
            .count();
        if net_devices != 1 {
            return Err(VmError::Restore(format!(
                "the saved VM has {net_devices} virtio-net devices, expected exactly 1"
            )));
        }
        let mut net = Some(match &cfg.tap {
            Some(tap) => Net::with_tap(Arc::clone(tap)),
            None => Net::unattached(),
        });
        let mut balloon = Some(Balloon::new(FreedPages::DropCopies));
        let ahead = jail_threads_ahead(
            state.vcpus.len(),
            state
                .devices
                .iter()
                .filter(|d| d.transport.activated)
                .map(|d| d.device_type),
        )?;
        vcpu::install_kick_handler();
        let Base {
            kvm,
            vm_fd,
            ram,
            dax,
        } = base(memory::map_template(
            &cfg.memory,
            cfg.memory_file.clone(),
            state.mem_size,
        )?)?;
        let (fs_name, fs) = fs_device(cfg.share.as_deref(), &cfg.share_device_nodes, &dax)?;
        let mut fs = Some(fs);
        let chip = |what, c: &kvm_irqchip| vm_fd.set_irqchip(c).map_err(kvm_err(what));
        chip("restore the master PIC", &state.pic_master)?;
        chip("restore the slave PIC", &state.pic_slave)?;
        chip("restore the IO-APIC", &state.ioapic)?;
        vm_fd
            .set_pit2(&state.pit)
            .map_err(kvm_err("restore the PIT"))?;
        // Flags 0: the guest's clock continues from the template's value
        // rather than jumping by the time the template sat on disk; the
        // agent sets the wall clock.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        vm_fd
            .set_clock(&clock)
            .map_err(kvm_err("restore the guest clock"))?;

        let gate = MemoryGate::default();
        let mut mmio = Vec::with_capacity(state.devices.len());
        for (i, saved) in state.devices.iter().enumerate() {
            let (name, mut dev): (String, Box<dyn VirtioDevice>) = match saved.device_type {
                VIRTIO_ID_VSOCK => {
                    let name = format!("vsock {}", cfg.vsock_uds.display());
                    let dev = Vsock::new(GUEST_CID, cfg.vsock_uds.clone())
                        .map_err(|e| device_err(&name)(e.to_string()))?;
                    (name, Box::new(dev))
                }
                VIRTIO_ID_FS => match fs.take() {
                    Some(dev) => (fs_name.clone(), Box::new(dev)),
                    None => {
                        return Err(VmError::Restore(format!(
                            "a second virtio-fs device in slot {i}"
                        )))
                    }
                },
                VIRTIO_ID_NET => match net.take() {
                    Some(dev) => ("virtio-net".to_string(), Box::new(dev)),
                    None => {
                        return Err(VmError::Restore(format!(
                            "a second virtio-net device in slot {i}"
                        )))
                    }
                },
                VIRTIO_ID_BALLOON => match balloon.take() {
                    Some(dev) => ("virtio-balloon".to_string(), Box::new(dev)),
                    None => {
                        return Err(VmError::Restore(format!(
                            "a second virtio-balloon device in slot {i}"
                        )))
                    }
                },
                other => {
                    return Err(VmError::Restore(format!(
                        "virtio device type {other} in slot {i} cannot be part of a template"
                    )))
                }
            };
            dev.set_memory_gate(gate.clone());
            let mem = ram.mem.clone();
            mmio.push(attach_mmio(&vm_fd, i, &name, |irq| {
                MmioTransport::restore(dev, mem, irq, saved).map_err(|e| e.to_string())
            })?);
        }
        let (console, log_file) = console(cfg.console_log.as_ref())?;
        let ctl = VmControl::new();
        let com1 = Com1::restore(
            serial_irq(&vm_fd)?,
            console_sink(log_file, &console, &ctl),
            &state.serial,
        )
        .map_err(|e| device_err("serial")(e.to_string()))?;
        let bus = Arc::new(Bus { com1, mmio });

        let mut vcpus = Vec::with_capacity(state.vcpus.len());
        for s in &state.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(s.id))
                .map_err(kvm_err("create a vCPU"))?;
            vcpu::restore(&fd, s)?;
            vcpus.push(fd);
        }
        let vm = Self::run(kvm, vm_fd, (ram, dax, gate), bus, console, ctl, vcpus)?;
        ahead.taken();
        Ok(vm)
    }

    fn run(
        kvm: Kvm,
        vm_fd: VmFd,
        (ram, dax, gate): (GuestRam, Arc<DaxWindow>, MemoryGate),
        bus: Arc<Bus>,
        console: Arc<Mutex<ConsoleLog>>,
        ctl: Arc<VmControl>,
        vcpus: Vec<VcpuFd>,
    ) -> Result<Vm, VmError> {
        let mut vm = Vm {
            kvm,
            ctl: ctl.clone(),
            vcpu_threads: Vec::new(),
            stopped_vcpus: Vec::new(),
            console,
            bus: bus.clone(),
            vm_fd: Some(vm_fd),
            ram: Some(ram),
            dax: Some(dax),
            gate,
            on_zero_page: Mutex::new(Vec::new()),
        };
        // The process's jail (jail/), unless its owner set one up with
        // another mode already: vCPUs run guest code from here on.
        if crate::jail::mode().is_none() {
            crate::jail::init(crate::jail::Mode::from_env())?;
        }
        for (id, fd) in vcpus.into_iter().enumerate() {
            let (bus, ctl) = (bus.clone(), ctl.clone());
            let handle = crate::jail::spawn(&format!("vcpu{id}"), ThreadKind::Vcpu, move || {
                vcpu::run(fd, id as u8, bus, ctl)
            })
            .map_err(VmError::Thread)?;
            vm.vcpu_threads.push(handle);
        }
        Ok(vm)
    }

    /// Gives back the clone's private copies of template pages that hold
    /// what the template's page holds (`copies.rs`): searched with the VM
    /// running, then compared again and dropped with the vCPUs paused and
    /// every device worker out of guest memory, at most [`COPIES_PAUSE_WAIT`]
    /// after asking for that. If the VM cannot be brought to rest by then
    /// nothing is dropped: a busy guest is no reason to stall it. A booted
    /// VM's memory is shared, not copied: it has nothing to give back.
    pub fn drop_identical_copies(&self) -> Result<CopiesReport, VmError> {
        let ram = self
            .ram
            .as_ref()
            .ok_or_else(|| VmError::Copies("the VM has no memory left".into()))?;
        let io = |what: &str| {
            let what = what.to_owned();
            move |e: std::io::Error| VmError::Copies(format!("{what}: {e}"))
        };
        let mut on_zero_page = self.on_zero_page.lock().unwrap_or_else(|p| p.into_inner());
        let found = copies::find(ram, &on_zero_page).map_err(io("searching"))?;
        let mut report = CopiesReport {
            private: found.private,
            identical: found.identical.len(),
            zero: found.zero.len(),
            ..Default::default()
        };
        if found.identical.is_empty() && found.zero.is_empty() {
            return Ok(report);
        }
        let start = Instant::now();
        let deadline = start + COPIES_PAUSE_WAIT;
        if !self.ctl.pause(deadline) {
            report.paused = start.elapsed();
            return Ok(report);
        }
        let done = match self.gate.try_close(deadline) {
            Some(closed) => {
                let stop_at = Instant::now() + COPIES_DROP_BUDGET;
                let done = copies::drop_unchanged(ram, &found.identical, stop_at, &closed)
                    .and_then(|dropped| {
                        let zero = &found.zero;
                        copies::map_zero_unchanged(ram, zero, stop_at, &mut on_zero_page, &closed)
                            .map(|zeroed| (dropped, zeroed))
                    });
                report.budget_used_up = Instant::now() >= stop_at;
                done
            }
            None => Ok((0, 0)),
        };
        self.ctl.resume();
        report.paused = start.elapsed();
        (report.dropped, report.zero_mapped) = done.map_err(io("dropping"))?;
        Ok(report)
    }

    /// Waits for the VM to stop on its own, at most `timeout`.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<StopReason> {
        self.ctl.wait(timeout)
    }

    /// Why the VM stopped, if it has.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.ctl.reason()
    }

    /// Whether the guest kernel printed a panic.
    pub fn guest_panicked(&self) -> bool {
        self.console.lock().unwrap().panicked()
    }

    /// A handle another thread can wait on to learn that the VM stopped,
    /// and why, without owning it.
    pub fn watch(&self) -> VmWatch {
        VmWatch {
            ctl: Arc::clone(&self.ctl),
            console: Arc::clone(&self.console),
        }
    }

    /// The last `n` console lines.
    pub fn console_tail(&self, n: usize) -> Vec<String> {
        self.console.lock().unwrap().tail(n)
    }

    /// What the console says about a dead guest: its kernel's oops from
    /// the first line (at most `max`), else the last `tail` lines.
    pub fn console_report(&self, tail: usize, max: usize) -> Vec<String> {
        self.console.lock().unwrap().report(tail, max)
    }

    /// Open host<->guest vsock connections (a template is saved at 0).
    pub fn vsock_connections(&self) -> usize {
        self.bus
            .mmio
            .iter()
            .map(|(_, t)| t.lock().unwrap().device().active_connections())
            .sum()
    }

    /// The free page reports the guest has made so far.
    pub fn free_page_reports(&self) -> FreePageReports {
        self.bus
            .mmio
            .iter()
            .map(|(_, t)| t.lock().unwrap().device().free_page_reports())
            .fold(FreePageReports::default(), |a, b| FreePageReports {
                reports: a.reports + b.reports,
                bytes: a.bytes + b.bytes,
            })
    }

    /// What the guest asked of its virtio-fs share (None without one): a
    /// handle whose counts are read later without locking the device.
    pub fn share_requests(&self) -> Option<Arc<ShareRequests>> {
        self.bus
            .mmio
            .iter()
            .find_map(|(_, t)| t.lock().unwrap().device().share_requests())
    }

    /// Stops the vCPUs (if still running) and joins their threads.
    pub fn stop(&mut self) {
        self.stop_with(StopReason::HostRequest);
    }

    fn stop_with(&mut self, reason: StopReason) {
        self.ctl.request_stop(reason);
        // A kick can land just before a thread enters KVM_RUN; keep kicking
        // until every thread has left.
        while self.vcpu_threads.iter().any(|t| !t.is_finished()) {
            self.ctl.kick_all();
            std::thread::sleep(Duration::from_micros(200));
        }
        for t in self.vcpu_threads.drain(..) {
            match t.join() {
                Ok(Some(fd)) => self.stopped_vcpus.push(fd),
                Ok(None) => {}
                Err(_) => log::error!("a vCPU thread panicked"),
            }
        }
    }

    /// Stops the VM at a quiet point and returns its state; the memory is
    /// saved separately with [`Vm::save_memory`]. The VM cannot run again.
    pub fn save(&mut self) -> Result<VmState, VmError> {
        let open = self.vsock_connections();
        if open != 0 {
            return Err(VmError::Save(format!(
                "{open} vsock connections are still open"
            )));
        }
        self.stop_with(StopReason::Paused);
        if self.ctl.reason().is_some_and(|r| r.by_guest()) {
            return Err(VmError::Save(
                "the guest stopped before it could be saved".into(),
            ));
        }
        let vm_fd = self.vm_fd.as_ref().expect("vm fd present until drop");
        let msr_list = self
            .kvm
            .get_msr_index_list()
            .map_err(kvm_err("read the MSR index list"))?;
        let mut vcpus = Vec::with_capacity(self.stopped_vcpus.len());
        for (id, fd) in self.stopped_vcpus.iter_mut().enumerate() {
            vcpus.push(vcpu::save(fd, id as u8, msr_list.as_slice())?);
        }
        let chip = |chip_id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm_fd
                .get_irqchip(&mut c)
                .map_err(kvm_err("read the irqchip"))?;
            Ok(c)
        };
        let mut devices = Vec::with_capacity(self.bus.mmio.len());
        for (_, t) in &self.bus.mmio {
            devices.push(
                t.lock()
                    .unwrap()
                    .save()
                    .map_err(|e| VmError::Save(e.to_string()))?,
            );
        }
        Ok(VmState {
            mem_size: self.mem_size(),
            vcpus,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: vm_fd.get_pit2().map_err(kvm_err("read the PIT"))?,
            clock: vm_fd.get_clock().map_err(kvm_err("read the guest clock"))?,
            serial: self.bus.com1.save(),
            devices,
        })
    }

    /// Writes guest RAM to `path` (sparse: untouched pages stay holes).
    pub fn save_memory(&self, path: &std::path::Path) -> std::io::Result<u64> {
        memory::save(self.ram.as_ref().expect("ram present until drop"), path)
    }

    /// Guest RAM as the VMM sees it (a clone's private copy-on-write view).
    pub fn guest_memory(&self) -> &super::devices::GuestMemory {
        &self.ram.as_ref().expect("ram present until drop").mem
    }

    /// Guest RAM size in bytes.
    pub fn mem_size(&self) -> u64 {
        self.ram.as_ref().map_or(0, |r| r.size)
    }
}

/// A cloneable view of one VM's fate for threads that do not own it: wait
/// for it to stop (the guest reset, panicked, halted, or KVM failed; or the
/// owner stopped it) and read its console.
#[derive(Clone)]
pub struct VmWatch {
    ctl: Arc<VmControl>,
    console: Arc<Mutex<ConsoleLog>>,
}

impl VmWatch {
    /// Waits until the VM stops or `timeout` passes; the reason is known as
    /// soon as a vCPU or the console sees the end, before the vCPU threads
    /// are joined. Dropping the [`Vm`] stops it, so `None` (no timeout)
    /// never blocks past the VM's life.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<StopReason> {
        self.ctl.wait(timeout)
    }

    /// Why the VM stopped, if it has.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.ctl.reason()
    }

    /// The last `n` console lines.
    pub fn console_tail(&self, n: usize) -> Vec<String> {
        self.console.lock().unwrap().tail(n)
    }

    /// What the console says about a dead guest: its kernel's oops from
    /// the first line (at most `max`), else the last `tail` lines.
    pub fn console_report(&self, tail: usize, max: usize) -> Vec<String> {
        self.console.lock().unwrap().report(tail, max)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
        self.stopped_vcpus.clear();
        // Devices (and their worker threads, sockets) go before KVM and RAM.
        if let Some(bus) = Arc::get_mut(&mut self.bus) {
            bus.mmio.clear();
        }
        self.vm_fd.take();
        self.ram.take();
        self.dax.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_caches_scale_with_guest_memory() {
        assert_eq!(
            name_cache_params(256),
            " dhash_entries=4096 ihash_entries=2048"
        );
        assert_eq!(
            name_cache_params(2048),
            " dhash_entries=32768 ihash_entries=16384"
        );
        assert_eq!(name_cache_params(0), " dhash_entries=16 ihash_entries=8");
    }
}
