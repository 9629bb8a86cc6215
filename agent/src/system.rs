//! The real guest side effects behind [`Guest`], plus power-off.

use crate::handler::Guest;
use crate::vsock::{VsockStream, HOST_CID};
use log::{error, info};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// How long a `DialHost` waits for the host to take or answer data.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct System {
    pid1: bool,
    /// `WriteFile` creates missing files only below this directory, so a
    /// typo in a device path fails instead of leaving a regular file in /dev.
    creatable_root: PathBuf,
}

impl System {
    pub fn new(pid1: bool) -> Self {
        Self {
            pid1,
            creatable_root: PathBuf::from("/tmp"),
        }
    }

    #[cfg(test)]
    pub fn with_creatable_root(mut self, root: &Path) -> Self {
        self.creatable_root = root.to_path_buf();
        self
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
    fn uptime_is_nonzero_and_moves_forward() {
        let a = uptime_ms();
        std::thread::sleep(Duration::from_millis(5));
        assert!(a > 0 && uptime_ms() >= a + 5);
    }
}
