//! A booted microVM with its agent ready: what `jevm boot` and the tests use.
//!
//! Boot = create the per-VM run directory, listen on the READY socket
//! (`<vsock>_1023`, the host end of the agent's first guest-initiated
//! connection), start the [`Vm`], and wait until the agent says READY or the
//! VM dies. Dropping a [`MicroVm`] stops the VM and removes every file it
//! made.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jevm_protocol::{read_frame, Ready, Request, Response, READY_PORT};

use crate::agent_client::{AgentClient, AgentError};
use crate::vmm::{StopReason, Vm, VmConfig, VmError};

/// How a boot is asked for.
#[derive(Debug, Clone)]
pub struct BootConfig {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub extra_cmdline: String,
    pub disks: Vec<crate::vmm::DiskConfig>,
    /// The directory the VM's virtio-fs device serves (None: unattached).
    pub share: Option<PathBuf>,
    /// How long to wait for the agent's READY.
    pub ready_timeout: Duration,
}

impl BootConfig {
    pub fn new(kernel: impl Into<PathBuf>, initrd: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: initrd.into(),
            vcpus: 1,
            mem_mib: 256,
            extra_cmdline: String::new(),
            disks: Vec::new(),
            share: None,
            ready_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootFailure {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("run directory {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the guest kernel panicked before the agent was ready; last console lines:\n{0}")]
    GuestPanicked(String),
    #[error(
        "the guest stopped before the agent was ready ({reason}); last console lines:\n{tail}"
    )]
    GuestStopped { reason: String, tail: String },
    #[error("the agent was not ready within {secs} s; last console lines:\n{tail}")]
    Timeout { secs: u64, tail: String },
    #[error("the agent's READY message on {path}: {cause}")]
    BadReady { path: PathBuf, cause: String },
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// Timings of one boot, from the host's clock.
#[derive(Debug, Clone, Copy)]
pub struct BootTimes {
    /// `Vm::start` returned (VM built, vCPUs running).
    pub vm_started: Duration,
    /// The agent's READY arrived.
    pub agent_ready: Duration,
    /// Guest uptime when the agent was ready.
    pub guest_uptime: Duration,
}

pub struct MicroVm {
    pub(crate) vm: Option<Vm>,
    pub(crate) run_dir: PathBuf,
    pub(crate) vsock_uds: PathBuf,
    /// The agent's version (from its READY, or from the template).
    pub agent_version: String,
    pub times: BootTimes,
}

const CONSOLE_TAIL: usize = 20;
/// A guest kernel's oops is quoted whole, up to this many lines.
const CONSOLE_OOPS: usize = 100;

impl MicroVm {
    /// Boots a VM in a fresh run directory under `runtime_root`.
    pub fn boot(cfg: &BootConfig, runtime_root: &Path) -> Result<MicroVm, BootFailure> {
        let t0 = Instant::now();
        let (run_dir, guard) = new_run_dir(runtime_root)?;
        let vsock_uds = run_dir.join("vsock.sock");
        let ready_path = PathBuf::from(format!("{}_{READY_PORT}", vsock_uds.display()));
        let listener = UnixListener::bind(&ready_path).map_err(|source| BootFailure::RunDir {
            path: ready_path.clone(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| BootFailure::RunDir {
                path: ready_path.clone(),
                source,
            })?;

        let vm_cfg = VmConfig {
            kernel: cfg.kernel.clone(),
            initrd: Some(cfg.initrd.clone()),
            vcpus: cfg.vcpus,
            mem_mib: cfg.mem_mib,
            extra_cmdline: cfg.extra_cmdline.clone(),
            vsock_uds: Some(vsock_uds.clone()),
            disks: cfg.disks.clone(),
            share: cfg.share.clone(),
            console_log: Some(run_dir.join("console.log")),
        };
        let mut vm = Vm::start(&vm_cfg)?;
        let vm_started = t0.elapsed();

        let ready = match wait_ready(&listener, &ready_path, &vm, cfg.ready_timeout) {
            Ok(r) => r,
            Err(e) => {
                vm.stop();
                return Err(e);
            }
        };
        drop(listener);
        let _ = std::fs::remove_file(&ready_path);
        let times = BootTimes {
            vm_started,
            agent_ready: t0.elapsed(),
            guest_uptime: Duration::from_millis(ready.guest_uptime_ms),
        };
        std::mem::forget(guard);
        Ok(MicroVm {
            vm: Some(vm),
            run_dir,
            vsock_uds,
            agent_version: ready.agent_version,
            times,
        })
    }

    /// The host end of the guest's vsock device.
    pub fn vsock_uds(&self) -> &Path {
        &self.vsock_uds
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    pub fn vm(&self) -> &Vm {
        self.vm.as_ref().expect("vm present until drop")
    }

    pub fn vm_mut(&mut self) -> &mut Vm {
        self.vm.as_mut().expect("vm present until drop")
    }

    /// A handle for a thread that waits for this VM to stop by itself.
    pub fn watch(&self) -> crate::vmm::vm::VmWatch {
        self.vm().watch()
    }

    /// A new connection to the agent.
    pub fn agent(&self) -> Result<AgentClient, AgentError> {
        AgentClient::connect(&self.vsock_uds, Duration::from_secs(30))
    }

    /// Asks the guest to power off and waits for it; stops it by force after
    /// `timeout`. Returns why the VM stopped.
    pub fn shutdown(mut self, timeout: Duration) -> StopReason {
        let asked = self
            .agent_shutdown()
            .inspect_err(|e| log::warn!("asking the agent to shut down: {e}"))
            .is_ok();
        let vm = self.vm.as_mut().expect("vm present until drop");
        let reason = if asked { vm.wait(Some(timeout)) } else { None };
        vm.stop();
        reason.unwrap_or(StopReason::HostRequest)
    }

    /// Has the agent flush the guest's file systems, then stops the VM
    /// without waiting for the guest's own power-off: once the agent has
    /// answered `Shutdown` nothing in the guest is left to lose, and the
    /// guest kernel's reboot path is guest work on the critical path of
    /// every container removal (~140 ms in the KVM test host). Without an
    /// answer the VM is stopped all the same. Returns why the VM stopped
    /// (`HostRequest`, unless it had stopped by itself before).
    pub fn discard(mut self) -> StopReason {
        if let Err(e) = self.agent_shutdown() {
            log::warn!("asking the agent to flush and shut down: {e}");
        }
        let vm = self.vm.as_mut().expect("vm present until drop");
        vm.stop();
        vm.stop_reason().unwrap_or(StopReason::HostRequest)
    }

    fn agent_shutdown(&self) -> Result<(), AgentError> {
        let mut a = self.agent()?;
        match a.call(&Request::Shutdown)? {
            Response::ShuttingDown => Ok(()),
            other => Err(AgentError::Guest {
                request: "Shutdown",
                answer: format!("{other:?}"),
            }),
        }
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        // Drop the VM (devices remove their sockets) before the directory.
        self.vm.take();
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// Removes a run directory on every error path until forgotten.
pub(crate) struct RunDirGuard(pub(crate) Option<PathBuf>);

/// A fresh, uniquely named run directory under `root`, and the guard that
/// removes it unless the VM starts.
pub(crate) fn new_run_dir(root: &Path) -> Result<(PathBuf, RunDirGuard), BootFailure> {
    std::fs::create_dir_all(root).map_err(|source| BootFailure::RunDir {
        path: root.to_owned(),
        source,
    })?;
    let dir = tempdir_in(root)?;
    Ok((dir.clone(), RunDirGuard(Some(dir))))
}

impl Drop for RunDirGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

fn tempdir_in(root: &Path) -> Result<PathBuf, BootFailure> {
    for _ in 0..16 {
        let name = format!("vm-{}-{:08x}", std::process::id(), rand_u32());
        let p = root.join(name);
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(BootFailure::RunDir { path: p, source }),
        }
    }
    Err(BootFailure::RunDir {
        path: root.to_owned(),
        source: std::io::Error::other("no free name"),
    })
}

/// Fills `buf` from the host kernel's CSPRNG.
pub(crate) fn host_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: getrandom writes at most the remaining length into the
        // buffer, which lives for the call.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }
    Ok(())
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    // Run directory names only need to differ; the pid is a fine fallback.
    match host_random(&mut b) {
        Ok(()) => u32::from_ne_bytes(b),
        Err(_) => std::process::id(),
    }
}

fn console_tail(vm: &Vm) -> String {
    vm.console_report(CONSOLE_TAIL, CONSOLE_OOPS).join("\n")
}

/// Waits for the agent to dial the READY port, watching the VM meanwhile.
fn wait_ready(
    listener: &UnixListener,
    path: &Path,
    vm: &Vm,
    timeout: Duration,
) -> Result<Ready, BootFailure> {
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false).ok();
                // The frame follows the connect at once, but a loaded test
                // host can hold a vCPU back for seconds: allow the rest of
                // the READY budget, never less than 10 s.
                let left = deadline.saturating_duration_since(Instant::now());
                s.set_read_timeout(Some(left.max(Duration::from_secs(10))))
                    .ok();
                let ready: Ready = read_frame(&mut s).map_err(|e| BootFailure::BadReady {
                    path: path.to_owned(),
                    cause: e.to_string(),
                })?;
                if ready.protocol_version != jevm_protocol::PROTOCOL_VERSION {
                    return Err(BootFailure::BadReady {
                        path: path.to_owned(),
                        cause: format!(
                            "agent {} speaks protocol {}, this jevm speaks {}",
                            ready.agent_version,
                            ready.protocol_version,
                            jevm_protocol::PROTOCOL_VERSION
                        ),
                    });
                }
                return Ok(ready);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(source) => {
                return Err(BootFailure::RunDir {
                    path: path.to_owned(),
                    source,
                })
            }
        }
        if let Some(reason) = vm.stop_reason() {
            // Give the console a moment: the panic text may still be in flight.
            std::thread::sleep(Duration::from_millis(20));
            if vm.guest_panicked() {
                return Err(BootFailure::GuestPanicked(console_tail(vm)));
            }
            return Err(BootFailure::GuestStopped {
                reason: reason.to_string(),
                tail: console_tail(vm),
            });
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(BootFailure::Timeout {
                secs: timeout.as_secs(),
                tail: console_tail(vm),
            });
        }
        poll_readable(
            listener.as_raw_fd(),
            (deadline - now).min(Duration::from_millis(5)),
        );
    }
}

fn poll_readable(fd: i32, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is a valid pollfd array of length 1 for the whole call.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
}
