//! virtio-fs (device type 26): a host directory served to the guest over
//! FUSE, by the `fuse-backend-rs` server inside the VMM process.
//!
//! Two queues: hiprio (FORGET, INTERRUPT; no replies) and one request
//! queue. A "fs" worker thread that `activate` spawns sleeps in epoll on both
//! queues' notify EventFds (the KVM ioeventfds) and a stop EventFd; each
//! descriptor chain becomes a `Reader` (the request) and a `Writer` (room for
//! the reply) over guest memory, the server writes the FUSE reply straight
//! into the chain, and the used ring and irqfd tell the guest.
//!
//! Every VM carries the device. Without a share directory it is
//! *unattached*: the guest kernel probes it at boot (a template does), but
//! FUSE_INIT is answered with ENODEV and every other request with ENOSYS, so
//! a mount attempt fails cleanly. A clone restores the device with the pod's
//! share directory behind a fresh server: the template never mounted, so
//! there is no FUSE session to carry over.
//!
//! What the guest may do with the share, and why (the guest is untrusted):
//! - The root cannot be left. `PassthroughFs` resolves every name with
//!   `openat(parent, name, O_NOFOLLOW)` relative to an fd it holds, refuses
//!   names containing `/`, and maps a LOOKUP of `..` in the root to the root
//!   itself; `..` of any other directory lands on a directory it already
//!   knows, because the host side of the share is only reachable from the
//!   root. Symlinks are never followed on the host: the guest gets the link
//!   text and resolves it in its own namespace; only regular files and
//!   directories are ever opened for I/O.
//! - Cache policy `auto` with 1 s attribute and entry timeouts, no writeback
//!   cache, no DAX (the transport offers no shared-memory region): guest
//!   writes reach the host file before the write call returns; a host-side
//!   change is seen by the guest at the next open of the file (its page
//!   cache is dropped on every open) and in metadata and directory entries
//!   within a second. `never` (no guest page cache at all) would make
//!   `mmap(MAP_SHARED)` of share files fail in the guest with ENODEV (this
//!   server does not negotiate FUSE_DIRECT_IO_ALLOW_MMAP), which programs in
//!   a container rootfs rely on; `always` and writeback would let the guest
//!   keep stale data or hold writes the host cannot see yet.
//! - Writes are refused where the host made the tree read-only (e.g. a
//!   read-only bind mount inside the share): the server's own `open` or
//!   `create` gets EROFS and passes it on.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use fuse_backend_rs::api::filesystem::{FileSystem, FsOptions};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use log::{debug, error, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActiveQueue, DeviceError, GuestMemory, IrqLine, QueuePosition, VirtioDevice,
    VIRTIO_MMIO_INT_VRING,
};

/// Virtio device ID of a file system device (virtio 1.2, 5.11).
pub const VIRTIO_ID_FS: u32 = 26;
/// hiprio, request.
const QUEUE_SIZES: [u16; 2] = [128, 256];
/// `struct virtio_fs_config`: tag[36] + le32 num_request_queues.
const TAG_LEN: usize = 36;
const CONFIG_LEN: usize = TAG_LEN + 4;
/// How long the guest may trust attributes and directory entries.
const METADATA_TIMEOUT: Duration = Duration::from_secs(1);
const DEVICE: &str = "virtio-fs";

const TOKEN_STOP: u64 = 0;
/// Queue i's notify fd is registered with token `TOKEN_QUEUE + i`.
const TOKEN_QUEUE: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs share {}: {cause}", path.display())]
    Share { path: PathBuf, cause: String },
    #[error("virtio-fs tag {0:?} is empty or longer than {TAG_LEN} bytes")]
    Tag(String),
}

/// The FUSE file system behind an unattached device: INIT fails, so the
/// guest kernel gives up on the mount; anything a guest sends without INIT
/// gets the trait's default ENOSYS.
struct Unattached;

impl FileSystem for Unattached {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, _capable: FsOptions) -> io::Result<FsOptions> {
        Err(io::Error::from_raw_os_error(libc::ENODEV))
    }
}

/// Who answers the guest's FUSE requests.
enum Backend {
    Unattached(Server<Unattached>),
    Share(Server<Arc<PassthroughFs>>),
}

impl Backend {
    fn for_share(share: Option<&Path>) -> Result<Backend, FsError> {
        let Some(dir) = share else {
            return Ok(Backend::Unattached(Server::new(Unattached)));
        };
        let fail = |cause: String| FsError::Share {
            path: dir.to_owned(),
            cause,
        };
        let root = dir.to_str().ok_or_else(|| fail("path is not UTF-8".into()))?;
        let cfg = Config {
            root_dir: root.to_owned(),
            cache_policy: CachePolicy::Auto,
            attr_timeout: METADATA_TIMEOUT,
            entry_timeout: METADATA_TIMEOUT,
            writeback: false,
            dax_file_size: None,
            no_open: false,
            no_opendir: false,
            xattr: false,
            // The server resolves every request below the root fd itself
            // (INIT imports it again; doing it now reports a bad directory
            // before the clone runs, not at the guest's mount).
            do_import: true,
            ..Default::default()
        };
        let fs = PassthroughFs::new(cfg).map_err(|e| fail(e.to_string()))?;
        fs.import().map_err(|e| fail(format!("opening as root: {e}")))?;
        Ok(Backend::Share(Server::new(Arc::new(fs))))
    }

    /// Serves one request chain; returns the number of reply bytes written.
    fn handle(&self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
        let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
            Ok(r) => r,
            Err(e) => {
                debug!("{DEVICE}: unreadable request: {e}");
                return 0;
            }
        };
        let writer: Writer<'_, ()> = match VirtioFsWriter::new(mem, chain) {
            Ok(w) => w.into(),
            Err(e) => {
                debug!("{DEVICE}: unwritable reply buffers: {e}");
                return 0;
            }
        };
        let res = match self {
            Backend::Unattached(s) => s.handle_message(reader, writer, None, None),
            Backend::Share(s) => s.handle_message(reader, writer, None, None),
        };
        match res {
            // A reply is at most the chain's writable length, itself < 4 GiB.
            Ok(n) => u32::try_from(n).unwrap_or(u32::MAX),
            Err(e) => {
                debug!("{DEVICE}: request not served: {e}");
                0
            }
        }
    }
}

struct WorkerHandle {
    stop: EventFd,
    /// The worker hands itself back when it stops, so `pause` can read the
    /// queue positions.
    thread: JoinHandle<Worker>,
}

/// The virtio-fs device.
pub struct Fs {
    share: Option<PathBuf>,
    config: [u8; CONFIG_LEN],
    backend: Arc<Backend>,
    acked_features: u64,
    worker: Option<WorkerHandle>,
}

impl Fs {
    /// A device with no directory behind it (every boot and template VM).
    pub fn unattached(tag: &str) -> Result<Fs, FsError> {
        Self::build(tag, None)
    }

    /// A device serving `share` (a directory; symlinks in the path are
    /// resolved once, here, by the host).
    pub fn with_share(tag: &str, share: &Path) -> Result<Fs, FsError> {
        let fail = |cause: String| FsError::Share {
            path: share.to_owned(),
            cause,
        };
        let dir = share.canonicalize().map_err(|e| fail(e.to_string()))?;
        let meta = std::fs::metadata(&dir).map_err(|e| fail(e.to_string()))?;
        if !meta.is_dir() {
            return Err(fail("not a directory".into()));
        }
        Self::build(tag, Some(dir))
    }

    fn build(tag: &str, share: Option<PathBuf>) -> Result<Fs, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::Tag(tag.to_owned()));
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        Ok(Fs {
            backend: Arc::new(Backend::for_share(share.as_deref())?),
            share,
            config,
            acked_features: 0,
            worker: None,
        })
    }

    /// The directory served, None if unattached.
    pub fn share(&self) -> Option<&Path> {
        self.share.as_deref()
    }

    fn name(&self) -> String {
        match &self.share {
            Some(p) => format!("{DEVICE} {}", p.display()),
            None => format!("{DEVICE} (unattached)"),
        }
    }

    fn stop_worker(&mut self) -> Option<Worker> {
        let worker = self.worker.take()?;
        if let Err(e) = worker.stop.write(1) {
            // Without the signal the join would hang; a leaked thread beats
            // a hung VMM.
            error!("{}: cannot stop the worker thread: {e}", self.name());
            return None;
        }
        match worker.thread.join() {
            Ok(w) => Some(w),
            Err(_) => {
                error!("{}: the worker thread panicked", self.name());
                None
            }
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "{DEVICE}: ignoring {}-byte write to read-only config space at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        irq: Arc<IrqLine>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), DeviceError> {
        if self.worker.is_some() {
            return Err(DeviceError::Activate {
                device: DEVICE,
                cause: "already active".into(),
            });
        }
        let queues: [ActiveQueue; 2] =
            queues
                .try_into()
                .map_err(|q: Vec<ActiveQueue>| DeviceError::Activate {
                    device: DEVICE,
                    cause: format!("expected 2 queues, got {}", q.len()),
                })?;
        let io_err = |source| DeviceError::Io {
            device: DEVICE,
            source,
        };
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(io_err)?;
        let worker_stop = stop.try_clone().map_err(io_err)?;
        // Set up here rather than in the thread so failures reach the
        // transport (and the driver sees NEEDS_RESET).
        let epoll = Epoll::new().map_err(io_err)?;
        epoll
            .ctl(
                ControlOperation::Add,
                worker_stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_STOP),
            )
            .map_err(io_err)?;
        for (i, q) in queues.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    q.notify.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, TOKEN_QUEUE + i as u64),
                )
                .map_err(io_err)?;
        }
        let worker = Worker {
            name: self.name(),
            mem,
            irq,
            queues,
            backend: self.backend.clone(),
            epoll,
            stop: worker_stop,
        };
        let thread = std::thread::Builder::new()
            .name("fs".into())
            .spawn(move || worker.run())
            .map_err(io_err)?;
        self.worker = Some(WorkerHandle { stop, thread });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop_worker();
        self.acked_features = 0;
        // A driver that starts over starts a new FUSE session: the old
        // session's inodes and open files must not outlive it.
        self.backend = Arc::new(
            Backend::for_share(self.share.as_deref()).unwrap_or_else(|e| {
                warn!("{e}; the device is unattached from now on");
                Backend::Unattached(Server::new(Unattached))
            }),
        );
        true
    }

    fn pause(&mut self) -> Result<Vec<QueuePosition>, DeviceError> {
        let worker = self.stop_worker().ok_or_else(|| DeviceError::NotQuiet {
            device: DEVICE,
            cause: "the device is not active".into(),
        })?;
        Ok(worker
            .queues
            .iter()
            .map(|q| QueuePosition::of(&q.queue))
            .collect())
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// Everything the worker thread owns.
struct Worker {
    name: String,
    mem: GuestMemory,
    irq: Arc<IrqLine>,
    /// hiprio, request.
    queues: [ActiveQueue; 2],
    backend: Arc<Backend>,
    epoll: Epoll,
    stop: EventFd,
}

impl Worker {
    fn run(mut self) -> Worker {
        // Requests may already be waiting (a kick that raced with
        // activation, or a restored clone); do not wait for the next one.
        for i in 0..self.queues.len() {
            self.process_queue(i);
        }
        let mut events = [EpollEvent::default(); 3];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("{}: epoll: {e}; worker exits", self.name);
                    return self;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => {
                        let _ = self.stop.read();
                        return self;
                    }
                    token => {
                        let Some(i) = token
                            .checked_sub(TOKEN_QUEUE)
                            .and_then(|i| usize::try_from(i).ok())
                            .filter(|&i| i < self.queues.len())
                        else {
                            debug!("{}: unexpected epoll token {token}", self.name);
                            continue;
                        };
                        // Drain before processing so a kick arriving during
                        // processing wakes us again.
                        let _ = self.queues[i].notify.read();
                        self.process_queue(i);
                    }
                }
            }
        }
    }

    /// Serves every available request of queue `index`, then interrupts the
    /// driver if it asked for it.
    fn process_queue(&mut self, index: usize) {
        let Worker {
            name,
            mem,
            irq,
            queues,
            backend,
            ..
        } = self;
        let queue: &mut Queue = &mut queues[index].queue;
        if !queue.ready() {
            return;
        }
        let mut used_any = false;
        let mut empty_passes = 0;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                error!("{name}: queue {index}: {e}");
                break;
            }
            let mut popped = false;
            while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
                popped = true;
                let head = chain.head_index();
                let len = backend.handle(mem, chain);
                if let Err(e) = queue.add_used(&*mem, head, len) {
                    error!("{name}: queue {index}: used ring: {e}");
                }
                used_any = true;
            }
            empty_passes = if popped { 0 } else { empty_passes + 1 };
            match queue.enable_notification(&*mem) {
                // One empty pass is a buffer published just before
                // notifications came back on; a second means the available
                // index is bogus and retrying would spin forever.
                Ok(true) if empty_passes < 2 => continue,
                Ok(true) => {
                    debug!("{name}: queue {index}: available ring cannot be consumed");
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    error!("{name}: queue {index}: {e}");
                    break;
                }
            }
        }
        // If the check itself fails, an extra interrupt is harmless and a
        // missing one would stall the driver.
        if used_any && queue.needs_notification(&*mem).unwrap_or(true) {
            if let Err(e) = irq.trigger(VIRTIO_MMIO_INT_VRING) {
                warn!("{name}: interrupt: {e}");
            }
        }
    }
}
