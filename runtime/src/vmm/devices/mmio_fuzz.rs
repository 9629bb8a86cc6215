//! Hostile virtio-mmio input: a guest writing any register with any value
//! in any order, and a saved transport state (part of a template's
//! `state.json`) edited by whoever could write the template store. Real
//! devices (virtio-blk on a file, virtio-net unattached, virtio-vsock on a
//! socket path) behind the transport, with their real worker threads, and
//! the balloon, which serves its queues inline on the caller. The
//! transport must never panic, must keep the device's own queue limits and
//! features whatever it is told, and a reset must always leave a
//! configurable device.

use std::path::Path;

use jevm_protocol::fuzzing::mutated;
use proptest::prelude::*;
use vm_memory::GuestMemoryMmap;

use super::*;
use crate::vmm::devices::balloon::{Balloon, FreedPages};
use crate::vmm::devices::block::Block;
use crate::vmm::devices::fs::{DaxWindow, Fs, FuseSession};
use crate::vmm::devices::net::Net;
use crate::vmm::devices::vsock::Vsock;

const MEM_SIZE: u64 = 0x10_0000;

/// Which real device sits behind the transport.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Balloon,
    Block,
    Fs,
    Net,
    Vsock,
}

fn device(kind: Kind, dir: &Path) -> Box<dyn VirtioDevice> {
    match kind {
        Kind::Balloon => Box::new(Balloon::new(FreedPages::DropCopies)),
        Kind::Block => {
            let disk = dir.join("disk.img");
            std::fs::write(&disk, vec![0u8; 8192]).unwrap();
            Box::new(Block::new(&disk, false).unwrap())
        }
        Kind::Fs => {
            let share = dir.join("share");
            std::fs::create_dir_all(&share).unwrap();
            let window = std::sync::Arc::new(DaxWindow::new(2 << 20).unwrap());
            Box::new(Fs::with_share("fuzz", &share, Default::default(), Some(window)).unwrap())
        }
        Kind::Net => Box::new(Net::unattached()),
        Kind::Vsock => Box::new(Vsock::new(3, dir.join("vsock.sock")).unwrap()),
    }
}

fn memory() -> GuestMemory {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn transport(kind: Kind, dir: &Path) -> MmioTransport {
    let irq = Arc::new(IrqLine::new(5).unwrap());
    MmioTransport::new(device(kind, dir), memory(), irq).unwrap()
}

fn w(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

fn r(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// What a Linux driver does: negotiate everything offered, set up every
/// queue in guest memory (64 entries or the device's limit), DRIVER_OK.
fn bring_up(t: &mut MmioTransport) {
    let features = t.device().avail_features();
    w(t, REG_STATUS, S_ACKNOWLEDGE);
    w(t, REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    for (sel, word) in [(0, features as u32), (1, (features >> 32) as u32)] {
        w(t, REG_DRIVER_FEATURES_SEL, sel);
        w(t, REG_DRIVER_FEATURES, word);
    }
    w(t, REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    let queues = t.device().queue_max_sizes().len() as u64;
    for q in 0..queues {
        let base = 0x1_0000 + q * 0x1_0000;
        w(t, REG_QUEUE_SEL, q as u32);
        let max = r(t, REG_QUEUE_NUM_MAX);
        w(t, REG_QUEUE_NUM, max.min(64));
        w(t, REG_QUEUE_DESC_LOW, base as u32);
        w(t, REG_QUEUE_DRIVER_LOW, (base + 0x4000) as u32);
        w(t, REG_QUEUE_DEVICE_LOW, (base + 0x8000) as u32);
        w(t, REG_QUEUE_READY, 1);
    }
    w(
        t,
        REG_STATUS,
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
}

/// What holds whatever the guest or the saved state said.
fn check_invariants(t: &mut MmioTransport) -> Result<(), TestCaseError> {
    prop_assert_eq!(r(t, REG_MAGIC_VALUE), MMIO_MAGIC_VALUE);
    let max_sizes = t.device().queue_max_sizes().to_vec();
    let offered = t.device().avail_features();
    let st = t.state().clone();
    prop_assert_eq!(st.queues.len(), max_sizes.len());
    for (q, max) in st.queues.iter().zip(&max_sizes) {
        prop_assert_eq!(q.max_size, *max, "a queue's limit is the device's");
    }
    prop_assert_eq!(
        st.acked_features & !offered,
        0,
        "features the device never offered"
    );
    if st.activated {
        prop_assert!(st.status & S_DRIVER_OK != 0, "active without DRIVER_OK");
    }
    Ok(())
}

/// A reset must leave the device as new, ready to be brought up again.
fn reset_and_check(t: &mut MmioTransport) -> Result<(), TestCaseError> {
    w(t, REG_STATUS, 0);
    if t.state().status & S_NEEDS_RESET != 0 {
        // The device refused the reset (its worker still runs): the
        // transport stays broken rather than hand the rings out twice.
        prop_assert!(t.state().activated);
        return Ok(());
    }
    prop_assert_eq!(t.state().status, 0);
    prop_assert!(!t.state().activated);
    prop_assert!(t
        .state()
        .queues
        .iter()
        .all(|q| !q.ready && q.size == q.max_size && q.desc_table == 0));
    bring_up(t);
    prop_assert!(t.state().activated, "a clean bring-up after reset failed");
    check_invariants(t)?;
    w(t, REG_STATUS, 0);
    Ok(())
}

#[derive(Debug, Clone)]
enum Op {
    Read(u64, usize),
    Write(u64, usize, u64),
    BringUp,
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => prop::sample::select(vec![
            REG_DEVICE_FEATURES_SEL,
            REG_DRIVER_FEATURES,
            REG_DRIVER_FEATURES_SEL,
            REG_QUEUE_SEL,
            REG_QUEUE_NUM_MAX,
            REG_QUEUE_NUM,
            REG_QUEUE_READY,
            REG_QUEUE_NOTIFY,
            REG_INTERRUPT_STATUS,
            REG_INTERRUPT_ACK,
            REG_STATUS,
            REG_QUEUE_DESC_LOW,
            REG_QUEUE_DESC_HIGH,
            REG_QUEUE_DRIVER_LOW,
            REG_QUEUE_DRIVER_HIGH,
            REG_QUEUE_DEVICE_LOW,
            REG_QUEUE_DEVICE_HIGH,
            REG_SHM_SEL,
            REG_CONFIG_GENERATION,
        ]),
        1 => 0u64..0x1100,
    ]
}

fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => prop::sample::select(vec![
            0u64, 1, 2, 3, 7, 11, 15, 0x40, 0x80, 0x8f, 16, 64, 256, 1024, 0x1_0000,
            0x1_4000, 0x1_8000, MEM_SIZE - 1, MEM_SIZE, 0xffff_ffff,
        ]),
        1 => any::<u64>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let len = prop::sample::select(vec![1usize, 2, 4, 4, 4, 8]);
    prop_oneof![
        1 => (offset(), len.clone()).prop_map(|(o, l)| Op::Read(o, l)),
        6 => (offset(), len, value()).prop_map(|(o, l, v)| Op::Write(o, l, v)),
        1 => Just(Op::BringUp),
    ]
}

fn kind() -> impl Strategy<Value = Kind> {
    prop::sample::select(vec![
        Kind::Balloon,
        Kind::Block,
        Kind::Fs,
        Kind::Net,
        Kind::Vsock,
    ])
}

/// A saved state of `kind` as a running device leaves it (activated, queues
/// in memory; virtio-blk is never in a template, so it has none), as JSON: the seed the byte-level mutations start from.
fn saved_seed(kind: Kind) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mut t = transport(kind, dir.path());
    bring_up(&mut t);
    assert!(t.state().activated);
    let saved = t.save().unwrap();
    serde_json::to_vec(&saved).unwrap()
}

fn queue_state() -> impl Strategy<Value = MmioQueueState> {
    (
        prop_oneof![Just(256u16), Just(128), any::<u16>()],
        prop_oneof![Just(64u16), any::<u16>()],
        any::<bool>(),
        value(),
        value(),
        value(),
    )
        .prop_map(
            |(max_size, size, ready, desc_table, avail_ring, used_ring)| MmioQueueState {
                max_size,
                size,
                ready,
                desc_table,
                avail_ring,
                used_ring,
            },
        )
}

/// Saved states built field by field, most of them plausible.
fn saved_state() -> impl Strategy<Value = MmioDeviceState> {
    (
        prop_oneof![Just(2u32), Just(1), Just(19), Just(26), any::<u32>()],
        (any::<u32>(), any::<u32>(), any::<u64>(), 0u32..4),
        prop_oneof![Just(15u32), Just(0x4f), any::<u32>()],
        any::<bool>(),
        prop::collection::vec(queue_state(), 0..4),
        any::<u32>(),
        prop::collection::vec((any::<u16>(), any::<u16>()), 0..4),
        prop::option::of((any::<u32>(), any::<u32>(), any::<u64>())),
    )
        .prop_map(
            |(device_type, (dfs, drfs, acked, qsel), status, activated, queues, isr, pos, fuse)| {
                MmioDeviceState {
                    device_type,
                    transport: MmioState {
                        device_features_sel: dfs,
                        driver_features_sel: drfs,
                        acked_features: acked,
                        queue_sel: qsel,
                        status,
                        config_generation: 0,
                        activated,
                        queues,
                        shm_sel: qsel.rotate_left(16),
                    },
                    interrupt_status: isr,
                    queues: pos
                        .into_iter()
                        .map(|(next_avail, next_used)| QueuePosition {
                            next_avail,
                            next_used,
                        })
                        .collect(),
                    device: fuse.map(|(major, minor, flags)| {
                        SavedDeviceState::Fs(FuseSession {
                            major,
                            minor,
                            flags,
                        })
                    }),
                }
            },
        )
}

/// Restores `saved` onto a fresh device of `kind`: refused with an error
/// naming the device type, or a transport that keeps every invariant and
/// resets cleanly.
fn restore_checked(kind: Kind, saved: &MmioDeviceState) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let irq = Arc::new(IrqLine::new(5).unwrap());
    match MmioTransport::restore(device(kind, dir.path()), memory(), irq, saved) {
        Ok(mut t) => {
            check_invariants(&mut t)?;
            reset_and_check(&mut t)?;
        }
        Err(e) => prop_assert!(e.to_string().contains("device type"), "{e}"),
    }
    Ok(())
}

proptest! {
    #[test]
    fn fuzz_mmio_register_accesses_keep_the_transport_sound(
        kind in kind(),
        ops in prop::collection::vec(op(), 1..48),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut t = transport(kind, dir.path());
        for op in ops {
            match op {
                Op::Read(o, len) => {
                    let mut b = vec![0u8; len];
                    t.read(o, &mut b);
                }
                Op::Write(o, len, v) => t.write(o, &v.to_le_bytes()[..len]),
                Op::BringUp => bring_up(&mut t),
            }
            check_invariants(&mut t)?;
        }
        reset_and_check(&mut t)?;
    }

    #[test]
    fn fuzz_mmio_restore_of_an_edited_saved_state(
        kind in kind(),
        bytes in mutated(
            vec![
                saved_seed(Kind::Balloon),
                saved_seed(Kind::Fs),
                saved_seed(Kind::Net),
                saved_seed(Kind::Vsock),
            ],
            256,
        ),
    ) {
        if let Ok(saved) = serde_json::from_slice::<MmioDeviceState>(&bytes) {
            restore_checked(kind, &saved)?;
        }
    }

    #[test]
    fn fuzz_mmio_restore_of_a_made_up_saved_state(
        kind in kind(),
        saved in saved_state(),
    ) {
        restore_checked(kind, &saved)?;
    }
}
