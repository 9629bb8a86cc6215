//! The real guest side effects behind [`Guest`], plus power-off.

use crate::handler::Guest;
use crate::network::NetworkError;
use crate::vsock::{VsockStream, HOST_CID};
use jevm_protocol::Network;
use log::{error, info};
use nix::sys::time::TimeSpec;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// How long a `DialHost` waits for the host to take or answer data.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the RNG ioctls go (`/dev/random` takes them as well).
const RNG_DEVICE: &str = "/dev/urandom";

/// `_IOW('R', 0x03, int[2])`: the encoded size covers only the two-int
/// header of `struct rand_pool_info`; the bytes follow it.
const RNDADDENTROPY: libc::Ioctl =
    nix::request_code_write!(b'R', 0x03, std::mem::size_of::<[libc::c_int; 2]>());

/// `_IO('R', 0x07)`, Linux 4.17+.
const RNDRESEEDCRNG: libc::Ioctl = nix::request_code_none!(b'R', 0x07);

pub struct System {
    pid1: bool,
    /// `WriteFile` creates missing files only below this directory, so a
    /// typo in a device path fails instead of leaving a regular file in /dev.
    creatable_root: PathBuf,
    /// Whether this agent mounted the share; a clone inherits its
    /// template's answer. The lock also keeps a mount and an unmount apart.
    share_mounted: Mutex<bool>,
}

impl System {
    pub fn new(pid1: bool) -> Self {
        Self {
            pid1,
            creatable_root: PathBuf::from("/tmp"),
            share_mounted: Mutex::new(false),
        }
    }

    #[cfg(test)]
    pub fn with_creatable_root(mut self, root: &Path) -> Self {
        self.creatable_root = root.to_path_buf();
        self
    }

    /// Writes every file system's dirty data out: for the share, to the
    /// host (shared writable mappings of its files are the only data a
    /// guest holds back; its writes go through).
    pub fn sync(&self) {
        nix::unistd::sync();
    }

    /// Flushes file systems and stops the VM. Returns only if that failed.
    /// Outside PID 1 (development) the process exits instead.
    pub fn power_off(&self) {
        if !self.pid1 {
            info!("shutdown requested; not PID 1, so exiting instead of rebooting");
            std::process::exit(0);
        }
        nix::unistd::sync();
        // RB_AUTOBOOT, not power-off: there is no ACPI, and with `reboot=t`
        // on the command line the reset is a triple fault the VMM sees as
        // the guest stopping.
        match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT) {
            Ok(never) => match never {},
            Err(e) => error!("reboot: {e}"),
        }
    }
}

/// Lexical only: symlinks are not followed, which is enough for a guard
/// against accidents, the host being trusted anyway.
fn is_below(path: &Path, root: &Path) -> bool {
    path.is_absolute()
        && path != root
        && path.starts_with(root)
        && !path.components().any(|c| c == Component::ParentDir)
}

impl Guest for System {
    fn read_file(&self, path: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let file = File::open(path)?;
        let mut buf = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            match file.read_at(&mut buf[filled..], offset.saturating_add(filled as u64)) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(filled);
        Ok(buf)
    }

    fn write_file(&self, path: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut options = OpenOptions::new();
        options.write(true);
        if is_below(Path::new(path), &self.creatable_root) {
            options.create(true).mode(0o644);
        }
        let file = options.open(path)?;
        file.write_all_at(data, offset)?;
        file.sync_all()
    }

    fn write_mapped(&self, path: &str, data: &[u8]) -> io::Result<()> {
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        let Some(len) = std::num::NonZeroUsize::new(data.len()) else {
            return Ok(());
        };
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        if file.metadata()?.len() < data.len() as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("shorter than the {} bytes to write", data.len()),
            ));
        }
        // SAFETY: a new shared mapping of `len` bytes of a file at least
        // that long, not aliased by any Rust reference; it is written
        // through the raw pointer only and never unmapped (below).
        let addr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &file,
                0,
            )
        }?;
        // SAFETY: `addr` maps `len` = data.len() writable bytes (above);
        // `data` is a separate allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), addr.as_ptr().cast::<u8>(), data.len())
        };
        // The mapping and the file stay open for as long as the agent
        // lives: FUSE writes a file's dirty pages back when a mapping of
        // it is unmapped and when the file is closed, so only both kept
        // leave the data in the guest alone. (A diagnostic; each call
        // keeps one of each.)
        std::mem::forget(file);
        Ok(())
    }

    fn dial_host(&self, port: u32, data: &[u8], limit: usize) -> io::Result<Vec<u8>> {
        let mut stream = VsockStream::connect(HOST_CID, port)?;
        stream.set_timeout(DIAL_TIMEOUT)?;
        let exchange = |stream: &mut VsockStream| -> io::Result<Vec<u8>> {
            stream.write_all(data)?;
            stream.shutdown_write()?;
            let mut answer = Vec::new();
            Read::by_ref(stream)
                .take(limit as u64)
                .read_to_end(&mut answer)?;
            Ok(answer)
        };
        exchange(&mut stream).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no progress within {DIAL_TIMEOUT:?}"),
            ),
            _ => e,
        })
    }

    fn online_cpus(&self) -> io::Result<u64> {
        const ONLINE: &str = "/sys/devices/system/cpu/online";
        match std::fs::read_to_string(ONLINE) {
            Ok(list) => count_cpu_list(&list).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{ONLINE}: unexpected contents {list:?}"),
                )
            }),
            // No sysfs (e.g. mounting it failed): ask libc, which counts
            // through /proc instead.
            Err(sysfs_err) => {
                // SAFETY: sysconf only reads its integer argument.
                let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
                u64::try_from(n).ok().filter(|&n| n > 0).ok_or_else(|| {
                    io::Error::new(sysfs_err.kind(), format!("{ONLINE}: {sysfs_err}"))
                })
            }
        }
    }

    fn reseed_rng(&self, entropy: &[u8]) -> io::Result<()> {
        reseed_rng_via(Path::new(RNG_DEVICE), entropy)
    }

    /// Only the wall clock: CLOCK_MONOTONIC and CLOCK_BOOTTIME continue from
    /// the template, and must, since they may never go back.
    fn set_realtime(&self, since_epoch: Duration) -> io::Result<()> {
        let ts = TimeSpec::from_duration(since_epoch);
        // SAFETY: `ts` is a valid timespec that outlives the call, which
        // only reads it.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, ts.as_ref()) } != 0 {
            let e = io::Error::last_os_error();
            return Err(failed("clock_settime(CLOCK_REALTIME)", e));
        }
        Ok(())
    }

    fn set_hostname(&self, name: &str) -> io::Result<()> {
        nix::unistd::sethostname(name).map_err(|e| failed("sethostname", e.into()))
    }

    fn configure_network(&self, network: &Network) -> Result<(), NetworkError> {
        crate::network::configure(network)
    }

    fn mount_share(&self, tag: &str, target: &str) -> io::Result<()> {
        use nix::mount::{mount, MsFlags};
        let mut mounted = self.share_mounted.lock().unwrap_or_else(|p| p.into_inner());
        if *mounted {
            return Ok(());
        }
        std::fs::create_dir_all(target).map_err(|e| failed("mkdir", e))?;
        // nodev/nosuid: the share carries host files; device nodes and
        // set-id bits in it must not act in the guest's root namespace.
        let flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
        // dax=always: files are mapped from the host's page cache through
        // the device's window instead of copied into this guest's memory
        // (the VMM's devices/fs/dax.rs). A kernel built without FUSE_DAX,
        // or a device without a window, refuses it with EINVAL; the share
        // then works as before, only with its pages in the guest.
        match mount(
            Some(tag),
            target,
            Some("virtiofs"),
            flags,
            Some("dax=always"),
        ) {
            Ok(()) => {}
            Err(nix::errno::Errno::EINVAL) => {
                info!("virtio-fs {tag:?}: no DAX (the kernel or the device has none); mounting without");
                mount(Some(tag), target, Some("virtiofs"), flags, None::<&str>)
                    .map_err(|e| failed("mount", e.into()))?;
            }
            Err(e) => return Err(failed("mount", e.into())),
        }
        // The kernel sends FUSE_INIT in the background; a STATFS waits for
        // its answer, so a template is saved with the session open (and a
        // session the device refused fails here, not at first use).
        if let Err(e) = nix::sys::statfs::statfs(target) {
            let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
            return Err(failed("statfs (opening the FUSE session)", e.into()));
        }
        // The first metadata query that asks for a birth time (Rust's std
        // asks in every one) makes the kernel try FUSE_STATX, which the
        // device's server does not answer: the kernel learns that once per
        // session, from an ENOSYS round trip. Learnt here, by a template's
        // guest before its snapshot, no clone pays it on a create.
        let _ = std::fs::metadata(target);
        *mounted = true;
        Ok(())
    }

    fn unmount_share(&self, target: &str) -> io::Result<()> {
        let mut mounted = self.share_mounted.lock().unwrap_or_else(|p| p.into_inner());
        if !*mounted {
            return Ok(());
        }
        // Detached: nothing in this guest uses it, and a busy mount must
        // not fail the clone.
        nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| failed("umount", e.into()))?;
        *mounted = false;
        Ok(())
    }
}

/// Prefixes `e`'s message with the operation that failed, keeping its kind.
fn failed(what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }`
/// in one allocation of ints (so the header is aligned), every byte
/// credited with 8 bits: the host sends fresh output of its own RNG.
fn rand_pool_info(entropy: &[u8]) -> io::Result<Vec<libc::c_int>> {
    let too_big = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} bytes of entropy do not fit struct rand_pool_info",
                entropy.len()
            ),
        )
    };
    let bits = entropy
        .len()
        .checked_mul(8)
        .and_then(|bits| libc::c_int::try_from(bits).ok())
        .ok_or_else(too_big)?;
    let len = libc::c_int::try_from(entropy.len()).map_err(|_| too_big())?;
    let mut info = Vec::with_capacity(2 + entropy.len().div_ceil(4));
    info.push(bits);
    info.push(len);
    // The kernel reads `buf_size` bytes from `buf`, so the padding of the
    // last word is never read.
    info.extend(entropy.chunks(4).map(|chunk| {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        libc::c_int::from_ne_bytes(word)
    }));
    Ok(info)
}

/// Credits `entropy` to the input pool, then reseeds the crng from it.
///
/// Both are needed. Since Linux 5.18, adding entropy (this ioctl, or a write
/// to /dev/urandom) only mixes it into the input pool once the crng is
/// initialised; the crng keeps producing output from its current key until
/// its next scheduled reseed, up to a minute later. Until then every clone
/// would hand out the template's random stream. RNDRESEEDCRNG extracts a new
/// base key from the pool, which now holds this clone's entropy, and bumps
/// the crng generation; the per-CPU crngs, the batched `get_random_u32/u64`
/// entropy and vDSO getrandom states see the new generation on their next
/// use and rekey, so nothing after this returns template-derived bytes.
///
/// Both ioctls need CAP_SYS_ADMIN (the agent is root, PID 1).
fn reseed_rng_via(device: &Path, entropy: &[u8]) -> io::Result<()> {
    let info = rand_pool_info(entropy)?;
    let device_name = device.display();
    let rng = File::open(device).map_err(|e| failed(&format!("open {device_name}"), e))?;
    // SAFETY: `info` is a whole rand_pool_info: its header's buf_size is the
    // number of bytes that follow the header in the same live allocation,
    // and the kernel only reads from it during the call.
    let rc = unsafe { libc::ioctl(rng.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(failed(&format!("ioctl RNDADDENTROPY on {device_name}"), e));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument and touches no user memory.
    let rc = unsafe { libc::ioctl(rng.as_raw_fd(), RNDRESEEDCRNG) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(failed(&format!("ioctl RNDRESEEDCRNG on {device_name}"), e));
    }
    Ok(())
}

/// Counts a kernel CPU list such as `0-3,6,8-9`.
fn count_cpu_list(list: &str) -> Option<u64> {
    let list = list.trim();
    if list.is_empty() {
        return None;
    }
    list.split(',').try_fold(0u64, |total, part| {
        let n = match part.split_once('-') {
            Some((first, last)) => {
                let first: u64 = first.parse().ok()?;
                let last: u64 = last.parse().ok()?;
                last.checked_sub(first)?.checked_add(1)?
            }
            None => {
                part.parse::<u64>().ok()?;
                1
            }
        };
        total.checked_add(n)
    })
}

/// Time since boot (CLOCK_BOOTTIME, what /proc/uptime shows), in ms.
pub fn uptime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_list_counts_ranges_and_singles() {
        assert_eq!(count_cpu_list("0\n"), Some(1));
        assert_eq!(count_cpu_list("0-3\n"), Some(4));
        assert_eq!(count_cpu_list("0-3,6,8-9\n"), Some(7));
    }

    #[test]
    fn cpu_list_rejects_garbage_instead_of_guessing() {
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("0-"), None);
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("a"), None);
        assert_eq!(count_cpu_list("0,,1"), None);
    }

    #[test]
    fn only_paths_strictly_below_the_root_without_dot_dot_are_creatable() {
        let root = Path::new("/tmp");
        assert!(is_below(Path::new("/tmp/x"), root));
        assert!(is_below(Path::new("/tmp/a/b"), root));
        assert!(!is_below(Path::new("/tmp"), root));
        assert!(!is_below(Path::new("/tmpx/y"), root));
        assert!(!is_below(Path::new("/tmp/../etc/x"), root));
        assert!(!is_below(Path::new("tmp/x"), root));
        assert!(!is_below(Path::new("/dev/vdb"), root));
    }

    #[test]
    fn rand_pool_info_is_bits_then_length_then_the_bytes() {
        let entropy: Vec<u8> = (1..=33).collect();
        let info = rand_pool_info(&entropy).unwrap();
        assert_eq!(info.len(), 2 + 9);
        assert_eq!(info[..2], [33 * 8, 33]);
        let bytes: Vec<u8> = info[2..].iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes[..33], entropy[..]);
        assert_eq!(bytes[33..], [0, 0, 0]);
    }

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn rng_ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
        assert_eq!(RNDRESEEDCRNG, 0x5207);
    }

    /// CAP_SYS_ADMIN, which the RNG ioctls need, in the effective set.
    fn have_cap_sys_admin() -> bool {
        const CAP_SYS_ADMIN: u32 = 21;
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let eff = status
            .lines()
            .find_map(|line| line.strip_prefix("CapEff:"))
            .unwrap();
        let eff = u64::from_str_radix(eff.trim(), 16).unwrap();
        eff & (1 << CAP_SYS_ADMIN) != 0
    }

    fn host_random_bytes(n: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; n];
        File::open("/dev/urandom")
            .unwrap()
            .read_exact(&mut bytes)
            .unwrap();
        bytes
    }

    /// The real ioctls on this machine's kernel: only mixes bytes from its
    /// own RNG back in and reseeds, which changes nothing anyone relies on.
    #[test]
    fn real_rng_ioctls_add_entropy_and_reseed_the_crng() {
        if !have_cap_sys_admin() {
            crate::test_skip::skipped("needs root with CAP_SYS_ADMIN");
            return;
        }
        System::new(false)
            .reseed_rng(&host_random_bytes(64))
            .unwrap();
    }

    #[test]
    fn rng_ioctl_errors_name_the_ioctl_device_and_os_error() {
        // /dev/null has no ioctls: ENOTTY before any capability check.
        let err = reseed_rng_via(Path::new("/dev/null"), &host_random_bytes(32)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ioctl RNDADDENTROPY on /dev/null: Inappropriate ioctl for device (os error 25)"
        );
        let err =
            reseed_rng_via(Path::new("/nonexistent/rng"), &host_random_bytes(32)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "open /nonexistent/rng: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn uptime_is_nonzero_and_moves_forward() {
        let a = uptime_ms();
        std::thread::sleep(Duration::from_millis(5));
        assert!(a > 0 && uptime_ms() >= a + 5);
    }
}
