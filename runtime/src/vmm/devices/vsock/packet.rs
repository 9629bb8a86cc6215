//! The virtio-vsock packet header (virtio 1.2, section 5.10.6) as a plain
//! value, and the reading of guest tx packets.
//!
//! [`Header`] is what the muxer reasons about, so that a header is read from
//! guest memory exactly once (the guest may rewrite it behind our back) and
//! so that tests can build and decode packets without a descriptor chain.
//!
//! Tx packets are read here rather than with
//! `virtio_vsock::packet::VsockPacket::from_tx_virtq_chain`, which insists on
//! the whole payload sitting in one descriptor. The virtio spec leaves the
//! layout of a chain to the driver, and Linux guests do split a payload
//! over several descriptors; refusing such a packet silently drops bytes of
//! a stream whose sender has already been told they were sent.

use virtio_queue::desc::split::Descriptor;
use virtio_vsock::packet::PKT_HEADER_SIZE;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::vmm::devices::GuestMemory;

/// The host's well-known context id.
pub const HOST_CID: u64 = 2;

/// Stream sockets; the only type this device offers (no SEQPACKET feature).
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// OP_SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// OP_SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Size of the header on the wire.
pub const HEADER_SIZE: usize = PKT_HEADER_SIZE;

/// One decoded packet header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// The little-endian wire layout.
    pub fn to_bytes(self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The reset a peer expects in answer to `self` when there is no
    /// connection to deliver it to: addresses swapped, nothing else.
    pub fn rst_reply(&self) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        }
    }
}

/// Why a tx descriptor chain was not taken as a packet.
#[derive(Debug, thiserror::Error)]
pub enum TxChainError {
    #[error("a device-writable descriptor in a tx chain")]
    WriteOnly,
    #[error("the chain holds {0} bytes, less than a {HEADER_SIZE}-byte header")]
    ShortHeader(usize),
    #[error("the header announces {0} bytes of payload, more than the {1} allowed")]
    TooLong(u32, usize),
    #[error("the header announces {want} bytes of payload, the chain holds {got}")]
    ShortPayload { want: u32, got: usize },
    #[error("{0}")]
    Memory(#[from] GuestMemoryError),
}

/// Reads one guest tx packet from the descriptors of its chain: the header
/// from the first bytes, then `hdr.len` bytes of payload into `payload`,
/// wherever the descriptor boundaries fall. Returns the header; the payload
/// is `payload[..hdr.len]`. Bytes past the payload are ignored.
///
/// `payload` grows to the largest payload seen, never past `max`: most
/// packets are headers alone or a few bytes, and a buffer of `max` bytes
/// made up front would be pages every idle VM owns for nothing.
pub fn read_tx_chain(
    mem: &GuestMemory,
    descs: impl Iterator<Item = Descriptor>,
    payload: &mut Vec<u8>,
    max: usize,
) -> Result<Header, TxChainError> {
    let mut raw = [0u8; HEADER_SIZE];
    let mut hdr_got = 0;
    let mut hdr: Option<Header> = None;
    let mut got = 0;
    for desc in descs {
        if desc.is_write_only() {
            return Err(TxChainError::WriteOnly);
        }
        let mut addr = desc.addr();
        let mut left = desc.len() as usize;
        let h = match hdr {
            Some(h) => h,
            None => {
                let n = left.min(HEADER_SIZE - hdr_got);
                mem.read_slice(&mut raw[hdr_got..hdr_got + n], addr)?;
                hdr_got += n;
                if hdr_got < HEADER_SIZE {
                    continue;
                }
                left -= n;
                addr = offset(addr, n)?;
                let h = Header::from_bytes(&raw);
                if h.len as usize > max {
                    return Err(TxChainError::TooLong(h.len, max));
                }
                if payload.len() < h.len as usize {
                    payload.resize(h.len as usize, 0);
                }
                hdr = Some(h);
                h
            }
        };
        let n = left.min(h.len as usize - got);
        mem.read_slice(&mut payload[got..got + n], addr)?;
        got += n;
        if got == h.len as usize {
            return Ok(h);
        }
    }
    Err(match hdr {
        None => TxChainError::ShortHeader(hdr_got),
        Some(h) => TxChainError::ShortPayload { want: h.len, got },
    })
}

fn offset(addr: GuestAddress, n: usize) -> Result<GuestAddress, GuestMemoryError> {
    addr.0
        .checked_add(n as u64)
        .map(GuestAddress)
        .ok_or(GuestMemoryError::InvalidGuestAddress(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_wire_layout() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xdead_beef,
            dst_port: 52,
            len: 7,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 3,
            buf_alloc: 1 << 18,
            fwd_cnt: 99,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }
}
