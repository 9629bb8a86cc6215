//! The vsock muxer: turns guest packets into Unix-socket I/O and Unix-socket
//! readiness into packets for the guest.
//!
//! It owns the epoll set (the worker thread adds the queue and stop eventfds
//! with the reserved tokens below), the host listener and every connection,
//! and it is driven synchronously: `handle_event` for readiness,
//! `process_tx`/`process_rx` for the queues, `process_timeouts` for
//! deadlines. Nothing here blocks and nothing here spawns, so the tests drive
//! it directly with mock queues.
//!
//! Packets for the guest are never built ahead of time: connections record
//! what they owe the guest (`pending` bits, readable data) and a connection
//! key waits in `rxq`; the packet is written only once the guest has posted a
//! receive buffer. Host data therefore stays in the Unix socket until the
//! guest can take it, which is the backpressure towards host writers.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::conn::{pending, ConnKey, ConnState, Connection, CONN_BUF_ALLOC};
use super::packet::*;
use super::sys::connect_nonblocking;
use crate::vmm::devices::guest_errors::{guest_warn, GuestErrors};
use crate::vmm::devices::GuestMemory;

/// Epoll tokens. Connection and handshake streams use tokens from
/// `FIRST_STREAM_TOKEN` up, never reused.
pub const TOKEN_STOP: u64 = 0;
pub const TOKEN_RXQ: u64 = 1;
pub const TOKEN_TXQ: u64 = 2;
pub const TOKEN_LISTENER: u64 = 3;
const FIRST_STREAM_TOKEN: u64 = 16;

/// Largest payload of one packet, either way (Linux uses at most 64 KiB).
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// Host-side ports of host-initiated connections start here, far above
/// anything a guest service listens on (same convention as Firecracker).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Where this device starts handing out host-side ports. Random, not fixed:
/// a clone resumes a guest that may still hold sockets of the template's
/// host connections (an agent thread that has not closed its fd yet), and a
/// new connection reusing such a (host port, guest port) pair would be
/// reset by the guest as belonging to the old one.
fn random_first_local_port() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let r = if n == 4 {
        u32::from_ne_bytes(b)
    } else {
        std::process::id()
    };
    FIRST_LOCAL_PORT + r % (u32::MAX - 1 - FIRST_LOCAL_PORT)
}
/// Open streams (connections plus host clients still sending CONNECT) the
/// guest or host may make us hold; each is a file descriptor.
const MAX_STREAMS: usize = 1024;
/// Resets queued for the guest beyond which we stop reading its tx queue
/// until it posts receive buffers, so a guest cannot grow our memory.
const MAX_CTRL_BACKLOG: usize = 256;
/// "CONNECT 4294967295" is 18 bytes; allow some slack for spaces and CR.
const CONNECT_LINE_MAX: usize = 32;
/// Send OP_CREDIT_UPDATE once the guest's view of our window lags this much.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the listener is left alone after accept fails for lack of
/// resources (EMFILE...), instead of spinning on a level-triggered event.
const LISTENER_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug)]
enum Slot {
    /// A host client that has not finished its `CONNECT <port>\n` line.
    Handshake {
        stream: UnixStream,
        line: Vec<u8>,
    },
    Conn(ConnKey),
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    listener_paused_until: Option<Instant>,
    epoll: Epoll,
    conns: HashMap<ConnKey, Connection>,
    slots: HashMap<u64, Slot>,
    next_token: u64,
    next_local_port: u32,
    /// Connections owing the guest a packet, served round-robin.
    rxq: VecDeque<ConnKey>,
    /// Resets for connections that no longer exist (or never did).
    ctrl_q: VecDeque<Header>,
    /// Set when tx processing stopped because `ctrl_q` was full.
    tx_stalled: bool,
    /// A guest packet's payload, gathered from its descriptors, on its way
    /// to the socket (a plain buffer, so the write can use MSG_NOSIGNAL).
    scratch: Vec<u8>,
    request_timeout: Duration,
    close_timeout: Duration,
    /// What the guest got wrong, rate-limited in the log.
    guest_errors: GuestErrors,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: PathBuf, listener: UnixListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        Ok(Muxer {
            guest_cid,
            uds_path,
            listener,
            listener_paused_until: None,
            epoll,
            conns: HashMap::new(),
            slots: HashMap::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_local_port: random_first_local_port(),
            rxq: VecDeque::new(),
            ctrl_q: VecDeque::new(),
            tx_stalled: false,
            scratch: Vec::new(),
            request_timeout: REQUEST_TIMEOUT,
            close_timeout: CLOSE_TIMEOUT,
            guest_errors: GuestErrors::default(),
        })
    }

    /// Guest mistakes counted so far (malformed packets and buffers,
    /// protocol violations).
    #[cfg(test)]
    pub fn guest_error_count(&self) -> u64 {
        self.guest_errors.count()
    }

    /// Open connections, in any state.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    /// There are packets waiting for guest receive buffers.
    pub fn has_rx_work(&self) -> bool {
        !self.ctrl_q.is_empty() || !self.rxq.is_empty()
    }

    /// `process_tx` left guest packets unread because too many replies are
    /// waiting for receive buffers.
    pub fn tx_stalled(&self) -> bool {
        self.tx_stalled
    }

    pub fn rx_backlogged(&self) -> bool {
        self.ctrl_q.len() >= MAX_CTRL_BACKLOG
    }

    /// The earliest moment `process_timeouts` has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns
            .values()
            .filter_map(|c| c.deadline)
            .chain(self.listener_paused_until)
            .min()
    }

    /// Readiness of the listener or of one of our streams.
    pub fn handle_event(&mut self, token: u64, events: EventSet) {
        if token == TOKEN_LISTENER {
            self.accept_host_clients();
            return;
        }
        match self.slots.get(&token) {
            Some(Slot::Handshake { .. }) => self.read_connect_line(token),
            Some(Slot::Conn(key)) => {
                let key = *key;
                self.conn_event(key, events);
            }
            None => debug!("vsock: event for closed stream (token {token})"),
        }
    }

    /// Resets connections whose handshake or close took too long.
    pub fn process_timeouts(&mut self, now: Instant) {
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            debug!("vsock: connection {key:?} timed out, resetting it");
            self.kill(key, true);
        }
        if self.listener_paused_until.is_some_and(|t| t <= now) {
            self.listener_paused_until = None;
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                self.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            ) {
                warn!("vsock: cannot watch {} again: {e}", self.uds_path.display());
            }
        }
    }

    /// Consumes the guest's tx queue. Returns whether buffers were used.
    pub fn process_tx(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        let mut used = false;
        self.tx_stalled = false;
        loop {
            if self.rx_backlogged() {
                self.tx_stalled = true;
                break;
            }
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match read_tx_chain(mem, &mut chain, &mut self.scratch, MAX_PKT_DATA as usize) {
                Ok(hdr) => self.guest_packet(&hdr),
                Err(e) => guest_warn!(
                    self.guest_errors,
                    "vsock: dropping malformed packet from the guest: {e}"
                ),
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                guest_warn!(
                    self.guest_errors,
                    "vsock: cannot return tx buffer {head} to the guest: {e}"
                );
            }
            used = true;
        }
        used
    }

    /// Fills the guest's receive buffers with whatever is owed to it.
    /// Returns whether buffers were used.
    pub fn process_rx(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        let mut used = false;
        while self.has_rx_work() {
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) if pkt.data_slice().is_some_and(|d| !d.is_empty()) => {
                    match self.fill_rx(&mut pkt) {
                        Some(len) => len,
                        None => {
                            // Only stale entries: keep the buffer for later.
                            queue.go_to_previous_position();
                            break;
                        }
                    }
                }
                Ok(_) => {
                    guest_warn!(self.guest_errors, "vsock: guest receive buffer {head} has no room for data, returning it unused");
                    0
                }
                Err(e) => {
                    guest_warn!(
                        self.guest_errors,
                        "vsock: guest receive buffer {head} is malformed, returning it unused: {e}"
                    );
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                guest_warn!(
                    self.guest_errors,
                    "vsock: cannot return rx buffer {head} to the guest: {e}"
                );
            }
            used = true;
        }
        used
    }

    // ---- guest -> host ----------------------------------------------------

    /// A packet from the guest; its payload is `scratch[..hdr.len]`.
    fn guest_packet(&mut self, hdr: &Header) {
        if hdr.src_cid != self.guest_cid {
            guest_warn!(
                self.guest_errors,
                "vsock: dropping packet with source CID {} (the guest's CID is {})",
                hdr.src_cid,
                self.guest_cid
            );
            return;
        }
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            guest_warn!(
                self.guest_errors,
                "vsock: refusing packet to CID {} of socket type {}: only stream sockets to the host (CID {HOST_CID}) are served",
                hdr.dst_cid, hdr.type_
            );
            if hdr.op != OP_RST {
                self.ctrl_q.push_back(hdr.rst_reply());
            }
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                OP_REQUEST => self.guest_connect(key, hdr),
                OP_RST => {}
                OP_RESPONSE | OP_RW | OP_SHUTDOWN | OP_CREDIT_UPDATE | OP_CREDIT_REQUEST => {
                    debug!(
                        "vsock: op {} for unknown connection {key:?}, resetting",
                        hdr.op
                    );
                    self.ctrl_q.push_back(hdr.rst_reply());
                }
                op => guest_warn!(
                    self.guest_errors,
                    "vsock: dropping packet with unknown op {op}"
                ),
            }
            return;
        };
        conn.update_peer_credit(hdr);
        match hdr.op {
            OP_RW if hdr.len > 0 => self.guest_data(key, hdr.len as usize),
            OP_RW => {}
            OP_RESPONSE => self.guest_response(key),
            OP_SHUTDOWN => match conn.state {
                ConnState::Established => conn.guest_shut |= hdr.flags & SHUTDOWN_BOTH,
                // The guest's answer to our shutdown: finish with a reset.
                ConnState::Closing => self.kill(key, true),
                ConnState::LocalInit => {
                    guest_warn!(
                        self.guest_errors,
                        "vsock: shutdown before the guest accepted connection {key:?}"
                    );
                    self.kill(key, true);
                }
            },
            OP_RST => self.kill(key, false),
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => conn.pending |= pending::CREDIT_UPDATE,
            OP_REQUEST => {
                guest_warn!(
                    self.guest_errors,
                    "vsock: guest requested connection {key:?} that is already open, resetting it"
                );
                self.kill(key, true);
            }
            op => guest_warn!(
                self.guest_errors,
                "vsock: dropping packet with unknown op {op} on {key:?}"
            ),
        }
        self.refresh(key);
    }

    /// Guest payload `scratch[..len]` for the Unix peer of `key`.
    fn guest_data(&mut self, key: ConnKey, len: usize) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        match conn.state {
            ConnState::Established => {}
            // We are tearing the connection down; late data has nowhere to go.
            ConnState::Closing => return,
            ConnState::LocalInit => {
                guest_warn!(
                    self.guest_errors,
                    "vsock: data on connection {key:?} before the guest accepted it"
                );
                self.kill(key, true);
                return;
            }
        }
        if conn.guest_shut & SHUTDOWN_SEND != 0 {
            guest_warn!(
                self.guest_errors,
                "vsock: data on connection {key:?} after the guest shut it down"
            );
            self.kill(key, true);
            return;
        }
        if conn.tx_buffered() + len > CONN_BUF_ALLOC as usize {
            guest_warn!(
                self.guest_errors,
                "vsock: guest overran its credit on connection {key:?}, resetting it"
            );
            self.kill(key, true);
            return;
        }
        // read_tx_chain bounds the payload by MAX_PKT_DATA and grows the
        // scratch buffer to hold it.
        if let Err(e) = conn.write_to_unix(&self.scratch[..len], true) {
            debug!("vsock: writing to the host side of {key:?} failed: {e}");
            self.kill(key, true);
        }
    }

    fn guest_response(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.state != ConnState::LocalInit {
            guest_warn!(
                self.guest_errors,
                "vsock: unexpected response on connection {key:?}, resetting it"
            );
            self.kill(key, true);
            return;
        }
        conn.state = ConnState::Established;
        conn.deadline = None;
        let line = format!("OK {}\n", key.local_port);
        if let Err(e) = conn.write_to_unix(line.as_bytes(), false) {
            debug!("vsock: host client of {key:?} left before the guest answered: {e}");
            self.kill(key, true);
        }
    }

    /// A guest process connects to host port `key.local_port`: dial
    /// `<uds_path>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, hdr: &Header) {
        if self.slots.len() >= MAX_STREAMS {
            warn!(
                "vsock: too many connections, refusing guest connection to port {}",
                key.local_port
            );
            self.ctrl_q.push_back(hdr.rst_reply());
            return;
        }
        let path = self.port_path(key.local_port);
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                debug!("vsock: guest connection to {} refused: {e}", path.display());
                self.ctrl_q.push_back(hdr.rst_reply());
                return;
            }
        };
        let token = self.alloc_token();
        let mut conn = Connection::new(stream, token, ConnState::Established);
        conn.update_peer_credit(hdr);
        conn.pending |= pending::RESPONSE;
        self.slots.insert(token, Slot::Conn(key));
        self.conns.insert(key, conn);
        self.refresh(key);
    }

    // ---- host -> guest ----------------------------------------------------

    fn accept_host_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.slots.len() >= MAX_STREAMS {
                        warn!(
                            "vsock: too many connections, refusing host client on {}",
                            self.uds_path.display()
                        );
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        warn!("vsock: dropping host client: {e}");
                        continue;
                    }
                    let token = self.alloc_token();
                    if let Err(e) = self.epoll.ctl(
                        ControlOperation::Add,
                        stream.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, token),
                    ) {
                        warn!("vsock: dropping host client: {e}");
                        continue;
                    }
                    self.slots.insert(
                        token,
                        Slot::Handshake {
                            stream,
                            line: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.raw_os_error() == Some(libc::ECONNABORTED) => {}
                Err(e) => {
                    warn!(
                        "vsock: accept on {} failed: {e}; retrying shortly",
                        self.uds_path.display()
                    );
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        self.listener.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    self.listener_paused_until = Some(Instant::now() + LISTENER_BACKOFF);
                    break;
                }
            }
        }
    }

    fn read_connect_line(&mut self, token: u64) {
        let Some(Slot::Handshake { stream, line }) = self.slots.get_mut(&token) else {
            return;
        };
        // One byte at a time: whatever follows the newline is payload for
        // the guest and must stay in the socket.
        let outcome: Result<bool, String> = loop {
            let mut b = [0u8; 1];
            match stream.read(&mut b) {
                Ok(0) => break Err("closed before sending a CONNECT line".into()),
                Ok(_) if b[0] == b'\n' => break Ok(true),
                Ok(_) => {
                    line.push(b[0]);
                    if line.len() > CONNECT_LINE_MAX {
                        break Err("CONNECT line too long".into());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e.to_string()),
            }
        };
        match outcome {
            Ok(false) => {}
            Ok(true) => match parse_connect_line(line) {
                Some(port) => self.host_connect(token, port),
                None => {
                    warn!(
                        "vsock: malformed request {:?} on {}, expected \"CONNECT <port>\"",
                        String::from_utf8_lossy(line),
                        self.uds_path.display()
                    );
                    self.drop_handshake(token);
                }
            },
            Err(why) => {
                debug!("vsock: host client on {}: {why}", self.uds_path.display());
                self.drop_handshake(token);
            }
        }
    }

    fn drop_handshake(&mut self, token: u64) {
        if let Some(Slot::Handshake { stream, .. }) = self.slots.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// A host client asked for guest port `peer_port`: offer the connection
    /// to the guest.
    fn host_connect(&mut self, token: u64, peer_port: u32) {
        let Some(Slot::Handshake { stream, .. }) = self.slots.remove(&token) else {
            return;
        };
        let key = ConnKey {
            local_port: self.alloc_local_port(),
            peer_port,
        };
        let mut conn = Connection::new(stream, token, ConnState::LocalInit);
        conn.pending = pending::REQUEST;
        conn.deadline = Some(Instant::now() + self.request_timeout);
        // Still registered from the handshake; refresh() narrows it.
        conn.registered = Some(EventSet::IN);
        self.slots.insert(token, Slot::Conn(key));
        self.conns.insert(key, conn);
        self.refresh(key);
    }

    fn conn_event(&mut self, key: ConnKey, events: EventSet) {
        let close_timeout = self.close_timeout;
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events.contains(EventSet::ERROR) {
            debug!("vsock: error on the host side of {key:?}");
            self.kill(key, true);
            return;
        }
        if events.contains(EventSet::OUT) {
            if let Err(e) = conn.flush() {
                debug!("vsock: writing to the host side of {key:?} failed: {e}");
                self.kill(key, true);
                return;
            }
        }
        if events.contains(EventSet::IN) {
            conn.readable = true;
        }
        if events.contains(EventSet::HANG_UP) && !conn.unix_hup {
            conn.unix_hup = true;
            match conn.state {
                ConnState::LocalInit => {
                    // Reset the guest only if it has seen the request.
                    let request_sent = conn.pending & pending::REQUEST == 0;
                    self.kill(key, request_sent);
                    return;
                }
                ConnState::Closing => {}
                ConnState::Established => {
                    if conn.wants_read() {
                        // Drain what the peer left; end of file then sends
                        // the final shutdown.
                        conn.readable = true;
                    } else {
                        start_close(conn, close_timeout);
                    }
                }
            }
        }
        self.refresh(key);
    }

    /// Writes the next packet owed to the guest into `pkt`; returns the
    /// used length, or None when nothing was owed after all.
    fn fill_rx<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> Option<u32> {
        if let Some(hdr) = self.ctrl_q.pop_front() {
            return Some(write_header(pkt, &hdr));
        }
        for _ in 0..self.rxq.len() {
            let Some(key) = self.rxq.pop_front() else {
                break;
            };
            let produced = match self.conns.get_mut(&key) {
                Some(conn) => {
                    conn.in_rxq = false;
                    self.conn_rx(key, pkt)
                }
                None => None,
            };
            // Back in the queue (at the tail) if it still owes something.
            self.refresh(key);
            if produced.is_some() {
                return produced;
            }
        }
        // A failed read may have turned into a reset.
        self.ctrl_q.pop_front().map(|hdr| write_header(pkt, &hdr))
    }

    fn conn_rx<B: BitmapSlice>(
        &mut self,
        key: ConnKey,
        pkt: &mut VsockPacket<'_, B>,
    ) -> Option<u32> {
        let guest_cid = self.guest_cid;
        let close_timeout = self.close_timeout;
        let conn = self.conns.get_mut(&key)?;
        let mut hdr = None;
        if conn.pending & pending::REQUEST != 0 {
            conn.pending &= !pending::REQUEST;
            hdr = Some(conn.header(key, guest_cid, OP_REQUEST));
        } else if conn.pending & pending::RESPONSE != 0 {
            conn.pending &= !pending::RESPONSE;
            hdr = Some(conn.header(key, guest_cid, OP_RESPONSE));
        } else if conn.has_data() {
            let data = pkt.data_slice()?;
            let max = data
                .len()
                .min(conn.peer_credit() as usize)
                .min(MAX_PKT_DATA as usize);
            let mut dst = data.subslice(0, max).ok()?;
            match conn.stream.read_volatile(&mut dst) {
                Ok(0) => {
                    conn.host_eof = true;
                    let mut flags = SHUTDOWN_SEND;
                    if conn.unix_hup {
                        flags |= SHUTDOWN_RCV;
                        conn.state = ConnState::Closing;
                        conn.deadline = Some(Instant::now() + close_timeout);
                    }
                    conn.host_shut |= flags;
                    let mut h = conn.header(key, guest_cid, OP_SHUTDOWN);
                    h.flags = flags;
                    hdr = Some(h);
                }
                Ok(n) => {
                    conn.rx_cnt = conn.rx_cnt.wrapping_add(n as u32);
                    let mut h = conn.header(key, guest_cid, OP_RW);
                    h.len = n as u32;
                    hdr = Some(h);
                }
                Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.readable = false;
                }
                Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("vsock: reading the host side of {key:?} failed: {e}");
                    self.kill(key, true);
                    return None;
                }
            }
        }
        if hdr.is_none() {
            if conn.pending & pending::SHUTDOWN != 0 {
                conn.pending &= !pending::SHUTDOWN;
                conn.host_shut |= conn.pending_shutdown;
                let mut h = conn.header(key, guest_cid, OP_SHUTDOWN);
                h.flags = conn.pending_shutdown;
                hdr = Some(h);
            } else if conn.pending & pending::CREDIT_UPDATE != 0 {
                hdr = Some(conn.header(key, guest_cid, OP_CREDIT_UPDATE));
            } else if conn.pending & pending::CREDIT_REQUEST != 0 {
                conn.pending &= !pending::CREDIT_REQUEST;
                hdr = Some(conn.header(key, guest_cid, OP_CREDIT_REQUEST));
            }
        }
        let hdr = hdr?;
        // Every packet tells the guest our window.
        conn.last_fwd_cnt_sent = hdr.fwd_cnt;
        conn.pending &= !pending::CREDIT_UPDATE;
        Some(write_header(pkt, &hdr))
    }

    // ---- bookkeeping ------------------------------------------------------

    /// Re-derives everything that follows from a connection's state: whether
    /// it is finished, which control packets it owes, its place in the rx
    /// queue and its epoll interest. Called after every change.
    fn refresh(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.state != ConnState::LocalInit && conn.tx_buf.is_empty() {
            if conn.guest_shut & SHUTDOWN_SEND != 0 && !conn.unix_shut_write {
                conn.unix_shut_write = true;
                // Fails only if the peer is already gone, which the next
                // read or hang-up reports anyway.
                let _ = conn.stream.shutdown(Shutdown::Write);
            }
            let host_done = conn.host_shut & SHUTDOWN_SEND != 0;
            if conn.guest_shut == SHUTDOWN_BOTH || (conn.guest_stream_done() && host_done) {
                // Both directions are finished and flushed.
                self.kill(key, true);
                return;
            }
        }
        if conn.wants_read() && conn.readable && conn.peer_credit() == 0 && !conn.credit_requested {
            conn.credit_requested = true;
            conn.pending |= pending::CREDIT_REQUEST;
        }
        if conn.state == ConnState::Established
            && conn.fwd_cnt.wrapping_sub(conn.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
        {
            conn.pending |= pending::CREDIT_UPDATE;
        }
        if conn.has_rx() && !conn.in_rxq {
            conn.in_rxq = true;
            self.rxq.push_back(key);
        }

        let desired = conn.desired_events();
        // With nothing to wait for, stay registered only to learn about a
        // hang-up; once that is known, the (level-triggered) hang-up would
        // fire forever, so leave the epoll set.
        let keep = !desired.is_empty() || !conn.unix_hup;
        let fd = conn.stream.as_raw_fd();
        let res = match (conn.registered, keep) {
            (None, true) => self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(desired, conn.token),
            ),
            (Some(cur), true) if cur != desired => self.epoll.ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(desired, conn.token),
            ),
            (Some(_), false) => self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default()),
            _ => Ok(()),
        };
        match res {
            Ok(()) => conn.registered = keep.then_some(desired),
            Err(e) => {
                warn!("vsock: cannot watch the host side of {key:?}: {e}");
                self.kill(key, true);
            }
        }
    }

    /// Forgets a connection, closing its Unix stream; optionally tells the
    /// guest with OP_RST.
    fn kill(&mut self, key: ConnKey, rst: bool) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        if conn.registered.is_some() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.slots.remove(&conn.token);
        if rst {
            self.ctrl_q
                .push_back(conn.header(key, self.guest_cid, OP_RST));
        }
    }

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            // u32::MAX is VMADDR_PORT_ANY; wrap before it.
            self.next_local_port = if p >= u32::MAX - 1 {
                FIRST_LOCAL_PORT
            } else {
                p + 1
            };
            // At most MAX_STREAMS ports are taken, so this ends quickly.
            if !self.conns.keys().any(|k| k.local_port == p) {
                return p;
            }
        }
    }

    fn port_path(&self, port: u32) -> PathBuf {
        port_path(&self.uds_path, port)
    }
}

/// `<uds_path>_<port>`, where guest-initiated connections to `port` go.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = OsString::from(uds_path.as_os_str());
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Sends the final shutdown and waits (bounded) for the guest's reset.
fn start_close(conn: &mut Connection, timeout: Duration) {
    conn.pending |= pending::SHUTDOWN;
    conn.pending_shutdown = SHUTDOWN_BOTH;
    conn.state = ConnState::Closing;
    conn.deadline = Some(Instant::now() + timeout);
}

fn write_header<B: BitmapSlice>(pkt: &mut VsockPacket<'_, B>, hdr: &Header) -> u32 {
    match pkt.set_header_from_raw(&hdr.to_bytes()) {
        Ok(()) => HEADER_SIZE as u32 + hdr.len,
        Err(e) => {
            warn!("vsock: cannot write packet header to guest memory: {e}");
            0
        }
    }
}

/// Parses `CONNECT <port>` (the newline already stripped). The keyword is
/// matched without regard to case, like Firecracker does.
fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let mut words = s.split_ascii_whitespace();
    if !words.next()?.eq_ignore_ascii_case("CONNECT") {
        return None;
    }
    let port = words.next()?.parse::<u32>().ok()?;
    words.next().is_none().then_some(port)
}

#[cfg(test)]
impl Muxer {
    fn open_streams(&self) -> usize {
        self.slots.len()
    }

    fn conn(&self, local_port: u32, peer_port: u32) -> Option<&Connection> {
        self.conns.get(&ConnKey {
            local_port,
            peer_port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::devices::vsock::testutil::{ghdr, Guest, GUEST_CID};
    use std::io::Write;
    use vm_memory::Bytes;

    const GUEST_PORT: u32 = 5000;

    struct T {
        g: Guest,
        mux: Muxer,
        rxq: Queue,
        txq: Queue,
        uds: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl T {
        fn new() -> T {
            let dir = tempfile::tempdir().unwrap();
            let uds = dir.path().join("v.sock");
            let listener = UnixListener::bind(&uds).unwrap();
            let mux = Muxer::new(GUEST_CID, uds.clone(), listener).unwrap();
            let mut g = Guest::new();
            let rxq = g.rxq.take().unwrap();
            let txq = g.txq.take().unwrap();
            T {
                g,
                mux,
                rxq,
                txq,
                uds,
                _dir: dir,
            }
        }

        /// One round of the worker loop, waiting up to `ms` for readiness.
        fn pump(&mut self, ms: i32) {
            let mut events = [EpollEvent::default(); 32];
            let n = self.mux.epoll().wait(ms, &mut events).unwrap();
            for ev in &events[..n] {
                self.mux.handle_event(ev.data(), ev.event_set());
            }
            self.mux.process_timeouts(Instant::now());
            loop {
                self.mux.process_tx(&self.g.mem, &mut self.txq);
                self.mux.process_rx(&self.g.mem, &mut self.rxq);
                if !self.mux.tx_stalled() || self.mux.rx_backlogged() {
                    break;
                }
            }
            self.g.collect();
        }

        /// The next packet delivered to the guest.
        fn next(&mut self) -> (Header, Vec<u8>) {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Some(p) = self.g.received.pop_front() {
                    return p;
                }
                assert!(
                    Instant::now() < deadline,
                    "no packet reached the guest within 5 s"
                );
                self.pump(20);
            }
        }

        fn assert_quiet(&mut self) {
            for _ in 0..5 {
                self.pump(10);
            }
            assert!(
                self.g.received.is_empty(),
                "unexpected packets: {:?}",
                self.g.received
            );
        }

        fn send(&mut self, hdr: Header, data: &[u8]) {
            self.g.send(hdr, data);
            self.pump(0);
        }

        /// A host client asks for `GUEST_PORT`; returns it and the host port
        /// the device picked, after checking the request the guest sees.
        fn host_connect(&mut self) -> (UnixStream, u32) {
            let mut s = UnixStream::connect(&self.uds).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
                .unwrap();
            let (h, _) = self.next();
            assert_eq!(h.op, OP_REQUEST);
            assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, GUEST_CID));
            assert_eq!(h.dst_port, GUEST_PORT);
            assert!(
                h.src_port >= FIRST_LOCAL_PORT,
                "host port {} below 1<<30",
                h.src_port
            );
            assert_eq!(h.type_, TYPE_STREAM);
            assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
            (s, h.src_port)
        }

        /// Host-initiated connection accepted by the guest.
        fn host_established(&mut self) -> (UnixStream, u32) {
            self.g.post_rx(8);
            let (mut s, port) = self.host_connect();
            self.send(ghdr(OP_RESPONSE, GUEST_PORT, port), &[]);
            let ok = format!("OK {port}\n");
            assert_eq!(read_n(&mut s, ok.len()), ok.as_bytes());
            (s, port)
        }

        /// Guest-initiated connection to `host_port`, accepted by a host
        /// listener on `<uds>_<host_port>`.
        fn guest_established(&mut self, host_port: u32, mut req: Header) -> UnixStream {
            let listener = UnixListener::bind(port_path(&self.uds, host_port)).unwrap();
            self.g.post_rx(8);
            req.op = OP_REQUEST;
            req.dst_port = host_port;
            self.send(req, &[]);
            let (h, _) = self.next();
            assert_eq!(h.op, OP_RESPONSE);
            assert_eq!((h.src_port, h.dst_port), (host_port, req.src_port));
            let (s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        }
    }

    fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).unwrap();
        buf
    }

    fn read_to_eof(s: &mut UnixStream) -> Vec<u8> {
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        buf
    }

    #[test]
    fn host_connect_relays_both_ways_then_host_close_shuts_down_and_cleans_up() {
        let mut t = T::new();
        let (mut s, port) = t.host_established();

        s.write_all(b"hello guest").unwrap();
        let (h, data) = t.next();
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, port, GUEST_PORT));
        assert_eq!(data, b"hello guest");

        t.send(ghdr(OP_RW, GUEST_PORT, port), b"hello host");
        assert_eq!(read_n(&mut s, 10), b"hello host");

        drop(s);
        let (h, _) = t.next();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_BOTH));
        assert_eq!(t.mux.open_streams(), 1, "waiting for the guest's reset");
        t.send(ghdr(OP_RST, GUEST_PORT, port), &[]);
        assert_eq!(t.mux.open_streams(), 0);
        t.assert_quiet();
    }

    #[test]
    fn host_data_sent_right_after_connect_line_is_kept_for_the_guest() {
        let mut t = T::new();
        t.g.post_rx(8);
        let mut s = UnixStream::connect(&t.uds).unwrap();
        s.write_all(format!("connect {GUEST_PORT}\r\nearly").as_bytes())
            .unwrap();
        let (h, _) = t.next();
        assert_eq!(h.op, OP_REQUEST);
        t.send(ghdr(OP_RESPONSE, GUEST_PORT, h.src_port), &[]);
        let (h, data) = t.next();
        assert_eq!((h.op, data.as_slice()), (OP_RW, &b"early"[..]));
    }

    #[test]
    fn guest_reset_of_host_request_closes_host_stream() {
        let mut t = T::new();
        t.g.post_rx(4);
        let (mut s, port) = t.host_connect();
        t.send(ghdr(OP_RST, GUEST_PORT, port), &[]);
        assert!(read_to_eof(&mut s).is_empty());
        assert_eq!(t.mux.open_streams(), 0);
        t.assert_quiet();
    }

    #[test]
    fn unanswered_host_request_times_out_with_reset() {
        let mut t = T::new();
        t.mux.request_timeout = Duration::from_millis(100);
        t.g.post_rx(4);
        let (mut s, port) = t.host_connect();
        let (h, _) = t.next();
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, port, GUEST_PORT));
        assert!(read_to_eof(&mut s).is_empty());
        assert_eq!(t.mux.open_streams(), 0);
    }

    #[test]
    fn malformed_connect_lines_close_the_stream() {
        let mut t = T::new();
        t.g.post_rx(4);
        for line in [
            &b"HELLO 5\n"[..],
            b"CONNECT\n",
            b"CONNECT x\n",
            b"CONNECT 5 6\n",
            b"CONNECT -1\n",
            &[b'7'; 40],
        ] {
            let mut s = UnixStream::connect(&t.uds).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(line).unwrap();
            for _ in 0..3 {
                t.pump(10);
            }
            // Closed: end of file, or a reset when our unread bytes were discarded.
            let mut buf = Vec::new();
            match s.read_to_end(&mut buf) {
                Ok(_) => assert!(
                    buf.is_empty(),
                    "{:?} got an answer",
                    String::from_utf8_lossy(line)
                ),
                Err(e) => assert_eq!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset,
                    "{:?}",
                    String::from_utf8_lossy(line)
                ),
            }
        }
        assert_eq!(t.mux.open_streams(), 0);
        t.assert_quiet();
    }

    #[test]
    fn host_client_leaving_before_connect_line_is_forgotten() {
        let mut t = T::new();
        let mut s = UnixStream::connect(&t.uds).unwrap();
        s.write_all(b"CONN").unwrap();
        t.pump(10);
        assert_eq!(t.mux.open_streams(), 1);
        drop(s);
        t.pump(10);
        assert_eq!(t.mux.open_streams(), 0);
    }

    #[test]
    fn guest_connect_to_missing_port_is_reset() {
        let mut t = T::new();
        t.g.post_rx(4);
        t.send(ghdr(OP_REQUEST, GUEST_PORT, 1234), &[]);
        let (h, _) = t.next();
        assert_eq!(h.op, OP_RST);
        assert_eq!(
            (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
            (HOST_CID, GUEST_CID, 1234, GUEST_PORT)
        );
        assert_eq!(t.mux.open_streams(), 0);
    }

    #[test]
    fn guest_connect_to_listening_port_is_accepted_and_relays_both_ways() {
        let mut t = T::new();
        let mut s = t.guest_established(1234, ghdr(0, GUEST_PORT, 0));

        t.send(ghdr(OP_RW, GUEST_PORT, 1234), b"ping");
        assert_eq!(read_n(&mut s, 4), b"ping");

        s.write_all(b"pong").unwrap();
        let (h, data) = t.next();
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, 1234, GUEST_PORT));
        assert_eq!(data, b"pong");
    }

    #[test]
    fn guest_shutdown_flushes_then_resets_and_closes_host_stream() {
        let mut t = T::new();
        let mut s = t.guest_established(1234, ghdr(0, GUEST_PORT, 0));
        t.g.send(ghdr(OP_RW, GUEST_PORT, 1234), b"bye");
        let mut shut = ghdr(OP_SHUTDOWN, GUEST_PORT, 1234);
        shut.flags = SHUTDOWN_BOTH;
        t.send(shut, &[]);
        let (h, _) = t.next();
        assert_eq!(h.op, OP_RST);
        assert_eq!(read_to_eof(&mut s), b"bye");
        assert_eq!(t.mux.open_streams(), 0);
    }

    #[test]
    fn host_half_close_keeps_the_guest_to_host_direction_open() {
        let mut t = T::new();
        let mut s = t.guest_established(1234, ghdr(0, GUEST_PORT, 0));
        s.write_all(b"request").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let (h, data) = t.next();
        assert_eq!((h.op, data.as_slice()), (OP_RW, &b"request"[..]));
        let (h, _) = t.next();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));

        t.send(ghdr(OP_RW, GUEST_PORT, 1234), b"reply");
        assert_eq!(read_n(&mut s, 5), b"reply");

        // The guest finishes too: both directions done.
        let mut shut = ghdr(OP_SHUTDOWN, GUEST_PORT, 1234);
        shut.flags = SHUTDOWN_SEND;
        t.send(shut, &[]);
        let (h, _) = t.next();
        assert_eq!(h.op, OP_RST);
        assert!(read_to_eof(&mut s).is_empty());
        assert_eq!(t.mux.open_streams(), 0);
    }

    #[test]
    fn guest_half_close_shuts_host_write_side_and_keeps_reading() {
        let mut t = T::new();
        let mut s = t.guest_established(1234, ghdr(0, GUEST_PORT, 0));
        t.g.send(ghdr(OP_RW, GUEST_PORT, 1234), b"question");
        let mut shut = ghdr(OP_SHUTDOWN, GUEST_PORT, 1234);
        shut.flags = SHUTDOWN_SEND;
        t.send(shut, &[]);
        assert_eq!(read_to_eof(&mut s), b"question");
        s.write_all(b"answer").unwrap();
        drop(s);
        let (h, data) = t.next();
        assert_eq!((h.op, data.as_slice()), (OP_RW, &b"answer"[..]));
        let (h, _) = t.next();
        assert_eq!(h.op, OP_SHUTDOWN);
        // Host EOF after the guest's own shutdown: nothing left either way.
        let (h, _) = t.next();
        assert_eq!(h.op, OP_RST);
        assert_eq!(t.mux.open_streams(), 0);
    }

    #[test]
    fn unanswered_close_times_out_with_reset() {
        let mut t = T::new();
        t.mux.close_timeout = Duration::from_millis(100);
        let s = t.guest_established(1234, ghdr(0, GUEST_PORT, 0));
        drop(s);
        let (h, _) = t.next();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_BOTH));
        let (h, _) = t.next();
        assert_eq!(h.op, OP_RST);
        assert_eq!(t.mux.open_streams(), 0);
    }

    #[test]
    fn host_data_never_exceeds_guest_credit() {
        let mut t = T::new();
        let mut req = ghdr(0, GUEST_PORT, 0);
        req.buf_alloc = 16;
        let mut s = t.guest_established(1234, req);
        s.write_all(&[7u8; 40]).unwrap();

        let (h, data) = t.next();
        assert_eq!((h.op, data.len()), (OP_RW, 16));
        let (h, _) = t.next();
        assert_eq!(h.op, OP_CREDIT_REQUEST);
        t.assert_quiet();

        let mut upd = ghdr(OP_CREDIT_UPDATE, GUEST_PORT, 1234);
        upd.buf_alloc = 16;
        upd.fwd_cnt = 16;
        t.send(upd, &[]);
        let (h, data) = t.next();
        assert_eq!((h.op, data.len()), (OP_RW, 16));
        let (h, _) = t.next();
        assert_eq!(h.op, OP_CREDIT_REQUEST);

        upd.fwd_cnt = 32;
        t.send(upd, &[]);
        let (h, data) = t.next();
        assert_eq!((h.op, data.len()), (OP_RW, 8));
        t.assert_quiet();
    }

    #[test]
    fn guest_payload_spread_over_several_descriptors_arrives_whole() {
        let mut t = T::new();
        let mut s = t.guest_established(1234, ghdr(0, GUEST_PORT, 0));
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        // Payload in pages, header sharing a descriptor with payload, the
        // header itself cut in two, a zero-length descriptor in between.
        let layouts: [&[usize]; 4] = [
            &[HEADER_SIZE, 4096, 61440],
            &[HEADER_SIZE + 100, 65436],
            &[10, HEADER_SIZE - 10 + 5000, 0, 60536],
            &[HEADER_SIZE, 1, 1, 65534],
        ];
        t.g.tx_used(); // the connection request
        let mut want = Vec::new();
        for pieces in layouts {
            t.g.send_pieces(ghdr(OP_RW, GUEST_PORT, 1234), &data, pieces);
            want.extend_from_slice(&data);
            t.pump(0);
            // The host reads as it goes, so the window never fills.
            assert_eq!(read_n(&mut s, data.len()), data, "layout {pieces:?}");
        }
        assert_eq!(t.g.tx_used(), layouts.len());
        assert_eq!(
            t.mux.conn(1234, GUEST_PORT).unwrap().fwd_cnt as usize,
            want.len()
        );
    }

    #[test]
    fn guest_payload_shorter_than_its_header_says_is_dropped() {
        let mut t = T::new();
        let mut s = t.guest_established(1234, ghdr(0, GUEST_PORT, 0));
        s.set_nonblocking(true).unwrap();
        t.g.tx_used(); // the connection request
        let mut h = ghdr(OP_RW, GUEST_PORT, 1234);
        h.len = 300;
        let a = t.g.alloc(400);
        t.g.mem
            .write_slice(&h.to_bytes(), vm_memory::GuestAddress(a))
            .unwrap();
        // 44 + 100 + 100 bytes: 100 short of the header's length.
        t.g.tx_ring.push(
            &t.g.mem,
            &[
                (a, HEADER_SIZE as u32, false),
                (a + 64, 100, false),
                (a + 200, 100, false),
            ],
        );
        t.pump(0);
        assert_eq!(t.g.tx_used(), 1, "tx buffer not returned");
        let mut b = [0u8; 16];
        assert!(
            matches!(s.read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "a truncated packet reached the host"
        );
    }

    #[test]
    fn the_payload_buffer_grows_to_the_largest_packet_and_no_further() {
        let mut t = T::new();
        let mut s = t.guest_established(1234, ghdr(0, GUEST_PORT, 0));
        t.g.tx_used(); // the connection request
        assert_eq!(t.mux.scratch.capacity(), 0, "allocated before a payload");
        t.g.send(ghdr(OP_RW, GUEST_PORT, 1234), b"hello");
        t.g.send(ghdr(OP_RW, GUEST_PORT, 1234), b"hi");
        t.pump(0);
        assert_eq!(read_n(&mut s, 7), b"hellohi");
        assert_eq!(t.mux.scratch.len(), 5);
        // A header announcing more than a packet may carry: dropped, and
        // the buffer is not grown for it.
        let mut h = ghdr(OP_RW, GUEST_PORT, 1234);
        h.len = MAX_PKT_DATA + 1;
        let a = t.g.alloc(64);
        t.g.mem
            .write_slice(&h.to_bytes(), vm_memory::GuestAddress(a))
            .unwrap();
        t.g.tx_ring
            .push(&t.g.mem, &[(a, HEADER_SIZE as u32, false)]);
        t.pump(0);
        assert_eq!(t.g.tx_used(), 3);
        assert_eq!(t.mux.scratch.len(), 5);
        assert_eq!(t.mux.guest_error_count(), 1);
    }

    #[test]
    fn credit_request_is_answered_with_credit_update() {
        let mut t = T::new();
        let _s = t.guest_established(1234, ghdr(0, GUEST_PORT, 0));
        t.send(ghdr(OP_RW, GUEST_PORT, 1234), b"12345");
        t.send(ghdr(OP_CREDIT_REQUEST, GUEST_PORT, 1234), &[]);
        let (h, _) = t.next();
        assert_eq!(h.op, OP_CREDIT_UPDATE);
        assert_eq!((h.buf_alloc, h.fwd_cnt), (CONN_BUF_ALLOC, 5));
    }

    #[test]
    fn bulk_guest_data_survives_a_slow_host_reader() {
        const TOTAL: usize = 1 << 20;
        const CHUNK: usize = 60_000;
        let mut t = T::new();
        let mut s = t.guest_established(1234, ghdr(0, GUEST_PORT, 0));
        s.set_nonblocking(true).unwrap();
        let pattern: Vec<u8> = (0..TOTAL).map(|i| (i * 7 % 251) as u8).collect();
        let (mut sent, mut host_fwd, mut got) = (0usize, 0u32, Vec::new());
        let mut read_paused_rounds = 0;
        let mut max_buffered = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < TOTAL {
            assert!(
                Instant::now() < deadline,
                "stalled at {} of {TOTAL} bytes",
                got.len()
            );
            // Honour the device's window, as a real driver does.
            let credit = CONN_BUF_ALLOC as usize - (sent - host_fwd as usize);
            let n = CHUNK.min(TOTAL - sent);
            if n > 0 && credit >= n {
                t.g.send(ghdr(OP_RW, GUEST_PORT, 1234), &pattern[sent..sent + n]);
                sent += n;
            }
            if t.g.rx_outstanding() < 8 {
                t.g.post_rx(8);
            }
            t.pump(5);
            while let Some((h, _)) = t.g.received.pop_front() {
                assert!(
                    matches!(h.op, OP_CREDIT_UPDATE | OP_CREDIT_REQUEST),
                    "op {}",
                    h.op
                );
                host_fwd = h.fwd_cnt;
            }
            if let Some(c) = t.mux.conn(1234, GUEST_PORT) {
                max_buffered = max_buffered.max(c.tx_buf.len());
            }
            // Let the socket fill up before the host starts reading.
            read_paused_rounds += 1;
            if read_paused_rounds > 20 {
                let mut buf = [0u8; 8192];
                match s.read(&mut buf) {
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }
        assert!(got == pattern, "data corrupted or reordered");
        assert!(
            max_buffered > 0,
            "the socket never pushed back; partial writes untested"
        );
    }

    #[test]
    fn bulk_host_data_arrives_intact_under_guest_flow_control() {
        const TOTAL: usize = 1 << 20;
        let mut t = T::new();
        let mut req = ghdr(0, GUEST_PORT, 0);
        req.buf_alloc = 32 * 1024;
        let s = t.guest_established(1234, req);
        let pattern: Vec<u8> = (0..TOTAL).map(|i| (i * 13 % 253) as u8).collect();
        let writer = {
            let mut s = s.try_clone().unwrap();
            let data = pattern.clone();
            std::thread::spawn(move || s.write_all(&data).unwrap())
        };
        let mut got = Vec::new();
        let mut acked = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < TOTAL {
            assert!(
                Instant::now() < deadline,
                "stalled at {} of {TOTAL} bytes",
                got.len()
            );
            if t.g.rx_outstanding() < 16 {
                t.g.post_rx(16);
            }
            t.pump(5);
            while let Some((h, data)) = t.g.received.pop_front() {
                match h.op {
                    OP_RW => got.extend_from_slice(&data),
                    OP_CREDIT_REQUEST => {}
                    op => panic!("unexpected op {op}"),
                }
                let in_flight = got.len() - acked;
                assert!(in_flight <= 32 * 1024, "device overran the guest's window");
            }
            // The guest application consumed everything: tell the device.
            if got.len() - acked >= 8 * 1024 || (got.len() > acked && t.g.received.is_empty()) {
                acked = got.len();
                let mut upd = ghdr(OP_CREDIT_UPDATE, GUEST_PORT, 1234);
                upd.buf_alloc = 32 * 1024;
                upd.fwd_cnt = acked as u32;
                t.send(upd, &[]);
            }
        }
        writer.join().unwrap();
        assert!(got == pattern, "data corrupted or reordered");
    }

    #[test]
    fn guest_overrunning_credit_is_reset() {
        let mut t = T::new();
        let _s = t.guest_established(1234, ghdr(0, GUEST_PORT, 0));
        let chunk = vec![1u8; 64 * 1024];
        for _ in 0..64 {
            t.send(ghdr(OP_RW, GUEST_PORT, 1234), &chunk);
            if t.mux.open_streams() == 0 {
                break;
            }
        }
        assert_eq!(
            t.mux.open_streams(),
            0,
            "a guest ignoring credit was not reset"
        );
        // Credit updates may come first; the reset must come.
        loop {
            let (h, _) = t.next();
            if h.op == OP_RST {
                break;
            }
            assert_eq!(h.op, OP_CREDIT_UPDATE);
            t.g.post_rx(1);
        }
    }

    #[test]
    fn packets_wait_in_order_until_the_guest_posts_buffers() {
        let mut t = T::new();
        let mut a = UnixStream::connect(&t.uds).unwrap();
        a.write_all(b"CONNECT 1\n").unwrap();
        let mut b = UnixStream::connect(&t.uds).unwrap();
        b.write_all(b"CONNECT 2\n").unwrap();
        t.send(ghdr(OP_RW, 9, 9), b"x"); // unknown connection: reset owed
        for _ in 0..5 {
            t.pump(10);
        }
        assert!(t.g.received.is_empty());
        t.g.post_rx_single(1, 4096);
        t.g.post_rx(2);
        t.pump(0);
        let ops: Vec<(u16, u32)> =
            t.g.received
                .drain(..)
                .map(|(h, _)| (h.op, h.dst_port))
                .collect();
        assert_eq!(ops, [(OP_RST, 9), (OP_REQUEST, 1), (OP_REQUEST, 2)]);
    }

    #[test]
    fn packets_from_a_foreign_cid_are_dropped() {
        let mut t = T::new();
        let listener = UnixListener::bind(port_path(&t.uds, 1234)).unwrap();
        listener.set_nonblocking(true).unwrap();
        t.g.post_rx(4);
        let mut req = ghdr(OP_REQUEST, GUEST_PORT, 1234);
        req.src_cid = 99;
        t.send(req, &[]);
        t.assert_quiet();
        assert!(
            listener.accept().is_err(),
            "spoofed request reached the host"
        );
        assert_eq!(t.g.tx_used(), 1, "tx buffer not returned");
    }

    #[test]
    fn packets_to_other_cids_or_types_are_reset_and_unknown_ops_dropped() {
        let mut t = T::new();
        t.g.post_rx(4);
        let mut h = ghdr(OP_REQUEST, GUEST_PORT, 1234);
        h.dst_cid = 7;
        t.send(h, &[]);
        let (r, _) = t.next();
        assert_eq!((r.op, r.src_cid), (OP_RST, 7));
        let mut h = ghdr(OP_REQUEST, GUEST_PORT, 1234);
        h.type_ = 2;
        t.send(h, &[]);
        assert_eq!(t.next().0.op, OP_RST);
        t.send(ghdr(42, GUEST_PORT, 1234), &[]);
        t.send(ghdr(OP_RST, GUEST_PORT, 1234), &[]);
        t.assert_quiet();
        // Wrong CID, wrong type, unknown op; a reset of nothing is no error.
        assert_eq!(t.mux.guest_error_count(), 3);
    }

    #[test]
    fn malformed_descriptors_are_returned_without_touching_anything() {
        let mut t = T::new();
        // tx: header descriptor too short, write-only header, payload
        // beyond guest memory, length field larger than the payload.
        let a = t.g.alloc(64);
        t.g.tx_ring.push(&t.g.mem, &[(a, 10, false)]);
        t.g.tx_ring.push(&t.g.mem, &[(a, 44, true)]);
        let mut h = ghdr(OP_RW, GUEST_PORT, 1234);
        h.len = 100;
        t.g.mem
            .write_slice(&h.to_bytes(), vm_memory::GuestAddress(a))
            .unwrap();
        t.g.tx_ring
            .push(&t.g.mem, &[(a, 44, false), (u64::MAX - 50, 100, false)]);
        t.g.tx_ring
            .push(&t.g.mem, &[(a, 44, false), (a, 10, false)]);
        // rx: read-only buffer, buffer outside guest memory.
        t.g.rx_ring.push(&t.g.mem, &[(a, 4096, false)]);
        t.g.rx_ring.push(&t.g.mem, &[(1 << 40, 4096, true)]);
        t.g.send(ghdr(OP_REQUEST, GUEST_PORT, 1234), &[]); // owed: a reset
        t.mux.process_tx(&t.g.mem, &mut t.txq);
        t.mux.process_rx(&t.g.mem, &mut t.rxq);
        assert_eq!(t.g.tx_used(), 5);
        let used = t.g.rx_ring.used(&t.g.mem);
        assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [0, 0]);
        // The reset still goes out once a good buffer arrives.
        t.g.post_rx(1);
        assert_eq!(t.next().0.op, OP_RST);
        // Four bad tx chains, two bad rx buffers: counted, so the log can
        // be rate-limited.
        assert_eq!(t.mux.guest_error_count(), 6);
    }

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect_line(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect_line(b"connect 52\r"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT  4294967295 "), Some(u32::MAX));
        assert_eq!(parse_connect_line(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect_line(b"CONNECT"), None);
        assert_eq!(parse_connect_line(b"LISTEN 52"), None);
        assert_eq!(parse_connect_line(b"CONNECT 52 x"), None);
        assert_eq!(parse_connect_line(&[0xff, 0xfe]), None);
    }

    #[test]
    fn host_ports_are_unique_and_wrap_below_port_any() {
        let mut t = T::new();
        t.mux.next_local_port = u32::MAX - 2;
        assert_eq!(t.mux.alloc_local_port(), u32::MAX - 2);
        assert_eq!(t.mux.alloc_local_port(), u32::MAX - 1);
        assert_eq!(t.mux.alloc_local_port(), FIRST_LOCAL_PORT);
        // A port still in use is skipped.
        t.g.post_rx(4);
        let (_s, port) = t.host_connect();
        assert!(t.mux.conn(port, GUEST_PORT).is_some());
        t.mux.next_local_port = port;
        assert_eq!(t.mux.alloc_local_port(), port + 1);
    }

    /// Raw descriptors: address, length, writable.
    type Descs = Vec<(u64, u32, bool)>;

    /// A guest packet whose every header field may lie, its payload, and
    /// how it is laid out: None for header + payload as the driver does,
    /// or raw descriptors over them.
    fn hostile_packet(
    ) -> impl proptest::strategy::Strategy<Value = (Header, Vec<u8>, Option<Descs>)> {
        use proptest::prelude::*;
        let header = (
            prop_oneof![Just(GUEST_CID), any::<u64>()],
            prop_oneof![Just(HOST_CID), any::<u64>()],
            prop_oneof![Just(GUEST_PORT), any::<u32>()],
            prop_oneof![Just(1234u32), Just(52), any::<u32>()],
            prop_oneof![0u32..5000, any::<u32>()],
            prop_oneof![Just(TYPE_STREAM), any::<u16>()],
            prop_oneof![1u16..=7, any::<u16>()],
            (any::<u32>(), any::<u32>(), any::<u32>()),
        )
            .prop_map(
                |(
                    src_cid,
                    dst_cid,
                    src_port,
                    dst_port,
                    len,
                    type_,
                    op,
                    (flags, buf_alloc, fwd_cnt),
                )| Header {
                    src_cid,
                    dst_cid,
                    src_port,
                    dst_port,
                    len,
                    type_,
                    op,
                    flags,
                    buf_alloc,
                    fwd_cnt,
                },
            );
        let layout = proptest::option::weighted(
            0.3,
            proptest::collection::vec(
                (
                    prop_oneof![
                        Just(0x10_0000u64),
                        Just(0x20_0000),
                        Just((64 << 20) - 8),
                        any::<u64>()
                    ],
                    prop_oneof![0u32..200, Just(HEADER_SIZE as u32), any::<u32>()],
                    any::<bool>(),
                ),
                1..4,
            ),
        );
        (
            header,
            proptest::collection::vec(any::<u8>(), 0..300),
            layout,
        )
    }

    proptest::proptest! {
        /// Hostile packets and chains on the tx queue, with receive buffers
        /// posted: the muxer serves them all without a panic, and every
        /// receive buffer it fills stays within the room the guest gave.
        #[test]
        fn fuzz_vsock_hostile_packets_and_chains(
            packets in proptest::collection::vec(hostile_packet(), 1..6),
        ) {
            let mut t = T::new();
            t.g.post_rx(8);
            for (hdr, data, layout) in &packets {
                match layout {
                    // As the driver lays it out (`send` sets len from the
                    // data); the raw layouts carry the header's own len.
                    None => t.g.send(*hdr, data),
                    Some(descs) => {
                        let a = t.g.alloc(512);
                        t.g.mem
                            .write_slice(&hdr.to_bytes(), vm_memory::GuestAddress(a))
                            .unwrap();
                        let descs: Vec<(u64, u32, bool)> = descs
                            .iter()
                            .enumerate()
                            .map(|(i, d)| if i == 0 && d.0 == 0x10_0000 { (a, d.1, d.2) } else { *d })
                            .collect();
                        t.g.tx_ring.push(&t.g.mem, &descs);
                    }
                }
                for _ in 0..3 {
                    t.mux.process_tx(&t.g.mem, &mut t.txq);
                    t.mux.process_rx(&t.g.mem, &mut t.rxq);
                }
            }
            for (_, len) in t.g.rx_ring.used(&t.g.mem) {
                proptest::prop_assert!(len as usize <= HEADER_SIZE + 4096, "used {len}");
            }
        }
    }
}
