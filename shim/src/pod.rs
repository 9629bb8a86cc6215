//! One pod = one VM: a clone of the template for the configured kernel,
//! initramfs and size, serving the pod's shared directory over virtio-fs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jevm_protocol::{Event, Request, Response, MAX_FRAME};
use jevm_runtime::agent_client::AgentClient;
use jevm_runtime::clone::{
    build_template, clone_ahead, CalledBehind, CloneNetwork, CloneOptions, IdentityOwed,
};
use jevm_runtime::microvm::MicroVm;
use jevm_runtime::template::{TemplateSpec, TemplateStore};
use jevm_runtime::vmm::devices::fs::{DeviceNodeGrants, RequestCounts, ShareRequests};
use jevm_runtime::vmm::vm::VmWatch;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::agent::{self, Agent, CallError, Guest, ANSWER_TIMEOUT};
use crate::config::JevmConfig;
use crate::events::LOST_EXIT_STATUS;
use crate::layout::{vms_dir, PodLayout};
use crate::network::PodNetwork;
use crate::sizing::VmSize;

/// What the pod's watchers tell the task service.
#[derive(Debug)]
pub enum PodEvent {
    Agent {
        event: Event,
    },
    /// The VM died or hung while the pod was not being shut down: every
    /// process in it is gone. `cause` says how (see [`Life::lose`]).
    Lost {
        pod: String,
        cause: String,
    },
}

/// How many console lines the loss report quotes: the last ones, or a
/// guest kernel's whole oops from its first line.
const LOST_CONSOLE_LINES: usize = 10;
const LOST_OOPS_LINES: usize = 100;

/// How long the event reader, after its stream ended, waits for the VM's
/// own stop reason (a better cause than "end of stream"): an agent that
/// died makes the guest kernel panic a moment after its sockets close.
const STOP_REASON_GRACE: Duration = Duration::from_millis(500);

/// The pod's VM and what its watchers share with the pod: the VM watcher
/// thread, the agent event reader and the liveness pinger each hold one and
/// report a loss through [`Life::lose`], which lets only the first through.
struct Life {
    pod: String,
    agent: Arc<Agent>,
    vm: Mutex<Option<MicroVm>>,
    watch: VmWatch,
    /// The shim is stopping the pod, or it is lost: a VM stop is expected.
    closing: AtomicBool,
    lost: AtomicBool,
    /// The event reader and the liveness task, ended with the pod.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    tx: mpsc::UnboundedSender<PodEvent>,
}

impl Life {
    fn take_vm(&self) -> Option<MicroVm> {
        self.vm.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn abort_tasks(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }

    /// No more agent calls: they would fail or hang.
    fn mark_lost(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.agent.mark_dead();
        self.closing.store(true, Ordering::SeqCst);
    }

    /// The pod's VM is gone (`cause`) and nobody asked for it: unless the
    /// pod is already closing or lost, logs the loss, tells the task
    /// service (which ends every process of the pod), ends the watchers and
    /// hands back the VM for the caller to drop on a thread that may block.
    /// Dropping it stops a hung guest and closes every vsock stream, so
    /// agent calls, the event reader and stdio copies end at once.
    fn lose(&self, cause: String) -> Option<MicroVm> {
        if self.closing.load(Ordering::SeqCst) || self.lost.swap(true, Ordering::SeqCst) {
            return None;
        }
        self.mark_lost();
        log::error!(
            "pod {}: the VM is gone: {cause}; its processes exit with status {LOST_EXIT_STATUS}; \
             console lines: {:?}",
            self.pod,
            self.watch
                .console_report(LOST_CONSOLE_LINES, LOST_OOPS_LINES)
        );
        let _ = self.tx.send(PodEvent::Lost {
            pod: self.pod.clone(),
            cause,
        });
        self.abort_tasks();
        self.take_vm()
    }

    /// [`Life::lose`] from async code: the VM is dropped off the runtime.
    async fn lose_async(&self, cause: String) {
        if let Some(vm) = self.lose(cause) {
            let _ = tokio::task::spawn_blocking(move || drop(vm)).await;
        }
    }
}

pub struct Pod {
    pub id: String,
    pub layout: PodLayout,
    pub agent: Arc<dyn Guest>,
    pub vm_dir: PathBuf,
    /// The VM's size, for the containers that join it.
    pub size: VmSize,
    /// The VM and its watchers; None only for the task service's tests,
    /// whose pods are a fake guest without a VM.
    life: Option<Arc<Life>>,
    /// Set by `stop` for a pod without a VM.
    stopped: AtomicBool,
    /// The container that started the pod and its guest init PID: CRI
    /// containers join its namespaces.
    pub sandbox: Mutex<Option<(String, u32)>>,
    /// The tap and redirects joining the VM to the pod's network namespace;
    /// undone when the pod stops.
    network: Mutex<Option<PodNetwork>>,
    /// The device nodes the guest may create in the share: what the specs
    /// of the pod's containers grant (`devices::fs::device_nodes`).
    pub share_device_nodes: Arc<DeviceNodeGrants>,
    /// The clone's identity, sent and being applied while the shim mounts
    /// the first container's share: [`Pod::call_when_ready`] sends the
    /// first container request behind it.
    identity: Mutex<Option<IdentityOwed>>,
    /// Whether the agent's event stream is subscribed: sent by the task
    /// that subscribes, awaited by [`Pod::call_when_ready`].
    subscribed: Mutex<Option<tokio::sync::oneshot::Receiver<Result<(), String>>>>,
    /// Bumped by every [`Pod::settle_memory_later`]: only the latest one's
    /// pass runs.
    settle: AtomicU64,
    /// What the guest has asked of its share, for the create's timings.
    share_requests: Option<Arc<ShareRequests>>,
}

/// What starting a pod takes.
pub struct PodStart<'a> {
    pub cfg: &'a JevmConfig,
    pub id: &'a str,
    pub layout: PodLayout,
    pub hostname: String,
    pub size: VmSize,
    /// The network namespace the CNI plugins prepared, if any.
    pub netns: Option<PathBuf>,
    pub events: mpsc::UnboundedSender<PodEvent>,
}

/// How the task service gets a pod: [`VmPods`] clones its VM; the task
/// service's tests hand out pods whose guest is a fake.
#[async_trait::async_trait]
pub trait PodStarter: Send + Sync {
    async fn start(&self, how: PodStart<'_>) -> Result<(Arc<Pod>, StartTimes), String>;
}

/// Pods in VMs cloned from the template store.
pub struct VmPods;

#[async_trait::async_trait]
impl PodStarter for VmPods {
    async fn start(&self, how: PodStart<'_>) -> Result<(Arc<Pod>, StartTimes), String> {
        Pod::start(
            how.cfg,
            how.id,
            how.layout,
            how.hostname,
            how.size,
            how.netns,
            how.events,
        )
        .await
    }
}

/// How long the VM's start took, for the create→start breakdown.
#[derive(Debug, Default, Clone, Copy)]
pub struct StartTimes {
    pub template_lookup: Duration,
    /// Tap and redirects in the pod's network namespace.
    pub network: Duration,
    pub clone: Duration,
}

/// How long a pod must go without a start before its guest's copies of
/// template pages are looked at ([`Pod::settle_memory_later`]): past the
/// burst of work a start sets off in the guest, and past the guest's own
/// free page reporting (2 s after pages are freed).
const SETTLE_DELAY: Duration = Duration::from_secs(3);

impl Pod {
    /// The requests the guest has made of its share so far.
    pub fn share_requests(&self) -> Option<RequestCounts> {
        self.share_requests.as_ref().map(|r| r.counts())
    }

    /// Once the pod has had no start for [`SETTLE_DELAY`], gives back the
    /// guest's private copies that hold what the template's page holds
    /// (`Vm::drop_identical_copies`): they go back to being the template's
    /// pages, shared by every pod. Another start meanwhile pushes the pass
    /// back, so a burst of starts costs one pass.
    pub fn settle_memory_later(self: &Arc<Self>) {
        let Some(life) = self.life.clone() else {
            return;
        };
        let generation = self.settle.fetch_add(1, Ordering::SeqCst) + 1;
        let pod = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(SETTLE_DELAY).await;
            match pod.upgrade() {
                Some(pod) if pod.settle.load(Ordering::SeqCst) == generation => {}
                _ => return,
            }
            if life.closing.load(Ordering::SeqCst) {
                return;
            }
            let pass = tokio::task::spawn_blocking({
                let life = Arc::clone(&life);
                move || {
                    let vm = life.vm.lock().unwrap_or_else(|p| p.into_inner());
                    let t = Instant::now();
                    vm.as_ref()
                        .map(|vm| (vm.vm().drop_identical_copies(), t.elapsed()))
                }
            })
            .await;
            match pass {
                Ok(Some((Ok(r), took))) => log::info!(
                    "pod {}: guest copies of template pages: {} private, {} identical, {} given \
                     back, {} zeros over data, {} put on the zero page ({:.1} ms, the guest paused \
                     {:.1} ms{})",
                    life.pod,
                    r.private,
                    r.identical,
                    r.dropped,
                    r.zero,
                    r.zero_mapped,
                    took.as_secs_f64() * 1e3,
                    r.paused.as_secs_f64() * 1e3,
                    if r.budget_used_up {
                        ", its budget for the pause used up"
                    } else {
                        ""
                    }
                ),
                Ok(Some((Err(e), _))) => log::warn!("pod {}: {e}", life.pod),
                _ => {}
            }
        });
    }

    /// Finds or builds the template, clones it with `layout.shared()` as
    /// its virtio-fs share, subscribes to the agent's events and starts
    /// watching the VM (its own stop, and with `liveness_timeout` set, the
    /// agent's answers to pings). With `netns` (the network namespace the
    /// CNI plugins prepared), the VM joins that network first.
    pub async fn start(
        cfg: &JevmConfig,
        id: &str,
        layout: PodLayout,
        hostname: String,
        size: VmSize,
        netns: Option<PathBuf>,
        events: mpsc::UnboundedSender<PodEvent>,
    ) -> Result<(Arc<Pod>, StartTimes), String> {
        let spec = TemplateSpec {
            kernel: cfg.kernel.clone(),
            initrd: cfg.initramfs.clone(),
            cmdline: cfg.kernel_params.clone(),
            vcpus: size.vcpus,
            mem_mib: size.memory_mib,
        };
        let store = TemplateStore::new(&cfg.template_dir);
        let vms = vms_dir(&cfg.run_dir);
        let share = layout.shared();
        let share_device_nodes = Arc::new(DeviceNodeGrants::default());
        let device_nodes = Arc::clone(&share_device_nodes);
        let pod_id = id.to_string();
        let (vm, network, times) = tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            let template = store
                .get_or_create(&spec, |staging| {
                    build_template(&spec, &vms, staging, |_| Ok(()))
                })
                .map_err(|e| format!("pod {pod_id:?}: template for {spec}: {e:#}"))?;
            let template_lookup = t0.elapsed();
            let t1 = Instant::now();
            let (network, clone_network) = match &netns {
                Some(path) => {
                    let (net, tap, settings) =
                        PodNetwork::attach(path, &pod_id).map_err(|e| e.to_string())?;
                    let n = CloneNetwork {
                        tap: Arc::new(tap),
                        settings,
                    };
                    (Some(net), Some(n))
                }
                None => (None, None),
            };
            let network_setup = t1.elapsed();
            let opts = CloneOptions {
                hostname,
                share: Some(share),
                share_device_nodes: device_nodes,
                network: clone_network,
            };
            let t2 = Instant::now();
            let vm = match clone_ahead(&template, &vms, &opts) {
                Ok(pending) => pending.split(),
                Err(e) => {
                    if let Some(Err(d)) = network.as_ref().map(PodNetwork::detach) {
                        log::error!("{d}");
                    }
                    return Err(format!(
                        "pod {pod_id:?}: cloning template {}: {e}",
                        template.key
                    ));
                }
            };
            Ok::<_, String>((
                vm,
                network,
                StartTimes {
                    template_lookup,
                    network: network_setup,
                    clone: t2.elapsed(),
                },
            ))
        })
        .await
        .map_err(|e| format!("pod {id:?}: VM start thread: {e}"))??;

        let (vm, identity) = vm;
        let (subscribed, sub_rx) = tokio::sync::oneshot::channel();
        let agent = Agent::new(vm.vsock_uds().to_path_buf());
        let uds = vm.vsock_uds().to_path_buf();
        let vm_dir = vm.run_dir().to_path_buf();
        let share_requests = vm.vm().share_requests();
        let life = Arc::new(Life {
            pod: id.to_string(),
            agent: Arc::clone(&agent),
            watch: vm.watch(),
            vm: Mutex::new(Some(vm)),
            closing: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            tx: events.clone(),
        });
        let pod = Arc::new(Pod {
            id: id.to_string(),
            layout,
            agent: agent as Arc<dyn Guest>,
            vm_dir,
            size,
            life: Some(Arc::clone(&life)),
            settle: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            sandbox: Mutex::new(None),
            network: Mutex::new(network),
            share_device_nodes,
            identity: Mutex::new(Some(identity)),
            subscribed: Mutex::new(Some(sub_rx)),
            share_requests,
        });
        let l = Arc::clone(&life);
        if let Err(e) = std::thread::Builder::new()
            .name(format!("watch-{id}"))
            .spawn(move || watch_vm(&l))
        {
            pod.stop().await;
            return Err(format!(
                "pod {id:?}: cannot start the VM watcher thread: {e}"
            ));
        }
        // The subscription is made while the guest applies its identity
        // and the shim mounts the share; `Pod::call_when_ready` waits for
        // both.
        let l = Arc::clone(&life);
        let pod_id = id.to_string();
        let h = tokio::spawn(async move {
            match l.agent.stream("Events", Request::Events).await {
                Ok(stream) => {
                    let _ = subscribed.send(Ok(()));
                    read_events(l, stream, events).await;
                }
                Err(e) => {
                    let _ = subscribed.send(Err(format!(
                        "pod {pod_id:?}: subscribing to agent events: {e}"
                    )));
                }
            }
        });
        life.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(h.abort_handle());
        if let Some(timeout) = cfg.liveness_timeout() {
            let l = Arc::clone(&life);
            let h = tokio::spawn(async move {
                let pinger = AgentPinger { uds, conn: None };
                let closing = || l.closing.load(Ordering::SeqCst);
                if let Some(cause) = watch_liveness(pinger, timeout, closing).await {
                    l.lose_async(cause).await;
                }
            });
            life.tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(h.abort_handle());
        }
        Ok((pod, times))
    }

    /// Has the guest flush its file systems and stops the VM (see
    /// `MicroVm::discard`), waiting for its threads; the VM's run
    /// directory goes with it. Idempotent.
    pub async fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let Some(life) = &self.life else {
            return;
        };
        life.closing.store(true, Ordering::SeqCst);
        let vm = life.take_vm();
        // A lost guest, or one whose VM already stopped, cannot be asked to
        // power off.
        let lost = life.lost.load(Ordering::SeqCst) || life.watch.stop_reason().is_some();
        if let Some(vm) = vm {
            let id = self.id.clone();
            // Dropping the VM stops its threads and removes its run directory.
            let r = tokio::task::spawn_blocking(move || {
                if lost {
                    drop(vm);
                    None
                } else {
                    Some(vm.discard())
                }
            })
            .await;
            match r {
                Ok(reason) => log::info!("pod {id}: VM stopped ({reason:?})"),
                Err(e) => log::error!("pod {id}: VM shutdown thread: {e}"),
            }
        }
        life.abort_tasks();
        // After the VM: the device's fd goes with it, then the tap.
        let network = self
            .network
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(n) = network {
            match tokio::task::spawn_blocking(move || n.detach()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::error!("{e}"),
                Err(e) => log::error!("pod {}: network teardown thread: {e}", self.id),
            }
        }
    }

    /// Whether the VM is joined to a network namespace's network.
    pub fn has_network(&self) -> bool {
        self.network
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The VM died: no more agent calls, teardown without asking it.
    pub fn mark_lost(&self) {
        if let Some(life) = &self.life {
            life.mark_lost();
        }
    }

    /// Being stopped or lost: agent calls would fail or hang.
    pub fn closing(&self) -> bool {
        match &self.life {
            Some(life) => life.closing.load(Ordering::SeqCst),
            None => self.stopped.load(Ordering::SeqCst),
        }
    }

    /// A pod whose guest is `guest` and that has no VM: for the task
    /// service's tests, which drive the service against a fake guest.
    #[cfg(test)]
    pub fn without_vm(id: &str, layout: PodLayout, guest: Arc<dyn Guest>, size: VmSize) -> Pod {
        Pod {
            id: id.to_string(),
            layout,
            agent: guest,
            vm_dir: PathBuf::new(),
            size,
            life: None,
            settle: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            sandbox: Mutex::new(None),
            network: Mutex::new(None),
            share_device_nodes: Arc::default(),
            identity: Mutex::new(None),
            subscribed: Mutex::new(None),
            share_requests: None,
        }
    }

    /// Sends `req`, and for a new pod's first request (its first
    /// container's create) sends it behind the clone's identity on that
    /// connection, without waiting for the identity's answer first (see
    /// `IdentityOwed::call`); the agent's event subscription, made
    /// meanwhile, is awaited too. The outer error is the pod's guest not
    /// becoming ready; the inner result is `req`'s own answer. The
    /// duration is how long the guest took to apply the identity: None
    /// when there was none to wait for (a pod whose first container was
    /// created before).
    pub async fn call_when_ready(
        &self,
        name: &'static str,
        req: Request,
    ) -> Result<(Result<Response, CallError>, Option<Duration>), String> {
        let owed = self
            .identity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let subscribed = self
            .subscribed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let (Some(owed), Some(life)) = (owed, self.life.as_ref()) else {
            return Ok((self.agent.call(name, req).await, None));
        };
        let first = async {
            tokio::task::spawn_blocking(move || owed.call(&req, ANSWER_TIMEOUT))
                .await
                .map_err(|e| format!("pod {:?}: identity thread: {e}", self.id))?
                .map_err(|e| format!("pod {:?}: {e}", self.id))
        };
        let events = async {
            match subscribed {
                Some(rx) => rx.await.unwrap_or_else(|_| {
                    Err(format!(
                        "pod {:?}: the event subscription was dropped",
                        self.id
                    ))
                }),
                None => Ok(()),
            }
        };
        let (first, subscribed) = tokio::join!(first, events);
        let CalledBehind {
            conn,
            answer,
            identity_applied,
        } = first?;
        subscribed?;
        // Only a connection whose last exchange completed is reusable.
        if answer.is_ok() {
            life.agent.adopt(conn);
        }
        Ok((agent::answer(answer), Some(identity_applied)))
    }
}

/// The VM watcher thread: waits for the VM to stop and, if nobody asked
/// for that, reports the pod lost with the VM's reason. Ends when the VM
/// stops for any reason (dropping the VM stops it).
fn watch_vm(life: &Life) {
    let Some(reason) = life.watch.wait(None) else {
        return;
    };
    if !reason.by_guest() {
        return;
    }
    if let Some(vm) = life.lose(reason.to_string()) {
        drop(vm);
    }
}

async fn read_events(
    life: Arc<Life>,
    mut s: tokio::net::UnixStream,
    tx: mpsc::UnboundedSender<PodEvent>,
) {
    let why = loop {
        let len = match s.read_u32().await {
            Ok(n) => n,
            Err(e) => break e.to_string(),
        };
        if len > MAX_FRAME {
            break format!("event frame of {len} bytes");
        }
        let mut body = vec![0u8; len as usize];
        if let Err(e) = s.read_exact(&mut body).await {
            break e.to_string();
        }
        match serde_json::from_slice::<Event>(&body) {
            Ok(event) => {
                let _ = tx.send(PodEvent::Agent { event });
            }
            Err(e) => log::warn!("pod {}: undecodable agent event: {e}", life.pod),
        }
    };
    if life.closing.load(Ordering::SeqCst) {
        return;
    }
    // The VM's own reason, when it has one, says more than the stream.
    let watch = life.watch.clone();
    let reason = tokio::task::spawn_blocking(move || watch.wait(Some(STOP_REASON_GRACE)))
        .await
        .ok()
        .flatten()
        .filter(|r| r.by_guest());
    let cause = match reason {
        Some(r) => r.to_string(),
        None => format!("the agent's event stream ended ({why})"),
    };
    life.lose_async(cause).await;
}

/// One liveness probe: a round trip to the agent, answered within `budget`.
/// Blocking; runs on tokio's blocking pool.
pub trait Pinger: Send + 'static {
    fn ping(&mut self, nonce: u64, budget: Duration) -> Result<(), String>;
}

/// Pings the agent over a connection of its own, so that a ping never
/// queues behind a slow request; reconnects after any failure.
struct AgentPinger {
    uds: PathBuf,
    conn: Option<AgentClient>,
}

impl Pinger for AgentPinger {
    fn ping(&mut self, nonce: u64, budget: Duration) -> Result<(), String> {
        let c = match self.conn.take() {
            Some(mut c) => {
                c.set_timeout(Some(budget))
                    .map_err(|e| format!("agent socket {}: {e}", self.uds.display()))?;
                c
            }
            None => AgentClient::connect(&self.uds, budget).map_err(|e| e.to_string())?,
        };
        let mut c = c;
        c.ping(nonce).map_err(|e| e.to_string())?;
        // Only a connection whose last exchange completed is reusable.
        self.conn = Some(c);
        Ok(())
    }
}

/// Extra time a probe gets past its budget before it counts as stuck: its
/// own read timeout should have ended it by then.
const PROBE_GRACE: Duration = Duration::from_secs(1);

/// Pings every `timeout / 3` until no ping succeeded for `timeout` (the
/// guest hangs: returns the cause) or `closing()` turns true (None). Each
/// probe gets the time left until that deadline, so a guest that stops
/// answering right after a good ping is declared hung `timeout` later, not
/// `timeout` after the next ping is sent; a slow answer within the deadline
/// is still an answer.
pub async fn watch_liveness<P: Pinger>(
    pinger: P,
    timeout: Duration,
    closing: impl Fn() -> bool,
) -> Option<String> {
    let interval = timeout / 3;
    let mut pinger = Some(pinger);
    let mut last_ok = Instant::now();
    let mut last_err = String::from("no answer yet");
    let mut nonce: u64 = u64::from(std::process::id()) << 32;
    loop {
        let deadline = last_ok + timeout;
        let now = Instant::now();
        tokio::time::sleep(interval.min(deadline.saturating_duration_since(now))).await;
        if closing() {
            return None;
        }
        let budget = deadline.saturating_duration_since(Instant::now());
        if budget.is_zero() {
            return Some(format!(
                "the guest hangs: its agent answered no ping for {} s (last: {last_err})",
                timeout.as_secs_f32()
            ));
        }
        nonce = nonce.wrapping_add(1);
        let sent = Instant::now();
        let mut p = pinger.take()?;
        let probe = tokio::task::spawn_blocking(move || {
            let r = p.ping(nonce, budget);
            (p, r)
        });
        match tokio::time::timeout(budget + PROBE_GRACE, probe).await {
            Ok(Ok((p, r))) => {
                pinger = Some(p);
                match r {
                    Ok(()) => last_ok = sent,
                    Err(e) => last_err = e,
                }
            }
            Ok(Err(e)) => {
                // A bug of ours must not kill the pod: stop checking.
                log::error!("liveness probe thread failed: {e}; no more liveness checks");
                return None;
            }
            Err(_) => {
                if closing() {
                    return None;
                }
                return Some(format!(
                    "the guest hangs: a ping to its agent did not return within {} s",
                    (budget + PROBE_GRACE).as_secs_f32()
                ));
            }
        }
        if closing() {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// Answers the first `answers` pings at once, then behaves as `after`.
    struct FakeAgent {
        answers: Arc<AtomicU32>,
        after: After,
        nonces: Arc<Mutex<Vec<u64>>>,
    }

    #[derive(Clone, Copy)]
    enum After {
        /// Keeps answering.
        Answer,
        /// Silent: the read times out when the budget is spent.
        Silent,
        /// Refuses at once (a broken connection).
        Refuse,
        /// Blocks well past its budget (a probe that ignores its timeout).
        Stuck,
    }

    impl Pinger for FakeAgent {
        fn ping(&mut self, nonce: u64, budget: Duration) -> Result<(), String> {
            self.nonces.lock().unwrap().push(nonce);
            let left = self.answers.load(Ordering::SeqCst);
            if left > 0 {
                self.answers.store(left - 1, Ordering::SeqCst);
                return Ok(());
            }
            match self.after {
                After::Answer => Ok(()),
                After::Silent => {
                    std::thread::sleep(budget);
                    Err("agent request Ping: timed out".into())
                }
                After::Refuse => Err("connection refused".into()),
                After::Stuck => {
                    std::thread::sleep(budget * 4 + PROBE_GRACE);
                    Err("late".into())
                }
            }
        }
    }

    fn fake(answers: u32, after: After) -> (FakeAgent, Arc<Mutex<Vec<u64>>>) {
        let nonces = Arc::new(Mutex::new(Vec::new()));
        let agent = FakeAgent {
            answers: Arc::new(AtomicU32::new(answers)),
            after,
            nonces: nonces.clone(),
        };
        (agent, nonces)
    }

    const T: Duration = Duration::from_millis(600);

    #[tokio::test]
    async fn an_answering_agent_is_never_declared_hung_and_closing_ends_the_watch() {
        let (agent, nonces) = fake(0, After::Answer);
        let t0 = Instant::now();
        let closing = move || t0.elapsed() > T * 3;
        assert_eq!(watch_liveness(agent, T, closing).await, None);
        let n = nonces.lock().unwrap().clone();
        // One ping every T/3 for 3 T, each with a fresh nonce.
        assert!(n.len() >= 6, "only {} pings", n.len());
        assert!(n.windows(2).all(|w| w[0] != w[1]));
    }

    #[tokio::test]
    async fn a_silent_agent_is_declared_hung_within_the_timeout_of_its_last_answer() {
        let (agent, _) = fake(2, After::Silent);
        let t0 = Instant::now();
        let cause = watch_liveness(agent, T, || false).await.expect("hung");
        // Two answers at T/3 and 2T/3, then silence: hung at about 2T/3 + T.
        let took = t0.elapsed();
        assert!(
            took >= T * 5 / 3 - Duration::from_millis(50) && took < T * 5 / 3 + T,
            "declared hung after {took:?}"
        );
        assert!(
            cause.contains("answered no ping for 0.6 s") && cause.contains("timed out"),
            "{cause}"
        );
    }

    #[tokio::test]
    async fn refused_pings_are_retried_until_the_deadline_then_quoted() {
        let (agent, nonces) = fake(0, After::Refuse);
        let t0 = Instant::now();
        let cause = watch_liveness(agent, T, || false).await.expect("hung");
        let took = t0.elapsed();
        assert!(took >= T && took < T * 2, "declared hung after {took:?}");
        assert!(cause.contains("connection refused"), "{cause}");
        assert!(nonces.lock().unwrap().len() >= 2, "no retry");
    }

    #[tokio::test]
    async fn a_probe_stuck_past_its_own_timeout_still_ends_in_a_hang() {
        let (agent, _) = fake(0, After::Stuck);
        let t0 = Instant::now();
        let cause = watch_liveness(agent, T, || false).await.expect("hung");
        assert!(t0.elapsed() < T * 2 + PROBE_GRACE, "{:?}", t0.elapsed());
        assert!(cause.contains("did not return"), "{cause}");
    }

    #[tokio::test]
    async fn closing_during_a_silent_probe_is_not_a_hang() {
        let (agent, _) = fake(0, After::Silent);
        let closing = Arc::new(AtomicBool::new(false));
        let c2 = closing.clone();
        tokio::spawn(async move {
            tokio::time::sleep(T / 2).await;
            c2.store(true, Ordering::SeqCst);
        });
        let r = watch_liveness(agent, T, move || closing.load(Ordering::SeqCst)).await;
        assert_eq!(r, None);
    }
}
