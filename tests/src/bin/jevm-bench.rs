//! jevm benchmarks, each printed as medians/ratios measured in one run:
//!
//! - `boot`: boot-to-agent-ready, jevm vs QEMU `-M microvm`, same kernel,
//!   same initramfs, same agent, same host, same run.
//! - `clone`: cold boot vs clone, both from spawning the process to the
//!   agent being ready, the clones first (median, p99), each idle
//!   clone's private memory and PSS, the template's shared size.
//! - `tiny-clone`: the host-side cost of a clone with a tiny test guest
//!   (create VM, map memory, restore state, run to the guest's first exit),
//!   on any /dev/kvm.
//!
//! Boot:
//! Both are measured from spawning the VMM process to the moment the agent's
//! READY reaches the host: for jevm, `jevm boot` prints `agent ready` when
//! its READY socket got the message; for QEMU, the agent's READY arrives on
//! an AF_VSOCK listener (vhost-vsock) in this process. The first run of each
//! is a warm-up and is not counted.

use std::io::{BufRead, BufReader};
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

struct Args {
    mode: String,
    jevm: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    runs: usize,
    mem: u32,
}

fn parse_args() -> Result<Args> {
    let mut a = std::env::args().skip(1);
    let mode = a.next().unwrap_or_default();
    let mut args = Args {
        mode,
        jevm: PathBuf::new(),
        kernel: PathBuf::new(),
        initrd: PathBuf::new(),
        runs: 10,
        mem: 256,
    };
    while let Some(k) = a.next() {
        let mut v = || a.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--jevm" => args.jevm = v()?.into(),
            "--kernel" => args.kernel = v()?.into(),
            "--initrd" => args.initrd = v()?.into(),
            "--runs" => args.runs = v()?.parse()?,
            "--mem" => args.mem = v()?.parse()?,
            _ => bail!("usage: jevm-bench boot|clone|tiny-clone [--jevm PATH --kernel VMLINUX --initrd CPIO] [--runs N] [--mem MiB]"),
        }
    }
    if args.mode == "tiny-clone" {
        return Ok(args);
    }
    for (name, p) in [
        ("--jevm", &args.jevm),
        ("--kernel", &args.kernel),
        ("--initrd", &args.initrd),
    ] {
        if !p.is_file() {
            bail!("{name} {}: no such file", p.display());
        }
    }
    Ok(args)
}

struct JevmRun {
    wall: Duration,
    rss_kib: u64,
    vmm_kib: u64,
}

fn jevm_once(a: &Args) -> Result<JevmRun> {
    let run_dir = std::env::temp_dir().join("jevm-bench-run");
    let t0 = Instant::now();
    let mut child = Command::new(&a.jevm)
        .args(["boot", "--kernel"])
        .arg(&a.kernel)
        .arg("--initrd")
        .arg(&a.initrd)
        .args(["--mem", &a.mem.to_string(), "--run-dir"])
        .arg(&run_dir)
        .stdout(Stdio::piped())
        .spawn()
        .context("spawn jevm")?;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut wall = None;
    let (mut rss_kib, mut vmm_kib) = (0, 0);
    for line in lines.by_ref() {
        let line = line?;
        if line.starts_with("agent ready") && wall.is_none() {
            wall = Some(t0.elapsed());
        }
        if let Some(rest) = line.strip_prefix("vmm memory:") {
            for kv in rest.split_whitespace() {
                if let Some((k, v)) = kv.split_once('=') {
                    let v: u64 = v.trim_end_matches("KiB").parse().unwrap_or(0);
                    match k {
                        "rss" => rss_kib = v,
                        "vmm" => vmm_kib = v,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("jevm boot failed: {status}");
    }
    Ok(JevmRun {
        wall: wall.context("jevm never printed `agent ready`")?,
        rss_kib,
        vmm_kib,
    })
}

const AF_VSOCK: i32 = 40;
const VMADDR_CID_ANY: u32 = u32::MAX;

#[repr(C)]
struct SockaddrVm {
    family: u16,
    reserved1: u16,
    port: u32,
    cid: u32,
    flags: u8,
    zero: [u8; 3],
}

fn vsock_listener(port: u32) -> Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!(
            "AF_VSOCK socket: {} (is vhost_vsock loaded?)",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: fd is a fresh socket this function owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = SockaddrVm {
        family: AF_VSOCK as u16,
        reserved1: 0,
        port,
        cid: VMADDR_CID_ANY,
        flags: 0,
        zero: [0; 3],
    };
    // SAFETY: addr is a valid sockaddr_vm of the length given.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const SockaddrVm).cast(),
            size_of::<SockaddrVm>() as u32,
        )
    };
    if r != 0 {
        bail!(
            "bind vsock port {port}: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: listen on a bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 16) } != 0 {
        bail!("listen vsock: {}", std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn accept_with_timeout(fd: &OwnedFd, timeout: Duration) -> Result<OwnedFd> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is valid for the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    if n <= 0 {
        bail!("no READY from the QEMU guest within {timeout:?}");
    }
    // SAFETY: accept on a listening socket; null address is allowed.
    let c = unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if c < 0 {
        bail!("accept: {}", std::io::Error::last_os_error());
    }
    // SAFETY: c is a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(c) })
}

fn qemu_once(a: &Args, listener: &OwnedFd, cid: u32) -> Result<Duration> {
    let t0 = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,acpi=off,rtc=off",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-smp",
            "1",
        ])
        .args(["-m", &a.mem.to_string()])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "null",
        ])
        .arg("-kernel")
        .arg(&a.kernel)
        .arg("-initrd")
        .arg(&a.initrd)
        .args([
            "-append",
            "console=ttyS0 reboot=t panic=-1 quiet 8250.nr_uarts=1 rdinit=/init",
        ])
        .args(["-device", &format!("vhost-vsock-device,guest-cid={cid}")])
        .stdout(Stdio::null())
        .spawn()
        .context("spawn qemu-system-x86_64")?;
    let r = accept_with_timeout(listener, Duration::from_secs(120)).and_then(|conn| {
        let wall = t0.elapsed();
        let mut f = std::fs::File::from(conn);
        let ready: jevm_protocol::Ready =
            jevm_protocol::read_frame(&mut f).context("READY frame")?;
        if ready.protocol_version != jevm_protocol::PROTOCOL_VERSION {
            bail!(
                "QEMU guest's agent speaks protocol {}",
                ready.protocol_version
            );
        }
        Ok(wall)
    });
    let _ = child.kill();
    let _ = child.wait();
    r
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> Result<()> {
    let a = parse_args()?;
    match a.mode.as_str() {
        "boot" => bench_boot(&a),
        "clone" => bench_clone(&a),
        "tiny-clone" => bench_tiny_clone(&a),
        other => bail!("unknown mode {other:?}: boot, clone or tiny-clone"),
    }
}

fn bench_boot(a: &Args) -> Result<()> {
    println!(
        "# jevm-bench: boot to agent READY, {} runs each (+1 warm-up), {} MiB, 1 vCPU",
        a.runs, a.mem
    );
    println!(
        "# kernel {} initramfs {}",
        a.kernel.display(),
        a.initrd.display()
    );
    let listener = vsock_listener(jevm_protocol::READY_PORT)?;
    let mut jevm_ms = Vec::new();
    let mut qemu_ms = Vec::new();
    let mut rss = Vec::new();
    let mut vmm = Vec::new();
    // Interleave so that load changes on the host hit both alike.
    for i in 0..=a.runs {
        let j = jevm_once(a)?;
        let q = qemu_once(a, &listener, 3 + i as u32)?;
        if i == 0 {
            continue;
        }
        println!(
            "run {i:2}: jevm {:8.1} ms   qemu {:8.1} ms",
            j.wall.as_secs_f64() * 1e3,
            q.as_secs_f64() * 1e3
        );
        jevm_ms.push(j.wall.as_secs_f64() * 1e3);
        qemu_ms.push(q.as_secs_f64() * 1e3);
        rss.push(j.rss_kib as f64);
        vmm.push(j.vmm_kib as f64);
    }
    let (mj, mq) = (median(&mut jevm_ms), median(&mut qemu_ms));
    println!("jevm boot-to-agent-ready median: {mj:.1} ms");
    println!("qemu microvm boot-to-agent-ready median: {mq:.1} ms");
    println!("ratio jevm/qemu: {:.3}", mj / mq);
    println!(
        "jevm process RSS at agent ready, median: {:.0} KiB (VMM's own, excluding guest RAM: {:.0} KiB)",
        median(&mut rss),
        median(&mut vmm)
    );
    Ok(())
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn run_jevm(a: &Args, args: &[&str]) -> Result<String> {
    let out = Command::new(&a.jevm)
        .args(args)
        .output()
        .context("spawn jevm")?;
    if !out.status.success() {
        bail!(
            "jevm {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The bench's template store, mounted as hack/install mounts the real one:
/// a tmpfs with huge pages (docs/clones.md); unmounted when dropped.
struct HugeStore(std::path::PathBuf);

impl HugeStore {
    fn mount(dir: &std::path::Path) -> Option<HugeStore> {
        std::fs::create_dir_all(dir).ok()?;
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let target = c(dir.to_str()?);
        // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(
                c("jevm-bench-templates").as_ptr(),
                target.as_ptr(),
                c("tmpfs").as_ptr(),
                0,
                c("mode=0700,huge=within_size").as_ptr().cast(),
            )
        };
        if r != 0 {
            println!(
                "template store {}: 4 KiB pages (no tmpfs with huge pages: {})",
                dir.display(),
                std::io::Error::last_os_error()
            );
            return None;
        }
        println!(
            "template store {}: a tmpfs with huge pages, as hack/install mounts it",
            dir.display()
        );
        Some(HugeStore(dir.to_path_buf()))
    }
}

impl Drop for HugeStore {
    fn drop(&mut self) {
        // Template files are immutable; a tmpfs goes with its contents.
        if let Ok(p) = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2(2) with a NUL-terminated path.
            unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn bench_clone(a: &Args) -> Result<()> {
    let state_dir = std::env::temp_dir().join("jevm-bench-templates");
    let run_dir = std::env::temp_dir().join("jevm-bench-run");
    let _store = HugeStore::mount(&state_dir);
    let sd = state_dir.to_str().unwrap();
    let rd = run_dir.to_str().unwrap();
    let (k, i, m) = (
        a.kernel.to_str().unwrap(),
        a.initrd.to_str().unwrap(),
        a.mem.to_string(),
    );
    println!(
        "# jevm-bench clone: {} MiB, 1 vCPU, {} clones",
        a.mem, a.runs
    );
    let t0 = Instant::now();
    let key = run_jevm(
        a,
        &[
            "template",
            "create",
            "--kernel",
            k,
            "--initrd",
            i,
            "--mem",
            &m,
            "--state-dir",
            sd,
            "--run-dir",
            rd,
        ],
    )?
    .trim()
    .to_string();
    println!(
        "template {key} created in {:.0} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let memory = state_dir.join(&key).join("memory");
    let meta = std::fs::metadata(&memory)?;
    use std::os::unix::fs::MetadataExt;
    let template_kib = meta.blocks() * 512 / 1024;
    println!(
        "template memory file: {} MiB apparent, {} KiB allocated (what clones share)",
        meta.len() >> 20,
        template_kib
    );

    // A pod's clone serves the pod's directory, and its guest keeps the
    // share the template mounted; without one the guest would unmount it
    // as part of its identity, which no pod's clone does.
    let share = std::env::temp_dir().join("jevm-bench-share");
    std::fs::create_dir_all(&share)?;
    let share = share.to_str().unwrap();

    // (b) clones, each its own process as a shim would be, then (a) cold
    // boots, for the ratio, both timed from spawning the process to the
    // agent being ready; (c) a clone's memory while idle. The first of
    // each is a warm-up, not counted. Not alternated: in the emulated KVM
    // test host a cold boot evicts the translated guest code every clone
    // of a template shares (QEMU's TCG cache), and the first clone after a
    // boot paid 150-420 ms more for it (docs/benchmarks.md, 2026-12-06),
    // which hardware would not.
    let boot_runs = a.runs.min(10);
    let mut boots = Vec::new();
    let mut ready = Vec::new();
    let mut spawn_ready = Vec::new();
    // The process's own start: spawn to `main`, `main` to the template
    // opened, the template opened to the clone's start.
    let (mut to_main, mut to_opened, mut to_clone) = (Vec::new(), Vec::new(), Vec::new());
    let mut private = Vec::new();
    let mut private_clean = Vec::new();
    let mut anonymous = Vec::new();
    let mut pss = Vec::new();
    let mut rss = Vec::new();
    for n in 0..=a.runs {
        let t = Instant::now();
        let mut child = Command::new(&a.jevm)
            .args([
                "clone",
                "--template",
                &key,
                "--state-dir",
                sd,
                "--run-dir",
                rd,
                "--hold-ms",
                "1500",
                "--share",
                share,
            ])
            .stdout(Stdio::piped())
            .spawn()?;
        let pid = child.id();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut got = None;
        for line in lines.by_ref() {
            let line = line?;
            if let Some(rest) = line.split("clone-to-agent-ready ").nth(1) {
                let spawned = t.elapsed().as_secs_f64() * 1e3;
                let number = |after: &str| -> Result<f64> {
                    let v = rest
                        .split_once(after)
                        .and_then(|(_, r)| r.split_whitespace().next())
                        .with_context(|| format!("no {after:?} in {line:?}"))?;
                    Ok(v.parse::<f64>()?)
                };
                let in_process: f64 = rest.split_whitespace().next().unwrap_or("0").parse()?;
                let (opened, cloning) = (number("template opened ")?, number("clone started ")?);
                got = Some(in_process);
                spawn_ready.push(spawned);
                if n > 0 {
                    to_main.push(spawned - in_process - cloning);
                    to_opened.push(opened);
                    to_clone.push(cloning - opened);
                }
            }
            if line.starts_with("vmm memory:") {
                // idle for a moment, then look at it
                std::thread::sleep(Duration::from_millis(1000));
                let s = jevm_tests::smaps_rollup(pid)?;
                if n > 0 {
                    // Pages only this clone has: its copy-on-write copies
                    // and the VMM's own. Not Private_Dirty: the template's
                    // tmpfs pages count there while this clone is the only
                    // process mapping them (the clones run one at a time),
                    // the more so since a huge page is mapped whole.
                    anonymous.push(s["Anonymous"] as f64);
                    private.push(s["Private_Dirty"] as f64);
                    private_clean.push(s["Private_Clean"] as f64);
                    pss.push(s["Pss"] as f64);
                    rss.push(s["Rss"] as f64);
                }
                break;
            }
        }
        for _ in lines {}
        if !child.wait()?.success() {
            bail!("jevm clone failed");
        }
        if n > 0 {
            ready.push(got.context("no clone-to-agent-ready line")?);
        } else {
            spawn_ready.clear();
        }
    }
    for n in 0..=boot_runs {
        let j = jevm_once(a)?;
        if n > 0 {
            boots.push(j.wall.as_secs_f64() * 1e3);
        }
    }
    run_jevm(a, &["template", "rm", &key, "--state-dir", sd])?;
    let boot_med = median(&mut boots);
    let clone_med = median(&mut ready.clone());
    let clone_p99 = percentile(&mut ready, 0.99);
    let priv_med = median(&mut private);
    println!(
        "cold boot to agent ready, median of {}: {boot_med:.1} ms",
        boots.len()
    );
    println!("clone to agent ready (in the clone process), median {clone_med:.2} ms, p99 {clone_p99:.2} ms");
    let spawn_med = median(&mut spawn_ready);
    println!(
        "clone process spawn to agent ready, median {spawn_med:.2} ms (the process's own start, \
         medians: spawn to main {:.2} ms, main to template opened {:.2}, to clone started {:.2})",
        median(&mut to_main),
        median(&mut to_opened),
        median(&mut to_clone)
    );
    println!(
        "ratio clone/boot, both from process spawn to agent ready: {:.4} (in-process clone / boot: {:.4})",
        spawn_med / boot_med,
        clone_med / boot_med
    );
    let anon_med = median(&mut anonymous);
    println!(
        "idle clone process: Anonymous {anon_med:.0} KiB (its own: copies and the VMM's), Private_Dirty \
         {priv_med:.0} KiB (with the template's tmpfs pages, this clone being their only mapper), \
         Private_Clean {:.0} KiB, PSS {:.0} KiB, RSS {:.0} KiB (medians)",
        median(&mut private_clean),
        median(&mut pss),
        median(&mut rss)
    );
    let per_clone_mib = anon_med / 1024.0;
    println!(
        "idle clones in 4 GiB: {:.0} (4096 MiB / {per_clone_mib:.1} MiB Anonymous each; the {:.1} MiB template is shared)",
        4096.0 / per_clone_mib,
        template_kib as f64 / 1024.0
    );
    Ok(())
}

fn bench_tiny_clone(a: &Args) -> Result<()> {
    use jevm_runtime::vmm::{RestoreConfig, Vm, VmConfig};
    use std::os::fd::AsRawFd;
    use vm_memory::{Bytes, GuestAddress};
    let dir = tempfile::tempdir()?;
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(
        &kernel,
        jevm_tests::tiny::tiny_elf(jevm_tests::tiny::SPIN_ON_FLAG),
    )?;
    let cfg = VmConfig {
        kernel,
        initrd: None,
        vcpus: 1,
        mem_mib: a.mem,
        extra_cmdline: String::new(),
        vsock_uds: Some(dir.path().join("template.vsock")),
        disks: vec![],
        share: None,
        console_log: None,
    };
    let mut template = Vm::start(&cfg)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !template.console_tail(2).iter().any(|l| l == "A") {
        if Instant::now() > deadline {
            bail!("tiny guest never printed A");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // As a Linux template leaves them: vsock, virtio-fs and virtio-net
    // active, so every clone starts their workers (jailed) and serves a
    // share, as a pod's clone does.
    let state = jevm_tests::tiny::with_devices_active(&template.save()?);
    let memory = dir.path().join("memory");
    template.save_memory(&memory)?;
    drop(template);
    let share = dir.path().join("share");
    std::fs::create_dir(&share)?;
    let runs = a.runs.max(50);
    // Four kinds, alternated: a warm page cache (the template's pages
    // cached, as on a node that started pods before) or a cold one (the
    // memory file's pages dropped before the clone); and the VM's jailed
    // threads started and its KVM VM made by the restore itself, or
    // prepared 3 ms before it (`clone::prepare_threads` and
    // `clone::prepare_vm`, which the shim calls at the start of a pod's
    // create, before its mounts and template lookup).
    let kinds = [
        (
            "warm page cache, threads started by the restore",
            false,
            false,
        ),
        (
            "warm page cache, threads and VM prepared ahead",
            false,
            true,
        ),
        (
            "cold page cache, threads started by the restore",
            true,
            false,
        ),
        ("cold page cache, threads and VM prepared ahead", true, true),
    ];
    let mut restore = vec![Vec::new(); kinds.len()];
    let mut first_exit = vec![Vec::new(); kinds.len()];
    for n in 0..(runs + 1) * kinds.len() {
        let k = n % kinds.len();
        let (_, cold, prepared) = kinds[k];
        if cold {
            let f = std::fs::File::open(&memory)?;
            // SAFETY: an advisory call on an fd this function owns.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
        if prepared {
            jevm_runtime::clone::prepare_threads(1)?;
            jevm_runtime::clone::prepare_vm();
            std::thread::sleep(Duration::from_millis(3));
        }
        let t = Instant::now();
        let vm = Vm::restore(
            &state,
            &RestoreConfig {
                memory: memory.clone(),
                memory_file: None,
                vsock_uds: dir.path().join(format!("v{n}")),
                console_log: None,
                share: Some(share.clone()),
                share_device_nodes: Default::default(),
                tap: None,
            },
        )?;
        let restored = t.elapsed();
        vm.guest_memory().write_obj(b'x', GuestAddress(0x3000))?;
        // The guest's next exit is the `out` of the flag byte.
        while vm.console_tail(1).first().map(String::as_str) != Some("x") {
            std::hint::spin_loop();
        }
        let exit = t.elapsed();
        drop(vm);
        // The first round warms the process up (allocator, jail set-up).
        if n >= kinds.len() {
            restore[k].push(restored.as_secs_f64() * 1e3);
            first_exit[k].push(exit.as_secs_f64() * 1e3);
        }
    }
    println!(
        "# jevm-bench tiny-clone: {runs} clones of each kind, alternated, of a {} MiB tiny guest template with vsock, virtio-fs (a share) and virtio-net active, on this machine's /dev/kvm, jail mode {:?}",
        a.mem,
        jevm_runtime::jail::mode().unwrap_or_default()
    );
    for (i, (what, _, _)) in kinds.iter().enumerate() {
        println!(
            "{what}: host-side clone cost (Vm::restore: create the VM, map memory, restore vCPU and devices, start the device workers and the vCPU), median {:.3} ms, p99 {:.3} ms; to the guest's first exit, median {:.3} ms",
            median(&mut restore[i].clone()),
            percentile(&mut restore[i], 0.99),
            median(&mut first_exit[i]),
        );
    }
    Ok(())
}
