//! A KVM VM made ahead of need. `KVM_CREATE_VM` is the largest single
//! cost on a clone's host side (about 0.2 ms of 1 ms on this machine's
//! /dev/kvm, more in a nested host) and nothing in it depends on the
//! template, so a process about to clone (the shim, when a pod's create
//! arrives) has it made on a thread of its own while it mounts and looks
//! the template up; the next VM built in the process takes it.
//!
//! Made ahead with it: the virtio-fs DAX window (reserved and registered
//! as slot 1: nor does it depend on the template; ~0.15 ms of a clone on
//! this machine when it was made in the restore), and, once the caller
//! knows the guest's memory size, the guest RAM slot, TSS, irqchip and PIT
//! (~0.19 ms: the slot 0.10, the PIT 0.07). Guest RAM must be registered
//! before the irqchip and PIT exist (registered after them, the slot update
//! waited 4-8 ms for KVM's SRCU grace period, measured), and the memory is
//! the template's: so the slot is made on address space reserved for it
//! ([`RamReservation`]), over which the restore maps the template's file.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};

use super::devices::fs::DaxWindow;
use super::layout::{self, KVM_TSS_ADDR};
use super::memory::RamReservation;
use super::vm::VmError;

/// A VM made ahead. Fields drop in order: the VM before the address space
/// it has registered.
pub(super) struct Ahead {
    pub kvm: Kvm,
    pub vm_fd: VmFd,
    pub dax: Arc<DaxWindow>,
    /// Guest RAM's address space, registered as slot 0, with the TSS,
    /// irqchip and PIT made after it; `None` when the size was not known.
    pub ram: Option<RamReservation>,
}

type Made = Result<Ahead, VmError>;

/// The thread making the next VM, and the guest RAM size it was asked for.
static AHEAD: Mutex<Option<(JoinHandle<Made>, Option<u64>)>> = Mutex::new(None);

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmSetup { what, source }
}

fn create() -> Made {
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    let vm_fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    // Every VM has the window, so a template's guest sets it up at boot
    // and its clones find it where the guest expects it.
    let dax_err = |source| VmError::Device {
        name: "virtio-fs DAX window".into(),
        cause: format!("{source}"),
    };
    let dax = DaxWindow::new(layout::DAX_WINDOW_SIZE).map_err(dax_err)?;
    dax.register(&vm_fd, layout::DAX_WINDOW_SLOT)
        .map_err(dax_err)?;
    Ok(Ahead {
        kvm,
        vm_fd,
        dax: Arc::new(dax),
        ram: None,
    })
}

/// What follows guest RAM's slot in every VM, boot or clone: the TSS, the
/// in-kernel irqchip and the PIT.
pub(super) fn chipset(vm_fd: &VmFd) -> Result<(), VmError> {
    vm_fd
        .set_tss_address(KVM_TSS_ADDR)
        .map_err(kvm_err("set the TSS address"))?;
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd.create_pit2(pit).map_err(kvm_err("create the PIT"))
}

fn with_ram(mut made: Ahead, size: u64) -> Made {
    let ram = RamReservation::new(size)?;
    ram.register(&made.vm_fd, 0)?;
    chipset(&made.vm_fd)?;
    made.ram = Some(ram);
    Ok(made)
}

/// Starts making a VM for the next [`take_or_create`]: with guest RAM's
/// slot and the chipset when `ram` (bytes) is given. A no-op if one is
/// already made or on its way, unless only this call knows the size: its
/// thread then finishes the one on its way.
pub fn prepare(ram: Option<u64>) {
    let mut ahead = AHEAD.lock().unwrap_or_else(|e| e.into_inner());
    let pending = ahead.take();
    let work: Box<dyn FnOnce() -> Made + Send> = match (pending, ram) {
        (Some((h, asked)), None) => {
            *ahead = Some((h, asked));
            return;
        }
        (Some((h, Some(asked))), Some(size)) if asked == size => {
            *ahead = Some((h, Some(asked)));
            return;
        }
        (Some((h, _)), Some(size)) => Box::new(move || match h.join() {
            Ok(Ok(made)) if made.ram.is_none() => with_ram(made, size),
            // Made for another size: its irqchip exists, so its RAM slot
            // cannot be replaced without the wait that this avoids.
            _ => with_ram(create()?, size),
        }),
        (None, None) => Box::new(create),
        (None, Some(size)) => Box::new(move || with_ram(create()?, size)),
    };
    match std::thread::Builder::new()
        .name("vm-ahead".into())
        .spawn(work)
    {
        Ok(h) => *ahead = Some((h, ram)),
        // The restore makes its own, as without preparation.
        Err(e) => log::warn!("making a VM ahead: cannot start a thread: {e}"),
    }
}

/// The VM made ahead (waiting for it if it is still being made), or a new
/// one. One made ahead with guest RAM of another size than `ram` (bytes)
/// is dropped. A failure ahead is not kept: the VM is made again here, so
/// the caller sees the error of its own attempt.
pub(super) fn take_or_create(ram: u64) -> Made {
    let pending = AHEAD.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some((h, _)) = pending {
        match h.join() {
            Ok(Ok(made)) if made.ram.as_ref().is_none_or(|r| r.size() == ram) => return Ok(made),
            Ok(Ok(_)) => log::debug!("the VM made ahead has another memory size; making one"),
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
        prepare(None);
        prepare(None); // the second finds the first on its way
        assert!(AHEAD.lock().unwrap().is_some());
        let made = take_or_create(MIB_64).expect("the prepared VM");
        assert!(made.ram.is_none(), "no size was asked for");
        assert!(AHEAD.lock().unwrap().is_none(), "taken twice");
        take_or_create(MIB_64).expect("a VM made on the spot");

        // With the size: RAM's slot and the chipset too, also when the size
        // comes after a VM was on its way.
        prepare(None);
        prepare(Some(MIB_64));
        let made = take_or_create(MIB_64).expect("the prepared VM");
        assert_eq!(made.ram.as_ref().map(|r| r.size()), Some(MIB_64));
        // A VM whose irqchip exists could not take another RAM slot without
        // KVM's wait: one made for another size is not handed out.
        prepare(Some(MIB_64));
        let other = take_or_create(2 * MIB_64).expect("a VM made on the spot");
        assert!(other.ram.is_none());
        // The first one's slot still works: a guest RAM file mapped over it.
        let file = std::sync::Arc::new(tempfile::tempfile().unwrap());
        file.set_len(MIB_64).unwrap();
        let ram = super::super::memory::map_template(
            std::path::Path::new("test"),
            Some(file),
            MIB_64,
            made.ram,
        )
        .expect("the template mapped over the reservation");
        use vm_memory::{Bytes, GuestAddress};
        ram.mem.write_obj(7u64, GuestAddress(0x1000)).unwrap();
        assert_eq!(ram.mem.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 7);
        drop(made.vm_fd);
    }

    const MIB_64: u64 = 64 << 20;
}
