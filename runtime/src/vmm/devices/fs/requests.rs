//! What the guest asked of its share: FUSE requests counted by opcode, and
//! the host's time serving them. Every request is a round trip from the
//! guest's vCPU to the device's worker and back; a container's create is
//! measured in these, which the nested test host's timings blur (a round
//! trip there costs milliseconds, on hardware microseconds).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// FUSE opcodes are small numbers (the highest a guest sends today is
/// FUSE_STATX, 52); anything above is counted apart.
const COUNTED: usize = 64;

/// Bumped by the worker as it serves; read by whoever holds the `Arc`.
#[derive(Debug)]
pub struct ShareRequests {
    by_opcode: [AtomicU64; COUNTED],
    other: AtomicU64,
    host_ns: AtomicU64,
}

impl Default for ShareRequests {
    fn default() -> Self {
        ShareRequests {
            by_opcode: std::array::from_fn(|_| AtomicU64::new(0)),
            other: AtomicU64::new(0),
            host_ns: AtomicU64::new(0),
        }
    }
}

impl ShareRequests {
    pub fn record(&self, opcode: u32, served_in: Duration) {
        let slot = usize::try_from(opcode)
            .ok()
            .and_then(|i| self.by_opcode.get(i))
            .unwrap_or(&self.other);
        slot.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(served_in.as_nanos()).unwrap_or(u64::MAX);
        self.host_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn counts(&self) -> RequestCounts {
        RequestCounts {
            by_opcode: std::array::from_fn(|i| self.by_opcode[i].load(Ordering::Relaxed)),
            other: self.other.load(Ordering::Relaxed),
            host: Duration::from_nanos(self.host_ns.load(Ordering::Relaxed)),
        }
    }
}

/// A reading of [`ShareRequests`]; `since` gives what happened between two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestCounts {
    by_opcode: [u64; COUNTED],
    other: u64,
    /// The worker's time in the file system, request read to reply written
    /// (not the guest's wait: that adds the exits, the worker's wake-up and
    /// the interrupt).
    pub host: Duration,
}

impl Default for RequestCounts {
    fn default() -> Self {
        RequestCounts {
            by_opcode: [0; COUNTED],
            other: 0,
            host: Duration::ZERO,
        }
    }
}

impl RequestCounts {
    pub fn total(&self) -> u64 {
        self.by_opcode.iter().sum::<u64>() + self.other
    }

    pub fn since(&self, earlier: &RequestCounts) -> RequestCounts {
        RequestCounts {
            by_opcode: std::array::from_fn(|i| {
                self.by_opcode[i].saturating_sub(earlier.by_opcode[i])
            }),
            other: self.other.saturating_sub(earlier.other),
            host: self.host.saturating_sub(earlier.host),
        }
    }
}

/// `LOOKUP:12,GETATTR:2,...`, most frequent first: one token for a log line.
impl fmt::Display for RequestCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut seen: Vec<(String, u64)> = self
            .by_opcode
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(op, &n)| (name(op), n))
            .collect();
        if self.other > 0 {
            seen.push(("OTHER".into(), self.other));
        }
        seen.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        if seen.is_empty() {
            return f.write_str("-");
        }
        let parts: Vec<String> = seen.iter().map(|(n, c)| format!("{n}:{c}")).collect();
        f.write_str(&parts.join(","))
    }
}

/// The kernel's names (include/uapi/linux/fuse.h) of what a guest sends.
fn name(opcode: usize) -> String {
    let known = match opcode {
        1 => "LOOKUP",
        2 => "FORGET",
        3 => "GETATTR",
        4 => "SETATTR",
        5 => "READLINK",
        6 => "SYMLINK",
        8 => "MKNOD",
        9 => "MKDIR",
        10 => "UNLINK",
        11 => "RMDIR",
        12 => "RENAME",
        13 => "LINK",
        14 => "OPEN",
        15 => "READ",
        16 => "WRITE",
        17 => "STATFS",
        18 => "RELEASE",
        20 => "FSYNC",
        22 => "GETXATTR",
        23 => "LISTXATTR",
        25 => "FLUSH",
        26 => "INIT",
        27 => "OPENDIR",
        28 => "READDIR",
        29 => "RELEASEDIR",
        34 => "ACCESS",
        35 => "CREATE",
        42 => "BATCH_FORGET",
        43 => "FALLOCATE",
        44 => "READDIRPLUS",
        45 => "RENAME2",
        46 => "LSEEK",
        48 => "SETUPMAPPING",
        49 => "REMOVEMAPPING",
        52 => "STATX",
        _ => return format!("OP{opcode}"),
    };
    known.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_opcode_most_frequent_first_and_differences() {
        let r = ShareRequests::default();
        assert_eq!(r.counts().to_string(), "-");
        r.record(1, Duration::from_micros(10));
        let before = r.counts();
        for _ in 0..3 {
            r.record(1, Duration::from_micros(10));
        }
        r.record(3, Duration::from_micros(5));
        r.record(48, Duration::from_micros(5));
        r.record(4096, Duration::from_micros(5));
        let now = r.counts();
        assert_eq!(now.total(), 7);
        assert_eq!(now.host, Duration::from_micros(55));
        assert_eq!(now.to_string(), "LOOKUP:4,GETATTR:1,OTHER:1,SETUPMAPPING:1");
        let between = now.since(&before);
        assert_eq!(between.total(), 6);
        assert_eq!(between.host, Duration::from_micros(45));
        assert_eq!(
            between.to_string(),
            "LOOKUP:3,GETATTR:1,OTHER:1,SETUPMAPPING:1"
        );
    }
}
