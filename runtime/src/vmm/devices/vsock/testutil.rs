//! A minimal guest driver for the tests: posts buffers on the rx queue,
//! sends packets on the tx queue and reads back what the device returned,
//! all directly in guest memory (queue layout from virtio-queue's mock).

use std::collections::{HashMap, VecDeque};

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::packet::{Header, HEADER_SIZE, HOST_CID, TYPE_STREAM};
use crate::vmm::devices::GuestMemory;

pub const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 64 << 20;
const RX_QUEUE_BASE: u64 = 0;
const TX_QUEUE_BASE: u64 = 0x1_0000;
const BUFFERS_BASE: u64 = 0x10_0000;
const QSIZE: u16 = 256;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// The driver half of one split virtqueue.
pub struct Ring {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    pub fn new(mem: &GuestMemory, base: u64) -> (Ring, Queue) {
        let vq = MockSplitQueue::create(mem, GuestAddress(base), QSIZE);
        let mut queue: Queue = vq.create_queue().unwrap();
        // virtio-queue 0.17's mock puts the used ring inside the upper half
        // of the available ring (it adds the entry count, not the byte
        // size); move it past the available ring so all 256 entries work.
        let used = vq.avail_addr().unchecked_add(0x1000);
        queue.try_set_used_ring_address(used).unwrap();
        mem.write_slice(&[0u8; 4 + 8 * QSIZE as usize + 2], used)
            .unwrap();
        let ring = Ring {
            desc: vq.desc_table_addr(),
            avail: vq.avail_addr(),
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        (ring, queue)
    }

    /// Makes a chain of (address, length, device-writable) available.
    pub fn push(&mut self, mem: &GuestMemory, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let last = i + 1 == descs.len();
            let next = if last { 0 } else { (idx + 1) % QSIZE };
            let flags = if writable { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, self.desc.unchecked_add(16 * u64::from(idx)))
                .unwrap();
        }
        self.next_desc = (head + descs.len() as u16) % QSIZE;
        let slot = self
            .avail
            .unchecked_add(4 + 2 * u64::from(self.avail_idx % QSIZE));
        mem.write_obj(head.to_le(), slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), self.avail.unchecked_add(2))
            .unwrap();
        head
    }

    /// New used entries as (head, length).
    pub fn used(&mut self, mem: &GuestMemory) -> Vec<(u16, u32)> {
        let idx = u16::from_le(mem.read_obj(self.used.unchecked_add(2)).unwrap());
        let mut out = Vec::new();
        while self.used_seen != idx {
            let elem = self
                .used
                .unchecked_add(4 + 8 * u64::from(self.used_seen % QSIZE));
            let id = u32::from_le(mem.read_obj(elem).unwrap());
            let len = u32::from_le(mem.read_obj(elem.unchecked_add(4)).unwrap());
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

pub struct Guest {
    pub mem: GuestMemory,
    pub rx_ring: Ring,
    pub tx_ring: Ring,
    /// Taken by the test (or handed to the device) after construction.
    pub rxq: Option<Queue>,
    pub txq: Option<Queue>,
    next_buf: u64,
    rx_bufs: HashMap<u16, (u64, u64)>,
    pub received: VecDeque<(Header, Vec<u8>)>,
    /// Length the device reported for each used rx buffer that did not hold
    /// a whole header (malformed-buffer tests).
    pub short_rx: Vec<u32>,
}

impl Guest {
    pub fn new() -> Guest {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (rx_ring, rxq) = Ring::new(&mem, RX_QUEUE_BASE);
        let (tx_ring, txq) = Ring::new(&mem, TX_QUEUE_BASE);
        Guest {
            mem,
            rx_ring,
            tx_ring,
            rxq: Some(rxq),
            txq: Some(txq),
            next_buf: BUFFERS_BASE,
            rx_bufs: HashMap::new(),
            received: VecDeque::new(),
            short_rx: Vec::new(),
        }
    }

    pub fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.next_buf;
        self.next_buf += u64::from(len).next_multiple_of(64);
        assert!(
            self.next_buf < MEM_SIZE as u64,
            "test guest ran out of buffer memory"
        );
        addr
    }

    /// Receive buffers the classic way: header and data in two descriptors.
    pub fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let hdr = self.alloc(HEADER_SIZE as u32);
            let data = self.alloc(4096);
            let head = self.rx_ring.push(
                &self.mem,
                &[(hdr, HEADER_SIZE as u32, true), (data, 4096, true)],
            );
            self.rx_bufs.insert(head, (hdr, data));
        }
    }

    /// Receive buffers as Linux >= 6.2 posts them: one descriptor.
    pub fn post_rx_single(&mut self, n: usize, data_len: u32) {
        for _ in 0..n {
            let buf = self.alloc(HEADER_SIZE as u32 + data_len);
            let head = self
                .rx_ring
                .push(&self.mem, &[(buf, HEADER_SIZE as u32 + data_len, true)]);
            self.rx_bufs.insert(head, (buf, buf + HEADER_SIZE as u64));
        }
    }

    /// Puts a packet on the tx queue (header and payload in two descriptors,
    /// or one when there is no payload). `hdr.len` is set from `data`.
    pub fn send(&mut self, mut hdr: Header, data: &[u8]) {
        hdr.len = data.len() as u32;
        let h = self.alloc(HEADER_SIZE as u32);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(h))
            .unwrap();
        if data.is_empty() {
            self.tx_ring
                .push(&self.mem, &[(h, HEADER_SIZE as u32, false)]);
        } else {
            let d = self.alloc(data.len() as u32);
            self.mem.write_slice(data, GuestAddress(d)).unwrap();
            self.tx_ring.push(
                &self.mem,
                &[
                    (h, HEADER_SIZE as u32, false),
                    (d, data.len() as u32, false),
                ],
            );
        }
    }

    /// Puts a packet on the tx queue with its wire bytes (header, then
    /// payload) cut into one descriptor per entry of `pieces`, as a driver
    /// may lay out a chain: the header may share a descriptor with payload,
    /// the payload may span several. `hdr.len` is set from `data`; the
    /// pieces must add up to the whole packet.
    pub fn send_pieces(&mut self, mut hdr: Header, data: &[u8], pieces: &[usize]) {
        hdr.len = data.len() as u32;
        let mut wire = hdr.to_bytes().to_vec();
        wire.extend_from_slice(data);
        assert_eq!(pieces.iter().sum::<usize>(), wire.len(), "pieces != packet");
        let mut descs = Vec::new();
        let mut at = 0;
        for &n in pieces {
            let a = self.alloc(n as u32);
            self.mem
                .write_slice(&wire[at..at + n], GuestAddress(a))
                .unwrap();
            descs.push((a, n as u32, false));
            at += n;
        }
        self.tx_ring.push(&self.mem, &descs);
    }

    /// Decodes whatever the device put in the rx used ring.
    pub fn collect(&mut self) {
        for (head, len) in self.rx_ring.used(&self.mem) {
            let Some((h, d)) = self.rx_bufs.remove(&head) else {
                panic!(
                    "device returned buffer {head} (len {len}) we never posted; outstanding {:?}",
                    self.rx_bufs.keys().collect::<Vec<_>>()
                )
            };
            if (len as usize) < HEADER_SIZE {
                self.short_rx.push(len);
                continue;
            }
            let mut raw = [0u8; HEADER_SIZE];
            self.mem.read_slice(&mut raw, GuestAddress(h)).unwrap();
            let hdr = Header::from_bytes(&raw);
            assert_eq!(
                len as usize,
                HEADER_SIZE + hdr.len as usize,
                "used length disagrees with header"
            );
            let mut data = vec![0u8; hdr.len as usize];
            self.mem.read_slice(&mut data, GuestAddress(d)).unwrap();
            self.received.push_back((hdr, data));
        }
    }

    /// Receive buffers posted and not yet returned.
    pub fn rx_outstanding(&self) -> usize {
        self.rx_bufs.len()
    }

    /// Tx buffers the device has finished with.
    pub fn tx_used(&mut self) -> usize {
        self.tx_ring.used(&self.mem).len()
    }
}

/// A header from the guest side of a connection.
pub fn ghdr(op: u16, guest_port: u32, host_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 256 * 1024,
        ..Header::default()
    }
}
