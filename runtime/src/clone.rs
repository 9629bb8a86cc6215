//! Templates and clones: boot once, save, and start every later VM as a
//! copy-on-write clone of the saved one.
//!
//! [`build_template`] boots a VM, lets the caller prepare it, waits until no
//! vsock connection is open (nothing in flight on any device), stops the
//! vCPUs and writes `state.json` + `memory` for the template store.
//! [`clone_from`] maps that memory `MAP_PRIVATE`, restores every piece of
//! state, resumes, and gives the clone its own identity (RNG reseed, wall
//! clock, hostname) before anything else runs in it.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use jevm_protocol::{Identity, Request, Response};
use serde::{Deserialize, Serialize};

use crate::agent_client::{AgentClient, AgentError};
use crate::microvm::{host_random, new_run_dir, BootConfig, BootFailure, BootTimes, MicroVm};
use crate::template::{Template, TemplateSpec, MEMORY_FILE, STATE_FILE};
use crate::vmm::{RestoreConfig, Vm, VmError, VmState};

/// What `state.json` of a template holds.
#[derive(Serialize, Deserialize)]
pub struct TemplateState {
    pub agent_version: String,
    pub vm: VmState,
}

/// How long a template build waits for the host's agent connections to be
/// closed on both sides before it gives up.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);

/// A template is saved once its guest has reported no free pages for this
/// long: longer than the guest kernel's delay between a free and the
/// report it schedules (`PAGE_REPORTING_DELAY`, 2 s), so a pass that was
/// due has run.
const REPORTING_QUIET: Duration = Duration::from_secs(3);
/// How long a template build waits for that quiet before it saves anyway.
const REPORTING_TIMEOUT: Duration = Duration::from_secs(30);

/// The template's share: an empty directory in the staging directory,
/// removed before the template is sealed.
const TEMPLATE_SHARE: &str = "share";

/// Boots a VM for `spec`, has its agent mount the virtio-fs share (over an
/// empty directory: every clone then finds it mounted, see
/// `vmm::devices::fs`), runs `prepare` on it, and saves it into `staging`
/// (the store's build directory) as `state.json` + `memory`.
pub fn build_template(
    spec: &TemplateSpec,
    runtime_root: &Path,
    staging: &Path,
    prepare: impl FnOnce(&MicroVm) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let share = staging.join(TEMPLATE_SHARE);
    std::fs::create_dir(&share)
        .with_context(|| format!("creating the template's share {}", share.display()))?;
    let mut cfg = BootConfig::new(&spec.kernel, &spec.initrd);
    cfg.vcpus = spec.vcpus;
    cfg.mem_mib = spec.mem_mib;
    cfg.extra_cmdline = spec.cmdline.clone();
    cfg.share = Some(share.clone());
    let mut vm = MicroVm::boot(&cfg, runtime_root).context("booting the template VM")?;
    match vm.agent()?.call(&Request::MountShare) {
        Ok(Response::Done) => {}
        Ok(other) => bail!("the template's agent did not mount the share: {other:?}"),
        Err(e) => return Err(e).context("asking the template's agent to mount the share"),
    }
    prepare(&vm).context("preparing the template VM")?;
    wait_for_free_page_reporting(&vm);

    // Quiet point: no host connection open or half-closed in the vsock
    // device, so a clone starts with nothing in flight.
    let deadline = Instant::now() + QUIESCE_TIMEOUT;
    while vm.vm().vsock_connections() > 0 {
        if Instant::now() > deadline {
            bail!(
                "the template VM still has {} vsock connections open",
                vm.vm().vsock_connections()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let state = vm.vm_mut().save().context("saving the template VM")?;
    let state = TemplateState {
        agent_version: vm.agent_version.clone(),
        vm: state,
    };
    let json = serde_json::to_vec(&state).context("encoding the template state")?;
    std::fs::write(staging.join(STATE_FILE), json).context("writing the template state")?;
    vm.vm()
        .save_memory(&staging.join(MEMORY_FILE))
        .context("writing the template memory")?;
    drop(vm);
    std::fs::remove_dir(&share)
        .with_context(|| format!("removing the template's share {}", share.display()))?;
    Ok(())
}

/// Waits until the guest's free page reporting has been quiet for
/// [`REPORTING_QUIET`].
///
/// The first pass after boot walks every free page of the guest, writing
/// each one's `struct page` as it takes it off the free list and puts it
/// back. A template saved before that pass was done holds the rest of it
/// pending, and every clone runs it: in the KVM test host such clones took
/// 440-940 more nested page faults from the restore to `ctr run -d`
/// returning (2130-2680 against 1660-1750), most likely that memmap (56 000
/// free pages x 64 bytes = 3.4 MiB). Which templates did was a matter of
/// timing (docs/clones.md).
fn wait_for_free_page_reporting(vm: &MicroVm) {
    let start = Instant::now();
    let mut seen = vm.vm().free_page_reports().reports;
    let mut since = Instant::now();
    while since.elapsed() < REPORTING_QUIET {
        if start.elapsed() > REPORTING_TIMEOUT {
            log::warn!(
                "template: the guest still reports free pages after {REPORTING_TIMEOUT:?} \
                 ({seen} reports); saving it anyway, its clones may finish the reporting"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
        let now = vm.vm().free_page_reports().reports;
        if now != seen {
            seen = now;
            since = Instant::now();
        }
    }
    log::info!(
        "template: free page reporting quiet after {seen} reports, {} ms",
        start.elapsed().as_millis()
    );
}

/// Why a clone could not be started.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error("template {dir}: state.json does not decode: {cause}")]
    State { dir: String, cause: String },
    #[error("cannot get host entropy for the clone's RNG: {0}")]
    Entropy(std::io::Error),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] BootFailure),
    #[error("clone of template {key}: {source}")]
    Agent { key: String, source: AgentError },
    #[error("clone of template {key}: the agent refused its identity: {answer}")]
    Identity { key: String, answer: String },
}

/// Fresh entropy for a clone's RNG, from the host kernel.
fn host_entropy() -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; 64];
    host_random(&mut b)?;
    Ok(b)
}

/// What makes one clone different from its siblings, besides fresh entropy.
#[derive(Debug, Clone, Default)]
pub struct CloneOptions {
    pub hostname: String,
    /// Host directory the clone's virtio-fs device serves (a pod's shared
    /// directory); the agent mounts it at `jevm_protocol::SHARE_MOUNT`.
    /// None: the device stays unattached and nothing is mounted.
    pub share: Option<std::path::PathBuf>,
    /// The device nodes the guest may create in the share; the caller
    /// keeps a handle and grants what each container's spec grants.
    pub share_device_nodes: std::sync::Arc<crate::vmm::devices::fs::DeviceNodeGrants>,
    /// The pod's network: the tap the clone's virtio-net device uses and
    /// the settings the agent gives the guest interface. None: the device
    /// stays unattached and the interface down.
    pub network: Option<CloneNetwork>,
}

/// A tap made for the clone (see `vmm::devices::net`) and what the guest
/// interface must look like to match the host interface it is joined to.
#[derive(Debug, Clone)]
pub struct CloneNetwork {
    pub tap: std::sync::Arc<std::fs::File>,
    pub settings: jevm_protocol::Network,
}

/// Has the VMM's jail start a clone's threads (its `vcpus` vCPUs and the
/// vsock, virtio-fs and virtio-net workers a template has active) ahead,
/// while the caller prepares the rest of the clone: the restore then
/// hands them their work instead of waiting for their seccomp filters to
/// be installed (`crate::jail`). Sets the jail up with `JEVM_SECCOMP`'s
/// mode if the caller did not.
pub fn prepare_threads(vcpus: usize) -> Result<(), CloneError> {
    use crate::vmm::devices::{fs::VIRTIO_ID_FS, net::VIRTIO_ID_NET};
    // Kept, not released: the clone that follows takes them.
    crate::vmm::vm::jail_threads_ahead(
        vcpus,
        [crate::vmm::vm::VIRTIO_ID_VSOCK, VIRTIO_ID_FS, VIRTIO_ID_NET],
    )?
    .taken();
    Ok(())
}

/// Has the next clone's KVM VM made ahead, on a thread of its own, while
/// the caller prepares the rest (`vmm::ahead`): the restore takes it
/// instead of waiting for `KVM_CREATE_VM`.
pub fn prepare_vm() {
    crate::vmm::ahead::prepare();
}

/// Starts a clone of `template` in a fresh run directory under
/// `runtime_root`, gives it its identity, and returns it agent-ready.
pub fn clone_from(
    template: &Template,
    runtime_root: &Path,
    opts: &CloneOptions,
) -> Result<MicroVm, CloneError> {
    clone_ahead(template, runtime_root, opts)?.confirm()
}

/// A clone that was sent its identity and is applying it: the caller does
/// its own work meanwhile (a shim mounts the pod's share), then confirms.
/// Until then nothing but the held connection may ask the agent for work
/// that uses the guest's RNG, clock or share: that is why the VM is only
/// reachable through [`PendingClone::confirm`] or [`PendingClone::split`].
pub struct PendingClone {
    vm: MicroVm,
    identity: IdentityOwed,
    started: Instant,
}

/// The connection a clone's identity went over, its answer still unread.
pub struct IdentityOwed {
    conn: AgentClient,
    key: String,
}

impl IdentityOwed {
    /// Waits for the agent's answer: the connection, ready for the next
    /// request, once the identity is applied.
    pub fn confirm(mut self) -> Result<AgentClient, CloneError> {
        match self.conn.settle() {
            Ok(()) => Ok(self.conn),
            Err(AgentError::Guest { answer, .. }) => Err(CloneError::Identity {
                key: self.key,
                answer,
            }),
            Err(source) => Err(CloneError::Agent {
                key: self.key,
                source,
            }),
        }
    }
}

/// What [`IdentityOwed::call`] got: the identity applied, then the answer
/// to the request sent behind it.
pub struct CalledBehind {
    /// The connection, ready for the next request if `answer` is Ok.
    pub conn: AgentClient,
    pub answer: Result<Response, AgentError>,
    /// From the send to the identity's answer.
    pub identity_applied: Duration,
}

impl IdentityOwed {
    /// Sends `req` behind the identity on its connection without waiting
    /// for the identity's answer, then reads both: the guest starts on
    /// `req` the moment the identity is applied, with no round trip
    /// between. Safe because the agent closes a connection whose identity
    /// failed, so `req` never runs in a clone that kept the template's
    /// identity; that failure is the error here.
    /// `timeout` bounds the wait for `req`'s answer.
    pub fn call(mut self, req: &Request, timeout: Duration) -> Result<CalledBehind, CloneError> {
        let t = Instant::now();
        let sent = self.conn.send_behind(req);
        let mut conn = self.confirm()?;
        let identity_applied = t.elapsed();
        let answer = sent
            .and_then(|()| {
                conn.set_timeout(Some(timeout))
                    .map_err(|e| AgentError::Frame {
                        request: crate::agent_client::request_name(req),
                        source: jevm_protocol::FrameError::Io(e),
                    })
            })
            .and_then(|()| conn.read_answer(req));
        Ok(CalledBehind {
            conn,
            answer,
            identity_applied,
        })
    }
}

impl PendingClone {
    /// Waits for the identity: the clone, agent-ready. (Its connection is
    /// closed: a caller that wants to reuse it uses [`PendingClone::split`].)
    pub fn confirm(self) -> Result<MicroVm, CloneError> {
        let PendingClone {
            mut vm,
            identity,
            started,
        } = self;
        identity.confirm()?;
        vm.times.agent_ready = started.elapsed();
        Ok(vm)
    }

    /// The VM and its owed identity apart, for a caller that keeps the VM
    /// (to stop it on any error) and confirms later. Its agent must not be
    /// asked for anything on another connection before the confirmation
    /// but what needs none of the identity (an event subscription, a
    /// ping).
    pub fn split(self) -> (MicroVm, IdentityOwed) {
        (self.vm, self.identity)
    }
}

/// Restores a clone of `template`, connects to its agent and sends the
/// identity without waiting for the answer (see [`PendingClone`]).
pub fn clone_ahead(
    template: &Template,
    runtime_root: &Path,
    opts: &CloneOptions,
) -> Result<PendingClone, CloneError> {
    let hostname = opts.hostname.as_str();
    let t0 = Instant::now();
    let key = template.key.as_str().to_string();
    let state: TemplateState =
        serde_json::from_slice(&template.state).map_err(|e| CloneError::State {
            dir: template.dir.display().to_string(),
            cause: e.to_string(),
        })?;
    let (run_dir, guard) = new_run_dir(runtime_root)?;
    let vsock_uds = run_dir.join("vsock.sock");
    let vm = Vm::restore(
        &state.vm,
        &RestoreConfig {
            memory: template.memory_path(),
            memory_file: Some(std::sync::Arc::new(
                template
                    .memory_file()
                    .try_clone()
                    .map_err(|source| BootFailure::RunDir {
                        path: template.memory_path(),
                        source,
                    })?,
            )),
            vsock_uds: vsock_uds.clone(),
            console_log: Some(run_dir.join("console.log")),
            share: opts.share.clone(),
            share_device_nodes: std::sync::Arc::clone(&opts.share_device_nodes),
            tap: opts.network.as_ref().map(|n| std::sync::Arc::clone(&n.tap)),
        },
    )?;
    let vm_started = t0.elapsed();

    // Identity first: until it is applied the clone's RNG is the template's.
    let identity = Identity {
        entropy: host_entropy().map_err(CloneError::Entropy)?,
        realtime_ns: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        hostname: hostname.to_string(),
        // The device serves the share from the moment the clone resumes;
        // the guest mounts it before it answers, so nothing that follows
        // the identity can see an empty mount point.
        mount_share: opts.share.is_some(),
        network: opts.network.as_ref().map(|n| n.settings.clone()),
    };
    let mut conn =
        first_connection(&vsock_uds, &vm, Duration::from_secs(30)).map_err(|source| {
            CloneError::Agent {
                key: key.clone(),
                source,
            }
        })?;
    conn.send_ahead(&Request::Identity(identity), Response::IdentityApplied)
        .map_err(|source| CloneError::Agent {
            key: key.clone(),
            source,
        })?;
    let times = BootTimes {
        vm_started,
        // Until confirmed: the identity is sent, not yet applied.
        agent_ready: t0.elapsed(),
        guest_uptime: Duration::ZERO,
    };
    std::mem::forget(guard);
    Ok(PendingClone {
        vm: MicroVm {
            vm: Some(vm),
            run_dir,
            vsock_uds,
            agent_version: state.agent_version,
            times,
        },
        identity: IdentityOwed { conn, key },
        started: t0,
    })
}

/// The clone's first connection to its agent. The vsock device drops a
/// connect request the guest has not answered within its request window
/// (2 s, as Firecracker's), and a clone that was just resumed on a loaded
/// host may not have run long enough to answer: such a drop (an empty
/// answer) is asked again until `timeout`, while the VM runs. Any other
/// refusal is final.
fn first_connection(uds: &Path, vm: &Vm, timeout: Duration) -> Result<AgentClient, AgentError> {
    let deadline = Instant::now() + timeout;
    loop {
        match AgentClient::connect(uds, timeout) {
            Err(AgentError::Refused { answer, .. })
                if answer.is_empty() && Instant::now() < deadline && vm.stop_reason().is_none() =>
            {
                log::debug!(
                    "{}: the guest did not answer the connect request yet; asking again",
                    uds.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}
