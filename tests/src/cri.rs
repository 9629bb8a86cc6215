//! Kubernetes' Container Runtime Interface (`runtime.v1`), spoken to
//! containerd's own CRI plugin the way the kubelet speaks it: pods with a
//! runtime handler ("runc" or "jevm"), containers in them, exec-sync, pod
//! status. Blocking calls over a private tokio runtime, so tests stay plain
//! `#[test]` functions.
//!
//! The containerd is the private one of `hack/containerd-env`: its CRI
//! plugin has a real CNI network (bridge + host-local + loopback) in a
//! network namespace of its own, the "node", which the tests run in too,
//! so they reach pod IPs. A [`Pod`] stops and removes itself when dropped,
//! whatever the test did; [`Pod::remove`] does it on purpose and reports
//! what the pod left behind.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerStatsFilter, ContainerStatsRequest,
    ContainerStatusRequest, CreateContainerRequest, ExecRequest, ExecSyncRequest, ImageSpec,
    ImageStatusRequest, LinuxContainerConfig, LinuxContainerSecurityContext, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, ListContainerStatsRequest, ListContainersRequest,
    ListPodSandboxRequest, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
    PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest,
    ReopenContainerLogRequest, RunPodSandboxRequest, StartContainerRequest, StopContainerRequest,
    StopPodSandboxRequest, UpdateContainerResourcesRequest,
};
pub use k8s_cri::v1::{ContainerStats, ContainerStatus, LinuxContainerResources, Mount};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;

use crate::api::{CallError, CallResult};
use crate::ctr::{processes, runc_only, CTR_TIMEOUT};

/// The CRI runtime handlers `hack/containerd-env` configures.
pub const RUNC: &str = "runc";
pub const JEVM: &str = "jevm";

/// Says loudly that a jevm variant does not run under `JEVM_E2E_RUNC_ONLY=1`
/// and returns true then.
pub fn skip_jevm() -> bool {
    if runc_only() {
        crate::ctr::skipped("JEVM_E2E_RUNC_ONLY=1: the jevm variant of this CRI test did not run");
        return true;
    }
    false
}

/// What `hack/containerd-env` says about its CRI plugin and its node.
#[derive(Debug, Clone)]
pub struct CriEnv {
    pub address: String,
    /// containerd's namespace of CRI (k8s.io).
    pub namespace: String,
    pub image: String,
    pub pause_image: String,
    pub gateway: Ipv4Addr,
    pub subnet: String,
    pub network: String,
    pub ipam_dir: PathBuf,
    pub netns_dir: PathBuf,
    pub log_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub node_netns: String,
    /// jevm's `run_dir` (pods' shares are `<run_dir>/pods/<sandbox id>/shared`).
    pub run_dir: PathBuf,
}

impl CriEnv {
    /// `None` when the environment of `hack/containerd-env` is absent.
    pub fn from_env() -> Option<CriEnv> {
        let v = |n: &str| std::env::var(n).ok().filter(|s| !s.is_empty());
        Some(CriEnv {
            address: v("JEVM_CTR_ADDRESS")?,
            namespace: v("JEVM_CRI_NAMESPACE")?,
            image: v("JEVM_CRI_IMAGE")?,
            pause_image: v("JEVM_CRI_PAUSE_IMAGE")?,
            gateway: v("JEVM_CRI_GATEWAY")?
                .parse()
                .expect("JEVM_CRI_GATEWAY is an IPv4 address"),
            subnet: v("JEVM_CRI_SUBNET")?,
            network: v("JEVM_CRI_NETWORK")?,
            ipam_dir: v("JEVM_CRI_IPAM_DIR")?.into(),
            netns_dir: v("JEVM_CRI_NETNS_DIR")?.into(),
            log_dir: v("JEVM_CRI_LOG_DIR")?.into(),
            cni_bin_dir: v("JEVM_CNI_BIN_DIR")?.into(),
            node_netns: v("JEVM_CTR_NODE_NETNS")?,
            run_dir: v("JEVM_RUN_DIR")?.into(),
        })
    }

    /// Pod IPs host-local holds (one file per address in its data dir).
    pub fn allocated_ips(&self) -> Vec<String> {
        let dir = self.ipam_dir.join(&self.network);
        let mut ips: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.parse::<Ipv4Addr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        ips.sort();
        ips
    }

    /// Network namespaces CRI still pins, and mounts under its netns dir.
    pub fn pinned_netns(&self) -> Vec<String> {
        let mut left: Vec<String> = std::fs::read_dir(&self.netns_dir)
            .map(|d| {
                d.flatten()
                    .map(|e| format!("netns file {}", e.path().display()))
                    .collect()
            })
            .unwrap_or_default();
        let dir = self.netns_dir.display().to_string();
        left.extend(
            crate::ctr::mounts()
                .into_iter()
                .filter(|m| m.starts_with(&dir))
                .map(|m| format!("netns mount {m}")),
        );
        left
    }

    /// Shim processes serving our containerd in CRI's namespace (all of
    /// them, or those of one pod: shims are started with `-id SANDBOX`).
    pub fn shims(&self, sandbox: Option<&str>) -> Vec<String> {
        processes()
            .into_iter()
            .filter(|(_, a)| {
                let has = |flag: &str, val: &str| a.windows(2).any(|w| w[0] == flag && w[1] == val);
                a.first().is_some_and(|p| p.contains("containerd-shim"))
                    && has("-address", &self.address)
                    && has("-namespace", &self.namespace)
                    && sandbox.is_none_or(|id| has("-id", id))
            })
            .map(|(pid, a)| format!("shim {pid}: {}", a.join(" ")))
            .collect()
    }
}

/// Gets the CRI environment or explains loudly why the test does nothing.
#[macro_export]
macro_rules! cri_env_or_skip {
    () => {
        match $crate::cri::CriEnv::from_env() {
            Some(env) => env,
            None => {
                $crate::ctr::skipped(
                    "no private containerd with CRI (JEVM_CTR_*/JEVM_CRI_* unset): run the CRI tests through hack/e2e (or hack/containerd-env)",
                );
                return;
            }
        }
    };
}

/// How a pod uses the node's network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodNetwork {
    /// Its own namespace, set up by CNI (the ordinary pod).
    Pod,
    /// The node's (`hostNetwork: true`).
    Node,
}

/// What a pod is asked to be.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub hostname: String,
    pub network: PodNetwork,
    /// The pod's annotations (containerd passes on to the runtime those its
    /// `pod_annotations` lists, e.g. `io.jevm.vm.*`).
    pub annotations: HashMap<String, String>,
    /// `shareProcessNamespace: true`: one PID namespace for the pod.
    pub share_pid: bool,
}

impl PodSpec {
    /// A pod named after the test and the handler, unique in this run.
    pub fn new(test: &str, handler: &str) -> PodSpec {
        let n = unique();
        let name = format!("cri-{test}-{handler}-{}-{n}", std::process::id());
        PodSpec {
            hostname: format!("{test}-{handler}-{n}"),
            name,
            network: PodNetwork::Pod,
            annotations: HashMap::new(),
            share_pid: false,
        }
    }

    fn namespaces(&self) -> NamespaceOption {
        NamespaceOption {
            network: match self.network {
                PodNetwork::Pod => NamespaceMode::Pod,
                PodNetwork::Node => NamespaceMode::Node,
            } as i32,
            // What the kubelet asks for with and without shareProcessNamespace.
            pid: if self.share_pid {
                NamespaceMode::Pod
            } else {
                NamespaceMode::Container
            } as i32,
            ipc: NamespaceMode::Pod as i32,
            ..Default::default()
        }
    }
}

fn unique() -> usize {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A container as the kubelet asks for it: the parts these tests vary.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    /// The kubelet's restart count: 0, then 1 for the first restart.
    pub attempt: u32,
    pub command: Vec<String>,
    /// Volumes, as the kubelet sends them: host paths it prepared.
    pub mounts: Vec<Mount>,
    pub resources: Option<LinuxContainerResources>,
    pub tty: bool,
}

impl ContainerSpec {
    pub fn new(name: &str, cmd: &[&str]) -> ContainerSpec {
        ContainerSpec {
            name: name.into(),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }
}

/// A bind mount the kubelet would send for a volume (private propagation,
/// no SELinux relabel).
pub fn volume(container_path: &str, host_path: &std::path::Path, readonly: bool) -> Mount {
    Mount {
        container_path: container_path.into(),
        host_path: host_path.display().to_string(),
        readonly,
        selinux_relabel: false,
        propagation: k8s_cri::v1::MountPropagation::PropagationPrivate as i32,
        ..Default::default()
    }
}

/// A connection to containerd's CRI plugin.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    pub env: CriEnv,
}

/// `ExecSync`'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Cri {
    /// Connects to the unix socket and waits (up to a minute) until CRI
    /// knows both images: it learns of images imported after its start from
    /// containerd's events.
    pub fn connect(env: &CriEnv) -> Cri {
        for p in ["bridge", "host-local", "loopback"] {
            let bin = env.cni_bin_dir.join(p);
            assert!(
                bin.is_file(),
                "CNI plugin {} is missing: apt-get install containernetworking-plugins (hack/setup does)",
                bin.display()
            );
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let path = PathBuf::from(&env.address);
        let channel = rt
            .block_on(async move {
                // The URI is never used: every connection is the socket.
                Endpoint::try_from("http://[::]:50051")?
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let s = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(s))
                        }
                    }))
                    .await
            })
            .unwrap_or_else(|e| panic!("CRI at {}: {e}", env.address));
        let cri = Cri {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            env: env.clone(),
        };
        for image in [&env.image, &env.pause_image] {
            cri.wait_image(image, Duration::from_secs(60));
        }
        cri
    }

    fn call<T>(
        &self,
        what: &'static str,
        timeout: Duration,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> CallResult<T> {
        self.rt.block_on(async {
            match tokio::time::timeout(timeout, f).await {
                Ok(r) => r.map(|r| r.into_inner()).map_err(CallError::from),
                Err(_) => Err(CallError::TimedOut(what)),
            }
        })
    }

    fn wait_image(&self, image: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut c = self.images.clone();
            let req = ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                verbose: false,
            };
            let r = self.call("ImageStatus", *CTR_TIMEOUT, c.image_status(req));
            match r {
                Ok(r) if r.image.is_some() => return,
                r if Instant::now() >= deadline => {
                    panic!("CRI does not know image {image} after {timeout:?}: {r:?}")
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// `RunPodSandbox` with `handler`. The pod is stopped and removed when
    /// the returned guard is dropped.
    pub fn run_pod(&self, handler: &str, spec: &PodSpec) -> CallResult<Pod<'_>> {
        let log_dir = self.env.log_dir.join(&spec.name);
        std::fs::create_dir_all(&log_dir).expect("pod log directory");
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: spec.name.clone(),
                uid: format!("uid-{}", spec.name),
                namespace: "jevm-e2e".into(),
                attempt: 0,
            }),
            // As the kubelet: a host-network pod has the node's hostname
            // (runc refuses to set one without a private UTS namespace).
            hostname: match spec.network {
                PodNetwork::Pod => spec.hostname.clone(),
                PodNetwork::Node => String::new(),
            },
            log_directory: log_dir.display().to_string(),
            annotations: spec.annotations.clone(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(spec.namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let req = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        };
        let mut c = self.runtime.clone();
        let id = self
            .call("RunPodSandbox", *CTR_TIMEOUT, c.run_pod_sandbox(req))?
            .pod_sandbox_id;
        let mut pod = Pod {
            cri: self,
            id,
            handler: handler.into(),
            spec: spec.clone(),
            config,
            netns: None,
            ip: None,
            removed: false,
        };
        let status = self.pod_status(&pod.id)?;
        pod.ip = status.ip.clone();
        pod.netns = status.netns.clone();
        Ok(pod)
    }

    /// `PodSandboxStatus` (verbose: containerd adds its own view).
    pub fn pod_status(&self, id: &str) -> CallResult<PodStatus> {
        let req = PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        };
        let mut c = self.runtime.clone();
        let r = self.call("PodSandboxStatus", *CTR_TIMEOUT, c.pod_sandbox_status(req))?;
        let status = r.status.unwrap_or_default();
        let ip = status
            .network
            .as_ref()
            .map(|n| n.ip.clone())
            .filter(|ip| !ip.is_empty());
        // containerd's "info": its sandbox record, with the OCI spec of the
        // sandbox container, which names the pod's network namespace.
        let info: serde_json::Value = r
            .info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or_default();
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|ns| {
                ns.iter()
                    .find(|n| n["type"] == "network")
                    .and_then(|n| n["path"].as_str())
                    .map(PathBuf::from)
            });
        Ok(PodStatus {
            state: status.state,
            ip,
            netns,
            info: r.info,
        })
    }

    /// Every pod sandbox CRI knows, in any state: (id, name).
    pub fn list_pods(&self) -> CallResult<Vec<(String, String)>> {
        let mut c = self.runtime.clone();
        let r = self.call(
            "ListPodSandbox",
            *CTR_TIMEOUT,
            c.list_pod_sandbox(ListPodSandboxRequest { filter: None }),
        )?;
        Ok(r.items
            .into_iter()
            .map(|p| (p.id, p.metadata.map(|m| m.name).unwrap_or_default()))
            .collect())
    }

    /// Every container CRI knows, in any state: (id, name).
    pub fn list_containers(&self) -> CallResult<Vec<(String, String)>> {
        let mut c = self.runtime.clone();
        let r = self.call(
            "ListContainers",
            *CTR_TIMEOUT,
            c.list_containers(ListContainersRequest { filter: None }),
        )?;
        Ok(r.containers
            .into_iter()
            .map(|c| (c.id, c.metadata.map(|m| m.name).unwrap_or_default()))
            .collect())
    }

    /// `ExecSync` of `cmd` in container `cid`; `timeout` is CRI's own (the
    /// command is killed after it), the call may take a minute more.
    pub fn exec_sync(&self, cid: &str, cmd: &[&str], timeout: Duration) -> CallResult<ExecOutput> {
        let req = ExecSyncRequest {
            container_id: cid.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout.as_secs() as i64,
        };
        let mut c = self.runtime.clone();
        let r = self.call(
            "ExecSync",
            timeout + Duration::from_secs(60),
            c.exec_sync(req),
        )?;
        Ok(ExecOutput {
            code: r.exit_code,
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        })
    }

    /// `ContainerStatus` (not verbose).
    pub fn container_status(&self, id: &str) -> CallResult<ContainerStatus> {
        let mut c = self.runtime.clone();
        let r = self.call(
            "ContainerStatus",
            *CTR_TIMEOUT,
            c.container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            }),
        )?;
        Ok(r.status.unwrap_or_default())
    }

    /// `UpdateContainerResources` with Linux resources.
    pub fn update_resources(&self, id: &str, r: LinuxContainerResources) -> CallResult<()> {
        let mut c = self.runtime.clone();
        self.call(
            "UpdateContainerResources",
            *CTR_TIMEOUT,
            c.update_container_resources(UpdateContainerResourcesRequest {
                container_id: id.into(),
                linux: Some(r),
                ..Default::default()
            }),
        )?;
        Ok(())
    }

    /// `ContainerStats` of one container.
    pub fn container_stats(&self, id: &str) -> CallResult<ContainerStats> {
        let mut c = self.runtime.clone();
        let r = self.call(
            "ContainerStats",
            *CTR_TIMEOUT,
            c.container_stats(ContainerStatsRequest {
                container_id: id.into(),
            }),
        )?;
        Ok(r.stats.unwrap_or_default())
    }

    /// `ListContainerStats` of the containers of one pod.
    pub fn list_container_stats(&self, pod_id: &str) -> CallResult<Vec<ContainerStats>> {
        let mut c = self.runtime.clone();
        let r = self.call(
            "ListContainerStats",
            *CTR_TIMEOUT,
            c.list_container_stats(ListContainerStatsRequest {
                filter: Some(ContainerStatsFilter {
                    pod_sandbox_id: pod_id.into(),
                    ..Default::default()
                }),
            }),
        )?;
        Ok(r.stats)
    }

    /// `ReopenContainerLog`: CRI closes the container's log file and opens
    /// its path again (the kubelet calls it after rotating the file).
    pub fn reopen_log(&self, id: &str) -> CallResult<()> {
        let mut c = self.runtime.clone();
        self.call(
            "ReopenContainerLog",
            *CTR_TIMEOUT,
            c.reopen_container_log(ReopenContainerLogRequest {
                container_id: id.into(),
            }),
        )?;
        Ok(())
    }

    /// `StopContainer` with a grace period of `timeout_secs`.
    pub fn stop_container(&self, id: &str, timeout_secs: i64) -> CallResult<()> {
        let mut c = self.runtime.clone();
        self.call(
            "StopContainer",
            *CTR_TIMEOUT,
            c.stop_container(StopContainerRequest {
                container_id: id.into(),
                timeout: timeout_secs,
            }),
        )?;
        Ok(())
    }

    /// `RemoveContainer`.
    pub fn remove_container(&self, id: &str) -> CallResult<()> {
        let mut c = self.runtime.clone();
        self.call(
            "RemoveContainer",
            *CTR_TIMEOUT,
            c.remove_container(RemoveContainerRequest {
                container_id: id.into(),
            }),
        )?;
        Ok(())
    }

    /// `Exec` (streaming): the URL of containerd's streaming server that
    /// serves this exec once.
    pub fn exec_url(&self, id: &str, cmd: &[&str], tty: bool) -> CallResult<String> {
        let mut c = self.runtime.clone();
        let r = self.call(
            "Exec",
            *CTR_TIMEOUT,
            c.exec(ExecRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                tty,
                stdin: true,
                stdout: true,
                stderr: !tty,
            }),
        )?;
        Ok(r.url)
    }
}

/// A pod's status as the tests use it.
#[derive(Debug, Clone)]
pub struct PodStatus {
    /// `PodSandboxState`: 0 ready, 1 not ready.
    pub state: i32,
    pub ip: Option<String>,
    /// The pod's network namespace on the node, as CRI pinned it.
    pub netns: Option<PathBuf>,
    pub info: HashMap<String, String>,
}

/// A pod this test created: stopped and removed when dropped.
pub struct Pod<'a> {
    cri: &'a Cri,
    pub id: String,
    pub handler: String,
    pub spec: PodSpec,
    config: PodSandboxConfig,
    /// Where CRI pinned the pod's network namespace (none: host network).
    pub netns: Option<PathBuf>,
    pub ip: Option<String>,
    removed: bool,
}

impl Pod<'_> {
    /// The pod IP CRI reports; panics (naming the runtime) without one.
    pub fn ip(&self) -> Ipv4Addr {
        let ip = self.ip.as_deref().unwrap_or_else(|| {
            panic!(
                "{}: pod {} has no IP in PodSandboxStatus",
                self.handler, self.spec.name
            )
        });
        ip.parse()
            .unwrap_or_else(|e| panic!("{}: pod IP {ip:?}: {e}", self.handler))
    }

    /// `CreateContainer` + `StartContainer` of the busybox image running
    /// `cmd`, with the pod's namespace options. Returns the container id.
    pub fn start_container(&self, name: &str, cmd: &[&str]) -> CallResult<String> {
        self.run(&ContainerSpec::new(name, cmd))
    }

    /// `CreateContainer` of `c` in this pod (busybox image, the pod's
    /// namespace options, log at `<pod log dir>/<name>.log`).
    pub fn create(&self, c: &ContainerSpec) -> CallResult<String> {
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: c.name.clone(),
                attempt: c.attempt,
            }),
            image: Some(ImageSpec {
                image: self.cri.env.image.clone(),
                ..Default::default()
            }),
            command: c.command.clone(),
            log_path: format!("{}.log", c.name),
            mounts: c.mounts.clone(),
            tty: c.tty,
            linux: Some(LinuxContainerConfig {
                resources: c.resources.clone(),
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(self.spec.namespaces()),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let req = CreateContainerRequest {
            pod_sandbox_id: self.id.clone(),
            config: Some(config),
            sandbox_config: Some(self.config.clone()),
        };
        let mut client = self.cri.runtime.clone();
        Ok(self
            .cri
            .call(
                "CreateContainer",
                *CTR_TIMEOUT,
                client.create_container(req),
            )?
            .container_id)
    }

    /// `StartContainer`.
    pub fn start(&self, id: &str) -> CallResult<()> {
        let mut c = self.cri.runtime.clone();
        self.cri.call(
            "StartContainer",
            *CTR_TIMEOUT,
            c.start_container(StartContainerRequest {
                container_id: id.into(),
            }),
        )?;
        Ok(())
    }

    /// [`Pod::create`] + [`Pod::start`]; returns the container id.
    pub fn run(&self, c: &ContainerSpec) -> CallResult<String> {
        let id = self.create(c)?;
        self.start(&id)?;
        Ok(id)
    }

    /// [`Pod::run`] that panics, naming the runtime, on failure.
    pub fn must_run(&self, c: &ContainerSpec) -> String {
        self.run(c).unwrap_or_else(|e| {
            panic!(
                "{}: container {} in pod {}: {e:?}",
                self.handler, c.name, self.spec.name
            )
        })
    }

    /// [`Pod::start_container`] that panics, naming the runtime, on failure.
    pub fn must_start(&self, name: &str, cmd: &[&str]) -> String {
        self.start_container(name, cmd).unwrap_or_else(|e| {
            panic!(
                "{}: container {name} in pod {}: {e:?}",
                self.handler, self.spec.name
            )
        })
    }

    /// `ExecSync` that panics, naming the runtime, if the call fails.
    pub fn exec(&self, cid: &str, cmd: &[&str], timeout: Duration) -> ExecOutput {
        self.cri.exec_sync(cid, cmd, timeout).unwrap_or_else(|e| {
            panic!(
                "{}: exec {cmd:?} in pod {}: {e:?}",
                self.handler, self.spec.name
            )
        })
    }

    /// Where CRI writes the log of container `name`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.cri
            .env
            .log_dir
            .join(&self.spec.name)
            .join(format!("{name}.log"))
    }

    /// A container's log as CRI wrote it (`TIME STREAM TAG LINE` lines).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// jevm's share of this pod on the host (what its virtio-fs serves).
    pub fn jevm_share(&self) -> PathBuf {
        self.cri
            .env
            .run_dir
            .join("pods")
            .join(&self.id)
            .join("shared")
    }

    fn stop_and_remove(&self) -> CallResult<()> {
        let mut c = self.cri.runtime.clone();
        self.cri.call(
            "StopPodSandbox",
            *CTR_TIMEOUT,
            c.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: self.id.clone(),
            }),
        )?;
        let mut c = self.cri.runtime.clone();
        self.cri.call(
            "RemovePodSandbox",
            *CTR_TIMEOUT,
            c.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: self.id.clone(),
            }),
        )?;
        Ok(())
    }

    /// Stops and removes the pod, then returns what it left behind
    /// (waiting up to 30 s for its shim to exit): empty when nothing.
    pub fn remove(mut self) -> Vec<String> {
        self.removed = true;
        if let Err(e) = self.stop_and_remove() {
            return vec![format!("stop/remove of pod {}: {e:?}", self.spec.name)];
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = self.leftovers();
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        match self.cri.list_pods() {
            Ok(pods) => left.extend(
                pods.into_iter()
                    .filter(|(id, _)| *id == self.id)
                    .map(|(id, name)| format!("pod sandbox {id} ({name}) still listed")),
            ),
            Err(e) => left.push(format!("ListPodSandbox: {e:?}")),
        }
        if let Some(ip) = &self.ip {
            if self.cri.env.allocated_ips().contains(ip) {
                left.push(format!("pod IP {ip} still allocated by host-local"));
            }
        }
        if let Some(ns) = &self.netns {
            if ns.exists() {
                left.push(format!("network namespace {} still pinned", ns.display()));
            }
        }
        left.extend(self.cri.env.shims(Some(&self.id)));
        left
    }
}

impl Drop for Pod<'_> {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        if let Err(e) = self.stop_and_remove() {
            eprintln!(
                "!!! {}: could not stop/remove pod {} ({}): {e:?}",
                self.handler, self.spec.name, self.id
            );
        }
    }
}

/// Runs one scenario under `handler`, printing how long it took (the
/// scenarios' budgets in docs/testing.md come from these lines).
pub fn timed(name: &str, handler: &str, f: fn(&str)) {
    let t = Instant::now();
    f(handler);
    eprintln!("{name} under {handler}: {:.1} s", t.elapsed().as_secs_f64());
}

/// RunPodSandbox, failing the test with the runtime and pod named.
pub fn run_pod<'a>(cri: &'a Cri, handler: &str, spec: &PodSpec) -> Pod<'a> {
    cri.run_pod(handler, spec)
        .unwrap_or_else(|e| panic!("{handler}: RunPodSandbox {}: {e:?}", spec.name))
}

/// Removes the pod and fails, naming the runtime, if it left anything.
pub fn remove_clean(pod: Pod<'_>) {
    let (handler, name) = (pod.handler.clone(), pod.spec.name.clone());
    let left = pod.remove();
    assert!(
        left.is_empty(),
        "{handler}: pod {name} left behind after StopPodSandbox + RemovePodSandbox:\n  {}",
        left.join("\n  ")
    );
}

/// What a streaming exec sent back, per channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamOutput {
    pub stdout: String,
    pub stderr: String,
    /// Channel 3: the exec's final status (JSON) or an error text.
    pub error: String,
}

/// Drives a streaming exec at `url` (from [`Cri::exec_url`]) over a
/// websocket with Kubernetes' `v4.channel.k8s.io` subprotocol, as
/// `kubectl exec` through the API server does: every message is binary,
/// its first byte the channel (0 stdin, 1 stdout, 2 stderr, 3 error, 4
/// resize). Sends `input` (channel, bytes) in order, then reads until the
/// server closes. A plain blocking client: RFC 6455 framing by hand, the
/// client's frames masked.
pub fn stream_exec(
    url: &str,
    input: &[(u8, Vec<u8>)],
    timeout: Duration,
) -> Result<StreamOutput, String> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("streaming URL {url:?} is not http://"))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = std::net::TcpStream::connect(host).map_err(|e| format!("connect {host}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    // The key is a nonce the server only hashes back; RFC 6455's example
    // value serves.
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("request: {e}"))?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            Ok(_) => return Err(format!("connection closed in the handshake: {head:?}")),
            Err(e) => return Err(format!("handshake: {e}")),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if !head.starts_with("HTTP/1.1 101") {
        return Err(format!("no websocket upgrade: {head:?}"));
    }
    for (channel, data) in input {
        let mut payload = vec![*channel];
        payload.extend_from_slice(data);
        let mut frame = vec![0x82u8]; // FIN, binary
        let n = payload.len();
        if n < 126 {
            frame.push(0x80 | n as u8);
        } else {
            let n = u16::try_from(n).map_err(|_| "an input frame over 64 KiB".to_string())?;
            frame.push(0x80 | 126);
            frame.extend_from_slice(&n.to_be_bytes());
        }
        let mask = [0x5a, 0xc3, 0x17, 0x88];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        s.write_all(&frame).map_err(|e| format!("sending: {e}"))?;
    }
    let mut out = StreamOutput::default();
    let deadline = Instant::now() + timeout;
    loop {
        if Instant::now() >= deadline {
            return Err(format!("no end of the exec within {timeout:?}: {out:?}"));
        }
        let mut h = [0u8; 2];
        match s.read_exact(&mut h) {
            Ok(()) => {}
            // The server may just close the connection after its status.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(out),
            Err(e) => return Err(format!("reading a frame: {e} ({out:?})")),
        }
        let opcode = h[0] & 0x0f;
        let mut len = u64::from(h[1] & 0x7f);
        if len == 126 {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).map_err(|e| e.to_string())?;
            len = u64::from(u16::from_be_bytes(l));
        } else if len == 127 {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).map_err(|e| e.to_string())?;
            len = u64::from_be_bytes(l);
        }
        let mut mask = None;
        if h[1] & 0x80 != 0 {
            let mut m = [0u8; 4];
            s.read_exact(&mut m).map_err(|e| e.to_string())?;
            mask = Some(m);
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload)
            .map_err(|e| format!("reading a payload: {e}"))?;
        if let Some(m) = mask {
            payload
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b ^= m[i % 4]);
        }
        match opcode {
            8 => return Ok(out),
            1 | 2 if !payload.is_empty() => {
                let text = String::from_utf8_lossy(&payload[1..]);
                match payload[0] {
                    1 => out.stdout.push_str(&text),
                    2 => out.stderr.push_str(&text),
                    3 => out.error.push_str(&text),
                    _ => {}
                }
            }
            _ => {}
        }
    }
}
