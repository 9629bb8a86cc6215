//! A clone's private copies of template pages that hold exactly what the
//! template's page holds, handed back so the clone reads the shared page
//! again.
//!
//! A clone maps the template's memory file `MAP_PRIVATE`: the first write
//! to a page gives the clone its own copy, which it keeps. Many writes
//! leave the page as it was (a lock taken and released, a counter up and
//! down, an object allocated and freed again): an idle pod's guest held
//! ~0.4 MiB of such copies out of ~3.2 MiB (docs/clones.md). Dropping a
//! copy with `MADV_DONTNEED` makes the next access read the file's page,
//! which the page cache shares among every clone of the template.
//!
//! A page may only be dropped if nothing writes it between the comparison
//! and the drop, or that write is lost. The search runs with the VM going
//! on; [`drop_unchanged`] compares again and drops with the vCPUs paused
//! and the devices' memory gate closed (`Vm::drop_identical_copies`), and
//! only over the pages the search found, to keep that pause short.
//!
//! A copy that holds only zeros where the template's page holds data (a
//! zeroed allocation in the guest: a kernel stack's unused part, a page
//! table) cannot go back to the file's page; it goes to the kernel's zero
//! page instead, through an anonymous mapping over it
//! ([`map_zero_unchanged`]), under the same pause. The VM remembers those
//! pages, since dropping them again would make them zeros, not the file's.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::RwLockWriteGuard;
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemory as _};

use super::memory::GuestRam;

const PAGE: usize = 4096;
/// `/proc/self/pagemap` entries read at a time (32 KiB).
const PAGEMAP_CHUNK: usize = 4096;
const PM_PRESENT: u64 = 1 << 63;
/// Set for a page of a file or shared anonymous memory: in a `MAP_PRIVATE`
/// file mapping, a page not (yet) copied.
const PM_FILE: u64 = 1 << 61;

/// What a pass found and did, in pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopiesReport {
    /// Private copies in guest memory when the search ran.
    pub private: usize,
    /// Of those, the ones identical to the template's page.
    pub identical: usize,
    /// Dropped: still identical with everything paused.
    pub dropped: usize,
    /// Copies holding only zeros where the template's page does not.
    pub zero: usize,
    /// Of those, put on the zero page: still zeros with everything paused.
    pub zero_mapped: usize,
    /// The comparing under the pause ran into its time budget: pages may
    /// have been left that were still identical or zeros.
    pub budget_used_up: bool,
    /// How long the guest was held: from asking the vCPUs to park to
    /// letting them go.
    pub paused: std::time::Duration,
}

/// What a search over guest memory found, in guest pages (indices from
/// guest-physical 0).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// How many private copies there are (pages already on the zero page
    /// counted only once the guest wrote something else there).
    pub private: usize,
    /// Copies identical to the file's page.
    pub identical: Vec<usize>,
    /// Copies that hold only zeros where the file's page does not: those
    /// can go to the kernel's zero page instead ([`map_zero_unchanged`]).
    pub zero: Vec<usize>,
}

/// Searches the private copies. `on_zero_page` (sorted) are the pages an
/// earlier pass put on the zero page: they are no longer the file's at all,
/// and `MADV_DONTNEED` would make them zeros, not the file's page, so they
/// are never offered again.
pub fn find(ram: &GuestRam, on_zero_page: &[usize]) -> io::Result<Found> {
    let host = host_base(ram)?;
    let pages = ram.size as usize / PAGE;
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut entries = vec![0u8; PAGEMAP_CHUNK * 8];
    let (mut ours, mut theirs) = (vec![0u8; PAGE], vec![0u8; PAGE]);
    let mut found = Found::default();
    let mut first = 0;
    while first < pages {
        let n = PAGEMAP_CHUNK.min(pages - first);
        let buf = &mut entries[..n * 8];
        pagemap.read_exact_at(buf, ((host / PAGE + first) * 8) as u64)?;
        for (i, e) in buf.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().unwrap());
            if e & PM_PRESENT == 0 || e & PM_FILE != 0 {
                continue;
            }
            let page = first + i;
            if on_zero_page.binary_search(&page).is_ok() {
                read_guest_page(ram, page, &mut ours)?;
                found.private += usize::from(!is_zero(&ours));
                continue;
            }
            found.private += 1;
            match compare_with_file(ram, page, &mut ours, &mut theirs)? {
                Compared::Same => found.identical.push(page),
                Compared::ZeroOverData => found.zero.push(page),
                Compared::Different => {}
            }
        }
        first += n;
    }
    Ok(found)
}

/// Drops those of `pages` that are still identical to the file's page,
/// until `stop_at`: the guest waits meanwhile, and on a host short of CPU
/// the pages left over are not worth a longer stall. The caller has paused
/// every vCPU and closed the memory gate (its write guard is the proof
/// asked for), so no write can come between the comparison and the drop.
pub fn drop_unchanged(
    ram: &GuestRam,
    pages: &[usize],
    stop_at: Instant,
    _gate_closed: &RwLockWriteGuard<'_, ()>,
) -> io::Result<usize> {
    let host = host_base(ram)?;
    let (mut ours, mut theirs) = (vec![0u8; PAGE], vec![0u8; PAGE]);
    let mut still = Vec::new();
    for &page in pages {
        if Instant::now() >= stop_at {
            break;
        }
        if let Compared::Same = compare_with_file(ram, page, &mut ours, &mut theirs)? {
            still.push(page);
        }
    }
    // Runs of consecutive pages go in one madvise.
    for_runs(&still, |start, len| dont_need(host, start, len))?;
    Ok(still.len())
}

/// Puts those of `pages` that still hold only zeros on the kernel's zero
/// page, until `stop_at`, under the same conditions as [`drop_unchanged`];
/// returns how many. A `MAP_PRIVATE` file mapping has no way back to zeros
/// but the file's, so each run of pages becomes an anonymous mapping of its
/// own, which reads as zeros and takes a page of memory again only when the
/// guest writes it. Each page is added to `on_zero_page` before it is
/// mapped, so one that may have been is never offered again, even after
/// an error.
pub fn map_zero_unchanged(
    ram: &GuestRam,
    pages: &[usize],
    stop_at: Instant,
    on_zero_page: &mut Vec<usize>,
    _gate_closed: &RwLockWriteGuard<'_, ()>,
) -> io::Result<usize> {
    let host = host_base(ram)?;
    let mut ours = vec![0u8; PAGE];
    let mut still = Vec::new();
    for &page in pages {
        if Instant::now() >= stop_at {
            break;
        }
        read_guest_page(ram, page, &mut ours)?;
        if is_zero(&ours) {
            still.push(page);
        }
    }
    on_zero_page.extend(&still);
    on_zero_page.sort_unstable();
    for_runs(&still, |start, len| zero_map(host, start, len))?;
    Ok(still.len())
}

/// Calls `f(start, len)` for each run of consecutive pages in `pages`
/// (sorted).
fn for_runs(pages: &[usize], mut f: impl FnMut(usize, usize) -> io::Result<()>) -> io::Result<()> {
    let mut run: Option<(usize, usize)> = None;
    for &page in pages {
        run = match run {
            Some((start, len)) if start + len == page => Some((start, len + 1)),
            other => {
                if let Some((start, len)) = other {
                    f(start, len)?;
                }
                Some((page, 1))
            }
        };
    }
    match run {
        Some((start, len)) => f(start, len),
        None => Ok(()),
    }
}

fn host_base(ram: &GuestRam) -> io::Result<usize> {
    let host = ram
        .mem
        .get_host_address(GuestAddress(0))
        .map_err(io::Error::other)? as usize;
    if ram.mem.num_regions() != 1 || !host.is_multiple_of(PAGE) {
        return Err(io::Error::other(
            "guest memory is not one page-aligned region",
        ));
    }
    Ok(host)
}

enum Compared {
    Same,
    /// All zeros in guest memory, not in the file.
    ZeroOverData,
    Different,
}

/// Guest page `page` against what the file holds at the same offset.
fn compare_with_file(
    ram: &GuestRam,
    page: usize,
    ours: &mut [u8],
    theirs: &mut [u8],
) -> io::Result<Compared> {
    read_guest_page(ram, page, ours)?;
    read_file_page(&ram.file, (page * PAGE) as u64, theirs)?;
    Ok(if ours == theirs {
        Compared::Same
    } else if is_zero(ours) {
        Compared::ZeroOverData
    } else {
        Compared::Different
    })
}

/// Through `vm-memory`'s volatile copies: the guest may be writing it.
fn read_guest_page(ram: &GuestRam, page: usize, buf: &mut [u8]) -> io::Result<()> {
    ram.mem
        .read_slice(buf, GuestAddress((page * PAGE) as u64))
        .map_err(io::Error::other)
}

fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

/// A hole, or the part past the end of the file, reads as zeros, as it
/// does through the mapping.
fn read_file_page(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

fn zero_map(host: usize, page: usize, len: usize) -> io::Result<()> {
    // SAFETY: the range is whole pages inside the guest memory mapping
    // (pages from a pagemap walk bounded by its size), which `ram` keeps
    // mapped; MAP_FIXED replaces just those pages, whose bytes are all
    // zeros (checked with every writer paused), with anonymous memory that
    // reads as zeros and is as readable and writable: nothing reading guest
    // memory sees a change. The region's unmapping at the end covers the
    // new mapping with the rest.
    let p = unsafe {
        libc::mmap(
            (host + page * PAGE) as *mut libc::c_void,
            len * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn dont_need(host: usize, page: usize, len: usize) -> io::Result<()> {
    // SAFETY: the range is whole pages inside the guest memory mapping
    // (`page + len` comes from a pagemap walk bounded by its size), which
    // `ram` keeps mapped. MADV_DONTNEED on this MAP_PRIVATE file mapping
    // swaps private copies for the file's pages, equal to them byte for
    // byte (checked with every writer paused): nothing reading guest
    // memory, in Rust or in the guest, sees a change.
    let r = unsafe {
        libc::madvise(
            (host + page * PAGE) as *mut libc::c_void,
            len * PAGE,
            libc::MADV_DONTNEED,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, RwLock};
    use std::time::Duration;

    use crate::vmm::memory;

    /// A 64-page "template" file: page i filled with byte i, pages 40..64
    /// a hole; mapped the way a clone maps it.
    fn clone_of_template() -> (tempfile::NamedTempFile, GuestRam) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        for i in 0..40u8 {
            f.write_all(&[i; PAGE]).unwrap();
        }
        f.as_file().set_len(64 * PAGE as u64).unwrap();
        let ram = memory::map_template(f.path(), None, 64 * PAGE as u64).unwrap();
        (f, ram)
    }

    /// Writes `data` at the start of guest page `page`.
    fn write(ram: &GuestRam, page: usize, data: &[u8]) {
        ram.mem
            .write_slice(data, GuestAddress((page * PAGE) as u64))
            .unwrap();
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn nothing_is_dropped_past_the_deadline() {
        let (_f, ram) = clone_of_template();
        write(&ram, 5, &[5u8; PAGE]);
        let identical = find(&ram, &[]).unwrap().identical;
        assert_eq!(identical, vec![5]);
        let lock = RwLock::new(());
        let past = Instant::now() - Duration::from_millis(1);
        assert_eq!(
            drop_unchanged(&ram, &identical, past, &lock.write().unwrap()).unwrap(),
            0
        );
        assert!(is_private(&ram, 5));
    }

    fn is_private(ram: &GuestRam, page: usize) -> bool {
        let host = host_base(ram).unwrap();
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let mut e = [0u8; 8];
        pagemap
            .read_exact_at(&mut e, ((host / PAGE + page) * 8) as u64)
            .unwrap();
        let e = u64::from_le_bytes(e);
        e & PM_PRESENT != 0 && e & PM_FILE == 0
    }

    #[test]
    fn identical_copies_are_dropped_and_changed_ones_kept_with_their_contents() {
        let (_f, ram) = clone_of_template();
        // Copies that end up as they were: the same bytes written back, a
        // byte changed and restored, a hole page written with zeros.
        write(&ram, 3, &[3u8; PAGE]);
        write(&ram, 7, &[0xaa]);
        write(&ram, 7, &[7]);
        write(&ram, 50, &[0u8; 16]);
        // Copies that differ: from a data page and from a hole.
        write(&ram, 10, &[0xbb; 8]);
        write(&ram, 60, &[0xcc]);
        // Pages only read stay the file's.
        let mut buf = [0u8; 8];
        ram.mem
            .read_slice(&mut buf, GuestAddress(20 * PAGE as u64))
            .unwrap();

        let Found {
            private,
            identical,
            zero,
        } = find(&ram, &[]).unwrap();
        assert_eq!(private, 5);
        assert_eq!(identical, vec![3, 7, 50]);
        assert_eq!(zero, Vec::<usize>::new(), "page 50 is zeros over a hole");
        let lock = RwLock::new(());
        let dropped = drop_unchanged(&ram, &identical, later(), &lock.write().unwrap()).unwrap();
        assert_eq!(dropped, 3);
        for page in [3, 7, 50] {
            assert!(!is_private(&ram, page), "page {page} is still a copy");
        }
        for page in [10, 60] {
            assert!(is_private(&ram, page), "page {page} lost its copy");
        }
        // Every page reads as before.
        for page in 0..64usize {
            let mut got = vec![0u8; PAGE];
            ram.mem
                .read_slice(&mut got, GuestAddress((page * PAGE) as u64))
                .unwrap();
            let mut want = vec![if page < 40 { page as u8 } else { 0 }; PAGE];
            if page == 10 {
                want[..8].fill(0xbb);
            }
            if page == 60 {
                want[0] = 0xcc;
            }
            assert_eq!(got, want, "page {page}");
        }
    }

    #[test]
    fn a_page_changed_after_the_search_is_not_dropped() {
        let (_f, ram) = clone_of_template();
        write(&ram, 5, &[5u8; PAGE]);
        write(&ram, 6, &[6u8; PAGE]);
        let identical = find(&ram, &[]).unwrap().identical;
        assert_eq!(identical, vec![5, 6]);
        // The guest writes page 6 between the search and the pause.
        write(&ram, 6, &[0xdd]);
        let lock = Arc::new(RwLock::new(()));
        let dropped = drop_unchanged(&ram, &identical, later(), &lock.write().unwrap()).unwrap();
        assert_eq!(dropped, 1);
        assert!(!is_private(&ram, 5));
        assert!(is_private(&ram, 6));
        let mut b = [0u8; 2];
        ram.mem
            .read_slice(&mut b, GuestAddress(6 * PAGE as u64))
            .unwrap();
        assert_eq!(b, [0xdd, 6]);
    }

    fn read(ram: &GuestRam, page: usize) -> Vec<u8> {
        let mut got = vec![0u8; PAGE];
        read_guest_page(ram, page, &mut got).unwrap();
        got
    }

    /// [`map_zero_unchanged`] over `pages` as a pass calls it; checks it
    /// mapped `count` and returns the pages it recorded.
    fn zero_map_paused(ram: &GuestRam, pages: &[usize], count: usize) -> Vec<usize> {
        let lock = RwLock::new(());
        let mut on_zero_page = Vec::new();
        let mapped = map_zero_unchanged(
            ram,
            pages,
            later(),
            &mut on_zero_page,
            &lock.write().unwrap(),
        );
        assert_eq!(mapped.unwrap(), count);
        on_zero_page
    }

    #[test]
    fn zero_copies_go_to_the_zero_page_and_are_never_offered_again() {
        let (_f, ram) = clone_of_template();
        // Zeroed over the template's data: 8, 9 (one run) and 12; page 13
        // zeroed but for one byte.
        for page in [8, 9, 12, 13] {
            write(&ram, page, &[0u8; PAGE]);
        }
        write(&ram, 13, &[1]);
        let found = find(&ram, &[]).unwrap();
        assert_eq!(found.zero, vec![8, 9, 12]);
        assert_eq!(found.private, 4);

        let on_zero_page = zero_map_paused(&ram, &found.zero, 3);
        assert_eq!(on_zero_page, vec![8, 9, 12]);
        for page in [8, 9, 12] {
            assert!(!is_private(&ram, page), "page {page} still holds a copy");
            assert_eq!(read(&ram, page), vec![0u8; PAGE], "page {page}");
        }
        // Their neighbours are the file's as before.
        assert_eq!(read(&ram, 10), vec![10u8; PAGE]);
        assert_eq!(read(&ram, 11), vec![11u8; PAGE]);

        // The guest writes one back with the template's bytes: a private
        // page identical to the file's, which MADV_DONTNEED would turn into
        // zeros here. It is counted but not offered.
        write(&ram, 9, &[9u8; PAGE]);
        assert!(is_private(&ram, 9));
        let again = find(&ram, &on_zero_page).unwrap();
        assert_eq!(again.identical, Vec::<usize>::new());
        assert_eq!(again.zero, Vec::<usize>::new());
        assert_eq!(again.private, 2, "pages 9 and 13");
        assert_eq!(read(&ram, 9), vec![9u8; PAGE]);
    }

    #[test]
    fn a_zero_page_written_after_the_search_keeps_its_copy() {
        let (_f, ram) = clone_of_template();
        write(&ram, 4, &[0u8; PAGE]);
        write(&ram, 5, &[0u8; PAGE]);
        let found = find(&ram, &[]).unwrap();
        assert_eq!(found.zero, vec![4, 5]);
        write(&ram, 5, &[0xee]);
        assert_eq!(zero_map_paused(&ram, &found.zero, 1), vec![4]);
        assert!(is_private(&ram, 5));
        assert_eq!(read(&ram, 5)[..2], [0xee, 0]);
    }
}
