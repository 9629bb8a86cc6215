//! `jevm check`: can this host's /dev/kvm run jevm guests, and if not, why.

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// One finding of the host check.
#[derive(Debug)]
pub struct Finding {
    pub ok: bool,
    pub what: String,
}

/// The capabilities the VMM uses; without any of them it cannot start a VM.
const REQUIRED: &[(Cap, &str)] = &[
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::Irqfd, "irqfd"),
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::UserMemory, "user memory slots"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::Pit2, "PIT"),
    (Cap::ExtCpuid, "extended CPUID"),
    (Cap::ImmediateExit, "immediate exit"),
    (Cap::Xsave, "xsave state"),
    (Cap::VcpuEvents, "vCPU events"),
    (Cap::AdjustClock, "clock adjustment"),
];

/// Checks the host. Returns the findings; the host can run jevm guests when
/// every finding is ok.
pub fn check_host() -> Vec<Finding> {
    let mut out = Vec::new();
    let mut push = |ok: bool, what: String| out.push(Finding { ok, what });
    if !Path::new("/dev/kvm").exists() {
        push(false, "/dev/kvm does not exist: load kvm_intel or kvm_amd, or enable virtualization in the firmware / for this VM".into());
        return out;
    }
    // PVM is a software hypervisor for PVM-aware guests: an ordinary Linux
    // guest dies in its instruction emulator (measured; docs/testing.md).
    if Path::new("/sys/module/kvm_pvm").exists() {
        push(false, "/dev/kvm is served by kvm_pvm (a PVM software hypervisor): it cannot run an ordinary Linux guest; run jevm inside a KVM test host (hack/kvm-host) or on a host with VT-x/AMD-V".into());
    } else if !Path::new("/sys/module/kvm_intel").exists()
        && !Path::new("/sys/module/kvm_amd").exists()
    {
        push(false, "neither kvm_intel nor kvm_amd is loaded: /dev/kvm is not backed by hardware virtualization".into());
    } else {
        push(true, "hardware virtualization module loaded".into());
    }
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            push(false, format!("cannot open /dev/kvm: {e} (check its permissions; jevm needs read-write access)"));
            return out;
        }
    };
    let api = kvm.get_api_version();
    push(api == 12, format!("KVM API version {api} (12 expected)"));
    for (cap, name) in REQUIRED {
        let ok = kvm.check_extension(*cap);
        push(
            ok,
            format!(
                "KVM capability {name}: {}",
                if ok { "present" } else { "missing" }
            ),
        );
    }
    match kvm.create_vm() {
        Ok(_) => push(true, "a VM can be created".into()),
        Err(e) => push(false, format!("cannot create a VM: {e}")),
    }
    out
}
