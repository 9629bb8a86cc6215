//! Log lines a guest can cause, rate-limited: a malformed chain, a bad
//! packet, a refused request. Each is counted; only the 1st, 2nd, 4th, 8th
//! ... of a device reach the log, each with the count so far, so a guest
//! that repeats one mistake a million times costs 20 lines of containerd's
//! log, not a million, and the first one is never lost.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct GuestErrors {
    count: AtomicU64,
}

impl GuestErrors {
    /// Counts one error; the count when this one is to be logged.
    pub fn note(&self) -> Option<u64> {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        n.is_power_of_two().then_some(n)
    }

    /// Errors counted so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// `log::warn!` through a [`GuestErrors`]: `guest_warn!(errors, "fmt", args)`.
macro_rules! guest_warn {
    ($errors:expr, $($arg:tt)+) => {
        if let Some(n) = $errors.note() {
            log::warn!(
                "{} (guest error {n}; these are logged at powers of two)",
                format_args!($($arg)+)
            );
        }
    };
}
pub(crate) use guest_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_million_errors_are_twenty_log_lines_counting_them_all() {
        let e = GuestErrors::default();
        let logged: Vec<u64> = (0..1_000_000).filter_map(|_| e.note()).collect();
        assert_eq!(logged.len(), 20);
        assert_eq!(&logged[..4], &[1, 2, 4, 8]);
        assert_eq!(e.count(), 1_000_000);
    }
}
