//! The jail is process-wide (a SIGSYS handler, filters that end the
//! process), so each scenario runs in a child: this test binary run again
//! on one test with `JEVM_JAIL_CHILD` naming the scenario.

use std::process::Command;
use std::time::{Duration, Instant};

use super::*;

const CHILD: &str = "JEVM_JAIL_CHILD";

/// Runs `scenario` in a child process (the test named `child_runner` of
/// this binary) and returns its exit status and stderr.
fn run_child(scenario: &str) -> (Option<i32>, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "jail::tests::child_runner",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, scenario)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `scenario` in a child that must exit 0; returns its stderr.
fn child_passes(scenario: &str) -> String {
    let (code, stderr) = run_child(scenario);
    assert_eq!(code, Some(0), "{scenario}: {stderr}");
    stderr
}

/// Not a test of its own: the body of the child processes.
#[test]
fn child_runner() {
    let Ok(scenario) = std::env::var(CHILD) else {
        return;
    };
    match scenario.as_str() {
        "denied" => {
            init(Mode::Kill).unwrap();
            deny_on_a_vcpu()
        }
        "logged" => {
            init(Mode::Log).unwrap();
            let t = spawn("vcpu0", ThreadKind::Vcpu, || {
                // SAFETY: as above; in log mode it runs.
                unsafe { libc::getppid() }
            })
            .unwrap();
            assert!(t.join().unwrap().unwrap() > 0);
            std::process::exit(0);
        }
        "spawn-from-jail" => {
            init(Mode::Kill).unwrap();
            // A vCPU (no clone in its list) activating a device gets the
            // worker from the spawner, jailed as a worker.
            let t = spawn("vcpu0", ThreadKind::Vcpu, || {
                let w = spawn("fs", ThreadKind::Fs, current).unwrap();
                // And set-up beyond its list (a device reset opening a new
                // file-server session) runs outside the jail.
                let opened = outside(|| std::fs::File::open("/proc/self/status").is_ok()).unwrap();
                (current(), w.join().unwrap().unwrap(), opened)
            })
            .unwrap();
            let (vcpu, fs, opened) = t.join().unwrap().unwrap();
            assert_eq!((vcpu, fs), (Some(ThreadKind::Vcpu), Some(ThreadKind::Fs)));
            assert!(opened);
            std::process::exit(0);
        }
        "capabilities" => {
            // Log mode: the vCPU list has no capget to look with.
            init(Mode::Log).unwrap();
            let held = |set| caps::read(None, set).unwrap();
            let root = held(CapSet::Permitted);
            let vcpu = spawn("vcpu0", ThreadKind::Vcpu, move || {
                (held(CapSet::Effective), held(CapSet::Permitted))
            })
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
            assert!(vcpu.0.is_empty() && vcpu.1.is_empty(), "{vcpu:?}");
            let fs = spawn("fs", ThreadKind::Fs, move || held(CapSet::Permitted))
                .unwrap()
                .join()
                .unwrap()
                .unwrap();
            let want: CapsHashSet = ThreadKind::Fs
                .capabilities()
                .intersection(&root)
                .copied()
                .collect();
            assert_eq!(fs, want);
            // The spawning thread keeps what it had.
            assert_eq!(held(CapSet::Permitted), root);
            std::process::exit(0);
        }
        "beneath" => {
            init(Mode::Kill).unwrap();
            let share = std::env::temp_dir().join(format!("jevm-jail-{}", std::process::id()));
            std::fs::create_dir_all(share.join("sub")).unwrap();
            std::fs::write(share.join("sub/f"), "in").unwrap();
            let inside = share.join("sub/f");
            let t = spawn_beneath("fs", ThreadKind::Fs, Some(share.clone()), move || {
                let read_in = std::fs::read_to_string(&inside).map_err(|e| e.kind());
                let made = std::fs::write(inside.with_file_name("new"), "x").map_err(|e| e.kind());
                let read_out = std::fs::read("/etc/passwd").map_err(|e| e.raw_os_error());
                (read_in, made, read_out)
            })
            .unwrap();
            let (read_in, made, read_out) = t.join().unwrap().unwrap();
            let _ = std::fs::remove_dir_all(&share);
            assert_eq!(read_in, Ok("in".to_string()));
            assert_eq!(made, Ok(()));
            if landlock_supported() {
                assert_eq!(read_out.map(|_| ()), Err(Some(libc::EACCES)));
            } else {
                eprintln!("this kernel has no Landlock: the outside read was not refused");
            }
            // Unattached: no file by path at all.
            let t = spawn_beneath("fs", ThreadKind::Fs, None, || {
                std::fs::read("/etc/passwd")
                    .map_err(|e| e.raw_os_error())
                    .map(|_| ())
            })
            .unwrap();
            let r = t.join().unwrap().unwrap();
            if landlock_supported() {
                assert_eq!(r, Err(Some(libc::EACCES)));
            }
            std::process::exit(0);
        }
        "process-capabilities" => {
            let had = caps::read(None, CapSet::Permitted).unwrap();
            let had_bounding = caps::read(None, CapSet::Bounding).unwrap();
            let setpcap = had.contains(&Capability::CAP_SETPCAP);
            limit_process_capabilities(&[Capability::CAP_SYS_ADMIN, Capability::CAP_NET_ADMIN])
                .unwrap();
            let keep: CapsHashSet = [Capability::CAP_SYS_ADMIN, Capability::CAP_NET_ADMIN]
                .into_iter()
                .collect();
            let want: CapsHashSet = keep.intersection(&had).copied().collect();
            // A thread started afterwards has the same.
            let (permitted, effective, inheritable, bounding) = std::thread::spawn(|| {
                (
                    caps::read(None, CapSet::Permitted).unwrap(),
                    caps::read(None, CapSet::Effective).unwrap(),
                    caps::read(None, CapSet::Inheritable).unwrap(),
                    caps::read(None, CapSet::Bounding).unwrap(),
                )
            })
            .join()
            .unwrap();
            assert_eq!(permitted, want);
            assert_eq!(effective, want);
            assert!(inheritable.is_empty());
            if setpcap {
                let want_bounding: CapsHashSet =
                    keep.intersection(&had_bounding).copied().collect();
                assert_eq!(bounding, want_bounding);
            }
            std::process::exit(0);
        }
        "ahead" => {
            init(Mode::Kill).unwrap();
            prepare(ThreadKind::Fs, 1);
            prepare(ThreadKind::Vcpu, 2);
            // Asking again for what is on its way adds nothing.
            prepare(ThreadKind::Vcpu, 2);
            wait_parked(ThreadKind::Fs, 1);
            wait_parked(ThreadKind::Vcpu, 2);
            let share = std::env::temp_dir().join(format!("jevm-ahead-{}", std::process::id()));
            std::fs::create_dir_all(&share).unwrap();
            std::fs::write(share.join("f"), "in").unwrap();
            let inside = share.join("f");
            let (go_tx, go_rx) = mpsc::channel::<()>();
            let t = spawn_beneath("fs-ahead", ThreadKind::Fs, Some(share.clone()), move || {
                let read_in = std::fs::read_to_string(&inside).map_err(|e| e.kind());
                let read_out = std::fs::read("/etc/passwd").map_err(|e| e.raw_os_error());
                // SAFETY: gettid has no arguments.
                let tid = unsafe { libc::gettid() };
                let _ = go_rx.recv();
                (current(), read_in, read_out.map(|_| ()), tid)
            })
            .unwrap();
            // The parked thread took the work: none left, and it carries
            // the work's name.
            assert_eq!(JAIL.get().unwrap().ahead.parked(ThreadKind::Fs), 0);
            let tids: Vec<String> = std::fs::read_dir("/proc/self/task")
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            let named = tids.iter().any(|tid| {
                std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap()
                    == "fs-ahead\n"
            });
            assert!(named, "no thread is called fs-ahead");
            go_tx.send(()).unwrap();
            let (kind, read_in, read_out, _tid) = t.join().unwrap().unwrap();
            let _ = std::fs::remove_dir_all(&share);
            assert_eq!(kind, Some(ThreadKind::Fs));
            assert_eq!(read_in, Ok("in".to_string()));
            if landlock_supported() {
                assert_eq!(read_out, Err(Some(libc::EACCES)));
            }
            // A parked vCPU is in its jail: a syscall outside its list
            // still ends the process (the parent checks the report).
            deny_on_a_vcpu()
        }
        "cost" => {
            let t0 = Instant::now();
            init(Mode::Kill).unwrap();
            let compile = t0.elapsed();
            let dir = std::env::temp_dir();
            // A thread started on the spot (what a VM started without
            // preparing pays) and one started ahead (what a clone pays),
            // both timed from the spawn call to the thread running its
            // work in the fs jail, Landlock included.
            let mut fresh = Vec::new();
            let mut ahead = Vec::new();
            for _ in 0..50 {
                let t0 = Instant::now();
                let t = spawn_beneath("fs", ThreadKind::Fs, Some(dir.clone()), move || {
                    t0.elapsed()
                })
                .unwrap();
                fresh.push(t.join().unwrap().unwrap());
                prepare(ThreadKind::Fs, 1);
                wait_parked(ThreadKind::Fs, 1);
                let t0 = Instant::now();
                let t = spawn_beneath("fs", ThreadKind::Fs, Some(dir.clone()), move || {
                    t0.elapsed()
                })
                .unwrap();
                ahead.push(t.join().unwrap().unwrap());
            }
            // The parts of entering: capabilities alone, and the filter alone.
            let mut caps_only = Vec::new();
            let mut filter_only = Vec::new();
            let prog: BpfProgram = allowlists::filter(ThreadKind::Fs, SeccompAction::Trap)
                .unwrap()
                .try_into()
                .unwrap();
            for _ in 0..50 {
                let keep = ThreadKind::Fs.capabilities();
                caps_only.push(
                    std::thread::spawn(move || {
                        let t0 = Instant::now();
                        for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
                            let _ = caps::set(None, set, &keep);
                        }
                        t0.elapsed()
                    })
                    .join()
                    .unwrap(),
                );
                let p = prog.clone();
                filter_only.push(
                    std::thread::spawn(move || {
                        let t0 = Instant::now();
                        seccompiler::apply_filter(&p).unwrap();
                        t0.elapsed()
                    })
                    .join()
                    .unwrap(),
                );
            }
            let median = |v: &mut Vec<Duration>| {
                v.sort();
                v[v.len() / 2]
            };
            let ahead_median = median(&mut ahead);
            eprintln!(
                "jail cost: compiling all filters {compile:?}; starting an fs thread (spawn call to its work running) median {:?} started on the spot, {ahead_median:?} jailed ahead; entering parts: capabilities {:?}, seccomp filter {:?} ({} BPF instructions)",
                median(&mut fresh),
                median(&mut caps_only),
                median(&mut filter_only),
                prog.len(),
            );
            assert!(
                ahead_median < Duration::from_millis(1),
                "a thread jailed ahead took {ahead_median:?} to start its work"
            );
            std::process::exit(0);
        }
        other => panic!("unknown scenario {other}"),
    }
}

/// Makes a syscall outside the vCPU list on a vCPU thread: the process
/// must end in the SIGSYS handler before the line after it is printed.
fn deny_on_a_vcpu() -> ! {
    let t = spawn("vcpu0", ThreadKind::Vcpu, || {
        // SAFETY: getppid has no arguments and no side effects; the
        // filter stops it first.
        unsafe { libc::getppid() }
    })
    .unwrap();
    let _ = t.join();
    eprintln!("the denied syscall returned");
    std::process::exit(0)
}

/// Waits (at most 5 s) until `count` threads of `kind` are parked.
fn wait_parked(kind: ThreadKind, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while JAIL.get().unwrap().ahead.parked(kind) < count {
        assert!(Instant::now() < deadline, "no {kind:?} thread parked");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether this kernel enforces Landlock (ABI version query).
fn landlock_supported() -> bool {
    // SAFETY: the version query takes no pointer (NULL, 0) and changes nothing.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    abi >= 1
}

#[test]
fn a_file_server_thread_reaches_files_only_beneath_its_directory() {
    child_passes("beneath");
}

#[test]
fn a_denied_syscall_is_reported_with_its_number_and_ends_the_process() {
    let (code, stderr) = run_child("denied");
    assert_eq!(code, Some(sigsys::EXIT_STATUS), "{stderr}");
    let want = format!(
        "jevm: seccomp: a vcpu thread made syscall {}, which its allow-list does not hold",
        libc::SYS_getppid
    );
    assert!(stderr.contains(&want), "{stderr}");
    assert!(!stderr.contains("the denied syscall returned"), "{stderr}");
}

#[test]
fn in_log_mode_a_syscall_outside_the_list_goes_through() {
    child_passes("logged");
}

#[test]
fn a_jailed_thread_gets_its_workers_from_the_spawner() {
    child_passes("spawn-from-jail");
}

#[test]
fn jailed_threads_keep_only_their_kinds_capabilities() {
    child_passes("capabilities");
}

#[test]
fn the_shim_process_keeps_only_the_capabilities_it_names() {
    child_passes("process-capabilities");
}

#[test]
fn a_thread_jailed_ahead_takes_the_work_its_name_and_its_confinement() {
    let (code, stderr) = run_child("ahead");
    assert_eq!(code, Some(sigsys::EXIT_STATUS), "{stderr}");
    assert!(
        stderr.contains("jevm: seccomp: a vcpu thread made syscall"),
        "{stderr}"
    );
    assert!(!stderr.contains("the denied syscall returned"), "{stderr}");
}

#[test]
fn a_thread_jailed_ahead_starts_in_microseconds() {
    let stderr = child_passes("cost");
    eprintln!(
        "{}",
        stderr
            .lines()
            .find(|l| l.starts_with("jail cost"))
            .unwrap_or("")
    );
}

#[test]
fn every_filter_compiles_and_lets_the_handler_report_and_exit() {
    for kind in ThreadKind::ALL {
        allowlists::filter(kind, SeccompAction::Trap).unwrap();
        let allowed = allowlists::allowed(kind);
        for nr in [
            libc::SYS_write,
            libc::SYS_exit_group,
            libc::SYS_rt_sigreturn,
        ] {
            assert!(allowed.contains(&nr), "{kind:?} lacks {nr}");
        }
        // No jailed thread creates threads or runs programs.
        for nr in [
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_execve,
            libc::SYS_fork,
        ] {
            assert!(!allowed.contains(&nr), "{kind:?} allows {nr}");
        }
    }
    assert_eq!("kill".parse(), Ok(Mode::Kill));
    assert!("strict"
        .parse::<Mode>()
        .unwrap_err()
        .contains("kill, log, off"));
}

#[test]
#[ignore = "a measurement: cargo test --release -p jevm-runtime jail::tests::filter_install_cost -- --ignored --nocapture"]
fn filter_install_cost() {
    use seccompiler::{SeccompFilter, TargetArch};
    for n in [1usize, 10, 40, 80] {
        // Syscall numbers nothing uses, so the measuring thread runs on.
        let rules = (0..n as i64).map(|i| (400 + i, vec![])).collect();
        let f = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Trap,
            TargetArch::x86_64,
        )
        .unwrap();
        let prog: BpfProgram = f.try_into().unwrap();
        let mut t = Vec::new();
        for _ in 0..30 {
            let p = prog.clone();
            t.push(
                std::thread::spawn(move || {
                    let t0 = Instant::now();
                    seccompiler::apply_filter(&p).unwrap();
                    t0.elapsed()
                })
                .join()
                .unwrap(),
            );
        }
        t.sort();
        eprintln!(
            "{n} syscalls, {} instructions: median {:?}",
            prog.len(),
            t[t.len() / 2]
        );
    }
}
