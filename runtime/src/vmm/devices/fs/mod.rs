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
//! a mount attempt fails cleanly.
//!
//! A template's device serves an empty directory, and its guest mounts the
//! share before the snapshot: the mount (superblock, bdi, FUSE_INIT) is then
//! paid once, not in every clone (~30 ms each in the nested test host). The
//! device remembers the session the guest opened (its INIT's version and
//! flags, [`FuseSession`]) and saves it; a clone's device, serving the pod's
//! directory behind a fresh server, answers that same INIT to its new file
//! system before the guest's first request, so the guest's mount carries on
//! where the template's stopped. Nothing of the template's directory
//! remains: the guest looked nothing up in it (no inode but the root, which
//! FUSE always calls 1, and whose attributes the guest holds as expired
//! since the mount), and the new server's root is the pod's directory.
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
//! - Writes and reads of up to 1 MiB a request (`FUSE_BIG_WRITES` and
//!   `FUSE_MAX_PAGES`, 256 pages: the server's own limit) and symlink text
//!   in the guest's page cache (`FUSE_CACHE_SYMLINKS`). The device adds
//!   these to the file system's INIT answer (`PassthroughFs` asks for none
//!   of them, and the server grants only what the file system asks for):
//!   without them the guest sent every write one page at a time (a 1 MiB
//!   write was 256 round trips) and asked for a link's text each time it
//!   resolved it. The server checks every request against its 1 MiB limit
//!   whatever was negotiated. The guest's read-ahead stays at the kernel's
//!   128 KiB: 1 MiB made exec fault a binary in with fewer, larger reads,
//!   but cost an idle pod 0.5 MiB more guest page cache and no time that
//!   `hack/bench ctr` could tell from its noise.
//! - File data through DAX (`dax.rs`): the guest mounts the share with
//!   `dax=always` and maps file ranges (2 MiB at a time) from the host's
//!   page cache into the device's window instead of reading them into its
//!   own. A guest write, through `write` or a shared mapping, is in the
//!   host file at once; a host-side change is seen by the guest at once;
//!   a container's executables cost the pod no guest memory and are shared
//!   with every pod of the same image. A guest without DAX falls back to
//!   the page cache, with the policy below.
//! - Cache policy `auto` with 1 s attribute and entry timeouts, no writeback
//!   cache: guest writes reach the host file before the write call
//!   returns; a host-side change is seen by the guest at the next open of
//!   the file (its page cache is dropped on every open) and in metadata
//!   and directory entries within a second. `never` (no guest page cache at all) would make
//!   `mmap(MAP_SHARED)` of share files fail in the guest with ENODEV (this
//!   server does not negotiate FUSE_DIRECT_IO_ALLOW_MMAP), which programs in
//!   a container rootfs rely on; `always` and writeback would let the guest
//!   keep stale data or hold writes the host cannot see yet.
//! - A LOOKUP of a name that does not exist is answered with a negative
//!   entry (node 0) valid for the entry timeout, not ENOENT, so the guest
//!   keeps the negative dentry like a positive one instead of asking again
//!   at every path walk (`answer_lookup`). A file the host creates under a
//!   name the guest just found missing is seen within the same second.
//! - Device nodes: a MKNOD of a character or block device is answered
//!   EPERM unless a container of the pod was granted it
//!   (`device_nodes.rs`), before the server sees it.
//! - Writes are refused where the host made the tree read-only (e.g. a
//!   read-only bind mount inside the share): the server's own `open` or
//!   `create` gets EROFS and passes it on.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::{
    EntryOut, InHeader, InitIn, InitIn2, InitOut, MknodIn, Opcode, OutHeader, KERNEL_MINOR_VERSION,
    KERNEL_VERSION,
};
use fuse_backend_rs::api::filesystem::{Context, FileSystem, FsOptions};
use fuse_backend_rs::api::server::{Server, MAX_BUFFER_SIZE, MAX_REQ_PAGES};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{FsCacheReqHandler, Reader, VirtioFsWriter, Writer};
use log::{debug, error, warn};

mod dax;
mod device_nodes;
#[cfg(test)]
mod fuzz;
mod requests;
pub use dax::DaxWindow;
use dax::WindowHandler;
pub use device_nodes::{DeviceKind, DeviceNodeGrants, DeviceRule};
pub use requests::{RequestCounts, ShareRequests};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::gate::MemoryGate;
use super::guest_errors::{guest_warn, GuestErrors};
use super::worker::{stop_pair, WorkerThread};
use super::{
    ActiveQueue, DeviceError, GuestMemory, IrqLine, QueuePosition, SavedDeviceState, VirtioDevice,
    VIRTIO_MMIO_INT_VRING,
};
use crate::jail::ThreadKind;

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

/// The FUSE session a guest opened with its INIT request: what a clone's
/// server must be told so that the guest's mount, made in the template, is
/// served without a new INIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FuseSession {
    pub major: u32,
    pub minor: u32,
    /// `flags | flags2 << 32` of the INIT: what the guest kernel can do.
    pub flags: u64,
}

/// The protocol major version the server speaks; an INIT with another is
/// answered without opening a session (the kernel retries or gives up).
const FUSE_MAJOR: u32 = 7;
/// `FUSE_INIT_EXT`: the INIT carries a second word of flags.
const FUSE_INIT_EXT: u64 = 1 << 30;

/// The INIT of a guest (its body) the server will accept: the session it
/// opens, and the read-ahead the guest asked for.
fn read_init(args: &mut Reader<'_, ()>) -> Option<(FuseSession, u32)> {
    let init: InitIn = args.read_obj().ok()?;
    if init.major != FUSE_MAJOR {
        return None;
    }
    let mut flags = u64::from(init.flags);
    if flags & FUSE_INIT_EXT != 0 {
        let more: InitIn2 = args.read_obj().ok()?;
        flags |= u64::from(more.flags2) << 32;
    }
    let session = FuseSession {
        major: init.major,
        minor: init.minor,
        flags,
    };
    Some((session, init.max_readahead))
}

/// The oldest protocol minor whose INIT reply is the whole `InitOut`
/// (with `max_pages` and `flags2`); older guests are answered by the
/// server as it always did.
const FULL_INIT_OUT_MINOR: u32 = 23;

/// What the server handles for any file system but grants only when the
/// file system asks (see the module comment).
fn server_options() -> FsOptions {
    FsOptions::BIG_WRITES | FsOptions::MAX_PAGES | FsOptions::CACHE_SYMLINKS
}

/// Answers a share's INIT (`session`, `max_readahead`: what the guest
/// sent) as the server would, with [`server_options`] added to what the
/// file system asks for; returns the reply's length.
fn answer_init(
    fs: &PassthroughFs,
    writer: &mut Writer<'_, ()>,
    request: InHeader,
    session: FuseSession,
    max_readahead: u32,
) -> io::Result<usize> {
    let capable = FsOptions::from_bits_truncate(session.flags);
    let want = match fs.init(capable) {
        Ok(want) => want | server_options(),
        Err(e) => return reply_error(writer, request, e.raw_os_error().unwrap_or(libc::EIO)),
    };
    let enabled = capable & want;
    let mut out = InitOut {
        major: KERNEL_VERSION,
        minor: KERNEL_MINOR_VERSION,
        max_readahead,
        flags: enabled.bits() as u32,
        max_background: u16::MAX,
        congestion_threshold: u16::MAX / 4 * 3,
        // The server's answer without BIG_WRITES (8 KiB buffer, 4 KiB header).
        max_write: 4096,
        time_gran: 1,
        flags2: (enabled.bits() >> 32) as u32,
        ..Default::default()
    };
    if enabled.contains(FsOptions::MAX_PAGES) {
        out.max_pages = MAX_REQ_PAGES;
    }
    if enabled.intersects(FsOptions::MAX_PAGES | FsOptions::BIG_WRITES) {
        out.max_write = MAX_BUFFER_SIZE;
    }
    let header = OutHeader {
        len: (std::mem::size_of::<OutHeader>() + std::mem::size_of::<InitOut>()) as u32,
        error: 0,
        unique: request.unique,
    };
    io::Write::write_all(writer, vm_memory::ByteValued::as_slice(&header))?;
    io::Write::write_all(writer, vm_memory::ByteValued::as_slice(&out))?;
    Ok(writer.bytes_written())
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

/// Whether a MKNOD (`args`: its body) would make a device node the pod was
/// not granted (logged, with the node asked for).
fn refused_mknod(args: &mut Reader<'_, ()>, grants: &DeviceNodeGrants) -> bool {
    // Too short a request is the server's to refuse.
    let Ok(args) = args.read_obj::<MknodIn>() else {
        return false;
    };
    if grants.allows_mknod(args.mode, args.rdev) {
        return false;
    }
    guest_warn!(
        grants.refusals(),
        "{DEVICE}: refused the guest's mknod of device {}:{} (mode {:o}): no container of the pod was granted it",
        libc::major(args.rdev.into()),
        libc::minor(args.rdev.into()),
        args.mode
    );
    true
}

/// Answers `request` with `-errno` and no body; returns the reply's length.
fn reply_error(writer: &mut Writer<'_, ()>, request: InHeader, errno: i32) -> io::Result<usize> {
    let out = OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: -errno,
        unique: request.unique,
    };
    io::Write::write_all(writer, vm_memory::ByteValued::as_slice(&out))?;
    Ok(writer.bytes_written())
}

/// The oldest protocol minor where a LOOKUP answered with node 0 is a
/// negative entry the kernel caches (older ones want ENOENT).
const NEGATIVE_ENTRY_MINOR: u32 = 4;

/// Answers a LOOKUP (`args`: its body) as the server would, except that a
/// name that does not exist is a negative entry the guest may cache for
/// the entry timeout, like a positive one, instead of ENOENT, which it asks
/// again at every path walk: a container's create looked up its missing
/// mount points and the missing directories of its PATH two or three
/// times each (a device trace). None: a body the server should refuse.
fn answer_lookup(
    fs: &PassthroughFs,
    writer: &mut Writer<'_, ()>,
    request: InHeader,
    args: &mut Reader<'_, ()>,
) -> Option<io::Result<usize>> {
    let len = (request.len as usize).checked_sub(std::mem::size_of::<InHeader>())?;
    if len > args.available_bytes() {
        return None;
    }
    let mut body = vec![0u8; len];
    io::Read::read_exact(args, &mut body).ok()?;
    let name = std::ffi::CStr::from_bytes_until_nul(&body).ok()?;
    let out = match fs.lookup(&Context::from(&request), request.nodeid, name) {
        Ok(entry) => EntryOut::from(entry),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => EntryOut {
            nodeid: 0,
            entry_valid: METADATA_TIMEOUT.as_secs(),
            entry_valid_nsec: METADATA_TIMEOUT.subsec_nanos(),
            ..Default::default()
        },
        Err(e) => {
            return Some(reply_error(
                writer,
                request,
                e.raw_os_error().unwrap_or(libc::EIO),
            ))
        }
    };
    let header = OutHeader {
        len: (std::mem::size_of::<OutHeader>() + std::mem::size_of::<EntryOut>()) as u32,
        error: 0,
        unique: request.unique,
    };
    Some((|| {
        io::Write::write_all(writer, vm_memory::ByteValued::as_slice(&header))?;
        io::Write::write_all(writer, vm_memory::ByteValued::as_slice(&out))?;
        Ok(writer.bytes_written())
    })())
}

/// Who answers the guest's FUSE requests.
enum Backend {
    Unattached(Server<Unattached>),
    Share {
        server: Server<Arc<PassthroughFs>>,
        /// The server's file system, for a session taken over from a
        /// template ([`Backend::take_over`]).
        fs: Arc<PassthroughFs>,
        device_nodes: Arc<DeviceNodeGrants>,
        /// The guest's last INIT (see [`FuseSession`]).
        session: std::sync::Mutex<Option<FuseSession>>,
        /// Where SETUPMAPPING puts files (none: the guest is refused).
        window: Option<Arc<DaxWindow>>,
        /// Every request served, counted for the shim's timings.
        requests: Arc<ShareRequests>,
    },
}

impl Backend {
    fn for_share(
        share: Option<&Path>,
        device_nodes: &Arc<DeviceNodeGrants>,
        window: Option<&Arc<DaxWindow>>,
    ) -> Result<Backend, FsError> {
        let Some(dir) = share else {
            return Ok(Backend::Unattached(Server::new(Unattached)));
        };
        let fail = |cause: String| FsError::Share {
            path: dir.to_owned(),
            cause,
        };
        let root = dir
            .to_str()
            .ok_or_else(|| fail("path is not UTF-8".into()))?;
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
        fs.import()
            .map_err(|e| fail(format!("opening as root: {e}")))?;
        let fs = Arc::new(fs);
        Ok(Backend::Share {
            server: Server::new(Arc::clone(&fs)),
            fs,
            device_nodes: Arc::clone(device_nodes),
            session: Default::default(),
            window: window.cloned(),
            requests: Arc::default(),
        })
    }

    fn requests(&self) -> Option<Arc<ShareRequests>> {
        match self {
            Backend::Unattached(_) => None,
            Backend::Share { requests, .. } => Some(Arc::clone(requests)),
        }
    }

    fn session(&self) -> Option<FuseSession> {
        match self {
            Backend::Unattached(_) => None,
            Backend::Share { session, .. } => *session.lock().unwrap(),
        }
    }

    /// Gives the file system the INIT the guest sent its template's device,
    /// as the server would have. The server's own record of the version
    /// only decides how a negative LOOKUP is answered to kernels older than
    /// 7.4, which cannot have opened a session here.
    fn take_over(&self, saved: FuseSession) -> io::Result<()> {
        match self {
            // The guest's mount fails every request with ENOSYS until the
            // agent unmounts it (a clone without a share does at once).
            Backend::Unattached(_) => Ok(()),
            Backend::Share { fs, session, .. } => {
                if saved.major != FUSE_MAJOR {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("FUSE major version {} is not {FUSE_MAJOR}", saved.major),
                    ));
                }
                fs.init(FsOptions::from_bits_truncate(saved.flags))?;
                *session.lock().unwrap() = Some(saved);
                Ok(())
            }
        }
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
        let mut writer: Writer<'_, ()> = match VirtioFsWriter::new(mem, chain) {
            Ok(w) => w.into(),
            Err(e) => {
                debug!("{DEVICE}: unwritable reply buffers: {e}");
                return 0;
            }
        };
        let res = match self {
            Backend::Unattached(s) => s
                .handle_message(reader, writer, None, None)
                .map_err(|e| e.to_string()),
            Backend::Share {
                server,
                fs,
                device_nodes,
                session,
                window,
                requests,
            } => {
                let started = Instant::now();
                let serve = |reader, writer| {
                    let mut mapper = window.as_ref().map(|w| WindowHandler(Arc::clone(w)));
                    let vu_req = mapper.as_mut().map(|m| m as &mut dyn FsCacheReqHandler);
                    server
                        .handle_message(reader, writer, vu_req, None)
                        .map_err(|e| e.to_string())
                };
                // One look at the header, on a copy: the server reads the
                // request from its start.
                let mut args = reader.clone();
                let header = args.read_obj::<InHeader>().ok();
                let res = match header {
                    Some(h)
                        if h.opcode == Opcode::Mknod as u32
                            && refused_mknod(&mut args, device_nodes) =>
                    {
                        reply_error(&mut writer, h, libc::EPERM).map_err(|e| e.to_string())
                    }
                    Some(h) if h.opcode == Opcode::Init as u32 => match read_init(&mut args) {
                        // Recorded whether or not the file system agrees:
                        // only a template whose guest mounted the share is
                        // saved with it, and a clone's device repeats the
                        // INIT.
                        Some((opened, max_readahead)) => {
                            *session.lock().unwrap() = Some(opened);
                            if opened.minor >= FULL_INIT_OUT_MINOR {
                                answer_init(fs, &mut writer, h, opened, max_readahead)
                                    .map_err(|e| e.to_string())
                            } else {
                                serve(reader, writer)
                            }
                        }
                        None => serve(reader, writer),
                    },
                    Some(h)
                        if h.opcode == Opcode::Lookup as u32
                            && session
                                .lock()
                                .unwrap()
                                .is_some_and(|s| s.minor >= NEGATIVE_ENTRY_MINOR) =>
                    {
                        match answer_lookup(fs, &mut writer, h, &mut args) {
                            Some(res) => res.map_err(|e| e.to_string()),
                            None => serve(reader, writer),
                        }
                    }
                    _ => serve(reader, writer),
                };
                if let Some(h) = header {
                    requests.record(h.opcode, started.elapsed());
                }
                res
            }
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

/// The virtio-fs device.
pub struct Fs {
    share: Option<PathBuf>,
    device_nodes: Arc<DeviceNodeGrants>,
    config: [u8; CONFIG_LEN],
    backend: Arc<Backend>,
    acked_features: u64,
    worker: Option<WorkerThread<Worker>>,
    gate: MemoryGate,
    /// The DAX window offered as shared memory region 0 (see dax.rs).
    window: Option<Arc<DaxWindow>>,
}

impl Fs {
    /// A device with no directory behind it (every boot and template VM).
    pub fn unattached(tag: &str, window: Option<Arc<DaxWindow>>) -> Result<Fs, FsError> {
        Self::build(tag, None, Arc::default(), window)
    }

    /// A device serving `share` (a directory; symlinks in the path are
    /// resolved once, here, by the host), where the guest may create the
    /// device nodes `device_nodes` grants (its owner changes them as
    /// containers come and go), and may map files into `window`.
    pub fn with_share(
        tag: &str,
        share: &Path,
        device_nodes: Arc<DeviceNodeGrants>,
        window: Option<Arc<DaxWindow>>,
    ) -> Result<Fs, FsError> {
        let dir = Self::check_share(share)?;
        Self::build(tag, Some(dir), device_nodes, window)
    }

    /// `share`, resolved, if it is a directory a device could serve.
    pub fn check_share(share: &Path) -> Result<PathBuf, FsError> {
        let fail = |cause: String| FsError::Share {
            path: share.to_owned(),
            cause,
        };
        let dir = share.canonicalize().map_err(|e| fail(e.to_string()))?;
        let meta = std::fs::metadata(&dir).map_err(|e| fail(e.to_string()))?;
        if !meta.is_dir() {
            return Err(fail("not a directory".into()));
        }
        Ok(dir)
    }

    fn build(
        tag: &str,
        share: Option<PathBuf>,
        device_nodes: Arc<DeviceNodeGrants>,
        window: Option<Arc<DaxWindow>>,
    ) -> Result<Fs, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::Tag(tag.to_owned()));
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        Ok(Fs {
            backend: Arc::new(Backend::for_share(
                share.as_deref(),
                &device_nodes,
                window.as_ref(),
            )?),
            share,
            device_nodes,
            config,
            acked_features: 0,
            worker: None,
            gate: MemoryGate::default(),
            window,
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
        worker.stop(&self.name())
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
        super::read_config_space(&self.config, offset, data);
    }

    /// Region 0 is the cache, the DAX window (virtio 1.2, 5.11.5).
    fn shm_region(&self, id: u32) -> Option<(u64, u64)> {
        match (id, &self.window) {
            (0, Some(w)) => Some((crate::vmm::layout::DAX_WINDOW_BASE, w.size())),
            _ => None,
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "{DEVICE}: ignoring {}-byte write to read-only config space at {offset:#x}",
            data.len()
        );
    }

    fn share_requests(&self) -> Option<Arc<ShareRequests>> {
        self.backend.requests()
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
        let (stop, worker_stop) = stop_pair().map_err(io_err)?;
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
            gate: self.gate.clone(),
            guest_errors: GuestErrors::default(),
        };
        self.worker = Some(
            WorkerThread::spawn_beneath(
                "fs",
                ThreadKind::Fs,
                self.share.clone(),
                stop,
                move || worker.run(),
            )
            .map_err(io_err)?,
        );
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop_worker();
        self.acked_features = 0;
        // A driver that starts over starts a new FUSE session: the old
        // session's inodes and open files must not outlive it.
        // The driver resets from a vCPU, whose jail opens no files: the
        // new session is opened outside it.
        // Nor may its mappings: the new session starts with an empty window.
        if let Some(w) = &self.window {
            if let Err(e) = w.unmap(0, w.size()) {
                warn!("{}: emptying the DAX window: {e}", self.name());
            }
        }
        let (share, nodes, window) = (
            self.share.clone(),
            self.device_nodes.clone(),
            self.window.clone(),
        );
        let fresh = crate::jail::outside(move || {
            Backend::for_share(share.as_deref(), &nodes, window.as_ref())
        })
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        self.backend = Arc::new(fresh.unwrap_or_else(|e| {
            warn!("{e}; the device is unattached from now on");
            Backend::Unattached(Server::new(Unattached))
        }));
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

    fn saved_state(&self) -> Option<SavedDeviceState> {
        self.backend.session().map(SavedDeviceState::Fs)
    }

    fn restore_state(&mut self, state: &SavedDeviceState) -> Result<(), DeviceError> {
        let SavedDeviceState::Fs(session) = state;
        self.backend
            .take_over(*session)
            .map_err(|e| DeviceError::Restore {
                device: DEVICE,
                cause: format!("{}: the guest's FUSE session: {e}", self.name()),
            })
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
    gate: MemoryGate,
    /// Rings the guest made unusable (a bad address or index).
    guest_errors: GuestErrors,
}

impl Worker {
    fn run(mut self) -> Worker {
        let gate = self.gate.clone();
        // Requests may already be waiting (a kick that raced with
        // activation, or a restored clone); do not wait for the next one.
        {
            let _serving = gate.hold();
            for i in 0..self.queues.len() {
                self.process_queue(i);
            }
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
            let _serving = gate.hold();
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
            guest_errors,
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
                guest_warn!(guest_errors, "{name}: queue {index}: {e}");
                break;
            }
            let mut popped = false;
            while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
                popped = true;
                let head = chain.head_index();
                let len = backend.handle(mem, chain);
                if let Err(e) = queue.add_used(&*mem, head, len) {
                    guest_warn!(guest_errors, "{name}: queue {index}: used ring: {e}");
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
                    guest_warn!(guest_errors, "{name}: queue {index}: {e}");
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

#[cfg(test)]
mod tests {
    use super::*;
    use fuse_backend_rs::abi::fuse_abi::{InitIn, OpenIn, OpenOut, ReadIn, ROOT_ID};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

    const REQ: u64 = 0x1_0000;
    const REPLY: u64 = 0x2_0000;
    const REPLY_LEN: u32 = 0x1000;
    const TAG: &str = "jevm-share";

    fn guest_memory() -> GuestMemory {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// One FUSE request through `backend`, as the guest would put it on the
    /// request queue; returns the reply header and body.
    fn call(
        backend: &Backend,
        mem: &GuestMemory,
        opcode: Opcode,
        nodeid: u64,
        body: &[u8],
    ) -> (OutHeader, Vec<u8>) {
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode: opcode as u32,
            unique: 0x5eed,
            nodeid,
            ..Default::default()
        };
        let mut req = header.as_slice().to_vec();
        req.extend_from_slice(body);
        mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        mem.write_slice(&[0xee; REPLY_LEN as usize], GuestAddress(REPLY))
            .unwrap();
        let mock = MockSplitQueue::new(mem, 16);
        let descs = [
            SplitDescriptor::new(REQ, req.len() as u32, VRING_DESC_F_NEXT as u16, 1),
            SplitDescriptor::new(REPLY, REPLY_LEN, VRING_DESC_F_WRITE as u16, 0),
        ];
        let raw: Vec<RawDescriptor> = descs.iter().map(|d| RawDescriptor::from(*d)).collect();
        mock.add_desc_chains(&raw, 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let chain = queue.pop_descriptor_chain(mem).unwrap();
        let used = backend.handle(mem, chain) as usize;
        let mut reply = vec![0u8; used];
        mem.read_slice(&mut reply, GuestAddress(REPLY)).unwrap();
        assert!(used >= 16, "no reply header, used length {used}");
        let out = *OutHeader::from_slice(&reply[..16]).unwrap();
        assert_eq!(out.unique, 0x5eed, "reply to the wrong request");
        assert_eq!(out.len as usize, used, "header length vs used length");
        (out, reply[16..].to_vec())
    }

    fn init(backend: &Backend, mem: &GuestMemory) -> OutHeader {
        let body = InitIn {
            major: 7,
            minor: 33,
            max_readahead: 0,
            flags: 0,
        };
        call(backend, mem, Opcode::Init, 0, body.as_slice()).0
    }

    fn lookup(
        backend: &Backend,
        mem: &GuestMemory,
        parent: u64,
        name: &str,
    ) -> Result<EntryOut, i32> {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        let (out, reply) = call(backend, mem, Opcode::Lookup, parent, &body);
        if out.error != 0 {
            return Err(-out.error);
        }
        let entry = *EntryOut::from_slice(&reply[..std::mem::size_of::<EntryOut>()]).unwrap();
        // Node 0: a negative entry, the guest's ENOENT.
        if entry.nodeid == 0 {
            return Err(libc::ENOENT);
        }
        Ok(entry)
    }

    fn open(backend: &Backend, mem: &GuestMemory, node: u64, flags: i32) -> Result<u64, i32> {
        let body = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        let (out, reply) = call(backend, mem, Opcode::Open, node, body.as_slice());
        if out.error != 0 {
            return Err(-out.error);
        }
        Ok(
            OpenOut::from_slice(&reply[..std::mem::size_of::<OpenOut>()])
                .unwrap()
                .fh,
        )
    }

    #[test]
    fn the_guest_maps_share_files_into_the_dax_window_and_nothing_else() {
        use fuse_backend_rs::abi::virtio_fs::{RemovemappingIn, RemovemappingOne, SetupmappingIn};
        let (_dir, share) = scratch();
        let window = Arc::new(DaxWindow::new(4 << 20).unwrap());
        let fs = Fs::with_share(TAG, &share, Arc::default(), Some(Arc::clone(&window))).unwrap();
        assert_eq!(
            fs.shm_region(0),
            Some((crate::vmm::layout::DAX_WINDOW_BASE, 4 << 20))
        );
        assert_eq!(fs.shm_region(1), None);
        assert_eq!(Fs::unattached(TAG, None).unwrap().shm_region(0), None);

        let (backend, mem) = (backend_of(&fs), guest_memory());
        assert_eq!(init(backend, &mem).error, 0);
        let node = lookup(backend, &mem, ROOT_ID, "hello").unwrap().nodeid;
        let fh = open(backend, &mem, node, libc::O_RDONLY).unwrap();
        let setup = |moffset: u64, len: u64| {
            let body = SetupmappingIn {
                fh,
                foffset: 0,
                len,
                flags: 0,
                moffset,
            };
            call(backend, &mem, Opcode::SetupMapping, node, body.as_slice())
                .0
                .error
        };
        assert_eq!(setup(2 << 20, 2 << 20), 0);
        // SAFETY: the window's first page at 2 MiB now maps the file.
        let seen = unsafe { std::slice::from_raw_parts(window.host_ptr().add(2 << 20), 19) };
        assert_eq!(seen, b"hello from the host");
        assert_eq!(
            setup(3 << 20, 2 << 20),
            -libc::EINVAL,
            "a mapping past the window"
        );
        let mut body = RemovemappingIn { count: 1 }.as_slice().to_vec();
        body.extend_from_slice(
            RemovemappingOne {
                moffset: 2 << 20,
                len: 2 << 20,
            }
            .as_slice(),
        );
        let (out, _) = call(backend, &mem, Opcode::RemoveMapping, node, &body);
        assert_eq!(out.error, 0);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(
            !maps.contains(&*share.join("hello").to_string_lossy()),
            "the file is still mapped after REMOVEMAPPING"
        );
    }

    #[test]
    fn a_missing_name_is_a_negative_entry_the_guest_may_cache() {
        let (_dir, share) = scratch();
        let mem = guest_memory();
        let raw_lookup = |b: &Backend, name: &str| {
            let mut body = name.as_bytes().to_vec();
            body.push(0);
            call(b, &mem, Opcode::Lookup, ROOT_ID, &body)
        };
        let fs = Fs::with_share(TAG, &share, Arc::default(), None).unwrap();
        let b = backend_of(&fs);
        assert_eq!(init(b, &mem).error, 0);
        let (out, body) = raw_lookup(b, "missing");
        assert_eq!(out.error, 0);
        let entry = *EntryOut::from_slice(&body[..std::mem::size_of::<EntryOut>()]).unwrap();
        assert_eq!(entry.nodeid, 0, "not a negative entry");
        assert_eq!(
            (entry.entry_valid, entry.entry_valid_nsec),
            (METADATA_TIMEOUT.as_secs(), METADATA_TIMEOUT.subsec_nanos())
        );
        // An existing name: the file system's entry, as the server sends it.
        let hello = lookup(b, &mem, ROOT_ID, "hello").unwrap();
        assert_ne!(hello.nodeid, ROOT_ID);
        assert_eq!(hello.attr.size, b"hello from the host".len() as u64);
        assert_eq!(
            (hello.entry_valid, hello.attr_valid),
            (METADATA_TIMEOUT.as_secs(), METADATA_TIMEOUT.as_secs())
        );
        // What the guest opens with it is the file.
        assert_eq!(open_and_read(b, &mem, hello.nodeid), b"hello from the host");
        // Errors other than ENOENT stay errors; `..` stays in the share.
        assert_eq!(raw_lookup(b, "a/b").0.error, -libc::EINVAL);
        assert_eq!(lookup(b, &mem, ROOT_ID, "..").unwrap().nodeid, ROOT_ID);
        // Each request served was counted, the ones answered here and the
        // server's alike.
        let asked = fs.share_requests().expect("a share counts").counts();
        assert_eq!(asked.to_string(), "LOOKUP:4,INIT:1,OPEN:1,READ:1");
        assert!(asked.host > Duration::ZERO);
    }

    /// Opens `node` read-only and reads its first 64 bytes; both must succeed.
    fn open_and_read(backend: &Backend, mem: &GuestMemory, node: u64) -> Vec<u8> {
        let fh = open(backend, mem, node, libc::O_RDONLY).unwrap();
        let read = ReadIn {
            fh,
            size: 64,
            ..Default::default()
        };
        let (out, data) = call(backend, mem, Opcode::Read, node, read.as_slice());
        assert_eq!(out.error, 0);
        data
    }

    /// A share directory `share` inside a scratch directory that also
    /// holds `secret`, a file the guest must not reach.
    fn scratch() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), b"host-only").unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        std::fs::write(share.join("hello"), b"hello from the host").unwrap();
        std::os::unix::fs::symlink("../secret", share.join("escape")).unwrap();
        (dir, share)
    }

    fn backend_of(fs: &Fs) -> &Backend {
        &fs.backend
    }

    #[test]
    fn config_space_is_the_nul_padded_tag_and_one_request_queue() {
        let fs = Fs::unattached(TAG, None).unwrap();
        let mut tag = [0xffu8; TAG_LEN];
        fs.read_config(0, &mut tag);
        let mut want = [0u8; TAG_LEN];
        want[..TAG.len()].copy_from_slice(TAG.as_bytes());
        assert_eq!(tag, want);
        let mut n = [0u8; 4];
        fs.read_config(TAG_LEN as u64, &mut n);
        assert_eq!(u32::from_le_bytes(n), 1);
        let mut past = [0xffu8; 4];
        fs.read_config(CONFIG_LEN as u64, &mut past);
        assert_eq!(past, [0; 4]);
        assert_eq!(fs.device_type(), 26);
        assert_eq!(fs.queue_max_sizes().len(), 2);
        assert!(Fs::unattached("", None).is_err());
        assert!(Fs::unattached(&"x".repeat(37), None).is_err());
    }

    #[test]
    fn unattached_device_answers_init_with_enodev_and_other_requests_with_errors() {
        let fs = Fs::unattached(TAG, None).unwrap();
        let mem = guest_memory();
        assert_eq!(init(backend_of(&fs), &mem).error, -libc::ENODEV);
        assert!(lookup(backend_of(&fs), &mem, ROOT_ID, "x").is_err());
    }

    /// An INIT as a 6.1 kernel sends it: 64 bits of flags (`INIT_EXT`).
    fn init_ext(backend: &Backend, mem: &GuestMemory, flags: u64) -> (OutHeader, Vec<u8>) {
        let mut body = InitIn {
            major: 7,
            minor: 38,
            max_readahead: 0x2_0000,
            flags: flags as u32 | FUSE_INIT_EXT as u32,
        }
        .as_slice()
        .to_vec();
        let more = InitIn2 {
            flags2: (flags >> 32) as u32,
            unused: [0; 11],
        };
        body.extend_from_slice(more.as_slice());
        call(backend, mem, Opcode::Init, 0, &body)
    }

    #[test]
    fn a_share_s_init_answer_adds_large_requests_and_cached_symlinks_where_the_guest_can() {
        let (_dir, share) = scratch();
        let fs = Fs::with_share(TAG, &share, Arc::default(), None).unwrap();
        let mem = guest_memory();
        let opts = |o: &InitOut| {
            FsOptions::from_bits_truncate(u64::from(o.flags) | u64::from(o.flags2) << 32)
        };

        let can = FsOptions::MAX_PAGES
            | FsOptions::CACHE_SYMLINKS
            | FsOptions::BIG_WRITES
            | FsOptions::DO_READDIRPLUS
            | FsOptions::WRITEBACK_CACHE;
        let (out, body) = init_ext(backend_of(&fs), &mem, can.bits());
        assert_eq!(out.error, 0);
        assert_eq!(body.len(), std::mem::size_of::<InitOut>());
        let init = *InitOut::from_slice(&body).unwrap();
        assert_eq!((init.major, init.minor), (7, KERNEL_MINOR_VERSION));
        let on = opts(&init);
        assert!(
            on.contains(FsOptions::MAX_PAGES | FsOptions::CACHE_SYMLINKS),
            "{on:?}"
        );
        assert!(
            on.contains(FsOptions::DO_READDIRPLUS),
            "the file system's own wish: {on:?}"
        );
        assert!(
            !on.contains(FsOptions::WRITEBACK_CACHE),
            "writeback was not configured: {on:?}"
        );
        assert_eq!(init.max_pages, 256);
        assert_eq!(init.max_write, 1 << 20);
        assert_eq!(init.max_readahead, 0x2_0000, "the guest's own read-ahead");

        // Nothing the guest cannot do, and an old guest gets the server's
        // own (shorter) answer.
        let (out, body) = init_ext(backend_of(&fs), &mem, FsOptions::DO_READDIRPLUS.bits());
        assert_eq!(out.error, 0);
        let init = *InitOut::from_slice(&body).unwrap();
        assert!(!opts(&init).intersects(server_options()));
        assert_eq!((init.max_pages, init.max_write), (0, 4096));
        let old = InitIn {
            major: 7,
            minor: 22,
            max_readahead: 0,
            flags: FsOptions::BIG_WRITES.bits() as u32,
        };
        let (out, body) = call(backend_of(&fs), &mem, Opcode::Init, 0, old.as_slice());
        assert_eq!(out.error, 0);
        assert_eq!(body.len(), 24, "FUSE_COMPAT_22_INIT_OUT_SIZE");
        assert!(fs.saved_state().is_some());
    }

    #[test]
    fn a_clone_serves_its_own_share_behind_the_session_its_template_s_guest_opened() {
        let (_t, template_share) = scratch();
        std::fs::remove_file(template_share.join("hello")).unwrap();
        let template = Fs::with_share(TAG, &template_share, Arc::default(), None).unwrap();
        let mem = guest_memory();
        assert_eq!(template.saved_state(), None, "no session before INIT");
        let flags = (1 << 33) | (1 << 13) | 1;
        assert_eq!(init_ext(backend_of(&template), &mem, flags).0.error, 0);
        let saved = template.saved_state().expect("the INIT opened a session");
        assert_eq!(
            saved,
            SavedDeviceState::Fs(FuseSession {
                major: 7,
                minor: 38,
                flags: flags | FUSE_INIT_EXT,
            })
        );

        // The clone's device answers the guest's requests at once: no INIT.
        let (_c, clone_share) = scratch();
        let mut clone = Fs::with_share(TAG, &clone_share, Arc::default(), None).unwrap();
        clone.restore_state(&saved).unwrap();
        assert_eq!(clone.saved_state(), Some(saved.clone()));
        let b = backend_of(&clone);
        let hello = lookup(b, &mem, ROOT_ID, "hello").unwrap();
        assert_eq!(open_and_read(b, &mem, hello.nodeid), b"hello from the host");
        // Only the clone's own directory is behind it.
        assert_eq!(
            lookup(b, &mem, ROOT_ID, "..").unwrap().nodeid,
            ROOT_ID,
            "'..' of the root left the share"
        );

        // A clone without a share keeps nothing; one of another FUSE major
        // version is refused, naming the device and the version.
        let mut unattached = Fs::unattached(TAG, None).unwrap();
        unattached.restore_state(&saved).unwrap();
        assert_eq!(unattached.saved_state(), None);
        let mut other = Fs::with_share(TAG, &clone_share, Arc::default(), None).unwrap();
        let e = other
            .restore_state(&SavedDeviceState::Fs(FuseSession {
                major: 8,
                minor: 0,
                flags: 0,
            }))
            .unwrap_err()
            .to_string();
        assert!(e.contains("FUSE major version 8 is not 7"), "{e}");
        assert!(e.contains(&clone_share.display().to_string()), "{e}");
    }

    #[test]
    fn an_init_of_another_major_version_or_a_reset_opens_no_session() {
        let (_dir, share) = scratch();
        let mut fs = Fs::with_share(TAG, &share, Arc::default(), None).unwrap();
        let mem = guest_memory();
        let v8 = InitIn {
            major: 8,
            minor: 0,
            max_readahead: 0,
            flags: 0,
        };
        call(backend_of(&fs), &mem, Opcode::Init, 0, v8.as_slice());
        assert_eq!(fs.saved_state(), None);
        assert_eq!(init(backend_of(&fs), &mem).error, 0);
        assert!(fs.saved_state().is_some());
        assert!(fs.reset());
        assert_eq!(fs.saved_state(), None, "a reset ends the session");
    }

    #[test]
    fn share_serves_a_host_file_and_dot_dot_at_the_root_stays_at_the_root() {
        let (_dir, share) = scratch();
        let fs = Fs::with_share(TAG, &share, Arc::default(), None).unwrap();
        let b = backend_of(&fs);
        let mem = guest_memory();
        assert_eq!(init(b, &mem).error, 0);

        let hello = lookup(b, &mem, ROOT_ID, "hello").unwrap();
        let fh = open(b, &mem, hello.nodeid, libc::O_RDONLY).unwrap();
        let read = ReadIn {
            fh,
            offset: 6,
            size: 64,
            ..Default::default()
        };
        let (out, data) = call(b, &mem, Opcode::Read, hello.nodeid, read.as_slice());
        assert_eq!(out.error, 0);
        assert_eq!(data, b"from the host");

        let up = lookup(b, &mem, ROOT_ID, "..").unwrap();
        assert_eq!(up.nodeid, ROOT_ID, "'..' of the root left the share");
        assert_eq!(
            lookup(b, &mem, up.nodeid, "secret").err(),
            Some(libc::ENOENT)
        );
        assert_eq!(
            lookup(b, &mem, ROOT_ID, "../secret").err(),
            Some(libc::EINVAL)
        );
    }

    #[test]
    fn symlinks_in_the_share_are_not_followed_on_the_host() {
        let (_dir, share) = scratch();
        let fs = Fs::with_share(TAG, &share, Arc::default(), None).unwrap();
        let b = backend_of(&fs);
        let mem = guest_memory();
        assert_eq!(init(b, &mem).error, 0);
        let link = lookup(b, &mem, ROOT_ID, "escape").unwrap();
        assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
        // Opening the link itself must not reach ../secret.
        assert!(open(b, &mem, link.nodeid, libc::O_RDONLY).is_err());
        let (out, target) = call(b, &mem, Opcode::Readlink, link.nodeid, &[]);
        assert_eq!(out.error, 0);
        assert_eq!(target, b"../secret");
    }

    #[test]
    fn share_must_be_an_existing_directory_and_errors_name_it() {
        let (dir, share) = scratch();
        let missing = dir.path().join("nope");
        let msg = Fs::with_share(TAG, &missing, Arc::default(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains(&*missing.to_string_lossy()), "{msg}");
        let file = share.join("hello");
        let msg = Fs::with_share(TAG, &file, Arc::default(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("not a directory"), "{msg}");
    }

    /// FUSE MKNOD of `name` in the root; the reply's errno, 0 on success.
    fn mknod(backend: &Backend, mem: &GuestMemory, name: &str, mode: u32, rdev: u32) -> i32 {
        let args = MknodIn {
            mode,
            rdev,
            umask: 0,
            padding: 0,
        };
        let mut body = args.as_slice().to_vec();
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        -call(backend, mem, Opcode::Mknod, ROOT_ID, &body).0.error
    }

    #[test]
    fn the_guest_makes_only_the_device_nodes_a_container_was_granted() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            crate::test_skip::skipped("needs root to make device nodes");
            return;
        }
        let (_dir, share) = scratch();
        let grants = Arc::new(DeviceNodeGrants::default());
        let fs = Fs::with_share(TAG, &share, Arc::clone(&grants), None).unwrap();
        let b = backend_of(&fs);
        let mem = guest_memory();
        assert_eq!(init(b, &mem).error, 0);
        let chr = libc::S_IFCHR | 0o666;
        let null = libc::makedev(1, 3) as u32;
        let disk = libc::makedev(8, 0) as u32;

        assert_eq!(mknod(b, &mem, "null", chr, null), libc::EPERM);
        assert_eq!(
            mknod(b, &mem, "sda", libc::S_IFBLK | 0o600, disk),
            libc::EPERM
        );
        assert!(!share.join("null").exists() && !share.join("sda").exists());
        // What is not a device is the server's as ever.
        assert_eq!(mknod(b, &mem, "fifo", libc::S_IFIFO | 0o644, 0), 0);
        assert_eq!(mknod(b, &mem, "whiteout", chr, 0), 0);

        grants.grant(
            "c1",
            vec![DeviceRule {
                allow: true,
                kind: DeviceKind::Char,
                major: Some(1),
                minor: Some(3),
                mknod: true,
            }],
        );
        assert_eq!(mknod(b, &mem, "null", chr, null), 0);
        let made = std::fs::metadata(share.join("null")).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::rdev(&made), null as u64);
        assert_eq!(
            mknod(b, &mem, "sda", libc::S_IFBLK | 0o600, disk),
            libc::EPERM
        );
        grants.revoke("c1");
        assert_eq!(mknod(b, &mem, "null2", chr, null), libc::EPERM);
    }

    fn wait_for_interrupt(irq: &IrqLine) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while irq.evt.read().is_err() {
            assert!(Instant::now() < deadline, "no interrupt from the worker");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn worker_serves_the_request_queue_and_pause_reports_queue_positions() {
        let (_dir, share) = scratch();
        let mut fs = Fs::with_share(TAG, &share, Arc::default(), None).unwrap();
        let mem = guest_memory();
        // Rings of the two queues apart from each other and from the buffers.
        let hiprio = MockSplitQueue::create(&mem, GuestAddress(0x8_0000), 16);
        let request = MockSplitQueue::create(&mem, GuestAddress(0x9_0000), 16);
        let notify = [
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ];
        let kick = notify[1].try_clone().unwrap();
        let irq = Arc::new(IrqLine::new(5).unwrap());
        let [n0, n1] = notify;
        fs.activate(
            mem.clone(),
            irq.clone(),
            vec![
                ActiveQueue {
                    queue: hiprio.create_queue().unwrap(),
                    notify: n0,
                },
                ActiveQueue {
                    queue: request.create_queue().unwrap(),
                    notify: n1,
                },
            ],
        )
        .unwrap();

        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + std::mem::size_of::<InitIn>()) as u32,
            opcode: Opcode::Init as u32,
            unique: 7,
            ..Default::default()
        };
        let body = InitIn {
            major: 7,
            minor: 33,
            ..Default::default()
        };
        let mut req = header.as_slice().to_vec();
        req.extend_from_slice(body.as_slice());
        mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        let descs = [
            SplitDescriptor::new(REQ, req.len() as u32, VRING_DESC_F_NEXT as u16, 1),
            SplitDescriptor::new(REPLY, REPLY_LEN, VRING_DESC_F_WRITE as u16, 0),
        ];
        let raw: Vec<RawDescriptor> = descs.iter().map(|d| RawDescriptor::from(*d)).collect();
        request.add_desc_chains(&raw, 0).unwrap();
        kick.write(1).unwrap();
        wait_for_interrupt(&irq);
        assert_eq!(request.used().idx().load(), 1);
        let out: OutHeader = mem.read_obj(GuestAddress(REPLY)).unwrap();
        assert_eq!((out.error, out.unique), (0, 7));

        let positions = fs.pause().unwrap();
        assert_eq!(
            positions,
            vec![
                QueuePosition::default(),
                QueuePosition {
                    next_avail: 1,
                    next_used: 1
                }
            ]
        );
        assert!(fs.worker.is_none());
    }
}
