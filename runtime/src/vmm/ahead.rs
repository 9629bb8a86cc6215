//! A KVM VM made ahead of need. `KVM_CREATE_VM` is the largest single
//! cost on a clone's host side (about 0.2 ms of 1 ms on this machine's
//! /dev/kvm, more in a nested host) and nothing in it depends on the
//! template, so a process about to clone (the shim, when a pod's create
//! arrives) has it made on a thread of its own while it mounts and looks
//! the template up; the next VM built in the process takes it.
//!
//! The empty VM and its virtio-fs DAX window (reserved and registered as
//! slot 1: nor does it depend on the template; ~0.15 ms of a clone on
//! this machine when it was made in the restore). Guest RAM must be
//! registered before the irqchip and PIT exist (registered after them, the
//! slot update waited 4-8 ms for KVM's SRCU grace period, measured), and
//! the memory is the template's, so the restore does the rest.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_ioctls::{Kvm, VmFd};

use super::devices::fs::DaxWindow;
use super::layout;
use super::vm::VmError;

type Made = Result<(Kvm, VmFd, Arc<DaxWindow>), VmError>;

static AHEAD: Mutex<Option<JoinHandle<Made>>> = Mutex::new(None);

fn create() -> Made {
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    let vm_fd = kvm.create_vm().map_err(|source| VmError::KvmSetup {
        what: "create a VM",
        source,
    })?;
    // Every VM has the window, so a template's guest sets it up at boot
    // and its clones find it where the guest expects it.
    let dax_err = |source| VmError::Device {
        name: "virtio-fs DAX window".into(),
        cause: format!("{source}"),
    };
    let dax = DaxWindow::new(layout::DAX_WINDOW_SIZE).map_err(dax_err)?;
    dax.register(&vm_fd, layout::DAX_WINDOW_SLOT)
        .map_err(dax_err)?;
    Ok((kvm, vm_fd, Arc::new(dax)))
}

/// Starts making a VM for the next [`take_or_create`]; a no-op if one is
/// already made or on its way.
pub fn prepare() {
    let mut ahead = AHEAD.lock().unwrap_or_else(|e| e.into_inner());
    if ahead.is_some() {
        return;
    }
    match std::thread::Builder::new()
        .name("vm-ahead".into())
        .spawn(create)
    {
        Ok(h) => *ahead = Some(h),
        // The restore makes its own, as without preparation.
        Err(e) => log::warn!("making a VM ahead: cannot start a thread: {e}"),
    }
}

/// The VM made ahead (waiting for it if it is still being made), or a new
/// one. A failure ahead is not kept: the VM is made again here, so the
/// caller sees the error of its own attempt.
pub(super) fn take_or_create() -> Made {
    let pending = AHEAD.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(h) = pending {
        match h.join() {
            Ok(Ok(made)) => return Ok(made),
            Ok(Err(e)) => log::debug!("the VM made ahead failed ({e}); making it again"),
            Err(_) => log::warn!("the thread making a VM ahead panicked; making it again"),
        }
    }
    create()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prepared_vm_is_taken_once_and_the_next_is_made_anew() {
        if !std::path::Path::new("/dev/kvm").exists() {
            crate::test_skip::skipped("no /dev/kvm");
            return;
        }
        prepare();
        prepare(); // the second finds the first on its way
        assert!(AHEAD.lock().unwrap().is_some());
        take_or_create().expect("the prepared VM");
        assert!(AHEAD.lock().unwrap().is_none(), "taken twice");
        take_or_create().expect("a VM made on the spot");
    }
}
