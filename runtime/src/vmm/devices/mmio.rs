//! The virtio-mmio transport, version 2 ("modern", virtio 1.x).
//!
//! One [`MmioTransport`] sits in front of each virtio device and owns its
//! 0x1000-byte register window: feature negotiation, the status state
//! machine, queue configuration, interrupt status and the config space
//! (forwarded to the device). When the driver sets DRIVER_OK the transport
//! builds the [`Queue`]s from what the driver configured and hands them to
//! [`VirtioDevice::activate`]; from then on the device serves them on its own
//! thread and the transport only answers register accesses.
//!
//! Queue notifications are meant to arrive through KVM ioeventfds: the VMM
//! registers each of [`MmioTransport::queue_notify_eventfds`] at
//! `base + QUEUE_NOTIFY_OFFSET` with datamatch = queue index, so a notify
//! never leaves the kernel. A QueueNotify write that does reach
//! [`MmioTransport::write`] (no ioeventfd registered) signals the same
//! EventFd, so the device cannot tell the difference.
//! A device that serves its queues inline (the balloon) has no
//! ioeventfds: its notifies come here and are handed to it on the vCPU.
//!
//! All guest input is untrusted: invalid accesses and out-of-order writes are
//! logged at debug level and ignored, never a panic.

use std::io;
use std::sync::Arc;

use log::{debug, warn};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::guest_errors::{guest_warn, GuestErrors};
use super::{
    ActiveQueue, DeviceError, GuestMemory, IrqLine, QueuePosition, SavedDeviceState, VirtioDevice,
    VIRTIO_MMIO_INT_CONFIG,
};

/// Everything a clone needs to continue a virtio-mmio device where its
/// template stopped: the registers, InterruptStatus and the queue positions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioDeviceState {
    pub device_type: u32,
    pub transport: MmioState,
    pub interrupt_status: u32,
    pub queues: Vec<QueuePosition>,
    /// The device's own state (`VirtioDevice::saved_state`).
    #[serde(default)]
    pub device: Option<SavedDeviceState>,
}

/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify inside the window: where the VMM registers the
/// ioeventfds returned by [`MmioTransport::queue_notify_eventfds`].
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern virtio-mmio layout; version 1 is the legacy one.
pub const MMIO_VERSION: u32 = 2;
/// "JEVM"; the Linux driver does not interpret the vendor ID.
pub const VENDOR_ID: u32 = 0x4a45_564d;

// Register offsets (virtio 1.2, 4.2.2).
const REG_MAGIC_VALUE: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = QUEUE_NOTIFY_OFFSET;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE_OFFSET: u64 = 0x100;

const S_ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const S_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("virtio device type {device_type}: cannot restore saved state: {cause}")]
    Restore { device_type: u32, cause: String },
    #[error(
        "virtio device type {device_type}: queue {index} has invalid maximum size {size} \
         (must be a power of two between 1 and 32768)"
    )]
    InvalidQueueMaxSize {
        device_type: u32,
        index: usize,
        size: u16,
    },
    #[error("virtio device type {device_type}: device has no queues")]
    NoQueues { device_type: u32 },
    #[error(
        "virtio device type {device_type}: creating notify eventfd for queue {index}: {source}"
    )]
    EventFd {
        device_type: u32,
        index: usize,
        source: io::Error,
    },
}

/// What the driver configured for one queue, as raw register values.
///
/// Kept as plain data rather than a live [`Queue`]: the values are only
/// validated (and a `Queue` built) at DRIVER_OK, and a template save needs
/// exactly these values back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioQueueState {
    /// QueueNumMax, from the device.
    pub max_size: u16,
    /// QueueNum as last written by the driver.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// QueueDescLow/High.
    pub desc_table: u64,
    /// QueueDriverLow/High (the available ring).
    pub avail_ring: u64,
    /// QueueDeviceLow/High (the used ring).
    pub used_ring: u64,
}

impl MmioQueueState {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }
}

/// The transport's registers, saved by the template/clone feature.
///
/// InterruptStatus is not here: it lives in the shared [`IrqLine`] (which has
/// its own `set_status`). After activation the ring positions (next_avail,
/// next_used) belong to the device, not to this struct.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// DriverFeatures as written so far (both halves).
    pub acked_features: u64,
    pub queue_sel: u32,
    /// The Status register.
    pub status: u32,
    pub config_generation: u32,
    /// Whether `VirtioDevice::activate` succeeded and the device has not
    /// been reset since.
    pub activated: bool,
    pub queues: Vec<MmioQueueState>,
    /// SHMSel: the shared memory region the SHMLen/SHMBase reads describe
    /// (absent from templates saved before devices had regions).
    #[serde(default)]
    pub shm_sel: u32,
}

/// A virtio device behind a virtio-mmio (version 2) register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    irq: Arc<IrqLine>,
    notify: Vec<EventFd>,
    state: MmioState,
    /// Status writes the device could not honour (rate-limited in the log).
    guest_errors: GuestErrors,
}

impl MmioTransport {
    /// Wraps `device`; creates one notify EventFd per queue the device has.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irq: Arc<IrqLine>,
    ) -> Result<Self, MmioError> {
        let device_type = device.device_type();
        let max_sizes = device.queue_max_sizes().to_vec();
        if max_sizes.is_empty() {
            return Err(MmioError::NoQueues { device_type });
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut notify = Vec::with_capacity(max_sizes.len());
        for (index, &size) in max_sizes.iter().enumerate() {
            // Rejecting a bad maximum here turns a device-model bug into a
            // start-up error instead of a guest that cannot set up the queue.
            if Queue::new(size).is_err() {
                return Err(MmioError::InvalidQueueMaxSize {
                    device_type,
                    index,
                    size,
                });
            }
            queues.push(MmioQueueState::new(size));
            let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
                MmioError::EventFd {
                    device_type,
                    index,
                    source,
                }
            })?;
            notify.push(evt);
        }
        Ok(Self {
            device,
            mem,
            irq,
            notify,
            guest_errors: GuestErrors::default(),
            state: MmioState {
                queues,
                ..Default::default()
            },
        })
    }

    /// One EventFd per queue, in queue order. The VMM registers entry `i`
    /// as an ioeventfd at `base + QUEUE_NOTIFY_OFFSET`, 4 bytes, datamatch
    /// `i as u32`.
    /// None for a device that serves its queues inline: its QueueNotify
    /// writes must reach [`MmioTransport::write`].
    pub fn queue_notify_eventfds(&self) -> &[EventFd] {
        if self.device.serves_queues_inline() {
            &[]
        } else {
            &self.notify
        }
    }

    /// The interrupt line shared with the device.
    pub fn irq(&self) -> &Arc<IrqLine> {
        &self.irq
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The register and queue configuration state.
    pub fn state(&self) -> &MmioState {
        &self.state
    }

    /// Pauses the device at a quiet point and returns what a clone needs.
    /// The transport must not serve the guest afterwards.
    pub fn save(&mut self) -> Result<MmioDeviceState, DeviceError> {
        let queues = if self.state.activated {
            self.device.pause()?
        } else {
            Vec::new()
        };
        Ok(MmioDeviceState {
            device_type: self.device.device_type(),
            transport: self.state.clone(),
            interrupt_status: self.irq.status(),
            queues,
            device: self.device.saved_state(),
        })
    }

    /// Builds a transport for `device` in the state `save` recorded, and
    /// starts the device on the saved queue positions if it was active.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irq: Arc<IrqLine>,
        saved: &MmioDeviceState,
    ) -> Result<Self, MmioError> {
        let device_type = device.device_type();
        let fail = |cause: String| MmioError::Restore { device_type, cause };
        if saved.device_type != device_type {
            return Err(fail(format!(
                "saved state is for device type {}",
                saved.device_type
            )));
        }
        let mut t = Self::new(device, mem, irq)?;
        if saved.transport.queues.len() != t.state.queues.len() {
            return Err(fail(format!(
                "saved state has {} queues, the device has {}",
                saved.transport.queues.len(),
                t.state.queues.len()
            )));
        }
        // The saved registers come from a file: hold them to what the
        // device and the driver state machine could have produced.
        for (i, (q, own)) in saved
            .transport
            .queues
            .iter()
            .zip(&t.state.queues)
            .enumerate()
        {
            if q.max_size != own.max_size {
                return Err(fail(format!(
                    "saved queue {i} has limit {}, the device's is {}",
                    q.max_size, own.max_size
                )));
            }
        }
        let unoffered = saved.transport.acked_features & !t.device.avail_features();
        if unoffered != 0 {
            return Err(fail(format!(
                "saved state acks features {unoffered:#x} the device does not offer"
            )));
        }
        let running = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;
        if saved.transport.activated
            && (saved.transport.status & running != running
                || saved.transport.status & (S_FAILED | S_NEEDS_RESET) != 0)
        {
            return Err(fail(format!(
                "saved state is active with status {:#x}",
                saved.transport.status
            )));
        }
        t.state = saved.transport.clone();
        t.state.activated = false;
        t.irq.set_status(saved.interrupt_status);
        t.device.set_acked_features(saved.transport.acked_features);
        if let Some(state) = &saved.device {
            t.device
                .restore_state(state)
                .map_err(|e| fail(e.to_string()))?;
        }
        if saved.transport.activated {
            if saved.queues.len() != t.state.queues.len() {
                return Err(fail("queue positions missing".into()));
            }
            let mut queues = t.build_queues().map_err(fail)?;
            for (q, pos) in queues.iter_mut().zip(&saved.queues) {
                pos.apply(&mut q.queue);
            }
            t.device
                .activate(t.mem.clone(), t.irq.clone(), queues)
                .map_err(|e| fail(e.to_string()))?;
            t.state.activated = true;
        }
        Ok(t)
    }

    /// Tells the driver the device config space changed (e.g. a resized
    /// disk): bumps ConfigGeneration so multi-word reads retry, and raises a
    /// config interrupt.
    pub fn notify_config_change(&mut self) {
        self.state.config_generation = self.state.config_generation.wrapping_add(1);
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    /// A guest read of `data.len()` bytes at `offset` within the window.
    /// Invalid accesses read as zeros.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE_OFFSET {
            if self.config_access_ok(offset, data.len()) {
                self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            }
            return;
        }
        if !register_access_ok(offset, data.len()) {
            debug!(
                "{}: ignoring {}-byte read at {offset:#x}",
                self.name(),
                data.len()
            );
            return;
        }
        let value = match offset {
            REG_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.state.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.irq.status(),
            REG_STATUS => self.state.status,
            // A region the device does not have reads as length and base
            // all ones (virtio 1.2, 4.2.2.1).
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => {
                let (base, len) = self
                    .device
                    .shm_region(self.state.shm_sel)
                    .unwrap_or((u64::MAX, u64::MAX));
                match offset {
                    REG_SHM_LEN_LOW => len as u32,
                    REG_SHM_LEN_HIGH => (len >> 32) as u32,
                    REG_SHM_BASE_LOW => base as u32,
                    _ => (base >> 32) as u32,
                }
            }
            REG_CONFIG_GENERATION => self.state.config_generation,
            _ => {
                debug!(
                    "{}: read of write-only or unknown register {offset:#x}",
                    self.name()
                );
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A guest write of `data` at `offset` within the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if self.config_access_ok(offset, data.len()) {
                self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            debug!(
                "{}: ignoring {}-byte write at {offset:#x}",
                self.name(),
                data.len()
            );
            return;
        };
        if offset & 3 != 0 {
            debug!("{}: ignoring unaligned write at {offset:#x}", self.name());
            return;
        }
        let value = u32::from_le_bytes(bytes);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.state.device_features_sel = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_DRIVER_FEATURES_SEL => self.state.driver_features_sel = value,
            REG_QUEUE_SEL => self.state.queue_sel = value,
            REG_QUEUE_NUM => {
                // An out-of-range size is kept as 0 so DRIVER_OK fails
                // instead of a truncated size being used.
                let size = u16::try_from(value).unwrap_or(0);
                self.write_queue(offset, |q| q.size = size)
            }
            REG_QUEUE_READY => self.write_queue(offset, |q| q.ready = value != 0),
            REG_QUEUE_DESC_LOW => self.write_queue(offset, |q| set_low(&mut q.desc_table, value)),
            REG_QUEUE_DESC_HIGH => self.write_queue(offset, |q| set_high(&mut q.desc_table, value)),
            REG_QUEUE_DRIVER_LOW => self.write_queue(offset, |q| set_low(&mut q.avail_ring, value)),
            REG_QUEUE_DRIVER_HIGH => {
                self.write_queue(offset, |q| set_high(&mut q.avail_ring, value))
            }
            REG_QUEUE_DEVICE_LOW => self.write_queue(offset, |q| set_low(&mut q.used_ring, value)),
            REG_QUEUE_DEVICE_HIGH => {
                self.write_queue(offset, |q| set_high(&mut q.used_ring, value))
            }
            REG_QUEUE_NOTIFY => self.queue_notify(value),
            REG_INTERRUPT_ACK => self.irq.ack(value),
            REG_STATUS => self.write_status(value),
            REG_SHM_SEL => self.state.shm_sel = value,
            _ => debug!(
                "{}: write of read-only or unknown register {offset:#x}",
                self.name()
            ),
        }
    }

    fn name(&self) -> String {
        format!(
            "virtio-mmio (device type {}, gsi {})",
            self.device.device_type(),
            self.irq.gsi
        )
    }

    fn config_access_ok(&self, offset: u64, len: usize) -> bool {
        let ok = matches!(len, 1 | 2 | 4 | 8)
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= MMIO_WINDOW_SIZE);
        if !ok {
            debug!(
                "{}: ignoring {len}-byte config access at {offset:#x}",
                self.name()
            );
        }
        ok
    }

    fn selected_queue(&self) -> Option<&MmioQueueState> {
        self.state.queues.get(self.state.queue_sel as usize)
    }

    fn write_driver_features(&mut self, value: u32) {
        let status = self.state.status;
        if status & S_DRIVER == 0 || status & (S_FEATURES_OK | S_FAILED) != 0 {
            debug!(
                "{}: DriverFeatures write in status {status:#x} ignored",
                self.name()
            );
            return;
        }
        let shift = match self.state.driver_features_sel {
            0 => 0,
            1 => 32,
            sel => {
                if value != 0 {
                    debug!(
                        "{}: features {value:#x} in unknown word {sel} ignored",
                        self.name()
                    );
                }
                return;
            }
        };
        let offered = (self.device.avail_features() >> shift) as u32;
        if value & !offered != 0 {
            debug!(
                "{}: driver acked features {:#x} the device did not offer; dropped",
                self.name(),
                u64::from(value & !offered) << shift
            );
        }
        let mask = 0xffff_ffffu64 << shift;
        self.state.acked_features =
            (self.state.acked_features & !mask) | (u64::from(value & offered) << shift);
    }

    /// Applies `f` to the selected queue if the driver may configure queues
    /// now: between FEATURES_OK and DRIVER_OK (virtio 1.2, 3.1.1).
    fn write_queue(&mut self, offset: u64, f: impl FnOnce(&mut MmioQueueState)) {
        let status = self.state.status;
        if status & S_FEATURES_OK == 0 || status & (S_DRIVER_OK | S_FAILED) != 0 {
            debug!(
                "{}: queue register {offset:#x} written in status {status:#x}",
                self.name()
            );
            return;
        }
        let sel = self.state.queue_sel;
        match self.state.queues.get_mut(sel as usize) {
            Some(q) => f(q),
            None => debug!(
                "{}: queue register {offset:#x} for absent queue {sel}",
                self.name()
            ),
        }
    }

    fn queue_notify(&mut self, index: u32) {
        if self.device.serves_queues_inline() {
            if self.state.activated {
                self.device.queue_notify(index);
            } else {
                debug!("{}: notify before DRIVER_OK ignored", self.name());
            }
            return;
        }
        match self.notify.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn!("{}: signalling queue {index}: {e}", self.name());
                }
            }
            None => debug!("{}: notify for absent queue {index}", self.name()),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.state.status;
        // NEEDS_RESET is the device's bit; drivers write back what they read.
        let requested = (value & !S_NEEDS_RESET) | (old & S_NEEDS_RESET);
        if requested & old != old {
            debug!(
                "{}: status {old:#x} -> {value:#x} clears bits; ignored",
                self.name()
            );
            return;
        }
        let added = requested & !old;
        let mut status = old;
        // Each bit is only taken once its predecessor in the initialisation
        // sequence (virtio 1.2, 3.1.1) is set; a bit out of order is dropped
        // and the rest of the write still applies.
        if added & S_ACKNOWLEDGE != 0 {
            status |= S_ACKNOWLEDGE;
        }
        if added & S_DRIVER != 0 {
            if status & S_ACKNOWLEDGE != 0 {
                status |= S_DRIVER;
            } else {
                debug!("{}: DRIVER before ACKNOWLEDGE ignored", self.name());
            }
        }
        if added & S_FEATURES_OK != 0 {
            if status & S_DRIVER == 0 {
                debug!("{}: FEATURES_OK before DRIVER ignored", self.name());
            } else if self.state.acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                // Leaving FEATURES_OK clear is how the device says no; the
                // driver reads the status back and gives up.
                debug!("{}: driver did not accept VIRTIO_F_VERSION_1", self.name());
            } else {
                status |= S_FEATURES_OK;
                self.device.set_acked_features(self.state.acked_features);
            }
        }
        if added & S_DRIVER_OK != 0 {
            if status & S_FEATURES_OK == 0 {
                debug!("{}: DRIVER_OK before FEATURES_OK ignored", self.name());
            } else {
                status |= S_DRIVER_OK;
            }
        }
        if added & S_FAILED != 0 {
            status |= S_FAILED;
        }
        let unknown = added & !(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK | S_FAILED);
        if unknown != 0 {
            debug!("{}: unknown status bits {unknown:#x} ignored", self.name());
        }
        self.state.status = status;

        if status & S_DRIVER_OK != 0
            && old & S_DRIVER_OK == 0
            && status & (S_FAILED | S_NEEDS_RESET) == 0
        {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.state.activated {
            return;
        }
        match self.build_queues() {
            Ok(queues) => {
                match self
                    .device
                    .activate(self.mem.clone(), self.irq.clone(), queues)
                {
                    Ok(()) => {
                        self.state.activated = true;
                        return;
                    }
                    Err(e) => {
                        guest_warn!(self.guest_errors, "{}: activation failed: {e}", self.name())
                    }
                }
            }
            Err(e) => guest_warn!(
                self.guest_errors,
                "{}: driver set DRIVER_OK with {e}",
                self.name()
            ),
        }
        self.state.status |= S_NEEDS_RESET;
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    /// Builds the queues the device gets, checking what the driver wrote.
    /// Queues the driver left unready are passed on unready, so that queue
    /// indices stay meaningful to the device.
    fn build_queues(&self) -> Result<Vec<ActiveQueue>, String> {
        let event_idx = self.state.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.state.queues.len());
        for (index, (qs, evt)) in self.state.queues.iter().zip(&self.notify).enumerate() {
            let mut queue = Queue::new(qs.max_size).map_err(|e| format!("queue {index}: {e:?}"))?;
            if qs.ready {
                let bad = |what: &str, e: virtio_queue::Error| {
                    format!("queue {index}: invalid {what}: {e:?}")
                };
                queue.try_set_size(qs.size).map_err(|e| bad("size", e))?;
                queue
                    .try_set_desc_table_address(GuestAddress(qs.desc_table))
                    .map_err(|e| bad("descriptor table address", e))?;
                queue
                    .try_set_avail_ring_address(GuestAddress(qs.avail_ring))
                    .map_err(|e| bad("available ring address", e))?;
                queue
                    .try_set_used_ring_address(GuestAddress(qs.used_ring))
                    .map_err(|e| bad("used ring address", e))?;
                queue.set_ready(true);
                queue.set_event_idx(event_idx);
                if !queue.is_valid(&self.mem) {
                    return Err(format!("queue {index}: rings outside guest memory"));
                }
            }
            let notify = evt
                .try_clone()
                .map_err(|e| format!("queue {index}: eventfd: {e}"))?;
            queues.push(ActiveQueue { queue, notify });
        }
        Ok(queues)
    }

    fn reset(&mut self) {
        if self.state.activated {
            if !self.device.reset() {
                // The device is still running its queues; re-activating it
                // would give two owners the same rings. Stay broken instead.
                guest_warn!(self.guest_errors, "{}: device cannot be reset", self.name());
                self.state.status |= S_NEEDS_RESET;
                self.raise(VIRTIO_MMIO_INT_CONFIG);
                return;
            }
            self.state.activated = false;
        }
        for q in &mut self.state.queues {
            *q = MmioQueueState::new(q.max_size);
        }
        self.state.status = 0;
        self.state.device_features_sel = 0;
        self.state.driver_features_sel = 0;
        self.state.acked_features = 0;
        self.state.queue_sel = 0;
        self.irq.set_status(0);
        // A notify counted before the reset must not wake the next
        // activation's worker with a stale kick.
        for evt in &self.notify {
            let _ = evt.read();
        }
    }

    fn raise(&self, bits: u32) {
        if let Err(e) = self.irq.trigger(bits) {
            warn!("{}: raising interrupt: {e}", self.name());
        }
    }
}

fn register_access_ok(offset: u64, len: usize) -> bool {
    len == 4 && offset & 3 == 0
}

fn set_low(reg: &mut u64, value: u32) {
    *reg = (*reg & !0xffff_ffff) | u64::from(value);
}

fn set_high(reg: &mut u64, value: u32) {
    *reg = (*reg & 0xffff_ffff) | (u64::from(value) << 32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::devices::{DeviceError, VIRTIO_MMIO_INT_VRING};
    use std::sync::Mutex;
    use vm_memory::GuestMemoryMmap;

    const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << 5) | (1 << VIRTIO_RING_F_EVENT_IDX);

    #[derive(Default)]
    struct Calls {
        acked: Vec<u64>,
        activations: Vec<Vec<virtio_queue::QueueState>>,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
        inline_notifies: Vec<u32>,
    }

    struct FakeDevice {
        calls: Arc<Mutex<Calls>>,
        fail_activate: bool,
        queue_sizes: Vec<u16>,
        inline: bool,
    }

    /// The fake's one shared memory region: id 1 (0 is absent).
    const FAKE_SHM: (u64, u64) = (0x4_1234_5000, 0x1_2000_0000);

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            2
        }
        fn shm_region(&self, id: u32) -> Option<(u64, u64)> {
            (id == 1).then_some(FAKE_SHM)
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.queue_sizes
        }
        fn avail_features(&self) -> u64 {
            FEATURES
        }
        fn set_acked_features(&mut self, features: u64) {
            self.calls.lock().unwrap().acked.push(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let config: Vec<u8> = (0u8..16).collect();
            for (i, b) in data.iter_mut().enumerate() {
                *b = config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.calls
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _mem: GuestMemory,
            _irq: Arc<IrqLine>,
            queues: Vec<ActiveQueue>,
        ) -> Result<(), DeviceError> {
            if self.fail_activate {
                return Err(DeviceError::Activate {
                    device: "fake",
                    cause: "test".into(),
                });
            }
            // The notify fd handed over must be the one KVM signals.
            for q in &queues {
                q.notify.write(1).unwrap();
                q.notify.read().unwrap();
            }
            let states = queues.iter().map(|q| q.queue.state()).collect();
            self.calls.lock().unwrap().activations.push(states);
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.calls.lock().unwrap().resets += 1;
            true
        }
        fn serves_queues_inline(&self) -> bool {
            self.inline
        }
        fn queue_notify(&mut self, index: u32) {
            self.calls.lock().unwrap().inline_notifies.push(index);
        }
    }

    struct Fixture {
        t: MmioTransport,
        calls: Arc<Mutex<Calls>>,
        irq: Arc<IrqLine>,
    }

    fn fixture_with(fail_activate: bool) -> Fixture {
        let calls = Arc::new(Mutex::new(Calls::default()));
        let dev = FakeDevice {
            calls: calls.clone(),
            fail_activate,
            queue_sizes: vec![256, 16],
            inline: false,
        };
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = Arc::new(IrqLine::new(5).unwrap());
        let t = MmioTransport::new(Box::new(dev), mem, irq.clone()).unwrap();
        Fixture { t, calls, irq }
    }

    fn fixture() -> Fixture {
        fixture_with(false)
    }

    impl Fixture {
        fn r(&mut self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.t.read(offset, &mut b);
            u32::from_le_bytes(b)
        }
        fn w(&mut self, offset: u64, v: u32) {
            self.t.write(offset, &v.to_le_bytes());
        }
        fn negotiate(&mut self, features: u64) {
            self.w(REG_STATUS, S_ACKNOWLEDGE);
            self.w(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
            self.w(REG_DRIVER_FEATURES_SEL, 0);
            self.w(REG_DRIVER_FEATURES, features as u32);
            self.w(REG_DRIVER_FEATURES_SEL, 1);
            self.w(REG_DRIVER_FEATURES, (features >> 32) as u32);
            self.w(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        }
        fn setup_queue(&mut self, index: u32, size: u32, base: u64) {
            self.w(REG_QUEUE_SEL, index);
            self.w(REG_QUEUE_NUM, size);
            self.w(REG_QUEUE_DESC_LOW, base as u32);
            self.w(REG_QUEUE_DESC_HIGH, (base >> 32) as u32);
            self.w(REG_QUEUE_DRIVER_LOW, (base + 0x4000) as u32);
            self.w(REG_QUEUE_DRIVER_HIGH, 0);
            self.w(REG_QUEUE_DEVICE_LOW, (base + 0x8000) as u32);
            self.w(REG_QUEUE_DEVICE_HIGH, 0);
            self.w(REG_QUEUE_READY, 1);
        }
        fn bring_up(&mut self) {
            self.negotiate(FEATURES);
            self.setup_queue(0, 128, 0x1_0000);
            self.setup_queue(1, 16, 0x2_0000);
            self.w(
                REG_STATUS,
                S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
            );
        }
    }

    #[test]
    fn probe_reads_magic_version_device_and_vendor_id() {
        let mut f = fixture();
        assert_eq!(f.r(REG_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(f.r(REG_VERSION), 2);
        assert_eq!(f.r(REG_DEVICE_ID), 2);
        assert_eq!(f.r(REG_VENDOR_ID), VENDOR_ID);
        assert_eq!(f.r(REG_SHM_LEN_LOW), u32::MAX);
    }

    #[test]
    fn shared_memory_registers_describe_the_selected_region_or_all_ones() {
        let mut f = fixture();
        let regs = |f: &mut Fixture| {
            [
                REG_SHM_LEN_LOW,
                REG_SHM_LEN_HIGH,
                REG_SHM_BASE_LOW,
                REG_SHM_BASE_HIGH,
            ]
            .map(|r| f.r(r))
        };
        assert_eq!(regs(&mut f), [u32::MAX; 4], "region 0 is absent");
        f.w(REG_SHM_SEL, 1);
        let (base, len) = FAKE_SHM;
        assert_eq!(
            regs(&mut f),
            [
                len as u32,
                (len >> 32) as u32,
                base as u32,
                (base >> 32) as u32
            ]
        );
        f.w(REG_SHM_SEL, u32::MAX);
        assert_eq!(regs(&mut f), [u32::MAX; 4]);
    }

    #[test]
    fn unaligned_or_wrong_size_register_access_reads_zero_and_writes_nothing() {
        let mut f = fixture();
        let mut b = [0xffu8; 2];
        f.t.read(REG_MAGIC_VALUE, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 4];
        f.t.read(REG_MAGIC_VALUE + 1, &mut b);
        assert_eq!(b, [0; 4]);
        f.t.write(REG_STATUS, &[1, 0]);
        f.t.write(REG_STATUS + 2, &1u32.to_le_bytes());
        assert_eq!(f.r(REG_STATUS), 0);
    }

    #[test]
    fn device_features_are_exposed_in_two_32_bit_halves() {
        let mut f = fixture();
        f.w(REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(f.r(REG_DEVICE_FEATURES), FEATURES as u32);
        f.w(REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(f.r(REG_DEVICE_FEATURES), (FEATURES >> 32) as u32);
        f.w(REG_DEVICE_FEATURES_SEL, 2);
        assert_eq!(f.r(REG_DEVICE_FEATURES), 0);
    }

    #[test]
    fn driver_features_from_both_halves_reach_the_device_at_features_ok() {
        let mut f = fixture();
        // Bit 3 was never offered: it must be dropped, not passed on.
        f.negotiate((1 << VIRTIO_F_VERSION_1) | (1 << 5) | (1 << 3));
        assert_eq!(f.r(REG_STATUS), S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_eq!(
            f.calls.lock().unwrap().acked,
            vec![(1 << VIRTIO_F_VERSION_1) | (1 << 5)]
        );
        // Features are frozen once FEATURES_OK is set.
        f.w(REG_DRIVER_FEATURES_SEL, 0);
        f.w(REG_DRIVER_FEATURES, 0);
        assert_eq!(
            f.t.state().acked_features,
            (1 << VIRTIO_F_VERSION_1) | (1 << 5)
        );
    }

    #[test]
    fn features_ok_is_refused_without_version_1() {
        let mut f = fixture();
        f.negotiate(1 << 5);
        assert_eq!(f.r(REG_STATUS), S_ACKNOWLEDGE | S_DRIVER);
        assert!(f.calls.lock().unwrap().acked.is_empty());
    }

    #[test]
    fn status_bits_out_of_order_are_not_taken() {
        let mut f = fixture();
        f.w(REG_STATUS, S_DRIVER);
        assert_eq!(f.r(REG_STATUS), 0);
        f.w(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK);
        assert_eq!(f.r(REG_STATUS), S_ACKNOWLEDGE | S_DRIVER);
        // Clearing a bit without a reset is invalid.
        f.w(REG_STATUS, S_ACKNOWLEDGE);
        assert_eq!(f.r(REG_STATUS), S_ACKNOWLEDGE | S_DRIVER);
        assert!(f.calls.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn queue_setup_is_readable_back_and_recorded_in_state() {
        let mut f = fixture();
        f.w(REG_QUEUE_SEL, 1);
        assert_eq!(f.r(REG_QUEUE_NUM_MAX), 16);
        f.w(REG_QUEUE_SEL, 7);
        assert_eq!(f.r(REG_QUEUE_NUM_MAX), 0);
        // Before FEATURES_OK queue writes are ignored.
        f.w(REG_QUEUE_SEL, 0);
        f.w(REG_QUEUE_NUM, 64);
        assert_eq!(f.t.state().queues[0].size, 256);

        f.negotiate(FEATURES);
        f.setup_queue(0, 128, 0x1_0000_0000);
        f.w(REG_QUEUE_SEL, 0);
        assert_eq!(f.r(REG_QUEUE_READY), 1);
        let q = &f.t.state().queues[0];
        assert_eq!(
            *q,
            MmioQueueState {
                max_size: 256,
                size: 128,
                ready: true,
                desc_table: 0x1_0000_0000,
                avail_ring: 0x4000,
                used_ring: 0x8000,
            }
        );
    }

    #[test]
    fn driver_ok_activates_once_with_the_configured_queues() {
        let mut f = fixture();
        f.bring_up();
        assert!(f.t.state().activated);
        assert_eq!(f.r(REG_STATUS) & S_NEEDS_RESET, 0);
        // Writing DRIVER_OK again must not activate twice.
        f.w(
            REG_STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        let calls = f.calls.lock().unwrap();
        assert_eq!(calls.activations.len(), 1);
        let q = &calls.activations[0];
        assert_eq!(q.len(), 2);
        assert_eq!(
            (q[0].size, q[0].desc_table, q[0].avail_ring, q[0].used_ring),
            (128, 0x1_0000, 0x1_4000, 0x1_8000)
        );
        assert_eq!((q[1].size, q[1].desc_table), (16, 0x2_0000));
        assert!(q[0].ready && q[0].event_idx_enabled);
    }

    #[test]
    fn queue_writes_after_driver_ok_are_ignored() {
        let mut f = fixture();
        f.bring_up();
        f.w(REG_QUEUE_SEL, 0);
        f.w(REG_QUEUE_NUM, 8);
        f.w(REG_QUEUE_READY, 0);
        assert_eq!(f.t.state().queues[0].size, 128);
        assert!(f.t.state().queues[0].ready);
    }

    #[test]
    fn rings_outside_guest_memory_set_needs_reset_instead_of_activating() {
        let mut f = fixture();
        f.negotiate(FEATURES);
        f.setup_queue(0, 128, 0x10_0000_0000);
        f.w(
            REG_STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        assert!(f.calls.lock().unwrap().activations.is_empty());
        assert_ne!(f.r(REG_STATUS) & S_NEEDS_RESET, 0);
        assert_eq!(
            f.irq.status() & VIRTIO_MMIO_INT_CONFIG,
            VIRTIO_MMIO_INT_CONFIG
        );
    }

    #[test]
    fn queue_size_above_u16_is_not_truncated_into_a_valid_one() {
        let mut f = fixture();
        f.negotiate(FEATURES);
        f.setup_queue(0, 0x1_0080, 0x1_0000);
        f.setup_queue(1, 16, 0x2_0000);
        f.w(
            REG_STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        assert!(f.calls.lock().unwrap().activations.is_empty());
        assert_ne!(f.r(REG_STATUS) & S_NEEDS_RESET, 0);
    }

    #[test]
    fn invalid_queue_size_sets_needs_reset() {
        let mut f = fixture();
        f.negotiate(FEATURES);
        f.setup_queue(0, 100, 0x1_0000);
        f.w(
            REG_STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        assert!(!f.t.state().activated);
        assert_ne!(f.r(REG_STATUS) & S_NEEDS_RESET, 0);
    }

    #[test]
    fn failed_activation_sets_needs_reset_and_raises_config_interrupt() {
        let mut f = fixture_with(true);
        f.bring_up();
        assert!(!f.t.state().activated);
        assert_ne!(f.r(REG_STATUS) & S_NEEDS_RESET, 0);
        assert_eq!(f.r(REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(f.irq.evt.read().unwrap(), 1);
        // A driver echoing NEEDS_RESET back must not be able to clear it.
        let s = f.r(REG_STATUS);
        f.w(REG_STATUS, s & !S_NEEDS_RESET);
        assert_ne!(f.r(REG_STATUS) & S_NEEDS_RESET, 0);
    }

    #[test]
    fn status_zero_resets_device_and_queues() {
        let mut f = fixture();
        f.bring_up();
        f.irq.trigger(VIRTIO_MMIO_INT_VRING).unwrap();
        f.t.queue_notify_eventfds()[0].write(3).unwrap();
        f.w(REG_STATUS, 0);
        assert_eq!(f.calls.lock().unwrap().resets, 1);
        assert_eq!(f.r(REG_STATUS), 0);
        assert_eq!(f.r(REG_INTERRUPT_STATUS), 0);
        let st = f.t.state();
        assert!(!st.activated);
        assert_eq!(st.acked_features, 0);
        assert_eq!(st.queues[0], MmioQueueState::new(256));
        assert!(
            f.t.queue_notify_eventfds()[0].read().is_err(),
            "stale kick survived reset"
        );
        // And the device can be brought up again.
        f.bring_up();
        assert_eq!(f.calls.lock().unwrap().activations.len(), 2);
    }

    #[test]
    fn reset_before_activation_does_not_reset_device() {
        let mut f = fixture();
        f.negotiate(FEATURES);
        f.w(REG_STATUS, 0);
        assert_eq!(f.calls.lock().unwrap().resets, 0);
        assert_eq!(f.r(REG_STATUS), 0);
    }

    #[test]
    fn interrupt_status_reflects_irq_line_and_ack_clears_bits() {
        let mut f = fixture();
        f.irq
            .trigger(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG)
            .unwrap();
        assert_eq!(f.r(REG_INTERRUPT_STATUS), 3);
        f.w(REG_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(f.r(REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        f.w(REG_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(f.r(REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn queue_notify_write_signals_that_queues_eventfd() {
        let mut f = fixture();
        f.w(REG_QUEUE_NOTIFY, 1);
        f.w(REG_QUEUE_NOTIFY, 9);
        let fds = f.t.queue_notify_eventfds();
        assert_eq!(fds.len(), 2);
        assert!(fds[0].read().is_err());
        assert_eq!(fds[1].read().unwrap(), 1);
    }

    #[test]
    fn an_inline_device_gets_its_notifies_on_the_caller_and_has_no_ioeventfds() {
        let mut f = fixture();
        let calls = Arc::new(Mutex::new(Calls::default()));
        let dev = FakeDevice {
            calls: calls.clone(),
            fail_activate: false,
            queue_sizes: vec![256, 16],
            inline: true,
        };
        f.t = MmioTransport::new(Box::new(dev), f.t.mem.clone(), f.irq.clone()).unwrap();
        assert!(f.t.queue_notify_eventfds().is_empty());
        f.w(REG_QUEUE_NOTIFY, 1);
        assert!(
            calls.lock().unwrap().inline_notifies.is_empty(),
            "before DRIVER_OK"
        );
        f.bring_up();
        f.w(REG_QUEUE_NOTIFY, 1);
        f.w(REG_QUEUE_NOTIFY, 0);
        assert_eq!(calls.lock().unwrap().inline_notifies, vec![1, 0]);
        assert!(
            f.t.notify.iter().all(|e| e.read().is_err()),
            "an eventfd was signalled"
        );
    }

    #[test]
    fn config_space_is_forwarded_with_offset_relative_to_0x100() {
        let mut f = fixture();
        let mut b = [0u8; 8];
        f.t.read(0x104, &mut b);
        assert_eq!(b, [4, 5, 6, 7, 8, 9, 10, 11]);
        let mut b = [0u8; 1];
        f.t.read(0x10f, &mut b);
        assert_eq!(b, [15]);
        f.t.write(0x102, &[0xaa, 0xbb]);
        // Past the end of the window: dropped.
        f.t.write(0xfff, &[1, 2]);
        assert_eq!(
            f.calls.lock().unwrap().config_writes,
            vec![(2, vec![0xaa, 0xbb])]
        );
    }

    #[test]
    fn config_change_bumps_generation_and_raises_config_interrupt() {
        let mut f = fixture();
        assert_eq!(f.r(REG_CONFIG_GENERATION), 0);
        f.t.notify_config_change();
        assert_eq!(f.r(REG_CONFIG_GENERATION), 1);
        assert_eq!(f.r(REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
    }

    #[test]
    fn invalid_queue_max_size_is_refused_at_construction() {
        let calls = Arc::new(Mutex::new(Calls::default()));
        let dev = FakeDevice {
            calls,
            fail_activate: false,
            queue_sizes: vec![100],
            inline: false,
        };
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let irq = Arc::new(IrqLine::new(5).unwrap());
        let err = MmioTransport::new(Box::new(dev), mem, irq).err().unwrap();
        assert!(matches!(
            err,
            MmioError::InvalidQueueMaxSize {
                index: 0,
                size: 100,
                ..
            }
        ));
    }
}

#[cfg(test)]
#[path = "mmio_fuzz.rs"]
mod fuzz;
