//! Boots the real guest kernel and agent with jevm's VMM on real KVM.
//!
//! Needs a /dev/kvm that runs ordinary guests: `make test` runs this binary
//! inside the KVM test host (hack/kvm-host) when the machine's own cannot.
//! The tests share one lock: they count this process's threads and fds, and
//! nested guests on two cores are slow enough one at a time.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use jevm_protocol::{Diag, Request, Response};
use jevm_runtime::microvm::{BootConfig, BootFailure, MicroVm};
use jevm_runtime::vmm::{DiskConfig, StopReason, VmError};
use jevm_tests::{footprint, guest_artifacts, leak_since, newc_cpio};

static SERIAL: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn run_root() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("jevm-test-run")
        .tempdir()
        .unwrap()
}

fn config() -> BootConfig {
    let (kernel, initrd) = guest_artifacts();
    let mut c = BootConfig::new(kernel, initrd);
    c.ready_timeout = Duration::from_secs(120);
    c
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false)
}

fn boot_and_check(vcpus: u8) {
    let root = run_root();
    let mut cfg = config();
    cfg.vcpus = vcpus;
    let vm = MicroVm::boot(&cfg, root.path()).expect("boot");
    assert_eq!(vm.agent_version, env!("CARGO_PKG_VERSION"));
    let mut agent = vm.agent().unwrap();
    assert_eq!(agent.version().unwrap(), env!("CARGO_PKG_VERSION"));
    agent.ping(0x5eed_0000 + u64::from(vcpus)).unwrap();
    match agent.call(&Request::Diag(Diag::OnlineCpus)).unwrap() {
        Response::Count(n) => assert_eq!(n, u64::from(vcpus), "guest sees {n} CPUs"),
        other => panic!("OnlineCpus answered {other:?}"),
    }
    drop(agent);
    assert_eq!(vm.shutdown(Duration::from_secs(30)), StopReason::GuestReset);
    assert!(is_empty_dir(root.path()), "run directory left behind");
}

#[test]
fn boots_with_one_vcpu_and_agent_answers_version_and_ping() {
    let _l = lock();
    boot_and_check(1);
}

#[test]
fn boots_with_two_vcpus_and_guest_sees_both() {
    let _l = lock();
    boot_and_check(2);
}

#[test]
fn guest_initiated_vsock_connection_reaches_host_socket_with_port_suffix() {
    let _l = lock();
    let root = run_root();
    let vm = MicroVm::boot(&config(), root.path()).expect("boot");
    let port = 5123;
    let path = PathBuf::from(format!("{}_{port}", vm.vsock_uds().display()));
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap(); // the agent shuts down its write side
        s.write_all(b"hello guest, from the host").unwrap();
        got
    });
    let answer = vm
        .agent()
        .unwrap()
        .call(&Request::Diag(Diag::DialHost {
            port,
            data: b"hello host, from the guest".to_vec(),
        }))
        .unwrap();
    assert_eq!(server.join().unwrap(), b"hello host, from the guest");
    assert_eq!(
        answer,
        Response::Bytes(b"hello guest, from the host".to_vec())
    );
    std::fs::remove_file(&path).unwrap();
    vm.shutdown(Duration::from_secs(30));
}

#[test]
fn block_device_written_in_guest_holds_bytes_on_host_and_read_only_disk_refuses_writes() {
    let _l = lock();
    let dir = tempfile::tempdir().unwrap();
    let rw = dir.path().join("rw.img");
    let ro = dir.path().join("ro.img");
    std::fs::write(&rw, vec![0u8; 1 << 20]).unwrap();
    let ro_content: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&ro, &ro_content).unwrap();

    let root = run_root();
    let mut cfg = config();
    cfg.disks = vec![
        DiskConfig {
            path: rw.clone(),
            read_only: false,
        },
        DiskConfig {
            path: ro.clone(),
            read_only: true,
        },
    ];
    let vm = MicroVm::boot(&cfg, root.path()).expect("boot");
    let mut agent = vm.agent().unwrap();
    let pattern: Vec<u8> = b"jevm-virtio-blk!"
        .iter()
        .cycle()
        .take(8192)
        .copied()
        .collect();
    let r = agent
        .call(&Request::Diag(Diag::WriteFile {
            path: "/dev/vda".into(),
            offset: 65536,
            data: pattern.clone(),
        }))
        .unwrap();
    assert_eq!(r, Response::Written { len: 8192 });
    // The read-only disk reads the host's bytes ...
    let r = agent
        .call(&Request::Diag(Diag::ReadFile {
            path: "/dev/vdb".into(),
            offset: 4096,
            len: 64,
        }))
        .unwrap();
    assert_eq!(r, Response::Bytes(ro_content[4096..4160].to_vec()));
    // ... and refuses writes.
    let r = agent
        .call(&Request::Diag(Diag::WriteFile {
            path: "/dev/vdb".into(),
            offset: 0,
            data: vec![0xff; 512],
        }))
        .unwrap();
    match r {
        Response::Error { message, .. } => assert!(
            message.contains("/dev/vdb")
                && (message.contains("Read-only") || message.contains("not permitted")),
            "unexpected error: {message}"
        ),
        other => panic!("write to the read-only disk answered {other:?}"),
    }
    drop(agent);
    assert_eq!(vm.shutdown(Duration::from_secs(30)), StopReason::GuestReset);

    let host = std::fs::read(&rw).unwrap();
    assert_eq!(&host[65536..65536 + 8192], &pattern[..]);
    assert!(host[..65536].iter().all(|&b| b == 0));
    assert_eq!(
        std::fs::read(&ro).unwrap(),
        ro_content,
        "read-only disk changed on the host"
    );
}

#[test]
fn ten_boots_in_a_row_leave_no_thread_fd_memfd_socket_or_file_behind() {
    let _l = lock();
    let root = run_root();
    // One boot first: the process-wide lazies (signal handler, logger) are
    // set up once and are not a leak.
    MicroVm::boot(&config(), root.path())
        .expect("boot")
        .shutdown(Duration::from_secs(30));
    let before = footprint();
    for i in 0..10 {
        let vm = MicroVm::boot(&config(), root.path()).unwrap_or_else(|e| panic!("boot {i}: {e}"));
        vm.agent().unwrap().ping(i).unwrap();
        assert_eq!(
            vm.shutdown(Duration::from_secs(30)),
            StopReason::GuestReset,
            "boot {i}"
        );
    }
    assert_eq!(
        leak_since(&before, Duration::from_secs(2)),
        None,
        "threads/fds/memfds before and after 10 boots (before: {before:?})"
    );
    assert!(is_empty_dir(root.path()), "files left in the run directory");
}

fn expect_boot_error(cfg: &BootConfig) -> BootFailure {
    let root = run_root();
    // The jail's spawner thread lives as long as the process, from the
    // first VM on: set up before counting.
    let _ = jevm_runtime::jail::init(jevm_runtime::jail::Mode::from_env());
    let before = footprint();
    let err = match MicroVm::boot(cfg, root.path()) {
        Ok(_) => panic!("boot unexpectedly succeeded"),
        Err(e) => e,
    };
    assert_eq!(
        leak_since(&before, Duration::from_secs(2)),
        None,
        "a failed boot leaked threads or fds: {err} (before: {before:?})"
    );
    assert!(is_empty_dir(root.path()), "a failed boot left files: {err}");
    err
}

#[test]
fn missing_kernel_is_refused_naming_the_file() {
    let _l = lock();
    let mut cfg = config();
    cfg.kernel = PathBuf::from("/nonexistent/vmlinux");
    let msg = expect_boot_error(&cfg).to_string();
    assert!(
        msg.contains("/nonexistent/vmlinux") && msg.contains("No such file"),
        "{msg}"
    );
}

#[test]
fn kernel_that_is_not_a_vmlinux_is_refused_naming_the_file() {
    let _l = lock();
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("not-a-kernel");
    std::fs::write(&bogus, b"#!/bin/sh\necho this is not a kernel\n").unwrap();
    let mut cfg = config();
    cfg.kernel = bogus.clone();
    let msg = expect_boot_error(&cfg).to_string();
    assert!(
        msg.contains(&*bogus.to_string_lossy())
            && msg.contains("not a loadable x86_64 ELF vmlinux"),
        "{msg}"
    );
}

#[test]
fn initramfs_whose_init_fails_reports_a_guest_panic_with_console_lines() {
    let _l = lock();
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("panics.cpio");
    std::fs::write(
        &initrd,
        newc_cpio(&[("init", 0o100755, b"this is not an executable\n")]),
    )
    .unwrap();
    let mut cfg = config();
    cfg.initrd = initrd;
    let err = expect_boot_error(&cfg);
    assert!(
        matches!(err, BootFailure::GuestPanicked(_)),
        "expected a guest panic, got: {err}"
    );
    assert!(err.to_string().contains("Kernel panic"), "{err}");
}

#[test]
fn too_little_memory_is_refused() {
    let _l = lock();
    let mut cfg = config();
    cfg.mem_mib = 16;
    let err = expect_boot_error(&cfg);
    assert!(matches!(err, BootFailure::Vm(VmError::Memory(_))), "{err}");
    assert!(err.to_string().contains("too small"), "{err}");
}

#[test]
fn zero_vcpus_is_refused() {
    let _l = lock();
    let mut cfg = config();
    cfg.vcpus = 0;
    let err = expect_boot_error(&cfg);
    assert!(
        matches!(err, BootFailure::Vm(VmError::VcpuCount(0))),
        "{err}"
    );
}
