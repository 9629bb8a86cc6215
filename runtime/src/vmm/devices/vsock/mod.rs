//! virtio-vsock (device type 19), backed by Unix sockets on the host in the
//! "hybrid vsock" convention Firecracker introduced, so host tools written
//! for Firecracker work unchanged:
//!
//! - Host to guest: a host process connects to `uds_path` and writes
//!   `CONNECT <port>\n`. Once a guest process listening on vsock port
//!   `<port>` accepts, the device answers `OK <host_port>\n` and the stream
//!   carries the connection's bytes; if nobody listens (or the guest does not
//!   answer within 2 s) the stream is closed.
//! - Guest to host: a guest connection to CID 2, port P is relayed to the
//!   Unix socket `<uds_path>_P`, which a host process must be listening on;
//!   otherwise the guest sees a reset.
//!
//! One worker thread ("vsock") serves the queues, the listener and all
//! streams from an epoll loop, without ever blocking on a socket. The
//! protocol logic lives in [`muxer`] so it can be tested without the thread.
//!
//! A Unix peer that only half-closes (`shutdown(SHUT_WR)`) gets a half-close
//! towards the guest (OP_SHUTDOWN with SEND only) and can still read the
//! guest's reply; a peer that closes outright shuts both directions, as in
//! Firecracker.

mod conn;
mod muxer;
mod packet;
mod sys;
#[cfg(test)]
mod testutil;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use log::{error, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::gate::MemoryGate;
use super::worker::{stop_pair, WorkerThread};
use super::{
    ActiveQueue, DeviceError, GuestMemory, IrqLine, QueuePosition, VirtioDevice,
    VIRTIO_MMIO_INT_VRING,
};
use crate::jail::ThreadKind;
use muxer::{Muxer, TOKEN_RXQ, TOKEN_STOP, TOKEN_TXQ};

const DEVICE: &str = "vsock";
/// rx, tx, event.
const QUEUE_SIZES: [u16; 3] = [256; 3];
/// sockaddr_un holds 107 path bytes; `_<port>` adds up to 11.
const MAX_UDS_PATH_LEN: usize = 107 - 11;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock: guest CID {0} is invalid: it must be between 3 and 4294967294")]
    InvalidCid(u64),
    #[error(
        "vsock: socket path {} is too long: at most {MAX_UDS_PATH_LEN} bytes, so that `<path>_<port>` fits a Unix socket address",
        .0.display()
    )]
    PathTooLong(PathBuf),
    #[error("vsock: socket path {} already exists", .0.display())]
    PathExists(PathBuf),
    #[error("vsock: cannot listen on {}: {source}", path.display())]
    Bind { path: PathBuf, source: io::Error },
}

/// The virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    /// Bound at construction so errors surface early; the worker owns it
    /// while the device is active and closes it on reset.
    listener: Option<UnixListener>,
    acked_features: u64,
    worker: Option<WorkerHandle>,
    gate: MemoryGate,
}

struct WorkerHandle {
    /// The worker hands itself back when it stops, so `pause` can read the
    /// queue positions.
    thread: WorkerThread<Worker>,
    /// Open connections, published by the worker after every wakeup.
    connections: Arc<AtomicUsize>,
}

impl Vsock {
    /// Creates the device for a guest with context id `guest_cid` and starts
    /// listening for host clients on `uds_path`, which must not exist yet.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Vsock, VsockError> {
        // 0-2 are reserved, u32::MAX is VMADDR_CID_ANY and Linux keeps
        // CIDs in 32 bits.
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        if uds_path.as_os_str().len() > MAX_UDS_PATH_LEN {
            return Err(VsockError::PathTooLong(uds_path));
        }
        if uds_path.symlink_metadata().is_ok() {
            return Err(VsockError::PathExists(uds_path));
        }
        let listener = bind(&uds_path)?;
        Ok(Vsock {
            guest_cid,
            uds_path,
            listener: Some(listener),
            acked_features: 0,
            worker: None,
            gate: MemoryGate::default(),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Where host clients connect (and, with `_<port>` appended, where guest
    /// connections are relayed to).
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    fn stop_worker(&mut self) -> Option<Worker> {
        self.worker.take()?.thread.stop(DEVICE)
    }
}

fn bind(path: &Path) -> Result<UnixListener, VsockError> {
    UnixListener::bind(path).map_err(|source| {
        if source.kind() == io::ErrorKind::AddrInUse {
            VsockError::PathExists(path.to_path_buf())
        } else {
            VsockError::Bind {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let config = self.guest_cid.to_le_bytes();
        super::read_config_space(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn!(
            "vsock: ignoring write of {} bytes to read-only config space at {offset:#x}",
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
        let [rxq, txq, evq]: [ActiveQueue; 3] =
            super::activation_queues(DEVICE, self.worker.is_some(), queues)?;
        let listener = match self.listener.take() {
            Some(l) => l,
            // A reset closed it; the socket file is still ours.
            None => {
                if std::fs::symlink_metadata(&self.uds_path)
                    .is_ok_and(|m| m.file_type().is_socket())
                {
                    let _ = std::fs::remove_file(&self.uds_path);
                }
                bind(&self.uds_path).map_err(|e| DeviceError::Activate {
                    device: DEVICE,
                    cause: e.to_string(),
                })?
            }
        };
        let io_err = |source| DeviceError::Io {
            device: DEVICE,
            source,
        };
        let muxer = Muxer::new(self.guest_cid, self.uds_path.clone(), listener).map_err(io_err)?;
        let (stop, worker_stop) = stop_pair().map_err(io_err)?;
        for (fd, token) in [
            (worker_stop.as_raw_fd(), TOKEN_STOP),
            (rxq.notify.as_raw_fd(), TOKEN_RXQ),
            (txq.notify.as_raw_fd(), TOKEN_TXQ),
        ] {
            muxer
                .epoll()
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(io_err)?;
        }
        let connections = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            mem,
            irq,
            rxq,
            txq,
            evq,
            _stop: worker_stop,
            gate: self.gate.clone(),
            muxer,
            connections: connections.clone(),
        };
        let thread = WorkerThread::spawn(DEVICE, ThreadKind::Vsock, stop, move || worker.run())
            .map_err(io_err)?;
        self.worker = Some(WorkerHandle {
            thread,
            connections,
        });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // Dropping the worker's muxer closes the listener and every
        // connection; guest sockets die with the driver anyway.
        self.stop_worker();
        self.acked_features = 0;
        true
    }

    fn active_connections(&self) -> usize {
        self.worker
            .as_ref()
            .map_or(0, |w| w.connections.load(Ordering::SeqCst))
    }

    fn pause(&mut self) -> Result<Vec<QueuePosition>, DeviceError> {
        let worker = self.stop_worker().ok_or_else(|| DeviceError::NotQuiet {
            device: DEVICE,
            cause: "the device is not active".into(),
        })?;
        // A clone gets a new host socket and no host connections: anything
        // open or queued for the guest now would be half a conversation.
        let open = worker.muxer.connection_count();
        if open > 0 || worker.muxer.has_rx_work() {
            return Err(DeviceError::NotQuiet {
                device: DEVICE,
                cause: format!(
                    "{open} connections open, packets pending: {}",
                    worker.muxer.has_rx_work()
                ),
            });
        }
        Ok(vec![
            QueuePosition::of(&worker.rxq.queue),
            QueuePosition::of(&worker.txq.queue),
            QueuePosition::of(&worker.evq.queue),
        ])
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop_worker();
        self.listener = None;
        // Only the listener's socket: `<uds_path>_<port>` belong to the
        // host services that bound them.
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            if e.kind() != io::ErrorKind::NotFound {
                warn!("vsock: cannot remove {}: {e}", self.uds_path.display());
            }
        }
    }
}

/// Everything the worker thread owns.
struct Worker {
    mem: GuestMemory,
    irq: Arc<IrqLine>,
    rxq: ActiveQueue,
    txq: ActiveQueue,
    /// Unused: templates are saved with no connections, so a clone has no
    /// transport reset to announce.
    evq: ActiveQueue,
    /// Keeps the registered stop eventfd open for as long as it is watched.
    _stop: EventFd,
    gate: MemoryGate,
    muxer: Muxer,
    connections: Arc<AtomicUsize>,
}

impl Worker {
    fn run(mut self) -> Worker {
        let mut events = vec![EpollEvent::default(); 64];
        let gate = self.gate.clone();
        loop {
            let timeout_ms = match self.muxer.next_deadline() {
                None => -1,
                Some(deadline) => {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    // Round up so we do not wake just before the deadline.
                    i32::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
                }
            };
            let n = match self.muxer.epoll().wait(timeout_ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("vsock: epoll_wait failed, device stops: {e}");
                    return self;
                }
            };
            let _serving = gate.hold();
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => return self,
                    // Draining the counter is all a notification needs: both
                    // queues are looked at on every wakeup below.
                    TOKEN_RXQ => {
                        let _ = self.rxq.notify.read();
                    }
                    TOKEN_TXQ => {
                        let _ = self.txq.notify.read();
                    }
                    // event_set() unwraps; unknown bits are no reason to die.
                    token => self
                        .muxer
                        .handle_event(token, EventSet::from_bits_truncate(ev.events())),
                }
            }
            self.muxer.process_timeouts(Instant::now());
            self.pump();
            self.connections
                .store(self.muxer.connection_count(), Ordering::SeqCst);
        }
    }

    fn pump(&mut self) {
        let mut tx_used = false;
        let mut rx_used = false;
        loop {
            tx_used |= self.muxer.process_tx(&self.mem, &mut self.txq.queue);
            rx_used |= self.muxer.process_rx(&self.mem, &mut self.rxq.queue);
            // Replies freed room: read more of the tx queue.
            if !self.muxer.tx_stalled() || self.muxer.rx_backlogged() {
                break;
            }
        }
        if tx_used {
            self.signal(true);
        }
        if rx_used {
            self.signal(false);
        }
    }

    fn signal(&mut self, tx: bool) {
        let queue: &mut Queue = if tx {
            &mut self.txq.queue
        } else {
            &mut self.rxq.queue
        };
        let needed = queue.needs_notification(&self.mem).unwrap_or_else(|e| {
            warn!("vsock: cannot read the guest's notification settings: {e}");
            true
        });
        if needed {
            if let Err(e) = self.irq.trigger(VIRTIO_MMIO_INT_VRING) {
                warn!("vsock: cannot raise the interrupt: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::packet::*;
    use super::testutil::{ghdr, Guest, Ring, GUEST_CID};
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    const EVENT_QUEUE_BASE: u64 = 0x2_0000;

    /// The device activated on a test guest; `kick_*` are the guest's
    /// QueueNotify writes.
    struct Active {
        dev: Vsock,
        g: Guest,
        irq: Arc<IrqLine>,
        kick_rx: EventFd,
        kick_tx: EventFd,
    }

    fn activate(dev: Vsock) -> Active {
        let mut dev = dev;
        let mut g = Guest::new();
        let (_, evq) = Ring::new(&g.mem, EVENT_QUEUE_BASE);
        let notify = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let queues = vec![
            ActiveQueue {
                queue: g.rxq.take().unwrap(),
                notify: notify(),
            },
            ActiveQueue {
                queue: g.txq.take().unwrap(),
                notify: notify(),
            },
            ActiveQueue {
                queue: evq,
                notify: notify(),
            },
        ];
        let kick_rx = queues[0].notify.try_clone().unwrap();
        let kick_tx = queues[1].notify.try_clone().unwrap();
        let irq = Arc::new(IrqLine::new(5).unwrap());
        dev.activate(g.mem.clone(), irq.clone(), queues).unwrap();
        Active {
            dev,
            g,
            irq,
            kick_rx,
            kick_tx,
        }
    }

    impl Active {
        fn post_rx(&mut self, n: usize) {
            self.g.post_rx(n);
            self.kick_rx.write(1).unwrap();
        }

        fn send(&mut self, hdr: Header, data: &[u8]) {
            self.g.send(hdr, data);
            self.kick_tx.write(1).unwrap();
        }

        fn next(&mut self) -> (Header, Vec<u8>) {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                self.g.collect();
                if let Some(p) = self.g.received.pop_front() {
                    return p;
                }
                assert!(
                    Instant::now() < deadline,
                    "no packet reached the guest within 5 s"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    fn host_connect(path: &Path, port: u32) -> UnixStream {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        s
    }

    #[test]
    fn identifies_as_vsock_with_three_queues_and_version_1() {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = Vsock::new(3, dir.path().join("v.sock")).unwrap();
        assert_eq!(dev.device_type(), 19);
        assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
        assert_eq!(dev.avail_features(), 1 << 32);
        dev.set_acked_features(u64::MAX);
        assert_eq!(dev.acked_features, 1 << 32);
        assert_eq!(dev.uds_path(), dir.path().join("v.sock"));
    }

    #[test]
    fn config_space_is_the_guest_cid_little_endian() {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = Vsock::new(0x1234_5678, dir.path().join("v.sock")).unwrap();
        let mut full = [0xffu8; 8];
        dev.read_config(0, &mut full);
        assert_eq!(full, 0x1234_5678u64.to_le_bytes());
        let mut tail = [0xffu8; 4];
        dev.read_config(6, &mut tail);
        assert_eq!(tail, [0, 0, 0, 0]);
        dev.read_config(u64::MAX, &mut tail);
        assert_eq!(tail, [0, 0, 0, 0]);
        dev.write_config(0, &[9; 8]);
        dev.read_config(0, &mut full);
        assert_eq!(full, 0x1234_5678u64.to_le_bytes());
    }

    #[test]
    fn construction_errors_name_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taken");
        std::fs::write(&path, b"").unwrap();
        let e = Vsock::new(3, path.clone()).err().unwrap();
        assert!(matches!(e, VsockError::PathExists(_)));
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert!(path.exists(), "somebody else's file was touched");

        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            let e = Vsock::new(cid, dir.path().join("x")).err().unwrap();
            assert!(matches!(e, VsockError::InvalidCid(c) if c == cid));
        }
        let long = dir.path().join("x".repeat(100));
        assert!(matches!(
            Vsock::new(3, long).err().unwrap(),
            VsockError::PathTooLong(_)
        ));
        let missing_dir = dir.path().join("no/such/dir/v.sock");
        let e = Vsock::new(3, missing_dir.clone()).err().unwrap();
        assert!(matches!(e, VsockError::Bind { .. }));
        assert!(
            e.to_string().contains(&missing_dir.display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn worker_thread_relays_host_and_guest_connections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let mut a = activate(Vsock::new(GUEST_CID, path.clone()).unwrap());
        let worker = a.dev.worker.as_ref().unwrap();
        assert_eq!(worker.thread.thread_name(), Some("vsock"));
        a.post_rx(16);

        // Host-initiated.
        let mut s = host_connect(&path, 52);
        let (h, _) = a.next();
        assert_eq!((h.op, h.dst_port), (OP_REQUEST, 52));
        assert_ne!(
            a.irq.status() & VIRTIO_MMIO_INT_VRING,
            0,
            "interrupt not raised"
        );
        let port = h.src_port;
        a.send(ghdr(OP_RESPONSE, 52, port), &[]);
        let ok = format!("OK {port}\n");
        let mut buf = vec![0u8; ok.len()];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(buf, ok.as_bytes());
        s.write_all(b"to guest").unwrap();
        let (h, data) = a.next();
        assert_eq!((h.op, data.as_slice()), (OP_RW, &b"to guest"[..]));
        a.send(ghdr(OP_RW, 52, port), b"to host");
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"to host");

        // Guest-initiated.
        let listener = UnixListener::bind(muxer::port_path(&path, 1024)).unwrap();
        a.send(ghdr(OP_REQUEST, 6000, 1024), &[]);
        let (h, _) = a.next();
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_RESPONSE, 1024, 6000));
        let (mut agent, _) = listener.accept().unwrap();
        a.send(ghdr(OP_RW, 6000, 1024), b"ready");
        let mut buf = [0u8; 5];
        agent.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ready");
        a.send(ghdr(OP_REQUEST, 6001, 1025), &[]);
        assert_eq!(a.next().0.op, OP_RST);

        // Reset stops the thread and closes every stream and the listener.
        assert!(a.dev.reset());
        assert!(a.dev.worker.is_none(), "worker not joined");
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
        agent
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(agent.read_to_end(&mut rest).unwrap(), 0);
        assert!(
            UnixStream::connect(&path).is_err(),
            "listener still open after reset"
        );

        // The driver may bring the device up again.
        let mut b = activate(a.dev);
        b.post_rx(4);
        let _s = host_connect(&path, 53);
        assert_eq!(b.next().0.op, OP_REQUEST);

        // Drop removes our socket and nothing else.
        drop(b);
        assert!(!path.exists());
        assert!(muxer::port_path(&path, 1024).exists());
    }

    #[test]
    fn activate_rejects_wrong_queue_count_and_double_activation() {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = Vsock::new(3, dir.path().join("v.sock")).unwrap();
        let g = Guest::new();
        let irq = Arc::new(IrqLine::new(5).unwrap());
        let e = dev.activate(g.mem.clone(), irq, Vec::new()).err().unwrap();
        assert!(e.to_string().contains("3 queues"), "{e}");
        let mut a = activate(dev);
        let g = Guest::new();
        let irq = Arc::new(IrqLine::new(5).unwrap());
        assert!(a.dev.activate(g.mem.clone(), irq, Vec::new()).is_err());
        // Still serving.
        a.post_rx(2);
        let _s = host_connect(a.dev.uds_path(), 1);
        assert_eq!(a.next().0.op, OP_REQUEST);
    }
}
