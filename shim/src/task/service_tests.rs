//! The task service driven through its ttrpc methods against a fake guest
//! (no VM): what containerd sees, in what order, for each thing a guest can
//! do. Root is needed for the host side of create (the rootfs is bind-mounted
//! into the pod's share).

use super::*;
use crate::agent::Guest;
use crate::pod::{PodStart, PodStarter, StartTimes};
use crate::test_skip::skipped;
use jevm_protocol::ErrorKind;
use tokio::sync::Notify;

/// Answers like the agent; a start can be held until the test lets it go.
#[derive(Default)]
struct FakeGuest {
    calls: Mutex<Vec<String>>,
    hold_start: Mutex<Option<Arc<Notify>>>,
    refuse_exec: Mutex<Option<String>>,
}

#[async_trait]
impl Guest for FakeGuest {
    async fn call(&self, name: &'static str, req: Request) -> Result<Response, CallError> {
        self.calls.lock().unwrap().push(name.to_string());
        Ok(match req {
            Request::CreateContainer(_) => Response::Created {
                pid: 42,
                times: None,
            },
            Request::StartContainer { .. } => {
                let gate = self.hold_start.lock().unwrap().clone();
                if let Some(gate) = gate {
                    gate.notified().await;
                }
                Response::Started { pid: 42 }
            }
            Request::Exec(_) => match self.refuse_exec.lock().unwrap().clone() {
                Some(message) => {
                    return Err(CallError::Guest {
                        kind: ErrorKind::Failed,
                        message,
                    })
                }
                None => Response::Created {
                    pid: 43,
                    times: None,
                },
            },
            Request::StartExec { .. } => Response::Started { pid: 43 },
            Request::Signal { .. }
            | Request::DeleteContainer { .. }
            | Request::DeleteExec { .. } => Response::Done,
            other => {
                return Err(CallError::Guest {
                    kind: ErrorKind::Failed,
                    message: format!("fake guest: {other:?} not expected"),
                })
            }
        })
    }

    async fn stream(
        &self,
        name: &'static str,
        _req: Request,
    ) -> Result<tokio::net::UnixStream, CallError> {
        Err(CallError::Dead(name))
    }
}

/// Hands out one pod whose guest is the fake, and keeps the pod's event
/// channel so the test can play the agent's events.
#[derive(Default)]
struct FakePods {
    guest: Arc<FakeGuest>,
    events: Mutex<Option<mpsc::UnboundedSender<PodEvent>>>,
    pods: Mutex<Vec<Arc<Pod>>>,
}

#[async_trait]
impl PodStarter for FakePods {
    async fn start(&self, how: PodStart<'_>) -> Result<(Arc<Pod>, StartTimes), String> {
        *self.events.lock().unwrap() = Some(how.events);
        let guest: Arc<dyn Guest> = self.guest.clone();
        let pod = Arc::new(Pod::without_vm(how.id, how.layout, guest, how.size));
        self.pods.lock().unwrap().push(Arc::clone(&pod));
        Ok((pod, StartTimes::default()))
    }
}

struct Harness {
    dir: tempfile::TempDir,
    svc: TaskService,
    pods: Arc<FakePods>,
    out: mpsc::UnboundedReceiver<Outgoing>,
    topics: Vec<String>,
}

fn ctx() -> TtrpcContext {
    TtrpcContext {
        mh: Default::default(),
        metadata: Default::default(),
        timeout_nano: 0,
    }
}

/// `runtimeoptions.v1.Options` with `ConfigBody` = `toml`, as containerd
/// 1.7 sends it.
fn options(toml: &str) -> containerd_shim_protos::protobuf::well_known_types::any::Any {
    let mut value = vec![(3 << 3) | 2];
    let mut n = toml.len();
    while n >= 0x80 {
        value.push((n as u8) | 0x80);
        n >>= 7;
    }
    value.push(n as u8);
    value.extend_from_slice(toml.as_bytes());
    containerd_shim_protos::protobuf::well_known_types::any::Any {
        type_url: "type.googleapis.com/runtimeoptions.v1.Options".into(),
        value,
        ..Default::default()
    }
}

impl Harness {
    fn new() -> Option<Harness> {
        if !nix::unistd::geteuid().is_root() {
            skipped("needs root: create bind-mounts the rootfs into the pod's share");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("vmlinux"),
            b"\x7fELF: the fake pods boot nothing",
        )
        .unwrap();
        std::fs::write(dir.path().join("initramfs"), b"not an initramfs").unwrap();
        let (tx, out) = mpsc::unbounded_channel();
        let pods = Arc::new(FakePods::default());
        let svc = TaskService::new(
            Arc::new(ExitSignal::default()),
            tx,
            Arc::new(AtomicUsize::new(0)),
            None,
            Arc::clone(&pods) as Arc<dyn PodStarter>,
        );
        Some(Harness {
            dir,
            svc,
            pods,
            out,
            topics: Vec::new(),
        })
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn config(&self) -> String {
        let d = self.dir.path().display();
        format!(
            "kernel = \"{d}/vmlinux\"\ninitramfs = \"{d}/initramfs\"\nrun_dir = \"{d}/run\"\n\
             template_dir = \"{d}/templates\"\n"
        )
    }

    /// A bundle whose rootfs is a plain directory.
    fn bundle(&self, id: &str) -> PathBuf {
        let b = self.dir.path().join("bundles").join(id);
        std::fs::create_dir_all(b.join("rootfs")).unwrap();
        std::fs::write(
            b.join("config.json"),
            r#"{"ociVersion":"1.0.2","process":{"args":["true"],"cwd":"/"},"root":{"path":"rootfs"},
               "linux":{"namespaces":[{"type":"network"},{"type":"pid"},{"type":"mount"}]}}"#,
        )
        .unwrap();
        b
    }

    async fn create(&self, id: &str) -> TtrpcResult<CreateTaskResponse> {
        let bundle = self.bundle(id);
        self.svc
            .create(
                &ctx(),
                CreateTaskRequest {
                    id: id.into(),
                    bundle: bundle.display().to_string(),
                    options: Some(options(&self.config())).into(),
                    ..Default::default()
                },
            )
            .await
    }

    async fn start(&self, id: &str, exec: &str) -> TtrpcResult<StartResponse> {
        self.svc
            .start(
                &ctx(),
                StartRequest {
                    id: id.into(),
                    exec_id: exec.into(),
                    ..Default::default()
                },
            )
            .await
    }

    /// Plays an agent event, as the pod's event reader would.
    fn agent_event(&self, event: PodEvent) {
        let tx = self.pods.events.lock().unwrap().clone().expect("a pod");
        tx.send(event).unwrap();
    }

    fn exited(&self, id: &str, status: u32) {
        self.agent_event(PodEvent::Agent {
            event: Event::Exited {
                container_id: id.into(),
                exec_id: None,
                pid: 42,
                exit_status: status,
                exited_at_ns: 0,
            },
        });
    }

    /// Collects published topics until `topic` is among them (5 s at most).
    async fn until(&mut self, topic: &str) -> &[String] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.topics.iter().any(|t| t == topic) {
            match tokio::time::timeout_at(deadline, self.out.recv()).await {
                Ok(Some(o)) => self.topics.push(o.topic),
                _ => panic!("no {topic} within 5 s; published: {:?}", self.topics),
            }
        }
        &self.topics
    }
}

/// What a test did not delete itself: its pods' mounts and directories
/// (the temporary directory cannot go while a bind mount sits in it).
impl Drop for Harness {
    fn drop(&mut self) {
        for pod in self.pods.pods.lock().unwrap().iter() {
            crate::mounts::teardown(pod.layout.dir());
        }
    }
}

fn code(e: &ttrpc::Error) -> Code {
    match e {
        ttrpc::Error::RpcStatus(s) => s.code(),
        other => panic!("not a status: {other:?}"),
    }
}

#[tokio::test]
async fn a_task_runs_exits_and_is_deleted_with_its_events_in_order() {
    let Some(mut h) = Harness::new() else { return };
    assert_eq!(h.create("c1").await.unwrap().pid, 42);
    assert_eq!(h.start("c1", "").await.unwrap().pid, 42);
    h.exited("c1", 3);
    let waited = h
        .svc
        .wait(
            &ctx(),
            WaitRequest {
                id: "c1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(waited.exit_status, 3);
    let deleted = h
        .svc
        .delete(
            &ctx(),
            DeleteRequest {
                id: "c1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(deleted.exit_status, 3);
    assert_eq!(
        h.until("/tasks/delete").await,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    assert_eq!(
        *h.pods.guest.calls.lock().unwrap(),
        ["CreateContainer", "Start", "DeleteContainer"]
    );
    // The last container of the pod took the pod with it.
    let pod = h.pods.pods.lock().unwrap()[0].clone();
    assert!(pod.closing(), "the pod was not stopped");
    assert!(!PodLayout::new(&h.run_dir(), "c1").dir().exists());
}

#[tokio::test]
async fn an_exit_while_the_start_waits_for_the_guest_is_published_after_the_start() {
    let Some(mut h) = Harness::new() else { return };
    h.create("c2").await.unwrap();
    let gate = Arc::new(Notify::new());
    *h.pods.guest.hold_start.lock().unwrap() = Some(Arc::clone(&gate));
    let svc = h.svc.clone();
    let start = tokio::spawn(async move {
        svc.start(
            &ctx(),
            StartRequest {
                id: "c2".into(),
                ..Default::default()
            },
        )
        .await
    });
    // The guest reports the exit before it answers the start.
    while !h
        .pods
        .guest
        .calls
        .lock()
        .unwrap()
        .iter()
        .any(|c| c == "Start")
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    h.exited("c2", 7);
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.notify_one();
    start.await.unwrap().unwrap();
    assert_eq!(
        h.until("/tasks/exit").await,
        ["/tasks/create", "/tasks/start", "/tasks/exit"]
    );
    let state = Task::state(
        &h.svc,
        &ctx(),
        StateRequest {
            id: "c2".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(state.exit_status, 7);
    assert_eq!(state.status.enum_value(), Ok(Status::STOPPED));
}

#[tokio::test]
async fn a_lost_pod_ends_its_running_task_with_the_lost_status() {
    let Some(mut h) = Harness::new() else { return };
    h.create("c3").await.unwrap();
    h.start("c3", "").await.unwrap();
    h.agent_event(PodEvent::Lost {
        pod: "c3".into(),
        cause: "the guest kernel panicked".into(),
    });
    h.until("/tasks/exit").await;
    let waited = h
        .svc
        .wait(
            &ctx(),
            WaitRequest {
                id: "c3".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(waited.exit_status, LOST_EXIT_STATUS);
    // A late real exit changes nothing: the first exit wins.
    h.exited("c3", 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    while let Ok(o) = h.out.try_recv() {
        assert_ne!(o.topic, "/tasks/exit", "a second exit was published");
    }
}

#[tokio::test]
async fn an_exec_the_guest_refused_is_added_and_its_start_answers_the_guest_error() {
    let Some(mut h) = Harness::new() else { return };
    h.create("c4").await.unwrap();
    h.start("c4", "").await.unwrap();
    *h.pods.guest.refuse_exec.lock().unwrap() =
        Some("exec: \"nope\": executable file not found in $PATH".into());
    let spec = containerd_shim_protos::protobuf::well_known_types::any::Any {
        type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
        value: br#"{"args":["nope"],"cwd":"/"}"#.to_vec(),
        ..Default::default()
    };
    h.svc
        .exec(
            &ctx(),
            ExecProcessRequest {
                id: "c4".into(),
                exec_id: "e1".into(),
                spec: Some(spec).into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    h.until("/tasks/exec-added").await;
    let e = h.start("c4", "e1").await.unwrap_err();
    assert_eq!(code(&e), Code::UNKNOWN);
    assert!(message(&e).contains("executable file not found"), "{e:?}");
    // And a second start of the init is refused before the guest is asked.
    let e = h.start("c4", "").await.unwrap_err();
    assert_eq!(code(&e), Code::FAILED_PRECONDITION);
}

/// The run directory's file system fills up while a pod is created: with
/// no room at all, and with room for only the first 1..6 files and
/// directories create makes, create fails naming the pod, the path and the
/// cause, and leaves nothing behind (no pod directory, no mount, no record
/// in the bundle, no pod started); or, given room enough, succeeds.
#[tokio::test]
async fn a_full_run_directory_fails_create_with_the_cause_and_leaves_nothing() {
    let Some(h) = Harness::new() else { return };
    let run = h.run_dir();
    std::fs::create_dir_all(&run).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &run,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=64k,nr_inodes=32"),
    )
    .unwrap();
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(run.clone());
    // The shim's top-level directories (`pods`, `vms`) may stay, as
    // after any pod; nothing inside them may.
    let listing = |dir: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = crate::record::walk_for_tests(dir)
            .into_iter()
            .filter(|p| *p != dir.join("pods") && *p != dir.join("vms"))
            .collect();
        v.sort();
        v
    };
    let mut failures = 0;
    for free in 0..7 {
        let id = format!("c{free}");
        // Fill it, then free `free` inodes.
        let mut n = 0;
        while std::fs::write(run.join(format!("filler{n}")), b"").is_ok() {
            n += 1;
        }
        for k in 0..free.min(n) {
            std::fs::remove_file(run.join(format!("filler{k}"))).unwrap();
        }
        let before = listing(&run);
        match h.create(&id).await {
            Err(err) => {
                failures += 1;
                let text = format!("{err:?}").to_lowercase();
                assert!(
                    text.contains("no space left on device") && text.contains(&id),
                    "{free} free: {text}"
                );
                assert_eq!(listing(&run), before, "{free} free: create left something");
                let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
                // Only the test's own full tmpfs.
                assert_eq!(
                    crate::mounts::mounts_under(&info, &run),
                    std::slice::from_ref(&run),
                    "{free} free"
                );
                assert!(
                    !h.dir
                        .path()
                        .join("bundles")
                        .join(&id)
                        .join(crate::record::FILE)
                        .exists(),
                    "{free} free: the bundle record stayed"
                );
            }
            Ok(_) => {
                // Room enough: it is a pod like any other; end it.
                h.svc
                    .delete(
                        &ctx(),
                        DeleteRequest {
                            id: id.clone(),
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
            }
        }
        for entry in std::fs::read_dir(&run).unwrap().flatten() {
            if entry.file_name().to_string_lossy().starts_with("filler") {
                std::fs::remove_file(entry.path()).unwrap();
            }
        }
    }
    assert!(failures >= 2, "the file system never ran out during create");
}
