//! virtio-blk (device type 2) backed by a host file or block device.
//!
//! One request queue, served by a "blk" worker thread that `activate`
//! spawns: it sleeps in epoll on the queue's notify EventFd (the KVM
//! ioeventfd) and a stop EventFd, and does the I/O synchronously with
//! `pread`/`pwrite` on the host file. Guest buffers are copied through a
//! bounded bounce buffer, so a request of any size costs at most
//! [`MAX_CHUNK`] bytes of host memory.
//!
//! Requests are parsed as byte streams ("any layout", which virtio 1.x
//! implies): the first 16 device-readable bytes are the header, the last
//! device-writable byte is the status, and everything in between is data.
//! All of it is guest input and checked before use.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{debug, error, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::gate::MemoryGate;
use super::guest_errors::{guest_warn, GuestErrors};
use super::worker::{stop_pair, WorkerThread};
use super::{ActiveQueue, DeviceError, GuestMemory, IrqLine, VirtioDevice, VIRTIO_MMIO_INT_VRING};
use crate::jail::ThreadKind;

/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest piece of a request copied through the bounce buffer at once.
pub const MAX_CHUNK: usize = 1 << 20;

const SECTOR_SHIFT: u32 = 9;
const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Header (type, reserved, sector).
const HEADER_LEN: u64 = 16;
/// Data segments per request: a direct chain of QUEUE_SIZE descriptors also
/// carries the header and the status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Config space up to and including seg_max (virtio 1.2, 5.2.4).
const CONFIG_LEN: usize = 16;
const DEVICE_NAME: &str = "virtio-blk";

const EPOLL_NOTIFY: u64 = 0;
const EPOLL_STOP: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("block device {}: opening: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("block device {}: reading its size: {source}", path.display())]
    Size { path: PathBuf, source: io::Error },
}

/// The backing file and what the worker needs to serve requests from it.
struct Disk {
    path: PathBuf,
    file: File,
    read_only: bool,
    /// In 512-byte sectors; a trailing partial sector is not exposed.
    capacity: u64,
    serial: [u8; ID_BYTES],
}

/// A virtio-blk device.
pub struct Block {
    disk: Arc<Disk>,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    worker: Option<WorkerThread<()>>,
    gate: MemoryGate,
}

impl Block {
    /// Opens `path` (read-write unless `read_only`) as the disk's contents.
    pub fn new(path: &Path, read_only: bool) -> Result<Block, BlockError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        // Seeking works for block devices too, whose metadata length is 0.
        let bytes = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_owned(),
                source,
            })?;
        if bytes & (SECTOR_SIZE - 1) != 0 {
            warn!(
                "block device {}: size {bytes} is not a multiple of {SECTOR_SIZE}; \
                 the last {} bytes are not visible to the guest",
                path.display(),
                bytes % SECTOR_SIZE
            );
        }
        let capacity = bytes >> SECTOR_SHIFT;

        let mut serial = [0u8; ID_BYTES];
        let name = path
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or_default();
        let n = name.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&name[..n]);

        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_FLUSH)
            // Without SEG_MAX Linux sends a single data segment per request.
            | (1 << VIRTIO_BLK_F_SEG_MAX);
        if read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }

        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());

        Ok(Block {
            disk: Arc::new(Disk {
                path: path.to_owned(),
                file,
                read_only,
                capacity,
                serial,
            }),
            avail_features,
            acked_features: 0,
            config,
            worker: None,
            gate: MemoryGate::default(),
        })
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    pub fn path(&self) -> &Path {
        &self.disk.path
    }

    pub fn read_only(&self) -> bool {
        self.disk.read_only
    }

    /// Features the driver accepted (for diagnostics and state saving).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn activate_error(&self, cause: String) -> DeviceError {
        DeviceError::Activate {
            device: DEVICE_NAME,
            cause: format!("{}: {cause}", self.disk.path.display()),
        }
    }

    /// Stops the worker and waits for it; false if it could not be
    /// stopped or panicked.
    fn stop_worker(&mut self) -> bool {
        let Some(worker) = self.worker.take() else {
            return true;
        };
        let name = format!("{DEVICE_NAME} {}", self.disk.path.display());
        worker.stop(&name).is_some()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // No writable fields are offered (no CONFIG_WCE).
        debug!(
            "{DEVICE_NAME}: ignoring {}-byte config write at {offset:#x}",
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
        if self.worker.is_some() {
            return Err(self.activate_error("already active".into()));
        }
        let queues: [ActiveQueue; 1] = queues.try_into().map_err(|q: Vec<ActiveQueue>| {
            self.activate_error(format!("expected 1 queue, got {}", q.len()))
        })?;
        let [ActiveQueue { queue, notify }] = queues;
        if !queue.ready() {
            return Err(self.activate_error("the driver did not set up the request queue".into()));
        }
        let io_err = |what: &str, e: io::Error| self.activate_error(format!("{what}: {e}"));
        let (stop, worker_stop) = stop_pair().map_err(|e| io_err("creating stop eventfd", e))?;
        // Set up here rather than in the thread so failures reach the
        // transport (and the driver sees NEEDS_RESET) instead of a log line.
        let epoll = Epoll::new().map_err(|e| io_err("creating epoll", e))?;
        for (fd, token) in [
            (notify.as_raw_fd(), EPOLL_NOTIFY),
            (stop.as_raw_fd(), EPOLL_STOP),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(|e| io_err("registering with epoll", e))?;
        }
        let mut worker = BlockWorker::new(self.disk.clone(), mem, irq, queue);
        worker.gate = self.gate.clone();
        let thread = WorkerThread::spawn("blk", ThreadKind::Block, stop, move || {
            worker.run(epoll, notify, worker_stop)
        })
        .map_err(|e| io_err("spawning worker thread", e))?;
        self.worker = Some(thread);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop_worker()
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// Guest buffers of one direction of a request, in chain order.
#[derive(Debug, Default)]
struct Iov {
    segs: Vec<(GuestAddress, u32)>,
    len: u64,
}

impl Iov {
    /// Appends a segment; false if it wraps around the address space,
    /// which keeps the address arithmetic below overflow-free.
    fn push(&mut self, addr: GuestAddress, len: u32) -> bool {
        if addr.checked_add(u64::from(len)).is_none() {
            return false;
        }
        if len > 0 {
            self.segs.push((addr, len));
            self.len += u64::from(len);
        }
        true
    }

    /// Splits off the first `n` bytes (fewer if the Iov is shorter).
    fn take_front(&mut self, n: u64) -> Iov {
        let mut front = Iov::default();
        let mut rest = Iov::default();
        let mut want = n;
        for &(addr, len) in &self.segs {
            let l = u64::from(len);
            if want >= l {
                front.push(addr, len);
                want -= l;
            } else if want > 0 {
                front.push(addr, want as u32);
                rest.push(addr.unchecked_add(want), (l - want) as u32);
                want = 0;
            } else {
                rest.push(addr, len);
            }
        }
        *self = rest;
        front
    }

    /// Splits off the last `n` bytes (fewer if the Iov is shorter).
    fn take_back(&mut self, n: u64) -> Iov {
        let keep = self.len.saturating_sub(n);
        let back = self.take_front(keep);
        std::mem::replace(self, back)
    }

    /// Calls `f(guest address, range of the stream)` for each piece of the
    /// stream bytes `offset..offset + len`.
    fn for_each_piece<E>(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut pos = 0u64;
        let mut done = 0usize;
        for &(addr, seg_len) in &self.segs {
            let seg_end = pos + u64::from(seg_len);
            if done == len {
                break;
            }
            if seg_end > offset {
                let skip = offset.saturating_sub(pos);
                let n = ((seg_end - pos - skip) as usize).min(len - done);
                f(addr.unchecked_add(skip), done..done + n)?;
                done += n;
            }
            pos = seg_end;
        }
        Ok(())
    }

    fn read_from_guest(
        &self,
        mem: &GuestMemory,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), vm_memory::GuestMemoryError> {
        self.for_each_piece(offset, buf.len(), |addr, r| {
            mem.read_slice(&mut buf[r], addr)
        })
    }

    fn write_to_guest(
        &self,
        mem: &GuestMemory,
        offset: u64,
        buf: &[u8],
    ) -> Result<(), vm_memory::GuestMemoryError> {
        self.for_each_piece(offset, buf.len(), |addr, r| mem.write_slice(&buf[r], addr))
    }
}

/// Why a request failed; the status the driver sees.
enum ReqError {
    IoErr(String),
    Unsupported(u32),
}

impl ReqError {
    fn status(&self) -> u8 {
        match self {
            ReqError::IoErr(_) => VIRTIO_BLK_S_IOERR as u8,
            ReqError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
        }
    }
}

struct BlockWorker {
    disk: Arc<Disk>,
    mem: GuestMemory,
    irq: Arc<IrqLine>,
    queue: Queue,
    buf: Vec<u8>,
    gate: MemoryGate,
    /// Rings the guest made unusable (a bad address or index).
    guest_errors: GuestErrors,
}

impl BlockWorker {
    fn new(disk: Arc<Disk>, mem: GuestMemory, irq: Arc<IrqLine>, queue: Queue) -> Self {
        Self {
            disk,
            mem,
            irq,
            queue,
            buf: Vec::new(),
            gate: MemoryGate::default(),
            guest_errors: GuestErrors::default(),
        }
    }

    fn run(&mut self, epoll: Epoll, notify: EventFd, stop: EventFd) {
        // Requests may already be waiting (e.g. a kick that raced with
        // activation, or a restored clone); do not wait for the next one.
        let gate = self.gate.clone();
        {
            let _serving = gate.hold();
            self.process_queue();
        }
        let mut events = [EpollEvent::default(); 2];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!(
                        "{DEVICE_NAME} {}: epoll: {e}; worker exits",
                        self.disk.path.display()
                    );
                    return;
                }
            };
            let _serving = gate.hold();
            for ev in &events[..n] {
                match ev.data() {
                    EPOLL_STOP => {
                        let _ = stop.read();
                        return;
                    }
                    EPOLL_NOTIFY => {
                        // Drain before processing so a kick arriving during
                        // processing wakes us again.
                        let _ = notify.read();
                        self.process_queue();
                    }
                    other => debug!("{DEVICE_NAME}: unexpected epoll token {other}"),
                }
            }
        }
    }

    /// Serves every available request, then interrupts the driver if it
    /// asked for it.
    fn process_queue(&mut self) {
        let mut used_any = false;
        let mut empty_passes = 0;
        loop {
            if let Err(e) = self.queue.disable_notification(&self.mem) {
                guest_warn!(
                    self.guest_errors,
                    "{DEVICE_NAME} {}: queue: {e}",
                    self.disk.path.display()
                );
                break;
            }
            let mut popped = false;
            while let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) {
                popped = true;
                let head = chain.head_index();
                let request = split_chain(chain);
                let len = self.handle_request(request);
                if let Err(e) = self.queue.add_used(&self.mem, head, len) {
                    guest_warn!(
                        self.guest_errors,
                        "{DEVICE_NAME} {}: used ring: {e}",
                        self.disk.path.display()
                    );
                }
                used_any = true;
            }
            empty_passes = if popped { 0 } else { empty_passes + 1 };
            match self.queue.enable_notification(&self.mem) {
                // One empty pass is a buffer published just before
                // notifications came back on; a second means the queue
                // will not yield what the driver published (a bogus
                // available index), and retrying would spin forever.
                Ok(true) if empty_passes < 2 => continue,
                Ok(true) => {
                    debug!("{DEVICE_NAME}: available ring cannot be consumed; waiting for a kick");
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    guest_warn!(
                        self.guest_errors,
                        "{DEVICE_NAME} {}: queue: {e}",
                        self.disk.path.display()
                    );
                    break;
                }
            }
        }
        if used_any {
            // If the check itself fails, an extra interrupt is harmless and
            // a missing one would stall the driver.
            if self.queue.needs_notification(&self.mem).unwrap_or(true) {
                if let Err(e) = self.irq.trigger(VIRTIO_MMIO_INT_VRING) {
                    error!("{DEVICE_NAME} {}: interrupt: {e}", self.disk.path.display());
                }
            }
        }
    }

    /// Serves one request; returns the used length (bytes written to the
    /// guest, status included).
    fn handle_request(&mut self, request: Option<(Iov, Iov)>) -> u32 {
        let Some((readable, mut writable)) = request else {
            return 0;
        };
        let status = writable.take_back(1);
        if status.len == 0 {
            // Nowhere to report an error: hand the buffers back untouched.
            debug!("{DEVICE_NAME}: request without a status byte dropped");
            return 0;
        }
        let (code, written) = match self.execute(readable, &writable) {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
            Err(e) => {
                match &e {
                    ReqError::IoErr(msg) => {
                        debug!(
                            "{DEVICE_NAME} {}: I/O error: {msg}",
                            self.disk.path.display()
                        )
                    }
                    ReqError::Unsupported(t) => {
                        debug!("{DEVICE_NAME}: request type {t} unsupported")
                    }
                }
                (e.status(), 0)
            }
        };
        if let Err(e) = status.write_to_guest(&self.mem, 0, &[code]) {
            debug!("{DEVICE_NAME}: writing request status: {e}");
            return 0;
        }
        written.saturating_add(1)
    }

    /// Returns the number of data bytes written to the guest.
    fn execute(&mut self, mut readable: Iov, writable: &Iov) -> Result<u32, ReqError> {
        let header_iov = readable.take_front(HEADER_LEN);
        let mut header = [0u8; HEADER_LEN as usize];
        if header_iov.len < HEADER_LEN {
            return Err(ReqError::IoErr(format!(
                "header is {} bytes",
                header_iov.len
            )));
        }
        header_iov
            .read_from_guest(&self.mem, 0, &mut header)
            .map_err(|e| ReqError::IoErr(format!("reading header: {e}")))?;
        let req_type = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let data_in = writable;
        let data_out = &readable;

        match req_type {
            VIRTIO_BLK_T_IN => {
                if data_out.len != 0 {
                    return Err(ReqError::IoErr(
                        "read request carries device-readable data".into(),
                    ));
                }
                let offset = self.check_range(sector, data_in.len)?;
                transfer_in(&self.disk.file, &self.mem, &mut self.buf, offset, data_in)?;
                // A chain is at most 4 GiB (virtio-queue stops iterating past
                // that), so this fits.
                Ok(data_in.len as u32)
            }
            VIRTIO_BLK_T_OUT => {
                if data_in.len != 0 {
                    return Err(ReqError::IoErr(
                        "write request carries device-writable data".into(),
                    ));
                }
                if self.disk.read_only {
                    return Err(ReqError::IoErr("write to a read-only disk".into()));
                }
                let offset = self.check_range(sector, data_out.len)?;
                transfer_out(&self.disk.file, &self.mem, &mut self.buf, offset, data_out)?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.disk
                    .file
                    .sync_data()
                    .map_err(|e| ReqError::IoErr(format!("fdatasync: {e}")))?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = (data_in.len as usize).min(ID_BYTES);
                data_in
                    .write_to_guest(&self.mem, 0, &self.disk.serial[..n])
                    .map_err(|e| ReqError::IoErr(format!("writing serial: {e}")))?;
                Ok(n as u32)
            }
            other => Err(ReqError::Unsupported(other)),
        }
    }

    /// Checks `len` bytes at `sector` lie within the disk; returns the byte
    /// offset.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, ReqError> {
        if len & (SECTOR_SIZE - 1) != 0 {
            return Err(ReqError::IoErr(format!(
                "data length {len} is not whole sectors"
            )));
        }
        let end = sector.checked_add(len >> SECTOR_SHIFT);
        if !matches!(end, Some(end) if end <= self.disk.capacity) {
            return Err(ReqError::IoErr(format!(
                "sectors {sector}+{} beyond capacity {}",
                len >> SECTOR_SHIFT,
                self.disk.capacity
            )));
        }
        // Cannot overflow: sector <= capacity, and capacity * 512 is a file size.
        Ok(sector << SECTOR_SHIFT)
    }
}

/// Splits a request into its device-readable and device-writable parts;
/// None if the chain is malformed.
fn split_chain(chain: DescriptorChain<&GuestMemory>) -> Option<(Iov, Iov)> {
    let mut readable = Iov::default();
    let mut writable = Iov::default();
    let mut seen_writable = false;
    for desc in chain {
        let ok = if desc.is_write_only() {
            seen_writable = true;
            writable.push(desc.addr(), desc.len())
        } else if seen_writable {
            // virtio 1.2, 2.7.4.2: readable descriptors come first.
            debug!("{DEVICE_NAME}: readable descriptor after a writable one; request dropped");
            return None;
        } else {
            readable.push(desc.addr(), desc.len())
        };
        if !ok {
            debug!("{DEVICE_NAME}: descriptor wraps the address space; request dropped");
            return None;
        }
    }
    Some((readable, writable))
}

/// Makes `buf` hold `min(remaining, MAX_CHUNK)` bytes and returns them.
fn chunk(buf: &mut Vec<u8>, remaining: u64) -> &mut [u8] {
    let n = remaining.min(MAX_CHUNK as u64) as usize;
    if buf.len() < n {
        buf.resize(n, 0);
    }
    &mut buf[..n]
}

/// File → guest: fills `iov` from the file at `offset`.
fn transfer_in(
    file: &File,
    mem: &GuestMemory,
    buf: &mut Vec<u8>,
    offset: u64,
    iov: &Iov,
) -> Result<(), ReqError> {
    let mut done = 0u64;
    while done < iov.len {
        let piece = chunk(buf, iov.len - done);
        file.read_exact_at(piece, offset + done)
            .map_err(|e| ReqError::IoErr(format!("read at {}: {e}", offset + done)))?;
        iov.write_to_guest(mem, done, piece)
            .map_err(|e| ReqError::IoErr(format!("writing guest memory: {e}")))?;
        done += piece.len() as u64;
    }
    Ok(())
}

/// Guest → file: writes `iov` to the file at `offset`.
fn transfer_out(
    file: &File,
    mem: &GuestMemory,
    buf: &mut Vec<u8>,
    offset: u64,
    iov: &Iov,
) -> Result<(), ReqError> {
    let mut done = 0u64;
    while done < iov.len {
        let piece = chunk(buf, iov.len - done);
        iov.read_from_guest(mem, done, piece)
            .map_err(|e| ReqError::IoErr(format!("reading guest memory: {e}")))?;
        file.write_all_at(piece, offset + done)
            .map_err(|e| ReqError::IoErr(format!("write at {}: {e}", offset + done)))?;
        done += piece.len() as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};
    use tempfile::NamedTempFile;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const SECTORS: u64 = 64;
    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;

    /// A disk whose byte i holds i % 251, so misplaced data shows.
    fn disk_file() -> NamedTempFile {
        let mut f = NamedTempFile::new().unwrap();
        let bytes: Vec<u8> = (0..SECTORS * SECTOR_SIZE)
            .map(|i| (i % 251) as u8)
            .collect();
        f.write_all(&bytes).unwrap();
        f
    }

    fn guest_memory() -> GuestMemory {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    enum Dir {
        R,
        W,
    }

    /// The driver side: a mock queue and a worker serving it synchronously.
    struct Driver<'a> {
        mem: &'a GuestMemory,
        mock: MockSplitQueue<'a, GuestMemory>,
        worker: BlockWorker,
        next_desc: u16,
        irq: Arc<IrqLine>,
    }

    impl<'a> Driver<'a> {
        fn new(mem: &'a GuestMemory, block: &Block) -> Self {
            let mock = MockSplitQueue::new(mem, 16);
            let queue: Queue = mock.create_queue().unwrap();
            let irq = Arc::new(IrqLine::new(5).unwrap());
            let worker = BlockWorker::new(block.disk.clone(), mem.clone(), irq.clone(), queue);
            Driver {
                mem,
                mock,
                worker,
                next_desc: 0,
                irq,
            }
        }

        fn header(&self, req_type: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&req_type.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        }

        /// Publishes one chain and lets the device serve it; returns
        /// (status byte, used length).
        fn submit(&mut self, descs: &[(u64, u32, Dir)]) -> (u8, u32) {
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let first = self.next_desc;
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, (addr, len, dir))| {
                    let mut flags = match dir {
                        Dir::R => 0,
                        Dir::W => VRING_DESC_F_WRITE as u16,
                    };
                    if i + 1 < descs.len() {
                        flags |= VRING_DESC_F_NEXT as u16;
                    }
                    let next = first + i as u16 + 1;
                    RawDescriptor::from(SplitDescriptor::new(*addr, *len, flags, next))
                })
                .collect();
            self.mock.add_desc_chains(&raw, first).unwrap();
            self.next_desc = (first + descs.len() as u16) % 16;
            self.worker.process_queue();
            let used_idx = self.mock.used().idx().load();
            let elem = self
                .mock
                .used()
                .ring()
                .ref_at((used_idx as usize + 15) % 16)
                .unwrap()
                .load();
            assert_eq!(elem.id(), u32::from(first), "completed the wrong chain");
            (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), elem.len())
        }

        fn read(&mut self, sector: u64, len: u32) -> (u8, u32) {
            self.header(VIRTIO_BLK_T_IN, sector);
            self.submit(&[(HDR, 16, Dir::R), (DATA, len, Dir::W), (STATUS, 1, Dir::W)])
        }

        fn write(&mut self, sector: u64, data: &[u8]) -> (u8, u32) {
            self.header(VIRTIO_BLK_T_OUT, sector);
            self.mem.write_slice(data, GuestAddress(DATA)).unwrap();
            let len = data.len() as u32;
            self.submit(&[(HDR, 16, Dir::R), (DATA, len, Dir::R), (STATUS, 1, Dir::W)])
        }

        fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }
    }

    fn file_bytes(f: &NamedTempFile, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        f.as_file().read_exact_at(&mut v, offset).unwrap();
        v
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn config_space_reports_capacity_in_sectors_and_seg_max() {
        let f = disk_file();
        let block = Block::new(f.path(), false).unwrap();
        let mut cap = [0u8; 8];
        block.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), SECTORS);
        let mut seg = [0u8; 4];
        block.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
        let mut past = [0xffu8; 4];
        block.read_config(u64::MAX - 1, &mut past);
        assert_eq!(past, [0; 4]);
        assert_eq!(block.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(block.avail_features() & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(block.avail_features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
    }

    #[test]
    fn open_error_names_the_path() {
        let err = Block::new(Path::new("/nonexistent/jevm-disk.img"), true)
            .err()
            .unwrap();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/jevm-disk.img"), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
    }

    #[test]
    fn read_returns_file_contents_and_used_len_counts_data_and_status() {
        let f = disk_file();
        let block = Block::new(f.path(), false).unwrap();
        let mem = guest_memory();
        let mut d = Driver::new(&mem, &block);
        assert_eq!(d.read(3, 1024), (OK, 1025));
        assert_eq!(d.guest_bytes(DATA, 1024), file_bytes(&f, 3 * 512, 1024));
        assert_eq!(d.irq.status(), VIRTIO_MMIO_INT_VRING);
    }

    #[test]
    fn write_then_read_back_through_the_queue() {
        let f = disk_file();
        let block = Block::new(f.path(), false).unwrap();
        let mem = guest_memory();
        let mut d = Driver::new(&mem, &block);
        let data: Vec<u8> = (0..2048u32).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(d.write(10, &data), (OK, 1));
        assert_eq!(file_bytes(&f, 10 * 512, 2048), data);
        mem.write_slice(&[0u8; 2048], GuestAddress(DATA)).unwrap();
        assert_eq!(d.read(10, 2048), (OK, 2049));
        assert_eq!(d.guest_bytes(DATA, 2048), data);
    }

    #[test]
    fn data_scattered_over_unaligned_descriptors_lands_in_order() {
        let f = disk_file();
        let block = Block::new(f.path(), false).unwrap();
        let mem = guest_memory();
        let mut d = Driver::new(&mem, &block);
        // Header and status share descriptors with data: "any layout".
        d.header(VIRTIO_BLK_T_IN, 1);
        mem.write_slice(&d.guest_bytes(HDR, 16), GuestAddress(0x4_0000))
            .unwrap();
        let (status, len) = d.submit(&[
            (0x4_0000, 16, Dir::R),
            (0x5_0000, 700, Dir::W),
            (0x6_0000, 300, Dir::W),
            (0x7_0000, 25, Dir::W), // 24 data bytes + status
        ]);
        assert_eq!(len, 1025);
        let status_byte = d.guest_bytes(0x7_0000 + 24, 1)[0];
        assert_eq!((status, status_byte), (0xff, OK));
        let mut got = d.guest_bytes(0x5_0000, 700);
        got.extend(d.guest_bytes(0x6_0000, 300));
        got.extend(d.guest_bytes(0x7_0000, 24));
        assert_eq!(got, file_bytes(&f, 512, 1024));
    }

    #[test]
    fn read_only_disk_refuses_writes_with_ioerr() {
        let f = disk_file();
        let block = Block::new(f.path(), true).unwrap();
        assert_ne!(block.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        let mem = guest_memory();
        let mut d = Driver::new(&mem, &block);
        let before = file_bytes(&f, 0, 512);
        assert_eq!(d.write(0, &[0xaa; 512]).0, IOERR);
        assert_eq!(file_bytes(&f, 0, 512), before);
        // Reads still work.
        assert_eq!(d.read(0, 512), (OK, 513));
    }

    #[test]
    fn sectors_beyond_capacity_are_ioerr() {
        let f = disk_file();
        let block = Block::new(f.path(), false).unwrap();
        let mem = guest_memory();
        let mut d = Driver::new(&mem, &block);
        assert_eq!(d.read(SECTORS - 1, 512).0, OK);
        assert_eq!(d.read(SECTORS - 1, 1024).0, IOERR);
        assert_eq!(d.read(SECTORS, 512).0, IOERR);
        assert_eq!(d.read(u64::MAX, 512).0, IOERR);
        assert_eq!(d.write(SECTORS, &[1; 512]).0, IOERR);
        assert_eq!(f.as_file().metadata().unwrap().len(), SECTORS * SECTOR_SIZE);
    }

    #[test]
    fn partial_sector_transfer_is_ioerr() {
        let f = disk_file();
        let block = Block::new(f.path(), false).unwrap();
        let mem = guest_memory();
        let mut d = Driver::new(&mem, &block);
        assert_eq!(d.read(0, 100).0, IOERR);
    }

    #[test]
    fn flush_succeeds() {
        let f = disk_file();
        let block = Block::new(f.path(), false).unwrap();
        let mem = guest_memory();
        let mut d = Driver::new(&mem, &block);
        d.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(d.submit(&[(HDR, 16, Dir::R), (STATUS, 1, Dir::W)]), (OK, 1));
    }

    #[test]
    fn get_id_returns_the_file_name_as_serial() {
        let f = disk_file();
        let block = Block::new(f.path(), false).unwrap();
        let mem = guest_memory();
        let mut d = Driver::new(&mem, &block);
        d.header(VIRTIO_BLK_T_GET_ID, 0);
        let r = d.submit(&[(HDR, 16, Dir::R), (DATA, 20, Dir::W), (STATUS, 1, Dir::W)]);
        assert_eq!(r, (OK, 21));
        let name = f.path().file_name().unwrap().as_encoded_bytes();
        let n = name.len().min(20);
        assert_eq!(d.guest_bytes(DATA, n), name[..n]);
    }

    #[test]
    fn unknown_request_type_is_unsupp() {
        let f = disk_file();
        let block = Block::new(f.path(), false).unwrap();
        let mem = guest_memory();
        let mut d = Driver::new(&mem, &block);
        d.header(0x1234, 0);
        assert_eq!(
            d.submit(&[(HDR, 16, Dir::R), (STATUS, 1, Dir::W)]),
            (UNSUPP, 1)
        );
    }

    #[test]
    fn malformed_chains_are_returned_without_touching_the_disk() {
        let f = disk_file();
        let block = Block::new(f.path(), false).unwrap();
        let mem = guest_memory();
        let mut d = Driver::new(&mem, &block);
        let before = file_bytes(&f, 0, 512);
        // No writable status byte at all.
        d.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            d.submit(&[(HDR, 16, Dir::R), (DATA, 512, Dir::R)]),
            (0xff, 0)
        );
        // Readable data after the writable part.
        assert_eq!(
            d.submit(&[(HDR, 16, Dir::R), (STATUS, 1, Dir::W), (DATA, 512, Dir::R)])
                .1,
            0
        );
        // Short header.
        assert_eq!(
            d.submit(&[(HDR, 8, Dir::R), (STATUS, 1, Dir::W)]),
            (IOERR, 1)
        );
        // Buffer outside guest memory.
        assert_eq!(
            d.submit(&[
                (HDR, 16, Dir::R),
                (0x100_0000, 512, Dir::R),
                (STATUS, 1, Dir::W)
            ]),
            (IOERR, 1)
        );
        assert_eq!(file_bytes(&f, 0, 512), before);
    }

    fn wait_for_interrupt(irq: &IrqLine) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while irq.evt.read().is_err() {
            assert!(Instant::now() < deadline, "no interrupt from the worker");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn activated_worker_serves_kicks_and_reset_stops_it() {
        let f = disk_file();
        let mut block = Block::new(f.path(), false).unwrap();
        let mem = guest_memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let queue: Queue = mock.create_queue().unwrap();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = notify.try_clone().unwrap();
        let irq = Arc::new(IrqLine::new(5).unwrap());
        block
            .activate(
                mem.clone(),
                irq.clone(),
                vec![ActiveQueue { queue, notify }],
            )
            .unwrap();
        assert!(block.worker.is_some());

        let mut h = [0u8; 16];
        h[8..16].copy_from_slice(&2u64.to_le_bytes()); // IN, sector 2
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        let descs = [
            SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
            SplitDescriptor::new(
                DATA,
                512,
                (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                2,
            ),
            SplitDescriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        let raw: Vec<RawDescriptor> = descs.iter().map(|d| RawDescriptor::from(*d)).collect();
        mock.add_desc_chains(&raw, 0).unwrap();
        kick.write(1).unwrap();
        wait_for_interrupt(&irq);
        assert_eq!(mock.used().idx().load(), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
        let mut got = vec![0u8; 512];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, file_bytes(&f, 1024, 512));

        assert!(block.reset());
        assert!(block.worker.is_none());
        // Activating twice without a reset is refused; after reset it works.
        let queue: Queue = mock.create_queue().unwrap();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        block
            .activate(
                mem.clone(),
                irq.clone(),
                vec![ActiveQueue { queue, notify }],
            )
            .unwrap();
        let queue: Queue = mock.create_queue().unwrap();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(block
            .activate(mem.clone(), irq, vec![ActiveQueue { queue, notify }])
            .is_err());
        drop(block); // joins the worker; a hang here fails the test by timeout
    }

    #[test]
    fn activate_refuses_an_unready_queue() {
        let f = disk_file();
        let mut block = Block::new(f.path(), false).unwrap();
        let queue = Queue::new(QUEUE_SIZE).unwrap();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Arc::new(IrqLine::new(5).unwrap());
        let err = block.activate(guest_memory(), irq, vec![ActiveQueue { queue, notify }]);
        assert!(err.is_err());
        assert!(block.worker.is_none());
    }

    proptest::proptest! {
        /// Hostile request chains: a header with any type and sector, data
        /// descriptors of any length and direction, addresses past guest
        /// memory. Each chain completes (used) without a panic, a used
        /// length never passes the writable room, and the disk keeps its
        /// size (a request past the end never grows it); a read-only disk
        /// is never written.
        #[test]
        fn fuzz_block_requests_of_hostile_chains(
            req_type in proptest::prop_oneof![0u32..=8, proptest::num::u32::ANY],
            sector in proptest::prop_oneof![0u64..SECTORS + 2, proptest::num::u64::ANY],
            descs in proptest::collection::vec(
                (
                    proptest::prop_oneof![
                        proptest::strategy::Just(HDR),
                        proptest::strategy::Just(DATA),
                        proptest::strategy::Just(STATUS),
                        proptest::strategy::Just(0x10_0000 - 4),
                        proptest::num::u64::ANY,
                    ],
                    proptest::prop_oneof![0u32..1100, proptest::num::u32::ANY],
                    proptest::bool::ANY,
                ),
                0..4,
            ),
            read_only in proptest::bool::ANY,
        ) {
            let f = disk_file();
            let before = std::fs::read(f.path()).unwrap();
            let block = Block::new(f.path(), read_only).unwrap();
            let mem = guest_memory();
            let mut d = Driver::new(&mem, &block);
            d.header(req_type, sector);
            let mut chain = vec![(HDR, 16, Dir::R)];
            chain.extend(descs.iter().map(|(a, l, w)| (*a, *l, if *w { Dir::W } else { Dir::R })));
            let room: u64 = chain
                .iter()
                .filter(|c| matches!(c.2, Dir::W))
                .map(|c| u64::from(c.1))
                .sum();
            let (_, used) = d.submit(&chain);
            proptest::prop_assert!(u64::from(used) <= room, "used {used} of {room}");
            let after = std::fs::read(f.path()).unwrap();
            proptest::prop_assert_eq!(after.len(), before.len());
            if read_only {
                proptest::prop_assert!(after == before, "a read-only disk was written");
            }
        }
    }
}
