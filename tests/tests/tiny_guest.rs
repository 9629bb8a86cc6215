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
        share: None,
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

/// A template's `state.json`, edited by whoever could write the template
/// store (the manifest's SHA-256 would be rewritten with it): restoring it
/// must be refused with an error or give a VM that runs and stops, never
/// take the host process down (a panic, a crash, a VMM thread outside its
/// jail). Each case builds a real VM, so the long run (`hack/fuzz`) caps
/// this one's cases at 5000.
mod state_fuzz {
    use super::*;
    use jevm_runtime::vmm::{RestoreConfig, VmState};
    use proptest::prelude::*;
    use serde_json::Value;
    use std::path::PathBuf;
    use std::sync::OnceLock;

    struct Template {
        _dir: tempfile::TempDir,
        memory: PathBuf,
        /// As saved, and with every device made active on queues in
        /// guest memory (what a template of a real guest looks like).
        seeds: Vec<Value>,
    }

    fn template() -> &'static Template {
        static T: OnceLock<Template> = OnceLock::new();
        T.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = config(dir.path(), SPIN_ON_FLAG);
            cfg.disks.clear();
            cfg.vsock_uds = Some(dir.path().join("template.vsock"));
            let mut vm = Vm::start(&cfg).expect("start");
            wait_for_console(&vm, "A");
            let state = vm.save().expect("save");
            let memory = dir.path().join("memory");
            vm.save_memory(&memory).unwrap();
            drop(vm);
            let saved = serde_json::to_value(&state).unwrap();
            let active =
                serde_json::to_value(jevm_tests::tiny::with_devices_active(&state)).unwrap();
            Template {
                _dir: dir,
                memory,
                seeds: vec![saved, active],
            }
        })
    }

    /// A place an edit can go: a JSON pointer, whether it is an array, and
    /// whether it lies in a long array (register pages: LAPIC, XSAVE).
    struct Place {
        at: String,
        array: bool,
        bulk: bool,
    }

    fn places(v: &Value, at: String, bulk: bool, out: &mut Vec<Place>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    places(v, format!("{at}/{k}"), bulk, out);
                }
            }
            Value::Array(a) => {
                let long = a.len() > 64;
                out.push(Place {
                    at: at.clone(),
                    array: true,
                    bulk: bulk || long,
                });
                for (i, v) in a.iter().enumerate() {
                    places(v, format!("{at}/{i}"), bulk || long, out);
                }
            }
            _ => out.push(Place {
                at,
                array: false,
                bulk,
            }),
        }
    }

    /// How a leaf is changed: kept to its type, and mostly to its width, so
    /// that most edits still parse and reach the restore.
    #[derive(Debug, Clone)]
    enum Change {
        Zero,
        FlipBit(u8),
        Add(i8),
        Any(u64),
        Max,
    }

    #[derive(Debug, Clone)]
    enum Edit {
        /// Change a leaf (`bulk`: one in the register pages).
        /// `narrow`: the result is cut to the old value's width (1, 2, 4
        /// or 8 bytes), so that it fits the field's type more often.
        Set {
            pick: usize,
            bulk: bool,
            change: Change,
            narrow: bool,
        },
        /// Drop an array's tail from this length on, or repeat its last item.
        Truncate(usize, usize),
        Grow(usize),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        let change = prop_oneof![
            1 => Just(Change::Zero),
            3 => (0u8..8).prop_map(Change::FlipBit),
            1 => (0u8..64).prop_map(Change::FlipBit),
            1 => (-2i8..=2).prop_map(Change::Add),
            1 => any::<u64>().prop_map(Change::Any),
            1 => Just(Change::Max),
        ];
        prop_oneof![
            8 => (any::<usize>(), prop::bool::weighted(0.2), change, prop::bool::weighted(0.8))
                .prop_map(|(pick, bulk, change, narrow)| Edit::Set { pick, bulk, change, narrow }),
            1 => (any::<usize>(), 0usize..4).prop_map(|(i, n)| Edit::Truncate(i, n)),
            1 => any::<usize>().prop_map(Edit::Grow),
        ]
    }

    fn changed(old: &Value, change: &Change, narrow: bool) -> Value {
        if let Some(b) = old.as_bool() {
            return Value::from(!b);
        }
        let Some(n) = old.as_u64() else {
            return old.clone();
        };
        let new = match *change {
            Change::Zero => 0,
            Change::FlipBit(bit) => n ^ (1u64 << bit),
            Change::Add(d) => n.wrapping_add_signed(i64::from(d)),
            Change::Any(x) => x,
            Change::Max => u64::MAX,
        };
        let width_bits = match n {
            0..=0xff => 8,
            0x100..=0xffff => 16,
            0x1_0000..=0xffff_ffff => 32,
            _ => 64,
        };
        if narrow && width_bits < 64 {
            (new & ((1u64 << width_bits) - 1)).into()
        } else {
            new.into()
        }
    }

    fn apply(seed: &Value, edits: &[Edit]) -> Value {
        let mut v = seed.clone();
        for e in edits {
            let mut all = Vec::new();
            places(&v, String::new(), false, &mut all);
            let arrays: Vec<&Place> = all.iter().filter(|p| p.array && !p.bulk).collect();
            match e {
                Edit::Set {
                    pick,
                    bulk,
                    change,
                    narrow,
                } => {
                    let leaves: Vec<&Place> =
                        all.iter().filter(|p| !p.array && p.bulk == *bulk).collect();
                    if leaves.is_empty() {
                        continue;
                    }
                    let leaf = v.pointer_mut(&leaves[pick % leaves.len()].at).unwrap();
                    *leaf = changed(leaf, change, *narrow);
                }
                Edit::Truncate(i, n) if !arrays.is_empty() => {
                    let p = &arrays[i % arrays.len()].at;
                    v.pointer_mut(p)
                        .unwrap()
                        .as_array_mut()
                        .unwrap()
                        .truncate(*n);
                }
                Edit::Grow(i) if !arrays.is_empty() => {
                    let p = &arrays[i % arrays.len()].at;
                    let a = v.pointer_mut(p).unwrap().as_array_mut().unwrap();
                    if let Some(last) = a.last().cloned() {
                        a.push(last);
                    }
                }
                _ => {}
            }
        }
        v
    }

    fn restore(state: &VmState, dir: &Path) -> Result<Vm, jevm_runtime::vmm::VmError> {
        Vm::restore(
            state,
            &RestoreConfig {
                memory: template().memory.clone(),
                memory_file: None,
                vsock_uds: dir.join("clone.vsock"),
                console_log: None,
                share: None,
                share_device_nodes: Default::default(),
                tap: None,
            },
        )
    }

    /// The seeds themselves restore: the edits start from states that work.
    #[test]
    fn the_state_fuzz_seeds_restore_and_run() {
        for seed in &template().seeds {
            let state: VmState = serde_json::from_value(seed.clone()).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let mut vm = restore(&state, dir.path()).expect("restore of a seed");
            assert_eq!(
                vm.wait(Some(Duration::from_millis(50))),
                None,
                "the seed's guest stopped"
            );
            vm.stop();
        }
    }

    fn cases() -> u32 {
        ProptestConfig::default().cases.min(5000)
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: cases(),
            // Beside this file: an integration test has no lib.rs to go by.
            failure_persistence: Some(Box::new(
                proptest::test_runner::FileFailurePersistence::WithSource("regressions"),
            )),
            ..ProptestConfig::default()
        })]

        #[test]
        fn fuzz_restoring_an_edited_template_state(
            seed in 0usize..2,
            edits in prop::collection::vec(edit(), 1..6),
        ) {
            let t = template();
            let edited = apply(&t.seeds[seed], &edits);
            let Ok(state) = serde_json::from_value::<VmState>(edited) else {
                return Ok(());
            };
            let dir = tempfile::tempdir().unwrap();
            match restore(&state, dir.path()) {
                Ok(mut vm) => {
                    // Let it run into whatever the edit made of it.
                    let _ = vm.wait(Some(Duration::from_millis(5)));
                    vm.stop();
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}
