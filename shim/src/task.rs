//! The containerd task service (task API v2) of one shim, i.e. one pod.
//!
//! State lives behind a std mutex that is never held across an await;
//! agent calls run with nothing locked. Creates are serialised (the first
//! one of a pod starts its VM).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim_protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest,
    PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, Status,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskIO, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::{self, r#async::TtrpcContext, Code};
use containerd_shim_protos::types::task::ProcessInfo;
use jevm_protocol::{CreateContainer, ErrorKind, Event, ExecProcess, Request, Response};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use crate::agent::{self, CallError};
use crate::config;
use crate::events::{self, outgoing, Outgoing, LOST_EXIT_STATUS};
use crate::layout::{self, check_id, PodLayout};
use crate::lifecycle::{ExitInfo, Lifecycle, StartRefused};
use crate::mounts;
use crate::pod::{Pod, PodEvent, PodStart, PodStarter};
use crate::record::{self, BundleRecord};
use crate::runtime_options;
use crate::sizing;
use crate::spec::{self, Namespaces};
use crate::stdio::{self, Copies, StdioPaths};
use crate::timings::Timings;
use crate::{mount_points, resolve};

type TtrpcResult<T> = ttrpc::Result<T>;

/// How long delete waits for a process's output to drain.
const STDIO_DRAIN: Duration = Duration::from_secs(10);

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn not_found(msg: impl Into<String>) -> ttrpc::Error {
    status(Code::NOT_FOUND, msg)
}

fn precondition(msg: impl Into<String>) -> ttrpc::Error {
    status(Code::FAILED_PRECONDITION, msg)
}

fn invalid(msg: impl Into<String>) -> ttrpc::Error {
    status(Code::INVALID_ARGUMENT, msg)
}

/// The message of a status error, for the log.
fn message(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => format!("{:?}: {}", s.code(), s.message),
        other => other.to_string(),
    }
}

/// A failed agent call as containerd should see it.
fn agent_err(e: CallError) -> ttrpc::Error {
    match &e {
        CallError::Guest { kind, message } => {
            let code = match kind {
                ErrorKind::NotFound => Code::NOT_FOUND,
                ErrorKind::AlreadyExists => Code::ALREADY_EXISTS,
                ErrorKind::InvalidArgument => Code::INVALID_ARGUMENT,
                ErrorKind::FailedPrecondition => Code::FAILED_PRECONDITION,
                ErrorKind::Failed => Code::UNKNOWN,
            };
            status(code, message.clone())
        }
        _ => status(Code::UNAVAILABLE, format!("jevm: {e}")),
    }
}

/// An exit's time as containerd's events carry it.
fn timestamp(e: &ExitInfo) -> Timestamp {
    events::timestamp_from_ns(e.at_ns)
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

struct Proc {
    pid: u32,
    life: Lifecycle,
    exit_tx: watch::Sender<Option<ExitInfo>>,
    stdio: StdioPaths,
    copies: Option<Copies>,
}

impl Proc {
    fn new(pid: u32, stdio: StdioPaths, copies: Copies) -> Proc {
        Proc {
            pid,
            life: Lifecycle::created(),
            exit_tx: watch::channel(None).0,
            stdio,
            copies: Some(copies),
        }
    }

    /// An exec'd process the guest refused to create: runc creates an
    /// exec'd process only at start, so containerd sees TaskExecAdded and
    /// then the error from `start`; jevm's agent finds the error earlier
    /// and it is kept to be answered at start, in the same order.
    fn failed(stdio: StdioPaths, why: String) -> Proc {
        Proc {
            pid: 0,
            life: Lifecycle::create_failed(why),
            exit_tx: watch::channel(None).0,
            stdio,
            copies: None,
        }
    }

    fn status(&self, paused: bool) -> Status {
        self.life.status(paused)
    }

    fn exit(&self) -> Option<ExitInfo> {
        self.life.exit()
    }

    /// Records an exit and does what the lifecycle asks; returns whether
    /// TaskExit is due now.
    fn on_exit(&mut self, e: ExitInfo) -> bool {
        let on = self.life.on_exit(e);
        if on.recorded {
            if let Some(c) = &mut self.copies {
                c.close_stdin();
            }
        }
        if let Some(e) = on.notify {
            self.exit_tx.send_replace(Some(e));
        }
        on.publish
    }
}

struct Container {
    bundle: String,
    pod: Arc<Pod>,
    paused: bool,
    init: Proc,
    execs: HashMap<String, Proc>,
    timings: Timings,
}

impl Container {
    fn proc(&self, exec_id: &str) -> Option<&Proc> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }

    fn proc_mut(&mut self, exec_id: &str) -> Option<&mut Proc> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }
}

#[derive(Default)]
struct State {
    containers: HashMap<String, Container>,
    pods: HashMap<String, Arc<Pod>>,
}

struct Inner {
    exit: Arc<ExitSignal>,
    events: mpsc::UnboundedSender<Outgoing>,
    /// Events sent but not yet published: shutdown waits for them, or the
    /// last ones (TaskDelete) would die with the process.
    unpublished: Arc<AtomicUsize>,
    pod_events: mpsc::UnboundedSender<PodEvent>,
    state: Mutex<State>,
    create_lock: tokio::sync::Mutex<()>,
    /// From the `start` subcommand to this service existing.
    shim_start: Option<Duration>,
    /// Where pods come from (VMs; a fake guest in tests).
    pods: Arc<dyn PodStarter>,
}

#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

impl TaskService {
    /// A service publishing through `events`; agent events are handled on
    /// a task of its own.
    pub fn new(
        exit: Arc<ExitSignal>,
        events: mpsc::UnboundedSender<Outgoing>,
        unpublished: Arc<AtomicUsize>,
        shim_start: Option<Duration>,
        pods: Arc<dyn PodStarter>,
    ) -> TaskService {
        let (pod_tx, mut pod_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            exit,
            events,
            unpublished,
            pod_events: pod_tx,
            state: Mutex::new(State::default()),
            create_lock: tokio::sync::Mutex::new(()),
            shim_start,
            pods,
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Some(ev) = pod_rx.recv().await {
                let Some(inner) = weak.upgrade() else { break };
                TaskService { inner }.on_pod_event(ev);
            }
        });
        TaskService { inner }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, o: Outgoing) {
        self.inner.unpublished.fetch_add(1, Ordering::SeqCst);
        if self.inner.events.send(o).is_err() {
            self.inner.unpublished.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Waits (bounded) until every event sent so far reached containerd.
    async fn flush_events(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.inner.unpublished.load(Ordering::SeqCst) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn on_pod_event(&self, ev: PodEvent) {
        let mut st = self.state();
        let mut out = Vec::new();
        match ev {
            PodEvent::Agent {
                event:
                    Event::Exited {
                        container_id,
                        exec_id,
                        pid,
                        exit_status,
                        exited_at_ns,
                    },
                ..
            } => {
                let exec = exec_id.as_deref().unwrap_or("");
                let Some(p) = st
                    .containers
                    .get_mut(&container_id)
                    .and_then(|c| c.proc_mut(exec))
                else {
                    log::debug!("exit of unknown process {container_id}/{exec} ignored");
                    return;
                };
                // The host's clock, not the guest's: a clone's clock is only
                // as good as its last sync, and containerd compares this time
                // with times it took itself (the task's start).
                let e = ExitInfo {
                    status: exit_status,
                    at_ns: now_ns(),
                };
                log::info!(
                    "container {container_id} {exec}: pid {pid} exited with {exit_status} \
                     (guest clock {exited_at_ns})"
                );
                if p.on_exit(e) {
                    out.push(outgoing(events::task_exit(
                        &container_id,
                        exec_id.as_deref(),
                        p.pid,
                        e.status,
                        timestamp(&e),
                    )));
                }
            }
            PodEvent::Agent {
                event: Event::Oom { container_id },
                ..
            } => {
                if st.containers.contains_key(&container_id) {
                    log::info!("container {container_id}: OOM kill");
                    out.push(outgoing(events::task_oom(&container_id)));
                }
            }
            PodEvent::Lost { pod, cause } => {
                log::info!("pod {pod}: its processes exit with {LOST_EXIT_STATUS}: {cause}");
                if let Some(p) = st.pods.get(&pod) {
                    p.mark_lost();
                }
                let e = ExitInfo {
                    status: LOST_EXIT_STATUS,
                    at_ns: now_ns(),
                };
                for (cid, c) in st.containers.iter_mut().filter(|(_, c)| c.pod.id == pod) {
                    for (exec, p) in c.execs.iter_mut() {
                        if p.on_exit(e) {
                            out.push(outgoing(events::task_exit(
                                cid,
                                Some(exec),
                                p.pid,
                                e.status,
                                timestamp(&e),
                            )));
                        }
                    }
                    if c.init.on_exit(e) {
                        out.push(outgoing(events::task_exit(
                            cid,
                            None,
                            c.init.pid,
                            e.status,
                            timestamp(&e),
                        )));
                    }
                }
            }
        }
        drop(st);
        for o in out {
            self.publish(o);
        }
    }

    /// The guest refused a start: an exit seen meanwhile goes to the
    /// waiters now.
    fn start_failed(&self, cid: &str, exec: &str) {
        let mut st = self.state();
        if let Some(p) = st.containers.get_mut(cid).and_then(|c| c.proc_mut(exec)) {
            if let Some(e) = p.life.start_failed() {
                p.exit_tx.send_replace(Some(e));
            }
        }
    }

    fn pod_of(&self, cid: &str) -> TtrpcResult<Arc<Pod>> {
        self.state()
            .containers
            .get(cid)
            .map(|c| Arc::clone(&c.pod))
            .ok_or_else(|| not_found(format!("container {cid:?} not found")))
    }

    /// Checks the process exists and returns its pod.
    fn pod_of_proc(&self, cid: &str, exec_id: &str) -> TtrpcResult<Arc<Pod>> {
        let st = self.state();
        let c = st
            .containers
            .get(cid)
            .ok_or_else(|| not_found(format!("container {cid:?} not found")))?;
        c.proc(exec_id)
            .ok_or_else(|| not_found(format!("container {cid:?}: exec {exec_id:?} not found")))?;
        Ok(Arc::clone(&c.pod))
    }

    /// Stops the pod's VM and removes its directory when no container of
    /// it is left.
    async fn release_pod_if_empty(&self, pod: &Arc<Pod>) {
        let empty = {
            let mut st = self.state();
            let empty = !st.containers.values().any(|c| Arc::ptr_eq(&c.pod, pod));
            if empty {
                st.pods.remove(&pod.id);
            }
            empty
        };
        if empty {
            destroy_pod(pod).await;
        }
    }
}

/// Stops the VM, then unmounts and removes the pod directory.
async fn destroy_pod(pod: &Arc<Pod>) {
    pod.stop().await;
    let dir = pod.layout.dir().to_owned();
    let _ = tokio::task::spawn_blocking(move || mounts::teardown(&dir)).await;
    log::info!("pod {}: removed", pod.id);
}

/// What create needs from the request, checked.
struct CreateInput {
    cid: String,
    bundle: PathBuf,
    spec: Value,
    stdio: StdioPaths,
}

fn read_spec(bundle: &Path) -> Result<Value, String> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn host_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "jevm".into())
}

/// Everything one create did on the host, undone on failure.
struct CreateUndo {
    new_pod: Option<Arc<Pod>>,
    new_pod_dir: Option<PathBuf>,
    container_dir: Option<PathBuf>,
    /// The pod whose share was granted this container's device nodes.
    device_grant: Option<(Arc<Pod>, String)>,
    bundle: PathBuf,
}

impl CreateUndo {
    async fn run(self, svc: &TaskService) {
        if let Some((pod, cid)) = &self.device_grant {
            pod.share_device_nodes.revoke(cid);
        }
        if let Some(pod) = &self.new_pod {
            svc.state().pods.remove(&pod.id);
            pod.stop().await;
        }
        let dirs: Vec<PathBuf> = match self.new_pod_dir {
            Some(d) => vec![d],
            None => self.container_dir.into_iter().collect(),
        };
        let _ = tokio::task::spawn_blocking(move || {
            for d in dirs {
                mounts::teardown(&d);
            }
        })
        .await;
        record::remove(&self.bundle);
    }
}

impl TaskService {
    async fn do_create(
        &self,
        req: &CreateTaskRequest,
        undo: &mut CreateUndo,
        input: CreateInput,
    ) -> Result<u32, ttrpc::Error> {
        let CreateInput {
            cid,
            bundle,
            mut spec,
            stdio,
        } = input;
        let mut timings = Timings::default();
        let pod_id = spec::pod_id(&spec, &cid);
        check_id("pod", &pod_id).map_err(invalid)?;

        let existing = self.state().pods.get(&pod_id).cloned();
        let pod = match existing {
            Some(p) => p,
            None => {
                spec::refuse_node_namespaces(&spec, &cid).map_err(invalid)?;
                let opts = runtime_options::decode(req.options.as_ref()).map_err(invalid)?;
                let env = std::env::var(config::ENV_PATH).ok();
                let source = config::choose_source(
                    Some(opts.config_path.as_str()),
                    !opts.config_body.is_empty(),
                    env.as_deref(),
                );
                let cfg = config::load(&source, Some(&opts.config_body))
                    .map_err(|e| invalid(e.to_string()))?;
                if let Some(l) = cfg.log_level.as_deref().and_then(|l| l.parse().ok()) {
                    log::set_max_level(l);
                }
                cfg.check_guest_files(&source)
                    .map_err(|e| precondition(e.to_string()))?;
                // Before the first VM thread: its threads enter this jail.
                let mode = cfg.jail_mode().map_err(invalid)?;
                jevm_runtime::jail::init(mode)
                    .map_err(|e| precondition(format!("pod {pod_id:?}: {e}")))?;
                let size = sizing::vm_size(&cfg, &spec, &pod_id).map_err(invalid)?;
                sizing::check_fits(size, &spec, &cid).map_err(invalid)?;
                // The clone's threads enter their jail while the pod
                // directory, the mounts and the template are made ready
                // (and its KVM VM is made, unless the shim's start made
                // it already).
                if let Err(e) = jevm_runtime::clone::prepare_threads(size.vcpus as usize) {
                    log::warn!("pod {pod_id}: starting the VM's threads ahead: {e}");
                }
                jevm_runtime::clone::prepare_vm();
                let layout = PodLayout::new(&cfg.run_dir, &pod_id);
                if layout.dir().exists() {
                    log::warn!(
                        "pod {pod_id}: removing leftovers in {}",
                        layout.dir().display()
                    );
                    let d = layout.dir().to_owned();
                    let _ = tokio::task::spawn_blocking(move || mounts::teardown(&d)).await;
                }
                // Undone from here on: a failure may leave a mount.
                undo.new_pod_dir = Some(layout.dir().to_owned());
                mounts::make_pod_dir(layout.dir(), &layout.shared())
                    .map_err(|e| status(Code::UNKNOWN, format!("pod {pod_id:?}: {e}")))?;
                let rec = BundleRecord {
                    container_id: cid.clone(),
                    pod_id: pod_id.clone(),
                    pod_dir: layout.dir().to_owned(),
                    vm_dir: None,
                    pid: 0,
                };
                record::write(&bundle, &rec).map_err(|e| status(Code::UNKNOWN, e))?;
                let hostname = spec
                    .get("hostname")
                    .and_then(Value::as_str)
                    .filter(|h| !h.is_empty())
                    .map_or_else(host_hostname, str::to_string);
                let (pod, t) = self
                    .inner
                    .pods
                    .start(PodStart {
                        cfg: &cfg,
                        id: &pod_id,
                        layout,
                        hostname,
                        size,
                        netns: spec::network_namespace_path(&spec),
                        events: self.inner.pod_events.clone(),
                    })
                    .await
                    .map_err(|e| status(Code::UNKNOWN, e))?;
                timings.shim_start = self.inner.shim_start;
                timings.template_lookup = Some(t.template_lookup);
                timings.network = Some(t.network);
                timings.clone = Some(t.clone);
                undo.new_pod = Some(Arc::clone(&pod));
                self.state().pods.insert(pod_id.clone(), Arc::clone(&pod));
                pod
            }
        };

        if undo.new_pod.is_none() {
            sizing::check_fits(pod.size, &spec, &cid).map_err(invalid)?;
        }

        // Namespaces: the pod's first container gets new ones; CRI
        // containers join the sandbox's.
        let sandbox_pid = pod
            .sandbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|s| s.1);
        let ns = match sandbox_pid {
            Some(pid) if undo.new_pod.is_none() && !spec::starts_pod(&spec, &cid) => {
                Namespaces::JoinSandbox { pid }
            }
            _ => Namespaces::Own,
        };
        if ns == Namespaces::Own && pod.has_network() {
            spec::use_vm_network(&mut spec);
        }
        let host_root = spec
            .get("root")
            .and_then(|r| r.get("path"))
            .and_then(Value::as_str)
            .map(|p| bundle.join(p));
        let binds = spec::rewrite(&mut spec, &cid, &bundle, ns)
            .map_err(|e| invalid(format!("container {cid:?}: {e}")))?;
        let device_rules =
            spec::device_rules(&spec).map_err(|e| invalid(format!("container {cid:?}: {e}")))?;
        pod.share_device_nodes.grant(&cid, device_rules);
        undo.device_grant = Some((Arc::clone(&pod), cid.clone()));

        // The container's part of the share.
        let asked_before = pod.share_requests();
        let t = Instant::now();
        let layout = pod.layout.clone();
        undo.container_dir = Some(layout.container(&cid));
        let rec = BundleRecord {
            container_id: cid.clone(),
            pod_id: pod_id.clone(),
            pod_dir: layout.dir().to_owned(),
            vm_dir: Some(pod.vm_dir.clone()),
            pid: 0,
        };
        record::write(&bundle, &rec).map_err(|e| status(Code::UNKNOWN, e))?;
        let rootfs = req.rootfs.clone();
        let c = cid.clone();
        let spec = tokio::task::spawn_blocking(move || -> Result<Value, String> {
            let target = layout.rootfs(&c);
            std::fs::create_dir_all(&target)
                .and_then(|()| std::fs::create_dir_all(layout.mounts(&c)))
                .map_err(|e| format!("container {c:?}: {}: {e}", target.display()))?;
            if rootfs.is_empty() {
                let src = host_root
                    .ok_or_else(|| format!("container {c:?}: no rootfs mounts and no root.path"))?;
                mounts::bind_rootfs_dir(&c, &src, &target)?;
            } else {
                mounts::mount_rootfs(&c, &rootfs, &target)?;
            }
            let mut source_dirs = Vec::with_capacity(binds.len());
            for b in &binds {
                let dir = mounts::bind(&c, b, &layout.mount(&c, b.index))?;
                source_dirs.push((layout::guest_mount(&c, b.index), dir));
            }
            // Everything the guest reaches: no set-uid file or device node
            // it makes may work on the host.
            mounts::seal(&layout.container(&c)).map_err(|e| format!("container {c:?}: {e}"))?;
            mount_points::make_ahead(&spec, &target, |source| {
                source_dirs
                    .iter()
                    .find_map(|(s, dir)| (s == source).then_some(*dir))
            });
            resolve::resolve_ahead(&mut spec, &target);
            Ok(spec)
        })
        .await
        .map_err(|e| {
            status(
                Code::UNKNOWN,
                format!("container {cid:?}: mount thread: {e}"),
            )
        })?
        .map_err(|e| status(Code::UNKNOWN, e))?;
        timings.share = Some(t.elapsed());

        // The container's stdio streams, connected while the guest
        // creates it.
        pod.agent.open_ahead(stdio.streams());
        // A new pod's clone has been applying its identity, and its event
        // stream subscribing, since it was started: the create goes
        // behind the identity, and is answered once both are done.
        let t = Instant::now();
        let (answer, agent_ready) = pod
            .call_when_ready(
                "CreateContainer",
                Request::CreateContainer(CreateContainer {
                    container_id: cid.clone(),
                    spec,
                    stdio: stdio.protocol(),
                }),
            )
            .await
            .map_err(|e| status(Code::UNKNOWN, e))?;
        let (pid, guest_times) = agent::created("CreateContainer", answer).map_err(agent_err)?;
        timings.agent_ready = agent_ready;
        timings.agent_create = Some(t.elapsed().saturating_sub(agent_ready.unwrap_or_default()));
        timings.guest_create = guest_times;
        timings.share_requests = pod
            .share_requests()
            .zip(asked_before)
            .map(|(now, before)| now.since(&before));
        let t = Instant::now();
        let copies = match stdio::attach(&*pod.agent, &cid, None, &stdio).await {
            Ok(c) => c,
            Err(e) => {
                let _ = pod
                    .agent
                    .done(
                        "DeleteContainer",
                        Request::DeleteContainer {
                            container_id: cid.clone(),
                        },
                    )
                    .await;
                return Err(status(Code::UNKNOWN, e));
            }
        };
        timings.stdio = Some(t.elapsed());
        let _ = record::write(&bundle, &BundleRecord { pid, ..rec });
        if undo.new_pod.is_some() {
            *pod.sandbox.lock().unwrap_or_else(|p| p.into_inner()) = Some((cid.clone(), pid));
        }
        self.state().containers.insert(
            cid.clone(),
            Container {
                bundle: bundle.display().to_string(),
                pod,
                paused: false,
                init: Proc::new(pid, stdio, copies),
                execs: HashMap::new(),
                timings,
            },
        );
        Ok(pid)
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let t0 = Instant::now();
        log::info!("create {} (bundle {})", req.id, req.bundle);
        let _serial = self.inner.create_lock.lock().await;
        let cid = req.id.clone();
        check_id("container", &cid).map_err(invalid)?;
        if self.state().containers.contains_key(&cid) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {cid:?} already exists"),
            ));
        }
        if !req.checkpoint.is_empty() {
            return Err(status(
                Code::UNIMPLEMENTED,
                "jevm: checkpoint/restore is not supported",
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = read_spec(&bundle).map_err(|e| invalid(format!("container {cid:?}: {e}")))?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let mut undo = CreateUndo {
            new_pod: None,
            new_pod_dir: None,
            container_dir: None,
            device_grant: None,
            bundle: bundle.clone(),
        };
        let input = CreateInput {
            cid: cid.clone(),
            bundle,
            spec,
            stdio,
        };
        let pid = match self.do_create(&req, &mut undo, input).await {
            Ok(pid) => pid,
            Err(e) => {
                log::error!("create {cid}: {}", message(&e));
                undo.run(self).await;
                return Err(e);
            }
        };
        self.publish(outgoing(TaskCreate {
            container_id: cid.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: Some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            })
            .into(),
            checkpoint: req.checkpoint.clone(),
            pid,
            ..Default::default()
        }));
        log::info!("create {cid}: pid {pid}");
        if let Some(c) = self.state().containers.get_mut(&cid) {
            c.timings.create_wall = Some(t0.elapsed());
        }
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let (cid, exec) = (req.id.as_str(), req.exec_id.as_str());
        log::info!("start {cid} {exec}");
        let pod = self.pod_of_proc(cid, exec)?;
        {
            let mut st = self.state();
            let p = st
                .containers
                .get_mut(cid)
                .and_then(|c| c.proc_mut(exec))
                .ok_or_else(|| not_found(format!("container {cid:?} {exec}: not found")))?;
            match p.life.begin_start() {
                Ok(()) => {}
                Err(StartRefused::Exited) => {
                    return Err(precondition(format!(
                        "container {cid:?} {exec}: process already exited"
                    )))
                }
                Err(StartRefused::AlreadyStarted) => {
                    return Err(precondition(format!(
                        "container {cid:?} {exec}: already started"
                    )))
                }
                Err(StartRefused::CreateFailed(e)) => return Err(status(Code::UNKNOWN, e)),
            }
        }
        let t = Instant::now();
        let r = if exec.is_empty() {
            Request::StartContainer {
                container_id: cid.to_string(),
            }
        } else {
            Request::StartExec {
                container_id: cid.to_string(),
                exec_id: exec.to_string(),
            }
        };
        let pid = match pod.agent.pid("Start", r).await {
            Ok(pid) => pid,
            Err(e) => {
                self.start_failed(cid, exec);
                return Err(agent_err(e));
            }
        };
        let running = t.elapsed();
        // An exec is transient (a probe, a shell): a container's start is
        // what leaves a pod in a new steady state.
        if exec.is_empty() {
            pod.settle_memory_later();
        }

        let mut held_exit = None;
        let out = vec![if exec.is_empty() {
            outgoing(TaskStart {
                container_id: cid.to_string(),
                pid,
                ..Default::default()
            })
        } else {
            outgoing(TaskExecStarted {
                container_id: cid.to_string(),
                exec_id: exec.to_string(),
                pid,
                ..Default::default()
            })
        }];
        {
            let mut st = self.state();
            let Some(c) = st.containers.get_mut(cid) else {
                return Err(not_found(format!(
                    "container {cid:?} was deleted while starting"
                )));
            };
            if exec.is_empty() {
                c.timings.process_running = Some(running);
                log::info!("{}", c.timings.line(cid));
            }
            if let Some(p) = c.proc_mut(exec) {
                // TaskStart is stamped when it is queued, now: an exit held
                // during the start is dated no earlier.
                held_exit = p.life.start_done(now_ns()).exit.map(|e| (p.pid, e));
                if let Some((_, e)) = held_exit {
                    p.exit_tx.send_replace(Some(e));
                }
            }
        }
        for o in out {
            self.publish(o);
        }
        if let Some((pid, e)) = held_exit {
            // It exited before its start was answered: a client must see
            // the start first.
            self.publish(outgoing(events::task_exit(
                cid,
                Some(exec).filter(|e| !e.is_empty()),
                pid,
                e.status,
                timestamp(&e),
            )));
        }
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let (cid, exec) = (req.id.as_str(), req.exec_id.as_str());
        log::info!("delete {cid} {exec}");
        let pod = self.pod_of_proc(cid, exec)?;
        // Take the process's stdio copies out; check it may be deleted.
        let (pid, exit, copies, exec_copies, never_started) = {
            let mut st = self.state();
            let c = st
                .containers
                .get_mut(cid)
                .ok_or_else(|| not_found(format!("container {cid:?} not found")))?;
            let paused = c.paused;
            let p = c
                .proc_mut(exec)
                .ok_or_else(|| not_found(format!("container {cid:?}: exec {exec:?} not found")))?;
            if matches!(p.status(paused), Status::RUNNING | Status::PAUSED) {
                return Err(precondition(format!(
                    "container {cid:?} {exec}: cannot delete a running process"
                )));
            }
            // An exec whose start never came: what the guest reports of it
            // is its stage being torn down (with the container, say), not a
            // process that ran.
            let never_started = !p.life.started();
            let (pid, exit, copies) = (p.pid, p.exit(), p.copies.take());
            let exec_copies: Vec<Copies> = if exec.is_empty() {
                c.execs
                    .values_mut()
                    .filter_map(|p| p.copies.take())
                    .collect()
            } else {
                Vec::new()
            };
            (pid, exit, copies, exec_copies, never_started)
        };
        if let Some(c) = copies {
            // A lost pod's streams may never end: take what has arrived.
            let drain = if pod.closing() {
                Duration::from_secs(1)
            } else {
                STDIO_DRAIN
            };
            c.finish(drain).await;
        }
        for c in exec_copies {
            c.finish(Duration::from_secs(1)).await;
        }
        let exit = match exit {
            // runc's shim: an exec'd process that was created and never
            // started ends with status 0 when it is deleted.
            _ if never_started && !exec.is_empty() => ExitInfo {
                status: 0,
                at_ns: exit.map_or_else(now_ns, |e| e.at_ns),
            },
            Some(e) => e,
            None => ExitInfo {
                status: LOST_EXIT_STATUS,
                at_ns: now_ns(),
            },
        };
        let vm_alive = !pod.closing();
        if exec.is_empty() {
            if vm_alive {
                if let Err(e) = pod
                    .agent
                    .done(
                        "DeleteContainer",
                        Request::DeleteContainer {
                            container_id: cid.to_string(),
                        },
                    )
                    .await
                {
                    log::warn!("delete {cid}: in the guest: {e}");
                }
            }
            let dir = pod.layout.container(cid);
            let _ = tokio::task::spawn_blocking(move || mounts::teardown(&dir)).await;
            pod.share_device_nodes.revoke(cid);
            let bundle = self.state().containers.remove(cid).map(|c| c.bundle);
            self.release_pod_if_empty(&pod).await;
            // Only now: should this process die while it ends the pod (a
            // VMM thread stopped by its jail, a SIGKILL), containerd's
            // `delete` of the bundle finds the record and ends the pod.
            if let Some(b) = bundle {
                record::remove(Path::new(&b));
            }
            self.publish(outgoing(TaskDelete {
                container_id: cid.to_string(),
                pid,
                exit_status: exit.status,
                exited_at: Some(timestamp(&exit)).into(),
                ..Default::default()
            }));
        } else {
            if vm_alive {
                if let Err(e) = pod
                    .agent
                    .done(
                        "DeleteExec",
                        Request::DeleteExec {
                            container_id: cid.to_string(),
                            exec_id: exec.to_string(),
                        },
                    )
                    .await
                {
                    log::warn!("delete {cid} {exec}: in the guest: {e}");
                }
            }
            if let Some(c) = self.state().containers.get_mut(cid) {
                c.execs.remove(exec);
            }
        }
        Ok(DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: Some(timestamp(&exit)).into(),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        let (cid, exec) = (req.id.as_str(), req.exec_id.as_str());
        log::info!("kill {cid} {exec} signal {} all {}", req.signal, req.all);
        let pod = self.pod_of_proc(cid, exec)?;
        let exited = self
            .state()
            .containers
            .get(cid)
            .and_then(|c| c.proc(exec))
            .is_some_and(|p| p.exit().is_some());
        if exited {
            return Err(not_found(format!(
                "container {cid:?} {exec}: process already finished"
            )));
        }
        let signal = i32::try_from(req.signal)
            .map_err(|_| invalid(format!("signal {} out of range", req.signal)))?;
        pod.agent
            .done(
                "Signal",
                Request::Signal {
                    container_id: cid.to_string(),
                    exec_id: Some(exec.to_string()).filter(|e| !e.is_empty()),
                    signal,
                    all: req.all,
                },
            )
            .await
            .map_err(agent_err)?;
        Ok(Empty::default())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let (cid, exec) = (req.id.as_str(), req.exec_id.as_str());
        log::info!("exec {cid} {exec}");
        check_id("exec", exec).map_err(invalid)?;
        let pod = {
            let st = self.state();
            let c = st
                .containers
                .get(cid)
                .ok_or_else(|| not_found(format!("container {cid:?} not found")))?;
            if c.execs.contains_key(exec) {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("container {cid:?}: exec {exec:?} already exists"),
                ));
            }
            if c.init.exit().is_some() {
                return Err(precondition(format!("container {cid:?} is stopped")));
            }
            Arc::clone(&c.pod)
        };
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.as_slice())
            .unwrap_or_default();
        let process: Value = serde_json::from_slice(spec).map_err(|e| {
            invalid(format!(
                "container {cid:?}: exec {exec:?}: process spec: {e}"
            ))
        })?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        // As for a container: the streams connect while the guest creates
        // the process, and a resize right after the start finds a
        // connection open instead of waiting for a new one.
        pod.agent.open_ahead(stdio.streams());
        let created = pod
            .agent
            .pid(
                "Exec",
                Request::Exec(ExecProcess {
                    container_id: cid.to_string(),
                    exec_id: exec.to_string(),
                    process,
                    stdio: stdio.protocol(),
                }),
            )
            .await;
        let pid = match created {
            Ok(pid) => pid,
            Err(CallError::Guest { message: why, .. }) => {
                let mut st = self.state();
                let Some(c) = st.containers.get_mut(cid) else {
                    return Err(status(Code::UNKNOWN, why));
                };
                c.execs.insert(exec.to_string(), Proc::failed(stdio, why));
                drop(st);
                self.publish(outgoing(TaskExecAdded {
                    container_id: cid.to_string(),
                    exec_id: exec.to_string(),
                    ..Default::default()
                }));
                return Ok(Empty::default());
            }
            Err(e) => return Err(agent_err(e)),
        };
        let copies = match stdio::attach(&*pod.agent, cid, Some(exec), &stdio).await {
            Ok(c) => c,
            Err(e) => {
                let _ = pod
                    .agent
                    .done(
                        "Signal",
                        Request::Signal {
                            container_id: cid.to_string(),
                            exec_id: Some(exec.to_string()),
                            signal: libc::SIGKILL,
                            all: false,
                        },
                    )
                    .await;
                let _ = pod
                    .agent
                    .done(
                        "DeleteExec",
                        Request::DeleteExec {
                            container_id: cid.to_string(),
                            exec_id: exec.to_string(),
                        },
                    )
                    .await;
                return Err(status(Code::UNKNOWN, e));
            }
        };
        {
            let mut st = self.state();
            let Some(c) = st.containers.get_mut(cid) else {
                return Err(not_found(format!(
                    "container {cid:?} was deleted during exec"
                )));
            };
            c.execs
                .insert(exec.to_string(), Proc::new(pid, stdio, copies));
        }
        self.publish(outgoing(TaskExecAdded {
            container_id: cid.to_string(),
            exec_id: exec.to_string(),
            ..Default::default()
        }));
        Ok(Empty::default())
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let (cid, exec) = (req.id.as_str(), req.exec_id.as_str());
        let st = self.state();
        let c = st
            .containers
            .get(cid)
            .ok_or_else(|| not_found(format!("container {cid:?} not found")))?;
        let p = c
            .proc(exec)
            .ok_or_else(|| not_found(format!("container {cid:?}: exec {exec:?} not found")))?;
        let mut r = StateResponse {
            id: if exec.is_empty() {
                cid.to_string()
            } else {
                exec.to_string()
            },
            bundle: c.bundle.clone(),
            pid: p.pid,
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exec_id: exec.to_string(),
            ..Default::default()
        };
        r.status = p.status(c.paused).into();
        if let Some(e) = p.exit() {
            r.exit_status = e.status;
            r.exited_at = Some(timestamp(&e)).into();
        }
        Ok(r)
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let pod = self.pod_of(&req.id)?;
        let r = pod
            .agent
            .call(
                "Pids",
                Request::Pids {
                    container_id: req.id.clone(),
                },
            )
            .await
            .map_err(agent_err)?;
        let Response::Pids(pids) = r else {
            return Err(status(
                Code::UNKNOWN,
                format!("agent answered Pids with {r:?}"),
            ));
        };
        Ok(PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        self.pause_resume(&req.id, true).await
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.pause_resume(&req.id, false).await
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let pod = self.pod_of_proc(&req.id, &req.exec_id)?;
        // The input order of a process with a terminal; None without one.
        let order = self
            .state()
            .containers
            .get(&req.id)
            .and_then(|c| c.proc(&req.exec_id))
            .filter(|p| p.stdio.terminal)
            .map(|p| {
                p.copies
                    .as_ref()
                    .map(|c| c.input_order())
                    .unwrap_or_default()
            });
        let Some(order) = order else {
            // runc's shim answers success and does nothing: clients resize
            // every process of a session without asking which has a TTY.
            return Ok(Empty::default());
        };
        let resize = pod.agent.done(
            "ResizePty",
            Request::ResizePty {
                container_id: req.id.clone(),
                exec_id: Some(req.exec_id.clone()).filter(|e| !e.is_empty()),
                width: req.width,
                height: req.height,
            },
        );
        order.resize(resize).await.map_err(agent_err)?;
        Ok(Empty::default())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let (cid, exec) = (req.id.as_str(), req.exec_id.as_str());
        let mut st = self.state();
        let p = st
            .containers
            .get_mut(cid)
            .ok_or_else(|| not_found(format!("container {cid:?} not found")))?
            .proc_mut(exec)
            .ok_or_else(|| not_found(format!("container {cid:?}: exec {exec:?} not found")))?;
        if req.stdin {
            if let Some(c) = &mut p.copies {
                c.close_stdin();
            }
        }
        Ok(Empty::default())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let pod = self.pod_of(&req.id)?;
        let data = req
            .resources
            .as_ref()
            .map(|a| a.value.as_slice())
            .unwrap_or_default();
        let resources: Value = serde_json::from_slice(data)
            .map_err(|e| invalid(format!("container {:?}: resources: {e}", req.id)))?;
        pod.agent
            .done(
                "Update",
                Request::Update {
                    container_id: req.id.clone(),
                    resources,
                },
            )
            .await
            .map_err(agent_err)?;
        Ok(Empty::default())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let (cid, exec) = (req.id.as_str(), req.exec_id.as_str());
        let mut rx = {
            let st = self.state();
            let c = st
                .containers
                .get(cid)
                .ok_or_else(|| not_found(format!("container {cid:?} not found")))?;
            let p = c
                .proc(exec)
                .ok_or_else(|| not_found(format!("container {cid:?}: exec {exec:?} not found")))?;
            p.exit_tx.subscribe()
        };
        let e = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.unwrap_or(ExitInfo {
                status: LOST_EXIT_STATUS,
                at_ns: now_ns(),
            }),
            Err(_) => {
                return Err(not_found(format!(
                    "container {cid:?} {exec}: deleted before it exited"
                )))
            }
        };
        Ok(WaitResponse {
            exit_status: e.status,
            exited_at: Some(timestamp(&e)).into(),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let pod = self.pod_of(&req.id)?;
        let r = pod
            .agent
            .call(
                "Stats",
                Request::Stats {
                    container_id: req.id.clone(),
                },
            )
            .await
            .map_err(agent_err)?;
        let Response::Stats(s) = r else {
            return Err(status(
                Code::UNKNOWN,
                format!("agent answered Stats with {r:?}"),
            ));
        };
        let any = events::to_any(&events::metrics(&s))
            .map_err(|e| status(Code::INTERNAL, format!("encoding metrics: {e}")))?;
        Ok(StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let task_pid = self
            .state()
            .containers
            .get(&req.id)
            .map_or(0, |c| c.init.pid);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        let pods: Vec<Arc<Pod>> = {
            let mut st = self.state();
            if !st.containers.is_empty() {
                log::debug!("shutdown: {} tasks left, staying", st.containers.len());
                return Ok(Empty::default());
            }
            st.pods.drain().map(|(_, p)| p).collect()
        };
        for p in pods {
            destroy_pod(&p).await;
        }
        self.flush_events().await;
        log::info!("shutdown: no task left, exiting");
        self.inner.exit.signal();
        Ok(Empty::default())
    }
}

impl TaskService {
    async fn pause_resume(&self, cid: &str, pause: bool) -> TtrpcResult<Empty> {
        let pod = {
            let st = self.state();
            let c = st
                .containers
                .get(cid)
                .ok_or_else(|| not_found(format!("container {cid:?} not found")))?;
            match c.init.status(c.paused) {
                Status::RUNNING if pause => {}
                Status::PAUSED if !pause => {}
                s => {
                    return Err(precondition(format!(
                        "container {cid:?} is {s:?}, cannot {}",
                        if pause { "pause" } else { "resume" }
                    )))
                }
            }
            Arc::clone(&c.pod)
        };
        let r = if pause {
            Request::Pause {
                container_id: cid.to_string(),
            }
        } else {
            Request::Resume {
                container_id: cid.to_string(),
            }
        };
        pod.agent
            .done(if pause { "Pause" } else { "Resume" }, r)
            .await
            .map_err(agent_err)?;
        if let Some(c) = self.state().containers.get_mut(cid) {
            c.paused = pause;
        }
        self.publish(if pause {
            outgoing(TaskPaused {
                container_id: cid.to_string(),
                ..Default::default()
            })
        } else {
            outgoing(TaskResumed {
                container_id: cid.to_string(),
                ..Default::default()
            })
        });
        Ok(Empty::default())
    }
}

#[cfg(test)]
mod service_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(e: ttrpc::Error) -> Code {
        match e {
            ttrpc::Error::RpcStatus(s) => s.code(),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn guest_error_kinds_map_to_ttrpc_codes_and_keep_the_message() {
        let cases = [
            (ErrorKind::NotFound, Code::NOT_FOUND),
            (ErrorKind::AlreadyExists, Code::ALREADY_EXISTS),
            (ErrorKind::InvalidArgument, Code::INVALID_ARGUMENT),
            (ErrorKind::FailedPrecondition, Code::FAILED_PRECONDITION),
            (ErrorKind::Failed, Code::UNKNOWN),
        ];
        for (kind, code) in cases {
            let e = agent_err(CallError::Guest {
                kind,
                message: "container \"c\" not found".into(),
            });
            assert_eq!(message(&e), format!("{code:?}: container \"c\" not found"));
            assert_eq!(code_of(e), code, "{kind:?}");
        }
    }

    #[test]
    fn a_lost_agent_is_unavailable() {
        let e = agent_err(CallError::Dead("Pids"));
        assert_eq!(code_of(e), Code::UNAVAILABLE);
    }
}
