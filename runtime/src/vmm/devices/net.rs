//! virtio-net (device type 1) on a tap device.
//!
//! Two queues, receive (0) and transmit (1). A "net" worker thread sleeps in
//! epoll on both queues' notify EventFds, the tap and a stop EventFd. Frames
//! cross as the tap gives and takes them: the tap is opened with
//! `IFF_VNET_HDR` and a 12-byte header, the same `virtio_net_hdr` (with
//! `num_buffers`) a VERSION_1 driver puts before every frame, so checksum
//! and segmentation offload metadata passes through untouched and a 64 KiB
//! TSO frame crosses in one copy instead of forty-odd.
//!
//! Every VM carries the device. A template's is *unattached*: no tap, frames
//! the guest sends are dropped, nothing arrives; the agent never brings the
//! template's interface up, so no packet is sent before the snapshot and the
//! kernel draws its network secrets per clone (docs/design.md). A pod's
//! clone restores the device on the tap the shim made in the pod's network
//! namespace. The VMM never enters that namespace: it only holds the fd.
//!
//! Offloads: the driver may hand us partially checksummed and TSO frames
//! (`CSUM`, `HOST_TSO4/6`); the tap takes them as they are. Towards the
//! guest the tap is told (`TUNSETOFFLOAD`) what the driver accepted
//! (`GUEST_CSUM`, `GUEST_TSO4/6`), so the host kernel segments only what
//! the guest cannot take. Without `MRG_RXBUF` the Linux driver posts
//! receive buffers big enough for a whole 64 KiB frame ("big packets").
//!
//! The guest is untrusted: chains are walked with virtio-queue's
//! `Reader`/`Writer`, which bound every access by guest memory and the
//! descriptor lengths; a chain too long or too short for a frame is
//! dropped and counted, never a reason to stop serving the queue.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use log::{debug, error, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_val;
use vmm_sys_util::ioctl_iow_nr;

use super::gate::MemoryGate;
use super::guest_errors::{guest_warn, GuestErrors};
use super::worker::{stop_pair, WorkerThread};
use super::{
    ActiveQueue, DeviceError, GuestMemory, IrqLine, QueuePosition, VirtioDevice,
    VIRTIO_MMIO_INT_VRING,
};
use crate::jail::ThreadKind;

/// Virtio device ID of a network card (virtio 1.2, 5.1).
pub const VIRTIO_ID_NET: u32 = 1;
/// receive, transmit.
const QUEUE_SIZES: [u16; 2] = [256, 256];
const RX: usize = 0;
const TX: usize = 1;
/// `struct virtio_net_hdr_v1`: what precedes every frame on both queues and
/// on the tap (TUNSETVNETHDRSZ 12).
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS: usize = 10;
/// Header + the largest frame a TSO driver or the tap produces (64 KiB of
/// IP packet + Ethernet and VLAN headers), with room to spare.
const MAX_BUFFER: usize = VNET_HDR_LEN + 65_536 + 32;
const DEVICE: &str = "virtio-net";

const TOKEN_STOP: u64 = 0;
const TOKEN_RX_QUEUE: u64 = 1;
const TOKEN_TX_QUEUE: u64 = 2;
const TOKEN_TAP: u64 = 3;

// linux/if_tun.h
const TUNTAP: u32 = b'T' as u32;
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, ::std::os::raw::c_uint);
const TUN_F_CSUM: u64 = 0x01;
const TUN_F_TSO4: u64 = 0x02;
const TUN_F_TSO6: u64 = 0x04;

/// Frames the device dropped, by cause; the guest can cause all of them,
/// so they are counted and logged at debug level only.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub tx_frames: AtomicU64,
    pub rx_frames: AtomicU64,
    /// A transmit chain that is not a readable header + frame.
    pub tx_malformed: AtomicU64,
    /// The tap refused a frame (no carrier on the other side, full queue).
    pub tx_tap_errors: AtomicU64,
    /// A receive buffer smaller than the frame it was to hold.
    pub rx_too_small: AtomicU64,
    /// Sent while the device had no tap (a template, a clone without a
    /// network).
    pub tx_unattached: AtomicU64,
    /// Rings the guest made unusable (a bad address or index).
    pub guest_errors: GuestErrors,
}

/// The virtio-net device.
pub struct Net {
    tap: Option<Arc<File>>,
    acked_features: u64,
    counters: Arc<NetCounters>,
    worker: Option<WorkerThread<Worker>>,
    gate: MemoryGate,
}

impl Net {
    /// A device with nothing behind it (every boot and template VM).
    pub fn unattached() -> Net {
        Net {
            tap: None,
            acked_features: 0,
            counters: Arc::default(),
            worker: None,
            gate: MemoryGate::default(),
        }
    }

    /// A device on `tap`: an fd of a tap opened with `IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR`, a 12-byte vnet header and `O_NONBLOCK`.
    pub fn with_tap(tap: Arc<File>) -> Net {
        Net {
            tap: Some(tap),
            acked_features: 0,
            counters: Arc::default(),
            worker: None,
            gate: MemoryGate::default(),
        }
    }

    pub fn counters(&self) -> Arc<NetCounters> {
        Arc::clone(&self.counters)
    }

    fn name(&self) -> String {
        match &self.tap {
            Some(t) => format!("{DEVICE} (tap fd {})", t.as_raw_fd()),
            None => format!("{DEVICE} (unattached)"),
        }
    }

    /// Tells the tap which offloads the guest's receive side accepted.
    fn set_tap_offloads(&self, tap: &File) -> io::Result<()> {
        let f = self.acked_features;
        let mut flags = 0;
        if f & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0 {
            flags |= TUN_F_CSUM;
            if f & (1 << VIRTIO_NET_F_GUEST_TSO4) != 0 {
                flags |= TUN_F_TSO4;
            }
            if f & (1 << VIRTIO_NET_F_GUEST_TSO6) != 0 {
                flags |= TUN_F_TSO6;
            }
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no
        // memory of ours; `tap` is an open fd we own a reference to.
        let rc = unsafe { ioctl_with_val(tap, TUNSETOFFLOAD(), flags) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn stop_worker(&mut self) -> Option<Worker> {
        let worker = self.worker.take()?;
        worker.stop(&self.name())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_HOST_TSO6)
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    /// No config-space feature is offered (no MAC, STATUS or MTU field):
    /// the agent gives the interface its MAC and MTU per clone.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&[], offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "{DEVICE}: ignoring {}-byte config space write at {offset:#x}",
            data.len()
        );
    }

    fn set_memory_gate(&mut self, gate: MemoryGate) {
        self.gate = gate;
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        irq: Arc<IrqLine>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), DeviceError> {
        let queues: [ActiveQueue; 2] =
            super::activation_queues(DEVICE, self.worker.is_some(), queues)?;
        let io_err = |source| DeviceError::Io {
            device: DEVICE,
            source,
        };
        if let Some(tap) = &self.tap {
            self.set_tap_offloads(tap).map_err(io_err)?;
        }
        let (stop, worker_stop) = stop_pair().map_err(io_err)?;
        let epoll = Epoll::new().map_err(io_err)?;
        let add = |fd: i32, events: EventSet, token: u64| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(io_err)
        };
        add(worker_stop.as_raw_fd(), EventSet::IN, TOKEN_STOP)?;
        add(queues[RX].notify.as_raw_fd(), EventSet::IN, TOKEN_RX_QUEUE)?;
        add(queues[TX].notify.as_raw_fd(), EventSet::IN, TOKEN_TX_QUEUE)?;
        if let Some(tap) = &self.tap {
            // Edge-triggered: the worker reads the tap until EAGAIN, or until
            // the guest has no receive buffer left (then the receive queue's
            // notify wakes it to go on).
            add(
                tap.as_raw_fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                TOKEN_TAP,
            )?;
        }
        let worker = Worker {
            name: self.name(),
            mem,
            irq,
            queues,
            tap: self.tap.clone(),
            counters: Arc::clone(&self.counters),
            epoll,
            stop: worker_stop,
            gate: self.gate.clone(),
            rx_pending: None,
            rx_buf: Vec::new(),
            tx_buf: Vec::new(),
        };
        self.worker = Some(
            WorkerThread::spawn("net", ThreadKind::Net, stop, move || worker.run())
                .map_err(io_err)?,
        );
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop_worker();
        self.acked_features = 0;
        true
    }

    fn pause(&mut self) -> Result<Vec<QueuePosition>, DeviceError> {
        let worker = self.stop_worker().ok_or_else(|| DeviceError::NotQuiet {
            device: DEVICE,
            cause: "the device is not active".into(),
        })?;
        if worker.rx_pending.is_some() {
            // Only a device with a tap can hold a frame; templates have none.
            return Err(DeviceError::NotQuiet {
                device: DEVICE,
                cause: "a received frame is waiting for a guest buffer".into(),
            });
        }
        Ok(worker
            .queues
            .iter()
            .map(|q| QueuePosition::of(&q.queue))
            .collect())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// Everything the worker thread owns.
struct Worker {
    name: String,
    mem: GuestMemory,
    irq: Arc<IrqLine>,
    queues: [ActiveQueue; 2],
    tap: Option<Arc<File>>,
    counters: Arc<NetCounters>,
    epoll: Epoll,
    stop: EventFd,
    gate: MemoryGate,
    /// The length of a frame in `rx_buf` that found no receive buffer
    /// yet: the tap is not read again until it is delivered.
    rx_pending: Option<usize>,
    /// One frame each way, header included; allocated at first use
    /// ([`frame_buf`]).
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
}

/// `buf`, grown to a whole frame the first time it is needed: a pod
/// without a network (its device unattached, its guest sending nothing)
/// never touches one, and the two were 128 KiB of zeroed heap pages in
/// every such pod's VMM.
fn frame_buf(buf: &mut Vec<u8>) -> &mut [u8] {
    if buf.is_empty() {
        buf.resize(MAX_BUFFER, 0);
    }
    buf
}

impl Worker {
    fn run(mut self) -> Worker {
        let gate = self.gate.clone();
        // Work may already be waiting (a restored clone, a kick that raced
        // with activation).
        {
            let _serving = gate.hold();
            self.transmit();
            self.receive();
        }
        let mut events = [EpollEvent::default(); 4];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("{}: epoll: {e}; worker exits", self.name);
                    return self;
                }
            };
            let _serving = gate.hold();
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => {
                        let _ = self.stop.read();
                        return self;
                    }
                    TOKEN_TX_QUEUE => {
                        let _ = self.queues[TX].notify.read();
                        self.transmit();
                    }
                    TOKEN_RX_QUEUE => {
                        let _ = self.queues[RX].notify.read();
                        self.receive();
                    }
                    TOKEN_TAP => self.receive(),
                    token => debug!("{}: unexpected epoll token {token}", self.name),
                }
            }
        }
    }

    fn interrupt(&mut self, index: usize) {
        // If the check itself fails, an extra interrupt is harmless and a
        // missing one would stall the driver.
        if self.queues[index]
            .queue
            .needs_notification(&self.mem)
            .unwrap_or(true)
        {
            if let Err(e) = self.irq.trigger(VIRTIO_MMIO_INT_VRING) {
                warn!("{}: interrupt: {e}", self.name);
            }
        }
    }

    /// Sends every frame the guest queued for transmission to the tap.
    fn transmit(&mut self) {
        if !self.queues[TX].queue.ready() {
            return;
        }
        let mut used_any = false;
        let mut empty_passes = 0;
        loop {
            let queue = &mut self.queues[TX].queue;
            if let Err(e) = queue.disable_notification(&self.mem) {
                guest_warn!(
                    self.counters.guest_errors,
                    "{}: transmit queue: {e}",
                    self.name
                );
                break;
            }
            let mut popped = false;
            while let Some(chain) = self.queues[TX].queue.pop_descriptor_chain(&self.mem) {
                popped = true;
                let head = chain.head_index();
                let frame = read_chain(&self.mem, chain, frame_buf(&mut self.tx_buf));
                match (frame, &self.tap) {
                    (Some(len), Some(tap)) => match (&**tap).write(&self.tx_buf[..len]) {
                        Ok(_) => {
                            self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            self.counters.tx_tap_errors.fetch_add(1, Ordering::Relaxed);
                            debug!("{}: tap refused a {len}-byte frame: {e}", self.name);
                        }
                    },
                    (Some(_), None) => {
                        self.counters.tx_unattached.fetch_add(1, Ordering::Relaxed);
                    }
                    (None, _) => {
                        self.counters.tx_malformed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if let Err(e) = self.queues[TX].queue.add_used(&self.mem, head, 0) {
                    guest_warn!(
                        self.counters.guest_errors,
                        "{}: transmit queue: used ring: {e}",
                        self.name
                    );
                }
                used_any = true;
            }
            empty_passes = if popped { 0 } else { empty_passes + 1 };
            match self.queues[TX].queue.enable_notification(&self.mem) {
                // One empty pass is a buffer published just before
                // notifications came back on; a second means the available
                // index is bogus and retrying would spin forever.
                Ok(true) if empty_passes < 2 => continue,
                Ok(true) => {
                    debug!("{}: transmit queue cannot be consumed", self.name);
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    guest_warn!(
                        self.counters.guest_errors,
                        "{}: transmit queue: {e}",
                        self.name
                    );
                    break;
                }
            }
        }
        if used_any {
            self.interrupt(TX);
        }
    }

    /// Moves frames from the tap into the guest's receive buffers until the
    /// tap is empty or the guest has no buffer left.
    fn receive(&mut self) {
        let Some(tap) = self.tap.clone() else {
            return;
        };
        if !self.queues[RX].queue.ready() {
            return;
        }
        let mut used_any = false;
        loop {
            let len = match self.rx_pending.take() {
                Some(len) => len,
                None => match (&*tap).read(frame_buf(&mut self.rx_buf)) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        warn!("{}: reading the tap: {e}", self.name);
                        break;
                    }
                },
            };
            match next_rx_chain(
                &mut self.queues[RX].queue,
                &self.mem,
                &self.name,
                &self.counters.guest_errors,
            ) {
                Some(chain) => {
                    let head = chain.head_index();
                    let len = match write_chain(&self.mem, chain, &self.rx_buf[..len]) {
                        Some(len) => {
                            self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                            len
                        }
                        None => {
                            self.counters.rx_too_small.fetch_add(1, Ordering::Relaxed);
                            0
                        }
                    };
                    if let Err(e) = self.queues[RX].queue.add_used(&self.mem, head, len) {
                        guest_warn!(
                            self.counters.guest_errors,
                            "{}: receive queue: used ring: {e}",
                            self.name
                        );
                    }
                    used_any = true;
                }
                None => {
                    // No buffer: keep the frame; the driver's next kick of
                    // the receive queue brings us back.
                    self.rx_pending = Some(len);
                    break;
                }
            }
        }
        if used_any {
            self.interrupt(RX);
        }
    }
}

/// The next receive buffer, with notifications turned back on (and checked
/// once more) when there is none, so the driver's next buffer is not missed.
fn next_rx_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
    name: &str,
    errors: &GuestErrors,
) -> Option<virtio_queue::DescriptorChain<&'m GuestMemory>> {
    if let Err(e) = queue.disable_notification(mem) {
        guest_warn!(errors, "{name}: receive queue: {e}");
        return None;
    }
    if let Some(chain) = queue.pop_descriptor_chain(mem) {
        return Some(chain);
    }
    match queue.enable_notification(mem) {
        Ok(true) => queue.pop_descriptor_chain(mem),
        Ok(false) => None,
        Err(e) => {
            guest_warn!(errors, "{name}: receive queue: {e}");
            None
        }
    }
}

/// Reads a transmit chain (header + frame) into `buf`; None if the chain
/// is malformed, shorter than a header or longer than `buf`.
fn read_chain(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    buf: &mut [u8],
) -> Option<usize> {
    let mut reader = chain.reader(mem).ok()?;
    let len = reader.available_bytes();
    if !(VNET_HDR_LEN..=buf.len()).contains(&len) {
        return None;
    }
    reader.read_exact(&mut buf[..len]).ok()?;
    Some(len)
}

/// Writes a received frame (header + frame, as the tap gave it) into a
/// receive chain and returns the bytes written; None if it does not fit.
fn write_chain(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    frame: &[u8],
) -> Option<u32> {
    if frame.len() < VNET_HDR_LEN {
        return None;
    }
    let mut writer = chain.writer(mem).ok()?;
    if writer.available_bytes() < frame.len() {
        return None;
    }
    // The tap fills the first 10 bytes of the header; without MRG_RXBUF a
    // device must say the frame took one buffer.
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[..NUM_BUFFERS].copy_from_slice(&frame[..NUM_BUFFERS]);
    hdr[NUM_BUFFERS..].copy_from_slice(&1u16.to_le_bytes());
    writer.write_all(&hdr).ok()?;
    writer.write_all(&frame[VNET_HDR_LEN..]).ok()?;
    u32::try_from(frame.len()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const RX_RING: u64 = 0x0;
    const TX_RING: u64 = 0x1_0000;
    const BUFS: u64 = 0x10_0000;

    fn guest_memory() -> GuestMemory {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    /// A datagram socket pair stands in for the tap: like a tap, it keeps
    /// frame boundaries on read and write. Returns the device end and the
    /// "network" end.
    fn fake_tap() -> (Arc<File>, UnixDatagram) {
        let (dev, net) = UnixDatagram::pair().unwrap();
        dev.set_nonblocking(true).unwrap();
        net.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        (Arc::new(File::from(OwnedFd::from(dev))), net)
    }

    fn worker<'m>(
        mem: &'m GuestMemory,
        tap: Option<Arc<File>>,
    ) -> (
        Worker,
        MockSplitQueue<'m, GuestMemory>,
        MockSplitQueue<'m, GuestMemory>,
    ) {
        let rx = MockSplitQueue::create(mem, GuestAddress(RX_RING), 16);
        let tx = MockSplitQueue::create(mem, GuestAddress(TX_RING), 16);
        let active = |m: &MockSplitQueue<'m, GuestMemory>| ActiveQueue {
            queue: m.create_queue().unwrap(),
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        let w = Worker {
            name: "test".into(),
            mem: mem.clone(),
            irq: Arc::new(IrqLine::new(5).unwrap()),
            queues: [active(&rx), active(&tx)],
            tap,
            counters: Arc::default(),
            epoll: Epoll::new().unwrap(),
            stop: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            gate: MemoryGate::default(),
            rx_pending: None,
            rx_buf: Vec::new(),
            tx_buf: Vec::new(),
        };
        (w, rx, tx)
    }

    fn used(q: &MockSplitQueue<'_, GuestMemory>) -> Vec<(u32, u32)> {
        let n = q.used().idx().load();
        (0..n)
            .map(|i| {
                let e = q.used().ring().ref_at(i as usize).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    /// Puts header + frame on the transmit queue as two descriptors (as
    /// the Linux driver does: header, then data).
    fn queue_tx(mem: &GuestMemory, tx: &MockSplitQueue<'_, GuestMemory>, frame: &[u8]) {
        let hdr = [0u8; VNET_HDR_LEN];
        mem.write_slice(&hdr, GuestAddress(BUFS)).unwrap();
        mem.write_slice(frame, GuestAddress(BUFS + 0x1000)).unwrap();
        let descs = [
            SplitDescriptor::new(BUFS, VNET_HDR_LEN as u32, VRING_DESC_F_NEXT as u16, 1),
            SplitDescriptor::new(BUFS + 0x1000, frame.len() as u32, 0, 0),
        ];
        let raw: Vec<RawDescriptor> = descs.iter().map(|d| RawDescriptor::from(*d)).collect();
        tx.add_desc_chains(&raw, 0).unwrap();
    }

    /// Posts one writable receive buffer of `len` bytes at `addr`.
    fn post_rx(rx: &MockSplitQueue<'_, GuestMemory>, index: u16, addr: u64, len: u32) {
        let d = SplitDescriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0);
        rx.add_desc_chains(&[RawDescriptor::from(d)], index)
            .unwrap();
    }

    #[test]
    fn a_transmitted_chain_reaches_the_tap_as_one_frame_with_its_header() {
        let mem = guest_memory();
        let (tap, net) = fake_tap();
        let (mut w, _rx, tx) = worker(&mem, Some(tap));
        let frame: Vec<u8> = (0..1514u32).map(|i| i as u8).collect();
        queue_tx(&mem, &tx, &frame);
        w.transmit();
        let mut got = vec![0u8; MAX_BUFFER];
        let n = net.recv(&mut got).unwrap();
        assert_eq!(n, VNET_HDR_LEN + frame.len());
        assert_eq!(&got[VNET_HDR_LEN..n], &frame[..]);
        assert_eq!(used(&tx), vec![(0, 0)]);
        assert_eq!(w.counters.tx_frames.load(Ordering::Relaxed), 1);
        assert_ne!(w.irq.status() & VIRTIO_MMIO_INT_VRING, 0, "no interrupt");
    }

    #[test]
    fn a_received_frame_lands_in_a_guest_buffer_with_num_buffers_one() {
        let mem = guest_memory();
        let (tap, net) = fake_tap();
        let (mut w, rx, _tx) = worker(&mem, Some(tap));
        post_rx(&rx, 0, BUFS, 4096);
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame[0] = 1; // NEEDS_CSUM, as the tap may say
        frame[NUM_BUFFERS] = 0xee; // whatever the tap left there
        frame.extend_from_slice(b"an ethernet frame");
        net.send(&frame).unwrap();
        w.receive();
        assert_eq!(used(&rx), vec![(0, frame.len() as u32)]);
        let mut got = vec![0u8; frame.len()];
        mem.read_slice(&mut got, GuestAddress(BUFS)).unwrap();
        assert_eq!(got[0], 1, "header flags not passed through");
        assert_eq!(&got[NUM_BUFFERS..VNET_HDR_LEN], &1u16.to_le_bytes());
        assert_eq!(&got[VNET_HDR_LEN..], b"an ethernet frame");
    }

    #[test]
    fn a_frame_without_a_guest_buffer_waits_until_the_driver_posts_one() {
        let mem = guest_memory();
        let (tap, net) = fake_tap();
        let (mut w, rx, _tx) = worker(&mem, Some(tap));
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend_from_slice(b"first");
        net.send(&frame).unwrap();
        frame.truncate(VNET_HDR_LEN);
        frame.extend_from_slice(b"second");
        net.send(&frame).unwrap();
        w.receive();
        assert!(used(&rx).is_empty());
        assert!(w.rx_pending.is_some(), "the first frame was not kept");
        post_rx(&rx, 0, BUFS, 4096);
        post_rx(&rx, 1, BUFS + 0x1000, 4096);
        w.receive();
        assert_eq!(used(&rx).len(), 2, "both frames, in order");
        let mut got = [0u8; 5];
        mem.read_slice(&mut got, GuestAddress(BUFS + VNET_HDR_LEN as u64))
            .unwrap();
        assert_eq!(&got, b"first");
        assert!(w.rx_pending.is_none());
    }

    #[test]
    fn a_guest_buffer_too_small_for_the_frame_drops_it_and_serving_goes_on() {
        let mem = guest_memory();
        let (tap, net) = fake_tap();
        let (mut w, rx, _tx) = worker(&mem, Some(tap));
        post_rx(&rx, 0, BUFS, 20);
        post_rx(&rx, 1, BUFS + 0x1000, 4096);
        let mut big = vec![0u8; VNET_HDR_LEN];
        big.extend_from_slice(&[7u8; 100]);
        net.send(&big).unwrap();
        let mut small = vec![0u8; VNET_HDR_LEN];
        small.extend_from_slice(b"ok");
        net.send(&small).unwrap();
        w.receive();
        assert_eq!(used(&rx), vec![(0, 0), (1, small.len() as u32)]);
        assert_eq!(w.counters.rx_too_small.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn malformed_and_unattached_transmits_are_counted_and_given_back() {
        let mem = guest_memory();
        let (mut w, _rx, tx) = worker(&mem, None);
        queue_tx(&mem, &tx, b"nobody listens");
        // A chain shorter than a header.
        let d = SplitDescriptor::new(BUFS + 0x2000, 4, 0, 0);
        tx.add_desc_chains(&[RawDescriptor::from(d)], 2).unwrap();
        w.transmit();
        assert_eq!(used(&tx), vec![(0, 0), (2, 0)]);
        assert_eq!(w.counters.tx_unattached.load(Ordering::Relaxed), 1);
        assert_eq!(w.counters.tx_malformed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn offered_features_are_version_1_event_idx_and_checksum_and_tso_offloads() {
        let mut n = Net::unattached();
        assert_eq!(n.device_type(), 1);
        assert_eq!(n.queue_max_sizes(), &[256, 256]);
        let f = n.avail_features();
        assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
        assert_eq!(f & (1 << 15), 0, "MRG_RXBUF is not implemented");
        assert_eq!(f & (1 << 5), 0, "no MAC in config space: the agent sets it");
        n.set_acked_features(u64::MAX);
        assert_eq!(n.acked_features, f);
        let mut cfg = [0xffu8; 8];
        n.read_config(0, &mut cfg);
        assert_eq!(cfg, [0; 8]);
    }

    /// One descriptor of a hostile chain: where, how long, which way; the
    /// address may lie past guest memory, the length may be 0 or huge.
    fn hostile_desc() -> impl proptest::strategy::Strategy<Value = (u64, u32, bool)> {
        use proptest::prelude::*;
        (
            prop_oneof![
                (0u64..0x20).prop_map(|i| BUFS + i * 0x1_0000),
                Just(0x40_0000 - 8),
                any::<u64>(),
            ],
            prop_oneof![
                0u32..2000,
                Just(VNET_HDR_LEN as u32),
                Just(65_550),
                any::<u32>()
            ],
            proptest::bool::weighted(0.2),
        )
    }

    /// Lays `chain` out as one descriptor chain at table index 0.
    fn add_chain(q: &MockSplitQueue<'_, GuestMemory>, chain: &[(u64, u32, bool)]) {
        let raw: Vec<RawDescriptor> = chain
            .iter()
            .enumerate()
            .map(|(i, (addr, len, writable))| {
                let mut flags = if *writable {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                if i + 1 < chain.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(SplitDescriptor::new(*addr, *len, flags, (i + 1) as u16))
            })
            .collect();
        q.add_desc_chains(&raw, 0).unwrap();
    }

    proptest::proptest! {
        /// Hostile transmit chains: each is given back (used) or counted as
        /// malformed, never a panic, and what reaches the tap is at most
        /// one maximal frame.
        #[test]
        fn fuzz_net_transmit_of_hostile_chains(
            chain in proptest::collection::vec(hostile_desc(), 1..5),
            fill in proptest::num::u8::ANY,
        ) {
            let mem = guest_memory();
            mem.write_slice(&vec![fill; 0x20_0000], GuestAddress(BUFS)).unwrap();
            let (tap, net) = fake_tap();
            net.set_nonblocking(true).unwrap();
            let (mut w, _rx, tx) = worker(&mem, Some(tap));
            add_chain(&tx, &chain);
            w.transmit();
            let mut got = vec![0u8; MAX_BUFFER + 1];
            while let Ok(n) = net.recv(&mut got) {
                proptest::prop_assert!(n <= MAX_BUFFER, "a {n}-byte frame reached the tap");
            }
        }

        /// Hostile receive buffers for a frame from the tap: the used length
        /// never passes the buffer the guest gave, never a panic.
        #[test]
        fn fuzz_net_receive_into_hostile_buffers(
            chain in proptest::collection::vec(hostile_desc(), 1..4),
            len in 0usize..70_000,
        ) {
            let mem = guest_memory();
            let (tap, net) = fake_tap();
            let (mut w, rx, _tx) = worker(&mem, Some(tap));
            add_chain(&rx, &chain);
            let mut frame = vec![0u8; len.max(VNET_HDR_LEN)];
            frame[VNET_HDR_LEN..].fill(0xab);
            // A datagram too big for the socket is the tap's to refuse.
            if net.send(&frame).is_err() {
                return Ok(());
            }
            w.receive();
            let room: u64 = chain.iter().filter(|d| d.2).map(|d| u64::from(d.1)).sum();
            for (_, used) in used(&rx) {
                proptest::prop_assert!(u64::from(used) <= room, "used {used} of {room}");
            }
        }
    }
}
