//! Containers in the guest: the requests of `jevm_protocol` that create,
//! start, signal and watch containers and their processes.
//!
//! The agent keeps a table of containers (spec, cgroup, init process,
//! exec'd processes); processes are built by the `container-init` stage
//! (`stage`, `plan`), their exits come from the reaper (`exits`), their
//! stdio is pumped over vsock connections the host attaches (`stdio`), and
//! what happens to them is reported on the event stream (`events`).

pub mod cgroup;
pub mod cgroup_ops;
pub mod events;
pub mod exits;
pub mod init;
mod inotify;
pub mod plan;
pub mod process;
pub mod stage;
pub mod stdio;
pub mod zygote;

#[cfg(test)]
mod fake_stage;
#[cfg(test)]
pub(crate) mod tests;

use cgroup_ops::{Cgroups, ContainerCgroup, GuestCgroups};
use events::Events;
use jevm_protocol::{
    CreateContainer, CreateTimes, ErrorKind, Event, ExecProcess, Request, Response, StdioStream,
};
use oci_spec::runtime::{LinuxResources, Process as OciProcess, Spec};
use plan::{InitPlan, PlanKind};
use process::{Attachment, Process, Reports};
use stage::{Stage, StageCommand};
use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use zygote::{Next, Zygote};

/// Microseconds, for [`CreateTimes`].
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// How long `DeleteContainer` waits for a killed init to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// What a container request asks of the connection it came on.
pub enum Outcome {
    /// Answer and go on reading requests.
    Reply(Response),
    /// Answer, then hand the connection over for good (`Events`,
    /// `AttachStdio`).
    TakeOver(Response, Attachment),
}

/// True for the requests [`Service::handle`] serves.
pub fn is_container_request(request: &Request) -> bool {
    !matches!(
        request,
        Request::Version
            | Request::Ping { .. }
            | Request::Shutdown
            | Request::Diag(_)
            | Request::Identity(_)
            | Request::MountShare
    )
}

/// A table slot: reserved while a create or exec is under way, so a second
/// one with the same id fails instead of racing it.
enum Slot<T> {
    Reserved,
    Ready(Arc<T>),
}

struct Container {
    id: String,
    spec: Spec,
    cgroup: Mutex<Option<Box<dyn ContainerCgroup>>>,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Slot<Process>>>,
}

pub struct Service {
    stage: StageCommand,
    zygote: Option<Zygote>,
    cgroups: Box<dyn Cgroups>,
    events: Arc<Events>,
    reports: Arc<Reports>,
    containers: Mutex<HashMap<String, Slot<Container>>>,
}

/// A failed container request as the host is told: the message names the
/// object and the cause, the kind lets the shim answer containerd with the
/// matching status code without reading the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

/// An error with nothing more to say than its message failed the operation.
impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::new(ErrorKind::Failed, message)
    }
}

type Result<T> = std::result::Result<T, Failure>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn not_found(id: &str) -> Failure {
    Failure::new(ErrorKind::NotFound, format!("container {id:?} not found"))
}

fn precondition(message: String) -> Failure {
    Failure::new(ErrorKind::FailedPrecondition, message)
}

fn invalid(message: String) -> Failure {
    Failure::new(ErrorKind::InvalidArgument, message)
}

/// A container annotation: `exec` starts the container's stages (its init
/// and its execs) by `fork`+`execve` of the agent, as before the zygote,
/// rather than from the zygote. For comparing the two, and a way around a
/// zygote suspected of a fault.
pub const STAGE_ANNOTATION: &str = "io.jevm.container-init";

/// The annotation containerd's CRI plugin puts on every container of a
/// Kubernetes pod (`sandbox` or `container`).
const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

impl Service {
    /// The guest's service: the agent binary as stage (through its
    /// zygote), the guest's cgroups.
    pub fn guest() -> std::io::Result<Service> {
        let cgroups = GuestCgroups::prepare(Path::new(cgroup::HIERARCHY));
        Service::with_zygote(StageCommand::agent(), Box::new(cgroups))
    }

    /// [`Service::new`], with stages started by a zygote of `stage` (see
    /// `zygote`) when it starts, by `fork`+`execve` otherwise.
    pub fn with_zygote(stage: StageCommand, cgroups: Box<dyn Cgroups>) -> std::io::Result<Service> {
        let zygote = match Zygote::start(&stage) {
            Ok(z) => Some(z),
            Err(e) => {
                log::warn!("starting the container-init zygote: {e}; stages start with exec");
                None
            }
        };
        let mut service = Service::new(stage, cgroups)?;
        service.zygote = zygote;
        Ok(service)
    }

    pub fn new(stage: StageCommand, cgroups: Box<dyn Cgroups>) -> std::io::Result<Service> {
        Ok(Service {
            stage,
            zygote: None,
            cgroups,
            events: Events::start()?,
            reports: process::start_reports(),
            containers: Mutex::new(HashMap::new()),
        })
    }

    pub fn handle(&self, request: Request) -> Outcome {
        let result = match request {
            Request::Events => {
                let events = Arc::clone(&self.events);
                return Outcome::TakeOver(
                    Response::Done,
                    Box::new(move |conn: UnixStream| events.subscribe(conn)),
                );
            }
            Request::AttachStdio {
                container_id,
                exec_id,
                stream,
            } => match self.attach(&container_id, exec_id.as_deref(), stream) {
                Ok(attachment) => return Outcome::TakeOver(Response::Done, attachment),
                Err(message) => Err(message),
            },
            Request::CreateContainer(create) => self.create(create),
            Request::StartContainer { container_id } => self
                .container(&container_id)
                .and_then(|c| c.init.start())
                .map(|pid| Response::Started { pid }),
            Request::Exec(exec) => self.exec(exec),
            Request::StartExec {
                container_id,
                exec_id,
            } => self
                .process(&container_id, Some(&exec_id))
                .and_then(|p| p.start())
                .map(|pid| Response::Started { pid }),
            Request::Signal {
                container_id,
                exec_id,
                signal,
                all,
            } => self.signal(&container_id, exec_id.as_deref(), signal, all),
            Request::CloseStdin {
                container_id,
                exec_id,
            } => self.process(&container_id, exec_id.as_deref()).map(|p| {
                p.close_stdin();
                Response::Done
            }),
            Request::ResizePty {
                container_id,
                exec_id,
                width,
                height,
            } => self
                .process(&container_id, exec_id.as_deref())
                .and_then(|p| p.resize(width, height).map_err(Failure::from))
                .map(|()| Response::Done),
            Request::Pause { container_id } => self
                .with_cgroup(&container_id, "freezing", |cg| cg.freeze(true))
                .map(|()| Response::Done),
            Request::Resume { container_id } => self
                .with_cgroup(&container_id, "thawing", |cg| cg.freeze(false))
                .map(|()| Response::Done),
            Request::Pids { container_id } => self
                .with_cgroup(&container_id, "listing its processes", |cg| cg.pids())
                .map(Response::Pids),
            Request::Stats { container_id } => self
                .with_cgroup(&container_id, "reading its cgroup counters", |cg| {
                    cg.stats()
                })
                .map(Response::Stats),
            Request::Update {
                container_id,
                resources,
            } => self.update(&container_id, resources),
            Request::DeleteExec {
                container_id,
                exec_id,
            } => self.delete_exec(&container_id, &exec_id),
            Request::DeleteContainer { container_id } => self.delete(&container_id),
            other => Err(invalid(format!("{other:?} is not a container request"))),
        };
        Outcome::Reply(
            result.unwrap_or_else(|Failure { kind, message }| Response::Error { message, kind }),
        )
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        match lock(&self.containers).get(id) {
            Some(Slot::Ready(c)) => Ok(Arc::clone(c)),
            Some(Slot::Reserved) => Err(precondition(format!(
                "container {id:?} is still being created"
            ))),
            None => Err(not_found(id)),
        }
    }

    fn process(&self, id: &str, exec_id: Option<&str>) -> Result<Arc<Process>> {
        let container = self.container(id)?;
        let Some(exec_id) = exec_id else {
            return Ok(Arc::clone(&container.init));
        };
        let execs = lock(&container.execs);
        match execs.get(exec_id) {
            Some(Slot::Ready(p)) => Ok(Arc::clone(p)),
            Some(Slot::Reserved) => Err(precondition(format!(
                "exec {exec_id:?} in container {id:?} is still being created"
            ))),
            None => Err(Failure::new(
                ErrorKind::NotFound,
                format!("exec {exec_id:?} not found in container {id:?}"),
            )),
        }
    }

    fn with_cgroup<T>(
        &self,
        id: &str,
        doing: &str,
        op: impl FnOnce(&dyn ContainerCgroup) -> std::io::Result<T>,
    ) -> Result<T> {
        let container = self.container(id)?;
        let cgroup = lock(&container.cgroup);
        let cgroup = cgroup
            .as_deref()
            .ok_or_else(|| precondition(format!("container {id:?} is being deleted")))?;
        op(cgroup).map_err(|e| format!("container {id:?}: {doing}: {e}").into())
    }

    fn create(&self, create: CreateContainer) -> Result<Response> {
        let id = create.container_id.clone();
        check_id(&id)?;
        let spec: Spec = serde_json::from_value(create.spec)
            .map_err(|e| invalid(format!("container {id:?}: invalid OCI runtime spec: {e}")))?;
        {
            let mut containers = lock(&self.containers);
            if containers.contains_key(&id) {
                return Err(Failure::new(
                    ErrorKind::AlreadyExists,
                    format!("container {id:?} already exists"),
                ));
            }
            containers.insert(id.clone(), Slot::Reserved);
        }
        let t = Instant::now();
        match self.build(&id, spec, create.stdio) {
            Ok((container, mut times)) => {
                let pid = container.init.pid as u32;
                lock(&self.containers).insert(id, Slot::Ready(container));
                times.total_us = micros(t.elapsed());
                Ok(Response::Created {
                    pid,
                    times: Some(times),
                })
            }
            Err(message) => {
                lock(&self.containers).remove(&id);
                Err(message)
            }
        }
    }

    /// Cgroup, stdio, stage: a container ready to start, or nothing left.
    fn build(
        &self,
        id: &str,
        spec: Spec,
        stdio: jevm_protocol::Stdio,
    ) -> Result<(Arc<Container>, CreateTimes)> {
        let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
        let t = Instant::now();
        let cgroup = self
            .cgroups
            .create(id, resources)
            .map_err(|e| format!("container {id:?}: creating its cgroup: {e}"))?;
        let cgroup_us = micros(t.elapsed());
        let plan = InitPlan {
            container_id: id.into(),
            kind: PlanKind::Create {
                spec: Box::new(spec.clone()),
            },
            cgroup: cgroup.path().to_string_lossy().into_owned(),
            terminal: stdio.terminal,
        };
        let (init, mut times) = match self.spawn(id, None, &plan, stdio) {
            Ok(spawned) => spawned,
            Err(message) => {
                if let Err(e) = cgroup.remove() {
                    log::error!("container {id:?}: removing its cgroup after a failed create: {e}");
                }
                return Err(message);
            }
        };
        let events = Arc::clone(&self.events);
        let oom_id = id.to_string();
        if let Err(e) = cgroup.watch_oom(Box::new(move || {
            events.push(Event::Oom {
                container_id: oom_id.clone(),
            })
        })) {
            log::warn!("container {id:?}: watching for OOM kills: {e}; none will be reported");
        }
        times.cgroup_us = cgroup_us;
        let container = Arc::new(Container {
            id: id.into(),
            spec,
            cgroup: Mutex::new(Some(cgroup)),
            init,
            execs: Mutex::new(HashMap::new()),
        });
        Ok((container, times))
    }

    #[cfg(test)]
    fn zygote(&self) -> Option<&Zygote> {
        self.zygote.as_ref()
    }

    /// The zygote to start `plan`'s stage from, unless the container's
    /// [`STAGE_ANNOTATION`] asks for exec, and whether it should keep a
    /// spare afterwards: only in a Kubernetes pod, where the sandbox's
    /// containers follow it and exec probes come again and again. A plain
    /// containerd pod runs one container; its later execs pay for a fork
    /// rather than every such pod keeping a process it may never use.
    fn zygote_for(&self, plan: &InitPlan) -> Option<(&Zygote, Next)> {
        let spec = match &plan.kind {
            PlanKind::Create { spec } | PlanKind::Exec { spec, .. } => spec,
        };
        let annotations = spec.annotations().as_ref();
        let exec = annotations
            .and_then(|a| a.get(STAGE_ANNOTATION))
            .is_some_and(|v| v == "exec");
        let next = if annotations.is_some_and(|a| a.contains_key(CRI_CONTAINER_TYPE)) {
            Next::Spare
        } else {
            Next::Wait
        };
        match exec {
            true => None,
            false => self.zygote.as_ref().map(|z| (z, next)),
        }
    }

    /// Runs the stage up to `Ready` and starts watching the process's exit.
    fn spawn(
        &self,
        id: &str,
        exec_id: Option<&str>,
        plan: &InitPlan,
        wanted: jevm_protocol::Stdio,
    ) -> Result<(Arc<Process>, CreateTimes)> {
        let who = match exec_id {
            None => format!("container {id:?}"),
            Some(exec) => format!("exec {exec:?} in container {id:?}"),
        };
        let (child, ends) =
            stdio::make(&wanted).map_err(|e| format!("{who}: creating its stdio: {e}"))?;
        let t = Instant::now();
        let mut stage = Stage::spawn(&self.stage, self.zygote_for(plan), child.raw())
            .map_err(|e| format!("{who}: starting container-init: {e}"))?;
        let stage_us = micros(t.elapsed());
        // The process's ends are the stage's now; holding them would keep
        // its output from ever reaching EOF.
        drop(child);
        match stage.prepare(plan) {
            Ok(pid) => {
                let times = CreateTimes {
                    stage_us,
                    ..stage.times()
                };
                let process = Process::new(id, exec_id, pid, stage, wanted, ends);
                process.watch_exit(Arc::clone(&self.events), Arc::clone(&self.reports));
                Ok((process, times))
            }
            Err(message) => {
                stage.abort();
                Err(message.into())
            }
        }
    }

    fn exec(&self, exec: ExecProcess) -> Result<Response> {
        let ExecProcess {
            container_id: id,
            exec_id,
            process,
            stdio,
        } = exec;
        let container = self.container(&id)?;
        if exec_id.is_empty() {
            return Err(invalid(format!("container {id:?}: exec id is empty")));
        }
        if !container.init.started() || container.init.exit().is_some() {
            return Err(precondition(format!("container {id:?} is not running")));
        }
        let process: OciProcess = serde_json::from_value(process).map_err(|e| {
            invalid(format!(
                "exec {exec_id:?} in container {id:?}: invalid OCI process: {e}"
            ))
        })?;
        {
            let mut execs = lock(&container.execs);
            if execs.contains_key(&exec_id) {
                return Err(Failure::new(
                    ErrorKind::AlreadyExists,
                    format!("exec {exec_id:?} already exists in container {id:?}"),
                ));
            }
            execs.insert(exec_id.clone(), Slot::Reserved);
        }
        let cgroup_path = match &*lock(&container.cgroup) {
            Some(cg) => cg.path().to_string_lossy().into_owned(),
            None => String::new(),
        };
        let plan = InitPlan {
            container_id: id.clone(),
            kind: PlanKind::Exec {
                init_pid: container.init.pid as u32,
                spec: Box::new(container.spec.clone()),
                process: Box::new(process),
            },
            cgroup: cgroup_path,
            terminal: stdio.terminal,
        };
        let result = self.spawn(&id, Some(&exec_id), &plan, stdio);
        let mut execs = lock(&container.execs);
        match result {
            Ok((p, _)) => {
                let pid = p.pid as u32;
                execs.insert(exec_id, Slot::Ready(p));
                Ok(Response::Created { pid, times: None })
            }
            Err(message) => {
                execs.remove(&exec_id);
                Err(message)
            }
        }
    }

    fn signal(&self, id: &str, exec_id: Option<&str>, signal: i32, all: bool) -> Result<Response> {
        if !(0..=64).contains(&signal) {
            return Err(invalid(format!(
                "container {id:?}: invalid signal {signal}"
            )));
        }
        if all {
            self.with_cgroup(id, &format!("sending signal {signal} to all"), |cg| {
                cg.signal_all(signal)
            })?;
        } else {
            self.process(id, exec_id)?.signal(signal)?;
        }
        Ok(Response::Done)
    }

    fn update(&self, id: &str, resources: serde_json::Value) -> Result<Response> {
        let resources: LinuxResources = serde_json::from_value(resources)
            .map_err(|e| invalid(format!("container {id:?}: invalid OCI resources: {e}")))?;
        self.with_cgroup(id, "updating its limits", |cg| cg.update(&resources))?;
        Ok(Response::Done)
    }

    fn attach(&self, id: &str, exec_id: Option<&str>, stream: StdioStream) -> Result<Attachment> {
        self.process(id, exec_id)?
            .attach(stream)
            .map_err(Failure::from)
    }

    fn delete_exec(&self, id: &str, exec_id: &str) -> Result<Response> {
        let process = self.process(id, Some(exec_id))?;
        if process.exit().is_none() {
            if process.started() {
                return Err(precondition(format!("{} is still running", process.name())));
            }
            process.abort_if_unstarted();
            process.wait_exit(KILL_WAIT);
        }
        process.disconnect();
        if let Ok(container) = self.container(id) {
            lock(&container.execs).remove(exec_id);
        }
        Ok(Response::Done)
    }

    fn delete(&self, id: &str) -> Result<Response> {
        let container = {
            let mut containers = lock(&self.containers);
            match containers.get(id) {
                Some(Slot::Ready(c)) => {
                    let c = Arc::clone(c);
                    containers.remove(id);
                    c
                }
                Some(Slot::Reserved) => {
                    return Err(precondition(format!(
                        "container {id:?} is still being created"
                    )))
                }
                None => return Err(not_found(id)),
            }
        };
        container.shut_down();
        let cgroup = lock(&container.cgroup).take();
        if let Some(cgroup) = cgroup {
            cgroup
                .remove()
                .map_err(|e| format!("container {id:?}: removing its cgroup: {e}"))?;
        }
        Ok(Response::Done)
    }
}

impl Container {
    /// Kills what still runs and waits for the init to be reaped, then ends
    /// every stdio pump.
    fn shut_down(&self) {
        let processes: Vec<Arc<Process>> = std::iter::once(Arc::clone(&self.init))
            .chain(lock(&self.execs).values().filter_map(|slot| match slot {
                Slot::Ready(p) => Some(Arc::clone(p)),
                Slot::Reserved => None,
            }))
            .collect();
        for p in &processes {
            p.abort_if_unstarted();
        }
        if self.init.exit().is_none() {
            if let Some(cgroup) = &*lock(&self.cgroup) {
                if let Err(e) = cgroup.signal_all(libc::SIGKILL) {
                    log::warn!("container {:?}: killing its processes: {e}", self.id);
                }
            }
            // Also directly, in case the init never joined the cgroup.
            let _ = self.init.signal(libc::SIGKILL);
            if self.init.wait_exit(KILL_WAIT).is_none() {
                log::warn!(
                    "container {:?}: init {} not reaped {KILL_WAIT:?} after SIGKILL",
                    self.id,
                    self.init.pid
                );
            }
        }
        for p in &processes {
            p.disconnect();
        }
    }
}

/// The id names a cgroup directory: it must be one path component.
fn check_id(id: &str) -> Result<()> {
    if id.is_empty() || id == "." || id == ".." || id.contains('/') || id.contains('\0') {
        return Err(invalid(format!("container id {id:?} is not valid")));
    }
    Ok(())
}
