//! Boot-to-agent-ready: jevm vs QEMU `-M microvm`, same kernel, same
//! initramfs, same agent, same host, same run.
//!
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
    jevm: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    runs: usize,
    mem: u32,
}

fn parse_args() -> Result<Args> {
    let mut a = std::env::args().skip(1);
    let mut args = Args {
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
            _ => bail!("usage: jevm-bench --jevm PATH --kernel VMLINUX --initrd CPIO [--runs N] [--mem MiB]"),
        }
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
        let j = jevm_once(&a)?;
        let q = qemu_once(&a, &listener, 3 + i as u32)?;
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
