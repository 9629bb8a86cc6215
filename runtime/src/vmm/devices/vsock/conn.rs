//! State of one vsock stream between a guest port and a host Unix stream.
//!
//! Everything the muxer knows about a connection lives in [`Connection`] as
//! plain fields, so a later template/clone step can inspect or serialise it
//! without reaching into the worker thread's stack.

use std::collections::VecDeque;
use std::io;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::packet::{Header, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::sys::send_nosignal;

/// Bytes of guest data we accept ahead of the Unix peer (our `buf_alloc`).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;

/// A connection is named by the host-side port and the guest-side port; the
/// CIDs are fixed (host 2, the configured guest CID).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// A host process asked for a guest port; OP_REQUEST is queued or sent,
    /// OP_RESPONSE has not arrived.
    LocalInit,
    /// Data may flow (possibly half-closed, see the shutdown fields).
    Established,
    /// We sent OP_SHUTDOWN with both flags and wait for the guest's OP_RST
    /// (or the deadline, after which we reset it ourselves).
    Closing,
}

/// Control packets owed to the guest, sent in this order of priority.
pub mod pending {
    pub const REQUEST: u8 = 1 << 0;
    pub const RESPONSE: u8 = 1 << 1;
    pub const SHUTDOWN: u8 = 1 << 2;
    pub const CREDIT_UPDATE: u8 = 1 << 3;
    pub const CREDIT_REQUEST: u8 = 1 << 4;
}

#[derive(Debug)]
pub struct Connection {
    pub stream: UnixStream,
    /// Epoll token of `stream`.
    pub token: u64,
    pub state: ConnState,
    /// When LocalInit or Closing gives up and resets the connection.
    pub deadline: Option<Instant>,

    // Guest -> host.
    /// Bytes the Unix peer has not accepted yet, oldest first.
    pub tx_buf: VecDeque<u8>,
    /// Leading bytes of `tx_buf` that are ours (the `OK <port>` line), not
    /// the guest's, and so do not count towards `fwd_cnt`.
    pub tx_buf_own: usize,
    /// Guest bytes handed to the Unix socket (advertised as fwd_cnt).
    pub fwd_cnt: u32,
    /// The fwd_cnt the guest last heard from us.
    pub last_fwd_cnt_sent: u32,
    /// OP_SHUTDOWN flags received from the guest.
    pub guest_shut: u32,
    /// shutdown(SHUT_WR) done on the Unix stream after the guest stopped sending.
    pub unix_shut_write: bool,

    // Host -> guest.
    /// Bytes sent to the guest.
    pub rx_cnt: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// OP_SHUTDOWN flags sent to the guest.
    pub host_shut: u32,
    /// The Unix stream reached end of file.
    pub host_eof: bool,
    /// The Unix peer is gone for good (EPOLLHUP): nothing more can be written.
    pub unix_hup: bool,
    /// The Unix stream has (or may have) bytes to read; cleared on EAGAIN.
    pub readable: bool,
    /// We asked the guest for credit and have not heard back.
    pub credit_requested: bool,

    /// `pending::*` bits.
    pub pending: u8,
    /// Flags of the pending OP_SHUTDOWN.
    pub pending_shutdown: u32,
    /// Present in the muxer's rx round-robin queue.
    pub in_rxq: bool,
    /// Events registered with epoll, None when not registered.
    pub registered: Option<EventSet>,
}

impl Connection {
    pub fn new(stream: UnixStream, token: u64, state: ConnState) -> Self {
        Connection {
            stream,
            token,
            state,
            deadline: None,
            tx_buf: VecDeque::new(),
            tx_buf_own: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            guest_shut: 0,
            unix_shut_write: false,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            host_shut: 0,
            host_eof: false,
            unix_hup: false,
            readable: false,
            credit_requested: false,
            pending: 0,
            pending_shutdown: 0,
            in_rxq: false,
            registered: None,
        }
    }

    /// Every guest packet carries its current receive window.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// How many more bytes the guest has room for.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        // A guest claiming to have consumed more than we sent (or shrinking
        // its buffer) simply gets no credit until its numbers make sense.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether host->guest data may still be read from the Unix stream.
    pub fn wants_read(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && self.guest_shut & SHUTDOWN_RCV == 0
    }

    /// A data packet (or the end-of-file shutdown) can be produced now.
    pub fn has_data(&self) -> bool {
        self.wants_read() && self.readable && self.peer_credit() > 0
    }

    pub fn has_rx(&self) -> bool {
        self.pending != 0 || self.has_data()
    }

    /// Guest bytes buffered for the Unix peer (what the guest's credit covers).
    pub fn tx_buffered(&self) -> usize {
        self.tx_buf.len() - self.tx_buf_own
    }

    /// The guest has stopped sending and everything it sent reached the peer.
    pub fn guest_stream_done(&self) -> bool {
        self.guest_shut & SHUTDOWN_SEND != 0 && self.tx_buf.is_empty()
    }

    pub fn desired_events(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.wants_read() && !self.readable {
            ev |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    /// A header from the host side of this connection, carrying our window.
    pub fn header(&self, key: ConnKey, guest_cid: u64, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Queues bytes for the Unix peer, writing straight through when nothing
    /// is queued ahead. `guest_data` is false for our own handshake reply,
    /// which must not be counted as forwarded guest data.
    pub fn write_to_unix(&mut self, bytes: &[u8], guest_data: bool) -> io::Result<()> {
        let mut done = 0;
        if self.tx_buf.is_empty() {
            match send_nosignal(&self.stream, bytes) {
                Ok(n) => done = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if guest_data {
                self.fwd_cnt = self.fwd_cnt.wrapping_add(done as u32);
            }
        }
        let rest = &bytes[done..];
        self.tx_buf.extend(rest);
        if !guest_data {
            self.tx_buf_own += rest.len();
        }
        Ok(())
    }

    /// Pushes buffered bytes to the Unix peer until it would block.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            let n = match send_nosignal(&self.stream, front) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            self.tx_buf.drain(..n);
            let own = n.min(self.tx_buf_own);
            self.tx_buf_own -= own;
            self.fwd_cnt = self.fwd_cnt.wrapping_add((n - own) as u32);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn conn() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(a, 16, ConnState::Established), b)
    }

    #[test]
    fn peer_credit_follows_window_and_never_underflows() {
        let (mut c, _peer) = conn();
        c.update_peer_credit(&Header {
            buf_alloc: 100,
            fwd_cnt: 0,
            ..Header::default()
        });
        assert_eq!(c.peer_credit(), 100);
        c.rx_cnt = 60;
        assert_eq!(c.peer_credit(), 40);
        c.update_peer_credit(&Header {
            buf_alloc: 100,
            fwd_cnt: 60,
            ..Header::default()
        });
        assert_eq!(c.peer_credit(), 100);
        // A lying guest (consumed more than sent) or a shrunk buffer: no credit.
        c.update_peer_credit(&Header {
            buf_alloc: 10,
            fwd_cnt: 20,
            ..Header::default()
        });
        assert_eq!(c.peer_credit(), 0);
        // Counters wrap like the guest's do.
        c.rx_cnt = 5;
        c.update_peer_credit(&Header {
            buf_alloc: 100,
            fwd_cnt: u32::MAX - 4,
            ..Header::default()
        });
        assert_eq!(c.peer_credit(), 90);
    }

    #[test]
    fn handshake_bytes_are_not_counted_as_forwarded_guest_data() {
        let (mut c, mut peer) = conn();
        c.write_to_unix(b"OK 7\n", false).unwrap();
        c.write_to_unix(b"abc", true).unwrap();
        assert_eq!(c.fwd_cnt, 3);
        // Force the buffered path: everything queued, then flushed.
        c.tx_buf.extend(b"OK 8\n");
        c.tx_buf_own = 5;
        c.tx_buf.extend(b"xyz");
        c.flush().unwrap();
        assert_eq!(c.fwd_cnt, 6);
        assert_eq!(c.tx_buf_own, 0);
        let mut got = [0u8; 16];
        let n = peer.read(&mut got).unwrap();
        assert_eq!(&got[..n], b"OK 7\nabcOK 8\nxyz");
    }
}
