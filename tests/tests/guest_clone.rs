//! Templates and copy-on-write clones of the real guest, on real KVM
//! (inside the KVM test host when this machine's /dev/kvm cannot run a
//! Linux guest). Serialized like guest_boot.rs: the tests count this
//! process's threads and fds.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use jevm_protocol::{Diag, Request, Response, SHARE_MOUNT};
use jevm_runtime::clone::{build_template, clone_from, CloneOptions};
use jevm_runtime::microvm::MicroVm;
use jevm_runtime::template::{Template, TemplateSpec, TemplateStore};
use jevm_runtime::vmm::StopReason;
use jevm_tests::{footprint, guest_artifacts, leak_since};

static SERIAL: Mutex<()> = Mutex::new(());
const MARKER: &str = "/tmp/written-by-the-template";

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct Fixture {
    store: TemplateStore,
    template: Template,
    run_root: tempfile::TempDir,
    _state_root: tempfile::TempDir,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.store.remove(self.template.key.as_str());
    }
}

fn spec() -> TemplateSpec {
    let (kernel, initrd) = guest_artifacts();
    TemplateSpec {
        kernel,
        initrd,
        cmdline: String::new(),
        vcpus: 1,
        mem_mib: 256,
    }
}

/// A fresh store with one template whose guest wrote MARKER before it was saved.
fn fixture() -> Fixture {
    let state_root = tempfile::Builder::new()
        .prefix("jevm-test-templates")
        .tempdir()
        .unwrap();
    let run_root = tempfile::Builder::new()
        .prefix("jevm-test-run")
        .tempdir()
        .unwrap();
    let store = TemplateStore::new(state_root.path());
    let rr = run_root.path().to_owned();
    let template = store
        .get_or_create(&spec(), |staging| {
            build_template(&spec(), &rr, staging, |vm| {
                let r = vm.agent()?.call(&Request::Diag(Diag::WriteFile {
                    path: MARKER.into(),
                    offset: 0,
                    data: b"template-value".to_vec(),
                }))?;
                anyhow::ensure!(
                    r == Response::Written { len: 14 },
                    "marker write answered {r:?}"
                );
                Ok(())
            })
        })
        .expect("template");
    Fixture {
        store,
        template,
        run_root,
        _state_root: state_root,
    }
}

fn read(vm: &MicroVm, path: &str, len: u32) -> Vec<u8> {
    match vm
        .agent()
        .unwrap()
        .call(&Request::Diag(Diag::ReadFile {
            path: path.into(),
            offset: 0,
            len,
        }))
        .unwrap()
    {
        Response::Bytes(b) => b,
        other => panic!("reading {path} answered {other:?}"),
    }
}

/// What the agent answered to a ReadFile (bytes or the guest's error).
fn try_read(vm: &MicroVm, path: &str, len: u32) -> Response {
    vm.agent()
        .unwrap()
        .call(&Request::Diag(Diag::ReadFile {
            path: path.into(),
            offset: 0,
            len,
        }))
        .unwrap()
}

fn write(vm: &MicroVm, path: &str, data: &[u8]) -> Response {
    vm.agent()
        .unwrap()
        .call(&Request::Diag(Diag::WriteFile {
            path: path.into(),
            offset: 0,
            data: data.to_vec(),
        }))
        .unwrap()
}

/// A read-only bind mount of `dir` onto itself, undone on drop (also
/// when the test fails).
struct ReadOnlyBind(std::path::PathBuf);

impl ReadOnlyBind {
    fn new(dir: &Path) -> Self {
        let run = |args: &[&str]| {
            let st = std::process::Command::new("mount")
                .args(args)
                .arg(dir)
                .arg(dir)
                .status()
                .expect("running mount");
            assert!(st.success(), "mount {args:?} {}: {st}", dir.display());
        };
        run(&["--bind"]);
        let bind = ReadOnlyBind(dir.to_owned());
        run(&["-o", "remount,bind,ro"]);
        bind
    }
}

impl Drop for ReadOnlyBind {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false)
}

#[test]
fn clone_answers_ping_and_sees_what_the_template_wrote_before_the_snapshot() {
    let _l = lock();
    let f = fixture();
    let vm = clone_from(&f.template, f.run_root.path(), &named("clone-1")).expect("clone");
    let mut agent = vm.agent().unwrap();
    agent.ping(42).unwrap();
    assert_eq!(agent.version().unwrap(), env!("CARGO_PKG_VERSION"));
    assert_eq!(read(&vm, MARKER, 64), b"template-value");
    assert_eq!(read(&vm, "/proc/sys/kernel/hostname", 64), b"clone-1\n");
    drop(agent);
    vm.shutdown(Duration::from_secs(30));
}

#[test]
fn write_in_one_clone_is_invisible_to_another_and_to_the_template_memory_file() {
    let _l = lock();
    let f = fixture();
    f.template
        .verify_memory()
        .expect("template memory checksum before");
    let a = clone_from(&f.template, f.run_root.path(), &named("a")).expect("clone a");
    let b = clone_from(&f.template, f.run_root.path(), &named("b")).expect("clone b");
    let r = a
        .agent()
        .unwrap()
        .call(&Request::Diag(Diag::WriteFile {
            path: MARKER.into(),
            offset: 0,
            data: b"CLONE-A-VALUE!".to_vec(),
        }))
        .unwrap();
    assert_eq!(r, Response::Written { len: 14 });
    // Make clone A dirty a lot more memory than one page.
    let big = vec![0xa5u8; 1 << 20];
    for i in 0..8 {
        let r = a
            .agent()
            .unwrap()
            .call(&Request::Diag(Diag::WriteFile {
                path: format!("/tmp/fill-{i}"),
                offset: 0,
                data: big.clone(),
            }))
            .unwrap();
        assert_eq!(r, Response::Written { len: 1 << 20 });
    }
    assert_eq!(read(&a, MARKER, 64), b"CLONE-A-VALUE!");
    assert_eq!(read(&b, MARKER, 64), b"template-value");
    a.shutdown(Duration::from_secs(30));
    b.shutdown(Duration::from_secs(30));
    f.template
        .verify_memory()
        .expect("template memory checksum after the clones wrote");
}

#[test]
fn two_clones_read_different_random_bytes_after_the_identity_reseed() {
    let _l = lock();
    let f = fixture();
    let a = clone_from(&f.template, f.run_root.path(), &named("a")).expect("clone a");
    let b = clone_from(&f.template, f.run_root.path(), &named("b")).expect("clone b");
    let ra = read(&a, "/dev/urandom", 32);
    let rb = read(&b, "/dev/urandom", 32);
    assert_eq!(ra.len(), 32);
    assert_ne!(ra, rb, "two clones produced the same random bytes");
    // boot_id is generated on first read, after the reseed: also unique.
    let ia = read(&a, "/proc/sys/kernel/random/boot_id", 64);
    let ib = read(&b, "/proc/sys/kernel/random/boot_id", 64);
    assert_ne!(ia, ib, "two clones share a boot_id");
    a.shutdown(Duration::from_secs(30));
    b.shutdown(Duration::from_secs(30));
}

#[test]
fn two_clones_started_at_the_same_moment_differ_in_random_bytes_boot_id_and_uuid() {
    let _l = lock();
    let f = fixture();
    // Both identities are sent ahead and applied while the other clone is
    // being restored: nothing of one may reach the other.
    let go = std::sync::Barrier::new(2);
    let read_all = |vm: &MicroVm| {
        (
            read(vm, "/dev/urandom", 32),
            read(vm, "/proc/sys/kernel/random/boot_id", 64),
            read(vm, "/proc/sys/kernel/random/uuid", 64),
        )
    };
    let (a, b) = std::thread::scope(|s| {
        let start = |name: &'static str| {
            let (f, go) = (&f, &go);
            s.spawn(move || {
                go.wait();
                clone_from(&f.template, f.run_root.path(), &named(name)).expect(name)
            })
        };
        let (a, b) = (start("a"), start("b"));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (ra, ia, ua) = read_all(&a);
    let (rb, ib, ub) = read_all(&b);
    assert_eq!(ra.len(), 32);
    assert_ne!(
        ra, rb,
        "two clones started together produced the same random bytes"
    );
    assert_ne!(ia, ib, "two clones started together share a boot_id");
    assert_ne!(ua, ub, "two clones started together drew the same uuid");
    a.shutdown(Duration::from_secs(30));
    b.shutdown(Duration::from_secs(30));
}

#[test]
fn twenty_concurrent_clones_reach_agent_ready_and_leave_nothing_behind() {
    let _l = lock();
    let f = fixture();
    // Warm the process-wide lazies once (signal handler).
    clone_from(&f.template, f.run_root.path(), &named("warm"))
        .unwrap()
        .shutdown(Duration::from_secs(30));
    let before = footprint();
    let clones: Vec<MicroVm> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let f = &f;
                s.spawn(move || {
                    clone_from(&f.template, f.run_root.path(), &named(&format!("c{i}")))
                        .expect("clone")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, vm) in clones.iter().enumerate() {
        vm.agent().unwrap().ping(i as u64).unwrap();
    }
    for vm in clones {
        vm.shutdown(Duration::from_secs(60));
    }
    assert_eq!(
        leak_since(&before, Duration::from_secs(2)),
        None,
        "threads/fds/memfds after 20 clones (before: {before:?})"
    );
    assert!(
        is_empty_dir(f.run_root.path()),
        "files left in the run directory"
    );
}

#[test]
fn template_from_another_jevm_version_or_with_truncated_memory_is_refused_naming_the_file() {
    let _l = lock();
    let f = fixture();
    // Copies of the real template, damaged in two ways, in a second store.
    let other_root = tempfile::Builder::new()
        .prefix("jevm-test-damaged")
        .tempdir()
        .unwrap();
    let key = f.template.key.clone();
    let copy = |name: &str| {
        let dst = other_root.path().join(name);
        std::fs::create_dir_all(&dst).unwrap();
        for file in ["manifest.json", "state.json", "memory"] {
            std::fs::copy(f.template.dir.join(file), dst.join(file)).unwrap();
            let mut p = std::fs::metadata(dst.join(file)).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            p.set_readonly(false);
            std::fs::set_permissions(dst.join(file), p).unwrap();
        }
        dst
    };

    let dir = copy(key.as_str());
    let memory = dir.join("memory");
    let len = std::fs::metadata(&memory).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let store = TemplateStore::new(other_root.path());
    let err = store
        .open(&key)
        .expect_err("truncated template refused")
        .to_string();
    assert!(
        err.contains(&*memory.to_string_lossy()) && err.contains("truncated"),
        "{err}"
    );

    let manifest = dir.join("manifest.json");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap()
        .set_len(len)
        .unwrap();
    let text = std::fs::read_to_string(&manifest).unwrap();
    let foreign = text.replace(
        &format!("\"{}\"", env!("CARGO_PKG_VERSION")),
        "\"0.0.0-other\"",
    );
    assert_ne!(text, foreign, "manifest does not record the jevm version");
    std::fs::write(&manifest, foreign).unwrap();
    let err = store
        .open(&key)
        .expect_err("foreign template refused")
        .to_string();
    assert!(
        err.contains(&*manifest.to_string_lossy()) && err.contains("0.0.0-other"),
        "{err}"
    );
}

#[test]
fn clone_with_a_share_reads_and_writes_host_files_but_not_through_ro_binds_or_above_the_share() {
    let _l = lock();
    let f = fixture();
    // <scratch>/secret is beside the share, not in it: the guest must not
    // reach it by `..` or by a symlink the host left in the share.
    let scratch = tempfile::Builder::new()
        .prefix("jevm-test-share")
        .tempdir()
        .unwrap();
    std::fs::write(scratch.path().join("secret"), b"host only").unwrap();
    let share = scratch.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("from-host"), b"written by the host").unwrap();
    // The agent's WriteFile only creates files under /tmp: the host
    // provides the (empty) file the guest fills.
    std::fs::write(share.join("to-host"), b"").unwrap();
    std::os::unix::fs::symlink("../secret", share.join("escape")).unwrap();
    let ro = share.join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::write(ro.join("file"), b"original").unwrap();
    let _ro_bind = ReadOnlyBind::new(&ro);

    // A share that is not there is refused before any VM exists.
    let missing = scratch.path().join("no-such-share");
    let refused = clone_from(
        &f.template,
        f.run_root.path(),
        &CloneOptions {
            hostname: "bad-share".into(),
            share: Some(missing.clone()),
            network: None,
            ..Default::default()
        },
    );
    match refused {
        Err(e) => assert!(
            e.to_string().contains(&*missing.to_string_lossy()),
            "error does not name the share: {e}"
        ),
        Ok(_) => panic!("a clone started with a missing share directory"),
    }
    assert!(
        is_empty_dir(f.run_root.path()),
        "files left after the refusal"
    );

    let before = footprint();
    let plain = clone_from(&f.template, f.run_root.path(), &named("no-share")).expect("clone");
    let vm = clone_from(
        &f.template,
        f.run_root.path(),
        &CloneOptions {
            hostname: "with-share".into(),
            share: Some(share.clone()),
            network: None,
            ..Default::default()
        },
    )
    .expect("clone with a share");
    println!(
        "clone-to-agent-ready: {:.1} ms without a share, {:.1} ms with the share mounted \
         (VM restored in {:.1} / {:.1} ms)",
        plain.times.agent_ready.as_secs_f64() * 1e3,
        vm.times.agent_ready.as_secs_f64() * 1e3,
        plain.times.vm_started.as_secs_f64() * 1e3,
        vm.times.vm_started.as_secs_f64() * 1e3,
    );
    let at = |name: &str| format!("{SHARE_MOUNT}/{name}");

    // Host → guest, and a host change seen at the guest's next open.
    assert_eq!(read(&vm, &at("from-host"), 64), b"written by the host");
    std::fs::write(share.join("from-host"), b"WRITTEN BY THE HOST").unwrap();
    assert_eq!(read(&vm, &at("from-host"), 64), b"WRITTEN BY THE HOST");

    // Guest → host, on the host once the write returned.
    assert_eq!(
        write(&vm, &at("to-host"), b"written by the guest"),
        Response::Written { len: 20 }
    );
    assert_eq!(
        std::fs::read(share.join("to-host")).unwrap(),
        b"written by the guest"
    );

    // Cost of bulk data through the share next to the same write into the
    // guest's own tmpfs (the agent request itself is most of the time):
    // printed, not asserted.
    std::fs::write(share.join("big"), b"").unwrap();
    let big: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut took = Vec::new();
    for path in ["/tmp/big".to_string(), at("big")] {
        let t = std::time::Instant::now();
        assert_eq!(write(&vm, &path, &big), Response::Written { len: 1 << 20 });
        took.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "1 MiB written (and fsynced) by the guest: {:.1} ms into its tmpfs, {:.1} ms into the share",
        took[0], took[1]
    );
    assert_eq!(std::fs::read(share.join("big")).unwrap(), big);

    // A read-only bind mount inside the share stays read-only.
    assert_eq!(read(&vm, &at("ro/file"), 64), b"original");
    match write(&vm, &at("ro/file"), b"changed!") {
        Response::Error { message, .. } => {
            assert!(message.contains("Read-only"), "{message}")
        }
        other => panic!("write under the read-only bind answered {other:?}"),
    }
    assert_eq!(std::fs::read(ro.join("file")).unwrap(), b"original");

    // Neither `..` from the share root nor the symlink reaches <scratch>.
    for path in [format!("{SHARE_MOUNT}/../secret"), at("escape")] {
        match try_read(&vm, &path, 64) {
            Response::Error { .. } => {}
            other => panic!("{path} answered {other:?}"),
        }
    }

    // The clone without a share works as before and has nothing mounted.
    plain.agent().unwrap().ping(7).unwrap();
    match try_read(&plain, &at("from-host"), 64) {
        Response::Error { .. } => {}
        other => panic!("unshared clone read the share: {other:?}"),
    }

    // The share is mounted with DAX: a guest's shared mapping of a share
    // file is the host's page cache of it, mapped through the device's
    // window, so a write through it is in the host file at once, with no
    // flush or writeback in between (without DAX it stayed in the guest's
    // page cache until the guest wrote it back).
    std::fs::write(share.join("mapped"), [b'.'; 4096]).unwrap();
    let dirty = b"dirty in the guest";
    assert_eq!(
        vm.agent()
            .unwrap()
            .call(&Request::Diag(Diag::WriteMapped {
                path: at("mapped"),
                data: dirty.to_vec(),
            }))
            .unwrap(),
        Response::Written { len: 18 }
    );
    assert_eq!(
        std::fs::read(share.join("mapped")).unwrap()[..18],
        dirty[..],
        "the guest's write through a shared mapping is not in the host file: no DAX?"
    );
    // And a host write to the mapped file is what the guest reads.
    std::fs::write(share.join("mapped"), [b'#'; 4096]).unwrap();
    assert_eq!(read(&vm, &at("mapped"), 4), b"####");
    assert_eq!(vm.discard(), StopReason::HostRequest);

    plain.shutdown(Duration::from_secs(30));
    assert_eq!(
        leak_since(&before, Duration::from_secs(2)),
        None,
        "threads/fds after two clones, one with a share (before: {before:?})"
    );
}

#[test]
fn copies_identical_to_the_template_are_given_back_while_the_guest_works_and_nothing_changes() {
    let _l = lock();
    let f = fixture();
    let vm = clone_from(&f.template, f.run_root.path(), &named("copies")).expect("clone");
    // Rewriting the template's marker with the same bytes leaves copies
    // identical to the template's pages (the file's page, the inode).
    assert_eq!(
        write(&vm, MARKER, b"template-value"),
        Response::Written { len: 14 }
    );
    let first = vm.vm().drop_identical_copies().expect("first pass");
    assert!(
        first.dropped > 0 && first.dropped <= first.identical && first.identical < first.private,
        "first pass: {first:?}"
    );

    // Passes while the guest writes and the host reads over vsock: the
    // device workers write guest memory all along, and every byte must
    // come back as written.
    let uds = vm.vsock_uds().to_path_buf();
    let writer = std::thread::spawn(move || {
        let agent = || {
            jevm_runtime::agent_client::AgentClient::connect(&uds, Duration::from_secs(30)).unwrap()
        };
        for i in 0..12u8 {
            let data: Vec<u8> = (0..(64 << 10))
                .map(|j: u32| (j as u8) ^ i.wrapping_mul(37))
                .collect();
            let path = format!("/tmp/busy-{i}");
            let r = agent()
                .call(&Request::Diag(Diag::WriteFile {
                    path: path.clone(),
                    offset: 0,
                    data: data.clone(),
                }))
                .unwrap();
            assert_eq!(r, Response::Written { len: 64 << 10 });
            let back = agent()
                .call(&Request::Diag(Diag::ReadFile {
                    path,
                    offset: 0,
                    len: 64 << 10,
                }))
                .unwrap();
            assert_eq!(back, Response::Bytes(data), "file {i} read back wrong");
        }
    });
    let mut passes = Vec::new();
    while !writer.is_finished() {
        passes.push(vm.vm().drop_identical_copies().expect("pass while busy"));
        std::thread::sleep(Duration::from_millis(20));
    }
    writer
        .join()
        .expect("the guest's files came back as written");
    assert!(
        passes.iter().any(|p| p.dropped > 0),
        "no pass gave anything back while the guest was busy: {passes:?}"
    );

    let mut agent = vm.agent().unwrap();
    agent.ping(7).unwrap();
    assert_eq!(read(&vm, MARKER, 64), b"template-value");
    assert_eq!(read(&vm, "/proc/sys/kernel/hostname", 64), b"copies\n");
    drop(agent);
    vm.shutdown(Duration::from_secs(30));
    f.template
        .verify_memory()
        .expect("template memory checksum after the passes");
}

/// The template is saved once its guest's free page reporting is quiet
/// (`clone::wait_for_free_page_reporting`). Its first pass after boot goes
/// over all free memory; saved before that pass ran, every clone ran it.
/// A clone left idle past the guest's reporting delay (2 s) reports only
/// what it freed itself, not the template's ~200 MiB of free memory.
#[test]
fn a_clone_does_not_redo_the_templates_free_page_reporting() {
    let _l = lock();
    let f = fixture();
    let vm = clone_from(&f.template, f.run_root.path(), &named("reporting")).expect("clone");
    std::thread::sleep(Duration::from_secs(5));
    let reports = vm.vm().free_page_reports();
    eprintln!("clone's free page reports in its first 5 s: {reports:?}");
    assert!(
        reports.bytes < 32 << 20,
        "the clone reported {} MiB of free pages in its first 5 s: the template's \
         first reporting pass was still due at its snapshot ({reports:?})",
        reports.bytes >> 20
    );
    vm.agent().unwrap().ping(9).unwrap();
    vm.shutdown(Duration::from_secs(30));
}

fn named(hostname: &str) -> CloneOptions {
    CloneOptions {
        hostname: hostname.into(),
        share: None,
        network: None,
        ..Default::default()
    }
}
