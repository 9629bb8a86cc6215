//! Tests of the template store against a temporary root.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use super::fsutil;
use super::*;

const MIB: u64 = 1 << 20;
const STATE: &[u8] = br#"{"vcpus":[{"rip":4096}],"devices":[]}"#;

struct Fixture {
    tmp: tempfile::TempDir,
    store: TemplateStore,
    spec: TemplateSpec,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let kernel = tmp.path().join("vmlinux");
        let initrd = tmp.path().join("initramfs.cpio.gz");
        // Unique contents per fixture, so the kernel hash cache is exercised
        // with fresh files and no two tests share a key by accident.
        std::fs::write(&kernel, format!("kernel {}", tmp.path().display())).unwrap();
        std::fs::write(&initrd, b"initramfs").unwrap();
        let store = TemplateStore::new(tmp.path().join("templates"));
        let spec = TemplateSpec {
            kernel,
            initrd,
            cmdline: "console=ttyS0 reboot=t panic=-1".into(),
            vcpus: 2,
            mem_mib: 2,
        };
        Fixture { tmp, store, spec }
    }

    fn root(&self) -> &Path {
        self.store.root()
    }

    fn key(&self) -> TemplateKey {
        TemplateKey::compute(&self.spec).unwrap()
    }

    fn dir(&self) -> PathBuf {
        self.store.template_dir(&self.key())
    }

    /// get_or_create with [`write_template`], counting builds.
    fn get(&self, builds: &AtomicUsize) -> Template {
        self.store
            .get_or_create(&self.spec, |dir| {
                builds.fetch_add(1, Ordering::SeqCst);
                write_template(dir, self.spec.mem_mib)
            })
            .unwrap()
    }

    /// Names in the root other than template directories.
    fn dot_entries(&self) -> Vec<String> {
        std::fs::read_dir(self.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    }
}

impl Drop for Fixture {
    /// TempDir cannot delete immutable files: clear the flags first.
    fn drop(&mut self) {
        if let Err(e) = fsutil::remove_tree(self.tmp.path()) {
            eprintln!("cannot clean up {}: {e}", self.tmp.path().display());
        }
    }
}

/// What a real build writes: the state and a sparse memory image of
/// `mem_mib` MiB with data in two places.
fn write_template(dir: &Path, mem_mib: u32) -> anyhow::Result<()> {
    std::fs::write(dir.join(STATE_FILE), STATE)?;
    let mut f = File::create(dir.join(MEMORY_FILE))?;
    f.write_all(&[0x90; 4096])?;
    f.seek(SeekFrom::Start(MIB + 8192))?;
    f.write_all(b"guest page")?;
    f.set_len(u64::from(mem_mib) * MIB)?;
    Ok(())
}

/// Undoes the protection of a published file so a test can tamper with it.
fn make_writable(path: &Path) {
    let f = File::open(path).unwrap();
    fsutil::set_immutable(&f, false).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

fn edit_manifest(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    make_writable(path);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn created_template_opens_with_checked_state_and_memory() {
    let fx = Fixture::new();
    let builds = AtomicUsize::new(0);
    let t = fx.get(&builds);
    assert_eq!(builds.load(Ordering::SeqCst), 1);
    assert_eq!(t.key, fx.key());
    assert_eq!(t.key.as_str().len(), KEY_HEX_LEN);
    assert_eq!(t.dir, fx.root().join(t.key.as_str()));
    assert_eq!(t.state, STATE);
    assert_eq!(t.memory_len(), 2 * MIB);
    assert_eq!(t.memory_file().metadata().unwrap().len(), 2 * MIB);
    assert_eq!(t.memory_path(), t.dir.join("memory"));
    let m = &t.manifest;
    assert_eq!(m.format_version, TEMPLATE_FORMAT_VERSION);
    assert_eq!(m.jevm_version, JEVM_VERSION);
    assert_eq!(m.spec, fx.spec);
    assert_eq!(m.state_len, STATE.len() as u64);
    assert_eq!(m.state_sha256, hash::sha256_hex(STATE));
    assert_eq!(
        m.memory_sha256,
        hash::sha256_hex(&std::fs::read(t.memory_path()).unwrap())
    );
    assert!(m.created_unix_secs > 1_600_000_000);
    t.verify_memory().unwrap();
    assert!(fx.dot_entries().is_empty(), "{:?}", fx.dot_entries());

    let o = fx.store.open(&t.key).unwrap();
    assert_eq!(o.manifest, t.manifest);
    assert_eq!(o.state, t.state);
    o.verify_memory().unwrap();
}

#[test]
fn second_get_or_create_does_not_build() {
    let fx = Fixture::new();
    let builds = AtomicUsize::new(0);
    let a = fx.get(&builds);
    let b = fx
        .store
        .get_or_create(&fx.spec, |_| panic!("must not build again"))
        .unwrap();
    assert_eq!(builds.load(Ordering::SeqCst), 1);
    assert_eq!(a.manifest, b.manifest);
    // Another store instance on the same root (as another process) too.
    let other = TemplateStore::new(fx.root());
    let c = other
        .get_or_create(&fx.spec, |_| panic!("must not build again"))
        .unwrap();
    assert_eq!(a.manifest, c.manifest);
}

#[test]
fn key_depends_on_file_contents_and_spec_not_paths() {
    let fx = Fixture::new();
    let key = fx.key();
    let copy = fx.tmp.path().join("copy-of-vmlinux");
    std::fs::copy(&fx.spec.kernel, &copy).unwrap();
    let mut s = fx.spec.clone();
    s.kernel = copy.clone();
    assert_eq!(TemplateKey::compute(&s).unwrap(), key);
    std::fs::write(&copy, b"another kernel, longer").unwrap();
    assert_ne!(TemplateKey::compute(&s).unwrap(), key);
    let mut s = fx.spec.clone();
    s.cmdline.push_str(" quiet");
    assert_ne!(TemplateKey::compute(&s).unwrap(), key);
    let mut s = fx.spec.clone();
    s.initrd = fx.tmp.path().join("missing.cpio");
    let e = TemplateKey::compute(&s).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    assert!(e.to_string().contains("missing.cpio"), "{e}");
    let e = fx.store.get_or_create(&s, |_| Ok(())).unwrap_err();
    assert!(matches!(e, TemplateError::Spec(_)), "{e}");
    assert!(e.to_string().contains("initramfs"), "{e}");
}

#[test]
fn racing_threads_with_separate_stores_build_once() {
    let fx = Fixture::new();
    let builds = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let store = TemplateStore::new(fx.root());
            let spec = fx.spec.clone();
            let builds = builds.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                store
                    .get_or_create(&spec, |dir| {
                        builds.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(300));
                        write_template(dir, spec.mem_mib)
                    })
                    .unwrap()
                    .manifest
            })
        })
        .collect();
    let manifests: Vec<Manifest> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(builds.load(Ordering::SeqCst), 1);
    for m in &manifests {
        assert_eq!(*m, manifests[0]);
    }
}

/// Environment of [`child_get_or_create`], set by
/// [`racing_processes_build_once`].
const CHILD_ENV: &str = "JEVM_TEMPLATE_TEST_CHILD";

/// Not a test on its own: the body of each child process of
/// [`racing_processes_build_once`] (ignored so that a plain test run does
/// not count it as a passing test).
#[test]
#[ignore = "helper run by racing_processes_build_once"]
fn child_get_or_create() {
    let Ok(args) = std::env::var(CHILD_ENV) else {
        return;
    };
    let v: Vec<&str> = args.split('\n').collect();
    let [root, kernel, initrd, counter] = v[..] else {
        panic!("bad {CHILD_ENV}: {args:?}");
    };
    let spec = TemplateSpec {
        kernel: kernel.into(),
        initrd: initrd.into(),
        cmdline: "console=ttyS0".into(),
        vcpus: 1,
        mem_mib: 2,
    };
    let t = TemplateStore::new(root)
        .get_or_create(&spec, |dir| {
            let mut c = OpenOptions::new().append(true).create(true).open(counter)?;
            c.write_all(format!("{}\n", std::process::id()).as_bytes())?;
            std::thread::sleep(Duration::from_millis(500));
            write_template(dir, spec.mem_mib)
        })
        .unwrap();
    println!("TEMPLATE {} {}", t.key, t.manifest.created_unix_secs);
}

#[test]
fn racing_processes_build_once() {
    let fx = Fixture::new();
    let counter = fx.tmp.path().join("builds");
    let env = [
        fx.root().to_str().unwrap(),
        fx.spec.kernel.to_str().unwrap(),
        fx.spec.initrd.to_str().unwrap(),
        counter.to_str().unwrap(),
    ]
    .join("\n");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..3)
        .map(|_| {
            std::process::Command::new(&exe)
                .args([
                    "--ignored",
                    "--exact",
                    "template::store_tests::child_get_or_create",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, &env)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut lines = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find_map(|l| l.find("TEMPLATE ").map(|i| &l[i..]))
            .unwrap_or_else(|| panic!("the child did not run the helper: {stdout}"))
            .to_owned();
        lines.push(line);
    }
    let builders = std::fs::read_to_string(&counter).unwrap();
    assert_eq!(builders.lines().count(), 1, "builders: {builders:?}");
    assert!(lines.iter().all(|l| *l == lines[0]), "{lines:?}");
}

#[test]
fn foreign_jevm_version_is_refused_then_rebuilt() {
    let fx = Fixture::new();
    let builds = AtomicUsize::new(0);
    let t = fx.get(&builds);
    let manifest = t.manifest_path();
    edit_manifest(&manifest, |v| v["jevm_version"] = "0.0.0-other".into());
    let e = fx.store.open(&t.key).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, TemplateError::Foreign { .. }), "{msg}");
    assert!(msg.contains(manifest.to_str().unwrap()), "{msg}");
    assert!(msg.contains("0.0.0-other"), "{msg}");
    assert!(msg.contains(&format!("jevm {JEVM_VERSION}")), "{msg}");

    let t2 = fx.get(&builds);
    assert_eq!(builds.load(Ordering::SeqCst), 2);
    assert_eq!(t2.manifest.jevm_version, JEVM_VERSION);
    fx.store.open(&t2.key).unwrap();
}

#[test]
fn other_format_version_is_foreign_even_if_the_rest_does_not_parse() {
    let fx = Fixture::new();
    let builds = AtomicUsize::new(0);
    let t = fx.get(&builds);
    let manifest = t.manifest_path();
    make_writable(&manifest);
    std::fs::write(
        &manifest,
        format!(r#"{{"format_version": 99, "jevm_version": "{JEVM_VERSION}", "layout": []}}"#),
    )
    .unwrap();
    let e = fx.store.open(&t.key).unwrap_err();
    assert!(
        matches!(
            e,
            TemplateError::Foreign {
                found_format: 99,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("format version 99"), "{e}");

    std::fs::write(&manifest, b"not json").unwrap();
    let e = fx.store.open(&t.key).unwrap_err();
    assert!(matches!(e, TemplateError::Corrupt { .. }), "{e}");
    assert!(
        e.to_string().contains("manifest.json: corrupt template"),
        "{e}"
    );
    fx.get(&builds);
    assert_eq!(builds.load(Ordering::SeqCst), 2);
}

#[test]
fn truncated_memory_is_corrupt_naming_the_memory_file_then_rebuilt() {
    let fx = Fixture::new();
    let builds = AtomicUsize::new(0);
    let t = fx.get(&builds);
    let memory = t.memory_path();
    make_writable(&memory);
    OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let e = fx.store.open(&t.key).unwrap_err();
    assert!(matches!(e, TemplateError::Corrupt { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!(
            "{}: corrupt template: truncated: {} bytes, expected {}",
            memory.display(),
            MIB,
            2 * MIB
        )
    );
    let t2 = fx.get(&builds);
    assert_eq!(builds.load(Ordering::SeqCst), 2);
    assert_eq!(t2.memory_file().metadata().unwrap().len(), 2 * MIB);
    fx.store.open(&t2.key).unwrap().verify_memory().unwrap();
}

#[test]
fn missing_memory_is_corrupt() {
    let fx = Fixture::new();
    let builds = AtomicUsize::new(0);
    let t = fx.get(&builds);
    make_writable(&t.memory_path());
    std::fs::remove_file(t.memory_path()).unwrap();
    let e = fx.store.open(&t.key).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{}: corrupt template: missing", t.memory_path().display())
    );
}

#[test]
fn corrupt_state_is_refused_naming_state_json() {
    let fx = Fixture::new();
    let builds = AtomicUsize::new(0);
    let t = fx.get(&builds);
    let state = t.state_path();
    make_writable(&state);
    // Same length, other bytes: caught by the checksum.
    let mut bytes = STATE.to_vec();
    bytes[5] ^= 1;
    std::fs::write(&state, &bytes).unwrap();
    let e = fx.store.open(&t.key).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, TemplateError::Corrupt { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!("{}: corrupt template: sha256 ", state.display())),
        "{msg}"
    );
    assert!(msg.contains(&t.manifest.state_sha256), "{msg}");
    // Other length: caught before hashing.
    std::fs::write(&state, b"{}").unwrap();
    let msg = fx.store.open(&t.key).unwrap_err().to_string();
    assert_eq!(
        msg,
        format!(
            "{}: corrupt template: 2 bytes, expected {}",
            state.display(),
            STATE.len()
        )
    );
}

#[test]
fn changed_memory_passes_open_but_fails_verify_memory() {
    let fx = Fixture::new();
    let builds = AtomicUsize::new(0);
    let t = fx.get(&builds);
    drop(t);
    let memory = fx.dir().join(MEMORY_FILE);
    make_writable(&memory);
    let f = OpenOptions::new().write(true).open(&memory).unwrap();
    f.write_all_at(b"X", MIB + 8192).unwrap();
    drop(f);
    let t = fx.store.open(&fx.key()).unwrap();
    let e = t.verify_memory().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, TemplateError::Corrupt { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!("{}: corrupt template: sha256 ", memory.display())),
        "{msg}"
    );
}

#[test]
fn manifest_describing_another_spec_is_rebuilt() {
    let fx = Fixture::new();
    let builds = AtomicUsize::new(0);
    let t = fx.get(&builds);
    edit_manifest(&t.manifest_path(), |v| v["spec"]["vcpus"] = 7.into());
    // `open` knows only the key; get_or_create also checks the spec.
    fx.store.open(&t.key).unwrap();
    let t2 = fx.get(&builds);
    assert_eq!(builds.load(Ordering::SeqCst), 2);
    assert_eq!(t2.manifest.spec.vcpus, fx.spec.vcpus);
}

#[test]
fn failed_build_leaves_no_staging_dir_and_no_lock_file() {
    let fx = Fixture::new();
    let e = fx
        .store
        .get_or_create(&fx.spec, |dir| {
            write_template(dir, 2)?;
            anyhow::bail!("the guest never said READY")
        })
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, TemplateError::Build { .. }), "{msg}");
    assert_eq!(
        msg,
        format!(
            "template {}: build failed: the guest never said READY",
            fx.key()
        )
    );
    let names: Vec<_> = std::fs::read_dir(fx.root()).unwrap().collect();
    assert!(names.is_empty(), "leftovers: {names:?}");

    // A build that "succeeds" without a memory file is a build error too.
    let e = fx
        .store
        .get_or_create(&fx.spec, |dir| {
            std::fs::write(dir.join(STATE_FILE), STATE)?;
            Ok(())
        })
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("build failed: it left no regular file at"),
        "{msg}"
    );
    assert!(msg.ends_with("/memory"), "{msg}");
    assert_eq!(std::fs::read_dir(fx.root()).unwrap().count(), 0);

    // A panicking build unwinds through the store without leftovers.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = fx.store.get_or_create(&fx.spec, |dir| {
            write_template(dir, 2).unwrap();
            panic!("build panicked");
        });
    }));
    assert!(r.is_err());
    assert!(fx.dot_entries().is_empty(), "{:?}", fx.dot_entries());

    // And the next attempt builds normally.
    let builds = AtomicUsize::new(0);
    fx.get(&builds);
    assert_eq!(builds.load(Ordering::SeqCst), 1);
}

#[test]
fn leftovers_of_a_crashed_build_are_swept() {
    let fx = Fixture::new();
    std::fs::create_dir_all(fx.root()).unwrap();
    let key = fx.key();
    let stale = fx.root().join(format!(".staging-{key}.1.2.3"));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join(MEMORY_FILE), b"half").unwrap();
    fsutil::set_immutable(&File::open(stale.join(MEMORY_FILE)).unwrap(), true).unwrap();
    let other = fx
        .root()
        .join(".staging-0123456789abcdef0123456789abcdef.1.2.3");
    std::fs::create_dir(&other).unwrap();
    let builds = AtomicUsize::new(0);
    fx.get(&builds);
    assert!(!stale.exists());
    assert!(other.exists(), "another key's staging must be left alone");
}

#[test]
fn remove_clears_the_immutable_flag_and_removes_everything() {
    let fx = Fixture::new();
    let builds = AtomicUsize::new(0);
    let t = fx.get(&builds);
    let immutable = fsutil::is_immutable(&t.memory_path()).unwrap();
    eprintln!("immutable flag set on the memory file: {immutable}");
    if immutable {
        assert!(std::fs::remove_file(t.memory_path()).is_err());
    }
    let key = t.key.clone();
    let dir = t.dir.clone();
    drop(t);
    fx.store.remove(key.as_str()).unwrap();
    assert!(!dir.exists());
    let left: Vec<_> = std::fs::read_dir(fx.root()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(matches!(
        fx.store.open(&key),
        Err(TemplateError::NotFound { .. })
    ));
    let e = fx.store.remove(key.as_str()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("template {key} not found in {}", fx.root().display())
    );
    assert!(matches!(
        fx.store.remove("../../etc"),
        Err(TemplateError::InvalidKey(_))
    ));
    // And it can be built again.
    fx.get(&builds);
    assert_eq!(builds.load(Ordering::SeqCst), 2);
}

#[test]
fn a_clone_keeps_its_memory_file_after_remove() {
    let fx = Fixture::new();
    let builds = AtomicUsize::new(0);
    let t = fx.get(&builds);
    fx.store.remove(t.key.as_str()).unwrap();
    assert_eq!(t.memory_file().metadata().unwrap().len(), 2 * MIB);
    let mut page = [0u8; 4];
    t.memory_file().read_exact_at(&mut page, 0).unwrap();
    assert_eq!(page, [0x90; 4]);
}

#[test]
fn list_shows_templates_sizes_and_validity() {
    let fx = Fixture::new();
    assert!(TemplateStore::new(fx.tmp.path().join("none"))
        .list()
        .unwrap()
        .is_empty());
    let builds = AtomicUsize::new(0);
    let a = fx.get(&builds);
    let mut spec_b = fx.spec.clone();
    spec_b.mem_mib = 4;
    let b = fx
        .store
        .get_or_create(&spec_b, |dir| write_template(dir, 4))
        .unwrap();
    make_writable(&b.memory_path());
    File::options()
        .write(true)
        .open(b.memory_path())
        .unwrap()
        .set_len(MIB)
        .unwrap();
    std::fs::create_dir(fx.root().join("not-a-key")).unwrap();
    // A failed build leaves nothing to list.
    let mut spec_c = fx.spec.clone();
    spec_c.vcpus = 3;
    fx.store
        .get_or_create(&spec_c, |_| anyhow::bail!("no"))
        .unwrap_err();

    let list = fx.store.list().unwrap();
    assert_eq!(list.len(), 3, "{list:#?}");
    let find = |k: &str| list.iter().find(|i| i.key == k).unwrap();

    let ia = find(a.key.as_str());
    assert_eq!(ia.status, TemplateStatus::Valid);
    assert!(ia.status.is_valid());
    assert_eq!(ia.spec.as_ref(), Some(&fx.spec));
    assert_eq!(ia.created_unix_secs, Some(a.manifest.created_unix_secs));
    assert_eq!(ia.jevm_version.as_deref(), Some(JEVM_VERSION));
    assert_eq!(ia.memory_apparent_bytes, Some(2 * MIB));
    let disk = ia.memory_disk_bytes.unwrap();
    assert!(disk > 0 && disk < 2 * MIB, "sparse image uses {disk} bytes");

    let ib = find(b.key.as_str());
    match &ib.status {
        TemplateStatus::Invalid { reason } => assert!(reason.contains("truncated"), "{reason}"),
        s => panic!("{s:?}"),
    }
    assert_eq!(ib.spec.as_ref(), Some(&spec_b));
    assert_eq!(ib.memory_apparent_bytes, Some(MIB));

    match &find("not-a-key").status {
        TemplateStatus::Invalid { reason } => {
            assert!(reason.contains("is not a template key"), "{reason}")
        }
        s => panic!("{s:?}"),
    }

    // While a key's lock is held exclusively (a build or removal), list
    // reports it busy instead of waiting.
    let lock = super::lock::KeyLock::acquire(
        &fx.root().join(format!("{}.lock", a.key)),
        super::lock::LockMode::Exclusive,
    )
    .unwrap();
    let list = fx.store.list().unwrap();
    let ia = list.iter().find(|i| i.key == a.key.as_str()).unwrap();
    assert_eq!(ia.status, TemplateStatus::Busy);
    assert_eq!(ia.spec.as_ref(), Some(&fx.spec));
    drop(lock);
}

#[test]
fn published_memory_and_state_are_read_only() {
    let fx = Fixture::new();
    let builds = AtomicUsize::new(0);
    let t = fx.get(&builds);
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    for path in [t.memory_path(), t.state_path(), t.manifest_path()] {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o444, "{}", path.display());
        let immutable = fsutil::is_immutable(&path).unwrap();
        let open = OpenOptions::new().write(true).open(&path);
        if !root || immutable {
            let e = open.expect_err("opened a published file for writing");
            assert!(
                matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)),
                "{}: {e}",
                path.display()
            );
        } else {
            eprintln!(
                "{}: root without the immutable flag (not supported here): only mode 0444 checked",
                path.display()
            );
        }
    }
}
