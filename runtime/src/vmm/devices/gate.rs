//! The lock between the device workers' writes to guest memory and a
//! clone's pass over its private pages (`vmm/copies.rs`).
//!
//! Device workers write guest memory from their own threads: used rings,
//! received packets, FUSE replies. The pass compares a private page with
//! the template's and then drops it; a write landing between the two would
//! be lost. So a worker holds the gate's shared side while it serves its
//! queues, and the pass takes the exclusive side with the vCPUs paused.
//! The pass only ever *tries* (until a deadline): a worker stuck in a slow
//! host call delays the pass, never the guest.

use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};
use std::time::{Duration, Instant};

/// One per VM; every device worker of the VM holds a clone.
#[derive(Debug, Clone, Default)]
pub struct MemoryGate(Arc<RwLock<()>>);

impl MemoryGate {
    /// Held by a worker while it serves its queues (an uncontended atomic
    /// operation when no pass is running).
    pub fn hold(&self) -> RwLockReadGuard<'_, ()> {
        // The guard protects no data; a panic elsewhere leaves nothing torn.
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The exclusive side once no worker holds the shared one, or None if
    /// that has not happened by `deadline`.
    pub fn try_close(&self, deadline: Instant) -> Option<RwLockWriteGuard<'_, ()>> {
        loop {
            match self.0.try_write() {
                Ok(g) => return Some(g),
                Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(TryLockError::WouldBlock) if Instant::now() >= deadline => return None,
                Err(TryLockError::WouldBlock) => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_waits_for_a_holder_and_gives_up_at_the_deadline() {
        let gate = MemoryGate::default();
        let held = gate.hold();
        let t = Instant::now();
        assert!(gate
            .try_close(Instant::now() + Duration::from_millis(20))
            .is_none());
        assert!(t.elapsed() >= Duration::from_millis(20));
        drop(held);
        let closed = gate.try_close(Instant::now() + Duration::from_millis(20));
        assert!(closed.is_some());
        // While closed, a worker waits at `hold`.
        let g2 = gate.clone();
        let worker = std::thread::spawn(move || {
            let t = Instant::now();
            drop(g2.hold());
            t.elapsed()
        });
        std::thread::sleep(Duration::from_millis(30));
        drop(closed);
        assert!(worker.join().unwrap() >= Duration::from_millis(25));
    }
}
