//! Device models. Every device runs inside the VMM process (see
//! docs/design.md): an outside daemon would map the template's memory file,
//! not a clone's private copy-on-write pages.
//!
//! Virtio devices implement [`VirtioDevice`]; the virtio-mmio transport
//! (`mmio.rs`) owns the registers and queue configuration, and hands the
//! queues to the device when the driver sets DRIVER_OK.

pub mod balloon;
pub mod block;
pub mod fs;
pub mod gate;
pub mod guest_errors;
pub mod mmio;
pub mod net;
pub mod serial;
pub mod vsock;
mod worker;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as every device sees it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Bit in the virtio-mmio InterruptStatus register: a used ring was updated.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
/// Bit in the virtio-mmio InterruptStatus register: the config space changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// A device's interrupt line: an irqfd registered with KVM for the device's
/// GSI, plus the InterruptStatus register the driver reads and acknowledges.
pub struct IrqLine {
    pub gsi: u32,
    pub evt: EventFd,
    status: AtomicU32,
}

impl IrqLine {
    pub fn new(gsi: u32) -> std::io::Result<Self> {
        Ok(Self {
            gsi,
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            status: AtomicU32::new(0),
        })
    }

    /// Sets `bits` in InterruptStatus and raises the interrupt.
    pub fn trigger(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.evt.write(1)
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: the driver clears the bits it has handled.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Restores InterruptStatus (template/clone).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// One activated queue: the queue itself and the ioeventfd KVM signals when
/// the driver writes the queue's index to QueueNotify.
pub struct ActiveQueue {
    pub queue: Queue,
    pub notify: EventFd,
}

/// What a virtio device model provides to the virtio-mmio transport.
///
/// `activate` is called once the driver has set DRIVER_OK; the device then
/// serves its queues on a thread of its own until `reset` (or drop) stops it.
pub trait VirtioDevice: Send {
    /// Virtio device ID (2 = block, 19 = vsock, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (including VIRTIO_F_VERSION_1).
    fn avail_features(&self) -> u64;
    /// The features the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device-specific config space at `offset` (relative to 0x100).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific config space; most devices ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The VM's [`gate::MemoryGate`]: a device whose worker writes guest
    /// memory holds it while serving its queues. Devices that serve on the
    /// vCPU (paused with it) need none.
    fn set_memory_gate(&mut self, _gate: gate::MemoryGate) {}
    /// Starts serving the queues.
    fn activate(
        &mut self,
        mem: GuestMemory,
        irq: Arc<IrqLine>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), DeviceError>;
    /// Stops serving the queues and returns to the pre-activation state.
    /// Returns false if the device cannot be reset.
    fn reset(&mut self) -> bool;
    /// Whether the device serves its queues on the vCPU that wrote
    /// QueueNotify ([`VirtioDevice::queue_notify`]) instead of a worker
    /// thread: for devices whose rare work is not worth a thread per VM.
    /// The transport then registers no ioeventfds for it.
    fn serves_queues_inline(&self) -> bool {
        false
    }
    /// Shared memory region `id` (virtio 1.2, 2.10): guest-physical base
    /// and length. None: the device has no such region.
    fn shm_region(&self, _id: u32) -> Option<(u64, u64)> {
        None
    }
    /// The driver notified queue `index` (devices that serve inline only;
    /// called on the vCPU, with the transport locked).
    fn queue_notify(&mut self, _index: u32) {}
    /// Stops serving the queues at a quiet point (nothing in flight) and
    /// says where each queue stood, so that a clone of this VM can carry on
    /// from there. The device is unusable afterwards. Devices that cannot be
    /// part of a template say so.
    /// Open connections to the host, for devices that have them: a
    /// template is saved only when there are none.
    fn active_connections(&self) -> usize {
        0
    }
    /// Batches of free pages the guest has reported (the balloon's free
    /// page reporting): a template is saved once they have stopped.
    fn free_page_reports(&self) -> balloon::FreePageReports {
        balloon::FreePageReports::default()
    }
    /// The requests a file system device's share has served.
    fn share_requests(&self) -> Option<Arc<fs::ShareRequests>> {
        None
    }
    fn pause(&mut self) -> Result<Vec<QueuePosition>, DeviceError> {
        Err(DeviceError::Activate {
            device: "virtio device",
            cause: "cannot be saved in a template".into(),
        })
    }
    /// What a clone's device must take over from the template's besides
    /// the transport's registers and the queue positions (read at save).
    fn saved_state(&self) -> Option<SavedDeviceState> {
        None
    }
    /// Takes over `state`, saved by the template's device, before the
    /// restored queues are served.
    fn restore_state(&mut self, state: &SavedDeviceState) -> Result<(), DeviceError> {
        Err(DeviceError::Restore {
            device: "virtio device",
            cause: format!("keeps no state of its own, the template saved {state:?}"),
        })
    }
}

/// Device state a template saves beyond its transport and queues.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SavedDeviceState {
    /// virtio-fs: the FUSE session of the guest's mount of the share.
    Fs(fs::FuseSession),
}

/// Where a queue stood when its device was paused for a template.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueuePosition {
    pub next_avail: u16,
    pub next_used: u16,
}

impl QueuePosition {
    pub fn of(queue: &Queue) -> Self {
        use virtio_queue::QueueT;
        Self {
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
        }
    }

    pub fn apply(&self, queue: &mut Queue) {
        use virtio_queue::QueueT;
        queue.set_next_avail(self.next_avail);
        queue.set_next_used(self.next_used);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{device}: {cause}")]
    Activate { device: &'static str, cause: String },
    #[error("{device}: cannot take over the template's state: {cause}")]
    Restore { device: &'static str, cause: String },
    #[error("{device}: not quiet, cannot be saved now: {cause}")]
    NotQuiet { device: &'static str, cause: String },
    #[error("{device}: I/O error: {source}")]
    Io {
        device: &'static str,
        source: std::io::Error,
    },
}

/// The queues an activation hands a device, checked: the device is not
/// active already (`active`) and got exactly `N` queues.
pub fn activation_queues<const N: usize>(
    device: &'static str,
    active: bool,
    queues: Vec<ActiveQueue>,
) -> Result<[ActiveQueue; N], DeviceError> {
    if active {
        return Err(DeviceError::Activate {
            device,
            cause: "already active".into(),
        });
    }
    queues
        .try_into()
        .map_err(|q: Vec<ActiveQueue>| DeviceError::Activate {
            device,
            cause: format!("expected {N} queues, got {}", q.len()),
        })
}

/// Copies `config[offset..]` into `data`; bytes past the end of the config
/// space read as 0 (the driver may probe beyond what a device offers).
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}
