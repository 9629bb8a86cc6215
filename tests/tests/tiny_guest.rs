//! Fast VMM tests on the machine's own /dev/kvm with a hand-written guest:
//! a few bytes of 64-bit code in a minimal ELF, entered exactly like a Linux
//! vmlinux (page tables, GDT, long mode, zero page). It prints over COM1,
//! reads a virtio-mmio register, and resets through the i8042 port.
//!
//! These need a /dev/kvm but not a Linux-capable one, so they also run on
//! the PVM host here (which emulates guest CPL0 code: keep the guest to
//! plain integer code and port/MMIO I/O).

use std::path::Path;
use std::time::Duration;

use jevm_runtime::vmm::{DiskConfig, StopReason, Vm, VmConfig};
use jevm_tests::tiny::{tiny_elf, SPIN_ON_FLAG};

/// mov dx,0x3f8; mov al,'j'; out dx,al; mov eax,0xd0000000; mov eax,[rax]
/// (virtio magic, low byte 'v'); out dx,al; mov al,'\n'; out dx,al;
/// mov al,0xfe; out 0x64,al; hlt
const GUEST: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'j', // mov al, 'j'
    0xee, // out dx, al
    0xb8, 0x00, 0x00, 0x00, 0xd0, // mov eax, 0xd0000000 (zero-extends into rax)
    0x8b, 0x00, // mov eax, [rax]
    0xee, // out dx, al
    0xb0, b'\n', // mov al, '\n'
    0xee,  // out dx, al
    0xb0, 0xfe, // mov al, 0xfe
    0xe6, 0x64, // out 0x64, al
    0xf4, // hlt
];

fn config(dir: &Path, code: &[u8]) -> VmConfig {
    let kernel = dir.join("tiny.elf");
    std::fs::write(&kernel, tiny_elf(code)).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    VmConfig {
        kernel,
        initrd: None,
        vcpus: 1,
        mem_mib: 64,
        extra_cmdline: String::new(),
        vsock_uds: None,
        disks: vec![DiskConfig {
            path: disk,
            read_only: true,
        }],
        console_log: Some(dir.join("console.log")),
    }
}

#[test]
fn tiny_guest_enters_long_mode_prints_reads_virtio_magic_and_resets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), GUEST);
    let vm = Vm::start(&cfg).expect("start");
    let reason = vm.wait(Some(Duration::from_secs(60)));
    assert_eq!(
        reason,
        Some(StopReason::GuestReset),
        "console: {:?}",
        vm.console_tail(5)
    );
    assert_eq!(vm.console_tail(5), vec!["jv".to_string()]);
    drop(vm);
    assert_eq!(
        std::fs::read(dir.path().join("console.log")).unwrap(),
        b"jv\n"
    );
}

#[test]
fn host_stop_ends_a_guest_that_spins_forever() {
    let dir = tempfile::tempdir().unwrap();
    // jmp $ : a guest that never exits on its own
    let cfg = config(dir.path(), &[0xeb, 0xfe]);
    let mut vm = Vm::start(&cfg).expect("start");
    assert_eq!(vm.wait(Some(Duration::from_millis(200))), None);
    vm.stop();
    assert_eq!(vm.stop_reason(), Some(StopReason::HostRequest));
}

#[test]
fn zero_vcpus_and_tiny_memory_are_refused_before_any_vm_exists() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), GUEST);
    cfg.vcpus = 0;
    let e = Vm::start(&cfg).err().expect("0 vCPUs refused");
    assert!(e.to_string().contains("vCPU count"), "{e}");
    cfg.vcpus = 1;
    cfg.mem_mib = 8;
    let e = Vm::start(&cfg).err().expect("8 MiB refused");
    assert!(e.to_string().contains("too small"), "{e}");
}

fn wait_for_console(vm: &Vm, line: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !vm.console_tail(5).iter().any(|l| l == line) {
        assert!(
            std::time::Instant::now() < deadline,
            "guest never printed {line:?}: {:?}",
            vm.console_tail(5)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn sha(path: &Path) -> Vec<u8> {
    // A cheap, dependency-free digest is enough to see a change.
    let data = std::fs::read(path).unwrap();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h.to_le_bytes().to_vec()
}

#[test]
fn saved_vm_restores_into_independent_copy_on_write_clones() {
    use jevm_runtime::vmm::RestoreConfig;
    use vm_memory::{Bytes, GuestAddress};

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), SPIN_ON_FLAG);
    cfg.disks.clear();
    let mut template = Vm::start(&cfg).expect("start");
    wait_for_console(&template, "A");
    let state = template.save().expect("save");
    let memory = dir.path().join("memory");
    template.save_memory(&memory).unwrap();
    drop(template);
    let before = sha(&memory);

    let restore = |name: &str| {
        Vm::restore(
            &state,
            &RestoreConfig {
                memory: memory.clone(),
                memory_file: None,
                vsock_uds: dir.path().join(format!("{name}.vsock")),
                console_log: None,
                share: None,
                share_device_nodes: Default::default(),
                tap: None,
            },
        )
        .expect("restore")
    };
    let a = restore("a");
    let b = restore("b");
    // Clone A is released with 'x'; clone B keeps spinning: A's write went
    // to A's private page only.
    a.guest_memory()
        .write_obj(b'x', GuestAddress(0x3000))
        .unwrap();
    assert_eq!(
        a.wait(Some(Duration::from_secs(60))),
        Some(StopReason::GuestReset)
    );
    assert_eq!(a.console_tail(5), vec!["x".to_string()]);
    assert_eq!(
        b.wait(Some(Duration::from_millis(300))),
        None,
        "clone B saw clone A's write"
    );
    let flag_b: u8 = b.guest_memory().read_obj(GuestAddress(0x3000)).unwrap();
    assert_eq!(flag_b, 0);
    b.guest_memory()
        .write_obj(b'y', GuestAddress(0x3000))
        .unwrap();
    assert_eq!(
        b.wait(Some(Duration::from_secs(60))),
        Some(StopReason::GuestReset)
    );
    assert_eq!(b.console_tail(5), vec!["y".to_string()]);
    drop((a, b));
    assert_eq!(
        sha(&memory),
        before,
        "a clone wrote through to the template memory file"
    );
}
