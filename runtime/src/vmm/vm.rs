//! A running microVM: KVM VM, guest RAM, devices and vCPU threads, owned
//! together so that dropping a [`Vm`] leaves nothing behind.

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::boot::{self, BootError};
use super::bus::Bus;
use super::devices::block::Block;
use super::devices::mmio::MmioTransport;
use super::devices::serial::{Com1, ConsoleLog, ConsoleSink, COM1_IRQ};
use super::devices::vsock::Vsock;
use super::devices::{IrqLine, VirtioDevice};
use super::layout::{self, KVM_TSS_ADDR};
use super::memory::{self, GuestRam, MemoryError};
use super::mptable::{self, MpTableError};
use super::vcpu::{self, StopReason, VcpuError, VmControl};

/// Guest CID of every jevm VM: each VM has its own vsock device and host
/// socket, so CIDs never meet.
pub const GUEST_CID: u64 = 3;

/// Largest vCPU count we configure (the guest kernel is built with
/// NR_CPUS=64).
pub const MAX_VCPUS: u8 = 64;

/// The kernel command line every jevm guest gets; `extra_cmdline` and the
/// virtio-mmio device list are appended.
/// `reboot=t` + `panic=-1`: no ACPI means no power-off, so both a requested
/// shutdown and a panic end in a triple fault the VMM sees as a reset.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=t panic=-1 pci=off quiet 8250.nr_uarts=1 rdinit=/init";

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
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmSetup { what, source }
}

/// A running (or stopped, not yet dropped) microVM.
pub struct Vm {
    ctl: Arc<VmControl>,
    vcpu_threads: Vec<JoinHandle<()>>,
    console: Arc<Mutex<ConsoleLog>>,
    bus: Arc<Bus>,
    vm_fd: Option<VmFd>,
    ram: Option<GuestRam>,
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
        vcpu::install_kick_handler();

        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        let ram = memory::create(cfg.mem_mib)?;
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

        // Devices: vsock first so it is always virtio-mmio slot 0.
        let mut virtio: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
        if let Some(uds) = &cfg.vsock_uds {
            let dev = Vsock::new(GUEST_CID, uds.clone()).map_err(|e| VmError::Device {
                name: format!("vsock {}", uds.display()),
                cause: e.to_string(),
            })?;
            virtio.push((format!("vsock {}", uds.display()), Box::new(dev)));
        }
        for d in &cfg.disks {
            let dev = Block::new(&d.path, d.read_only).map_err(|e| VmError::Device {
                name: format!("disk {}", d.path.display()),
                cause: e.to_string(),
            })?;
            virtio.push((format!("disk {}", d.path.display()), Box::new(dev)));
        }

        let mut cmdline = String::from(BASE_CMDLINE);
        let mut mmio = Vec::new();
        for (i, (name, dev)) in virtio.into_iter().enumerate() {
            let (base, gsi) = layout::virtio_slot(i as u32);
            let irq = Arc::new(IrqLine::new(gsi).map_err(|e| VmError::Device {
                name: name.clone(),
                cause: e.to_string(),
            })?);
            vm_fd
                .register_irqfd(&irq.evt, gsi)
                .map_err(kvm_err("register a device irqfd"))?;
            let transport =
                MmioTransport::new(dev, ram.mem.clone(), irq).map_err(|e| VmError::Device {
                    name: name.clone(),
                    cause: e.to_string(),
                })?;
            for (q, evt) in transport.queue_notify_eventfds().iter().enumerate() {
                vm_fd
                    .register_ioevent(evt, &IoEventAddress::Mmio(base + 0x50), q as u32)
                    .map_err(kvm_err("register a queue ioeventfd"))?;
            }
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"));
            mmio.push((base, Mutex::new(transport)));
        }
        if !cfg.extra_cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&cfg.extra_cmdline);
        }

        let console = Arc::new(Mutex::new(ConsoleLog::default()));
        let log_file = match &cfg.console_log {
            Some(p) => Some(File::create(p).map_err(|source| VmError::ConsoleLog {
                path: p.clone(),
                source,
            })?),
            None => None,
        };
        let serial_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Device {
            name: "serial".into(),
            cause: e.to_string(),
        })?;
        vm_fd
            .register_irqfd(&serial_evt, COM1_IRQ)
            .map_err(kvm_err("register the serial irqfd"))?;
        let com1 = Com1::new(serial_evt, ConsoleSink::new(log_file, console.clone()));
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

        let ctl = VmControl::new();
        let mut vm = Vm {
            ctl: ctl.clone(),
            vcpu_threads: Vec::new(),
            console,
            bus: bus.clone(),
            vm_fd: Some(vm_fd),
            ram: Some(ram),
        };
        for (id, fd) in vcpus.into_iter().enumerate() {
            let (bus, ctl) = (bus.clone(), ctl.clone());
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu::run(fd, id as u8, bus, ctl))
                .map_err(VmError::Thread)?;
            vm.vcpu_threads.push(handle);
        }
        log::debug!(
            "VM started: {} vCPUs, {} MiB, cmdline {cmdline:?}",
            cfg.vcpus,
            cfg.mem_mib
        );
        Ok(vm)
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

    /// The last `n` console lines.
    pub fn console_tail(&self, n: usize) -> Vec<String> {
        self.console.lock().unwrap().tail(n)
    }

    /// Stops the vCPUs (if still running) and joins their threads.
    pub fn stop(&mut self) {
        self.ctl.request_stop(StopReason::HostRequest);
        // A kick can land just before a thread enters KVM_RUN; keep kicking
        // until every thread has left.
        while self.vcpu_threads.iter().any(|t| !t.is_finished()) {
            self.ctl.kick_all();
            std::thread::sleep(Duration::from_micros(500));
        }
        for t in self.vcpu_threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Guest RAM size in bytes.
    pub fn mem_size(&self) -> u64 {
        self.ram.as_ref().map_or(0, |r| r.size)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
        // Devices (and their worker threads, sockets) go before KVM and RAM.
        if let Some(bus) = Arc::get_mut(&mut self.bus) {
            bus.mmio.clear();
        }
        self.vm_fd.take();
        self.ram.take();
    }
}
