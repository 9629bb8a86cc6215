//! One pod = one VM: a clone of the template for the configured kernel,
//! initramfs and size, serving the pod's shared directory over virtio-fs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jevm_protocol::{Event, Request, MAX_FRAME};
use jevm_runtime::clone::{build_template, clone_from, CloneOptions};
use jevm_runtime::microvm::MicroVm;
use jevm_runtime::template::{TemplateSpec, TemplateStore};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::agent::Agent;
use crate::config::JevmConfig;
use crate::layout::{vms_dir, PodLayout};

/// What the pod's event reader tells the task service.
#[derive(Debug)]
pub enum PodEvent {
    Agent {
        event: Event,
    },
    /// The event stream ended while the pod was not being shut down: the
    /// VM is gone.
    Lost {
        pod: String,
    },
}

pub struct Pod {
    pub id: String,
    pub layout: PodLayout,
    pub agent: Arc<Agent>,
    pub vm_dir: PathBuf,
    vm: Mutex<Option<MicroVm>>,
    closing: Arc<AtomicBool>,
    lost: AtomicBool,
    /// The container that started the pod and its guest init PID: CRI
    /// containers join its namespaces.
    pub sandbox: Mutex<Option<(String, u32)>>,
    events: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// How long the VM's start took, for the create→start breakdown.
#[derive(Debug, Default, Clone, Copy)]
pub struct StartTimes {
    pub template_lookup: Duration,
    pub clone: Duration,
}

impl Pod {
    /// Finds or builds the template, clones it with `layout.shared()` as
    /// its virtio-fs share, and subscribes to the agent's events.
    pub async fn start(
        cfg: &JevmConfig,
        id: &str,
        layout: PodLayout,
        hostname: String,
        events: mpsc::UnboundedSender<PodEvent>,
    ) -> Result<(Arc<Pod>, StartTimes), String> {
        let spec = TemplateSpec {
            kernel: cfg.kernel.clone(),
            initrd: cfg.initramfs.clone(),
            cmdline: cfg.kernel_params.clone(),
            vcpus: cfg.vcpus,
            mem_mib: cfg.memory_mib,
        };
        let store = TemplateStore::new(&cfg.template_dir);
        let vms = vms_dir(&cfg.run_dir);
        let share = layout.shared();
        let pod_id = id.to_string();
        let (vm, times) = tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            let template = store
                .get_or_create(&spec, |staging| {
                    build_template(&spec, &vms, staging, |_| Ok(()))
                })
                .map_err(|e| format!("pod {pod_id:?}: template for {spec}: {e:#}"))?;
            let template_lookup = t0.elapsed();
            let t1 = Instant::now();
            let opts = CloneOptions {
                hostname,
                share: Some(share),
            };
            let vm = clone_from(&template, &vms, &opts)
                .map_err(|e| format!("pod {pod_id:?}: cloning template {}: {e}", template.key))?;
            Ok::<_, String>((
                vm,
                StartTimes {
                    template_lookup,
                    clone: t1.elapsed(),
                },
            ))
        })
        .await
        .map_err(|e| format!("pod {id:?}: VM start thread: {e}"))??;

        let agent = Agent::new(vm.vsock_uds().to_path_buf());
        let pod = Arc::new(Pod {
            id: id.to_string(),
            layout,
            agent,
            vm_dir: vm.run_dir().to_path_buf(),
            vm: Mutex::new(Some(vm)),
            closing: Arc::new(AtomicBool::new(false)),
            lost: AtomicBool::new(false),
            sandbox: Mutex::new(None),
            events: Mutex::new(None),
        });
        match pod.agent.stream("Events", Request::Events).await {
            Ok(stream) => {
                let h = tokio::spawn(read_events(
                    pod.id.clone(),
                    Arc::clone(&pod.closing),
                    stream,
                    events,
                ));
                *pod.events.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
            }
            Err(e) => {
                pod.stop().await;
                return Err(format!("pod {id:?}: subscribing to agent events: {e}"));
            }
        }
        Ok((pod, times))
    }

    /// Powers the VM off (forcibly after a few seconds) and waits for its
    /// threads; the VM's run directory goes with it. Idempotent.
    pub async fn stop(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let vm = self.vm.lock().unwrap_or_else(|p| p.into_inner()).take();
        let lost = self.lost.load(Ordering::SeqCst);
        if let Some(vm) = vm {
            let id = self.id.clone();
            // A lost guest cannot be asked to power off: dropping the VM
            // stops its threads and removes its run directory.
            let r = tokio::task::spawn_blocking(move || {
                if lost {
                    drop(vm);
                    None
                } else {
                    Some(vm.shutdown(Duration::from_secs(5)))
                }
            })
            .await;
            match r {
                Ok(reason) => log::info!("pod {id}: VM stopped ({reason:?})"),
                Err(e) => log::error!("pod {id}: VM shutdown thread: {e}"),
            }
        }
        if let Some(h) = self.events.lock().unwrap_or_else(|p| p.into_inner()).take() {
            h.abort();
        }
    }

    /// The VM died: no more agent calls, teardown without asking it.
    pub fn mark_lost(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.agent.mark_dead();
        self.closing.store(true, Ordering::SeqCst);
    }

    /// Being stopped or lost: agent calls would fail or hang.
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }
}

async fn read_events(
    pod_id: String,
    closing: Arc<AtomicBool>,
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
            Err(e) => log::warn!("pod {pod_id}: undecodable agent event: {e}"),
        }
    };
    if !closing.load(Ordering::SeqCst) {
        log::error!("pod {pod_id}: agent event stream ended ({why}); the VM is gone");
        let _ = tx.send(PodEvent::Lost { pod: pod_id });
    }
}
