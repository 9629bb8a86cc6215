//! vCPU set-up for the 64-bit boot entry, and the vCPU run loop.
//!
//! Each vCPU runs `KVM_RUN` on a thread of its own. Port and MMIO exits go
//! to the [`Bus`](super::bus::Bus); a guest reset (triple fault, which is how
//! `reboot=t` and `panic=-1` end a guest without ACPI) stops the whole VM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vm_memory::GuestAddress;

use super::boot::GDT;
use super::bus::{Bus, PioOutcome};
use super::layout::{BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PML4_ADDR, ZERO_PAGE_ADDR};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id}: cannot {what}: {source}")]
    Setup {
        id: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: {what} accepted {set} of {total} MSRs")]
    Msrs {
        id: u8,
        what: &'static str,
        set: usize,
        total: usize,
    },
    #[error("vCPU {id}: saved state is invalid: {cause}")]
    BadState { id: u8, cause: String },
}

/// Everything KVM holds for one vCPU, saved with a template and loaded into
/// each clone's vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

/// The MSRs of `candidates` this vCPU lets us read, with their values.
/// KVM_GET_MSRS stops at the first MSR it cannot read, so drop that one and
/// ask again.
fn readable_msrs(
    vcpu: &VcpuFd,
    id: u8,
    candidates: &[u32],
) -> Result<Vec<kvm_msr_entry>, VcpuError> {
    let mut list: Vec<u32> = candidates.to_vec();
    loop {
        let entries: Vec<kvm_msr_entry> = list
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| VcpuError::BadState {
            id,
            cause: format!("MSR list: {e:?}"),
        })?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(|source| VcpuError::Setup {
                id,
                what: "read MSRs",
                source,
            })?;
        if n == list.len() {
            return Ok(msrs.as_slice().to_vec());
        }
        list.remove(n);
    }
}

/// Reads the state of a stopped vCPU. `msr_list` is KVM's MSR index list.
pub fn save(vcpu: &mut VcpuFd, id: u8, msr_list: &[u32]) -> Result<VcpuState, VcpuError> {
    let err = |what| move |source| VcpuError::Setup { id, what, source };
    // A stop can land between an I/O exit and the KVM_RUN that completes
    // it (an `in` whose value is written but not yet in RAX): one KVM_RUN
    // with immediate_exit finishes it without running guest code.
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
    Ok(VcpuState {
        id,
        cpuid: vcpu
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(err("read CPUID"))?
            .as_slice()
            .to_vec(),
        mp_state: vcpu.get_mp_state().map_err(err("read MP state"))?,
        regs: vcpu.get_regs().map_err(err("read registers"))?,
        sregs: vcpu.get_sregs().map_err(err("read special registers"))?,
        xsave: vcpu.get_xsave().map_err(err("read xsave state"))?,
        xcrs: vcpu.get_xcrs().map_err(err("read xcrs"))?,
        debug_regs: vcpu.get_debug_regs().map_err(err("read debug registers"))?,
        lapic: vcpu.get_lapic().map_err(err("read LAPIC"))?,
        msrs: readable_msrs(vcpu, id, msr_list)?,
        events: vcpu.get_vcpu_events().map_err(err("read vCPU events"))?,
    })
}

/// Loads a saved state into a fresh vCPU, in the order KVM needs: CPUID
/// first (it shapes what the rest may contain), events last.
pub fn restore(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), VcpuError> {
    let id = state.id;
    let err = |what| move |source| VcpuError::Setup { id, what, source };
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|e| VcpuError::BadState {
        id,
        cause: format!("CPUID: {e:?}"),
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(err("set CPUID"))?;
    vcpu.set_mp_state(state.mp_state)
        .map_err(err("set MP state"))?;
    vcpu.set_regs(&state.regs).map_err(err("set registers"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(err("set special registers"))?;
    // SAFETY: the buffer is a whole kvm_xsave read back from KVM_GET_XSAVE
    // of a vCPU with the same CPUID, as KVM_SET_XSAVE expects.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(err("set xsave state"))?;
    vcpu.set_xcrs(&state.xcrs).map_err(err("set xcrs"))?;
    vcpu.set_debug_regs(&state.debug_regs)
        .map_err(err("set debug registers"))?;
    vcpu.set_lapic(&state.lapic).map_err(err("set LAPIC"))?;
    let msrs = Msrs::from_entries(&state.msrs).map_err(|e| VcpuError::BadState {
        id,
        cause: format!("MSRs: {e:?}"),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(err("set MSRs"))?;
    if set != state.msrs.len() {
        return Err(VcpuError::Msrs {
            id,
            what: "KVM_SET_MSRS",
            set,
            total: state.msrs.len(),
        });
    }
    vcpu.set_vcpu_events(&state.events)
        .map_err(err("set vCPU events"))?;
    Ok(())
}

/// Why a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest reset itself: a reboot (`reboot=t` makes it a triple
    /// fault) or an i8042 reset, with no kernel panic on the console.
    GuestReset,
    /// The guest kernel panicked (its console said "Kernel panic"), then
    /// reset itself (`panic=-1`).
    GuestPanic,
    /// The guest kernel halted or powered itself off ("reboot: System
    /// halted" / "reboot: Power down" on the console, or a HLT exit).
    /// Without ACPI its vCPUs then sit in HLT with interrupts off, which
    /// never reaches userspace, so the console line is the only sign.
    GuestHalt,
    /// The host asked the VM to stop.
    HostRequest,
    /// The host stopped the vCPUs to save the VM as a template.
    Paused,
    /// KVM could not run the vCPU any more.
    Fault(String),
}

impl StopReason {
    /// Whether the VM stopped by itself (the guest or KVM ended it), as
    /// opposed to being stopped by the host.
    pub fn by_guest(&self) -> bool {
        !matches!(self, StopReason::HostRequest | StopReason::Paused)
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::GuestReset => f.write_str("the guest rebooted"),
            StopReason::GuestPanic => f.write_str("the guest kernel panicked"),
            StopReason::GuestHalt => f.write_str("the guest halted (powered itself off)"),
            StopReason::HostRequest => f.write_str("stopped by the host"),
            StopReason::Paused => f.write_str("paused by the host"),
            StopReason::Fault(cause) => write!(f, "KVM fault: {cause}"),
        }
    }
}

/// State the vCPU threads and the VM owner share.
pub struct VmControl {
    stop: AtomicBool,
    /// The console showed a kernel panic: a later reset is a panic.
    panicked: AtomicBool,
    reason: Mutex<Option<StopReason>>,
    stopped: Condvar,
    threads: Mutex<Vec<libc::pthread_t>>,
    /// A pause is wanted (the vCPU loop's cheap check; `pause` is the
    /// truth).
    pause_wanted: AtomicBool,
    pause: Mutex<Pause>,
    /// Signalled when a vCPU parks and when the pause ends or the VM stops.
    pause_changed: Condvar,
}

#[derive(Default)]
struct Pause {
    wanted: bool,
    /// vCPU threads parked in [`VmControl::park_while_paused`].
    parked: usize,
}

/// How often a pause re-kicks a vCPU that has not parked: a kick sent
/// between its check and its entry into KVM_RUN is lost, and a guest idle
/// in HLT would not exit on its own.
const PAUSE_KICK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(1);

/// Signal used to kick a vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler for the kick signal once per process: its
/// only job is to make KVM_RUN return EINTR.
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler) {
            log::error!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

impl VmControl {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            stop: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            reason: Mutex::new(None),
            stopped: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            pause_wanted: AtomicBool::new(false),
            pause: Mutex::new(Pause::default()),
            pause_changed: Condvar::new(),
        })
    }

    /// Brings every vCPU thread out of the guest and keeps it out until
    /// [`VmControl::resume`]: true once all are parked, false (and the
    /// pause undone) if they are not by `deadline` or the VM stops.
    pub fn pause(&self, deadline: std::time::Instant) -> bool {
        self.pause.lock().unwrap().wanted = true;
        self.pause_wanted.store(true, Ordering::SeqCst);
        loop {
            let running = self.threads.lock().unwrap().len();
            self.kick_all();
            let p = self.pause.lock().unwrap();
            if self.stop_requested() {
                drop(p);
                self.resume();
                return false;
            }
            if p.parked >= running {
                return true;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                drop(p);
                self.resume();
                return false;
            }
            let wait = PAUSE_KICK_INTERVAL.min(deadline - now);
            drop(self.pause_changed.wait_timeout(p, wait).unwrap());
        }
    }

    /// Ends a pause: parked vCPUs go back into the guest.
    pub fn resume(&self) {
        self.pause.lock().unwrap().wanted = false;
        self.pause_wanted.store(false, Ordering::SeqCst);
        self.pause_changed.notify_all();
    }

    /// Called by a vCPU thread outside KVM_RUN: parks it while a pause is
    /// wanted and the VM is not stopping.
    fn park_while_paused(&self) {
        if !self.pause_wanted.load(Ordering::SeqCst) {
            return;
        }
        let mut p = self.pause.lock().unwrap();
        if !p.wanted {
            return;
        }
        p.parked += 1;
        self.pause_changed.notify_all();
        while p.wanted && !self.stop_requested() {
            p = self.pause_changed.wait(p).unwrap();
        }
        p.parked -= 1;
    }

    /// Records why the VM stops (the first reason wins) and kicks every vCPU.
    /// Waiters in [`VmControl::wait`] wake at once, before the vCPU threads
    /// have left KVM_RUN.
    pub fn request_stop(&self, reason: StopReason) {
        // The panicking vCPU writes the whole panic text to the UART (a
        // synchronous port exit on this same thread) before it resets, so
        // the note is always in place by the time the reset arrives.
        let reason = match reason {
            StopReason::GuestReset if self.panicked.load(Ordering::SeqCst) => {
                StopReason::GuestPanic
            }
            other => other,
        };
        {
            let mut r = self.reason.lock().unwrap();
            if r.is_none() {
                *r = Some(reason);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        self.kick_all();
        self.stopped.notify_all();
        // Parked vCPUs leave (under the lock: one about to wait sees the
        // stop first or gets this wake-up).
        let _p = self.pause.lock().unwrap();
        self.pause_changed.notify_all();
    }

    /// The guest console printed a kernel panic.
    pub fn note_panic(&self) {
        self.panicked.store(true, Ordering::SeqCst);
    }

    pub fn kick_all(&self) {
        for &t in self.threads.lock().unwrap().iter() {
            // SAFETY: `t` is a vCPU thread registered by itself and removed
            // before it exits, so it names a live thread; the signal has a
            // handler installed, so it cannot kill the process.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub fn reason(&self) -> Option<StopReason> {
        self.reason.lock().unwrap().clone()
    }

    /// Waits until the VM stops or `timeout` passes.
    pub fn wait(&self, timeout: Option<std::time::Duration>) -> Option<StopReason> {
        let guard = self.reason.lock().unwrap();
        match timeout {
            None => self
                .stopped
                .wait_while(guard, |r| r.is_none())
                .unwrap()
                .clone(),
            Some(t) => self
                .stopped
                .wait_timeout_while(guard, t, |r| r.is_none())
                .unwrap()
                .0
                .clone(),
        }
    }

    fn register_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        self.threads
            .lock()
            .unwrap()
            .push(unsafe { libc::pthread_self() });
    }

    fn unregister_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.threads.lock().unwrap().retain(|&t| t != me);
    }
}

// CPUID bits the guest needs that KVM's supported list may leave out.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;

/// Per-vCPU CPUID: the host's supported set with this vCPU's APIC ID.
pub fn cpuid_for(base: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                // The test host's KVM does not list TSC-deadline though it
                // emulates it; without it the LAPIC timer is slower to program.
                e.ecx |= LEAF1_ECX_TSC_DEADLINE | LEAF1_ECX_HYPERVISOR;
            }
            0xb => e.edx = u32::from(id),
            _ => {}
        }
    }
    cpuid
}

fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// Configures vCPU `id` of `count` for the 64-bit Linux entry at `entry`.
pub fn configure(
    vcpu: &VcpuFd,
    id: u8,
    count: u8,
    base_cpuid: &CpuId,
    entry: GuestAddress,
) -> Result<(), VcpuError> {
    let setup = |what| move |source| VcpuError::Setup { id, what, source };
    vcpu.set_cpuid2(&cpuid_for(base_cpuid, id, count))
        .map_err(setup("set CPUID"))?;

    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, 1), // fast strings
        // MTRRs on, default write-back: with the reset value (MTRRs off)
        // every guest access would be uncached.
        msr(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ];
    let msrs = Msrs::from_entries(&entries).expect("fixed MSR list fits");
    let set = vcpu.set_msrs(&msrs).map_err(setup("set MSRs"))?;
    if set != entries.len() {
        return Err(VcpuError::Msrs {
            id,
            what: "KVM_SET_MSRS",
            set,
            total: entries.len(),
        });
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(setup("set FPU"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(setup("set registers"))?;

    let mut sregs = vcpu.get_sregs().map_err(setup("get special registers"))?;
    let code = segment_from_gdt(GDT[1], 1);
    let data = segment_from_gdt(GDT[2], 2);
    let tss = segment_from_gdt(GDT[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= 1 << 5; // PAE
    sregs.cr0 |= 1 | (1 << 31); // PE, PG
    sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
    vcpu.set_sregs(&sregs)
        .map_err(setup("set special registers"))?;

    // LINT0 takes the PIC's ExtINT, LINT1 NMIs, as the MP table says.
    let mut lapic = vcpu.get_lapic().map_err(setup("get LAPIC"))?;
    set_lapic_reg(&mut lapic.regs, 0x350, 7 << 8);
    set_lapic_reg(&mut lapic.regs, 0x360, 4 << 8);
    vcpu.set_lapic(&lapic).map_err(setup("set LAPIC"))?;
    Ok(())
}

fn set_lapic_reg(regs: &mut [libc::c_char; 1024], offset: usize, mode: u32) {
    let mut cur = [0u8; 4];
    for (i, b) in cur.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    // Keep everything but the delivery mode bits (8..11).
    let v = (u32::from_le_bytes(cur) & !0x700) | mode;
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as libc::c_char;
    }
}

/// Runs vCPU `id` until the VM stops; hands the vCPU back for saving.
pub fn run(mut vcpu: VcpuFd, id: u8, bus: Arc<Bus>, ctl: Arc<VmControl>) -> VcpuFd {
    ctl.register_thread();
    while !ctl.stop_requested() {
        ctl.park_while_paused();
        if ctl.stop_requested() {
            break;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => {
                if bus.pio_write(port, data) == PioOutcome::Reset {
                    ctl.request_stop(StopReason::GuestReset);
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
            // A triple fault: how `reboot=t` and `panic=-1` end the guest.
            // On AMD, KVM resets the vCPU before we see it, so the guest's
            // RIP at a crash is only in the kvm:kvm_exit tracepoint
            // (hack/guest-stress, docs/testing.md).
            Ok(VcpuExit::Shutdown) => ctl.request_stop(StopReason::GuestReset),
            Ok(VcpuExit::SystemEvent(kind, _)) => ctl.request_stop(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => StopReason::GuestHalt,
                kvm_bindings::KVM_SYSTEM_EVENT_CRASH => StopReason::GuestPanic,
                _ => StopReason::GuestReset,
            }),
            // With the in-kernel irqchip KVM handles HLT itself; one that
            // reaches us is a vCPU nothing will wake again.
            Ok(VcpuExit::Hlt) => ctl.request_stop(StopReason::GuestHalt),
            Ok(VcpuExit::FailEntry(reason, cpu)) => ctl.request_stop(StopReason::Fault(format!(
                "vCPU {id}: KVM failed to enter the guest (hardware reason {reason:#x}, cpu {cpu})"
            ))),
            Ok(VcpuExit::InternalError) => ctl.request_stop(StopReason::Fault(format!(
                "vCPU {id}: KVM internal error (emulation failure)"
            ))),
            Ok(VcpuExit::Intr) => {}
            Ok(other) => log::debug!("vCPU {id}: ignored exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
            }
            // EFAULT: the guest touched memory the host could not back; the
            // one way a well-behaved guest gets here is a share file it
            // maps through the DAX window being truncated on the host.
            Err(e) if e.errno() == libc::EFAULT => ctl.request_stop(StopReason::Fault(format!(
                "vCPU {id}: KVM_RUN failed: {e} (guest memory the host cannot back, e.g. a \
                 virtio-fs DAX mapping of a share file truncated on the host)"
            ))),
            Err(e) => {
                ctl.request_stop(StopReason::Fault(format!("vCPU {id}: KVM_RUN failed: {e}")))
            }
        }
    }
    ctl.unregister_thread();
    vcpu
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    #[test]
    fn a_reset_after_a_panic_line_is_a_panic_and_the_first_reason_wins() {
        let ctl = VmControl::new();
        ctl.request_stop(StopReason::GuestReset);
        assert_eq!(ctl.reason(), Some(StopReason::GuestReset));

        let ctl = VmControl::new();
        ctl.note_panic();
        ctl.request_stop(StopReason::GuestReset);
        ctl.request_stop(StopReason::HostRequest);
        assert_eq!(ctl.reason(), Some(StopReason::GuestPanic));
        assert!(ctl.reason().unwrap().by_guest());
        assert!(!StopReason::HostRequest.by_guest() && !StopReason::Paused.by_guest());
    }

    #[test]
    fn a_waiter_wakes_as_soon_as_another_thread_stops_the_vm() {
        let ctl = VmControl::new();
        assert_eq!(ctl.wait(Some(Duration::from_millis(10))), None);
        let c2 = Arc::clone(&ctl);
        let t0 = Instant::now();
        let waiter = std::thread::spawn(move || c2.wait(None));
        std::thread::sleep(Duration::from_millis(50));
        ctl.request_stop(StopReason::GuestHalt);
        assert_eq!(waiter.join().unwrap(), Some(StopReason::GuestHalt));
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    /// Threads standing in for vCPUs: the run loop's pause check, then a
    /// sleep where KVM_RUN would be (which the kick interrupts).
    fn fake_vcpus(
        ctl: &Arc<VmControl>,
        n: usize,
    ) -> (Arc<AtomicUsize>, Vec<std::thread::JoinHandle<()>>) {
        install_kick_handler();
        let steps = Arc::new(AtomicUsize::new(0));
        let threads = (0..n)
            .map(|_| {
                let (ctl, steps) = (Arc::clone(ctl), Arc::clone(&steps));
                std::thread::spawn(move || {
                    ctl.register_thread();
                    while !ctl.stop_requested() {
                        ctl.park_while_paused();
                        steps.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    ctl.unregister_thread();
                })
            })
            .collect();
        while ctl.threads.lock().unwrap().len() < n {
            std::thread::sleep(Duration::from_millis(1));
        }
        (steps, threads)
    }

    #[test]
    fn a_pause_parks_every_vcpu_until_resumed_and_a_stop_ends_it() {
        let ctl = VmControl::new();
        let (steps, threads) = fake_vcpus(&ctl, 2);
        assert!(ctl.pause(Instant::now() + Duration::from_secs(5)));
        let parked_at = steps.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(steps.load(Ordering::SeqCst), parked_at, "a paused vCPU ran");
        ctl.resume();
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            steps.load(Ordering::SeqCst) > parked_at,
            "no vCPU ran after the resume"
        );
        // Stopping a paused VM lets its vCPU threads end.
        assert!(ctl.pause(Instant::now() + Duration::from_secs(5)));
        ctl.request_stop(StopReason::HostRequest);
        for t in threads {
            t.join().unwrap();
        }
        assert!(
            !ctl.pause(Instant::now() + Duration::from_secs(5)),
            "a stopped VM paused"
        );
    }

    #[test]
    fn a_pause_gives_up_at_its_deadline_when_a_vcpu_does_not_park() {
        let ctl = VmControl::new();
        let (steps, threads) = fake_vcpus(&ctl, 1);
        // A second registered thread that never looks at the pause.
        let (stuck_tx, stuck_rx) = std::sync::mpsc::channel::<()>();
        let c2 = Arc::clone(&ctl);
        let stuck = std::thread::spawn(move || {
            c2.register_thread();
            let _ = stuck_rx.recv();
            c2.unregister_thread();
        });
        while ctl.threads.lock().unwrap().len() < 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let t = Instant::now();
        assert!(!ctl.pause(Instant::now() + Duration::from_millis(50)));
        assert!(t.elapsed() >= Duration::from_millis(50));
        // The pause was undone: the well-behaved vCPU runs again.
        let before = steps.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        assert!(steps.load(Ordering::SeqCst) > before);
        drop(stuck_tx);
        stuck.join().unwrap();
        ctl.request_stop(StopReason::HostRequest);
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn stop_reasons_read_as_causes() {
        assert_eq!(
            StopReason::GuestPanic.to_string(),
            "the guest kernel panicked"
        );
        assert_eq!(
            StopReason::Fault("vCPU 0: KVM_RUN failed: EFAULT".into()).to_string(),
            "KVM fault: vCPU 0: KVM_RUN failed: EFAULT"
        );
    }
}
