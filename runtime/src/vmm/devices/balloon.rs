//! virtio-balloon (device type 5), for free page reporting only.
//!
//! A clone's guest memory is the template's file mapped copy-on-write:
//! every page the guest writes becomes the pod's own, and stays its own
//! after the guest frees it (a container's processes exit, the create's
//! helper processes are gone). With `VIRTIO_BALLOON_F_REPORTING` the guest
//! kernel hands such free pages to the device in batches (a scatterlist of
//! up to 32 page ranges on the reporting queue) and does not touch them
//! until the device gives the batch back. The device then drops them:
//!
//! - in a clone ([`FreedPages::DropCopies`]), `MADV_DONTNEED` on the private
//!   mapping: the private copy is freed and the page is the template's
//!   again, shared with every sibling (a free page's contents are not the
//!   guest's concern; the driver asks for no zeroing or poison value);
//! - in a VM that owns its memory file ([`FreedPages::PunchHoles`], a boot,
//!   a template being built), `MADV_REMOVE` punches the pages out of the
//!   memfd: the host gets them back, and a template saved later has holes
//!   there (read as zeros, stored as nothing).
//!
//! The balloon itself never inflates: `num_pages` stays 0, so the inflate
//! and deflate queues carry nothing; a chain the guest puts there anyway is
//! given back untouched and counted.
//!
//! No worker thread: reports are rare (the guest batches them and waits at
//! least two seconds between rounds), so the queue is served on the vCPU
//! that wrote QueueNotify ([`VirtioDevice::serves_queues_inline`]), which
//! costs the pod no thread and no stack.
//!
//! Every range the guest reports is checked: page-aligned, inside guest
//! RAM. A bad one is skipped and counted; it can only cost the guest its
//! own pages' contents, which a driver that reports a page it uses loses
//! anyway.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use log::{debug, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddress, GuestMemory as _};

use super::guest_errors::{guest_warn, GuestErrors};
use super::{
    ActiveQueue, DeviceError, GuestMemory, IrqLine, QueuePosition, VirtioDevice,
    VIRTIO_MMIO_INT_VRING,
};

/// Virtio device ID of a memory balloon (virtio 1.2, 5.5).
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// The device wants free page reports (virtio 1.2, 5.5.3).
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;
/// inflateq, deflateq, reporting_vq. Without STATS_VQ and FREE_PAGE_HINT
/// (not offered) the Linux driver numbers the reporting queue 2: it skips
/// absent queues when it assigns indices, as QEMU and Cloud Hypervisor do.
const QUEUE_SIZES: [u16; 3] = [32, 32, 32];
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const REPORTING: usize = 2;
/// The page size the guest reports in (x86-64).
const PAGE_SIZE: u64 = 4096;
const DEVICE: &str = "virtio-balloon";

/// How a VM gives up pages its guest reported free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreedPages {
    /// Guest RAM is the VM's own memfd, mapped shared: punch the pages out
    /// of the file.
    PunchHoles,
    /// Guest RAM is a template file mapped private: drop the private
    /// copies, so the template's pages show through again.
    DropCopies,
}

impl FreedPages {
    fn advice(self) -> libc::c_int {
        match self {
            FreedPages::PunchHoles => libc::MADV_REMOVE,
            FreedPages::DropCopies => libc::MADV_DONTNEED,
        }
    }
}

/// Free page reports the guest made, and the bytes they gave back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FreePageReports {
    pub reports: u64,
    pub bytes: u64,
}

/// What the device did, for tests and the VMM's report.
#[derive(Debug, Default)]
pub struct BalloonCounters {
    /// Report batches given back to the guest.
    pub reports: AtomicU64,
    /// Bytes of reported pages dropped.
    pub bytes_dropped: AtomicU64,
    /// Reported ranges refused: not page-aligned, outside guest RAM, or
    /// the host refused the advice.
    pub ranges_refused: AtomicU64,
    /// Chains on the inflate or deflate queue (given back untouched).
    pub balloon_chains: AtomicU64,
    /// Rings the guest made unusable.
    pub guest_errors: GuestErrors,
}

/// The virtio-balloon device.
pub struct Balloon {
    freed: FreedPages,
    acked_features: u64,
    /// The driver's `actual` (pages it holds in the balloon; always 0 from
    /// a driver that follows `num_pages`).
    actual: u32,
    counters: Arc<BalloonCounters>,
    active: Option<Active>,
}

struct Active {
    mem: GuestMemory,
    irq: Arc<IrqLine>,
    queues: [ActiveQueue; 3],
}

impl Balloon {
    pub fn new(freed: FreedPages) -> Balloon {
        Balloon {
            freed,
            acked_features: 0,
            actual: 0,
            counters: Arc::default(),
            active: None,
        }
    }

    pub fn counters(&self) -> Arc<BalloonCounters> {
        Arc::clone(&self.counters)
    }

    /// Serves every chain waiting on queue `index`.
    fn serve(&mut self, index: usize) {
        let freed = self.freed;
        let counters = Arc::clone(&self.counters);
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Active { mem, irq, queues } = active;
        let queue = &mut queues[index].queue;
        if !queue.ready() {
            return;
        }
        let mut used_any = false;
        let mut empty_passes = 0;
        loop {
            let mut popped = false;
            while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
                popped = true;
                let head = chain.head_index();
                if index == REPORTING {
                    drop_reported(mem, chain, freed, &counters);
                    counters.reports.fetch_add(1, Ordering::Relaxed);
                } else {
                    counters.balloon_chains.fetch_add(1, Ordering::Relaxed);
                    debug!(
                        "{DEVICE}: ignoring a chain on queue {index} (the balloon never inflates)"
                    );
                }
                if let Err(e) = queue.add_used(&*mem, head, 0) {
                    guest_warn!(
                        counters.guest_errors,
                        "{DEVICE}: queue {index}: used ring: {e}"
                    );
                    return;
                }
                used_any = true;
            }
            empty_passes = if popped { 0 } else { empty_passes + 1 };
            // A chain published just before notifications came back on is
            // served now rather than at the next kick; a second empty pass
            // means the available index is bogus and would spin forever.
            match queue.enable_notification(&*mem) {
                Ok(true) if empty_passes < 2 => continue,
                Ok(_) => break,
                Err(e) => {
                    guest_warn!(counters.guest_errors, "{DEVICE}: queue {index}: {e}");
                    break;
                }
            }
        }
        if used_any && queue.needs_notification(&*mem).unwrap_or(true) {
            if let Err(e) = irq.trigger(VIRTIO_MMIO_INT_VRING) {
                warn!("{DEVICE}: interrupt: {e}");
            }
        }
    }
}

/// Drops every page range of one report; bad ranges are skipped.
fn drop_reported(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    freed: FreedPages,
    counters: &BalloonCounters,
) {
    for desc in chain {
        let (addr, len) = (desc.addr().0, u64::from(desc.len()));
        match drop_range(mem, addr, len, freed) {
            Ok(()) => {
                counters.bytes_dropped.fetch_add(len, Ordering::Relaxed);
            }
            Err(cause) => {
                counters.ranges_refused.fetch_add(1, Ordering::Relaxed);
                guest_warn!(
                    counters.guest_errors,
                    "{DEVICE}: reported range {addr:#x}+{len:#x} refused: {cause}"
                );
            }
        }
    }
}

fn drop_range(mem: &GuestMemory, addr: u64, len: u64, freed: FreedPages) -> Result<(), String> {
    if len == 0 || !addr.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err("not whole pages".into());
    }
    let count = usize::try_from(len).map_err(|_| "too long".to_string())?;
    let slice = mem
        .get_slice(GuestAddress(addr), count)
        .map_err(|e| format!("not guest RAM: {e}"))?;
    let ptr = slice.ptr_guard_mut().as_ptr();
    // SAFETY: [ptr, ptr+len) lies inside one guest RAM mapping (checked by
    // get_slice), page-aligned because the mapping is and the range is.
    // Dropping it changes only what the guest reads there next: the
    // template's page or zeros, never memory of the VMM's own. Devices
    // reach guest memory through vm-memory's volatile accessors only, so
    // no Rust reference to these bytes exists.
    let rc = unsafe { libc::madvise(ptr.cast(), count, freed.advice()) };
    if rc != 0 {
        return Err(format!("madvise: {}", io::Error::last_os_error()));
    }
    Ok(())
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn free_page_reports(&self) -> FreePageReports {
        FreePageReports {
            reports: self.counters.reports.load(Ordering::Relaxed),
            bytes: self.counters.bytes_dropped.load(Ordering::Relaxed),
        }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BALLOON_F_REPORTING)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    /// `num_pages` (always 0) and `actual` (what the driver wrote).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[4..].copy_from_slice(&self.actual.to_le_bytes());
        super::read_config_space(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.len() == 4 {
            self.actual = u32::from_le_bytes(data.try_into().expect("4 bytes"));
        } else {
            debug!(
                "{DEVICE}: ignoring {}-byte config space write at {offset:#x}",
                data.len()
            );
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        irq: Arc<IrqLine>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), DeviceError> {
        let queues = super::activation_queues(DEVICE, self.active.is_some(), queues)?;
        self.active = Some(Active { mem, irq, queues });
        // A restored clone may find a report its template's guest had
        // queued but not yet announced.
        for index in [INFLATE, DEFLATE, REPORTING] {
            self.serve(index);
        }
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.acked_features = 0;
        self.actual = 0;
        true
    }

    fn serves_queues_inline(&self) -> bool {
        true
    }

    fn queue_notify(&mut self, index: u32) {
        match usize::try_from(index) {
            Ok(i) if i < QUEUE_SIZES.len() => self.serve(i),
            _ => debug!("{DEVICE}: notify for absent queue {index}"),
        }
    }

    fn pause(&mut self) -> Result<Vec<QueuePosition>, DeviceError> {
        // Served on the vCPUs, which have stopped: nothing is in flight.
        let active = self.active.take().ok_or_else(|| DeviceError::NotQuiet {
            device: DEVICE,
            cause: "the device is not active".into(),
        })?;
        Ok(active
            .queues
            .iter()
            .map(|q| QueuePosition::of(&q.queue))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::unix::fs::MetadataExt;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    use crate::vmm::memory;

    /// Rings of the three queues, then the pages the tests report.
    const RINGS: [u64; 3] = [0x0, 0x1_0000, 0x2_0000];
    const PAGES: u64 = 0x10_0000;
    const MEM_SIZE: u64 = 32 << 20;

    struct Rig<'m> {
        dev: Balloon,
        irq: Arc<IrqLine>,
        queues: Vec<MockSplitQueue<'m, GuestMemory>>,
    }

    fn rig(mem: &GuestMemory, freed: FreedPages) -> Rig<'_> {
        let queues: Vec<_> = RINGS
            .iter()
            .map(|&a| MockSplitQueue::create(mem, GuestAddress(a), 32))
            .collect();
        let active = queues
            .iter()
            .map(|m| ActiveQueue {
                queue: m.create_queue().unwrap(),
                notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            })
            .collect();
        let irq = Arc::new(IrqLine::new(5).unwrap());
        let mut dev = Balloon::new(freed);
        dev.set_acked_features(dev.avail_features());
        dev.activate(mem.clone(), irq.clone(), active).unwrap();
        Rig { dev, irq, queues }
    }

    /// Posts one report (or inflate request) as a chain of write-only
    /// descriptors, as the Linux driver's `virtqueue_add_inbuf` does.
    fn post(q: &MockSplitQueue<'_, GuestMemory>, ranges: &[(u64, u32)]) {
        let raw: Vec<RawDescriptor> = ranges
            .iter()
            .enumerate()
            .map(|(i, &(addr, len))| {
                let mut flags = VRING_DESC_F_WRITE as u16;
                if i + 1 < ranges.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, (i + 1) as u16))
            })
            .collect();
        q.add_desc_chains(&raw, 0).unwrap();
    }

    fn used(q: &MockSplitQueue<'_, GuestMemory>) -> Vec<(u32, u32)> {
        let n = q.used().idx().load();
        (0..n)
            .map(|i| {
                let e = q.used().ring().ref_at(i as usize).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    fn page(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        let mut b = vec![0u8; PAGE_SIZE as usize];
        mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    fn fill(mem: &GuestMemory, addr: u64, len: u64, byte: u8) {
        mem.write_slice(&vec![byte; len as usize], GuestAddress(addr))
            .unwrap();
    }

    #[test]
    fn a_report_in_a_clone_drops_its_copies_and_the_template_shows_through() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![0x7e; MEM_SIZE as usize]).unwrap();
        drop(f);
        let ram = memory::map_template(&path, None, MEM_SIZE).unwrap();
        let mem = &ram.mem;
        // The clone writes three pages; the guest frees the first two.
        fill(mem, PAGES, 3 * PAGE_SIZE, 0xaa);
        let mut r = rig(mem, FreedPages::DropCopies);
        post(&r.queues[REPORTING], &[(PAGES, 2 * PAGE_SIZE as u32)]);
        r.dev.queue_notify(REPORTING as u32);

        assert_eq!(used(&r.queues[REPORTING]), vec![(0, 0)]);
        assert_eq!(page(mem, PAGES), vec![0x7e; 4096], "copy not dropped");
        assert_eq!(page(mem, PAGES + PAGE_SIZE), vec![0x7e; 4096]);
        assert_eq!(page(mem, PAGES + 2 * PAGE_SIZE), vec![0xaa; 4096]);
        assert_eq!(std::fs::read(&path).unwrap()[PAGES as usize], 0x7e);
        let c = r.dev.counters();
        assert_eq!(c.bytes_dropped.load(Ordering::Relaxed), 2 * PAGE_SIZE);
        assert_eq!(c.reports.load(Ordering::Relaxed), 1);
        assert_ne!(r.irq.status() & VIRTIO_MMIO_INT_VRING, 0, "no interrupt");
    }

    #[test]
    fn a_report_in_a_vm_that_owns_its_memory_punches_the_pages_out_of_the_file() {
        let ram = memory::create((MEM_SIZE >> 20) as u32).unwrap();
        let mem = &ram.mem;
        fill(mem, PAGES, 64 * PAGE_SIZE, 0xaa);
        let mut r = rig(mem, FreedPages::PunchHoles);
        let before = ram.file.metadata().unwrap().blocks();
        post(
            &r.queues[REPORTING],
            &[
                (PAGES, 32 * PAGE_SIZE as u32),
                (PAGES + 40 * PAGE_SIZE, 4096),
            ],
        );
        r.dev.queue_notify(REPORTING as u32);

        let after = ram.file.metadata().unwrap().blocks();
        assert_eq!(
            before - after,
            33 * PAGE_SIZE / 512,
            "blocks {before} -> {after}"
        );
        assert_eq!(page(mem, PAGES), vec![0; 4096]);
        assert_eq!(page(mem, PAGES + 40 * PAGE_SIZE), vec![0; 4096]);
        assert_eq!(page(mem, PAGES + 32 * PAGE_SIZE), vec![0xaa; 4096]);
    }

    #[test]
    fn ranges_that_are_not_whole_pages_of_guest_ram_are_refused_and_the_report_completes() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        fill(&mem, PAGES, 4 * PAGE_SIZE, 0xaa);
        let mut r = rig(&mem, FreedPages::DropCopies);
        post(
            &r.queues[REPORTING],
            &[
                (PAGES + 8, 4096),
                (PAGES + PAGE_SIZE, 100),
                (MEM_SIZE - PAGE_SIZE, 2 * 4096),
                (PAGES + 2 * PAGE_SIZE, 0),
            ],
        );
        r.dev.queue_notify(REPORTING as u32);

        assert_eq!(used(&r.queues[REPORTING]), vec![(0, 0)]);
        let c = r.dev.counters();
        assert_eq!(c.ranges_refused.load(Ordering::Relaxed), 4);
        assert_eq!(c.bytes_dropped.load(Ordering::Relaxed), 0);
        for i in 0..4 {
            assert_eq!(page(&mem, PAGES + i * PAGE_SIZE), vec![0xaa; 4096]);
        }
    }

    #[test]
    fn the_balloon_never_inflates_and_gives_back_what_the_guest_puts_there() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        fill(&mem, PAGES, PAGE_SIZE, 0xaa);
        let mut r = rig(&mem, FreedPages::DropCopies);
        let mut num_pages = [0xffu8; 4];
        r.dev.read_config(0, &mut num_pages);
        assert_eq!(num_pages, [0; 4]);
        // An inflate request naming PFN 0x100 (PAGES): not acted on.
        mem.write_obj((PAGES >> 12) as u32, GuestAddress(PAGES + 0x800))
            .unwrap();
        post(&r.queues[INFLATE], &[(PAGES + 0x800, 4)]);
        r.dev.queue_notify(INFLATE as u32);
        assert_eq!(used(&r.queues[INFLATE]), vec![(0, 0)]);
        assert_eq!(page(&mem, PAGES)[..0x800], [0xaa; 0x800]);
        r.dev.write_config(4, &7u32.to_le_bytes());
        let mut actual = [0u8; 4];
        r.dev.read_config(4, &mut actual);
        assert_eq!(u32::from_le_bytes(actual), 7);
    }

    #[test]
    fn a_paused_balloon_says_where_its_queues_stood() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let mut r = rig(&mem, FreedPages::DropCopies);
        post(&r.queues[REPORTING], &[(PAGES, 4096)]);
        r.dev.queue_notify(REPORTING as u32);
        let pos = r.dev.pause().unwrap();
        assert_eq!(
            pos[REPORTING],
            QueuePosition {
                next_avail: 1,
                next_used: 1
            }
        );
        assert!(r.dev.pause().is_err(), "a paused device paused twice");
    }

    fn hostile_range() -> impl proptest::strategy::Strategy<Value = (u64, u32)> {
        use proptest::prelude::*;
        (
            prop_oneof![
                (0u64..64).prop_map(|p| PAGES + p * PAGE_SIZE),
                PAGES..MEM_SIZE + 0x10000,
                Just(MEM_SIZE - PAGE_SIZE),
                any::<u64>(),
            ],
            prop_oneof![
                (1u32..8).prop_map(|n| n * PAGE_SIZE as u32),
                any::<u32>(),
                Just(0),
            ],
        )
    }

    proptest::proptest! {
        /// Hostile reports: every report is given back, never a panic, and
        /// exactly the pages of accepted ranges are dropped (read as zeros
        /// on anonymous memory); every other byte keeps its value.
        #[test]
        fn fuzz_balloon_reports_drop_only_whole_pages_of_guest_ram(
            ranges in proptest::collection::vec(hostile_range(), 1..6),
        ) {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
                .unwrap();
            fill(&mem, PAGES, 72 * PAGE_SIZE, 0xaa);
            let mut r = rig(&mem, FreedPages::DropCopies);
            post(&r.queues[REPORTING], &ranges);
            r.dev.queue_notify(REPORTING as u32);
            proptest::prop_assert_eq!(used(&r.queues[REPORTING]), vec![(0, 0)]);
            // A chain ends where its lengths pass 2^32 bytes in all
            // (virtio 1.2, 2.7.5.2; virtio-queue stops there).
            let mut total = 0u64;
            let walked: Vec<(u64, u32)> = ranges
                .iter()
                .take_while(|&&(_, len)| {
                    total += u64::from(len);
                    total <= u64::from(u32::MAX)
                })
                .copied()
                .collect();
            let accepted = |a: u64| {
                walked.iter().any(|&(addr, len)| {
                    let len = u64::from(len);
                    len > 0
                        && addr.is_multiple_of(PAGE_SIZE)
                        && len.is_multiple_of(PAGE_SIZE)
                        && addr.checked_add(len).is_some_and(|end| end <= MEM_SIZE)
                        && (addr..addr + len).contains(&a)
                })
            };
            for p in 0..72 {
                let a = PAGES + p * PAGE_SIZE;
                let want = if accepted(a) { 0 } else { 0xaa };
                let got = page(&mem, a);
                proptest::prop_assert!(
                    got.iter().all(|&b| b == want),
                    "page {:#x}: want all {:#x}, got {:#x}.. (dropped {} bytes, refused {})",
                    a,
                    want,
                    got[0],
                    r.dev.counters().bytes_dropped.load(Ordering::Relaxed),
                    r.dev.counters().ranges_refused.load(Ordering::Relaxed),
                );
            }
        }
    }
}
