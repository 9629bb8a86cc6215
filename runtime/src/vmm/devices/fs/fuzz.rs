//! Hostile FUSE requests on hostile descriptor chains into the virtio-fs
//! server. Whatever the guest puts on the queue, `Backend::handle` returns
//! (a reply length within the chain, or 0), never panics, and nothing
//! outside the share changes: a file beside the share keeps its contents
//! and no new name appears beside it.

use std::path::Path;

use fuse_backend_rs::abi::fuse_abi::{InHeader, InitIn, Opcode};
use proptest::prelude::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const MEM: u64 = 0x10_0000;

/// One request: a header whose fields may lie, and a body.
#[derive(Debug, Clone)]
struct Hostile {
    opcode: u32,
    nodeid: u64,
    /// None: the header's `len` tells the truth.
    len: Option<u32>,
    body: Vec<u8>,
    /// How the request bytes are split into readable descriptors.
    splits: Vec<u16>,
    /// Writable room after them; 0: none at all.
    reply: Vec<u16>,
    /// Put descriptors at addresses past guest memory.
    wild: bool,
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    // Names that matter: the root's parent, separators, the neighbour file.
    let name = prop_oneof![
        Just(b"..".to_vec()),
        Just(b"../outside".to_vec()),
        Just(b"outside".to_vec()),
        Just(b"f".to_vec()),
        Just(b"a/b".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..16),
    ];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..160),
        // A fixed-size argument struct of any opcode, then a NUL-ended name.
        (proptest::collection::vec(any::<u8>(), 0..96), name).prop_map(|(mut a, n)| {
            a.extend_from_slice(&n);
            a.push(0);
            a
        }),
    ]
}

fn hostile() -> impl Strategy<Value = Hostile> {
    (
        prop_oneof![1u32..=52, any::<u32>(), Just(4096u32), Just(4094)],
        prop_oneof![Just(0u64), Just(1), Just(2), Just(3), any::<u64>()],
        proptest::option::weighted(0.2, any::<u32>()),
        body(),
        proptest::collection::vec(1u16..200, 0..3),
        proptest::collection::vec(0u16..600, 0..3),
        proptest::bool::weighted(0.05),
    )
        .prop_map(|(opcode, nodeid, len, body, splits, reply, wild)| Hostile {
            opcode,
            nodeid,
            len,
            body,
            splits,
            reply,
            wild,
        })
}

/// Lays `h` out in guest memory as one chain and serves it.
fn serve(backend: &Backend, mem: &GuestMemory, h: &Hostile, unique: u64) -> u32 {
    let header = InHeader {
        len: h
            .len
            .unwrap_or((std::mem::size_of::<InHeader>() + h.body.len()) as u32),
        opcode: h.opcode,
        unique,
        nodeid: h.nodeid,
        ..Default::default()
    };
    let mut req = header.as_slice().to_vec();
    req.extend_from_slice(&h.body);
    // Readable pieces: the splits, then the rest.
    let mut pieces = Vec::new();
    let mut rest = req.as_slice();
    for s in &h.splits {
        let n = (*s as usize).min(rest.len());
        if n == 0 {
            break;
        }
        pieces.push((rest[..n].to_vec(), false));
        rest = &rest[n..];
    }
    if !rest.is_empty() {
        pieces.push((rest.to_vec(), false));
    }
    for r in &h.reply {
        pieces.push((vec![0xee; *r as usize], true));
    }
    let mut addr = 0x1_0000u64;
    let mut descs = Vec::new();
    for (i, (bytes, writable)) in pieces.iter().enumerate() {
        let at = if h.wild && i == 0 { MEM - 8 } else { addr };
        if at + bytes.len() as u64 <= MEM {
            mem.write_slice(bytes, GuestAddress(at)).unwrap();
        }
        let mut flags = if *writable { VRING_DESC_F_WRITE } else { 0 } as u16;
        if i + 1 < pieces.len() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        descs.push(SplitDescriptor::new(
            at,
            bytes.len() as u32,
            flags,
            (i + 1) as u16,
        ));
        addr += 0x1000;
    }
    if descs.is_empty() {
        return 0;
    }
    let mock = MockSplitQueue::new(mem, 16);
    let raw: Vec<RawDescriptor> = descs.iter().map(|d| RawDescriptor::from(*d)).collect();
    mock.add_desc_chains(&raw, 0).unwrap();
    let mut queue: Queue = mock.create_queue().unwrap();
    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        return 0;
    };
    backend.handle(mem, chain)
}

fn init(backend: &Backend, mem: &GuestMemory) {
    let h = Hostile {
        opcode: Opcode::Init as u32,
        nodeid: 0,
        len: None,
        body: InitIn {
            major: 7,
            minor: 33,
            max_readahead: 0,
            flags: 0,
        }
        .as_slice()
        .to_vec(),
        splits: vec![],
        reply: vec![0x1000],
        wild: false,
    };
    assert!(serve(backend, mem, &h, 1) > 0, "INIT got no reply");
}

/// Names beside the share, and the neighbour file's contents.
fn outside(dir: &Path) -> (Vec<std::ffi::OsString>, Vec<u8>) {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    (names, std::fs::read(dir.join("outside")).unwrap())
}

proptest! {
    #[test]
    fn fuzz_fs_requests_stay_in_the_share_and_never_panic(
        requests in proptest::collection::vec(hostile(), 1..6),
    ) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("outside"), b"host only").unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        std::fs::write(share.join("f"), b"in the share").unwrap();
        std::fs::create_dir(share.join("d")).unwrap();
        let before = outside(dir.path());

        let window = Arc::new(DaxWindow::new(8 << 20).unwrap());
        let fs = Fs::with_share("fuzz", &share, Arc::default(), Some(window)).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        init(&fs.backend, &mem);
        for (i, h) in requests.iter().enumerate() {
            let room: u64 = h.reply.iter().map(|r| u64::from(*r)).sum();
            let used = serve(&fs.backend, &mem, h, 2 + i as u64);
            prop_assert!(u64::from(used) <= room, "reply of {used} bytes in {room} of room");
        }
        prop_assert_eq!(outside(dir.path()), before);
    }
}
