//! The shim's lifecycle as containerd drives it: `start` (launch or reuse
//! the pod's shim), `delete` (clean up after a dead shim), and serving.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::util::write_str_to_file;
use containerd_shim::{Config, DeleteResponse, Error, Flags, StartOpts};
use tokio::sync::mpsc;

use crate::events::{self, LOST_EXIT_STATUS};
use crate::record;
use crate::spec;
use crate::task::TaskService;

/// Set by `start` for the shim it launches: when containerd ran `start`,
/// in nanoseconds since the epoch, for the "shim start" timing.
const LAUNCHED_ENV: &str = "JEVM_SHIM_LAUNCHED_NS";

fn epoch_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

pub struct Service {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
}

#[async_trait]
impl Shim for Service {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service {
            exit: Arc::new(ExitSignal::default()),
            id: args.id.clone(),
            namespace: args.namespace.clone(),
        }
    }

    /// Every container of a CRI pod goes to one shim: the socket address is
    /// derived from the sandbox id, and `spawn` returns the running shim's
    /// address when that socket already answers.
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let launched = epoch_ns(crate::process_start()).to_string();
        let grouping = match std::fs::read("config.json")
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        {
            Some(s) => spec::pod_id(&s, &opts.id),
            None => opts.id.clone(),
        };
        let address = spawn(opts, &grouping, vec![(LAUNCHED_ENV, launched.as_str())]).await?;
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    /// containerd runs `delete` in the bundle after the shim died: the VM
    /// died with it; unmount and remove what is left on the host.
    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let bundle = std::env::current_dir().map_err(|e| Error::IoError {
            context: "current directory (the bundle)".into(),
            err: e,
        })?;
        let id = self.id.clone();
        let pid = tokio::task::spawn_blocking(move || {
            record::remove_dead_socket(&bundle);
            record::cleanup_after_dead_shim(&bundle, &id)
        })
        .await
        .unwrap_or(0);
        Ok(DeleteResponse {
            pid,
            exit_status: LOST_EXIT_STATUS,
            exited_at: Some(events::now()).into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let shim_start = std::env::var(LAUNCHED_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(|ns| Duration::from_nanos(epoch_ns(SystemTime::now()).saturating_sub(ns)));
        let (tx, rx) = mpsc::unbounded_channel();
        let unpublished = Arc::new(AtomicUsize::new(0));
        // The crate's publisher gives up on an event after ~20 s of
        // containerd being away; ours does not (see `publisher`).
        let address = publisher.address.clone();
        drop(publisher);
        tokio::spawn(crate::publisher::run(
            address,
            self.namespace.clone(),
            rx,
            Arc::clone(&unpublished),
        ));
        TaskService::new(
            Arc::clone(&self.exit),
            tx,
            unpublished,
            shim_start,
            Arc::new(crate::pod::VmPods),
        )
    }
}
